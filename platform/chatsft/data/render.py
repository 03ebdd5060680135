"""Conversation -> input_ids + labels (the second pure stage).

The template renders text segments that say which characters are learned;
the whole string is tokenized once (batched), and a token is learned when it
overlaps a learned character span. Tokenizing the whole string, not piece by
piece, is what keeps the ids identical to what the model sees at inference (and
to `apply_chat_template` for `hf`).

Labels follow the Hugging Face convention: same length as input_ids, unshifted,
-100 where no loss is taken; the loss shifts them once (model/loss.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Optional, Sequence, Union

import re

import numpy as np

from chatsft.data.options import Organization, Think, ToolArguments, TrainOn, Truncation
from chatsft.data.conversation import BadRecord, Conversation, Message, parse_record
from chatsft.data.schema import IGNORE
from chatsft.data.templates import ChatTemplate, TemplateError, get_template


@dataclass
class Sample:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where not learned
    source: str  # "path:line", with "#turn=N" for split-turn samples
    answer_of_token: Optional[np.ndarray] = None  # per token: answer index, -1 outside answers
    truncated: bool = False
    answers_cut: int = 0  # answers that lost their end-of-turn token to truncation
    eot_supervised: int = 0  # answers whose end-of-turn token carries loss

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass
class RenderResult:
    samples: list[Sample]
    dropped: Counter = field(default_factory=Counter)  # reason -> samples dropped


@dataclass(frozen=True)
class RenderOptions:
    organization: Organization = Organization.SESSION
    train_on: TrainOn = TrainOn.ALL_ASSISTANT
    max_length: Optional[int] = None
    truncation: Truncation = Truncation.TURNS
    max_target_length: Optional[int] = None  # seq2seq decoder length
    think: Optional[Think] = None  # bound into the template (get_template); None: the template's own
    tool_arguments: ToolArguments = ToolArguments.JSON  # how records are parsed (parse_line)
    # data.chat_template_kwargs, bound into an hf template (get_template) with think
    chat_template_kwargs: dict = field(default_factory=dict, hash=False)

    @classmethod
    def from_config(cls, data: Any) -> "RenderOptions":
        return cls(Organization(data.organization), TrainOn(data.train_on), data.max_length,
                   Truncation(data.truncation), data.max_target_length,
                   Think(data.think) if data.think is not None else None, ToolArguments(data.tool_arguments),
                   dict(data.chat_template_kwargs))


def render_conversation(
    record: Union[dict, Conversation],
    tokenizer: Any,
    template: Union[str, ChatTemplate] = "chatml",
    *,
    source: str = "",
    **options: Any,
) -> RenderResult:
    """Render one record; raises BadRecord if it cannot be rendered with this template.

    `template` is a bound ChatTemplate or a format name; with a name, `think=` picks the think policy."""
    opts = RenderOptions(**{k: _coerce(k, v) for k, v in options.items()})
    conv = record if isinstance(record, Conversation) else parse_record(record, source, opts.tool_arguments)
    tpl = template if isinstance(template, ChatTemplate) else get_template(template, tokenizer, opts.think,
                                                                           opts.chat_template_kwargs)
    (outcome,) = render_batch([conv], tokenizer, tpl, opts)
    if isinstance(outcome, BadRecord):
        raise outcome
    return outcome


def _coerce(key: str, value: Any) -> Any:
    kinds = {"organization": Organization, "train_on": TrainOn, "truncation": Truncation, "think": Think,
             "tool_arguments": ToolArguments}
    return kinds[key](value) if key in kinds and value is not None else value


@dataclass
class _Layout:
    """Where the learned characters of one rendered conversation are."""

    text: str
    spans: list[tuple[int, int, int]]  # (start, end, answer) of learned characters
    answer_ends: list[int]  # character end of each answer, its end-of-turn token included


def layout(conv: Conversation, template: ChatTemplate) -> _Layout:
    template.check_content(conv.messages)
    segs = template.segments(conv.messages, conv.tool_schemas)
    spans: list[tuple[int, int, int]] = []
    answer_ends: list[int] = []
    texts = [s.text for s in segs]
    ends = list(accumulate(map(len, texts)))  # character end of every segment
    # The hot loop of prepare: only answer or learned segments matter; the open span is kept in locals.
    open_start, open_end, open_answer = -1, -1, -2
    for i, s in enumerate(segs):
        answer = s.answer
        supervised = s.supervised
        if answer < 0 and not supervised:
            continue
        end = ends[i]
        if supervised and texts[i]:
            pos = end - len(texts[i])
            if open_end == pos and open_answer == answer:
                open_end = end  # extends the span that ends here
            else:
                if open_answer != -2:
                    spans.append((open_start, open_end, open_answer))
                open_start, open_end, open_answer = pos, end, answer
        if answer >= 0:
            while len(answer_ends) <= answer:
                answer_ends.append(end)
            answer_ends[answer] = end
    if open_answer != -2:
        spans.append((open_start, open_end, open_answer))
    return _Layout("".join(texts), spans, answer_ends)


def render_batch(
    convs: Sequence[Conversation],
    tokenizer: Any,
    template: ChatTemplate,
    opts: RenderOptions,
) -> list[Union[RenderResult, BadRecord]]:
    """Render many conversations with one batched tokenizer call (the hot path of prepare)."""
    layouts: list[Union[_Layout, BadRecord]] = []
    for conv in convs:
        try:
            layouts.append(layout(conv, template))
        except BadRecord as e:
            layouts.append(e.at(conv.source))
    texts = [lay.text for lay in layouts if isinstance(lay, _Layout)]
    encodings = _encode_bounded(tokenizer, texts, opts.max_length)
    out: list[Union[RenderResult, BadRecord]] = []
    it = iter(encodings)
    for conv, lay in zip(convs, layouts):
        if isinstance(lay, BadRecord):
            out.append(lay)
            continue
        ids, enc = next(it)
        out.append(_samples(conv.source, lay, ids, enc, opts))
    return out


def _encode(tokenizer: Any, texts: list[str]) -> list[tuple[np.ndarray, Any]]:
    """(ids, the tokenizers Encoding) of each text."""
    if not texts:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(f"model.tokenizer: {getattr(tokenizer, 'name_or_path', '')!r} is a slow "
                            "(Python) tokenizer; chatsft needs a fast (Rust) tokenizer for its character map")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        # Exactly what tokenizer(texts, add_special_tokens=False) runs, without converting every
        # encoding into Python lists first (a third of the time of rendering a batch).
        encodings = backend.encode_batch(texts, add_special_tokens=False)
    else:  # the wrapper resets truncation/padding the backend was saved with
        encodings = tokenizer(texts, add_special_tokens=False, return_attention_mask=False).encodings
    return [(np.asarray(e.ids, dtype=np.int32), e) for e in encodings]


def _encode_bounded(tokenizer: Any, texts: list[str], limit: Optional[int]) -> list[tuple[np.ndarray, Any]]:
    """`_encode`, but a text far longer than `limit` tokens is encoded only up to a prefix that
    holds more than `limit` tokens: every truncation keeps the left part, so nothing past token
    `limit` is read, and a long dialogue then costs time in `limit`, not in its length (the
    tokenizer's own encode of one long string grows faster than linearly).

    The prefix ends right before an added token that strips nothing to its left and matches
    unnormalized text: the tokenizer splits the text at added tokens before normalizing and
    pre-tokenizing the pieces, so the prefix's tokens are exactly the first tokens of the whole.
    """
    if limit is None:
        return _encode(tokenizer, texts)
    budget = PREFIX_CHARS_PER_TOKEN * (limit + 1)
    cuts = _cut_points(tokenizer) if any(len(t) > 2 * budget for t in texts) else None
    if cuts is None:
        return _encode(tokenizer, texts)
    out = []
    for text in texts:
        chars = budget
        while True:
            m = cuts.search(text, chars) if len(text) > 2 * chars else None
            (ids, enc), = _encode(tokenizer, [text[:m.start()] if m else text])
            if m is None or len(ids) > limit:
                break
            chars *= 2  # denser than expected (multi-byte characters): a longer prefix
        out.append((ids, enc))
    return out


PREFIX_CHARS_PER_TOKEN = 8  # a first guess at the prefix to encode; doubled until it holds limit + 1


def _cut_points(tokenizer: Any) -> Optional["re.Pattern[str]"]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    safe = [t.content for t in backend.get_added_tokens_decoder().values()
            if t.content and not t.lstrip and not t.normalized]
    if not safe:
        return None
    return re.compile("|".join(re.escape(c) for c in sorted(safe, key=len, reverse=True)))


MAP_LOOKUPS = 64  # boundaries of one encoding found with char_to_token; above, with its offsets


def _token_bounds(enc: Any, n: int, starts_at: list[int], ends_at: list[int]) -> tuple[list[int], list[int]]:
    """For each character a of starts_at, the first token ending after a; for each b of ends_at,
    the first token starting at or after b. So a token straddling a learned span's edge is learned.

    Asked of the encoding's own char -> token map: a few lookups per answer, where reading every
    token's offsets into arrays cost more than the masks themselves. A character that maps to
    no token (a normalizer dropped it, offsets were trimmed) falls back to the offsets.
    """
    if len(starts_at) + len(ends_at) > MAP_LOOKUPS:
        # A lookup in the map costs time in the length of the encoding: for a long dialogue
        # (many answers) one pass over the offsets is linear where the lookups would be quadratic.
        return _token_bounds_from_offsets(enc, starts_at, ends_at)
    firsts, lasts = [], []
    text_end = enc.token_to_chars(n - 1)[1] if n else 0  # char_to_token has no token past it
    for a in starts_at:
        t = enc.char_to_token(a)
        if t is None:
            return _token_bounds_from_offsets(enc, starts_at, ends_at)
        firsts.append(t)
    for b in ends_at:
        t = enc.char_to_token(b) if b < text_end else n
        if t is None:
            return _token_bounds_from_offsets(enc, starts_at, ends_at)
        while t < n and enc.token_to_chars(t)[0] < b:  # t straddles b: the next one starts at/after it
            t += 1
        lasts.append(t)
    return firsts, lasts


def _token_bounds_from_offsets(enc: Any, starts_at: list[int], ends_at: list[int]) -> tuple[list[int], list[int]]:
    offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = np.ascontiguousarray(offsets[:, 0]), np.ascontiguousarray(offsets[:, 1])
    return (ends.searchsorted(starts_at, side="right").tolist(),
            starts.searchsorted(ends_at, side="left").tolist())


def _samples(source: str, lay: _Layout, ids: np.ndarray, enc: Any, opts: RenderOptions) -> RenderResult:
    n_answers = len(lay.answer_ends)
    answer_of = np.full(len(ids), -1, dtype=np.int32)
    spans = lay.spans
    firsts, lefts = _token_bounds(enc, len(ids), [a for a, _, _ in spans],
                                  [b for _, b, _ in spans] + lay.answer_ends)
    for first, last, (_, _, k) in zip(firsts, lefts, spans):
        answer_of[first:last] = k
    # Token count through each answer's end-of-turn token.
    answer_end_tok = lefts[len(spans):]

    if opts.organization == Organization.SPLIT_TURN:
        wanted = range(n_answers)
        if opts.train_on == TrainOn.LAST_ASSISTANT:
            wanted = [n_answers - 1]
        pieces = [(answer_end_tok[k], {k}, f"{source}#turn={k + 1}") for k in wanted]
    else:
        learned = set(range(n_answers))
        if opts.train_on == TrainOn.LAST_ASSISTANT:
            learned = {n_answers - 1}
        pieces = [(len(ids), learned, source)]

    result = RenderResult([])
    limit = opts.max_length
    for end, learned, src in pieces:
        if (opts.organization == Organization.SPLIT_TURN and limit is not None and end > limit
                and opts.truncation != Truncation.RIGHT):
            # The answer of this split-turn sample ends past max_length: cut by turns it keeps
            # nothing to learn, dropped it is too long; say so without building its arrays (a
            # long dialogue would otherwise cost time in the square of its length).
            result.dropped["too_long" if opts.truncation == Truncation.DROP else "no_supervision"] += 1
            continue
        sample_ids = ids[:end]
        owner = answer_of[:end]
        if opts.train_on == TrainOn.ALL_TOKENS:
            keep = np.ones(end, dtype=bool)
        elif len(learned) == 1:
            keep = owner == next(iter(learned))
        elif len(learned) == n_answers:  # owners are -1 or an answer index: every answer is learned
            keep = owner >= 0
        else:
            keep = np.isin(owner, list(learned))
        labels = np.where(keep, sample_ids, IGNORE).astype(np.int32, copy=False)
        ends_here = [answer_end_tok[k] for k in sorted(learned) if answer_end_tok[k] <= end]
        sample = Sample(sample_ids, labels, src, owner, eot_supervised=len(ends_here))
        sample, reason = _truncate(sample, ends_here, opts)
        if reason:
            result.dropped[reason] += 1
        else:
            result.samples.append(sample)
    return result


def _truncate(s: Sample, answer_ends: list[int], opts: RenderOptions) -> tuple[Sample, Optional[str]]:
    limit = opts.max_length
    if limit is None or len(s) <= limit:
        return (s, None) if s.num_supervised else (s, "no_supervision")
    if opts.truncation == Truncation.DROP:
        return s, "too_long"
    if opts.truncation == Truncation.TURNS:
        fitting = [e for e in answer_ends if e <= limit]
        cut = max(fitting) if fitting else 0
        cut_answers = 0
    else:  # RIGHT: a hard cut; an answer it splits loses its end token, and is counted
        cut = limit
        cut_answers = 1 if _answer_straddles(s, limit) else 0
    trimmed = Sample(s.input_ids[:cut], s.labels[:cut], s.source,
                     None if s.answer_of_token is None else s.answer_of_token[:cut],
                     truncated=True, answers_cut=cut_answers,
                     eot_supervised=sum(1 for e in answer_ends if e <= cut))
    if trimmed.num_supervised == 0:
        return trimmed, "no_supervision"
    return trimmed, None


def _answer_straddles(s: Sample, cut: int) -> bool:
    """Is the token at `cut` inside a learned answer that started before it?"""
    owner = s.answer_of_token
    return owner is not None and cut < len(owner) and owner[cut] >= 0 and owner[cut - 1] == owner[cut]


# ------------------------------------------------------------------------ seq2seq


def render_seq2seq(conv: Conversation, tokenizer: Any, opts: RenderOptions) -> RenderResult:
    """Encoder-decoder samples: the history goes to the encoder, each answer to the decoder.

    One sample per answer (session organization has no meaning here). Input and
    target are tokenized separately, each with its own maximum length; the history
    is cut from the left so the most recent turns survive.
    """
    if opts.organization != Organization.SPLIT_TURN:
        raise TemplateError("data.organization: encoder-decoder models learn one answer per sample; "
                            "use split_turn")
    result = RenderResult([])
    msgs = conv.messages
    every = [i for i, m in enumerate(msgs) if m.role == "assistant"]
    answers = every[-1:] if opts.train_on == TrainOn.LAST_ASSISTANT else every
    histories = [seq2seq_source(msgs[:i]) for i in answers]
    targets = []
    for i in answers:
        if not isinstance(msgs[i].content, str) and any(p.type == "python_output" for p in msgs[i].content):
            raise BadRecord("unsupported_role", "seq2seq targets cannot hold tool output", conv.source)
        targets.append(msgs[i].text)
    enc = tokenizer(histories, add_special_tokens=True)["input_ids"]
    dec = tokenizer(targets, add_special_tokens=True)["input_ids"]
    for i, x, y in zip(answers, enc, dec):
        truncated, cut = False, 0
        if opts.max_length and len(x) > opts.max_length:
            x, truncated = x[len(x) - opts.max_length:], True
        if opts.max_target_length and len(y) > opts.max_target_length:
            y, truncated, cut = y[: opts.max_target_length], True, 1
        src = f"{conv.source}#turn={every.index(i) + 1}"
        if not y:
            result.dropped["no_supervision"] += 1
            continue
        result.samples.append(Sample(np.asarray(x, np.int32), np.asarray(y, np.int32), src,
                                     truncated=truncated, answers_cut=cut, eot_supervised=1 - cut))
    return result


def seq2seq_source(history: Sequence[Message]) -> str:
    """The encoder text: a lone question as itself, a dialogue as `Role: text` lines."""
    system = [m.text for m in history if m.role == "system"]
    turns = [m for m in history if m.role != "system"]
    head = "\n\n".join(system) + "\n\n" if system else ""
    if len(turns) == 1 and turns[0].role == "user":
        return head + turns[0].text
    return head + "\n".join(f"{m.role.capitalize()}: {m.text}" for m in turns)
