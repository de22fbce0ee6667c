"""Realtime soak on the real ComfyUI server: the webcam-style graph queued back to back N times.

Starts ComfyUI with this pack (on the GPU when there is one), writes a small random-weight model, runs
LoadImage (or, with ``--posted-frames``, Stream Frame Input fed by posts) -> Realtime Sampler -> PreviewImage
``--executions`` times (``tests/soak.py``), and prints the rate,
the failures and the server's resident memory and device memory after every window, with their slopes.

    python scripts/soak.py --executions 10000 --acceleration compile      # GPU machine
    python scripts/soak.py --executions 500 --acceleration auto           # anywhere

On the GPU machine (no ComfyUI there): ``bash scripts/gpu_comfyui.sh prepare`` here first (a slim ComfyUI
tree and the wheels it lacks, in .gpu/), then run ``bash scripts/gpu_comfyui.sh soak`` there.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the ComfyUI server driver and the soak live with the tests

from comfy_harness import ComfyServer  # noqa: E402
from soak import soak  # noqa: E402

from streamrt.config import Acceleration  # noqa: E402

logger = logging.getLogger("streamrt.soak")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--executions", type=int, default=10000)
    parser.add_argument("--acceleration", default="auto", choices=[a.value for a in Acceleration])
    parser.add_argument("--size", type=int, default=128, help="frame size (default 128)")
    parser.add_argument("--window", type=int, default=500, help="executions queued per window (default 500)")
    parser.add_argument("--posted-frames", action="store_true",
                        help="the frame from Stream Frame Input, new frames posted all along (default: Load Image)")
    parser.add_argument("--overlap", action="store_true",
                        help="Stream Settings' overlap_executions on (each execution hands over the previous frame)")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the result here as JSON")
    parser.add_argument("--front-end-root", default=None,
                        help="serve this folder as the frontend (API-only runs without the frontend package)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="one more argument for ComfyUI's main.py (repeat it), "
                             "e.g. --server-arg=--disable-cuda-malloc")
    parser.add_argument("--server-log", default=None, help="copy the server's log here at the end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    from streamrt.random_models import write_random_pipeline

    work = Path(args.work or tempfile.mkdtemp(prefix="streamrt-soak-"))
    models = work / "models"
    if not (models / "diffusers" / "soak-tiny" / "model_index.json").is_file():
        write_random_pipeline(models / "diffusers" / "soak-tiny", "tiny",
                              taesd_folder=models / "vae_approx" / "soak-taesd")
    extra = (["--front-end-root", args.front_end_root] if args.front_end_root else []) + list(args.server_arg)
    cuda = torch.cuda.is_available()
    with ComfyServer(REPO, work / "server", pack_name="StreamRT", cpu=not cuda, models_source=models,
                     extra_args=extra) as server:
        try:
            result = soak(server, executions=args.executions, model="soak-tiny", taesd="soak-taesd",
                          acceleration=args.acceleration, size=args.size, window=args.window,
                          posted=args.posted_frames, overlap=args.overlap, log=logger.info)
        finally:
            log_tail = server.log_tail(60)
            if args.server_log:
                Path(args.server_log).write_text(server.log_tail(100000), encoding="utf-8")
    summary = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "acceleration": args.acceleration,
        "size": args.size, "executions": result.executions, "failures": len(result.failures),
        "seconds": result.seconds, "executions_per_second": result.executions_per_second,
        "rss_slope_mb_per_1000": result.slope_mb_per_1000(1), "gpu_slope_mb_per_1000": result.slope_mb_per_1000(2),
        "samples": result.samples, "first_failures": result.failures[:5], "frames": "posted" if args.posted_frames
        else "Load Image", "overlap_executions": args.overlap,
    }
    if result.poster is not None:
        summary.update(frames_posted=result.poster.posted, post_errors=result.poster.errors[:5])
    logger.info("soak result: %s", json.dumps({k: v for k, v in summary.items() if k != "samples"}))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if result.failures:
        logger.error("server log tail:\n%s", log_tail)
    return 0 if not result.failures and result.executions == args.executions else 1


if __name__ == "__main__":
    sys.exit(main())
