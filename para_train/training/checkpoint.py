"""Saving and loading a DeepSpeed engine's checkpoint with para-train's per-rank state: atomic,
complete-or-ignored (files.complete), last K kept; where the files go is files.layout's.

A resume takes the newest complete checkpoint whose files are all there at their recorded sizes; a
damaged one (e.g. a file truncated by a node crash or a full disk) is reported by name and skipped.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from para_train.files import complete, zero3
from para_train.files.layout import checkpoint_tag, rank_state, universal_of
from para_train.training.distributed import barrier, wait_for_all

log = logging.getLogger(__name__)
CONVERSION_WORKERS = 16  # at most, for the universal-checkpoint conversion


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


def save(engine, root: Path, step: int, rank: int, own_state: dict, meta: dict, keep: int) -> Path:
    """Collective: every rank calls it at the same step."""
    tag = checkpoint_tag(step)
    path = root / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # an incomplete earlier attempt at this step
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"para_train": meta}, save_latest=False)
    torch.save(own_state, rank_state(path, rank))
    complete.flush_own_files(path, rank)
    barrier()  # every rank's files are on disk
    if rank == 0:
        complete.write_complete(path, {**meta, "step": step, "time": time.time()})
        complete.write_atomic(root / "latest", tag + "\n")
        complete.prune(root, keep)
    barrier()
    return path


def load(engine, path: Path, rank: int) -> dict:
    """Restore the engine and return this rank's saved state."""
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    return torch.load(rank_state(path, rank), map_location="cpu", weights_only=True)


# ------------------------------------------------------------------ a different number of ranks


def to_universal(path: Path, rank: int) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format once (rank 0 converts, others wait)."""
    out = universal_of(path)
    if rank == 0 and not complete.is_complete(out):
        shutil.rmtree(out, ignore_errors=True)
        log.info("converting %s to a universal checkpoint for a different number of ranks", path)
        # The other ranks of rank 0's node are idle meanwhile: use its cores (the conversion is per-tensor work).
        workers = max(1, min(CONVERSION_WORKERS, len(os.sched_getaffinity(0)) or 1))
        log.info("converting %s to a universal checkpoint for a different number of ranks (%d workers; the other "
                 "ranks wait without a collective timeout)", path, workers)
        start = time.monotonic()
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
               "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", str(workers),
               "--num_merge_workers", str(workers)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {path} to a universal checkpoint failed:\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
        complete.write_atomic(path.parent / "latest_universal", out.name + "\n")
        complete.write_atomic(out / complete.COMPLETE, "ok\n")
        log.info("universal checkpoint %s written in %.0f s", out, time.monotonic() - start)
    wait_for_all()  # however long the conversion takes
    return out


def load_resharded(engine, path: Path, universal: Path, rank: int, old_world_size: int) -> dict:
    """Load the engine from the universal checkpoint and merge the old ranks' own state.

    Counters and the data position are global (taken from old rank 0); RNG states exist only for
    ranks that existed before; the EMA is reassembled to full tensors for re-sharding."""
    load_path, _ = engine.load_checkpoint(str(universal.parent), tag=universal.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {universal}")
    # Memory-mapped: a rank reads only the parts it uses, not every old rank's whole EMA shard into memory.
    old = [torch.load(rank_state(path, r), map_location="cpu", weights_only=True, mmap=True)
           for r in range(old_world_size)]
    state = dict(old[0])
    mine = old[rank] if rank < old_world_size else None
    state["rng"] = mine["rng"] if mine else None
    state["generator"] = mine["generator"] if mine else None
    state["ema_full"] = None
    if old[0]["ema"] is not None:
        names = old[0]["ema"]["names"]
        state["ema_full"] = {"names": names, "updates": old[0]["ema"].get("updates", 10 ** 9),
                             "shards": [[o["ema"]["shadow"][i] for o in old] for i in range(len(names))]}
    return state


def reshard_ema(ema_full: dict, ema) -> dict:
    """Old ranks' flat EMA shards -> this rank's shards under the current partitioning."""
    if ema_full["names"] != ema.names:
        raise ValueError("the checkpoint's EMA does not match this model's trainable parameters")
    shadow = []
    rank = torch.distributed.get_rank()
    for shards, local, p in zip(ema_full["shards"], ema.shadow, ema.params):
        numel = int(getattr(p, "ds_numel", p.numel()))
        old_parts = [s.reshape(-1) for s in shards] if shards[0].numel() != numel else [shards[0].reshape(-1)]
        # this rank's slice of the flat tensor, read from the old shards that overlap it only (they are
        # memory-mapped: the others are never read)
        part = local.numel()
        lo = rank * part if part != numel else 0
        out = zero3.repartition(old_parts, lo, lo + part, numel)
        shadow.append(out.reshape(local.shape))
    return {"decay": ema.decay, "updates": ema_full["updates"], "names": ema.names, "shadow": shadow}
