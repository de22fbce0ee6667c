"""A pipeline from weights a host already holds in the original (LDM) layout (``streamrt.load_ldm_weights``),
the core of the ComfyUI MODEL / CLIP / VAE route: UNet configs read from LDM parameters, CLIP skip, TAESD,
and the same frames as the diffusers folder the weights came from.
"""

from __future__ import annotations

import pytest
import torch
from model_files import taesd_to_comfy, unet_to_ldm, vae_to_ldm, write_config_dir

from streamrt import Stream, StreamConfig
from streamrt.checkpoints import CONFIG_ROOT, UNET, VAE, build_text_encoder, unet_config_from_ldm
from streamrt.loading import LdmWeights, ModelLoadError, load_ldm_weights

#: the parameters ComfyUI's model detection reads from an SD1.5 / SD2.1 checkpoint's keys
SD15_PARAMS = dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4],
                   num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                   transformer_depth_middle=1, context_dim=768, num_heads=8, num_head_channels=-1,
                   use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False)
SD21_PARAMS = {**SD15_PARAMS, "context_dim": 1024, "num_heads": -1, "num_head_channels": 64,
               "use_linear_in_transformer": True}
#: the tiny test UNet's (streamrt.random_models "tiny")
TINY_PARAMS = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1],
                   transformer_depth=[1, 0], transformer_depth_middle=1, context_dim=32, num_heads=8,
                   num_head_channels=-1, use_linear_in_transformer=False, adm_in_channels=None)
#: what ComfyUI's model detection reads from an SDXL checkpoint's keys (its SDXL unet_config)
SDXL_PARAMS = dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2],
                   transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10, context_dim=2048,
                   num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2816,
                   transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])
#: the tiny SDXL-shaped UNet's (streamrt.random_models "tiny-xl": time embedding 8 wide, pooled 32)
TINY_XL_PARAMS = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1],
                      transformer_depth=[0, 2], transformer_depth_middle=2, context_dim=64, num_heads=-1,
                      num_head_channels=16, use_linear_in_transformer=True, adm_in_channels=6 * 8 + 32)


def _meta_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


@pytest.mark.parametrize(("params", "shipped", "upcast"), [(SD15_PARAMS, "sd1", False), (SD21_PARAMS, "sd2-v", True)])
def test_unet_config_from_ldm_builds_the_shipped_architectures(params, shipped, upcast) -> None:
    from diffusers import UNet2DConditionModel

    ours = _meta_unet(unet_config_from_ldm(params, upcast_attention=upcast))
    reference = _meta_unet(UNet2DConditionModel.load_config(CONFIG_ROOT / shipped, subfolder="unet"))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    for name in ("down_block_types", "up_block_types", "cross_attention_dim", "use_linear_projection",
                 "upcast_attention", "attention_head_dim", "layers_per_block", "block_out_channels"):
        mine, theirs = ours.config[name], reference.config[name]
        assert (list(mine) if isinstance(mine, (list, tuple)) else mine) == (
            list(theirs) if isinstance(theirs, (list, tuple)) else theirs), name
    # heads per level decide the attention math, which shapes alone do not show
    heads = [b.attentions[0].transformer_blocks[0].attn1.heads for b in ours.down_blocks if hasattr(b, "attentions")]
    assert heads == [b.attentions[0].transformer_blocks[0].attn1.heads for b in reference.down_blocks
                     if hasattr(b, "attentions")]


def test_unet_config_from_ldm_builds_sdxl_with_its_added_conditions() -> None:
    """ComfyUI's SDXL parameters and the pooled width give the shipped SDXL UNet, added embedding included."""
    from diffusers import UNet2DConditionModel

    ours = _meta_unet(unet_config_from_ldm(SDXL_PARAMS, pooled_dim=1280))
    reference = _meta_unet(UNet2DConditionModel.load_config(CONFIG_ROOT / "sdxl", subfolder="unet"))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert ours.config.addition_embed_type == "text_time" and ours.config.addition_time_embed_dim == 256
    with pytest.raises(ModelLoadError, match="unCLIP"):
        unet_config_from_ldm(SDXL_PARAMS, pooled_dim=1279)  # not six size conditions plus the pooled width


@pytest.mark.parametrize(("change", "message"), [
    ({"adm_in_channels": 2816}, "unCLIP"),
    ({"in_channels": 9}, "9 input"),
    ({"num_res_blocks": [2, 1, 2, 2]}, "same number"),
    ({"transformer_depth": [1, 0, 1, 1, 1, 1, 0, 0]}, "some blocks only"),
    ({"use_temporal_attention": True}, "video"),
    ({"transformer_depth_middle": -1}, "middle block"),
])
def test_unet_config_from_ldm_refuses_what_a_stream_cannot_run(change, message) -> None:
    with pytest.raises(ModelLoadError, match=message):
        unet_config_from_ldm({**SD15_PARAMS, **change})


def _host_weights(models, *, taesd=None, text_layers: int | None = None, params: dict = TINY_PARAMS) -> LdmWeights:
    """The tiny pipeline's weights as a host holds them: LDM UNet and VAE names, transformers' CLIP names."""
    unet = {k[len(UNET):]: v for k, v in unet_to_ldm(models.unet.state_dict(), models.unet.config).items()}
    if taesd is None:
        vae = {k[len(VAE):]: v for k, v in vae_to_ldm(models.vae.state_dict(), models.vae.config).items()}
    else:
        encoder, decoder = taesd_to_comfy(taesd)
        vae = {**{f"taesd_encoder.{k}": v for k, v in encoder.items()},
               **{f"taesd_decoder.{k}": v for k, v in decoder.items()}}
    layers = models.text_encoder.config.num_hidden_layers
    return LdmWeights(unet=unet, unet_params=dict(params), text_encoder=dict(models.text_encoder.state_dict()),
                      text_layers=text_layers or layers, vae=vae, prediction_type="epsilon")


@pytest.fixture(scope="module")
def config_dir(tiny_folders, tmp_path_factory):
    return write_config_dir(tmp_path_factory.mktemp("host") / "configs", tiny_folders["tiny"], tokenizer=True)


def _frames(models, images: torch.Tensor) -> torch.Tensor:
    config = StreamConfig(width=64, height=64, t_index_list=(20, 35), guidance_scale=1.5, seed=3)
    stream = Stream(models, config, prompt="a red fox", negative_prompt="blurry")
    return torch.cat([stream.step(images[i:i + 1]) for i in range(images.shape[0])])


def test_host_weights_stream_the_frames_of_the_diffusers_folder(tiny_models, tiny_taesd_models, config_dir) -> None:
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    for reference, taesd in ((tiny_models, None), (tiny_taesd_models, tiny_taesd_models.vae)):
        weights = _host_weights(reference, taesd=taesd)
        models = load_ldm_weights(weights, tokenizer_dir=None, dtype="fp32", device="cpu", config_dir=config_dir)
        assert models.is_tiny_vae == (taesd is not None)
        torch.testing.assert_close(_frames(models, images), _frames(reference, images), atol=1e-6, rtol=0)


def test_host_tensors_are_taken_without_a_copy(tiny_models, config_dir) -> None:
    weights = _host_weights(tiny_models)
    models = load_ldm_weights(weights, tokenizer_dir=None, dtype="fp32", device="cpu", config_dir=config_dir)
    given = {t.data_ptr() for t in (*weights.unet.values(), *weights.text_encoder.values())}
    held = [p.data_ptr() for m in (models.unet, models.text_encoder) for p in m.parameters()]
    assert all(ptr in given for ptr in held)


def test_text_layers_are_clip_skip(tiny_models, config_dir) -> None:
    full = tiny_models.text_encoder
    ids = torch.randint(0, full.config.vocab_size, (1, 77), generator=torch.Generator().manual_seed(2))
    hidden = full(ids, output_hidden_states=True, return_dict=True).hidden_states
    skipped = build_text_encoder(dict(full.state_dict()), config_dir, num_layers=1)
    expected = full.text_model.final_layer_norm(hidden[1]) if hasattr(full, "text_model") else full.final_layer_norm(
        hidden[1])
    torch.testing.assert_close(skipped(ids, return_dict=False)[0], expected, atol=1e-6, rtol=0)
    with pytest.raises(ModelLoadError, match="cannot keep"):
        build_text_encoder(dict(full.state_dict()), config_dir, num_layers=0)


def test_widths_that_do_not_fit_are_refused(tiny_models) -> None:
    weights = _host_weights(tiny_models)
    with pytest.raises(ModelLoadError, match="width 32"):  # no shipped configs for a 32-wide CLIP
        load_ldm_weights(weights, tokenizer_dir=None, dtype="fp32", device="cpu")
    weights.unet_params["context_dim"] = 768
    with pytest.raises(ModelLoadError, match="does not match"):
        load_ldm_weights(weights, tokenizer_dir=None, dtype="fp32", device="cpu", config_dir=CONFIG_ROOT / "sd1")
    weights.unet_params["context_dim"] = 32
    weights.prediction_type = "flow"
    with pytest.raises(ModelLoadError, match="flow"):
        load_ldm_weights(weights, tokenizer_dir=None, dtype="fp32", device="cpu")


def test_sdxl_host_weights_stream_the_frames_of_the_diffusers_folder(tmp_path) -> None:
    """SDXL through the host route: two text towers (the second with its projection), the UNet's added-condition
    embedding from LDM ``label_emb``; same weights and frames as the diffusers folder they came from."""
    from streamrt import load_diffusers_folder
    from streamrt.random_models import write_random_pipeline

    folder = write_random_pipeline(tmp_path / "xl", "tiny-xl", seed=1)
    reference = load_diffusers_folder(folder, dtype="fp32", device="cpu")
    configs = write_config_dir(tmp_path / "configs", folder, tokenizer=True)
    weights = _host_weights(reference, params=TINY_XL_PARAMS)
    weights.text_encoder_2 = dict(reference.text_encoder_2.state_dict())
    models = load_ldm_weights(weights, tokenizer_dir=None, dtype="fp32", device="cpu", config_dir=configs)
    assert models.family.name == "sdxl" and models.pooled_dim == 32
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        ours, theirs = getattr(models, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(_frames(models, images), _frames(reference, images), atol=1e-6, rtol=0)
    del weights.text_encoder_2["text_projection.weight"]
    with pytest.raises(ModelLoadError, match="text_projection"):
        load_ldm_weights(weights, tokenizer_dir=None, dtype="fp32", device="cpu", config_dir=configs)
