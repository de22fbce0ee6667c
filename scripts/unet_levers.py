"""Where a UNet call's GPU time goes, and what inductor settings change it (GPU machine only).

For one preset and frame size, each variant compiles the UNet (random weights, fp16, channels-last, the
stream's call with its added conditions) in its own process, times it alone in a CUDA graph, and the first
variant is profiled (kernel time by kind: GEMM, convolution, attention, normalisation, elementwise, copies).
The VAE is left out: the question is the UNet. Results go to ``--out`` as JSON and a markdown table::

    python scripts/unet_levers.py --preset sdxl-turbo --size 512 --variants default,tuned --out /tmp/levers

Variants: ``eager`` (the module in a CUDA graph), ``default`` (torch.compile), ``tuned`` (torch.compile with
inductor's ``coordinate_descent_tuning`` and ``conv_1x1_as_mm``), ``autotune`` (mode
``max-autotune-no-cudagraphs``: GEMM/convolution templates benchmarked per shape).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

logger = logging.getLogger("unet_levers")

VARIANTS = ("eager", "default", "tuned", "autotune")
KINDS = (("attention", ("flash", "fmha", "attention", "sdpa")), ("gemm", ("gemm", "sm90", "cutlass", "matmul", "mm_")),
         ("convolution", ("conv", "implicit", "dgrad", "fprop", "sm80_xmma")),
         ("normalisation", ("norm", "red_", "reduction", "per_fused_native_group_norm")),
         ("copy", ("copy", "memcpy", "memset", "transpose")))


def kernel_kind(name: str) -> str:
    """A coarse kind for a CUDA kernel name (first match wins; the rest is elementwise/fused pointwise)."""
    low = name.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "elementwise / fused"


def run_variant(variant: str, preset: str, size: int, rows: int, profile: bool) -> dict:
    """Compile and time one variant in this process."""
    import torch

    from streamrt.cuda_graphs import graph_replay_ms
    from streamrt.families import pooled_dim_of_unet
    from streamrt.random_models import build_random_components

    if variant == "tuned":
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
        inductor_config.conv_1x1_as_mm = True
    device = torch.device("cuda")
    unet = build_random_components(preset, dtype=torch.float16, device=device, taesd=False)["unet"]
    unet.to(memory_format=torch.channels_last)
    cfg = unet.config
    latent = size // 8
    sample = torch.randn(rows, 4, latent, latent, device=device, dtype=torch.float16)
    timesteps = torch.full((rows,), 499, device=device, dtype=torch.long)
    embeds = torch.randn(rows, 77, cfg.cross_attention_dim, device=device, dtype=torch.float16)
    kwargs = {}
    pooled = pooled_dim_of_unet(cfg)
    if pooled:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, pooled, device=device, dtype=torch.float16),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * rows, device=device, dtype=torch.float16)}
    module = unet
    start = time.perf_counter()
    if variant != "eager":
        mode = "max-autotune-no-cudagraphs" if variant == "autotune" else "default"
        module = torch.compile(unet, mode=mode, dynamic=False)

    def call():
        return module(sample, timesteps, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]

    with torch.inference_mode():
        call()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        ms = graph_replay_ms(call, device, replays=100)
        result = {"variant": variant, "preset": preset, "size": size, "rows": rows, "unet_ms": round(ms, 3),
                  "compile_s": round(compile_s, 1), "gpu": torch.cuda.get_device_name()}
        if profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    call()
                torch.cuda.synchronize()
            by_kind: dict[str, float] = defaultdict(float)
            top: dict[str, float] = defaultdict(float)
            for event in prof.key_averages():
                us = event.self_device_time_total / 10
                if us <= 0:
                    continue
                by_kind[kernel_kind(event.key)] += us
                top[event.key] += us
            result["profile_ms_by_kind"] = {k: round(v / 1000, 3) for k, v in sorted(by_kind.items(),
                                                                                    key=lambda kv: -kv[1])}
            result["profile_top_kernels_ms"] = [(k[:90], round(v / 1000, 3)) for k, v in
                                                sorted(top.items(), key=lambda kv: -kv[1])[:15]]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sdxl-turbo")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rows", type=int, default=1, help="UNet batch rows (F x steps x guidance rows)")
    p.add_argument("--variants", default="default,tuned")
    p.add_argument("--profile", default="default", help="variant to profile (kernel time by kind)")
    p.add_argument("--out", required=True)
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process (internal)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        result = run_variant(args.one, args.preset, args.size, args.rows, profile=args.one == args.profile)
        (out / f"{args.one}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        return
    results = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}: use {', '.join(VARIANTS)}")
        # a process per variant: inductor's settings are process-wide
        cmd = [sys.executable, __file__, "--one", variant, "--preset", args.preset, "--size", str(args.size),
               "--rows", str(args.rows), "--profile", args.profile, "--out", str(out)]
        subprocess.run(cmd, check=True)
        results.append(json.loads((out / f"{variant}.json").read_text(encoding="utf-8")))
        logger.info("%s", results[-1])
    lines = [f"| {args.preset} UNet, {args.size}², {args.rows} row(s), fp16 | UNet ms (CUDA graph) | first call s |",
             "|---|---|---|"] + [f"| {r['variant']} | {r['unet_ms']:.2f} | {r['compile_s']:.0f} |" for r in results]
    (out / "levers.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "levers.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print("\n".join(lines))  # the script's report


if __name__ == "__main__":
    main()
