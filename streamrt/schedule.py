"""Pure LCM schedule math for the stream batch, precomputed once per config.

Everything here is a small function of the scheduler's config and the stream config; nothing is
touched per frame. Shapes follow docs/DESIGN.md section 2: each per-step constant is repeated F times
(``repeat_interleave``) into ``[B, 1, 1, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import StreamConfig

SIGMA_DATA = 0.5


def strength_t_index_list(steps: int, strength: float, schedule_length: int = 50) -> tuple[int, ...]:
    """The ``t_index_list`` of ``steps`` denoising steps that change a frame by ``strength`` (img2img denoise).

    With ``N = schedule_length`` LCM timesteps (noisiest first), the first index is
    ``first = clamp(N - round(strength * N), 0, N - 1)`` and step ``k`` (``k = 0 .. steps - 1``) sits at
    ``first + floor(k * (N - first) / steps)``: the steps share the part of the schedule that ``strength``
    leaves evenly. ``steps=2, strength=0.36`` gives ``(32, 41)`` and ``steps=1`` gives ``(32,)`` for ``N = 50``.

    Raises:
        ValueError: naming ``steps`` / ``strength`` when a value is out of range or when the steps do not fit
            the part of the schedule left (two steps would share an index).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
    if not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):  # NaN fails too
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if schedule_length < 1:
        raise ValueError(f"the schedule length must be >= 1, got {schedule_length}")
    n = schedule_length
    first = min(max(n - round(strength * n), 0), n - 1)
    left = n - first
    if steps > left:
        raise ValueError(f"steps={steps} do not fit strength={strength:g}: it leaves {left} of the {n} schedule "
                         f"steps (indices {first}..{n - 1}) and each step needs its own; lower steps or raise "
                         "strength (or give t_index_list)")
    return tuple(first + k * left // steps for k in range(steps))  # floor, in integers


def lcm_boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float = 10.0,
                          sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM boundary-condition scalings ``(c_skip, c_out)`` for discrete timesteps (float64 math)."""
    scaled = timesteps.to(torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


@dataclass(frozen=True)
class StreamSchedule:
    """Per-row constants of the stream batch, all float32 ``[B, 1, 1, 1]`` except ``timesteps`` ``[B]``.

    ``a_next``/``b_next`` are the scalings of the step each row moves to next (ones for the last step);
    they are the seed's ``_alpha_next``/``_beta_next``.
    """

    timesteps: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    a_next: torch.Tensor
    b_next: torch.Tensor

    def to(self, device: torch.device | str) -> StreamSchedule:
        """The same schedule on another device."""
        return StreamSchedule(**{k: v.to(device) for k, v in self.__dict__.items()})

    def rows(self, rows: slice) -> StreamSchedule:
        """The constants of batch ``rows`` alone (a stage of a step-parallel stream: its ``a_next``/``b_next``
        stay those of the step each row moves to, in the next stage for its oldest rows)."""
        return StreamSchedule(**{k: v[rows] for k, v in self.__dict__.items()})


def schedule_timesteps(scheduler, num_inference_steps: int) -> torch.Tensor:
    """The LCM inference timesteps (descending) for ``num_inference_steps``, from a diffusers LCMScheduler."""
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.timesteps.detach().cpu().to(torch.long)


def build_schedule(scheduler, config: StreamConfig) -> StreamSchedule:
    """Precompute the stream batch constants for ``config`` from a diffusers ``LCMScheduler``.

    Raises:
        ValueError: when the scheduler yields fewer timesteps than ``t_index_list`` needs.
    """
    all_t = schedule_timesteps(scheduler, config.num_inference_steps)
    if max(config.t_index_list) >= len(all_t):
        raise ValueError(
            f"t_index_list {list(config.t_index_list)} needs {max(config.t_index_list) + 1} timesteps, but the "
            f"scheduler produced {len(all_t)} for num_inference_steps={config.num_inference_steps}"
        )
    f = config.frames_per_step
    step_t = all_t[list(config.t_index_list)]
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    a = alphas_cumprod[step_t].sqrt()
    b = (1 - alphas_cumprod[step_t]).sqrt()
    c_skip, c_out = lcm_boundary_scalings(step_t, float(scheduler.config.timestep_scaling))
    ones = torch.ones(1, dtype=torch.float64)
    a_next = torch.cat([a[1:], ones])
    b_next = torch.cat([b[1:], ones])

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(f).to(torch.float32).view(-1, 1, 1, 1)

    return StreamSchedule(
        timesteps=step_t.repeat_interleave(f),
        a=rows(a), b=rows(b), c_skip=rows(c_skip), c_out=rows(c_out),
        a_next=rows(a_next), b_next=rows(b_next),
    )
