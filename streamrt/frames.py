"""Checking, normalising and resizing image frames at the stream's boundary.

Frames are ``[N, H, W, C]`` float tensors in ``[0, 1]`` (the layout of video frames and of ComfyUI's
IMAGE). One channel is repeated to RGB and an alpha channel is dropped; anything else is refused.
The checks return views where they can, so nothing is copied before the stream's own staging
buffer; :func:`resize_frames` makes a new tensor only when the size changes.
"""

from __future__ import annotations

import math
import weakref

import torch

from .host_memory import host_sum


class FrameError(ValueError):
    """Input frames the stream cannot use; the message names the problem."""


#: a side shrunk below this fraction is filtered first (antialiased); milder resizes are plain bilinear
ANTIALIAS_BELOW = 0.5


def resize_frames(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``frames`` ``[N, H, W, C]`` (or ``[H, W, C]``) resized to ``width`` x ``height``, each side scaled on its own
    (no crop): bilinear, as ComfyUI's Upscale Image (bilinear), and antialiased (PIL's filter) when a side shrinks
    below half, where plain bilinear would alias. (Antialiasing costs about 5x the time on a CPU: a 640x480 webcam
    frame to 512x512 takes 3 ms without it on one core.) Frames of that size already, and frames that are not
    floating point (refused later by the checks, by name), are returned as they are.
    """
    if not isinstance(frames, torch.Tensor) or frames.dim() not in (3, 4) or not frames.dtype.is_floating_point:
        return frames
    source_height, source_width = frames.shape[-3], frames.shape[-2]
    if source_height == height and source_width == width:
        return frames
    batch = frames if frames.dim() == 4 else frames.unsqueeze(0)
    antialias = height < ANTIALIAS_BELOW * source_height or width < ANTIALIAS_BELOW * source_width
    # interpolate wants [N, C, H, W]; bilinear weights are convex, so [0, 1] stays [0, 1]
    resized = torch.nn.functional.interpolate(batch.movedim(-1, 1), size=(height, width), mode="bilinear",
                                              align_corners=False, antialias=antialias)
    resized = resized.movedim(1, -1).contiguous()
    if _finite_by_construction(frames):  # bilinear weights are convex: as finite as its input
        mark_finite(resized)
    if is_clamped(frames):  # ... and within its range
        mark_clamped(resized)
    return resized if frames.dim() == 4 else resized[0]


def as_rgb_frames(frames: torch.Tensor, *, width: int | None = None, height: int | None = None,
                  check_finite: bool = True) -> torch.Tensor:
    """Validate ``frames`` and return an ``[N, H, W, 3]`` floating view of them.

    Raises:
        FrameError: not a tensor, wrong rank, empty batch, unsupported channel count, a size that is not
            the stream's, or NaN/inf values.
    """
    if not isinstance(frames, torch.Tensor):
        raise FrameError(f"frames must be a torch.Tensor [N, H, W, C], got {type(frames).__name__}")
    if frames.dim() == 3:
        frames = frames.unsqueeze(0)
    if frames.dim() != 4:
        raise FrameError(f"frames must have shape [N, H, W, C], got {tuple(frames.shape)}")
    n, h, w, c = frames.shape
    if n == 0:
        raise FrameError("the batch of frames is empty")
    if c == 1:
        frames = frames.expand(n, h, w, 3)
    elif c == 4:
        frames = frames[..., :3]
    elif c != 3:
        raise FrameError(f"frames must have 1 (grey), 3 (RGB) or 4 (RGBA) channels, got {c} "
                         f"(shape {tuple(frames.shape)}; expected [N, H, W, C])")
    if (width is not None and w != width) or (height is not None and h != height):
        raise FrameError(f"frames are {w}x{h} but the stream is {width}x{height}; resize the frames or "
                         f"configure the stream for {w}x{h}")
    if not frames.dtype.is_floating_point:
        raise FrameError(f"frames must be floating point in [0, 1], got {frames.dtype}")
    if check_finite and not bool(torch.isfinite(frames).all()):
        raise FrameError("frames contain NaN or infinite values")
    return frames


def check_frames(frames: torch.Tensor, *, width: int, height: int, frames_per_step: int, count: int | None = None,
                 finite: FiniteCheck | None = None) -> torch.Tensor:
    """``frames`` as an ``[N, H, W, 3]`` view for a stream of ``width`` x ``height`` taking ``frames_per_step``
    frames per call, or :class:`FrameError` naming what is wrong (size, count, channels, NaN/inf).

    ``count``: exactly this many frames (one call); otherwise any multiple of ``frames_per_step`` (a video).
    """
    frames = as_rgb_frames(frames, width=width, height=height, check_finite=False)
    n = frames.shape[0]
    if count is not None and n != count:
        raise FrameError(f"one stream step takes frames_per_step={count} frames, got {n}")
    if count is None and n % frames_per_step:
        raise FrameError(f"the number of frames ({n}) must be a multiple of frames_per_step={frames_per_step}")
    (finite or FiniteCheck())(frames)
    return frames


#: storage address -> frames made from 8-bit pixels by the pack itself (:func:`mark_finite`), finite by construction.
#: Keyed by the address of the tensor's memory, so that views of it are found too (``Tensor._base`` is not kept for
#: views of inference tensors, which a stream's outputs are); while the recorded tensor lives, no other memory can
#: have its address. (A weak set of tensors cannot test membership: a tensor's ``==`` is elementwise.)
_FINITE_BY_CONSTRUCTION: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def mark_finite(frames: torch.Tensor) -> torch.Tensor:
    """Record that ``frames`` (and views of it) hold finite values by construction, e.g. 8-bit pixels divided by 255,
    so that :class:`FiniteCheck` need not sum them (0.66 ms per 512² frame on the H200 machine: BENCHMARKS.md, run D
    of the realtime graph through ComfyUI). The record goes with the tensor; its holders treat it as immutable, as
    ComfyUI does its IMAGE tensors."""
    _FINITE_BY_CONSTRUCTION[_address(frames)] = frames
    return frames


def _address(frames: torch.Tensor) -> int:
    return frames.untyped_storage().data_ptr()


def _recorded(registry: weakref.WeakValueDictionary[int, torch.Tensor], frames: torch.Tensor) -> bool:
    """Whether ``frames`` is, or is a view of, a tensor in ``registry``."""
    address = _address(frames)
    recorded = registry.get(address)
    return recorded is not None and _address(recorded) == address


def _finite_by_construction(frames: torch.Tensor) -> bool:
    return _recorded(_FINITE_BY_CONSTRUCTION, frames)


#: storage address -> frames whose values cannot lie outside [0, 1] (:func:`mark_clamped`), as
#: :data:`_FINITE_BY_CONSTRUCTION`
_CLAMPED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def mark_clamped(frames: torch.Tensor) -> torch.Tensor:
    """Record that no value of ``frames`` (or of views of it) lies outside [0, 1]: a stream's outputs, clamped on the
    device, and 8-bit pixels divided by 255. NaN is not excluded (a clamp keeps it), so this is no finiteness record;
    what it saves is clipping before a conversion to 8 bits (the stream view's preview, ``nodes/api.py``)."""
    _CLAMPED[_address(frames)] = frames
    return frames


def is_clamped(frames: torch.Tensor) -> bool:
    """Whether :func:`mark_clamped` recorded ``frames`` or the tensor it is a view of."""
    return _recorded(_CLAMPED, frames)


class FiniteCheck:
    """Refuses NaN / inf frames before they reach a stream's state, without allocating per call.

    NaN and inf survive a sum, which is written into a scalar kept per device. For frames on the CPU
    (ComfyUI's IMAGE) this never touches the GPU, and numpy sums them (:func:`streamrt.host_memory.host_sum`, not
    torch's OpenMP pool); frames already on the GPU cost one host sync. Frames the pack made from 8-bit pixels
    (:func:`mark_finite`) are not summed.
    """

    def __init__(self) -> None:
        self._totals: dict[torch.device, torch.Tensor] = {}

    def __call__(self, frames: torch.Tensor) -> None:
        if _finite_by_construction(frames):
            return
        if frames.device.type == "cpu" and frames.dtype in (torch.float32, torch.float16) and not frames.requires_grad:
            # float32 accumulation, as below; numpy reads the tensor's memory through a view
            if not math.isfinite(host_sum(frames.numpy())):
                raise FrameError("frames contain NaN or infinite values")
            return
        total = self._totals.get(frames.device)
        if total is None:
            total = self._totals[frames.device] = torch.zeros((), device=frames.device, dtype=torch.float32)
        torch.sum(frames, dim=tuple(range(frames.dim())), dtype=torch.float32, out=total)
        if not math.isfinite(float(total)):
            raise FrameError("frames contain NaN or infinite values")
