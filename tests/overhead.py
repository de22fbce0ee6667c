"""StreamRT's per-execution node overhead on the real ComfyUI server: the realtime graph against a trivial one.

Used by ``scripts/node_overhead.py`` (the measurement recorded in BENCHMARKS.md) and
``tests/test_overhead_e2e.py`` (a short run in CI). The server runs this pack and the measurement-only pack
``tests/overhead_probe`` (a passthrough node, and timers / counters installed on request).

Graphs, each with the same 64x64 image in and out and the same sink, queued one after the other (a prompt is
queued when the previous one finished, as the sampler's Stream button re-queues), timed on the client from
``POST /prompt`` to the websocket's end-of-prompt event (``executing`` with ``node: None``), the same way for
every graph:

* ``trivial``: LoadImage -> OverheadPassthrough (classic API, IS_CHANGED NaN) -> PreviewImage. ComfyUI's
  ceiling for a graph that runs one node and the sink per execution;
* ``trivial_v3``: the same with a V3 passthrough (what any V3 node costs ComfyUI; for reference);
* ``realtime``: LoadImage -> Load Stream Pipeline -> Stream Sampler -> PreviewImage (the webcam graph).

LoadImage and the loader stay cached; the always-running node and PreviewImage execute every time, in every
graph. The stream step is timed inside the server around ``Stream.step`` (the probe's ``step`` timer), so
everything else the sampler does per execution counts as overhead:
``overhead = median(realtime wall - its step) - median(trivial wall)`` (each realtime execution minus its own
step, so the step's noise, large on a CPU, cancels; the difference of the three medians is reported too).
Rounds alternate the graphs (A B C, C B A, ...) so drift on a shared machine falls on all of them alike;
PreviewImage's files and the history are cleared between blocks (ComfyUI lists the temp folder at every save).
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from comfy_harness import ComfyServer, ExecutionFailed, WSCollector
from e2e_helpers import SAMPLER_DEFAULTS

PROBE_DIR = Path(__file__).resolve().parent / "overhead_probe"
PROBE_PACK = "streamrt_probe"
SINK = "PreviewImage"
GRAPHS = ("trivial", "trivial_v3", "realtime")


def sampler_inputs(acceleration: str = "eager", **overrides) -> dict:
    """The Stream Sampler's widget inputs for the measurement: the e2e tests' inputs
    (:data:`e2e_helpers.SAMPLER_DEFAULTS`) with this acceleration. The one place to change when the sampler's
    inputs change."""
    return {**SAMPLER_DEFAULTS, "acceleration": acceleration, **overrides}


def build_graphs(prefix: str, image: str, model: str, taesd: str, acceleration: str) -> dict[str, dict]:
    """API-format prompts of the three graphs (node ids prefixed, so the sampler's stream is this run's own)."""
    load = {"class_type": "LoadImage", "inputs": {"image": image}}
    sink = {"class_type": SINK, "inputs": {"images": [f"{prefix}x", 0]}}
    graphs = {
        "trivial": {f"{prefix}img": load, f"{prefix}x": {"class_type": "OverheadPassthrough",
                                                           "inputs": {"image": [f"{prefix}img", 0]}},
                    f"{prefix}sink": sink},
        "trivial_v3": {f"{prefix}img": load, f"{prefix}x": {"class_type": "OverheadPassthroughV3",
                                                              "inputs": {"image": [f"{prefix}img", 0]}},
                       f"{prefix}sink": sink},
        "realtime": {
            f"{prefix}img": load,
            f"{prefix}load": {"class_type": "StreamRTLoadPipeline",
                              "inputs": {"model": model, "taesd": taesd, "dtype": "auto", "device": "auto"}},
            f"{prefix}x": {"class_type": "StreamRTSampler",
                           "inputs": {"pipeline": [f"{prefix}load", 0], "image": [f"{prefix}img", 0],
                                      **sampler_inputs(acceleration)}},
            f"{prefix}sink": sink},
    }
    return {name: {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in g.items()}
            for name, g in graphs.items()}


def write_frame(server: ComfyServer, size: int) -> str:
    """A ``size`` x ``size`` frame of noise in the server's input folder; its LoadImage name. Noise, because the
    tiny random model's output is noise-like, and PreviewImage's PNG encoding costs more for noise than for a
    smooth picture: with noise in both graphs the sink costs the same in both."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return server.write_input_image(pixels, name=f"overhead_{uuid.uuid4().hex[:8]}.png")


# ---- the probe ------------------------------------------------------------------------------------------
def probe_install(server: ComfyServer, *what: str) -> None:
    server.post("/streamrt_probe/install", {"what": list(what), "pack": "StreamRT"}).raise_for_status()


def probe_reset(server: ComfyServer) -> None:
    server.post("/streamrt_probe/reset", {}).raise_for_status()


def probe_stats(server: ComfyServer, dump: str | None = None) -> dict:
    """The probe's timers, counts and cProfile texts (``dump``: a folder to write the cProfiles into as well)."""
    r = server.get("/streamrt_probe/stats", params={"dump": dump} if dump else None)
    r.raise_for_status()
    return r.json()


# ---- one execution --------------------------------------------------------------------------------------
def run_once(server: ComfyServer, ws: WSCollector, prompt: dict, timeout: float = 600.0) -> tuple[float, list]:
    """Queue ``prompt``, wait for its end event; (wall seconds, the ``streamrt.status`` events it sent)."""
    ws.clear()
    start = time.perf_counter()
    prompt_id = server.queue(prompt, client_id=ws.client_id)
    ws.wait_prompt_done(prompt_id, timeout=timeout)
    seconds = time.perf_counter() - start
    errors = ws.of_type("execution_error", prompt_id)
    if errors:
        e = errors[0]
        raise ExecutionFailed(e.get("exception_message", "").strip(), e.get("node_id"), e.get("node_type"),
                              e.get("exception_type"), e.get("traceback"))
    return seconds, ws.of_type("streamrt.status")


def tidy(server: ComfyServer) -> None:
    """Between blocks (the queue is idle): drop PreviewImage's files and the history."""
    if server.temp_dir.is_dir():
        for path in server.temp_dir.iterdir():
            if path.is_file():
                path.unlink()
    server.post("/history", {"clear": True}).raise_for_status()


# ---- the measurement ------------------------------------------------------------------------------------
def _ms(values: list[float], q: float | None = None) -> float | None:
    if not values:
        return None
    if q is None:
        return 1000.0 * statistics.median(values)
    return 1000.0 * float(np.quantile(np.asarray(values), q))


def server_cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU seconds run, seconds spent waiting for a CPU) of every thread of a process so far (Linux
    ``/proc/<pid>/task/*/schedstat``, nanosecond counters)."""
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:  # the thread ended meanwhile
            continue
        run, wait = run + int(fields[0]), wait + int(fields[1])
    return run / 1e9, wait / 1e9


@dataclass
class OverheadResult:
    """What :func:`measure` saw.

    ``walls``: per-execution wall seconds by graph; ``steps`` / ``step_cpus``: for each realtime execution (same
    order) its stream step's wall and thread CPU seconds; ``status_seconds``: the sampler's own ``seconds``;
    ``rounds``: per round and graph the medians (ms) and the server's CPU and run-queue wait per execution (ms).
    """

    walls: dict[str, list[float]] = field(default_factory=dict)
    steps: list[float] = field(default_factory=list)
    step_cpus: list[float] = field(default_factory=list)
    status_seconds: list[float] = field(default_factory=list)
    rounds: list[dict[str, float]] = field(default_factory=list)

    def median_ms(self, graph: str) -> float | None:
        return _ms(self.walls.get(graph, []))

    @property
    def step_ms(self) -> float | None:
        return _ms(self.steps)

    @property
    def beside_step(self) -> list[float]:
        """Each realtime execution's wall time minus its own stream step."""
        return [w - s for w, s in zip(self.walls.get("realtime", []), self.steps, strict=True)]

    @property
    def overhead_ms(self) -> float | None:
        """median(realtime wall - its step) - median(trivial wall), in ms: the step's own noise cancels within
        each execution."""
        if not self.steps or not self.walls.get("trivial"):
            return None
        return _ms(self.beside_step) - self.median_ms("trivial")

    @property
    def overhead_of_medians_ms(self) -> float | None:
        """median(realtime) - median(trivial) - median(step): the same from three separate medians (noisier)."""
        parts = (self.median_ms("realtime"), self.median_ms("trivial"), self.step_ms)
        return None if None in parts else parts[0] - parts[1] - parts[2]

    def _round_values(self, key: str) -> list[float]:
        return [r[key] for r in self.rounds if r.get(key) is not None]

    def summary(self) -> dict:
        graphs = {}
        for name, v in self.walls.items():
            if v:
                graphs[name] = {"executions": len(v), "median_ms": _ms(v), "p10_ms": _ms(v, 0.1),
                                "p90_ms": _ms(v, 0.9), "mean_ms": 1000.0 * statistics.fmean(v),
                                "server_cpu_ms": _median(self._round_values(f"{name}_cpu")),
                                "server_wait_ms": _median(self._round_values(f"{name}_wait"))}
        return {
            "graphs": graphs,
            "step": {"executions": len(self.steps), "median_ms": self.step_ms, "p10_ms": _ms(self.steps, 0.1),
                     "p90_ms": _ms(self.steps, 0.9), "cpu_median_ms": _ms(self.step_cpus)},
            "realtime_minus_step": {"median_ms": _ms(self.beside_step), "p10_ms": _ms(self.beside_step, 0.1),
                                    "p90_ms": _ms(self.beside_step, 0.9)},
            "sampler_status_seconds_median_ms": _ms(self.status_seconds),
            "overhead_ms": self.overhead_ms,
            "overhead_of_medians_ms": self.overhead_of_medians_ms,
            "overhead_per_round_ms": _spread(self._round_values("overhead")),
            "overhead_server_cpu_ms": _median(self._round_values("overhead_cpu")),
            "overhead_server_cpu_per_round_ms": _spread(self._round_values("overhead_cpu")),
            "rounds": self.rounds,
        }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _spread(values: list[float]) -> dict:
    return {"median": _median(values), "min": min(values, default=None), "max": max(values, default=None)}


def measure(server: ComfyServer, graphs: dict[str, dict], *, rounds: int, per_round: int, warmup: int = 20,
            log: Callable[[str], None] | None = None) -> OverheadResult:
    """Alternating rounds of ``per_round`` executions of every graph (after ``warmup`` of each, not counted).

    Besides the wall times, each block of executions records the server's CPU time per execution (all its
    threads), which other processes on the machine do not inflate the way they inflate wall time; with the
    server's torch on one thread the step's CPU time is all in the thread that ran it, so
    ``overhead_cpu = (cpu(realtime) - cpu(step)) - cpu(trivial)`` per execution is the same difference in
    CPU time. The probe's ``step`` timer must be installed (:func:`probe_install`).
    """
    result = OverheadResult(walls={name: [] for name in graphs})
    names = list(graphs)
    pid = server.proc.pid
    with server.websocket() as ws:
        for name in names:
            for _ in range(warmup):
                run_once(server, ws, graphs[name])
        tidy(server)
        for r in range(rounds):
            row: dict[str, float] = {}
            beside: list[float] = []
            for name in names if r % 2 == 0 else reversed(names):
                probe_reset(server)
                walls = []
                cpu0, wait0 = server_cpu_seconds(pid)
                for _ in range(per_round):
                    seconds, status = run_once(server, ws, graphs[name])
                    walls.append(seconds)
                    result.status_seconds.extend(s["seconds"] for s in status)
                cpu1, wait1 = server_cpu_seconds(pid)
                result.walls[name].extend(walls)
                row[name] = _ms(walls)
                row[f"{name}_cpu"] = 1000.0 * (cpu1 - cpu0) / per_round
                row[f"{name}_wait"] = 1000.0 * (wait1 - wait0) / per_round
                if name == "realtime":
                    timers = probe_stats(server)["timers"]
                    steps, step_cpus = timers.get("step", []), timers.get("step_cpu", [])
                    if len(steps) != per_round:
                        raise AssertionError(f"{len(steps)} stream steps timed for {per_round} executions")
                    result.steps.extend(steps)
                    result.step_cpus.extend(step_cpus)
                    row["step"] = _ms(steps)
                    row["step_cpu"] = 1000.0 * sum(step_cpus) / per_round
                    beside = [w - s for w, s in zip(walls, steps, strict=True)]
                tidy(server)
            if beside and "trivial" in row:
                row["overhead"] = _ms(beside) - row["trivial"]
                row["overhead_cpu"] = row["realtime_cpu"] - row["step_cpu"] - row["trivial_cpu"]
            result.rounds.append(row)
            if log is not None:
                log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()) + " (ms)")
    return result


def per_execution(server: ComfyServer, prompt: dict, executions: int) -> list[dict]:
    """Run ``prompt`` ``executions`` times, reading the probe's timers and counters after each one:
    ``[{"timers": {name: [seconds...]}, "counts": {...}}, ...]`` (the probe's timers / counts installed)."""
    out = []
    with server.websocket() as ws:
        for _ in range(executions):
            probe_reset(server)
            run_once(server, ws, prompt)
            out.append(probe_stats(server))
    tidy(server)
    return out


#: derived per-execution quantities of the breakdown: name -> (timer, timer subtracted from it)
DERIVED = {
    "sampler.execute - step": ("sampler.execute", "step"),
    "sessions.run - step": ("sessions.run", "step"),
    "comfy.node:StreamRTSampler - step": ("comfy.node:StreamRTSampler", "step"),
    "comfy.execute_prompt - step": ("comfy.execute_prompt", "step"),
}


def breakdown(records: list[dict]) -> dict[str, dict]:
    """Per timer: calls per execution and the median over executions of its summed ms per execution; and the
    :data:`DERIVED` differences, taken within each execution before the median."""
    names = sorted({k for r in records for k in r["timers"]})
    sums = [{name: sum(r["timers"].get(name, [])) for name in names} for r in records]
    table = {}
    for name in names:
        calls = [len(r["timers"].get(name, [])) for r in records]
        table[name] = {"calls": statistics.median(calls),
                       "median_ms": 1000.0 * statistics.median(s[name] for s in sums)}
    for name, (whole, part) in DERIVED.items():
        if whole in names and part in names:
            table[name] = {"calls": None, "median_ms": 1000.0 * statistics.median(s[whole] - s[part] for s in sums)}
    return table


def pack_calls(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per counted function: calls from the pack per execution, by call site (the mean over executions)."""
    totals: dict[str, dict[str, float]] = {}
    for r in records:
        for label, sites in r["counts"].items():
            for site, n in sites.items():
                totals.setdefault(label, {}).setdefault(site, 0.0)
                totals[label][site] += n / len(records)
    return totals
