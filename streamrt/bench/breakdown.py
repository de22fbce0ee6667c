"""Where a frame's GPU time goes: encode, UNet, decode and the whole step, each captured and timed alone."""

from __future__ import annotations

import argparse
import logging

import torch

from ..runtime import graph_replay_ms
from .common import PROMPT, SCENARIOS, BenchContext, Scenario

logger = logging.getLogger("streamrt.bench")


@torch.inference_mode()
def breakdown(ctx: BenchContext, args: argparse.Namespace) -> str:
    """A markdown table: per scenario, the GPU time of each part of the step in its own CUDA graph.

    Uses the run's full-size random models through each stream's runtime: with ``compile`` among the
    accelerations, the compiled calls (the last acceleration given is the one timed).
    """
    acceleration = args.accelerations[-1]
    lines = [f"| scenario ({acceleration} calls, each part in its own CUDA graph) | "
             "VAE encode ms | UNet ms | VAE decode ms | whole step ms |", "|---|---|---|---|---|"]
    for key in args.scenarios:
        sc = SCENARIOS[key]
        parts = _time_parts(ctx, acceleration, sc)
        lines.append(f"| {sc.key}: {sc.title_at(args)}, F={sc.frames_per_step} | "
                     + " | ".join(f"{p:.2f}" for p in parts) + " |")
        logger.info("breakdown %s", lines[-1])
    return "\n".join(lines)


def _time_parts(ctx: BenchContext, acceleration: str, sc: Scenario) -> list[float]:
    """GPU ms of encode, UNet, decode and the whole device step of one scenario's stream."""
    stream = ctx.stream(acceleration, sc, prompt=PROMPT)
    frames = ctx.video(sc).frames[:1].expand(sc.frames_per_step, -1, -1, -1)
    for _ in range(3):
        stream.step(frames)
    run, buf, extras = stream.runtime, stream.buffers, stream.unet_extras
    try:
        return [
            graph_replay_ms(lambda: run.encode(buf.image_in), ctx.device),
            graph_replay_ms(lambda: run.unet(buf.unet_in, buf.timesteps, buf.embeds, extras), ctx.device),
            graph_replay_ms(lambda: run.decode(buf.latent_out), ctx.device),
            graph_replay_ms(lambda: stream.device_step(False), ctx.device),
        ]
    finally:
        stream.close()
