"""How the stream's models get called: one :func:`prepare` from an :class:`Acceleration` to a :class:`Runtime`.

- :mod:`.runtime`: :func:`prepare`, :class:`Runtime`, :class:`UNetExtras`, the UNet callables.
- :mod:`.compiled`: ``torch.compile``'d copies of a pipeline's calls, shared per pipeline.
- :mod:`.graphs`: the one CUDA-graph capture helper.
- :mod:`.host_io`: pinned frame staging and drain.
"""

from ..config import Acceleration
from .compiled import CompileOptions, compiled_calls, use_compile_cache
from .graphs import capture_graph, graph_replay_ms
from .host_io import HostIO
from .runtime import (
                      NO_EXTRAS,
                      AccelerationUnavailable,
                      AttachResult,
                      EngineCallError,
                      EngineSource,
                      EngineUNet,
                      Runtime,
                      TorchUNet,
                      UNetExtras,
                      prepare,
)

__all__ = [
    "Acceleration", "AccelerationUnavailable", "AttachResult", "CompileOptions", "EngineCallError", "EngineSource",
    "EngineUNet", "HostIO", "NO_EXTRAS", "Runtime", "TorchUNet", "UNetExtras", "capture_graph", "compiled_calls",
    "graph_replay_ms", "prepare", "use_compile_cache",
]
