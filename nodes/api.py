"""The one module of the pack that touches ComfyUI: its public node API and runtime services.

Everything ComfyUI-specific that the node modules need goes through here, so a ComfyUI release
that moves something is a change in one file.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy.cli_args import args as comfy_args
from comfy_api.latest import ComfyExtension, io  # noqa: F401  (re-exported for the node modules)
from comfy_execution.utils import get_executing_context
from PIL import Image

from ..streamrt.families import FAMILIES
from ..streamrt.frame_inbox import FrameInbox, FrameInputError
from ..streamrt.frames import is_clamped
from ..streamrt.loading import LdmWeights, ModelLoadError
from ..streamrt.names import FolderIndex, plain_relative_name
from ..streamrt.prompts import TextEmbedding
from ..streamrt.weights import WEIGHT_SUFFIXES

logger = logging.getLogger(__name__)

CATEGORY = "StreamRT"
PIPELINE = io.Custom("STREAMRT_PIPELINE")
#: the sampler's stream settings (streamrt.StreamSettings), made and chained by the settings nodes
SETTINGS = io.Custom("STREAMRT_SETTINGS")


class Schema(io.Schema):
    """``io.Schema`` whose classic form is computed once per node class.

    ComfyUI converts a V3 schema to the classic ``INPUT_TYPES`` form (``get_v1_info``) every time it needs a
    node's inputs: eight to eleven times per execution of the realtime graph, 0.59 ms of it on the H200 machine
    (run C of the ComfyUI section in BENCHMARKS.md; 0.09 ms in the trivial graph), for the same result every
    time. The conversion is kept per node class. ComfyUI only reads the result, except that ``INPUT_TYPES``
    removes ``hidden`` from the top level of the inputs it gets, so each call gets its own copy of that level. A
    schema built again (a loader whose model listing changed) starts a new cache.
    """

    def get_v1_info(self, cls, *args, **kwargs):
        cache = self.__dict__.setdefault("_v1_info", {})
        key = (cls, args, tuple(sorted(kwargs.items())))
        try:
            info = cache.get(key)
        except TypeError:  # arguments a later ComfyUI may pass that cannot key a cache: convert every time
            return super().get_v1_info(cls, *args, **kwargs)
        if info is None:
            info = cache[key] = super().get_v1_info(cls, *args, **kwargs)
        return replace(info, input=dict(info.input))


class AlwaysExecutes(io.ComfyNode):
    """Base of the nodes whose output may change on every execution though their inputs do not (a stream that
    advances, the newest camera frame, the engine cache as it is now): ComfyUI never reuses their cached output."""

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> float:
        return float("nan")  # NaN equals nothing, not even itself: the cache key never matches


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


# ---- the browser: status events and previews (nodes/sampler.py, nodes/preview.py) ---------------------------
STATUS_EVENT = "streamrt.status"
#: seconds between the previews (and status events) a video sends while the sampler runs it
BATCH_PREVIEW_INTERVAL = 0.25


def _server():
    from server import PromptServer

    return PromptServer.instance


def _client_id() -> str | None:
    """The browser that queued the running prompt (None for a prompt queued without a client id)."""
    server = _server()
    return server.client_id if server is not None else None


def send_status(data: dict) -> None:
    """Send a status (fps, frames, backend, state) as a websocket event to the client that queued the prompt (as
    ComfyUI sends its own execution events; a prompt queued without a client id gets none), with the prompt's id."""
    server = _server()
    if server is not None and server.client_id is not None:
        context = get_executing_context()
        prompt_id = context.prompt_id if context is not None else server.last_prompt_id
        server.send_sync(STATUS_EVENT, {**data, "prompt_id": prompt_id}, server.client_id)


def preview_image(frame: torch.Tensor, max_size: int | None = None) -> tuple[str, Image.Image, int | None]:
    """A frame ``[H, W, 3]`` in [0, 1] as ComfyUI's preview ``("JPEG", image, max_size)``: what a progress bar
    carries to the browser over the websocket; no file is written. A frame larger than ``max_size`` (its longest
    side; 0 or None: any size) is scaled down by the server."""
    # numpy on this thread, not torch's OpenMP pool (streamrt.runtime.host_io.host_copy); two passes over the frame
    # (clip into one copy, then scale straight into the 8-bit image, truncating as Preview Image and Save Image do)
    # instead of scaling, clipping, rounding and casting in four; one pass for frames that cannot leave [0, 1] (a
    # stream's outputs: streamrt.frames.mark_clamped)
    pixels = frame.detach().to("cpu", torch.float32).numpy()
    if not is_clamped(frame):
        pixels = np.clip(pixels, 0.0, 1.0)
    pixels = np.multiply(pixels, 255.0, out=np.empty(pixels.shape, np.uint8), casting="unsafe")
    larger = max_size and max(pixels.shape[0], pixels.shape[1]) > max_size
    return "JPEG", Image.fromarray(pixels[..., :3]), int(max_size) if larger else None


def send_preview(frame: torch.Tensor, node_id: str, max_size: int | None = None) -> None:
    """Show ``frame`` on node ``node_id`` in the browser that queued the prompt, the way ComfyUI shows a sampler's
    previews: a progress bar's preview, sent over the websocket as a binary preview event carrying the node's id
    (``comfy.utils.ProgressBar.update_absolute(..., preview=...)``). A prompt queued without a client id gets
    none (ComfyUI would send it to every open browser)."""
    if _client_id() is not None:
        comfy.utils.ProgressBar(1, node_id=node_id).update_absolute(1, 1, preview=preview_image(frame, max_size))


class Progress:
    """A video on the sampler node. ``progress(done, total)`` after each group: ComfyUI's progress bar and the
    interrupt check. ``preview(finished)`` with the output frames finished so far: every
    :data:`BATCH_PREVIEW_INTERVAL` seconds (and at the end) the newest one becomes the node's preview, and a
    ``streamrt.status`` event with ``state: "batch"`` says how far the video is."""

    def __init__(self, total: int, node_id: str | None, workflow: str | None = None) -> None:
        self._bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self._node_id, self._workflow, self._total = node_id, workflow, total
        self._start = self._last = time.perf_counter()
        self._shown = 0

    def __call__(self, done: int, total: int) -> None:
        self._bar.update_absolute(done, total)
        model_management.throw_exception_if_processing_interrupted()

    def preview(self, finished: torch.Tensor) -> None:
        done, now = int(finished.shape[0]), time.perf_counter()
        if done == self._shown or (done < self._total and now - self._last < BATCH_PREVIEW_INTERVAL):
            return
        self._shown, self._last = done, now
        if _client_id() is not None:  # ComfyUI's preview size (--preview-size), as its samplers' previews
            image = preview_image(finished[-1], comfy_args.preview_size)
            self._bar.update_absolute(self._bar.current, self._total, preview=image)
        if done < self._total:  # the sampler's own status follows the last frame
            seconds = now - self._start
            send_status({"node": self._node_id, "workflow": self._workflow, "state": "batch", "done": done,
                         "total": self._total, "seconds": seconds, "fps": done / seconds if seconds > 0 else None})


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
    """ComfyUI's tiny autoencoders whose two files are both in ``models/vae_approx``: ``taesd`` (SD1.x / SD2.x)
    and ``taesdxl`` (SDXL), one per model family's latent space."""
    names = dict.fromkeys(family.taesd for family in FAMILIES.values())
    return [name for name in names if comfy_taesd_files(name)]


def clip_tokenizer_dir() -> str:
    """The CLIP tokenizer files ComfyUI ships (``comfy/sd1_tokenizer``), used for single-file checkpoints (both of
    SDXL's tokenizers too: the second pads differently, which the model family says)."""
    return os.path.join(os.path.dirname(os.path.abspath(comfy.utils.__file__)), "sd1_tokenizer")


# ---- ComfyUI's own MODEL / CLIP / VAE as a pipeline's weights (nodes/loaders.py) ----------------------


def _patched_tensors(patcher, prefix: str, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The patcher's tensors under ``prefix`` with its weight patches (LoRAs, merges) applied, as new tensors
    on ``device`` in ``dtype`` (keys without the prefix).

    Computed key by key from the unpatched weights (the patcher's backup where ComfyUI has patched its
    modules in place), the way ComfyUI patches a weight when it loads the model, so ComfyUI's own copy is
    never loaded or changed: it stays where ComfyUI keeps it and its memory management is unaffected.
    """
    import comfy.lora

    out = {}
    for key, tensor in patcher.model_state_dict(filter_prefix=prefix).items():
        backup = patcher.backup.get(key)
        base = backup.weight if backup is not None else tensor
        patches = patcher.patches.get(key)
        if patches:
            weight = comfy.lora.calculate_weight(patches, base.to(device=device, dtype=torch.float32, copy=True), key)
            out[key[len(prefix):]] = weight.to(dtype=dtype)
        else:
            out[key[len(prefix):]] = base.to(device=device, dtype=dtype, copy=True)
    return out


def _prediction_type(model) -> str:
    """``epsilon`` / ``v_prediction`` from the model's sampling object (ModelSamplingDiscrete's patch included)."""
    import comfy.model_sampling as sampling

    kind = model.get_model_object("model_sampling")
    if isinstance(kind, (sampling.EDM, sampling.CONST, sampling.X0)) or not isinstance(kind, sampling.EPS):
        raise ModelLoadError(f"the model samples as {type(kind).__name__}: StreamRT streams epsilon and "
                             "v_prediction models (SD1.x/SD2.x/SDXL)")
    if not isinstance(kind, sampling.ModelSamplingDiscrete):
        raise ModelLoadError(f"the model samples on a continuous schedule ({type(kind).__name__}): StreamRT streams "
                             "epsilon and v_prediction models on SD's discrete 1000-step schedule")
    return "v_prediction" if isinstance(kind, sampling.V_PREDICTION) else "epsilon"


def _text_towers(clip) -> list[tuple[str, int]]:
    """``(state-dict prefix, layers kept)`` of each text tower of an SD1.x/SD2.x CLIP (one, CLIP skip included) or
    SDXL's (CLIP-L and OpenCLIP-bigG, all layers: the family conditions on their penultimate hidden states)."""
    stage = clip.cond_stage_model
    if all(isinstance(getattr(stage, n, None), torch.nn.Module) for n in ("clip_l", "clip_g")):  # SDXLClipModel
        if clip.layer_idx is not None and clip.layer_idx != -2:
            raise ModelLoadError(f"CLIP Set Last Layer {clip.layer_idx} on an SDXL CLIP: StreamRT conditions SDXL on "
                                 "the penultimate layer of both text encoders (-2, SDXL's default); remove the node or "
                                 "set it to -2")
        return [("clip_l.transformer.", stage.clip_l.num_layers), ("clip_g.transformer.", stage.clip_g.num_layers)]
    name = getattr(stage, "clip", None)
    tower = getattr(stage, name, None) if isinstance(name, str) else None
    if tower is None or not hasattr(tower, "num_layers"):
        names = sorted(n for n, _ in stage.named_children())
        raise ModelLoadError(f"this CLIP holds {names or type(stage).__name__}: StreamRT streams SD1.x/SD2.x models "
                             "(one CLIP text encoder) and SDXL (CLIP-L + CLIP-G)")
    layer, index = tower.options_default[0], tower.options_default[1]
    if clip.layer_idx is not None and abs(clip.layer_idx) <= tower.num_layers:  # CLIPSetLastLayer
        layer, index = "hidden", clip.layer_idx
    if layer == "last":
        layers = tower.num_layers
    elif layer == "hidden" and tower.layer_norm_hidden_state:
        layers = index + 1 if index >= 0 else tower.num_layers + index + 1
    else:
        raise ModelLoadError(f"this CLIP conditions on {layer!r} layers: not an SD1.x/SD2.x text encoder")
    return [(f"{name}.transformer.", layers)]


def unapplied_patches(model) -> list[str]:
    """What a MODEL carries besides weight patches (attention or block patches, wrappers), which the stream's
    own UNet does not run."""
    options = model.model_options
    found = [f"transformer {k}" for k, v in options.get("transformer_options", {}).items()
             if k in ("patches", "patches_replace") and v]
    found += [k for k in ("model_function_wrapper", "sampler_cfg_function", "sampler_post_cfg_function")
              if options.get(k)]
    return found


def unload_from_gpu(*patchers) -> None:
    """Move ComfyUI's own loaded copies of these models (and their clones) back to its offload device, as its
    memory management does to free room: once a stream holds the converted weights, ComfyUI's copy on the
    GPU would be a second one (Load Checkpoint loads the UNet onto a roomy GPU at once). A ComfyUI sampler
    that needs the model later loads it again."""
    loaded = model_management.current_loaded_models
    for i in reversed(range(len(loaded))):
        entry = loaded[i]
        if any(entry.model.is_clone(p) for p in patchers) and entry.model_unload():
            logger.info("moved ComfyUI's copy of %s to %s: the stream holds its own", type(entry.model.model).__name__,
                        entry.model.offload_device)
            loaded.pop(i)
    model_management.soft_empty_cache()


def _tensors_in(value) -> list[torch.Tensor]:
    """The tensors inside a patch entry (tuples, lists, LoRA adapters' ``weights``)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors_in(item)]
    weights = getattr(value, "weights", None)
    return _tensors_in(weights) if weights is not None else []


def _fingerprint(patcher, prefix: str = "") -> str:
    """What a patcher's weights and weight patches are, from their names, shapes and a sample of their values
    (a few elements of every 16th tensor and of every patch tensor): equal for the same file loaded again
    (ComfyUI with --cache-none reloads it on every execution), different for other weights or patches."""
    digest = hashlib.sha256()

    def add(name: str, tensor: torch.Tensor, sample: bool) -> None:
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype};".encode())
        if sample and tensor.numel():
            digest.update(tensor.detach().reshape(-1)[:32].to("cpu", torch.float32).numpy().tobytes())

    for i, (key, tensor) in enumerate(sorted(patcher.model_state_dict(filter_prefix=prefix).items())):
        backup = patcher.backup.get(key)
        add(key, backup.weight if backup is not None else tensor, i % 16 == 0)
    for key in sorted(k for k in patcher.patches if k.startswith(prefix)):
        for entry in patcher.patches[key]:
            digest.update(f"{key}{entry[0]!r}{entry[2]!r}{entry[3]!r};".encode())  # strengths, offset
            for j, tensor in enumerate(_tensors_in(entry[1])):
                add(f"{key}.{j}", tensor, True)
    return digest.hexdigest()


def host_weights_key(model, clip, vae) -> tuple:
    """What identifies the weights of a MODEL / CLIP / VAE with their patches: fingerprints of their weights and
    weight patches (cheap: names, shapes and samples), the text layers and the prediction type."""
    towers = _text_towers(clip)
    return ("comfy", _fingerprint(model, "diffusion_model."),
            tuple((_fingerprint(clip.patcher, prefix), layers) for prefix, layers in towers),
            _fingerprint(vae.patcher), _prediction_type(model))


def host_weights(model, clip, vae, device: torch.device, dtype: torch.dtype) -> LdmWeights:
    """The weights of ComfyUI's MODEL, CLIP and VAE, with their patches, for :func:`streamrt.load_ldm_weights`."""
    unet_params = dict(getattr(model.model.model_config, "unet_config", {}) or {})
    if "model_channels" not in unet_params:
        raise ModelLoadError(f"this MODEL is a {type(model.model).__name__}: StreamRT streams SD1.x/SD2.x/SDXL UNets")
    towers = _text_towers(clip)
    texts = [_patched_tensors(clip.patcher, prefix, device, dtype) for prefix, _ in towers]
    return LdmWeights(
        unet=_patched_tensors(model, "diffusion_model.", device, dtype), unet_params=unet_params,
        text_encoder=texts[0], text_layers=towers[0][1], vae=_patched_tensors(vae.patcher, "", device, dtype),
        prediction_type=_prediction_type(model), text_encoder_2=texts[1] if len(texts) > 1 else None)


# ---- engines (nodes/engines.py) -------------------------------------------------------------------
ENGINE_FOLDER = "streamrt_engines"
#: where engines were kept before they moved to ComfyUI's models folder; still searched, so nothing built is lost
LEGACY_ENGINE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine_cache")


def default_engine_dir() -> str:
    """``models/streamrt_engines`` in ComfyUI's models folder: survives reinstalling or updating the pack."""
    return os.path.join(folder_paths.models_dir, ENGINE_FOLDER)


def register_engine_folder() -> None:
    """Register ComfyUI's ``models/streamrt_engines`` and, after it, the pack's old ``engine_cache/`` as the model
    folder kind ``streamrt_engines`` (idempotent).

    Appended after the folders a user configured for that kind in extra_model_paths.yaml, so the user's first
    folder is where new engines go (else ``models/streamrt_engines``); every folder is searched, the old one too.
    """
    folder_paths.add_model_folder_path(ENGINE_FOLDER, default_engine_dir())
    folder_paths.add_model_folder_path(ENGINE_FOLDER, LEGACY_ENGINE_DIR)


def engine_folders() -> list[str]:
    """Every ``streamrt_engines`` folder; the first one receives new engines."""
    register_engine_folder()
    return folder_paths.get_folder_paths(ENGINE_FOLDER)


def text_ui(text: str):
    """A node's text in the UI (what ``PreviewAny`` shows), for ``io.NodeOutput(..., ui=text_ui(...))``."""
    from comfy_api.latest import ui

    return ui.PreviewText(text)


def preview_text(text: str) -> str:
    """``text`` (lines, columns aligned with spaces) as a STRING that *Preview as Text* (PreviewAny) shows as it is.

    PreviewAny (frontend 1.32) renders its text as Markdown, where single line breaks join lines and runs of
    spaces collapse: a report arrives as one paragraph. A fenced code block keeps every line and the columns,
    in a monospace font; other consumers of the STRING see the text between two fence lines.
    """
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}\n{text}\n{fence}"


def show_text(node_id: str | None, text: str) -> None:
    """Show ``text`` on the node itself (ComfyUI's progress text: a read-only text under the node's widgets, line
    breaks kept; it stays until the node sends another), for the client that queued the prompt."""
    from server import PromptServer

    server = PromptServer.instance
    if server is not None and server.client_id is not None and node_id is not None:
        server.send_progress_text(text, node_id, server.client_id)


# ---- frames posted from outside a graph (nodes/frame_input.py) ----------------------------------------------
FRAMES_ROUTE = "/streamrt/frames"


def register_frame_routes(inbox: FrameInbox) -> None:
    """Serve ``inbox`` over HTTP on ComfyUI's server (also under ``/api``, as ComfyUI serves its own routes):

    * ``POST /streamrt/frames/{source}``: the body is the frame: a JPEG, PNG or WebP file, or raw 8-bit RGB / RGBA
      pixels as ``application/octet-stream`` with ``?width=&height=``. Answers what was kept (JSON), or 400 with
      ``{"error": ...}`` naming what is wrong;
    * ``GET /streamrt/frames``: every source and its newest frame (no pixels);
    * ``DELETE /streamrt/frames/{source}``: forget a source (404 if there was none).

    The event loop only checks and keeps the bytes; the node decodes on ComfyUI's worker thread. Called once, at
    the pack's import, before ComfyUI adds its routes to the server (a later call adds nothing)."""
    from aiohttp import web

    server = _server()
    if server is None or getattr(server, "_streamrt_frame_routes", False):
        return
    server._streamrt_frame_routes = True
    routes = server.routes

    @routes.post(FRAMES_ROUTE + "/{source}")
    async def post_frame(request):
        data = await request.read()
        try:
            frame = inbox.post(request.match_info["source"], data, request.content_type,
                               width=request.query.get("width"), height=request.query.get("height"))
        except FrameInputError as err:
            return web.json_response({"error": str(err)}, status=400)
        return web.json_response(frame.describe())

    @routes.get(FRAMES_ROUTE)
    async def list_frames(request):
        return web.json_response(inbox.sources())

    @routes.delete(FRAMES_ROUTE + "/{source}")
    async def delete_frames(request):
        try:
            removed = inbox.remove(request.match_info["source"])
        except FrameInputError as err:
            return web.json_response({"error": str(err)}, status=400)
        return web.json_response({"removed": removed}, status=200 if removed else 404)


# ---- CONDITIONING (nodes/sampler.py) ------------------------------------------------------------------
#: keys of a CONDITIONING entry that limit where or how strongly it applies: a stream applies one prompt to
#: the whole frame at every step, so it cannot honour them
_REGIONAL_KEYS = ("area", "mask", "strength", "set_area_to_bounds", "mask_strength")
#: other keys asking for something the stream does not do (the prompt embeddings are all it uses)
_UNSUPPORTED_KEYS = {"gligen": "GLIGEN", "start_percent": "a timestep range", "end_percent": "a timestep range"}


def conditioning_embeddings(conditioning, what: str) -> TextEmbedding:
    """The prompt embeddings of a ComfyUI CONDITIONING (``[[tensor [B, L, D], {"pooled_output": ...}], ...]``, what
    CLIPTextEncode, ConditioningAverage or ConditioningConcat give): the tokens ``[1, L, D]`` and the pooled
    embedding (SDXL's UNet reads it; SD1.x / SD2.x ignore it), or a ValueError naming what the stream cannot take:
    several entries (Conditioning Combine), a batch, area / mask / strength or other keys that change how an
    entry applies. The tensors are handed over as they are (not copied): the core takes them as immutable, as
    ComfyUI does."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(f"{what}: expected a CONDITIONING (from CLIP Text Encode), got "
                         f"{type(conditioning).__name__ if conditioning is not None else None}")
    if len(conditioning) != 1:
        raise ValueError(f"{what}: the CONDITIONING holds {len(conditioning)} prompts (e.g. from Conditioning "
                         "Combine), a stream takes one: blend them with Conditioning Average, or join them with "
                         "Conditioning (Concat)")
    entry = conditioning[0]
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], torch.Tensor)
            and isinstance(entry[1], dict)):
        raise ValueError(f"{what}: not a CONDITIONING entry [tensor, options]")
    embeds, options = entry
    regional = [k for k in _REGIONAL_KEYS if k in options]
    if regional:
        raise ValueError(f"{what}: the CONDITIONING is limited by {', '.join(regional)} (Conditioning Set Area / "
                         "Mask / Strength), which a stream cannot apply: it uses one prompt for the whole frame. "
                         "Combine prompts with Conditioning Average or Conditioning (Concat) instead")
    unsupported = sorted({_UNSUPPORTED_KEYS[k] for k in _UNSUPPORTED_KEYS if k in options})
    if unsupported:
        raise ValueError(f"{what}: the CONDITIONING carries {' and '.join(unsupported)}, which the stream does not "
                         "apply (it uses the prompt embeddings and ControlNets only); connect the plain text encoding")
    if embeds.dim() == 3 and embeds.shape[0] != 1:
        raise ValueError(f"{what}: the CONDITIONING has a batch of {embeds.shape[0]} prompts, a stream takes one: "
                         "blend them with Conditioning Average")
    pooled = options.get("pooled_output")
    return TextEmbedding(embeds, pooled if isinstance(pooled, torch.Tensor) else None)


# ---- ControlNets from Apply ControlNet (nodes/sampler.py) ---------------------------------------------------
@dataclass(frozen=True, eq=False)
class ComfyControl:
    """One ControlNet of an Apply ControlNet chain, as the stream needs it.

    ``key`` identifies the weights (a fingerprint, computed once per loaded ControlNet); ``state_dict`` gives them
    (LDM layout, ComfyUI's ``comfy.cldm.cldm.ControlNet``); ``hint`` is the control image batch as Apply ControlNet
    keeps it, ``[N, 3, H, W]`` (:func:`control_image` gives it at a stream's size); ``negative``: it is on the
    negative CONDITIONING too (or no negative CONDITIONING was given); ``upscale``: how ComfyUI resizes its control
    image to the latent's pixel size (after a center crop to that aspect).
    """

    key: str
    state_dict: Callable[[], dict]
    hint: torch.Tensor
    strength: float
    start: float
    end: float
    negative: bool = True
    upscale: str = "nearest-exact"


#: control model -> fingerprint of its weights (computed once per loaded ControlNet, not per execution)
_control_keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _control_chain(conditioning) -> list:
    """The ControlNets applied to a CONDITIONING entry, oldest first (Apply ControlNet chains them)."""
    if not conditioning:
        return []
    chain, control = [], conditioning[0][1].get("control")
    while control is not None:
        chain.append(control)
        control = getattr(control, "previous_controlnet", None)
    return chain[::-1]


def conditioning_controls(positive, negative) -> list[ComfyControl]:
    """The ControlNets that Apply ControlNet (Advanced) put on the positive CONDITIONING (and the same ones on the
    negative), or a ValueError naming what the stream cannot run: T2I adapters, Control-LoRAs and other kinds,
    another strength type, a ControlNet on the negative prompt only."""
    chain, negative_chain = _control_chain(positive), _control_chain(negative)
    extra = [c for c in negative_chain if all(c is not p for p in chain)]
    if extra:
        raise ValueError("the negative CONDITIONING carries a ControlNet the positive one does not: a stream applies "
                         "its ControlNets to every row; apply them with Apply ControlNet to both (its positive and "
                         "negative outputs)")
    out = []
    for control in chain:
        key, state_dict = control_net_weights(control)
        start, end = control.timestep_percent_range
        # the older Apply ControlNet conditions the positive prompt alone: ComfyUI runs the negative without it
        on_negative = negative is None or any(c is control for c in negative_chain)
        out.append(ComfyControl(key, state_dict, control.cond_hint_original, float(control.strength), float(start),
                                float(end), on_negative, str(getattr(control, "upscale_algorithm", "nearest-exact"))))
    return out


#: control hint -> ((width, height, method), the hint at that size): an unchanged control image is resized once
_sized_hints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def control_image(control: ComfyControl, width: int, height: int) -> torch.Tensor:
    """``control``'s images ``[N, height, width, 3]`` as ComfyUI's ControlNet sizes them for a latent of that pixel
    size: a center crop to the stream's aspect, then its upscale method (nearest-exact for most ControlNets). The
    same hint at the same size is resized once (Apply ControlNet's output is cached between executions)."""
    hint = control.hint
    if tuple(hint.shape[-2:]) == (height, width):
        return hint.movedim(1, -1)
    want = (width, height, control.upscale)
    cached = _sized_hints.get(hint)
    if cached is not None and cached[0] == want:
        return cached[1]
    sized = comfy.utils.common_upscale(hint, width, height, control.upscale, "center").movedim(1, -1).contiguous()
    _sized_hints[hint] = (want, sized)
    return sized


def control_net_weights(control) -> tuple[str, Callable[[], dict]]:
    """``(key, state_dict)`` of a CONTROL_NET (ControlNetLoader / DiffControlNetLoader, or one of an Apply
    ControlNet chain): the fingerprint of its weights (computed once per loaded ControlNet; ``+pooled`` for a
    ControlNet whose residuals ComfyUI pools over the image, a shuffle one, see :func:`control_net_pooled`) and
    what gives them (LDM layout), or a ValueError naming what the stream cannot run: T2I adapters, Control-LoRAs
    and other kinds, SD3/Flux-style ControlNets, another strength type."""
    import comfy.cldm.cldm
    import comfy.controlnet

    kind = type(control).__name__
    model = getattr(control, "control_model", None)
    if type(control) is not comfy.controlnet.ControlNet or not isinstance(model, comfy.cldm.cldm.ControlNet):
        raise ValueError(f"the CONDITIONING carries a {kind} ({type(model).__name__}): the stream runs ControlNets "
                         "(ControlNetLoader / DiffControlNetLoader files for SD1.x/SD2.x/SDXL), not T2I adapters, "
                         "Control-LoRAs or other control models")
    if getattr(control, "vae", None) is not None or getattr(control, "extra_concat_orig", None):
        raise ValueError("this ControlNet takes a VAE or extra inputs (an SD3/Flux-style ControlNet), which the "
                         "stream does not run")
    if control.strength_type != comfy.controlnet.StrengthType.CONSTANT:
        raise ValueError(f"this ControlNet scales its residuals by {control.strength_type.name}: the stream "
                         "supports constant strength")
    key = _control_keys.get(model)
    if key is None:
        key = _control_keys[model] = _fingerprint(control.control_model_wrapped)
    return key + ("+pooled" if control_net_pooled(control) else ""), lambda m=model: m.state_dict()


def control_net_pooled(control) -> bool:
    """Whether ComfyUI pools this ControlNet's residuals over the image (it decides it when loading the file: the
    shuffle ControlNets), which the stream's conversion must do too."""
    return bool(getattr(control, "global_average_pooling", False))
