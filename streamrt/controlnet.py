"""ControlNets inside the stream (docs/DESIGN.md section 10): control images that move with the stream batch, and
residuals computed inside the captured step.

Row i of the stream batch holds an older frame at a later denoising step, so it must be conditioned on *that*
frame's control image. :class:`ControlState` keeps, per ControlNet, a pre-allocated ring of control images laid
out like the UNet's rows (negative rows first, then the batch): every call the batch rows move down by F, the
newest F control images enter at the top, and the negative rows copy the batch rows they mirror, exactly as the
latents and RCFG's stock noise move. Strength is a live per-row scale (no recapture to change it); a ControlNet
whose strength is 0 is not called at all, so a stream whose ControlNets are all at 0 runs the plain step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import StreamConfig
from .frames import FiniteCheck, FrameError, as_rgb_frames

logger = logging.getLogger(__name__)


def residual_levels(config: Any) -> list[tuple[int, int]]:
    """``(channels, downsampling factor)`` of each ControlNet residual of a UNet's or ControlNet's architecture
    (``config``: its diffusers config): the down path's skip connections in diffusers' order (the ``conv_in``
    output, one per resnet layer of each block, one per downsampler), then the mid block's. A ControlNet made for
    a UNet has the same ones, which is what lets its residuals be added to that UNet's skips."""
    channels = list(config.block_out_channels)
    layers = config.layers_per_block
    layers = [int(layers)] * len(channels) if isinstance(layers, int) else [int(n) for n in layers]
    levels: list[tuple[int, int]] = [(channels[0], 1)]
    for i, (width, count) in enumerate(zip(channels, layers)):
        levels += [(width, 2 ** i)] * count
        if i < len(channels) - 1:  # every block but the last ends with a downsampler
            levels.append((width, 2 ** (i + 1)))
    levels.append((channels[-1], 2 ** (len(channels) - 1)))  # the mid block
    return levels


def check_strength(strength: float) -> float:
    """``strength`` as a float, or a ValueError when it is not a finite number (NaN would reach every frame)."""
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"ControlNet strength must be a finite number, got {strength!r}")
    return float(strength)


@dataclass(eq=False)
class ControlNet:
    """One ControlNet of a stream.

    Args:
        model: a diffusers ``ControlNetModel`` on the pipeline's device and dtype (shared, never modified).
        strength (`float`, defaults to `1.0`): scale of its residuals; live (see :meth:`ControlState.set_strength`).
        start (`float`, defaults to `0.0`), end (`float`, defaults to `1.0`): the part of the stream's denoising
            steps it applies to, as fractions: step k of n (0 is the noisiest) applies when ``start <= k / n < end``
            (ComfyUI's Apply ControlNet start/end percent over the stream's few steps).
        negative (`bool`, defaults to `True`): it also conditions the negative-prompt rows (``full`` and
            ``initialize`` guidance). ComfyUI's Apply ControlNet (Advanced) puts a ControlNet on both conditionings;
            the older Apply ControlNet on the positive one only, and ComfyUI then runs the negative without it.
    """

    model: Any
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    negative: bool = True

    def __post_init__(self) -> None:
        check_strength(self.strength)
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"ControlNet start/end must satisfy 0 <= start < end <= 1, got {self.start}/{self.end}")


@dataclass(eq=False)
class ControlInput:
    """One ControlNet as a host asks for it on one call (see :class:`streamrt.sessions.StreamRequest`).

    Args:
        key: what identifies the ControlNet's weights (a stream is rebuilt when the set of keys changes).
        net (`ControlNet`): the model and its strength, start and end (strength is applied live; start/end
            changes rebuild).
        image (`torch.Tensor`): its control images ``[N or 1, H, W, 3]`` in [0, 1] for this call's frames.
    """

    key: Any
    net: ControlNet
    image: torch.Tensor

    @property
    def rebuild_key(self) -> tuple:
        return self.key, self.net.start, self.net.end, self.net.negative


@dataclass(eq=False)
class ControlResiduals:
    """What the UNet call adds to its skip connections this call (set inside the step, read by the UNet call)."""

    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self.down is not None

    def torch_kwargs(self) -> dict[str, Any]:
        """diffusers' keyword arguments for the residuals (empty when no ControlNet ran)."""
        if self.down is None:
            return {}
        return {"down_block_additional_residuals": self.down, "mid_block_additional_residual": self.mid}


class TorchControlNet:
    """One ControlNet's call on torch: the diffusers module, or a compiled copy of it (see
    :meth:`streamrt.runtime.Runtime.controlnet`). ``call(sample, timesteps, embeds, cond, scale, added_cond_kwargs)
    -> (down residuals, mid residual)``, the residuals already multiplied by ``scale`` (one value per UNet row)."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, cond: torch.Tensor,
                 scale: torch.Tensor, added_cond_kwargs: dict | None) -> tuple[Sequence[torch.Tensor], torch.Tensor]:
        kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
        return self.module(sample, timesteps, encoder_hidden_states=embeds, controlnet_cond=cond,
                           conditioning_scale=scale, return_dict=False, **kwargs)


@dataclass(eq=False)
class _Unit:
    net: ControlNet
    call: Any                  # the ControlNet's call (TorchControlNet or an engine's), made by the runtime
    ring: torch.Tensor         # [U + B, 3, H, W] model dtype: each UNet row's control image, in [0, 1]
    staging: torch.Tensor      # [F, H, W, 3] f32: the caller's newest control images
    scratch: torch.Tensor      # [B - F, 3, H, W] (or empty) for the in-place shift
    steps: torch.Tensor        # [U + B, 1, 1, 1] model dtype: 1 on the rows it applies to (step in range), else 0
    scale: torch.Tensor        # [U + B, 1, 1, 1] model dtype: strength * steps (live)
    in_range: bool             # it applies to some row
    host: Any                  # HostIO of its own: its uploads never wait on the frames' pinned buffers
    ring_in: torch.Tensor | None = None  # [F, 3, H, W]: a later stage's newest rows, handed on by the stage before


def check_control_images(images: Sequence[torch.Tensor], count: int, *, width: int, height: int,
                         finite: FiniteCheck | None = None) -> list[torch.Tensor]:
    """The control batches as ``[count or 1, height, width, 3]`` views, or a :class:`~streamrt.frames.FrameError`
    naming the control image and the problem: what :func:`~streamrt.frames.as_rgb_frames` refuses for frames (not an
    IMAGE batch, another size, NaN / inf), or another frame count (a single image is used for every frame)."""
    out = []
    for i, image in enumerate(images):
        try:
            image = as_rgb_frames(image, width=width, height=height, check_finite=False)
        except FrameError as exc:
            raise FrameError(f"control image {i + 1}: {exc}") from None
        if image.shape[0] not in (1, count):
            raise FrameError(f"control image {i + 1} has {image.shape[0]} frames for {count} input frames: "
                             "give one per frame, or a single image for all")
        try:
            (finite or FiniteCheck())(image)
        except FrameError as exc:
            raise FrameError(f"control image {i + 1}: {exc}") from None
        out.append(image)
    return out


@dataclass(eq=False)
class ControlState:
    """The control images and scales of one stream's ControlNets, allocated once per config."""

    config: StreamConfig
    units: list[_Unit] = field(default_factory=list)
    residuals: ControlResiduals = field(default_factory=ControlResiduals)
    finite: FiniteCheck = field(default_factory=FiniteCheck)

    @classmethod
    def allocate(cls, nets: Sequence[ControlNet], config: StreamConfig, *, device: torch.device,
                 dtype: torch.dtype, calls: Sequence[Any] | None = None, first_step: int = 0,
                 steps: int | None = None) -> ControlState:
        """Zeroed rings and staging for ``nets`` (the rows follow ``config``: negative rows first); ``calls``: how
        each is called (default: its module on torch, :class:`TorchControlNet`). A stage of a step-parallel stream
        (``config`` its part) gives where its steps start among the whole stream's ``steps``: a ControlNet's
        ``[start, end)`` is a fraction of those, and a later stage takes its newest rows from the stage before."""
        if calls is None:
            calls = [TorchControlNet(net.model) for net in nets]
        from .runtime.host_io import HostIO  # here: the runtime package imports this module

        f, b, u = config.frames_per_step, config.batch_rows, config.uncond_rows
        n = config.num_steps if steps is None else steps
        h, w = config.height, config.width
        step_of_row = torch.arange(b) // f + first_step  # batch row r is at step r // F (of its stage)
        if u == b:
            step_of_row = torch.cat([step_of_row, step_of_row])
        elif u:
            step_of_row = torch.cat([step_of_row[:f], step_of_row])
        negative_row = torch.arange(u + b) < u
        state = cls(config)
        for net, call in zip(nets, calls, strict=True):
            fraction = step_of_row.float() / n
            in_range = (fraction >= net.start) & (fraction < net.end) & (net.negative | ~negative_row)
            applies = in_range.to(dtype).view(-1, 1, 1, 1).to(device)
            unit = _Unit(net=net, call=call, ring=torch.zeros(u + b, 3, h, w, device=device, dtype=dtype),
                         staging=torch.zeros(f, h, w, 3, device=device, dtype=torch.float32),
                         scratch=torch.zeros(b - f, 3, h, w, device=device, dtype=dtype),
                         steps=applies, scale=applies * net.strength, in_range=bool(in_range.any()),
                         host=HostIO((f, h, w, 3), device, download=False),
                         ring_in=torch.zeros(f, 3, h, w, device=device, dtype=dtype) if first_step else None)
            state.units.append(unit)
        return state

    def __len__(self) -> int:
        return len(self.units)

    @property
    def active(self) -> tuple[bool, ...]:
        """Which ControlNets run (strength not 0 and some row in range): part of the step's graph variant."""
        return tuple(unit.net.strength != 0 and unit.in_range for unit in self.units)

    def set_strength(self, index: int, strength: float) -> None:
        """Change one ControlNet's strength in place (0 stops calling it)."""
        unit = self.units[index]
        strength = check_strength(strength)
        if strength == unit.net.strength:
            return
        unit.net.strength = strength
        torch.mul(unit.steps, float(strength), out=unit.scale)  # in place: a captured step reads the new scale

    def check_images(self, images: Sequence[torch.Tensor] | None, count: int) -> list[torch.Tensor]:
        """One ``[count or 1, H, W, 3]`` control batch in [0, 1] per ControlNet (see :func:`check_control_images`)."""
        if images is None or len(images) != len(self.units):
            given = 0 if images is None else len(images)
            raise ValueError(f"this stream has {len(self.units)} ControlNet(s) and was given {given} control "
                             "image batch(es): give one per ControlNet")
        return check_control_images(images, count, width=self.config.width, height=self.config.height,
                                    finite=self.finite)

    def stage(self, images: Sequence[torch.Tensor]) -> None:
        """Put the newest F control images (one ``[F or 1, H, W, 3]`` batch per ControlNet; one image is used for all
        F) into the staging buffers, each through its own pinned host buffers (as the frames go through theirs)."""
        for unit, image in zip(self.units, images):
            unit.host.upload(image, unit.staging)  # a single image is broadcast by the copy: no expanded tensor

    def advance(self) -> None:
        """Move each ring with the stream batch and take in the staged images (inside the captured step)."""
        cfg = self.config
        f, b, u = cfg.frames_per_step, cfg.batch_rows, cfg.uncond_rows
        for unit in self.units:
            batch = unit.ring[u:]
            if b > f:
                unit.scratch.copy_(batch[:-f])
                batch[f:].copy_(unit.scratch)
            batch[:f].copy_(unit.staging.permute(0, 3, 1, 2) if unit.ring_in is None else unit.ring_in)
            if u == b:
                unit.ring[:u].copy_(batch)
            elif u:
                unit.ring[:u].copy_(batch[:f])

    def compute(self, active: tuple[bool, ...], sample: torch.Tensor, timesteps: torch.Tensor,
                embeds: torch.Tensor, added_cond_kwargs: dict | None) -> None:
        """Run the active ControlNets on this call's UNet inputs and sum their scaled residuals into
        :attr:`residuals` (none active: no residuals, the plain UNet call)."""
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for unit, on in zip(self.units, active):
            if not on:
                continue
            d, m = unit.call(sample, timesteps, embeds, unit.ring, unit.scale, added_cond_kwargs)
            if down is None:
                down, mid = list(d), m
            else:  # in place into the first ControlNet's outputs (this call's, rewritten every call): no new ones
                for total, part in zip(down, d):
                    total.add_(part)
                mid.add_(m)
        self.residuals.down, self.residuals.mid = down, mid

    def reset(self) -> None:
        """Forget the control images of earlier frames (with the stream's latents)."""
        for unit in self.units:
            unit.ring.zero_()
            if unit.ring_in is not None:
                unit.ring_in.zero_()

    @property
    def rings(self) -> tuple[torch.Tensor, ...]:
        """The state a capture's warm-up must leave as it found it."""
        return tuple(unit.ring for unit in self.units)

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for unit in self.units
                   for t in (unit.ring, unit.staging, unit.scratch, unit.steps, unit.scale, unit.ring_in)
                   if t is not None)
