"""The streaming loader: bad samples are replaced deterministically and counted, streams mix by
weight, batches carry only the text padding they need, and a mid-epoch resume on 2 real ranks yields exactly
the uninterrupted samples."""
import gc
import itertools
import json
import multiprocessing
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import free_port
from para_train.config import ConfigError, load_config
from para_train.data.loader import build_train_loader
from para_train.data.shards import synthetic_samples, write_shards
from para_train.models.build import load_tokenizer
from para_train.models.tiny import tiny_llama_dir

NUM = 40
BAD_IMAGES = (5, 6)  # two in a row: sample 5 is replaced by 7, passing over 6
EMPTY_CAPTION = 20


def _truncated_png(data: bytes) -> bytes:
    return data[: len(data) // 2]  # PIL identifies it but cannot decode it


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-data") / "shards"
    samples = list(synthetic_samples(seed=7, num_samples=NUM))
    for i in BAD_IMAGES:
        samples[i]["image"] = _truncated_png(samples[i]["image"])
    samples[EMPTY_CAPTION]["caption"] = "   "
    write_shards(samples, str(out), size_limit="12kb")  # several shards
    return out, [s["sample_id"] for s in samples]


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return load_tokenizer(str(tiny_llama_dir(cache_dir)), 32)


def config(data: str, cache_dir, *overrides):
    return load_config(1, overrides=[f"data.remote={data}", f"data.cache_dir={cache_dir}", "train.micro_batch_size=4",
                                     "model.llm.max_length=32", *overrides])


def take(cfg, tokenizer, num_batches: int, state: dict | None = None) -> tuple[list, dict]:
    """(sample id, skipped, pixel sum) of the next `num_batches` batches, crossing epochs as the trainer does."""
    loader = build_train_loader(cfg, tokenizer)
    if state is not None:
        loader.load_state_dict(state)
    batches = (batch for _ in itertools.count() for batch in loader)
    rows = []
    for batch in itertools.islice(batches, num_batches):
        sums = batch["pixels"].flatten(1).sum(1).tolist()
        rows += list(zip(batch["sample_id"], batch["skipped"].tolist(), sums))
    state = loader.state_dict()
    batches.close()
    del loader, batches
    gc.collect()  # frees streaming's shared memory, so the next loader over the same folder starts clean
    return rows, state


def expected_epoch(ids: list[str]) -> Counter:
    """Each drawn sample -> (the next good one, how many bad ones were passed over)."""
    bad = set(BAD_IMAGES) | {EMPTY_CAPTION}
    out = Counter()
    for i in range(NUM):
        j = i
        while j in bad:
            j += 1
        out[(ids[j], j - i)] += 1
    return out


def test_bad_samples_are_replaced_by_the_next_good_one_and_counted(bad_data, tokenizer, cache_dir, caplog):
    data, ids = bad_data
    rows, _ = take(config(str(data), cache_dir, "data.shuffle=false"), tokenizer, NUM // 4)
    assert Counter((sid, skipped) for sid, skipped, _ in rows) == expected_epoch(ids)
    assert sum(skipped for _, skipped, _ in rows) == 4  # 5 (passing 6), 6, 20
    assert "image does not decode" in caplog.text and "empty caption" in caplog.text


def test_batches_cut_shared_padding_without_changing_the_text_features(tmp_path, cache_dir):
    """Stage 1's short captions (every object named) reach the LLM as at most 128 tokens, not
    model.llm.max_length=512, and the LLM's features of the real tokens are those of the fully padded batch; paragraphs keep what they need."""
    from transformers import AutoModel

    from para_train.scenes.synthetic import synthetic_sample
    from para_train.models.paradiffusion import TextEncoder

    tok = load_tokenizer(str(tiny_llama_dir(cache_dir)), 512)
    short = synthetic_sample(3, 0, captions="short")
    assert short.scene == synthetic_sample(3, 0).scene  # the same scene, described briefly
    assert short.caption.count(" background") == 1 and short.scene["background"] in short.caption
    for o in short.scene["objects"]:
        assert f"{o['size']} {o['color']} {o['shape']}" in short.caption
    llm = TextEncoder(AutoModel.from_pretrained(str(tiny_llama_dir(cache_dir))).eval())
    for captions, most in (("short", 128), ("paragraph", 512)):
        write_shards(synthetic_samples(seed=3, num_samples=8, captions=captions), str(tmp_path / captions))
        cfg = load_config(1, overrides=[f"data.remote={tmp_path / captions}", f"data.cache_dir={cache_dir}",
                                        "train.micro_batch_size=8", "data.shuffle=false"])
        batch = next(iter(build_train_loader(cfg, tok)))
        ids, mask = batch["input_ids"], batch["attention_mask"]
        longest = int(mask.sum(1).max())
        assert ids.shape[1] % 64 == 0 and longest <= ids.shape[1] < longest + 64, (captions, ids.shape, longest)
        assert ids.shape[1] <= most
        full_ids = torch.full((8, 512), tok.pad_token_id)
        full_ids[:, :ids.shape[1]] = ids
        full_mask = torch.zeros(8, 512, dtype=torch.long)
        full_mask[:, :ids.shape[1]] = mask
        with torch.no_grad():
            cut, full = llm(ids, mask), llm(full_ids, full_mask)
        real = mask.bool()
        torch.testing.assert_close(cut[real], full[:, :ids.shape[1]][real], rtol=1e-4, atol=1e-5)


def test_streams_mix_by_proportion(tmp_path, tokenizer, cache_dir):
    write_shards(synthetic_samples(seed=1, num_samples=30), str(tmp_path / "a"))
    write_shards(synthetic_samples(seed=2, num_samples=10), str(tmp_path / "b"))
    streams = f"[{{remote: {tmp_path / 'a'}, proportion: 0.5}}, {{remote: {tmp_path / 'b'}, proportion: 0.5}}]"
    cfg = load_config(1, overrides=[f"data.streams={streams}", "data.epoch_size=40", f"data.cache_dir={cache_dir}",
                                    "train.micro_batch_size=4", "model.llm.max_length=32"])
    rows, _ = take(cfg, tokenizer, 10)  # one epoch
    ids = Counter(sid for sid, _, _ in rows)
    from_b = {sid: n for sid, n in ids.items() if sid.startswith("synthetic-2-")}
    assert sum(ids.values()) - sum(from_b.values()) == 20  # 20 of the 30 in a
    assert len(from_b) == 10 and set(from_b.values()) == {2}  # every sample of b twice

    with pytest.raises(ConfigError, match="data.cache_limit: .* only when every stream is remote"):
        build_train_loader(load_config(1, overrides=[f"data.streams={streams}", "data.cache_limit=10gb",
                                                     f"data.cache_dir={cache_dir}"]), tokenizer)


TOTAL, CUT = 8, 3  # batches per rank: an epoch is 5 (40 samples / 2 ranks / 4), so the resume crosses into epoch 1


def _resume_rank(rank: int, port: int, data: str, cache_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    multiprocessing.set_start_method("fork", force=True)  # loader workers start as under a launcher (spawn re-imports)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    tokenizer = load_tokenizer(str(tiny_llama_dir(Path(cache_dir))), 32)
    result = {}
    for workers in (0, 2):
        cfg = config(data, cache_dir, f"data.num_workers={workers}", "data.crop=random", "data.flip=true")
        full, _ = take(cfg, tokenizer, TOTAL)
        head, state = take(cfg, tokenizer, CUT)  # "killed" after CUT batches; this state goes into the checkpoint
        tail, _ = take(cfg, tokenizer, TOTAL - CUT, json.loads(json.dumps(state)))  # a fresh loader resumes
        result[workers] = {"full": full, "resumed": head + tail, "state": state}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def test_mid_epoch_resume_on_two_ranks_yields_the_uninterrupted_samples(bad_data, cache_dir, tmp_path):
    data, ids = bad_data
    tiny_llama_dir(cache_dir)  # built once here, not by both ranks
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_resume_rank, args=(r, port, str(data), str(cache_dir), str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for workers in ("0", "2"):
        for r in ranks:
            assert r[workers]["state"]["sample_in_epoch"] == CUT * 4 * 2
            assert [tuple(x) for x in r[workers]["resumed"]] == [tuple(x) for x in r[workers]["full"]]
        epoch0 = [tuple(x[:2]) for r in ranks for x in r[workers]["full"][:20]]  # 5 batches of 4
        assert Counter(epoch0) == expected_epoch(ids)  # together the ranks saw each sample once, bad ones replaced
        assert ranks[0][workers]["full"] == ranks[0]["0"]["full"]  # loader workers do not change the order
    assert ranks[0]["0"]["full"] != ranks[1]["0"]["full"]


STALE_SHM_MAKER = """
import sys, time
from streaming import StreamingDataset
next(iter(StreamingDataset(local=sys.argv[1], batch_size=2)))
print("ready", flush=True)
time.sleep(120)
"""


def test_shared_memory_left_by_a_killed_run_is_cleaned_at_start_up(bad_data, tmp_path):
    """A run killed with its helper processes (node crash, OOM kill, torn-down job step) leaves MosaicML
    streaming's shared memory behind; the trainer's start-up (data.clean_shared_memory) removes it."""
    import signal
    import subprocess
    import sys

    from para_train.data.loader import clean_shared_memory

    data, _ = bad_data
    before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen([sys.executable, "-c", STALE_SHM_MAKER, str(data)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    os.killpg(proc.pid, signal.SIGKILL)  # the process and Python's resource tracker, which would unlink it
    proc.wait(timeout=60)
    stale = set(os.listdir("/dev/shm")) - before
    assert any(name.endswith("_locals") for name in stale), stale  # streaming's registry of local folders
    assert clean_shared_memory(load_config(1, overrides=["data.clean_shared_memory=false"])) == []
    assert stale <= set(os.listdir("/dev/shm"))  # switched off: left alone

    # a live run's segments (this one maps them) survive the cleaning; the killed run's are removed
    from streaming import StreamingDataset

    live_before = set(os.listdir("/dev/shm"))
    live = StreamingDataset(local=str(data), batch_size=2)
    next(iter(live))
    mine = set(os.listdir("/dev/shm")) - live_before
    assert mine
    removed = clean_shared_memory(load_config(1))
    assert stale <= set(removed) and not stale & set(os.listdir("/dev/shm"))
    assert mine <= set(os.listdir("/dev/shm")) and not mine & set(removed)
    del live


def test_validation_reads_held_out_shards_with_real_data(tmp_path, cache_dir):
    """eval.remote: the first eval.num_samples pairs of held-out MDS shards, decoded at data.resolution; real data
    without it: no validation set (the trainer says so); the synthetic default: evaluate's scenes."""
    from para_train.data.shards import synthetic_samples, write_shards
    from para_train.training.validation import held_out_set

    write_shards(list(synthetic_samples(seed=9, num_samples=5)), str(tmp_path / "val"))
    write_shards(list(synthetic_samples(seed=8, num_samples=5)), str(tmp_path / "train"))
    base = [f"data.cache_dir={cache_dir}", f"data.remote={tmp_path / 'train'}"]
    held = held_out_set(load_config(1, overrides=[*base, f"eval.remote={tmp_path / 'val'}", "eval.num_samples=3",
                                          "eval.num_images=2"]))
    assert held.pixels.shape == (3, 3, 32, 32) and held.scenes is None
    assert held.captions == [s["caption"] for s in list(synthetic_samples(seed=9, num_samples=3))]
    assert held_out_set(load_config(1, overrides=base)) is None
    synthetic = held_out_set(load_config(1, overrides=[f"data.cache_dir={cache_dir}", "eval.num_samples=4"]))
    assert len(synthetic.scenes) == 4 and synthetic.pixels.shape == (4, 3, 32, 32)
