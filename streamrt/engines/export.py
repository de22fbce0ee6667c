"""ONNX export of the stream's UNet and VAE encoder / decoder (``torch.onnx.export``, opset 17+).

Each exportable part is an :class:`ExportComponent`: a module whose ``forward`` takes the named
inputs in order and returns the named outputs in order, plus the symbolic shape of every tensor
(see :mod:`streamrt.engines.spec`). The three stock components call the diffusers models through the
same functions as the stream's torch runtime (:mod:`streamrt.models`):

=============  ==========================================================  ============================
component      inputs                                                      outputs
=============  ==========================================================  ============================
``unet``       ``sample [rows,c,lh,lw]``, ``timestep [rows]`` (int64),     ``noise_pred [rows,c,lh,lw]``
               ``encoder_hidden_states [rows,77,D]``; SDXL adds
               ``text_embeds [rows,P]`` and ``time_ids [rows,6]``
``vae_encoder``  ``images [rows,3,H,W]`` in [-1, 1]                        ``latents [rows,c,lh,lw]``
                                                                           (TAESD latents; the mean of
                                                                           an AutoencoderKL, unscaled)
``vae_decoder``  ``latents [rows,c,lh,lw]`` (unscaled)                     ``images [rows,3,H,W]``
``controlnet``   the UNet's three (and SDXL's two) inputs, then              ``down_residual_0..N-1``,
                 ``controlnet_cond [rows,3,H,W]`` (control images in         ``mid_residual`` (already
                 [0, 1]), ``conditioning_scale [rows,1,1,1]``                 times the scale)
=============  ==========================================================  ============================

A UNet built for ControlNets (``unet_component(models, control=True)``) takes the residuals as inputs after
the others, under the same names, and adds them to its skip connections as diffusers'
``down_block_additional_residuals`` / ``mid_block_additional_residual`` do. The residuals' sizes are the
latent sizes divided by 2, 4... along the down path: shape symbols ``latent_height_div2`` and so on, derived
from ``latent_height`` (:meth:`ExportComponent.check_shapes`), so they need no entry in the engine shapes.

The UNet of a family with added conditions (``models.family.has_added_conditions``: SDXL) takes its
pooled text embeddings and size conditions as two more named inputs, in the model dtype like the
stream's buffers that feed them (:class:`streamrt.runtime.AddedConditions`).

Extension point (cached attention): :meth:`ExportComponent.with_io` returns the same component
with a wrapper module that takes more named inputs (the K/V ring of every layer) and returns more
named outputs (this frame's K/V). Their shapes use the stock symbols (``rows`` ...) or new ones whose
ranges go into :attr:`EngineShapes.extra`; profile, dynamic axes and cache key follow.

The exporter is the TorchScript one (``dynamo=False``): with torch 2.14 and diffusers 0.42 it traces
the UNet and both VAEs without extra packages and gives graphs that onnxruntime and the TensorRT
ONNX parser read (the ``torch.export`` path needs ``onnxscript`` and is not used). Models whose
weights pass 2 GB (or with ``external_data=True``) are written with their weights in one external
``<name>.onnx.data`` file beside the graph.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..controlnet import TorchControlNet, residual_levels
from ..models import StreamModels, decode_latents, encode_images, predict_noise
from ..runtime.runtime import (
    ADDED_COND_INPUTS,
    CONTROLNET_INPUTS,
    MID_RESIDUAL,
    AddedConditions,
    UNetExtras,
    down_residual_name,
)
from .spec import CONTROLNET, ENGINE_COMPONENTS, PRECISIONS, UNET, VAE_DECODER, VAE_ENCODER, DimRange, EngineShapes

logger = logging.getLogger(__name__)

OPSET = 17
#: Parameter bytes above which the weights go to an external data file (protobuf's limit is 2 GiB;
#: the graph itself and constant-folded tensors need room too).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


#: ``latent_height_div2`` -> (``latent_height``, 2): a symbol whose range is another's divided (see
#: :meth:`ExportComponent.check_shapes`)
_DERIVED = re.compile(r"^(.+)_div([1-9][0-9]*)$")

_FIXED_DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


@dataclass(frozen=True)
class TensorSpec:
    """One named engine input or output.

    Args:
        name (`str`): tensor name in the ONNX graph and the engine.
        dims (`tuple[int | str, ...]`): sizes; an ``int`` is fixed, a ``str`` is a shape symbol.
        dtype (`str`, defaults to `"model"`): ``"model"`` (the export precision), or a fixed ``"float32"``,
            ``"int64"``, ``"int32"`` or ``"bool"`` (a slot mask, for instance).
    """

    name: str
    dims: tuple[int | str, ...]
    dtype: str = "model"

    def __post_init__(self) -> None:
        if self.dtype not in _FIXED_DTYPES and self.dtype != "model":
            raise ValueError(f"tensor {self.name}: dtype must be 'model' or one of {sorted(_FIXED_DTYPES)}, "
                             f"got {self.dtype!r}")

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else int(sizes[d]) for d in self.dims)

    def torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.dtype == "model" else _FIXED_DTYPES[self.dtype]

    def symbols(self) -> list[str]:
        return [d for d in self.dims if isinstance(d, str)]


class UNetExport(torch.nn.Module):
    """``UNet(sample, timestep, encoder_hidden_states) -> noise_pred``, as :func:`streamrt.models.predict_noise`.

    ``UNetExport(unet, added_conditions=True)`` takes ``text_embeds`` and ``time_ids`` too (SDXL), passed to the
    UNet as the torch runtime passes them (:attr:`streamrt.runtime.UNetExtras.torch_kwargs`).
    ``control_residuals=N`` (N > 0) takes N down residuals and the mid residual after those, added to the skip
    connections as diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual`` (what
    :class:`streamrt.runtime.TorchUNet` passes when ControlNets ran).
    """

    def __init__(self, unet: torch.nn.Module, added_conditions: bool = False, control_residuals: int = 0) -> None:
        super().__init__()
        self.unet = unet
        self.added_conditions = added_conditions
        self.control_residuals = int(control_residuals)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *more: torch.Tensor) -> torch.Tensor:
        n_added = len(ADDED_COND_INPUTS) if self.added_conditions else 0
        n_control = self.control_residuals + 1 if self.control_residuals else 0
        if len(more) != n_added + n_control:
            raise TypeError(f"the UNet takes {'text_embeds and time_ids' if self.added_conditions else 'no'} added "
                            f"conditions and {n_control} ControlNet residuals, got {len(more)} more inputs")
        added, residuals = more[:n_added], more[n_added:]
        extras = UNetExtras(added_cond=AddedConditions(*added)) if added else UNetExtras()
        control = {}
        if residuals:
            control = {"down_block_additional_residuals": list(residuals[:-1]),
                       "mid_block_additional_residual": residuals[-1]}
        return predict_noise(self.unet, sample, timestep, encoder_hidden_states, **extras.torch_kwargs, **control)


class ControlNetExport(torch.nn.Module):
    """``ControlNet(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale[, text_embeds,
    time_ids]) -> (*down residuals, mid residual)``: the stream's own ControlNet call
    (:class:`streamrt.controlnet.TorchControlNet`), residuals already times ``conditioning_scale`` (one value per
    row). ``added_conditions``: SDXL's pooled embeddings and size conditions, as for the UNet."""

    def __init__(self, controlnet: torch.nn.Module, added_conditions: bool = False) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.added_conditions = added_conditions

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: torch.Tensor,
                *added: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(added) != (len(ADDED_COND_INPUTS) if self.added_conditions else 0):
            raise TypeError(f"the ControlNet takes {'text_embeds and time_ids' if self.added_conditions else 'no'} "
                            f"added conditions, got {len(added)} more inputs")
        added_kwargs = dict(zip(ADDED_COND_INPUTS, added)) if added else None
        down, mid = TorchControlNet(self.controlnet)(sample, timestep, encoder_hidden_states, controlnet_cond,
                                                     conditioning_scale, added_kwargs)
        return (*down, mid)


class VaeEncoderExport(torch.nn.Module):
    """Images in [-1, 1] -> unscaled latents, as :func:`streamrt.models.encode_images` (KL: the mean)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return encode_images(self.vae, images)


class VaeDecoderExport(torch.nn.Module):
    """Unscaled latents -> images in about [-1, 1], as :func:`streamrt.models.decode_latents`."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents)


@dataclass(eq=False)
class ExportComponent:
    """A part of the pipeline that becomes one engine.

    Args:
        name (`str`): ``unet``, ``vae_encoder`` or ``vae_decoder`` (the cache key's component).
        module (`torch.nn.Module`): ``forward(*inputs) -> output`` or a tuple of outputs, in spec order.
        inputs, outputs (`tuple[TensorSpec, ...]`): named I/O with symbolic shapes.
        vae_scale (`int`): pixels per latent along each side.
        pixel_multiple (`int`): height and width must be multiples of this (the VAE scale, times the
            UNet's total downsampling for the UNet, so that a dynamic engine never needs the odd-size
            upsampling path the tracer cannot record).
        cache_window (`int`, defaults to `0`): cached-attention ring size this component's I/O holds.
    """

    name: str
    module: torch.nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    vae_scale: int
    pixel_multiple: int
    cache_window: int = 0
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [t.name for t in (*self.inputs, *self.outputs)]
        if len(set(names)) != len(names):
            raise ValueError(f"component {self.name}: tensor names must be unique, got {names}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def with_io(self, module: torch.nn.Module, *, extra_inputs: Sequence[TensorSpec] = (),
                extra_outputs: Sequence[TensorSpec] = (), cache_window: int | None = None) -> ExportComponent:
        """The same component exported through ``module``, with more named inputs and outputs.

        ``module.forward`` takes the stock inputs followed by ``extra_inputs`` and returns the stock
        outputs followed by ``extra_outputs`` (a tuple). This is how the cached-attention UNet adds its
        per-layer K/V ring inputs and this-frame K/V outputs; ``cache_window`` goes into the cache key.
        """
        return replace(self, module=module, inputs=self.inputs + tuple(extra_inputs),
                       outputs=self.outputs + tuple(extra_outputs),
                       cache_window=self.cache_window if cache_window is None else int(cache_window))

    # shapes --------------------------------------------------------------------------------------
    def check_shapes(self, shapes: EngineShapes) -> dict[str, DimRange]:
        """Validate ``shapes`` for this component; returns every symbol's range.

        A symbol ``<name>_div<k>`` (the ControlNet residuals' ``latent_height_div2``...) is ``<name>``'s range
        divided by ``k``; each bound must be a multiple of ``k`` (the component's ``pixel_multiple`` sees to it)."""
        for what, rng in (("height", shapes.height), ("width", shapes.width)):
            rng.divided(self.pixel_multiple, f"{self.name} {what}s")
        symbols = shapes.symbols(self.vae_scale)
        for symbol in {s for t in (*self.inputs, *self.outputs) for s in t.symbols()} - set(symbols):
            derived = _DERIVED.match(symbol)
            if derived and derived.group(1) in symbols:
                symbols[symbol] = symbols[derived.group(1)].divided(int(derived.group(2)),
                                                                    f"{self.name} {derived.group(1)}")
        missing = sorted({s for t in (*self.inputs, *self.outputs) for s in t.symbols()} - set(symbols))
        if missing:
            raise ValueError(f"component {self.name} uses shape symbols {missing} that the engine shapes do not "
                             f"give: add them with EngineShapes.with_extra(...)")
        return symbols

    def profile(self, shapes: EngineShapes) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Input name -> (min, opt, max) shape: one TensorRT optimisation profile."""
        symbols = self.check_shapes(shapes)
        pick = lambda i: {k: v.values()[i] for k, v in symbols.items()}  # noqa: E731
        lo, opt, hi = pick(0), pick(1), pick(2)
        return {t.name: (t.shape(lo), t.shape(opt), t.shape(hi)) for t in self.inputs}

    def dynamic_axes(self, shapes: EngineShapes) -> dict[str, dict[int, str]]:
        symbols = self.check_shapes(shapes)
        axes: dict[str, dict[int, str]] = {}
        for t in (*self.inputs, *self.outputs):
            dyn = {i: d for i, d in enumerate(t.dims) if isinstance(d, str) and not symbols[d].static}
            if dyn:
                axes[t.name] = dyn
        return axes

    def example_inputs(self, shapes: EngineShapes, dtype: torch.dtype, device: torch.device | str,
                       which: str = "opt", seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Inputs at the ``min`` / ``opt`` / ``max`` sizes, in plausible value ranges."""
        symbols = self.check_shapes(shapes)
        index = {"min": 0, "opt": 1, "max": 2}[which]
        sizes = {k: v.values()[index] for k, v in symbols.items()}
        gen = torch.Generator("cpu").manual_seed(seed)
        out = []
        for t in self.inputs:
            shape, td = t.shape(sizes), t.torch_dtype(dtype)
            if td == torch.bool:
                value = torch.rand(shape, generator=gen) > 0.3
            elif td in (torch.int64, torch.int32):
                value = torch.randint(1, 1000, shape, generator=gen)
            else:
                value = torch.rand(shape, generator=gen) * 2 - 1
            out.append(value.to(device=device, dtype=td))
        return tuple(out)

    def parameter_bytes(self, precision: str) -> int:
        size = torch.empty((), dtype=PRECISIONS[precision]).element_size()
        return sum(p.numel() for p in self.module.parameters()) * size


def _unet_downsampling(unet: torch.nn.Module) -> int:
    return 2 ** (len(unet.config.block_out_channels) - 1)


def added_condition_specs(models: StreamModels) -> tuple[TensorSpec, ...]:
    """The UNet's added-condition inputs for ``models``' family: ``text_embeds [rows, P]`` and
    ``time_ids [rows, 6]`` for SDXL, none for SD1.x / SD2.x."""
    if not models.family.has_added_conditions:
        return ()
    text_embeds, time_ids = ADDED_COND_INPUTS
    return (TensorSpec(text_embeds, ("rows", models.pooled_dim)), TensorSpec(time_ids, ("rows", models.time_ids)))


def _level_symbols(factor: int) -> tuple[str, str]:
    if factor == 1:
        return "latent_height", "latent_width"
    return f"latent_height_div{factor}", f"latent_width_div{factor}"


def control_residual_specs(model: torch.nn.Module) -> tuple[TensorSpec, ...]:
    """The ControlNet residuals of a UNet's or ControlNet's architecture (:func:`streamrt.controlnet.residual_levels`)
    as ``down_residual_<i>`` and ``mid_residual``, each ``[rows, channels, latent_height_div<k>,
    latent_width_div<k>]``."""
    *down, (mid_width, mid_factor) = residual_levels(model.config)
    specs = [TensorSpec(down_residual_name(i), ("rows", width, *_level_symbols(factor)))
             for i, (width, factor) in enumerate(down)]
    specs.append(TensorSpec(MID_RESIDUAL, ("rows", mid_width, *_level_symbols(mid_factor))))
    return tuple(specs)


def unet_component(models: StreamModels, control: bool = False) -> ExportComponent:
    """The UNet: ``(sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) -> noise_pred`` (the added
    conditions when the family has them, see :func:`added_condition_specs`). ``control=True``: the ControlNet
    residuals (:func:`control_residual_specs`) are inputs too, after the others."""
    c, scale = models.latent_channels, models.vae_scale_factor
    lat = ("rows", c, "latent_height", "latent_width")
    added = added_condition_specs(models)
    residuals = control_residual_specs(models.unet) if control else ()
    return ExportComponent(
        name=UNET, module=UNetExport(models.unet, added_conditions=bool(added),
                                     control_residuals=max(len(residuals) - 1, 0)),
        inputs=(TensorSpec("sample", lat), TensorSpec("timestep", ("rows",), "int64"),
                TensorSpec("encoder_hidden_states", ("rows", models.text_length, models.embed_dim)), *added,
                *residuals),
        outputs=(TensorSpec("noise_pred", lat),),
        vae_scale=scale, pixel_multiple=scale * _unet_downsampling(models.unet))


def controlnet_component(models: StreamModels, controlnet: torch.nn.Module) -> ExportComponent:
    """A diffusers ``ControlNetModel`` of ``models``' pipeline as an engine component (name ``controlnet``):
    the UNet's inputs (and the family's added conditions), ``controlnet_cond [rows, 3, height, width]`` and
    ``conditioning_scale [rows, 1, 1, 1]``; outputs the scaled residuals under the names the UNet engine built
    for ControlNets takes (:func:`control_residual_specs`).

    Raises ValueError when the ControlNet does not fit the pipeline's UNet (another latent channel count, text
    width or down path): its residuals could not feed this UNet."""
    config = controlnet.config
    problems = []
    if int(config.in_channels) != models.latent_channels:
        problems.append(f"{config.in_channels} latent channels, the UNet {models.latent_channels}")
    if int(config.cross_attention_dim) != models.embed_dim:
        problems.append(f"text embeddings {config.cross_attention_dim} wide, the UNet's {models.embed_dim}")
    residuals = control_residual_specs(controlnet)
    if [t.dims for t in residuals] != [t.dims for t in control_residual_specs(models.unet)]:
        problems.append("another down path (block channels / layers) than the UNet's")
    blocks = getattr(controlnet, "controlnet_down_blocks", None)
    if blocks is not None and len(blocks) != len(residuals) - 1:
        problems.append(f"{len(blocks)} down residuals where its config gives {len(residuals) - 1}")
    if problems:
        raise ValueError(f"this ControlNet does not fit the {models.family} pipeline's UNet ({'; '.join(problems)}): "
                         "use a ControlNet made for this base model")
    scale = models.vae_scale_factor
    added = added_condition_specs(models)
    return ExportComponent(
        name=CONTROLNET, module=ControlNetExport(controlnet, added_conditions=bool(added)),
        inputs=(TensorSpec("sample", ("rows", models.latent_channels, "latent_height", "latent_width")),
                TensorSpec("timestep", ("rows",), "int64"),
                TensorSpec("encoder_hidden_states", ("rows", models.text_length, models.embed_dim)),
                TensorSpec(CONTROLNET_INPUTS[0], ("rows", 3, "height", "width")),
                TensorSpec(CONTROLNET_INPUTS[1], ("rows", 1, 1, 1)), *added),
        outputs=residuals,
        vae_scale=scale, pixel_multiple=scale * _unet_downsampling(controlnet))


def vae_encoder_component(models: StreamModels) -> ExportComponent:
    """The VAE encoder: ``images [-1, 1] -> latents`` (unscaled; the mean for an AutoencoderKL)."""
    scale = models.vae_scale_factor
    return ExportComponent(
        name=VAE_ENCODER, module=VaeEncoderExport(models.vae),
        inputs=(TensorSpec("images", ("rows", 3, "height", "width")),),
        outputs=(TensorSpec("latents", ("rows", models.latent_channels, "latent_height", "latent_width")),),
        vae_scale=scale, pixel_multiple=scale)


def vae_decoder_component(models: StreamModels) -> ExportComponent:
    """The VAE decoder: ``latents -> images`` in about [-1, 1]."""
    scale = models.vae_scale_factor
    return ExportComponent(
        name=VAE_DECODER, module=VaeDecoderExport(models.vae),
        inputs=(TensorSpec("latents", ("rows", models.latent_channels, "latent_height", "latent_width")),),
        outputs=(TensorSpec("images", ("rows", 3, "height", "width")),),
        vae_scale=scale, pixel_multiple=scale)


def component_for(models: StreamModels, name: str, *, control: bool = False,
                  controlnet: torch.nn.Module | None = None) -> ExportComponent:
    """The stock component ``name`` (one of :data:`~streamrt.engines.spec.COMPONENTS`, or ``controlnet`` with the
    ``controlnet`` module); ``control``: a UNet that takes the ControlNet residuals."""
    if name == CONTROLNET:
        if controlnet is None:
            raise ValueError("a controlnet engine component needs the ControlNet module (controlnet=...)")
        return controlnet_component(models, controlnet)
    if controlnet is not None:
        raise ValueError(f"a ControlNet module was given for the {name} component")
    if control and name != UNET:
        raise ValueError(f"only the UNet takes ControlNet residuals, not the {name}")
    if name == UNET:
        return unet_component(models, control=control)
    makers = {VAE_ENCODER: vae_encoder_component, VAE_DECODER: vae_decoder_component}
    if name not in makers:
        raise ValueError(f"unknown engine component {name!r}: use one of {', '.join(ENGINE_COMPONENTS)}")
    return makers[name](models)


@dataclass(frozen=True)
class OnnxExport:
    """An exported graph: ``path`` (and ``data_path`` when the weights are external)."""

    path: Path
    data_path: Path | None
    seconds: float
    precision: str
    opset: int

    @property
    def external_data(self) -> bool:
        return self.data_path is not None


def _module_in(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` itself when its floating weights are ``dtype``, else a cast copy (the shared models stay)."""
    floats = {p.dtype for p in module.parameters() if p.is_floating_point()}
    if floats <= {dtype}:
        return module
    logger.info("exporting a %s copy of the %s weights", dtype, "/".join(sorted(str(f) for f in floats)))
    return torch.nn.Module.to(copy.deepcopy(module), dtype=dtype)


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _consolidate_external_data(raw: Path, path: Path) -> Path:
    """Re-save ``raw`` (an ONNX file, maybe with per-tensor external files beside it) as ``path`` with
    all weights in one ``<path>.data`` file."""
    import onnx

    model = onnx.load(str(raw), load_external_data=True)
    data_name = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return path.with_name(data_name)


def _trace_to_onnx(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], target: Path, options: dict) -> None:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter warns about itself and about every Python-side shape check it
            # records as a constant; the checks it freezes are the static channel counts
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*Constant folding.*")
            warnings.filterwarnings("ignore", message=".*The feature will be removed.*")
            torch.onnx.export(module, inputs, str(target), **options)
    finally:
        module.train(was_training)


def export_onnx(component: ExportComponent, shapes: EngineShapes, path: str | os.PathLike, *,
                precision: str = "fp16", opset: int = OPSET, external_data: bool | None = None,
                check: bool = True) -> OnnxExport:
    """Export ``component`` to an ONNX file at ``path`` for ``shapes``.

    Axes whose symbol has ``min == max`` are static in the graph; the others are named dynamic axes.

    Args:
        component: what to export (see :func:`component_for` and :meth:`ExportComponent.with_io`).
        shapes: the engine's shape ranges; the example inputs use the ``opt`` sizes.
        path: the ``.onnx`` file to write; its folder should be empty or private to this export
            (external weight files are written beside it).
        precision: ``fp16`` or ``fp32``: the graph's floating dtype (models in another dtype are
            exported from a cast copy, the pipeline's own modules are never changed).
        opset: ONNX opset (>= 17).
        external_data: ``True`` writes the weights to ``<name>.onnx.data``; ``None`` does so when they
            pass :data:`EXTERNAL_DATA_THRESHOLD` bytes (needed past protobuf's 2 GB limit).
        check: run ``onnx.checker`` on the result.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNormalization and friends), got {opset}")
    dtype = PRECISIONS[precision]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = component.parameter_bytes(precision) > EXTERNAL_DATA_THRESHOLD
    dynamic_axes = component.dynamic_axes(shapes)
    module = _module_in(component.module, dtype)
    device = _module_device(module)
    inputs = component.example_inputs(shapes, dtype, device)
    start = time.perf_counter()
    before = set(path.parent.iterdir())
    target = path.with_name(path.stem + ".raw" + path.suffix) if external_data else path
    options = dict(dynamo=False, opset_version=opset, input_names=component.input_names,
                   output_names=component.output_names, dynamic_axes=dynamic_axes or None, do_constant_folding=True)
    if device.type == "cpu" and dtype == torch.float16:
        # Tracing runs the model once. fp16 convolutions on a CPU are ~40x faster channels-last than
        # NCHW (a 512x512 TAESD encoder: 300 s -> seconds); the graph is the same (ONNX has no strides).
        fast = module if module is not component.module else copy.deepcopy(module)
        fast = fast.to(memory_format=torch.channels_last)
        fast_inputs = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in inputs)
        try:
            _trace_to_onnx(fast, fast_inputs, target, options)
        except RuntimeError as exc:  # a view() the channels-last strides do not allow: the slow way
            logger.info("channels-last export failed (%s); exporting NCHW", exc)
            _trace_to_onnx(fast.to(memory_format=torch.contiguous_format), inputs, target, options)
        del fast
    else:
        _trace_to_onnx(module, inputs, target, options)
    data_path = None
    if external_data:
        data_path = _consolidate_external_data(target, path)
        for leftover in set(path.parent.iterdir()) - before - {path, data_path}:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    if check:
        import onnx

        onnx.checker.check_model(str(path))
    seconds = time.perf_counter() - start
    logger.info("exported %s (%s, %s%s) to %s in %.1f s", component.name, precision, shapes.label(),
                ", external weights" if external_data else "", path, seconds)
    return OnnxExport(path=path, data_path=data_path, seconds=seconds, precision=precision, opset=opset)
