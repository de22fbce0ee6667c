"""Build Engines and Load Engines on the real ComfyUI server (CPU only, TensorRT-RTX ahead-of-time builds).

Runs under ONE cache mode (``default``, or the first of $STREAMRT_CACHE_MODES): the engine nodes keep no
state of their own between executions (the cache is files) and always execute (``not_idempotent``), so
the other modes would only repeat the same builds. Two builds in all (the tiny TAESD encoder and decoder,
about a second each); the UNet engine build is covered by tests/test_engine_build.py.

The server has no GPU, so the sampler fed by Load Engines runs on torch (and must give the torch
stream's frames); running engines needs an RTX-class GPU, which this project's machines lack.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from comfy_harness import ComfyServer, ExecutionFailed, Graph
from e2e_helpers import MODEL, PNG_ATOL, SIZE, TAESD, add_sampler, frames, uid, upload
from stream_helpers import first_cache_mode
from workflows import linked_from, widget_values_by_name, workflow_problems

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("comfy_server", [first_cache_mode()], indirect=True)]

pytest.importorskip("polygraphy", reason="engine builds need polygraphy")
pytest.importorskip("tensorrt_rtx", reason="engine builds need TensorRT-RTX (pip install tensorrt-rtx)")

BUILD_DEFAULTS = dict(width=SIZE, height=SIZE, min_size=0, max_size=0, frames_per_step=1, denoising_steps=2,
                      cfg_type="self", backend="tensorrt-rtx", target="SM89", precision="fp16", components="vae",
                      rebuild=False)


@pytest.fixture
def server(comfy_server: ComfyServer, e2e_tiny_models: Path) -> ComfyServer:
    return comfy_server


def build_graph(prefix: str, **overrides) -> tuple[Graph, str]:
    g = Graph(prefix=prefix)
    load = g.node("StreamRTLoadPipeline", id=f"{prefix}load", model=MODEL, taesd=TAESD, dtype="auto", device="auto")
    build_id = f"{prefix}build"
    g.node("StreamRTBuildEngines", id=build_id, pipeline=load.out(0), **{**BUILD_DEFAULTS, **overrides})
    return g, build_id


def text_of(outputs: dict, node_id: str) -> str:
    return "\n".join(outputs[node_id]["text"])


def engine_files(server: ComfyServer) -> dict[Path, int]:
    root = server.models_dir / "engines"
    return {p: p.stat().st_mtime_ns for p in root.rglob("*.engine") if ".staging" not in p.parts}


def test_engine_nodes_are_listed_with_tooltips(server: ComfyServer) -> None:
    info = server.object_info()
    for node in ("StreamRTBuildEngines", "StreamRTLoadEngines"):
        assert node in info, f"{node} is not registered (nodes/__init__.py NODES)"
        for name, spec in info[node]["input"]["required"].items():
            assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    assert info["StreamRTBuildEngines"]["output_node"] is True
    assert "SM89" in info["StreamRTBuildEngines"]["input"]["required"]["target"][1]["options"]


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
    """example_workflows/engine_build.json (saved by the real frontend, tests/browser/build_example_workflow.py):
    listed as a template, a valid workflow for these nodes (tests/workflows.py: Build Engines' widgets in the
    node's input order with valid values, ...), and the engines' pipeline feeding the sampler, built for the
    stream's shapes (the sampler's steps and its Stream Settings)."""
    path = Path(__file__).resolve().parent.parent / "example_workflows" / "engine_build.json"
    example = json.loads(path.read_text(encoding="utf-8"))
    assert "engine_build" in server.get("/api/workflow_templates").json().get("StreamRT", [])
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
    stream = widget_values_by_name(settings, info["StreamRTSettings"])
    # the engines are built for the stream's shapes: the sampler's steps and its settings
    assert sampler_values["t_index_list"] == "" and values["denoising_steps"] == sampler_values["steps"]
    assert (values["width"], values["height"]) == (stream["width"], stream["height"])
    assert values["cfg_type"] == stream["cfg_type"]
    assert values["frames_per_step"] == stream["frames_per_step"]
