"""Evaluation tasks: a small interface (examples, render, score) and the built-in tasks.

A task is a `Task` of plain functions, no subclassing:
- `examples()` yields `Example`s (or the exception of an input line that is bad,
  so the evaluator applies `data.on_bad_record` to every task the same way);
- `render(example, fmt)` gives the prompt ids exactly as training renders them
  (`fmt`: the model's chat.data.formats Format, bound to its tokenizer) and, for
  multiple choice, the token id of each choice label;
- `score(example, output)` gives 0..1 for one generated answer (or the chosen label).

Built-ins, named by a spec string in `eval.tasks`:
- `heldout`          the eval split (`data.eval` sources) as a generative task
- `chat:PATH`        generative JSONL in the chat format: the dialogue up to its final
                     assistant turn is the prompt, that answer is the reference
- `mc:PATH`          multiple-choice JSONL: {"question", "choices": [...], "answer": "B" or index}
- `...@module:func`  (heldout and chat) score with `func(output, reference) -> float|bool`
                     instead of exact match after normalization
"""

from __future__ import annotations

import importlib
import json
import os
import re
import string
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Sequence, Union

from chatsft import storage
from chatsft.data.conversation import BadRecord, Conversation, Message, iter_lines
from chatsft.sources import expand_local, read_local, resolve_uri
from chatsft.errors import MissingFile, UserError
from chatsft.eval.metrics import exact_match

LETTERS = string.ascii_uppercase


class BadExample(UserError):
    """An input line a task cannot use; the message starts with path:line."""

    def __init__(self, source: str, detail: str):
        self.source, self.detail = source, detail
        super().__init__(f"{source}: {detail}")


@dataclass(frozen=True)
class Example:
    source: str  # "path:line"
    messages: tuple[Message, ...]  # the dialogue the model answers
    reference: str  # the reference answer, or the correct choice label
    choices: tuple[str, ...] = ()  # multiple choice: the labels ("A", "B", ...)


@dataclass(frozen=True)
class Rendered:
    prompt_ids: list[int]
    choice_ids: tuple[int, ...] = ()  # multiple choice: one token id per label, in label order


@dataclass(frozen=True)
class Task:
    name: str  # metric prefix: "heldout", "chat:qa", "mc:trivia"
    scoring: Literal["generate", "choice"]  # generated answers scored, or the likeliest label picked
    examples: Callable[[], Iterable[Union[Example, Exception]]]
    render: Callable[[Example, Any], Rendered]  # (example, format) -> prompt ids
    score: Callable[[Example, str], float]


# ------------------------------------------------------------------- rendering


def render_generative(example: Example, fmt: Any) -> Rendered:
    return Rendered(fmt.prompt_ids(example.messages))


def choice_token_ids(labels: Sequence[str], tokenizer: Any) -> tuple[int, ...]:
    """The token a model emits first for each label; they must differ to tell the labels apart."""
    ids = []
    for label in labels:
        toks = tokenizer(label, add_special_tokens=False)["input_ids"]
        if not toks:
            raise UserError(f"multiple choice: the tokenizer encodes label {label!r} as nothing")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise UserError(f"multiple choice: labels {', '.join(labels)} do not start with distinct tokens")
    return tuple(ids)


def render_choice(example: Example, fmt: Any) -> Rendered:
    return Rendered(fmt.prompt_ids(example.messages), choice_token_ids(example.choices, fmt.tokenizer))


def score_label(example: Example, output: str) -> float:
    return 1.0 if output == example.reference else 0.0


# ------------------------------------------------------------------ generative


def chat_examples(paths: Sequence[str]) -> Iterator[Union[Example, Exception]]:
    """The dialogue before the final assistant turn, and that turn's text as the reference."""
    for path in paths:
        for item in read_local(path):
            if isinstance(item, BadRecord):
                yield item
                continue
            yield chat_example(item)


def chat_example(conv: Conversation) -> Example:
    last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
    return Example(conv.source, conv.messages[:last], conv.messages[last].text)


def load_checker(spec: str) -> Callable[[str, str], Any]:
    """`package.module:function` -> the function (called as f(output, reference))."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"eval.tasks: checker {spec!r}: expected module:function, e.g. mypkg.checks:exact")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"eval.tasks: checker {spec!r}: cannot import {module_name}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"eval.tasks: checker {spec!r}: {module_name} has no function {attr!r}")
    return fn


def checked_score(checker: Callable[[str, str], Any]) -> Callable[[Example, str], float]:
    def score(example: Example, output: str) -> float:
        return float(checker(output, example.reference))

    return score


def generative_task(name: str, paths: Sequence[str], checker: Optional[str] = None,
                    keep: Optional[Callable[[str], bool]] = None) -> Task:
    """`keep(source)` picks records (the eval records carved out of train by data.eval_fraction)."""
    score = checked_score(load_checker(checker)) if checker else (
        lambda example, output: exact_match(output, example.reference))

    def examples() -> Iterator[Union[Example, Exception]]:
        for item in chat_examples(paths):
            source = item.source if isinstance(item, (Example, BadRecord)) else None
            if keep is None or source is None or keep(source):
                yield item

    return Task(name, "generate", examples, render_generative, score)


# ------------------------------------------------------------- multiple choice


def choice_examples(path: str) -> Iterator[Union[Example, Exception]]:
    files = expand_local(path)
    if not files:
        raise MissingFile(resolve_uri(path), "no such file")
    for f in files:
        data = storage.read_bytes(f) or b""  # a local path or a URI (s3://...)
        for source, raw in iter_lines(data, f):
            try:
                yield choice_example(raw, source)
            except BadExample as e:
                yield e


def choice_example(raw: bytes, source: str) -> Example:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadExample(source, f"not a JSON line ({e})") from None
    if not isinstance(record, dict):
        raise BadExample(source, "expected an object {question, choices, answer}")
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise BadExample(source, "'question' must be a non-empty string")
    if (not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS)
            or not all(isinstance(c, str) for c in choices)):
        raise BadExample(source, f"'choices' must be a list of 2 to {len(LETTERS)} strings")
    labels = tuple(LETTERS[: len(choices)])
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, int) and 0 <= answer < len(choices):
        ref = labels[answer]
    elif isinstance(answer, str) and answer.strip().upper() in labels:
        ref = answer.strip().upper()
    else:
        raise BadExample(source, f"'answer' must be one of {', '.join(labels)} or an index 0..{len(choices) - 1}, "
                                 f"got {answer!r}")
    lines = [question.strip()] + [f"{label}. {text}" for label, text in zip(labels, choices)] + ["Answer:"]
    return Example(source, (Message("user", "\n".join(lines)),), ref, labels)


def choice_task(name: str, path: str) -> Task:
    return Task(name, "choice", lambda: choice_examples(path), render_choice, score_label)


# ---------------------------------------------------------------------- specs

_CHECKER = re.compile(r"^(?P<task>.+)@(?P<checker>[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")


def task_from_spec(spec: str, eval_sources: Sequence[str],
                   carve: Optional[tuple[Sequence[str], int, float]] = None) -> Task:
    """One `eval.tasks` entry -> a Task (see the module doc for the forms). `carve`:
    (train sources, seed, eval_fraction) when the eval split is carved out of train."""
    m = _CHECKER.match(spec)
    body, checker = (m["task"], m["checker"]) if m else (spec, None)
    if body == "heldout":
        if eval_sources:
            return generative_task("heldout", list(eval_sources), checker)
        if carve is not None:
            from chatsft.data.keys import in_eval

            train_sources, seed, fraction = carve
            return generative_task("heldout", list(train_sources), checker,
                                   keep=lambda source: in_eval(seed, source, fraction))
        raise UserError("eval.tasks: `heldout` needs held-out data: data.eval "
                        "(e.g. data.eval=chatsft://samples/heldout.jsonl) or data.eval_fraction > 0")
    kind, sep, path = body.partition(":")
    if sep and kind in ("chat", "mc") and path:
        if not expand_local(path):
            raise UserError(f"eval.tasks: {spec!r}: no such file {resolve_uri(path)}")
        name = f"{kind}:{_stem(path)}"
        if kind == "mc":
            if checker:
                raise UserError(f"eval.tasks: {spec!r}: multiple-choice tasks take no checker")
            return choice_task(name, path)
        return generative_task(name, [path], checker)
    raise UserError(f"eval.tasks: unknown task {spec!r}; expected heldout, chat:PATH or mc:PATH "
                    "(optionally @module:function for a custom checker)")


def tasks_from_config(cfg: Any) -> list[Task]:
    """The tasks of `eval.tasks`; raises UserError for a bad spec before any model is loaded."""
    sources = [s.path for s in cfg.data.eval]
    carve = (([s.path for s in cfg.data.train], cfg.run.seed, cfg.data.eval_fraction)
             if cfg.data.eval_fraction > 0 else None)
    tasks = [task_from_spec(spec, sources, carve) for spec in cfg.eval.tasks]
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"eval.tasks: two tasks are named {dup[0]!r}; rename one of the files")
    return tasks


def _stem(path: str) -> str:
    """The file name without .jsonl, in the characters MLflow allows in a metric name."""
    base = os.path.basename(path.rstrip("/")) or path
    for ext in (".jsonl", ".json"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", base) or "task"
