"""Streaming image-paragraph samples: decode, resize/crop, tokenize.

Built on MosaicML streaming, whose sample order is a deterministic function of (seed, epoch,
world size) and whose position goes into the trainer's checkpoint, so a resumed rank sees exactly
the samples it would have seen.
"""
from __future__ import annotations

import io
import logging

import numpy as np
import torch
from PIL import Image
from streaming import StreamingDataLoader, StreamingDataset

log = logging.getLogger(__name__)


def decode_image(data: bytes, resolution: int) -> torch.Tensor:
    """Encoded image bytes -> float tensor (3, R, R) in [-1, 1]: shorter side resized, centre crop."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ParagraphImageDataset(StreamingDataset):
    """MDS shards with `image` bytes and `caption` text -> training samples."""

    def __init__(self, *, tokenizer, max_length: int, resolution: int, **streaming_kwargs):
        super().__init__(**streaming_kwargs)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.resolution = resolution

    def __getitem__(self, idx: int) -> dict:
        sample = super().__getitem__(idx)
        ids = self.tokenizer(sample["caption"])["input_ids"]
        truncated = len(ids) > self.max_length
        ids = ids[: self.max_length]
        input_ids = torch.full((self.max_length,), self.tokenizer.pad_token_id, dtype=torch.long)
        input_ids[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask = torch.zeros(self.max_length, dtype=torch.long)
        attention_mask[: len(ids)] = 1
        return {
            "pixels": decode_image(sample["image"], self.resolution),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "truncated": truncated,
            "sample_id": sample["sample_id"],
        }


def build_loader(*, local: str, remote: str | None, tokenizer, max_length: int, resolution: int, batch_size: int,
                 shuffle: bool, seed: int, num_workers: int) -> StreamingDataLoader:
    dataset = ParagraphImageDataset(
        tokenizer=tokenizer, max_length=max_length, resolution=resolution, local=local, remote=remote,
        shuffle=shuffle, shuffle_seed=seed, batch_size=batch_size, download_retry=3, download_timeout=120)
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=True,
                               persistent_workers=False)
