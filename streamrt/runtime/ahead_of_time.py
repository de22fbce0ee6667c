"""Ahead-of-time compiled packages of a pipeline's UNet and VAE calls (AOTInductor), for ``compile``.

``torch.compile`` traces the Python code again in every new process (dynamo), even when inductor's kernels come
from its on-disk cache: 9.2 s of a 26.9 s restart of an SD-turbo stream on an H200 (BENCHMARKS.md, issue #17). A
call exported once (``torch.export``) and compiled by AOTInductor into a shared library loads in a fraction of a
second, with no tracing. So under ``compile`` each call is exported and compiled the first time its shapes are seen
and kept on disk as a package (``<compile cache>/aot/<call>-<key>.pt2``); a later process loads it
(docs/DESIGN.md section 6).

A package holds no weights: it is handed the live module's parameters and buffers (AOTInductor's user-managed
constants), so the pipeline's weights exist once, in-place weight changes are followed as by the module itself,
and one package serves every pipeline of the same architecture and layout. Its key covers everything the compiled
code depends on (see :func:`package_key`). Before a process loads a package for the first time, a separate process
loads and runs it (:func:`check_package`): AOTInductor's loader can end a process (a segmentation fault with torch
2.11 on the H200 machine), and a ComfyUI server must not go down with it. A package that cannot be made, checked or
loaded leaves that call on ``torch.compile``, with a warning that says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..models import predict_noise

if TYPE_CHECKING:
    from .runtime import UNetExtras

logger = logging.getLogger(__name__)

#: Bumped when what a package computes changes in a way its key does not see.
PACKAGE_FORMAT = 1
#: The sources whose Python code is traced into a package (the stream's attention processors and model calls):
#: a change in them makes new packages.
_TRACED_SOURCES = ("kv_cache.py", "models.py", "runtime/ahead_of_time.py")
_build_lock = threading.Lock()


class PackageUnavailable(RuntimeError):
    """A call could not be exported, compiled or loaded ahead of time (the message says why)."""


def _source_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in _TRACED_SOURCES:
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda sm{major}{minor} {torch.cuda.get_device_name(device)} cuda {torch.version.cuda}"
    return f"{device.type} {torch.backends.cpu.get_cpu_capability()}"


def _constants(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers (non-persistent ones too) by the names a package gives its constants."""
    return dict(chain(module.named_parameters(), module.named_buffers()))


def package_key(module: torch.nn.Module, signature: Sequence[Any], inputs: Sequence[torch.Tensor],
                device: torch.device) -> str:
    """What a package compiled from ``module`` for ``inputs`` depends on, hashed: the package format, torch and
    diffusers versions, the device (GPU architecture or CPU instruction set), StreamRT's traced sources, the
    wrapped model's class, config and attention processors, the call ``signature`` (which extras it takes), the
    inputs' shapes, strides and dtypes, and every constant's name, shape, stride and dtype (a package assumes the
    layout it was compiled for; channels-last weights make another package)."""
    import diffusers

    inner = getattr(module, "model", module)
    processors = getattr(inner, "attn_processors", {})
    description = {
        "format": PACKAGE_FORMAT, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "device": _device_description(device), "sources": _source_digest(),
        "model": f"{type(inner).__module__}.{type(inner).__qualname__}",
        "config": dict(getattr(inner, "config", {})),
        "processors": sorted({f"{type(p).__module__}.{type(p).__qualname__}" for p in processors.values()}),
        "signature": list(signature),
        "inputs": [(tuple(x.shape), x.stride(), str(x.dtype)) for x in inputs],
        "constants": [(name, tuple(t.shape), t.stride(), str(t.dtype)) for name, t in _constants(module).items()],
    }
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _spec(tensors: Sequence[tuple[str, torch.Tensor]]) -> list[list[Any]]:
    return [[name, list(t.shape), list(t.stride()), str(t.dtype).removeprefix("torch.")] for name, t in tensors]


# Run in a separate process by :func:`check_package`: loads a package and runs it once on zeros of the shapes in
# its spec, with nothing imported but torch. A crash there (AOTInductor's loader has been seen to end the process
# with a segmentation fault: torch 2.11 on an H200) costs that process, never the caller's.
_CHECK_SCRIPT = r"""
import json, sys, torch
path, spec = sys.argv[1], json.load(open(sys.argv[2]))
device = torch.device(spec["device"])
def zeros(shape, stride, dtype):
    return torch.empty_strided(shape, stride, dtype=getattr(torch, dtype), device=device).zero_()
index = device.index if device.index is not None else (0 if device.type == "cuda" else -1)
runner = torch._inductor.aoti_load_package(path, run_single_threaded=True, device_index=index)
constants = {name: zeros(*rest) for name, *rest in spec["constants"]}
wanted = list(runner.get_constant_fqns())
runner.load_constants({name: constants[name] for name in wanted}, check_full_update=True, user_managed=True)
with torch.no_grad():
    runner(*(zeros(*rest) for _, *rest in spec["inputs"]))
if device.type == "cuda":
    torch.cuda.synchronize(device)
print("package ran")
"""


def environment_key(device: torch.device) -> str:
    """What decides whether AOTInductor's packages load at all here: the torch build and the device."""
    return hashlib.sha256(f"{torch.__version__} {_device_description(device)}".encode()).hexdigest()[:16]


def check_package(path: Path, unusable: Path | None = None, timeout_s: float = 600.0) -> None:
    """Load and run the package at ``path`` once in a separate process (on zeros, from the spec written beside it)
    before this process loads it, and remember the verdict beside it (``.checked`` / ``.failed``): a package this
    torch cannot load is refused with the reason instead of crashing the caller (a ComfyUI server). When the
    checking process was killed by a signal (the loader's segmentation fault), the verdict is also written to
    ``unusable``, which stops further packages from being compiled for this torch and device.

    Raises:
        PackageUnavailable: the check failed, now or in an earlier process.
    """
    checked, failed = path.with_suffix(".checked"), path.with_suffix(".failed")
    if checked.exists():
        return
    if not failed.exists():
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-c", _CHECK_SCRIPT, str(path), str(path.with_suffix(".json"))],
                                  capture_output=True, text=True, timeout=timeout_s)
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or ["no output"]
            last = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1])
            if done.returncode < 0:
                verdict = f"killed by {signal.Signals(-done.returncode).name}: {last.strip()}"
            elif done.returncode or "package ran" not in done.stdout:
                verdict = f"exit status {done.returncode}: {last.strip()}"
            else:
                verdict = ""
        except subprocess.TimeoutExpired:
            verdict = f"no result in {timeout_s:.0f} s"
        if not verdict:
            checked.write_text("loaded and ran in a separate process\n", encoding="utf-8")
            logger.info("checked %s in a separate process in %.1f s", path.name, time.perf_counter() - started)
            return
        failed.write_text(verdict + "\n", encoding="utf-8")
        if unusable is not None and verdict.startswith("killed by "):
            unusable.write_text(f"{path.name}: {verdict}\n", encoding="utf-8")
    raise PackageUnavailable(f"{path.name} does not load or run in a separate process with this torch "
                             f"({failed.read_text(encoding='utf-8').strip()})")


def load_package(path: Path, module: torch.nn.Module, device: torch.device) -> Callable[..., Any]:
    """The compiled call in the package at ``path``, its constants bound to ``module``'s live tensors."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda"
                                                           else -1)
    # single-threaded: no locking around each run, which would get in the way of CUDA-graph capture
    runner = torch._inductor.aoti_load_package(str(path), run_single_threaded=True, device_index=index)
    wanted = list(runner.get_constant_fqns())
    constants = _constants(module)
    missing = [name for name in wanted if name not in constants]
    if missing:
        raise PackageUnavailable(f"{path.name} wants constants the module does not have ({missing[:3]})")
    runner.load_constants({name: constants[name] for name in wanted}, check_full_update=True, user_managed=True)
    return runner


def build_package(path: Path, module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    """Export ``module`` for ``inputs`` (static shapes) and compile it into the package ``path``, without its
    weights. Written under another name and renamed, so a reader never sees half a package."""
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(module, tuple(inputs), strict=False)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".building-") as folder:
            partial = Path(folder) / path.name
            torch._inductor.aoti_compile_and_package(exported, package_path=str(partial), inductor_configs={
                "aot_inductor.package_constants_in_so": False,
                # every weight stays a constant bound to the live tensor: inductor would otherwise copy small
                # ones (a conv_out bias of 4 values) into its kernels, and in-place changes would not reach them
                "always_keep_tensor_constants": True})
            spec = {"device": str(inputs[0].device), "inputs": _spec([("", x) for x in inputs]),
                    "constants": _spec(list(_constants(module).items()))}
            path.with_suffix(".json").write_text(json.dumps(spec), encoding="utf-8")
            for verdict in (".checked", ".failed"):  # of an earlier package of this name, if any
                path.with_suffix(verdict).unlink(missing_ok=True)
            os.replace(partial, path)
    logger.info("compiled %s ahead of time in %.1f s", path.name, time.perf_counter() - started)


class CompiledPackages:
    """The packages of one wrapped call (a UNet or VAE call), one per signature and input shapes, made or loaded
    on first use and then kept.

    Args:
        name: the call's name in package file names (``unet``, ``vae_encoder``, ``vae_decoder``).
        cache_dir: the compile cache folder; packages go in its ``aot`` subfolder.
    """

    def __init__(self, name: str, cache_dir: Path) -> None:
        self.name = name
        self.folder = Path(cache_dir) / "aot"
        self._runners: dict[Any, Callable[..., Any] | None] = {}
        self.problems: list[str] = []

    def runner(self, module: torch.nn.Module, signature: tuple,
               inputs: Sequence[torch.Tensor]) -> Callable[..., Any] | None:
        """The compiled call for ``signature`` and the shapes of ``inputs``: from memory, else from disk, else
        exported and compiled now (then saved); None where that failed (the caller falls back; the reason is logged
        once and kept in :attr:`problems`)."""
        shapes = (signature, *((tuple(x.shape), x.dtype, x.device) for x in inputs))
        if shapes in self._runners:
            return self._runners[shapes]
        with _build_lock:
            if shapes not in self._runners:
                self._runners[shapes] = self._make(module, signature, inputs)
        return self._runners[shapes]

    def _make(self, module: torch.nn.Module, signature: tuple,
              inputs: Sequence[torch.Tensor]) -> Callable[..., Any] | None:
        device = inputs[0].device
        try:
            unusable = self.folder / f"environment-{environment_key(device)}.unusable"
            if unusable.exists():
                raise PackageUnavailable("an earlier package crashed the process that checked it on this torch and "
                                         f"device ({unusable.read_text(encoding='utf-8').strip()}); delete "
                                         f"{unusable} to try again")
            path = self.folder / f"{self.name}-{package_key(module, signature, inputs, device)}.pt2"
            if not path.exists():
                build_package(path, module, inputs)
            check_package(path, unusable)
            started = time.perf_counter()
            runner = load_package(path, module, device)
            logger.info("loaded the ahead-of-time package %s in %.2f s", path.name, time.perf_counter() - started)
            return runner
        except Exception as exc:  # noqa: BLE001 - any failure of export/compile/load leaves the call on torch.compile
            problem = f"{self.name}: not compiled ahead of time ({type(exc).__name__}: {exc}); torch.compile runs it"
            self.problems.append(problem)
            logger.warning("StreamRT: %s", problem)
            return None


class _PromptKVInputs:
    """The prompt's cross-attention keys and values as the exported call's inputs, read by the stream's attention
    processors through the same ``layer(index)`` as :class:`streamrt.kv_cache.PromptKV`."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = tensors

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[2 * index], self.tensors[2 * index + 1]


class _UNetCall(torch.nn.Module):
    """The UNet call with its extras as plain tensor inputs, the module ``torch.export`` sees: ``(sample, timestep,
    embeds, [text_embeds, time_ids], [down residuals..., mid residual], [prompt keys and values...])``."""

    def __init__(self, unet: torch.nn.Module, *, added: bool, residuals: int, prompt_layers: int,
                 fused_qkv: bool) -> None:
        super().__init__()
        self.model = unet
        self.added, self.residuals, self.prompt_layers, self.fused_qkv = added, residuals, prompt_layers, fused_qkv

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                *extra: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        at = 0
        if self.added:
            kwargs["added_cond_kwargs"] = {"text_embeds": extra[0], "time_ids": extra[1]}
            at = 2
        if self.residuals:
            kwargs["down_block_additional_residuals"] = list(extra[at:at + self.residuals - 1])
            kwargs["mid_block_additional_residual"] = extra[at + self.residuals - 1]
            at += self.residuals
        attention: dict[str, Any] = {}
        if self.prompt_layers:
            attention["prompt_kv"] = _PromptKVInputs(extra[at:at + 2 * self.prompt_layers])
        if self.fused_qkv:
            attention["fused_qkv"] = True
        if attention:
            kwargs["cross_attention_kwargs"] = attention
        return predict_noise(self.model, sample, timesteps, embeds, **kwargs)


class AheadOfTimeUNet:
    """The UNet through ahead-of-time compiled packages (a :class:`~streamrt.runtime.runtime.UNetCall`). It takes
    every extra but the attention cache, whose ring state a package does not carry; a stream with cached attention
    keeps ``torch.compile`` (see :func:`streamrt.runtime.prepare`).

    Args:
        unet: the pipeline's UNet (its weights become the packages' constants).
        cache_dir: the compile cache folder.
        fallback: the ``torch.compile``'d UNet call, for a call whose package cannot be made.
    """

    accepts = frozenset({"added_cond", "control", "prompt_kv", "fused_qkv"})

    def __init__(self, unet: torch.nn.Module, cache_dir: Path, fallback: Callable[..., torch.Tensor]) -> None:
        self.unet = unet
        self.fallback = fallback
        self.packages = CompiledPackages("unet", cache_dir)
        self._wrappers: dict[tuple, _UNetCall] = {}
        # the prompt's keys and values as flat inputs, per PromptKV (a stream keeps one for good): listed once, not
        # by a loop over the layers in every call
        self._prompt_inputs: dict[Any, tuple[torch.Tensor, ...]] = {}

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                 extras: UNetExtras) -> torch.Tensor:
        inputs: list[torch.Tensor] = [sample, timesteps, embeds]
        added = extras.added_cond is not None
        if added:
            inputs += (extras.added_cond.text_embeds, extras.added_cond.time_ids)
        control = extras.control
        residuals = 0
        if control is not None and control.active:
            inputs += (*control.down, control.mid)
            residuals = len(control.down) + 1
        prompt_layers = 0
        if extras.prompt_kv is not None:
            flat = self._prompt_inputs.get(extras.prompt_kv)
            if flat is None:
                flat = self._prompt_inputs[extras.prompt_kv] = tuple(
                    t for _, key, value in extras.prompt_kv.layers for t in (key, value))
            inputs += flat
            prompt_layers = len(flat) // 2
        signature = ("unet", added, residuals, prompt_layers, extras.fused_qkv)
        wrapper = self._wrappers.get(signature)
        if wrapper is None:
            wrapper = self._wrappers[signature] = _UNetCall(self.unet, added=added, residuals=residuals,
                                                            prompt_layers=prompt_layers, fused_qkv=extras.fused_qkv)
        runner = self.packages.runner(wrapper, signature, inputs)
        if runner is None:
            return self.fallback(sample, timesteps, embeds, extras)
        return runner(*inputs)


class _VaeCall(torch.nn.Module):
    """One VAE call (:func:`streamrt.models.encode_images` or :func:`~streamrt.models.decode_latents`) as a module."""

    def __init__(self, vae: torch.nn.Module, call: Callable[[Any, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = vae
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(self.model, x)


class AheadOfTimeVae:
    """A VAE call through ahead-of-time compiled packages, ``call(x) -> y``; ``fallback`` (the ``torch.compile``'d
    call) runs it when its package cannot be made."""

    def __init__(self, name: str, vae: torch.nn.Module, call: Callable[[Any, torch.Tensor], torch.Tensor],
                 cache_dir: Path, fallback: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.wrapper = _VaeCall(vae, call)
        self.fallback = fallback
        self.packages = CompiledPackages(name, cache_dir)
        self.signature = (name, call.__name__)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        runner = self.packages.runner(self.wrapper, self.signature, (x,))
        if runner is None:
            return self.fallback(x)
        return runner(x)
