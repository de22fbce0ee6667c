"""CUDA-graph capture, in one place: the stream step, the text encoder and the benchmark all capture here.

A capture runs the function a few times on a side stream first (lazy initialisation, cuDNN autotuning,
compilation happen there, for real), then records one call into a graph. Warm-up calls change whatever
state the function writes, so the caller names the tensors to keep: they are saved before the warm-up
and written back after the capture, and the first replay sees the state as it was.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

logger = logging.getLogger(__name__)


_capture_streams: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device to record captures on (created once: captures happen at setup, one at a time
    per device)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _capture_streams.get(device)
    if stream is None:
        stream = _capture_streams[device] = torch.cuda.Stream(device)
    return stream


def capture_graph(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3,
                  preserve: Sequence[torch.Tensor] = (),
                  guard: Callable[[], AbstractContextManager] | None = None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture ``fn()`` in a CUDA graph on ``device``; returns the graph and what the captured call returned.

    Args:
        fn: the work to capture; it must allocate nothing that outlives it except through the graph's pool.
        device: the CUDA device the work runs on.
        warmup: eager calls on a side stream before the capture.
        preserve: tensors ``fn`` mutates whose values must survive the warm-up and the capture.
        guard: a context the warm-up and the recording run in (e.g. one that points writes at scratch
            memory, so large state needs no saving).

    The returned value of the captured call (e.g. an output tensor) lives in the graph's memory pool and
    is overwritten by every replay.
    """
    saved = [t.clone() for t in preserve]
    current = torch.cuda.current_stream(device)
    # on ``device`` whichever device is current in this thread: torch.cuda.graph records on the current one
    with torch.cuda.device(device), guard() if guard is not None else contextlib.nullcontext():
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # No garbage collection while recording: a collection can finalise another stream's graph or
        # buffers, and freeing them is a CUDA call that invalidates the capture (torch.cuda.graph collects
        # once itself before it starts).
        collecting = gc.isenabled()
        gc.disable()
        try:
            # torch.cuda.graph's default capture stream is made once, on the device current at its first use:
            # a capture on another device must bring a stream of its own
            with torch.cuda.graph(graph, stream=_capture_stream(device)):
                result = fn()
        finally:
            if collecting:
                gc.enable()
    for target, value in zip(preserve, saved):
        target.copy_(value)
    return graph, result


def graph_replay_ms(fn: Callable[[], Any], device: torch.device | None = None, *, replays: int = 50) -> float:
    """Median GPU time of ``fn`` captured alone in a CUDA graph (for benchmarks: no launch overhead)."""
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    graph, _ = capture_graph(fn, device, warmup=2)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
