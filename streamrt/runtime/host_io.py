"""Frames between the host and the device: pinned staging for uploads, a pinned drain for downloads.

ComfyUI hands frames over as pageable CPU tensors and keeps the results it gets. A copy from pageable
memory makes the GPU queue drain before it starts; through pinned memory it is an asynchronous DMA.
:class:`HostIO` keeps two pinned buffers per direction, used in turn, each with the event of the copy
that last used it: a buffer is reused two calls later, by which time its copy has long finished, so the
wait is immediate and the copy overlaps the GPU's work on the other frame.

A realtime call may also hand its frames over one call later (:meth:`HostIO.start_handover`,
:meth:`HostIO.hand_over`): the copy to the host is queued behind the call's GPU work and waited for only when the
next call asks for it, so the host does not wait for the GPU in between (docs/DESIGN.md section 4).

Copies between host buffers go through :func:`streamrt.host_memory.host_copy` (numpy, large ones over a few
threads of the pack's own, not torch's OpenMP pool: docs/DESIGN.md section 4).
"""

from __future__ import annotations

import torch

from ..host_memory import host_copy


class PinnedPair:
    """Two pinned host buffers of one shape, used in turn, each guarded by the event of its last copy."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
        self.buffers = [torch.empty(shape, dtype=dtype, pin_memory=True) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)]
        self._slot = 0

    def take(self) -> int:
        """The next buffer's index, once the copy that last used it has finished."""
        slot = self._slot
        self._slot ^= 1
        self.events[slot].synchronize()
        return slot


class HostIO:
    """Upload and download of ``[F, H, W, 3]`` float32 frames for one stream on ``device``.

    On a CPU device every method is a plain copy. ``download=False``: an upload-only staging (a ControlNet's
    control images), without the download buffers.
    """

    def __init__(self, shape: tuple[int, ...], device: torch.device, *, download: bool = True) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._up = PinnedPair(shape) if self.pinned else None
        self._down = PinnedPair(shape) if self.pinned and download else None
        self._pending: tuple[int, torch.Tensor] | None = None
        self._handover_events = [torch.cuda.Event() for _ in range(2)] if self.pinned else None
        self._handover_slot = 0

    def _stream(self) -> torch.cuda.Stream:
        """The stream the copies to and from this device run on (its current stream, whichever device is
        current in the calling thread)."""
        return torch.cuda.current_stream(self.device)

    def upload(self, frames: torch.Tensor, dest: torch.Tensor) -> None:
        """Copy ``frames`` (any device, any memory) into the device buffer ``dest`` without stalling the GPU;
        ``frames`` may be anything that broadcasts to ``dest`` (one image for every row), with no copy made
        to expand it."""
        if self._up is None or frames.device.type != "cpu" or frames.is_pinned():
            dest.copy_(frames, non_blocking=True)
            return
        slot = self._up.take()
        host_copy(self._up.buffers[slot], frames)
        dest.copy_(self._up.buffers[slot], non_blocking=True)
        self._up.events[slot].record(self._stream())

    def download(self, src: torch.Tensor, out: torch.Tensor | None = None, *, synchronize: bool = True) -> torch.Tensor:
        """``src`` into ``out`` or a new CPU tensor (pinned on CUDA); with ``synchronize`` the copy is done
        when this returns. Later work on the stream is ordered after the copy, so ``src`` may be overwritten."""
        if out is None:
            out = torch.empty(src.shape, dtype=src.dtype, pin_memory=self.pinned)
        out.copy_(src, non_blocking=True)
        if synchronize and self.pinned and out.device.type == "cpu":
            torch.cuda.current_stream(self.device).synchronize()
        return out

    def start_handover(self, src: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Queue a copy of ``src`` into a new CPU tensor (pinned on CUDA) behind the work on the stream, without
        waiting for it; :meth:`hand_over` with the returned token gives the tensor once that copy has finished.

        Tokens are handed over in the order they were started, at most one outstanding: the event of a token is
        recorded again two starts later.
        """
        out = self.download(src, synchronize=False)
        slot = self._handover_slot
        if self._handover_events is not None:
            self._handover_slot ^= 1
            self._handover_events[slot].record(self._stream())
        return out, slot

    def hand_over(self, token: tuple[torch.Tensor, int]) -> torch.Tensor:
        """The tensor of a :meth:`start_handover` token, its copy finished (only that copy: the work queued on the
        stream after it runs on)."""
        out, slot = token
        if self._handover_events is not None:
            self._handover_events[slot].synchronize()
        return out

    def drain(self, src: torch.Tensor, dest: torch.Tensor) -> None:
        """Start copying ``src`` towards the CPU tensor ``dest`` and finish the previous drain.

        Frame k's copy into ordinary memory happens while the GPU computes frame k + 1. Call
        :meth:`flush` after the last frame.
        """
        if self._down is None:
            dest.copy_(src)
            return
        slot = self._down.take()
        self._down.buffers[slot].copy_(src, non_blocking=True)
        self._down.events[slot].record(self._stream())
        previous, self._pending = self._pending, (slot, dest)
        if previous is not None:
            self._finish(*previous)

    def flush(self) -> None:
        """Finish the last :meth:`drain`."""
        if self._pending is not None:
            self._finish(*self._pending)
            self._pending = None

    def _finish(self, slot: int, dest: torch.Tensor) -> None:
        self._down.events[slot].synchronize()  # that frame's copy, not the work queued after it
        host_copy(dest, self._down.buffers[slot])
