"""The pack's live state inside ComfyUI: one session registry and the memory watch around it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..streamrt import StreamModels, StreamSessions, load_diffusers_folder
from ..streamrt.loading import file_fingerprint
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

    model_path: str
    taesd_path: str | None
    dtype: str
    device: str

    @property
    def key(self) -> tuple:
        paths = [self.model_path] + ([self.taesd_path] if self.taesd_path else [])
        return (self.model_path, self.taesd_path, self.dtype, self.device,
                tuple(file_fingerprint([Path(p) for p in paths])))

    def models(self) -> StreamModels:
        """The loaded pipeline (cached by files, sizes, mtimes, dtype and device)."""
        models = SESSIONS.pipeline(self.key, lambda: load_diffusers_folder(
            self.model_path, dtype=self.dtype, device=self.device, taesd=self.taesd_path))
        MEMORY.keep_registered(models_bytes(models))
        return models
