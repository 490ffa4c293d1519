"""Prompt files for `para-train generate`, by extension:

    .txt    one paragraph per line; blank lines are skipped
    .jsonl  one JSON object per line with the paragraph under "prompt" (or "caption" / "text"),
            optionally "id" and "category"
    .csv    the ParaPrompts-400 layout: a header Image,Prompt,Category,Prompt_Chinese, then one row per
            prompt (a quoted field may span lines); Image becomes the id

A malformed file raises `PromptFileError` naming the file and line.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

PARAPROMPTS_HEADER = ("Image", "Prompt", "Category", "Prompt_Chinese")
_JSON_KEYS = ("prompt", "caption", "text")


class PromptFileError(ValueError):
    pass


@dataclass
class Prompt:
    text: str
    line: int  # where it starts in the file, from 1
    id: str | None = None
    category: str | None = None


def read_prompts(path: str | Path) -> list[Prompt]:
    path = Path(path)
    readers = {".txt": _read_text, ".jsonl": _read_jsonl, ".csv": _read_csv}
    if path.suffix.lower() not in readers:
        raise PromptFileError(f"{path}: unknown prompt file type {path.suffix!r}; use .txt (one paragraph per line), "
                              ".jsonl ({\"prompt\": ...} per line) or .csv (the ParaPrompts-400 layout)")
    if not path.is_file():
        raise PromptFileError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerates the byte-order mark spreadsheets write
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise PromptFileError(f"{path}:{line}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    prompts = readers[path.suffix.lower()](path, text)
    if not prompts:
        raise PromptFileError(f"{path}: holds no prompts")
    return prompts


def _read_text(path: Path, text: str) -> list[Prompt]:
    return [Prompt(line.strip(), n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _read_jsonl(path: Path, text: str) -> list[Prompt]:
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise PromptFileError(f"{path}:{n}: expected a JSON object such as {{\"prompt\": \"...\"}}, got "
                                  f"{type(obj).__name__}")
        key = next((k for k in _JSON_KEYS if k in obj), None)
        if key is None or not isinstance(obj[key], str) or not obj[key].strip():
            raise PromptFileError(f"{path}:{n}: no non-empty \"prompt\" string in this object (keys: "
                                  f"{', '.join(sorted(obj)) or 'none'})")
        prompts.append(Prompt(obj[key].strip(), n, _optional_str(obj.get("id")), _optional_str(obj.get("category"))))
    return prompts


def _optional_str(value) -> str | None:
    return None if value is None else str(value)


def _read_csv(path: Path, text: str) -> list[Prompt]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or [h.strip() for h in header][:2] != list(PARAPROMPTS_HEADER[:2]):
            raise PromptFileError(f"{path}:1: expected the ParaPrompts-400 header {','.join(PARAPROMPTS_HEADER)}, got "
                                  f"{','.join(header or [])!r}")
        columns = {name.strip(): i for i, name in enumerate(header)}
        prompts, start = [], reader.line_num + 1
        for row in reader:
            if any(cell.strip() for cell in row):
                prompts.append(_csv_prompt(path, start, row, columns, len(header)))
            start = reader.line_num + 1
    except csv.Error as e:
        raise PromptFileError(f"{path}:{reader.line_num}: {e}") from None
    return prompts


def _csv_prompt(path: Path, line: int, row: list[str], columns: dict[str, int], width: int) -> Prompt:
    if len(row) != width:
        raise PromptFileError(f"{path}:{line}: {len(row)} fields where the header has {width}; quote fields that "
                              "contain commas or line breaks")
    text = row[columns["Prompt"]].strip()
    if not text:
        raise PromptFileError(f"{path}:{line}: the Prompt field is empty")
    category = row[columns["Category"]].strip() if "Category" in columns else None
    return Prompt(text, line, row[columns["Image"]].strip() or None, category or None)
