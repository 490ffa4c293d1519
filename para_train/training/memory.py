"""The bytes of model state one rank holds under ZeRO-3, read from the tensors DeepSpeed allocated:
each parameter's shard (`ds_tensor`), the optimizer's flat gradient partition, its fp32 master
partition where that is a separate copy, the Adam state, and para-train's EMA.

The trainer writes these into ranks/rank<r>.json after its first step (Adam allocates its state
lazily); benchmarks/bench_zero3_memory.py prints them against the unsharded total."""
from __future__ import annotations

import torch


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def model_state_bytes(engine, model, ema) -> dict | None:
    """Bytes this rank holds, by kind; None when the optimizer is not DeepSpeed's ZeRO-3 one. The fp32
    master partition counts where its storage is not a parameter shard's (DeepSpeed 0.19 keeps a
    separate copy even in fp32 training)."""
    opt = engine.optimizer
    if not hasattr(opt, "grad_partitions_flat_buffer"):
        return None
    out = {"params_trainable": 0, "params_frozen": 0, "numel_trainable": 0, "numel_frozen": 0}
    param_storages = set()
    for p in model.parameters():
        shard = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        kind = "trainable" if p.requires_grad else "frozen"
        out[f"params_{kind}"] += _nbytes(shard)
        out[f"numel_{kind}"] += int(getattr(p, "ds_numel", p.numel()))
        param_storages.add(shard.untyped_storage().data_ptr())
    out["grads"] = _nbytes(opt.grad_partitions_flat_buffer)
    out["master"] = sum(_nbytes(t) for t in opt.fp32_partitioned_groups_flat
                        if t.untyped_storage().data_ptr() not in param_storages)
    out["optimizer_state"] = sum(_nbytes(v) for state in opt.optimizer.state.values() for v in state.values()
                                 if isinstance(v, torch.Tensor))
    out["ema"] = sum(_nbytes(s) for s in ema.shadow) if ema is not None else 0
    out["total"] = sum(out[k] for k in ("params_trainable", "params_frozen", "grads", "master", "optimizer_state", "ema"))
    return out
