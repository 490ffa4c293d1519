"""Writing image-paragraph samples as MDS shards (MosaicML streaming's format)."""
from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from streaming import MDSWriter
from tqdm import tqdm

from para_train.data.dataset import DataError
from para_train.scenes.synthetic import synthetic_sample

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
# Added by `para-train data precompute` (fp16 arrays; see para_train/data/precompute.py).
PRECOMPUTED_COLUMNS = {
    "latents": "ndarray:float16",  # [C, R/8, R/8], already multiplied by the VAE's scaling factor
    "text_embeds": "ndarray:float16",  # [tokens, D]: the frozen LLM's features of the unpadded caption
}
HASHES = ["sha1", "xxh64"]  # recorded per shard; the loader checks data.validate_hash on download
COMPLETE_MARKER = ".complete"


def is_remote(path: str) -> bool:
    """s3://, gs://, oci://, dbfs:/, ... (anything MosaicML streaming downloads), as opposed to a local folder."""
    return len(urlparse(path).scheme) > 1


def open_writer(out: str, columns: dict[str, str], size_limit: str | int = "64mb", compression: str | None = None,
                overwrite: bool = False) -> MDSWriter:
    """An MDSWriter to a local folder or a remote URL (shards are staged in a temporary folder and uploaded)."""
    if not is_remote(out):
        folder = Path(out).expanduser()
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; choose a new folder or pass --overwrite")
        return MDSWriter(out=str(folder), columns=columns, size_limit=size_limit, compression=compression,
                         hashes=HASHES, exist_ok=overwrite)
    try:
        return MDSWriter(out=out, columns=columns, size_limit=size_limit, compression=compression, hashes=HASHES)
    except ValueError:
        raise  # a bad size limit or compression name: streaming's message says which
    except Exception as e:
        raise DataError(f"cannot write shards to {out}: {e}. Check that the bucket exists and the credentials (for "
                        "S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, and S3_ENDPOINT_URL for non-AWS servers)") from e


def write_shards(samples: Iterable[dict], out: str, size_limit: str | int = "64mb", compression: str | None = None,
                 total: int | None = None, desc: str = "writing shards", columns: dict[str, str] = COLUMNS) -> int:
    """Write sample dicts (keys = `columns`) to MDS shards at `out` (a new local folder or a remote URL)."""
    count = 0
    with open_writer(out, columns, size_limit, compression) as writer:
        for sample in tqdm(samples, total=total, desc=desc, unit="sample", mininterval=2.0):
            writer.write(sample)
            count += 1
    return count


def synthetic_samples(seed: int, num_samples: int, image_size: int = 64, captions: str = "paragraph") -> Iterable[dict]:
    for i in range(num_samples):
        s = synthetic_sample(seed, i, image_size, captions=captions)
        yield {"image": s.image_png, "caption": s.caption, "width": s.width, "height": s.height,
               "sample_id": s.sample_id, "source": "synthetic", "scene": s.scene}


def synthetic_dataset_dir(cache_dir: Path, seed: int, num_samples: int, captions: str = "paragraph") -> Path:
    style = "" if captions == "paragraph" else f"-{captions}"
    return cache_dir / "datasets" / f"synthetic-v1-seed{seed}-n{num_samples}{style}"


def ensure_synthetic_shards(cache_dir: Path, seed: int, num_samples: int, captions: str = "paragraph") -> Path:
    """Generate the synthetic scene set once into the cache (call on one process per node)."""
    out = synthetic_dataset_dir(cache_dir, seed, num_samples, captions)
    if (out / COMPLETE_MARKER).exists():
        return out
    if out.exists():
        shutil.rmtree(out)  # an interrupted earlier write; it is derived data, regenerate it
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    log.info("generating %d synthetic scenes (%s captions) into %s", num_samples, captions, out)
    write_shards(synthetic_samples(seed, num_samples, captions=captions), str(tmp), size_limit="16mb",
                 total=num_samples, desc="synthetic scenes")
    (tmp / COMPLETE_MARKER).write_text("ok\n")
    tmp.rename(out)
    return out
