"""Reading weight files safely: safetensors, and pickles only as plain tensors.

The one place that opens a checkpoint, LoRA or TAESD file, shared by :mod:`streamrt.loading`,
:mod:`streamrt.checkpoints` and :mod:`streamrt.lora`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
import threading
from pathlib import Path

import torch

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
#: file types a checkpoint or LoRA may have (pickles are only ever read as plain tensors)
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the file and the reason."""


#: sha256 of files already hashed by this process, by file identity (device, inode, size, mtime_ns)
_DIGESTS: dict[tuple[int, int, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime_ns): changes whenever the file is rewritten or replaced."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def content_digest_and_stat(path: str | os.PathLike, chunk: int = 1 << 22) -> tuple[str, os.stat_result]:
    """:func:`content_digest` of ``path`` and the stat of the file it hashed (the identity it is memoised by)."""
    path = Path(path)
    for _ in range(3):
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        with _DIGESTS_LOCK:
            known = _DIGESTS.get(file_identity(st))
        if known is not None:
            return known, st
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            while block := f.read(chunk):
                digest.update(block)
            after = os.fstat(f.fileno())
        if file_identity(before) == file_identity(after) == file_identity(st):
            with _DIGESTS_LOCK:
                _DIGESTS[file_identity(st)] = digest.hexdigest()
            return digest.hexdigest(), st
    raise OSError(f"{path} kept changing while it was being hashed")


def content_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of the bytes of the file at ``path``: what the file is, wherever it lies.

    Memoised in-process by the file's identity (device, inode, size, mtime_ns), so a file is read
    once per process while it is unchanged, whatever path it is reached by; a rewritten or replaced
    file is read again. Reading costs about a second per GB (disk or page cache permitting).

    Raises:
        OSError: no such file, not a regular file, or a file that kept changing while being read.
    """
    return content_digest_and_stat(path)[0]


def check_weight_file(path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ModelLoadError(f"{path}: unsupported file type {path.suffix!r} (use .safetensors; .ckpt/.pt/.pth/.bin "
                             "are read as plain tensors only)")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, on the CPU, without running any code from the file.

    ``.safetensors`` (and ``.sft``) files are read directly. ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` go
    through ``torch.load(weights_only=True)``: a pickle that needs anything but tensors and plain
    containers (and so could run code) is refused. A top-level ``state_dict`` entry is unwrapped.

    Raises:
        ModelLoadError: missing file, unsupported type, truncated or corrupt file, refused pickle.
    """
    path = Path(path)
    check_weight_file(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - the safetensors error types are not public
            raise ModelLoadError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # torch names what the pickle wanted to import or call ("Unsupported global: GLOBAL os.system")
        detail = next((line for line in lines if any(w in line.lower() for w in ("global", "class", "reduce"))), None)
        if detail is None:
            detail = next((line for line in lines if line.startswith("Unsupported")), lines[-1] if lines else "")
            raise ModelLoadError(
                f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {detail}") from None
        detail = detail[:200]
        raise ModelLoadError(
            f"{path} was refused: it is a pickle that would need to run code to load ({detail}). StreamRT reads "
            ".ckpt/.pt files only as plain tensors (torch.load weights_only=True); use a .safetensors version "
            "of this model.") from None
    except Exception as exc:  # noqa: BLE001 - zip / EOF / magic-number errors of torch.load
        raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)} if isinstance(data, dict) else {}
    if not tensors:
        raise ModelLoadError(f"{path} holds no tensors")
    return tensors


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a weight file; for safetensors from the header alone (no tensor is read)."""
    path = Path(path)
    check_weight_file(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {k: tuple(v.shape) for k, v in read_weights(path).items()}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
