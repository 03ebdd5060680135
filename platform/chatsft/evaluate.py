"""Evaluation: validation loss, multiple-choice accuracy and generative pass@k.

`evaluate_model(model, tokenizer, cfg)` is the one entry the trainer (rank 0,
every `train.eval_metrics_every` steps) and `chatsft eval` both call. Metric
names: `eval_loss`, `<task>/pass_at_<k>` (pass@k; MLflow refuses '@' in names)
and `<task>/examples` for generative tasks, `<task>/accuracy` for multiple
choice, `<task>/skipped` when bad lines were skipped under
`data.on_bad_record=skip`. Task names are `heldout`, `chat:<file stem>`,
`mc:<file stem>`, kept to the characters MLflow accepts.

The pieces live in chatsft.eval: tasks (the interface and built-ins),
generation (batched KV-cache decoding, choice scoring), metrics (normalization,
pass@k).
"""

from __future__ import annotations

import copy

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from chatsft.data.conversation import BadRecord
from chatsft.data.render import IGNORE, RenderOptions, Sample, render_batch, render_seq2seq
from chatsft.data.sources import read_local
from chatsft.data.templates import ChatTemplate, get_template
from chatsft.errors import UserError
from chatsft.eval.generation import (GenerationOptions, choose, generate, is_encoder_decoder, model_device,
                                     right_pad, unwrap)
from chatsft.eval.metrics import mean_pass_at_k
from chatsft.eval.tasks import Example, Rendered, Task, task_from_spec, tasks_from_config

__all__ = ["evaluate_model", "evaluate_cli", "validation_loss", "format_metrics", "load_for_eval",
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
                   *, eval_loss: bool = True, runs: Optional[list] = None) -> dict[str, float]:
    """Every task of `eval.tasks` (or `tasks`) and, with `eval_loss`, the token-weighted eval loss.

    `model` may be a Hugging Face model, a PEFT model or a DeepSpeed engine; its
    train/eval mode is restored afterwards and the global RNG is not touched.
    Pass a list as `runs` to get each task's outputs (a TaskRun per task).
    Under ZeRO-3 the parameters are sharded: the caller gathers them first.
    """
    if tasks is None:
        tasks = tasks_from_config(cfg)
    else:
        tasks = [t if isinstance(t, Task) else task_from_spec(t, [s.path for s in cfg.data.eval]) for t in tasks]
    encoder = is_encoder_decoder(model)
    template = None if encoder else get_template(cfg.data.template, tokenizer)
    metrics: dict[str, float] = {}
    for task in tasks:
        run = run_task(task, model, tokenizer, template, cfg)
        metrics.update(run.metrics)
        if runs is not None:
            runs.append(run)
    if eval_loss and cfg.data.eval:
        total, count = validation_loss(model, tokenizer, cfg, template)
        if count:
            metrics["eval_loss"] = total / count
    return metrics


def run_task(task: Task, model: Any, tokenizer: Any, template: Optional[ChatTemplate], cfg: Any) -> TaskRun:
    examples, rendered, skipped = _collect(task, tokenizer, template, cfg.eval.max_examples,
                                           cfg.data.on_bad_record)
    run = TaskRun(task.name, examples=examples)
    pad_id = _pad_id(tokenizer)
    if task.kind == "choice":
        picks = choose(model, [r.prompt_ids for r in rendered], [r.choice_ids for r in rendered], pad_id,
                       cfg.eval.batch_size)
        run.outputs = [[ex.choices[p]] for ex, p in zip(examples, picks)]
        run.scores = [[float(task.score(ex, out[0]))] for ex, out in zip(examples, run.outputs)]
        run.metrics[f"{task.name}/accuracy"] = _mean([s[0] for s in run.scores])
    else:
        opts = GenerationOptions.from_config(cfg.eval, cfg.run.seed)
        stops = stop_token_ids(tokenizer, template)
        ids = generate(model, [r.prompt_ids for r in rendered], stops, pad_id, opts)
        eot_text = template.end_of_turn if template is not None else None
        run.outputs = [[_decode(tokenizer, o, eot_text) for o in per] for per in ids]
        run.scores = [[float(task.score(ex, text)) for text in per] for ex, per in zip(examples, run.outputs)]
        for k in sorted({1, *cfg.eval.pass_k}):
            if k > opts.num_samples:
                raise UserError(f"eval.pass_k: k={k} needs eval.num_samples >= {k} (it is {opts.num_samples})")
            run.metrics[f"{task.name}/pass_at_{k}"] = mean_pass_at_k(run.scores, k)
    run.metrics[f"{task.name}/examples"] = float(len(examples))
    if skipped:
        run.metrics[f"{task.name}/skipped"] = float(skipped)
    return run


def _collect(task: Task, tokenizer: Any, template: Optional[ChatTemplate], limit: int, policy: str):
    """The first `limit` usable examples, rendered; bad ones raise or are counted (data.on_bad_record)."""
    examples: list[Example] = []
    rendered: list[Rendered] = []
    skipped = 0
    for item in task.examples():
        if limit and len(examples) >= limit:
            break
        if not isinstance(item, Exception):
            try:
                r = task.render(item, tokenizer, template)
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


def stop_token_ids(tokenizer: Any, template: Optional[ChatTemplate]) -> list[int]:
    """The template's end-of-turn token and EOS: either ends an answer."""
    stops = set()
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    if template is not None:
        eot = tokenizer.convert_tokens_to_ids(template.end_of_turn)
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


# -------------------------------------------------------------- validation loss


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of token losses over supervised tokens, their count): the trainer's own definition.

    Decoder-only labels are shifted once (causal_targets); seq2seq labels are
    already aligned with the decoder logits. eval_loss = sum / count over the split.
    """
    from chatsft.train.loss import causal_targets, token_loss

    labels = labels.to(logits.device)
    total, count = token_loss(logits, causal_targets(labels) if shift else labels)
    return total, int(count)


def eval_samples(cfg: Any, tokenizer: Any, template: Optional[ChatTemplate]) -> tuple[list[Sample], int]:
    """The eval split rendered as training renders it (data.organization, train_on, max_length)."""
    opts = RenderOptions.from_config(cfg.data)
    samples: list[Sample] = []
    skipped = 0
    convs = []
    for src in cfg.data.eval:
        for item in read_local(src.path):
            if isinstance(item, BadRecord):
                if cfg.data.on_bad_record == "error":
                    raise item
                skipped += 1
            else:
                convs.append(item)
    if template is None:
        outcomes = []
        for conv in convs:
            try:
                outcomes.append(render_seq2seq(conv, tokenizer, opts))
            except BadRecord as e:
                outcomes.append(e.at(conv.source))
    else:
        outcomes = render_batch(convs, tokenizer, template, opts)
    for outcome in outcomes:
        if isinstance(outcome, BadRecord):
            if cfg.data.on_bad_record == "error":
                raise outcome
            skipped += 1
        else:
            samples.extend(outcome.samples)
    return samples, skipped


@torch.no_grad()
def validation_loss(model: Any, tokenizer: Any, cfg: Any, template: Optional[ChatTemplate],
                    samples: Optional[list[Sample]] = None) -> tuple[float, int]:
    """(sum of token losses, supervised tokens) over the eval split; eval_loss = sum / tokens."""
    if samples is None:
        samples, _ = eval_samples(cfg, tokenizer, template)
    encoder = is_encoder_decoder(model)
    device = model_device(model)
    pad_id = _pad_id(tokenizer)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    size = max(1, cfg.train.micro_batch_size)
    total, count = 0.0, 0
    was_training = unwrap(model).training
    unwrap(model).eval()
    try:
        for start in range(0, len(order), size):
            batch = [samples[i] for i in order[start: start + size]]
            ids, mask = right_pad([s.input_ids.tolist() for s in batch], pad_id, device)
            labels, _ = right_pad([s.labels.tolist() for s in batch], IGNORE, device)
            if encoder:
                logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits
                s, n = _token_loss_sum(logits, labels, shift=False)
            else:
                labels = labels.masked_fill(mask == 0, IGNORE)
                logits = model(input_ids=ids, attention_mask=mask).logits
                s, n = _token_loss_sum(logits, labels)
            total += float(s)
            count += n
    finally:
        unwrap(model).train(was_training)
    return total, count


# ------------------------------------------------------------------------ CLI


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
    """(model, tokenizer) from a model folder, a run folder holding model/, or `builtin:NAME`."""
    from chatsft.builtin import resolve

    folder = resolve(path)
    if not os.path.isdir(folder):
        raise UserError(f"--model {path}: no such model folder (train first, or pass --model PATH)")
    markers = ("config.json", "adapter_config.json")
    if not any(os.path.exists(os.path.join(folder, m)) for m in markers):
        nested = os.path.join(folder, "model")
        if any(os.path.exists(os.path.join(nested, m)) for m in markers):
            folder = nested
        else:
            raise UserError(f"--model {path}: not a Hugging Face model folder (no config.json); "
                            "turn a checkpoint into one with `chatsft export CONFIG --checkpoint PATH`")
    from chatsft.model import load_exported

    cuda = torch.cuda.is_available()
    # CPU evaluation in float32 (a bf16 export would be slow and coarse there); on a GPU the saved dtype.
    model, tokenizer = load_exported(folder, dtype="auto" if cuda else torch.float32,
                                     trust_remote_code=cfg.model.trust_remote_code)
    return model.to("cuda" if cuda else "cpu").eval(), tokenizer


def evaluate_cli(cfg: Any, model: Optional[str] = None) -> dict[str, float]:
    """`chatsft eval CONFIG [--model PATH]`: print the metrics table and return the metrics."""
    tasks = tasks_from_config(cfg)  # a bad task spec fails before the model loads
    path = model or os.path.join(cfg.run.output_dir, "model")
    net, tokenizer = load_for_eval(path, cfg)
    runs: list[TaskRun] = []
    metrics = evaluate_model(net, tokenizer, cfg, tasks, runs=runs)
    for run in runs:
        for ex, outs, scores in list(zip(run.examples, run.outputs, run.scores))[:3]:
            mark = "ok " if scores[0] >= 0.5 else "bad"
            print(f"[{run.task}] {mark} {ex.source}\n    reference: {ex.reference!r}\n    output:    {outs[0]!r}")
    print(format_metrics(metrics, title=f"eval of {path}"))
    return metrics
