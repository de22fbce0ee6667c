"""What a state dict is, read from its keys and shapes: shared by :mod:`streamrt.checkpoints` and
:mod:`streamrt.controlnet_loading`, which take a state dict's tensors and a safetensors header's shapes alike."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any


def shape_of(value) -> tuple[int, ...]:
    """A tensor's shape, or a shape given as is (a safetensors header's)."""
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def prefix_summary(keys: Sequence[str], depth: int = 2, limit: int = 8) -> str:
    """The most common key prefixes of ``depth`` parts and their counts, for messages about unknown files:
    ``model.diffusion_model.* (686), first_stage_model.encoder.* (106)``."""
    counts = Counter(".".join(k.split(".")[:depth]) for k in keys)
    return ", ".join(f"{prefix}.* ({n})" for prefix, n in counts.most_common(limit)) or "no keys at all"


def context_width(shapes: Mapping[str, Any], prefix: str = "") -> int:
    """The cross-attention context width of the UNet (or ControlNet) under ``prefix``: the input width of its first
    ``attn2.to_k``, 0 without one.

    Searched rather than read at a fixed block: SDXL's first level has no attention."""
    for key, value in shapes.items():
        if key.startswith(prefix) and key.endswith(".attn2.to_k.weight"):
            return int(shape_of(value)[1])
    return 0
