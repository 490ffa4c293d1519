"""An exponential moving average of the trainable weights that is correct under ZeRO-3.

Each rank averages only its own shard of every parameter (`p.ds_tensor` under ZeRO-3, the whole
tensor otherwise), so the EMA is sharded exactly like the weights and costs 1/world_size memory.
The decay warms up as diffusers' EMAModel's does, min(decay, (1 + n) / (10 + n)) at the n-th update, so a
short stage's EMA is not mostly its starting weights (with a flat 0.999, 300 steps would leave 74% of them).
diffusers' class itself is not used: it averages whole parameters, not a rank's ZeRO-3 shard or fp32 master.
"""
from __future__ import annotations

import torch
from torch import nn

from para_train.files.zero3 import join_partitions


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class ShardedEMA:
    """`masters`: per parameter, this rank's part of the optimizer's fp32 master copy (a view the optimizer
    updates in place), which the EMA follows instead of the (possibly bf16) parameter shard; None: the shards."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float,
                 masters: list[torch.Tensor] | None = None):
        self.decay = decay
        self.updates = 0
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.sources = masters if masters is not None else [_local(p) for p in self.params]
        for name, src, p in zip(self.names, self.sources, self.params):
            assert src.numel() == _local(p).numel(), f"{name}: the fp32 master is not partitioned like the parameter"
        self.shadow = [src.detach().float().clone().reshape(_local(p).shape) for src, p in zip(self.sources, self.params)]

    def current_decay(self) -> float:
        """The decay of the next update (diffusers' EMAModel.get_decay without update_after_step)."""
        n = self.updates
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        for s, src in zip(self.shadow, self.sources):
            s.lerp_(src.reshape(s.shape).float(), weight)
        self.updates += 1

    @torch.no_grad()
    def full_tensors(self, rank: int) -> dict[str, torch.Tensor]:
        """The EMA as full fp32 CPU tensors on rank 0 (empty elsewhere); collective under ZeRO-3."""
        out = {}
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        for name, s, p in zip(self.names, self.shadow, self.params):
            if hasattr(p, "ds_tensor"):
                parts = [torch.empty_like(s) for _ in range(world)]
                torch.distributed.all_gather(parts, s.contiguous())  # on the shard's device (CUDA under NCCL)
                full = join_partitions(parts, p.ds_shape)
            else:
                full = s
            if rank == 0:
                out[name] = full.detach().to("cpu", torch.float32).clone()
        return out

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "names": self.names, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names or any(a.shape != b.shape for a, b in zip(state["shadow"], self.shadow)):
            raise ValueError("the checkpoint's EMA does not match this model's trainable parameters or sharding "
                             "(changed model, LoRA settings or world size)")
        self.shadow = [s.to(own.device, own.dtype, copy=True) for s, own in zip(state["shadow"], self.shadow)]  # saved on the CPU
        self.updates = int(state.get("updates", 10 ** 9))  # saved before the warm-up existed: fully warmed up
