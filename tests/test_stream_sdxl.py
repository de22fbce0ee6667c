"""SDXL in the stream (issue #15): a tiny SDXL-shaped random model against the plain reference of
docs/DESIGN.md sections 2 and 9, and the stream's first frame against diffusers'
``StableDiffusionXLImg2ImgPipeline`` with an ``LCMScheduler`` given the same noise.

The tiny model (``random_models`` preset ``tiny-xl``) has what makes SDXL different: two text encoders (the
second a ``CLIPTextModelWithProjection``), a UNet with text/time added conditions and two transformer layers
per block at its attention level, a VAE scaled by 0.13025.
"""

from __future__ import annotations

import pytest
import torch
from stream_helpers import SIZE, frame_groups, make_config, make_frames
from test_stream_reference import CALLS, T_INDEX, _pair, compare

from streamrt import Stream, StreamModels
from streamrt.families import SDXL
from streamrt.prompts import TextEmbedding
from streamrt.random_models import random_stream_models


def _models(vae: str = "full") -> StreamModels:
    return random_stream_models("tiny-xl", seed=3, vae="kl" if vae == "full" else vae)


@pytest.fixture(scope="module")
def xl_models() -> StreamModels:
    return _models()


@pytest.fixture(scope="module")
def xl_taesd_models() -> StreamModels:
    return _models("taesd")


def test_the_tiny_model_is_sdxl_shaped(xl_models):
    assert xl_models.family is SDXL
    assert xl_models.pooled_dim == xl_models.text_encoder_2.config.projection_dim
    assert xl_models.embed_dim == (xl_models.text_encoder.config.hidden_size
                                   + xl_models.text_encoder_2.config.hidden_size)
    assert xl_models.vae_scaling_factor == 0.13025


@pytest.mark.parametrize("frames_per_step", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
def test_img2img_matches_reference(xl_models, cfg_type, n, frames_per_step):
    stream, ref = _pair(xl_models, cfg_type=cfg_type, t_index_list=T_INDEX[n], frames_per_step=frames_per_step,
                        guidance_scale=1.5)
    compare(stream, ref, frame_groups(CALLS, frames_per_step, seed=n * 10 + frames_per_step))


@pytest.mark.parametrize("cfg_type", ["full", "initialize"])
def test_an_empty_negative_prompt_is_zeros(xl_models, cfg_type):
    """diffusers' force_zeros_for_empty_prompt: the negative rows hold zeros, pooled too, not an encoded ""."""
    stream, ref = _pair(xl_models, negative_prompt="", cfg_type=cfg_type, t_index_list=T_INDEX[2],
                        guidance_scale=1.5)
    u = stream.config.uncond_rows
    assert not stream.buffers.embeds[:u].any() and not stream.buffers.pooled[:u].any()
    assert stream.buffers.pooled[u:].abs().sum() > 0
    compare(stream, ref, frame_groups(3, 1, seed=5))


@pytest.mark.parametrize("frames_per_step", [1, 2])
@pytest.mark.parametrize("cfg_type", ["none", "self"])
def test_txt2img_matches_reference(xl_models, cfg_type, frames_per_step):
    stream, ref = _pair(xl_models, cfg_type=cfg_type, t_index_list=T_INDEX[2], frames_per_step=frames_per_step)
    compare(stream, ref, [None] * CALLS)


@pytest.mark.parametrize("cfg_type", ["none", "full"])
def test_taesdxl_matches_reference(xl_taesd_models, cfg_type):
    stream, ref = _pair(xl_taesd_models, cfg_type=cfg_type, t_index_list=T_INDEX[2], guidance_scale=1.5)
    compare(stream, ref, frame_groups(CALLS, 1, seed=7))


def test_prompt_change_rewrites_pooled_and_matches_reference(xl_models):
    stream, ref = _pair(xl_models, cfg_type="full", t_index_list=T_INDEX[2], guidance_scale=1.5)

    def on_call(k, stream, ref):
        if k == 3:
            stream.set_prompt("a red dog")
            ref.set_prompt("a red dog", ref_negative)

    ref_negative = "blurry photo"
    before = stream.buffers.pooled.clone()
    compare(stream, ref, frame_groups(CALLS, 1, seed=11), on_call=on_call)
    assert not torch.equal(stream.buffers.pooled, before)


def test_pooled_embedding_changes_the_output(xl_models):
    """The pooled embedding reaches the UNet: same tokens, another pooled vector, other frames."""
    config = make_config(cfg_type="none", t_index_list=(20,))
    enc = xl_models.prompt_encoder.encode("a photo of a cat")
    other = TextEmbedding(enc.tokens, enc.pooled.flip(-1))
    frames = make_frames(1, seed=4)
    a = Stream(xl_models, config, prompt=enc).step(frames)
    b = Stream(xl_models, config, prompt=other).step(frames)
    assert (a - b).abs().max() > 1e-4


def test_embeddings_without_pooled_are_refused(xl_models):
    tokens = xl_models.prompt_encoder.encode("a cat").tokens
    with pytest.raises(ValueError, match="pooled"):
        Stream(xl_models, make_config(cfg_type="none"), prompt=tokens)
    stream = Stream(xl_models, make_config(cfg_type="none"), prompt="a cat")
    with pytest.raises(ValueError, match=r"shape \[1, 32\]"):
        stream.set_prompt(TextEmbedding(tokens, torch.zeros(1, 7)))
    assert stream.step(make_frames(1, seed=1)).shape == (1, SIZE, SIZE, 3)  # the stream is unharmed


def test_blends_blend_the_pooled_embeddings_too(xl_models):
    config = make_config(cfg_type="none", t_index_list=(20,))
    stream = Stream(xl_models, config, prompt=[("a cat", 1.0), ("a red dog", 3.0)])
    cat, dog = (xl_models.prompt_encoder.encode(t) for t in ("a cat", "a red dog"))
    torch.testing.assert_close(stream.buffers.pooled[0], (0.25 * cat.pooled + 0.75 * dog.pooled)[0])
    torch.testing.assert_close(stream.buffers.embeds[0], (0.25 * cat.tokens + 0.75 * dog.tokens)[0])


# --------------------------------------------------------------------------- diffusers' SDXL img2img pipeline


def _diffusers_img2img(models: StreamModels):
    from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline(
        vae=models.vae, text_encoder=models.text_encoder, text_encoder_2=models.text_encoder_2,
        tokenizer=models.tokenizer, tokenizer_2=models.tokenizer_2, unet=models.unet,
        scheduler=LCMScheduler.from_config(models.scheduler.config)).to("cpu")


@pytest.mark.parametrize("t_index", [20, 40])
def test_first_frame_equals_diffusers_sdxl_img2img_with_taesd(xl_taesd_models, t_index):
    """One step: the stream's frame is the pipeline's image for the same input, prompt, timestep and noise.

    The stream's noise is drawn from a CPU generator seeded with the config's seed, the pipeline's from the same
    generator; the pipeline runs exactly the stream's timestep (given as ``timesteps=[t]``)."""
    models = xl_taesd_models
    config = make_config(cfg_type="none", t_index_list=(t_index,), seed=9)
    stream = Stream(models, config, prompt="a photo of a cat")
    frames = make_frames(1, seed=3)
    ours = stream.step(frames)
    t = int(stream.schedule.timesteps[0])
    pipe = _diffusers_img2img(models)
    with torch.inference_mode():
        theirs = pipe(prompt="a photo of a cat", image=frames.permute(0, 3, 1, 2), timesteps=[t], strength=1.0,
                      guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(config.seed),
                      output_type="pt").images
    assert theirs.shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(ours, theirs.permute(0, 2, 3, 1), rtol=0, atol=1e-5)


def test_first_frame_equals_diffusers_sdxl_img2img_with_the_full_vae(xl_models):
    """With the full VAE: the pipeline samples the latent distribution where the stream takes its mean (the stream
    is deterministic), so the pipeline gets the mean's scaled latents as its image (which it then uses as is)."""
    models = xl_models
    config = make_config(cfg_type="none", t_index_list=(30,), seed=4)
    stream = Stream(models, config, prompt="a red dog")
    frames = make_frames(1, seed=8)
    ours = stream.step(frames)
    with torch.inference_mode():
        latents = models.vae.encode(frames.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
    pipe = _diffusers_img2img(models)
    with torch.inference_mode():
        theirs = pipe(prompt="a red dog", image=latents * models.vae.config.scaling_factor,
                      timesteps=[int(stream.schedule.timesteps[0])], strength=1.0, guidance_scale=0.0,
                      generator=torch.Generator("cpu").manual_seed(config.seed), output_type="pt",
                      original_size=(SIZE, SIZE), target_size=(SIZE, SIZE)).images
    torch.testing.assert_close(ours, theirs.permute(0, 2, 3, 1), rtol=0, atol=1e-5)
