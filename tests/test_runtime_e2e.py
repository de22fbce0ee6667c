"""The runtime seam on the real ComfyUI server (CPU): two samplers sharing one pipeline, and switching acceleration.

On main d5c3959 a ``compile`` sampler replaced the shared pipeline's UNet and VAE with compiled modules, so an
``eager`` sampler fed from the same Load Stream Pipeline ran compiled from then on; and switching a sampler
between ``cuda_graph`` and ``compile`` kept the old stream. Here:

* an eager sampler's frames are bit-identical before and after a compile sampler on the same pipeline ran,
  and each sampler's status event says what ran it (``torch`` vs ``compiled`` parts);
* switching one sampler's acceleration (eager -> compile -> eager) builds a new stream each time: the
  status event's frame count starts again at 1.

torch.compile runs for real (inductor, on the CPU: about a minute the first time, cached on disk after),
so this module runs under one cache mode only (the first of $STREAMRT_CACHE_MODES, default ``default``).
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from comfy_harness import ComfyServer, Graph
from e2e_helpers import add_sampler
from stream_helpers import E2E_MODEL, E2E_TAESD, first_cache_mode

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("comfy_server", [first_cache_mode()], indirect=True)]

SIZE = 64
SAMPLER = dict(prompt="a lighthouse at dusk", negative_prompt="", t_index_list="20,35", guidance_scale=1.5, seed=3)


@pytest.fixture
def server(comfy_server: ComfyServer, e2e_tiny_models) -> ComfyServer:
    return comfy_server


@pytest.fixture
def image(server: ComfyServer) -> str:
    rng = np.random.default_rng(11)
    pixels = np.repeat(np.repeat(rng.integers(0, 256, (SIZE // 8, SIZE // 8, 3), dtype=np.uint8), 8, 0), 8, 1)
    return server.write_input_image(pixels, name=f"runtime_{uuid.uuid4().hex[:8]}.png")


def graph(tag: str, image: str, samplers: dict[str, dict]) -> Graph:
    """One Load Stream Pipeline feeding a sampler per entry of ``samplers`` (name -> inputs), each saved."""
    g = Graph(prefix=tag)
    load = g.node("StreamRTLoadPipeline", id=f"{tag}load", model=E2E_MODEL, taesd=E2E_TAESD, dtype="auto",
                  device="auto")
    frame = g.node("LoadImage", image=image).out(0)
    for name, inputs in samplers.items():
        sampler = add_sampler(g, load.out(0), id=f"{tag}{name}", image=frame, **dict(SAMPLER, **inputs))
        g.node("SaveImage", id=f"{tag}{name}-save", images=sampler.out(0), filename_prefix=f"{tag}/{name}")
    return g


def run(server: ComfyServer, g: Graph, ws) -> tuple[dict, dict]:
    """Run a graph; the saved frame and the status event of each sampler (by node id)."""
    seen = len(ws.of_type("streamrt.status"))
    outputs = server.run(g, timeout=600, client_id=ws.client_id)
    frames = {nid[:-len("-save")]: server.output_images(outputs, nid)[0] for nid in outputs if nid.endswith("-save")}
    ws.wait_for(lambda t, d: len(ws.of_type("streamrt.status")) >= seen + len(frames), timeout=30)
    events = {str(e["node"]): e for e in ws.of_type("streamrt.status")[seen:]}
    assert set(events) == set(frames), (events, frames)
    return frames, events


def test_eager_and_compile_samplers_share_a_pipeline_and_switching_rebuilds(server: ComfyServer, image: str):
    tag = "rt" + uuid.uuid4().hex[:6]
    with server.websocket() as ws:
        # 1. the eager sampler alone, from a fresh stream
        alone, events = run(server, graph(tag, image, {"eager": dict(acceleration="eager", reset=True)}), ws)
        assert events[f"{tag}eager"]["parts"] == {"unet": "torch", "vae_encoder": "torch", "vae_decoder": "torch"}

        # 2. the same eager sampler (fresh again) next to a compile sampler on the same pipeline
        both = {"eager": dict(acceleration="eager", reset=True), "compiled": dict(acceleration="compile", reset=True)}
        frames, events = run(server, graph(tag, image, both), ws)
        compiled = events[f"{tag}compiled"]
        assert compiled["acceleration"] == "compile"
        assert compiled["parts"] == {"unet": "compiled", "vae_encoder": "compiled", "vae_decoder": "compiled"}
        assert events[f"{tag}eager"]["parts"]["unet"] == "torch"
        np.testing.assert_array_equal(frames[f"{tag}eager"], alone[f"{tag}eager"])  # the eager path, bit for bit

        # 3. the eager sampler after the compiled one ran: still its own path, still the same frame
        frames, events = run(server, graph(tag, image, {"eager": dict(acceleration="eager", reset=True)}), ws)
        np.testing.assert_array_equal(frames[f"{tag}eager"], alone[f"{tag}eager"])

        # 4. switching one sampler's acceleration builds a new stream each time (its frame count restarts)
        counts = []
        for acceleration in ("eager", "eager", "compile", "compile", "eager"):
            _, events = run(server, graph(tag, image, {"switch": dict(acceleration=acceleration, reset=False)}), ws)
            event = events[f"{tag}switch"]
            assert event["acceleration"] == acceleration
            counts.append(event["stream_frames"])
        assert counts == [1, 2, 1, 2, 1], counts
