"""Side-by-side speed benchmark: StreamRT's accelerations against StreamDiffusion 0.1.1.

Run on the GPU machine::

    python -m streamrt.bench --out bench_out

and, as a smoke test on a CPU (tiny random models, a few frames)::

    python -m streamrt.bench --device cpu --preset tiny --frames 8 --accelerations eager --width 64 --height 64

Everything runs in ONE process on ONE set of random-weight models (``--preset``, default the
SD-turbo sized UNet with the real TAESD architecture), so every row sees the same GPU, the same
weights and the same input video. Rows:

- ``StreamDiffusion 0.1.1`` (its own torch path, one ``__call__`` per frame), per scenario, first
  (the compile rows put the shared UNet's weights in channels-last layout).
- ``streamrt`` for each acceleration: ``eager``, ``cuda_graph`` and ``compile``, per scenario, each stream
  made through :func:`streamrt.runtime.prepare` as the sampler node makes it.

Modules: :mod:`.common` (scenarios, statistics, the run's models and video), :mod:`.ours`,
:mod:`.reference`, :mod:`.breakdown`, :mod:`.report`, :mod:`.cli`.

Scenarios (512x512 unless ``--width/--height``; LCM schedule of 50 steps; guidance 1.2):

- ``a``: 1 step, ``t_index_list=(32,)``, cfg ``none``, F = 1 frame per step;
- ``b``: 2 steps, ``(32, 45)``, cfg ``self`` (RCFG), F = 1;
- ``a4``: as ``a`` with F = 4 frames per step (batch-video setting; the reference has no F > 1 row and
  the speed-up column compares with its ``a`` row).

What the numbers are (written into the output too, see :data:`METHODS`):

- ``ms/frame``: wall time of one ``Stream.process_video`` over N frames (a CPU float32 tensor
  ``[N, H, W, 3]``, as ComfyUI hands over an IMAGE batch) divided by N, after a warm-up video. It
  includes the upload, encode, UNet, scheduler step, decode and the copy into the CPU IMAGE-layout
  result, the per-video pinning of the input and the final synchronisation. For the reference: the
  wall time of N per-frame calls (upload, ``__call__``, to IMAGE layout on the CPU) divided by N.
- ``p50/p95``: per-frame times. Ours: a CUDA event is recorded from ``process_video``'s progress
  callback after every step of that same timed video; a frame's time is the GPU-timeline distance
  between consecutive events (divided by F), so idle gaps count too. Reference: per-call wall times.
- ``allocs/frame``: growth of ``torch.cuda.memory_stats()["allocation.all.allocated"]`` over a window
  of >= 200 frames of ``process_video`` in steady state, during which the prompt changes to one
  encoded before the window (a cache hit), the same prompt is set again, and the seed changes.
- prompt-change frames: ``set_prompt`` + one realtime ``step`` (host round trip), compared with the
  median realtime call; once for prompts already in the cache and once for brand-new prompts
  (one text-encoder call each, counted with ``models.prompt_encoder.encoder_calls``).
- realtime: ``step(frame)`` per call with ``synchronize=True`` (one frame per call, host round trip);
  ``overhead`` is the realtime median per call minus the batch ms/frame times F.
"""

from .cli import main, parse_args
from .common import REFERENCE_NAME, SCENARIOS

__all__ = ["REFERENCE_NAME", "SCENARIOS", "main", "parse_args"]
