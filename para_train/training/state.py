"""The state a stage resumes from: counters, random streams, EMA and data position, saved in each rank's
`rank<r>.pt` of a checkpoint (files.layout.rank_state) next to DeepSpeed's engine state."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from para_train.config import Config


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done in this stage
    skipped_steps: int = 0  # updates skipped (non-finite loss or gradients)
    images_seen: int = 0  # over all ranks
    skipped_samples: float = 0.0  # bad samples the loader replaced, over all ranks (data.max_skip_rate)
    samples_read: float = 0.0
    run_id: str | None = None  # the stage's MLflow run: a resumed stage logs into the same run

    def counters(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainState":
        return cls(**{f.name: saved.get(f.name, f.default) for f in dataclasses.fields(cls)})


def generator(cfg: Config, rank: int, step: int = 0) -> torch.Generator:
    """The one source of training noise, timesteps, VAE sampling and caption dropout on a rank: seeded by
    (seed, stage, rank), and by the step for a rank that joins a resumed run (no earlier draws to continue)."""
    return torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + cfg.run.stage * 1009 + rank + 7919 * step)
