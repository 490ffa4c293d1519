"""Validation during training: a fixed held-out set scored by the denoising loss at fixed timesteps with
fixed noise (so one run's curve is comparable across steps, and two runs' with each other), and, for
synthetic scenes, by the faithfulness scorer on a few sampled images.

The held-out set is `eval.remote` (MDS shards of pairs the run never trains on), or, with the synthetic
default, the scenes and paragraphs of `para-train evaluate`'s set (seeded apart from the training scenes).
Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively): rank r scores
held-out pairs r, r + world, ...; the sums are all-reduced on the rank's device. Metrics, identical on
every rank: val/loss (mean over the timesteps), val/loss_t<T>, val/faithfulness/<check>.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from para_train.config import Config, ConfigError
from para_train.data.dataset import tokenize
from para_train.data.transforms import decode_image
from para_train.training.distributed import all_reduce_sum

log = logging.getLogger(__name__)


@dataclass
class HeldOut:
    captions: list[str]
    pixels: torch.Tensor  # (N, 3, R, R) in [-1, 1]
    scenes: list[dict] | None  # synthetic scene records (faithfulness), else None


def held_out_set(cfg: Config) -> HeldOut | None:
    """The validation pairs, or None when there are none (real data without eval.remote)."""
    e, res = cfg.eval, cfg.data.resolution
    if e.remote is not None:
        from para_train.data.loader import open_shards

        shards = open_shards(e.remote, cfg.cache_dir, cfg.data.validate_hash)
        n = min(e.num_samples, shards.num_samples)
        if n == 0:
            raise ConfigError(f"eval.remote: {e.remote} holds no samples; point it at held-out MDS shards "
                              "(para-train data convert) or set eval.remote=null")
        raw = [shards.get_item(i) for i in range(n)]
        return HeldOut([r["caption"] for r in raw], torch.stack([decode_image(r["image"], res) for r in raw]), None)
    if cfg.data.remotes():
        return None
    from para_train.scenes.eval_set import eval_set, ground_truth

    items = eval_set(e.num_samples, e.seed)
    import numpy as np

    pixels = torch.stack([torch.from_numpy(np.asarray(ground_truth(it, res), dtype=np.float32)).permute(2, 0, 1)
                          for it in items]) / 127.5 - 1
    return HeldOut([it.prompt for it in items], pixels, [it.scene for it in items])


class Validator:
    """Scores the model on the held-out set; `run()` is collective (every rank calls it at the same step)."""

    def __init__(self, cfg: Config, held_out: HeldOut, tokenizer, latent_encoder, device: torch.device, rank: int,
                 world_size: int):
        self.cfg, self.held_out, self.tokenizer = cfg, held_out, tokenizer
        self.device, self.rank, self.world = device, rank, world_size
        e = cfg.eval
        n = len(held_out.captions)
        self.mine = list(range(rank, n, world_size))  # this rank's pairs
        per_rank = math.ceil(n / world_size)
        self.batches = math.ceil(per_rank / cfg.train.micro_batch_size)  # the same on every rank
        # Fixed per pair, for the whole run: its latents (the VAE's posterior drawn once, seeded) and its noise
        with torch.no_grad():
            gen = torch.Generator().manual_seed(e.seed)
            pix = held_out.pixels[self.mine] if self.mine else held_out.pixels[:1]
            self.latents = torch.cat([latent_encoder.encode(chunk.to(device), generator=gen).cpu()  # a CPU generator
                                      for chunk in pix.split(16)])  # draws on the CPU, also for CUDA pixels
        self.noise = torch.stack([torch.randn(self.latents.shape[1:], generator=torch.Generator().manual_seed(
            e.seed * 1_000_003 + i)) for i in (self.mine or [0])])
        toks = [tokenize(tokenizer, held_out.captions[i], cfg.model.llm.max_length) for i in (self.mine or [0])]
        self.ids = torch.stack([t[0] for t in toks])
        self.mask = torch.stack([t[1] for t in toks])
        self.latent_encoder = latent_encoder

    @torch.no_grad()
    def run(self, model) -> dict[str, float]:
        cfg, e = self.cfg, self.cfg.eval
        was_training = model.training
        model.eval()
        try:
            metrics = self._losses(model)
            if self.held_out.scenes is not None and e.num_images > 0:
                metrics.update(self._faithfulness(model))
        finally:
            model.train(was_training)
        return metrics

    def _losses(self, model) -> dict[str, float]:
        e, b, d = self.cfg.eval, self.cfg.train.micro_batch_size, self.device
        count = len(self.mine)
        sums = torch.zeros(len(e.timesteps) + 1, dtype=torch.float64, device=d)
        for k in range(self.batches):
            lo, hi = k * b, min((k + 1) * b, count)
            idx = list(range(lo, hi)) or [0]  # a rank out of pairs still runs the forward passes, weight 0
            weight = 1.0 if hi > lo else 0.0
            sel = torch.tensor(idx)
            latents, noise = self.latents[sel].to(d), self.noise[sel].to(d)
            ids, mask = self.ids[sel].to(d), self.mask[sel].to(d)
            text = model.text_encoder(ids, mask)  # once per batch, shared by the timesteps
            for j, t in enumerate(e.timesteps):
                ts = torch.full((len(idx),), t, dtype=torch.long, device=d)
                loss_B = model.denoising_loss(latents, mask, noise, ts, text, weighted=False)
                sums[j] += weight * loss_B.double().sum()
            sums[-1] += weight * len(idx)
        totals = all_reduce_sum(sums).tolist()
        n = totals[-1]
        per_t = {f"val/loss_t{t}": totals[j] / n for j, t in enumerate(e.timesteps)}
        return {"val/loss": sum(per_t.values()) / len(per_t), **per_t}

    def _faithfulness(self, model) -> dict[str, float]:
        from para_train.scenes.eval_set import eval_set, score_items, summarize
        from para_train.sampling import sample_latents, to_pil

        cfg, e = self.cfg, self.cfg.eval
        items = eval_set(e.num_samples, e.seed)[:e.num_images]
        unet = model.unet
        lat = cfg.data.resolution // self.latent_encoder.downsample
        latents = sample_latents(model.text_encoder, unet, self.tokenizer, [it.prompt for it in items],
                                 max_length=cfg.model.llm.max_length, latent_shape=(unet.config.in_channels, lat, lat),
                                 seed=e.seed, steps=e.sample_steps, guidance_scale=cfg.sample.guidance_scale,
                                 prediction_type=cfg.model.prediction_type,
                                 num_train_timesteps=cfg.model.num_train_timesteps,
                                 zero_terminal_snr=cfg.model.zero_terminal_snr, device=self.device,
                                 dtype=unet.dtype, image_size=(cfg.data.resolution, cfg.data.resolution))
        images = to_pil(self.latent_encoder.decode(latents))  # every rank: the same images, the same scores
        overall = summarize(score_items(items, images, self.tokenizer))["overall"]
        return {f"val/faithfulness/{k}": float(v) for k, v in overall.items() if k not in ("objects", "images")}
