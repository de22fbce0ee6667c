"""Real TensorRT-RTX engine builds on this CPU-only machine (ahead of time, for SM89), through the cache.

Needs ``tensorrt-rtx`` and ``polygraphy`` (requirements-test.txt); skipped, with the reason, without them.
What runs here is the build: executing an engine needs an RTX-class GPU, which no machine of this
project has, so the stream's use of engines is checked with onnxruntime standing in for the runner.

Build and export counts come from a spy on ``run_build`` and ``export_onnx`` (one call each per engine build);
times are printed with -s.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from engine_helpers import TARGET, BuildSpy, OnnxEngines, kv_component, needs_builder, tiny_stream_models

from streamrt import Acceleration, AccelerationUnavailable, Stream, StreamConfig, StreamModels
from streamrt.engines import (
    BackendUnavailableError,
    CachedEngines,
    EngineBuildError,
    EngineCache,
    EngineRequest,
    EngineShapes,
    TensorSpec,
    attach_engines,
    build_engines,
    component_for,
    engine_key,
    ensure_engine,
    requests_for_stream,
    resolve_target,
)
from streamrt.engines import build as build_mod
from streamrt.engines.spec import DimRange
from streamrt.kv_cache import KVCacheConfig
from streamrt.runtime import EngineCallError, UNetExtras

SIZE = 64


@pytest.fixture(scope="module")
def models() -> StreamModels:
    return tiny_stream_models(seed=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> EngineCache:
    return EngineCache(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def field_cache(tmp_path_factory) -> EngineCache:
    """The key-field tests' own cache: their base engine and its variants only."""
    return EngineCache(tmp_path_factory.mktemp("field-engines"))


@pytest.fixture
def spy(monkeypatch) -> BuildSpy:
    return BuildSpy(monkeypatch)


def decoder_request(**changes) -> EngineRequest:
    base = dict(component="vae_decoder", shapes=EngineShapes.static(1, SIZE, SIZE), precision="fp16",
                backend="tensorrt-rtx", target=TARGET)
    base.update(changes)
    return EngineRequest(**base)


def engine_files(cache: EngineCache) -> list[Path]:
    return sorted(p for p in cache.root.rglob("*") if p.suffix in (".engine", ".json") and ".staging" not in p.parts)


# ---------------------------------------------------------------------------------------------------
@needs_builder
def test_stream_engines_build_once_then_hit(models, cache, spy) -> None:
    """UNet, VAE encoder and decoder of a stream config: built on the first request, reused on the second."""
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 35), cfg_type="initialize", guidance_scale=1.5)
    requests = requests_for_stream(config, target=TARGET)
    assert [r.shapes.rows.opt for r in requests] == [config.unet_rows, 1, 1] and config.unet_rows == 3
    ticks: list[tuple[int, int]] = []
    start = time.perf_counter()
    first = build_engines(models, requests, cache, progress=lambda d, t: ticks.append((d, t)))
    first_seconds = time.perf_counter() - start
    assert [r.built for r in first] == [True, True, True] and spy.count == 3
    assert spy.exports == ["unet", "vae_encoder", "vae_decoder"]
    workers = len(spy.processes)
    assert ticks[-1] == (300, 300) and all(t == 300 for _, t in ticks)
    assert [d for d, _ in ticks] == sorted(d for d, _ in ticks), "progress never goes back"
    # TensorRT reports its build phases (most of the time goes to one of them): a few steps in between
    assert len({d for d, _ in ticks if 15 < d < 97}) >= 2, "the UNet build reports progress while it runs"

    start = time.perf_counter()
    second = build_engines(models, requests, cache)
    second_seconds = time.perf_counter() - start
    assert [r.built for r in second] == [False, False, False] and spy.count == 3
    assert [r.reason for r in second] == ["cache hit"] * 3
    assert [r.record.path for r in second] == [r.record.path for r in first]
    # a hit does no work: no export, no builder process (what makes it take milliseconds, printed below)
    assert len(spy.exports) == 3 and len(spy.processes) == workers
    assert all(r.export_seconds == 0.0 and r.build_seconds == 0.0 for r in second)
    for result in first:
        meta = json.loads(result.record.path.with_suffix(".json").read_text())
        assert meta["key"]["target"] == TARGET and meta["key"]["backend"] == "tensorrt-rtx"
        assert meta["engine"]["bytes"] == result.record.path.stat().st_size > 0
    assert (cache.root / "timing").is_dir()
    print(f"\nbuild of 3 engines: {first_seconds:.1f} s (UNet export {first[0].export_seconds:.1f} s, "
          f"build {first[0].build_seconds:.1f} s; VAE builds {first[1].build_seconds:.1f} s, "
          f"{first[2].build_seconds:.1f} s); cache hit: {second_seconds * 1000:.0f} ms")


def _kv_decoder(models: StreamModels, window: int):
    """The decoder with one extra named input/output (the extension point), for the cache_window field."""
    class WithRing(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, latents, ring):
            return self.inner(latents), ring * 2.0

    base = component_for(models, "vae_decoder")
    return base.with_io(WithRing(base.module), extra_inputs=[TensorSpec("ring", ("rows", "slots", 8))],
                        extra_outputs=[TensorSpec("ring_out", ("rows", "slots", 8))], cache_window=window)


FIELD_CHANGES = {
    "weights": {},
    "component": dict(component="vae_encoder"),
    "rows": dict(shapes=EngineShapes.static(2, SIZE, SIZE)),
    "resolution": dict(shapes=EngineShapes.static(1, SIZE, 2 * SIZE)),
    "resolution_range": dict(shapes=EngineShapes.ranged(1, SIZE, SIZE, 32, 128)),
    "precision": dict(precision="fp32"),
    "target": dict(target="SM86"),
    "cache_window": {},
    "backend_version": {},
}


@needs_builder
@pytest.mark.parametrize("field", list(FIELD_CHANGES))
def test_each_key_field_change_rebuilds(models, field_cache, spy, field) -> None:
    cache = field_cache
    base = decoder_request()
    base_result = ensure_engine(models, base, cache)
    before = spy.count
    request, variant_models, component = decoder_request(**FIELD_CHANGES[field]), models, None
    if field == "weights":
        variant_models = tiny_stream_models(seed=1)
    if field == "cache_window":
        request = decoder_request(shapes=EngineShapes.static(1, SIZE, SIZE, slots=2))
        component = _kv_decoder(models, window=2)
    if field == "backend_version":
        # an engine built by another TensorRT-RTX version sits in the cache: it is not a hit for this one
        old_key = replace(engine_key(models, base), backend_version="1.6.1.120")
        with cache.staging() as staging:
            (staging / "old.engine").write_bytes(base_result.record.path.read_bytes())
            cache.commit(old_key, staging / "old.engine")
        cache.remove(engine_key(models, base))
    result = ensure_engine(variant_models, request, cache, component=component)
    assert result.built and spy.count == before + 1, f"changing {field} must build a new engine"
    assert result.record.key != base_result.record.key or field == "backend_version"
    # the variant is cached in turn, and the base engine is still there
    assert not ensure_engine(variant_models, request, cache, component=component).built
    assert spy.count == before + 1
    if field != "backend_version":
        assert not ensure_engine(models, base, cache).built and spy.count == before + 1


@needs_builder
@pytest.mark.parametrize("damage", ["truncate", "flip", "metadata", "wrong-key"])
def test_damaged_engine_is_rebuilt_when_the_models_are_there(models, cache, spy, damage) -> None:
    request = decoder_request(shapes=EngineShapes.static(1, SIZE, SIZE + 32))
    path = ensure_engine(models, request, cache).record.path
    built = spy.count
    meta_path = path.with_suffix(".json")
    time.sleep(0.01)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x55
        path.write_bytes(bytes(data))
    elif damage == "metadata":
        meta_path.unlink()
    else:
        meta = json.loads(meta_path.read_text())
        meta["key"]["target"] = "SM120"
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="Build Engines"):
        cache.load(engine_key(models, request))  # without the models: refused, with the reason
    result = ensure_engine(models, request, cache)
    assert result.built and spy.count == built + 1 and result.reason.startswith("rebuilt")
    assert cache.lookup(engine_key(models, request)).hit


class Interrupted(BaseException):
    """Like ComfyUI's interrupt exception: not an Exception."""


@needs_builder
def test_interrupt_from_progress_kills_the_build_and_leaves_nothing(models, tmp_path, spy) -> None:
    cache = EngineCache(tmp_path / "engines")
    request = EngineRequest("unet", EngineShapes.static(2, SIZE, SIZE), target=TARGET)
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done > 15:  # inside the TensorRT build (export ends at 15 of 100)
            raise Interrupted

    with pytest.raises(Interrupted):
        ensure_engine(models, request, cache, progress=progress)
    assert spy.count == 1 and spy.processes and all(p.poll() is not None for p in spy.processes)
    assert engine_files(cache) == []
    assert not list((cache.root / ".staging").iterdir())
    assert not cache.lookup(engine_key(models, request)).hit


@needs_builder
def test_killed_build_process_leaves_nothing(models, tmp_path, spy, monkeypatch) -> None:
    cache = EngineCache(tmp_path / "engines")
    original = build_mod.run_build

    def run_and_kill(job, progress=None, **kwargs):
        def on_event(event):
            if event["event"] == "start":
                os.kill(event["pid"], signal.SIGKILL)
        return original(job, progress, on_event=on_event, **kwargs)

    monkeypatch.setattr(build_mod, "run_build", run_and_kill)
    with pytest.raises(EngineBuildError, match="ended with code"):
        ensure_engine(models, decoder_request(), cache)
    assert engine_files(cache) == [] and not list((cache.root / ".staging").iterdir())


@needs_builder
def test_build_errors_carry_the_reason(tmp_path, models) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    job = build_mod.BuildJob(onnx=broken, output=tmp_path / "out.engine", backend="tensorrt-rtx", target=TARGET,
                             profiles=({"latents": ((1, 4, 8, 8),) * 3},))
    with pytest.raises(EngineBuildError, match="failed"):
        build_mod.run_build(job)
    assert not (tmp_path / "out.engine").exists()


def test_targets_and_backends() -> None:
    assert resolve_target("tensorrt-rtx", "sm89") == "SM89"
    with pytest.raises(ValueError, match="Hopper"):
        resolve_target("tensorrt-rtx", "SM90")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_target("tensorrt-rtx", "auto")
        with pytest.raises(ValueError, match="tensorrt-rtx to build ahead of time"):
            resolve_target("tensorrt", "SM89")
    with pytest.raises(ValueError, match="SM89"):
        resolve_target("tensorrt-rtx", "ampere")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match="pip install tensorrt"):
            build_mod.backend_version("tensorrt")


@needs_builder
def test_dynamic_unet_engine_with_kv_io_builds(models, cache) -> None:
    """The extension point end to end: a UNet with extra K/V I/O and dynamic rows/resolution builds,
    and its profile covers the extra input."""
    component = kv_component(models, window=2)
    shapes = EngineShapes(DimRange(1, 2, 3), DimRange(32, 64, 96), DimRange(32, 64, 96)).with_extra(
        kv_tokens=(64, 128, 256), latent_tokens=(16, 64, 144))
    result = ensure_engine(models, EngineRequest("unet", shapes, target=TARGET), cache, component=component)
    assert result.built and result.key.cache_window == 2
    assert set(result.record.meta["profile"]) == {"sample", "timestep", "encoder_hidden_states", "kv_ring"}
    assert result.record.meta["profile"]["kv_ring"] == [[1, 64, 32], [2, 128, 32], [3, 256, 32]]
    # the sidecar keeps the call order of the inputs (what the runner binds them in)
    assert [t[0] for t in result.record.meta["inputs"]] == component.input_names


# ----------------------------------------------------------------------------------- the stream's side
def test_stream_runs_through_engines(models, tmp_path) -> None:
    """A stream whose runtime uses engines for UNet, VAE encoder and decoder gives the torch stream's frames;
    ``auto`` picks the engines when the UNet has one, and a UNet call with an extra the engine cannot take
    raises instead of running on torch in silence."""
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 35), cfg_type="self", guidance_scale=1.5)
    engines = OnnxEngines(models, config, tmp_path)
    frames = torch.rand(4, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    torch_stream = Stream(models, config.with_(acceleration="eager"), prompt="a cat")
    engine_stream = Stream(models, config.with_(acceleration="tensorrt"), prompt="a cat", engines=engines)
    assert engine_stream.acceleration is Acceleration.TENSORRT
    assert engine_stream.runtime.parts == {"unet": "engine", "vae_encoder": "engine", "vae_decoder": "engine"}
    assert models.unet is torch_stream.runtime.unet.module  # the pipeline's own UNet, unchanged
    expected = [torch_stream.step(frames[i:i + 1]).clone() for i in range(4)]
    got = [engine_stream.step(frames[i:i + 1]).clone() for i in range(4)]
    assert all(r.calls == 4 for r in engines.runners.values())
    # the first output comes from the all-zero latent buffer: GroupNorm of a constant row amplifies
    # rounding differences (1/sqrt(eps)), so that warm-up frame only agrees to a few 1e-3
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-2)
    for e, g in zip(expected[1:], got[1:]):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
    auto = Stream(models, config, prompt="a cat", engines=engines)
    assert auto.runtime.requested is Acceleration.AUTO and auto.acceleration is Acceleration.TENSORRT
    # an extra the UNet engine has no input for is an error, not a silent torch call
    buf = engine_stream.buffers
    calls = engines.runners["unet"].calls
    with pytest.raises(EngineCallError, match="no inputs for kv_cache"):
        engine_stream.runtime.unet(buf.unet_in, buf.timesteps, buf.embeds,
                                   UNetExtras(kv_cache=Stream(models, config.with_(
                                       acceleration="eager", kv_cache=KVCacheConfig(True, 2, 2))).kv))
    assert engines.runners["unet"].calls == calls


def test_partial_engines_are_reported(models, tmp_path) -> None:
    """Engines for the VAE only: ``tensorrt`` runs them and says that the UNet runs on torch; ``auto`` does not
    take a partial engine path (the UNet is what engines are for) and says why it chose the torch path."""
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20,), cfg_type="none")
    engines = OnnxEngines(models, config, tmp_path, components=("vae_encoder", "vae_decoder"))
    partial = Stream(models, config.with_(acceleration="tensorrt"), prompt="a cat", engines=engines)
    assert partial.runtime.parts == {"unet": "torch", "vae_encoder": "engine", "vae_decoder": "engine"}
    assert any("unet: on torch" in note for note in partial.runtime.notes), partial.runtime.notes
    assert "unet on torch" in partial.runtime.describe()
    auto = Stream(models, config, prompt="a cat", engines=engines)
    assert auto.acceleration is Acceleration.EAGER and auto.runtime.parts["vae_encoder"] == "torch"
    assert "stand-in engines" in auto.runtime.notes


def test_tensorrt_without_engines_says_why(models, cache) -> None:
    """Explicit ``tensorrt`` with no engine that runs here is an error naming the reasons; ``auto`` falls to the
    torch path and keeps the reasons as notes."""
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 35))
    source = CachedEngines(cache)
    with pytest.raises(AccelerationUnavailable, match="tensorrt.*cannot run here.*(CUDA|cuda)"):
        Stream(models, config.with_(acceleration="tensorrt"), engines=source)
    auto = Stream(models, config, engines=source)
    assert auto.acceleration is Acceleration.EAGER
    assert any("CUDA" in note or "cuda" in note for note in auto.runtime.notes)
    result = attach_engines(models, config, cache)
    assert not result.runners and any("CUDA" in note or "cuda" in note for note in result.notes)


def test_unet_engines_are_not_attached_to_prompts_of_another_length(models, cache, monkeypatch) -> None:
    """UNet engines take the text encoder's 77 tokens: a stream whose prompt buffer is longer (a long
    CONDITIONING) runs its UNet on torch and says why, as with cached attention. (A backend that runs here is
    pretended: the check comes before any engine is looked up.)"""
    from streamrt.engines import runner as runner_mod

    monkeypatch.setattr(runner_mod, "runtime_problem", lambda backend, device: None)
    monkeypatch.setattr(runner_mod, "installed_backends", lambda: {"tensorrt-rtx": "1.0"})
    monkeypatch.setattr(runner_mod, "local_target", lambda device: "SM89")
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 35))
    for length in (0, 77):
        notes = attach_engines(models, config.with_(prompt_length=length), cache, backend="tensorrt-rtx").notes
        assert any(note.startswith("no unet engine") for note in notes), notes
    notes = attach_engines(models, config.with_(prompt_length=154), cache, backend="tensorrt-rtx").notes
    assert "prompts of 154 tokens: the UNet runs on torch (its engines take 77)" in notes, notes
    assert not any(note.startswith("no unet engine") for note in notes), notes


# ------------------------------------------------------------------------- the runner, on a fake backend
class _Enum:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeTRT:
    """The slice of the TensorRT Python API EngineRunner uses, recording every call (no GPU needed).

    The "engine file" is JSON: ``{"inputs": {name: dtype}, "outputs": {name: [dtype, like_input]}}``; an
    output takes the shape of the input it names."""

    class Logger:
        WARNING = 2

        def __init__(self, severity) -> None:
            self.severity = severity

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    class ExecutionContextAllocationStrategy:
        STATIC, USER_MANAGED = "STATIC", "USER_MANAGED"

    calls: list = []

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes):
            return FakeEngine(json.loads(data))


class FakeEngine:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.names = list(spec["inputs"]) + list(spec["outputs"])
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return FakeTRT.TensorIOMode.INPUT if name in self.spec["inputs"] else FakeTRT.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> _Enum:
        spec = self.spec["inputs"].get(name) or self.spec["outputs"][name][0]
        return _Enum(spec)

    device_memory_size_v2 = 4096

    def create_execution_context(self, strategy=None):
        FakeTRT.calls.append(("create_execution_context", strategy))
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_device_memory(self, address, size) -> None:
        FakeTRT.calls.append(("set_device_memory", address, size))

    def set_input_shape(self, name, shape) -> bool:
        FakeTRT.calls.append(("set_input_shape", name, tuple(shape)))
        self.shapes[name] = tuple(shape)
        return shape[0] <= 4  # the "profile": at most 4 rows

    def get_tensor_shape(self, name):
        return self.shapes[self.engine.spec["outputs"][name][1]]

    def set_tensor_address(self, name, address) -> bool:
        FakeTRT.calls.append(("set_tensor_address", name, address))
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream) -> bool:
        FakeTRT.calls.append(("execute_async_v3", stream, dict(self.addresses)))
        return True


def fake_runner(monkeypatch, tmp_path):
    from streamrt.engines import runner as runner_mod

    class CpuRunner(runner_mod.EngineRunner):
        @staticmethod
        def _check_device(device):
            return torch.device("cpu")

        def _device_scope(self):
            return contextlib.nullcontext()

        def _device_name(self):
            return "fake"

        def _stream_handle(self):
            return 1234

        def _empty(self, shape, dtype):
            return torch.empty(shape, dtype=dtype)

    FakeTRT.calls = []
    monkeypatch.setattr(runner_mod, "import_backend", lambda backend: FakeTRT)
    path = tmp_path / "fake.engine"
    path.write_text(json.dumps({"inputs": {"sample": "HALF", "timestep": "INT64"},
                                "outputs": {"noise_pred": ["HALF", "sample"]}}))
    return CpuRunner(path, backend="tensorrt", input_names=["sample", "timestep"])


def test_runner_binds_once_and_reuses_its_outputs(monkeypatch, tmp_path) -> None:
    runner = fake_runner(monkeypatch, tmp_path)
    assert runner.input_names == ("sample", "timestep") and runner.output_names == ("noise_pred",)
    # the context's scratch memory is a torch tensor handed to TensorRT (user-managed allocation)
    assert FakeTRT.calls[:2] == [("create_execution_context", "USER_MANAGED"),
                                 ("set_device_memory", runner._workspace.data_ptr(), 4096)]
    FakeTRT.calls.clear()
    sample, timestep = torch.zeros(2, 4, 8, 8, dtype=torch.float16), torch.tensor([10, 20])
    out = runner(sample, timestep)
    assert out.shape == (2, 4, 8, 8) and out.dtype == torch.float16
    first = list(FakeTRT.calls)
    assert ("set_input_shape", "sample", (2, 4, 8, 8)) in first and first[-1][0] == "execute_async_v3"
    assert first[-1][2] == {"sample": sample.data_ptr(), "timestep": timestep.data_ptr(), "noise_pred": out.data_ptr()}
    assert first[-1][1] == 1234  # torch's current stream
    # same tensors again: nothing but the enqueue, into the same output buffer (what CUDA graph replay needs)
    FakeTRT.calls.clear()
    assert runner(sample, timestep) is out
    assert [c[0] for c in FakeTRT.calls] == ["execute_async_v3"]
    # another tensor of the same shape: only its address is rebound
    FakeTRT.calls.clear()
    other = sample.clone()
    assert runner(other, timestep) is out
    assert [c[:2] for c in FakeTRT.calls] == [("set_tensor_address", "sample"), ("execute_async_v3", 1234)]
    # a new batch: shapes set again and the output reallocated
    FakeTRT.calls.clear()
    out3 = runner(torch.zeros(3, 4, 8, 8, dtype=torch.float16), torch.tensor([1, 2, 3]))
    assert out3.shape == (3, 4, 8, 8)
    assert ("set_tensor_address", "noise_pred", out3.data_ptr()) in FakeTRT.calls


def test_runner_stages_other_dtypes_and_refuses_bad_calls(monkeypatch, tmp_path) -> None:
    runner = fake_runner(monkeypatch, tmp_path)
    sample32 = torch.randn(1, 4, 8, 8)  # a float32 pipeline on a fp16 engine: converted into a staging buffer
    runner(sample32, torch.tensor([5]))
    bound = FakeTRT.calls[-1][2]["sample"]
    assert bound != sample32.data_ptr()
    staging = runner._inputs[0].tensor
    assert staging.dtype == torch.float16 and bound == staging.data_ptr()
    torch.testing.assert_close(staging.float(), sample32, atol=1e-3, rtol=1e-3)
    with pytest.raises(TypeError, match="takes 2 inputs"):
        runner(sample32)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        runner(torch.zeros(5, 4, 8, 8, dtype=torch.float16), torch.zeros(5, dtype=torch.int64))


def test_runner_needs_a_cuda_device(tmp_path) -> None:
    from streamrt.engines import EngineLoadError, EngineRunner, runtime_problem

    with pytest.raises(EngineLoadError, match="CUDA devices"):
        EngineRunner(tmp_path / "x.engine", backend="tensorrt-rtx", device="cpu")
    assert "cpu" in runtime_problem("tensorrt-rtx", "cpu")
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in runtime_problem("tensorrt-rtx", "cuda")


def test_unet_rows_follow_the_stream_config() -> None:
    from streamrt.engines import unet_rows

    assert unet_rows(1, 2, "self") == 2 and unet_rows(2, 2, "none") == 4
    assert unet_rows(1, 2, "full") == 4 and unet_rows(2, 3, "initialize") == 8
    assert unet_rows(1, 2, "full", guided=False) == 2
