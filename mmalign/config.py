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
import math
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

__all__ = ["ConfigError", "ModelFileError", "ModelLoadError", "ModelNotADirectory", "ModelNotFound",
           "ModelRequirementError", "apply_overrides", "describe", "dump_yaml", "from_dict", "load_config",
           "read_yaml", "to_dict"]

T = TypeVar("T")


class ModelLoadError(ConfigError):
    """A model, checkpoint or LoRA setting the config names cannot be used: a missing or incomplete directory,
    corrupt or non-finite weights, a hub id without internet, LoRA targets that match nothing, 4-bit loading
    without bitsandbytes. Each message names the path (or key), the value and the fix. Being a
    :class:`ConfigError`, it reaches ``mmalign train`` as ``error:`` lines and exit status 2, never a traceback.

    The subclasses below are also the built-in error such a failure used to raise (``FileNotFoundError``,
    ``OSError``, ``ImportError``, ``RuntimeError``), so code that catches those keeps working."""


class ModelNotFound(ModelLoadError, FileNotFoundError):
    """No such directory, or a directory without the files of a checkpoint."""


class ModelNotADirectory(ModelLoadError, NotADirectoryError):
    """A file where a checkpoint directory was expected."""


class ModelFileError(ModelLoadError, OSError):
    """Unreadable, truncated or corrupt weights, or a hub id that cannot be reached."""


class ModelRequirementError(ModelLoadError, ImportError, RuntimeError):
    """A loading option whose package or device is missing (4/8-bit needs bitsandbytes and CUDA)."""


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
    """Read a YAML mapping; a missing, binary or non-UTF-8 file, a syntax error or a key given twice in one
    mapping raises :class:`ConfigError` naming the file (and the lines)."""
    path = pathlib.Path(path)
    if not path.is_file():
        what = "is a directory, not a YAML file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file '{path}' {what} (working directory: {os.getcwd()})", str(path))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not a UTF-8 text file (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
                          "; fix: pass a YAML config (a text file such as configs/text/tiny_dpo.yaml), saved as "
                          "UTF-8", str(path)) from None
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # reads the whole text: refuses control characters (NUL, ...) here
        node = loader.get_single_node()
        if node is not None:
            repeated = _repeated_keys(node)
            if repeated:
                raise ConfigError(repeated, str(path))
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError(f"{where}: YAML syntax error: {detail}", str(path)) from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:  # an empty file (or only comments) means "all defaults"
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {_show(data)}", str(path))
    return data


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _repeated_keys(root: yaml.Node) -> list[str]:
    """Every key written twice in one mapping, with its dotted path and both lines. PyYAML keeps the later
    value silently, so a second ``run:`` block would replace the first one without a word. Merge keys
    (``<<: *base``) may be overridden on purpose and are not compared."""
    out: list[str] = []
    seen_nodes: set[int] = set()

    def walk(node: yaml.Node, prefix: str) -> None:
        if id(node) in seen_nodes:  # an alias repeats a node; a recursive anchor would loop
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                    continue
                line = key_node.start_mark.line + 1
                name = _join(prefix, key_node.value)
                slot = (key_node.tag, key_node.value)
                if slot in first:
                    out.append(f"line {line}: key {name!r} is given again (first at line {first[slot]}); the later "
                               "value would silently replace the earlier one; fix: merge the two into one entry")
                else:
                    first[slot] = line
                walk(value_node, name)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, _join(prefix, i))

    walk(root, "")
    return out


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
    bad = _non_finite(schema_cls, data, "")
    try:
        cfg = from_dict(schema_cls, data, source=label)
    except ConfigError as err:
        # A section's own range check may have named the key already, with its range: keep that message.
        extra = [m for k, m, _ in bad if not any(e.startswith(tuple(f"{k}{c}" for c in "=: ")) for e in err.errors)]
        if not extra:
            raise
        raise ConfigError(err.errors + extra, label) from None
    except ArithmeticError:  # a section's validate() that cannot take NaN/inf (round(inf)): check without them
        if not bad:
            raise
        try:
            from_dict(schema_cls, _dropped(data, [at for _, _, at in bad]), source=label)
            rest = []
        except ConfigError as err:
            rest = err.errors
        raise ConfigError([m for _, m, _ in bad] + rest, label) from None
    if bad:
        raise ConfigError([m for _, m, _ in bad], label)
    return cfg


def _floats(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip()) if isinstance(value, str) else None
    except ValueError:
        return None


def _non_finite(cls: type, data: Any, prefix: str, where: tuple = ()) -> list[tuple[str, str, tuple]]:
    """``(key, message, data path)`` for every float-typed value of the merged tree that is NaN or ±inf
    (``optim.lr=inf``, ``run.epochs=nan``, ``.nan`` in YAML): no float of a schema means anything there, and each
    would otherwise surface as a NaN loss steps later. Checked before conversion so that these join every other
    error. The data path is what to drop for a conversion without them (a whole command-line value that held
    one). Free-form mappings (``loss.kwargs``, ``options``, ``model.tiny``) are checked by their readers."""
    out: list[tuple[str, str, tuple]] = []
    if not isinstance(data, Mapping):
        return out
    hints, fields = _hints(cls), _init_fields(cls)
    for name, value in data.items():
        if name not in fields:
            continue
        key, tp = _join(prefix, name), hints[name]
        at = where if where and where[-1] is None else (*where, name)
        if isinstance(value, _CliText):  # "[0.9, nan]" or "[{name: a, lr: nan}]" from the command line
            value, at = _parse_text(value), (*at, None)  # None: drop the whole value, not an item of it
        section, is_list = _section_of(tp)
        if section is not None:
            items = enumerate(value) if is_list and isinstance(value, list) else [(None, value)]
            for i, item in items:
                inner = at if at[-1] is None or i is None else (*at, i)
                out += _non_finite(section, item, key if i is None else _join(key, i), inner)
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1:  # X | None reads as X
            tp, args = args[0], list(typing.get_args(args[0]))
        scalar = tp is float
        listed = typing.get_origin(tp) in (list, tuple) and args[:1] == [float]
        f = fields[name]
        example = f" (default: {_json(f.default)})" if f.default is not dataclasses.MISSING else ""
        if scalar and (x := _floats(value)) is not None and not math.isfinite(x):
            out.append((key, f"{key}={value} must be a finite number{example}", at))
        elif listed and isinstance(value, (list, tuple)):
            out += [(_join(key, i), f"{_join(key, i)}={v} must be a finite number{example}", at)
                    for i, v in enumerate(value) if (x := _floats(v)) is not None and not math.isfinite(x)]
    return out


def _dropped(data: dict, paths: Iterable[tuple]) -> dict:
    """A copy of ``data`` without the values at ``paths`` (their schema defaults apply instead)."""
    out = copy.deepcopy(data)
    for path in paths:
        path = tuple(p for p in path if p is not None)
        node: Any = out
        for part in path[:-1]:
            node = node[part] if isinstance(node, (dict, list)) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


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
