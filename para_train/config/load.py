"""Reading a config: defaults < stage defaults < YAML < overrides, each value checked against its field's type
(and `Literal` choices) as it is read; saving and re-reading a run's config.yaml."""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from para_train.config.keys import STAGE_DEFAULTS, Config, ConfigError, require


def _resolve_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint: Any) -> str:
    """A type as an error message names it."""
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    names = {str: "a string (e.g. a folder)", int: "an integer", float: "a number", bool: "true or false",
             dict: "a mapping", list: "a list"}
    return names.get(typing.get_origin(hint) or hint, getattr(hint, "__name__", str(hint)))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check (and gently convert) a YAML/CLI value against a dataclass field's type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            require(type(None) in args, key, "may not be null")
            return None
        errors, alternatives = [], [a for a in args if a is not type(None)]
        for arg in alternatives:
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        nested = [e for e in errors if not e.startswith(f"{key}: ")]  # e.g. a list's item: the precise one
        if len(alternatives) == 1 or nested:
            raise ConfigError((nested or errors)[0])
        raise ConfigError(f"{key}: expected {' or '.join(map(_describe, alternatives))}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        # by type too: YAML's true is not the 1 of Literal[1, 2, 3], nor "1" (quoted) of it
        require(any(value == c and type(value) is type(c) for c in choices), key,
               f"must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        require(isinstance(value, dict), key, f"expected a mapping of {hint.__name__} fields, got {value!r}")
        return _build(hint, value, key)
    if origin is list:
        require(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        require(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        require(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        require(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {hint} at {key}")


def _build(cls, data: dict, prefix: str = ""):
    hints = _resolve_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"{full}: unknown key; valid keys here are: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def _seed_mapping(tree: dict, dotted: str) -> None:
    """`model.unet.config.cross_attention_dim=48` changes one entry of the mapping the config holds so far (e.g. the
    tiny UNet's, filled in by UNetConfig), not the whole mapping: a mapping field the tree does not hold yet
    starts as the value it would have been built with."""
    parts, cls, node = dotted.split("."), Config, tree
    for i, part in enumerate(parts[:-1]):
        hint = _resolve_hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if hint is None:
            return
        if dataclasses.is_dataclass(hint):
            cls, node = hint, node.get(part) if isinstance(node, dict) else None
            continue
        if dict not in (hint, *typing.get_args(hint)) or (isinstance(node, dict) and part in node):
            return
        try:
            built = _build(Config, tree)
        except ConfigError:  # reported with the final config
            return
        for p in parts[:i + 1]:
            built = getattr(built, p)
        if isinstance(built, dict):
            _set_dotted(tree, ".".join(parts[:i + 1]), copy.deepcopy(built))
        return


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("config",):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.steps=100")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return key.strip(), value


def load_config(stage: int, config_file: str | None = None, overrides: list[str] = ()) -> Config:
    """The one way a Config is made: defaults < stage defaults < YAML < overrides, then validated."""
    tree: dict = {}
    for key, value in STAGE_DEFAULTS[stage].items():
        _set_dotted(tree, key, value)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config: file {config_file} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {config_file}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {config_file}: expected a mapping of sections (run:, model:, ...)")
        file_stage = (data.get("run") or {}).get("stage")
        if file_stage is not None and file_stage != stage:
            raise ConfigError(f"run.stage: {config_file} is a stage {file_stage} config but --stage {stage} was given; "
                              f"use --stage {file_stage} or another config")
        tree = _deep_merge(tree, data)
    for text in overrides:
        key, value = parse_override(text)
        if key == "run.stage" and value != stage:
            raise ConfigError("run.stage: set the stage with --stage, not as an override")
        _seed_mapping(tree, key)
        _set_dotted(tree, key, value)
    _set_dotted(tree, "run.stage", stage)
    return _build(Config, tree)


def save_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved by `save_config` (used by export and resume checks)."""
    return _build(Config, data)
