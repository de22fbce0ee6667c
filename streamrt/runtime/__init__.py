"""How the stream's models get called: one :func:`prepare` from an :class:`Acceleration` to a :class:`Runtime`.

- :mod:`.runtime`: :func:`prepare`, :class:`Runtime`, :class:`UNetExtras`, the UNet callables.
- :mod:`.compiled`: ``torch.compile``'d copies of a pipeline's calls, shared per pipeline.
- :mod:`streamrt.cuda_graphs` (re-exported here): the one CUDA-graph capture helper, also used by the
  prompt encoder, which sits below the runtime.
- :mod:`.host_io`: pinned frame staging and drain.
"""

from ..config import Acceleration
from ..cuda_graphs import capture_graph, graph_replay_ms
from .compiled import CompileOptions, compile_problem, compiled_calls, compiled_controlnet, use_compile_cache
from .host_io import HostIO
from .runtime import (
                      NO_EXTRAS,
                      AccelerationUnavailable,
                      AddedConditions,
                      AttachResult,
                      EngineCallError,
                      EngineControlNet,
                      EngineSource,
                      EngineUNet,
                      Runtime,
                      TorchUNet,
                      UNetExtras,
                      prepare,
                      zero_control_residuals,
)

__all__ = [
    "Acceleration", "AccelerationUnavailable", "AddedConditions", "AttachResult", "CompileOptions", "EngineCallError",
    "EngineControlNet", "EngineSource", "EngineUNet", "HostIO", "NO_EXTRAS", "Runtime", "TorchUNet", "UNetExtras",
    "capture_graph", "compile_problem", "compiled_calls", "compiled_controlnet", "graph_replay_ms", "prepare",
    "use_compile_cache", "zero_control_residuals",
]
