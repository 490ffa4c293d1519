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
import math
import os
import random
import shutil
import subprocess
import sys
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
    return torch.load(rank_file, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------ a different number of ranks


def to_universal(path: Path, rank: int) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format once (rank 0 converts, others wait)."""
    out = path.parent / f"universal_{path.name}"
    if rank == 0 and not (out / COMPLETE).is_file():
        shutil.rmtree(out, ignore_errors=True)
        log.info("converting %s to a universal checkpoint for a different number of ranks", path)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
               "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {path} to a universal checkpoint failed:\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
        _write_atomic(path.parent / "latest_universal", out.name + "\n")
        _write_atomic(out / COMPLETE, "ok\n")
    barrier()
    return out


def load_resharded(engine, path: Path, universal: Path, rank: int, old_world_size: int) -> dict:
    """Load the engine from the universal checkpoint and merge the old ranks' own state.

    Counters and the data position are global (taken from old rank 0); RNG states exist only for
    ranks that existed before; the EMA is reassembled to full tensors for re-sharding."""
    load_path, _ = engine.load_checkpoint(str(universal.parent), tag=universal.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {universal}")
    old = [torch.load(path / f"rank{r:05d}.pt", map_location="cpu", weights_only=True) for r in range(old_world_size)]
    state = dict(old[0])
    mine = old[rank] if rank < old_world_size else None
    state["rng"] = mine["rng"] if mine else None
    state["generator"] = mine["generator"] if mine else None
    state["ema_full"] = None
    if old[0]["ema"] is not None:
        names = old[0]["ema"]["names"]
        state["ema_full"] = {"names": names, "shards": [[o["ema"]["shadow"][i] for o in old] for i in range(len(names))]}
    return state


def reshard_ema(ema_full: dict, ema) -> dict:
    """Old ranks' flat EMA shards -> this rank's shards under the current partitioning."""
    if ema_full["names"] != ema.names:
        raise ValueError("the checkpoint's EMA does not match this model's trainable parameters")
    shadow = []
    for shards, local, p in zip(ema_full["shards"], ema.shadow, ema.params):
        numel = int(getattr(p, "ds_numel", p.numel()))
        full = torch.cat([s.reshape(-1) for s in shards])[:numel] if shards[0].numel() != numel else shards[0].reshape(-1)
        if local.numel() == numel:  # not partitioned here
            shadow.append(full.reshape(local.shape).clone())
            continue
        part, world, rank = local.numel(), torch.distributed.get_world_size(), torch.distributed.get_rank()
        padded = torch.zeros(part * world, dtype=full.dtype)  # ZeRO-3: equal parts, the last one padded
        padded[:numel] = full
        shadow.append(padded[rank * part:(rank + 1) * part].reshape(local.shape).clone())
    return {"decay": ema.decay, "names": ema.names, "shadow": shadow}
