"""ControlNets from the files ComfyUI users have, offline (streamrt.controlnet_loading).

Every load path is checked against the diffusers ``ControlNetModel`` the file was written from: equal state dicts and
equal residuals (down + mid) on random inputs. The ControlNets are tiny (``ControlNetModel.from_unet`` of the tiny
SD1 / SD2-shaped / SDXL UNets) with every tensor random, zero convolutions included, so a misplaced tensor shows in
the residuals. The original (LDM) layout is written by the inverse conversion in tests/model_files.py, and checked
against ComfyUI's own ``comfy.cldm.cldm.ControlNet`` (run in a subprocess): same key names and shapes, and our loaded
model computes ComfyUI's residuals. Full-size SD1.5 / SD2.1 / SDXL ControlNets are checked on the meta device: the
config derived from their key shapes builds the same architecture, heads included.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from model_files import (
    comfy_controlnet_reference,
    controlnet_residuals,
    controlnet_to_ldm,
    lora_state_dict,
    random_controlnet,
    unet_to_ldm,
    write_controlnet,
    write_ldm_checkpoint,
)
from safetensors.torch import save_file

from streamrt.controlnet_loading import (
    ControlNetArchitecture,
    controlnet_from_state_dict,
    detect_controlnet,
    load_controlnet,
)
from streamrt.families import SD1, SD2, SDXL
from streamrt.random_models import build_random_components, component_configs
from streamrt.weights import ModelLoadError

COMFYUI = Path(os.environ.get("STREAMRT_COMFYUI") or Path(__file__).resolve().parents[1] / ".comfyui" / "ComfyUI")
CPU = torch.device("cpu")
PRESETS = ("tiny", "tiny-v", "tiny-xl")
#: (layout for write_controlnet, file name)
LAYOUTS = (("folder", "cn"), ("diffusers", "cn.safetensors"), ("ldm", "cn.safetensors"), ("ldm-bare", "cn.pth"))
#: an SD2.x-wide (1024 context) small UNet whose widths follow SD2's 64 channels per head
SD2_WIDE_UNET = {**component_configs("tiny-v")["unet"], "block_out_channels": (64, 128), "cross_attention_dim": 1024,
                 "attention_head_dim": (1, 2)}


@pytest.fixture(scope="module")
def unets() -> dict:
    """The tiny UNets (random weights) by preset, and ``sd2-wide``."""
    from diffusers import UNet2DConditionModel

    out = {preset: build_random_components(preset, taesd=False)["unet"] for preset in PRESETS}
    torch.manual_seed(4)
    out["sd2-wide"] = UNet2DConditionModel(**SD2_WIDE_UNET).eval().requires_grad_(False)
    return out


@pytest.fixture(scope="module")
def controlnets(unets) -> dict:
    """A random ControlNet per UNet, each drawn from another seed."""
    return {name: random_controlnet(unet, seed=10 + i) for i, (name, unet) in enumerate(unets.items())}


def assert_same_weights(model, reference) -> None:
    mine, theirs = model.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), key


def assert_same_residuals(model, reference, *, atol: float = 0.0) -> None:
    (down, mid), (ref_down, ref_mid) = controlnet_residuals(model), controlnet_residuals(reference)
    assert len(down) == len(ref_down)
    assert all(r.abs().mean() > 0.01 for r in (*ref_down, ref_mid))  # a residual of zeros would prove nothing
    for got, want in zip((*down, mid), (*ref_down, ref_mid)):
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


def heads(model) -> list[int]:
    return [m.heads for name, m in model.named_modules() if name.endswith("attn1")]


# =========================================================================== every layout, every family shape
@pytest.mark.parametrize(("layout", "name"), LAYOUTS, ids=[layout for layout, _ in LAYOUTS])
@pytest.mark.parametrize("preset", ("tiny", "tiny-v", "tiny-xl", "sd2-wide"))
def test_each_layout_loads_the_controlnet_it_was_written_from(tmp_path, unets, controlnets, preset, layout, name):
    """Folder, diffusers-named file, ``control_model.*`` file and bare-LDM ``.pth``: the same weights and residuals.
    The tiny SDXL one takes its heads from the UNet config (its 16 channels per head are no convention)."""
    reference = controlnets[preset]
    path = write_controlnet(tmp_path / name, reference, layout)
    unet_config = unets[preset].config if preset == "tiny-xl" else None
    model = load_controlnet(path, dtype=torch.float32, device="cpu", unet_config=unet_config)
    assert_same_weights(model, reference)
    assert_same_residuals(model, reference)
    assert heads(model) == heads(reference)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("preset", PRESETS)
def test_the_pipelines_unet_config_gives_the_same_controlnet(tmp_path, unets, controlnets, preset):
    """With the UNet config (what the stream passes) every family shape loads, and fits that UNet."""
    path = write_controlnet(tmp_path / "cn.safetensors", controlnets[preset], "ldm")
    model = load_controlnet(path, dtype="fp32", device="cpu", unet_config=unets[preset].config)
    assert_same_residuals(model, controlnets[preset])


def test_detect_controlnet_reads_layout_family_and_hint_channels(unets, controlnets):
    sd = controlnets["tiny"].state_dict()
    ldm = controlnet_to_ldm(sd, controlnets["tiny"].config)
    assert detect_controlnet(sd) == ControlNetArchitecture("diffusers", "", "sd1", 32, 3, 4)
    assert detect_controlnet(ldm) == ControlNetArchitecture("ldm", "control_model.", "sd1", 32, 3, 4)
    shapes = {k.removeprefix("control_model."): tuple(v.shape) for k, v in ldm.items()}  # ComfyUI's module, a header
    assert detect_controlnet(shapes) == ControlNetArchitecture("ldm", "", "sd1", 32, 3, 4)
    assert detect_controlnet(controlnets["sd2-wide"].state_dict()).model_family is SD2
    xl = controlnet_to_ldm(controlnets["tiny-xl"].state_dict(), controlnets["tiny-xl"].config)
    assert detect_controlnet({**xl, "difference": torch.zeros(0)}) == ControlNetArchitecture(
        "ldm", "control_model.", "sdxl", 64, 3, 4, diff=True)


# =========================================================================== against ComfyUI's own ControlNet
#: the parameters ComfyUI's model detection gives comfy.cldm.cldm.ControlNet for each tiny UNet's ControlNet
COMFY_PARAMS = {
    "tiny": dict(in_channels=4, model_channels=32, hint_channels=3, num_res_blocks=[1, 1], channel_mult=[1, 2],
                 transformer_depth=[1, 0], transformer_depth_middle=1, context_dim=32, num_heads=8,
                 use_linear_in_transformer=False),
    "tiny-xl": dict(in_channels=4, model_channels=32, hint_channels=3, num_res_blocks=[1, 1], channel_mult=[1, 2],
                    transformer_depth=[0, 2], transformer_depth_middle=2, context_dim=64, num_head_channels=16,
                    use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=6 * 8 + 32, time_dim=8),
}
COMFY_PARAMS["tiny-v"] = {**COMFY_PARAMS["tiny"], "use_linear_in_transformer": True}


@pytest.mark.parametrize("preset", PRESETS)
def test_comfyui_controlnet_weights_give_comfyuis_residuals(tmp_path, unets, controlnets, preset):
    """ComfyUI's ``comfy.cldm.cldm.ControlNet`` with random weights: its state dict (what the node hands over) and a
    ``control_model.*`` file of it load into ControlNetModels whose residuals are ComfyUI's; and the test files'
    LDM writer names and shapes every tensor as ComfyUI's module does."""
    if not (COMFYUI / "comfy" / "cldm" / "cldm.py").is_file():
        pytest.skip(f"no ComfyUI source at {COMFYUI}")
    ref = comfy_controlnet_reference(COMFYUI, tmp_path / "comfy.safetensors", COMFY_PARAMS[preset], seed=3)
    unet_config = unets[preset].config
    in_memory = controlnet_from_state_dict(ref["sd"], unet_config=unet_config, what="ComfyUI's ControlNet")
    path = tmp_path / "control.safetensors"
    save_file({"control_model." + k: v for k, v in ref["sd"].items()}, str(path))
    from_file = load_controlnet(path, dtype=torch.float32, device=CPU, unet_config=unet_config)
    inputs = ref["inputs"]
    added = {}
    if "pooled" in inputs:
        added["added_cond_kwargs"] = {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}
    for model in (in_memory, from_file):
        with torch.no_grad():
            down, mid = model(inputs["x"], inputs["t"], inputs["context"], inputs["hint"], return_dict=False, **added)
        assert len(down) == len(ref["output"])
        for got, want in zip((*down, mid), (*ref["output"], ref["middle"])):
            assert want.abs().mean() > 0.01
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    written = controlnet_to_ldm(in_memory.state_dict(), in_memory.config, prefix="")
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in ref["sd"].items()}
    assert all(torch.equal(written[k], v) for k, v in ref["sd"].items())


# =========================================================================== full-size architectures (meta device)
def _meta_controlnet(**config):
    from diffusers import ControlNetModel

    with torch.device("meta"):
        return ControlNetModel(**config)


#: diffusers' configs of the real ControlNets: SD1.5 (diffusers' ControlNetModel defaults with CLIP-L's context, as
#: lllyasviel/control_v11p_sd15_*), SD2.1 (thibaud/controlnet-sd21-*), SDXL (diffusers/controlnet-canny-sdxl-1.0)
FULL_SIZE = {
    "sd15": dict(cross_attention_dim=768),
    "sd21": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
    "sdxl": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("layout", ("diffusers", "ldm"))
@pytest.mark.parametrize("name", FULL_SIZE)
def test_derived_config_builds_the_full_size_controlnets(name, layout):
    """From the weights alone (meta tensors, no UNet config), in both layouts: the same tensors, heads and config as
    diffusers'."""
    reference = _meta_controlnet(**FULL_SIZE[name])
    weights = reference.state_dict()
    if layout == "ldm":
        weights = controlnet_to_ldm(weights, reference.config)
    ours = controlnet_from_state_dict(weights)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert heads(ours) == heads(reference)
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
                "use_linear_projection", "conditioning_embedding_out_channels", "conditioning_channels",
                "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                "mid_block_type"):
        assert _plain(ours.config[key]) == _plain(reference.config[key]), key
    if name == "sd15":
        assert tuple(ours.config.block_out_channels) == (320, 640, 1280, 1280)
        assert tuple(ours.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)


def test_a_small_controlnet_gets_its_own_config(tmp_path, unets):
    """A ControlNet with a two-level control encoder (8 -> 16 channels) for a one-channel hint: derived from the
    weights in both layouts."""
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    reference = ControlNetModel.from_unet(unets["tiny"], conditioning_embedding_out_channels=(8, 16),
                                          conditioning_channels=1)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.1)
    reference.eval()
    for layout in ("diffusers", "ldm"):
        model = load_controlnet(write_controlnet(tmp_path / f"{layout}.safetensors", reference, layout),
                                dtype=torch.float32, device=CPU)
        assert tuple(model.config.conditioning_embedding_out_channels) == (8, 16)
        assert model.config.conditioning_channels == 1
        assert_same_weights(model, reference)
        assert_same_residuals(model, reference)


# =========================================================================== dtype, memory, options
def test_fp16_files_are_cast_and_in_memory_weights_are_copied(tmp_path, controlnets):
    reference = controlnets["tiny"]
    path = write_controlnet(tmp_path / "cn.safetensors", reference, "ldm", dtype=torch.float16)
    as_fp32 = load_controlnet(path, dtype=torch.float32, device=CPU)
    as_fp16 = load_controlnet(path, dtype="fp16", device="cpu")
    for key, value in reference.state_dict().items():
        assert torch.equal(as_fp32.state_dict()[key], value.half().float()), key
        assert as_fp16.state_dict()[key].dtype == torch.float16
    sd = controlnet_to_ldm({k: v.clone() for k, v in reference.state_dict().items()}, reference.config, prefix="")
    model = controlnet_from_state_dict(sd)
    sd["zero_convs.0.0.weight"].zero_()  # the host changes its tensors: the model keeps its own
    assert_same_weights(model, reference)


def test_shuffle_controlnets_pool_their_residuals_as_comfyui_does(tmp_path, controlnets):
    plain = load_controlnet(write_controlnet(tmp_path / "cn.safetensors", controlnets["tiny"], "ldm"),
                            dtype=torch.float32, device=CPU)
    path = write_controlnet(tmp_path / "control_v11e_sd15_shuffle_fp16.safetensors", controlnets["tiny"], "ldm")
    shuffle = load_controlnet(path, dtype=torch.float32, device=CPU)
    assert shuffle.config.global_pool_conditions and not plain.config.global_pool_conditions
    down, mid = controlnet_residuals(shuffle)
    assert all(r.shape[-1] == 1 and r.shape[-2] == 1 for r in (*down, mid))  # pooled over the image


def test_diff_controlnets_load_with_their_base_unet(tmp_path, unets, controlnets):
    """A "diff" ControlNet (the UNet-encoder tensors minus the base UNet's, a ``difference`` key) is refused alone
    and loads with its base UNet, as ComfyUI's DiffControlNetLoader does."""
    reference, unet = controlnets["tiny"], unets["tiny"]
    ldm = controlnet_to_ldm(reference.state_dict(), reference.config)
    base = {k.replace("model.diffusion_model.", "control_model."): v
            for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    shared = [k for k in ldm if k in base]
    assert len(shared) > 20 and "control_model.zero_convs.0.0.weight" not in shared
    diff = {k: (v - base[k] if k in base else v).contiguous() for k, v in ldm.items()}
    path = tmp_path / "diff_control_sd15_canny.safetensors"
    save_file({**diff, "difference": torch.zeros(0)}, str(path))
    with pytest.raises(ModelLoadError, match=r"diff_control_sd15_canny.*\"diff\" ControlNet.*base UNet"):
        load_controlnet(path, dtype=torch.float32, device=CPU)
    model = load_controlnet(path, dtype=torch.float32, device=CPU, base_unet=unet)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)
    assert_same_residuals(model, reference, atol=1e-5)
    other = build_random_components("tiny", seed=7, taesd=False)["unet"]
    with torch.no_grad():
        wrong = load_controlnet(path, dtype=torch.float32, device=CPU, base_unet=other.state_dict())
    assert not torch.allclose(controlnet_residuals(wrong)[1], controlnet_residuals(reference)[1])


# =========================================================================== refusals
def test_controlnets_of_another_family_are_refused_naming_both(tmp_path, unets, controlnets):
    sd2 = write_controlnet(tmp_path / "sd2.safetensors", controlnets["sd2-wide"], "ldm")
    with pytest.raises(ModelLoadError, match=r"ControlNet .*sd2\.safetensors is an SD2\.x ControlNet; this SD1\.x "
                                             r"pipeline needs an SD1\.x ControlNet"):
        load_controlnet(sd2, dtype=torch.float32, device=CPU, family=SD1)
    xl = write_controlnet(tmp_path / "xl", controlnets["tiny-xl"], "folder")
    with pytest.raises(ModelLoadError, match=r"is an SDXL ControlNet; this SD2\.x pipeline"):
        load_controlnet(xl, dtype=torch.float32, device=CPU, family="sd2")
    sd1 = write_controlnet(tmp_path / "sd1.pth", controlnets["tiny"], "ldm")
    with pytest.raises(ModelLoadError, match=r"is an SD1\.x ControlNet; this SDXL pipeline"):
        load_controlnet(sd1, dtype=torch.float32, device=CPU, unet_config=unets["tiny-xl"].config)
    with pytest.raises(ModelLoadError, match=r"the ComfyUI ControlNet is an SD1\.x ControlNet; this SDXL"):
        controlnet_from_state_dict(controlnet_to_ldm(controlnets["tiny"].state_dict(), controlnets["tiny"].config,
                                                     prefix=""), family=SDXL, what="the ComfyUI ControlNet")
    assert load_controlnet(sd2, dtype=torch.float32, device=CPU, family=SD2).config.cross_attention_dim == 1024


def test_a_controlnet_that_does_not_fit_the_unet_is_refused(tmp_path, unets, controlnets):
    path = write_controlnet(tmp_path / "cn.safetensors", controlnets["tiny"], "diffusers")
    wider = {**unets["tiny"].config, "block_out_channels": (32, 96)}
    with pytest.raises(ModelLoadError, match=r"does not fit the pipeline's UNet: its block widths are \[32, 64\], "
                                             r"the UNet's \[32, 96\]"):
        load_controlnet(path, dtype=torch.float32, device=CPU, unet_config=wider)


def test_tiny_sdxl_heads_need_the_unet_config(tmp_path, controlnets):
    path = write_controlnet(tmp_path / "xl.safetensors", controlnets["tiny-xl"], "ldm")
    with pytest.raises(ModelLoadError, match=r"xl\.safetensors.*attention heads is not in the weights.*UNet config"):
        load_controlnet(path, dtype=torch.float32, device=CPU)


def _t2i_adapter() -> dict:
    from diffusers import T2IAdapter

    adapter = T2IAdapter(in_channels=3, channels=(32, 64), num_res_blocks=1, downscale_factor=8)
    return {k: v.contiguous() for k, v in adapter.state_dict().items()}


@pytest.mark.parametrize(("what", "message"), [
    ("checkpoint", "Stable Diffusion checkpoint (model.diffusion_model.*), not a ControlNet"),
    ("lora", "a LoRA, not a ControlNet"),
    ("t2i", "a T2I-Adapter, not a ControlNet"),
    ("control-lora", "a Control-LoRA"),
    ("union", "a ControlNet Union"),
    ("unet", "a diffusers UNet (up_blocks.*), not a ControlNet"),
    ("other", "not a ControlNet: no control image encoder"),
])
def test_other_models_are_refused_by_name(tmp_path, unets, controlnets, what, message):
    components = build_random_components("tiny", taesd=False)
    path = tmp_path / f"{what}.safetensors"
    ldm = {k: v.contiguous() for k, v in controlnet_to_ldm(controlnets["tiny"].state_dict(),
                                                           controlnets["tiny"].config).items()}
    if what == "checkpoint":
        from types import SimpleNamespace

        write_ldm_checkpoint(path, SimpleNamespace(**components), "sd1")
    else:
        sd = {
            "lora": lambda: lora_state_dict(components),
            "t2i": _t2i_adapter,
            "control-lora": lambda: {**ldm, "lora_controlnet": torch.zeros(0)},
            "union": lambda: {**ldm, "control_model.task_embedding": torch.zeros(8, 320),
                              "control_model.control_add_embedding.linear_1.weight": torch.zeros(128, 2048)},
            "unet": lambda: {k: v.contiguous() for k, v in unets["tiny"].state_dict().items()},
            "other": lambda: {"embedding.weight": torch.zeros(3, 3)},
        }[what]()
        save_file(sd, str(path))
    with pytest.raises(ModelLoadError, match=f"ControlNet {path}") as info:
        load_controlnet(path, dtype=torch.float32, device=CPU)
    assert message in str(info.value)


def test_broken_files_are_refused_naming_the_file(tmp_path, controlnets):
    good = write_controlnet(tmp_path / "cn.safetensors", controlnets["tiny"], "ldm")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a pickle at all" * 10)
    for path in (truncated, corrupt):
        with pytest.raises(ModelLoadError, match=f"{path}.*truncated or corrupt"):
            load_controlnet(path, dtype=torch.float32, device=CPU)
    with pytest.raises(ModelLoadError, match="file not found"):
        load_controlnet(tmp_path / "missing.safetensors", dtype=torch.float32, device=CPU)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_controlnet(tmp_path, dtype=torch.float32, device=CPU)


def test_loading_is_strict(tmp_path, controlnets):
    ldm = controlnet_to_ldm(controlnets["tiny"].state_dict(), controlnets["tiny"].config)
    extra = tmp_path / "extra.safetensors"
    save_file({**ldm, "control_model.input_blocks.1.9.weight": torch.zeros(2)}, str(extra))
    with pytest.raises(ModelLoadError, match=r"extra\.safetensors.*no place for.*input_blocks\.1\.9\.weight"):
        load_controlnet(extra, dtype=torch.float32, device=CPU)
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in ldm.items() if k != "control_model.zero_convs.2.0.bias"}, str(missing))
    with pytest.raises(ModelLoadError, match=r"missing\.safetensors.*1 missing.*controlnet_down_blocks\.2\.bias"):
        load_controlnet(missing, dtype=torch.float32, device=CPU)
    # a whole SD checkpoint bundled beside control_model.* (ControlNet 1.0's .pth files) is not the ControlNet's
    bundled = tmp_path / "bundled.safetensors"
    save_file({**ldm, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, str(bundled))
    assert_same_weights(load_controlnet(bundled, dtype=torch.float32, device=CPU), controlnets["tiny"])


def test_diffusers_named_weights_load_from_memory_too(controlnets):
    model = controlnet_from_state_dict(controlnets["tiny"].state_dict(), dtype=torch.float32)
    assert_same_weights(model, controlnets["tiny"])


def test_a_folder_index_may_not_name_shards_outside_the_folder(controlnets, tmp_path) -> None:
    """A diffusers ControlNet folder's weight index is read for shard names: one that leaves the folder (``../``,
    an absolute path) is refused by name, and nothing outside is read."""
    import json

    folder = write_controlnet(tmp_path / "cn", controlnets["tiny"], "folder")
    for weights in folder.glob("diffusion_pytorch_model*.safetensors"):
        weights.rename(tmp_path / weights.name)  # the weights now lie outside the folder
    for shard in ("../diffusion_pytorch_model.safetensors", str(tmp_path / "diffusion_pytorch_model.safetensors")):
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"conv_in.weight": shard}}), encoding="utf-8")
        with pytest.raises(ModelLoadError, match="outside its folder"):
            load_controlnet(folder, dtype="fp32", device="cpu")
