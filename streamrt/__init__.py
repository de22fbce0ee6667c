"""StreamRT core: StreamDiffusion-style realtime streaming over pre-allocated state.

Imports without ComfyUI (torch, diffusers, transformers, safetensors, numpy only). The ComfyUI
nodes in the pack's ``nodes/`` folder are thin adapters around this package.
"""

from .config import CfgType, SimilarityFilterConfig, StreamConfig
from .frames import FrameError, as_rgb_frames
from .loading import (ModelLoadError, PipelineSpec, load_checkpoint, load_diffusers_folder, load_pipeline,
                      load_taesd)
from .engines import EngineCache, EngineModels, attach_engines, build_engines, requests_for_stream
from .lora import LoraSpec
from .models import StreamModels
from .schedule import StreamSchedule, build_schedule, lcm_boundary_scalings
from .sessions import StreamRequest, StreamSessions
from .stream import Stream, StreamBuffers

__version__ = "0.1.0"

__all__ = [
    "CfgType", "FrameError", "ModelLoadError", "SimilarityFilterConfig", "Stream", "StreamBuffers",
    "StreamConfig", "StreamModels", "StreamRequest", "StreamSchedule", "StreamSessions", "as_rgb_frames", "build_schedule",
    "lcm_boundary_scalings", "load_diffusers_folder", "__version__", "LoraSpec", "PipelineSpec",
    "load_checkpoint", "load_pipeline", "load_taesd", "EngineCache", "EngineModels", "attach_engines",
    "build_engines", "requests_for_stream",
]
