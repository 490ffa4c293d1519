"""An exponential moving average of the trainable weights that is correct under ZeRO-3.

Each rank averages only its own shard of every parameter (`p.ds_tensor` under ZeRO-3, the whole
tensor otherwise), so the EMA is sharded exactly like the weights and costs 1/world_size memory.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class ShardedEMA:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float):
        self.decay = decay
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shadow = [_local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(_local(p).float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "names": self.names, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names or any(a.shape != b.shape for a, b in zip(state["shadow"], self.shadow)):
            raise ValueError("the checkpoint's EMA does not match this model's trainable parameters or sharding "
                             "(changed model, LoRA settings or world size)")
        self.shadow = [s.clone() for s in state["shadow"]]

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """Temporarily put the EMA weights into the model (e.g. to gather them or to sample)."""
        backup = [_local(p).clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            _local(p).copy_(s.to(_local(p).dtype))
        try:
            yield
        finally:
            for b, p in zip(backup, self.params):
                _local(p).copy_(b)
