"""Checkpoints: atomic, complete-or-ignored, last K kept.

Layout under `<stage dir>/checkpoints/`:
  step_00000100/            DeepSpeed's sharded engine state (model, optimizer, scheduler)
  step_00000100/rank00000.pt   this rank's RNG states, EMA shard, generators and data position
  step_00000100/COMPLETE    written last, after every rank finished: only then does it count
  latest                    name of the newest complete checkpoint, replaced atomically
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from para_train.training.distributed import barrier

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint. `latest` is a hint; the COMPLETE marker is the truth."""
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / COMPLETE).is_file():
            newer = [p for p in complete_checkpoints(root) if p.name > candidate.name]
            return newer[-1] if newer else candidate
    done = complete_checkpoints(root)
    return done[-1] if done else None


def save(engine, root: Path, step: int, rank: int, rank_state: dict, meta: dict, keep: int) -> Path:
    """Collective: every rank calls it at the same step."""
    tag = tag_for(step)
    path = root / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # an incomplete earlier attempt at this step
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"para_train": meta}, save_latest=False)
    torch.save(rank_state, path / f"rank{rank:05d}.pt")
    barrier()  # every rank's files are on disk
    if rank == 0:
        _write_atomic(path / COMPLETE, json.dumps({**meta, "step": step, "time": time.time()}) + "\n")
        _write_atomic(root / "latest", tag + "\n")
        prune(root, keep)
    barrier()
    return path


def prune(root: Path, keep: int) -> None:
    done = complete_checkpoints(root)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    newest = done[-1].name if done else ""
    for partial in root.glob("step_*"):
        if not (partial / COMPLETE).exists() and partial.name < newest:
            shutil.rmtree(partial, ignore_errors=True)


def read_meta(path: Path) -> dict:
    return json.loads((path / COMPLETE).read_text())


def load(engine, path: Path, rank: int) -> dict:
    """Restore the engine and return this rank's saved state."""
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rank_file = path / f"rank{rank:05d}.pt"
    return torch.load(rank_file, map_location="cpu", weights_only=False)
