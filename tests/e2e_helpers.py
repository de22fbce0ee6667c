"""Shared pieces of the node e2e tests (tests/test_*_e2e.py): the tiny models' names, the sampler's test
inputs, test frames, and the core stream config that matches those inputs.

The server computes on the CPU in float32, like the core reference in the test process, so frames agree up
to PNG quantisation (SaveImage writes 8-bit files): :data:`PNG_ATOL`.
"""

from __future__ import annotations

import uuid

import numpy as np
import torch
from comfy_harness import ComfyServer
from stream_helpers import E2E_MODEL, E2E_TAESD

from streamrt import StreamConfig

#: the tiny random models every e2e server sees (conftest's ``e2e_tiny_models`` writes them)
MODEL = E2E_MODEL
TAESD = E2E_TAESD
SIZE = 64
# Same-CPU float32 on both sides: differences come from 8-bit PNG rounding (<= 0.5/255) only.
PNG_ATOL = 1.01 / 255
#: every widget input of StreamRTSampler, as the e2e tests set them (eager, no cache, no similarity filter)
SAMPLER_DEFAULTS = dict(
    prompt="a red fox in the snow", negative_prompt="blurry", t_index_list="20,35", num_inference_steps=50,
    cfg_type="self", guidance_scale=1.5, delta=1.0, seed=7, frames_per_step=1, width=0, height=0,
    add_noise=True, similarity_filter=False, similarity_threshold=0.98, similarity_max_skip=10,
    acceleration="eager", cached_attention=False, cache_max_frames=4, cache_window=4, cache_interval=1, reset=False)


def core_config(**overrides) -> StreamConfig:
    """The core's StreamConfig for the sampler inputs :data:`SAMPLER_DEFAULTS` (with ``overrides``)."""
    opts = {**SAMPLER_DEFAULTS, **overrides}
    return StreamConfig(width=SIZE, height=SIZE, t_index_list=tuple(int(t) for t in opts["t_index_list"].split(",")),
                        num_inference_steps=opts["num_inference_steps"], cfg_type=opts["cfg_type"],
                        guidance_scale=opts["guidance_scale"], delta=opts["delta"], seed=opts["seed"],
                        do_add_noise=opts["add_noise"], frames_per_step=opts["frames_per_step"])


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


def uid() -> str:
    """A fresh prefix for node ids and file names (the sampler keeps one stream per node id)."""
    return "t" + uuid.uuid4().hex[:8]
