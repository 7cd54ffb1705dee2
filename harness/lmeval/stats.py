"""Is the difference between two implementations' lm-eval runs real? Paired, per-document statistics.

Two implementations of one model answer the same documents of one lm-eval task, so every comparison here
is *paired* by ``doc_id``: the question is whether b gets different documents right than a, not whether two
independent samples of a model differ. Per document we have a correctness bool per metric (``acc``,
``acc_norm``) and the per-choice log-likelihoods.

- :func:`mcnemar`: exact two-sided McNemar test (binomial test on the discordant pairs) -- the gate.
- :func:`paired_bootstrap`: the mean difference with a percentile CI from resampling documents.
- :func:`mde_points`: the minimum detectable difference (MDE) of the paired test at this n, alpha, power.
- :func:`mde_points_unpaired`: the same from the binomial sigma alone, as TensorRT-LLM's accuracy tests do
  (``compute_theta`` in ``tests/integration/defs/accuracy/accuracy_core.py`` and the "Hypothesis Testing
  Methodology" section of the README beside it: theta = -(Phi^-1(alpha) + Phi^-1(beta)) * sqrt(2 sigma^2 / n),
  one-tailed, sigma = 100 * sqrt(p (1 - p)) in points, 50 when p = 0.5).
- :func:`loglik_diff`: paired differences of the per-choice log-likelihoods, with a Wilcoxon test.
- :func:`compare`: all of it for one task and metric; :func:`verdict`: the exit code over comparisons.

Accuracies are fractions in [0, 1]; anything named ``*_points`` is in percentage points (fraction x 100).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _st

# rows of the (resamples x n) index matrix drawn at once: bounds the bootstrap's memory at ~32 MB of indices
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000


def _z(q: float) -> float:
    """The standard normal quantile Phi^-1(q)."""
    return float(_st.norm.ppf(q))


def _check_alpha_power(alpha: float, power: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")


def _as_bools(values: Sequence[bool] | Sequence[float], what: str) -> np.ndarray:
    """bools, or numbers that are exactly 0 or 1 (lm-eval writes ``acc`` as 1.0 / 0.0), as a bool array."""
    arr = np.asarray(values, dtype=float).ravel()
    bad = np.flatnonzero((arr != 0.0) & (arr != 1.0))
    if bad.size:
        raise ValueError(f"{what}: value {arr[bad[0]]!r} at index {int(bad[0])} is not a 0/1 correctness")
    return arr == 1.0


def _paired(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    if len(a) == 0:
        raise ValueError("no paired samples")


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test: ``only_a`` documents a gets right and b wrong, ``only_b`` the reverse."""

    n: int
    only_a: int
    only_b: int
    p_value: float

    @property
    def discordant(self) -> int:
        return self.only_a + self.only_b


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """Exact two-sided McNemar test of paired correctness ``a[i]``, ``b[i]`` on the same documents.

    Only discordant pairs carry information. Under H0 (both implementations equally accurate) each of the
    ``d = only_a + only_b`` discordant pairs falls either way with probability 1/2, so ``only_b ~ Bin(d, 1/2)``
    and p = min(1, 2 * P[X <= min(only_a, only_b)]) (``scipy.stats.binomtest``, two-sided; the binomial is
    symmetric at p = 1/2, so this is the doubled tail). p = 1.0 when there are no discordant pairs.
    Exact, so valid at any number of discordant pairs (no chi-square approximation, no continuity correction).
    """
    _paired(a, b)
    xa, xb = _as_bools(a, "a"), _as_bools(b, "b")
    only_a = int(np.count_nonzero(xa & ~xb))
    only_b = int(np.count_nonzero(xb & ~xa))
    d = only_a + only_b
    p = 1.0 if d == 0 else float(_st.binomtest(only_b, d, 0.5, alternative="two-sided").pvalue)
    return McNemar(n=len(xa), only_a=only_a, only_b=only_b, p_value=min(1.0, p))


@dataclass(frozen=True)
class Bootstrap:
    """Paired bootstrap of the mean difference b - a (in the values' own units: fractions for bools)."""

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    confidence: float
    resamples: int
    seed: int
    p_value: float


def paired_bootstrap(
    a: Sequence[bool] | Sequence[float],
    b: Sequence[bool] | Sequence[float],
    resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Bootstrap:
    """Mean of the per-document differences ``b[i] - a[i]``, its percentile CI and a two-sided p-value.

    Documents are resampled with replacement (the pair stays together, which keeps the correlation between
    the runs): ``resamples`` draws of n indices, the mean difference of each draw. The CI is the
    ((1 - confidence)/2, (1 + confidence)/2) percentiles of those means (Efron's percentile interval).
    The p-value tests H0 "mean difference 0" by centring the bootstrap distribution on 0 (Davison & Hinkley
    1997, sec. 4.4): p = (1 + #{|m*_k - m| >= |m|}) / (resamples + 1), so it is never 0 and equals 1 when
    m = 0. Assumes documents are independent draws from the task's population. Deterministic for a seed
    (numpy ``default_rng``); the draws are vectorised in chunks of rows to bound memory.
    """
    _paired(a, b)
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diff = np.asarray(b, dtype=float).ravel() - np.asarray(a, dtype=float).ravel()
    if not np.all(np.isfinite(diff)):
        raise ValueError("paired_bootstrap: non-finite values")
    n = diff.size
    mean = float(diff.mean())
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    means = np.empty(resamples)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    # a tolerance so that float noise in the resampled means does not split ties with |m| (identical runs)
    extreme = np.abs(means - mean) >= abs(mean) - 1e-12
    p = (1 + int(np.count_nonzero(extreme))) / (resamples + 1)
    return Bootstrap(
        n=n, mean_diff=mean, ci_low=float(low), ci_high=float(high), confidence=confidence,
        resamples=resamples, seed=seed, p_value=min(1.0, p),
    )


def discordance_floor(n: int) -> float:
    """The least discordance :func:`mde_points` assumes: 3/n (capped at 1).

    With 0 of n documents disagreeing, the observed discordance 0 would give an MDE of 0 -- "any difference
    is detectable" -- which means nothing: the true discordance is merely small. 3/n is the one-sided 95%
    upper bound on a proportion when 0 of n events are seen (the "rule of three", Hanley & Lippman-Hand 1983,
    JAMA 249:1743), so the MDE reported for identical runs is the one for the largest discordance still
    consistent with them. It is applied as a floor (``max(observed, 3/n)``), so the MDE is continuous in
    the observed count and never below ``(z_{1-alpha/2} + z_power) * sqrt(3) / n``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return min(1.0, 3.0 / n)


def mde_points(
    n: int, discordance: float, alpha: float = 0.05, power: float = 0.8, two_sided: bool = True
) -> float:
    """Minimum detectable accuracy difference, in points, of the paired (McNemar) test on n documents.

    delta = (z_{1-alpha/2} + z_{power}) * sqrt(p_d / n) * 100, with p_d = max(discordance, 3/n)
    (see :func:`discordance_floor`) and z_{1-alpha} instead of z_{1-alpha/2} when ``two_sided`` is False.

    Derivation: per document the difference b_i - a_i is +1, -1 or 0; its mean is the accuracy difference
    delta and its variance p_d - delta^2, where p_d is the fraction of discordant documents. McNemar's
    statistic standardises by sqrt(p_d / n) (the variance under H0, delta = 0), so delta is detected with the
    given power when delta * sqrt(n) = z_{1-alpha/2} sqrt(p_d) + z_{power} sqrt(p_d - delta^2) (Connor 1987,
    Biometrics 43:207, the McNemar sample-size formula). Dropping the delta^2 term gives the closed form
    above, which slightly *over*states the MDE (conservative; the two agree when delta^2 << p_d, as for
    implementations of one model). This is TensorRT-LLM's theta with their unpaired variance of the mean
    difference, 2 sigma^2 / n, replaced by the paired one, p_d / n; when the runs are independent,
    p_d = 2 p (1 - p) and the two coincide (:func:`mde_points_unpaired`). The exact binomial test used by
    :func:`mcnemar` is slightly conservative relative to this normal approximation at small discordant counts.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= discordance <= 1.0:
        raise ValueError(f"discordance must be a fraction in [0, 1], got {discordance}")
    _check_alpha_power(alpha, power)
    p_d = max(discordance, discordance_floor(n))
    z_alpha = _z(1.0 - alpha / 2.0) if two_sided else _z(1.0 - alpha)
    return (z_alpha + _z(power)) * math.sqrt(p_d / n) * 100.0


def mde_points_unpaired(
    n: int, accuracy: float, alpha: float = 0.05, power: float = 0.8, two_sided: bool = True
) -> float:
    """MDE in points from the reference accuracy alone, for when no paired per-document samples exist.

    TensorRT-LLM's accuracy tests (``compute_theta``, accuracy_core.py):
    theta = -(Phi^-1(alpha) + Phi^-1(beta)) * sqrt(2 sigma^2 / n), one-tailed, with the per-sample score's
    standard deviation sigma in points; for a 0/1 score with accuracy p, sigma = 100 * sqrt(p (1 - p)).
    Here Phi^-1(beta) = -z_{power}, and the default is two-sided (z_{1-alpha/2}) to match :func:`mcnemar`;
    ``two_sided=False`` reproduces TensorRT-LLM's numbers (n=4096, p=0.5 -> 2.747 points). It treats the two
    runs as independent samples, so it overstates the MDE of two implementations that agree on most documents.
    ``accuracy`` (a fraction) is clipped to [3/n, 1 - 3/n] (the rule of three, as in :func:`discordance_floor`)
    so that a perfect or zero score does not report an MDE of 0.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be a fraction in [0, 1], got {accuracy}")
    _check_alpha_power(alpha, power)
    floor = min(0.5, 3.0 / n)
    p = min(max(accuracy, floor), 1.0 - floor)
    z_alpha = _z(1.0 - alpha / 2.0) if two_sided else _z(1.0 - alpha)
    return (z_alpha + _z(power)) * math.sqrt(2.0 * p * (1.0 - p) / n) * 100.0


@dataclass(frozen=True)
class LoglikDiff:
    """Paired differences b - a of per-choice log-likelihoods, flattened over documents and choices."""

    pairs: int
    mean: float
    std: float
    max_abs: float
    wilcoxon_p: float


def loglik_diff(
    a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], doc_ids: Sequence[int] | None = None
) -> LoglikDiff:
    """Mean, standard deviation (ddof=1; 0 for one pair), max |.| and a Wilcoxon signed-rank test of b - a.

    ``a[i]`` and ``b[i]`` are the log-likelihoods of document i's choices; ``doc_ids`` (default: the
    positions) names documents in errors. The Wilcoxon test (``scipy.stats.wilcoxon``, two-sided, zero
    differences dropped) asks whether the differences are symmetric about 0, i.e. whether one implementation
    scores choices systematically higher; it treats all pairs as independent although the choices of one
    document share a prompt, so read it as a screen for a systematic offset, not a calibrated p-value.
    p = 1.0 when every difference is 0.
    """
    _paired(a, b)
    ids = list(range(len(a))) if doc_ids is None else list(doc_ids)
    if len(ids) != len(a):
        raise ValueError(f"doc_ids has {len(ids)} entries for {len(a)} documents")
    parts = []
    for doc, xa, xb in zip(ids, a, b, strict=True):
        if len(xa) != len(xb):
            raise ValueError(f"doc {doc}: {len(xa)} choices in a but {len(xb)} in b")
        d = np.asarray(xb, dtype=float) - np.asarray(xa, dtype=float)
        if not np.all(np.isfinite(d)):
            raise ValueError(f"doc {doc}: non-finite log-likelihood difference")
        parts.append(d)
    diff = np.concatenate(parts) if parts else np.empty(0)
    if diff.size == 0:
        raise ValueError("no log-likelihood pairs")
    std = float(diff.std(ddof=1)) if diff.size > 1 else 0.0
    p = 1.0
    if np.any(diff != 0.0):
        p = float(_st.wilcoxon(diff, zero_method="wilcox", alternative="two-sided").pvalue)
        p = 1.0 if math.isnan(p) else min(1.0, p)
    return LoglikDiff(
        pairs=int(diff.size), mean=float(diff.mean()), std=std, max_abs=float(np.abs(diff).max()), wilcoxon_p=p
    )


def _signed(x: float, digits: int = 2) -> str:
    """``+1.23`` / ``−1.23`` (U+2212 minus) / ``0.00`` when it rounds to zero."""
    body = f"{abs(x):.{digits}f}"
    if float(body) == 0.0:
        return body
    return ("\u2212" if x < 0 else "+") + body


def _p_text(p: float) -> str:
    return f"{p:.2f}" if p >= 0.01 else f"{p:.1e}"


@dataclass(frozen=True)
class Comparison:
    """One task, one metric, implementation b against a on the same documents.

    ``accuracy_a``/``accuracy_b`` are fractions; ``diff_points`` (b - a), ``ci_points`` (the paired
    bootstrap's CI at confidence 1 - alpha) and ``mde_points`` are in points. ``loglik`` is None when
    neither run recorded log-likelihoods (generation tasks).
    """

    task: str
    name_a: str
    name_b: str
    metric: str
    n: int
    accuracy_a: float
    accuracy_b: float
    diff_points: float
    mcnemar: McNemar
    ci_points: tuple[float, float]
    mde_points: float
    loglik: LoglikDiff | None
    alpha: float
    power: float

    @property
    def significant(self) -> bool:
        """McNemar's exact p below alpha."""
        return self.mcnemar.p_value < self.alpha

    @property
    def significant_loss(self) -> bool:
        """Significant, and b is the less accurate (``diff_points`` < 0)."""
        return self.significant and self.diff_points < 0

    def line(self) -> str:
        """``vllm vs reference on arc_easy (n=570): −0.21 points, not significant (p=0.48; detectable at
        this n: 1.9 points)``."""
        if not self.significant:
            judged = "not significant"
        else:
            judged = "significant loss" if self.significant_loss else "significant gain"
        return (
            f"{self.name_b} vs {self.name_a} on {self.task} (n={self.n}): {_signed(self.diff_points)} points, "
            f"{judged} (p={_p_text(self.mcnemar.p_value)}; detectable at this n: {self.mde_points:.2g} points)"
        )

    def to_dict(self) -> dict:
        """Plain JSON types only (every float is finite by construction)."""
        out = asdict(self)
        out["ci_points"] = list(self.ci_points)
        out["mcnemar"]["discordant"] = self.mcnemar.discordant
        out["significant"] = self.significant
        out["significant_loss"] = self.significant_loss
        out["line"] = self.line()
        return out


def _doc_mismatch(name_a: str, name_b: str, ids_a: set, ids_b: set) -> str:
    parts = []
    for name, missing in ((name_b, ids_a - ids_b), (name_a, ids_b - ids_a)):
        if missing:
            shown = sorted(missing)[:5]
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            parts.append(f"{len(missing)} missing from {name}: {shown}{more}")
    return "document sets differ: " + "; ".join(parts)


def _metric_values(samples: Mapping[int, dict], ids: list[int], metric: str, name: str) -> np.ndarray:
    values = []
    for doc in ids:
        if metric not in samples[doc]:
            raise ValueError(f"{name}: doc {doc} has no {metric!r}")
        v = float(samples[doc][metric])
        if v not in (0.0, 1.0):
            raise ValueError(f"{name}: doc {doc} {metric}={v!r} is not a 0/1 correctness")
        values.append(v == 1.0)
    return np.asarray(values, dtype=bool)


def _logliks(
    samples_a: Mapping[int, dict], samples_b: Mapping[int, dict], ids: list[int]
) -> LoglikDiff | None:
    key = "loglikelihoods"
    have = [(key in samples_a[d], key in samples_b[d]) for d in ids]
    if not any(x or y for x, y in have):
        return None
    for doc, (x, y) in zip(ids, have, strict=True):
        if not (x and y):
            raise ValueError(f"doc {doc}: {key!r} recorded in only one of the runs (or only some documents)")
    return loglik_diff([samples_a[d][key] for d in ids], [samples_b[d][key] for d in ids], doc_ids=ids)


def compare(
    task: str,
    name_a: str,
    name_b: str,
    samples_a: Mapping[int, dict],
    samples_b: Mapping[int, dict],
    metric: str = "acc",
    alpha: float = 0.05,
    power: float = 0.8,
    *,
    resamples: int = 10_000,
    seed: int = 0,
) -> Comparison:
    """Compare b against a on ``metric`` over the documents both ran, paired by ``doc_id``.

    ``samples_*`` map doc_id -> {"acc": bool or 0/1, "acc_norm": ..., "loglikelihoods": [float per choice]}.
    The doc sets must be equal (ValueError listing up to 5 missing ids on each side). Significance is
    McNemar's exact p < alpha; the MDE uses the observed discordance (floored, see :func:`mde_points`);
    the bootstrap CI is at confidence 1 - alpha.
    """
    _check_alpha_power(alpha, power)
    ids_a, ids_b = set(samples_a), set(samples_b)
    if ids_a != ids_b:
        raise ValueError(f"{task}: {_doc_mismatch(name_a, name_b, ids_a, ids_b)}")
    if not ids_a:
        raise ValueError(f"{task}: no documents")
    ids = sorted(ids_a)
    xa = _metric_values(samples_a, ids, metric, name_a)
    xb = _metric_values(samples_b, ids, metric, name_b)
    test = mcnemar(xa, xb)
    boot = paired_bootstrap(xa, xb, resamples=resamples, seed=seed, confidence=1.0 - alpha)
    n = len(ids)
    return Comparison(
        task=task, name_a=name_a, name_b=name_b, metric=metric, n=n,
        accuracy_a=float(xa.mean()), accuracy_b=float(xb.mean()),
        diff_points=(test.only_b - test.only_a) / n * 100.0,
        mcnemar=test,
        ci_points=(boot.ci_low * 100.0, boot.ci_high * 100.0),
        mde_points=mde_points(n, test.discordant / n, alpha=alpha, power=power),
        loglik=_logliks(samples_a, samples_b, ids),
        alpha=alpha, power=power,
    )


def verdict(comparisons: Iterable[Comparison]) -> int:
    """The CLI's exit code: 1 if any comparison is a significant loss for b, else 0."""
    return int(any(c.significant_loss for c in comparisons))
