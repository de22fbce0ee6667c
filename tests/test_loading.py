"""Loading what a ComfyUI user has, offline: single-file checkpoints, ComfyUI's TAESD files, LoRAs.

Every load path is checked against the same weights loaded from a diffusers folder: equal weights and
an equal first frame of a stream (CPU, float32). The single-file checkpoints are written here from tiny
random diffusers models by the inverse of diffusers' LDM conversion (tests/model_files.py), and
the detection rules are checked on the key names and shapes of the real SD1.5 / SD2.1 / sd-turbo
architectures built on the meta device (no weights).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from model_files import (
    LORA_LAYERS,
    assert_frames_match,
    ldm_name,
    ldm_state_dict,
    lora_state_dict,
    taesd_to_comfy,
    write_comfy_taesd,
    write_config_dir,
    write_ldm_checkpoint,
)
from safetensors.torch import save_file

from streamrt import Stream, StreamConfig, StreamSessions
from streamrt import checkpoints as ck
from streamrt.families import SD1, family_named
from streamrt.loading import (
    ModelLoadError,
    PipelineSpec,
    load_checkpoint,
    load_diffusers_folder,
    load_taesd,
    read_weights,
    taesd_pair,
)
from streamrt.lora import LoraSpec, fuse_lora, ldm_unet_names
from streamrt.random_models import build_random_components, write_clip_tokenizer, write_random_pipeline

SIZE = 64
PROMPT, NEGATIVE = "a photo of a red cat", "blurry"
COMFYUI = Path(os.environ.get("STREAMRT_COMFYUI") or Path(__file__).resolve().parents[1] / ".comfyui" / "ComfyUI")


# =========================================================================== fixtures
def frame() -> torch.Tensor:
    return torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(5))


def first_frame(models) -> torch.Tensor:
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 35), num_inference_steps=50, cfg_type="self",
                          guidance_scale=1.5, delta=1.0, seed=2)
    return Stream(models, config, prompt=PROMPT, negative_prompt=NEGATIVE).step(frame())


def assert_same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def load_folder(folder: Path, **kwargs):
    return load_diffusers_folder(folder, dtype="fp32", device="cpu", **kwargs)


def load_file(path: Path, **kwargs):
    return load_checkpoint(path, dtype="fp32", device="cpu", **kwargs)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD1 (with TAESD) and SD2-shaped models as diffusers folders and as single-file checkpoints."""
    root = tmp_path_factory.mktemp("loading")
    f = {"sd1": root / "sd1", "sd2": root / "sd2", "taesd": root / "taesd", "tokenizer": root / "tokenizer"}
    write_random_pipeline(f["sd1"], "tiny", seed=0, taesd_folder=f["taesd"])
    write_random_pipeline(f["sd2"], "tiny-v", seed=1)
    write_clip_tokenizer(f["tokenizer"])
    for family, preset in (("sd1", "tiny"), ("sd2", "tiny-v")):
        ref = load_folder(f[family])
        f[f"{family}_ckpt"] = write_ldm_checkpoint(root / f"{preset}.safetensors", ref, family)
        f[f"{family}_configs"] = write_config_dir(root / f"{preset}-configs", f[family], tokenizer=False)
    f["sd2_configs_tok"] = write_config_dir(root / "tiny-v-configs-tok", f["sd2"], tokenizer=True)
    f["comfy_taesd"] = root / "vae_approx"
    write_comfy_taesd(f["comfy_taesd"], load_taesd(f["taesd"], dtype=torch.float32, device=torch.device("cpu")))
    f["lora"] = root / "lora.safetensors"
    save_file(lora_state_dict(load_folder(f["sd1"])), str(f["lora"]))
    return f


@pytest.fixture(scope="module")
def sd1_ref(files):
    return load_folder(files["sd1"])


@pytest.fixture(scope="module")
def sd1_ref_frame(sd1_ref) -> torch.Tensor:
    return first_frame(sd1_ref)


def load_sd1_ckpt(files, **kwargs):
    return load_file(files["sd1_ckpt"], config_dir=files["sd1_configs"], tokenizer_dir=files["tokenizer"], **kwargs)


# =========================================================================== single-file checkpoints
def test_sd1_checkpoint_equals_the_diffusers_folder(files, sd1_ref, sd1_ref_frame):
    models = load_sd1_ckpt(files)
    assert_same_weights(models, sd1_ref)
    assert models.prediction_type == "epsilon" and models.identity["family"] == "sd1"
    assert models.tokenizer.model_max_length == 77 and models.tokenizer.pad_token == "<|endoftext|>"
    assert_frames_match(first_frame(models), sd1_ref_frame)


def test_sd2_checkpoint_equals_the_diffusers_folder(files):
    """OpenCLIP text tower (in_proj split, the extra last layer dropped), linear projections, v-prediction."""
    ref = load_folder(files["sd2"])
    models = load_file(files["sd2_ckpt"], config_dir=files["sd2_configs_tok"])
    assert_same_weights(models, ref)
    assert models.prediction_type == "v_prediction" == ref.prediction_type  # auto + config folder: its scheduler
    assert models.identity["family"] == "sd2"
    assert_frames_match(first_frame(models), first_frame(ref))


def test_sd2_tokenizer_from_clip_files_pads_like_openclip(files):
    models = load_file(files["sd2_ckpt"], config_dir=files["sd2_configs"], tokenizer_dir=files["tokenizer"])
    ids = models.tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert models.tokenizer.pad_token == "!" and ids[-1] == 0 and len(ids) == 77


def test_prediction_type_override(files):
    models = load_file(files["sd2_ckpt"], config_dir=files["sd2_configs_tok"], prediction_type="epsilon")
    assert models.prediction_type == "epsilon"
    assert load_folder(files["sd1"], prediction_type="v_prediction").prediction_type == "v_prediction"
    with pytest.raises(ModelLoadError, match="prediction_type"):
        load_folder(files["sd1"], prediction_type="sample")


def test_ckpt_pickle_of_plain_tensors_loads(files, sd1_ref, tmp_path):
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": read_weights(files["sd1_ckpt"]), "global_step": 1000}, path)
    assert_same_weights(load_file(path, config_dir=files["sd1_configs"], tokenizer_dir=files["tokenizer"]), sd1_ref)


def test_sidecar_names_the_config_folder(files, sd1_ref, tmp_path):
    ckpt = tmp_path / "model.safetensors"
    shutil.copy(files["sd1_ckpt"], ckpt)
    shutil.copytree(files["sd1_configs"], tmp_path / "configs")
    spec = PipelineSpec(str(ckpt), dtype="fp32", device="cpu", tokenizer_dir=str(files["tokenizer"]))
    key_without = spec.cache_key()
    Path(str(ckpt) + ".streamrt.json").write_text(json.dumps({"config_dir": "configs"}))
    assert spec.cache_key() != key_without  # the sidecar is part of what the pipeline is read from
    assert_same_weights(spec.load(), sd1_ref)
    Path(str(ckpt) + ".streamrt.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config_dir"):
        spec.load()


def test_tiny_checkpoint_needs_its_configs(files):
    """Without a config folder the shipped SD1 configs apply, and the tiny widths are refused."""
    with pytest.raises(ModelLoadError, match="768") as info:
        load_file(files["sd1_ckpt"], tokenizer_dir=files["tokenizer"])
    assert str(files["sd1_ckpt"]) in str(info.value)


def test_tokenizer_that_does_not_fit_the_text_encoder(files):
    """ComfyUI's real CLIP tokenizer (49408 tokens) with the tiny text encoder: a clear error, not an IndexError."""
    tokenizer = COMFYUI / "comfy" / "sd1_tokenizer"
    if not (tokenizer / "vocab.json").is_file():
        pytest.skip(f"no ComfyUI tokenizer at {tokenizer}")
    with pytest.raises(ModelLoadError, match="49408 tokens"):
        load_file(files["sd1_ckpt"], config_dir=files["sd1_configs"], tokenizer_dir=tokenizer)


# =========================================================================== detection on real architectures
@pytest.fixture(scope="module")
def real_shapes() -> dict[str, dict]:
    """Key -> meta tensor of real SD1.5, SD2.1 (768 v) and sd-turbo checkpoints (no memory allocated)."""
    out = {}
    for preset, family in (("sd15", "sd1"), ("sd21", "sd2"), ("sd-turbo", "sd2")):
        parts = build_random_components(preset, device="meta", taesd=False)
        out[preset] = ldm_state_dict(parts["unet"], parts["vae"], parts["text_encoder"], family)
    return out


@pytest.mark.parametrize(("key", "sd15", "sd21"), [
    ("model.diffusion_model.input_blocks.0.0.weight", (320, 4, 3, 3), (320, 4, 3, 3)),
    ("model.diffusion_model.input_blocks.1.1.proj_in.weight", (320, 320, 1, 1), (320, 320)),
    ("model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", (320, 768), (320, 1024)),
    ("model.diffusion_model.output_blocks.11.0.skip_connection.weight", (320, 640, 1, 1), (320, 640, 1, 1)),
    ("model.diffusion_model.output_blocks.2.1.conv.weight", (1280, 1280, 3, 3), (1280, 1280, 3, 3)),
    ("model.diffusion_model.output_blocks.5.2.conv.weight", (1280, 1280, 3, 3), (1280, 1280, 3, 3)),
    ("first_stage_model.decoder.mid.attn_1.q.weight", (512, 512, 1, 1), (512, 512, 1, 1)),
    ("first_stage_model.decoder.up.3.upsample.conv.weight", (512, 512, 3, 3), (512, 512, 3, 3)),
    ("cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight", (3072, 768), None),
    ("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight", None, (3072, 1024)),
    ("cond_stage_model.model.token_embedding.weight", None, (49408, 1024)),
])
def test_synthetic_real_checkpoints_have_the_real_key_names(real_shapes, key, sd15, sd21):
    """Guards the test's own inverse conversion: names and shapes as in the released SD1.5 / SD2.1 files."""
    for preset, shape in (("sd15", sd15), ("sd21", sd21)):
        got = real_shapes[preset].get(key)
        assert (None if got is None else tuple(got.shape)) == shape, (preset, key)
    assert len(real_shapes["sd15"]) + 1 == 1131  # the released SD1.5 file has 1131 tensors (with position_ids)


@pytest.mark.parametrize(("preset", "family", "name", "v_std", "prediction", "configs"), [
    ("sd15", "sd1", "dreamshaper_8.safetensors", None, "epsilon", "sd1"),
    ("sd21", "sd2", "v2-1_768-ema-pruned.safetensors", 0.2, "v_prediction", "sd2-v"),
    ("sd21", "sd2", "v2-1_512-ema-pruned.safetensors", 0.01, "epsilon", "sd2-base"),
    ("sd-turbo", "sd2", "sd_turbo.safetensors", 0.2, "epsilon", "sd2-base"),
])
def test_detection_and_shipped_configs_fit_real_architectures(real_shapes, preset, family, name, v_std, prediction,
                                                              configs):
    sd = real_shapes[preset]
    arch = ck.detect_architecture({k: tuple(v.shape) for k, v in sd.items()})
    assert (arch.family, arch.text_widths, arch.in_channels, arch.has_vae) == (
        family, family_named(family).text_widths, 4, True)
    bias = None if v_std is None else torch.tensor([-v_std, v_std])
    assert ck.auto_prediction_type(arch, name, bias)[0] == prediction
    folder = ck.shipped_config_dir(family, prediction)
    assert folder.name == configs
    # The shipped configs take every tensor of the real layout, strictly (on the meta device).
    parts = ck.build_components(sd, family, folder)
    assert sum(p.numel() for p in parts["unet"].parameters()) in (859_520_964, 865_910_724)
    assert parts["text_encoder"].config.num_hidden_layers == (12 if family == "sd1" else 23)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet.get("upcast_attention", False) == (configs == "sd2-v")


def test_v_pred_key_and_sgm_prefixes(real_shapes):
    shapes = {k: tuple(v.shape) for k, v in real_shapes["sd21"].items()}
    sgm = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): s for k, s in shapes.items()}
    names = ck.normalize_keys(list(sgm))
    arch = ck.detect_architecture({names[k]: s for k, s in sgm.items()})
    assert arch.family == "sd2"
    arch = ck.detect_architecture({**{k: tuple(v.shape) for k, v in real_shapes["sd15"].items()}, "v_pred": ()})
    assert ck.auto_prediction_type(arch, "x.safetensors")[0] == "v_prediction"


@pytest.mark.parametrize(("change", "message"), [
    ("sdxl_half", "only part of SDXL's text encoders (conditioner.embedders.1.model.* without"),
    ("sdxl_refiner", "SDXL refiner"),
    ("unclip", "class embeddings"),
    ("inpaint", "9 input channels"),
    ("no_text", "no text encoder"),
    ("lora", "this is a LoRA"),
    ("vae_only", "first_stage_model.encoder.* ("),
])
def test_unsupported_architectures_are_named(real_shapes, change, message):
    shapes = {k: tuple(v.shape) for k, v in real_shapes["sd15"].items()}
    if change == "sdxl_half":  # an SDXL file without its first (CLIP-L) text encoder
        shapes = {k: s for k, s in shapes.items() if not k.startswith("cond_stage_model.")}
        shapes["conditioner.embedders.1.model.token_embedding.weight"] = (49408, 1280)
    elif change == "sdxl_refiner":  # OpenCLIP-G as embedder 0 only, plus size/aesthetic embeddings
        shapes = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): tuple(v.shape)
                  for k, v in real_shapes["sd21"].items()}
        shapes["model.diffusion_model.label_emb.0.0.weight"] = (1536, 2560)
    elif change == "unclip":
        shapes = {k: tuple(v.shape) for k, v in real_shapes["sd21"].items()}
        shapes["model.diffusion_model.label_emb.0.0.weight"] = (1280, 1024)
    elif change == "inpaint":
        shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    elif change == "no_text":
        shapes = {k: s for k, s in shapes.items() if not k.startswith("cond_stage_model.")}
    elif change == "lora":
        shapes = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}
    else:
        shapes = {k: s for k, s in shapes.items() if k.startswith("first_stage_model.")}
    names = ck.normalize_keys(list(shapes))
    with pytest.raises(ModelLoadError) as info:
        ck.detect_architecture({names[k]: s for k, s in shapes.items()})
    assert message in str(info.value)


# =========================================================================== TAESD from ComfyUI's files
def _comfy_taesd_module():
    """ComfyUI's own TAESD Encoder / Decoder (comfy/taesd/taesd.py) with plain torch layers."""
    source = COMFYUI / "comfy" / "taesd" / "taesd.py"
    if not source.is_file():
        pytest.skip(f"no ComfyUI source at {source}")
    text = source.read_text()
    for old, new in (("import comfy.utils\n", ""), ("import comfy.ops\n", ""),
                     ("comfy.ops.disable_weight_init.Conv2d", "nn.Conv2d")):
        assert old in text, f"ComfyUI's taesd.py changed: {old!r} not found"
        text = text.replace(old, new)
    namespace: dict = {}
    exec(compile(text, str(source), "exec"), namespace)  # noqa: S102 - ComfyUI's own source, for reference
    return namespace


def test_comfy_taesd_files_match_comfyui_taesd(tmp_path):
    """Files written from ComfyUI's real TAESD architecture load into an AutoencoderTiny that computes the same."""
    comfy = _comfy_taesd_module()
    torch.manual_seed(0)
    encoder, decoder = comfy["Encoder"](), comfy["Decoder"]()
    for p in list(encoder.parameters()) + list(decoder.parameters()):
        p.data.normal_(0, 0.05)
    save_file(encoder.state_dict(), str(tmp_path / "taesd_encoder.safetensors"))
    save_file(decoder.state_dict(), str(tmp_path / "taesd_decoder.safetensors"))
    vae = load_taesd(tmp_path / "taesd_decoder.safetensors", dtype=torch.float32, device=torch.device("cpu"))
    assert vae.config.num_encoder_blocks == (1, 3, 3, 3) and vae.config.num_decoder_blocks == (3, 3, 3, 1)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_frames_match(vae.encode(images).latents, encoder(images * 0.5 + 0.5))
        torch.testing.assert_close(vae.decode(latents).sample, decoder(latents).sub(0.5).mul(2), rtol=1e-6, atol=1e-6)


def test_comfy_taesd_pair_equals_the_autoencoder_tiny_folder(files, sd1_ref):
    folder_vae = load_taesd(files["taesd"], dtype=torch.float32, device=torch.device("cpu"))
    pair = taesd_pair(files["comfy_taesd"] / "taesd_encoder.safetensors")
    pair_vae = load_taesd(pair, dtype=torch.float32, device=torch.device("cpu"))
    assert folder_vae.state_dict().keys() == pair_vae.state_dict().keys()
    for key, value in folder_vae.state_dict().items():
        assert torch.equal(value, pair_vae.state_dict()[key]), key
    a = load_folder(files["sd1"], taesd=files["taesd"])
    b = load_sd1_ckpt(files, taesd=pair)
    assert_frames_match(first_frame(b), first_frame(a))
    assert b.is_tiny_vae and not torch.equal(first_frame(b), first_frame(sd1_ref))


def test_other_taesd_variants_are_refused(files, tmp_path):
    vae = load_taesd(files["taesd"], dtype=torch.float32, device=torch.device("cpu"))
    xl = write_comfy_taesd(tmp_path / "xl", vae, name="taesdxl")
    with pytest.raises(ModelLoadError, match="taesdxl.*SDXL.*SD1.x pipeline needs taesd"):  # SDXL's, for SD1
        load_taesd(xl, dtype=torch.float32, device=torch.device("cpu"), family=SD1)
    with pytest.raises(ModelLoadError, match="taesd3.*16-channel"):  # no family takes SD3's, whatever the pipeline
        load_taesd(write_comfy_taesd(tmp_path / "sd3", vae, name="taesd3"), dtype=torch.float32,
                   device=torch.device("cpu"))
    encoder, decoder = taesd_to_comfy(vae)  # a 16-channel latent space (TAESD3 / TAEF1 shape) under a neutral name
    last = max(int(k.split(".")[0]) for k in encoder)
    encoder[f"{last}.weight"] = torch.zeros(16, *encoder[f"{last}.weight"].shape[1:])
    encoder[f"{last}.bias"] = torch.zeros(16)
    save_file(encoder, str(tmp_path / "odd_encoder.safetensors"))
    save_file(decoder, str(tmp_path / "odd_decoder.safetensors"))
    with pytest.raises(ModelLoadError, match="16 latent channels"):
        load_taesd(tmp_path / "odd_encoder.safetensors", dtype=torch.float32, device=torch.device("cpu"))
    (tmp_path / "lone").mkdir()
    shutil.copy(xl[0], tmp_path / "lone" / "taesd_encoder.safetensors")
    with pytest.raises(ModelLoadError, match="taesd_decoder"):
        load_taesd(tmp_path / "lone" / "taesd_encoder.safetensors", dtype=torch.float32, device=torch.device("cpu"))


# =========================================================================== LoRA
def test_lora_fuses_exactly(files, sd1_ref):
    lora = read_weights(files["lora"])
    for strength in (1.0, 0.6):
        models = load_folder(files["sd1"], loras=[LoraSpec(str(files["lora"]), strength, strength)])
        for kohya, (target, module) in LORA_LAYERS.items():
            base = getattr(sd1_ref, target).get_submodule(module).weight
            up, down, alpha = (lora[f"{kohya}.lora_up.weight"], lora[f"{kohya}.lora_down.weight"],
                               float(lora[f"{kohya}.alpha"]))
            expected = base + (strength * alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
            assert torch.equal(getattr(models, target).get_submodule(module).weight, expected), module
        touched = {(t, m + ".weight") for t, m in LORA_LAYERS.values()}
        for target in ("unet", "text_encoder"):
            fused = getattr(models, target).state_dict()
            for key, value in getattr(sd1_ref, target).state_dict().items():
                if (target, key) not in touched:
                    assert torch.equal(fused[key], value), key


def test_lora_changes_frames_strength_zero_does_not(files, sd1_ref, sd1_ref_frame):
    spec = str(files["lora"])
    zero = load_folder(files["sd1"], loras=[LoraSpec(spec, 0.0, 0.0)])
    assert_same_weights(zero, sd1_ref)
    assert_frames_match(first_frame(zero), sd1_ref_frame)
    full = load_folder(files["sd1"], loras=[LoraSpec(spec, 1.0, 1.0)])
    assert (first_frame(full) - sd1_ref_frame).abs().max() > 1e-3
    clip_only = load_folder(files["sd1"], loras=[LoraSpec(spec, 0.0, 1.0)])
    assert all(torch.equal(a, b) for a, b in zip(clip_only.unet.parameters(), sd1_ref.unet.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(clip_only.text_encoder.parameters(),
                                                     sd1_ref.text_encoder.parameters()))


def test_lora_on_a_checkpoint_equals_lora_on_the_folder(files):
    loras = [(str(files["lora"]), 0.8)]
    a, b = load_folder(files["sd1"], loras=loras), load_sd1_ckpt(files, loras=loras)
    assert_same_weights(a, b)
    assert_frames_match(first_frame(b), first_frame(a))


def test_peft_style_lora_equals_kohya_style(files, sd1_ref, tmp_path):
    kohya, peft = load_folder(files["sd1"]), load_folder(files["sd1"])
    fuse_lora(lora_state_dict(sd1_ref, style="kohya"), kohya.unet, kohya.text_encoder)
    fuse_lora(lora_state_dict(sd1_ref, style="peft"), peft.unet, peft.text_encoder)
    for target in ("unet", "text_encoder"):
        for (name, a), b in zip(getattr(kohya, target).named_parameters(), getattr(peft, target).parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_ldm_named_loras_equal_diffusers_named(files, sd1_ref):
    """kohya names in LDM spelling and ComfyUI's dotted diffusion_model.* names fuse into the same layers."""
    kohya = lora_state_dict(sd1_ref)
    renamed = {"ldm": {}, "comfy": {}}
    for key, value in kohya.items():
        base, _, suffix = key.partition(".")
        target, module = LORA_LAYERS[base]
        if target == "unet":
            ldm = ldm_name(module, sd1_ref.unet.config)
            renamed["ldm"][f"lora_unet_{ldm.replace('.', '_')}.{suffix}"] = value
            renamed["comfy"][f"diffusion_model.{ldm}.{suffix}"] = value
        else:
            renamed["ldm"][key] = renamed["comfy"][key] = value
    assert "lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in renamed["ldm"]
    expected = load_folder(files["sd1"])
    fuse_lora(kohya, expected.unet, expected.text_encoder)
    for _style, sd in renamed.items():
        models = load_folder(files["sd1"])
        assert fuse_lora(sd, models.unet, models.text_encoder) == {"unet": 4, "text_encoder": 2, "unmatched": 0}
        assert_same_weights(models, expected)


def test_ldm_names_of_a_real_unet(real_shapes):
    """diffusers' conversion (the core's oracle) and this file's inverse agree on every layer of SD1.5."""
    unet = build_random_components("sd15", device="meta", taesd=False)["unet"]
    names = ldm_unet_names(unet)
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert names == {ldm_name(n, unet.config): n for n in layers}
    # a key of a real LDM-named SD1.5 LoRA (kohya-ss/sd-scripts#1490)
    assert names["input_blocks.7.1.transformer_blocks.0.attn2.to_out.0"] == \
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_out.0"
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.0.attn2.to_out.0.weight" in real_shapes["sd15"]


def test_lora_set_is_part_of_the_identity_and_key(files):
    lora = str(files["lora"])
    specs = [PipelineSpec(str(files["sd1"]), dtype="fp32", device="cpu", loras=loras)
             for loras in ((), (LoraSpec(lora),), (LoraSpec(lora, 0.5, 0.5),), (LoraSpec(lora), LoraSpec(lora, 0.5)))]
    keys = [s.cache_key() for s in specs]
    assert len(set(keys)) == len(keys)
    assert keys[1] == PipelineSpec(str(files["sd1"]), dtype="fp32", device="cpu", loras=(LoraSpec(lora),)).cache_key()
    identities = [s.load().identity["loras"] for s in specs[:3]]
    assert identities[0] == [] and identities[1] != identities[2]
    assert identities[1][0][3:] == (1.0, 1.0) and identities[2][0][3:] == (0.5, 0.5)


@pytest.mark.parametrize(("make", "message"), [
    (lambda sd: {k.replace("lora_unet_", "lora_unet_x_"): v for k, v in sd.items() if "lora_unet_" in k},
     "none of its"),
    (lambda sd: {**sd, "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(1)}, "LoHa"),
    (lambda sd: {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 1)}, "SDXL"),
    (lambda sd: {k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k.endswith("lora_up.weight") else v)
                 for k, v in sd.items()}, "another architecture"),
    (lambda sd: {k: v for k, v in sd.items() if not k.endswith("lora_up.weight")}, "down and up"),
    (lambda sd: {"foo": torch.zeros(1)}, "no LoRA weights"),
])
def test_bad_loras_are_refused(files, tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    save_file(make(read_weights(files["lora"])), str(path))
    with pytest.raises(ModelLoadError, match=message) as info:
        load_folder(files["sd1"], loras=[str(path)])
    assert str(path) in str(info.value)


# =========================================================================== errors and caching
class Evil:
    """Pickles to ``open(target, "w")``: loading it unsafely creates the file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return open, (str(self.target), "w")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused(files, tmp_path, zip_format):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": read_weights(files["sd1_ckpt"]), "payload": Evil(target)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ModelLoadError, match="refused.*run code") as info:
        load_file(path, config_dir=files["sd1_configs"], tokenizer_dir=files["tokenizer"])
    assert str(path) in str(info.value) and ".safetensors" in str(info.value)
    with pytest.raises(ModelLoadError, match="refused"):
        load_folder(files["sd1"], loras=[str(path)])
    assert not target.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert target.exists()


def test_missing_truncated_and_unknown_files(files, tmp_path):
    kwargs = dict(config_dir=files["sd1_configs"], tokenizer_dir=files["tokenizer"])
    with pytest.raises(ModelLoadError, match="file not found"):
        load_file(tmp_path / "nope.safetensors", **kwargs)
    data = files["sd1_ckpt"].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as info:
        load_file(truncated, **kwargs)
    assert str(truncated) in str(info.value)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_file(garbage, **kwargs)
    with pytest.raises(ModelLoadError, match="unsupported file type"):
        load_file(files["sd1"] / "model_index.json", **kwargs)
    save_file({"foo.bar": torch.zeros(2), "foo.baz": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelLoadError, match=r"keys found: foo\.bar"):
        load_file(tmp_path / "other.safetensors", **kwargs)


def _live(cls_name: str) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o).__name__ == cls_name)


def test_failed_load_leaves_nothing_behind(files, tmp_path):
    """A load that fails after the models were built (a LoRA that does not fit) caches and keeps nothing."""
    bad = tmp_path / "bad_lora.safetensors"
    save_file({k: v[:, :1].contiguous() if k.endswith("lora_down.weight") else v
               for k, v in read_weights(files["lora"]).items()}, str(bad))
    sessions = StreamSessions()
    spec = PipelineSpec(str(files["sd1_ckpt"]), dtype="fp32", device="cpu", config_dir=str(files["sd1_configs"]),
                        tokenizer_dir=str(files["tokenizer"]), loras=(LoraSpec(str(bad)),))
    before = _live("UNet2DConditionModel")
    with pytest.raises(ModelLoadError, match="another architecture") as info:
        sessions.pipeline(spec.cache_key(), spec.load)
    assert _live("UNet2DConditionModel") == before  # not even the exception holds the half-loaded UNet
    assert sessions.loads == 0
    del info
    class LoaderRan(Exception):
        pass

    def loader():
        raise LoaderRan

    with pytest.raises(LoaderRan):  # nothing was cached under the key: asking again runs the loader
        sessions.pipeline(spec.cache_key(), loader)
    assert sessions.counts() == (0, 0)


def test_pipeline_cache_key_follows_the_files(files, tmp_path):
    ckpt = tmp_path / "model.safetensors"
    shutil.copy(files["sd1_ckpt"], ckpt)
    spec = PipelineSpec(str(ckpt), dtype="fp32", device="cpu", config_dir=str(files["sd1_configs"]),
                        tokenizer_dir=str(files["tokenizer"]),
                        taesd=str(files["comfy_taesd"] / "taesd_encoder.safetensors"))
    sessions = StreamSessions()
    first = sessions.pipeline(spec.cache_key(), spec.load)
    assert sessions.pipeline(spec.cache_key(), spec.load) is first and sessions.loads == 1
    assert str(files["comfy_taesd"] / "taesd_decoder.safetensors") in {f for f, *_ in first.identity["files"]}
    os.utime(ckpt, ns=(1, 1))
    assert sessions.pipeline(spec.cache_key(), spec.load) is not first and sessions.loads == 2


# =========================================================================== fp16-variant diffusers folders
def test_a_folder_with_only_fp16_variant_files_loads(files, tmp_path):
    """A diffusers folder whose components hold only ``*.fp16.safetensors`` (as many published models ship, saved
    with ``variant="fp16"``) loads through diffusers' / transformers' ``variant="fp16"``: the same weights as the
    plain folder's, rounded to fp16; the TAESD folder likewise. Before: "no file named
    diffusion_pytorch_model.bin"."""
    from streamrt.loading import weights_variant
    from streamrt.random_models import build_random_components

    folder, taesd = tmp_path / "sd1-fp16", tmp_path / "taesd-fp16"
    shutil.copytree(files["sd1"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    parts = build_random_components("tiny", seed=0, taesd=True)  # the weights of files["sd1"] (seed 0)
    for name in ("unet", "vae", "text_encoder"):
        parts[name].half().save_pretrained(folder / name, safe_serialization=True, variant="fp16")
    parts["taesd"].half().save_pretrained(taesd, safe_serialization=True, variant="fp16")
    assert sorted(p.name for p in (folder / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.fp16.safetensors"]
    assert sorted(p.name for p in (folder / "text_encoder").iterdir()) == ["config.json", "model.fp16.safetensors"]
    assert weights_variant(folder / "unet") == "fp16" and weights_variant(files["sd1"] / "unet") is None

    got = load_diffusers_folder(folder, dtype="fp16", device="cpu", taesd=taesd)
    plain = load_diffusers_folder(files["sd1"], dtype="fp16", device="cpu", taesd=files["taesd"])
    assert_same_weights(got, plain)
    # loaded in fp32 too (the weights as stored), and a stream runs on them
    assert first_frame(load_folder(folder)).shape == (1, SIZE, SIZE, 3)


def test_variant_file_names(tmp_path):
    """Which variant a component folder needs: none while plain files (single or sharded) are there."""
    from streamrt.loading import weights_variant

    def variant(*names: str) -> str | None:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"")
        return weights_variant(folder)

    assert variant("config.json", "diffusion_pytorch_model.safetensors",
                   "diffusion_pytorch_model.fp16.safetensors") is None
    assert variant("model.safetensors.index.json", "model-00001-of-00002.safetensors") is None
    assert variant("diffusion_pytorch_model.fp16.safetensors") == "fp16"
    assert variant("diffusion_pytorch_model.safetensors.index.fp16.json",
                   "diffusion_pytorch_model.fp16-00001-of-00002.safetensors") == "fp16"
    assert variant("model.bf16.safetensors", "model.fp16.safetensors") == "fp16"
    assert variant("pytorch_model.bf16.bin") == "bf16"
    assert variant("config.json") is None and weights_variant(tmp_path / "missing") is None
