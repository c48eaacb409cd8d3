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
