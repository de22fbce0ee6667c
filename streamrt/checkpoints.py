"""Single-file Stable Diffusion checkpoints and ComfyUI's TAESD files, read offline.

A ComfyUI user's ``models/checkpoints`` holds original (LDM / CompVis, or Stability's SGM) single-file
checkpoints: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and the text encoder(s) in
one file, with no config. diffusers' ``from_single_file`` would fetch the configs from the Hugging Face
hub; here they ship with the pack (:data:`CONFIG_ROOT`, one diffusers-layout folder per architecture) and
the architecture is read from the checkpoint's keys and shapes. Where each family keeps its text
encoders is :data:`TEXT_TOWERS`; which configs it ships, how its tokenizers pad and which TAESD it takes,
its :class:`~streamrt.families.ModelFamily`:

========  =====================================================================  ====================
family    text encoder keys                                                      shipped configs
========  =====================================================================  ====================
``sd1``   ``cond_stage_model.transformer.*`` (CLIP ViT-L, width 768)              ``sd1``
``sd2``   ``cond_stage_model.model.*`` (OpenCLIP ViT-H, width 1024)               ``sd2-v``, ``sd2-base``
``sdxl``  ``conditioner.embedders.0.transformer.*`` (CLIP ViT-L, 768) and        ``sdxl``
          ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG, 1280, with
          its text projection); the UNet's ``label_emb.0.*`` is diffusers'
          ``add_embedding`` (pooled text + size conditions)
========  =====================================================================  ====================

Anything else (the SDXL refiner, SD3, Flux, inpainting UNets, LoRAs) is refused with what it is or the
key prefixes that were found. The weights are converted by diffusers' own offline functions
(:mod:`diffusers.loaders.single_file_utils`). OpenCLIP text towers become transformers CLIP models:
SD2's as a 23-layer ``CLIPTextModel`` (its last layer is dropped, as diffusers and ComfyUI do), SDXL's
as a full 32-layer ``CLIPTextModelWithProjection`` (OpenCLIP applies ``text_projection`` as ``x @ P``,
so the Linear weight is its transpose; diffusers' ``convert_open_clip_checkpoint`` transposes it).

**Prediction type.** Weights do not say reliably whether a model predicts noise (epsilon) or
velocity (v). ``prediction_type="auto"`` (:func:`auto_prediction_type`) decides:

1. a ``v_pred`` key in the checkpoint (written by some trainers) -> ``v_prediction``;
2. SD1.x and SDXL (base, turbo and their fine-tunes) -> ``epsilon``;
3. SD2.x whose file name contains ``turbo`` (sd-turbo: SD2.1-based, 512 px) -> ``epsilon``;
4. other SD2.x: ComfyUI's own test -> ``v_prediction`` when the std of
   ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` exceeds 0.09 (the 768-px v models such as
   SD2.0/2.1), else ``epsilon`` (the 512-px ``-base`` models).

Pass ``epsilon`` / ``v_prediction`` to override. SD2 v models get the ``sd2-v`` configs
(``upcast_attention``), epsilon ones ``sd2-base``.

**Config override.** A model of another shape (a test's tiny model, an unusual fine-tune) can name
its own config folder (diffusers layout: ``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``,
SDXL's ``text_encoder_2/`` too, optionally ``tokenizer/`` and ``tokenizer_2/``) with ``config_dir=``, or
with a sidecar file ``<checkpoint>.streamrt.json`` next to the checkpoint holding
``{"config_dir": "<folder, relative to the sidecar>"}``. Such a folder is used as is: its architecture is
trusted (the family is still read from the keys, to convert them), and ``auto`` takes its scheduler's
prediction type.
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

from .families import FAMILIES, ModelFamily, as_family, family_named, known_families
from .state_dicts import context_width, prefix_summary
from .weights import ModelLoadError

logger = logging.getLogger(__name__)

#: the shipped component configs, one diffusers-layout folder per architecture
CONFIG_ROOT = Path(__file__).resolve().parent / "model_configs"
SIDECAR_SUFFIX = ".streamrt.json"

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."
XL_CLIP_L = "conditioner.embedders.0.transformer."
XL_OPEN_CLIP = "conditioner.embedders.1.model."
_UNET_IN = UNET + "input_blocks.0.0.weight"
_LABEL_EMB = UNET + "label_emb.0.0.weight"
V_NORM_KEY = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
#: SD1 text encoders saved by old transformers versions lack the ``text_model.`` level
_OLD_CLIP_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


@dataclass(frozen=True)
class TextTower:
    """Where one text encoder's weights lie in a single-file checkpoint.

    Args:
        prefix (`str`): the key prefix of its tensors.
        open_clip (`bool`): OpenCLIP's names (``token_embedding``, ``transformer.resblocks.N.attn.in_proj_weight``,
            ``ln_final``, ``text_projection`` applied as ``x @ P``) rather than transformers' CLIP names.
    """

    prefix: str
    open_clip: bool

    @property
    def token_embedding(self) -> str:
        """The key of its token embedding (``[vocabulary, width]``): present iff the tower is."""
        return self.prefix + ("token_embedding.weight" if self.open_clip else
                              "text_model.embeddings.token_embedding.weight")


#: family name -> its text encoders in a single-file checkpoint (canonical keys, :func:`normalize_keys`), in the
#: order of :attr:`ModelFamily.text_widths <streamrt.families.ModelFamily.text_widths>`
TEXT_TOWERS: dict[str, tuple[TextTower, ...]] = {
    "sd1": (TextTower(CLIP_L, open_clip=False),),
    "sd2": (TextTower(OPEN_CLIP, open_clip=True),),
    "sdxl": (TextTower(XL_CLIP_L, open_clip=False), TextTower(XL_OPEN_CLIP, open_clip=True)),
}


def numbered(component: str, count: int) -> tuple[str, ...]:
    """diffusers' names of a pipeline's numbered components: ``numbered("text_encoder", 2)`` is
    ``("text_encoder", "text_encoder_2")`` (folders of a diffusers pipeline, attributes of StreamModels)."""
    return tuple(component if i == 0 else f"{component}_{i + 1}" for i in range(count))


def projects_pooled(family: ModelFamily, index: int) -> bool:
    """Whether text encoder ``index`` of ``family`` keeps its text projection: the last one does when the UNet
    takes a pooled embedding (SDXL's OpenCLIP-bigG, a ``CLIPTextModelWithProjection``)."""
    return family.pooled_dim > 0 and index == family.text_encoders - 1


@dataclass(frozen=True)
class Architecture:
    """What a single-file checkpoint holds, read from its keys and shapes.

    Args:
        family (`str`): the :class:`~streamrt.families.ModelFamily`'s name (``"sd1"``, ``"sd2"``, ``"sdxl"``).
        text_widths (`tuple[int, ...]`): width of each text encoder's token embedding, in the family's order.
        context_dim (`int`): width of the UNet's cross-attention context (the widths' sum).
        in_channels (`int`): UNet input channels (4 for text-to-image models).
        has_vae (`bool`): whether the file holds a VAE (``first_stage_model.*``).
        v_pred_key (`bool`): whether the file carries a ``v_pred`` marker key.
    """

    family: str
    text_widths: tuple[int, ...]
    context_dim: int
    in_channels: int
    has_vae: bool
    v_pred_key: bool = False

    @property
    def model_family(self) -> ModelFamily:
        return family_named(self.family)


# --------------------------------------------------------------------------- key normalisation


def normalize_keys(keys: Sequence[str]) -> dict[str, str]:
    """Original key -> canonical key (SGM-format SD1/SD2 prefixes, old CLIP layout).

    SD2 checkpoints saved by Stability's SGM code name the text encoder
    ``conditioner.embedders.0.model.*`` and SD1 ones ``conditioner.embedders.0.transformer.*``: they become
    the LDM names (``cond_stage_model.*``). SDXL files (a second embedder, or UNet ``label_emb``) keep their
    SGM names, which are SDXL's canonical ones (:data:`TEXT_TOWERS`). CLIP text encoders from old
    transformers versions lack ``text_model.``, which is added.
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
        for prefix in (CLIP_L, XL_CLIP_L):
            if new.startswith(prefix) and new[len(prefix):].startswith(_OLD_CLIP_PARTS):
                new = prefix + "text_model." + new[len(prefix):]
        out[key] = new
    return out


# --------------------------------------------------------------------------- detection


def detect_architecture(shapes: Mapping[str, Sequence[int]], *, check_widths: bool = True) -> Architecture:
    """The :class:`Architecture` of a single-file checkpoint from its (canonical) keys and shapes.

    The family is the one whose text encoders (:data:`TEXT_TOWERS`) the file holds, all of them and no other's.

    Args:
        shapes: key -> shape (a state dict's tensors or a safetensors header; keys as given by
            :func:`normalize_keys`).
        check_widths: require the family's text widths (768 / 1024 / 768+1280; off when a config folder is
            given).

    Raises:
        ModelLoadError: architectures StreamRT does not stream (the SDXL refiner, unCLIP, SD3, Flux, a LoRA,
            naming the key prefixes found otherwise), inpainting and other non-4-channel UNets, or mismatched
            widths.
    """
    keys = list(shapes)
    known = known_families()
    if any(k.startswith((UNET + "joint_blocks.", "joint_blocks.")) for k in keys):
        raise ModelLoadError(f"this is a Stable Diffusion 3 checkpoint: StreamRT streams {known}")
    if any(k.startswith((UNET + "double_blocks.", "double_blocks.")) for k in keys):
        raise ModelLoadError(f"this is a Flux checkpoint: StreamRT streams {known}")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or ".lora_down." in k for k in keys):
        raise ModelLoadError("this is a LoRA, not a checkpoint: put it in models/loras and add it with the "
                             "StreamRT LoRA node")
    if _LABEL_EMB in shapes and any(k.startswith("conditioner.embedders.0.model.") for k in keys) and not any(
            k.startswith("conditioner.embedders.1.") for k in keys):
        raise ModelLoadError("this is an SDXL refiner checkpoint (one OpenCLIP-bigG text encoder, aesthetic-score "
                             "conditions): StreamRT streams SDXL base-type models (two text encoders), such as SDXL "
                             "base, SDXL-turbo and their fine-tunes")
    if _UNET_IN not in shapes:
        raise ModelLoadError(f"not a {known} checkpoint: no UNet (model.diffusion_model.*) was found; keys found: "
                             f"{prefix_summary(keys)}")
    found = [name for name, towers in TEXT_TOWERS.items() if all(t.token_embedding in shapes for t in towers)]
    # SDXL's towers include none of SD1's or SD2's prefixes, so a file matches one family or is malformed.
    if len(found) != 1:
        partial = {name: [t.token_embedding in shapes for t in towers] for name, towers in TEXT_TOWERS.items()
                   if 0 < sum(t.token_embedding in shapes for t in towers) < len(towers)}
        if found:
            what = "the text encoders of " + " and ".join(family_named(n).label for n in found)
        elif partial:
            name, present = next(iter(partial.items()))
            towers = TEXT_TOWERS[name]
            what = (f"only part of {family_named(name).label}'s text encoders ("
                    + " + ".join(t.prefix + "*" for t, p in zip(towers, present) if p) + " without "
                    + " + ".join(t.prefix + "*" for t, p in zip(towers, present) if not p) + ")")
        else:
            what = "no text encoder StreamRT knows"
        layouts = "; ".join(f"{family_named(n).label}: " + " + ".join(t.prefix + "*" for t in towers)
                            for n, towers in TEXT_TOWERS.items())
        raise ModelLoadError(f"not a {known} checkpoint: it has {what} ({layouts}); keys found: "
                             f"{prefix_summary(keys)}")
    family = family_named(found[0])
    text_widths = tuple(int(shapes[t.token_embedding][1]) for t in TEXT_TOWERS[family.name])
    in_channels = int(shapes[_UNET_IN][1])
    context_dim = context_width(shapes, UNET) or sum(text_widths)
    if _LABEL_EMB in shapes and not family.has_added_conditions:
        raise ModelLoadError(f"the UNet has class embeddings (an SD2 unCLIP or upscaler model): only text-to-image "
                             f"{known} models can stream")
    if family.has_added_conditions and _LABEL_EMB not in shapes:
        raise ModelLoadError(f"this {family.label} checkpoint's UNet has no label_emb (its pooled-text and size "
                             "embedding): the file is incomplete or of another architecture")
    if in_channels != 4:
        raise ModelLoadError(f"the UNet takes {in_channels} input channels (an inpainting, depth or instruct "
                             "model): only 4-channel text-to-image models can stream")
    if context_dim != sum(text_widths):
        raise ModelLoadError(f"the UNet's cross-attention width {context_dim} does not match the text encoders' "
                             f"{'+'.join(map(str, text_widths))}: not a standard {family.label} checkpoint")
    if check_widths and text_widths != family.text_widths:
        expected, got = ("+".join(map(str, w)) for w in (family.text_widths, text_widths))
        raise ModelLoadError(f"{family.label} checkpoints have a text width of {expected}, this one {got}: an unknown "
                             "architecture (give it a config folder)")
    has_vae = any(k.startswith(VAE + "decoder.") for k in keys)
    return Architecture(family.name, text_widths, context_dim, in_channels, has_vae, v_pred_key="v_pred" in shapes)


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
    # SD2 is the one line released in both kinds without a marker (768-px v, 512-px epsilon): the others predict
    # noise unless a v_pred key says otherwise (SDXL base and SDXL-turbo are epsilon).
    if arch.family != "sd2":
        return "epsilon", f"{arch.model_family.label} models predict noise"
    if "turbo" in file_name.lower():
        return "epsilon", "SD2.x turbo models (sd-turbo) predict noise"
    if v_norm_bias is not None and float(v_norm_bias.float().std(unbiased=False)) > 0.09:
        return "v_prediction", "SD2.x 768 model (ComfyUI's norm1.bias test)"
    return "epsilon", "SD2.x base model (ComfyUI's norm1.bias test)"


def shipped_config_dir(family: str | ModelFamily, prediction_type: str) -> Path:
    """The pack's config folder for a family and prediction type (:meth:`ModelFamily.config_folder`)."""
    try:
        return CONFIG_ROOT / as_family(family).config_folder(prediction_type)
    except (ValueError, StopIteration):
        raise ModelLoadError(f"no shipped configs for {family!r}") from None


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


def text_encoder_state_dict(state_dict: Mapping[str, torch.Tensor], family: str | ModelFamily, num_layers: int, *,
                            index: int = 0, projection: bool = False) -> dict[str, torch.Tensor]:
    """The transformers CLIP state dict of a checkpoint's text encoder ``index`` (canonical keys).

    CLIP towers (SD1, SDXL's first) have transformers' names already, under their prefix. OpenCLIP towers
    (SD2, SDXL's second) are converted by diffusers' ``convert_open_clip_checkpoint`` (``in_proj`` split
    into q/k/v, ``text_projection`` transposed into a Linear weight); resblocks at or beyond
    ``num_layers`` (SD2's 24th layer) are dropped first.

    Args:
        projection: keep the text projection (``text_projection.weight``) for a
            ``CLIPTextModelWithProjection`` (:func:`projects_pooled`); dropped otherwise.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    tower = TEXT_TOWERS[as_family(family).name][index]
    kept = {k: v for k, v in state_dict.items() if k.startswith(tower.prefix)}
    if not tower.open_clip:
        text = convert_ldm_clip_checkpoint(kept, remove_prefix=tower.prefix)
    else:
        resblock = tower.prefix + "transformer.resblocks."
        kept = {k: v for k, v in kept.items()
                if not (k.startswith(resblock) and int(k[len(resblock):].split(".")[0]) >= num_layers)}
        width = int(kept[tower.token_embedding].shape[1])

        class _Config:  # convert_open_clip_checkpoint reads only the width it splits in_proj by
            hidden_size = width

        if not projection:
            kept.pop(tower.prefix + "text_projection", None)
        text = convert_open_clip_checkpoint(type("TextModel", (), {"config": _Config})(), kept, prefix=tower.prefix)
    drop = {"text_model.embeddings.position_ids", "logit_scale"} | (set() if projection else {"text_projection.weight"})
    return {k: v for k, v in text.items() if k not in drop}


#: the CLIP tower's top-level parts, which transformers 4 nests under ``text_model.``
_TOWER_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def fit_text_prefix(state_dict: Mapping[str, torch.Tensor], text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Keys with or without ``text_model.``, as this transformers version's CLIP model names them.

    transformers 4 nests the tower under ``text_model`` in every CLIP text model; transformers 5 flattened
    ``CLIPTextModel`` but not ``CLIPTextModelWithProjection`` (``from_pretrained`` renames old keys itself, a
    plain ``load_state_dict`` does not). ``text_projection.weight`` is never under ``text_model``.
    """
    nested = any(k.startswith("text_model.") for k in text_encoder.state_dict())
    out = {}
    for key, value in state_dict.items():
        bare = key[len("text_model."):] if key.startswith("text_model.") else key
        out["text_model." + bare if nested and bare.startswith(_TOWER_PARTS) else bare] = value
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


def build_text_encoder(state_dict: Mapping[str, torch.Tensor], config_dir: Path, num_layers: int | None = None, *,
                       subfolder: str = "text_encoder", projection: bool = False):
    """A transformers CLIP text model (config from ``config_dir/<subfolder>``) holding a CLIP text tower's tensors
    in transformers' names (``text_model.*`` or without that level).

    Args:
        num_layers: keep only the first layers (CLIP skip: the output of layer ``num_layers`` after the final
            layer norm, as ComfyUI's ``CLIPSetLastLayer`` and SD2's penultimate layer give it); later layers are
            dropped.
        subfolder: ``text_encoder`` or SDXL's ``text_encoder_2``.
        projection: build a ``CLIPTextModelWithProjection`` that keeps ``text_projection.weight`` (SDXL's second
            encoder, whose projected embedding is the UNet's pooled input); else a ``CLIPTextModel`` and the
            projection is dropped.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_config = CLIPTextConfig.from_pretrained(config_dir / subfolder, local_files_only=True)
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
        if bare in ("embeddings.position_ids", "logit_scale") or (bare == "text_projection.weight" and not projection):
            continue
        kept[key] = value
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    text_encoder = _meta_build(lambda: model_class(text_config))
    _strict_load(text_encoder, fit_text_prefix(kept, text_encoder), subfolder.replace("_", " "))
    return text_encoder


def build_components(state_dict: Mapping[str, torch.Tensor], family: str | ModelFamily, config_dir: Path, *,
                     with_vae: bool = True) -> dict[str, object]:
    """UNet, VAE (or None) and text encoder(s) of a single-file checkpoint (no copies of the tensors).

    Models are built on the meta device from ``config_dir`` and take the checkpoint's tensors as they
    are (``assign=True``), so they keep the file's dtype until the caller casts them. SDXL's second text
    encoder comes as ``text_encoder_2`` (a ``CLIPTextModelWithProjection``, config ``text_encoder_2/``).
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    family = as_family(family)
    parts: dict[str, object] = {
        "unet": build_unet(state_dict, UNet2DConditionModel.load_config(config_dir, subfolder="unet",
                                                                        local_files_only=True)),
        "vae": build_vae({k: v for k, v in state_dict.items() if k.startswith(VAE)}, config_dir) if with_vae else None,
    }
    for index, name in enumerate(numbered("text_encoder", family.text_encoders)):
        if not (config_dir / name).is_dir():
            raise ModelLoadError(f"config folder {config_dir} has no {name}/ ({family.label} has "
                                 f"{family.text_encoders} text encoder(s))")
        layers = CLIPTextConfig.from_pretrained(config_dir / name, local_files_only=True).num_hidden_layers
        projection = projects_pooled(family, index)
        text = text_encoder_state_dict(state_dict, family, layers, index=index, projection=projection)
        parts[name] = build_text_encoder(text, config_dir, subfolder=name, projection=projection)
    return parts


# --------------------------------------------------------------------------- models already in memory (LDM layout)


def unet_config_from_ldm(params: Mapping[str, Any], *, upcast_attention: bool = False,
                         pooled_dim: int = 0) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config for an LDM ``UNetModel`` described by its constructor
    parameters, as ComfyUI reads them from a checkpoint's keys (``model_channels``, ``channel_mult``,
    ``num_res_blocks``, ``transformer_depth`` per input block, ``transformer_depth_middle``, ``context_dim``,
    ``num_heads`` / ``num_head_channels``, ``use_linear_in_transformer``, ``in_channels``, ``adm_in_channels``).

    So any SD1.x / SD2.x / SDXL-shaped UNet (a pruned or resized fine-tune too) gets its own config instead
    of the shipped full-size ones. An SDXL UNet takes the text/time added conditions: its ``adm_in_channels``
    are six size conditions of ``addition_time_embed_dim`` each plus the pooled text embedding, so
    ``pooled_dim`` (the second text encoder's projection width) must be given for it.

    Raises:
        ModelLoadError: class-conditioned UNets other than SDXL's (unCLIP), video UNets, inpainting (not 4
            channels), and layouts a diffusers UNet cannot express (uneven blocks per level, no middle attention).
    """
    def get(name, default=None):
        return params.get(name, default)

    added: dict[str, Any] = {}
    adm = get("adm_in_channels")
    if adm is not None:
        time_dim, rest = divmod(int(adm) - pooled_dim, 6)
        if not pooled_dim or rest or time_dim <= 0:
            raise ModelLoadError(f"the UNet takes a {adm}-wide class/size vector (adm_in_channels) that is not SDXL's "
                                 f"six size conditions plus a {pooled_dim or 'pooled'}-wide text embedding (an unCLIP "
                                 "model?): only text-to-image SD1.x/SD2.x/SDXL models can stream")
        added = {"addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
                 "projection_class_embeddings_input_dim": int(adm), "addition_embed_type_num_heads": 64}
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
        **added,
    }


# --------------------------------------------------------------------------- ComfyUI's TAESD files

#: TAESD variants ComfyUI knows (file name prefix) that no family StreamRT streams can use -> why; the ones a family
#: takes are its :attr:`ModelFamily.taesd <streamrt.families.ModelFamily.taesd>` (``taesd``, ``taesdxl``)
OTHER_TAESD = {"taesd3": "SD3's 16-channel latent space", "taef1": "Flux's 16-channel latent space"}


def taesd_families(name: str) -> list[ModelFamily]:
    """The families whose latent space the TAESD called ``name`` encodes (``taesd``: SD1.x and SD2.x)."""
    return [f for f in FAMILIES.values() if f.taesd == name]


def _taesd_files(name: str) -> str:
    return f"{name}_encoder.safetensors / {name}_decoder.safetensors"


def check_taesd_name(name: str, family: ModelFamily | None, source: str | os.PathLike) -> None:
    """Refuse a TAESD by its ComfyUI name (``taesd``, ``taesdxl``...) when it encodes another latent space than
    ``family``'s. The weights cannot tell (TAESD and TAESDXL have the same layers), so the name decides; a name
    StreamRT does not know passes (``family`` None: any name of a streamable family passes).

    Raises:
        ModelLoadError: naming ``source``, the file pair it is and the pair ``family`` needs.
    """
    if name in OTHER_TAESD:
        wanted = " or ".join(sorted({f.taesd for f in FAMILIES.values()}))
        raise ModelLoadError(f"{source} is {name}, the tiny autoencoder for {OTHER_TAESD[name]}; StreamRT streams "
                             f"{known_families()} models, which need {wanted}")
    owners = taesd_families(name)
    if family is None or not owners or family in owners:
        return
    latent_space = "/".join(f.label for f in owners)
    raise ModelLoadError(f"{source} is {name} ({_taesd_files(name)}), the tiny autoencoder for {latent_space}'s latent "
                         f"space; this {family.label} pipeline needs {family.taesd} ({_taesd_files(family.taesd)} in "
                         "models/vae_approx)")


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
        raise ModelLoadError(f"this TAESD has {latent_channels} latent channels, {known_families()} use 4 (a TAESD3 / "
                             "TAEF1 file?)")
    config = {
        "in_channels": int(encoder["0.weight"].shape[1]),
        "out_channels": int(decoder[f"{max(dec_kinds) + 1}.weight"].shape[0]),
        "encoder_block_out_channels": tuple(enc_channels), "decoder_block_out_channels": tuple(dec_channels),
        "num_encoder_blocks": tuple(enc_blocks), "num_decoder_blocks": tuple(dec_blocks),
        "latent_channels": 4,
        "scaling_factor": 1.0,  # TAESD's latents are the unscaled ones (ComfyUI's taesd has no scale either)
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
