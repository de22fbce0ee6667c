"""The cached-attention UNet as a stateless module, for ONNX / TensorRT export (docs/DESIGN.md sections 3 and 5).

In an engine the attention cache is engine I/O. :class:`UNetWithKVCache` wraps a diffusers UNet so that
one call is a pure function::

    noise_pred, k_0, v_0, k_1, v_1, ... = UNetWithKVCache(unet, max_frames)(
        sample, timestep, encoder_hidden_states, [text_embeds, time_ids,]
        slot_valid, ring_k_0, ring_v_0, ring_k_1, ring_v_1, ...)

- ``text_embeds`` ``[rows, P]`` / ``time_ids`` ``[rows, 6]``: SDXL's added conditions, present exactly when the
  UNet's family has them (:attr:`streamrt.families.ModelFamily.has_added_conditions`), named and ordered as in
  the plain UNet engine (:func:`streamrt.engines.export.unet_component`).

- ``ring_k_l`` / ``ring_v_l`` ``[rows, M * S_l, C_l]``: layer ``l``'s ring, slot ``j`` at tokens
  ``[j * S_l, (j + 1) * S_l)`` (the same layout as the ring segments of :class:`~streamrt.kv_cache.KVCache`).
- ``slot_valid`` ``[M]`` bool: which slots take part (written and inside the window). Invalid slots are
  masked out of the softmax, so their contents never matter.
- ``k_l`` / ``v_l`` ``[rows, S_l, C_l]``: this call's keys and values of layer ``l`` (after ``to_k`` /
  ``to_v``). The caller writes them into its ring (every ``interval`` calls, round robin) and keeps
  ``slot_valid`` up to date; the engine holds no state.

Layer ``l`` is the ``l``-th ``attn1`` processor in ``unet.attn_processors`` order, the order
:func:`~streamrt.kv_cache.install_kv_processors` numbers the layers of a :class:`KVCache`, so engine
outputs map one to one onto ``KVCache.layers``. Attention sees ``[current | slot 0 | ... | slot M-1]``
along the token axis, as :class:`~streamrt.kv_cache.CachedSelfAttnProcessor` does.

:func:`kv_cache_io_spec` gives the ordered names and shapes of that I/O without running the UNet, and
:func:`export_unet_with_kv_cache` writes the ONNX file (static shapes: an engine is specific to the
batch rows, the resolution and ``max_frames``).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from .families import family_of_unet, pooled_dim_of_unet
from .kv_cache import KVCache, attend_and_project, project_self_attention
from .models import predict_noise
from .runtime.runtime import ADDED_COND_INPUTS, NO_EXTRAS, AddedConditions, UNetExtras

logger = logging.getLogger(__name__)

__all__ = [
    "KVCacheIOSpec",
    "KVLayerSpec",
    "UNetWithKVCache",
    "attn1_layers",
    "example_inputs",
    "export_unet_with_kv_cache",
    "kv_cache_io_spec",
    "ring_inputs",
    "write_current",
]


def attn1_layers(unet) -> list[tuple[str, Attention]]:
    """``(module name, Attention)`` of every self-attention layer, in the cache's layer order."""
    names = [name[: -len(".processor")] for name in unet.attn_processors if name.endswith("attn1.processor")]
    return [(name, unet.get_submodule(name)) for name in names]


@dataclass(frozen=True)
class KVLayerSpec:
    """One cached layer: ``tokens`` = S_l (latent positions at its level), ``channels`` = C_l."""

    index: int
    name: str
    tokens: int
    channels: int


@dataclass(frozen=True)
class KVCacheIOSpec:
    """Ordered engine I/O of :class:`UNetWithKVCache` (static shapes).

    ``inputs`` / ``outputs``: ``(name, shape, dtype)`` in call / return order. Float tensors use the
    ``dtype`` the spec was made for; ``timestep`` is int64 and ``slot_valid`` bool.
    """

    rows: int
    max_frames: int
    latent_height: int
    latent_width: int
    layers: tuple[KVLayerSpec, ...]
    inputs: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
    outputs: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]

    @property
    def input_names(self) -> list[str]:
        return [name for name, _, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [name for name, _, _ in self.outputs]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for name, shape, _ in self.inputs + self.outputs}

    @property
    def first_ring_input(self) -> int:
        """Index of ``cache_key_0`` among the inputs: after the UNet's own inputs (with SDXL's added conditions)
        and ``slot_valid``."""
        return self.input_names.index("slot_valid") + 1

    def ring_nbytes(self, element_size: int = 2) -> int:
        """Bytes of all ring inputs (K and V, every layer) at ``element_size`` bytes per element."""
        return sum(self.rows * self.max_frames * layer.tokens * layer.channels * 2 * element_size
                   for layer in self.layers)


def _level_sizes(unet, latent_height: int, latent_width: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Latent size at which each down block runs, and the size after the last one (the mid block's)."""
    sizes, h, w = [], latent_height, latent_width
    for block in unet.down_blocks:
        sizes.append((h, w))
        if getattr(block, "downsamplers", None):
            h, w = math.ceil(h / 2), math.ceil(w / 2)  # 3x3 conv, stride 2, padding 1
    return sizes, (h, w)


def _layer_tokens(unet, name: str, latent_height: int, latent_width: int) -> int:
    sizes, mid = _level_sizes(unet, latent_height, latent_width)
    parts = name.split(".")
    if parts[0] == "down_blocks":
        h, w = sizes[int(parts[1])]
    elif parts[0] == "up_blocks":  # up block i mirrors down block (L - 1 - i); attention runs before its upsampler
        h, w = sizes[len(sizes) - 1 - int(parts[1])]
    elif parts[0] == "mid_block":
        h, w = mid
    else:
        raise ValueError(f"cannot place the attention layer {name!r} at a UNet level")
    return h * w


def kv_cache_io_spec(unet, rows: int, height: int, width: int, max_frames: int, *, text_length: int = 77,
                     vae_scale_factor: int = 8, dtype: torch.dtype | None = None) -> KVCacheIOSpec:
    """Names and shapes of the engine I/O of :class:`UNetWithKVCache` for one static configuration.

    Args:
        unet: the diffusers ``UNet2DConditionModel`` (only its structure is read).
        rows: UNet batch rows (``StreamConfig.unet_rows``).
        height, width: image size in pixels (the latent is ``// vae_scale_factor``).
        max_frames: M, ring slots per layer.
        text_length: tokens of ``encoder_hidden_states`` (77 for CLIP).
        vae_scale_factor: pixels per latent position.
        dtype: float dtype of the float I/O (defaults to the UNet's).

    Inputs: ``sample [rows, c, h, w]``, ``timestep [rows]``, ``encoder_hidden_states [rows, text_length, D]``,
    for a UNet with added conditions (SDXL) ``text_embeds [rows, P]`` and ``time_ids [rows, 6]``,
    ``slot_valid [M]``, then ``cache_key_{l}``, ``cache_value_{l}`` ``[rows, M * S_l, C_l]`` per layer.
    Outputs: ``noise_pred [rows, c_out, h, w]``, then ``current_key_{l}``, ``current_value_{l}``
    ``[rows, S_l, C_l]`` per layer.
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if height % vae_scale_factor or width % vae_scale_factor:
        raise ValueError(f"height and width must be multiples of {vae_scale_factor}, got {width}x{height}")
    dtype = dtype or unet.dtype
    h, w = height // vae_scale_factor, width // vae_scale_factor
    cfg = unet.config
    layers = tuple(KVLayerSpec(i, name, _layer_tokens(unet, name, h, w), attn.to_k.out_features)
                   for i, (name, attn) in enumerate(attn1_layers(unet)))
    inputs = [("sample", (rows, cfg.in_channels, h, w), dtype),
              ("timestep", (rows,), torch.int64),
              ("encoder_hidden_states", (rows, text_length, cfg.cross_attention_dim), dtype)]
    family = family_of_unet(cfg)
    if family.has_added_conditions:
        text_embeds, time_ids = ADDED_COND_INPUTS
        inputs += [(text_embeds, (rows, pooled_dim_of_unet(cfg)), dtype), (time_ids, (rows, family.time_ids), dtype)]
    inputs.append(("slot_valid", (max_frames,), torch.bool))
    outputs = [("noise_pred", (rows, cfg.out_channels, h, w), dtype)]
    for layer in layers:
        ring = (rows, max_frames * layer.tokens, layer.channels)
        current = (rows, layer.tokens, layer.channels)
        inputs += [(f"cache_key_{layer.index}", ring, dtype), (f"cache_value_{layer.index}", ring, dtype)]
        outputs += [(f"current_key_{layer.index}", current, dtype), (f"current_value_{layer.index}", current, dtype)]
    return KVCacheIOSpec(rows, max_frames, h, w, layers, tuple(inputs), tuple(outputs))


class _CallContext:
    """What one forward of :class:`UNetWithKVCache` hands to its processors."""

    def __init__(self, slot_valid: torch.Tensor, caches: tuple[torch.Tensor, ...]) -> None:
        self.slot_valid = slot_valid
        self.caches = caches
        self.current: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


class _Holder:
    context: _CallContext | None = None


class FunctionalCachedSelfAttnProcessor:
    """Stateless ``attn1`` processor: attends to ``[current | ring slots]`` of its layer under ``slot_valid``
    and records this call's K/V in the context (plain attention when no context is active)."""

    def __init__(self, index: int, holder: _Holder) -> None:
        self.index = index
        self.holder = holder
        self._plain = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        ctx = self.holder.context
        if ctx is None or encoder_hidden_states is not None:
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        inp = project_self_attention(attn, hidden_states, temb)
        tokens = inp.key.shape[1]
        ctx.current[self.index] = (inp.key, inp.value)
        ring_key, ring_value = ctx.caches[2 * self.index], ctx.caches[2 * self.index + 1]
        slots = ctx.slot_valid.shape[0]
        key_all = torch.cat([inp.key, ring_key.to(inp.key.dtype)], dim=1)
        value_all = torch.cat([inp.value, ring_value.to(inp.value.dtype)], dim=1)
        current = torch.ones(tokens, dtype=torch.bool, device=inp.key.device)
        mask = torch.cat([current, ctx.slot_valid.to(torch.bool)[:, None].expand(slots, tokens).reshape(-1)])
        return attend_and_project(attn, inp, key_all, value_all, mask.view(1, 1, 1, (slots + 1) * tokens))


class UNetWithKVCache(torch.nn.Module):
    """A diffusers UNet with its self-attention cache as explicit inputs and outputs (no state).

    ``forward(sample, timestep, encoder_hidden_states, [text_embeds, time_ids,] slot_valid, *caches)
    -> (noise_pred, *current_kv)`` with ``caches = (key_0, value_0, key_1, value_1, ...)`` rings
    ``[rows, M * S_l, C_l]`` and ``current_kv`` this call's ``[rows, S_l, C_l]`` in the same order (see the
    module docstring). ``text_embeds`` and ``time_ids`` are there exactly when the UNet's family has added
    conditions (:attr:`added_conditions`).

    The wrapper puts its processors on the ``attn1`` layers only for the duration of a forward and
    restores whatever was there afterwards, so the UNet stays usable by streams (cached or not).
    """

    def __init__(self, unet, max_frames: int) -> None:
        super().__init__()
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.unet = unet
        self.max_frames = max_frames
        #: whether forward takes SDXL's text_embeds and time_ids (asked of the UNet's family)
        self.added_conditions = family_of_unet(unet.config).has_added_conditions
        self._holder = _Holder()
        self._layers = attn1_layers(unet)
        self._processors = [FunctionalCachedSelfAttnProcessor(i, self._holder) for i in range(len(self._layers))]

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        added = len(ADDED_COND_INPUTS) if self.added_conditions else 0
        if len(rest) <= added:
            raise ValueError(f"expected {'text_embeds, time_ids, ' if added else ''}slot_valid and the cache tensors")
        conditions, slot_valid, caches = rest[:added], rest[added], rest[added + 1:]
        if len(caches) != 2 * self.num_layers:
            raise ValueError(f"expected {2 * self.num_layers} cache tensors (K and V of {self.num_layers} layers), "
                             f"got {len(caches)}")
        if slot_valid.shape != (self.max_frames,):
            raise ValueError(f"slot_valid must have shape [{self.max_frames}], got {list(slot_valid.shape)}")
        context = _CallContext(slot_valid, caches)
        saved = [attn.processor for _, attn in self._layers]
        self._holder.context = context
        try:
            for (_, attn), processor in zip(self._layers, self._processors):
                attn.set_processor(processor)
            # the UNet call of the torch runtime (TorchUNet), added conditions passed the same way
            extras = UNetExtras(added_cond=AddedConditions(*conditions)) if conditions else NO_EXTRAS
            noise_pred = predict_noise(self.unet, sample, timestep, encoder_hidden_states, **extras.torch_kwargs)
        finally:
            self._holder.context = None
            for (_, attn), processor in zip(self._layers, saved):
                attn.set_processor(processor)
        missing = [i for i in range(self.num_layers) if i not in context.current]
        if missing:
            raise RuntimeError(f"attn1 layers {missing} did not run in this forward")
        current = [t for i in range(self.num_layers) for t in context.current[i]]
        return (noise_pred, *current)


def example_inputs(spec: KVCacheIOSpec, *, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """Random inputs matching ``spec`` (timesteps in [0, 1000), every slot valid)."""
    out = []
    for name, shape, dtype in spec.inputs:
        if name == "timestep":
            out.append(torch.randint(0, 1000, shape, generator=generator, dtype=dtype).to(device))
        elif name == "slot_valid":
            out.append(torch.ones(shape, dtype=torch.bool, device=device))
        else:
            out.append(torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype))
    return tuple(out)


def export_unet_with_kv_cache(unet, path: str | os.PathLike, *, rows: int, height: int, width: int,
                              max_frames: int, opset: int = 17, text_length: int = 77,
                              vae_scale_factor: int = 8) -> KVCacheIOSpec:
    """Write the cached-attention UNet as ONNX with static shapes; returns its I/O spec.

    Uses the TorchScript-based exporter (``dynamo=False``): the UNet's Python control flow is fixed by the
    static shapes, and it writes one ``MatMul/Softmax/MatMul`` attention pattern per layer (SDPA with
    the boolean mask becomes an additive ``-inf`` mask). Opset must be >= 17 (``LayerNormalization``).
    The file is written to a temporary name and renamed (atomic); models over 2 GB get external data
    next to it.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    spec = kv_cache_io_spec(unet, rows, height, width, max_frames, text_length=text_length,
                            vae_scale_factor=vae_scale_factor)
    wrapper = UNetWithKVCache(unet, max_frames).eval()
    args = example_inputs(spec, device=unet.device, generator=torch.Generator().manual_seed(0))
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings from diffusers' shape checks; the shapes are static
            torch.onnx.export(wrapper, args, tmp, input_names=spec.input_names, output_names=spec.output_names,
                              opset_version=opset, dynamo=False, do_constant_folding=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    logger.info("exported the cached-attention UNet to %s (%d layers, rows=%d, %dx%d, M=%d, opset %d)",
                path, len(spec.layers), rows, width, height, max_frames, opset)
    return spec


# Binding a KVCache to the engine I/O ------------------------------------------------------------------
def ring_inputs(cache: KVCache) -> list[torch.Tensor]:
    """``[key_0, value_0, key_1, ...]``: views ``[rows, M * S_l, C_l]`` of the ring slots of a :class:`KVCache`.

    Slots 1..M of a layer buffer are adjacent along the token axis, so these are views, not copies (with
    ``rows > 1`` they are strided: an engine that needs dense bindings must copy them, or the cache must
    keep its ring in a separate buffer). Layers must exist (allocated by a first call).
    """
    m = cache.config.max_frames
    out = []
    for index in range(len(cache.layers)):
        buffers = cache.layers[index]
        s = buffers.tokens
        out += [buffers.key[:, s:(m + 1) * s], buffers.value[:, s:(m + 1) * s]]
    return out


def write_current(cache: KVCache, current_kv) -> None:
    """Write an engine call's ``current_kv`` outputs into the slot :meth:`KVCache.schedule_call` chose (the
    scratch segment on a non-write call), as :class:`~streamrt.kv_cache.CachedSelfAttnProcessor` does.

    The engine-backed call is then ``schedule_call``; ``begin_call``; ``engine(..., cache.slot_valid,
    *ring_inputs(cache))``; ``write_current``; ``end_call``.
    """
    if len(current_kv) != 2 * len(cache.layers):
        raise ValueError(f"expected {2 * len(cache.layers)} current K/V tensors, got {len(current_kv)}")
    for index in range(len(cache.layers)):
        buffers = cache.layers[index]
        for storage, current in ((buffers.key, current_kv[2 * index]), (buffers.value, current_kv[2 * index + 1])):
            buffers.segments(storage).index_copy_(1, cache.write_segment, current.to(storage.dtype).unsqueeze(1))
