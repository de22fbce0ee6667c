"""Every example workflow (example_workflows/*.json) against the real ComfyUI server and its frontend.

For each file (parametrized over the folder, so a new example is checked without touching this test):

* it is a UI workflow (version 0.4, nodes, links); every node type is known to the server's
  /object_info, except the UI-only nodes listed in :data:`UI_ONLY_NODES`; every link joins existing
  nodes and slots with matching types; every required non-widget input is connected; and
  ``widgets_values`` match the node's widget inputs (in /object_info ``input_order``) in count and
  types, with the extra values this frontend saves (see :func:`widget_layout`);
* in headless Chromium (like tests/test_browser_e2e.py), ``app.loadGraphData`` loads it without the
  "missing nodes" dialog, every node type is registered in ``LiteGraph.registered_node_types``, the
  frontend saves the same widgets_values back, and the frontend's own ``app.graphToPrompt()`` equals
  :func:`to_api_prompt` here (so the converter below follows the frontend's rules).

An example whose only unknown nodes are StreamRT nodes defined in nodes/*.py but not registered by the
pack yet (example_workflows/engine_build.json while the engine nodes are being wired) is SKIPPED with
that reason; any other unknown node fails.

Then the two examples built by tests/browser/build_example_workflow.py are RUN on the server, converted
to API prompts by :func:`to_api_prompt` with the tiny random models and test media substituted, and
``acceleration`` as shipped (``auto``: eager on this machine without a GPU, which the status event says):

* batch_video.json with a synthetic mp4 (PyAV): one SaveImage output per input frame, and the saved
  video has the input's frame count and frame rate (fps is linked from GetVideoComponents);
* realtime_webcam.json with an uploaded PNG as WebcamCapture's image (an API prompt has no camera):
  queued twice, the stream advanced (frame 1, then 2) and the two outputs differ.

Runs under ONE cache mode (``default``, or the first of $STREAMRT_CACHE_MODES): what is checked here is
the example files and that they run; how the sampler behaves under --cache-none / --cache-lru is covered
by tests/test_nodes_e2e.py, and the frontend checks do not depend on the server's cache.
The browser part is skipped, with the reason, when chromium, chromedriver or selenium is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser.build_example_workflow import EXAMPLES as BUILT_EXAMPLES
from browser.page import ComfyPage, browser_missing_reason, prepare_user_settings
from comfy_harness import ComfyServer
from test_browser_e2e import is_widget_input as frontend_makes_widget

from stream_helpers import E2E_MODEL as MODEL, E2E_TAESD as TAESD

REPO = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO / "example_workflows"
EXAMPLE_FILES = sorted(EXAMPLES_DIR.glob("*.json"))
#: examples that must never be skipped (they use only registered nodes)
OWNED = {"realtime_webcam.json", "batch_video.json"}
#: builder name (tests/browser/build_example_workflow.py) per file
BUILT = {example.output.name: name for name, example in BUILT_EXAMPLES.items()}

#: frontend-only nodes: not in /object_info, not sent to the server; each has one text widget
UI_ONLY_NODES = {"Note", "MarkdownNote"}
#: combos whose options are the user's own files: a saved value need not be among this server's options
USER_FILE_COMBOS = {("StreamRTLoadPipeline", "model"), ("StreamRTLoadPipeline", "taesd"),
                    ("StreamRTLora", "lora_name")}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")

SIZE = 64
VIDEO_FRAMES = 12
VIDEO_FPS = 12


def _cache_mode() -> str:
    raw = [m.strip() for m in os.environ.get("STREAMRT_CACHE_MODES", "").split(",") if m.strip()]
    return "default" if not raw or "default" in raw else raw[0]


_missing_browser = browser_missing_reason()
needs_browser = pytest.mark.skipif(_missing_browser is not None,
                                   reason=f"browser tests need Chromium: {_missing_browser}")
pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("comfy_server", [_cache_mode()], indirect=True)]
per_example = pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])


# --------------------------------------------------------------------------------------------------
# the frontend's rules for widgets_values


@dataclass(frozen=True)
class WidgetSlot:
    """One entry of a node's widgets_values: a widget input, or an extra widget the frontend adds."""

    name: str
    kind: Any  # the input type ("INT", "COMBO", an options list, "WEBCAM"), or "CONTROL" / "BUTTON"
    opts: dict = field(default_factory=dict)
    is_input: bool = True


def declared_inputs(spec: dict) -> tuple[dict, list[str]]:
    """{name: input spec} and the input order (required, then optional) of an /object_info entry."""
    declared = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
    order = spec["input_order"].get("required", []) + spec["input_order"].get("optional", [])
    return declared, order


def spec_opts(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_combo(kind: Any) -> bool:
    return isinstance(kind, list) or kind == "COMBO"


def is_widget(spec: list) -> bool:
    """Whether the frontend makes a widget for an input (tests/test_browser_e2e.py's rule, and not forceInput)."""
    return frontend_makes_widget(spec) and not spec_opts(spec).get("forceInput")


def widget_layout(spec: dict) -> list[WidgetSlot]:
    """What a node of this /object_info entry saves in widgets_values, in order (frontend 1.32.9):

    one value per widget input in input_order; after an INT with ``control_after_generate`` (on by
    default for inputs named seed / noise_seed) or a combo with it, the control mode ("fixed", ...);
    after a combo with image/video/audio_upload the upload button's value; a WEBCAM input adds the
    "capture" button at the end.
    """
    declared, order = declared_inputs(spec)
    slots: list[WidgetSlot] = []
    trailing: list[WidgetSlot] = []
    for name in order:
        if not is_widget(declared[name]):
            continue
        kind, opts = declared[name][0], spec_opts(declared[name])
        slots.append(WidgetSlot(name, kind, opts))
        if (kind == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed"))) or (
                is_combo(kind) and opts.get("control_after_generate")):
            slots.append(WidgetSlot(f"{name}.control_after_generate", "CONTROL", is_input=False))
        if is_combo(kind) and any(opts.get(flag) for flag in UPLOAD_FLAGS):
            slots.append(WidgetSlot("upload", "BUTTON", is_input=False))
        if kind == "WEBCAM":
            trailing.append(WidgetSlot("capture", "BUTTON", is_input=False))
    return slots + trailing


def widget_problems(node: dict, spec: dict) -> list[str]:
    """What is wrong with a node's widgets_values, or [] (count, then each value's type and range)."""
    where = f"node {node['id']} ({node['type']})"
    values = node.get("widgets_values", [])
    if not isinstance(values, list):
        return [f"{where}: widgets_values is not a list: {values!r}"]
    layout = widget_layout(spec)
    if len(values) != len(layout):
        return [f"{where}: {len(values)} widgets_values {values!r} but the node has {len(layout)} widgets "
                f"{[s.name for s in layout]}"]
    problems = []
    for slot, value in zip(layout, values):
        what = f"{where}.{slot.name} = {value!r}"
        lo, hi = slot.opts.get("min"), slot.opts.get("max")
        if slot.kind == "CONTROL":
            ok = value in CONTROL_VALUES
        elif slot.kind == "BUTTON":
            ok = value is None or isinstance(value, str)
        elif slot.kind == "INT":
            ok = isinstance(value, int) and not isinstance(value, bool) and (lo is None or value >= lo) and (
                hi is None or value <= hi)
        elif slot.kind == "FLOAT":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                lo is None or value >= lo) and (hi is None or value <= hi)
        elif slot.kind == "BOOLEAN":
            ok = isinstance(value, bool)
        elif slot.kind in ("STRING", "WEBCAM"):
            ok = isinstance(value, str)
        elif is_combo(slot.kind):
            options = slot.kind if isinstance(slot.kind, list) else slot.opts.get("options", [])
            user_file = ((node["type"], slot.name) in USER_FILE_COMBOS
                         or any(slot.opts.get(flag) for flag in UPLOAD_FLAGS))
            ok = isinstance(value, (str, int, float)) and (value in options or (user_file and isinstance(value, str)
                                                                                 and value not in ("", "undefined")))
        else:
            ok = False
            what += f" (unknown widget type {slot.kind!r})"
        if not ok:
            problems.append(what + f" does not fit {slot.kind!r} {slot.opts or ''}")
    return problems


def widget_values_by_name(node: dict, spec: dict) -> dict[str, Any]:
    """The node's widget inputs {name: saved value} (extras such as buttons left out)."""
    return {slot.name: value for slot, value in zip(widget_layout(spec), node.get("widgets_values", []))
            if slot.is_input}


def types_match(output_type: str, input_type: str) -> bool:
    """ComfyUI's rule: equal, a wildcard, or overlapping comma-separated unions."""
    if "*" in (output_type, input_type):
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


def ui_input_type(spec: list) -> str:
    """The type the frontend writes for an input slot (a list of options is "COMBO")."""
    return "COMBO" if isinstance(spec[0], list) else spec[0]


# --------------------------------------------------------------------------------------------------
# UI workflow -> API prompt


def to_api_prompt(workflow: dict, info: dict) -> dict:
    """The API prompt the frontend's graphToPrompt makes of a (flat, all-active) UI workflow:
    widget inputs from widgets_values in input_order, links as ``[origin id, slot]``, UI-only nodes dropped."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY_NODES:
            continue
        if node.get("mode", 0) != 0:
            raise NotImplementedError(f"node {node['id']} is muted or bypassed (mode {node['mode']})")
        inputs = widget_values_by_name(node, info[node["type"]])
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def with_id_prefix(prompt: dict, prefix: str) -> dict:
    """The same prompt with every node id prefixed (links too). The sampler keeps one stream per node
    id: prefixed ids keep these runs apart from other tests' streams on the shared server (e.g.
    tests/test_browser_e2e.py streams the realtime example's node 3 and counts its frames from 1)."""
    def relink(value: Any) -> Any:
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] in prompt:
            return [prefix + value[0], value[1]]
        return value

    return {prefix + nid: {**node, "inputs": {k: relink(v) for k, v in node["inputs"].items()}}
            for nid, node in prompt.items()}


def substitute(prompt: dict, class_type: str, **values: Any) -> list[str]:
    """Set inputs of every node of a class (each must exist already); return the node ids."""
    ids = [nid for nid, node in prompt.items() if node["class_type"] == class_type]
    assert ids, f"no {class_type} in the prompt"
    for nid in ids:
        for name, value in values.items():
            assert name in prompt[nid]["inputs"], f"{class_type} has no input {name}"
            prompt[nid]["inputs"][name] = value
    return ids


# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def server(comfy_server: ComfyServer, e2e_tiny_models: Path) -> ComfyServer:
    return comfy_server


@pytest.fixture(scope="module")
def info(server: ComfyServer) -> dict:
    return server.object_info()


def load_example(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def defined_but_unregistered(missing: set[str]) -> set[str]:
    """Those of ``missing`` that a StreamRT source file defines (node_id="...") though the pack does not
    register them (yet)."""
    defined = set()
    for source in (REPO / "nodes").glob("*.py"):
        defined.update(re.findall(r'node_id="(StreamRT\w+)"', source.read_text(encoding="utf-8")))
    return missing & defined


def skip_or_fail_on_missing(path: Path, workflow: dict, info: dict) -> None:
    """Fail on node types the server does not know, unless they are only not-yet-registered StreamRT
    nodes of an example owned by someone else: then skip, saying so."""
    missing = {n["type"] for n in workflow["nodes"]} - set(info) - UI_ONLY_NODES
    if not missing:
        return
    pending = defined_but_unregistered(missing)
    if pending == missing and path.name not in OWNED:
        pytest.skip(f"{path.name}: node(s) {sorted(missing)} are defined in nodes/*.py but not registered by "
                    "the pack yet (nodes/__init__.py NODES)")
    pytest.fail(f"{path.name}: node types unknown to the server: {sorted(missing)} "
                f"(UI-only nodes allowed: {sorted(UI_ONLY_NODES)})")


# --------------------------------------------------------------------------------------------------
# the files


@per_example
def test_example_is_a_valid_ui_workflow(path: Path, server: ComfyServer, info: dict) -> None:
    workflow = load_example(path)
    assert workflow.get("version") == 0.4, workflow.get("version")
    assert isinstance(workflow.get("nodes"), list) and workflow["nodes"]
    assert isinstance(workflow.get("links"), list)
    skip_or_fail_on_missing(path, workflow, info)

    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]), "duplicate node ids"
    assert workflow["last_node_id"] >= max(nodes)
    links = {link[0]: link for link in workflow["links"]}
    assert len(links) == len(workflow["links"]), "duplicate link ids"
    assert not links or workflow["last_link_id"] >= max(links)

    problems: list[str] = []
    # links: existing nodes and slots, both ends agree, types match
    for link in workflow["links"]:
        assert len(link) == 6, link
        lid, src_id, src_slot, dst_id, dst_slot, link_type = link
        src, dst = nodes.get(src_id), nodes.get(dst_id)
        if src is None or dst is None:
            problems.append(f"link {link}: node {src_id if src is None else dst_id} does not exist")
            continue
        if src["type"] in UI_ONLY_NODES or dst["type"] in UI_ONLY_NODES:
            problems.append(f"link {link}: joins a UI-only node")
            continue
        outputs = info[src["type"]]["output"]
        if not (0 <= src_slot < len(outputs) and src_slot < len(src.get("outputs", []))):
            problems.append(f"link {link}: {src['type']} has no output {src_slot}")
            continue
        out = src["outputs"][src_slot]
        if lid not in (out.get("links") or []):
            problems.append(f"link {link}: not listed in {src['type']}.outputs[{src_slot}].links")
        if out["type"] != outputs[src_slot]:
            problems.append(f"link {link}: {src['type']} output {src_slot} is {outputs[src_slot]}, saved {out['type']}")
        if not 0 <= dst_slot < len(dst.get("inputs", [])):
            problems.append(f"link {link}: {dst['type']} has no input slot {dst_slot}")
            continue
        slot = dst["inputs"][dst_slot]
        declared, _ = declared_inputs(info[dst["type"]])
        if slot.get("link") != lid:
            problems.append(f"link {link}: {dst['type']}.{slot['name']} holds link {slot.get('link')}")
        if slot["name"] not in declared:
            problems.append(f"link {link}: {dst['type']} has no input {slot['name']}")
            continue
        in_type = ui_input_type(declared[slot["name"]])
        if not types_match(outputs[src_slot], in_type):
            problems.append(f"link {link}: {outputs[src_slot]} into {dst['type']}.{slot['name']} ({in_type})")
        if link_type != in_type or slot["type"] != in_type:
            problems.append(f"link {link}: type {link_type} / slot type {slot['type']}, input is {in_type}")

    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        for slot in node.get("inputs", []):
            if slot.get("link") is not None and slot["link"] not in links:
                problems.append(f"{where}.{slot['name']}: link {slot['link']} does not exist")
        for out in node.get("outputs", []):
            for lid in out.get("links") or []:
                if lid not in links:
                    problems.append(f"{where}.{out['name']}: link {lid} does not exist")
        if node["type"] in UI_ONLY_NODES:
            values = node.get("widgets_values")
            if not (isinstance(values, list) and len(values) == 1 and isinstance(values[0], str) and values[0]):
                problems.append(f"{where}: a note with one text, got {values!r}")
            continue
        spec = info[node["type"]]
        declared, order = declared_inputs(spec)
        # every required non-widget input (a socket) is connected: the server would refuse the prompt
        connected = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        for name in spec["input_order"].get("required", []):
            if not is_widget(declared[name]) and name not in connected:
                problems.append(f"{where}: required input {name} is not connected")
        # the saved slots are this node's: outputs in order, inputs by name
        saved_outputs = [o["type"] for o in node.get("outputs", [])]
        if saved_outputs != list(spec["output"]):
            problems.append(f"{where}: outputs {saved_outputs}, the node has {spec['output']}")
        extras = {s.name for s in widget_layout(spec) if not s.is_input}
        for slot in node.get("inputs", []):
            if slot["name"] not in declared and slot["name"] not in extras:
                problems.append(f"{where}: unknown input slot {slot['name']}")
        problems += widget_problems(node, spec)
    assert not problems, "\n".join(problems)

    if path.name in BUILT:  # the builder's values (by name) and the node defaults elsewhere
        example = BUILT_EXAMPLES[BUILT[path.name]]
        prompt = to_api_prompt(workflow, info)
        for node in workflow["nodes"]:
            if node["type"] in UI_ONLY_NODES:
                assert node["widgets_values"] == [example.note], f"{path.name}: the note is not the builder's"
                continue
            declared, order = declared_inputs(info[node["type"]])
            for name, value in prompt[str(node["id"])]["inputs"].items():
                if isinstance(value, list):  # linked
                    continue
                intended = example.values.get(node["type"], {}).get(name, spec_opts(declared[name]).get("default"))
                if intended is not None and declared[name][0] != "WEBCAM":
                    assert value == intended, f"{path.name}: {node['type']}.{name} = {value!r}, meant {intended!r}"


def test_batch_video_graph(info: dict) -> None:
    """The batch example is the graph it is meant to be (by node type and slot name)."""
    assert OWNED <= {p.name for p in EXAMPLE_FILES}
    workflow = load_example(EXAMPLES_DIR / "batch_video.json")
    types = {n["id"]: n["type"] for n in workflow["nodes"]}
    names = {n["id"]: [s["name"] for s in n.get("inputs", [])] for n in workflow["nodes"]}
    edges = {(types[src], info[types[src]]["output_name"][slot], types[dst], names[dst][dslot])
             for _, src, slot, dst, dslot, _ in workflow["links"]}
    assert edges == {
        ("LoadVideo", "VIDEO", "GetVideoComponents", "video"),
        ("GetVideoComponents", "images", "StreamRTSampler", "image"),
        ("StreamRTLoadPipeline", "pipeline", "StreamRTSampler", "pipeline"),
        ("StreamRTSampler", "image", "SaveImage", "images"),
        ("StreamRTSampler", "image", "CreateVideo", "images"),
        ("GetVideoComponents", "fps", "CreateVideo", "fps"),
        ("CreateVideo", "VIDEO", "SaveVideo", "video"),
    }, edges
    assert sorted(types.values()) == sorted(["LoadVideo", "GetVideoComponents", "StreamRTLoadPipeline",
                                             "StreamRTSampler", "SaveImage", "CreateVideo", "SaveVideo", "Note"])
    prompt = to_api_prompt(workflow, info)
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    assert by_type["LoadVideo"]["file"] == "input.mp4"
    assert by_type["StreamRTLoadPipeline"]["model"] == "sd-turbo"
    assert by_type["StreamRTLoadPipeline"]["taesd"] == "taesd"
    assert by_type["StreamRTSampler"]["acceleration"] == "auto"
    assert by_type["StreamRTSampler"]["t_index_list"] == "32,45"
    assert by_type["SaveImage"]["filename_prefix"] == "streamrt/frame"
    assert by_type["SaveVideo"]["filename_prefix"] == "streamrt/video"
    note = next(n for n in workflow["nodes"] if n["type"] == "Note")["widgets_values"][0]
    for words in ("batch video mode", "aligned", "models/diffusers", "models/vae_approx", "auto", "cuda_graph",
                  "compile", "eager", "frames_per_step to 4"):
        assert words in note.lower() or words in note, words


# --------------------------------------------------------------------------------------------------
# running them


def _load_demo():
    spec = importlib.util.spec_from_file_location("streamrt_demo_script", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decoded_video(path: Path) -> tuple[int, float]:
    """(frames, frames per second) of a video file, decoded with PyAV."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate)
        return sum(1 for _ in container.decode(stream)), rate


def test_batch_video_example_runs(server: ComfyServer, info: dict) -> None:
    name = f"example_{uuid.uuid4().hex[:8]}.mp4"
    _load_demo().make_input_video(server.input_dir / name, VIDEO_FRAMES, SIZE, fps=VIDEO_FPS)
    frames_in, fps_in = decoded_video(server.input_dir / name)
    assert (frames_in, fps_in) == (VIDEO_FRAMES, VIDEO_FPS)

    prompt = with_id_prefix(to_api_prompt(load_example(EXAMPLES_DIR / "batch_video.json"), info), "example-")
    substitute(prompt, "LoadVideo", file=name)
    substitute(prompt, "StreamRTLoadPipeline", model=MODEL, taesd=TAESD)
    (sampler_id,) = [nid for nid, n in prompt.items() if n["class_type"] == "StreamRTSampler"]
    assert prompt[sampler_id]["inputs"]["acceleration"] == "auto"  # runs as shipped
    (save_id,) = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
    (video_id,) = [nid for nid, n in prompt.items() if n["class_type"] == "SaveVideo"]
    outputs = server.run(prompt, timeout=120)

    images = outputs[save_id]["images"]
    assert len(images) == frames_in  # one output frame per input frame
    assert all(i["subfolder"] == "streamrt" and i["filename"].startswith("frame_") for i in images), images
    frames = server.output_images(outputs, save_id)
    assert all(f.shape[:2] == (SIZE, SIZE) for f in frames)
    assert np.abs(frames[0] - frames[-1]).max() > 0  # not one picture repeated

    (video,) = outputs[video_id]["images"]
    path = server.output_file(video)
    assert path.is_file() and path.suffix == ".mp4" and path.name.startswith("video"), path
    frames_out, fps_out = decoded_video(path)
    assert frames_out == frames_in
    assert fps_out == pytest.approx(fps_in)  # linked from GetVideoComponents, not CreateVideo's 30


def test_realtime_example_runs_and_streams(server: ComfyServer, info: dict) -> None:
    """WebcamCapture is a LoadImage in the API: an uploaded PNG stands in for the camera."""
    rng = np.random.default_rng(3)
    image = np.repeat(np.repeat(rng.integers(0, 256, (SIZE // 8, SIZE // 8, 3), dtype=np.uint8), 8, 0), 8, 1)
    name = server.write_input_image(image, name=f"webcam_{uuid.uuid4().hex[:8]}.png")

    prompt = with_id_prefix(to_api_prompt(load_example(EXAMPLES_DIR / "realtime_webcam.json"), info), "example-")
    substitute(prompt, "WebcamCapture", image=name)
    substitute(prompt, "StreamRTLoadPipeline", model=MODEL, taesd=TAESD)
    (sampler_id,) = [nid for nid, n in prompt.items() if n["class_type"] == "StreamRTSampler"]
    assert prompt[sampler_id]["inputs"]["acceleration"] == "auto"  # runs as shipped
    (preview_id,) = [nid for nid, n in prompt.items() if n["class_type"] == "PreviewImage"]
    assert prompt[sampler_id]["inputs"]["reset"] is False
    first = json.loads(json.dumps(prompt))
    first[sampler_id]["inputs"]["reset"] = True  # a fresh stream, whatever ran on this server before

    results = []
    with server.websocket() as ws:
        for graph in (first, prompt):
            outputs = server.run(graph, timeout=120, client_id=ws.client_id)
            (frame,) = server.output_images(outputs, preview_id)
            results.append(frame)
        ws.wait_for(lambda t, d: t == "streamrt.status" and d.get("stream_frames") == 2, timeout=10)
        events = [e for e in ws.of_type("streamrt.status") if str(e.get("node")) == sampler_id]
    assert [(e["state"], e["stream_frames"]) for e in events] == [("reset", 1), ("streaming", 2)], events
    assert {(e["backend"], e["acceleration"]) for e in events} == {("auto -> eager", "eager")}  # chosen, and said
    assert results[0].shape == results[1].shape == (SIZE, SIZE, 3)
    assert np.abs(results[0] - results[1]).max() > 1 / 255, "the second frame of the stream equals the first"


# --------------------------------------------------------------------------------------------------
# in the browser

LOAD_JS = """
const workflow = arguments[0];
document.querySelectorAll('.p-dialog-mask').forEach(e => e.remove());
await app.loadGraphData(workflow);
await new Promise(r => setTimeout(r, 300));
const registered = LiteGraph.registered_node_types;
return {
    dialogs: Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText),
    unregistered: app.graph.nodes.filter(n => !(n.type in registered)).map(n => n.type),
    with_errors: app.graph.nodes.filter(n => n.has_errors).map(n => n.type),
    saved: Object.fromEntries(app.graph.serialize().nodes.map(n => [n.id, n.widgets_values ?? null])),
};
"""


@pytest.fixture(scope="module")
def page(server: ComfyServer):
    prepare_user_settings(server.user_dir)
    with ComfyPage.open(server.base_url) as page:
        yield page


@needs_browser
@per_example
def test_example_loads_in_the_frontend(path: Path, page: ComfyPage, server: ComfyServer, info: dict) -> None:
    workflow = load_example(path)
    state = page.js_async(LOAD_JS, workflow)
    missing = sorted(set(state["unregistered"]))
    if missing:  # the frontend's missing-nodes dialog names them
        assert any("missing nodes" in d.lower() and all(t in d for t in missing) for d in state["dialogs"]), state
        assert set(missing) == {n["type"] for n in workflow["nodes"]} - set(info) - UI_ONLY_NODES
        skip_or_fail_on_missing(path, workflow, info)
    assert not [d for d in state["dialogs"] if "missing" in d.lower()], state["dialogs"]
    assert not state["with_errors"], state
    # the frontend keeps the saved values (no migration, no dropped or added widget values); a node
    # without widgets is saved with no widgets_values when built, and with [] once loaded
    saved = {node_id: values or [] for node_id, values in state["saved"].items()}
    assert saved == {str(n["id"]): n.get("widgets_values") or [] for n in workflow["nodes"]}

    # and makes the same API prompt as to_api_prompt (WebcamCapture uploads a capture: wait for the camera)
    if any(n["type"] == "WebcamCapture" for n in workflow["nodes"]):
        page.wait_js("""
            const cam = app.graph.nodes.find(n => n.type === "WebcamCapture");
            return cam.widgets.some(w => w.type === "button" && !w.disabled);
        """, timeout=30, what="the (fake) camera")
    frontend = page.js_async("return (await app.graphToPrompt()).output;")
    ours = to_api_prompt(workflow, info)
    for node_id, node in frontend.items():
        node.pop("_meta", None)
        # The frontend also sends frontend-only widgets as inputs (WebcamCapture's button as
        # "waiting for camera...": null, PreviewAny's "preview": ""); the server ignores inputs a node
        # does not declare.
        declared, _ = declared_inputs(info[node["class_type"]])
        undeclared = {k: v for k, v in node["inputs"].items() if k not in declared}
        assert all(v in (None, "") for v in undeclared.values()), undeclared
        node["inputs"] = {k: v for k, v in node["inputs"].items() if k in declared}
        if node["class_type"] == "WebcamCapture":  # the capture just taken vs the saved (empty) value
            assert re.fullmatch(r"webcam/\d+\.png \[temp\]", node["inputs"]["image"]), node
            node["inputs"]["image"] = ours[node_id]["inputs"]["image"]
    assert frontend == ours
