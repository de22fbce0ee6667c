"""Cached attention across frames (StreamV2V style, docs/DESIGN.md section 3).

Every self-attention (``attn1``) layer of the UNet also attends to the keys and values of earlier
frames. Per layer, one pre-allocated buffer holds, along the token axis,
``[current | slot 0 | ... | slot M-1 | scratch]`` for K and for V, each segment ``[rows, S_l, C_l]``.
Attention reads the first ``1 + M`` segments under an additive key mask; after attention the current
segment is copied into the slot chosen for this call (the scratch slot when this call is not a
write), so the captured step has static shapes and no branching on values.

Which slots take part is decided on the device from ``age`` (writes since the slot was written,
huge when never written): a slot is valid when ``age < window``. The window can change at run
time (``set_window``) without reallocating; slots never written or outside the window are masked.

The prompt's keys and values are cached too (:class:`PromptKV`): every cross-attention (``attn2``) layer
projects the same prompt embeddings in every call, so a stream computes them once per prompt change and the
layers read them (SDXL-turbo's UNet at 512² on an H200: 9.29 -> 8.40 ms per call; docs/DESIGN.md section 3).

The caching processors live on the (shared) UNet and are inert unless a call passes
``cross_attention_kwargs={"kv_cache": cache}`` or ``{"prompt_kv": prompt_kv}``, so streams without them run
the plain ``AttnProcessor2_0`` path bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

logger = logging.getLogger(__name__)

NEVER = 1 << 30
#: The non-persistent buffer of a self-attention layer that holds a copy of its query, key and value weights as one
#: ``[3C, C]`` tensor (:func:`fuse_self_attention_projections`).
FUSED_QKV = "streamrt_fused_qkv"


@dataclass(frozen=True)
class KVCacheConfig:
    """Cached attention settings.

    Args:
        enabled (`bool`, defaults to `False`): attend to earlier frames.
        max_frames (`int`, defaults to `4`): M, ring slots allocated per layer (fixes memory and shapes).
        window (`int`, defaults to `4`): slots attended to (the most recently written), ``1 <= window <= M``.
        interval (`int`, defaults to `1`): write the current K/V into the ring every ``interval`` UNet calls.
    """

    enabled: bool = False
    max_frames: int = 4
    window: int = 4
    interval: int = 1

    def __post_init__(self) -> None:
        if self.max_frames < 1:
            raise ValueError(f"cache max_frames must be >= 1, got {self.max_frames}")
        if not 1 <= self.window <= self.max_frames:
            raise ValueError(f"cache window must be in [1, max_frames={self.max_frames}], got {self.window}")
        if self.interval < 1:
            raise ValueError(f"cache interval must be >= 1, got {self.interval}")


class _LayerBuffers:
    """One layer's K and V storage ``[rows, (M + 2) * S, C]``; ``mask`` ``[1, 1, 1, (M + 1) * S]`` is shared
    by the layers with the same token count."""

    def __init__(self, rows: int, tokens: int, channels: int, slots: int, device, dtype, mask: torch.Tensor) -> None:
        self.tokens = tokens
        self.key = torch.zeros(rows, (slots + 2) * tokens, channels, device=device, dtype=dtype)
        self.value = torch.zeros_like(self.key)
        self.mask = mask

    def segments(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], -1, self.tokens, t.shape[-1])


class KVCache:
    """Per-stream ring of earlier frames' attention K/V for every ``attn1`` layer.

    Layer buffers are allocated on the first UNet call (an eager call, before any CUDA graph capture)
    when the token counts are known; nothing is allocated afterwards.
    """

    def __init__(self, config: KVCacheConfig, device: torch.device) -> None:
        self.config = config
        m = config.max_frames
        self.device = device
        self.layers: dict[int, _LayerBuffers] = {}
        # token count -> [1, 1, 1, (M + 1) * S] additive key mask (0 attended, -inf not), in the compute dtype:
        # SDPA takes it as it is (docs/DESIGN.md section 3).
        self.masks: dict[int, torch.Tensor] = {}
        self.age = torch.full((m + 1,), NEVER, device=device, dtype=torch.int64)
        self.window = torch.tensor(config.window, device=device, dtype=torch.int64)
        self.write_slot = torch.tensor([m], device=device, dtype=torch.int64)  # m = scratch
        self.write_segment = self.write_slot + 1  # segment 0 of a layer buffer is the current frame
        self.write_flag = torch.zeros((), device=device, dtype=torch.int64)
        self.slot_valid = torch.zeros(m, device=device, dtype=torch.bool)
        self._slot_invalid = torch.ones(m, device=device, dtype=torch.bool)
        self._calls = 0
        self._next_slot = 0
        self._writes = 0  # ring writes since the last clear (host side)
        self._scheduled = (m, False)  # (slot, write) of the call scheduled last
        #: this call attends without a mask: every slot is written and inside the window (window == max_frames),
        #: so SDPA can take its unmasked (flash) kernel. A host-side fact, so a captured or compiled step is
        #: made once per value (docs/DESIGN.md section 3).
        self.unmasked = False

    # host side, between calls -------------------------------------------------------------------
    def clear(self) -> None:
        """Forget every cached frame (reset, seed change)."""
        self.age.fill_(NEVER)
        self._calls = 0
        self._next_slot = 0
        self._writes = 0
        self.unmasked = False

    def set_window(self, window: int) -> None:
        """Attend to the ``window`` most recent cached frames from the next call on (no reallocation)."""
        if not 1 <= window <= self.config.max_frames:
            raise ValueError(f"cache window must be in [1, {self.config.max_frames}], got {window}")
        self.window.fill_(window)
        self.config = KVCacheConfig(True, self.config.max_frames, window, self.config.interval)

    def set_interval(self, interval: int) -> None:
        if interval < 1:
            raise ValueError(f"cache interval must be >= 1, got {interval}")
        self.config = KVCacheConfig(True, self.config.max_frames, self.config.window, interval)

    def schedule_call(self) -> None:
        """Choose, on the host, where this call's K/V go (a ring slot or the scratch slot).

        Two ``fill_`` kernels; no sync, no allocation. Runs outside the captured step.
        """
        write = self._calls % self.config.interval == 0
        self._calls += 1
        m = self.config.max_frames
        # The slots this call attends were written by earlier calls: all valid once m writes are done.
        self.unmasked = self.config.window == m and self._writes >= m
        slot = self._next_slot if write else m
        if write:
            self._next_slot = (self._next_slot + 1) % m
            self._writes += 1
        self._scheduled = (slot, write)
        self._fill_target(slot, write)

    def _fill_target(self, slot: int, write: bool) -> None:
        self.write_slot.fill_(slot)
        self.write_segment.fill_(slot + 1)
        self.write_flag.fill_(int(write))

    @contextlib.contextmanager
    def writes_held(self) -> Iterator[None]:
        """Calls inside write their K/V into the scratch slot and age no slot (a CUDA-graph capture's warm-up
        and recording): the rings and ages stay as they are, so nothing of them needs saving. The call
        scheduled before is restored afterwards (the captured graph reads the target from these tensors)."""
        self._fill_target(self.config.max_frames, False)
        try:
            yield
        finally:
            self._fill_target(*self._scheduled)

    # device side, inside the step ---------------------------------------------------------------
    def begin_call(self) -> None:
        """Refresh the masks from slot ages and the window (before the UNet)."""
        torch.lt(self.age[:-1], self.window, out=self.slot_valid)
        torch.logical_not(self.slot_valid, out=self._slot_invalid)
        for tokens, mask in self.masks.items():
            self._write_mask(mask, tokens)

    def _write_mask(self, mask: torch.Tensor, tokens: int) -> None:
        slots = mask.view(-1, tokens)[1:]
        slots.zero_()
        slots.masked_fill_(self._slot_invalid[:, None], float("-inf"))

    def end_call(self) -> None:
        """Age the slots if this call wrote one (after the UNet)."""
        self.age.add_(self.write_flag)
        self.age.clamp_(max=NEVER)
        self.age.index_fill_(0, self.write_slot, 0)

    def allocate(self, layers: Sequence[tuple[int, int]], rows: int, dtype: torch.dtype) -> None:
        """Allocate every layer's buffers now (before any capture or compilation traces a UNet call):
        ``layers[i]`` is ``(tokens, channels)`` of ``attn1`` layer ``i``
        (see :func:`streamrt.kv_export.kv_cache_io_spec`)."""
        for index, (tokens, channels) in enumerate(layers):
            self.layer(index, rows, tokens, channels, dtype)

    def layer(self, index: int, rows: int, tokens: int, channels: int, dtype: torch.dtype) -> _LayerBuffers:
        buffers = self.layers.get(index)
        if buffers is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("KVCache buffers must be allocated by an eager call before CUDA graph capture")
            mask = self.masks.get(tokens)
            if mask is None:
                mask = torch.zeros(1, 1, 1, (self.config.max_frames + 1) * tokens, device=self.device, dtype=dtype)
                self._write_mask(mask, tokens)
                self.masks[tokens] = mask
            buffers = _LayerBuffers(rows, tokens, channels, self.config.max_frames, self.device, dtype, mask)
            self.layers[index] = buffers
        return buffers

    def nbytes(self) -> int:
        """Bytes held by the K/V storage (ring slots, current and scratch segments)."""
        return sum(b.key.numel() * b.key.element_size() * 2 for b in self.layers.values())

    def ring_nbytes(self) -> int:
        """Bytes of the ring slots alone: ``M * sum_l rows * S_l * C_l * 2 (K and V) * element size``."""
        m = self.config.max_frames
        return sum(b.key.shape[0] * b.tokens * b.key.shape[-1] * b.key.element_size() * 2 * m
                   for b in self.layers.values())


@dataclass
class AttnInput:
    """What every attention variant starts from: the layer's query of the current tokens and the keys and values
    they attend to first (self-attention: the current tokens' own; cross-attention: the prompt's)."""

    residual: torch.Tensor
    image_shape: tuple[int, int, int, int] | None  # (batch, channels, height, width) for 4-d inputs
    query: torch.Tensor  # [rows, tokens, C]
    key: torch.Tensor
    value: torch.Tensor


def _layer_tokens(attn: Attention, hidden_states: torch.Tensor, temb=None):
    """The start of diffusers' ``AttnProcessor2_0``: the residual, the 4-d input's shape (or None) and the
    normalised tokens ``[rows, tokens, C]`` that ``to_q`` (and self-attention's ``to_k``/``to_v``) project."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    image_shape = None
    if hidden_states.ndim == 4:
        image_shape = tuple(hidden_states.shape)
        batch, channel, height, width = image_shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return residual, image_shape, hidden_states


def project_self_attention(attn: Attention, hidden_states: torch.Tensor, temb=None,
                           fused: bool = False) -> AttnInput:
    """The input half of diffusers' ``AttnProcessor2_0`` for self-attention (norms, to_q/to_k/to_v). ``fused``: one
    GEMM over the layer's fused query/key/value weight where it has one (:func:`fuse_self_attention_projections`),
    the same numbers as the three projections up to the GEMM's rounding."""
    residual, image_shape, tokens = _layer_tokens(attn, hidden_states, temb)
    weight = getattr(attn, FUSED_QKV, None) if fused else None
    if weight is not None:
        query, key, value = F.linear(tokens, weight).chunk(3, dim=-1)
        return AttnInput(residual, image_shape, query, key, value)
    return AttnInput(residual, image_shape, attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens))


def attend_and_project(attn: Attention, inp: AttnInput, keys: torch.Tensor, values: torch.Tensor,
                       mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of the current queries over ``keys``/``values`` ``[rows, S_all, C]`` under an additive
    ``mask`` ``[1, 1, 1, S_all]`` (or none), then the output half of ``AttnProcessor2_0`` (to_out, residual)."""
    rows = inp.query.shape[0]
    heads, head_dim = attn.heads, inp.key.shape[-1] // attn.heads
    q = inp.query.view(rows, -1, heads, head_dim).transpose(1, 2)
    k = keys.view(rows, -1, heads, head_dim).transpose(1, 2)
    v = values.view(rows, -1, heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(rows, -1, heads * head_dim).to(inp.query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if inp.image_shape is not None:
        out = out.transpose(-1, -2).reshape(*inp.image_shape)
    if attn.residual_connection:
        out = out + inp.residual
    return out / attn.rescale_output_factor


class PromptKV:
    """The keys and values of every cross-attention (``attn2``) layer for a stream's prompt-embedding buffer.

    Every UNet call of a stream projects the same embeddings ``[rows, L, D]`` to the same keys and values in each
    cross-attention layer until the prompt changes. A ``PromptKV`` holds them, ``[rows, L, C_l]`` each for K and V
    per layer, allocated when it is made (before any capture); :meth:`refresh` recomputes them from the buffer
    after a prompt write, and :class:`CrossAttnProcessor` reads them in place of the projections: the same
    numbers, with two GEMMs per layer fewer per call (docs/DESIGN.md section 3).

    Args:
        unet: the diffusers UNet whose ``attn2`` layers it serves (numbered as :func:`install_kv_processors`
            numbers their processors).
        embeds: the stream's prompt-embedding buffer, read by :meth:`refresh`.
    """

    def __init__(self, unet: torch.nn.Module, embeds: torch.Tensor) -> None:
        self.embeds = embeds
        self.layers: list[tuple[Attention, torch.Tensor, torch.Tensor]] = []
        rows, tokens = embeds.shape[:2]
        for attn in cross_attention_layers(unet):
            key = embeds.new_empty(rows, tokens, attn.to_k.out_features)
            value = embeds.new_empty(rows, tokens, attn.to_v.out_features)
            self.layers.append((attn, key, value))

    def refresh(self) -> None:
        """Recompute every layer's keys and values from the embedding buffer (after a prompt write: not per
        frame). Written straight into the same tensors, which a captured step reads, by the GEMM that ``to_k`` /
        ``to_v`` run: no allocation, so a prompt change stays allocation-free (docs/DESIGN.md section 4)."""
        embeds = self.embeds.view(-1, self.embeds.shape[-1])
        with torch.no_grad():
            for attn, key, value in self.layers:
                for linear, out in ((attn.to_k, key), (attn.to_v, value)):
                    out = out.view(-1, out.shape[-1])
                    if linear.bias is None:
                        torch.mm(embeds, linear.weight.t(), out=out)
                    else:
                        torch.addmm(linear.bias, embeds, linear.weight.t(), out=out)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of ``attn2`` layer ``index``."""
        _, key, value = self.layers[index]
        return key, value

    def nbytes(self) -> int:
        """Bytes held: ``rows * L * sum_l C_l * 2 (K and V) * element size``."""
        return sum(key.nbytes + value.nbytes for _, key, value in self.layers)


def cross_attention_layers(unet: torch.nn.Module) -> list[Attention]:
    """The UNet's cross-attention (``attn2``) modules, in the order of its attention processors."""
    return _attention_layers(unet, "attn2")


def self_attention_layers(unet: torch.nn.Module) -> list[Attention]:
    """The UNet's self-attention (``attn1``) modules, in the order of its attention processors."""
    return _attention_layers(unet, "attn1")


def _attention_layers(unet: torch.nn.Module, kind: str) -> list[Attention]:
    suffix = ".processor"
    return [unet.get_submodule(name[:-len(suffix)]) for name in unet.attn_processors if name.endswith(kind + suffix)]


def fuse_self_attention_projections(unet: torch.nn.Module) -> int:
    """Keep on every self-attention layer its query, key and value weights as one ``[3C, C]`` tensor, the
    non-persistent buffer :data:`FUSED_QKV`, so a stream with ``StreamConfig.fused_qkv`` projects the three with one
    GEMM (docs/DESIGN.md section 3).

    The buffer is a copy (the UNet's weights stay as they are: they may be a host's own tensors, taken without a
    copy, and captured steps of other streams read them), made once per UNet and moved with it; a pipeline's weights
    do not change after loading (LoRAs are fused at load). Costs the three weights' size once more: about 0.6 GB for
    SDXL, 75 MB for SD1.5 in fp16. Layers with biases or unequal projection shapes are left alone; a layer whose buffer
    no longer has its weights' device or dtype gets a new one. Returns the number of layers that have one."""
    fused_layers = 0
    if not hasattr(unet, "attn_processors"):  # not a diffusers UNet
        return 0
    with torch.no_grad():
        for attn in self_attention_layers(unet):
            linears = (attn.to_q, attn.to_k, attn.to_v)
            weights = [linear.weight for linear in linears]
            if (any(linear.bias is not None for linear in linears) or len({w.shape for w in weights}) != 1
                    or len({(w.device, w.dtype) for w in weights}) != 1):
                continue
            fused = getattr(attn, FUSED_QKV, None)
            if fused is None or (fused.device, fused.dtype) != (weights[0].device, weights[0].dtype):
                attn.register_buffer(FUSED_QKV, torch.cat(weights), persistent=False)
            fused_layers += 1
    return fused_layers


class _LayerProcessor:
    """A caching processor of one numbered layer; calls it does not serve go to diffusers' ``AttnProcessor2_0``.
    Its ``__call__`` names every keyword a stream passes (``kv_cache``, ``prompt_kv``, ``fused_qkv``): diffusers
    hands a processor only the keywords its signature names."""

    def __init__(self, index: int) -> None:
        self.index = index
        self._plain = AttnProcessor2_0()


class CachedSelfAttnProcessor(_LayerProcessor):
    """``attn1`` processor: current tokens attend to themselves and the cached frames of the same row (with a
    ``kv_cache``), their query, key and value projected by one GEMM (with ``fused_qkv``); without either, diffusers'
    plain ``AttnProcessor2_0``."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, kv_cache: KVCache | None = None, prompt_kv: PromptKV | None = None,
                 fused_qkv: bool = False, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or (kv_cache is None and not fused_qkv):
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        inp = project_self_attention(attn, hidden_states, temb, fused=fused_qkv)
        if kv_cache is None:  # plain self-attention, its projections fused
            return attend_and_project(attn, inp, inp.key, inp.value, None)
        rows, tokens, channels = inp.key.shape
        buf = kv_cache.layer(self.index, rows, tokens, channels, inp.key.dtype)
        key_all, value_all = buf.segments(buf.key), buf.segments(buf.value)
        key_all[:, 0].copy_(inp.key)
        value_all[:, 0].copy_(inp.value)
        seen = (kv_cache.config.max_frames + 1) * tokens
        out = attend_and_project(attn, inp, buf.key[:, :seen], buf.value[:, :seen],
                                 None if kv_cache.unmasked else buf.mask)
        # The current frame joins the ring (or the scratch slot) after it has been attended.
        key_all.index_copy_(1, kv_cache.write_segment, inp.key.unsqueeze(1))
        value_all.index_copy_(1, kv_cache.write_segment, inp.value.unsqueeze(1))
        return out


class CrossAttnProcessor(_LayerProcessor):
    """``attn2`` processor: with a :class:`PromptKV`, the current queries attend to the prompt's cached keys and
    values; without one (or with an attention mask, which the stream never passes), diffusers' plain
    ``AttnProcessor2_0``."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, kv_cache: KVCache | None = None, prompt_kv: PromptKV | None = None,
                 fused_qkv: bool = False, **kwargs) -> torch.Tensor:
        if prompt_kv is None or encoder_hidden_states is None or attention_mask is not None:
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual, image_shape, tokens = _layer_tokens(attn, hidden_states, temb)
        key, value = prompt_kv.layer(self.index)
        return attend_and_project(attn, AttnInput(residual, image_shape, attn.to_q(tokens), key, value), key, value,
                                  None)


class PassThroughAttnProcessor(AttnProcessor2_0):
    """Plain attention that accepts (and ignores) ``kv_cache``, ``prompt_kv`` and ``fused_qkv``, for any other
    attention layer."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 kv_cache: KVCache | None = None, prompt_kv: PromptKV | None = None, fused_qkv: bool = False,
                 **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


_OURS = (CachedSelfAttnProcessor, CrossAttnProcessor, PassThroughAttnProcessor)


def fused_projections_nbytes(unet: torch.nn.Module) -> int:
    """Bytes of the fused projection weights :func:`fuse_self_attention_projections` keeps on ``unet`` (0 before a
    stream asked for them)."""
    if not hasattr(unet, "attn_processors"):
        return 0
    return sum(getattr(attn, FUSED_QKV).nbytes for attn in self_attention_layers(unet) if hasattr(attn, FUSED_QKV))


def attention_caches_fit(unet) -> bool:
    """Whether a stream of ``unet`` can keep its prompt's keys and values (:class:`PromptKV`) and fuse its
    self-attention projections: every attention layer runs diffusers' default ``AttnProcessor2_0`` or one of the
    caching processors here (which run it when not given a cache), so :func:`install_kv_processors` changes nothing
    for other callers, and no cross-attention layer normalises the prompt before projecting it (SD1.x, SD2.x and
    SDXL UNets do neither). A UNet with processors of its own keeps them, and its streams project in every call."""
    return (all(type(p) is AttnProcessor2_0 or isinstance(p, _OURS) for p in unet.attn_processors.values())
            and not any(attn.norm_cross for attn in cross_attention_layers(unet)))


def install_kv_processors(unet) -> int:
    """Put :class:`CachedSelfAttnProcessor` on every ``attn1``, :class:`CrossAttnProcessor` on every ``attn2``
    and a pass-through on the rest (idempotent). Each kind numbers its layers in processor order.

    Returns the number of cached self-attention layers.
    """
    processors = unet.attn_processors
    if all(isinstance(p, _OURS) for p in processors.values()):
        return sum(isinstance(p, CachedSelfAttnProcessor) for p in processors.values())
    new, self_index, cross_index = {}, 0, 0
    for name in processors:
        if name.endswith("attn1.processor"):
            new[name] = CachedSelfAttnProcessor(self_index)
            self_index += 1
        elif name.endswith("attn2.processor"):
            new[name] = CrossAttnProcessor(cross_index)
            cross_index += 1
        else:
            new[name] = PassThroughAttnProcessor()
    unet.set_attn_processor(new)
    logger.info("caching attention processors installed on %d attn1 and %d attn2 layers", self_index, cross_index)
    return self_index
