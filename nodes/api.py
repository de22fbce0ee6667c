"""The one module of the pack that touches ComfyUI: its public node API and runtime services.

Everything ComfyUI-specific that the node modules need goes through here, so a ComfyUI release
that moves something is a change in one file.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io  # noqa: F401  (re-exported for the node modules)

from ..streamrt.names import FolderIndex, plain_relative_name
from ..streamrt.weights import WEIGHT_SUFFIXES

logger = logging.getLogger(__name__)

CATEGORY = "StreamRT"
PIPELINE = io.Custom("STREAMRT_PIPELINE")


def schema_built_once(node: type[io.ComfyNode]) -> type[io.ComfyNode]:
    """Make a node's ``define_schema`` build its schema once per process and hand that one back after.

    ComfyUI asks a V3 node for its schema whenever it needs the node's inputs: at every prompt's validation,
    for each linked input while it orders the graph, for the cache key and for the execution itself (five
    calls per realtime execution for the sampler). For a node whose schema depends on nothing but the code
    (no folder listing), every call builds the same thing. ComfyUI only reads a schema, except ``finalize``,
    which is idempotent, so the same object can be handed back. (A schema that offers folder listings is
    built again when a listing changes: see ``nodes/loaders.py``.)
    """
    define = node.define_schema.__func__
    built: list[io.Schema] = []

    @functools.wraps(define)
    def define_schema(cls) -> io.Schema:
        if not built:
            built.append(define(cls))
        return built[0]

    node.define_schema = classmethod(define_schema)
    return node


def torch_device() -> torch.device:
    """ComfyUI's compute device (honours --cpu and --cuda-device)."""
    return model_management.get_torch_device()


_DIFFUSERS = FolderIndex("model_index.json")
_TAESD_FOLDERS = FolderIndex("config.json")


def diffusers_folders() -> list[str]:
    """Diffusers model folders (holding model_index.json) under ``models/diffusers`` (a cached listing)."""
    return _DIFFUSERS.names(folder_paths.get_folder_paths("diffusers"))


def resolve_diffusers_folder(name: str) -> str:
    """The folder of a name from :func:`diffusers_folders`; anything else is refused or not found."""
    return _DIFFUSERS.resolve(folder_paths.get_folder_paths("diffusers"), name, "diffusers model")


def taesd_folders() -> list[str]:
    """Diffusers AutoencoderTiny folders (config.json + weights) under ``models/vae_approx``."""
    return _TAESD_FOLDERS.names(folder_paths.get_folder_paths("vae_approx"))


def resolve_taesd_folder(name: str) -> str:
    return _TAESD_FOLDERS.resolve(folder_paths.get_folder_paths("vae_approx"), name, "TAESD folder")


class Progress:
    """ComfyUI's progress bar plus the interrupt check, as one ``progress(done, total)`` callback."""

    def __init__(self, total: int, node_id: str | None) -> None:
        self._bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def __call__(self, done: int, total: int) -> None:
        self._bar.update_absolute(done, total)
        model_management.throw_exception_if_processing_interrupted()


def check_interrupted() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (never swallow it)."""
    model_management.throw_exception_if_processing_interrupted()


class MemoryWatch:
    """Tells the pack when ComfyUI frees memory (``POST /free``, or room needed for other models).

    ComfyUI only unloads what it tracks as a ``ModelPatcher``. The pack registers one patcher around
    an empty module, sized like the pack's GPU use, each time it runs; when ComfyUI unloads it the
    ``ON_DETACH`` callback releases the pack's pipelines and streams, and the next run reloads.
    """

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self._patcher: comfy.model_patcher.ModelPatcher | None = None
        # A detached patcher must outlive ComfyUI's unload loop: dropping its last reference inside
        # the callback runs its finalizer, which edits the list ComfyUI is iterating.
        self._retired: comfy.model_patcher.ModelPatcher | None = None

    def _on_detach(self, patcher, unpatch_all: bool) -> None:
        # ComfyUI also detaches (unpatch_all=False) when a loaded model is loaded again; only a real
        # unload (free_memory -> model_unload) passes unpatch_all=True.
        if unpatch_all and patcher is self._patcher:
            logger.info("ComfyUI unloaded models: releasing StreamRT pipelines and streams")
            self._retired, self._patcher = self._patcher, None
            self._release(collect=False)

    def keep_registered(self, size_bytes: int) -> None:
        """Make sure ComfyUI counts the pack as a loaded model of ``size_bytes``."""
        if self._patcher is None:
            holder = torch.nn.Module()
            patcher = comfy.model_patcher.ModelPatcher(holder, load_device=torch_device(),
                                                       offload_device=model_management.unet_offload_device())
            patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH, self._on_detach)
            self._patcher = patcher
            model_management.load_models_gpu([patcher])
        # Report the pipelines' real size as loaded, so ComfyUI's memory planning accounts for it.
        self._patcher.size = max(int(size_bytes), 1)
        self._patcher.model.model_loaded_weight_memory = self._patcher.size


STATUS_EVENT = "streamrt.status"


def send_status(data: dict) -> None:
    """Send the sampler's status (fps, frames, backend, state) as a websocket event to the client that queued
    the prompt (as ComfyUI sends its own execution events; a prompt queued without a client id gets none)."""
    from server import PromptServer

    server = PromptServer.instance
    if server is not None and server.client_id is not None:
        server.send_sync(STATUS_EVENT, data, server.client_id)


# Model files for the loaders: checkpoints, LoRAs, ComfyUI's TAESD pair, CLIP tokenizer ---------------
LORAS = io.Custom("STREAMRT_LORAS")
#: file types listed as checkpoints / LoRAs (pickles are read as plain tensors only)


def checkpoint_files() -> list[str]:
    """Single-file checkpoints under every ``models/checkpoints`` path (names as ComfyUI lists them)."""
    return [n for n in folder_paths.get_filename_list("checkpoints") if n.lower().endswith(WEIGHT_SUFFIXES)]


def _resolve_listed(kind: str, name: str, what: str) -> str | None:
    """The path of ``name`` when ComfyUI lists it under ``models/<kind>`` (its own listing, cached the way it
    caches it), else None; an unsafe name is refused by name."""
    plain_relative_name(name, what)
    if not name.lower().endswith(WEIGHT_SUFFIXES) or name not in folder_paths.get_filename_list(kind):
        return None
    return folder_paths.get_full_path(kind, name)


def resolve_checkpoint(name: str) -> str | None:
    """Absolute path of a name from :func:`checkpoint_files`, or None."""
    return _resolve_listed("checkpoints", name, "checkpoint")


def lora_files() -> list[str]:
    """LoRA files under every ``models/loras`` path."""
    return [n for n in folder_paths.get_filename_list("loras") if n.lower().endswith(WEIGHT_SUFFIXES)]


def resolve_lora(name: str) -> str | None:
    """Absolute path of a name from :func:`lora_files`, or None."""
    return _resolve_listed("loras", name, "LoRA")


def comfy_taesd_files(name: str) -> tuple[str, str] | None:
    """ComfyUI's ``<name>_encoder.*`` and ``<name>_decoder.*`` in ``models/vae_approx`` (as VAELoader finds them)."""
    files = folder_paths.get_filename_list("vae_approx")
    encoder = next((f for f in files if f.startswith(f"{name}_encoder.")), None)
    decoder = next((f for f in files if f.startswith(f"{name}_decoder.")), None)
    if encoder is None or decoder is None:
        return None
    return (folder_paths.get_full_path_or_raise("vae_approx", encoder),
            folder_paths.get_full_path_or_raise("vae_approx", decoder))


def comfy_taesd_names() -> list[str]:
    """``["taesd"]`` when both of ComfyUI's SD1/SD2 TAESD files are in ``models/vae_approx``."""
    return ["taesd"] if comfy_taesd_files("taesd") else []


def clip_tokenizer_dir() -> str:
    """The CLIP tokenizer files ComfyUI ships (``comfy/sd1_tokenizer``), used for single-file SD1/SD2."""
    return os.path.join(os.path.dirname(os.path.abspath(comfy.utils.__file__)), "sd1_tokenizer")


# ---- engines (nodes/engines.py) -------------------------------------------------------------------
ENGINE_FOLDER = "streamrt_engines"
PACK_ENGINE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine_cache")


def register_engine_folder() -> None:
    """Register the pack's ``engine_cache/`` as the model folder kind ``streamrt_engines`` (idempotent).

    Appended after folders a user configured for that kind in extra_model_paths.yaml, so the user's
    first folder is where new engines go; every folder is searched.
    """
    folder_paths.add_model_folder_path(ENGINE_FOLDER, PACK_ENGINE_DIR)


def engine_folders() -> list[str]:
    """Every ``streamrt_engines`` folder; the first one receives new engines."""
    register_engine_folder()
    return folder_paths.get_folder_paths(ENGINE_FOLDER)


def text_ui(text: str):
    """A node's text in the UI (what ``PreviewAny`` shows), for ``io.NodeOutput(..., ui=text_ui(...))``."""
    from comfy_api.latest import ui

    return ui.PreviewText(text)
