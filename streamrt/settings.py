"""A sampler's settings: the stream options a host sets apart from the sampler's own few numbers.

The ComfyUI pack sets them with small settings nodes chained in front of the sampler (each node applies
its fields over what came before); :meth:`StreamSettings.stream_config` joins them with the sampler's
numbers (steps and strength or an explicit ``t_index_list``, guidance scale, seed, the frames' size) into
the :class:`~streamrt.config.StreamConfig` of the stream, and :meth:`StreamSettings.fit_frames` resizes the
input frames to the size the settings set. :meth:`StreamSettings.shapes_config` gives the shapes of that stream
ahead of time (what engines are built for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .config import Acceleration, CfgType, SimilarityFilterConfig, StreamConfig, coerce_enums
from .frames import FrameError, resize_frames
from .kv_cache import KVCacheConfig
from .schedule import strength_t_index_list

#: width and height of a txt2img stream whose settings leave the size to the input (there is none)
TXT2IMG_SIZE = 512
#: a stream's width and height are multiples of this (the VAE's downscale factor)
SIZE_MULTIPLE = 8


def _multiple_below(value: int) -> int:
    return max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)


@dataclass(frozen=True)
class StreamSettings:
    """Stream options beyond the sampler's own inputs; the defaults are what a sampler without settings runs.

    Args:
        cfg_type (`CfgType`, defaults to `CfgType.SELF`): guidance mode.
        delta (`float`, defaults to `1.0`): RCFG strength of the virtual negative.
        frames_per_step (`int`, defaults to `1`): F, frames per stream step.
        add_noise (`bool`, defaults to `True`): re-noise the latents carried to the next step.
        acceleration (`Acceleration`, defaults to `Acceleration.AUTO`): how the UNet and VAE run.
        width (`int`, defaults to `0`): stream width; the input frames are resized to it. 0 takes the frames'
            width (which must then be a multiple of 8; 512 for txt2img).
        height (`int`, defaults to `0`): stream height, likewise.
        schedule_length (`int`, defaults to `50`): LCM schedule length (``num_inference_steps``).
        similarity_filter (`SimilarityFilterConfig`): off unless set.
        kv_cache (`KVCacheConfig`): cached attention, off unless set.
        video_devices (`tuple[str, ...]`, defaults to `()`): the devices a batch video is split over, one stream
            each (see :mod:`streamrt.parallel`); empty: the pipeline's device alone.
        step_devices (`tuple[str, ...]`, defaults to `()`): the devices one stream's denoising steps are split over
            (see :mod:`streamrt.stages`); empty: the pipeline's device alone.
        fused_projections (`bool`, defaults to `True`): ``StreamConfig.fused_qkv``: faster torch UNet calls for a
            fused copy of the self-attention projection weights (about 0.6 GB for SDXL, 75 MB for SD1.5 in fp16).
        overlap_executions (`bool`, defaults to `False`): a realtime call (one step's frames) hands over the frames
            of the call before it and returns while its own GPU work runs on (``StreamRequest.overlap``): the host's
            work between calls overlaps the GPU's, at one call more latency.
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
    video_devices: tuple[str, ...] = ()
    step_devices: tuple[str, ...] = ()
    fused_projections: bool = True
    overlap_executions: bool = False

    def __post_init__(self) -> None:
        # Checked here too (not only when the stream config is made), so the settings node with the bad
        # value is the one that reports it.
        coerce_enums(self)
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
        for name in ("video_devices", "step_devices"):
            if getattr(self, name):  # devices that exist here, by name (the same check as the Stream Devices node's)
                from .parallel import parse_devices

                object.__setattr__(self, name, parse_devices(",".join(getattr(self, name))))

    def with_(self, **changes) -> StreamSettings:
        """A copy with some fields changed (validated again): how a later settings node applies its fields."""
        return replace(self, **changes)

    def stream_size(self, frame_size: tuple[int, int] | None) -> tuple[int, int]:
        """``(height, width)`` of the stream for input frames of ``frame_size`` ``(height, width)`` (None: txt2img):
        the settings' width and height, or the frames' where the settings leave them at 0.

        Raises:
            FrameError: a side taken from the frames that is not a multiple of 8; the message names the frames'
                size and the fix (a width and height in the settings, which resize the input).
        """
        height, width = frame_size if frame_size is not None else (TXT2IMG_SIZE, TXT2IMG_SIZE)
        size = (self.height or height, self.width or width)
        if any(value % SIZE_MULTIPLE for value in size):
            raise FrameError(
                f"the input frames are {width}x{height}, and a stream's width and height must be multiples of "
                f"{SIZE_MULTIPLE}: set width and height in the stream settings to resize the input (e.g. "
                f"{_multiple_below(size[1])}x{_multiple_below(size[0])})")
        return size

    def fit_frames(self, frames: torch.Tensor | None) -> torch.Tensor | None:
        """The input frames ``[N, H, W, C]`` at the stream's size: resized to the settings' width and height where
        they set them (0 keeps the frames' side); as they are otherwise (see :func:`~streamrt.frames.resize_frames`).
        """
        if frames is None or not isinstance(frames, torch.Tensor) or frames.dim() != 4:
            return frames
        if not (self.width or self.height):
            return frames
        height, width = self.height or int(frames.shape[1]), self.width or int(frames.shape[2])
        return resize_frames(frames, width, height)

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
                it (512 without frames: txt2img). See :meth:`stream_size`.
        """
        if t_index_list is None:
            t_index_list = strength_t_index_list(steps, strength, self.schedule_length)
        height, width = self.stream_size(frame_size)
        return StreamConfig(
            width=width, height=height, t_index_list=t_index_list,
            num_inference_steps=self.schedule_length, frames_per_step=self.frames_per_step, cfg_type=self.cfg_type,
            guidance_scale=guidance_scale, delta=self.delta, do_add_noise=self.add_noise, seed=seed,
            similarity_filter=self.similarity_filter, kv_cache=self.kv_cache, acceleration=self.acceleration,
            fused_qkv=self.fused_projections)

    def shapes_config(self, *, steps: int, width: int = 0, height: int = 0) -> StreamConfig:
        """A config with the shapes of a sampler's stream with these settings and ``steps`` denoising steps (or
        indices in its ``t_index_list``), for what is built ahead of the stream (engines): its batch rows (frames
        per step, cfg type, with guidance on unless the cfg type is ``none``) and its size.

        The size is the settings' width and height; ``width`` / ``height`` give the input's where the settings
        take it (0). Either may be given where both agree.

        Raises:
            ValueError: no size for a side, or a size that differs from the settings' (the sampler resizes its
                input to the settings' size, so anything built for another size would not be used).
        """
        if steps < 1 or steps > self.schedule_length:
            raise ValueError(f"steps must be in [1, {self.schedule_length}] (the schedule length), got {steps}")
        size = {}
        for name, given in (("width", width), ("height", height)):
            own = getattr(self, name)
            if own and given and own != given:
                raise ValueError(f"{name} {given} differs from the settings' {name} {own}: the sampler resizes its "
                                 f"input to {own}, so set 0 here (the settings' size is used)")
            if not (own or given):
                raise ValueError(f"no {name}: the settings take the input's {name} (0), so give the {name} of the "
                                 f"frames the sampler gets, or set a {name} in the settings (the sampler then "
                                 "resizes its input to it)")
            size[name] = own or given
            if size[name] % SIZE_MULTIPLE:
                raise ValueError(f"{name} must be a multiple of {SIZE_MULTIPLE}, got {size[name]}")
        guided = self.cfg_type is not CfgType.NONE
        return StreamConfig(
            width=size["width"], height=size["height"], t_index_list=tuple(range(steps)),
            num_inference_steps=self.schedule_length, frames_per_step=self.frames_per_step, cfg_type=self.cfg_type,
            guidance_scale=1.2 if guided else 1.0, delta=self.delta, do_add_noise=self.add_noise,
            similarity_filter=self.similarity_filter, kv_cache=self.kv_cache, acceleration=self.acceleration)
