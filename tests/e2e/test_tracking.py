"""Training runs recorded in a real `mlflow server`: what a run holds, restarts, a server that dies."""

import os
import tempfile

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from chatsft.config import load_config
from chatsft.train.driver import train
from tests.faults import ExitOnce

pytestmark = pytest.mark.slow


def tiny(tmp_path, uri, experiment, *more):
    return load_config(None, [
        f"run.output_dir={tmp_path}/run", "run.name=tracked", "model.name_or_path=builtin:tiny-llama",
        "data.train=[{path: chatsft://samples/train.jsonl, weight: 0.05}]",
        "data.eval=[{path: chatsft://samples/heldout.jsonl, weight: 0.1}]", "data.max_length=192",
        "train.micro_batch_size=4", "train.lr=3e-3", "train.precision=fp32", "train.max_steps=12",
        "train.log_every=3", "train.eval_every=6", "scaling.num_workers=1",
        f"tracking.uri={uri}", f"tracking.experiment={experiment}", *more])


def only_run(client, experiment):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def artifacts(client, run_id, path=""):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_a_training_run_holds_params_metrics_stats_preview_plots_and_a_model(tmp_path, mlflow_server, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    systmp = tmp_path / "systmp"  # this process's temp dir, to see what the run leaves there
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    result = train(tiny(tmp_path, mlflow_server.uri, "record"), local=True)
    left = sorted(p.name for p in systmp.iterdir())
    assert not [name for name in left if name.startswith("chatsft-")], left  # plots, models, checkpoints
    # Logging the model used MLflow's global URI; a later run in this process must not inherit it.
    assert "MLFLOW_TRACKING_URI" not in os.environ and not mlflow.get_tracking_uri().startswith("http")
    client = MlflowClient(mlflow_server.uri)
    run = only_run(client, "record")
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.lr"] == "0.003" and params["data.template"] == "chatml"
    assert steps(client, run.info.run_id, "train_loss") == [3, 6, 9, 12]
    assert steps(client, run.info.run_id, "eval_loss") == [0, 6, 12]
    first, *_, last = client.get_metric_history(run.info.run_id, "eval_loss")
    assert last.value < first.value
    for key in ("lr", "grad_norm", "supervised_tokens", "tokens_per_second", "skipped_steps"):
        assert steps(client, run.info.run_id, key) == [3, 6, 9, 12], key
    m = run.data.metrics
    assert 0 < m["data/train/supervision_ratio"] < 1 and m["data/train/records_bad"] == 0
    assert "data/eval/samples" in m and "data/train/pad_fraction" in m
    assert m["data/train/serving_parity"] == 1.0  # chatml trained as the tokenizer's own template serves it
    files = set(artifacts(client, run.info.run_id))
    assert {"config.yaml", "data/train/stats.json", "data/train/mask_preview.html", "data/eval/stats.json",
            "plots/loss.png", "plots/data_train.png"} <= files

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # as a user loading runs:/ would
    model = mlflow.transformers.load_model(run.data.tags["model_uri"], return_type="components")
    tok = model["tokenizer"]
    prompt = "<|im_start|>user\nHi! My name is Maya.<|im_end|>\n<|im_start|>assistant\n"
    out = model["model"].generate(**tok(prompt, return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > len(tok(prompt)["input_ids"])


def test_a_restarted_run_logs_each_step_exactly_once(tmp_path, mlflow_server, monkeypatch, local_ray):
    marker = tmp_path / "failed-once"
    # dies after step 7, past the step-6 checkpoint: step 7 runs twice
    result = train(tiny(tmp_path, mlflow_server.uri, "restart", "train.log_every=1",
                        "train.save_every=6", "scaling.max_failures=1"), hooks=[ExitOnce(7, marker)])
    assert marker.exists(), "the worker was never killed"
    client = MlflowClient(mlflow_server.uri)
    run = only_run(client, "restart")
    assert result.metrics["step"] == 12
    for key in ("train_loss", "lr", "supervised_tokens"):
        assert steps(client, run.info.run_id, key) == list(range(1, 13)), key
    assert steps(client, run.info.run_id, "eval_loss") == [0, 6, 12]


def test_the_server_stopped_mid_run_does_not_stop_training(tmp_path, capsys):
    from tests.conftest import MlflowServer

    server = MlflowServer(tmp_path / "server").start()

    def stop_at_step_4(step, metrics):
        if step == 6 and server.proc is not None:
            server.stop()

    try:
        result = train(tiny(tmp_path, server.uri, "dies"), local=True, callbacks=[stop_at_step_4])
    finally:
        server.stop()
    assert result.metrics["step"] == 12 and os.path.exists(os.path.join(result.model_dir, "config.json"))
    out = capsys.readouterr().out
    assert "MLflow:" in out and "logging call(s) failed and were dropped" in out
