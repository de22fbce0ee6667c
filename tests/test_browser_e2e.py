"""The StreamRT frontend extension (js/streamrt_status.js) and the stream view in a real browser on the real ComfyUI.

Headless Chromium (selenium, Debian's chromium + chromedriver) opens the page served by the
``comfy_server`` fixture (ComfyUI 0.3.75 with its frontend 1.32.9), loads
example_workflows/Realtime webcam (StreamRT).json with ``app.loadGraphData`` and runs it. Its Stream Frame Input
node is kept: Chromium runs with a fake camera (``--use-fake-device-for-media-stream``), which the node's camera
switches on when the workflow is queued and posts to the server like a real webcam (tests/test_browser_camera_e2e.py
checks the camera itself). For speed the test only switches the loader to the tiny random models and the frame size
to 64x64.

Checked: the example matches the node definitions (Stream Frame Input -> sampler -> Stream Preview); the sampler's
panel (fps EMA seeded by the first measurement, ms/frame, frames, backend, state) from the "streamrt.status"
events, read from the node and from the page (its text, and the state colour's pixels in a screenshot);
"▶ Stream" (a real click) switches on the frontend's own instant queue ("Run (Instant)"): >= 4 executions, no
pile-up, frames on the Stream Preview node (a new preview per execution, as loaded images) with no file
written into the temp folder, replaced preview URLs revoked, ■ Stop ends it; the
panel's loop rate against the executions per second of the server's own timestamps (within 10%); Cancel, an
execution error and a workflow the server refuses each stop the stream; "Nodes 2.0" (the Vue node renderer):
the button's label changes and the panel is not clipped, the preview shows there too; a video shows
previews on the sampler and "batch k/N" on the panel before it ends; 200 executions of the loop leave a
bounded queue history; the frontend's own node search finds the pack; no console errors from the extension.

Screenshots go to the test's tmp dir and are copied to ``<repo>/out/browser/`` for a person to look at.

Runs under ONE cache mode (``default``, or the first of $STREAMRT_CACHE_MODES): the extension only
reads websocket events and queues prompts; the sampler re-executes on every queue in every cache mode
(it is not idempotent), so other modes would only repeat the same browser checks at ~3x the time.
Skipped, with the reason, when chromium, chromedriver or selenium is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from browser.build_example_workflow import VALUES as EXAMPLE_VALUES
from browser.page import ComfyPage, browser_missing_reason, prepare_user_settings
from comfy_harness import ComfyServer, image_bytes_to_array
from e2e_helpers import MODEL, TAESD
from stream_helpers import first_cache_mode
from workflows import declared_inputs, spec_opts, widget_layout, widget_values_by_name, workflow_problems

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "example_workflows" / "Realtime webcam (StreamRT).json"
SHOTS_OUT = REPO / "out" / "browser"

SIZE = 64
EMA_ALPHA = 0.25  # js/streamrt_status.js
PANEL = "streamrt_stream"  # the panel widget's name
AWAY = (1000, 1000)  # an empty spot of the canvas for the mouse (no hover tooltip in screenshots)
STATE_COLORS = {"cold": (0x8a, 0x8a, 0x8a), "streaming": (0x4c, 0xaf, 0x50), "reset": (0x42, 0xa5, 0xf5),
                "error": (0xef, 0x53, 0x50)}
LOOP_EXECUTIONS = 200  # the history test's loop length
#: the video test's frames: long enough for several previews (one every 0.25 s), on the CPU or a GPU server
VIDEO_FRAMES = 480 if os.environ.get("STREAMRT_SERVER_GPU") == "1" else 48


_missing = browser_missing_reason()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.parametrize("comfy_server", [first_cache_mode()], indirect=True),
    *([pytest.mark.skip(reason=f"browser tests need Chromium: {_missing}")] if _missing else []),
]


@pytest.fixture(scope="module")
def example() -> dict:
    return json.loads(EXAMPLE.read_text(encoding="utf-8"))


def _node(workflow: dict, node_type: str) -> dict:
    (node,) = [n for n in workflow["nodes"] if n["type"] == node_type]
    return node


def load_example(page: ComfyPage, example: dict) -> None:
    page.js_async("await app.loadGraphData(arguments[0]);", example)
    # (the node's camera starts at the first queue: the node waits for its first frame)


@pytest.fixture(scope="module")
def page(comfy_server: ComfyServer, e2e_tiny_models: Path, example: dict):
    prepare_user_settings(comfy_server.user_dir)
    with ComfyPage.open(comfy_server.base_url) as page:
        page.js("""
            window.__streamrtEvents = [];
            api.addEventListener("streamrt.status", e => window.__streamrtEvents.push(e.detail));
        """)
        load_example(page, example)
        yield page


@pytest.fixture(scope="module")
def ids(example: dict) -> dict:
    return {t: _node(example, t)["id"]
            for t in ("StreamRTFrameInput", "StreamRTLoadPipeline", "StreamRTSampler", "StreamRTPreview")}


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("browser-shots")
    SHOTS_OUT.mkdir(parents=True, exist_ok=True)
    return folder


def save_shot(page: ComfyPage, shots: Path, name: str, clip: dict | None = None) -> np.ndarray:
    """Screenshot into the tmp dir and out/browser/; return it as an RGB(A) float array."""
    path = page.screenshot(shots / name, clip=clip)
    shutil.copy2(path, SHOTS_OUT / name)
    return image_bytes_to_array(path.read_bytes())


def colour_pixels(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 6) -> int:
    px = np.rint(image[..., :3] * 255).astype(int)
    return int((np.abs(px - np.asarray(rgb)).max(axis=-1) <= tol).sum())


PANEL_JS = """
const panelOf = (id) => app.graph.getNodeById(id)?.widgets?.find(w => w.name === arguments[1])?.element ?? null;
"""


def status(page: ComfyPage, node_id: int) -> dict:
    """node.streamrtStatus and streamrtLoop, the panel's lines and button label as the page shows them, the loop."""
    return page.js(PANEL_JS + """
        const node = app.graph.getNodeById(arguments[0]);
        const panel = panelOf(arguments[0]);
        const loop = window.StreamRT.loop;
        return {status: node.streamrtStatus ?? null, rate: node.streamrtLoop ?? null,
                lines: panel ? Array.from(panel.querySelectorAll(".streamrt-line")).map(l => l.textContent) : null,
                button: panel?.querySelector(".streamrt-toggle")?.textContent ?? null,
                loop: {active: loop.active, error: loop.error, executions: loop.executions,
                       mode: app.extensionManager.queueSettings.mode}};
    """, node_id, PANEL)


def click_stream_button(page: ComfyPage, node_id: int) -> None:
    page.click_element(PANEL_JS + "return panelOf(arguments[0]).querySelector('.streamrt-toggle');", node_id, PANEL,
                       then_move_to=AWAY)


def events_for(page: ComfyPage, node_id: int | str) -> list[dict]:
    return page.js("return window.__streamrtEvents.filter(e => String(e.node) === String(arguments[0]));",
                   str(node_id))


def show_node(page: ComfyPage, node_id: int) -> dict:
    """Scroll the canvas so the node is in view at scale 1, redraw; return its page rectangle."""
    page.js("""
        const node = app.graph.getNodeById(arguments[0]);
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [320 - node.pos[0], 140 - node.pos[1]];  // clear of the menus
    """, node_id)
    page.redraw()
    return page.node_client_rect(node_id, pad=6)


def show_workflow(page: ComfyPage) -> None:
    """The whole example (but the Note's tail) in view at scale 0.75."""
    page.js("app.canvas.ds.scale = 0.75; app.canvas.ds.offset = [80 / 0.75 - 40, 100 / 0.75 - 30];")
    page.redraw()


def panel_rect(page: ComfyPage, node_id: int) -> dict:
    """The panel's rectangle on the page."""
    return page.js(PANEL_JS + """
        const r = panelOf(arguments[0]).getBoundingClientRect();
        return {x: r.left, y: r.top, width: r.width, height: r.height};
    """, node_id, PANEL)


def use_tiny_models(page: ComfyPage, ids: dict, **sampler_values) -> None:
    page.js("""
        const [ids, samplerValues, size, model, taesd] = arguments;
        const set = (id, name, value) => {
            const w = app.graph.getNodeById(id).widgets.find(w => w.name === name);
            if (!w) throw new Error(`node ${id} has no widget ${name}`);
            w.value = value;
        };
        set(ids.StreamRTLoadPipeline, "model", model);
        set(ids.StreamRTLoadPipeline, "taesd", taesd);
        set(ids.StreamRTFrameInput, "width", size);
        set(ids.StreamRTFrameInput, "height", size);
        for (const [name, value] of Object.entries(samplerValues)) set(ids.StreamRTSampler, name, value);
    """, ids, sampler_values, SIZE, MODEL, TAESD)


def expected_ema(values: list[float]) -> float:
    ema = values[0]
    for v in values[1:]:
        ema += EMA_ALPHA * (v - ema)
    return ema


def streamrt_console_problems(page: ComfyPage) -> list[dict]:
    """Warnings/errors from the extension's file, its log prefix, or its websocket event."""
    return page.console_entries(levels=("SEVERE", "WARNING"),
                                containing=("/extensions/StreamRT/", "[StreamRT]", "streamrt.status"))


def temp_files(server: ComfyServer) -> list[str]:
    """Files in ComfyUI's temp folder, relative to it."""
    root = server.temp_dir
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def stop_streaming(page: ComfyPage, server: ComfyServer) -> None:
    page.js("window.StreamRT.loop.stop();")
    server.wait_idle(timeout=60, settle=0.5)


def dismiss_dialogs(page: ComfyPage) -> None:
    page.js("document.querySelectorAll('.p-dialog-mask').forEach(e => e.remove());")


# ---------------------------------------------------------------------------------------------------
def test_example_workflow_matches_node_definitions(page: ComfyPage, comfy_server: ComfyServer,
                                                   example: dict, ids: dict, shots: Path) -> None:
    """The saved example is a valid workflow for these nodes (tests/workflows.py), and gives, in this frontend's
    prompt, the values the builder set (by name) and the node defaults elsewhere: its widgets_values are in the
    order the frontend expects."""
    info = comfy_server.object_info()
    problems = workflow_problems(example, info)
    assert not problems, "\n".join(problems)
    # ComfyUI lists a pack's example_workflows/ in its template browser
    templates = comfy_server.get("/api/workflow_templates").json()
    assert EXAMPLE.stem in templates.get("StreamRT", []), templates
    prompt = page.js_async("return (await app.graphToPrompt()).output;")
    checked = 0
    for node in example["nodes"]:
        if node["type"] not in info:  # frontend-only nodes (the Note)
            assert node["type"] == "Note"
            continue
        spec = info[node["type"]]
        inputs = prompt[str(node["id"])]["inputs"]
        declared, _ = declared_inputs(spec)
        for name in spec["input_order"].get("required", []):
            assert name in inputs, f"{node['type']}: required input {name} missing from the prompt"
        if node["type"].startswith("StreamRT"):
            # one value per widget input: no control_after_generate (seed declares it off), and the
            # extension's panel is not saved
            assert all(slot.is_input for slot in widget_layout(spec)), (node["type"], widget_layout(spec))
        saved = widget_values_by_name(node, spec)  # types and ranges checked by workflow_problems
        for name, saved_value in saved.items():
            value = inputs[name]
            intended = EXAMPLE_VALUES.get(node["type"], {}).get(name, spec_opts(declared[name]).get("default"))
            assert value == intended, f"{node['type']}.{name}: the example gives {value!r}, meant {intended!r}"
            assert value == saved_value, f"{node['type']}.{name}: the frontend sends {value!r}, saved {saved_value!r}"
            checked += 1
    assert checked >= 15
    links = {(link[1], link[3]) for link in example["links"]}
    assert links == {(ids["StreamRTFrameInput"], ids["StreamRTSampler"]),
                     (ids["StreamRTLoadPipeline"], ids["StreamRTSampler"]),
                     (ids["StreamRTSampler"], ids["StreamRTPreview"])}
    assert not [n for n in example["nodes"] if n["type"] in ("PreviewImage", "SaveImage")]  # no file per frame

    # Before any execution the panel says "cold", drawn in the cold colour.
    sampler = ids["StreamRTSampler"]
    rect = show_node(page, sampler)
    state = status(page, sampler)
    assert state["status"] is None and state["lines"][0] == "● cold", state
    assert state["button"] == "▶ Stream" and state["loop"]["mode"] == "disabled"
    panel = save_shot(page, shots, "sampler_cold_panel.png", clip=panel_rect(page, sampler))
    save_shot(page, shots, "sampler_cold.png", clip=rect)
    assert colour_pixels(panel, STATE_COLORS["cold"]) >= 10
    assert not streamrt_console_problems(page)


def test_status_panel_shows_fps_and_state(page: ComfyPage, comfy_server: ComfyServer, ids: dict,
                                          shots: Path) -> None:
    sampler = ids["StreamRTSampler"]
    use_tiny_models(page, ids)
    for _ in range(3):
        # (1.32.9's app.queuePrompt answers false even after a good queue: check the node errors instead)
        errors = page.js_async("await app.queuePrompt(0, 1); return app.lastNodeErrors;")
        assert not errors, errors
    page.wait_until(lambda: len(events_for(page, sampler)) >= 3, timeout=60, what="3 streamrt.status events")
    comfy_server.wait_idle(timeout=60)
    events = events_for(page, sampler)
    assert [e["state"] for e in events] == ["warming", "streaming", "streaming"]
    assert [e["stream_frames"] for e in events] == [1, 2, 3]
    assert len({e["prompt_id"] for e in events}) == 3 and all(e["prompt_id"] for e in events)

    state = status(page, sampler)
    st = state["status"]
    assert st["state"] == "streaming" and st["executions"] == 3 and st["stream_frames"] == 3
    assert st["backend"] == "auto -> eager" and st["device"] == "cpu"  # what auto chose on this machine
    assert isinstance(st["fps"], (int, float)) and st["fps"] > 0
    # EMA seeded by the first measurement (not ramping up from 0)
    assert st["fps"] == pytest.approx(expected_ema([e["fps"] for e in events]), rel=1e-9)
    assert st["ms_per_frame"] == pytest.approx(events[-1]["ms_per_frame"], rel=1e-9)
    assert state["rate"] is None  # queued by hand: no loop, no loop rate

    rect = show_node(page, sampler)
    lines = status(page, sampler)["lines"]
    assert lines[0] == "● streaming", lines
    match = re.fullmatch(r"loop –\s+sampler (\d+(?:\.\d+)?) fps\s+(\d+\.\d) ms", lines[1])
    assert match, lines
    assert float(match.group(1)) == pytest.approx(st["fps"], rel=0.06)
    assert float(match.group(2)) == pytest.approx(st["ms_per_frame"], abs=0.051)
    assert lines[2] == "frames 3   auto -> eager · cpu", lines
    show_workflow(page)
    save_shot(page, shots, "page_streaming.png")
    show_node(page, sampler)
    save_shot(page, shots, "sampler_streaming.png", clip=rect)
    panel = save_shot(page, shots, "sampler_streaming_panel.png", clip=panel_rect(page, sampler))
    assert colour_pixels(panel, STATE_COLORS["streaming"]) >= 10  # the green state line is on the page
    cold = image_bytes_to_array((shots / "sampler_cold_panel.png").read_bytes())
    assert cold.shape == panel.shape and np.abs(cold - panel).max() > 0.5  # the text changed on the page
    assert not streamrt_console_problems(page)


def test_reset_restarts_the_stream_and_the_fps_average(page: ComfyPage, comfy_server: ComfyServer, ids: dict,
                                                       shots: Path) -> None:
    sampler = ids["StreamRTSampler"]
    use_tiny_models(page, ids, reset=True)
    try:
        before = len(events_for(page, sampler))
        errors = page.js_async("await app.queuePrompt(0, 1); return app.lastNodeErrors;")
        assert not errors, errors
        page.wait_until(lambda: len(events_for(page, sampler)) > before, timeout=60, what="a status event")
        comfy_server.wait_idle(timeout=60)
    finally:
        use_tiny_models(page, ids, reset=False)
    event = events_for(page, sampler)[-1]
    assert event["state"] == "reset" and event["stream_frames"] == 1
    st = status(page, sampler)["status"]
    assert st["state"] == "reset" and st["executions"] == 1 and st["stream_frames"] == 1
    assert st["fps"] == event["fps"]  # the average starts again from this measurement
    rect = show_node(page, sampler)
    assert status(page, sampler)["lines"][0] == "● reset"
    panel = save_shot(page, shots, "sampler_reset_panel.png", clip=panel_rect(page, sampler))
    save_shot(page, shots, "sampler_reset.png", clip=rect)
    assert colour_pixels(panel, STATE_COLORS["reset"]) >= 10


PREVIEWS_JS = """
// Every preview the frontend stored for a node: its blob URLs in order, and whether the node shows it.
const [id] = arguments;
window.__views = window.__views ?? {};
const record = window.__views[id] = {urls: []};
api.addEventListener("b_preview_with_metadata", (e) => {
    if (String(e.detail.displayNodeId) !== String(id)) return;
    setTimeout(() => record.urls.push(...(app.nodePreviewImages[String(id)] ?? [])), 0);
});
"""


def test_stream_toggle_shows_frames_on_the_stream_preview(page: ComfyPage, comfy_server: ComfyServer, ids: dict,
                                                          shots: Path) -> None:
    """▶ Stream (a real click) switches on the frontend's instant queue: the workflow runs again and again, one
    prompt at a time, and each execution's frame appears on Stream Preview, with no file written (the camera's
    frames are posted, and kept in memory); ■ Stop ends it."""
    sampler, view = ids["StreamRTSampler"], ids["StreamRTPreview"]
    use_tiny_models(page, ids)
    show_node(page, sampler)
    before = len(events_for(page, sampler))
    history_before = len(comfy_server.history())
    frames_before = status(page, sampler)["status"]["stream_frames"]
    temp_before = temp_files(comfy_server)
    page.js(PREVIEWS_JS, view)

    click_stream_button(page, sampler)
    page.wait_js("return window.StreamRT.loop.active;", timeout=5, what="the stream to start")
    pending_seen, loaded = [], set()

    def requeued_four_times() -> bool:  # and shown 2 frames; until then, how many prompts wait and what the view shows
        loaded.update(page.js("""
            const node = app.graph.getNodeById(arguments[0]);
            return (node.imgs ?? []).filter(i => i.complete && i.naturalWidth === arguments[1]).map(i => i.src);
        """, view, SIZE))
        if len(events_for(page, sampler)) >= before + 4 and len(loaded) >= 2:
            return True
        pending_seen.append(len(comfy_server.queue_state()["queue_pending"]))
        return False

    # (the loop goes on while this polls: a fast loop can run 4 executions before the page has loaded 2 previews)
    page.wait_until(requeued_four_times, timeout=90, what="the stream to re-queue 4 times and show 2 frames")
    state = status(page, sampler)
    assert state["loop"]["active"] and state["loop"]["mode"] == "instant" and state["button"] == "■ Stop"
    assert page.js("return document.body.innerText.includes('Run (Instant)');")  # the frontend's own Run button
    page.redraw()
    save_shot(page, shots, "sampler_stream_running.png", clip=page.node_client_rect(sampler, pad=6))
    show_node(page, view)
    save_shot(page, shots, "stream_preview.png", clip=page.node_client_rect(view, pad=6))
    assert max(pending_seen, default=0) <= 1, f"prompts piled up in the queue: {pending_seen}"

    click_stream_button(page, sampler)
    page.wait_js("return !window.StreamRT.loop.active;", timeout=5, what="the stream to stop")
    state = status(page, sampler)
    assert state["button"] == "▶ Stream" and state["loop"]["mode"] == "disabled"
    comfy_server.wait_idle(timeout=60, settle=0.5)
    runs, history = len(events_for(page, sampler)), len(comfy_server.history())
    time.sleep(2.0)
    assert len(events_for(page, sampler)) == runs, "executions went on after Stop"
    assert len(comfy_server.history()) == history
    assert not comfy_server.queue_state()["queue_pending"]
    assert runs - before >= 4 and history - history_before >= 4
    after = status(page, sampler)
    assert after["status"]["state"] == "streaming"
    assert after["status"]["stream_frames"] == frames_before + (runs - before)

    # The view: one preview per execution, shown on the node as a loaded image of the frame's size.
    urls = page.js("return window.__views[arguments[0]].urls;", view)
    assert len(set(urls)) == runs - before and all(u.startswith("blob:") for u in urls)
    assert len(loaded) >= 2, "the Stream Preview node did not show the frames"
    # No file from the camera or the view: the frames were posted and kept in memory.
    assert temp_files(comfy_server) == temp_before
    # The replaced previews' object URLs were revoked (the frontend keeps them otherwise); the shown one works.
    fetched = page.js_async("""
        const ok = async (url) => { try { await (await fetch(url)).blob(); return true; } catch (e) { return false; } };
        const urls = window.__views[arguments[0]].urls;
        return {old: await Promise.all(urls.slice(0, -1).map(ok)), shown: await ok(urls[urls.length - 1])};
    """, view)
    assert fetched["shown"] and not any(fetched["old"]), fetched
    assert not streamrt_console_problems(page)


def test_loop_rate_is_the_executions_per_second(page: ComfyPage, comfy_server: ComfyServer, ids: dict,
                                                shots: Path) -> None:
    """The panel's loop rate (execution to execution, measured in the browser) against the executions per second
    of ComfyUI's own timestamps of the same executions: within 10%; the sampler's own fps is shown beside it."""
    sampler = ids["StreamRTSampler"]
    window = page.js("return window.StreamRT.constants.LOOP_WINDOW;")
    use_tiny_models(page, ids)
    page.js("window.StreamRT.loop.start();")
    try:
        page.wait_until(lambda: status(page, sampler)["loop"]["executions"] >= window + 2, timeout=120,
                        what=f"{window + 2} executions")
        state = status(page, sampler)  # the rate and its executions, read at once
    finally:
        stop_streaming(page, comfy_server)
    rate = state["rate"]
    assert len(rate["prompts"]) == window + 1
    history = comfy_server.history()
    starts = []
    for prompt_id in rate["prompts"]:
        messages = dict(comfy_server.status_messages(history[prompt_id]))
        starts.append(messages["execution_start"]["timestamp"] / 1000)
    server_rate = window / (starts[-1] - starts[0])
    assert rate["executions_per_s"] == pytest.approx(server_rate, rel=0.10)
    assert rate["fps"] == pytest.approx(rate["executions_per_s"])  # one frame per execution
    match = re.fullmatch(r"loop (\d+(?:\.\d+)?) fps\s+sampler (\d+(?:\.\d+)?) fps\s+\d+\.\d ms", state["lines"][1])
    assert match, state["lines"]
    assert float(match.group(1)) == pytest.approx(server_rate, rel=0.11)  # as shown, rounded
    # The sampler alone is faster than the loop (capture, upload and queueing are not in its time).
    assert float(match.group(2)) == pytest.approx(state["status"]["fps"], rel=0.06)
    assert state["status"]["fps"] > rate["executions_per_s"]
    show_node(page, sampler)
    save_shot(page, shots, "sampler_loop_rate_panel.png", clip=panel_rect(page, sampler))


CANCEL_JS = """
// Press Cancel (the frontend's Interrupt command, as the Run button's X does) when the sampler starts, until the
// stream stops: a Cancel that reaches the server after the prompt ended has nothing to interrupt.
const [id] = arguments;
const cancel = (e) => {
    if (!window.StreamRT.loop.active) api.removeEventListener("executing", cancel);
    else if (String(e.detail) === String(id)) app.extensionManager.command.execute("Comfy.Interrupt");
};
api.addEventListener("executing", cancel);
"""


def test_cancel_stops_the_stream(page: ComfyPage, comfy_server: ComfyServer, ids: dict) -> None:
    """The instant queue alone would go on after Cancel interrupted an execution; the stream stops."""
    sampler = ids["StreamRTSampler"]
    use_tiny_models(page, ids)
    before = len(events_for(page, sampler))
    page.js("window.StreamRT.loop.start();")
    try:
        page.wait_until(lambda: len(events_for(page, sampler)) >= before + 2, timeout=60, what="2 executions")
        page.js(CANCEL_JS, sampler)
        page.wait_js("return !window.StreamRT.loop.active;", timeout=10, what="the stream to stop on Cancel")
    finally:
        stop_streaming(page, comfy_server)
    runs = len(events_for(page, sampler))
    time.sleep(2.0)
    assert len(events_for(page, sampler)) == runs, "executions went on after Cancel"
    state = status(page, sampler)
    assert state["loop"]["error"] is None and state["button"] == "▶ Stream" and state["loop"]["mode"] == "disabled"


def test_stream_stops_on_execution_error(page: ComfyPage, comfy_server: ComfyServer, ids: dict,
                                         shots: Path) -> None:
    sampler = ids["StreamRTSampler"]
    use_tiny_models(page, ids, t_index_list="twenty")  # the sampler raises: not comma-separated integers
    history_before = len(comfy_server.history())
    try:
        page.js("window.StreamRT.loop.start();")
        page.wait_js("return !window.StreamRT.loop.active;", timeout=60, what="the stream to stop on the error")
        comfy_server.wait_idle(timeout=60, settle=1.0)
        assert len(comfy_server.history()) == history_before + 1  # stopped after the first failure
        state = status(page, sampler)
        assert "StreamRTSampler" in state["loop"]["error"] and state["button"] == "▶ Stream"
        assert state["loop"]["mode"] == "disabled"
        dismiss_dialogs(page)  # the error dialog
        show_node(page, sampler)
        state = status(page, sampler)
        assert state["lines"][0].startswith("● stopped: error in StreamRTSampler"), state["lines"]
        panel = save_shot(page, shots, "sampler_error_panel.png", clip=panel_rect(page, sampler))
        save_shot(page, shots, "sampler_error.png", clip=page.node_client_rect(sampler, pad=6))
        assert colour_pixels(panel, STATE_COLORS["error"]) >= 10
    finally:
        use_tiny_models(page, ids, t_index_list="")


def test_stream_stops_when_the_workflow_cannot_be_queued(page: ComfyPage, comfy_server: ComfyServer,
                                                         ids: dict) -> None:
    """A workflow the server refuses (a value out of range) never reaches the queue: the stream stops, saying so."""
    sampler = ids["StreamRTSampler"]
    use_tiny_models(page, ids, steps=0)  # below the input's minimum: refused when queued
    history_before = len(comfy_server.history())
    try:
        page.js("window.StreamRT.loop.start();")
        page.wait_js("return !window.StreamRT.loop.active;", timeout=20, what="the stream to stop")
        state = status(page, sampler)
        assert state["loop"]["error"] == "the workflow could not be queued", state["loop"]
        assert state["lines"][0] == "● stopped: the workflow could not be queued"
        assert len(comfy_server.history()) == history_before
    finally:
        dismiss_dialogs(page)
        use_tiny_models(page, ids, steps=2)
    # A good run afterwards clears the message.
    errors = page.js_async("await app.queuePrompt(0, 1); return app.lastNodeErrors;")
    assert not errors, errors
    page.wait_js("return window.StreamRT.loop.error === null;", timeout=60, what="the message to clear")
    comfy_server.wait_idle(timeout=60)


def test_vue_nodes_mode_shows_the_panel_and_the_frames(page: ComfyPage, comfy_server: ComfyServer, ids: dict,
                                                       shots: Path) -> None:
    """"Nodes 2.0" (the Vue node renderer, a frontend setting): the same panel in the node's own layout, not
    clipped; the button's label follows the stream; Stream Preview shows the frames."""
    sampler, view = ids["StreamRTSampler"], ids["StreamRTPreview"]
    page.js_async("await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true);")
    try:
        page.wait_js("return LiteGraph.vueNodesMode === true;", timeout=15, what="the Vue node renderer")
        page.wait_js(PANEL_JS + "return panelOf(arguments[0]).closest('[data-node-id]') !== null;", sampler, PANEL,
                     timeout=15, what="the panel inside the Vue node")
        use_tiny_models(page, ids)
        before = len(events_for(page, sampler))
        click_stream_button(page, sampler)
        page.wait_until(lambda: len(events_for(page, sampler)) >= before + 2, timeout=60, what="2 executions")
        running = status(page, sampler)
        shown = page.wait_js("""
            const img = document.querySelector(`[data-node-id="${arguments[0]}"] img[src^="blob:"]`);
            return img && img.complete && img.naturalWidth > 0 && [img.naturalWidth, img.naturalHeight];
        """, view, timeout=10, what="the frame on the Vue Stream Preview node")
        save_shot(page, shots, "vue_nodes_streaming.png")
        click_stream_button(page, sampler)
        page.wait_js("return !window.StreamRT.loop.active;", timeout=5, what="the stream to stop")
        comfy_server.wait_idle(timeout=60, settle=0.5)
        stopped = status(page, sampler)
        geometry = page.js(PANEL_JS + """
            const panel = panelOf(arguments[0]);
            const node = panel.closest("[data-node-id]").getBoundingClientRect();
            const lines = Array.from(panel.querySelectorAll(".streamrt-line, .streamrt-toggle"))
                .map(e => e.getBoundingClientRect());
            const r = panel.getBoundingClientRect();
            return {node: [node.left, node.top, node.right, node.bottom], panel: [r.left, r.top, r.right, r.bottom],
                    lines: lines.map(l => [l.left, l.top, l.right, l.bottom, l.height]),
                    scroll: [panel.scrollHeight, panel.clientHeight, panel.scrollWidth, panel.clientWidth]};
        """, sampler, PANEL)
        x0, y0, x1, y1 = geometry["panel"]
        save_shot(page, shots, "vue_nodes_panel.png", clip={"x": x0 - 4, "y": y0 - 4, "width": x1 - x0 + 8,
                                                            "height": y1 - y0 + 8})
    finally:
        page.js_async("await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false);")
        stop_streaming(page, comfy_server)
    assert running["button"] == "■ Stop" and stopped["button"] == "▶ Stream"
    assert shown == [SIZE, SIZE]
    assert re.fullmatch(r"loop \d+(\.\d+)? fps\s+sampler \d+(\.\d+)? fps\s+\d+\.\d ms", stopped["lines"][1])
    # not clipped: every line inside the panel, the panel inside the node, nothing scrolled away
    left, top, right, bottom = geometry["node"]
    assert left <= geometry["panel"][0] and geometry["panel"][2] <= right
    assert top <= geometry["panel"][1] and geometry["panel"][3] <= bottom
    for line in geometry["lines"]:
        assert line[4] > 5 and geometry["panel"][1] <= line[1] and line[3] <= geometry["panel"][3] + 0.5, geometry
    scroll_h, client_h, scroll_w, client_w = geometry["scroll"]
    assert scroll_h <= client_h + 1 and scroll_w <= client_w + 1, geometry
    # Back on the canvas renderer the panel is there again.
    page.wait_js(PANEL_JS + "return panelOf(arguments[0]).isConnected && panelOf(arguments[0]).offsetHeight > 0;",
                 sampler, PANEL, timeout=15, what="the panel back on the canvas")
    assert not streamrt_console_problems(page)


SEARCH_JS = """
// The frontend's own node search: the node definition store (a Pinia store, id "nodeDef") behind the search box
// and the node library, found among the app's loaded modules.
let store = null;
for (const url of performance.getEntriesByType("resource").map(e => e.name)
                  .filter(name => name.includes("/assets/") && name.endsWith(".js"))) {
    let module;
    try { module = await import(url); } catch (e) { continue; }
    const hook = Object.values(module).find(v => typeof v === "function" && v.$id === "nodeDef");
    if (hook) { store = hook(); break; }
}
if (!store) throw new Error("the frontend's node definition store was not found");
return Object.fromEntries(arguments[0].map(q => [q, store.nodeSearchService.searchNode(q).map(n => n.name)]));
"""


def test_the_node_search_finds_the_pack(page: ComfyPage) -> None:
    """What a user types into the node search box finds the sampler (or the engine nodes, the view), near the top."""
    words = ["StreamDiffusion", "realtime", "webcam", "TensorRT", "stream sampler", "stream preview", "frame input"]
    results = page.js_async(SEARCH_JS, words)
    assert "StreamRTFrameInput" in results["frame input"][:3], results["frame input"]
    assert "StreamRTFrameInput" in results["webcam"][:5], results["webcam"]
    for word in ("StreamDiffusion", "realtime", "webcam", "stream sampler"):
        assert "StreamRTSampler" in results[word][:3], (word, results[word])
    assert {"StreamRTBuildEngines", "StreamRTLoadEngines"} <= set(results["TensorRT"][:5]), results["TensorRT"]
    assert "StreamRTPreview" in results["stream preview"][:3], results["stream preview"]


def test_status_events_of_another_workflow_are_ignored(page: ComfyPage, comfy_server: ComfyServer, ids: dict) -> None:
    """Node ids repeat across open workflows: the panel only takes events of the workflow it shows."""
    sampler = ids["StreamRTSampler"]
    use_tiny_models(page, ids)
    errors = page.js_async("await app.queuePrompt(0, 1); return app.lastNodeErrors;")
    assert not errors, errors
    page.wait_until(lambda: bool(events_for(page, sampler)), timeout=60, what="a streamrt.status event")
    comfy_server.wait_idle(timeout=60)
    real = events_for(page, sampler)[-1]
    shown = page.js("return app.graph.id ?? null;")
    assert shown and real["workflow"] == shown  # the server keys and labels streams by this id
    before = status(page, sampler)["status"]
    fake = dict(real, stream_frames=real["stream_frames"] + 1000, state="reset")
    page.js("api.dispatchEvent(new CustomEvent('streamrt.status', {detail: arguments[0]}));",
            dict(fake, workflow="another-workflow"))
    assert status(page, sampler)["status"]["stream_frames"] == before["stream_frames"]
    page.js("api.dispatchEvent(new CustomEvent('streamrt.status', {detail: arguments[0]}));", fake)
    assert status(page, sampler)["status"]["stream_frames"] == fake["stream_frames"]


# ---------------------------------------------------------------------------------------------------
# Graphs of their own (the example is loaded again afterwards)

#: LoadImage [-> RepeatImageBatch] -> Realtime Sampler (tiny models) -> Stream Preview, built in the page
GRAPH_JS = """
const [model, taesd, image, repeat, steps, overlap] = arguments;
app.graph.clear();
const add = (type, pos) => { const n = LiteGraph.createNode(type); app.graph.add(n); n.pos = pos; return n; };
const set = (node, name, value) => { node.widgets.find(w => w.name === name).value = value; };
const load = add("StreamRTLoadPipeline", [40, 60]);
set(load, "model", model); set(load, "taesd", taesd);
const picture = add("LoadImage", [40, 300]);
set(picture, "image", image);
let frames = picture;
if (repeat) {
    frames = add("RepeatImageBatch", [40, 700]);
    set(frames, "amount", repeat);
    picture.connect(0, frames, "image");
}
const sampler = add("StreamRTSampler", [420, 60]);
set(sampler, "steps", steps);
const view = add("StreamRTPreview", [880, 60]);
view.setSize([300, 300]);
load.connect(0, sampler, "pipeline");
frames.connect(0, sampler, "image");
sampler.connect(0, view, "images");
if (overlap) {
    const settings = add("StreamRTSettings", [420, 700]);
    set(settings, "overlap_executions", true);
    settings.connect(0, sampler, "settings");
}
app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0];
return {sampler: sampler.id, view: view.id};
"""


@pytest.fixture
def own_graph(page: ComfyPage, comfy_server: ComfyServer, example: dict):
    """Build a graph with GRAPH_JS (``own_graph(repeat=..., steps=..., size=..., overlap=...)``); load the example
    again afterwards."""
    rng = np.random.default_rng(5)

    def build(repeat: int = 0, steps: int = 2, size: int = SIZE, overlap: bool = False) -> dict:
        picture = np.repeat(np.repeat(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8), 8, 0), 8, 1)
        name = comfy_server.write_input_image(picture, name=f"browser_frame_{size}.png")
        return page.js(GRAPH_JS, MODEL, TAESD, name, repeat, steps, overlap)

    yield build
    stop_streaming(page, comfy_server)
    load_example(page, example)


BATCH_JS = """
// While the video runs: at each preview of the sampler, what the panel says and whether the node shows an image.
const [sampler] = arguments;
const seen = window.__batch = {previews: [], success: null};
api.addEventListener("b_preview_with_metadata", (e) => {
    if (String(e.detail.displayNodeId) !== String(sampler) || seen.success) return;
    setTimeout(() => {
        const node = app.graph.getNodeById(sampler);
        const panel = node.widgets.find(w => w.name === "streamrt_stream").element;
        seen.previews.push({url: (app.nodePreviewImages[String(sampler)] ?? [])[0] ?? null,
                            line: panel.querySelector(".streamrt-line-0").textContent, t: performance.now()});
    }, 0);
});
api.addEventListener("execution_success", () => { seen.success = seen.success ?? performance.now(); });
"""


def test_a_video_previews_on_the_sampler_before_it_ends(page: ComfyPage, comfy_server: ComfyServer, own_graph,
                                                        shots: Path) -> None:
    frames_in = VIDEO_FRAMES
    graph = own_graph(repeat=frames_in)
    page.js(BATCH_JS, graph["sampler"])
    errors = page.js_async("await app.queuePrompt(0, 1); return app.lastNodeErrors;")
    assert not errors, errors
    page.wait_js("return window.__batch.previews.some(p => p.line.startsWith('● batch'));", timeout=120,
                 what="a preview with the panel saying 'batch'")
    show_node(page, graph["sampler"])
    save_shot(page, shots, "sampler_batch_running.png", clip=page.node_client_rect(graph["sampler"], pad=6))
    page.wait_js("return window.__batch.success !== null;", timeout=300, what="the video to end")
    comfy_server.wait_idle(timeout=60)
    seen = page.js("return window.__batch;")
    during = [p for p in seen["previews"] if p["t"] < seen["success"]]
    batch_lines = [p["line"] for p in during if p["line"].startswith("● batch")]
    assert len(during) >= 2 and len(batch_lines) >= 1, seen
    for line in batch_lines:
        done, total = map(int, re.fullmatch(r"● batch (\d+)/(\d+) frames", line).groups())
        assert 0 < done < total == frames_in
    assert all(p["url"] and p["url"].startswith("blob:") for p in during)
    final = status(page, graph["sampler"])
    assert final["status"]["state"] in ("warming", "streaming") and final["status"]["frames"] == frames_in
    # the node keeps the last frame
    assert page.js("return (app.nodePreviewImages[String(arguments[0])] ?? []).length;", graph["sampler"]) == 1


def test_overlapped_executions_show_the_loop_rate_and_the_frames(page: ComfyPage, comfy_server: ComfyServer,
                                                                   own_graph) -> None:
    """A sampler with Stream Settings' overlap_executions on, streamed with ▶ Stream: its panel says that it is
    overlapped instead of showing a sampler speed of its own (its executions return before their work is done), the
    loop's rate is there, and the Stream Preview shows frames."""
    graph = own_graph(steps=1, size=SIZE // 2, overlap=True)
    page.js("window.StreamRT.loop.start();")
    page.wait_until(lambda: status(page, graph["sampler"])["loop"]["executions"] >= 6, timeout=300, poll=0.5,
                    what="6 overlapped executions")
    state = status(page, graph["sampler"])
    stop_streaming(page, comfy_server)
    events = events_for(page, graph["sampler"])[-6:]
    assert all(e["overlap"] is True and e["fps"] is None for e in events), events
    assert state["status"]["overlap"] is True and state["status"]["fps"] is None, state
    overlapped_line = r"loop \d+(?:\.\d+)? fps\s+sampler overlapped \(frames 1 execution later\)"
    assert re.fullmatch(overlapped_line, state["lines"][1]), state["lines"]
    assert page.js("return (app.nodePreviewImages[String(arguments[0])] ?? []).length;", graph["view"]) == 1


def test_history_stays_bounded_over_200_executions(page: ComfyPage, comfy_server: ComfyServer, own_graph) -> None:
    """The loop deletes its older queue-history entries: after 200 executions only the newest few are there."""
    keep, batch = page.js("return [window.StreamRT.constants.HISTORY_KEEP, window.StreamRT.constants.HISTORY_BATCH];")
    graph = own_graph(steps=1, size=SIZE // 2)  # the cheapest honest execution: one step on 32x32 frames
    before = len(events_for(page, graph["sampler"]))
    page.js("window.StreamRT.loop.start();")
    page.wait_until(lambda: status(page, graph["sampler"])["loop"]["executions"] >= LOOP_EXECUTIONS,
                    timeout=600, poll=0.5, what=f"{LOOP_EXECUTIONS} executions")
    stop_streaming(page, comfy_server)
    time.sleep(1.0)  # the last deletion request
    prompts = [e["prompt_id"] for e in events_for(page, graph["sampler"])[before:]]
    assert len(prompts) >= LOOP_EXECUTIONS
    history = comfy_server.history()
    kept = [p for p in prompts if p in history]
    # + 1: the prompt the loop had already queued when it was stopped can finish after the loop's last deletion
    assert keep <= len(kept) <= keep + batch + 1, (len(kept), keep, batch)
    assert kept == prompts[-len(kept):]  # the newest ones


def test_no_console_errors_from_the_extension(page: ComfyPage, shots: Path) -> None:
    problems = streamrt_console_problems(page)
    (shots / "console.json").write_text(json.dumps(page.console, indent=2), encoding="utf-8")
    shutil.copy2(shots / "console.json", SHOTS_OUT / "console.json")  # everything the page logged
    assert not problems, json.dumps(problems, indent=2)
    # The extension registered the event: the frontend never called it an unknown message type.
    assert not page.console_entries(levels=("SEVERE", "WARNING", "INFO", "DEBUG"),
                                    containing=("Unknown message type",))
