"""Tiny stand-ins for the pretrained weights a real run names, each trained briefly when first built
(deterministic: fixed seeds, steps and thread count): a Llama (with a BPE tokenizer) pretrained as a causal
LM on synthetic paragraphs, and an AutoencoderKL trained to reconstruct synthetic scenes.

The VAE must be trained: a random decoder turns every sample into coloured noise, whatever the UNet learned.
The Llama is pretrained so that it stands in for a pretrained LLM rather than for a random network (its LM loss
falls from 6.6 to about 0.3 nats per token); whether that helps the UNet read the paragraph faster than random
features do is not shown (at 400 stage-1 steps, both left the scorer at chance; README, "does the default learn?").

They are written once into the cache as ordinary Hugging Face folders, so the embedded default and
the tests load them through exactly the code path that loads Llama-2-7B and SDXL's VAE.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

log = logging.getLogger(__name__)

TINY_VERSION = "v2"  # bump when a stand-in changes: caches built by another version are rebuilt
TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5)
# Downsamples by 2: 32 px scenes -> 16x16x4 latents (an 8x VAE leaves 4x4 latents at 32 px, too few to place
# objects on a 3x3 grid, and reconstructs the scenes at ~13 dB; SD's VAEs are 8x at 512-1024 px).
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                block_out_channels=[16, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, mid_block_add_attention=False, sample_size=32)
# Their training recipes: ~1 minute (Llama) and ~1.5 minutes (VAE) on 2 CPU cores.
LLM_TRAINING = dict(paragraphs=2000, steps=250, batch_size=16, seq_len=256, lr=3e-3, seed=0)
VAE_TRAINING = dict(resolution=32, scenes=4096, steps=700, batch_size=16, lr=5e-3, seed=0)
_COMPLETE = ".complete"


def _build_tokenizer(out: Path, vocab_size: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from para_train.scenes.synthetic import describe, make_scene

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


def pretrain_tiny_llama(model, tokenizer, *, paragraphs: int, steps: int, batch_size: int, seq_len: int, lr: float,
                        seed: int, progress: bool = True):
    """Next-token prediction on windows of synthetic paragraphs (one EOS-separated stream)."""

    from para_train.scenes.synthetic import describe, make_scene

    rng = random.Random(f"para-train-llm-pretrain/{seed}")
    stream = []
    for _ in range(paragraphs):
        stream += tokenizer(describe(make_scene(rng), rng))["input_ids"] + [tokenizer.eos_token_id]
    stream = torch.tensor(stream)
    gen = torch.Generator().manual_seed(seed)

    def loss():
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=gen)
        x = torch.stack([stream[i:i + seq_len] for i in starts.tolist()])
        return model(input_ids=x, labels=x).loss

    with _threads(2):
        _fit(model, loss, steps=steps, lr=lr, warmup=max(1, steps // 20),
             desc="pretraining the tiny Llama (once per cache)", progress=progress)
    return model


def _fit(model, loss_fn, *, steps: int, lr: float, warmup: int, desc: str, progress: bool) -> None:
    """AdamW on `loss_fn()` for `steps` steps: linear warm-up over `warmup` steps, then cosine to 0."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=2)
    for _ in bar:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.eval()


def _build_llama(out: Path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, **TINY_LLAMA))
    pretrain_tiny_llama(lm, tokenizer, **LLM_TRAINING)
    lm.model.save_pretrained(out, safe_serialization=True)  # the LlamaModel: ParaDiffusion reads hidden states


def _scene_pixels(rng: random.Random, count: int, size: int) -> torch.Tensor:
    from para_train.scenes.synthetic import make_scene, render

    return torch.stack([torch.from_numpy(np.asarray(render(make_scene(rng), size), dtype=np.float32)).permute(2, 0, 1)
                        for _ in range(count)]) / 127.5 - 1


def train_tiny_vae(vae, *, resolution: int, scenes: int, steps: int, batch_size: int, lr: float, seed: int,
                   progress: bool = True):
    """Train `vae` as a deterministic autoencoder on synthetic scenes (MSE on decode(mode)), then pin its posterior
    variance to ~0 (logvar -30), so that sampling the latent distribution, as training does, returns the mean."""

    with _threads(2):
        torch.manual_seed(seed)
        pool = _scene_pixels(random.Random(f"para-train-vae-train/{seed}"), scenes, resolution)
        gen = torch.Generator().manual_seed(seed)

        def loss():
            x = pool[torch.randint(0, scenes, (batch_size,), generator=gen)]
            return F.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x)

        _fit(vae, loss, steps=steps, lr=lr, warmup=1, desc="training the tiny VAE (once per cache)", progress=progress)
        with torch.no_grad():
            conv = vae.quant_conv  # its output = (mean, logvar): make logvar a constant -30
            half = conv.out_channels // 2
            conv.weight[half:] = 0
            conv.bias[half:] = -30.0
    return vae


@contextlib.contextmanager
def _threads(n: int):
    """n intra-op threads: the same reduction order on every machine, so the same weights and golden losses."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reconstruction_psnr(vae, images: torch.Tensor) -> float:
    """PSNR in dB of decode(encode(x)) against x (pixels in [-1, 1])."""
    with torch.no_grad():
        rec = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    return 10 * math.log10(4.0 / F.mse_loss(rec, images).item())


def _build_vae(out: Path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = train_tiny_vae(AutoencoderKL(**TINY_VAE), **VAE_TRAINING)
    # Shift and scale the latents of synthetic images to zero mean, unit variance (as SD's 0.18215 scales its VAE's)
    imgs = _scene_pixels(random.Random("para-train-vae-scale"), 64, VAE_TRAINING["resolution"])
    with torch.no_grad():
        latents = vae.encode(imgs).latent_dist.mode()
    vae.register_to_config(shift_factor=round(latents.mean().item(), 5), scaling_factor=round(1.0 / latents.std().item(), 5))
    vae.save_pretrained(out, safe_serialization=True)
    log.info("tiny VAE: %.1f dB reconstruction PSNR on 64 unseen scenes", reconstruction_psnr(vae, imgs))


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
        _build_llama(tmp, _build_tokenizer(tmp))

    return _ensure(cache_dir / "models" / f"tiny-llama-{TINY_VERSION}", build)


def tiny_vae_dir(cache_dir: Path) -> Path:
    return _ensure(cache_dir / "models" / f"tiny-vae-{TINY_VERSION}", _build_vae)
