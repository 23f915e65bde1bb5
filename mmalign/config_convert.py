"""The typed half of :mod:`mmalign.config`: a plain tree → a schema dataclass, collecting every problem.

:func:`from_dict` converts in one pass and reports unknown keys (with a did-you-mean), wrong types, values
outside a ``Literal`` set, missing required keys and each section's own cross-field ``validate()`` in one
:class:`ConfigError`; :func:`to_dict` goes back to a plain, YAML-serialisable tree. Reading YAML, dot-list
overrides, defaults merging and ``describe`` live in :mod:`mmalign.config`, which re-exports these names.

Supported field types: bool, int, float (ints accepted), str, pathlib.Path, Enum, ``Literal[...]``,
``X | None``, other unions (members tried in order), ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``,
``dict[K, V]``, ``Any``, nested dataclasses and lists of them. A section may define
``validate(self) -> list[str]``; each message should start with the field it is about (``"warmup_steps (200)
must be <= steps (100)"``) so that the section path can be put in front of it (``optim.warmup_steps ...``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import enum
import functools
import os
import pathlib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, Union

import yaml

from .errors import ConfigError

__all__ = ["ConfigError", "from_dict", "to_dict"]

T = TypeVar("T")
_BAD = object()  # conversion failed; the reason is already in the error list
_NULL_WORDS = {"null", "none", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


class _CliText(str):
    """Override text from the command line, still unparsed. The field's type decides how to read it: a ``str``
    field keeps ``1.10`` verbatim, an ``int`` field reads ``10``, and ``null`` means None only here (a YAML
    file that quotes "null" meant the word)."""


# --------------------------------------------------------------------------------------------- helpers


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _show(value: Any) -> str:
    if isinstance(value, str):
        text = repr(str(value))
    else:
        text = f"{value!r} ({type(value).__name__})"
    return text if len(text) <= 80 else text[:77] + "..."


def _did_you_mean(word: str, options: Iterable[str], render=repr) -> str:
    by_lower = {o.lower(): o for o in options}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(render(by_lower[c]) for c in close)}?)" if close else ""


def _parse_text(text: str) -> Any:
    """YAML-read a command-line value ("[1, 2]", "{a: 1}", "3", "null"); unparsable text stays text."""
    try:
        return yaml.safe_load(str(text))
    except yaml.YAMLError:
        return str(text)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as exc:  # a schema bug, not a user error
        raise TypeError(f"cannot resolve the field types of {cls.__qualname__} ({exc}); "
                        "define schema dataclasses at module level") from exc


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is Union or origin is types.UnionType:
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type_name(args[0])}, ...]"
        inner = ", ".join(_type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", repr(tp))


# ------------------------------------------------------------------------------------------ conversion


def _to_bool(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    word = v.strip().lower() if isinstance(v, str) else None
    return True if word in _TRUE_WORDS else False if word in _FALSE_WORDS else _BAD


def _to_float(v: Any) -> Any:
    if isinstance(v, bool):
        return _BAD
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):  # also catches PyYAML reading `1e-6` (no dot) as a string
        try:
            return float(v.strip())
        except ValueError:
            return _BAD
    return _BAD


def _to_int(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    f = _to_float(v)  # "1e3" and 1000.0 are fine; 0.5 is not
    return int(f) if f is not _BAD and f.is_integer() else _BAD


_SCALARS = {
    bool: (_to_bool, "bool (true/false/yes/no/1/0)"),
    int: (_to_int, "int"),
    float: (_to_float, "float"),
    str: (lambda v: str(v) if isinstance(v, str) else _BAD, "str (quote numbers in YAML)"),
    pathlib.Path: (lambda v: pathlib.Path(v) if isinstance(v, (str, os.PathLike)) else _BAD, "path"),
}


def _same(a: Any, v: Any) -> bool:
    """Equal and of the same kind: 1 must not match True, nor "1" match 1."""
    return a == v and isinstance(a, bool) == isinstance(v, bool) and isinstance(a, str) == isinstance(v, str)


def _convert(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    """Convert ``value`` to ``tp``; on failure append messages to ``errors`` and return ``_BAD``."""
    if tp is Any or tp is object:
        return _parse_text(value) if isinstance(value, _CliText) else value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return _convert_union(tp, args, value, path, errors)
    if value is None:
        errors.append(f"{path}: must not be null; expected {_type_name(tp)}")
        return _BAD
    if origin is Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return _convert_choice(tp, value, path, errors)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, _parse_text(value) if isinstance(value, str) else value, path, errors)
    if tp in _SCALARS:
        reader, expected = _SCALARS[tp]
        out = reader(value)
        if out is _BAD:
            errors.append(f"{path}: expected {expected}, got {_show(value)}")
        return out
    if (origin or tp) in (list, tuple, dict, collections.abc.Sequence, collections.abc.Mapping):
        return _convert_container(origin or tp, args, value, path, errors)
    raise TypeError(f"unsupported field type {tp!r} for {path!r} in the config schema")


def _convert_union(tp: Any, args: tuple, value: Any, path: str, errors: list[str]) -> Any:
    members = [a for a in args if a is not type(None)]
    if len(members) < len(args):  # Optional
        if value is None or (isinstance(value, _CliText) and value.strip().lower() in _NULL_WORDS):
            return None
    if value is None:
        errors.append(f"{path}: must not be null; expected {_type_name(tp)}")
        return _BAD
    if len(members) == 1:
        return _convert(members[0], value, path, errors)
    for member in members:  # declaration order decides, as in pydantic's "left to right" mode
        scratch: list[str] = []
        out = _convert(member, value, path, scratch)
        if out is not _BAD:
            errors.extend(scratch)  # a section that converted but failed its validate()
            return out
    errors.append(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
    return _BAD


def _convert_choice(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    if isinstance(tp, type):  # Enum: accept a member, its value (what to_dict writes) or its name
        if isinstance(value, tp):
            return value
        for m in tp:
            if (isinstance(value, str) and value == m.name) or _same(m.value, value):
                return m
        allowed = [m.value for m in tp]
    else:
        allowed = list(typing.get_args(tp))
        # "1" from the command line must match Literal[1, 2]
        candidates = [value, _parse_text(value)] if isinstance(value, str) else [value]
        for v in candidates:
            for a in allowed:
                if _same(a, v):
                    return a
    hint = _did_you_mean(str(value), [str(a) for a in allowed]) if isinstance(value, str) else ""
    shown = ", ".join(repr(a) for a in allowed)
    errors.append(f"{path}: {_show(value)} is not allowed; allowed values: {shown}{hint}")
    return _BAD


def _convert_container(origin: Any, args: tuple, value: Any, path: str, errors: list[str]) -> Any:
    if isinstance(value, str):
        value = _parse_text(value)  # YAML flow syntax from the command line: [1, 2], {a: 1}
    # Failure is a _BAD item, not a longer error list: a section whose validate() complained still converted.
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            errors.append(f"{path}: expected a mapping, got {_show(value)}")
            return _BAD
        key_tp, val_tp = args or (Any, Any)
        pairs = [(_convert(key_tp, k, f"{path} (key {k!r})", errors),
                  _convert(val_tp, v, _join(path, k), errors)) for k, v in value.items()]
        return _BAD if any(k is _BAD or v is _BAD for k, v in pairs) else dict(pairs)
    if not isinstance(value, (list, tuple)):
        errors.append(f"{path}: expected a list, got {_show(value)}")
        return _BAD
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            errors.append(f"{path}: expected {len(args)} items ({', '.join(map(_type_name, args))}), "
                          f"got {len(value)}: {_show(value)}")
            return _BAD
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(value)
    pairs = enumerate(zip(item_types, value, strict=True))
    items = [_convert(t, v, _join(path, i), errors) for i, (t, v) in pairs]
    if any(item is _BAD for item in items):
        return _BAD
    return tuple(items) if origin is tuple else items


def _prefix(path: str, message: str, names: Iterable[str]) -> str:
    if not path:
        return message
    head = re.split(r"\W", message, maxsplit=1)[0]
    return f"{path}.{message}" if head in names else f"{path}: {message}"


def _build(cls: type, data: Any, path: str, errors: list[str]) -> Any:
    where = path or "<top level>"
    if not isinstance(data, Mapping):
        errors.append(f"{where}: expected a mapping of {cls.__name__} keys, got {_show(data)}")
        return _BAD
    fields, hints = _init_fields(cls), _hints(cls)
    for key in data:
        if key not in fields:
            section = repr(path) if path else "the top level"
            hint = _did_you_mean(str(key), fields, render=lambda c: repr(_join(path, c)))
            valid = ", ".join(fields)
            errors.append(f"unknown key {_join(path, key)!r}{hint}; valid keys of {section}: {valid}")
    kwargs, complete = {}, True
    for name, f in fields.items():
        if name in data:
            out = _convert(hints[name], data[name], _join(path, name), errors)
            complete &= out is not _BAD
            kwargs[name] = out
        elif not _has_default(f):
            errors.append(f"{_join(path, name)}: required key is missing ({_type_name(hints[name])})")
            complete = False
    if not complete:  # cross-field checks need every field typed; siblings are still checked
        return _BAD
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a __post_init__ that raises
        errors.append(f"{where}: {exc}")
        return _BAD
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            problems = list(check() or [])
        except ValueError as exc:
            problems = [str(exc)]
        errors.extend(_prefix(path, str(p), fields) for p in problems)
    # Returned even when validate() complained, so that enclosing sections still run their own checks.
    return obj


# -------------------------------------------------------------------------------------------- public API


def from_dict(schema_cls: type[T], data: Mapping[str, Any], *, source: str | None = None) -> T:
    """Build ``schema_cls`` from a plain mapping, checking everything; raise one :class:`ConfigError`."""
    if not (isinstance(schema_cls, type) and dataclasses.is_dataclass(schema_cls)):
        raise TypeError(f"schema_cls must be a dataclass type, got {schema_cls!r}")
    errors: list[str] = []
    cfg = _build(schema_cls, data, "", errors)
    if errors:
        raise ConfigError(errors, source)
    return cfg


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, str):
        return str(value)  # drops the _CliText marker
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-serialisable tree of a config (enums by value, paths and tuples as str/list)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict expects a dataclass instance, got {cfg!r}")
    return _plain(cfg)
