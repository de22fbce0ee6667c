"""The engine cache: where engines live on disk, what they were built for, and whether to trust them.

Layout under a cache folder (in ComfyUI: the model folder kind ``streamrt_engines``, by default
``models/streamrt_engines``, with the pack's old ``engine_cache/`` still read)::

    <root>/<weights>/<component>_<shapes>_<precision>_<backend>-<version>_<target>_kv<window>_<digest>.engine
    <root>/<weights>/<same name>.json        metadata sidecar: the key, the engine's sha256 and size
    <root>/timing/<backend>-<version>-<target>.cache   TensorRT timing cache, shared by builds
    <root>/.staging/<id>/                     a build in progress (ONNX export, partial engine)

``<weights>`` is the weights fingerprint (a readable label plus a hash of
:attr:`StreamModels.identity <streamrt.models.StreamModels.identity>`, with the weight files and the
LoRA set counted by the content of their files, not their paths). The :class:`EngineKey` holds
everything that changes an engine's bytes; its digest is part of the file name, so a changed key is a
different file (a cache miss), never a stale hit.

Writes are atomic: the engine is built inside ``.staging`` (same file system), moved into place with
``os.replace``, and only then is the sidecar written (itself through a temporary file). The sidecar
is the commit record: an engine without a matching sidecar is never used, an interrupted build
leaves nothing under the engine's name, and a leftover staging folder is removed later.

Every load checks the sidecar (format, key) and the file (size, sha256). A mismatch raises
:class:`InvalidEngineError` saying what is wrong; callers with the models at hand rebuild
(:func:`streamrt.engines.build.ensure_engine`), the others refuse with that message.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import stat as stat_mod
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models import StreamModels
from ..weights import content_digest_and_stat, file_identity
from .spec import ENGINE_FORMAT, EngineShapes

logger = logging.getLogger(__name__)

ENGINE_SUFFIX = ".engine"
META_SUFFIX = ".json"
STAGING_DIR = ".staging"
TIMING_DIR = "timing"
#: staging folders older than this are leftovers of a killed process
STALE_STAGING_SECONDS = 6 * 3600

#: a sidecar is a few kB; a bigger file is not one (and is not read whole)
MAX_SIDECAR_BYTES = 1 << 20

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
#: identity entries that describe where the weights are loaded, not what they are
_RUNTIME_ONLY_IDENTITY = ("device", "dtype")


class EngineCacheError(RuntimeError):
    """An engine could not be found, stored or trusted; the message says which and why."""


class EngineNameError(EngineCacheError, ValueError):
    """An engine name that would leave the engine folder (or is not a plain relative name)."""


class InvalidEngineError(EngineCacheError):
    """An engine file that must not be used.

    ``reason`` is one of ``"missing"`` (no file), ``"outside"`` (a link, or in a folder that is one, that
    leads out of the cache: never read), ``"metadata"`` (no sidecar, or one that is unreadable,
    malformed or describes another engine than its file name says),
    ``"corrupt"`` (size or sha256 differ from the sidecar), ``"stale"`` (another engine format,
    backend version or target) and ``"mismatch"`` (built for another key).
    """

    def __init__(self, message: str, *, reason: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.path = path


def sanitize(text: str, fallback: str = "model", limit: int = 48) -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``._+-``), never empty, never hidden."""
    cleaned = _UNSAFE.sub("-", str(text)).strip(".-_")[:limit].strip(".-_")
    return cleaned or fallback


def weights_folder(weights: str) -> str:
    """The folder (inside a cache root) of one weights fingerprint's engines."""
    return sanitize(weights, limit=80)


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


_COMPONENT_DIRS = {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "feature_extractor", "safety_checker"}


def _identity_label(identity: Mapping) -> str:
    """A readable model name: the diffusers folder or the checkpoint file of the first weight file."""
    if identity.get("name"):
        return str(identity["name"])
    files = [f[0] if isinstance(f, (list, tuple)) else f for f in identity.get("files", ())]
    if files:
        first = Path(str(files[0]))
        if first.name == "model_index.json" or first.parent.name in _COMPONENT_DIRS:
            return (first.parent.parent if first.parent.name in _COMPONENT_DIRS else first.parent).name
        return first.stem
    return str(identity.get("kind", "model"))


def _hash_state_dict(digest: Any, module: torch.nn.Module) -> None:
    """Feed every tensor of ``module``'s state dict (name, dtype, shape and bytes, in name order) to ``digest``."""
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")


def _hash_weights(models: StreamModels) -> str:
    digest = hashlib.sha256()
    for part in (models.unet, models.vae):
        _hash_state_dict(digest, part)
    return digest.hexdigest()


def _file_content(path: Any, size: Any, mtime_ns: Any) -> list:
    """What an identity's ``(path, size, mtime_ns)`` file entry holds: ``["sha256", <hex>]`` of its bytes
    when the file on disk is still the one the identity recorded; else the recorded entry itself (a file
    gone or rewritten since the models were loaded: the weights in memory are not its present bytes)."""
    try:
        digest, st = content_digest_and_stat(str(path))
    except (OSError, ValueError) as exc:
        logger.debug("weights fingerprint: %s not hashed (%s); keyed by its path", path, exc)
        return ["file", str(path), size, mtime_ns]
    if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
        logger.warning("%s changed since the models were loaded: their engines are keyed by its path until the "
                       "pipeline is loaded again", path)
        return ["file", str(path), size, mtime_ns]
    return ["sha256", digest]


def _is_file_entry(entry: Any, width: int) -> bool:
    return (isinstance(entry, (list, tuple)) and len(entry) == width and isinstance(entry[0], str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in entry[1:3]))


def _content_identity(identity: Mapping) -> dict:
    """``identity`` with the weight files (``files``: ``(path, size, mtime_ns)``) and LoRA files (``loras``:
    ``(path, size, mtime_ns, strength_model, strength_clip)``) replaced by digests of their bytes (entries of
    another shape are kept as they are)."""
    out = dict(identity)
    if isinstance(identity.get("files"), (list, tuple)):
        out["files"] = [_file_content(*f) if _is_file_entry(f, 3) else f for f in identity["files"]]
    if isinstance(identity.get("loras"), (list, tuple)):
        out["loras"] = [_file_content(*lora[:3]) + list(lora[3:]) if _is_file_entry(lora, 5) else lora
                        for lora in identity["loras"]]
    return out


def weights_fingerprint(models: StreamModels) -> str:
    """``<label>-<16 hex>``: what the UNet/VAE weights are, for the cache key and folder name.

    From :attr:`StreamModels.identity` (weight files, LoRA set, prediction type...), without the entries
    that only say where the weights were loaded (device, dtype: the engine precision is its own key
    field). The files count by their content, not by where they lie: each weight and LoRA file is
    hashed (:func:`streamrt.weights.content_digest`), so a copy, another mount or a symlinked models
    folder finds the same engines, and a changed weight finds none. The label is the model's name (the
    checkpoint's file name or the diffusers folder's), so a copy under another name has its own engines.

    Cost: the first call reads every file of the identity once (sha256, about a second per GB: a few
    seconds for an SD1.5 checkpoint; for a diffusers folder every file the identity lists under it,
    text encoder and any extra variants included); files are memoised in-process by identity (device,
    inode, size, mtime_ns) and the result on ``models``, so later calls cost a few ``stat`` at most.
    It is only called where engines are looked up or built (Build / Load Engines, attaching engines
    to a stream when a TensorRT backend is usable), never on the realtime path of a stream that runs
    without TensorRT.

    Models whose identity names no files (built in memory, or a host's models with its patches applied) are
    fingerprinted by hashing their UNet and VAE weights, which takes seconds for full-size models.
    """
    identity = {k: v for k, v in (models.identity or {}).items() if k not in _RUNTIME_ONLY_IDENTITY}
    text = _canonical(identity)
    memo = getattr(models, "_streamrt_weights_fingerprint", None)
    if memo is not None and memo[0] == text:
        return memo[1]
    if identity.get("files"):
        content = _canonical(_content_identity(identity))
        digest, label = hashlib.sha256(content.encode()).hexdigest(), _identity_label(identity)
    else:
        # No files say what the weights are (built in memory, or handed over by a host with its patches
        # applied): only their bytes can.
        logger.info("the models were not loaded from files: fingerprinting them by hashing their weights")
        digest, label = _hash_weights(models), str(identity.get("name") or "unnamed")
    fingerprint = f"{sanitize(label, limit=32)}-{digest[:16]}"
    models._streamrt_weights_fingerprint = (text, fingerprint)
    return fingerprint


def controlnet_fingerprint(controlnet: torch.nn.Module) -> str:
    """``controlnet-<16 hex>``: what a ControlNet's weights are, for its engines' key and folder.

    A sha256 of its class, its config (without the ``_``-prefixed entries that say where it was loaded from) and
    every tensor of its state dict (names, dtypes, shapes and bytes). Hashing reads the weights once (about a
    second for an SD1.5 ControlNet's 700 MB in fp16); the result is kept on the module, so later calls are free.
    It is only called where ControlNet engines are built or looked up. The module is taken as it is: the same
    ControlNet loaded in another dtype hashes differently and gets its own engines. A module whose weights are
    changed in place after the first call keeps its first fingerprint (StreamRT never changes a ControlNet's
    weights; a host that does should load a new module).
    """
    memo = getattr(controlnet, "_streamrt_engine_fingerprint", None)
    if isinstance(memo, str):
        return memo
    digest = hashlib.sha256(type(controlnet).__name__.encode())
    config = getattr(controlnet, "config", None) or {}
    digest.update(_canonical({k: v for k, v in dict(config).items() if not str(k).startswith("_")}).encode())
    _hash_state_dict(digest, controlnet)
    fingerprint = f"controlnet-{digest.hexdigest()[:16]}"
    controlnet._streamrt_engine_fingerprint = fingerprint  # noqa: SLF001 - a memo on the shared module, see above
    return fingerprint


@dataclass(frozen=True)
class EngineKey:
    """Everything that changes an engine's bytes.

    Args:
        weights (`str`): :func:`weights_fingerprint` of the models (weights files + LoRA set).
        family (`str`): the models' family (:attr:`streamrt.families.ModelFamily.name`: ``sd1``, ``sd2``,
            ``sdxl``). It decides the engine's I/O (SDXL's UNet takes its added conditions), so engines of two
            families never share a key, whatever their weights fingerprints say.
        component (`str`): ``unet``, ``vae_encoder`` or ``vae_decoder``.
        shapes (`EngineShapes`): batch rows and resolution (fixed or ranges), plus extra I/O symbols.
        precision (`str`): ``fp16`` or ``fp32``.
        backend (`str`): ``tensorrt-rtx`` or ``tensorrt``.
        backend_version (`str`): the backend's version (engines do not load across versions).
        target (`str`): compute capability the engine runs on, e.g. ``SM89``.
        cache_window (`int`, defaults to `0`): cached-attention ring size in the engine's I/O.
        format (`int`): :data:`~streamrt.engines.spec.ENGINE_FORMAT`, StreamRT's export/build recipe.
        control (`bool`, defaults to `False`): a UNet that takes the ControlNet residuals as inputs (built for
            streams with ControlNets; a plain UNet engine cannot run those streams, nor this one a plain stream).

    ``control`` is written into the key's JSON (and so into its digest and file name) only when set: the keys of
    every engine built before it existed, all plain, keep their digests, so those engines stay valid without an
    :data:`~streamrt.engines.spec.ENGINE_FORMAT` bump (which would rebuild them all for nothing: their bytes have
    not changed), while a UNet with residual inputs can never share a key with a plain one. A StreamRT older
    than this field refuses such an engine (its sidecar's key has a field it does not know).

    A ControlNet's engine (component ``controlnet``) is keyed by the ControlNet's own weights
    (:func:`controlnet_fingerprint` in ``weights``), the pipeline's family (its text width and added conditions
    decide the engine's inputs) and the shapes, like any other.
    """

    weights: str
    family: str
    component: str
    shapes: EngineShapes
    precision: str
    backend: str
    backend_version: str
    target: str
    cache_window: int = 0
    format: int = ENGINE_FORMAT
    control: bool = False

    def to_json(self) -> dict:
        data = {"weights": self.weights, "family": self.family, "component": self.component,
                "shapes": self.shapes.to_json(),
                "precision": self.precision, "backend": self.backend, "backend_version": self.backend_version,
                "target": self.target, "cache_window": self.cache_window, "format": self.format}
        # fields added later are left out at their default: the keys of older engines keep their digests (see above)
        data.update({name: getattr(self, name) for name, default in _LEFT_OUT_AT_DEFAULT.items()
                     if getattr(self, name) != default})
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> EngineKey:
        return cls(weights=str(data["weights"]), family=str(data["family"]), component=str(data["component"]),
                   shapes=EngineShapes.from_json(data["shapes"]), precision=str(data["precision"]),
                   backend=str(data["backend"]), backend_version=str(data["backend_version"]),
                   target=str(data["target"]), cache_window=int(data.get("cache_window", 0)),
                   format=int(data.get("format", 0)),
                   control=_flag(data.get("control", _LEFT_OUT_AT_DEFAULT["control"]), "control"))

    def digest(self) -> str:
        return hashlib.sha256(_canonical(self.to_json()).encode()).hexdigest()[:16]

    def file_name(self) -> str:
        stem = (f"{self.component}{'-control' if self.control else ''}_{self.shapes.label()}_{self.family}_"
                f"{self.precision}_{self.backend}-{self.backend_version}_{self.target}_kv{self.cache_window}")
        return f"{sanitize(stem, limit=150)}_{self.digest()[:10]}{ENGINE_SUFFIX}"

    def relative_name(self) -> str:
        """``<weights>/<file name>``: the engine's name inside a cache folder."""
        return f"{weights_folder(self.weights)}/{self.file_name()}"

    def differences(self, other: EngineKey) -> list[str]:
        """``["target: SM86 != SM89", ...]`` for the fields where ``other`` differs from self."""
        mine, theirs = {**_LEFT_OUT_AT_DEFAULT, **self.to_json()}, {**_LEFT_OUT_AT_DEFAULT, **other.to_json()}
        return [f"{k}: {theirs[k]} != {mine[k]}" for k in mine if mine[k] != theirs[k]]

    def describe(self) -> str:
        window = f", cache window {self.cache_window}" if self.cache_window else ""
        control = ", ControlNet residual inputs" if self.control else ""
        return (f"{self.component} ({self.family}, {self.shapes.label()}, {self.precision}, {self.backend} "
                f"{self.backend_version}, {self.target}{window}{control})")


#: EngineKey fields written into its JSON only when they differ from these defaults (added after engines existed)
_LEFT_OUT_AT_DEFAULT: dict[str, Any] = {"control": False}


def _flag(value: Any, what: str) -> bool:
    """A sidecar's boolean, refused (ValueError) when it is anything else (``"false"`` would be truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class EngineRecord:
    """A verified engine on disk."""

    key: EngineKey
    path: Path
    sha256: str
    size: int
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def pixel_multiple(self) -> int:
        """Width and height must be multiples of this (checked by :meth:`EngineCache.verify`: a positive int)."""
        return int(self.meta.get("pixel_multiple", 1))


@dataclass(frozen=True)
class CacheEntry:
    """One engine file found while listing: a verified ``record``, or the ``error`` that rules it out."""

    path: Path
    record: EngineRecord | None
    error: InvalidEngineError | None = None


@dataclass(frozen=True)
class Lookup:
    """The result of :meth:`EngineCache.lookup`: ``record`` on a hit, else ``error`` (why not)."""

    key: EngineKey
    record: EngineRecord | None
    error: InvalidEngineError

    @property
    def hit(self) -> bool:
        return self.record is not None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_sidecar(path: Path) -> tuple[bytes, os.stat_result]:
    """The bytes of the sidecar at ``path`` and the stat of the file they were read from. Only a regular
    file is read (a FIFO would block, a device never end), and at most :data:`MAX_SIDECAR_BYTES` of it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat_mod.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > MAX_SIDECAR_BYTES:
            raise ValueError(f"{st.st_size} bytes, more than a sidecar ever holds ({MAX_SIDECAR_BYTES})")
        return f.read(MAX_SIDECAR_BYTES + 1), st


class _OtherFormat(ValueError):
    """A sidecar written by another engine format: its key may have other fields, so it is not parsed further."""

    def __init__(self, found: int) -> None:
        super().__init__(f"engine format {found}")
        self.found = found


def _parse_sidecar(data: bytes) -> tuple[dict, EngineKey, str, int]:
    """(metadata, key, sha256, bytes) of a sidecar; raises ``ValueError`` naming what is wrong (:class:`_OtherFormat`
    for a sidecar of another engine format). Checks every field the cache and the runner read (``pixel_multiple``,
    ``inputs``), so they can use them as they are."""
    meta = json.loads(data)
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    if not isinstance(meta.get("key"), dict):
        raise ValueError("no 'key' object")
    found = meta["key"].get("format")
    if _is_int(found) and found != ENGINE_FORMAT:
        # checked before the key is parsed: a key of another format may lack fields of this one (format 1 had no
        # family), and such an engine is stale, not malformed
        raise _OtherFormat(found)
    key = EngineKey.from_json(meta["key"])
    if key.to_json() != meta["key"]:
        raise ValueError("the key has unknown fields or values of the wrong type")
    engine = meta.get("engine")
    if not isinstance(engine, dict):
        raise ValueError("no 'engine' object")
    sha, size = engine.get("sha256"), engine.get("bytes")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise ValueError(f"engine.sha256 {sha!r:.80} is not a sha256 digest")
    if not _is_int(size) or size <= 0:
        raise ValueError(f"engine.bytes {size!r:.80} is not a positive integer")
    multiple = meta.get("pixel_multiple", 1)
    if not _is_int(multiple) or multiple <= 0:
        raise ValueError(f"pixel_multiple {multiple!r:.80} is not a positive integer")
    inputs = meta.get("inputs", [])
    if not isinstance(inputs, list) or not all(isinstance(t, list) and t and isinstance(t[0], str) for t in inputs):
        raise ValueError("inputs is not a list of [name, dims, dtype] entries")
    return meta, key, sha, size


class EngineCache:
    """Engines under ``root`` (written and read) and ``extra_roots`` (only read).

    Args:
        root: the folder new engines go to (created when needed).
        extra_roots: more folders searched by :meth:`lookup`, :meth:`find` and :meth:`entries`.
    """

    def __init__(self, root: str | os.PathLike, *, extra_roots: tuple[str | os.PathLike, ...] = ()) -> None:
        self.root = Path(root).expanduser().resolve()
        roots = [self.root]
        for extra in extra_roots:
            path = Path(extra).expanduser().resolve()
            if path not in roots:
                roots.append(path)
        self.roots: tuple[Path, ...] = tuple(roots)
        #: path -> ((engine identity, sidecar identity, sha256), record) of engines verified by this process
        self._verified: dict[Path, tuple[tuple, EngineRecord]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EngineCache({str(self.root)!r}, extra_roots={[str(r) for r in self.roots[1:]]})"

    # names -----------------------------------------------------------------------------------------
    def resolve(self, name: str, root: Path | None = None) -> Path:
        """The path of engine ``name`` (``<folder>/<file>``) under ``root``, refusing anything that could
        leave it: absolute paths, ``..``, drive letters, backslashes, hidden or odd names, symlinks out."""
        root = self.root if root is None else root
        if not isinstance(name, str) or not name or "\x00" in name:
            raise EngineNameError(f"invalid engine name {name!r}")
        if "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            raise EngineNameError(f"engine name {name!r} must be a relative name like 'folder/file.engine'")
        parts = name.split("/")
        if len(parts) > 2 or any(not _NAME_PART.match(p) or p in (".", "..") for p in parts):
            raise EngineNameError(f"engine name {name!r} is not a plain '<folder>/<file>' name inside the engine "
                                  f"folder (letters, digits and ._+- only; no '..')")
        path = (root / Path(*parts)).resolve()
        if not path.is_relative_to(root):
            raise EngineNameError(f"engine name {name!r} resolves outside the engine folder {root}")
        return path

    def _root_of(self, path: Path) -> Path | None:
        """The root ``path`` lies in by name (before following links), or None."""
        return next((root for root in self.roots if path.is_relative_to(root)), None)

    def _check_inside(self, path: Path, what: str) -> None:
        """Raise :class:`InvalidEngineError` (reason ``"outside"``) when ``path`` is not in a root, or is (or lies
        in) a link that leads out of its root: such a file is never read or hashed."""
        root = self._root_of(path)
        if root is None:
            raise InvalidEngineError(f"{what} {path} is not inside the engine cache ({', '.join(map(str, self.roots))})"
                                     ": it is not used", reason="outside", path=path)
        real = path.resolve()
        if not real.is_relative_to(root):
            raise InvalidEngineError(f"{what} {path} leads to {real}, outside the engine cache {root} (a link): it is "
                                     "not read, and nothing is built through it; remove the link",
                                     reason="outside", path=path)

    def engine_path(self, key: EngineKey, root: Path | None = None) -> Path:
        return self.resolve(key.relative_name(), root)

    @staticmethod
    def meta_path(engine: Path) -> Path:
        return engine.with_suffix(META_SUFFIX)

    def timing_cache_path(self, backend: str, version: str, target: str) -> Path:
        return self.resolve(f"{TIMING_DIR}/{sanitize(f'{backend}-{version}-{target}')}.cache")

    # verification ----------------------------------------------------------------------------------
    def verify(self, path: str | os.PathLike, expected: EngineKey | None = None) -> EngineRecord:
        """Check the engine at ``path`` against its sidecar (and ``expected``); raises
        :class:`InvalidEngineError`. A file verified before and unchanged since is not hashed again.

        Nothing in the sidecar is taken on trust: it must parse into a well-formed key whose file name
        and weights folder are the engine's own (the key's digest is in the name, so a sidecar edited to
        claim other shapes, weights or target is caught), equal to ``expected`` when given, and the
        file's size and sha256 must be the ones it records. Whatever is wrong with a sidecar (bad JSON,
        ``1e999``, deep nesting, a FIFO, a zero ``pixel_multiple``...) rules out this engine only, with
        reason ``"metadata"`` and the problem named.
        """
        path = Path(os.path.abspath(path))
        meta_path = self.meta_path(path)
        self._check_inside(path, "engine")
        if not path.is_file():
            raise InvalidEngineError(f"no engine file at {path}", reason="missing", path=path)
        self._check_inside(meta_path, "engine metadata")
        try:
            data, mstat = _read_sidecar(meta_path)
        except FileNotFoundError:
            raise InvalidEngineError(f"engine {path.name} has no metadata file {meta_path.name}: an interrupted or "
                                     "foreign build; it is not used", reason="metadata", path=path) from None
        except (OSError, ValueError) as exc:
            raise InvalidEngineError(f"engine metadata {meta_path} is unreadable ({exc}); the engine is not used",
                                     reason="metadata", path=path) from None
        try:
            meta, key, sha, size = _parse_sidecar(data)
        except _OtherFormat as exc:
            raise InvalidEngineError(f"engine {path.name} was built by StreamRT engine format {exc.found}, this "
                                     f"version uses {ENGINE_FORMAT}: it is stale", reason="stale", path=path) from None
        except Exception as exc:  # the sidecar is untrusted input: whatever it makes the parser raise
            # (ValueError, OverflowError from 1e999, RecursionError from deep nesting...) rules out this engine only
            problem = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
            raise InvalidEngineError(f"engine metadata {meta_path} is malformed ({problem:.300}); the engine is not "
                                     "used", reason="metadata", path=path) from None
        if key.file_name() != path.name or weights_folder(key.weights) != path.parent.name:
            raise InvalidEngineError(
                f"the metadata of engine {path.parent.name}/{path.name} describes another engine ({key.describe()} "
                f"for weights {key.weights}, which would be {key.relative_name()}): it does not belong to this "
                "file, and the engine is not used", reason="metadata", path=path)
        if expected is not None and key != expected:
            diffs = "; ".join(expected.differences(key))
            stale = {"backend_version", "target", "format"}
            reason = "stale" if all(d.split(":")[0] in stale for d in expected.differences(key)) else "mismatch"
            raise InvalidEngineError(f"engine {path.name} was built for something else ({diffs})",
                                     reason=reason, path=path)
        stat = path.stat()
        if stat.st_size != size:
            raise InvalidEngineError(f"engine {path.name} is truncated or corrupt: {stat.st_size} bytes, its "
                                     f"metadata says {size}", reason="corrupt", path=path)
        # verified once per file identity: the same engine and sidecar files (device, inode), unchanged (size,
        # mtime_ns); a file rewritten or replaced by another, even with the same size and mtime, is hashed again
        stamp = (file_identity(stat), file_identity(mstat), sha)
        with self._lock:
            memo = self._verified.get(path)
        if memo is not None and memo[0] == stamp:
            return memo[1]
        actual = sha256_file(path)
        if actual != sha:
            raise InvalidEngineError(f"engine {path.name} is corrupt: sha256 {actual[:12]}... differs from the "
                                     f"{sha[:12]}... recorded when it was built", reason="corrupt", path=path)
        record = EngineRecord(key=key, path=path, sha256=sha, size=size, meta=meta)
        if file_identity(path.stat()) == stamp[0]:  # not remembered when it changed while it was hashed
            with self._lock:
                self._verified[path] = (stamp, record)
        return record

    def lookup(self, key: EngineKey) -> Lookup:
        """The verified engine for ``key`` in any root, or why there is none."""
        first_error: InvalidEngineError | None = None
        for root in self.roots:
            path = root / key.relative_name()  # key names are plain (sanitized); verify refuses links out of root
            try:
                return Lookup(key, self.verify(path, key), InvalidEngineError("hit", reason="hit", path=path))
            except InvalidEngineError as exc:
                if exc.reason != "missing" and first_error is None:
                    first_error = exc
        if first_error is None:
            first_error = InvalidEngineError(f"no engine for {key.describe()} in {', '.join(map(str, self.roots))}",
                                             reason="missing", path=self.root / key.relative_name())
        return Lookup(key, None, first_error)

    def load(self, key: EngineKey) -> EngineRecord:
        """The verified engine for ``key``; raises :class:`InvalidEngineError` with the reason (for callers
        that cannot rebuild: build it with the Build Engines node / :func:`~streamrt.engines.build_engines`)."""
        found = self.lookup(key)
        if found.record is None:
            raise InvalidEngineError(f"{found.error} (rebuild it with Build Engines)", reason=found.error.reason,
                                     path=found.error.path)
        return found.record

    # listing -------------------------------------------------------------------------------------
    def entries(self, weights: str | None = None) -> list[CacheEntry]:
        """Every engine file in the roots (of one weights fingerprint when given), verified or not."""
        out: list[CacheEntry] = []
        for root in self.roots:
            if not root.is_dir():
                continue
            folders = [root / weights_folder(weights)] if weights else sorted(p for p in root.iterdir() if p.is_dir())
            for folder in folders:
                if folder.name in (STAGING_DIR, TIMING_DIR) or not folder.is_dir():
                    continue
                try:
                    self._check_inside(folder, "engine folder")  # a link out of the cache is not even listed
                except InvalidEngineError as exc:
                    out.append(CacheEntry(folder, None, exc))
                    continue
                for path in sorted(folder.glob(f"*{ENGINE_SUFFIX}")):
                    try:
                        out.append(CacheEntry(path, self.verify(path)))
                    except InvalidEngineError as exc:
                        out.append(CacheEntry(path, None, exc))
        return out

    def find(self, weights: str, component: str, *, rows: int, width: int, height: int, precision: str | None = None,
             backend: str | None = None, backend_version: str | None = None, target: str | None = None,
             cache_window: int = 0, family: str | None = None, control: bool = False) -> list[EngineRecord]:
        """Valid engines that accept ``rows`` x ``width`` x ``height`` (inside their ranges, and multiples of
        the size step a dynamic UNet needs), of ``family`` when given, with ControlNet residual inputs exactly
        when ``control``: exact static shapes first, then the ranges tuned (``opt``) nearest to it."""
        found = []
        for entry in self.entries(weights):
            rec = entry.record
            if rec is None:
                continue
            k = rec.key
            if (k.weights != weights or k.component != component or k.cache_window != cache_window
                    or k.control != control
                    or (family and k.family != family)
                    or not k.shapes.covers(rows, width, height) or k.shapes.extra
                    or width % rec.pixel_multiple or height % rec.pixel_multiple
                    or (precision and k.precision != precision) or (backend and k.backend != backend)
                    or (backend_version and k.backend_version != backend_version) or (target and k.target != target)):
                continue
            found.append(rec)
        return sorted(found, key=lambda r: (not r.key.shapes.is_static,
                                            abs(r.key.shapes.width.opt - width) + abs(r.key.shapes.height.opt - height)
                                            + abs(r.key.shapes.rows.opt - rows), r.name))

    # writing ---------------------------------------------------------------------------------------
    def _staging_base(self) -> Path:
        """``<root>/.staging``, refused (:class:`EngineCacheError`) when it is a link or leads elsewhere.

        Refused rather than ignored: a build has to stage inside the cache (the finished engine is moved
        into place with ``os.replace``, which needs the same file system, and nothing is written outside
        the cache), and the leftover cleanup removes what it finds there, so following a link would build
        in, and delete from, a folder that is not the cache's. An error naming the link lets the user
        remove it; nothing is created or deleted through it.
        """
        base = self.root / STAGING_DIR
        if base.is_symlink() or base.resolve() != base or (base.exists() and not base.is_dir()):
            raise EngineCacheError(f"the engine cache's staging folder {base} is a link or not a folder (it leads to "
                                   f"{base.resolve()}): builds stage and clean up only inside the cache, so nothing "
                                   "is built or deleted there; remove it")
        return base

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A private folder under ``<root>/.staging`` for one build; removed on exit, whatever happens."""
        base = self._staging_base()
        base.mkdir(parents=True, exist_ok=True)
        base = self._staging_base()  # not replaced by a link meanwhile
        self.clean_staging()
        folder = base / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def clean_staging(self, max_age: float = STALE_STAGING_SECONDS) -> int:
        """Remove staging folders left by killed processes (older than ``max_age`` seconds).

        Never follows a link: a ``.staging`` that is one is refused (see :meth:`_staging_base`), a link
        inside it is removed itself (not what it points to), and ``shutil.rmtree`` does not follow links
        inside the folders it removes."""
        base = self._staging_base()
        removed = 0
        if base.is_dir():
            now = time.time()
            for entry in base.iterdir():
                with contextlib.suppress(OSError):
                    st = entry.lstat()
                    if now - st.st_mtime > max_age:
                        if stat_mod.S_ISDIR(st.st_mode):
                            shutil.rmtree(entry, ignore_errors=True)
                        else:
                            entry.unlink()
                        removed += 1
        return removed

    def commit(self, key: EngineKey, built: str | os.PathLike, meta: Mapping | None = None) -> EngineRecord:
        """Move the finished engine file ``built`` (inside this cache's staging folder) into place under
        ``key`` and write its sidecar. Atomic: readers see the old engine, no engine, or the new one."""
        built = Path(built)
        size = built.stat().st_size
        if size == 0:
            raise EngineCacheError(f"refusing to store an empty engine file for {key.describe()}")
        sha = sha256_file(built)
        final = self.engine_path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        sidecar = self.meta_path(final)
        record_meta = {
            "streamrt_engine": ENGINE_FORMAT,
            "key": key.to_json(),
            "engine": {"file": final.name, "sha256": sha, "bytes": size},
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            **dict(meta or {}),
        }
        with contextlib.suppress(FileNotFoundError):
            sidecar.unlink()  # from here until the new sidecar exists, the old engine is not trusted
        os.replace(built, final)
        _atomic_write_text(sidecar, json.dumps(record_meta, indent=2, sort_keys=True, default=str))
        logger.info("stored engine %s (%.1f MB)", final, size / 1e6)
        return self.verify(final, key)

    def remove(self, key: EngineKey) -> bool:
        """Delete the engine for ``key`` (and its sidecar) from the write root; True when there was one."""
        path = self.engine_path(key)
        existed = path.exists()
        for p in (self.meta_path(path), path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with self._lock:
            self._verified.pop(path, None)
        return existed
