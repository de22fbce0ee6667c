"""Stream state: independence of streams, reset, aligned video runs, seed / prompt changes, the prompt cache."""

from __future__ import annotations

import math

import pytest
import torch
from stream_helpers import NEGATIVE, any_differs, assert_all_equal, frame_groups, make_config, make_frames, run_steps

from streamrt import Stream
from streamrt.prompts import seeded_noise

CFG_TYPES = ["none", "full", "self", "initialize"]


def test_interleaved_streams_match_streams_run_alone(tiny_models):
    cfg_a = make_config(cfg_type="self", t_index_list=(20, 35), frames_per_step=1, seed=3)
    cfg_b = make_config(cfg_type="full", t_index_list=(10, 25, 40), frames_per_step=2, seed=4)
    in_a, in_b = frame_groups(6, 1, seed=1), frame_groups(6, 2, seed=2)
    alone_a = run_steps(Stream(tiny_models, cfg_a, prompt="a cat"), in_a)
    alone_b = run_steps(Stream(tiny_models, cfg_b, prompt="a dog", negative_prompt=NEGATIVE), in_b)

    a = Stream(tiny_models, cfg_a, prompt="a cat")
    b = Stream(tiny_models, cfg_b, prompt="a dog", negative_prompt=NEGATIVE)
    got_a, got_b = [], []
    for xa, xb in zip(in_a, in_b):
        got_a.append(a.step(xa).clone())
        got_b.append(b.step(xb).clone())
    assert_all_equal(got_a, alone_a)
    assert_all_equal(got_b, alone_b)


@pytest.mark.parametrize("cfg_type", CFG_TYPES)
def test_reset_replays_bit_for_bit(tiny_models, cfg_type):
    stream = Stream(tiny_models, make_config(cfg_type=cfg_type, t_index_list=(10, 25, 40), frames_per_step=2),
                    prompt="a cat", negative_prompt=NEGATIVE)
    inputs = frame_groups(5, 2, seed=3)
    first = run_steps(stream, inputs)
    assert stream.frames_processed == 10
    stream.reset()
    assert stream.frames_processed == 0
    assert_all_equal(run_steps(stream, inputs), first)


def _stepwise_video(stream: Stream, frames: torch.Tensor) -> torch.Tensor:
    """What process_video promises, spelled out with single steps: feed the groups, repeat the last one
    ``latency`` times, drop the first ``latency`` outputs."""
    f, lag = stream.config.frames_per_step, stream.latency
    groups = list(frames.split(f))
    outs = run_steps(stream, groups + [groups[-1]] * lag)
    return torch.cat(outs[lag:])


@pytest.mark.parametrize(("n", "frames_per_step"), [(1, 2), (2, 1), (3, 1), (3, 2)])
def test_process_video_is_aligned(tiny_models, n, frames_per_step):
    t_index = {1: (20,), 2: (20, 35), 3: (10, 25, 40)}[n]
    config = make_config(cfg_type="self", t_index_list=t_index, frames_per_step=frames_per_step)
    video = make_frames(4 * frames_per_step, seed=20 + n)
    stream = Stream(tiny_models, config, prompt="a cat")
    assert stream.latency == n - 1
    calls = []
    result = stream.process_video(video, progress=lambda done, total: calls.append((done, total)))
    assert result.shape == video.shape and result.dtype == torch.float32
    expected = _stepwise_video(Stream(tiny_models, config, prompt="a cat"), video)
    assert torch.equal(result, expected)
    assert calls == [((k + 1) * frames_per_step, video.shape[0]) for k in range(4)]


def test_process_video_previews_finished_frames(tiny_models):
    """preview(finished) gets the output frames finished so far, in order, before each progress call (what a
    host shows while a video runs), and all of them at the end; they are the result's frames."""
    config = make_config(cfg_type="self", t_index_list=(20, 35), frames_per_step=2)
    video = make_frames(8, seed=24)
    stream = Stream(tiny_models, config, prompt="a cat")
    log = []
    result = stream.process_video(video, progress=lambda done, total: log.append(("progress", done)),
                                  preview=lambda finished: log.append(("preview", finished.clone())))
    previews = [item for kind, item in log if kind == "preview"]
    # on the CPU a group is finished when its progress is reported: 2, 4, 6, 8 frames, then all 8 again
    assert [len(p) for p in previews] == [2, 4, 6, 8, 8]
    assert [kind for kind, _ in log] == ["preview", "progress"] * 4 + ["preview"]
    for finished in previews:
        assert torch.equal(finished, result[:len(finished)])


@pytest.mark.parametrize(("cfg_type", "t_index"), [("initialize", (10, 25, 40)), ("self", (20,))])
def test_process_video_continues_the_stream(tiny_models, cfg_type, t_index):
    """A second video carries on from the state the first one left (no reset in between).

    With n > 1 every output frame depends only on its own input (its latents travel down the batch, and
    the stock noise of its rows starts from the fixed noise), so the second video's frames equal a fresh
    stream's. With n = 1 the RCFG stock noise is carried from call to call, so they do not.
    """
    config = make_config(cfg_type=cfg_type, t_index_list=t_index, frames_per_step=2)
    v1, v2 = make_frames(6, seed=30), make_frames(4, seed=31)
    stream = Stream(tiny_models, config, prompt="a cat", negative_prompt=NEGATIVE)
    stream.process_video(v1)
    lag = stream.latency
    assert stream.frames_processed == 6 + lag * 2
    state = stream.buffers.x_batch.clone(), stream.buffers.stock.clone()
    assert state[1].abs().max() > 0
    second = stream.process_video(v2)
    assert stream.frames_processed == 6 + 4 + 2 * lag * 2

    steps = Stream(tiny_models, config, prompt="a cat", negative_prompt=NEGATIVE)
    _stepwise_video(steps, v1)
    assert torch.equal(steps.buffers.x_batch, state[0]) and torch.equal(steps.buffers.stock, state[1])
    assert torch.equal(second, _stepwise_video(steps, v2))
    fresh = Stream(tiny_models, config, prompt="a cat", negative_prompt=NEGATIVE).process_video(v2)
    if config.num_steps > 1:
        assert torch.equal(fresh, second)
    else:
        assert (fresh - second).abs().max() > 1e-6, "the second video ignored the stock noise left by the first"


def test_txt2img_is_aligned(tiny_models):
    config = make_config(cfg_type="self", t_index_list=(10, 25, 40), frames_per_step=2)
    result = Stream(tiny_models, config, prompt="a cat").txt2img(3)
    steps = run_steps(Stream(tiny_models, config, prompt="a cat"), [None] * 5)
    assert torch.equal(result, torch.cat(steps[2:]))


@pytest.mark.parametrize("cfg_type", ["none", "self"])
def test_seed_change(tiny_models, cfg_type):
    config = make_config(cfg_type=cfg_type, t_index_list=(20, 35), frames_per_step=2, seed=2)
    inputs = frame_groups(4, 2, seed=4)
    stream = Stream(tiny_models, config, prompt="a cat")
    first = run_steps(stream, inputs)
    stream.set_seed(7)
    stream.reset()
    with_7 = run_steps(stream, inputs)
    assert any_differs(with_7, first)
    assert_all_equal(with_7, run_steps(Stream(tiny_models, config.with_(seed=7), prompt="a cat"), inputs))
    assert torch.equal(stream.buffers.init_noise, seeded_noise(7, stream.buffers.init_noise.shape))
    stream.set_seed(2)
    stream.reset()
    assert_all_equal(run_steps(stream, inputs), first)


def test_seed_change_without_reset_applies_to_new_frames(tiny_models):
    """Without a reset the new noise applies from the next call on; only the frame that leaves the batch
    on that call (its carried latents and stock were written by the call before) is untouched."""
    config = make_config(cfg_type="self", t_index_list=(10, 25, 40), frames_per_step=1)
    inputs = frame_groups(6, 1, seed=5)
    a, b = Stream(tiny_models, config, prompt="a cat"), Stream(tiny_models, config, prompt="a cat")
    run_steps(a, inputs[:3]), run_steps(b, inputs[:3])
    b.set_seed(9)
    got, kept = run_steps(b, inputs[3:]), run_steps(a, inputs[3:])
    assert_all_equal(got[:1], kept[:1])
    for k in (1, 2):
        assert any_differs(got[k:k + 1], kept[k:k + 1]), k


def test_seed_blending(tiny_models):
    config = make_config(cfg_type="self", frames_per_step=2, seed=3)
    inputs = frame_groups(3, 2, seed=6)
    plain = Stream(tiny_models, config, prompt="a cat")
    blended = Stream(tiny_models, config.with_(seed=99), prompt="a cat")
    for method in ("linear", "slerp"):
        blended.set_seed([(3, 1.0), (5, 0.0)], method=method)
        assert torch.equal(blended.buffers.init_noise, plain.buffers.init_noise), method
    blended.reset()
    assert_all_equal(run_steps(blended, inputs), run_steps(plain, inputs))

    blended.set_seed([(3, 1.0), (5, 1.0)])
    shape = blended.buffers.init_noise.shape
    expected = (seeded_noise(3, shape) + seeded_noise(5, shape)) / math.sqrt(2)
    torch.testing.assert_close(blended.buffers.init_noise, expected, rtol=0, atol=1e-6)
    rot = blended.buffers.init_noise_rot
    assert torch.equal(rot, torch.cat([blended.buffers.init_noise[2:], blended.buffers.init_noise[:2]]))
    blended.reset()
    plain.reset()
    assert any_differs(run_steps(blended, inputs), run_steps(plain, inputs))


@pytest.mark.parametrize("cfg_type", CFG_TYPES)
def test_prompt_change(tiny_models, cfg_type):
    """set_prompt rewrites the embeddings in place, keeps the negative rows, and changes the frames."""
    config = make_config(cfg_type=cfg_type, t_index_list=(20, 35), frames_per_step=2)
    inputs = frame_groups(4, 2, seed=7)
    stream = Stream(tiny_models, config, prompt="a cat", negative_prompt=NEGATIVE)
    kept = Stream(tiny_models, config, prompt="a cat", negative_prompt=NEGATIVE)
    run_steps(stream, inputs[:2]), run_steps(kept, inputs[:2])
    ptr = stream.buffers.embeds.data_ptr()
    stream.set_prompt("a red dog")
    assert stream.buffers.embeds.data_ptr() == ptr
    assert any_differs(run_steps(stream, inputs[2:]), run_steps(kept, inputs[2:]))

    stream.reset()
    new = Stream(tiny_models, config, prompt="a red dog", negative_prompt=NEGATIVE)
    assert torch.equal(stream.buffers.embeds, new.buffers.embeds)
    assert_all_equal(run_steps(stream, inputs), run_steps(new, inputs))


@pytest.mark.parametrize("cfg_type", CFG_TYPES)
def test_negative_prompt_change(tiny_models, cfg_type):
    config = make_config(cfg_type=cfg_type, t_index_list=(20, 35), frames_per_step=1)
    inputs = frame_groups(3, 1, seed=8)
    stream = Stream(tiny_models, config, prompt="a cat", negative_prompt=NEGATIVE)
    before = run_steps(stream, inputs)
    stream.set_prompt("a cat", negative_prompt="ugly dark")
    stream.reset()
    after = run_steps(stream, inputs)
    assert_all_equal(after, run_steps(Stream(tiny_models, config, prompt="a cat", negative_prompt="ugly dark"),
                                      inputs))
    if cfg_type in ("full", "initialize"):
        assert any_differs(after, before)
    else:   # the negative prompt takes no part
        assert_all_equal(after, before)


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_prompt_blending(tiny_models, method):
    config = make_config(cfg_type="full", frames_per_step=1)
    inputs = frame_groups(3, 1, seed=9)
    plain = Stream(tiny_models, config, prompt="a cat", negative_prompt=NEGATIVE)
    blended = Stream(tiny_models, config, prompt=[("a cat", 1.0), ("a red dog", 0.0)], negative_prompt=NEGATIVE)
    blended.set_prompt([("a cat", 1.0), ("a red dog", 0.0)], method=method)
    assert torch.equal(blended.buffers.embeds, plain.buffers.embeds)
    assert_all_equal(run_steps(blended, inputs), run_steps(plain, inputs))

    enc = tiny_models.prompt_encoder
    e_cat, e_dog = enc.encode("a cat").tokens.float(), enc.encode("a red dog").tokens.float()
    blended.set_prompt([("a cat", 1.0), ("a red dog", 3.0)], method=method)
    if method == "linear":
        expected = 0.25 * e_cat + 0.75 * e_dog
    else:                       # slerp of every token vector, 3/4 of the way to the second prompt
        na, nb = e_cat / e_cat.norm(dim=-1, keepdim=True), e_dog / e_dog.norm(dim=-1, keepdim=True)
        omega = torch.acos((na * nb).sum(-1, keepdim=True).clamp(-1, 1))
        slerped = (torch.sin(0.25 * omega) * e_cat + torch.sin(0.75 * omega) * e_dog) / torch.sin(omega)
        # tokens the two prompts share (BOS) are parallel: there slerp is the linear blend
        expected = torch.where(omega < 1e-3, 0.25 * e_cat + 0.75 * e_dog, slerped)
    u = config.uncond_rows
    for row in range(u, config.unet_rows):
        torch.testing.assert_close(blended.buffers.embeds[row], expected[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(blended.buffers.embeds[:u], plain.buffers.embeds[:u])
    blended.reset()
    plain.reset()
    assert any_differs(run_steps(blended, inputs), run_steps(plain, inputs))


class _CountCalls:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *_):
        self.calls += 1


def test_prompt_cache_encodes_each_prompt_once(tiny_models, request):
    tag = request.node.name          # prompts no other test has encoded
    counter = _CountCalls(tiny_models.text_encoder)
    try:
        config = make_config(cfg_type="full", frames_per_step=1)
        a = Stream(tiny_models, config, prompt=f"{tag} one", negative_prompt=f"{tag} neg")
        assert counter.calls == 2                     # prompt and negative
        b = Stream(tiny_models, config, prompt=f"{tag} one", negative_prompt=f"{tag} neg")
        assert counter.calls == 2                     # another stream of the same models: cached
        a.step(make_frames(1, seed=1))
        a.set_prompt(f"{tag} one")
        assert counter.calls == 2
        a.set_prompt(f"{tag} two")
        assert counter.calls == 3
        a.set_prompt(f"{tag} one")
        b.set_prompt(f"{tag} two")
        a.set_prompt([(f"{tag} one", 0.5), (f"{tag} two", 0.5)], method="slerp")
        assert counter.calls == 3
        for _ in range(3):
            a.step(make_frames(1, seed=2))
        assert counter.calls == 3                     # frames never touch the text encoder
    finally:
        counter.handle.remove()


def test_prompt_cache_evicts_least_recently_used(fresh_tiny_models):
    models = fresh_tiny_models
    models.prompt_encoder.cache_size = 3
    counter = _CountCalls(models.text_encoder)
    stream = Stream(models, make_config(cfg_type="self"), prompt="p0")   # cond only: one prompt per set
    for k in (1, 2):
        stream.set_prompt(f"p{k}")
    assert counter.calls == 3
    stream.set_prompt("p0")          # cached; now the most recently used
    assert counter.calls == 3
    stream.set_prompt("p3")          # evicts p1, the least recently used
    assert counter.calls == 4
    stream.set_prompt("p0")
    stream.set_prompt("p2")
    assert counter.calls == 4
    stream.set_prompt("p1")          # was evicted: encoded again
    assert counter.calls == 5
    assert len(models.prompt_encoder._cache) == 3


def test_prompt_list_changed_in_place_is_seen(tiny_models):
    weighted = [("a cat", 1.0)]
    stream = Stream(tiny_models, make_config(cfg_type="self"), prompt=weighted)
    weighted[0] = ("a red dog", 1.0)
    stream.set_prompt(weighted)
    expected = Stream(tiny_models, make_config(cfg_type="self"), prompt="a red dog").buffers.embeds
    assert torch.equal(stream.buffers.embeds, expected)


def test_similarity_filter_skips_repeated_frames(tiny_models):
    """Identical input (cosine similarity 1) is always skippable, but never more than max_skip times in a row;
    a skipped call returns the previous output and does not advance the stream."""
    from streamrt import SimilarityFilterConfig

    flt = SimilarityFilterConfig(enabled=True, threshold=0.9, max_skip=2)
    config = make_config(cfg_type="self", t_index_list=(20, 35), similarity_filter=flt)
    stream = Stream(tiny_models, config, prompt="a cat")
    plain = Stream(tiny_models, config.with_(similarity_filter=SimilarityFilterConfig()), prompt="a cat")
    x, y = make_frames(1, seed=1), make_frames(1, seed=2)
    outs = run_steps(stream, [x, x, x, x, y])
    expected = run_steps(plain, [x, x, y])          # calls 0, 3 and 4 really ran
    assert torch.equal(outs[0], expected[0]) and torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])
    assert torch.equal(outs[3], expected[1]) and torch.equal(outs[4], expected[2])
    assert stream.frames_processed == 5
