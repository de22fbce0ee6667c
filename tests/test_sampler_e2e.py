"""The lean sampler on the real ComfyUI server: its inputs, the settings nodes, steps/strength and CONDITIONING.

* /object_info: the sampler's inputs in their order, with tooltips and bounds; the settings nodes chain
  (STREAMRT_SETTINGS in and out); the pack is found by the frontend's node search for "StreamDiffusion",
  "realtime", "webcam" and "TensorRT" (the rule of its search, below; tests/test_browser_e2e.py runs the
  frontend's own search);
* steps/strength give the frames of the explicit t_index_list they map to, and of the core;
* the settings nodes apply: frames_per_step (Stream Settings), the similarity filter node (repeated frames
  skipped as the core skips them), a chain of all three settings nodes;
* CONDITIONING: made without a CLIP by core nodes (LoadTrainingDataset hands back a conditioning saved with
  torch.save; here the tiny pipeline's own embeddings), it gives the text route's frames, positive and
  negative, over several executions, and the status event notes that the prompt text was not used; a longer one
  (ConditioningConcat, 154 tokens) rebuilds the stream; one of another model's width (LotusConditioning: 1024),
  with several entries (ConditioningCombine) or with an area (ConditioningSetArea) is refused by name, and the
  next prompt runs. (CLIPTextEncode needs a real CLIP, which the tiny test models are not.)
* Stream Settings' overlap_executions: each execution hands over the frame of the one before it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_harness import ComfyServer, ExecutionFailed, Graph
from e2e_helpers import (
    MODEL,
    PNG_ATOL,
    SAMPLER_DEFAULTS,
    TAESD,
    add_sampler,
    as_tensor,
    core_config,
    frames,
    image_batch,
    uid,
    upload,
)

from streamrt import Stream

pytestmark = pytest.mark.e2e

#: frontend 1.32.9 searches nodes with Fuse.js over ``name`` (the node id) and ``display_name`` (threshold 0.3,
#: location 0, distance 100): a word is found when it starts within the first 30 characters of either
SEARCH_REACH = 30
SEARCH_WORDS = ("StreamDiffusion", "realtime", "webcam", "TensorRT")


@pytest.fixture
def server(comfy_server: ComfyServer, e2e_tiny_models: Path) -> ComfyServer:
    return comfy_server


def graph(prefix: str, images: list[str], **options) -> Graph:
    """LoadImage(s) [-> ImageBatch] -> sampler (add_sampler's options) -> SaveImage ``<prefix>save``."""
    g = Graph(prefix=prefix)
    load = g.node("StreamRTLoadPipeline", id=f"{prefix}load", model=MODEL, taesd=TAESD, dtype="auto", device="auto")
    sampler = add_sampler(g, load.out(0), id=f"{prefix}sampler", image=image_batch(g, images), **options)
    g.node("SaveImage", id=f"{prefix}save", images=sampler.out(0), filename_prefix=f"{prefix}/f")
    return g


def run_images(server: ComfyServer, g: Graph, prefix: str, ws=None) -> np.ndarray:
    outputs = server.run(g, timeout=300, client_id=None if ws is None else ws.client_id)
    return np.stack(server.output_images(outputs, f"{prefix}save"))[..., :3]


def assert_close(actual: np.ndarray, expected: torch.Tensor) -> None:
    np.testing.assert_allclose(actual, expected.numpy(), atol=PNG_ATOL, rtol=0)


def core_stream(core_models, **options) -> Stream:
    opts = {**SAMPLER_DEFAULTS, **options}
    return Stream(core_models, core_config(**options), prompt=opts["prompt"], negative_prompt=opts["negative_prompt"])


# ---------------------------------------------------------------------------------------------------
def test_the_sampler_and_the_settings_nodes_as_object_info_lists_them(server: ComfyServer) -> None:
    info = server.object_info()
    sampler = info["StreamRTSampler"]
    assert sampler["input_order"]["required"] == ["pipeline", "prompt", "negative_prompt", "steps", "strength", "cfg",
                                                  "seed", "t_index_list", "reset"]
    assert sampler["input_order"]["optional"] == ["image", "positive", "negative", "settings"]
    declared = {**sampler["input"]["required"], **sampler["input"]["optional"]}
    assert [declared[k][0] for k in ("positive", "negative", "settings")] == ["CONDITIONING", "CONDITIONING",
                                                                             "STREAMRT_SETTINGS"]
    bounds = {name: {k: declared[name][1].get(k) for k in ("default", "min", "max", "step")}
              for name in ("steps", "strength", "cfg")}
    assert bounds["steps"] == {"default": 2, "min": 1, "max": 8, "step": None}
    assert bounds["strength"] == {"default": 0.36, "min": 0.01, "max": 1.0, "step": 0.01}
    assert (bounds["cfg"]["default"], bounds["cfg"]["min"], bounds["cfg"]["max"]) == (1.2, 0.0, 20.0)
    assert declared["t_index_list"][1]["default"] == ""
    for node in ("StreamRTSettings", "StreamRTSimilarityFilter", "StreamRTCachedAttention"):
        assert info[node]["output"] == ["STREAMRT_SETTINGS"], node
        assert info[node]["input"]["optional"]["settings"][0] == "STREAMRT_SETTINGS", node
    assert info["StreamRTSettings"]["input"]["required"]["acceleration"][1]["default"] == "auto"
    assert info["StreamRTSettings"]["input"]["required"]["cfg_type"][1]["default"] == "self"
    # optional, so workflows saved before it still validate; on unless turned off
    assert info["StreamRTSettings"]["input"]["optional"]["fused_projections"][1]["default"] is True
    assert info["StreamRTSettings"]["input"]["optional"]["overlap_executions"][1]["default"] is False
    pack = {name: spec for name, spec in info.items() if spec.get("python_module", "").endswith(".StreamRT")}
    assert set(pack) >= {"StreamRTSampler", "StreamRTSettings", "StreamRTSimilarityFilter",
                         "StreamRTCachedAttention", "StreamRTLoadPipeline", "StreamRTBuildEngines"}
    for name, spec in pack.items():
        for input_name, value in {**spec["input"]["required"], **spec["input"].get("optional", {})}.items():
            assert value[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_the_pack_is_found_by_the_words_people_search_for(server: ComfyServer) -> None:
    pack = [spec for spec in server.object_info().values() if spec.get("python_module", "").endswith(".StreamRT")]

    def found(word: str) -> list[str]:
        return [spec["display_name"] for spec in pack
                if any(0 <= text.lower().find(word.lower()) <= SEARCH_REACH
                       for text in (spec["name"], spec["display_name"]))]

    for word in SEARCH_WORDS:
        assert found(word), f"no StreamRT node is found by {word!r}"
    assert found("StreamDiffusion") == found("realtime") == ["Realtime Sampler (webcam, StreamDiffusion)"]
    assert sorted(found("webcam")) == ["Realtime Sampler (webcam, StreamDiffusion)",
                                       "Stream Frame Input (webcam, StreamRT)"]


def test_steps_and_strength_give_the_frames_of_their_t_index_list(server: ComfyServer, core_models) -> None:
    clip = frames(3, seed=41)
    names = upload(server, clip, uid())
    mapped, explicit = uid(), uid()
    by_strength = [run_images(server, graph(mapped, [n], t_index_list="", steps=2, strength=0.36), mapped)[0]
                   for n in names]
    by_list = [run_images(server, graph(explicit, [n], t_index_list="32,41"), explicit)[0] for n in names]
    np.testing.assert_array_equal(np.stack(by_strength), np.stack(by_list))
    stream = core_stream(core_models, t_index_list="", steps=2, strength=0.36)
    assert stream.config.t_index_list == (32, 41)
    for k in range(len(clip)):
        assert_close(by_strength[k], stream.step(as_tensor(clip[k:k + 1]))[0])
    # strength takes part: another strength gives other frames (the first output comes from the empty buffer)
    other = uid()
    changed = [run_images(server, graph(other, [n], t_index_list="", steps=2, strength=0.7), other)[0] for n in names]
    assert np.abs(np.stack(changed[1:]) - np.stack(by_strength[1:])).max() > 10 * PNG_ATOL


def test_frames_per_step_from_stream_settings(server: ComfyServer, core_models) -> None:
    prefix, clip = uid(), frames(4, seed=42)
    names = upload(server, clip, prefix)
    got = run_images(server, graph(prefix, names, frames_per_step=2), prefix)
    assert_close(got, core_stream(core_models, frames_per_step=2).process_video(as_tensor(clip)))
    assert np.abs(got - core_stream(core_models).process_video(as_tensor(clip)).numpy()).max() > 10 * PNG_ATOL


def test_the_similarity_filter_node_skips_repeated_frames(server: ComfyServer, core_models) -> None:
    """The same frame four times: the filter (max_skip 2) runs calls 0 and 3 and repeats output 0 in between,
    as the core's filter does; without it the stream moves on every call."""
    prefix = uid()
    (name,) = upload(server, frames(1, seed=43), prefix)
    options = dict(similarity_filter=True, similarity_threshold=0.9, similarity_max_skip=2, reset=False)
    got = [run_images(server, graph(prefix, [name], **options), prefix)[0] for _ in range(4)]
    stream = core_stream(core_models, **options)
    frame = as_tensor(frames(1, seed=43))
    for k in range(4):
        assert_close(got[k], stream.step(frame)[0])
    np.testing.assert_array_equal(got[1], got[0])
    np.testing.assert_array_equal(got[2], got[0])
    assert np.abs(got[3] - got[0]).max() > 10 * PNG_ATOL


def test_a_chain_of_settings_nodes_applies_all_of_them(server: ComfyServer, core_models) -> None:
    """Stream Settings (cfg full, delta) -> Similarity Filter -> Cached Attention -> sampler, checked against the core
    with all three."""
    prefix, clip = uid(), frames(3, seed=44)
    names = upload(server, clip, prefix)
    options = dict(cfg_type="full", delta=0.7, acceleration="eager", similarity_filter=True,
                   similarity_threshold=0.99, similarity_max_skip=1, cached_attention=True, cache_max_frames=3,
                   cache_window=2, cache_interval=1)
    g = graph(prefix, names[:1], **options)
    chain = [node["class_type"] for node in g.to_dict().values() if node["class_type"].startswith("StreamRT")]
    assert chain == ["StreamRTLoadPipeline", "StreamRTSettings", "StreamRTSimilarityFilter",
                     "StreamRTCachedAttention", "StreamRTSampler"]
    got = [run_images(server, graph(prefix, [n], **options), prefix)[0] for n in names]
    stream = core_stream(core_models, **options)
    config = stream.config
    assert config.cfg_type.value == "full" and config.similarity_filter.enabled and config.kv_cache.enabled
    for k in range(len(clip)):
        assert_close(got[k], stream.step(as_tensor(clip[k:k + 1]))[0])


def test_stream_settings_turn_the_fused_projections_off(server: ComfyServer, core_models) -> None:
    """The sampler's streams fuse their self-attention projections unless Stream Settings' fused_projections is off,
    and say what their UNet calls take; both give the core's frames."""
    clip = frames(2, seed=46)
    for fused in (True, False):
        prefix = uid()
        names = upload(server, clip, prefix)
        options = dict(fused_projections=fused, acceleration="eager")
        with server.websocket() as ws:
            got = [run_images(server, graph(prefix, [n], **options), prefix, ws)[0] for n in names]
            ws.wait_for(lambda kind, d, prefix=prefix: kind == "streamrt.status"
                        and len(status_events(ws, prefix)) == 2, timeout=30)
            events = status_events(ws, prefix)
        extras = [("fused_qkv" in e["unet_extras"], "prompt_kv" in e["unet_extras"]) for e in events]
        assert extras == [(fused, True)] * 2, events
        stream = core_stream(core_models, **options)
        assert stream.config.fused_qkv is fused
        for k in range(len(clip)):
            assert_close(got[k], stream.step(as_tensor(clip[k:k + 1]))[0])


def test_stream_settings_overlap_executions_hands_each_frame_over_one_execution_later(server: ComfyServer,
                                                                                      core_models) -> None:
    """overlap_executions on: each execution returns the core's frame of the execution before it (the first one
    twice), its status event says so and gives no sampler speed (its GPU work runs on after it); a batch video
    through the same sampler stays aligned; off again, the next execution returns its own frame."""
    prefix, clip = uid(), frames(5, seed=47)
    names = upload(server, clip, prefix)
    options = dict(overlap_executions=True, acceleration="eager")
    with server.websocket() as ws:
        got = [run_images(server, graph(prefix, [n], **options), prefix, ws)[0] for n in names[:3]]
        ws.wait_for(lambda kind, d: kind == "streamrt.status" and len(status_events(ws, prefix)) == 3, timeout=30)
        events = status_events(ws, prefix)
    stream = core_stream(core_models, acceleration="eager")
    expected = [stream.step(as_tensor(clip[k:k + 1]))[0] for k in range(3)]
    for k, index in enumerate([0, 0, 1]):
        assert_close(got[k], expected[index])
    assert np.abs(got[2] - got[1]).max() > 10 * PNG_ATOL  # the shift is visible
    assert [(e["overlap"], e["fps"], e["ms_per_frame"]) for e in events] == [(True, None, None)] * 3, events
    assert [e["stream_frames"] for e in events] == [1, 2, 3]  # one stream all along
    # a video (two frames) through the same sampler: aligned as always, the pending frame dropped
    video = run_images(server, graph(prefix, names[3:5], **options), prefix)
    assert_close(video, stream.process_video(as_tensor(clip[3:5])))
    # overlap off (the stream is kept: the option is not part of its config): its own frame at once
    alone = run_images(server, graph(prefix, names[:1], acceleration="eager"), prefix)[0]
    assert_close(alone, stream.step(as_tensor(clip[0:1]))[0])


def test_with_the_similarity_filter_overlap_executions_reports_what_really_runs(server: ComfyServer,
                                                                                core_models) -> None:
    """The similarity filter needs every output when it is made, so with it a stream does not overlap: each execution
    returns its own frame and its status event says so, with the sampler's speed."""
    prefix, clip = uid(), frames(2, seed=48)
    names = upload(server, clip, prefix)
    options = dict(overlap_executions=True, similarity_filter=True, similarity_threshold=0.9999,
                   similarity_max_skip=1, acceleration="eager")
    with server.websocket() as ws:
        got = [run_images(server, graph(prefix, [n], **options), prefix, ws)[0] for n in names]
        ws.wait_for(lambda kind, d: kind == "streamrt.status" and len(status_events(ws, prefix)) == 2, timeout=30)
        events = status_events(ws, prefix)
    stream = core_stream(core_models, **options)
    for k in range(len(clip)):
        assert_close(got[k], stream.step(as_tensor(clip[k:k + 1]))[0])
    assert [e["overlap"] for e in events] == [False, False], events
    assert all(e["fps"] > 0 and e["ms_per_frame"] > 0 for e in events), events


def test_stream_devices_split_a_batch_video_and_refuse_devices_that_do_not_exist(server: ComfyServer) -> None:
    """Stream Devices (multi-GPU) chained into the settings: a batch video split over two streams (here both on the
    CPU, which this machine has) gives the frames of one stream, bit for bit; a GPU that does not exist is refused
    by the node, naming it, and the next prompt runs."""
    prefix, clip = uid(), frames(5, seed=48)
    names = upload(server, clip, prefix)
    plain = run_images(server, graph(prefix, names, reset=True), prefix)

    def split(devices: str) -> Graph:
        g = graph(prefix, names, reset=True)
        node = g.node("StreamRTDevices", id=f"{prefix}devices", devices=devices)
        g.nodes[f"{prefix}sampler"]["inputs"]["settings"] = node.out(0)
        return g

    with server.websocket() as ws:
        np.testing.assert_array_equal(run_images(server, split("cpu, cpu"), prefix, ws), plain)
        ws.wait_for(lambda kind, d: kind == "streamrt.status" and str(d.get("node")) == f"{prefix}sampler",
                    timeout=30)
        assert status_events(ws, prefix)[-1]["devices"] == ["cpu", "cpu"]  # it was split
    with pytest.raises(ExecutionFailed) as failed:
        server.run(split("cuda:7"), timeout=120)
    assert failed.value.node_id == f"{prefix}devices" and "'cuda:7' does not exist here" in str(failed.value)
    np.testing.assert_array_equal(run_images(server, graph(prefix, names, reset=True), prefix), plain)


def test_stream_devices_split_the_steps_of_one_stream(server: ComfyServer, core_models) -> None:
    """Stream Devices with split 'steps' (here over 'cpu, cpu'): one stream whose two denoising steps run as two
    stages, kept between executions. Realtime frames, once the pipeline has filled, and a batch video equal one
    stream's; the status names both devices; a ControlNet-free sampler without the node runs on one device again."""
    prefix, clip = uid(), frames(5, seed=49)
    names = upload(server, clip, prefix)

    def staged(images: list[str], **options) -> Graph:
        g = graph(prefix, images, **options)
        node = g.node("StreamRTDevices", id=f"{prefix}devices", devices="cpu, cpu", split="steps")
        g.nodes[f"{prefix}sampler"]["inputs"]["settings"] = node.out(0)
        return g

    with server.websocket() as ws:
        got = [run_images(server, staged([n]), prefix, ws)[0] for n in names]
        ws.wait_for(lambda kind, d: kind == "streamrt.status" and len(status_events(ws, prefix)) == len(names),
                    timeout=30)
        events = status_events(ws, prefix)
    assert [e["stream_frames"] for e in events] == [1, 2, 3, 4, 5]  # one stream all along
    assert events[-1]["devices"] == ["cpu", "cpu"]
    # each device's runtime notes, named by the device (each once: both stages say the same here)
    notes = events[-1]["notes"]
    assert notes and all(n.startswith("cpu: ") for n in notes) and len(set(notes)) == len(notes)
    assert any("runs eagerly" in n for n in notes)
    stream = core_stream(core_models)
    for k in range(len(clip)):
        expected = stream.step(as_tensor(clip[k:k + 1]))[0]
        if k >= stream.latency:  # the empty buffer's outputs differ by rounding amplified (tests/test_stages.py)
            assert_close(got[k], expected)
    video = run_images(server, staged(names, reset=True), prefix)
    assert_close(video, core_stream(core_models).process_video(as_tensor(clip)))
    with server.websocket() as ws:
        run_images(server, graph(prefix, names[:1]), prefix, ws)
        ws.wait_for(lambda kind, d: kind == "streamrt.status" and len(status_events(ws, prefix)) == 1, timeout=30)
        assert status_events(ws, prefix)[-1]["devices"] == ["cpu"]
    with server.websocket() as ws:  # one step: nothing to split, and the status says so
        run_images(server, staged(names[:1], t_index_list="30"), prefix, ws)
        ws.wait_for(lambda kind, d: kind == "streamrt.status" and len(status_events(ws, prefix)) == 1, timeout=30)
        event = status_events(ws, prefix)[-1]
        assert event["devices"] == ["cpu"] and any("this stream has one" in note for note in event["notes"])


# ---------------------------------------------------------------------------------------------------
# CONDITIONING

def saved_conditioning(server: ComfyServer, embeds: torch.Tensor) -> str:
    """A folder in the server's output directory that LoadTrainingDataset reads back as the CONDITIONING
    ``[[embeds, {"pooled_output": ...}]]`` (what CLIPTextEncode gives, pooled output included)."""
    name = f"streamrt-cond-{uuid.uuid4().hex[:8]}"
    folder = server.output_dir / name
    folder.mkdir(parents=True)
    conditioning = [[embeds.clone(), {"pooled_output": torch.zeros(1, embeds.shape[-1])}]]
    torch.save({"latents": [{"samples": torch.zeros(1, 4, 8, 8)}], "conditioning": [conditioning]},
               folder / "shard_0000.pkl")
    return name


@pytest.fixture
def conditioning_node(server: ComfyServer):
    if "LoadTrainingDataset" not in server.object_info():
        pytest.skip("this ComfyUI has no LoadTrainingDataset node (a CONDITIONING without a CLIP)")


def status_events(ws, prefix: str) -> list[dict]:
    return [e for e in ws.of_type("streamrt.status") if str(e["node"]) == f"{prefix}sampler"]


def test_a_conditioning_of_the_pipelines_own_embeddings_gives_the_text_route(server: ComfyServer, core_models,
                                                                             conditioning_node) -> None:
    encode = core_models.prompt_encoder.encode
    prompt, negative = "a watercolor lighthouse", "dark, blurry"
    positive_name = saved_conditioning(server, encode(prompt).tokens.cpu())
    negative_name = saved_conditioning(server, encode(negative).tokens.cpu())
    prefix, clip = uid(), frames(3, seed=45)
    names = upload(server, clip, prefix)

    def conditioned(name: str, **options) -> Graph:
        g = graph(prefix, [name], cfg_type="full", **options)
        g.nodes[f"{prefix}sampler"]["inputs"].update(
            positive=g.node("LoadTrainingDataset", folder_name=positive_name).out(1),
            negative=g.node("LoadTrainingDataset", folder_name=negative_name).out(1))
        return g

    with server.websocket() as ws:
        # the texts on the node are not the conditionings' prompts: they must not be used
        got = [run_images(server, conditioned(n, prompt="a cat", negative_prompt="a dog"), prefix, ws)[0]
               for n in names]
        ws.wait_for(lambda kind, d: kind == "streamrt.status" and len(status_events(ws, prefix)) == 3, timeout=30)
        events = status_events(ws, prefix)
    stream = core_stream(core_models, cfg_type="full", prompt=prompt, negative_prompt=negative)
    for k in range(len(clip)):
        assert_close(got[k], stream.step(as_tensor(clip[k:k + 1]))[0])
    assert [e["stream_frames"] for e in events] == [1, 2, 3]  # one stream all along: nothing rebuilt
    for event in events:
        assert "positive is connected: the prompt text is not used" in event["notes"], event["notes"]
        assert "negative is connected: the negative_prompt text is not used" in event["notes"], event["notes"]
    # the texts would have given other frames (the conditionings really were used)
    texts = core_stream(core_models, cfg_type="full", prompt="a cat", negative_prompt="a dog")
    from_texts = [texts.step(as_tensor(clip[k:k + 1]))[0].numpy() for k in range(len(clip))]
    # (the tiny random text encoder moves frames only a few 8-bit steps; the match above is within one)
    assert np.abs(np.stack(got[1:]) - np.stack(from_texts[1:])).max() > 2 * PNG_ATOL


def test_a_longer_conditioning_rebuilds_the_stream(server: ComfyServer, core_models, conditioning_node) -> None:
    embeds = core_models.prompt_encoder.encode("a watercolor lighthouse").tokens.cpu()
    name = saved_conditioning(server, embeds)
    prefix, clip = uid(), frames(2, seed=46)
    images = upload(server, clip, prefix)

    def conditioned(image: str, concat: bool) -> Graph:
        g = graph(prefix, [image])
        positive = g.node("LoadTrainingDataset", folder_name=name).out(1)
        if concat:  # 154 tokens: the same prompt twice
            positive = g.node("ConditioningConcat", conditioning_to=positive, conditioning_from=positive).out(0)
        g.nodes[f"{prefix}sampler"]["inputs"]["positive"] = positive
        return g

    with server.websocket() as ws:
        runs = [(images[0], False), (images[1], False), (images[0], True), (images[1], True), (images[0], False)]
        got = [run_images(server, conditioned(image, concat), prefix, ws)[0] for image, concat in runs]
        ws.wait_for(lambda kind, d: kind == "streamrt.status" and len(status_events(ws, prefix)) == 5, timeout=30)
        counts = [e["stream_frames"] for e in status_events(ws, prefix)]
    assert counts == [1, 2, 1, 2, 1], counts  # the token count changed twice: two new streams
    long = Stream(core_models, core_config(), prompt=torch.cat([embeds, embeds], dim=1),
                  negative_prompt=SAMPLER_DEFAULTS["negative_prompt"])
    assert long.config.prompt_length == 154
    assert_close(got[2], long.step(as_tensor(clip[:1]))[0])
    assert_close(got[3], long.step(as_tensor(clip[1:2]))[0])


def test_conditionings_the_stream_cannot_take_are_refused_by_name(server: ComfyServer, conditioning_node) -> None:
    prefix = uid()
    (image,) = upload(server, frames(1, seed=47), prefix)

    def with_positive(make) -> Graph:
        g = graph(prefix, [image])
        g.nodes[f"{prefix}sampler"]["inputs"]["positive"] = make(g)
        return g

    cases = [  # LotusConditioning: a [1, 77, 1024] conditioning (SD2's text width), another model's
        (lambda g: g.node("LotusConditioning").out(0), ["1024 wide", "gives 32"]),
        (lambda g: g.node("ConditioningCombine", conditioning_1=g.node("LotusConditioning").out(0),
                          conditioning_2=g.node("LotusConditioning").out(0)).out(0),
         ["holds 2 prompts", "Conditioning Average"]),
        (lambda g: g.node("ConditioningSetArea", conditioning=g.node("LotusConditioning").out(0), width=64,
                          height=64, x=0, y=0, strength=1.0).out(0), ["area", "Conditioning Average"]),
    ]
    for make, words in cases:
        with pytest.raises(ExecutionFailed) as failed:
            server.run(with_positive(make), timeout=120)
        assert failed.value.node_id == f"{prefix}sampler"
        for word in words:
            assert word in str(failed.value), f"{word!r} not in {failed.value}"
        assert run_images(server, graph(prefix, [image]), prefix).shape[0] == 1  # the next prompt runs
