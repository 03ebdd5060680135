"""Record-level oddities of a kept record are counted under a reason, never dropped unseen: a
dialogue that goes on after its last answer, a field its role does not carry. Counted in the
render stage's statistics (stats.json `notes_by_reason`) and said in prepare's summary."""

import json

import pyarrow as pa

from chatsft.config import load_config
from chatsft.data.conversation import NOTES, parse_line
from chatsft.model.kind import CAUSAL
from chatsft.data.render import RenderOptions
from chatsft.pipeline.render import FileRole, RenderSpec, render_lines
from chatsft.pipeline.rows import STATS, TRAIN
from chatsft.pipeline.run import Prepared, summary


def rec(*messages: dict) -> bytes:
    return json.dumps({"messages": list(messages)}).encode()


U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}


def test_parse_notes_what_it_keeps_but_does_not_use():
    assert parse_line(rec(U, A)).notes == ()
    assert parse_line(rec(U, A, U)).notes == ("trailing_turn",)
    assert parse_line(rec(U, A, {"role": "tool", "content": "42", "tool_call_id": "c1"})).notes == ("trailing_turn",)
    assert parse_line(rec({**U, "reasoning_content": "why"}, A)).notes == ("ignored_field",)  # off an answer
    assert parse_line(rec(U, {**A, "tool_call_id": "c1"})).notes == ("ignored_field",)  # off a tool message
    assert parse_line(rec({**U, "weight": 0}, A)).notes == ("ignored_field",)  # a key chatsft does not read
    assert parse_line(rec({**U, "reasoning_content": None}, A)).notes == ()  # null is absent (Parquet rows)
    assert parse_line(rec(U, {**A, "reasoning_content": "r"}, {**U, "name": "x"})).notes == (
        "trailing_turn", "ignored_field")
    assert set(NOTES) == {"trailing_turn", "ignored_field"}


def test_notes_are_counted_in_the_stats_and_said_in_the_summary(tiny_llama_dir, tokenizer):
    cfg = load_config(None, [f"model.name_or_path={tiny_llama_dir}"])
    spec = RenderSpec(model=cfg.model, template="chatml", options=RenderOptions(max_length=128), kind=CAUSAL,
                      seed=0, eval_fraction=0.0, files=(FileRole("a.jsonl", TRAIN, 1.0, False),), bad_examples=2)
    raws = [rec(U, A), rec(U, A, U), rec(U, A, U), rec({**U, "weight": 1}, A), rec(U)]
    block = render_lines(spec, CAUSAL.format("chatml", tokenizer), [0] * len(raws),
                         list(range(1, len(raws) + 1)), raws)
    (text,) = block.filter(pa.compute.equal(block["row_type"], STATS))["stats"].to_pylist()
    stats = json.loads(text)["stats"]["train"]
    assert stats["notes_by_reason"] == {"ignored_field": 1, "trailing_turn": 2}
    assert stats["bad_by_reason"] == {"no_assistant": 1} and stats["samples"] == 4  # noted records are kept

    shown = dict(stats, rows=4, packing=False, pad_fraction=0.0, pad_micro_batch_size=4, seconds=1.0,
                 tokens_per_second=1.0)
    text = summary(Prepared("train", None, shown, None), "error")
    assert "kept but noted: ignored_field 1, trailing_turn 2" in text
