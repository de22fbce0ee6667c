"""Side-by-side speed benchmark: StreamRT's accelerations against StreamDiffusion 0.1.1 (SD) and diffusers'
SDXL img2img pipeline (SDXL).

Run on the GPU machine::

    python -m streamrt.bench --out bench_out
    python -m streamrt.bench --scenarios xl,xl4,xl1024 --accelerations cuda_graph,compile \
        --compile-scenarios xl,xl1024 --out bench_out

and, as a smoke test on a CPU (tiny random models, a few frames)::

    python -m streamrt.bench --device cpu --preset tiny --frames 8 --accelerations eager --width 64 --height 64
    python -m streamrt.bench --device cpu --xl-preset tiny-xl --scenarios xl,xl4,xl1024 --frames 4 \
        --accelerations eager --width 64 --height 64

Everything runs in ONE process on ONE set of random-weight models per family (``--preset``, default the
SD-turbo sized UNet, for the SD scenarios; ``--xl-preset``, default ``sdxl-turbo``, the real SDXL UNet config
with 2.57 B parameters, for the SDXL ones; both with the real TAESD architecture as their VAE, TAESDXL's for
SDXL), so every row sees the same GPU, the same weights and the same input video. Rows:

- the reference, per scenario, first (the compile rows put the shared UNet's weights in channels-last):
  ``StreamDiffusion 0.1.1`` (its own torch path, one ``__call__`` per frame) for the SD scenarios;
  ``diffusers SDXL img2img`` (``StableDiffusionXLImg2ImgPipeline`` over the same modules, one UNet step per
  call, F frames per call; see :mod:`.reference_xl`) for the SDXL ones, which StreamDiffusion cannot run.
- ``streamrt`` for each acceleration: ``eager``, ``cuda_graph`` and ``compile``, per scenario, each stream
  made through :func:`streamrt.runtime.prepare` as the sampler node makes it. ``--compile-scenarios`` limits
  the compile rows (compiling the SDXL UNet takes about 130 s per shape).

Modules: :mod:`.common` (scenarios, statistics, the run's models and videos), :mod:`.ours`,
:mod:`.reference`, :mod:`.reference_xl`, :mod:`.breakdown`, :mod:`.targets` (issue #15's SDXL targets, met or
missed), :mod:`.report`, :mod:`.cli`.

Scenarios (512x512 unless ``--width/--height``; LCM schedule of 50 steps; guidance 1.2):

- ``a``: 1 step, ``t_index_list=(32,)``, cfg ``none``, F = 1 frame per step;
- ``b``: 2 steps, ``(32, 45)``, cfg ``self`` (RCFG), F = 1;
- ``a4``: as ``a`` with F = 4 frames per step (batch-video setting; the reference has no F > 1 row and
  the speed-up column compares with its ``a`` row);
- ``bkv``: as ``b`` with cached attention over a window of 4 frames;
- ``xl``, ``xl4``: SDXL, 1 step ``(32,)``, cfg ``none``, F = 1 and F = 4 (its reference row: the pipeline
  called with 4 frames per call);
- ``xl1024``: as ``xl`` at twice ``--width/--height`` (1024x1024 by default).

What the numbers are (written into the output too, see :data:`METHODS`):

- ``ms/frame``: wall time of one ``Stream.process_video`` over N frames (a CPU float32 tensor
  ``[N, H, W, 3]``, as ComfyUI hands over an IMAGE batch) divided by N, after a warm-up video. It
  includes the upload, encode, UNet, scheduler step, decode and the copy into the CPU IMAGE-layout
  result, the per-video pinning of the input and the final synchronisation. For the reference: the
  wall time of N per-frame calls (upload, ``__call__``, to IMAGE layout on the CPU) divided by N (the SDXL
  reference: N / F calls of F frames).
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
from .common import REFERENCE_NAME, SCENARIOS, XL_REFERENCE_NAME

__all__ = ["REFERENCE_NAME", "SCENARIOS", "XL_REFERENCE_NAME", "main", "parse_args"]
