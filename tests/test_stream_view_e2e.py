"""The stream view on the real ComfyUI server, seen from a websocket client like the browser's.

* Stream Preview (StreamRTPreview) sends the newest frame of each execution as a binary preview event with
  its node id (ComfyUI's progress preview; the client announces ``supports_preview_metadata`` as the frontend
  does), which is the frame the sampler made (JPEG), and writes no file; its history entry lists no output.
  ``max_size`` scales a larger frame down. A prompt queued without a client id sends no preview to anybody.
* A video (a batch larger than frames_per_step) shows its newest finished frame on the sampler node while it
  runs, with ``streamrt.status`` events of ``state: "batch"`` (frames done so far), all before the execution
  ends; the last preview is the last output frame. Every status event carries its prompt's id.

The browser side (the frames on the node in Chromium, both renderers) is in tests/test_browser_e2e.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from comfy_harness import ComfyServer, Graph, as_prompt, decode_preview, image_bytes_to_array
from e2e_helpers import MODEL, SIZE, TAESD, add_sampler, frames, uid, upload
from stream_helpers import first_cache_mode

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("comfy_server", [first_cache_mode()], indirect=True)]

FLAGS = {"supports_preview_metadata": True}  # what the frontend announces when it connects
#: JPEG (quality 95) of these noisy 64x64 frames against the 8-bit PNG of the same frame
JPEG_MEAN_TOL, JPEG_MAX_TOL = 3 / 255, 48 / 255
#: a video long enough to show several previews (one every 0.25 s) on the CPU, and on a GPU server. 48 frames took
#: under 0.5 s on a quiet CI machine (one status while the video ran: failed once); 144 take 1.5 s or more there.
VIDEO_FRAMES = 480 if os.environ.get("STREAMRT_SERVER_GPU") == "1" else 144


@pytest.fixture
def server(comfy_server: ComfyServer, e2e_tiny_models: Path) -> ComfyServer:
    return comfy_server


def previews(ws, node_id: str | None = None) -> list[tuple[dict | None, np.ndarray]]:
    """The preview events a client got (of one node), decoded: (metadata, image)."""
    decoded = [decode_preview(message) for message in list(ws.binary)]
    return [(meta, image_bytes_to_array(data)) for meta, data in (d for d in decoded if d is not None)
            if node_id is None or (meta or {}).get("node_id") == node_id]


def temp_files(server: ComfyServer) -> set[Path]:
    return {p for p in server.temp_dir.rglob("*") if p.is_file()} if server.temp_dir.exists() else set()


def stream_graph(prefix: str, images: list[str], *, view: dict | None = None, repeat: int = 0) -> Graph:
    """LoadImage(s) [-> RepeatImageBatch] -> sampler -> Save Image (the reference) and Stream Preview."""
    g = Graph(prefix=prefix)
    load = g.node("StreamRTLoadPipeline", id=f"{prefix}load", model=MODEL, taesd=TAESD, dtype="auto", device="auto")
    frames_in = g.node("LoadImage", image=images[0]).out(0)
    for name in images[1:]:
        frames_in = g.node("ImageBatch", image1=frames_in, image2=g.node("LoadImage", image=name).out(0)).out(0)
    if repeat:
        frames_in = g.node("RepeatImageBatch", image=frames_in, amount=repeat).out(0)
    sampler = add_sampler(g, load.out(0), id=f"{prefix}sampler", image=frames_in)
    g.node("SaveImage", id=f"{prefix}save", images=sampler.out(0), filename_prefix=f"{prefix}/f")
    if view is not None:
        g.node("StreamRTPreview", id=f"{prefix}view", images=sampler.out(0), **view)
    return g


def assert_jpeg_of(preview: np.ndarray, frame: np.ndarray, other: np.ndarray | None = None) -> None:
    """``preview`` is ``frame`` through JPEG: close to it, and much closer to it than to ``other``."""
    diff = np.abs(preview - frame[..., :3])
    assert diff.mean() < JPEG_MEAN_TOL and diff.max() < JPEG_MAX_TOL, (diff.mean() * 255, diff.max() * 255)
    if other is not None:
        assert np.abs(preview - other[..., :3]).mean() > 3 * diff.mean()


# ---------------------------------------------------------------------------------------------------
def test_stream_preview_sends_each_frame_and_writes_no_file(server: ComfyServer) -> None:
    prefix = uid()
    names = upload(server, frames(2, seed=61), prefix)
    before = temp_files(server)
    with server.websocket(feature_flags=FLAGS) as ws:
        for name in names:
            ws.clear()
            pid, entry = server.run_entry(stream_graph(prefix, [name], view={"max_size": 0}), client_id=ws.client_id)
            ws.wait_prompt_done(pid)  # every message of the prompt is in
            assert entry["outputs"].get(f"{prefix}view") is None  # nothing listed: no file behind the view
            ((meta, image),) = previews(ws, f"{prefix}view")
            assert meta["prompt_id"] == pid and meta["display_node_id"] == f"{prefix}view"
            assert meta["image_type"] == "image/jpeg"
            assert_jpeg_of(image, server.output_images(entry["outputs"], f"{prefix}save")[0])
    assert temp_files(server) == before, "the stream view wrote into the temp folder"


def test_stream_preview_shows_the_last_image_it_is_given(server: ComfyServer) -> None:
    """(The tiny random models' frames hardly depend on their input: distinct pictures straight from Load Image
    show that the view sends the batch's last image, faithfully, and scales it to max_size.)"""
    prefix = uid()
    ramp = np.linspace(0, 255, SIZE, dtype=np.float32)
    across, down = np.meshgrid(ramp, ramp)  # smooth pictures: JPEG keeps them within a few levels
    pictures = [np.stack([across, 255 - across, np.full_like(across, 64)], -1).astype(np.uint8),
                np.stack([np.full_like(down, 200), down, 255 - down], -1).astype(np.uint8)]
    first, last = upload(server, np.stack(pictures), prefix)
    pictures = [p.astype(np.float32) / 255 for p in pictures]

    def view_graph(max_size: int) -> tuple[Graph, str]:
        g = Graph(prefix=uid())  # new node ids: nothing cached from an earlier run
        batch = g.node("ImageBatch", image1=g.node("LoadImage", image=first).out(0),
                       image2=g.node("LoadImage", image=last).out(0))
        view = g.node("StreamRTPreview", images=batch.out(0), max_size=max_size)
        return g, view.id

    def shown(max_size: int, client: bool = True) -> list[np.ndarray]:
        g, view = view_graph(max_size)
        with server.websocket(feature_flags=FLAGS) as ws, server.websocket() as legacy:
            if client:
                ws.wait_prompt_done(server.run_entry(g, client_id=ws.client_id)[0])
                return [image for _, image in previews(ws, view)]
            # a prompt queued without a client id (ComfyUI would send its previews to every browser)
            answer = server.post("/prompt", {"prompt": as_prompt(g)})
            answer.raise_for_status()
            server.raise_for_status(server.wait(answer.json()["prompt_id"]))
            # any message of that prompt came before the end of the next one (one queue of messages)
            marker, _ = view_graph(max_size + 8)
            ws.wait_prompt_done(server.run_entry(marker, client_id=ws.client_id)[0])
            return [image for meta, image in previews(ws) + previews(legacy) if (meta or {}).get("node_id") == view
                    or meta is None]

    (full,) = shown(0)
    assert_jpeg_of(full, pictures[1], other=pictures[0])
    (small,) = shown(SIZE // 2)
    assert small.shape == (SIZE // 2, SIZE // 2, 3)
    half = pictures[1].reshape(SIZE // 2, 2, SIZE // 2, 2, 3).mean(axis=(1, 3))
    assert_jpeg_of(small, half, other=pictures[0][::2, ::2])
    assert shown(0, client=False) == []


def test_a_video_previews_on_the_sampler_before_it_ends(server: ComfyServer) -> None:
    prefix = uid()
    names = upload(server, frames(2, seed=63), prefix)  # the video alternates between two pictures
    sampler = f"{prefix}sampler"
    with server.websocket(feature_flags=FLAGS) as ws:
        pid, entry = server.run_entry(stream_graph(prefix, names, repeat=VIDEO_FRAMES // 2), client_id=ws.client_id,
                                      timeout=300)
        ws.wait_prompt_done(pid)
        timeline = list(ws.timeline)
    out = server.output_images(entry["outputs"], f"{prefix}save")
    assert len(out) == VIDEO_FRAMES

    def index(predicate) -> list[int]:
        return [k for k, (kind, data) in enumerate(timeline) if predicate(kind, data)]

    shown = index(lambda kind, data: kind == "<binary>" and (decode_preview(data) or (None,))[0] is not None
                  and decode_preview(data)[0].get("node_id") == sampler)
    batch = index(lambda kind, data: kind == "streamrt.status" and data.get("state") == "batch")
    (final,) = index(lambda kind, data: kind == "streamrt.status" and data.get("state") != "batch")
    (success,) = index(lambda kind, data: kind == "execution_success" and data.get("prompt_id") == pid)
    assert len(batch) >= 2 and max(batch) < final, "no status while the video ran"
    assert len([k for k in shown if k < final]) >= 2, "no preview while the video ran"
    assert max(shown) < success
    events = [timeline[k][1] for k in batch]
    assert all(e["total"] == VIDEO_FRAMES and e["node"] == sampler and e["prompt_id"] == pid for e in events)
    done = [e["done"] for e in events]
    assert done == sorted(set(done)) and 0 < done[0] and done[-1] < VIDEO_FRAMES
    assert all(e["fps"] > 0 for e in events)
    assert timeline[final][1]["prompt_id"] == pid and timeline[final][1]["frames"] == VIDEO_FRAMES
    images = [image_bytes_to_array(decode_preview(timeline[k][1])[1]) for k in shown]
    assert_jpeg_of(images[-1], out[-1])  # the last preview is the last frame
