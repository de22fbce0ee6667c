"""Torch acceleration for the models of a pipeline: torch.compile with a persistent cache.

Compiling is separate from :class:`~streamrt.stream.Stream`'s CUDA-graph backend: a compiled UNet
and VAE run under either backend, and the ``cuda_graph`` backend then captures the compiled kernels.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .models import StreamModels

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / "engine_cache" / "torch_compile"


def use_compile_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Point inductor's on-disk caches at ``cache_dir`` (default: the pack's ``engine_cache/``), so a
    restart reuses compiled kernels instead of compiling from scratch. Call before compiling."""
    path = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return path


def compile_models(models: StreamModels, *, mode: str = "default", cache_dir: str | os.PathLike | None = None,
                   vae: bool = True) -> StreamModels:
    """``torch.compile`` the UNet (channels-last) and, with ``vae``, the VAE's encoder and decoder.

    Shapes are static (``dynamic=False``): each stream config compiles once; the cache makes later runs
    cheap. Returns ``models`` (modified in place). Compilation happens lazily, on the first call.
    """
    if getattr(models, "compiled", False):
        return models
    use_compile_cache(cache_dir)
    models.unet.to(memory_format=torch.channels_last)
    models.unet = torch.compile(models.unet, mode=mode, dynamic=False)
    if vae:
        models.vae.encoder = torch.compile(models.vae.encoder, mode=mode, dynamic=False)
        models.vae.decoder = torch.compile(models.vae.decoder, mode=mode, dynamic=False)
    models.compiled = True
    logger.info("torch.compile (mode=%s) applied to the UNet%s", mode, " and VAE" if vae else "")
    return models
