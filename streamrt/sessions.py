"""Where streams live between calls: loaded pipelines by load key, streams by owner key.

A host application (the ComfyUI nodes) keeps one :class:`StreamSessions`. Pipelines are cached by
what identifies their weights, so asking again does not reload; streams are kept per owner (a node
id), so every call of the same owner advances the same stream, and a changed config rebuilds only
what it must: a new shape makes a new stream, while seed, prompt and guidance are updated in place.
:meth:`StreamSessions.release` drops everything (what a host does when asked to free memory).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from .config import StreamConfig
from .models import StreamModels
from .runtime import EngineSource, prepare
from .stream import Stream

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class StreamRequest:
    """What a caller wants from its stream on this call."""

    config: StreamConfig
    prompt: str | list[tuple[str, float]] = ""
    negative_prompt: str = ""
    reset: bool = False
    engines: EngineSource | None = None

    def rebuild_key(self) -> tuple:
        """What needs a new stream when it changes (the config's rebuild key and the engine source)."""
        return self.config.rebuild_key(), None if self.engines is None else self.engines.key


class StreamSessions:
    """Cache of loaded pipelines and registry of live streams (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pipelines: dict[Hashable, StreamModels] = {}
        self._streams: dict[Hashable, Stream] = {}
        self._keys: dict[Hashable, tuple] = {}
        self.loads = 0

    # pipelines -------------------------------------------------------------------------------------
    def pipeline(self, key: Hashable, load: Callable[[], StreamModels]) -> StreamModels:
        """The pipeline for ``key``, loading it with ``load()`` only when it is not cached."""
        with self._lock:
            models = self._pipelines.get(key)
            if models is None:
                models = load()
                self.loads += 1
                self._pipelines[key] = models
            return models

    # streams ---------------------------------------------------------------------------------------
    def stream(self, owner: Hashable, models: StreamModels, request: StreamRequest) -> Stream:
        """The owner's stream, created or updated so that it matches ``request``.

        Same models and same rebuild key (shapes, similarity filter, acceleration, engines): the stream
        (with its state) is kept; seed, prompt, guidance, delta and cache window are applied in place.
        Otherwise a new stream replaces the old one.
        """
        cfg = request.config
        key = request.rebuild_key()
        with self._lock:
            stream = self._streams.get(owner)
            if stream is None or stream.models is not models or self._keys.get(owner) != key:
                # The runtime first: an acceleration that cannot run here is refused before the old stream goes.
                runtime = prepare(models, cfg, engines=request.engines)
                if stream is not None:
                    logger.info("stream %s: config changed, building a new stream", owner)
                    self._drop(owner)
                    del stream  # free its buffers before allocating the new ones
                try:
                    stream = Stream(models, cfg, prompt=request.prompt, negative_prompt=request.negative_prompt,
                                    runtime=runtime)
                except BaseException:
                    runtime.close()
                    raise
                self._streams[owner], self._keys[owner] = stream, key
                return stream
            stream.set_seed(cfg.seed)
            stream.set_guidance(cfg.guidance_scale, cfg.delta)
            if cfg.kv_cache.enabled:
                stream.set_cache_window(cfg.kv_cache.window, cfg.kv_cache.interval)
            stream.set_prompt(request.prompt, request.negative_prompt)
            if request.reset:
                stream.reset()
            return stream

    def _drop(self, owner: Hashable) -> None:
        stream = self._streams.pop(owner, None)
        self._keys.pop(owner, None)
        if stream is not None:
            stream.close()

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
                            "acceleration": s.runtime.describe()}
                    for owner, s in self._streams.items()}

    def release(self, *, collect: bool = True) -> None:
        """Drop every stream and pipeline and give the GPU memory back.

        ``collect=False`` skips the garbage collection and cache emptying, for callers inside a host's
        own unload loop (the host empties the cache itself afterwards).
        """
        with self._lock:
            had = bool(self._streams or self._pipelines)
            for owner in list(self._streams):
                self._drop(owner)
            self._pipelines.clear()
        if had and collect:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if had:
            logger.info("released all streams and pipelines")
