"""Prompts given as embeddings (what ComfyUI's CONDITIONING carries), in the core on the tiny CPU models.

* embeddings that are the encoder's own output give the text route's stream bit for bit (positive and
  negative, every cfg type that reads them), and blends of them the text blends;
* an unchanged prompt is not written again: the same tensor object or an equal one (counted writes);
* the prompt buffer is as long as the prompts need: positive and negative of different token lengths are
  repeated to their least common multiple (as ComfyUI pads conditionings); a session rebuilds the stream when
  that length changes and writes in place otherwise; repetition leaves the frames unchanged;
* embeddings that cannot be a prompt of this pipeline (another text width, a token count that is not a
  multiple of 77, a batch, NaN, integers) are refused by name, and a refused call leaves the stream as it was.
"""

from __future__ import annotations

import math

import pytest
import torch
from stream_helpers import NEGATIVE, assert_all_equal, frame_groups, make_config, make_frames, run_steps

from streamrt import Stream, StreamRequest, StreamSessions

PROMPT, OTHER = "a red fox in the snow", "a lighthouse at dusk"


def embeds(models, text: str) -> torch.Tensor:
    """The pipeline's own embeddings of ``text`` as a host would hand them over: a CPU tensor [1, 77, D]."""
    return models.prompt_encoder.encode(text).tokens.detach().cpu().clone()


def long_embeds(models, *texts: str) -> torch.Tensor:
    """Several 77-token chunks joined along the tokens (what ComfyUI's ConditioningConcat / a long prompt gives)."""
    return torch.cat([embeds(models, t) for t in texts], dim=1)


@pytest.mark.parametrize("cfg_type", ["self", "full", "initialize"])
def test_the_encoders_own_embeddings_give_the_text_route_bit_for_bit(tiny_models, cfg_type):
    config = make_config(cfg_type=cfg_type, t_index_list=(20, 35), frames_per_step=2)
    inputs = frame_groups(4, 2, seed=31)
    text = Stream(tiny_models, config, prompt=PROMPT, negative_prompt=NEGATIVE)
    tensor = Stream(tiny_models, config, prompt=embeds(tiny_models, PROMPT),
                    negative_prompt=embeds(tiny_models, NEGATIVE))
    assert tensor.config.prompt_length == 77
    assert torch.equal(tensor.buffers.embeds, text.buffers.embeds)
    assert_all_equal(run_steps(tensor, inputs), run_steps(text, inputs))
    # and a change of prompt, text on one side and the encoder's embeddings on the other
    text.set_prompt(OTHER)
    tensor.set_prompt(embeds(tiny_models, OTHER))
    assert torch.equal(tensor.buffers.embeds, text.buffers.embeds)


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_blends_of_embeddings_are_the_blends_of_the_texts(tiny_models, method):
    config = make_config(cfg_type="full")
    text = Stream(tiny_models, config, prompt=PROMPT, negative_prompt=NEGATIVE)
    tensor = Stream(tiny_models, config, prompt=PROMPT, negative_prompt=NEGATIVE)
    text.set_prompt([(PROMPT, 1.0), (OTHER, 3.0)], method=method)
    tensor.set_prompt([(embeds(tiny_models, PROMPT), 1.0), (embeds(tiny_models, OTHER), 3.0)], method=method)
    assert torch.equal(tensor.buffers.embeds, text.buffers.embeds)
    mixed = Stream(tiny_models, config, prompt=PROMPT, negative_prompt=NEGATIVE)
    mixed.set_prompt([(PROMPT, 1.0), (embeds(tiny_models, OTHER), 3.0)], method=method)  # text and tensor mixed
    assert torch.equal(mixed.buffers.embeds, text.buffers.embeds)
    inputs = frame_groups(2, 1, seed=32)
    assert_all_equal(run_steps(mixed, inputs), run_steps(text, inputs))


def test_a_blend_of_different_lengths_repeats_the_shorter_one(tiny_models):
    """A 77-token text blended with a 154-token tensor: the text is repeated to 154 tokens, then blended."""
    long = long_embeds(tiny_models, OTHER, PROMPT)
    stream = Stream(tiny_models, make_config(cfg_type="self"), prompt=[(PROMPT, 1.0), (long, 1.0)])
    assert stream.config.prompt_length == 154
    expected = 0.5 * embeds(tiny_models, PROMPT).repeat(1, 2, 1) + 0.5 * long
    torch.testing.assert_close(stream.buffers.embeds, expected.expand(stream.config.batch_rows, -1, -1),
                               rtol=0, atol=1e-6)


def test_an_unchanged_prompt_is_not_written_again(tiny_models):
    """The same tensor object (ComfyUI's cache hands it again) or an equal one does nothing; a changed one is
    written once, in place. Counted by the stream's writes into its embedding buffer."""
    config = make_config(cfg_type="full")
    positive, negative = embeds(tiny_models, PROMPT), embeds(tiny_models, NEGATIVE)
    stream = Stream(tiny_models, config, prompt=positive, negative_prompt=negative)
    assert stream.embedding_writes == 1
    stream.set_prompt(positive, negative)                          # the same objects
    stream.set_prompt(positive.clone(), negative.clone())          # equal ones (new tensors, same values)
    assert stream.embedding_writes == 1
    changed = positive.clone()
    changed[0, 5, 3] += 1.0
    ptr = stream.buffers.embeds.data_ptr()
    stream.set_prompt(changed, negative)
    assert stream.embedding_writes == 2 and stream.buffers.embeds.data_ptr() == ptr
    assert torch.equal(stream.buffers.embeds[-1, 5, 3], changed[0, 5, 3])
    stream.set_prompt(changed, negative.clone() + 1)               # the negative alone changed
    assert stream.embedding_writes == 3
    # a weighted list of tensors likewise
    blend = [(positive, 0.5), (changed, 0.5)]
    stream.set_prompt(blend)
    stream.set_prompt([(positive.clone(), 0.5), (changed.clone(), 0.5)])
    assert stream.embedding_writes == 4
    stream.set_prompt([(positive, 0.5), (changed, 0.25)])
    assert stream.embedding_writes == 5
    # and text: an unchanged text writes nothing, a new one writes once
    stream.set_prompt(PROMPT, NEGATIVE)
    stream.set_prompt(PROMPT, NEGATIVE)
    assert stream.embedding_writes == 6


def test_a_negative_prompt_the_cfg_type_does_not_read_is_not_written(tiny_models):
    stream = Stream(tiny_models, make_config(cfg_type="self"), prompt=PROMPT, negative_prompt=NEGATIVE)
    stream.set_prompt(PROMPT, embeds(tiny_models, OTHER))
    assert stream.embedding_writes == 1


def test_positive_and_negative_of_different_lengths_fill_their_least_common_multiple(tiny_models):
    positive = long_embeds(tiny_models, PROMPT, OTHER)              # 154 tokens
    negative = long_embeds(tiny_models, NEGATIVE, OTHER, PROMPT)    # 231 tokens
    config = make_config(cfg_type="full", frames_per_step=1)
    stream = Stream(tiny_models, config, prompt=positive, negative_prompt=negative)
    assert stream.config.prompt_length == math.lcm(154, 231) == 462
    buf, u = stream.buffers.embeds, config.uncond_rows
    assert buf.shape == (config.unet_rows, 462, tiny_models.embed_dim)
    assert torch.equal(buf[u:], positive.repeat(1, 3, 1).expand(config.batch_rows, -1, -1))
    assert torch.equal(buf[:u], negative.repeat(1, 2, 1).expand(u, -1, -1))
    # cfg self does not read the negative prompt: its length takes no part
    assert Stream(tiny_models, make_config(cfg_type="self"), prompt=positive,
                  negative_prompt=negative).config.prompt_length == 154


def test_repeating_the_tokens_leaves_the_frames_unchanged(tiny_models):
    """A 77-token prompt in a 154-token buffer (repeated) gives the frames of the 77-token stream: attention
    over repeated keys and values is the same (to float rounding)."""
    config = make_config(cfg_type="full")
    inputs = frame_groups(3, 1, seed=33)
    plain = run_steps(Stream(tiny_models, config, prompt=PROMPT, negative_prompt=NEGATIVE), inputs)
    repeated = Stream(tiny_models, config.with_(prompt_length=154), prompt=PROMPT, negative_prompt=NEGATIVE)
    assert repeated.buffers.embeds.shape[1] == 154
    for got, expected in zip(run_steps(repeated, inputs), plain):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    # the tolerance is far below what a change of prompt makes
    other = run_steps(Stream(tiny_models, config, prompt=OTHER, negative_prompt=NEGATIVE), inputs)
    assert max((a - b).abs().max().item() for a, b in zip(other, plain)) > 100 * 1e-4


def test_a_session_rebuilds_when_the_prompt_length_changes_and_writes_in_place_otherwise(tiny_models):
    sessions = StreamSessions()
    config = make_config(cfg_type="self", acceleration="eager")
    frames = make_frames(1, seed=34)

    def run(prompt):
        stream, _ = sessions.run("node", tiny_models, StreamRequest(config, prompt), frames)
        return stream

    short = run(embeds(tiny_models, PROMPT))
    assert run(embeds(tiny_models, OTHER)) is short and short.frames_processed == 2   # same length: in place
    long = run(long_embeds(tiny_models, PROMPT, OTHER))
    assert long is not short and long.config.prompt_length == 154 and long.frames_processed == 1
    ptr = long.buffers.embeds.data_ptr()
    assert run(long_embeds(tiny_models, OTHER, PROMPT)) is long and long.buffers.embeds.data_ptr() == ptr
    back = run(PROMPT)                                                                 # text: 77 tokens again
    assert back is not long and back.config.prompt_length == 77


def test_a_prompt_that_does_not_fit_the_buffer_needs_a_new_stream(tiny_models):
    stream = Stream(tiny_models, make_config(cfg_type="self"), prompt=PROMPT)
    inputs = frame_groups(3, 1, seed=35)
    reference = run_steps(Stream(tiny_models, make_config(cfg_type="self"), prompt=PROMPT), inputs)
    stream.step(inputs[0])
    with pytest.raises(ValueError, match="154 tokens.*77-token prompt buffer.*new stream"):
        stream.set_prompt(long_embeds(tiny_models, PROMPT, OTHER))
    assert_all_equal(run_steps(stream, inputs[1:]), reference[1:])


@pytest.mark.parametrize(("bad", "words"), [
    (torch.zeros(1, 77, 33), ["33 wide", "gives 32", "SDXL: 2048"]),
    (torch.zeros(1, 100, 32), ["100 tokens", "multiple of 77"]),
    (torch.zeros(2, 77, 32), ["[1, tokens, width]", "[2, 77, 32]"]),
    (torch.zeros(77, 32), ["[1, tokens, width]"]),
    (torch.full((1, 77, 32), math.nan), ["NaN"]),
    (torch.zeros(1, 77, 32, dtype=torch.int64), ["floating point"]),
    (42, ["must be text", "int"]),
])
@pytest.mark.parametrize("where", ["prompt", "negative prompt", "weighted prompt"])
def test_embeddings_that_cannot_be_a_prompt_are_refused_by_name(tiny_models, bad, words, where):
    stream = Stream(tiny_models, make_config(cfg_type="full"), prompt=PROMPT, negative_prompt=NEGATIVE)
    before = stream.buffers.embeds.clone()
    call = {"prompt": lambda: stream.set_prompt(bad),
            "negative prompt": lambda: stream.set_prompt(PROMPT, bad),
            "weighted prompt": lambda: stream.set_prompt([(PROMPT, 1.0), (bad, 1.0)])}[where]
    with pytest.raises(ValueError) as info:
        call()
    for word in ["negative prompt" if where == "negative prompt" else "prompt", *words]:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    assert torch.equal(stream.buffers.embeds, before) and stream.embedding_writes == 1
    prompts = {"prompt": dict(prompt=bad), "negative prompt": dict(prompt=PROMPT, negative_prompt=bad),
               "weighted prompt": dict(prompt=[(PROMPT, 1.0), (bad, 1.0)])}[where]
    with pytest.raises(ValueError):
        Stream(tiny_models, make_config(cfg_type="full"), **prompts)


def test_a_refused_embeddings_call_leaves_the_session_stream_as_it_was(tiny_models):
    sessions = StreamSessions()
    config = make_config(cfg_type="full", acceleration="eager")
    inputs = frame_groups(3, 1, seed=36)
    reference = run_steps(Stream(tiny_models, config, prompt=PROMPT, negative_prompt=NEGATIVE), inputs)
    stream, _ = sessions.run("node", tiny_models, StreamRequest(config, PROMPT, NEGATIVE), inputs[0])
    for prompt, negative in [(torch.zeros(1, 77, 1024), NEGATIVE),                 # another width
                             (PROMPT, torch.zeros(1, 154, 1024))]:                 # a rebuild and another width
        with pytest.raises(ValueError, match="1024 wide"):
            sessions.run("node", tiny_models, StreamRequest(config, prompt, negative), inputs[1])
    again, out = sessions.run("node", tiny_models, StreamRequest(config, PROMPT, NEGATIVE), inputs[1])
    assert again is stream and torch.equal(out, reference[1])
