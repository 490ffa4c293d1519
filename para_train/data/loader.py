"""From the config to the training loader: where the shards are, and the streaming loader over them."""
from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from filelock import FileLock

from para_train.config import Config, ConfigError
from para_train.data.dataset import ShardStream, build_loader
from para_train.data.shards import ensure_synthetic_shards, is_remote, synthetic_dataset_dir

log = logging.getLogger(__name__)


def stream_location(remote: str, cache_dir: Path, key: str = "data.remote") -> tuple[str, str | None]:
    """(local, remote) for MosaicML streaming: a local folder is read in place, a URL is cached under cache_dir."""
    if not is_remote(remote):
        folder = Path(remote).expanduser()
        if not (folder / "index.json").is_file():
            raise ConfigError(f"{key}: {remote} holds no MDS index.json; convert your data first "
                              "(para-train data convert)")
        return str(folder), None
    digest = hashlib.sha1(remote.encode()).hexdigest()[:12]
    return str(cache_dir / "streams" / digest), remote


def stream_locations(cfg: Config) -> list[tuple[str, str | None]]:
    """(local, remote) of every configured shard set; the synthetic set when none is configured."""
    d = cfg.data
    if not d.remotes():
        folder = synthetic_dataset_dir(cfg.cache_dir, d.synthetic_seed, d.synthetic_samples, d.synthetic_captions)
        return [(str(folder), None)]
    key = "data.streams[{}].remote" if d.streams else "data.remote"
    return [stream_location(s.remote, cfg.cache_dir, key.format(i)) for i, s in enumerate(d.remotes())]


def data_location(cfg: Config) -> tuple[str, str | None]:
    """(local, remote) of the first (usually the only) shard set."""
    return stream_locations(cfg)[0]


def prepare_data(cfg: Config) -> None:
    """Make sure the data exists: the synthetic set is generated once (one process does it, the others wait);
    local shard folders are checked before any model is built."""
    d = cfg.data
    if d.remotes():
        cache_limit(cfg)
        return
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cfg.cache_dir / "synthetic.lock")):
        ensure_synthetic_shards(cfg.cache_dir, d.synthetic_seed, d.synthetic_samples, d.synthetic_captions)


def clean_shared_memory(cfg: Config) -> list[str]:
    """Remove the shared memory MosaicML streaming left on this node when a run was killed together with its
    helper processes (a node crash, an OOM kill, a torn-down job step), before a requeued job on the node starts
    its loaders. Local rank 0 cleans; every rank then waits (collective once a process group exists).

    A segment counts as stale when it has streaming's name (`<6-digit prefix>_<name>`), belongs to this user
    and no process maps it. (streaming's own clean_stale_shared_memory stops at the first unused prefix, so it
    misses most leftovers, and it also removes segments that live runs on the node still use.)"""
    removed: list[str] = []
    if cfg.data.clean_shared_memory and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for path in stale_streaming_segments():
            try:
                path.unlink()
                removed.append(path.name)
            except OSError:  # removed meanwhile (another local leader on a shared machine), or not ours to remove
                continue
        if removed:
            log.warning("removed %d stale MosaicML streaming shared-memory segments left by a killed run, e.g. %s",
                        len(removed), removed[0])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return removed


def stale_streaming_segments(shm: Path = Path("/dev/shm")) -> list[Path]:
    from streaming.base.util import SHM_TO_CLEAN

    pattern = re.compile(r"^\d{6}_(%s)$" % "|".join(map(re.escape, SHM_TO_CLEAN)))
    try:
        candidates = [p for p in shm.iterdir() if pattern.match(p.name) and p.stat().st_uid == os.getuid()]
    except OSError:
        return []
    if not candidates:
        return []
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone, or another user's process
            continue
        for line in text.splitlines():
            if str(shm) + "/" in line:
                mapped.add(line.rsplit("/", 1)[1].removesuffix(" (deleted)").strip())
    return [p for p in candidates if p.name not in mapped]


def cache_limit(cfg: Config) -> str | None:
    """data.cache_limit, checked: it deletes cached shards, so it cannot apply to local folders read in place."""
    d = cfg.data
    if d.cache_limit is None or not d.remotes():
        return None
    if any(remote is None for _, remote in stream_locations(cfg)):
        raise ConfigError("data.cache_limit: it deletes cached shards, so it applies only when every stream is remote "
                          "(s3://...), not to local folders read in place; set data.cache_limit=null")
    return d.cache_limit


def build_streams(cfg: Config) -> list[ShardStream]:
    d = cfg.data
    weights = [(s.proportion, s.repeat, s.choose) for s in d.remotes()] or [(None, None, None)]  # synthetic: unweighted
    return [ShardStream(remote=remote, local=local, proportion=proportion, repeat=repeat, choose=choose,
                        download_retry=d.download_retry, download_timeout=d.download_timeout,
                        validate_hash=d.validate_hash if remote else None)
            for (local, remote), (proportion, repeat, choose) in zip(stream_locations(cfg), weights)]


def build_train_loader(cfg: Config, tokenizer, latent_side: int | None = None):
    """`latent_side`: the side of the VAE's latents at data.resolution, which precomputed latents must match."""
    d = cfg.data
    return build_loader(streams=build_streams(cfg), tokenizer=tokenizer, max_length=cfg.model.llm.max_length,
                        resolution=d.resolution, batch_size=cfg.train.micro_batch_size, shuffle=d.shuffle,
                        seed=cfg.run.seed, num_workers=d.num_workers, crop=d.crop, flip=d.flip,
                        use_latents=d.use_latents, use_text_embeds=d.use_text_embeds,
                        llm_trains=cfg.model.lora.enabled, epoch_size=d.epoch_size,
                        cache_limit=cache_limit(cfg), num_canonical_nodes=d.num_canonical_nodes,
                        latent_side=latent_side)


def open_shards(path: str, cache_dir: Path, validate_hash: str | None = "xxh64"):
    """Random access (`.get_item(i)`, `.num_samples`) to the raw samples of one shard set, a folder or a URL,
    in this process only (not partitioned over ranks)."""
    from streaming import StreamingDataset

    local, remote = stream_location(path, Path(cache_dir).expanduser(), key=path)
    stream = ShardStream(remote=remote, local=local, validate_hash=validate_hash if remote else None)
    return StreamingDataset(streams=[stream], shuffle=False, batch_size=1)
