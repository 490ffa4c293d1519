"""From the config to the training loader: where the shards are, and the streaming loader over them."""
from __future__ import annotations

import hashlib
from pathlib import Path

from filelock import FileLock

from para_train.config import Config, ConfigError
from para_train.data.dataset import build_loader
from para_train.data.shards import ensure_synthetic_shards


def data_location(cfg: Config) -> tuple[str, str | None]:
    """(local, remote) for MosaicML streaming."""
    d = cfg.data
    if d.remote is None:
        from para_train.data.shards import synthetic_dataset_dir

        return str(synthetic_dataset_dir(cfg.cache_dir, d.synthetic_seed, d.synthetic_samples)), None
    if "://" not in d.remote:  # a local shard folder: read in place
        if not (Path(d.remote).expanduser() / "index.json").is_file():
            raise ConfigError(f"data.remote: {d.remote} holds no MDS index.json; convert your data first "
                              "(para-train data convert)")
        return str(Path(d.remote).expanduser()), None
    digest = hashlib.sha1(d.remote.encode()).hexdigest()[:12]
    return str(cfg.cache_dir / "streams" / digest), d.remote


def prepare_data(cfg: Config) -> None:
    """Make sure the data exists: the synthetic set is generated once (one process does it, the others wait)."""
    d = cfg.data
    if d.remote is not None:
        return
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cfg.cache_dir / "synthetic.lock")):
        ensure_synthetic_shards(cfg.cache_dir, d.synthetic_seed, d.synthetic_samples)


def build_train_loader(cfg: Config, tokenizer):
    local, remote = data_location(cfg)
    return build_loader(local=local, remote=remote, tokenizer=tokenizer, max_length=cfg.model.llm.max_length,
                        resolution=cfg.data.resolution, batch_size=cfg.train.micro_batch_size, shuffle=cfg.data.shuffle,
                        seed=cfg.run.seed, num_workers=cfg.data.num_workers)
