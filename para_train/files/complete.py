"""The COMPLETE protocol: a checkpoint counts only once every file of it is on disk.

Every rank flushes its own files (on a shared file system only the writer can); then rank 0 writes
`COMPLETE` last, atomically, listing every file of the checkpoint with its size. A folder without the
marker is an interrupted write; one whose files differ from the list is damaged (a node crash or a
full disk truncated one) and is reported by name and skipped.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write, flush to disk, then rename over `path` (and flush the folder), so a crash leaves old or new."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


# DeepSpeed names per-rank files zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt (bf16_ prefixed in bf16);
# ours are rank<r>.pt. Every other file of a checkpoint (e.g. mp_rank_00_model_states.pt) is rank 0's.
_RANK_FILE = re.compile(r"(?:^|_)pp_rank_(\d+)_|^rank(\d+)\.pt$")


def _owner(name: str) -> int:
    m = _RANK_FILE.search(name)
    return int(m.group(1) or m.group(2)) if m else 0


def flush_own_files(path: Path, rank: int) -> None:
    """Flush this rank's files of a checkpoint to disk."""
    for f in sorted(path.rglob("*")):
        if f.is_file() and _owner(f.name) == rank:
            fsync(f)
    if rank == 0:
        for d in [path, *(d for d in path.rglob("*") if d.is_dir())]:
            fsync(d)


def manifest(path: Path) -> dict[str, int]:
    """Every file of a checkpoint (relative name -> size in bytes), the marker excepted."""
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != COMPLETE}


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def write_complete(path: Path, meta: dict) -> None:
    """Mark a checkpoint complete; call once every rank's files are flushed."""
    write_atomic(path / COMPLETE, json.dumps({**meta, "files": manifest(path)}) + "\n")


def read_meta(path: Path) -> dict:
    return json.loads((path / COMPLETE).read_text())


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


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if is_complete(p))


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


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove incomplete ones older than the newest."""
    done = complete_checkpoints(root)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    newest = done[-1].name if done else ""
    for partial in root.glob("step_*"):
        if not is_complete(partial) and partial.name < newest:
            shutil.rmtree(partial, ignore_errors=True)
