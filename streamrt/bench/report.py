"""The benchmark's outputs: a markdown table and the JSON rows, written as the run goes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .common import METHODS, REFERENCE_NAME, REFERENCE_NAMES, SCENARIOS, XL_REFERENCE_NAME
from .targets import render_targets


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}f}"
    return str(value)


def impl_label(row: dict[str, Any]) -> str:
    return row["impl"] if row["impl"] != "streamrt" else f"streamrt {row['backend']}"


def render_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# StreamRT benchmark ({meta['date']})", ""]
    xl = f", SDXL preset `{meta['xl_preset']}`" if meta.get("xl_preset") else ""
    lines.append(f"- device: {meta['device_name']} ({meta['device']}), dtype {meta['dtype']}, preset "
                 f"`{meta['preset']}`{xl}, {meta['width']}x{meta['height']} (xl1024: twice that), "
                 f"N = {meta['frames']} frames, TAESD")
    lines.append(f"- references, same run: {REFERENCE_NAME} for the SD scenarios, {XL_REFERENCE_NAME} "
                 f"(StableDiffusionXLImg2ImgPipeline, 1 step, see sdxl_reference below) for the SDXL ones")
    v = meta["versions"]
    lines.append(f"- torch {v.get('torch')} (CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}), diffusers "
                 f"{v.get('diffusers')}, transformers {v.get('transformers')}, streamdiffusion "
                 f"{v.get('streamdiffusion')}, triton {v.get('triton')}, Python {v.get('python')}")
    lines.append(f"- models built in {fmt(meta.get('build_s'), 1)} s; total run {fmt(meta.get('total_s'), 1)} s")
    for note in meta.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", "## Batch video (process_video)", ""]
    head = ["impl / backend", "scenario", "F", "ms/frame", "p50 ms", "p95 ms", "fps", "allocs/frame",
            "peak VRAM GB", "first call s", "speed-up vs reference", "error"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        lines.append("| " + " | ".join([
            impl_label(r), r["scenario_title"], str(r["F"]), fmt(r["ms_per_frame"]), fmt(r["p50_ms"]),
            fmt(r["p95_ms"]), fmt(r["fps"], 1), fmt(r["allocs_per_frame"], 1), fmt(r["peak_vram_gb"]),
            fmt(r["first_call_s"]), (fmt(r["speedup_vs_ref"]) + "x") if r["speedup_vs_ref"] else "-",
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
            impl_label(r), r["scenario_title"], str(r["F"]), fmt(r["realtime_p50_ms"]), fmt(r["realtime_p95_ms"]),
            fmt(r["realtime_overhead_ms"]),
            f"{fmt(r['prompt_cached_ms'])} ({fmt(r['prompt_cached_ratio'])}x)" if r["prompt_cached_ms"] else "-",
            f"{fmt(r['prompt_new_ms'])} ({fmt(r['prompt_new_ratio'])}x)" if r["prompt_new_ms"] else "-",
            fmt(r["prompt_new_allocs"], 0),
            " / ".join(f"{fmt(r[k])}x" if r[k] is not None else "-"
                       for k in ("batch_prompt_change_ratio", "batch_seed_change_ratio")),
            " / ".join(fmt(r[k]) for k in ("encoder_calls_identical", "encoder_calls_window", "encoder_calls_new")),
            fmt(r["video_fixed_ms"], 1), fmt(r["output_finite"]),
            f"{fmt(r['ref_max_abs_diff'], 4)} / {fmt(r['ref_mean_abs_diff'], 4)}"
            if r["ref_max_abs_diff"] is not None else "-",
        ]) + " |")
    xl_refs = [r for r in rows if r["impl"] == XL_REFERENCE_NAME and r["ref_unet_calls_per_call"] is not None]
    if xl_refs:
        lines += ["", f"## {XL_REFERENCE_NAME}: what each call ran", ""]
        head = ["scenario", "F", "UNet calls per call", "UNet rows per frame", "output per call", "attention"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in xl_refs:
            lines.append("| " + " | ".join([
                r["scenario_title"], str(r["F"]), fmt(r["ref_unet_calls_per_call"]),
                fmt(r["ref_unet_rows_per_frame"]), "x".join(map(str, r["ref_output_shape"] or [])) or "-",
                r["ref_attention"] or "-",
            ]) + " |")
    lines += render_targets(meta, rows)
    lines += ["", "## What the numbers are", ""]
    lines += [f"- **{k}**: {v}" for k, v in METHODS.items()]
    return "\n".join(lines) + "\n"


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_outputs(out_dir: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = render_markdown(meta, rows)
    md_path, json_path = out_dir / "bench.md", out_dir / "bench.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json_safe({"meta": meta, "methods": METHODS, "rows": rows}), indent=2,
                              default=str), encoding="utf-8")
    os.replace(tmp, json_path)
    md_path.write_text(md, encoding="utf-8")
    return md_path, json_path


def fill_speedups(rows: list[dict[str, Any]]) -> None:
    """Each of our rows' speed-up over its scenario's reference row (``Scenario.base``) of the same run."""
    ref = {r["scenario"]: r["ms_per_frame"] for r in rows if r["impl"] in REFERENCE_NAMES and r["ms_per_frame"]}
    for r in rows:
        base = SCENARIOS[r["scenario"]].base
        if r["impl"] == "streamrt" and r["ms_per_frame"] and base in ref:
            r["speedup_vs_ref"] = ref[base] / r["ms_per_frame"]
        elif r["impl"] in REFERENCE_NAMES and r["ms_per_frame"]:
            r["speedup_vs_ref"] = 1.0

