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

from para_train.files import names, zero3
from para_train.files.layout import FinalLayout
from para_train.files.safetensors_io import WeightReader, read_weights


def _is_sharded(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _module_groups(module: nn.Module, prefix: str = ""):
    for mod_name, sub in module.named_modules(prefix=prefix.rstrip(".")):
        params = list(sub.named_parameters(prefix=mod_name, recurse=False))
        if params:
            yield params


# Where each parameter's value came from: full parameter name -> (safetensors file, key). After DeepSpeed
# builds its optimizer, the fp32 master copy is set from these files again (see `set_fp32_masters`).
Provenance = dict[str, tuple[Path, str]]


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


@torch.no_grad()
def copy_into(module: nn.Module, reader: WeightReader, rank: int, name_map: Callable[[str], str] = lambda n: n,
              strict: bool = True, record: Provenance | None = None, prefix: str = "") -> int:
    """Copy tensors named like `module`'s parameters (through `name_map`) into it. Returns the count.
    `record` (if given) notes each copied parameter's source under `prefix + name`."""
    missing, copied = [], 0
    for params in _module_groups(module):
        for name, p in params:
            key = name_map(name)
            if key in reader and reader.shape(key) != _full_shape(p):
                raise ValueError(f"weight {key}: shape {reader.shape(key)} in the file, {_full_shape(p)} in the "
                                 "model; the config's architecture does not match these weights")
        sharded = [p for _, p in params if _is_sharded(p)]
        with deepspeed.zero.GatheredParameters(sharded, modifier_rank=0, enabled=bool(sharded)):
            for name, p in params:
                key = name_map(name)
                if key not in reader:
                    missing.append(key)
                    continue
                if rank == 0 or not _is_sharded(p):
                    p.data.copy_(reader.get(key).to(p.dtype))
                copied += 1
                if record is not None:
                    record[prefix + name] = reader.source(key)
    if strict and missing:
        raise ValueError(f"{len(missing)} weights missing from the file, e.g. {missing[:3]}")
    return copied


def _group(name: str) -> str:
    """A parameter's module group for reports: down_blocks.1, mid_block, conv_in, ..."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


@torch.no_grad()
def copy_matching(module: nn.Module, reader: WeightReader, rank: int, record: Provenance | None = None,
                  prefix: str = "") -> dict[str, list[str]]:
    """Copy every tensor whose name and shape match; the others keep their fresh initialisation. Returns
    names by outcome: copied, reinitialised (in the file with another shape), fresh (not in the file),
    dropped (in the file, not in the module). The decision reads shapes from the files' headers, so every
    rank takes it alike (the copy itself is collective under ZeRO-3)."""
    report: dict[str, list[str]] = {"copied": [], "reinitialised": [], "fresh": [], "dropped": []}
    names = set()
    for params in _module_groups(module):
        chosen = []
        for name, p in params:
            names.add(name)
            if name not in reader:
                report["fresh"].append(name)
            elif reader.shape(name) != _full_shape(p):
                report["reinitialised"].append(f"{name} {list(_full_shape(p))} (file: {list(reader.shape(name))})")
            else:
                chosen.append((name, p))
        if not chosen:
            continue
        sharded = [p for _, p in chosen if _is_sharded(p)]
        with deepspeed.zero.GatheredParameters(sharded, modifier_rank=0, enabled=bool(sharded)):
            for name, p in chosen:
                if rank == 0 or not _is_sharded(p):
                    p.data.copy_(reader.get(name).to(p.dtype))
                report["copied"].append(name)
                if record is not None:
                    record[prefix + name] = reader.source(name)
    report["dropped"] = sorted(k for k in reader.keys() if k not in names)
    return report


def summarize(report: dict[str, list[str]]) -> dict[str, str]:
    """Per outcome, the count and the module groups it touched, e.g. {"reinitialised": "40: down_blocks.1 (8), ..."}."""
    out = {}
    for outcome, names in report.items():
        groups: dict[str, int] = {}
        for n in names:
            groups[_group(n)] = groups.get(_group(n), 0) + 1
        out[outcome] = f"{len(names)}" + (": " + ", ".join(f"{g} ({c})" for g, c in groups.items()) if groups else "")
    return out


@torch.no_grad()
def gather_full(module: nn.Module, rank: int, keep: Callable[[str, torch.Tensor], bool] = lambda n, p: True,
                prefix: str = "") -> dict[str, torch.Tensor]:
    """Full CPU copies of the selected parameters on rank 0 (an empty dict elsewhere). A trainable parameter of a
    ZeRO-3 engine comes from the optimizer's fp32 master copy (in bf16 training the parameter itself is rounded)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for params in _module_groups(module, prefix):
        chosen = [(n, p) for n, p in params if keep(n, p)]
        if not chosen:
            continue
        masters = {n for n, p in chosen if p.requires_grad and hasattr(p, "_z3_optimizer")}
        for name, p in chosen:
            if name in masters:
                full = safe_get_full_fp32_param(p)  # collective: every rank gathers the master
                if rank == 0:
                    out[name] = full.detach().to("cpu", torch.float32).reshape(_full_shape(p)).clone()
        chosen = [(n, p) for n, p in chosen if n not in masters]
        if not chosen:
            continue
        sharded = [p for _, p in chosen if _is_sharded(p)]
        with deepspeed.zero.GatheredParameters(sharded, enabled=bool(sharded)):
            if rank == 0:
                for name, p in chosen:
                    out[name] = p.data.detach().to("cpu", torch.float32).clone()
    return out


# ------------------------------------------------------------------ a stage's final weights (files.layout.FinalLayout)


def save_final(model: nn.Module, out: Path, rank: int, ema_state: dict[str, torch.Tensor] | None = None) -> None:
    """`model` is the ParaDiffusion module (engine.module). Collective; rank 0 writes."""
    unet_sd = gather_full(model.unet, rank, prefix="")
    proj = model.text_encoder.projection
    proj_sd = gather_full(proj, rank) if proj is not None else {}
    llm = model.text_encoder.llm
    lora_sd = gather_full(llm, rank, keep=lambda n, p: names.is_lora(n))
    if rank != 0:
        return
    final = FinalLayout(out)
    final.unet.mkdir(parents=True, exist_ok=True)
    model.unet.save_config(final.unet)
    save_file({k: v.contiguous() for k, v in unet_sd.items()}, final.unet / "diffusion_pytorch_model.safetensors")
    if proj_sd:
        save_file(proj_sd, final.projection)
    if lora_sd:
        from peft import get_peft_model_state_dict

        adapter = get_peft_model_state_dict(llm, state_dict=lora_sd)
        final.lora.mkdir(exist_ok=True)
        llm.peft_config["default"].save_pretrained(str(final.lora))
        save_file({k: v.contiguous() for k, v in adapter.items()}, final.adapter)
    if ema_state:
        save_file({k: v.contiguous() for k, v in ema_state.items()}, final.ema)
    final.marker.write_text(json.dumps({"unet": len(unet_sd), "projection": len(proj_sd),
                                                "lora": len(lora_sd)}) + "\n")


def load_init(model: nn.Module, source, rank: int, with_lora: bool, use_ema: bool,
              record: Provenance | None = None) -> dict[str, int]:
    """Initialise from a stage's final weights, an export or ParaDiffusion's release (a
    `para_train.models.pretrained.InitSource`); collective. With `use_ema` and an EMA in the source, the
    trainable tensors it holds come from the EMA. Returns what was copied, per part."""
    ema = WeightReader([source.ema]) if use_ema and source.ema is not None else None
    try:
        counts = {}
        with read_weights(str(source.unet)) as reader:
            counts["unet"] = copy_into(model.unet, reader, rank, record=record, prefix="unet.")
        if ema is not None:
            counts["unet_from_ema"] = copy_into(model.unet, ema, rank, name_map=lambda n: "unet." + n, strict=False,
                                                record=record, prefix="unet.")
        proj = model.text_encoder.projection
        if proj is not None and source.projection is not None:
            with WeightReader([source.projection]) as reader:
                counts["projection"] = copy_into(proj, reader, rank, record=record, prefix="text_encoder.projection.")
            if ema is not None:
                copy_into(proj, ema, rank, name_map=lambda n: "text_encoder.projection." + n, strict=False,
                          record=record, prefix="text_encoder.projection.")
        if with_lora and source.lora is not None:
            llm = model.text_encoder.llm
            with WeightReader([source.lora / "adapter_model.safetensors"]) as reader:
                counts["lora"] = _copy_lora(llm, reader, rank, record)
            if ema is not None:
                _copy_lora(llm, ema, rank, record, ema_names=True)
    finally:
        if ema is not None:
            ema.close()
    return counts


def _copy_lora(llm: nn.Module, reader: WeightReader, rank: int, record: Provenance | None,
               ema_names: bool = False) -> int:
    """An adapter saved by peft (files.names: plain or causal-LM naming), or an EMA file's LoRA tensors (named
    like the model's parameters)."""
    copied = 0
    for params in _module_groups(llm):
        chosen = [(n, p) for n, p in params if names.is_lora(n)]
        if not chosen:
            continue
        keys = {}
        for name, _ in chosen:
            if ema_names:
                keys[name] = names.LLM_PREFIX + name
                continue
            key = names.saved_lora_name(name)
            causal = names.causal_lm_variant(key)
            keys[name] = key if key in reader or causal not in reader else causal
            if keys[name] not in reader:
                raise ValueError(f"LoRA weight {key} missing from the adapter; the LoRA settings (rank, "
                                 "target_modules) must match the ones it was trained with")
        chosen = [(n, p) for n, p in chosen if keys[n] in reader]
        sharded = [p for _, p in chosen if _is_sharded(p)]
        with torch.no_grad(), deepspeed.zero.GatheredParameters(sharded, modifier_rank=0, enabled=bool(sharded)):
            for name, p in chosen:
                if rank == 0 or not _is_sharded(p):
                    p.data.copy_(reader.get(keys[name]).to(p.dtype))
                copied += 1
                if record is not None:
                    record[names.LLM_PREFIX + name] = reader.source(keys[name])
    return copied


# ------------------------------------------------------------------ the optimizer's fp32 master copy


@torch.no_grad()
def set_fp32_masters(model: nn.Module, record: Provenance) -> int:
    """After deepspeed.initialize: set the fp32 master copy of every trainable parameter named in `record` from
    its source file. DeepSpeed builds the master from the (bf16) parameters, so without this a stage would start
    from bf16-rounded values of the previous stage's fp32 weights. Every rank reads only its own partition."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param
    from safetensors import safe_open

    done = 0
    by_file: dict[Path, list[tuple[nn.Parameter, str]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and name in record:
            path, key = record[name]
            by_file.setdefault(path, []).append((p, key))
    for path, items in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for p, key in items:
                if _is_sharded(p):
                    local = _partition_from_file(f, key, p.ds_tensor.numel(), torch.distributed.get_rank())
                    safe_set_local_fp32_param(p, local.to(p.ds_tensor.device))
                else:
                    full = f.get_tensor(key).to(torch.float32)
                    safe_set_full_fp32_param(p, full.reshape(p.shape).to(p.device))
                done += 1
    return done


def _partition_from_file(f, key: str, part: int, rank: int) -> torch.Tensor:
    """Elements [rank * part, (rank + 1) * part) of the flattened tensor `key` (ZeRO-3's partition, zero-padded
    past the end), reading only the rows of the file that hold them."""
    sl = f.get_slice(key)
    shape = sl.get_shape()
    numel = 1
    for d in shape:
        numel *= d
    row = numel // shape[0] if shape and shape[0] else 1
    local = torch.zeros(part, dtype=torch.float32)
    lo, hi = zero3.partition_range(rank, part, numel)
    if lo < hi:
        r0, r1 = lo // row, -(-hi // row)
        rows = (sl[r0:r1] if shape else f.get_tensor(key)).to(torch.float32).reshape(-1)
        local[:hi - lo] = rows[lo - r0 * row:hi - r0 * row]
    return local
