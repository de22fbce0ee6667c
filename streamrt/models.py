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


def vae_dtype(vae: Any, dtype: torch.dtype, family: ModelFamily) -> torch.dtype:
    """The dtype a pipeline's VAE runs in: float32 when the pipeline is float16, the VAE a full ``AutoencoderKL``
    whose config asks for ``force_upcast`` and the family honours that (:attr:`ModelFamily.vae_force_upcast`:
    SDXL, whose VAE overflows to inf/NaN in float16, as diffusers' SDXL pipelines upcast it); else ``dtype``.

    The fp16-fix VAE (``madebyollin/sdxl-vae-fp16-fix``, ``force_upcast`` false) is the fast alternative: it
    was fine-tuned to stay in float16 range and runs in float16. TAESD (``taesdxl``) always runs in ``dtype``.
    bfloat16 has float32's range, so a bf16 pipeline keeps its VAE in bf16.
    """
    if (dtype == torch.float16 and family.vae_force_upcast and not is_tiny_vae(vae)
            and bool(vae.config.get("force_upcast", False))):
        return torch.float32
    return dtype


def _module_dtype(vae: torch.nn.Module) -> torch.dtype:
    # the encoder's first convolution's dtype, by attribute: called per frame on the eager path, where a parameter
    # walk (even next(parameters())) is per-execution work the node overhead checks forbid, and diffusers'
    # ModelMixin.dtype walks every submodule
    encoder = vae.encoder
    first = encoder.conv_in if hasattr(encoder, "conv_in") else encoder.layers[0]
    return first.weight.dtype


def encode_images(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Unscaled latents of images in [-1, 1] NCHW: the VAE call in the stream's conventions.

    A full VAE gives its mean (deterministic, no sampling). The images are cast to the VAE's dtype and the
    latents back to the images' dtype, so a VAE kept in float32 in a float16 pipeline (:func:`vae_dtype`:
    SDXL's, whose activations overflow float16) is transparent to its callers; the casts are no-ops when the
    dtypes agree, and inside a captured step they are captured with it. Every runner of the VAE (eager,
    compiled, exported for an engine) goes through this function, so they cannot disagree.
    """
    x = images.to(_module_dtype(vae))
    if is_tiny_vae(vae):
        latents = vae.encode(x, return_dict=False)[0]
    else:
        latents = vae.encode(x, return_dict=False)[0].mode()
    return latents.to(images.dtype)


def predict_noise(unet: Any, sample: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                  **kwargs: Any) -> torch.Tensor:
    """One UNet call in the stream's conventions: the prediction for ``sample`` at ``timesteps`` given the
    text embeddings. ``kwargs`` are the diffusers keyword arguments of typed extras (see
    :class:`streamrt.runtime.UNetExtras`; SDXL's pooled embeddings and size conditions travel as
    ``added_cond_kwargs``)."""
    return unet(sample, timesteps, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images in about [-1, 1] NCHW from unscaled latents, in the latents' dtype (the VAE runs in its own: see
    :func:`encode_images` and :func:`vae_dtype`; the fp16-fix SDXL VAE is the fast alternative to an upcast
    one)."""
    return vae.decode(latents.to(_module_dtype(vae)), return_dict=False)[0].to(latents.dtype)


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
        """Move every module (in place) and return self. The VAE takes :func:`vae_dtype` of ``dtype`` (float32
        for SDXL's VAE when ``dtype`` is float16)."""
        for module in self.modules():
            as_dtype = vae_dtype(module, dtype, self.family) if module is self.vae and dtype is not None else dtype
            module.to(device=device, dtype=as_dtype)
        self.prompt_encoder.clear()
        return self
