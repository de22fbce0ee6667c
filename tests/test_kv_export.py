"""The cached-attention UNet as a stateless, exportable module (streamrt.kv_export).

- the torch wrapper equals the stateful ``CachedSelfAttnProcessor`` path for the same history;
- with every slot invalid it is the plain UNet;
- the ONNX export (TorchScript exporter, opset 17) run by onnxruntime matches the wrapper;
- the I/O spec matches what the wrapper returns and what the ONNX graph declares.
"""

from __future__ import annotations

import pytest
import torch
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
from streamrt.random_models import component_configs

ROWS, SIZE, M = 2, 64, 3
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


def inputs_for(unet, slot_valid, seed=0):
    spec = kv_cache_io_spec(unet, ROWS, SIZE, SIZE, M)
    args = list(example_inputs(spec, generator=torch.Generator().manual_seed(seed)))
    args[3] = torch.tensor(slot_valid, dtype=torch.bool)
    return spec, args


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


def test_io_spec_of_sd15_gives_the_design_memory():
    """kv_cache_io_spec on a meta-device SD1.5 UNet: 16 layers, ~46 MB of K+V per row and frame at 512 fp16."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**component_configs("sd15")["unet"])
    torch.nn.Module.to(sd15, dtype=torch.float16)
    spec = kv_cache_io_spec(sd15, 1, 512, 512, 1)
    assert len(spec.layers) == 16
    assert sorted({(layer.tokens, layer.channels) for layer in spec.layers}) == [
        (64, 1280), (256, 1280), (1024, 640), (4096, 320)]
    assert spec.shapes["cache_key_0"] == (1, 4096, 320) and spec.shapes["encoder_hidden_states"] == (1, 77, 768)
    assert abs(spec.ring_nbytes(2) - 46e6) <= 0.01 * 46e6


@pytest.mark.parametrize("slot_valid", [[True, False, True], [True, True, True], [False, True, False]])
def test_wrapper_equals_the_stateful_processors(unet, slot_valid):
    """Fill a KVCache's ring with the wrapper's cache inputs and mark the same slots valid: same prediction,
    and the slot the stateful call writes holds the wrapper's current K/V."""
    spec, args = inputs_for(unet, slot_valid, seed=1)
    sample, timestep, text, valid, *caches = args
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
                        cross_attention_kwargs={"kv_cache": cache})[0]
    cache.end_call()
    assert (noise_pred - stateful).abs().max().item() <= 1e-6
    for layer in spec.layers:
        buffers = cache.layers[layer.index]
        assert torch.equal(buffers.segments(buffers.key)[:, 1], current[2 * layer.index])
        assert torch.equal(buffers.segments(buffers.value)[:, 1], current[2 * layer.index + 1])

    # the cached slots matter: a different history changes the prediction
    with torch.no_grad():
        other = UNetWithKVCache(unet, M)(sample, timestep, text, valid, *[c.flip(0) for c in caches])[0]
    assert (other - noise_pred).abs().max().item() > 1e-3


def test_no_valid_slot_is_the_plain_unet(unet):
    spec, args = inputs_for(unet, [False, False, False], seed=2)
    sample, timestep, text = args[:3]
    before = dict(unet.attn_processors)
    with torch.no_grad():
        wrapped = UNetWithKVCache(unet, M)(*args)[0]
        plain = unet(sample, timestep, encoder_hidden_states=text, return_dict=False)[0]
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


def test_onnx_export_matches_torch(unet, tmp_path):
    import onnx
    import onnxruntime as ort

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
            diff = (e - torch.from_numpy(g)).abs().max().item()
            assert diff <= ORT_ATOL, f"{name} (slots {slot_valid}) differs by {diff:.3g}"
        results.append(torch.from_numpy(got[0]))
    # slot_valid is live in the graph (not folded away): the same inputs with other valid slots differ
    _, args = inputs_for(unet, [True, True, True], seed=10)
    other = session.run(["noise_pred"], {name: a.numpy() for name, a in zip(spec.input_names, args)})[0]
    assert (torch.from_numpy(other) - results[0]).abs().max().item() > 1e-3


def test_engine_style_calls_match_the_stateful_cache(unet):
    """Driving the wrapper like an engine (ring views in, current K/V out, the caller writes the ring)
    over several calls gives the stateful processors' predictions (window < M, interval 2)."""
    spec = kv_cache_io_spec(unet, ROWS, SIZE, SIZE, M)
    stateful_cache = KVCache(KVCacheConfig(True, M, 2, 2), torch.device("cpu"))
    engine_cache = KVCache(KVCacheConfig(True, M, 2, 2), torch.device("cpu"))
    for layer in spec.layers:  # an engine caller allocates before the first call
        engine_cache.layer(layer.index, ROWS, layer.tokens, layer.channels, torch.float32)
    wrapper = UNetWithKVCache(unet, M)
    gen = torch.Generator().manual_seed(3)
    text = torch.randn(ROWS, 77, 32, generator=gen)
    for call in range(7):
        sample = torch.randn(ROWS, 4, 8, 8, generator=gen)
        timestep = torch.tensor([500, 250])
        with torch.no_grad():
            stateful_cache.schedule_call()
            stateful_cache.begin_call()
            expected = unet(sample, timestep, encoder_hidden_states=text, return_dict=False,
                            cross_attention_kwargs={"kv_cache": stateful_cache})[0]
            stateful_cache.end_call()

            engine_cache.schedule_call()
            engine_cache.begin_call()
            rings = ring_inputs(engine_cache)
            assert [tuple(r.shape) for r in rings] == [shape for _, shape, _ in spec.inputs[4:]]
            noise_pred, *current = wrapper(sample, timestep, text, engine_cache.slot_valid, *rings)
            write_current(engine_cache, current)
            engine_cache.end_call()
        assert (noise_pred - expected).abs().max().item() <= 1e-6, call
    assert engine_cache.slot_valid.sum().item() == 2
    for index in range(len(spec.layers)):
        a, b = stateful_cache.layers[index], engine_cache.layers[index]
        assert (a.key[:, a.tokens:] - b.key[:, b.tokens:]).abs().max().item() <= 1e-6
