"""`prepare` on a local Ray: rows equal the pure render, nothing lost, packing exact, bad records, mixtures.

One local Ray (2 CPUs) serves the whole module. Every corpus is small: the
time goes to starting render actors (each loads the tokenizer), not to data.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatsft.config import ConfigError, load_config
from chatsft.data.conversation import REASONS, BadRecord, iter_lines, parse_line
from chatsft.data.render import render_conversation
from chatsft.sources import PACKAGE_ROOT
from chatsft.data.templates import get_template
from chatsft.data import keys
from chatsft.pipeline import prepare
from chatsft.pipeline.run import plan_files
from chatsft.plan import RunPlan

pytestmark = pytest.mark.slow

SAMPLES = PACKAGE_ROOT / "samples" / "train.jsonl"


@pytest.fixture
def ray_local():
    from ray.data import DataContext

    from tests.conftest import use_local_ray

    use_local_ray()
    DataContext.get_current().enable_progress_bars = False
    yield


def config(tmp_path, tiny_llama_dir, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_llama_dir}",
                              *overrides])


def read_rows(folder) -> pa.Table:
    files = sorted(glob.glob(os.path.join(folder, "*.parquet")))
    assert files, folder
    return pa.concat_tables([pq.read_table(f) for f in files])


def write_corpus(tmp_path, name, lines: list[bytes]) -> str:
    path = tmp_path / name
    path.write_bytes(b"".join(lines))
    return str(path)


def expected_samples(paths, tokenizer, template, **options) -> dict[str, tuple[list, list]]:
    """source -> (input_ids, labels) as render_conversation gives them, for every good record."""
    tpl = get_template(template, tokenizer)
    out = {}
    for path in paths:
        for source, raw in iter_lines(open(path, "rb").read(), path):
            try:
                result = render_conversation(parse_line(raw, source), tokenizer, tpl, source=source, **options)
            except BadRecord:
                continue
            for s in result.samples:
                out[s.source] = (s.input_ids.tolist(), s.labels.tolist())
    return out


def sample_corpus(tmp_path) -> list[str]:
    """Two files of shipped conversations, plus a tool-use record and a record too long to keep whole."""
    lines = SAMPLES.read_bytes().splitlines(keepends=True)[:60]
    tool = {"messages": [{"role": "user", "content": "Add 2 and 3."},
                         {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                                           {"type": "python", "text": "print(2 + 3)"},
                                                           {"type": "python_output", "text": "5"},
                                                           {"type": "text", "text": "It is 5."}]}]}
    long = {"messages": [m for _ in range(6) for m in (
        {"role": "user", "content": "Tell me again where I live, please, I keep forgetting it."},
        {"role": "assistant", "content": "You live in Oslo, as you told me at the start of our talk."})]}
    a = write_corpus(tmp_path, "a.jsonl", lines[:30] + [json.dumps(tool).encode() + b"\n"])
    b = write_corpus(tmp_path, "b.jsonl", lines[30:] + [json.dumps(long).encode() + b"\n"])
    return [a, b]


def test_rows_equal_render_and_reuse(ray_local, tmp_path, tiny_llama_dir, tokenizer, monkeypatch):
    from chatsft.data.stats import batch_pad_fraction
    from chatsft.pipeline import shuffle

    monkeypatch.setattr(shuffle, "TOKENS_PER_PART", 2000)  # several parts (the driver plans them)
    paths = sample_corpus(tmp_path)
    cfg = config(tmp_path, tiny_llama_dir, f"data.train=[{paths[0]}, {paths[1]}]", "data.max_length=160",
                 "train.micro_batch_size=3")
    p = prepare(RunPlan.resolve(cfg), force=True)
    rows = read_rows(p.train_dir)
    assert len(glob.glob(os.path.join(p.train_dir, "*.parquet"))) > 2
    # pad_fraction from the parts' summaries is exactly that of every row in stored order
    lengths = [len(x) for x in rows["input_ids"].to_pylist()]
    assert p.train_stats["pad_fraction"] == batch_pad_fraction(lengths, 3)
    assert rows.column_names == ["input_ids", "labels", "source"]
    assert rows.schema.field("input_ids").type == pa.list_(pa.int32())
    assert rows.schema.field("source").type == pa.list_(pa.string())
    expected = expected_samples(paths, tokenizer, "chatml", max_length=160)
    got = {}
    for ids, labels, (src,) in zip(rows["input_ids"].to_pylist(), rows["labels"].to_pylist(),
                                   rows["source"].to_pylist()):
        assert src not in got  # every record exactly once
        assert len(ids) <= 160
        got[src] = (ids, labels)
    assert got == expected
    assert p.eval_dir is None and p.eval_stats is None
    st = p.train_stats
    assert st["records_read"] == 62 and st["records_bad"] == 0 and st["samples"] == len(expected)
    assert st["rows"] == rows.num_rows and st["truncated_samples"] >= 1  # the long record was cut
    assert st["tokens"] == sum(len(v[0]) for v in expected.values())
    assert st["supervised_tokens"] == sum(sum(t != -100 for t in v[1]) for v in expected.values())
    for name in ("stats.json", "mask_preview.html", "template_report.txt"):
        assert os.path.exists(os.path.join(p.train_dir, name))
    assert st["template"]["strategy"] == "built-in" and st["template"]["roles"]["user"]["learned"] == 0
    assert json.load(open(os.path.join(p.train_dir, "stats.json"))) == st
    assert f"{paths[0]}:1" in open(os.path.join(p.train_dir, "mask_preview.html")).read()

    # prepare() without force reuses fresh rows: nothing is rewritten.
    marker = os.path.join(tmp_path, "run", "data", "prepare.json")
    before = os.stat(marker).st_mtime_ns
    again = prepare(RunPlan.resolve(cfg))
    assert again.train_stats == st and os.stat(marker).st_mtime_ns == before


def test_packed_rows_hold_each_sample_once_with_its_own_labels(ray_local, tmp_path, tiny_llama_dir, tokenizer):
    paths = sample_corpus(tmp_path)
    cfg = config(tmp_path, tiny_llama_dir, f"data.train=[{paths[0]}, {paths[1]}]", "data.max_length=256",
                 "data.packing=true", "data.organization=split_turn", "data.pack_window=40")
    p = prepare(RunPlan.resolve(cfg), force=True)
    rows = read_rows(p.train_dir)
    assert rows.column_names == ["input_ids", "labels", "position_ids", "source"]
    expected = expected_samples(paths, tokenizer, "chatml", max_length=256, organization="split_turn")
    seen = Counter()
    for ids, labels, pos, sources in zip(*(rows[c].to_pylist() for c in rows.column_names)):
        assert len(ids) == len(labels) == len(pos) <= 256
        starts = [i for i, q in enumerate(pos) if q == 0]
        assert starts[0] == 0 and len(starts) == len(sources)
        for k, (a, src) in enumerate(zip(starts, sources)):
            b = starts[k + 1] if k + 1 < len(starts) else len(ids)
            assert pos[a:b] == list(range(b - a))  # positions restart at each sequence
            assert (ids[a:b], labels[a:b]) == expected[src]  # unpacked labels, untouched borders
            seen[src] += 1
    assert seen == Counter({src: 1 for src in expected})
    assert any("#turn=2" in s for s in seen)
    st = p.train_stats
    assert st["samples"] == len(expected) and st["rows"] == rows.num_rows < len(expected)
    assert 0 <= st["pad_fraction"] <= st["pad_fraction_to_max_length"] < 0.2


# Each line is (bytes, reason or None). Under the `special` template every reason that file
# content can cause arises except template_error, which only a tokenizer's own (hf) template raises.
MALFORMED = [
    (b'\xef\xbb\xbf{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\r\n', None),
    (b"\r\n", None),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}\n', "invalid_utf8"),
    (b'{"messages": [\n', "invalid_json"),
    (b"[1, 2]\n", "not_an_object"),
    (b'{"msgs": []}\n', "missing_messages"),
    (b"   \n", None),
    (b'{"messages": "hi"}\n', "messages_not_a_list"),
    (b'{"messages": []}\n', "empty_messages"),
    (b'{"messages": ["hi"]}\n', "message_not_an_object"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}\n', "unknown_role"),
    (b'{"messages": [{"role": "user", "content": 5}]}\n', "bad_content"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image", "text": "x"}]}]}\n', "bad_part"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}\n', "empty_answer"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "no_assistant"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}\n', "bad_order"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}, {"role": "assistant", "content": "c"}]}\n', "unsupported_role"),
    (b'{"messages": [{"role": "user", "content": "<|user_end|>"}, {"role": "assistant", "content": "c"}]}\n', "control_token_in_content"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": 5}]}\n', "bad_reasoning"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": [{"name": "f"}]}]}\n', "bad_tool_call"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{x: 1"}}]}]}\n', "bad_tool_arguments"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r", "name": 7}, {"role": "assistant", "content": "a"}]}\n', "bad_tool_message"),
    (b'{"tools": {"name": "f"}, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n', "bad_tools"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]}\n', "unsupported_field"),
    (b'{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]}\r\n', None),
    (b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}', None),  # no final newline
]


def test_malformed_corpus_error_names_the_first_bad_line(ray_local, tmp_path, tiny_llama_dir):
    good = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    first = write_corpus(tmp_path, "first.jsonl", [good] * 5)
    second = write_corpus(tmp_path, "second.jsonl", [line for line, _ in MALFORMED])
    cfg = config(tmp_path, tiny_llama_dir, f"data.train=[{first}, {second}]", "data.template=special",
                 "data.map_batch_size=4")
    with pytest.raises(BadRecord) as err:
        prepare(RunPlan.resolve(cfg), force=True)
    assert err.value.source == f"{second}:3" and err.value.reason == "invalid_utf8"
    assert str(err.value).startswith(f"{second}:3: invalid_utf8: ") and "\n" not in str(err.value)


def test_malformed_corpus_skip_counts_every_reason(ray_local, tmp_path, tiny_llama_dir):
    path = write_corpus(tmp_path, "bad.jsonl", [line for line, _ in MALFORMED])
    cfg = config(tmp_path, tiny_llama_dir, f"data.train={path}", "data.template=special",
                 "data.on_bad_record=skip", "data.bad_examples=3", "data.map_batch_size=4")
    p = prepare(RunPlan.resolve(cfg), force=True)
    expected = Counter(reason for _, reason in MALFORMED if reason)
    hf_only = {"template_error", "answer_not_in_render", "answer_not_located", "reasoning_not_rendered",
               "tool_call_not_in_render", "generation_mask_mismatch", "reasoning_unsupported",
               "tool_calls_unsupported", "tool_results_unsupported"}  # what only a model's own template does
    assert set(REASONS) - set(expected) == hf_only  # every other reason is in the corpus
    st = p.train_stats
    assert st["bad_by_reason"] == dict(expected) and st["records_bad"] == sum(expected.values())
    non_blank = [n for n, (line, _) in enumerate(MALFORMED, 1) if line.strip(b"\xef\xbb\xbf \r\n")]
    assert st["records_read"] == len(non_blank)
    good = [n for n, (line, reason) in enumerate(MALFORMED, 1) if reason is None and n in non_blank]
    rows = read_rows(p.train_dir)
    assert sorted(s for (s,) in rows["source"].to_pylist()) == sorted(f"{path}:{n}" for n in good)
    bad = [json.loads(x) for x in open(os.path.join(p.train_dir, "bad_records.jsonl"))]
    assert [(b["source"], b["reason"]) for b in bad] == [
        (f"{path}:3", "invalid_utf8"), (f"{path}:4", "invalid_json"), (f"{path}:5", "not_an_object")]
    assert bad[1]["line"] == '{"messages": ['


def test_hf_template_error_is_a_counted_bad_record(ray_local, tmp_path, tiny_llama_dir):
    # A tokenizer whose own chat template refuses non-alternating roles, as many hub templates do.
    import shutil

    from transformers import AutoTokenizer

    tok_dir = tmp_path / "strict-tokenizer"
    shutil.copytree(tiny_llama_dir, tok_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok.save_pretrained(tok_dir)
    good = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    clash = b'{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "r"}, ' \
            b'{"role": "assistant", "content": "a"}]}\n'
    path = write_corpus(tmp_path, "hf.jsonl", [good, clash, good])
    cfg = config(tmp_path, tiny_llama_dir, f"data.train={path}", "data.template=hf",
                 f"model.tokenizer={tok_dir}", "data.on_bad_record=skip")
    p = prepare(RunPlan.resolve(cfg), force=True)
    assert p.train_stats["bad_by_reason"] == {"template_error": 1} and p.train_stats["samples"] == 2
    report = p.train_stats["template"]  # the report read the same records before the work started
    assert report["strategy"] == "located" and report["records"]["refused"] == {"template_error": 1}
    text = open(os.path.join(p.train_dir, "template_report.txt")).read()
    assert "refused template_error: 1" in text
    # Serving parity: both answers are trained on what the template serves before them (stats.json, as a
    # number too, for MLflow).
    assert report["serving_parity"]["answers"] == 2 and report["serving_parity"]["same"] == 2
    assert p.train_stats["serving_parity"] == 1.0 and "serving parity: 2 of 2 answers (100.0%)" in text
    bad = [json.loads(x) for x in open(os.path.join(p.train_dir, "bad_records.jsonl"))]
    assert bad[0]["source"] == f"{path}:2" and "alternate" in bad[0]["detail"]


def test_mixture_weights_carve_out_and_determinism(ray_local, tmp_path, tiny_llama_dir):
    lines = SAMPLES.read_bytes().splitlines(keepends=True)
    a = write_corpus(tmp_path, "a.jsonl", lines[:40])
    b = write_corpus(tmp_path, "b.jsonl", lines[40:120])
    mix = f"data.train=[{{path: {a}, weight: 2.0}}, {{path: {b}, weight: 0.5}}]"
    runs = []
    for conc, batch in ((1, 16), (2, 64)):
        cfg = config(tmp_path / f"c{conc}", tiny_llama_dir, mix, "data.eval_fraction=0.25", "run.seed=7",
                     f"data.map_concurrency={conc}", f"data.map_batch_size={batch}")
        p = prepare(RunPlan.resolve(cfg), force=True)
        runs.append((read_rows(p.train_dir), read_rows(p.eval_dir), p))
    (train, evals, p), (train2, evals2, _) = runs
    assert train.equals(train2) and evals.equals(evals2)  # same rows, same order, any concurrency

    count = Counter(s for (s,) in train["source"].to_pylist())
    held = Counter(s for (s,) in evals["source"].to_pylist())
    every_a = [f"{a}:{n}" for n in range(1, 41)]
    every_b = [f"{b}:{n}" for n in range(1, 81)]
    assert set(held) == {s for s in every_a + every_b if keys.in_eval(7, s, 0.25)}
    assert all(n == 1 for n in held.values()) and not set(held) & set(count)
    assert 10 <= len(held) <= 50  # about a quarter of 120
    assert all(count[s] == 2 for s in every_a if s not in held)  # weight 2: every record twice
    kept_b = {s for s in every_b if s not in held and count[s]}
    assert all(count[s] == 1 for s in kept_b)
    assert kept_b == {s for s in every_b if s not in held and keys.unit(7, "weight", s) < 0.5}
    n_b = sum(1 for s in every_b if s not in held)
    assert 0.25 * n_b <= len(kept_b) <= 0.75 * n_b  # weight 0.5: about half
    st = p.train_stats
    assert st["samples"] == train.num_rows == sum(count.values())
    assert st["records_read"] + p.eval_stats["records_read"] == 120
    # the rows are shuffled: neither in file order nor grouped by source file
    order = [s for (s,) in train["source"].to_pylist()]
    assert order != sorted(order)


def test_seq2seq_refuses_packing(tmp_path, tiny_llama_dir):
    cfg = config(tmp_path, tiny_llama_dir, "model.kind=seq2seq", "data.packing=true",
                 "data.organization=split_turn")
    with pytest.raises(ConfigError, match="data.packing"):
        prepare(RunPlan.resolve(cfg), force=True)


def test_job_entry_point_fails_with_one_line(tmp_path, tiny_llama_dir):
    import subprocess
    import sys

    path = write_corpus(tmp_path, "c.jsonl", [
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
        b'{"messages": []}\n'])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"run: {{output_dir: {tmp_path / 'run'}}}\ndata: {{train: {path}}}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["RAY_ADDRESS"] = "local"  # never join another Ray that happens to run on this machine
    job = Path(__file__).resolve().parents[2] / "jobs" / "prepare.py"
    res = subprocess.run([sys.executable, str(job), str(cfg),
                          f"model.name_or_path={tiny_llama_dir}"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == \
        f"chatsft prepare: error: {path}:2: empty_messages: 'messages' is empty"


def parquet_and_jsonl_corpus(tmp_path) -> tuple[str, str, dict[int, str]]:
    """The same conversations as Parquet (HF datasets layout: a `messages` column of structs, an
    extra `id` column, several row groups) and as JSONL, one record a row / a line in the same
    order; and the reason of each bad row (by its 1-based number)."""
    records = [json.loads(x) for x in SAMPLES.read_bytes().splitlines()[:30]]
    records.append({"messages": [
        {"role": "user", "content": "What is 2 + 3? Use the tool."},
        {"role": "assistant", "content": None, "reasoning_content": "I should call add.",
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "content": "5", "tool_call_id": "call_1", "name": "add"},
        {"role": "assistant", "content": "It is 5."}]})
    bad = {
        3: ({"messages": None}, "missing_messages"),
        9: ({"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "a"}]},
            "unknown_role"),
        17: ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]}, "bad_content"),
        18: ({"messages": []}, "empty_messages"),
        33: ({"messages": [{"role": "user", "content": "only a question"}]}, "no_assistant"),
    }
    for n in sorted(bad):
        records.insert(n - 1, bad[n][0])
    rows = [{"id": i, **r} for i, r in enumerate(records)]
    table = pa.Table.from_pylist(rows)
    assert pa.types.is_list(table.schema.field("messages").type)
    pq_path = str(tmp_path / "conv.parquet")
    pq.write_table(table, pq_path, row_group_size=7)
    assert pq.ParquetFile(pq_path).num_row_groups > 4

    def no_nulls(v):  # what the JSONL of the same dataset says: absent keys, not nulls
        if isinstance(v, dict):
            return {k: no_nulls(x) for k, x in v.items() if x is not None}
        return [no_nulls(x) for x in v] if isinstance(v, list) else v

    jsonl = write_corpus(tmp_path, "conv.jsonl", [json.dumps(no_nulls(r)).encode() + b"\n" for r in rows])
    return pq_path, jsonl, {n: reason for n, (_, reason) in bad.items()}


def test_parquet_rows_equal_the_same_conversations_as_jsonl(ray_local, tmp_path, tiny_llama_dir):
    pq_path, jsonl, bad = parquet_and_jsonl_corpus(tmp_path)
    common = ["data.max_length=160", "data.on_bad_record=skip", "data.map_batch_size=4", "data.bad_examples=10"]
    got = {}
    for name, path in (("parquet", pq_path), ("jsonl", jsonl)):
        cfg = config(tmp_path / name, tiny_llama_dir, f"data.train={path}", *common)
        p = prepare(RunPlan.resolve(cfg), force=True)
        rows = read_rows(p.train_dir)
        by_number = {}
        for ids, labels, (src,) in zip(rows["input_ids"].to_pylist(), rows["labels"].to_pylist(),
                                       rows["source"].to_pylist()):
            where, n = src.rsplit(":", 1)
            assert where == path
            by_number[int(n)] = (ids, labels)
        reported = [json.loads(x) for x in open(os.path.join(p.train_dir, "bad_records.jsonl"))]
        got[name] = (by_number, p.train_stats, [(b["source"], b["reason"]) for b in reported])

    rows_pq, st_pq, bad_pq = got["parquet"]
    rows_js, st_js, bad_js = got["jsonl"]
    assert rows_pq == rows_js and len(rows_pq) == 31  # every good row, with exactly its line's tokens
    assert sorted(rows_pq) == [n for n in range(1, 37) if n not in bad]
    assert bad_pq == [(f"{pq_path}:{n}", reason) for n, reason in sorted(bad.items())]
    assert bad_js == [(f"{jsonl}:{n}", reason) for n, reason in sorted(bad.items())]
    assert st_pq["bad_by_reason"] == st_js["bad_by_reason"] == dict(Counter(bad.values()))
    for key in ("records_read", "records_bad", "samples", "tokens", "supervised_tokens", "rows"):
        assert st_pq[key] == st_js[key], key
    assert st_pq["records_read"] == 36


def test_parquet_bad_record_error_names_file_and_row(ray_local, tmp_path, tiny_llama_dir):
    pq_path, _, bad = parquet_and_jsonl_corpus(tmp_path)
    cfg = config(tmp_path, tiny_llama_dir, f"data.train={pq_path}", "data.max_length=160")
    with pytest.raises(BadRecord) as err:
        prepare(RunPlan.resolve(cfg), force=True)
    assert err.value.source == f"{pq_path}:{min(bad)}" and err.value.reason == "missing_messages"
    assert "'id'" in err.value.detail  # the row's other columns are named


def test_unknown_extension_is_one_line_naming_the_key(tmp_path, tiny_llama_dir):
    from chatsft.errors import UserError

    path = write_corpus(tmp_path, "conv.txt", [b'{"messages": []}\n'])
    cfg = config(tmp_path, tiny_llama_dir, f"data.train={path}")
    with pytest.raises(UserError) as err:
        prepare(RunPlan.resolve(cfg), force=True)
    assert str(err.value).startswith("data.train[0].path: ") and "data.train[0].format" in str(err.value)
    assert "\n" not in str(err.value)
    explicit = config(tmp_path, tiny_llama_dir, f"data.train=[{{path: {path}, format: jsonl}}]")
    assert [f.format for f, _ in plan_files(explicit)] == ["jsonl"]


def test_prepare_blocks_stay_small_whatever_the_file_size(ray_local, tmp_path):
    """What bounds prepare's object store: a read task hands out blocks of about BLOCK_BYTES, not
    its whole file. Ray Data's default merges what a read yields into blocks of up to 128 MiB, so a
    bigger file (a bigger corpus in as many files) made a bigger block, held while in flight."""
    from ray.data import read_datasource

    from chatsft.pipeline.read import make_datasource, plan_units
    from chatsft.pipeline.run import BLOCK_BYTES, bounded_blocks
    from chatsft.sources import expand_source

    line = b'{"messages": [{"role": "user", "content": "' + b"x" * 1000 + b'"}]}\n'
    size = 3 * BLOCK_BYTES
    write_corpus(tmp_path, "big.jsonl", [line] * (size // len(line)))
    files = expand_source(str(tmp_path / "big.jsonl"))
    units = plan_units(files, lambda asked: [0] * len(asked))

    def block_sizes() -> list[int]:
        ds = read_datasource(make_datasource(files, units), override_num_blocks=1)
        return [m.size_bytes for b in ds.iter_internal_ref_bundles() for m in b.metadata]

    with bounded_blocks(2):
        sizes = block_sizes()
    assert len(sizes) >= 3 and max(sizes) <= 1.5 * BLOCK_BYTES, sizes
    assert sum(sizes) >= size * 0.9
    assert max(block_sizes()) > 2 * BLOCK_BYTES  # outside it, Ray Data's default: one block of the file
