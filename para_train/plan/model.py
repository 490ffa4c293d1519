"""The model a plan is about, built on the meta device (no memory, no weights): its three architectures, the
ParaDiffusion module with the engine's freezing rule, and its parameter inventory."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


# SDXL's VAE (madebyollin/sdxl-vae-fp16-fix has the same architecture): used when model.vae.path has
# no config.json on this machine, e.g. planning before the weights are copied.
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, sample_size=1024)


@dataclass
class Architecture:
    llm: dict  # the LLM's transformers config as a dict
    unet: dict  # UNet2DConditionModel kwargs
    vae: dict  # AutoencoderKL kwargs
    notes: list[str]


def architecture(cfg) -> Architecture:
    """The three architectures, from local config.json files where they exist, else from the YAML."""
    import json

    from para_train.config import ConfigError
    from para_train.models import build
    from para_train.models.tiny import TINY_VAE

    m, notes = cfg.model, []
    llm_path = build.resolve_llm_path(m.llm, cfg.cache_dir)  # "tiny" is generated into the cache on first use
    if llm_path is not None and (Path(llm_path) / "config.json").is_file():
        llm = build.llm_config(m.llm, llm_path).to_dict()
    elif m.llm.config is not None:
        llm = build.llm_config(m.llm, None).to_dict()
        if llm_path is not None:
            notes.append(f"LLM: no config.json at {llm_path} here; using model.llm.config")
    else:
        raise ConfigError(f"model.llm.config: no config.json at {llm_path}; set model.llm.config to the LLM's "
                          "architecture "
                          "(hidden_size, intermediate_size, num_hidden_layers, ...) to plan without the weights")
    vae_path = Path(m.vae.path).expanduser()
    if m.vae.path == "tiny":
        vae = dict(TINY_VAE)
    elif (vae_path / "config.json").is_file():
        vae = {k: v for k, v in json.loads((vae_path / "config.json").read_text()).items() if not k.startswith("_")}
    else:
        vae = dict(SDXL_VAE)
        notes.append(f"VAE: no config.json at {m.vae.path} here; assuming SDXL's VAE architecture")
    return Architecture(llm, build.unet_config(m.unet), vae, notes)


def build_meta_model(cfg, arch: Architecture, dtype):
    """The ParaDiffusion module on the meta device, from the builders and the freezing rule the engine uses.

    training.engine.build_model itself cannot run here: it needs a process group (deepspeed.zero.Init), the
    tokenizer and the weight files on this machine, and a real-scale model would need its memory. So this makes
    the same parts with the same models/build.py builders, in the engine's order (LoRA after the base LLM),
    and freezes them with the engine's rule (files.names.trains)."""
    import torch
    from transformers import AutoConfig

    from para_train.files import names
    from para_train.models import build
    from para_train.models.paradiffusion import ParaDiffusion, TextEncoder

    m = cfg.model
    with torch.device("meta"):  # the parts with parameters; the wrapper's noise schedule is small and stays real
        llm = build.build_llm(AutoConfig.for_model(**arch.llm))
        width, cross = arch.llm["hidden_size"], arch.unet.get("cross_attention_dim", 1280)
        projection = build.build_projection(width, cross) if m.projection else None
        if m.lora.enabled:
            llm = build.add_lora(llm, m.lora)
        unet = build.build_unet(arch.unet)
    model = ParaDiffusion(TextEncoder(llm, m.llm.layer, projection), unet, m.prediction_type, m.min_snr_gamma,
                          m.num_train_timesteps, image_size=cfg.data.resolution,
                          zero_terminal_snr=m.zero_terminal_snr).to(dtype)
    for name, p in model.named_parameters():
        p.requires_grad_(names.trains(name))
    return model


@dataclass
class Inventory:
    trainable: int
    frozen: int
    frozen_llm_embedding: int  # never gathered for a backward pass
    largest_layer: int  # most parameters held directly by one module (DeepSpeed's `largest_layer_params`)
    persistent: int  # parameters small enough that ZeRO-3 keeps them whole on every GPU
    llm: int
    unet: int
    lora: int
    vae: int


def inventory(model, vae_config: dict, persistence_threshold: int) -> Inventory:
    import torch
    from diffusers import AutoencoderKL

    from para_train.files import names

    params = [(n, p.numel(), p.requires_grad) for n, p in model.named_parameters()]
    with torch.device("meta"):
        vae = sum(p.numel() for p in AutoencoderKL(**vae_config).parameters())
    return Inventory(trainable=sum(k for _, k, g in params if g), frozen=sum(k for _, k, g in params if not g),
                     frozen_llm_embedding=model.text_encoder.llm.get_input_embeddings().weight.numel(),
                     largest_layer=max(sum(p.numel() for p in mod.parameters(recurse=False))
                                       for mod in model.modules()),
                     persistent=sum(k for _, k, _ in params if k <= persistence_threshold),
                     llm=sum(k for n, k, _ in params if n.startswith(names.LLM_PREFIX) and not names.is_lora(n)),
                     unet=sum(k for n, k, _ in params if n.startswith(names.UNET_PREFIX)),
                     lora=sum(k for n, k, _ in params if names.is_lora(n)), vae=vae)
