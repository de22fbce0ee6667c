"""StreamRT's per-execution node overhead on the real ComfyUI server (issue #13), in CI.

The server runs this pack beside the measurement-only pack ``tests/overhead_probe`` (``tests/overhead.py`` says
how the graphs are measured; ``scripts/node_overhead.py`` is the full measurement recorded in BENCHMARKS.md).

Structural assertions, which hold whatever else runs on the machine: over steady-state executions of the
realtime graph (LoadImage -> Load Stream Pipeline -> Stream Sampler -> PreviewImage) the pack's own code

- walks no folder (no ``os.scandir`` / ``os.listdir``) and stats files only to check its model listings when
  ComfyUI validates the loader (the way ComfyUI checks its own model lists), never from the sampler;
- computes no pipeline key or file fingerprint, sizes no weights and walks no parameters;
- builds no schema (ComfyUI asks for the sampler's schema five times per execution: it is built once);
- logs nothing at INFO or above (per-frame logging is at DEBUG).

The probe is first shown to fire: a fresh loader's first execution computes its key and stats its files.

Timing: the overhead (the realtime graph's time per execution minus its own stream step, minus a trivial
graph's) is measured in the server's CPU time, which other processes on a shared 2-core CI machine inflate
far less than wall time, in a few alternating rounds, and bounded in units of the trivial graph's own CPU time
per execution in the same round, since a slow or busy machine slows both (over a day of runs here the ratio
went from 0.6 to 1.4 while absolute times drifted by 1.7x). The best round must stay under 2 trivial
executions: busy moments inflate some rounds, a regression shifts every round. That bound only catches a
gross regression (several ms of new work per execution); the structural assertions above are what catch the
regressions this issue fixed. A tight wall-time bound would fail whenever the machine is busy.
"""

from __future__ import annotations

import logging
import os

import overhead
import pytest
from comfy_harness import REPO_ROOT, ComfyServer
from e2e_helpers import MODEL, SIZE, TAESD, uid

pytestmark = pytest.mark.e2e

logger = logging.getLogger(__name__)

#: the overhead in server CPU time may reach this many trivial executions' CPU time, in the best round
OVERHEAD_BOUND_TRIVIALS = 2.0
#: os.stat calls per execution the loader's listings may make at validation: 16 with this module's folders alone,
#: 35 when the whole suite's model files share the folders (the listing checks grow with the folders' entries)
LISTING_STATS_BOUND = 64
LOAD_TIME_CALLS = ("weights_nbytes", "cache_key", "file_fingerprint", "Module.parameters")


@pytest.fixture(scope="module")
def probe_server(tmp_path_factory: pytest.TempPathFactory, streamrt_models_root, e2e_tiny_models):
    """A ComfyUI server with this pack and the overhead probe; the server's torch on one thread."""
    server = ComfyServer(REPO_ROOT, tmp_path_factory.mktemp("overhead"), pack_name="StreamRT",
                         models_source=streamrt_models_root,
                         extra_packs={overhead.PROBE_PACK: overhead.PROBE_DIR},
                         env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    server.start(timeout=float(os.environ.get("STREAMRT_SERVER_START_TIMEOUT", "180")))
    try:
        yield server
    finally:
        server.stop()


def graphs_for(server: ComfyServer) -> dict[str, dict]:
    image = overhead.write_frame(server, SIZE)
    return overhead.build_graphs(uid(), image, MODEL, TAESD, "eager")


def test_no_load_time_work_per_execution(probe_server: ComfyServer):
    graphs = graphs_for(probe_server)
    overhead.probe_install(probe_server, "counts")
    first = overhead.pack_calls(overhead.per_execution(probe_server, graphs["realtime"], 1))
    # The probe fires: this loader node is new, so its first execution computes the pipeline key from the files.
    assert first.get("cache_key") and first.get("file_fingerprint"), first
    assert any("nodes/loaders.py execute" in site for site in first.get("os.stat", {})), first

    overhead.per_execution(probe_server, graphs["realtime"], 3)  # the stream is warm
    calls = overhead.pack_calls(overhead.per_execution(probe_server, graphs["realtime"], 10))
    logger.info("pack calls per steady-state execution: %s", calls)
    for label in ("os.scandir", "os.listdir", *LOAD_TIME_CALLS, "Schema built", "log"):
        assert label not in calls, (label, calls[label])
    stats = {**calls.get("os.stat", {}), **calls.get("os.lstat", {})}
    assert all(site.startswith("nodes/loaders.py define_schema -> ") for site in stats), stats
    assert sum(stats.values()) <= LISTING_STATS_BOUND, stats


def test_the_pack_schemas_classic_form_is_computed_once(probe_server: ComfyServer):
    """ComfyUI converts a V3 schema to the classic ``INPUT_TYPES`` form whenever it needs a node's inputs, several
    times per execution; the pack's schemas keep theirs (``nodes/api.py``, ``Schema``). Steady-state executions of
    the realtime graph, whose other nodes are classic ones, convert nothing, and the sampler still gets its hidden
    input (its node id, named in its status event) although ``INPUT_TYPES(include_hidden=False)`` removes
    ``hidden`` from what it returns."""
    graphs = graphs_for(probe_server)
    overhead.probe_install(probe_server, "step", "timers")
    overhead.per_execution(probe_server, graphs["realtime"], 2)  # the first executions convert each schema once
    records = overhead.per_execution(probe_server, graphs["realtime"], 5)
    assert [len(r["timers"].get("comfy.v3.get_v1_info", [])) for r in records] == [0] * 5, records[-1]["timers"]
    assert all(len(r["timers"].get("step", [])) == 1 for r in records)  # each execution stepped the stream
    sampler_id = next(k for k, v in graphs["realtime"].items() if v["class_type"] == "StreamRTSampler")
    with probe_server.websocket() as ws:
        for _ in range(2):
            _, events = overhead.run_once(probe_server, ws, graphs["realtime"])
            assert events and all(e.get("node") == sampler_id for e in events), (sampler_id, events)


def test_overhead_bound(probe_server: ComfyServer):
    graphs = graphs_for(probe_server)
    chosen = {name: graphs[name] for name in ("trivial", "shaped", "realtime")}
    overhead.probe_install(probe_server, "step")
    result = overhead.measure(probe_server, chosen, rounds=4, per_round=25, warmup=5, log=logger.info)
    summary = result.summary()
    ratios = [r["overhead_cpu"] / r["trivial_cpu"] for r in result.rounds]
    logger.info("overhead: wall %.3f ms, server CPU %.3f ms (parts %s), per round in trivial executions %s; %s",
                result.overhead_ms, result.overhead_cpu_ms, summary["parts_server_cpu_ms"],
                [round(r, 2) for r in ratios], summary["graphs"])
    assert len(result.steps["realtime"]) == len(result.walls["realtime"]) == 100
    assert min(ratios) < OVERHEAD_BOUND_TRIVIALS, (ratios, summary)
