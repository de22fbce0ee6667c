"""The stream: StreamDiffusion's stream batch over pre-allocated state (docs/DESIGN.md section 2).

A :class:`Stream` holds the state that lives across calls (latent buffer, noise, stock noise, prompt
embeddings, cached attention, similarity memory, frame counter) and the math of one call, written as the
numbered stages of the design document. How the models are called and whether the step is captured
in a CUDA graph is its :class:`~streamrt.runtime.Runtime`'s business.

Two entry points:

- :meth:`Stream.step` — one call, F frames in, F frames out, ``latency`` calls behind (the
  realtime path: one ComfyUI execution per webcam frame).
- :meth:`Stream.process_video` — N frames in, N frames out, **aligned**: output k is the stream's
  result for input k (the batch video path).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from .buffers import StreamBuffers, allocate_buffers
from .config import Acceleration, CfgType, StreamConfig, StreamStage
from .controlnet import ControlNet, ControlState
from .frames import FiniteCheck, check_frames, mark_clamped
from .kv_cache import KVCache, PromptKV, attention_caches_fit, fuse_self_attention_projections, install_kv_processors
from .kv_export import kv_cache_io_spec
from .models import StreamModels
from .prompts import (
    SINGLE,
    Prompt,
    PromptPart,
    TextEmbedding,
    as_weighted,
    blended_noise,
    check_part,
    same_part,
    same_prompt,
    token_length,
)
from .runtime import AddedConditions, EngineSource, HostIO, Runtime, UNetExtras, prepare
from .schedule import StreamSchedule, build_schedule
from .similarity import SimilarityFilter

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
#: ``preview(frames)``: the output frames of a video finished on the host so far, ``[k, H, W, 3]`` (a view of the
#: result, complete and never written again)
PreviewCallback = Callable[[torch.Tensor], None]


def prompt_length(models: StreamModels, config: StreamConfig, prompt: Prompt, negative_prompt: PromptPart) -> int:
    """Tokens of the embedding buffer a stream with these prompts needs: the least common multiple of the
    prompt's token count and, when the config has negative-prompt rows, the negative prompt's."""
    tokens = token_length(prompt, models.text_length)
    if config.uncond_rows:
        tokens = math.lcm(tokens, token_length(negative_prompt, models.text_length))
    return tokens


def check_prompts(models: StreamModels, prompt: Prompt, negative_prompt: PromptPart) -> None:
    """Raise ValueError naming what cannot be a prompt of these models: texts, embeddings' shapes and widths,
    weights (see :mod:`streamrt.prompts`)."""
    dims = dict(embed_dim=models.embed_dim, text_length=models.text_length, pooled_dim=models.pooled_dim)
    as_weighted(prompt, **dims)
    check_part(negative_prompt, "negative prompt", **dims)


def check_fits(models: StreamModels, config: StreamConfig, prompt: Prompt, negative_prompt: PromptPart) -> None:
    """Raise ValueError when a (checked) prompt the config uses has a token count that does not divide the
    config's ``prompt_length``: such a prompt needs a new stream."""
    used = [("prompt", prompt)]
    if config.uncond_rows:
        used.append(("negative prompt", negative_prompt))
    for what, part in used:
        length = token_length(part, models.text_length)
        if config.prompt_length % length:
            raise ValueError(f"the {what} has {length} tokens, which do not fit this stream's "
                             f"{config.prompt_length}-token prompt buffer: it needs a new stream (prompt_length "
                             f"a multiple of {length})")


def _own_copy(prompt: Prompt) -> Prompt:
    """A weighted list copied, so the caller changing its list later is seen as a change (texts and tensors
    are kept as they are: immutable)."""
    return prompt if isinstance(prompt, SINGLE) else [tuple(p) for p in prompt]


def _fill_rows(dest: torch.Tensor, embeds: torch.Tensor) -> None:
    """Write ``embeds [1, L, D]`` into every row of ``dest [rows, T, D]``, repeated T / L times along the tokens."""
    rows, tokens, width = dest.shape
    length = embeds.shape[1]
    dest.view(rows, tokens // length, length, width).copy_(embeds.view(1, 1, length, width).expand(
        rows, tokens // length, length, width))


def _fill_pooled(dest: torch.Tensor | None, embedding: TextEmbedding) -> None:
    """Write a pooled embedding ``[1, P]`` into every row of ``dest [rows, P]`` (when the UNet takes one)."""
    if dest is not None:
        dest.copy_(embedding.pooled.expand_as(dest))


def aligned_calls(groups: int, latency: int) -> Iterator[tuple[int, int]]:
    """``(input group, output group)`` of each call that processes ``groups`` groups aligned.

    The last group is fed ``latency`` more times to flush the pipeline; the first ``latency`` calls'
    outputs belong to earlier calls (output group ``< 0``) and are dropped.
    """
    for call in range(groups + latency):
        yield min(call, groups - 1), call - latency


class StreamCalls:
    """How a stream is called: one step, an aligned video, txt2img, and the checks of their inputs.

    :class:`Stream` and :class:`streamrt.stages.StagedStream` (a stream whose steps run on several devices) share
    this protocol. A subclass provides ``config``, ``latency``, ``similarity``, ``control``, ``frames_processed``,
    ``_check_finite``, ``_host`` (the host I/O of its finished frames), ``_frames_out`` (the device buffer they are
    in) and ``_call(frames, control) -> bool`` (one call up to ``_frames_out``; False when the frame was skipped).
    """

    config: StreamConfig
    similarity: SimilarityFilter
    control: ControlState | None
    latency: int
    _check_finite: FiniteCheck
    _host: HostIO
    _frames_out: torch.Tensor

    def _call(self, frames: torch.Tensor | None, control: list[torch.Tensor] | None = None) -> bool:
        raise NotImplementedError

    def _output(self, ran: bool, out: torch.Tensor | None, synchronize: bool) -> torch.Tensor:
        """Hand this call's frames to the caller (the last output again for a skipped frame)."""
        if not ran:
            last = self.similarity.last_output
            return last.clone() if out is None else out.copy_(last)
        result = self._host.download(self._frames_out, out, synchronize=synchronize)
        self.similarity.remember(result)
        return result

    #: the frames of the last ``overlap`` call, still to be handed over (see :meth:`step`)
    _handover: tuple[torch.Tensor, int] | None = None

    @property
    def overlapped(self) -> bool:
        """Whether the last call left its frames to be handed over by the next one (``step(overlap=True)`` that
        did overlap: not with the similarity filter, not a video)."""
        return self._handover is not None

    @torch.inference_mode()
    def step(self, frames: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
             synchronize: bool = True, validated: bool = False,
             control: Sequence[torch.Tensor] | None = None, overlap: bool = False) -> torch.Tensor:
        """Run one call of the stream: F frames ``[F, H, W, C]`` in [0, 1] in, F frames out.

        The output is the result for the frames given ``latency`` calls earlier (the first ``latency``
        outputs come from the empty buffer). ``frames=None`` runs txt2img from the stream's noise.
        Returns a CPU float32 tensor ``[F, H, W, 3]`` (pinned on CUDA), or fills ``out``.
        ``validated``: the caller already passed ``frames`` through :meth:`check_frames` (for this config), and
        ``control`` through :func:`streamrt.controlnet.check_control_images`.
        ``control``: with ControlNets, one control image batch ``[F or 1, H, W, 3]`` in [0, 1] per ControlNet,
        the control of these frames.
        ``overlap``: hand over the output of the previous call instead of this call's, and return while this call's
        device work still runs (it is handed over by the next ``overlap`` call): a host that does other work
        between calls runs it in parallel with the device, at one call more latency. The first such call (after
        any other call, a reset, or with the similarity filter on, which needs each output when it is made)
        returns its own output, which the next one then returns again (docs/DESIGN.md section 4).
        """
        if frames is not None and not validated:
            frames = self.check_frames(frames, self.config.frames_per_step)
        images = self.check_control(control, self.config.frames_per_step, validated)
        previous, self._handover = self._handover, None
        ran = self._call(frames, images)
        if not overlap or not ran or self.similarity.enabled or out is not None:
            result = self._output(ran, out, synchronize)
            return result if out is not None else mark_clamped(result)  # a caller's buffer may hold more than this
        self._handover = self._host.start_handover(self._frames_out)
        if previous is None:  # the pipeline fills: this output now, and again (the same frames) next call
            return mark_clamped(self._host.hand_over(self._handover).clone())
        return mark_clamped(self._host.hand_over(previous))

    def check_control(self, control: Sequence[torch.Tensor] | None, count: int,
                      validated: bool = False) -> list[torch.Tensor] | None:
        """``control`` (one batch per ControlNet, ``[count or 1, H, W, 3]``) as the step takes it, None for a
        stream without ControlNets, or an error naming the problem; nothing of the stream changes."""
        if self.control is None:
            if control:
                raise ValueError("control images were given but this stream has no ControlNet")
            return None
        if validated and control is not None and len(control) == len(self.control):
            return list(control)
        return self.control.check_images(control, count)

    def check_frames(self, frames: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """``frames`` as an ``[N, H, W, 3]`` view, or :class:`FrameError` naming what is wrong (size, count,
        channels, NaN/inf); see :func:`streamrt.frames.check_frames`. Nothing of the stream changes."""
        cfg = self.config
        return check_frames(frames, width=cfg.width, height=cfg.height, frames_per_step=cfg.frames_per_step,
                            count=count, finite=self._check_finite)

    @torch.inference_mode()
    def process_video(self, frames: torch.Tensor, *, progress: ProgressCallback | None = None,
                      preview: PreviewCallback | None = None, validated: bool = False,
                      control: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Run N frames through the stream and return N frames **aligned** with the input.

        Output k is the stream's result for input k (see :func:`aligned_calls`). The stream state carries
        on afterwards, so consecutive videos stay coherent. ``progress(done, total)`` is called after each
        group of F frames and may raise to stop (e.g. on a user interrupt); the stream stays usable.
        ``preview(finished)`` is called before it with the output frames finished on the host so far (when
        there are any), and once more with all N at the end: a caller can show the newest one while the
        video runs. ``validated``: as for :meth:`step`. ``control``: with ControlNets, one control batch per
        ControlNet, ``[N, H, W, 3]`` (control frame k belongs to input frame k) or ``[1, H, W, 3]`` (one image
        for the whole video).
        """
        f = self.config.frames_per_step
        if not validated:
            frames = self.check_frames(frames)  # values checked once for the whole video
        self._handover = None  # its frames belong before this video: an overlapped call's output is dropped
        total = frames.shape[0]
        control = self.check_control(control, total, validated)
        result = torch.empty((total, self.config.height, self.config.width, 3), dtype=torch.float32)
        host = self._host
        overlapped = not self.similarity.enabled  # a skipped frame repeats a host-side output: no overlap then
        for group, target in aligned_calls(total // f, self.latency):
            images = None if control is None else [c if c.shape[0] == 1 else c[group * f:(group + 1) * f]
                                                    for c in control]
            ran = self._call(frames[group * f:(group + 1) * f], images)
            if target < 0:  # the pipeline is filling: this output belongs to an earlier call
                if not overlapped:
                    self._output(ran, None, synchronize=False)
                continue
            dest = result[target * f:(target + 1) * f]
            if overlapped:
                host.drain(self._frames_out, dest)
            else:
                self._output(ran, dest, synchronize=False)
            if preview is not None:
                # an overlapped drain on CUDA finishes a group's copy while the next group runs
                # (docs/DESIGN.md section 4)
                ready = target * f if overlapped and host.pinned else (target + 1) * f
                if ready:
                    preview(result[:ready])
            if progress is not None:
                progress((target + 1) * f, total)
        host.flush()
        if host.pinned:
            torch.cuda.current_stream(host.device).synchronize()
        if preview is not None:
            preview(result)
        return mark_clamped(result)  # every frame came out of the device's clamp to [0, 1]

    @torch.inference_mode()
    def txt2img(self, count: int = 1) -> torch.Tensor:
        """``count`` txt2img calls; returns the ``count * F`` frames, aligned like :meth:`process_video`."""
        f = self.config.frames_per_step
        result = torch.empty((count * f, self.config.height, self.config.width, 3), dtype=torch.float32)
        for _, target in aligned_calls(count, self.latency):
            self.step(None, out=result[target * f:(target + 1) * f] if target >= 0 else None, synchronize=False)
        if self._host.pinned:
            torch.cuda.current_stream(self._host.device).synchronize()
        return mark_clamped(result)  # every frame came out of the device's clamp to [0, 1]


class Stream(StreamCalls):
    """A StreamDiffusion-style stream with its whole state pre-allocated.

    Args:
        models (`StreamModels`): the pipeline's models (shared between streams, never modified).
        config (`StreamConfig`): shapes, mode and acceleration of this stream.
        prompt (`str`, `torch.Tensor` or `[(str or torch.Tensor, float)]`, defaults to `""`): initial prompt:
            text, embeddings ``[1, L, D]`` (L a multiple of 77, D the pipeline's text width) or a weighted blend
            (see :mod:`streamrt.prompts`).
        negative_prompt (`str` or `torch.Tensor`, defaults to `""`): used by ``full`` and ``initialize``
            guidance.
        engines (`EngineSource`, optional): where ``tensorrt`` / ``auto`` acceleration finds engines.
        runtime (`Runtime`, optional): a runtime prepared by the caller (otherwise
            :func:`streamrt.runtime.prepare` makes one from ``config.acceleration``).
        controlnets (`Sequence[ControlNet]`, optional): ControlNets whose residuals condition every UNet call
            (docs/DESIGN.md section 10); each call then takes one control image batch per ControlNet.
        stage (`StreamStage`, optional): run only these steps of the stream of ``config``, as one device of a
            step-parallel stream (:class:`streamrt.stages.StagedStream`, docs/DESIGN.md section 12). ``config``
            stays the whole stream's; :attr:`config` becomes the stage's part of it.

    The stream state lives on between calls until :meth:`reset`.
    """

    def __init__(self, models: StreamModels, config: StreamConfig, *, prompt: Prompt = "",
                 negative_prompt: PromptPart = "", engines: EngineSource | None = None,
                 runtime: Runtime | None = None, controlnets: Sequence[ControlNet] = (),
                 stage: StreamStage | None = None) -> None:
        scale = models.vae_scale_factor
        if config.width % scale or config.height % scale:
            raise ValueError(f"width and height must be multiples of {scale} for this VAE, "
                             f"got {config.width}x{config.height}")
        if models.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {models.prediction_type!r}: "
                             f"use an epsilon or v_prediction model")
        self.models = models
        check_prompts(models, prompt, negative_prompt)
        if not config.prompt_length:  # sized for the prompts it is made with
            config = config.with_(prompt_length=prompt_length(models, config, prompt, negative_prompt))
        check_fits(models, config, prompt, negative_prompt)
        f = config.frames_per_step
        whole = build_schedule(models.scheduler, config)
        self.stage = stage if stage is not None else StreamStage(0, config.num_steps, config.num_steps)
        # the whole stream's noise (a stage keeps its rows of it: _redraw_noise)
        self._noise_shape = (config.batch_rows, models.latent_channels, config.height // scale, config.width // scale)
        rows = self.stage.rows(f)
        if stage is not None:
            config = stage.config_of(config)
        self.config = config
        self.device = models.device
        self.dtype = models.dtype
        self.runtime = runtime if runtime is not None else prepare(models, config, engines=engines,
                                                                   control=bool(controlnets))
        self.schedule: StreamSchedule = whole.rows(rows).to(self.device)
        self._an_over_bn = self.schedule.a_next / self.schedule.b_next
        self._a0_scaled = self.schedule.a[:f] * models.vae_scaling_factor
        hands_on = not self.stage.is_last
        # a stage that hands rows on re-noises them to the next stage's first step itself (as the whole stream does
        # for its carried rows), so the next stage starts from exactly what the whole stream would carry
        self._carry_schedule = whole.rows(slice(rows.stop, rows.stop + f)).to(self.device) if hands_on else None
        self.buffers: StreamBuffers = allocate_buffers(
            config, self.schedule, latent_channels=models.latent_channels, vae_scale_factor=scale,
            text_length=config.prompt_length, embed_dim=models.embed_dim, device=self.device, dtype=self.dtype,
            pooled_dim=models.pooled_dim, time_ids=models.family.time_ids_for(config.height, config.width),
            hands_on=hands_on, takes_stock=not self.stage.is_first and config.uses_stock_noise)
        self.similarity = SimilarityFilter(config.similarity_filter, tuple(self.buffers.image_in.shape),
                                           seed=config.seed, device=self.device, dtype=self.dtype)
        self.kv: KVCache | None = None
        # the prompt's cross-attention keys and values, computed when it changes (docs/DESIGN.md section 3); an
        # engine UNet projects the embeddings itself
        self.prompt_kv: PromptKV | None = None
        stock_attention = "prompt_kv" in self.runtime.unet.accepts and attention_caches_fit(models.unet)
        keeps_prompt_kv = config.prompt_kv and stock_attention
        fuses_qkv = config.fused_qkv and stock_attention
        if config.kv_cache.enabled or keeps_prompt_kv or fuses_qkv:
            install_kv_processors(models.unet)  # inert for calls without them: other streams see plain attention
        if fuses_qkv:
            fuse_self_attention_projections(models.unet)  # once per UNet, before this stream captures
        if keeps_prompt_kv:
            self.prompt_kv = PromptKV(models.unet, self.buffers.embeds)  # filled by _write_embeddings
        if config.kv_cache.enabled:
            self.kv = KVCache(config.kv_cache, self.device)
            spec = kv_cache_io_spec(models.unet, config.unet_rows, config.height, config.width,
                                    config.kv_cache.max_frames, vae_scale_factor=scale)
            self.kv.allocate([(layer.tokens, layer.channels) for layer in spec.layers], config.unet_rows, self.dtype)
        added = (None if self.buffers.pooled is None else
                 AddedConditions(text_embeds=self.buffers.pooled, time_ids=self.buffers.time_ids))
        self.control: ControlState | None = None
        if controlnets:
            self.control = ControlState.allocate(controlnets, config, device=self.device, dtype=self.dtype,
                                                 calls=[self.runtime.controlnet(net.model) for net in controlnets],
                                                 first_step=self.stage.first, steps=self.stage.steps)
        self._control_active: tuple[bool, ...] = self.control.active if self.control is not None else ()
        self.unet_extras = UNetExtras(kv_cache=self.kv, added_cond=added,
                                      control=self.control.residuals if self.control is not None else None,
                                      prompt_kv=self.prompt_kv, fused_qkv=fuses_qkv)
        # What a graph capture's warm-up must leave as it found it: the carried latents, stock noise and control
        # images. The attention rings need no copy: the warm-up writes its K/V into the scratch slot
        # (KVCache.writes_held).
        self._state: tuple[torch.Tensor, ...] = (self.buffers.unet_in, self.buffers.stock) + (
            self.control.rings if self.control is not None else ())
        self._capture_guard = None if self.kv is None else self.kv.writes_held
        self._check_finite = FiniteCheck()
        self._seeds: int | list[tuple[int, float]] = config.seed
        self._seed_method = "linear"
        self._prompt: Prompt = _own_copy(prompt)
        self._negative: PromptPart = negative_prompt
        self._prompt_method = "linear"
        self.embedding_writes = 0  # prompt embeddings written into the buffer (an unchanged prompt writes none)
        self.frames_processed = 0
        self.device_calls = 0  # device steps run since the stream was made (a reset keeps it): 0 = nothing captured
        self._device_steps = {False: lambda: self.device_step(False), True: lambda: self.device_step(True)}
        self._redraw_noise()
        self._write_embeddings(self._prompt, self._negative, self._prompt_method)
        self.reset()

    @property
    def acceleration(self) -> Acceleration:
        """What runs this stream's models (never ``auto``)."""
        return self.runtime.acceleration

    @property
    def latency(self) -> int:
        """Calls between a frame going in and its result coming out (n - 1)."""
        return self.stage.steps - 1  # the whole stream's steps (a stage runs fewer)

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """The devices this stream runs on (one; several for a :class:`streamrt.stages.StagedStream`)."""
        return (self.device,)

    @property
    def stages(self) -> tuple[Stream, ...]:
        """The one-device streams this stream is made of: itself (a :class:`streamrt.stages.StagedStream` has one
        per device)."""
        return (self,)

    @property
    def _host(self) -> HostIO:
        return self.runtime.host

    @property
    def _frames_out(self) -> torch.Tensor:
        return self.buffers.frames_out

    # ------------------------------------------------------------------ state changes (not per frame)
    def reset(self) -> None:
        """Clear the stream state: latent buffer, stock noise, cached attention, similarity memory, frame counter.

        The noise (from the seed) and the prompt embeddings are kept, so a reset stream replays the
        same outputs for the same inputs.
        """
        self.buffers.unet_in.zero_()
        self.buffers.stock.zero_()
        if self.buffers.stock_in is not None:
            self.buffers.stock_in.zero_()
        self.similarity.reset()
        self.frames_processed = 0
        self._handover = None
        if self.kv is not None:
            self.kv.clear()
        if self.control is not None:
            self.control.reset()

    def set_control_strength(self, index: int, strength: float) -> None:
        """Change ControlNet ``index``'s strength live (no new stream; 0 stops calling that ControlNet, and a
        stream whose ControlNets are all at 0 runs exactly the plain step)."""
        if self.control is None:
            raise ValueError("this stream has no ControlNet")
        if not 0 <= index < len(self.control):
            raise ValueError(f"this stream has {len(self.control)} ControlNet(s); there is no ControlNet {index}")
        self.control.set_strength(index, strength)
        self._control_active = self.control.active

    def set_seed(self, seed: int | Sequence[tuple[int, float]], method: str = "linear") -> None:
        """Redraw the stream noise for a seed, or a blend ``[(seed, weight), ...]`` (linear or slerp)."""
        if seed == self._seeds and method == self._seed_method:
            return
        self._seeds, self._seed_method = (seed if isinstance(seed, int) else [tuple(s) for s in seed]), method
        self._redraw_noise()
        if self.kv is not None:
            self.kv.clear()  # cached K/V belong to the old noise

    def _redraw_noise(self) -> None:
        """The whole stream's noise from the seed; a stage keeps its rows (and the next stage's first ones)."""
        buf, f = self.buffers, self.config.frames_per_step
        rows = self.stage.rows(f)
        # drawn and rotated on the host: copied into the buffers, so a seed change allocates nothing on the device
        noise = blended_noise(self._seeds, self._noise_shape, self._seed_method)
        buf.init_noise.copy_(noise[rows])
        rotated = torch.roll(noise, -f, 0)  # row r moves on with the noise of row r + F (the last rows wrap around)
        buf.init_noise_rot.copy_(rotated[rows])
        if buf.carry_noise is not None:
            buf.carry_noise.copy_(noise[rows.stop:rows.stop + f])

    def set_prompt(self, prompt: Prompt, negative_prompt: PromptPart | None = None, method: str = "linear") -> None:
        """Change the prompt: text, embeddings ``[1, L, D]`` or ``[(text or embeddings, weight), ...]`` blended
        linearly or by slerp.

        The embeddings are written into the existing buffer; an unchanged prompt does nothing (the same
        tensor object or an equal one counts as unchanged: tensors are taken as immutable, as ComfyUI treats
        its CONDITIONING) and a recently used text comes from the encoder's cache. A prompt that cannot be
        used raises and leaves the stream's prompt as it was; so does one whose token count does not divide
        the stream's ``config.prompt_length`` (such a prompt needs a new stream).
        """
        negative = self._negative if negative_prompt is None else negative_prompt
        cond_same = same_prompt(prompt, self._prompt) and method == self._prompt_method
        uncond_same = same_part(negative, self._negative)
        if cond_same and (uncond_same or not self.config.uncond_rows):
            if not uncond_same:  # not used by this cfg type: kept for later, nothing to write
                self._negative = check_part(negative, "negative prompt", embed_dim=self.models.embed_dim,
                                            text_length=self.models.text_length, pooled_dim=self.models.pooled_dim)
            return
        check_prompts(self.models, prompt, negative)
        check_fits(self.models, self.config, prompt, negative)
        self._write_embeddings(prompt, negative, method)
        self._prompt, self._negative, self._prompt_method = _own_copy(prompt), negative, method

    def _write_embeddings(self, prompt: Prompt, negative: PromptPart, method: str) -> None:
        """Encode first (which may refuse the text), then write into the embedding buffer, each prompt repeated
        along the tokens to fill it (in place: no new tensor for the buffer), and the prompt's cross-attention keys
        and values from it."""
        enc, buf, u = self.models.prompt_encoder, self.buffers, self.config.uncond_rows
        cond = enc.encode_blend(prompt, method)
        uncond = enc.embeddings(negative, negative=True) if u else None
        _fill_rows(buf.embeds[u:], cond.tokens)
        _fill_pooled(None if buf.pooled is None else buf.pooled[u:], cond)
        if uncond is not None:
            _fill_rows(buf.embeds[:u], uncond.tokens)
            _fill_pooled(None if buf.pooled is None else buf.pooled[:u], uncond)
        if self.prompt_kv is not None:
            self.prompt_kv.refresh()
        self.embedding_writes += 1

    def set_cache_window(self, window: int, interval: int | None = None) -> None:
        """Change the cached-attention window (and interval) without reallocating."""
        if self.kv is None:
            raise ValueError("this stream has no attention cache (kv_cache.enabled is False)")
        if window == self.kv.config.window and interval in (None, self.kv.config.interval):
            return
        self.kv.set_window(window)
        if interval is not None:
            self.kv.set_interval(interval)
        self.config = self.config.with_(kv_cache=self.kv.config)

    def set_guidance(self, guidance_scale: float | None = None, delta: float | None = None) -> None:
        """Change the live scalars. Crossing ``guidance_scale == 1`` changes the batch shape: make a new stream."""
        if guidance_scale == self.config.guidance_scale:
            guidance_scale = None
        if delta == self.config.delta:
            delta = None
        if guidance_scale is not None:
            if (guidance_scale > 1.0) != self.config.guided and self.config.cfg_type is not CfgType.NONE:
                raise ValueError("guidance_scale crossed 1.0, which switches guidance on or off and changes the "
                                 "UNet batch; create a new stream for this config")
            self.buffers.guidance.fill_(float(guidance_scale))
            self.config = self.config.with_(guidance_scale=float(guidance_scale))
        if delta is not None:
            self.buffers.delta.fill_(float(delta))
            self.config = self.config.with_(delta=float(delta))

    # ------------------------------------------------------------------ the step (docs/DESIGN.md section 2)
    def _to_eps(self, pred: torch.Tensor, rows: slice, out: torch.Tensor) -> None:
        """Write the epsilon prediction for batch ``rows`` (v-prediction converts: eps = a*v + b*x)."""
        if self.models.prediction_type == "v_prediction":
            torch.mul(self.schedule.a[rows], pred, out=out)
            out.addcmul_(self.schedule.b[rows], self.buffers.x32[rows])
        else:
            out.copy_(pred)

    def device_step(self, txt2img: bool = False) -> None:
        """Stages 2-8 of the stream step on the staged input, up to ``frames_out`` (what a CUDA graph captures).

        Every op writes into a buffer allocated at construction; nothing here reads the host.
        """
        cfg, buf, sch, run, stage = self.config, self.buffers, self.schedule, self.runtime, self.stage
        f, b, u, n = cfg.frames_per_step, cfg.batch_rows, cfg.uncond_rows, cfg.num_steps

        # 2. New rows: x_t = a[0:F] * z * scaling + b[0:F] * noise[0:F] (txt2img: the fixed noise itself). A later
        # stage of a step-parallel stream finds its first rows already written: the previous stage's hand-off.
        if stage.is_first:
            if txt2img:
                buf.x_batch[:f].copy_(buf.init_noise[:f])
            else:
                x_t = buf.tmp32[:f]
                torch.mul(run.encode(buf.image_in), self._a0_scaled, out=x_t)
                x_t.addcmul_(sch.b[:f], buf.init_noise[:f])
                buf.x_batch[:f].copy_(x_t)

        # 3. The batch is [new rows | carried rows]; RCFG's stock noise moves down by F rows with it (into a later
        # stage from the stage before it).
        if stage.steps > 1 and cfg.uses_stock_noise:
            if n > 1:
                buf.stock_scratch.copy_(buf.stock[:-f])
                buf.stock[f:].copy_(buf.stock_scratch)
            buf.stock[:f].copy_(buf.init_noise[:f] if stage.is_first else buf.stock_in)

        # 4. UNet on [uncond rows | batch] and the guided noise prediction; ControlNets (docs/DESIGN.md section 10)
        # see each row's own control image, moved with the batch like the latents.
        if u == b:
            buf.unet_in[:b].copy_(buf.x_batch)
        elif u:
            buf.unet_in[:f].copy_(buf.x_batch[:f])
        if self.control is not None:
            self.control.advance()
            self.control.compute(self._control_active, buf.unet_in, buf.timesteps, buf.embeds,
                                 self.unet_extras.torch_kwargs.get("added_cond_kwargs"))
        if self.kv is not None:
            self.kv.begin_call()
        pred = run.unet(buf.unet_in, buf.timesteps, buf.embeds, self.unet_extras)
        if self.kv is not None:
            self.kv.end_call()
        buf.x32.copy_(buf.x_batch)
        all_rows = slice(0, b)
        self._to_eps(pred[u:], all_rows, buf.eps32)
        if cfg.guided:
            if cfg.cfg_type is CfgType.FULL:
                self._to_eps(pred[:u], all_rows, buf.eps_u32)
            else:  # self / initialize: the virtual negative is delta * stock
                if cfg.cfg_type is CfgType.INITIALIZE:
                    self._to_eps(pred[:u], slice(0, f), buf.stock[:f])
                torch.mul(buf.stock, buf.delta, out=buf.eps_u32)
            torch.lerp(buf.eps_u32, buf.eps32, buf.guidance, out=buf.eps32)

        # 5. x0 = c_out * (x - b * eps) / a + c_skip * x, in float32.
        x0 = buf.x0_32
        torch.mul(sch.b, buf.eps32, out=x0)
        torch.sub(buf.x32, x0, out=x0)
        x0.div_(sch.a).mul_(sch.c_out).addcmul_(sch.c_skip, buf.x32)

        # 6. RCFG: d = c_out * (b*stock - b*eps) / a + c_skip * b*stock; stock = rot(noise) + d * a_next / b_next.
        if cfg.uses_stock_noise:
            scaled, d = buf.tmp32, buf.tmp2_32
            torch.mul(sch.b, buf.stock, out=scaled)
            torch.mul(sch.b, buf.eps32, out=d)
            torch.sub(scaled, d, out=d)
            d.div_(sch.a).mul_(sch.c_out).addcmul_(sch.c_skip, scaled)
            torch.addcmul(buf.init_noise_rot, d, self._an_over_bn, out=buf.stock)

        # 7. The oldest F rows are done; the others are re-noised to their next step and carried. A stage that is
        # not the last re-noises its oldest rows to the next stage's first step, for the hand-off.
        if n > 1:
            carried = buf.tmp32[f:]
            torch.mul(sch.a[f:], x0[:-f], out=carried)
            if cfg.do_add_noise:
                carried.addcmul_(sch.b[f:], buf.init_noise[f:])
            buf.x_batch[f:].copy_(carried)
        out = buf.tmp32[:f]
        if not stage.is_last:
            nxt = self._carry_schedule
            torch.mul(nxt.a, x0[-f:], out=out)
            if cfg.do_add_noise:
                out.addcmul_(nxt.b, buf.carry_noise)
            buf.carry_out.copy_(out)
            return
        torch.mul(x0[-f:], 1.0 / self.models.vae_scaling_factor, out=out)
        buf.latent_out.copy_(out)

        # 8. Decode to [0, 1] frames in IMAGE layout.
        buf.frames_out.copy_(run.decode(buf.latent_out).permute(0, 2, 3, 1))
        buf.frames_out.add_(1).mul_(0.5).clamp_(0, 1)

    # ------------------------------------------------------------------ one call
    def _call(self, frames: torch.Tensor | None, control: list[torch.Tensor] | None = None) -> bool:
        """One call up to ``frames_out``: stage the input (stage 1: skip it if the similarity filter says so),
        then the device step. Returns False when the frame was skipped."""
        buf = self.buffers
        txt2img = frames is None
        if self.control is not None and self.stage.is_first:  # a later stage's images come from the stage before
            self.control.stage(control)
        if not txt2img:
            self.runtime.host.upload(frames, buf.frames_in)
            buf.image_in.copy_(buf.frames_in.permute(0, 3, 1, 2))
            buf.image_in.mul_(2).sub_(1)
            if self.similarity.should_skip(buf.image_in):
                self.frames_processed += self.config.frames_per_step
                return False
        unmasked = False
        if self.kv is not None:
            self.kv.schedule_call()
            unmasked = self.kv.unmasked
        self.runtime.run((txt2img, unmasked, self._control_active), self._device_steps[txt2img], self._state,
                         self._capture_guard)
        self.frames_processed += self.config.frames_per_step
        self.device_calls += 1
        return True

    def nbytes(self) -> int:
        """Device bytes this stream holds beyond the shared models: its buffers, attention cache and the prompt's
        keys and values (views counted once)."""
        seen, total = set(), 0
        for t in self.buffers.tensors().values():
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return (total + (self.kv.nbytes() if self.kv is not None else 0)
                + (self.control.nbytes() if self.control is not None else 0)
                + (self.prompt_kv.nbytes() if self.prompt_kv is not None else 0))

    def close(self) -> None:
        """Release what this stream holds outside its buffers (captured graphs, engine runners)."""
        self.runtime.close()
