"""StreamRT's ComfyUI nodes: thin adapters between ComfyUI and the ``streamrt`` core."""

from __future__ import annotations

from .api import ComfyExtension, io
from .engines import BuildEngines, LoadEngines
from .loaders import LoadStreamPipeline, StreamLora, StreamPipelineFromModel
from .preview import StreamPreview
from .sampler import StreamSampler
from .settings import StreamCachedAttention, StreamSettingsNode, StreamSimilarityFilter

NODES: list[type[io.ComfyNode]] = [StreamPipelineFromModel, LoadStreamPipeline, StreamLora, StreamSampler,
                                   StreamPreview, StreamSettingsNode, StreamSimilarityFilter, StreamCachedAttention,
                                   BuildEngines, LoadEngines]


class StreamRTExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> StreamRTExtension:
    """ComfyUI's entry point for V3 node packs."""
    return StreamRTExtension()
