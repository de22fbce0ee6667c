"""Frames per second of a batch video on one GPU and split over every GPU of the machine (issue #18), one process.

SD-turbo-sized UNet (random weights), TAESD, fp16, 512x512, 1 step (t_index 32), cfg none, N frames: one stream on
cuda:0 runs the whole clip; then one stream per GPU, each on its own copy of the pipeline, runs one contiguous
chunk (``streamrt.parallel.process_video_parallel``). Every stream is warmed up (captured / compiled) first; with
``--rounds R`` one GPU and the split alternate R times and the rows give medians (and each round's speed-up).
Rows report frames per second, the speed-up over one GPU and the largest difference between the two outputs
(of the first round)::

    python scripts/multi_gpu_video.py --frames 300 --accelerations cuda_graph,compile --rounds 3 --out /tmp/multi.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

logger = logging.getLogger("multi_gpu_video")


def main() -> None:
    import torch

    from streamrt import Stream, StreamConfig
    from streamrt.kv_cache import KVCacheConfig
    from streamrt.parallel import process_video_parallel, replicate
    from streamrt.random_models import random_stream_models

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--accelerations", default="cuda_graph,compile")
    p.add_argument("--cached-attention", action="store_true", help="also rows with cached attention (window 4)")
    p.add_argument("--rounds", type=int, default=1, help="alternating timed rounds (default 1); medians reported")
    p.add_argument("--out")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    gpus = torch.cuda.device_count()
    models = random_stream_models("sd-turbo", dtype=torch.float16, device="cuda:0")
    replicas = [models] + [replicate(models, f"cuda:{i}") for i in range(1, gpus)]
    video = torch.rand(args.frames, 512, 512, 3)
    names = [torch.cuda.get_device_name(i) for i in range(gpus)]
    variants = [("plain", {})]
    if args.cached_attention:
        variants.append(("cached attention 4", {"kv_cache": KVCacheConfig(enabled=True, max_frames=4, window=4)}))
    rows = []
    for acceleration in args.accelerations.split(","):
        for label, changes in variants:
            config = StreamConfig(width=512, height=512, t_index_list=(32,), cfg_type="none",
                                  acceleration=acceleration, **changes)
            streams = [Stream(m, config, prompt="a watercolor painting") for m in replicas]
            for stream in streams:  # capture / compile each, one at a time
                stream.process_video(video[:8])
            for i in range(gpus):
                torch.cuda.synchronize(i)
            one_times, split_times, first = [], [], None
            for _ in range(args.rounds):
                start = time.perf_counter()
                one = streams[0].process_video(video)
                one_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                split = process_video_parallel(streams, video)
                split_times.append(time.perf_counter() - start)
                if first is None:  # later rounds start from a state the first one left: compare the first
                    first = (one, split)
            one, split = first
            one_s, split_s = statistics.median(one_times), statistics.median(split_times)
            rows.append({"acceleration": acceleration, "variant": label, "frames": args.frames, "gpus": gpus,
                         "gpu_names": names, "rounds": args.rounds, "one_gpu_fps": round(args.frames / one_s, 1),
                         "split_fps": round(args.frames / split_s, 1), "speedup": round(one_s / split_s, 2),
                         "speedup_per_round": [round(a / b, 2) for a, b in zip(one_times, split_times)],
                         "max_abs_diff": float((one - split).abs().max()),
                         "identical": bool(torch.equal(one, split))})
            logger.info("%s", rows[-1])
            if args.out:  # after every row: a run cut short keeps what it measured
                with open(args.out, "w", encoding="utf-8") as f:
                    json.dump(rows, f, indent=1)
            for stream in streams:
                stream.close()


if __name__ == "__main__":
    main()
