"""ControlNets inside the stream (issue #16, docs/DESIGN.md section 10), against an independent reference.

The reference (:class:`ControlReference`) is :class:`test_stream_reference.ReferenceStream` whose UNet call adds
the residuals of diffusers' ``ControlNetModel`` called directly, with each row's control image looked up from a
formula rather than a ring: at call c, batch row r is at step k = r // F and holds frame r % F of the group fed at
call c - k (no frame yet: a zero image); negative rows mirror the batch rows they repeat. The stream keeps a ring
that moves with the latents; an off-by-one in that ring conditions a row on a neighbour's control image, which
the comparison (n = 3, several F) catches.
"""

from __future__ import annotations

import pytest
import torch
from stream_helpers import NEGATIVE, SIZE, frame_groups, make_config, make_frames
from test_stream_reference import ReferenceStream, compare

from streamrt import Stream
from streamrt.controlnet import ControlNet
from streamrt.random_models import random_stream_models


def tiny_controlnet(unet, seed: int):
    """A ControlNet of the tiny UNet's shape with random weights everywhere (its zero convolutions too, so the
    residuals are not zero as a freshly initialised ControlNet's are)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16),
                                    load_weights_from_unet=False)
    perturb(net)
    return net.eval().requires_grad_(False)


def perturb(net) -> None:
    """Weights large enough that the residuals depend strongly on the control image (with diffusers' small
    initialisation of the hint encoder, swapping the control image moves the frames by about 1e-6)."""
    for name, param in net.named_parameters():
        if "controlnet_cond_embedding" in name and param.dim() > 1:
            torch.nn.init.normal_(param, std=0.3)
        if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
            torch.nn.init.normal_(param, std=0.2)


@pytest.fixture(scope="module")
def controlnets(tiny_models):
    return [tiny_controlnet(tiny_models.unet, seed) for seed in (1, 2)]


class ControlReference(ReferenceStream):
    """The reference stream with ControlNets: ``nets`` are ``(model, strength, start, end[, negative])``: with
    ``negative`` False a ControlNet leaves the negative-prompt rows alone (ComfyUI's positive-only Apply
    ControlNet)."""

    def __init__(self, models, nets, **kwargs):
        super().__init__(models, **kwargs)
        self.nets = [list(n) for n in nets]
        self.images: list[list[torch.Tensor]] = []  # per call: one [F, 3, H, W] control batch per ControlNet
        self.call = -1

    def feed(self, frames, control):
        self.call += 1
        self.images.append([c.permute(0, 3, 1, 2).expand(self.F, -1, -1, -1) for c in control])
        return self(frames)

    def batch_control(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Control images ``[B, 3, H, W]`` and scales ``[B, 1, 1, 1]`` of the batch rows for ControlNet ``index``."""
        F, n = self.F, self.n
        model, strength, start, end = self.nets[index][:4]
        rows, scales = [], []
        for r in range(n * F):
            step, frame = divmod(r, F)
            group = self.call - step
            image = self.images[group][index][frame] if group >= 0 else torch.zeros(3, SIZE, SIZE)
            rows.append(image)
            scales.append(strength if start <= step / n < end else 0.0)
        return torch.stack(rows), torch.tensor(scales).view(-1, 1, 1, 1)

    def unet(self, x, t, embeds, pooled=None):
        B, F = self.n * self.F, self.F
        down, mid = None, None
        for index, (model, strength, *rest) in enumerate(self.nets):
            if strength == 0:
                continue
            on_negative = rest[2] if len(rest) > 2 else True
            images, scales = self.batch_control(index)
            negative_scales = scales if on_negative else torch.zeros_like(scales)
            if x.shape[0] == 2 * B:      # full: the negative rows repeat the batch
                images, scales = torch.cat([images, images]), torch.cat([negative_scales, scales])
            elif x.shape[0] == F + B:    # initialize: negative rows for the newest F frames
                images, scales = torch.cat([images[:F], images]), torch.cat([negative_scales[:F], scales])
            d, m = model(x, t, encoder_hidden_states=embeds, controlnet_cond=images, return_dict=False)
            d = [s * scales for s in d]
            m = m * scales
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if down is None:
            return super().unet(x, t, embeds, pooled)
        return self.unet_model(x, t, encoder_hidden_states=embeds, down_block_additional_residuals=down,
                               mid_block_additional_residual=mid).sample


def _pair(models, nets, **cfg):
    config = make_config(**cfg)
    stream = Stream(models, config, prompt="a photo of a cat", negative_prompt=NEGATIVE,
                    controlnets=[ControlNet(*net) for net in nets])
    ref = ControlReference(models, nets, t_index_list=config.t_index_list,
                           num_inference_steps=config.num_inference_steps, frames_per_step=config.frames_per_step,
                           cfg_type=config.cfg_type.value, guidance_scale=config.guidance_scale, delta=config.delta,
                           do_add_noise=config.do_add_noise, seed=config.seed, prompt="a photo of a cat",
                           negative_prompt=NEGATIVE)
    return stream, ref


def _controls(calls: int, frames_per_step: int, count: int, seed: int) -> list[list[torch.Tensor]]:
    video = [make_frames(calls * frames_per_step, seed=seed + i) for i in range(count)]
    return [[v[k * frames_per_step:(k + 1) * frames_per_step] for v in video] for k in range(calls)]


CALLS = 6


@pytest.mark.parametrize("frames_per_step", [1, 2])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
def test_control_images_move_with_the_batch(tiny_models, controlnets, cfg_type, n, frames_per_step):
    """Each row is conditioned on its own frame's control image at every step (n = 3: three frames in flight)."""
    t_index = {1: (20,), 3: (10, 25, 40)}[n]
    stream, ref = _pair(tiny_models, [(controlnets[0], 0.8, 0.0, 1.0)], cfg_type=cfg_type, t_index_list=t_index,
                        frames_per_step=frames_per_step, guidance_scale=1.5)
    compare(stream, ref, frame_groups(CALLS, frames_per_step, seed=n),
            controls=_controls(CALLS, frames_per_step, 1, seed=40))


@pytest.mark.parametrize("cfg_type", ["full", "initialize"])
def test_a_positive_only_controlnet_leaves_the_negative_rows_alone(tiny_models, controlnets, cfg_type):
    """ComfyUI's older Apply ControlNet conditions the positive prompt only: the negative-prompt rows then run
    without its residuals (against the reference), which changes the frames (against the same ControlNet on
    every row)."""
    groups, controls = frame_groups(CALLS, 1, seed=4), _controls(CALLS, 1, 1, seed=60)
    stream, ref = _pair(tiny_models, [(controlnets[0], 0.9, 0.0, 1.0, False)], cfg_type=cfg_type,
                        t_index_list=(20, 35), guidance_scale=1.8)
    assert stream.control.units[0].scale[:stream.config.uncond_rows].abs().sum() == 0
    compare(stream, ref, groups, controls=controls)
    both, _ = _pair(tiny_models, [(controlnets[0], 0.9, 0.0, 1.0, True)], cfg_type=cfg_type,
                    t_index_list=(20, 35), guidance_scale=1.8)
    stream.reset()
    outputs = [(stream.step(g, control=c) - both.step(g, control=c)).abs().max() for g, c in zip(groups, controls)]
    assert max(outputs) > 1e-3


def test_two_controlnets_sum_their_residuals_and_start_end_select_steps(tiny_models, controlnets):
    nets = [(controlnets[0], 0.7, 0.0, 0.5), (controlnets[1], 1.2, 0.3, 1.0)]
    stream, ref = _pair(tiny_models, nets, cfg_type="self", t_index_list=(10, 25, 40))
    compare(stream, ref, frame_groups(CALLS, 1, seed=3), controls=_controls(CALLS, 1, 2, seed=50))


def test_an_off_by_one_ring_would_be_caught(tiny_models, controlnets):
    """The comparison is sensitive to alignment: feeding the reference each control image one call late (what a
    ring off by one row does at n = 3) fails it."""
    stream, ref = _pair(tiny_models, [(controlnets[0], 1.0, 0.0, 1.0)], cfg_type="none", t_index_list=(10, 25, 40))
    controls = _controls(CALLS, 1, 1, seed=60)
    shifted = [controls[0]] + controls[:-1]
    inputs = frame_groups(CALLS, 1, seed=4)
    outs = [stream.step(f, control=c) for f, c in zip(inputs, controls)]
    refs = [ref.feed(f, c) for f, c in zip(inputs, shifted)]
    assert max((a - b).abs().max().item() for a, b in zip(outs[2:], refs[2:])) > 1e-2


def test_strength_zero_is_the_plain_stream_bit_for_bit(tiny_models, controlnets):
    config = make_config(cfg_type="self", t_index_list=(20, 35))
    frames = make_frames(4, seed=7)
    plain = Stream(tiny_models, config, prompt="a cat").process_video(frames)
    zero = Stream(tiny_models, config, prompt="a cat", controlnets=[ControlNet(controlnets[0], 0.0)])
    assert torch.equal(zero.process_video(frames, control=[make_frames(4, seed=8)]), plain)
    on = Stream(tiny_models, config, prompt="a cat", controlnets=[ControlNet(controlnets[0], 1.0)])
    assert (on.process_video(frames, control=[make_frames(4, seed=8)]) - plain).abs().max() > 1e-3


def test_live_strength_change_matches_the_reference(tiny_models, controlnets):
    stream, ref = _pair(tiny_models, [(controlnets[0], 1.0, 0.0, 1.0)], cfg_type="full", t_index_list=(20, 35),
                        guidance_scale=1.5)
    inputs, controls = frame_groups(CALLS, 1, seed=9), _controls(CALLS, 1, 1, seed=70)
    for k, (frames, control) in enumerate(zip(inputs, controls)):
        if k in (2, 4):
            strength = {2: 0.0, 4: 0.5}[k]
            stream.set_control_strength(0, strength)  # to 0 (no ControlNet call) and back, in place
            ref.nets[0][1] = strength
        torch.testing.assert_close(stream.step(frames, control=control), ref.feed(frames, control), rtol=0,
                                   atol=1e-5, msg=lambda m, k=k: f"call {k}\n{m}")


def test_process_video_aligns_control_frames_and_broadcasts_one_image(tiny_models, controlnets):
    config = make_config(cfg_type="self", t_index_list=(10, 25, 40), frames_per_step=2)
    frames, control = make_frames(6, seed=10), make_frames(6, seed=11)

    def fresh():
        return Stream(tiny_models, config, prompt="a cat", controlnets=[ControlNet(controlnets[0], 0.9)])

    video = fresh().process_video(frames, control=[control])
    stepped = fresh()
    groups = [stepped.step(frames[k:k + 2], control=[control[k:k + 2]]) for k in range(0, 6, 2)]
    groups += [stepped.step(frames[4:6], control=[control[4:6]]) for _ in range(stepped.latency)]
    torch.testing.assert_close(video, torch.cat(groups[stepped.latency:]), rtol=0, atol=1e-6)
    one = fresh().process_video(frames, control=[control[:1]])
    torch.testing.assert_close(one, fresh().process_video(frames, control=[control[:1].expand(6, -1, -1, -1)]),
                               rtol=0, atol=1e-6)


def test_bad_control_input_is_refused_and_the_stream_goes_on(tiny_models, controlnets):
    stream = Stream(tiny_models, make_config(cfg_type="none"), prompt="a cat",
                    controlnets=[ControlNet(controlnets[0], 1.0)])
    frames = make_frames(1, seed=12)
    with pytest.raises(ValueError, match="1 ControlNet"):
        stream.step(frames)
    with pytest.raises(ValueError, match="resize"):
        stream.step(frames, control=[torch.rand(1, 32, 32, 3)])
    with pytest.raises(ValueError, match="no ControlNet 3"):
        stream.set_control_strength(3, 1.0)
    with pytest.raises(ValueError, match="no ControlNet"):
        Stream(tiny_models, make_config(cfg_type="none"), prompt="a cat").step(frames, control=[frames])
    assert stream.step(frames, control=[make_frames(1, seed=13)]).shape == (1, SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="start/end"):
        ControlNet(controlnets[0], 1.0, start=0.6, end=0.5)
    with pytest.raises(ValueError, match="finite"):
        ControlNet(controlnets[0], float("nan"))
    with pytest.raises(ValueError, match="finite"):
        stream.set_control_strength(0, float("inf"))
    nan = make_frames(1, seed=14)
    nan[0, 3, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="control image 1: .*NaN"):
        stream.step(frames, control=[nan])
    # a grey or RGBA control image is taken as RGB, as input frames are
    grey = make_frames(1, seed=15)[..., :1]

    def fresh():
        return Stream(tiny_models, make_config(cfg_type="none"), prompt="a cat",
                      controlnets=[ControlNet(controlnets[0], 1.0)])

    torch.testing.assert_close(fresh().step(frames, control=[grey]),
                               fresh().step(frames, control=[grey.expand(-1, -1, -1, 3)]), rtol=0, atol=0)


def test_sdxl_stream_takes_a_controlnet_with_added_conditions():
    """An SDXL ControlNet gets the stream's pooled embeddings and size conditions like the UNet."""
    from diffusers import ControlNetModel


    models = random_stream_models("tiny-xl", seed=3)
    torch.manual_seed(4)
    net = ControlNetModel.from_unet(models.unet, conditioning_embedding_out_channels=(8, 8, 16, 16),
                                    load_weights_from_unet=False).eval().requires_grad_(False)
    perturb(net)
    config = make_config(cfg_type="full", t_index_list=(20, 35), guidance_scale=1.5)
    frames, control = make_frames(3, seed=14), make_frames(3, seed=15)
    with_net = Stream(models, config, prompt="a cat", controlnets=[ControlNet(net, 1.0)]).process_video(
        frames, control=[control])
    plain = Stream(models, config, prompt="a cat").process_video(frames)
    assert torch.isfinite(with_net).all() and (with_net - plain).abs().max() > 1e-3


def test_sessions_keep_the_stream_for_the_same_controlnets_and_apply_strength_live(tiny_models, controlnets):
    """A host's calls: the same ControlNet set keeps the stream (strength applied in place), another set or another
    start/end rebuilds it, and a control image that cannot be used is refused before the stream changes."""
    from streamrt.controlnet import ControlInput
    from streamrt.sessions import StreamRequest, StreamSessions

    sessions = StreamSessions()
    config = make_config(cfg_type="self", t_index_list=(20, 35))
    frames, control = make_frames(1, seed=20), make_frames(1, seed=21)

    def request(strength=1.0, net=0, start=0.0):
        return StreamRequest(config, "a cat", controlnets=(
            ControlInput(("cn", net), ControlNet(controlnets[net], strength, start), control),))

    stream, _ = sessions.run("owner", tiny_models, request(1.0), frames)
    same, _ = sessions.run("owner", tiny_models, request(0.4), frames)
    assert same is stream and stream.control.units[0].net.strength == 0.4
    assert float(stream.control.units[0].scale[0]) == pytest.approx(0.4, abs=1e-3)
    other, _ = sessions.run("owner", tiny_models, request(0.4, net=1), frames)
    assert other is not stream
    moved, _ = sessions.run("owner", tiny_models, request(0.4, net=1, start=0.5), frames)
    assert moved is not other
    before = moved.frames_processed
    bad = StreamRequest(config, "a cat", controlnets=(
        ControlInput(("cn", 1), ControlNet(controlnets[1], 0.4, 0.5), torch.rand(1, 32, 32, 3)),))
    with pytest.raises(ValueError, match="resize"):
        sessions.run("owner", tiny_models, bad, frames)
    assert sessions.stream("owner", tiny_models, request(0.4, net=1, start=0.5)) is moved
    assert moved.frames_processed == before
    sessions.release()


def test_sessions_never_evict_a_controlnet_a_live_stream_uses(tiny_models, controlnets):
    """More ControlNets in use than the cache holds (max_controlnets 1, two chained): after the first calls settle,
    a call converts nothing again (evicting one in use would convert it on every call, i.e. every frame)."""
    from streamrt.controlnet import ControlInput
    from streamrt.sessions import StreamRequest, StreamSessions

    sessions = StreamSessions()
    sessions.max_controlnets = 1
    config = make_config(cfg_type="self", t_index_list=(20, 35))
    frames, control = make_frames(1, seed=22), make_frames(1, seed=23)
    loads: list[int] = []

    def call():
        nets = []
        for index in (0, 1):
            def load(index=index):
                loads.append(index)
                return controlnets[index]
            nets.append(ControlInput(("cn", index), ControlNet(sessions.controlnet(("cn", index), load)), control))
        return sessions.run("owner", tiny_models, StreamRequest(config, "a cat", controlnets=tuple(nets)), frames)

    for _ in range(3):
        call()
    settled = len(loads)
    stream, _ = call()
    call()
    assert len(loads) == settled, f"ControlNets converted again on every call: {loads}"
    assert stream.control is not None and len(stream.control.units) == 2
    sessions.release()


def test_compiled_stream_compiles_its_controlnet_once_and_matches_eager(tiny_models, controlnets):
    """Under ``compile`` the ControlNet runs through its own compiled copy (shared by streams, kept on the module
    so it goes with it) and the frames equal the eager stream's."""
    import gc
    import weakref

    from test_runtime import CountingBackend

    from streamrt.runtime import CompileOptions, prepare

    net = tiny_controlnet(tiny_models.unet, seed=5)
    config = make_config(cfg_type="self", t_index_list=(20, 35))
    frames, control = make_frames(3, seed=30), make_frames(3, seed=31)
    eager = Stream(tiny_models, config, prompt="a cat", controlnets=[ControlNet(net, 0.8)]).process_video(
        frames, control=[control])
    options = CompileOptions(backend=CountingBackend())
    compiled_config = config.with_(acceleration="compile")

    first, second = (Stream(tiny_models, compiled_config, prompt="a cat", controlnets=[ControlNet(net, 0.8)],
                            runtime=prepare(tiny_models, compiled_config, compile_options=options, control=True))
                     for _ in range(2))
    copy = first.control.units[0].call.module
    assert copy is not net and copy is second.control.units[0].call.module  # one compiled copy, shared
    calls_before = options.backend.calls
    out = first.process_video(frames, control=[control])
    assert options.backend.calls - calls_before >= 4 * frames.shape[0]  # UNet, ControlNet, encode, decode per call
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-5)
    alive = weakref.ref(net)
    del net, first, second, copy
    gc.collect()
    assert alive() is None, "the compiled copy keeps the ControlNet alive"
