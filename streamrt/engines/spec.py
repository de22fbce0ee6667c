"""What an engine is built for: shape ranges, components, precisions, backends and targets.

Plain data shared by export, build, cache and runner. Nothing here imports TensorRT.

Shapes are described by *symbols*: ``rows`` (the batch: UNet rows or VAE frames), ``height`` and
``width`` (pixels), ``latent_height`` and ``latent_width`` (pixels / VAE scale), plus any extra
symbols a component adds (the cached-attention K/V I/O). Each symbol has a :class:`DimRange`
``(min, opt, max)``; a range with ``min == max`` is static. The same symbols give the ONNX dynamic
axes, the TensorRT optimisation profile and part of the cache key, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..runtime.runtime import CONTROLNET, UNET, VAE_DECODER, VAE_ENCODER  # the components, named once

#: Bump when the export or build changes the bytes of an engine for an unchanged key, or the key gains a
#: field: every engine built by an older format is then stale and gets rebuilt. 2: keys carry the model family
#: (and SDXL UNets take their added conditions).
ENGINE_FORMAT = 2

#: The pipeline's own components (one engine each per stream config).
COMPONENTS: tuple[str, ...] = (UNET, VAE_ENCODER, VAE_DECODER)
#: Everything an engine can be built for: the pipeline's components and a ControlNet (see
#: :func:`streamrt.engines.export.controlnet_component`).
ENGINE_COMPONENTS: tuple[str, ...] = (*COMPONENTS, CONTROLNET)

PRECISIONS: dict[str, torch.dtype] = {"fp16": torch.float16, "fp32": torch.float32}

TENSORRT_RTX, TENSORRT = "tensorrt-rtx", "tensorrt"
BACKENDS: tuple[str, ...] = (TENSORRT_RTX, TENSORRT)
#: python module and pip distribution of each backend
BACKEND_MODULES: dict[str, str] = {TENSORRT_RTX: "tensorrt_rtx", TENSORRT: "tensorrt"}

#: Compute capabilities TensorRT-RTX (1.7) builds for ahead of time, on any machine. Hopper (SM90)
#: and data-centre Blackwell (SM100) are not among them: its runtime refuses those GPUs.
RTX_TARGETS: tuple[str, ...] = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")
#: What the build node offers besides ``auto`` (the local GPU).
TARGET_CHOICES: tuple[str, ...] = ("SM75", "SM80", "SM86", "SM89", "SM120")


def target_name(major: int, minor: int) -> str:
    """``(8, 9)`` -> ``"SM89"``."""
    return f"SM{major}{minor}"


def parse_target(target: str) -> tuple[int, int]:
    """``"SM89"`` -> ``(8, 9)``; ``"SM120"`` -> ``(12, 0)``."""
    text = target.strip().upper()
    if not text.startswith("SM") or not text[2:].isdigit() or len(text) < 4:
        raise ValueError(f"a compute capability looks like 'SM89' (8.9) or 'SM120' (12.0), got {target!r}")
    digits = text[2:]
    return int(digits[:-1]), int(digits[-1])


@dataclass(frozen=True)
class DimRange:
    """One dimension an engine accepts: ``min <= opt <= max`` (``opt`` is what TensorRT tunes for)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"a dimension range needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    @classmethod
    def fixed(cls, value: int) -> DimRange:
        return cls(value, value, value)

    @classmethod
    def of(cls, value: int | DimRange | Iterable[int]) -> DimRange:
        """A range from an int (static), a DimRange, or ``(min, opt, max)``."""
        if isinstance(value, DimRange):
            return value
        if isinstance(value, int):
            return cls.fixed(value)
        lo, opt, hi = (int(v) for v in value)
        return cls(lo, opt, hi)

    @property
    def static(self) -> bool:
        return self.min == self.max

    def covers(self, value: int) -> bool:
        return self.min <= value <= self.max

    def values(self) -> tuple[int, int, int]:
        return (self.min, self.opt, self.max)

    def divided(self, factor: int, what: str) -> DimRange:
        """Every bound divided by ``factor`` (each must be a multiple: ``what`` names the dimension)."""
        bad = [v for v in self.values() if v % factor]
        if bad:
            raise ValueError(f"{what} {'/'.join(map(str, self.values()))} must be multiples of {factor}")
        return DimRange(self.min // factor, self.opt // factor, self.max // factor)

    def label(self) -> str:
        return str(self.min) if self.static else f"{self.min}-{self.opt}-{self.max}"


@dataclass(frozen=True)
class EngineShapes:
    """The shapes one engine accepts.

    Args:
        rows (`DimRange`): batch rows (UNet: ``StreamConfig.unet_rows``; VAE: frames per step).
        height (`DimRange`): image height in pixels.
        width (`DimRange`): image width in pixels.
        extra (`tuple[tuple[str, DimRange], ...]`): ranges of the symbols that added I/O uses (the
            cached-attention K/V tensors, for instance), sorted by name.
    """

    rows: DimRange
    height: DimRange
    width: DimRange
    extra: tuple[tuple[str, DimRange], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", DimRange.of(self.rows))
        object.__setattr__(self, "height", DimRange.of(self.height))
        object.__setattr__(self, "width", DimRange.of(self.width))
        extra = tuple(sorted((str(k), DimRange.of(v)) for k, v in dict(self.extra).items()))
        clash = [k for k, _ in extra if k in ("rows", "height", "width", "latent_height", "latent_width")]
        if clash:
            raise ValueError(f"extra shape symbols {clash} clash with the built-in ones")
        object.__setattr__(self, "extra", extra)

    @classmethod
    def static(cls, rows: int, width: int, height: int, **extra: int) -> EngineShapes:
        return cls(DimRange.fixed(rows), DimRange.fixed(height), DimRange.fixed(width),
                   tuple((k, DimRange.fixed(v)) for k, v in extra.items()))

    @classmethod
    def ranged(cls, rows: int | DimRange, width: int, height: int, min_size: int, max_size: int) -> EngineShapes:
        """Width and height anywhere in ``[min_size, max_size]``, tuned for ``width x height``."""
        if not min_size <= min(width, height) or not max(width, height) <= max_size:
            raise ValueError(f"{width}x{height} must lie within the size range [{min_size}, {max_size}]")
        return cls(DimRange.of(rows), DimRange(min_size, height, max_size), DimRange(min_size, width, max_size))

    @property
    def is_static(self) -> bool:
        return all(r.static for r in (self.rows, self.height, self.width, *(v for _, v in self.extra)))

    def covers(self, rows: int, width: int, height: int) -> bool:
        return self.rows.covers(rows) and self.width.covers(width) and self.height.covers(height)

    def with_extra(self, **symbols: int | DimRange | Iterable[int]) -> EngineShapes:
        merged = dict(self.extra)
        merged.update({k: DimRange.of(v) for k, v in symbols.items()})
        return EngineShapes(self.rows, self.height, self.width, tuple(merged.items()))

    def symbols(self, vae_scale: int) -> dict[str, DimRange]:
        """Every symbol's range, latent sizes derived with the VAE's scale factor."""
        return {"rows": self.rows, "height": self.height, "width": self.width,
                "latent_height": self.height.divided(vae_scale, "heights"),
                "latent_width": self.width.divided(vae_scale, "widths"), **dict(self.extra)}

    def label(self) -> str:
        """Short text for file names and reports: ``r3_512x512`` or ``r1-2-4_w256-512-768_h256-512-768``."""
        if self.width.static and self.height.static:
            size = f"{self.width.min}x{self.height.min}"
        else:
            size = f"w{self.width.label()}_h{self.height.label()}"
        extra = "".join(f"_{k}{v.label()}" for k, v in self.extra)
        return f"r{self.rows.label()}_{size}{extra}"

    def to_json(self) -> dict:
        return {"rows": list(self.rows.values()), "height": list(self.height.values()),
                "width": list(self.width.values()), "extra": {k: list(v.values()) for k, v in self.extra}}

    @classmethod
    def from_json(cls, data: Mapping) -> EngineShapes:
        return cls(DimRange.of(data["rows"]), DimRange.of(data["height"]), DimRange.of(data["width"]),
                   tuple((k, DimRange.of(v)) for k, v in dict(data.get("extra", {})).items()))
