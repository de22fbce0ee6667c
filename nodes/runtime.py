"""The pack's live state inside ComfyUI: one session registry and the memory watch around it."""

from __future__ import annotations

from dataclasses import dataclass

from ..streamrt.loading import PipelineSpec
from ..streamrt.models import StreamModels
from ..streamrt.sessions import StreamSessions
from .api import MemoryWatch

SESSIONS = StreamSessions()
MEMORY = MemoryWatch(SESSIONS.release)


def models_bytes(models: StreamModels) -> int:
    """Bytes of weights a pipeline holds (what ComfyUI is told the pack uses)."""
    return sum(p.numel() * p.element_size()
               for m in (models.unet, models.vae, models.text_encoder) for p in m.parameters())


@dataclass(frozen=True)
class PipelineHandle:
    """What flows along a STREAMRT_PIPELINE wire: how to get the models, not the models themselves.

    The models live in :data:`SESSIONS`, so when ComfyUI frees memory they go even though ComfyUI's
    output cache still holds this handle; :meth:`models` reloads them on the next run.
    """

    spec: PipelineSpec

    @property
    def key(self) -> tuple:
        """The spec (model, TAESD, LoRA set with strengths, dtype, device, prediction type) plus the
        sizes and mtimes of every file it reads: a changed file or LoRA set means another pipeline."""
        return self.spec.cache_key()

    def models(self) -> StreamModels:
        """The loaded pipeline (cached by :attr:`key`; a failed load leaves nothing cached)."""
        models = SESSIONS.pipeline(self.key, self.spec.load)
        MEMORY.keep_registered(models_bytes(models))
        return models
