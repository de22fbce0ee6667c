"""StreamRT core: StreamDiffusion-style realtime streaming over pre-allocated state.

Imports without ComfyUI (torch, diffusers, transformers, safetensors, numpy only). The ComfyUI
nodes in the pack's ``nodes/`` folder are thin adapters around this package.
"""

from .buffers import StreamBuffers
from .config import Acceleration, CfgType, SimilarityFilterConfig, StreamConfig
from .engines import CachedEngines, EngineCache, attach_engines, build_engines, requests_for_stream
from .frames import FrameError, as_rgb_frames
from .loading import ModelLoadError, PipelineSpec, load_checkpoint, load_diffusers_folder, load_pipeline, load_taesd
from .lora import LoraSpec
from .models import StreamModels
from .runtime import AccelerationUnavailable, Runtime, UNetExtras, prepare
from .schedule import StreamSchedule, build_schedule, lcm_boundary_scalings, strength_t_index_list
from .sessions import StreamRequest, StreamSessions
from .settings import StreamSettings
from .stream import Stream

__version__ = "0.1.0"

__all__ = [
    "Acceleration", "AccelerationUnavailable", "CachedEngines", "CfgType", "EngineCache", "FrameError", "LoraSpec",
    "ModelLoadError", "PipelineSpec", "Runtime", "SimilarityFilterConfig", "Stream", "StreamBuffers", "StreamConfig",
    "StreamModels", "StreamRequest", "StreamSchedule", "StreamSessions", "StreamSettings", "UNetExtras", "__version__",
    "as_rgb_frames", "attach_engines", "build_engines", "build_schedule", "lcm_boundary_scalings", "load_checkpoint",
    "load_diffusers_folder", "load_pipeline", "load_taesd", "prepare", "requests_for_stream", "strength_t_index_list",
]
