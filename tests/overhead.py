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
* ``realtime``: LoadImage -> Load Stream Pipeline -> Stream Sampler -> PreviewImage (the webcam graph);
* ``bare``: the same shape with a node whose body only steps the stream the realtime graph's sampler built
  (same node id): the stream step inside a ComfyUI node, without the sampler's glue around it.

LoadImage and the loader stay cached; the always-running node and PreviewImage execute every time, in every
graph. The stream step is timed inside the server around ``Stream.step`` (the probe's ``step`` timer) and each
execution's own step is taken out (the step's noise, large on a CPU, cancels), so for the realtime graph
everything else the sampler does counts as overhead: ``overhead = median(realtime - its step) -
median(trivial)``. It splits (:data:`PARTS`) into ``shape = shaped - trivial`` (ComfyUI's cost of the graph's
shape), ``step_in_a_node = bare - step - shaped`` (what running a torch step inside a node costs around it:
the event loop sending ComfyUI's messages while the step holds and releases the GIL, caches the step left
cold) and ``sampler_glue = realtime - bare`` (the sampler's own code around its step: configs, session,
status event, memory report). The same differences are taken in the server's CPU time per execution, which
other processes on a shared machine inflate far less than wall time.

Rounds alternate the graphs (A B C D E, E D C B A, ...) so drift on a shared machine falls on all of them
alike. ComfyUI's default cache keeps the outputs of the current graph only, so the first execution of a block
runs LoadImage and the loader again: it is not counted. PreviewImage's files and the history are cleared
between blocks (ComfyUI lists the temp folder at every save).
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
from comfy_harness import ComfyServer, ExecutionFailed, Graph, WSCollector, array_to_png_bytes
from e2e_helpers import add_sampler

PROBE_DIR = Path(__file__).resolve().parent / "overhead_probe"
PROBE_PACK = "streamrt_probe"
SINK = "PreviewImage"
GRAPHS = ("trivial", "trivial_v3", "shaped", "realtime", "bare")  # realtime before bare: bare steps its stream


def sampler_nodes(prefix: str, acceleration: str = "auto", **options) -> dict[str, dict]:
    """The sampler (node ``<prefix>x``, fed by ``<prefix>load`` and ``<prefix>img``) and the settings nodes it
    needs, as the e2e tests build them (:func:`e2e_helpers.add_sampler` from :data:`e2e_helpers.SAMPLER_DEFAULTS`,
    ``options`` on top): the one place that follows the sampler's inputs. ``auto`` needs no settings node (the
    webcam graph)."""
    g = Graph(prefix=f"{prefix}s")
    add_sampler(g, [f"{prefix}load", 0], id=f"{prefix}x", image=[f"{prefix}img", 0], acceleration=acceleration,
                **options)
    return g.to_dict()


def sampler_inputs(acceleration: str = "auto", **options) -> dict:
    """The sampler's widget values in the measurement (for the report)."""
    nodes = sampler_nodes("", acceleration, **options)
    return {k: v for k, v in nodes["x"]["inputs"].items() if not isinstance(v, list)}


def sink_node(kind: str, images: list) -> dict:
    """The graphs' sink: ``PreviewImage`` (a PNG per execution) or ``StreamRTPreview`` (the stream view: the
    frame over the websocket, nothing written)."""
    inputs = {"images": images} if kind == "PreviewImage" else {"images": images, "max_size": 0}
    return {"class_type": kind, "inputs": inputs}


#: the graphs' image source with the one frame posted to it (``--source``): Stream Frame Input, not waiting for a
#: new frame, gives the posted frame's decoded tensor again (decoded once), as LoadImage gives its cached output
FRAME_SOURCE = "overhead"


def source_node(kind: str, image: str) -> dict:
    """The graphs' image in: ``LoadImage`` of ``image`` (a file in the input folder; hashed every execution) or
    ``StreamRTFrameInput`` of :data:`FRAME_SOURCE` (a frame posted before, kept in memory)."""
    if kind == "LoadImage":
        return {"class_type": "LoadImage", "inputs": {"image": image}}
    return {"class_type": "StreamRTFrameInput", "inputs": {"source": FRAME_SOURCE, "width": 0, "height": 0,
                                                           "wait_for_new": False, "timeout": 5.0}}


def build_graphs(prefix: str, image: str, model: str, taesd: str, acceleration: str, *, sink: str = SINK,
                 source: str = "LoadImage", overlap: bool = False, **sampler_options) -> dict[str, dict]:
    """API-format prompts of the graphs (node ids prefixed, so the sampler's stream is this run's own);
    ``sampler_options`` as for :func:`sampler_nodes`; ``source`` as for :func:`source_node`. ``overlap`` adds
    ``overlapped``: the realtime graph with Stream Settings' ``overlap_executions`` on (its own sampler node, so
    its own stream), whose executions hand over the previous execution's frame while their GPU work runs on."""
    load = source_node(source, image)
    view = sink_node(sink, [f"{prefix}x", 0])
    loader = {"class_type": "StreamRTLoadPipeline",
              "inputs": {"model": model, "taesd": taesd, "dtype": "auto", "device": "auto"}}
    sampler = sampler_nodes(prefix, acceleration, **sampler_options)
    settings = {k: v for k, v in sampler.items() if k != f"{prefix}x"}  # settings nodes, when any
    sampler_like = sampler[f"{prefix}x"]["inputs"]
    graphs = {
        "trivial": {f"{prefix}img": load, f"{prefix}x": {"class_type": "OverheadPassthrough",
                                                           "inputs": {"image": [f"{prefix}img", 0]}},
                    f"{prefix}sink": view},
        "trivial_v3": {f"{prefix}img": load, f"{prefix}x": {"class_type": "OverheadPassthroughV3",
                                                              "inputs": {"image": [f"{prefix}img", 0]}},
                       f"{prefix}sink": view},
        "shaped": {**settings, f"{prefix}img": load, f"{prefix}load": loader,
                   f"{prefix}x": {"class_type": "OverheadShapedSampler", "inputs": sampler_like},
                   f"{prefix}sink": view},
        "realtime": {**settings, f"{prefix}img": load, f"{prefix}load": loader,
                     f"{prefix}x": {"class_type": "StreamRTSampler", "inputs": sampler_like},
                     f"{prefix}sink": view},
        "bare": {**settings, f"{prefix}img": load, f"{prefix}load": loader,
                 f"{prefix}x": {"class_type": "OverheadBareStep", "inputs": sampler_like},
                 f"{prefix}sink": view},
    }
    if overlap:
        p = f"{prefix}v"
        graphs["overlapped"] = {**sampler_nodes(p, acceleration, overlap_executions=True, **sampler_options),
                                f"{p}img": load, f"{p}load": loader, f"{p}sink": sink_node(sink, [f"{p}x", 0])}
    return {name: {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in g.items()}
            for name, g in graphs.items()}


def write_frame(server: ComfyServer, size: int) -> str:
    """A ``size`` x ``size`` frame of noise in the server's input folder, also posted to Stream Frame Input's
    :data:`FRAME_SOURCE`; its LoadImage name. Noise, because the tiny random model's output is noise-like, and
    PreviewImage's PNG encoding costs more for noise than for a smooth picture: with noise in both graphs the sink
    costs the same in both."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    server.post_frame(FRAME_SOURCE, array_to_png_bytes(pixels)).raise_for_status()
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
    """CPU seconds every live thread of a process has run so far, and those of its main thread (ComfyUI's event
    loop: HTTP, validation, websocket messages; the prompt worker is another thread). Linux
    ``/proc/<pid>/task/*/schedstat``, a nanosecond counter (``/proc/<pid>/stat`` only counts 10 ms ticks)."""
    total = main = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                ns = int(f.read().split(None, 1)[0])
        except (OSError, ValueError):  # the thread ended meanwhile
            continue
        total += ns
        if tid == str(pid):
            main = ns
    return total / 1e9, main / 1e9


#: how the overhead splits: part -> (graph, graph subtracted from it), each graph's time minus its own step
PARTS = {
    "overhead": ("realtime", "trivial"),
    "shape": ("shaped", "trivial"),
    "step_in_a_node": ("bare", "shaped"),
    "sampler_glue": ("realtime", "bare"),
}


@dataclass
class OverheadResult:
    """What :func:`measure` saw, one entry per counted execution.

    ``walls`` / ``cpus`` / ``loop_cpus``: by graph, each execution's wall time on the client, the server's CPU
    time (all threads, read between executions) and its event-loop thread's. ``steps`` / ``step_cpus``: for the
    graphs that run a stream step, each execution's step (same order): its wall time and the CPU time of the
    thread that ran it. ``status_seconds``: the sampler's own ``seconds``. ``rounds``: per round the medians.
    """

    walls: dict[str, list[float]] = field(default_factory=dict)
    cpus: dict[str, list[float]] = field(default_factory=dict)
    loop_cpus: dict[str, list[float]] = field(default_factory=dict)
    steps: dict[str, list[float]] = field(default_factory=dict)
    step_cpus: dict[str, list[float]] = field(default_factory=dict)
    status_seconds: list[float] = field(default_factory=list)
    rounds: list[dict[str, float]] = field(default_factory=list)

    def beside_step(self, graph: str, cpu: bool = False) -> list[float]:
        """Each execution's wall (or server CPU) time minus its own stream step's, for a graph with a step."""
        times = (self.cpus if cpu else self.walls).get(graph, [])
        steps = (self.step_cpus if cpu else self.steps).get(graph)
        return times if steps is None else [t - s for t, s in zip(times, steps, strict=True)]

    def median_ms(self, graph: str, cpu: bool = False) -> float | None:
        """Median ms per execution of a graph, its stream step taken out."""
        return _ms(self.beside_step(graph, cpu))

    def part_ms(self, part: str, cpu: bool = False) -> float | None:
        """A :data:`PARTS` difference of medians, in ms (None when a graph was not measured)."""
        a, b = (self.median_ms(graph, cpu) for graph in PARTS[part])
        return None if a is None or b is None else a - b

    @property
    def overhead_ms(self) -> float | None:
        """median(realtime wall - its step) - median(trivial wall), in ms: each execution's own step taken out,
        so the step's noise, large on a CPU, cancels."""
        return self.part_ms("overhead")

    @property
    def overhead_cpu_ms(self) -> float | None:
        """The same in server CPU time."""
        return self.part_ms("overhead", cpu=True)

    def summary(self) -> dict:
        graphs = {}
        for name, walls in self.walls.items():
            if not walls:
                continue
            row = {"executions": len(walls), "median_ms": _ms(walls), "p10_ms": _ms(walls, 0.1),
                   "p90_ms": _ms(walls, 0.9), "server_cpu_median_ms": _ms(self.cpus[name]),
                   "event_loop_cpu_median_ms": _ms(self.loop_cpus[name])}
            if name in self.steps:
                row.update(step_median_ms=_ms(self.steps[name]), step_p10_ms=_ms(self.steps[name], 0.1),
                           step_p90_ms=_ms(self.steps[name], 0.9), step_cpu_median_ms=_ms(self.step_cpus[name]),
                           minus_step_median_ms=self.median_ms(name),
                           minus_step_server_cpu_median_ms=self.median_ms(name, cpu=True))
            graphs[name] = row
        return {
            "graphs": graphs,
            "parts_ms": {part: self.part_ms(part) for part in PARTS},
            "parts_server_cpu_ms": {part: self.part_ms(part, cpu=True) for part in PARTS},
            "overhead_ms": self.overhead_ms,
            "overhead_server_cpu_ms": self.overhead_cpu_ms,
            "overhead_per_round_ms": _spread([r["overhead"] for r in self.rounds if "overhead" in r]),
            "overhead_server_cpu_per_round_ms": _spread([r["overhead_cpu"] for r in self.rounds
                                                         if "overhead_cpu" in r]),
            "sampler_status_seconds_median_ms": _ms(self.status_seconds),
            "by_round": self.rounds,
        }


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values) if values else None, "min": min(values, default=None),
            "max": max(values, default=None)}


def measure(server: ComfyServer, graphs: dict[str, dict], *, rounds: int, per_round: int, warmup: int = 20,
            log: Callable[[str], None] | None = None) -> OverheadResult:
    """Alternating rounds of ``per_round`` executions of every graph (after ``warmup`` of each, and one at the
    start of every block, not counted). The probe's ``step`` timer must be installed (:func:`probe_install`);
    a graph whose executions time a stream step has each execution's own step taken out.

    Besides each execution's wall time, the server's CPU time over the execution is read (between executions,
    outside the timed window). Other processes on the machine inflate wall time (a thread waits for a CPU)
    much more than CPU time, so the same differences in CPU time say what the glue costs on a busy machine
    too. They are exact with the server's torch on one thread (the step's CPU time then is all in the thread
    that ran it).
    """
    result = OverheadResult(**{what: {name: [] for name in graphs} for what in ("walls", "cpus", "loop_cpus")})
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
                cpu, loop_cpu = server_cpu_seconds(pid)
                for _ in range(per_round):
                    seconds, status = run_once(server, ws, graphs[name])
                    before, loop_before = cpu, loop_cpu
                    cpu, loop_cpu = server_cpu_seconds(pid)
                    result.walls[name].append(seconds)
                    result.cpus[name].append(cpu - before)
                    result.loop_cpus[name].append(loop_cpu - loop_before)
                    result.status_seconds.extend(s["seconds"] for s in status)
                timers = probe_stats(server)["timers"]
                if timers.get("step"):
                    if len(timers["step"]) != per_round:
                        raise AssertionError(f"{name}: {len(timers['step'])} stream steps for {per_round} executions")
                    result.steps.setdefault(name, []).extend(timers["step"])
                    result.step_cpus.setdefault(name, []).extend(timers["step_cpu"])
                block = slice(len(result.walls[name]) - per_round, None)
                row[name] = _ms(result.beside_step(name)[block])
                row[f"{name}_cpu"] = _ms(result.beside_step(name, cpu=True)[block])
                tidy(server)
            for part, (a, b) in PARTS.items():
                if a in row and b in row:
                    row[part], row[f"{part}_cpu"] = row[a] - row[b], row[f"{a}_cpu"] - row[f"{b}_cpu"]
            result.rounds.append(row)
            if log is not None:
                log(f"round {r + 1}/{rounds} (ms, steps taken out): "
                    + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
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
