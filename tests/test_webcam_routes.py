"""``scripts/webcam_routes.py`` (the webcam routes' cost per execution, recorded in BENCHMARKS.md) runs end to end
on the real ComfyUI server: both routes hand their frames over and run the graph, with and without a sampler, and
the posting route is the faster one by a margin no machine's noise explains (it skips the temp file, its hash and
the PNG decode, milliseconds at 256x256). The numbers themselves are the script's; here only a short run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from comfy_harness import REPO_ROOT

pytestmark = pytest.mark.e2e

sys.path.insert(0, str(REPO_ROOT / "scripts"))

import webcam_routes  # noqa: E402


@pytest.mark.parametrize("sampler", [False, True], ids=["frame-only", "with-sampler"])
def test_the_routes_script_measures_both_routes(tmp_path: Path, sampler: bool) -> None:
    out = tmp_path / "routes.json"
    args = ["--size", "256" if not sampler else "64", "--frames", "4", "--rounds", "2", "--per-round", "6",
            "--warmup", "2", "--work", str(tmp_path / "work"), "--json", str(out)]
    assert webcam_routes.main(args + (["--sampler"] if sampler else [])) == 0
    result = json.loads(out.read_text())
    assert result["sampler"] is sampler and set(result["routes"]) == {"upload", "post"}
    assert all(row["median_ms"] > 0 for row in result["routes"].values())
    if not sampler:
        assert result["routes"]["post"]["median_ms"] < result["routes"]["upload"]["median_ms"]
