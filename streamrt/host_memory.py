"""Host-side work on frames: copies and sums of CPU tensors, split over a few threads of the pack's own.

Every frame crosses host memory twice per call (into the pinned upload buffer, out of the pinned drain) and is
summed once (the NaN / inf check); a 512² float32 frame is 3 MB, a video a gigabyte. torch would split such work
over its OpenMP pool, whose threads keep spinning after each op and, inside ComfyUI on a GPU machine, competed with
the server's own threads (H200 machine, 16 cores: the realtime graph's step took 12.0 ms with the pool, 7.1 ms with
one thread; BENCHMARKS.md). On the calling thread alone the same work is slow where nothing competes: in the
benchmark on that machine a 300-frame 512² video's fixed cost, mostly that check, grew from 11 to 129 ms, and a
4-frame realtime call's host time beyond the step from 0.7 to 2.4 ms.

So large copies and sums are cut into slabs that numpy runs on a small pool of ordinary threads (numpy releases
the GIL for them), the calling thread taking one slab. Those threads wait on a queue, not in a spin loop, so they
cost nothing between calls. Small tensors stay on the calling thread (docs/DESIGN.md section 4).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

#: Below this many bytes per slab a copy or sum stays on the calling thread: a 512² float32 frame (3 MB), what a
#: realtime call moves, does (on the H200 machine its realtime call took 0.95 ms of host time beyond the step with
#: 1 MB slabs, 0.49 ms on the calling thread alone); 4-frame calls and videos are split.
SLAB_BYTES = 4 << 20
#: Threads that share one copy or sum, the calling thread included.
WORKERS = max(1, min(4, os.cpu_count() or 1))

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, WORKERS - 1), thread_name_prefix="streamrt-host")
        return _pool


def slabs(shape: tuple[int, ...], nbytes: int, workers: int | None = None) -> list[tuple[slice, ...]]:
    """Index tuples that cut an array of ``shape`` (``nbytes`` in all) into up to ``workers`` (default
    :data:`WORKERS`) slabs of at least :data:`SLAB_BYTES` each, along its first axis that is long enough; one slab
    (everything) when it is small."""
    parts = min(WORKERS if workers is None else workers, nbytes // SLAB_BYTES)
    if parts < 2:
        return [()]
    for axis, length in enumerate(shape):
        if length >= parts:
            edges = np.linspace(0, length, parts + 1).astype(int)
            lead = (slice(None),) * axis
            return [lead + (slice(int(a), int(b)),) for a, b in zip(edges[:-1], edges[1:])]
    return [()]


def _each(work: Callable[[tuple[slice, ...]], object], parts: list[tuple[slice, ...]]) -> list:
    """``work(part)`` for every part: the first on this thread, the rest on the pool; results in order."""
    if len(parts) == 1:
        return [work(parts[0])]
    futures = [_threads().submit(work, part) for part in parts[1:]]
    first = work(parts[0])
    return [first] + [future.result() for future in futures]


def host_copy(dest: torch.Tensor, src: torch.Tensor) -> None:
    """``dest[...] = src`` for two CPU tensors (``src`` may broadcast to ``dest``), through numpy, large ones split
    over the pack's host threads; dtypes numpy lacks (bfloat16) take torch's copy."""
    try:
        target, source = dest.numpy(), src.numpy()
    except (TypeError, RuntimeError):  # no numpy view of this dtype, or of a tensor that needs grad
        dest.copy_(src)
        return
    parts = slabs(target.shape, target.nbytes)
    if len(parts) > 1:
        source = np.broadcast_to(source, target.shape)  # a view: one image for every row stays one image
    _each(lambda part: np.copyto(target[part], source[part], casting="same_kind"), parts)


def host_sum(array: np.ndarray) -> float:
    """The sum of ``array`` accumulated in float32 (NaN and inf survive it), large arrays split over the pack's host
    threads."""
    parts = slabs(array.shape, array.nbytes)
    sums = _each(lambda part: np.add.reduce(array[part], axis=None, dtype=np.float32), parts)
    return float(sum(float(s) for s in sums))
