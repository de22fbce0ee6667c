"""The stream: StreamDiffusion's stream batch over pre-allocated state (DESIGN.md sections 2 and 4).

A :class:`Stream` owns every tensor a frame touches. They are allocated once, in ``__init__``, for
one :class:`~streamrt.config.StreamConfig`; a frame then only runs in-place ops and ``out=`` ops on
them, so the step can be captured in a CUDA graph and replayed, and prompt or seed changes are
``copy_`` into the same buffers.

Two entry points:

- :meth:`Stream.step` — one call, F frames in, F frames out, ``latency`` calls behind (the
  realtime path: one ComfyUI execution per webcam frame).
- :meth:`Stream.process_video` — N frames in, N frames out, **aligned**: output k is the stream's
  result for input k (the batch video path).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import CfgType, StreamConfig
from .frames import FrameError, as_rgb_frames
from .kv_cache import KVCache, install_kv_processors
from .models import StreamModels
from .prompts import Weighted, blended_noise
from .schedule import StreamSchedule, build_schedule

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]

#: ``eager`` runs the step op by op; ``cuda_graph`` captures the whole step (encode, UNet, scheduler
#: math, decode) once per stream and replays it. A compiled UNet (see :mod:`streamrt.backends`) runs
#: under either.
BACKENDS = ("eager", "cuda_graph")


@dataclass(eq=False)
class StreamBuffers:
    """Every tensor the per-frame path reads or writes, allocated once per config.

    Model-dtype tensors feed the models; the scheduler math runs in float32 (``*32``). ``x_batch`` is a
    view of the last B rows of ``unet_in``: rows ``[0, F)`` take the new frames' noisy latents, rows
    ``[F, B)`` are the latent buffer carried between calls.
    """

    frames_in: torch.Tensor      # [F, H, W, 3] f32 staging of the caller's frames
    image_in: torch.Tensor       # [F, 3, H, W] model dtype, in [-1, 1]
    unet_in: torch.Tensor        # [U + B, c, h, w] model dtype
    x_batch: torch.Tensor        # view: unet_in[U:]
    timesteps: torch.Tensor      # [U + B] long
    embeds: torch.Tensor         # [U + B, L, D] model dtype; uncond rows first
    x32: torch.Tensor            # [B, c, h, w] f32 copy of x_batch
    eps32: torch.Tensor          # [B] guided noise prediction
    eps_u32: torch.Tensor        # [B] unconditional prediction (full CFG) or RCFG virtual negative
    x0_32: torch.Tensor          # [B] denoised estimate
    tmp32: torch.Tensor          # [B] scratch
    tmp2_32: torch.Tensor        # [B] scratch (RCFG)
    init_noise: torch.Tensor     # [B] f32, fixed per seed
    init_noise_rot: torch.Tensor  # [B] init_noise rotated by F rows
    stock: torch.Tensor          # [B] f32 RCFG stock noise
    stock_scratch: torch.Tensor  # [B - F] (or empty) for the in-place shift
    latent_out: torch.Tensor     # [F, c, h, w] model dtype, scaled for the decoder
    frames_out: torch.Tensor     # [F, H, W, 3] f32 in [0, 1]
    prev_image: torch.Tensor     # [F, 3, H, W] last processed input (similarity filter)
    guidance: torch.Tensor       # 0-dim f32, live scalar (no recapture to change)
    delta: torch.Tensor          # 0-dim f32, live scalar

    def tensors(self) -> dict[str, torch.Tensor]:
        """Name -> tensor, for checks that storage never moves."""
        return {k: v for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}


class _PinnedDrain:
    """GPU -> pageable CPU result through two pinned buffers: frame k's host copy into the result runs
    while the GPU computes frame k+1, and the result the caller keeps is ordinary memory."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self._stage = [torch.empty(shape, pin_memory=True) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)]
        self._slot = 0
        self._pending: tuple[int, torch.Tensor] | None = None

    def buffer(self) -> torch.Tensor:
        """The pinned buffer the next device-to-host copy goes into."""
        return self._stage[self._slot]

    def submitted(self, dest: torch.Tensor) -> None:
        """The copy into :meth:`buffer` is enqueued; finish the previous one into its destination."""
        self._events[self._slot].record()
        previous, self._pending = self._pending, (self._slot, dest)
        self._slot ^= 1
        if previous is not None:
            self._finish(*previous)

    def flush(self) -> None:
        if self._pending is not None:
            self._finish(*self._pending)
            self._pending = None

    def _finish(self, slot: int, dest: torch.Tensor) -> None:
        self._events[slot].synchronize()  # that frame's copy, not the work queued after it
        dest.copy_(self._stage[slot])


class Stream:
    """A StreamDiffusion-style stream with its whole state pre-allocated.

    Args:
        models (`StreamModels`): the pipeline's models (shared between streams).
        config (`StreamConfig`): shapes and mode of this stream.
        prompt (`str` or `[(str, float)]`, defaults to `""`): initial prompt or weighted prompts.
        negative_prompt (`str`, defaults to `""`): used by ``full`` and ``initialize`` guidance.

    The stream state (latent buffer, noise, stock noise, embeddings, similarity-filter memory, frame
    counter) lives on between calls until :meth:`reset`.
    """

    def __init__(self, models: StreamModels, config: StreamConfig, *, prompt: str | Weighted = "",
                 negative_prompt: str = "", backend: str = "eager") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
        if backend != "eager" and models.device.type != "cuda":
            raise ValueError(f"backend {backend!r} needs the models on a CUDA device, they are on {models.device}")
        self.models = models
        self.config = config
        self.backend = backend
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        scale = models.vae_scale_factor
        if config.width % scale or config.height % scale:
            raise ValueError(f"width and height must be multiples of {scale} for this VAE, "
                             f"got {config.width}x{config.height}")
        if models.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {models.prediction_type!r}: "
                             f"use an epsilon or v_prediction model")
        self.device = models.device
        self.dtype = models.dtype
        self.schedule: StreamSchedule = build_schedule(models.scheduler, config).to(self.device)
        self._an_over_bn = self.schedule.a_next / self.schedule.b_next
        self._a0_scaled = self.schedule.a[: config.frames_per_step] * models.vae_scaling_factor
        self.buffers = self._allocate()
        self._seeds: int | list[tuple[int, float]] = config.seed
        self._seed_method = "linear"
        self._prompt: str | Weighted = prompt if isinstance(prompt, str) else [tuple(p) for p in prompt]
        self._negative = negative_prompt
        self._prompt_method = "linear"
        self._rng = random.Random(config.seed)
        self.frames_processed = 0
        self._skipped_in_row = 0
        self._last_output: torch.Tensor | None = None
        self._finite_scratch: dict[torch.device, torch.Tensor] = {}
        self._host_stage: list[torch.Tensor] = []
        self._host_events: list[torch.cuda.Event] = []
        self._host_slot = 0
        self._drain: _PinnedDrain | None = None
        if self.device.type == "cuda":
            shape = (config.frames_per_step, config.height, config.width, 3)
            self._host_stage = [torch.empty(shape, pin_memory=True) for _ in range(2)]
            self._host_events = [torch.cuda.Event() for _ in range(2)]
            self._drain = _PinnedDrain(shape)
        self.unet_kwargs: dict = {}
        self.kv: KVCache | None = None
        if config.kv_cache.enabled:
            install_kv_processors(models.unet)
            self.kv = KVCache(config.kv_cache, self.device)
            self.unet_kwargs["cross_attention_kwargs"] = {"kv_cache": self.kv}
        self._redraw_noise()
        self._write_embeddings()
        self.reset()
        if self.kv is not None:
            self._allocate_kv_cache()

    # ------------------------------------------------------------------ allocation
    def _allocate(self) -> StreamBuffers:
        cfg, dev, dt = self.config, self.device, self.dtype
        f, b, u = cfg.frames_per_step, cfg.batch_rows, cfg.uncond_rows
        c = self.models.latent_channels
        h, w = cfg.height // self.models.vae_scale_factor, cfg.width // self.models.vae_scale_factor
        lat32 = lambda rows: torch.zeros(rows, c, h, w, device=dev, dtype=torch.float32)  # noqa: E731
        unet_in = torch.zeros(u + b, c, h, w, device=dev, dtype=dt)
        t = self.schedule.timesteps
        if u == b:            # full: uncond rows repeat every step
            timesteps = torch.cat([t, t])
        elif u:               # initialize: uncond rows for the newest F frames
            timesteps = torch.cat([t[:f], t])
        else:
            timesteps = t.clone()
        return StreamBuffers(
            frames_in=torch.zeros(f, cfg.height, cfg.width, 3, device=dev, dtype=torch.float32),
            image_in=torch.zeros(f, 3, cfg.height, cfg.width, device=dev, dtype=dt),
            unet_in=unet_in, x_batch=unet_in[u:], timesteps=timesteps.to(dev),
            embeds=torch.zeros(u + b, self.models.text_length, self.models.embed_dim, device=dev, dtype=dt),
            x32=lat32(b), eps32=lat32(b), eps_u32=lat32(b), x0_32=lat32(b), tmp32=lat32(b), tmp2_32=lat32(b),
            init_noise=lat32(b), init_noise_rot=lat32(b), stock=lat32(b), stock_scratch=lat32(b - f),
            latent_out=torch.zeros(f, c, h, w, device=dev, dtype=dt),
            frames_out=torch.zeros(f, cfg.height, cfg.width, 3, device=dev, dtype=torch.float32),
            prev_image=torch.zeros(f, 3, cfg.height, cfg.width, device=dev, dtype=dt),
            guidance=torch.tensor(float(cfg.guidance_scale), device=dev),
            delta=torch.tensor(float(cfg.delta), device=dev),
        )

    @torch.inference_mode()
    def _allocate_kv_cache(self) -> None:
        """Allocate every layer's K/V buffers now, with one eager UNet call (its K/V go to the scratch slot).

        A compiled UNet then never traces the allocation branch, which would break its graph.
        """
        buf = self.buffers
        unet = getattr(self.models.unet, "_orig_mod", self.models.unet)
        unet(buf.unet_in, buf.timesteps, encoder_hidden_states=buf.embeds, return_dict=False, **self.unet_kwargs)

    # ------------------------------------------------------------------ state changes (not per frame)
    @property
    def latency(self) -> int:
        """Calls between a frame going in and its result coming out (n - 1)."""
        return self.config.num_steps - 1

    def reset(self) -> None:
        """Clear the stream state: latent buffer, stock noise, similarity memory, frame counter.

        The noise (from the seed) and the prompt embeddings are kept, so a reset stream replays the
        same outputs for the same inputs.
        """
        buf = self.buffers
        buf.unet_in.zero_()
        buf.stock.zero_()
        buf.prev_image.zero_()
        self.frames_processed = 0
        self._skipped_in_row = 0
        self._last_output = None
        self._rng = random.Random(self.config.seed)
        if self.kv is not None:
            self.kv.clear()

    def set_seed(self, seed: int | Sequence[tuple[int, float]], method: str = "linear") -> None:
        """Redraw the stream noise for a seed, or a blend ``[(seed, weight), ...]`` (linear or slerp)."""
        if seed == self._seeds and method == self._seed_method:
            return
        self._seeds, self._seed_method = (seed if isinstance(seed, int) else [tuple(s) for s in seed]), method
        self._redraw_noise()
        if self.kv is not None:
            self.kv.clear()  # cached K/V belong to the old noise

    def _redraw_noise(self) -> None:
        buf, f = self.buffers, self.config.frames_per_step
        noise = blended_noise(self._seeds, buf.init_noise.shape, self._seed_method)
        buf.init_noise.copy_(noise)
        buf.init_noise_rot[:-f].copy_(buf.init_noise[f:])
        buf.init_noise_rot[-f:].copy_(buf.init_noise[:f])

    def set_prompt(self, prompt: str | Weighted, negative_prompt: str | None = None, method: str = "linear") -> None:
        """Change the prompt (text or ``[(text, weight), ...]`` blended linearly or by slerp).

        The embeddings are written into the existing buffer; an unchanged prompt does nothing and a
        recently used one comes from the encoder's cache.
        """
        negative = self._negative if negative_prompt is None else negative_prompt
        prompt = prompt if isinstance(prompt, str) else [tuple(p) for p in prompt]  # a copy the caller can't mutate
        if prompt == self._prompt and negative == self._negative and method == self._prompt_method:
            return
        self._prompt, self._negative, self._prompt_method = prompt, negative, method
        self._write_embeddings()

    def _write_embeddings(self) -> None:
        enc, buf, u = self.models.prompt_encoder, self.buffers, self.config.uncond_rows
        cond = enc.encode_blend(self._prompt, self._prompt_method)
        buf.embeds[u:].copy_(cond.expand(self.config.batch_rows, -1, -1))
        if u:
            buf.embeds[:u].copy_(enc.encode(self._negative).expand(u, -1, -1))

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

    # ------------------------------------------------------------------ the per-frame path
    def _stage_frames(self, frames: torch.Tensor) -> None:
        buf = self.buffers
        if self._host_stage and frames.device.type == "cpu" and not frames.is_pinned():
            # An upload from pageable memory waits for the GPU to drain; go through two pinned buffers
            # instead. The copy that last used this buffer was two calls ago, so the wait is immediate.
            slot = self._host_slot
            self._host_slot ^= 1
            self._host_events[slot].synchronize()
            self._host_stage[slot].copy_(frames)
            buf.frames_in.copy_(self._host_stage[slot], non_blocking=True)
            self._host_events[slot].record()
        else:
            buf.frames_in.copy_(frames, non_blocking=True)
        buf.image_in.copy_(buf.frames_in.permute(0, 3, 1, 2))
        buf.image_in.mul_(2).sub_(1)

    def _encode_input(self) -> None:
        """x_t = a[0:F] * z * scaling + b[0:F] * noise[0:F], into the new rows of the batch."""
        buf, sch, f = self.buffers, self.schedule, self.config.frames_per_step
        z = self.models.encode_images(buf.image_in)
        x_t = buf.tmp32[:f]
        torch.mul(z, self._a0_scaled, out=x_t)
        x_t.addcmul_(sch.b[:f], buf.init_noise[:f])
        buf.x_batch[:f].copy_(x_t)

    def _noise_input(self) -> None:
        """txt2img: the new rows start from the stream's fixed noise."""
        f = self.config.frames_per_step
        self.buffers.x_batch[:f].copy_(self.buffers.init_noise[:f])

    def _to_eps(self, pred: torch.Tensor, rows: slice, out: torch.Tensor) -> None:
        """Write the epsilon prediction for batch ``rows`` (v-prediction converts: eps = a*v + b*x)."""
        if self.models.prediction_type == "v_prediction":
            torch.mul(self.schedule.a[rows], pred, out=out)
            out.addcmul_(self.schedule.b[rows], self.buffers.x32[rows])
        else:
            out.copy_(pred)

    def _denoise(self) -> None:
        """Steps 3-7 of DESIGN.md section 2 on the filled batch; leaves the output latents in ``latent_out``."""
        cfg, buf, sch = self.config, self.buffers, self.schedule
        f, b, u = cfg.frames_per_step, cfg.batch_rows, cfg.uncond_rows
        n = cfg.num_steps
        if n > 1 and cfg.uses_stock_noise:
            buf.stock_scratch.copy_(buf.stock[:-f])
            buf.stock[f:].copy_(buf.stock_scratch)
            buf.stock[:f].copy_(buf.init_noise[:f])
        if u == b:
            buf.unet_in[:b].copy_(buf.x_batch)
        elif u:
            buf.unet_in[:f].copy_(buf.x_batch[:f])

        if self.kv is not None:
            self.kv.begin_call()
        pred = self.models.predict(buf.unet_in, buf.timesteps, buf.embeds, **self.unet_kwargs)
        if self.kv is not None:
            self.kv.end_call()

        buf.x32.copy_(buf.x_batch)
        all_rows = slice(0, b)
        self._to_eps(pred[u:], all_rows, buf.eps32)
        if cfg.guided:
            if cfg.cfg_type is CfgType.FULL:
                self._to_eps(pred[:u], all_rows, buf.eps_u32)
            else:
                if cfg.cfg_type is CfgType.INITIALIZE:
                    self._to_eps(pred[:u], slice(0, f), buf.stock[:f])
                torch.mul(buf.stock, buf.delta, out=buf.eps_u32)
            torch.lerp(buf.eps_u32, buf.eps32, buf.guidance, out=buf.eps32)

        # x0 = c_out * (x - b*eps) / a + c_skip * x   (float32)
        x0 = buf.x0_32
        torch.mul(sch.b, buf.eps32, out=x0)
        torch.sub(buf.x32, x0, out=x0)
        x0.div_(sch.a).mul_(sch.c_out).addcmul_(sch.c_skip, buf.x32)

        if cfg.uses_stock_noise:
            # RCFG: d = c_out * (b*stock - b*eps) / a + c_skip * b*stock; stock = rot(noise) + d * a_next / b_next
            scaled, d = buf.tmp32, buf.tmp2_32
            torch.mul(sch.b, buf.stock, out=scaled)
            torch.mul(sch.b, buf.eps32, out=d)
            torch.sub(scaled, d, out=d)
            d.div_(sch.a).mul_(sch.c_out).addcmul_(sch.c_skip, scaled)
            torch.addcmul(buf.init_noise_rot, d, self._an_over_bn, out=buf.stock)

        out = buf.tmp32[:f]
        torch.mul(x0[-f:], 1.0 / self.models.vae_scaling_factor, out=out)
        buf.latent_out.copy_(out)
        if n > 1:
            carried = buf.tmp32[f:]
            torch.mul(sch.a[f:], x0[:-f], out=carried)
            if cfg.do_add_noise:
                carried.addcmul_(sch.b[f:], buf.init_noise[f:])
            buf.x_batch[f:].copy_(carried)

    def _decode_output(self) -> None:
        buf = self.buffers
        image = self.models.decode_latents(buf.latent_out)
        buf.frames_out.copy_(image.permute(0, 2, 3, 1))
        buf.frames_out.add_(1).mul_(0.5).clamp_(0, 1)

    def _device_step(self, txt2img: bool) -> None:
        """Everything between the staged input and ``frames_out`` (what a CUDA graph captures)."""
        if txt2img:
            self._noise_input()
        else:
            self._encode_input()
        self._denoise()
        self._decode_output()

    def _run_device_step(self, txt2img: bool) -> None:
        if self.backend == "eager":
            self._device_step(txt2img)
            return
        graph = self._graphs.get(txt2img)
        if graph is None:
            graph = self._graphs[txt2img] = self._capture(txt2img)
        graph.replay()

    def _capture(self, txt2img: bool) -> torch.cuda.CUDAGraph:
        """Capture the device step in a CUDA graph, leaving the stream state as it was.

        Warm-up runs (lazy initialisation, cuDNN autotuning, compilation) execute the step for real,
        so the mutable state is saved first and restored after the capture.
        """
        buf = self.buffers
        mutable = [buf.unet_in, buf.stock]
        if self.kv is not None:
            # Warm-up steps write this call's K/V into the slot it will overwrite, which this call may still
            # read (the oldest slot when window == max_frames): restore the rings along with the ages.
            mutable += [self.kv.age] + [t for b in self.kv.layers.values() for t in (b.key, b.value)]
        saved = [t.clone() for t in mutable]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._device_step(txt2img)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._device_step(txt2img)
        for target, value in zip(mutable, saved):
            target.copy_(value)
        logger.info("captured the stream step in a CUDA graph (%s, %dx%d, %d rows)", "txt2img" if txt2img else "img2img",
                    self.config.width, self.config.height, self.config.unet_rows)
        return graph

    # ------------------------------------------------------------------ hand-over
    def _hand_over(self, out: torch.Tensor | None) -> torch.Tensor:
        """Copy ``frames_out`` to the caller: into ``out`` (a slice of a batch result) or a new CPU tensor.

        On CUDA the copy is asynchronous into pinned memory; later work on the same CUDA stream is
        ordered after it, so ``frames_out`` can be overwritten by the next step right away.
        """
        src = self.buffers.frames_out
        if out is None:
            pin = src.device.type == "cuda"
            out = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
        out.copy_(src, non_blocking=True)
        return out

    def _similar_enough_to_skip(self) -> bool:
        """Similarity filter: may skip when the new input is close to the last processed one."""
        flt = self.config.similarity_filter
        buf = self.buffers
        if not flt.enabled or self._last_output is None:
            buf.prev_image.copy_(buf.image_in)
            return False
        a, b = buf.image_in.float().flatten(), buf.prev_image.float().flatten()
        cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # host sync: only with the filter on
        skip_prob = max(0.0, 1.0 - (1.0 - cos) / (1.0 - flt.threshold))
        if self._skipped_in_row < flt.max_skip and self._rng.random() < skip_prob:
            self._skipped_in_row += 1
            return True
        self._skipped_in_row = 0
        buf.prev_image.copy_(buf.image_in)
        return False

    # ------------------------------------------------------------------ public per-call API
    @torch.inference_mode()
    def step(self, frames: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
             synchronize: bool = True) -> torch.Tensor:
        """Run one call of the stream: F frames ``[F, H, W, C]`` in [0, 1] in, F frames out.

        The output is the result for the frames given ``latency`` calls earlier (the first ``latency``
        outputs come from the empty buffer). ``frames=None`` runs txt2img from the stream's noise.
        Returns a CPU float32 tensor ``[F, H, W, 3]`` (pinned on CUDA), or fills ``out``.
        """
        if frames is not None:
            frames = self._check_frames(frames, self.config.frames_per_step)
        return self._step(frames, out=out, synchronize=synchronize)

    def _step(self, frames: torch.Tensor | None, *, out: torch.Tensor | None, synchronize: bool,
              hand_over: bool = True) -> torch.Tensor | None:
        txt2img = frames is None
        if not txt2img:
            self._stage_frames(frames)
            if self._similar_enough_to_skip():
                result = self._last_output.clone() if out is None else out.copy_(self._last_output)
                self.frames_processed += self.config.frames_per_step
                return result
        if self.kv is not None:
            self.kv.schedule_call()
        self._run_device_step(txt2img)
        if not hand_over:
            self.frames_processed += self.config.frames_per_step
            return None
        result = self._hand_over(out)
        if synchronize and result.device.type == "cpu" and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        if self.config.similarity_filter.enabled:
            if self._last_output is None:
                self._last_output = torch.empty_like(result)
            self._last_output.copy_(result)
        self.frames_processed += self.config.frames_per_step
        return result

    def _check_frames(self, frames: torch.Tensor, count: int | None, *, check_values: bool = True) -> torch.Tensor:
        frames = as_rgb_frames(frames, width=self.config.width, height=self.config.height, check_finite=False)
        if count is not None and frames.shape[0] != count:
            raise FrameError(f"one stream step takes frames_per_step={count} frames, got {frames.shape[0]}")
        if check_values:
            self._check_finite(frames)
        return frames

    def _check_finite(self, frames: torch.Tensor) -> None:
        """Refuse NaN/inf input before it reaches the state, allocation-free.

        NaN and inf survive a sum, which is written into a scalar kept per device. For frames on the CPU
        (ComfyUI's IMAGE) this never touches the GPU; frames already on the GPU cost one host sync.
        """
        total = self._finite_scratch.get(frames.device)
        if total is None:
            total = self._finite_scratch[frames.device] = torch.zeros((), device=frames.device, dtype=torch.float32)
        torch.sum(frames, dim=tuple(range(frames.dim())), dtype=torch.float32, out=total)
        if not math.isfinite(float(total)):
            raise FrameError("frames contain NaN or infinite values")

    @torch.inference_mode()
    def process_video(self, frames: torch.Tensor, *, progress: ProgressCallback | None = None) -> torch.Tensor:
        """Run N frames through the stream and return N frames **aligned** with the input.

        Output k is the stream's result for input k: after the N frames the last group of F frames is
        fed ``latency`` more times to flush the pipeline, and the first ``latency`` outputs (which
        belong to earlier calls) are dropped. The stream state carries on afterwards, so consecutive
        videos stay coherent. ``progress(done, total)`` is called after each group of F frames and may
        raise to stop (e.g. on a user interrupt); the stream stays usable.
        """
        f = self.config.frames_per_step
        frames = self._check_frames(frames, None)  # values checked once for the whole video
        total = frames.shape[0]
        if total % f:
            raise FrameError(f"the number of frames ({total}) must be a multiple of frames_per_step={f}")
        result = torch.empty((total, self.config.height, self.config.width, 3), dtype=torch.float32)
        groups = total // f
        lag = self.latency
        drain = None if self.config.similarity_filter.enabled else self._drain
        for call in range(groups + lag):
            group = min(call, groups - 1)
            target = call - lag
            chunk = frames[group * f:(group + 1) * f]
            if target < 0:  # the pipeline is filling: these outputs belong to earlier calls
                self._step(chunk, out=None, synchronize=False, hand_over=self.config.similarity_filter.enabled)
                continue
            dest = result[target * f:(target + 1) * f]
            if drain is None:
                self._step(chunk, out=dest, synchronize=False)
            else:
                self._step(chunk, out=drain.buffer(), synchronize=False)
                drain.submitted(dest)
            if progress is not None:
                progress((target + 1) * f, total)
        if drain is not None:
            drain.flush()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return result

    @torch.inference_mode()
    def txt2img(self, count: int = 1) -> torch.Tensor:
        """``count`` txt2img calls; returns the ``count * F`` frames, aligned like :meth:`process_video`."""
        f, lag = self.config.frames_per_step, self.latency
        result = torch.empty((count * f, self.config.height, self.config.width, 3), dtype=torch.float32)
        for call in range(count + lag):
            target = call - lag
            self.step(None, out=result[target * f:(target + 1) * f] if target >= 0 else None, synchronize=False)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return result
