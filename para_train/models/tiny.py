"""Tiny stand-ins for the pretrained weights a real run names: a Llama (with a BPE tokenizer trained
on synthetic paragraphs) and an AutoencoderKL, random weights at a fixed seed.

They are written once into the cache as ordinary Hugging Face folders, so the embedded default and
the tests load them through exactly the code path that loads Llama-2-7B and SDXL's VAE.
"""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

log = logging.getLogger(__name__)

TINY_VERSION = "v1"
TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                block_out_channels=[8, 16, 32, 32], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, sample_size=32)
_COMPLETE = ".complete"


def _build_tokenizer(out: Path, vocab_size: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from para_train.data.synthetic import describe, make_scene

    rng = random.Random("para-train-tokenizer")
    corpus = [describe(make_scene(rng), rng) for _ in range(300)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=4096)
    fast.save_pretrained(out)
    return fast


def _build_llama(out: Path, vocab_size: int, bos: int, eos: int):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, **TINY_LLAMA))
    model.save_pretrained(out, safe_serialization=True)


@torch.no_grad()
def _build_vae(out: Path):
    from diffusers import AutoencoderKL

    from para_train.data.synthetic import make_scene, render

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE)
    # Its own scaling factor: scale latents of synthetic images to unit variance, as SD's 0.18215 does.
    rng = random.Random("para-train-vae-scale")
    imgs = torch.stack([torch.from_numpy(np.asarray(render(make_scene(rng), 32), dtype=np.float32)).permute(2, 0, 1)
                        for _ in range(32)]) / 127.5 - 1
    std = vae.encode(imgs).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(out, safe_serialization=True)


def _ensure(folder: Path, build) -> Path:
    if (folder / _COMPLETE).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / _COMPLETE).exists():
            return folder
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        (tmp / _COMPLETE).write_text("ok\n")
        tmp.rename(folder)
    return folder


def tiny_llama_dir(cache_dir: Path) -> Path:
    """A Llama folder (config, safetensors weights, tokenizer), generated on first use."""

    def build(tmp: Path):
        log.info("building the tiny Llama + tokenizer into %s", tmp)
        tok = _build_tokenizer(tmp)
        _build_llama(tmp, len(tok), tok.bos_token_id, tok.eos_token_id)

    return _ensure(cache_dir / "models" / f"tiny-llama-{TINY_VERSION}", build)


def tiny_vae_dir(cache_dir: Path) -> Path:
    return _ensure(cache_dir / "models" / f"tiny-vae-{TINY_VERSION}", _build_vae)
