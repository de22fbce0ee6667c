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
    diffusers' own checkpoint conversion (:func:`ldm_unet_names`). SDXL names its two text encoders
    ``lora_te1_`` (CLIP-L) and ``lora_te2_`` (OpenCLIP-bigG): the prefixes are the family's
    (:attr:`ModelFamily.lora_text_prefixes <streamrt.families.ModelFamily.lora_text_prefixes>`).
``unet.<module>`` / ``text_encoder.<module>`` / ``text_encoder_2.<module>`` with ``.lora_A.weight`` /
``.lora_B.weight`` (PEFT), ``.lora.down.weight`` / ``.lora.up.weight`` or ``.lora_linear_layer.down/up.weight``
(older diffusers)
    diffusers style, including the old attention-processor names (``processor.to_q_lora``).

LCM-LoRA-SDXL is of the first kind with diffusers' names (``lora_unet_down_blocks_1_attentions_0_proj_in``).

**Families.** A LoRA is made for one family: what its keys and shapes say (kohya text prefixes, a second
text encoder, the width of its cross-attention layers, SDXL's added-embedding layers) is checked against
the pipeline's family first, and a LoRA of another family is refused with both named (an SDXL LoRA on an
SD1.x pipeline, or the other way round), before any layer is matched.

Not supported, refused with a clear error: LyCORIS (LoHa, LoKr, ``lora_mid``), DoRA, full-weight
diffs.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import numbered
from .families import FAMILIES, ModelFamily, family_of_unet
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
#: ends of key bases of cross-attention key/value layers, whose down weight is ``[rank, context width]``
_CONTEXT_LAYERS = ("attn2.to_k", "attn2_to_k", "attn2.to_v", "attn2_to_v", "attn2.processor.to_k_lora",
                   "attn2.processor.to_v_lora")
_RESNET_LEAVES = ("in_layers.0", "in_layers.2", "out_layers.0", "out_layers.3", "emb_layers.1", "skip_connection")
_PROBE = "streamrt_probe"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to fuse: a file and its strengths.

    Args:
        path (`str`): a ``.safetensors`` file (``.ckpt``/``.pt`` only as plain tensors, see
            :func:`~streamrt.weights.read_weights`).
        strength_model (`float`, defaults to `1.0`): strength on the UNet.
        strength_clip (`float`, defaults to `1.0`): strength on the text encoder(s).
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

    target: str          # "unet" | "text_encoder" | "text_encoder_2"
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
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled-text + size embedding (the conversion
        probes += ["label_emb.0.0", "label_emb.0.2"]       # needs its keys, and LoRAs may adapt it)
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


@dataclass(frozen=True)
class _TextTarget:
    """One text encoder of the pipeline and how LoRA keys name it."""

    target: str          # "text_encoder" | "text_encoder_2": the attribute / diffusers folder name
    kohya_prefix: str    # "lora_te_" | "lora_te1_" | "lora_te2_"

    @property
    def diffusers_prefix(self) -> str:
        return self.target + "."


def _text_targets(family: ModelFamily) -> list[_TextTarget]:
    return [_TextTarget(name, prefix) for name, prefix in zip(numbered("text_encoder", family.text_encoders),
                                                              family.lora_text_prefixes)]


def _family_evidence(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> list[tuple[frozenset[str], str]]:
    """What a LoRA's keys and shapes say about the family it was made for: ``(family names it fits, why)`` per clue.

    Clues: kohya text-encoder prefixes (``lora_te_``: one text encoder; ``lora_te1_`` / ``lora_te2_``: SDXL's
    two), diffusers keys of a second text encoder (``text_encoder_2.``), the input width of cross-attention
    key/value layers (the UNet's context: 768, 1024, 2048) and layers of the added embedding (``add_embedding``,
    LDM ``label_emb``). Widths no family has (small test models) say nothing.
    """
    families = list(FAMILIES.values())
    evidence = []
    for prefix in dict.fromkeys(p for f in families for p in f.lora_text_prefixes):
        if any(base.startswith(prefix) for base in groups):
            evidence.append((frozenset(f.name for f in families if prefix in f.lora_text_prefixes),
                             f"{prefix}* keys"))
    for count in range(2, max(f.text_encoders for f in families) + 1):
        prefix = numbered("text_encoder", count)[-1] + "."
        if any(base.startswith(prefix) for base in groups):
            evidence.append((frozenset(f.name for f in families if f.text_encoders >= count), f"{prefix}* keys"))
    widths = sorted({int(parts["down"].shape[1]) for base, parts in groups.items()
                     if base.endswith(_CONTEXT_LAYERS) and "down" in parts and parts["down"].dim() >= 2})
    for width in widths:
        owners = frozenset(f.name for f in families if f.embed_dim == width)
        if owners:
            evidence.append((owners, f"cross-attention layers of width {width}"))
    if any("add_embedding" in base or "label_emb" in base for base in groups):
        evidence.append((frozenset(f.name for f in families if f.has_added_conditions),
                         "layers of the pooled-text/size embedding"))
    return evidence


def check_lora_family(groups: Mapping[str, Mapping[str, torch.Tensor]], family: ModelFamily, *,
                      source: str = "LoRA") -> None:
    """Refuse a LoRA whose keys or shapes say it was made for another family than ``family`` (see
    :func:`_family_evidence`); clues that contradict each other leave the decision to the layer matching.

    Raises:
        ModelLoadError: naming the LoRA's family, the pipeline's and the clues.
    """
    evidence = _family_evidence(groups)
    if not evidence:
        return
    fits = frozenset.intersection(*(owners for owners, _ in evidence))
    if not fits or family.name in fits:
        return
    made_for = "/".join(f.label for f in FAMILIES.values() if f.name in fits)
    clues = ", ".join(why for owners, why in evidence if family.name not in owners)
    raise ModelLoadError(f"{source} is an {made_for} LoRA ({clues}), but this pipeline is {family.label}: use a LoRA "
                         f"made for {family.label}")


def _resolve(base: str, names: Mapping, text_targets: Sequence[_TextTarget]) -> tuple[str, str] | None:
    """(target, module path) of a key base, or None when no module of the pipeline matches."""
    if base.startswith("lora_unet_"):
        module = names["unet"].get(base) or names["unet_ldm"]().get(base)
        return ("unet", module) if module else None
    if base.startswith("diffusion_model."):
        module = names["unet_ldm"]().get(base)
        return ("unet", module) if module else None
    for text in text_targets:
        if base.startswith(text.kohya_prefix):
            module = names[text.target].get(base)
            return (text.target, module) if module else None
    diffusers = [("unet.", "unet")] + [(text.diffusers_prefix, text.target) for text in text_targets]
    for prefix, target in diffusers:
        if base.startswith(prefix):
            module = base[len(prefix):]
            for old, new in _PROCESSOR_NAMES.items():
                module = module.replace(old, new)
            modules = names[f"{target}_modules"]
            if module in modules:
                return target, module
            if target != "unet":
                for other in _text_model_names(module):
                    if other in modules:
                        return target, other
            return None
    return None


def _text_encoders(family: ModelFamily, text_encoder: torch.nn.Module,
                   text_encoder_2: torch.nn.Module | None) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders by target name, checked against the family's count."""
    given = [m for m in (text_encoder, text_encoder_2) if m is not None]
    if len(given) != family.text_encoders:
        raise ModelLoadError(f"a {family.label} UNet takes {family.text_encoders} text encoder(s), {len(given)} were "
                             "given to fuse the LoRA into")
    return dict(zip(numbered("text_encoder", family.text_encoders), given))


def lora_layers(state_dict: Mapping[str, torch.Tensor], unet: torch.nn.Module, text_encoder: torch.nn.Module,
                text_encoder_2: torch.nn.Module | None = None, *,
                source: str = "LoRA") -> tuple[list[LoraLayer], list[str]]:
    """The layers of a LoRA state dict resolved against the pipeline's modules.

    The pipeline's family comes from the UNet's config (:func:`~streamrt.families.family_of_unet`): it says how
    many text encoders there are (SDXL: ``text_encoder_2`` too) and how kohya keys name them.

    Returns:
        ``(layers, unmatched)``: resolved layers and the key bases that match no module.

    Raises:
        ModelLoadError: an unsupported LoRA format, a LoRA of another family, or a pair with a missing half.
    """
    _refuse_unsupported(state_dict, source)
    family = family_of_unet(unet.config)
    encoders = _text_encoders(family, text_encoder, text_encoder_2)
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
    check_lora_family(groups, family, source=source)
    ldm_cache: dict[str, str] = {}

    def unet_ldm() -> dict[str, str]:  # built on first use: only LDM-named LoRAs need it
        if not ldm_cache:
            for ldm, module in ldm_unet_names(unet).items():
                ldm_cache["lora_unet_" + ldm.replace(".", "_")] = module
                ldm_cache["diffusion_model." + ldm] = module
        return ldm_cache

    text_targets = _text_targets(family)
    names = {"unet": kohya_names(unet, "lora_unet_"), "unet_ldm": unet_ldm,
             "unet_modules": set(dict(unet.named_modules()))}
    for text in text_targets:
        names[text.target] = kohya_names(encoders[text.target], text.kohya_prefix)
        names[f"{text.target}_modules"] = set(dict(encoders[text.target].named_modules()))
    layers, unmatched = [], []
    for base, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            if set(parts) == {"alpha"}:
                continue
            raise ModelLoadError(f"{source}: layer {base!r} has only {sorted(parts)}; a LoRA layer needs both "
                                 "its down and up weights (the file may be truncated or of another format)")
        resolved = _resolve(base, names, text_targets)
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


def fuse_lora(state_dict: Mapping[str, torch.Tensor], unet: torch.nn.Module, text_encoder: torch.nn.Module,
              text_encoder_2: torch.nn.Module | None = None, *, strength_model: float = 1.0,
              strength_clip: float = 1.0, source: str = "LoRA") -> dict[str, int]:
    """Fuse one LoRA state dict into ``unet`` and the text encoder(s) in place (SDXL: ``text_encoder_2`` too;
    ``strength_clip`` applies to every text encoder).

    A strength of 0 leaves the weights bit-identical (the file is still checked).

    Returns:
        ``{"unet": layers fused, "text_encoder": layers fused, ("text_encoder_2": layers fused,) "unmatched": keys
        that matched no layer}``.

    Raises:
        ModelLoadError: unsupported format, a LoRA of another family, no layer of the pipeline matched, or shapes
            that do not fit.
    """
    layers, unmatched = lora_layers(state_dict, unet, text_encoder, text_encoder_2, source=source)
    if not layers:
        raise ModelLoadError(f"{source}: none of its {len(unmatched)} layers matches this model (e.g. "
                             f"{unmatched[:3]}); it was made for another architecture")
    if unmatched:
        logger.warning("%s: %d of %d layers match no module of this model and are skipped, e.g. %s",
                       source, len(unmatched), len(unmatched) + len(layers), unmatched[:3])
    models = {"unet": unet, **_text_encoders(family_of_unet(unet.config), text_encoder, text_encoder_2)}
    strengths = {name: float(strength_model if name == "unet" else strength_clip) for name in models}
    counts = {**{name: 0 for name in models}, "unmatched": len(unmatched)}
    for layer in layers:
        weight = models[layer.target].get_submodule(layer.module).weight
        if strengths[layer.target] == 0.0:
            check_shapes(weight, layer, source=source)  # nothing to add, but the file must still fit
            continue
        fuse_layer(weight, layer, strengths[layer.target], source=source)
        counts[layer.target] += 1
    return counts


def fuse_loras(loras: Sequence[LoraSpec], unet: torch.nn.Module, text_encoder: torch.nn.Module,
               text_encoder_2: torch.nn.Module | None = None) -> list[tuple]:
    """Fuse every LoRA of ``loras`` in order (into both text encoders of SDXL); returns their fingerprints (for the
    pipeline's identity)."""
    fingerprints = []
    for spec in loras:
        path = Path(spec.path)
        counts = fuse_lora(read_weights(path), unet, text_encoder, text_encoder_2, strength_model=spec.strength_model,
                           strength_clip=spec.strength_clip, source=f"LoRA {path}")
        text_layers = sum(n for name, n in counts.items() if name.startswith("text_encoder"))
        logger.info("fused LoRA %s (model %.3g, clip %.3g): %d UNet and %d text encoder layers", path.name,
                    spec.strength_model, spec.strength_clip, counts["unet"], text_layers)
        fingerprints.append(spec.fingerprint())
    return fingerprints
