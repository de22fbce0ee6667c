"""Loading a :class:`~streamrt.models.StreamModels` from files on disk, offline.

Diffusers folders (``model_index.json`` + component folders) and TAESD folders. Nothing here
reaches the network: every ``from_pretrained`` runs with ``local_files_only=True``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .models import StreamModels

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the file and the reason."""


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """``"auto"`` means float16 on CUDA and float32 elsewhere; names like ``"fp16"`` are accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, fp16, bf16 or fp32")
    return names[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` means the current CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is available; use 'auto' or 'cpu'")
    return device


def file_fingerprint(paths: list[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every weight file under ``paths``: cheap identity for caches."""
    out = []
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
    return out


def load_taesd(folder: str | os.PathLike, *, dtype: torch.dtype, device: torch.device):
    """An ``AutoencoderTiny`` from a diffusers folder."""
    from diffusers import AutoencoderTiny

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a diffusers AutoencoderTiny folder (no config.json)")
    try:
        return AutoencoderTiny.from_pretrained(folder, local_files_only=True, torch_dtype=dtype).to(device)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ModelLoadError(f"could not load TAESD from {folder}: {exc}") from exc


def load_diffusers_folder(folder: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
                          device: str | torch.device = "auto", taesd: str | os.PathLike | None = None) -> StreamModels:
    """Load UNet, VAE, text encoder, tokenizer and an LCM schedule from a diffusers folder.

    Args:
        folder: a folder with ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``
            and ``scheduler/``.
        dtype: ``auto`` | ``fp16`` | ``bf16`` | ``fp32`` or a torch dtype.
        device: ``auto`` | ``cpu`` | ``cuda[:i]``.
        taesd: optional AutoencoderTiny folder used instead of the folder's VAE.

    Raises:
        ModelLoadError: missing or unreadable files, with the path in the message.
    """
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder} is not a diffusers folder: model_index.json is missing")
    missing = [c for c in ("unet", "text_encoder", "tokenizer", "scheduler") if not (folder / c).is_dir()]
    if taesd is None and not (folder / "vae").is_dir():
        missing.append("vae")
    if missing:
        raise ModelLoadError(f"{folder} lacks the component folders {missing}")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True, torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True,
                                                     torch_dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        scheduler = LCMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
        vae = (load_taesd(taesd, dtype=dtype, device=device) if taesd is not None else
               AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True, torch_dtype=dtype))
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the folder named
        raise ModelLoadError(f"could not load the diffusers folder {folder}: {exc}") from exc
    identity = {"kind": "diffusers", "files": file_fingerprint([folder] + ([Path(taesd)] if taesd else [])),
                "dtype": str(dtype), "device": str(device)}
    logger.info("loaded diffusers folder %s (%s, %s)", folder, dtype, device)
    return StreamModels(unet=unet.to(device), vae=vae.to(device), text_encoder=text_encoder.to(device),
                        tokenizer=tokenizer, scheduler=scheduler, identity=identity)
