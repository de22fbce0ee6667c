"""GPU checks of the torch backends on the tiny random models; skipped where torch sees no CUDA GPU.

- the ``cuda_graph`` backend gives the eager outputs (every cfg mode, one and two steps, F > 1, txt2img,
  TAESD and the full VAE, and across prompt / seed / guidance changes and resets);
- ``compile`` gives the eager outputs within a compiled-fp16 tolerance, and an eager stream on the same
  pipeline still runs the pipeline's own modules;
- a stream that reads its prompt's cross-attention keys and values (the default) gives the frames of one that
  projects the prompt in every call, captured and compiled;
- ``auto`` resolves to ``cuda_graph`` on a GPU without engines;
- zero CUDA allocations per frame in steady state (``allocation.all.allocated`` over 200 frames with
  a cached prompt change, an identical prompt and seed changes inside the window);
- ``reset()`` after the capture replays the first outputs;
- ``process_video`` on CUDA equals feeding the frames one call at a time;
- overlapped calls (``step(overlap=True)``) hand over the plain outputs one call later, allocate nothing and do
  not wait for the call's GPU work;
- Stream Frame Input's frames are decoded into pinned memory in a CUDA process and stream as ordinary ones.

Run on the GPU machine: ``python -m pytest tests/test_gpu.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from streamrt import Acceleration, Stream, StreamConfig, StreamModels
from streamrt.random_models import random_stream_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")

SIZE = 64
PROMPT = "a cat"
PROMPT_2 = "a red dog"          # encoded once before every allocation window: a cache hit inside it
NEGATIVE = "blurry photo"
CFG_TYPES = ["none", "self", "full", "initialize"]

#: |cuda_graph - eager| on IMAGE values in [0, 1]. A replay runs the captured kernels, so the outputs
#: should agree to the last bit; the bounds only leave room for a different kernel choice.
GRAPH_TOL = {torch.float16: 1e-2, torch.float32: 1e-4}
#: outputs of two runs of the same backend on the same inputs (alignment errors show up as ~0.1)
SAME_TOL = {torch.float16: 2e-3, torch.float32: 1e-4}
#: compiled (inductor fuses, reorders and upcasts) vs eager, fp16. Eager fp16 vs fp32 differs by
#: about 3e-3 at most on these models.
COMPILE_MAX_TOL, COMPILE_MEAN_TOL = 2.5e-2, 2e-3


# ---------------------------------------------------------------------------------------------- helpers
def build_models(dtype: torch.dtype, *, taesd: bool = True, seed: int = 0, preset: str = "tiny") -> StreamModels:
    return random_stream_models(preset, seed=seed, dtype=dtype, device="cuda", vae="taesd" if taesd else "kl")


def make_config(cfg_type: str, n: int, frames_per_step: int = 1, **changes) -> StreamConfig:
    t_index_list = {1: (20,), 2: (20, 35), 3: (10, 25, 40)}[n]
    base = dict(width=SIZE, height=SIZE, t_index_list=t_index_list, num_inference_steps=50,
                frames_per_step=frames_per_step, cfg_type=cfg_type, guidance_scale=1.5, delta=1.0, seed=2)
    base.update(changes)
    return StreamConfig(**base)


def make_frames(count: int, seed: int = 0) -> torch.Tensor:
    """``count`` random CPU frames ``[count, SIZE, SIZE, 3]`` in [0, 1] (ComfyUI IMAGE layout)."""
    gen = torch.Generator("cpu").manual_seed(20_000 + seed)
    return torch.rand(count, SIZE, SIZE, 3, generator=gen)


def frame_groups(calls: int, frames_per_step: int = 1, seed: int = 0) -> list[torch.Tensor]:
    video = make_frames(calls * frames_per_step, seed)
    return [video[k * frames_per_step:(k + 1) * frames_per_step] for k in range(calls)]


def run(stream: Stream, groups) -> list[torch.Tensor]:
    """Feed each group (``None``: txt2img) to ``stream.step``; the outputs, cloned off the pinned buffer."""
    return [stream.step(g).clone() for g in groups]


def new_stream(models: StreamModels, cfg: StreamConfig, acceleration: str) -> Stream:
    return Stream(models, cfg.with_(acceleration=acceleration), prompt=PROMPT, negative_prompt=NEGATIVE)


def assert_outputs_close(got: list[torch.Tensor], expected: list[torch.Tensor], atol: float, what: str) -> None:
    assert len(got) == len(expected)
    for k, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape, f"{what}: output {k} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"{what}: output {k} is not finite"
        diff = (a - b).abs().max().item()
        assert diff <= atol, f"{what}: output {k} differs by {diff:.3g} (tolerance {atol:g})"


def allocations() -> int:
    """CUDA caching-allocator allocations so far (every malloc served, cached or not)."""
    return int(torch.cuda.memory_stats()["allocation.all.allocated"])


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fp16_models() -> StreamModels:
    return build_models(torch.float16)


@pytest.fixture(scope="module")
def fp32_models() -> StreamModels:
    return build_models(torch.float32)


@pytest.fixture(scope="module")
def xl_fp16_models() -> StreamModels:
    """SDXL-shaped (two text encoders, pooled and time_ids added conditions) with TAESD."""
    return build_models(torch.float16, preset="tiny-xl")


@pytest.fixture(scope="module")
def fp32_kl_models() -> StreamModels:
    """fp32 with the full AutoencoderKL instead of the TAESD."""
    return build_models(torch.float32, taesd=False)


# ---------------------------------------------------------------------------------------------- (1) graph == eager
@pytest.mark.parametrize("dtype_name", ["fp16", "fp32"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("cfg_type", CFG_TYPES)
def test_cuda_graph_matches_eager(request, dtype_name, cfg_type, n):
    models = request.getfixturevalue(f"{dtype_name}_models")
    cfg = make_config(cfg_type, n)
    groups = frame_groups(8)
    expected = run(new_stream(models, cfg, "eager"), groups)
    got = run(new_stream(models, cfg, "cuda_graph"), groups)
    assert_outputs_close(got, expected, GRAPH_TOL[models.dtype], f"cuda_graph vs eager ({cfg_type}, n={n})")
    assert max(float(o.std()) for o in expected) > 0, "the outputs are constant: the comparison proves nothing"


@pytest.mark.parametrize("cfg_type,n,f", [("none", 1, 4), ("self", 2, 2), ("full", 2, 2), ("initialize", 3, 2)])
def test_cuda_graph_matches_eager_several_frames_per_step(fp16_models, cfg_type, n, f):
    cfg = make_config(cfg_type, n, frames_per_step=f)
    groups = frame_groups(6, f, seed=1)
    expected = run(new_stream(fp16_models, cfg, "eager"), groups)
    got = run(new_stream(fp16_models, cfg, "cuda_graph"), groups)
    assert_outputs_close(got, expected, GRAPH_TOL[torch.float16], f"cuda_graph vs eager ({cfg_type}, n={n}, F={f})")


@pytest.mark.parametrize("dtype_name", ["fp16", "fp32"])
def test_cuda_graph_txt2img_and_img2img_interleaved_match_eager(request, dtype_name):
    """txt2img and img2img are two graphs of one stream; both replay the eager results."""
    models = request.getfixturevalue(f"{dtype_name}_models")
    cfg = make_config("self", 2)
    frames = frame_groups(4, seed=2)
    calls = [None, frames[0], None, frames[1], frames[2], None, None, frames[3]]
    expected = run(new_stream(models, cfg, "eager"), calls)
    got = run(new_stream(models, cfg, "cuda_graph"), calls)
    assert_outputs_close(got, expected, GRAPH_TOL[models.dtype], "txt2img/img2img cuda_graph vs eager")


@pytest.mark.parametrize("cfg_type", ["self", "full"])
def test_cuda_graph_matches_eager_with_full_vae(fp32_kl_models, cfg_type):
    cfg = make_config(cfg_type, 2)
    groups = frame_groups(6, seed=3)
    expected = run(new_stream(fp32_kl_models, cfg, "eager"), groups)
    got = run(new_stream(fp32_kl_models, cfg, "cuda_graph"), groups)
    assert_outputs_close(got, expected, GRAPH_TOL[torch.float32], f"AutoencoderKL cuda_graph vs eager ({cfg_type})")


@pytest.mark.parametrize("cfg_type", ["self", "full", "initialize"])
def test_cuda_graph_follows_prompt_seed_guidance_changes_and_reset(fp32_models, cfg_type):
    """State changes are copies into the buffers the graph reads: the replay must see every one."""
    cfg = make_config(cfg_type, 2)
    groups = frame_groups(12, seed=4)

    def script(stream: Stream) -> list[torch.Tensor]:
        outs = []
        for k, g in enumerate(groups):
            if k == 2:
                stream.set_prompt(PROMPT_2)
            elif k == 4:
                stream.set_seed(7)
            elif k == 6:
                stream.set_guidance(2.0, delta=0.7)
            elif k == 7:
                stream.set_prompt(PROMPT, negative_prompt="ugly")
            elif k == 8:
                stream.reset()
            elif k == 10:
                stream.set_seed([(3, 0.5), (4, 0.5)], method="slerp")
            outs.append(stream.step(g).clone())
        return outs

    expected = script(new_stream(fp32_models, cfg, "eager"))
    got = script(new_stream(fp32_models, cfg, "cuda_graph"))
    assert_outputs_close(got, expected, GRAPH_TOL[torch.float32], f"changes under cuda_graph vs eager ({cfg_type})")


# ---------------------------------------------------------------------------------------------- (2) compiled
def test_compiled_cuda_graph_matches_eager():
    """``compile`` (compiled copies + CUDA graph) against eager on the same pipeline (one config: compiling is
    slow); an eager stream of that pipeline made afterwards still runs the pipeline's own modules."""
    models = build_models(torch.float16)
    unet = models.unet
    cfg = make_config("self", 2)
    groups = frame_groups(6, seed=5)
    # the reference projects the prompt in every UNet call; the compiled stream reads its prompt's keys and values
    expected = run(new_stream(models, cfg.with_(prompt_kv=False), "eager"), groups)
    stream = new_stream(models, cfg, "compile")
    assert stream.acceleration is Acceleration.COMPILE and stream.runtime.captures and stream.prompt_kv is not None
    got = run(stream, groups)  # the first call compiles and captures
    # The first latency (n - 1) outputs come from the never-filled (all-zero) latent buffer. There, compiled
    # and eager differed by ~1.5e-2 even in fp32 (inductor on a CPU; the later outputs by ~1e-7), most
    # likely normalisation statistics of near-constant activations. Those outputs carry no image:
    # compare from the first real output on.
    lag = cfg.num_steps - 1
    for k, (a, b) in enumerate(zip(got[lag:], expected[lag:]), start=lag):
        assert torch.isfinite(a).all(), f"compiled output {k} is not finite"
        diff = (a - b).abs()
        assert diff.max().item() <= COMPILE_MAX_TOL and diff.mean().item() <= COMPILE_MEAN_TOL, (
            f"compiled output {k} differs from eager: max {diff.max().item():.3g}, mean {diff.mean().item():.3g}")

    # the compiled graph allocates nothing per frame either
    torch.cuda.synchronize()
    before = allocations()
    for g in groups * 5:
        stream.step(g)
    torch.cuda.synchronize()
    assert allocations() - before == 0

    # the layout lever (docs/DESIGN.md section 6): the shared UNet's and VAE's convolution weights became
    # channels-last when the compiled copies were made (values unchanged: the eager check below)
    for name, module in (("unet", models.unet), ("vae", models.vae)):
        convs = [p for p in module.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs), name

    # the pipeline was not replaced by its compiled copy: an eager stream runs the plain module, as before
    assert models.unet is unet and not isinstance(models.unet, torch._dynamo.eval_frame.OptimizedModule)
    eager = new_stream(models, cfg, "eager")
    assert eager.runtime.unet.module is unet and eager.runtime.parts["unet"] == "torch"
    assert_outputs_close(run(eager, groups), expected, GRAPH_TOL[torch.float16], "eager after a compiled stream")


def test_auto_is_cuda_graph_on_a_gpu_without_engines(fp16_models):
    stream = Stream(fp16_models, make_config("self", 2), prompt=PROMPT)
    assert stream.runtime.requested is Acceleration.AUTO and stream.acceleration is Acceleration.CUDA_GRAPH
    assert stream.runtime.captures
    expected = run(new_stream(fp16_models, make_config("self", 2), "cuda_graph"), frame_groups(4, seed=13))
    assert_outputs_close(run(stream, frame_groups(4, seed=13)), expected, SAME_TOL[torch.float16], "auto vs cuda_graph")


@pytest.mark.parametrize("acceleration", ["cuda_graph", "compile"])
def test_overlapped_calls_are_the_plain_outputs_one_call_later_without_a_stream_sync(fp16_models, acceleration):
    """``step(overlap=True)`` (Stream Settings' overlap_executions) on CUDA: the plain stream's outputs one call
    later (the first twice), zero CUDA allocations per call, and the host back from a call while its GPU work still
    runs (a plain call returns when its frames are on the host)."""
    cfg = make_config("self", 2)
    groups = frame_groups(8, seed=21)
    expected = run(new_stream(fp16_models, cfg, acceleration), groups)
    stream = new_stream(fp16_models, cfg, acceleration)
    got = [stream.step(g, overlap=True).clone() for g in groups]
    assert_outputs_close(got, [expected[0]] + expected[:-1], SAME_TOL[torch.float16], "overlapped vs plain")

    torch.cuda.synchronize()
    before = allocations()
    for g in groups * 20:
        stream.step(g, overlap=True)
    torch.cuda.synchronize()
    assert allocations() - before == 0

    # a slow kernel queued before a call keeps the CUDA stream busy: an overlapped call returns before it is done,
    # a plain call only after it (its frames must be on the host)
    for overlap in (True, False):
        stream.step(groups[1], overlap=overlap)
        torch.cuda._sleep(100_000_000)  # about 50 ms of GPU time
        stream.step(groups[2], overlap=overlap)
        assert torch.cuda.current_stream().query() is not overlap, f"overlap={overlap}"
        torch.cuda.synchronize()


def test_a_posted_frame_is_decoded_into_pinned_memory_and_streams_as_a_pageable_copy(fp16_models):
    """Stream Frame Input's frames (streamrt.frame_inbox) in a process that uses CUDA are decoded into page-locked
    memory, which a stream uploads without its own staging copy; the values are Load Image's and the stream's
    outputs those of the same frame in ordinary memory."""
    import io

    import numpy as np
    from PIL import Image

    from streamrt.frame_inbox import FrameInbox

    pixels = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    inbox = FrameInbox()  # pins by default once CUDA is initialised, as it is here
    inbox.post("cam", png.getvalue(), "image/png")
    _, frame = inbox.take("cam")
    assert frame.is_pinned()
    assert torch.equal(frame, torch.from_numpy(pixels.astype(np.float32) / 255.0)[None])
    cfg = make_config("self", 2)
    posted, pageable = new_stream(fp16_models, cfg, "cuda_graph"), new_stream(fp16_models, cfg, "cuda_graph")
    for _ in range(3):
        assert torch.equal(posted.step(frame), pageable.step(frame.clone()))


# ---------------------------------------------------------------------------------------------- (3) zero allocations
@pytest.mark.parametrize("cfg_type", CFG_TYPES)
def test_zero_allocations_per_frame_with_prompt_and_seed_changes(fp16_models, cfg_type):
    models = fp16_models
    stream = new_stream(models, make_config(cfg_type, 2), "cuda_graph")
    assert stream.prompt_kv is not None  # a prompt change also rewrites the prompt's keys and values, in place
    groups = frame_groups(8, seed=6)
    for g in groups:                      # the first call captures; then steady state
        stream.step(g)
    stream.set_prompt(PROMPT_2)           # encode PROMPT_2 once, before the window
    stream.step(groups[0])
    stream.set_prompt(PROMPT)
    stream.step(groups[1])
    out = torch.empty((1, SIZE, SIZE, 3), pin_memory=True)
    torch.cuda.synchronize()
    calls0, allocs0 = models.prompt_encoder.encoder_calls, allocations()
    for k in range(200):
        if k == 50:
            stream.set_prompt(PROMPT_2)   # cached: copy_ into the embedding buffer
        elif k == 51:
            stream.set_prompt(PROMPT_2)   # identical: nothing at all
        elif k == 100:
            stream.set_seed(7)            # noise drawn on the CPU, copy_ into the noise buffers
        elif k == 150:
            stream.set_seed([(8, 0.5), (9, 0.5)])
        elif k == 175:
            stream.set_guidance(1.8, delta=0.9)
        if k % 2:
            stream.step(groups[k % 8])                                   # realtime: host round trip
        else:
            stream.step(groups[k % 8], out=out, synchronize=False)       # batch: into a pinned slice
    torch.cuda.synchronize()
    grown = allocations() - allocs0
    assert grown == 0, f"{grown} CUDA allocations over 200 frames ({grown / 200:.2f} per frame)"
    assert models.prompt_encoder.encoder_calls == calls0, "a cached or identical prompt reached the text encoder"


@pytest.mark.parametrize("preset, cfg_type", [("tiny", "full"), ("tiny-xl", "initialize")])
def test_cuda_graph_with_the_prompts_keys_and_values_matches_projecting_the_prompt(fp16_models, xl_fp16_models,
                                                                                   preset, cfg_type):
    """Captured, a stream that reads its prompt's cross-attention keys and values gives the frames of one that
    projects the prompt in every call, through prompt and negative-prompt changes; so does one that also projects
    its self-attention with the fused weights (``fused_qkv``), which allocates nothing per frame either."""
    models = fp16_models if preset == "tiny" else xl_fp16_models
    cfg = make_config(cfg_type, 2)
    plain = new_stream(models, cfg.with_(prompt_kv=False, fused_qkv=False), "cuda_graph")
    keeps = new_stream(models, cfg.with_(fused_qkv=False), "cuda_graph")
    fused = new_stream(models, cfg, "cuda_graph")  # both, the default
    assert keeps.prompt_kv is not None and plain.prompt_kv is None and "fused_qkv" in fused.unet_extras.given
    groups = frame_groups(6, seed=21)
    for prompt, negative in ((PROMPT, None), (PROMPT_2, None), (PROMPT_2, "washed out")):
        for stream in (keeps, plain, fused):
            stream.set_prompt(prompt, negative)
        expected = run(plain, groups)
        for name, stream in (("prompt K/V", keeps), ("fused projections", fused)):
            assert_outputs_close(run(stream, groups), expected, SAME_TOL[torch.float16],
                                 f"{name}: {preset} {cfg_type}, prompt {prompt!r}, negative {negative!r}")
    torch.cuda.synchronize()
    before = allocations()
    for k in range(60):
        if k == 30:
            fused.set_prompt(PROMPT)  # cached: the embeddings and the prompt's keys and values rewritten in place
        fused.step(groups[k % 6])
    torch.cuda.synchronize()
    assert allocations() - before == 0


@pytest.mark.parametrize("cfg_type", ["self", "full"])
def test_sdxl_cuda_graph_matches_eager_and_allocates_nothing_per_frame(xl_fp16_models, cfg_type):
    """SDXL's added conditions are buffers like the embeddings: captured once, a prompt change (pooled rows
    included) is a copy into them, and steady state allocates nothing."""
    models = xl_fp16_models
    cfg = make_config(cfg_type, 2)
    groups = frame_groups(8, seed=3)
    expected = run(new_stream(models, cfg, "eager"), groups)
    stream = new_stream(models, cfg, "cuda_graph")
    got = run(stream, groups)
    assert_outputs_close(got, expected, GRAPH_TOL[torch.float16], f"SDXL cuda_graph vs eager ({cfg_type})")
    stream.set_prompt(PROMPT_2)           # encoded (both encoders) before the window
    stream.step(groups[0])
    stream.set_prompt(PROMPT)
    torch.cuda.synchronize()
    calls0, allocs0 = models.prompt_encoder.encoder_calls, allocations()
    for k in range(100):
        if k == 50:
            stream.set_prompt(PROMPT_2)   # cached: embeddings and pooled rows copied in
        stream.step(groups[k % 8])
    torch.cuda.synchronize()
    assert allocations() - allocs0 == 0, "the SDXL step allocated"
    assert models.prompt_encoder.encoder_calls == calls0


def _gpu_controlnet(models: StreamModels):
    from diffusers import ControlNetModel

    torch.manual_seed(3)
    net = ControlNetModel.from_unet(models.unet, conditioning_embedding_out_channels=(8, 8, 16, 16),
                                    load_weights_from_unet=False)  # the UNet's config only
    for name, param in net.named_parameters():
        if "controlnet_cond_embedding" in name and param.dim() > 1:
            torch.nn.init.normal_(param, std=0.3)
        if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
            torch.nn.init.normal_(param, std=0.2)
    return net.to(device="cuda", dtype=torch.float16).eval().requires_grad_(False)


@pytest.mark.parametrize("acceleration", ["cuda_graph", "compile"])
def test_controlnet_under_cuda_graph_matches_eager_and_allocates_nothing(fp16_models, acceleration):
    """ControlNet residuals inside the captured step (``compile``: the ControlNet's compiled copy too): the graph
    gives the eager frames, and steady state allocates nothing, across control-image changes (every frame), a
    strength change, strength 0 (its own graph variant, no ControlNet call) and back."""
    from streamrt.controlnet import ControlNet

    models = fp16_models
    net = _gpu_controlnet(models)
    cfg = make_config("self", 2)
    groups, controls = frame_groups(8, seed=4), frame_groups(8, seed=5)

    def run_with(stream):
        return [stream.step(g, control=[c]).clone() for g, c in zip(groups, controls)]

    expected = run_with(Stream(models, cfg.with_(acceleration="eager"), prompt=PROMPT, controlnets=[ControlNet(net)]))
    stream = Stream(models, cfg.with_(acceleration=acceleration), prompt=PROMPT, controlnets=[ControlNet(net)])
    got = run_with(stream)
    if acceleration == "cuda_graph":
        assert_outputs_close(got, expected, GRAPH_TOL[torch.float16], "ControlNet cuda_graph vs eager")
    else:  # from the first real output on (see test_compiled_cuda_graph_matches_eager)
        for k, (a, b) in enumerate(zip(got[1:], expected[1:]), start=1):
            diff = (a - b).abs()
            assert diff.max().item() <= COMPILE_MAX_TOL and diff.mean().item() <= COMPILE_MEAN_TOL, (
                f"compiled output {k} differs from eager: max {diff.max().item():.3g}, mean {diff.mean().item():.3g}")
    stream.set_control_strength(0, 0.0)   # capture the no-ControlNet variant before the window
    stream.step(groups[0], control=[controls[0]])
    stream.set_control_strength(0, 1.0)
    out = torch.empty((1, SIZE, SIZE, 3), pin_memory=True)
    torch.cuda.synchronize()
    allocs0 = allocations()
    for k in range(120):
        if k == 40:
            stream.set_control_strength(0, 0.5)
        elif k == 60:
            stream.set_control_strength(0, 0.0)
        elif k == 80:
            stream.set_control_strength(0, 1.0)
        stream.step(groups[k % 8], control=[controls[(k * 3) % 8]], out=out, synchronize=False)
    torch.cuda.synchronize()
    grown = allocations() - allocs0
    assert grown == 0, f"{grown} CUDA allocations over 120 frames with ControlNet changes"


def test_zero_allocations_in_process_video_with_changes(fp16_models):
    models = fp16_models
    stream = new_stream(models, make_config("self", 2), "cuda_graph")
    video = make_frames(200, seed=7)
    stream.process_video(video[:8])      # capture and warm up
    stream.set_prompt(PROMPT_2)
    stream.set_prompt(PROMPT)

    def changes(done: int, total: int) -> None:
        if done == 60:
            stream.set_prompt(PROMPT_2)
        elif done == 120:
            stream.set_seed(11)

    torch.cuda.synchronize()
    calls0, allocs0 = models.prompt_encoder.encoder_calls, allocations()
    result = stream.process_video(video, progress=changes)
    torch.cuda.synchronize()
    assert allocations() - allocs0 == 0
    assert models.prompt_encoder.encoder_calls == calls0
    assert result.shape == video.shape and torch.isfinite(result).all()


def test_process_video_previews_only_finished_frames(fp16_models):
    """On CUDA a group's copy to the host finishes while the next group runs: preview() sees only frames
    already written, which equal the result's, and all of them at the end."""
    stream = new_stream(fp16_models, make_config("self", 2), "cuda_graph")
    video = make_frames(12, seed=9)
    seen = []
    result = stream.process_video(video, preview=lambda finished: seen.append(finished.clone()))
    assert [len(s) for s in seen] == [*range(1, 12), 12]   # one group behind while running
    for finished in seen:
        assert torch.equal(finished, result[:len(finished)])


# ---------------------------------------------------------------------------------------------- (4) reset after capture
@pytest.mark.parametrize("dtype_name", ["fp16", "fp32"])
@pytest.mark.parametrize("cfg_type", ["self", "initialize", "full"])
def test_reset_after_capture_reproduces_first_outputs(request, dtype_name, cfg_type):
    models = request.getfixturevalue(f"{dtype_name}_models")
    cfg = make_config(cfg_type, 2)
    groups = frame_groups(6, seed=8)
    stream = new_stream(models, cfg, "cuda_graph")
    first = run(stream, groups)           # the first call captures (warm-up runs must leave no trace)
    stream.reset()
    again = run(stream, groups)
    assert_outputs_close(again, first, SAME_TOL[models.dtype], f"after reset ({cfg_type})")
    eager = run(new_stream(models, cfg, "eager"), groups)
    assert_outputs_close(first, eager, GRAPH_TOL[models.dtype], f"first graph outputs vs eager ({cfg_type})")


def test_reset_after_txt2img_capture(fp16_models):
    stream = new_stream(fp16_models, make_config("self", 2), "cuda_graph")
    first = run(stream, [None] * 4)
    stream.reset()
    assert_outputs_close(run(stream, [None] * 4), first, SAME_TOL[torch.float16], "txt2img after reset")


# ---------------------------------------------------------------------------------------------- (5) process_video
@pytest.mark.parametrize("acceleration", ["eager", "cuda_graph"])
@pytest.mark.parametrize("n,f", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_process_video_equals_step_by_step(fp16_models, acceleration, n, f):
    cfg = make_config("self", n, frames_per_step=f)
    video = make_frames(6 * f, seed=9)
    got = new_stream(fp16_models, cfg, acceleration).process_video(video)

    stream = new_stream(fp16_models, cfg, acceleration)
    outs = [stream.step(video[k * f:(k + 1) * f]).clone() for k in range(6)]
    outs += [stream.step(video[-f:]).clone() for _ in range(n - 1)]   # flush: the last group again
    expected = torch.cat(outs)[(n - 1) * f:]
    assert got.shape == video.shape
    assert_outputs_close([got], [expected], SAME_TOL[torch.float16],
                         f"process_video vs steps ({acceleration}, n={n}, F={f})")


def test_process_video_of_a_cuda_resident_video(fp16_models):
    """ComfyUI may hand over an IMAGE batch on the GPU: the result is the same as for the CPU copy."""
    cfg = make_config("self", 2)
    video = make_frames(6, seed=10)
    on_cpu = new_stream(fp16_models, cfg, "cuda_graph").process_video(video)
    on_gpu = new_stream(fp16_models, cfg, "cuda_graph").process_video(video.cuda())
    assert_outputs_close([on_gpu.cpu()], [on_cpu], SAME_TOL[torch.float16], "CUDA-resident video vs CPU video")


def test_consecutive_videos_continue_the_stream(fp16_models):
    """Consecutive process_video calls on one graph stream give what the same calls give on an eager
    stream: the state (latent buffer, stock noise) carries on from one video into the next."""
    cfg = make_config("self", 2)
    video = make_frames(8, seed=11)
    stream = new_stream(fp16_models, cfg, "cuda_graph")
    a = stream.process_video(video[:4])
    b = stream.process_video(video[4:])
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    eager = new_stream(fp16_models, cfg, "eager")
    assert_outputs_close([a, b], [eager.process_video(video[:4]), eager.process_video(video[4:])],
                         GRAPH_TOL[torch.float16], "consecutive videos, cuda_graph vs eager")


# ---------------------------------------------------------------------------------------------- cached attention
def test_kv_cache_under_cuda_graph_matches_eager_and_allocates_nothing():
    """Cached attention (docs/DESIGN.md, "Cached attention") in the captured step: same outputs as eager, across a
    window / interval change, and no allocation per frame (the rings are allocated with the stream)."""
    from streamrt.kv_cache import KVCacheConfig

    models = build_models(torch.float16)  # its own UNet: the caching processors are installed on it
    cfg = make_config("self", 2, kv_cache=KVCacheConfig(enabled=True, max_frames=4, window=2, interval=2))
    groups = frame_groups(10, seed=12)

    def script(stream: Stream) -> list[torch.Tensor]:
        outs = []
        for k, g in enumerate(groups):
            if k == 5:
                stream.set_cache_window(4, interval=1)
            outs.append(stream.step(g).clone())
        return outs

    expected = script(new_stream(models, cfg, "eager"))
    stream = new_stream(models, cfg, "cuda_graph")
    got = script(stream)
    assert_outputs_close(got, expected, GRAPH_TOL[torch.float16], "cached attention, cuda_graph vs eager")

    torch.cuda.synchronize()
    before = allocations()
    for k in range(100):
        if k == 30:
            stream.set_cache_window(1)
        elif k == 60:
            stream.set_seed(5)  # clears the cache
        stream.step(groups[k % len(groups)])
    torch.cuda.synchronize()
    assert allocations() - before == 0


def test_text_encoder_graph_matches_eager_and_a_new_prompt_allocates_only_its_cache_entry(fp32_models):
    """The prompt encoder's captured graph gives the eager encoder's embeddings for new prompts."""
    encoder = fp32_models.prompt_encoder
    encoder.clear()
    texts = ["a cat", "a red dog on the moon", "a cat"]
    got = [encoder.encode(t) for t in texts]
    assert encoder._graph not in (None, False), "the text encoder was not captured"
    assert encoder.encoder_calls >= 2 and got[0] is got[2]  # the repeat is a cache hit
    for text, emb in zip(texts, got):
        ids = fp32_models.tokenizer(text, padding="max_length", max_length=fp32_models.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids.cuda()
        with torch.inference_mode():
            eager = fp32_models.text_encoder(ids, return_dict=False)[0]
        torch.testing.assert_close(emb.tokens, eager, atol=1e-5, rtol=1e-5)
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    encoder.encode("a brand new prompt about a lighthouse")
    assert torch.cuda.memory_stats()["allocation.all.allocated"] - before == 1  # the cache entry


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_parallel_video_over_two_gpus_equals_one_gpu(fp16_models):
    """A batch video split over cuda:0 and cuda:1 (a copy of the pipeline on each, cuda_graph) gives one GPU's
    frames, and each stream's buffers and graph live on its own device."""
    from streamrt.parallel import process_video_parallel, replicate

    models = fp16_models
    other = replicate(models, "cuda:1")
    assert other.device == torch.device("cuda:1") and other.unet is not models.unet
    cfg = make_config("self", 2).with_(acceleration="cuda_graph")
    video = make_frames(24, seed=9)
    one = new_stream(models, cfg, "cuda_graph").process_video(video)
    streams = [new_stream(m, cfg, "cuda_graph") for m in (models, other)]
    split = process_video_parallel(streams, video)
    assert streams[1].buffers.unet_in.device == torch.device("cuda:1")
    assert torch.equal(split, one)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_sessions_split_a_controlnet_video_over_two_gpus(fp16_models):
    """Through the sessions (what the sampler calls): a video with a ControlNet split over cuda:0 and cuda:1 (the
    pipeline and the ControlNet copied to cuda:1 once) gives one GPU's frames."""
    from streamrt.controlnet import ControlInput, ControlNet
    from streamrt.sessions import StreamRequest, StreamSessions

    net = _gpu_controlnet(fp16_models)
    cfg = make_config("self", 2).with_(acceleration="cuda_graph")
    video, control = make_frames(16, seed=10), make_frames(16, seed=11)
    controls = (ControlInput("cn", ControlNet(net, 0.8), control),)
    _, one = StreamSessions().run("a", fp16_models, StreamRequest(cfg, PROMPT, controlnets=controls), video)
    sessions = StreamSessions()
    request = StreamRequest(cfg, PROMPT, controlnets=controls, video_devices=("cuda:0", "cuda:1"))
    _, split = sessions.run("a", fp16_models, request, video)
    assert torch.equal(split, one)
    other = sessions.stream(("a", "device", 1), sessions.replica(fp16_models, "cuda:1"), request)
    assert other.device == torch.device("cuda:1")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("acceleration,cfg_type,n", [("cuda_graph", "self", 2), ("cuda_graph", "full", 3),
                                                      ("cuda_graph", "initialize", 2), ("compile", "self", 2)])
def test_step_parallel_stream_over_two_gpus(fp16_models, acceleration, cfg_type, n):
    """A stream's steps split over cuda:0 and cuda:1 (StagedStream, each stage captured on its own GPU, the hand-off
    a copy between them) gives one GPU's frames within fp16 rounding once the pipeline has filled, through prompt,
    seed and guidance changes and a reset, with zero CUDA allocations per frame on either GPU."""
    from streamrt.parallel import replicate
    from streamrt.stages import StagedStream

    cfg = make_config(cfg_type, n).with_(acceleration=acceleration)
    one = new_stream(fp16_models, cfg, acceleration)
    staged = StagedStream([fp16_models, replicate(fp16_models, "cuda:1")], cfg, prompt=PROMPT,
                          negative_prompt=NEGATIVE)
    assert [s.device for s in staged.stages] == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert staged.stages[1].buffers.unet_in.device == torch.device("cuda:1")
    groups = frame_groups(24, seed=12)
    for stream in (one, staged):
        stream.set_prompt(PROMPT_2)  # encoded before the allocation window
        stream.set_prompt(PROMPT)
        for group in groups[:3]:  # captured (and compiled) before it too
            stream.step(group)
        stream.reset()
    got, expected = [], []
    before = [int(torch.cuda.memory_stats(i)["allocation.all.allocated"]) for i in range(2)]
    for k, group in enumerate(groups):
        if k == 8:
            for stream in (one, staged):
                stream.set_seed(5)
                stream.set_prompt(PROMPT_2)
        if k == 14:
            for stream in (one, staged):
                stream.set_guidance(1.8, 0.7)
                stream.reset()
        got.append(staged.step(group).clone())
        expected.append(one.step(group).clone())
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    grown = [int(torch.cuda.memory_stats(i)["allocation.all.allocated"]) - before[i] for i in range(2)]
    filled = [k for k in range(len(groups)) if not 14 <= k < 14 + staged.latency and k >= staged.latency]
    tolerance = COMPILE_MAX_TOL if acceleration == "compile" else GRAPH_TOL[torch.float16]
    assert_outputs_close([got[k] for k in filled], [expected[k] for k in filled], tolerance, "step-parallel")
    assert grown == [0, 0], f"CUDA allocations over 24 frames per GPU: {grown}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_sessions_run_a_controlnet_stream_with_its_steps_over_two_gpus(fp16_models):
    """Through the sessions: a realtime ControlNet stream whose two steps run on cuda:0 and cuda:1 (pipeline and
    ControlNet copied to cuda:1 once, control images handed on with the rows) gives one GPU's frames once filled,
    with zero allocations per frame on either GPU while the control image and strength change."""
    from streamrt.controlnet import ControlInput, ControlNet
    from streamrt.sessions import StreamRequest, StreamSessions
    from streamrt.stages import StagedStream

    net = _gpu_controlnet(fp16_models)
    cfg = make_config("self", 2).with_(acceleration="cuda_graph")
    groups, controls = frame_groups(20, seed=13), frame_groups(20, seed=14)

    def request(k: int, staged: bool) -> StreamRequest:
        strength = 0.8 if k < 12 else 0.3
        return StreamRequest(cfg, PROMPT, controlnets=(ControlInput("cn", ControlNet(net, strength), controls[k]),),
                             step_devices=("cuda:0", "cuda:1") if staged else ())

    one, split = StreamSessions(), StreamSessions()
    for k in range(3):  # captured before the window
        split.run("a", fp16_models, request(k, True), groups[k])
    stream = split.stream("a", fp16_models, request(0, True))
    assert isinstance(stream, StagedStream) and stream.devices == (torch.device("cuda:0"), torch.device("cuda:1"))
    stream.reset()
    before = [int(torch.cuda.memory_stats(i)["allocation.all.allocated"]) for i in range(2)]
    got = [split.run("a", fp16_models, request(k, True), g)[1].clone() for k, g in enumerate(groups)]
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    grown = [int(torch.cuda.memory_stats(i)["allocation.all.allocated"]) - before[i] for i in range(2)]
    expected = [one.run("a", fp16_models, request(k, False), g)[1].clone() for k, g in enumerate(groups)]
    assert_outputs_close(got[1:], expected[1:], GRAPH_TOL[torch.float16], "step-parallel ControlNet")
    # each call's CPU result tensor is the host's (pinned, cached): nothing on either GPU
    assert grown == [0, 0], f"CUDA allocations over 20 frames per GPU: {grown}"
