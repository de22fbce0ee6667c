"""Stream Preview: the newest frame shown on the node in the browser, sent over the websocket, no file written."""

from __future__ import annotations

import torch

from . import api
from .api import io


class StreamPreview(io.ComfyNode):
    """The stream view: each execution's newest frame as the node's preview (ComfyUI's progress preview)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return api.Schema(
            node_id="StreamRTPreview",
            display_name="Stream Preview (StreamRT)",
            category=api.CATEGORY,
            description=(
                "Shows the newest frame of each execution on this node, sent to the browser over the websocket "
                "the way ComfyUI shows a sampler's live previews. Nothing is written to disk (Preview Image writes "
                "a PNG per execution into the temp folder), so a stream can run for hours. To keep frames, "
                "connect a Save Image node as well."),
            inputs=[
                io.Image.Input("images", tooltip="The frames to show (of a batch, the last one)."),
                io.Int.Input("max_size", default=0, min=0, max=8192, step=8,
                             tooltip="Longest side of the preview in pixels; larger frames are scaled down before "
                                     "they are sent. 0 = the frame's own size."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images: torch.Tensor, max_size: int) -> io.NodeOutput:
        api.send_preview(images[-1], cls.hidden.unique_id, max_size)
        return io.NodeOutput()
