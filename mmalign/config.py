"""Typed configuration: a dataclass schema ← a YAML file ← ``key=value`` command-line overrides.

The schema is the source of truth (as in lingua's ``apps/main/train.py`` and TRL's config dataclasses): every
key a user may set is a dataclass field with a type, a default and ``metadata={"help": ...}``. Loading merges
four layers, later ones winning::

    schema defaults  ←  YAML file  ←  dot-list overrides ("optim.lr=1e-5", "stages.0.beta=0.2")  ←  extra

and then converts the merged tree to the schema in one pass that collects *every* problem: unknown keys (with
a did-you-mean), wrong types, values outside a ``Literal`` set, missing required keys, and each section's own
cross-field ``validate()``. One :class:`ConfigError` lists them all, one per line, each naming the key path,
the bad value and what is allowed. Plain dataclasses + ``typing`` + PyYAML; no OmegaConf.

The typed conversion (supported field types, ``validate()`` sections, :class:`ConfigError`) is
:mod:`mmalign.config_convert`; its public names are importable from here too.

Example::

    cfg = load_config(TrainConfig, "configs/dpo_tiny.yaml", overrides=["optim.lr=1e-5"], extra={"seed": 3})
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import json
import os
import pathlib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar, Union

import yaml

from .config_convert import (
    ConfigError,
    _CliText,
    _hints,
    _init_fields,
    _join,
    _parse_text,
    _plain,
    _show,
    _type_name,
    from_dict,
    to_dict,
)

__all__ = ["ConfigError", "apply_overrides", "describe", "dump_yaml", "from_dict", "load_config", "read_yaml",
           "to_dict"]

T = TypeVar("T")


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
