"""GPU time of a stream step with 0, 1 and 2 ControlNets (issue #16), one process, same random weights (GPU only).

SD-turbo-sized UNet (random weights), an SD-sized ControlNet (``ControlNetModel.from_unet``, random), TAESD,
fp16, 512x512, ``cuda_graph``; each row times N frames of ``process_video`` after a warm-up and reports ms per
frame and the ratio to the plain stream of the same steps::

    python scripts/controlnet_step.py --frames 100 --out /tmp/cn.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time

logger = logging.getLogger("controlnet_step")


def main() -> None:
    import torch
    from diffusers import ControlNetModel

    from streamrt import Stream, StreamConfig
    from streamrt.controlnet import ControlNet
    from streamrt.random_models import random_stream_models

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--acceleration", default="cuda_graph")
    p.add_argument("--out")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device, dtype = torch.device("cuda"), torch.float16
    models = random_stream_models("sd-turbo", dtype=dtype, device=device)
    nets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(models.unet, load_weights_from_unet=False)
        nets.append(torch.nn.Module.to(net, device=device, dtype=dtype).eval().requires_grad_(False))
    video = torch.rand(args.frames, 512, 512, 3)
    control = torch.rand(args.frames, 512, 512, 3)
    rows = []
    for t_index in ((32,), (32, 45)):
        plain_ms = None
        for count in (0, 1, 2):
            config = StreamConfig(width=512, height=512, t_index_list=t_index, cfg_type="self", guidance_scale=1.2,
                                  acceleration=args.acceleration)
            stream = Stream(models, config, prompt="a cat", controlnets=[ControlNet(n, 0.8) for n in nets[:count]])
            kwargs = {"control": [control] * count} if count else {}
            stream.process_video(video[:8], **({"control": [control[:8]] * count} if count else {}))
            torch.cuda.synchronize()
            start = time.perf_counter()
            stream.process_video(video, **kwargs)
            ms = 1000 * (time.perf_counter() - start) / args.frames
            plain_ms = plain_ms if count else ms
            rows.append({"steps": list(t_index), "controlnets": count, "ms_per_frame": round(ms, 2),
                         "vs_plain": round(ms / plain_ms, 2), "gpu": torch.cuda.get_device_name(),
                         "acceleration": args.acceleration})
            logger.info("%s", rows[-1])
            stream.close()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
