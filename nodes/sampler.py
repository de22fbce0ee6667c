"""The realtime sampler: advance a persistent stream with this execution's frames (or txt2img)."""

from __future__ import annotations

import logging
import math
import time

import torch

from ..streamrt import StreamRequest, StreamSettings
from ..streamrt.config import StreamConfig
from ..streamrt.controlnet import ControlInput, ControlNet
from ..streamrt.models import StreamModels
from . import api
from .api import io
from .engines import engine_note, engine_source
from .runtime import SESSIONS, PipelineHandle, converted_controlnet, report_memory, workflow_id

logger = logging.getLogger(__name__)

#: shown as the node's title; the frontend's node search (1.32: fuzzy over node id and display name, a match
#: must start within the first 30 characters) finds the node by these words
DISPLAY_NAME = "Realtime Sampler (webcam, StreamDiffusion)"


def parse_t_index_list(text: str) -> tuple[int, ...]:
    """``"32, 45"`` -> ``(32, 45)``, with an error that says what is wrong."""
    try:
        values = tuple(int(part) for part in text.replace(";", ",").split(",") if part.strip())
    except ValueError:
        raise ValueError(f"t_index_list must be comma-separated integers such as '32,45', got {text!r}") from None
    if not values:
        raise ValueError("t_index_list is empty: give at least one index, such as '32,45'")
    return values


def prompt_input(conditioning, text: str, what: str, text_name: str, notes: list[str]):
    """The prompt the stream gets: the CONDITIONING's embeddings when one is connected (a note says the text was
    not used when it is not empty), else the text."""
    if conditioning is None:
        return text
    if text.strip():
        notes.append(f"{what} is connected: the {text_name} text is not used")
    return api.conditioning_embeddings(conditioning, what)


def runtime_notes(stream) -> list[str]:
    """What the stream's runtime says (an engine not found, a fallback); for a stream whose steps are split over
    devices, what each device's says, named by the device."""
    if len(stream.stages) == 1:
        return list(stream.runtime.notes)
    return list(dict.fromkeys(f"{stage.device}: {note}" for stage in stream.stages for note in stage.runtime.notes))


def control_inputs(positive, negative, models: StreamModels, config: StreamConfig) -> tuple[ControlInput, ...]:
    """The ControlNets Apply ControlNet put on the CONDITIONING, converted once per ControlNet (kept with the
    pipelines), with their control images at the stream's size as ComfyUI sizes them (center crop, the
    ControlNet's upscale method), and on the negative rows only where they are on the negative CONDITIONING."""
    if positive is None:
        api.conditioning_controls(None, negative)  # refuses a ControlNet on the negative prompt alone
        return ()
    out = []
    for control in api.conditioning_controls(positive, negative):
        model = converted_controlnet(control.key, control.state_dict, models)
        net = ControlNet(model, control.strength, control.start, control.end, control.negative)
        out.append(ControlInput(control.key, net, api.control_image(control, config.width, config.height)))
    return tuple(out)


class StreamSampler(api.AlwaysExecutes):
    """The stateful realtime sampler."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return api.Schema(
            node_id="StreamRTSampler",
            display_name=DISPLAY_NAME,
            category=api.CATEGORY,
            description=(
                "Realtime StreamDiffusion-style sampler (StreamRT) for webcams and video: runs a stream whose state "
                "(latent buffer, noise, RCFG stock noise) persists across queue executions. One frame per "
                "execution (e.g. a webcam) gives a coherent stream, steps-1 frames behind the input. A batch of "
                "more frames than frames_per_step (a video) is processed in one execution and returned aligned "
                "with the input frames. Without an image it runs txt2img. Each sampler node keeps its own "
                "stream. Stream options (cfg type, acceleration incl. TensorRT engines, size, similarity filter, "
                "cached attention) come from the Stream Settings nodes."),
            inputs=[
                api.PIPELINE.Input("pipeline", tooltip="From Load Stream Pipeline."),
                io.Image.Input("image", optional=True,
                               tooltip="Input frame(s). Leave unconnected for txt2img."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="The prompt as a CONDITIONING (CLIP Text Encode, Conditioning "
                                              "Average, Conditioning (Concat), ...) of this model's CLIP. When "
                                              "connected it is used instead of the prompt text. An unchanged "
                                              "conditioning costs nothing."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="The negative prompt as a CONDITIONING; used instead of the "
                                              "negative_prompt text (by cfg_type full and initialize)."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="Prompt (when positive is not connected). Changing it re-encodes once; an "
                                        "unchanged prompt is never re-encoded."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt (when negative is not connected), used by cfg_type full "
                                        "and initialize."),
                io.Int.Input("steps", default=2, min=1, max=8,
                             tooltip="Denoising steps in flight: more steps, more detail, and the output is "
                                     "steps-1 executions behind the input."),
                io.Float.Input("strength", default=0.36, min=0.01, max=1.0, step=0.01,
                               tooltip="How much each frame changes (denoise): low keeps the input, 1.0 ignores "
                                       "it. The steps share the part of the schedule this leaves."),
                io.Float.Input("cfg", default=1.2, min=0.0, max=20.0, step=0.05,
                               tooltip="Guidance scale; guidance is off at 1.0 or below."),
                io.Int.Input("seed", default=2, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the stream's fixed noise. Keep it fixed for a stable stream."),
                io.String.Input("t_index_list", default="",
                                tooltip="Advanced: denoising steps as indices into the LCM schedule, noisiest "
                                        "first, e.g. '32,45' (lower indices change the image more). When set, it "
                                        "replaces steps and strength."),
                io.Boolean.Input("reset", default=False,
                                 tooltip="Clear the stream state before this execution (buffer, stock noise, "
                                         "frame counter). Turn off again to keep streaming."),
                api.SETTINGS.Input("settings", optional=True,
                                   tooltip="From Stream Settings / Stream Similarity Filter / Stream Cached "
                                           "Attention (chained). Without it: cfg_type self, acceleration auto, "
                                           "the input's size, one frame per step, no filter, no cached "
                                           "attention."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="Output frame(s), same count as the input.")],
            hidden=[io.Hidden.unique_id, io.Hidden.extra_pnginfo],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, pipeline: PipelineHandle, prompt: str, negative_prompt: str, steps: int, strength: float,
                cfg: float, seed: int, t_index_list: str, reset: bool, image: torch.Tensor | None = None,
                positive=None, negative=None, settings: StreamSettings | None = None) -> io.NodeOutput:
        if not math.isfinite(cfg):  # a JSON NaN passes ComfyUI's min/max check; named as the user knows it
            raise ValueError(f"cfg must be a finite number, got {cfg!r}")
        settings = settings if settings is not None else StreamSettings()
        config = settings.stream_config(
            t_index_list=parse_t_index_list(t_index_list) if t_index_list.strip() else None, steps=steps,
            strength=strength, guidance_scale=cfg, seed=seed,
            frame_size=(int(image.shape[1]), int(image.shape[2])) if image is not None and image.dim() == 4 else None)
        image = settings.fit_frames(image)  # resized to the settings' width / height, when they set them
        notes: list[str] = []
        models = pipeline.models()
        request = StreamRequest(config, prompt_input(positive, prompt, "positive", "prompt", notes),
                                prompt_input(negative, negative_prompt, "negative", "negative_prompt", notes),
                                reset=reset, engines=engine_source(pipeline),
                                controlnets=control_inputs(positive, negative, models, config),
                                video_devices=settings.video_devices, step_devices=settings.step_devices,
                                overlap=settings.overlap_executions)
        if len(settings.step_devices) > 1 and config.num_steps == 1:
            notes.append("Stream Devices splits the denoising steps, and this stream has one: it runs on one GPU")
        node_id = cls.hidden.unique_id
        owner = (workflow_id(cls.hidden.extra_pnginfo), node_id)
        fresh = SESSIONS.frames_processed(owner) == 0
        api.check_interrupted()
        start = time.perf_counter()
        video = image is not None and image.dim() == 4 and image.shape[0] > config.frames_per_step
        progress = api.Progress(int(image.shape[0]), node_id, owner[0]) if video else None
        stream, frames = SESSIONS.run(owner, models, request, image, progress=progress,
                                      preview=progress.preview if progress is not None else None)
        seconds = time.perf_counter() - start
        count = int(frames.shape[0])
        runtime = stream.runtime
        # an overlapped execution's time is the host's part alone (its GPU work runs on after it): no sampler
        # speed then, the panel's loop rate is the stream's
        overlapped = stream.overlapped
        api.send_status({
            "node": node_id, "workflow": owner[0], "frames": count, "seconds": seconds,
            "ms_per_frame": None if overlapped else 1000.0 * seconds / count,
            "fps": None if overlapped or seconds <= 0 else count / seconds, "overlap": overlapped,
            "stream_frames": stream.frames_processed,
            "backend": runtime.describe(), "acceleration": runtime.acceleration.value, "parts": runtime.parts,
            # what every UNet call is given beyond its inputs (the prompt's keys and values, fused projections, ...)
            "unet_extras": sorted(stream.stages[0].unet_extras.given),
            "notes": runtime_notes(stream) + notes, "device": str(stream.device),
            # where this call's streams ran: several GPUs for a video split over them (Stream Devices)
            "devices": list(SESSIONS.ran_on.get(owner, (str(stream.device),))),
            "sessions": dict(zip(("pipelines", "streams"), SESSIONS.counts())),  # what the pack holds now
            "state": "reset" if reset else (
                "warming" if fresh or stream.frames_processed <= (stream.latency + overlapped) * config.frames_per_step
                else "streaming"),
        })
        note = engine_note(pipeline, runtime)  # which parts run on engines, which on torch, and why
        if note is not None:
            api.show_text(node_id, note)
        logger.debug("stream %s: %d frame(s) in %.1f ms (%s)", node_id, count, 1000 * seconds, runtime.describe())
        report_memory()
        return io.NodeOutput(frames)
