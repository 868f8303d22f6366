"""Configs as files: a frozen config dataclass to and from a dict, YAML / JSON config files, run manifests.

Every verb's settings are one frozen dataclass (nested dataclasses allowed). ``--config FILE`` gives
them as YAML or JSON, partly or whole; a run folder's ``manifest.json`` is such a file too (its
``config`` and ``model`` sections), so a finished run can be given back to run it again. Precedence
is lm-evaluation-harness's: command line > file > defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import DoriError

C = TypeVar("C")


def to_dict(config: Any) -> dict:
    """A config dataclass as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _convert(value: Any, kind: Any, where: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, where)
            except DoriError as exc:
                errors.append(str(exc))
        raise DoriError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, dict):
            raise DoriError(f"{where}: expected a mapping of {kind.__name__}'s fields, got {value!r}")
        return from_dict(kind, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise DoriError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise DoriError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise DoriError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise DoriError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | str | float):
            raise DoriError(f"{where}: expected an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise DoriError(f"{where}: expected an integer, got {value!r}") from None
        if not math.isfinite(number) or number != int(number):
            raise DoriError(f"{where}: expected an integer, got {value!r}")
        return int(number)
    if kind is float:
        if isinstance(value, bool):
            raise DoriError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise DoriError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise DoriError(f"{where}: expected a finite number, got {value!r}")
        return number
    if kind is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise DoriError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def read_text(path: str | Path, field: str, what: str = "a text file") -> str:
    """The UTF-8 text of ``path``; a DoriError naming ``field`` if it is not text (an image, random bytes)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DoriError(f"{field}: {path} is not {what} (it is not UTF-8 text)") from None


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's init fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type[C], data: dict, where: str = "config") -> C:
    """Build ``cls`` from (possibly partial) ``data``; missing fields keep their defaults, unknown ones are
    refused with a message naming the field and what is allowed."""
    if not isinstance(data, dict):
        raise DoriError(f"{where}: expected a mapping, got {type(data).__name__}")
    types_ = field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        raise DoriError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(types_)})")
    return cls(**{k: _convert(v, types_[k], f"{where}.{k}" if where != "config" else k) for k, v in data.items()})


def merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` laid over it, nested mappings merged key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def set_path(data: dict, path: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``path = "a.b"``, creating the mappings on the way."""
    *parents, last = path.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[last] = value


def read_config_file(path: str | Path, command: str | None = None) -> tuple[dict, dict]:
    """``(config, model)`` from a YAML or JSON file; a run's ``manifest.json`` gives its ``config`` and
    ``model`` sections (and must be of ``command``); any other file is the config itself, except its
    top-level ``model`` (a path or hub id), ``device``, ``dtype`` and ``scheduler``, which form the
    model section."""
    path = Path(path)
    if path.is_dir() and (path / "manifest.json").is_file():
        path = path / "manifest.json"
    if not path.is_file():
        raise DoriError(f"config: {path} does not exist (give a YAML or JSON file, or a run folder's manifest.json)")
    text = read_text(path, "config", "a YAML or JSON file")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: one line naming the file
        raise DoriError(f"config: {path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                        f"({type(exc).__name__})") from exc
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise DoriError(f"config: {path} must hold a mapping of settings, not {type(data).__name__}")
    if "config_hash" in data and "config" in data:  # a run manifest
        if command is not None and data.get("command") != command:
            raise DoriError(f"config: {path} is the manifest of a `{data.get('command')}` run, not of `{command}`")
        return dict(data["config"]), dict(data.get("model") or {})
    model = {key: data.pop(name) for name, key in (("model", "location"), ("device", "device"), ("dtype", "dtype"),
                                                   ("scheduler", "scheduler"), ("model_config", "model_config")) if name in data}
    if isinstance(model.get("location"), dict):  # ``model: {location: ..., dtype: ...}``
        model = {**model.pop("location"), **model}
    return data, model
