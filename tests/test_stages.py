"""A step-parallel stream (issue #18, docs/DESIGN.md section 12) on the CPU: the stream's steps split into stages.

Every stage here runs on the CPU (the stages would each drive a GPU); what is checked is the split itself: the
rows each stage owns, the hand-off of the oldest rows between stages (latents re-noised to the next stage's step
and RCFG's stock noise), the noise and schedule slices, the state changes between calls. The reference is one
stream over all steps, same models, same seed: a stage's UNet runs fewer rows in its batch, which changes the
CPU kernels' arithmetic by float32 rounding at most, so the outputs agree to 1e-5 (tests/test_gpu.py runs the
stages on two GPUs). The exception is the first n - 1 outputs of a stream, which come from the empty buffer: an
all-zero latent is a degenerate UNet input (GroupNorm of a constant divides rounding noise by sqrt(eps)), so the
batch size's rounding shows there at about 1e-2; they agree to 0.05.
"""

from __future__ import annotations

import pytest
import torch
from stream_helpers import NEGATIVE, make_config, make_frames

from streamrt import Stream
from streamrt.config import StreamStage
from streamrt.kv_cache import KVCacheConfig
from streamrt.similarity import SimilarityFilterConfig
from streamrt.stages import StagedStream, plan_stages

PROMPT = "a photo of a cat"
TOLERANCE = 1e-5
FILLING = 0.05  # the outputs of the empty buffer (see the module docstring)


def _pair(models, config, devices: int = 2, **kwargs) -> tuple[Stream, StagedStream]:
    one = Stream(models, config, prompt=PROMPT, negative_prompt=NEGATIVE, **kwargs)
    staged = StagedStream([models] * devices, config, prompt=PROMPT, negative_prompt=NEGATIVE, **kwargs)
    return one, staged


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_stages_are_contiguous_and_even() -> None:
    assert plan_stages(2, 2) == [StreamStage(0, 1, 2), StreamStage(1, 2, 2)]
    assert plan_stages(3, 2) == [StreamStage(0, 2, 3), StreamStage(2, 3, 3)]
    assert plan_stages(4, 3) == [StreamStage(0, 2, 4), StreamStage(2, 3, 4), StreamStage(3, 4, 4)]
    assert plan_stages(2, 4) == [StreamStage(0, 1, 2), StreamStage(1, 2, 2)]  # more devices than steps
    assert plan_stages(1, 2) == [StreamStage(0, 1, 1)]
    with pytest.raises(ValueError, match="at least one device"):
        plan_stages(2, 0)
    with pytest.raises(ValueError, match="first < end"):
        StreamStage(1, 1, 2)


def test_a_stage_config_is_its_part_of_the_stream() -> None:
    config = make_config(t_index_list=(10, 25, 40), cfg_type="initialize",
                         similarity_filter=SimilarityFilterConfig(enabled=True))
    head, tail = StreamStage(0, 2, 3).config_of(config), StreamStage(2, 3, 3).config_of(config)
    assert head.t_index_list == (10, 25) and tail.t_index_list == (40,)
    assert head.uncond_rows == 1 and tail.uncond_rows == 0          # initialize's negative rows: the new frames'
    assert tail.uses_stock_noise and tail.guided
    assert head.similarity_filter.enabled and not tail.similarity_filter.enabled
    with pytest.raises(ValueError, match="stream of 2 steps"):
        StreamStage(0, 1, 2).config_of(config)


@pytest.mark.parametrize("frames_per_step", [1, 2])
@pytest.mark.parametrize("cfg_type", ["none", "self", "full", "initialize"])
def test_two_stages_give_one_streams_frames(tiny_models, cfg_type, frames_per_step) -> None:
    """Realtime calls, one group of F frames each: every output equals the one-stream output, the first n - 1
    (from the empty buffer) included."""
    config = make_config(cfg_type=cfg_type, t_index_list=(10, 25, 40), guidance_scale=1.4,
                         frames_per_step=frames_per_step)
    one, staged = _pair(tiny_models, config)
    assert [(s.first, s.end) for s in staged.plan] == [(0, 2), (2, 3)]
    frames = make_frames(6 * frames_per_step, seed=3)
    f = frames_per_step
    for call in range(6):
        group = frames[call * f:(call + 1) * f]
        bound = FILLING if call < staged.latency else TOLERANCE
        assert _close(staged.step(group), one.step(group)) < bound, f"call {call}"
    # the stages really split the work: each stage's UNet batch is its own steps' rows
    assert [s.buffers.unet_in.shape[0] for s in staged.stages] == [
        s.config.unet_rows for s in staged.stages]
    assert sum(s.config.batch_rows for s in staged.stages) == config.batch_rows


@pytest.mark.parametrize("steps,devices", [((20, 35), 2), ((5, 20, 35), 3), ((5, 15, 25, 40), 2)])
def test_any_number_of_stages_and_steps(tiny_models, steps, devices) -> None:
    config = make_config(t_index_list=steps, cfg_type="self")
    one, staged = _pair(tiny_models, config, devices)
    frames = make_frames(8, seed=4)
    assert _close(staged.process_video(frames), one.process_video(frames)) < TOLERANCE


def test_no_added_noise_and_txt2img(tiny_models) -> None:
    config = make_config(do_add_noise=False, cfg_type="full", guidance_scale=1.6)
    one, staged = _pair(tiny_models, config)
    assert _close(staged.txt2img(3), one.txt2img(3)) < TOLERANCE
    frames = make_frames(4, seed=5)
    assert _close(staged.process_video(frames), one.process_video(frames)) < TOLERANCE


def test_state_changes_reach_every_stage(tiny_models) -> None:
    """Seed, prompt, guidance and reset between calls give the one stream's frames; a refused prompt changes
    nothing."""
    config = make_config(t_index_list=(10, 25, 40), cfg_type="self")
    one, staged = _pair(tiny_models, config)
    frames = make_frames(12, seed=6)

    def both(index: int, filling: bool = False) -> None:
        group = frames[index:index + 1]
        assert _close(staged.step(group), one.step(group)) < (FILLING if filling else TOLERANCE), f"frame {index}"

    for i in range(3):
        both(i, filling=i < 2)
    for stream in (one, staged):
        stream.set_seed(7)
    both(3)
    for stream in (one, staged):
        stream.set_prompt("a watercolor of a dog")
    both(4)
    for stream in (one, staged):
        stream.set_guidance(2.0, 0.5)
    assert staged.config.guidance_scale == 2.0 and all(s.config.delta == 0.5 for s in staged.stages)
    both(5)
    for stream in (one, staged):
        stream.reset()
    assert staged.frames_processed == 0
    for i in range(6, 10):
        both(i, filling=i < 8)
    with pytest.raises(ValueError):
        staged.set_prompt(torch.zeros(1, 77, 3))  # not this pipeline's text width
    both(10)
    # the hand-off matters: a second stage that never takes its rows from the first one gives other frames
    broken = StagedStream([tiny_models] * 2, config, prompt="a watercolor of a dog", negative_prompt=NEGATIVE)
    broken.set_seed(7)
    broken.set_guidance(2.0, 0.5)
    broken._handoffs.clear()
    reference = Stream(tiny_models, config, prompt="a watercolor of a dog", negative_prompt=NEGATIVE)
    reference.set_seed(7)
    reference.set_guidance(2.0, 0.5)
    video = frames[:5]
    assert _close(broken.process_video(video), reference.process_video(video)) > 1e-3


def test_cached_attention_per_stage(tiny_models) -> None:
    """Each stage caches its own rows' K/V (attention reads a row's own earlier frames): no K/V crosses stages."""
    config = make_config(t_index_list=(20, 35), kv_cache=KVCacheConfig(enabled=True, max_frames=3, window=2))
    one, staged = _pair(tiny_models, config)
    frames = make_frames(7, seed=8)
    assert _close(staged.process_video(frames), one.process_video(frames)) < TOLERANCE
    for stream in (one, staged):
        stream.set_cache_window(3, 2)
    more = make_frames(5, seed=9)
    assert _close(staged.process_video(more), one.process_video(more)) < TOLERANCE


def test_similarity_filter_decides_on_the_first_stage(tiny_models) -> None:
    config = make_config(similarity_filter=SimilarityFilterConfig(enabled=True, threshold=0.5, max_skip=2))
    one, staged = _pair(tiny_models, config)
    still = make_frames(1, seed=10).repeat(6, 1, 1, 1)
    # a skipped frame repeats the last output, which here can be one of the empty buffer's
    assert _close(staged.process_video(still), one.process_video(still)) < FILLING
    assert staged.device_calls == one.device_calls < 6  # skipped the same frames


@pytest.mark.parametrize("cfg_type", ["self", "full"])
def test_controlnets_run_in_every_stage_with_their_rows_images(tiny_models, cfg_type) -> None:
    """Two ControlNets, one over all steps and one over the first third only (so the last stage never calls it):
    the staged stream's frames equal one stream's, through a live strength change and a strength of 0; the control
    images are handed on with the rows (a stage that kept taking the newest images would differ)."""
    from test_stream_controlnet import tiny_controlnet

    from streamrt.controlnet import ControlNet

    nets = [ControlNet(tiny_controlnet(tiny_models.unet, seed=5), 0.8),
            ControlNet(tiny_controlnet(tiny_models.unet, seed=6), 1.2, 0.0, 0.34)]
    config = make_config(cfg_type=cfg_type, t_index_list=(10, 25, 40), guidance_scale=1.4)
    one = Stream(tiny_models, config, prompt=PROMPT, negative_prompt=NEGATIVE,
                 controlnets=[ControlNet(n.model, n.strength, n.start, n.end) for n in nets])
    staged = StagedStream([tiny_models] * 2, config, prompt=PROMPT, negative_prompt=NEGATIVE,
                          controlnets=[nets, nets])
    assert staged.stages[1].control.active == (True, False)  # the second ControlNet's steps are all in stage 1
    frames, control_a, control_b = make_frames(8, seed=13), make_frames(8, seed=14), make_frames(8, seed=15)
    video = (frames[:6], [control_a[:6], control_b[:6]])
    assert _close(staged.process_video(video[0], control=video[1]),
                  one.process_video(video[0], control=video[1])) < TOLERANCE
    for stream in (one, staged):
        stream.set_control_strength(0, 0.0)
        stream.set_control_strength(1, 0.5)
    assert all(stage.control.units[1].net.strength == 0.5 for stage in staged.stages)
    for k in range(6, 8):
        control = [control_a[k:k + 1], control_b[k:k + 1]]
        assert _close(staged.step(frames[k:k + 1], control=control),
                      one.step(frames[k:k + 1], control=control)) < TOLERANCE
    with pytest.raises(ValueError, match="2 ControlNet"):
        staged.step(frames[:1], control=[control_a[:1]])
    # the images really travel: without their hand-off the second stage sees other control images
    broken = StagedStream([tiny_models] * 2, config, prompt=PROMPT, negative_prompt=NEGATIVE, controlnets=[nets, nets])
    broken._handoffs = [h for h in broken._handoffs if h[1].dim() != 4 or h[1].shape[1] != 3]
    reference = Stream(tiny_models, config, prompt=PROMPT, negative_prompt=NEGATIVE,
                       controlnets=[ControlNet(n.model, n.strength, n.start, n.end) for n in nets])
    assert _close(broken.process_video(video[0], control=video[1]),
                  reference.process_video(video[0], control=video[1])) > 1e-4


def test_refusals(tiny_models) -> None:
    config = make_config()
    staged = StagedStream([tiny_models] * 2, config, prompt=PROMPT)
    with pytest.raises(ValueError, match="no ControlNet"):
        staged.step(make_frames(1, seed=1), control=[make_frames(1, seed=2)])
    with pytest.raises(ValueError, match="no ControlNet"):
        staged.set_control_strength(0, 0.5)
    with pytest.raises(ValueError, match="a list of the same ControlNets each"):
        StagedStream([tiny_models] * 2, config, controlnets=[[]])
    with pytest.raises(ValueError, match="at least one device"):
        StagedStream([], config)
    with pytest.raises(ValueError, match="2 stage"):
        StagedStream([tiny_models] * 2, config, runtimes=[])
    assert staged.frames_processed == 0


def test_sessions_keep_a_staged_stream_and_refuse_what_it_cannot_run(tiny_models) -> None:
    """Through the sessions (what the sampler calls): step_devices make the owner's stream a staged one, kept
    between calls and updated in place (a ControlNet strength too); dropping step_devices makes a one-device
    stream."""
    from test_stream_controlnet import tiny_controlnet

    from streamrt.controlnet import ControlInput, ControlNet
    from streamrt.sessions import StreamRequest, StreamSessions

    sessions = StreamSessions()
    config = make_config(t_index_list=(10, 25, 40))
    request = StreamRequest(config, PROMPT, NEGATIVE, step_devices=("cpu", "cpu"))
    frames = make_frames(6, seed=11)
    reference = Stream(tiny_models, config, prompt=PROMPT, negative_prompt=NEGATIVE)
    outputs = [sessions.run("a", tiny_models, request, frames[k:k + 1])[1] for k in range(3)]
    stream = sessions.stream("a", tiny_models, request)
    assert isinstance(stream, StagedStream) and stream.models is tiny_models and len(stream.stages) == 2
    assert sessions.ran_on["a"] == ("cpu", "cpu") and stream.frames_processed == 3
    assert sessions.live_streams()["a"]["devices"] == ["cpu", "cpu"]
    for k, got in enumerate(outputs):
        assert _close(got, reference.step(frames[k:k + 1])) < (FILLING if k < 2 else TOLERANCE)
    _, video = sessions.run("a", tiny_models, StreamRequest(config, "a red dog", NEGATIVE, reset=True,
                                                            step_devices=("cpu", "cpu")), frames)
    assert sessions.stream("a", tiny_models, request) is stream  # updated in place, not rebuilt
    reference.set_prompt("a red dog")
    reference.reset()
    assert _close(video, reference.process_video(frames)) < TOLERANCE
    net = tiny_controlnet(tiny_models.unet, seed=3)
    control = make_frames(6, seed=12)

    def with_control(strength: float) -> StreamRequest:
        return StreamRequest(config, PROMPT, NEGATIVE, step_devices=("cpu", "cpu"),
                             controlnets=(ControlInput("cn", ControlNet(net, strength), control),))

    _, first = sessions.run("c", tiny_models, with_control(1.0), frames)
    controlled = sessions.stream("c", tiny_models, with_control(1.0))
    assert isinstance(controlled, StagedStream) and controlled.stages[1].control is not None
    _, second = sessions.run("c", tiny_models, with_control(0.4), frames)
    assert sessions.stream("c", tiny_models, with_control(0.4)) is controlled  # the strength changed in place
    expected = Stream(tiny_models, config, prompt=PROMPT, negative_prompt=NEGATIVE, controlnets=[ControlNet(net, 1.0)])
    assert _close(first, expected.process_video(frames, control=[control])) < TOLERANCE
    expected.set_control_strength(0, 0.4)
    assert _close(second, expected.process_video(frames, control=[control])) < TOLERANCE
    sessions.release()
    sessions.run("a", tiny_models, request, frames[:1])
    stream = sessions.stream("a", tiny_models, request)
    single = sessions.stream("a", tiny_models, StreamRequest(config, PROMPT, NEGATIVE))
    assert isinstance(single, Stream) and sessions.counts() == (0, 1)
    one_step = sessions.stream("b", tiny_models, StreamRequest(make_config(t_index_list=(30,)), PROMPT,
                                                                step_devices=("cpu", "cpu")))
    assert isinstance(one_step, Stream)  # one step: nothing to split
