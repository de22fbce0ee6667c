"""Helpers for the ``test_stream_*`` tests (CPU, float32, tiny random models), and the tiny e2e models' names.

Plain functions and constants, imported as a top-level module (pytest.ini puts tests/ on sys.path)::

    from stream_helpers import make_config, make_frames

The fixtures that give the tiny models (``tiny_folders``, ``tiny_models``, ``tiny_taesd_models``,
``tiny_v_models``, ``fresh_tiny_models``) are in tests/conftest.py: a test asks for them by name. Their
folders are written once per session by :func:`streamrt.random_models.write_random_pipeline` and loaded
back with :func:`quiet_load` (:func:`streamrt.load_diffusers_folder`, the loader users go through).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

import streamrt
from streamrt import StreamConfig
from streamrt.random_models import write_random_pipeline

SIZE = 64                      # 64x64 images, 8x8 latents: a step takes a few tens of ms on a CPU
NEGATIVE = "blurry photo"      # a negative prompt that differs from every positive one used in tests


def quiet_load(folder: Path, taesd: Path | None = None) -> streamrt.StreamModels:
    """``load_diffusers_folder`` on the CPU in float32, without the loaders' chatter about accelerate."""
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return streamrt.load_diffusers_folder(folder, dtype="fp32", device="cpu", taesd=taesd)
    finally:
        diffusers_logger.setLevel(level)


def write_tiny_folders(root: Path) -> dict[str, Path]:
    """Diffusers folders of the ``tiny`` (with a TAESD folder) and ``tiny-v`` random pipelines under ``root``."""
    folders = {"tiny": root / "tiny", "taesd": root / "taesd", "tiny_v": root / "tiny_v"}
    write_random_pipeline(folders["tiny"], "tiny", seed=0, taesd_folder=folders["taesd"])
    write_random_pipeline(folders["tiny_v"], "tiny-v", seed=1)
    return folders


#: names of the tiny models the e2e servers see (models/diffusers/tiny-sd, models/vae_approx/tiny-taesd)
E2E_MODEL = "tiny-sd"
E2E_TAESD = "tiny-taesd"


def write_e2e_models(models_root: Path) -> Path:
    """Write the tiny diffusers model and TAESD folder that the e2e tests load by name (once)."""
    if not (models_root / "diffusers" / E2E_MODEL / "model_index.json").is_file():
        write_random_pipeline(models_root / "diffusers" / E2E_MODEL, "tiny",
                              taesd_folder=models_root / "vae_approx" / E2E_TAESD)
    return models_root


def first_cache_mode() -> str:
    """The one ComfyUI cache mode for e2e modules that run under a single mode: ``default`` when it is
    selected (or $STREAMRT_CACHE_MODES is unset), else the first of $STREAMRT_CACHE_MODES."""
    raw = [m.strip() for m in os.environ.get("STREAMRT_CACHE_MODES", "").split(",") if m.strip()]
    return "default" if not raw or "default" in raw else raw[0]


def make_config(**changes) -> StreamConfig:
    """A 64x64 stream config with test defaults (guided RCFG over two steps, F = 1)."""
    base = dict(width=SIZE, height=SIZE, t_index_list=(20, 35), num_inference_steps=50, frames_per_step=1,
                cfg_type="self", guidance_scale=1.5, delta=1.0, do_add_noise=True, seed=2)
    base.update(changes)
    return StreamConfig(**base)


def make_frames(count: int, seed: int, size: int = SIZE, channels: int = 3) -> torch.Tensor:
    """``count`` random frames ``[count, size, size, channels]`` in [0, 1], a different set per seed."""
    gen = torch.Generator("cpu").manual_seed(10_000 + seed)
    return torch.rand(count, size, size, channels, generator=gen)


def frame_groups(calls: int, frames_per_step: int, seed: int = 0) -> list[torch.Tensor]:
    """One group of F random frames per call, each group different."""
    return [make_frames(frames_per_step, seed * 1000 + i) for i in range(calls)]


def run_steps(stream: streamrt.Stream, groups) -> list[torch.Tensor]:
    """Feed each group (``None`` = txt2img) to ``stream.step``; the outputs, cloned."""
    return [stream.step(g).clone() for g in groups]


def assert_all_equal(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Bit-for-bit equality of two lists of frames."""
    assert len(got) == len(expected)
    for k, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"output {k} differs (max abs diff {(a - b).abs().max().item():.3g})"


def any_differs(got: list[torch.Tensor], expected: list[torch.Tensor], min_diff: float = 1e-6) -> bool:
    """Whether some output differs from the other list by more than ``min_diff``."""
    return any((a - b).abs().max().item() > min_diff for a, b in zip(got, expected))
