"""Frames posted from outside a graph (a browser's camera, another program) and kept in memory for a stream.

A realtime graph that takes its frame from a file pays for it on every execution: the browser encodes a PNG,
uploads it, the server writes it, hashes it and decodes it (docs/DESIGN.md section 8). An inbox keeps the newest
frame posted under each *source* name as the bytes that arrived, and decodes it once, when a graph asks for it:
frames that arrive between two executions are replaced without ever being decoded.

Accepted: JPEG, PNG and WebP files, and raw 8-bit RGB or RGBA pixels (the browser's ``ImageData``) with their width
and height. Everything is checked when it is posted, from the header alone (format, size, byte count), so a bad
post is refused at once with a message naming the problem and the source keeps its last good frame.
"""

from __future__ import annotations

import dataclasses
import io
import re
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from .frames import mark_clamped, mark_finite

#: a source name: letters, digits, ``_ . -``, starting with a letter or digit (it is only ever a key, never a path)
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: the longest side a posted frame may have
MAX_SIDE = 4096
#: sources one inbox holds at once (each keeps one frame and its decoded copy); DELETE frees one
MAX_SOURCES = 16
#: encoded formats, by the name PIL gives them
ENCODED_FORMATS = ("JPEG", "PNG", "WEBP")
RAW_CONTENT_TYPE = "application/octet-stream"


class FrameInputError(ValueError):
    """A posted frame, source name or request the inbox cannot take; the message names the problem."""


@dataclasses.dataclass(frozen=True, eq=False)
class PostedFrame:
    """One frame as it was posted: checked, not decoded.

    Args:
        source: the source name it was posted under.
        sequence: its number; every post to an inbox gets a larger one than the posts before it.
        data: the bytes as they arrived.
        format: ``"JPEG"``, ``"PNG"``, ``"WEBP"`` or ``"RAW"``.
        width, height: its size in pixels.
        channels: for raw pixels, 3 (RGB) or 4 (RGBA); for files, 0 (their own).
        posted_at: ``time.monotonic()`` when it arrived.
    """

    source: str
    sequence: int
    data: bytes
    format: str
    width: int
    height: int
    channels: int
    posted_at: float

    def describe(self) -> dict:
        """What a client is told about the frame (no pixels)."""
        return {"source": self.source, "sequence": self.sequence, "format": self.format.lower(),
                "width": self.width, "height": self.height, "bytes": len(self.data),
                "age_s": round(time.monotonic() - self.posted_at, 3)}


def check_source(name: object) -> str:
    """``name`` if it is a valid source name, else :class:`FrameInputError` saying what one looks like."""
    if not isinstance(name, str) or SOURCE_NAME.fullmatch(name) is None:
        raise FrameInputError(f"source name {name!r} is not valid: use 1-64 letters, digits, '_', '.' or '-', "
                              "starting with a letter or a digit (e.g. 'webcam')")
    return name


def _check_size(width: int, height: int, what: str) -> None:
    if width < 1 or height < 1 or max(width, height) > MAX_SIDE:
        raise FrameInputError(f"{what} is {width}x{height}: each side must be 1-{MAX_SIDE} pixels")


def _int_param(value: object, name: str) -> int:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise FrameInputError(f"raw pixels need an integer {name}, got {value!r}") from None


def read_frame(source: str, data: bytes, content_type: str | None, *, width: object = None,
               height: object = None) -> PostedFrame:
    """Check a posted frame from its header and byte count (nothing is decoded) and describe it (its ``sequence``
    is 0: the inbox numbers what it keeps).

    ``content_type`` ``application/octet-stream`` means raw 8-bit pixels, row by row, RGB or RGBA (told apart by
    the byte count), of ``width`` x ``height``; anything else is read as an image file (JPEG, PNG or WebP).
    """
    source = check_source(source)
    if not data:
        raise FrameInputError(f"the frame posted to {source!r} is empty")
    if (content_type or "").split(";")[0].strip().lower() == RAW_CONTENT_TYPE:
        w, h = _int_param(width, "width"), _int_param(height, "height")
        _check_size(w, h, f"the raw frame posted to {source!r}")
        if len(data) not in (w * h * 3, w * h * 4):
            raise FrameInputError(f"a raw {w}x{h} frame is {w * h * 3} bytes (RGB) or {w * h * 4} bytes (RGBA), "
                                  f"the one posted to {source!r} has {len(data)}")
        return PostedFrame(source, 0, data, "RAW", w, h, len(data) // (w * h), time.monotonic())
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            fmt, (w, h) = image.format, image.size
    except Exception as err:  # PIL raises several kinds for bytes that are no image
        raise FrameInputError(f"the frame posted to {source!r} is not an image file PIL can read "
                              f"({type(err).__name__}); post JPEG, PNG or WebP, or raw pixels as "
                              f"{RAW_CONTENT_TYPE} with width and height") from None
    if fmt not in ENCODED_FORMATS:
        raise FrameInputError(f"the frame posted to {source!r} is {fmt}; post JPEG, PNG or WebP, or raw pixels")
    _check_size(w, h, f"the frame posted to {source!r}")
    return PostedFrame(source, 0, data, fmt, w, h, 0, time.monotonic())


def decode_frame(frame: PostedFrame, pin_memory: bool = False) -> torch.Tensor:
    """The frame as an IMAGE ``[1, H, W, 3]`` float32 tensor in [0, 1], computed as ComfyUI's Load Image does (8-bit
    values divided by 255 in float32), so a PNG gives the same tensor either way. An alpha channel is dropped.
    ``pin_memory``: in page-locked memory, which a stream on a GPU uploads without first copying it into its own
    pinned buffer (docs/DESIGN.md section 4)."""
    if frame.format == "RAW":
        pixels = np.frombuffer(frame.data, np.uint8).reshape(frame.height, frame.width, frame.channels)[..., :3]
    else:
        try:
            with Image.open(io.BytesIO(frame.data)) as image:
                pixels = np.asarray(image.convert("RGB"))
        except Exception as err:  # a header that read well over a body that does not decode
            raise FrameInputError(f"the {frame.format} frame posted to {frame.source!r} could not be decoded: "
                                  f"{err}") from None
    out = torch.empty((1, frame.height, frame.width, 3), dtype=torch.float32, pin_memory=pin_memory)
    np.divide(pixels, np.float32(255.0), out=out.numpy()[0], casting="unsafe")
    return mark_clamped(mark_finite(out))  # 8-bit values / 255: no NaN / inf to check, nothing outside [0, 1]


class FrameInbox:
    """The newest frame posted under each source name, and its decoded copy once a graph asked for it.

    Thread-safe: the server's event loop posts, ComfyUI's worker thread takes. Holds at most
    :data:`MAX_SOURCES` sources; a post to a new name beyond that is refused until one is removed. ``pin_memory``:
    decode into page-locked memory (see :func:`decode_frame`); None (the default): when the process has initialised
    CUDA by the time of the decode (a process that runs on the CPU alone is not made to create a CUDA context).
    """

    def __init__(self, max_sources: int = MAX_SOURCES, pin_memory: bool | None = None) -> None:
        self._max_sources = max_sources
        self._pin_memory = pin_memory
        self._frames: dict[str, PostedFrame] = {}
        self._decoded: dict[str, tuple[int, torch.Tensor]] = {}
        self._sequence = 0
        self._changed = threading.Condition()

    def post(self, source: str, data: bytes, content_type: str | None, *, width: object = None,
             height: object = None) -> PostedFrame:
        """Check a frame (:func:`read_frame`) and keep it as ``source``'s newest, replacing the one before."""
        frame = read_frame(source, data, content_type, width=width, height=height)
        with self._changed:
            if frame.source not in self._frames and len(self._frames) >= self._max_sources:
                raise FrameInputError(f"the inbox holds {len(self._frames)} sources, its limit: remove one "
                                      f"(DELETE /streamrt/frames/<source>) before posting to {frame.source!r}")
            self._sequence += 1
            frame = dataclasses.replace(frame, sequence=self._sequence)
            self._frames[frame.source] = frame
            self._changed.notify_all()
        return frame

    def remove(self, source: str) -> bool:
        """Forget ``source`` and its frame; False if there was none."""
        source = check_source(source)
        with self._changed:
            self._decoded.pop(source, None)
            return self._frames.pop(source, None) is not None

    def sources(self) -> dict[str, dict]:
        """Every source and what its newest frame is (:meth:`PostedFrame.describe`)."""
        with self._changed:
            frames = list(self._frames.values())
        return {frame.source: frame.describe() for frame in frames}

    def take(self, source: str, *, newer_than: int = 0, timeout: float = 0.0,
             interrupted: Callable[[], None] | None = None) -> tuple[PostedFrame, torch.Tensor] | None:
        """``source``'s newest frame and its IMAGE tensor, waiting up to ``timeout`` seconds for one numbered above
        ``newer_than``; after that, the newest there is (None when the source never got a frame).

        ``interrupted`` is called while waiting (every 50 ms) and may raise to stop the wait. The decoded tensor is
        kept for the frame, so several readers of one frame decode it once; callers must not write into it.
        """
        source = check_source(source)
        deadline = time.monotonic() + max(0.0, timeout)
        with self._changed:
            while True:
                frame = self._frames.get(source)
                left = deadline - time.monotonic()
                if (frame is not None and frame.sequence > newer_than) or left <= 0:
                    break
                self._changed.wait(min(left, 0.05))
                if interrupted is not None:
                    interrupted()
            if frame is None:
                return None
            decoded = self._decoded.get(source)
            if decoded is not None and decoded[0] == frame.sequence:
                return frame, decoded[1]
        pinned = torch.cuda.is_initialized() if self._pin_memory is None else self._pin_memory
        image = decode_frame(frame, pinned)  # outside the lock: a post must not wait for a decode
        with self._changed:
            if self._frames.get(source) is frame:
                self._decoded[source] = (frame.sequence, image)
        return frame, image
