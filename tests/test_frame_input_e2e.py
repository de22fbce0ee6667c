"""Stream Frame Input on the real ComfyUI server: frames posted over HTTP (``POST /streamrt/frames/<source>``, as the
browser's camera on the node and other programs post them) reach the graph as Load Image would give the same picture,
a realtime stream fed this way makes the frames the Load Image route makes, ``wait_for_new`` paces a graph to the
posts, and bad posts or sources are refused by name while the server keeps working.

The browser side (the camera widget posting frames from Chromium's fake camera) is in tests/test_browser_e2e.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from comfy_harness import ComfyServer, ExecutionFailed, Graph, array_to_png_bytes, as_prompt
from e2e_helpers import MODEL, SIZE, TAESD, add_sampler, frames, queue_raw, uid, upload
from stream_helpers import first_cache_mode

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("comfy_server", [first_cache_mode()], indirect=True)]


@pytest.fixture
def server(comfy_server: ComfyServer, e2e_tiny_models: Path) -> ComfyServer:
    return comfy_server


def post_frame(server: ComfyServer, source: str, data: bytes, content_type: str = "image/png", prefix: str = "",
               **query) -> dict:
    answer = server.post_frame(source, data, content_type, prefix=prefix, **query)
    assert answer.status_code == 200, answer.text
    return answer.json()


def input_graph(source: str, *, width: int = 0, height: int = 0, wait_for_new: bool = False,
                timeout: float = 0.0) -> tuple[Graph, str]:
    """Stream Frame Input -> Save Image; the saving node's id."""
    g = Graph(prefix=uid())
    frame = g.node("StreamRTFrameInput", id=f"{g.prefix}in", source=source, width=width, height=height,
                   wait_for_new=wait_for_new, timeout=timeout)
    save = g.node("SaveImage", id=f"{g.prefix}save", images=frame.out(0), filename_prefix=f"{g.prefix}/f")
    return g, save.id


def saved(server: ComfyServer, graph: Graph, save: str, timeout: float = 60.0) -> np.ndarray:
    (image,) = server.output_images(server.run(graph, timeout=timeout), save)
    return image


def test_posted_frames_reach_the_graph_as_the_posted_pixels(server: ComfyServer) -> None:
    source = uid()
    pictures = frames(2, seed=71)
    answer = post_frame(server, source, array_to_png_bytes(pictures[0]))
    assert (answer["source"], answer["format"], answer["width"], answer["height"]) == (source, "png", SIZE, SIZE)
    graph, save = input_graph(source)
    np.testing.assert_array_equal(saved(server, graph, save), pictures[0].astype(np.float32) / 255)
    # raw RGBA pixels (the browser's ImageData), through the frontend's /api prefix: the alpha channel is dropped
    rgba = np.concatenate([pictures[1], np.full((SIZE, SIZE, 1), 7, np.uint8)], -1)
    post_frame(server, source, rgba.tobytes(), "application/octet-stream", prefix="/api", width=SIZE, height=SIZE)
    np.testing.assert_array_equal(saved(server, graph, save), pictures[1].astype(np.float32) / 255)
    listed = server.get("/streamrt/frames").json()[source]
    assert (listed["format"], listed["width"], listed["height"]) == ("raw", SIZE, SIZE)
    # a frame posted at another size, resized to the node's width x height
    small = frames(1, seed=72)[0][: SIZE // 2]
    post_frame(server, source, array_to_png_bytes(small))
    graph, save = input_graph(source, width=SIZE, height=SIZE)
    assert saved(server, graph, save).shape == (SIZE, SIZE, 3)
    graph, save = input_graph(source, width=0, height=SIZE)  # one side: the posted frame's aspect kept
    assert saved(server, graph, save).shape == (SIZE, 2 * SIZE, 3)


def test_a_stream_from_posted_frames_makes_the_frames_of_the_load_image_route(server: ComfyServer) -> None:
    prefix, source = uid(), uid()
    pictures = frames(3, seed=73)
    names = upload(server, pictures, prefix)
    by_file, by_post = [], []
    for name, picture in zip(names, pictures):
        g = Graph(prefix=prefix)  # the same node ids every frame: one stream per route
        load = g.node("StreamRTLoadPipeline", id=f"{prefix}load", model=MODEL, taesd=TAESD, dtype="auto",
                      device="auto")
        from_file = add_sampler(g, load.out(0), id=f"{prefix}file", image=g.node("LoadImage", image=name).out(0))
        g.node("SaveImage", id=f"{prefix}save-file", images=from_file.out(0), filename_prefix=f"{prefix}/file")
        post_frame(server, source, array_to_png_bytes(picture))
        posted = g.node("StreamRTFrameInput", id=f"{prefix}in", source=source, width=SIZE, height=SIZE,
                        wait_for_new=True, timeout=10.0)
        from_post = add_sampler(g, load.out(0), id=f"{prefix}post", image=posted.out(0))
        g.node("SaveImage", id=f"{prefix}save-post", images=from_post.out(0), filename_prefix=f"{prefix}/post")
        outputs = server.run(g)
        by_file += server.output_images(outputs, f"{prefix}save-file")
        by_post += server.output_images(outputs, f"{prefix}save-post")
    assert len(by_post) == 3
    for a, b in zip(by_file, by_post):
        np.testing.assert_array_equal(a, b)
    assert np.abs(by_post[2] - by_post[1]).max() > 0  # the stream moved with the frames


def test_wait_for_new_waits_for_the_next_post_and_repeats_the_newest_after_its_timeout(server: ComfyServer) -> None:
    source = uid()
    first, second = frames(2, seed=74)
    post_frame(server, source, array_to_png_bytes(first))
    graph, save = input_graph(source, wait_for_new=True, timeout=20.0)
    np.testing.assert_array_equal(saved(server, graph, save), first.astype(np.float32) / 255)
    poster = threading.Timer(1.0, lambda: post_frame(server, source, array_to_png_bytes(second)))
    start = time.monotonic()
    poster.start()
    got = saved(server, graph, save)  # the same node: it gave `first` last, so it waits for `second`
    poster.join()
    assert time.monotonic() - start >= 0.9
    np.testing.assert_array_equal(got, second.astype(np.float32) / 255)
    graph.node("StreamRTFrameInput", id=f"{graph.prefix}in", source=source, width=0, height=0, wait_for_new=True,
               timeout=0.3)
    np.testing.assert_array_equal(saved(server, graph, save), second.astype(np.float32) / 255)  # nothing new came


def test_bad_posts_and_unknown_sources_are_refused_by_name_and_the_server_keeps_working(server: ComfyServer) -> None:
    source = uid()
    url = f"{server.base_url}/streamrt/frames"
    refusals = {  # message -> (body, content type, query)
        "not an image file": (b"not a picture", "image/jpeg", {}),
        "raw 64x64 frame is": (b"\0" * 10, "application/octet-stream", {"width": SIZE, "height": SIZE}),
        "is empty": (b"", "image/png", {}),
    }
    for message, (data, content_type, query) in refusals.items():
        answer = server.post_frame(source, data, content_type, **query)
        assert answer.status_code == 400 and message in answer.json()["error"], answer.text
    answer = server.post_frame("bad%20name", array_to_png_bytes(frames(1, 1)[0]))
    assert answer.status_code == 400 and "source name" in answer.json()["error"]
    assert source not in server.get("/streamrt/frames").json()

    graph, save = input_graph(source, timeout=0.2)
    with pytest.raises(ExecutionFailed, match=f"no frame has been posted to source '{source}'"):
        server.run(graph)
    bad_graph, _ = input_graph("../models")
    with pytest.raises(ExecutionFailed, match="source name '../models' is not valid"):
        server.run(bad_graph)
    nan_graph, _ = input_graph(source, timeout=float("nan"))  # JSON NaN passes ComfyUI's min / max check
    with pytest.raises(ExecutionFailed, match="timeout must be a finite number"):
        ComfyServer.raise_for_status(queue_raw(server, as_prompt(nan_graph)))

    picture = frames(1, seed=75)[0]
    post_frame(server, source, array_to_png_bytes(picture))  # the next prompt works
    np.testing.assert_array_equal(saved(server, graph, save), picture.astype(np.float32) / 255)
    assert server.session.delete(f"{url}/{source}", timeout=30).status_code == 200
    assert server.session.delete(f"{url}/{source}", timeout=30).status_code == 404
    assert source not in server.get("/streamrt/frames").json()
