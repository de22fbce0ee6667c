"""Where a UNet (or TAESD) call's GPU time goes, and what settings change it (GPU machine only).

For one preset and frame size, each variant compiles the part (random weights, fp16; for the UNet the
stream's call with its added conditions, for ``--part vae`` TAESD's encode then decode of one frame) in its
own process, times it alone in a CUDA graph, and the variant named by ``--profile`` is profiled (kernel time
by kind: GEMM, convolution, attention, normalisation, elementwise, copies). Results go to ``--out`` as JSON
and a markdown table::

    python scripts/unet_levers.py --preset sdxl-turbo --size 512 --variants default,tuned --out /tmp/levers
    python scripts/unet_levers.py --preset sd-turbo --part vae --variants default,cl,cl+cudnn --out /tmp/vae

A variant is ``eager`` (the module in a CUDA graph) or levers joined by ``+`` on top of torch.compile:
``default`` (none), ``tuned`` (inductor's ``coordinate_descent_tuning`` and ``conv_1x1_as_mm``),
``autotune`` (mode ``max-autotune-no-cudagraphs``: GEMM/convolution templates benchmarked per shape),
``freeze`` (inductor's ``freezing``: weights folded in as constants), ``qkv`` (self-attention's query, key and
value projected by one GEMM over a fused copy of the weights: the stream's ``StreamConfig.fused_qkv``), ``cudnn``
(``cudnn.benchmark`` on while compiling and capturing), ``cl`` (the module's weights in channels-last; the UNet
always is, as the runtime does), ``xkv`` (every cross-attention layer reads keys and values computed once from the
prompt embeddings: the stream's ``StreamConfig.prompt_kv``). ``qkv`` and ``xkv`` run the stream's own attention
processors and buffers (``streamrt.kv_cache``); the result records the largest difference from the plain UNet.
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

LEVERS = ("eager", "default", "tuned", "autotune", "freeze", "qkv", "cudnn", "cl", "xkv")
KINDS = (("attention", ("flash", "fmha", "attention", "sdpa")),
         ("convolution", ("fprop", "dgrad", "implicit_gemm")),  # cuDNN's convolutions are "implicit GEMMs"
         ("gemm", ("gemm", "nvjet", "sm90", "cutlass", "matmul", "mm_")),
         ("normalisation", ("norm", "red_", "reduction", "per_fused_native_group_norm")),
         ("copy", ("copy", "memcpy", "memset", "transpose")))


def kernel_kind(name: str) -> str:
    """A coarse kind for a CUDA kernel name (first match wins; the rest is elementwise/fused pointwise)."""
    low = name.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "elementwise / fused"


def run_variant(variant: str, preset: str, size: int, rows: int, profile: bool, part: str = "unet") -> dict:
    """Compile and time one variant in this process."""
    import torch
    import torch._inductor.config as inductor_config

    from streamrt.cuda_graphs import graph_replay_ms
    from streamrt.families import pooled_dim_of_unet
    from streamrt.kv_cache import PromptKV, fuse_self_attention_projections, install_kv_processors
    from streamrt.models import decode_latents, encode_images
    from streamrt.random_models import build_random_components

    levers = set(variant.split("+"))
    extra: dict = {}  # what a lever adds to the result
    torch.backends.cudnn.benchmark = "cudnn" in levers  # off unless asked: ComfyUI leaves it off by default
    if "tuned" in levers:
        inductor_config.coordinate_descent_tuning = True
        inductor_config.conv_1x1_as_mm = True
    if "freeze" in levers:
        inductor_config.freezing = True
    device = torch.device("cuda")
    parts = build_random_components(preset, dtype=torch.float16, device=device, taesd=part == "vae")
    latent = size // 8
    if part == "vae":
        vae = parts["taesd"]
        if "cl" in levers:
            vae.to(memory_format=torch.channels_last)
        images = torch.rand(rows, 3, size, size, device=device, dtype=torch.float16) * 2 - 1

        def forward():
            return decode_latents(vae, encode_images(vae, images))
    else:
        unet = parts["unet"]
        unet.to(memory_format=torch.channels_last)
        cfg = unet.config
        sample = torch.randn(rows, 4, latent, latent, device=device, dtype=torch.float16)
        timesteps = torch.full((rows,), 499, device=device, dtype=torch.long)
        embeds = torch.randn(rows, 77, cfg.cross_attention_dim, device=device, dtype=torch.float16)
        kwargs = {}
        pooled = pooled_dim_of_unet(cfg)
        if pooled:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(rows, pooled, device=device, dtype=torch.float16),
                "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * rows, device=device,
                                         dtype=torch.float16)}

        attention: dict = {}  # the keywords the stream's attention processors take (docs/DESIGN.md section 3)

        def forward():
            return unet(sample, timesteps, encoder_hidden_states=embeds, return_dict=False,
                        cross_attention_kwargs=attention or None, **kwargs)[0]

        if levers & {"xkv", "qkv"}:
            with torch.inference_mode():
                plain = forward()
                install_kv_processors(unet)
                if "xkv" in levers:
                    attention["prompt_kv"] = PromptKV(unet, embeds)
                    attention["prompt_kv"].refresh()
                    extra["xkv_layers"] = len(attention["prompt_kv"].layers)
                if "qkv" in levers:
                    extra["qkv_layers"] = fuse_self_attention_projections(unet)
                    attention["fused_qkv"] = True
                extra["max_abs_diff_vs_plain"] = float((forward() - plain).abs().max())

    call = forward
    start = time.perf_counter()
    if "eager" not in levers:
        mode = "max-autotune-no-cudagraphs" if "autotune" in levers else "default"
        call = torch.compile(forward, mode=mode, dynamic=False)

    with torch.inference_mode():
        call()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        ms = graph_replay_ms(call, device, replays=100)
        result = {"variant": variant, "part": part, "preset": preset, "size": size, "rows": rows,
                  "ms": round(ms, 3), "compile_s": round(compile_s, 1), "gpu": torch.cuda.get_device_name(),
                  "torch": torch.__version__, **extra}
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
    p.add_argument("--part", choices=("unet", "vae"), default="unet", help="the UNet, or TAESD encode + decode")
    p.add_argument("--variants", default="default,tuned")
    p.add_argument("--profile", default="default", help="variant to profile (kernel time by kind)")
    p.add_argument("--out", required=True)
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process (internal)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        result = run_variant(args.one, args.preset, args.size, args.rows, profile=args.one == args.profile,
                             part=args.part)
        (out / f"{args.one}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        return
    results = []
    for variant in args.variants.split(","):
        unknown = set(variant.split("+")) - set(LEVERS)
        if unknown:
            raise SystemExit(f"unknown lever(s) {sorted(unknown)} in {variant!r}: use {', '.join(LEVERS)}")
        # a process per variant: inductor's settings are process-wide
        cmd = [sys.executable, __file__, "--one", variant, "--preset", args.preset, "--size", str(args.size),
               "--rows", str(args.rows), "--profile", args.profile, "--part", args.part, "--out", str(out)]
        done = subprocess.run(cmd)
        if done.returncode:  # one variant failing (e.g. a lever this torch lacks) leaves the others measured
            logger.warning("variant %s failed (exit %d)", variant, done.returncode)
            continue
        results.append(json.loads((out / f"{variant}.json").read_text(encoding="utf-8")))
        logger.info("%s", results[-1])
    what = "UNet" if args.part == "unet" else "TAESD encode + decode"
    lines = [f"| {args.preset} {what}, {args.size}², {args.rows} row(s), fp16 | ms (CUDA graph) | first call s |",
             "|---|---|---|"] + [f"| {r['variant']} | {r['ms']:.2f} | {r['compile_s']:.0f} |" for r in results]
    (out / "levers.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "levers.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print("\n".join(lines))  # the script's report


if __name__ == "__main__":
    main()
