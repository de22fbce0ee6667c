"""A step-parallel stream: the denoising steps of one stream split over several devices (docs/DESIGN.md section 12).

The stream batch holds one frame per step in flight: with n steps, frame k is at step 0 while frame k - 1 is at
step 1, and so on. The rows of different steps do not interact within a call (the UNet has no batch statistics,
cached attention is per row); they only meet between calls, when the oldest rows of a step move on to the next
step. So the steps can run on different devices at the same time: stage i runs its steps' rows on its own device
and, after every call, hands its oldest rows to stage i + 1 (the latents, re-noised to that stage's first step,
and RCFG's stock noise), which uses them on the next call. The first stage takes the new frames (encode), the
last one finishes them (decode).

The hand-off is a device-to-device copy ordered on both devices' streams (torch orders a copy between GPUs
after the work queued on both and the work queued after it behind the copy), so a call queues every stage's
captured step and the copies without waiting on the host; the host waits only for the finished frames, as for
one stream. Per call, the devices then work side by side for the time of the slowest stage, in lockstep.

Each stage's output equals the one-device stream's rows up to what a different UNet batch size changes in the
kernels' arithmetic (the same rows computed in a smaller batch): the schedule, noise and stock noise are the
whole stream's, sliced.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

from .config import Acceleration, StreamConfig, StreamStage
from .controlnet import ControlNet, ControlState
from .frames import FiniteCheck
from .models import StreamModels
from .parallel import even_parts
from .prompts import Prompt, PromptPart
from .runtime import EngineSource, HostIO, Runtime
from .similarity import SimilarityFilter
from .stream import Stream, StreamCalls, prompt_length

logger = logging.getLogger(__name__)


def plan_stages(steps: int, devices: int) -> list[StreamStage]:
    """Contiguous stages of ``steps`` denoising steps over up to ``devices`` devices, as even as whole steps allow
    (the earlier stages take the extra steps; fewer stages than devices when there are fewer steps)."""
    if devices < 1:
        raise ValueError(f"need at least one device, got {devices}")
    if steps < 1:
        raise ValueError(f"need at least one step, got {steps}")
    stages, first = [], 0
    for size in even_parts(steps, devices):
        stages.append(StreamStage(first, first + size, steps))
        first += size
    return stages


class StagedStream(StreamCalls):
    """One stream whose denoising steps run on several devices, a stage each, side by side.

    Called like a :class:`~streamrt.stream.Stream` (:meth:`step`, :meth:`process_video`, :meth:`txt2img`, the
    ``set_*`` methods); its output is the one-device stream's (see the module docstring for the tolerance).

    Args:
        models (`Sequence[StreamModels]`): the pipeline on each device, one per stage in order: the first takes the
            frames, the last hands out the results (:func:`streamrt.parallel.replicate` makes the copies).
            With more devices than steps, the extra ones are not used.
        config (`StreamConfig`): the whole stream's config.
        prompt, negative_prompt, engines: as for :class:`~streamrt.stream.Stream`.
        runtimes (`Sequence[Runtime]`, optional): prepared runtimes, one per stage (see :meth:`stage_configs`).
        source (`StreamModels`, optional): the pipeline the stages' models were copied from, which this stream
            keeps in use (:attr:`models`); defaults to the first stage's models.
        controlnets (`Sequence[Sequence[ControlNet]]`, optional): the stream's ControlNets, one list per stage
            with the modules on that stage's device (the same ControlNets in the same order). Each stage runs them
            on its rows; the control images move from stage to stage with the rows, as the latents do.
    """

    def __init__(self, models: Sequence[StreamModels], config: StreamConfig, *, prompt: Prompt = "",
                 negative_prompt: PromptPart = "", engines: EngineSource | None = None,
                 runtimes: Sequence[Runtime] | None = None, source: StreamModels | None = None,
                 controlnets: Sequence[Sequence[ControlNet]] = ()) -> None:
        if not models:
            raise ValueError("a staged stream needs the pipeline on at least one device")
        if not config.prompt_length:
            config = config.with_(prompt_length=prompt_length(models[0], config, prompt, negative_prompt))
        self.config = config
        self.plan = plan_stages(config.num_steps, len(models))
        if runtimes is not None and len(runtimes) != len(self.plan):
            raise ValueError(f"{len(self.plan)} stage(s) need as many runtimes, got {len(runtimes)}")
        if controlnets and (len(controlnets) < len(self.plan) or len({len(nets) for nets in controlnets}) != 1):
            raise ValueError(f"{len(self.plan)} stage(s) need a list of the same ControlNets each")
        self.stages: list[Stream] = []
        try:
            for index, stage in enumerate(self.plan):
                # each stage its own ControlNet records: a strength is applied per stage (set_control_strength)
                nets = [dataclasses.replace(net) for net in controlnets[index]] if controlnets else ()
                self.stages.append(Stream(models[index], config, prompt=prompt, negative_prompt=negative_prompt,
                                          engines=engines, stage=stage, controlnets=nets,
                                          runtime=None if runtimes is None else runtimes[index]))
        except BaseException:
            self.close()
            raise
        first, last = self.stages[0], self.stages[-1]
        self._later = tuple(self.stages[1:])  # run before the first stage on every call (see _call)
        self.models: StreamModels = source if source is not None else first.models
        self.device: torch.device = first.device
        self.similarity: SimilarityFilter = first.similarity
        self.control: ControlState | None = first.control  # what check_control asks: count, sizes
        self._check_finite = FiniteCheck()
        self._host: HostIO = last.runtime.host
        self._frames_out: torch.Tensor = last.buffers.frames_out
        # (source, destination) of each hand-off, copied after every call (queued at the start of the next one, so
        # the host's wait for this call's frames does not wait for the first stage too)
        self._handoffs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handoff_pending = False
        for sender, receiver in zip(self.stages, self.stages[1:]):
            f = config.frames_per_step
            self._handoffs.append((sender.buffers.carry_out, receiver.buffers.x_batch[:f]))
            if receiver.buffers.stock_in is not None:
                self._handoffs.append((sender.buffers.stock[-f:], receiver.buffers.stock_in))
            if receiver.control is not None:  # each ControlNet's control images of the rows handed on
                self._handoffs += [(out.ring[-f:], into.ring_in)
                                   for out, into in zip(sender.control.units, receiver.control.units)]
        logger.info("step-parallel stream: steps %s on %s", [(s.first, s.end) for s in self.plan],
                    [str(s.device) for s in self.stages])

    @staticmethod
    def stage_configs(config: StreamConfig, devices: int) -> list[StreamConfig]:
        """The config of each stage's part of a stream with ``config`` over ``devices`` devices (what a runtime for
        a stage is prepared for)."""
        return [stage.config_of(config) for stage in plan_stages(config.num_steps, devices)]

    # ------------------------------------------------------------------ what a caller reads
    @property
    def devices(self) -> tuple[torch.device, ...]:
        """The device of each stage, in order."""
        return tuple(stage.device for stage in self.stages)

    @property
    def runtime(self) -> Runtime:
        """The first stage's runtime (every stage runs the same acceleration, on its own device)."""
        return self.stages[0].runtime

    @property
    def acceleration(self) -> Acceleration:
        """What runs the stages' models (never ``auto``)."""
        return self.runtime.acceleration

    @property
    def latency(self) -> int:
        """Calls between a frame going in and its result coming out (n - 1, as on one device)."""
        return self.config.num_steps - 1

    @property
    def frames_processed(self) -> int:
        """Frames the stream has taken since it was made or reset."""
        return self.stages[0].frames_processed

    @property
    def device_calls(self) -> int:
        """Device steps run since the stream was made (0 = nothing captured yet)."""
        return self.stages[0].device_calls

    @property
    def embedding_writes(self) -> int:
        """Prompt embeddings written (per stage: each writes its own rows)."""
        return self.stages[0].embedding_writes

    # ------------------------------------------------------------------ state changes (not per frame)
    def reset(self) -> None:
        """Clear every stage's state (the hand-offs with it); noise and prompt are kept."""
        for stage in self.stages:
            stage.reset()
        self._handoff_pending = False  # the rows handed on belong to the old state
        self._handover = None

    def set_prompt(self, prompt: Prompt, negative_prompt: PromptPart | None = None, method: str = "linear") -> None:
        """As :meth:`Stream.set_prompt`; the first stage checks it before any stage changes."""
        self.stages[0].set_prompt(prompt, negative_prompt, method)
        for stage in self.stages[1:]:
            stage.set_prompt(prompt, negative_prompt, method)

    def set_seed(self, seed: int | Sequence[tuple[int, float]], method: str = "linear") -> None:
        """As :meth:`Stream.set_seed` (every stage draws the whole stream's noise and keeps its rows)."""
        for stage in self.stages:
            stage.set_seed(seed, method)

    def set_guidance(self, guidance_scale: float | None = None, delta: float | None = None) -> None:
        """As :meth:`Stream.set_guidance`."""
        for stage in self.stages:
            stage.set_guidance(guidance_scale, delta)
        self.config = self.config.with_(guidance_scale=self.stages[0].config.guidance_scale,
                                        delta=self.stages[0].config.delta)

    def set_cache_window(self, window: int, interval: int | None = None) -> None:
        """As :meth:`Stream.set_cache_window`."""
        for stage in self.stages:
            stage.set_cache_window(window, interval)
        self.config = self.config.with_(kv_cache=self.stages[0].config.kv_cache)

    def set_control_strength(self, index: int, strength: float) -> None:
        """As :meth:`Stream.set_control_strength` (every stage; the first one checks ``index`` and ``strength``)."""
        for stage in self.stages:
            stage.set_control_strength(index, strength)

    # ------------------------------------------------------------------ one call
    def _call(self, frames: torch.Tensor | None, control: list[torch.Tensor] | None = None) -> bool:
        """Every stage's step, side by side on their devices, then the hand-offs (queued, not waited for)."""
        first, later = self.stages[0], self._later
        self._hand_off()
        if first.similarity.enabled:
            if not first._call(frames, control):  # the filter skipped the frame: no stage runs
                return False
            for stage in later:
                stage._call(None)
        else:
            # the later stages need only the hand-off: queued first, they start while the frames upload
            for stage in later:
                stage._call(None)
            first._call(frames, control)
        self._handoff_pending = True
        return True

    def _hand_off(self) -> None:
        """Queue the copies of the last call's oldest rows into the next stages (ordered after that call's work on
        both devices, and before the next call's)."""
        if self._handoff_pending:
            for source, dest in self._handoffs:
                dest.copy_(source, non_blocking=True)
            self._handoff_pending = False

    def nbytes(self) -> int:
        """Device bytes the stages hold beyond their models (on all their devices)."""
        return sum(stage.nbytes() for stage in self.stages)

    def close(self) -> None:
        """Release what the stages hold outside their buffers."""
        for stage in self.stages:
            stage.close()
