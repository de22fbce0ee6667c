"""The pack's live state inside ComfyUI: one session registry and the memory watch around it."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from ..streamrt.loading import PipelineSpec
from ..streamrt.models import StreamModels
from ..streamrt.sessions import StreamSessions
from .api import MemoryWatch

SESSIONS = StreamSessions()
MEMORY = MemoryWatch(SESSIONS.release)


def workflow_id(extra_pnginfo) -> str | None:
    """The id the frontend gives the workflow a prompt came from (None for API prompts).

    Streams and loaded pipelines are kept per (workflow, node): node ids are small integers, so two open
    workflows often have a node with the same id.
    """
    if isinstance(extra_pnginfo, dict) and isinstance(extra_pnginfo.get("workflow"), dict):
        wid = extra_pnginfo["workflow"].get("id")
        return str(wid) if wid is not None else None
    return None


def report_memory() -> None:
    """Tell ComfyUI how much device memory the pack holds now (pipelines and streams)."""
    MEMORY.keep_registered(SESSIONS.total_bytes())


@dataclass(frozen=True)
class PipelineHandle:
    """What flows along a STREAMRT_PIPELINE wire: how to get the models, not the models themselves.

    The models live in :data:`SESSIONS`, so when ComfyUI frees memory they go even though ComfyUI's
    output cache still holds this handle; :meth:`models` reloads them on the next run.

    Args:
        spec: what to load.
        key: the spec plus the sizes and mtimes of its files, computed once when the loader ran (a sampler
            never stats files or walks parameters per execution).
    """

    spec: PipelineSpec
    key: tuple

    @classmethod
    def for_spec(cls, spec: PipelineSpec) -> PipelineHandle:
        return cls(spec, spec.cache_key())

    def models(self, holder: Hashable | None = None) -> StreamModels:
        """The loaded pipeline (cached by :attr:`key`; a failed load leaves nothing cached). ``holder`` (the
        loader node) keeps it loaded while it holds it; what it held before is released unless in use. The
        node that asked reports the memory once its work is done (:func:`report_memory`)."""
        return SESSIONS.pipeline(self.key, self.spec.load, holder=holder)
