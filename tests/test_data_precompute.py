"""`para-train data precompute`: VAE latents and frozen-LLM text embeddings written next to the
pairs, equal to what the model computes; the loader and the trainer use them, and refuse text
embeddings in stages where LoRA trains the LLM."""
import numpy as np
import pytest
import torch

from conftest import read_metrics
from para_train.config import ConfigError, load_config
from para_train.data.dataset import DataError, tokenize
from para_train.data.loader import build_train_loader, open_shards
from para_train.data.precompute import build_text_encoder, precompute
from para_train.data.shards import synthetic_samples, write_shards
from para_train.data.transforms import decode_image
from para_train.models.build import load_vae, resolve_vae_path
from para_train.models.paradiffusion import LatentEncoder

MAX_LEN = 64


def cfg_for(stage: int, cache_dir, *overrides):
    return load_config(stage, overrides=[f"data.cache_dir={cache_dir}", "data.resolution=32",
                                         f"model.llm.max_length={MAX_LEN}", "train.micro_batch_size=4", *overrides])


@pytest.fixture(scope="module")
def shards(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("precompute")
    samples = list(synthetic_samples(seed=4, num_samples=13))
    samples[2]["caption"] = ""  # dropped by precompute, as training would skip it
    write_shards(samples, str(root / "pairs"))
    summary = precompute(str(root / "pairs"), str(root / "pre"), cfg_for(1, cache_dir), latents=True, text_embeds=True,
                         batch_size=4, progress=False)
    return root, samples, summary


def test_precomputed_columns_equal_what_the_model_computes(shards, cache_dir):
    root, samples, summary = shards
    assert summary.written == 12 and dict(summary.skipped) == {"empty caption": 1}
    out = open_shards(str(root / "pre"), cache_dir)
    stored = [out.get_item(i) for i in range(out.num_samples)]
    good = [s for s in samples if s["caption"]]
    assert [s["sample_id"] for s in stored] == [s["sample_id"] for s in good]
    assert all(s["image"] == g["image"] and s["caption"] == g["caption"] for s, g in zip(stored, good))

    cfg = cfg_for(1, cache_dir)
    encoder = LatentEncoder(load_vae(resolve_vae_path(cfg.model.vae.path, cfg.cache_dir)))
    pixels = torch.stack([decode_image(g["image"], 32) for g in good[:4]])
    expected = encoder.encode(pixels, generator=torch.Generator().manual_seed(cfg.run.seed))  # the first batch
    got = torch.from_numpy(np.stack([s["latents"] for s in stored[:4]])).float()
    assert got.shape == (4, 4, 16, 16)  # the tiny VAE: 32 px -> 16x16x4
    torch.testing.assert_close(got, expected, atol=2e-3 * expected.abs().max().item(), rtol=1e-3)

    text, tokenizer = build_text_encoder(cfg, torch.device("cpu"), torch.float32)
    for s in stored[:3]:
        ids, mask, _ = tokenize(tokenizer, s["caption"], MAX_LEN)
        hidden = text(ids[None], mask[None])[0, : int(mask.sum())]
        assert s["text_embeds"].shape == hidden.shape  # only the caption's tokens are stored
        torch.testing.assert_close(torch.tensor(s["text_embeds"]).float(), hidden, atol=1e-2, rtol=1e-2)


def test_the_loader_uses_precomputed_columns_and_refuses_stale_ones(shards, cache_dir):
    root, _, _ = shards
    pre = f"data.remote={root / 'pre'}"
    batch = next(iter(build_train_loader(cfg_for(1, cache_dir, pre), _tokenizer(cache_dir))))
    assert "pixels" not in batch and batch["latents"].shape == (4, 4, 16, 16)
    assert batch["text_embeds"].shape == (4, MAX_LEN, 128)
    for emb, mask in zip(batch["text_embeds"], batch["attention_mask"]):
        n = int(mask.sum())
        assert emb[:n].abs().sum(1).min() > 0 and emb[n:].abs().sum() == 0  # padding rows are masked and zero

    with pytest.raises(ConfigError, match="data.use_text_embeds: .*LoRA trains the LLM"):
        build_train_loader(cfg_for(2, cache_dir, pre), _tokenizer(cache_dir))
    batch = next(iter(build_train_loader(cfg_for(2, cache_dir, pre, "data.use_text_embeds=never"), _tokenizer(cache_dir))))
    assert "text_embeds" not in batch and "latents" in batch
    with pytest.raises(ConfigError, match="data.use_latents=always: .* no `latents` column"):
        build_train_loader(cfg_for(1, cache_dir, f"data.remote={root / 'pairs'}", "data.use_latents=always"),
                           _tokenizer(cache_dir))
    with pytest.raises(DataError, match="do not fit data.resolution=64"):
        next(iter(build_train_loader(cfg_for(1, cache_dir, pre, "data.resolution=64"), _tokenizer(cache_dir),
                                     latent_side=64 // _vae_downsample(cache_dir))))
    with pytest.raises(ConfigError, match="only be precomputed for stage 1"):
        precompute(str(root / "pairs"), str(root / "never"), cfg_for(2, cache_dir), text_embeds=True, progress=False)


def _vae_downsample(cache_dir) -> int:
    return LatentEncoder(load_vae(resolve_vae_path("tiny", cache_dir))).downsample


def _tokenizer(cache_dir):
    from para_train.models.build import load_tokenizer
    from para_train.models.tiny import tiny_llama_dir

    return load_tokenizer(str(tiny_llama_dir(cache_dir)), MAX_LEN)


def test_the_trainer_trains_on_precomputed_latents_and_text(shards, cache_dir, tmp_path):
    from para_train.training.distributed import init_process_group, read_env
    from para_train.main import run_stage
    from para_train.training.resolve import resolve

    env = read_env()
    init_process_group(env)
    root, _, _ = shards
    cfg = cfg_for(1, cache_dir, f"data.remote={root / 'pre'}", f"run.dir={tmp_path}", "train.steps=3",
                  "train.log_every=1", "checkpoint.every=1000", "sample.num_images=0", "tracking.enabled=false",
                  "data.caption_dropout=0.5")
    run_stage(resolve(cfg, env))  # its batches hold latents and text embeddings, no pixels
    rows = read_metrics(tmp_path / "stage1")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
