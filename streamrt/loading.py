"""Loading a :class:`~streamrt.models.StreamModels` from the files a ComfyUI user has, offline.

- Diffusers folders (``model_index.json`` + component folders): :func:`load_diffusers_folder`.
- Single-file SD1.x / SD2.x / SDXL checkpoints (``models/checkpoints``), with component configs shipped
  in the pack: :func:`load_checkpoint` (rules in :mod:`streamrt.checkpoints`).
- TAESD as a diffusers ``AutoencoderTiny`` folder or ComfyUI's ``taesd_encoder`` / ``taesd_decoder``
  (SDXL: ``taesdxl_*``) files (``models/vae_approx``): :func:`load_taesd`.
- LoRAs fused at load time (:mod:`streamrt.lora`), into both text encoders of SDXL.

What differs between model families (how many text encoders, how tokenizers pad, which TAESD, whether the
VAE must run in fp32) is read from :mod:`streamrt.families`.

:class:`PipelineSpec` names all of that in one hashable value whose :meth:`~PipelineSpec.cache_key`
adds file sizes and mtimes, so hosts can cache loaded pipelines. Nothing here reaches the network
(``local_files_only=True`` everywhere) or runs code from a weight file: safetensors by default, and
``.ckpt``/``.pt`` only through ``torch.load(weights_only=True)`` (:func:`read_weights`).
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .families import FAMILIES, ModelFamily, family_of_unet
from .models import StreamModels, vae_dtype
from .weights import SAFETENSORS_SUFFIXES, WEIGHT_SUFFIXES, ModelLoadError, check_weight_file, read_shapes, read_weights  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from .lora import LoraSpec

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
#: CLIP's context length; ComfyUI's tokenizer files say 8192 (ComfyUI chunks long prompts itself)
CLIP_MAX_LENGTH = 77


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """``"auto"`` means float16 on CUDA and float32 elsewhere; names like ``"fp16"`` are accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, fp16, bf16 or fp32")
    return names[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` means the current CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is available; use 'auto' or 'cpu'")
    return device


def file_fingerprint(paths: list[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every weight file under ``paths``: cheap identity for caches."""
    out = []
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
    return out


@contextmanager
def _load_errors(what: str) -> Iterator[None]:
    """Turn any failure into a :class:`ModelLoadError` naming ``what``, and let go of half-loaded models.

    The frames of the failed call are cleared, so the exception (which ComfyUI keeps for its error
    report) does not hold on to tensors. Heavy locals must therefore live in an inner function.
    """
    try:
        yield
    except ModelLoadError as exc:
        traceback.clear_frames(exc.__traceback__)
        if what in str(exc):
            raise
        raise ModelLoadError(f"{what}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        traceback.clear_frames(exc.__traceback__)
        raise ModelLoadError(f"could not load {what}: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------- TAESD


def taesd_pair(path: str | os.PathLike) -> tuple[Path, Path]:
    """ComfyUI's ``<name>_encoder.<ext>`` and ``<name>_decoder.<ext>`` from either file of the pair."""
    path = Path(path)
    stem = path.name.split(".")[0]
    for part in ("_encoder", "_decoder"):
        if stem.endswith(part):
            name = stem[: -len(part)]
            break
    else:
        raise ModelLoadError(f"{path}: expected ComfyUI's TAESD files <name>_encoder.safetensors and "
                             "<name>_decoder.safetensors, or a diffusers AutoencoderTiny folder")
    found = {}
    for part in ("encoder", "decoder"):
        matches = sorted(p for p in path.parent.glob(f"{name}_{part}.*") if p.suffix.lower() in WEIGHT_SUFFIXES)
        if not matches:
            raise ModelLoadError(f"{path.parent / (name + '_' + part)}.safetensors: file not found (TAESD needs both "
                                 "the encoder and the decoder file)")
        found[part] = matches[0]
    return found["encoder"], found["decoder"]


def taesd_name(path: str | os.PathLike) -> str:
    """ComfyUI's name of a TAESD (``taesd``, ``taesdxl``): a file's stem without ``_encoder`` / ``_decoder``, or a
    diffusers ``AutoencoderTiny`` folder's name."""
    path = Path(path)
    if path.is_dir():
        return path.name
    stem = path.name.split(".")[0]
    for part in ("_encoder", "_decoder"):
        if stem.endswith(part):
            return stem[: -len(part)]
    return stem


def _comfy_taesd(encoder: Path, decoder: Path, dtype: torch.dtype, device: torch.device,
                 family: ModelFamily | None):
    from .checkpoints import build_taesd, check_taesd_name

    for path in (encoder, decoder):
        check_taesd_name(taesd_name(path), family, path)
    vae = build_taesd(read_weights(encoder), read_weights(decoder))
    return torch.nn.Module.to(vae, device=device, dtype=dtype)


def load_taesd(source: str | os.PathLike | tuple[str | os.PathLike, str | os.PathLike], *, dtype: torch.dtype,
               device: torch.device, family: ModelFamily | None = None):
    """An ``AutoencoderTiny`` from a diffusers folder or from ComfyUI's TAESD files.

    TAESD's latents are the unscaled ones (``scaling_factor`` 1.0), whatever the family's VAE scales by.

    Args:
        source: a diffusers ``AutoencoderTiny`` folder (``config.json`` + weights); a pair
            ``(encoder, decoder)`` of ComfyUI's files (``models/vae_approx/taesd_encoder.safetensors``,
            ``taesd_decoder.safetensors``); or one file of that pair (the other is found beside it).
        family: the pipeline's :class:`~streamrt.families.ModelFamily`: a TAESD named for another family's latent
            space is refused (``taesd`` is SD1.x/SD2.x's, ``taesdxl`` SDXL's; the layers are the same, so the
            name decides). ``taesd3`` / ``taef1`` files are always refused (16-channel latent spaces). None: any
            name of a family StreamRT streams is taken.
    """
    if isinstance(source, (tuple, list)):
        encoder, decoder = (Path(p) for p in source)
        with _load_errors(f"TAESD {encoder.parent}"):
            return _comfy_taesd(encoder, decoder, dtype, device, family)
    folder = Path(source)
    if folder.is_dir():
        from diffusers import AutoencoderTiny

        from .checkpoints import check_taesd_name

        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder} is not a diffusers AutoencoderTiny folder (no config.json)")
        check_taesd_name(taesd_name(folder), family, folder)
        with _load_errors(f"TAESD {folder}"):
            return AutoencoderTiny.from_pretrained(folder, local_files_only=True, torch_dtype=dtype,
                                                   **_variant_kwargs(folder, "TAESD")).to(device)
    with _load_errors(f"TAESD {folder}"):
        return _comfy_taesd(*taesd_pair(folder), dtype, device, family)


def _taesd_paths(taesd) -> list[Path]:
    if taesd is None:
        return []
    if isinstance(taesd, (tuple, list)):
        return [Path(p) for p in taesd]
    path = Path(taesd)
    if path.is_dir():
        return [path]
    try:
        return list(taesd_pair(path))
    except ModelLoadError:
        return [path]


# --------------------------------------------------------------------------- LoRAs and the pipeline spec


def as_lora_specs(loras) -> tuple:
    """``LoraSpec``s from specs, paths, ``(path, strength)`` or ``(path, strength_model, strength_clip)``."""
    from .lora import LoraSpec

    out = []
    for item in loras or ():
        if isinstance(item, LoraSpec):
            out.append(item)
        elif isinstance(item, (str, os.PathLike)):
            out.append(LoraSpec(str(item)))
        else:
            path, *strengths = item
            out.append(LoraSpec(str(path), float(strengths[0]), float(strengths[-1])))
    return tuple(out)


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(f"unknown prediction_type {prediction_type!r}: use one of {PREDICTION_TYPES}")


@dataclass(frozen=True)
class PipelineSpec:
    """Everything that decides what a loaded pipeline holds; hashable, for caches.

    Args:
        model (`str`): a diffusers folder (``model_index.json``) or a single-file SD1.x/SD2.x/SDXL checkpoint.
        taesd: ``None`` (the model's VAE), an ``AutoencoderTiny`` folder, or ComfyUI's TAESD
            ``(encoder, decoder)`` files (see :func:`load_taesd`).
        loras (`tuple[LoraSpec, ...]`): fused in order at load time.
        dtype (`str`), device (`str`): as :func:`resolve_dtype` / :func:`resolve_device` take them.
        prediction_type (`str`): ``auto`` | ``epsilon`` | ``v_prediction`` (see :mod:`streamrt.checkpoints`).
        tokenizer_dir (`str`, *optional*): CLIP tokenizer files for checkpoints (ComfyUI's ``comfy/sd1_tokenizer``;
            SDXL's two tokenizers both come from them).
        config_dir (`str`, *optional*): component configs for a checkpoint (overrides the shipped ones).
    """

    model: str
    taesd: str | tuple[str, str] | None = None
    loras: tuple[LoraSpec, ...] = ()
    dtype: str = "auto"
    device: str = "auto"
    prediction_type: str = "auto"
    tokenizer_dir: str | None = None
    config_dir: str | None = None

    @property
    def is_diffusers_folder(self) -> bool:
        return Path(self.model).is_dir()

    def files(self) -> list[Path]:
        """Every file or folder the pipeline is read from (LoRAs aside)."""
        from .checkpoints import SIDECAR_SUFFIX, sidecar_config_dir

        paths = [Path(self.model)] + _taesd_paths(self.taesd)
        if not self.is_diffusers_folder:
            sidecar = Path(self.model + SIDECAR_SUFFIX)
            if sidecar.is_file():
                paths.append(sidecar)
                try:
                    paths.append(sidecar_config_dir(self.model))
                except ModelLoadError:
                    pass  # the load itself reports it
            paths += [Path(p) for p in (self.config_dir, self.tokenizer_dir) if p]
        return [p for p in paths if p.exists()]

    def cache_key(self) -> tuple:
        """This spec plus sizes and mtimes of every file it reads: equal keys mean equal weights."""
        return (self, tuple(file_fingerprint(self.files())), tuple(lora.fingerprint() for lora in self.loras))

    def load(self) -> StreamModels:
        """Load the pipeline (see :func:`load_diffusers_folder` and :func:`load_checkpoint`)."""
        if self.is_diffusers_folder:
            return load_diffusers_folder(self.model, dtype=self.dtype, device=self.device, taesd=self.taesd,
                                         loras=self.loras, prediction_type=self.prediction_type)
        return load_checkpoint(self.model, tokenizer_dir=self.tokenizer_dir, dtype=self.dtype, device=self.device,
                               taesd=self.taesd, loras=self.loras, prediction_type=self.prediction_type,
                               config_dir=self.config_dir)


def _finish(parts: dict, *, kind: str, files: list[Path], loras: tuple, dtype: torch.dtype,
            device: torch.device) -> StreamModels:
    """Cast and move the modules, fuse the LoRAs on the target device, and wrap them.

    The VAE takes :func:`~streamrt.models.vae_dtype` (fp32 for SDXL's VAE in an fp16 pipeline); it should arrive in
    the dtype of its file or in fp32, so that an upcast VAE keeps every bit of its weights.
    """
    from .checkpoints import numbered
    from .lora import fuse_loras

    family = family_of_unet(parts["unet"].config)
    encoders = numbered("text_encoder", family.text_encoders)
    tokenizers = numbered("tokenizer", family.text_encoders)
    for name in ("unet",) + encoders:
        parts[name] = torch.nn.Module.to(parts[name], device=device, dtype=dtype)
    vae_as = vae_dtype(parts["vae"], dtype, family)
    if vae_as != dtype:
        logger.info("VAE kept in %s in this %s pipeline: its config asks for force_upcast (%s's VAE overflows in %s; "
                    "the fp16-fix VAE, madebyollin/sdxl-vae-fp16-fix, does not and stays in %s)", vae_as, dtype,
                    family.label, dtype, dtype)
    parts["vae"] = torch.nn.Module.to(parts["vae"], device=device, dtype=vae_as)
    lora_ids = fuse_loras(loras, parts["unet"], *(parts[name] for name in encoders)) if loras else []
    for encoder, tokenizer in zip(encoders, tokenizers):
        vocab = int(parts[encoder].config.vocab_size)
        if len(parts[tokenizer]) > vocab:
            raise ModelLoadError(f"the {tokenizer} has {len(parts[tokenizer])} tokens but the {encoder} only {vocab}: "
                                 "they do not belong together")
    identity = {"kind": kind, "files": file_fingerprint(files), "loras": lora_ids,
                "prediction_type": str(parts["scheduler"].config.prediction_type), "dtype": str(dtype),
                "device": str(device)}
    return StreamModels(unet=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                        tokenizer=parts["tokenizer"], scheduler=parts["scheduler"], identity=identity,
                        text_encoder_2=parts.get("text_encoder_2"), tokenizer_2=parts.get("tokenizer_2"))


# --------------------------------------------------------------------------- diffusers folders


def load_diffusers_folder(folder: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
                          device: str | torch.device = "auto", taesd=None, loras=(),
                          prediction_type: str = "auto") -> StreamModels:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and an LCM schedule from a diffusers folder.

    Args:
        folder: a folder with ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``
            and ``scheduler/``; an SDXL folder (a UNet with text/time added conditions) also ``text_encoder_2/``
            (a ``CLIPTextModelWithProjection``) and ``tokenizer_2/``. A component with variant weight files only
            (``*.fp16.safetensors``) loads that variant (:func:`weights_variant`).
        dtype: ``auto`` | ``fp16`` | ``bf16`` | ``fp32`` or a torch dtype. An SDXL VAE whose config asks for
            ``force_upcast`` stays in fp32 in an fp16 pipeline (:func:`streamrt.models.vae_dtype`).
        device: ``auto`` | ``cpu`` | ``cuda[:i]``.
        taesd: optional TAESD used instead of the folder's VAE (see :func:`load_taesd`; ``taesdxl`` for SDXL).
        loras: LoRAs fused at load time (:class:`~streamrt.lora.LoraSpec`, paths or ``(path, strength)``).
        prediction_type: ``auto`` (the folder's scheduler config), ``epsilon`` or ``v_prediction``.

    Raises:
        ModelLoadError: missing or unreadable files, with the path in the message.
    """
    folder = Path(folder)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    _check_prediction_type(prediction_type)
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder} is not a diffusers folder: model_index.json is missing")
    if not (folder / "unet").is_dir():
        raise ModelLoadError(f"{folder} lacks the component folders ['unet']")
    with _load_errors(f"the diffusers folder {folder}"):
        family = _folder_family(folder)
    _check_component_folders(folder, family, need_vae=taesd is None)
    loras = as_lora_specs(loras)
    with _load_errors(f"the diffusers folder {folder}"):
        models = _load_diffusers_folder(folder, family, dtype, device, taesd, loras, prediction_type)
    logger.info("loaded diffusers folder %s (%s, %s, %s, %d LoRA(s))", folder, family, dtype, device, len(loras))
    return models


def _folder_family(folder: Path) -> ModelFamily:
    """The family of a diffusers folder, from its UNet's config (no weights read)."""
    from diffusers import UNet2DConditionModel

    return family_of_unet(UNet2DConditionModel.load_config(folder, subfolder="unet", local_files_only=True))


def _check_component_folders(folder: Path, family: ModelFamily, *, need_vae: bool) -> None:
    """Refuse a folder that lacks a component its family needs, naming them all."""
    from .checkpoints import numbered

    wanted = ["scheduler", *numbered("text_encoder", family.text_encoders),
              *numbered("tokenizer", family.text_encoders)] + (["vae"] if need_vae else [])
    missing = [c for c in wanted if not (folder / c).is_dir()]
    if not missing:
        return
    if family.text_encoders > 1 and "text_encoder" in missing and (folder / "text_encoder_2").is_dir():
        raise ModelLoadError(f"{folder} has a second text encoder but no first one: an SDXL refiner, which StreamRT "
                             "does not stream (SDXL base-type models have both)")
    raise ModelLoadError(f"{folder} lacks the component folders {missing}"
                         + (f" ({family.label} has {family.text_encoders} text encoders)" if family.text_encoders > 1
                            else ""))


#: weight files of a diffusers / transformers component folder without a variant (single or sharded)
_PLAIN_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                  "pytorch_model.bin")
#: ``<name>.<variant>.safetensors``, ``<name>.<variant>-00001-of-00002.safetensors``,
#: ``<name>.safetensors.index.<variant>.json``
_VARIANT_FILE = re.compile(r"^(?:diffusion_pytorch_model|model|pytorch_model)(?:\.(?:safetensors|bin)\.index)?"
                           r"\.([A-Za-z0-9_]+)(?:-\d+-of-\d+)?\.(?:safetensors|bin|json)$")


def weights_variant(folder: str | os.PathLike) -> str | None:
    """The weights variant to load from a diffusers component folder: None when it holds plain weight files, else
    the variant of the files it holds (``fp16`` first): a folder with only ``*.fp16.safetensors`` files (as many
    published models ship) loads only when diffusers / transformers are asked for ``variant="fp16"``."""
    folder = Path(folder)
    names = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
    if any(name in names or f"{name}.index.json" in names for name in _PLAIN_WEIGHTS):
        return None
    variants = {m.group(1) for m in map(_VARIANT_FILE.match, names) if m and m.group(1) not in ("safetensors", "bin")}
    if not variants:
        return None
    return "fp16" if "fp16" in variants else sorted(variants)[0]


def _variant_kwargs(folder: Path, what: str) -> dict:
    """``{"variant": ...}`` for ``from_pretrained`` when ``folder`` holds variant weight files only, else ``{}``."""
    variant = weights_variant(folder)
    if variant is None:
        return {}
    logger.info("%s: only %s weight files (*.%s.safetensors): loading that variant", what, variant, variant)
    return {"variant": variant}


def _load_diffusers_folder(folder: Path, family: ModelFamily, dtype: torch.dtype, device: torch.device, taesd,
                           loras: tuple, prediction_type: str) -> StreamModels:
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .checkpoints import numbered, projects_pooled

    override = {} if prediction_type == "auto" else {"prediction_type": prediction_type}
    parts = {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True,
                                                     torch_dtype=dtype, **_variant_kwargs(folder / "unet", "unet")),
        "scheduler": LCMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True, **override),
        # The VAE comes in fp32 and _finish casts it: a VAE that stays in fp32 (force_upcast) then keeps the
        # file's values, not ones rounded to fp16 on the way.
        "vae": (load_taesd(taesd, dtype=dtype, device=device, family=family) if taesd is not None else
                AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True, torch_dtype=torch.float32,
                                              **_variant_kwargs(folder / "vae", "vae"))),
    }
    encoders = numbered("text_encoder", family.text_encoders)
    for index, (encoder, tokenizer) in enumerate(zip(encoders, numbered("tokenizer", family.text_encoders))):
        model_class = CLIPTextModelWithProjection if projects_pooled(family, index) else CLIPTextModel
        parts[encoder] = model_class.from_pretrained(folder, subfolder=encoder, local_files_only=True,
                                                     torch_dtype=dtype, **_variant_kwargs(folder / encoder, encoder))
        parts[tokenizer] = CLIPTokenizer.from_pretrained(folder, subfolder=tokenizer, local_files_only=True)
    return _finish(parts, kind="diffusers", files=[folder] + _taesd_paths(taesd), loras=loras, dtype=dtype,
                   device=device)


# --------------------------------------------------------------------------- single-file checkpoints


def load_checkpoint(path: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
                    dtype: str | torch.dtype = "auto", device: str | torch.device = "auto", taesd=None, loras=(),
                    prediction_type: str = "auto", config_dir: str | os.PathLike | None = None) -> StreamModels:
    """Load a single-file SD1.x / SD2.x / SDXL checkpoint (ComfyUI's ``models/checkpoints``), offline.

    The architecture is read from the file's keys and shapes and the component configs come with the
    pack (see :mod:`streamrt.checkpoints` for the rules, the prediction type included).

    Args:
        path: a ``.safetensors`` file (``.ckpt``/``.pt`` are read as plain tensors only; a pickle that
            would run code is refused).
        tokenizer_dir: CLIP tokenizer files (``vocab.json``, ``merges.txt``): ComfyUI ships them in
            ``comfy/sd1_tokenizer``. SDXL's two tokenizers both come from them, padded as the family says
            (the second with ``"!"``, as OpenCLIP's). Not needed when the config folder has a ``tokenizer/``
            (and ``tokenizer_2/``).
        dtype, device: as in :func:`load_diffusers_folder`.
        taesd: optional TAESD used instead of the checkpoint's VAE (see :func:`load_taesd`; ``taesdxl`` for
            SDXL).
        loras: LoRAs fused at load time.
        prediction_type: ``auto`` | ``epsilon`` | ``v_prediction``.
        config_dir: a diffusers-layout folder of component configs (``unet/``, ``vae/``,
            ``text_encoder/``, SDXL's ``text_encoder_2/``, ``scheduler/``, optionally ``tokenizer/`` and
            ``tokenizer_2/``) used instead of the shipped ones; default: the one named by a
            ``<path>.streamrt.json`` sidecar, if any.

    Raises:
        ModelLoadError: missing/corrupt/refused file, unsupported architecture (the SDXL refiner, SD3, Flux,
            inpainting...), weights that do not fit the configs; the message names the file.
    """
    path = Path(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    _check_prediction_type(prediction_type)
    loras = as_lora_specs(loras)
    with _load_errors(str(path)):
        models = _load_checkpoint(path, Path(tokenizer_dir) if tokenizer_dir else None, dtype, device, taesd, loras,
                                  prediction_type, Path(config_dir) if config_dir else None)
    logger.info("loaded checkpoint %s (%s, %s, %s, %s, %d LoRA(s))", path, models.identity["family"],
                models.prediction_type, dtype, device, len(loras))
    return models


def _load_checkpoint(path: Path, tokenizer_dir: Path | None, dtype: torch.dtype, device: torch.device, taesd,
                     loras: tuple, prediction_type: str, config_dir: Path | None) -> StreamModels:
    from diffusers import LCMScheduler

    from . import checkpoints as ckpt

    check_weight_file(path)
    config_dir = config_dir or ckpt.sidecar_config_dir(path)
    if config_dir is not None and not (config_dir / "unet").is_dir():
        raise ModelLoadError(f"config folder {config_dir} has no unet/ (expected a diffusers layout: unet/, vae/, "
                             "text_encoder/, scheduler/)")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:  # refuse what cannot stream before reading gigabytes
        shapes = read_shapes(path)
        names = ckpt.normalize_keys(list(shapes))
        header = ckpt.detect_architecture({names[k]: s for k, s in shapes.items()}, check_widths=config_dir is None)
        for taesd_path in _taesd_paths(taesd):  # a TAESD of another latent space, too
            ckpt.check_taesd_name(taesd_name(taesd_path), header.model_family, taesd_path)
    raw = read_weights(path)
    names = ckpt.normalize_keys(list(raw))
    state = {names[k]: v for k, v in raw.items()}
    del raw
    arch = ckpt.detect_architecture({k: tuple(v.shape) for k, v in state.items()}, check_widths=config_dir is None)

    if prediction_type != "auto":
        reason = "asked for"
    elif config_dir is not None:
        prediction_type = LCMScheduler.load_config(config_dir, subfolder="scheduler")["prediction_type"]
        reason = f"the scheduler config of {config_dir}"
    else:
        prediction_type, reason = ckpt.auto_prediction_type(arch, path.name, state.get(ckpt.V_NORM_KEY))
    family = arch.model_family
    logger.info("%s: %s, %s (%s)", path.name, family.label, prediction_type, reason)
    configs = config_dir or ckpt.shipped_config_dir(family, prediction_type)

    if taesd is None and not arch.has_vae:
        raise ModelLoadError(f"the checkpoint has no VAE (first_stage_model.*): pick a TAESD ({family.taesd})")
    parts = ckpt.build_components(state, family, configs, with_vae=taesd is None)
    del state
    if taesd is not None:
        parts["vae"] = load_taesd(taesd, dtype=dtype, device=device, family=family)

    parts.update(_clip_tokenizers(configs, tokenizer_dir, family))
    parts["scheduler"] = LCMScheduler.from_pretrained(configs, subfolder="scheduler", local_files_only=True,
                                                      prediction_type=prediction_type)
    files = [path] + [p for p in (Path(str(path) + ckpt.SIDECAR_SUFFIX), config_dir) if p and p.exists()]
    models = _finish(parts, kind="checkpoint", files=files + _taesd_paths(taesd), loras=loras, dtype=dtype,
                     device=device)
    models.identity["family"] = arch.family
    return models


def _clip_tokenizers(configs: Path, tokenizer_dir: Path | None, family: ModelFamily) -> dict[str, object]:
    """``tokenizer`` (and SDXL's ``tokenizer_2``) for a checkpoint, each from the first of:

    1. the config folder's own ``tokenizer/`` (``tokenizer_2/``), used as it is;
    2. the CLIP tokenizer files in ``tokenizer_dir`` (ComfyUI's ``comfy/sd1_tokenizer``);
    3. the config folder's ``tokenizer/`` files (all of a family's tokenizers share CLIP's vocabulary);

    the last two padded as the family says (:attr:`ModelFamily.pad_tokens`: ``"!"``, id 0, for OpenCLIP-trained
    encoders such as SD2's and SDXL's second; the files' own end token otherwise) and cut at 77 tokens.
    """
    from transformers import CLIPTokenizer

    from .checkpoints import numbered

    out = {}
    for name, pad in zip(numbered("tokenizer", family.text_encoders), family.pad_tokens):
        if (configs / name).is_dir():
            out[name] = CLIPTokenizer.from_pretrained(configs / name, local_files_only=True)
            continue
        source = tokenizer_dir if tokenizer_dir is not None else (
            configs / "tokenizer" if (configs / "tokenizer").is_dir() else None)
        if source is None:
            raise ModelLoadError("no tokenizer: pass tokenizer_dir (ComfyUI ships CLIP's in comfy/sd1_tokenizer)")
        if not (source / "vocab.json").is_file():
            raise ModelLoadError(f"{source} holds no CLIP tokenizer (vocab.json, merges.txt)")
        padding = {} if pad is None else {"pad_token": pad}
        out[name] = CLIPTokenizer.from_pretrained(source, local_files_only=True, model_max_length=CLIP_MAX_LENGTH,
                                                  **padding)
    return out


# --------------------------------------------------------------------------- models a host already holds


@dataclass(eq=False)
class LdmWeights:
    """An SD1.x / SD2.x / SDXL model in the original (LDM) layout, already in memory: what a host such as ComfyUI
    holds after loading a checkpoint and applying its patches (LoRAs), handed over tensor by tensor.

    Args:
        unet: the UNet's tensors, LDM names (``input_blocks.*``, ``middle_block.*``, ``out.*``, SDXL's
            ``label_emb.*``).
        unet_params: the LDM ``UNetModel`` parameters (see :func:`streamrt.checkpoints.unet_config_from_ldm`).
        text_encoder: the CLIP text tower's tensors in transformers' names (``text_model.*``).
        text_layers: how many transformer layers of ``text_encoder`` are kept (all for SD1 and SDXL, 23 of 24 for
            SD2, fewer with CLIP skip); for SD1/SD2 the output is that layer's after the final layer norm, for SDXL
            the family's penultimate hidden state.
        vae: a full VAE's tensors (LDM names: ``encoder.*``, ``decoder.*``, ``quant_conv.*``), or TAESD's
            (``taesd_encoder.*``, ``taesd_decoder.*``).
        prediction_type: ``epsilon`` or ``v_prediction``.
        text_encoder_2: SDXL's second text tower (OpenCLIP-bigG) in transformers' names, with its
            ``text_projection.weight``; None for SD1.x / SD2.x.
    """

    unet: dict[str, torch.Tensor]
    unet_params: dict
    text_encoder: dict[str, torch.Tensor]
    text_layers: int
    vae: dict[str, torch.Tensor]
    prediction_type: str
    text_encoder_2: dict[str, torch.Tensor] | None = None


def load_ldm_weights(weights: LdmWeights, *, tokenizer_dir: str | os.PathLike | None, dtype: str | torch.dtype,
                     device: str | torch.device, identity: dict | None = None,
                     config_dir: str | os.PathLike | None = None) -> StreamModels:
    """A pipeline from a model a host holds in memory (see :class:`LdmWeights`), for SD1.x / SD2.x / SDXL.

    The family comes from the text encoders' widths (768: SD1, 1024: SD2, 768 + 1280: SDXL), the UNet's config
    from its parameters (any SD1/SD2/SDXL-shaped UNet), VAE, text encoder and scheduler configs from the shipped
    ones, or from ``config_dir`` (a diffusers-layout folder, as for :func:`load_checkpoint`) for other widths.
    The modules take the given tensors without copying them where dtype and device already match.

    Raises:
        ModelLoadError: another family, weights that do not fit, an unknown prediction type.
    """
    from diffusers import LCMScheduler

    from . import checkpoints as ckpt

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if weights.prediction_type not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"the model predicts {weights.prediction_type!r}: StreamRT streams epsilon and "
                             "v_prediction models")
    towers = [weights.text_encoder] + ([weights.text_encoder_2] if weights.text_encoder_2 is not None else [])
    widths = tuple(next((int(v.shape[1]) for k, v in tower.items() if k.endswith("embeddings.token_embedding.weight")),
                        0) for tower in towers)
    family = next((f for f in FAMILIES.values() if f.text_widths == widths), None)
    if family is None and config_dir is None:
        known = ", ".join(f"{f.label} ({' + '.join(map(str, f.text_widths))})" for f in FAMILIES.values())
        raise ModelLoadError(f"text encoders of width {' + '.join(map(str, widths))}: StreamRT streams {known} "
                             "models from a host's model")
    context = int(weights.unet_params.get("context_dim") or 0)
    if context != sum(widths):
        raise ModelLoadError(f"the UNet's cross-attention width {context} does not match the text encoders' "
                             f"{' + '.join(map(str, widths))}")
    family = family or next(f for f in FAMILIES.values() if f.text_encoders == len(widths))
    pooled_dim = 0
    if weights.text_encoder_2 is not None:
        projection = weights.text_encoder_2.get("text_projection.weight")
        if projection is None:
            raise ModelLoadError("the second text encoder has no text_projection.weight: SDXL's pooled embedding is "
                                 "its projection")
        pooled_dim = int(projection.shape[0])
    configs = Path(config_dir) if config_dir else ckpt.shipped_config_dir(family, weights.prediction_type)
    with _load_errors("the model"):
        from diffusers import UNet2DConditionModel

        # the config folder's UNet says whether attention runs upcast (SD2's 768-px v models: sd2-v)
        upcast = bool(UNet2DConditionModel.load_config(configs, subfolder="unet", local_files_only=True).get(
            "upcast_attention") or False)
        unet_config = ckpt.unet_config_from_ldm(weights.unet_params, upcast_attention=upcast, pooled_dim=pooled_dim)
        parts = {"unet": ckpt.build_unet({ckpt.UNET + k: v for k, v in weights.unet.items()}, unet_config),
                 "text_encoder": ckpt.build_text_encoder(weights.text_encoder, configs, weights.text_layers)}
        if weights.text_encoder_2 is not None:
            parts["text_encoder_2"] = ckpt.build_text_encoder(weights.text_encoder_2, configs,
                                                              subfolder="text_encoder_2", projection=True)
        if any(k.startswith("taesd_encoder.") for k in weights.vae):
            parts["vae"] = ckpt.build_taesd(
                {k[len("taesd_encoder."):]: v for k, v in weights.vae.items() if k.startswith("taesd_encoder.")},
                {k[len("taesd_decoder."):]: v for k, v in weights.vae.items() if k.startswith("taesd_decoder.")})
        else:
            parts["vae"] = ckpt.build_vae(weights.vae, configs)
        parts.update(_clip_tokenizers(configs, Path(tokenizer_dir) if tokenizer_dir else None, family))
        parts["scheduler"] = LCMScheduler.from_pretrained(configs, subfolder="scheduler", local_files_only=True,
                                                          prediction_type=weights.prediction_type)
        models = _finish(parts, kind="host", files=[], loras=(), dtype=dtype, device=device)
    models.identity.update(identity or {}, family=family.name)
    logger.info("pipeline from the host's model: %s, %s, %s, %s, text layers %d", family.label,
                weights.prediction_type, dtype, device, weights.text_layers)
    return models


def load_pipeline(spec: PipelineSpec) -> StreamModels:
    """Load what ``spec`` describes (a diffusers folder or a checkpoint)."""
    return spec.load()
