"""Turning image-paragraph pairs (TSV, JSONL, a captioned folder, or the synthetic scenes) into MDS
shards in a local folder or a bucket, with a report of what was written and what was skipped.

Images are stored as their original encoded bytes (never re-encoded); each is opened and checked
once here so that files PIL cannot identify are skipped with a reason instead of reaching training.
"""
from __future__ import annotations

import hashlib
import io
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from para_train.data.shards import COLUMNS, open_writer, synthetic_samples
from para_train.data.sources import Pair, read_pairs

MAX_TOKEN_BIN = 8192  # caption lengths are histogrammed up to this; longer ones land in the last bin
TOKEN_LIMITS = (77, 512)  # CLIP's context, ParaDiffusion's LLM context
EXAMPLES_PER_REASON = 5


def sample_id(image: bytes, caption: str) -> str:
    """Stable across re-conversions, machines and input order: a hash of the content."""
    h = hashlib.sha1(image)
    h.update(b"\0")
    h.update(caption.encode("utf-8"))
    return h.hexdigest()[:24]


def read_sample(pair: Pair, source: str) -> dict | tuple[str, str]:
    """A sample dict (keys = COLUMNS), or (reason, detail) when the pair cannot be used."""
    if pair.problem:
        return pair.problem, pair.ref
    caption = (pair.caption or "").strip()
    if not caption:
        return "empty caption", pair.ref
    try:
        data = pair.image_path.read_bytes()
    except FileNotFoundError:
        return "image file not found", f"{pair.ref} ({pair.image_path})"
    except OSError as e:
        return "image file unreadable", f"{pair.ref} ({pair.image_path}: {e.strerror or e})"
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            img.verify()
    except Exception as e:  # PIL raises many types for bad files; any of them means "not an image we can use"
        return "not a decodable image", f"{pair.ref} ({pair.image_path}: {type(e).__name__})"
    return {"image": data, "caption": caption, "width": width, "height": height,
            "sample_id": sample_id(data, caption), "source": source, "scene": None}


@dataclass
class ConvertSummary:
    output: str
    written: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few offending entries
    tokenizer: str | None = None
    token_hist: np.ndarray = field(default_factory=lambda: np.zeros(MAX_TOKEN_BIN + 1, np.int64))
    max_tokens: int = 0
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(detail)

    def add_token_counts(self, lengths: Iterable[int]) -> None:
        lengths = np.fromiter(lengths, np.int64)
        if len(lengths):
            self.max_tokens = max(self.max_tokens, int(lengths.max()))
            self.token_hist += np.bincount(np.minimum(lengths, MAX_TOKEN_BIN), minlength=MAX_TOKEN_BIN + 1)

    def token_stats(self) -> dict | None:
        n = int(self.token_hist.sum())
        if n == 0:
            return None
        cum = np.cumsum(self.token_hist)
        pct = {f"p{q}": int(np.searchsorted(cum, q / 100 * n)) for q in (50, 90, 99)}
        mean = float((self.token_hist * np.arange(MAX_TOKEN_BIN + 1)).sum() / n)
        over = {f"over_{k}": int(self.token_hist[k + 1:].sum()) for k in TOKEN_LIMITS}
        return {"count": n, "mean": round(mean, 1), **pct, "max": self.max_tokens, **over}

    def to_dict(self) -> dict:
        return {"output": self.output, "written": self.written, "skipped": dict(self.skipped),
                "skipped_examples": self.examples, "tokenizer": self.tokenizer, "caption_tokens": self.token_stats(),
                "shards": self.shards, "bytes": self.bytes, "seconds": round(self.seconds, 1)}

    def report(self) -> str:
        rate = self.written / max(self.seconds, 1e-9)
        lines = [f"wrote {self.written:,} samples to {self.output}: {self.shards} shards, "
                 f"{self.bytes / 2**20:,.1f} MiB, {self.seconds:.1f} s ({rate:,.0f} samples/s)"]
        total_skipped = sum(self.skipped.values())
        lines.append(f"skipped {total_skipped:,}" + (":" if total_skipped else ""))
        for reason, count in self.skipped.most_common():
            lines.append(f"  {reason}: {count:,}  e.g. {'; '.join(self.examples[reason][:3])}")
        stats = self.token_stats()
        if stats:
            n = stats["count"]
            lines.append(f"caption length in tokens ({self.tokenizer}): mean {stats['mean']}, median {stats['p50']}, "
                         f"p90 {stats['p90']}, p99 {stats['p99']}, max {stats['max']}")
            for k in TOKEN_LIMITS:
                over = stats[f"over_{k}"]
                lines.append(f"  longer than {k} tokens: {over:,} ({over / n:.1%})")
        return "\n".join(lines)


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn over items on `workers` threads, results in input order, at most a few batches in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    window = 4 * workers
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def convert(source: str, output: str, fmt: str, *, image_root: str | None = None, image_key: str | None = None,
            caption_key: str | None = None, source_name: str | None = None, size_limit: str = "64mb",
            compression: str | None = None, tokenizer=None, tokenizer_name: str | None = None, workers: int = 8,
            overwrite: bool = False, synthetic_count: int = 1000, synthetic_seed: int = 0,
            synthetic_image_size: int = 64, progress: bool = True) -> ConvertSummary:
    """Write every usable pair of `source` as MDS shards to `output` (a folder or a URL such as s3://b/p)."""
    if fmt == "synthetic":
        total = synthetic_count
        results: Iterator = iter(synthetic_samples(synthetic_seed, synthetic_count, synthetic_image_size))
    else:
        name = source_name or Path(source.rstrip("/")).stem
        pairs, total = read_pairs(fmt, source, image_root, image_key, caption_key)
        results = ordered_map(lambda pair: read_sample(pair, name), pairs, workers)

    summary = ConvertSummary(output=output, tokenizer=tokenizer_name)
    captions: list[str] = []

    def count_tokens():
        if tokenizer is not None and captions:
            summary.add_token_counts(len(ids) for ids in tokenizer(captions)["input_ids"])
        captions.clear()

    t0 = time.perf_counter()
    writer = open_writer(output, COLUMNS, size_limit, compression, overwrite)
    with writer:
        bar = tqdm(results, total=total, desc=f"converting to {output}", unit="sample", mininterval=2.0,
                   disable=not progress)
        for result in bar:
            if isinstance(result, tuple):
                summary.skip(*result)
                continue
            writer.write(result)
            summary.written += 1
            captions.append(result["caption"])
            if len(captions) >= 1024:
                count_tokens()
        count_tokens()
    summary.seconds = time.perf_counter() - t0
    summary.shards = len(writer.shards)
    summary.bytes = sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in writer.shards)
    return summary
