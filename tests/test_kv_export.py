"""The cached-attention UNet as a stateless, exportable module (streamrt.kv_export).

- the torch wrapper equals the stateful ``CachedSelfAttnProcessor`` path for the same history;
- with every slot invalid it is the plain UNet;
- the ONNX export (TorchScript exporter, opset 17) run by onnxruntime matches the wrapper;
- the I/O spec matches what the wrapper returns and what the ONNX graph declares;
- all of it on SDXL's UNet too (``tiny-xl``: a down block without attention, two transformer layers per block,
  the added conditions ``text_embeds`` / ``time_ids`` as inputs), and the K/V memory of the real SD1.5 and SDXL
  UNets (meta device) is what docs/DESIGN.md section 3 says.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from engine_helpers import tiny_xl_stream_models
from stream_helpers import quiet_load

from streamrt.kv_cache import NEVER, KVCache, KVCacheConfig, install_kv_processors
from streamrt.kv_export import (
    UNetWithKVCache,
    attn1_layers,
    example_inputs,
    export_unet_with_kv_cache,
    kv_cache_io_spec,
    ring_inputs,
    write_current,
)
from streamrt.random_models import build_random_components
from streamrt.runtime import AddedConditions, UNetExtras

ROWS, SIZE, M = 2, 64, 3
DESIGN = Path(__file__).resolve().parent.parent / "docs/DESIGN.md"
ORT_ATOL = 1e-4


@pytest.fixture(scope="module")
def unet(tiny_folders):
    """The tiny UNet with the stateful caching processors installed (as a cached stream leaves it).

    attn1 queries and keys are sharpened (x6) so that the cached slots move the prediction clearly
    (with the random weights attention is almost uniform and their effect is ~1e-4).
    """
    unet = quiet_load(tiny_folders["tiny"]).unet
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            module.to_q.weight.mul_(6.0)
            module.to_k.weight.mul_(6.0)
    assert install_kv_processors(unet) == 4
    return unet


@pytest.fixture(scope="module")
def xl_unet():
    """tiny-xl's UNet, sharpened the same way, with the caching processors installed."""
    unet = tiny_xl_stream_models(seed=0, sharpen=6.0).unet
    assert install_kv_processors(unet) == 8
    return unet


@pytest.fixture(params=["sd1", "sdxl"])
def any_unet(request):
    """The SD1-shaped and the SDXL-shaped UNet, for the tests that hold for both."""
    return request.getfixturevalue("unet" if request.param == "sd1" else "xl_unet")


def inputs_for(unet, slot_valid, seed=0):
    """A spec and inputs for it: random tensors, ``slot_valid`` as given, size conditions like a stream's."""
    spec = kv_cache_io_spec(unet, ROWS, SIZE, SIZE, M)
    args = list(example_inputs(spec, generator=torch.Generator().manual_seed(seed)))
    args[spec.first_ring_input - 1] = torch.tensor(slot_valid, dtype=torch.bool)
    if "time_ids" in spec.input_names:
        args[spec.input_names.index("time_ids")] = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * ROWS,
                                                                dtype=torch.float32)
    return spec, args


def split(spec, args):
    """``(sample, timestep, text, extras, slot_valid, caches)`` of a wrapper's inputs; ``extras`` carries the added
    conditions of an SDXL UNet, passed to a plain or stateful call as the torch runtime passes them."""
    ring = spec.first_ring_input
    added = args[3:ring - 1]
    extras = UNetExtras(added_cond=AddedConditions(*added)) if added else UNetExtras()
    return args[0], args[1], args[2], extras, args[ring - 1], args[ring:]


def test_io_spec_matches_the_wrapper(unet):
    spec, args = inputs_for(unet, [True, False, True])
    assert spec.input_names[:4] == ["sample", "timestep", "encoder_hidden_states", "slot_valid"]
    assert spec.input_names[4:8] == ["cache_key_0", "cache_value_0", "cache_key_1", "cache_value_1"]
    assert spec.output_names[:3] == ["noise_pred", "current_key_0", "current_value_0"]
    assert len(spec.inputs) == 4 + 2 * 4 and len(spec.outputs) == 1 + 2 * 4
    assert [(layer.tokens, layer.channels) for layer in spec.layers] == [(64, 32), (64, 32), (64, 32), (16, 64)]
    assert [layer.name for layer in spec.layers] == [name for name, _ in attn1_layers(unet)]
    assert all(tuple(a.shape) == shape and a.dtype == dtype for a, (_, shape, dtype) in zip(args, spec.inputs))
    with torch.no_grad():
        outputs = UNetWithKVCache(unet, M)(*args)
    assert [(tuple(o.shape), o.dtype) for o in outputs] == [(shape, dtype) for _, shape, dtype in spec.outputs]


def design_memory() -> dict[str, float]:
    """The K/V memory docs/DESIGN.md section 3 states (its "Memory" bullet), in MB / GB as written there."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text[text.index("## 3. Cached attention"):text.index("## 4. ")]
    memory = " ".join(section[section.index("- Memory:"):].split("\n- ")[0].split())
    found = {}
    for pattern, names in (
            (r"SD1\.5 \((\d+) layers\) ([\d.]+) MB at 512²", ("sd15_layers", "sd15_512")),
            (r"SDXL \((\d+) layers[^)]*\) ([\d.]+) MB at 512² and ([\d.]+) MB at 1024²",
             ("sdxl_layers", "sdxl_512", "sdxl_1024")),
            (r"(\d+) cached frames and (\d+) rows holds ([\d.]+) GB of rings in ([\d.]+) GB",
             ("frames", "rows", "rings_gb", "buffers_gb"))):
        match = re.search(pattern, memory)
        assert match, f"docs/DESIGN.md section 3 no longer says {pattern!r}: {memory}"
        found.update(zip(names, map(float, match.groups())))
    assert "kv_cache_io_spec" in memory and "ring_nbytes" in memory, "the bullet names the functions that compute it"
    return found


def meta_unet(preset: str):
    """The full-size UNet of ``preset`` on the meta device in fp16: its structure, no memory."""
    return build_random_components(preset, device="meta", dtype=torch.float16, taesd=False)["unet"]


def test_io_spec_of_sd15_gives_the_design_memory():
    """kv_cache_io_spec on a meta-device SD1.5 UNet: 16 layers, the K+V per row and frame at 512 fp16 the design
    document states (~46 MB)."""
    doc = design_memory()
    spec = kv_cache_io_spec(meta_unet("sd15"), 1, 512, 512, 1)
    assert len(spec.layers) == doc["sd15_layers"] == 16
    assert sorted({(layer.tokens, layer.channels) for layer in spec.layers}) == [
        (64, 1280), (256, 1280), (1024, 640), (4096, 320)]
    assert spec.shapes["cache_key_0"] == (1, 4096, 320) and spec.shapes["encoder_hidden_states"] == (1, 77, 768)
    assert round(spec.ring_nbytes(2) / 1e6, 1) == doc["sd15_512"]


def test_io_spec_of_sdxl_gives_the_design_memory():
    """kv_cache_io_spec on a meta-device SDXL UNet (the sdxl-turbo preset's real architecture): 70 attn1 layers, none
    in the first down block (no attention), 10 at 640 channels and 60 at 1280 (transformer_layers_per_block
    (1, 2, 10)); K+V per row and frame at 512² and 1024² in fp16, and a stream's rings and buffers, as the design
    document states them. The stream's own allocation (KVCache.allocate from the same spec, on the meta device)
    holds exactly that."""
    doc = design_memory()
    unet = meta_unet("sdxl-turbo")
    assert unet.config.transformer_layers_per_block == (1, 2, 10)
    per_frame = {}
    for size in (512, 1024):
        spec = kv_cache_io_spec(unet, 1, size, size, 1)
        assert len(spec.layers) == doc["sdxl_layers"] == 70
        assert not [layer.name for layer in spec.layers if layer.name.startswith("down_blocks.0.")]
        assert Counter(layer.channels for layer in spec.layers) == {640: 10, 1280: 60}
        latent = size // 8
        assert {layer.tokens for layer in spec.layers} == {(latent // 2) ** 2, (latent // 4) ** 2}
        assert spec.input_names[3:6] == ["text_embeds", "time_ids", "slot_valid"]
        assert spec.shapes["text_embeds"] == (1, 1280) and spec.shapes["encoder_hidden_states"] == (1, 77, 2048)
        per_frame[size] = spec.ring_nbytes(2)
        assert round(per_frame[size] / 1e6, 1) == doc[f"sdxl_{size}"]
    assert per_frame[1024] == 4 * per_frame[512]

    frames, rows = int(doc["frames"]), int(doc["rows"])
    spec = kv_cache_io_spec(unet, rows, 1024, 1024, frames)
    assert spec.ring_nbytes(2) == rows * frames * per_frame[1024]
    cache = KVCache(KVCacheConfig(True, frames, frames, 1), torch.device("meta"))
    cache.allocate([(layer.tokens, layer.channels) for layer in spec.layers], rows, torch.float16)
    assert cache.ring_nbytes() == spec.ring_nbytes(2)
    assert round(cache.ring_nbytes() / 1e9, 1) == doc["rings_gb"]
    assert round(cache.nbytes() / 1e9, 1) == doc["buffers_gb"]
    assert cache.nbytes() * frames == cache.ring_nbytes() * (frames + 2)


def test_io_spec_of_sdxl_has_its_added_conditions(xl_unet):
    """tiny-xl: the added conditions come between the text embeddings and slot_valid, sized by the UNet's
    added-embedding input (pooled width + 6 sinusoidal embeddings of the size conditions); the cached layers are
    those of its attention level only, and the wrapper returns what the spec says."""
    spec, args = inputs_for(xl_unet, [True, False, True])
    assert spec.input_names[:6] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids",
                                    "slot_valid"]
    assert spec.first_ring_input == 6 and spec.input_names[6:8] == ["cache_key_0", "cache_value_0"]
    pooled = xl_unet.add_embedding.linear_1.in_features - 6 * xl_unet.config.addition_time_embed_dim
    assert spec.shapes["text_embeds"] == (ROWS, pooled) and spec.shapes["time_ids"] == (ROWS, 6)
    level1 = (SIZE // 8 // 2) ** 2  # the one down block with attention runs after one downsampling
    assert [(layer.tokens, layer.channels) for layer in spec.layers] == [(level1, 64)] * 8
    assert {layer.name.split(".")[0] + "." + layer.name.split(".")[1] for layer in spec.layers} == {
        "down_blocks.1", "up_blocks.0", "mid_block.attentions"}
    assert all(tuple(a.shape) == shape and a.dtype == dtype for a, (_, shape, dtype) in zip(args, spec.inputs))
    wrapper = UNetWithKVCache(xl_unet, M)
    assert wrapper.added_conditions
    with torch.no_grad():
        outputs = wrapper(*args)
    assert [(tuple(o.shape), o.dtype) for o in outputs] == [(shape, dtype) for _, shape, dtype in spec.outputs]
    with pytest.raises(ValueError, match="cache tensors"):
        wrapper(*args[:3], *args[5:])  # the added conditions left out: the inputs do not line up


@pytest.mark.parametrize("slot_valid", [[True, False, True], [True, True, True], [False, True, False]])
def test_wrapper_equals_the_stateful_processors(any_unet, slot_valid):
    """Fill a KVCache's ring with the wrapper's cache inputs and mark the same slots valid: same prediction,
    and the slot the stateful call writes holds the wrapper's current K/V."""
    unet = any_unet
    spec, args = inputs_for(unet, slot_valid, seed=1)
    sample, timestep, text, extras, valid, caches = split(spec, args)
    with torch.no_grad():
        noise_pred, *current = UNetWithKVCache(unet, M)(*args)

    cache = KVCache(KVCacheConfig(True, M, M, 1), torch.device("cpu"))
    for layer in spec.layers:
        buffers = cache.layer(layer.index, ROWS, layer.tokens, layer.channels, torch.float32)
        ring_k = caches[2 * layer.index].view(ROWS, M, layer.tokens, layer.channels)
        ring_v = caches[2 * layer.index + 1].view(ROWS, M, layer.tokens, layer.channels)
        buffers.segments(buffers.key)[:, 1:M + 1].copy_(ring_k)
        buffers.segments(buffers.value)[:, 1:M + 1].copy_(ring_v)
    cache.age[:M] = torch.where(valid, torch.arange(M), torch.full((M,), NEVER))
    cache.schedule_call()           # a write call: slot 0 receives this call's K/V after attention
    cache.begin_call()
    assert torch.equal(cache.slot_valid, valid)
    with torch.no_grad():
        stateful = unet(sample, timestep, encoder_hidden_states=text, return_dict=False,
                        cross_attention_kwargs={"kv_cache": cache}, **extras.torch_kwargs)[0]
    cache.end_call()
    assert (noise_pred - stateful).abs().max().item() <= 1e-6
    for layer in spec.layers:
        buffers = cache.layers[layer.index]
        assert torch.equal(buffers.segments(buffers.key)[:, 1], current[2 * layer.index])
        assert torch.equal(buffers.segments(buffers.value)[:, 1], current[2 * layer.index + 1])

    # the cached slots matter: a different history changes the prediction
    with torch.no_grad():
        other = UNetWithKVCache(unet, M)(*args[:spec.first_ring_input], *[c.flip(0) for c in caches])[0]
    assert (other - noise_pred).abs().max().item() > 1e-3


def test_no_valid_slot_is_the_plain_unet(any_unet):
    unet = any_unet
    spec, args = inputs_for(unet, [False, False, False], seed=2)
    sample, timestep, text, extras, _, _ = split(spec, args)
    before = dict(unet.attn_processors)
    with torch.no_grad():
        wrapped = UNetWithKVCache(unet, M)(*args)[0]
        plain = unet(sample, timestep, encoder_hidden_states=text, return_dict=False, **extras.torch_kwargs)[0]
    assert (wrapped - plain).abs().max().item() <= 1e-6
    assert dict(unet.attn_processors) == before  # the wrapper put the stream's processors back


def test_wrapper_rejects_bad_inputs(unet):
    spec, args = inputs_for(unet, [True, True, True])
    wrapper = UNetWithKVCache(unet, M)
    with pytest.raises(ValueError, match="cache tensors"):
        wrapper(*args[:-1])
    with pytest.raises(ValueError, match="slot_valid"):
        wrapper(*args[:3], torch.ones(M + 1, dtype=torch.bool), *args[4:])
    with pytest.raises(ValueError, match="opset"):
        export_unet_with_kv_cache(unet, "unused.onnx", rows=ROWS, height=SIZE, width=SIZE, max_frames=M, opset=16)


def test_onnx_export_matches_torch(any_unet, tmp_path):
    import onnx
    import onnxruntime as ort

    unet = any_unet
    path = tmp_path / "unet_kv.onnx"
    before = dict(unet.attn_processors)
    spec = export_unet_with_kv_cache(unet, path, rows=ROWS, height=SIZE, width=SIZE, max_frames=M, opset=17)
    assert dict(unet.attn_processors) == before
    assert not list(tmp_path.glob("*.tmp-*"))

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17

    def declared(values):
        return [(v.name, tuple(d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values]

    assert declared(model.graph.input) == [(name, shape) for name, shape, _ in spec.inputs]
    assert declared(model.graph.output) == [(name, shape) for name, shape, _ in spec.outputs]

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wrapper = UNetWithKVCache(unet, M)
    results = []
    for seed, slot_valid in enumerate([[True, False, True], [False, False, False], [True, True, True]]):
        _, args = inputs_for(unet, slot_valid, seed=10 + seed)
        with torch.no_grad():
            expected = wrapper(*args)
        got = session.run(None, {name: a.numpy() for name, a in zip(spec.input_names, args)})
        for name, e, g in zip(spec.output_names, expected, got):
            # relative to the output's scale: the sharpened keys reach ~12 (the prediction ~1), and float32
            # rounding through SDXL's 8 stacked layers shows at ~1e-5 of that
            diff = (e - torch.from_numpy(g)).abs().max().item()
            tolerance = ORT_ATOL * max(1.0, e.abs().max().item())
            assert diff <= tolerance, f"{name} (slots {slot_valid}) differs by {diff:.3g} > {tolerance:.3g}"
        results.append(torch.from_numpy(got[0]))
    # slot_valid is live in the graph (not folded away): the same inputs with other valid slots differ
    _, args = inputs_for(unet, [True, True, True], seed=10)
    other = session.run(["noise_pred"], {name: a.numpy() for name, a in zip(spec.input_names, args)})[0]
    assert (torch.from_numpy(other) - results[0]).abs().max().item() > 1e-3
    # so are SDXL's added conditions: others move the prediction, and the graph follows the wrapper there
    for name in ("text_embeds", "time_ids"):
        if name not in spec.input_names:
            continue
        _, args = inputs_for(unet, [True, False, True], seed=10)
        index = spec.input_names.index(name)
        args[index] = args[index].flip(0) if name == "text_embeds" else args[index] * 2
        moved = torch.from_numpy(session.run(["noise_pred"], {n: a.numpy() for n, a in zip(spec.input_names,
                                                                                            args)})[0])
        assert (moved - results[0]).abs().max().item() > 1e-3, name
        with torch.no_grad():
            assert (moved - wrapper(*args)[0]).abs().max().item() <= ORT_ATOL, name


def test_engine_style_calls_match_the_stateful_cache(any_unet):
    """Driving the wrapper like an engine (ring views in, current K/V out, the caller writes the ring)
    over several calls gives the stateful processors' predictions (window < M, interval 2)."""
    unet = any_unet
    spec = kv_cache_io_spec(unet, ROWS, SIZE, SIZE, M)
    stateful_cache = KVCache(KVCacheConfig(True, M, 2, 2), torch.device("cpu"))
    engine_cache = KVCache(KVCacheConfig(True, M, 2, 2), torch.device("cpu"))
    for layer in spec.layers:  # an engine caller allocates before the first call
        engine_cache.layer(layer.index, ROWS, layer.tokens, layer.channels, torch.float32)
    wrapper = UNetWithKVCache(unet, M)
    gen = torch.Generator().manual_seed(3)
    text = torch.randn(ROWS, 77, unet.config.cross_attention_dim, generator=gen)
    # SDXL's added conditions: as the stream passes them (its buffers), to the stateful call and the wrapper alike
    added = [torch.randn(shape, generator=gen) for name, shape, _ in spec.inputs if name == "text_embeds"]
    added += [torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * ROWS, dtype=torch.float32)] if added else []
    extras = UNetExtras(added_cond=AddedConditions(*added)) if added else UNetExtras()
    for call in range(7):
        sample = torch.randn(ROWS, 4, 8, 8, generator=gen)
        timestep = torch.tensor([500, 250])
        with torch.no_grad():
            stateful_cache.schedule_call()
            stateful_cache.begin_call()
            expected = unet(sample, timestep, encoder_hidden_states=text, return_dict=False,
                            cross_attention_kwargs={"kv_cache": stateful_cache}, **extras.torch_kwargs)[0]
            stateful_cache.end_call()

            engine_cache.schedule_call()
            engine_cache.begin_call()
            rings = ring_inputs(engine_cache)
            assert [tuple(r.shape) for r in rings] == [shape for _, shape, _ in spec.inputs[spec.first_ring_input:]]
            noise_pred, *current = wrapper(sample, timestep, text, *added, engine_cache.slot_valid, *rings)
            write_current(engine_cache, current)
            engine_cache.end_call()
        assert (noise_pred - expected).abs().max().item() <= 1e-6, call
    assert engine_cache.slot_valid.sum().item() == 2
    for index in range(len(spec.layers)):
        a, b = stateful_cache.layers[index], engine_cache.layers[index]
        assert (a.key[:, a.tokens:] - b.key[:, b.tokens:]).abs().max().item() <= 1e-6
