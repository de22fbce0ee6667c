"""Fusing LoRAs into a pipeline's weights at load time (no peft, no pipeline object).

A LoRA stores, per adapted layer, a low-rank pair ``down`` ``[r, in(, kh, kw)]`` and ``up``
``[out, r(, 1, 1)]`` and optionally a scalar ``alpha``. Fusing it with a strength ``s`` is::

    W' = W + (s * alpha / r) * (up.flatten(1) @ down.flatten(1)).reshape(W.shape)

computed in float32 and written back in the weight's dtype (``alpha / r`` is 1 when the file has no
alpha). That covers Linear layers and 1x1 / 3x3 convolutions (LoCon). Fused weights cost nothing per
frame and survive CUDA graphs and compiled engines, which hooked adapters would not.

Key formats understood (LCM-LoRA, kohya and diffusers trainers all write one of them):

``lora_unet_<module>`` / ``lora_te_<module>`` with ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``
    kohya / ComfyUI style; ``<module>`` is the module path with ``.`` written as ``_``, in diffusers'
    spelling (``down_blocks_0_attentions_0_proj_in``) or the original LDM one (``input_blocks_1_1_proj_in``;
    also ``diffusion_model.input_blocks.1.1.proj_in``, as ComfyUI saves LoRAs). LDM names are mapped with
    diffusers' own checkpoint conversion (:func:`ldm_unet_names`).
``unet.<module>`` / ``text_encoder.<module>`` with ``.lora_A.weight`` / ``.lora_B.weight`` (PEFT),
``.lora.down.weight`` / ``.lora.up.weight`` or ``.lora_linear_layer.down/up.weight`` (older diffusers)
    diffusers style, including the old attention-processor names (``processor.to_q_lora``).

Not supported, refused with a clear error: LyCORIS (LoHa, LoKr, ``lora_mid``), DoRA, full-weight
diffs and SDXL LoRAs (``lora_te1_`` / ``lora_te2_``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .weights import ModelLoadError, read_weights

logger = logging.getLogger(__name__)

#: suffix -> role of the tensor in the pair
_SUFFIXES: dict[str, str] = {
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
}
#: key endings of formats this fuser does not implement -> what they are
_UNSUPPORTED: dict[str, str] = {
    ".hada_w1_a": "LyCORIS LoHa", ".lokr_w1": "LyCORIS LoKr", ".lokr_w1_a": "LyCORIS LoKr",
    ".lora_mid.weight": "LyCORIS LoCon with CP decomposition (lora_mid)", ".dora_scale": "DoRA",
    ".diff": "full weight difference", ".diff_b": "full weight difference", ".oft_blocks": "OFT",
    ".oft_diag": "OFT",
}
#: old diffusers attention-processor names -> module names
_PROCESSOR_NAMES = {".processor.to_q_lora": ".to_q", ".processor.to_k_lora": ".to_k",
                    ".processor.to_v_lora": ".to_v", ".processor.to_out_lora": ".to_out.0"}
_RESNET_LEAVES = ("in_layers.0", "in_layers.2", "out_layers.0", "out_layers.3", "emb_layers.1", "skip_connection")
_PROBE = "streamrt_probe"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to fuse: a file and its strengths.

    Args:
        path (`str`): a ``.safetensors`` file (``.ckpt``/``.pt`` only as plain tensors, see
            :func:`~streamrt.weights.read_weights`).
        strength_model (`float`, defaults to `1.0`): strength on the UNet.
        strength_clip (`float`, defaults to `1.0`): strength on the text encoder.
    """

    path: str
    strength_model: float = 1.0
    strength_clip: float = 1.0

    def __post_init__(self) -> None:
        for name in ("strength_model", "strength_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"LoRA {name} must be a finite number, got {value!r}")

    def fingerprint(self) -> tuple:
        """(path, size, mtime_ns, strengths): what makes two fused pipelines equal."""
        try:
            st = os.stat(self.path)
        except OSError:
            return (str(self.path), -1, -1, float(self.strength_model), float(self.strength_clip))
        return (str(self.path), st.st_size, st.st_mtime_ns, float(self.strength_model), float(self.strength_clip))


@dataclass(eq=False)
class LoraLayer:
    """One adapted layer of a LoRA file, resolved to a module of the pipeline."""

    target: str          # "unet" | "text_encoder"
    module: str          # module path in the diffusers / transformers model
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank`` (1.0 without alpha)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank


def kohya_names(model: torch.nn.Module, prefix: str) -> dict[str, str]:
    """``prefix + module path with '_' for '.'`` -> module path, for every Linear and Conv2d.

    Text encoders are also listed under ``text_model.`` names, which every LoRA uses, whether or not
    this transformers version nests the CLIP tower under ``text_model`` (transformers 5 does not).
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            out[prefix + name.replace(".", "_")] = name
            for canonical in _text_model_names(name):
                out[prefix + canonical.replace(".", "_")] = name
    return out


def _text_model_names(name: str) -> list[str]:
    """Other spellings of a CLIP module path (with / without the ``text_model.`` level)."""
    if name.startswith("text_model."):
        return [name[len("text_model."):]]
    if name.startswith(("embeddings.", "encoder.", "final_layer_norm")):
        return ["text_model." + name]
    return []


def ldm_unet_names(unet: torch.nn.Module) -> dict[str, str]:
    """LDM module path (``input_blocks.1.1.proj_in``) -> diffusers module path, for every Linear and Conv2d.

    Found by running diffusers' own ``convert_ldm_unet_checkpoint`` on probe keys for every block of
    the UNet's config (resnet layers by name, attention blocks by prefix), so the mapping is exactly
    the one single-file checkpoints are loaded with.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = unet.config
    per = config.layers_per_block + 1
    blocks = len(config.block_out_channels) * per
    probes = ["time_embed.0", "time_embed.2", "input_blocks.0.0", "out.0", "out.2", f"middle_block.1.{_PROBE}"]
    probes += [f"middle_block.{k}.{leaf}" for k in (0, 2) for leaf in _RESNET_LEAVES]
    for i in range(blocks):
        probes += [f"input_blocks.{i}.0.{leaf}" for leaf in _RESNET_LEAVES] if i else []
        probes += [f"input_blocks.{i}.0.op", f"input_blocks.{i}.1.{_PROBE}"] if i else []
        probes += [f"output_blocks.{i}.0.{leaf}" for leaf in _RESNET_LEAVES]
        upsampler_slot = 2 if "CrossAttn" in config.up_block_types[i // per] else 1  # after the attention, if any
        probes += [f"output_blocks.{i}.1.{_PROBE}", f"output_blocks.{i}.{upsampler_slot}.conv"]
    tensors = {f"model.diffusion_model.{p}.{leaf}": torch.empty(0) for p in probes for leaf in ("weight", "bias")}
    origin = {id(t): key[len("model.diffusion_model."):] for key, t in tensors.items()}
    exact, prefixes = {}, {}
    for new, tensor in convert_ldm_unet_checkpoint(tensors, config).items():
        old = origin[id(tensor)]
        if _PROBE in old:
            prefixes[new.split(_PROBE)[0]] = old.split(_PROBE)[0]
        else:
            exact[new.rsplit(".", 1)[0]] = old.rsplit(".", 1)[0]
    out = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if name in exact:
            out[exact[name]] = name
            continue
        for new, old in prefixes.items():
            if name.startswith(new):
                out[old + name[len(new):]] = name
                break
    return out


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _refuse_unsupported(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    for key in state_dict:
        for ending, what in _UNSUPPORTED.items():
            if key.endswith(ending):
                raise ModelLoadError(f"{source}: {what} LoRAs are not supported (key {key!r}); "
                                     "use a plain LoRA (lora_down/lora_up)")
        if key.startswith(("lora_te1_", "lora_te2_")) or key.startswith("text_encoder_2."):
            raise ModelLoadError(f"{source} is an SDXL LoRA (key {key!r}); SDXL is not supported yet (planned)")


def _resolve(base: str, names: Mapping) -> tuple[str, str] | None:
    """(target, module path) of a key base, or None when no module of the pipeline matches."""
    if base.startswith("lora_unet_"):
        module = names["unet"].get(base) or names["unet_ldm"]().get(base)
        return ("unet", module) if module else None
    if base.startswith("diffusion_model."):
        module = names["unet_ldm"]().get(base)
        return ("unet", module) if module else None
    if base.startswith("lora_te_"):
        module = names["text_encoder"].get(base)
        return ("text_encoder", module) if module else None
    for prefix, target in (("unet.", "unet"), ("text_encoder.", "text_encoder")):
        if base.startswith(prefix):
            module = base[len(prefix):]
            for old, new in _PROCESSOR_NAMES.items():
                module = module.replace(old, new)
            modules = names[f"{target}_modules"]
            if module in modules:
                return target, module
            if target == "text_encoder":
                for other in _text_model_names(module):
                    if other in modules:
                        return target, other
            return None
    return None


def lora_layers(state_dict: Mapping[str, torch.Tensor], unet: torch.nn.Module, text_encoder: torch.nn.Module,
                *, source: str = "LoRA") -> tuple[list[LoraLayer], list[str]]:
    """The layers of a LoRA state dict resolved against the pipeline's modules.

    Returns:
        ``(layers, unmatched)``: resolved layers and the key bases that match no module.

    Raises:
        ModelLoadError: an unsupported LoRA format or a pair with a missing half.
    """
    _refuse_unsupported(state_dict, source)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    other: list[str] = []
    for key, tensor in state_dict.items():
        split = _split_key(key)
        if split is None:
            other.append(key)
            continue
        base, role = split
        groups.setdefault(base, {})[role] = tensor
    if not groups:
        raise ModelLoadError(f"{source} holds no LoRA weights (no lora_down/lora_up or lora_A/lora_B keys); "
                             f"keys found: {sorted(state_dict)[:5]}")
    ldm_cache: dict[str, str] = {}

    def unet_ldm() -> dict[str, str]:  # built on first use: only LDM-named LoRAs need it
        if not ldm_cache:
            for ldm, module in ldm_unet_names(unet).items():
                ldm_cache["lora_unet_" + ldm.replace(".", "_")] = module
                ldm_cache["diffusion_model." + ldm] = module
        return ldm_cache

    names = {"unet": kohya_names(unet, "lora_unet_"), "text_encoder": kohya_names(text_encoder, "lora_te_"),
             "unet_ldm": unet_ldm, "unet_modules": set(dict(unet.named_modules())),
             "text_encoder_modules": set(dict(text_encoder.named_modules()))}
    layers, unmatched = [], []
    for base, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            if set(parts) == {"alpha"}:
                continue
            raise ModelLoadError(f"{source}: layer {base!r} has only {sorted(parts)}; a LoRA layer needs both "
                                 "its down and up weights (the file may be truncated or of another format)")
        resolved = _resolve(base, names)
        if resolved is None:
            unmatched.append(base)
            continue
        alpha = parts.get("alpha")
        layers.append(LoraLayer(resolved[0], resolved[1], parts["down"], parts["up"],
                                None if alpha is None else float(alpha.float().reshape(-1)[0])))
    if other:
        logger.debug("%s: ignored %d keys that are not LoRA weights, e.g. %s", source, len(other), other[:3])
    return layers, unmatched


def check_shapes(weight: torch.Tensor, layer: LoraLayer, *, source: str = "LoRA") -> None:
    """Raise when ``up @ down`` cannot be added to ``weight``."""
    up, down = layer.up.flatten(1), layer.down.flatten(1)
    if up.shape[1] != down.shape[0] or up.shape[0] != weight.shape[0] or down.shape[1] * up.shape[0] != weight.numel():
        raise ModelLoadError(
            f"{source}: layer {layer.module!r} has up {tuple(layer.up.shape)} / down {tuple(layer.down.shape)} but the "
            f"model's weight is {tuple(weight.shape)}: this LoRA was trained for another architecture")


@torch.no_grad()
def fuse_layer(weight: torch.Tensor, layer: LoraLayer, strength: float, *, source: str = "LoRA") -> None:
    """``weight += (strength * alpha / rank) * up @ down`` in place, computed in float32."""
    check_shapes(weight, layer, source=source)
    up = layer.up.to(device=weight.device, dtype=torch.float32).flatten(1)
    down = layer.down.to(device=weight.device, dtype=torch.float32).flatten(1)
    fused = weight.float() + (strength * layer.scale) * (up @ down).reshape(weight.shape)
    weight.copy_(fused.to(weight.dtype))


def fuse_lora(state_dict: Mapping[str, torch.Tensor], unet: torch.nn.Module, text_encoder: torch.nn.Module, *,
              strength_model: float = 1.0, strength_clip: float = 1.0, source: str = "LoRA") -> dict[str, int]:
    """Fuse one LoRA state dict into ``unet`` and ``text_encoder`` in place.

    A strength of 0 leaves the weights bit-identical (the file is still checked).

    Returns:
        ``{"unet": layers fused, "text_encoder": layers fused, "unmatched": keys that matched no layer}``.

    Raises:
        ModelLoadError: unsupported format, no layer of the pipeline matched, or shapes that do not fit.
    """
    layers, unmatched = lora_layers(state_dict, unet, text_encoder, source=source)
    if not layers:
        raise ModelLoadError(f"{source}: none of its {len(unmatched)} layers matches this model (e.g. "
                             f"{unmatched[:3]}); it was made for another architecture")
    if unmatched:
        logger.warning("%s: %d of %d layers match no module of this model and are skipped, e.g. %s",
                       source, len(unmatched), len(unmatched) + len(layers), unmatched[:3])
    models = {"unet": unet, "text_encoder": text_encoder}
    strengths = {"unet": float(strength_model), "text_encoder": float(strength_clip)}
    counts = {"unet": 0, "text_encoder": 0, "unmatched": len(unmatched)}
    for layer in layers:
        weight = models[layer.target].get_submodule(layer.module).weight
        if strengths[layer.target] == 0.0:
            check_shapes(weight, layer, source=source)  # nothing to add, but the file must still fit
            continue
        fuse_layer(weight, layer, strengths[layer.target], source=source)
        counts[layer.target] += 1
    return counts


def fuse_loras(loras: Sequence[LoraSpec], unet: torch.nn.Module, text_encoder: torch.nn.Module) -> list[tuple]:
    """Fuse every LoRA of ``loras`` in order; returns their fingerprints (for the pipeline's identity)."""
    fingerprints = []
    for spec in loras:
        path = Path(spec.path)
        counts = fuse_lora(read_weights(path), unet, text_encoder, strength_model=spec.strength_model,
                           strength_clip=spec.strength_clip, source=f"LoRA {path}")
        logger.info("fused LoRA %s (model %.3g, clip %.3g): %d UNet and %d text encoder layers", path.name,
                    spec.strength_model, spec.strength_clip, counts["unet"], counts["text_encoder"])
        fingerprints.append(spec.fingerprint())
    return fingerprints
