"""Strict construction of frozen dataclass configs from YAML / dicts / ``key=value`` overrides.

Why: a typo in a config key must be an error naming the key, not a silently ignored setting
(CONVENTIONS.md #5). Nested dataclass fields are built recursively.

Example::

    cfg = load_dataclass(TrainConfig, yaml.safe_load(open("run.yaml")), source="run.yaml")
    cfg = apply_overrides(cfg, ["optim.lr=3e-4", "train_steps=100"])
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def load_dataclass(cls: type[T], data: dict[str, Any] | None, *, source: str = "config") -> T:
    """Build ``cls`` from ``data``; unknown keys raise ``ValueError`` naming them and ``source``."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; valid: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        sub = _dataclass_type(hints[key])
        if sub is not None and isinstance(value, dict):
            value = load_dataclass(sub, value, source=f"{source}:{key}")
        elif isinstance(value, list):
            value = tuple(value)
        elif _accepts_float(hints[key]) and isinstance(value, (int, str)) and not isinstance(value, bool):
            # PyYAML reads `3e-4` (no dot) as a string; a float field takes it as the number it is.
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{source}: {key}={value!r} is not a number") from None
        kwargs[key] = value
    return cls(**kwargs)


def load_yaml(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    with path.open() as f:
        data = yaml.safe_load(f)
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return load_dataclass(cls, data, source=str(path))


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Apply ``a.b=value`` overrides (value parsed as YAML) to a nested frozen dataclass."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a config section")
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(f"--set {item!r}: unknown key {key!r}")
        node[parts[-1]] = yaml.safe_load(raw)
    return load_dataclass(type(cfg), data, source="--set")


def _accepts_float(hint: Any) -> bool:
    return hint is float or (float in typing.get_args(hint) and int not in typing.get_args(hint))


def _dataclass_type(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None
