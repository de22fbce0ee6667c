"""Model families: one description per family (SD1.x, SD2.x, SDXL) that every layer asks (docs/DESIGN.md section 9).

Loading (which keys, which shipped configs, which tokenizer padding), prompt encoding (which hidden state,
pooled embeddings, an empty negative prompt), the stream's buffers (pooled embeddings and size conditions
per UNet row), LoRA key mapping (text-encoder prefixes) and engine export (the UNet's added inputs) read
the :class:`ModelFamily` of a pipeline instead of branching on names. Adding a family means adding one
description here plus its tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelFamily:
    """What distinguishes one family of Stable Diffusion models from another.

    Args:
        name (`str`): short id used in identities, cache keys and messages (``sd1``, ``sd2``, ``sdxl``).
        label (`str`): the name users know (``SD1.x``).
        text_widths (`tuple[int, ...]`): hidden width of each text encoder, in the order their outputs are
            concatenated (SDXL: CLIP-L 768, then OpenCLIP-bigG 1280).
        pooled_dim (`int`): width of the pooled text embedding the UNet takes as an added condition (0: none).
        time_ids (`int`): size/crop conditions per UNet row (SDXL: original size, crop, target size = 6; 0: none).
        hidden_state (`str`): the text encoders' output that conditions the UNet: ``"last"`` (the last kept
            layer after the final layer norm: SD1, and SD2 whose conversions keep 23 of 24 layers) or
            ``"penultimate"`` (the hidden state before the last layer, no final norm: SDXL).
        zero_empty_negative (`bool`): an empty negative prompt is zero embeddings (and zero pooled), not an
            encoded "" (diffusers' ``force_zeros_for_empty_prompt``).
        vae_scaling (`float`): latent scaling factor of the family's full VAE.
        vae_force_upcast (`bool`): honour a full VAE's ``force_upcast`` config in fp16, as diffusers' SDXL pipelines
            do (SDXL's VAE overflows in fp16). SD1/SD2 VAE configs carry diffusers' default ``force_upcast=True``
            too, yet run fine in fp16, and diffusers' SD pipelines ignore it: so do their families.
        taesd (`str`): ComfyUI's file name of the tiny autoencoder for this latent space (``models/vae_approx``).
        pad_tokens (`tuple`): per tokenizer, the padding token (None: the end token; ``"!"`` for OpenCLIP).
        config_folders (`Mapping[str, str]`): prediction type -> the shipped config folder (``model_configs/``).
        lora_text_prefixes (`tuple[str, ...]`): kohya key prefix of each text encoder's LoRA weights.
    """

    name: str
    label: str
    text_widths: tuple[int, ...]
    pooled_dim: int = 0
    time_ids: int = 0
    hidden_state: str = "last"
    zero_empty_negative: bool = False
    vae_scaling: float = 0.18215
    vae_force_upcast: bool = False
    taesd: str = "taesd"
    pad_tokens: tuple[str | None, ...] = (None,)
    config_folders: Mapping[str, str] = field(default_factory=dict)
    lora_text_prefixes: tuple[str, ...] = ("lora_te_",)

    @property
    def embed_dim(self) -> int:
        """Width of the UNet's text context: the encoders' widths concatenated."""
        return sum(self.text_widths)

    @property
    def text_encoders(self) -> int:
        return len(self.text_widths)

    @property
    def has_added_conditions(self) -> bool:
        """Whether the UNet takes pooled text embeddings and size conditions besides the text context."""
        return bool(self.pooled_dim or self.time_ids)

    def config_folder(self, prediction_type: str) -> str:
        """The shipped config folder for ``prediction_type`` (the family's default when it has one only)."""
        if prediction_type in self.config_folders:
            return self.config_folders[prediction_type]
        return next(iter(self.config_folders.values()))

    def time_ids_for(self, height: int, width: int) -> tuple[int, ...]:
        """The size conditions of a frame: original size, crop top-left, target size, each (height, width)
        (diffusers' SDXL pipelines without an aesthetic score)."""
        return (height, width, 0, 0, height, width) if self.time_ids else ()

    def __str__(self) -> str:
        return self.label


SD1 = ModelFamily("sd1", "SD1.x", (768,), config_folders={"epsilon": "sd1", "v_prediction": "sd1"})
SD2 = ModelFamily("sd2", "SD2.x", (1024,), pad_tokens=("!",),
                  config_folders={"epsilon": "sd2-base", "v_prediction": "sd2-v"})
SDXL = ModelFamily("sdxl", "SDXL", (768, 1280), pooled_dim=1280, time_ids=6, hidden_state="penultimate",
                   zero_empty_negative=True, vae_scaling=0.13025, taesd="taesdxl", pad_tokens=(None, "!"),
                   config_folders={"epsilon": "sdxl", "v_prediction": "sdxl"},
                   lora_text_prefixes=("lora_te1_", "lora_te2_"), vae_force_upcast=True)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD1, SD2, SDXL)}


def family_named(name: str) -> ModelFamily:
    """The family called ``name`` (``sd1``, ``sd2``, ``sdxl``); ValueError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}: StreamRT knows {', '.join(FAMILIES)}") from None


def as_family(family: str | ModelFamily) -> ModelFamily:
    """``family`` itself, or the family it names (:func:`family_named`)."""
    return family if isinstance(family, ModelFamily) else family_named(family)


def known_families() -> str:
    """The families StreamRT streams, for messages: ``SD1.x, SD2.x and SDXL``."""
    labels = [f.label for f in FAMILIES.values()]
    return ", ".join(labels[:-1]) + " and " + labels[-1]


def family_of_unet(unet_config: Mapping[str, Any]) -> ModelFamily:
    """The family of a diffusers ``UNet2DConditionModel`` config: SDXL when it takes text and time added
    conditions, SD2 for a 1024-wide context, else SD1 (which also covers the small test models)."""
    if unet_config.get("addition_embed_type") == "text_time":
        return SDXL
    if int(unet_config.get("cross_attention_dim") or 0) == 1024:
        return SD2
    return SD1


def pooled_dim_of_unet(unet_config: Mapping[str, Any]) -> int:
    """Width of the pooled text embedding an SDXL-style UNet takes: its added-embedding input minus the
    time conditions (``projection_class_embeddings_input_dim - 6 * addition_time_embed_dim``); 0 otherwise."""
    if unet_config.get("addition_embed_type") != "text_time":
        return 0
    return int(unet_config["projection_class_embeddings_input_dim"]) - 6 * int(unet_config["addition_time_embed_dim"])
