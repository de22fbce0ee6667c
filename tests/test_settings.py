"""The sampler's numbers in the core: steps and strength onto the LCM schedule, and the settings the settings nodes
chain (streamrt.schedule.strength_t_index_list, streamrt.settings.StreamSettings). Pure functions: no models."""

from __future__ import annotations

import math

import pytest
import torch

from streamrt import (
    Acceleration,
    CfgType,
    FrameError,
    SimilarityFilterConfig,
    StreamConfig,
    StreamSettings,
    strength_t_index_list,
)
from streamrt.kv_cache import KVCacheConfig


@pytest.mark.parametrize(("steps", "strength", "length", "expected"), [
    (2, 0.36, 50, (32, 41)),          # the sampler's defaults
    (1, 0.36, 50, (32,)),
    (4, 0.36, 50, (32, 36, 41, 45)),
    (8, 0.36, 50, (32, 34, 36, 38, 41, 43, 45, 47)),
    (2, 1.0, 50, (0, 25)),            # full strength starts at the noisiest timestep
    (1, 0.01, 50, (49,)),             # round(0.5) = 0: the first index is clamped to the last one
    (2, 0.5, 4, (2, 3)),
    (1, 0.999, 1, (0,)),
])
def test_steps_and_strength_map_onto_the_schedule(steps, strength, length, expected):
    assert strength_t_index_list(steps, strength, length) == expected


def test_every_mapping_is_a_valid_t_index_list_or_names_steps_and_strength():
    """Over the sampler's whole input range: strictly increasing indices inside the schedule (what StreamConfig
    accepts), the first at N - round(strength * N), or an error naming both inputs."""
    for length in (1, 4, 10, 50):
        for steps in range(1, 9):
            for hundredths in range(1, 101):
                strength = hundredths / 100
                try:
                    indices = strength_t_index_list(steps, strength, length)
                except ValueError as exc:
                    assert f"steps={steps}" in str(exc) and f"strength={strength:g}" in str(exc)
                    assert steps > length - min(max(length - round(strength * length), 0), length - 1)
                    continue
                assert len(indices) == steps
                assert indices[0] == min(max(length - round(strength * length), 0), length - 1)
                StreamConfig(t_index_list=indices, num_inference_steps=length)  # validates: in range, increasing


@pytest.mark.parametrize(("steps", "strength", "words"), [
    (8, 0.1, ["steps=8", "strength=0.1", "leaves 5", "45..49"]),
    (0, 0.36, ["steps must be", "0"]),
    (2, 0.0, ["strength must be in (0, 1]", "0"]),
    (2, 1.5, ["strength must be in (0, 1]", "1.5"]),
    (2, math.nan, ["strength must be in (0, 1]", "nan"]),
])
def test_impossible_steps_and_strength_are_refused_by_name(steps, strength, words):
    with pytest.raises(ValueError) as info:
        strength_t_index_list(steps, strength)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_no_settings_are_the_sampler_defaults():
    config = StreamSettings().stream_config(frame_size=(64, 96))
    assert (config.width, config.height) == (96, 64)  # 0: the frames' size
    assert config.t_index_list == (32, 41) and config.num_inference_steps == 50
    assert config.cfg_type is CfgType.SELF and config.guidance_scale == 1.2 and config.delta == 1.0
    assert config.frames_per_step == 1 and config.do_add_noise and config.seed == 2
    assert config.acceleration is Acceleration.AUTO
    assert not config.similarity_filter.enabled and not config.kv_cache.enabled
    assert config.fused_qkv and config.prompt_kv
    txt2img = StreamSettings().stream_config()
    assert (txt2img.width, txt2img.height) == (512, 512)


def test_the_sampler_numbers_and_the_settings_make_the_config():
    settings = StreamSettings(cfg_type="full", delta=0.5, frames_per_step=2, add_noise=False, acceleration="eager",
                              width=128, height=0, schedule_length=40, fused_projections=False)
    config = settings.stream_config(steps=3, strength=0.5, guidance_scale=2.0, seed=9, frame_size=(64, 96))
    assert not config.fused_qkv
    assert (config.width, config.height) == (128, 64)
    assert config.t_index_list == strength_t_index_list(3, 0.5, 40) and config.num_inference_steps == 40
    assert (config.cfg_type, config.delta, config.frames_per_step, config.do_add_noise) == (CfgType.FULL, 0.5, 2, False)
    assert (config.acceleration, config.guidance_scale, config.seed) == (Acceleration.EAGER, 2.0, 9)
    # an explicit t_index_list overrides steps and strength
    assert settings.stream_config(t_index_list=(5, 30), steps=3, strength=0.5).t_index_list == (5, 30)


def test_chained_settings_apply_later_fields_over_earlier_ones():
    """What the settings nodes do: each applies its own fields to what came before (with_), the rest carries."""
    stream = StreamSettings().with_(cfg_type="initialize", frames_per_step=4, acceleration="eager")
    filtered = stream.with_(similarity_filter=SimilarityFilterConfig(True, 0.9, 3))
    cached = filtered.with_(kv_cache=KVCacheConfig(True, 3, 2, 1))
    again = cached.with_(cfg_type="none")  # a second Stream Settings node further down the chain
    assert again.similarity_filter == SimilarityFilterConfig(True, 0.9, 3)
    assert again.kv_cache == KVCacheConfig(True, 3, 2, 1)
    assert (again.cfg_type, again.frames_per_step, again.acceleration) == (CfgType.NONE, 4, Acceleration.EAGER)
    assert stream.kv_cache == KVCacheConfig() and not stream.similarity_filter.enabled  # immutable: earlier unchanged
    with pytest.raises(AttributeError):
        stream.cfg_type = CfgType.FULL  # frozen


@pytest.mark.parametrize(("changes", "words"), [
    (dict(cfg_type="fancy"), ["cfg_type", "fancy"]),
    (dict(acceleration="fast"), ["acceleration", "fast"]),
    (dict(delta=math.nan), ["delta", "nan"]),
    (dict(delta=-1.0), ["delta", "-1"]),
    (dict(width=60), ["width", "multiple of 8", "60"]),
    (dict(height=-8), ["height", "-8"]),
    (dict(frames_per_step=0), ["frames_per_step"]),
    (dict(schedule_length=0), ["schedule_length"]),
])
def test_bad_settings_are_refused_by_name(changes, words):
    with pytest.raises(ValueError) as info:
        StreamSettings().with_(**changes)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


# ---- the input's size: resized to the settings' size, or kept (a multiple of 8) -------------------------
def test_a_size_in_the_settings_resizes_the_input():
    """Width and height in the settings are what the stream runs at: frames of any other size are resized to
    them (bilinear, each side on its own), so the config and the frames always agree."""
    frames = torch.rand(3, 100, 100, 3, generator=torch.Generator().manual_seed(0))
    settings = StreamSettings(width=96, height=64)
    config = settings.stream_config(frame_size=(100, 100))
    fitted = settings.fit_frames(frames)
    assert (config.width, config.height) == (96, 64) and fitted.shape == (3, 64, 96, 3)
    expected = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2), size=(64, 96), mode="bilinear",
                                               align_corners=False).permute(0, 2, 3, 1)
    assert torch.equal(fitted, expected) and fitted.is_contiguous()
    # shrunk below half: filtered first (antialiased), so fine detail averages out instead of aliasing
    stripes = torch.zeros(1, 100, 100, 3)
    stripes[:, :, ::2] = 1.0  # one-pixel stripes: plain bilinear at 1/4 picks stripes, the filter averages them
    small = StreamSettings(width=24, height=24).fit_frames(stripes)
    assert small.shape == (1, 24, 24, 3) and (small - 0.5).abs().max() < 0.1
    assert 0 <= fitted.min() and fitted.max() <= 1
    # a flat frame stays flat (no ringing), and one side set keeps the input's other side
    flat = torch.full((1, 100, 100, 3), 0.25)
    assert torch.allclose(StreamSettings(width=48).fit_frames(flat), torch.full((1, 100, 48, 3), 0.25))
    assert StreamSettings(width=48).stream_config(frame_size=(96, 100)).height == 96
    # the right size already, or no size set: the very same tensor (nothing copied)
    exact = torch.rand(1, 64, 96, 3)
    assert settings.fit_frames(exact) is exact
    assert StreamSettings().fit_frames(frames) is frames
    assert settings.fit_frames(None) is None


def test_the_input_size_must_be_a_multiple_of_8_and_the_error_says_how_to_resize():
    """A 100x100 input without a size in the settings: the error names the input's real size and the fix (a width
    and height in the settings resize it), not "width must be a multiple of 8, got 100" while the widget shows 0."""
    with pytest.raises(FrameError) as info:
        StreamSettings().stream_config(frame_size=(100, 100))
    message = str(info.value)
    for words in ("100x100", "multiples of 8", "set width and height in the stream settings", "96x96"):
        assert words in message, message
    with pytest.raises(FrameError, match=r"101x60, .*\(e\.g\. 96x56\)"):  # (height, width): 60 high, 101 wide
        StreamSettings().stream_config(frame_size=(60, 101))
    assert StreamSettings(width=96, height=96).stream_config(frame_size=(100, 100)).width == 96  # resized: fine


def test_shapes_ahead_of_the_stream_come_from_the_settings():
    """What Build Engines builds for: the settings' cfg type, frames per step and size with the sampler's steps,
    so a stream of the same settings has exactly those shapes."""
    settings = StreamSettings(cfg_type="full", frames_per_step=2, width=128, height=64)
    shapes = settings.shapes_config(steps=3)
    stream = settings.stream_config(steps=3, guidance_scale=1.5, frame_size=(480, 640))
    assert (shapes.width, shapes.height, shapes.unet_rows) == (stream.width, stream.height, stream.unet_rows) == (
        128, 64, 2 * 3 * 2)
    assert StreamSettings(cfg_type="none").shapes_config(steps=2, width=64, height=64).unet_rows == 2
    assert settings.shapes_config(steps=3, width=128, height=64).width == 128  # the same size again: fine
    # the settings take the input's size: the input's size is given here
    assert (StreamSettings().shapes_config(steps=1, width=96, height=72).width, 72) == (96, 72)
    with pytest.raises(ValueError, match="no width: the settings take the input's width"):
        StreamSettings().shapes_config(steps=2)
    with pytest.raises(ValueError, match="width 512 differs from the settings' width 128: the sampler resizes"):
        settings.shapes_config(steps=2, width=512)
    with pytest.raises(ValueError, match="steps must be in"):
        settings.shapes_config(steps=0)
