"""Convert image-paragraph pairs to MDS shards (a local folder or object storage).

examples:
  para-train data convert pairs.tsv shards/pairs                 # image_path<TAB>caption lines (LaVi-Bridge)
  para-train data convert pairs.jsonl s3://bucket/pairs-mds --size-limit 256mb --compression zstd
  para-train data convert images/ shards/curated                 # a.jpg + a.txt, b.png + b.txt, ...
  para-train data convert synthetic shards/synthetic --num-samples 2000
  para-train data convert pairs.tsv shards/pairs --tokenizer /models/Llama-2-7b-hf   # token counts in the summary

Relative image paths are resolved against --image-root (default: the list file's folder). Images are
stored as their original bytes; unreadable images, missing files and empty captions are skipped and
reported. Object storage: s3://, gs://, oci://, ... as MosaicML streaming supports, with its usual
credentials (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, and S3_ENDPOINT_URL for non-AWS servers).
Train on the result with data.remote=OUTPUT (or several outputs as data.streams).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from para_train.data.sources import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="a .tsv or .jsonl file, a folder of images with .txt captions, or 'synthetic'")
    parser.add_argument("output", help="a new local folder, or a URL such as s3://bucket/prefix")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                        help="input format (default: from the name)")
    parser.add_argument("--image-root", default=None, help="folder that relative image paths start from")
    parser.add_argument("--image-key", default=None,
                        help="JSONL field with the image path (default: image, image_path, path, ...)")
    parser.add_argument("--caption-key", default=None,
                        help="JSONL field with the caption (default: caption, text, prompt, ...)")
    parser.add_argument("--source-name", default=None, help="value of the `source` column (default: the input's name)")
    parser.add_argument("--size-limit", default="64mb", help="shard size limit before compression (default: 64mb)")
    parser.add_argument("--compression", default=None,
                        help="shard compression: zstd, zstd:N, gz, br, sn, bz2 (default: none)")
    parser.add_argument("--tokenizer", default="tiny",
                        help="tokenizer for caption lengths: a model folder or hub id, 'tiny' (the embedded model's), "
                             "or 'none' (default: tiny)")
    parser.add_argument("--cache-dir", default="~/.cache/para-train", help="where the tiny tokenizer is generated")
    parser.add_argument("--workers", type=int, default=8, help="threads reading and checking images (default: 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty local output folder")
    parser.add_argument("--summary", default=None, help="also write the summary as JSON to this file")
    parser.add_argument("--num-samples", type=int, default=1000, help="synthetic: how many scenes (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: the set's seed (default: 0)")
    parser.add_argument("--image-size", type=int, default=64, help="synthetic: image side in pixels (default: 64)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def load_tokenizer(name: str, cache_dir: str):
    if name == "none":
        return None
    from pathlib import Path

    from para_train.config import LLMConfig
    from para_train.models.build import load_tokenizer as load, resolve_llm_path

    path = resolve_llm_path(LLMConfig(path=name), Path(cache_dir).expanduser())
    return load(path, max_length=1 << 30)  # only counted, never truncated here


def run(args: argparse.Namespace) -> int:
    from para_train.config import ConfigError
    from para_train.data.convert import convert
    from para_train.data.dataset import DataError
    from para_train.data.sources import detect_format

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        fmt = detect_format(args.input) if args.format == "auto" else args.format
        tokenizer = load_tokenizer(args.tokenizer, args.cache_dir)
        summary = convert(args.input, args.output, fmt, image_root=args.image_root, image_key=args.image_key,
                          caption_key=args.caption_key, source_name=args.source_name, size_limit=args.size_limit,
                          compression=args.compression, tokenizer=tokenizer,
                          tokenizer_name=None if tokenizer is None else args.tokenizer, workers=args.workers,
                          overwrite=args.overwrite, synthetic_count=args.num_samples, synthetic_seed=args.seed,
                          synthetic_image_size=args.image_size, progress=not args.quiet)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.report())
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary.to_dict(), f, indent=1)
    if summary.written == 0:
        print(f"error: no usable pairs in {args.input}; see the skip reasons above", file=sys.stderr)
        return 1
    return 0
