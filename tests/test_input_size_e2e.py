"""The input's size on the real ComfyUI server: Stream Settings' width/height resize the input, 0 keeps it.

* width/height set on Stream Settings: the sampler resizes frames of any other size to them (here 100x100 ->
  96x96) and gives the frames the core gives for the resized input (:meth:`streamrt.StreamSettings.fit_frames`);
* width/height 0 (or no settings): the input's size is the stream's and must be a multiple of 8; a 100x100 input
  is refused with its real size and the fix (set width and height on Stream Settings), and the next prompt runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from comfy_harness import ComfyServer, ExecutionFailed, Graph
from e2e_helpers import MODEL, PNG_ATOL, SAMPLER_DEFAULTS, TAESD, add_sampler, as_tensor, core_config, uid

from streamrt import Stream, StreamSettings

pytestmark = pytest.mark.e2e

ODD = 100  # not a multiple of 8


@pytest.fixture
def server(comfy_server: ComfyServer, e2e_tiny_models: Path) -> ComfyServer:
    return comfy_server


def odd_frame(seed: int) -> np.ndarray:
    """A smooth 100x100 test frame (uint8, so LoadImage gives exactly these values)."""
    rng = np.random.default_rng(seed)
    return np.repeat(np.repeat(rng.integers(0, 256, size=(ODD // 4, ODD // 4, 3)).astype(np.uint8), 4, 0), 4, 1)


def graph(prefix: str, image: str, **options) -> Graph:
    g = Graph(prefix=prefix)
    load = g.node("StreamRTLoadPipeline", model=MODEL, taesd=TAESD, dtype="auto", device="auto")
    sampler = add_sampler(g, load.out(0), id=f"{prefix}sampler", image=g.node("LoadImage", image=image).out(0),
                          **options)
    g.node("SaveImage", id=f"{prefix}save", images=sampler.out(0), filename_prefix=f"{prefix}/f")
    return g


def test_a_size_on_stream_settings_resizes_the_input(server: ComfyServer, core_models) -> None:
    prefix = uid()
    image = odd_frame(seed=41)
    name = server.write_input_image(image, name=f"{prefix}.png")
    outputs = server.run(graph(prefix, name, width=96, height=96))
    (got,) = server.output_images(outputs, f"{prefix}save")
    assert got.shape == (96, 96, 3)
    settings = StreamSettings(width=96, height=96)
    stream = Stream(core_models, core_config(width=96, height=96), prompt=SAMPLER_DEFAULTS["prompt"],
                    negative_prompt=SAMPLER_DEFAULTS["negative_prompt"])
    expected = stream.step(settings.fit_frames(as_tensor(image[None])))[0].numpy()
    np.testing.assert_allclose(got, expected, atol=PNG_ATOL, rtol=0)


def test_an_input_that_is_not_a_multiple_of_8_names_its_size_and_the_fix(server: ComfyServer) -> None:
    prefix = uid()
    name = server.write_input_image(odd_frame(seed=42), name=f"{prefix}.png")
    with pytest.raises(ExecutionFailed) as failed:
        server.run(graph(prefix, name))
    message = failed.value.message
    assert failed.value.node_id == f"{prefix}sampler", message
    for words in (f"the input frames are {ODD}x{ODD}", "set width and height in the stream settings", "96x96"):
        assert words in message, message
    assert "got 100" not in message, message  # not the config's "width must be a positive multiple of 8"
    outputs = server.run(graph(prefix, name, width=96, height=96))  # what the message says to do works
    assert server.output_images(outputs, f"{prefix}save")[0].shape == (96, 96, 3)
