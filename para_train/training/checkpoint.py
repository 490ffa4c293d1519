"""Checkpoints: atomic, complete-or-ignored, last K kept.

Layout under `<stage dir>/checkpoints/`:
  step_00000100/            DeepSpeed's sharded engine state (model, optimizer, scheduler)
  step_00000100/rank00000.pt   this rank's RNG states, EMA shard, generators and data position
  step_00000100/COMPLETE    written last, after every rank flushed its files to disk: only then does
                            it count; it lists every file of the checkpoint with its size
  latest                    name of the newest complete checkpoint, replaced atomically

A resume takes the newest complete checkpoint whose files are all there at their recorded sizes; a
damaged one (e.g. a file truncated by a node crash or a full disk) is reported by name and skipped.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from para_train.training.distributed import barrier, wait_for_all

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
CONVERSION_WORKERS = 16  # at most, for the universal-checkpoint conversion


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Write, flush to disk, then rename over `path` (and flush the folder), so a crash leaves old or new."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


# DeepSpeed names per-rank files zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt (bf16_ prefixed in bf16);
# ours are rank<r>.pt. Every other file of a checkpoint (e.g. mp_rank_00_model_states.pt) is rank 0's.
_RANK_FILE = re.compile(r"(?:^|_)pp_rank_(\d+)_|^rank(\d+)\.pt$")


def _owner(name: str) -> int:
    m = _RANK_FILE.search(name)
    return int(m.group(1) or m.group(2)) if m else 0


def flush_own_files(path: Path, rank: int) -> None:
    """Flush this rank's files of a checkpoint to disk (on a shared file system only the writer can)."""
    for f in sorted(path.rglob("*")):
        if f.is_file() and _owner(f.name) == rank:
            _fsync(f)
    if rank == 0:
        for d in [path, *(d for d in path.rglob("*") if d.is_dir())]:
            _fsync(d)


def manifest(path: Path) -> dict[str, int]:
    """Every file of a checkpoint (relative name -> size in bytes), the marker excepted."""
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != COMPLETE}


def write_complete(path: Path, meta: dict) -> None:
    """Mark a checkpoint complete; call once every rank's files are flushed."""
    _write_atomic(path / COMPLETE, json.dumps({**meta, "files": manifest(path)}) + "\n")


def damage(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (None: all there at their recorded sizes)."""
    try:
        files = json.loads((path / COMPLETE).read_text()).get("files")
    except (OSError, ValueError) as e:
        return f"its {COMPLETE} marker cannot be read ({e})"
    for name, size in (files or {}).items():  # markers written before the manifest existed list no files
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} when it was written"
    return None


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
    """The newest complete, undamaged checkpoint. The COMPLETE marker and its file list are the truth
    (the `latest` pointer is for people and other tools); a damaged one is reported and skipped."""
    for candidate in reversed(complete_checkpoints(root)):
        problem = damage(candidate)
        if problem is None:
            return candidate
        log.warning("checkpoint %s is damaged: %s; falling back to the previous complete checkpoint",
                    candidate, problem)
    return None


def save(engine, root: Path, step: int, rank: int, rank_state: dict, meta: dict, keep: int) -> Path:
    """Collective: every rank calls it at the same step."""
    tag = tag_for(step)
    path = root / tag
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # an incomplete earlier attempt at this step
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"para_train": meta}, save_latest=False)
    torch.save(rank_state, path / f"rank{rank:05d}.pt")
    flush_own_files(path, rank)
    barrier()  # every rank's files are on disk
    if rank == 0:
        write_complete(path, {**meta, "step": step, "time": time.time()})
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
        _write_atomic(path.parent / "latest_universal", out.name + "\n")
        _write_atomic(out / COMPLETE, "ok\n")
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
    old = [torch.load(path / f"rank{r:05d}.pt", map_location="cpu", weights_only=True, mmap=True)
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
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for shards, local, p in zip(ema_full["shards"], ema.shadow, ema.params):
        numel = int(getattr(p, "ds_numel", p.numel()))
        old_parts = [s.reshape(-1) for s in shards] if shards[0].numel() != numel else [shards[0].reshape(-1)]
        # this rank's slice of the flat tensor (ZeRO-3: equal parts, the last one zero-padded), read from the
        # old shards that overlap it only (they are memory-mapped: the others are never read)
        part = local.numel()
        lo, hi = (rank * part, (rank + 1) * part) if part != numel else (0, numel)
        out = torch.zeros(part, dtype=old_parts[0].dtype)
        offset = 0
        for old in old_parts:
            a, b = max(lo, offset), min(hi, offset + old.numel(), numel)
            if a < b:
                out[a - lo:b - lo] = old[a - offset:b - offset]
            offset += old.numel()
        shadow.append(out.reshape(local.shape))
    return {"decay": ema.decay, "updates": ema_full["updates"], "names": ema.names, "shadow": shadow}
