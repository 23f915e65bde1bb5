"""TEMPLE's temporal perturbations of an ordered list: drop, shuffle, reverse (and none).

Li et al., arXiv 2503.16929 (TEMPLE), §3 (video-specific perturbations); research note
``video_audio_clip_prior.md`` §1.2 "code semantics", which this module follows (reference: ``lscpku/TEMPLE``
``inference/generator_base.py``, ``generate_rejected_response``). The released code perturbs the list of per-clip
*captions*; the operator here works on any list (frames, clips, captions), via indices.

For N items and magnitude m (an int >= 1; larger m = more damage, so an easier pair):

- ``none``: the identity.
- ``drop``: keep K = max(1, floor(N/m)) items, chosen uniformly at random, in their original order.
  ``similarity`` (an N x N matrix) switches to the reference's ``drop_by_similarity`` variant: the first item to
  drop is uniform; each next one is drawn with probability proportional to its mean similarity to the items
  already dropped (so similar, i.e. redundant, items go together).
- ``shuffle``: cut ``range(N)`` into contiguous chunks of g = max(1, floor(N/m)) items (the last chunk may be
  shorter) and permute the chunks at random; order inside a chunk is kept. May return the identity (as the
  reference, which does not redraw).
- ``reverse``: the same chunks in reverse order (segment reversal, not frame reversal); m >= N reverses fully.

Deviations from the reference: one seeded ``random.Random`` drives every draw (the reference mixes the global
``random`` and ``numpy.random`` states); in the similarity variant negative similarities count as 0 and an
all-zero row falls back to a uniform draw (the reference would divide by zero or pass negative probabilities).
The reference's ``drop_by_group`` variant (off in the released configs) is not implemented.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..config import ConfigError

T = TypeVar("T")
Perturbation = Callable[[int, int, random.Random, Any], list[int]]


def chunk_size(n: int, magnitude: int) -> int:
    """g = max(1, floor(N/m)): the kept count for ``drop`` and the chunk size for ``shuffle``/``reverse``."""
    return max(1, n // magnitude)


def _chunks(n: int, magnitude: int) -> list[list[int]]:
    g = chunk_size(n, magnitude)
    return [list(range(i, min(i + g, n))) for i in range(0, n, g)]


def _none(n: int, magnitude: int, rng: random.Random, similarity: Any) -> list[int]:
    return list(range(n))


def _drop(n: int, magnitude: int, rng: random.Random, similarity: Any) -> list[int]:
    n_drop = n - chunk_size(n, magnitude)
    if similarity is None:
        dropped = set(rng.sample(range(n), n_drop))
    else:
        dropped = _drop_by_similarity(n, n_drop, rng, similarity)
    return [i for i in range(n) if i not in dropped]


def _drop_by_similarity(n: int, n_drop: int, rng: random.Random, similarity: Any) -> set[int]:
    sim = [[float(similarity[i][j]) for j in range(n)] for i in range(n)]
    dropped: list[int] = []
    while len(dropped) < n_drop:
        left = [j for j in range(n) if j not in dropped]
        if not dropped:
            dropped.append(rng.choice(left))
            continue
        weights = [max(0.0, sum(sim[d][j] for d in dropped) / len(dropped)) for j in left]
        if sum(weights) <= 0:  # nothing similar left: uniform, rather than the reference's division by zero
            weights = [1.0] * len(left)
        dropped.append(rng.choices(left, weights=weights)[0])
    return set(dropped)


def _shuffle(n: int, magnitude: int, rng: random.Random, similarity: Any) -> list[int]:
    chunks = _chunks(n, magnitude)
    rng.shuffle(chunks)
    return [i for c in chunks for i in c]


def _reverse(n: int, magnitude: int, rng: random.Random, similarity: Any) -> list[int]:
    return [i for c in reversed(_chunks(n, magnitude)) for i in c]


PERTURBATIONS: dict[str, Perturbation] = {"none": _none, "drop": _drop, "shuffle": _shuffle, "reverse": _reverse}
RANDOM_KINDS = ("drop", "shuffle")  # the kinds that draw random numbers


def _check(n: int, kind: str, magnitude: int, similarity: Any) -> None:
    errors = []
    if kind not in PERTURBATIONS:
        errors.append(f"perturbation kind={kind!r} is not one of {list(PERTURBATIONS)}")
    if isinstance(magnitude, bool) or not isinstance(magnitude, int) or magnitude < 1:
        errors.append(f"magnitude={magnitude!r} must be an int >= 1 (TEMPLE uses 2, 4, 8, 16; larger = more damage)")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        errors.append(f"n={n!r} must be an int >= 1 (the number of items to perturb)")
    if similarity is not None:
        if kind != "drop":
            errors.append(f"similarity is only used by kind='drop', not {kind!r}; fix: leave it out")
        elif len(similarity) != n or any(len(row) != n for row in similarity):
            errors.append(f"similarity must be an {n} x {n} matrix (one row and column per item)")
    if errors:
        raise ConfigError(errors)


def perturb_indices(n: int, kind: str, magnitude: int, *, seed: int | None = None,
                    generator: random.Random | None = None, similarity: Any = None) -> list[int]:
    """The indices of ``range(n)`` after the perturbation, in their new order (see the module docstring).

    ``drop`` returns the kept indices (ascending); ``shuffle``/``reverse`` a permutation; ``none`` the identity.
    Randomness comes from ``generator`` (advanced in place) or else ``random.Random(seed)``; the random kinds
    need one of them, so that a forgotten seed cannot give every video the same perturbation by accident.

    Raises:
        ConfigError: unknown kind, magnitude < 1, n < 1, or a misshapen ``similarity``.
        ValueError: neither ``seed`` nor ``generator`` for ``drop``/``shuffle``.
    """
    _check(n, kind, magnitude, similarity)
    if generator is None:
        if seed is None and kind in RANDOM_KINDS:
            raise ValueError(f"kind={kind!r} is random; pass seed=<int> or generator=random.Random(...)")
        generator = random.Random(seed)
    return PERTURBATIONS[kind](n, magnitude, generator, similarity)


def apply_perturbation(items: Sequence[T], kind: str, magnitude: int, seed: int | None = None, *,
                       generator: random.Random | None = None, similarity: Any = None) -> tuple[list[T], list[int]]:
    """``(perturbed_items, indices)`` with ``perturbed_items[j] == items[indices[j]]``; see :func:`perturb_indices`.

    The indices are what the reference stores as ``info["selected_indices"]``."""
    idx = perturb_indices(len(items), kind, magnitude, seed=seed, generator=generator, similarity=similarity)
    return [items[i] for i in idx], idx


def kendall_tau_distance(order: Sequence[int]) -> int:
    """Number of discordant pairs (i < j with ``order[i] > order[j]``): 0 for the identity, N(N-1)/2 reversed."""
    return sum(1 for i in range(len(order)) for j in range(i + 1, len(order)) if order[i] > order[j])
