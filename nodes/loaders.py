"""Load Stream Pipeline: pick a model the user has and get a STREAMRT_PIPELINE handle."""

from __future__ import annotations

from . import api
from .api import io
from .runtime import PipelineHandle

NO_TAESD = "none (full VAE)"


class LoadStreamPipeline(io.ComfyNode):
    """Load UNet, VAE or TAESD, CLIP text encoder and tokenizer for streaming, offline."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamRTLoadPipeline",
            display_name="Load Stream Pipeline (StreamRT)",
            category=api.CATEGORY,
            description="Loads a Stable Diffusion 1.x/2.x model for realtime streaming. The loaded models "
                        "are cached: queuing again does not reload them, and ComfyUI's 'Free model and "
                        "node cache' releases them.",
            inputs=[
                io.Combo.Input("model", options=api.diffusers_folders(),
                               tooltip="A diffusers model folder (with model_index.json) under models/diffusers."),
                io.Combo.Input("taesd", options=[NO_TAESD] + api.taesd_folders(), default=NO_TAESD,
                               tooltip="Tiny autoencoder (TAESD) from models/vae_approx: much faster encode and "
                                       "decode than the full VAE, at a small cost in quality."),
                io.Combo.Input("dtype", options=["auto", "fp16", "bf16", "fp32"], default="auto",
                               tooltip="Weight precision. auto = fp16 on a GPU, fp32 on the CPU."),
                io.Combo.Input("device", options=["auto", "cpu", "cuda"], default="auto",
                               tooltip="auto = the device ComfyUI computes on."),
            ],
            outputs=[api.PIPELINE.Output(display_name="pipeline", tooltip="The streaming pipeline.")],
        )

    @classmethod
    def execute(cls, model: str, taesd: str, dtype: str, device: str) -> io.NodeOutput:
        handle = PipelineHandle(
            model_path=api.resolve_diffusers_folder(model),
            taesd_path=None if taesd == NO_TAESD else api.resolve_taesd_folder(taesd),
            dtype=dtype,
            device=str(api.torch_device()) if device == "auto" else device,
        )
        handle.models()  # load now, so a broken model fails on this node
        return io.NodeOutput(handle)
