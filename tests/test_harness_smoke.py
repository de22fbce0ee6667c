"""End-to-end smoke tests of tests/comfy_harness.py against the real ComfyUI server.

Only CORE ComfyUI nodes are used, so these tests check the harness (start, queue, wait,
errors, interrupt, free, websocket, images), not the StreamRT nodes.  They run once per
cache mode of the ``comfy_server`` fixture (see conftest.py; ``STREAMRT_CACHE_MODES``).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from comfy_harness import ComfyServer, ExecutionFailed, ExecutionInterrupted, Graph, PromptRejected, load_image_array

pytestmark = pytest.mark.e2e

_colors = itertools.count(0x102030, 0x010101)


def unique_color() -> int:
    """A fresh EmptyImage colour per graph, so no test sees another test's cached outputs."""
    return next(_colors) & 0xFFFFFF


def rgb(color: int) -> np.ndarray:
    return np.array([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=np.float32) / 255.0


def test_empty_image_to_save_image(comfy_server: ComfyServer):
    color = unique_color()
    g = Graph()
    img = g.node("EmptyImage", width=16, height=8, batch_size=2, color=color)
    save = g.node("SaveImage", images=img.out(0), filename_prefix="smoke/empty")
    outputs = comfy_server.run(g, timeout=60)

    images = outputs[save.id]["images"]
    assert len(images) == 2
    for info in images:
        assert info["type"] == "output" and info["subfolder"] == "smoke"
        path = comfy_server.output_file(info)
        assert path.is_file() and path.parent == comfy_server.output_dir / "smoke"
        local = load_image_array(path)
        assert local.shape == (8, 16, 3)
        np.testing.assert_allclose(local, np.broadcast_to(rgb(color), local.shape), atol=0.5 / 255)

    fetched = comfy_server.output_images(outputs, save.id)
    assert len(fetched) == 2
    np.testing.assert_array_equal(fetched[0], load_image_array(comfy_server.output_file(images[0])))
    raw = comfy_server.view_image(images[0]["filename"], images[0]["subfolder"], "output", as_array=False)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_image_from_input_dir(comfy_server: ComfyServer):
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    name = comfy_server.write_input_image(src, name=f"smoke_{unique_color():06x}.png")
    g = Graph()
    load = g.node("LoadImage", image=name)
    save = g.node("SaveImage", images=load.out(0), filename_prefix="smoke/roundtrip")
    outputs = comfy_server.run(g, timeout=60)
    (got,) = comfy_server.output_images(outputs, save.id)
    np.testing.assert_array_equal(np.round(got * 255).astype(np.uint8), src)


def test_websocket_events(comfy_server: ComfyServer):
    color = unique_color()
    g = Graph()
    img = g.node("EmptyImage", width=4, height=4, batch_size=1, color=color)
    prev = g.node("PreviewImage", images=img.out(0))
    with comfy_server.websocket() as ws:
        pid = comfy_server.queue(g, client_id=ws.client_id)
        ws.wait_prompt_done(pid, timeout=60)
        entry = comfy_server.wait(pid, timeout=30)
        comfy_server.raise_for_status(entry)
        types = [t for t, _ in ws.events]
        assert "execution_start" in types and "execution_success" in types
        executing = [d["node"] for d in ws.of_type("executing", pid)]
        assert img.id in executing and prev.id in executing and executing[-1] is None
        (executed,) = [d for d in ws.of_type("executed", pid) if d["node"] == prev.id]
        preview = executed["output"]["images"][0]
        assert preview["type"] == "temp"
        assert comfy_server.output_file(preview).is_file()
        np.testing.assert_allclose(comfy_server.view_image(preview["filename"], preview["subfolder"], "temp"),
                                   np.broadcast_to(rgb(color), (4, 4, 3)), atol=0.5 / 255)
        assert entry["outputs"][prev.id] == executed["output"]


def test_object_info(comfy_server: ComfyServer):
    info = comfy_server.object_info("EmptyImage")
    assert {"width", "height", "batch_size", "color"} <= set(info["input"]["required"])
    assert info["output"] == ["IMAGE"]
    assert "SaveImage" in comfy_server.object_info()
    with pytest.raises(KeyError):
        comfy_server.object_info("NoSuchNode_StreamRT")


def test_bad_input_value_is_rejected(comfy_server: ComfyServer):
    g = Graph()
    img = g.node("EmptyImage", width="abc", height=8, batch_size=1, color=0)
    g.node("PreviewImage", images=img.out(0))
    with pytest.raises(PromptRejected) as exc:
        comfy_server.queue(g)
    err = exc.value
    assert err.status == 400
    assert img.id in err.node_errors
    assert "invalid_input_type" in err.error_types()
    assert "width" in str(err)


def test_missing_node_class_is_rejected(comfy_server: ComfyServer):
    g = Graph()
    g.node("NoSuchNode_StreamRT", x=1)
    with pytest.raises(PromptRejected) as exc:
        comfy_server.queue(g)
    # 0.3.75 says "invalid_prompt"; newer ComfyUI says "missing_node_type"
    assert exc.value.error["type"] in ("invalid_prompt", "missing_node_type")
    assert "NoSuchNode_StreamRT" in exc.value.error["message"]


def test_execution_error_is_raised(comfy_server: ComfyServer):
    g = Graph()
    img = g.node("EmptyImage", width=4, height=4, batch_size=1, color=unique_color())
    save = g.node("SaveImage", images=img.out(0), filename_prefix="../outside_the_output_folder")
    with pytest.raises(ExecutionFailed) as exc:
        comfy_server.run(g, timeout=60)
    err = exc.value
    assert not isinstance(err, ExecutionInterrupted)
    assert err.node_id == save.id and err.node_type == "SaveImage"
    assert err.exception_type == "Exception"
    assert "outside the output folder" in err.message
    assert err.traceback and err.history["status"]["status_str"] == "error"
    assert not (comfy_server.work_dir / "outside_the_output_folder_00001_.png").exists()


def _slow_chain(n: int) -> tuple[Graph, list]:
    g = Graph()
    node = g.node("EmptyImage", width=256, height=256, batch_size=2, color=unique_color())
    chain = []
    for _ in range(n):
        node = g.node("ImageBlur", image=node.out(0), blur_radius=31, sigma=10.0)
        chain.append(node)
    g.node("PreviewImage", images=node.out(0))
    return g, chain


def test_interrupt_running_prompt_then_next_prompt_works(comfy_server: ComfyServer):
    g, chain = _slow_chain(60)
    chain_ids = {node.id for node in chain}
    with comfy_server.websocket() as ws:
        pid = comfy_server.queue(g, client_id=ws.client_id)
        ws.wait_for(lambda t, d: t == "executing" and d.get("prompt_id") == pid and d.get("node") == chain[1].id,
                    timeout=60)
        ws.clear()  # from here on, the only "status" broadcasts are the marker below and the prompt's end
        comfy_server.interrupt()
        # Clearing the (empty) pending queue broadcasts a "status" event: the server sends its events in order,
        # so a node reported "executing" after that event started after the interrupt flag was set.
        comfy_server.post("/queue", {"clear": True}).raise_for_status()
        entry = comfy_server.wait(pid, timeout=60)
        ws.wait_for("status", timeout=30)
        events = list(ws.events)
    with pytest.raises(ExecutionInterrupted) as exc:
        comfy_server.raise_for_status(entry)
    assert exc.value.node_type == "ImageBlur"
    assert exc.value.node_id != chain[-1].id
    # the interrupt took effect at once: after it, no node of the chain started but the one it stopped at
    marker = next(k for k, (kind, _) in enumerate(events) if kind == "status")
    started_after = [d["node"] for kind, d in events[marker + 1:]
                     if kind == "executing" and isinstance(d, dict) and d.get("node") in chain_ids]
    assert started_after in ([], [exc.value.node_id]), (started_after, exc.value.node_id)

    # an /interrupt while idle is harmless: the next prompt clears the flag when it starts
    comfy_server.interrupt()
    g2 = Graph()
    img = g2.node("EmptyImage", width=2, height=2, batch_size=1, color=unique_color())
    prev = g2.node("PreviewImage", images=img.out(0))
    assert comfy_server.run(g2, timeout=60)[prev.id]["images"]


def test_free_then_next_prompt_works(comfy_server: ComfyServer):
    comfy_server.free(unload_models=True, free_memory=True)  # waits for the worker (barrier)
    comfy_server.free(unload_models=True, free_memory=False, wait=False)
    comfy_server.wait_idle(timeout=30)
    color = unique_color()
    g = Graph()
    img = g.node("EmptyImage", width=3, height=3, batch_size=1, color=color)
    save = g.node("SaveImage", images=img.out(0), filename_prefix="smoke/after_free")
    (arr,) = comfy_server.output_images(comfy_server.run(g, timeout=60), save.id)
    np.testing.assert_allclose(arr, np.broadcast_to(rgb(color), arr.shape), atol=0.5 / 255)


def test_cache_mode_is_in_effect(comfy_server: ComfyServer):
    g = Graph()
    img = g.node("EmptyImage", width=2, height=2, batch_size=1, color=unique_color())
    g.node("PreviewImage", images=img.out(0))
    comfy_server.run_entry(g, timeout=60)
    _, entry = comfy_server.run_entry(g, timeout=60)
    cached = comfy_server.cached_nodes(entry)
    if comfy_server.cache_mode == "cache-none":
        assert cached == set()
    else:
        assert img.id in cached


def test_server_log_and_stats(comfy_server: ComfyServer):
    stats = comfy_server.system_stats()
    assert stats["devices"][0]["type"] == "cpu"
    log = comfy_server.log_text()
    assert "Starting server" in log or "To see the GUI go to" in log
    assert str(comfy_server.nodes_dir) in log  # the custom_nodes path from the yaml was added
