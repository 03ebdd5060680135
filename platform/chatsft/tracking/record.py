"""chatsft's side of an MLflow run: what the driver records (`RunRecord`: config, data
statistics, final results, the model) and what rank 0 logs each step (`StepLogger`).

Steps already logged are not logged again, so a worker group restarted from a
checkpoint continues the same run without duplicates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from chatsft import storage
from chatsft.console import notes_to_log
from chatsft.errors import UserError, one_line
from chatsft.tracking.client import Tracker
from chatsft.tracking.plots import plot_data, plot_goodput, plot_losses
from chatsft.tracking.redaction import redact

# What a prepared split's folder holds that the run keeps as artifacts.
SPLIT_FILES = ("stats.json", "template_report.txt", "mask_preview.html", "bad_records.jsonl")


class StepLogger:
    """Rank 0's per-step metrics -> the run. Picklable: it travels to the Ray worker and opens
    its own client there; a restarted worker reopens the run and skips steps already logged.
    (A plain class, not a dataclass: `dataclasses.asdict` of the worker arguments must not
    turn it into a dict.)"""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str) -> None:
        self.uri, self.experiment, self.run_name, self.run_id = uri, experiment, run_name, run_id
        self._tracker: Optional[Tracker] = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_tracker"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tracker = None

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        if self._tracker is None:
            self._tracker = Tracker(self.uri, self.experiment, self.run_name, run_id=self.run_id)
            try:
                self._tracker.start()
            except UserError as e:  # the server went away after the start check: train on, say so
                print(f"warning: {e}; step metrics are not logged")
                self._tracker = None
                return
        self._tracker.log_metrics(metrics, step)

    def flush(self, timeout: float) -> None:
        """Until what is queued has been sent (or `timeout` passed): before a checkpoint, so the
        steps it holds are not logged again, or lost, by a restart from it."""
        if self._tracker is not None:
            self._tracker.wait(timeout)

    def close(self) -> None:
        if self._tracker is not None:
            self._tracker.finish(status=None)


@dataclass
class RunRecord:
    """The driver's side of a training run: config, data, final results, model."""

    cfg: Any
    tracker: Tracker

    @classmethod
    def start(cls, cfg: Any, uri: str, *, run_name: Optional[str] = None, parent_run_id: Optional[str] = None,
              tags: Optional[dict[str, str]] = None) -> "RunRecord":
        t = Tracker(uri, cfg.tracking.experiment, run_name or cfg.run.name,
                    parent_run_id=parent_run_id, tags=dict(tags or {}))
        t.start()
        t.log_params(cfg.flat())
        t.log_text(cfg.to_yaml(), "config.yaml")
        print(f"[chatsft] MLflow run {t.run_id} at {redact('uri', t.uri)} (experiment {cfg.tracking.experiment})")
        return cls(cfg, t)

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    def step_logger(self) -> StepLogger:
        t = self.tracker
        return StepLogger(t.uri, t.experiment, t.run_name, t.run_id)

    def log_data(self, train_dir: str, eval_dir: Optional[str]) -> None:
        """Each prepared split: stats.json's numbers as metrics, its files as artifacts, a plot."""
        for split, folder in (("train", train_dir), ("eval", eval_dir)):
            if not folder:
                continue
            text = storage.read_text(storage.join(folder, "stats.json"))
            if text is not None:
                self.tracker.log_values(_flat_stats(json.loads(text), split))
                for name in SPLIT_FILES:
                    content = storage.read_text(storage.join(folder, name))
                    if content is not None:
                        self.tracker.log_text(content, f"data/{split}/{name}")
            fig = plot_data(folder)
            if fig is not None:
                self.tracker.log_figure(fig, f"plots/data_{split}.png")

    def complete(self, metrics: dict[str, Any], model_dir: Optional[str], checkpoint: Optional[str],
                 *, mlflow_task: str = "text-generation", auto_class: str = "AutoModelForCausalLM") -> None:
        """Final metrics, the loss plot, the model (`mlflow_task` and `auto_class` are the model
        kind's: MLflow's pipeline task and the transformers class that loads it), then the end."""
        t = self.tracker
        final = {f"final/{k}": v for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        t.log_values(final, step=int(metrics.get("step", 0) or 0))
        if checkpoint:
            t.set_tags({"checkpoint": redact("checkpoint", checkpoint)})
        fig = plot_losses({key: t.metric_history(key) for key in ("train_loss", "eval_loss")})
        if fig is not None:
            t.log_figure(fig, "plots/loss.png")
        if model_dir and self.cfg.tracking.log_model and storage.is_dir(model_dir):
            adapter = storage.exists(storage.join(model_dir, "adapter_config.json"))
            t.set_tags({"model_dir": model_dir})
            self._log_model(model_dir, mlflow_task, auto_class, flavor=not adapter)
        t.finish("FINISHED")

    def log_resume(self, resume: dict) -> None:
        """A resumed run: where from, and the settings that changed (applied from that step)."""
        self.tracker.set_tags({"resumed_from": resume["checkpoint"], "resumed_at_step": resume["step"],
                               "resume_changed": ", ".join(resume["changed"]) or "nothing"})
        self.tracker.log_text(json.dumps(resume, indent=2, default=str), "resume.json")

    def log_stalls(self, folder: str, reasons: list[str]) -> None:
        """Attempts the hang watchdog stopped: every rank's stacks and the one-line reason of each,
        as artifacts under stalls/ (read from the run's storage, where the workers left them)."""
        for f in storage.list_files(folder, recursive=True):
            text = storage.read_text(f.path)
            if text is not None:
                inner = f.path[len(folder.rstrip("/")) + 1:]
                self.tracker.log_text(text, f"stalls/{inner}")
        self.tracker.set_tags({"stalls": len(reasons), "stall_reason": reasons[-1] if reasons else ""})

    def log_goodput(self, goodput: dict) -> None:
        """The run's goodput (train/goodput.py): a metric per cause, the breakdown as a bar plot and
        JSON, and the preemptions and stragglers as tags."""
        t = self.tracker
        t.log_values({"goodput": goodput["goodput"], **{f"goodput/{k}": v for k, v in goodput["shares"].items()}},
                     step=0)
        t.log_text(json.dumps(goodput, indent=2), "goodput.json")
        t.set_tags({"goodput": goodput["line"], "preemptions": len(goodput["preemptions"]),
                    "stragglers": "; ".join(goodput.get("stragglers", [])) or "none"})
        fig = plot_goodput(goodput)
        if fig is not None:
            t.log_figure(fig, "plots/goodput.png")

    def fail(self, error: BaseException) -> None:
        self.tracker.set_tags({"error": one_line(error)})
        self.tracker.finish("FAILED")

    def _log_model(self, model_dir: str, task: str, auto_class: str, *, flavor: bool,
                   flavor_max_bytes: int = 2 << 30) -> None:
        """The exported HF folder as an MLflow `transformers` model when it is small enough to
        load here (MLflow's flavor needs the objects: logging from a checkpoint path is broken
        with transformers 5), else as a plain artifact folder `model/`."""
        t = self.tracker
        register_as = self.cfg.tracking.register_as

        def call(client) -> None:
            with storage.scratch("chatsft-mlflow-model-") as tmp:
                local = model_dir
                if storage.is_uri(model_dir):  # MLflow reads the folder from local disk
                    storage.copy_tree(model_dir, tmp)
                    local = tmp
                uri = log(client, local)
            client.set_tag(t.run_id, "model_uri", uri)  # where to load it from
            if register_as:
                t.register_model(uri, register_as)

        def log(client, local: str) -> str:
            import mlflow

            size = sum(p.stat().st_size for p in Path(local).rglob("*") if p.is_file())
            if flavor and size <= flavor_max_bytes:
                # MLflow looks for a model card and a license of a local model on the hub, and warns;
                # transformers imports DeepSpeed there, which says which accelerator it guessed
                with t.fluent_run(), notes_to_log("mlflow", "transformers", "huggingface_hub", "DeepSpeed"):
                    info = mlflow.transformers.log_model(
                        transformers_model=_load_for_mlflow(local, auto_class), name="model", task=task,
                        pip_requirements=_pip_requirements())
                return info.model_uri
            client.log_artifacts(t.run_id, local, "model")
            return f"runs:/{t.run_id}/model"

        t.submit("model", call)


def _flat_stats(stats: dict, split: str) -> dict[str, Any]:
    flat = {}
    for k, v in stats.items():
        if isinstance(v, dict):
            flat.update({f"data/{split}/{k}/{kk}": vv for kk, vv in v.items()})
        else:
            flat[f"data/{split}/{k}"] = v
    return flat


def _load_for_mlflow(model_dir: str, auto_class: str) -> dict:
    import transformers

    cls = getattr(transformers, auto_class)
    return {"model": cls.from_pretrained(model_dir), "tokenizer": transformers.AutoTokenizer.from_pretrained(model_dir)}


def _pip_requirements() -> list[str]:
    # Stated, not inferred: MLflow's inference imports torchvision, which has no CPU wheel here.
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in ("torch", "transformers", "tokenizers", "safetensors", "peft"):
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pass
    return reqs
