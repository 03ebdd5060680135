"""Mask statistics: what was learned from, what was cut, what was dropped; per-turn loss weights."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Literal

import numpy as np

from chatsft.data.render import Sample
from chatsft.data.schema import IGNORE


@dataclass
class MaskStats:
    """Aggregate counts of one prepared split; `merge` combines the partial stats of many workers."""

    records_read: int = 0
    records_bad: int = 0
    bad_by_reason: Counter = field(default_factory=Counter)
    samples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated_samples: int = 0
    answers_cut: int = 0
    eot_supervised: int = 0
    dropped_no_supervision: int = 0
    dropped_too_long: int = 0
    notes_by_reason: Counter = field(default_factory=Counter)  # kept records with an oddity (NOTES)

    def add_sample(self, s: Sample) -> None:
        self.samples += 1
        self.tokens += len(s.input_ids)
        self.supervised_tokens += s.num_supervised
        self.truncated_samples += int(s.truncated)
        self.answers_cut += s.answers_cut
        self.eot_supervised += s.eot_supervised

    def add_dropped(self, dropped: Counter) -> None:
        self.dropped_no_supervision += dropped.get("no_supervision", 0)
        self.dropped_too_long += dropped.get("too_long", 0)

    def add_notes(self, notes: Iterable[str]) -> None:
        self.notes_by_reason.update(notes)

    def add_bad(self, reason: str) -> None:
        self.records_bad += 1
        self.bad_by_reason[reason] += 1

    def merge(self, other: "MaskStats") -> "MaskStats":
        for name in self.__dataclass_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, mine + theirs)
        return self

    def to_dict(self) -> dict:
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["bad_by_reason"] = dict(sorted(self.bad_by_reason.items()))
        d["notes_by_reason"] = dict(sorted(self.notes_by_reason.items()))
        d["supervision_ratio"] = self.supervised_tokens / self.tokens if self.tokens else 0.0
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MaskStats":
        kwargs = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        kwargs["bad_by_reason"] = Counter(d.get("bad_by_reason", {}))
        kwargs["notes_by_reason"] = Counter(d.get("notes_by_reason", {}))
        return cls(**kwargs)


def sample_stats(s: Sample) -> dict:
    n, sup = len(s.input_ids), s.num_supervised
    return {"source": s.source, "tokens": n, "supervised": sup, "ratio": sup / n if n else 0.0,
            "truncated": s.truncated, "answers_cut": s.answers_cut, "eot_supervised": s.eot_supervised}


def turn_weights(samples: Iterable[Sample], normalization: Literal["token", "sample"] = "token") -> dict[int, Fraction]:
    """The share of the loss each answer of one dialogue gets, read off the rendered masks.

    `token`: every supervised token of the batch weighs the same (what chatsft trains
    with). `sample`: each sample's loss is its own token mean and the samples are
    summed, so a short answer in its own split-turn sample weighs as much as a long one.
    """
    weights: Counter = Counter()
    counts = []
    for s in samples:
        learned = (s.labels != IGNORE) & (s.answer_of_token >= 0)
        per_answer = Counter(int(k) for k in s.answer_of_token[learned])
        counts.append(per_answer)
    total_tokens = sum(sum(c.values()) for c in counts)
    for c in counts:
        size = sum(c.values())
        for k, n in c.items():
            weights[k] += Fraction(n, total_tokens) if normalization == "token" else Fraction(n, size)
    total = sum(weights.values())
    return {k: weights[k] / total for k in sorted(weights)} if total else {}


def batch_padded_slots(lengths: Iterable[int], batch_size: int) -> int:
    """Token slots of the padded tensors when rows are batched in order, each batch padded to its longest row."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lens = np.asarray(list(lengths), dtype=np.int64)
    n_full = lens.size // batch_size * batch_size
    slots = int(lens[:n_full].reshape(-1, batch_size).max(axis=1).sum()) * batch_size if n_full else 0
    rest = lens[n_full:]
    if rest.size:
        slots += int(rest.max()) * rest.size
    return slots


def pad_summary(lengths: np.ndarray, batch_size: int) -> dict:
    """What `batch_padded_slots` needs of one run of rows when it is a piece of a longer sequence
    whose micro-batches it does not know the alignment of: O(batch_size) numbers, not one a row.
    `slots_from[r]`: the slots of the whole micro-batches that start at row r, r + batch_size, ...
    and end inside the run; `head`/`tail`: the first and last batch_size - 1 lengths, for the
    micro-batches shared with the runs before and after. A short run keeps its lengths."""
    lens = np.asarray(lengths, dtype=np.int64)
    n, k = int(lens.size), batch_size - 1
    if n < 2 * batch_size:
        return {"n": n, "tokens": int(lens.sum()), "lengths": lens.tolist()}
    slots_from = []
    for r in range(batch_size):
        m = (n - r) // batch_size
        slots_from.append(int(lens[r:r + m * batch_size].reshape(m, batch_size).max(axis=1).sum()) * batch_size)
    return {"n": n, "tokens": int(lens.sum()), "head": lens[:k].tolist(), "tail": lens[n - k:].tolist() if k else [],
            "slots_from": slots_from}


def padded_slots_of_runs(summaries: Iterable[dict], batch_size: int) -> int:
    """`batch_padded_slots` of the concatenated runs, from their `pad_summary`s (in order)."""
    slots, carry = 0, []
    for s in summaries:
        if "lengths" in s:
            for x in s["lengths"]:
                carry.append(x)
                if len(carry) == batch_size:
                    slots += max(carry) * batch_size
                    carry = []
            continue
        need = (batch_size - len(carry)) % batch_size  # rows that complete the open micro-batch
        if need:
            slots += max(carry + s["head"][:need]) * batch_size
        slots += s["slots_from"][need]
        left = (s["n"] - need) % batch_size
        carry = s["tail"][len(s["tail"]) - left:] if left else []
    if carry:
        slots += max(carry) * len(carry)
    return slots


def batch_pad_fraction(lengths: Iterable[int], batch_size: int) -> float:
    """Padding when rows are batched in the given order and each batch is padded to its longest row.

    This is what the trainer's collator does with a micro-batch: the fraction of
    the padded (rows x longest) tensors that is padding, over all batches. The
    last batch may be short; it is padded to its own longest row.
    """
    lens = np.asarray(list(lengths), dtype=np.int64)
    slots = batch_padded_slots(lens, batch_size)
    return float(1.0 - lens.sum() / slots) if slots else 0.0
