"""Tests for streamrt.random_models: offline random-weight Stable Diffusion components."""

from __future__ import annotations

import json
import logging
import pathlib

import pytest
import torch

from streamrt import random_models as rm

logger = logging.getLogger(__name__)

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def tiny() -> dict[str, object]:
    return rm.build_random_components("tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    root = tmp_path_factory.mktemp("random_sd")
    folder = rm.write_random_pipeline(root / "sd", "tiny", seed=0, taesd_folder=root / "taesd")
    return folder, root / "taesd"


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_presets_constant() -> None:
    assert rm.PRESETS == ("tiny", "tiny-v", "sd15", "sd21", "sd-turbo", "tiny-xl", "sdxl-turbo")
    with pytest.raises(ValueError):
        rm.component_configs("sdxl")


def test_tokenizer_files_load_offline(tmp_path: pathlib.Path) -> None:
    from transformers import CLIPTokenizer

    folder = rm.write_clip_tokenizer(tmp_path / "tok")
    assert folder == tmp_path / "tok"
    names = {p.name for p in folder.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= names

    tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert tok.model_max_length == 77
    assert tok.bos_token == "<|startoftext|>"
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(tok) == len(vocab) < 1000
    # CLIP layout: specials are the two largest ids.
    assert tok.bos_token_id == len(vocab) - 2 and tok.eos_token_id == len(vocab) - 1

    ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(ids) == 77
    assert all(0 <= i < len(tok) for i in ids)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.pad_token_id
    # The merges apply: whole words become single tokens.
    assert tok.convert_ids_to_tokens(ids[1:6]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert ids[6] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    # Any text tokenizes (byte fallback), including non-ASCII.
    ids = tok("Ünïcode → emoji 🐱", padding="max_length", max_length=77).input_ids
    assert all(0 <= i < len(tok) for i in ids)


def test_tiny_components_shapes_and_types(tiny: dict[str, object]) -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(tiny["unet"], UNet2DConditionModel)
    assert isinstance(tiny["vae"], AutoencoderKL)
    assert isinstance(tiny["taesd"], AutoencoderTiny)
    assert isinstance(tiny["text_encoder"], CLIPTextModel)
    assert isinstance(tiny["tokenizer"], CLIPTokenizer)
    assert isinstance(tiny["scheduler"], LCMScheduler)
    sched = tiny["scheduler"].config
    assert (sched.num_train_timesteps, sched.beta_start, sched.beta_end) == (1000, 0.00085, 0.012)
    assert (sched.beta_schedule, sched.prediction_type, sched.timestep_scaling) == ("scaled_linear", "epsilon", 10.0)

    total = sum(p.numel() for k in ("unet", "vae", "text_encoder", "taesd") for p in tiny[k].parameters())
    assert total < 3_000_000
    tok, te = tiny["tokenizer"], tiny["text_encoder"]
    assert te.config.vocab_size == len(tok)
    assert te.config.eos_token_id == tok.eos_token_id and te.config.bos_token_id == tok.bos_token_id

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = tok([PROMPT, "the red dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        latents = tiny["vae"].encode(x).latent_dist.mean
        assert latents.shape == (2, 4, 8, 8)
        assert tiny["vae"].decode(latents).sample.shape == x.shape
        taesd_latents = tiny["taesd"].encode(x).latents
        assert taesd_latents.shape == (2, 4, 8, 8)
        assert tiny["taesd"].decode(taesd_latents).sample.shape == x.shape

        text = te(ids).last_hidden_state
        assert text.shape == (2, 77, 32)
        out = tiny["unet"](latents, 500, encoder_hidden_states=text).sample
        assert out.shape == latents.shape
        # Non-degenerate: the output depends on latents, timestep and prompt.
        assert torch.isfinite(out).all() and out.std() > 1e-3
        assert not torch.allclose(out[0], out[1])
        assert not torch.allclose(out, tiny["unet"](latents, 10, encoder_hidden_states=text).sample)
        swapped = tiny["unet"](latents, 500, encoder_hidden_states=text.flip(0)).sample
        assert not torch.allclose(out, swapped)
        assert not torch.allclose(latents[0], latents[1])


def test_tiny_forward_is_cheap(tiny: dict[str, object]) -> None:
    """Encode, one UNet call and decode of a 64x64 frame cost well under a GFLOP (counted by torch's flop
    counter, not timed: the wall clock depends on the machine and its load; SD1.5's UNet alone is ~0.8 TFLOP
    at 512x512)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, 64, 64)
    text = torch.zeros(1, 77, 32)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        latents = tiny["vae"].encode(x).latent_dist.mean
        out = tiny["unet"](latents, 1, encoder_hidden_states=text).sample
        tiny["vae"].decode(out)
    flops = counter.get_flop_counts()
    assert {"Encoder", "UNet2DConditionModel", "Decoder"} <= set(flops), list(flops)  # all three were counted
    assert 0 < counter.get_total_flops() < 500e6, counter.get_total_flops()


def test_same_seed_same_weights() -> None:
    a = rm.build_random_components("tiny", seed=3, taesd=False)
    b = rm.build_random_components("tiny", seed=3, taesd=False)
    c = rm.build_random_components("tiny", seed=4, taesd=False)
    assert b["taesd"] is None
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(a[name], b[name])
    assert not torch.equal(a["unet"].conv_in.weight, c["unet"].conv_in.weight)


def test_tiny_v_preset() -> None:
    parts = rm.build_random_components("tiny-v", taesd=False)
    assert parts["scheduler"].config.prediction_type == "v_prediction"
    assert parts["unet"].config.use_linear_projection is True
    assert rm.build_random_components("tiny", taesd=False)["unet"].config.use_linear_projection is False


def test_dtype(tiny: dict[str, object]) -> None:
    parts = rm.build_random_components("tiny", dtype=torch.bfloat16)
    for name in ("unet", "vae", "text_encoder", "taesd"):
        assert parts[name].dtype == torch.bfloat16
        assert not parts[name].training
        assert not any(p.requires_grad for p in parts[name].parameters())
    # Casting does not change which random numbers were drawn.
    assert torch.equal(parts["unet"].conv_in.weight, tiny["unet"].conv_in.weight.to(torch.bfloat16))


def test_write_random_pipeline_roundtrip(tiny: dict[str, object], tiny_folder) -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder, taesd_folder = tiny_folder
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    for sub in ("unet", "vae", "text_encoder"):
        assert list((folder / sub).glob("*.safetensors")), sub
        assert not list((folder / sub).glob("*.bin")), sub
    assert list(taesd_folder.glob("*.safetensors"))

    kw = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **kw)
    scheduler = LCMScheduler.from_pretrained(folder, subfolder="scheduler", **kw)
    taesd = AutoencoderTiny.from_pretrained(taesd_folder, **kw)

    for name, loaded in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder), ("taesd", taesd)):
        _assert_same_weights(tiny[name], loaded)
    assert len(tokenizer) == len(tiny["tokenizer"])
    assert tokenizer(PROMPT).input_ids == tiny["tokenizer"](PROMPT).input_ids
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.timestep_scaling == 10.0


def test_stable_diffusion_pipeline_loads(tiny: dict[str, object], tiny_folder) -> None:
    from diffusers import LCMScheduler, StableDiffusionPipeline

    folder, _ = tiny_folder
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.vae_scale_factor == 8
    _assert_same_weights(tiny["unet"], pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        PROMPT,
        num_inference_steps=2,
        guidance_scale=1.0,
        height=64,
        width=64,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()


@pytest.mark.parametrize(
    ("preset", "low", "high"),
    [("sd-turbo", 860e6, 870e6), ("sd21", 860e6, 870e6), ("sd15", 855e6, 865e6)],
)
def test_full_size_unet_param_count_on_meta(preset: str, low: float, high: float) -> None:
    parts = rm.build_random_components(preset, device="meta", taesd=True)
    counts = {
        name: sum(p.numel() for p in parts[name].parameters()) for name in ("unet", "vae", "text_encoder", "taesd")
    }
    logger.info("%s parameter counts: %s", preset, counts)
    assert parts["unet"].device.type == "meta"
    assert low < counts["unet"] < high
    assert 80e6 < counts["vae"] < 90e6  # SD VAE: 83.65M
    assert 2e6 < counts["taesd"] < 3e6  # TAESD: 2.45M
    if preset == "sd15":
        assert 120e6 < counts["text_encoder"] < 125e6  # CLIP ViT-L/14 text: 123.06M
        assert parts["unet"].config.cross_attention_dim == 768
    else:
        assert 335e6 < counts["text_encoder"] < 345e6  # OpenCLIP-H text, 23 layers: 340.39M
        assert parts["unet"].config.cross_attention_dim == 1024
        assert parts["unet"].config.use_linear_projection is True
    expected = {"sd15": ("epsilon", 64), "sd21": ("v_prediction", 96), "sd-turbo": ("epsilon", 64)}[preset]
    assert (parts["scheduler"].config.prediction_type, parts["unet"].config.sample_size) == expected
    assert max(parts["tokenizer"].get_vocab().values()) < parts["text_encoder"].config.vocab_size


def test_sdxl_turbo_preset_has_the_sdxl_architecture_on_meta() -> None:
    """The benchmark's SDXL preset is SDXL-sized: 2.57 B UNet parameters, CLIP-L + OpenCLIP-bigG (with its
    projection, whose output is the pooled embedding), text/time added conditions."""
    parts = rm.build_random_components("sdxl-turbo", device="meta", taesd=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 2.55e9 < count(parts["unet"]) < 2.58e9
    assert 120e6 < count(parts["text_encoder"]) < 125e6          # CLIP ViT-L/14 text
    assert 690e6 < count(parts["text_encoder_2"]) < 700e6        # OpenCLIP-bigG text + projection: 694.66M
    unet = parts["unet"].config
    assert (unet.cross_attention_dim, unet.addition_embed_type) == (2048, "text_time")
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + 1280
    assert parts["vae"].config.scaling_factor == 0.13025
    assert parts["tokenizer_2"].pad_token == "!"
