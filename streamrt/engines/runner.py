"""Running engines on torch tensors, and finding the engines a stream's runtime can use.

:class:`EngineRunner` binds one engine to torch CUDA tensors with the TensorRT Python API
(``Runtime.deserialize_cuda_engine``, ``ICudaEngine.create_execution_context``,
``IExecutionContext.set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` on torch's
current stream). Outputs are pre-allocated torch tensors, rebound only when a shape or an input
address changes; a call with the same shapes and tensors does nothing but enqueue, so it can be
captured in a CUDA graph once it has run outside capture (the Stream's warm-up does that).

:func:`attach_engines` (through :class:`CachedEngines`, an :class:`~streamrt.runtime.EngineSource`) finds
the cached engines that fit a stream config and this machine and says plainly why when none do;
:func:`streamrt.runtime.prepare` turns the runners into the stream's UNet / VAE calls.

Not exercised here: there is no machine in this project that can execute an engine (no GPU on the
build machines; the GPU machine is a Hopper, which TensorRT-RTX refuses, and full TensorRT cannot be
installed there). The runner is kept small and written against the TensorRT / TensorRT-RTX Python API
(method names checked against the installed ``tensorrt_rtx`` 1.7 bindings); the contract it must meet
(call signatures, dtypes, shapes, output reuse) is tested with a stand-in runner on onnxruntime.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from ..config import StreamConfig
from ..models import StreamModels
from ..runtime import AttachResult
from .build import installed_backends, local_target
from .cache import EngineCache, EngineRecord, InvalidEngineError, controlnet_fingerprint, weights_fingerprint
from .spec import BACKEND_MODULES, BACKENDS, COMPONENTS, CONTROLNET, RTX_TARGETS, TENSORRT_RTX, UNET

logger = logging.getLogger(__name__)

#: TensorRT DataType name -> torch dtype (the types StreamRT's engines use, and a few more)
TORCH_DTYPES: dict[str, torch.dtype] = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
    "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool,
}


class EngineLoadError(RuntimeError):
    """An engine could not be deserialized or bound here; the message says why."""


def import_backend(backend: str) -> ModuleType:
    """The ``tensorrt_rtx`` or ``tensorrt`` module."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r}: use one of {', '.join(BACKENDS)}")
    try:
        return importlib.import_module(BACKEND_MODULES[backend])
    except ImportError as exc:
        raise EngineLoadError(f"the {backend} runtime is not installed ({exc})") from None


def runtime_problem(backend: str, device: torch.device | str) -> str | None:
    """Why engines of ``backend`` cannot run on ``device`` here, or ``None`` when they can (as far as
    can be told without loading one)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the pipeline runs on {device}; engines need a CUDA GPU"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if backend not in installed_backends():
        return f"the {backend} runtime is not installed"
    here = local_target(device)
    if backend == TENSORRT_RTX and here not in RTX_TARGETS:
        return f"TensorRT-RTX does not run on this GPU ({here}; it supports {', '.join(RTX_TARGETS)}, not Hopper)"
    return None


@dataclass
class _Binding:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...] | None = None
    address: int = 0
    tensor: torch.Tensor | None = None  # output buffer, or input staging when a conversion is needed


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class EngineRunner:
    """One TensorRT / TensorRT-RTX engine bound to torch tensors on one CUDA device.

    Args:
        path: the ``.engine`` file (verified by the cache before it gets here).
        backend: ``tensorrt-rtx`` or ``tensorrt``.
        device: the CUDA device (default: the current one).
        input_names: the order the runner takes its inputs in (a component's input order); by default
            the engine's I/O order.
        runtime_cache: TensorRT-RTX only: a file that keeps the kernels its JIT compiles, loaded here
            and written after the first call.

    ``runner(*inputs)`` returns the output tensor (or a tuple, for several outputs). The tensors
    returned are the runner's own buffers, overwritten by the next call. Inputs whose dtype differs
    from the engine's, or that are not contiguous, go through a staging copy (on the GPU, capturable).
    """

    def __init__(self, path: str | Path, *, backend: str, device: torch.device | str | None = None,
                 input_names: Sequence[str] | None = None, runtime_cache: str | Path | None = None) -> None:
        self.path = Path(path)
        self.backend = backend
        self.device = self._check_device(device)
        trt = import_backend(backend)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._runtime_cache_path = Path(runtime_cache) if runtime_cache is not None else None
        self._runtime_cache = None
        self._runtime_config = None
        self._workspace: torch.Tensor | None = None
        self._cache_saved = False
        data = self.path.read_bytes()
        with self._device_scope():
            self._check_validity(data)
            self._engine = self._runtime.deserialize_cuda_engine(data)
            if self._engine is None:
                raise EngineLoadError(f"{self.backend} could not deserialize {self.path.name} on this GPU "
                                      f"({self._device_name()}); see the log above")
            self._context = self._create_context()
        if self._context is None:
            raise EngineLoadError(f"could not create an execution context for {self.path.name}")
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if input_names is not None:
            if sorted(input_names) != sorted(inputs):
                raise EngineLoadError(f"{self.path.name} has inputs {inputs}, expected {list(input_names)}")
            inputs = list(input_names)
        self.input_names: tuple[str, ...] = tuple(inputs)
        self.output_names: tuple[str, ...] = tuple(outputs)
        self._inputs = [_Binding(n, self._torch_dtype(n)) for n in inputs]
        self._outputs = [_Binding(n, self._torch_dtype(n)) for n in outputs]
        self._result: torch.Tensor | tuple[torch.Tensor, ...] | None = None

    # the CUDA specifics, in one place --------------------------------------------------------------
    @staticmethod
    def _check_device(device: torch.device | str | None) -> torch.device:
        device = torch.device(device if device is not None else "cuda")
        if device.type != "cuda":
            raise EngineLoadError(f"engines run on CUDA devices, not {device}")
        if device.index is None:  # compare equal to the tensors' devices (cuda:N), or every call would stage
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def _device_scope(self):
        return torch.cuda.device(self.device)

    def _device_name(self) -> str:
        return torch.cuda.get_device_name(self.device)

    def _stream_handle(self) -> int:
        """Torch's current stream on the device: inside ``torch.cuda.graph`` capture, the capture stream."""
        return torch.cuda.current_stream(self.device).cuda_stream

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    # set-up ----------------------------------------------------------------------------------------
    def _check_validity(self, data: bytes) -> None:
        """TensorRT-RTX (and recent TensorRT) can say why an engine will not load before trying."""
        check = getattr(self._runtime, "get_engine_validity", None)
        if check is None:
            return
        validity, diagnostics = check(data)
        if validity == self._trt.EngineValidity.INVALID:
            flags = getattr(self._trt, "EngineInvalidityDiagnostics", None)
            why = [name for name, member in (flags.__members__.items() if flags else ())
                   if int(diagnostics) & int(member)]
            gpu = self._device_name()
            raise EngineLoadError(f"{self.path.name} cannot run on this GPU ({gpu}): "
                                  f"{', '.join(why) or 'invalid engine'}; rebuild it for this GPU with Build Engines")

    def _create_context(self):
        """An execution context whose scratch memory is a torch tensor (``USER_MANAGED``): torch's allocator
        owns it (ComfyUI sees it), and engines built with TensorRT-RTX's ``REQUIRE_USER_ALLOCATION`` (for CUDA
        graph capture) get the user allocation they require."""
        engine, trt = self._engine, self._trt
        strategies = getattr(trt, "ExecutionContextAllocationStrategy", None)
        user_managed = getattr(strategies, "USER_MANAGED", None)
        if self.backend == TENSORRT_RTX and hasattr(engine, "create_runtime_config"):
            config = engine.create_runtime_config()
            if user_managed is not None:
                config.set_execution_context_allocation_strategy(user_managed)
            # StreamRT captures the whole step in its own CUDA graph: no internal graphs, and kernels for a
            # new shape compiled at once (during warm-up), not swapped in later behind the captured graph.
            if hasattr(trt, "CudaGraphStrategy"):
                config.cuda_graph_strategy = trt.CudaGraphStrategy.DISABLED
            if hasattr(trt, "DynamicShapesKernelSpecializationStrategy"):
                config.dynamic_shapes_kernel_specialization_strategy = \
                    trt.DynamicShapesKernelSpecializationStrategy.EAGER
            if self._runtime_cache_path is not None:
                cache = config.create_runtime_cache()
                if self._runtime_cache_path.is_file() and not cache.deserialize(self._runtime_cache_path.read_bytes()):
                    logger.info("runtime cache %s does not fit this GPU/driver; starting an empty one",
                                self._runtime_cache_path)
                config.set_runtime_cache(cache)
                self._runtime_cache = cache
            self._runtime_config = config
            context = engine.create_execution_context(config)
        elif user_managed is not None:
            context = engine.create_execution_context(user_managed)
        else:
            context = engine.create_execution_context()
        if context is not None and user_managed is not None:
            size = int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)
            self._workspace = self._empty((max(size, 1),), torch.uint8)  # torch blocks are 512-byte aligned
            context.set_device_memory(self._workspace.data_ptr(), size)
        return context

    def _torch_dtype(self, name: str) -> torch.dtype:
        dtype = self._engine.get_tensor_dtype(name)
        kind = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
        if kind not in TORCH_DTYPES:
            raise EngineLoadError(f"engine tensor {name} has dtype {kind}, which StreamRT does not bind")
        return TORCH_DTYPES[kind]

    # the call ------------------------------------------------------------------------------------------
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self._inputs):
            raise TypeError(f"{self.path.name} takes {len(self._inputs)} inputs {list(self.input_names)}, "
                            f"got {len(inputs)}")
        ctx = self._context
        shapes_changed = False
        for binding, tensor in zip(self._inputs, inputs):
            shape = tuple(tensor.shape)
            if shape != binding.shape:
                if not ctx.set_input_shape(binding.name, shape):
                    raise ValueError(f"{self.path.name}: input {binding.name} shape {shape} is outside the engine's "
                                     "profile; build an engine for this resolution / batch")
                binding.shape, shapes_changed = shape, True
            source = tensor
            if tensor.dtype != binding.dtype or not tensor.is_contiguous() or tensor.device != self.device:
                if binding.tensor is None or tuple(binding.tensor.shape) != shape:
                    self._refuse_allocation_in_capture(binding.name)
                    binding.tensor = self._empty(shape, binding.dtype)
                binding.tensor.copy_(tensor)
                source = binding.tensor
            address = source.data_ptr()
            if address != binding.address:
                if not ctx.set_tensor_address(binding.name, address):
                    raise EngineLoadError(f"could not bind input {binding.name} of {self.path.name}")
                binding.address = address
        if shapes_changed or self._result is None:
            self._bind_outputs()
        if not ctx.execute_async_v3(self._stream_handle()):
            raise RuntimeError(f"{self.backend} failed to run {self.path.name}; see the log above")
        if not self._cache_saved and self._runtime_cache is not None and not _capturing():
            self.save_runtime_cache()
        return self._result

    def _bind_outputs(self) -> None:
        ctx = self._context
        tensors = []
        for binding in self._outputs:
            shape = tuple(ctx.get_tensor_shape(binding.name))
            if any(d < 0 for d in shape):
                raise EngineLoadError(f"{self.path.name}: output {binding.name} has no static shape {shape}")
            if binding.tensor is None or tuple(binding.tensor.shape) != shape:
                self._refuse_allocation_in_capture(binding.name)
                binding.tensor = self._empty(shape, binding.dtype)
                binding.shape = shape
            address = binding.tensor.data_ptr()
            if address != binding.address:
                if not ctx.set_tensor_address(binding.name, address):
                    raise EngineLoadError(f"could not bind output {binding.name} of {self.path.name}")
                binding.address = address
            tensors.append(binding.tensor)
        self._result = tensors[0] if len(tensors) == 1 else tuple(tensors)

    def _refuse_allocation_in_capture(self, name: str) -> None:
        if _capturing():
            raise RuntimeError(f"{self.path.name}: tensor {name} needs a new buffer during CUDA graph capture; "
                               "run the engine once at these shapes before capturing")

    def is_stream_capturable(self) -> bool:
        """TensorRT-RTX's own answer (``True`` where the API does not exist)."""
        check = getattr(self._context, "is_stream_capturable", None)
        return True if check is None else bool(check(self._stream_handle()))

    # persistence and teardown ------------------------------------------------------------------------
    def save_runtime_cache(self) -> None:
        if self._runtime_cache is None or self._runtime_cache_path is None:
            return
        try:
            blob = self._runtime_cache.serialize()
            self._runtime_cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._runtime_cache_path.with_name(self._runtime_cache_path.name + ".tmp")
            tmp.write_bytes(memoryview(blob))
            tmp.replace(self._runtime_cache_path)
            self._cache_saved = True
        except OSError as exc:  # a read-only engine folder: the JIT just runs again next time
            logger.info("could not save the runtime cache %s: %s", self._runtime_cache_path, exc)
            self._cache_saved = True

    def close(self) -> None:
        """Release the context, engine and runtime (in that order)."""
        self._result = None
        for binding in (*self._inputs, *self._outputs):
            binding.tensor = None
        for attr in ("_context", "_runtime_config", "_runtime_cache", "_engine", "_runtime"):
            setattr(self, attr, None)
        self._workspace = None  # after the context that used it


# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachedEngines:
    """An :class:`~streamrt.runtime.EngineSource` over an :class:`EngineCache`: what ``tensorrt`` and ``auto``
    acceleration run on. ``backend`` is ``auto`` (any installed one that runs here) or one backend."""

    cache: EngineCache
    backend: str = "auto"
    precision: str | None = None

    @property
    def key(self) -> tuple:
        return tuple(str(root) for root in self.cache.roots), self.backend, self.precision

    def attach(self, models: StreamModels, config: StreamConfig, control: bool = False) -> AttachResult:
        return attach_engines(models, config, self.cache, backend=self.backend, precision=self.precision,
                              control=control)

    def attach_controlnet(self, models: StreamModels, config: StreamConfig,
                          controlnet: torch.nn.Module) -> tuple[EngineRunner | None, str | None]:
        """A runner of its own for ``controlnet``'s engine, or why there is none (see
        :func:`attach_controlnet_engine`)."""
        runner, _, note = attach_controlnet_engine(models, config, self.cache, controlnet, backend=self.backend,
                                                   precision=self.precision)
        return runner, note


def _usable_backends(backend: str, device: torch.device, notes: list[str]) -> dict[str, str]:
    """``{backend: version}`` of the backends (``auto``: any) whose engines run here; a note for each that does
    not."""
    usable = {}
    for name in list(BACKENDS) if backend == "auto" else [backend]:
        problem = runtime_problem(name, device)
        if problem is None:
            usable[name] = installed_backends()[name]
        else:
            notes.append(f"{name}: {problem}")
    return usable


def _load(record: EngineRecord, cache: EngineCache, device: torch.device, here: str | None) -> EngineRunner:
    runtime_cache = cache.root / "runtime" / f"{record.key.digest()}-{here}.rtcache"
    return EngineRunner(record.path, backend=record.key.backend, device=device,
                        input_names=[t[0] for t in record.meta.get("inputs", [])] or None, runtime_cache=runtime_cache)


def attach_controlnet_engine(models: StreamModels, config: StreamConfig, cache: EngineCache,
                             controlnet: torch.nn.Module, *, backend: str = "auto",
                             precision: str | None = None) -> tuple[EngineRunner | None, EngineRecord | None,
                                                                    str | None]:
    """``(runner, record, None)`` for the best cached engine of ``controlnet`` (its weights fingerprint,
    :func:`~streamrt.engines.cache.controlnet_fingerprint`; the models' family; ``config.unet_rows`` rows at the
    config's resolution; a backend and compute capability that run here), or ``(None, None, why)``.

    Each call loads a runner of its own (its own output buffers): a stream that uses one ControlNet twice sums
    the residuals of two calls, which must not overwrite each other."""
    notes: list[str] = []
    usable = _usable_backends(backend, models.device, notes)
    if not usable:
        return None, None, "; ".join(notes)
    if config.prompt_length not in (0, models.text_length):
        return None, None, (f"prompts of {config.prompt_length} tokens (ControlNet engines take "
                            f"{models.text_length})")
    here = local_target(models.device)
    weights = controlnet_fingerprint(controlnet)
    found = [rec for name, version in usable.items()
             for rec in cache.find(weights, CONTROLNET, rows=config.unet_rows, width=config.width,
                                   height=config.height, precision=precision, backend=name, backend_version=version,
                                   target=here, family=models.family.name)]
    if not found:
        return None, None, (f"no controlnet engine for {weights} with {config.unet_rows} rows at "
                            f"{config.width}x{config.height} on {here} ({models.family})")
    record = found[0]
    try:
        return _load(record, cache, models.device, here), record, None
    except (EngineLoadError, InvalidEngineError, OSError) as exc:
        return None, None, str(exc)


def attach_engines(models: StreamModels, config: StreamConfig, cache: EngineCache, *, backend: str = "auto",
                   precision: str | None = None, control: bool = False) -> AttachResult:
    """Runners for the cached engines that fit ``config`` on this machine, where there are any.

    For each component, the best valid engine for this weights fingerprint and model family, batch rows,
    resolution, an installed backend's version and this GPU's compute capability is loaded; for the UNet, one
    with the ControlNet residual inputs exactly when ``control`` (a stream with ControlNets). Whether a UNet
    engine takes the extras the stream gives (SDXL's added conditions) is checked by
    :func:`streamrt.runtime.prepare`, which refuses one that does not, with a note. The result's notes say why a
    component has none (the runtime then runs it on torch, or refuses ``tensorrt`` when nothing fits).
    ControlNets' own engines are attached one by one (:func:`attach_controlnet_engine`).
    """
    result = AttachResult()
    usable = _usable_backends(backend, models.device, result.notes)
    if not usable:
        return result
    weights = weights_fingerprint(models)
    here = local_target(models.device)
    for component in COMPONENTS:
        if component == UNET and config.kv_cache.enabled:
            # UNet engines with the K/V rings as I/O can be exported (streamrt.kv_export) but are not fed by
            # the stream yet: with cached attention the UNet runs on torch.
            result.notes.append("cached attention: the UNet runs on torch (no engine takes the attention cache yet)")
            continue
        if component == UNET and config.prompt_length not in (0, models.text_length):
            # UNet engines are exported for the text encoder's own length (streamrt/engines/export.py).
            result.notes.append(f"prompts of {config.prompt_length} tokens: the UNet runs on torch (its engines take "
                                f"{models.text_length})")
            continue
        rows = config.unet_rows if component == UNET else config.frames_per_step
        found = [rec for name, version in usable.items()
                 for rec in cache.find(weights, component, rows=rows, width=config.width, height=config.height,
                                       precision=precision, backend=name, backend_version=version, target=here,
                                       cache_window=0, family=models.family.name,
                                       control=control and component == UNET)]
        if not found:
            kind = f"{component} engine for ControlNets" if control and component == UNET else f"{component} engine"
            result.notes.append(f"no {kind} for {rows} rows at {config.width}x{config.height} on {here} "
                                f"({models.family})")
            continue
        record = found[0]
        try:
            result.runners[component] = _load(record, cache, models.device, here)
            result.records[component] = record
        except (EngineLoadError, InvalidEngineError, OSError) as exc:
            result.notes.append(f"{component}: {exc}")
    return result
