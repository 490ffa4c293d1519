"""Moving whole tensors in and out of a (possibly ZeRO-3 sharded) model, and a stage's final weights.

Under ZeRO-3 each rank holds a slice of every large parameter. Reading or writing full tensors
gathers one module's parameters at a time (a collective: every rank calls these functions in the
same order), so no rank ever holds more than one layer's full weights beyond what it saves.
peft + ZeRO-3 is known to save empty adapters when this gathering is skipped.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import deepspeed
import torch
from safetensors.torch import save_file
from torch import nn

from para_train.models.build import WeightReader, read_weights


def _is_sharded(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _module_groups(module: nn.Module, prefix: str = ""):
    for mod_name, sub in module.named_modules(prefix=prefix.rstrip(".")):
        params = list(sub.named_parameters(prefix=mod_name, recurse=False))
        if params:
            yield params


@torch.no_grad()
def copy_into(module: nn.Module, reader: WeightReader, rank: int, name_map: Callable[[str], str] = lambda n: n,
              strict: bool = True) -> int:
    """Copy tensors named like `module`'s parameters (through `name_map`) into it. Returns the count."""
    missing, copied = [], 0
    for params in _module_groups(module):
        sharded = [p for _, p in params if _is_sharded(p)]
        with deepspeed.zero.GatheredParameters(sharded, modifier_rank=0, enabled=bool(sharded)):
            for name, p in params:
                key = name_map(name)
                if key not in reader:
                    missing.append(key)
                    continue
                if rank == 0 or not _is_sharded(p):
                    src = reader.get(key)
                    if tuple(src.shape) != tuple(p.shape):
                        raise ValueError(f"weight {key}: shape {tuple(src.shape)} in the file, {tuple(p.shape)} in the "
                                         "model; the config's architecture does not match these weights")
                    p.data.copy_(src.to(p.dtype))
                copied += 1
    if strict and missing:
        raise ValueError(f"{len(missing)} weights missing from the file, e.g. {missing[:3]}")
    return copied


@torch.no_grad()
def gather_full(module: nn.Module, rank: int, keep: Callable[[str, torch.Tensor], bool] = lambda n, p: True,
                prefix: str = "") -> dict[str, torch.Tensor]:
    """Full CPU copies of the selected parameters on rank 0 (an empty dict elsewhere)."""
    out: dict[str, torch.Tensor] = {}
    for params in _module_groups(module, prefix):
        chosen = [(n, p) for n, p in params if keep(n, p)]
        if not chosen:
            continue
        sharded = [p for _, p in chosen if _is_sharded(p)]
        with deepspeed.zero.GatheredParameters(sharded, enabled=bool(sharded)):
            if rank == 0:
                for name, p in chosen:
                    out[name] = p.data.detach().to("cpu", torch.float32).clone()
    return out


# ------------------------------------------------------------------ a stage's final weights
# final/unet/            diffusers UNet2DConditionModel folder (config.json + safetensors)
# final/projection.safetensors   the LLM-width -> cross-attention projection, if any
# final/lora/            peft adapter folder (adapter_config.json + adapter_model.safetensors)
# final/ema.safetensors  EMA of every trainable tensor, same names as the model's parameters


def save_final(model: nn.Module, out: Path, rank: int, ema_state: dict[str, torch.Tensor] | None = None) -> None:
    """`model` is the ParaDiffusion module (engine.module). Collective; rank 0 writes."""
    unet_sd = gather_full(model.unet, rank, prefix="")
    proj = model.text_encoder.projection
    proj_sd = gather_full(proj, rank) if proj is not None else {}
    llm = model.text_encoder.llm
    lora_sd = gather_full(llm, rank, keep=lambda n, p: "lora_" in n)
    if rank != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "unet").mkdir(exist_ok=True)
    model.unet.save_config(out / "unet")
    save_file({k: v.contiguous() for k, v in unet_sd.items()}, out / "unet" / "diffusion_pytorch_model.safetensors")
    if proj_sd:
        save_file(proj_sd, out / "projection.safetensors")
    if lora_sd:
        from peft import get_peft_model_state_dict

        adapter = get_peft_model_state_dict(llm, state_dict=lora_sd)
        (out / "lora").mkdir(exist_ok=True)
        llm.peft_config["default"].save_pretrained(str(out / "lora"))
        save_file({k: v.contiguous() for k, v in adapter.items()}, out / "lora" / "adapter_model.safetensors")
    if ema_state:
        save_file({k: v.contiguous() for k, v in ema_state.items()}, out / "ema.safetensors")
    (out / "final.json").write_text(json.dumps({"unet": len(unet_sd), "projection": len(proj_sd),
                                                "lora": len(lora_sd)}) + "\n")


def load_final(model: nn.Module, folder: Path, rank: int, with_lora: bool) -> dict[str, int]:
    """Initialise from a previous stage's final weights (collective)."""
    counts = {}
    with read_weights(str(folder / "unet")) as reader:
        counts["unet"] = copy_into(model.unet, reader, rank)
    proj = model.text_encoder.projection
    if proj is not None and (folder / "projection.safetensors").exists():
        with WeightReader([folder / "projection.safetensors"]) as reader:
            counts["projection"] = copy_into(proj, reader, rank)
    if with_lora and (folder / "lora" / "adapter_model.safetensors").exists():
        llm = model.text_encoder.llm
        # peft saves `base_model.model.X.lora_A.weight`; the live name is `base_model.model.X.lora_A.default.weight`.
        with WeightReader([folder / "lora" / "adapter_model.safetensors"]) as reader:
            lora_only = nn.ModuleDict({"m": llm})  # walk names with a fixed prefix we strip below
            counts["lora"] = _copy_lora(lora_only, reader, rank)
    return counts


def _copy_lora(wrapper: nn.Module, reader: WeightReader, rank: int) -> int:
    copied = 0
    for params in _module_groups(wrapper):
        chosen = [(n, p) for n, p in params if "lora_" in n]
        if not chosen:
            continue
        sharded = [p for _, p in chosen if _is_sharded(p)]
        with torch.no_grad(), deepspeed.zero.GatheredParameters(sharded, modifier_rank=0, enabled=bool(sharded)):
            for name, p in chosen:
                key = name[len("m."):].replace(".default.", ".")
                if key not in reader:
                    raise ValueError(f"LoRA weight {key} missing from the previous stage's adapter; the LoRA settings "
                                     "(rank, target_modules) must match that stage's")
                if rank == 0 or not _is_sharded(p):
                    p.data.copy_(reader.get(key).to(p.dtype))
                copied += 1
    return copied
