"""Stream Frame Input: the newest frame posted to the server (the browser's camera on this node, or any program),
kept in memory: no file per frame, nothing hashed, decoded once."""

from __future__ import annotations

import math

from ..streamrt.frames import resize_frames
from . import api
from .api import io
from .runtime import FRAMES, workflow_id

#: the node's title; node search (fuzzy, a match starting within the first 30 characters) finds it by these words
DISPLAY_NAME = "Stream Frame Input (webcam, StreamRT)"


class StreamFrameInput(api.AlwaysExecutes):
    """The newest frame of a source of the pack's frame inbox (``streamrt.frame_inbox``), as an IMAGE."""

    #: (workflow, node, source) -> the number of the frame that node gave last (what "new" means for it); the
    #: least recently used half goes when it holds LAST_GIVEN_MAX (a node forgotten there waits for one new frame)
    last_given: dict[tuple, int] = {}
    LAST_GIVEN_MAX = 1024

    @classmethod
    def define_schema(cls) -> io.Schema:
        return api.Schema(
            node_id="StreamRTFrameInput",
            display_name=DISPLAY_NAME,
            category=api.CATEGORY,
            description=(
                "A live frame for a realtime graph, without a file per frame: the camera on this node (● Camera) "
                "captures in the browser and posts its frames to the server, where the newest one is kept in "
                "memory under the source name. Any program can post too: POST a JPEG, PNG or WebP (or raw RGB / "
                "RGBA pixels as application/octet-stream with ?width=&height=) to /streamrt/frames/<source>. "
                "Each execution gives the newest frame (IMAGE, batch of one)."),
            inputs=[
                io.String.Input("source", default="webcam",
                                tooltip="The name frames are posted under (letters, digits, _ . -). The camera on "
                                        "this node posts under it; other programs post to /streamrt/frames/<source>."),
                io.Int.Input("width", default=512, min=0, max=4096, step=8,
                             tooltip="Frame width: the camera captures at this size (center crop), and frames "
                                     "posted at another size are resized to it. 0 = as posted (with height set: "
                                     "the posted frame's aspect)."),
                io.Int.Input("height", default=512, min=0, max=4096, step=8,
                             tooltip="Frame height, as width. 0 = as posted (with width set: the posted frame's "
                                     "aspect)."),
                io.Boolean.Input("wait_for_new", default=True,
                                 tooltip="Wait for a frame newer than the one this node gave last time, so the "
                                         "stream runs at the camera's rate instead of repeating frames. After the "
                                         "timeout the newest frame is given again."),
                io.Float.Input("timeout", default=5.0, min=0.0, max=60.0, step=0.5,
                               tooltip="Seconds to wait for a frame (a new one, or the first). A source that has no "
                                       "frame after this is an error."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The newest frame [1, H, W, 3].")],
            hidden=[io.Hidden.unique_id, io.Hidden.extra_pnginfo],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, source: str, width: int, height: int, wait_for_new: bool, timeout: float) -> io.NodeOutput:
        if not math.isfinite(timeout):  # a JSON NaN passes ComfyUI's min/max check
            raise ValueError(f"timeout must be a finite number of seconds, got {timeout!r}")
        key = (workflow_id(cls.hidden.extra_pnginfo), cls.hidden.unique_id, source)
        taken = FRAMES.take(source, newer_than=cls.last_given.get(key, 0) if wait_for_new else 0,
                            timeout=timeout, interrupted=api.check_interrupted)
        if taken is None:
            raise ValueError(
                f"no frame has been posted to source {source!r} (waited {timeout:g} s): start the camera on a Stream "
                f"Frame Input node with this source (● Camera; allow the camera in the browser), or POST frames to "
                f"{api.FRAMES_ROUTE}/{source}")
        frame, image = taken
        cls.last_given.pop(key, None)  # re-inserted last: the dict's order is the order of use
        cls.last_given[key] = frame.sequence
        if len(cls.last_given) > cls.LAST_GIVEN_MAX:
            for old in list(cls.last_given)[: cls.LAST_GIVEN_MAX // 2]:
                del cls.last_given[old]
        if width > 0 or height > 0:
            if width == 0 or height == 0:  # one side given: keep the aspect
                scale = width / frame.width if width > 0 else height / frame.height
                width, height = max(1, round(frame.width * scale)), max(1, round(frame.height * scale))
            image = resize_frames(image, width, height)  # still recorded as finite (streamrt.frames.mark_finite)
        return io.NodeOutput(image)

