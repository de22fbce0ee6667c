"""ControlNets on the real ComfyUI server (issue #16): ControlNetLoader + Apply ControlNet (Advanced) + Realtime
Sampler, in realtime and batch mode, against an in-process stream with the same ControlNet file.

The ControlNet is random, in ComfyUI's (LDM) layout, shaped like the reduced UNet of the SD1.5-layout checkpoint
(``model_files.write_sd15_layout_checkpoint``), so that ComfyUI's ControlNetLoader recognises it as an SD1.5
ControlNet. The prompts are CONDITIONINGs of the pipeline's own embeddings (read back by ComfyUI's
LoadTrainingDataset), so the in-process stream gets exactly what the server's does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_harness import ComfyServer, Graph, comfyui_dir
from e2e_helpers import PNG_ATOL, add_sampler, as_tensor, frames, image_batch, save_conditioning, uid
from model_files import (
    SD15_LAYOUT_CKPT,
    SD15_LAYOUT_CONTROLNET,
    write_sd15_layout_checkpoint,
    write_sd15_layout_controlnet,
)
from stream_helpers import first_cache_mode

from streamrt import Stream, StreamConfig, load_checkpoint
from streamrt.controlnet import ControlNet
from streamrt.controlnet_loading import load_controlnet
from streamrt.prompts import TextEmbedding

pytestmark = pytest.mark.e2e

CONTROLNET = SD15_LAYOUT_CONTROLNET
SHUFFLE = "streamrt-sd15-layout-controlnet_shuffle.safetensors"
SIZE = 64
T_INDEX = "20,35"
STRENGTH = 0.8


@pytest.fixture(scope="session")
def e2e_tiny_models(streamrt_models_root: Path) -> Path:
    write_sd15_layout_checkpoint(streamrt_models_root)
    path = write_sd15_layout_controlnet(streamrt_models_root)
    shuffle = path.with_name(SHUFFLE)  # the same weights under a name ComfyUI reads as a shuffle ControlNet
    if not shuffle.is_file():
        shutil.copyfile(path, shuffle)
    return streamrt_models_root


@pytest.fixture(scope="module")
def local(e2e_tiny_models: Path):
    """The checkpoint and the ControlNet in this process (fp32 on the CPU, as the CPU server runs them)."""
    comfy_tokenizer = comfyui_dir() / "comfy" / "sd1_tokenizer"
    models = load_checkpoint(e2e_tiny_models / "checkpoints" / SD15_LAYOUT_CKPT, dtype="fp32", device="cpu",
                             tokenizer_dir=comfy_tokenizer)
    net = load_controlnet(e2e_tiny_models / "controlnet" / CONTROLNET, dtype=torch.float32, device="cpu",
                          family=models.family, unet_config=models.unet.config)
    return models, net


@pytest.fixture
def server(comfy_server: ComfyServer, e2e_tiny_models: Path) -> ComfyServer:
    return comfy_server


def _graph(server: ComfyServer, prefix: str, cond: str, images: list[str], controls: list[str] | None,
           strength: float = STRENGTH, start: float = 0.0, end: float = 1.0, net_name: str = CONTROLNET):
    """Load Stream Pipeline -> sampler with CONDITIONING prompts; with ``controls``, Apply ControlNet (Advanced)
    on them with that control image batch."""
    g = Graph(prefix=prefix)

    dataset = g.node("LoadTrainingDataset", folder_name=cond)
    positive = negative = dataset.out(1)
    if controls is not None:
        net = g.node("ControlNetLoader", control_net_name=net_name)
        applied = g.node("ControlNetApplyAdvanced", positive=positive, negative=negative, control_net=net.out(0),
                         image=image_batch(g, controls), strength=strength, start_percent=start, end_percent=end)
        positive, negative = applied.out(0), applied.out(1)
    pipe = g.node("StreamRTLoadPipeline", model=SD15_LAYOUT_CKPT, taesd="none (full VAE)", dtype="auto",
                  device="auto")
    sampler = add_sampler(g, pipe.out(0), id=f"{prefix}sampler", image=image_batch(g, images), positive=positive,
                          negative=negative, t_index_list=T_INDEX)
    g.node("SaveImage", id=f"{prefix}save", images=sampler.out(0), filename_prefix=f"{prefix}/f")
    return g


def _run(server: ComfyServer, g: Graph, prefix: str, ws=None) -> np.ndarray:
    outputs = server.run(g, timeout=600, client_id=None if ws is None else ws.client_id)
    return np.stack(server.output_images(outputs, f"{prefix}save"))[..., :3]


@pytest.fixture
def inputs(server: ComfyServer, local):
    models, _ = local
    embeds = models.prompt_encoder.encode("a red fox in the snow").tokens
    cond = save_conditioning(server, embeds)
    images, controls = frames(3, seed=41), frames(3, seed=42)
    return (embeds, cond, images, controls, [server.write_input_image(i, name=f"{uid()}.png") for i in images],
            [server.write_input_image(c, name=f"{uid()}.png") for c in controls])


def _local_stream(local, embeds, strength=STRENGTH, start=0.0, end=1.0, cfg_type="self",
                  negative=True) -> Stream:
    models, net = local
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 35), guidance_scale=1.5, seed=7,
                          cfg_type=cfg_type)
    return Stream(models, config, prompt=TextEmbedding(embeds), negative_prompt=TextEmbedding(embeds),
                  controlnets=[ControlNet(net, strength, start, end, negative)])


def _png(images) -> torch.Tensor:
    """What LoadImage gives for these uint8 frames."""
    return as_tensor(np.stack(images))


def test_realtime_and_batch_equal_the_in_process_stream(server: ComfyServer, local, inputs) -> None:
    embeds, cond, images, controls, image_names, control_names = inputs
    prefix = uid()
    realtime = [_run(server, _graph(server, prefix, cond, [i], [c]), prefix)[0]
                for i, c in zip(image_names, control_names)]
    stream = _local_stream(local, embeds)
    expected = [stream.step(_png([i]), control=[_png([c])])[0].numpy() for i, c in zip(images, controls)]
    np.testing.assert_allclose(np.stack(realtime), np.stack(expected), atol=PNG_ATOL, rtol=0)

    prefix = uid()
    video = _run(server, _graph(server, prefix, cond, image_names, control_names), prefix)
    expected_video = _local_stream(local, embeds).process_video(_png(images), control=[_png(controls)]).numpy()
    assert video.shape == (3, SIZE, SIZE, 3)
    np.testing.assert_allclose(video, expected_video, atol=PNG_ATOL, rtol=0)

    prefix = uid()
    plain = _run(server, _graph(server, prefix, cond, image_names, None), prefix)
    assert np.abs(plain - video).max() > 10 * PNG_ATOL, "the ControlNet changed nothing: nothing was compared"


def test_a_shuffle_controlnet_pools_its_residuals_as_comfyui_does(server: ComfyServer, local, inputs,
                                                                 e2e_tiny_models: Path) -> None:
    """ComfyUI's ControlNetLoader reads a file named ``*_shuffle`` as a ControlNet whose residuals are pooled over
    the image; the sampler converts it so (the frames equal an in-process stream of the pooled ControlNet, and
    differ from the same weights unpooled)."""
    embeds, cond, images, controls, image_names, control_names = inputs
    models, _ = local
    pooled = load_controlnet(e2e_tiny_models / "controlnet" / SHUFFLE, dtype=torch.float32, device="cpu",
                             family=models.family, unet_config=models.unet.config)
    assert pooled.config.global_pool_conditions
    prefix = uid()
    video = _run(server, _graph(server, prefix, cond, image_names, control_names, net_name=SHUFFLE), prefix)
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(20, 35), guidance_scale=1.5, seed=7)
    expected = Stream(models, config, prompt=TextEmbedding(embeds), negative_prompt=TextEmbedding(embeds),
                      controlnets=[ControlNet(pooled, STRENGTH)]).process_video(_png(images), control=[_png(controls)])
    np.testing.assert_allclose(video, expected.numpy(), atol=PNG_ATOL, rtol=0)
    unpooled = _local_stream(local, embeds).process_video(_png(images), control=[_png(controls)]).numpy()
    assert np.abs(unpooled - video).max() > 10 * PNG_ATOL, "pooling changed nothing: nothing was compared"


def test_a_controlnet_stream_with_its_steps_split_over_devices(server: ComfyServer, local, inputs) -> None:
    """Stream Devices with split 'steps' (over 'cpu, cpu' here): the ControlNet runs in both stages, its control
    images handed on with the rows; realtime frames (once the pipeline has filled) and a batch video equal the
    in-process one-device stream."""
    embeds, cond, images, controls, image_names, control_names = inputs
    prefix = uid()

    def split(g: Graph) -> Graph:
        node = g.node("StreamRTDevices", id=f"{prefix}devices", devices="cpu, cpu", split="steps")
        g.nodes[f"{prefix}sampler"]["inputs"]["settings"] = node.out(0)
        return g

    realtime = [_run(server, split(_graph(server, prefix, cond, [i], [c])), prefix)[0]
                for i, c in zip(image_names, control_names)]
    stream = _local_stream(local, embeds)
    expected = [stream.step(_png([i]), control=[_png([c])])[0].numpy() for i, c in zip(images, controls)]
    # the first output comes from the empty buffer, where a smaller UNet batch's rounding shows (tests/test_stages.py)
    np.testing.assert_allclose(np.stack(realtime[1:]), np.stack(expected[1:]), atol=PNG_ATOL, rtol=0)
    prefix = uid()
    video = _run(server, split(_graph(server, prefix, cond, image_names, control_names)), prefix)
    expected_video = _local_stream(local, embeds).process_video(_png(images), control=[_png(controls)]).numpy()
    np.testing.assert_allclose(video, expected_video, atol=PNG_ATOL, rtol=0)


def test_control_images_are_sized_as_comfyui_sizes_them(server: ComfyServer, local, inputs) -> None:
    """Control images of another size and aspect (80x48 for a 64x64 stream) are center-cropped to the stream's
    aspect and scaled nearest-exact, as ComfyUI's ControlNet sizes its hint for a latent (not stretched)."""
    embeds, cond, images, _, image_names, _ = inputs
    rng = np.random.default_rng(43)
    wide = np.repeat(np.repeat(rng.integers(0, 256, size=(3, 6, 10, 3)).astype(np.uint8), 8, axis=1), 8, axis=2)
    names = [server.write_input_image(c, name=f"{uid()}.png") for c in wide]
    prefix = uid()
    video = _run(server, _graph(server, prefix, cond, image_names, names), prefix)
    # 80x48 -> the 48x48 middle (columns 16..63) -> 64x64, nearest-exact
    cropped = _png(wide)[:, :, 16:64].movedim(-1, 1)
    sized = torch.nn.functional.interpolate(cropped, size=(SIZE, SIZE), mode="nearest-exact").movedim(1, -1)
    expected = _local_stream(local, embeds).process_video(_png(images), control=[sized])
    np.testing.assert_allclose(video, expected.numpy(), atol=PNG_ATOL, rtol=0)
    stretched = torch.nn.functional.interpolate(_png(wide).movedim(-1, 1), size=(SIZE, SIZE), mode="bilinear")
    other = _local_stream(local, embeds).process_video(_png(images), control=[stretched.movedim(1, -1)])
    # stretched control images give other frames (by more than the tolerance the crop passed with)
    assert np.abs(other.numpy() - video).max() > 3 * PNG_ATOL, "stretching changed nothing: nothing was compared"


def test_the_older_apply_controlnet_leaves_the_negative_prompt_alone(server: ComfyServer, local, inputs) -> None:
    """Apply ControlNet (OLD) puts the ControlNet on the positive CONDITIONING only; with cfg full the negative rows
    then run without it, as ComfyUI's own samplers run the negative (frames equal an in-process stream whose
    ControlNet leaves the negative rows alone, and differ from one that conditions them)."""
    embeds, cond, images, controls, image_names, control_names = inputs
    prefix = uid()
    g = Graph(prefix=prefix)
    dataset = g.node("LoadTrainingDataset", folder_name=cond)
    net = g.node("ControlNetLoader", control_net_name=CONTROLNET)
    applied = g.node("ControlNetApply", conditioning=dataset.out(1), control_net=net.out(0),
                     image=image_batch(g, control_names), strength=STRENGTH)
    pipe = g.node("StreamRTLoadPipeline", model=SD15_LAYOUT_CKPT, taesd="none (full VAE)", dtype="auto",
                  device="auto")
    sampler = add_sampler(g, pipe.out(0), id=f"{prefix}sampler", image=image_batch(g, image_names),
                          positive=applied.out(0), negative=dataset.out(1), t_index_list=T_INDEX, cfg_type="full")
    g.node("SaveImage", id=f"{prefix}save", images=sampler.out(0), filename_prefix=f"{prefix}/f")
    video = _run(server, g, prefix)
    expected = _local_stream(local, embeds, cfg_type="full", negative=False).process_video(
        _png(images), control=[_png(controls)])
    np.testing.assert_allclose(video, expected.numpy(), atol=PNG_ATOL, rtol=0)
    both = _local_stream(local, embeds, cfg_type="full").process_video(_png(images), control=[_png(controls)])
    assert np.abs(both.numpy() - video).max() > 10 * PNG_ATOL, "the negative rows made no difference"


def test_canny_control_and_live_strength(server: ComfyServer, inputs) -> None:
    """A control image from a core preprocessor (Canny); a strength change keeps the stream (its frame count goes
    on) and changes the frames. Strength 0: ComfyUI's Apply ControlNet then returns the conditioning without the
    ControlNet, so this checks that route gives the plain frames; the stream's own strength-0 path (no ControlNet
    call, bit for bit the plain step) is tests/test_stream_controlnet.py's."""
    _, cond, _, _, image_names, _ = inputs

    def graph(prefix, strength):
        g = Graph(prefix=prefix)
        image = g.node("LoadImage", id=f"{prefix}img", image=image_names[0]).out(0)
        canny = g.node("Canny", image=image, low_threshold=0.2, high_threshold=0.6).out(0)
        dataset = g.node("LoadTrainingDataset", folder_name=cond)
        net = g.node("ControlNetLoader", control_net_name=CONTROLNET)
        applied = g.node("ControlNetApplyAdvanced", positive=dataset.out(1), negative=dataset.out(1),
                         control_net=net.out(0), image=canny, strength=strength, start_percent=0.0, end_percent=1.0)
        pipe = g.node("StreamRTLoadPipeline", model=SD15_LAYOUT_CKPT, taesd="none (full VAE)", dtype="auto",
                      device="auto")
        sampler = add_sampler(g, pipe.out(0), id=f"{prefix}sampler", image=image, positive=applied.out(0),
                              negative=applied.out(1), t_index_list=T_INDEX)
        g.node("SaveImage", id=f"{prefix}save", images=sampler.out(0), filename_prefix=f"{prefix}/f")
        return g

    prefix = uid()
    first = _run(server, graph(prefix, 0.8), prefix)
    with server.websocket() as ws:
        second = _run(server, graph(prefix, 0.3), prefix, ws)
        ws.wait_for(lambda kind, d: kind == "streamrt.status" and str(d.get("node")) == f"{prefix}sampler",
                    timeout=30)
        status = [e for e in ws.of_type("streamrt.status") if str(e["node"]) == f"{prefix}sampler"]
    assert status[-1]["stream_frames"] == 2, "a strength change rebuilt the stream"
    assert np.abs(first - second).max() > 2 * PNG_ATOL
    zero_prefix, plain_prefix = uid(), uid()
    zero = _run(server, graph(zero_prefix, 0.0), zero_prefix)
    g = Graph(prefix=plain_prefix)
    image = g.node("LoadImage", image=image_names[0]).out(0)
    pipe = g.node("StreamRTLoadPipeline", model=SD15_LAYOUT_CKPT, taesd="none (full VAE)", dtype="auto",
                  device="auto")
    dataset = g.node("LoadTrainingDataset", folder_name=cond)
    sampler = add_sampler(g, pipe.out(0), id=f"{plain_prefix}sampler", image=image, positive=dataset.out(1),
                          negative=dataset.out(1), t_index_list=T_INDEX)
    g.node("SaveImage", id=f"{plain_prefix}save", images=sampler.out(0), filename_prefix=f"{plain_prefix}/f")
    np.testing.assert_array_equal(zero, _run(server, g, plain_prefix))


# one cache mode: the engine cache is files shared by the session's servers, so a second mode would only reuse
@pytest.mark.parametrize("comfy_server", [first_cache_mode()], indirect=True)
def test_build_engines_takes_the_controlnet(server: ComfyServer) -> None:
    """Build Engines with the ControlNetLoader's CONTROL_NET builds (TensorRT-RTX, SM89, ahead of time on this CPU
    server) the UNet engine that takes the residuals and the ControlNet's own engine, keyed by its weights; the
    same request again reuses both (the ControlNet's fingerprint is stable across executions); a ControlNet with
    the VAE components only is refused naming the problem. Running the engines needs an RTX GPU."""
    pytest.importorskip("polygraphy", reason="engine builds need polygraphy")
    pytest.importorskip("tensorrt_rtx", reason="engine builds need TensorRT-RTX (pip install tensorrt-rtx)")
    import json

    from comfy_harness import ExecutionFailed

    def build(prefix: str, components: str = "unet"):
        g = Graph(prefix=prefix)
        pipe = g.node("StreamRTLoadPipeline", model=SD15_LAYOUT_CKPT, taesd="none (full VAE)", dtype="auto",
                      device="auto")
        net = g.node("ControlNetLoader", control_net_name=CONTROLNET)
        g.node("StreamRTBuildEngines", id=f"{prefix}build", pipeline=pipe.out(0), control_net=net.out(0), steps=2,
               width=SIZE, height=SIZE, min_size=0, max_size=0, backend="tensorrt-rtx", target="SM89",
               precision="fp16", components=components, rebuild=False)
        return g

    prefix = uid()
    report = "\n".join(server.run(build(prefix), timeout=600)[f"{prefix}build"]["text"])
    assert report.count("built in") == 2 and "unet+control" in report and "controlnet " in report, report
    keys = [json.loads(p.read_text())["key"] for p in (server.models_dir / "engines").rglob("*.json")
            if ".staging" not in p.parts and "timing" not in p.parts]
    unet = [k for k in keys if k["component"] == "unet" and k.get("control")]
    control = [k for k in keys if k["component"] == "controlnet"]
    assert len(unet) == 1 and len(control) == 1, keys
    assert control[0]["weights"].startswith("controlnet-") and control[0]["weights"] in report
    assert all(f"Folder: {(server.models_dir / 'engines').resolve()}" in line for line in report.splitlines()
               if line.startswith("Folder:")) and report.count("Folder:") == 2, report

    prefix = uid()
    again = "\n".join(server.run(build(prefix), timeout=600)[f"{prefix}build"]["text"])
    assert again.count("reused") == 2 and "built in" not in again, again
    with pytest.raises(ExecutionFailed, match="its engines go with the UNet's"):
        server.run(build(uid(), components="vae"), timeout=120)
