"""Load Stream Pipeline and StreamRT LoRA: pick models the user has and get a STREAMRT_PIPELINE handle."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from ..streamrt.loading import PREDICTION_TYPES, ModelLoadError, PipelineSpec, load_ldm_weights, resolve_dtype
from ..streamrt.lora import LoraSpec
from ..streamrt.models import StreamModels
from ..streamrt.parallel import parse_devices
from . import api
from .api import io
from .runtime import PipelineHandle, report_memory, workflow_id

logger = logging.getLogger(__name__)

NO_TAESD = "none (full VAE)"


def device_options() -> list[str]:
    """The loader's device choices: auto, cpu, cuda and, with several GPUs, each one by index."""
    return ["auto", "cpu", "cuda", *parse_devices("all")]


def resolve_model(name: str) -> str:
    """A diffusers folder (models/diffusers) or a single-file checkpoint (models/checkpoints)."""
    try:
        return api.resolve_diffusers_folder(name)
    except FileNotFoundError:
        pass
    path = api.resolve_checkpoint(name)
    if path is None:
        raise ModelLoadError(f"model {name!r} was not found: it is neither a diffusers folder under "
                             "models/diffusers nor a checkpoint file under models/checkpoints")
    return path


def resolve_taesd(name: str) -> str | tuple[str, str] | None:
    """None, ComfyUI's TAESD file pair, or an AutoencoderTiny folder (models/vae_approx)."""
    if name == NO_TAESD:
        return None
    pair = api.comfy_taesd_files(name)
    if pair is not None:
        return pair
    try:
        return api.resolve_taesd_folder(name)
    except FileNotFoundError:
        raise ModelLoadError(f"TAESD {name!r} was not found under models/vae_approx (neither "
                             f"{name}_encoder/{name}_decoder files nor an AutoencoderTiny folder)") from None


@functools.lru_cache(maxsize=1)
def _pipeline_schema(models: tuple[str, ...], taesds: tuple[str, ...]) -> io.Schema:
    """Load Stream Pipeline's schema offering these models and TAESDs."""
    return api.Schema(
        node_id="StreamRTLoadPipeline",
        display_name="Load Stream Pipeline (StreamRT)",
        category=api.CATEGORY,
        description="Loads a Stable Diffusion 1.x/2.x or SDXL (SDXL-turbo) model for realtime streaming, from a "
                    "diffusers folder or a single-file checkpoint, with optional TAESD / TAESDXL and LoRAs, without "
                    "network access. The "
                    "loaded models are cached (queuing again does not reload them) and ComfyUI's 'Free model "
                    "and node cache' releases them.",
        inputs=[
            io.Combo.Input("model", options=list(models),
                           tooltip="Diffusers folders from models/diffusers (listed by folder name) and "
                                   "single-file SD1.x/SD2.x/SDXL checkpoints from models/checkpoints (listed with "
                                   "their .safetensors/.ckpt extension)."),
            io.Combo.Input("taesd", options=list(taesds), default=NO_TAESD,
                           tooltip="Tiny autoencoder from models/vae_approx: 'taesd' (SD1.x/SD2.x) and 'taesdxl' "
                                   "(SDXL) are ComfyUI's <name>_encoder/<name>_decoder pairs, other entries are "
                                   "diffusers AutoencoderTiny folders. Much faster encode and decode than the full "
                                   "VAE, at a small cost in quality; it must match the model's family."),
            io.Combo.Input("dtype", options=["auto", "fp16", "bf16", "fp32"], default="auto",
                           tooltip="Weight precision. auto = fp16 on a GPU, fp32 on the CPU."),
            io.Combo.Input("device", options=device_options(), default="auto",
                           tooltip="auto = the device ComfyUI computes on; cuda:N = that GPU (several pipelines "
                                   "can live on several GPUs of one ComfyUI)."),
            io.Combo.Input("prediction_type", options=list(PREDICTION_TYPES), default="auto", optional=True,
                           tooltip="What the model predicts. auto: a diffusers folder's scheduler config; for "
                                   "checkpoints epsilon for SD1.x, SDXL and SD2.x 512 models such as sd-turbo "
                                   "(file name containing 'turbo'), v_prediction for SD2.x 768 models. Set it "
                                   "when a checkpoint gives washed-out or noisy frames."),
            api.LORAS.Input("loras", optional=True,
                            tooltip="LoRAs to fuse into the weights at load time (from StreamRT LoRA nodes), "
                                    "e.g. LCM-LoRA for a model that is not LCM-distilled."),
        ],
        outputs=[api.PIPELINE.Output(display_name="pipeline", tooltip="The streaming pipeline.")],
        hidden=[io.Hidden.unique_id, io.Hidden.extra_pnginfo],
    )


class LoadStreamPipeline(io.ComfyNode):
    """Load UNet, VAE or TAESD, CLIP text encoder and tokenizer for streaming, offline."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        # ComfyUI asks for the schema at every validation: the listings are cached lookups (a few stat calls, as
        # ComfyUI's own model lists), and the schema is built again only when a listing changed.
        return _pipeline_schema(tuple(api.diffusers_folders() + api.checkpoint_files()),
                                tuple([NO_TAESD] + api.comfy_taesd_names() + api.taesd_folders()))

    @classmethod
    def execute(cls, model: str, taesd: str, dtype: str, device: str, prediction_type: str = "auto",
                loras: tuple[LoraSpec, ...] | None = None) -> io.NodeOutput:
        path = resolve_model(model)
        handle = PipelineHandle.for_spec(PipelineSpec(
            model=path, taesd=resolve_taesd(taesd), loras=tuple(loras or ()), dtype=dtype,
            device=str(api.torch_device()) if device == "auto" else device, prediction_type=prediction_type,
            tokenizer_dir=api.clip_tokenizer_dir()))
        # Load now, so a broken model fails on this node; this node holds it until it loads another one.
        handle.models(holder=(workflow_id(cls.hidden.extra_pnginfo), cls.hidden.unique_id))
        report_memory()
        return io.NodeOutput(handle)


class StreamLora(io.ComfyNode):
    """Add one LoRA to a list that Load Stream Pipeline fuses at load time."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return api.Schema(
            node_id="StreamRTLora",
            display_name="StreamRT LoRA",
            category=api.CATEGORY,
            description="Adds a LoRA (kohya/ComfyUI or diffusers format, e.g. LCM-LoRA) to the list fused into the "
                        "pipeline's weights when Load Stream Pipeline loads it. Chain several through 'loras'. "
                        "Fused weights cost nothing per frame; changing the list or a strength reloads the model.",
            inputs=[
                io.Combo.Input("lora_name", options=api.lora_files(), tooltip="A LoRA file from models/loras."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength on the UNet. 0 leaves the UNet unchanged."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength on the text encoder (CLIP). 0 leaves it unchanged."),
                api.LORAS.Input("loras", optional=True,
                                tooltip="LoRAs from an earlier StreamRT LoRA node; this one is added after them."),
            ],
            outputs=[api.LORAS.Output(display_name="loras",
                                      tooltip="The LoRA list, for Load Stream Pipeline or another StreamRT LoRA.")],
        )

    @classmethod
    def execute(cls, lora_name: str, strength_model: float, strength_clip: float,
                loras: tuple[LoraSpec, ...] | None = None) -> io.NodeOutput:
        path = api.resolve_lora(lora_name)
        if path is None:
            raise ModelLoadError(f"LoRA {lora_name!r} was not found under models/loras")
        return io.NodeOutput(tuple(loras or ()) + (LoraSpec(path, float(strength_model), float(strength_clip)),))


@dataclass(frozen=True, eq=False)
class HostModelSpec:
    """How to build a pipeline from ComfyUI's MODEL / CLIP / VAE (what a PipelineHandle's ``spec`` is for it)."""

    model: Any
    clip: Any
    vae: Any
    dtype: str
    device: str

    def load(self) -> StreamModels:
        device = api.torch_device() if self.device == "auto" else self.device
        dtype = resolve_dtype(self.dtype, device)
        weights = api.host_weights(self.model, self.clip, self.vae, device, dtype)
        models = load_ldm_weights(weights, tokenizer_dir=api.clip_tokenizer_dir(), dtype=dtype, device=device,
                                  identity={"name": "comfyui-model"})
        del weights
        api.unload_from_gpu(self.model, self.clip.patcher, self.vae.patcher)
        return models


class StreamPipelineFromModel(io.ComfyNode):
    """Make a stream pipeline from ComfyUI's own MODEL, CLIP and VAE (Load Checkpoint, after LoRA loaders)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return api.Schema(
            node_id="StreamRTPipelineFromModel",
            display_name="Stream Pipeline from Model (StreamRT)",
            category=api.CATEGORY,
            description="Realtime StreamDiffusion streaming from the models a graph already has: connect Load "
                        "Checkpoint's MODEL, CLIP and VAE, after any LoRA loaders (their patches are applied). A VAE "
                        "from Load VAE 'taesd' gives the fast tiny autoencoder. The weights are converted once, on "
                        "ComfyUI's device, and kept until the inputs change or ComfyUI frees memory; ComfyUI's own "
                        "copy goes back to its offload device (it reloads it if a ComfyUI sampler needs it). "
                        "SD1.x/SD2.x and SDXL models.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x/SD2.x/SDXL MODEL (Load Checkpoint, LoRA loaders, "
                                                "ModelSamplingDiscrete for v-prediction)."),
                io.Clip.Input("clip", tooltip="Its CLIP (CLIP Set Last Layer is honoured for SD1.x/SD2.x; SDXL "
                                              "uses the penultimate layer, its default)."),
                io.Vae.Input("vae", tooltip="Its VAE, or Load VAE 'taesd' / 'taesdxl' (the <name>_encoder/_decoder "
                                            "pair in models/vae_approx) for a much faster encode and decode."),
                io.Combo.Input("dtype", options=["auto", "fp16", "bf16", "fp32"], default="auto",
                               tooltip="Precision of the stream's weights. auto = fp16 on a GPU, fp32 on the CPU."),
            ],
            outputs=[api.PIPELINE.Output(display_name="pipeline", tooltip="The streaming pipeline.")],
            hidden=[io.Hidden.unique_id, io.Hidden.extra_pnginfo],
        )

    @classmethod
    def execute(cls, model, clip, vae, dtype: str) -> io.NodeOutput:
        ignored = api.unapplied_patches(model)
        if ignored:
            logger.warning("Stream Pipeline from Model: the MODEL carries %s, which the stream does not run (weight "
                           "patches such as LoRAs are applied)", ", ".join(ignored))
        spec = HostModelSpec(model, clip, vae, dtype, "auto")
        key = api.host_weights_key(model, clip, vae) + (dtype, str(api.torch_device()))
        handle = PipelineHandle(spec, key)
        handle.models(holder=(workflow_id(cls.hidden.extra_pnginfo), cls.hidden.unique_id))
        report_memory()
        return io.NodeOutput(handle)
