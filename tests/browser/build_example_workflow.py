"""Regenerate example_workflows/realtime_webcam.json with the real ComfyUI frontend.

The graph is built in the browser page (LiteGraph.createNode, connect) and saved with the frontend's
own ``app.graph.serialize()``, so widgets_values have exactly the order and the extra entries (e.g.
WebcamCapture's "capture" button) that this frontend writes. Run it again when a node's inputs change;
tests/test_browser_e2e.py fails while the saved file no longer matches the node definitions.

    .venv/bin/python tests/browser/build_example_workflow.py            # starts its own server
    .venv/bin/python tests/browser/build_example_workflow.py --url http://127.0.0.1:8188
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
for p in (str(REPO), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from browser.page import ComfyPage, prepare_user_settings  # noqa: E402

OUTPUT = REPO / "example_workflows" / "realtime_webcam.json"
WORKFLOW_ID = "5f0c1d2e-7a3b-4c8d-9e6f-1a2b3c4d5e6f"

NOTE = """Realtime webcam -> StreamRT

1. Put a Stable Diffusion 1.x / 2.x model in models/diffusers (a diffusers folder, e.g. sd-turbo) or in \
models/checkpoints (one file), and optionally TAESD in models/vae_approx (ComfyUI's taesd_encoder / \
taesd_decoder files, listed as taesd). Pick them in "Load Stream Pipeline".
2. Allow the camera when the browser asks (open ComfyUI on localhost, or over https).
3. Press "▶ Stream" on the Stream Sampler: the workflow is queued again each time it finishes, until \
"■ Stop", Cancel, or an error. The sampler shows fps, ms per frame, the frames of the stream, the backend \
and the state (cold / warming / streaming / reset).

On an NVIDIA GPU set acceleration to cuda_graph (or compile) for far higher fps. Keep reset off while \
streaming (it restarts the stream on every frame); turn it on for one run to restart."""

#: what the example sets, per node; everything else keeps the node's defaults
VALUES = {
    "WebcamCapture": {"width": 512, "height": 384, "capture_on_queue": True},
    "StreamRTLoadPipeline": {"model": "sd-turbo", "taesd": "taesd", "dtype": "auto", "device": "auto"},
    "StreamRTSampler": {"prompt": "a watercolor portrait, soft light, vivid colors",
                        "negative_prompt": "blurry, low quality, distorted"},
}

BUILD_JS = """
const [values, note] = arguments;
app.graph.clear();
const add = (type, pos, size) => {
    const node = LiteGraph.createNode(type);
    if (!node) throw new Error(`node type ${type} is not registered`);
    app.graph.add(node);
    node.pos = pos;
    if (size) node.setSize([Math.max(size[0], node.size[0]), Math.max(size[1], node.size[1])]);
    for (const [name, value] of Object.entries(values[type] ?? {})) {
        const w = node.widgets.find(w => w.name === name);
        if (!w) throw new Error(`${type} has no widget ${name}`);
        w.value = value;
    }
    return node;
};
const cam = add("WebcamCapture", [40, 60], [330, 440]);
const load = add("StreamRTLoadPipeline", [40, 560], [330, 130]);
const sampler = add("StreamRTSampler", [410, 60], [400, 0]);
const preview = add("PreviewImage", [850, 60], [520, 560]);
const text = add("Note", [40, 780], [330, 400]);
text.widgets[0].value = note;
text.title = "How to use";
cam.connect(0, sampler, "image");
load.connect(0, sampler, "pipeline");
sampler.connect(0, preview, "images");
app.canvas.ds.offset = [0, 0];
app.canvas.ds.scale = 1;
app.graph.setDirtyCanvas(true, true);
await new Promise(r => setTimeout(r, 500));
return JSON.stringify(app.graph.serialize());
"""


def build(base_url: str) -> dict:
    with ComfyPage.open(base_url) as page:
        workflow = json.loads(page.js_async(BUILD_JS, VALUES, NOTE))
    workflow["id"] = WORKFLOW_ID
    workflow.setdefault("extra", {})["ds"] = {"offset": [0, 0], "scale": 1}
    for node in workflow["nodes"]:
        node["pos"] = [round(v) for v in node["pos"]]
        node["size"] = [round(v) for v in node["size"]]
    return workflow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running ComfyUI with StreamRT (default: start one with tiny models)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    if args.url:
        workflow = build(args.url)
    else:
        from comfy_harness import ComfyServer

        from streamrt.random_models import write_random_pipeline

        with tempfile.TemporaryDirectory(prefix="streamrt-example-") as tmp:
            models = Path(tmp) / "models"
            write_random_pipeline(models / "diffusers" / "tiny-sd", "tiny",
                                  taesd_folder=models / "vae_approx" / "tiny-taesd")
            with ComfyServer(REPO, Path(tmp) / "work", pack_name="StreamRT", models_source=models) as server:
                prepare_user_settings(server.user_dir)
                workflow = build(server.base_url)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(workflow, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
