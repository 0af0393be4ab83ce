"""When a difference between two settings is a finding: the rule, applied to per-seed numbers.

Each setting runs on the same seeds (:mod:`experiments.seeds`), and seed ``i`` of setting A and
seed ``i`` of setting B share the data split, the initial-weight key and the training key, so the
per-seed differences ``d_i = a_i - b_i`` hold what the setting changes, and their spread over the
seeds is how much that change varies from seed to seed. A difference is **clear** when

    |mean(d)| > std(d)   and   |mean(d)| >= min_effect,

that is, when the effect is larger than its seed-to-seed spread (the sample standard deviation
of the per-seed differences) and at least a minimum worth stating: 0.02 of accuracy (11 of the
547 validation images; one measurement's binomial noise is about 0.008 there), 0.05 of loss, 10%
of time (times are compared as log ratios). Otherwise the finding says "no clear effect at this
scale". With 5 seeds, a difference that is pure noise passes the first test about 9% of the
time, which the minimum effect cuts further. Numbers are ``mean [min, max]`` over the seeds.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

ACCURACY = 0.02  # the smallest difference of accuracy stated as a finding
LOSS = 0.05  # ... of a mean training loss
RULE = ("A difference between two settings is stated as a finding only when it is larger than "
        "its seed-to-seed spread: both settings run on the same seeds (seed i of each shares "
        "the data split, the initial-weight key and the training key), and the per-seed "
        "differences d must satisfy |mean(d)| > std(d), the sample standard deviation over the "
        "seeds, and |mean(d)| >= a minimum worth stating: 0.02 of accuracy (11 of the 547 "
        "validation images; one measurement's binomial noise is about 0.008), 0.05 of loss, 10% "
        "of time (compared as log ratios). Otherwise the finding reads \"no clear effect at this "
        "scale\". Numbers are mean [min, max] over the seeds, with the per-seed differences "
        "as mean ± std.")
NO_EFFECT = "no clear effect at this scale"


@dataclasses.dataclass(frozen=True)
class Effect:
    """The comparison of two settings over the same seeds."""

    a: np.ndarray  # per-seed values of setting A
    b: np.ndarray  # per-seed values of setting B
    min_effect: float

    @property
    def diff(self) -> np.ndarray:
        return self.a - self.b

    @property
    def mean(self) -> float:
        return float(np.mean(self.diff))

    @property
    def spread(self) -> float:
        """The sample standard deviation of the per-seed differences."""
        return float(np.std(self.diff, ddof=1))

    @property
    def clear(self) -> bool:
        return abs(self.mean) > self.spread and abs(self.mean) >= self.min_effect


def compare(a: Sequence[float], b: Sequence[float], *, min_effect: float) -> Effect:
    """The effect of A over B; ``a[i]`` and ``b[i]`` come from the same seed."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"a and b must be per-seed values of one length >= 2; got shapes "
                         f"{a.shape} and {b.shape}.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("a and b must be finite; a run that diverged needs its own wording.")
    return Effect(a, b, min_effect)


def spread(values: Sequence[float], digits: int = 3) -> str:
    """``mean [min, max]`` of per-seed values."""
    v = np.asarray(values, np.float64)
    return f"{v.mean():.{digits}f} [{v.min():.{digits}f}, {v.max():.{digits}f}]"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One sentence of the report and its verdict (what must not change with the seeds)."""

    text: str
    verdict: str

    def to_json(self) -> dict:
        return {"text": self.text, "verdict": self.verdict}


def difference(what: str, name_a: str, a, name_b: str, b, *, min_effect: float = ACCURACY,
               more: str = "higher", less: str = "lower", digits: int = 3) -> Finding:
    """"{what}: A mean [min, max] vs B ...; A higher than B by x (per-seed difference mean ±
    std)" or "...; no clear effect at this scale (...)"."""
    effect = compare(a, b, min_effect=min_effect)
    numbers = f"per-seed difference {effect.mean:+.{digits}f} ± {effect.spread:.{digits}f}"
    if effect.clear:
        verdict = f"{name_a} {more if effect.mean > 0 else less} than {name_b}"
        said = f"{verdict} by {abs(effect.mean):.{digits}f}"
    else:
        verdict = said = NO_EFFECT
    text = (f"{what}: {name_a} {spread(a, digits)} vs {name_b} {spread(b, digits)}; {said} "
            f"({numbers}).")
    return Finding(text, f"{what}: {verdict}")


def ratio(what: str, name_a: str, a, name_b: str, b, *, min_ratio: float = 1.1) -> Finding:
    """Like :func:`difference` for positive quantities (times), on log ratios: "A takes 1.8x
    the time of B" when clear."""
    la, lb = np.log(np.asarray(a, np.float64)), np.log(np.asarray(b, np.float64))
    effect = compare(la, lb, min_effect=math.log(min_ratio))
    r = np.exp(effect.diff)
    numbers = (f"per-seed ratio {math.exp(effect.mean):.2f} [{r.min():.2f}, {r.max():.2f}], "
               f"log ratio {effect.mean:+.2f} ± {effect.spread:.2f}")
    if effect.clear:
        verdict = f"{name_a} {'slower' if effect.mean > 0 else 'faster'} than {name_b}"
        said = f"{verdict}: {math.exp(effect.mean):.2f}x the time"
    else:
        verdict = said = NO_EFFECT
    return Finding(f"{what}: {said} ({numbers}).", f"{what}: {verdict}")


def without_numbers(text: str) -> str:
    """A sentence with its numbers masked: what must agree between seed blocks."""
    return re.sub(r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?", "#", text)
