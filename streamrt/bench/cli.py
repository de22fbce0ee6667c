"""The benchmark's command line: ``python -m streamrt.bench`` (see the package docstring)."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from .breakdown import breakdown
from .common import (
    ACCELERATIONS,
    DEFAULT_SCENARIOS,
    REFERENCE_NAME,
    SCENARIOS,
    SKIPPED,
    XL_REFERENCE_NAME,
    BenchContext,
    Scenario,
    free_memory,
    new_row,
    reference_name,
    versions,
)
from .ours import run_ours
from .reference import reference_unavailable, run_reference
from .report import fill_speedups, fmt, render_markdown, write_outputs

logger = logging.getLogger("streamrt.bench")

DESCRIPTION = (f"Side-by-side speed benchmark: StreamRT's accelerations against {REFERENCE_NAME} (SD) and "
               f"{XL_REFERENCE_NAME} (SDXL), same run.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    scenarios = "; ".join(f"{sc.label}, F={sc.frames_per_step}" + (f", {sc.scale}x --width/--height" if sc.scale > 1
                                                                       else "") for sc in SCENARIOS.values())
    p = argparse.ArgumentParser(prog="python -m streamrt.bench", description=DESCRIPTION,
                                epilog=f"Scenarios: {scenarios}")
    p.add_argument("--device", default="cuda", help="cuda (default) | cuda:N | cpu")
    p.add_argument("--preset", default="sd-turbo",
                   help="random-weight model preset of streamrt.random_models for the SD scenarios (default: "
                        "sd-turbo)")
    p.add_argument("--xl-preset", default="sdxl-turbo",
                   help="SDXL random-weight preset for the xl scenarios (default: sdxl-turbo, the SDXL UNet config; "
                        "tiny-xl for a CPU smoke run)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="auto: fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--width", type=int, default=512, help="default: 512")
    p.add_argument("--height", type=int, default=512, help="default: 512")
    p.add_argument("--frames", type=int, default=300, help="N, frames of the timed video (default: 300)")
    p.add_argument("--accelerations", "--backends", dest="accelerations", default=",".join(ACCELERATIONS),
                   help=f"comma list of {', '.join(ACCELERATIONS)} (default: all)")
    p.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                   help=f"comma list of {', '.join(SCENARIOS)} (default: {','.join(DEFAULT_SCENARIOS)}; the xl "
                        f"scenarios build the SDXL models too)")
    p.add_argument("--compile-scenarios", default=None,
                   help="comma list: the scenarios that get a compile row (default: all of --scenarios); the others "
                        "are listed as skipped. Compiling the SDXL UNet takes about 130 s per shape")
    p.add_argument("--skip-reference", action="store_true",
                   help=f"do not run the references ({REFERENCE_NAME}, {XL_REFERENCE_NAME})")
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
    p.add_argument("--fused-qkv", action=argparse.BooleanOptionalAction, default=True,
                   help="StreamRT rows project self-attention with the fused weights (StreamConfig.fused_qkv, the "
                        "default); --no-fused-qkv: with the three separate projections")
    p.add_argument("--no-prompt-kv", action="store_true",
                   help="StreamRT rows project the prompt in every UNet call (StreamConfig.prompt_kv off)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of the compile acceleration (default: default)")
    p.add_argument("--compile-cache", default=None, help="inductor cache folder (default: engine_cache/torch_compile)")
    p.add_argument("--compile-ahead-of-time", action="store_true",
                   help="compile runs packages compiled ahead of time (CompileOptions.ahead_of_time; default: "
                        "torch.compile'd calls, traced again in every process)")
    p.add_argument("--budget-s", type=float, default=500.0,
                   help="seconds for the whole run (default: 500): a row starts only with 20 s (compile: 120 s; "
                        "SDXL compile: 170 s, at 1024x1024 190 s) of it left, later rows are listed as skipped")
    p.add_argument("--breakdown", action="store_true",
                   help="instead of the table: time VAE encode, UNet, VAE decode and the whole step separately "
                        "(with the last of --accelerations)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.accelerations = [a.strip() for a in args.accelerations.split(",") if a.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.compile_scenarios = (list(args.scenarios) if args.compile_scenarios is None else
                              [s.strip() for s in args.compile_scenarios.split(",") if s.strip()])
    bad = [a for a in args.accelerations if a not in ACCELERATIONS] + [
        s for s in args.scenarios + args.compile_scenarios if s not in SCENARIOS]
    if bad:
        p.error(f"unknown acceleration(s)/scenario(s): {bad}")
    if not args.scenarios:
        p.error("--scenarios is empty")
    if any(SCENARIOS[s].xl for s in args.scenarios) and not _is_xl_preset(args.xl_preset):
        p.error(f"--xl-preset {args.xl_preset!r} is not an SDXL preset (one with a second text encoder)")
    if args.frames < 1:
        p.error("--frames must be >= 1")
    return args



def _is_xl_preset(preset: str) -> bool:
    from ..random_models import component_configs

    try:
        return "text_encoder_2" in component_configs(preset)
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.breakdown:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        torch.backends.cudnn.benchmark = True
        table = breakdown(BenchContext(args), args)
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
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "streamrt.bench", *(argv or sys.argv[1:])]),
        "device": str(device), "device_name": "cpu", "preset": args.preset,
        "xl_preset": args.xl_preset if any(SCENARIOS[s].xl for s in args.scenarios) else None,
        "scenarios": args.scenarios, "compile_scenarios": args.compile_scenarios, "width": args.width,
        "height": args.height, "frames": args.frames, "dtype": None, "versions": versions(),
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
    meta["stream_options"] = {"fused_qkv": args.fused_qkv, "prompt_kv": not args.no_prompt_kv}
    logger.info("device %s, torch %s, diffusers %s", meta["device_name"], torch.__version__,
                meta["versions"].get("diffusers"))

    rows = ctx.rows
    jobs: list[tuple[str, Scenario]] = []
    if not args.skip_reference:
        for xl in sorted({SCENARIOS[s].xl for s in args.scenarios}):
            scenarios = [SCENARIOS[s] for s in args.scenarios if SCENARIOS[s].xl == xl]
            name = reference_name(scenarios[0])
            reason = reference_unavailable(scenarios[0])
            if reason:
                meta["notes"].append(f"{name} reference skipped: {reason}")
                logger.warning("%s reference skipped: %s", name, reason)
                continue
            if device.type != "cuda" and not xl:
                meta["notes"].append(f"{REFERENCE_NAME} on the CPU: its CUDA timing calls are stubbed out "
                                     f"(smoke test of the wrapper only)")
            # StreamDiffusion 0.1.1 has no F > 1 and no cached-attention row; diffusers' SDXL pipeline takes
            # F frames per call (xl4's reference is the batched call)
            jobs += [("reference", sc) for sc in scenarios if xl or (sc.frames_per_step == 1 and not sc.kv_window)]
    # canonical order: the reference first, compile last (it puts the shared UNet's weights in channels-last)
    for acceleration in [a for a in ACCELERATIONS if a in args.accelerations]:
        jobs += [(acceleration, SCENARIOS[s]) for s in args.scenarios]

    write_outputs(out_dir, meta, rows)  # the header at once: a run cut short still leaves its finished rows
    compile_failed = ""
    for kind, sc in jobs:
        elapsed = time.perf_counter() - started
        impl = reference_name(sc) if kind == "reference" else "streamrt"
        backend = "torch (eager)" if kind == "reference" else kind
        label = f"{impl if kind == 'reference' else f'streamrt {kind}'} / {sc.label} / F={sc.frames_per_step}"
        skip = ""
        if kind == "compile" and sc.key not in args.compile_scenarios:
            skip = f"{SKIPPED}: not in --compile-scenarios"
        elif kind == "compile" and compile_failed:
            skip = f"{SKIPPED}: an earlier compile row failed ({compile_failed})"
        elif elapsed + (sc.compile_need_s if kind == "compile" else 20.0) > args.budget_s:
            skip = f"{SKIPPED}: time budget ({elapsed:.0f} s used of --budget-s {args.budget_s:.0f})"
        if skip:
            row = new_row(impl, backend, sc, args.frames, args)
            row["error"] = skip
            logger.warning("%s: %s", label, skip)
            rows.append(row)
            continue
        logger.info("row: %s", label)
        t0 = time.perf_counter()
        try:
            row = run_reference(ctx, sc) if kind == "reference" else run_ours(ctx, kind, sc)
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the run
            logger.error("%s failed:\n%s", label, traceback.format_exc())
            row = new_row(impl, backend, sc, args.frames, args)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if kind == "compile":
                compile_failed = row["error"][:80]  # compiling is the time hog: do not retry it per row
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        try:
            free_memory(device)
        except Exception as exc:  # noqa: BLE001 - a broken CUDA context fails the next rows, recorded there
            logger.error("could not free memory after %s: %s", label, exc)
        fill_speedups(rows)
        meta["total_s"] = time.perf_counter() - started
        logger.info("done %s in %.1f s: %s ms/frame (p50 %s, p95 %s), allocs/frame %s, first call %s s%s",
                    label, row["seconds"], fmt(row["ms_per_frame"]), fmt(row["p50_ms"]), fmt(row["p95_ms"]),
                    fmt(row["allocs_per_frame"], 1), fmt(row["first_call_s"], 1),
                    f", ERROR {row['error']}" if row["error"] else "")
        try:
            write_outputs(out_dir, meta, rows)
        except OSError as exc:
            logger.error("could not write the results to %s: %s", out_dir, exc)

    fill_speedups(rows)
    meta["total_s"] = time.perf_counter() - started
    md_path, json_path = write_outputs(out_dir, meta, rows)
    print(render_markdown(meta, rows), flush=True)
    logger.info("wrote %s and %s (%.1f s in all)", md_path, json_path, meta["total_s"])
    failed = [r for r in rows if r["error"] and not r["error"].startswith(SKIPPED)]
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
