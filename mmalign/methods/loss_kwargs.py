"""``loss.kwargs`` values checked at config load: types, finiteness, allowed names, and the loss's own checks.

Without this a bad value (``loss_type=bogus``, ``beta=nan``, ``beta=abc``, ``beta=-1``) surfaced at step 1, after
the model was built and the output folder written, as a traceback. Three passes, all errors reported together:

1. **type** — from the pure loss's annotation (``float``, ``int | None``, ``str | Sequence[str]`` …), or from the
   row default's type for rows whose options are their defaults (the dual-encoder rows); numbers must be finite.
2. **allowed names** — the losses' own tables (:data:`CHOICES`: ``DPO_LOSS_TYPES``, ``CPO_LOSS_TYPES``, …),
   referenced, never copied, so a loss type added to a loss is accepted here at once.
3. **the loss's own check** — once the values have the right types, the pure loss is called on a two-example
   dummy batch (:data:`PROBES`) with the options, and its ``ValueError`` (``beta=-1 must be > 0``,
   ``label_smoothing`` outside the range of the ``loss_type``, ``loss_weights`` of the wrong length …) becomes a
   config error. Ranges therefore live in one place, the loss.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Collection, Mapping
from numbers import Real

import torch

from .. import losses as L
from ..losses import clip_tuning, reference_free, regularizers, token_level, unpaired

__all__ = ["CHOICES", "PROBES", "check_option_values", "default_options", "expected_kinds"]

# (pure loss or row name, option) → the loss's own table of allowed values.
CHOICES: dict[tuple[object, str], Collection[str]] = {
    (L.dpo, "loss_type"): L.DPO_LOSS_TYPES,
    (L.dpo, "f_divergence"): L.F_DIVERGENCES,
    (L.cpo, "loss_type"): reference_free.CPO_LOSS_TYPES,
    (L.kto, "loss_type"): unpaired.KTO_LOSS_TYPES,
    (L.tdpo, "variant"): token_level._TDPO_VARIANTS,
    (L.nll, "reduction_over_tokens"): regularizers._TOKEN_REDUCTIONS,
    ("clip_refine", "rafa_distance"): clip_tuning._RAFA_DISTANCES,
    ("zscl", "divergence"): clip_tuning._ZSCL_DIVERGENCES,
}


def _z(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


def _n() -> torch.Tensor:
    return torch.ones(2)


_LABELS = torch.tensor([True, False])
_TOK = (2, 3)
# pure loss → a call on a two-example dummy batch (only the options vary; the tensors are valid inputs).
PROBES: dict[Callable, Callable[[dict], object]] = {
    L.dpo: lambda kw: L.dpo(_z(2), _z(2), _z(2), _z(2), chosen_lengths=_n(), rejected_lengths=_n(), **kw),
    L.simpo: lambda kw: L.simpo(_z(2), _z(2), chosen_lengths=_n(), rejected_lengths=_n(), **kw),
    L.alphapo: lambda kw: L.alphapo(_z(2), _z(2), chosen_lengths=_n(), rejected_lengths=_n(), **kw),
    L.cpo: lambda kw: L.cpo(_z(2), _z(2), chosen_lengths=_n(), rejected_lengths=_n(), nll_loss=_z(2), **kw),
    L.orpo: lambda kw: L.orpo(_z(2) - 1, _z(2) - 1, chosen_lengths=_n(), rejected_lengths=_n(), nll_loss=_z(2),
                              **kw),
    L.slic: lambda kw: L.slic(_z(2), _z(2), nll_loss=_z(2), **kw),
    L.kto: lambda kw: L.kto(_z(2), _z(2), _LABELS, kl_ref_point=0.0, **kw),
    L.bco: lambda kw: L.bco(_z(2), _z(2), _LABELS, **kw),
    L.npo: lambda kw: L.npo(_z(2), _z(2), **kw),
    L.simnpo: lambda kw: L.simnpo(_z(2), _n(), **kw),
    L.gradient_ascent: lambda kw: L.gradient_ascent(_z(2), lengths=_n(), **kw),
    L.plackett_luce: lambda kw: L.plackett_luce(_z(2, 2), torch.tensor([[0, 1], [1, 0]]), **kw),
    L.bradley_terry: lambda kw: L.bradley_terry(_z(2), _z(2), **kw),
    L.nll: lambda kw: L.nll(_z(*_TOK), torch.ones(_TOK, dtype=torch.bool), **kw),
    L.tdpo: lambda kw: L.tdpo(_z(*_TOK), _z(*_TOK), _z(*_TOK), _z(*_TOK), chosen_mask=torch.ones(_TOK),
                              rejected_mask=torch.ones(_TOK), **kw),
    L.sparse_token_dpo: lambda kw: L.sparse_token_dpo(*[_z(*_TOK)] * 6, chosen_mask=torch.ones(_TOK),
                                                      rejected_mask=torch.ones(_TOK), **kw),
}


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _is_list(v) -> bool:
    return isinstance(v, list | tuple)


# what one alternative of an annotation accepts: (description, test)
_KINDS: dict[str, tuple[str, Callable[[object], bool]]] = {
    "float": ("a number", _is_number),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "bool": ("true/false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "None": ("null", lambda v: v is None),
    "Sequence[str]": ("a list of strings", lambda v: _is_list(v) and all(isinstance(x, str) for x in v)),
    "Sequence[float]": ("a list of numbers", lambda v: _is_list(v) and all(map(_is_number, v))),
}
_FROM_DEFAULT = {bool: "bool", int: "float", float: "float", str: "str"}


def expected_kinds(annotation: object, default: object = inspect.Parameter.empty) -> list[str] | None:
    """The accepted kinds (keys of ``_KINDS``) of an option; ``Tensor`` alternatives (batch inputs) are dropped.
    None: an annotation this module cannot read (a test keeps every METHODS row readable)."""
    if annotation is inspect.Parameter.empty:
        kind = _FROM_DEFAULT.get(type(default))
        return [kind] if kind else None
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kinds = [a.strip() for a in text.split("|") if a.strip() != "Tensor"]
    return kinds if kinds and all(k in _KINDS for k in kinds) else None


def _type_error(key: str, value, kinds: list[str]) -> str | None:
    if any(_KINDS[k][1](value) for k in kinds):
        if _is_number(value) and not math.isfinite(value):
            return f"{key}={value!r} must be a finite number; fix: set {key}=<finite value>"
        if isinstance(value, list | tuple) and any(_is_number(x) and not math.isfinite(x) for x in value):
            return f"{key}={value!r} must hold finite numbers only"
        return None
    want = " or ".join(_KINDS[k][0] for k in kinds)
    hint = ""
    if isinstance(value, str) and "float" in kinds:
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and math.isfinite(number):
            hint = f" (YAML reads {value} as text: write it with a dot, e.g. {number!r})"
        elif number is not None:
            hint = " (not finite)"
    return f"{key}={value!r} must be {want}{hint}; fix: set {key}=<{want}>"


def default_options(method) -> dict[str, inspect.Parameter]:
    """Options of a row without a pure loss whose ``loss.kwargs`` are its defaults (the dual-encoder rows)."""
    return {k: inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in method.defaults.items()}


def check_option_values(method, options: Mapping[str, inspect.Parameter], kwargs: Mapping, where: str) -> list[str]:
    """Type / finiteness / allowed-name errors of the known options in ``kwargs``, then (when those pass) the pure
    loss's own errors on a dummy batch. ``options``: the row's user options (name → parameter); rows without a
    pure loss pass parameters built from their defaults."""
    errors, checked = [], {}
    owner = method.loss_fn if method.loss_fn is not None else method.name
    for key, value in kwargs.items():
        p = options.get(key)
        if p is None:
            continue
        kinds = expected_kinds(p.annotation, p.default)
        err = _type_error(f"{where}.{key}", value, kinds) if kinds else None
        allowed = CHOICES.get((owner, key))
        if err is None and allowed is not None:
            names = value if isinstance(value, list | tuple) else [value]
            bad = [n for n in names if n not in allowed]
            if bad:
                err = (f"{where}.{key}={value!r}: {bad[0]!r} is not a {key} of loss {method.name!r}; allowed: "
                       f"{sorted(allowed)}; fix: set {where}.{key} to one of them")
        if err is None:
            checked[key] = value
        else:
            errors.append(err)
    probe = PROBES.get(method.loss_fn)
    missing = [k for k, p in options.items() if p.default is inspect.Parameter.empty and k not in checked]
    if errors or probe is None or missing:  # a required option left out is reported by check_loss_kwargs
        return errors
    try:
        probe(checked)
    except (ValueError, TypeError) as e:
        text = str(e)
        items = text.split("\n  - ")[1:] if "\n  - " in text else [text]  # the losses list problems as "  - x"
        for item in items:
            key = re.match(r"(\w+)=", item)
            fix = f"set {where}.{key.group(1)} in range" if key and key.group(1) in checked else f"change {where}"
            errors.append(f"{where}: {item} (the {method.name!r} loss's own check; given {checked}); fix: {fix}")
    return errors
