"""Where streams live between calls: loaded pipelines by load key, streams by owner key.

A host application (the ComfyUI nodes) keeps one :class:`StreamSessions`.

- Pipelines are cached by what identifies their weights, so asking again does not reload. A pipeline
  stays while something uses it: a *holder* (a loader node, whose latest load it is) or a live stream.
  When a holder loads something else, or the last stream on a pipeline goes, a pipeline nobody uses is
  released at once, and its memory given back (its reference cycles collected, the CUDA cache emptied)
  before anything new is loaded or allocated: a holder that switches models lets go of the old pipeline
  before it loads the new one.
- Streams are kept per owner (a sampler node), so every call of the same owner advances the same stream,
  and a changed config rebuilds only what it must (docs/DESIGN.md section 7). At most ``max_streams``
  live at once; the least recently used goes first.
- A call is validated before anything changes: frames, prompt texts and the acceleration are checked
  first, so a refused call leaves the owner's stream exactly as it was.
- :meth:`total_bytes` is the device memory all of it holds (what a host's memory manager is told);
  :meth:`release` drops everything (what a host does when asked to free memory).
"""

from __future__ import annotations

import copy
import gc
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any

import torch

from .config import StreamConfig
from .controlnet import ControlInput, check_control_images
from .frames import FiniteCheck, check_frames
from .kv_cache import fused_projections_nbytes
from .models import StreamModels
from .parallel import process_video_parallel, replicate
from .prompts import Prompt, PromptPart
from .runtime import EngineSource, prepare
from .stages import StagedStream
from .stream import PreviewCallback, ProgressCallback, Stream, check_fits, check_prompts, prompt_length

logger = logging.getLogger(__name__)

#: what an owner's stream is: on one device, or with its steps split over several
LiveStream = Stream | StagedStream


@dataclass(eq=False)
class StreamRequest:
    """What a caller wants from its stream on this call.

    ``prompt`` is text, embeddings ``[1, L, D]`` or a weighted blend of both; ``negative_prompt`` text or
    embeddings (see :mod:`streamrt.prompts`). Embeddings are taken as immutable: handing the same tensor again
    (or an equal one) changes nothing. ``controlnets``: the ControlNets of this call with their control images;
    the same set (by key, start and end) keeps the stream, a strength change is applied in place.
    ``video_devices``: the devices a batch video is split over (one stream each, on a copy of the pipeline per
    device, see :mod:`streamrt.parallel`); empty or one device: the pipeline's stream alone. ``step_devices``: the
    devices one stream's denoising steps are split over (a :class:`~streamrt.stages.StagedStream`, for realtime
    frame rate; it runs videos too); empty, one device or one step: a one-device stream. ``overlap``: a call of
    one step (one group of frames, or txt2img) hands over the previous call's frames and leaves its own device
    work running (``Stream.step``'s ``overlap``); videos are not affected.
    """

    config: StreamConfig
    prompt: Prompt = ""
    negative_prompt: PromptPart = ""
    reset: bool = False
    engines: EngineSource | None = None
    controlnets: tuple[ControlInput, ...] = ()
    video_devices: tuple[str, ...] = ()
    step_devices: tuple[str, ...] = ()
    overlap: bool = False

    def staged(self) -> bool:
        """Whether this request's stream splits its steps over several devices."""
        return len(self.step_devices) > 1 and self.config.num_steps > 1

    def stream_config(self, models: StreamModels) -> StreamConfig:
        """The config of the stream for this request: ``config``, its ``prompt_length`` sized for these prompts
        when it is 0 (so a prompt of another token length needs a new stream)."""
        if self.config.prompt_length:
            return self.config
        return self.config.with_(prompt_length=prompt_length(models, self.config, self.prompt,
                                                             self.negative_prompt))

    def rebuild_key(self, config: StreamConfig) -> tuple:
        """What needs a new stream when it changes: the rebuild key of ``config`` (this request's
        :meth:`stream_config`), the engine source and the set of ControlNets."""
        return (config.rebuild_key(), None if self.engines is None else self.engines.key,
                tuple(c.rebuild_key for c in self.controlnets), self.step_devices if self.staged() else ())

    def check(self, models: StreamModels) -> StreamConfig:
        """Raise ValueError naming what cannot be used (prompt texts, embeddings, weights), before anything
        changes; else return the request's :meth:`stream_config` (sized once per call: each is a validated copy)."""
        check_prompts(models, self.prompt, self.negative_prompt)
        config = self.stream_config(models)
        check_fits(models, config, self.prompt, self.negative_prompt)
        return config


class StreamSessions:
    """Cache of loaded pipelines and registry of live streams (thread-safe).

    Args:
        max_streams (`int`, defaults to `8`): live streams kept at most (least recently used dropped first).
    """

    def __init__(self, max_streams: int = 8) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        self.max_streams = max_streams
        self._lock = threading.RLock()
        self._pipelines: dict[Hashable, StreamModels] = {}
        self._pipeline_bytes: dict[Hashable, int] = {}
        self._holders: dict[Hashable, Hashable] = {}       # holder -> pipeline key
        self._streams: OrderedDict[Hashable, LiveStream] = OrderedDict()  # least recently used first
        self._keys: dict[Hashable, tuple] = {}
        self._stream_bytes: dict[Hashable, int] = {}
        self.loads = 0
        self._collect_pending = False
        # pipeline -> {device: its copy there} for videos split over devices; the copies do not reference the
        # pipeline, so they go with it
        self._replicas: weakref.WeakKeyDictionary[StreamModels, dict[str, StreamModels]] = (
            weakref.WeakKeyDictionary())
        self._replica_bytes: dict[int, int] = {}  # id(copy) -> its weights' bytes, while the copy lives
        # id(pipeline or copy) -> what streams added to its modules (the fused projection weights the first stream
        # asking for them makes), counted when a stream is made, while the pipeline or copy lives
        self._added_bytes: dict[int, int] = {}
        #: owner -> the devices of the streams its last call ran on (several for a video split over devices)
        self.ran_on: dict[Hashable, tuple[str, ...]] = {}
        self._controlnets: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()  # key -> (model, bytes), LRU
        self.max_controlnets = 4
        self._finite = FiniteCheck()  # control images' NaN / inf check, without a new tensor per call

    # ControlNets -----------------------------------------------------------------------------------
    def controlnet(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The converted ControlNet for ``key``, made with ``load()`` only when it is not cached (those live streams
        use and the few most recently used others are kept; :meth:`release` lets them go with the pipelines)."""
        with self._lock:
            hit = self._controlnets.get(key)
            if hit is not None:
                self._controlnets.move_to_end(key)
                return hit[0]
            model = load()
            self._controlnets[key] = (model, sum(p.numel() * p.element_size() for p in model.parameters()))
            # the least recently used beyond max_controlnets go, but never one a live stream uses: evicting it
            # would convert it again on the next call (every frame, with more ControlNets in use than the limit)
            in_use = {id(unit.net.model) for stream in self._streams.values()
                      for part in stream.stages if part.control is not None
                      for unit in part.control.units}
            for old in [k for k, (m, _) in self._controlnets.items() if id(m) not in in_use and m is not model]:
                if len(self._controlnets) <= self.max_controlnets:
                    break
                del self._controlnets[old]
            return model

    # pipelines -------------------------------------------------------------------------------------
    def pipeline(self, key: Hashable, load: Callable[[], StreamModels], *, holder: Hashable | None = None
                 ) -> StreamModels:
        """The pipeline for ``key``, loading it with ``load()`` only when it is not cached.

        ``holder`` (e.g. a loader node) keeps the pipeline while it holds it; the pipeline it held before is
        released when nothing else uses it.
        """
        with self._lock:
            previous = self._holders.get(holder) if holder is not None else None
            if previous is not None and previous != key:
                # The holder lets go of what it held first: unused, it is gone before the new pipeline loads.
                del self._holders[holder]
                self._release_if_unused(previous)
            models = self._pipelines.get(key)
            if models is None:
                if self._collect_pending:
                    self._collect()
                models = load()
                self.loads += 1
                self._pipelines[key] = models
                self._pipeline_bytes[key] = models.weights_nbytes()
            if holder is not None:
                self._holders[holder] = key
            if self._collect_pending:
                self._collect()
            return models

    def _release_if_unused(self, key: Hashable) -> bool:
        """Drop the pipeline of ``key`` when no holder and no stream uses it; its memory is given back by the next
        :meth:`_collect` (callers inside a host's unload loop must not collect there, see :meth:`release`)."""
        models = self._pipelines.get(key)
        if models is None or key in self._holders.values() or any(s.models is models for s in self._streams.values()):
            return False
        self._added_bytes.pop(id(models), None)
        del self._pipelines[key], self._pipeline_bytes[key], models
        self._collect_pending = True
        logger.info("released a pipeline nothing uses any more (%d pipeline(s), %d stream(s) left)",
                    len(self._pipelines), len(self._streams))
        return True

    def _key_of(self, models: StreamModels) -> Hashable | None:
        return next((k for k, m in self._pipelines.items() if m is models), None)

    # streams ---------------------------------------------------------------------------------------
    def stream(self, owner: Hashable, models: StreamModels, request: StreamRequest) -> LiveStream:
        """The owner's stream, created or updated so that it matches ``request``.

        Same models and same rebuild key (shapes, prompt-embedding length, similarity filter, acceleration,
        engines): the stream (with its state) is kept; prompt, seed, guidance, delta and cache window are applied
        in place (an unchanged prompt, text or embeddings, costs nothing).
        Otherwise a new stream replaces the old one. What can be refused (prompt texts and embeddings, the
        acceleration) is checked before anything of the old stream changes.
        """
        cfg = request.check(models)
        key = request.rebuild_key(cfg)
        with self._lock:
            stream = self._streams.get(owner)
            if stream is None or stream.models is not models or self._keys.get(owner) != key:
                if request.staged():
                    replacing = stream is not None
                    del stream  # held by the registry alone: it goes with its entry
                    return self._new_staged(owner, models, request, cfg, key, replacing)
                # The runtime first: an acceleration that cannot run here is refused before the old stream goes.
                runtime = prepare(models, cfg, engines=request.engines, control=bool(request.controlnets))
                if stream is not None:
                    self._drop_replaced(owner)
                del stream  # free its buffers before allocating the new ones
                self._make_room()
                try:
                    stream = Stream(models, cfg, prompt=request.prompt, negative_prompt=request.negative_prompt,
                                    runtime=runtime, controlnets=[c.net for c in request.controlnets])
                except BaseException:
                    runtime.close()
                    raise
                self._register(owner, stream, key)
                return stream
            self._streams.move_to_end(owner)
            stream.set_prompt(request.prompt, request.negative_prompt)  # the one update that can refuse its input
            stream.set_seed(cfg.seed)
            stream.set_guidance(cfg.guidance_scale, cfg.delta)
            if cfg.kv_cache.enabled:
                stream.set_cache_window(cfg.kv_cache.window, cfg.kv_cache.interval)
            for index, control in enumerate(request.controlnets):
                stream.set_control_strength(index, control.net.strength)
            if request.reset:
                stream.reset()
            return stream

    def run(self, owner: Hashable, models: StreamModels, request: StreamRequest, frames: torch.Tensor | None,
            progress: ProgressCallback | None = None, preview: PreviewCallback | None = None
            ) -> tuple[LiveStream, torch.Tensor]:
        """One call of the owner's stream: txt2img without ``frames``, one step for ``frames_per_step``
        frames, an aligned video for more (``progress`` and ``preview`` as for :meth:`Stream.process_video`).
        Returns the stream and its output frames.

        The frames are checked against the requested config before the stream is touched: a refused call
        leaves the owner's stream exactly as it was.
        """
        cfg = request.config
        if frames is not None:
            frames = check_frames(frames, width=cfg.width, height=cfg.height, frames_per_step=cfg.frames_per_step)
        control = check_control_images([c.image for c in request.controlnets],  # before the stream changes
                                       cfg.frames_per_step if frames is None else int(frames.shape[0]),
                                       width=cfg.width, height=cfg.height, finite=self._finite) or None
        if frames is not None and frames.shape[0] > cfg.frames_per_step and len(request.video_devices) > 1:
            return self._run_split(owner, models, request, frames, progress, preview)
        stream = self.stream(owner, models, request)
        self.ran_on[owner] = tuple(str(d) for d in stream.devices)
        if frames is None or frames.shape[0] == cfg.frames_per_step:
            return stream, stream.step(frames, validated=True, control=control, overlap=request.overlap)
        return stream, stream.process_video(frames, progress=progress, preview=preview, validated=True,
                                            control=control)

    def _drop_replaced(self, owner: Hashable) -> None:
        logger.info("stream %s: config changed, building a new stream", owner)
        self._drop(owner)

    def _make_room(self) -> None:
        """Drop the least recently used streams beyond ``max_streams`` (before a new stream is made), and give the
        memory of what went back."""
        while len(self._streams) >= self.max_streams:
            oldest = next(iter(self._streams))
            logger.info("stream %s: dropped, the least recently used of %d", oldest, self.max_streams)
            self._drop(oldest)
        if self._collect_pending:  # a pipeline went with the old stream: free it before allocating
            self._collect()

    def _new_staged(self, owner: Hashable, models: StreamModels, request: StreamRequest, cfg: StreamConfig,
                    key: tuple, replacing: bool) -> StagedStream:
        """A new stream for ``owner`` whose steps are split over ``request.step_devices`` (the pipeline's device
        first where it is among them; a copy of the pipeline on each other one, kept with the pipeline)."""
        devices = sorted(request.step_devices, key=lambda d: torch.device(d) != models.device)
        stages = [self.replica(models, d) for d in devices[:cfg.num_steps]]
        # the runtimes first: an acceleration that cannot run here is refused before the old stream goes
        runtimes: list = []
        try:
            for stage_models, stage_cfg in zip(stages, StagedStream.stage_configs(cfg, len(stages))):
                runtimes.append(prepare(stage_models, stage_cfg, engines=request.engines,
                                        control=bool(request.controlnets)))
            nets = [[c.net for c in self._controlnets_on(request.controlnets, d)] for d in devices[:len(stages)]]
            if replacing:
                self._drop_replaced(owner)
            self._make_room()
            stream = StagedStream(stages, cfg, prompt=request.prompt, negative_prompt=request.negative_prompt,
                                  runtimes=runtimes, source=models, controlnets=nets if request.controlnets else ())
        except BaseException:
            for runtime in runtimes:
                runtime.close()
            raise
        self._register(owner, stream, key)
        return stream

    def _register(self, owner: Hashable, stream: LiveStream, key: tuple) -> None:
        """Keep a new stream as the owner's, with its bytes and what it added to its pipelines' modules."""
        self._streams[owner], self._keys[owner] = stream, key
        self._stream_bytes[owner] = stream.nbytes()
        for stage in stream.stages:  # counted for the pipelines and copies counted here (their weights are)
            if id(stage.models) in self._replica_bytes or self._key_of(stage.models) is not None:
                self._added_bytes[id(stage.models)] = fused_projections_nbytes(stage.models.unet)

    def replica(self, models: StreamModels, device: str) -> StreamModels:
        """``models`` on ``device``: itself where it is, else a copy made once and kept with the pipeline (until it
        is released, or :meth:`release`)."""
        if torch.device(device) == models.device:
            return models
        with self._lock:
            per_device = self._replicas.setdefault(models, {})
            copy = per_device.get(device)
            if copy is None:
                logger.info("copying the pipeline to %s (for a stream or video split over devices)", device)
                copy = per_device[device] = replicate(models, device)
                self._replica_bytes[id(copy)] = copy.weights_nbytes()  # once, at the copy
                weakref.finalize(copy, self._replica_bytes.pop, id(copy), None)
                weakref.finalize(copy, self._added_bytes.pop, id(copy), None)
            return copy

    def _controlnets_on(self, controls: tuple[ControlInput, ...], device: str) -> tuple[ControlInput, ...]:
        """``controls`` with their ControlNet modules on ``device`` (a copy made once per ControlNet and device,
        cached with the converted ControlNets)."""
        out = []
        for control in controls:
            model = control.net.model
            if next(model.parameters()).device != torch.device(device):
                model = self.controlnet((control.key, "device", device),
                                        lambda model=model: copy.deepcopy(model).to(device))
            out.append(ControlInput(control.key, replace(control.net, model=model), control.image))
        return tuple(out)

    def _run_split(self, owner: Hashable, models: StreamModels, request: StreamRequest, frames: torch.Tensor,
                   progress: ProgressCallback | None, preview: PreviewCallback | None
                   ) -> tuple[LiveStream, torch.Tensor]:
        """A video split over ``request.video_devices``: the owner's stream on the first of them (the pipeline's
        device where it is among them), one more stream per other device (owned by ``(owner, "device", i)``), one
        chunk each."""
        devices = sorted(request.video_devices, key=lambda d: torch.device(d) != models.device)  # the pipeline's first
        streams = [self.stream(owner if i == 0 else (owner, "device", i), self.replica(models, d),
                               replace(request, controlnets=self._controlnets_on(request.controlnets, d)))
                   for i, d in enumerate(devices)]
        logger.debug("video of %d frames split over %s (pipeline on %s)", frames.shape[0], devices, models.device)
        control = [c.image for c in request.controlnets] or None
        self.ran_on[owner] = tuple(str(s.device) for s in streams)
        return streams[0], process_video_parallel(streams, frames, progress=progress, preview=preview, control=control)

    def _drop(self, owner: Hashable) -> None:
        stream = self._streams.pop(owner, None)
        self._keys.pop(owner, None)
        self._stream_bytes.pop(owner, None)
        if stream is not None:
            stream.close()
            key = self._key_of(stream.models)
            if key is not None:
                self._release_if_unused(key)

    def frames_processed(self, owner: Hashable) -> int:
        """Frames the owner's stream has processed (0 when it has none)."""
        with self._lock:
            stream = self._streams.get(owner)
            return 0 if stream is None else stream.frames_processed

    def live_streams(self) -> dict[Hashable, dict]:
        """A summary of every live stream (for status displays)."""
        with self._lock:
            return {owner: {"frames": s.frames_processed, "width": s.config.width, "height": s.config.height,
                            "steps": s.config.num_steps, "device": str(s.device),
                            "devices": [str(d) for d in s.devices],
                            "acceleration": s.runtime.describe()}
                    for owner, s in self._streams.items()}

    def total_bytes(self) -> int:
        """Device bytes held: every cached pipeline's weights (with what streams added to them, the fused projection
        weights) and every live stream's buffers."""
        with self._lock:
            return (sum(self._pipeline_bytes.values()) + sum(self._stream_bytes.values())
                    + sum(size for _, size in self._controlnets.values()) + sum(self._replica_bytes.values())
                    + sum(self._added_bytes.values()))

    def _collect(self) -> None:
        self._collect_pending = False
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def counts(self) -> tuple[int, int]:
        """(pipelines, streams) held now."""
        with self._lock:
            return len(self._pipelines), len(self._streams)

    def release(self, *, collect: bool = True) -> None:
        """Drop every stream and pipeline and give the GPU memory back.

        ``collect=False`` defers the garbage collection and cache emptying to the next load, for callers
        inside a host's own unload loop.
        """
        with self._lock:
            had = bool(self._streams or self._pipelines or self._controlnets)
            self._holders.clear()
            self._controlnets.clear()
            self._replicas.clear()
            self.ran_on.clear()
            for owner in list(self._streams):
                self._drop(owner)
            self._pipelines.clear()
            self._pipeline_bytes.clear()
            self._added_bytes.clear()
        if had and collect:
            self._collect()
        elif had:
            # Models hold reference cycles: without a collection their memory stays until Python's next one,
            # so the next load collects first.
            self._collect_pending = True
        if had:
            logger.info("released all streams and pipelines")
