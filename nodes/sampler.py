"""Stream Sampler: advance a persistent stream with this execution's frames (or txt2img)."""

from __future__ import annotations

import logging
import time

import torch

from ..streamrt import Acceleration, CfgType, SimilarityFilterConfig, StreamConfig, StreamRequest
from ..streamrt.kv_cache import KVCacheConfig
from . import api
from .api import io
from .engines import engine_source
from .runtime import SESSIONS, PipelineHandle, report_memory, workflow_id

logger = logging.getLogger(__name__)


def parse_t_index_list(text: str) -> tuple[int, ...]:
    """``"32, 45"`` -> ``(32, 45)``, with an error that says what is wrong."""
    try:
        values = tuple(int(part) for part in text.replace(";", ",").split(",") if part.strip())
    except ValueError:
        raise ValueError(f"t_index_list must be comma-separated integers such as '32,45', got {text!r}") from None
    if not values:
        raise ValueError("t_index_list is empty: give at least one index, such as '32,45'")
    return values


class StreamSampler(io.ComfyNode):
    """The stateful realtime sampler."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StreamRTSampler",
            display_name="Stream Sampler (StreamRT)",
            category=api.CATEGORY,
            description=(
                "Runs a StreamDiffusion-style stream whose state (latent buffer, noise, RCFG stock noise) "
                "persists across queue executions. One frame per execution (e.g. a webcam) gives a coherent "
                "stream, len(t_index_list)-1 frames behind the input. A batch of more frames than frames_per_step "
                "(a video) is processed in one execution and returned aligned with the input frames. "
                "Without an image it runs txt2img. Each sampler node keeps its own stream."),
            inputs=[
                api.PIPELINE.Input("pipeline", tooltip="From Load Stream Pipeline."),
                io.Image.Input("image", optional=True,
                               tooltip="Input frame(s). Leave unconnected for txt2img."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="Prompt. Changing it re-encodes once; an unchanged prompt is never "
                                        "re-encoded."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt, used by cfg_type full and initialize."),
                io.String.Input("t_index_list", default="32,45",
                                tooltip="Denoising steps as indices into the LCM schedule, noisiest first. "
                                        "Lower indices change the image more. One index per step in flight."),
                io.Int.Input("num_inference_steps", default=50, min=1, max=1000,
                             tooltip="Length of the LCM schedule that t_index_list indexes."),
                io.Combo.Input("cfg_type", options=[c.value for c in CfgType], default=CfgType.SELF.value,
                               tooltip="none: no guidance. full: classic CFG (2x UNet batch). self: residual CFG "
                                       "(no extra UNet rows). initialize: RCFG seeded by negative-prompt rows."),
                io.Float.Input("guidance_scale", default=1.2, min=0.0, max=20.0, step=0.05,
                               tooltip="Guidance strength; guidance is off at 1.0 or below."),
                io.Float.Input("delta", default=1.0, min=0.0, max=5.0, step=0.05,
                               tooltip="RCFG strength of the virtual negative (cfg_type self/initialize)."),
                io.Int.Input("seed", default=2, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the stream's fixed noise. Keep it fixed for a stable stream."),
                io.Int.Input("frames_per_step", default=1, min=1, max=16,
                             tooltip="Frames processed together per stream step (F). A batch must be a multiple."),
                io.Int.Input("width", default=0, min=0, max=4096, step=8,
                             tooltip="Stream width; 0 = the input's width (512 for txt2img)."),
                io.Int.Input("height", default=0, min=0, max=4096, step=8,
                             tooltip="Stream height; 0 = the input's height (512 for txt2img)."),
                io.Boolean.Input("add_noise", default=True,
                                 tooltip="Re-noise the latents carried to the next step (StreamDiffusion default)."),
                io.Boolean.Input("similarity_filter", default=False,
                                 tooltip="Skip frames nearly identical to the last processed one (saves GPU time "
                                         "on static scenes; the previous output is repeated)."),
                io.Float.Input("similarity_threshold", default=0.98, min=0.5, max=0.9999, step=0.001,
                               tooltip="Cosine similarity above which frames may be skipped."),
                io.Int.Input("similarity_max_skip", default=10, min=0, max=1000,
                             tooltip="Never skip more than this many frames in a row."),
                io.Combo.Input("acceleration", options=[a.value for a in Acceleration], default=Acceleration.AUTO.value,
                               tooltip="auto: the fastest path ready here (TensorRT engines built for this shape, "
                                       "else cuda_graph on an NVIDIA GPU, else eager); the node shows what runs. "
                                       "eager: plain PyTorch. cuda_graph: the whole frame captured once and "
                                       "replayed. compile: torch.compile + CUDA graph (fastest torch path; the "
                                       "first run compiles for a minute or more, cached on disk). tensorrt: engines "
                                       "from Build Engines (an error when none fits)."),
                io.Boolean.Input("cached_attention", default=False,
                                 tooltip="Temporal consistency for video: each self-attention layer also attends "
                                         "to earlier frames' keys/values (StreamV2V). Costs memory and some speed."),
                io.Int.Input("cache_max_frames", default=4, min=1, max=16,
                             tooltip="Frames the attention cache holds (allocated once; changing it rebuilds)."),
                io.Int.Input("cache_window", default=4, min=1, max=16,
                             tooltip="How many of the most recent cached frames are attended (<= max frames; "
                                     "changes live, no rebuild)."),
                io.Int.Input("cache_interval", default=1, min=1, max=64,
                             tooltip="Store this frame's keys/values every N frames."),
                io.Boolean.Input("reset", default=False,
                                 tooltip="Clear the stream state before this execution (buffer, stock noise, "
                                         "frame counter). Turn off again to keep streaming."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="Output frame(s), same count as the input.")],
            hidden=[io.Hidden.unique_id, io.Hidden.extra_pnginfo],
            not_idempotent=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> float:
        # A stream advances on every execution: never reuse a cached output.
        return float("nan")

    @classmethod
    def execute(cls, pipeline: PipelineHandle, prompt: str, negative_prompt: str, t_index_list: str,
                num_inference_steps: int, cfg_type: str, guidance_scale: float, delta: float, seed: int,
                frames_per_step: int, width: int, height: int, add_noise: bool, similarity_filter: bool,
                similarity_threshold: float, similarity_max_skip: int, acceleration: str, cached_attention: bool,
                cache_max_frames: int, cache_window: int, cache_interval: int, reset: bool,
                image: torch.Tensor | None = None) -> io.NodeOutput:
        if image is not None and image.dim() == 4:
            height = height or int(image.shape[1])
            width = width or int(image.shape[2])
        config = StreamConfig(
            width=width or 512, height=height or 512, t_index_list=parse_t_index_list(t_index_list),
            num_inference_steps=num_inference_steps, frames_per_step=frames_per_step, cfg_type=cfg_type,
            guidance_scale=guidance_scale, delta=delta, do_add_noise=add_noise, seed=seed,
            similarity_filter=SimilarityFilterConfig(similarity_filter, similarity_threshold, similarity_max_skip),
            kv_cache=KVCacheConfig(cached_attention, cache_max_frames, min(cache_window, cache_max_frames),
                                   cache_interval),
            acceleration=acceleration,
        )
        node_id = cls.hidden.unique_id
        owner = (workflow_id(cls.hidden.extra_pnginfo), node_id)
        models = pipeline.models()
        fresh = SESSIONS.frames_processed(owner) == 0
        api.check_interrupted()
        start = time.perf_counter()
        request = StreamRequest(config, prompt, negative_prompt, reset=reset, engines=engine_source(pipeline))
        video = image is not None and image.dim() == 4 and image.shape[0] > frames_per_step
        progress = api.Progress(int(image.shape[0]), node_id) if video else None
        stream, frames = SESSIONS.run(owner, models, request, image, progress=progress)
        seconds = time.perf_counter() - start
        count = int(frames.shape[0])
        runtime = stream.runtime
        api.send_status({
            "node": node_id, "workflow": owner[0], "frames": count, "seconds": seconds,
            "ms_per_frame": 1000.0 * seconds / count,
            "fps": count / seconds if seconds > 0 else None, "stream_frames": stream.frames_processed,
            "backend": runtime.describe(), "acceleration": runtime.acceleration.value, "parts": runtime.parts,
            "notes": list(runtime.notes), "device": str(stream.device),
            "state": "reset" if reset else (
                "warming" if fresh or stream.frames_processed <= stream.latency * frames_per_step else "streaming"),
        })
        logger.debug("stream %s: %d frame(s) in %.1f ms (%s)", node_id, count, 1000 * seconds, runtime.describe())
        report_memory()
        return io.NodeOutput(frames)
