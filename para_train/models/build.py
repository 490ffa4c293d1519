"""Building the ParaDiffusion parts from config sections, and reading pretrained weights.

Builders make modules with fresh (seeded) weights; pretrained weights are read separately as
named tensors (`read_weights`) so the caller can copy them in however its parameters are laid out
(under ZeRO-3 they are sharded). Only safetensors are read: nothing here unpickles files.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from para_train.config import TINY, ConfigError, LLMConfig, LoRAConfig, UNetConfig
from para_train.files.safetensors_io import WeightReader, read_weights, safetensors_files  # noqa: F401 (re-exported)
from para_train.models.tiny import tiny_llama_dir, tiny_vae_dir


def resolve_llm_path(cfg: LLMConfig, cache_dir: Path) -> str | None:
    return str(tiny_llama_dir(cache_dir)) if cfg.path == TINY else cfg.path


def resolve_vae_path(path: str, cache_dir: Path) -> str:
    return str(tiny_vae_dir(cache_dir)) if path == TINY else path


def load_tokenizer(llm_path: str, max_length: int):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(llm_path)
    except OSError as e:
        raise ConfigError(f"model.llm.path: no tokenizer found at {llm_path!r} ({e}); point it at a folder with "
                          "tokenizer files (downloads are not possible here)") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as ParaDiffusion: pad = EOS, attention mask kept
    tok.padding_side = "right"
    tok.model_max_length = max_length
    return tok


def llm_config(cfg: LLMConfig, llm_path: str | None):
    from transformers import AutoConfig, LlamaConfig

    if llm_path is not None:
        try:
            return AutoConfig.from_pretrained(llm_path)
        except OSError as e:
            raise ConfigError(f"model.llm.path: cannot read a model config at {llm_path!r} ({e}); give a local folder "
                              "with config.json, or set model.llm.config") from None
    return LlamaConfig(**cfg.config)


def build_llm(config) -> nn.Module:
    """A decoder LLM without its LM head (e.g. LlamaModel), frozen; weights are fresh."""
    from transformers import AutoModel

    model = AutoModel.from_config(config, torch_dtype=torch.float32)
    return model.requires_grad_(False)


def add_lora(llm: nn.Module, cfg: LoRAConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in llm.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        raise ConfigError(f"model.lora.target_modules: {missing} not found in the LLM; its linear layers include "
                          f"{sorted(n for n in names if n.endswith('proj'))}")
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                      bias="none")
    return get_peft_model(llm, lora)


# Inputs of UNet2DConditionModel that ParaDiffusion does not feed: its only condition is the LLM's token features.
_UNFED = {"addition_embed_type": "SDXL's micro-conditioning (pooled text + size/crop ids)",
          "class_embed_type": "class labels", "encoder_hid_dim_type": "a second text projection inside the UNet"}


def unet_config(cfg: UNetConfig) -> dict:
    """The UNet's architecture: `config` alone, or the folder's config.json with `config`'s keys over it."""
    if cfg.path is not None:
        path = Path(cfg.path).expanduser() / "config.json"
        if not path.is_file():
            raise ConfigError(f"model.unet.path: {path} does not exist; point it at a UNet2DConditionModel folder "
                              "(e.g. .../stable-diffusion-xl-base-1.0/unet)")
        conf = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        conf.update(cfg.config or {})
    else:
        conf = dict(cfg.config)
    if cfg.micro_conditioning:
        if conf.get("addition_embed_type") != "text_time" or not conf.get("addition_time_embed_dim"):
            raise ConfigError("model.unet.micro_conditioning: needs a UNet with SDXL's addition_embed_type: text_time "
                              "and an addition_time_embed_dim (e.g. SDXL's unet/ as model.unet.path); got "
                              f"addition_embed_type={conf.get('addition_embed_type')!r}")
        if not isinstance(conf.get("cross_attention_dim"), int):
            raise ConfigError("model.unet.micro_conditioning: needs one cross_attention_dim (an integer)")
        # the pooled vector has the cross-attention width
        conf["projection_class_embeddings_input_dim"] = conf["cross_attention_dim"] + 6 * conf["addition_time_embed_dim"]
    for key, what in _UNFED.items():
        if key == "addition_embed_type" and cfg.micro_conditioning:
            continue
        if conf.get(key) is not None:
            raise ConfigError(f"model.unet.config.{key}: the UNet expects {what} ({key}={conf[key]!r}), which "
                              f"para-train does not feed; ParaDiffusion conditions on the LLM's token features only: "
                              f"set model.unet.config.{key}=null (its weights are then dropped and listed in the log)"
                              + (", or keep SDXL's micro-conditioning with model.unet.micro_conditioning=true"
                                 if key == "addition_embed_type" else ""))
    return conf


def build_unet(config: dict) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


def build_projection(in_dim: int, out_dim: int) -> nn.Linear:
    return nn.Linear(in_dim, out_dim)


def load_vae(path: str) -> nn.Module:
    from diffusers import AutoencoderKL

    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model.vae.path: {path} is not an AutoencoderKL folder (no config.json); point it at one, "
                          "e.g. a local copy of madebyollin/sdxl-vae-fp16-fix, or use 'tiny'")
    return AutoencoderKL.from_pretrained(path, use_safetensors=True)


def check_architecture(cfg) -> None:
    """The parts fit together (from their configs, before any rank starts): a tokenizer to train with, the LLM's
    width against the UNet's cross-attention (or a projection), data.resolution through the VAE and the UNet, no
    ZeRO-3 leaf module inside an LLM that LoRA trains."""
    import inspect

    from diffusers import UNet2DConditionModel
    from transformers import LlamaConfig

    from para_train.models.tiny import TINY_LLAMA, TINY_VAE

    m = cfg.model
    if m.llm.path is None:
        raise ConfigError("model.llm.path: a tokenizer is needed to train; set model.llm.path to a folder with one")
    unet = unet_config(m.unet)
    # the tiny Llama's architecture without generating it (training does, once per cache)
    llm = LlamaConfig(**TINY_LLAMA) if m.llm.path == TINY else llm_config(m.llm, m.llm.path)
    width = llm.hidden_size
    cross = unet.get("cross_attention_dim", 1280)
    if width != cross and not m.projection:
        raise ConfigError(f"model.projection: the LLM width is {width} but the UNet's cross_attention_dim is {cross}; "
                          "set model.projection=true or make model.unet.config.cross_attention_dim match")
    vae = TINY_VAE if m.vae.path == TINY else json.loads((Path(m.vae.path).expanduser() / "config.json").read_text())
    unet_default = inspect.signature(UNet2DConditionModel.__init__).parameters["block_out_channels"].default
    levels = len(vae["block_out_channels"]) - 1 + len(unet.get("block_out_channels", unet_default)) - 1
    if cfg.data.resolution % 2 ** levels:
        raise ConfigError(f"data.resolution={cfg.data.resolution}: the VAE and the UNet downsample by {2 ** levels} "
                          f"together; use a multiple of {2 ** levels}")
    if cfg.deepspeed.leaf_modules and m.lora.enabled:
        with torch.device("meta"):  # the LLM's module types, without its memory
            in_llm = sorted(set(cfg.deepspeed.leaf_modules) & {type(mod).__name__ for mod in build_llm(llm).modules()})
        if in_llm:
            raise ConfigError(f"deepspeed.leaf_modules: {in_llm} are LLM modules, which DeepSpeed cannot gather whole "
                              "while LoRA trains (their weights would be missing in the backward pass); remove them "
                              "(they may stay in stage 1, where the LLM is frozen)")
