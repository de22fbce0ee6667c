"""A realtime soak on the real ComfyUI server: the webcam-style graph queued back to back, many times.

Used by tests/test_soak_e2e.py (CPU, in CI) and by ``scripts/soak.py`` (the GPU machine, compile). The graph is
LoadImage -> Realtime Sampler -> PreviewImage, one frame per execution, as ComfyUI's instant queue runs a webcam
graph; with ``posted=True`` its frame comes from Stream Frame Input instead, fed by a thread that posts new frames
to the server all along (as the node's camera does), each execution waiting for a new one. Prompts are queued in
windows (the queue never runs dry), the history is cleared after each window (a streaming client prunes its own
entries: ComfyUI keeps up to 10,000 otherwise, which would show as growth that is not the pack's), and after each
window the server's resident memory (and, on a GPU, the memory the server's torch holds) is sampled.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from comfy_harness import ComfyServer, Graph, array_to_png_bytes
from e2e_helpers import add_sampler

SAMPLER = dict(prompt="a watercolor portrait", negative_prompt="", t_index_list="32", cfg_type="none",
               guidance_scale=1.0, seed=2, reset=False)


@dataclass
class SoakResult:
    """What a soak measured: executions, failures, wall time, and (executions, RSS MB, torch GPU MB) samples."""

    executions: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    samples: list[tuple[int, float, float | None]] = field(default_factory=list)
    #: the thread that posted the frames (``posted=True``): its count and refusals
    poster: FramePoster | None = None

    @property
    def executions_per_second(self) -> float:
        return self.executions / self.seconds if self.seconds else 0.0

    def slope_mb_per_1000(self, column: int = 1, skip: int = 1) -> float | None:
        """Least-squares slope of a sampled column (1: RSS, 2: GPU) in MB per 1,000 executions, after ``skip``
        warm-up samples."""
        points = [(s[0], s[column]) for s in self.samples[skip:] if s[column] is not None]
        if len(points) < 3:
            return None
        x, y = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
        return float(np.polyfit(x, y, 1)[0] * 1000.0)


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


def gpu_mb(server: ComfyServer) -> float | None:
    """Device memory in use on the server's first device (total - free, from /system_stats), or None on CPU."""
    devices = server.system_stats().get("devices", [])
    device = devices[0] if devices else {}
    if device.get("type") != "cuda":
        return None
    return (device["vram_total"] - device["vram_free"]) / 2**20


class FramePoster(threading.Thread):
    """Posts ``frames`` (PNG bytes, cycled) to a Stream Frame Input source, at most ``rate`` per second, until
    stopped; counts the posts the server took and keeps the first refusals."""

    def __init__(self, server: ComfyServer, source: str, frames: list[bytes], rate: float = 100.0) -> None:
        super().__init__(daemon=True, name=f"post-{source}")
        self.server, self.source, self.frames, self.interval = server, source, frames, 1.0 / rate
        self.posted, self.errors = 0, []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            data = self.frames[self.posted % len(self.frames)]
            try:
                answer = self.server.post_frame(self.source, data)
            except Exception as err:  # a dropped connection is a finding, not a crash of the soak
                self.errors.append(repr(err))
            else:
                if answer.status_code == 200:
                    self.posted += 1
                else:
                    self.errors.append(f"{answer.status_code}: {answer.text[:200]}")
            if len(self.errors) > 20:
                return
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=30)


def realtime_graph(prefix: str, image: str | None, model: str, taesd: str, acceleration: str,
                   source: str | None = None, overlap: bool = False) -> Graph:
    """The soak's graph: the frame from Load Image ``image``, or from Stream Frame Input ``source``; ``overlap``:
    Stream Settings' overlap_executions on."""
    g = Graph(prefix=prefix)
    load = g.node("StreamRTLoadPipeline", id=f"{prefix}load", model=model, taesd=taesd, dtype="auto", device="auto")
    if source is not None:
        frame = g.node("StreamRTFrameInput", id=f"{prefix}in", source=source, width=0, height=0, wait_for_new=True,
                       timeout=10.0).out(0)
    else:
        frame = g.node("LoadImage", image=image).out(0)
    sampler = add_sampler(g, load.out(0), id=f"{prefix}sampler", image=frame,
                          **dict(SAMPLER, acceleration=acceleration, overlap_executions=overlap))
    g.node("PreviewImage", id=f"{prefix}preview", images=sampler.out(0))
    return g


def soak(server: ComfyServer, *, executions: int, model: str, taesd: str, acceleration: str = "auto",
         size: int = 64, window: int = 200, posted: bool = False, overlap: bool = False, log=None) -> SoakResult:
    """Queue the realtime graph ``executions`` times (after one warm-up execution, not counted); ``posted``: the
    frames come from Stream Frame Input, posted by a :class:`FramePoster` all along (``result.poster``); ``overlap``:
    each execution hands over the previous one's frame (Stream Settings' overlap_executions)."""
    rng = np.random.default_rng(5)
    pixels = [np.repeat(np.repeat(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8), 8, 0), 8, 1)
              for _ in range(16 if posted else 1)]
    prefix = "soak" + uuid.uuid4().hex[:6]
    if posted:
        image, source = None, prefix
        poster = FramePoster(server, source, [array_to_png_bytes(p) for p in pixels])
        poster.start()
    else:
        image, source, poster = server.write_input_image(pixels[0], name=f"{prefix}.png"), None, None
    try:
        return _soak(server, realtime_graph(prefix, image, model, taesd, acceleration, source, overlap), executions,
                     window, poster, log)
    finally:
        if poster is not None:
            poster.stop()


def _soak(server: ComfyServer, graph: Graph, executions: int, window: int, poster: FramePoster | None,
          log) -> SoakResult:
    server.run(graph, timeout=1800)  # load, compile, capture
    result = SoakResult()
    pid = server.proc.pid
    result.samples.append((0, rss_mb(pid), gpu_mb(server)))
    started = time.perf_counter()
    done = 0
    while done < executions:
        count = min(window, executions - done)
        ids = [server.queue(graph) for _ in range(count)]
        server.wait(ids[-1], timeout=600, poll=0.05)  # the queue runs in order
        history = server.history()
        for prompt_id in ids:
            status = (history.get(prompt_id) or {}).get("status") or {}
            if status.get("status_str") != "success":
                result.failures.append(f"{prompt_id}: {status or 'missing from the history'}")
        done += count
        server.post("/history", {"clear": True}).raise_for_status()
        result.samples.append((done, rss_mb(pid), gpu_mb(server)))
        if log is not None:
            log(f"{done} executions, {done / (time.perf_counter() - started):.1f}/s, "
                f"RSS {result.samples[-1][1]:.1f} MB, GPU {result.samples[-1][2]} MB, {len(result.failures)} failed")
    result.executions = done
    result.seconds = time.perf_counter() - started
    result.poster = poster
    return result
