"""What a webcam frame's way into a realtime graph costs per execution on the real ComfyUI server.

Two routes, each a frame source -> [Realtime Sampler ->] Stream Preview graph queued once per new frame, as the
Stream button queues it:

* ``upload``: ComfyUI's Webcam Capture. The browser uploads each frame as a PNG into the temp folder
  (``POST /upload/image``, subfolder ``webcam``), the prompt names it, and the node (a Load Image) hashes the file
  to decide whether it changed, then reads and decodes it;
* ``post``: StreamRT's Stream Frame Input. The frame is posted as a JPEG (quality 0.9, as the node's camera posts
  it) to ``/streamrt/frames/<source>``, kept in memory, and decoded once by the node (``wait_for_new``).

Each execution is timed on the client from the start of the upload / post to the prompt's end event on the
websocket. The frames are encoded before the clock starts (a browser encodes them; its time is not the
server's). Rounds alternate the routes (A B, B A, ...); medians. The difference between the routes is the
measurement; absolute times depend on the machine.

    python scripts/webcam_routes.py --size 512 --json webcam_routes.json
    python scripts/webcam_routes.py --size 512 --sampler --preset sd-turbo --acceleration compile \\
        --server-arg=--disable-cuda-malloc      # on a GPU: the whole realtime graph
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the ComfyUI server driver lives with the tests

import overhead  # noqa: E402
from comfy_harness import ComfyServer, array_to_png_bytes  # noqa: E402
from node_overhead import cpu_name  # noqa: E402

logger = logging.getLogger("streamrt.webcam_routes")
TAESD = "routes-taesd"
ROUTES = ("upload", "post")


def camera_frames(count: int, size: int, seed: int = 3) -> list[np.ndarray]:
    """Camera-like frames: smooth gradients that move, plus sensor noise (a PNG of pure noise or of a flat picture
    would cost the upload route unrealistically much or little)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for k in range(count):
        phase = k / max(count, 1)
        picture = np.stack([0.5 + 0.4 * np.sin(6 * (x + phase)), 0.5 + 0.4 * np.cos(5 * (y - phase)),
                            0.5 + 0.3 * np.sin(4 * (x + y))], -1)
        noisy = picture * 255 + rng.normal(0, 3, picture.shape)
        out.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return out


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def build_graph(route: str, prefix: str, source: str, *, model: str | None, acceleration: str,
                t_index_list: str | None) -> dict:
    """The route's graph in API form; the frame source's node is ``<prefix>in`` (its ``image`` input set per frame
    for the upload route)."""
    if route == "upload":
        frame_in = {"class_type": "WebcamCapture",
                    "inputs": {"image": "", "width": 0, "height": 0, "capture_on_queue": True}}
    else:
        frame_in = {"class_type": "StreamRTFrameInput", "inputs": {"source": source, "width": 0, "height": 0,
                                                                    "wait_for_new": True, "timeout": 5.0}}
    graph = {f"{prefix}in": frame_in}
    shown = [f"{prefix}in", 0]
    if model is not None:
        options = {} if t_index_list is None else {"t_index_list": t_index_list}
        graph.update(overhead.sampler_nodes(prefix, acceleration, **options))
        graph[f"{prefix}x"]["inputs"]["image"] = [f"{prefix}in", 0]
        graph[f"{prefix}load"] = {"class_type": "StreamRTLoadPipeline",
                                  "inputs": {"model": model, "taesd": TAESD, "dtype": "auto", "device": "auto"}}
        shown = [f"{prefix}x", 0]
    graph[f"{prefix}view"] = overhead.sink_node("StreamRTPreview", shown)
    return graph


def one_execution(server: ComfyServer, ws, route: str, graph: dict, prefix: str, source: str, frame: dict) -> float:
    """Hand one frame in by ``route`` and run the graph on it; wall seconds from the hand-over to the end event."""
    start = time.perf_counter()
    if route == "upload":
        name = f"{uuid.uuid4().hex[:12]}.png"
        answer = server.session.post(f"{server.base_url}/upload/image", timeout=60,
                                     files={"image": (name, frame["png"], "image/png")},
                                     data={"subfolder": "webcam", "type": "temp"})
        answer.raise_for_status()
        graph[f"{prefix}in"]["inputs"]["image"] = f"webcam/{answer.json()['name']} [temp]"
    else:
        answer = server.post_frame(source, frame["jpeg"], "image/jpeg")
        answer.raise_for_status()
    overhead.run_once(server, ws, graph)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="frame size (default 512)")
    parser.add_argument("--frames", type=int, default=16, help="distinct frames, cycled (default 16)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    parser.add_argument("--per-round", type=int, default=40, help="executions per route per round (default 40)")
    parser.add_argument("--warmup", type=int, default=10, help="executions per route before measuring (default 10)")
    parser.add_argument("--sampler", action="store_true",
                        help="put a Realtime Sampler between the frame and the view (default: the frame alone)")
    parser.add_argument("--preset", default="tiny", help="random-weight model preset for --sampler (default tiny)")
    parser.add_argument("--acceleration", default="auto", help="the sampler's acceleration (default auto)")
    parser.add_argument("--t-index-list", default=None, help="the sampler's t_index_list (default: 20,35)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="one more argument for ComfyUI's main.py (repeat it)")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the result here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    from streamrt.random_models import write_random_pipeline

    cuda = torch.cuda.is_available()
    work = Path(args.work or tempfile.mkdtemp(prefix="streamrt-webcam-routes-"))
    models = work / "models"
    model = None
    if args.sampler:
        model = f"routes-{args.preset}"
        if not (models / "diffusers" / model / "model_index.json").is_file():
            write_random_pipeline(models / "diffusers" / model, args.preset, taesd_folder=models / "vae_approx" / TAESD)
    else:
        models.mkdir(parents=True, exist_ok=True)
    frames = [{"png": array_to_png_bytes(f), "jpeg": jpeg_bytes(f)} for f in camera_frames(args.frames, args.size)]
    prefix, source = "wr", f"routes-{uuid.uuid4().hex[:6]}"
    graphs = {route: build_graph(route, prefix, source, model=model, acceleration=args.acceleration,
                                 t_index_list=args.t_index_list) for route in ROUTES}
    times: dict[str, list[float]] = {route: [] for route in ROUTES}
    env = {"OMP_NUM_THREADS": "1"} if not cuda else {}
    with ComfyServer(REPO, work / "server", pack_name="StreamRT", cpu=not cuda, models_source=models, env=env,
                     extra_args=list(args.server_arg), database_url=f"sqlite:///{work / 'server' / 'comfy.db'}"
                     ) as server, server.websocket() as ws:
        comfyui = server.system_stats().get("system", {}).get("comfyui_version")
        counter = 0
        for route in ROUTES:
            for _ in range(args.warmup):
                one_execution(server, ws, route, graphs[route], prefix, source, frames[counter % len(frames)])
                counter += 1
        for round_ in range(args.rounds):
            order = ROUTES if round_ % 2 == 0 else ROUTES[::-1]
            for route in order:
                for _ in range(args.per_round):
                    times[route].append(one_execution(server, ws, route, graphs[route], prefix, source,
                                                      frames[counter % len(frames)]))
                    counter += 1
                overhead.tidy(server)
            logger.info("round %d: %s", round_ + 1, ", ".join(
                f"{r} {1000 * statistics.median(times[r][-args.per_round:]):.2f} ms" for r in ROUTES))
    medians = {route: 1000.0 * statistics.median(values) for route, values in times.items()}
    summary = {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
        "comfyui": comfyui, "size": args.size, "sampler": args.sampler,
        "model": f"{args.preset} random-weight pipeline + TAESD" if args.sampler else None,
        "acceleration": args.acceleration if args.sampler else None,
        "png_bytes": statistics.median(len(f["png"]) for f in frames),
        "jpeg_bytes": statistics.median(len(f["jpeg"]) for f in frames),
        "rounds": args.rounds, "per_round": args.per_round,
        "routes": {route: {"median_ms": medians[route],
                           "p10_ms": 1000.0 * float(np.quantile(times[route], 0.1)),
                           "p90_ms": 1000.0 * float(np.quantile(times[route], 0.9)),
                           "executions_per_s": 1000.0 / medians[route]} for route in ROUTES},
        "saved_ms": medians["upload"] - medians["post"],
        "round_medians_ms": {route: [1000.0 * statistics.median(values[k * args.per_round:(k + 1) * args.per_round])
                                     for k in range(args.rounds)] for route, values in times.items()},
        "command": "python scripts/webcam_routes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(f"\nwebcam frame -> {'Realtime Sampler -> ' if args.sampler else ''}Stream Preview, {args.size}x{args.size}, "
          f"{summary['device']}, ComfyUI {comfyui}; ms per execution (median, p10-p90):")
    for route in ROUTES:
        row = summary["routes"][route]
        print(f"  {route:<7} {row['median_ms']:8.2f}  ({row['p10_ms']:.2f}-{row['p90_ms']:.2f})  "
              f"{row['executions_per_s']:.1f}/s")
    print(f"  saved by posting: {summary['saved_ms']:.2f} ms per execution "
          f"(PNG {summary['png_bytes'] / 1024:.0f} KiB vs JPEG {summary['jpeg_bytes'] / 1024:.0f} KiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
