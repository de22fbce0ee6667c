"""Prompts: text, embeddings or weighted blends of both; encoding with a small LRU cache keyed by text;
prompt / noise blending.

A prompt is text, an embeddings tensor ``[1, L, D]`` (e.g. what a host's own text encoder made: ComfyUI's
CONDITIONING), a :class:`TextEmbedding` (embeddings plus the pooled embedding SDXL's UNet also takes), or a
weighted list ``[(text or embeddings, weight), ...]`` that is blended. Text becomes ``[1, 77, D]`` through the
pipeline's text encoder(s) (how, the model family says: :mod:`streamrt.families`); embeddings are used as they
are, with ``L`` any multiple of 77 (a long prompt). Parts of different lengths are repeated to their least common
multiple, as ComfyUI does: repeating the keys and values of cross-attention leaves its result unchanged.

Text encoders stay on the models' device for the life of the pipeline: an unchanged prompt is
served from the cache and never reaches the encoder again.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cuda_graphs import capture_graph

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class TextEmbedding:
    """A prompt's embeddings: ``tokens [1, L, D]`` (the UNet's text context) and, for families whose UNet takes
    one (SDXL), ``pooled [1, P]`` (the last text encoder's projected embedding); taken as immutable."""

    tokens: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> TextEmbedding:
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return TextEmbedding(self.tokens.to(device=device, dtype=dtype), pooled)


#: one prompt: text, embeddings ``[1, L, D]``, or embeddings with their pooled embedding
PromptPart = str | torch.Tensor | TextEmbedding
Weighted = Sequence[tuple[PromptPart, float]]
#: what a stream takes as its prompt
Prompt = PromptPart | Weighted
#: the types of a prompt that is one part (not a weighted list)
SINGLE = (str, torch.Tensor, TextEmbedding)


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


def check_embeddings(embeds: torch.Tensor, what: str = "prompt", *, embed_dim: int | None = None,
                     text_length: int | None = None) -> torch.Tensor:
    """``embeds`` if it can be a prompt, else a ValueError that says what is wrong with it.

    A prompt's embeddings are a floating tensor ``[1, L, D]`` of finite values; with ``embed_dim`` its width
    ``D`` must be the pipeline's text width, with ``text_length`` its ``L`` a positive multiple of it.
    """
    if not isinstance(embeds, torch.Tensor):
        raise ValueError(f"the {what} must be text or embeddings, got {type(embeds).__name__}")
    if embeds.dim() != 3 or embeds.shape[0] != 1:
        raise ValueError(f"the {what} embeddings must have the shape [1, tokens, width], got {list(embeds.shape)}")
    if not embeds.is_floating_point():
        raise ValueError(f"the {what} embeddings must be floating point, got {embeds.dtype}")
    tokens, width = int(embeds.shape[1]), int(embeds.shape[2])
    if embed_dim is not None and width != embed_dim:
        raise ValueError(
            f"the {what} embeddings are {width} wide but this pipeline's text encoder gives {embed_dim}: they come "
            f"from another model's text encoder (SD1.x: 768, SD2.x: 1024, SDXL: 2048); encode the prompt with "
            f"this model's CLIP")
    if text_length is not None and (tokens < 1 or tokens % text_length):
        raise ValueError(f"the {what} embeddings have {tokens} tokens: use a positive multiple of {text_length} "
                         f"(what CLIP text encoders give)")
    if not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"the {what} embeddings contain NaN or infinite values")
    return embeds


def check_pooled(pooled: torch.Tensor | None, what: str = "prompt", *, pooled_dim: int = 0) -> None:
    """Raise ValueError unless ``pooled`` is what a pipeline whose UNet takes a ``pooled_dim``-wide pooled text
    embedding needs: a finite floating tensor ``[1, pooled_dim]`` (anything goes when ``pooled_dim`` is 0)."""
    if not pooled_dim:
        return
    if pooled is None:
        raise ValueError(f"the {what} embeddings come without a pooled embedding, which this pipeline's UNet (SDXL) "
                         f"also takes: give the CONDITIONING of this model's CLIP (with pooled_output) or text")
    if not isinstance(pooled, torch.Tensor) or pooled.dim() != 2 or tuple(pooled.shape) != (1, pooled_dim):
        shape = list(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
        raise ValueError(f"the {what}'s pooled embedding must have the shape [1, {pooled_dim}], got {shape}: it comes "
                         "from another model's text encoder")
    if not pooled.is_floating_point() or not bool(torch.isfinite(pooled).all()):
        raise ValueError(f"the {what}'s pooled embedding must be finite floating-point values")


def check_part(part: PromptPart, what: str = "prompt", *, embed_dim: int | None = None,
               text_length: int | None = None, pooled_dim: int = 0) -> PromptPart:
    """A text (:func:`check_text`) or embeddings (:func:`check_embeddings`, :func:`check_pooled`) prompt, checked."""
    if isinstance(part, str):
        return check_text(part, what)
    if isinstance(part, TextEmbedding):
        check_embeddings(part.tokens, what, embed_dim=embed_dim, text_length=text_length)
        check_pooled(part.pooled, what, pooled_dim=pooled_dim)
        return part
    check_embeddings(part, what, embed_dim=embed_dim, text_length=text_length)
    check_pooled(None, what, pooled_dim=pooled_dim)
    return part


def as_weighted(prompt: Prompt, what: str = "prompt", *, embed_dim: int | None = None,
                text_length: int | None = None, pooled_dim: int = 0) -> list[tuple[PromptPart, float]]:
    """Normalise a prompt given as text, embeddings or ``[(text or embeddings, weight), ...]``, checking every
    part (see :func:`check_part`) and weight."""
    dims = dict(embed_dim=embed_dim, text_length=text_length, pooled_dim=pooled_dim)
    if isinstance(prompt, SINGLE):
        return [(check_part(prompt, what, **dims), 1.0)]
    if not isinstance(prompt, Sequence) or not all(isinstance(i, Sequence) and len(i) == 2 for i in prompt):
        raise ValueError(f"the {what} must be text, embeddings or a list of (prompt, weight) pairs, "
                         f"got {type(prompt).__name__}")
    items = [(check_part(t, what, **dims), float(w)) for t, w in prompt]
    if not items:
        raise ValueError(f"an empty list of {what}s was given")
    if not all(math.isfinite(w) for _, w in items):
        raise ValueError(f"{what} weights must be finite numbers, got {[w for _, w in items]}")
    return items


def token_length(prompt: Prompt, text_length: int) -> int:
    """Tokens the embeddings of ``prompt`` have: ``text_length`` for text, ``L`` for a tensor, the least common
    multiple over a weighted list."""
    if isinstance(prompt, str):
        return text_length
    if isinstance(prompt, torch.Tensor):
        return int(prompt.shape[1])
    if isinstance(prompt, TextEmbedding):
        return int(prompt.tokens.shape[1])
    return math.lcm(*(token_length(part, text_length) for part, _ in prompt))


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))


def same_part(a: PromptPart, b: PromptPart) -> bool:
    """Whether two prompt parts are the same prompt: equal texts, or the same tensor objects or equal ones
    (``torch.equal``; cheap for a CPU tensor of a few hundred thousand values)."""
    if a is b:
        return True
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if isinstance(a, TextEmbedding) or isinstance(b, TextEmbedding):
        return (isinstance(a, TextEmbedding) and isinstance(b, TextEmbedding) and _same_tensor(a.tokens, b.tokens)
                and _same_tensor(a.pooled, b.pooled))
    return _same_tensor(a, b)


def same_prompt(a: Prompt, b: Prompt) -> bool:
    """:func:`same_part` for prompts, weighted lists element by element (weights equal too)."""
    if isinstance(a, SINGLE) or isinstance(b, SINGLE):
        return isinstance(a, SINGLE) and isinstance(b, SINGLE) and same_part(a, b)
    try:
        return len(a) == len(b) and all(same_part(pa, pb) and wa == wb for (pa, wa), (pb, wb) in zip(a, b))
    except (TypeError, ValueError):  # not a well-formed weighted list: not the same (checking it names the problem)
        return False


def repeat_tokens(embeds: torch.Tensor, tokens: int) -> torch.Tensor:
    """``embeds [1, L, D]`` repeated along the tokens to ``tokens`` (a multiple of ``L``), as ComfyUI pads
    conditionings of different lengths: cross-attention over repeated keys and values is unchanged."""
    length = embeds.shape[1]
    if tokens == length:
        return embeds
    if tokens % length:
        raise ValueError(f"embeddings of {length} tokens cannot fill {tokens} tokens (not a multiple)")
    return embeds.repeat(1, tokens // length, 1)


class PromptEncoder:
    """Text encoding with an LRU cache keyed by prompt text, for one text encoder (SD1.x / SD2.x) or two (SDXL).

    Args:
        tokenizer: a ``transformers.CLIPTokenizer``.
        text_encoder: a ``transformers.CLIPTextModel`` (kept where it is: on the pipeline's device).
        tokenizer_2, text_encoder_2: the second tokenizer and text encoder (SDXL's OpenCLIP-bigG, a
            ``CLIPTextModelWithProjection`` whose projected ``text_embeds`` is the pooled embedding).
        hidden_state (`str`): ``"last"`` (the output after the final layer norm) or ``"penultimate"`` (the hidden
            state before the last layer, of every encoder, concatenated): see :class:`streamrt.families.ModelFamily`.
        zero_empty_negative (`bool`): an empty negative prompt is zeros (SDXL), not an encoded "".
        cache_size (`int`, defaults to `32`): prompts kept.
    """

    def __init__(self, tokenizer, text_encoder, *, tokenizer_2=None, text_encoder_2=None, hidden_state: str = "last",
                 zero_empty_negative: bool = False, cache_size: int = 32) -> None:
        if hidden_state not in ("last", "penultimate"):
            raise ValueError(f"unknown hidden_state {hidden_state!r}: use 'last' or 'penultimate'")
        self.tokenizers = [t for t in (tokenizer, tokenizer_2) if t is not None]
        self.text_encoders = [e for e in (text_encoder, text_encoder_2) if e is not None]
        if len(self.tokenizers) != len(self.text_encoders):
            raise ValueError("each text encoder needs its tokenizer")
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.hidden_state = hidden_state
        self.zero_empty_negative = zero_empty_negative
        self.pooled = text_encoder_2 is not None  # the last encoder's projection is a UNet input
        self.cache_size = cache_size
        self._cache: OrderedDict[str, TextEmbedding] = OrderedDict()
        self.encoder_calls = 0
        # On CUDA the encoders run as a captured graph over static [1, L] ids: a new prompt then costs
        # about a millisecond instead of tens of kernel launches (None: not captured yet; False: eager).
        self._graph: torch.cuda.CUDAGraph | None | bool = None
        self._ids_static: list[torch.Tensor] | None = None
        self._out_static: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.text_encoder.parameters()).dtype

    @torch.inference_mode()
    def encode(self, text: str) -> TextEmbedding:
        """Embeddings of ``text`` (``tokens [1, L, D]``, and ``pooled`` for two encoders), from the cache when it
        was seen recently."""
        hit = self._cache.get(text)
        if hit is not None:
            self._cache.move_to_end(text)
            return hit
        check_text(text)
        ids = [tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids for tok in self.tokenizers]
        self.encoder_calls += 1
        embeds = TextEmbedding(*self._run_encoders(ids))
        self._cache[text] = embeds
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embeds

    def _forward(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoders on token ids already on the device: ``(tokens, pooled or None)``."""
        if self.hidden_state == "last" and not self.pooled:
            return self.text_encoder(ids[0], return_dict=False)[0], None
        hidden, pooled = [], None
        for encoder, encoder_ids in zip(self.text_encoders, ids):
            out = encoder(encoder_ids, output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2] if self.hidden_state == "penultimate" else out.last_hidden_state)
            pooled = getattr(out, "text_embeds", None)
        tokens = hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)
        return tokens, (pooled if self.pooled else None)

    def _run_encoders(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.device
        if device.type != "cuda" or self._graph is False:
            return self._forward([i.to(device) for i in ids])
        if self._graph is None:
            self._capture(ids)
            if self._graph is False:
                return self._forward([i.to(device) for i in ids])
        for static, given in zip(self._ids_static, ids):
            static.copy_(given, non_blocking=True)
        with torch.cuda.device(device):  # a replay runs on the current device's stream
            self._graph.replay()
        tokens, pooled = self._out_static
        return tokens.clone(), (None if pooled is None else pooled.clone())  # the cache entry

    def _capture(self, ids: list[torch.Tensor]) -> None:
        try:
            self._ids_static = [i.to(self.device).clone() for i in ids]
            self._graph, self._out_static = capture_graph(lambda: self._forward(self._ids_static), self.device,
                                                          warmup=2)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be captured still works eagerly
            logger.warning("text encoder could not be captured in a CUDA graph (%s); encoding eagerly", exc)
            self._graph, self._ids_static, self._out_static = False, None, None

    def embeddings(self, part: PromptPart, *, negative: bool = False) -> TextEmbedding:
        """Embeddings of a text (:meth:`encode`) or of given embeddings, on the encoder's device and in its dtype.

        ``negative``: the part is a negative prompt, and an empty one is zeros when the family says so."""
        if isinstance(part, str):
            if negative and self.zero_empty_negative and part == "":
                return self._zeros()
            return self.encode(part)
        if isinstance(part, TextEmbedding):
            return part.to(self.device, self.dtype)
        return TextEmbedding(part.to(device=self.device, dtype=self.dtype))

    def _zeros(self) -> TextEmbedding:
        like = self.encode("")  # shapes only (and cached)
        pooled = None if like.pooled is None else torch.zeros_like(like.pooled)
        return TextEmbedding(torch.zeros_like(like.tokens), pooled)

    def encode_blend(self, prompt: Prompt, method: str = "linear") -> TextEmbedding:
        """Embeddings of one prompt or of a weighted blend of prompts (``linear`` or ``slerp``); parts of
        different token lengths are repeated to their least common multiple first. Pooled embeddings blend
        with the same weights."""
        items = as_weighted(prompt)
        if len(items) == 1:
            return self.embeddings(items[0][0])
        parts = [self.embeddings(t) for t, _ in items]
        weights = [w for _, w in items]
        tokens = math.lcm(*(p.tokens.shape[1] for p in parts))
        blended = blend([repeat_tokens(p.tokens, tokens) for p in parts], weights, method)
        pooled = None
        if all(p.pooled is not None for p in parts):
            pooled = blend([p.pooled for p in parts], weights, method)
        return TextEmbedding(blended, pooled)

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
