"""The resume contract allows another worker count (the rows per step stay the checkpoint's,
accumulation follows) and still refuses a change of the global batch."""

import pytest

from chatsft.errors import UserError
from chatsft.train.resume import _differences, _elastic


def manifest(micro, accum, workers, rows_per_step=None):
    return {"version": 2, "rows": None, "model": {}, "method": {}, "optimization": {},
            "rows_per_step": rows_per_step or micro * accum * workers,
            "batch": {"micro_batch_size": micro, "grad_accum": accum, "workers": workers}}


def test_worker_count_alone_is_elastic():
    theirs = manifest(2, 2, 3)  # 12 rows a step
    assert _elastic(theirs, manifest(2, 2, 2), lambda: 3) == ((3, 2), (2, 3))
    assert _elastic(theirs, manifest(2, 2, 6), lambda: 3) == ((3, 6), (2, 1))
    assert _elastic(theirs, manifest(2, 2, 3), lambda: 3) == (None, None)  # nothing changed


def test_a_resumed_elastic_run_resumes_again_with_its_config():
    # saved by 2 workers after an elastic resume (accumulation 3 in effect, 2 configured)
    theirs = manifest(2, 2, 2, rows_per_step=12)
    assert _elastic(theirs, manifest(2, 2, 2), lambda: 2) == ((2, 2), (3, 3))


def test_a_batch_change_is_refused_and_an_impossible_share_named():
    theirs = manifest(2, 2, 3)
    mine = manifest(4, 2, 2)  # micro-batch changed too: the global batch would change
    assert _elastic(theirs, mine, lambda: 3) == (None, None)
    assert any("rows per optimizer step" in d for d in _differences(theirs, mine))
    with pytest.raises(UserError) as e:
        _elastic(theirs, manifest(2, 2, 5), lambda: 3)
    assert "scaling.num_workers=5" in str(e.value) and "12 rows per optimizer step" in str(e.value)


def test_elastic_worker_range_must_share_the_rows_per_step():
    from chatsft.config import ConfigError, load_config
    from chatsft.plan import RunPlan

    base = ["tracking.enabled=false", "train.micro_batch_size=1", "train.grad_accum=3", "scaling.num_workers=4"]
    with pytest.raises(ConfigError) as e:  # 12 rows a step: 2, 3 and 4 share them, 5 would not
        RunPlan.resolve(load_config(None, base + ["scaling.min_workers=5"]))
    assert "scaling.min_workers" in str(e.value)
    assert RunPlan.resolve(load_config(None, base + ["scaling.min_workers=2"])).global_batch == 12
    with pytest.raises(ConfigError) as e:
        RunPlan.resolve(load_config(None, base[:-2] + ["train.grad_accum=1", "scaling.num_workers=4",
                                                       "scaling.min_workers=3"]))
    assert "with 3 workers the 4 rows per step" in str(e.value)
