"""The camera of Stream Frame Input (js/streamrt_camera.js) in a real browser on the real ComfyUI.

Headless Chromium with its fake camera (``--use-fake-device-for-media-stream``: a moving synthetic test pattern)
opens the page of the ``comfy_server`` fixture. A graph of Stream Frame Input -> Realtime Sampler (tiny random
models) -> Save Image is built with the frontend's own node API, then:

* a real click on "● Camera" starts the camera: frames arrive at the server (``GET /streamrt/frames``) as JPEGs of
  the node's width x height, and the node's status line counts them;
* queued prompts run the stream on them (the outputs are the node's size, and the frames move), with no file
  written into ComfyUI's temp or input folder;
* "■ Camera off" stops the posts, and a queue then does not switch it on again; on a new node, a queue switches
  the camera on by itself (the node waits for its first frame);
* a source name the server refuses stops the camera with the server's message on the node;
* a queue does not switch the camera on over a source that another program feeds;
* no console errors from the extension.

Skipped, with the reason, when chromium, chromedriver or selenium is missing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from browser.page import ComfyPage, browser_missing_reason, prepare_user_settings
from comfy_harness import ComfyServer, array_to_png_bytes
from e2e_helpers import MODEL, TAESD, uid
from soak import FramePoster
from stream_helpers import first_cache_mode

SIZE = 64
SHOTS_OUT = Path(__file__).resolve().parent.parent / "out" / "browser"

_missing = browser_missing_reason()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.parametrize("comfy_server", [first_cache_mode()], indirect=True),
    *([pytest.mark.skip(reason=f"browser tests need Chromium: {_missing}")] if _missing else []),
]

BUILD_JS = """
const [source, size, model, taesd, prefix] = arguments;
app.graph.clear();
const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
const set = (node, name, value) => { node.widgets.find(w => w.name === name).value = value; };
const input = add("StreamRTFrameInput", [40, 60]);
set(input, "source", source); set(input, "width", size); set(input, "height", size);
set(input, "timeout", 20);
const load = add("StreamRTLoadPipeline", [40, 500]);
set(load, "model", model); set(load, "taesd", taesd);
const sampler = add("StreamRTSampler", [420, 60]);
set(sampler, "t_index_list", "20,35");
const save = add("SaveImage", [820, 60]);
set(save, "filename_prefix", prefix);
load.connect(0, sampler, sampler.inputs.findIndex(i => i.name === "pipeline"));
input.connect(0, sampler, sampler.inputs.findIndex(i => i.name === "image"));
sampler.connect(0, save, 0);
app.canvas.setDirty(true, true);
return input.id;
"""

CAMERA_JS = """
const camera = window.StreamRT.camera(app.graph.getNodeById(arguments[0]));
return {on: camera.on, posted: camera.posted, error: camera.error, userOff: camera.userOff, inFlight: camera.inFlight,
        line: camera.element.querySelector(".streamrt-camera-status").textContent,
        button: camera.element.querySelector(".streamrt-camera-toggle").textContent};
"""


def camera(page: ComfyPage, node_id: int) -> dict:
    return page.js(CAMERA_JS, node_id)


def click_camera(page: ComfyPage, node_id: int) -> None:
    page.click_element("return window.StreamRT.camera(app.graph.getNodeById(arguments[0]))"
                       ".element.querySelector('.streamrt-camera-toggle');", node_id)


def files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def queue_and_wait(page: ComfyPage, server: ComfyServer, count: int) -> list[dict]:
    """Queue the page's workflow ``count`` times (the frontend's own queue); the new history entries, oldest first."""
    before = set(server.history())
    for _ in range(count):
        errors = page.js_async("await app.queuePrompt(0, 1); return app.lastNodeErrors;")
        assert not errors, errors
    page.wait_until(lambda: len(set(server.history()) - before) >= count, timeout=120, what=f"{count} prompts")
    server.wait_idle(timeout=120)
    history = server.history()
    entries = [history[pid] for pid in history if pid not in before]
    for entry in entries:
        server.raise_for_status(entry)
    return sorted(entries, key=lambda e: e["prompt"][0])


@pytest.fixture(scope="module")
def page(comfy_server: ComfyServer, e2e_tiny_models: Path):
    prepare_user_settings(comfy_server.user_dir)
    with ComfyPage.open(comfy_server.base_url) as page:
        yield page


def test_the_camera_posts_frames_that_stream_without_files(page: ComfyPage, comfy_server: ComfyServer) -> None:
    source, prefix = uid(), uid()
    node = page.js(BUILD_JS, source, SIZE, MODEL, TAESD, prefix)
    assert camera(page, node)["button"] == "● Camera" and not camera(page, node)["on"]
    temp_before, input_before = files(comfy_server.temp_dir), files(comfy_server.input_dir)

    click_camera(page, node)
    page.wait_until(lambda: camera(page, node)["posted"] >= 5, timeout=30, what="5 frames posted by the camera")
    state = camera(page, node)
    assert state["on"] and state["button"] == "■ Camera off" and f"posting to '{source}'" in state["line"]
    listed = comfy_server.get("/streamrt/frames").json()[source]
    assert (listed["format"], listed["width"], listed["height"]) == ("jpeg", SIZE, SIZE)
    page.redraw()
    SHOTS_OUT.mkdir(parents=True, exist_ok=True)  # for a person to look at
    page.screenshot(SHOTS_OUT / "camera_on.png", clip=page.node_client_rect(node, pad=8))

    entries = queue_and_wait(page, comfy_server, 3)
    outputs = [comfy_server.output_images(entry["outputs"], save) for entry in entries
               for save in entry["outputs"]]
    frames = [images[0] for images in outputs]
    assert len(frames) == 3 and all(f.shape == (SIZE, SIZE, 3) for f in frames)
    assert np.abs(frames[2] - frames[0]).max() > 0  # the stream moves with the camera's frames
    assert files(comfy_server.temp_dir) == temp_before and files(comfy_server.input_dir) == input_before

    click_camera(page, node)  # off
    state = camera(page, node)
    assert not state["on"] and state["userOff"] and state["button"] == "● Camera"
    page.wait_until(lambda: not camera(page, node)["inFlight"], timeout=10, what="the last post to end")
    sequence = comfy_server.get("/streamrt/frames").json()[source]["sequence"]
    time.sleep(1.0)
    assert comfy_server.get("/streamrt/frames").json()[source]["sequence"] == sequence  # no more posts
    page.js("""const n = app.graph.getNodeById(arguments[0]);
               n.widgets.find(w => w.name === "timeout").value = 0.5;""", node)
    queue_and_wait(page, comfy_server, 1)  # the newest frame again, after the wait
    assert not camera(page, node)["on"], "a queue switched on a camera that was switched off on the node"
    errors = [e for e in page.console_entries(levels=("SEVERE",)) if "streamrt" in str(e).lower()]
    assert not errors, errors


def test_a_queue_switches_the_camera_on_and_a_refused_source_stops_it(page: ComfyPage,
                                                                      comfy_server: ComfyServer) -> None:
    source = uid()
    node = page.js(BUILD_JS, source, SIZE, MODEL, TAESD, uid())
    (entry,) = queue_and_wait(page, comfy_server, 1)  # the node waits for the camera the queue switched on
    assert camera(page, node)["on"] and source in comfy_server.get("/streamrt/frames").json()
    assert any(entry["outputs"].values())
    click_camera(page, node)

    page.js("""const n = app.graph.getNodeById(arguments[0]);
               n.widgets.find(w => w.name === "source").value = "bad name";""", node)
    click_camera(page, node)
    page.wait_until(lambda: camera(page, node)["error"], timeout=30, what="the camera to stop with an error")
    state = camera(page, node)
    assert not state["on"]
    assert state["line"].startswith("refused: source name 'bad name' is not valid"), state
    assert state["button"] == "● Camera"


def test_a_source_fed_by_another_program_keeps_the_camera_off(page: ComfyPage, comfy_server: ComfyServer) -> None:
    """A queue does not switch the camera on over a source another program feeds: its frames are what streams."""
    source = uid()
    node = page.js(BUILD_JS, source, SIZE, MODEL, TAESD, uid())
    picture = np.full((SIZE, SIZE, 3), 200, np.uint8)
    poster = FramePoster(comfy_server, source, [array_to_png_bytes(picture)], rate=20.0)
    poster.start()
    try:
        deadline = time.monotonic() + 10
        while poster.posted == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        (entry,) = queue_and_wait(page, comfy_server, 1)
    finally:
        poster.stop()
    assert poster.posted > 0 and not poster.errors, poster.errors
    time.sleep(0.5)  # the queue's handler has run
    assert not camera(page, node)["on"], "a queue switched the camera on over a source another program feeds"
    assert comfy_server.get("/streamrt/frames").json()[source]["format"] == "png"  # only the program's frames
    assert any(entry["outputs"].values())
