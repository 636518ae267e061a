"""Typed configuration: dataclasses filled from YAML plus `key.sub=value` overrides.

Every config is a tree of (frozen-free) dataclasses. Loading walks the tree, so an unknown key
or a value of the wrong type is an error that names the full key path and lists the valid keys.
A dataclass with a `SHORTHAND_FIELD` class attribute also reads a plain string, as that field.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's dataclass."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    """Convert a YAML value to `annotation`, or raise ConfigError naming `path`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"`{path}`: {value!r} fits none of {args}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"`{path}` must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        shorthand = getattr(annotation, "SHORTHAND_FIELD", None)
        if shorthand is not None and isinstance(value, str):  # `name` for `{shorthand: name}`
            value = {shorthand: value}
        if not isinstance(value, dict):
            raise ConfigError(f"`{path}` must be a mapping of {annotation.__name__} fields, got {value!r}")
        return from_dict(annotation, value, prefix=path)
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{path}` must be a list, got {value!r} (a list of one: [{value}])")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or annotation is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"`{path}` must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"`{path}` must be a bool (true/false), got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"`{path}` must be an int, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"`{path}` must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"`{path}` must be a string, got {value!r}")
    return value


def _known_field_types(cls, data: dict, prefix: str) -> dict[str, Any]:
    """`cls`'s field types; a key of `data` that is not a field raises ConfigError naming it."""
    types_by_name = _field_types(cls)
    unknown = sorted(set(data) - set(types_by_name))
    if unknown:
        where = f"`{prefix}`" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key {_join(prefix, unknown[0])!r} at {where}; "
            f"valid keys: {', '.join(sorted(types_by_name))}"
        )
    return types_by_name


def from_dict(cls: type[T], data: dict, *, prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError."""
    types_by_name = _known_field_types(cls, data, prefix)
    kwargs = {name: _coerce(value, types_by_name[name], _join(prefix, name)) for name, value in data.items()}
    return _construct(cls, kwargs, prefix)


def _construct(cls: type[T], kwargs: dict, prefix: str) -> T:
    """`cls(**kwargs)`; a ValueError of the section's own checks (at key `prefix`) becomes a
    ConfigError naming the field by its full key (`dpo.loss_type`, not `loss_type`)."""
    if not prefix:
        return cls(**kwargs)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        message = str(err)
        match = re.match(r"`(\w+)`", message)
        if match and match.group(1) in {field.name for field in dataclasses.fields(cls)}:
            raise ConfigError(f"`{prefix}.{match.group(1)}`{message[match.end():]}") from None
        if message.startswith(f"`{prefix}"):  # already names the full key
            raise ConfigError(message) from None
        raise ConfigError(f"`{prefix}`: {message}") from None


def to_dict(config) -> dict:
    """The config as plain nested dicts/lists (YAML-serialisable)."""
    return _lists(dataclasses.asdict(config))


def _lists(value: Any) -> Any:
    """Tuples to lists, recursively (YAML safe_dump writes lists only)."""
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(item) for item in value]
    return value


def to_yaml(config) -> str:
    """The config as YAML, keys in field order: a file `load_config` reads back to `config`."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], value), the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Set each `key.sub=value` in a nested dict (creating intermediate mappings)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: `{key}` is not a mapping")
            node = child
        node[keys[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load `cls` from a YAML file (or defaults when `path` is None) and apply overrides.

    Errors name the offending key and where it comes from: the file, or `command line` when
    the file alone loads and an override is at fault.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: byte 0x{err.object[err.start]:02x} at offset {err.start} is not "
                              f"valid UTF-8 (is this a YAML file?)") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    file_data = copy.deepcopy(data)
    data = apply_overrides(data, overrides)
    try:
        return _merge_defaults(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{config_source(path, overrides, lambda: _merge_defaults(cls, file_data))}{err}") from None


def config_source(path, overrides: Sequence[str], load_file_alone) -> str:
    """The prefix of an error in a config loaded from `path` plus `overrides`: `command line: `
    when `load_file_alone()` (loading and checking the file without the overrides) succeeds,
    so an override is at fault, else `<path>: ` ("" without a file)."""
    if path is None:
        return ""
    if overrides:
        try:
            load_file_alone()
        except (ValueError, TypeError):
            pass
        else:
            return "command line: "
    return f"{path}: "


def _merge_defaults(cls: type[T], data: dict, prefix: str = "") -> T:
    """Like from_dict, but nested dataclass fields absent from `data` keep their defaults
    while present ones are merged field by field."""
    types_by_name = _known_field_types(cls, data, prefix)
    kwargs = {}
    for name, value in data.items():
        annotation = types_by_name[name]
        if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            kwargs[name] = _merge_defaults(annotation, value, _join(prefix, name))
        else:
            kwargs[name] = _coerce(value, annotation, _join(prefix, name))
    return _construct(cls, kwargs, prefix)
