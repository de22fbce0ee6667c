"""Model files as a ComfyUI user has them, written from (tiny, random) diffusers models: original single-file
checkpoints (the inverse of diffusers' LDM conversion: the ``*_to_ldm`` functions; SDXL's in Stability's SGM
layout, with OpenCLIP names for its second text encoder), config folders, ComfyUI's TAESD encoder/decoder pair,
and LoRAs in kohya or PEFT style.

Plain functions, imported as a top-level module (``from model_files import write_ldm_checkpoint``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def _unet_prefixes(config) -> dict[str, tuple[str, bool]]:
    """diffusers prefix -> (LDM prefix, is a resnet), from the UNet config (CompVis block numbering)."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    pre = {"time_embedding.linear_1.": ("time_embed.0.", False), "time_embedding.linear_2.": ("time_embed.2.", False),
           "conv_in.": ("input_blocks.0.0.", False), "conv_norm_out.": ("out.0.", False),
           "conv_out.": ("out.2.", False), "mid_block.resnets.0.": ("middle_block.0.", True),
           "mid_block.attentions.0.": ("middle_block.1.", False), "mid_block.resnets.1.": ("middle_block.2.", True),
           # SDXL's pooled-text + size embedding (an nn.Sequential(Linear, SiLU, Linear) in the LDM UNet)
           "add_embedding.linear_1.": ("label_emb.0.0.", False), "add_embedding.linear_2.": ("label_emb.0.2.", False)}
    for i in range(n):
        for j in range(per):
            k = (per + 1) * i + j + 1
            pre[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{k}.0.", True)
            pre[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{k}.1.", False)
        if i < n - 1:
            pre[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(per + 1) * (i + 1)}.0.op.", False)
        for j in range(per + 1):
            k = (per + 1) * i + j
            pre[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{k}.0.", True)
            pre[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{k}.1.", False)
        if i < n - 1:
            slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
            pre[f"up_blocks.{i}.upsamplers.0."] = (f"output_blocks.{(per + 1) * i + per}.{slot}.", False)
    return pre


def ldm_name(key: str, config) -> str:
    """The LDM name of a diffusers UNet key or module path (without ``model.diffusion_model.``)."""
    pre = _unet_prefixes(config)
    match = max((p for p in pre if (key + ".").startswith(p)), key=len)
    new, resnet = pre[match]
    rest = (key + ".")[len(match):]
    if resnet:
        for a, b in _RESNET:
            if rest.startswith(a + "."):
                rest = b + rest[len(a):]
    return (new + rest).rstrip(".")


def unet_to_ldm(sd: dict, config) -> dict:
    return {"model.diffusion_model." + ldm_name(key, config): value for key, value in sd.items()}


def vae_to_ldm(sd: dict, config) -> dict:
    n = len(config["block_out_channels"])
    pre = {}
    for part in ("encoder", "decoder"):
        pre[f"{part}.conv_norm_out."] = f"{part}.norm_out."
        for k in range(2):
            pre[f"{part}.mid_block.resnets.{k}."] = f"{part}.mid.block_{k + 1}."
        pre[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    for i in range(n):
        for j in range(config["layers_per_block"] + 1):
            pre[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
            pre[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
        pre[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        pre[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    attention = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out."))
    out = {}
    for key, value in sd.items():
        matches = [p for p in pre if key.startswith(p)]
        if matches:
            match = max(matches, key=len)
            rest = key[len(match):]
            if pre[match].endswith("attn_1."):
                for a, b in attention:
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                if value.dim() == 2:
                    value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
            key = pre[match] + rest.replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + key] = value
    return out


def _with_text_model(sd: dict) -> dict:
    """Real checkpoints name CLIP's tower ``text_model.*`` (transformers 5's CLIPTextModel does not)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def clip_to_ldm(sd: dict, prefix: str = "cond_stage_model.transformer.") -> dict:
    """A CLIP text tower in transformers' names under ``prefix`` (SDXL: ``conditioner.embedders.0.transformer.``)."""
    return {prefix + k: v for k, v in _with_text_model(sd).items()}


def open_clip_to_ldm(sd: dict, prefix: str = "cond_stage_model.model.", *, sdxl: bool = False) -> dict:
    """A CLIP text tower -> OpenCLIP keys.

    SD2 (``sdxl`` False): plus the extra last layer and the projection real files carry (SD2 skips both).
    SDXL's second encoder (a ``CLIPTextModelWithProjection``): every layer, and its projection as OpenCLIP stores
    it, ``text_projection`` ``[width, projection]`` applied as ``x @ P``: the transpose of the Linear weight.
    """
    out, qkv = {}, {}
    sd = dict(sd)
    projection = sd.pop("text_projection.weight", None)
    names = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
             ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))
    for key, value in _with_text_model(sd).items():
        if key == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + key.rsplit(".", 1)[1]] = value
        else:
            idx, rest = key[len("text_model.encoder.layers."):].split(".", 1)
            proj = rest.split(".")[1]
            if proj in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault((idx, rest.rsplit(".", 1)[1]), {})[proj] = value
                continue
            for a, b in names:
                rest = b + rest[len(a):] if rest.startswith(a) else rest
            out[f"{prefix}transformer.resblocks.{idx}.{rest}"] = value
    for (idx, kind), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{idx}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    like = out[prefix + "token_embedding.weight"]
    if sdxl:
        out[prefix + "text_projection"] = projection.T  # OpenCLIP: pooled = x @ P
    else:
        last = max(int(k.split(".")[4]) for k in out if ".resblocks." in k)
        for key in [k for k in out if f".resblocks.{last}." in k]:  # OpenCLIP's last layer, which SD2 skips
            out[key.replace(f".resblocks.{last}.", f".resblocks.{last + 1}.")] = torch.full_like(out[key], 0.5)
        width = like.shape[1]
        out[prefix + "text_projection"] = torch.ones(width, width, device=like.device)
    out[prefix + "logit_scale"] = torch.ones((), device=like.device)
    return out


#: where SDXL's text encoders lie in Stability's SGM single-file layout
SDXL_CLIP_L, SDXL_OPEN_CLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


def ldm_state_dict(unet, vae, text_encoder, family: str, text_encoder_2=None) -> dict:
    """A single-file checkpoint's state dict: LDM names for UNet and VAE; the text encoder(s) as the family's files
    hold them (SD1: CLIP-L under ``cond_stage_model.transformer.``; SD2: OpenCLIP under ``cond_stage_model.model.``;
    SDXL: CLIP-L and OpenCLIP-bigG under ``conditioner.embedders.0/1``)."""
    sd = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    text = text_encoder.state_dict()
    if family == "sd1":
        sd.update(clip_to_ldm(text))
    elif family == "sd2":
        sd.update(open_clip_to_ldm(text))
    else:
        sd.update(clip_to_ldm(text, SDXL_CLIP_L))
        # real SDXL files carry CLIP-L's position ids (a buffer the loader must drop)
        sd[SDXL_CLIP_L + "text_model.embeddings.position_ids"] = torch.arange(
            text_encoder.config.max_position_embeddings, device=sd[SDXL_CLIP_L + "text_model.embeddings."
                                                                    "token_embedding.weight"].device)[None]
        sd.update(open_clip_to_ldm(text_encoder_2.state_dict(), SDXL_OPEN_CLIP, sdxl=True))
    return sd


def write_ldm_checkpoint(path: Path, models, family: str) -> Path:
    """The models' weights as an original single-file checkpoint (with the extras real files carry)."""
    sd = ldm_state_dict(models.unet, models.vae, models.text_encoder, family, getattr(models, "text_encoder_2", None))
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def write_sdxl_checkpoint(path: Path, models) -> Path:
    """An SDXL-layout (SGM) single-file checkpoint of SDXL-shaped models (``build_random_components("tiny-xl")``,
    or a loaded ``StreamModels``): ``model.diffusion_model.*`` with ``label_emb``, ``conditioner.embedders.0/1``,
    ``first_stage_model.*``."""
    return write_ldm_checkpoint(path, models, "sdxl")


def write_config_dir(folder: Path, diffusers_folder: Path, *, tokenizer: bool) -> Path:
    """The component configs of a diffusers folder (no weights; SDXL's ``text_encoder_2`` too), optionally with its
    tokenizer(s)."""
    for sub, name in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                      ("text_encoder_2", "config.json"), ("scheduler", "scheduler_config.json")):
        if (diffusers_folder / sub).is_dir():
            (folder / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(diffusers_folder / sub / name, folder / sub / name)
    if tokenizer:
        for sub in ("tokenizer", "tokenizer_2"):
            if (diffusers_folder / sub).is_dir():
                shutil.copytree(diffusers_folder / sub, folder / sub, dirs_exist_ok=True)
    return folder


def taesd_to_comfy(vae) -> tuple[dict, dict]:
    """A diffusers AutoencoderTiny as ComfyUI's taesd_encoder / taesd_decoder state dicts."""
    sd = vae.state_dict()
    encoder = {k[len("encoder.layers."):]: v for k, v in sd.items() if k.startswith("encoder.layers.")}
    decoder = {}
    for key, value in sd.items():
        if key.startswith("decoder.layers."):
            head, rest = key[len("decoder.layers."):].split(".", 1)
            decoder[f"{int(head) + 1}.{rest}"] = value  # ComfyUI's Decoder starts with a Clamp layer
    return encoder, decoder


def write_comfy_taesd(folder: Path, vae, name: str = "taesd") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    encoder, decoder = taesd_to_comfy(vae)
    paths = (folder / f"{name}_encoder.safetensors", folder / f"{name}_decoder.safetensors")
    save_file(encoder, str(paths[0]))
    save_file(decoder, str(paths[1]))
    return paths


#: kohya names of LoRA layers written by :func:`lora_state_dict`: real SD1 LoRA spelling (text_model.*)
LORA_LAYERS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ("unet", "down_blocks.0.attentions.0.proj_in"),  # 1x1 conv
    "lora_unet_down_blocks_0_resnets_0_conv1": ("unet", "down_blocks.0.resnets.0.conv1"),  # 3x3 conv (LoCon)
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
    "lora_te_text_model_encoder_layers_1_mlp_fc1": ("text_encoder", "encoder.layers.1.mlp.fc1"),
}


#: kohya names of LoRA layers of the tiny SDXL models ("tiny-xl"): LCM-LoRA-SDXL's spelling (kohya prefixes, diffusers
#: module names), both text encoders (lora_te1_ / lora_te2_), the second transformer block of a level, the added
#: embedding; text encoder module paths as transformers names them without ``text_model.``
LORA_LAYERS_XL = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k":
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
    "lora_unet_down_blocks_1_attentions_0_proj_in": ("unet", "down_blocks.1.attentions.0.proj_in"),  # Linear
    "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_2":
        ("unet", "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2"),
    "lora_unet_down_blocks_0_resnets_0_conv1": ("unet", "down_blocks.0.resnets.0.conv1"),  # 3x3 conv (LoCon)
    "lora_unet_add_embedding_linear_1": ("unet", "add_embedding.linear_1"),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": ("text_encoder_2", "encoder.layers.1.mlp.fc1"),
    "lora_te2_text_model_encoder_layers_0_self_attn_out_proj":
        ("text_encoder_2", "encoder.layers.0.self_attn.out_proj"),
}


def text_module(model, path: str):
    """A module of a text encoder by its path without ``text_model.``, however this transformers version nests it."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return model.get_submodule("text_model." + path)


def lora_target(models, target: str, module: str):
    """The module a :data:`LORA_LAYERS` / :data:`LORA_LAYERS_XL` entry adapts."""
    model = getattr(models, target) if not isinstance(models, dict) else models[target]
    return model.get_submodule(module) if target == "unet" else text_module(model, module)


def lora_state_dict(models, *, rank: int = 4, alpha: float = 2.0, seed: int = 0, style: str = "kohya",
                    layers: dict | None = None) -> dict:
    """A random LoRA for ``layers`` (default :data:`LORA_LAYERS`; :data:`LORA_LAYERS_XL` for SDXL) in kohya
    (lora_down/up + alpha) or PEFT (lora_A/B; ``unet.``, ``text_encoder.``, ``text_encoder_2.``) style."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for kohya, (target, module) in (layers or LORA_LAYERS).items():
        weight = lora_target(models, target, module).weight
        if weight.dim() == 4:
            down = torch.randn(rank, weight.shape[1], *weight.shape[2:], generator=gen) * 0.3
            up = torch.randn(weight.shape[0], rank, 1, 1, generator=gen) * 0.3
        else:
            down = torch.randn(rank, weight.shape[1], generator=gen) * 0.3
            up = torch.randn(weight.shape[0], rank, generator=gen) * 0.3
        if style == "kohya":
            out.update({f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up,
                        f"{kohya}.alpha": torch.tensor(alpha)})
        else:
            name = f"unet.{module}" if target == "unet" else f"{target}.text_model.{module}"
            out.update({f"{name}.lora_A.weight": down * (alpha / rank), f"{name}.lora_B.weight": up})
    return out


#: an SD1.5-layout checkpoint that ComfyUI's Load Checkpoint recognises (see write_sd15_layout_checkpoint)
SD15_LAYOUT_CKPT = "streamrt-sd15-layout.safetensors"
SD15_LAYOUT_LORA = "streamrt-sd15-layout-lora.safetensors"
#: SD1.5's UNet reduced to two levels (320 / 640 channels, one block each): ComfyUI reads the shape from the keys
SD15_LAYOUT_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)


def write_sd15_layout_checkpoint(root: Path) -> Path:
    """``<root>/checkpoints/streamrt-sd15-layout.safetensors`` (+ its sidecar config folder) and a LoRA for it in
    ``<root>/loras``, once; returns the checkpoint.

    ComfyUI recognises a checkpoint as SD1.5 from its keys (UNet base width 320, cross-attention 768, a full
    CLIP-L and a full VAE), so this one has SD1.5's layout with random weights: CLIP-L and the VAE at full
    size, the UNet reduced (:data:`SD15_LAYOUT_UNET`) to keep CPU runs short. Load Stream Pipeline gets the
    reduced UNet's shape from the config folder its sidecar names. Weights are fp16, which ComfyUI keeps its
    CPU text encoder in, so ComfyUI's route and ours start from equal values.
    """
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from streamrt.checkpoints import CONFIG_ROOT
    from streamrt.random_models import component_configs

    path = root / "checkpoints" / SD15_LAYOUT_CKPT
    if path.is_file():
        return path

    def build(factory, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return factory().eval().requires_grad_(False).half()

    full = component_configs("sd15")
    models = SimpleNamespace(unet=build(lambda: UNet2DConditionModel(**SD15_LAYOUT_UNET), 11),
                             vae=build(lambda: AutoencoderKL(**full["vae"]), 12),
                             text_encoder=build(lambda: CLIPTextModel(CLIPTextConfig(**full["text_encoder"])), 13))
    configs = root / "checkpoints" / "streamrt-sd15-layout-configs"
    shutil.copytree(CONFIG_ROOT / "sd1", configs, dirs_exist_ok=True)
    models.unet.save_config(configs / "unet")
    (root / "checkpoints" / (SD15_LAYOUT_CKPT + ".streamrt.json")).write_text(
        '{"config_dir": "streamrt-sd15-layout-configs"}')
    lora = lora_state_dict(models, seed=3)
    (root / "loras").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora.items()}, str(root / "loras" / SD15_LAYOUT_LORA))
    tmp = path.with_suffix(".part")
    write_ldm_checkpoint(tmp, models, "sd1")
    tmp.replace(path)  # complete or absent: a later run never sees half a file
    return path


def responsive_taesd(vae, seed: int = 0):
    """Draw a random ``AutoencoderTiny``'s weights again, in place, so that it passes differences on as a trained one
    does; returns it.

    With diffusers' initialisation a tiny random TAESD encodes every image to nearly the same latents (its biases
    drown the signal after a few layers) and decodes to values ComfyUI's clamp mostly cuts to black: frames from
    different inputs, LoRAs or prompts differ by less than one 8-bit step. Here every convolution gets He-normal
    weights (scaled by 0.7) and zero biases, then the last encoder convolution is rescaled so the latents of random
    images have mean 0 and std 1, and the last decoder convolution so that unit-normal latents decode to images of
    mean 0.5 and std 0.25 (before the clamp). Deterministic for a ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.7 * (2 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.zero_()
        encoder, decoder = vae.encoder.layers[-1], vae.decoder.layers[-1]
        latents = vae.encoder(torch.rand(8, 3, 64, 64, generator=gen) * 2 - 1)
        mean, std = latents.mean(), latents.std()
        encoder.weight /= std
        encoder.bias.sub_(mean).div_(std)
        decoded = vae.decoder.layers(torch.tanh(torch.randn(8, 4, 8, 8, generator=gen) / 3) * 3)  # in [0, 1]
        mean, scale = decoded.mean(), 0.25 / decoded.std()
        decoder.weight *= scale
        decoder.bias.sub_(mean).mul_(scale).add_(0.5)
    return vae


def write_tiny_checkpoint(root: Path, name: str, preset: str, *, seed: int = 0, taesd: str | None = None) -> Path:
    """``<root>/checkpoints/<name>``: a single-file checkpoint of the random ``preset`` (``tiny``: SD1 layout;
    ``tiny-xl``: SDXL's SGM layout) with its ``<name>.streamrt.json`` sidecar naming the config folder
    ``<stem>-configs`` beside it (tokenizers included: the tiny text encoders have a tiny vocabulary); with
    ``taesd`` (``"taesd"``, ``"taesdxl"``) also ComfyUI's ``<taesd>_encoder`` / ``<taesd>_decoder`` pair of the
    preset's TAESD, made responsive (:func:`responsive_taesd`), in ``<root>/vae_approx``. Once; returns the
    checkpoint. The diffusers folder the files come from is written to a temporary folder and removed."""
    import json
    import tempfile

    from streamrt.loading import load_diffusers_folder, load_taesd
    from streamrt.random_models import write_random_pipeline

    path = root / "checkpoints" / name
    if path.is_file():
        return path
    stem = name.rsplit(".", 1)[0]
    with tempfile.TemporaryDirectory(prefix="streamrt-ckpt-src-") as tmp:
        src, taesd_src = Path(tmp) / stem, Path(tmp) / "taesd"
        write_random_pipeline(src, preset, seed=seed, taesd_folder=taesd_src if taesd else None)
        models = load_diffusers_folder(src, dtype="fp32", device="cpu")
        write_config_dir(root / "checkpoints" / f"{stem}-configs", src, tokenizer=True)
        (root / "checkpoints" / (name + ".streamrt.json")).write_text(json.dumps({"config_dir": f"{stem}-configs"}))
        if taesd:
            vae = load_taesd(taesd_src, dtype=torch.float32, device=torch.device("cpu"))
            write_comfy_taesd(root / "vae_approx", responsive_taesd(vae, seed), name=taesd)
        tmp_path = path.with_suffix(".part")
        write_ldm_checkpoint(tmp_path, models, models.family.name)
        tmp_path.replace(path)  # complete or absent
    return path

# --------------------------------------------------------------------------- ControlNets


SD15_LAYOUT_CONTROLNET = "streamrt-sd15-layout-controlnet.safetensors"


def write_sd15_layout_controlnet(root: Path) -> Path:
    """``<root>/controlnet/streamrt-sd15-layout-controlnet.safetensors``, once: a random ControlNet in ComfyUI's
    (LDM) layout shaped like the reduced UNet of :func:`write_sd15_layout_checkpoint`, so that ComfyUI's
    ControlNetLoader recognises it as an SD1.5 ControlNet; returns the file."""
    path = root / "controlnet" / SD15_LAYOUT_CONTROLNET
    if not path.is_file():
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_LAYOUT_UNET)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_controlnet(path, random_controlnet(unet, seed=21), "ldm", dtype=torch.float16)
    return path


def random_controlnet(unet, *, seed: int = 0, conditioning_embedding_out_channels=(16, 32, 96, 256)):
    """A diffusers ``ControlNetModel`` shaped after ``unet`` (``ControlNetModel.from_unet``) with random weights
    everywhere: diffusers starts the zero convolutions and the control encoder's last convolution at zero, which
    would make every residual zero and hide a misplaced tensor, so every tensor is redrawn."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet,
                                           conditioning_embedding_out_channels=conditioning_embedding_out_channels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in controlnet.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return controlnet.eval().requires_grad_(False)


def controlnet_to_ldm(sd: dict, config, prefix: str = "control_model.") -> dict:
    """A diffusers ControlNet's state dict in the original (lllyasviel / ComfyUI ``comfy.cldm.cldm.ControlNet``) names:
    the UNet-encoder part as in a UNet checkpoint (:func:`ldm_name`), the control image encoder as
    ``input_hint_block.{0, 2, 4, ...}`` (convolutions with SiLUs between them), the residual outputs as
    ``zero_convs.N.0`` and ``middle_block_out.0``; under ``prefix`` (files: ``control_model.``, ComfyUI's module:
    none)."""
    # ldm_name numbers the upsamplers by the up block types, which a ControlNet has none of
    unet_like = {**dict(config), "up_block_types": ["UpBlock2D"] * len(config["block_out_channels"])}
    hint_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    out = {}
    for key, value in sd.items():
        if key.startswith("controlnet_cond_embedding."):
            part, rest = key[len("controlnet_cond_embedding."):].split(".", 1)
            if part == "conv_in":
                index = 0
            elif part == "conv_out":
                index = 2 * (hint_blocks + 1)
            else:
                index, rest = 2 * (int(rest.split(".", 1)[0]) + 1), rest.split(".", 1)[1]
            new = f"input_hint_block.{index}.{rest}"
        elif key.startswith("controlnet_down_blocks."):
            index, rest = key[len("controlnet_down_blocks."):].split(".", 1)
            new = f"zero_convs.{index}.0.{rest}"
        elif key.startswith("controlnet_mid_block."):
            new = "middle_block_out.0." + key[len("controlnet_mid_block."):]
        else:
            new = ldm_name(key, unet_like)
        out[prefix + new] = value
    return out


def write_controlnet(path: Path, controlnet, layout: str, *, dtype: torch.dtype | None = None, extra=None) -> Path:
    """``controlnet`` as ControlNet files users have: ``"folder"`` (``save_pretrained``), ``"diffusers"`` (a single
    file in diffusers' key names), ``"ldm"`` (a single file in the original names under ``control_model.``) or
    ``"ldm-bare"`` (the original names without prefix); ``.pth`` paths are written with ``torch.save``."""
    if layout == "folder":
        controlnet.save_pretrained(path, safe_serialization=True)
        return path
    sd = {k: v.detach() for k, v in controlnet.state_dict().items()}
    if layout == "ldm":
        sd = controlnet_to_ldm(sd, controlnet.config)
    elif layout == "ldm-bare":
        sd = controlnet_to_ldm(sd, controlnet.config, prefix="")
    elif layout != "diffusers":
        raise ValueError(layout)
    sd.update(extra or {})
    sd = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in sd.items()}
    if path.suffix in (".pth", ".ckpt", ".pt"):
        torch.save({"state_dict": sd}, path)
    else:
        save_file(sd, str(path))
    return path


def controlnet_residuals(controlnet, *, seed: int = 0, size: int = 16, batch: int = 2, added: dict | None = None):
    """``controlnet``'s down residuals and mid residual on random inputs made from ``seed`` (the same for every
    model of one config): latents, a timestep per row, text context, a control image in [0, 1] (8x the latents for
    the standard control encoder), SDXL's pooled text and size conditions."""
    config = controlnet.config
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.in_channels, size, size, generator=gen)
    context = torch.randn(batch, 7, config.cross_attention_dim, generator=gen)
    scale = 2 ** (len(config.conditioning_embedding_out_channels) - 1)  # the control encoder's downsampling
    hint = torch.rand(batch, config.conditioning_channels, size * scale, size * scale, generator=gen)
    timestep = torch.tensor([999, 321][:batch] + [500] * max(0, batch - 2))
    kwargs = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = added or {"text_embeds": torch.randn(batch, pooled, generator=gen),
                                                "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8,
                                                                           size * 8]] * batch, dtype=torch.float32)}
    dtype = next(controlnet.parameters()).dtype
    with torch.no_grad():
        down, mid = controlnet(sample.to(dtype), timestep, context.to(dtype), hint.to(dtype), return_dict=False,
                               **kwargs)
    return [d.float() for d in down], mid.float()


#: run by :func:`comfy_controlnet_reference` in ComfyUI's tree: argv = output file, JSON of the ControlNet's
#: parameters, seed, latent size
_COMFY_CONTROLNET_SCRIPT = r"""
import json, sys
out, params, seed, size = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.cldm.cldm, comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep
from safetensors.torch import save_file
model = comfy.cldm.cldm.ControlNet(image_size=None, use_spatial_transformer=True, dtype=torch.float32,
                                   operations=comfy.ops.disable_weight_init, **params)
gen = torch.Generator().manual_seed(seed)
with torch.no_grad():
    for p in model.parameters():  # the zero convolutions too: every residual must depend on every tensor
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
batch = 2
x = torch.randn(batch, params["in_channels"], size, size, generator=gen)
hint = torch.rand(batch, params["hint_channels"], size * 8, size * 8, generator=gen)
t = torch.tensor([999.0, 321.0])
context = torch.randn(batch, 7, params["context_dim"], generator=gen)
tensors = {"in.x": x, "in.hint": hint, "in.t": t, "in.context": context}
y = None
if params.get("adm_in_channels"):  # SDXL: pooled text, then each size condition's sinusoidal embedding (encode_adm)
    time_dim = params.pop("time_dim")
    pooled = torch.randn(batch, params["adm_in_channels"] - 6 * time_dim, generator=gen)
    time_ids = torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch, dtype=torch.float32)
    embedded = Timestep(time_dim)(time_ids.flatten()).reshape(batch, -1)
    y = torch.cat([pooled, embedded], dim=1)
    tensors.update({"in.pooled": pooled, "in.time_ids": time_ids})
with torch.no_grad():
    result = model(x, hint, t, context, y=y)
tensors.update({f"out.{i}": r for i, r in enumerate(result["output"])})
tensors["out.middle"] = result["middle"][0]
tensors.update({"sd." + k: v for k, v in model.state_dict().items()})
save_file({k: v.contiguous() for k, v in tensors.items()}, out)
"""


def comfy_controlnet_reference(comfyui: Path, out: Path, params: dict, *, seed: int = 0, size: int = 8) -> dict:
    """ComfyUI's own ControlNet (``comfy.cldm.cldm.ControlNet``, built from ``params`` as ComfyUI's model detection
    would give them, random weights) run once in a subprocess (ComfyUI's imports set global state): returns
    ``{"sd": its state_dict (bare LDM names), "inputs": {...}, "output": [zero_convs' outputs], "middle": tensor}``.
    ``params`` for SDXL carry ``time_dim``, the width of each size condition's embedding."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    # -c: the working directory (ComfyUI's tree) comes first on sys.path, so `import comfy` finds ComfyUI's
    done = subprocess.run([sys.executable, "-c", _COMFY_CONTROLNET_SCRIPT, str(out), json.dumps(params), str(seed),
                           str(size)],
                          cwd=comfyui, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"ComfyUI's ControlNet failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    tensors = load_file(str(out))
    outputs = sorted((int(k[4:]), v) for k, v in tensors.items() if k.startswith("out.") and k[4:].isdigit())
    return {"sd": {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")},
            "inputs": {k[3:]: v for k, v in tensors.items() if k.startswith("in.")},
            "output": [v for _, v in outputs], "middle": tensors["out.middle"]}


# Two load paths that give equal weights (a checkpoint and its diffusers folder, a TAESD pair and its folder) need
# not give bit-equal frames on every machine: tensors of the same values may differ in memory layout, and a CPU's
# kernels (chosen by layout, instruction set and thread count) then sum in another order. Observed: up to 6.4e-5 on
# the tiny SDXL UNet's fp32 frames on one CI machine, 0 on another. A load that got one weight wrong moves a frame by
# far more (a LoRA at 0.8 moves it by > 1e-3; see the tests that say so).
LOAD_PATH_ATOL = 2e-4


def assert_frames_match(got: torch.Tensor, want: torch.Tensor) -> None:
    """Frames computed from two load paths of the same weights agree within :data:`LOAD_PATH_ATOL`."""
    torch.testing.assert_close(got, want, rtol=0, atol=LOAD_PATH_ATOL)
