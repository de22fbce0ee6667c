"""Hot-path rules (docs/DESIGN.md section 4) on the CPU: the per-frame path keeps its state where it was allocated.

Two checks:

- storage: the ``data_ptr()`` of every tensor in ``stream.buffers`` (and of the schedule constants)
  never changes over many calls, including a prompt change, a seed change, a guidance / delta change and
  a reset; the result is written through the pre-allocated ``frames_out`` (and into ``out=`` when given).
- allocations: every aten op a step runs *outside the models' own code* is observed with a
  ``TorchDispatchMode``; an op whose output lives in a storage none of its inputs (including ``out=``) had
  is a fresh allocation. The stream's own math must have none. Ops that run inside the UNet / VAE / text
  encoder (a diffusers or transformers frame on the Python stack) are the models' business and are not
  counted; kernel-internal scratch space is below the dispatcher and not seen either. (This is the CPU
  stand-in for the CUDA ``memory_stats`` check, which needs a graph-captured UNet.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import diffusers
import pytest
import torch
import transformers
from stream_helpers import NEGATIVE, frame_groups, make_config, make_frames
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import streamrt
from streamrt import Stream

CFG_TYPES = ["none", "full", "self", "initialize"]


def _pointers(stream: Stream) -> dict[str, int]:
    ptrs = {f"buffers.{k}": v.data_ptr() for k, v in stream.buffers.tensors().items()}
    ptrs.update({f"schedule.{k}": v.data_ptr() for k, v in stream.schedule.__dict__.items()})
    return ptrs


@pytest.mark.parametrize("cfg_type", CFG_TYPES)
def test_state_storage_never_moves(tiny_models, cfg_type):
    config = make_config(cfg_type=cfg_type, t_index_list=(20, 35), frames_per_step=2)
    stream = Stream(tiny_models, config, prompt="a cat", negative_prompt=NEGATIVE)
    before = _pointers(stream)
    assert "buffers.embeds" in before and "buffers.frames_out" in before and "buffers.stock" in before
    inputs = frame_groups(10, 2, seed=1)
    for k, frames in enumerate(inputs):
        if k == 2:
            stream.set_prompt("a red dog", negative_prompt="ugly dark")
        if k == 4:
            stream.set_seed(11)
        if k == 5:
            stream.set_seed([(11, 0.5), (12, 0.5)], method="slerp")
        if k == 6 and config.guided:
            stream.set_guidance(guidance_scale=3.0, delta=0.5)
        if k == 7:
            stream.set_prompt([("a cat", 1.0), ("a red dog", 2.0)], method="slerp")
        if k == 8:
            stream.reset()
        stream.step(None if k == 3 else frames)
        assert _pointers(stream) == before, f"call {k}"
        assert stream.buffers.x_batch.data_ptr() == stream.buffers.unet_in[config.uncond_rows:].data_ptr()


def test_result_goes_through_frames_out(tiny_models):
    stream = Stream(tiny_models, make_config(cfg_type="self", frames_per_step=2), prompt="a cat")
    frames_out = stream.buffers.frames_out
    ptr = frames_out.data_ptr()
    result = stream.step(make_frames(2, seed=1))
    assert stream.buffers.frames_out is frames_out and frames_out.data_ptr() == ptr
    assert result.data_ptr() != ptr and torch.equal(result, frames_out)   # the caller gets a copy
    out = torch.full((2, 64, 64, 3), -1.0)
    got = stream.step(make_frames(2, seed=2), out=out)
    assert got is out and torch.equal(out, frames_out) and frames_out.data_ptr() == ptr
    assert out.min() >= 0 and out.max() <= 1


_MODEL_DIRS = tuple(str(Path(m.__file__).parent) + os.sep for m in (diffusers, transformers))


_STREAMRT_DIR = str(Path(streamrt.__file__).parent) + os.sep


def _caller() -> str | None:
    """None inside model code, else ``file:line`` of the innermost streamrt frame that ran the op."""
    frame = sys._getframe(2)
    where = None
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_MODEL_DIRS):
            return None
        if where is None and name.startswith(_STREAMRT_DIR):
            where = f"{Path(name).name}:{frame.f_lineno}"
        frame = frame.f_back
    return where or "?"


class _FreshStorageOps(TorchDispatchMode):
    """Record ops, outside model code, whose outputs do not reuse the storage of one of their inputs."""

    def __init__(self):
        super().__init__()
        self.allocating: list[str] = []
        self.seen = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        where = _caller()
        if where is None:
            return out
        self.seen += 1
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > 0 and t.untyped_storage().data_ptr() not in inputs:
                self.allocating.append(f"{where}: {func} -> {tuple(t.shape)}")
        return out


def _count_allocations(stream: Stream, calls) -> tuple[list[str], int]:
    f = stream.config.frames_per_step
    out = torch.empty(f, 64, 64, 3)
    with _FreshStorageOps() as mode:
        for frames in calls:
            stream.step(frames, out=out)
    return mode.allocating, mode.seen


def _not_input_checks(allocating: list[str]) -> list[str]:
    """Allocations other than those of input validation (which must allocate nothing either: see
    test_input_validation_allocates_nothing)."""
    return [a for a in allocating if not a.startswith("frames.py:")]


def test_allocation_probe_sees_allocations(tiny_models):
    """The probe itself works: it sees the stream's ops and flags a fresh tensor made outside the models."""
    stream = Stream(tiny_models, make_config(cfg_type="self"), prompt="a cat")
    stream.step(make_frames(1, seed=0))
    out = torch.empty(1, 64, 64, 3)
    with _FreshStorageOps() as mode:
        stream.step(None, out=out)
        assert mode.allocating == [] and mode.seen > 10
        _ = stream.buffers.stock * 2
    assert len(mode.allocating) == 1 and mode.allocating[0].startswith("?: aten.mul")


@pytest.mark.parametrize(("models_name", "cfg_type", "n", "frames_per_step"), [
    ("tiny_models", "none", 1, 1),
    ("tiny_models", "full", 3, 2),
    ("tiny_models", "self", 2, 2),
    ("tiny_models", "initialize", 3, 1),
    ("tiny_v_models", "initialize", 2, 2),
    ("tiny_taesd_models", "self", 2, 1),
])
def test_no_allocations_outside_the_models(request, models_name, cfg_type, n, frames_per_step):
    models = request.getfixturevalue(models_name)
    t_index = {1: (20,), 2: (20, 35), 3: (10, 25, 40)}[n]
    stream = Stream(models, make_config(cfg_type=cfg_type, t_index_list=t_index, frames_per_step=frames_per_step),
                    prompt="a cat", negative_prompt=NEGATIVE)
    stream.step(make_frames(frames_per_step, seed=0))                       # warm-up
    inputs = frame_groups(3, frames_per_step, seed=2) + [None]               # img2img and txt2img calls
    allocating, seen = _count_allocations(stream, inputs)
    assert seen > 10 * len(inputs)
    allocating = _not_input_checks(allocating)
    assert allocating == [], "per-frame ops outside the models allocated:\n" + "\n".join(allocating)


def test_no_allocations_across_state_changes(tiny_models):
    """Prompt (cached), seed and guidance changes between frames: still nothing allocated by the frames."""
    stream = Stream(tiny_models, make_config(cfg_type="initialize", frames_per_step=2),
                    prompt="a cat", negative_prompt=NEGATIVE)
    stream.step(make_frames(2, seed=0))
    stream.set_prompt("a red dog")
    stream.set_prompt("a cat")
    for k, frames in enumerate(frame_groups(3, 2, seed=3)):
        if k == 1:
            stream.set_prompt("a red dog")
            stream.set_seed(5)
            stream.set_guidance(guidance_scale=2.0, delta=0.7)
        allocating, _ = _count_allocations(stream, [frames])
        allocating = _not_input_checks(allocating)
        assert allocating == [], f"call {k}:\n" + "\n".join(allocating)


def test_input_validation_allocates_nothing(tiny_models):
    stream = Stream(tiny_models, make_config(cfg_type="self", frames_per_step=2), prompt="a cat")
    stream.step(make_frames(2, seed=0))
    allocating, _ = _count_allocations(stream, frame_groups(2, 2, seed=4))
    assert allocating == [], "\n".join(allocating)
