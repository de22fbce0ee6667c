"""ControlNets in engines (issue #16): the ControlNet's own engine, a UNet engine that takes the residuals, the key.

Real diffusers models with small random weights (``tiny``: SD1-shaped; ``tiny-xl``: SDXL-shaped), ControlNets made
from their UNets (tests/test_stream_controlnet.py's ``tiny_controlnet``, weights perturbed so that the residuals
are far from zero), on the CPU in float32:

- the ControlNet component exports to ONNX with named residual outputs, and onnxruntime gives diffusers'
  ``ControlNetModel`` residuals (times the per-row scale) at the min / opt / max of a dynamic range;
- the UNet built for ControlNets takes those names as inputs and onnxruntime gives diffusers' UNet called with
  ``down_block_additional_residuals`` / ``mid_block_additional_residual``;
- a stream with two ControlNets runs its UNet and both ControlNets on such "engines" (onnxruntime sessions standing
  in for TensorRT-RTX runners: no machine here can run an engine) and gives the torch stream's frames, at strength 0
  too (the UNet engine then reads zeros allocated once) and after a live strength change;
- a plain UNet engine is refused for a stream with ControlNets and a residual one for a stream without, saying why;
- the key: ``control`` separates the two UNets without changing any existing key; ControlNet engines are keyed by
  the ControlNet's weights;
- real TensorRT-RTX builds (SM89, ahead of time on this CPU machine) of the tiny ControlNet and the tiny residual
  UNet, skipped with the reason where ``tensorrt-rtx`` or ``polygraphy`` is not installed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

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
from stream_helpers import make_frames
from test_stream_controlnet import tiny_controlnet

from streamrt import AccelerationUnavailable, Stream, StreamConfig
from streamrt.controlnet import ControlNet, TorchControlNet
from streamrt.engines import (
    EngineCache,
    EngineKey,
    EngineRequest,
    EngineShapes,
    InvalidEngineError,
    attach_controlnet_engine,
    attach_engines,
    build_engines,
    component_for,
    controlnet_fingerprint,
    engine_key,
    ensure_engine,
    export_onnx,
    requests_for_stream,
    weights_fingerprint,
)
from streamrt.engines import build as build_mod
from streamrt.engines import runner as runner_mod
from streamrt.engines.spec import DimRange
from streamrt.runtime import Acceleration, EngineCallError, EngineControlNet, EngineUNet, UNetExtras
from streamrt.runtime.runtime import UNET_INPUTS

pytest.importorskip("onnxruntime")

SIZE = 64
DYNAMIC = EngineShapes(rows=DimRange(1, 2, 3), height=DimRange(32, 64, 96), width=DimRange(32, 48, 96))
#: tiny UNet (block channels 32, 64; one layer per block): conv_in, the block-0 layer, its downsampler, the
#: block-1 layer, then the mid block
RESIDUALS = ["down_residual_0", "down_residual_1", "down_residual_2", "down_residual_3", "mid_residual"]
PROMPT = "a cat"


@pytest.fixture(scope="module")
def sd1():
    return tiny_stream_models(seed=0)


@pytest.fixture(scope="module")
def nets(sd1):
    return [tiny_controlnet(sd1.unet, seed) for seed in (1, 2)]


def config(**changes) -> StreamConfig:
    base = dict(width=SIZE, height=SIZE, t_index_list=(20, 35), cfg_type="self", guidance_scale=1.5)
    base.update(changes)
    return StreamConfig(**base)


def inputs_for(component, shapes, which: str, seed: int = 3) -> list[torch.Tensor]:
    """The component's example inputs, with control images in [0, 1], per-row scales (the last row's 0) and, for
    SDXL, size conditions that look like a stream's."""
    inputs = list(component.example_inputs(shapes, torch.float32, "cpu", which=which, seed=seed))
    names = component.input_names
    gen = torch.Generator().manual_seed(seed)
    if "controlnet_cond" in names:
        cond = inputs[names.index("controlnet_cond")]
        inputs[names.index("controlnet_cond")] = torch.rand(cond.shape, generator=gen)
        rows = cond.shape[0]
        inputs[names.index("conditioning_scale")] = torch.linspace(1.3, 0.0, rows).view(rows, 1, 1, 1)
    if "time_ids" in names:
        sample = inputs[names.index("sample")]
        h, w = sample.shape[-2] * 8, sample.shape[-1] * 8
        inputs[names.index("time_ids")] = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(
            sample.shape[0], 1)
    return inputs


def diffusers_residuals(net, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The reference: diffusers' ControlNetModel called directly at scale 1, then times each row's scale."""
    kwargs = {}
    if "text_embeds" in inputs:
        kwargs["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    with torch.no_grad():
        down, mid = net(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                        controlnet_cond=inputs["controlnet_cond"], conditioning_scale=1.0, return_dict=False, **kwargs)
    scale = inputs["conditioning_scale"]
    return [r * scale for r in (*down, mid)]


def assert_close_relative(got, want, tol: float = 1e-4, what: str = "") -> None:
    """Max abs difference within ``tol`` of the reference's magnitude (the perturbed residuals reach ~1e2)."""
    bound = tol * max(want.abs().max().item(), 1.0)
    diff = (torch.as_tensor(got) - want).abs().max().item()
    assert diff <= bound, f"{what}: differs by {diff:.3g} (allowed {bound:.3g})"


# --------------------------------------------------------------------------------------------- export
def test_controlnet_component_io(sd1, nets) -> None:
    """The ControlNet engine takes the UNet's inputs plus the control images and the per-row scale, and gives one
    named output per residual, shaped like the UNet's skip connections (derived symbols for the halved sizes)."""
    component = component_for(sd1, "controlnet", controlnet=nets[0])
    assert component.input_names == [*UNET_INPUTS, "controlnet_cond", "conditioning_scale"]
    assert component.output_names == RESIDUALS
    dims = {t.name: t.dims for t in (*component.inputs, *component.outputs)}
    assert dims["controlnet_cond"] == ("rows", 3, "height", "width")
    assert dims["conditioning_scale"] == ("rows", 1, 1, 1)
    assert dims["down_residual_2"] == ("rows", 32, "latent_height_div2", "latent_width_div2")
    assert dims["mid_residual"] == ("rows", 64, "latent_height_div2", "latent_width_div2")
    assert component.dynamic_axes(DYNAMIC)["down_residual_3"] == {0: "rows", 2: "latent_height_div2",
                                                                   3: "latent_width_div2"}
    unet = component_for(sd1, "unet", control=True)
    assert unet.input_names == [*UNET_INPUTS, *RESIDUALS]
    assert [t.dims for t in unet.inputs[3:]] == [t.dims for t in component.outputs]
    assert unet.profile(DYNAMIC)["down_residual_2"] == ((1, 32, 2, 2), (2, 32, 4, 3), (3, 32, 6, 6))
    with pytest.raises(ValueError, match="needs the ControlNet module"):
        component_for(sd1, "controlnet")
    with pytest.raises(ValueError, match="only the UNet takes ControlNet residuals"):
        component_for(sd1, "vae_decoder", control=True)


def test_controlnet_of_another_unet_is_refused(sd1) -> None:
    xl = tiny_xl_stream_models(seed=0)
    with pytest.raises(ValueError, match="does not fit the SD1.x pipeline's UNet .*text embeddings 64 wide"):
        component_for(sd1, "controlnet", controlnet=tiny_controlnet(xl.unet, 1))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_controlnet_and_residual_unet_exports_match_diffusers(sd1, nets, family, tmp_path) -> None:
    """onnxruntime on the exported ControlNet gives diffusers' residuals times each row's scale, and on the UNet
    built for ControlNets gives diffusers' UNet with those residuals added, at the three corners of a dynamic range
    (SDXL: at its opt shape, with its added conditions as inputs of both). The residuals change the prediction by
    far more than the tolerance, so a UNet graph that dropped them would fail."""
    if family == "sd1":
        models, net, corners = sd1, nets[0], ("min", "opt", "max")
    else:
        models = tiny_xl_stream_models(seed=0)
        net, corners = tiny_controlnet(models.unet, 3), ("opt",)
    control = component_for(models, "controlnet", controlnet=net)
    unet = component_for(models, "unet", control=True)
    if family == "sdxl":
        assert control.input_names[-2:] == ["text_embeds", "time_ids"]
        assert unet.input_names[3:5] == ["text_embeds", "time_ids"] and unet.input_names[5:] == RESIDUALS
    control_session = ort_session(export_onnx(control, DYNAMIC, tmp_path / "cn.onnx", precision="fp32").path)
    unet_session = ort_session(export_onnx(unet, DYNAMIC, tmp_path / "unet.onnx", precision="fp32").path)
    for which in corners:
        given = dict(zip(control.input_names, inputs_for(control, DYNAMIC, which)))
        want = diffusers_residuals(net, given)
        rows = want[0].shape[0]
        assert want[0][0].abs().max() > 1 and (rows == 1 or want[0][-1].abs().max() == 0)  # last row's scale: 0
        got = control_session.run(None, {n: t.numpy() for n, t in given.items()})
        for name, g, w in zip(control.output_names, got, want):
            assert g.shape == tuple(w.shape)
            assert_close_relative(g, w, what=f"{family} {which} {name}")
        feeds = {n: given[n] for n in unet.input_names[:len(unet.input_names) - len(RESIDUALS)]}
        feeds.update(dict(zip(RESIDUALS, want)))
        added = ({"added_cond_kwargs": {"text_embeds": given["text_embeds"], "time_ids": given["time_ids"]}}
                 if family == "sdxl" else {})
        with torch.no_grad():
            reference = models.unet(given["sample"], given["timestep"], encoder_hidden_states=given[
                "encoder_hidden_states"], down_block_additional_residuals=want[:-1],
                mid_block_additional_residual=want[-1], return_dict=False, **added)[0]
            plain = models.unet(given["sample"], given["timestep"], encoder_hidden_states=given[
                "encoder_hidden_states"], return_dict=False, **added)[0]
        out = unet_session.run(None, {n: t.numpy() for n, t in feeds.items()})[0]
        assert_close_relative(out, reference, tol=2e-4, what=f"{family} {which} noise_pred")
        assert (plain - reference).abs().max() > 100 * 2e-4 * max(reference.abs().max().item(), 1.0)


# ------------------------------------------------------------------------------------- engine calls
def test_engine_unet_feeds_residuals_and_preallocated_zeros(sd1, nets, tmp_path) -> None:
    """EngineUNet hands the runner the residuals it is given in the engine's input order; on a call where no
    ControlNet ran it hands over the same zero tensors every time (allocated once, never written)."""
    unet = component_for(sd1, "unet", control=True)
    path = export_onnx(unet, DYNAMIC, tmp_path / "unet.onnx", precision="fp32").path
    shuffled = [unet.input_names[i] for i in (4, 0, 7, 1, 3, 2, 5, 6)]  # the engine's order is its own
    runner = OnnxRuntimeRunner(path, shuffled, ["noise_pred"])
    cfg = config()
    from streamrt.controlnet import ControlResiduals
    from streamrt.runtime import zero_control_residuals

    zeros = zero_control_residuals(sd1, cfg)
    assert [tuple(z.shape) for z in zeros] == [(2, 32, 8, 8), (2, 32, 8, 8), (2, 32, 4, 4), (2, 64, 4, 4),
                                               (2, 64, 4, 4)]
    call = EngineUNet(runner, "the test engine", zero_residuals=zeros)
    assert call.accepts == frozenset({"control"}) and call.down_residuals == 4
    given = dict(zip(unet.input_names, inputs_for(unet, EngineShapes.static(2, SIZE, SIZE), "opt")))
    residuals = ControlResiduals()
    extras = UNetExtras(control=residuals)
    sample, t, embeds = given["sample"], given["timestep"], given["encoder_hidden_states"]
    residuals.down, residuals.mid = [given[n] for n in RESIDUALS[:-1]], given["mid_residual"]
    with torch.no_grad():
        reference = sd1.unet(sample, t, encoder_hidden_states=embeds, down_block_additional_residuals=residuals.down,
                             mid_block_additional_residual=residuals.mid, return_dict=False)[0]
        plain = sd1.unet(sample, t, encoder_hidden_states=embeds, return_dict=False)[0]
    torch.testing.assert_close(call(sample, t, embeds, extras), reference, rtol=1e-4, atol=1e-4)
    assert runner.bound[-1]["down_residual_3"] == given["down_residual_3"].data_ptr()
    residuals.down = residuals.mid = None  # every ControlNet at strength 0
    for _ in range(2):
        torch.testing.assert_close(call(sample, t, embeds, extras), plain, rtol=1e-4, atol=1e-4)
    assert runner.bound[-1] == runner.bound[-2]
    assert [runner.bound[-1][n] for n in RESIDUALS] == [z.data_ptr() for z in zeros]
    assert all(z.abs().max() == 0 for z in zeros)
    with pytest.raises(EngineCallError, match="takes control .*ControlNet residuals.* the call gave none"):
        call(sample, t, embeds, UNetExtras())
    residuals.down, residuals.mid = [given[n] for n in RESIDUALS[:-2]], given["mid_residual"]
    with pytest.raises(EngineCallError, match="takes 4 down residuals, the ControlNets gave 3"):
        call(sample, t, embeds, extras)
    with pytest.raises(EngineCallError, match="no zero residuals"):
        residuals.down = residuals.mid = None
        EngineUNet(runner)(sample, t, embeds, extras)
    with pytest.raises(EngineCallError, match="down residuals without the mid one"):
        EngineUNet(runner, input_names=[*UNET_INPUTS, *RESIDUALS[:-1]])


def test_engine_controlnet_returns_the_runner_outputs_and_checks_its_io(sd1, nets, tmp_path) -> None:
    """EngineControlNet has TorchControlNet's signature and results; a runner whose outputs are not the residual
    names, or an SD1 engine called with added conditions, is refused naming the problem."""
    component = component_for(sd1, "controlnet", controlnet=nets[0])
    path = export_onnx(component, DYNAMIC, tmp_path / "cn.onnx", precision="fp32").path
    runner = OnnxRuntimeRunner(path, component.input_names, list(reversed(component.output_names)))
    call = EngineControlNet(runner)
    given = inputs_for(component, DYNAMIC, "max")
    down, mid = call(*given, None)
    want_down, want_mid = TorchControlNet(nets[0])(*given, None)
    assert len(down) == 4
    for got, want in zip((*down, mid), (*want_down, want_mid)):
        assert_close_relative(got, want)
    with pytest.raises(EngineCallError, match="takes no added conditions .*built for another family"):
        call(*given, {"text_embeds": given[0], "time_ids": given[0]})
    with pytest.raises(EngineCallError, match="an output noise_pred that is no residual"):
        EngineControlNet(runner, output_names=[*RESIDUALS, "noise_pred"])
    with pytest.raises(EngineCallError, match="no input conditioning_scale"):
        EngineControlNet(runner, input_names=component.input_names[:4])


# ------------------------------------------------------------------------------ streams on "engines"
def test_stream_with_controlnets_runs_through_engines(sd1, nets, tmp_path) -> None:
    """Two ControlNets and the UNet on stand-in engines give the torch stream's frames: with both on, after a live
    change to strength 0 (the UNet engine reads its zeros; no ControlNet engine runs) and back. Each ControlNet has
    a runner of its own, and the UNet engine was asked for as one for ControlNets."""
    cfg = config()
    engines = OnnxEngines(sd1, cfg, tmp_path, control=True, controlnets=nets)

    def stream(acceleration: str) -> Stream:
        return Stream(sd1, cfg.with_(acceleration=acceleration), prompt=PROMPT,
                      controlnets=[ControlNet(nets[0], 0.8), ControlNet(nets[1], 0.5, start=0.3)],
                      engines=engines if acceleration == "tensorrt" else None)

    on_engines, on_torch = stream("tensorrt"), stream("eager")
    assert engines.attached == [True]
    assert on_engines.runtime.parts == {"unet": "engine", "vae_encoder": "engine", "vae_decoder": "engine",
                                        "controlnet": "engine"}
    assert isinstance(on_engines.runtime.unet, EngineUNet) and on_engines.runtime.unet.accepts == {"control"}
    assert len(engines.controlnet_runners) == 2
    frames, controls = make_frames(7, seed=5), [make_frames(7, seed=6), make_frames(7, seed=7)]
    unet = engines.runners["unet"]
    zeros = [z.data_ptr() for z in on_engines.runtime.unet.zero_residuals]
    for i in range(7):
        if i == 3:
            for s in (on_engines, on_torch):
                s.set_control_strength(0, 0.0)
                s.set_control_strength(1, 0.0)
        if i == 5:
            for s in (on_engines, on_torch):
                s.set_control_strength(1, 1.2)
        control = [c[i:i + 1] for c in controls]
        got, want = on_engines.step(frames[i:i + 1], control=control), on_torch.step(frames[i:i + 1], control=control)
        # the first output comes from the all-zero latent buffer (GroupNorm of a constant row amplifies rounding,
        # see tests/test_engine_build.py): it agrees to a few 1e-3 only
        torch.testing.assert_close(got, want, rtol=0, atol=1e-2 if i == 0 else 1e-5,
                                   msg=lambda m, i=i: f"frame {i}: {m}")
        bound = [unet.bound[-1][n] for n in RESIDUALS]
        assert (bound == zeros) == (i in (3, 4)), f"frame {i}: the zero residuals fed exactly while all are at 0"
    assert [r.calls for r in engines.controlnet_runners] == [3, 5]
    assert unet.calls == 7


def test_controlnet_engine_buffers_are_summed_in_place_and_bound_once(sd1, nets, tmp_path) -> None:
    """With ControlNet runners that rewrite the same output buffers every call (as EngineRunner does), the residuals
    of several ControlNets are summed in place into the first one's buffers, which the UNet engine then reads: still
    the torch stream's frames, with the UNet bound to the same residual tensors on every call (no rebinding, nothing
    allocated). The same ControlNet applied twice gets two runners: one shared runner would have its first call's
    outputs overwritten by the second before the sum (twice the second's residuals), which this comparison catches."""
    cfg = config()
    engines = OnnxEngines(sd1, cfg, tmp_path, control=True, controlnets=nets, persistent=True)
    applied = [ControlNet(nets[0], 0.7), ControlNet(nets[1], 0.6), ControlNet(nets[0], 0.4)]
    on_engines = Stream(sd1, cfg.with_(acceleration="tensorrt"), prompt=PROMPT, engines=engines,
                        controlnets=[ControlNet(c.model, c.strength) for c in applied])
    on_torch = Stream(sd1, cfg.with_(acceleration="eager"), prompt=PROMPT,
                      controlnets=[ControlNet(c.model, c.strength) for c in applied])
    assert on_engines.runtime.parts["controlnet"] == "engine" and len(engines.controlnet_runners) == 3
    first = engines.controlnet_runners[0]
    frames = make_frames(4, seed=11)
    controls = [make_frames(4, seed=12 + k) for k in range(3)]
    unet = engines.runners["unet"]
    for i in range(4):
        control = [c[i:i + 1] for c in controls]
        got, want = on_engines.step(frames[i:i + 1], control=control), on_torch.step(frames[i:i + 1], control=control)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-2 if i == 0 else 1e-5,
                                   msg=lambda m, i=i: f"frame {i}: {m}")
    assert [unet.bound[-1][n] for n in RESIDUALS] == [t.data_ptr() for t in first._result]
    assert all(b == unet.bound[-1] for b in unet.bound)
    assert [r.calls for r in engines.controlnet_runners] == [4, 4, 4]


def test_sdxl_stream_with_a_controlnet_runs_through_engines(tmp_path) -> None:
    """SDXL: the ControlNet engine takes the stream's pooled embeddings and size conditions after its own inputs,
    the UNet engine its added conditions and then the residuals; with full CFG (negative rows) the frames are the
    torch stream's, and the pooled embeddings reach the ControlNet engine (the stream's own buffers)."""
    xl = tiny_xl_stream_models(seed=0)
    net = tiny_controlnet(xl.unet, 4)
    cfg = config(cfg_type="full")
    engines = OnnxEngines(xl, cfg, tmp_path, control=True, controlnets=[net])

    def stream(acceleration: str) -> Stream:
        return Stream(xl, cfg.with_(acceleration=acceleration), prompt=PROMPT, negative_prompt="blurry photo",
                      controlnets=[ControlNet(net, 0.9)], engines=engines if acceleration == "tensorrt" else None)

    on_engines, on_torch = stream("tensorrt"), stream("eager")
    assert on_engines.runtime.parts["unet"] == on_engines.runtime.parts["controlnet"] == "engine"
    assert on_engines.runtime.unet.accepts == {"added_cond", "control"}
    frames, controls = make_frames(3, seed=21), make_frames(3, seed=22)
    for i in range(3):
        torch.testing.assert_close(on_engines.step(frames[i:i + 1], control=[controls[i:i + 1]]),
                                   on_torch.step(frames[i:i + 1], control=[controls[i:i + 1]]), rtol=0,
                                   atol=1e-2 if i == 0 else 1e-5, msg=lambda m, i=i: f"frame {i}: {m}")
    [runner] = engines.controlnet_runners
    assert runner.calls == 3
    assert runner.bound[-1]["text_embeds"] == on_engines.buffers.pooled.data_ptr()
    assert runner.bound[-1]["time_ids"] == on_engines.buffers.time_ids.data_ptr()


def test_controlnet_without_an_engine_runs_on_torch_with_a_note(sd1, nets, tmp_path) -> None:
    cfg = config()
    engines = OnnxEngines(sd1, cfg, tmp_path, control=True, controlnets=nets[:1])
    stream = Stream(sd1, cfg.with_(acceleration="tensorrt"), prompt=PROMPT, engines=engines,
                    controlnets=[ControlNet(nets[0]), ControlNet(nets[1])])
    runtime = stream.runtime
    assert runtime.parts["unet"] == "engine" and runtime.parts["controlnet"] == "torch"
    assert any(n.startswith("controlnet: no stand-in engine for this ControlNet; it runs on torch")
               for n in runtime.notes), runtime.notes
    assert "(controlnet on torch)" in runtime.describe()
    stream.step(make_frames(1, seed=1), control=[make_frames(1, seed=2)] * 2)
    assert [r.calls for r in engines.controlnet_runners] == [1]


def test_unet_engines_are_chosen_by_whether_the_stream_has_controlnets(sd1, nets, tmp_path) -> None:
    """A plain UNet engine never runs a stream with ControlNets (its residuals would be dropped), nor one built
    for ControlNets a stream without: ``tensorrt`` with only such an engine is refused naming why, ``auto`` runs on
    torch with the note."""
    cfg = config()
    plain = OnnxEngines(sd1, cfg, tmp_path / "plain", components=("unet",))
    with pytest.raises(AccelerationUnavailable, match="has no inputs for ControlNet residuals, which this SD1.x "
                                                      "stream gives every call .*build one for ControlNets"):
        Stream(sd1, cfg.with_(acceleration="tensorrt"), prompt=PROMPT, engines=plain,
               controlnets=[ControlNet(nets[0])])
    residual = OnnxEngines(sd1, cfg, tmp_path / "residual", components=("unet",), control=True)
    with pytest.raises(AccelerationUnavailable, match="takes ControlNet residuals, and this SD1.x stream has no "
                                                      "ControlNets"):
        Stream(sd1, cfg.with_(acceleration="tensorrt"), prompt=PROMPT, engines=residual)
    auto = Stream(sd1, cfg, prompt=PROMPT, engines=plain, controlnets=[ControlNet(nets[0])])
    assert auto.acceleration is Acceleration.EAGER and any("ControlNet residuals" in n for n in auto.runtime.notes)
    assert plain.runners["unet"].calls == 0 and residual.runners["unet"].calls == 0


# ------------------------------------------------------------------------------------------- the key
def test_control_key_field_leaves_existing_keys_alone(sd1, nets, monkeypatch, tmp_path) -> None:
    """A plain key's JSON has exactly the fields it had before ``control`` existed (so every engine built before
    keeps its digest, file name and validity); a UNet for ControlNets differs in that field only, and both round
    trip through their sidecars; a sidecar whose control flag is not a boolean is refused."""
    monkeypatch.setattr(build_mod, "backend_version", lambda backend: "1.7.1.116")
    cfg = config()
    requests = requests_for_stream(cfg, target=TARGET, control=True)
    assert [(r.component, r.control) for r in requests] == [("unet", True), ("vae_encoder", False),
                                                             ("vae_decoder", False), ("controlnet", False)]
    assert requests[3].shapes == requests[0].shapes
    plain_request = replace(requests[0], control=False)
    plain, control = engine_key(sd1, plain_request), engine_key(sd1, requests[0])
    assert set(plain.to_json()) == {"weights", "family", "component", "shapes", "precision", "backend",
                                    "backend_version", "target", "cache_window", "format"}
    assert control.differences(plain) == ["control: False != True"]
    assert control.digest() != plain.digest() and "unet-control_" in control.file_name()
    assert EngineKey.from_json(control.to_json()) == control and EngineKey.from_json(plain.to_json()) == plain
    cache = EngineCache(tmp_path / "engines")
    for key in (plain, control):
        with cache.staging() as staging:
            (staging / "e").write_bytes(b"x" * 64)
            cache.commit(key, staging / "e")
        assert cache.lookup(key).hit
    find = dict(rows=cfg.unet_rows, width=SIZE, height=SIZE)
    assert [r.key for r in cache.find(plain.weights, "unet", **find)] == [plain]
    assert [r.key for r in cache.find(plain.weights, "unet", control=True, **find)] == [control]
    sidecar = cache.meta_path(cache.engine_path(control))
    meta = json.loads(sidecar.read_text())
    meta["key"]["control"] = "yes"
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(InvalidEngineError, match="control must be true or false"):
        cache.verify(cache.engine_path(control))
    with pytest.raises(ValueError, match="only a UNet engine takes ControlNet residuals"):
        EngineRequest("vae_decoder", plain_request.shapes, control=True)
    with pytest.raises(ValueError, match="pass control=True"):
        requests_for_stream(cfg, components=("controlnet",))


def test_controlnet_engines_are_keyed_by_the_controlnets_weights(sd1, nets, monkeypatch) -> None:
    monkeypatch.setattr(build_mod, "backend_version", lambda backend: "1.7.1.116")
    request = requests_for_stream(config(), target=TARGET, control=True)[3]
    first, second = (engine_key(sd1, request, controlnet=net) for net in nets)
    assert first.weights == controlnet_fingerprint(nets[0]) != weights_fingerprint(sd1)
    assert first.weights.startswith("controlnet-") and first.weights != second.weights
    assert first.family == "sd1" and first.component == "controlnet" and not first.control
    copy = tiny_controlnet(sd1.unet, 1)  # the same weights in another module: the same engines
    assert engine_key(sd1, request, controlnet=copy) == first
    with torch.no_grad():
        changed = tiny_controlnet(sd1.unet, 1)
        changed.controlnet_mid_block.bias.add_(1e-3)
    assert engine_key(sd1, request, controlnet=changed).weights != first.weights
    with pytest.raises(ValueError, match="needs its ControlNet module"):
        engine_key(sd1, request)
    with pytest.raises(ValueError, match="ControlNet module was given for a unet key"):
        engine_key(sd1, requests_for_stream(config(), target=TARGET)[0], controlnet=nets[0])


def test_build_requests_need_their_controlnets_and_a_matching_unet(sd1, nets, tmp_path, monkeypatch) -> None:
    spy = BuildSpy(monkeypatch)
    cache = EngineCache(tmp_path / "engines")
    requests = requests_for_stream(config(), target=TARGET, control=True)
    with pytest.raises(ValueError, match="needs the ControlNets to build it for"):
        build_engines(sd1, requests, cache)
    with pytest.raises(ValueError, match="takes ControlNet residuals .*control=True"):
        ensure_engine(sd1, replace(requests[0], control=False), cache, component=component_for(sd1, "unet",
                                                                                               control=True))
    with pytest.raises(ValueError, match="a UNet engine for ControlNets takes the residuals"):
        ensure_engine(sd1, requests[0], cache, component=component_for(sd1, "unet"))
    assert spy.count == 0 and spy.exports == []


# ------------------------------------------------------------------------------------ TensorRT-RTX
@needs_builder
def test_controlnet_and_residual_unet_engines_build(sd1, nets, tmp_path, monkeypatch) -> None:
    """Real TensorRT-RTX builds (SM89, ahead of time on this CPU machine) through the cache, for a stream with one
    ControlNet listed twice: the residual UNet and one ControlNet engine (each module once). The graphs the builder
    parsed name the residuals (outputs of one, inputs of the other) with the derived shape symbols, their profiles
    cover them, the keys say what they are, a second build is all cache hits, and the engines are found for a
    stream with ControlNets (and the UNet not for one without), as on an RTX machine."""
    parsed: list[dict] = []

    def look_at_the_graph(job) -> None:
        graph = onnx.load(str(job.onnx))
        dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
        parsed.append({"inputs": {i.name: dims(i) for i in graph.graph.input},
                       "outputs": {o.name: dims(o) for o in graph.graph.output}, "profile": job.profiles[0]})
        shutil.copy(job.onnx, tmp_path / f"built{len(parsed)}.onnx")

    spy = BuildSpy(monkeypatch, on_build=look_at_the_graph)
    cache = EngineCache(tmp_path / "engines")
    cfg = config()
    rows = cfg.unet_rows
    requests = requests_for_stream(cfg, components=("unet", "controlnet"), precision="fp32", target=TARGET,
                                   control=True)
    results = build_engines(sd1, requests, cache, controlnets=[nets[0], nets[0]])
    assert [r.built for r in results] == [True, True] and spy.count == 2
    unet, control = (r.key for r in results)
    assert unet.component == "unet" and unet.control and unet.weights == weights_fingerprint(sd1)
    assert control.component == "controlnet" and control.weights == controlnet_fingerprint(nets[0])
    unet_graph, control_graph = parsed
    assert list(unet_graph["inputs"]) == [*UNET_INPUTS, *RESIDUALS]
    assert unet_graph["inputs"]["down_residual_2"] == [rows, 32, 4, 4]  # static shapes: the config's
    assert list(control_graph["outputs"]) == RESIDUALS
    assert list(control_graph["inputs"]) == [*UNET_INPUTS, "controlnet_cond", "conditioning_scale"]
    assert control_graph["profile"]["controlnet_cond"] == ((rows, 3, SIZE, SIZE),) * 3
    assert unet_graph["profile"]["mid_residual"] == ((rows, 64, 4, 4),) * 3
    meta = json.loads(results[1].record.path.with_suffix(".json").read_text())
    assert meta["key"]["component"] == "controlnet" and "control" not in meta["key"]
    assert json.loads(results[0].record.path.with_suffix(".json").read_text())["key"]["control"] is True
    again = build_engines(sd1, requests, cache, controlnets=[nets[0]])
    assert [r.built for r in again] == [False, False] and spy.count == 2

    # found as on an RTX machine (the backend pretended usable, the runner a stand-in that loads nothing)
    class StandInRunner:
        def __init__(self, path, *, backend, device, input_names, runtime_cache) -> None:
            self.path, self.input_names = Path(path), tuple(input_names)

    monkeypatch.setattr(runner_mod, "runtime_problem", lambda backend, device: None)
    monkeypatch.setattr(runner_mod, "installed_backends", lambda: {"tensorrt-rtx": build_mod.backend_version(
        "tensorrt-rtx")})
    monkeypatch.setattr(runner_mod, "local_target", lambda device: TARGET)
    monkeypatch.setattr(runner_mod, "EngineRunner", StandInRunner)
    found = attach_engines(sd1, cfg, cache, backend="tensorrt-rtx", control=True)
    assert found.records["unet"].key == unet
    assert "unet" not in attach_engines(sd1, cfg, cache, backend="tensorrt-rtx").runners
    runner, record, note = attach_controlnet_engine(sd1, cfg, cache, nets[0], backend="tensorrt-rtx")
    assert note is None and record.key == control and runner.input_names[-2:] == ("controlnet_cond",
                                                                                   "conditioning_scale")
    runner, record, note = attach_controlnet_engine(sd1, cfg, cache, nets[1], backend="tensorrt-rtx")
    assert runner is None and note.startswith(f"no controlnet engine for {controlnet_fingerprint(nets[1])}")

    # the stream on the graphs TensorRT-RTX built from (onnxruntime standing in for the engines)
    class Built:
        key = "the built graphs on onnxruntime"

        def __init__(self) -> None:
            self.unet = OnnxRuntimeRunner(tmp_path / "built1.onnx", list(unet_graph["inputs"]), ["noise_pred"])

        def attach(self, models, config, control=False):
            from streamrt.runtime import AttachResult
            return AttachResult(runners={"unet": self.unet}, records={"unet": results[0].record})

        def attach_controlnet(self, models, config, module):
            return OnnxRuntimeRunner(tmp_path / "built2.onnx", list(control_graph["inputs"]), RESIDUALS), None

    on_engine = Stream(sd1, cfg.with_(acceleration="tensorrt"), prompt=PROMPT, engines=Built(),
                       controlnets=[ControlNet(nets[0], 0.9)])
    assert on_engine.runtime.parts["unet"] == on_engine.runtime.parts["controlnet"] == "engine"
    on_torch = Stream(sd1, cfg.with_(acceleration="eager"), prompt=PROMPT, controlnets=[ControlNet(nets[0], 0.9)])
    frames, control_images = make_frames(3, seed=8), make_frames(3, seed=9)
    for i in range(3):
        control_image = [control_images[i:i + 1]]
        torch.testing.assert_close(on_engine.step(frames[i:i + 1], control=control_image),
                                   on_torch.step(frames[i:i + 1], control=control_image), rtol=0,
                                   atol=1e-2 if i == 0 else 1e-5)
