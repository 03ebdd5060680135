"""The render stage: raw JSONL lines -> samples (one actor class for Ray Data's map_batches).

Each actor loads the tokenizer and binds the format (chat template or input/target pairs) once, then renders
batches of lines with one batched tokenizer call (`render_batch`). Per line it
decides, from the seed and the line's `path:line` alone, whether the record is
held out for eval and how many mixture copies it gets; so the result does not
depend on which actor renders what.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from chatsft.data.conversation import BadRecord, Conversation, parse_line
from chatsft.data.render import RenderOptions
from chatsft.data.stats import MaskStats
from chatsft.data import keys
from chatsft.pipeline.rows import EVAL, RENDERED, SAMPLE, SPLITS, TRAIN, list_array, stats_row

RAW_SHOWN = 300  # bytes of a bad line kept for bad_records.jsonl


@dataclass(frozen=True)
class FileRole:
    display: str  # the path in `path:line`
    split: int  # TRAIN or EVAL
    weight: float
    carve: bool  # a train file whose records may be held out by data.eval_fraction


@dataclass(frozen=True)
class RenderSpec:
    """Everything a render actor needs; small and picklable (shipped once per actor)."""

    model: Any  # config.ModelConfig
    template: str  # data.template (an encoder-decoder has no chat template: `kind` decides)
    options: RenderOptions
    kind: Any  # chatsft.model.kind.ModelKind: the format the rows are rendered in
    seed: int
    eval_fraction: float
    files: tuple[FileRole, ...]
    bad_examples: int
    # The driver's tokenizer itself when it pickles (it nearly always does): every actor then
    # renders with exactly the tokenizer that was fingerprinted, and needs no copy of its files.
    tokenizer: Any = None


class Renderer:
    """Ray Data callable class: a pyarrow batch of (file_idx, line, raw) -> RENDERED rows."""

    def __init__(self, spec: RenderSpec):
        # One process per CPU: the Rust tokenizer's own thread pool would only oversubscribe it.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from chatsft.model import load_tokenizer

        self.spec = spec
        self.tokenizer = spec.tokenizer if spec.tokenizer is not None else load_tokenizer(spec.model)
        self.format = spec.kind.format(spec.template, self.tokenizer, spec.options.think,
                                       spec.options.chat_template_kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return render_lines(self.spec, self.format,
                            batch["file_idx"].to_pylist(), batch["line"].to_pylist(),
                            batch["raw"].to_pylist())


def render_lines(spec: RenderSpec, fmt: Any, file_idx: list[int],
                 lines: list[int], raws: list[bytes]) -> pa.Table:
    """Render one batch of lines (pure given the tokenizer): sample rows plus one statistics row."""
    stats = {TRAIN: MaskStats(), EVAL: MaskStats()}
    bad: list[list] = []  # [file_idx, line, split, example] of every bad record of the batch
    todo: list[tuple[Conversation, int, int, int, int]] = []  # conv, file_idx, line, split, copies
    skipped: list[tuple[Conversation, int, int, int]] = []  # sampled out (0 copies): validated only

    def add_bad(e: BadRecord, fi: int, ln: int, split: int, raw: Optional[bytes]) -> None:
        stats[split].add_bad(e.reason)
        shown = raw[:RAW_SHOWN].decode("utf-8", "replace") if raw is not None else ""
        bad.append([fi, ln, split, {"source": e.source, "reason": e.reason, "detail": e.detail,
                                    "line": shown}])

    raw_of: dict[tuple[int, int], bytes] = {}
    for fi, ln, raw in zip(file_idx, lines, raws):
        role = spec.files[fi]
        source = f"{role.display}:{ln}"
        if role.carve and keys.in_eval(spec.seed, source, spec.eval_fraction):
            split, n_copies = EVAL, 1  # held out once; weights shape the training mixture only
        else:
            split, n_copies = role.split, keys.copies(spec.seed, source, role.weight)
        stats[split].records_read += 1
        try:
            conv = parse_line(raw, source, spec.options.tool_arguments)
        except BadRecord as e:
            add_bad(e, fi, ln, split, raw)
            continue
        raw_of[(fi, ln)] = raw
        if n_copies:
            todo.append((conv, fi, ln, split, n_copies))
        else:
            skipped.append((conv, fi, ln, split))

    for conv, fi, ln, split in skipped:  # a sampled-out record is still checked, so errors show
        try:
            fmt.check(conv)
        except BadRecord as e:
            add_bad(e.at(conv.source), fi, ln, split, raw_of[(fi, ln)])

    outcomes = fmt.render([t[0] for t in todo], spec.options)

    cols: dict[str, list] = {k: [] for k in ("split", "file_idx", "line", "sub", "copy", "order_key",
                                             "source", "truncated")}
    ids, labels = [], []
    limit = spec.options.max_length
    for (conv, fi, ln, split, n_copies), outcome in zip(todo, outcomes):
        if isinstance(outcome, BadRecord):
            add_bad(outcome, fi, ln, split, raw_of[(fi, ln)])
            continue
        st = stats[split]
        st.add_notes(conv.notes)
        st.add_dropped(Counter({r: n * n_copies for r, n in outcome.dropped.items()}))
        for sub, s in enumerate(outcome.samples):
            if limit is not None and len(s) > limit:
                raise AssertionError(f"{s.source}: {len(s)} tokens after truncation to {limit}")
            for c in range(n_copies):
                st.add_sample(s)
                cols["split"].append(split)
                cols["file_idx"].append(fi)
                cols["line"].append(ln)
                cols["sub"].append(sub)
                cols["copy"].append(c)
                cols["order_key"].append(keys.order_key(spec.seed, s.source, c))
                cols["source"].append(s.source)
                cols["truncated"].append(s.truncated)
                ids.append(s.input_ids)
                labels.append(s.labels)

    n = len(ids)
    samples = pa.Table.from_arrays(
        [pa.array(np.full(n, SAMPLE, np.int8)), pa.array(cols["split"], pa.int8()),
         pa.array(cols["file_idx"], pa.int32()), pa.array(cols["line"], pa.int64()),
         pa.array(cols["sub"], pa.int32()), pa.array(cols["copy"], pa.int32()),
         pa.array(cols["order_key"], pa.int64()), list_array(ids), list_array(labels),
         pa.array(cols["source"], pa.string()), pa.array(cols["truncated"], pa.bool_()),
         pa.nulls(n, pa.string())],
        schema=RENDERED)
    # Only the batch's first bad records (in file order) can be among the first of the corpus;
    # at least one is kept so on_bad_record=error can name the very first.
    bad.sort(key=lambda b: (b[0], b[1]))
    summary = {"stats": {SPLITS[k]: v.to_dict() for k, v in stats.items()},
               "bad": bad[:max(1, spec.bad_examples)]}
    return pa.concat_tables([samples, stats_row(json.dumps(summary))])
