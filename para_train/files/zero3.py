"""ZeRO-3's partition arithmetic, in one place for the EMA, checkpoints, consolidation and fp32 masters.

ZeRO-3 flattens every parameter and gives each of `world` ranks ceil(numel / world) elements of it,
the last rank's part zero-padded past the end.
"""
from __future__ import annotations

import math

import torch


def partition_numel(numel: int, world: int) -> int:
    return math.ceil(numel / world)


def partition_range(rank: int, part: int, numel: int) -> tuple[int, int]:
    """The flat elements [lo, hi) of the full tensor that rank `rank`'s partition of `part` elements holds
    (hi < lo + part on the padded last rank)."""
    lo = rank * part
    return lo, max(lo, min(lo + part, numel))


def join_partitions(parts: list[torch.Tensor], shape) -> torch.Tensor:
    """The full tensor from every rank's partition, in rank order."""
    shape = torch.Size(shape)
    return torch.cat([p.reshape(-1) for p in parts])[:shape.numel()].view(shape)


def repartition(pieces: list[torch.Tensor], lo: int, hi: int, numel: int) -> torch.Tensor:
    """Elements [lo, hi) of the flat tensor cut into `pieces` (in order; e.g. another world size's partitions),
    zero-padded past `numel`. Only the pieces that overlap [lo, hi) are read (memory-mapped ones stay on disk)."""
    out = torch.zeros(hi - lo, dtype=pieces[0].dtype)
    offset = 0
    for piece in pieces:
        a, b = max(lo, offset), min(hi, offset + piece.numel(), numel)
        if a < b:
            out[a - lo:b - lo] = piece.reshape(-1)[a - offset:b - offset]
        offset += piece.numel()
    return out
