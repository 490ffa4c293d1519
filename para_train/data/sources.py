"""Reading image-paragraph pairs in the shapes users bring them, one `Pair` at a time.

- tsv:    `image_path<TAB>caption` per line (LaVi-Bridge's format); an optional header line
- jsonl:  one JSON object per line with an image path and a caption field
- folder: images with a same-named `.txt` caption next to them (`a/b.jpg` + `a/b.txt`)

Relative image paths are resolved against `image_root` (default: the list file's folder). Nothing
here decodes images; `convert.py` reads and checks them.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IMAGE_KEYS = ("image", "image_path", "path", "file_name", "filename", "img")
CAPTION_KEYS = ("caption", "text", "prompt", "paragraph")
FORMATS = ("tsv", "jsonl", "folder", "synthetic")


@dataclass
class Pair:
    ref: str  # where it came from, for reports: "pairs.tsv:12" or a file path
    image_path: Path | None
    caption: str | None
    problem: str | None = None  # why this entry cannot become a sample (then the fields above may be None)


def detect_format(source: str) -> str:
    if source == "synthetic":
        return "synthetic"
    path = Path(source)
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".txt", ".csv"):
        return "tsv"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if not path.exists():
        raise FileNotFoundError(f"input {source} does not exist (give a .tsv/.jsonl file, a folder, or 'synthetic')")
    raise ValueError(f"cannot tell the format of {source} from its name; pass --format tsv|jsonl|folder")


def _resolve(root: Path, raw: str) -> Path:
    path = Path(raw).expanduser()
    return path if path.is_absolute() else root / path


def tsv_pairs(path: Path, image_root: Path | None = None) -> Iterator[Pair]:
    root = image_root or path.parent
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            ref = f"{path.name}:{lineno}"
            if not line.strip():
                continue
            if "\t" not in line:
                yield Pair(ref, None, None, "line has no tab between image path and caption")
                continue
            image, caption = line.split("\t", 1)
            if lineno == 1 and image.strip().lower() in IMAGE_KEYS:
                continue  # a header line
            yield Pair(ref, _resolve(root, image.strip()), caption)


def jsonl_pairs(path: Path, image_root: Path | None = None, image_key: str | None = None,
                caption_key: str | None = None) -> Iterator[Pair]:
    root = image_root or path.parent
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            ref = f"{path.name}:{lineno}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield Pair(ref, None, None, f"not valid JSON ({e.msg})")
                continue
            if not isinstance(record, dict):
                yield Pair(ref, None, None, "not a JSON object")
                continue
            ikey = image_key or next((k for k in IMAGE_KEYS if k in record), None)
            ckey = caption_key or next((k for k in CAPTION_KEYS if k in record), None)
            if ikey not in record or not isinstance(record[ikey], str):
                yield Pair(ref, None, None, f"no image path field ({image_key or '/'.join(IMAGE_KEYS)})")
                continue
            caption = record.get(ckey) if ckey else None
            yield Pair(ref, _resolve(root, record[ikey]), caption if isinstance(caption, str) else None)


def folder_pairs(folder: Path, images: list[Path]) -> Iterator[Pair]:
    for image in images:
        txt = image.with_suffix(".txt")
        ref = str(image.relative_to(folder))
        if not txt.is_file():
            yield Pair(ref, image, None, "no caption file (.txt next to the image)")
            continue
        yield Pair(ref, image, txt.read_text(encoding="utf-8", errors="replace"))


def read_pairs(fmt: str, source: str, image_root: str | None = None, image_key: str | None = None,
               caption_key: str | None = None) -> tuple[Iterator[Pair], int | None]:
    """The pairs of a tsv/jsonl/folder source, and how many there are when that is known up front."""
    path = Path(source).expanduser()
    root = Path(image_root).expanduser() if image_root else None
    if fmt == "folder":
        if not path.is_dir():
            raise FileNotFoundError(f"input folder {source} does not exist")
        images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return folder_pairs(path, images), len(images)
    if not path.is_file():
        raise FileNotFoundError(f"input file {source} does not exist")
    if fmt == "tsv":
        return tsv_pairs(path, root), None
    if fmt == "jsonl":
        return jsonl_pairs(path, root, image_key, caption_key), None
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
