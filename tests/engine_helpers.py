"""Shared pieces of the engine tests (tests/test_engine_export.py, tests/test_engine_build.py): the tiny random
pipeline as ``StreamModels``, a UNet component with extra K/V inputs/outputs (the export extension point), and
onnxruntime sessions standing in for TensorRT engines (running an engine needs an RTX-class GPU).

Plain functions and classes, imported as a top-level module (``from engine_helpers import kv_component``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from streamrt import StreamModels
from streamrt.engines import TensorSpec, component_for
from streamrt.random_models import build_random_components


def tiny_stream_models(vae: str = "taesd", seed: int = 0, dtype: torch.dtype = torch.float32) -> StreamModels:
    """Tiny random pipeline as ``StreamModels`` (``vae``: ``taesd`` or ``kl``), with an identity."""
    parts = build_random_components("tiny", seed=seed, dtype=dtype, taesd=vae == "taesd")
    return StreamModels(unet=parts["unet"], vae=parts["taesd"] if vae == "taesd" else parts["vae"],
                        text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                        scheduler=parts["scheduler"], identity={"kind": "random", "preset": "tiny", "vae": vae,
                                                                "seed": seed})


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
    """Stands in for EngineRunner (which needs an RTX GPU): same call contract, onnxruntime underneath."""

    def __init__(self, path: Path, input_names, output_names) -> None:
        self.session = ort_session(path)
        self.input_names, self.output_names = tuple(input_names), tuple(output_names)
        self.calls = 0

    def __call__(self, *inputs):
        self.calls += 1
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, inputs)}
        out = self.session.run(list(self.output_names), feeds)
        return torch.from_numpy(np.ascontiguousarray(out[0]))
