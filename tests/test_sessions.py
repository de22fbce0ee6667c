"""The session registry (streamrt.sessions): a refused call costs nothing, memory is bounded and accounted.

Defects on main d5c3959 that these tests catch:

- a refused execution discarded the live stream: the new config (frames_per_step 16, a changed seed) was
  applied before the frames were checked;
- ``delta = NaN`` blackened frames and ``guidance_scale = NaN`` silently ran unguided; ``t_index_list`` "32,32"
  or 2000 x "1" was accepted; a prompt with a lone surrogate failed deep inside the tokenizer;
- every changed load key kept another full pipeline until ``/free``, and streams accumulated, while the host
  was told the size of one pipeline only.
"""

from __future__ import annotations

import math

import pytest
import torch
from stream_helpers import frame_groups, make_config, make_frames, quiet_load, run_steps

from streamrt import AccelerationUnavailable, FrameError, LoraSpec, Stream, StreamConfig, StreamRequest, StreamSessions
from streamrt.kv_cache import fused_projections_nbytes


def request(config: StreamConfig, prompt: str = "a cat", **kwargs) -> StreamRequest:
    return StreamRequest(config.with_(acceleration="eager"), prompt, **kwargs)


def test_a_refused_call_leaves_the_stream_exactly_as_it_was(tiny_models):
    config = make_config()
    inputs = frame_groups(5, 1, seed=8)
    expected = run_steps(Stream(tiny_models, config.with_(acceleration="eager"), prompt="a cat"), inputs)
    sessions = StreamSessions()
    for frames in inputs[:3]:
        stream, _ = sessions.run("node", tiny_models, request(config), frames)

    refused = [
        # frames_per_step 16 (a rebuild) with one frame
        (request(config.with_(frames_per_step=16)), inputs[3], FrameError, "frames_per_step=16"),
        # a seed change (applied in place) with NaN frames
        (request(config.with_(seed=99)), torch.full_like(inputs[3], math.nan), FrameError, "NaN"),
        # a prompt the tokenizer cannot take, with a new seed
        (request(config.with_(seed=99), "a \ud800 cat"), inputs[3], ValueError, "lone surrogate"),
        # a negative prompt likewise, with a rebuild (cfg type)
        (request(config.with_(cfg_type="full"), negative_prompt="\udfff"), inputs[3], ValueError, "negative"),
        # an acceleration that cannot run here
        (StreamRequest(config.with_(acceleration="cuda_graph"), "a cat"), inputs[3], AccelerationUnavailable,
         "CUDA"),
        # a video whose length is not a multiple of frames_per_step 2
        (request(config.with_(frames_per_step=2)), make_frames(3, 1), FrameError, "multiple of"),
    ]
    for req, frames, error, words in refused:
        with pytest.raises(error, match=words):
            sessions.run("node", tiny_models, req, frames)
        assert sessions.counts() == (0, 1)
    again, out = sessions.run("node", tiny_models, request(config), inputs[3])
    assert again is stream and stream.frames_processed == 4
    assert torch.equal(out, expected[3]), "the stream changed under the refused calls"


@pytest.mark.parametrize("field", ["guidance_scale", "delta"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_scalars_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        make_config(**{field: value})


@pytest.mark.parametrize("field", ["strength_model", "strength_clip"])
def test_non_finite_lora_strengths_are_refused_by_name(field):
    """A NaN strength (a JSON NaN passes ComfyUI's min/max checks) would fuse NaN into the weights."""
    with pytest.raises(ValueError, match=f"LoRA {field} must be a finite number"):
        LoraSpec("any.safetensors", **{field: math.nan})


@pytest.mark.parametrize("t_index_list", [(32, 32), (1,) * 2000, (20, 10)])
def test_t_index_list_must_be_strictly_increasing(t_index_list):
    with pytest.raises(ValueError, match="strictly increasing"):
        StreamConfig(t_index_list=t_index_list)


def test_pipelines_are_kept_while_used_and_released_after(tiny_folders):
    """A loader (holder) switching models releases the old pipeline unless a stream still runs on it; the
    host is told the true total: every pipeline's weights plus every stream's buffers."""
    loads = []

    def loader(name: str):
        def load():
            loads.append(name)
            return quiet_load(tiny_folders["tiny"])
        return load

    sessions = StreamSessions()
    a = sessions.pipeline("A", loader("A"), holder="loader-1")
    weights = a.weights_nbytes()
    assert weights > 0 and sessions.total_bytes() == weights
    assert sessions.pipeline("A", loader("A"), holder="loader-2") is a and loads == ["A"]  # cached, two holders
    stream, _ = sessions.run("sampler", a, request(make_config()), make_frames(1, 0))
    # the first stream made the fused projection weights (StreamConfig.fused_qkv): counted with the pipeline
    fused = fused_projections_nbytes(a.unet)
    assert fused > 0 and stream.nbytes() > 0
    assert sessions.total_bytes() == weights + fused + stream.nbytes()

    sessions.pipeline("B", loader("B"), holder="loader-1")
    assert sessions.counts() == (2, 1)  # A: held by loader-2 and used by the stream
    sessions.pipeline("B", loader("B"), holder="loader-2")
    assert sessions.counts() == (2, 1)  # A: still used by the sampler's stream
    b = sessions.pipeline("B", loader("B"))
    sessions.run("sampler", b, request(make_config()), make_frames(1, 0))  # the stream moves to B
    assert sessions.counts() == (1, 1) and loads == ["A", "B"]
    # one pipeline, B (A's architecture), with its fused weights + one stream: A's fused weights went with A
    assert sessions.total_bytes() == weights + fused + stream.nbytes()
    sessions.release()
    assert sessions.counts() == (0, 0) and sessions.total_bytes() == 0
    # models the sessions did not load: neither their weights nor their fused copy are counted, only the stream
    stream, _ = sessions.run("other", b, request(make_config()), make_frames(1, 0))
    assert fused_projections_nbytes(b.unet) > 0 and sessions.total_bytes() == stream.nbytes()


def test_a_request_sizes_its_config_once_per_call(tiny_models, monkeypatch):
    """A call needs the request's sized config for its checks, its rebuild key and a new stream: it is made once
    per call (each is a validated copy), for a new stream and for a kept one, and follows the prompt."""
    r = request(make_config(), prompt="a cat")
    first = r.check(tiny_models)
    assert first.prompt_length == 77 and first == r.stream_config(tiny_models)
    long_prompt = torch.zeros(1, 154, tiny_models.embed_dim)
    r.prompt = long_prompt
    assert r.stream_config(tiny_models).prompt_length == 154
    sized = request(make_config(prompt_length=231))
    assert sized.stream_config(tiny_models) is sized.config  # sized by the caller: taken as it is

    made = []
    original = StreamRequest.stream_config
    monkeypatch.setattr(StreamRequest, "stream_config", lambda self, models: made.append(1) or original(self, models))
    sessions = StreamSessions()
    sessions.stream("sampler", tiny_models, request(make_config()))  # a new stream
    sessions.stream("sampler", tiny_models, request(make_config()))  # the same stream, kept
    assert len(made) == 2


def test_streams_are_bounded_least_recently_used_first(tiny_models):
    sessions = StreamSessions(max_streams=2)
    frames = make_frames(1, 0)
    first, _ = sessions.run("one", tiny_models, request(make_config()), frames)
    sessions.run("two", tiny_models, request(make_config()), frames)
    sessions.run("one", tiny_models, request(make_config()), frames)  # "one" is now the most recent
    sessions.run("three", tiny_models, request(make_config()), frames)
    assert set(sessions.live_streams()) == {"one", "three"}
    again, _ = sessions.run("one", tiny_models, request(make_config()), frames)
    assert again is first and first.frames_processed == 3


def test_a_release_inside_a_hosts_unload_frees_the_models_before_the_next_load():
    """release(collect=False) (called inside ComfyUI's unload loop) must not leave the old models alive until
    Python's next garbage collection: their cycles are collected before the next pipeline loads."""
    import gc
    import weakref

    class Models:  # a pipeline's modules hold reference cycles, as diffusers / transformers models do
        def __init__(self) -> None:
            self.me = self

        def weights_nbytes(self) -> int:
            return 1

    sessions = StreamSessions()
    gc.disable()
    try:
        old = weakref.ref(sessions.pipeline("a", Models, holder="loader"))
        sessions.release(collect=False)
        assert old() is not None  # only a collection frees a cycle
        seen = []
        sessions.pipeline("b", lambda: seen.append(old()) or Models())
        assert seen == [None]
    finally:
        gc.enable()


class CyclicModels:
    """A stand-in pipeline holding a reference cycle, as diffusers / transformers models do: only a garbage
    collection frees it."""

    def __init__(self) -> None:
        self.me = self

    def weights_nbytes(self) -> int:
        return 1


def test_a_loader_that_switches_models_frees_the_old_one_before_loading_the_new_one():
    """Switching the model on a loader (the holder) gives the old pipeline's memory back before the new one loads
    (not at Python's next collection, and not only after ComfyUI's /free): the peak is one pipeline, not two."""
    import gc
    import weakref

    sessions = StreamSessions()
    gc.disable()
    try:
        old = weakref.ref(sessions.pipeline("a", CyclicModels, holder="loader"))
        seen = []
        sessions.pipeline("b", lambda: seen.append(old()) or CyclicModels(), holder="loader")
        assert seen == [None], "the old pipeline was alive while the new one loaded"
        assert sessions.counts() == (1, 0)
        # another holder keeps it: nothing is released
        kept = weakref.ref(sessions.pipeline("c", CyclicModels, holder="loader"))
        sessions.pipeline("c", CyclicModels, holder="other")
        sessions.pipeline("b", CyclicModels, holder="loader")
        assert kept() is not None and sessions.counts() == (2, 0)
    finally:
        gc.enable()


def test_a_stream_that_moves_to_another_pipeline_frees_the_old_one_at_once(tiny_folders):
    """The sampler's stream moving to the loader's new pipeline releases the old one (nothing uses it any more) and
    frees it before the new stream allocates, without waiting for a garbage collection."""
    import gc
    import weakref

    sessions = StreamSessions()
    gc.collect()
    gc.disable()
    try:
        a = sessions.pipeline("A", lambda: quiet_load(tiny_folders["tiny"]), holder="loader")
        sessions.run("sampler", a, request(make_config()), make_frames(1, 0))
        old_unet = weakref.ref(a.unet)
        del a
        b = sessions.pipeline("B", lambda: quiet_load(tiny_folders["tiny"]), holder="loader")
        assert old_unet() is not None and sessions.counts() == (2, 1)  # the sampler's stream still runs on A
        sessions.run("sampler", b, request(make_config()), make_frames(1, 1))
        assert sessions.counts() == (1, 1)
        assert old_unet() is None, "the released pipeline is still alive (its reference cycles were not collected)"
    finally:
        gc.enable()
