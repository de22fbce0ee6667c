"""Make the template browser's thumbnails of the example workflows: a screenshot of each graph in the real frontend.

ComfyUI's template browser (frontend 1.32) lists a custom node pack's ``example_workflows/<name>.json`` by file name
and shows ``/api/workflow_templates/<pack>/<name>.jpg`` as its picture (a 404 shows a placeholder). This loads each
example into headless Chromium (tests/browser/page.py), fits the whole graph into a square, takes a screenshot of
that square (the canvas with its DOM widgets: notes and prompts included; the menus and the minimap kept out) and
writes it as ``<name>.jpg`` (512x512) beside the workflow. Run it again when an example changes;
tests/test_example_workflows.py checks that every example has one that the server serves.

    .venv/bin/python tests/browser/make_thumbnails.py                 # all examples, own server with tiny models
    .venv/bin/python tests/browser/make_thumbnails.py --url http://127.0.0.1:8188
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
for p in (str(REPO), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

from browser.page import ComfyPage  # noqa: E402

EXAMPLES_DIR = REPO / "example_workflows"
#: the thumbnail's file type and size: the frontend asks for ``<name>.jpg``; its cards are square
SUFFIX = ".jpg"
SIZE = 512
#: the square of the page the graph is fitted into (CSS pixels), clear of the menus at the top and the left
REGION = {"x": 80, "y": 110, "width": 1000, "height": 1000}
WINDOW = (1500, 1400)
#: no minimap over the canvas; full detail (widget text) at any zoom
SETTINGS = {"Comfy.Minimap.Visible": False, "LiteGraph.Canvas.MinFontSizeForLOD": 1}

FIT_JS = """
const [workflow, region] = arguments;
await app.loadGraphData(workflow);
const title = LiteGraph.NODE_TITLE_HEIGHT;
let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
for (const node of app.graph.nodes) {
    x0 = Math.min(x0, node.pos[0]); y0 = Math.min(y0, node.pos[1] - title);
    x1 = Math.max(x1, node.pos[0] + node.size[0]); y1 = Math.max(y1, node.pos[1] + node.size[1]);
}
const margin = 24;
const w = x1 - x0 + 2 * margin, h = y1 - y0 + 2 * margin;
const ds = app.canvas.ds;
const rect = app.canvas.canvas.getBoundingClientRect();
ds.scale = Math.min(region.width / w, region.height / h);
ds.offset = [(region.x + (region.width - w * ds.scale) / 2 - rect.left) / ds.scale - x0 + margin,
             (region.y + (region.height - h * ds.scale) / 2 - rect.top) / ds.scale - y0 + margin];
app.canvas.setDirty(true, true);
app.canvas.draw(true, true);
await new Promise(r => setTimeout(r, 800));  // DOM widgets follow the canvas on the next frames
app.canvas.draw(true, true);
await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
return app.graph.nodes.length;
"""


def thumbnail(page: ComfyPage, workflow: dict) -> bytes:
    """A JPEG of ``workflow``'s graph as the frontend draws it, fitted into a square."""
    import base64

    from PIL import Image

    page.js_async(FIT_JS, workflow, REGION)
    shot = page.driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "clip": {**REGION, "scale": 1}})
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    out = io.BytesIO()
    image.resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(out, format="JPEG", quality=88, optimize=True)
    return out.getvalue()


def make_all(base_url: str, files: list[Path]) -> dict[Path, bytes]:
    page = ComfyPage.launch(*WINDOW)
    try:
        page.goto(base_url)
        return {path: thumbnail(page, json.loads(path.read_text(encoding="utf-8"))) for path in files}
    finally:
        page.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running ComfyUI with StreamRT (default: start one with tiny models); set "
                                      "its user settings as SETTINGS says for the same pictures")
    args = parser.parse_args(argv)
    files = sorted(EXAMPLES_DIR.glob("*.json"))
    if args.url:
        shots = make_all(args.url, files)
    else:
        from browser.build_example_workflow import tiny_model_server

        with tiny_model_server("streamrt-thumbnails-", **SETTINGS) as url:
            shots = make_all(url, files)
    for path, data in shots.items():
        target = path.with_suffix(SUFFIX)
        target.write_bytes(data)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
