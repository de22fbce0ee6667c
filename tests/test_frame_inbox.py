"""The frame inbox (``streamrt.frame_inbox``): frames posted from outside a graph, checked on arrival, decoded once
when taken, as ComfyUI's Load Image would decode them; waiting for a newer frame; refusals that name the problem."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from streamrt.frame_inbox import MAX_SIDE, FrameInbox, FrameInputError, decode_frame, read_frame


def _pixels(height=24, width=40, channels=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def _encoded(pixels: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **options)
    return out.getvalue()


def _load_image_tensor(data: bytes) -> torch.Tensor:
    """What ComfyUI's Load Image makes of an image file (nodes.py LoadImage.load_image: RGB, float32 / 255)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return torch.from_numpy(np.array(image).astype(np.float32) / 255.0)[None]


def test_a_png_decodes_to_what_load_image_makes_of_it():
    data = _encoded(_pixels())
    inbox = FrameInbox()
    inbox.post("cam", data, "image/png")
    _, image = inbox.take("cam")
    assert image.shape == (1, 24, 40, 3) and image.dtype == torch.float32
    assert torch.equal(image, _load_image_tensor(data))


@pytest.mark.parametrize("channels", [3, 4], ids=["rgb", "rgba"])
def test_raw_pixels_decode_exactly_and_alpha_is_dropped(channels):
    pixels = _pixels(channels=channels, seed=channels)
    inbox = FrameInbox()
    posted = inbox.post("cam", pixels.tobytes(), "application/octet-stream", width="40", height="24")
    assert (posted.format, posted.width, posted.height, posted.channels) == ("RAW", 40, 24, channels)
    _, image = inbox.take("cam")
    expected = torch.from_numpy(pixels[..., :3].astype(np.float32) / 255.0)[None]
    assert torch.equal(image, expected)


def test_a_jpeg_and_a_webp_decode_to_their_picture():
    pixels = np.repeat(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], 24, 0).repeat(3, 2)  # smooth ramp
    for fmt, content_type in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        inbox = FrameInbox()
        posted = inbox.post("cam", _encoded(pixels, fmt, quality=95), content_type)
        _, image = inbox.take("cam")
        assert posted.format == fmt and image.shape == (1, 24, 40, 3)
        assert (image[0] - torch.from_numpy(pixels / 255.0).float()).abs().mean() < 3 / 255


def test_the_newest_post_wins_and_is_decoded_once():
    inbox = FrameInbox()
    first = inbox.post("cam", _encoded(_pixels(seed=1)), "image/png")
    second = inbox.post("cam", _encoded(_pixels(seed=2)), "image/png")
    other = inbox.post("other", _encoded(_pixels(seed=3)), "image/png")
    assert first.sequence < second.sequence < other.sequence
    frame, image = inbox.take("cam")
    assert frame is second and torch.equal(image, _load_image_tensor(second.data))
    again_frame, again = inbox.take("cam")
    assert again_frame is second and again is image  # the decoded copy is kept for the frame
    assert set(inbox.sources()) == {"cam", "other"} and inbox.sources()["cam"]["sequence"] == second.sequence


def test_take_waits_for_a_newer_frame_and_gives_the_newest_after_its_timeout():
    inbox = FrameInbox()
    first = inbox.post("cam", _encoded(_pixels(seed=1)), "image/png")
    later = _encoded(_pixels(seed=2))
    poster = threading.Timer(0.2, lambda: inbox.post("cam", later, "image/png"))
    poster.start()
    start = time.monotonic()
    frame, image = inbox.take("cam", newer_than=first.sequence, timeout=5.0)
    poster.join()
    assert frame.sequence > first.sequence and 0.15 < time.monotonic() - start < 4.0
    assert torch.equal(image, _load_image_tensor(later))
    start = time.monotonic()
    frame, _ = inbox.take("cam", newer_than=frame.sequence, timeout=0.2)  # nothing newer comes
    assert frame.data == later and time.monotonic() - start >= 0.2
    assert inbox.take("nobody", timeout=0.1) is None


def test_an_interrupt_stops_the_wait():
    inbox = FrameInbox()

    def interrupted():
        raise KeyboardInterrupt("cancelled")

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        inbox.take("cam", timeout=10.0, interrupted=interrupted)
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("name", ["", "../models", "a/b", ".hidden", "x" * 65, "cam era", None])
def test_source_names_are_plain_keys(name):
    with pytest.raises(FrameInputError, match="source name"):
        FrameInbox().post(name, _encoded(_pixels()), "image/png")


def test_bad_posts_are_refused_by_name_and_the_last_good_frame_stays():
    inbox = FrameInbox()
    good = inbox.post("cam", _encoded(_pixels()), "image/png")
    refusals = {
        "is empty": (b"", "image/png", {}),
        "not an image file": (b"hello, not a picture", "image/jpeg", {}),
        "is GIF": (_encoded(_pixels(), "GIF"), "image/gif", {}),
        "integer width": (_pixels().tobytes(), "application/octet-stream", {"height": 24}),
        "has 100": (b"\0" * 100, "application/octet-stream", {"width": 40, "height": 24}),
        f"1-{MAX_SIDE} pixels": (_encoded(np.zeros((2, MAX_SIDE + 1, 3), np.uint8)), "image/png", {}),
    }
    for message, (data, content_type, size) in refusals.items():
        with pytest.raises(FrameInputError, match=message):
            inbox.post("cam", data, content_type, **size)
    frame, image = inbox.take("cam")
    assert frame is good and torch.equal(image, _load_image_tensor(good.data))


def test_a_header_that_reads_over_a_body_that_does_not_decode_is_named():
    data = _encoded(_pixels(height=64, width=64, seed=4))
    posted = read_frame("cam", data[: len(data) // 2], "image/png")  # truncated: the header is intact
    with pytest.raises(FrameInputError, match="could not be decoded"):
        decode_frame(posted)


def test_the_number_of_sources_is_bounded_and_remove_frees_one():
    inbox = FrameInbox(max_sources=2)
    data = _encoded(_pixels())
    inbox.post("a", data, "image/png")
    inbox.post("b", data, "image/png")
    inbox.post("a", data, "image/png")  # a known source may always post
    with pytest.raises(FrameInputError, match="limit"):
        inbox.post("c", data, "image/png")
    assert inbox.remove("a") and not inbox.remove("a")
    inbox.post("c", data, "image/png")
    assert set(inbox.sources()) == {"b", "c"} and inbox.take("a") is None


def test_decoded_frames_skip_the_streams_nan_check_and_copies_do_not(monkeypatch):
    """8-bit pixels / 255 are finite by construction: a stream's NaN / inf check (a sum over the frame) is skipped for
    the inbox's frames, their views and their resizes, not for anything else."""
    from streamrt import frames as frames_module
    from streamrt.frames import check_frames, resize_frames

    inbox = FrameInbox()
    inbox.post("cam", _encoded(_pixels()), "image/png")
    _, image = inbox.take("cam")
    sums = []
    monkeypatch.setattr(frames_module, "host_sum", lambda array: sums.append(array.shape) or 0.0)
    check_frames(image, width=40, height=24, frames_per_step=1)
    check_frames(image[0], width=40, height=24, frames_per_step=1)  # a view of it
    check_frames(resize_frames(image, 16, 8), width=16, height=8, frames_per_step=1)  # resized: convex weights
    assert sums == []
    check_frames(image.clone(), width=40, height=24, frames_per_step=1)  # a copy may have been changed
    assert len(sums) == 1
    poisoned = image.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="NaN"):
        check_frames(poisoned, width=40, height=24, frames_per_step=1)


def test_frames_that_cannot_leave_0_1_are_recorded_as_clamped_and_a_streams_outputs_stay_checked(tiny_models,
                                                                                                 monkeypatch):
    """Decoded frames and a stream's outputs (clamped on the device) are recorded as within [0, 1], views and
    resizes too, so the preview's conversion to 8 bits need not clip them; a stream's output is not recorded as
    finite (a clamp keeps NaN), so a stream fed with it still checks it."""
    from stream_helpers import make_config, make_frames

    from streamrt import Stream
    from streamrt import frames as frames_module
    from streamrt.frames import check_frames, is_clamped, resize_frames

    inbox = FrameInbox()
    inbox.post("cam", _encoded(_pixels()), "image/png")
    _, image = inbox.take("cam")
    assert is_clamped(image) and is_clamped(image[0]) and is_clamped(resize_frames(image, 16, 8))
    assert not is_clamped(image.clone())
    stream = Stream(tiny_models, make_config(), prompt="a cat")
    frame = make_frames(1, seed=1)
    outputs = [stream.step(frame), stream.step(frame, overlap=True), stream.step(frame, overlap=True),
               stream.process_video(make_frames(2, seed=2)), stream.txt2img(1)]
    assert all(is_clamped(out) and is_clamped(out[-1]) for out in outputs)
    assert not is_clamped(frame)
    sums = []
    monkeypatch.setattr(frames_module, "host_sum", lambda array: sums.append(array.shape) or 0.0)
    check_frames(outputs[0], width=64, height=64, frames_per_step=1)
    assert len(sums) == 1
