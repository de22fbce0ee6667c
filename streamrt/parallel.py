"""A batch video split over several devices (docs/DESIGN.md section 11).

One stream per device, each on its own copy of the pipeline (:func:`replicate`), runs one contiguous chunk of the
clip; the outputs are stitched in order, aligned with the input as :meth:`Stream.process_video` aligns them.

Why a chunk can start anywhere: a frame's output depends on that frame alone, not on its neighbours, in every
configuration without cached attention or the similarity filter. The noise of a stream row is fixed (drawn once
from the seed), each frame goes through the same rows at the same steps whatever came before it, the rows of the
UNet batch do not interact (no batch statistics), and RCFG's stock noise moves with its frame. So a chunk needs
no pre-roll and the stitched output equals one stream's, bit for bit on the same device type. Cached attention
attends to the K/V of earlier frames, which depend on theirs in turn: a chunk is pre-rolled on the frames before
it until its K/V ring holds only frames of the clip (:func:`preroll_frames`), and its output then differs from
one stream's by what attention to slightly different K/V changes. The similarity filter compares a frame with
the one before it (pre-rolled for that) and skips at random, from a generator whose position depends on the
frames that came before: its decisions near a chunk's start may differ from one stream's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import StreamConfig
from .models import StreamModels

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    """Frames ``[start, end)`` of a clip, run after ``preroll`` frames before ``start`` (outputs of those dropped)."""

    start: int
    end: int
    preroll: int = 0

    @property
    def first(self) -> int:
        """The first frame the chunk's stream runs."""
        return self.start - self.preroll


def preroll_frames(config: StreamConfig) -> int:
    """Frames a chunk's stream runs before its first kept frame (a multiple of ``frames_per_step``): 0 where a
    frame's output depends on that frame alone; with cached attention, enough calls to refill the K/V ring with
    frames of the clip; with the similarity filter, one group (the frame it compares with)."""
    f = config.frames_per_step
    calls = 0
    if config.kv_cache.enabled:
        calls = max(calls, config.kv_cache.max_frames * config.kv_cache.interval + config.num_steps)
    if config.similarity_filter.enabled:
        calls = max(calls, 1)
    return calls * f


def even_parts(total: int, parts: int) -> list[int]:
    """The sizes of ``min(parts, total)`` contiguous parts of ``total`` whole units, as even as they go (the
    earlier parts take the extra units); at least one part."""
    count = max(1, min(parts, total))
    return [total // count + (index < total % count) for index in range(count)]


def plan_chunks(total: int, workers: int, *, frames_per_step: int = 1, preroll: int = 0) -> list[Chunk]:
    """Contiguous chunks of ``total`` frames for up to ``workers`` streams, as even as whole groups of
    ``frames_per_step`` allow (fewer chunks than workers for a short clip); each chunk but the first is pre-rolled
    on up to ``preroll`` frames before it."""
    if workers < 1:
        raise ValueError(f"need at least one worker, got {workers}")
    if total % frames_per_step:
        raise ValueError(f"{total} frames are not a multiple of frames_per_step={frames_per_step}")
    chunks, start = [], 0
    for groups in even_parts(total // frames_per_step, workers):
        size = groups * frames_per_step
        chunks.append(Chunk(start, start + size, min(preroll, start)))
        start += size
    return chunks


def replicate(models: StreamModels, device: torch.device | str) -> StreamModels:
    """A copy of ``models`` on ``device`` (same weights, dtype and identity), or ``models`` itself when it is
    already there. Compiled copies and engines are per copy: each device compiles or loads its own."""
    device = torch.device(device)
    if models.device == device:
        return models
    modules = {name: getattr(models, name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    copies = {name: None if m is None else copy.deepcopy(m).to(device) for name, m in modules.items()}
    return StreamModels(**copies, tokenizer=models.tokenizer, tokenizer_2=models.tokenizer_2,
                        scheduler=copy.deepcopy(models.scheduler), identity=dict(models.identity))


def parse_devices(text: str, gpus: int | None = None) -> tuple[str, ...]:
    """The devices a batch video is split over, from a user's text: ``"all"`` (every CUDA GPU; none, i.e. the
    pipeline's device alone, with fewer than two) or a comma list such as ``"cuda:0, cuda:1"`` or ``"0,1"`` (GPU
    indices); ``"cpu"`` entries are allowed (tests). ``gpus``: how many CUDA GPUs there are (default: torch's
    count). Raises ValueError naming an entry that is not a device or a GPU that does not exist."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    text = text.strip().lower()
    if text in ("", "all"):
        return tuple(f"cuda:{i}" for i in range(gpus)) if gpus > 1 else ()
    devices = []
    for entry in (e.strip() for e in text.split(",")):
        name = f"cuda:{entry}" if entry.isdigit() else entry
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise ValueError(f"devices: {entry!r} is not a device (use 'all', GPU indices such as '0,1', or "
                             "names such as 'cuda:0, cuda:1')") from None
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"devices: {entry!r} is a {device.type} device; a stream runs on cuda or cpu")
        if device.type == "cuda":
            index = 0 if device.index is None else device.index
            if index >= gpus:
                raise ValueError(f"devices: {entry!r} does not exist here ({gpus} CUDA GPU(s): "
                                 f"{', '.join(f'cuda:{i}' for i in range(gpus)) or 'none'})")
            name = f"cuda:{index}"
        devices.append(name)
    return tuple(devices)


ProgressCallback = Callable[[int, int], None]


@torch.inference_mode()
def process_video_parallel(streams: Sequence, frames: torch.Tensor, *, progress: ProgressCallback | None = None,
                           preview: Callable[[torch.Tensor], None] | None = None,
                           control: Sequence[torch.Tensor] | None = None, poll_s: float = 0.05) -> torch.Tensor:
    """Run ``frames`` ``[N, H, W, 3]`` through ``streams`` (one per device, same config, prompt and seed), one
    contiguous chunk each, and return the N outputs aligned with the input, as one stream's ``process_video``.

    Each stream runs in a thread of its own (a CUDA graph replay or an engine call releases the GIL while the
    device works). A stream that has never run is first run once on the clip's first frames in this thread (where
    it captures or compiles, one stream at a time) and reset.
    ``progress(done, total)`` is called from this thread with the frames finished on all devices and may raise
    to stop: every worker then stops after its current group and the exception propagates; the streams stay
    usable. A worker's error stops the others the same way. ``preview(finished)``, also from this thread, gets the
    first chunk's output frames finished so far while the video runs (the clip's first frames, in order), then all
    N at the end. ``control``: per ControlNet, ``[N, ...]`` control frames (sliced with the frames) or a single
    image for all.
    """
    if not streams:
        raise ValueError("process_video_parallel needs at least one stream")
    config = streams[0].config
    for stream in streams[1:]:
        if stream.config != config:
            raise ValueError("the streams of a parallel video must share one config")
    frames = streams[0].check_frames(frames)
    total = frames.shape[0]
    control = streams[0].check_control(control, total)
    chunks = plan_chunks(total, len(streams), frames_per_step=config.frames_per_step,
                         preroll=preroll_frames(config))
    if len(chunks) == 1:
        return streams[0].process_video(frames, progress=progress, preview=preview, control=control, validated=True)

    f = config.frames_per_step
    for stream in streams[:len(chunks)]:
        if stream.device_calls == 0:  # capture / compile here, one stream at a time, then start it afresh
            stream.step(frames[:f], validated=True,
                        control=None if control is None else [c[:f] if c.shape[0] > 1 else c for c in control])
            stream.reset()
    result = torch.empty((total, config.height, config.width, 3), dtype=torch.float32)
    done = [0] * len(chunks)
    first_finished: list[torch.Tensor | None] = [None]  # the first chunk's finished outputs (no pre-roll there)
    errors: list[BaseException | None] = [None] * len(chunks)
    stop = threading.Event()

    class _Stopped(Exception):
        pass

    def work(index: int, stream, chunk: Chunk) -> None:
        def report(finished: int, _total: int) -> None:
            done[index] = max(0, finished - chunk.preroll)
            if stop.is_set():
                raise _Stopped

        try:
            part = frames[chunk.first:chunk.end]
            parts = None if control is None else [c if c.shape[0] == 1 else c[chunk.first:chunk.end]
                                                  for c in control]
            on_device = torch.cuda.device(stream.device) if stream.device.type == "cuda" else contextlib.nullcontext()
            shown = (lambda finished: first_finished.__setitem__(0, finished)) if index == 0 else None
            with on_device, torch.inference_mode():  # inference mode is per thread
                out = stream.process_video(part, progress=report, preview=shown, control=parts, validated=True)
                result[chunk.start:chunk.end] = out[chunk.preroll:]
        except BaseException as exc:  # handed to the caller's thread
            errors[index] = exc
            stop.set()

    threads = [threading.Thread(target=work, args=(i, s, c), name=f"streamrt-video-{i}", daemon=True)
               for i, (s, c) in enumerate(zip(streams, chunks))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    shown = 0
    try:
        while any(t.is_alive() for t in threads):
            next(t for t in threads if t.is_alive()).join(poll_s)
            if progress is not None and not stop.is_set():
                progress(min(sum(done), total), total)
            finished = first_finished[0]
            if preview is not None and finished is not None and finished.shape[0] > shown and not stop.is_set():
                shown = finished.shape[0]
                preview(finished)
    except BaseException:
        stop.set()
        for thread in threads:
            thread.join()
        raise
    for thread in threads:
        thread.join()
    failures = [e for e in errors if e is not None and not isinstance(e, _Stopped)]
    if failures:
        raise failures[0]
    if progress is not None:
        progress(total, total)
    if preview is not None:
        preview(result)
    logger.debug("parallel video: %d frames over %d streams in %.3f s", total, len(chunks),
                 time.perf_counter() - started)
    return result

