"""Shared pieces of the node e2e tests (tests/test_*_e2e.py): the tiny models' names, the sampler's test
inputs and the one helper that builds the sampler (and its settings nodes) from them, test frames, and the
core stream config that matches those inputs.

The server computes on the CPU in float32, like the core reference in the test process, so frames agree up
to PNG quantisation (SaveImage writes 8-bit files): :data:`PNG_ATOL`.
"""

from __future__ import annotations

import json
import os
import shlex
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from comfy_harness import REPO_ROOT, ComfyServer, Graph, NodeRef
from stream_helpers import E2E_MODEL, E2E_TAESD

from streamrt import SimilarityFilterConfig, StreamConfig, StreamSettings
from streamrt.kv_cache import KVCacheConfig

#: the tiny random models every e2e server sees (conftest's ``e2e_tiny_models`` writes them)
MODEL = E2E_MODEL
TAESD = E2E_TAESD
SIZE = 64
# Same-CPU float32 on both sides: differences come from 8-bit PNG rounding (<= 0.5/255) only.
PNG_ATOL = 1.01 / 255
#: the sampler's options as the e2e tests set them (eager, no cache, no similarity filter), in the old one-node
#: form: :func:`add_sampler` makes the sampler and the settings-node chain that gives them
SAMPLER_DEFAULTS = dict(
    prompt="a red fox in the snow", negative_prompt="blurry", t_index_list="20,35", num_inference_steps=50,
    cfg_type="self", guidance_scale=1.5, delta=1.0, seed=7, frames_per_step=1, width=0, height=0,
    add_noise=True, similarity_filter=False, similarity_threshold=0.98, similarity_max_skip=10,
    acceleration="auto", cached_attention=False, cache_max_frames=4, cache_window=4, cache_interval=1, reset=False,
    fused_projections=True, overlap_executions=False)

#: option -> (settings node, its input); a Stream Settings node is added when one of its options differs from
#: the node's default (that is: from what the sampler runs without settings)
_STREAM_SETTINGS = {"cfg_type": ("cfg_type", "self"), "delta": ("delta", 1.0),
                    "frames_per_step": ("frames_per_step", 1), "add_noise": ("add_noise", True),
                    "acceleration": ("acceleration", "auto"), "width": ("width", 0), "height": ("height", 0),
                    "num_inference_steps": ("schedule_length", 50), "fused_projections": ("fused_projections", True),
                    "overlap_executions": ("overlap_executions", False)}
_FILTER = {"similarity_threshold": "threshold", "similarity_max_skip": "max_skip"}
_CACHE = {"cache_max_frames": "max_frames", "cache_window": "window", "cache_interval": "interval"}
#: the sampler's own inputs (guidance_scale is its cfg; positive / negative / image are links)
_SAMPLER = {"prompt", "negative_prompt", "steps", "strength", "cfg", "seed", "t_index_list", "reset", "image",
            "positive", "negative"}
_SAMPLER_NEW_DEFAULTS = dict(steps=2, strength=0.36)


def add_sampler(g: Graph, pipeline, *, id: str | None = None, **options) -> NodeRef:
    """A StreamRTSampler in ``g`` from old-style options (``{**SAMPLER_DEFAULTS, **options}``, the one-node
    sampler's names), with the settings chain they need: Stream Settings when a stream option differs from the
    default, Stream Similarity Filter when ``similarity_filter``, Stream Cached Attention when
    ``cached_attention``. ``guidance_scale`` is the sampler's ``cfg``; ``num_inference_steps`` the settings'
    ``schedule_length``; the new inputs (``steps``, ``strength``, ``positive``, ``negative``, ``image``) pass
    through. Settings node ids are ``<id>-settings`` / ``-filter`` / ``-cache`` when ``id`` is given."""
    opts = {**SAMPLER_DEFAULTS, **_SAMPLER_NEW_DEFAULTS, **options}
    if "guidance_scale" in opts:
        opts.setdefault("cfg", opts.pop("guidance_scale"))
    unknown = set(opts) - _SAMPLER - set(_STREAM_SETTINGS) - set(_FILTER) - set(_CACHE) - {
        "similarity_filter", "cached_attention"}
    if unknown:
        raise TypeError(f"add_sampler: unknown option(s) {sorted(unknown)}")
    chain = None

    def link(kind: str, suffix: str, inputs: dict) -> None:
        nonlocal chain
        node = g.node(kind, id=f"{id}-{suffix}" if id else None, **inputs)
        if chain is not None:
            node.set(settings=chain.out(0))
        chain = node

    stream = {name: opts[key] for key, (name, default) in _STREAM_SETTINGS.items()}
    if any(opts[key] != default for key, (_, default) in _STREAM_SETTINGS.items()):
        link("StreamRTSettings", "settings", stream)
    if opts["similarity_filter"]:
        link("StreamRTSimilarityFilter", "filter", {name: opts[key] for key, name in _FILTER.items()})
    if opts["cached_attention"]:
        link("StreamRTCachedAttention", "cache", {name: opts[key] for key, name in _CACHE.items()})
    inputs = {k: v for k, v in opts.items() if k in _SAMPLER and v is not None}
    if chain is not None:
        inputs["settings"] = chain.out(0)
    return g.node("StreamRTSampler", id=id, pipeline=pipeline, **inputs)


def core_config(**overrides) -> StreamConfig:
    """The core's StreamConfig for the sampler options :data:`SAMPLER_DEFAULTS` (with ``overrides``), as
    :func:`add_sampler` sets them (an empty ``t_index_list``: from ``steps`` and ``strength``)."""
    opts = {**SAMPLER_DEFAULTS, **_SAMPLER_NEW_DEFAULTS, **overrides}
    t_index = tuple(int(t) for t in opts["t_index_list"].split(",")) if opts["t_index_list"] else None
    settings = StreamSettings(
        cfg_type=opts["cfg_type"], delta=opts["delta"], frames_per_step=opts["frames_per_step"],
        add_noise=opts["add_noise"], acceleration=opts["acceleration"], width=opts["width"], height=opts["height"],
        schedule_length=opts["num_inference_steps"], fused_projections=opts["fused_projections"],
        similarity_filter=SimilarityFilterConfig(opts["similarity_filter"], opts["similarity_threshold"],
                                                 opts["similarity_max_skip"]),
        kv_cache=KVCacheConfig(opts["cached_attention"], opts["cache_max_frames"],
                               min(opts["cache_window"], opts["cache_max_frames"]), opts["cache_interval"]))
    return settings.stream_config(t_index_list=t_index, steps=opts["steps"], strength=opts["strength"],
                                  guidance_scale=opts["guidance_scale"], seed=opts["seed"], frame_size=(SIZE, SIZE))


def frames(count: int, seed: int) -> np.ndarray:
    """Distinct, smooth test frames (uint8-exact so LoadImage gives the same floats)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(count, SIZE // 8, SIZE // 8, 3)).astype(np.uint8)
    return np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 frames as the float frames in [0, 1] that LoadImage gives."""
    return torch.from_numpy(images.astype(np.float32) / 255.0)


def upload(server: ComfyServer, images: np.ndarray, tag: str) -> list[str]:
    """Write the frames into the server's input folder as ``<tag>_<k>.png``; their names."""
    return [server.write_input_image(img, name=f"{tag}_{k}.png") for k, img in enumerate(images)]


def queue_raw(server: ComfyServer, prompt: dict, client_id: str | None = None) -> dict:
    """POST a prompt as raw JSON (NaN allowed, lone surrogates escaped) and wait for its history entry."""
    body = json.dumps({"prompt": prompt, "client_id": client_id or server.client_id}, allow_nan=True)
    r = server.session.post(server.base_url + "/prompt", data=body, headers={"Content-Type": "application/json"},
                            timeout=30)
    assert r.status_code == 200, r.text
    return server.wait(r.json()["prompt_id"], timeout=120)


def uid() -> str:
    """A fresh prefix for node ids and file names (the sampler keeps one stream per node id)."""
    return "t" + uuid.uuid4().hex[:8]


def image_batch(g: Graph, names: list[str]):
    """LoadImage for each name, joined by an ImageBatch chain into one IMAGE batch (a video); its output."""
    batch = g.node("LoadImage", image=names[0]).out(0)
    for name in names[1:]:
        batch = g.node("ImageBatch", image1=batch, image2=g.node("LoadImage", image=name).out(0)).out(0)
    return batch


def save_conditioning(server: ComfyServer, embeds: torch.Tensor, pooled: torch.Tensor | None = None) -> str:
    """A folder in the server's output directory that ComfyUI's LoadTrainingDataset reads back (its output 1) as the
    CONDITIONING ``[[embeds, {"pooled_output": pooled}]]``, what CLIPTextEncode gives; without ``pooled`` the entry
    has no ``pooled_output`` (``[[embeds, {}]]``). Returns the folder's name (LoadTrainingDataset's
    ``folder_name``)."""
    name = f"streamrt-cond-{uuid.uuid4().hex[:8]}"
    folder = server.output_dir / name
    folder.mkdir(parents=True)
    options = {} if pooled is None else {"pooled_output": pooled.clone()}
    torch.save({"latents": [{"samples": torch.zeros(1, 4, 8, 8)}], "conditioning": [[[embeds.clone(), options]]]},
               folder / "shard_0000.pkl")
    return name


@contextmanager
def own_server(work: Path, models_root: Path, timeout: float | None = None) -> Iterator[ComfyServer]:
    """A ComfyUI server of a test module's own, with the pack mounted and ``models_root`` as its models folder
    (for model files the session's shared folder should not hold), on the CPU with one torch thread, with the
    flags of ``$STREAMRT_SERVER_ARGS``, ComfyUI's default cache; stopped on exit."""
    server = ComfyServer(REPO_ROOT, work, pack_name="StreamRT", models_source=models_root,
                         extra_args=tuple(shlex.split(os.environ.get("STREAMRT_SERVER_ARGS", ""))),
                         env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    server.cache_mode = "default"
    server.start(timeout=timeout or float(os.environ.get("STREAMRT_SERVER_START_TIMEOUT", "180")))
    try:
        yield server
    finally:
        server.stop()
