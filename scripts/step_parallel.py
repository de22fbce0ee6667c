"""Realtime frames per second of one stream on one GPU and of the same stream with its steps split over two GPUs
(issue #18's step-parallel stream, ``streamrt.stages.StagedStream``), one process, same run.

SD-turbo-sized UNet (random weights), TAESD, fp16, 512x512, t_index_list 32,45 (2 steps), cfg self, F = 1: each
call hands one CPU frame in and takes its result back (``Stream.step``, what one ComfyUI execution does). Per row:
frames per second on cuda:0 alone and over cuda:0 + cuda:1, the speed-up, each stage's GPU time per call, the
largest difference between the two outputs once the pipeline has filled, and the CUDA allocations of the staged
calls on each GPU (zero expected). Timed in rounds, one GPU and two GPUs alternating; medians::

    python scripts/step_parallel.py --frames 300 --accelerations cuda_graph,compile --out /tmp/steps.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

logger = logging.getLogger("step_parallel")


def main() -> None:
    import torch

    from streamrt import Stream, StreamConfig
    from streamrt.parallel import replicate
    from streamrt.random_models import random_stream_models
    from streamrt.stages import StagedStream

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--accelerations", default="cuda_graph,compile")
    p.add_argument("--steps", default="32,45", help="t_index_list rows, ';' between rows (e.g. '32,45;16,32,45')")
    p.add_argument("--cfg-types", default="self")
    p.add_argument("--frames-per-step", default="1", help="F values, comma-separated")
    p.add_argument("--rounds", type=int, default=3,
                   help="timed rounds of --frames calls, one GPU and two GPUs alternating; the medians are reported")
    p.add_argument("--profile", action="store_true",
                   help="where the host's time goes in 50 realtime calls of each (torch.profiler, CPU and CUDA "
                        "activity; the table is kept in the row)")
    p.add_argument("--trace", default=None, help="with --profile: a folder for each profile's chrome trace")
    p.add_argument("--out")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs two GPUs")
    models = random_stream_models("sd-turbo", dtype=torch.float16, device="cuda:0")
    # the one-GPU stream and the first stage share the pipeline on cuda:0 (compiled per batch shape: dynamic=False)
    baseline_models = models
    stage_models = [models, replicate(models, "cuda:1")]
    names = [torch.cuda.get_device_name(i) for i in range(2)]
    frames = torch.rand(args.frames, 512, 512, 3)

    def realtime_s(stream, f: int) -> tuple[float, torch.Tensor]:
        out = torch.empty(args.frames, 512, 512, 3)
        for k in range(8):  # warm (capture, compile) and settle
            stream.step(frames[k * f:(k + 1) * f])
        stream.reset()
        start = time.perf_counter()
        for k in range(args.frames // f):
            out[k * f:(k + 1) * f] = stream.step(frames[k * f:(k + 1) * f])
        return time.perf_counter() - start, out

    def gpu_ms(streams, f: int, calls: int = 40) -> list[float]:
        """Median GPU time of one call of each stream (a Stream, or a stage of a staged one) alone."""
        times: list[list[float]] = [[] for _ in streams]
        for _ in range(calls):
            for index, stream in enumerate(streams):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.device(stream.device):
                    start.record()
                    stream._call(frames[:f] if stream.stage.is_first else None)
                    end.record()
                end.synchronize()
                times[index].append(start.elapsed_time(end))
        for stream in streams:
            stream.reset()
        return [round(statistics.median(t), 3) for t in times]

    def allocations(device: int) -> int:
        return int(torch.cuda.memory_stats(device)["allocation.all.allocated"])

    rows = []
    combos = [(a, s, c, int(f)) for a in args.accelerations.split(",") for s in args.steps.split(";")
              for f in args.frames_per_step.split(",") for c in args.cfg_types.split(",")]
    for acceleration, steps, cfg_type, f in combos:
        t_index = tuple(int(t) for t in steps.split(","))
        config = StreamConfig(width=512, height=512, t_index_list=t_index, cfg_type=cfg_type,
                              guidance_scale=1.2, acceleration=acceleration, frames_per_step=f)
        one = Stream(baseline_models, config, prompt="a watercolor painting")
        staged = StagedStream(stage_models, config, prompt="a watercolor painting")
        realtime_s(one, f)  # warm (capture, compile)
        realtime_s(staged, f)
        one_times, staged_times = [], []
        before = [allocations(i) for i in range(2)]
        for _ in range(args.rounds):  # alternating: a slow spell of the machine hits both
            one_s, one_out = realtime_s(one, f)
            staged_s, staged_out = realtime_s(staged, f)
            one_times.append(one_s)
            staged_times.append(staged_s)
        grown = [allocations(i) - before[i] for i in range(2)]  # the one-GPU stream's on cuda:0 too: none expected
        one_s, staged_s = statistics.median(one_times), statistics.median(staged_times)
        filled = staged.latency * f
        rows.append({
            "acceleration": acceleration, "t_index_list": list(t_index), "cfg_type": cfg_type,
            "frames_per_step": f, "frames": args.frames, "gpu_names": names,
            "one_gpu_ms": round(1000 * one_s / args.frames, 3),
            "two_gpu_ms": round(1000 * staged_s / args.frames, 3),
            "one_gpu_fps": round(args.frames / one_s, 1), "two_gpu_fps": round(args.frames / staged_s, 1),
            "speedup": round(one_s / staged_s, 2),
            "speedup_per_round": [round(a / b, 2) for a, b in zip(one_times, staged_times)],
            "stages": [[s.first, s.end] for s in staged.plan], "one_gpu_call_ms": gpu_ms([one], f)[0],
            "stage_gpu_call_ms": gpu_ms(staged.stages, f),
            "max_abs_diff_filled": float((one_out[filled:] - staged_out[filled:]).abs().max()),
            "allocations_per_gpu": grown})
        logger.info("%s", rows[-1])
        if args.profile:
            rows[-1]["host_profile"] = {}
            for label, stream in (("one GPU", one), ("two GPUs", staged)):
                sink = torch.empty(f, 512, 512, 3)
                activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                with torch.profiler.profile(activities=activities) as prof:
                    for k in range(50):
                        sink.copy_(stream.step(frames[k * f:(k + 1) * f]))
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
                rows[-1]["host_profile"][label] = table  # kept with the row, not only logged
                logger.info("host profile, %s:\n%s", label, table)
                if args.trace:  # the timeline of the 50 calls, for chrome://tracing or Perfetto
                    Path(args.trace).mkdir(parents=True, exist_ok=True)
                    name = f"{acceleration}_F{f}_{label.replace(' ', '_')}.json"
                    prof.export_chrome_trace(str(Path(args.trace) / name))
        if args.out:  # after every row: a run cut short keeps what it measured
            with open(args.out, "w", encoding="utf-8") as handle:
                json.dump(rows, handle, indent=1)
        one.close()
        staged.close()


if __name__ == "__main__":
    main()
