"""Building the ParaDiffusion parts from config sections, and reading pretrained weights.

Builders make modules with fresh (seeded) weights; pretrained weights are read separately as
named tensors (`read_weights`) so the caller can copy them in however its parameters are laid out
(under ZeRO-3 they are sharded). Only safetensors are read: nothing here unpickles files.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from para_train.config import ConfigError, LLMConfig, LoRAConfig, UNetConfig
from para_train.models.tiny import tiny_llama_dir, tiny_vae_dir


def resolve_llm_path(cfg: LLMConfig, cache_dir: Path) -> str | None:
    return str(tiny_llama_dir(cache_dir)) if cfg.path == "tiny" else cfg.path


def resolve_vae_path(path: str, cache_dir: Path) -> str:
    return str(tiny_vae_dir(cache_dir)) if path == "tiny" else path


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


# ------------------------------------------------------------------ weights as named tensors


def safetensors_files(folder: str) -> list[Path]:
    root = Path(folder)
    index = sorted(root.glob("*.safetensors.index.json"))
    if index:
        names = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
        hint = f" (found {pickled}: convert them to safetensors; para-train never unpickles weights)" if pickled else ""
        raise ConfigError(f"no .safetensors weights in {folder}{hint}")
    return files


class WeightReader:
    """Lazy read access to the tensors of one or more safetensors files, by name."""

    def __init__(self, files: list[Path], strip_prefixes: tuple[str, ...] = ()):
        from safetensors import safe_open

        self._stack = ExitStack()
        self._where: dict[str, tuple[object, str, Path]] = {}
        for f in files:
            handle = self._stack.enter_context(safe_open(str(f), framework="pt"))
            for key in handle.keys():
                name = key
                for prefix in strip_prefixes:
                    if name.startswith(prefix):
                        name = name[len(prefix):]
                        break
                self._where[name] = (handle, key, Path(f))

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> Iterator[str]:
        return iter(self._where)

    def get(self, name: str) -> torch.Tensor:
        handle, key, _ = self._where[name]
        return handle.get_tensor(key)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file's header (nothing is read)."""
        handle, key, _ = self._where[name]
        return tuple(handle.get_slice(key).get_shape())

    def source(self, name: str) -> tuple[Path, str]:
        """(file, key in the file) of a tensor, to read it again later."""
        _, key, path = self._where[name]
        return path, key

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_weights(folder: str, strip_prefixes: tuple[str, ...] = ()) -> WeightReader:
    return WeightReader(safetensors_files(folder), strip_prefixes)
