"""Typed, frozen configuration of one stream.

A :class:`StreamConfig` holds everything that decides the *shape* of the stream's state (resolution,
denoising steps, frames per step, CFG mode) plus the few scalars that can change between frames
without re-allocating anything (guidance scale, delta). Two streams with equal configs have
identically shaped buffers, so a config is also the key for captured CUDA graphs and engines.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace

from .kv_cache import KVCacheConfig


class Acceleration(str, enum.Enum):  # noqa: UP042 - enum.StrEnum is not in Python 3.10 (pyproject allows it)
    """How a stream's UNet and VAE are run (docs/DESIGN.md section 6).

    - ``AUTO``: the fastest path that is ready here without surprises: engines for this shape that run on
      this GPU, else ``CUDA_GRAPH`` on a CUDA device, else ``EAGER``.
    - ``EAGER``: plain PyTorch, op by op.
    - ``CUDA_GRAPH``: the whole step (encode, UNet, scheduler math, decode) captured once and replayed.
    - ``COMPILE``: ``torch.compile``'d copies of the UNet and VAE calls, captured in a CUDA graph on a GPU.
    - ``TENSORRT``: TensorRT / TensorRT-RTX engines from the engine cache, captured in a CUDA graph.
    """

    AUTO = "auto"
    EAGER = "eager"
    CUDA_GRAPH = "cuda_graph"
    COMPILE = "compile"
    TENSORRT = "tensorrt"


class CfgType(str, enum.Enum):  # noqa: UP042 - as Acceleration
    """How classifier-free guidance is computed (docs/DESIGN.md section 2, stage 4).

    - ``NONE``: no guidance; one UNet row per batch row.
    - ``FULL``: classic CFG; the batch is doubled with negative-prompt rows.
    - ``SELF``: residual CFG (RCFG); the unconditional prediction is ``delta * stock_noise``.
    - ``INITIALIZE``: RCFG whose stock noise is re-seeded by F extra negative-prompt rows per call.
    """

    NONE = "none"
    FULL = "full"
    SELF = "self"
    INITIALIZE = "initialize"


def coerce_enums(config) -> None:
    """Turn a frozen dataclass's ``cfg_type`` and ``acceleration`` strings into their enums, or raise a
    ValueError naming the unknown value (shared by :class:`StreamConfig` and the node settings)."""
    try:
        object.__setattr__(config, "cfg_type", CfgType(config.cfg_type))
    except ValueError:
        raise ValueError(f"unknown cfg_type {config.cfg_type!r}: use none, full, self or initialize") from None
    try:
        object.__setattr__(config, "acceleration", Acceleration(config.acceleration))
    except ValueError:
        raise ValueError(f"unknown acceleration {config.acceleration!r}: use one of "
                         f"{', '.join(a.value for a in Acceleration)}") from None


@dataclass(frozen=True)
class SimilarityFilterConfig:
    """Skip frames that barely differ from the last processed input.

    Args:
        enabled (`bool`, defaults to `False`): turn the filter on.
        threshold (`float`, defaults to `0.98`): cosine similarity above which frames may be skipped.
        max_skip (`int`, defaults to `10`): never skip more than this many frames in a row.
    """

    enabled: bool = False
    threshold: float = 0.98
    max_skip: int = 10

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and 0.0 < self.threshold < 1.0):  # NaN fails too
            raise ValueError(f"similarity threshold must be in (0, 1), got {self.threshold}")
        if self.max_skip < 0:
            raise ValueError(f"similarity max_skip must be >= 0, got {self.max_skip}")


@dataclass(frozen=True)
class StreamConfig:
    """Configuration of a stream.

    Args:
        width (`int`, defaults to `512`): image width in pixels; a multiple of 8.
        height (`int`, defaults to `512`): image height in pixels; a multiple of 8.
        t_index_list (`tuple[int, ...]`, defaults to `(32, 45)`): indices into the LCM schedule of
            ``num_inference_steps`` timesteps, one per denoising step (``n = len(t_index_list)``).
        num_inference_steps (`int`, defaults to `50`): length of the LCM schedule the indices point into.
        frames_per_step (`int`, defaults to `1`): F, input frames consumed per call.
        cfg_type (`CfgType`, defaults to `CfgType.SELF`): guidance mode.
        guidance_scale (`float`, defaults to `1.2`): CFG scale; guidance only happens when > 1.
        delta (`float`, defaults to `1.0`): RCFG strength of the virtual negative (``self``/``initialize``).
        do_add_noise (`bool`, defaults to `True`): re-noise the latents carried to the next step.
        seed (`int`, defaults to `2`): seed of the fixed stream noise.
        similarity_filter (`SimilarityFilterConfig`): optional skipping of near-identical frames.
        kv_cache (`KVCacheConfig`): cached attention over earlier frames (off by default).
        acceleration (`Acceleration`, defaults to `Acceleration.AUTO`): how the UNet and VAE run
            (see :mod:`streamrt.runtime`).
        prompt_length (`int`, defaults to `0`): tokens of the prompt-embedding buffer; every prompt's token
            count must divide it (shorter prompts are repeated to fill it, which leaves attention unchanged).
            ``0``: sized when the stream is made, to the least common multiple of its prompts' token counts
            (77 for text; a long CONDITIONING has a multiple of 77).
        prompt_kv (`bool`, defaults to `True`): keep the cross-attention keys and values of the prompt, computed when
            it changes, instead of projecting the embeddings in every UNet call (the same numbers; torch UNets
            with diffusers' default attention processors only: an engine projects them itself). Costs
            ``rows * L * sum_l C_l * 4`` bytes in fp16 (SDXL: 25.6 MB per UNet row at L = 77).
        fused_qkv (`bool`, defaults to `True`): project every self-attention layer's query, key and value with one
            GEMM over a fused copy of the three weights, kept once per pipeline (about 0.6 GB for SDXL, 75 MB for
            SD1.5 in fp16), instead of three; the same numbers up to the GEMM's rounding. Same conditions as
            ``prompt_kv``. Measured in the stream (SDXL-turbo-sized, 512², 1 step, compile, H200): 10.24 -> 9.59 ms
            per frame (BENCHMARKS.md); off saves the copy's memory.
    """

    width: int = 512
    height: int = 512
    t_index_list: tuple[int, ...] = (32, 45)
    num_inference_steps: int = 50
    frames_per_step: int = 1
    cfg_type: CfgType = CfgType.SELF
    guidance_scale: float = 1.2
    delta: float = 1.0
    do_add_noise: bool = True
    seed: int = 2
    similarity_filter: SimilarityFilterConfig = field(default_factory=SimilarityFilterConfig)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)
    acceleration: Acceleration = Acceleration.AUTO
    prompt_length: int = 0
    prompt_kv: bool = True
    fused_qkv: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "t_index_list", tuple(int(t) for t in self.t_index_list))
        coerce_enums(self)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value <= 0 or value % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {value}")
        if not self.t_index_list:
            raise ValueError("t_index_list must name at least one timestep index")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        bad = [t for t in self.t_index_list if not 0 <= t < self.num_inference_steps]
        if bad:
            raise ValueError(
                f"t_index_list entries {bad} are outside the schedule: each must be in "
                f"[0, {self.num_inference_steps - 1}] for num_inference_steps={self.num_inference_steps}"
            )
        if any(b <= a for a, b in zip(self.t_index_list, self.t_index_list[1:])):
            raise ValueError(f"t_index_list must be strictly increasing (noisiest step first, no repeats), got "
                             f"{list(self.t_index_list)}")
        if self.frames_per_step < 1:
            raise ValueError(f"frames_per_step must be >= 1, got {self.frames_per_step}")
        for name in ("guidance_scale", "delta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")
        if not isinstance(self.prompt_length, int) or self.prompt_length < 0:
            raise ValueError(f"prompt_length must be a whole number >= 0, got {self.prompt_length!r}")

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """n, the number of denoising steps in flight."""
        return len(self.t_index_list)

    @property
    def batch_rows(self) -> int:
        """B = n * F, rows of the denoising batch."""
        return self.num_steps * self.frames_per_step

    @property
    def guided(self) -> bool:
        """Whether guidance is applied at all (a scale <= 1 turns every cfg_type into ``none``)."""
        return self.cfg_type is not CfgType.NONE and self.guidance_scale > 1.0

    @property
    def uncond_rows(self) -> int:
        """Negative-prompt rows placed before the B conditional rows in the UNet batch."""
        if not self.guided:
            return 0
        if self.cfg_type is CfgType.FULL:
            return self.batch_rows
        if self.cfg_type is CfgType.INITIALIZE:
            return self.frames_per_step
        return 0

    @property
    def unet_rows(self) -> int:
        """Rows of the UNet batch (what an engine or CUDA graph is built for)."""
        return self.batch_rows + self.uncond_rows

    @property
    def uses_stock_noise(self) -> bool:
        """RCFG keeps a stock noise for ``self`` and ``initialize``."""
        return self.cfg_type in (CfgType.SELF, CfgType.INITIALIZE)

    def rebuild_key(self) -> tuple:
        """Everything that needs a new stream when it changes: buffer shapes (the prompt-embedding length
        included), the captured step (what it reads: the prompt's keys and values or the embeddings, fused or
        separate projection weights), the
        similarity filter and the acceleration. The live scalars (seed,
        guidance, delta, cache window and interval) are not in it: they change in place."""
        flt = self.similarity_filter
        return (self.width, self.height, self.t_index_list, self.num_inference_steps,
                self.frames_per_step, self.cfg_type, self.guided, self.do_add_noise,
                self.kv_cache.enabled, self.kv_cache.max_frames if self.kv_cache.enabled else 0,
                (flt.enabled, flt.threshold, flt.max_skip) if flt.enabled else False, self.acceleration,
                self.prompt_length, self.prompt_kv, self.fused_qkv)

    def with_(self, **changes) -> StreamConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class StreamStage:
    """Denoising steps ``[first, end)`` of a stream of ``steps`` steps: the part one device runs in a step-parallel
    stream (docs/DESIGN.md section 12, :mod:`streamrt.stages`).

    The first stage takes the new frames (encode, fresh noise); the last one hands out the finished frames
    (decode); each stage but the last hands its oldest rows to the next stage after every call.
    """

    first: int
    end: int
    steps: int

    def __post_init__(self) -> None:
        if not 0 <= self.first < self.end <= self.steps:
            raise ValueError(f"a stage covers steps [first, end) of the {self.steps} steps, with first < end; got "
                             f"[{self.first}, {self.end})")

    @property
    def is_first(self) -> bool:
        """Whether this stage takes the new frames."""
        return self.first == 0

    @property
    def is_last(self) -> bool:
        """Whether this stage finishes frames."""
        return self.end == self.steps

    def rows(self, frames_per_step: int) -> slice:
        """This stage's rows of the whole stream's batch (B = steps * F rows, noisiest step first)."""
        return slice(self.first * frames_per_step, self.end * frames_per_step)

    def config_of(self, config: StreamConfig) -> StreamConfig:
        """The config of this stage's part of a stream with ``config``: its steps alone; ``initialize`` guidance's
        negative-prompt rows belong to the first stage (the others compute ``self``'s virtual negative from the
        stock noise they are handed), and only the first stage filters similar frames."""
        if config.num_steps != self.steps:
            raise ValueError(f"this stage belongs to a stream of {self.steps} steps, the config has {config.num_steps}")
        changes: dict = {"t_index_list": config.t_index_list[self.first:self.end]}
        if not self.is_first:
            changes["similarity_filter"] = SimilarityFilterConfig()
            if config.cfg_type is CfgType.INITIALIZE:
                changes["cfg_type"] = CfgType.SELF
        return config.with_(**changes)
