"""scripts/fp8_gemm_shapes.py derives the per-call GEMM shapes of a UNet's transformer blocks from its config; what a
real UNet built from that config multiplies in a forward pass must be exactly those (the GPU measurement in
BENCHMARKS.md sums over them)."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch

from streamrt.random_models import build_random_components, component_configs

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fp8_gemm_shapes.py"
#: the linear layers the script counts (cross-attention's keys and values are the stream's cached prompt K/V)
COUNTED = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
           "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def load_script():
    spec = importlib.util.spec_from_file_location("fp8_gemm_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("rows", [1, 2])
def test_the_listed_shapes_are_the_ones_a_forward_pass_multiplies(rows):
    script = load_script()
    size = 64
    parts = build_random_components("tiny-xl", dtype=torch.float32, device="cpu")
    unet = parts["unet"]
    seen: Counter = Counter()

    def hook(name):
        def record(module, args, output):
            k = module.in_features
            seen[(name, args[0].numel() // k, k, module.out_features)] += 1
        return record

    handles = [m.register_forward_hook(hook(name))
               for name, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(COUNTED)]
    assert handles
    latent = size // 8
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {"text_embeds": torch.randn(rows, pooled),
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * rows, dtype=torch.float32)}
    with torch.no_grad():
        unet(torch.randn(rows, 4, latent, latent), torch.full((rows,), 499),
             encoder_hidden_states=torch.randn(rows, 77, cfg.cross_attention_dim), added_cond_kwargs=added)
    for handle in handles:
        handle.remove()
    measured: Counter = Counter()
    for (name, m, k, n), count in seen.items():
        if name.endswith(("attn1.to_k", "attn1.to_v")):
            continue  # with attn1.to_q: one fused [C, 3C] GEMM
        measured[(m, k, 3 * n) if name.endswith("attn1.to_q") else (m, k, n)] += count
    listed = script.transformer_gemms(component_configs("tiny-xl")["unet"], size, rows)
    assert listed == measured
    assert script.block_count(listed) == sum(1 for name, _ in unet.named_modules() if name.endswith("attn1"))
