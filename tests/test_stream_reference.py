"""The stream against a plain re-implementation of docs/DESIGN.md section 2.

:class:`ReferenceStream` is written straight from the design notes: every constant is recomputed from a
fresh diffusers ``LCMScheduler``, every call builds its batch with ``torch.cat`` from plain tensors that
share nothing with the stream, and the models (UNet, VAE, text encoder, tokenizer) are called directly.
The tests feed both the same random frames, call after call, and compare the decoded frames and the
latent state (output latents, carried latent buffer, RCFG stock noise).

For SDXL-shaped models (a second text encoder) the reference follows diffusers' SDXL conventions, written
out here: the penultimate hidden states of both encoders concatenated, the second encoder's projected
``text_embeds`` as the pooled embedding, an empty negative prompt as zeros, and ``time_ids`` =
(height, width, 0, 0, height, width) on every row (tests/test_stream_sdxl.py).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler
from stream_helpers import NEGATIVE, frame_groups, make_config

from streamrt import Stream

SIGMA_DATA = 0.5
IMAGE_ATOL = 1e-5      # decoded frames live in [0, 1]
LATENT_RTOL = 1e-5     # latents reach a few hundred with random weights: compare relative to their scale


class ReferenceStream:
    """docs/DESIGN.md section 2, literally, for F frames per call and n = len(t_index_list) steps."""

    def __init__(self, models, *, t_index_list, num_inference_steps=50, frames_per_step=1, cfg_type="self",
                 guidance_scale=1.5, delta=1.0, do_add_noise=True, seed=2, prompt="", negative_prompt="",
                 height=64, width=64):
        self.unet_model, self.vae = models.unet, models.vae
        self.tiny_vae = type(models.vae).__name__ == "AutoencoderTiny"
        self.sf = float(models.vae.config.scaling_factor)
        scheduler = LCMScheduler.from_config(models.scheduler.config)
        self.v_pred = scheduler.config.prediction_type == "v_prediction"
        self.cfg_type, self.g, self.delta, self.add_noise = cfg_type, guidance_scale, delta, do_add_noise
        F = self.F = frames_per_step
        n = self.n = len(t_index_list)
        B = n * F

        # Set-up: T = timesteps[t_index_list], each repeated F times.
        scheduler.set_timesteps(num_inference_steps)
        self.T = scheduler.timesteps[list(t_index_list)].repeat_interleave(F)
        col = lambda v: v.to(torch.float32).reshape(B, 1, 1, 1)  # noqa: E731
        alpha_bar = scheduler.alphas_cumprod.to(torch.float64)[self.T]
        self.a = col(alpha_bar.sqrt())
        self.b = col((1 - alpha_bar).sqrt())
        s = float(scheduler.config.timestep_scaling)
        st = self.T.to(torch.float64) * s
        self.c_skip = col(SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2))
        self.c_out = col(st / (st**2 + SIGMA_DATA**2) ** 0.5)
        ones = torch.ones(F, 1, 1, 1)
        self.a_next = torch.cat([self.a[F:], ones])
        self.b_next = torch.cat([self.b[F:], ones])

        h, w = height // 8, width // 8
        gen = torch.Generator("cpu").manual_seed(seed)
        self.init_noise = torch.randn([B, 4, h, w], generator=gen)
        self.init_noise_rotated = torch.cat([self.init_noise[F:], self.init_noise[:F]])
        self.stock = torch.zeros(B, 4, h, w)
        self.x_buf = torch.zeros((n - 1) * F, 4, h, w)

        self.tokenizer, self.text_encoder = models.tokenizer, models.text_encoder
        self.sdxl = models.text_encoder_2 is not None
        if self.sdxl:
            self.tokenizer_2, self.text_encoder_2 = models.tokenizer_2, models.text_encoder_2
            self.time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        self.set_prompt(prompt, negative_prompt)

    @torch.inference_mode()
    def embed(self, text):
        """``(tokens [1, 77, D], pooled [1, P] or None)``."""
        if not self.sdxl:
            ids = self.tokenizer(text, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
            return self.text_encoder(ids)[0], None          # [1, 77, D]
        hidden = []
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), out.text_embeds

    def set_prompt(self, prompt, negative_prompt=""):
        self.cond, self.cond_pooled = self.embed(prompt)
        self.uncond, self.uncond_pooled = self.embed(negative_prompt)
        if self.sdxl and negative_prompt == "":
            self.uncond, self.uncond_pooled = torch.zeros_like(self.uncond), torch.zeros_like(self.uncond_pooled)

    def unet(self, x, t, embeds, pooled=None):
        if not self.sdxl:
            return self.unet_model(x, t, encoder_hidden_states=embeds).sample
        added = {"text_embeds": pooled, "time_ids": self.time_ids.repeat(x.shape[0], 1)}
        return self.unet_model(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample

    def rows(self, uncond: int, cond: int):
        """Embeddings and pooled embeddings of ``uncond`` negative rows then ``cond`` prompt rows."""
        embeds = torch.cat([self.uncond.repeat(uncond, 1, 1), self.cond.repeat(cond, 1, 1)])
        pooled = None
        if self.sdxl:
            pooled = torch.cat([self.uncond_pooled.repeat(uncond, 1), self.cond_pooled.repeat(cond, 1)])
        return embeds, pooled

    def eps_from(self, pred, rows):
        """eps from the UNet output for batch ``rows`` (v-prediction: eps = a*v + b*x)."""
        if self.v_pred:
            return self.a[rows] * pred + self.b[rows] * self.X[rows]
        return pred

    @torch.inference_mode()
    def __call__(self, frames):
        F, n, B = self.F, self.n, self.n * self.F
        a, b = self.a, self.b
        rcfg = self.cfg_type in ("self", "initialize")
        # 2. encode (or, for txt2img, start the new rows from the fixed noise)
        if frames is None:
            x_t = self.init_noise[:F]
        else:
            image = frames.permute(0, 3, 1, 2) * 2 - 1
            if self.tiny_vae:
                z = self.vae.encode(image).latents
            else:
                z = self.vae.encode(image).latent_dist.mode()
            z = z * self.sf
            x_t = a[:F] * z + b[:F] * self.init_noise[:F]
        # 3. the denoising batch and the stock shift
        if n > 1:
            X = torch.cat([x_t, self.x_buf])
            if rcfg:
                self.stock = torch.cat([self.init_noise[:F], self.stock[:-F]])
        else:
            X = x_t
        self.X = X
        cond = self.rows(0, B)
        # 4. UNet and guidance
        guided = self.cfg_type != "none" and self.g > 1
        if not guided:
            eps = self.eps_from(self.unet(X, self.T, *cond), slice(0, B))
        else:
            if self.cfg_type == "full":
                out = self.unet(torch.cat([X, X]), torch.cat([self.T, self.T]), *self.rows(B, B))
                eps_u = self.eps_from(out[:B], slice(0, B))
                eps_c = self.eps_from(out[B:], slice(0, B))
            elif self.cfg_type == "self":
                eps_c = self.eps_from(self.unet(X, self.T, *cond), slice(0, B))
                eps_u = self.delta * self.stock
            elif self.cfg_type == "initialize":
                out = self.unet(torch.cat([X[:F], X]), torch.cat([self.T[:F], self.T]), *self.rows(F, B))
                self.stock = torch.cat([self.eps_from(out[:F], slice(0, F)), self.stock[F:]])
                eps_c = self.eps_from(out[F:], slice(0, B))
                eps_u = self.delta * self.stock
            else:
                raise AssertionError(self.cfg_type)
            eps = eps_u + self.g * (eps_c - eps_u)
        # 5. denoised estimate
        x0 = self.c_out * (X - b * eps) / a + self.c_skip * X
        # 6. RCFG stock noise
        if rcfg:
            scaled = b * self.stock
            d = self.c_out * (scaled - b * eps) / a + self.c_skip * scaled
            self.stock = self.init_noise_rotated + d * self.a_next / self.b_next
        # 7. output rows and the carried buffer
        x0_out = x0[-F:]
        if n > 1:
            self.x_buf = a[F:] * x0[:-F]
            if self.add_noise:
                self.x_buf = self.x_buf + b[F:] * self.init_noise[F:]
        # 8. decode
        self.latent_out = x0_out / self.sf
        image = self.vae.decode(self.latent_out).sample
        return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def _scale(t: torch.Tensor) -> float:
    return max(1.0, t.abs().max().item())


def compare(stream: Stream, ref: ReferenceStream, inputs, *, image_atol=IMAGE_ATOL, on_call=None, controls=None):
    """Feed both the same inputs call by call; check frames and latent state after every call. ``controls``: per
    call, the control images of a stream with ControlNets (the reference takes them through ``feed``)."""
    F = stream.config.frames_per_step
    for k, frames in enumerate(inputs):
        if on_call is not None:
            on_call(k, stream, ref)
        if controls is None:
            got, want = stream.step(frames).clone(), ref(frames)
        else:
            got, want = stream.step(frames, control=controls[k]).clone(), ref.feed(frames, controls[k])
        buf = stream.buffers
        assert got.shape == want.shape == (F, 64, 64, 3)
        lat = ref.latent_out
        torch.testing.assert_close(buf.latent_out, lat, rtol=0, atol=LATENT_RTOL * _scale(lat),
                                   msg=lambda m, k=k: f"call {k}: output latents differ\n{m}")
        if ref.n > 1:
            xb = ref.x_buf
            torch.testing.assert_close(buf.x_batch[F:], xb, rtol=0, atol=LATENT_RTOL * _scale(xb),
                                       msg=lambda m, k=k: f"call {k}: carried latent buffer differs\n{m}")
        if ref.cfg_type in ("self", "initialize"):
            st = ref.stock
            torch.testing.assert_close(buf.stock, st, rtol=0, atol=LATENT_RTOL * _scale(st),
                                       msg=lambda m, k=k: f"call {k}: stock noise differs\n{m}")
        torch.testing.assert_close(got, want, rtol=0, atol=image_atol,
                                   msg=lambda m, k=k: f"call {k}: decoded frames differ\n{m}")


def _pair(models, prompt="a photo of a cat", negative_prompt=NEGATIVE, **cfg):
    config = make_config(**cfg)
    stream = Stream(models, config, prompt=prompt, negative_prompt=negative_prompt)
    ref = ReferenceStream(models, t_index_list=config.t_index_list, num_inference_steps=config.num_inference_steps,
                          frames_per_step=config.frames_per_step, cfg_type=config.cfg_type.value,
                          guidance_scale=config.guidance_scale, delta=config.delta,
                          do_add_noise=config.do_add_noise, seed=config.seed, prompt=prompt,
                          negative_prompt=negative_prompt)
    return stream, ref


CALLS = 6
T_INDEX = {1: (20,), 2: (20, 35), 3: (10, 25, 40)}


@pytest.mark.parametrize("frames_per_step", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
def test_img2img_matches_reference(tiny_models, cfg_type, n, frames_per_step):
    stream, ref = _pair(tiny_models, cfg_type=cfg_type, t_index_list=T_INDEX[n],
                        frames_per_step=frames_per_step, guidance_scale=1.5)
    compare(stream, ref, frame_groups(CALLS, frames_per_step, seed=n * 10 + frames_per_step))


@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
def test_guidance_one_acts_like_none(tiny_models, cfg_type):
    """guidance_scale = 1 turns guidance off: every cfg_type gives the cfg_type='none' frames."""
    stream, ref = _pair(tiny_models, cfg_type=cfg_type, t_index_list=T_INDEX[2], frames_per_step=2,
                        guidance_scale=1.0)
    assert stream.config.unet_rows == stream.config.batch_rows
    inputs = frame_groups(CALLS, 2, seed=7)
    compare(stream, ref, inputs)
    plain, _ = _pair(tiny_models, cfg_type="none", t_index_list=T_INDEX[2], frames_per_step=2, guidance_scale=1.0)
    expected = [plain.step(x).clone() for x in inputs]
    stream.reset()
    for x, want in zip(inputs, expected):
        assert torch.equal(stream.step(x), want)


@pytest.mark.parametrize("cfg_type", ["self", "full"])
def test_without_added_noise(tiny_models, cfg_type):
    stream, ref = _pair(tiny_models, cfg_type=cfg_type, t_index_list=T_INDEX[3], frames_per_step=2,
                        do_add_noise=False)
    compare(stream, ref, frame_groups(CALLS, 2, seed=3))


@pytest.mark.parametrize("cfg_type", ["self", "initialize"])
def test_delta(tiny_models, cfg_type):
    stream, ref = _pair(tiny_models, cfg_type=cfg_type, t_index_list=T_INDEX[2], frames_per_step=1, delta=0.6,
                        guidance_scale=2.0)
    compare(stream, ref, frame_groups(CALLS, 1, seed=4))


@pytest.mark.parametrize("cfg_type", ["full", "self", "initialize"])
def test_live_guidance_and_delta_changes(tiny_models, cfg_type):
    """set_guidance between calls is the same as a reference whose g / delta change at that call."""
    stream, ref = _pair(tiny_models, cfg_type=cfg_type, t_index_list=T_INDEX[3], frames_per_step=1)

    def change(k, stream, ref):
        if k == 2:
            stream.set_guidance(guidance_scale=2.5)
            ref.g = 2.5
        if k == 4:
            stream.set_guidance(delta=0.5)
            ref.delta = 0.5

    compare(stream, ref, frame_groups(CALLS, 1, seed=5), on_call=change)


@pytest.mark.parametrize(("cfg_type", "n", "frames_per_step"),
                         [("none", 2, 2), ("full", 3, 1), ("self", 2, 2), ("initialize", 3, 2), ("self", 1, 1)])
def test_txt2img_matches_reference(tiny_models, cfg_type, n, frames_per_step):
    stream, ref = _pair(tiny_models, cfg_type=cfg_type, t_index_list=T_INDEX[n], frames_per_step=frames_per_step)
    compare(stream, ref, [None] * 4)


def test_txt2img_and_img2img_mixed(tiny_models):
    stream, ref = _pair(tiny_models, cfg_type="initialize", t_index_list=T_INDEX[3], frames_per_step=2)
    inputs = frame_groups(CALLS, 2, seed=6)
    inputs[1] = inputs[4] = None
    compare(stream, ref, inputs)


@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
def test_v_prediction_matches_reference(tiny_v_models, cfg_type):
    assert tiny_v_models.prediction_type == "v_prediction"
    stream, ref = _pair(tiny_v_models, cfg_type=cfg_type, t_index_list=T_INDEX[2], frames_per_step=2)
    compare(stream, ref, frame_groups(CALLS, 2, seed=8))


@pytest.mark.parametrize(("cfg_type", "n", "frames_per_step"), [("self", 3, 2), ("full", 2, 1), ("none", 1, 2)])
def test_taesd_matches_reference(tiny_taesd_models, cfg_type, n, frames_per_step):
    assert tiny_taesd_models.is_tiny_vae
    stream, ref = _pair(tiny_taesd_models, cfg_type=cfg_type, t_index_list=T_INDEX[n],
                        frames_per_step=frames_per_step)
    compare(stream, ref, frame_groups(CALLS, frames_per_step, seed=9))


def test_prompt_change_matches_reference(tiny_models):
    """A prompt change mid-stream keeps the negative rows (full) and the state."""
    stream, ref = _pair(tiny_models, cfg_type="full", t_index_list=T_INDEX[2], frames_per_step=1)

    def change(k, stream, ref):
        if k == 3:
            stream.set_prompt("a red dog")
            ref.set_prompt("a red dog", NEGATIVE)

    compare(stream, ref, frame_groups(CALLS, 1, seed=11), on_call=change)


def test_schedule_constants(tiny_models):
    """c_skip / c_out repeated per frame and equal to diffusers' LCM boundary scalings; a, b from alphas_cumprod."""
    config = make_config(t_index_list=T_INDEX[3], frames_per_step=2)
    stream = Stream(tiny_models, config, prompt="x")
    scheduler = LCMScheduler.from_config(tiny_models.scheduler.config)
    scheduler.set_timesteps(50)
    sch = stream.schedule
    for row in range(config.batch_rows):
        t = int(scheduler.timesteps[config.t_index_list[row // 2]])
        assert int(sch.timesteps[row]) == t
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert sch.c_skip[row].item() == pytest.approx(c_skip, rel=1e-6)
        assert sch.c_out[row].item() == pytest.approx(c_out, rel=1e-6)
        alpha_bar = float(scheduler.alphas_cumprod[t])
        assert sch.a[row].item() == pytest.approx(alpha_bar**0.5, rel=1e-6)
        assert sch.b[row].item() == pytest.approx((1 - alpha_bar) ** 0.5, rel=1e-6)


def test_reference_is_not_trivial(tiny_models):
    """The comparisons mean something: the frames vary with the input, the prompt and the cfg_type."""
    inputs = frame_groups(3, 1, seed=12)
    outs = {}
    for cfg_type in ("none", "full", "self"):
        stream, _ = _pair(tiny_models, cfg_type=cfg_type, t_index_list=T_INDEX[1])
        outs[cfg_type] = [stream.step(x).clone() for x in inputs]
    assert (outs["none"][0] - outs["none"][1]).abs().max() > 1e-3
    assert (outs["none"][0] - outs["full"][0]).abs().max() > 1e-4
    assert (outs["none"][2] - outs["self"][2]).abs().max() > 1e-4
    interior = ((outs["none"][0] > 0) & (outs["none"][0] < 1)).float().mean()
    assert interior > 0.5, "decoded frames are mostly clamped: the image comparison would be weak"
