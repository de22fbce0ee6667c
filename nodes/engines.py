"""Build Engines and Load Engines: TensorRT / TensorRT-RTX engines for a STREAMRT_PIPELINE.

The work is in :mod:`streamrt.engines`; these nodes pick the cache folders, map the sampler's settings and the
widgets to engine requests, and report what happened as text (on the node, and as a STRING that Preview as Text
shows line by line). :func:`engine_note` is what a sampler shows about the engines it runs on.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, fields

from ..streamrt import StreamSettings
from ..streamrt.engines import (
    BACKENDS,
    COMPONENTS,
    CONTROLNET,
    TARGET_CHOICES,
    CachedEngines,
    EngineCache,
    build_engines,
    installed_backends,
    local_target,
    requests_for_stream,
    runtime_problem,
    weights_fingerprint,
)
from ..streamrt.engines.cache import CacheEntry
from ..streamrt.engines.spec import UNET
from ..streamrt.models import StreamModels
from ..streamrt.runtime import Acceleration, Runtime
from . import api
from .api import io
from .runtime import PipelineHandle, converted_controlnet

logger = logging.getLogger(__name__)

api.register_engine_folder()

COMPONENT_SETS: dict[str, tuple[str, ...]] = {
    "unet + vae": COMPONENTS, "unet": ("unet",), "vae": ("vae_encoder", "vae_decoder"),
}


@functools.lru_cache(maxsize=4)
def _engine_cache(folders: tuple[str, ...]) -> EngineCache:
    return EngineCache(folders[0], extra_roots=folders[1:])


def engine_cache() -> EngineCache:
    """The ``streamrt_engines`` folders: the first receives new engines, all are searched. One cache object
    per set of folders, so engines verified once stay verified."""
    return _engine_cache(tuple(api.engine_folders()))


@dataclass(frozen=True)
class EnginePipelineHandle(PipelineHandle):
    """A STREAMRT_PIPELINE from Build / Load Engines: its samplers look for engines of ``engine_backend``."""

    engine_backend: str = "auto"


def with_engines(handle: PipelineHandle, backend: str) -> EnginePipelineHandle:
    base = {f.name: getattr(handle, f.name) for f in fields(PipelineHandle)}
    return EnginePipelineHandle(**base, engine_backend=backend)


def engine_source(pipeline: PipelineHandle) -> CachedEngines:
    """Where a sampler's ``auto`` / ``tensorrt`` acceleration finds engines: the engine cache, restricted to
    the backend chosen on Build / Load Engines (any installed backend for a plain pipeline)."""
    return CachedEngines(engine_cache(), getattr(pipeline, "engine_backend", "auto"))


def engine_note(pipeline: PipelineHandle, runtime: Runtime) -> str | None:
    """What a sampler shows on its node about engines: which parts run on them, which run on torch and why
    (:meth:`Runtime.summary`), when engines are in play: the pipeline comes from Build / Load Engines, the stream
    asked for ``tensorrt``, or a part runs on an engine. None otherwise (nothing to say about engines)."""
    if (isinstance(pipeline, EnginePipelineHandle) or runtime.requested is Acceleration.TENSORRT
            or "engine" in runtime.parts.values()):
        return "StreamRT engines\n" + runtime.summary()
    return None


def _entry_line(entry: CacheEntry, installed: dict[str, str], here: str | None, device) -> str:
    if entry.record is None:
        return f"  ! {entry.path.name}: {entry.error}"
    key, rec = entry.record.key, entry.record
    status = "usable here"
    problem = runtime_problem(key.backend, device)
    if problem is not None:
        status = f"not usable here: {problem}"
    elif installed.get(key.backend) != key.backend_version:
        status = f"stale: built with {key.backend} {key.backend_version}, {installed.get(key.backend)} is installed"
    elif key.target != here:
        status = f"built for {key.target}, this GPU is {here}"
    return f"  {key.describe()}  {rec.size / 1e6:.1f} MB  [{status}]\n    {rec.path}"


def list_engines(models: StreamModels, cache: EngineCache) -> str:
    """A text listing of the cached engines of this pipeline's weights, each with whether it can run here."""
    weights = weights_fingerprint(models)
    entries = cache.entries(weights)
    installed = installed_backends()
    here = local_target(models.device) if models.device.type == "cuda" else None
    lines = [f"Engines for weights {weights} ({len(entries)} found in {', '.join(map(str, cache.roots))}):"]
    lines += [_entry_line(e, installed, here, models.device) for e in entries] or ["  none: use Build Engines"]
    return "\n".join(lines)


class BuildEngines(api.AlwaysExecutes):  # engines may have been deleted or damaged meanwhile
    """Build (or reuse) the engines a sampler's stream runs on, and attach them to the pipeline."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return api.Schema(
            node_id="StreamRTBuildEngines",
            display_name="Build Engines (TensorRT, StreamRT)",
            category=api.CATEGORY,
            description=(
                "Exports the pipeline's UNet and VAE encoder/decoder to ONNX and builds TensorRT engines for the "
                "stream a Realtime Sampler runs: connect the same Stream Settings node as the sampler's (cfg type, "
                "frames per step, size) and set steps as on the sampler. Reuses the engines already in the engine "
                "cache (models/streamrt_engines; the pack's old engine_cache/ is still read). TensorRT-RTX builds "
                "ahead of time on any machine, even without a GPU, for the GPU generation you choose; full TensorRT "
                "builds for the local GPU. With a ControlNet connected (the one the sampler's Apply ControlNet "
                "gets), its engine and a UNet engine taking its residuals are built. Builds take seconds to minutes. "
                "A sampler fed from the pipeline output "
                "with acceleration 'auto' or 'tensorrt' runs on the engines that fit its shapes on this GPU, and "
                "shows which parts do and why the others do not."),
            inputs=[
                api.PIPELINE.Input("pipeline", tooltip="From Load Stream Pipeline or Stream Pipeline from Model."),
                api.SETTINGS.Input("settings", optional=True,
                                   tooltip="The sampler's settings (the same Stream Settings node): the engines are "
                                           "built for its cfg type, frames per step and width/height. Without it: "
                                           "the sampler's defaults (cfg type self, one frame per step)."),
                io.Int.Input("steps", default=2, min=1, max=50,
                             tooltip="The sampler's steps (or how many indices its t_index_list has). The UNet "
                                     "batch is steps x frames per step rows, more with cfg_type full or "
                                     "initialize (with the sampler's cfg <= 1 those run as 'none': set cfg_type "
                                     "none in the settings then)."),
                io.Int.Input("width", default=0, min=0, max=4096, step=8,
                             tooltip="0 = the settings' width. Set it only when the settings take the input's size "
                                     "(width 0 there, or no settings): then the width of the frames the sampler "
                                     "gets, e.g. the webcam's."),
                io.Int.Input("height", default=0, min=0, max=4096, step=8,
                             tooltip="0 = the settings' height. Set it only when the settings take the input's size "
                                     "(height 0 there, or no settings): then the height of the sampler's frames."),
                io.Int.Input("min_size", default=0, min=0, max=4096, step=8,
                             tooltip="0 = engines for exactly the stream's width x height (fastest). Otherwise "
                                     "with max_size: engines that accept any width and height in [min_size, "
                                     "max_size], tuned for the stream's."),
                io.Int.Input("max_size", default=0, min=0, max=4096, step=8,
                             tooltip="Largest width/height a dynamic engine accepts (0 = static, see min_size)."),
                io.Combo.Input("backend", options=list(BACKENDS), default=BACKENDS[0],
                               tooltip="tensorrt-rtx (pip install tensorrt-rtx): RTX GPUs from the 20 series on, "
                                       "builds without a GPU; not for Hopper/data-centre GPUs. tensorrt (pip "
                                       "install tensorrt): full TensorRT, builds on the GPU it will run on."),
                io.Combo.Input("target", options=["auto", *TARGET_CHOICES], default="auto",
                               tooltip="GPU generation the engines run on. auto = this machine's GPU. SM75 RTX 20xx, "
                                       "SM80 A100, SM86 RTX 30xx, SM89 RTX 40xx, SM120 RTX 50xx."),
                io.Combo.Input("precision", options=["fp16", "fp32"], default="fp16",
                               tooltip="fp16 is the fast choice; fp32 only for debugging."),
                io.Combo.Input("components", options=list(COMPONENT_SETS), default="unet + vae",
                               tooltip="Which engines to build. Text encoders always stay in PyTorch."),
                io.Boolean.Input("rebuild", default=False,
                                 tooltip="Build again even when a valid engine is cached."),
                io.ControlNet.Input("control_net", optional=True,
                                    tooltip="The ControlNet the sampler's stream applies (from ControlNetLoader, the "
                                            "one Apply ControlNet gets): builds its engine and a UNet engine that "
                                            "takes its residuals (a stream with ControlNets runs only on such a "
                                            "UNet engine). Needs a components choice with the unet."),
            ],
            outputs=[api.PIPELINE.Output(display_name="pipeline",
                                         tooltip="The pipeline, for samplers that should use these engines."),
                     io.String.Output(display_name="report",
                                      tooltip="What was built or reused, and where (for Preview as Text).")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, pipeline: PipelineHandle, steps: int, width: int, height: int, min_size: int, max_size: int,
                backend: str, target: str, precision: str, components: str, rebuild: bool,
                settings: StreamSettings | None = None, control_net=None) -> io.NodeOutput:
        models = pipeline.models()
        settings = settings if settings is not None else StreamSettings()
        config = settings.shapes_config(steps=steps, width=width, height=height)
        parts = COMPONENT_SETS[components]
        controlnets = []  # the connected ControlNet, converted as the sampler converts it
        if control_net is not None:
            if UNET not in parts:
                raise ValueError(f"a ControlNet is connected but components is '{components}': its engines go with "
                                 "the UNet's (choose 'unet + vae' or 'unet', or disconnect the ControlNet)")
            key, state_dict = api.control_net_weights(control_net)
            controlnets.append(converted_controlnet(key, state_dict, models))  # the sampler's very module
            parts = (*parts, CONTROLNET)
        requests = requests_for_stream(config, components=parts, precision=precision, backend=backend,
                                       target=target, min_size=min_size, max_size=max_size, control=bool(controlnets))
        cache = engine_cache()
        progress = api.Progress(100 * len(requests), cls.hidden.unique_id)
        results = build_engines(models, requests, cache, progress=progress, force=rebuild, controlnets=controlnets)
        report = build_report(config, results)
        logger.info("%s", report)
        api.show_text(cls.hidden.unique_id, report)
        return io.NodeOutput(with_engines(pipeline, backend), api.preview_text(report), ui=api.text_ui(report))


def build_report(config, results) -> str:
    """What Build Engines did, as aligned lines: the stream, each engine built or reused, and the folder."""
    first = results[0].key
    cfg = config.cfg_type.value if config.guidance_scale > 1 else "none"
    lines = [f"StreamRT engines: {first.backend} {first.backend_version}, target {first.target}, "
             f"{first.precision}, weights {first.weights}",
             f"stream: {config.width}x{config.height}, {config.num_steps} step(s), {config.frames_per_step} frame(s) "
             f"per step, cfg_type {cfg}"]
    for r in results:
        what = (f"built in {r.build_seconds:.1f} s (export {r.export_seconds:.1f} s)" if r.built else "reused")
        name = f"{r.key.component}{'+control' if r.key.control else ''}"
        line = f"  {name:<14} {r.key.shapes.label():<28} {what:<34} {r.record.size / 1e6:8.1f} MB"
        lines.append(line + (f"  weights {r.key.weights}" if r.key.component == CONTROLNET else ""))
    # a ControlNet's engines have a folder of their own (its weights)
    lines += [f"Folder: {folder}" for folder in dict.fromkeys(r.record.path.parent for r in results)]
    if config.kv_cache.enabled:
        lines.append("Note: the settings turn cached attention on: the UNet runs on torch then (no engine takes the "
                     "attention cache yet); the VAE engines are used.")
    return "\n".join(lines)


class LoadEngines(api.AlwaysExecutes):  # the listing shows the cache as it is now
    """Attach the cached engines to a pipeline; the sampler uses those that fit."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return api.Schema(
            node_id="StreamRTLoadEngines",
            display_name="Load Engines (TensorRT, StreamRT)",
            category=api.CATEGORY,
            description=(
                "Lists the engines in the cache for this pipeline. A Realtime Sampler fed from here with acceleration "
                "'auto' or 'tensorrt' runs its UNet and VAE through the engines of this backend that match its size "
                "and batch on this GPU; the sampler shows which parts run on engines and why others do not."),
            inputs=[
                api.PIPELINE.Input("pipeline", tooltip="From Load Stream Pipeline."),
                io.Combo.Input("backend", options=["auto", *BACKENDS], default="auto",
                               tooltip="Which engines to use; auto = any installed backend that runs on this GPU."),
            ],
            outputs=[api.PIPELINE.Output(display_name="pipeline", tooltip="The pipeline, for samplers that should "
                                                                           "use engines of this backend."),
                     io.String.Output(display_name="engines", tooltip="The engines found, and whether they run here "
                                                                      "(for Preview as Text).")],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, pipeline: PipelineHandle, backend: str) -> io.NodeOutput:
        models = pipeline.models()
        listing = list_engines(models, engine_cache())
        return io.NodeOutput(with_engines(pipeline, backend), api.preview_text(listing), ui=api.text_ui(listing))


ENGINE_NODES: list[type[io.ComfyNode]] = [BuildEngines, LoadEngines]
