"""Newton-Schulz coefficient schedules: which quintic ``x -> a x + b x^3 + c x^5`` each iteration uses.

``ns_coefficients`` (and ``newton_schulz(..., coefficients=...)``) takes any of:

- one triple ``(a, b, c)``, used by every iteration (the spec's ``(3.4445, -4.7750, 2.0315)``);
- a sequence of triples, one per iteration: iteration ``k`` uses entry ``k``, and once the list
  runs out the last entry repeats (the Polar Express paper's convention, so a schedule built for
  8 iterations also serves 5 or 10);
- a preset's name: ``"quintic"`` (the spec's triple) or ``"polar_express"`` (below).

Everything is reduced to one canonical form, a tuple of triples (:func:`coefficient_schedule`),
which is hashable (it keys the batches of same-configured matrices) and compares equal however it
was written (a list from a JSON file, a tuple in code).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["NS_COEFFICIENTS", "NS_PRESETS", "Coefficients", "Schedule", "coefficient_schedule",
           "coefficients_for_steps", "parse_coefficients"]

Triple = tuple[float, float, float]
Schedule = tuple[Triple, ...]
#: What ``ns_coefficients`` accepts: a triple, a sequence of triples, or a preset's name.
Coefficients = str | Sequence[float] | Sequence[Sequence[float]]

# Keller Jordan's quintic, as in Muon and the MARS-M reference implementation (spec section 4).
NS_COEFFICIENTS: Triple = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel, Persson, Musco and Gower, arXiv:2505.16932, Algorithm 1): the degree-5
# polynomials that are optimal in the worst case at every iteration, for singular values in
# [1e-3, 1]. The paper divides all but the last by a safety factor of 1.01 (a/s, b/s^3, c/s^5),
# and normalizes by 1.01 * ||X||_F. The spec normalizes by ||X||_F alone, so the extra 1.01 is
# folded into the first polynomial instead (p(x / s) is that triple divided once more), which is
# the paper's iteration exactly in exact arithmetic.
_POLAR_EXPRESS_RAW: Schedule = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_POLAR_EXPRESS_SAFETY = 1.01


def _shrunk(t: Triple, s: float) -> Triple:
    """The triple of ``x -> p(x / s)``."""
    return (t[0] / s, t[1] / s**3, t[2] / s**5)


def _polar_express() -> Schedule:
    s = _POLAR_EXPRESS_SAFETY
    safe = [_shrunk(t, s) for t in _POLAR_EXPRESS_RAW[:-1]] + [_POLAR_EXPRESS_RAW[-1]]
    safe[0] = _shrunk(safe[0], s)  # the paper's 1.01 * ||X||_F normalization
    return tuple(safe)


#: The named schedules ``ns_coefficients`` accepts.
NS_PRESETS: dict[str, Schedule] = {
    "quintic": (NS_COEFFICIENTS,),
    "polar_express": _polar_express(),
}


def _triple(value: Any) -> Triple | None:
    if (isinstance(value, (tuple, list)) and len(value) == 3
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
                    for c in value)):
        return (float(value[0]), float(value[1]), float(value[2]))
    return None


def coefficient_schedule(value: Coefficients) -> Schedule:
    """The canonical form of ``value`` (module doc): a non-empty tuple of ``(a, b, c)`` triples.

    Raises:
        ValueError: for anything else, saying what is accepted.
    """
    if isinstance(value, str):
        if value in NS_PRESETS:
            return NS_PRESETS[value]
        raise ValueError(f"unknown preset {value!r} (presets: {', '.join(map(repr, NS_PRESETS))})")
    one = _triple(value)
    if one is not None:
        return (one,)
    if isinstance(value, (tuple, list)) and value:
        triples = [_triple(t) for t in value]
        if all(t is not None for t in triples):
            return tuple(triples)  # type: ignore[arg-type]
    raise ValueError("expected three finite numbers (a, b, c), a non-empty list of such triples (one per "
                     f"iteration), or a preset's name ({', '.join(map(repr, NS_PRESETS))})")


def coefficients_for_steps(value: Coefficients, steps: int) -> Schedule:
    """The triple of each of ``steps`` iterations (the schedule's last one repeats)."""
    schedule = coefficient_schedule(value)
    if len(schedule) >= steps:
        return schedule[:steps]
    return schedule + (schedule[-1],) * (steps - len(schedule))


def parse_coefficients(tokens: Sequence[str]) -> Coefficients:
    """``ns_coefficients`` from command-line words: one preset name, or numbers, three per iteration
    (``3.4445 -4.775 2.0315`` is one triple)."""
    if len(tokens) == 1 and tokens[0] in NS_PRESETS:
        return tokens[0]
    try:
        numbers = [float(t) for t in tokens]
    except ValueError:
        raise ValueError(f"ns_coefficients: expected a preset ({', '.join(NS_PRESETS)}) or numbers, three "
                         f"per iteration; got {' '.join(tokens)!r}") from None
    if not numbers or len(numbers) % 3:
        raise ValueError(f"ns_coefficients: expected numbers in threes (a b c per iteration), got "
                         f"{len(numbers)}")
    triples = tuple(tuple(numbers[i:i + 3]) for i in range(0, len(numbers), 3))
    return triples[0] if len(triples) == 1 else triples
