"""Whether FP8 GEMMs would pay at a UNet's transformer shapes (GPU machine only; ``--list`` runs anywhere).

For every linear layer shape of the UNet's transformer blocks (self-attention's fused Q/K/V, the output
projections, cross-attention's query, the feed-forward pair; cross-attention's keys and values are the stream's
cached prompt K/V, so not per call) at the token counts of one UNet call, this times, each alone in a CUDA graph
(:data:`REPEATS` calls per graph, median of replays):

- ``fp16``: ``torch.mm`` in fp16 (what the stream runs);
- ``fp8 tensorwise``: ``torch._scaled_mm`` on e4m3 operands with one scale each, fp16 out;
- ``fp8 rowwise``: ``torch._scaled_mm`` with a scale per activation row and per weight column, bf16 out;
- ``quantize``: what making the activation's e4m3 copy costs (row-wise abs-max, scale, cast; compiled), which a
  fused implementation would fold into the op before the GEMM.

Per shape and summed over the call (each shape times its count in the UNet), as JSON and markdown::

    python scripts/fp8_gemm_shapes.py --preset sdxl-turbo --size 512 --rows 1,4 --out /tmp/fp8
    python scripts/fp8_gemm_shapes.py --preset sdxl-turbo --size 512 --rows 1 --list
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

logger = logging.getLogger("fp8_gemm_shapes")

E4M3_MAX = 448.0
#: calls captured back to back in one graph per timing (``--repeats``): a replayed graph has a floor of about 9 us
#: (``--repeats 1`` on an H200, BENCHMARKS.md), larger than many of these GEMMs, so one call per graph times the floor
REPEATS = 20


def transformer_gemms(unet_config: dict, size: int, rows: int) -> Counter:
    """``{(M, K, N): count}`` of the per-call linear layers in the UNet's transformer blocks at ``size``² and
    ``rows`` batch rows, from its config (diffusers ``UNet2DConditionModel``): per block the fused Q/K/V
    (C -> 3C), self-attention's output, cross-attention's query and output (C -> C each), the GEGLU input
    (C -> 8C) and the feed-forward output (4C -> C); per transformer module ``proj_in`` and ``proj_out``."""
    channels = unet_config["block_out_channels"]
    layers = unet_config.get("transformer_layers_per_block", 1)
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    down = unet_config["down_block_types"]
    latent = size // 8
    shapes: Counter = Counter()

    def module(c: int, level: int, blocks: int) -> None:
        tokens = rows * (latent >> level) ** 2
        shapes[(tokens, c, c)] += 2  # proj_in, proj_out
        for shape, count in (((tokens, c, 3 * c), 1), ((tokens, c, c), 3), ((tokens, c, 8 * c), 1),
                             ((tokens, 4 * c, c), 1)):
            shapes[shape] += count * blocks

    per_block = unet_config["layers_per_block"]
    for level, (kind, c) in enumerate(zip(down, channels)):
        if "CrossAttn" in kind:
            for _ in range(per_block):
                module(c, level, layers[level])
            for _ in range(per_block + 1):  # the up block of this level has one more
                module(c, level, layers[level])
    module(channels[-1], len(channels) - 1, layers[-1])  # the mid block
    return shapes


def block_count(shapes: Counter) -> int:
    """Transformer blocks in ``shapes`` (one fused Q/K/V GEMM each)."""
    return sum(count for (m, k, n), count in shapes.items() if n == 3 * k)


def time_shape(m: int, k: int, n: int, device, repeats: int = REPEATS) -> dict:
    """GPU microseconds of one GEMM ``[m, k] x [k, n]`` per variant (``repeats`` calls in a CUDA graph, median
    replay over the calls)."""
    import torch

    from streamrt.cuda_graphs import graph_replay_ms as replay_ms

    def graph_replay_ms(call, device, replays):
        return replay_ms(lambda: [call() for _ in range(repeats)], device, replays=replays) / repeats

    a = torch.randn(m, k, device=device, dtype=torch.float16)
    w = torch.randn(n, k, device=device, dtype=torch.float16) / k ** 0.5
    out = torch.empty(m, n, device=device, dtype=torch.float16)
    result = {"fp16": 1000 * graph_replay_ms(lambda: torch.mm(a, w.t(), out=out), device, replays=50)}
    fp8 = torch.float8_e4m3fn
    a8, w8 = a.to(fp8), w.to(fp8)
    one = torch.ones((), device=device, dtype=torch.float32)
    row_scales, col_scales = torch.ones(m, 1, device=device), torch.ones(1, n, device=device)
    variants = {
        "fp8 tensorwise": lambda: torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.float16),
        "fp8 rowwise": lambda: torch._scaled_mm(a8, w8.t(), scale_a=row_scales, scale_b=col_scales,
                                                out_dtype=torch.bfloat16),
    }
    for name, call in variants.items():
        try:
            result[name] = 1000 * graph_replay_ms(call, device, replays=50)
        except Exception as exc:  # an unsupported combination on this GPU / torch: say so, go on
            result[name] = None
            result[f"{name} error"] = f"{type(exc).__name__}: {exc}"[:200]

    @torch.compile(dynamic=False)
    def quantize(x):
        scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
        return (x / scale).to(fp8), scale

    result["quantize"] = 1000 * graph_replay_ms(lambda: quantize(a), device, replays=50)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sdxl-turbo")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rows", default="1", help="comma list of UNet batch rows")
    p.add_argument("--repeats", type=int, default=REPEATS,
                   help=f"calls per captured graph (default {REPEATS}; 1 times the graph replay's floor)")
    p.add_argument("--list", action="store_true", help="only list the shapes (no GPU needed)")
    p.add_argument("--out")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from streamrt.random_models import component_configs

    unet_config = component_configs(args.preset)["unet"]
    cases = {rows: transformer_gemms(unet_config, args.size, int(rows)) for rows in args.rows.split(",")}
    for rows, shapes in cases.items():
        logger.info("%s %d², %s row(s): %d transformer blocks, %d GEMMs per call in %d shapes", args.preset, args.size,
                    rows, block_count(shapes), sum(shapes.values()), len(shapes))
    if args.list:
        for rows, shapes in cases.items():
            for (m, k, n), count in sorted(shapes.items()):
                logger.info("rows %s: M=%d K=%d N=%d x%d", rows, m, k, n, count)
        return

    import torch

    device = torch.device("cuda")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    shapes_all = sorted({s for shapes in cases.values() for s in shapes})
    timed = {shape: time_shape(*shape, device, args.repeats) for shape in shapes_all}
    gpu = torch.cuda.get_device_name()
    report = {"preset": args.preset, "size": args.size, "gpu": gpu, "torch": torch.__version__, "repeats": args.repeats,
              "shapes": [{"m": m, "k": k, "n": n, **t} for (m, k, n), t in timed.items()], "per_call_ms": {}}
    lines = [f"# FP8 GEMMs at {args.preset} transformer shapes, {args.size}², {gpu}, torch {torch.__version__}",
             "", "| rows | variant | GEMM ms per UNet call |", "|---|---|---|"]
    for rows, shapes in cases.items():
        totals = {}
        for variant in ("fp16", "fp8 tensorwise", "fp8 rowwise", "quantize"):
            values = [timed[s].get(variant) for s in shapes]
            totals[variant] = (None if any(v is None for v in values) else
                               round(sum(count * timed[s][variant] for s, count in shapes.items()) / 1000, 3))
            lines.append(f"| {rows} | {variant} | {totals[variant]} |")
        report["per_call_ms"][rows] = totals
    lines += ["", "| M | K | N | fp16 us | fp8 tensorwise us | fp8 rowwise us | quantize us |",
              "|---|---|---|---|---|---|---|"]
    for (m, k, n), t in timed.items():
        cells = [t.get(v) for v in ("fp16", "fp8 tensorwise", "fp8 rowwise", "quantize")]
        lines.append(f"| {m} | {k} | {n} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    text = "\n".join(lines)
    logger.info("\n%s", text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fp8_gemms.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        (out / "fp8_gemms.md").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
