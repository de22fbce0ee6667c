"""StreamRT's ComfyUI nodes: thin adapters between ComfyUI and the ``streamrt`` core."""

from __future__ import annotations

from .api import ComfyExtension, io, register_frame_routes, schema_built_once
from .engines import BuildEngines, LoadEngines
from .frame_input import StreamFrameInput
from .loaders import LoadStreamPipeline, StreamLora, StreamPipelineFromModel
from .preview import StreamPreview
from .runtime import FRAMES
from .sampler import StreamSampler
from .settings import StreamCachedAttention, StreamDevices, StreamSettingsNode, StreamSimilarityFilter

NODES: list[type[io.ComfyNode]] = [StreamPipelineFromModel, LoadStreamPipeline, StreamLora, StreamSampler,
                                   StreamFrameInput, StreamPreview, StreamSettingsNode, StreamSimilarityFilter,
                                   StreamCachedAttention, StreamDevices, BuildEngines, LoadEngines]

# Schemas that depend on nothing but the code are built once (ComfyUI asks for them several times per execution);
# the loaders' schemas list model folders and are rebuilt when a listing changes (nodes/loaders.py).
for _node in (StreamPipelineFromModel, StreamSampler, StreamFrameInput, StreamPreview, StreamSettingsNode,
              StreamSimilarityFilter, StreamCachedAttention, StreamDevices, BuildEngines, LoadEngines):
    schema_built_once(_node)

# the routes Stream Frame Input's frames arrive by (POST /streamrt/frames/<source>), added before ComfyUI serves
register_frame_routes(FRAMES)


class StreamRTExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> StreamRTExtension:
    """ComfyUI's entry point for V3 node packs."""
    return StreamRTExtension()
