"""The pack's live state inside ComfyUI: one session registry, the memory watch around it, and the frame inbox."""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from ..streamrt.controlnet_loading import controlnet_from_state_dict
from ..streamrt.frame_inbox import FrameInbox
from ..streamrt.loading import PipelineSpec
from ..streamrt.models import StreamModels
from ..streamrt.sessions import StreamSessions
from .api import MemoryWatch

SESSIONS = StreamSessions()
MEMORY = MemoryWatch(SESSIONS.release)
#: frames posted to the server (a browser's camera, other programs) for Stream Frame Input nodes
FRAMES = FrameInbox()


def workflow_id(extra_pnginfo) -> str | None:
    """The id the frontend gives the workflow a prompt came from (None for API prompts).

    Streams and loaded pipelines are kept per (workflow, node): node ids are small integers, so two open
    workflows often have a node with the same id.
    """
    if isinstance(extra_pnginfo, dict) and isinstance(extra_pnginfo.get("workflow"), dict):
        wid = extra_pnginfo["workflow"].get("id")
        return str(wid) if wid is not None else None
    return None


def converted_controlnet(key: str, state_dict: Callable[[], dict], models: StreamModels) -> Any:
    """The diffusers ``ControlNetModel`` of a ComfyUI ControlNet (``key`` and ``state_dict`` from
    :func:`nodes.api.control_net_weights`) for ``models``' pipeline: converted once per ControlNet and pipeline (its
    family, UNet config, device and dtype decide the conversion) and kept with the pipelines, so the sampler and
    Build Engines share one module (and the fingerprint of its weights that keys its engines, computed once on it)."""
    def load():
        return controlnet_from_state_dict(state_dict(), dtype=models.dtype, device=models.device,
                                          family=models.family, unet_config=models.unet.config,
                                          global_pool_conditions=key.endswith("+pooled"),
                                          what="the ControlNet of Apply ControlNet")
    return SESSIONS.controlnet((key, _conversion_key(models)), load)


#: pipeline -> what its ControlNets' conversion depends on (made once per pipeline, not per execution)
_conversion_keys: weakref.WeakKeyDictionary[StreamModels, tuple] = weakref.WeakKeyDictionary()


def _conversion_key(models: StreamModels) -> tuple:
    """The pipeline's UNet config, device and dtype as its identity recorded them at load (StreamModels.device /
    .dtype ask diffusers, which walks the UNet's parameters: per execution, that is the realtime loop's cost)."""
    key = _conversion_keys.get(models)
    if key is None:
        config = json.dumps(dict(models.unet.config), sort_keys=True, default=str)
        key = _conversion_keys[models] = (config, models.identity.get("device"), models.identity.get("dtype"))
    return key


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
