"""The Tracker against a real MLflow server: dedupe by step, redaction, a server that goes away."""

import pytest
from mlflow.tracking import MlflowClient

from chatsft.config import load_config
from chatsft.errors import UserError
from chatsft.plan import tracking_uri
from chatsft.tracking import Tracker, check_server, redact, should_track

pytestmark = pytest.mark.slow


def test_redaction_of_credentials():
    assert redact("tracking.uri", "https://alice:s3cret@mlflow.example.com/") == "https://***@mlflow.example.com/"
    assert redact("data.train", "s3://bucket/x.jsonl?X-Amz-Signature=abc&y=1") == "s3://bucket/x.jsonl?X-Amz-Signature=***&y=1"
    assert redact("env.AWS_SECRET_ACCESS_KEY", "abc") == "***"
    assert redact("train.lr", 0.1) == 0.1


def test_default_store_is_sqlite_in_the_output_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"run.output_dir={tmp_path}/run"])
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/run/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking_uri(cfg) == "http://example:5000"
    assert tracking_uri(load_config(None, ["tracking.uri=http://x:1"])) == "http://x:1"


def test_unreachable_server_is_a_clear_error_before_compute(tmp_path):
    from tests.conftest import free_port

    uri = f"http://user:pw@127.0.0.1:{free_port()}"
    assert check_server(uri) is not None
    cfg = load_config(None, [f"tracking.uri={uri}"])
    with pytest.raises(UserError, match=r"tracking.uri: MLflow server http://\*\*\*@127.0.0.1:\d+ is unreachable"):
        should_track(cfg.tracking, uri)
    assert should_track(load_config(None, [f"tracking.uri={uri}", "tracking.required=false"]).tracking, uri) is False
    assert should_track(load_config(None, ["tracking.enabled=false"]).tracking, None) is False


def test_steps_are_logged_once_and_a_reopened_run_continues(mlflow_server):
    t = Tracker(mlflow_server.uri, "tracker-test", "dedupe")
    run_id = t.start()
    t.log_params({"train.lr": 0.1, "tracking.uri": "http://bob:pw@host"})
    for step in (1, 2, 3, 2, 3):  # a restarted worker group re-reports steps 2 and 3
        t.log_metrics({"train_loss": 10.0 - step}, step)
    t.finish()
    again = Tracker(mlflow_server.uri, "tracker-test", "dedupe", run_id=run_id)
    again.start()
    assert again.last_step == {"train_loss": 3}
    for step in (3, 4):
        again.log_metrics({"train_loss": 10.0 - step}, step)
    again.log_metrics({"eval_loss": 1.0}, 4)  # another metric at an already logged step still goes in
    assert again.metric_history("train_loss") == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]  # public, after the queue
    child = Tracker(mlflow_server.uri, "tracker-test", "child", parent_run_id=run_id)
    child.start()
    assert [r.info.run_id for r in again.child_runs()] == [child.run_id]
    again.set_tags({"best": "true"}, run_id=child.run_id)
    again.terminate(child.run_id, "KILLED")
    again.finish()
    assert MlflowClient(mlflow_server.uri).get_run(child.run_id).data.tags["best"] == "true"
    assert MlflowClient(mlflow_server.uri).get_run(child.run_id).info.status == "KILLED"
    client = MlflowClient(mlflow_server.uri)
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "eval_loss")] == [4]
    run = client.get_run(run_id)
    assert run.data.params["tracking.uri"] == "http://***@host" and run.info.status == "FINISHED"


def test_server_stopped_mid_run_drops_calls_and_reports_them(tmp_path, capsys):
    from tests.conftest import MlflowServer

    server = MlflowServer(tmp_path / "srv").start()
    t = Tracker(server.uri, "tracker-test", "goes-away", retries=1, backoff=0.05)
    t.start()
    t.log_metrics({"train_loss": 1.0}, 1)
    t.wait()
    server.stop()
    for step in range(2, 5):
        t.log_metrics({"train_loss": 1.0 / step}, step)  # must not raise or block
    t.finish(timeout=60)
    assert len(t.failures) >= 3 and all("log_metrics@" in f or "set_terminated" in f for f in t.failures)
    assert "logging call(s) failed and were dropped" in capsys.readouterr().out
