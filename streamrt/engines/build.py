"""Building engines: backend and target resolution, the build process, and get-or-build through the cache.

:func:`ensure_engine` is the one entry point that builds: it looks the key up in the
:class:`~streamrt.engines.cache.EngineCache`, and on a miss (or a stale / corrupt engine) exports the
component to ONNX inside the cache's staging folder, builds it with polygraphy in a separate process
(:func:`run_build`, running ``_build_worker.py``) and commits the engine atomically.

Backends:

- ``tensorrt-rtx`` (``pip install tensorrt-rtx``; polygraphy and onnx come with requirements.txt): builds ahead
  of time, on any machine, CPU-only ones included, for a named compute capability
  (:data:`~streamrt.engines.spec.RTX_TARGETS`).
  Its runtime runs on RTX-class GPUs (Turing to Blackwell) and refuses Hopper (SM90).
- ``tensorrt`` (full TensorRT, NVIDIA's package index): builds on and for the local GPU only.

Engines are fp16 (or fp32) through the ONNX graph's own dtypes (strongly typed networks: TensorRT-RTX
has no precision flags), with one optimisation profile per engine covering its shape ranges, and
a timing cache kept in the engine folder. Progress comes from TensorRT's ``IProgressMonitor``
(through polygraphy's ``CreateConfig(progress_monitor=...)``), folded into one fraction.
"""

from __future__ import annotations

import collections
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import CfgType, StreamConfig
from ..models import StreamModels
from ..runtime.runtime import ADDED_COND_INPUTS
from .cache import EngineCache, EngineKey, EngineRecord, controlnet_fingerprint, weights_fingerprint
from .export import ExportComponent, added_condition_specs, component_for, control_residual_specs, export_onnx
from .spec import (
    BACKEND_MODULES,
    BACKENDS,
    COMPONENTS,
    CONTROLNET,
    ENGINE_COMPONENTS,
    PRECISIONS,
    RTX_TARGETS,
    TENSORRT,
    TENSORRT_RTX,
    UNET,
    EngineShapes,
    parse_target,
    target_name,
)

logger = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("_build_worker.py")
EVENT_PREFIX = "@@streamrt-build "

#: ``progress(done, total)``, as everywhere in StreamRT; it may raise to stop (e.g. a user interrupt)
ProgressCallback = Callable[[int, int], None]


class EngineBuildError(RuntimeError):
    """An engine build failed; the message holds the reason and the tail of the builder's log."""


class BackendUnavailableError(EngineBuildError):
    """The TensorRT backend (or polygraphy) is not installed here."""


# ---------------------------------------------------------------------------------------------------
# backends and targets
def backend_version(backend: str) -> str:
    """Installed version of ``backend`` (``tensorrt-rtx`` or ``tensorrt``); raises
    :class:`BackendUnavailableError` with the install command when it is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r}: use one of {', '.join(BACKENDS)}")
    module = BACKEND_MODULES[backend]
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        pass
    if importlib.util.find_spec(module) is not None:
        return str(importlib.import_module(module).__version__)
    hint = ("pip install tensorrt-rtx" if backend == TENSORRT_RTX else
            "pip install tensorrt (from NVIDIA's package index)")
    raise BackendUnavailableError(f"the {backend} backend is not installed: {hint}")


def installed_backends() -> dict[str, str]:
    """``{backend: version}`` of the backends installed here (polygraphy required for building)."""
    found = {}
    for backend in BACKENDS:
        try:
            found[backend] = backend_version(backend)
        except BackendUnavailableError:
            continue
    return found


def require_polygraphy() -> None:
    if importlib.util.find_spec("polygraphy") is None:
        raise BackendUnavailableError("building engines needs polygraphy: pip install -r requirements.txt in the "
                                      "StreamRT folder (or pip install polygraphy)")


def local_target(device: torch.device | str | None = None) -> str | None:
    """``"SM89"`` for the local CUDA GPU (``device`` or the current one); ``None`` without one."""
    if not torch.cuda.is_available():
        return None
    if device is not None and torch.device(device).type != "cuda":
        device = None  # models on the CPU: the GPU they would run on is the current one
    major, minor = torch.cuda.get_device_capability(device)
    return target_name(major, minor)


def resolve_target(backend: str, target: str, device: torch.device | str | None = None) -> str:
    """The compute capability to build for: ``auto`` is the local GPU; checked against the backend."""
    wanted = target.strip().upper()
    local = local_target(device)
    if wanted == "AUTO":
        if local is None:
            raise ValueError("target 'auto' means the local GPU, and no CUDA GPU is visible here: choose the "
                             "compute capability of the GPU the engines will run on (SM75 RTX 20xx, SM86 RTX 30xx, "
                             "SM89 RTX 40xx, SM120 RTX 50xx)")
        wanted = local
    parse_target(wanted)
    if backend == TENSORRT_RTX and wanted not in RTX_TARGETS:
        raise ValueError(f"TensorRT-RTX cannot build for {wanted}: it targets {', '.join(RTX_TARGETS)} (RTX-class "
                         "GPUs). Its runtime refuses Hopper (SM90) and data-centre GPUs: there use full TensorRT "
                         "or the torch backend (CUDA graphs, torch.compile)")
    if backend == TENSORRT and wanted != local:
        raise ValueError(f"full TensorRT builds only for the GPU it runs on ({local or 'no GPU here'}), not {wanted}: "
                         "use tensorrt-rtx to build ahead of time for another compute capability")
    return wanted


# ---------------------------------------------------------------------------------------------------
# one build, in its own process
@dataclass(frozen=True)
class BuildJob:
    """What :func:`run_build` hands to the build process."""

    onnx: Path
    output: Path
    backend: str
    target: str
    profiles: tuple[dict, ...]
    timing_cache: Path | None = None
    optimization_level: int | None = None
    require_user_allocation: bool = True

    def to_json(self) -> dict:
        return {"onnx": str(self.onnx), "output": str(self.output), "backend": self.backend,
                "target": list(parse_target(self.target)) if self.backend == TENSORRT_RTX else None,
                "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in self.profiles],
                "timing_cache": str(self.timing_cache) if self.timing_cache else None,
                "optimization_level": self.optimization_level,
                "require_user_allocation": self.require_user_allocation}


@dataclass(frozen=True)
class BuildOutcome:
    seconds: float
    bytes: int
    version: str
    log_tail: str


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
        logger.error("engine build process %d did not exit", proc.pid)


def run_build(job: BuildJob, progress: Callable[[float], None] | None = None, *,
              on_event: Callable[[dict], None] | None = None, poll: float = 0.25,
              timeout: float | None = None) -> BuildOutcome:
    """Build ``job.onnx`` into ``job.output`` in a child process.

    ``progress(fraction)`` is called as the build advances and at least every ``poll`` seconds (so a
    callback that raises on a user interrupt stops the build quickly); if it raises, the process is
    killed and the exception propagates: ``job.output`` may then hold a partial file, which the
    caller (inside a staging folder) discards. ``on_event`` sees every protocol event.
    """
    require_polygraphy()
    job_path = job.output.with_name(job.output.name + ".job.json")
    job_path.write_text(json.dumps(job.to_json(), indent=1), encoding="utf-8")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", POLYGRAPHY_AUTOINSTALL_DEPS="0",
               POLYGRAPHY_USE_TENSORRT_RTX="1" if job.backend == TENSORRT_RTX else "0")
    proc = subprocess.Popen([sys.executable, "-u", str(WORKER), str(job_path)], cwd=str(job.output.parent), env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, encoding="utf-8", errors="replace")
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, name="streamrt-engine-build-log", daemon=True)
    reader.start()
    log: collections.deque[str] = collections.deque(maxlen=60)
    fraction, done, error = 0.0, None, None
    deadline = None if timeout is None else time.monotonic() + timeout
    last_report = 0.0
    try:
        while True:
            try:
                line = lines.get(timeout=poll)
            except queue.Empty:
                line = ""
            if line is None:
                break
            changed = False
            if line.startswith(EVENT_PREFIX):
                event = json.loads(line[len(EVENT_PREFIX):])
                if on_event is not None:
                    on_event(event)
                kind = event.get("event")
                if kind == "progress":
                    fraction, changed = max(fraction, float(event.get("fraction", 0.0))), True
                elif kind == "done":
                    done, fraction, changed = event, 1.0, True
                elif kind == "error":
                    error = str(event.get("message"))
            elif line.strip():
                log.append(line.rstrip())
                logger.debug("engine build: %s", line.rstrip())
            now = time.monotonic()
            if progress is not None and (changed or now - last_report >= poll):
                last_report = now
                progress(fraction)
            if deadline is not None and now > deadline:
                raise EngineBuildError(f"engine build timed out after {timeout:.0f} s")
        code = proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        job_path.unlink(missing_ok=True)
    tail = "\n".join(log)
    if error is not None or code != 0 or done is None:
        why = error or (f"the build process ended with code {code}" if code else "the build process gave no engine")
        raise EngineBuildError(f"{job.backend} engine build of {job.onnx.name} failed: {why}\n{tail}".rstrip())
    if not job.output.is_file() or job.output.stat().st_size != int(done["bytes"]):
        raise EngineBuildError(f"the build process reported {done['bytes']} bytes but {job.output} does not hold them")
    return BuildOutcome(seconds=float(done["seconds"]), bytes=int(done["bytes"]), version=str(done["version"]),
                        log_tail=tail)


# ---------------------------------------------------------------------------------------------------
# get or build, through the cache
@dataclass(frozen=True)
class EngineRequest:
    """One engine to have: which component, for which shapes, precision, backend and target.

    ``target`` may be ``auto`` (the local GPU); it is resolved when the key is made. ``control``: a UNet that
    takes the ControlNet residuals (for streams with ControlNets). A ``controlnet`` request is built for a
    ControlNet module given alongside it (:func:`ensure_engine`'s ``controlnet``, :func:`build_engines`'
    ``controlnets``).
    """

    component: str
    shapes: EngineShapes
    precision: str = "fp16"
    backend: str = TENSORRT_RTX
    target: str = "auto"
    control: bool = False

    def __post_init__(self) -> None:
        if self.component not in ENGINE_COMPONENTS:
            raise ValueError(f"unknown engine component {self.component!r}: use one of "
                             f"{', '.join(ENGINE_COMPONENTS)}")
        if self.control and self.component != UNET:
            raise ValueError(f"only a UNet engine takes ControlNet residuals (control=True), not a {self.component}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown engine backend {self.backend!r}: use one of {', '.join(BACKENDS)}")


def engine_key(models: StreamModels, request: EngineRequest, *, cache_window: int = 0,
               controlnet: torch.nn.Module | None = None) -> EngineKey:
    """The cache key of ``request`` for these models (resolves the target and the backend version). The models'
    family is part of it: an SD1 and an SDXL pipeline never share an engine. A ``controlnet`` request is keyed
    by the ``controlnet``'s own weights (:func:`~streamrt.engines.cache.controlnet_fingerprint`)."""
    if (request.component == CONTROLNET) != (controlnet is not None):
        raise ValueError("a controlnet engine's key needs its ControlNet module (controlnet=...)"
                         if controlnet is None else f"a ControlNet module was given for a {request.component} key")
    weights = controlnet_fingerprint(controlnet) if controlnet is not None else weights_fingerprint(models)
    return EngineKey(weights=weights, family=models.family.name, component=request.component,
                     shapes=request.shapes, precision=request.precision, backend=request.backend,
                     backend_version=backend_version(request.backend),
                     target=resolve_target(request.backend, request.target, models.device),
                     cache_window=int(cache_window), control=request.control)


def check_unet_inputs(models: StreamModels, component: ExportComponent, control: bool = False) -> None:
    """Raise ValueError when ``component`` is a UNet whose added-condition inputs are not those of ``models``'
    family (:func:`~streamrt.engines.export.added_condition_specs`), or whose ControlNet residual inputs are not
    the UNet's (:func:`~streamrt.engines.export.control_residual_specs`) when ``control``, or present when not:
    such an engine could never run the streams its key says (the runtime refuses it), so it is not built."""
    if component.name != UNET:
        return
    want = [spec.name for spec in added_condition_specs(models)]
    have = [name for name in component.input_names if name in ADDED_COND_INPUTS]
    if have != want:
        raise ValueError(f"{models.family} UNet engines take the added conditions {want or 'none'}; this "
                         f"{component.name} component has {have or 'none'}")
    residuals = [(t.name, t.dims) for t in control_residual_specs(models.unet)]
    names = {name for name, _ in residuals}
    have_res = [(t.name, t.dims) for t in component.inputs if t.name in names]
    if control and have_res != residuals:
        raise ValueError(f"a UNet engine for ControlNets takes the residuals {[n for n, _ in residuals]} with this "
                         f"UNet's shapes; this component has {[n for n, _ in have_res] or 'none'}")
    if not control and have_res:
        raise ValueError(f"this UNet component takes ControlNet residuals ({have_res[0][0]}...): build it with "
                         "control=True in its request (its key must say so)")


def unet_rows(frames_per_step: int, denoising_steps: int, cfg_type: str | CfgType, guided: bool = True) -> int:
    """UNet batch rows of a stream (``StreamConfig.unet_rows``) from the numbers that decide it."""
    config = StreamConfig(t_index_list=tuple(range(denoising_steps)), num_inference_steps=max(50, denoising_steps),
                          frames_per_step=frames_per_step, cfg_type=cfg_type,
                          guidance_scale=2.0 if guided else 1.0)
    return config.unet_rows


def requests_for_stream(config: StreamConfig, *, components: Iterable[str] | None = None, precision: str = "fp16",
                        backend: str = TENSORRT_RTX, target: str = "auto", min_size: int = 0,
                        max_size: int = 0, control: bool = False) -> list[EngineRequest]:
    """The engines a stream with ``config`` runs on: UNet with ``config.unet_rows`` rows, VAE encoder and
    decoder with ``frames_per_step`` rows; static at the config's resolution, or any width and height in
    ``[min_size, max_size]`` (tuned for the config's) when both are given.

    ``control``: the stream has ControlNets: its UNet takes their residuals (``control=True``), and a
    ``controlnet`` request with the UNet's shapes is added (build it for each ControlNet: :func:`build_engines`'
    ``controlnets``). ``components`` defaults to the pipeline's three, plus ``controlnet`` with ``control``."""
    if (min_size > 0) != (max_size > 0):
        raise ValueError("give both min_size and max_size for a resolution range (or neither for a static one)")
    if components is None:
        components = ENGINE_COMPONENTS if control else COMPONENTS
    requests = []
    for name in components:
        if name == CONTROLNET and not control:
            raise ValueError("a controlnet engine is for a stream with ControlNets: pass control=True")
        rows = config.unet_rows if name in (UNET, CONTROLNET) else config.frames_per_step
        if min_size:
            shapes = EngineShapes.ranged(rows, config.width, config.height, min_size, max_size)
        else:
            shapes = EngineShapes.static(rows, config.width, config.height)
        requests.append(EngineRequest(name, shapes, precision, backend, target, control=control and name == UNET))
    return requests


@dataclass(frozen=True)
class EngineResult:
    """What :func:`ensure_engine` did: ``built`` or reused, why, and how long it took."""

    record: EngineRecord
    built: bool
    reason: str
    export_seconds: float = 0.0
    build_seconds: float = 0.0

    @property
    def key(self) -> EngineKey:
        return self.record.key


_BUILD_LOCK = threading.Lock()  # one build at a time per process: builds are memory- and CPU-heavy


def _scaled(progress: ProgressCallback | None, offset: int, span: int, total: int) -> Callable[[float], None]:
    def report(fraction: float) -> None:
        if progress is not None:
            progress(offset + int(round(span * min(max(fraction, 0.0), 1.0))), total)
    return report


def ensure_engine(models: StreamModels, request: EngineRequest, cache: EngineCache, *,
                  progress: ProgressCallback | None = None, force: bool = False,
                  component: ExportComponent | None = None, external_data: bool | None = None,
                  optimization_level: int | None = None, controlnet: torch.nn.Module | None = None,
                  _offset: int = 0, _total: int = 100) -> EngineResult:
    """The engine for ``request``: from the cache when a valid one is there, else exported and built.

    A stale or corrupt engine under the same key is rebuilt (the models are here). ``component``
    overrides the stock component (the cached-attention UNet passes its extended one; its
    ``cache_window`` goes into the key). ``controlnet``: the diffusers ``ControlNetModel`` a ``controlnet``
    request is for (required there, refused elsewhere); its weights key the engine.
    ``progress(done, total)`` may raise to interrupt: the build process is killed and nothing is left under
    the engine's name.
    """
    if component is None:
        component = component_for(models, request.component, control=request.control, controlnet=controlnet)
    if component.name != request.component:
        raise ValueError(f"component {component.name!r} does not match the request's {request.component!r}")
    check_unet_inputs(models, component, control=request.control)
    key = engine_key(models, request, cache_window=component.cache_window, controlnet=controlnet)
    report = _scaled(progress, _offset, 100, _total)
    report(0.0)
    found = cache.lookup(key)
    if found.hit and not force:
        logger.info("engine cache hit: %s", found.record.path)
        report(1.0)
        return EngineResult(found.record, built=False, reason="cache hit")
    reason = "forced rebuild" if force else (
        "missing" if found.error.reason == "missing" else f"rebuilt: {found.error}")
    if not force and found.error.reason != "missing":
        logger.warning("%s", found.error)
    cache.engine_path(key)  # refuses (EngineNameError) a place that leads out of the cache, before any work
    profile = component.profile(request.shapes)  # validates the shapes before any work
    require_polygraphy()
    with _BUILD_LOCK, cache.staging() as staging:
        report(0.02)
        exported = export_onnx(component, request.shapes, staging / f"{request.component}.onnx",
                               precision=request.precision, external_data=external_data)
        report(0.15)
        job = BuildJob(onnx=exported.path, output=staging / "engine.part", backend=key.backend, target=key.target,
                       profiles=(profile,), timing_cache=cache.timing_cache_path(key.backend, key.backend_version,
                                                                                 key.target),
                       optimization_level=optimization_level)
        job.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        build_report = _scaled(progress, _offset + 15, 82, _total)
        outcome = run_build(job, build_report)
        if outcome.version != key.backend_version:
            raise EngineBuildError(f"the build ran {key.backend} {outcome.version} but {key.backend_version} was "
                                   "expected (two installations?)")
        meta = {"model": key.weights.rsplit("-", 1)[0], "build_seconds": outcome.seconds,
                "export_seconds": exported.seconds, "external_data": exported.external_data,
                "opset": exported.opset, "torch": torch.__version__, "pixel_multiple": component.pixel_multiple,
                # lists, not objects: the order is the runner's call order (the sidecar's keys get sorted)
                "inputs": [[t.name, list(t.dims), t.dtype] for t in component.inputs],
                "outputs": [[t.name, list(t.dims), t.dtype] for t in component.outputs],
                "profile": {k: [list(s) for s in v] for k, v in profile.items()}}
        record = cache.commit(key, job.output, meta)
    report(1.0)
    logger.info("built %s in %.1f s (export %.1f s)", key.describe(), outcome.seconds, exported.seconds)
    return EngineResult(record, built=True, reason=reason, export_seconds=exported.seconds,
                        build_seconds=outcome.seconds)


def build_engines(models: StreamModels, requests: Sequence[EngineRequest], cache: EngineCache, *,
                  progress: ProgressCallback | None = None, force: bool = False,
                  controlnets: Sequence[torch.nn.Module] = ()) -> list[EngineResult]:
    """:func:`ensure_engine` for each request, with one progress range over all of them. A ``controlnet`` request
    is built once for each of ``controlnets`` (each module once, however often it is listed), in their order."""
    unique = list({id(net): net for net in controlnets}.values())
    jobs: list[tuple[EngineRequest, torch.nn.Module | None]] = []
    for request in requests:
        if request.component != CONTROLNET:
            jobs.append((request, None))
        elif not unique:
            raise ValueError("a controlnet engine request needs the ControlNets to build it for (controlnets=...)")
        else:
            jobs += [(request, net) for net in unique]
    total = 100 * max(len(jobs), 1)
    results = []
    for index, (request, net) in enumerate(jobs):
        results.append(ensure_engine(models, request, cache, progress=progress, force=force, controlnet=net,
                                     _offset=100 * index, _total=total))
    if progress is not None:
        progress(total, total)
    return results
