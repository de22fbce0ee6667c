"""Loading SDXL from what a ComfyUI user has, offline: diffusers folders, SGM single-file checkpoints, ComfyUI's
TAESDXL files, SDXL LoRAs (kohya, LCM-LoRA-SDXL and PEFT styles), and the SDXL VAE kept in fp32 in fp16 pipelines.

As in tests/test_loading.py, every load path is checked against the same weights loaded from a diffusers folder:
equal state dicts and equal frames of a stream (CPU, float32). The SDXL checkpoint is written from the tiny random
SDXL models (``tiny-xl``) by the inverse of the SGM layout (tests/model_files.py: OpenCLIP names for the second
text encoder, its projection transposed as OpenCLIP stores it); the detection rules and the shipped configs are
checked on the key names and shapes of the real SDXL architecture built on the meta device (``sdxl-turbo``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from model_files import (
    LORA_LAYERS_XL,
    SDXL_OPEN_CLIP,
    assert_frames_match,
    ldm_name,
    ldm_state_dict,
    lora_state_dict,
    lora_target,
    write_comfy_taesd,
    write_config_dir,
    write_sdxl_checkpoint,
)
from safetensors.torch import save_file

from streamrt import Stream, StreamConfig
from streamrt import checkpoints as ck
from streamrt.families import SD1, SD2, SDXL
from streamrt.loading import (
    ModelLoadError,
    _clip_tokenizers,
    load_checkpoint,
    load_diffusers_folder,
    load_taesd,
    read_weights,
)
from streamrt.lora import LoraSpec, fuse_lora, ldm_unet_names
from streamrt.models import decode_latents, encode_images, vae_dtype
from streamrt.random_models import build_random_components, write_clip_tokenizer, write_random_pipeline

SIZE = 64
PROMPT, NEGATIVE = "a photo of a red cat", "blurry"
COMFYUI = Path(os.environ.get("STREAMRT_COMFYUI") or Path(__file__).resolve().parents[1] / ".comfyui" / "ComfyUI")
CPU = torch.device("cpu")
MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")


# =========================================================================== helpers and fixtures
def frame() -> torch.Tensor:
    return torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(5))


def first_frame(models) -> torch.Tensor:
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 35), num_inference_steps=50, cfg_type="self",
                          guidance_scale=1.5, delta=1.0, seed=2)
    return Stream(models, config, prompt=PROMPT, negative_prompt=NEGATIVE).step(frame())


def assert_same_weights(a, b, names=MODULES) -> None:
    for name in names:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


def load_folder(folder: Path, **kwargs):
    return load_diffusers_folder(folder, dtype=kwargs.pop("dtype", "fp32"), device="cpu", **kwargs)


def load_file(path: Path, **kwargs):
    return load_checkpoint(path, dtype=kwargs.pop("dtype", "fp32"), device="cpu", **kwargs)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The tiny SDXL models as a diffusers folder (plus a TAESD folder named ``taesdxl``), as an SGM single-file
    checkpoint with config folders, as ComfyUI's taesdxl pair; the tiny SD1 models and their taesd pair; LoRAs."""
    root = tmp_path_factory.mktemp("loading-sdxl")
    f = {"xl": root / "xl", "taesdxl": root / "taesdxl", "sd1": root / "sd1", "taesd": root / "taesd",
         "tokenizer": root / "tokenizer"}
    write_random_pipeline(f["xl"], "tiny-xl", seed=0, taesd_folder=f["taesdxl"])
    write_random_pipeline(f["sd1"], "tiny", seed=0, taesd_folder=f["taesd"])
    write_clip_tokenizer(f["tokenizer"])
    ref = load_folder(f["xl"])
    f["xl_ckpt"] = write_sdxl_checkpoint(root / "tiny-xl.safetensors", ref)
    f["xl_configs"] = write_config_dir(root / "tiny-xl-configs", f["xl"], tokenizer=False)
    f["xl_configs_tok"] = write_config_dir(root / "tiny-xl-configs-tok", f["xl"], tokenizer=True)
    f["vae_approx"] = root / "vae_approx"
    write_comfy_taesd(f["vae_approx"], load_taesd(f["taesdxl"], dtype=torch.float32, device=CPU), name="taesdxl")
    write_comfy_taesd(f["vae_approx"], load_taesd(f["taesd"], dtype=torch.float32, device=CPU), name="taesd")
    for style in ("kohya", "peft"):
        f[f"lora_{style}"] = root / f"xl-lora-{style}.safetensors"
        save_file(lora_state_dict(ref, style=style, layers=LORA_LAYERS_XL), str(f[f"lora_{style}"]))
    f["sd1_lora"] = root / "sd1-lora.safetensors"
    save_file(lora_state_dict(load_folder(f["sd1"])), str(f["sd1_lora"]))
    return f


@pytest.fixture(scope="module")
def xl_ref(files):
    return load_folder(files["xl"])


@pytest.fixture(scope="module")
def xl_ref_frame(xl_ref) -> torch.Tensor:
    return first_frame(xl_ref)


def load_xl_ckpt(files, **kwargs):
    return load_file(files["xl_ckpt"], config_dir=files["xl_configs"], tokenizer_dir=files["tokenizer"], **kwargs)


def comfy_pair(files, name: str) -> tuple[Path, Path]:
    return files["vae_approx"] / f"{name}_encoder.safetensors", files["vae_approx"] / f"{name}_decoder.safetensors"


# =========================================================================== diffusers folders
def test_sdxl_folder_loads_both_text_encoders(files, xl_ref):
    """The second text encoder is a CLIPTextModelWithProjection with the folder's weights (projection included);
    its tokenizer pads with "!"; the pipeline is SDXL."""
    from transformers import CLIPTextModelWithProjection

    original = build_random_components("tiny-xl", seed=0, taesd=False)  # what write_random_pipeline saved
    assert xl_ref.family is SDXL and isinstance(xl_ref.text_encoder_2, CLIPTextModelWithProjection)
    for name in MODULES:
        expected = original[name].state_dict()
        got = getattr(xl_ref, name).state_dict()
        assert got.keys() == expected.keys(), name
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    assert xl_ref.tokenizer.pad_token == "<|endoftext|>" and xl_ref.tokenizer_2.pad_token == "!"
    assert xl_ref.prediction_type == "epsilon" and xl_ref.vae_scaling_factor == 0.13025


def test_sdxl_folder_with_only_fp16_variant_files(files, xl_ref, tmp_path):
    """Published SDXL folders often hold only ``*.fp16.safetensors``, text_encoder_2 included: they load, with the
    weights as stored (the fp32 ones rounded to fp16)."""
    folder = tmp_path / "xl-fp16"
    shutil.copytree(files["xl"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    parts = build_random_components("tiny-xl", seed=0, taesd=False)
    for name in MODULES:
        parts[name].half().save_pretrained(folder / name, safe_serialization=True, variant="fp16")
    assert sorted(p.name for p in (folder / "text_encoder_2").iterdir()) == ["config.json", "model.fp16.safetensors"]
    got = load_folder(folder)
    for name in MODULES:
        for key, value in getattr(xl_ref, name).state_dict().items():
            assert torch.equal(getattr(got, name).state_dict()[key], value.half().float()), f"{name}.{key}"


def test_sdxl_folder_without_its_second_text_encoder_is_refused(files, tmp_path):
    folder = tmp_path / "xl-no-te2"
    shutil.copytree(files["xl"], folder, ignore=shutil.ignore_patterns("text_encoder_2", "tokenizer_2"))
    with pytest.raises(ModelLoadError, match=r"lacks the component folders \['text_encoder_2', 'tokenizer_2'\]"):
        load_folder(folder)
    refiner = tmp_path / "xl-refiner-like"
    shutil.copytree(files["xl"], refiner, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        load_folder(refiner)


# =========================================================================== single-file SDXL checkpoints
def test_sdxl_checkpoint_equals_the_diffusers_folder(files, xl_ref, xl_ref_frame):
    models = load_xl_ckpt(files)
    assert models.family is SDXL and models.identity["family"] == "sdxl"
    assert_same_weights(models, xl_ref)
    assert models.prediction_type == "epsilon"
    assert_frames_match(first_frame(models), xl_ref_frame)


def test_sdxl_checkpoint_file_layout(files):
    """Guards the test's own writer: SGM names, OpenCLIP names and the extras real SDXL files carry."""
    keys = set(read_weights(files["xl_ckpt"]))
    for key in ("model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
                "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
                SDXL_OPEN_CLIP + "transformer.resblocks.1.attn.in_proj_weight", SDXL_OPEN_CLIP + "positional_embedding",
                SDXL_OPEN_CLIP + "ln_final.weight", SDXL_OPEN_CLIP + "text_projection", SDXL_OPEN_CLIP + "logit_scale",
                "first_stage_model.decoder.mid.attn_1.q.weight"):
        assert key in keys, key
    assert not any(k.startswith("cond_stage_model.") for k in keys)


def test_openclip_projection_is_applied_as_x_at_p(files):
    """The pooled embedding is the final-norm hidden state at the end token times the file's ``text_projection``
    (OpenCLIP's ``x @ P``), checked against the raw tensor: a transpose slipped into both the writer and the
    loader would not pass."""
    models = load_xl_ckpt(files)
    projection = read_weights(files["xl_ckpt"])[SDXL_OPEN_CLIP + "text_projection"]
    ids = models.tokenizer_2("a red cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = models.text_encoder_2(ids, output_hidden_states=True, return_dict=True)
        tower = getattr(models.text_encoder_2, "text_model", models.text_encoder_2)
        pooled = tower(ids, return_dict=True).pooler_output
    assert not torch.equal(projection, projection.T)  # a random square matrix: a transpose would show
    torch.testing.assert_close(out.text_embeds, pooled @ projection, rtol=1e-5, atol=1e-6)


def test_sdxl_tokenizers_from_clip_files_pad_like_clip_and_openclip(files):
    """From one set of CLIP tokenizer files: the first tokenizer pads with its end token, the second with "!"
    (id 0), both cut at 77; a config folder's own tokenizers are used as they are."""
    models = load_xl_ckpt(files)
    first = models.tokenizer("a cat", padding="max_length", max_length=77).input_ids
    second = models.tokenizer_2("a cat", padding="max_length", max_length=77).input_ids
    eos = models.tokenizer.eos_token_id
    assert models.tokenizer.pad_token == "<|endoftext|>" and models.tokenizer_2.pad_token == "!"
    assert models.tokenizer.model_max_length == models.tokenizer_2.model_max_length == 77
    assert first[-1] == eos and second[-1] == 0 and len(first) == len(second) == 77
    end = first.index(eos) + 1
    assert first[:end] == second[:end]  # the same text tokens: only the padding differs
    own = load_file(files["xl_ckpt"], config_dir=files["xl_configs_tok"])
    assert own.tokenizer_2.pad_token == "!" and own.tokenizer.pad_token == "<|endoftext|>"


def test_comfyui_tokenizer_files_make_both_sdxl_tokenizers():
    """ComfyUI's comfy/sd1_tokenizer (CLIP's real 49408-token files) with the shipped SDXL configs."""
    tokenizer = COMFYUI / "comfy" / "sd1_tokenizer"
    if not (tokenizer / "vocab.json").is_file():
        pytest.skip(f"no ComfyUI tokenizer at {tokenizer}")
    got = _clip_tokenizers(ck.CONFIG_ROOT / "sdxl", tokenizer, SDXL)
    assert set(got) == {"tokenizer", "tokenizer_2"}
    first = got["tokenizer"]("a photo of a cat", padding="max_length", max_length=77).input_ids
    second = got["tokenizer_2"]("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert first[0] == second[0] == 49406 and first[-1] == 49407 and second[-1] == 0
    assert len(got["tokenizer"]) == 49408


def test_sidecar_config_folder_works_for_sdxl(files, xl_ref, tmp_path):
    ckpt = tmp_path / "xl.safetensors"
    shutil.copy(files["xl_ckpt"], ckpt)
    shutil.copytree(files["xl_configs_tok"], tmp_path / "configs")
    Path(str(ckpt) + ".streamrt.json").write_text(json.dumps({"config_dir": "configs"}))
    assert_same_weights(load_file(ckpt), xl_ref)


def test_tiny_sdxl_checkpoint_without_configs_names_the_widths(files):
    """Without a config folder the shipped SDXL configs apply; the tiny widths are refused from the header."""
    with pytest.raises(ModelLoadError, match=r"SDXL checkpoints have a text width of 768\+1280, this one 32\+32") as e:
        load_file(files["xl_ckpt"], tokenizer_dir=files["tokenizer"])
    assert str(files["xl_ckpt"]) in str(e.value)


# =========================================================================== the real SDXL architecture (meta)
@pytest.fixture(scope="module")
def real_xl() -> dict:
    """Key -> meta tensor of a real SDXL checkpoint (sdxl-turbo's architecture = SDXL base's; no memory)."""
    parts = build_random_components("sdxl-turbo", device="meta", taesd=False)
    return ldm_state_dict(parts["unet"], parts["vae"], parts["text_encoder"], "sdxl", parts["text_encoder_2"])


@pytest.mark.parametrize(("key", "shape"), [
    ("model.diffusion_model.input_blocks.0.0.weight", (320, 4, 3, 3)),
    ("model.diffusion_model.label_emb.0.0.weight", (1280, 2816)),
    ("model.diffusion_model.label_emb.0.2.weight", (1280, 1280)),
    ("model.diffusion_model.input_blocks.3.0.op.weight", (320, 320, 3, 3)),
    ("model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight", (640, 2048)),
    ("model.diffusion_model.input_blocks.7.1.proj_in.weight", (1280, 1280)),
    ("model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight", (1280, 5120)),
    ("model.diffusion_model.output_blocks.2.2.conv.weight", (1280, 1280, 3, 3)),
    ("model.diffusion_model.output_blocks.5.2.conv.weight", (640, 640, 3, 3)),
    ("model.diffusion_model.output_blocks.8.0.skip_connection.weight", (320, 640, 1, 1)),
    ("conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight", (3072, 768)),
    ("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", (3840, 1280)),
    ("conditioner.embedders.1.model.text_projection", (1280, 1280)),
    ("conditioner.embedders.1.model.token_embedding.weight", (49408, 1280)),
    ("first_stage_model.decoder.up.3.upsample.conv.weight", (512, 512, 3, 3)),
])
def test_synthetic_sdxl_checkpoint_has_the_real_key_names(real_xl, key, shape):
    assert tuple(real_xl[key].shape) == shape
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" not in real_xl  # no attention on level 0


def test_detection_and_shipped_configs_fit_the_real_sdxl(real_xl):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    arch = ck.detect_architecture({k: tuple(v.shape) for k, v in real_xl.items()})
    assert (arch.family, arch.text_widths, arch.context_dim, arch.in_channels, arch.has_vae) == (
        "sdxl", SDXL.text_widths, SDXL.embed_dim, 4, True)
    for name in ("sd_xl_base_1.0.safetensors", "sd_xl_turbo_1.0_fp16.safetensors"):
        assert ck.auto_prediction_type(arch, name)[0] == "epsilon"
    marked = ck.detect_architecture({**{k: tuple(v.shape) for k, v in real_xl.items()}, "v_pred": ()})
    assert ck.auto_prediction_type(marked, "x.safetensors")[0] == "v_prediction"
    folder = ck.shipped_config_dir("sdxl", "epsilon")
    assert folder == ck.CONFIG_ROOT / "sdxl" == ck.shipped_config_dir(SDXL, "v_prediction")
    parts = ck.build_components(real_xl, "sdxl", folder)  # strict: every tensor of the real layout fits
    assert sum(p.numel() for p in parts["unet"].parameters()) == 2_567_463_684  # SDXL's UNet
    assert type(parts["text_encoder"]) is CLIPTextModel and parts["text_encoder"].config.num_hidden_layers == 12
    assert type(parts["text_encoder_2"]) is CLIPTextModelWithProjection
    assert parts["text_encoder_2"].config.num_hidden_layers == 32
    assert tuple(parts["text_encoder_2"].text_projection.weight.shape) == (1280, 1280)
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert (vae["scaling_factor"], vae["force_upcast"]) == (SDXL.vae_scaling, True)


@pytest.mark.parametrize(("change", "message"), [
    ("refiner", "SDXL refiner"),
    ("no_label_emb", "no label_emb"),
    ("inpaint", "9 input channels"),
    ("no_clip_l", "only part of SDXL's text encoders"),
    ("wide_context", r"width 1024 does not match the text encoders' 768\+1280"),
    ("lora", "this is a LoRA"),
])
def test_sdxl_shaped_files_stream_cannot_run_are_named(real_xl, change, message):
    shapes = {k: tuple(v.shape) for k, v in real_xl.items()}
    if change == "refiner":  # OpenCLIP-bigG as embedder 0 only, with size/aesthetic embeddings
        shapes = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): s for k, s in shapes.items()
                  if not k.startswith("conditioner.embedders.0.")}
        shapes["model.diffusion_model.label_emb.0.0.weight"] = (1536, 2560)
    elif change == "no_label_emb":
        shapes = {k: s for k, s in shapes.items() if ".label_emb." not in k}
    elif change == "inpaint":
        shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    elif change == "no_clip_l":
        shapes = {k: s for k, s in shapes.items() if not k.startswith("conditioner.embedders.0.")}
    elif change == "wide_context":
        shapes = {k: ((s[0], 1024) if k.endswith("attn2.to_k.weight") else s) for k, s in shapes.items()}
    else:
        shapes = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 1280)}
    names = ck.normalize_keys(list(shapes))
    with pytest.raises(ModelLoadError, match=message):
        ck.detect_architecture({names[k]: s for k, s in shapes.items()})


def test_sd1_and_sd2_checkpoints_are_not_taken_for_sdxl():
    """The family seam: each family is its own text-encoder layout (SGM-named SD1/SD2 files included)."""
    for preset, family in (("sd15", SD1), ("sd21", SD2)):
        parts = build_random_components(preset, device="meta", taesd=False)
        shapes = {k: tuple(v.shape) for k, v in
                  ldm_state_dict(parts["unet"], parts["vae"], parts["text_encoder"], family.name).items()}
        sgm = {k.replace("cond_stage_model.", "conditioner.embedders.0."): s for k, s in shapes.items()}
        for variant in (shapes, sgm):
            names = ck.normalize_keys(list(variant))
            arch = ck.detect_architecture({names[k]: s for k, s in variant.items()})
            assert (arch.family, arch.text_widths) == (family.name, family.text_widths)
            assert ck.shipped_config_dir(arch.family, "epsilon").name == family.config_folder("epsilon")


# =========================================================================== TAESDXL
def test_comfy_taesdxl_files_load_for_sdxl(files, xl_ref_frame):
    """ComfyUI's taesdxl_encoder / taesdxl_decoder: the same AutoencoderTiny as its diffusers folder, unscaled
    latents, for a folder and a checkpoint alike."""
    folder_vae = load_taesd(files["taesdxl"], dtype=torch.float32, device=CPU, family=SDXL)
    pair_vae = load_taesd(comfy_pair(files, "taesdxl"), dtype=torch.float32, device=CPU, family=SDXL)
    assert folder_vae.state_dict().keys() == pair_vae.state_dict().keys()
    assert all(torch.equal(v, pair_vae.state_dict()[k]) for k, v in folder_vae.state_dict().items())
    assert pair_vae.config.scaling_factor == 1.0
    a = load_folder(files["xl"], taesd=files["taesdxl"])
    b = load_xl_ckpt(files, taesd=str(comfy_pair(files, "taesdxl")[1]))  # one file of the pair finds the other
    assert a.is_tiny_vae and b.is_tiny_vae and b.vae_scaling_factor == 1.0
    frame_a = first_frame(a)
    assert_frames_match(first_frame(b), frame_a)
    assert not torch.equal(frame_a, xl_ref_frame)  # TAESD, not the full VAE


@pytest.mark.parametrize(("pipeline", "taesd", "message"), [
    ("sd1", "taesdxl", r"taesdxl \(taesdxl_encoder.safetensors / taesdxl_decoder.safetensors\), the tiny autoencoder "
                       r"for SDXL's latent space; this SD1.x pipeline needs taesd \(taesd_encoder.safetensors / "
                       r"taesd_decoder.safetensors"),
    ("xl", "taesd", r"taesd \(taesd_encoder.safetensors / taesd_decoder.safetensors\), the tiny autoencoder for "
                    r"SD1.x/SD2.x's latent space; this SDXL pipeline needs taesdxl \(taesdxl_encoder.safetensors / "
                    r"taesdxl_decoder.safetensors"),
    ("xl_ckpt", "taesd", "this SDXL pipeline needs taesdxl"),
    ("sd1", "taesdxl_folder", "this SD1.x pipeline needs taesd"),
])
def test_taesd_of_the_other_family_is_refused(files, pipeline, taesd, message):
    source = files["taesdxl"] if taesd == "taesdxl_folder" else comfy_pair(files, taesd)
    with pytest.raises(ModelLoadError, match=message) as info:
        if pipeline == "xl_ckpt":
            load_xl_ckpt(files, taesd=source)
        else:
            load_folder(files[pipeline], taesd=source)
    assert str(source if taesd == "taesdxl_folder" else source[0]) in str(info.value)


# =========================================================================== the SDXL VAE in fp16
@pytest.mark.parametrize(("family", "force_upcast", "dtype", "expected"), [
    (SDXL, True, torch.float16, torch.float32),    # SDXL's VAE overflows in fp16
    (SDXL, False, torch.float16, torch.float16),   # the fp16-fix VAE
    (SDXL, True, torch.bfloat16, torch.bfloat16),  # bf16 has fp32's range
    (SDXL, True, torch.float32, torch.float32),
    (SD1, True, torch.float16, torch.float16),     # SD1/SD2 configs carry diffusers' default force_upcast=True
    (SD2, True, torch.float16, torch.float16),
])
def test_vae_dtype_decisions(family, force_upcast, dtype, expected):
    from diffusers import AutoencoderKL, AutoencoderTiny

    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, force_upcast=force_upcast)
        tiny = AutoencoderTiny(encoder_block_out_channels=(8,), decoder_block_out_channels=(8,),
                               num_encoder_blocks=(1,), num_decoder_blocks=(1,))
    assert vae_dtype(vae, dtype, family) == expected
    assert vae_dtype(tiny, dtype, family) == dtype  # TAESD(XL) runs in the pipeline's dtype


def test_fp16_sdxl_pipeline_keeps_its_vae_in_fp32(files, xl_ref, tmp_path):
    """Folder and checkpoint alike: UNet and text encoders fp16, the VAE fp32 with the file's exact values (not
    rounded through fp16); moving the pipeline keeps it so. SD1 and the fp16-fix SDXL VAE stay fp16."""
    for models in (load_folder(files["xl"], dtype="fp16"), load_xl_ckpt(files, dtype="fp16")):
        assert models.dtype == torch.float16
        assert {getattr(models, n).dtype for n in ("unet", "text_encoder", "text_encoder_2")} == {torch.float16}
        assert next(models.vae.parameters()).dtype == torch.float32
        assert_same_weights(models, xl_ref, names=("vae",))
        models.to(dtype=torch.float16)
        assert next(models.vae.parameters()).dtype == torch.float32 and models.unet.dtype == torch.float16
    assert next(load_folder(files["sd1"], dtype="fp16").vae.parameters()).dtype == torch.float16
    fixed = tmp_path / "xl-fp16-fix"
    shutil.copytree(files["xl"], fixed)
    config = json.loads((fixed / "vae" / "config.json").read_text())
    (fixed / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    assert next(load_folder(fixed, dtype="fp16").vae.parameters()).dtype == torch.float16


def test_upcast_vae_runs_in_fp32_behind_fp16_tensors(files, xl_ref):
    """encode_images / decode_latents take and give the pipeline's fp16 tensors and run an fp32 VAE in fp32."""
    vae = load_folder(files["xl"], dtype="fp16").vae
    images = (torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1).half()
    with torch.no_grad():
        latents = encode_images(vae, images)
        assert latents.dtype == torch.float16
        # fp16 results: one fp16 rounding step apart at most (torch's fp16 tolerances; see LOAD_PATH_ATOL for why)
        torch.testing.assert_close(latents, encode_images(xl_ref.vae, images.float()).half())
        decoded = decode_latents(vae, latents)
        assert decoded.dtype == torch.float16
        torch.testing.assert_close(decoded, decode_latents(xl_ref.vae, latents.float()).half())


def test_sdxl_checkpoint_streams_in_bf16(files):
    """A reduced-precision SDXL pipeline (bf16: what a CPU runs well) streams finite frames end to end."""
    models = load_xl_ckpt(files, dtype="bf16")
    assert {m.dtype for m in (models.unet, models.vae, models.text_encoder_2)} == {torch.bfloat16}
    out = first_frame(models)
    assert out.shape == (1, SIZE, SIZE, 3) and torch.isfinite(out.float()).all()


# =========================================================================== SDXL LoRAs
def _expected_fused(reference, lora: dict, kohya: str, target: str, module: str, strength: float) -> torch.Tensor:
    base = lora_target(reference, target, module).weight
    up, down = lora[f"{kohya}.lora_up.weight"], lora[f"{kohya}.lora_down.weight"]
    scale = strength * float(lora[f"{kohya}.alpha"]) / down.shape[0]
    return base + scale * (up.flatten(1) @ down.flatten(1)).reshape(base.shape)


def test_sdxl_lora_fuses_exactly_into_unet_and_both_text_encoders(files, xl_ref):
    lora = read_weights(files["lora_kohya"])
    touched = {(t, lora_target(xl_ref, t, m)) for t, m in LORA_LAYERS_XL.values()}
    for strength in (1.0, 0.6):
        models = load_folder(files["xl"], loras=[LoraSpec(str(files["lora_kohya"]), strength, strength)])
        for kohya, (target, module) in LORA_LAYERS_XL.items():
            expected = _expected_fused(xl_ref, lora, kohya, target, module, strength)
            assert torch.equal(lora_target(models, target, module).weight, expected), module
        for target in ("unet", "text_encoder", "text_encoder_2"):
            ref_modules = {name: m for name, m in getattr(xl_ref, target).named_modules()}
            fused = dict(getattr(models, target).named_modules())
            for name, module in ref_modules.items():
                if (target, module) in touched or not hasattr(module, "weight") or module.weight is None:
                    continue
                assert torch.equal(fused[name].weight, module.weight), f"{target}.{name}"


def test_sdxl_lora_counts_and_clip_strength(files, xl_ref):
    lora = read_weights(files["lora_kohya"])
    models = load_folder(files["xl"])
    counts = fuse_lora(lora, models.unet, models.text_encoder, models.text_encoder_2)
    assert counts == {"unet": 5, "text_encoder": 1, "text_encoder_2": 2, "unmatched": 0}
    unet_only = load_folder(files["xl"], loras=[LoraSpec(str(files["lora_kohya"]), 1.0, 0.0)])
    assert_same_weights(unet_only, xl_ref, names=("text_encoder", "text_encoder_2", "vae"))
    assert not all(torch.equal(a, b) for a, b in zip(unet_only.unet.parameters(), xl_ref.unet.parameters()))
    with pytest.raises(ModelLoadError, match="2 text encoder"):  # SDXL's second encoder must be given
        fuse_lora(lora, models.unet, models.text_encoder)


def test_sdxl_peft_lora_equals_kohya_style(files, xl_ref):
    kohya = load_folder(files["xl"], loras=[str(files["lora_kohya"])])
    peft = load_folder(files["xl"], loras=[str(files["lora_peft"])])
    assert all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in read_weights(files["lora_peft"]))
    for target in ("unet", "text_encoder", "text_encoder_2"):
        for (name, a), b in zip(getattr(kohya, target).named_parameters(), getattr(peft, target).parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_sdxl_ldm_named_loras_equal_diffusers_named(files, xl_ref):
    """kohya SDXL LoRAs in LDM spelling (``lora_unet_input_blocks_4_1_...``, ``lora_unet_label_emb_0_0``) and
    ComfyUI's ``diffusion_model.*`` names fuse into the same layers as the diffusers-named ones."""
    kohya = lora_state_dict(xl_ref, layers=LORA_LAYERS_XL)
    renamed = {"ldm": {}, "comfy": {}}
    for key, value in kohya.items():
        base, _, suffix = key.partition(".")
        target, module = LORA_LAYERS_XL[base]
        if target == "unet":
            ldm = ldm_name(module, xl_ref.unet.config)
            renamed["ldm"][f"lora_unet_{ldm.replace('.', '_')}.{suffix}"] = value
            renamed["comfy"][f"diffusion_model.{ldm}.{suffix}"] = value
        else:
            renamed["ldm"][key] = renamed["comfy"][key] = value
    assert "lora_unet_label_emb_0_0.lora_down.weight" in renamed["ldm"]
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in renamed["ldm"]
    expected = load_folder(files["xl"])
    fuse_lora(kohya, expected.unet, expected.text_encoder, expected.text_encoder_2)
    for sd in renamed.values():
        models = load_folder(files["xl"])
        assert fuse_lora(sd, models.unet, models.text_encoder, models.text_encoder_2) == {
            "unet": 5, "text_encoder": 1, "text_encoder_2": 2, "unmatched": 0}
        assert_same_weights(models, expected)


def test_ldm_names_of_the_real_sdxl_unet():
    """diffusers' conversion and this file's inverse agree on every layer of SDXL's UNet (added embedding too)."""
    unet = build_random_components("sdxl-turbo", device="meta", taesd=False)["unet"]
    names = ldm_unet_names(unet)
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert names == {ldm_name(n, unet.config): n for n in layers}
    assert names["label_emb.0.0"] == "add_embedding.linear_1"
    assert names["input_blocks.7.1.transformer_blocks.9.attn2.to_k"] == \
        "down_blocks.2.attentions.0.transformer_blocks.9.attn2.to_k"


def test_sdxl_lora_changes_frames_and_the_checkpoint_takes_it_alike(files, xl_ref_frame):
    loras = [(str(files["lora_kohya"]), 0.8)]
    a, b = load_folder(files["xl"], loras=loras), load_xl_ckpt(files, loras=loras)
    assert_same_weights(a, b)
    frame_a = first_frame(a)
    assert_frames_match(first_frame(b), frame_a)
    assert (frame_a - xl_ref_frame).abs().max() > 1e-3


def _unet_only_lora(context_width: int, rank: int = 4) -> dict:
    """A LoRA of one cross-attention key layer whose input is a real family's context width (768, 1024, 2048)."""
    base = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    return {f"{base}.lora_down.weight": torch.zeros(rank, context_width),
            f"{base}.lora_up.weight": torch.zeros(640, rank), f"{base}.alpha": torch.tensor(float(rank))}


@pytest.mark.parametrize(("pipeline", "lora", "message"), [
    ("sd1", "lora_kohya", r"is an SDXL LoRA \(lora_te1_\* keys, lora_te2_\* keys, layers of the pooled-text/size "
                          r"embedding\), but this pipeline is SD1.x: use a LoRA made for SD1.x"),
    ("sd1", "lora_peft", r"is an SDXL LoRA \(text_encoder_2.\* keys, layers of the pooled-text/size embedding\), "
                         r"but this pipeline is SD1.x"),
    ("xl", "sd1_lora", r"is an SD1.x/SD2.x LoRA \(lora_te_\* keys\), but this pipeline is SDXL"),
    ("sd1", 2048, r"is an SDXL LoRA \(cross-attention layers of width 2048\), but this pipeline is SD1.x"),
    ("xl", 768, r"is an SD1.x LoRA \(cross-attention layers of width 768\), but this pipeline is SDXL"),
    ("xl", 1024, r"is an SD2.x LoRA \(cross-attention layers of width 1024\), but this pipeline is SDXL"),
])
def test_lora_of_the_other_family_is_refused(files, tmp_path, pipeline, lora, message):
    if isinstance(lora, int):
        path = tmp_path / f"unet-only-{lora}.safetensors"
        save_file(_unet_only_lora(lora), str(path))
    else:
        path = files[lora]
    with pytest.raises(ModelLoadError, match=message) as info:
        load_folder(files[pipeline], loras=[str(path)])
    assert str(path) in str(info.value)
