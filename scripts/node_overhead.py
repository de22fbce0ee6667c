"""StreamRT's per-execution node overhead on the real ComfyUI server (issue #13: <= 0.5 ms).

Starts ComfyUI (on the GPU when there is one, else the CPU) with this pack, the measurement-only pack
``tests/overhead_probe`` and a tiny random-weight model, then (``tests/overhead.py`` has the details):

1. measures, in alternating rounds, the time per execution of a trivial graph (LoadImage -> a passthrough that
   runs every time -> PreviewImage) and of the realtime graph (LoadImage -> Load Stream Pipeline -> Stream
   Sampler -> PreviewImage), each prompt queued when the previous one finished and timed from ``POST /prompt``
   to its end event on the websocket, in wall time and in the server's CPU time; the stream step is timed inside
   the server around ``Stream.step`` and taken out of each execution:
   ``overhead = median(realtime - its step) - median(trivial)``; two more graphs with the realtime graph's shape
   (one with a passthrough body, one whose body only steps the sampler's stream) split it into ComfyUI's cost of
   the shape, the cost around a torch step inside a node, and the sampler's own code;
2. breaks it down, in a separate phase (timers inside the server cost about a microsecond each): ComfyUI's
   validation, cache keys and node execution, every ``define_schema`` call, the parts of the sampler's
   ``execute`` body;
3. counts what the pack's own code calls per execution (``os.stat`` / ``scandir`` / ``listdir``,
   ``weights_nbytes``, ``cache_key``, ``file_fingerprint``, ``Module.parameters``, schemas built, INFO logs), by
   call site;
4. with ``--cprofile N``: cProfile of N realtime executions (validation and execution), for attribution.

    python scripts/node_overhead.py --json bench_results/node_overhead.json
    python scripts/node_overhead.py --rounds 4 --per-round 50 --breakdown 50      # quicker

On the GPU machine (issue #17: executions per second of the webcam graph at 512² with an SD-turbo-sized model;
ComfyUI from ``scripts/gpu_comfyui.sh``, compile needs ``--disable-cuda-malloc``)::

    python scripts/node_overhead.py --preset sd-turbo --size 512 --acceleration compile --t-index-list 32 \
        --sink StreamRTPreview --server-arg=--disable-cuda-malloc

Absolute times depend on the machine and, on a shared or virtual one, drift (the gauge says how fast Python ran);
the overhead is a difference of medians measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the ComfyUI server driver and the measurement live with the tests

import overhead  # noqa: E402
from comfy_harness import ComfyServer  # noqa: E402

from streamrt.config import Acceleration  # noqa: E402

logger = logging.getLogger("streamrt.node_overhead")
TARGET_MS = 0.5
TAESD = "overhead-taesd"



def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def python_gauge_ms() -> float:
    """Median ms of a fixed pure-Python loop in this process: how fast the machine runs Python right now (a shared
    or virtual machine's speed drifts; compare runs only with similar gauges)."""
    times = []
    for _ in range(7):
        start = time.perf_counter()
        sum(range(1_000_000))
        times.append(time.perf_counter() - start)
    return 1000.0 * sorted(times)[3]


LABELS = {"trivial": "(a) trivial: LoadImage -> passthrough -> PreviewImage",
          "trivial_v3": "    the same with a V3 passthrough (reference)",
          "shaped": "    shaped: LoadImage -> Load Pipeline -> sampler's schema, passthrough -> Preview",
          "realtime": "(b) realtime: LoadImage -> Load Pipeline -> Stream Sampler -> Preview",
          "bare": "    bare: the same shape, the body only steps the sampler's stream",
          "overlapped": "(b') realtime, overlap_executions on (frames handed over one execution later)"}
PART_LABELS = {"overhead": "overhead = (b) - step - (a)",
               "shape": "  ComfyUI on the graph's shape: shaped - (a)",
               "step_in_a_node": "  a torch step inside a node, around it: bare - step - shaped",
               "sampler_glue": "  the sampler's own code around its step: (b) - bare"}


def print_report(summary: dict) -> None:
    m = summary["measurement"]
    print(f"\nMachine gauge (a fixed Python loop): {summary['python_gauge_ms_before']:.1f} ms before, "
          f"{summary['python_gauge_ms_after']:.1f} ms after")
    print(f"\nPer execution, {m['rounds']} alternating rounds x {m['per_round']} executions per graph "
          f"({summary['device']}, {summary['acceleration']}, {summary['size']}x{summary['size']}), medians in ms:")
    print(f"  {'':<80} {'wall':>8} {'p10':>8} {'p90':>8} {'CPU':>8} {'loop':>8}")
    for name, row in m["graphs"].items():
        print(f"  {LABELS.get(name, name):<80} {row['median_ms']:>8.3f} {row['p10_ms']:>8.3f} {row['p90_ms']:>8.3f} "
              f"{row['server_cpu_median_ms']:>8.3f} {row['event_loop_cpu_median_ms']:>8.3f}")
        if "step_median_ms" in row:
            print(f"  {'      its stream step (Stream.step, timed in the server)':<80} {row['step_median_ms']:>8.3f} "
                  f"{row['step_p10_ms']:>8.3f} {row['step_p90_ms']:>8.3f} {row['step_cpu_median_ms']:>8.3f}")
            print(f"  {'      each execution minus its own step':<80} {row['minus_step_median_ms']:>8.3f} {'':>8} "
                  f"{'':>8} {row['minus_step_server_cpu_median_ms']:>8.3f}")
    print("  (CPU: the server's, all threads; loop: its event-loop thread (HTTP, validation, websocket messages))")
    rates = ", ".join(f"{name} {1000.0 / row['median_ms']:.1f}" for name, row in m["graphs"].items())
    print(f"  executions per second, queued back to back (1000 / median wall ms): {rates}")
    verdict = "met" if m["overhead_ms"] <= TARGET_MS else "MISSED"
    print(f"\n  {'':<62} {'wall ms':>8} {'CPU ms':>8}")
    for part, label in PART_LABELS.items():
        wall, cpu = m["parts_ms"].get(part), m["parts_server_cpu_ms"].get(part)
        if wall is not None:
            print(f"  {label:<62} {wall:>8.3f} {cpu:>8.3f}")
    rounds, cpu_rounds = m["overhead_per_round_ms"], m["overhead_server_cpu_per_round_ms"]
    print(f"  overhead per round: wall {rounds['min']:.3f} to {rounds['max']:.3f} ms, CPU {cpu_rounds['min']:.3f} "
          f"to {cpu_rounds['max']:.3f} ms")
    print(f"  target: overhead <= {TARGET_MS} ms: {verdict}")
    print(f"  (the sampler's own 'seconds' in streamrt.status: median {m['sampler_status_seconds_median_ms']:.3f} ms)")
    if summary.get("breakdown"):
        b = summary["breakdown"]
        graphs = list(b["graphs"])
        print(f"\nBreakdown: medians over {b['executions']} executions per graph of each part's ms per execution "
              "(timers inside the server; _cpu: CPU time of the thread that ran it):")
        print(f"  {'part':<52} " + " ".join(f"{g:>9}" for g in graphs) + f" {'calls':>6}")
        for timer in sorted(set().union(*(b["graphs"][g] for g in graphs))):
            rows = [b["graphs"][g].get(timer) for g in graphs]
            calls = next(r for r in reversed(rows) if r)["calls"]
            cells = " ".join(f"{r['median_ms'] if r else float('nan'):>9.3f}" for r in rows)
            print(f"  {timer:<52} {cells} {'' if calls is None else calls:>6}")
    if summary.get("pack_calls") is not None:
        print("\nCalls from the pack's own code per realtime execution, by call site:")
        if not summary["pack_calls"]:
            print("  none")
        for label, sites in summary["pack_calls"].items():
            for site, n in sites.items():
                print(f"  {label:<18} {n:6.2f}  {site}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds (default 10)")
    parser.add_argument("--per-round", type=int, default=100, help="executions per graph per round (default 100)")
    parser.add_argument("--warmup", type=int, default=30, help="executions per graph before measuring (default 30)")
    parser.add_argument("--breakdown", type=int, default=100,
                        help="executions per graph for the timed breakdown (default 100; 0: skip it)")
    parser.add_argument("--counts", type=int, default=20,
                        help="realtime executions for the call counts (default 20; 0: skip them)")
    parser.add_argument("--cprofile", type=int, default=0, help="realtime executions under cProfile (default 0)")
    parser.add_argument("--size", type=int, default=64, help="frame size (default 64)")
    parser.add_argument("--preset", default="tiny", help="random-weight model preset (default tiny; e.g. sd-turbo)")
    parser.add_argument("--t-index-list", default=None,
                        help="the sampler's t_index_list (default: the e2e tests' 20,35)")
    parser.add_argument("--sink", default=overhead.SINK, choices=("PreviewImage", "StreamRTPreview"),
                        help="every graph's output node (default PreviewImage)")
    parser.add_argument("--source", default="LoadImage", choices=("LoadImage", "StreamRTFrameInput"),
                        help="every graph's image in (default LoadImage: a file, hashed every execution; "
                             "StreamRTFrameInput: one frame posted to Stream Frame Input, kept in memory)")
    parser.add_argument("--overlap", action="store_true",
                        help="also measure the realtime graph with Stream Settings' overlap_executions on")
    parser.add_argument("--acceleration", default=None, choices=[a.value for a in Acceleration],
                        help="the sampler's acceleration (default: auto, no settings node: eager on a CPU)")
    parser.add_argument("--server-threads", type=int, default=None,
                        help="torch / OpenMP threads of the server (OMP_NUM_THREADS). Default on a CPU: 1 (the step's "
                             "idle OpenMP workers then spin against nothing, and its CPU time is all in one thread); "
                             "on a GPU: torch's own choice. 0: torch's own choice")
    parser.add_argument("--pack", default=str(REPO),
                        help="the StreamRT checkout to mount (default: this one; e.g. an older commit exported with "
                             "git archive, to compare)")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the result here as JSON")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="one more argument for ComfyUI's main.py (repeat it)")
    parser.add_argument("--server-log", default=None, help="copy the server's log here at the end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    from streamrt.random_models import write_random_pipeline

    cuda = torch.cuda.is_available()
    acceleration = args.acceleration or "auto"
    work = Path(args.work or tempfile.mkdtemp(prefix="streamrt-overhead-"))
    models = work / "models"
    model = f"overhead-{args.preset}"
    sampler_options = {} if args.t_index_list is None else {"t_index_list": args.t_index_list}
    if not (models / "diffusers" / model / "model_index.json").is_file():
        write_random_pipeline(models / "diffusers" / model, args.preset, taesd_folder=models / "vae_approx" / TAESD)
    summary: dict = {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
        "acceleration": acceleration, "size": args.size, "model": f"{args.preset} random-weight pipeline + TAESD",
        "sink": args.sink, "source": args.source,
        "sampler_inputs": overhead.sampler_inputs(acceleration, **sampler_options),
        "target_ms": TARGET_MS,
        "python_gauge_ms_before": python_gauge_ms(),
        "command": "python scripts/node_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    env = {}
    if args.server_threads is None and not cuda:
        args.server_threads = 1
    if args.server_threads:
        env = {"OMP_NUM_THREADS": str(args.server_threads), "MKL_NUM_THREADS": str(args.server_threads)}
        summary["server_threads"] = args.server_threads
    with ComfyServer(args.pack, work / "server", pack_name="StreamRT", cpu=not cuda, models_source=models, env=env,
                     extra_packs={overhead.PROBE_PACK: overhead.PROBE_DIR}, extra_args=list(args.server_arg),
                     database_url=f"sqlite:///{work / 'server' / 'comfy.db'}") as server:
        try:
            summary["comfyui"] = server.system_stats().get("system", {}).get("comfyui_version")
            image = overhead.write_frame(server, args.size)
            graphs = overhead.build_graphs("oh", image, model, TAESD, acceleration, sink=args.sink,
                                           source=args.source, overlap=args.overlap, **sampler_options)
            overhead.probe_install(server, "step")
            result = overhead.measure(server, graphs, rounds=args.rounds, per_round=args.per_round,
                                      warmup=args.warmup, log=logger.info)
            summary["measurement"] = {"rounds": args.rounds, "per_round": args.per_round, **result.summary()}
            summary["overhead_ms"] = result.overhead_ms
            summary["target_met"] = result.overhead_ms <= TARGET_MS
            if args.breakdown:
                overhead.probe_install(server, "timers")
                summary["breakdown"] = {"executions": args.breakdown, "graphs": {
                    name: overhead.breakdown(overhead.per_execution(server, graphs[name], args.breakdown))
                    for name in ("trivial", "shaped", "realtime", "bare") + (("overlapped",) if args.overlap else ())}}
            if args.counts:
                overhead.probe_install(server, "counts")
                records = overhead.per_execution(server, graphs["realtime"], args.counts)
                summary["pack_calls"] = overhead.pack_calls(records)
            if args.cprofile:
                overhead.probe_install(server, "cprofile")
                overhead.probe_reset(server)
                with server.websocket() as ws:
                    for _ in range(args.cprofile):
                        overhead.run_once(server, ws, graphs["realtime"])
                summary["cprofile"] = overhead.probe_stats(server, dump=str(work))["cprofile"]
                logger.info("cProfile data: %s/{validate,execute}.prof", work)
        finally:
            if args.server_log:
                Path(args.server_log).write_text(server.log_tail(100000), encoding="utf-8")
    summary["python_gauge_ms_after"] = python_gauge_ms()
    print_report(summary)
    for name, text in summary.get("cprofile", {}).items():
        print(f"\ncProfile: {name}, {args.cprofile} realtime executions\n{text}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
