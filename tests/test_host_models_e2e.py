"""ComfyUI's own models as a stream's source, on the real server: Load Checkpoint -> LoraLoader -> Stream
Pipeline from Model -> Stream Sampler, against Load Stream Pipeline + StreamRT LoRA on the same files.

The checkpoint has SD1.5's layout with random weights (``model_files.write_sd15_layout_checkpoint``: full
CLIP-L and VAE, so that ComfyUI recognises it, and a reduced UNet whose shape ComfyUI reads from the keys and
Load Stream Pipeline from the config folder named by the checkpoint's sidecar).

On a GPU server (``STREAMRT_SERVER_GPU=1``, e.g. ``bash scripts/gpu_comfyui.sh pytest`` on the GPU machine) run
ComfyUI with ``--fp32-vae``: by default ComfyUI stores VAEs in bf16 on such GPUs, which rounds the VAE
weights the stream then converts (measured on the H200: 0.08 % of pixels off by up to 4/255).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_harness import ComfyServer, ExecutionFailed, Graph
from e2e_helpers import SAMPLER_DEFAULTS, add_sampler, frames, image_batch, uid
from model_files import SD15_LAYOUT_CKPT, SD15_LAYOUT_LORA, taesd_to_comfy, write_sd15_layout_checkpoint

pytestmark = pytest.mark.e2e

CKPT, LORA = SD15_LAYOUT_CKPT, SD15_LAYOUT_LORA
STRENGTHS = (0.8, 0.6)
SIZE = 64
#: both routes compute in fp32 on the CPU; they differ in LoRA arithmetic order and PNG rounding only
ATOL = 2.01 / 255


#: a TAESD of the real architecture (ComfyUI's Load VAE only builds that one), random weights: a single file in
#: models/vae for Load VAE, the same weights as an AutoencoderTiny folder in models/vae_approx for our loader
TAESD_FILE, TAESD_FOLDER = "streamrt-taesd-full.safetensors", "streamrt-taesd-full"


@pytest.fixture(scope="session")
def e2e_tiny_models(streamrt_models_root: Path) -> Path:
    root = streamrt_models_root
    write_sd15_layout_checkpoint(root)
    if not (root / "vae" / TAESD_FILE).is_file():
        from diffusers import AutoencoderTiny
        from safetensors.torch import save_file

        torch.manual_seed(14)
        taesd = AutoencoderTiny().eval()
        taesd.save_pretrained(root / "vae_approx" / TAESD_FOLDER, safe_serialization=True)
        encoder, decoder = taesd_to_comfy(taesd)
        state = {**{f"taesd_encoder.{k}": v for k, v in encoder.items()},
                 **{f"taesd_decoder.{k}": v for k, v in decoder.items()},
                 "vae_scale": torch.tensor(0.18215), "vae_shift": torch.tensor(0.0)}
        (root / "vae").mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(root / "vae" / TAESD_FILE))
    return root


@pytest.fixture
def server(comfy_server: ComfyServer, e2e_tiny_models: Path) -> ComfyServer:
    return comfy_server


def host_route(g: Graph, prefix: str, *, lora: bool = True, strengths: tuple[float, float] = STRENGTHS,
               sampling: str | None = None, taesd: bool = False):
    """Load Checkpoint [-> ModelSamplingDiscrete] [-> LoraLoader] [+ Load VAE (TAESD)] -> Stream Pipeline from
    Model."""
    ckpt = g.node("CheckpointLoaderSimple", id=f"{prefix}ckpt", ckpt_name=CKPT)
    model, clip = ckpt.out(0), ckpt.out(1)
    if sampling is not None:
        model = g.node("ModelSamplingDiscrete", model=model, sampling=sampling, zsnr=False).out(0)
    if lora:
        patched = g.node("LoraLoader", id=f"{prefix}lora", model=model, clip=clip, lora_name=LORA,
                         strength_model=strengths[0], strength_clip=strengths[1])
        model, clip = patched.out(0), patched.out(1)
    vae = g.node("VAELoader", vae_name=TAESD_FILE).out(0) if taesd else ckpt.out(2)
    return g.node("StreamRTPipelineFromModel", id=f"{prefix}pipe", model=model, clip=clip, vae=vae, dtype="auto")


def own_route(g: Graph, prefix: str, *, lora: bool = True, prediction_type: str = "auto", taesd: bool = False):
    """Load Stream Pipeline [+ StreamRT LoRA] on the same file."""
    inputs = dict(model=CKPT, taesd=TAESD_FOLDER if taesd else "none (full VAE)", dtype="auto", device="auto",
                  prediction_type=prediction_type)
    if lora:
        inputs["loras"] = g.node("StreamRTLora", id=f"{prefix}slora", lora_name=LORA, strength_model=STRENGTHS[0],
                                 strength_clip=STRENGTHS[1]).out(0)
    return g.node("StreamRTLoadPipeline", id=f"{prefix}pipe", **inputs)


def sampled(g: Graph, prefix: str, pipeline, image, **overrides) -> None:
    sampler = add_sampler(g, pipeline.out(0), id=f"{prefix}sampler", image=image, **overrides)
    g.node("SaveImage", id=f"{prefix}save", images=sampler.out(0), filename_prefix=f"{prefix}/f")


def with_clip_text_encode(g: Graph, prefix: str, pipeline) -> dict:
    """The prompts as CONDITIONING from ComfyUI's CLIPTextEncode on the (LoRA-patched) CLIP of the route."""
    clip = pipeline.inputs["clip"]  # the link into Stream Pipeline from Model
    encode = {name: g.node("CLIPTextEncode", clip=clip, text=SAMPLER_DEFAULTS[key]).out(0)
              for name, key in (("positive", "prompt"), ("negative", "negative_prompt"))}
    return dict(encode, prompt="", negative_prompt="")


def realtime(server: ComfyServer, route, names: list[str], conditioning: bool = False, **route_kw) -> np.ndarray:
    """One frame per execution through one sampler; the frames of all executions."""
    prefix, out = uid(), []
    for name in names:
        g = Graph(prefix=prefix)
        pipeline = route(g, prefix, **route_kw)
        prompts = with_clip_text_encode(g, prefix, pipeline) if conditioning else {}
        sampled(g, prefix, pipeline, g.node("LoadImage", id=f"{prefix}img", image=name).out(0), **prompts)
        out.append(np.stack(server.output_images(server.run(g, timeout=600), f"{prefix}save"))[0])
    return np.stack(out)[..., :3]


def batch(server: ComfyServer, route, names: list[str]) -> np.ndarray:
    """One execution over a video of the frames."""
    prefix = uid()
    g = Graph(prefix=prefix)
    sampled(g, prefix, route(g, prefix), image_batch(g, names))
    return np.stack(server.output_images(server.run(g, timeout=600), f"{prefix}save"))[..., :3]


def conversions(server: ComfyServer) -> int:
    return len(re.findall(r"pipeline from the host's model", server.log_text()))


@pytest.fixture
def names(server: ComfyServer) -> list[str]:
    return [server.write_input_image(image, name=f"{uid()}.png") for image in frames(3, seed=31)]


# ---------------------------------------------------------------------------------------------------
def test_node_takes_comfyuis_model_clip_and_vae(server: ComfyServer) -> None:
    spec = server.object_info()["StreamRTPipelineFromModel"]
    required = spec["input"]["required"]
    assert [required[n][0] for n in ("model", "clip", "vae")] == ["MODEL", "CLIP", "VAE"]
    assert spec["output"] == ["STREAMRT_PIPELINE"]
    assert all(value[1].get("tooltip") for value in required.values())


def test_load_checkpoint_and_lora_route_gives_the_frames_of_our_loader(server: ComfyServer, names) -> None:
    host = realtime(server, host_route, names)
    own = realtime(server, own_route, names)
    np.testing.assert_allclose(host, own, atol=ATOL, rtol=0)
    assert host.std() > 0.02, "the frames are flat: nothing was compared"
    # The LoRA was applied on both routes: without it the frames are far from these.
    plain = realtime(server, host_route, names[:1], lora=False)
    assert np.abs(plain[0] - host[0]).max() > 10 * ATOL

    # CLIPTextEncode's CONDITIONING instead of the texts: ComfyUI's own text encoder (fp16 on its CPU) gives
    # the prompts, so the frames agree to that encoder's precision.
    encoded = realtime(server, host_route, names, conditioning=True)
    np.testing.assert_allclose(encoded, own, atol=3 * ATOL, rtol=0)

    host_video = batch(server, host_route, names)
    own_video = batch(server, own_route, names)
    assert host_video.shape == (len(names), SIZE, SIZE, 3)
    np.testing.assert_allclose(host_video, own_video, atol=ATOL, rtol=0)


def test_converted_once_per_patch_set_and_free_releases_it(server: ComfyServer, names) -> None:
    # strengths no other test uses, so that no pipeline of this patch set exists yet
    before, strengths = conversions(server), (0.37, 0.6)
    prefix = uid()
    for name in names[:2]:  # the same graph queued again: the pipeline is not converted again (also when
        g = Graph(prefix=prefix)  # ComfyUI re-runs Load Checkpoint every time, with --cache-none)
        sampled(g, prefix, host_route(g, prefix, strengths=strengths),
                g.node("LoadImage", id=f"{prefix}img", image=name).out(0))
        server.run(g, timeout=600)
    assert conversions(server) == before + 1
    # Another LoRA strength is another patch set: converted again.
    realtime(server, host_route, names[:1], strengths=(0.21, 0.6))
    assert conversions(server) == before + 2

    server.free()
    assert "releasing StreamRT pipelines and streams" in server.log_text()
    realtime(server, host_route, names[:1], strengths=strengths)  # the next run converts again and works
    assert conversions(server) == before + 3


def _allocated(server: ComfyServer) -> int:
    device = server.system_stats()["devices"][0]
    return device["torch_vram_total"] - device["torch_vram_free"]  # the allocator's active bytes


def test_the_gpu_holds_one_copy_of_the_weights(server: ComfyServer, names, e2e_tiny_models: Path) -> None:
    """On a GPU server: the host route adds the stream's own fp16 weights to the GPU and not ComfyUI's copy as
    well (Load Checkpoint loads the UNet onto a roomy GPU at once; the node moves it back to the CPU)."""
    if server.system_stats()["devices"][0]["type"] != "cuda":
        pytest.skip("the server computes on the CPU (set STREAMRT_SERVER_GPU=1 on a GPU machine)")
    server.free()
    moved = server.log_text().count("moved ComfyUI's copy of BaseModel")
    before = _allocated(server)
    realtime(server, host_route, names[:2])
    added = _allocated(server) - before
    weights = (e2e_tiny_models / "checkpoints" / CKPT).stat().st_size  # fp16, like the stream's weights
    assert server.log_text().count("moved ComfyUI's copy of BaseModel") == moved + 1
    # ComfyUI's UNet staying on the GPU too would add its 27 % of the file on top
    assert added < 1.15 * weights, (added, weights)


def test_load_vae_taesd_gives_the_tiny_autoencoder(server: ComfyServer, names) -> None:
    host = realtime(server, host_route, names[:2], taesd=True)
    np.testing.assert_allclose(host, realtime(server, own_route, names[:2], taesd=True), atol=ATOL, rtol=0)
    assert np.abs(host - realtime(server, own_route, names[:2])).max() > 10 * ATOL  # not the full VAE


def test_model_sampling_discrete_v_prediction_is_honoured(server: ComfyServer, names) -> None:
    host = realtime(server, host_route, names[:1], sampling="v_prediction")
    np.testing.assert_allclose(host, realtime(server, own_route, names[:1], prediction_type="v_prediction"),
                               atol=ATOL, rtol=0)
    assert np.abs(host - realtime(server, own_route, names[:1])).max() > 10 * ATOL  # epsilon differs


def test_a_model_that_is_not_sd1_or_sd2_is_refused_by_name(server: ComfyServer, names) -> None:
    prefix = uid()
    g = Graph(prefix=prefix)
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CKPT)
    # A continuous (EDM) schedule is not one StreamRT can stream.
    edm = g.node("ModelSamplingContinuousEDM", model=ckpt.out(0), sampling="v_prediction", sigma_max=120.0,
                 sigma_min=0.002)
    pipe = g.node("StreamRTPipelineFromModel", id=f"{prefix}pipe", model=edm.out(0), clip=ckpt.out(1),
                  vae=ckpt.out(2), dtype="auto")
    sampled(g, prefix, pipe, g.node("LoadImage", image=names[0]).out(0))
    with pytest.raises(ExecutionFailed) as failed:
        server.run(g, timeout=600)
    assert failed.value.node_id == f"{prefix}pipe"
    assert "continuous schedule" in str(failed.value)
    # the server is fine afterwards
    assert realtime(server, host_route, names[:1]).shape == (1, SIZE, SIZE, 3)


# --------------------------------------------------------------------------------------------------- SDXL (GPU)
#: a full-size SDXL-turbo-architecture checkpoint with random weights: ComfyUI recognises SDXL by its UNet's and
#: text encoders' exact shapes, so a reduced model cannot go through Load Checkpoint; 7 GB, written on a GPU
#: server's machine only
SDXL_CKPT = "streamrt-sdxl-random.safetensors"


@pytest.fixture
def sdxl_checkpoint(server: ComfyServer, e2e_tiny_models: Path) -> str:
    if server.system_stats()["devices"][0]["type"] != "cuda":
        pytest.skip("a full-size SDXL checkpoint runs on a GPU server only (STREAMRT_SERVER_GPU=1 on a GPU machine)")
    path = e2e_tiny_models / "checkpoints" / SDXL_CKPT
    if not path.is_file():
        from types import SimpleNamespace

        from model_files import write_sdxl_checkpoint

        from streamrt.random_models import build_random_components

        parts = build_random_components("sdxl-turbo", seed=5, dtype=torch.float16, device="cuda", taesd=False)
        cpu = {k: (v.to("cpu") if isinstance(v, torch.nn.Module) else v) for k, v in parts.items()}
        write_sdxl_checkpoint(path, SimpleNamespace(**cpu))
        del parts, cpu
        torch.cuda.empty_cache()
    return SDXL_CKPT


def test_sdxl_through_load_checkpoint_gives_the_frames_of_our_loader(server: ComfyServer, names,
                                                                    sdxl_checkpoint: str) -> None:
    """On a GPU server: an SDXL checkpoint through Load Checkpoint -> Stream Pipeline from Model streams the frames
    Load Stream Pipeline gives for the same file; ComfyUI's own CLIPTextEncode (its SDXL text encoders: both
    penultimate layers, CLIP-G's pooled projection) gives the conditioning of our text route."""
    def host(g: Graph, prefix: str):
        ckpt = g.node("CheckpointLoaderSimple", id=f"{prefix}ckpt", ckpt_name=sdxl_checkpoint)
        return g.node("StreamRTPipelineFromModel", id=f"{prefix}pipe", model=ckpt.out(0), clip=ckpt.out(1),
                      vae=ckpt.out(2), dtype="auto")

    def own(g: Graph, prefix: str):
        return g.node("StreamRTLoadPipeline", id=f"{prefix}pipe", model=sdxl_checkpoint, taesd="none (full VAE)",
                      dtype="auto", device="auto", prediction_type="auto")

    host_frames = realtime(server, host, names[:2])
    own_frames = realtime(server, own, names[:2])
    assert "pipeline from the host's model: SDXL" in server.log_text()
    assert host_frames.std() > 0.02, "the frames are flat: nothing was compared"
    np.testing.assert_allclose(host_frames, own_frames, atol=ATOL, rtol=0)
    encoded = realtime(server, host, names[:2], conditioning=True)
    np.testing.assert_allclose(encoded, own_frames, atol=3 * ATOL, rtol=0)
