"""Best-fit-decreasing packing: every sample exactly once, no row over capacity, little padding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatsft.data.packing import best_fit_decreasing, fill_pad_fraction, pack_in_windows
from chatsft.data.stats import batch_pad_fraction


def naive_bfd(lengths, capacity):
    """Quadratic reference: longest first, into the fullest bin that still fits (lowest id on ties)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, free = [], []
    for i in order:
        fits = [b for b in range(len(bins)) if free[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (free[b], b))
        else:
            b = len(bins)
            bins.append([])
            free.append(capacity)
        bins[b].append(i)
        free[b] -= lengths[i]
    return [sorted(b) for b in bins]


lengths_and_capacity = st.integers(1, 300).flatmap(
    lambda cap: st.tuples(st.lists(st.integers(1, cap), max_size=300), st.just(cap)))


@settings(max_examples=300, deadline=None)
@given(lengths_and_capacity)
def test_bfd_properties(case):
    lengths, cap = case
    bins = best_fit_decreasing(lengths, cap)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))  # every index exactly once
    sizes = [sum(lengths[i] for i in b) for b in bins]
    assert all(0 < s <= cap for s in sizes)  # no bin over capacity, none empty
    # A bin is only opened when no earlier bin had room, and bins only grow:
    # so any two bins together overflow, i.e. at most one bin is half empty.
    if len(sizes) >= 2:
        a, b = sorted(sizes)[:2]
        assert a + b > cap
    assert all(b == sorted(b) for b in bins)
    assert bins == naive_bfd(lengths, cap)  # the fast search picks what the definition says


@settings(max_examples=100, deadline=None)
@given(lengths_and_capacity, st.integers(1, 50))
def test_windows_cover_every_index_once(case, window):
    lengths, cap = case
    bins = pack_in_windows(lengths, cap, window)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert sum(lengths[i] for i in b) <= cap
        assert b[-1] // window == b[0] // window  # a bin never spans two windows


def test_exact_fit_and_order():
    # 7+3, 6+4, 5+5 fill three bins of 10 exactly; indices come back ascending.
    assert best_fit_decreasing([3, 7, 6, 4, 5, 5], 10) == [[0, 1], [2, 3], [4, 5]]
    assert best_fit_decreasing([], 10) == []


def test_rejects_items_that_cannot_fit():
    with pytest.raises(ValueError, match="item 1 has length 11"):
        best_fit_decreasing([3, 11], 10)
    with pytest.raises(ValueError):
        best_fit_decreasing([0], 10)


def test_padding_on_lognormal_lengths_is_small():
    # A realistic spread: log-normal lengths, median 300 tokens, cut at max_length 2048.
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(np.log(300), 0.8, 20000)), 1, 2048).astype(int).tolist()
    bins = pack_in_windows(lengths, 2048, 8192)
    sizes = [sum(lengths[i] for i in b) for b in bins]
    packed = fill_pad_fraction(sizes, 2048)
    per_batch = batch_pad_fraction(lengths, 4)
    assert packed < 0.03
    assert per_batch > 10 * packed  # what packing saves against padding each batch


def test_batch_pad_fraction():
    # batches [1, 3] -> 2 x 3 and [2] -> 1 x 2: 8 slots, 6 tokens.
    assert batch_pad_fraction([1, 3, 2], 2) == pytest.approx(1 - 6 / 8)
    assert batch_pad_fraction([5, 5, 5], 2) == 0.0
    assert batch_pad_fraction([], 4) == 0.0
    assert fill_pad_fraction([2048, 1024], 2048) == pytest.approx(0.25)


def test_pad_summaries_of_runs_give_the_slots_of_the_whole():
    """prepare's write tasks return a pad_summary of their part's rows, not the rows' lengths; over
    the parts in order they give exactly the slots of the whole sequence, however it is cut."""
    import random

    import numpy as np

    from chatsft.data.stats import batch_padded_slots, pad_summary, padded_slots_of_runs

    rng = random.Random(0)
    for _ in range(300):
        mb = rng.choice([1, 2, 3, 4, 8])
        lengths = np.array([rng.randint(1, 50) for _ in range(rng.randint(0, 120))], np.int64)
        cuts = sorted(rng.sample(range(len(lengths) + 1), rng.randint(0, min(6, len(lengths) + 1))))
        runs = [lengths[a:b] for a, b in zip([0, *cuts], [*cuts, len(lengths)])]
        got = padded_slots_of_runs([pad_summary(r, mb) for r in runs], mb)
        assert got == batch_padded_slots(lengths, mb)
        assert sum(pad_summary(r, mb)["tokens"] for r in runs) == int(lengths.sum())
