"""Data loader throughput, side by side in one run on the same synthetic image-paragraph pairs.

    python benchmarks/bench_loader.py                          # 2,000 pairs, 256 px PNGs -> 128 px, 512 tokens
    python benchmarks/bench_loader.py --num-samples 500 --workers 2 --rounds 2

1. streaming: para-train's loader (para_train.data.loader.build_train_loader) over MDS shards
   written by `para-train data convert`: decode + resize + crop + tokenize.
2. tsv + PIL: a plain map-style loader the LaVi-Bridge way: a TSV of image paths and captions,
   PIL opens each file, torchvision Resize/CenterCrop/ToTensor/Normalize, the same tokenization.
3. latents: para-train's loader over shards from `para-train data precompute` (VAE latents): no
   image decode at all.

All three read the same pairs from the local disk with the same batch size, worker count,
tokenizer (the embedded tiny one) and one torch thread. Each round times one full epoch of every
loader in turn, so a change in machine load hits all of them alike; the best round is reported.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class TsvPilDataset:
    """The plain way: one line per pair, every image opened from its own file."""

    def __init__(self, tsv: Path, tokenizer, max_length: int, resolution: int):
        from torchvision import transforms

        self.root = tsv.parent
        self.pairs = [line.split("\t", 1) for line in tsv.read_text().splitlines() if line]
        self.tokenizer, self.max_length = tokenizer, max_length
        self.transform = transforms.Compose([
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(resolution), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        from para_train.data.dataset import tokenize

        path, caption = self.pairs[i]
        with Image.open(self.root / path) as img:
            pixels = self.transform(img.convert("RGB"))
        input_ids, attention_mask, truncated = tokenize(self.tokenizer, caption, self.max_length)
        return {"pixels": pixels, "input_ids": input_ids, "attention_mask": attention_mask, "truncated": truncated}


def epoch_rate(loader) -> float:
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["input_ids"])
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=256, help="side of the stored PNGs")
    parser.add_argument("--resolution", type=int, default=128, help="training resolution (data.resolution)")
    parser.add_argument("--max-length", type=int, default=512, help="text tokens (model.llm.max_length)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes, for every loader")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", default=None, help="keep the generated data here (default: a temporary folder)")
    args = parser.parse_args(argv)

    import logging
    import warnings

    import torch
    from torch.utils.data import DataLoader

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # as in loader worker processes; also keeps torch's thread pool out of the timing
    logging.basicConfig(level=logging.WARNING)
    from para_train.config import load_config
    from para_train.data.convert import convert
    from para_train.data.loader import build_train_loader
    from para_train.data.precompute import precompute
    from para_train.data.shards import synthetic_samples
    from para_train.models.build import load_tokenizer
    from para_train.models.tiny import tiny_llama_dir

    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="bench-loader-")
    work = Path(args.work_dir or tmp.name)
    (work / "images").mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"data: {args.num_samples} synthetic pairs, {args.image_size} px PNG -> {args.resolution} px, "
          f"{args.max_length} tokens, batch {args.batch_size}, {args.workers} loader workers, in {work}")

    lines = []
    for s in synthetic_samples(seed=0, num_samples=args.num_samples, image_size=args.image_size):
        (work / "images" / f"{s['sample_id']}.png").write_bytes(s["image"])
        lines.append(f"images/{s['sample_id']}.png\t{s['caption']}")
    (work / "pairs.tsv").write_text("\n".join(lines) + "\n")
    cache = work / "cache"
    overrides = [f"data.cache_dir={cache}", f"data.resolution={args.resolution}", f"model.llm.max_length={args.max_length}",
                 f"train.micro_batch_size={args.batch_size}", f"data.num_workers={args.workers}"]
    cfg = load_config(1, overrides=overrides)
    tokenizer = load_tokenizer(str(tiny_llama_dir(cache)), args.max_length)

    t0 = time.perf_counter()
    convert(str(work / "pairs.tsv"), str(work / "shards"), "tsv", overwrite=True, progress=False)
    t_convert = time.perf_counter() - t0
    t0 = time.perf_counter()
    precompute(str(work / "shards"), str(work / "latents"), cfg, latents=True, overwrite=True, progress=False)
    t_precompute = time.perf_counter() - t0
    print(f"one-off: convert {args.num_samples / t_convert:.0f} samples/s, "
          f"precompute latents (tiny VAE, CPU) {args.num_samples / t_precompute:.0f} samples/s")

    loaders = {
        "streaming (MDS, decode + transform)": build_train_loader(
            load_config(1, overrides=overrides + [f"data.remote={work / 'shards'}"]), tokenizer),
        "tsv + PIL folder (LaVi-Bridge way)": DataLoader(
            TsvPilDataset(work / "pairs.tsv", tokenizer, args.max_length, args.resolution), batch_size=args.batch_size,
            shuffle=True, num_workers=args.workers, drop_last=True),
        "streaming, precomputed latents": build_train_loader(
            load_config(1, overrides=overrides + [f"data.remote={work / 'latents'}"]), tokenizer),
    }
    best = {name: 0.0 for name in loaders}
    for r in range(args.rounds):
        rates = {name: epoch_rate(loader) for name, loader in loaders.items()}
        best = {name: max(best[name], rate) for name, rate in rates.items()}
        print(f"round {r + 1}/{args.rounds} (samples/s): " + ", ".join(f"{v:.0f}" for v in rates.values()))
    base = best["tsv + PIL folder (LaVi-Bridge way)"]
    print(f"\n{'loader':40s} {'samples/s':>10s} {'vs tsv+PIL':>11s}")
    for name, rate in best.items():
        print(f"{name:40s} {rate:10.0f} {rate / base:10.2f}x")
    del loaders
    gc.collect()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
