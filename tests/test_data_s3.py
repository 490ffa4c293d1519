"""Object storage, against a real S3-compatible server on loopback (moto_server): pairs converted
into a bucket stream into a 2-rank training run (a corrupt image is skipped and counted); a corrupt
shard and a missing remote stop with a message naming them."""
import io
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import deepspeed_cmd, rank_env, read_metrics
from para_train.cli import main as cli_main
from para_train.config import ConfigError, load_config
from para_train.data.dataset import DataError
from para_train.data.loader import build_train_loader, stream_location
from para_train.data.shards import synthetic_samples, write_shards
from para_train.models.build import load_tokenizer
from para_train.models.tiny import tiny_llama_dir
from s3_server import S3Server

BUCKET = "para-train-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)  # streaming and boto3 in this process read them
    server.create_bucket(BUCKET)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def run_deepspeed_with_env(stage: int, overrides: list[str], env: dict, timeout: float = 300):
    proc = subprocess.run(deepspeed_cmd(stage, overrides), env=rank_env(env), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"deepspeed exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_pairs_converted_into_a_bucket_train_on_two_ranks_and_a_bad_image_is_counted(s3, tmp_path, cache_dir):
    # 47 good pairs and one JPEG cut short: PIL identifies it (so convert keeps it) but cannot decode it
    lines = []
    for s in synthetic_samples(seed=5, num_samples=47):
        (tmp_path / f"{s['sample_id']}.png").write_bytes(s["image"])
        lines.append(f"{s['sample_id']}.png\t{s['caption']}")
    jpeg = io.BytesIO()
    Image.frombytes("RGB", (96, 64), random.Random(0).randbytes(96 * 64 * 3)).save(jpeg, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 2 // 3])
    lines.insert(20, "cut.jpg\tColoured noise, cut off in transit.")
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    remote = f"s3://{BUCKET}/pairs-mds"
    summary = tmp_path / "summary.json"
    assert cli_main(["data", "convert", str(tmp_path / "pairs.tsv"), remote, "--size-limit", "64kb", "--tokenizer", "none",
                     "--summary", str(summary), "--quiet"]) == 0
    assert json.loads(summary.read_text())["written"] == 48
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="pairs-mds/")["Contents"]]
    assert "pairs-mds/index.json" in keys and sum(k.endswith(".mds") for k in keys) >= 2

    # 48 samples / (2 ranks x 4) = 6 steps: one epoch, every sample read once
    run_dir = tmp_path / "run"
    run_deepspeed_with_env(1, [f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", f"data.remote={remote}",
                               "data.num_workers=2", "train.steps=6", "train.micro_batch_size=4", "train.log_every=1",
                               "model.llm.max_length=64", "checkpoint.every=1000", "sample.num_images=0",
                               "tracking.enabled=false"], s3.env)
    rows = read_metrics(run_dir / "stage1")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["skipped_samples"] == 1
    local, _ = stream_location(remote, cache_dir)
    assert len(list(Path(local).glob("shard.*.mds"))) >= 2  # streamed into the local cache


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_shard_in_the_bucket_stops_with_the_shard_named(s3, tmp_path, cache_dir, workers):
    remote = f"s3://{BUCKET}/corrupt-{workers}"
    write_shards(synthetic_samples(seed=6, num_samples=40), remote, size_limit="12kb")
    client = s3.client()
    key = f"corrupt-{workers}/shard.00001.mds"
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[-10:] = bytes(10)  # same size, different bytes
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))

    cfg = load_config(1, overrides=[f"data.remote={remote}", f"data.cache_dir={tmp_path}", "train.micro_batch_size=4",
                                    f"data.num_workers={workers}", "data.shuffle=false", "model.llm.max_length=32",
                                    "data.download_timeout=30"])
    loader = build_train_loader(cfg, load_tokenizer(str(tiny_llama_dir(cache_dir)), 32))
    with pytest.raises(DataError) as err:
        for _ in loader:
            pass
    message = str(err.value)
    assert message.startswith(f"shard {remote}/shard.00001.mds failed its xxh64 check"), message
    assert "Traceback" not in message
    local, _ = stream_location(remote, tmp_path)
    assert not os.path.exists(os.path.join(local, "shard.00001.mds"))  # the corrupt copy is not kept in the cache


def test_a_remote_that_does_not_exist_is_named(s3, tmp_path, cache_dir):
    remote = f"s3://{BUCKET}/never-converted"
    cfg = load_config(1, overrides=[f"data.remote={remote}", f"data.cache_dir={tmp_path}", "data.download_retry=1"])
    with pytest.raises(DataError, match=f"cannot read the shard index {remote}/index.json: .*para-train data convert"):
        build_train_loader(cfg, load_tokenizer(str(tiny_llama_dir(cache_dir)), 32))


def test_the_cache_limit_bounds_the_local_copy_over_an_epoch(s3, tmp_path, cache_dir):
    remote = f"s3://{BUCKET}/cache-limit"
    write_shards(synthetic_samples(seed=8, num_samples=60), remote, size_limit="12kb")
    tokenizer = load_tokenizer(str(tiny_llama_dir(cache_dir)), 32)
    overrides = [f"data.remote={remote}", f"data.cache_dir={tmp_path}", "train.micro_batch_size=4",
                 "model.llm.max_length=32", "data.download_timeout=30"]
    loader = build_train_loader(load_config(1, overrides=overrides + ["data.cache_limit=60kb"]), tokenizer)
    ids = [sid for batch in loader for sid in batch["sample_id"]]
    assert len(set(ids)) == 60  # the whole epoch was read
    local, _ = stream_location(remote, tmp_path)
    shards = list(Path(local).glob("shard.*.mds"))
    in_bucket = [o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="cache-limit/")["Contents"]]
    num_shards = sum(k.endswith(".mds") for k in in_bucket)
    assert num_shards >= 10 and 0 < len(shards) <= num_shards // 2
    assert sum(p.stat().st_size for p in shards) <= 60 * 1024
    with pytest.raises(ConfigError, match="data.cache_limit=20kb: .*too low"):
        build_train_loader(load_config(1, overrides=overrides + ["data.cache_limit=20kb"]), tokenizer)
