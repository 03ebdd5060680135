"""The pure parts of the prepare pipeline, without Ray: seeded decisions, render stage, shuffle, packing."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest

from chatsft.config import load_config
from chatsft.data.render import RenderOptions
from chatsft.sources import PACKAGE_ROOT, SourceFile
from chatsft.model.kind import CAUSAL, SEQ2SEQ
from chatsft.data import keys
from chatsft.pipeline.fingerprint import fingerprint, rows_identity
from chatsft.pipeline.read import group_files
from chatsft.pipeline.render import FileRole, RenderSpec, render_lines
from chatsft.pipeline.rows import EVAL, STATS, TRAIN
from chatsft.pipeline.shuffle import partition, plan_split, reduce_part

LINES = (PACKAGE_ROOT / "samples" / "train.jsonl").read_bytes().splitlines()[:120]


def test_copies_follow_the_weight():
    sources = [f"f.jsonl:{n}" for n in range(1, 4001)]
    assert {keys.copies(0, s, 2.0) for s in sources} == {2}
    assert {keys.copies(0, s, 0.0) for s in sources} == {0}
    half = Counter(keys.copies(0, s, 0.5) for s in sources)
    assert set(half) == {0, 1} and abs(half[1] - 2000) < 150
    more = Counter(keys.copies(3, s, 1.25) for s in sources)
    assert set(more) == {1, 2} and abs(more[2] - 1000) < 100
    assert [keys.copies(3, s, 1.25) for s in sources] == [keys.copies(3, s, 1.25) for s in sources]
    held = [s for s in sources if keys.in_eval(1, s, 0.1)]
    assert abs(len(held) - 400) < 80 and held != [s for s in sources if keys.in_eval(2, s, 0.1)]


def test_window_of_cuts_the_key_range_evenly():
    k = np.array([0, (1 << 62) - 1, 1 << 62, (1 << 63) - 1], dtype=np.int64)
    assert keys.window_of(k, 2).tolist() == [0, 0, 1, 1]
    assert keys.window_of(k, 1).tolist() == [0, 0, 0, 0]
    rnd = np.array([keys.order_key(0, f"s:{i}", 0) for i in range(10000)], dtype=np.int64)
    counts = np.bincount(keys.window_of(rnd, 10), minlength=10)
    assert counts.min() > 800 and counts.max() < 1200


def test_group_files_keeps_order_and_bounds():
    groups = group_files([10, 1, 1, 50, 5, 5, 5], 3)
    assert [i for g in groups for i in g] == list(range(7)) and len(groups) == 3
    assert group_files([], 4) == [] and group_files([1, 1], 8) == [[0], [1]]
    assert group_files([5, 1], 2) == [[0], [1]]  # as many groups as asked when there are files


def spec_for(tmp_model, **kw):
    cfg = load_config(None, [f"model.name_or_path={tmp_model}"])
    files = (FileRole("a.jsonl", TRAIN, 1.5, True), FileRole("b.jsonl", EVAL, 1.0, False))
    base = dict(model=cfg.model, template="chatml", options=RenderOptions(max_length=128), kind=CAUSAL,
                seed=5, eval_fraction=0.2, files=files, bad_examples=2)
    base.update(kw)
    return RenderSpec(**base)


def render_chunks(spec, tokenizer, chunks):
    fmt = spec.kind.format(spec.template, tokenizer)
    return [render_lines(spec, fmt, [fi for fi, _, _ in c], [ln for _, ln, _ in c],
                         [raw for _, _, raw in c]) for c in chunks]


@pytest.mark.parametrize("packing", [False, True])
def test_rows_do_not_depend_on_how_lines_are_batched(tiny_llama_dir, tokenizer, packing):
    spec = spec_for(tiny_llama_dir)
    items = [(0, n, raw) for n, raw in enumerate(LINES[:80], 1)] + [(1, n, raw) for n, raw in enumerate(LINES[80:], 1)]
    items.insert(7, (0, 200, b'{"messages": []}'))  # a bad record travels as a count, not a row
    one = render_chunks(spec, tokenizer, [items])
    cut = sorted(random.Random(0).sample(range(1, len(items)), 6))
    many = render_chunks(spec, tokenizer, [items[a:b] for a, b in zip([0, *cut], [*cut, len(items)])])

    def finish(blocks, split):
        stats = [json.loads(s) for b in blocks for s in b.filter(pa.compute.equal(b["row_type"], STATS))["stats"].to_pylist()]
        n = sum(s["stats"]["train" if split == TRAIN else "eval"]["samples"] for s in stats)
        t = sum(s["stats"]["train" if split == TRAIN else "eval"]["tokens"] for s in stats)
        plan = dataclasses.replace(plan_split(split, n, t, packing, 16, 256, spec.seed, "unused"), parts=2)
        if packing:
            plan = dataclasses.replace(plan, n_windows=max(plan.n_windows, 2))
        pieces = [partition(b, [plan]) for b in blocks]
        return [reduce_part([p[k] for p in pieces], plan) for k in range(plan.parts)], stats

    for split in (TRAIN, EVAL):
        rows_one, stats_one = finish(one, split)
        rows_many, stats_many = finish(many, split)
        assert all(a.equals(b) for a, b in zip(rows_one, rows_many))
        total = sum(r.num_rows for r in rows_one)
        assert total > 0
        if packing:
            assert rows_one[0].column_names == ["input_ids", "labels", "position_ids", "source"]
    merged = Counter()
    for s in stats_one:
        merged.update(s["stats"]["train"]["bad_by_reason"])
    assert merged == {"empty_messages": 1}
    # carve-out and weights: a.jsonl records are either held out once or trained 1-2 times
    train_rows, _ = finish(one, TRAIN)
    eval_rows, _ = finish(one, EVAL)
    train_src = Counter(s for r in train_rows for src in r["source"].to_pylist() for s in src)
    eval_src = Counter(s for r in eval_rows for src in r["source"].to_pylist() for s in src)
    for n in range(1, 81):
        s = f"a.jsonl:{n}"
        if keys.in_eval(5, s, 0.2):
            assert eval_src[s] == 1 and train_src[s] == 0
        else:
            assert train_src[s] == keys.copies(5, s, 1.5) and eval_src[s] == 0
    assert all(eval_src[f"b.jsonl:{n}"] == 1 for n in range(1, 41))


def test_fingerprint_tracks_what_shapes_the_rows(tmp_path, tokenizer):
    import os

    from chatsft.pipeline.fingerprint import content_hashes

    (tmp_path / "a.jsonl").write_bytes(LINES[0] + b"\n")
    f = SourceFile("a.jsonl", str(tmp_path / "a.jsonl"), True, 10, 1)
    base = load_config(None, [])

    def fp(cfg, files=(("train", 1.0, f),)):
        return fingerprint(rows_identity(cfg, "causal", list(files), content_hashes([x for _, _, x in files]),
                                         tokenizer))

    ref = fp(base)
    assert fp(load_config(None, [])) == ref
    assert fp(load_config(None, ["data.map_batch_size=7", "data.map_concurrency=3"])) == ref
    assert fp(load_config(None, ["train.micro_batch_size=9", "train.lr=1"])) == ref
    assert fp(load_config(None, [f"data.cache={tmp_path}/cache"])) == ref
    assert fp(load_config(None, ["data.max_length=77"])) != ref
    assert fp(load_config(None, ["run.seed=1"])) != ref
    assert fp(load_config(None, ["data.packing=true"])) != ref
    assert fp(base, [("train", 2.0, f)]) != ref
    # by content: a touched file, or the same bytes under another name, is the same; a byte is not
    os.utime(tmp_path / "a.jsonl", (1, 1))
    assert fp(base, [("train", 1.0, dataclasses.replace(f, mtime_ns=2, display="other/a.jsonl"))]) == ref
    (tmp_path / "b.jsonl").write_bytes(LINES[0] + b"\n")
    assert fp(base, [("train", 1.0, dataclasses.replace(f, location=str(tmp_path / "b.jsonl")))]) == ref
    (tmp_path / "a.jsonl").write_bytes(LINES[0].replace(b"a", b"b", 1) + b"\n")
    assert fp(base) != ref


@pytest.mark.parametrize("packing", [False, True])
def test_spilled_runs_give_the_parts_of_the_whole_stream(tmp_path, tiny_llama_dir, tokenizer, packing):
    """The write phase reads each part's key range of the sorted runs that spill tasks left: the
    parts are those of partitioning the whole stream at once, however the blocks were grouped."""
    from chatsft.pipeline.shuffle import spill_group, write_part

    spec = spec_for(tiny_llama_dir)
    items = [(0, n, raw) for n, raw in enumerate(LINES[:80], 1)] + [(1, n, raw) for n, raw in enumerate(LINES[80:], 1)]
    blocks = render_chunks(spec, tokenizer, [items[a:a + 13] for a in range(0, len(items), 13)])
    groups = [blocks[:1], blocks[1:5], blocks[5:]]
    outs = [spill_group(str(tmp_path / "spill"), g, [TRAIN, EVAL], 3, *grp) for g, grp in enumerate(groups)]
    assert outs[0]["preview"][TRAIN] == partition_samples(blocks[0], TRAIN)[:3]
    for split in (TRAIN, EVAL):
        stats = [json.loads(s)["stats"]["train" if split == TRAIN else "eval"] for o in outs for s in o["stats"]]
        n, t = sum(s["samples"] for s in stats), sum(s["tokens"] for s in stats)
        plan = dataclasses.replace(plan_split(split, n, t, packing, 16, 256, spec.seed, str(tmp_path / f"out{split}")),
                                   parts=3)
        if packing:
            plan = dataclasses.replace(plan, n_windows=max(plan.n_windows, 3))
        runs = [o["runs"][split] for o in outs if o["runs"][split]]
        whole = [partition(b, [plan]) for b in blocks]
        for p in range(plan.parts):
            write_part(plan, p, 4, runs)
            want = reduce_part([w[p] for w in whole], plan)
            got = pa.parquet.read_table(tmp_path / f"out{split}" / f"part-{p:05d}.parquet")
            assert want is not None and got.equals(want.cast(got.schema)), (split, p)


def partition_samples(block, split):
    from chatsft.pipeline.rows import select_samples

    return select_samples(block, split).to_pylist()


def test_seq2seq_rows_hold_encoder_input_and_decoder_labels(tiny_llama_dir, tokenizer):
    from chatsft.data.conversation import parse_line
    from chatsft.data.options import Organization
    from chatsft.data.render import render_seq2seq

    opts = RenderOptions(organization=Organization.SPLIT_TURN, max_length=48, max_target_length=12)
    spec = spec_for(tiny_llama_dir, kind=SEQ2SEQ, options=opts, eval_fraction=0.0,
                    files=(FileRole("a.jsonl", TRAIN, 1.0, False),))
    items = [(0, n, raw) for n, raw in enumerate(LINES[:20], 1)]
    block = render_lines(spec, SEQ2SEQ.format("chatml", tokenizer), [0] * 20, list(range(1, 21)), [r for _, _, r in items])
    plan = plan_split(TRAIN, 100, 1000, False, 16, 48, spec.seed, "unused")
    rows = reduce_part(partition(block, [plan]), plan)
    assert rows.column_names == ["input_ids", "labels", "source"]
    got = {src: (ids, labels) for ids, labels, (src,) in
           zip(rows["input_ids"].to_pylist(), rows["labels"].to_pylist(), rows["source"].to_pylist())}
    want = {}
    for n, raw in enumerate(LINES[:20], 1):
        for s in render_seq2seq(parse_line(raw, f"a.jsonl:{n}"), tokenizer, opts).samples:
            want[s.source] = (s.input_ids.tolist(), s.labels.tolist())
    assert got == want and all("#turn=" in s for s in got)
    assert max(len(v[0]) for v in got.values()) <= 48 and max(len(v[1]) for v in got.values()) <= 12


def test_user_errors_come_out_of_ray_wrappers():
    from chatsft.data.templates import TemplateError
    from chatsft.errors import user_error_in

    original = TemplateError("data.template=hf: no chat_template")
    wrapper = RuntimeError("ray::MapWorker ... traceback ...")
    wrapper.__cause__ = original
    assert user_error_in(wrapper) is original
    assert user_error_in(RuntimeError("a bug")) is None


def test_user_errors_come_out_of_ray_train_failures():
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from chatsft.errors import UserError, one_line, user_error_in

    worker = UserError("model.name_or_path=x: cannot load")
    task = RayTaskError("train_fn", "traceback text", worker).as_instanceof_cause()
    assert user_error_in(task) is worker  # the original, not Ray's subclassing wrapper
    group = WorkerGroupError("Training failed", {1: task})
    assert user_error_in(group) is worker
    assert user_error_in(ControllerError(worker)) is worker
    assert user_error_in(WorkerGroupError("Training failed", {0: RuntimeError("oom")})) is None
    # One line, in the error's own words, from under Ray's wrappers; long text cut, whitespace collapsed.
    assert one_line(group) == one_line(task) == "model.name_or_path=x: cannot load"
    assert one_line(RuntimeError("a\n  b " + "x" * 500)).startswith("a b xx") and len(one_line(RuntimeError("x" * 500))) == 400
    assert one_line(FileNotFoundError(2, "No such file or directory", "/a/b")) == "/a/b: file not found"
