"""Stable Diffusion component models with random weights, built from configs only.

Tests, the demo and the GPU benchmark need a UNet, a VAE, a CLIP text encoder, a
tokenizer, a scheduler and (optionally) a TAESD decoder, but must never download
anything. This module builds all of them from hard-coded configs with random
weights and can save them as an ordinary diffusers ``StableDiffusionPipeline``
folder that ``from_pretrained(..., local_files_only=True)`` loads.

Presets (see :data:`PRESETS`):

``"tiny"``
    About 0.9M parameters in all, SD1-shaped (epsilon prediction).
    Runs a 64x64 image through VAE + UNet in milliseconds on a CPU. The VAE and
    TAESD both downsample by 8 like the real ones.
``"tiny-v"``
    Same, SD2-shaped: ``v_prediction`` scheduler and a UNet with linear projections.
``"sd15"``
    The real Stable Diffusion 1.5 architecture (~860M-parameter UNet, CLIP ViT-L/14
    text encoder, SD VAE) with random weights, for benchmarks.
``"sd21"`` / ``"sd-turbo"``
    The real Stable Diffusion 2.1 architecture (~866M-parameter UNet, OpenCLIP-H text
    encoder as a ``CLIPTextModel``); ``sd21`` is 768px v-prediction, ``sd-turbo``
    512px epsilon prediction.
``"tiny-xl"``
    SDXL-shaped and tiny: a UNet with text/time added conditions and two transformer
    layers per block at its attention level, two text encoders (the second a
    ``CLIPTextModelWithProjection``), a VAE scaled by 0.13025.
``"sdxl-turbo"``
    The real SDXL architecture (~2.6B-parameter UNet, CLIP-L + OpenCLIP-bigG text
    encoders, SDXL VAE), 512 px, epsilon prediction, for benchmarks.

Full-size presets use ``AutoencoderTiny()`` with diffusers defaults (the real TAESD
architecture). All presets share the small byte-level BPE tokenizer written by
:func:`write_clip_tokenizer`; its ids (< 600) fit every text encoder's vocabulary.

``build_random_components(..., device="meta")`` builds the models without
allocating memory, which is a cheap way to inspect full-size parameter counts.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
import tempfile
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "build_random_components",
    "component_configs",
    "write_clip_tokenizer",
    "write_random_pipeline",
]

PRESETS = ("tiny", "tiny-v", "sd15", "sd21", "sd-turbo", "tiny-xl", "sdxl-turbo")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

# BPE merges, in rank order. Every merge joins two tokens that already exist (a byte
# symbol, a byte symbol + "</w>", or the result of an earlier merge).
_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("i", "n"),
    ("a", "n"),
    ("e", "r"),
    ("o", "n"),
    ("r", "e"),
    ("a", "t"),
    ("e", "n"),
    ("o", "r"),
    ("s", "t"),
    ("e", "s"),
    ("a", "l"),
    ("o", "u"),
    ("i", "t"),
    ("a", "r"),
    ("l", "e"),
    ("h", "e"),
    ("n", "d"),
    ("p", "h"),
    ("d", "o"),
    ("th", "e</w>"),
    ("a", "t</w>"),
    ("o", "f</w>"),
    ("i", "n</w>"),
    ("a", "n</w>"),
    ("o", "n</w>"),
    ("e", "r</w>"),
    ("i", "s</w>"),
    ("t", "o</w>"),
    ("e", "d</w>"),
    ("e", "s</w>"),
    ("an", "d</w>"),
    ("in", "g</w>"),
    ("ph", "o"),
    ("pho", "to</w>"),
    ("c", "at</w>"),
    ("do", "g</w>"),
    ("re", "d</w>"),
    ("a", "r</w>"),
    ("st", "y"),
    ("l", "y</w>"),
    ("o", "r</w>"),
    ("c", "o"),
    ("co", "l"),
    ("col", "or</w>"),
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP mapping of the 256 byte values to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_vocab() -> dict[str, int]:
    """Vocabulary in CLIP order: bytes, bytes + '</w>', merge results, then the specials."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    known = set(tokens)
    for left, right in _MERGES:
        if left not in known or right not in known:
            raise ValueError(f"BPE merge {left!r} + {right!r} uses an unknown token")
        merged = left + right
        if merged not in known:
            tokens.append(merged)
            known.add(merged)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def write_clip_tokenizer(folder: str | os.PathLike, pad_token: str = EOS_TOKEN) -> pathlib.Path:
    """Write a small byte-level BPE CLIP tokenizer that loads offline.

    Writes ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` into ``folder`` (created if missing), the layout of the
    ``tokenizer/`` folder of a Stable Diffusion checkpoint, so that
    ``transformers.CLIPTokenizer.from_pretrained(folder)`` loads it with either the
    slow (transformers 4) or the tokenizers-backed (transformers 5) implementation.

    The vocabulary holds the 256 byte symbols, their ``'</w>'`` end-of-word forms, a
    few dozen merges of common letter pairs, then ``<|startoftext|>`` (bos) and
    ``<|endoftext|>`` (eos, pad and unk), which are the two largest ids as in CLIP.
    ``model_max_length`` is 77.

    Args:
        folder: Destination directory.
        pad_token: the padding token (``"!"`` for OpenCLIP's, e.g. SDXL's second tokenizer).

    Returns:
        The folder as a :class:`pathlib.Path`.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in _MERGES]) + "\n"
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    logger.debug("wrote CLIP tokenizer (%d tokens) to %s", len(vocab), folder)
    return folder


def _tokenizer_ids() -> dict[str, int]:
    vocab = _clip_vocab()
    return {"vocab_size": len(vocab), "bos": vocab[BOS_TOKEN], "eos": vocab[EOS_TOKEN]}


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------

_SD1_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD1_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def _tiny_unet(v_model: bool) -> dict[str, Any]:
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "use_linear_projection": v_model,
    }


#: what the full-size Stable Diffusion UNets (SD1.x, SD2.x, SDXL) share
_FULL_UNET_COMMON: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
}


def _full_unet(sd2: bool, sample_size: int, upcast_attention: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {
        **_FULL_UNET_COMMON,
        "sample_size": sample_size,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": _SD1_DOWN,
        "up_block_types": _SD1_UP,
    }
    if sd2:
        config.update(
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            upcast_attention=upcast_attention,
        )
    else:
        config.update(cross_attention_dim=768, attention_head_dim=8)
    return config


def _tiny_xl_unet() -> dict[str, Any]:
    return {
        **_tiny_unet(True),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "cross_attention_dim": 64,  # the two tiny text encoders' 32 + 32
        "attention_head_dim": (2, 4),
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,  # time ids + pooled (text_encoder_2's projection)
    }


def _sdxl_unet(sample_size: int) -> dict[str, Any]:
    return {
        **_FULL_UNET_COMMON,
        "sample_size": sample_size,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    }


_TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (8, 16, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}


def _full_vae(sample_size: int) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "latent_channels": 4,
        "sample_size": sample_size,
        "scaling_factor": 0.18215,
    }


_TINY_TAESD: dict[str, Any] = {
    "encoder_block_out_channels": (8, 8, 8, 8),
    "decoder_block_out_channels": (8, 8, 8, 8),
    "num_encoder_blocks": (1, 1, 1, 1),
    "num_decoder_blocks": (1, 1, 1, 1),
    "latent_channels": 4,
}

_TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}

_CLIP_L_TEXT: dict[str, Any] = {  # CLIP ViT-L/14 text tower (SD 1.x)
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

_OPENCLIP_H_TEXT: dict[str, Any] = {  # OpenCLIP ViT-H/14 text tower minus its last layer (SD 2.x)
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "projection_dim": 512,
    "hidden_act": "gelu",
}

_OPENCLIP_BIGG_TEXT: dict[str, Any] = {  # OpenCLIP ViT-bigG/14 text tower with its projection (SDXL's second)
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}

_SCHEDULER: dict[str, Any] = {  # Stable Diffusion defaults
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_scaling": 10.0,
}

# preset -> (unet, vae, text encoder, taesd or None for diffusers defaults, prediction_type)
_PRESET_TABLE: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any] | None, str]] = {
    "tiny": (_tiny_unet(False), _TINY_VAE, _TINY_TEXT, _TINY_TAESD, "epsilon"),
    "tiny-v": (_tiny_unet(True), _TINY_VAE, _TINY_TEXT, _TINY_TAESD, "v_prediction"),
    "sd15": (_full_unet(False, 64), _full_vae(512), _CLIP_L_TEXT, None, "epsilon"),
    "sd21": (_full_unet(True, 96, upcast_attention=True), _full_vae(768), _OPENCLIP_H_TEXT, None, "v_prediction"),
    "sd-turbo": (_full_unet(True, 64), _full_vae(512), _OPENCLIP_H_TEXT, None, "epsilon"),
    "tiny-xl": (_tiny_xl_unet(), {**_TINY_VAE, "scaling_factor": 0.13025}, _TINY_TEXT, _TINY_TAESD, "epsilon"),
    "sdxl-turbo": (_sdxl_unet(64), {**_full_vae(512), "scaling_factor": 0.13025, "force_upcast": True},
                   _CLIP_L_TEXT, None, "epsilon"),
}
#: presets with a second text encoder (SDXL) -> its config
_SECOND_TEXT: dict[str, dict[str, Any]] = {"tiny-xl": _TINY_TEXT, "sdxl-turbo": _OPENCLIP_BIGG_TEXT}


def component_configs(preset: str = "tiny") -> dict[str, dict[str, Any]]:
    """Return the constructor kwargs of every component of ``preset``.

    Keys: ``"unet"`` (``UNet2DConditionModel``), ``"vae"`` (``AutoencoderKL``),
    ``"text_encoder"`` (``CLIPTextConfig``), ``"taesd"`` (``AutoencoderTiny``; empty
    for the diffusers defaults), ``"scheduler"`` (``LCMScheduler``) and, for SDXL presets,
    ``"text_encoder_2"`` (``CLIPTextConfig`` of a ``CLIPTextModelWithProjection``). The
    dicts are fresh copies the caller may modify.

    Raises:
        ValueError: ``preset`` is not one of :data:`PRESETS`.
    """
    if preset not in _PRESET_TABLE:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
    unet, vae, text, taesd, prediction_type = _PRESET_TABLE[preset]
    ids = _tokenizer_ids()
    # Full-size presets keep CLIP's vocabulary size as an upper bound; tiny ones use the tokenizer's.
    vocab_size = ids["vocab_size"] if preset.startswith("tiny") else 49408

    def text_config(text: dict[str, Any]) -> dict[str, Any]:
        return {
            **text,
            "vocab_size": vocab_size,
            "max_position_embeddings": MODEL_MAX_LENGTH,
            "layer_norm_eps": 1e-5,
            "bos_token_id": ids["bos"],
            "eos_token_id": ids["eos"],
            "pad_token_id": ids["eos"],
        }

    configs = {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_config(text),
        "taesd": taesd or {},
        "scheduler": {**_SCHEDULER, "prediction_type": prediction_type},
    }
    if preset in _SECOND_TEXT:
        configs["text_encoder_2"] = text_config(_SECOND_TEXT[preset])
    return copy.deepcopy(configs)


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------


def _build(factory, seed: int, dtype: torch.dtype, device: str | torch.device) -> torch.nn.Module:
    """Seed, construct directly on ``device``, cast, and switch to inference mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = factory()
    if dtype != torch.float32:
        # nn.Module.to directly: diffusers' ModelMixin.to warns on every dtype cast (0.42),
        # and none of these models has modules that must stay in float32.
        torch.nn.Module.to(model, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_tokenizer(**kwargs: Any):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="streamrt-tok-") as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp), local_files_only=True, **kwargs)


def build_random_components(
    preset: str = "tiny",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    taesd: bool = True,
) -> dict[str, object]:
    """Build the Stable Diffusion components of ``preset`` with random weights.

    ``torch.manual_seed(seed)`` runs before each model is built, so the same
    ``(preset, seed, device)`` always gives the same tensors. Models are constructed
    directly on ``device`` (``"meta"`` allocates nothing: handy to count the
    parameters of full-size presets), cast to ``dtype``, and put in eval mode with
    gradients disabled.

    Args:
        preset: One of :data:`PRESETS`.
        seed: Random seed for the weights.
        dtype: Floating point dtype of the models.
        device: Device to build the models on.
        taesd: Also build an ``AutoencoderTiny`` (TAESD) decoder.

    Returns:
        ``{"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder":
        CLIPTextModel, "tokenizer": CLIPTokenizer, "scheduler": LCMScheduler,
        "taesd": AutoencoderTiny or None}``; SDXL presets add ``"text_encoder_2"``
        (``CLIPTextModelWithProjection``) and ``"tokenizer_2"`` (padding with ``"!"``, as
        OpenCLIP's does).

    Raises:
        ValueError: ``preset`` is not one of :data:`PRESETS`.
    """
    from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = component_configs(preset)
    logger.debug("building random %r components (seed=%d, dtype=%s, device=%s)", preset, seed, dtype, device)
    components: dict[str, object] = {
        "unet": _build(lambda: UNet2DConditionModel(**configs["unet"]), seed, dtype, device),
        "vae": _build(lambda: AutoencoderKL(**configs["vae"]), seed, dtype, device),
        "text_encoder": _build(
            lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])), seed, dtype, device
        ),
        "tokenizer": _load_tokenizer(),
        "scheduler": LCMScheduler(**configs["scheduler"]),
        "taesd": (
            _build(lambda: AutoencoderTiny(**configs["taesd"]), seed, dtype, device) if taesd else None
        ),
    }
    if "text_encoder_2" in configs:
        components["text_encoder_2"] = _build(
            lambda: CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])), seed + 1, dtype, device
        )
        components["tokenizer_2"] = _load_tokenizer(pad_token="!")
    return components


def write_random_pipeline(
    folder: str | os.PathLike,
    preset: str = "tiny",
    *,
    seed: int = 0,
    taesd_folder: str | os.PathLike | None = None,
) -> pathlib.Path:
    """Save random components of ``preset`` as a diffusers Stable Diffusion folder.

    Writes ``model_index.json`` (for ``StableDiffusionPipeline``, no safety checker)
    and ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` with
    safetensors weights, built on the CPU in float32 by
    :func:`build_random_components` with ``seed``. The folder loads with
    ``StableDiffusionPipeline.from_pretrained(folder, local_files_only=True,
    safety_checker=None, requires_safety_checker=False)``.

    Args:
        folder: Destination directory (created if missing).
        preset: One of :data:`PRESETS`.
        seed: Random seed for the weights.
        taesd_folder: If given, also save the ``AutoencoderTiny`` there as a diffusers
            model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    Returns:
        ``folder`` as a :class:`pathlib.Path`.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = build_random_components(preset, seed=seed, taesd=taesd_folder is not None)
    common = {name: parts[name] for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    if "text_encoder_2" in parts:
        pipe = StableDiffusionXLPipeline(**common, text_encoder_2=parts["text_encoder_2"],
                                         tokenizer_2=parts["tokenizer_2"])
    else:
        pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_config(folder)  # model_index.json, exactly as diffusers writes it
    modules = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if "text_encoder_2" in parts else ())
    for name in modules:
        parts[name].save_pretrained(folder / name, safe_serialization=True)
    parts["scheduler"].save_pretrained(folder / "scheduler")
    # The plain vocab/merges files load with both slow and tokenizers-backed CLIPTokenizer.
    write_clip_tokenizer(folder / "tokenizer")
    if "tokenizer_2" in parts:
        write_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    if taesd_folder is not None:
        parts["taesd"].save_pretrained(pathlib.Path(taesd_folder), safe_serialization=True)
        logger.info("wrote random %r TAESD to %s", preset, taesd_folder)
    logger.info("wrote random %r pipeline (seed=%d) to %s", preset, seed, folder)
    return folder


def random_stream_models(components: dict[str, object] | str = "tiny", *, seed: int = 0,
                         dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", vae: str = "taesd",
                         identity: dict | None = None):
    """A :class:`~streamrt.models.StreamModels` of random components: ``components`` from
    :func:`build_random_components`, or a preset name to build them (with ``seed``, ``dtype``, ``device``). ``vae``:
    ``"taesd"`` (the tiny autoencoder, as the benchmarks run) or ``"kl"`` (the full VAE); the second text encoder
    where the preset has one."""
    from .models import StreamModels

    parts = (build_random_components(components, seed=seed, dtype=dtype, device=device, taesd=vae == "taesd")
             if isinstance(components, str) else components)
    if vae not in ("taesd", "kl"):
        raise ValueError(f"vae must be 'taesd' or 'kl', got {vae!r}")
    return StreamModels(unet=parts["unet"], vae=parts["taesd"] if vae == "taesd" else parts["vae"],
                        text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                        scheduler=parts["scheduler"], text_encoder_2=parts.get("text_encoder_2"),
                        tokenizer_2=parts.get("tokenizer_2"), **({} if identity is None else {"identity": identity}))
