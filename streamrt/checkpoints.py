"""Single-file Stable Diffusion checkpoints and ComfyUI's TAESD files, read offline.

A ComfyUI user's ``models/checkpoints`` holds original (LDM / CompVis) single-file checkpoints:
``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and ``cond_stage_model.*`` (text
encoder) in one file, with no config. diffusers' ``from_single_file`` would fetch the configs from the
Hugging Face hub; here they ship with the pack (:data:`CONFIG_ROOT`, one diffusers-layout folder per
architecture) and the architecture is read from the checkpoint's keys and shapes:

========  =============================================================  ====================
family    text encoder keys                                              shipped configs
========  =============================================================  ====================
``sd1``   ``cond_stage_model.transformer.*`` (CLIP ViT-L, width 768)      ``sd1``
``sd2``   ``cond_stage_model.model.*`` (OpenCLIP ViT-H, width 1024)       ``sd2-v``, ``sd2-base``
========  =============================================================  ====================

SDXL (``conditioner.embedders.1.*``) is refused ("not supported yet"); anything else is refused with
the key prefixes that were found. The weights are converted by diffusers' own offline functions
(:mod:`diffusers.loaders.single_file_utils`); SD2's OpenCLIP text tower becomes a 23-layer
``CLIPTextModel`` (its last layer is dropped, as diffusers and ComfyUI do).

**Prediction type.** Weights do not say reliably whether a model predicts noise (epsilon) or
velocity (v). ``prediction_type="auto"`` (:func:`auto_prediction_type`) decides:

1. a ``v_pred`` key in the checkpoint (written by some trainers) -> ``v_prediction``;
2. SD1.x -> ``epsilon``;
3. SD2.x whose file name contains ``turbo`` (sd-turbo: SD2.1-based, 512 px) -> ``epsilon``;
4. other SD2.x: ComfyUI's own test -> ``v_prediction`` when the std of
   ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` exceeds 0.09 (the 768-px v models such as
   SD2.0/2.1), else ``epsilon`` (the 512-px ``-base`` models).

Pass ``epsilon`` / ``v_prediction`` to override. SD2 v models get the ``sd2-v`` configs
(``upcast_attention``), epsilon ones ``sd2-base``.

**Config override.** A model of another shape (a test's tiny model, an unusual fine-tune) can name
its own config folder (diffusers layout: ``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``,
optionally ``tokenizer/``) with ``config_dir=``, or with a sidecar file ``<checkpoint>.streamrt.json``
next to the checkpoint holding ``{"config_dir": "<folder, relative to the sidecar>"}``. Such a folder is
used as is: its architecture is trusted (the family is still read from the keys, to convert them),
and ``auto`` takes its scheduler's prediction type.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .weights import ModelLoadError

logger = logging.getLogger(__name__)

#: the shipped component configs, one diffusers-layout folder per architecture
CONFIG_ROOT = Path(__file__).resolve().parent / "model_configs"
SIDECAR_SUFFIX = ".streamrt.json"
FAMILIES = ("sd1", "sd2")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."
_UNET_IN = UNET + "input_blocks.0.0.weight"
_UNET_CONTEXT = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_LABEL_EMB = UNET + "label_emb.0.0.weight"
V_NORM_KEY = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
TEXT_WIDTH = {"sd1": 768, "sd2": 1024}
#: SD1 text encoders saved by old transformers versions lack the ``text_model.`` level
_OLD_CLIP_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


@dataclass(frozen=True)
class Architecture:
    """What a single-file checkpoint holds, read from its keys and shapes.

    Args:
        family (`str`): ``"sd1"`` or ``"sd2"``.
        text_width (`int`): width of the text encoder's token embedding.
        context_dim (`int`): width of the UNet's cross-attention context.
        in_channels (`int`): UNet input channels (4 for text-to-image models).
        has_vae (`bool`): whether the file holds a VAE (``first_stage_model.*``).
        v_pred_key (`bool`): whether the file carries a ``v_pred`` marker key.
    """

    family: str
    text_width: int
    context_dim: int
    in_channels: int
    has_vae: bool
    v_pred_key: bool = False


# --------------------------------------------------------------------------- key normalisation


def normalize_keys(keys: Sequence[str]) -> dict[str, str]:
    """Original key -> canonical LDM key (SGM-format SD1/SD2 prefixes, old CLIP layout).

    SD2 checkpoints saved by Stability's SGM code name the text encoder
    ``conditioner.embedders.0.model.*`` and SD1 ones ``conditioner.embedders.0.transformer.*``;
    SD1 text encoders from old transformers versions lack ``text_model.``. SDXL files are left alone
    (:func:`detect_architecture` refuses them).
    """
    sdxl = any(k.startswith("conditioner.embedders.1.") or k == _LABEL_EMB for k in keys)
    out = {}
    for key in keys:
        new = key
        if not sdxl:
            if key.startswith("conditioner.embedders.0.model."):
                new = OPEN_CLIP + key[len("conditioner.embedders.0.model."):]
            elif key.startswith("conditioner.embedders.0.transformer."):
                new = CLIP_L + key[len("conditioner.embedders.0.transformer."):]
        if new.startswith(CLIP_L) and new[len(CLIP_L):].startswith(_OLD_CLIP_PARTS):
            new = CLIP_L + "text_model." + new[len(CLIP_L):]
        out[key] = new
    return out


def _prefix_summary(keys: Sequence[str], depth: int = 2, limit: int = 8) -> str:
    counts = Counter(".".join(k.split(".")[:depth]) for k in keys)
    return ", ".join(f"{prefix}.* ({n})" for prefix, n in counts.most_common(limit)) or "no keys at all"


# --------------------------------------------------------------------------- detection


def detect_architecture(shapes: Mapping[str, Sequence[int]], *, check_widths: bool = True) -> Architecture:
    """The :class:`Architecture` of an LDM single-file checkpoint from its (canonical) keys and shapes.

    Args:
        shapes: key -> shape (a state dict's tensors or a safetensors header; keys as given by
            :func:`normalize_keys`).
        check_widths: require SD1's 768 / SD2's 1024 text width (off when a config folder is given).

    Raises:
        ModelLoadError: SDXL ("not supported yet (planned)"), other architectures (naming the key
            prefixes found), inpainting and other non-4-channel UNets, or mismatched widths.
    """
    keys = list(shapes)
    context = int(shapes[_UNET_CONTEXT][1]) if _UNET_CONTEXT in shapes else 0
    if any(k.startswith("conditioner.embedders.1.") for k in keys) or context in (1280, 2048) or (
            _LABEL_EMB in shapes and any(k.startswith("conditioner.") for k in keys)):
        raise ModelLoadError("this is an SDXL checkpoint: SDXL is not supported yet (planned)")
    if _LABEL_EMB in shapes:
        raise ModelLoadError("the UNet has class embeddings (an SD2 unCLIP or upscaler model): only text-to-image "
                             "SD1.x/SD2.x models can stream")
    if any(k.startswith((UNET + "joint_blocks.", "joint_blocks.")) for k in keys):
        raise ModelLoadError("this is a Stable Diffusion 3 checkpoint: only SD1.x and SD2.x are supported")
    if any(k.startswith((UNET + "double_blocks.", "double_blocks.")) for k in keys):
        raise ModelLoadError("this is a Flux checkpoint: only SD1.x and SD2.x are supported")
    if any(k.startswith(("lora_unet_", "lora_te_")) or ".lora_down." in k for k in keys):
        raise ModelLoadError("this is a LoRA, not a checkpoint: put it in models/loras and add it with the "
                             "StreamRT LoRA node")
    if _UNET_IN not in shapes:
        raise ModelLoadError("not a Stable Diffusion 1.x/2.x checkpoint: no UNet (model.diffusion_model.*) "
                             f"was found; keys found: {_prefix_summary(keys)}")
    has_clip_l = CLIP_L + "text_model.embeddings.token_embedding.weight" in shapes
    has_open_clip = OPEN_CLIP + "token_embedding.weight" in shapes
    if has_clip_l == has_open_clip:
        what = "both a CLIP and an OpenCLIP" if has_clip_l else "no"
        raise ModelLoadError(f"not a Stable Diffusion 1.x/2.x checkpoint: it has {what} text encoder "
                             f"(cond_stage_model.transformer.* / cond_stage_model.model.*); keys found: "
                             f"{_prefix_summary(keys)}")
    family = "sd1" if has_clip_l else "sd2"
    text_width = int(shapes[CLIP_L + "text_model.embeddings.token_embedding.weight" if has_clip_l
                            else OPEN_CLIP + "token_embedding.weight"][1])
    in_channels = int(shapes[_UNET_IN][1])
    context_dim = int(shapes[_UNET_CONTEXT][1]) if _UNET_CONTEXT in shapes else text_width
    if in_channels != 4:
        raise ModelLoadError(f"the UNet takes {in_channels} input channels (an inpainting, depth or instruct "
                             "model): only 4-channel text-to-image models can stream")
    if context_dim != text_width:
        raise ModelLoadError(f"the UNet's cross-attention width {context_dim} does not match the text encoder's "
                             f"{text_width}: not a standard SD1.x/SD2.x checkpoint")
    if check_widths and text_width != TEXT_WIDTH[family]:
        raise ModelLoadError(f"{family.upper()} checkpoints have a text width of {TEXT_WIDTH[family]}, this one "
                             f"{text_width}: an unknown architecture (give it a config folder)")
    has_vae = any(k.startswith(VAE + "decoder.") for k in keys)
    return Architecture(family, text_width, context_dim, in_channels, has_vae, v_pred_key="v_pred" in shapes)


def auto_prediction_type(arch: Architecture, file_name: str,
                         v_norm_bias: torch.Tensor | None = None) -> tuple[str, str]:
    """The ``auto`` prediction type and why (see the module docstring for the rule).

    Args:
        arch: from :func:`detect_architecture`.
        file_name: the checkpoint's file name (``turbo`` in it means epsilon for SD2).
        v_norm_bias: the tensor ``model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias``
            if the checkpoint has it (ComfyUI's SD2 test).
    """
    if arch.v_pred_key:
        return "v_prediction", "the checkpoint has a v_pred key"
    if arch.family == "sd1":
        return "epsilon", "SD1.x models predict noise"
    if "turbo" in file_name.lower():
        return "epsilon", "SD2.x turbo models (sd-turbo) predict noise"
    if v_norm_bias is not None and float(v_norm_bias.float().std(unbiased=False)) > 0.09:
        return "v_prediction", "SD2.x 768 model (ComfyUI's norm1.bias test)"
    return "epsilon", "SD2.x base model (ComfyUI's norm1.bias test)"


def shipped_config_dir(family: str, prediction_type: str) -> Path:
    """The pack's config folder for a family and prediction type."""
    if family == "sd1":
        return CONFIG_ROOT / "sd1"
    if family == "sd2":
        return CONFIG_ROOT / ("sd2-v" if prediction_type == "v_prediction" else "sd2-base")
    raise ModelLoadError(f"no shipped configs for {family!r}")


def sidecar_config_dir(checkpoint: str | os.PathLike) -> Path | None:
    """The config folder named by ``<checkpoint>.streamrt.json``, or None when there is no sidecar."""
    sidecar = Path(str(checkpoint) + SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return None
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        folder = Path(data["config_dir"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{sidecar}: expected JSON like {{\"config_dir\": \"<folder>\"}} ({exc})") from None
    return folder if folder.is_absolute() else (sidecar.parent / folder).resolve()


# --------------------------------------------------------------------------- conversion


def _strict_load(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict, assign)`` with an error that names what did not fit."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in state_dict if k in expected and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise ModelLoadError(f"the {what} weights do not fit its config: {len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} of another shape "
                             f"(e.g. {wrong[:2]})")
    module.load_state_dict(state_dict, strict=True, assign=True)
    for name, buffer in list(module.named_buffers()):
        if buffer.is_meta:
            if name.endswith("position_ids"):  # a non-persistent buffer of CLIP's embeddings
                owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
                owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape),
                                      persistent=False)
            else:
                raise ModelLoadError(f"the {what} buffer {name} was not in the checkpoint")


def text_encoder_state_dict(state_dict: Mapping[str, torch.Tensor], family: str,
                            num_layers: int) -> dict[str, torch.Tensor]:
    """The ``CLIPTextModel`` state dict of a checkpoint's text encoder (canonical keys).

    SD1: CLIP's own names under ``cond_stage_model.transformer.``. SD2: OpenCLIP's names under
    ``cond_stage_model.model.`` converted by diffusers' ``convert_open_clip_checkpoint``; resblocks at or
    beyond ``num_layers`` (SD2's 24th layer) are dropped first.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if family == "sd1":
        text = convert_ldm_clip_checkpoint({k: v for k, v in state_dict.items() if k.startswith(CLIP_L)})
    else:
        resblock = OPEN_CLIP + "transformer.resblocks."
        kept = {k: v for k, v in state_dict.items() if k.startswith(OPEN_CLIP)
                and not (k.startswith(resblock) and int(k[len(resblock):].split(".")[0]) >= num_layers)}
        width = int(kept[OPEN_CLIP + "token_embedding.weight"].shape[1])

        class _Config:  # convert_open_clip_checkpoint reads only the width it splits in_proj by
            hidden_size = width

        kept.pop(OPEN_CLIP + "text_projection", None)  # CLIPTextModel has no projection
        text = convert_open_clip_checkpoint(type("TextModel", (), {"config": _Config})(), kept)
    drop = ("text_model.embeddings.position_ids", "text_projection.weight", "logit_scale")
    return {k: v for k, v in text.items() if k not in drop}


def fit_text_prefix(state_dict: Mapping[str, torch.Tensor], text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Keys with or without ``text_model.``, as this transformers version's ``CLIPTextModel`` names them.

    transformers 4 nests the tower under ``text_model``; transformers 5 flattened it (``from_pretrained``
    renames old keys itself, a plain ``load_state_dict`` does not).
    """
    nested = any(k.startswith("text_model.") for k in text_encoder.state_dict())
    out = {}
    for key, value in state_dict.items():
        bare = key[len("text_model."):] if key.startswith("text_model.") else key
        out["text_model." + bare if nested else bare] = value
    return out


def _meta_build(factory):
    with torch.device("meta"):
        return factory()


def build_unet(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]):
    """A diffusers ``UNet2DConditionModel`` holding an LDM UNet's tensors (keys ``model.diffusion_model.*``).

    Built on the meta device and given the tensors as they are (``assign=True``): no copy, same dtype.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = _meta_build(lambda: UNet2DConditionModel.from_config(dict(unet_config)))
    _strict_load(unet, convert_ldm_unet_checkpoint(state_dict, unet.config), "UNet")
    return unet


def build_vae(state_dict: Mapping[str, torch.Tensor], config_dir: Path):
    """A diffusers ``AutoencoderKL`` (config from ``config_dir/vae``) holding an LDM VAE's tensors
    (keys ``encoder.*``, ``decoder.*``, ``quant_conv.*``, optionally under ``first_stage_model.``)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae_config = AutoencoderKL.load_config(config_dir, subfolder="vae", local_files_only=True)
    vae = _meta_build(lambda: AutoencoderKL.from_config(vae_config))
    _strict_load(vae, convert_ldm_vae_checkpoint(dict(state_dict), vae.config), "VAE")
    return vae


def build_text_encoder(state_dict: Mapping[str, torch.Tensor], config_dir: Path, num_layers: int | None = None):
    """A transformers ``CLIPTextModel`` (config from ``config_dir/text_encoder``) holding a CLIP text tower's
    tensors in transformers' names (``text_model.*`` or without that level).

    ``num_layers`` keeps only the first layers (CLIP skip: the output of layer ``num_layers`` after the final
    layer norm, as ComfyUI's ``CLIPSetLastLayer`` and SD2's penultimate layer give it); later layers and the
    projection are dropped.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True)
    if num_layers is not None:
        if not 1 <= num_layers <= text_config.num_hidden_layers:
            raise ModelLoadError(f"cannot keep {num_layers} of the text encoder's {text_config.num_hidden_layers} "
                                 "layers")
        text_config.num_hidden_layers = num_layers
    kept = {}
    for key, value in state_dict.items():
        bare = key[len("text_model."):] if key.startswith("text_model.") else key
        if bare.startswith("encoder.layers.") and int(bare.split(".")[2]) >= text_config.num_hidden_layers:
            continue
        if bare in ("embeddings.position_ids", "text_projection.weight", "logit_scale") or key in (
                "text_projection.weight", "logit_scale"):
            continue
        kept[key] = value
    text_encoder = _meta_build(lambda: CLIPTextModel(text_config))
    _strict_load(text_encoder, fit_text_prefix(kept, text_encoder), "text encoder")
    return text_encoder


def build_components(state_dict: Mapping[str, torch.Tensor], family: str, config_dir: Path, *,
                     with_vae: bool = True) -> dict[str, object]:
    """UNet, VAE (or None) and text encoder of a single-file checkpoint (no copies of the tensors).

    Models are built on the meta device from ``config_dir`` and take the checkpoint's tensors as they
    are (``assign=True``), so they keep the file's dtype until the caller casts them.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    unet = build_unet(state_dict, UNet2DConditionModel.load_config(config_dir, subfolder="unet",
                                                                   local_files_only=True))
    vae = build_vae({k: v for k, v in state_dict.items() if k.startswith(VAE)}, config_dir) if with_vae else None
    layers = CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True).num_hidden_layers
    text_encoder = build_text_encoder(text_encoder_state_dict(state_dict, family, layers), config_dir)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


# --------------------------------------------------------------------------- models already in memory (LDM layout)


def unet_config_from_ldm(params: Mapping[str, Any], *, upcast_attention: bool = False) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config for an LDM ``UNetModel`` described by its constructor
    parameters, as ComfyUI reads them from a checkpoint's keys (``model_channels``, ``channel_mult``,
    ``num_res_blocks``, ``transformer_depth`` per input block, ``transformer_depth_middle``, ``context_dim``,
    ``num_heads`` / ``num_head_channels``, ``use_linear_in_transformer``, ``in_channels``, ``adm_in_channels``).

    So any SD1.x / SD2.x-shaped UNet (a pruned or resized fine-tune too) gets its own config instead of
    the shipped full-size ones.

    Raises:
        ModelLoadError: SDXL and other class-conditioned UNets, video UNets, inpainting (not 4 channels),
            and layouts a diffusers UNet cannot express (uneven blocks per level, no middle attention).
    """
    def get(name, default=None):
        return params.get(name, default)

    if get("adm_in_channels") is not None:
        raise ModelLoadError("the UNet takes a class/size vector (adm_in_channels): SDXL and unCLIP models are not "
                             "supported yet (SD1.x/SD2.x only)")
    if get("use_temporal_attention") or get("use_temporal_resblock"):
        raise ModelLoadError("this is a video UNet (temporal layers): only SD1.x/SD2.x image models can stream")
    in_channels, out_channels = int(get("in_channels", 4)), int(get("out_channels", 4))
    if in_channels != 4 or out_channels != 4:
        raise ModelLoadError(f"the UNet has {in_channels} input / {out_channels} output channels (an inpainting, "
                             "depth or instruct model): only 4-channel text-to-image models can stream")
    channels, mult = int(get("model_channels")), [int(m) for m in get("channel_mult")]
    res_blocks = get("num_res_blocks")
    res_blocks = [int(res_blocks)] * len(mult) if isinstance(res_blocks, int) else [int(r) for r in res_blocks]
    if len(set(res_blocks)) != 1 or len(res_blocks) != len(mult):
        raise ModelLoadError(f"the UNet has {res_blocks} res blocks per level: a diffusers UNet needs the same number "
                             "on every level")
    depth = get("transformer_depth", 1)
    depth = [int(depth)] * sum(res_blocks) if isinstance(depth, int) else [int(d) for d in depth]
    per_level = []
    for level, count in enumerate(res_blocks):
        level_depths = set(depth[level * count:(level + 1) * count])
        if len(level_depths) != 1:
            raise ModelLoadError(f"level {level} of the UNet has attention in some blocks only "
                                 f"({sorted(level_depths)})")
        per_level.append(level_depths.pop())
    middle = int(get("transformer_depth_middle", per_level[-1] or 1))
    if middle < 1:
        raise ModelLoadError("the UNet has no attention in its middle block: not an SD1.x/SD2.x UNet")
    if per_level[-1] not in (0, middle):
        raise ModelLoadError(f"the UNet's last level has depth {per_level[-1]} but its middle block {middle}")
    block_out = [channels * m for m in mult]
    heads = int(get("num_heads", -1))
    head_channels = int(get("num_head_channels", -1))
    attention_heads = heads if heads > 0 else [c // head_channels for c in block_out]
    cross = ["CrossAttnDownBlock2D" if d > 0 else "DownBlock2D" for d in per_level]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": int(get("image_size", 64) or 64),
        "in_channels": in_channels, "out_channels": out_channels,
        "down_block_types": cross,
        "up_block_types": ["CrossAttnUpBlock2D" if d > 0 else "UpBlock2D" for d in reversed(per_level)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": block_out,
        "layers_per_block": res_blocks[0],
        # The middle block takes the last entry; levels without attention ignore theirs.
        "transformer_layers_per_block": [d or middle for d in per_level[:-1]] + [middle],
        "cross_attention_dim": int(get("context_dim")),
        "attention_head_dim": attention_heads,
        "use_linear_projection": bool(get("use_linear_in_transformer", False)),
        "upcast_attention": upcast_attention,
        "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False,
    }


# --------------------------------------------------------------------------- ComfyUI's TAESD files

#: TAESD variants ComfyUI knows (file name prefix) -> why StreamRT cannot use them
OTHER_TAESD = {"taesdxl": "SDXL's latent space", "taesd3": "SD3's 16-channel latent space",
               "taef1": "Flux's 16-channel latent space"}


def _layer_kinds(state_dict: Mapping[str, torch.Tensor], shift: int) -> dict[int, str]:
    """Index in ``nn.Sequential`` (minus ``shift``) -> "conv" or "block", from the keys."""
    kinds: dict[int, str] = {}
    for key in state_dict:
        head, _, rest = key.partition(".")
        if not head.isdigit():
            raise ModelLoadError(f"unexpected key {key!r}: not a ComfyUI TAESD file (keys like '0.weight', "
                                 "'1.conv.0.weight')")
        kinds[int(head) - shift] = "block" if rest.startswith("conv.") else "conv"
    return kinds


def comfy_taesd_to_diffusers(encoder: Mapping[str, torch.Tensor],
                             decoder: Mapping[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``AutoencoderTiny`` config and state dict from ComfyUI's ``taesd_encoder`` / ``taesd_decoder`` files.

    ComfyUI's TAESD ``Encoder``/``Decoder`` (comfy/taesd/taesd.py) are ``nn.Sequential`` with the layer
    order of diffusers' ``EncoderTiny.layers`` / ``DecoderTiny.layers``; the decoder starts with a
    parameter-free ``Clamp`` that diffusers applies in ``forward``, so decoder indices shift by one.
    The block counts and widths are read from the keys.
    """
    enc_kinds = _layer_kinds(encoder, 0)
    dec_kinds = _layer_kinds(decoder, 1)
    # encoder: conv, blocks, (stride-2 conv, blocks)*, final conv
    enc_order = [enc_kinds[i] for i in sorted(enc_kinds)]
    if not enc_order or enc_order[0] != "conv" or enc_order[-1] != "conv":
        raise ModelLoadError("not a TAESD encoder: it must start and end with a convolution")
    enc_blocks, enc_channels = [], []
    for i in sorted(enc_kinds)[:-1]:
        if enc_kinds[i] == "conv":
            enc_blocks.append(0)
            enc_channels.append(int(encoder[f"{i}.weight"].shape[0]))
        else:
            enc_blocks[-1] += 1
    last = max(enc_kinds)
    latent_channels = int(encoder[f"{last}.weight"].shape[0])
    # decoder (diffusers indices): conv_in, ReLU, then per stage: blocks, [Upsample], conv
    dec_blocks, dec_channels = [0], []
    for i in sorted(dec_kinds)[1:]:
        if dec_kinds[i] == "block":
            dec_blocks[-1] += 1
        else:
            dec_channels.append(int(decoder[f"{i + 1}.weight"].shape[1]))
            dec_blocks.append(0)
    dec_blocks.pop()
    dec_in = int(decoder[f"{min(dec_kinds) + 1}.weight"].shape[1])
    if latent_channels != 4 or dec_in != 4:
        raise ModelLoadError(f"this TAESD has {latent_channels} latent channels, SD1.x/SD2.x use 4 (a TAESD3 / "
                             "TAEF1 file?)")
    config = {
        "in_channels": int(encoder["0.weight"].shape[1]),
        "out_channels": int(decoder[f"{max(dec_kinds) + 1}.weight"].shape[0]),
        "encoder_block_out_channels": tuple(enc_channels), "decoder_block_out_channels": tuple(dec_channels),
        "num_encoder_blocks": tuple(enc_blocks), "num_decoder_blocks": tuple(dec_blocks),
        "latent_channels": 4,
    }
    state = {f"encoder.layers.{k}": v for k, v in encoder.items()}
    for key, value in decoder.items():
        head, _, rest = key.partition(".")
        state[f"decoder.layers.{int(head) - 1}.{rest}"] = value
    return config, state


def build_taesd(encoder: Mapping[str, torch.Tensor], decoder: Mapping[str, torch.Tensor]):
    """A diffusers ``AutoencoderTiny`` from the state dicts of ComfyUI's TAESD encoder and decoder."""
    from diffusers import AutoencoderTiny

    config, state = comfy_taesd_to_diffusers(encoder, decoder)
    vae = AutoencoderTiny(**config)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"the TAESD weights do not form a TAESD: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}")
    return vae
