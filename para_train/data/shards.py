"""Writing image-paragraph samples as MDS shards (MosaicML streaming's format)."""
from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from streaming import MDSWriter
from tqdm import tqdm

from para_train.data.synthetic import synthetic_sample

log = logging.getLogger(__name__)

# The columns of every para-train shard set. `image` holds the original encoded bytes.
COLUMNS = {
    "image": "bytes",
    "caption": "str",
    "width": "int",
    "height": "int",
    "sample_id": "str",
    "source": "str",
    "scene": "json",  # machine-readable scene record (synthetic data), else null
}
COMPLETE_MARKER = ".complete"


def write_shards(samples: Iterable[dict], out: str | tuple[str, str], size_limit: str | int = "64mb",
                 compression: str | None = None, total: int | None = None, desc: str = "writing shards") -> int:
    """Write sample dicts (keys = COLUMNS) to MDS shards at `out` (a folder, or (local, remote))."""
    count = 0
    with MDSWriter(out=out, columns=COLUMNS, size_limit=size_limit, compression=compression) as writer:
        for sample in tqdm(samples, total=total, desc=desc, unit="sample", mininterval=2.0):
            writer.write(sample)
            count += 1
    return count


def synthetic_samples(seed: int, num_samples: int, image_size: int = 64) -> Iterable[dict]:
    for i in range(num_samples):
        s = synthetic_sample(seed, i, image_size)
        yield {"image": s.image_png, "caption": s.caption, "width": s.width, "height": s.height,
               "sample_id": s.sample_id, "source": "synthetic", "scene": s.scene}


def synthetic_dataset_dir(cache_dir: Path, seed: int, num_samples: int) -> Path:
    return cache_dir / "datasets" / f"synthetic-v1-seed{seed}-n{num_samples}"


def ensure_synthetic_shards(cache_dir: Path, seed: int, num_samples: int) -> Path:
    """Generate the synthetic scene set once into the cache (call on one process per node)."""
    out = synthetic_dataset_dir(cache_dir, seed, num_samples)
    if (out / COMPLETE_MARKER).exists():
        return out
    if out.exists():
        shutil.rmtree(out)  # an interrupted earlier write; it is derived data, regenerate it
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    log.info("generating %d synthetic paragraph scenes into %s", num_samples, out)
    write_shards(synthetic_samples(seed, num_samples), str(tmp), size_limit="16mb", total=num_samples,
                 desc="synthetic scenes")
    (tmp / COMPLETE_MARKER).write_text("ok\n")
    tmp.rename(out)
    return out
