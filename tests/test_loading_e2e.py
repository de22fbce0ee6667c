"""Loading from a ComfyUI user's model folders on the real server: a single-file checkpoint, ComfyUI's
TAESD pair and a LoRA, checked against the same weights loaded from a diffusers folder in this process.

The tiny checkpoint cannot use the shipped SD1 configs (its widths are tiny), so it carries a sidecar
``streamrt-tiny.safetensors.streamrt.json`` naming its config folder: the documented way to give a
checkpoint of an unusual shape its own configs (see streamrt/checkpoints.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_harness import ComfyServer, ExecutionFailed, Graph, PromptRejected
from e2e_helpers import PNG_ATOL, SAMPLER_DEFAULTS, add_sampler, as_tensor, core_config, frames, uid
from model_files import lora_state_dict, write_comfy_taesd, write_config_dir, write_ldm_checkpoint
from safetensors.torch import save_file

from streamrt import Stream
from streamrt.loading import load_diffusers_folder, load_taesd
from streamrt.lora import LoraSpec
from streamrt.random_models import write_random_pipeline

pytestmark = pytest.mark.e2e

CKPT = "streamrt-tiny.safetensors"
BROKEN = "streamrt-broken.safetensors"
LORA = "streamrt-tiny-lora.safetensors"
LORA_STRENGTHS = (0.8, 1.0)


@pytest.fixture(scope="session")
def e2e_tiny_models(streamrt_models_root: Path) -> Path:
    root = streamrt_models_root
    src = root / "streamrt-loading-src"  # not a ComfyUI model folder: the in-process reference only
    if not (root / "checkpoints" / CKPT).is_file():
        write_random_pipeline(src / "tiny", "tiny", seed=4, taesd_folder=src / "taesd")
        models = load_diffusers_folder(src / "tiny", dtype="fp32", device="cpu")
        write_config_dir(root / "checkpoints" / "streamrt-tiny-configs", src / "tiny", tokenizer=True)
        sidecar = root / "checkpoints" / (CKPT + ".streamrt.json")
        sidecar.write_text(json.dumps({"config_dir": "streamrt-tiny-configs"}))
        data = write_ldm_checkpoint(root / "checkpoints" / CKPT, models, "sd1").read_bytes()
        (root / "checkpoints" / BROKEN).write_bytes(data[: len(data) // 3])
        save_file(lora_state_dict(models, seed=1), str(root / "loras" / LORA))
        taesd = load_taesd(src / "taesd", dtype=torch.float32, device=torch.device("cpu"))
        write_comfy_taesd(root / "vae_approx", taesd)
    return root


@pytest.fixture(scope="session")
def references(e2e_tiny_models: Path) -> dict:
    """The same weights from the diffusers folder (+ the TAESD pair, + the LoRA), loaded by the core here."""
    src, root = e2e_tiny_models / "streamrt-loading-src", e2e_tiny_models
    taesd = (root / "vae_approx" / "taesd_encoder.safetensors", root / "vae_approx" / "taesd_decoder.safetensors")
    lora = LoraSpec(str(root / "loras" / LORA), *LORA_STRENGTHS)
    return {"taesd": load_diffusers_folder(src / "tiny", dtype="fp32", device="cpu", taesd=taesd),
            "vae": load_diffusers_folder(src / "tiny", dtype="fp32", device="cpu"),
            "vae+lora": load_diffusers_folder(src / "tiny", dtype="fp32", device="cpu", loras=[lora])}


@pytest.fixture
def server(comfy_server: ComfyServer, e2e_tiny_models: Path) -> ComfyServer:
    return comfy_server


def graph(prefix: str, image: str, *, model: str = CKPT, lora: str | None = None, taesd: str = "taesd") -> Graph:
    g = Graph(prefix=prefix)
    inputs = dict(model=model, taesd=taesd, dtype="auto", device="auto", prediction_type="auto")
    if lora is not None:
        inputs["loras"] = g.node("StreamRTLora", id=f"{prefix}lora", lora_name=lora,
                                 strength_model=LORA_STRENGTHS[0], strength_clip=LORA_STRENGTHS[1])
    load = g.node("StreamRTLoadPipeline", id=f"{prefix}load", **inputs)
    sampler = add_sampler(g, load.out(0), id=f"{prefix}sampler", image=g.node("LoadImage", image=image).out(0))
    g.node("SaveImage", id=f"{prefix}save", images=sampler.out(0), filename_prefix=f"{prefix}/f")
    return g


def run_frame(server: ComfyServer, g: Graph, prefix: str) -> np.ndarray:
    return np.stack(server.output_images(server.run(g, timeout=300), f"{prefix}save"))[0]


def core_frame(models, image: np.ndarray):
    stream = Stream(models, core_config(), prompt=SAMPLER_DEFAULTS["prompt"],
                    negative_prompt=SAMPLER_DEFAULTS["negative_prompt"])
    return stream.step(as_tensor(image[None]))[0].numpy()


def loads_of(server: ComfyServer, name: str) -> int:
    return len(re.findall(rf"loaded checkpoint \S*{re.escape(name)} \(", server.log_text()))


# ---------------------------------------------------------------------------------------------------
def test_loader_nodes_list_the_user_files_with_tooltips(server: ComfyServer) -> None:
    info = server.object_info()
    assert "StreamRTLora" in info, "StreamRTLora is not registered (add it to NODES in nodes/__init__.py)"
    load = info["StreamRTLoadPipeline"]["input"]
    assert CKPT in load["required"]["model"][1]["options"]
    assert "taesd" in load["required"]["taesd"][1]["options"]
    assert load["optional"]["prediction_type"][1]["options"] == ["auto", "epsilon", "v_prediction"]
    assert LORA in info["StreamRTLora"]["input"]["required"]["lora_name"][1]["options"]
    for node in ("StreamRTLoadPipeline", "StreamRTLora"):
        spec = info[node]["input"]
        for name, value in {**spec["required"], **spec.get("optional", {})}.items():
            assert value[1].get("tooltip"), f"{node}.{name} has no tooltip"


def test_checkpoint_taesd_pair_and_lora_match_the_core(server: ComfyServer, references) -> None:
    image = frames(1, seed=21)[0]
    name = server.write_input_image(image, name=f"{uid()}.png")
    taesd_prefix, lora_prefix = uid(), uid()
    with_taesd = run_frame(server, graph(taesd_prefix, name), taesd_prefix)
    with_lora = run_frame(server, graph(lora_prefix, name, lora=LORA, taesd="none (full VAE)"), lora_prefix)
    np.testing.assert_allclose(with_taesd[..., :3], core_frame(references["taesd"], image), atol=PNG_ATOL, rtol=0)
    np.testing.assert_allclose(with_lora[..., :3], core_frame(references["vae+lora"], image), atol=PNG_ATOL, rtol=0)
    # the LoRA really was fused: far from the same checkpoint without it
    assert np.abs(with_lora[..., :3] - core_frame(references["vae"], image)).max() > 10 * PNG_ATOL


def test_requeue_does_not_reload(server: ComfyServer) -> None:
    prefix = uid()
    name = server.write_input_image(frames(1, seed=22)[0], name=f"{prefix}.png")
    run_frame(server, graph(prefix, name), prefix)
    loaded = loads_of(server, CKPT)
    assert loaded >= 1
    for _ in range(2):
        run_frame(server, graph(prefix, name), prefix)
    assert loads_of(server, CKPT) == loaded


def test_broken_files_and_unknown_names_give_node_errors(server: ComfyServer) -> None:
    prefix = uid()
    name = server.write_input_image(frames(1, seed=23)[0], name=f"{prefix}.png")
    with pytest.raises(ExecutionFailed) as failed:
        server.run(graph(prefix, name, model=BROKEN))
    assert failed.value.node_id == f"{prefix}load"
    assert BROKEN in failed.value.message and "truncated or corrupt" in failed.value.message
    # 0.3.75 does not validate V3 combo values; newer ComfyUI rejects them before running.
    with pytest.raises((PromptRejected, ExecutionFailed)) as failed:
        server.run(graph(prefix, name, lora="no-such-lora.safetensors"))
    assert "no-such-lora.safetensors" in str(failed.value)
    assert run_frame(server, graph(prefix, name), prefix).shape[:2] == (64, 64)
