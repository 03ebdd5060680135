"""The run plan: facts about a run, resolved once from the Config and handed to every stage.

`RunPlan.resolve(cfg)` answers, in one place and before any compute, what the
stages would otherwise each work out again: the kind of model (read from its
config.json), where things are stored (absolute local paths or URIs), the
tracking store, the global batch, the resources of one worker and where the
eval split comes from. It also checks the rules that need such facts (a
seq2seq model cannot be packed); rules that need the config alone are checked
when the config loads (config.py).

The plan is plain data: it travels to Ray workers with the config inside it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from chatsft import storage
from chatsft.config import Config, ConfigError
from chatsft.data.options import Organization
from chatsft.model.kind import ModelKind

EvalSplit = Literal["none", "sources", "carve"]


@dataclass(frozen=True)
class RunPlan:
    config: Config
    kind: ModelKind  # the model's kind, as the one object every stage asks (model/kind.py)
    local: bool  # --local: the loop runs in this process, one worker, no Ray
    output_dir: str  # absolute local path or URI
    tracking_uri: Optional[str]  # None when tracking is off
    workers: int
    global_batch: int  # rows per optimizer step over all workers: micro x accum x data-parallel workers
    worker_resources: dict  # Ray resources of one training worker
    threads: int  # CPU threads of one training worker (torch intra-op, Arrow)
    eval_split: EvalSplit  # "sources": data.eval; "carve": data.eval_fraction of train; "none"
    # The run's exported Hugging Face folder and its result.json: <output_dir>/model and
    # <output_dir>/result.json, unless those are another run name's; then in <output_dir>/<run.name>/
    # (`run_files`).
    model_dir: str
    result_path: str

    # ---------------------------------------------------------------- locations

    @property
    def data_dir(self) -> str:
        """Prepared rows, stats.json and the mask preview of each split."""
        return storage.join(self.output_dir, "data")

    @property
    def checkpoint_dir(self) -> str:
        """Where this run's checkpoints are: Ray Train's run folder (storage_path/name), which
        --local uses too, so either mode resumes the other's checkpoints."""
        return storage.join(self.output_dir, self.config.run.name)

    @property
    def sequence_parallel(self) -> int:
        return self.config.scaling.sequence_parallel

    @property
    def data_parallel(self) -> int:
        """Workers that read distinct rows: the N ranks of a sequence group read the same ones."""
        return self.workers // self.sequence_parallel

    @property
    def layout(self) -> str:
        """The run's layout in one line (the log at the start, MLflow's `layout` param)."""
        return self.layout_at(self.workers)

    def layout_at(self, workers: int) -> str:
        """The layout on `workers` workers (an elastic or resumed run may have another count)."""
        n, length = self.sequence_parallel, self.config.data.max_length
        noun = "worker" if workers == 1 else "workers"
        if n == 1:
            return f"{workers} {noun}: {workers} data-parallel; each rank holds whole rows of up to {length:,} tokens"
        return (f"{workers} {noun}: {workers // n} data-parallel x {n} sequence-parallel; each rank holds "
                f"{-(-length // n):,} of {length:,} tokens")

    @property
    def local_batch_note(self) -> Optional[str]:
        """--local trains one worker: when the config's scaling.num_workers would take more rows per
        optimizer step, the line that says so (None when the two agree)."""
        tr, workers = self.config.train, self.config.scaling.num_workers
        if not self.local or workers == 1:
            return None
        return (f"--local trains 1 worker: {self.global_batch} rows per optimizer step (train.micro_batch_size "
                f"{tr.micro_batch_size} x train.grad_accum {tr.grad_accum}), not the "
                f"{self.global_batch * workers} of the config's scaling.num_workers={workers}; set "
                f"train.grad_accum={tr.grad_accum * workers} for the same batch")

    # ---------------------------------------------------------------- resolving

    @classmethod
    def resolve(cls, cfg: Config, *, local: bool = False) -> "RunPlan":
        from chatsft.model.check import check_model
        from chatsft.model.kind import resolve_kind

        kind = resolve_kind(cfg.model)
        _check_kind(cfg, kind)
        check_model(cfg, kind)
        _check_output(cfg.run.output_dir)
        sc = cfg.scaling
        workers = 1 if local else sc.num_workers
        resources = dict(sc.resources_per_worker) or {"CPU": 1.0}
        if sc.use_gpu:
            resources.setdefault("GPU", 1.0)
        n = sc.sequence_parallel
        if n > 1 and local:
            raise ConfigError(f"scaling.sequence_parallel={n}: --local trains one worker and a sequence needs "
                              f"{n}; run on Ray (without --local) or set scaling.sequence_parallel=1")
        global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * (workers // n)
        if not local:
            _check_elastic(sc.min_workers // n, workers // n, cfg.train.micro_batch_size, global_batch)
        threads = cfg.train.threads or (local_cores() if local else max(1, int(resources.get("CPU", 1))))
        _check_stores(cfg)
        output_dir = storage.absolute(cfg.run.output_dir)
        model_dir, result_path = run_files(output_dir, cfg.run.name)
        _check_rows_folder(cfg.run.output_dir, storage.join(output_dir, "data"))
        return cls(
            config=cfg,
            kind=kind,
            local=local,
            output_dir=output_dir,
            tracking_uri=tracking_uri(cfg) if cfg.tracking.enabled else None,
            workers=workers,
            global_batch=global_batch,
            worker_resources=resources,
            threads=threads,
            eval_split="sources" if cfg.data.eval else ("carve" if cfg.data.eval_fraction > 0 else "none"),
            model_dir=model_dir,
            result_path=result_path,
        )


RESULT = "result.json"
EXPORT_MARKER = "chatsft_export.json"  # what chatsft writes into every model folder it exports


def run_files(output_dir: str, name: str) -> tuple[str, str]:
    """(model folder, result.json) of run `name` in `output_dir`. The folder's own `model/` and
    `result.json` belong to the first run name that writes them, so a folder of one run reads as it
    always did; a run of another name gets its own, in its checkpoint folder `<name>/`, and never
    overwrites the first one's. A run that has its own there keeps them there."""
    own = storage.join(output_dir, name)
    if storage.exists(storage.join(own, RESULT)) or storage.exists(storage.join(own, "model")):
        return storage.join(own, "model"), storage.join(own, RESULT)
    owner = _owner(output_dir)
    if owner is None or owner == name:
        return storage.join(output_dir, "model"), storage.join(output_dir, RESULT)
    return storage.join(own, "model"), storage.join(own, RESULT)


def _owner(output_dir: str) -> Optional[str]:
    """The run name whose `model/` and `result.json` are at the top of `output_dir`: None when
    there are none, "?" when they are there but say no name (files chatsft cannot place are
    taken for someone else's)."""
    import json

    for path in (storage.join(output_dir, RESULT), storage.join(output_dir, "model", EXPORT_MARKER)):
        raw = storage.read_bytes(path)
        if raw is None:
            continue
        try:
            data = json.loads(raw)
        except ValueError:  # UnicodeDecodeError too
            return "?"
        if not isinstance(data, dict):
            return "?"
        if data.get("run"):
            return str(data["run"])
        if data.get("checkpoint"):  # a result.json of an older chatsft: <output_dir>/<name>/checkpoint_N
            return storage.basename(str(data["checkpoint"]).rstrip("/").rsplit("/", 1)[0])
        return "?"
    return "?" if storage.exists(storage.join(output_dir, "model")) else None


def local_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1


def tracking_uri(cfg: Config) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite store in run.output_dir.

    A URI output dir (s3://) has no place for SQLite: the store then sits beside the
    job, in its working directory."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    out = cfg.run.output_dir
    folder = Path("." if storage.is_uri(out) else out).absolute()
    return f"sqlite:///{folder / 'mlflow.db'}"


# What prepare writes into <output_dir>/data/{train,eval}/, and replaces whole when the rows are stale.
ROW_FILES = re.compile(r"(part-\d+\.parquet|stats\.json|mask_preview\.html|bad_records\.jsonl|template_report\.txt"
                       r"|.*\.tmp-\d+)$")


def _check_rows_folder(key_value: str, data_dir: str) -> None:
    """prepare replaces <output_dir>/data/train and data/eval whole: they must hold nothing but
    rows prepare wrote (an output_dir pointed at a project whose data/train holds the corpus
    would lose it)."""
    for split in ("train", "eval"):
        folder = storage.join(data_dir, split)
        others = [f.path for f in storage.list_files(folder, recursive=True)
                  if not ROW_FILES.fullmatch(storage.basename(f.path))]
        if others:
            shown = ", ".join(storage.basename(p) for p in others[:3]) + (
                f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise ConfigError(f"run.output_dir={key_value}: {folder} holds files chatsft did not write ({shown}), "
                              "and prepare replaces that folder with its rows; use another run.output_dir")


def _check_stores(cfg: Config) -> None:
    """Every object store the run reads or writes answers, before anything is spent: a bucket
    without credentials or an endpoint that does not answer is named by its key in seconds, not
    after the store's client has retried for minutes."""
    keys = [("run.output_dir", cfg.run.output_dir)]
    keys += [(f"data.{split}[{i}].path", src.path) for split in ("train", "eval")
             for i, src in enumerate(getattr(cfg.data, split))]
    from chatsft.sources import resolve_uri

    for key, path in keys:
        problem = storage.probe(resolve_uri(path))
        if problem:
            raise ConfigError(f"{key}={path}: {problem}")


def _check_output(output_dir: str) -> None:
    """A local output folder must be a folder this process can write (URIs: the driver's
    preflight checks them from every node)."""
    if storage.is_uri(output_dir):
        return
    path = Path(storage.absolute(output_dir))
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        what = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise ConfigError(f"run.output_dir={output_dir}: {what}; point it at a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.output_dir={output_dir}: {existing} is not writable by this user")


def _check_elastic(least: int, most: int, micro: int, global_batch: int) -> None:
    """Every worker count an elastic run may have must share the rows per step in micro-batches."""
    bad = [w for w in range(max(least, 1), most + 1) if least and global_batch % (micro * w)]
    if bad:
        raise ConfigError(f"scaling.min_workers={least}: with {bad[0]} workers the {global_batch} rows per step "
                          f"(train.micro_batch_size x train.grad_accum x scaling.num_workers) cannot be shared in "
                          f"micro-batches of {micro}; choose counts whose product with train.micro_batch_size "
                          f"divides {global_batch}")


def _check_kind(cfg: Config, kind: ModelKind) -> None:
    """Config rules that depend on the kind of model."""
    if kind.decoder_only:
        return
    if cfg.scaling.sequence_parallel > 1:
        raise ConfigError(f"scaling.sequence_parallel={cfg.scaling.sequence_parallel}: encoder-decoder (seq2seq) "
                          "models are not split along the sequence; set scaling.sequence_parallel=1")
    if cfg.data.packing:
        raise ConfigError("data.packing: encoder-decoder (seq2seq) models are not packed; "
                          "set data.packing=false")
    if cfg.data.organization != Organization.SPLIT_TURN:
        raise ConfigError("data.organization: encoder-decoder (seq2seq) models learn one answer per "
                          "sample; use split_turn")
