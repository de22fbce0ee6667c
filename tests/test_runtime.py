"""The runtime seam on the CPU: one enum decides how a stream's models run, and nothing else changes that.

- an eager stream and a compiled stream on ONE pipeline each run the path they asked for: the compiled copies
  never replace the pipeline's modules (on main d5c3959 ``compile_models`` replaced ``models.unet`` in place,
  so every stream of the pipeline ran compiled from then on);
- a changed acceleration rebuilds the stream (on d5c3959 ``cuda_graph`` and ``compile`` were the same backend
  to the session registry, so switching kept the old captured graph);
- ``auto`` resolves to what runs here and says so; an acceleration that cannot run is refused before the
  old stream is dropped.

The compiled path is exercised with a counting ``torch.compile`` backend (dynamo traces for real and the
counter runs the traced graph eagerly), so the test sees every call that goes through a compiled graph
without paying inductor's compile time; tests/test_runtime_e2e.py and tests/test_gpu.py compile for real.
"""

from __future__ import annotations

import pytest
import torch
from stream_helpers import frame_groups, make_config, run_steps

from streamrt import Acceleration, AccelerationUnavailable, Stream, StreamRequest, StreamSessions, prepare
from streamrt.runtime import CompileOptions, TorchUNet
from streamrt.stream import aligned_calls


class CountingBackend:
    """A ``torch.compile`` backend that runs dynamo's graphs eagerly and counts compilations and calls."""

    def __init__(self) -> None:
        self.compiled = 0
        self.calls = 0

    def __call__(self, graph_module, example_inputs):
        self.compiled += 1

        def run(*args):
            self.calls += 1
            return graph_module.forward(*args)

        return run


def test_eager_and_compiled_streams_on_one_pipeline_each_run_their_path(fresh_tiny_models):
    models = fresh_tiny_models
    unet_class = type(models.unet)
    config = make_config()
    inputs = frame_groups(4, 1, seed=3)
    before = run_steps(Stream(models, config.with_(acceleration="eager"), prompt="a cat"), inputs)

    counter = CountingBackend()
    runtime = prepare(models, config.with_(acceleration="compile"), compile_options=CompileOptions(backend=counter))
    compiled = Stream(models, config.with_(acceleration="compile"), prompt="a cat", runtime=runtime)
    assert compiled.acceleration is Acceleration.COMPILE
    assert compiled.runtime.parts == {"unet": "compiled", "vae_encoder": "compiled", "vae_decoder": "compiled"}
    assert not compiled.runtime.captures  # no CUDA graph on the CPU
    compiled_out = run_steps(compiled, inputs)
    assert counter.compiled > 0 and counter.calls >= 3 * len(inputs)  # UNet, encode and decode per call
    for a, b in zip(compiled_out[1:], before[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    # The pipeline keeps its own modules, and an eager stream made now calls them, not the compiled copies.
    assert type(models.unet) is unet_class and models.unet is not compiled.runtime.unet.module
    eager = Stream(models, config.with_(acceleration="eager"), prompt="a cat")
    assert isinstance(eager.runtime.unet, TorchUNet) and eager.runtime.unet.module is models.unet
    calls = counter.calls
    after = run_steps(eager, inputs)
    assert counter.calls == calls, "the eager stream ran through a compiled graph"
    for k, (a, b) in enumerate(zip(after, before)):
        assert torch.equal(a, b), f"eager output {k} changed after a compiled stream was made on the pipeline"


def test_changing_acceleration_rebuilds_the_stream(tiny_models):
    sessions = StreamSessions()
    config = make_config()
    frames = frame_groups(1, 1)[0]

    def stream_for(acceleration: str) -> Stream:
        return sessions.stream("node", tiny_models, StreamRequest(config.with_(acceleration=acceleration), "a cat"))

    eager = stream_for("eager")
    eager.step(frames)
    assert stream_for("eager") is eager and eager.frames_processed == 1  # same key: same stream, state kept
    compiled = stream_for("compile")  # not stepped: compiling is the e2e / GPU tests' business
    assert compiled is not eager and compiled.acceleration is Acceleration.COMPILE and compiled.frames_processed == 0
    auto = stream_for("auto")
    assert auto is not compiled and auto.acceleration is Acceleration.EAGER
    assert auto.runtime.describe() == "auto -> eager"
    assert any("no CUDA GPU" in note for note in auto.runtime.notes)
    auto.step(frames)
    # cuda_graph cannot run on the CPU: refused by name, and the live stream is still there, untouched
    with pytest.raises(AccelerationUnavailable, match="'cuda_graph' cannot run here.*CUDA GPU"):
        stream_for("cuda_graph")
    assert stream_for("auto") is auto and auto.frames_processed == 1
    assert sessions.live_streams()["node"]["acceleration"] == "auto -> eager"


def test_rebuild_key_holds_what_needs_a_new_stream():
    config = make_config()
    assert config.acceleration is Acceleration.AUTO
    for changed in (config.with_(acceleration="eager"), config.with_(acceleration="compile"),
                    config.with_(frames_per_step=2), config.with_(t_index_list=(20,)),
                    config.with_(prompt_length=154), config.with_(prompt_kv=False)):
        assert changed.rebuild_key() != config.rebuild_key(), changed
    for live in (config.with_(seed=5), config.with_(guidance_scale=2.0), config.with_(delta=0.5)):
        assert live.rebuild_key() == config.rebuild_key(), live
    with pytest.raises(ValueError, match="unknown acceleration 'fast'"):
        config.with_(acceleration="fast")


def test_aligned_calls_feed_the_last_group_again_and_drop_the_first_outputs():
    assert list(aligned_calls(3, 0)) == [(0, 0), (1, 1), (2, 2)]
    assert list(aligned_calls(3, 2)) == [(0, -2), (1, -1), (2, 0), (2, 1), (2, 2)]
    assert list(aligned_calls(1, 1)) == [(0, -1), (0, 0)]


def test_compile_is_refused_where_compiled_kernels_cannot_run():
    """Under ComfyUI's default cudaMallocAsync allocator compiled kernels failed inside the CUDA graph (GPU
    machine, scripts/soak.py): compile is refused there with the way out, before any stream changes."""
    from streamrt.runtime.compiled import compile_problem

    cuda = torch.device("cuda", 0)
    assert "--disable-cuda-malloc" in compile_problem(cuda, "cudaMallocAsync")
    assert compile_problem(cuda, "native") is None
    assert compile_problem(torch.device("cpu"), "cudaMallocAsync") is None


def test_compiled_copies_go_with_their_pipeline(tiny_folders):
    """The compiled copies of a pipeline are shared by its streams and freed with it: before, they were kept in a
    table keyed by the UNet module that the compiled copy itself holds, so every pipeline ever compiled stayed in
    memory (after switching models too, and after ComfyUI's /free)."""
    import gc
    import weakref

    from stream_helpers import quiet_load

    from streamrt.runtime import compiled_calls

    models = quiet_load(tiny_folders["tiny"])
    options = CompileOptions(backend=CountingBackend())
    calls = compiled_calls(models, options)
    assert compiled_calls(models, options) is calls  # shared
    unet = weakref.ref(models.unet)
    del models, calls
    gc.collect()
    assert unet() is None, "the compiled copies keep the released pipeline's UNet alive"


def test_a_compiled_stream_traces_the_fused_projections_and_the_prompts_keys_and_values(fresh_tiny_models):
    """dynamo traces the caching processors' fused self-attention projections and the prompt's cross-attention keys
    and values whole (as many graphs as for a stream without them: no graph break), and the compiled stream gives
    the eager one's frames."""
    models = fresh_tiny_models
    config = make_config(fused_qkv=True)
    inputs = frame_groups(4, 1, seed=8)
    eager = Stream(models, config.with_(acceleration="eager"), prompt="a cat")
    assert {"fused_qkv", "prompt_kv"} <= eager.unet_extras.given
    expected = run_steps(eager, inputs)
    graphs = {}
    for name, changes in (("plain", dict(fused_qkv=False, prompt_kv=False)), ("fused", {})):
        counter = CountingBackend()
        cfg = config.with_(acceleration="compile", **changes)
        stream = Stream(models, cfg, prompt="a cat",
                        runtime=prepare(models, cfg, compile_options=CompileOptions(backend=counter)))
        out = run_steps(stream, inputs)
        graphs[name] = counter.compiled
        if name == "fused":
            for a, b in zip(out[1:], expected[1:]):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert graphs["fused"] == graphs["plain"] > 0
