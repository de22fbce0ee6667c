"""Shared pieces of the engine tests (tests/test_engine_export.py, tests/test_engine_build.py,
tests/test_engines_sdxl.py): the tiny random pipelines (SD1-shaped and SDXL-shaped) as ``StreamModels``, a UNet
component with extra K/V inputs/outputs (the export extension point), onnxruntime sessions standing in for
TensorRT engines (running an engine needs an RTX-class GPU), and a spy that counts engine builds.

Plain functions and classes, imported as a top-level module (``from engine_helpers import kv_component``).
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from streamrt import StreamConfig, StreamModels
from streamrt.engines import TensorSpec, component_for, export_onnx, requests_for_stream
from streamrt.engines import build as build_mod
from streamrt.random_models import build_random_components, random_stream_models
from streamrt.runtime import AttachResult

_MISSING = [name for name in ("polygraphy", "tensorrt_rtx") if importlib.util.find_spec(name) is None]
#: on the tests that really build: skipped, with the reason, without the builder installed
needs_builder = pytest.mark.skipif(bool(_MISSING), reason=f"engine builds need {' and '.join(_MISSING)} "
                                                          "(pip install -r requirements.txt tensorrt-rtx)")
#: the compute capability the CI builds for (TensorRT-RTX builds ahead of time, without a GPU)
TARGET = "SM89"


def tiny_stream_models(vae: str = "taesd", seed: int = 0, dtype: torch.dtype = torch.float32) -> StreamModels:
    """Tiny random pipeline as ``StreamModels`` (``vae``: ``taesd`` or ``kl``), with an identity."""
    return random_stream_models("tiny", seed=seed, dtype=dtype, vae=vae,
                                identity={"kind": "random", "preset": "tiny", "vae": vae, "seed": seed})


def tiny_xl_stream_models(seed: int = 0, dtype: torch.dtype = torch.float32, identity: dict | None = None,
                          sharpen: float = 1.0) -> StreamModels:
    """The ``tiny-xl`` random pipeline (SDXL-shaped: two text encoders, added conditions) with its TAESD, as
    ``StreamModels``. ``sharpen`` scales every attn1 query and key projection (see tests/test_kv_cache.py)."""
    parts = build_random_components("tiny-xl", seed=seed, dtype=dtype)
    models = StreamModels(unet=parts["unet"], vae=parts["taesd"], text_encoder=parts["text_encoder"],
                          tokenizer=parts["tokenizer"], scheduler=parts["scheduler"],
                          text_encoder_2=parts["text_encoder_2"], tokenizer_2=parts["tokenizer_2"],
                          identity=identity if identity is not None else {"kind": "random", "preset": "tiny-xl",
                                                                          "seed": seed})
    if sharpen != 1.0:
        for name, module in models.unet.named_modules():
            if name.endswith("attn1"):
                module.to_q.weight.mul_(sharpen)
                module.to_k.weight.mul_(sharpen)
    return models


class KVUNet(torch.nn.Module):
    """Stand-in for the cached-attention UNet: the stock inputs plus a K/V ring, the stock output plus this
    frame's K/V (here a function of the sample, so the graph really depends on both)."""

    def __init__(self, unet: torch.nn.Module, channels: int) -> None:
        super().__init__()
        self.unet = unet
        self.proj = torch.nn.Linear(4, channels)

    def forward(self, sample, timestep, encoder_hidden_states, kv_ring):
        noise = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        tokens = sample.flatten(2).transpose(1, 2)                       # [rows, h*w, 4]
        current = self.proj(tokens)                                       # [rows, h*w, C]
        attended = noise + kv_ring.mean(dim=(1, 2))[:, None, None, None]  # reads the ring
        return attended, current


def kv_component(m: StreamModels, window: int = 2):
    """The UNet component with a ``kv_ring`` input and a ``kv_current`` output (new shape symbols
    ``kv_tokens`` and ``latent_tokens``), for ``window`` cached frames."""
    base = component_for(m, "unet")
    channels = 32
    return base.with_io(
        KVUNet(m.unet, channels),
        extra_inputs=[TensorSpec("kv_ring", ("rows", "kv_tokens", channels))],
        extra_outputs=[TensorSpec("kv_current", ("rows", "latent_tokens", channels))],
        cache_window=window)


def ort_session(path: str | Path):
    """An onnxruntime CPU session of an ONNX file, on one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeRunner:
    """Stands in for EngineRunner (which needs an RTX GPU): same call contract, onnxruntime underneath.

    ``bound`` keeps, per call, the storage address of every input by name: what an EngineRunner would bind
    (it rebinds only when an address changes), so a test can check that a stream hands over its own buffers.
    ``persistent``: return the same output tensors (and the same tuple) on every call, rewritten, as an
    EngineRunner does with its bound output buffers (by default each call returns new tensors)."""

    def __init__(self, path: Path, input_names, output_names, persistent: bool = False) -> None:
        self.session = ort_session(path)
        self.input_names, self.output_names = tuple(input_names), tuple(output_names)
        self.calls = 0
        self.bound: list[dict[str, int]] = []
        self.persistent = persistent
        self._result = None

    def __call__(self, *inputs):
        if len(inputs) != len(self.input_names):
            raise TypeError(f"takes {len(self.input_names)} inputs {list(self.input_names)}, got {len(inputs)}")
        self.calls += 1
        self.bound.append({n: t.data_ptr() for n, t in zip(self.input_names, inputs)})
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, inputs)}
        out = [torch.from_numpy(np.ascontiguousarray(o)) for o in self.session.run(list(self.output_names), feeds)]
        if self.persistent:
            if self._result is None or [tuple(t.shape) for t in self._result] != [tuple(t.shape) for t in out]:
                self._result = tuple(torch.empty_like(t) for t in out)
            for buffer, value in zip(self._result, out):
                buffer.copy_(value)
            out = self._result
        return out[0] if len(out) == 1 else tuple(out)


class OnnxEngines:
    """An engine source whose runners are onnxruntime sessions of the exported components (a stand-in for the
    engine cache + EngineRunner, which need an RTX-class GPU that no machine of this project has).

    ``components`` limits which engines exist; ``unet_component`` replaces the stock UNet component (an engine
    built with other inputs than the pipeline's). ``control``: the UNet engine takes ControlNet residuals, and each
    of ``controlnets`` has an engine; :meth:`attach_controlnet` gives every call a runner of its own (kept in
    ``controlnet_runners``), as the engine cache does; ``persistent``: those runners rewrite and return the same
    output tensors every call, as EngineRunner does."""

    key = "onnxruntime stand-in"

    def __init__(self, models: StreamModels, config: StreamConfig, folder: Path, components=None,
                 unet_component=None, target: str = TARGET, control: bool = False, controlnets=(),
                 persistent: bool = False) -> None:
        self.runners = {}
        self.persistent = persistent
        self.attached: list[bool] = []  # the control flag of every attach call
        self.controlnets: dict[int, tuple[Path, list, list]] = {}
        self.controlnet_runners: list[OnnxRuntimeRunner] = []
        for request in requests_for_stream(config, precision="fp32", target=target, control=control):
            if request.component == "controlnet":
                for index, net in enumerate(controlnets):
                    component = component_for(models, "controlnet", controlnet=net)
                    exported = export_onnx(component, request.shapes, folder / f"controlnet{index}.onnx",
                                           precision="fp32")
                    self.controlnets[id(net)] = (exported.path, component.input_names, component.output_names)
                continue
            if components is not None and request.component not in components:
                continue
            component = component_for(models, request.component, control=request.control)
            if request.component == "unet" and unet_component is not None:
                component = unet_component
            exported = export_onnx(component, request.shapes, folder / f"{request.component}.onnx", precision="fp32")
            self.runners[request.component] = OnnxRuntimeRunner(exported.path, component.input_names,
                                                                component.output_names)

    def attach(self, models, config, control: bool = False) -> AttachResult:
        self.attached.append(control)
        return AttachResult(runners=dict(self.runners), notes=["stand-in engines"])

    def attach_controlnet(self, models, config, module):
        entry = self.controlnets.get(id(module))
        if entry is None:
            return None, "no stand-in engine for this ControlNet"
        runner = OnnxRuntimeRunner(*entry, persistent=self.persistent)
        self.controlnet_runners.append(runner)
        return runner, None


class BuildSpy:
    """Counts engine builds (calls of ``run_build``) and ONNX exports (calls of ``export_onnx`` by the build
    module), and keeps the worker processes it started and the jobs they ran. ``on_build(job)`` (optional) sees
    each job before it runs, while its ONNX file still exists."""

    def __init__(self, monkeypatch, on_build=None) -> None:
        self.builds: list[Path] = []
        self.jobs: list = []
        self.exports: list[str] = []
        self.processes: list[subprocess.Popen] = []
        self.on_build = on_build
        original_run, original_export, original_popen = build_mod.run_build, build_mod.export_onnx, subprocess.Popen

        def run_build(job, *args, **kwargs):
            self.builds.append(job.onnx)
            self.jobs.append(job)
            if self.on_build is not None:
                self.on_build(job)
            return original_run(job, *args, **kwargs)

        def export_onnx(component, *args, **kwargs):
            self.exports.append(component.name)
            return original_export(component, *args, **kwargs)

        spy = self

        class Popen(original_popen):  # type: ignore[misc, valid-type]
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                spy.processes.append(self)

        monkeypatch.setattr(build_mod, "run_build", run_build)
        monkeypatch.setattr(build_mod, "export_onnx", export_onnx)
        monkeypatch.setattr(build_mod.subprocess, "Popen", Popen)

    @property
    def count(self) -> int:
        return len(self.builds)
