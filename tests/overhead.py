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
* ``shaped``: LoadImage -> Load Stream Pipeline -> a node with Stream Sampler's schema and a passthrough body ->
  PreviewImage: what ComfyUI spends on the realtime graph's shape (validating, hashing and passing the sampler's
  inputs, the loader's validation and cache lookup), without the sampler's own ``execute``;
* ``realtime``: LoadImage -> Load Stream Pipeline -> Stream Sampler -> PreviewImage (the webcam graph).

LoadImage and the loader stay cached; the always-running node and PreviewImage execute every time, in every
graph. The stream step is timed inside the server around ``Stream.step`` (the probe's ``step`` timer), so
everything else the sampler does per execution counts as overhead:
``overhead = median(realtime wall - its step) - median(trivial wall)`` (each realtime execution minus its own
step, so the step's noise, large on a CPU, cancels; the difference of the three medians is reported too). It
splits into ``shaped - trivial`` (what ComfyUI spends on the graph's shape) and ``realtime - step - shaped``
(what the sampler's ``execute`` adds around its step). The same differences are taken in the server's CPU time
per execution, which other processes on a shared machine inflate far less than wall time.

Rounds alternate the graphs (A B C D, D C B A, ...) so drift on a shared machine falls on all of them alike.
ComfyUI's default cache keeps the outputs of the current graph only, so the first execution of a block runs
LoadImage and the loader again: it is not counted. PreviewImage's files and the history are cleared between
blocks (ComfyUI lists the temp folder at every save).
"""

from __future__ import annotations

import os
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
GRAPHS = ("trivial", "trivial_v3", "shaped", "realtime")


def sampler_inputs(acceleration: str = "eager", **overrides) -> dict:
    """The Stream Sampler's widget inputs for the measurement: the e2e tests' inputs
    (:data:`e2e_helpers.SAMPLER_DEFAULTS`) with this acceleration. The one place to change when the sampler's
    inputs change."""
    return {**SAMPLER_DEFAULTS, "acceleration": acceleration, **overrides}


def build_graphs(prefix: str, image: str, model: str, taesd: str, acceleration: str) -> dict[str, dict]:
    """API-format prompts of the graphs (node ids prefixed, so the sampler's stream is this run's own)."""
    load = {"class_type": "LoadImage", "inputs": {"image": image}}
    sink = {"class_type": SINK, "inputs": {"images": [f"{prefix}x", 0]}}
    loader = {"class_type": "StreamRTLoadPipeline",
              "inputs": {"model": model, "taesd": taesd, "dtype": "auto", "device": "auto"}}
    sampler_like = {"pipeline": [f"{prefix}load", 0], "image": [f"{prefix}img", 0], **sampler_inputs(acceleration)}
    graphs = {
        "trivial": {f"{prefix}img": load, f"{prefix}x": {"class_type": "OverheadPassthrough",
                                                           "inputs": {"image": [f"{prefix}img", 0]}},
                    f"{prefix}sink": sink},
        "trivial_v3": {f"{prefix}img": load, f"{prefix}x": {"class_type": "OverheadPassthroughV3",
                                                              "inputs": {"image": [f"{prefix}img", 0]}},
                       f"{prefix}sink": sink},
        "shaped": {f"{prefix}img": load, f"{prefix}load": loader,
                   f"{prefix}x": {"class_type": "OverheadShapedSampler", "inputs": sampler_like},
                   f"{prefix}sink": sink},
        "realtime": {f"{prefix}img": load, f"{prefix}load": loader,
                     f"{prefix}x": {"class_type": "StreamRTSampler", "inputs": sampler_like},
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


def server_cpu_seconds(pid: int) -> float:
    """CPU seconds every live thread of a process has run so far (Linux ``/proc/<pid>/task/*/schedstat``, a
    nanosecond counter; the process-wide counter in ``/proc/<pid>/stat`` only counts 10 ms ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split(None, 1)[0])
        except (OSError, ValueError):  # the thread ended meanwhile
            continue
    return total / 1e9


@dataclass
class OverheadResult:
    """What :func:`measure` saw, one entry per execution.

    ``walls`` / ``cpus``: by graph, each execution's wall time on the client and the server's CPU time (all
    threads, read between executions); ``steps`` / ``step_cpus``: for each realtime execution (same order) its
    stream step's wall time and the CPU time of the thread that ran it; ``status_seconds``: the sampler's own
    ``seconds``; ``rounds``: per round the medians (ms).
    """

    walls: dict[str, list[float]] = field(default_factory=dict)
    cpus: dict[str, list[float]] = field(default_factory=dict)
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
    def cpu_beside_step(self) -> list[float]:
        """Each realtime execution's server CPU time minus its own stream step's."""
        return [c - s for c, s in zip(self.cpus.get("realtime", []), self.step_cpus, strict=True)]

    @property
    def overhead_ms(self) -> float | None:
        """median(realtime wall - its step) - median(trivial wall), in ms: the step's own noise cancels within
        each execution."""
        if not self.steps or not self.walls.get("trivial"):
            return None
        return _ms(self.beside_step) - self.median_ms("trivial")

    @property
    def overhead_cpu_ms(self) -> float | None:
        """The same in server CPU time: median(realtime CPU - its step's CPU) - median(trivial CPU), in ms."""
        if not self.step_cpus or not self.cpus.get("trivial"):
            return None
        return _ms(self.cpu_beside_step) - _ms(self.cpus["trivial"])

    @property
    def shape_ms(self) -> float | None:
        """median(shaped) - median(trivial): what ComfyUI spends on the realtime graph's shape (wall, ms)."""
        if not self.walls.get("shaped") or not self.walls.get("trivial"):
            return None
        return self.median_ms("shaped") - self.median_ms("trivial")

    @property
    def execute_glue_ms(self) -> float | None:
        """median(realtime - its step) - median(shaped): what the sampler's ``execute`` adds around the step."""
        if not self.steps or not self.walls.get("shaped"):
            return None
        return _ms(self.beside_step) - self.median_ms("shaped")

    @property
    def overhead_of_medians_ms(self) -> float | None:
        """median(realtime) - median(trivial) - median(step): the same from three separate medians (noisier)."""
        parts = (self.median_ms("realtime"), self.median_ms("trivial"), self.step_ms)
        return None if None in parts else parts[0] - parts[1] - parts[2]

    def summary(self) -> dict:
        graphs = {name: {"executions": len(v), "median_ms": _ms(v), "p10_ms": _ms(v, 0.1), "p90_ms": _ms(v, 0.9),
                         "mean_ms": 1000.0 * statistics.fmean(v), "server_cpu_median_ms": _ms(self.cpus[name])}
                  for name, v in self.walls.items() if v}
        return {
            "graphs": graphs,
            "step": {"executions": len(self.steps), "median_ms": self.step_ms, "p10_ms": _ms(self.steps, 0.1),
                     "p90_ms": _ms(self.steps, 0.9), "cpu_median_ms": _ms(self.step_cpus)},
            "realtime_minus_step": {"median_ms": _ms(self.beside_step), "p10_ms": _ms(self.beside_step, 0.1),
                                    "p90_ms": _ms(self.beside_step, 0.9),
                                    "server_cpu_median_ms": _ms(self.cpu_beside_step)},
            "sampler_status_seconds_median_ms": _ms(self.status_seconds),
            "overhead_ms": self.overhead_ms,
            "shape_ms": self.shape_ms,
            "execute_glue_ms": self.execute_glue_ms,
            "overhead_of_medians_ms": self.overhead_of_medians_ms,
            "overhead_per_round_ms": _spread([r["overhead"] for r in self.rounds if "overhead" in r]),
            "overhead_server_cpu_ms": self.overhead_cpu_ms,
            "overhead_server_cpu_per_round_ms": _spread([r["overhead_cpu"] for r in self.rounds
                                                         if "overhead_cpu" in r]),
            "shape_server_cpu_ms": _ms(self.cpus.get("shaped", [])) - _ms(self.cpus["trivial"])
            if self.cpus.get("shaped") and self.cpus.get("trivial") else None,
            "execute_glue_server_cpu_ms": _ms(self.cpu_beside_step) - _ms(self.cpus["shaped"])
            if self.cpus.get("shaped") and self.step_cpus else None,
            "by_round": self.rounds,
        }


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values) if values else None, "min": min(values, default=None),
            "max": max(values, default=None)}


def measure(server: ComfyServer, graphs: dict[str, dict], *, rounds: int, per_round: int, warmup: int = 20,
            log: Callable[[str], None] | None = None) -> OverheadResult:
    """Alternating rounds of ``per_round`` executions of every graph (after ``warmup`` of each, and one at the
    start of every block, not counted).

    Besides each execution's wall time, the server's CPU time over the execution is read (between executions,
    outside the timed window). Other processes on the machine inflate wall time (a thread waits for a CPU)
    much more than CPU time, so ``overhead_cpu = median(CPU(realtime) - CPU(step)) - median(CPU(trivial))``
    says what the glue costs on a busy machine too. It is exact with the server's torch on one thread (the
    step's CPU time then is all in the thread that ran it). The probe's ``step`` timer must be installed
    (:func:`probe_install`).
    """
    result = OverheadResult(walls={name: [] for name in graphs}, cpus={name: [] for name in graphs})
    names = list(graphs)
    pid = server.proc.pid
    with server.websocket() as ws:
        for name in names:
            for _ in range(warmup):
                run_once(server, ws, graphs[name])
        tidy(server)
        for r in range(rounds):
            row: dict[str, float] = {}
            for name in names if r % 2 == 0 else reversed(names):
                run_once(server, ws, graphs[name])  # refills ComfyUI's cache for this graph: not counted
                probe_reset(server)
                walls, cpus = [], []
                cpu = server_cpu_seconds(pid)
                for _ in range(per_round):
                    seconds, status = run_once(server, ws, graphs[name])
                    before, cpu = cpu, server_cpu_seconds(pid)
                    walls.append(seconds)
                    cpus.append(cpu - before)
                    result.status_seconds.extend(s["seconds"] for s in status)
                result.walls[name].extend(walls)
                result.cpus[name].extend(cpus)
                row[name], row[f"{name}_cpu"] = _ms(walls), _ms(cpus)
                if name == "realtime":
                    timers = probe_stats(server)["timers"]
                    steps, step_cpus = timers.get("step", []), timers.get("step_cpu", [])
                    if len(steps) != per_round:
                        raise AssertionError(f"{len(steps)} stream steps timed for {per_round} executions")
                    result.steps.extend(steps)
                    result.step_cpus.extend(step_cpus)
                    row["step"], row["step_cpu"] = _ms(steps), _ms(step_cpus)
                    row["beside_step"] = _ms([w - s for w, s in zip(walls, steps, strict=True)])
                    row["beside_step_cpu"] = _ms([c - s for c, s in zip(cpus, step_cpus, strict=True)])
                tidy(server)
            if "beside_step" in row and "trivial" in row:
                row["overhead"] = row["beside_step"] - row["trivial"]
                row["overhead_cpu"] = row["beside_step_cpu"] - row["trivial_cpu"]
                if "shaped" in row:
                    row["shape"] = row["shaped"] - row["trivial"]
                    row["shape_cpu"] = row["shaped_cpu"] - row["trivial_cpu"]
                    row["glue"] = row["beside_step"] - row["shaped"]
                    row["glue_cpu"] = row["beside_step_cpu"] - row["shaped_cpu"]
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
    "sampler.execute_cpu - step_cpu": ("sampler.execute_cpu", "step_cpu"),
    "sessions.run - step": ("sessions.run", "step"),
    "sessions.run_cpu - step_cpu": ("sessions.run_cpu", "step_cpu"),
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
