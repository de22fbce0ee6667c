"""Misuse gives clear errors, input conversions are exact, and a refused call leaves the stream intact."""

from __future__ import annotations

import pytest
import torch
from stream_helpers import NEGATIVE, assert_all_equal, frame_groups, make_config, make_frames, run_steps

from streamrt import FrameError, Stream


# ---------------------------------------------------------------- configuration errors
@pytest.mark.parametrize(("changes", "words"), [
    (dict(width=60), ["width", "multiple of 8", "60"]),
    (dict(height=100), ["height", "multiple of 8", "100"]),
    (dict(width=0), ["width", "multiple of 8"]),
    (dict(t_index_list=(20, 50)), ["t_index_list", "50", "num_inference_steps"]),
    (dict(t_index_list=(-1,)), ["t_index_list", "-1"]),
    (dict(t_index_list=(4,), num_inference_steps=4), ["t_index_list", "4"]),
    (dict(t_index_list=()), ["t_index_list"]),
    (dict(t_index_list=(35, 20)), ["t_index_list", "increasing"]),
    (dict(cfg_type="fancy"), ["fancy"]),
    (dict(frames_per_step=0), ["frames_per_step"]),
    (dict(delta=-1.0), ["delta"]),
])
def test_bad_config_is_refused(changes, words):
    with pytest.raises(ValueError) as info:
        make_config(**changes)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_schedule_too_long_for_the_scheduler(tiny_models):
    """More inference steps than the LCM scheduler's original schedule: refused with the number named."""
    with pytest.raises(ValueError, match="num_inference_steps"):
        Stream(tiny_models, make_config(num_inference_steps=60, t_index_list=(20, 35)), prompt="a cat")


def test_guidance_cannot_cross_one(tiny_models):
    stream = Stream(tiny_models, make_config(cfg_type="full"), prompt="a cat", negative_prompt=NEGATIVE)
    ref = Stream(tiny_models, make_config(cfg_type="full"), prompt="a cat", negative_prompt=NEGATIVE)
    inputs = frame_groups(3, 1, seed=1)
    stream.step(inputs[0])
    with pytest.raises(ValueError, match="guidance_scale"):
        stream.set_guidance(guidance_scale=1.0)
    assert stream.config.guidance_scale == 1.5
    assert_all_equal(run_steps(stream, inputs[1:]), run_steps(ref, inputs)[1:])


def test_bad_blends_are_refused(tiny_models):
    stream = Stream(tiny_models, make_config(), prompt="a cat")
    with pytest.raises(ValueError, match="empty"):
        stream.set_prompt([])
    with pytest.raises(ValueError, match="weights"):
        stream.set_prompt([("a cat", -1.0), ("a dog", 2.0)])
    with pytest.raises(ValueError, match="blend method"):
        stream.set_prompt([("a cat", 1.0), ("a dog", 2.0)], method="cubic")
    stream.set_prompt([("a cat", 1.0), ("a dog", 2.0)])
    with pytest.raises(ValueError, match=r"list of \(prompt, weight\) pairs"):
        stream.set_prompt([("a cat",), ("a dog", 2.0)])
    with pytest.raises(ValueError, match="weights"):
        stream.set_seed([(1, 0.0), (2, 0.0)])


# ---------------------------------------------------------------- frame errors, each followed by good calls
F = 2


def _bad_calls():
    good = make_frames(F, seed=0)
    return {
        "two channels": (lambda s: s.step(make_frames(F, seed=1, channels=2)), ["channels", "2"]),
        "five channels": (lambda s: s.step(make_frames(F, seed=1, channels=5)), ["channels", "5"]),
        "empty batch": (lambda s: s.step(torch.zeros(0, 64, 64, 3)), ["empty"]),
        "empty video": (lambda s: s.process_video(torch.zeros(0, 64, 64, 3)), ["empty"]),
        "NaN": (lambda s: s.step(torch.where(torch.rand_like(good) < 0.01, float("nan"), good)), ["NaN"]),
        "inf": (lambda s: s.step(torch.where(torch.rand_like(good) < 0.01, float("inf"), good)), ["inf"]),
        "-inf in a video": (lambda s: s.process_video(torch.cat([good, good.clamp(max=0) - float("inf")])), ["inf"]),
        "wrong size": (lambda s: s.step(make_frames(F, seed=1, size=32)), ["32x32", "64x64"]),
        "wrong aspect": (lambda s: s.step(torch.rand(F, 64, 48, 3)), ["48x64", "64x64"]),
        "too few frames": (lambda s: s.step(make_frames(1, seed=1)), ["frames_per_step=2", "1"]),
        "too many frames": (lambda s: s.step(make_frames(3, seed=1)), ["frames_per_step=2", "3"]),
        "video not divisible": (lambda s: s.process_video(make_frames(5, seed=1)), ["5", "frames_per_step=2"]),
        "rank 2": (lambda s: s.step(torch.rand(64, 64)), ["[N, H, W, C]"]),
        "NCHW": (lambda s: s.step(torch.rand(F, 3, 64, 64)), ["channels"]),
        "integers": (lambda s: s.step((good * 255).to(torch.uint8)), ["floating point"]),
        "not a tensor": (lambda s: s.step(good.numpy()), ["torch.Tensor"]),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_frames_are_refused_and_the_stream_goes_on(tiny_models, case):
    call, words = _bad_calls()[case]
    config = make_config(cfg_type="self", t_index_list=(10, 25, 40), frames_per_step=F)
    stream = Stream(tiny_models, config, prompt="a cat")
    inputs = frame_groups(4, F, seed=2)
    before = run_steps(stream, inputs[:2])
    with pytest.raises(FrameError) as info:
        call(stream)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    after = run_steps(stream, inputs[2:])
    assert stream.frames_processed == 4 * F
    untouched = Stream(tiny_models, config, prompt="a cat")
    assert_all_equal(before + after, run_steps(untouched, inputs))


def test_frame_error_is_a_value_error():
    assert issubclass(FrameError, ValueError)


# ---------------------------------------------------------------- conversions that are accepted
def _two_streams(models):
    config = make_config(cfg_type="self", frames_per_step=F)
    return Stream(models, config, prompt="a cat"), Stream(models, config, prompt="a cat")


def test_grey_frames_are_repeated_to_rgb(tiny_models):
    a, b = _two_streams(tiny_models)
    greys = [make_frames(F, seed=k, channels=1) for k in range(3)]
    assert_all_equal(run_steps(a, greys), run_steps(b, [g.repeat(1, 1, 1, 3) for g in greys]))


def test_alpha_is_dropped(tiny_models):
    a, b = _two_streams(tiny_models)
    rgba = [make_frames(F, seed=k, channels=4) for k in range(3)]
    assert_all_equal(run_steps(a, rgba), run_steps(b, [x[..., :3].contiguous() for x in rgba]))


def test_other_float_dtypes_and_a_single_hwc_frame(tiny_models):
    config = make_config(cfg_type="none", frames_per_step=1)
    a, b = Stream(tiny_models, config, prompt="a cat"), Stream(tiny_models, config, prompt="a cat")
    x = make_frames(1, seed=3)
    assert_all_equal(run_steps(a, [x.double(), x[0]]), run_steps(b, [x, x]))


def test_process_video_accepts_grey(tiny_models):
    a, b = _two_streams(tiny_models)
    grey = make_frames(4, seed=5, channels=1)
    assert torch.equal(a.process_video(grey), b.process_video(grey.expand(4, 64, 64, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_finite_check_sees_every_rgb_value_of_a_strided_frame_and_only_those(dtype):
    """NaN / inf in the RGB values of an RGBA frame (a strided view once alpha is dropped) are refused, in every
    float dtype (numpy sums float32 / float16 on the CPU, torch the others); a NaN in the dropped alpha is not."""
    from streamrt.frames import FiniteCheck, check_frames

    rgba = torch.rand(2, 16, 16, 4).to(dtype)
    rgba[1, 3, 5, 3] = float("nan")  # alpha: dropped, not checked
    check = FiniteCheck()
    frames = check_frames(rgba, width=16, height=16, frames_per_step=2, finite=check)
    assert not frames.is_contiguous() and torch.isfinite(frames).all()
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = rgba.clone()
        bad[1, 15, 15, 2] = value  # the last RGB value of the batch
        with pytest.raises(FrameError, match="NaN or infinite"):
            check_frames(bad, width=16, height=16, frames_per_step=2, finite=check)
