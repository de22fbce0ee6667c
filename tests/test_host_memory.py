"""Host-side copies and sums of frames (``streamrt.host_memory``): what ``Tensor.copy_`` and a float32 sum give, for
small tensors on the calling thread and for large ones cut into slabs over the pack's host threads."""

from __future__ import annotations

import threading

import pytest
import torch

from streamrt import host_memory
from streamrt.frames import FiniteCheck, FrameError, check_frames
from streamrt.host_memory import SLAB_BYTES, host_copy, host_sum, slabs

#: [rows, H, W, 3] float32 sizes: a small frame (one slab) and a batch of four 512² frames (several slabs with two
#: or more workers)
SMALL, LARGE = (2, 8, 8, 3), (4, 512, 512, 3)


def _sources(shape):
    rows, height, width, _ = shape
    rgba = torch.rand(rows, height, width, 4)
    return {"strided (alpha dropped)": rgba[..., :3], "one frame for every row": torch.rand(1, height, width, 3),
            "float16": torch.rand(shape).half(), "bfloat16 (torch's copy)": torch.rand(shape).bfloat16(),
            "plain": torch.rand(shape)}


@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["small", "large"])
def test_host_copy_writes_what_copy_writes(shape):
    dest = torch.empty(shape)
    for what, src in _sources(shape).items():
        expected = torch.empty_like(dest).copy_(src)
        dest.fill_(-1)
        host_copy(dest, src)
        assert torch.equal(dest, expected), what


def test_slabs_cover_the_array_once_along_a_long_enough_axis():
    assert slabs(SMALL, 4 * 2 * 8 * 8 * 3, workers=4) == [()]  # small: the calling thread alone
    frame = 4 * 512 * 512 * 3
    assert slabs((1, 512, 512, 3), frame, workers=4) == [()]  # one 512² frame: the calling thread alone
    for shape in ((1, 1024, 1024, 3), (4, 512, 512, 3)):  # a single frame is cut along its height
        parts = slabs(shape, frame * 4, workers=4)
        assert 2 <= len(parts) <= 4
        marks = torch.zeros(shape, dtype=torch.int32)
        for part in parts:
            marks[part] += 1
        assert torch.equal(marks, torch.ones_like(marks))
    assert all(len(p) == 2 for p in slabs((1, 1024, 1024, 3), frame * 4, workers=4))  # axis 1: (all, rows of H)
    assert len(slabs((60, 512, 512, 3), SLAB_BYTES * 2, workers=8)) == 2  # never below a slab's size


def test_large_copies_and_sums_run_on_several_threads_when_there_are_workers(monkeypatch):
    """With workers to spare, a large copy and sum use the pool as well as the calling thread."""
    monkeypatch.setattr(host_memory, "WORKERS", 3)
    monkeypatch.setattr(host_memory, "_pool", None)
    seen = set()
    real_copyto = host_memory.np.copyto

    def recording_copyto(*args, **kwargs):
        seen.add(threading.get_ident())
        return real_copyto(*args, **kwargs)

    monkeypatch.setattr(host_memory.np, "copyto", recording_copyto)
    src, dest = torch.rand(LARGE), torch.empty(LARGE)
    host_copy(dest, src)
    assert torch.equal(dest, src) and len(seen) >= 2


@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["small", "large"])
def test_host_sum_is_a_float32_sum_that_nan_and_inf_survive(shape, monkeypatch):
    monkeypatch.setattr(host_memory, "WORKERS", 3)
    monkeypatch.setattr(host_memory, "_pool", None)
    frames = torch.rand(shape)
    assert host_sum(frames.numpy()) == pytest.approx(float(frames.double().sum()), rel=1e-4)
    for value in (float("nan"), float("inf"), float("-inf")):
        for where in ((0, 0, 0, 0), (-1, -1, -1, -1)):  # the first slab and the last
            bad = frames.clone()
            bad[where] = value
            total = host_sum(bad.numpy())
            assert total != total or abs(total) == float("inf"), (value, where)


def test_the_finite_check_of_a_large_video_sees_a_nan_in_its_last_frame(monkeypatch):
    monkeypatch.setattr(host_memory, "WORKERS", 3)
    monkeypatch.setattr(host_memory, "_pool", None)
    video = torch.rand(LARGE)
    check_frames(video, width=512, height=512, frames_per_step=1, finite=FiniteCheck())
    video[-1, -1, -1, -1] = float("nan")
    with pytest.raises(FrameError, match="NaN or infinite"):
        check_frames(video, width=512, height=512, frames_per_step=1, finite=FiniteCheck())
