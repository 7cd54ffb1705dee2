"""The statistical gate between two implementations' lm-eval runs (harness/lmeval/stats.py)."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from harness.lmeval.stats import (
    Comparison,
    LoglikDiff,
    McNemar,
    compare,
    discordance_floor,
    loglik_diff,
    mcnemar,
    mde_points,
    mde_points_unpaired,
    paired_bootstrap,
    verdict,
)

Z = NormalDist().inv_cdf  # an independent quantile function for the closed forms


def _pairs(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Paired correctness with the given 2x2 table (a right & b right, a only, b only, neither)."""
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


def _samples(a: list[bool], b: list[bool], choices: int = 4, ll_shift: float = 0.0) -> tuple[dict, dict]:
    rng = np.random.default_rng(1)
    sa, sb = {}, {}
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        ll = (-rng.random(choices) * 10).tolist()
        sa[i] = {"acc": float(x), "acc_norm": float(x), "loglikelihoods": ll}
        sb[i] = {"acc": bool(y), "acc_norm": bool(y), "loglikelihoods": [v + ll_shift for v in ll]}
    return sa, sb


# --- McNemar ---------------------------------------------------------------------------------------------


def test_mcnemar_exact_hand_computed():
    # 10 discordant pairs split 9:1 -> p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024
    a, b = _pairs(both=50, only_a=9, only_b=1, neither=40)
    r = mcnemar(a, b)
    assert r == McNemar(n=100, only_a=9, only_b=1, p_value=pytest.approx(0.021484375, abs=1e-12))
    assert r.p_value == pytest.approx(22 / 1024, abs=1e-12)
    assert r.discordant == 10
    # symmetric in direction
    assert mcnemar(b, a).p_value == pytest.approx(r.p_value, abs=1e-12)
    assert (mcnemar(b, a).only_a, mcnemar(b, a).only_b) == (1, 9)


def test_mcnemar_no_discordance_is_p_one_and_accepts_01_floats():
    a, b = _pairs(both=30, only_a=0, only_b=0, neither=20)
    assert mcnemar(a, b).p_value == 1.0
    r = mcnemar([1.0, 0.0, 1.0], [1, 1, 1])
    assert (r.only_a, r.only_b, r.p_value) == (0, 1, 1.0)


def test_mcnemar_rejects_bad_input():
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([0.5, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="length"):
        mcnemar([True], [True, False])


# --- bootstrap -------------------------------------------------------------------------------------------


def test_bootstrap_ci_contains_true_diff_and_is_deterministic():
    rng = np.random.default_rng(123)
    n = 2000
    a = rng.random(n) < 0.7
    # b loses 6% of a's right answers and gains 2% of a's wrong: true diff = 0.02*0.3 - 0.06*0.7 = -0.036
    flip_down = a & (rng.random(n) < 0.06)
    flip_up = ~a & (rng.random(n) < 0.02)
    b = (a & ~flip_down) | flip_up
    true_diff = 0.02 * 0.3 - 0.06 * 0.7
    r = paired_bootstrap(a, b, resamples=5000, seed=7)
    assert r.ci_low < true_diff < r.ci_high
    assert r.ci_low < r.mean_diff < r.ci_high
    assert r.mean_diff == pytest.approx(b.mean() - a.mean())
    assert r.ci_high < 0  # a real loss: the interval excludes 0 ...
    assert r.p_value < 0.01  # ... and the bootstrap test agrees
    assert paired_bootstrap(a, b, resamples=5000, seed=7) == r
    other = paired_bootstrap(a, b, resamples=5000, seed=8)
    assert (other.ci_low, other.ci_high) != (r.ci_low, r.ci_high)
    # the 95% interval is about mean +- 1.96 * sd(diff) / sqrt(n)
    half = 1.96 * np.std(b.astype(float) - a.astype(float)) / math.sqrt(n)
    assert (r.ci_high - r.ci_low) / 2 == pytest.approx(half, rel=0.1)


def test_bootstrap_identical_and_floats():
    x = [0.1, 0.5, 0.9, 0.3]
    r = paired_bootstrap(x, x, resamples=200)
    assert (r.mean_diff, r.ci_low, r.ci_high, r.p_value) == (0.0, 0.0, 0.0, 1.0)
    shifted = paired_bootstrap(x, [v + 0.25 for v in x], resamples=200)
    assert shifted.mean_diff == pytest.approx(0.25)
    assert shifted.ci_low == pytest.approx(0.25) and shifted.ci_high == pytest.approx(0.25)
    assert shifted.p_value == pytest.approx(1 / 201)
    # continuous values: the CI ends are not confined to a lattice, so equality means the same draws
    rng = np.random.default_rng(5)
    fa, fb = rng.normal(size=300), rng.normal(size=300)
    first = paired_bootstrap(fa, fb, resamples=1000, seed=3)
    assert paired_bootstrap(fa, fb, resamples=1000, seed=3) == first
    assert paired_bootstrap(fa, fb, resamples=1000, seed=4).ci_low != first.ci_low


# --- MDE -------------------------------------------------------------------------------------------------


def test_mde_matches_closed_form():
    n, pd = 570, 0.05
    expected = (Z(0.975) + Z(0.8)) * math.sqrt(pd / n) * 100
    assert mde_points(n, pd) == pytest.approx(expected, rel=1e-9)
    assert mde_points(n, pd) == pytest.approx(2.6239, abs=1e-3)
    expected_01 = (Z(0.995) + Z(0.9)) * math.sqrt(0.1 / 1000) * 100
    assert mde_points(1000, 0.1, alpha=0.01, power=0.9) == pytest.approx(expected_01, rel=1e-9)
    one_sided = (Z(0.95) + Z(0.8)) * math.sqrt(pd / n) * 100
    assert mde_points(n, pd, two_sided=False) == pytest.approx(one_sided, rel=1e-9)


def test_mde_shrinks_as_one_over_sqrt_n():
    values = [mde_points(n, 0.08) for n in (250, 1000, 4000)]
    assert values[0] > values[1] > values[2]
    assert values[1] / values[0] == pytest.approx(0.5, rel=1e-12)
    assert values[2] / values[1] == pytest.approx(0.5, rel=1e-12)
    assert mde_points(1000, 0.2) > mde_points(1000, 0.05)  # more disagreement, less power


def test_mde_zero_discordance_uses_rule_of_three_floor():
    n = 570
    assert discordance_floor(n) == pytest.approx(3 / n)
    floored = mde_points(n, 0.0)
    assert floored > 0
    assert floored == pytest.approx((Z(0.975) + Z(0.8)) * math.sqrt(3) / n * 100, rel=1e-9)
    assert mde_points(n, 1 / n) == floored  # the floor is max(observed, 3/n), continuous in the count
    assert mde_points(n, 4 / n) > floored
    assert discordance_floor(2) == 1.0
    with pytest.raises(ValueError):
        mde_points(n, 1.5)
    with pytest.raises(ValueError):
        mde_points(0, 0.1)


def test_mde_unpaired_reproduces_tensorrt_llm_theta():
    # TensorRT-LLM accuracy README (compute_theta_and_thresholds.py, sigma=50, alpha=0.05, beta=0.2, one-tailed)
    assert mde_points_unpaired(4096, 0.5, two_sided=False) == pytest.approx(2.747193, abs=1e-5)
    assert mde_points_unpaired(14042, 0.5, two_sided=False) == pytest.approx(1.483729, abs=1e-5)
    # two-sided by default; independent runs have discordance 2p(1-p), where paired and unpaired coincide
    p, n = 0.7, 570
    assert mde_points_unpaired(n, p) == pytest.approx(mde_points(n, 2 * p * (1 - p)), rel=1e-12)
    assert mde_points_unpaired(n, 1.0) == mde_points_unpaired(n, 1 - 3 / n) > 0


# --- log-likelihoods -------------------------------------------------------------------------------------


def test_loglik_diff_known_arrays():
    a = [[-1.0, -2.0, -3.0], [-4.0, -5.0]]
    b = [[-1.5, -2.0, -2.0], [-4.0, -7.0]]
    # differences: -0.5, 0, +1, 0, -2
    r = loglik_diff(a, b)
    d = np.array([-0.5, 0.0, 1.0, 0.0, -2.0])
    assert isinstance(r, LoglikDiff)
    assert r.pairs == 5
    assert r.mean == pytest.approx(d.mean())
    assert r.std == pytest.approx(d.std(ddof=1))
    assert r.max_abs == 2.0
    assert 0 < r.wilcoxon_p <= 1


def test_loglik_diff_identical_and_systematic_offset():
    a = [[-1.0, -2.0], [-3.0, -4.0]]
    r = loglik_diff(a, a)
    assert (r.mean, r.std, r.max_abs, r.wilcoxon_p) == (0.0, 0.0, 0.0, 1.0)
    rng = np.random.default_rng(0)
    base = (-rng.random((100, 4)) * 5).tolist()
    off = [[v + 0.01 + 0.001 * rng.standard_normal() for v in doc] for doc in base]
    r = loglik_diff(base, off)
    assert r.mean == pytest.approx(0.01, abs=1e-3)
    assert r.wilcoxon_p < 1e-10


def test_loglik_diff_choice_mismatch_names_doc():
    with pytest.raises(ValueError, match="doc 42: 3 choices in a but 2 in b"):
        loglik_diff([[-1.0], [-1.0, -2.0, -3.0]], [[-1.0], [-1.0, -2.0]], doc_ids=[7, 42])
    with pytest.raises(ValueError, match="doc 1:"):
        loglik_diff([[-1.0], [-1.0]], [[-1.0], [-1.0, -2.0]])


# --- compare / line / verdict ----------------------------------------------------------------------------


def test_identical_runs_not_significant():
    a, _ = _pairs(both=300, only_a=0, only_b=0, neither=270)
    sa, sb = _samples(a, a)
    c = compare("arc_easy", "reference", "vllm", sa, sb)
    assert c.n == 570
    assert c.mcnemar.p_value == 1.0
    assert c.diff_points == 0.0
    assert c.ci_points == (0.0, 0.0)
    assert not c.significant and not c.significant_loss
    assert c.loglik.max_abs == 0.0 and c.loglik.wilcoxon_p == 1.0
    assert c.mde_points == pytest.approx(mde_points(570, 0.0))
    assert verdict([c]) == 0
    assert c.line() == (
        "vllm vs reference on arc_easy (n=570): 0.00 points, not significant "
        f"(p=1.00; detectable at this n: {c.mde_points:.2g} points)"
    )


def test_planted_five_point_loss_is_flagged():
    # n=2000, 10% discordance, 150 vs 50: b is 5 points worse
    a, b = _pairs(both=1250, only_a=150, only_b=50, neither=550)
    sa, sb = _samples(a, b)
    c = compare("arc_easy", "reference", "llamacpp", sa, sb)
    assert c.diff_points == pytest.approx(-5.0)
    assert c.accuracy_a == pytest.approx(0.70) and c.accuracy_b == pytest.approx(0.65)
    assert c.mcnemar.p_value < 1e-10
    assert c.significant and c.significant_loss
    assert c.ci_points[1] < 0 and c.ci_points[0] < -5.0 < c.ci_points[1]
    assert c.mde_points < 5.0
    assert verdict([c]) == 1
    assert " \u22125.00 points, significant loss (p=" in c.line()
    # the same table the other way round is a gain, and a gain alone does not fail the verdict
    gain = compare("arc_easy", "llamacpp", "reference", sb, sa)
    assert gain.significant and not gain.significant_loss
    assert "+5.00 points, significant gain" in gain.line()
    assert verdict([gain]) == 0
    assert verdict([gain, c]) == 1
    assert verdict([]) == 0


def test_half_point_at_n200_is_below_mde():
    a, b = _pairs(both=120, only_a=6, only_b=5, neither=69)
    sa, sb = _samples(a, b)
    c = compare("arc_easy", "reference", "vllm", sa, sb)
    assert c.diff_points == pytest.approx(-0.5)
    assert not c.significant and not c.significant_loss
    assert c.mcnemar.p_value == pytest.approx(1.0)
    assert c.mde_points > abs(c.diff_points)
    assert c.mde_points == pytest.approx((Z(0.975) + Z(0.8)) * math.sqrt(11 / 200 / 200) * 100, rel=1e-9)
    assert verdict([c]) == 0


def test_line_exact_for_constructed_case():
    c = Comparison(
        task="arc_easy", name_a="reference", name_b="vllm", metric="acc", n=570,
        accuracy_a=0.80, accuracy_b=0.7979, diff_points=-0.2105, mcnemar=McNemar(570, 12, 11, 0.4839),
        ci_points=(-1.2, 0.8), mde_points=1.94, loglik=None, alpha=0.05, power=0.8,
    )
    assert c.line() == (
        "vllm vs reference on arc_easy (n=570): \u22120.21 points, not significant "
        "(p=0.48; detectable at this n: 1.9 points)"
    )
    small_p = Comparison(**{**c.__dict__, "accuracy_b": 0.835, "diff_points": 3.5, "mcnemar": McNemar(570, 2, 22, 0.0000286)})
    assert small_p.line() == (
        "vllm vs reference on arc_easy (n=570): +3.50 points, significant gain "
        "(p=2.9e-05; detectable at this n: 1.9 points)"
    )


def test_mismatched_doc_sets_name_the_ids():
    a, b = _pairs(both=10, only_a=0, only_b=0, neither=0)
    sa, sb = _samples(a, b)
    sa = {k: v for k, v in sa.items() if k not in (3, 4)}
    for extra in range(100, 108):
        sa[extra] = sb[0]
    with pytest.raises(ValueError) as err:
        compare("arc_easy", "reference", "vllm", sa, sb)
    msg = str(err.value)
    assert "8 missing from vllm: [100, 101, 102, 103, 104] (+3 more)" in msg
    assert "2 missing from reference: [3, 4]" in msg
    assert "arc_easy" in msg


def test_compare_metric_and_loglik_handling():
    a, b = _pairs(both=40, only_a=3, only_b=1, neither=16)
    sa, sb = _samples(a, b, ll_shift=0.125)
    sb[5]["acc_norm"] = not sb[5]["acc_norm"]
    c = compare("hellaswag", "reference", "vllm", sa, sb, metric="acc_norm")
    assert c.metric == "acc_norm"
    assert c.mcnemar.discordant == 5
    assert c.loglik.pairs == 60 * 4
    assert c.loglik.mean == pytest.approx(0.125)
    # generation tasks record no log-likelihoods
    for s in (sa, sb):
        for v in s.values():
            del v["loglikelihoods"]
    assert compare("gsm8k", "reference", "vllm", sa, sb).loglik is None
    sa[0]["loglikelihoods"] = [-1.0]
    with pytest.raises(ValueError, match="doc 0"):
        compare("gsm8k", "reference", "vllm", sa, sb)
    sa[0]["acc"] = 0.5
    with pytest.raises(ValueError, match="doc 0 acc=0.5"):
        compare("gsm8k", "reference", "vllm", sa, sb)
    with pytest.raises(ValueError, match="no 'exact_match'"):
        compare("gsm8k", "reference", "vllm", sa, sb, metric="exact_match")


def test_to_dict_is_strict_json():
    a, b = _pairs(both=1250, only_a=150, only_b=50, neither=550)
    sa, sb = _samples(a, b)
    c = compare("arc_easy", "reference", "vllm", sa, sb)
    d = c.to_dict()
    back = json.loads(json.dumps(d, allow_nan=False))
    assert back["significant_loss"] is True and back["significant"] is True
    assert back["mcnemar"] == {"n": 2000, "only_a": 150, "only_b": 50, "p_value": c.mcnemar.p_value,
                               "discordant": 200}
    assert back["ci_points"] == list(c.ci_points)
    assert back["line"] == c.line()
    assert back["loglik"]["pairs"] == 8000
    one = _samples([True], [True], choices=1)
    d1 = compare("t", "a", "b", *one).to_dict()
    assert json.loads(json.dumps(d1, allow_nan=False))["loglik"]["std"] == 0.0
