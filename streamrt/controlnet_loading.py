"""ControlNets as ComfyUI users have them, turned into diffusers ``ControlNetModel``s offline.

A user's ``models/controlnet`` holds SD1.x / SD2.x / SDXL ControlNets in one of two key layouts:

==============  ===========================================================================================
layout          keys
==============  ===========================================================================================
``ldm``         the original (lllyasviel / CompVis) names, as ComfyUI's ``comfy.cldm.cldm.ControlNet`` has
                them: ``time_embed.*``, ``input_blocks.*``, ``middle_block.*``, ``input_hint_block.*`` (the
                control image encoder), ``zero_convs.*`` / ``middle_block_out.*`` (the residual outputs),
                SDXL's ``label_emb.*``; in files usually under ``control_model.`` (``.pth`` files of
                ControlNet 1.0/1.1 may also hold a whole SD checkpoint beside it, which is ignored), bare
                when ComfyUI's loaded module hands its ``state_dict()``
``diffusers``   ``ControlNetModel``'s names: ``controlnet_cond_embedding.*``, ``down_blocks.*``,
                ``controlnet_down_blocks.*``, ``mid_block.*``, ``controlnet_mid_block.*``; as a single file or
                as a ``save_pretrained`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
==============  ===========================================================================================

**Architecture from the weights.** Single files carry no config. Everything a diffusers config needs is read
from the keys and shapes: block widths, blocks per level, transformer depth per level and in the middle block,
cross-attention width, linear or convolutional projections, the control image encoder's widths, SDXL's added
embedding. So a pruned or small ControlNet gets its own config. Two things are not in the weights:

- the number of attention heads: taken from the pipeline's UNet config when one is given (a ControlNet is
  a copy of its base UNet's encoder, heads included), else by the families' convention, the one ComfyUI's
  model detection uses: SD1.x 8 heads per attention, SD2.x and SDXL 64 channels per head;
- SDXL's size-embedding width (``addition_time_embed_dim``): from the UNet config, else SDXL's 256
  (the added embedding's input minus the 1280-wide pooled text embedding, over six size conditions).

``upcast_attention`` (SD2.1-768's) and the other UNet constants are taken from the UNet config when given.
Like ComfyUI, a file whose name ends in ``_shuffle`` (or ``_shuffle_fp16``) pools its residuals globally
(``global_pool_conditions``).

**Family.** The family is read as :func:`~streamrt.families.family_of_unet` reads a UNet's: SDXL when there
is an added (pooled text + size) embedding, SD2.x for a 1024-wide context, else SD1.x (768, and the small
test models). A ControlNet of another family than the pipeline's is refused.

**Conversion.** LDM keys go through diffusers' offline ``convert_controlnet_checkpoint``
(:mod:`diffusers.loaders.single_file_utils`); the parts it does not convert are renamed here: the control
image encoder (diffusers assumes its standard 8 convolutions, ``input_hint_block.14`` last; here any even
count) and SDXL's ``label_emb`` (-> ``add_embedding``). Loading is strict: a tensor the ControlNet does not
use, or one it lacks, is an error naming the keys.

**Refused**, by name: LoRAs, Stable Diffusion checkpoints, T2I-Adapters, Stability's Control-LoRAs (they
patch the base UNet's weights at run time), ControlNet Union (xinsir's), kohya's ControlNet-LLLite,
IP-Adapters, ControlNets of diffusion transformers (SD3, Flux, HunyuanDiT, Qwen-Image) and anything else
(with the key prefixes found). "diff" ControlNets (a ``difference`` key: the weights are differences to
the base UNet's, ComfyUI's DiffControlNetLoader) load only with the base UNet given (``base_unet``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .families import FAMILIES, ModelFamily, as_family, family_named, family_of_unet, known_families
from .state_dicts import context_width, prefix_summary, shape_of
from .weights import SAFETENSORS_SUFFIXES, ModelLoadError, check_weight_file, read_shapes, read_weights

logger = logging.getLogger(__name__)

#: the prefix of a ControlNet's tensors in original (lllyasviel) files
LDM_PREFIX = "control_model."
#: the marker key of "diff" ControlNets (weights minus the base UNet's, ComfyUI's DiffControlNetLoader)
DIFF_KEY = "difference"
_LDM_ZERO_CONV = "zero_convs.0.0.weight"
_LDM_HINT_IN = "input_hint_block.0.weight"
_DIFFUSERS_HINT_IN = "controlnet_cond_embedding.conv_in.weight"
#: SDXL's added embedding (pooled text + size conditions): LDM name -> diffusers name
_LABEL_EMB = {"label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2."}
#: channels per attention head in SD2.x and SDXL UNets (SD1.x has 8 heads whatever the width)
HEAD_CHANNELS = 64
SD1_HEADS = 8
#: the width of SDXL's pooled text embedding, for its size-embedding width when no UNet config is given
SDXL_POOLED = FAMILIES["sdxl"].pooled_dim
#: the names of diffusers folders' weight files, in the order they are looked for
FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                  "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
#: UNet config entries a ControlNet copies from its base UNet (none of them is visible in the weights)
_FROM_UNET = ("upcast_attention", "only_cross_attention", "norm_num_groups", "norm_eps", "act_fn", "flip_sin_to_cos",
              "freq_shift", "downsample_padding", "mid_block_scale_factor", "resnet_time_scale_shift")

# What other files are, by a key (or key prefix) only they have: (test of a key, what the file is). Checked before
# anything else, so a ControlNet-like key inside one of them does not make it pass for a ControlNet.
_NOT_CONTROLNETS: tuple[tuple[Any, str], ...] = (
    (lambda k: k == "lora_controlnet", "a Control-LoRA (Stability's): it patches the base UNet's weights at run "
                                       "time, which StreamRT does not do; use a full ControlNet"),
    (lambda k: k.removeprefix(LDM_PREFIX).startswith(("control_add_embedding.", "task_embedding")),
     "a ControlNet Union (several control types in one model): not supported yet; use a single-type ControlNet"),
    (lambda k: k.startswith(("controlnet_blocks.", "controlnet_x_embedder.", "pos_embed_input.", "after_proj_list.",
                             "controlnet_single_blocks.", "double_blocks.", "joint_blocks.", "transformer_blocks.")),
     "a ControlNet for a diffusion transformer (SD3, Flux, HunyuanDiT or Qwen-Image)"),
    (lambda k: k.startswith(("adapter.", "body.0.")), "a T2I-Adapter, not a ControlNet"),
    (lambda k: k.startswith("backbone."), "a Stable Cascade ControlNet"),
    (lambda k: k.startswith("lllite_"), "a ControlNet-LLLite (kohya's): not supported"),
    (lambda k: k.startswith(("image_proj.", "ip_adapter.")), "an IP-Adapter, not a ControlNet"),
    (lambda k: k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or ".lora_down." in k
     or ".lora_A." in k or ".lora_B." in k,
     "a LoRA, not a ControlNet: put it in models/loras and add it with the StreamRT LoRA node"),
)


@dataclass(frozen=True)
class ControlNetArchitecture:
    """What a ControlNet's weights are, read from their keys and shapes (:func:`detect_controlnet`).

    Args:
        layout (`str`): ``"ldm"`` (original / ComfyUI names) or ``"diffusers"`` (``ControlNetModel``'s).
        prefix (`str`): the key prefix of the ControlNet's tensors (``"control_model."`` or ``""``).
        family (`str`): the :class:`~streamrt.families.ModelFamily`'s name (``"sd1"``, ``"sd2"``, ``"sdxl"``).
        context_dim (`int`): width of the cross-attention context (768 / 1024 / 2048 at full size).
        conditioning_channels (`int`): channels of the control image (3 for RGB hints).
        in_channels (`int`): latent channels (4).
        diff (`bool`): the weights are differences to a base UNet's ("diff" ControlNet).
    """

    layout: str
    prefix: str
    family: str
    context_dim: int
    conditioning_channels: int
    in_channels: int
    diff: bool = False

    @property
    def model_family(self) -> ModelFamily:
        return family_named(self.family)


# --------------------------------------------------------------------------- detection


def _refuse_others(keys: Sequence[str]) -> None:
    for test, what in _NOT_CONTROLNETS:
        found = [k for k in keys if test(k)]
        if found:
            raise ModelLoadError(f"this is {what} (keys like {found[0]!r}; found: {prefix_summary(keys)})")


def detect_controlnet(shapes: Mapping[str, Any]) -> ControlNetArchitecture:
    """The :class:`ControlNetArchitecture` of ControlNet weights from their keys and shapes.

    Args:
        shapes: key -> shape (or tensor): a state dict, a safetensors header (:func:`~streamrt.weights.read_shapes`),
            or the ``state_dict()`` of ComfyUI's loaded ``comfy.cldm.cldm.ControlNet`` (LDM names, no prefix).

    Raises:
        ModelLoadError: weights that are no SD1.x/SD2.x/SDXL ControlNet (a LoRA, a checkpoint, a T2I-Adapter, a
            Control-LoRA, ControlNet Union, transformer ControlNets...: named, with the key prefixes found), a
            ControlNet without cross-attention or of another number of latent channels than 4, an SDXL-wide
            (2048) context without SDXL's added embedding, a class-conditioned (unCLIP) one.
    """
    keys = list(shapes)
    _refuse_others(keys)
    if LDM_PREFIX + _LDM_ZERO_CONV in shapes or (LDM_PREFIX + _LDM_HINT_IN) in shapes:
        layout, prefix = "ldm", LDM_PREFIX
    elif _LDM_ZERO_CONV in shapes or _LDM_HINT_IN in shapes:
        layout, prefix = "ldm", ""
    elif _DIFFUSERS_HINT_IN in shapes:
        layout, prefix = "diffusers", ""
    elif "model.diffusion_model.input_blocks.0.0.weight" in shapes:
        raise ModelLoadError("this is a Stable Diffusion checkpoint (model.diffusion_model.*), not a ControlNet: put "
                             "it in models/checkpoints")
    elif "conv_in.weight" in shapes and any(k.startswith("up_blocks.") for k in keys):
        raise ModelLoadError("this is a diffusers UNet (up_blocks.*), not a ControlNet")
    else:
        raise ModelLoadError(f"not a ControlNet: no control image encoder (input_hint_block.* or "
                             f"controlnet_cond_embedding.*) was found; keys found: {prefix_summary(keys)}")
    ldm = layout == "ldm"
    hint = prefix + (_LDM_HINT_IN if ldm else _DIFFUSERS_HINT_IN)
    conv_in = prefix + ("input_blocks.0.0.weight" if ldm else "conv_in.weight")
    if hint not in shapes or conv_in not in shapes:
        missing = hint if hint not in shapes else conv_in
        raise ModelLoadError(f"the ControlNet has no {missing}: the file is incomplete or of another architecture; "
                             f"keys found: {prefix_summary(keys)}")
    ours = [k for k in keys if k.startswith(prefix)]
    # SDXL's added embedding is label_emb.0.0/0.2 (LDM) or add_embedding (diffusers); a class embedding is not
    if prefix + "label_emb.weight" in shapes or any(k.startswith("class_embedding.") for k in ours):
        raise ModelLoadError("the ControlNet has a class embedding (an unCLIP or upscaler ControlNet): only "
                             f"text-to-image {known_families()} ControlNets can stream")
    added = prefix + ("label_emb.0.0.weight" if ldm else "add_embedding.linear_1.weight")
    context = context_width(shapes, prefix)
    if not context:
        raise ModelLoadError("the ControlNet has no cross-attention (attn2): not an SD1.x/SD2.x/SDXL ControlNet")
    in_channels = shape_of(shapes[conv_in])[1]
    if in_channels != 4:
        raise ModelLoadError(f"the ControlNet takes {in_channels} latent channels (one for an inpainting or instruct "
                             "UNet): only ControlNets of 4-channel text-to-image models can stream")
    family = family_of_unet({"cross_attention_dim": context,
                             "addition_embed_type": "text_time" if added in shapes else None})
    if context == 2048 and not family.has_added_conditions:
        raise ModelLoadError("the ControlNet has SDXL's 2048-wide context but no added embedding (label_emb / "
                             "add_embedding): the file is incomplete or of another architecture")
    return ControlNetArchitecture(layout=layout, prefix=prefix, family=family.name, context_dim=context,
                                  conditioning_channels=int(shape_of(shapes[hint])[1]), in_channels=int(in_channels),
                                  diff=DIFF_KEY in shapes)


# --------------------------------------------------------------------------- LDM -> diffusers names


def _ldm_layers_per_block(bare: Sequence[str]) -> int:
    """Res blocks per level of an LDM ControlNet: its input blocks are the first convolution, then per level
    the res blocks and (but for the last level) a downsampler (``input_blocks.N.0.op``)."""
    blocks = {int(k.split(".")[1]) for k in bare if k.startswith("input_blocks.")}
    levels = 1 + len({k.split(".")[1] for k in bare if k.startswith("input_blocks.") and ".0.op." in k})
    per, rest = divmod(len(blocks) - levels, levels)
    if rest or per < 1 or blocks != set(range(len(blocks))):
        raise ModelLoadError(f"the ControlNet's input blocks ({len(blocks)}, {levels} levels) do not split into the "
                             "same number of res blocks per level, which a diffusers ControlNet needs")
    return per


def _hint_names(bare: Sequence[str]) -> dict[str, str]:
    """diffusers name -> LDM name for the control image encoder (``input_hint_block``: convolutions at even
    indices, SiLUs between them): the first is ``conv_in``, the last ``conv_out``, the others ``blocks.N``."""
    hint = [k for k in bare if k.startswith("input_hint_block.")]
    convs = sorted({int(k.split(".")[1]) for k in hint})
    if not convs or convs != list(range(0, 2 * len(convs), 2)) or len(convs) < 2:
        raise ModelLoadError(f"the ControlNet's input_hint_block has convolutions at {convs}: expected them at "
                             "0, 2, 4, ... (each followed by a SiLU)")
    names = {convs[0]: "conv_in", convs[-1]: "conv_out"}
    names.update({index: f"blocks.{i}" for i, index in enumerate(convs[1:-1])})
    out = {}
    for key in hint:
        _, index, rest = key.split(".", 2)
        out[f"controlnet_cond_embedding.{names[int(index)]}.{rest}"] = key
    return out


def ldm_to_diffusers_names(keys: Sequence[str], prefix: str = LDM_PREFIX) -> tuple[dict[str, str], list[str]]:
    """How an LDM-layout ControlNet's keys are named in diffusers: (diffusers key -> original key, original keys of
    the ControlNet that have no diffusers name).

    Only keys under ``prefix`` are the ControlNet's (others, such as a whole SD checkpoint bundled into an old
    ``.pth``, are not looked at). The body goes through diffusers' own ``convert_controlnet_checkpoint``, run on
    the key names (it only moves values around); the control image encoder and SDXL's ``label_emb`` are renamed
    here (see the module docstring).
    """
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    bare = {k[len(prefix):]: k for k in keys if k.startswith(prefix) and k != prefix + DIFF_KEY}
    body = [b for b in bare if not b.startswith(("input_hint_block.", "label_emb."))]
    if "time_embed.0.weight" not in body:  # diffusers' function would look for control_model.* keys itself
        raise ModelLoadError(f"the ControlNet has no {prefix}time_embed.0.weight: the file is incomplete or of another "
                             "architecture")
    converted = convert_controlnet_checkpoint({b: b for b in body}, {"layers_per_block": _ldm_layers_per_block(body)})
    mapping = {new: old for new, old in converted.items() if old is not None}
    mapping.update(_hint_names(list(bare)))
    for b in bare:
        for old, new in _LABEL_EMB.items():
            if b.startswith(old):
                mapping[new + b[len(old):]] = b
    used = set(mapping.values())
    mapping = {new: bare[old] for new, old in mapping.items()}
    return mapping, sorted(bare[b] for b in bare if b not in used)


def _to_diffusers(state: Mapping[str, Any], arch: ControlNetArchitecture) -> dict[str, Any]:
    """The ControlNet's entries (tensors or shapes) under diffusers' names; LDM keys it cannot name are an error."""
    if arch.layout == "diffusers":
        return {k: v for k, v in state.items() if k != DIFF_KEY}
    mapping, unused = ldm_to_diffusers_names(list(state), arch.prefix)
    if unused:
        raise ModelLoadError(f"the ControlNet has {len(unused)} tensors a diffusers ControlNet has no place for (e.g. "
                             f"{unused[:3]})")
    others = [k for k in state if not k.startswith(arch.prefix)]
    if others:
        logger.info("ignoring %d tensors outside %s* (%s)", len(others), arch.prefix, prefix_summary(others))
    return {new: state[old] for new, old in mapping.items()}


# --------------------------------------------------------------------------- config


def _indices(keys: Sequence[str], head: str) -> list[int]:
    """The numbers N of keys ``<head>N.*``, sorted."""
    return sorted({int(k[len(head):].split(".")[0]) for k in keys if k.startswith(head)})


def _depth(keys: Sequence[str], attention: str) -> int:
    return len(_indices(keys, f"{attention}.transformer_blocks."))


def _fit_unet(config: dict[str, Any], unet_config: Mapping[str, Any]) -> None:
    """Refuse a ControlNet whose residuals cannot be added to this UNet's skip connections and middle block."""
    checks = {"block_out_channels": "block widths", "layers_per_block": "res blocks per level",
              "cross_attention_dim": "cross-attention width", "in_channels": "latent channels"}
    for name, what in checks.items():
        mine, theirs = config.get(name), unet_config.get(name)
        if isinstance(theirs, (list, tuple)):
            mine, theirs = list(mine), list(theirs)
        if mine != theirs:
            raise ModelLoadError(f"the ControlNet does not fit the pipeline's UNet: its {what} are {mine}, the UNet's "
                                 f"{theirs}")
    if bool(config.get("addition_embed_type")) != (unet_config.get("addition_embed_type") == "text_time"):
        raise ModelLoadError("the ControlNet does not fit the pipeline's UNet: one of them has SDXL's added (pooled "
                             "text + size) embedding and the other not")


def _derive_config(shapes: Mapping[str, tuple[int, ...]], arch: ControlNetArchitecture,
                   unet_config: Mapping[str, Any] | None, global_pool_conditions: bool) -> dict[str, Any]:
    """A diffusers ``ControlNetModel`` config from the ControlNet's shapes under diffusers' names (module docstring:
    what comes from ``unet_config``, what from the families' conventions). Refuses layouts a diffusers ControlNet
    cannot express, head counts the conventions cannot give, and a ControlNet that does not fit ``unet_config``."""
    keys = list(shapes)
    levels = _indices(keys, "down_blocks.")
    if not levels or levels != list(range(len(levels))):
        raise ModelLoadError(f"the ControlNet's down blocks are numbered {levels}: expected 0, 1, ...")
    block_out, per_level, depths = [], [], []
    for i in levels:
        head = f"down_blocks.{i}."
        resnets = _indices(keys, head + "resnets.")
        attentions = _indices(keys, head + "attentions.")
        if not resnets or head + "resnets.0.conv1.weight" not in shapes:
            raise ModelLoadError(f"down block {i} of the ControlNet has no res blocks")
        if attentions and attentions != resnets:
            raise ModelLoadError(f"down block {i} of the ControlNet has attention in some blocks only ({attentions} "
                                 f"of {resnets})")
        level_depths = {_depth(keys, f"{head}attentions.{j}") for j in attentions}
        if len(level_depths) > 1:
            raise ModelLoadError(f"down block {i} of the ControlNet has transformers of depths {sorted(level_depths)}: "
                                 "a diffusers ControlNet needs one depth per level")
        block_out.append(shapes[head + "resnets.0.conv1.weight"][0])
        per_level.append(len(resnets))
        depths.append(level_depths.pop() if level_depths else 0)
    if len(set(per_level)) != 1:
        raise ModelLoadError(f"the ControlNet has {per_level} res blocks per level: a diffusers ControlNet needs the "
                             "same number on every level")
    middle = _depth(keys, "mid_block.attentions.0")
    if middle and depths[-1] not in (0, middle):
        raise ModelLoadError(f"the ControlNet's last level has transformer depth {depths[-1]} but its middle block "
                             f"{middle}: a diffusers ControlNet needs them equal")
    projections = [s for k, s in shapes.items() if k.endswith(".proj_in.weight")]
    hint_blocks = _indices(keys, "controlnet_cond_embedding.blocks.")
    if len(hint_blocks) % 2 or hint_blocks != list(range(len(hint_blocks))):
        raise ModelLoadError(f"the ControlNet's control image encoder has blocks {hint_blocks}: expected pairs of "
                             "convolutions (one keeping the width, one downsampling)")
    hint_widths = [shapes["controlnet_cond_embedding.conv_in.weight"][0]] + [
        shapes[f"controlnet_cond_embedding.blocks.{j}.weight"][0] for j in hint_blocks[1::2]]
    config: dict[str, Any] = {
        "in_channels": arch.in_channels,
        "conditioning_channels": arch.conditioning_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if middle else "UNetMidBlock2D",
        "block_out_channels": block_out,
        "layers_per_block": per_level[0],
        # levels without attention ignore their entry; the middle block takes the last one
        "transformer_layers_per_block": [d or 1 for d in depths[:-1]] + [middle or depths[-1] or 1],
        "cross_attention_dim": arch.context_dim,
        "use_linear_projection": bool(projections) and len(projections[0]) == 2,
        "conditioning_embedding_out_channels": hint_widths,
        "global_pool_conditions": bool(global_pool_conditions),
    }
    adm = shapes.get("add_embedding.linear_1.weight")
    if adm is not None:
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=adm[1])
    if unet_config is not None:
        _fit_unet(config, unet_config)
        config["attention_head_dim"] = unet_config.get("attention_head_dim", 8)
        config["num_attention_heads"] = unet_config.get("num_attention_heads")
        config.update({name: unet_config[name] for name in _FROM_UNET if name in unet_config})
        if adm is not None:
            config["addition_time_embed_dim"] = unet_config.get("addition_time_embed_dim")
        return config
    family = arch.model_family
    if family.name == "sd1":
        config["attention_head_dim"] = SD1_HEADS  # diffusers' name for the number of heads
    else:
        if any(c % HEAD_CHANNELS for c in block_out):
            raise ModelLoadError(f"the number of attention heads is not in the weights, and this {family.label} "
                                 f"ControlNet's widths {block_out} are not multiples of {HEAD_CHANNELS} channels per "
                                 "head (the convention): give the pipeline's UNet config")
        config["attention_head_dim"] = [c // HEAD_CHANNELS for c in block_out]
    if adm is not None:
        time_dim, rest = divmod(adm[1] - SDXL_POOLED, family.time_ids)
        if rest or time_dim <= 0:
            raise ModelLoadError(f"the ControlNet's added embedding takes {adm[1]} values, not SDXL's six size "
                                 f"conditions plus a {SDXL_POOLED}-wide pooled text embedding: give the pipeline's "
                                 "UNet config")
        config["addition_time_embed_dim"] = time_dim
    return config


# --------------------------------------------------------------------------- building


def _check_family(arch_family: str, family: str | ModelFamily | None, what: str) -> None:
    if family is None:
        return
    wanted = as_family(family)
    if arch_family != wanted.name:
        found = family_named(arch_family)
        raise ModelLoadError(f"{what} is an {found.label} ControlNet; this {wanted.label} pipeline needs an "
                             f"{wanted.label} ControlNet")


def _add_base(state: dict[str, torch.Tensor], base_unet) -> dict[str, torch.Tensor]:
    """A "diff" ControlNet's weights plus the base UNet's where the UNet has the same tensor (its encoder: the
    diffusers names of ``conv_in``, ``time_embedding``, ``add_embedding``, ``down_blocks``, ``mid_block`` are the
    UNet's), as ComfyUI's DiffControlNetLoader does; the zero convolutions and the control image encoder are
    the ControlNet's own."""
    base = base_unet if isinstance(base_unet, Mapping) else base_unet.state_dict()
    out, added = {}, 0
    for key, delta in state.items():
        if key in base:
            if tuple(base[key].shape) != tuple(delta.shape):
                raise ModelLoadError(f"the diff ControlNet does not fit the base UNet: {key} is "
                                     f"{tuple(delta.shape)} in the ControlNet, {tuple(base[key].shape)} in the UNet")
            # in float32, then back: the sum is the trained weight, the difference alone is not
            delta = (delta.float() + base[key].detach().to(device=delta.device, dtype=torch.float32)).to(delta.dtype)
            added += 1
        out[key] = delta
    if not added:
        raise ModelLoadError("the diff ControlNet shares no tensor with the base UNet")
    return out


def _build(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
           device: torch.device | None, *, copy: bool):
    """A ``ControlNetModel`` from ``config`` holding ``state`` (diffusers names), cast and moved: built on the meta
    device and given the tensors (``assign``), so nothing is allocated twice. ``copy``: never share storage with
    ``state`` (weights a host still owns)."""
    from diffusers import ControlNetModel

    from .checkpoints import _meta_build, _strict_load

    moved = {}
    for key, value in state.items():
        target = dtype if dtype is not None and value.is_floating_point() else value.dtype
        moved[key] = value.to(device=device if device is not None else value.device, dtype=target, copy=copy)
    model = _meta_build(lambda: ControlNetModel.from_config(dict(config)))
    _strict_load(model, moved, "ControlNet")
    return model.eval().requires_grad_(False)


def _check_usable(arch: ControlNetArchitecture, *, what: str, family, unet_config, base_unet) -> None:
    """Refuse a ControlNet of another family than the pipeline's, and a diff ControlNet without its base UNet."""
    if family is None and unet_config is not None:
        family = family_of_unet(unet_config)
    _check_family(arch.family, family, what)
    if arch.diff and base_unet is None:
        raise ModelLoadError(f"{what} is a \"diff\" ControlNet (its weights are differences to a base model's): it "
                             "needs the base UNet's weights (ComfyUI's DiffControlNetLoader with the model), or use "
                             "a full ControlNet")


def _from_state(state: Mapping[str, torch.Tensor], *, what: str, dtype, device, family, unet_config, base_unet,
                global_pool_conditions: bool, copy: bool, config: Mapping[str, Any] | None = None):
    arch = detect_controlnet(state)
    if config is not None:  # a diffusers folder's own config decides the family
        arch_family = family_of_unet(config).name
        if arch_family != arch.family:
            raise ModelLoadError(f"its config.json describes an {family_named(arch_family).label} ControlNet, its "
                                 f"weights an {arch.model_family.label} one")
    _check_usable(arch, what=what, family=family, unet_config=unet_config, base_unet=base_unet)
    renamed = _to_diffusers(state, arch)
    if config is None:
        shapes = {k: shape_of(v) for k, v in renamed.items()}
        config = _derive_config(shapes, arch, unet_config, global_pool_conditions)
    elif unet_config is not None:
        _fit_unet(dict(config), unet_config)
    if arch.diff:
        renamed = _add_base(renamed, base_unet)
        copy = False  # the sums are new tensors already (only the ControlNet's own parts may still be shared)
    model = _build(config, renamed, dtype, device, copy=copy)
    logger.info("%s: %s ControlNet (%s layout%s), block widths %s, hint %d channels", what, arch.model_family.label,
                arch.layout, ", diff + base UNet" if arch.diff else "", list(model.config.block_out_channels),
                arch.conditioning_channels)
    return model


def controlnet_from_state_dict(state_dict: Mapping[str, torch.Tensor], *, dtype: torch.dtype | str | None = None,
                               device: torch.device | str | None = None, family: str | ModelFamily | None = None,
                               unet_config: Mapping[str, Any] | None = None, base_unet=None,
                               global_pool_conditions: bool = False, what: str = "the ControlNet"):
    """A diffusers ``ControlNetModel`` from ControlNet weights already in memory, in either layout.

    The tensors are copied (cast to ``dtype``, moved to ``device``): the model never shares storage with
    ``state_dict``, which its owner may change or free.

    Args:
        state_dict: the ControlNet's tensors (LDM names with or without ``control_model.``, or diffusers names).
            ComfyUI's ``CONTROL_NET`` holds LDM names without the prefix (``control_model.state_dict()`` of a
            ``comfy.cldm.cldm.ControlNet``; a DiffControlNetLoader's already holds the sums).
        dtype: the model's dtype (None: the tensors' own).
        device: where the model lives (None: where the tensors are).
        family: the pipeline's family: a ControlNet of another is refused (None: any, or ``unet_config``'s).
        unet_config: the pipeline's ``UNet2DConditionModel`` config: the attention heads, SDXL's size-embedding
            width and the constants no weight shows (``upcast_attention``, norm groups...) are taken from it, and
            the ControlNet must fit it (same block widths, blocks per level, context width). None: the families'
            conventions (module docstring).
        base_unet: for "diff" ControlNets, the base UNet (a diffusers ``UNet2DConditionModel`` or its state dict).
        global_pool_conditions: pool the residuals over the image (shuffle ControlNets).
        what: how messages name the weights.

    Raises:
        ModelLoadError: naming ``what``: not a ControlNet (:func:`detect_controlnet`), another family, layouts a
            diffusers ControlNet cannot express (uneven blocks per level, attention in some blocks of a level only),
            head counts the conventions cannot give (a non-standard width: pass ``unet_config``), a ControlNet that
            does not fit ``unet_config``, weights that do not fit the config.
    """
    from .loading import _load_errors, resolve_dtype

    target = None if device is None else torch.device(device)
    dtype = None if dtype is None else resolve_dtype(dtype, target or "cpu")
    with _load_errors(what):
        return _from_state(state_dict, what=what, dtype=dtype, device=target, family=family, unet_config=unet_config,
                           base_unet=base_unet, global_pool_conditions=global_pool_conditions, copy=True)


def _folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return read_weights(folder / name)
    for name in ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json"):
        index = folder / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise ModelLoadError(f"{index} is not a readable weight index: {exc}") from None
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
                    raise ModelLoadError(f"{index} names a shard {shard!r} outside its folder: only plain file "
                                         "names are read")
                state.update(read_weights(folder / shard))
            return state
    raise ModelLoadError(f"{folder} has no weights ({FOLDER_WEIGHTS[0]})")


def _load_file(path: Path, *, dtype, device, family, unet_config, base_unet):
    what = f"ControlNet {path}"
    global_pool = path.name.split(".")[0].endswith(("_shuffle", "_shuffle_fp16"))  # ComfyUI's rule
    if path.is_dir():
        from diffusers import ControlNetModel

        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a diffusers ControlNet folder (no config.json)")
        config = dict(ControlNetModel.load_config(path, local_files_only=True))
        if config.get("_class_name") not in (None, "ControlNetModel"):
            raise ModelLoadError(f"{path} holds a {config['_class_name']}, not a ControlNetModel: StreamRT takes "
                                 f"{known_families()} ControlNets")
        return _from_state(_folder_weights(path), what=what, dtype=dtype, device=device, family=family,
                           unet_config=unet_config, base_unet=base_unet, global_pool_conditions=global_pool,
                           copy=False, config=config)
    check_weight_file(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:  # refuse what is no ControlNet before reading gigabytes
        _check_usable(detect_controlnet(read_shapes(path)), what=what, family=family, unet_config=unet_config,
                      base_unet=base_unet)
    if global_pool:
        logger.info("%s: a shuffle ControlNet (by its name): its residuals are pooled over the image", path.name)
    return _from_state(read_weights(path), what=what, dtype=dtype, device=device, family=family,
                       unet_config=unet_config, base_unet=base_unet, global_pool_conditions=global_pool, copy=False)


def load_controlnet(path: str | os.PathLike, *, dtype: torch.dtype | str, device: torch.device | str,
                    family: str | ModelFamily | None = None, unet_config: Mapping[str, Any] | None = None,
                    base_unet=None):
    """A diffusers ``ControlNetModel`` from a ControlNet file or folder, offline, in eval mode without gradients.

    Args:
        path: a single file (``.safetensors``; ``.pth`` / ``.ckpt`` / ``.bin`` read as plain tensors only) in LDM
            or diffusers key layout, or a diffusers ``save_pretrained`` folder (``config.json`` + weights).
        dtype: ``torch.float16`` ... or ``"auto"`` / ``"fp16"`` / ``"fp32"`` (:func:`~streamrt.loading.resolve_dtype`).
        device: ``"cuda"``, ``"cpu"``, ``"auto"`` (:func:`~streamrt.loading.resolve_device`).
        family: the pipeline's family (a :class:`~streamrt.families.ModelFamily` or its name): a ControlNet of
            another family is refused, naming both. None: ``unet_config``'s family, or any.
        unet_config: the pipeline's UNet config: heads and the constants no weight shows come from it, and the
            ControlNet must fit it (:func:`controlnet_from_state_dict`).
        base_unet: the base UNet for "diff" ControlNets (a ``UNet2DConditionModel`` or its diffusers state dict).

    Raises:
        ModelLoadError: naming the file: missing, truncated or corrupt, a refused pickle, not a ControlNet (named
            when it is a LoRA, a checkpoint, a T2I-Adapter...), another family, a diff ControlNet without its base,
            weights that do not fit the config.
    """
    from .loading import _load_errors, resolve_device, resolve_dtype

    path = Path(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    with _load_errors(f"ControlNet {path}"):
        return _load_file(path, dtype=dtype, device=device, family=family, unet_config=unet_config,
                          base_unet=base_unet)
