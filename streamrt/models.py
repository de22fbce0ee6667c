"""The models a stream runs: UNet, VAE (full or TAESD), CLIP text encoder(s), tokenizer(s), LCM schedule.

:class:`StreamModels` is what every stream of one pipeline shares. It is built from diffusers
components; loading from the files a user has lives in :mod:`streamrt.loading`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .families import ModelFamily, family_of_unet, pooled_dim_of_unet
from .prompts import PromptEncoder

logger = logging.getLogger(__name__)


def is_tiny_vae(vae: Any) -> bool:
    """Whether ``vae`` is a TAESD (diffusers ``AutoencoderTiny``) rather than a full ``AutoencoderKL``."""
    return type(vae).__name__ == "AutoencoderTiny"


def encode_images(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Unscaled latents of images in [-1, 1] NCHW: the VAE call in the stream's conventions.

    A full VAE gives its mean (deterministic, no sampling). Every runner of the VAE (eager, compiled,
    exported for an engine) goes through this function, so they cannot disagree.
    """
    if is_tiny_vae(vae):
        return vae.encode(images, return_dict=False)[0]
    return vae.encode(images, return_dict=False)[0].mode()


def predict_noise(unet: Any, sample: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                  **kwargs: Any) -> torch.Tensor:
    """One UNet call in the stream's conventions: the prediction for ``sample`` at ``timesteps`` given the
    text embeddings. ``kwargs`` are the diffusers keyword arguments of typed extras (see
    :class:`streamrt.runtime.UNetExtras`; SDXL's pooled embeddings and size conditions travel as
    ``added_cond_kwargs``)."""
    return unet(sample, timesteps, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images in about [-1, 1] NCHW from unscaled latents."""
    return vae.decode(latents, return_dict=False)[0]


@dataclass(eq=False)
class StreamModels:
    """The components of a streaming pipeline, on one device in one dtype.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        vae: a diffusers ``AutoencoderKL`` or ``AutoencoderTiny`` (TAESD).
        text_encoder: a transformers ``CLIPTextModel``.
        tokenizer: the matching ``CLIPTokenizer``.
        scheduler: a diffusers ``LCMScheduler`` (its config gives the noise schedule and prediction type).
        identity (`dict`): what the weights are (files, LoRA set); engine and pipeline caches key on it.
        text_encoder_2, tokenizer_2: SDXL's second text encoder (a ``CLIPTextModelWithProjection``) and its
            tokenizer; None for SD1.x / SD2.x.

    The :class:`~streamrt.families.ModelFamily` comes from the UNet's config (:attr:`family`).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    identity: dict = field(default_factory=dict)
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    def __post_init__(self) -> None:
        for module in self.modules():
            module.requires_grad_(False).eval()
        self.family: ModelFamily = family_of_unet(self.unet.config)
        if (self.text_encoder_2 is not None) != (self.family.text_encoders == 2):
            raise ValueError(f"a {self.family} UNet takes {self.family.text_encoders} text encoder(s), "
                             f"got {1 + (self.text_encoder_2 is not None)}")
        self.prompt_encoder = PromptEncoder(self.tokenizer, self.text_encoder, tokenizer_2=self.tokenizer_2,
                                            text_encoder_2=self.text_encoder_2,
                                            hidden_state=self.family.hidden_state,
                                            zero_empty_negative=self.family.zero_empty_negative)

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules: UNet, VAE and the text encoder(s)."""
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    # What the stream needs to know about the models ----------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def is_tiny_vae(self) -> bool:
        return is_tiny_vae(self.vae)

    @property
    def vae_scale_factor(self) -> int:
        cfg = self.vae.config
        if self.is_tiny_vae:
            return 2 ** sum(1 for _ in cfg.encoder_block_out_channels[1:])
        return 2 ** (len(cfg.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    @property
    def embed_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text embedding the UNet takes (SDXL); 0 when it takes none."""
        return pooled_dim_of_unet(self.unet.config)

    @property
    def time_ids(self) -> int:
        """Size/crop conditions per UNet row (SDXL: 6); 0 when the UNet takes none."""
        return self.family.time_ids

    @property
    def text_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def weights_nbytes(self) -> int:
        """Bytes of the UNet, VAE and text encoder weights (walks the parameters: call it once, at load)."""
        return sum(p.numel() * p.element_size() for m in self.modules() for p in m.parameters())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StreamModels:
        """Move every module (in place) and return self."""
        for module in self.modules():
            module.to(device=device, dtype=dtype)
        self.prompt_encoder.clear()
        return self
