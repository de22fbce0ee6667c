"""The reference rows: StreamDiffusion 0.1.1 (PyPI, its torch path) over the same models, one frame per call."""

from __future__ import annotations

import contextlib
import time
from typing import Any
from unittest import mock

import torch

from .common import (
    DELTA,
    GUIDANCE,
    NEGATIVE,
    NUM_INFERENCE_STEPS,
    PROMPT,
    REFERENCE_NAME,
    BenchContext,
    Scenario,
    allocations,
    logger,
    median,
    new_row,
    percentile,
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

        c = ctx.components
        self.ctx, self.sc = ctx, sc
        # The KL VAE only gives the pipeline its vae_scale_factor; the stream decodes with the TAESD.
        self.pipe = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                            unet=c["unet"], scheduler=c["scheduler"], safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
        self.stream = StreamDiffusion(self.pipe, t_index_list=list(sc.t_index_list), torch_dtype=ctx.dtype,
                                      width=ctx.args.width, height=ctx.args.height, do_add_noise=True,
                                      use_denoising_batch=True, frame_buffer_size=1, cfg_type=sc.cfg_type)
        self.stream.vae = c["taesd"]

    def prepare(self) -> None:
        self.stream.prepare(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=NUM_INFERENCE_STEPS,
                            guidance_scale=GUIDANCE, delta=DELTA, generator=torch.Generator(),
                            seed=self.ctx.args.seed)

    def frame(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """One frame: upload ``src`` [1, H, W, 3], run the stream, write IMAGE layout into CPU ``dst``."""
        dev = self.ctx.device
        x = src.to(dev, non_blocking=True).permute(0, 3, 1, 2)  # [1, 3, H, W] in [0, 1], as __call__ takes it
        y = self.stream(x)                                      # [1, 3, H, W] in [-1, 1], model dtype
        image = (y / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
        dst.copy_(image)


def run_reference(ctx: BenchContext, sc: Scenario) -> dict[str, Any]:
    if sc.frames_per_step != 1:
        raise ValueError("the reference row runs F = 1 only")
    args, dev = ctx.args, ctx.device
    n = args.frames
    row = new_row(REFERENCE_NAME, "torch (eager)", sc, n)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    src = ctx.frames_pinned
    pin = dev.type == "cuda"
    result = torch.empty((n, args.height, args.width, 3), dtype=torch.float32, pin_memory=pin)
    with cuda_timing_shim(dev), torch.inference_mode():
        t0 = time.perf_counter()
        ref = Reference(ctx, sc)
        ref.prepare()
        ref.frame(src[:1], result[:1])
        sync(dev)
        row["first_call_s"] = time.perf_counter() - t0
        logger.info("  first call %.2f s", row["first_call_s"])
        for k in range(min(ctx.warmup_frames, n)):
            ref.frame(src[k:k + 1], result[k:k + 1])
        sync(dev)
        times: list[float] = []
        allocs0 = allocations(dev)
        t_start = time.perf_counter()
        for k in range(n):
            t0 = time.perf_counter()
            ref.frame(src[k:k + 1], result[k:k + 1])
            times.append((time.perf_counter() - t0) * 1000.0)
        sync(dev)
        wall = time.perf_counter() - t_start
        allocs1 = allocations(dev)
        row["ms_per_frame"], row["fps"] = wall * 1000.0 / n, n / wall
        row["p50_ms"], row["p95_ms"] = median(times), percentile(times, 95)
        row["realtime_p50_ms"], row["realtime_p95_ms"] = row["p50_ms"], row["p95_ms"]
        row["realtime_overhead_ms"] = row["p50_ms"] - row["ms_per_frame"]
        row["alloc_window_frames"] = n
        if allocs0 is not None:
            row["allocs_per_frame"] = (allocs1 - allocs0) / n
        row["output_finite"] = bool(torch.isfinite(result).all())
        if dev.type == "cuda":
            row["peak_vram_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30

        # Same work? Fresh state on both sides, the same first frames: compare the outputs.
        count = min(n, len(sc.t_index_list) + 3)
        ref.prepare()
        ref_out = torch.empty((count, args.height, args.width, 3), dtype=torch.float32)
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
    return torch.cat([stream.step(ctx.frames[k:k + 1]).clone() for k in range(count)])


def reference_unavailable() -> str | None:
    try:
        import streamdiffusion  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - reported as the reason to skip
        return (f"StreamDiffusion 0.1.1 is not importable ({type(exc).__name__}: {exc}); install the wheel with "
                f"`pip install --no-deps streamdiffusion==0.1.1` (or put .whl/ on PYTHONPATH) to get its rows")
    return None

