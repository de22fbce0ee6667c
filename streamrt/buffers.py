"""Every tensor a stream's frame touches, allocated once per config (docs/DESIGN.md section 4).

A frame then only runs in-place and ``out=`` ops on these tensors, so the step can be captured in a
CUDA graph, and prompt or seed changes are ``copy_`` into the same storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import StreamConfig
from .schedule import StreamSchedule


@dataclass(eq=False)
class StreamBuffers:
    """The per-frame tensors of one stream.

    Model-dtype tensors feed the models; the scheduler math runs in float32 (``*32``). ``x_batch`` is a
    view of the last B rows of ``unet_in``: rows ``[0, F)`` take the new frames' noisy latents, rows
    ``[F, B)`` are the latent buffer carried between calls.
    """

    frames_in: torch.Tensor      # [F, H, W, 3] f32 staging of the caller's frames
    image_in: torch.Tensor       # [F, 3, H, W] model dtype, in [-1, 1]
    unet_in: torch.Tensor        # [U + B, c, h, w] model dtype
    x_batch: torch.Tensor        # view: unet_in[U:]
    timesteps: torch.Tensor      # [U + B] long
    embeds: torch.Tensor         # [U + B, L, D] model dtype; uncond rows first
    x32: torch.Tensor            # [B, c, h, w] f32 copy of x_batch
    eps32: torch.Tensor          # [B] guided noise prediction
    eps_u32: torch.Tensor        # [B] unconditional prediction (full CFG) or RCFG virtual negative
    x0_32: torch.Tensor          # [B] denoised estimate
    tmp32: torch.Tensor          # [B] scratch
    tmp2_32: torch.Tensor        # [B] scratch (RCFG)
    init_noise: torch.Tensor     # [B] f32, fixed per seed
    init_noise_rot: torch.Tensor  # [B] init_noise rotated by F rows
    stock: torch.Tensor          # [B] f32 RCFG stock noise
    stock_scratch: torch.Tensor  # [B - F] (or empty) for the in-place shift
    latent_out: torch.Tensor     # [F, c, h, w] model dtype, scaled for the decoder
    frames_out: torch.Tensor     # [F, H, W, 3] f32 in [0, 1]
    guidance: torch.Tensor       # 0-dim f32, live scalar (no recapture to change)
    delta: torch.Tensor          # 0-dim f32, live scalar
    pooled: torch.Tensor | None = None    # [U + B, P] model dtype, SDXL's pooled text embedding per row
    time_ids: torch.Tensor | None = None  # [U + B, 6] model dtype, SDXL's size conditions per row (constant)
    # a stage of a step-parallel stream (docs/DESIGN.md section 12) that hands its oldest rows on:
    carry_out: torch.Tensor | None = None    # [F, c, h, w] model dtype, those rows re-noised to the next stage's step
    carry_noise: torch.Tensor | None = None  # [F] f32, the next stage's first rows of the stream noise
    # a stage that takes rows over from the stage before it (with RCFG stock noise):
    stock_in: torch.Tensor | None = None     # [F] f32, the previous stage's oldest rows of stock noise

    def tensors(self) -> dict[str, torch.Tensor]:
        """Name -> tensor, for checks that storage never moves."""
        return {k: v for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}


def allocate_buffers(config: StreamConfig, schedule: StreamSchedule, *, latent_channels: int, vae_scale_factor: int,
                     text_length: int, embed_dim: int, device: torch.device, dtype: torch.dtype,
                     pooled_dim: int = 0, time_ids: tuple[int, ...] = (), hands_on: bool = False,
                     takes_stock: bool = False) -> StreamBuffers:
    """Zeroed buffers for ``config`` (the timesteps and size conditions filled in, uncond rows first).

    ``pooled_dim`` and ``time_ids`` are the UNet's added conditions (SDXL, docs/DESIGN.md section 9): a pooled
    embedding per row, written with the prompt, and the same size conditions in every row."""
    f, b, u = config.frames_per_step, config.batch_rows, config.uncond_rows
    c, h, w = latent_channels, config.height // vae_scale_factor, config.width // vae_scale_factor

    def lat32(rows: int) -> torch.Tensor:
        return torch.zeros(rows, c, h, w, device=device, dtype=torch.float32)

    unet_in = torch.zeros(u + b, c, h, w, device=device, dtype=dtype)
    t = schedule.timesteps
    if u == b:            # full: uncond rows repeat every step
        timesteps = torch.cat([t, t])
    elif u:               # initialize: uncond rows for the newest F frames
        timesteps = torch.cat([t[:f], t])
    else:
        timesteps = t.clone()
    return StreamBuffers(
        frames_in=torch.zeros(f, config.height, config.width, 3, device=device, dtype=torch.float32),
        image_in=torch.zeros(f, 3, config.height, config.width, device=device, dtype=dtype),
        unet_in=unet_in, x_batch=unet_in[u:], timesteps=timesteps.to(device),
        embeds=torch.zeros(u + b, text_length, embed_dim, device=device, dtype=dtype),
        x32=lat32(b), eps32=lat32(b), eps_u32=lat32(b), x0_32=lat32(b), tmp32=lat32(b), tmp2_32=lat32(b),
        init_noise=lat32(b), init_noise_rot=lat32(b), stock=lat32(b), stock_scratch=lat32(b - f),
        latent_out=torch.zeros(f, c, h, w, device=device, dtype=dtype),
        frames_out=torch.zeros(f, config.height, config.width, 3, device=device, dtype=torch.float32),
        guidance=torch.tensor(float(config.guidance_scale), device=device),
        delta=torch.tensor(float(config.delta), device=device),
        pooled=torch.zeros(u + b, pooled_dim, device=device, dtype=dtype) if pooled_dim else None,
        time_ids=(torch.tensor([time_ids], dtype=dtype).repeat(u + b, 1).to(device) if time_ids else None),
        carry_out=torch.zeros(f, c, h, w, device=device, dtype=dtype) if hands_on else None,
        carry_noise=lat32(f) if hands_on else None,
        stock_in=lat32(f) if takes_stock else None,
    )
