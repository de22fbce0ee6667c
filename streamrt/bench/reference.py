"""The reference rows, over the same models in the same run: StreamDiffusion 0.1.1 (PyPI, its torch path, one
frame per call) for the SD scenarios, diffusers' SDXL img2img pipeline (:mod:`.reference_xl`) for the SDXL ones."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch

from .common import (
    DELTA,
    GUIDANCE,
    NEGATIVE,
    NUM_INFERENCE_STEPS,
    PROMPT,
    BenchContext,
    Scenario,
    allocations,
    logger,
    median,
    new_row,
    percentile,
    reference_name,
    sync,
)


@contextlib.contextmanager
def cuda_timing_shim(device: torch.device):
    """StreamDiffusion 0.1.1's ``__call__`` times itself with CUDA events and ``torch.cuda.synchronize``;
    on a CPU those become no-ops so the reference path can still be exercised (smoke test only)."""
    if device.type == "cuda":
        yield
        return

    class _NoEvent:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def record(self, *args, **kwargs) -> None:
            pass

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, other) -> float:
            return 0.0

    with mock.patch.object(torch.cuda, "Event", _NoEvent), \
            mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None):
        yield



class Reference:
    """StreamDiffusion 0.1.1 over the same components (its torch path), one frame per call."""

    def __init__(self, ctx: BenchContext, sc: Scenario) -> None:
        from diffusers import StableDiffusionPipeline
        from streamdiffusion import StreamDiffusion

        c = ctx.components(sc)
        self.ctx, self.sc = ctx, sc
        height, width = sc.size(ctx.args)
        self.unet = c["unet"]
        # The KL VAE only gives the pipeline its vae_scale_factor; the stream decodes with the TAESD.
        self.pipe = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                            unet=c["unet"], scheduler=c["scheduler"], safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
        self.stream = StreamDiffusion(self.pipe, t_index_list=list(sc.t_index_list), torch_dtype=ctx.dtype,
                                      width=width, height=height, do_add_noise=True,
                                      use_denoising_batch=True, frame_buffer_size=1, cfg_type=sc.cfg_type)
        self.stream.vae = c["taesd"]

    def prepare(self) -> None:
        self.stream.prepare(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=NUM_INFERENCE_STEPS,
                            guidance_scale=GUIDANCE, delta=DELTA, generator=torch.Generator(),
                            seed=self.ctx.args.seed)

    def frame(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Size:
        """One frame: upload ``src`` [1, H, W, 3], run the stream, write IMAGE layout into CPU ``dst``; returns
        the shape the stream gave."""
        dev = self.ctx.device
        x = src.to(dev, non_blocking=True).permute(0, 3, 1, 2)  # [1, 3, H, W] in [0, 1], as __call__ takes it
        y = self.stream(x)                                      # [1, 3, H, W] in [-1, 1], model dtype
        image = (y / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
        dst.copy_(image)
        return y.shape


@contextlib.contextmanager
def count_unet_calls(unet: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Count forward calls of ``unet`` and the batch rows they carry, while the block runs.

    A pre-hook sees every call however the caller passes the sample (positionally in both pipelines). Used
    around the warm-up calls only: the timed loop runs without it.
    """
    counts = {"calls": 0, "rows": 0}

    def hook(module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        counts["calls"] += 1
        counts["rows"] += int(sample.shape[0])

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()


def attention_processors(unet: torch.nn.Module) -> str:
    """The attention processor classes of ``unet``, e.g. ``AttnProcessor2_0`` (diffusers' SDPA default)."""
    return ", ".join(sorted({type(p).__name__ for p in unet.attn_processors.values()}))


def run_reference(ctx: BenchContext, sc: Scenario) -> dict[str, Any]:
    """One reference row: first call, warm-up (UNet calls counted), N frames timed call by call, F per call."""
    f = sc.frames_per_step
    if not sc.xl and f != 1:
        raise ValueError(f"the {reference_name(sc)} row runs F = 1 only")
    args, dev = ctx.args, ctx.device
    n = (args.frames // f) * f
    if n == 0:
        raise ValueError(f"--frames {args.frames} is less than frames_per_step={f}")
    groups = n // f
    row = new_row(reference_name(sc), "torch (eager)", sc, n, args)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    src = ctx.video(sc).pinned
    height, width = sc.size(args)
    pin = dev.type == "cuda"
    result = torch.empty((n, height, width, 3), dtype=torch.float32, pin_memory=pin)
    if sc.xl:
        from .reference_xl import XLReference as make
    else:
        make = Reference
    with cuda_timing_shim(dev), torch.inference_mode():
        t0 = time.perf_counter()
        ref = make(ctx, sc)
        ref.prepare()
        ref.frame(src[:f], result[:f])
        sync(dev)
        row["first_call_s"] = time.perf_counter() - t0
        logger.info("  first call %.2f s", row["first_call_s"])
        warm = max(1, min(ctx.warmup_frames, n) // f)
        with count_unet_calls(ref.unet) as counted:
            for g in range(warm):
                shape = ref.frame(src[g * f:(g + 1) * f], result[g * f:(g + 1) * f])
        row["ref_unet_calls_per_call"] = counted["calls"] / warm
        row["ref_unet_rows_per_frame"] = counted["rows"] / (warm * f)
        row["ref_output_shape"] = list(shape)
        row["ref_attention"] = attention_processors(ref.unet)
        sync(dev)
        calls: list[float] = []
        allocs0 = allocations(dev)
        t_start = time.perf_counter()
        for g in range(groups):
            t0 = time.perf_counter()
            ref.frame(src[g * f:(g + 1) * f], result[g * f:(g + 1) * f])
            calls.append((time.perf_counter() - t0) * 1000.0)
        sync(dev)
        wall = time.perf_counter() - t_start
        allocs1 = allocations(dev)
        per_frame = [t / f for t in calls]
        row["ms_per_frame"], row["fps"] = wall * 1000.0 / n, n / wall
        row["p50_ms"], row["p95_ms"] = median(per_frame), percentile(per_frame, 95)
        # one call is what a realtime caller makes: F frames with the host round trip
        row["realtime_p50_ms"], row["realtime_p95_ms"] = median(calls), percentile(calls, 95)
        row["realtime_overhead_ms"] = row["realtime_p50_ms"] - row["ms_per_frame"] * f
        row["alloc_window_frames"] = n
        if allocs0 is not None:
            row["allocs_per_frame"] = (allocs1 - allocs0) / n
        row["output_finite"] = bool(torch.isfinite(result).all())
        if dev.type == "cuda":
            row["peak_vram_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
        if sc.xl:  # the pipeline draws its own noise per call: its frames cannot match ours
            del ref
            return row

        # Same work? Fresh state on both sides, the same first frames: compare the outputs.
        count = min(n, len(sc.t_index_list) + 3)
        ref.prepare()
        ref_out = torch.empty((count, height, width, 3), dtype=torch.float32)
        for k in range(count):
            ref.frame(src[k:k + 1], ref_out[k:k + 1])
    sync(dev)
    ours = eager_outputs(ctx, sc, count)
    diff = (ours - ref_out).abs()
    row["ref_max_abs_diff"], row["ref_mean_abs_diff"] = float(diff.max()), float(diff.mean())
    del ref
    return row


def eager_outputs(ctx: BenchContext, sc: Scenario, count: int) -> torch.Tensor:
    """Our eager stream, fresh, on the first ``count`` frames (for the cross-check with the reference)."""
    stream = ctx.stream("eager", sc, prompt=PROMPT, negative_prompt=NEGATIVE)
    frames = ctx.video(sc).frames
    return torch.cat([stream.step(frames[k:k + 1]).clone() for k in range(count)])


def reference_unavailable(sc: Scenario) -> str | None:
    """Why ``sc``'s reference cannot run here, or None."""
    if sc.xl:
        try:
            from diffusers import StableDiffusionXLImg2ImgPipeline  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - reported as the reason to skip
            return f"diffusers' StableDiffusionXLImg2ImgPipeline is not importable ({type(exc).__name__}: {exc})"
        return None
    try:
        import streamdiffusion  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - reported as the reason to skip
        return (f"StreamDiffusion 0.1.1 is not importable ({type(exc).__name__}: {exc}); install the wheel with "
                f"`pip install --no-deps streamdiffusion==0.1.1` (or put .whl/ on PYTHONPATH) to get its rows")
    return None
