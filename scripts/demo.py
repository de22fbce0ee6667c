"""Headless demo: the real ComfyUI server with StreamRT runs a batch-video workflow.

Starts ComfyUI (on the GPU when there is one, else the CPU) with this pack mounted, makes an input
video, runs LoadVideo -> GetVideoComponents -> Realtime Sampler -> CreateVideo/SaveVideo + SaveImage,
and prints where the frames and the video went and the sampler's frames per second.

Without ``--model`` it builds a TINY RANDOM-WEIGHT model on the fly (no download): the pipeline
runs for real, but its pictures are noise-like. Pass a diffusers folder (SD 1.x / 2.x, e.g.
sd-turbo) with ``--model`` for real images.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the one ComfyUI server driver lives with the tests

from comfy_harness import ComfyServer, Graph  # noqa: E402

from streamrt.config import Acceleration  # noqa: E402

logger = logging.getLogger("streamrt.demo")
TINY_NAME = "streamrt-tiny-random (RANDOM WEIGHTS, demo only)"


def make_input_video(path: Path, frames: int, size: int, fps: int = 24) -> None:
    """A synthetic clip: a bright disc moving over a gradient."""
    import av
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(frames):
            t = k / max(frames, 1)
            cx, cy = 0.5 + 0.3 * math.cos(2 * math.pi * t), 0.5 + 0.3 * math.sin(2 * math.pi * t)
            disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < 0.02).astype(np.float32)
            img = np.stack([xx, yy, 1 - xx], -1) * 0.7 + disc[..., None] * 0.3
            frame = av.VideoFrame.from_ndarray((img * 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def build_graph(model: str, taesd: str, args: argparse.Namespace) -> Graph:
    g = Graph()
    load = g.node("StreamRTLoadPipeline", model=model, taesd=taesd, dtype="auto", device="auto")
    video = g.node("LoadVideo", file="streamrt_demo_input.mp4")
    parts = g.node("GetVideoComponents", video=video.out(0))
    settings = g.node("StreamRTSettings", cfg_type="self", delta=1.0, frames_per_step=1, add_noise=True,
                      acceleration=args.acceleration, width=0, height=0, schedule_length=50)
    if args.cached_attention:
        settings = g.node("StreamRTCachedAttention", settings=settings.out(0), max_frames=4, window=4, interval=1)
    sampler = g.node(
        "StreamRTSampler", pipeline=load.out(0), image=parts.out(0), prompt=args.prompt, negative_prompt="",
        steps=args.steps, strength=args.strength, cfg=1.2, seed=2, t_index_list=args.t_index_list or "", reset=True,
        settings=settings.out(0))
    g.node("SaveImage", images=sampler.out(0), filename_prefix="streamrt_demo/frame")
    created = g.node("CreateVideo", images=sampler.out(0), fps=parts.out(2))
    g.node("SaveVideo", video=created.out(0), filename_prefix="streamrt_demo/video", format="mp4", codec="h264")
    return g


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a diffusers model folder (default: a tiny random-weight model)")
    parser.add_argument("--taesd", help="an AutoencoderTiny (TAESD) diffusers folder (optional)")
    parser.add_argument("--frames", type=int, default=48, help="frames in the input video")
    parser.add_argument("--size", type=int, default=None, help="frame size (default 512 with --model, else 128)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps in flight (default 2)")
    parser.add_argument("--strength", type=float, default=0.36, help="how much each frame changes (default 0.36)")
    parser.add_argument("--t-index-list", default=None, help="explicit LCM indices, e.g. 32,45 (replaces "
                                                             "--steps and --strength)")
    parser.add_argument("--prompt", default="a watercolor painting of a planet, vivid colors")
    parser.add_argument("--acceleration", default="auto", choices=[a.value for a in Acceleration],
                        help="how the stream runs (default: auto, the fastest path ready on this machine)")
    parser.add_argument("--cached-attention", action="store_true", help="attend to earlier frames (StreamV2V)")
    parser.add_argument("--out", default=str(REPO / "out" / "demo"), help="work folder (models, input, output)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch
    work = Path(args.out).resolve()
    size = args.size or (512 if args.model else 128)
    models = work / "models"
    (models / "diffusers").mkdir(parents=True, exist_ok=True)
    (models / "vae_approx").mkdir(parents=True, exist_ok=True)
    taesd = "none (full VAE)"
    if args.model:
        name = Path(args.model).name
        link = models / "diffusers" / name
        if not link.exists():
            link.symlink_to(Path(args.model).resolve(), target_is_directory=True)
        if args.taesd:
            taesd = Path(args.taesd).name
            tlink = models / "vae_approx" / taesd
            if not tlink.exists():
                tlink.symlink_to(Path(args.taesd).resolve(), target_is_directory=True)
    else:
        name = TINY_NAME
        if not (models / "diffusers" / name / "model_index.json").is_file():
            from streamrt.random_models import write_random_pipeline

            logger.info("building a tiny random-weight model (no download; its images are noise-like)")
            write_random_pipeline(models / "diffusers" / name, "tiny",
                                  taesd_folder=models / "vae_approx" / "streamrt-tiny-taesd")
        taesd = "streamrt-tiny-taesd"
    (work / "input").mkdir(parents=True, exist_ok=True)
    make_input_video(work / "input" / "streamrt_demo_input.mp4", args.frames, size)
    shutil.rmtree(work / "out" / "streamrt_demo", ignore_errors=True)

    with ComfyServer(REPO, work, pack_name="StreamRT", cpu=not torch.cuda.is_available(),
                     database_url=f"sqlite:///{work}/comfy.db") as server:
        ws = server.websocket(server.client_id)
        try:
            started = time.perf_counter()
            server.run(build_graph(name, taesd, args), timeout=1800)
            wall = time.perf_counter() - started
            status = ws.of_type("streamrt.status")
        finally:
            ws.close()
    frames = sorted((work / "out" / "streamrt_demo").glob("frame_*.png"))
    videos = sorted((work / "out" / "streamrt_demo").glob("video*.mp4"))
    print(f"model: {name}{'  <- random weights: the frames are noise-like' if not args.model else ''}")
    print(f"device: {'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    print(f"frames written: {len(frames)} to {work / 'out' / 'streamrt_demo'}")
    print(f"video: {videos[0] if videos else 'none'}")
    if status:
        last = status[-1]
        print(f"stream: {last['frames']} frames at {size}x{size} in {last['seconds']:.2f} s = "
              f"{last['fps']:.1f} fps ({last['ms_per_frame']:.1f} ms/frame, acceleration {last['backend']})")
    print(f"whole prompt incl. server-side loading and video I/O: {wall:.1f} s")
    return 0 if frames and status else 1


if __name__ == "__main__":
    sys.exit(main())
