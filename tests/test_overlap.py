"""Overlapped realtime calls (``Stream.step(overlap=True)``, Stream Settings' ``overlap_executions``) on the CPU.

An overlapped call hands over the previous call's frames and leaves its own device work running. What must hold
whatever the device: the outputs are the plain stream's outputs one call later (the first one twice), the
stream's state is exactly the plain stream's (an overlapped stream and a plain one fed the same frames go on to
the same video), and whatever cannot be handed over later (a reset, a video, the similarity filter, a plain call)
drops the pending frames and answers with its own. tests/test_gpu.py checks the same on CUDA, where the hand-over
really overlaps, with zero allocations per call.
"""

from __future__ import annotations

import pytest
import torch
from stream_helpers import assert_all_equal, frame_groups, make_config, make_frames, run_steps

from streamrt import SimilarityFilterConfig, Stream, StreamRequest, StreamSessions, StreamSettings
from streamrt.stages import StagedStream


def overlapped(stream: Stream, groups) -> list[torch.Tensor]:
    """Feed each group to ``stream.step(overlap=True)``; the outputs, cloned."""
    return [stream.step(g, overlap=True).clone() for g in groups]


@pytest.mark.parametrize("frames_per_step", [1, 2])
def test_overlapped_outputs_are_the_plain_streams_one_call_later(tiny_models, frames_per_step):
    config = make_config(frames_per_step=frames_per_step)
    inputs = frame_groups(6, frames_per_step, seed=4)
    plain = run_steps(Stream(tiny_models, config, prompt="a cat"), inputs)
    stream = Stream(tiny_models, config, prompt="a cat")
    got = overlapped(stream, inputs)
    assert_all_equal(got, [plain[0]] + plain[:-1])
    assert not torch.equal(plain[2], plain[3])  # the shift is visible: consecutive outputs differ
    assert stream.overlapped  # its last frames wait for the next call
    stream.step(inputs[0])
    assert not stream.overlapped


def test_overlapped_txt2img_is_shifted_too(tiny_models):
    config = make_config()
    plain = run_steps(Stream(tiny_models, config, prompt="a cat"), [None] * 4)
    assert_all_equal(overlapped(Stream(tiny_models, config, prompt="a cat"), [None] * 4), [plain[0]] + plain[:-1])


def test_overlap_leaves_the_stream_state_as_the_plain_stream_has_it(tiny_models):
    """After overlapped calls, a video continues exactly as on a stream that ran the same frames plainly; the frames
    still pending when the video starts are dropped (they belong before it)."""
    config = make_config()
    inputs = frame_groups(3, 1, seed=5)
    video = make_frames(4, seed=6)
    plain = Stream(tiny_models, config, prompt="a cat")
    run_steps(plain, inputs)
    stream = Stream(tiny_models, config, prompt="a cat")
    overlapped(stream, inputs)
    assert torch.equal(stream.process_video(video), plain.process_video(video))
    # the pipeline refills after the video: the next overlapped call answers with its own frames
    more = frame_groups(2, 1, seed=7)
    expected = run_steps(plain, more)
    assert_all_equal(overlapped(stream, more), [expected[0], expected[0]])


def test_a_plain_call_or_a_reset_answers_with_its_own_frames(tiny_models):
    config = make_config()
    inputs = frame_groups(6, 1, seed=8)
    plain = Stream(tiny_models, config, prompt="a cat")
    expected = run_steps(plain, inputs[:4])
    stream = Stream(tiny_models, config, prompt="a cat")
    overlapped(stream, inputs[:2])
    assert torch.equal(stream.step(inputs[2]), expected[2])  # a plain call: its own frames, the pending ones dropped
    assert torch.equal(stream.step(inputs[3], overlap=True), expected[3])  # refilling: its own again
    plain.reset()
    stream.reset()
    after = run_steps(plain, inputs[4:])
    assert_all_equal(overlapped(stream, inputs[4:]), [after[0], after[0]])


def test_with_the_similarity_filter_each_call_answers_with_its_own_frames(tiny_models):
    config = make_config(similarity_filter=SimilarityFilterConfig(True, threshold=0.98, max_skip=3))
    still = make_frames(1, seed=9)
    inputs = [still, still, make_frames(1, seed=10), still]
    plain = run_steps(Stream(tiny_models, config, prompt="a cat"), inputs)
    stream = Stream(tiny_models, config, prompt="a cat")
    assert_all_equal(overlapped(stream, inputs), plain)
    assert not stream.overlapped  # what the sampler's status reports: this stream does not overlap


def test_the_frames_handed_over_twice_are_separate_tensors(tiny_models):
    stream = Stream(tiny_models, make_config(), prompt="a cat")
    first = stream.step(make_frames(1, seed=11), overlap=True)
    kept = first.clone()
    with torch.inference_mode():  # a node downstream that writes into its input must not change the next frames
        first.zero_()
    assert torch.equal(stream.step(make_frames(1, seed=12), overlap=True), kept)


def test_sessions_run_overlapped_calls_for_a_request_that_asks(tiny_models):
    config = make_config()
    inputs = frame_groups(4, 1, seed=13)
    sessions = StreamSessions()
    expected = [sessions.run("plain", tiny_models, StreamRequest(config, "a cat"), g)[1].clone() for g in inputs]
    got = [sessions.run("overlap", tiny_models, StreamRequest(config, "a cat", overlap=True), g)[1].clone()
           for g in inputs]
    assert_all_equal(got, [expected[0]] + expected[:-1])
    # a video through the same owner is aligned as always
    video = make_frames(3, seed=14)
    _, plain_video = sessions.run("plain", tiny_models, StreamRequest(config, "a cat"), video)
    _, overlap_video = sessions.run("overlap", tiny_models, StreamRequest(config, "a cat", overlap=True), video)
    assert torch.equal(overlap_video, plain_video)


def test_settings_carry_the_option_and_default_to_off():
    assert StreamSettings().overlap_executions is False
    assert StreamSettings().with_(overlap_executions=True).overlap_executions is True


def test_a_stream_split_into_stages_overlaps_the_same_way(tiny_models):
    """A step-parallel stream (streamrt.stages, here both stages on the CPU): overlapped calls hand over its own
    plain outputs one call later, and a reset drops the pending frames."""
    config = make_config()
    inputs = frame_groups(5, 1, seed=15)
    plain = run_steps(StagedStream([tiny_models] * 2, config, prompt="a cat"), inputs)
    staged = StagedStream([tiny_models] * 2, config, prompt="a cat")
    assert_all_equal(overlapped(staged, inputs), [plain[0]] + plain[:-1])
    staged.reset()
    again = run_steps(StagedStream([tiny_models] * 2, config, prompt="a cat"), inputs[:2])
    assert_all_equal(overlapped(staged, inputs[:2]), [again[0], again[0]])


def test_a_controlnet_stream_overlaps_the_same_way(tiny_models):
    """With a ControlNet each call stages its control image with its frames: overlapped, the outputs are still the
    plain stream's one call later."""
    from test_stream_controlnet import tiny_controlnet

    from streamrt.controlnet import ControlNet

    net = tiny_controlnet(tiny_models.unet, seed=3)
    config = make_config()
    inputs = frame_groups(4, 1, seed=16)
    controls = frame_groups(4, 1, seed=17)

    def stream() -> Stream:
        return Stream(tiny_models, config, prompt="a cat", controlnets=[ControlNet(net, 1.0)])

    plain_stream, overlapped_stream = stream(), stream()
    plain = [plain_stream.step(g, control=[c]).clone() for g, c in zip(inputs, controls)]
    got = [overlapped_stream.step(g, control=[c], overlap=True).clone() for g, c in zip(inputs, controls)]
    assert_all_equal(got, [plain[0]] + plain[:-1])
