"""The benchmark command on a CPU: tiny random models, 64x64, a few frames, eager only.

The numbers mean nothing on a CPU; these tests check that ``python -m streamrt.bench`` runs end to end,
writes its markdown and JSON, and that the JSON has one row per scenario with numeric fields. When the
StreamDiffusion 0.1.1 wheel is in ``.whl/``, a second run puts it on the path (a pure-Python wheel
imports as a zip) and checks that our eager stream and StreamDiffusion give the same frames.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamrt import bench
from streamrt.bench.common import median, new_row, percentile
from streamrt.bench.report import json_safe, render_markdown

REPO_ROOT = Path(__file__).resolve().parent.parent
SD_WHEEL = REPO_ROOT / ".whl" / "streamdiffusion-0.1.1-py3-none-any.whl"
SMOKE = ["--device", "cpu", "--preset", "tiny", "--width", "64", "--height", "64", "--accelerations", "eager"]
NUMERIC = ("ms_per_frame", "p50_ms", "p95_ms", "fps", "first_call_s", "realtime_p50_ms", "realtime_p95_ms",
           "seconds")


def _run_bench(out: Path, *extra: str, pythonpath: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + (pythonpath or [])
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [sys.executable, "-m", "streamrt.bench", *SMOKE, "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_cpu_smoke_writes_rows_with_numbers(tmp_path):
    out = tmp_path / "bench"
    proc = _run_bench(out, "--frames", "8", "--skip-reference")
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    data = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    meta, rows = data["meta"], data["rows"]
    assert meta["device"] == "cpu" and meta["preset"] == "tiny" and meta["frames"] == 8
    assert meta["versions"]["torch"]
    assert {r["scenario"] for r in rows} == {"a", "b", "a4", "bkv"}
    for row in rows:
        where = f"row {row['impl']} {row['backend']} {row['scenario']}"
        assert row["impl"] == "streamrt" and row["backend"] == "eager", where
        assert row["error"] is None, f"{where}: {row['error']}"
        for key in NUMERIC:
            assert _is_number(row[key]) and row[key] > 0, f"{where}: {key} = {row[key]!r}"
        assert row["p50_ms"] <= row["p95_ms"], where
        assert row["F"] == (4 if row["scenario"] == "a4" else 1), where
        assert row["frames"] == 8, where
        assert row["output_finite"] is True, where
        # an unchanged prompt and a cached one never reach the text encoder; each new prompt does once
        assert row["encoder_calls_identical"] == 0 and row["encoder_calls_window"] == 0, where
        assert row["encoder_calls_new"] == meta["windows"]["prompt_trials"], where
        assert row["allocs_per_frame"] is None and row["peak_vram_gb"] is None, where  # CUDA only
        assert row["speedup_vs_ref"] is None, where  # no reference rows in this run

    md = (out / "bench.md").read_text(encoding="utf-8")
    assert "| impl / backend | scenario | F | ms/frame" in md
    assert md.count("| streamrt eager |") == 8  # four rows (a, b, a4, bkv) in each of the two tables
    assert "| streamrt eager |" in proc.stdout  # the table is printed too


def _streamdiffusion_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("streamdiffusion") is not None


@pytest.mark.skipif(not (_streamdiffusion_installed() or SD_WHEEL.is_file()),
                    reason="streamdiffusion 0.1.1 is neither installed (scripts/setup.sh installs it) nor in .whl/")
def test_cpu_smoke_with_reference_matches_streamdiffusion(tmp_path):
    out = tmp_path / "bench_ref"
    path = [] if _streamdiffusion_installed() else [str(SD_WHEEL)]
    proc = _run_bench(out, "--frames", "4", "--scenarios", "a,b", pythonpath=path)
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = json.loads((out / "bench.json").read_text(encoding="utf-8"))["rows"]
    refs = [r for r in rows if r["impl"] == bench.REFERENCE_NAME]
    ours = [r for r in rows if r["impl"] == "streamrt"]
    assert {r["scenario"] for r in refs} == {"a", "b"} and {r["scenario"] for r in ours} == {"a", "b"}
    for r in refs:
        assert r["error"] is None, r["error"]
        assert _is_number(r["ms_per_frame"]) and r["ms_per_frame"] > 0
        # fp32 on a CPU, same weights, same seed, same frames: the same stream math
        assert r["ref_max_abs_diff"] is not None and r["ref_max_abs_diff"] < 1e-4, r["ref_max_abs_diff"]
    for r in ours:
        assert _is_number(r["speedup_vs_ref"]) and r["speedup_vs_ref"] > 0


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--accelerations", "eager,tensorrt"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--scenarios", "z"])
    args = bench.parse_args(["--accelerations", "compile, eager", "--scenarios", "a4"])
    assert args.accelerations == ["compile", "eager"] and args.scenarios == ["a4"]
    assert bench.parse_args(["--backends", "cuda_graph"]).accelerations == ["cuda_graph"]  # the old flag name


def test_percentiles_and_table_rendering():
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([1.0, 2.0]) == 1.5
    assert percentile(list(map(float, range(1, 101))), 95) == 95.0
    assert median([]) is None and percentile([], 50) is None
    row = new_row("streamrt", "cuda_graph", bench.SCENARIOS["b"], 300)
    row["error"] = "RuntimeError: boom | with a pipe"
    meta = {"date": "today", "device": "cuda", "device_name": "GPU", "dtype": "float16", "preset": "sd-turbo",
            "width": 512, "height": 512, "frames": 300, "versions": {"torch": "x"}, "notes": ["n"]}
    md = render_markdown(meta, [row])
    assert "RuntimeError: boom / with a pipe" in md  # the error is in the table, its pipe escaped
    safe = json_safe({"x": float("nan"), "y": [float("inf"), 1.0]})
    assert json.dumps(safe) == '{"x": null, "y": [null, 1.0]}'
