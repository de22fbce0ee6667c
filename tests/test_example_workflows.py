"""Every example workflow (example_workflows/*.json) against the real ComfyUI server and its frontend.

For each file (parametrized over the folder, so a new example is checked without touching this test):

* :func:`workflows.workflow_problems` (tests/workflows.py) finds nothing: it is a UI workflow (version
  0.4, nodes, links); every node type is known to the server's /object_info, except the UI-only nodes
  listed in :data:`workflows.UI_ONLY_NODES`; every link joins existing nodes and slots with matching
  types; every required non-widget input is connected; and ``widgets_values`` match the node's widget
  inputs (in /object_info ``input_order``) in count and types, with the extra values this frontend saves
  (see :func:`workflows.widget_layout`); an example built by tests/browser/build_example_workflow.py
  holds the builder's values (by name) and the node defaults elsewhere;
* in headless Chromium (like tests/test_browser_e2e.py), ``app.loadGraphData`` loads it without the
  "missing nodes" dialog, every node type is registered in ``LiteGraph.registered_node_types``, the
  frontend saves the same widgets_values back, and the frontend's own ``app.graphToPrompt()`` equals
  :func:`workflows.to_api_prompt` (so that converter follows the frontend's rules).

An example whose only unknown nodes are StreamRT nodes defined in nodes/*.py but not registered by the
pack yet (example_workflows/TensorRT engines (StreamRT).json while the engine nodes are being wired) is SKIPPED with
that reason; any other unknown node fails.

Then the two examples built by tests/browser/build_example_workflow.py are RUN on the server, converted
to API prompts by :func:`workflows.to_api_prompt` with the tiny random models and test media substituted, and
``acceleration`` as shipped (``auto``: eager on this machine without a GPU, which the status event says):

* Batch video (StreamRT).json with a synthetic mp4 (PyAV): one SaveImage output per input frame, and the saved
  video has the input's frame count and frame rate (fps is linked from GetVideoComponents);
* Realtime webcam (StreamRT).json with a PNG posted to its Stream Frame Input's source before each run (an API
  prompt has no camera): queued twice, the stream advanced (frame 1, then 2), Stream Preview sent each frame over
  the websocket (with its node id, as to the frontend; nothing saved) and the two frames differ.

Runs under ONE cache mode (``default``, or the first of $STREAMRT_CACHE_MODES): what is checked here is
the example files and that they run; how the sampler behaves under --cache-none / --cache-lru is covered
by tests/test_nodes_e2e.py, and the frontend checks do not depend on the server's cache.
The browser part is skipped, with the reason, when chromium, chromedriver or selenium is missing.

Every example has a thumbnail: ``<name>.jpg`` beside it (a 512x512 screenshot of its graph, made by
tests/browser/make_thumbnails.py), served where ComfyUI's template browser asks for it
(``/api/workflow_templates/StreamRT/<name>.jpg``); in the browser, the template browser's StreamRT cards show those
pictures (not the placeholder) under the examples' names as titles, and a card opens its workflow.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from browser.build_example_workflow import EXAMPLES as BUILT_EXAMPLES
from browser.page import ComfyPage, browser_missing_reason, prepare_user_settings
from comfy_harness import ComfyServer, array_to_png_bytes, decode_preview, image_bytes_to_array
from e2e_helpers import MODEL, TAESD
from model_files import (
    SD15_LAYOUT_CKPT,
    SD15_LAYOUT_CONTROLNET,
    write_sd15_layout_checkpoint,
    write_sd15_layout_controlnet,
)
from stream_helpers import first_cache_mode
from workflows import UI_ONLY_NODES, declared_inputs, spec_opts, to_api_prompt, unknown_node_types, workflow_problems

REPO = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO / "example_workflows"
EXAMPLE_FILES = sorted(EXAMPLES_DIR.glob("*.json"))
#: examples that must never be skipped (they use only registered nodes)
OWNED = {"Realtime webcam (StreamRT).json", "Batch video (StreamRT).json"}
#: builder name (tests/browser/build_example_workflow.py) per file
BUILT = {example.output.name: name for name, example in BUILT_EXAMPLES.items()}

SIZE = 64
VIDEO_FRAMES = 12
VIDEO_FPS = 12


_missing_browser = browser_missing_reason()
needs_browser = pytest.mark.skipif(_missing_browser is not None,
                                   reason=f"browser tests need Chromium: {_missing_browser}")
pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("comfy_server", [first_cache_mode()], indirect=True)]
per_example = pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])


# --------------------------------------------------------------------------------------------------
# API prompts of the examples


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


@pytest.fixture(scope="session")
def e2e_tiny_models(streamrt_models_root: Path) -> Path:
    """The tiny models, a checkpoint Load Checkpoint recognises (for the batch example's route) and a ControlNet
    ControlNetLoader recognises for it (the ControlNet example)."""
    from stream_helpers import write_e2e_models

    write_sd15_layout_checkpoint(streamrt_models_root)
    write_sd15_layout_controlnet(streamrt_models_root)
    return write_e2e_models(streamrt_models_root)


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
    missing = unknown_node_types(workflow, info)
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
    skip_or_fail_on_missing(path, workflow, info)
    problems = workflow_problems(workflow, info)
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
                if node.get("title") in example.texts and name == "text":
                    intended = example.texts[node["title"]]
                if intended is not None and declared[name][0] != "WEBCAM":
                    assert value == intended, f"{path.name}: {node['type']}.{name} = {value!r}, meant {intended!r}"


@per_example
def test_example_has_a_thumbnail_that_the_server_serves(path: Path, server: ComfyServer) -> None:
    """ComfyUI's template browser shows /api/workflow_templates/<pack>/<name>.jpg for each example (frontend 1.32:
    ``mediaSubtype: "jpg"`` for custom node templates) and a placeholder where it is missing."""
    from PIL import Image

    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"{thumbnail.name} is missing: run tests/browser/make_thumbnails.py"
    served = server.get(f"/api/workflow_templates/StreamRT/{quote(thumbnail.name)}")
    assert served.status_code == 200 and served.headers["Content-Type"] == "image/jpeg", served
    assert served.content == thumbnail.read_bytes()
    image = Image.open(io.BytesIO(served.content))
    assert image.format == "JPEG" and image.size == (512, 512)
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 10, "the thumbnail is (nearly) one flat colour: not a picture of the graph"
    assert path.stem in server.get("/api/workflow_templates").json().get("StreamRT", [])


def test_batch_video_graph(info: dict) -> None:
    """The batch example is the graph it is meant to be (by node type and slot name)."""
    assert OWNED <= {p.name for p in EXAMPLE_FILES}
    workflow = load_example(EXAMPLES_DIR / "Batch video (StreamRT).json")
    types = {n["id"]: n["type"] for n in workflow["nodes"]}
    names = {n["id"]: [s["name"] for s in n.get("inputs", [])] for n in workflow["nodes"]}
    edges = {(types[src], info[types[src]]["output_name"][slot], types[dst], names[dst][dslot])
             for _, src, slot, dst, dslot, _ in workflow["links"]}
    assert edges == {
        ("LoadVideo", "VIDEO", "GetVideoComponents", "video"),
        ("GetVideoComponents", "images", "StreamRTSampler", "image"),
        ("CheckpointLoaderSimple", "MODEL", "StreamRTPipelineFromModel", "model"),
        ("CheckpointLoaderSimple", "CLIP", "StreamRTPipelineFromModel", "clip"),
        ("CheckpointLoaderSimple", "VAE", "StreamRTPipelineFromModel", "vae"),
        ("CheckpointLoaderSimple", "CLIP", "CLIPTextEncode", "clip"),
        ("CLIPTextEncode", "CONDITIONING", "StreamRTSampler", "positive"),
        ("CLIPTextEncode", "CONDITIONING", "StreamRTSampler", "negative"),
        ("StreamRTPipelineFromModel", "pipeline", "StreamRTSampler", "pipeline"),
        ("StreamRTSampler", "image", "SaveImage", "images"),
        ("StreamRTSampler", "image", "CreateVideo", "images"),
        ("StreamRTSettings", "settings", "StreamRTSampler", "settings"),
        ("GetVideoComponents", "fps", "CreateVideo", "fps"),
        ("CreateVideo", "VIDEO", "SaveVideo", "video"),
    }, edges
    assert sorted(types.values()) == sorted(["LoadVideo", "GetVideoComponents", "CheckpointLoaderSimple",
                                             "CLIPTextEncode", "CLIPTextEncode", "StreamRTPipelineFromModel",
                                             "StreamRTSettings", "StreamRTSampler", "SaveImage", "CreateVideo",
                                             "SaveVideo", "Note"])
    prompt = to_api_prompt(workflow, info)
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    assert by_type["LoadVideo"]["file"] == "input.mp4"
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == "sd_turbo.safetensors"
    sampler_id = next(nid for nid, n in prompt.items() if n["class_type"] == "StreamRTSampler")
    texts = {slot: prompt[prompt[sampler_id]["inputs"][slot][0]]["inputs"]["text"] for slot in ("positive", "negative")}
    assert texts == {"positive": "a watercolor painting, soft light, vivid colors",
                     "negative": "blurry, low quality, distorted"}
    assert by_type["StreamRTSettings"]["acceleration"] == "auto"
    assert by_type["StreamRTSettings"]["frames_per_step"] == 1
    sampler = by_type["StreamRTSampler"]
    assert (sampler["steps"], sampler["strength"], sampler["t_index_list"]) == (2, 0.36, "")  # steps and strength
    assert by_type["SaveImage"]["filename_prefix"] == "streamrt/frame"
    assert by_type["SaveVideo"]["filename_prefix"] == "streamrt/video"
    note = next(n for n in workflow["nodes"] if n["type"] == "Note")["widgets_values"][0]
    for words in ("batch video mode", "aligned", "models/checkpoints", "Load VAE 'taesd'", "models/diffusers",
                  "auto", "cuda_graph", "compile", "eager", "frames_per_step to 4"):
        assert words in note.lower() or words in note, words


def webcam_pixels(seed: int) -> np.ndarray:
    """8x8 random blocks standing in for a camera's frame (an API prompt has no camera)."""
    rng = np.random.default_rng(seed)
    return np.repeat(np.repeat(rng.integers(0, 256, (SIZE // 8, SIZE // 8, 3), dtype=np.uint8), 8, 0), 8, 1)


def post_webcam_frame(server: ComfyServer, source: str, seed: int) -> None:
    """A PNG posted to Stream Frame Input's ``source``, as its camera posts frames."""
    answer = server.post_frame(source, array_to_png_bytes(webcam_pixels(seed)))
    assert answer.status_code == 200, answer.text


def test_controlnet_graph(info: dict) -> None:
    """The ControlNet example: the webcam frame feeds both Canny and the sampler; Canny's edges go through Apply
    ControlNet (Advanced) on CLIP Text Encode's conditioning into the sampler's positive and negative."""
    workflow = load_example(EXAMPLES_DIR / "ControlNet webcam (StreamRT).json")
    types = {node["id"]: node["type"] for node in workflow["nodes"]}
    edges = {(types[link[1]], link[5], types[link[3]],
              next(n for n in workflow["nodes"] if n["id"] == link[3])["inputs"][link[4]]["name"])
             for link in workflow["links"]}
    assert {("StreamRTFrameInput", "IMAGE", "Canny", "image"),
            ("StreamRTFrameInput", "IMAGE", "StreamRTSampler", "image"),
            ("Canny", "IMAGE", "ControlNetApplyAdvanced", "image"),
            ("ControlNetLoader", "CONTROL_NET", "ControlNetApplyAdvanced", "control_net"),
            ("CLIPTextEncode", "CONDITIONING", "ControlNetApplyAdvanced", "positive"),
            ("CLIPTextEncode", "CONDITIONING", "ControlNetApplyAdvanced", "negative"),
            ("ControlNetApplyAdvanced", "CONDITIONING", "StreamRTSampler", "positive"),
            ("ControlNetApplyAdvanced", "CONDITIONING", "StreamRTSampler", "negative"),
            ("StreamRTPipelineFromModel", "STREAMRT_PIPELINE", "StreamRTSampler", "pipeline"),
            ("StreamRTSampler", "IMAGE", "StreamRTPreview", "images")} <= edges, edges
    by_type = {node["class_type"]: node["inputs"] for node in to_api_prompt(workflow, info).values()}
    assert by_type["ControlNetApplyAdvanced"]["strength"] == 0.8


def test_controlnet_example_runs_and_applies_the_controlnet(server: ComfyServer, info: dict) -> None:
    """As shipped (acceleration auto), with the tiny checkpoint and ControlNet substituted and a PNG posted to Stream
    Frame Input (a source of this test's own, taken again by every run): it runs twice as a stream, and the
    ControlNet shapes the frames (strength 0, which Apply ControlNet turns into no control, gives other frames)."""
    source = f"example-cn-{uuid.uuid4().hex[:8]}"
    post_webcam_frame(server, source, seed=5)
    prompt = with_id_prefix(to_api_prompt(load_example(EXAMPLES_DIR / "ControlNet webcam (StreamRT).json"), info),
                            "example-cn-")
    substitute(prompt, "StreamRTFrameInput", source=source, width=SIZE, height=SIZE, wait_for_new=False)
    substitute(prompt, "CheckpointLoaderSimple", ckpt_name=SD15_LAYOUT_CKPT)
    substitute(prompt, "ControlNetLoader", control_net_name=SD15_LAYOUT_CONTROLNET)
    (sampler_id,) = [nid for nid, n in prompt.items() if n["class_type"] == "StreamRTSampler"]
    prompt["example-cn-out"] = {"class_type": "PreviewImage", "inputs": {"images": [sampler_id, 0]}}

    def run(strength: float, reset: bool) -> np.ndarray:
        graph = json.loads(json.dumps(prompt))
        graph[sampler_id]["inputs"]["reset"] = reset
        substitute(graph, "ControlNetApplyAdvanced", strength=strength)
        (frame,) = server.output_images(server.run(graph, timeout=300), "example-cn-out")
        return frame[..., :3].astype(np.float32)

    first = run(0.8, reset=True)
    second = run(0.8, reset=False)   # the stream goes on: frame 2 comes from other latents than frame 1
    without = run(0.0, reset=True)   # a fresh stream without control, same input
    assert np.abs(first - second).max() > 0
    assert np.abs(first - without).max() > 0.1, "the ControlNet did not change the frame"  # values in [0, 1]


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

    prompt = with_id_prefix(to_api_prompt(load_example(EXAMPLES_DIR / "Batch video (StreamRT).json"), info), "example-")
    substitute(prompt, "LoadVideo", file=name)
    substitute(prompt, "CheckpointLoaderSimple", ckpt_name=SD15_LAYOUT_CKPT)
    (settings_id,) = [nid for nid, n in prompt.items() if n["class_type"] == "StreamRTSettings"]
    assert prompt[settings_id]["inputs"]["acceleration"] == "auto"  # runs as shipped
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
    """PNGs posted to Stream Frame Input's source stand in for the camera (a source of this test's own: the
    example's is "webcam")."""
    source = f"example-{uuid.uuid4().hex[:8]}"
    prompt = with_id_prefix(to_api_prompt(load_example(EXAMPLES_DIR / "Realtime webcam (StreamRT).json"), info),
                            "example-")
    (frame_input,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "StreamRTFrameInput"]
    assert (frame_input["source"], frame_input["wait_for_new"]) == ("webcam", True)
    substitute(prompt, "StreamRTFrameInput", source=source, width=SIZE, height=SIZE)
    substitute(prompt, "StreamRTLoadPipeline", model=MODEL, taesd=TAESD)
    (sampler_id,) = [nid for nid, n in prompt.items() if n["class_type"] == "StreamRTSampler"]
    assert "settings" not in prompt[sampler_id]["inputs"]  # runs as shipped: the defaults, acceleration auto
    (view_id,) = [nid for nid, n in prompt.items() if n["class_type"] == "StreamRTPreview"]
    assert prompt[sampler_id]["inputs"]["reset"] is False
    first = json.loads(json.dumps(prompt))
    first[sampler_id]["inputs"]["reset"] = True  # a fresh stream, whatever ran on this server before

    results, events = [], []
    with server.websocket(feature_flags={"supports_preview_metadata": True}) as ws:
        for seed, graph in ((3, first), (4, prompt)):
            ws.clear()
            post_webcam_frame(server, source, seed)
            pid, entry = server.run_entry(graph, timeout=120, client_id=ws.client_id)
            assert not entry["outputs"].get(view_id), entry["outputs"]  # the view saves nothing
            ws.wait_prompt_done(pid)  # every message of the prompt is in
            shown = [decode_preview(m) for m in ws.binary]
            (frame,) = [image_bytes_to_array(data) for meta, data in filter(None, shown)
                        if (meta or {}).get("node_id") == view_id]
            results.append(frame)
            events.extend(e for e in ws.of_type("streamrt.status") if str(e.get("node")) == sampler_id)
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

    # and makes the same API prompt as to_api_prompt
    frontend = page.js_async("return (await app.graphToPrompt()).output;")
    ours = to_api_prompt(workflow, info)
    for node in frontend.values():
        node.pop("_meta", None)
        # The frontend also sends frontend-only widgets as inputs (PreviewAny's "preview": ""); the server
        # ignores inputs a node does not declare.
        declared, _ = declared_inputs(info[node["class_type"]])
        undeclared = {k: v for k, v in node["inputs"].items() if k not in declared}
        assert all(v in (None, "") for v in undeclared.values()), undeclared
        node["inputs"] = {k: v for k, v in node["inputs"].items() if k in declared}
    assert frontend == ours


@needs_browser
def test_the_template_browser_shows_the_examples_with_their_pictures(page: ComfyPage) -> None:
    """Browse Templates -> StreamRT: one card per example, titled with its name, showing its own thumbnail (the
    frontend's default picture where the .jpg is missing); a card opens its workflow."""
    page.js("""
        document.querySelectorAll('.p-dialog-mask').forEach(e => e.remove());
        app.extensionManager.command.execute('Comfy.BrowseTemplates');
    """)
    page.wait_js("""return Array.from(document.querySelectorAll('span')).some(e => e.innerText === 'StreamRT')""",
                 timeout=30, what="the template browser's StreamRT category")
    page.js("""Array.from(document.querySelectorAll('span')).find(e => e.innerText === 'StreamRT').click()""")
    names = sorted(p.stem for p in EXAMPLE_FILES)
    cards = page.wait_js("""
        const cards = Array.from(document.querySelectorAll('[data-testid^="template-workflow-"]'));
        const shown = cards.map(card => ({
            name: card.dataset.testid.slice('template-workflow-'.length),
            title: card.querySelector('h3')?.innerText,
            images: Array.from(card.querySelectorAll('img')).map(i => ({src: decodeURIComponent(i.src),
                                                                      width: i.naturalWidth, done: i.complete})),
        }));
        return shown.length === arguments[0] && shown.every(c => c.images.length && c.images.every(i => i.done))
            ? shown : null;
    """, len(names), timeout=30, what="the StreamRT template cards with their pictures")
    assert sorted(card["name"] for card in cards) == names, cards
    for card in cards:
        assert card["title"] == card["name"], card
        (image,) = card["images"]
        # the frontend fetches the picture into a blob: URL; the placeholder is its default-template.png (224 wide)
        assert "default-template" not in image["src"] and image["width"] == 512, card

    # a card opens its workflow
    name = names[0]
    page.js("""document.querySelector(`[data-testid="template-workflow-${arguments[0]}"]`).click()""", name)
    expected = len(load_example(EXAMPLES_DIR / f"{name}.json")["nodes"])
    deadline = time.monotonic() + 30
    while page.js("return app.graph.nodes.length") != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert page.js("return app.graph.nodes.length") == expected
