"""TensorRT / TensorRT-RTX engines for the stream's UNet and VAE (docs/DESIGN.md section 5).

- :mod:`.spec`: shape ranges, components, backends, targets (plain data).
- :mod:`.export`: ONNX export of the UNet (plain or taking ControlNet residuals), VAE encoder / decoder and
  ControlNets; the extension point for
  cached-attention I/O (:meth:`ExportComponent.with_io`).
- :mod:`.build`: backend / target resolution, the polygraphy build in a child process, and
  :func:`ensure_engine` / :func:`build_engines` (get from the cache or build).
- :mod:`.cache`: :class:`EngineCache`, :class:`EngineKey`, atomic writes, verification.
- :mod:`.runner`: :class:`EngineRunner` (torch tensors <-> engine), :func:`attach_engines` and
  :class:`CachedEngines` (the engine source of :func:`streamrt.runtime.prepare`).

Nothing here imports TensorRT at import time: the backends are optional (``pip install tensorrt-rtx``
or ``tensorrt``; polygraphy and onnx come with requirements.txt), and the stream falls back to torch
without them.
"""

from .build import (
                    BackendUnavailableError,
                    EngineBuildError,
                    EngineRequest,
                    EngineResult,
                    build_engines,
                    engine_key,
                    ensure_engine,
                    installed_backends,
                    local_target,
                    requests_for_stream,
                    resolve_target,
                    unet_rows,
)
from .cache import (
                    CacheEntry,
                    EngineCache,
                    EngineCacheError,
                    EngineKey,
                    EngineNameError,
                    EngineRecord,
                    InvalidEngineError,
                    controlnet_fingerprint,
                    weights_fingerprint,
)
from .export import (
                    ExportComponent,
                    OnnxExport,
                    TensorSpec,
                    component_for,
                    control_residual_specs,
                    controlnet_component,
                    export_onnx,
                    unet_component,
                    vae_decoder_component,
                    vae_encoder_component,
)
from .runner import (
                    CachedEngines,
                    EngineLoadError,
                    EngineRunner,
                    attach_controlnet_engine,
                    attach_engines,
                    runtime_problem,
)
from .spec import (
                    BACKENDS,
                    COMPONENTS,
                    CONTROLNET,
                    ENGINE_COMPONENTS,
                    ENGINE_FORMAT,
                    PRECISIONS,
                    RTX_TARGETS,
                    TARGET_CHOICES,
                    TENSORRT,
                    TENSORRT_RTX,
                    DimRange,
                    EngineShapes,
)

__all__ = [
    "BACKENDS", "CONTROLNET", "ENGINE_COMPONENTS", "attach_controlnet_engine", "control_residual_specs",
    "controlnet_component", "controlnet_fingerprint", "CachedEngines",
    "BackendUnavailableError", "COMPONENTS", "CacheEntry", "DimRange", "ENGINE_FORMAT",
    "EngineBuildError", "EngineCache", "EngineCacheError", "EngineKey", "EngineLoadError",
    "EngineNameError", "EngineRecord", "EngineRequest", "EngineResult", "EngineRunner", "EngineShapes",
    "ExportComponent", "InvalidEngineError", "OnnxExport", "PRECISIONS", "RTX_TARGETS", "TARGET_CHOICES",
    "TENSORRT", "TENSORRT_RTX", "TensorSpec", "attach_engines", "build_engines", "component_for", "engine_key",
    "ensure_engine", "export_onnx", "installed_backends", "local_target", "requests_for_stream", "resolve_target",
    "runtime_problem", "unet_rows", "unet_component", "vae_decoder_component", "vae_encoder_component",
    "weights_fingerprint",
]
