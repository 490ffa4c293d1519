"""Precompute VAE latents (any stage) and frozen-LLM text embeddings (stage 1 only) into new shards.

examples:
  para-train data precompute shards/pairs shards/pairs-latents                    # tiny VAE, data.resolution
  para-train data precompute s3://bucket/pairs-mds s3://bucket/pairs-lat --config configs/stage1_pretrain.yaml
  para-train data precompute shards/small shards/small-text --text-embeds --no-latents

The model parts, resolution and max length come from the config (--config FILE and key=value
overrides, as for training). Latents are centre crops at data.resolution without flips. Text
embeddings are only valid while the LLM is frozen (stage 1) and are large: a 512-token x 4096
fp16 embedding is 4 MiB per sample (stored trimmed to each caption's tokens). Train on the output
with data.remote=OUTPUT; data.use_latents / data.use_text_embeds (auto) pick the columns up.
"""
from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="shards written by `para-train data convert`: a folder or a URL")
    parser.add_argument("output", help="a new local folder, or a URL such as s3://bucket/prefix")
    parser.add_argument("overrides", nargs="*",
                        help="config key=value, e.g. data.resolution=256 model.vae.path=/models/vae")
    parser.add_argument("--config", default=None, help="a stage YAML naming the VAE / LLM (default: the tiny model)")
    parser.add_argument("--stage", type=int, default=1, choices=(1, 2, 3),
                        help="the stage the config is for (default: 1)")
    parser.add_argument("--latents", action=argparse.BooleanOptionalAction, default=True,
                        help="VAE latents (default: on)")
    parser.add_argument("--text-embeds", action=argparse.BooleanOptionalAction, default=False,
                        help="frozen-LLM text embeddings, stage 1 only (default: off)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--size-limit", default="64mb", help="shard size limit (default: 64mb)")
    parser.add_argument("--compression", default=None, help="shard compression, e.g. zstd (default: none)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty local output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from para_train.config import ConfigError, load_config
    from para_train.data.dataset import DataError
    from para_train.data.precompute import precompute

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        cfg = load_config(args.stage, args.config, args.overrides)
        summary = precompute(args.input, args.output, cfg, latents=args.latents, text_embeds=args.text_embeds,
                             batch_size=args.batch_size, device=device, size_limit=args.size_limit,
                             compression=args.compression, overwrite=args.overwrite, progress=not args.quiet)
    except (ConfigError, DataError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.report())
    return 0
