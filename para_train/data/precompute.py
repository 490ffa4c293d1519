"""Precomputing the frozen parts of the model into new shards: VAE latents (any stage) and LLM text
embeddings (stage 1 only, where the LLM is frozen).

The output holds every input column plus `latents` [C, R/8, R/8] (scaled, fp16) and/or `text_embeds`
[tokens, D] (fp16, only the caption's tokens: padding rows are masked out anyway, so they are not
stored). The loader uses them when present (data.use_latents / data.use_text_embeds).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from para_train.config import Config, ConfigError
from para_train.data.dataset import bad_caption, tokenize
from para_train.data.loader import open_shards
from para_train.data.shards import PRECOMPUTED_COLUMNS, open_writer
from para_train.data.transforms import decode_image
from para_train.models import build
from para_train.models.paradiffusion import LatentEncoder, TextEncoder

log = logging.getLogger(__name__)


@dataclass
class PrecomputeSummary:
    output: str
    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    latent_bytes: int = 0
    text_bytes: int = 0
    seconds: float = 0.0

    def report(self) -> str:
        lines = [f"read {self.read:,} samples, wrote {self.written:,} to {self.output} in {self.seconds:.1f} s"]
        for reason, count in self.skipped.most_common():
            lines.append(f"  skipped ({reason}): {count:,}")
        if self.written:
            if self.latent_bytes:
                lines.append(f"  latents: {self.latent_bytes / self.written / 1024:.1f} KiB per sample")
            if self.text_bytes:
                lines.append(f"  text embeddings: {self.text_bytes / self.written / 2**20:.2f} MiB per sample, "
                             f"{self.text_bytes / 2**30:.2f} GiB in all")
        return "\n".join(lines)


def build_text_encoder(cfg: Config, device: torch.device, dtype: torch.dtype):
    """The frozen LLM (pretrained weights copied in) and its tokenizer, in one process."""
    from para_train.files.model_weights import copy_into

    m = cfg.model
    llm_path = build.resolve_llm_path(m.llm, cfg.cache_dir)
    if llm_path is None:
        raise ConfigError("model.llm.path: text embeddings need the LLM's weights; set model.llm.path")
    tokenizer = build.load_tokenizer(llm_path, m.llm.max_length)
    llm = build.build_llm(build.llm_config(m.llm, llm_path))
    with build.read_weights(llm_path, strip_prefixes=("model.",)) as reader:
        copy_into(llm, reader, rank=0)
    return TextEncoder(llm, m.llm.layer).to(device, dtype).eval(), tokenizer


def warn_text_size(num_samples: int, max_length: int, width: int) -> None:
    per_sample = max_length * width * 2
    log.warning("text embeddings are large: %d tokens x %d fp16 = %.1f MiB per sample at full length (stored trimmed "
                "to each caption's tokens); %s samples -> up to %.1f GiB. At 0.3B samples this is about 1.2 PB: "
                "precompute text only for small stage-1 sets, never for stages 2-3 (LoRA changes the LLM).",
                max_length, width, per_sample / 2**20, f"{num_samples:,}", num_samples * per_sample / 2**30)


@torch.no_grad()
def precompute(source: str, output: str, cfg: Config, *, latents: bool = True, text_embeds: bool = False,
               batch_size: int = 16, device: str = "cpu", size_limit: str = "64mb", compression: str | None = None,
               overwrite: bool = False, progress: bool = True) -> PrecomputeSummary:
    if not (latents or text_embeds):
        raise ValueError("nothing to precompute: ask for latents and/or text embeddings")
    if text_embeds and cfg.model.lora.enabled:
        raise ConfigError(f"text embeddings can only be precomputed for stage 1 (frozen LLM); stage {cfg.run.stage} "
                          "trains LoRA on the LLM. Precompute latents only (--no-text-embeds)")
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shards = open_shards(source, cfg.cache_dir, cfg.data.validate_hash)
    first = shards.shards[0]
    columns = dict(zip(first.column_names, first.column_encodings))
    encoder = text = tokenizer = None
    if latents:
        columns["latents"] = PRECOMPUTED_COLUMNS["latents"]
        vae = build.load_vae(build.resolve_vae_path(cfg.model.vae.path, cfg.cache_dir))
        encoder = LatentEncoder(vae.to(dev) if dtype == torch.float32 else vae.to(dev, dtype))
    if text_embeds:
        columns["text_embeds"] = PRECOMPUTED_COLUMNS["text_embeds"]
        text, tokenizer = build_text_encoder(cfg, dev, dtype)
        warn_text_size(shards.num_samples, cfg.model.llm.max_length, text.llm.config.hidden_size)
    generator = torch.Generator(dev).manual_seed(cfg.run.seed)  # the VAE's posterior sample, reproducibly
    resolution, max_length = cfg.data.resolution, cfg.model.llm.max_length
    summary = PrecomputeSummary(output)
    t0 = time.perf_counter()

    def flush(batch: list[dict], writer) -> None:
        if not batch:
            return
        if encoder is not None:
            pixels = torch.stack([s.pop("_pixels") for s in batch]).to(dev)
            lat = encoder.encode(pixels, generator=generator).to(torch.float16).cpu().numpy()
            for s, x in zip(batch, lat):
                s["latents"] = x
                summary.latent_bytes += x.nbytes
        if text is not None:
            toks = [tokenize(tokenizer, s["caption"], max_length) for s in batch]
            ids = torch.stack([t[0] for t in toks]).to(dev)
            mask = torch.stack([t[1] for t in toks]).to(dev)
            hidden = text(ids, mask).to(torch.float16).cpu().numpy()
            for s, h, (_, m, _) in zip(batch, hidden, toks):
                s["text_embeds"] = np.ascontiguousarray(h[: int(m.sum())])
                summary.text_bytes += s["text_embeds"].nbytes
        for s in batch:
            writer.write(s)
        summary.written += len(batch)
        batch.clear()

    with open_writer(output, columns, size_limit, compression, overwrite) as writer:
        batch: list[dict] = []
        for i in tqdm(range(shards.num_samples), desc=f"precomputing into {output}", unit="sample", mininterval=2.0,
                      disable=not progress):
            raw = shards.get_item(i)
            summary.read += 1
            if bad_caption(raw.get("caption")):
                summary.skipped["empty caption"] += 1
                continue
            sample = {k: raw[k] for k in columns if k in raw}
            if encoder is not None:
                try:
                    sample["_pixels"] = decode_image(raw["image"], resolution)
                except Exception:  # PIL raises many types for bad bytes
                    summary.skipped["image does not decode"] += 1
                    continue
            batch.append(sample)
            if len(batch) == batch_size:
                flush(batch, writer)
        flush(batch, writer)
    summary.seconds = time.perf_counter() - t0
    return summary
