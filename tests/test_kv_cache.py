"""Cached attention across frames (docs/DESIGN.md section 3) against a naive reference (CPU, float32, tiny models).

The reference (:class:`NaiveCachedSelfAttn`) keeps, per ``attn1`` layer, a Python list of the (K, V) of
past UNet calls (appended every ``interval`` calls), concatenates the last ``window`` of them after the
current tokens with ``torch.cat`` and runs plain softmax attention. It is installed on a second load of
the same model files, and a second :class:`Stream` with the stream's own cache *disabled* drives it: such
a stream passes no cache and, its UNet carrying processors of its own, installs nothing (nor keeps its
prompt's cross-attention keys and values), so the UNet simply runs the reference processors and the two
streams run the same stream algorithm over the two caches.

The prompt's cross-attention keys and values (:class:`~streamrt.kv_cache.PromptKV`) are checked at the end: the
same frames bit for bit as projecting the prompt in every call, through prompt changes, with none of the
projections run per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from engine_helpers import tiny_xl_stream_models
from stream_helpers import NEGATIVE, assert_all_equal, make_config, make_frames, quiet_load, run_steps

from streamrt import Stream
from streamrt.kv_cache import NEVER, CachedSelfAttnProcessor, CrossAttnProcessor, KVCacheConfig
from streamrt.random_models import component_configs

ATOL = 1e-5          # output frames in [0, 1]
LATENT_ATOL = 1e-4   # denoised latents x0 (all B rows, magnitudes up to ~7)
#: tiny-xl's denoised latents reach ~20 with n = 2, and the float32 rounding of the two attention implementations
#: (SDPA under a mask vs the reference's softmax) shows there at up to ~1e-4 already on the first call, when
#: nothing is cached; a wrong window, interval or no cache moves them by 8e-3 (n = 1) to 0.2 (n = 2)
#: (``test_sdxl_reference_comparison_is_sensitive``)
XL_LATENT_ATOL = 3e-4
SHARPEN = 6.0        # attn1 query and key weights are scaled by this in the models under test (see `models`)
PROMPT, PROMPT_2 = "a cat", "a red dog"
T_INDEX = {1: (45,), 2: (20, 35)}


def _sharpened(models):
    """Scale every attn1 query and key projection by ``SHARPEN``.

    With the random weights the attention is almost uniform, and the cached frames (encoded from the
    same fixed stream noise) move a one-step (n = 1) prediction by only ~1e-4 and the decoded frame by
    ~1e-6, below any useful tolerance. Sharper attention makes the cache's effect ~1e-2 on the latents
    and ~1e-4 on the frames while the reference still agrees to ~1e-6 / ~1e-7
    (``test_reference_comparison_is_sensitive`` checks the margin).
    """
    for name, module in models.unet.named_modules():
        if name.endswith("attn1"):
            module.to_q.weight.mul_(SHARPEN)
            module.to_k.weight.mul_(SHARPEN)
    return models


@pytest.fixture(scope="module")
def models(tiny_folders):
    """The tiny pipeline (TAESD VAE) used by the streams with the cache under test."""
    return _sharpened(quiet_load(tiny_folders["tiny"], taesd=tiny_folders["taesd"]))


@pytest.fixture(scope="module")
def ref_models(tiny_folders):
    """A second load of the same files: its UNet carries the naive reference processors."""
    return _sharpened(quiet_load(tiny_folders["tiny"], taesd=tiny_folders["taesd"]))


@pytest.fixture(scope="module")
def xl_models():
    """The SDXL-shaped tiny pipeline (``tiny-xl``: a down block without attention, two transformer layers per
    block at the attention level, added conditions), sharpened like ``models``."""
    return tiny_xl_stream_models(seed=0, sharpen=SHARPEN)


@pytest.fixture(scope="module")
def xl_ref_models():
    """The same tiny-xl weights again (built from the same seed): its UNet carries the reference processors."""
    return tiny_xl_stream_models(seed=0, sharpen=SHARPEN)


# ---------------------------------------------------------------------------------------------- reference
@dataclass
class NaiveControl:
    """Window / interval of the reference, shared by its layers; ``clear`` forgets every layer's history."""

    window: int
    interval: int
    layers: list = field(default_factory=list)

    def clear(self) -> None:
        for layer in self.layers:
            layer.past.clear()
            layer.calls = 0


class NaiveCachedSelfAttn:
    """attn1 with an explicit history: keys/values = cat([current] + last ``window`` stored (K, V))."""

    def __init__(self, control: NaiveControl) -> None:
        self.control = control
        self.past: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.calls = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert encoder_hidden_states is None and attention_mask is None and not kwargs
        assert hidden_states.ndim == 3 and attn.group_norm is None and attn.spatial_norm is None
        assert attn.norm_q is None and attn.norm_k is None
        rows, tokens, _ = hidden_states.shape
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        past = self.past[-self.control.window:]
        keys = torch.cat([key] + [k for k, _ in past], dim=1)
        values = torch.cat([value] + [v for _, v in past], dim=1)
        for k, _ in past:
            assert k.shape == key.shape  # row r of the history is row r of the batch
        heads = attn.heads
        d = key.shape[-1] // heads
        assert math.isclose(attn.scale, d ** -0.5)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(rows, t.shape[1], heads, d).permute(0, 2, 1, 3)

        weights = torch.softmax(split(query) @ split(keys).transpose(-1, -2) / math.sqrt(d), dim=-1)
        out = (weights @ split(values)).permute(0, 2, 1, 3).reshape(rows, tokens, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        out = out / attn.rescale_output_factor
        if self.calls % self.control.interval == 0:
            self.past.append((key.clone(), value.clone()))
        self.calls += 1
        return out


def install_reference(unet, window: int, interval: int) -> NaiveControl:
    """Naive processors on every attn1, diffusers' plain ``AttnProcessor`` on the others."""
    control = NaiveControl(window, interval)
    processors = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            processors[name] = NaiveCachedSelfAttn(control)
            control.layers.append(processors[name])
        else:
            processors[name] = AttnProcessor()
    unet.set_attn_processor(processors)
    return control


def kv_config(n: int = 2, cfg_type: str = "self", *, max_frames: int = 3, window: int = 3, interval: int = 1,
              frames_per_step: int = 1, **changes):
    return make_config(t_index_list=T_INDEX[n], cfg_type=cfg_type, frames_per_step=frames_per_step,
                       kv_cache=KVCacheConfig(True, max_frames, window, interval), **changes)


def stream_pair(models, ref_models, config, **kwargs) -> tuple[Stream, Stream, NaiveControl]:
    """The stream under test and the reference stream (same config with the stream's cache off)."""
    kv = config.kv_cache
    ours = Stream(models, config, **kwargs)
    control = install_reference(ref_models.unet, kv.window, kv.interval)
    ref = Stream(ref_models, config.with_(kv_cache=KVCacheConfig()), **kwargs)
    # the reference stream calls the UNet without a cache (SDXL's added conditions both streams pass alike); its
    # naive processors keep it from caching the prompt's keys and values and fusing its projections, which ours does
    assert ref.kv is None and ref.prompt_kv is None
    assert ref.unet_extras.given == ours.unet_extras.given - {"kv_cache", "prompt_kv", "fused_qkv"}
    assert "fused_qkv" in ours.unet_extras.given
    assert ours.prompt_kv is not None
    assert ours.kv is not None and ours.unet_extras.kv_cache is ours.kv
    return ours, ref, control


def groups(calls: int, f: int = 1, seed: int = 0) -> list[torch.Tensor]:
    return [make_frames(f, seed * 1000 + k) for k in range(calls)]


def record(stream: Stream, inputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Step through ``inputs``; per call the output frames and the denoised latents of all B rows."""
    return [(stream.step(frames).clone(), stream.buffers.x0_32.clone()) for frames in inputs]


def max_diffs(got, expected) -> tuple[float, float]:
    """Largest difference of the frames and of the latents between two :func:`record` results."""
    assert len(got) == len(expected)
    frames = max((a[0] - b[0]).abs().max().item() for a, b in zip(got, expected))
    latents = max((a[1] - b[1]).abs().max().item() for a, b in zip(got, expected))
    return frames, latents


def assert_close_records(got, expected, latent_atol: float = LATENT_ATOL) -> None:
    frames, latents = max_diffs(got, expected)
    assert frames <= ATOL and latents <= latent_atol, f"frames differ by {frames:.3g}, latents by {latents:.3g}"


def assert_close_lists(got, expected, atol: float = ATOL) -> None:
    assert len(got) == len(expected)
    for k, (a, b) in enumerate(zip(got, expected)):
        diff = (a - b).abs().max().item()
        assert diff <= atol, f"output {k} differs from the reference by {diff:.3g}"


# ---------------------------------------------------------------------------------------------- vs reference
# (n, cfg_type, F, M, window, interval, {call: (window, interval or None)})
CASES = [
    (1, "none", 1, 3, 1, 1, {}),
    (1, "none", 1, 3, 2, 2, {}),
    (1, "self", 1, 3, 3, 1, {}),
    (1, "full", 1, 2, 2, 3, {}),
    (1, "self", 1, 3, 3, 2, {2: (1, None), 5: (3, None)}),
    (2, "self", 1, 3, 2, 1, {}),
    (2, "self", 1, 3, 3, 3, {}),
    (2, "full", 1, 3, 1, 2, {}),
    (2, "full", 1, 4, 4, 1, {}),
    (2, "self", 2, 3, 2, 2, {}),
    (2, "initialize", 1, 3, 3, 2, {}),
    (2, "self", 1, 4, 4, 1, {3: (1, None), 6: (3, None)}),
    (2, "full", 1, 3, 3, 1, {4: (2, 3), 7: (1, 2)}),
]


@pytest.mark.parametrize(("n", "cfg_type", "f", "max_frames", "window", "interval", "changes"), CASES,
                         ids=[f"n{c[0]}-{c[1]}-F{c[2]}-M{c[3]}-w{c[4]}-i{c[5]}{'-changes' if c[6] else ''}"
                              for c in CASES])
def test_matches_naive_reference(models, ref_models, n, cfg_type, f, max_frames, window, interval, changes):
    check_against_reference(models, ref_models, n, cfg_type, f, max_frames, window, interval, changes, layers=4)


def check_against_reference(models, ref_models, n, cfg_type, f, max_frames, window, interval, changes, *,
                            layers: int, latent_atol: float = LATENT_ATOL) -> None:
    """Ten calls of the stream under test and of the reference stream (with the window / interval changes at the
    calls ``changes`` names): the same frames and latents; ``layers`` attn1 layers cached, one row each per
    UNet row."""
    config = kv_config(n, cfg_type, max_frames=max_frames, window=window, interval=interval, frames_per_step=f)
    ours, ref, control = stream_pair(models, ref_models, config, prompt=PROMPT, negative_prompt=NEGATIVE)
    got, expected = [], []
    for call, frames in enumerate(groups(10, f, seed=n)):
        if call in changes:
            new_window, new_interval = changes[call]
            ours.set_cache_window(new_window, new_interval)
            control.window = new_window
            control.interval = new_interval or control.interval
            assert ours.config.kv_cache.window == new_window
        got += record(ours, [frames])
        expected += record(ref, [frames])
    assert_close_records(got, expected, latent_atol)
    assert len(control.layers) == len(ours.kv.layers) == layers
    rows = {b.key.shape[0] for b in ours.kv.layers.values()}
    assert rows == {config.unet_rows}


@pytest.mark.parametrize("n", [1, 2])
def test_reference_comparison_is_sensitive(models, ref_models, n):
    """The tolerances are far below what a wrong window, a wrong interval or no cache at all changes.

    The decoded frames of the tiny TAESD move little (n = 1: ~1e-4 for a window off by one); the
    latents carry the margin (> 10x their tolerance).
    """
    config = kv_config(n, "self", max_frames=3, window=2, interval=1)
    inputs = groups(6, seed=5)
    ours = record(Stream(models, config, prompt=PROMPT), inputs)
    plain = record(Stream(models, config.with_(kv_cache=KVCacheConfig()), prompt=PROMPT), inputs)
    frames, latents = max_diffs(ours[:1], plain[:1])  # first call: nothing cached, only the current tokens
    assert frames <= ATOL and latents <= LATENT_ATOL
    for window, interval in ((1, 1), (3, 1), (2, 2)):
        install_reference(ref_models.unet, window, interval)
        ref = Stream(ref_models, config.with_(kv_cache=KVCacheConfig()), prompt=PROMPT)
        frames, latents = max_diffs(ours, record(ref, inputs))
        assert frames > 5 * ATOL and latents > 10 * LATENT_ATOL, (window, interval, frames, latents)
    frames, latents = max_diffs(ours, plain)
    assert frames > 5 * ATOL and latents > 10 * LATENT_ATOL


# ---------------------------------------------------------------------------------------------- SDXL
#: the CASES run on the SDXL-shaped pipeline too: every cfg type, F = 2, window and interval changes
XL_CASES = [CASES[i] for i in (1, 3, 5, 9, 10, 12)]


@pytest.mark.parametrize(("n", "cfg_type", "f", "max_frames", "window", "interval", "changes"), XL_CASES,
                         ids=[f"n{c[0]}-{c[1]}-F{c[2]}-M{c[3]}-w{c[4]}-i{c[5]}{'-changes' if c[6] else ''}"
                              for c in XL_CASES])
def test_sdxl_matches_naive_reference(xl_models, xl_ref_models, n, cfg_type, f, max_frames, window, interval,
                                      changes):
    """The same semantics on SDXL's UNet: every attn1 layer of its deeper transformer blocks is cached (none in the
    down block without attention), and a stream with SDXL's added conditions and the cache gives the naive
    reference's frames and latents."""
    check_against_reference(xl_models, xl_ref_models, n, cfg_type, f, max_frames, window, interval, changes,
                            layers=len(xl_cache_layers(xl_models, 64)), latent_atol=XL_LATENT_ATOL)


def xl_cache_layers(models, size: int) -> list[tuple[int, int]]:
    """``(S_l, C_l)`` of the tiny-xl UNet's attn1 layers from its config alone (:func:`attn1_layers_from_config`)."""
    h = size // models.vae_scale_factor
    return attn1_layers_from_config(dict(models.unet.config), h, h)


def test_sdxl_cache_layers_follow_the_unet_structure(xl_models):
    """tiny-xl's transformer_layers_per_block (1, 2) with a plain first down block: 2 attn1 layers in the down
    block with attention, 2 in the mid block, 4 in the up block with attention (8 in all), each at its level's
    token count and width, and the stream's cache holds exactly those (rows and bytes as the formula says)."""
    config = kv_config(2, "full", max_frames=3, window=2)
    stream = Stream(xl_models, config, prompt=PROMPT, negative_prompt=NEGATIVE)
    expected = xl_cache_layers(xl_models, config.height)
    assert len(expected) == 8 and xl_models.unet.config.transformer_layers_per_block == (1, 2)
    assert xl_models.unet.config.down_block_types[0] == "DownBlock2D"
    got = [(b.tokens, b.key.shape[-1]) for b in stream.kv.layers.values()]
    assert sorted(got) == sorted(expected)
    assert {b.key.shape[0] for b in stream.kv.layers.values()} == {config.unet_rows}
    h = config.height // xl_models.vae_scale_factor
    assert stream.kv.ring_nbytes() == ring_bytes_formula(dict(xl_models.unet.config), h, h, config.unet_rows, 3, 4)
    before = stream.kv.nbytes()
    stream.step(make_frames(1, 0))
    assert stream.kv.nbytes() == before  # allocated when the stream was made, not by the first call


def test_sdxl_reference_comparison_is_sensitive(xl_models, xl_ref_models):
    """On tiny-xl too the tolerances are far below what a wrong window, a wrong interval or no cache changes (by
    more than 20x, n = 1 and n = 2), while the right reference is inside them; on the first call, with nothing
    cached, the cached stream is the plain one."""
    inputs = groups(6, seed=5)
    for n_steps in (1, 2):
        config = kv_config(n_steps, "self", max_frames=3, window=2, interval=1)
        ours = record(Stream(xl_models, config, prompt=PROMPT), inputs)
        for window, interval in ((2, 1), (1, 1), (3, 1), (2, 2)):
            install_reference(xl_ref_models.unet, window, interval)
            ref = Stream(xl_ref_models, config.with_(kv_cache=KVCacheConfig()), prompt=PROMPT)
            frames, latents = max_diffs(ours, record(ref, inputs))
            if (window, interval) == (2, 1):  # the right reference
                assert frames <= ATOL and latents <= XL_LATENT_ATOL, (n_steps, frames, latents)
            else:
                assert latents > 20 * XL_LATENT_ATOL, (n_steps, window, interval, frames, latents)
        plain = record(Stream(xl_models, config.with_(kv_cache=KVCacheConfig()), prompt=PROMPT), inputs)
        frames, latents = max_diffs(ours[:1], plain[:1])
        assert frames <= ATOL and latents <= XL_LATENT_ATOL, (n_steps, frames, latents)
        frames, latents = max_diffs(ours, plain)
        assert latents > 20 * XL_LATENT_ATOL, (n_steps, frames, latents)


def test_sdxl_window_bounds_the_influence_of_old_frames(xl_models):
    """The horizon on SDXL's 8 stacked attn1 layers: a frame reaches exactly the outputs of the next L * window
    calls (n = 1, cfg none: the cache is the only path between calls), and no later one, bit for bit."""
    config = kv_config(1, "none", max_frames=3, window=1, interval=1)
    layers, perturbed = 8, 1
    calls = perturbed + layers + 3
    inputs = groups(calls, seed=11)
    base = run_steps(Stream(xl_models, config, prompt=PROMPT), inputs)
    changed_inputs = list(inputs)
    changed_inputs[perturbed] = make_frames(1, 999)
    stream = Stream(xl_models, config, prompt=PROMPT)
    other = run_steps(stream, changed_inputs)
    assert len(stream.kv.layers) == layers
    changed = {k for k in range(calls) if not torch.equal(base[k], other[k])}
    expected = set(range(perturbed, perturbed + layers + 1))
    assert changed == predicted_influence(perturbed, calls, 1, 1, layers) == expected


# ---------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("cfg_type", ["self", "full"])
def test_disabled_cache_is_bit_identical(tiny_folders, cfg_type):
    """Cache off = the plain stream bit for bit, also after a cached stream installed its processors; so is a
    stream that keeps its prompt's cross-attention keys and values."""
    private = quiet_load(tiny_folders["tiny"], taesd=tiny_folders["taesd"])
    assert all(isinstance(p, AttnProcessor2_0) for p in private.unet.attn_processors.values())
    # the fused projections are the same numbers up to the GEMM's rounding, not bit for bit: off here
    plain_cfg = kv_config(2, cfg_type).with_(kv_cache=KVCacheConfig(), prompt_kv=False, fused_qkv=False)
    inputs = groups(6, seed=7)
    plain = run_steps(Stream(private, plain_cfg, prompt=PROMPT, negative_prompt=NEGATIVE), inputs)

    early = Stream(private, plain_cfg, prompt=PROMPT, negative_prompt=NEGATIVE)
    first_half = run_steps(early, inputs[:3])
    cached = Stream(private, kv_config(2, cfg_type, window=2), prompt=PROMPT, negative_prompt=NEGATIVE)
    run_steps(cached, inputs[:3])
    processors = private.unet.attn_processors
    assert sum(isinstance(p, CachedSelfAttnProcessor) for p in processors.values()) == 4
    assert sum(isinstance(p, CrossAttnProcessor) for p in processors.values()) == 4
    assert all(isinstance(p, (CachedSelfAttnProcessor, CrossAttnProcessor)) for p in processors.values())

    assert_all_equal(first_half + run_steps(early, inputs[3:]), plain)  # a stream that predates the install
    assert_all_equal(run_steps(Stream(private, plain_cfg, prompt=PROMPT, negative_prompt=NEGATIVE), inputs), plain)
    disabled = plain_cfg.with_(kv_cache=KVCacheConfig(False, max_frames=5, window=2, interval=3))
    stream = Stream(private, disabled, prompt=PROMPT, negative_prompt=NEGATIVE)
    assert stream.kv is None and stream.unet_extras.given == frozenset()
    assert_all_equal(run_steps(stream, inputs), plain)
    keeps = Stream(private, plain_cfg.with_(prompt_kv=True), prompt=PROMPT, negative_prompt=NEGATIVE)
    assert keeps.unet_extras.given == {"prompt_kv"}
    assert_all_equal(run_steps(keeps, inputs), plain)


# ---------------------------------------------------------------------------------------------- horizon
def predicted_influence(perturbed: int, calls: int, window: int, interval: int, layers: int) -> set[int]:
    """Outputs that depend on the input of call ``perturbed`` when the cache is the only cross-call path.

    Call c reads the K/V written by the last ``window`` write calls before it (``reads``). The K/V that
    layer l writes at call c come from hidden states that already went through layers 0..l-1 of call c,
    which attended to *their* cached K/V: ``dep(c, l) = {c} | dep(c', l') for l' < l, c' in reads(c)``.
    So the window bounds what one layer reads directly, while through the L stacked attn1 layers an
    output can depend on frames up to ``L * window`` writes back (StreamV2V features, like any feature
    cache fed by its own outputs, carry information further than the window).
    """
    writes = [c for c in range(calls) if c % interval == 0]

    def reads(c: int) -> list[int]:
        return [w for w in writes if w < c][-window:]

    dep: dict[tuple[int, int], set[int]] = {}
    outputs = []
    for c in range(calls):
        for layer in range(layers + 1):  # layers = the output
            s = {c}
            for lower in range(layer):
                for earlier in reads(c):
                    s |= dep[(earlier, lower)]
            dep[(c, layer)] = s
        outputs.append(dep[(c, layers)])
    return {c for c in range(calls) if perturbed in outputs[c]}


HORIZON_CASES = [  # (cfg_type, window, interval, perturbed call)
    ("none", 1, 1, 1),
    ("none", 2, 1, 1),
    ("full", 1, 1, 2),
    ("none", 1, 2, 2),   # a write call
    ("none", 1, 2, 3),   # a non-write call: never cached, influences its own output only
    ("none", 2, 2, 0),
    ("none", 3, 3, 3),
]


@pytest.mark.parametrize(("cfg_type", "window", "interval", "perturbed"), HORIZON_CASES)
def test_window_bounds_the_influence_of_old_frames(models, cfg_type, window, interval, perturbed):
    """Perturb one input frame; exactly the predicted outputs change, all others stay bit for bit.

    n = 1 and cfg none / full so that the cache is the only path between calls: with n > 1 the latent
    buffer x_buf carries every frame into the next n-1 calls (and the output lags by n-1), and RCFG
    (self / initialize) keeps a stock noise updated from each call's prediction,
    ``stock_k = rot(noise) + d(stock_{k-1}, eps_k)``, a recurrence that reaches back to the first frame.
    ``full`` and ``none`` with n = 1 carry nothing else (the similarity filter is off).

    With interval 1 and window w, one layer reads the previous w calls; frames older than the window
    still reach the output through the stacked layers, but nothing older than L * w calls does
    (:func:`predicted_influence`). Frames inside the window change the output.
    """
    config = kv_config(1, cfg_type, max_frames=3, window=window, interval=interval)
    calls = min(perturbed + 4 * window * interval + 3, 20)
    inputs = groups(calls, seed=11)
    base = run_steps(Stream(models, config, prompt=PROMPT, negative_prompt=NEGATIVE), inputs)
    changed_inputs = list(inputs)
    changed_inputs[perturbed] = make_frames(1, 999)
    stream = Stream(models, config, prompt=PROMPT, negative_prompt=NEGATIVE)
    other = run_steps(stream, changed_inputs)
    layers = len(stream.kv.layers)
    changed = {k for k in range(calls) if not torch.equal(base[k], other[k])}
    expected = predicted_influence(perturbed, calls, window, interval, layers)
    assert changed == expected
    if interval == 1:
        assert expected == set(range(perturbed, min(calls, perturbed + layers * window + 1)))
        assert perturbed + window in changed          # inside the window: the output changes
        assert perturbed + layers * window + 1 not in changed  # older than L * window: unchanged
    elif perturbed % interval:
        assert changed == {perturbed}  # never written: only its own output
    else:
        assert perturbed + 1 in changed  # a written frame reaches the next call


def test_predicted_influence_model():
    assert predicted_influence(0, 8, 1, 1, 1) == {0, 1}
    assert predicted_influence(0, 8, 2, 1, 1) == {0, 1, 2}
    assert predicted_influence(0, 12, 2, 1, 4) == set(range(9))
    assert predicted_influence(1, 8, 3, 2, 4) == {1}  # call 1 is no write call
    assert predicted_influence(0, 8, 1, 2, 1) == {0, 1, 2}  # calls 1 and 2 read the write of call 0


# ---------------------------------------------------------------------------------------------- state
def test_state_survives_calls_and_videos(models, ref_models):
    config = kv_config(2, "self", max_frames=3, window=2, interval=1)
    ours, ref, _ = stream_pair(models, ref_models, config, prompt=PROMPT)
    v1, v2 = make_frames(4, 31), make_frames(3, 32)
    got = [ours.process_video(v1), ours.process_video(v2)]
    expected = [ref.process_video(v1), ref.process_video(v2)]
    assert_close_lists(got, expected)   # the reference never forgets: so the stream kept its cache
    # process_video = single steps with a pre-roll of the last frame (latency calls), cache included
    stepwise = Stream(models, config, prompt=PROMPT)
    for video, result in zip((v1, v2), got):
        outs = run_steps(stepwise, list(video.split(1)) + [video[-1:]] * stepwise.latency)
        assert torch.equal(torch.cat(outs[stepwise.latency:]), result)
    assert ours.kv._calls == 4 + 3 + 2 * ours.latency


def test_a_full_window_attends_without_a_mask(models, ref_models):
    """Once every slot is written and the window spans them all, the call attends with no mask (SDPA's flash
    path); the frames stay those of the naive reference, and a smaller window, a reset or a seed change goes
    back to the mask until the ring is full again."""
    config = kv_config(2, "self", max_frames=3, window=3, interval=2)
    ours, ref, control = stream_pair(models, ref_models, config, prompt=PROMPT)
    got, expected, unmasked = [], [], []
    for call, frames in enumerate(groups(12, seed=41)):
        if call == 9:
            ours.set_cache_window(2)
            control.window = 2
        got += record(ours, [frames])
        expected += record(ref, [frames])
        unmasked.append(ours.kv.unmasked)
    assert_close_records(got, expected)
    # writes at calls 0, 2, 4 (interval 2): from call 5 on the three slots hold earlier frames
    assert unmasked == [False] * 5 + [True] * 4 + [False] * 3
    ours.reset()
    ours.step(make_frames(1, 3))
    assert not ours.kv.unmasked


@pytest.mark.parametrize("cfg_type", ["self", "full"])
def test_reset_replays_bit_for_bit(models, cfg_type):
    stream = Stream(models, kv_config(2, cfg_type, max_frames=3, window=2, interval=2), prompt=PROMPT,
                    negative_prompt=NEGATIVE)
    inputs = groups(7, seed=13)
    first = run_steps(stream, inputs)
    assert (stream.kv.age[:-1] < NEVER).all()
    stream.reset()
    assert (stream.kv.age == NEVER).all()
    assert_all_equal(run_steps(stream, inputs), first)


def test_set_seed_clears_the_cache(models, ref_models):
    """n = 1, cfg none: cache and noise are the whole state, so after set_seed the stream is a fresh one."""
    config = kv_config(1, "none", max_frames=3, window=3, interval=1)
    inputs = groups(8, seed=17)
    stream = Stream(models, config, prompt=PROMPT)
    run_steps(stream, inputs[:4])
    stream.set_seed(7)
    assert (stream.kv.age == NEVER).all()
    after = run_steps(stream, inputs[4:])
    fresh = run_steps(Stream(models, config.with_(seed=7), prompt=PROMPT), inputs[4:])
    assert_all_equal(after, fresh)
    calls = stream.kv._calls
    stream.set_seed(7)  # unchanged seed: nothing happens, the cache stays
    assert stream.kv._calls == calls and (stream.kv.age[:-1] < NEVER).all()

    # n = 2, RCFG: the reference clears its history at the same point
    config = kv_config(2, "self", max_frames=3, window=2, interval=1)
    ours, ref, control = stream_pair(models, ref_models, config, prompt=PROMPT)
    got, expected = record(ours, inputs[:4]), record(ref, inputs[:4])
    ours.set_seed(9)
    ref.set_seed(9)
    control.clear()
    got += record(ours, inputs[4:])
    expected += record(ref, inputs[4:])
    assert_close_records(got, expected)


def test_prompt_change_keeps_the_cache(models, ref_models):
    config = kv_config(2, "full", max_frames=3, window=3, interval=1)
    ours, ref, _ = stream_pair(models, ref_models, config, prompt=PROMPT, negative_prompt=NEGATIVE)
    inputs = groups(8, seed=19)
    got, expected = record(ours, inputs[:4]), record(ref, inputs[:4])
    ours.set_prompt(PROMPT_2)
    ref.set_prompt(PROMPT_2)  # the reference keeps its history
    got += record(ours, inputs[4:])
    expected += record(ref, inputs[4:])
    assert_close_records(got, expected)

    # n = 1, cfg none (the cache is the only state): a stream whose prompt changed at call 4 differs from a
    # fresh stream started at call 4 with the new prompt -- unless its cache is cleared at the change.
    config = kv_config(1, "none", max_frames=3, window=3, interval=1)
    fresh = run_steps(Stream(models, config, prompt=PROMPT_2), inputs[4:])
    for clear in (False, True):
        stream = Stream(models, config, prompt=PROMPT)
        run_steps(stream, inputs[:4])
        stream.set_prompt(PROMPT_2)
        if clear:
            stream.kv.clear()
        after = run_steps(stream, inputs[4:])
        if clear:
            assert_all_equal(after, fresh)
        else:
            assert not torch.equal(after[0], fresh[0])


# ---------------------------------------------------------------------------------------------- memory
def attn1_layers_from_config(unet_config: dict, latent_h: int, latent_w: int) -> list[tuple[int, int]]:
    """``(S_l, C_l)`` of every attn1 layer, from the UNet config alone (diffusers' block layout).

    Down block i (cross-attention) runs at level i with ``layers_per_block * transformer_layers`` attn1
    layers; the mid block at the last level; up block i at level ``L - 1 - i`` with one more layer.
    S_l = latent h * w / 4^level, C_l = the block's channels.
    """
    channels = list(unet_config["block_out_channels"])
    levels = len(channels)

    def per_block(value):
        return list(value) if isinstance(value, (list, tuple)) else [value] * levels

    layers_per_block = per_block(unet_config.get("layers_per_block", 2))
    transformer = per_block(unet_config.get("transformer_layers_per_block", 1))

    def level_tokens(level: int) -> int:
        assert latent_h % 2 ** level == 0 and latent_w % 2 ** level == 0
        return (latent_h // 2 ** level) * (latent_w // 2 ** level)

    out = []
    for i, block in enumerate(unet_config["down_block_types"]):
        if "CrossAttn" in block:
            out += [(level_tokens(i), channels[i])] * (layers_per_block[i] * transformer[i])
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        out += [(level_tokens(levels - 1), channels[-1])] * transformer[-1]
    for i, block in enumerate(unet_config["up_block_types"]):
        level = levels - 1 - i
        if "CrossAttn" in block:
            out += [(level_tokens(level), channels[level])] * ((layers_per_block[level] + 1) * transformer[level])
    return out


def ring_bytes_formula(unet_config: dict, latent_h: int, latent_w: int, rows: int, max_frames: int,
                       element_size: int) -> int:
    """docs/DESIGN.md section 3: M * rows * sum_l S_l * C_l * 2 (K and V) * bytes per element."""
    layers = attn1_layers_from_config(unet_config, latent_h, latent_w)
    return max_frames * rows * sum(s * c for s, c in layers) * 2 * element_size


def test_ring_nbytes_matches_the_formula(models):
    config = kv_config(2, "full", max_frames=3, window=2)
    stream = Stream(models, config, prompt=PROMPT, negative_prompt=NEGATIVE)
    stream.step(make_frames(1, 0))
    unet_config = dict(models.unet.config)
    h = w = config.height // models.vae_scale_factor
    rows = config.unet_rows
    assert rows == 4
    expected_layers = attn1_layers_from_config(unet_config, h, w)
    got_layers = [(b.tokens, b.key.shape[-1]) for b in stream.kv.layers.values()]
    assert sorted(got_layers) == sorted(expected_layers) and len(got_layers) == 4
    assert stream.kv.ring_nbytes() == ring_bytes_formula(unet_config, h, w, rows, 3, 4)
    assert stream.kv.nbytes() == stream.kv.ring_nbytes() * (3 + 2) // 3  # + current and scratch segments


def test_sd15_ring_is_about_46mb_per_row_and_frame():
    """SD1.5 at 512x512 fp16: K+V of one batch row and one frame is about 46 MB (docs/DESIGN.md section 3).

    The formula comes from the config alone; ``KVCache.ring_nbytes`` on a meta-device UNet (nothing
    allocated) must agree with it.
    """
    from diffusers import UNet2DConditionModel

    from streamrt.kv_cache import KVCache, install_kv_processors

    unet_config = component_configs("sd15")["unet"]
    per_row_frame = ring_bytes_formula(unet_config, 64, 64, rows=1, max_frames=1, element_size=2)
    assert len(attn1_layers_from_config(unet_config, 64, 64)) == 16
    assert abs(per_row_frame - 46e6) <= 0.01 * 46e6, per_row_frame

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    torch.nn.Module.to(unet, dtype=torch.float16)
    assert install_kv_processors(unet) == 16
    rows, frames = 2, 3
    cache = KVCache(KVCacheConfig(True, frames, frames, 1), torch.device("meta"))
    cache.schedule_call()
    cache.begin_call()
    with torch.no_grad():
        unet(torch.zeros(rows, 4, 64, 64, device="meta", dtype=torch.float16),
             torch.zeros(rows, device="meta", dtype=torch.long),
             encoder_hidden_states=torch.zeros(rows, 77, 768, device="meta", dtype=torch.float16),
             cross_attention_kwargs={"kv_cache": cache}, return_dict=False)
    assert len(cache.layers) == 16
    assert cache.ring_nbytes() == per_row_frame * rows * frames


@pytest.mark.parametrize("size", [512, 1024])
def test_sdxl_formula_matches_the_io_spec(size):
    """SDXL's 70 attn1 layers (the sdxl-turbo preset's UNet config, transformer_layers_per_block (1, 2, 10), a
    first down block without attention): the formula from the config alone and ``kv_cache_io_spec`` on the meta
    device agree on every layer and on the bytes (docs/DESIGN.md section 3 states them)."""
    from streamrt.kv_export import kv_cache_io_spec
    from streamrt.random_models import build_random_components

    unet_config = component_configs("sdxl-turbo")["unet"]
    latent = size // 8
    layers = attn1_layers_from_config(unet_config, latent, latent)
    assert len(layers) == 70
    unet = build_random_components("sdxl-turbo", device="meta", dtype=torch.float16, taesd=False)["unet"]
    spec = kv_cache_io_spec(unet, 2, size, size, 3)
    assert sorted((layer.tokens, layer.channels) for layer in spec.layers) == sorted(layers)
    assert spec.ring_nbytes(2) == ring_bytes_formula(unet_config, latent, latent, rows=2, max_frames=3,
                                                     element_size=2)


def _kv_pointers(stream: Stream) -> dict[str, int]:
    kv = stream.kv
    ptrs = {name: getattr(kv, name).data_ptr()
            for name in ("age", "window", "write_slot", "write_segment", "write_flag", "slot_valid")}
    for index, buffers in kv.layers.items():
        ptrs[f"key{index}"] = buffers.key.data_ptr()
        ptrs[f"value{index}"] = buffers.value.data_ptr()
        ptrs[f"mask{index}"] = buffers.mask.data_ptr()
    for tokens, mask in kv.masks.items():
        ptrs[f"masks{tokens}"] = mask.data_ptr()
    return ptrs


def test_buffers_never_move(models):
    """No reallocation: every KV buffer keeps its storage across frames, window changes and state changes."""
    stream = Stream(models, kv_config(2, "full", max_frames=3, window=3), prompt=PROMPT, negative_prompt=NEGATIVE)
    stream.step(make_frames(1, 0))
    ptrs = _kv_pointers(stream)
    assert len(ptrs) == 6 + 3 * 4 + 2
    actions = [
        lambda: None,
        lambda: stream.set_cache_window(1),
        lambda: stream.set_cache_window(2, 3),
        lambda: stream.set_cache_window(3, 1),
        lambda: stream.set_prompt(PROMPT_2),
        lambda: stream.set_seed(5),
        stream.reset,
    ]
    for k, action in enumerate(actions):
        action()
        for j in range(2):
            stream.step(make_frames(1, 10 * k + j))
        assert _kv_pointers(stream) == ptrs, f"storage moved after action {k}"
    stream.process_video(make_frames(3, 77))
    assert _kv_pointers(stream) == ptrs


def test_calls_with_writes_held_leave_rings_and_ages_as_they_were(models):
    """What a CUDA-graph capture relies on instead of copying the rings: calls made inside ``writes_held``
    (the warm-up) write only the scratch slot, age nothing, and the call scheduled before keeps its target;
    a call made afterwards gives exactly what it gives without the extra calls."""
    config = kv_config(2, "self", max_frames=3, window=3)
    inputs = [make_frames(1, 40 + k) for k in range(5)]
    plain = Stream(models, config, prompt=PROMPT)
    expected = run_steps(plain, inputs)

    stream = Stream(models, config, prompt=PROMPT)
    run_steps(stream, inputs[:4])
    kv = stream.kv
    kv.schedule_call()
    target = (kv.write_slot.clone(), kv.write_segment.clone(), kv.write_flag.clone())
    rings = {i: (b.key[:, b.tokens:4 * b.tokens].clone(), b.value[:, b.tokens:4 * b.tokens].clone())
             for i, b in kv.layers.items()}
    ages = kv.age[:-1].clone()
    with kv.writes_held():
        assert int(kv.write_slot) == 3 and int(kv.write_flag) == 0  # the scratch slot, no write
        for _ in range(3):
            stream.device_step(False)
    assert all(torch.equal(a, b) for a, b in zip(target, (kv.write_slot, kv.write_segment, kv.write_flag)))
    assert torch.equal(kv.age[:-1], ages)
    for i, b in kv.layers.items():
        assert torch.equal(b.key[:, b.tokens:4 * b.tokens], rings[i][0]), f"layer {i} keys changed"
        assert torch.equal(b.value[:, b.tokens:4 * b.tokens], rings[i][1]), f"layer {i} values changed"
    # the writes-held calls touched the carried latents and stock noise, which a capture restores itself;
    # with those put back the next call is the plain stream's fifth (with n = 2 its output is the fourth
    # frame's, carried in the latents and the rings, so the input staged for it does not matter)
    stream2 = Stream(models, config, prompt=PROMPT)
    run_steps(stream2, inputs[:4])
    stream.buffers.unet_in.copy_(stream2.buffers.unet_in)
    stream.buffers.stock.copy_(stream2.buffers.stock)
    stream.device_step(False)
    got = stream.runtime.host.download(stream.buffers.frames_out)
    assert torch.equal(got, expected[4])


# ---------------------------------------------------------------------------------------------- CUDA graphs
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_with_a_full_ring_matches_eager(tiny_folders):
    """A capture in mid-stream (txt2img after img2img) must leave the cache as it found it.

    The capture runs the step three times for real before capturing it. Each warm-up writes this call's
    K/V into the ring slot it is about to overwrite; with a full ring and ``window == max_frames`` that
    slot (the oldest) is still read by this call, so the replay reads the current frame instead of the
    oldest one unless the rings are restored with the ages.
    """
    models = _sharpened(quiet_load(tiny_folders["tiny"], taesd=tiny_folders["taesd"])).to("cuda")
    config = kv_config(2, "self", max_frames=3, window=3, interval=1)
    inputs = groups(5, seed=23)
    plan = inputs + [None, None] + inputs[:2]  # img2img (capture 1), txt2img (capture 2 with a full ring), img2img
    eager = run_steps(Stream(models, config, prompt=PROMPT), plan)
    graphed = run_steps(Stream(models, config.with_(acceleration="cuda_graph"), prompt=PROMPT), plan)
    assert_close_lists(graphed, eager, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the prompt's K/V
def _cross_projection_calls(unet) -> tuple[list[int], list]:
    """A counter of calls to every ``attn2`` key and value projection, and the hook handles."""
    count = [0]

    def hook(*_):
        count[0] += 1

    handles = [module.register_forward_hook(hook) for name, module in unet.named_modules()
               if name.endswith(("attn2.to_k", "attn2.to_v"))]
    assert handles
    return count, handles


@pytest.mark.parametrize("family, cfg_type", [("sd", "full"), ("sd", "self"), ("xl", "initialize")])
def test_the_prompts_cross_attention_keys_and_values_are_computed_once_per_prompt(tiny_folders, family, cfg_type):
    """A stream that keeps its prompt's keys and values gives the frames of one that projects the prompt in every
    UNet call, bit for bit, through a prompt change, a negative-prompt change and a blend; it projects nothing per
    call, and a prompt write leaves every layer's keys and values equal to the layer's projections of the new
    embeddings."""
    models = (quiet_load(tiny_folders["tiny"], taesd=tiny_folders["taesd"]) if family == "sd"
              else tiny_xl_stream_models(seed=1))
    config = make_config(t_index_list=T_INDEX[2], cfg_type=cfg_type, guidance_scale=1.5)
    plain = Stream(models, config.with_(prompt_kv=False), prompt=PROMPT, negative_prompt=NEGATIVE)
    keeps = Stream(models, config, prompt=PROMPT, negative_prompt=NEGATIVE)
    assert plain.prompt_kv is None and plain.unet_extras.given == keeps.unet_extras.given - {"prompt_kv"}
    layers = len(keeps.prompt_kv.layers)
    assert layers == sum(name.endswith("attn2.processor") for name in models.unet.attn_processors) > 0
    rows, tokens = keeps.buffers.embeds.shape[:2]
    assert rows == config.unet_rows
    # its memory: rows x L x (sum of the layers' widths) for K and for V, float32 here
    widths = sum(attn.to_k.out_features for attn, _, _ in keeps.prompt_kv.layers)
    assert keeps.prompt_kv.nbytes() == rows * tokens * widths * 2 * 4
    assert keeps.nbytes() - plain.nbytes() == keeps.prompt_kv.nbytes()

    count, handles = _cross_projection_calls(models.unet)
    try:
        changes = [(PROMPT, None), (PROMPT_2, None), (PROMPT_2, "blurry, ugly"),
                   ([(PROMPT, 0.3), (PROMPT_2, 0.7)], None)]
        inputs = groups(2 * len(changes), seed=11)
        for k, (prompt, negative) in enumerate(changes):
            for stream in (plain, keeps):
                stream.set_prompt(prompt, negative)
            before = count[0]
            got = run_steps(keeps, inputs[2 * k:2 * k + 2])
            assert count[0] == before, "the stream projected its prompt in a UNet call"
            assert_all_equal(got, run_steps(plain, inputs[2 * k:2 * k + 2]))
            assert count[0] > before  # the plain stream's calls project it, through the same hooks
    finally:
        for handle in handles:
            handle.remove()
    keeps.set_prompt(PROMPT, "blurry, ugly")
    with torch.no_grad():
        for index, (attn, key, value) in enumerate(keeps.prompt_kv.layers):
            assert torch.equal(key, attn.to_k(keeps.buffers.embeds)), index
            assert torch.equal(value, attn.to_v(keeps.buffers.embeds)), index


# ---------------------------------------------------------------------------------------------- fused projections
def test_a_fused_stream_keeps_one_copy_of_each_layers_projection_weights(tiny_folders):
    """The first stream with ``fused_qkv`` gives each attn1 layer one ``[3C, C]`` copy of its query, key and value
    weights (not in the state dict), leaves the UNet's own weights as they were (a host's tensors stay shared), makes
    it once per UNet, and the copy moves with the module."""
    from streamrt.kv_cache import FUSED_QKV, fused_projections_nbytes, self_attention_layers

    models = quiet_load(tiny_folders["tiny"], taesd=tiny_folders["taesd"])
    layers = self_attention_layers(models.unet)
    pointers = [p.data_ptr() for p in models.unet.parameters()]
    assert layers and not any(hasattr(attn, FUSED_QKV) for attn in layers)  # nothing until a stream asks
    Stream(models, make_config(fused_qkv=False), prompt=PROMPT)
    assert not any(hasattr(attn, FUSED_QKV) for attn in layers) and fused_projections_nbytes(models.unet) == 0
    Stream(models, make_config(), prompt=PROMPT)  # on by default
    copies = [getattr(attn, FUSED_QKV) for attn in layers]
    Stream(models, make_config(fused_qkv=True, t_index_list=(20,)), prompt=PROMPT)
    assert [getattr(attn, FUSED_QKV) for attn in layers] == copies  # once per UNet
    assert [p.data_ptr() for p in models.unet.parameters()] == pointers
    assert not any(FUSED_QKV in key for key in models.unet.state_dict())
    assert fused_projections_nbytes(models.unet) == sum(
        3 * attn.to_q.weight.nbytes for attn in layers) > 0

    def check():
        for attn in layers:
            assert torch.equal(getattr(attn, FUSED_QKV), torch.cat([attn.to_q.weight, attn.to_k.weight,
                                                                    attn.to_v.weight]))

    check()
    models.to(dtype=torch.float64)  # the copy is a buffer: it moves with the module
    assert all(getattr(attn, FUSED_QKV).dtype == torch.float64 for attn in layers)
    check()


@pytest.mark.parametrize("family, cfg_type, cached", [("sd", "full", False), ("sd", "self", True),
                                                      ("xl", "initialize", False)])
def test_fused_self_attention_projections_give_the_frames_of_three(tiny_folders, family, cfg_type, cached):
    """A stream with ``fused_qkv`` projects each self-attention layer's query, key and value with one GEMM (the
    three projections never run in its calls) and gives the frames of a stream that runs the three, with and
    without cached attention, through a prompt change."""
    models = (quiet_load(tiny_folders["tiny"], taesd=tiny_folders["taesd"]) if family == "sd"
              else tiny_xl_stream_models(seed=2))
    config = make_config(t_index_list=T_INDEX[2], cfg_type=cfg_type, guidance_scale=1.5,
                         kv_cache=KVCacheConfig(True, 3, 3, 1) if cached else KVCacheConfig())
    three = Stream(models, config.with_(fused_qkv=False), prompt=PROMPT, negative_prompt=NEGATIVE)
    fused = Stream(models, config, prompt=PROMPT, negative_prompt=NEGATIVE)  # on by default
    assert "fused_qkv" not in three.unet_extras.given and "fused_qkv" in fused.unet_extras.given
    calls = [0]

    def hook(*_):
        calls[0] += 1

    handles = [module.register_forward_hook(hook) for name, module in models.unet.named_modules()
               if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v"))]
    assert handles
    try:
        inputs = groups(6, seed=13)
        got = run_steps(fused, inputs[:3])
        assert calls[0] == 0, "a fused stream ran the separate projections"
        expected = run_steps(three, inputs[:3])
        assert calls[0] > 0
        for stream in (three, fused):
            stream.set_prompt(PROMPT_2)
        got += run_steps(fused, inputs[3:])
        expected += run_steps(three, inputs[3:])
    finally:
        for handle in handles:
            handle.remove()
    for k, (a, b) in enumerate(zip(got, expected)):
        assert (a - b).abs().max().item() <= ATOL, f"output {k} differs by {(a - b).abs().max().item():.3g}"
