"""Welch's t-test against textbook values (two-sided 5% critical values of Student's t) and a hand computation."""
import math

import pytest

from mclfir_dist.evaluation.stats import t_two_sided_p, welch


@pytest.mark.parametrize("t,df,p", [(2.776, 4, 0.05), (2.228, 10, 0.05), (4.604, 4, 0.01), (1.0, 1, 0.5),
                                    (12.706, 1, 0.05), (1.96, 1e6, 0.05)])
def test_t_tail_matches_tables(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)


def test_welch_by_hand_and_the_verdicts():
    a, b = [57.2, 58.3, 57.8], [54.5, 54.7, 54.5]
    w = welch(a, b)
    va, vb = (sum((x - 57.766667) ** 2 for x in a) / 2) / 3, (sum((x - 54.566667) ** 2 for x in b) / 2) / 3
    assert w.t == pytest.approx((57.766667 - 54.566667) / math.sqrt(va + vb), rel=1e-5)
    assert w.df == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2), rel=1e-5)
    assert w.verdict() == "above" and w.p < 0.05
    assert welch(b, a).verdict() == "below"
    assert welch([55.1, 54.7, 55.4], [54.5, 54.7, 54.5]).verdict() == "not distinguishable"
    with pytest.raises(ValueError):
        welch([1.0], [1.0, 2.0])


def test_p_values_print_three_decimals_or_an_upper_bound():
    from mclfir_dist.evaluation.stats import p_text
    assert p_text(0.0123) == "p = 0.012" and p_text(0.0004) == "p < 0.001" and p_text(0.0005) == "p = 0.001"


def test_paired_t_matches_a_hand_computation_and_scipy():
    from scipy import stats as st
    from mclfir_dist.evaluation.stats import paired
    a, b = [0.52, 0.55, 0.51, 0.56], [0.50, 0.52, 0.50, 0.53]
    r = paired(a, b)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    half = 3.182446 * sd / 2   # t(0.975, 3)
    assert r.mean == pytest.approx(mean) and r.low == pytest.approx(mean - half, rel=1e-5)
    assert r.high == pytest.approx(mean + half, rel=1e-5) and r.d_z == pytest.approx(mean / sd)
    assert r.p == pytest.approx(st.ttest_rel(a, b).pvalue) and r.verdict() == "above"
    assert paired(b, a).verdict() == "below" and paired(a, a).verdict() == "not distinguishable"
    # the pairing matters: the same values unpaired are not distinguishable
    assert welch(a, b).verdict() == "not distinguishable"
    with pytest.raises(ValueError):
        paired([1.0, 2.0], [1.0])


def test_tost_is_equivalent_only_when_the_90pct_interval_is_inside_the_margin():
    from mclfir_dist.evaluation.stats import tost_paired
    a, b = [0.520, 0.531, 0.515, 0.526, 0.522], [0.518, 0.527, 0.519, 0.521, 0.520]
    inside = tost_paired(a, b, margin=0.01)
    assert inside.verdict() == "equivalent" and -0.01 < inside.low < inside.high < 0.01
    outside = tost_paired(a, b, margin=0.002)
    assert outside.verdict() == "not shown equivalent" and (outside.high > 0.002 or outside.low < -0.002)
    # a large difference is never equivalent, whatever its spread
    assert tost_paired([x + 0.05 for x in a], b, margin=0.01).verdict() == "not shown equivalent"


def test_holm_adjusts_step_down_and_keeps_the_order():
    from mclfir_dist.evaluation.stats import holm
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5] and holm([0.2, 0.9]) == pytest.approx([0.4, 0.9])
