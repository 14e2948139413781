"""FedCross / FedCrossEns site-visit schedules.

K models travel among the sites. At each communication ``c = 0, 1, 2, ...`` every model that
trains is sent to exactly one site, no site hosts two models, and the models train in parallel.

Run-time API: :func:`assign` answers "given the sites active at communication ``c``, which site
does each of the K models visit?". It is a pure function of
``(kind, active_sites in the given order, num_models, communication, seed, explicit)``; when a
site fails, the controller simply calls it with the remaining sites (keep the configured order,
drop the failed site). With A active sites:

* A >= K: every model gets a distinct site.
* A < K: only A models train, the others get ``None`` and keep their weights. The trainers are
  the A consecutive models (mod K) starting at ``(c * A) % K``; over any K consecutive
  communications each model therefore trains exactly A times (and every model trains within
  ceil(K / A) consecutive communications). Trainers are placed as "slots" ``j = 0..A-1``
  (slot j = model ``(c * A + j) % K``) and the kind's rule assigns the sites to slots.
* A == 0: every model gets ``None``.

Kinds (N = number of active sites, slot m = model m when A >= K):

* ``"cyclic"``: slot m visits ``sites[(m + c) % N]``; K = 1 is plain round-robin.
* ``"latin"``: block ``b = c // N``, column ``c % N``. For each block a Latin square
  ``L[r][col] = sites[sigma[(rho[r] + kappa[col]) % N]]`` is drawn by permuting the symbols,
  rows and columns of the cyclic square with an RNG seeded by ``(seed, b)``; slot m uses row m.
  Within each block of N communications every slot visits every site exactly once.
* ``"random"``: per communication an independent permutation ``perm`` of the sites, seeded by
  ``(seed, c)``; slot m visits ``sites[perm[m]]``. No per-block "visit every site" guarantee.
* ``"explicit"``: row ``explicit[c % len(explicit)]`` (K distinct site names, one per model),
  repeated cyclically. A trainer whose listed site is inactive (or that lost its listed site to
  the rotation) is given one of the active sites left unused by that row, in active order.

The block guarantees of "cyclic"/"latin" hold for a fixed site list; a site removal mid-block
restarts the structure over the remaining sites (blocks are counted from c = 0 with the new N).

A "latin" job plans whole blocks: :func:`check_latin_communications` refuses a number of communications
that is not a multiple of the number of sites (some models would miss some sites), and
:func:`plan_latin` splits a per-site budget of epochs into whole blocks of equal visits.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import numpy as np

__all__ = [
    "KINDS",
    "assign",
    "check_latin_communications",
    "plan_latin",
    "validate_explicit",
]

KINDS = ("cyclic", "latin", "random", "explicit")
_LATIN_TAG, _RANDOM_TAG = 1, 2


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_sites(sites: Sequence[str], name: str) -> list[str]:
    sites = list(sites)
    if any(not isinstance(s, str) or not s for s in sites):
        raise ValueError(f"{name} must be non-empty strings, got {sites}")
    if len(set(sites)) != len(sites):
        raise ValueError(f"{name} contains duplicates: {sites}")
    return sites


def _check_explicit_rows(explicit, num_models: int) -> list[list[str]]:
    if explicit is None or len(explicit) == 0:
        raise ValueError('kind "explicit" needs a non-empty list of rows')
    rows = []
    for c, row in enumerate(explicit):
        if isinstance(row, str) or len(row) != num_models:
            raise ValueError(f"explicit row {c} must list {num_models} site(s), one per model, got {row!r}")
        rows.append(_check_sites(row, f"explicit row {c}"))
    return rows


def validate_explicit(explicit, sites: Sequence[str], num_models: int) -> list[list[str]]:
    """Check an explicit schedule against the configured sites; return it as lists.

    Each row must list ``num_models`` distinct names, all in ``sites``. Call this once at
    start-up: :func:`assign` only checks the row structure, because after a failure rows may
    legitimately name sites that are no longer active.
    """
    rows = _check_explicit_rows(explicit, num_models)
    known = set(sites)
    for c, row in enumerate(rows):
        unknown = [s for s in row if s not in known]
        if unknown:
            raise ValueError(f"explicit row {c} names unknown site(s) {unknown}; known: {list(sites)}")
    return rows


def check_latin_communications(num_communications: int, num_sites: int) -> None:
    """Refuse a Latin schedule of `num_communications` over `num_sites` sites that is not made of whole blocks.

    A block is N communications in which every model visits every site once; a partial last block leaves
    some models without a visit to some sites, so their visit counts differ (ValueError naming both numbers).
    """
    c = _check_int("num_communications", num_communications, 0)
    n = _check_int("number of sites", num_sites, 1)
    if c % n:
        below, above = c - c % n, c - c % n + n
        raise ValueError(
            f'schedule "latin": num_communications {c} is not a multiple of the number of sites {n}, so some '
            f"models would not visit every site equally; use a multiple of {n} (e.g. {below or above} or {above})"
        )


def plan_latin(site_epochs: int, num_sites: int, max_visit_epochs: int) -> tuple[int, int]:
    """Split a budget of `site_epochs` training epochs per site into whole Latin blocks: (communications,
    visit_epochs) with communications * visit_epochs == site_epochs, communications a multiple of num_sites,
    and the longest visit that is at most max_visit_epochs. ValueError when no such split exists
    (site_epochs not a multiple of num_sites)."""
    e = _check_int("site_epochs", site_epochs, 1)
    n = _check_int("number of sites", num_sites, 1)
    cap = _check_int("max_visit_epochs", max_visit_epochs, 1)
    for v in range(min(cap, e), 0, -1):
        if e % v == 0 and (e // v) % n == 0:
            return e // v, v
    raise ValueError(
        f"{e} epochs per site cannot be split into whole Latin blocks of {n} communications (every model "
        f"visiting every site equally): the epochs per site must be a multiple of the number of sites {n}"
    )


def _rng(seed: int, tag: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, tag, index]))


def _slot_sites(kind: str, sites: list[str], slots: int, c: int, seed: int) -> list[str]:
    """Distinct sites for slots 0..slots-1 (slots <= len(sites)) at communication c."""
    n = len(sites)
    if kind == "cyclic":
        return [sites[(m + c) % n] for m in range(slots)]
    if kind == "latin":
        block, col = divmod(c, n)
        rng = _rng(seed, _LATIN_TAG, block)
        sigma, rho, kappa = rng.permutation(n), rng.permutation(n), rng.permutation(n)
        return [sites[sigma[(rho[m] + kappa[col]) % n]] for m in range(slots)]
    perm = _rng(seed, _RANDOM_TAG, c).permutation(n)  # "random"
    return [sites[perm[m]] for m in range(slots)]


def assign(
    kind: str,
    active_sites: Sequence[str],
    num_models: int,
    communication: int,
    seed: int = 0,
    explicit: Sequence[Sequence[str]] | None = None,
) -> list[str | None]:
    """Site visited by each of the ``num_models`` models at ``communication`` (``None``: sits out).

    See the module docstring for the rules. Guarantees: at most one model per site, only
    active sites appear, every model gets a site when ``len(active_sites) >= num_models``, and
    sit-outs rotate with ``communication`` otherwise. ``seed`` must be an integer >= 0.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {KINDS}")
    if kind != "explicit" and explicit is not None:
        raise ValueError(f'explicit rows given but kind is {kind!r} (use kind="explicit")')
    active = _check_sites(active_sites, "active_sites")
    k = _check_int("num_models", num_models, 1)
    c = _check_int("communication", communication, 0)
    seed = _check_int("seed", seed, 0)
    rows = _check_explicit_rows(explicit, k) if kind == "explicit" else None

    a = len(active)
    result: list[str | None] = [None] * k
    if a == 0:
        return result
    trainers = list(range(k)) if a >= k else [(c * a + j) % k for j in range(a)]

    if kind == "explicit":
        row = rows[c % len(rows)]
        active_set = set(active)
        for m in trainers:
            if row[m] in active_set:
                result[m] = row[m]
        used = set(result)
        free = iter(s for s in active if s not in used)
        for m in trainers:
            if result[m] is None:
                result[m] = next(free)  # enough: |free| >= |trainers| - |kept|
        return result

    for m, site in zip(trainers, _slot_sites(kind, active, len(trainers), c, seed)):
        result[m] = site
    return result


def member_seed(seed: int, m: int) -> int:
    """Torch seed of member m of a run seeded `seed`: child m of numpy's SeedSequence(seed) (its spawn_key),
    64 bits. Unlike seed + m, (seed, m) pairs do not collide (run 0's member 1 is not run 1's member 0)."""
    for name, value in (("seed", seed), ("member", m)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    sequence = np.random.SeedSequence(int(seed), spawn_key=(int(m),))
    return int(sequence.generate_state(1, np.uint64)[0])
