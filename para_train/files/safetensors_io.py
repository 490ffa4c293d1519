"""Named tensors read lazily from safetensors files: a folder's files (sharded with an index or not), by name.
Only safetensors are read: nothing here unpickles files."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from para_train.config import ConfigError

def safetensors_files(folder: str) -> list[Path]:
    root = Path(folder)
    index = sorted(root.glob("*.safetensors.index.json"))
    if index:
        names = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
        hint = f" (found {pickled}: convert them to safetensors; para-train never unpickles weights)" if pickled else ""
        raise ConfigError(f"no .safetensors weights in {folder}{hint}")
    return files


class WeightReader:
    """Lazy read access to the tensors of one or more safetensors files, by name."""

    def __init__(self, files: list[Path], strip_prefixes: tuple[str, ...] = ()):
        from safetensors import safe_open

        self._stack = ExitStack()
        self._where: dict[str, tuple[object, str, Path]] = {}
        for f in files:
            handle = self._stack.enter_context(safe_open(str(f), framework="pt"))
            for key in handle.keys():
                name = key
                for prefix in strip_prefixes:
                    if name.startswith(prefix):
                        name = name[len(prefix):]
                        break
                self._where[name] = (handle, key, Path(f))

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> Iterator[str]:
        return iter(self._where)

    def get(self, name: str) -> torch.Tensor:
        handle, key, _ = self._where[name]
        return handle.get_tensor(key)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file's header (nothing is read)."""
        handle, key, _ = self._where[name]
        return tuple(handle.get_slice(key).get_shape())

    def source(self, name: str) -> tuple[Path, str]:
        """(file, key in the file) of a tensor, to read it again later."""
        _, key, path = self._where[name]
        return path, key

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_weights(folder: str, strip_prefixes: tuple[str, ...] = ()) -> WeightReader:
    return WeightReader(safetensors_files(folder), strip_prefixes)
