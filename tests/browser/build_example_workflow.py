"""Regenerate the example workflows (example_workflows/*.json) with the real ComfyUI frontend.

Each graph is built in the browser page (LiteGraph.createNode, connect) and saved with the frontend's
own ``app.graph.serialize()``, so widgets_values have exactly the order and the extra entries (e.g.
LoadVideo's "upload" button) that this frontend writes. Run it again
when a node's inputs change; tests/test_browser_e2e.py and tests/test_example_workflows.py fail while a
saved file no longer matches the node definitions.

    .venv/bin/python tests/browser/build_example_workflow.py            # all examples, own server
    .venv/bin/python tests/browser/build_example_workflow.py --workflow batch_video
    .venv/bin/python tests/browser/build_example_workflow.py --url http://127.0.0.1:8188

Examples (``--workflow``): ``realtime`` ("Realtime webcam (StreamRT).json": Stream Frame Input (the browser's
camera) -> Realtime Sampler -> Stream Preview), ``batch_video`` ("Batch video (StreamRT).json": LoadVideo ->
GetVideoComponents -> Realtime Sampler (with Stream Settings; pipeline and prompts from Load Checkpoint -> Stream
Pipeline from Model and CLIP Text Encode) -> SaveImage and CreateVideo -> SaveVideo) and ``engine_build``
("TensorRT engines (StreamRT).json": Load Stream Pipeline -> Build Engines -> Realtime Sampler, one Stream Settings
node into both (the engines' shapes), fed by Stream Frame Input) and ``controlnet`` ("ControlNet webcam
(StreamRT).json": Stream Frame Input -> Canny -> Apply ControlNet (Advanced) on CLIP Text Encode's conditioning, Load
Checkpoint -> Stream Pipeline from Model -> Realtime Sampler -> Stream Preview). The file names are the titles
ComfyUI's template browser shows.

Thumbnails (``<name>.jpg`` beside each file, what the template browser shows) are screenshots of these graphs:
tests/browser/make_thumbnails.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
for p in (str(REPO), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from browser.page import ComfyPage, prepare_user_settings  # noqa: E402

EXAMPLES_DIR = REPO / "example_workflows"

# ---------------------------------------------------------------------------------------------------
# Realtime webcam (StreamRT).json

OUTPUT = EXAMPLES_DIR / "Realtime webcam (StreamRT).json"
WORKFLOW_ID = "5f0c1d2e-7a3b-4c8d-9e6f-1a2b3c4d5e6f"

NOTE = """Realtime webcam -> StreamRT

1. Put a Stable Diffusion 1.x / 2.x model in models/diffusers (a diffusers folder, e.g. sd-turbo) or in \
models/checkpoints (one file), and optionally TAESD in models/vae_approx (ComfyUI's taesd_encoder / \
taesd_decoder files, listed as taesd). Pick them in "Load Stream Pipeline".
2. Press "▶ Stream" on the Realtime Sampler, and allow the camera when the browser asks (open ComfyUI on \
localhost, or over https). Queueing switches on the camera of Stream Frame Input ("● Camera" does it by \
hand); "▶ Stream" switches on the instant queue ("Run (Instant)"), so the workflow is queued again each time \
the queue is empty, until "■ Stop", Cancel, or an error. Stream Preview shows each new frame, sent over the \
websocket: nothing is written to disk (to keep frames, connect a Save Image node to the sampler as well). \
The sampler shows the loop's real rate, its own fps and ms per frame, the frames of the stream, what runs it \
and the state (cold / warming / streaming / reset). Only the newest entries of the loop stay in the queue \
history.

The camera posts its frames to the server, which keeps the newest one in memory (no file per frame); each \
execution takes the next new frame (wait_for_new), so the stream runs at the camera's rate. Other programs \
can feed the same node: POST a JPEG or PNG to /streamrt/frames/webcam (the node's source name).

steps (denoising steps in flight) and strength (how much each frame changes) set the look; a CONDITIONING \
(CLIP Text Encode) can replace the prompt texts through positive / negative. Without settings the sampler \
runs acceleration auto: the fastest path ready on this machine (TensorRT engines built for this size, else \
a CUDA graph on an NVIDIA GPU, else plain PyTorch), and shows which. For compile (faster still on a GPU \
after a first run that compiles for a minute or more), another size or cfg type, connect a "Stream \
Settings (StreamRT)" node to the sampler's settings input. Keep reset off while streaming (it restarts the \
stream on every frame); turn it on for one run to restart."""

#: what the example sets, per node; everything else keeps the node's defaults
VALUES = {
    "StreamRTFrameInput": {"source": "webcam", "width": 512, "height": 512},
    "StreamRTLoadPipeline": {"model": "sd-turbo", "taesd": "taesd", "dtype": "auto", "device": "auto"},
    "StreamRTSampler": {"prompt": "a watercolor portrait, soft light, vivid colors",
                        "negative_prompt": "blurry, low quality, distorted"},
    "StreamRTPreview": {"max_size": 0},
}

#: shared start of every build script: arguments, an empty graph, and add(type, pos, size) which sets
#: the values of VALUES[type] on the new node's widgets (by name)
_ADD_JS = """
const [values, note, texts] = arguments;
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
"""

#: shared end: view at the origin, redraw, and the frontend's own serialization
_SAVE_JS = """
app.canvas.ds.offset = [0, 0];
app.canvas.ds.scale = 1;
app.graph.setDirtyCanvas(true, true);
await new Promise(r => setTimeout(r, 500));
return JSON.stringify(app.graph.serialize());
"""

BUILD_JS = _ADD_JS + """
const cam = add("StreamRTFrameInput", [40, 60], [330, 440]);
const load = add("StreamRTLoadPipeline", [40, 560], [330, 130]);
const sampler = add("StreamRTSampler", [410, 60], [400, 0]);
const view = add("StreamRTPreview", [850, 60], [520, 480]);
const text = add("Note", [40, 780], [330, 470]);
text.widgets[0].value = note;
text.title = "How to use";
cam.connect(0, sampler, "image");
load.connect(0, sampler, "pipeline");
sampler.connect(0, view, "images");
""" + _SAVE_JS

# ---------------------------------------------------------------------------------------------------
# Batch video (StreamRT).json

BATCH_OUTPUT = EXAMPLES_DIR / "Batch video (StreamRT).json"
BATCH_WORKFLOW_ID = "9b4e2a71-3c5d-4f8e-a1b2-6c7d8e9f0a1b"

#: LoadVideo's file: a placeholder. The frontend keeps a combo value that is not among the options (no
#: such file in input/) as it is; left unset, a LoadVideo with no video files would save "undefined".
BATCH_VIDEO_FILE = "input.mp4"

#: Load Checkpoint's file: a placeholder the frontend keeps (sd-turbo as one file in models/checkpoints)
BATCH_CHECKPOINT = "sd_turbo.safetensors"

BATCH_NOTE = """Batch video -> StreamRT, from the checkpoint you already use

Batch video mode: one queue runs the whole clip. Load Video -> Get Video Components hands all frames \
to the Realtime Sampler as one batch; it streams them through in a single execution and returns exactly \
as many frames as came in, aligned with the input (output frame k belongs to input frame k: the stream \
is flushed at the end). Save Image writes every frame (output/streamrt/frame_*.png); Create Video + \
Save Video write an mp4 at the input's fps (output/streamrt/video_*.mp4). Press Run once; the \
sampler's "▶ Stream" toggle (re-queue until stopped) is for the realtime webcam example.

1. Put the clip into ComfyUI's input folder (or use Load Video's upload button) and pick it in "file" \
(input.mp4 is a placeholder). With Stream Settings' width/height 0 the stream keeps the video's size, \
which must then be a multiple of 8; set them to resize every frame to that size. All frames are decoded \
into memory at once.
2. Models: Load Checkpoint takes a Stable Diffusion 1.x / 2.x checkpoint from models/checkpoints (e.g. \
sd_turbo.safetensors, a placeholder here). Stream Pipeline from Model converts its MODEL, CLIP and VAE \
once (LoRA loaders in between are applied). For a much faster encode/decode connect Load VAE 'taesd' \
(taesd_encoder / taesd_decoder in models/vae_approx) instead of the checkpoint's VAE. The prompts come \
from CLIP Text Encode, as for KSampler. (Load Stream Pipeline is the other way in: a diffusers folder \
from models/diffusers or a checkpoint, with TAESD and LoRAs on the node.)
3. acceleration (Stream Settings): auto takes the fastest path ready here: TensorRT engines built for \
this size, else cuda_graph on an NVIDIA GPU (the whole frame captured once and replayed), else eager \
(plain PyTorch, e.g. on the CPU); the sampler shows which. compile (torch.compile + CUDA graph) is \
faster still; its first run compiles for a minute or more.
4. Throughput: set frames_per_step to 4 (Stream Settings) to process 4 frames per stream step (more fps \
on a GPU); the clip's frame count must then be a multiple of 4. steps and strength on the sampler set how \
much each frame changes.

reset is on, so every queue starts a fresh stream (the same clip gives the same frames); turn it off to \
carry the stream on from the previous clip."""

#: the texts of the CLIP Text Encode nodes, by node title
BATCH_TEXTS = {"Prompt": "a watercolor painting, soft light, vivid colors",
               "Negative prompt": "blurry, low quality, distorted"}

#: what the batch example sets, per node; everything else keeps the node's defaults
BATCH_VALUES = {
    "LoadVideo": {"file": BATCH_VIDEO_FILE},
    "CheckpointLoaderSimple": {"ckpt_name": BATCH_CHECKPOINT},
    "StreamRTPipelineFromModel": {"dtype": "auto"},
    "StreamRTSampler": {"reset": True},
    "StreamRTSettings": {"frames_per_step": 1, "acceleration": "auto"},
    "SaveImage": {"filename_prefix": "streamrt/frame"},
    "SaveVideo": {"filename_prefix": "streamrt/video", "format": "mp4", "codec": "h264"},
}

BATCH_BUILD_JS = _ADD_JS + """
const video = add("LoadVideo", [40, 60], [330, 330]);
const parts = add("GetVideoComponents", [40, 440], [330, 0]);
const ckpt = add("CheckpointLoaderSimple", [40, 580], [330, 0]);
const positive = add("CLIPTextEncode", [410, 60], [400, 160]);
const negative = add("CLIPTextEncode", [410, 260], [400, 160]);
positive.title = "Prompt";
negative.title = "Negative prompt";
for (const node of [positive, negative]) node.widgets.find(w => w.name === "text").value = texts[node.title];
const pipe = add("StreamRTPipelineFromModel", [40, 740], [330, 0]);
const sampler = add("StreamRTSampler", [850, 60], [400, 0]);
const settings = add("StreamRTSettings", [850, 720], [400, 0]);
const save = add("SaveImage", [1290, 60], [440, 420]);
const create = add("CreateVideo", [1290, 540], [300, 0]);
const saveVideo = add("SaveVideo", [1630, 540], [420, 420]);
const text = add("Note", [40, 900], [330, 560]);
text.widgets[0].value = note;
text.title = "How to use";
video.connect(0, parts, "video");
parts.connect(0, sampler, "image");
ckpt.connect(0, pipe, "model");
ckpt.connect(1, pipe, "clip");
ckpt.connect(2, pipe, "vae");
ckpt.connect(1, positive, "clip");
ckpt.connect(1, negative, "clip");
positive.connect(0, sampler, "positive");
negative.connect(0, sampler, "negative");
pipe.connect(0, sampler, "pipeline");
settings.connect(0, sampler, "settings");
sampler.connect(0, save, "images");
sampler.connect(0, create, "images");
parts.connect(2, create, "fps");  // the input's frame rate (a widget input, linked)
create.connect(0, saveVideo, "video");
""" + _SAVE_JS


# ---------------------------------------------------------------------------------------------------
# TensorRT engines (StreamRT).json

ENGINE_OUTPUT = EXAMPLES_DIR / "TensorRT engines (StreamRT).json"
ENGINE_WORKFLOW_ID = "9b2e4c61-3f7a-4d2b-8c1e-5a6f7b8c9d0e"

ENGINE_NOTE = """TensorRT engines -> StreamRT (realtime webcam)

1. Install a backend into ComfyUI's Python: pip install tensorrt-rtx (RTX 20xx-50xx GPUs; it can also build on \
a machine without a GPU for a chosen target) or pip install tensorrt (full TensorRT, builds for the local GPU); \
polygraphy comes with StreamRT's requirements.
2. Queue once: 'Build Engines' exports the UNet and the VAE encoder/decoder to ONNX and builds fp16 engines \
for the stream the sampler runs: the shapes come from the Stream Settings node connected to both (512x512, \
frames_per_step 1, cfg_type self) and Build Engines' steps, which must be the sampler's steps. The sampler \
resizes the webcam's frames to the settings' width x height. Engines go to models/streamrt_engines. The SD UNet \
takes minutes; the report (shown in Preview as Text and on the node) says what was built or reused and where. \
Later queues reuse the engines in milliseconds.
3. acceleration 'auto' (Stream Settings) runs the UNet/VAE through the engines that match the stream's size \
and batch on this GPU, and PyTorch (a CUDA graph) where none does; the sampler shows on its node which parts run \
on engines and why others do not (e.g. TensorRT-RTX does not run on Hopper/data-centre GPUs). Set it to \
'tensorrt' to get an error instead when no engine fits.

min_size/max_size build engines for a range of sizes instead. Engines already built: use 'Load Engines' \
between Load Stream Pipeline and the sampler instead of Build Engines; it lists the cached engines of the \
model."""

#: what the engine example sets, per node; everything else keeps the node's defaults
ENGINE_VALUES = {
    "StreamRTFrameInput": {"source": "webcam", "width": 512, "height": 512},
    "StreamRTLoadPipeline": {"model": "sd-turbo", "taesd": "taesd", "dtype": "auto", "device": "auto"},
    "StreamRTBuildEngines": {"steps": 2, "width": 0, "height": 0, "components": "unet + vae"},
    "StreamRTSettings": {"width": 512, "height": 512, "frames_per_step": 1, "cfg_type": "self",
                         "acceleration": "auto"},
    "StreamRTSampler": {"prompt": "a watercolor portrait, soft light, vivid colors",
                        "negative_prompt": "blurry, low quality, distorted", "steps": 2},
}

ENGINE_BUILD_JS = _ADD_JS + """
const load = add("StreamRTLoadPipeline", [40, 60], [330, 154]);
const cam = add("StreamRTFrameInput", [40, 300], [330, 440]);
const settings = add("StreamRTSettings", [410, 60], [360, 0]);
const build = add("StreamRTBuildEngines", [410, 400], [360, 0]);
const report = add("PreviewAny", [410, 820], [560, 260]);
const sampler = add("StreamRTSampler", [810, 60], [400, 0]);
const preview = add("PreviewImage", [1250, 60], [520, 560]);
const text = add("Note", [40, 780], [330, 560]);
text.widgets[0].value = note;
text.title = "How to use";
load.connect(0, build, "pipeline");
settings.connect(0, build, "settings");
build.connect(0, sampler, "pipeline");
build.connect(1, report, "source");
cam.connect(0, sampler, "image");
settings.connect(0, sampler, "settings");
sampler.connect(0, preview, "images");
""" + _SAVE_JS


# ---------------------------------------------------------------------------------------------------
# ControlNet webcam (StreamRT).json

CONTROL_OUTPUT = EXAMPLES_DIR / "ControlNet webcam (StreamRT).json"
CONTROL_WORKFLOW_ID = "c3a8e5f1-6b2d-4e9a-8f7c-2d1e0b9a8c7d"

#: placeholders the frontend keeps (an SD1.5 checkpoint for few steps and a ControlNet for it)
CONTROL_CHECKPOINT = "sd15_lcm.safetensors"
CONTROL_NET_FILE = "control_v11p_sd15_canny_fp16.safetensors"

CONTROL_NOTE = """Realtime webcam -> Canny -> ControlNet -> StreamRT

The stream follows the edges of what the camera sees: every frame's own Canny image conditions that frame, \
at every denoising step it goes through (the stream keeps each frame's control image with it).

1. Models: Load Checkpoint takes a Stable Diffusion 1.x checkpoint made for few steps (an LCM or turbo \
checkpoint, or SD1.5 with LCM-LoRA through a LoraLoader between Load Checkpoint and Stream Pipeline from \
Model); sd15_lcm.safetensors is a placeholder. Load ControlNet Model takes a ControlNet for that family from \
models/controlnet (single file or diffusers layout; a canny one here). SDXL checkpoints take SDXL ControlNets.
2. Apply ControlNet (Advanced) works as with KSampler: strength is applied live (changing it keeps the stream \
going; 0 runs no ControlNet at all), start/end select which of the stream's few steps get the control. Chain \
several Apply ControlNet nodes to use several ControlNets. Any preprocessor's IMAGE works in place of Canny.
3. Press "▶ Stream" on the Realtime Sampler (as in the Realtime webcam example). The control image is resized \
to the stream's size like the frames.

acceleration auto runs a CUDA graph on an NVIDIA GPU (ControlNet inside the captured step); compile (Stream \
Settings) is faster: on an H200 one ControlNet costs about 1.36x the plain step."""

#: what the ControlNet example sets, per node; everything else keeps the node's defaults
CONTROL_VALUES = {
    "StreamRTFrameInput": {"source": "webcam", "width": 512, "height": 512},
    "CheckpointLoaderSimple": {"ckpt_name": CONTROL_CHECKPOINT},
    "ControlNetLoader": {"control_net_name": CONTROL_NET_FILE},
    "ControlNetApplyAdvanced": {"strength": 0.8, "start_percent": 0.0, "end_percent": 1.0},
    "StreamRTPipelineFromModel": {"dtype": "auto"},
    "StreamRTPreview": {"max_size": 0},
}

#: the texts of the CLIP Text Encode nodes, by node title
CONTROL_TEXTS = {"Prompt": "a marble statue in a museum, soft light, detailed",
                 "Negative prompt": "blurry, low quality, distorted"}

CONTROL_BUILD_JS = _ADD_JS + """
const cam = add("StreamRTFrameInput", [40, 60], [330, 440]);
const canny = add("Canny", [40, 560], [330, 0]);
const ckpt = add("CheckpointLoaderSimple", [40, 720], [330, 0]);
const positive = add("CLIPTextEncode", [410, 60], [400, 160]);
const negative = add("CLIPTextEncode", [410, 260], [400, 160]);
positive.title = "Prompt";
negative.title = "Negative prompt";
for (const node of [positive, negative]) node.widgets.find(w => w.name === "text").value = texts[node.title];
const netLoader = add("ControlNetLoader", [410, 460], [400, 0]);
const apply = add("ControlNetApplyAdvanced", [410, 580], [400, 0]);
const pipe = add("StreamRTPipelineFromModel", [410, 820], [400, 0]);
const sampler = add("StreamRTSampler", [850, 60], [400, 0]);
const view = add("StreamRTPreview", [1290, 60], [520, 480]);
const text = add("Note", [40, 880], [330, 560]);
text.widgets[0].value = note;
text.title = "How to use";
cam.connect(0, canny, "image");
cam.connect(0, sampler, "image");
ckpt.connect(0, pipe, "model");
ckpt.connect(1, pipe, "clip");
ckpt.connect(2, pipe, "vae");
ckpt.connect(1, positive, "clip");
ckpt.connect(1, negative, "clip");
positive.connect(0, apply, "positive");
negative.connect(0, apply, "negative");
netLoader.connect(0, apply, "control_net");
canny.connect(0, apply, "image");
apply.connect(0, sampler, "positive");
apply.connect(1, sampler, "negative");
pipe.connect(0, sampler, "pipeline");
sampler.connect(0, view, "images");
""" + _SAVE_JS


# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    output: Path
    workflow_id: str
    build_js: str
    values: dict = field(default_factory=dict)
    note: str = ""
    #: the text widget of nodes of one type that differ (CLIP Text Encode), by node title
    texts: dict = field(default_factory=dict)


EXAMPLES: dict[str, Example] = {
    "realtime": Example(OUTPUT, WORKFLOW_ID, BUILD_JS, VALUES, NOTE),
    "batch_video": Example(BATCH_OUTPUT, BATCH_WORKFLOW_ID, BATCH_BUILD_JS, BATCH_VALUES, BATCH_NOTE, BATCH_TEXTS),
    "engine_build": Example(ENGINE_OUTPUT, ENGINE_WORKFLOW_ID, ENGINE_BUILD_JS, ENGINE_VALUES, ENGINE_NOTE),
    "controlnet": Example(CONTROL_OUTPUT, CONTROL_WORKFLOW_ID, CONTROL_BUILD_JS, CONTROL_VALUES, CONTROL_NOTE,
                          CONTROL_TEXTS),
}


def build_on_page(page: ComfyPage, name: str = "realtime") -> dict:
    """Build one example on an open page; return the workflow as it is saved."""
    example = EXAMPLES[name]
    workflow = json.loads(page.js_async(example.build_js, example.values, example.note, example.texts))
    workflow["id"] = example.workflow_id
    workflow.setdefault("extra", {})["ds"] = {"offset": [0, 0], "scale": 1}
    for node in workflow["nodes"]:
        node["pos"] = [round(v) for v in node["pos"]]
        node["size"] = [round(v) for v in node["size"]]
    return workflow


def build(base_url: str, name: str = "realtime") -> dict:
    with ComfyPage.open(base_url) as page:
        return build_on_page(page, name)


def build_all(base_url: str, names: list[str]) -> dict[str, dict]:
    with ComfyPage.open(base_url) as page:
        return {name: build_on_page(page, name) for name in names}


@contextlib.contextmanager
def tiny_model_server(prefix: str, **settings: Any) -> Iterator[str]:
    """A ComfyUI server with StreamRT and a tiny random model in a temporary folder, its user settings prepared
    (``settings`` as :func:`prepare_user_settings` takes them); yields its URL."""
    from comfy_harness import ComfyServer

    from streamrt.random_models import write_random_pipeline

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        models = Path(tmp) / "models"
        write_random_pipeline(models / "diffusers" / "tiny-sd", "tiny",
                              taesd_folder=models / "vae_approx" / "tiny-taesd")
        with ComfyServer(REPO, Path(tmp) / "work", pack_name="StreamRT", models_source=models) as server:
            prepare_user_settings(server.user_dir, **settings)
            yield server.base_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running ComfyUI with StreamRT (default: start one with tiny models)")
    parser.add_argument("--workflow", choices=[*EXAMPLES, "all"], default="all", help="which example (default: all)")
    parser.add_argument("--output", type=Path, help="where to write (one --workflow only; default: its file in "
                                                    "example_workflows/)")
    args = parser.parse_args(argv)
    names = list(EXAMPLES) if args.workflow == "all" else [args.workflow]
    if args.output is not None and len(names) != 1:
        parser.error("--output needs one --workflow")
    if args.url:
        workflows = build_all(args.url, names)
    else:
        with tiny_model_server("streamrt-example-") as url:
            workflows = build_all(url, names)
    for name, workflow in workflows.items():
        output = args.output or EXAMPLES[name].output
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(workflow, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
