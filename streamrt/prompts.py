"""Prompt encoding with a small LRU cache keyed by text, and prompt / noise blending.

Text encoders stay on the models' device for the life of the pipeline: an unchanged prompt is
served from the cache and never reaches the encoder again.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .cuda_graphs import capture_graph

logger = logging.getLogger(__name__)

Weighted = Sequence[tuple[str, float]]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation between ``a`` and ``b`` along the last dimension (float32 math).

    Falls back to linear interpolation where the two vectors are (anti)parallel.
    """
    a32, b32 = a.float(), b.float()
    a_n = a32 / a32.norm(dim=-1, keepdim=True).clamp_min(eps)
    b_n = b32 / b32.norm(dim=-1, keepdim=True).clamp_min(eps)
    dot = (a_n * b_n).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    near = so.abs() < 1e-4
    safe_so = torch.where(near, torch.ones_like(so), so)
    wa = torch.where(near, torch.full_like(so, 1.0 - t), torch.sin((1.0 - t) * omega) / safe_so)
    wb = torch.where(near, torch.full_like(so, t), torch.sin(t * omega) / safe_so)
    return (wa * a32 + wb * b32).to(a.dtype)


def blend(tensors: Sequence[torch.Tensor], weights: Sequence[float], method: str = "linear",
          *, preserve_variance: bool = False) -> torch.Tensor:
    """Blend tensors by weight.

    ``linear`` is the weighted mean (or, with ``preserve_variance``, the weighted sum divided by the
    root of the summed squared weights, which keeps unit-variance noise at unit variance). ``slerp``
    folds pairwise: the running blend moves towards each next tensor by its share of the weight.
    """
    if not tensors:
        raise ValueError("nothing to blend: the list of items is empty")
    if len(tensors) != len(weights):
        raise ValueError("blend needs one weight per item")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"blend weights must be >= 0 with a positive sum, got {list(weights)}")
    if method == "linear":
        acc = sum(w * t.float() for t, w in zip(tensors, weights))
        norm = math.sqrt(sum(w * w for w in weights)) if preserve_variance else sum(weights)
        return (acc / norm).to(tensors[0].dtype)
    if method == "slerp":
        acc, acc_w = tensors[0], weights[0]
        for t, w in zip(tensors[1:], weights[1:]):
            if w == 0:
                continue
            acc = slerp(acc, t, w / (acc_w + w)) if acc_w > 0 else t
            acc_w += w
        return acc
    raise ValueError(f"unknown blend method {method!r}: use 'linear' or 'slerp'")


def check_text(text: str, what: str = "prompt") -> str:
    """``text`` if a tokenizer can take it, else a ValueError that says which character is the problem.

    Lone surrogates (what a JSON ``"\\ud800"`` decodes to) are not Unicode characters: tokenizers refuse
    them with an opaque TypeError deep in their bindings.
    """
    if not isinstance(text, str):
        raise ValueError(f"the {what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the {what} contains {text[exc.start]!r} at position {exc.start}, which is not a valid "
                         "Unicode character (a lone surrogate); remove it") from None
    return text


def as_weighted(prompt: str | Weighted) -> list[tuple[str, float]]:
    """Normalise a prompt given as text or as ``[(text, weight), ...]``, checking every text and weight."""
    if isinstance(prompt, str):
        return [(check_text(prompt), 1.0)]
    items = [(check_text(t), float(w)) for t, w in prompt]
    if not items:
        raise ValueError("an empty list of prompts was given")
    if not all(math.isfinite(w) for _, w in items):
        raise ValueError(f"prompt weights must be finite numbers, got {[w for _, w in items]}")
    return items


class PromptEncoder:
    """CLIP text encoding with an LRU cache keyed by prompt text.

    Args:
        tokenizer: a ``transformers.CLIPTokenizer``.
        text_encoder: a ``transformers.CLIPTextModel`` (kept where it is: on the pipeline's device).
        cache_size (`int`, defaults to `32`): prompts kept.
    """

    def __init__(self, tokenizer, text_encoder, *, cache_size: int = 32) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoder_calls = 0
        # On CUDA the encoder runs as a captured graph over static [1, L] ids: a new prompt then costs
        # about a millisecond instead of tens of kernel launches (None: not captured yet; False: eager).
        self._graph: torch.cuda.CUDAGraph | None | bool = None
        self._ids_static: torch.Tensor | None = None
        self._out_static: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.inference_mode()
    def encode(self, text: str) -> torch.Tensor:
        """Embeddings ``[1, L, D]`` of ``text``, from the cache when it was seen recently."""
        hit = self._cache.get(text)
        if hit is not None:
            self._cache.move_to_end(text)
            return hit
        check_text(text)
        ids = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        self.encoder_calls += 1
        embeds = self._run_encoder(ids)
        self._cache[text] = embeds
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embeds

    def _run_encoder(self, ids: torch.Tensor) -> torch.Tensor:
        device = self.device
        if device.type != "cuda" or self._graph is False:
            return self.text_encoder(ids.to(device), return_dict=False)[0]
        if self._graph is None:
            self._capture(ids)
            if self._graph is False:
                return self.text_encoder(ids.to(device), return_dict=False)[0]
        self._ids_static.copy_(ids, non_blocking=True)
        self._graph.replay()
        return self._out_static.clone()  # the cache entry

    def _capture(self, ids: torch.Tensor) -> None:
        try:
            self._ids_static = ids.to(self.device).clone()
            self._graph, self._out_static = capture_graph(
                lambda: self.text_encoder(self._ids_static, return_dict=False)[0], self.device, warmup=2)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be captured still works eagerly
            logger.warning("text encoder could not be captured in a CUDA graph (%s); encoding eagerly", exc)
            self._graph, self._ids_static, self._out_static = False, None, None

    def encode_blend(self, prompt: str | Weighted, method: str = "linear") -> torch.Tensor:
        """Embeddings of one prompt or of a weighted blend of prompts (``linear`` or ``slerp``)."""
        items = as_weighted(prompt)
        if len(items) == 1:
            return self.encode(items[0][0])
        return blend([self.encode(t) for t, _ in items], [w for _, w in items], method)

    def clear(self) -> None:
        """Forget every cached prompt (and the captured encoder, e.g. after the models moved)."""
        self._cache.clear()
        self._graph, self._ids_static, self._out_static = None, None, None


def seeded_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise from a CPU generator, so a seed means the same noise on every device."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def blended_noise(seeds: int | Sequence[tuple[int, float]], shape: Sequence[int],
                  method: str = "linear") -> torch.Tensor:
    """Noise of one seed, or a variance-preserving blend of several seeds' noise."""
    if isinstance(seeds, int):
        return seeded_noise(seeds, shape)
    items = [(int(s), float(w)) for s, w in seeds]
    if len(items) == 1:
        return seeded_noise(items[0][0], shape)
    return blend([seeded_noise(s, shape) for s, _ in items], [w for _, w in items], method,
                 preserve_variance=True)
