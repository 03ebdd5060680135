"""A real sweep on a local Ray: 2 learning rates x 2 epoch counts, one learning rate absurd."""

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from chatsft.config import load_config
from chatsft.sweep import sweep

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_sweep_stops_the_absurd_trials_and_picks_the_sane_one(tmp_path, local_ray, capsys):
    cfg = load_config(REPO / "configs" / "tiny-sweep.yaml", [
        f"run.output_dir={tmp_path}/sweep",
        # Small and quick: 10 steps an epoch, an evaluation every 3; one worker per trial
        # needs no ZeRO sharding, so the plain torch engine spares DeepSpeed's start-up.
        "data.train=[{path: chatsft://samples/train.jsonl, weight: 0.05}]",
        "data.eval=[{path: chatsft://samples/heldout.jsonl, weight: 0.1}]",
        "train.eval_every=3", "train.log_every=3", "data.max_length=192", "train.engine=ddp",
        "train.warmup_steps=2", "eval.tasks=[]",
    ])
    result = sweep(cfg)
    out = capsys.readouterr().out

    assert len(result.trials) == 4
    lrs = {t.name: float(t.params["train.lr"]) for t in result.trials}
    assert sorted(set(lrs.values())) == [3e-3, 3.0]
    # The scheduler stopped at least one trial before its end, and the absurd ones never win.
    assert any(t.status == "STOPPED" for t in result.trials), out
    assert float(result.best.params["train.lr"]) == 3e-3
    for t in result.trials:
        if lrs[t.name] == 3.0 and t.best is not None:
            assert t.best > result.best.best
    assert result.best_model_dir and os.path.exists(os.path.join(result.best_model_dir, "config.json"))
    assert result.best_config.train.lr == 3e-3
    assert "best eval_loss" in out and "STOPPED" in out

    # MLflow: one parent run, a child run per trial, the best child tagged.
    client = MlflowClient(f"sqlite:///{tmp_path}/sweep/mlflow.db")
    exp = client.get_experiment_by_name("chatsft")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    assert len(children) == 4
    best = [c for c in children if c.data.tags.get("best") == "true"]
    assert len(best) == 1 and float(best[0].data.params["train.lr"]) == 3e-3
    assert all("eval_loss" in c.data.metrics for c in children)
    assert parents[0].data.tags["best_run_id"] == best[0].info.run_id
