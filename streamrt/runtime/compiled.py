"""``torch.compile``'d copies of a pipeline's UNet and VAE calls, made once per pipeline and shared by its streams.

The copies wrap the pipeline's modules; they never replace them: a stream that asked for ``eager`` on the
same pipeline keeps calling the plain modules. Shapes are static (``dynamic=False``), so each stream
config compiles once, and inductor's on-disk cache (:func:`use_compile_cache`) makes a restart cheap.

One change does touch the shared UNet and VAE: on a CUDA device their weights are put in channels-last memory
format once, which the compiled convolutions need to run fast (TAESD's encode + decode at 512² on an H200:
1.58 -> 1.39 ms). The values are the same, so every other caller computes what it computed before
(docs/DESIGN.md section 6).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import StreamModels, decode_latents, encode_images

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[2] / "engine_cache" / "torch_compile"


def use_compile_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Point inductor's on-disk caches at ``cache_dir`` (default: the pack's ``engine_cache/torch_compile``),
    so a restart reuses compiled kernels instead of compiling from scratch. Call before compiling."""
    path = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return path


def compile_problem(device: torch.device, allocator: str | None = None) -> str | None:
    """Why compiled kernels cannot run on ``device`` in this process, or None.

    ComfyUI starts torch with the ``cudaMallocAsync`` allocator by default. There, inductor's kernels fail
    their first launch inside the stream's CUDA graph warm-up ("CUDA driver error: invalid argument" with
    inductor's static launcher, "Pointer argument cannot be accessed from Triton" with Triton's own; seen on
    an H200, torch 2.11, ComfyUI 0.3.75), while CUDA graphs of the eager kernels run. With the native
    allocator (ComfyUI's ``--disable-cuda-malloc``) compiled streams ran 10,000 executions without a failure.
    """
    if device.type != "cuda":
        return None
    allocator = allocator if allocator is not None else torch.cuda.memory.get_allocator_backend()
    if allocator == "cudaMallocAsync":
        return ("torch runs with the cudaMallocAsync allocator (ComfyUI's default), under which compiled kernels "
                "fail inside CUDA graphs; start ComfyUI with --disable-cuda-malloc to use compile, or use "
                "cuda_graph")
    return None


@dataclass(frozen=True)
class CompileOptions:
    """How to compile.

    Args:
        mode (`str`, defaults to `"default"`): ``torch.compile`` mode.
        backend (`str` or callable, defaults to `"inductor"`): ``torch.compile`` backend (tests pass a
            counting backend to see which calls go through the compiler).
        cache_dir (`str`, optional): inductor's cache folder (default: :data:`DEFAULT_CACHE_DIR`).
        ahead_of_time (`bool`, defaults to `False`): with inductor, run the UNet and VAE calls from packages
            compiled ahead of time (:mod:`.ahead_of_time`), which a new process loads without tracing the models
            again; a stream with cached attention, and a call whose package cannot be made, use
            ``torch.compile``'d calls. Off by default until it has run on a GPU (the GPU machine's torch 2.11
            could not load any AOTInductor package: docs/DESIGN.md section 6).
    """

    mode: str = "default"
    backend: str | Callable = "inductor"
    cache_dir: str | None = None
    ahead_of_time: bool = False


@dataclass(frozen=True)
class CompiledCalls:
    """The compiled UNet module and VAE calls of one pipeline's modules."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]


#: pipeline -> {options: calls}. Keyed by the :class:`StreamModels`, which the calls do not reference: keyed by
#: the UNet module, the compiled copy (which holds that module) would keep its own key, and so every pipeline
#: ever compiled, alive for good.
_compiled: weakref.WeakKeyDictionary[StreamModels, dict[CompileOptions, CompiledCalls]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def use_channels_last(models: StreamModels) -> None:
    """Put the UNet's and VAE's weights in channels-last memory format on a CUDA device (once; the values stay the
    same): compiled convolutions run fastest on it (module docstring)."""
    if models.device.type == "cuda":
        models.unet.to(memory_format=torch.channels_last)
        models.vae.to(memory_format=torch.channels_last)


def compiled_calls(models: StreamModels, options: CompileOptions = CompileOptions()) -> CompiledCalls:
    """The compiled calls of the modules of ``models`` for ``options``, made on first use and shared by every
    stream of that pipeline; they go with it. Compilation itself happens lazily, on the first call of each
    shape."""
    with _lock:
        per_models = _compiled.setdefault(models, {})
        calls = per_models.get(options)
        if calls is not None:
            return calls
        if options.backend == "inductor":
            use_compile_cache(options.cache_dir)
        use_channels_last(models)
        kwargs = dict(backend=options.backend, dynamic=False)
        if options.backend == "inductor":
            kwargs["mode"] = options.mode
        vae = models.vae
        calls = CompiledCalls(
            unet=torch.compile(models.unet, **kwargs), vae=vae,
            encode=torch.compile(lambda images: encode_images(vae, images), **kwargs),
            decode=torch.compile(lambda latents: decode_latents(vae, latents), **kwargs),
        )
        per_models[options] = calls
        logger.info("torch.compile (%s, mode=%s) copies of the UNet and VAE calls made", options.backend, options.mode)
        return calls


def compiled_controlnet(module: torch.nn.Module, options: CompileOptions = CompileOptions()) -> torch.nn.Module:
    """The compiled copy of a ControlNet ``module`` for ``options``, made on first use and shared by every stream
    that uses that ControlNet. It is kept in the module's own ``__dict__`` (not as a submodule: its weights are
    not counted twice), so it goes with the module; a weak-keyed table would keep the module alive through the
    copy that holds it."""
    with _lock:
        per_options = module.__dict__.setdefault("_streamrt_compiled", {})
        compiled = per_options.get(options)
        if compiled is None:
            if options.backend == "inductor":
                use_compile_cache(options.cache_dir)
            if next(module.parameters()).device.type == "cuda":
                module.to(memory_format=torch.channels_last)
            kwargs = dict(backend=options.backend, dynamic=False)
            if options.backend == "inductor":
                kwargs["mode"] = options.mode
            compiled = per_options[options] = torch.compile(module, **kwargs)
            logger.info("torch.compile (%s, mode=%s) copy of a ControlNet made", options.backend, options.mode)
        return compiled
