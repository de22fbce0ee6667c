"""SDXL in engines: the UNet's added conditions as engine inputs, the runtime feeding them, the family in the key.

Real diffusers models built from configs with small random weights (``tiny-xl``: two text encoders, a UNet with
text/time added conditions; ``tiny``: SD1-shaped), on the CPU in float32:

- the exported UNet takes ``text_embeds [rows, P]`` and ``time_ids [rows, 6]`` besides the stock inputs, with
  the same dynamic ``rows`` axis, and onnxruntime gives torch's prediction at min / opt / max shapes;
- a stream on an SDXL pipeline runs its UNet on such an "engine" (onnxruntime standing in for the runner, as
  in tests/test_engine_build.py) and gives the torch stream's frames, handing the engine its own buffers;
- a UNet engine that does not take exactly the stream's extras is not chosen, and the runtime says why;
- the model family is part of the engine key: an SD1 and an SDXL pipeline never share an engine;
- a real TensorRT-RTX build of the tiny-xl UNet (for SM89, ahead of time on this CPU machine) through the
  cache, skipped with the reason where ``tensorrt-rtx`` or ``polygraphy`` is not installed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from engine_helpers import (
    TARGET,
    BuildSpy,
    OnnxEngines,
    OnnxRuntimeRunner,
    needs_builder,
    ort_session,
    tiny_stream_models,
    tiny_xl_stream_models,
)

from streamrt import AccelerationUnavailable, Stream, StreamConfig, StreamModels
from streamrt.engines import (
    CachedEngines,
    EngineCache,
    EngineRequest,
    EngineShapes,
    TensorSpec,
    attach_engines,
    component_for,
    engine_key,
    ensure_engine,
    export_onnx,
    requests_for_stream,
    weights_fingerprint,
)
from streamrt.engines import build as build_mod
from streamrt.engines import export as export_mod
from streamrt.engines import runner as runner_mod
from streamrt.engines.spec import DimRange
from streamrt.runtime import Acceleration, AddedConditions, EngineCallError, EngineUNet, UNetExtras, prepare
from streamrt.runtime.runtime import ADDED_COND_INPUTS, UNET_INPUTS

pytest.importorskip("onnxruntime")

SIZE = 64
STOCK = list(UNET_INPUTS)
ADDED = list(ADDED_COND_INPUTS)
FP32_TOL = dict(rtol=1e-3, atol=2e-4)
FP16_TOL = dict(rtol=2e-2, atol=2e-2)
STATIC = EngineShapes.static(rows=2, width=SIZE, height=SIZE)
DYNAMIC = EngineShapes(rows=DimRange(1, 2, 3), height=DimRange(32, 64, 96), width=DimRange(32, 48, 96))
PROMPT, PROMPT_2, NEGATIVE = "a cat", "a red dog", "blurry photo"


@pytest.fixture(scope="module")
def xl() -> StreamModels:
    return tiny_xl_stream_models(seed=0)


@pytest.fixture(scope="module")
def sd1() -> StreamModels:
    return tiny_stream_models(seed=0)


def xl_config(**changes) -> StreamConfig:
    """Full CFG over two steps: negative rows (the negative text's pooled embeddings) and positive rows (the
    prompt's), every row with its size conditions."""
    base = dict(width=SIZE, height=SIZE, t_index_list=(20, 35), cfg_type="full", guidance_scale=1.5)
    base.update(changes)
    return StreamConfig(**base)


def plausible_inputs(component, shapes: EngineShapes, which: str, dtype=torch.float32, seed: int = 3):
    """The component's example inputs with size conditions that look like a stream's (pixel sizes, crop 0)."""
    inputs = list(component.example_inputs(shapes, dtype, "cpu", which=which, seed=seed))
    names = component.input_names
    if "time_ids" in names:
        sample = inputs[names.index("sample")]
        h, w = sample.shape[-2] * 8, sample.shape[-1] * 8
        rows = sample.shape[0]
        inputs[names.index("time_ids")] = torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype).repeat(rows, 1)
    return inputs


def run_onnx(path, names, inputs) -> np.ndarray:
    return ort_session(path).run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})[0]


# --------------------------------------------------------------------------------------------- export
def test_unet_inputs_follow_the_family(xl, sd1) -> None:
    """SD1's UNet keeps the stock inputs; SDXL's adds its pooled embeddings (the width of the second text encoder's
    projection) and its six size conditions, on the same dynamic ``rows`` axis."""
    assert not sd1.family.has_added_conditions and xl.family.has_added_conditions
    assert component_for(sd1, "unet").input_names == STOCK
    component = component_for(xl, "unet")
    assert component.input_names == STOCK + ADDED and component.output_names == ["noise_pred"]
    pooled = xl.text_encoder_2.config.projection_dim
    dims = {t.name: t.dims for t in component.inputs}
    assert dims["text_embeds"] == ("rows", pooled) and dims["time_ids"] == ("rows", 6)
    assert xl.pooled_dim == pooled and xl.time_ids == len(xl.family.time_ids_for(SIZE, SIZE))
    profile = component.profile(DYNAMIC)
    assert profile["text_embeds"] == ((1, pooled), (2, pooled), (3, pooled))
    assert profile["time_ids"] == ((1, 6), (2, 6), (3, 6))
    assert component.dynamic_axes(DYNAMIC)["text_embeds"] == {0: "rows"}
    # the VAE halves have no added inputs in any family
    assert component_for(xl, "vae_decoder").input_names == ["latents"]


def test_exported_wrapper_is_the_runtime_call(xl) -> None:
    """The module that gets exported computes exactly what the eager runtime's UNet call computes with the same
    added conditions, and the conditions matter to it."""
    runtime = prepare(xl, xl_config(), "eager")
    gen = torch.Generator().manual_seed(1)
    sample, embeds = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, xl.embed_dim, generator=gen)
    timesteps = torch.tensor([500, 250])
    text_embeds = torch.randn(2, xl.pooled_dim, generator=gen)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, dtype=torch.float32)
    module = component_for(xl, "unet").module
    with torch.no_grad():
        exported = module(sample, timesteps, embeds, text_embeds, time_ids)
        expected = runtime.unet(sample, timesteps, embeds, UNetExtras(added_cond=AddedConditions(text_embeds,
                                                                                                 time_ids)))
        other = module(sample, timesteps, embeds, text_embeds.flip(0), time_ids)
    assert torch.equal(exported, expected)
    assert (other - exported).abs().max().item() > 1e-3
    with pytest.raises(TypeError, match="added conditions"):
        module(sample, timesteps, embeds)


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_sdxl_unet_export_matches_torch_under_onnxruntime(xl, tmp_path, kind) -> None:
    component = component_for(xl, "unet")
    shapes = STATIC if kind == "static" else DYNAMIC
    exported = export_onnx(component, shapes, tmp_path / "unet.onnx", precision="fp32")
    graph = onnx.load(str(exported.path))
    assert [i.name for i in graph.graph.input] == component.input_names
    declared = {i.name: i.type.tensor_type.shape.dim for i in graph.graph.input}
    for name in ADDED:
        rows, width = declared[name]
        assert (rows.dim_param == "rows") if kind == "dynamic" else (rows.dim_value == 2)
        assert width.dim_value == {"text_embeds": xl.pooled_dim, "time_ids": 6}[name]
    session = ort_session(exported.path)
    for which in (("opt",) if kind == "static" else ("min", "opt", "max")):
        inputs = plausible_inputs(component, shapes, which)
        feeds = {n: t.numpy() for n, t in zip(component.input_names, inputs)}
        got = torch.from_numpy(session.run(None, feeds)[0])
        with torch.no_grad():
            expected = component.module(*inputs)
        torch.testing.assert_close(got, expected, **FP32_TOL, msg=lambda m, w=which: f"{kind} {w}: {m}")
        # both added inputs are live in the graph (not folded into constants): others change the prediction,
        # and the graph follows torch there too
        for name, change in (("text_embeds", lambda t: t.flip(-1)), ("time_ids", lambda t: t * 2)):
            index = component.input_names.index(name)
            changed = list(inputs)
            changed[index] = change(inputs[index])
            moved = torch.from_numpy(session.run(None, {**feeds, name: changed[index].numpy()})[0])
            assert (moved - got).abs().max().item() > 1e-3, f"{name} does not reach the prediction"
            with torch.no_grad():
                torch.testing.assert_close(moved, component.module(*changed), **FP32_TOL)


def test_sdxl_fp16_export_types_and_values(xl, tmp_path) -> None:
    """An fp16 graph takes its added conditions in fp16 (the stream's buffers are in the model dtype) and matches
    the fp16 torch model; the shared fp32 UNet stays fp32."""
    component = component_for(xl, "unet")
    exported = export_onnx(component, STATIC, tmp_path / "unet.onnx", precision="fp16")
    types = {i.name: i.type.tensor_type.elem_type for i in onnx.load(str(exported.path)).graph.input}
    assert types["text_embeds"] == types["time_ids"] == types["sample"] == onnx.TensorProto.FLOAT16
    assert types["timestep"] == onnx.TensorProto.INT64
    inputs = plausible_inputs(component, STATIC, "opt", dtype=torch.float16, seed=5)
    got = run_onnx(exported.path, component.input_names, inputs)
    with torch.no_grad():
        expected = export_mod._module_in(component.module, torch.float16)(*inputs)
    torch.testing.assert_close(torch.from_numpy(got).float(), expected.float(), **FP16_TOL)
    assert {p.dtype for p in xl.unet.parameters()} == {torch.float32}


# ------------------------------------------------------------------------------------------- runtime
class Recorder:
    """A runner that records what it is given and answers zeros."""

    def __init__(self, input_names) -> None:
        self.input_names = tuple(input_names)
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, *inputs):
        self.calls.append(inputs)
        return torch.zeros_like(inputs[self.input_names.index("sample")])


def test_engine_unet_accepts_what_its_inputs_take() -> None:
    sample, t, embeds = torch.zeros(2, 4, 8, 8), torch.tensor([1, 2]), torch.zeros(2, 77, 64)
    cond = AddedConditions(torch.ones(2, 32), torch.full((2, 6), 64.0))
    plain = EngineUNet(Recorder(STOCK))
    assert plain.accepts == frozenset()
    with pytest.raises(EngineCallError, match="has no inputs for added_cond"):
        plain(sample, t, embeds, UNetExtras(added_cond=cond))
    assert not plain.runner.calls
    # the runner's own order, whatever it is: each input gets its tensor
    order = ["time_ids", "sample", "encoder_hidden_states", "text_embeds", "timestep"]
    xl = EngineUNet(Recorder(order), "the SDXL engine")
    assert xl.accepts == frozenset({"added_cond"})
    xl(sample, t, embeds, UNetExtras(added_cond=cond))
    assert [x is y for x, y in zip(xl.runner.calls[0], (cond.time_ids, sample, embeds, cond.text_embeds, t))] == \
        [True] * 5
    with pytest.raises(EngineCallError, match="the SDXL engine takes added_cond .*the call gave none"):
        xl(sample, t, embeds, UNetExtras())
    for names, why in ((STOCK + ["text_embeds"], "only text_embeds"), (STOCK[:2], "no input encoder_hidden_states"),
                       (STOCK + ["control"], "does not feed")):
        with pytest.raises(EngineCallError, match=why):
            EngineUNet(Recorder(names))


def test_sdxl_stream_runs_through_engines(xl, tmp_path) -> None:
    """UNet (with the added conditions), VAE encoder and decoder on onnxruntime "engines": the torch stream's
    frames, across a prompt change; ``auto`` takes the engines; the UNet engine is handed the stream's own
    buffers on every call (bound once by a real runner, so nothing is allocated per frame)."""
    config = xl_config()
    engines = OnnxEngines(xl, config, tmp_path)
    frames = torch.rand(6, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    torch_stream = Stream(xl, config.with_(acceleration="eager"), prompt=PROMPT, negative_prompt=NEGATIVE)
    engine_stream = Stream(xl, config.with_(acceleration="tensorrt"), prompt=PROMPT, negative_prompt=NEGATIVE,
                           engines=engines)
    assert engine_stream.acceleration is Acceleration.TENSORRT
    assert engine_stream.runtime.parts == {"unet": "engine", "vae_encoder": "engine", "vae_decoder": "engine"}
    assert engine_stream.runtime.unet.accepts == frozenset({"added_cond"})
    buf = engine_stream.buffers
    assert buf.pooled is not None and buf.time_ids is not None
    # the rows really differ: the negative prompt's pooled embedding, then the prompt's; sizes in every row
    assert not torch.equal(buf.pooled[0], buf.pooled[-1]) and (buf.time_ids[:, 0] == SIZE).all()
    expected, got = [], []
    for i in range(6):
        if i == 3:  # a prompt change writes into the same buffers, which the engine reads
            torch_stream.set_prompt(PROMPT_2)
            engine_stream.set_prompt(PROMPT_2)
        expected.append(torch_stream.step(frames[i:i + 1]).clone())
        got.append(engine_stream.step(frames[i:i + 1]).clone())
    unet = engines.runners["unet"]
    assert unet.calls == 6 and all(r.calls == 6 for r in engines.runners.values())
    own = {"sample": buf.unet_in, "timestep": buf.timesteps, "encoder_hidden_states": buf.embeds,
           "text_embeds": buf.pooled, "time_ids": buf.time_ids}
    assert unet.bound == [{n: t.data_ptr() for n, t in own.items()}] * 6
    # the first output comes from the all-zero latent buffer (GroupNorm of a constant row amplifies rounding,
    # see tests/test_engine_build.py): it agrees to a few 1e-3 only
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-2)
    for k, (e, g) in enumerate(zip(expected[1:], got[1:]), start=1):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5, msg=lambda m, k=k: f"frame {k}: {m}")
    # the comparison sees the added conditions: the torch stream with other pooled embeddings (zeros) is off by
    # far more than the tolerance
    zeroed = Stream(xl, config.with_(acceleration="eager"), prompt=PROMPT, negative_prompt=NEGATIVE)
    off = 0.0
    for i in range(3):
        zeroed.buffers.pooled.zero_()
        off = max(off, (zeroed.step(frames[i:i + 1]) - expected[i]).abs().max().item())
    assert off > 100 * 1e-5, off
    auto = Stream(xl, config, prompt=PROMPT, engines=engines)
    assert auto.runtime.requested is Acceleration.AUTO and auto.acceleration is Acceleration.TENSORRT


class BakedConditions(torch.nn.Module):
    """An SDXL UNet exported without its added conditions (fixed zeros inside): what an engine built without them
    would be. Without them the diffusers SDXL UNet cannot even be called."""

    def __init__(self, unet, pooled: int) -> None:
        super().__init__()
        self.unet, self.pooled = unet, pooled

    def forward(self, sample, timestep, encoder_hidden_states):
        rows = sample.shape[0]
        added = {"text_embeds": sample.new_zeros(rows, self.pooled), "time_ids": sample.new_zeros(rows, 6)}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=False)[0]


class IgnoredConditions(torch.nn.Module):
    """An SD1 UNet behind inputs for added conditions it ignores: an engine that takes what SD1 does not give."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def test_unet_engine_built_without_the_added_conditions_is_refused(xl, tmp_path) -> None:
    """An SDXL stream never runs its UNet on an engine without ``text_embeds`` / ``time_ids``: ``tensorrt`` with
    only such an engine is refused naming why, with VAE engines the UNet runs on torch (the note says why and
    the frames are the torch stream's), ``auto`` takes the torch path; a direct call is an EngineCallError."""
    stock = component_for(xl, "unet")
    baked = replace(stock, module=BakedConditions(xl.unet, xl.pooled_dim), inputs=stock.inputs[:3])
    config = xl_config()
    unet_only = OnnxEngines(xl, config, tmp_path / "unet", components=("unet",), unet_component=baked)
    with pytest.raises(AccelerationUnavailable, match="no inputs for added conditions .*rebuild it"):
        Stream(xl, config.with_(acceleration="tensorrt"), prompt=PROMPT, engines=unet_only)
    engines = OnnxEngines(xl, config, tmp_path / "all", unet_component=baked)
    partial = Stream(xl, config.with_(acceleration="tensorrt"), prompt=PROMPT, negative_prompt=NEGATIVE,
                     engines=engines)
    assert partial.runtime.parts == {"unet": "torch", "vae_encoder": "engine", "vae_decoder": "engine"}
    refusal = [n for n in partial.runtime.notes if n.startswith("unet: the UNet engine")]
    assert refusal and "text_embeds, time_ids" in refusal[0] and "SDXL" in refusal[0], partial.runtime.notes
    reference = Stream(xl, config.with_(acceleration="eager"), prompt=PROMPT, negative_prompt=NEGATIVE)
    frames = torch.rand(3, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(4))
    for i in range(3):
        torch.testing.assert_close(partial.step(frames[i:i + 1]), reference.step(frames[i:i + 1]), rtol=0,
                                   atol=1e-2 if i == 0 else 1e-5)
    assert engines.runners["unet"].calls == 0
    auto = Stream(xl, config, prompt=PROMPT, engines=engines)
    assert auto.acceleration is Acceleration.EAGER and any("no inputs for added conditions" in n
                                                          for n in auto.runtime.notes)
    with pytest.raises(EngineCallError, match="has no inputs for added_cond"):
        EngineUNet(engines.runners["unet"])(partial.buffers.unet_in, partial.buffers.timesteps,
                                            partial.buffers.embeds, partial.unet_extras)
    assert engines.runners["unet"].calls == 0


def test_sd1_stream_refuses_an_engine_that_takes_added_conditions(sd1, tmp_path) -> None:
    stock = component_for(sd1, "unet")
    extra = (TensorSpec("text_embeds", ("rows", 32)), TensorSpec("time_ids", ("rows", 6)))
    odd = replace(stock, module=IgnoredConditions(sd1.unet), inputs=stock.inputs + extra)
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 35), cfg_type="self", guidance_scale=1.5)
    engines = OnnxEngines(sd1, config, tmp_path, components=("unet",), unet_component=odd)
    with pytest.raises(AccelerationUnavailable, match="takes added conditions .*SD1.x pipeline does not have"):
        Stream(sd1, config.with_(acceleration="tensorrt"), prompt=PROMPT, engines=engines)


def test_ensure_engine_refuses_a_unet_component_without_the_familys_inputs(xl, sd1, tmp_path, monkeypatch) -> None:
    """A UNet component whose added inputs are not its family's is refused before any export or build."""
    spy = BuildSpy(monkeypatch)
    cache = EngineCache(tmp_path / "engines")
    request = EngineRequest("unet", STATIC, target=TARGET)
    stock = component_for(xl, "unet")
    baked = replace(stock, module=BakedConditions(xl.unet, xl.pooled_dim), inputs=stock.inputs[:3])
    with pytest.raises(ValueError, match=r"SDXL UNet engines take the added conditions \['text_embeds', "
                                         r"'time_ids'\]; this unet component has none"):
        ensure_engine(xl, request, cache, component=baked)
    stock = component_for(sd1, "unet")
    extra = (TensorSpec("text_embeds", ("rows", 32)), TensorSpec("time_ids", ("rows", 6)))
    with pytest.raises(ValueError, match="SD1.x UNet engines take the added conditions none"):
        ensure_engine(sd1, EngineRequest("unet", STATIC, target=TARGET), cache,
                      component=replace(stock, inputs=stock.inputs + extra))
    assert spy.count == 0 and spy.exports == []


# ------------------------------------------------------------------------------------------- the key
def same_files_identity(tmp_path: Path) -> dict:
    """An identity naming one weights file, so that two pipelines get the same weights fingerprint."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"the same bytes for both pipelines")
    st = weights.stat()
    return {"kind": "checkpoint", "files": [[str(weights), st.st_size, st.st_mtime_ns]]}


def test_sd1_and_sdxl_pipelines_never_share_an_engine(tmp_path, monkeypatch) -> None:
    """Even where the weights fingerprint cannot tell them apart, an SD1 and an SDXL pipeline get different keys
    (the family), an engine of one is never found for the other, and attaching engines for the SDXL stream
    skips the SD1 engine (found by name, weights and shapes alike) and takes its own."""
    monkeypatch.setattr(build_mod, "backend_version", lambda backend: "1.7.1.116")
    identity = same_files_identity(tmp_path)
    sd1 = tiny_stream_models(seed=0)
    sd1.identity = dict(identity)
    xl = tiny_xl_stream_models(seed=0, identity=dict(identity))
    assert weights_fingerprint(sd1) == weights_fingerprint(xl)
    config = xl_config()
    [request] = requests_for_stream(config, components=("unet",), target=TARGET)
    k1, k2 = engine_key(sd1, request), engine_key(xl, request)
    assert (k1.family, k2.family) == ("sd1", "sdxl") and k1.weights == k2.weights
    assert k1.differences(k2) == ["family: sdxl != sd1"]
    assert k1.digest() != k2.digest() and k1.file_name() != k2.file_name()

    cache = EngineCache(tmp_path / "engines")

    def store(key, inputs) -> None:
        with cache.staging() as staging:
            (staging / "e").write_bytes(key.family.encode() * 64)
            cache.commit(key, staging / "e", {"inputs": [[n, [], "model"] for n in inputs]})

    store(k1, STOCK)
    assert not cache.lookup(k2).hit and cache.lookup(k2).error.reason == "missing"
    assert cache.find(k1.weights, "unet", rows=config.unet_rows, width=SIZE, height=SIZE, family="sdxl") == []

    # attach_engines as on an RTX machine (the backend pretended usable, the runner a stand-in that loads nothing)
    opened = []

    class StandInRunner:
        def __init__(self, path, *, backend, device, input_names, runtime_cache) -> None:
            self.path, self.input_names = Path(path), tuple(input_names)
            opened.append(self.path.name)

        def close(self) -> None:
            pass

    monkeypatch.setattr(runner_mod, "runtime_problem", lambda backend, device: None)
    monkeypatch.setattr(runner_mod, "installed_backends", lambda: {"tensorrt-rtx": "1.7.1.116"})
    monkeypatch.setattr(runner_mod, "local_target", lambda device: TARGET)
    monkeypatch.setattr(runner_mod, "EngineRunner", StandInRunner)
    found = attach_engines(xl, config, cache, backend="tensorrt-rtx")
    assert "unet" not in found.runners and opened == []
    assert f"no unet engine for {config.unet_rows} rows at {SIZE}x{SIZE} on {TARGET} (SDXL)" in found.notes
    assert "unet" in attach_engines(sd1, config, cache, backend="tensorrt-rtx").runners
    assert opened == [k1.file_name()]

    # an SDXL engine whose sidecar says it takes no added conditions (built without them): found, then refused
    # by the runtime with the reason; one with them is the stream's UNet
    bad = k2
    store(bad, STOCK)
    runtime = prepare(xl, config, "auto", engines=CachedEngines(cache, backend="tensorrt-rtx"))
    assert runtime.parts["unet"] == "torch" and runtime.acceleration is Acceleration.EAGER
    assert any("no inputs for added conditions" in n and bad.file_name() in n for n in runtime.notes), runtime.notes
    cache.remove(bad)
    store(bad, STOCK + ADDED)
    runtime = prepare(xl, config, "tensorrt", engines=CachedEngines(cache, backend="tensorrt-rtx"))
    assert runtime.parts["unet"] == "engine" and runtime.unet.accepts == frozenset({"added_cond"})
    assert runtime.unet.runner.path.name == bad.file_name()


# ------------------------------------------------------------------------------------ TensorRT-RTX
@needs_builder
def test_sdxl_unet_engine_builds_with_its_added_inputs(xl, sd1, tmp_path, monkeypatch) -> None:
    """A real TensorRT-RTX build (SM89, ahead of time) of the tiny-xl UNet through the cache: the graph the
    builder parses takes text_embeds and time_ids, its optimisation profile covers them, the key names the
    family, a second request is a cache hit and the SD1 pipeline's key for the same request is not it. The
    stream run on that very graph (onnxruntime standing in for the engine) gives the torch stream's frames."""
    parsed: dict = {}

    def look_at_the_graph(job) -> None:
        graph = onnx.load(str(job.onnx))
        parsed["inputs"] = {i.name: ([d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim],
                                     i.type.tensor_type.elem_type) for i in graph.graph.input}
        parsed["profile"] = job.profiles[0]
        shutil.copy(job.onnx, tmp_path / "built.onnx")

    spy = BuildSpy(monkeypatch, on_build=look_at_the_graph)
    cache = EngineCache(tmp_path / "engines")
    config = xl_config()
    rows, pooled = config.unet_rows, xl.pooled_dim
    request = EngineRequest("unet", EngineShapes(DimRange(1, rows, rows), DimRange(SIZE, SIZE, 2 * SIZE),
                                                 DimRange(SIZE, SIZE, 2 * SIZE)), precision="fp32", target=TARGET)
    result = ensure_engine(xl, request, cache)
    assert result.built and spy.count == 1 and result.key.family == "sdxl"
    names = STOCK + ADDED
    assert list(parsed["inputs"]) == names
    assert parsed["inputs"]["text_embeds"] == (["rows", pooled], onnx.TensorProto.FLOAT)
    assert parsed["inputs"]["time_ids"] == (["rows", 6], onnx.TensorProto.FLOAT)
    assert parsed["profile"]["text_embeds"] == ((1, pooled), (rows, pooled), (rows, pooled))
    assert parsed["profile"]["time_ids"] == ((1, 6), (rows, 6), (rows, 6))
    meta = json.loads(result.record.path.with_suffix(".json").read_text())
    assert [t[0] for t in meta["inputs"]] == names and meta["key"]["family"] == "sdxl"
    assert meta["profile"]["text_embeds"] == [[1, pooled], [rows, pooled], [rows, pooled]]
    assert result.record.path.stat().st_size > 0 and "_sdxl_" in result.record.path.name

    again = ensure_engine(xl, request, cache)
    assert not again.built and again.reason == "cache hit" and spy.count == 1
    assert not cache.lookup(engine_key(sd1, request)).hit

    # the stream on the graph TensorRT-RTX built from, through the engine runtime's UNet call
    class BuiltUNet:
        key = "the built graph on onnxruntime"

        def __init__(self) -> None:
            self.runner = OnnxRuntimeRunner(tmp_path / "built.onnx", [t[0] for t in meta["inputs"]], ["noise_pred"])

        def attach(self, models, config):
            from streamrt.runtime import AttachResult
            return AttachResult(runners={"unet": self.runner}, records={"unet": result.record})

    source = BuiltUNet()
    on_engine = Stream(xl, config.with_(acceleration="tensorrt"), prompt=PROMPT, negative_prompt=NEGATIVE,
                       engines=source)
    assert on_engine.runtime.parts["unet"] == "engine"
    on_torch = Stream(xl, config.with_(acceleration="eager"), prompt=PROMPT, negative_prompt=NEGATIVE)
    frames = torch.rand(4, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(8))
    for i in range(4):
        torch.testing.assert_close(on_engine.step(frames[i:i + 1]), on_torch.step(frames[i:i + 1]), rtol=0,
                                   atol=1e-2 if i == 0 else 1e-5)
    assert source.runner.calls == 4
