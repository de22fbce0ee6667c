"""A measurement-only ComfyUI pack for ``scripts/node_overhead.py`` and ``tests/test_overhead_e2e.py``.

Mounted beside StreamRT in the real ComfyUI server (never shipped with the pack). It gives:

* ``OverheadPassthrough``: the cheapest node ComfyUI can run every time (classic API, one IMAGE in, the same
  IMAGE out, ``IS_CHANGED`` NaN), so the trivial graph ``LoadImage -> OverheadPassthrough -> PreviewImage``
  executes as many nodes per prompt as the realtime graph ``LoadImage -> Load Stream Pipeline -> Stream
  Sampler -> PreviewImage`` (two: the always-running node and the sink; the loaders stay cached);
  ``OverheadPassthroughV3``: the same through ComfyUI's V3 node API (what every V3 node pays);
  ``OverheadShapedSampler``: Stream Sampler's schema with a passthrough body, so that a graph shaped like the
  realtime one (the real loader, a node with the sampler's inputs) shows what ComfyUI itself spends on that
  shape, apart from what the sampler's ``execute`` does; ``OverheadBareStep``: the same schema, its body only
  steps the stream the real sampler of the same node id built (the step in a node, without the sampler's glue).
* Timers and counters put into the server process on request (``POST /streamrt_probe/install``), read back with
  ``GET /streamrt_probe/stats`` and cleared with ``POST /streamrt_probe/reset``:

  - ``step``: the StreamRT stream's own step (``Stream.step``), the part of an execution that is not glue: its
    wall time, and as ``step_cpu`` the CPU time of the thread that ran it (all of it with one torch thread);
  - ``timers``: wall time of ComfyUI's prompt validation (``execution.validate_prompt``), the prompt's whole
    execution (``PromptExecutor.execute``), each node's execution in ComfyUI (``execution.execute``, by class),
    ComfyUI's cache keys (``add_keys``), every ``define_schema`` call (by node class), and the parts of the
    sampler's ``execute`` body (pipeline lookup, configs, engine source, the session call, status, memory),
    those also in the CPU time of the thread that ran them (``<name>_cpu``: waiting for the GIL is not CPU);
  - ``counts``: calls of ``os.stat`` / ``os.lstat`` / ``os.scandir`` / ``os.listdir``, of the pack's load-time
    functions (``weights_nbytes``, ``cache_key``, ``file_fingerprint``, ``Module.parameters``) and of
    ``io.Schema`` constructions made from the pack's own code, by call site (the pack's entry point and the
    innermost frame inside the pack), and the pack's log records at INFO and above;
  - ``cprofile``: cProfile around validation and execution (attribution only: it slows what it profiles).

Every wrapper adds about a microsecond per wrapped call; the overhead figures use only ``step`` (one wrapper
per execution), the breakdown is measured in a separate phase.
"""

from __future__ import annotations

import cProfile
import functools
import inspect
import io
import logging
import os
import pstats
import sys
import threading
import time
from collections import Counter, defaultdict

import execution
from aiohttp import web
from comfy_execution import caching
from server import PromptServer

logger = logging.getLogger(__name__)


class OverheadPassthrough:
    """IMAGE in, the same IMAGE out; executes on every prompt."""

    CATEGORY = "overhead probe"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        return {"required": {"image": ("IMAGE",)}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):  # noqa: N802
        return float("nan")

    def run(self, image):
        return (image,)


def _v3_nodes():
    import dataclasses

    from comfy_api.latest import io as v3

    class OverheadPassthroughV3(v3.ComfyNode):
        @classmethod
        def define_schema(cls) -> v3.Schema:
            return v3.Schema(node_id="OverheadPassthroughV3", category="overhead probe",
                             inputs=[v3.Image.Input("image")], outputs=[v3.Image.Output()], not_idempotent=True)

        @classmethod
        def fingerprint_inputs(cls, **kwargs) -> float:
            return float("nan")

        @classmethod
        def execute(cls, image) -> v3.NodeOutput:
            return v3.NodeOutput(image)

    class OverheadShapedSampler(v3.ComfyNode):
        """Stream Sampler's schema (every input, hidden input and option) with a passthrough body."""

        schema: list = []

        @classmethod
        def define_schema(cls) -> v3.Schema:
            if not cls.schema:  # built once, like the sampler's (the pack is loaded when ComfyUI first asks)
                sampler = _pack_modules("StreamRT")["nodes.sampler"].StreamSampler.define_schema()
                cls.schema.append(dataclasses.replace(sampler, node_id="OverheadShapedSampler",
                                                      display_name="Stream Sampler's shape (overhead probe)"))
            return cls.schema[0]

        @classmethod
        def fingerprint_inputs(cls, **kwargs) -> float:
            return float("nan")

        @classmethod
        def execute(cls, image=None, **kwargs) -> v3.NodeOutput:
            return v3.NodeOutput(image)

    class OverheadBareStep(OverheadShapedSampler):
        """Stream Sampler's schema; the body checks the frame and steps the stream that the real sampler with
        the same node id built (a realtime graph must have run first), as the sampler's session does, and nothing
        else: the stream step inside a node, without the sampler's glue."""

        schema: list = []

        @classmethod
        def define_schema(cls) -> v3.Schema:
            if not cls.schema:
                cls.schema.append(dataclasses.replace(OverheadShapedSampler.define_schema(),
                                                      node_id="OverheadBareStep",
                                                      display_name="Stream step only (overhead probe)"))
            return cls.schema[0]

        sessions: list = []

        @classmethod
        def execute(cls, image=None, **kwargs) -> v3.NodeOutput:
            if not cls.sessions:  # looked up once (scanning sys.modules costs milliseconds)
                cls.sessions.append(_pack_modules("StreamRT")["nodes.runtime"].SESSIONS)
            stream = cls.sessions[0]._streams.get((None, cls.hidden.unique_id))  # the measurement reads the registry
            if stream is None:
                raise RuntimeError("OverheadBareStep steps the stream of the Stream Sampler with its node id: "
                                   "run the realtime graph first")
            return v3.NodeOutput(stream.step(stream.check_frames(image, stream.config.frames_per_step), validated=True))

    return OverheadPassthroughV3, OverheadShapedSampler, OverheadBareStep


_V3, _SHAPED, _BARE = _v3_nodes()
NODE_CLASS_MAPPINGS = {"OverheadPassthrough": OverheadPassthrough, "OverheadPassthroughV3": _V3,
                       "OverheadShapedSampler": _SHAPED, "OverheadBareStep": _BARE}


# ---- recording -------------------------------------------------------------------------------------------
class _Record:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.timers: dict[str, list[float]] = defaultdict(list)
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.profiles: dict[str, cProfile.Profile] = {}
        self.installed: set[str] = set()
        self.pack_root: str | None = None

    def reset(self) -> None:
        with self.lock:
            self.timers.clear()
            self.counts.clear()
            for name in self.profiles:
                self.profiles[name] = cProfile.Profile()


RECORD = _Record()


def _timed(label, fn):
    """``fn`` wrapped to add its wall time to ``RECORD.timers[label]`` (``label`` may be a function of the args)."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                RECORD.timers[label(*args, **kwargs) if callable(label) else label].append(time.perf_counter() - start)
        return async_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            RECORD.timers[label(*args, **kwargs) if callable(label) else label].append(time.perf_counter() - start)
    return wrapper


def _patch(owner, name: str, make) -> None:
    """Replace ``owner.name`` by ``make(original)``, keeping classmethods / staticmethods what they were."""
    raw = owner.__dict__[name] if isinstance(owner, type) and name in owner.__dict__ else getattr(owner, name)
    if isinstance(raw, classmethod):
        setattr(owner, name, classmethod(make(raw.__func__)))
    elif isinstance(raw, staticmethod):
        setattr(owner, name, staticmethod(make(raw.__func__)))
    else:
        setattr(owner, name, make(raw))


def _pack_name(pack: str) -> str:
    """The pack's module name: ComfyUI names a custom-node folder's module after its path."""
    for name in list(sys.modules):
        if name == pack or name.endswith("/" + pack):
            return name
    raise KeyError(f"no loaded custom-node pack {pack!r}")


def _pack_modules(pack: str) -> dict[str, object]:
    """The pack's loaded modules by their name inside the pack (``nodes.sampler``, ``streamrt.stream``...)."""
    prefix = _pack_name(pack) + "."
    return {name[len(prefix):]: module for name, module in list(sys.modules.items())
            if name.startswith(prefix) and module is not None}


def _wall_and_cpu(label: str, fn):
    """``fn`` timed in wall time (``label``) and in CPU time of the thread that ran it (``label_cpu``)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        cpu, start = time.thread_time(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            RECORD.timers[label].append(time.perf_counter() - start)
            RECORD.timers[f"{label}_cpu"].append(time.thread_time() - cpu)
    return wrapper


def install_step(pack: str) -> None:
    _patch(_pack_modules(pack)["streamrt.stream"].Stream, "step", lambda fn: _wall_and_cpu("step", fn))


def install_timers(pack: str) -> None:
    mods = _pack_modules(pack)
    _patch(execution, "validate_prompt", lambda fn: _timed("comfy.validate_prompt", fn))
    _patch(execution.PromptExecutor, "execute", lambda fn: _timed("comfy.execute_prompt", fn))
    _patch(execution, "execute", lambda fn: _timed(
        lambda server, dynprompt, caches, current_item, *a, **k:
            "comfy.node:" + dynprompt.get_node(current_item)["class_type"], fn))
    _patch(caching.CacheKeySetInputSignature, "add_keys", lambda fn: _timed("comfy.cache_keys", fn))
    _patch(execution.IsChangedCache, "get", lambda fn: _timed(
        lambda self, node_id: "comfy.is_changed:" + self.dynprompt.get_node(node_id)["class_type"], fn))
    _patch(execution, "get_input_data", lambda fn: _timed(
        lambda inputs, class_def, *a, **k: "comfy.get_input_data:" + class_def.__name__, fn))
    from comfy_api.latest import _io as v3_io
    _patch(v3_io.Schema, "get_v1_info", lambda fn: _timed("comfy.v3.get_v1_info", fn))
    _patch(v3_io.Schema, "finalize", lambda fn: _timed("comfy.v3.finalize", fn))
    _patch(v3_io.Schema, "validate", lambda fn: _timed("comfy.v3.validate", fn))
    _patch(PromptServer, "send_json", lambda fn: _timed(
        lambda self, event, data, sid=None: "comfy.send_json:" + str(event), fn))
    import nodes as comfy_nodes
    for node_id, cls in comfy_nodes.NODE_CLASS_MAPPINGS.items():
        if "define_schema" in getattr(cls, "__dict__", {}):
            _patch(cls, "define_schema", lambda fn, node_id=node_id: _timed(f"define_schema:{node_id}", fn))
    sampler, runtime = mods["nodes.sampler"], mods["nodes.runtime"]
    _patch(sampler.StreamSampler, "execute", lambda fn: _wall_and_cpu("sampler.execute", fn))
    _patch(mods["nodes.loaders"].LoadStreamPipeline, "execute", lambda fn: _timed("loader.execute", fn))
    for name in ("StreamConfig", "StreamRequest", "KVCacheConfig", "SimilarityFilterConfig", "engine_source",
                 "report_memory", "parse_t_index_list", "workflow_id"):
        if hasattr(sampler, name):
            _patch(sampler, name, lambda fn, name=name: _wall_and_cpu(f"sampler.{name}", fn))
    _patch(runtime.PipelineHandle, "models", lambda fn: _wall_and_cpu("sampler.PipelineHandle.models", fn))
    _patch(sampler.api, "send_status", lambda fn: _wall_and_cpu("sampler.send_status", fn))
    _patch(sampler.api, "check_interrupted", lambda fn: _wall_and_cpu("sampler.check_interrupted", fn))
    sessions = mods["streamrt.sessions"].StreamSessions
    for name in ("run", "stream", "frames_processed"):
        _patch(sessions, name, lambda fn, name=name: _wall_and_cpu(f"sessions.{name}", fn))
    _patch(mods["streamrt.sessions"], "check_frames", lambda fn: _wall_and_cpu("sessions.check_frames", fn))
    stream = mods["streamrt.stream"].Stream
    for name in ("set_prompt", "set_seed", "set_guidance"):
        _patch(stream, name, lambda fn, name=name: _wall_and_cpu(f"stream.{name}", fn))


_COUNTED_OS = ("stat", "lstat", "scandir", "listdir")


def _pack_site(skip: int = 2) -> str | None:
    """Where the pack's code made the current call: ``<entry> -> <file>:<line> <function>``, with the outermost
    frame inside the pack on the stack (the entry ComfyUI called: ``nodes/sampler.py execute``...) and the
    innermost one; None when no pack code is on the stack."""
    root = RECORD.pack_root
    inner = outer = None
    frame = sys._getframe(skip)
    while frame is not None:
        if frame.f_code.co_filename.startswith(root):
            outer = frame
            if inner is None:
                inner = frame
        frame = frame.f_back
    if inner is None:
        return None
    return (f"{os.path.relpath(outer.f_code.co_filename, root)} {outer.f_code.co_name} -> "
            f"{os.path.relpath(inner.f_code.co_filename, root)}:{inner.f_lineno} {inner.f_code.co_name}")


def _counted(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        site = _pack_site()
        if site is not None:
            RECORD.counts[label][site] += 1
        return fn(*args, **kwargs)
    return wrapper


class _LogCounter(logging.Handler):
    """Counts the pack's log records at INFO and above (per-frame logging belongs at DEBUG)."""

    def emit(self, record: logging.LogRecord) -> None:
        where = ".".join(record.name.rsplit(".", 2)[-2:])
        RECORD.counts["log"][f"{record.levelname} {where}: {record.msg}"] += 1


def install_counts(pack: str) -> None:
    name = _pack_name(pack)
    RECORD.pack_root = os.path.dirname(os.path.abspath(sys.modules[name].__file__)) + os.sep
    mods = _pack_modules(pack)
    for call in _COUNTED_OS:
        _patch(os, call, lambda fn, call=call: _counted(f"os.{call}", fn))
    _patch(mods["streamrt.models"].StreamModels, "weights_nbytes", lambda fn: _counted("weights_nbytes", fn))
    _patch(mods["streamrt.loading"].PipelineSpec, "cache_key", lambda fn: _counted("cache_key", fn))
    _patch(mods["streamrt.loading"], "file_fingerprint", lambda fn: _counted("file_fingerprint", fn))
    import torch
    _patch(torch.nn.Module, "parameters", lambda fn: _counted("Module.parameters", fn))
    from comfy_api.latest import _io as v3_io
    _patch(v3_io.Schema, "__init__", lambda fn: _counted("Schema built", fn))
    handler = _LogCounter(level=logging.INFO)
    logging.getLogger(name).addHandler(handler)


def _profiled(name: str, fn):
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(*args, **kwargs):
            profile = RECORD.profiles[name]
            profile.enable()
            try:
                return await fn(*args, **kwargs)
            finally:
                profile.disable()
        return async_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        profile = RECORD.profiles[name]
        profile.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            profile.disable()
    return wrapper


def install_cprofile(pack: str) -> None:
    for name in ("validate", "execute"):
        RECORD.profiles[name] = cProfile.Profile()
    _patch(execution, "validate_prompt", lambda fn: _profiled("validate", fn))
    _patch(execution.PromptExecutor, "execute", lambda fn: _profiled("execute", fn))


INSTALLERS = {"step": install_step, "timers": install_timers, "counts": install_counts, "cprofile": install_cprofile}


def _profile_text(profile: cProfile.Profile, lines: int) -> str:
    out = io.StringIO()
    try:
        stats = pstats.Stats(profile, stream=out)
    except TypeError:  # nothing recorded
        return ""
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats(lines)
    return out.getvalue()


# ---- routes ----------------------------------------------------------------------------------------------
routes = PromptServer.instance.routes


@routes.post("/streamrt_probe/install")
async def _install(request):
    body = await request.json()
    pack = body.get("pack", "StreamRT")
    for what in body.get("what", []):
        if what not in RECORD.installed:
            INSTALLERS[what](pack)
            RECORD.installed.add(what)
            logger.info("overhead probe: %s installed", what)
    return web.json_response({"installed": sorted(RECORD.installed)})


@routes.post("/streamrt_probe/reset")
async def _reset(request):
    RECORD.reset()
    return web.json_response({})


@routes.get("/streamrt_probe/stats")
async def _stats(request):
    lines = int(request.query.get("profile_lines", "40"))
    dump = request.query.get("dump")  # a folder: also write each cProfile there as <name>.prof (for pstats)
    if dump:
        for name, profile in RECORD.profiles.items():
            profile.dump_stats(os.path.join(dump, f"{name}.prof"))
    with RECORD.lock:
        body = {"timers": {k: list(v) for k, v in RECORD.timers.items()},
                "counts": {k: dict(v) for k, v in RECORD.counts.items()},
                "cprofile": {k: _profile_text(p, lines) for k, p in RECORD.profiles.items()}}
    return web.json_response(body)

