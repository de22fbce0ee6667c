"""The StreamRT frontend extension (js/streamrt_status.js) in a real browser on the real ComfyUI.

Headless Chromium (selenium, Debian's chromium + chromedriver) opens the page served by the
``comfy_server`` fixture (ComfyUI 0.3.75 with its frontend 1.32.9), loads
example_workflows/Realtime webcam (StreamRT).json with ``app.loadGraphData`` and runs it. The WebcamCapture node is
kept: Chromium runs with a fake camera (``--use-fake-device-for-media-stream``), so each queue captures
Chromium's synthetic test pattern and uploads it like a real webcam frame. For speed the test only
switches the loader to the tiny random models and the capture size to 64x64.

Checked: the example matches the node definitions; the sampler's status panel (fps EMA seeded by the
first measurement, ms/frame, frames, backend, state) from the "streamrt.status" events, read from the
node (``node.streamrtStatus``) and from the drawn canvas (text handed to the canvas and the state
colour's pixels in a screenshot); the "▶ Stream / ■ Stop" toggle (>= 3 executions, no pile-up, the queue
stops); a failing execution stops the stream; no console errors from the extension; the frontend's own node
search finds the sampler by "StreamDiffusion", "realtime" and "webcam", and the engine nodes by "TensorRT".

Screenshots go to the test's tmp dir and are copied to ``<repo>/out/browser/`` for a person to look at.

Runs under ONE cache mode (``default``, or the first of $STREAMRT_CACHE_MODES): the extension only
reads websocket events and queues prompts; the sampler re-executes on every queue in every cache mode
(it is not idempotent), so other modes would only repeat the same browser checks at ~3x the time.
Skipped, with the reason, when chromium, chromedriver or selenium is missing.
"""

from __future__ import annotations

import json
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
STREAM_BUTTON = "▶ Stream / ■ Stop"  # the toggle widget's name (its label is "▶ Stream" or "■ Stop")
AWAY = (1000, 1000)  # an empty spot of the canvas for the mouse (no hover tooltip in screenshots)
STATE_COLORS = {"cold": (0x8a, 0x8a, 0x8a), "streaming": (0x4c, 0xaf, 0x50), "reset": (0x42, 0xa5, 0xf5),
                "error": (0xef, 0x53, 0x50)}


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


@pytest.fixture(scope="module")
def page(comfy_server: ComfyServer, e2e_tiny_models: Path, example: dict):
    prepare_user_settings(comfy_server.user_dir)
    with ComfyPage.open(comfy_server.base_url) as page:
        page.js("""
            window.__streamrtEvents = [];
            api.addEventListener("streamrt.status", e => window.__streamrtEvents.push(e.detail));
        """)
        page.js_async("await app.loadGraphData(arguments[0]);", example)
        # The fake camera is up once WebcamCapture's button says "capture" (queueing before would fail).
        page.wait_js("""
            const cam = app.graph.nodes.find(n => n.type === "WebcamCapture");
            return cam.widgets.some(w => w.type === "button" && !w.disabled);
        """, timeout=30, what="the (fake) camera")
        yield page


@pytest.fixture(scope="module")
def ids(example: dict) -> dict:
    return {t: _node(example, t)["id"] for t in ("WebcamCapture", "StreamRTLoadPipeline", "StreamRTSampler")}


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


def status(page: ComfyPage, node_id: int) -> dict:
    """node.streamrtStatus, the lines the status widget last drew, and the toggle's label."""
    return page.js("""
        const node = app.graph.getNodeById(arguments[0]);
        const panel = node.widgets.find(w => w.name === "streamrt_status");
        const button = node.widgets.find(w => w.name === window.StreamRT.widgets.button);
        return {status: node.streamrtStatus ?? null, drawn: panel?.lastDrawn ?? null,
                button: button?.label ?? null, streamer: {
                    active: window.StreamRT.streamer.active, error: window.StreamRT.streamer.error,
                    executions: window.StreamRT.streamer.executions}};
    """, node_id)


def events_for(page: ComfyPage, node_id: int) -> list[dict]:
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
    """The status panel's rectangle on the page."""
    return page.js("""
        const node = app.graph.getNodeById(arguments[0]);
        const w = node.widgets.find(w => w.name === "streamrt_status");
        const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
        const h = w.computeSize(node.size[0])[1];
        return {x: (node.pos[0] + ds.offset[0]) * ds.scale + r.left,
                y: (node.pos[1] + w.last_y + ds.offset[1]) * ds.scale + r.top,
                width: node.size[0] * ds.scale, height: h * ds.scale};
    """, node_id)


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
        set(ids.WebcamCapture, "width", size);
        set(ids.WebcamCapture, "height", size);
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
            # extension's button and panel are not saved
            assert all(slot.is_input for slot in widget_layout(spec)), (node["type"], widget_layout(spec))
        saved = widget_values_by_name(node, spec)  # types and ranges checked by workflow_problems
        for name, saved_value in saved.items():
            value = inputs[name]
            if declared[name][0] == "WEBCAM":
                assert re.fullmatch(r"webcam/\d+\.png \[temp\]", value), value  # a capture was uploaded
                continue
            intended = EXAMPLE_VALUES.get(node["type"], {}).get(name, spec_opts(declared[name]).get("default"))
            assert value == intended, f"{node['type']}.{name}: the example gives {value!r}, meant {intended!r}"
            assert value == saved_value, f"{node['type']}.{name}: the frontend sends {value!r}, saved {saved_value!r}"
            checked += 1
    assert checked >= 15
    links = {(link[1], link[3]) for link in example["links"]}
    assert links == {(ids["WebcamCapture"], ids["StreamRTSampler"]),
                     (ids["StreamRTLoadPipeline"], ids["StreamRTSampler"]),
                     (ids["StreamRTSampler"], _node(example, "PreviewImage")["id"])}

    # Before any execution the panel says "cold", drawn in the cold colour.
    sampler = ids["StreamRTSampler"]
    rect = show_node(page, sampler)
    state = status(page, sampler)
    assert state["status"] is None and state["drawn"][0].startswith("● cold"), state
    assert state["button"] == "▶ Stream"
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

    state = status(page, sampler)
    st = state["status"]
    assert st["state"] == "streaming" and st["executions"] == 3 and st["stream_frames"] == 3
    assert st["backend"] == "auto -> eager" and st["device"] == "cpu"  # what auto chose on this machine
    assert isinstance(st["fps"], (int, float)) and st["fps"] > 0
    # EMA seeded by the first measurement (not ramping up from 0)
    assert st["fps"] == pytest.approx(expected_ema([e["fps"] for e in events]), rel=1e-9)
    assert st["ms_per_frame"] == pytest.approx(events[-1]["ms_per_frame"], rel=1e-9)

    rect = show_node(page, sampler)
    drawn = status(page, sampler)["drawn"]
    assert drawn[0] == "● streaming", drawn
    match = re.match(r"fps (\d+(?:\.\d+)?)\s+(\d+\.\d) ms/frame$", drawn[1])
    assert match, drawn
    assert float(match.group(1)) == pytest.approx(st["fps"], rel=0.06)
    assert float(match.group(2)) == pytest.approx(st["ms_per_frame"], abs=0.051)
    assert drawn[2] == "frames 3   auto -> eager · cpu", drawn
    show_workflow(page)
    save_shot(page, shots, "page_streaming.png")
    show_node(page, sampler)
    save_shot(page, shots, "sampler_streaming.png", clip=rect)
    panel = save_shot(page, shots, "sampler_streaming_panel.png", clip=panel_rect(page, sampler))
    assert colour_pixels(panel, STATE_COLORS["streaming"]) >= 10  # the green state line is on the canvas
    cold = image_bytes_to_array((shots / "sampler_cold_panel.png").read_bytes())
    assert cold.shape == panel.shape and np.abs(cold - panel).max() > 0.5  # the text changed on the canvas
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
    assert status(page, sampler)["drawn"][0] == "● reset"
    panel = save_shot(page, shots, "sampler_reset_panel.png", clip=panel_rect(page, sampler))
    save_shot(page, shots, "sampler_reset.png", clip=rect)
    assert colour_pixels(panel, STATE_COLORS["reset"]) >= 10


def test_stream_toggle_requeues_until_stopped(page: ComfyPage, comfy_server: ComfyServer, ids: dict,
                                              shots: Path) -> None:
    sampler = ids["StreamRTSampler"]
    use_tiny_models(page, ids)
    show_node(page, sampler)
    before = len(events_for(page, sampler))
    history_before = len(comfy_server.history())
    frames_before = status(page, sampler)["status"]["stream_frames"]

    start = page.widget_client_point(sampler, STREAM_BUTTON)
    page.click_at(start["x"], start["y"], then_move_to=AWAY)  # a real click on the canvas button
    page.wait_js("return window.StreamRT.streamer.active;", timeout=5, what="the stream to start")
    pending_seen = []

    def requeued_four_times() -> bool:  # and, until then, how many prompts wait in the queue
        if len(events_for(page, sampler)) >= before + 4:
            return True
        pending_seen.append(len(comfy_server.queue_state()["queue_pending"]))
        return False

    page.wait_until(requeued_four_times, timeout=60, what="the stream to re-queue 4 times")
    state = status(page, sampler)
    assert state["streamer"]["active"] and state["button"] == "■ Stop"
    page.redraw()
    save_shot(page, shots, "sampler_stream_running.png", clip=page.node_client_rect(sampler, pad=6))
    assert max(pending_seen) <= 1, f"prompts piled up in the queue: {pending_seen}"

    stop = page.widget_client_point(sampler, STREAM_BUTTON)
    page.click_at(stop["x"], stop["y"], then_move_to=AWAY)
    page.wait_js("return !window.StreamRT.streamer.active;", timeout=5, what="the stream to stop")
    assert status(page, sampler)["button"] == "▶ Stream"
    comfy_server.wait_idle(timeout=60, settle=0.5)
    runs, history = len(events_for(page, sampler)), len(comfy_server.history())
    time.sleep(2.0)
    assert len(events_for(page, sampler)) == runs, "executions went on after Stop"
    assert len(comfy_server.history()) == history
    assert not comfy_server.queue_state()["queue_pending"]
    assert runs - before >= 3 and history - history_before >= 3
    after = status(page, sampler)
    assert after["status"]["state"] == "streaming"
    assert after["status"]["stream_frames"] == frames_before + (runs - before)
    assert not streamrt_console_problems(page)


def test_stream_stops_on_execution_error(page: ComfyPage, comfy_server: ComfyServer, ids: dict,
                                         shots: Path) -> None:
    sampler = ids["StreamRTSampler"]
    use_tiny_models(page, ids, t_index_list="twenty")  # the sampler raises: not comma-separated integers
    history_before = len(comfy_server.history())
    page.js("window.StreamRT.streamer.start();")
    page.wait_js("return !window.StreamRT.streamer.active;", timeout=60, what="the stream to stop on the error")
    comfy_server.wait_idle(timeout=60, settle=1.0)
    assert len(comfy_server.history()) == history_before + 1  # stopped after the first failure
    state = status(page, sampler)
    assert "StreamRTSampler" in state["streamer"]["error"] and state["button"] == "▶ Stream"
    page.js("document.querySelectorAll('.p-dialog-mask').forEach(e => e.remove());")  # the error dialog
    show_node(page, sampler)
    state = status(page, sampler)
    assert state["drawn"][0].startswith("● stopped: error in StreamRTSampler"), state["drawn"]
    panel = save_shot(page, shots, "sampler_error_panel.png", clip=panel_rect(page, sampler))
    save_shot(page, shots, "sampler_error.png", clip=page.node_client_rect(sampler, pad=6))
    assert colour_pixels(panel, STATE_COLORS["error"]) >= 10
    page.js("""
        const w = app.graph.getNodeById(arguments[0]).widgets.find(w => w.name === "t_index_list");
        w.value = "";
    """, sampler)


def test_vue_nodes_mode_shows_a_compact_status(page: ComfyPage, comfy_server: ComfyServer, ids: dict,
                                               shots: Path) -> None:
    """"Nodes 2.0" (Vue node renderer, opt-in in this frontend): the toggle shows its name and the panel
    draws one line (the renderer gives a legacy widget a single row)."""
    sampler = ids["StreamRTSampler"]
    page.js_async("await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true);")
    try:
        page.wait_js("return LiteGraph.vueNodesMode === true;", timeout=15, what="the Vue node renderer")
        use_tiny_models(page, ids)
        before = len(events_for(page, sampler))
        page.js_async("await app.queuePrompt(0, 1);")
        page.wait_until(lambda: len(events_for(page, sampler)) > before, timeout=60, what="a status event")
        comfy_server.wait_idle(timeout=60)
        line = page.wait_js("""
            const w = app.graph.getNodeById(arguments[0]).widgets.find(w => w.name === "streamrt_status");
            return w.lastDrawn?.[0]?.includes(" fps ") && w.lastDrawn[0];
        """, sampler, timeout=10, what="the compact status line")
        st = status(page, sampler)["status"]
        pattern = r"● streaming  \d+(\.\d+)? fps  \d+\.\d ms  #" + str(st["stream_frames"])
        assert re.fullmatch(pattern, line), line
        assert page.js("return document.body.innerText.includes(arguments[0]);", STREAM_BUTTON)
        show_node(page, sampler)
        save_shot(page, shots, "sampler_vue_nodes.png", clip=page.node_client_rect(sampler, pad=24))
        assert not streamrt_console_problems(page)
    finally:
        page.js_async("await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false);")


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
    """What a user types into the node search box finds the sampler (or the engine nodes), near the top."""
    results = page.js_async(SEARCH_JS, ["StreamDiffusion", "realtime", "webcam", "TensorRT", "stream sampler"])
    for word in ("StreamDiffusion", "realtime", "webcam", "stream sampler"):
        assert "StreamRTSampler" in results[word][:3], (word, results[word])
    assert {"StreamRTBuildEngines", "StreamRTLoadEngines"} <= set(results["TensorRT"][:5]), results["TensorRT"]


def test_no_console_errors_from_the_extension(page: ComfyPage, shots: Path) -> None:
    problems = streamrt_console_problems(page)
    (shots / "console.json").write_text(json.dumps(page.console, indent=2), encoding="utf-8")
    shutil.copy2(shots / "console.json", SHOTS_OUT / "console.json")  # everything the page logged
    assert not problems, json.dumps(problems, indent=2)
    # The extension registered the event: the frontend never called it an unknown message type.
    assert not page.console_entries(levels=("SEVERE", "WARNING", "INFO", "DEBUG"),
                                    containing=("Unknown message type",))


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
