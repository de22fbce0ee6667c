"""Hostile-but-fair input over HTTP and websocket, on the real ComfyUI server: each refused by name, nothing lost.

Each case below worked against the pack on main d5c3959 (ComfyUI 0.3.75 does not check the values of V3
combo inputs, and a JSON ``NaN`` passes its min/max checks):

* a diffusers or TAESD folder outside the models folders loaded by a ``../`` or absolute name;
* a refused execution (one frame for frames_per_step 16) threw the live stream away;
* ``delta = NaN``, ``t_index_list = "32,32"``, a prompt with a lone surrogate were accepted or failed opaquely
  (likewise now a NaN ``cfg`` or ``strength``);
* the status event went to every connected client.

After every refusal the next prompt runs, on the same stream.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import pytest
from comfy_harness import ComfyServer, ExecutionFailed, Graph, as_prompt
from e2e_helpers import MODEL, TAESD, add_sampler, frames, queue_raw, upload
from stream_helpers import first_cache_mode

from streamrt.random_models import write_random_pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("comfy_server", [first_cache_mode()], indirect=True)]


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A real tiny diffusers model and TAESD folder OUTSIDE every models folder of the server."""
    root = tmp_path_factory.mktemp("outside")
    write_random_pipeline(root / "stolen-model", "tiny", taesd_folder=root / "stolen-taesd")
    return root


@pytest.fixture
def server(comfy_server: ComfyServer, e2e_tiny_models) -> ComfyServer:
    return comfy_server


def graph(tag: str, image: str | None, *, model: str = MODEL, taesd: str = TAESD, **inputs) -> Graph:
    g = Graph(prefix=tag)
    load = g.node("StreamRTLoadPipeline", id=f"{tag}load", model=model, taesd=taesd, dtype="auto", device="auto")
    if image is not None:
        inputs["image"] = g.node("LoadImage", image=image).out(0)
    sampler = add_sampler(g, load.out(0), id=f"{tag}sampler", **inputs)
    g.node("PreviewImage", id=f"{tag}preview", images=sampler.out(0))
    return g


def failure(entry: dict) -> str:
    with pytest.raises(ExecutionFailed) as failed:
        ComfyServer.raise_for_status(entry)
    return str(failed.value)


def tag() -> str:
    return "h" + uuid.uuid4().hex[:6]


@pytest.mark.parametrize("field,kind,folder", [("model", "diffusers", "stolen-model"),
                                                ("taesd", "vae_approx", "stolen-taesd")])
@pytest.mark.parametrize("form", ["relative", "absolute"])
def test_names_outside_the_model_folders_are_refused(server: ComfyServer, outside: Path, field, kind, folder, form):
    target = outside / folder
    # relative: climbs out of models/<kind> (from its real location, as the file system resolves '..')
    name = str(target) if form == "absolute" else os.path.relpath(target, os.path.realpath(server.models_dir / kind))
    t = tag()
    message = failure(queue_raw(server, as_prompt(graph(t, None, **{field: name}))))
    assert "refused" in message and ("'..'" in message or "absolute" in message), message
    # the server stays up and the next prompt works
    assert queue_raw(server, as_prompt(graph(t, None)))["status"]["status_str"] == "success"


def test_a_refused_execution_keeps_the_stream(server: ComfyServer):
    t = tag()
    names = upload(server, frames(4, seed=31), t)
    with server.websocket() as ws:
        for k in range(2):
            server.run(graph(t, names[k], reset=k == 0), client_id=ws.client_id)
        # one frame for frames_per_step 16: refused, by name, before the stream changes
        with pytest.raises(ExecutionFailed, match="frames_per_step=16"):
            server.run(graph(t, names[2], frames_per_step=16), client_id=ws.client_id)
        server.run(graph(t, names[3]), client_id=ws.client_id)
        ws.wait_for(lambda kind, d: kind == "streamrt.status" and d.get("stream_frames") == 3, timeout=30)
        counts = [e["stream_frames"] for e in ws.of_type("streamrt.status") if str(e["node"]) == f"{t}sampler"]
    assert counts == [1, 2, 3], counts


@pytest.mark.parametrize("inputs,words", [
    (dict(delta=math.nan), "delta must be a finite number"),
    (dict(guidance_scale=math.nan), "cfg must be a finite number"),
    (dict(strength=math.nan, t_index_list=""), "strength must be in (0, 1]"),
    (dict(t_index_list="32,32"), "strictly increasing"),
    (dict(t_index_list=",".join(["1"] * 2000)), "strictly increasing"),
    (dict(prompt="a cat \ud800"), "lone surrogate"),
    (dict(negative_prompt="\udc00"), "lone surrogate"),
])
def test_bad_values_are_refused_by_name_and_the_next_prompt_works(server: ComfyServer, inputs, words):
    t = tag()
    (name,) = upload(server, frames(1, seed=32), t)
    server.run(graph(t, name))
    message = failure(queue_raw(server, as_prompt(graph(t, name, **inputs))))
    assert words in message, message
    assert queue_raw(server, as_prompt(graph(t, name)))["status"]["status_str"] == "success"


def test_the_status_event_goes_to_the_client_that_queued(server: ComfyServer):
    t = tag()
    (name,) = upload(server, frames(1, seed=33), t)
    with server.websocket() as mine, server.websocket() as other:
        server.run(graph(t, name), client_id=mine.client_id)
        mine.wait_for("streamrt.status", timeout=30)
        server.run(graph(t, name), client_id=mine.client_id)  # the other socket has had a whole prompt's time
        mine.wait_for(lambda kind, d: kind == "streamrt.status" and d.get("stream_frames") == 2, timeout=30)
        assert not other.of_type("streamrt.status"), other.of_type("streamrt.status")
        assert other.of_type("status"), "the other client is connected and receives broadcasts"


def test_switching_models_in_a_loader_releases_the_previous_pipeline(server: ComfyServer, e2e_tiny_models):
    """The loader holds the pipeline it loaded; loading another one releases the first once nothing else uses
    it (here: after the sampler moved its stream to the new one), and the pack holds as many pipelines and streams
    as before (the status event's session counts), not one pipeline more per switch until /free."""
    t = tag()
    models = []
    for k in range(3):  # models no other test's loader holds
        name = f"tiny-sd-switch-{k}"
        if not (Path(e2e_tiny_models) / "diffusers" / name).exists():
            write_random_pipeline(Path(e2e_tiny_models) / "diffusers" / name, "tiny", seed=10 + k)
        models.append(name)
    (image,) = upload(server, frames(1, seed=34), t)
    released = "released a pipeline nothing uses any more"
    with server.websocket() as ws:
        def sessions_after(model: str) -> dict:
            ws.clear()
            server.run(graph(t, image, model=model), client_id=ws.client_id)
            return ws.wait_for("streamrt.status", timeout=30)[1]["sessions"]

        first = sessions_after(models[0])
        assert first["pipelines"] >= 1 and first["streams"] >= 1, first
        for model in models[1:]:
            before = server.log_tail(100000).count(released)
            assert sessions_after(model) == first, f"switching to {model} kept the previous pipeline"
            log = server.log_tail(100000)
            assert log.count(released) == before + 1, log[-3000:]
