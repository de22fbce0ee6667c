"""A sampler's settings: the stream options a host sets apart from the sampler's own few numbers.

The ComfyUI pack sets them with small settings nodes chained in front of the sampler (each node applies
its fields over what came before); :meth:`StreamSettings.stream_config` joins them with the sampler's
numbers (steps and strength or an explicit ``t_index_list``, guidance scale, seed, the frames' size) into
the :class:`~streamrt.config.StreamConfig` of the stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .config import Acceleration, CfgType, SimilarityFilterConfig, StreamConfig
from .kv_cache import KVCacheConfig
from .schedule import strength_t_index_list

#: width and height of a txt2img stream whose settings leave the size to the input (there is none)
TXT2IMG_SIZE = 512


@dataclass(frozen=True)
class StreamSettings:
    """Stream options beyond the sampler's own inputs; the defaults are what a sampler without settings runs.

    Args:
        cfg_type (`CfgType`, defaults to `CfgType.SELF`): guidance mode.
        delta (`float`, defaults to `1.0`): RCFG strength of the virtual negative.
        frames_per_step (`int`, defaults to `1`): F, frames per stream step.
        add_noise (`bool`, defaults to `True`): re-noise the latents carried to the next step.
        acceleration (`Acceleration`, defaults to `Acceleration.AUTO`): how the UNet and VAE run.
        width (`int`, defaults to `0`): stream width; 0 takes the frames' width (512 for txt2img).
        height (`int`, defaults to `0`): stream height; 0 takes the frames' height (512 for txt2img).
        schedule_length (`int`, defaults to `50`): LCM schedule length (``num_inference_steps``).
        similarity_filter (`SimilarityFilterConfig`): off unless set.
        kv_cache (`KVCacheConfig`): cached attention, off unless set.
    """

    cfg_type: CfgType = CfgType.SELF
    delta: float = 1.0
    frames_per_step: int = 1
    add_noise: bool = True
    acceleration: Acceleration = Acceleration.AUTO
    width: int = 0
    height: int = 0
    schedule_length: int = 50
    similarity_filter: SimilarityFilterConfig = field(default_factory=SimilarityFilterConfig)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)

    def __post_init__(self) -> None:
        # Checked here too (not only when the stream config is made), so the settings node with the bad
        # value is the one that reports it.
        try:
            object.__setattr__(self, "cfg_type", CfgType(self.cfg_type))
        except ValueError:
            raise ValueError(f"unknown cfg_type {self.cfg_type!r}: use none, full, self or initialize") from None
        try:
            object.__setattr__(self, "acceleration", Acceleration(self.acceleration))
        except ValueError:
            raise ValueError(f"unknown acceleration {self.acceleration!r}: use one of "
                             f"{', '.join(a.value for a in Acceleration)}") from None
        if not isinstance(self.delta, (int, float)) or not math.isfinite(self.delta) or self.delta < 0:
            raise ValueError(f"delta must be a finite number >= 0, got {self.delta!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 0 or value % 8:
                raise ValueError(f"{name} must be 0 (the input's) or a positive multiple of 8, got {value}")
        if self.frames_per_step < 1:
            raise ValueError(f"frames_per_step must be >= 1, got {self.frames_per_step}")
        if self.schedule_length < 1:
            raise ValueError(f"schedule_length must be >= 1, got {self.schedule_length}")

    def with_(self, **changes) -> StreamSettings:
        """A copy with some fields changed (validated again): how a later settings node applies its fields."""
        return replace(self, **changes)

    def stream_config(self, *, t_index_list: tuple[int, ...] | None = None, steps: int = 2, strength: float = 0.36,
                      guidance_scale: float = 1.2, seed: int = 2,
                      frame_size: tuple[int, int] | None = None) -> StreamConfig:
        """The stream config of a sampler with these settings.

        Args:
            t_index_list: explicit indices into the LCM schedule; when given, ``steps`` and ``strength`` are not
                used.
            steps, strength: the denoising steps in flight and how much each frame changes, mapped onto the
                schedule by :func:`~streamrt.schedule.strength_t_index_list`.
            guidance_scale, seed: the sampler's live scalars.
            frame_size: ``(height, width)`` of the input frames; a width or height of 0 in the settings takes
                it (512 without frames: txt2img).
        """
        if t_index_list is None:
            t_index_list = strength_t_index_list(steps, strength, self.schedule_length)
        height, width = frame_size if frame_size is not None else (TXT2IMG_SIZE, TXT2IMG_SIZE)
        return StreamConfig(
            width=self.width or width, height=self.height or height, t_index_list=t_index_list,
            num_inference_steps=self.schedule_length, frames_per_step=self.frames_per_step, cfg_type=self.cfg_type,
            guidance_scale=guidance_scale, delta=self.delta, do_add_noise=self.add_noise, seed=seed,
            similarity_filter=self.similarity_filter, kv_cache=self.kv_cache, acceleration=self.acceleration)
