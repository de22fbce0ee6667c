"""A batch video over several streams (issue #18, docs/DESIGN.md section 11), on the CPU.

The streams here share the CPU (one thread each, as they would each drive a GPU); the chunking, the pre-roll, the
stitching in order, progress and stopping are what the GPU run uses unchanged (tests/test_gpu.py runs it on two
GPUs where there are two). Exactness is checked against one stream over the whole clip, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from stream_helpers import NEGATIVE, make_config, make_frames
from test_stream_controlnet import tiny_controlnet

from streamrt import Stream
from streamrt.controlnet import ControlNet
from streamrt.kv_cache import KVCacheConfig
from streamrt.parallel import Chunk, plan_chunks, preroll_frames, process_video_parallel, replicate


def _streams(models, config, count: int, **kwargs) -> list[Stream]:
    return [Stream(models, config, prompt="a photo of a cat", negative_prompt=NEGATIVE, **kwargs)
            for _ in range(count)]


def test_chunks_are_contiguous_even_groups_with_preroll() -> None:
    assert plan_chunks(10, 3) == [Chunk(0, 4), Chunk(4, 7), Chunk(7, 10)]
    assert plan_chunks(12, 2, frames_per_step=4) == [Chunk(0, 8), Chunk(8, 12)]
    assert plan_chunks(12, 2, frames_per_step=2, preroll=4) == [Chunk(0, 6), Chunk(6, 12, 4)]
    assert plan_chunks(10, 2, preroll=8) == [Chunk(0, 5), Chunk(5, 10, 5)]  # no frames before the clip
    assert plan_chunks(2, 4) == [Chunk(0, 1), Chunk(1, 2)]                 # more workers than frames
    assert plan_chunks(3, 1) == [Chunk(0, 3)]
    with pytest.raises(ValueError, match="multiple of frames_per_step=4"):
        plan_chunks(10, 2, frames_per_step=4)
    with pytest.raises(ValueError, match="at least one worker"):
        plan_chunks(10, 0)


def test_preroll_only_where_a_frame_depends_on_earlier_ones() -> None:
    assert preroll_frames(make_config(cfg_type="self", t_index_list=(10, 25, 40))) == 0
    kv = make_config(t_index_list=(20, 35), kv_cache=KVCacheConfig(enabled=True, max_frames=3, window=3, interval=2))
    assert preroll_frames(kv) == 3 * 2 + 2
    assert preroll_frames(kv.with_(frames_per_step=2)) == 2 * (3 * 2 + 2)


@pytest.mark.parametrize("frames_per_step", [1, 2])
@pytest.mark.parametrize("cfg_type", ["none", "self", "full", "initialize"])
def test_split_video_equals_one_stream_bit_for_bit(tiny_models, cfg_type, frames_per_step) -> None:
    """Three streams, each a contiguous chunk, give exactly one stream's output (a frame's output depends on that
    frame alone: fixed noise per row, independent rows, stock noise moving with its frame)."""
    config = make_config(cfg_type=cfg_type, t_index_list=(10, 25, 40), guidance_scale=1.4,
                         frames_per_step=frames_per_step)
    frames = make_frames(10 * frames_per_step, seed=3)
    expected = _streams(tiny_models, config, 1)[0].process_video(frames)
    got = process_video_parallel(_streams(tiny_models, config, 3), frames)
    assert torch.equal(got, expected)
    # the chunks are really different work: a stream that ran one chunk holds another state than the others
    shuffled = process_video_parallel(_streams(tiny_models, config, 3), frames.flip(0))
    assert not torch.equal(shuffled, expected)
    assert torch.equal(shuffled, expected.flip(0)) or frames_per_step > 1  # per-frame outputs, any order


def test_cached_attention_is_prerolled_and_close_to_one_stream(tiny_models) -> None:
    """With cached attention each chunk is pre-rolled until its K/V ring holds frames of the clip: the stitched
    output stays within a small tolerance of one stream's, much closer than chunks started cold."""
    config = make_config(cfg_type="self", t_index_list=(20, 35),
                         kv_cache=KVCacheConfig(enabled=True, max_frames=2, window=2))
    frames = make_frames(16, seed=5)
    frames = (frames[:1] * 0.7 + frames * 0.3)  # a clip: consecutive frames alike
    expected = _streams(tiny_models, config, 1)[0].process_video(frames)
    got = process_video_parallel(_streams(tiny_models, config, 2), frames)
    cold = torch.cat([s.process_video(frames[a:b]) for s, (a, b) in
                      zip(_streams(tiny_models, config, 2), ((0, 8), (8, 16)))])
    torch.testing.assert_close(got[:8], expected[:8], rtol=0, atol=0)  # the first chunk is one stream's start
    prerolled, started_cold = (got - expected).abs().max().item(), (cold - expected).abs().max().item()
    assert prerolled < 2e-2, prerolled
    assert prerolled < started_cold / 2, (prerolled, started_cold)


def test_control_frames_go_with_their_chunk(tiny_models) -> None:
    net = tiny_controlnet(tiny_models.unet, seed=1)
    config = make_config(cfg_type="self", t_index_list=(10, 25, 40))
    frames, control = make_frames(8, seed=6), make_frames(8, seed=7)
    expected = _streams(tiny_models, config, 1, controlnets=[ControlNet(net, 0.9)])[0].process_video(
        frames, control=[control])
    streams = _streams(tiny_models, config, 2, controlnets=[ControlNet(net, 0.9)])
    assert torch.equal(process_video_parallel(streams, frames, control=[control]), expected)
    one = _streams(tiny_models, config, 1, controlnets=[ControlNet(net, 0.9)])[0].process_video(
        frames, control=[control[:1]])
    assert torch.equal(process_video_parallel(streams, frames, control=[control[:1]]), one)


def test_progress_and_previews_follow_the_video_and_a_raise_stops_every_worker(tiny_models) -> None:
    config = make_config(cfg_type="none", t_index_list=(20, 35))
    frames = make_frames(12, seed=8)
    streams = _streams(tiny_models, config, 2)
    streams[0].process_video(frames[:2])  # buffers made in inference mode, then a split video (as a warm-up does)
    streams[0].reset()
    seen: list[tuple[int, int]] = []
    shown: list[torch.Tensor] = []
    out = process_video_parallel(streams, frames, progress=lambda done, total: seen.append((done, total)),
                                 preview=lambda finished: shown.append(finished.clone()), poll_s=0.001)
    assert seen[-1] == (12, 12) and all(t == 12 for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # previews: the clip's first frames as they finish (in order, never more than the first chunk), then all
    assert torch.equal(shown[-1], out) and len(shown) >= 2
    assert all(0 < p.shape[0] <= 6 and torch.equal(p, out[:p.shape[0]]) for p in shown[:-1])

    class Interrupted(Exception):
        pass

    def interrupt(done: int, total: int) -> None:
        if done:
            raise Interrupted

    with pytest.raises(Interrupted):
        process_video_parallel(streams, frames, progress=interrupt, poll_s=0.001)
    # the streams stay usable: the next video is the same as before
    assert torch.equal(process_video_parallel(streams, frames), out)


def test_bad_input_is_refused_before_any_work(tiny_models) -> None:
    config = make_config(cfg_type="none", t_index_list=(20, 35))
    streams = _streams(tiny_models, config, 2)
    with pytest.raises(ValueError, match="share one config"):
        process_video_parallel([streams[0], _streams(tiny_models, config.with_(seed=9), 1)[0]], make_frames(4, 1))
    nan = make_frames(4, seed=2)
    nan[2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        process_video_parallel(streams, nan)
    with pytest.raises(ValueError, match="no ControlNet"):
        process_video_parallel(streams, make_frames(4, 1), control=[make_frames(4, 2)])
    with pytest.raises(ValueError, match="at least one stream"):
        process_video_parallel([], make_frames(4, 1))


def test_replicate_keeps_models_already_on_the_device(tiny_models) -> None:
    assert replicate(tiny_models, "cpu") is tiny_models


def test_devices_from_a_users_text() -> None:
    from streamrt.parallel import parse_devices

    assert parse_devices("all", gpus=2) == ("cuda:0", "cuda:1")
    assert parse_devices("all", gpus=1) == () and parse_devices("", gpus=0) == ()  # one GPU: nothing to split
    assert parse_devices("0, 1", gpus=2) == ("cuda:0", "cuda:1")
    assert parse_devices("cuda:1,cuda", gpus=2) == ("cuda:1", "cuda:0")
    assert parse_devices("cpu, cpu", gpus=0) == ("cpu", "cpu")
    with pytest.raises(ValueError, match=r"'cuda:2' does not exist here \(2 CUDA GPU"):
        parse_devices("cuda:0, cuda:2", gpus=2)
    with pytest.raises(ValueError, match="'gpu0' is not a device"):
        parse_devices("gpu0", gpus=2)
    with pytest.raises(ValueError, match="meta device"):
        parse_devices("meta", gpus=2)
    from streamrt import StreamSettings

    assert StreamSettings(video_devices=("cpu", "cpu")).video_devices == ("cpu", "cpu")
    with pytest.raises(ValueError, match="'cuda:99' does not exist here"):  # the core's settings check it too
        StreamSettings(video_devices=("cpu", "cuda:99"))


def test_sessions_split_a_video_over_the_requested_devices(tiny_models) -> None:
    """A host's batch video with ``video_devices``: one stream per device entry (here two on the CPU), kept across
    calls, the frames equal the owner's single stream; one frame per call runs on the owner's stream alone; with a
    ControlNet the control frames go with their chunks."""
    from streamrt.controlnet import ControlInput
    from streamrt.sessions import StreamRequest, StreamSessions

    sessions = StreamSessions()
    config = make_config(cfg_type="self", t_index_list=(10, 25, 40))
    frames = make_frames(9, seed=12)
    single, expected = StreamSessions().run("owner", tiny_models, StreamRequest(config, "a cat"), frames)
    request = StreamRequest(config, "a cat", video_devices=("cpu", "cpu"))
    stream, got = sessions.run("owner", tiny_models, request, frames)
    assert torch.equal(got, expected)
    assert sessions.counts() == (0, 2)  # the owner's stream and one more
    assert sessions.ran_on["owner"] == ("cpu", "cpu")
    again, got_again = sessions.run("owner", tiny_models, request, frames)
    assert again is stream and torch.equal(got_again, expected)
    _, one = sessions.run("owner", tiny_models, request, frames[:1])  # realtime: the owner's stream only
    assert one.shape[0] == 1 and sessions.counts() == (0, 2) and sessions.ran_on["owner"] == ("cpu",)
    net = tiny_controlnet(tiny_models.unet, seed=2)
    controls = (ControlInput("cn", ControlNet(net, 0.9), make_frames(9, seed=13)),)
    _, with_one = StreamSessions().run("owner", tiny_models, StreamRequest(config, "a cat", controlnets=controls),
                                       frames)
    _, with_two = sessions.run("owner", tiny_models, StreamRequest(config, "a cat", video_devices=("cpu", "cpu"),
                                                                   controlnets=controls), frames)
    assert torch.equal(with_two, with_one) and not torch.equal(with_two, expected)
