"""The runtime seam: how one stream's UNet and VAE get called, and whether its step is captured.

:func:`prepare` turns an :class:`~streamrt.config.Acceleration` into a :class:`Runtime` for one stream
(one pipeline, one config). The runtime owns:

- the callables that run the UNet and the VAE: the pipeline's own modules (``eager``, ``cuda_graph``),
  ``torch.compile``'d copies of them (``compile``), or engine runners (``tensorrt``);
- the step's execution: op by op, or captured once per variant in a CUDA graph and replayed;
- the host I/O of the stream's frames (pinned staging and drain, :class:`~streamrt.runtime.host_io.HostIO`).

Nothing here changes what the shared pipeline is: two streams of one pipeline with different
accelerations each run the path they asked for. A UNet call's extra inputs travel as
:class:`UNetExtras`; a callable that cannot take an extra it is given raises.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..config import Acceleration, StreamConfig
from ..controlnet import ControlResiduals, TorchControlNet, residual_levels
from ..cuda_graphs import capture_graph
from ..kv_cache import KVCache, PromptKV
from ..models import StreamModels, decode_latents, encode_images, predict_noise
from .ahead_of_time import AheadOfTimeUNet, AheadOfTimeVae
from .compiled import (
    CompiledCalls,
    CompileOptions,
    compile_problem,
    compiled_calls,
    compiled_controlnet,
    use_channels_last,
    use_compile_cache,
)
from .host_io import HostIO

logger = logging.getLogger(__name__)

UNET, VAE_ENCODER, VAE_DECODER = "unet", "vae_encoder", "vae_decoder"
#: A ControlNet's engine (one per ControlNet, keyed by its own weights): not one of the pipeline's components.
CONTROLNET = "controlnet"

#: The inputs of every UNet engine, in call order.
UNET_INPUTS: tuple[str, ...] = ("sample", "timestep", "encoder_hidden_states")
#: The engine inputs of :class:`AddedConditions`, in its field order (also diffusers' ``added_cond_kwargs`` keys):
#: named once here, for the export (:mod:`streamrt.engines.export`) and :class:`EngineUNet`.
ADDED_COND_INPUTS: tuple[str, ...] = ("text_embeds", "time_ids")
#: The ControlNet residuals as engine tensors: outputs of a ControlNet engine, inputs of a UNet engine built for
#: ControlNets. ``down_residual_<i>`` (one per skip connection of the UNet's down path, in diffusers'
#: ``down_block_additional_residuals`` order) and ``mid_residual`` (``mid_block_additional_residual``).
DOWN_RESIDUAL_PREFIX, MID_RESIDUAL = "down_residual_", "mid_residual"
#: The inputs of every ControlNet engine besides its UNet-like ones (and SDXL's added conditions), in call order.
CONTROLNET_INPUTS: tuple[str, ...] = ("controlnet_cond", "conditioning_scale")


def down_residual_name(index: int) -> str:
    """``down_residual_<index>``: the engine tensor of the ``index``-th down-path residual."""
    return f"{DOWN_RESIDUAL_PREFIX}{index}"


class AccelerationUnavailable(RuntimeError):
    """The acceleration asked for cannot run here; the message says why and what to use instead."""


class EngineCallError(RuntimeError):
    """An engine was given an input it has no binding for (it never falls back to torch in silence)."""


@dataclass(frozen=True, eq=False)
class AddedConditions:
    """SDXL's added conditions of a UNet call, one row per UNet batch row (docs/DESIGN.md section 9).

    Args:
        text_embeds (`torch.Tensor`): ``[rows, P]`` pooled text embeddings (negative rows first).
        time_ids (`torch.Tensor`): ``[rows, 6]`` original size, crop top-left, target size.

    Both are a stream's pre-allocated buffers: a prompt change writes into them, the call reads them.
    """

    text_embeds: torch.Tensor
    time_ids: torch.Tensor


@dataclass(frozen=True)
class UNetExtras:
    """The typed extra inputs of one UNet call, beyond the sample, the timesteps and the text embeddings.

    Args:
        kv_cache (`KVCache`, optional): cached attention over earlier frames (the torch path reads it
            through the caching attention processors).
        added_cond (`AddedConditions`, optional): SDXL's pooled embeddings and size conditions.
        control (`ControlResiduals`, optional): the residuals the stream's ControlNets computed this call (set
            inside the step; none while every ControlNet is at strength 0).
        prompt_kv (`PromptKV`, optional): the cross-attention keys and values of the stream's prompt, computed when
            it changed (the torch path reads them through the caching attention processors; an engine projects
            the embeddings itself and takes none).
        fused_qkv (`bool`, defaults to `False`): self-attention projects its query, key and value with one GEMM over
            each layer's fused weight (the torch path's caching processors; an engine has its own kernels).
    """

    kv_cache: KVCache | None = None
    added_cond: AddedConditions | None = None
    control: ControlResiduals | None = None
    prompt_kv: PromptKV | None = None
    fused_qkv: bool = False

    @functools.cached_property
    def given(self) -> frozenset[str]:
        """Names of the extras that are set (computed once: the extras of a stream never change)."""
        given = {name for name in ("kv_cache", "added_cond", "control", "prompt_kv") if getattr(self, name) is not None}
        return frozenset(given | ({"fused_qkv"} if self.fused_qkv else set()))

    @functools.cached_property
    def torch_kwargs(self) -> dict[str, Any]:
        """The diffusers UNet keyword arguments that carry these extras (computed once, not per frame)."""
        kwargs: dict[str, Any] = {}
        attention: dict[str, Any] = {name: value for name, value in (("kv_cache", self.kv_cache),
                                                                     ("prompt_kv", self.prompt_kv))
                                     if value is not None}
        if self.fused_qkv:
            attention["fused_qkv"] = True
        if attention:
            kwargs["cross_attention_kwargs"] = attention
        if self.added_cond is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.added_cond.text_embeds,
                                           "time_ids": self.added_cond.time_ids}
        return kwargs


NO_EXTRAS = UNetExtras()


class UNetCall(Protocol):
    """``call(sample, timesteps, embeds, extras) -> prediction``; ``accepts`` names the extras it can take."""

    accepts: frozenset[str]

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                 extras: UNetExtras) -> torch.Tensor: ...


class TorchUNet:
    """The UNet on torch: the pipeline's module, or a compiled copy of it."""

    accepts = frozenset({"kv_cache", "added_cond", "control", "prompt_kv", "fused_qkv"})

    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                 extras: UNetExtras = NO_EXTRAS) -> torch.Tensor:
        if extras.control is not None and extras.control.active:
            return predict_noise(self.module, sample, timesteps, embeds, **extras.torch_kwargs,
                                 **extras.control.torch_kwargs())
        return predict_noise(self.module, sample, timesteps, embeds, **extras.torch_kwargs)


def _residual_names(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """The ControlNet residual names among ``names`` (``down_residual_<i>``, ``mid_residual``), and the problems
    with them: the down ones must be ``0..N-1`` with none missing, and come with the mid one."""
    down = sorted((n for n in names if n.startswith(DOWN_RESIDUAL_PREFIX)),
                  key=lambda n: int(n[len(DOWN_RESIDUAL_PREFIX):]) if n[len(DOWN_RESIDUAL_PREFIX):].isdigit() else -1)
    problems = []
    if down != [down_residual_name(i) for i in range(len(down))]:
        problems.append(f"down residuals {down} that are not {DOWN_RESIDUAL_PREFIX}0..{len(down) - 1}")
    if bool(down) != (MID_RESIDUAL in names):
        problems.append("down residuals without the mid one" if down else "a mid residual without the down ones")
    return down, problems


class EngineUNet:
    """The UNet through an engine runner.

    Args:
        runner: ``runner(*inputs) -> noise_pred``, its inputs in ``input_names`` order.
        name: how messages name the engine.
        input_names: the runner's inputs; by default its own ``input_names`` attribute (what
            :class:`~streamrt.engines.EngineRunner` read from the engine), else the stock three.
        zero_residuals: for an engine built for ControlNets: the tensors it is fed (down ones, then the mid one)
            on calls where no ControlNet ran (all at strength 0, or out of their step range): zeros the caller
            allocates once (:func:`zero_control_residuals`), so such a call allocates nothing and adds nothing.

    The inputs are :data:`UNET_INPUTS` and, for an engine exported with SDXL's added conditions,
    :data:`ADDED_COND_INPUTS` (then :attr:`accepts` holds ``"added_cond"``, and every call must give them); an
    engine built for ControlNets also takes the residuals (``down_residual_<i>``, ``mid_residual``; then
    :attr:`accepts` holds ``"control"``). A call hands the runner the tensors it was given, which are the stream's
    own buffers (and the ControlNet engines' output buffers): a runner that binds by address binds them once and
    then only enqueues, so nothing is allocated per frame.
    """

    def __init__(self, runner: Callable[..., torch.Tensor], name: str = "the UNet engine",
                 input_names: Sequence[str] | None = None,
                 zero_residuals: Sequence[torch.Tensor] | None = None) -> None:
        self.runner = runner
        self.name = name
        if input_names is None:
            input_names = getattr(runner, "input_names", None) or UNET_INPUTS
        names = tuple(input_names)
        down, residual_problems = _residual_names(names)
        residuals = (*down, MID_RESIDUAL) if down else ()
        known = UNET_INPUTS + ADDED_COND_INPUTS + residuals
        added = [n for n in ADDED_COND_INPUTS if n in names]
        problems = [f"no input {n}" for n in UNET_INPUTS if n not in names]
        problems += [f"an input {n} StreamRT does not feed" for n in names if n not in known]
        if added and len(added) != len(ADDED_COND_INPUTS):
            problems.append(f"only {added[0]} of the added conditions ({', '.join(ADDED_COND_INPUTS)})")
        problems += residual_problems
        if problems or len(set(names)) != len(names):
            raise EngineCallError(f"{name} has inputs {list(names)} ({'; '.join(problems) or 'repeated names'}): "
                                  "it is not a StreamRT UNet engine; rebuild it with Build Engines")
        self.input_names = names
        self.down_residuals = len(down)
        self.accepts: frozenset[str] = frozenset({"added_cond"} if added else set()) | (
            frozenset({"control"}) if down else frozenset())
        self.zero_residuals: tuple[torch.Tensor, ...] | None = None
        if zero_residuals is not None:
            if not down or len(zero_residuals) != len(residuals):
                raise EngineCallError(f"{name} takes {len(residuals)} ControlNet residuals, "
                                      f"{len(zero_residuals)} zero residuals were given")
            self.zero_residuals = tuple(zero_residuals)
        # position of each runner input among (sample, timestep, embeds, text_embeds, time_ids, *residuals):
        # worked out once, so a call only picks tensors
        self._order = tuple(known.index(n) for n in names)

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                 extras: UNetExtras = NO_EXTRAS) -> torch.Tensor:
        refused = extras.given - self.accepts
        if refused:
            raise EngineCallError(f"{self.name} has no inputs for {', '.join(sorted(refused))}; "
                                  "prepare the runtime with a config the engine was built for")
        lacking = self.accepts - extras.given
        if lacking:
            raise EngineCallError(f"{self.name} takes {', '.join(sorted(lacking))} "
                                  f"({', '.join(_EXTRA_LABELS[n] for n in sorted(lacking))}) and the call gave none; "
                                  "prepare the runtime with the pipeline (and ControlNets) the engine was built for")
        values: tuple[torch.Tensor | None, ...] = (sample, timesteps, embeds)
        values += ((None, None) if extras.added_cond is None else
                   (extras.added_cond.text_embeds, extras.added_cond.time_ids))
        if extras.control is not None:
            control = extras.control
            if control.active:
                if len(control.down) != self.down_residuals:
                    raise EngineCallError(f"{self.name} takes {self.down_residuals} down residuals, the ControlNets "
                                          f"gave {len(control.down)}: they were made for another UNet")
                values += (*control.down, control.mid)
            elif self.zero_residuals is not None:
                values += self.zero_residuals
            else:
                raise EngineCallError(f"{self.name} has no zero residuals for a call where no ControlNet ran; "
                                      "make it with zero_residuals (see zero_control_residuals)")
        return self.runner(*(values[i] for i in self._order))


def zero_control_residuals(models: StreamModels, config: StreamConfig) -> tuple[torch.Tensor, ...]:
    """Zeros shaped like the ControlNet residuals of a stream of ``models`` with ``config`` (``unet_rows`` rows, the
    config's latent size; the down ones, then the mid one), in the models' dtype on their device: what a UNet engine
    built for ControlNets is fed while none runs. Allocated once per stream (about 27 MB at 512x512 for SD1.5's
    12 + 1 residuals, two rows in fp16), they stay zero: the engine only reads them."""
    latent_height, latent_width = config.height // models.vae_scale_factor, config.width // models.vae_scale_factor
    return tuple(torch.zeros((config.unet_rows, width, latent_height // factor, latent_width // factor),
                             dtype=models.dtype, device=models.device)
                 for width, factor in residual_levels(models.unet.config))


class EngineControlNet:
    """One ControlNet through its engine runner, with :class:`~streamrt.controlnet.TorchControlNet`'s signature:
    ``call(sample, timesteps, embeds, cond, scale, added_cond_kwargs) -> (down residuals, mid residual)``.

    Args:
        runner: ``runner(*inputs) -> outputs`` (a tuple), with ``input_names`` and ``output_names`` attributes
            (what :class:`~streamrt.engines.EngineRunner` read from the engine) or given here.
        name: how messages name the engine.

    The residuals returned are the runner's own output buffers, rewritten by every call (an EngineRunner binds
    them once): :meth:`streamrt.controlnet.ControlState.compute` sums several ControlNets into the first one's
    buffers in place, which is right because each call rewrites them; for the same reason two ControlNets must
    not share one runner (the runtime gives each call object its own). Nothing is allocated per call: the
    down list is made again only when the runner hands back other tensors (a shape change).
    """

    def __init__(self, runner: Callable[..., Any], name: str = "the ControlNet engine",
                 input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None) -> None:
        self.runner = runner
        self.name = name
        names = tuple(input_names if input_names is not None else getattr(runner, "input_names", ()))
        outputs = tuple(output_names if output_names is not None else getattr(runner, "output_names", ()))
        known = UNET_INPUTS + CONTROLNET_INPUTS + ADDED_COND_INPUTS
        added = [n for n in ADDED_COND_INPUTS if n in names]
        problems = [f"no input {n}" for n in UNET_INPUTS + CONTROLNET_INPUTS if n not in names]
        problems += [f"an input {n} StreamRT does not feed" for n in names if n not in known]
        if added and len(added) != len(ADDED_COND_INPUTS):
            problems.append(f"only {added[0]} of the added conditions ({', '.join(ADDED_COND_INPUTS)})")
        down, residual_problems = _residual_names(outputs)
        problems += residual_problems
        problems += [f"an output {n} that is no residual" for n in outputs if n not in (*down, MID_RESIDUAL)]
        if not down:
            problems.append("no residual outputs")
        if problems or len(set(names)) != len(names):
            raise EngineCallError(f"{name} has inputs {list(names)} and outputs {list(outputs)} "
                                  f"({'; '.join(problems) or 'repeated names'}): it is not a StreamRT ControlNet "
                                  "engine; rebuild it with Build Engines")
        self.input_names, self.output_names = names, outputs
        self.added_conditions = bool(added)
        self._order = tuple(known.index(n) for n in names)
        self._down_at = tuple(outputs.index(n) for n in down)
        self._mid_at = outputs.index(MID_RESIDUAL)
        self._last: Any = None
        self._split: tuple[list[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, cond: torch.Tensor,
                 scale: torch.Tensor, added_cond_kwargs: dict | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        if bool(added_cond_kwargs) != self.added_conditions:
            raise EngineCallError(f"{self.name} takes {'the' if self.added_conditions else 'no'} added conditions "
                                  f"({', '.join(ADDED_COND_INPUTS)}) and the call gave "
                                  f"{'them' if added_cond_kwargs else 'none'}: it was built for another family")
        added = ((added_cond_kwargs[ADDED_COND_INPUTS[0]], added_cond_kwargs[ADDED_COND_INPUTS[1]])
                 if added_cond_kwargs else (None, None))
        values = (sample, timesteps, embeds, cond, scale, *added)
        out = self.runner(*(values[i] for i in self._order))
        if out is not self._last:  # an EngineRunner hands back the same tuple of buffers until a shape changes
            self._last = out
            self._split = ([out[i] for i in self._down_at], out[self._mid_at])
        return self._split


def unet_extras_needed(models: StreamModels, config: StreamConfig, control: bool = False) -> frozenset[str]:
    """Names of the :class:`UNetExtras` a stream of ``models`` with ``config`` gives every UNet call: what a
    UNet engine must take to run it (``kv_cache`` with cached attention, ``added_cond`` for a family with
    added conditions, ``control`` for a stream with ControlNets)."""
    needed = {"control"} if control else set()
    if config.kv_cache.enabled:
        needed.add("kv_cache")
    if models.family.has_added_conditions:
        needed.add("added_cond")
    return frozenset(needed)


_EXTRA_LABELS = {"kv_cache": "the attention cache", "added_cond": "added conditions (text_embeds, time_ids)",
                 "control": "ControlNet residuals", "prompt_kv": "the prompt's cross-attention keys and values",
                 "fused_qkv": "fused self-attention projections"}


def _unet_engine(models: StreamModels, config: StreamConfig, found: AttachResult, notes: list[str],
                 control: bool = False) -> UNetCall | None:
    """The UNet engine of ``found`` as a :class:`UNetCall` when it takes exactly the extras this stream gives;
    else None, with the runner closed and dropped from ``found`` and a note saying why (docs/DESIGN.md
    section 6: an engine that cannot serve the config is not chosen)."""
    runner = found.runners.get(UNET)
    if runner is None:
        return None
    record = found.records.get(UNET)
    name = f"the UNet engine {getattr(record, 'name', '')}".rstrip()
    needed = unet_extras_needed(models, config, control)
    problem = None
    try:
        unet = EngineUNet(runner, name)
    except EngineCallError as exc:
        problem = str(exc)
    else:
        missing, surplus = needed - unet.accepts, unet.accepts - needed
        if missing:
            what = " and ".join(_EXTRA_LABELS[n] for n in sorted(missing))
            problem = f"{name} has no inputs for {what}, which this {models.family} stream gives every call"
            if "added_cond" in missing:
                problem += f" (built without {models.family}'s added conditions: rebuild it with Build Engines)"
            elif "control" in missing:
                problem += " (a plain UNet engine: build one for ControlNets with Build Engines)"
        elif surplus:
            what = " and ".join(_EXTRA_LABELS[n] for n in sorted(surplus))
            problem = f"{name} takes {what}, which this {models.family} pipeline does not have"
            if "control" in surplus:
                problem = f"{name} takes {what}, and this {models.family} stream has no ControlNets"
        elif control:
            zeros = zero_control_residuals(models, config)
            if unet.down_residuals != len(zeros) - 1:
                problem = (f"{name} takes {unet.down_residuals} down residuals, this {models.family} UNet has "
                           f"{len(zeros) - 1}: it was built for another UNet")
            else:
                unet.zero_residuals = zeros
    if problem is None:
        return unet
    found.runners.pop(UNET)
    found.records.pop(UNET, None)
    getattr(runner, "close", lambda: None)()
    message = f"unet: {problem}; the UNet runs on torch"
    notes.append(message)
    logger.warning("StreamRT engines: %s", message)
    return None


@dataclass
class AttachResult:
    """Engines found for one stream: runners by component, their cache records, and notes for the user
    (why a component has no engine here)."""

    runners: dict[str, Callable[..., Any]] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class EngineSource(Protocol):
    """Where a runtime gets engines from (the engine cache, see :class:`streamrt.engines.CachedEngines`)."""

    @property
    def key(self) -> Hashable:
        """What identifies this source (a stream is rebuilt when it changes)."""

    def attach(self, models: StreamModels, config: StreamConfig) -> AttachResult:
        """Runners for the components that have an engine fitting ``config`` that runs here. For a stream with
        ControlNets it is called with ``control=True``: its UNet engine must then take their residuals.

        A source may also have ``attach_controlnet(models, config, module) -> (runner or None, note or None)``: an
        engine runner of its own (never shared) for one ControlNet, or why there is none; without that method
        ControlNets run on torch."""


class Runtime:
    """How one stream calls its models and runs its step. Made by :func:`prepare`.

    Attributes:
        requested (`Acceleration`): what the caller asked for (may be ``AUTO``).
        acceleration (`Acceleration`): what runs (never ``AUTO``).
        device (`torch.device`): where the models run.
        parts (`dict[str, str]`): ``unet`` / ``vae_encoder`` / ``vae_decoder`` -> ``"torch"``,
            ``"compiled"`` or ``"engine"``.
        notes (`tuple[str, ...]`): why a faster path was not taken (for the user).
        captures (`bool`): whether the step is captured in a CUDA graph.
        host (`HostIO`): the stream's pinned frame staging and drain.
    """

    def __init__(self, *, requested: Acceleration, acceleration: Acceleration, device: torch.device,
                 unet: UNetCall, encode: Callable[[torch.Tensor], torch.Tensor],
                 decode: Callable[[torch.Tensor], torch.Tensor], parts: Mapping[str, str], captures: bool,
                 host: HostIO, notes: Sequence[str] = (), closers: Sequence[Callable[[], None]] = (),
                 controlnet: Callable[[Any], Callable[..., Any]] = TorchControlNet,
                 controlnet_engines: Callable[[Any], tuple[Any, str | None]] | None = None) -> None:
        self.requested = requested
        self.acceleration = acceleration
        self.device = device
        self.unet = unet
        self.encode = encode
        self.decode = decode
        self.parts = dict(parts)
        self.captures = captures
        self.host = host
        self.notes = tuple(notes)
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self._closers = list(closers)
        self._controlnet = controlnet
        self._controlnet_engines = controlnet_engines
        self._controlnet_parts: list[str] = []

    def controlnet(self, module: Any) -> Callable[..., Any]:
        """How this runtime calls the ControlNet ``module``: ``call(sample, timesteps, embeds, cond, scale,
        added_cond_kwargs) -> (down residuals, mid residual)`` (see :class:`streamrt.controlnet.TorchControlNet`);
        under ``compile``, through the ControlNet's compiled copy; under engines, through its engine
        (:class:`EngineControlNet`, a runner of its own for each call of this method, so that two ControlNets never
        share output buffers) when the engine source has one, else on torch with a note saying why.
        ``parts["controlnet"]`` then says ``engine`` when every ControlNet asked for so far runs on one."""
        if self._controlnet_engines is None:
            return self._controlnet(module)
        runner, note = self._controlnet_engines(module)
        call = None
        if runner is not None:
            try:
                call = EngineControlNet(runner, f"the ControlNet engine {getattr(runner, 'path', '')}".rstrip())
            except EngineCallError as exc:
                note = str(exc)
            close = getattr(runner, "close", None)
            if call is None and callable(close):
                close()
            elif callable(close):
                self._closers.append(close)
            if call is not None and not getattr(runner, "is_stream_capturable", lambda: True)():
                self.captures = False  # before the first step: no graph has been captured yet
                self.notes = (*self.notes, "controlnet: its engine cannot be captured; the step runs uncaptured")
        self._controlnet_parts.append("engine" if call is not None else "torch")
        self.parts[CONTROLNET] = "engine" if all(p == "engine" for p in self._controlnet_parts) else "torch"
        if call is not None:
            return call
        message = f"controlnet: {note or 'no engine'}; it runs on torch"
        self.notes = (*self.notes, message)
        logger.warning("StreamRT engines: %s", message)
        return self._controlnet(module)

    def __repr__(self) -> str:
        return f"Runtime({self.describe()})"

    def describe(self) -> str:
        """``"cuda_graph"``, ``"auto -> eager"``, ``"tensorrt (vae_decoder on torch)"``: what runs, in a few words."""
        text = self.acceleration.value
        if self.requested is not self.acceleration:
            text = f"{self.requested.value} -> {text}"
        on_torch = [name for name, how in self.parts.items() if how == "torch"]
        if self.acceleration is Acceleration.TENSORRT and on_torch:
            text += f" ({', '.join(on_torch)} on torch)"
        return text

    def summary(self) -> str:
        """What runs and why, for a user: the acceleration, each part (``unet: engine``, ``vae_decoder: torch``) and
        the notes that say why a faster path (an engine, a CUDA graph) was not taken, one per line."""
        lines = [f"runs: {self.describe()}", "  ".join(f"{name}: {how}" for name, how in self.parts.items())]
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)

    def run(self, variant: Hashable, step: Callable[[], None], state: Sequence[torch.Tensor],
            guard: Callable[[], AbstractContextManager] | None = None) -> None:
        """Run ``step`` once: directly, or through its CUDA graph (captured on the first call of each
        ``variant``, with ``state`` kept as it was through the warm-up, which runs inside ``guard``)."""
        if self.device.type != "cuda":
            step()
            return
        # on the stream's device whichever is current in this thread (a stream on cuda:1 stepped from a thread
        # whose current device is cuda:0): kernels, captures and replays go to the current device's stream
        with torch.cuda.device(self.device):
            if not self.captures:
                step()
                return
            graph = self._graphs.get(variant)
            if graph is None:
                graph, _ = capture_graph(step, self.device, preserve=state, guard=guard)
                self._graphs[variant] = graph
                logger.info("captured the stream step (%s) in a CUDA graph (%s)", variant, self.describe())
            graph.replay()

    def close(self) -> None:
        """Drop the captured graphs and release engine runners (the stream is going away)."""
        self._graphs.clear()
        for close in self._closers:
            close()
        self._closers.clear()


def _unavailable(requested: Acceleration, why: str) -> AccelerationUnavailable:
    return AccelerationUnavailable(f"acceleration '{requested.value}' cannot run here: {why}. "
                                   "Use 'auto' (the fastest path that runs here) or 'eager'.")


def prepare(models: StreamModels, config: StreamConfig, acceleration: Acceleration | str | None = None, *,
            engines: EngineSource | None = None, compile_options: CompileOptions | None = None,
            control: bool = False) -> Runtime:
    """The runtime of one stream of ``models`` with ``config``.

    Args:
        models: the (shared) pipeline; never modified, but for the channels-last layout of the UNet's
            weights when a compiled copy is made on a GPU.
        config: the stream's config (shapes, cached attention).
        acceleration: what to use; ``None`` takes ``config.acceleration``.
        engines: where ``tensorrt`` (and ``auto``) look for engines; without it there are none.
        compile_options: how ``compile`` compiles (default: :class:`CompileOptions`' defaults).
        control: the stream has ControlNets: a UNet engine must take their residuals (and one that does is
            refused for a stream without); the engine source is asked for ControlNet engines
            (:meth:`Runtime.controlnet`).

    Raises:
        AccelerationUnavailable: ``cuda_graph`` without a CUDA device, ``compile`` where compiled kernels
            cannot run (see :func:`~streamrt.runtime.compiled.compile_problem`), ``tensorrt`` without any
            engine that runs here for this config (the message carries the reasons).
    """
    requested = Acceleration(acceleration if acceleration is not None else config.acceleration)
    device = models.device
    cuda = device.type == "cuda"
    host = HostIO((config.frames_per_step, config.height, config.width, 3), device)
    notes: list[str] = []
    torch_parts = {UNET: "torch", VAE_ENCODER: "torch", VAE_DECODER: "torch"}

    def torch_runtime(resolved: Acceleration, captures: bool) -> Runtime:
        vae = models.vae
        return Runtime(requested=requested, acceleration=resolved, device=device, unet=TorchUNet(models.unet),
                       encode=lambda images: encode_images(vae, images),
                       decode=lambda latents: decode_latents(vae, latents),
                       parts=torch_parts, captures=captures, host=host, notes=notes)

    if requested in (Acceleration.AUTO, Acceleration.TENSORRT):
        if engines is None:
            found = AttachResult()
        else:  # asked for control only when it is there: sources without ControlNet engines keep working
            found = engines.attach(models, config, control=True) if control else engines.attach(models, config)
        notes += found.notes
        unet = _unet_engine(models, config, found, notes, control)  # drops a UNet engine that cannot serve it
        if unet is not None or (requested is Acceleration.TENSORRT and found.runners):
            return _engine_runtime(models, config, requested, found, unet, host, notes, engines)
        if requested is Acceleration.TENSORRT:
            raise _unavailable(requested, "no engine fits this stream on this machine ("
                               + "; ".join(notes or ["none found"]) + "); build them with Build Engines")
        for runner in found.runners.values():  # auto without a UNet engine: not worth a partial engine path
            getattr(runner, "close", lambda: None)()
        resolved = Acceleration.CUDA_GRAPH if cuda else Acceleration.EAGER
        if not cuda:
            notes.append(f"no CUDA GPU ({device}): the step runs eagerly")
        return torch_runtime(resolved, captures=cuda)

    if requested is Acceleration.EAGER:
        return torch_runtime(requested, captures=False)
    if requested is Acceleration.CUDA_GRAPH:
        if not cuda:
            raise _unavailable(requested, f"it needs a CUDA GPU and the pipeline runs on {device}")
        return torch_runtime(requested, captures=True)
    if requested is Acceleration.COMPILE:
        options = compile_options or CompileOptions()
        problem = compile_problem(device) if options.backend == "inductor" else None
        if problem:
            raise _unavailable(requested, problem)
        if not cuda:
            notes.append(f"no CUDA GPU ({device}): compiled calls run without a CUDA graph")
        unet: UNetCall
        if options.ahead_of_time and options.backend == "inductor":
            # the torch.compile'd calls are made only if a package fails: making them imports dynamo (seconds)
            cache = use_compile_cache(options.cache_dir)
            use_channels_last(models)

            def compiled() -> CompiledCalls:
                return compiled_calls(models, options)

            if config.kv_cache.enabled:
                notes.append("unet: cached attention runs through torch.compile, which traces the UNet again in a "
                             "new process (its ring state is not part of an ahead-of-time package)")
                unet = TorchUNet(compiled().unet)
            else:
                unet = AheadOfTimeUNet(models.unet, cache,
                                       fallback=lambda *call: TorchUNet(compiled().unet)(*call))
            encode = AheadOfTimeVae(VAE_ENCODER, models.vae, encode_images, cache,
                                    fallback=lambda images: compiled().encode(images))
            decode = AheadOfTimeVae(VAE_DECODER, models.vae, decode_latents, cache,
                                    fallback=lambda latents: compiled().decode(latents))
        else:
            calls = compiled_calls(models, options)
            unet, encode, decode = TorchUNet(calls.unet), calls.encode, calls.decode
        return Runtime(requested=requested, acceleration=requested, device=device, unet=unet,
                       encode=encode, decode=decode,
                       parts={UNET: "compiled", VAE_ENCODER: "compiled", VAE_DECODER: "compiled"},
                       captures=cuda, host=host, notes=notes,
                       controlnet=lambda module: TorchControlNet(compiled_controlnet(module, options)))
    raise ValueError(f"unknown acceleration {requested!r}")


def _engine_runtime(models: StreamModels, config: StreamConfig, requested: Acceleration, found: AttachResult,
                    unet: UNetCall | None, host: HostIO, notes: list[str], engines: EngineSource | None) -> Runtime:
    """Engines for the components that have one (``unet``: the checked UNet engine, if any), the pipeline's
    modules for the rest; ControlNets through the source's ControlNet engines where it has them."""
    vae = models.vae
    runners = found.runners
    parts = {name: ("engine" if name in runners else "torch") for name in (UNET, VAE_ENCODER, VAE_DECODER)}
    if unet is None:
        unet = TorchUNet(models.unet)
    on_torch = [name for name, how in parts.items() if how == "torch"]
    if on_torch:
        message = f"{', '.join(on_torch)}: on torch (no engine fits this stream here)"
        notes.append(message)
        logger.warning("StreamRT engines: %s", message)
    encode = runners.get(VAE_ENCODER) or (lambda images: encode_images(vae, images))
    decode = runners.get(VAE_DECODER) or (lambda latents: decode_latents(vae, latents))
    captures = models.device.type == "cuda" and all(
        getattr(r, "is_stream_capturable", lambda: True)() for r in runners.values())
    closers = [r.close for r in runners.values() if callable(getattr(r, "close", None))]
    attach_controlnet = getattr(engines, "attach_controlnet", None)
    if attach_controlnet is None:
        def controlnet_engines(module: Any) -> tuple[Any, str | None]:
            return None, "this engine source has no ControlNet engines"
    else:
        def controlnet_engines(module: Any) -> tuple[Any, str | None]:
            return attach_controlnet(models, config, module)
    return Runtime(requested=requested, acceleration=Acceleration.TENSORRT, device=models.device, unet=unet,
                   encode=encode, decode=decode, parts=parts, captures=captures, host=host, notes=notes,
                   closers=closers, controlnet_engines=controlnet_engines)
