"""The config error type, in a module of its own (no imports) so that :mod:`mmalign.extras` — imported by
``import mmalign``, hence by ``import mmalign.losses`` — needs nothing beyond the standard library."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ConfigError"]


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
