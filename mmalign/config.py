"""Typed configuration: a dataclass schema ← a YAML file ← ``key=value`` command-line overrides.

The schema is the source of truth (as in lingua's ``apps/main/train.py`` and TRL's config dataclasses): every
key a user may set is a dataclass field with a type, a default and ``metadata={"help": ...}``. Loading merges
four layers, later ones winning::

    schema defaults  ←  YAML file  ←  dot-list overrides ("optim.lr=1e-5", "stages.0.beta=0.2")  ←  extra

and then converts the merged tree to the schema in one pass that collects *every* problem: unknown keys (with
a did-you-mean), wrong types, values outside a ``Literal`` set, missing required keys, and each section's own
cross-field ``validate()``. One :class:`ConfigError` lists them all, one per line, each naming the key path,
the bad value and what is allowed. Plain dataclasses + ``typing`` + PyYAML; no OmegaConf.

Supported field types: bool, int, float (ints accepted), str, pathlib.Path, Enum, ``Literal[...]``,
``X | None``, other unions (members tried in order), ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]``,
``dict[K, V]``, ``Any``, nested dataclasses and lists of them. A section may define
``validate(self) -> list[str]``; each message should start with the field it is about (``"warmup_steps (200)
must be <= steps (100)"``) so that the section path can be put in front of it (``optim.warmup_steps ...``).

Example::

    cfg = load_config(TrainConfig, "configs/dpo_tiny.yaml", overrides=["optim.lr=1e-5"], extra={"seed": 3})
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import difflib
import enum
import functools
import json
import os
import pathlib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = ["ConfigError", "apply_overrides", "describe", "dump_yaml", "from_dict", "load_config", "read_yaml",
           "to_dict"]

T = TypeVar("T")
_BAD = object()  # conversion failed; the reason is already in the error list
_NULL_WORDS = {"null", "none", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """Every problem found in one config, one line each (``.errors``), with the source when known."""

    def __init__(self, errors: str | Iterable[str], source: str | None = None):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        n = len(self.errors)
        where = f" ({source})" if source else ""
        head = f"invalid config{where}: {n} error{'' if n == 1 else 's'}"
        super().__init__("\n".join([head, *(f"  - {e}" for e in self.errors)]))

    def __reduce__(self):  # keep errors/source through pickling (multiprocessing, accelerate launchers)
        return type(self), (self.errors, self.source)


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


def _set_dotted(root: dict, key: str, value: Any) -> str | None:
    """Set ``root[a][b]...`` for key "a.b..." (list entries by index); return a problem message or None."""
    parts = key.split(".")
    if "" in parts:
        return f"key {key!r} has an empty component"
    node: Any = root
    for i, part in enumerate(parts):
        where = repr(".".join(parts[:i])) if i else "the top level"
        if isinstance(node, list):
            if not part.isdigit():
                return f"{where} is a list; index it with a number 0..{len(node) - 1}, not {part!r}"
            slot: Any = int(part)
            if slot >= len(node):
                return f"index {slot} is out of range: {where} has {len(node)} entries"
        elif isinstance(node, dict):
            slot = part
        else:
            return f"{where} holds {_show(node)}, which has no key {part!r}"
        if i == len(parts) - 1:
            node[slot] = value
            return None
        child = node[slot] if isinstance(node, list) else node.get(slot)
        if child is None:  # a section left at None (or not yet present) gets created
            child = node[slot] = {}
        elif isinstance(child, _CliText) and isinstance(parsed := _parse_text(child), (dict, list)):
            child = node[slot] = parsed  # "optim={lr: 1}" followed by "optim.steps=3"
        node = child
    return None


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key.sub=value`` overrides applied; ``stages.0.lr=1e-5`` indexes lists.

    Values stay text here; :func:`from_dict` reads each by its field's type (YAML flow syntax for lists and
    mappings, ``null``/``none`` for None). Every malformed token is reported in one :class:`ConfigError`.
    """
    out = copy.deepcopy(dict(data))
    errors = []
    for token in [overrides] if isinstance(overrides, str) else overrides:
        key, eq, text = str(token).partition("=")
        if not eq or not key.strip():
            errors.append(f"override {token!r} is not of the form key=value (for example optim.lr=1e-5)")
            continue
        problem = _set_dotted(out, key.strip(), _CliText(text))
        if problem:
            errors.append(f"override {token!r}: {problem}")
    if errors:
        raise ConfigError(errors, "command-line overrides")
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a syntax error raises :class:`ConfigError` naming the file."""
    path = pathlib.Path(path)
    if not path.is_file():
        what = "is a directory, not a YAML file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file '{path}' {what} (working directory: {os.getcwd()})", str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError(f"{where}: YAML syntax error: {detail}", str(path)) from None
    if data is None:  # an empty file (or only comments) means "all defaults"
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {_show(data)}", str(path))
    return data


def _defaults(cls: type) -> dict[str, Any]:
    """The schema defaults as a plain tree, so that overrides can index into default lists and sections."""
    out, hints = {}, _hints(cls)
    for name, f in _init_fields(cls).items():
        if f.default is not dataclasses.MISSING:
            out[name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[name] = _plain(f.default_factory())
        elif dataclasses.is_dataclass(hints[name]):  # required section: its own defaults still apply
            out[name] = _defaults(hints[name])
    return out


def _merge(base: dict, update: Mapping) -> dict:
    """Deep-merge mappings; anything else (lists included) in ``update`` replaces the base value."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def load_config(schema_cls: type[T], source: str | os.PathLike | Mapping[str, Any] | None = None,
                overrides: Iterable[str] = (), *, extra: Mapping[str, Any] | None = None) -> T:
    """Load ``schema_cls``: defaults ← YAML file (or a mapping) ← ``overrides`` ← ``extra``.

    Args:
        source: a YAML file path, an already-parsed mapping, or None for the schema defaults.
        overrides: command-line dot-list tokens such as ``["optim.lr=1e-5", "stages.1.beta=0.2"]``.
        extra: python-side overrides keyed by dotted path (``{"optim.steps": 2}``); values are used as given,
            not parsed from text, so ``{"run_name": "1.10"}`` stays a string.
    """
    data = _defaults(schema_cls)
    label = None
    if isinstance(source, Mapping):  # _plain: dataclass/enum values inside become keys overrides can reach
        _merge(data, _plain(source))
    elif source is not None:
        _merge(data, read_yaml(source))
        label = str(source)
    if overrides:
        data = apply_overrides(data, overrides)
        label = f"{label} + command line" if label else "command line"
    if extra:
        problems = [f"extra override {k!r}: {p}" for k, v in extra.items()
                    if (p := _set_dotted(data, str(k), _plain(copy.deepcopy(v))))]
        if problems:
            raise ConfigError(problems, label)
    return from_dict(schema_cls, data, source=label)


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


def dump_yaml(cfg: Any, path: str | os.PathLike, *, header: str | None = None) -> pathlib.Path:
    """Write ``cfg`` as YAML (field order kept); ``header`` lines become leading ``#`` comments."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
    if header:
        text = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + text
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _section_of(tp: Any) -> tuple[type | None, bool]:
    """The dataclass inside ``tp`` (a section, optional section or list of them) and whether it is a list."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if (origin is Union or origin is types.UnionType) and len(args) == 1:
        tp, origin, args = args[0], typing.get_origin(args[0]), list(typing.get_args(args[0]))
    if dataclasses.is_dataclass(tp):
        return tp, False
    if origin in (list, tuple, collections.abc.Sequence) and args and dataclasses.is_dataclass(args[0]):
        return args[0], True
    return None, False


def _json(value: Any) -> str:
    return json.dumps(_plain(value), default=str)


def _first_doc_line(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    # dataclass() fills a missing docstring with the signature, which is no help to a user.
    return "" if not doc or doc.startswith(cls.__name__ + "(") else doc.splitlines()[0]


def describe(schema_cls: type) -> str:
    """A help listing of every key: dotted path, type, default and the field's ``metadata["help"]``."""
    lines: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        for name, f in _init_fields(cls).items():
            key, tp = _join(prefix, name), hints[name]
            section, is_list = _section_of(tp)
            if f.default is not dataclasses.MISSING:
                default = f" = {_json(f.default)}"
            elif f.default_factory is not dataclasses.MISSING:  # a section's own keys show its defaults
                default = "" if section and not is_list else f" = {_json(f.default_factory())}"
            else:
                default = " (required)"
            lines.append(f"{key}: {_type_name(tp)}{default}")
            doc = f.metadata.get("help") or (_first_doc_line(section) if section else "")
            if doc:
                lines.append(f"    {doc}")
            if section is not None:
                walk(section, f"{key}.N" if is_list else key)

    walk(schema_cls, "")
    return "\n".join(lines)
