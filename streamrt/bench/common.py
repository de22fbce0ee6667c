"""What every part of the benchmark shares: constants, scenarios, statistics, the run's models and video."""

from __future__ import annotations

import argparse
import gc
import logging
import math
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Acceleration, StreamConfig
from ..kv_cache import KVCacheConfig
from ..models import StreamModels
from ..random_models import build_random_components, random_stream_models
from ..runtime import CompileOptions, prepare
from ..stream import Stream

logger = logging.getLogger("streamrt.bench")

PROMPT = "a photo of a cat, high quality"
PROMPT_2 = "a red dog in the style of a color photo"
NEGATIVE = ""
NUM_INFERENCE_STEPS = 50
GUIDANCE = 1.2
DELTA = 1.0
REFERENCE_NAME = "StreamDiffusion 0.1.1"
#: the reference of the SDXL scenarios (StreamDiffusion 0.1.1 has no SDXL path): what a user would otherwise pick
XL_REFERENCE_NAME = "diffusers SDXL img2img"
REFERENCE_NAMES = (REFERENCE_NAME, XL_REFERENCE_NAME)
SKIPPED = "skipped"
#: the accelerations the benchmark measures, in the order they run (the reference first, before the compile rows
#: put the shared UNet's weights in channels-last layout)
ACCELERATIONS = tuple(a.value for a in (Acceleration.EAGER, Acceleration.CUDA_GRAPH, Acceleration.COMPILE))


@dataclass(frozen=True)
class Scenario:
    """One benchmark setting: steps, guidance, frames per step, model family and size.

    ``base`` names the reference row this one's speed-up is taken against. ``xl`` scenarios run the SDXL
    preset (``--xl-preset``) against diffusers' SDXL img2img pipeline; the others the run's ``--preset``
    against StreamDiffusion 0.1.1. ``scale`` multiplies the run's ``--width/--height`` (2: 1024x1024 at the
    default 512), so a CPU smoke run shrinks every scenario together. ``compile_need_s``: the seconds of
    ``--budget-s`` a compile row must have left to start (compiling the SDXL UNet takes about 130 s per
    shape on an H200, plus the row's own frames).
    """

    key: str
    title: str
    t_index_list: tuple[int, ...]
    cfg_type: str
    frames_per_step: int
    base: str  # the reference row this one is compared with
    kv_window: int = 0  # cached attention window (max_frames = window); 0 = off
    xl: bool = False
    scale: int = 1
    compile_need_s: float = 120.0

    @property
    def label(self) -> str:
        return f"{self.key}: {self.title}"

    def size(self, args: argparse.Namespace) -> tuple[int, int]:
        """(height, width) of this scenario's frames in a run with ``args``."""
        return args.height * self.scale, args.width * self.scale

    def title_at(self, args: argparse.Namespace) -> str:
        """The title with the size where the scenario sets its own (SDXL rows are read by their size)."""
        if not self.xl and self.scale == 1:
            return self.title
        h, w = self.size(args)
        return f"{self.title}, {w}x{h}"


SCENARIOS: dict[str, Scenario] = {
    "a": Scenario("a", "1 step [32], cfg none", (32,), "none", 1, "a"),
    "b": Scenario("b", "2 steps [32, 45], cfg self", (32, 45), "self", 1, "b"),
    "a4": Scenario("a4", "1 step [32], cfg none", (32,), "none", 4, "a"),
    "bkv": Scenario("bkv", "2 steps [32, 45], cfg self, cached attention window 4", (32, 45), "self", 1, "b", 4),
    # SDXL (issue #15). The F = 4 row has its own reference row: the pipeline called with 4 frames per call,
    # the batched use a user would pick for a video (stricter than comparing with the per-frame row).
    "xl": Scenario("xl", "SDXL 1 step [32], cfg none", (32,), "none", 1, "xl", xl=True, compile_need_s=170.0),
    "xl4": Scenario("xl4", "SDXL 1 step [32], cfg none", (32,), "none", 4, "xl4", xl=True, compile_need_s=170.0),
    "xl1024": Scenario("xl1024", "SDXL 1 step [32], cfg none", (32,), "none", 1, "xl1024", xl=True, scale=2,
                       compile_need_s=190.0),
}
#: the scenarios ``python -m streamrt.bench`` runs without ``--scenarios`` (SDXL needs its own 7 GB of models)
DEFAULT_SCENARIOS = ("a", "b", "a4", "bkv")
XL_SCENARIOS = tuple(k for k, sc in SCENARIOS.items() if sc.xl)


def reference_name(sc: Scenario) -> str:
    """The implementation a scenario's reference row measures."""
    return XL_REFERENCE_NAME if sc.xl else REFERENCE_NAME


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
    "speedup_vs_ref": "reference ms/frame / this row's ms/frame, same scenario (a4 compares with a; xl4 with the "
                      "diffusers pipeline called with 4 frames per call)",
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
                             "fed the same frames (IMAGE values in [0, 1]); shows both do the same work "
                             "(StreamDiffusion rows only: the SDXL pipeline draws its own noise)",
    "sdxl_reference": "SDXL rows' reference: diffusers' StableDiffusionXLImg2ImgPipeline over the same modules "
                      "(UNet, both text encoders and tokenizers, the TAESD as its vae, an LCMScheduler of the same "
                      "config), the run's dtype (fp16 on CUDA), its default SDPA attention processors, no "
                      "watermark, progress bar off; per call image=F frames, num_inference_steps=2, strength=0.5 "
                      "(int(2 x 0.5) = 1 UNet step, counted with a forward hook: ref UNet calls), "
                      "guidance_scale=0 (no CFG), prompt_embeds + pooled_prompt_embeds encoded once before the "
                      "timing as our stream encodes its prompt once, output_type='pt' (decoded images in [0, 1]); "
                      "timed like the StreamDiffusion rows: pinned upload, the call, to CPU IMAGE layout",
}


# ---------------------------------------------------------------------------------------------- helpers
def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocations(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return int(torch.cuda.memory_stats(device).get("allocation.all.allocated", 0))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class StepMarks:
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


def prewarm_pinned(nbytes: int, count: int) -> None:
    """Fill the caching host allocator with ``count`` pinned blocks of ``nbytes`` (freed right away, kept
    cached), as a long-running ComfyUI process has them after its first video of that size."""
    blocks = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
    del blocks


def versions() -> dict[str, str | None]:
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
def scenario_config(args: argparse.Namespace, sc: Scenario, acceleration: str = "eager") -> StreamConfig:
    """The StreamConfig of one scenario at its size and the run's seed, with ``acceleration``."""
    height, width = sc.size(args)
    return StreamConfig(acceleration=acceleration, width=width, height=height, t_index_list=sc.t_index_list,
                        num_inference_steps=NUM_INFERENCE_STEPS, frames_per_step=sc.frames_per_step,
                        cfg_type=sc.cfg_type, guidance_scale=GUIDANCE, delta=DELTA, seed=args.seed,
                        kv_cache=KVCacheConfig(bool(sc.kv_window), max(sc.kv_window, 1), max(sc.kv_window, 1)),
                        fused_qkv=getattr(args, "fused_qkv", True), prompt_kv=not getattr(args, "no_prompt_kv", False))


@dataclass
class Video:
    """The run's input video at one size: a CPU float32 IMAGE batch ``[N, H, W, 3]`` in [0, 1], its pinned
    copy (on CUDA; the reference uploads from it) and the allocation window's frames (made on first use)."""

    frames: torch.Tensor
    pinned: torch.Tensor
    _window: torch.Tensor | None = None

    def window(self, count: int) -> torch.Tensor:
        """``count`` frames cycling through the video (for the allocation window)."""
        if self._window is None or self._window.shape[0] != count:
            idx = torch.arange(count) % self.frames.shape[0]
            self._window = self.frames[idx].contiguous()
        return self._window


class BenchContext:
    """Models, input videos and results shared by every row of one run.

    The random-weight components are built once per model family the run's scenarios need (``--preset`` for
    the SD scenarios, ``--xl-preset`` for the SDXL ones), before any row is timed; the input video once per
    frame size, from one seed, so every row of a size sees the same frames.
    """

    def __init__(self, args: argparse.Namespace) -> None:
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
        self.compile_options = CompileOptions(mode=args.compile_mode, cache_dir=args.compile_cache,
                                              ahead_of_time=args.compile_ahead_of_time)
        self.rows: list[dict[str, Any]] = []

        scenarios = [SCENARIOS[k] for k in getattr(args, "scenarios", None) or DEFAULT_SCENARIOS]
        self._components: dict[bool, dict[str, Any]] = {}
        self.build_s = 0.0
        for xl in sorted({sc.xl for sc in scenarios}):
            preset = self.preset(xl)
            t0 = time.perf_counter()
            logger.info("building random %r models (%s, %s, TAESD)", preset, self.dtype, self.device)
            self._components[xl] = build_random_components(preset, seed=args.model_seed, dtype=self.dtype,
                                                           device=self.device, taesd=True)
            sync(self.device)
            self.build_s += time.perf_counter() - t0
            logger.info("%r models built in %.1f s", preset, time.perf_counter() - t0)

        self._videos: dict[tuple[int, int], Video] = {}
        for height, width in dict.fromkeys(sc.size(args) for sc in scenarios):
            # One random video per size, each from the same seed: a CPU float32 IMAGE batch [N, H, W, 3] in [0, 1].
            gen = torch.Generator("cpu").manual_seed(1234)
            frames = torch.rand(args.frames, height, width, 3, generator=gen)
            self._videos[(height, width)] = Video(frames, frames.pin_memory() if cuda else frames)
            if cuda:
                frame_bytes = height * width * 3 * 4
                prewarm_pinned(frame_bytes * max(args.frames, self.alloc_frames + 8), 3)

    def preset(self, xl: bool) -> str:
        """The random-model preset of the SD (``xl=False``) or SDXL scenarios."""
        return self.args.xl_preset if xl else self.args.preset

    def components(self, sc: Scenario) -> dict[str, Any]:
        """The run's random components for ``sc``'s model family (as :func:`build_random_components` returns)."""
        return self._components[sc.xl]

    def video(self, sc: Scenario) -> Video:
        """The input video at ``sc``'s size."""
        return self._videos[sc.size(self.args)]

    def models(self, sc: Scenario) -> StreamModels:
        """A fresh :class:`StreamModels` (its own prompt cache, so encoder calls count per row) over the run's
        shared modules of ``sc``'s family, the TAESD as the VAE. Compiled copies are made per
        :class:`StreamModels` (:func:`streamrt.runtime.compiled_calls`), so each compile row compiles its own."""
        return random_stream_models(self.components(sc))

    def stream(self, acceleration: str, sc: Scenario, **kwargs) -> Stream:
        """A stream of the scenario with ``acceleration``, through :func:`streamrt.runtime.prepare`."""
        models = self.models(sc)
        config = scenario_config(self.args, sc, acceleration)
        runtime = prepare(models, config, compile_options=self.compile_options)
        return Stream(models, config, runtime=runtime, **kwargs)


def new_row(impl: str, backend: str, sc: Scenario, frames: int,
            args: argparse.Namespace | None = None) -> dict[str, Any]:
    """An empty result row; ``args`` (the run's) gives the title its size and the row its width/height."""
    height, width = sc.size(args) if args is not None else (None, None)
    return {
        "impl": impl, "backend": backend, "scenario": sc.key,
        "scenario_title": sc.title_at(args) if args is not None else sc.title,
        "t_index_list": list(sc.t_index_list), "cfg_type": sc.cfg_type, "F": sc.frames_per_step,
        "width": width, "height": height, "frames": frames,
        "ms_per_frame": None, "p50_ms": None, "p95_ms": None, "fps": None,
        "allocs_per_frame": None, "alloc_window_frames": None, "peak_vram_gb": None, "first_call_s": None,
        "speedup_vs_ref": None, "video_fixed_ms": None,
        "realtime_p50_ms": None, "realtime_p95_ms": None, "realtime_overhead_ms": None,
        "prompt_cached_ms": None, "prompt_cached_ratio": None, "prompt_new_ms": None, "prompt_new_ratio": None,
        "prompt_new_allocs": None, "batch_prompt_change_ms": None, "batch_prompt_change_ratio": None,
        "batch_seed_change_ms": None, "batch_seed_change_ratio": None, "encoder_calls_identical": None,
        "encoder_calls_window": None,
        "encoder_calls_new": None, "output_finite": None, "ref_max_abs_diff": None, "ref_mean_abs_diff": None,
        # SDXL reference rows: UNet forward calls per pipeline call and UNet batch rows per frame (both 1 when
        # the pipeline runs exactly one denoising step per frame), its output shape per call, its attention
        "ref_unet_calls_per_call": None, "ref_unet_rows_per_frame": None, "ref_output_shape": None,
        "ref_attention": None,
        "seconds": None, "error": None,
    }
