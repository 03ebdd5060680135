"""pass@k against its closed form, and exact-match normalization."""

from __future__ import annotations

import math

import pytest

from chatsft.eval.metrics import exact_match, mean_pass_at_k, normalize, pass_at_k


def closed_form(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n,c,k", [
    (1, 0, 1), (1, 1, 1), (5, 0, 1), (5, 5, 1), (5, 5, 5), (5, 2, 1), (5, 2, 3), (5, 2, 4),
    (10, 3, 2), (10, 1, 10), (10, 9, 2), (20, 7, 5), (50, 1, 1), (50, 25, 10), (100, 3, 50),
])
def test_pass_at_k_matches_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 3) == 0.0  # nothing passed: no draw passes
    assert pass_at_k(10, 10, 3) == 1.0  # everything passed
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k: every draw of 3 holds a pass
    assert pass_at_k(10, 4, 1) == pytest.approx(0.4)  # pass@1 is the pass fraction
    # n - c == k: exactly one draw of k (all the failures) fails.
    assert pass_at_k(10, 7, 3) == pytest.approx(1.0 - 1.0 / math.comb(10, 3))
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_k_stable_for_large_n():
    # comb(2000, 1000) has ~600 digits; the product form stays exact to float precision.
    n, c, k = 2000, 3, 1000
    expected = 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-9)
    assert 0.0 < pass_at_k(n, c, k) < 1.0


def test_mean_pass_at_k_averages_prompts_and_thresholds_scores():
    scores = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.6, 0.4, 1.0, 1.0]]  # c = 1, 0, 3
    for k in (1, 2, 3):
        want = (closed_form(4, 1, k) + closed_form(4, 0, k) + closed_form(4, 3, k)) / 3
        assert mean_pass_at_k(scores, k) == pytest.approx(want)
    assert mean_pass_at_k([], 1) == 0.0


@pytest.mark.parametrize("output,reference,match", [
    ("Your number is 23.", "Your number is 23.", True),
    ("  your   NUMBER is\n23 ", "Your number is 23.", True),
    ("Your number is 23!!", "Your number is 23", True),
    ("Straße.", "STRASSE", True),  # casefold, not lower
    ("Your number is 24.", "Your number is 23.", False),
    ("Your number is 23. Bye.", "Your number is 23.", False),
    ("", "Your number is 23.", False),
    ("...", "", True),
])
def test_exact_match_normalization(output, reference, match):
    assert exact_match(output, reference) == (1.0 if match else 0.0)


def test_normalize_keeps_inner_punctuation():
    assert normalize(" A,  b.c ?! ") == "a, b.c"
