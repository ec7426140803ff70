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
    required = [f.name for f in dataclasses.fields(cls) if f.init and
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:  # else a TypeError from the constructor, naming neither the file nor the key
        raise ValueError(f"{source}: missing key(s) {missing} for {cls.__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if typing.get_origin(hints[key]) is tuple and not isinstance(value, (list, tuple)):
            raise ValueError(f"{source}: {key}={value!r} is not a list")
        sub = _dataclass_type(hints[key])
        if sub is not None and isinstance(value, dict):
            value = load_dataclass(sub, value, source=f"{source}:{key}")
        elif sub is not None and value is not None and not isinstance(value, (sub, list, tuple)):
            raise ValueError(f"{source}: {key}={value!r} is not a mapping (section {sub.__name__})")
        elif isinstance(value, list):
            value = tuple(value)
        elif _accepts_float(hints[key]) and isinstance(value, (int, str)) and not isinstance(value, bool):
            # PyYAML reads `3e-4` (no dot) as a string; a float field takes it as the number it is.
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{source}: {key}={value!r} is not a number") from None
        _check_scalar(source, key, value, hints[key])
        kwargs[key] = value
    return cls(**kwargs)


_SCALARS = {int: "an integer", bool: "true or false", str: "a string"}


def _check_scalar(source: str, key: str, value: Any, hint: Any) -> None:
    """An int/bool/str field must get one (``train_steps: ten`` names the key, instead of failing
    later inside ``__post_init__`` with a comparison error that names nothing)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    kinds = [hint] if not args else [a for a in args if a is not type(None)]
    if len(kinds) != 1 or kinds[0] not in _SCALARS or (value is None and optional):
        return
    kind = kinds[0]
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise ValueError(f"{source}: {key}={value!r} is not {_SCALARS[kind]}")


def load_yaml(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        with path.open() as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:  # one line naming the file, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot be read as YAML ({first})") from None
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
