"""Is a PGT gain measured over seeds more than seed noise? Numbers for the report.

Each arm (baseline, PGT) is a set of runs keyed by seed. The gain is mean(PGT) - mean(baseline)
with a 95% t interval: paired over seeds when both arms ran the same seeds (a seed fixes the
initial weights and the data order, so the arms share that noise), else Welch's interval for
unequal variances. "resolved" when the interval excludes 0, "within noise" otherwise. With fewer
than 2 seeds in an arm no spread is known and no statement about noise is possible.

scipy gives the t distribution's quantiles and tails (pip install scipy, or the `dev` or
`prepare` extra).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

from powergrad_train.system.errors import InstallError

LEVEL = 0.95  # the confidence of the interval
POWER = 0.8  # for the seeds needed: the chance of resolving a gain as large as the paper's
MAX_SEEDS = 1000


def _t():
    try:
        from scipy.stats import t
    except ImportError:
        raise InstallError("report: the statistics over seeds need scipy: pip install scipy "
                           "(or pip install -e '.[prepare]')") from None
    return t


@dataclass(frozen=True)
class Spread:
    n: int
    mean: float
    sd: Optional[float]  # sample standard deviation; None for one value

    def text(self, digits: int = 2) -> str:
        if self.sd is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


def spread(values: list[float]) -> Spread:
    return Spread(len(values), statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)


@dataclass(frozen=True)
class Gain:
    gain: float  # mean(PGT) - mean(baseline)
    n_base: int
    n_pgt: int
    test: Optional[str]  # "paired" or "Welch"; None when no interval can be given
    low: Optional[float] = None
    high: Optional[float] = None
    p: Optional[float] = None  # two-sided
    df: Optional[float] = None
    noise: Optional[float] = None  # the sd the seeds-needed estimate uses (of the differences when paired)

    @property
    def verdict(self) -> str:
        if self.test is None:
            return "no statement about noise is possible (needs at least 2 seeds per arm)"
        return "resolved" if self.low > 0 or self.high < 0 else "within noise"

    def text(self) -> str:
        if self.test is None:
            return f"{self.gain:+.2f} (n {self.n_base}/{self.n_pgt}): {self.verdict}"
        return (f"{self.gain:+.2f} [{self.low:+.2f}, {self.high:+.2f}], p {self.p:.2g} "
                f"({self.test}, n {self.n_base}/{self.n_pgt}): {self.verdict}")


def compare(base: dict[int, float], pgt: dict[int, float]) -> Gain:
    """The gain of `pgt` over `base`, each {seed: value}, with its 95% interval when it has one."""
    b, p = list(base.values()), list(pgt.values())
    gain = statistics.fmean(p) - statistics.fmean(b)
    if len(b) < 2 or len(p) < 2:
        return Gain(gain, len(b), len(p), None)
    if set(base) == set(pgt):
        diffs = [pgt[s] - base[s] for s in sorted(base)]
        sd = statistics.stdev(diffs)
        se, df, test, noise = sd / math.sqrt(len(diffs)), len(diffs) - 1, "paired", sd
    else:
        vb, vp = statistics.variance(b) / len(b), statistics.variance(p) / len(p)
        se = math.sqrt(vb + vp)
        # Welch-Satterthwaite; with no spread in either arm the interval is the point itself.
        df = (vb + vp) ** 2 / (vb ** 2 / (len(b) - 1) + vp ** 2 / (len(p) - 1)) if se else len(b) + len(p) - 2
        test = "Welch"
        noise = math.sqrt((statistics.variance(b) + statistics.variance(p)) / 2)
    t = _t()
    if se == 0:
        return Gain(gain, len(b), len(p), test, gain, gain, 0.0 if gain else 1.0, df, noise)
    half = float(t.ppf(0.5 + LEVEL / 2, df)) * se
    return Gain(gain, len(b), len(p), test, gain - half, gain + half, float(2 * t.sf(abs(gain) / se, df)), df, noise)


def seeds_needed(noise: float, effect: float, paired: bool = False) -> Optional[int]:
    """Seeds per arm for a two-sided test at 1 - LEVEL to resolve a true gain of `effect` with
    probability POWER, when the runs scatter with standard deviation `noise` (of the per-seed
    differences if paired): the smallest n >= 2 with
        (t_{(1+LEVEL)/2, df} + t_{POWER, df}) * se(n) <= |effect|,
    se(n) = noise * sqrt(2 / n) and df = 2n - 2 (unpaired), or noise / sqrt(n) and df = n - 1
    (paired). None when even MAX_SEEDS would not do."""
    if effect == 0:
        return None
    t = _t()
    for n in range(2, MAX_SEEDS + 1):
        se, df = (noise / math.sqrt(n), n - 1) if paired else (noise * math.sqrt(2 / n), 2 * n - 2)
        if (t.ppf(0.5 + LEVEL / 2, df) + t.ppf(POWER, df)) * se <= abs(effect):
            return n
    return None
