"""Typed configs from YAML files and ``section.field=value`` overrides (used by the CLI).

Values are parsed as YAML scalars/lists and checked against the dataclass
field's type, so ``--set download.timeout=5`` gives an ``int`` and a typo in a
field name is a ``ValueError`` naming the field and the fields that exist.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} does not fit {hint}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float, str):
        if hint is str:
            return str(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
        if hint is int and float(value) != int(value):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return hint(value)
    return value


def build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a dict, coercing and checking each field."""
    types = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types:
            raise ValueError(f"{where or cls.__name__}: unknown field {key!r}; fields are {sorted(types)}")
        hint = types[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value or {}, f"{where}.{key}" if where else key)
        else:
            kwargs[key] = _coerce(value, hint, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["download.timeout=5", "filter.exact_dedup=false"]`` -> ``{"download": {"timeout": 5}, ...}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot or not field:
            raise ValueError(
                f"override {item!r} must look like section.field=value (e.g. download.timeout=5)"
            )
        out.setdefault(section, {})[field] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def load_sections(config_file: str | Path | None, overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Sections from a YAML file (``download:``, ``filter:``…) with ``overrides`` applied on top."""
    sections: dict[str, dict[str, Any]] = {}
    if config_file:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping of sections, got {type(loaded).__name__}")
        sections = {k: dict(v or {}) for k, v in loaded.items()}
    for section, fields in parse_overrides(overrides).items():
        sections.setdefault(section, {}).update(fields)
    return sections


def train_config_from_yaml(cls: type, text: str, where: str = "YAML") -> Any:
    """A training config ``cls`` (a ``model`` field + training fields, with ``from_dict``) from YAML text
    with ``model:`` and ``train:`` sections; unknown sections or fields are a ``ValueError`` naming ``where``."""
    loaded = yaml.safe_load(text) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{where}: expected a mapping with model: and train: sections")
    unknown = sorted(set(loaded) - {"model", "train"})
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; sections are ['model', 'train']")
    train = dict(loaded.get("train") or {})
    if "model" in train:
        raise ValueError(f"{where}: 'model' belongs in its own section, not under train:")
    try:
        return cls.from_dict({"model": loaded.get("model") or {}, **train})
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def load_train_preset(cls: type, family: str, label: str, name: str, presets: tuple[str, ...]) -> Any:
    """The checked-in preset ``dalle_lightning/presets/<family>/<name>.yaml`` as a ``cls`` training config."""
    from importlib import resources

    if name not in presets:
        raise ValueError(f"unknown {label} preset {name!r}; presets are {list(presets)}")
    text = resources.files("dalle_lightning").joinpath("presets", family, f"{name}.yaml").read_text()
    return train_config_from_yaml(cls, text, where=f"preset {name!r}")
