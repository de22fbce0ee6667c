"""SDXL on the real ComfyUI server (issue #15): Load Stream Pipeline -> Realtime Sampler on an SDXL single-file
checkpoint with ComfyUI's TAESDXL pair, an SDXL LoRA through StreamRT LoRA, a CONDITIONING with its pooled output,
and the TAESD of the other family refused on the loader.

The models are tiny and random (``streamrt.random_models`` presets ``tiny-xl`` and ``tiny``), written as a user has
them (tests/model_files.py ``write_tiny_checkpoint``): an SGM-layout SDXL checkpoint in ``models/checkpoints`` whose
``.streamrt.json`` sidecar names its config folder (the tiny widths are not SDXL's, so the shipped configs do not
fit), ``taesdxl_encoder`` / ``taesdxl_decoder`` in ``models/vae_approx``, the SDXL diffusers folder the checkpoint
was written from in ``models/diffusers``; an SD1 checkpoint and ComfyUI's ``taesd`` pair beside them for the
cross-family refusals. The TAESDs are drawn so that they pass differences on (``responsive_taesd``): with diffusers'
random initialisation different inputs, LoRAs or pooled embeddings change the frames by less than an 8-bit step, and
no test here could tell them apart. They live in a models folder of this module's own, served by a
server of its own (``comfy_server`` is overridden here, ComfyUI's default cache only): the session's shared models
folder keeps its files (other modules write a ``taesd`` pair of other weights there, and the loader's listing cost
grows with the shared folders, tests/test_overhead_e2e.py).

Every frame is checked against the core in this process (``streamrt.load_checkpoint`` on the same files, a
``streamrt.Stream`` fed the same frames), up to 8-bit PNG rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_harness import MODEL_FOLDERS, ComfyServer, ExecutionFailed, Graph
from e2e_helpers import (
    PNG_ATOL,
    SAMPLER_DEFAULTS,
    add_sampler,
    as_tensor,
    core_config,
    frames,
    image_batch,
    own_server,
    save_conditioning,
    uid,
    upload,
)
from model_files import LORA_LAYERS_XL, lora_state_dict, write_tiny_checkpoint
from safetensors.torch import save_file

from streamrt import Stream, load_checkpoint
from streamrt.families import SD1, SDXL
from streamrt.lora import LoraSpec
from streamrt.prompts import TextEmbedding
from streamrt.random_models import write_random_pipeline

pytestmark = pytest.mark.e2e

CKPT_XL = "streamrt-tiny-xl.safetensors"
CKPT_SD1 = "streamrt-tiny-sd1.safetensors"
FOLDER_XL = "streamrt-tiny-xl"  # models/diffusers: the weights the SDXL checkpoint was written from
LORA_XL = "streamrt-tiny-xl-lora.safetensors"
TAESDXL, TAESD = "taesdxl", "taesd"


# =========================================================================== models, server, references
@pytest.fixture(scope="module")
def xl_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's ComfyUI models folder: the SDXL checkpoint and its TAESDXL pair, the SDXL diffusers folder of
    the same weights, an SDXL LoRA, the SD1 checkpoint and its TAESD pair."""
    root = tmp_path_factory.mktemp("sdxl-models")
    for sub in MODEL_FOLDERS.values():
        (root / sub).mkdir(parents=True, exist_ok=True)
    xl = write_tiny_checkpoint(root, CKPT_XL, "tiny-xl", seed=0, taesd=TAESDXL)
    write_random_pipeline(root / "diffusers" / FOLDER_XL, "tiny-xl", seed=0)
    write_tiny_checkpoint(root, CKPT_SD1, "tiny", seed=4, taesd=TAESD)
    # kohya style: lora_te1_ / lora_te2_ text layers, UNet layers in diffusers' names, the added embedding
    shapes = load_checkpoint(xl, dtype="fp32", device="cpu")
    save_file(lora_state_dict(shapes, seed=5, layers=LORA_LAYERS_XL), str(root / "loras" / LORA_XL))
    return root


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory: pytest.TempPathFactory, xl_models_root: Path):
    """This module's server (named like the session's, so a failing test gets its log in the report)."""
    with own_server(tmp_path_factory.mktemp("comfy-sdxl"), xl_models_root) as server:
        yield server


@pytest.fixture
def server(comfy_server: ComfyServer) -> ComfyServer:
    return comfy_server


def taesd_pair(root: Path, name: str) -> tuple[Path, Path]:
    return root / "vae_approx" / f"{name}_encoder.safetensors", root / "vae_approx" / f"{name}_decoder.safetensors"


def core_load(root: Path, ckpt: str = CKPT_XL, taesd: str | None = TAESDXL, loras=()):
    """The core's own loader on the server's files (the sidecar's config folder, ComfyUI's TAESD pair)."""
    return load_checkpoint(root / "checkpoints" / ckpt, dtype="fp32", device="cpu",
                           taesd=None if taesd is None else taesd_pair(root, taesd), loras=loras)


@pytest.fixture(scope="module")
def xl_core(xl_models_root: Path):
    models = core_load(xl_models_root)
    assert models.family is SDXL and models.is_tiny_vae
    return models


def core_stream(models, **options) -> Stream:
    opts = {**SAMPLER_DEFAULTS, **options}
    return Stream(models, core_config(**options), prompt=opts["prompt"], negative_prompt=opts["negative_prompt"])


def graph(prefix: str, images: list[str], *, model: str = CKPT_XL, taesd: str = TAESDXL,
          lora: tuple[float, float] | None = None, **options) -> Graph:
    """LoadImage(s) [-> ImageBatch] -> Load Stream Pipeline [<- StreamRT LoRA] -> sampler -> SaveImage
    ``<prefix>save``; the loader is ``<prefix>load``, the sampler ``<prefix>sampler``."""
    g = Graph(prefix=prefix)
    inputs = dict(model=model, taesd=taesd, dtype="auto", device="auto", prediction_type="auto")
    if lora is not None:
        inputs["loras"] = g.node("StreamRTLora", id=f"{prefix}lora", lora_name=LORA_XL, strength_model=lora[0],
                                 strength_clip=lora[1]).out(0)
    load = g.node("StreamRTLoadPipeline", id=f"{prefix}load", **inputs)
    sampler = add_sampler(g, load.out(0), id=f"{prefix}sampler", image=image_batch(g, images), **options)
    g.node("SaveImage", id=f"{prefix}save", images=sampler.out(0), filename_prefix=f"{prefix}/f")
    return g


def run_images(server: ComfyServer, g: Graph, prefix: str) -> np.ndarray:
    """The sampler's frames as SaveImage wrote them: ``[N, H, W, 3]`` floats from the 8-bit PNGs."""
    return np.stack(server.output_images(server.run(g, timeout=300), f"{prefix}save"))[..., :3]


def assert_close(actual: np.ndarray, expected: torch.Tensor) -> None:
    np.testing.assert_allclose(actual, expected.numpy(), atol=PNG_ATOL, rtol=0)


def differs(a: np.ndarray, b, by: float = 10 * PNG_ATOL) -> bool:
    b = b.numpy() if isinstance(b, torch.Tensor) else b
    return float(np.abs(a - b).max()) > by


def with_conditioning(g: Graph, prefix: str, positive: str, negative: str | None = None) -> Graph:
    """Connect LoadTrainingDataset's CONDITIONING (saved by ``save_conditioning``) to the sampler."""
    inputs = g.nodes[f"{prefix}sampler"]["inputs"]
    inputs["positive"] = g.node("LoadTrainingDataset", folder_name=positive).out(1)
    if negative is not None:
        inputs["negative"] = g.node("LoadTrainingDataset", folder_name=negative).out(1)
    return g


# =========================================================================== the loader's lists
def test_the_loader_lists_the_sdxl_checkpoint_folder_and_lora(server: ComfyServer) -> None:
    info = server.object_info()
    models = info["StreamRTLoadPipeline"]["input"]["required"]["model"][1]["options"]
    assert {CKPT_XL, FOLDER_XL, CKPT_SD1} <= set(models), models
    assert LORA_XL in info["StreamRTLora"]["input"]["required"]["lora_name"][1]["options"]


def test_the_loader_offers_taesdxl(server: ComfyServer) -> None:
    """ComfyUI's taesdxl_encoder / taesdxl_decoder in models/vae_approx are offered as ``taesdxl``, beside ``taesd``
    (the frontend offers only the listed values; newer ComfyUI refuses others before running)."""
    taesds = server.object_info("StreamRTLoadPipeline")["input"]["required"]["taesd"][1]["options"]
    assert TAESD in taesds
    assert TAESDXL in taesds, f"models/vae_approx holds taesdxl_encoder/decoder, the loader offers {taesds}"


def test_the_loader_does_not_say_sdxl_is_unsupported(server: ComfyServer) -> None:
    """What the node tells a user (its description and tooltips, shown in the frontend) names SDXL among what it
    loads and nowhere says SDXL is not supported."""
    spec = server.object_info("StreamRTLoadPipeline")
    texts = [spec.get("description", "")] + [value[1].get("tooltip", "") for section in ("required", "optional")
                                            for value in spec["input"].get(section, {}).values()]
    stale = [t for t in texts if "SDXL is not supported" in t]
    assert not stale, f"Load Stream Pipeline still says SDXL does not load: {stale}"
    assert "SDXL" in spec["description"], spec["description"]


# =========================================================================== streaming
def test_realtime_one_frame_per_execution_equals_the_core(server: ComfyServer, xl_core) -> None:
    """Three executions of one frame each advance one SDXL stream: the core's frames, step by step."""
    prefix, clip = uid(), frames(3, seed=71)
    names = upload(server, clip, prefix)
    got = [run_images(server, graph(prefix, [name]), prefix)[0] for name in names]
    stream = core_stream(xl_core)
    expected = [stream.step(as_tensor(clip[k:k + 1]))[0] for k in range(len(clip))]
    for k in range(len(clip)):
        assert got[k].shape == (64, 64, 3)
        assert_close(got[k], expected[k])
    assert differs(got[2], got[1])  # the frames follow the input: not one picture repeated


def test_a_video_batch_in_one_execution_is_aligned_and_equals_process_video(server: ComfyServer, xl_core) -> None:
    """Four frames in one execution, two per UNet call (Stream Settings frames_per_step 2): aligned with the input,
    the core's ``process_video``; not the one-frame-per-step stream's frames."""
    prefix, clip = uid(), frames(4, seed=72)
    got = run_images(server, graph(prefix, upload(server, clip, prefix), frames_per_step=2), prefix)
    assert got.shape == (4, 64, 64, 3)
    assert_close(got, core_stream(xl_core, frames_per_step=2).process_video(as_tensor(clip)))
    assert differs(got, core_stream(xl_core).process_video(as_tensor(clip)))


def test_the_sdxl_diffusers_folder_streams_the_checkpoints_frames(server: ComfyServer, xl_core) -> None:
    """models/diffusers/<SDXL folder> (text_encoder_2, tokenizer_2) with the same weights as the checkpoint: the
    same frames."""
    clip = frames(2, seed=77)
    names = upload(server, clip, uid())
    got = {}
    for model in (FOLDER_XL, CKPT_XL):
        prefix = uid()
        got[model] = run_images(server, graph(prefix, names, model=model), prefix)
    assert_close(got[FOLDER_XL], torch.from_numpy(got[CKPT_XL]))  # equal weights; 8-bit rounding may differ by 1
    assert_close(got[FOLDER_XL], core_stream(xl_core).process_video(as_tensor(clip)))


# =========================================================================== LoRA
def test_an_sdxl_lora_changes_the_frames_and_strength_0_is_no_lora(server: ComfyServer, xl_models_root: Path,
                                                                   xl_core) -> None:
    """StreamRT LoRA -> Load Stream Pipeline fuses the kohya SDXL LoRA (both text encoders, the UNet, its added
    embedding): the core's frames with that LoRA, far from the frames without it; at strengths 0 the frames without
    it."""
    clip = frames(2, seed=73)
    names = upload(server, clip, uid())
    runs = {}
    for key, lora in (("none", None), ("lora", (0.8, 1.0)), ("zero", (0.0, 0.0))):
        prefix = uid()
        runs[key] = run_images(server, graph(prefix, names, lora=lora), prefix)
    with_lora = core_load(xl_models_root, loras=[LoraSpec(str(xl_models_root / "loras" / LORA_XL), 0.8, 1.0)])
    assert_close(runs["lora"], core_stream(with_lora).process_video(as_tensor(clip)))
    assert_close(runs["none"], core_stream(xl_core).process_video(as_tensor(clip)))
    assert differs(runs["lora"], runs["none"])
    np.testing.assert_array_equal(runs["zero"], runs["none"])


# =========================================================================== CONDITIONING with its pooled output
@pytest.fixture
def conditioning_node(server: ComfyServer):
    if "LoadTrainingDataset" not in server.object_info():
        pytest.skip("this ComfyUI has no LoadTrainingDataset node (a CONDITIONING without a CLIP)")


def test_a_conditioning_with_its_pooled_output_gives_the_text_routes_frames(server: ComfyServer, xl_core,
                                                                            conditioning_node) -> None:
    """The pipeline's own embeddings and pooled embeddings as positive and negative CONDITIONING (cfg full, so
    both count) give the frames of the same texts, on the server and in the core. The pooled output is read: the
    same tokens with another prompt's pooled embedding give other frames (the core's for that pair)."""
    encode = xl_core.prompt_encoder.encode
    prompt, negative, other = "a watercolor lighthouse", "dark, blurry", "a neon city at night"
    pos, neg, oth = encode(prompt), encode(negative), encode(other)
    assert pos.pooled is not None and tuple(pos.pooled.shape) == (1, xl_core.pooled_dim)
    pos_name = save_conditioning(server, pos.tokens.cpu(), pos.pooled.cpu())
    neg_name = save_conditioning(server, neg.tokens.cpu(), neg.pooled.cpu())
    mixed_name = save_conditioning(server, pos.tokens.cpu(), oth.pooled.cpu())
    clip = frames(3, seed=74)
    names = upload(server, clip, uid())
    options = dict(cfg_type="full", prompt=prompt, negative_prompt=negative)

    def run(positive: str | None, negative_name: str | None = None) -> np.ndarray:
        prefix = uid()
        g = graph(prefix, names, **options)
        if positive is not None:  # the texts on the node are not the conditionings': they must not be used
            g.nodes[f"{prefix}sampler"]["inputs"].update(prompt="a cat", negative_prompt="a dog")
            with_conditioning(g, prefix, positive, negative_name)
        return run_images(server, g, prefix)

    texts, conditioned, mixed = run(None), run(pos_name, neg_name), run(mixed_name, neg_name)
    expected = core_stream(xl_core, **options).process_video(as_tensor(clip))
    assert_close(texts, expected)
    assert_close(conditioned, expected)
    np.testing.assert_allclose(conditioned, texts, atol=PNG_ATOL, rtol=0)
    swapped = Stream(xl_core, core_config(cfg_type="full"), prompt=TextEmbedding(pos.tokens, oth.pooled),
                     negative_prompt=TextEmbedding(neg.tokens, neg.pooled))
    assert_close(mixed, swapped.process_video(as_tensor(clip)))
    assert differs(mixed, conditioned)


def test_a_conditioning_without_pooled_output_is_refused_and_the_server_goes_on(server: ComfyServer, xl_core,
                                                                                 conditioning_node) -> None:
    """SDXL's UNet needs the pooled embedding: a CONDITIONING without ``pooled_output`` is refused on the sampler
    by name; the server stays up and the next prompt streams."""
    tokens = xl_core.prompt_encoder.encode("a watercolor lighthouse").tokens.cpu()
    name = save_conditioning(server, tokens)
    prefix = uid()
    (image,) = upload(server, frames(1, seed=75), prefix)
    with pytest.raises(ExecutionFailed) as failed:
        server.run(with_conditioning(graph(prefix, [image]), prefix, name), timeout=300)
    assert failed.value.node_id == f"{prefix}sampler"
    message = str(failed.value)
    assert "pooled embedding" in message and "SDXL" in message, message
    assert server.is_running()
    assert run_images(server, graph(prefix, [image]), prefix).shape == (1, 64, 64, 3)


# =========================================================================== the other family's TAESD
@pytest.mark.parametrize(("ckpt", "taesd", "family", "wanted"), [
    (CKPT_XL, TAESD, SDXL, TAESDXL),
    (CKPT_SD1, TAESDXL, SD1, TAESD),
])
def test_the_other_familys_taesd_is_refused_on_the_loader(server: ComfyServer, ckpt: str, taesd: str, family,
                                                          wanted: str) -> None:
    """``taesd`` with the SDXL checkpoint, ``taesdxl`` with the SD1 one: refused on Load Stream Pipeline naming the
    checkpoint, the TAESD files and the pair the pipeline needs; the server stays up and the same checkpoint with its
    own TAESD streams next."""
    prefix = uid()
    (image,) = upload(server, frames(1, seed=76), prefix)
    with pytest.raises(ExecutionFailed) as failed:
        server.run(graph(prefix, [image], model=ckpt, taesd=taesd), timeout=300)
    assert failed.value.node_id == f"{prefix}load"
    message = failed.value.message
    for word in (ckpt, f"{taesd}_encoder.safetensors", f"this {family.label} pipeline needs {wanted}"):
        assert word in message, f"{word!r} not in {message!r}"
    assert server.is_running()
    assert run_images(server, graph(prefix, [image], model=ckpt, taesd=wanted), prefix).shape == (1, 64, 64, 3)
