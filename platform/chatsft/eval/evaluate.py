"""Task evaluation: multiple-choice accuracy and generative pass@k.

`evaluate_model(model, tokenizer, cfg)` is the one entry the trainer (rank 0,
every `train.eval_metrics_every` steps) and `chatsft eval` both call. Metric
names: `<task>/pass_at_<k>` (pass@k; MLflow refuses '@' in names)
and `<task>/examples` for generative tasks, `<task>/accuracy` for multiple
choice, `<task>/skipped` when bad lines were skipped under
`data.on_bad_record=skip`. Task names are `heldout`, `chat:<file stem>`,
`mc:<file stem>`, kept to the characters MLflow accepts.

The pieces beside it: tasks (the interface and built-ins), generation (batched
KV-cache decoding, choice scoring), metrics (normalization, pass@k), and loss
(the validation loss over prepared rows, `eval_loss`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from chatsft import storage
from chatsft.data.conversation import BadRecord
from chatsft.data.formats import Format
from chatsft.errors import UserError
from chatsft.eval.generation import GenerationOptions, choose, generate
from chatsft.model.kind import kind_of_model
from chatsft.eval.metrics import mean_pass_at_k
from chatsft.eval.tasks import Example, Rendered, Task, task_from_spec, tasks_from_config

__all__ = ["evaluate_model", "format_metrics", "load_for_eval", "training_tasks",
           "Task", "Example", "Rendered", "TaskRun"]


@dataclass
class TaskRun:
    """What one task produced: its metrics and, per example, the outputs and scores."""

    task: str
    metrics: dict[str, float] = field(default_factory=dict)
    examples: list[Example] = field(default_factory=list)
    outputs: list[list[str]] = field(default_factory=list)  # per example: the n outputs (choice: the label)
    scores: list[list[float]] = field(default_factory=list)


# ------------------------------------------------------------------- the entry


def evaluate_model(model: Any, tokenizer: Any, cfg: Any, tasks: Optional[Sequence[Union[Task, str]]] = None,
                   *, runs: Optional[list] = None) -> dict[str, float]:
    """Every task of `eval.tasks` (or `tasks`). The validation loss is chatsft.eval.loss's.

    `model` may be a Hugging Face model, a PEFT model or a DeepSpeed engine; its
    train/eval mode is restored afterwards and the global RNG is not touched.
    Pass a list as `runs` to get each task's outputs (a TaskRun per task).
    Under ZeRO-3 the parameters are sharded: the caller gathers them first.
    """
    if tasks is None:
        tasks = tasks_from_config(cfg)
    else:
        tasks = [t if isinstance(t, Task) else task_from_spec(t, [s.path for s in cfg.data.eval]) for t in tasks]
    fmt = kind_of_model(model).format(cfg.data.template, tokenizer, cfg.data.think, cfg.data.chat_template_kwargs)
    metrics: dict[str, float] = {}
    for task in tasks:
        run = run_task(task, model, fmt, cfg)
        metrics.update(run.metrics)
        if runs is not None:
            runs.append(run)
    return metrics


def run_task(task: Task, model: Any, fmt: Format, cfg: Any) -> TaskRun:
    tokenizer = fmt.tokenizer
    examples, rendered, skipped = _collect(task, fmt, cfg.eval.max_examples, cfg.data.on_bad_record)
    run = TaskRun(task.name, examples=examples)
    pad_id = _pad_id(tokenizer)
    if task.scoring == "choice":
        picks = choose(model, [r.prompt_ids for r in rendered], [r.choice_ids for r in rendered], pad_id,
                       cfg.eval.batch_size)
        run.outputs = [[ex.choices[p]] for ex, p in zip(examples, picks)]
        run.scores = [[float(task.score(ex, out[0]))] for ex, out in zip(examples, run.outputs)]
        run.metrics[f"{task.name}/accuracy"] = _mean([s[0] for s in run.scores])
    else:
        opts = GenerationOptions.from_config(cfg.eval, cfg.run.seed)
        stops = stop_token_ids(tokenizer, fmt.end_of_turn)
        ids = generate(model, [r.prompt_ids for r in rendered], stops, pad_id, opts)
        run.outputs = [[_decode(tokenizer, o, fmt.end_of_turn) for o in per] for per in ids]
        run.scores = [[float(task.score(ex, text)) for text in per] for ex, per in zip(examples, run.outputs)]
        for k in sorted({1, *cfg.eval.pass_k}):
            if k > opts.num_samples:
                raise UserError(f"eval.pass_k: k={k} needs eval.num_samples >= {k} (it is {opts.num_samples})")
            run.metrics[f"{task.name}/pass_at_{k}"] = mean_pass_at_k(run.scores, k)
    run.metrics[f"{task.name}/examples"] = float(len(examples))
    if skipped:
        run.metrics[f"{task.name}/skipped"] = float(skipped)
    return run


def _collect(task: Task, fmt: Format, limit: int, policy: str):
    """The first `limit` usable examples, rendered; bad ones raise or are counted (data.on_bad_record)."""
    examples: list[Example] = []
    rendered: list[Rendered] = []
    skipped = 0
    for item in task.examples():
        if limit and len(examples) >= limit:
            break
        if not isinstance(item, Exception):
            try:
                r = task.render(item, fmt)
            except BadRecord as e:
                item = e.at(item.source)
            else:
                if not r.prompt_ids:
                    raise UserError(f"{item.source}: task {task.name} rendered an empty prompt")
                examples.append(item)
                rendered.append(r)
                continue
        if policy == "error":
            raise item
        skipped += 1
    if not examples:
        raise UserError(f"eval task {task.name}: no usable examples" + (f" ({skipped} skipped)" if skipped else ""))
    return examples, rendered, skipped


def stop_token_ids(tokenizer: Any, end_of_turn: Optional[str]) -> list[int]:
    """The format's end-of-turn token and EOS: either ends an answer."""
    stops = set()
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    if end_of_turn is not None:
        eot = tokenizer.convert_tokens_to_ids(end_of_turn)
        if isinstance(eot, int) and eot != tokenizer.unk_token_id:
            stops.add(eot)
    if not stops:
        raise UserError("eval: the tokenizer has no EOS and the template no end-of-turn token; "
                        "generation could never stop")
    return sorted(stops)


def _decode(tokenizer: Any, ids: list[int], end_of_turn: Optional[str]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    # An end-of-turn marker that is not one token (some hf templates) ends the answer as text.
    if end_of_turn and tokenizer.convert_tokens_to_ids(end_of_turn) in (None, tokenizer.unk_token_id):
        text = text.split(end_of_turn, 1)[0]
    return text


def _pad_id(tokenizer: Any) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


# ---------------------------------------------------------------- for callers


def training_tasks(cfg: Any) -> list[str]:
    """The `eval.tasks` a training run evaluates, checked before any compute is spent.

    `heldout` is dropped (with a note) when the run has no eval split, so a config
    that names no eval data still trains; any other bad spec is an error."""
    specs = list(cfg.eval.tasks)
    if "heldout" in specs and not cfg.data.eval and cfg.data.eval_fraction <= 0:
        specs.remove("heldout")
        print("[chatsft] no eval split (data.eval, data.eval_fraction): the heldout task is skipped")
    if specs:
        probe = copy.deepcopy(cfg)
        probe.eval.tasks = specs
        tasks_from_config(probe)
    return specs


def format_metrics(metrics: dict[str, float], before: Optional[dict[str, float]] = None, title: str = "") -> str:
    """A plain table; with `before`, two columns side by side (before and after training)."""
    keys = list(metrics) + [k for k in (before or {}) if k not in metrics]
    width = max([len(k) for k in keys] + [6])
    lines = [title] if title else []
    if before is None:
        lines.append(f"{'metric':<{width}}  {'value':>10}")
        lines += [f"{k:<{width}}  {_fmt(k, metrics.get(k)):>10}" for k in keys]
    else:
        lines.append(f"{'metric':<{width}}  {'before':>10}  {'after':>10}")
        lines += [f"{k:<{width}}  {_fmt(k, before.get(k)):>10}  {_fmt(k, metrics.get(k)):>10}" for k in keys]
    return "\n".join(lines)


def _fmt(key: str, value: Optional[float]) -> str:
    if value is None:
        return "-"
    if key.endswith(("/examples", "/skipped")):
        return str(int(value))
    return f"{value:.4f}"


def load_for_eval(path: str, cfg: Any):
    """(model, tokenizer) from a model folder, a run folder holding model/ (either local or a
    URI such as s3://bucket/run/model), or `builtin:NAME`."""
    from chatsft.builtin import resolve

    folder = model_folder(resolve(path), path)
    if not storage.is_uri(folder):
        return _load_for_eval(folder, cfg)
    # Hugging Face loads from local files: copy the folder, load it into memory, drop the copy
    with storage.scratch("chatsft-model-") as local:
        storage.copy_tree(folder, local)
        return _load_for_eval(local, cfg)


def model_folder(folder: str, given: str) -> str:
    """The Hugging Face folder at `folder`, or at its model/ (a run's output dir)."""
    if not storage.is_dir(folder):
        raise UserError(f"--model {given}: no such model folder (train first, or pass --model PATH)")
    markers = ("config.json", "adapter_config.json")
    for candidate in (folder, storage.join(folder, "model")):
        if any(storage.exists(storage.join(candidate, m)) for m in markers):
            return candidate
    raise UserError(f"--model {given}: not a Hugging Face model folder (no config.json); "
                    "turn a checkpoint into one with `chatsft export CONFIG --checkpoint PATH`")


def _load_for_eval(folder: str, cfg: Any):
    from chatsft.model import load_exported

    cuda = torch.cuda.is_available()
    # CPU evaluation in float32 (a bf16 export would be slow and coarse there); on a GPU the saved dtype.
    model, tokenizer = load_exported(folder, dtype="auto" if cuda else torch.float32,
                                     trust_remote_code=cfg.model.trust_remote_code)
    return model.to("cuda" if cuda else "cpu").eval(), tokenizer
