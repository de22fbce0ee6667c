"""Build Engines and Load Engines on the real ComfyUI server (CPU only, TensorRT-RTX ahead-of-time builds).

Runs under ONE cache mode (``default``, or the first of $STREAMRT_CACHE_MODES): the engine nodes keep no
state of their own between executions (the cache is files) and always execute (``not_idempotent``), so
the other modes would only repeat the same builds. A few builds in all (the tiny TAESD encoder and decoder,
about a second each); the UNet engine build is covered by tests/test_engine_build.py.

The server has no GPU, so the sampler fed by Load Engines runs on torch (and must give the torch
stream's frames, and say on its node that it runs on torch and why); running engines needs an RTX-class GPU,
which this project's machines lack.

Also here: what users see of engines. Build Engines takes the stream's shapes from the sampler's Stream Settings;
its report is a STRING that Preview as Text shows line by line (checked in headless Chromium when it is there);
nodes show their text on the node (ComfyUI's progress text); and a ComfyUI without a ``streamrt_engines`` entry in
extra_model_paths.yaml keeps engines in ``models/streamrt_engines`` (a second server with its own base folder).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from browser.page import ComfyPage, browser_missing_reason, prepare_user_settings
from comfy_harness import MODEL_FOLDERS, ComfyServer, ExecutionFailed, Graph, WSCollector
from e2e_helpers import MODEL, PNG_ATOL, SIZE, TAESD, add_sampler, frames, uid, upload
from stream_helpers import first_cache_mode, write_e2e_models
from workflows import linked_from, widget_values_by_name, workflow_problems

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("comfy_server", [first_cache_mode()], indirect=True)]

pytest.importorskip("polygraphy", reason="engine builds need polygraphy")
pytest.importorskip("tensorrt_rtx", reason="engine builds need TensorRT-RTX (pip install tensorrt-rtx)")

BUILD_DEFAULTS = dict(steps=2, width=SIZE, height=SIZE, min_size=0, max_size=0, backend="tensorrt-rtx",
                      target="SM89", precision="fp16", components="vae", rebuild=False)
REPO_ROOT = Path(__file__).resolve().parent.parent
#: ComfyUI's binary websocket event of a text shown on a node (server.BinaryEventTypes.TEXT)
PROGRESS_TEXT = 3


@pytest.fixture
def server(comfy_server: ComfyServer, e2e_tiny_models: Path) -> ComfyServer:
    return comfy_server


def build_graph(prefix: str, settings: dict | None = None, **overrides) -> tuple[Graph, str]:
    """Load Stream Pipeline -> Build Engines (id ``<prefix>build``), with a Stream Settings node of ``settings``."""
    g = Graph(prefix=prefix)
    load = g.node("StreamRTLoadPipeline", id=f"{prefix}load", model=MODEL, taesd=TAESD, dtype="auto", device="auto")
    build_id = f"{prefix}build"
    build = g.node("StreamRTBuildEngines", id=build_id, pipeline=load.out(0), **{**BUILD_DEFAULTS, **overrides})
    if settings is not None:
        build.set(settings=g.node("StreamRTSettings", id=f"{prefix}settings", **{**SETTINGS, **settings}))
    return g, build_id


#: a Stream Settings node's inputs as the node's defaults
SETTINGS = dict(cfg_type="self", delta=1.0, frames_per_step=1, add_noise=True, acceleration="auto", width=0, height=0,
                schedule_length=50)


def text_of(outputs: dict, node_id: str) -> str:
    return "\n".join(outputs[node_id]["text"])


def node_texts(ws: WSCollector) -> dict[str, str]:
    """The texts shown on nodes (ComfyUI's progress text: a binary event of node id and text), the last per node."""
    texts = {}
    for frame in ws.binary:
        if struct.unpack(">I", frame[:4])[0] == PROGRESS_TEXT:
            length = struct.unpack(">I", frame[4:8])[0]
            texts[frame[8:8 + length].decode()] = frame[8 + length:].decode()
    return texts


def run_watched(server: ComfyServer, graph: Graph, timeout: float = 300) -> tuple[dict, dict[str, str]]:
    """Run ``graph`` from a websocket client; its outputs and the texts shown on its nodes."""
    with server.websocket() as ws:
        prompt_id = server.queue(graph, client_id=ws.client_id)
        ws.wait_prompt_done(prompt_id, timeout=timeout)
        entry = server.wait(prompt_id, timeout=timeout)
        server.raise_for_status(entry)
        return entry.get("outputs", {}), node_texts(ws)


def engine_files(server: ComfyServer) -> dict[Path, int]:
    root = server.models_dir / "engines"
    return {p: p.stat().st_mtime_ns for p in root.rglob("*.engine") if ".staging" not in p.parts}


def test_engine_nodes_are_listed_with_tooltips(server: ComfyServer) -> None:
    info = server.object_info()
    for node in ("StreamRTBuildEngines", "StreamRTLoadEngines"):
        assert node in info, f"{node} is not registered (nodes/__init__.py NODES)"
        inputs = info[node]["input"]
        for name, spec in {**inputs["required"], **inputs.get("optional", {})}.items():
            assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    assert info["StreamRTBuildEngines"]["output_node"] is True
    assert "SM89" in info["StreamRTBuildEngines"]["input"]["required"]["target"][1]["options"]
    # the stream's shapes come from the sampler's settings and steps, not from widgets of their own
    build = info["StreamRTBuildEngines"]["input"]
    assert build["optional"]["settings"][0] == "STREAMRT_SETTINGS" and "steps" in build["required"]
    assert not {"frames_per_step", "cfg_type", "denoising_steps"} & set(build["required"])


def test_build_reuse_load_and_sample(server: ComfyServer) -> None:
    prefix = uid()
    graph, build_id = build_graph(prefix)
    before = engine_files(server)
    report = text_of(server.run(graph, timeout=600), build_id)
    built = {p: m for p, m in engine_files(server).items() if p not in before}
    assert report.count("built in") == 2 and "tensorrt-rtx" in report and "target SM89" in report, report
    assert sorted(p.name.split("_r1_")[0] for p in built) == ["vae_decoder", "vae_encoder"]
    assert all(str(p.resolve().parent) in report for p in built), report  # the report says where
    assert all(p.with_suffix(".json").is_file() for p in built)

    # the same request again: both reused, nothing rewritten; its pipeline output feeds a sampler
    prefix2 = uid()
    graph2, build_id2 = build_graph(prefix2)
    sampler = add_sampler(graph2, [build_id2, 0], width=SIZE, height=SIZE)
    graph2.node("SaveImage", id=f"{prefix2}save", images=sampler.out(0), filename_prefix=f"{prefix2}/b")
    outputs2 = server.run(graph2, timeout=600)
    again = text_of(outputs2, build_id2)
    assert again.count("reused") == 2 and "built in" not in again, again
    assert {p: m for p, m in engine_files(server).items() if p in built} == built
    assert np.stack(server.output_images(outputs2, f"{prefix2}save")).shape == (1, SIZE, SIZE, 3)

    # Load Engines lists them (not runnable here: no GPU) and the sampler streams on torch
    prefix3 = uid()
    clip = frames(2, seed=21)
    names = upload(server, clip, prefix3)
    g = Graph(prefix=prefix3)
    load = g.node("StreamRTLoadPipeline", model=MODEL, taesd=TAESD, dtype="auto", device="auto")
    engines = g.node("StreamRTLoadEngines", id=f"{prefix3}engines", pipeline=load.out(0), backend="auto")
    batch = g.node("ImageBatch", image1=g.node("LoadImage", image=names[0]).out(0),
                   image2=g.node("LoadImage", image=names[1]).out(0))
    sampler = add_sampler(g, engines.out(0), image=batch.out(0))
    g.node("SaveImage", id=f"{prefix3}save", images=sampler.out(0), filename_prefix=f"{prefix3}/e")
    outputs = server.run(g, timeout=300)
    listing = text_of(outputs, f"{prefix3}engines")
    assert "vae_encoder" in listing and "vae_decoder" in listing and "not usable here" in listing, listing
    with_engines = np.stack(server.output_images(outputs, f"{prefix3}save"))

    g2 = Graph(prefix=prefix3 + "t")
    load2 = g2.node("StreamRTLoadPipeline", model=MODEL, taesd=TAESD, dtype="auto", device="auto")
    batch2 = g2.node("ImageBatch", image1=g2.node("LoadImage", image=names[0]).out(0),
                     image2=g2.node("LoadImage", image=names[1]).out(0))
    sampler2 = add_sampler(g2, load2.out(0), image=batch2.out(0))
    g2.node("SaveImage", id=f"{prefix3}save2", images=sampler2.out(0), filename_prefix=f"{prefix3}/t")
    torch_only = np.stack(server.output_images(server.run(g2, timeout=300), f"{prefix3}save2"))
    np.testing.assert_allclose(with_engines, torch_only, atol=PNG_ATOL, rtol=0)


def test_auto_target_without_a_gpu_says_what_to_do(server: ComfyServer) -> None:
    graph, _ = build_graph(uid(), target="auto")
    with pytest.raises(ExecutionFailed) as failed:
        server.run(graph, timeout=120)
    assert "no CUDA GPU" in str(failed.value) and "SM89" in str(failed.value)


def test_missing_backend_is_reported(server: ComfyServer) -> None:
    try:  # full TensorRT is not installable here: the node must say how to get it
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("full TensorRT is installed here")
    graph, _ = build_graph(uid(), backend="tensorrt")
    with pytest.raises(ExecutionFailed) as failed:
        server.run(graph, timeout=120)
    assert "pip install tensorrt" in str(failed.value)


def test_example_workflow_matches_the_nodes(server: ComfyServer) -> None:
    """"example_workflows/TensorRT engines (StreamRT).json" (saved by the real frontend,
    tests/browser/build_example_workflow.py):
    listed as a template, a valid workflow for these nodes (tests/workflows.py: Build Engines' widgets in the
    node's input order with valid values, ...), and the engines' pipeline feeding the sampler, built for the
    stream's shapes (the sampler's steps and its Stream Settings)."""
    path = Path(__file__).resolve().parent.parent / "example_workflows" / "TensorRT engines (StreamRT).json"
    example = json.loads(path.read_text(encoding="utf-8"))
    assert "TensorRT engines (StreamRT)" in server.get("/api/workflow_templates").json().get("StreamRT", [])
    info = server.object_info()
    problems = workflow_problems(example, info)
    assert not problems, "\n".join(problems)
    build = next(n for n in example["nodes"] if n["type"] == "StreamRTBuildEngines")
    sampler = next(n for n in example["nodes"] if n["type"] == "StreamRTSampler")
    source, slot = linked_from(example, sampler, "pipeline")
    assert source["type"] == "StreamRTBuildEngines" and slot == 0
    settings, _ = linked_from(example, sampler, "settings")
    assert settings["type"] == "StreamRTSettings"
    values = widget_values_by_name(build, info["StreamRTBuildEngines"])
    sampler_values = widget_values_by_name(sampler, info["StreamRTSampler"])
    # the engines are built for the stream's shapes: the sampler's steps and its own Stream Settings node
    assert linked_from(example, build, "settings")[0] is settings
    assert sampler_values["t_index_list"] == "" and values["steps"] == sampler_values["steps"]
    assert (values["width"], values["height"]) == (0, 0)  # the settings' size
    stream = widget_values_by_name(settings, info["StreamRTSettings"])
    assert stream["width"] > 0 and stream["height"] > 0  # the sampler resizes its input to it

def test_the_settings_give_the_shapes(server: ComfyServer) -> None:
    """Build Engines builds for the stream the sampler's Stream Settings describe (frames per step, size) and its
    steps: nothing typed twice. Its width/height are only for settings that take the input's size (0)."""
    graph, build_id = build_graph(uid(), settings=dict(frames_per_step=2, width=SIZE, height=SIZE), width=0, height=0)
    outputs, texts = run_watched(server, graph, timeout=600)
    report = text_of(outputs, build_id)
    assert f"stream: {SIZE}x{SIZE}, 2 step(s), 2 frame(s) per step, cfg_type self" in report, report
    assert report.count(f"r2_{SIZE}x{SIZE}") == 2, report  # the VAE engines take F = 2 frames
    assert texts.get(build_id) == report  # the report is shown on the node too

    # a size on the node that is not the settings' one would build engines no sampler uses: refused by name
    graph, _ = build_graph(uid(), settings=dict(width=SIZE, height=SIZE), width=2 * SIZE, height=SIZE)
    with pytest.raises(ExecutionFailed) as failed:
        server.run(graph, timeout=120)
    assert f"width {2 * SIZE} differs from the settings' width {SIZE}" in failed.value.message, failed.value.message
    # the settings take the input's size and the node gives none: says what to set
    graph, _ = build_graph(uid(), settings={}, width=0, height=0)
    with pytest.raises(ExecutionFailed) as failed:
        server.run(graph, timeout=120)
    assert "no width: the settings take the input's width" in failed.value.message, failed.value.message


def test_the_report_reads_line_by_line_in_preview_as_text(server: ComfyServer) -> None:
    """Preview as Text (PreviewAny) renders Markdown: plain lines would join into one paragraph. The report STRING
    is a fenced block, whose lines and columns the frontend keeps (rendered in headless Chromium when present)."""
    prefix = uid()
    graph, build_id = build_graph(prefix)
    graph.node("PreviewAny", id=f"{prefix}preview", source=[build_id, 1])
    outputs = server.run(graph, timeout=600)
    report = text_of(outputs, build_id)
    shown = outputs[f"{prefix}preview"]["text"][0]
    assert shown == f"```\n{report}\n```", shown
    lines = report.splitlines()
    assert len(lines) >= 4 and lines[0].startswith("StreamRT engines:"), report

    reason = browser_missing_reason()
    if reason:
        pytest.skip(f"the rendering in the frontend is not checked: {reason}")
    prepare_user_settings(server.user_dir)
    with ComfyPage.open(server.base_url) as page:
        rendered = page.js("""
            const node = LiteGraph.createNode("PreviewAny");
            app.graph.add(node);
            node.onExecuted({text: [arguments[0]]});
            const widget = node.widgets.find(w => w.name === "preview");
            const pre = widget.element.querySelector("pre");
            return pre ? pre.textContent : widget.element.textContent;
        """, shown)
    assert rendered.splitlines() == lines, rendered


def test_the_sampler_says_on_its_node_what_runs_on_engines_and_why_not(server: ComfyServer) -> None:
    """A sampler fed from Load Engines shows on its node which parts run on engines and which on torch, with the
    reasons (here: no GPU); a sampler of a plain pipeline without engines shows nothing about them."""
    prefix = uid()
    (name,) = upload(server, frames(1, seed=24), prefix)
    g = Graph(prefix=prefix)
    load = g.node("StreamRTLoadPipeline", model=MODEL, taesd=TAESD, dtype="auto", device="auto")
    engines = g.node("StreamRTLoadEngines", pipeline=load.out(0), backend="auto")
    image = g.node("LoadImage", image=name).out(0)
    with_engines = add_sampler(g, engines.out(0), id=f"{prefix}engines", image=image)
    plain = add_sampler(g, load.out(0), id=f"{prefix}plain", image=image)
    for sampler in (with_engines, plain):
        g.node("PreviewImage", images=sampler.out(0))
    _, texts = run_watched(server, g)
    text = texts.get(with_engines.id, "")
    lines = text.splitlines()
    assert lines[:3] == ["StreamRT engines", "runs: auto -> eager",
                         "unet: torch  vae_encoder: torch  vae_decoder: torch"], text
    assert "- tensorrt-rtx: the pipeline runs on cpu; engines need a CUDA GPU" in lines, text
    assert plain.id not in texts, texts


SHOW_ENGINE_TEXT_JS = """
const [model, taesd] = arguments;
app.graph.clear();
const add = (type, values) => {
    const node = LiteGraph.createNode(type);
    app.graph.add(node);
    for (const [name, value] of Object.entries(values ?? {})) node.widgets.find(w => w.name === name).value = value;
    return node;
};
const load = add("StreamRTLoadPipeline", {model, taesd});
const engines = add("StreamRTLoadEngines");
const sampler = add("StreamRTSampler", {reset: true});
const view = add("StreamRTPreview");
load.connect(0, engines, "pipeline");
engines.connect(0, sampler, "pipeline");
sampler.connect(0, view, "images");
await app.queuePrompt(0);
const shown = () => sampler.widgets?.find(w => w.name === "$$node-text-preview")?.value;
for (let i = 0; i < 600 && !shown(); i++) await new Promise(r => setTimeout(r, 100));
return shown() ?? null;
"""


def test_the_engine_text_shows_on_the_sampler_in_the_browser(server: ComfyServer) -> None:
    """In the frontend (headless Chromium), queued from the page: the sampler fed by Load Engines shows, on the node
    itself, which parts fell back to torch and why."""
    reason = browser_missing_reason()
    if reason:
        pytest.skip(reason)
    prepare_user_settings(server.user_dir)
    with ComfyPage.open(server.base_url) as page:
        text = page.js_async(SHOW_ENGINE_TEXT_JS, MODEL, TAESD)
    assert text is not None, "no text appeared on the sampler node"
    lines = text.splitlines()
    assert "unet: torch  vae_encoder: torch  vae_decoder: torch" in lines, text
    assert any(line.startswith("- tensorrt-rtx:") and "CUDA GPU" in line for line in lines), text


def test_engines_go_to_comfyuis_models_folder_by_default(comfy_server: ComfyServer, tmp_path: Path) -> None:
    """Without a streamrt_engines entry in extra_model_paths.yaml (a plain ComfyUI), new engines go to
    models/streamrt_engines in ComfyUI's models folder, which a reinstall of the pack keeps; the pack's old
    engine_cache/ is still searched (listed after it), so nothing built before is lost. (Its own server, with its
    own base folder; ``comfy_server`` only because the module's mark parametrizes it.)"""
    work, models = tmp_path / "comfy", tmp_path / "models"
    write_e2e_models(models)
    (work / "custom_nodes").mkdir(parents=True)  # ComfyUI lists <base>/custom_nodes at start
    folders = {k: v for k, v in MODEL_FOLDERS.items() if k != "streamrt_engines"}
    server = ComfyServer(REPO_ROOT, work, pack_name="StreamRT", models_source=models, model_folders=folders,
                         extra_args=("--base-directory", str(work)))
    server.start(timeout=180)
    try:
        default = work / "models" / "streamrt_engines"
        prefix = uid()
        graph, build_id = build_graph(prefix)
        graph.node("StreamRTLoadEngines", id=f"{prefix}list", pipeline=[build_id, 0], backend="auto")
        outputs = server.run(graph, timeout=600)
        report, listing = text_of(outputs, build_id), text_of(outputs, f"{prefix}list")
        built = sorted(p.name.split("_r1_")[0] for p in default.rglob("*.engine") if ".staging" not in p.parts)
        assert built == ["vae_decoder", "vae_encoder"], report
        assert f"Folder: {default.resolve()}/" in report, report
        roots = listing.splitlines()[0]
        assert f"found in {default.resolve()}, {(REPO_ROOT / 'engine_cache').resolve()}" in roots, roots
    finally:
        server.stop()
