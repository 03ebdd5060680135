"""Learning-rate schedules and step counts."""

import math

import pytest

from chatsft.config import TrainConfig
from chatsft.train.schedule import lr_multiplier, total_steps, warmup_steps


def test_total_steps_counts_partial_batches_and_caps():
    assert total_steps(rows=100, global_batch=16, epochs=1, max_steps=0) == 7
    assert total_steps(rows=100, global_batch=16, epochs=3, max_steps=0) == 21
    assert total_steps(rows=100, global_batch=16, epochs=3, max_steps=5) == 5
    assert total_steps(rows=3, global_batch=16, epochs=1, max_steps=0) == 1


def test_linear_decays_to_zero_from_init_frac():
    t = TrainConfig(schedule="linear", init_lr_frac=0.5)
    m = [lr_multiplier(s, 10, t) for s in range(10)]
    assert m[0] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(m, m[1:]))
    assert m[-1] == pytest.approx(0.05)  # one step before zero


def test_cosine_with_warmup_reaches_floor():
    t = TrainConfig(schedule="cosine", warmup_steps=4, min_lr_frac=0.1)
    m = [lr_multiplier(s, 20, t) for s in range(21)]
    assert m[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert m[4] == pytest.approx(1.0)
    assert m[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(m[4:], m[5:]))
    mid = 4 + 8  # half way through the decay
    assert m[mid] == pytest.approx(0.1 + 0.9 * 0.5)


def test_constant_with_warmup_ratio():
    t = TrainConfig(schedule="constant", warmup_ratio=0.2)
    assert warmup_steps(t, 10) == 2
    m = [lr_multiplier(s, 10, t) for s in range(10)]
    assert m == pytest.approx([0.5, 1.0] + [1.0] * 8)


def test_multiplier_is_finite_for_one_step_runs():
    for sched in ("linear", "cosine", "constant"):
        t = TrainConfig(schedule=sched, warmup_steps=5)
        assert math.isfinite(lr_multiplier(0, 1, t))
