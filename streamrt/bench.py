"""Side-by-side speed benchmark: StreamRT's torch backends against StreamDiffusion 0.1.1.

Run on the GPU machine::

    python -m streamrt.bench --out bench_out

and, as a smoke test on a CPU (tiny random models, a few frames)::

    python -m streamrt.bench --device cpu --preset tiny --frames 8 --backends eager --width 64 --height 64

Everything runs in ONE process on ONE set of random-weight models (``--preset``, default the
SD-turbo sized UNet with the real TAESD architecture), so every row sees the same GPU, the same
weights and the same input video. Rows:

- ``StreamDiffusion 0.1.1`` (its own torch path, one ``__call__`` per frame), per scenario, first:
  later rows compile the UNet and TAESD in place, and the reference must not run those.
- ``streamrt`` for each backend: ``eager``, ``cuda_graph`` and ``compile`` (``compile_models`` + the
  ``cuda_graph`` backend), per scenario.

Scenarios (512x512 unless ``--width/--height``; LCM schedule of 50 steps; guidance 1.2):

- ``a``: 1 step, ``t_index_list=(32,)``, cfg ``none``, F = 1 frame per step;
- ``b``: 2 steps, ``(32, 45)``, cfg ``self`` (RCFG), F = 1;
- ``a4``: as ``a`` with F = 4 frames per step (batch-video setting; the reference has no F > 1 row and
  the speed-up column compares with its ``a`` row).

What the numbers are (written into the output too, see :data:`METHODS`):

- ``ms/frame``: wall time of one ``Stream.process_video`` over N frames (a CPU float32 tensor
  ``[N, H, W, 3]``, as ComfyUI hands over an IMAGE batch) divided by N, after a warm-up video. It
  includes the upload, encode, UNet, scheduler step, decode and the copy into the CPU IMAGE-layout
  result, the per-video pinning of the input and the final synchronisation. For the reference: the
  wall time of N per-frame calls (upload, ``__call__``, to IMAGE layout on the CPU) divided by N.
- ``p50/p95``: per-frame times. Ours: a CUDA event is recorded from ``process_video``'s progress
  callback after every step of that same timed video; a frame's time is the GPU-timeline distance
  between consecutive events (divided by F), so idle gaps count too. Reference: per-call wall times.
- ``allocs/frame``: growth of ``torch.cuda.memory_stats()["allocation.all.allocated"]`` over a window
  of >= 200 frames of ``process_video`` in steady state, during which the prompt changes to one
  encoded before the window (a cache hit), the same prompt is set again, and the seed changes.
- prompt-change frames: ``set_prompt`` + one realtime ``step`` (host round trip), compared with the
  median realtime call; once for prompts already in the cache and once for brand-new prompts
  (one text-encoder call each, counted with ``models.prompt_encoder.encoder_calls``).
- realtime: ``step(frame)`` per call with ``synchronize=True`` (one frame per call, host round trip);
  ``overhead`` is the realtime median per call minus the batch ms/frame times F.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import math
import os
import platform
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch

logger = logging.getLogger("streamrt.bench")

PROMPT = "a photo of a cat, high quality"
PROMPT_2 = "a red dog in the style of a color photo"
NEGATIVE = ""
NUM_INFERENCE_STEPS = 50
GUIDANCE = 1.2
DELTA = 1.0
REFERENCE_NAME = "StreamDiffusion 0.1.1"
SKIPPED = "skipped"
BACKENDS = ("eager", "cuda_graph", "compile")


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    t_index_list: tuple[int, ...]
    cfg_type: str
    frames_per_step: int
    base: str  # the reference row this one is compared with
    kv_window: int = 0  # cached attention window (max_frames = window); 0 = off

    @property
    def label(self) -> str:
        return f"{self.key}: {self.title}"


SCENARIOS: dict[str, Scenario] = {
    "a": Scenario("a", "1 step [32], cfg none", (32,), "none", 1, "a"),
    "b": Scenario("b", "2 steps [32, 45], cfg self", (32, 45), "self", 1, "b"),
    "a4": Scenario("a4", "1 step [32], cfg none", (32,), "none", 4, "a"),
    "bkv": Scenario("bkv", "2 steps [32, 45], cfg self, cached attention window 4", (32, 45), "self", 1, "b", 4),
}

METHODS = {
    "ms_per_frame": "wall time of one process_video over N frames (CPU float32 IMAGE batch in, CPU IMAGE batch "
                    "out, incl. per-video pinning and final sync) / N, after a warm-up video; reference: wall "
                    "time of N per-frame calls (pinned upload, __call__, to CPU IMAGE layout) / N",
    "p50_ms/p95_ms": "ours: GPU-timeline distance between CUDA events recorded after each step of that same "
                     "timed video (from process_video's progress callback), / F; reference: per-call wall times",
    "allocs_per_frame": "growth of torch.cuda.memory_stats()['allocation.all.allocated'] over a steady-state "
                        "process_video window that includes a cached prompt change, a repeated identical "
                        "prompt and a seed change, / frames; reference: over its timed loop",
    "peak_vram_gb": "torch.cuda.max_memory_allocated() over the row (reset at its start; all models resident)",
    "first_call_s": "stream construction + first step, synchronized: includes torch.compile and CUDA-graph "
                    "capture where the backend does them; reference: prepare() + first call",
    "speedup_vs_ref": "reference ms/frame / this row's ms/frame, same scenario (a4 compares with a)",
    "realtime": "step(frame) per call, synchronize=True, pageable CPU frame in, pinned CPU frame out; "
                "overhead = realtime median per call - batch ms/frame * F",
    "prompt_change": "set_prompt + one realtime step, median over trials, vs the realtime median: 'cached' "
                     "alternates between two prompts already encoded, 'new' uses brand-new prompts",
    "batch_change_frames": "inside the allocation window: the GPU-timeline time of the frame right after the "
                           "cached prompt change (and after the seed change, which synchronises once to copy "
                           "pageable CPU noise), over the window's median frame",
    "video_fixed_ms": "timed-video wall time - N x mean per-frame time: per-video costs (pinning and checking the "
                      "input, pipeline flush, final sync)",
    "ref_max/mean_abs_diff": "reference row: |ours eager - reference| over the first n+3 outputs of fresh streams "
                             "fed the same frames (IMAGE values in [0, 1]); shows both do the same work",
}


# ---------------------------------------------------------------------------------------------- helpers
def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocations(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return int(torch.cuda.memory_stats(device).get("allocation.all.allocated", 0))


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class _StepMarks:
    """``process_video`` progress callback that timestamps every finished step.

    On CUDA it records pre-created events on the current stream (no allocation, no sync); on a CPU it
    reads the clock (the step has finished when the callback runs). ``on_mark(done, total)`` runs after
    the timestamp, for state changes inside a window.
    """

    def __init__(self, device: torch.device, count: int, on_mark=None) -> None:
        self.cuda = device.type == "cuda"
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(count)] if self.cuda else []
        self.times: list[float] = []
        self.count = 0
        self.on_mark = on_mark

    def __call__(self, done: int, total: int) -> None:
        if self.cuda:
            if self.count < len(self.events):
                self.events[self.count].record()
        else:
            self.times.append(time.perf_counter())
        self.count += 1
        if self.on_mark is not None:
            self.on_mark(done, total)

    def intervals_ms(self) -> list[float]:
        """Times between consecutive marks (call after a synchronisation)."""
        if self.cuda:
            n = min(self.count, len(self.events))
            return [self.events[k].elapsed_time(self.events[k + 1]) for k in range(n - 1)]
        return [(b - a) * 1000.0 for a, b in zip(self.times, self.times[1:])]


@contextlib.contextmanager
def _cuda_timing_shim(device: torch.device):
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


def _prewarm_pinned(nbytes: int, count: int) -> None:
    """Fill the caching host allocator with ``count`` pinned blocks of ``nbytes`` (freed right away, kept
    cached), as a long-running ComfyUI process has them after its first video of that size."""
    blocks = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
    del blocks


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda}
    try:
        out["cudnn"] = str(torch.backends.cudnn.version())
    except Exception:  # noqa: BLE001 - informational only
        out["cudnn"] = None
    for dist in ("diffusers", "transformers", "streamdiffusion", "triton"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ---------------------------------------------------------------------------------------------- context
def scenario_config(args: argparse.Namespace, sc: Scenario):
    """The StreamConfig of one scenario at the run's size and seed."""
    from .config import StreamConfig
    from .kv_cache import KVCacheConfig

    return StreamConfig(width=args.width, height=args.height, t_index_list=sc.t_index_list,
                        num_inference_steps=NUM_INFERENCE_STEPS, frames_per_step=sc.frames_per_step,
                        cfg_type=sc.cfg_type, guidance_scale=GUIDANCE, delta=DELTA, seed=args.seed,
                        kv_cache=KVCacheConfig(bool(sc.kv_window), max(sc.kv_window, 1), max(sc.kv_window, 1)))


class BenchContext:
    """Models, input video and results shared by every row of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .random_models import build_random_components

        self.args = args
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        if args.dtype == "auto":
            self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        cuda = self.device.type == "cuda"
        # CPU defaults are smoke-test sizes: the numbers mean nothing there, the code paths are exercised.
        self.warmup_frames = args.warmup_frames if args.warmup_frames is not None else (60 if cuda else 1)
        self.alloc_frames = args.alloc_frames if args.alloc_frames is not None else (200 if cuda else 2)
        self.realtime_calls = args.realtime_calls if args.realtime_calls is not None else (100 if cuda else 2)
        self.prompt_trials = args.prompt_trials if args.prompt_trials is not None else (5 if cuda else 1)

        t0 = time.perf_counter()
        logger.info("building random %r models (%s, %s, TAESD)", args.preset, self.dtype, self.device)
        self.components = build_random_components(args.preset, seed=args.model_seed, dtype=self.dtype,
                                                   device=self.device, taesd=True)
        _sync(self.device)
        self.build_s = time.perf_counter() - t0
        logger.info("models built in %.1f s", self.build_s)

        gen = torch.Generator("cpu").manual_seed(1234)
        # One random input video, made once: a CPU float32 IMAGE batch [N, H, W, 3] in [0, 1].
        self.frames = torch.rand(args.frames, args.height, args.width, 3, generator=gen)
        self.frames_pinned = self.frames.pin_memory() if cuda else self.frames
        self._window: torch.Tensor | None = None
        self._compiled = None
        self.rows: list[dict[str, Any]] = []
        if cuda:
            frame_bytes = args.height * args.width * 3 * 4
            _prewarm_pinned(frame_bytes * max(args.frames, self.alloc_frames + 8), 3)

    def window_frames(self, count: int) -> torch.Tensor:
        """``count`` frames cycling through the input video (for the allocation window)."""
        if self._window is None or self._window.shape[0] != count:
            idx = torch.arange(count) % self.frames.shape[0]
            self._window = self.frames[idx].contiguous()
        return self._window

    def models(self, backend: str):
        """A fresh :class:`StreamModels` (own prompt cache) over the shared modules; for ``compile``, over
        modules compiled once by :func:`compile_models` (which changes the UNet's memory format and the
        TAESD's encoder/decoder in place: the compile rows run last)."""
        from .backends import compile_models
        from .models import StreamModels

        c = self.components
        if backend != "compile":
            return StreamModels(unet=c["unet"], vae=c["taesd"], text_encoder=c["text_encoder"],
                                tokenizer=c["tokenizer"], scheduler=c["scheduler"])
        if self._compiled is None:
            models = StreamModels(unet=c["unet"], vae=c["taesd"], text_encoder=c["text_encoder"],
                                  tokenizer=c["tokenizer"], scheduler=c["scheduler"])
            self._compiled = compile_models(models, mode=self.args.compile_mode, cache_dir=self.args.compile_cache)
            return self._compiled
        base = self._compiled
        models = StreamModels(unet=base.unet, vae=base.vae, text_encoder=c["text_encoder"],
                              tokenizer=c["tokenizer"], scheduler=c["scheduler"])
        models.compiled = True
        return models

    def stream_config(self, sc: Scenario):
        return scenario_config(self.args, sc)


def _new_row(impl: str, backend: str, sc: Scenario, frames: int) -> dict[str, Any]:
    return {
        "impl": impl, "backend": backend, "scenario": sc.key, "scenario_title": sc.title,
        "t_index_list": list(sc.t_index_list), "cfg_type": sc.cfg_type, "F": sc.frames_per_step,
        "frames": frames, "ms_per_frame": None, "p50_ms": None, "p95_ms": None, "fps": None,
        "allocs_per_frame": None, "alloc_window_frames": None, "peak_vram_gb": None, "first_call_s": None,
        "speedup_vs_ref": None, "video_fixed_ms": None,
        "realtime_p50_ms": None, "realtime_p95_ms": None, "realtime_overhead_ms": None,
        "prompt_cached_ms": None, "prompt_cached_ratio": None, "prompt_new_ms": None, "prompt_new_ratio": None,
        "prompt_new_allocs": None, "batch_prompt_change_ms": None, "batch_prompt_change_ratio": None,
        "batch_seed_change_ms": None, "batch_seed_change_ratio": None, "encoder_calls_identical": None,
        "encoder_calls_window": None,
        "encoder_calls_new": None, "output_finite": None, "ref_max_abs_diff": None, "ref_mean_abs_diff": None,
        "seconds": None, "error": None,
    }


# ---------------------------------------------------------------------------------------------- our rows
def run_ours(ctx: BenchContext, backend: str, sc: Scenario) -> dict[str, Any]:
    from .stream import Stream

    args, dev = ctx.args, ctx.device
    f = sc.frames_per_step
    n = (args.frames // f) * f
    row = _new_row("streamrt", backend, sc, n)
    if n == 0:
        raise ValueError(f"--frames {args.frames} is less than frames_per_step={f}")
    video = (ctx.frames_pinned if args.pin_input else ctx.frames)[:n]
    groups = n // f
    cfg = ctx.stream_config(sc)
    models = ctx.models(backend)
    stream_backend = "cuda_graph" if backend == "compile" else backend
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    # first call: construction (prompt encoding) + first step, incl. compilation / capture
    t0 = time.perf_counter()
    stream = Stream(models, cfg, prompt=PROMPT, negative_prompt=NEGATIVE, backend=stream_backend)
    stream.step(ctx.frames[:f])
    _sync(dev)
    row["first_call_s"] = time.perf_counter() - t0
    logger.info("  first call %.2f s", row["first_call_s"])

    # warm-up video, then the timed video (with a CUDA event after every step)
    warm = max(f, (min(ctx.warmup_frames, n) // f) * f)
    stream.process_video(ctx.frames[:warm])
    marks = _StepMarks(dev, groups)
    _sync(dev)
    t0 = time.perf_counter()
    result = stream.process_video(video, progress=marks)
    wall = time.perf_counter() - t0
    row["ms_per_frame"] = wall * 1000.0 / n
    row["fps"] = n / wall
    per_frame = [t / f for t in marks.intervals_ms()]
    row["p50_ms"], row["p95_ms"] = _median(per_frame), _percentile(per_frame, 95)
    if per_frame:
        # the part of the wall time the steady per-group rate does not explain: pinning and checking the
        # input video, the pipeline flush (latency extra calls), the final synchronisation
        row["video_fixed_ms"] = wall * 1000.0 - groups * f * (sum(per_frame) / len(per_frame))
    row["output_finite"] = bool(torch.isfinite(result).all())
    del result

    # realtime: one call per F frames with a host round trip, pageable CPU frames in
    rt: list[float] = []
    for k in range(ctx.realtime_calls):
        g = k % groups
        frame = ctx.frames[g * f:(g + 1) * f]
        t0 = time.perf_counter()
        stream.step(frame)
        rt.append((time.perf_counter() - t0) * 1000.0)
    rt_med = _median(rt)
    row["realtime_p50_ms"], row["realtime_p95_ms"] = rt_med, _percentile(rt, 95)
    if rt_med is not None:
        row["realtime_overhead_ms"] = rt_med - row["ms_per_frame"] * f

    # identical prompt -> no encoder call; PROMPT_2 encoded once before the window (a cache hit inside)
    enc = models.prompt_encoder
    stream.set_prompt(PROMPT_2)
    stream.set_prompt(PROMPT)
    calls0 = enc.encoder_calls
    for _ in range(10):
        stream.set_prompt(PROMPT)
    stream.step(ctx.frames[:f])
    row["encoder_calls_identical"] = enc.encoder_calls - calls0

    # allocation window: steady-state process_video with a cached prompt change, an identical prompt and
    # a seed change inside it
    count = max(f, -(-ctx.alloc_frames // f) * f)
    window = ctx.window_frames(count)
    third = max(1, (count // f) // 3) * f

    def changes(done: int, total: int) -> None:
        if done == third:
            stream.set_prompt(PROMPT_2)  # cached: no encoder call
            stream.set_prompt(PROMPT_2)  # identical: nothing at all
        elif done == 2 * third:
            stream.set_seed(args.seed + 1)  # new noise, drawn on the CPU, copied into the existing buffer

    stream.process_video(window[:f])  # same code path once more before counting
    window_marks = _StepMarks(dev, count // f, on_mark=changes)
    _sync(dev)
    calls0, allocs0 = enc.encoder_calls, _allocations(dev)
    stream.process_video(window, progress=window_marks)
    _sync(dev)
    allocs1 = _allocations(dev)
    row["encoder_calls_window"] = enc.encoder_calls - calls0
    row["alloc_window_frames"] = count
    if allocs0 is not None:
        row["allocs_per_frame"] = (allocs1 - allocs0) / count
    # interval k runs from the mark after group k to the mark after group k + 1: the group right after a
    # change made in the callback at done == third is interval third / f - 1
    spans = [t / f for t in window_marks.intervals_ms()]
    window_p50 = _median(spans)
    for key, at in (("batch_prompt_change", third), ("batch_seed_change", 2 * third)):
        k = at // f - 1
        if window_p50 and 0 <= k < len(spans):
            row[f"{key}_ms"], row[f"{key}_ratio"] = spans[k], spans[k] / window_p50

    # prompt-change frames (realtime, host round trip): cached prompts, then brand-new prompts
    frame = ctx.frames[:f]
    cached: list[float] = []
    for k in range(ctx.prompt_trials):
        prompt = PROMPT if k % 2 == 0 else PROMPT_2
        t0 = time.perf_counter()
        stream.set_prompt(prompt)
        stream.step(frame)
        cached.append((time.perf_counter() - t0) * 1000.0)
    new: list[float] = []
    token = uuid.uuid4().hex[:8]
    _sync(dev)
    calls0, allocs0 = enc.encoder_calls, _allocations(dev)
    for k in range(ctx.prompt_trials):
        t0 = time.perf_counter()
        stream.set_prompt(f"{PROMPT}, variation {k} {token}")
        stream.step(frame)
        new.append((time.perf_counter() - t0) * 1000.0)
    allocs1 = _allocations(dev)
    row["encoder_calls_new"] = enc.encoder_calls - calls0
    if allocs0 is not None and new:
        row["prompt_new_allocs"] = (allocs1 - allocs0) / len(new)
    row["prompt_cached_ms"], row["prompt_new_ms"] = _median(cached), _median(new)
    if rt_med:
        row["prompt_cached_ratio"] = row["prompt_cached_ms"] / rt_med if cached else None
        row["prompt_new_ratio"] = row["prompt_new_ms"] / rt_med if new else None

    if dev.type == "cuda":
        row["peak_vram_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    del stream
    return row


# ---------------------------------------------------------------------------------------------- reference
class _Reference:
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
    row = _new_row(REFERENCE_NAME, "torch (eager)", sc, n)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    src = ctx.frames_pinned
    pin = dev.type == "cuda"
    result = torch.empty((n, args.height, args.width, 3), dtype=torch.float32, pin_memory=pin)
    with _cuda_timing_shim(dev), torch.inference_mode():
        t0 = time.perf_counter()
        ref = _Reference(ctx, sc)
        ref.prepare()
        ref.frame(src[:1], result[:1])
        _sync(dev)
        row["first_call_s"] = time.perf_counter() - t0
        logger.info("  first call %.2f s", row["first_call_s"])
        for k in range(min(ctx.warmup_frames, n)):
            ref.frame(src[k:k + 1], result[k:k + 1])
        _sync(dev)
        times: list[float] = []
        allocs0 = _allocations(dev)
        t_start = time.perf_counter()
        for k in range(n):
            t0 = time.perf_counter()
            ref.frame(src[k:k + 1], result[k:k + 1])
            times.append((time.perf_counter() - t0) * 1000.0)
        _sync(dev)
        wall = time.perf_counter() - t_start
        allocs1 = _allocations(dev)
        row["ms_per_frame"], row["fps"] = wall * 1000.0 / n, n / wall
        row["p50_ms"], row["p95_ms"] = _median(times), _percentile(times, 95)
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
    _sync(dev)
    ours = _eager_outputs(ctx, sc, count)
    diff = (ours - ref_out).abs()
    row["ref_max_abs_diff"], row["ref_mean_abs_diff"] = float(diff.max()), float(diff.mean())
    del ref
    return row


def _eager_outputs(ctx: BenchContext, sc: Scenario, count: int) -> torch.Tensor:
    """Our eager stream, fresh, on the first ``count`` frames (for the cross-check with the reference)."""
    from .stream import Stream

    stream = Stream(ctx.models("eager"), ctx.stream_config(sc), prompt=PROMPT, negative_prompt=NEGATIVE,
                    backend="eager")
    return torch.cat([stream.step(ctx.frames[k:k + 1]).clone() for k in range(count)])


def _reference_unavailable() -> str | None:
    try:
        import streamdiffusion  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - reported as the reason to skip
        return (f"StreamDiffusion 0.1.1 is not importable ({type(exc).__name__}: {exc}); install the wheel with "
                f"`pip install --no-deps streamdiffusion==0.1.1` (or put .whl/ on PYTHONPATH) to get its rows")
    return None


# ---------------------------------------------------------------------------------------------- output
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}f}"
    return str(value)


def _impl_label(row: dict[str, Any]) -> str:
    return row["impl"] if row["impl"] != "streamrt" else f"streamrt {row['backend']}"


def render_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# StreamRT benchmark ({meta['date']})", ""]
    lines.append(f"- device: {meta['device_name']} ({meta['device']}), dtype {meta['dtype']}, preset "
                 f"`{meta['preset']}`, {meta['width']}x{meta['height']}, N = {meta['frames']} frames, TAESD")
    v = meta["versions"]
    lines.append(f"- torch {v.get('torch')} (CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}), diffusers "
                 f"{v.get('diffusers')}, transformers {v.get('transformers')}, streamdiffusion "
                 f"{v.get('streamdiffusion')}, triton {v.get('triton')}, Python {v.get('python')}")
    lines.append(f"- models built in {_fmt(meta.get('build_s'), 1)} s; total run {_fmt(meta.get('total_s'), 1)} s")
    for note in meta.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", "## Batch video (process_video)", ""]
    head = ["impl / backend", "scenario", "F", "ms/frame", "p50 ms", "p95 ms", "fps", "allocs/frame",
            "peak VRAM GB", "first call s", f"speed-up vs {REFERENCE_NAME}", "error"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        lines.append("| " + " | ".join([
            _impl_label(r), r["scenario_title"], str(r["F"]), _fmt(r["ms_per_frame"]), _fmt(r["p50_ms"]),
            _fmt(r["p95_ms"]), _fmt(r["fps"], 1), _fmt(r["allocs_per_frame"], 1), _fmt(r["peak_vram_gb"]),
            _fmt(r["first_call_s"]), (_fmt(r["speedup_vs_ref"]) + "x") if r["speedup_vs_ref"] else "-",
            (r["error"] or "").replace("|", "/")[:160],
        ]) + " |")
    lines += ["", "## Realtime calls and prompt changes", ""]
    head = ["impl / backend", "scenario", "F", "realtime ms/call p50", "p95", "overhead vs batch ms",
            "cached prompt frame ms (x median)", "new prompt frame ms (x median)", "allocs / new prompt",
            "batch video: prompt / seed change frame (x p50)",
            "encoder calls identical / window / new", "video fixed ms", "finite", "max/mean |ours-ref|"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        if r["error"] and r["ms_per_frame"] is None:
            continue
        lines.append("| " + " | ".join([
            _impl_label(r), r["scenario_title"], str(r["F"]), _fmt(r["realtime_p50_ms"]), _fmt(r["realtime_p95_ms"]),
            _fmt(r["realtime_overhead_ms"]),
            f"{_fmt(r['prompt_cached_ms'])} ({_fmt(r['prompt_cached_ratio'])}x)" if r["prompt_cached_ms"] else "-",
            f"{_fmt(r['prompt_new_ms'])} ({_fmt(r['prompt_new_ratio'])}x)" if r["prompt_new_ms"] else "-",
            _fmt(r["prompt_new_allocs"], 0),
            " / ".join(f"{_fmt(r[k])}x" if r[k] is not None else "-"
                       for k in ("batch_prompt_change_ratio", "batch_seed_change_ratio")),
            " / ".join(_fmt(r[k]) for k in ("encoder_calls_identical", "encoder_calls_window", "encoder_calls_new")),
            _fmt(r["video_fixed_ms"], 1), _fmt(r["output_finite"]),
            f"{_fmt(r['ref_max_abs_diff'], 4)} / {_fmt(r['ref_mean_abs_diff'], 4)}"
            if r["ref_max_abs_diff"] is not None else "-",
        ]) + " |")
    lines += ["", "## What the numbers are", ""]
    lines += [f"- **{k}**: {v}" for k, v in METHODS.items()]
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(out_dir: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = render_markdown(meta, rows)
    md_path, json_path = out_dir / "bench.md", out_dir / "bench.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_json_safe({"meta": meta, "methods": METHODS, "rows": rows}), indent=2,
                              default=str), encoding="utf-8")
    os.replace(tmp, json_path)
    md_path.write_text(md, encoding="utf-8")
    return md_path, json_path


def _fill_speedups(rows: list[dict[str, Any]]) -> None:
    ref = {r["scenario"]: r["ms_per_frame"] for r in rows if r["impl"] == REFERENCE_NAME and r["ms_per_frame"]}
    for r in rows:
        base = SCENARIOS[r["scenario"]].base
        if r["impl"] == "streamrt" and r["ms_per_frame"] and base in ref:
            r["speedup_vs_ref"] = ref[base] / r["ms_per_frame"]
        elif r["impl"] == REFERENCE_NAME and r["ms_per_frame"]:
            r["speedup_vs_ref"] = 1.0


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    scenarios = "; ".join(f"{sc.label}, F={sc.frames_per_step}" for sc in SCENARIOS.values())
    p = argparse.ArgumentParser(prog="python -m streamrt.bench", description=__doc__.split("\n\n")[0],
                                epilog=f"Scenarios: {scenarios}")
    p.add_argument("--device", default="cuda", help="cuda (default) | cuda:N | cpu")
    p.add_argument("--preset", default="sd-turbo",
                   help="random-weight model preset of streamrt.random_models (default: sd-turbo)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="auto: fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--width", type=int, default=512, help="default: 512")
    p.add_argument("--height", type=int, default=512, help="default: 512")
    p.add_argument("--frames", type=int, default=300, help="N, frames of the timed video (default: 300)")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma list of eager, cuda_graph, compile (default: all)")
    p.add_argument("--scenarios", default="a,b,a4,bkv", help=f"comma list of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--skip-reference", action="store_true", help=f"do not run {REFERENCE_NAME}")
    p.add_argument("--out", default="bench_out", help="folder for bench.md and bench.json (default: bench_out)")
    p.add_argument("--seed", type=int, default=2, help="stream noise seed, both implementations (default: 2)")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.add_argument("--warmup-frames", type=int, default=None, help="warm-up video length (default 60; 1 group on CPU)")
    p.add_argument("--alloc-frames", type=int, default=None,
                   help="allocation window in frames (default 200; 2 groups on CPU)")
    p.add_argument("--realtime-calls", type=int, default=None, help="realtime calls (default 100; 2 on CPU)")
    p.add_argument("--prompt-trials", type=int, default=None,
                   help="prompt-change frames per kind (default 5; 1 on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own on CUDA, 1 on the CPU, where a busy machine "
                        "otherwise thrashes)")
    p.add_argument("--pin-input", action="store_true",
                   help="hand process_video a pinned input video (default: pageable, as ComfyUI does)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of the compile backend (default: default)")
    p.add_argument("--compile-cache", default=None, help="inductor cache folder (default: engine_cache/torch_compile)")
    p.add_argument("--budget-s", type=float, default=500.0,
                   help="seconds for the whole run (default: 500): a row starts only with 20 s (compile: 120 s) "
                        "of it left, later rows are listed as skipped")
    p.add_argument("--breakdown", action="store_true",
                   help="instead of the table: time VAE encode, UNet, VAE decode and the whole step separately")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [b for b in args.backends if b not in BACKENDS] + [s for s in args.scenarios if s not in SCENARIOS]
    if bad:
        p.error(f"unknown backend(s)/scenario(s): {bad}")
    if args.frames < 1:
        p.error("--frames must be >= 1")
    return args


def _graph_ms(fn, replays: int = 50) -> float:
    """Median GPU time of ``fn`` captured alone in a CUDA graph (warm-up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def breakdown(args: argparse.Namespace) -> str:
    """Where a frame's GPU time goes: each part of the step captured and timed on its own.

    Uses the full-size random models and the stream's own buffers; with ``compile`` in
    ``--backends`` the UNet and TAESD are compiled first. Returns a markdown table.
    """
    from .backends import compile_models
    from .models import StreamModels
    from .random_models import build_random_components
    from .stream import Stream

    c = build_random_components(args.preset, dtype=torch.float16, device=args.device, taesd=True)
    models = StreamModels(unet=c["unet"], vae=c["taesd"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                          scheduler=c["scheduler"])
    compiled = "compile" in args.backends
    if compiled:
        compile_models(models, mode=args.compile_mode, cache_dir=args.compile_cache)
    frame = torch.rand(1, args.height, args.width, 3)
    lines = [f"| scenario ({'compiled' if compiled else 'eager kernels'}, each part in its own CUDA graph) | "
             "VAE encode ms | UNet ms | VAE decode ms | whole step ms |", "|---|---|---|---|---|"]
    for key in args.scenarios:
        sc = SCENARIOS[key]
        stream = Stream(models, scenario_config(args, sc), prompt=PROMPT, backend="eager")
        for _ in range(3):
            stream.step(frame.expand(sc.frames_per_step, -1, -1, -1))
        buf = stream.buffers
        parts = [
            _graph_ms(lambda: models.encode_images(buf.image_in)),
            _graph_ms(lambda: models.predict(buf.unet_in, buf.timesteps, buf.embeds, **stream.unet_kwargs)),
            _graph_ms(lambda: models.decode_latents(buf.latent_out)),
            _graph_ms(lambda: stream._device_step(False)),
        ]
        lines.append(f"| {sc.label}, F={sc.frames_per_step} | " + " | ".join(f"{p:.2f}" for p in parts) + " |")
        logger.info("breakdown %s", lines[-1])
        del stream
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.breakdown:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        torch.backends.cudnn.benchmark = True
        table = breakdown(args)
        print(f"# StreamRT step breakdown on {torch.cuda.get_device_name()} "
              f"({datetime.date.today().isoformat()}, {args.preset}, {args.width}x{args.height}, fp16)\n\n{table}")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "breakdown.md").write_text(table + "\n", encoding="utf-8")
        return 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("diffusers", "transformers", "torch._dynamo", "torch._inductor"):
        if not args.verbose:
            logging.getLogger(noisy).setLevel(logging.ERROR)
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(args.out)
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "streamrt.bench", *(argv or sys.argv[1:])]),
        "device": str(device), "device_name": "cpu", "preset": args.preset, "width": args.width,
        "height": args.height, "frames": args.frames, "dtype": None, "versions": _versions(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "notes": [],
    }
    if device.type == "cuda" and torch.cuda.is_available():
        meta["device_name"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        meta["device_memory_gb"] = props.total_memory / 2**30
        meta["compute_capability"] = f"{props.major}.{props.minor}"
    elif device.type == "cpu":
        meta["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    ctx = BenchContext(args)
    meta["dtype"] = str(ctx.dtype).replace("torch.", "")
    meta["build_s"] = ctx.build_s
    meta["windows"] = {"warmup_frames": ctx.warmup_frames, "alloc_frames": ctx.alloc_frames,
                       "realtime_calls": ctx.realtime_calls, "prompt_trials": ctx.prompt_trials,
                       "pin_input": args.pin_input}
    logger.info("device %s, torch %s, diffusers %s", meta["device_name"], torch.__version__,
                meta["versions"].get("diffusers"))

    rows = ctx.rows
    jobs: list[tuple[str, Scenario]] = []
    if not args.skip_reference:
        reason = _reference_unavailable()
        if reason:
            meta["notes"].append(f"reference skipped: {reason}")
            logger.warning("reference skipped: %s", reason)
        else:
            if device.type != "cuda":
                meta["notes"].append(f"{REFERENCE_NAME} on the CPU: its CUDA timing calls are stubbed out "
                                     f"(smoke test of the wrapper only)")
            jobs += [("reference", SCENARIOS[s]) for s in args.scenarios
                     if SCENARIOS[s].frames_per_step == 1 and not SCENARIOS[s].kv_window]
    # canonical order: the reference first, compile last (it changes the shared UNet / TAESD in place)
    for backend in [b for b in BACKENDS if b in args.backends]:
        jobs += [(backend, SCENARIOS[s]) for s in args.scenarios]

    write_outputs(out_dir, meta, rows)  # the header at once: a run cut short still leaves its finished rows
    compile_failed = ""
    for backend, sc in jobs:
        elapsed = time.perf_counter() - started
        if backend == "compile" and compile_failed:
            row = _new_row("streamrt", backend, sc, args.frames)
            row["error"] = f"{SKIPPED}: an earlier compile row failed ({compile_failed})"
            logger.warning("streamrt compile / %s: %s", sc.label, row["error"])
            rows.append(row)
            continue
        need = 120.0 if backend == "compile" else 20.0
        impl = REFERENCE_NAME if backend == "reference" else f"streamrt {backend}"
        label = f"{impl} / {sc.label} / F={sc.frames_per_step}"
        if elapsed + need > args.budget_s:
            row = _new_row(REFERENCE_NAME if backend == "reference" else "streamrt",
                           "torch (eager)" if backend == "reference" else backend, sc, args.frames)
            row["error"] = f"{SKIPPED}: time budget ({elapsed:.0f} s used of --budget-s {args.budget_s:.0f})"
            logger.warning("%s: %s", label, row["error"])
            rows.append(row)
            continue
        logger.info("row: %s", label)
        t0 = time.perf_counter()
        try:
            row = run_reference(ctx, sc) if backend == "reference" else run_ours(ctx, backend, sc)
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the run
            logger.error("%s failed:\n%s", label, traceback.format_exc())
            row = _new_row(REFERENCE_NAME if backend == "reference" else "streamrt",
                           "torch (eager)" if backend == "reference" else backend, sc, args.frames)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if backend == "compile":
                compile_failed = row["error"][:80]  # compiling is the time hog: do not retry it per row
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        try:
            _free_memory(device)
        except Exception as exc:  # noqa: BLE001 - a broken CUDA context fails the next rows, recorded there
            logger.error("could not free memory after %s: %s", label, exc)
        _fill_speedups(rows)
        meta["total_s"] = time.perf_counter() - started
        logger.info("done %s in %.1f s: %s ms/frame (p50 %s, p95 %s), allocs/frame %s, first call %s s%s",
                    label, row["seconds"], _fmt(row["ms_per_frame"]), _fmt(row["p50_ms"]), _fmt(row["p95_ms"]),
                    _fmt(row["allocs_per_frame"], 1), _fmt(row["first_call_s"], 1),
                    f", ERROR {row['error']}" if row["error"] else "")
        try:
            write_outputs(out_dir, meta, rows)
        except OSError as exc:
            logger.error("could not write the results to %s: %s", out_dir, exc)

    _fill_speedups(rows)
    meta["total_s"] = time.perf_counter() - started
    md_path, json_path = write_outputs(out_dir, meta, rows)
    print(render_markdown(meta, rows), flush=True)
    logger.info("wrote %s and %s (%.1f s in all)", md_path, json_path, meta["total_s"])
    failed = [r for r in rows if r["error"] and not r["error"].startswith(SKIPPED)]
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
