"""ONNX export of the UNet and the VAE encoder / decoder: every exported graph matches torch under onnxruntime.

Tiny random-weight models (``streamrt.random_models``), on the CPU. Static and dynamic (rows and
resolution ranges) exports are run by onnxruntime at their min / opt / max shapes and compared with
the torch module the graph came from; the stock wrappers are checked against the stream's eager runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from engine_helpers import kv_component, ort_session, tiny_stream_models

from streamrt import StreamConfig, StreamModels, prepare
from streamrt.engines import EngineShapes, component_for, export_onnx
from streamrt.engines import export as export_mod
from streamrt.engines.spec import DimRange
from streamrt.runtime import NO_EXTRAS

pytest.importorskip("onnxruntime")

FP32_TOL = dict(rtol=1e-3, atol=2e-4)
FP16_TOL = dict(rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def models() -> dict[str, StreamModels]:
    return {"taesd": tiny_stream_models("taesd"), "kl": tiny_stream_models("kl")}


def run_onnx(path, names, inputs) -> list[np.ndarray]:
    return ort_session(path).run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})


def torch_outputs(component, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = component.module(*inputs)
    return list(out) if isinstance(out, tuple) else [out]


def assert_matches(component, path, shapes, which: str, dtype=torch.float32, tol=FP32_TOL) -> None:
    inputs = component.example_inputs(shapes, dtype, "cpu", which=which, seed=3)
    got = run_onnx(path, component.input_names, inputs)
    expected = torch_outputs(component, inputs)
    assert len(got) == len(expected) == len(component.outputs)
    for name, g, e in zip(component.output_names, got, expected):
        assert g.shape == tuple(e.shape), f"{name} at {which}: {g.shape} vs {tuple(e.shape)}"
        where = f"{component.name}/{name} at {which} shapes"
        torch.testing.assert_close(torch.from_numpy(g).float(), e.float(), **tol, msg=lambda m, w=where: f"{w}: {m}")


STATIC = EngineShapes.static(rows=2, width=64, height=64)
DYNAMIC = EngineShapes(rows=DimRange(1, 2, 3), height=DimRange(32, 64, 96), width=DimRange(32, 48, 96))


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vae", ["taesd", "kl"])
def test_wrappers_are_the_stream_models_calls(models, vae) -> None:
    """The modules that get exported compute exactly what the stream's eager runtime computes."""
    m = models[vae]
    runtime = prepare(m, StreamConfig(width=64, height=64), "eager")
    gen = torch.Generator().manual_seed(1)
    sample, embeds = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, m.embed_dim, generator=gen)
    timesteps = torch.tensor([500, 250])
    images, latents = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1, torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        unet = component_for(m, "unet").module
        assert torch.equal(unet(sample, timesteps, embeds), runtime.unet(sample, timesteps, embeds, NO_EXTRAS))
        assert torch.equal(component_for(m, "vae_encoder").module(images), runtime.encode(images))
        assert torch.equal(component_for(m, "vae_decoder").module(latents), runtime.decode(latents))


@pytest.mark.parametrize("vae,name", [("taesd", "unet"), ("taesd", "vae_encoder"), ("taesd", "vae_decoder"),
                                      ("kl", "vae_encoder"), ("kl", "vae_decoder")])
@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_export_matches_torch_under_onnxruntime(models, tmp_path, vae, name, kind) -> None:
    component = component_for(models[vae], name)
    shapes = STATIC if kind == "static" else DYNAMIC
    if name != "unet":
        shapes = EngineShapes(DimRange.fixed(1) if kind == "static" else DimRange(1, 1, 2), shapes.height, shapes.width)
    exported = export_onnx(component, shapes, tmp_path / f"{name}.onnx", precision="fp32")
    graph = onnx.load(str(exported.path))
    assert graph.opset_import[0].version >= 17
    assert [i.name for i in graph.graph.input] == component.input_names
    assert [o.name for o in graph.graph.output] == component.output_names
    first = graph.graph.input[0].type.tensor_type.shape.dim
    if kind == "static":
        assert all(d.HasField("dim_value") for d in first), "a static export has no symbolic axis"
        assert_matches(component, exported.path, shapes, "opt")
    else:
        assert first[0].dim_param == "rows"
        for which in ("min", "opt", "max"):
            assert_matches(component, exported.path, shapes, which)


def test_fp16_export_types_and_values(models, tmp_path) -> None:
    """fp16 graphs take fp16 tensors (int64 timesteps) and match the fp16 torch model; the shared fp32
    models are exported from a cast copy and stay fp32."""
    m = models["taesd"]
    for name in ("unet", "vae_decoder"):
        component = component_for(m, name)
        shapes = STATIC if name == "unet" else EngineShapes.static(1, 64, 64)
        exported = export_onnx(component, shapes, tmp_path / name / "model.onnx", precision="fp16")
        graph = onnx.load(str(exported.path))
        types = {i.name: i.type.tensor_type.elem_type for i in graph.graph.input}
        for spec in component.inputs:
            want = onnx.TensorProto.INT64 if spec.dtype == "int64" else onnx.TensorProto.FLOAT16
            assert types[spec.name] == want, spec.name
        half = export_mod._module_in(component.module, torch.float16)
        inputs = component.example_inputs(shapes, torch.float16, "cpu", seed=5)
        got = run_onnx(exported.path, component.input_names, inputs)[0]
        with torch.no_grad():
            expected = half(*inputs)
        torch.testing.assert_close(torch.from_numpy(got).float(), expected.float(), **FP16_TOL)
    assert {p.dtype for p in m.unet.parameters()} == {torch.float32}
    assert {p.dtype for p in m.vae.parameters()} == {torch.float32}
    # the fast CPU fp16 trace runs channels-last on a copy: the shared weights keep their layout
    assert all(p.is_contiguous() for p in (*m.unet.parameters(), *m.vae.parameters()))


@pytest.mark.parametrize("how", ["flag", "automatic"])
def test_external_data_export(models, tmp_path, monkeypatch, how) -> None:
    """Weights in one external ``.onnx.data`` file beside the graph: on request, or past the size threshold."""
    component = component_for(models["taesd"], "vae_decoder")
    shapes = EngineShapes.static(1, 64, 64)
    if how == "automatic":
        monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", 1000)
    folder = tmp_path / "out"
    exported = export_onnx(component, shapes, folder / "decoder.onnx", precision="fp32",
                           external_data=True if how == "flag" else None)
    assert exported.external_data
    assert sorted(p.name for p in folder.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    graph = onnx.load(str(exported.path), load_external_data=False)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "no initializer was written externally"
    assert exported.path.stat().st_size < exported.data_path.stat().st_size
    assert_matches(component, exported.path, shapes, "opt")


def test_small_models_stay_in_one_file(models, tmp_path) -> None:
    exported = export_onnx(component_for(models["taesd"], "vae_encoder"), EngineShapes.static(1, 64, 64),
                           tmp_path / "enc.onnx", precision="fp32")
    assert not exported.external_data and [p.name for p in tmp_path.iterdir()] == ["enc.onnx"]


def test_extension_point_adds_named_io(models, tmp_path) -> None:
    """``with_io``: extra named inputs/outputs with their own shape symbols export, profile and run."""
    component = kv_component(models["taesd"])
    assert component.input_names == ["sample", "timestep", "encoder_hidden_states", "kv_ring"]
    assert component.output_names == ["noise_pred", "kv_current"]
    assert component.cache_window == 2
    shapes = EngineShapes.static(rows=2, width=64, height=64)
    with pytest.raises(ValueError, match="kv_tokens"):
        component.profile(shapes)  # the new symbols must be given
    shapes = shapes.with_extra(kv_tokens=(64, 128, 192), latent_tokens=64)
    profile = component.profile(shapes)
    assert profile["kv_ring"] == ((2, 64, 32), (2, 128, 32), (2, 192, 32))
    exported = export_onnx(component, shapes, tmp_path / "unet_kv.onnx", precision="fp32")
    for which in ("min", "max"):
        assert_matches(component, exported.path, shapes, which)
    assert "kv_tokens" in shapes.label()


def test_shape_checks(models) -> None:
    unet = component_for(models["taesd"], "unet")
    with pytest.raises(ValueError, match="multiples of 16"):
        unet.profile(EngineShapes.static(1, 72, 64))        # latent 9x8: the tiny UNet downsamples by 2
    with pytest.raises(ValueError, match="multiples of 8"):
        component_for(models["taesd"], "vae_decoder").profile(EngineShapes.static(1, 60, 64))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        DimRange(64, 32, 96)
    with pytest.raises(ValueError, match="within the size range"):
        EngineShapes.ranged(1, 512, 512, 256, 384)
    with pytest.raises(ValueError, match="precision"):
        export_onnx(unet, STATIC, "x.onnx", precision="int8")
