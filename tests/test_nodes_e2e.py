"""The StreamRT nodes on the real ComfyUI server, checked against the core run in this process.

Every test runs under each cache mode of the ``comfy_server`` fixture (default, --cache-none,
--cache-lru). The server computes on the CPU in float32, like the core reference here, so frames
agree up to PNG quantisation (SaveImage writes 8-bit files).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_harness import ComfyServer, ExecutionFailed, Graph, PromptRejected
from e2e_helpers import (
    MODEL,
    PNG_ATOL,
    SAMPLER_DEFAULTS,
    SIZE,
    TAESD,
    add_sampler,
    as_tensor,
    core_config,
    frames,
    uid,
    upload,
)

from streamrt import Stream, load_diffusers_folder
from streamrt.kv_cache import KVCacheConfig
from streamrt.random_models import write_random_pipeline

pytestmark = pytest.mark.e2e

# Same architecture with the self-attention output projections scaled up, so that what a layer
# attends to (e.g. cached frames) shows through 8-bit PNGs. Random weights either way.
MODEL_STRONG_ATTN = "tiny-sd-strong-attn"


@pytest.fixture(scope="session")
def e2e_tiny_models(e2e_tiny_models: Path) -> Path:
    """conftest's tiny models plus the strong-attention variant."""
    streamrt_models_root = e2e_tiny_models
    strong = streamrt_models_root / "diffusers" / MODEL_STRONG_ATTN
    if not (strong / "model_index.json").is_file():
        from diffusers import UNet2DConditionModel

        write_random_pipeline(strong, "tiny")
        unet = UNet2DConditionModel.from_pretrained(strong, subfolder="unet", local_files_only=True)
        with torch.no_grad():
            for name, module in unet.named_modules():
                if name.endswith("attn1"):
                    module.to_out[0].weight.mul_(40.0)
        unet.save_pretrained(strong / "unet")
    return streamrt_models_root


@pytest.fixture
def server(comfy_server: ComfyServer, e2e_tiny_models: Path) -> ComfyServer:
    return comfy_server


def sampler_graph(prefix: str, image_names: list[str] | None, model: str = MODEL, **overrides) -> tuple[Graph, str]:
    """LoadImage(s) [-> ImageBatch chain] -> StreamRTSampler -> SaveImage; returns (graph, sampler id)."""
    g = Graph(prefix=prefix)
    load = g.node("StreamRTLoadPipeline", id=f"{prefix}load", model=model, taesd=TAESD, dtype="auto", device="auto")
    inputs = dict(overrides)
    if image_names:
        batch = g.node("LoadImage", image=image_names[0]).out(0)
        for name in image_names[1:]:
            batch = g.node("ImageBatch", image1=batch, image2=g.node("LoadImage", image=name).out(0)).out(0)
        inputs["image"] = batch
    sampler_id = f"{prefix}sampler"
    sampler = add_sampler(g, load.out(0), id=sampler_id, **inputs)
    g.node("SaveImage", id=f"{prefix}save", images=sampler.out(0), filename_prefix=f"{prefix}/f")
    return g, sampler_id


def run_images(server: ComfyServer, graph: Graph, save_id: str) -> np.ndarray:
    outputs = server.run(graph, timeout=300)
    return np.stack(server.output_images(outputs, save_id))


def assert_frames_close(actual: np.ndarray, expected: torch.Tensor) -> None:
    np.testing.assert_allclose(actual[..., :3], expected.numpy(), atol=PNG_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------
def test_pack_loads_and_lists_nodes(server: ComfyServer) -> None:
    log = server.log_text()
    assert "IMPORT FAILED" not in "\n".join(line for line in log.splitlines() if "StreamRT" in line)
    info = server.object_info()
    for node in ("StreamRTLoadPipeline", "StreamRTSampler"):
        assert node in info, f"{node} missing from /object_info"
    sampler = info["StreamRTSampler"]["input"]
    assert "image" in sampler["optional"]
    for name, spec in sampler["required"].items():
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    assert MODEL in info["StreamRTLoadPipeline"]["input"]["required"]["model"][1]["options"]


def test_realtime_executions_continue_one_stream(server: ComfyServer, core_models) -> None:
    """N queued one-frame executions equal N calls of one core stream (state persists)."""
    prefix, clip = uid(), frames(5, seed=1)
    names = upload(server, clip, prefix)
    got = [run_images(server, sampler_graph(prefix, [name])[0], f"{prefix}save")[0] for name in names]

    stream = Stream(core_models, core_config(), prompt=SAMPLER_DEFAULTS["prompt"],
                    negative_prompt=SAMPLER_DEFAULTS["negative_prompt"])
    expected = [stream.step(as_tensor(clip[k:k + 1]))[0] for k in range(len(clip))]
    for k in range(len(clip)):
        assert_frames_close(got[k], expected[k])
    # Discriminating: a fresh stream per execution would differ far beyond the tolerance.
    fresh = Stream(core_models, core_config(), prompt=SAMPLER_DEFAULTS["prompt"],
                   negative_prompt=SAMPLER_DEFAULTS["negative_prompt"]).step(as_tensor(clip[4:5]))[0]
    assert np.abs(fresh.numpy() - expected[4].numpy()).max() > 10 * PNG_ATOL


def test_batch_execution_is_aligned_and_matches_single_executions(server: ComfyServer, core_models) -> None:
    prefix, clip = uid(), frames(4, seed=2)
    names = upload(server, clip, prefix)
    graph, _ = sampler_graph(prefix, names)
    batch = run_images(server, graph, f"{prefix}save")
    assert batch.shape[0] == 4

    stream = Stream(core_models, core_config(), prompt=SAMPLER_DEFAULTS["prompt"],
                    negative_prompt=SAMPLER_DEFAULTS["negative_prompt"])
    assert_frames_close(batch, stream.process_video(as_tensor(clip)))

    # The same frames queued one by one (plus the flush of the last frame) on another sampler node.
    single_prefix = uid()
    singles = [run_images(server, sampler_graph(single_prefix, [name])[0], f"{single_prefix}save")[0]
               for name in names + names[-1:]]          # latency = 1 for two steps
    np.testing.assert_allclose(batch, np.stack(singles[1:]), atol=PNG_ATOL, rtol=0)


def test_two_samplers_in_one_graph_have_independent_streams(server: ComfyServer, core_models) -> None:
    prefix, clip = uid(), frames(3, seed=3)
    names = upload(server, clip, prefix)
    outs_a, outs_b = [], []
    for name in names:
        g, _ = sampler_graph(prefix, [name])
        load = f"{prefix}load"
        second = add_sampler(g, [load, 0], id=f"{prefix}sampler2",
                             image=g.to_dict()[f"{prefix}sampler"]["inputs"]["image"], seed=11)
        g.node("SaveImage", id=f"{prefix}save2", images=second.out(0), filename_prefix=f"{prefix}/g")
        outputs = server.run(g, timeout=300)
        outs_a.append(server.output_images(outputs, f"{prefix}save")[0])
        outs_b.append(server.output_images(outputs, f"{prefix}save2")[0])
    for seed, got in ((7, outs_a), (11, outs_b)):
        stream = Stream(core_models, core_config(seed=seed), prompt=SAMPLER_DEFAULTS["prompt"],
                        negative_prompt=SAMPLER_DEFAULTS["negative_prompt"])
        for k in range(len(clip)):
            assert_frames_close(got[k], stream.step(as_tensor(clip[k:k + 1]))[0])


def test_reset_clears_the_stream(server: ComfyServer) -> None:
    prefix, clip = uid(), frames(1, seed=4)
    name = upload(server, clip, prefix)[0]
    first = run_images(server, sampler_graph(prefix, [name])[0], f"{prefix}save")[0]
    later = [run_images(server, sampler_graph(prefix, [name])[0], f"{prefix}save")[0] for _ in range(2)]
    assert np.abs(later[-1] - first).max() > 10 * PNG_ATOL  # the stream moved on
    again = run_images(server, sampler_graph(prefix, [name], reset=True)[0], f"{prefix}save")[0]
    np.testing.assert_allclose(again, first, atol=PNG_ATOL, rtol=0)


def test_txt2img_without_image(server: ComfyServer, core_models) -> None:
    prefix = uid()
    graph, _ = sampler_graph(prefix, None, width=SIZE, height=SIZE)
    got = [run_images(server, graph, f"{prefix}save")[0] for _ in range(2)]
    stream = Stream(core_models, core_config(), prompt=SAMPLER_DEFAULTS["prompt"],
                    negative_prompt=SAMPLER_DEFAULTS["negative_prompt"])
    for k in range(2):
        assert_frames_close(got[k], stream.step(None)[0])


def test_bad_inputs_give_node_errors_and_the_server_keeps_working(server: ComfyServer) -> None:
    prefix, clip = uid(), frames(1, seed=5)
    name = upload(server, clip, prefix)[0]
    graph, _ = sampler_graph(prefix, [name])
    bad_model = sampler_graph(prefix, [name])[0]
    bad_model.nodes[f"{prefix}load"]["inputs"]["model"] = "no-such-model"
    # Current ComfyUI rejects an unknown combo value at validation; 0.3.75 does not validate V3
    # combos, so the loader itself must fail with a message naming the model.
    with pytest.raises((PromptRejected, ExecutionFailed)) as rejected:
        server.run(bad_model)
    assert "no-such-model" in str(rejected.value)

    with pytest.raises(ExecutionFailed) as failed:
        server.run(sampler_graph(prefix, [name], width=60, height=64)[0])
    assert "multiple of 8" in str(failed.value)

    with pytest.raises(ExecutionFailed) as failed:
        server.run(sampler_graph(prefix, [name], t_index_list="20,99")[0])
    assert "outside the schedule" in str(failed.value)

    with pytest.raises(ExecutionFailed) as failed:
        server.run(sampler_graph(prefix, [name], t_index_list="twenty")[0])
    assert "comma-separated integers" in str(failed.value)

    assert run_images(server, graph, f"{prefix}save").shape == (1, SIZE, SIZE, 3)


def test_free_releases_and_next_run_reloads(server: ComfyServer) -> None:
    prefix, clip = uid(), frames(1, seed=6)
    name = upload(server, clip, prefix)[0]
    graph, _ = sampler_graph(prefix, [name])
    first = run_images(server, graph, f"{prefix}save")[0]
    server.free()
    assert "releasing StreamRT pipelines and streams" in server.log_text()
    # The stream was dropped with the memory: the next run starts a fresh stream and gives frame 1 again.
    again = run_images(server, graph, f"{prefix}save")[0]
    np.testing.assert_allclose(again, first, atol=PNG_ATOL, rtol=0)


def test_interrupt_mid_batch_then_next_prompt_works(server: ComfyServer) -> None:
    prefix = uid()
    names = upload(server, frames(2, seed=8), prefix)
    g = Graph(prefix=prefix)
    load = g.node("StreamRTLoadPipeline", model=MODEL, taesd=TAESD, dtype="auto", device="auto")
    video = g.node("RepeatImageBatch", image=g.node("LoadImage", image=names[0]).out(0), amount=400)
    sampler = add_sampler(g, load.out(0), image=video.out(0))
    g.node("PreviewImage", images=sampler.out(0))
    ws = server.websocket()
    try:
        prompt_id = server.queue(g, client_id=ws.client_id)
        ws.wait_for(lambda kind, data: kind == "progress" and data.get("value", 0) >= 5, timeout=120)
        server.interrupt()
        entry = server.wait(prompt_id, timeout=120)
    finally:
        ws.close()
    kinds = [kind for kind, _ in server.status_messages(entry)]
    assert "execution_interrupted" in kinds, kinds
    graph, _ = sampler_graph(prefix, names[1:])
    assert run_images(server, graph, f"{prefix}save").shape == (1, SIZE, SIZE, 3)


def test_status_event_reports_fps(server: ComfyServer) -> None:
    prefix = uid()
    name = upload(server, frames(1, seed=9), prefix)[0]
    ws = server.websocket()
    try:
        server.run(sampler_graph(prefix, [name])[0], client_id=ws.client_id)
        _, data = ws.wait_for("streamrt.status", timeout=30)
    finally:
        ws.close()
    assert data["node"] == f"{prefix}sampler" and data["frames"] == 1
    assert data["fps"] > 0 and data["state"] in ("warming", "streaming")


def test_sampler_runs_concurrently_safe(server: ComfyServer) -> None:
    """Queue several prompts at once: the prompt worker runs them in order, all succeed."""
    prefix = uid()
    names = upload(server, frames(3, seed=10), prefix)
    ids = [server.queue(sampler_graph(prefix, [n])[0]) for n in names]
    errors: list[BaseException] = []

    def wait(pid: str) -> None:
        try:
            server.raise_for_status(server.wait(pid, timeout=300))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=wait, args=(pid,)) for pid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_cached_attention_persists_across_executions_and_reset_clears_it(server: ComfyServer) -> None:
    prefix, clip = uid(), frames(4, seed=12)
    names = upload(server, clip, prefix)
    cache = dict(cached_attention=True, cache_max_frames=3, cache_window=2, cache_interval=1)
    opts = dict(model=MODEL_STRONG_ATTN, **cache)
    got = [run_images(server, sampler_graph(prefix, [name], **opts)[0], f"{prefix}save")[0] for name in names]
    core_models = load_diffusers_folder(server.models_dir / "diffusers" / MODEL_STRONG_ATTN, dtype="fp32",
                                        device="cpu", taesd=server.models_dir / "vae_approx" / TAESD)
    config = core_config(**cache)
    assert config.kv_cache == KVCacheConfig(True, 3, 2, 1)
    stream = Stream(core_models, config, prompt=SAMPLER_DEFAULTS["prompt"],
                    negative_prompt=SAMPLER_DEFAULTS["negative_prompt"])
    expected = [stream.step(as_tensor(clip[k:k + 1]))[0] for k in range(len(clip))]
    for k in range(len(clip)):
        assert_frames_close(got[k], expected[k])
    # Without the cache the same executions give other frames: the cache really took part.
    plain = Stream(core_models, core_config(), prompt=SAMPLER_DEFAULTS["prompt"],
                   negative_prompt=SAMPLER_DEFAULTS["negative_prompt"])
    plain_frames = [plain.step(as_tensor(clip[k:k + 1]))[0] for k in range(len(clip))]
    assert max(np.abs(p.numpy() - e.numpy()).max() for p, e in zip(plain_frames[1:], expected[1:])) > 2 * PNG_ATOL
    # reset clears buffer and cache: the first frame again
    again = run_images(server, sampler_graph(prefix, names[:1], reset=True, **opts)[0], f"{prefix}save")[0]
    np.testing.assert_allclose(again, got[0], atol=PNG_ATOL, rtol=0)


def test_same_node_id_in_two_workflows_keeps_two_streams(server: ComfyServer, core_models) -> None:
    """Node ids repeat across open workflows; the frontend's workflow id keeps their streams apart."""
    prefix, clip = uid(), frames(2, seed=13)
    names = upload(server, clip, prefix)
    graph, _ = sampler_graph(prefix, [names[0]])
    got = {}
    for workflow in ("wf-a", "wf-b"):  # the same graph (same node ids) from two workflows
        entry = server.wait(server.queue(graph, extra_data={"extra_pnginfo": {"workflow": {"id": workflow}}}))
        server.raise_for_status(entry)
        got[workflow] = server.output_images(entry["outputs"], f"{prefix}save")[0]
    # both are the first frame of a fresh stream, not frame 2 of a shared one
    first = Stream(core_models, core_config(), prompt=SAMPLER_DEFAULTS["prompt"],
                   negative_prompt=SAMPLER_DEFAULTS["negative_prompt"]).step(as_tensor(clip[:1]))[0]
    assert_frames_close(got["wf-a"], first)
    assert_frames_close(got["wf-b"], first)
