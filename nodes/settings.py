"""Settings nodes: the stream options beyond the sampler's own inputs, as a chain of small nodes.

Each node takes an optional STREAMRT_SETTINGS (from the node before it), applies its own fields over it and
hands on a new :class:`~streamrt.StreamSettings` (immutable), which the sampler's ``settings`` input takes.
"""

from __future__ import annotations

from ..streamrt import Acceleration, CfgType, SimilarityFilterConfig, StreamSettings
from ..streamrt.kv_cache import KVCacheConfig
from ..streamrt.parallel import parse_devices
from . import api
from .api import io

SETTINGS_CATEGORY = f"{api.CATEGORY}/settings"


def chain_input() -> io.Input:
    """The optional settings input every settings node has, to chain them."""
    return api.SETTINGS.Input("settings", optional=True,
                              tooltip="Settings from another StreamRT settings node; this node's fields replace "
                                      "theirs, the rest is kept.")


def chain_output() -> io.Output:
    return api.SETTINGS.Output(display_name="settings",
                               tooltip="To the sampler's settings input (or another settings node).")


def apply(settings: StreamSettings | None, **fields) -> io.NodeOutput:
    """The node's fields over the chained settings (or over the defaults)."""
    return io.NodeOutput((settings if settings is not None else StreamSettings()).with_(**fields))


class StreamSettingsNode(io.ComfyNode):
    """How the stream runs: guidance mode, size, frames per step, schedule, acceleration."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return api.Schema(
            node_id="StreamRTSettings",
            display_name="Stream Settings (StreamRT)",
            category=SETTINGS_CATEGORY,
            description="Stream options for the realtime sampler: cfg type, RCFG delta, frames per step, size (the "
                        "input is resized to it), schedule length and acceleration (auto / eager / cuda_graph / "
                        "compile / TensorRT engines). Connect the same node to Build Engines to build engines for "
                        "this stream. Changing cfg_type, size, frames per step, schedule or acceleration rebuilds "
                        "the stream; delta changes live.",
            inputs=[
                chain_input(),
                io.Combo.Input("cfg_type", options=[c.value for c in CfgType], default=CfgType.SELF.value,
                               tooltip="none: no guidance. full: classic CFG (2x UNet batch). self: residual CFG "
                                       "(no extra UNet rows). initialize: RCFG seeded by negative-prompt rows."),
                io.Float.Input("delta", default=1.0, min=0.0, max=5.0, step=0.05,
                               tooltip="RCFG strength of the virtual negative (cfg_type self/initialize)."),
                io.Int.Input("frames_per_step", default=1, min=1, max=16,
                             tooltip="Frames processed together per stream step (F). A batch must be a multiple."),
                io.Boolean.Input("add_noise", default=True,
                                 tooltip="Re-noise the latents carried to the next step (StreamDiffusion default)."),
                io.Combo.Input("acceleration", options=[a.value for a in Acceleration], default=Acceleration.AUTO.value,
                               tooltip="auto: the fastest path ready here (TensorRT engines built for this shape, "
                                       "else cuda_graph on an NVIDIA GPU, else eager); the sampler shows what runs. "
                                       "eager: plain PyTorch. cuda_graph: the whole frame captured once and "
                                       "replayed. compile: torch.compile + CUDA graph (fastest torch path; the "
                                       "first run compiles for a minute or more, cached on disk). tensorrt: engines "
                                       "from Build Engines (an error when none fits)."),
                io.Int.Input("width", default=0, min=0, max=4096, step=8,
                             tooltip="Stream width: the input frames are resized to it (stretched, no crop). 0 = the "
                                     "input's width, which must then be a multiple of 8 (512 for txt2img)."),
                io.Int.Input("height", default=0, min=0, max=4096, step=8,
                             tooltip="Stream height: the input frames are resized to it (stretched, no crop). 0 = "
                                     "the input's height, which must then be a multiple of 8 (512 for txt2img)."),
                io.Int.Input("schedule_length", default=50, min=1, max=1000,
                             tooltip="Length of the LCM schedule (num_inference_steps) that steps/strength and "
                                     "t_index_list index."),
                io.Boolean.Input("fused_projections", default=True, optional=True,
                                 tooltip="Torch UNets project each self-attention layer's query, key and value "
                                         "with one matrix product over a fused copy of the three weights: faster "
                                         "(SDXL about 6 % per frame), for about 0.6 GB more GPU memory with SDXL "
                                         "(75 MB with SD1.5). Off saves the memory."),
                io.Boolean.Input("overlap_executions", default=False, optional=True,
                                 tooltip="Realtime (one frame per execution): each execution returns the frame of "
                                         "the execution before it and leaves its own GPU work running while "
                                         "ComfyUI finishes the graph and starts the next execution. More "
                                         "executions per second when ComfyUI's own time per execution is close to "
                                         "the GPU's, for one execution more latency; the first frame comes twice. "
                                         "Videos (a batch) and the similarity filter run as without it."),
            ],
            outputs=[chain_output()],
        )

    @classmethod
    def execute(cls, cfg_type: str, delta: float, frames_per_step: int, add_noise: bool, acceleration: str,
                width: int, height: int, schedule_length: int, settings: StreamSettings | None = None,
                fused_projections: bool = True, overlap_executions: bool = False) -> io.NodeOutput:
        return apply(settings, cfg_type=cfg_type, delta=delta, frames_per_step=frames_per_step, add_noise=add_noise,
                     acceleration=acceleration, width=width, height=height, schedule_length=schedule_length,
                     fused_projections=fused_projections, overlap_executions=overlap_executions)


class StreamSimilarityFilter(io.ComfyNode):
    """Turns on the similarity filter: skip frames nearly identical to the last processed one."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return api.Schema(
            node_id="StreamRTSimilarityFilter",
            display_name="Stream Similarity Filter (StreamRT)",
            category=SETTINGS_CATEGORY,
            description="Skip input frames nearly identical to the last processed one (saves GPU time on static "
                        "scenes; the previous output is repeated). Connecting this node turns the filter on; it "
                        "costs one host synchronisation per frame.",
            inputs=[
                chain_input(),
                io.Float.Input("threshold", default=0.98, min=0.5, max=0.9999, step=0.001,
                               tooltip="Cosine similarity above which frames may be skipped."),
                io.Int.Input("max_skip", default=10, min=0, max=1000,
                             tooltip="Never skip more than this many frames in a row."),
            ],
            outputs=[chain_output()],
        )

    @classmethod
    def execute(cls, threshold: float, max_skip: int, settings: StreamSettings | None = None) -> io.NodeOutput:
        return apply(settings, similarity_filter=SimilarityFilterConfig(True, threshold, max_skip))


class StreamCachedAttention(io.ComfyNode):
    """Turns on cached attention over earlier frames (StreamV2V) for temporal consistency."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return api.Schema(
            node_id="StreamRTCachedAttention",
            display_name="Stream Cached Attention (StreamRT)",
            category=SETTINGS_CATEGORY,
            description="Temporal consistency for video: each self-attention layer also attends to earlier frames' "
                        "keys/values (StreamV2V). Connecting this node turns it on; it costs memory and some speed. "
                        "Survives executions; reset and a seed change clear it.",
            inputs=[
                chain_input(),
                io.Int.Input("max_frames", default=4, min=1, max=16,
                             tooltip="Frames the attention cache holds (allocated once; changing it rebuilds)."),
                io.Int.Input("window", default=4, min=1, max=16,
                             tooltip="How many of the most recent cached frames are attended (<= max frames; "
                                     "changes live, no rebuild)."),
                io.Int.Input("interval", default=1, min=1, max=64,
                             tooltip="Store this frame's keys/values every N frames."),
            ],
            outputs=[chain_output()],
        )

    @classmethod
    def execute(cls, max_frames: int, window: int, interval: int, settings: StreamSettings | None = None
                ) -> io.NodeOutput:
        # The window cannot exceed the frames held: a larger one attends to all of them.
        return apply(settings, kv_cache=KVCacheConfig(True, max_frames, min(window, max_frames), interval))


class StreamDevices(io.ComfyNode):
    """Runs the stream on several GPUs: a batch video split into chunks (one stream per GPU), or one stream's
    denoising steps split over the GPUs (realtime frame rate)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return api.Schema(
            node_id="StreamRTDevices",
            display_name="Stream Devices, multi-GPU (StreamRT)",
            category=SETTINGS_CATEGORY,
            description="Several GPUs for one sampler, on copies of the pipeline (made once, kept with it). "
                        "split 'video': a video (an IMAGE batch of more frames than frames per step) is split into "
                        "one contiguous chunk per GPU, each run by a stream of its own, and stitched in order, aligned "
                        "as on one GPU; without cached attention and the similarity filter the frames equal one "
                        "GPU's (with them, frames near a chunk border may differ slightly); one frame per execution "
                        "runs on the pipeline's GPU. ControlNets are copied to each GPU too. "
                        "split 'steps': one stream whose denoising steps are shared out among the GPUs, which work "
                        "side by side and hand each frame on after its steps: for 2 or more steps, more frames per "
                        "second in realtime (and for videos) at the same latency; the frames equal one GPU's up to "
                        "fp16 rounding. ControlNets run on every GPU, each on its own steps.",
            inputs=[
                chain_input(),
                io.String.Input("devices", default="all",
                                tooltip="all: every CUDA GPU of this machine (nothing changes with one). Or a comma "
                                        "list: GPU indices ('0,1') or device names ('cuda:0, cuda:2')."),
                io.Combo.Input("split", options=["video", "steps"], default="video", optional=True,
                               tooltip="video: a batch video is cut into one chunk per GPU (realtime stays on one "
                                       "GPU). steps: the denoising steps of one stream are shared out among the "
                                       "GPUs (realtime frame rate with 2+ steps; videos run through it too)."),
            ],
            outputs=[chain_output()],
        )

    @classmethod
    def execute(cls, devices: str, split: str = "video", settings: StreamSettings | None = None) -> io.NodeOutput:
        if split not in ("video", "steps"):
            raise ValueError(f"split must be 'video' or 'steps', got {split!r}")
        chosen = parse_devices(devices)
        return apply(settings, video_devices=chosen if split == "video" else (),
                     step_devices=chosen if split == "steps" else ())
