"""evaluate_model end to end on the built-in untrained tiny models, the CLI, and the loss definition."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatsft.config import load_config
from chatsft.errors import UserError
from chatsft.model.kind import CAUSAL

REPO = Path(__file__).resolve().parents[2]
HELDOUT = REPO / "platform" / "chatsft" / "samples" / "heldout.jsonl"


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture()
def few_heldout(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(HELDOUT.read_text().splitlines(keepends=True)[:6]))
    return path


def test_evaluate_model_on_untrained_tiny_llama(tiny_llama, few_heldout):
    from chatsft.eval.evaluate import evaluate_model

    model, tok = tiny_llama
    model.train()  # evaluation must put it back the way it found it
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.eval={few_heldout}", "eval.max_examples=3",
                                                        "eval.max_new_tokens=6", "eval.batch_size=2"])
    runs = []
    metrics = evaluate_model(model, tok, cfg, runs=runs)
    assert model.training
    assert set(metrics) == {"heldout/pass_at_1", "heldout/examples"}
    assert 0.0 <= metrics["heldout/pass_at_1"] <= 1.0
    _assert_mlflow_names(metrics)
    assert metrics["heldout/examples"] == 3
    (run,) = runs
    assert [len(o) for o in run.outputs] == [1, 1, 1]
    assert all(isinstance(o[0], str) for o in run.outputs)
    assert run.examples[0].reference == json.loads(few_heldout.read_text().splitlines()[0])["messages"][-1]["content"]


def _assert_mlflow_names(metrics):
    from mlflow.utils.validation import path_not_unique, validate_param_and_metric_name

    for name in metrics:
        assert validate_param_and_metric_name(name) and not path_not_unique(name), name


def test_task_names_are_mlflow_metric_names(tmp_path):
    from chatsft.eval.tasks import task_from_spec

    odd = tmp_path / "my quiz+v2@x (1).jsonl"
    odd.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    task = task_from_spec(f"mc:{odd}", [])
    assert task.name == "mc:my quiz_v2_x _1_"
    _assert_mlflow_names({f"{task.name}/accuracy": 0.0, f"{task.name}/pass_at_10": 0.0})


def test_pass_at_k_keys_with_sampling(tiny_llama, few_heldout):
    from chatsft.eval.evaluate import evaluate_model

    model, tok = tiny_llama
    cfg = load_config(None, [f"data.eval={few_heldout}", "eval.max_examples=2", "eval.max_new_tokens=3",
                             "eval.num_samples=3", "eval.temperature=0.8", "eval.top_k=5", "eval.pass_k=[2,3]"])
    metrics = evaluate_model(model, tok, cfg)
    assert set(metrics) == {"heldout/pass_at_1", "heldout/pass_at_2", "heldout/pass_at_3", "heldout/examples"}
    assert metrics["heldout/pass_at_1"] <= metrics["heldout/pass_at_2"] <= metrics["heldout/pass_at_3"] <= 1.0
    _assert_mlflow_names(metrics)
    from chatsft.config import ConfigError

    with pytest.raises(ConfigError, match="eval.pass_k: k=2"):
        load_config(None, ["eval.pass_k=[2]"])
    bad = load_config(None, [f"data.eval={few_heldout}", "eval.max_examples=1", "eval.max_new_tokens=1"])
    bad.eval.pass_k = [2]  # built in code, past the config's validation
    with pytest.raises(UserError, match="num_samples"):
        evaluate_model(model, tok, bad)


def test_batched_kv_cache_generation_matches_hf_generate(tiny_llama):
    """Left padding + our cache loop give, row by row, what HF generate gives one unpadded prompt at a time."""
    from chatsft.eval.generation import GenerationOptions, generate

    model, tok = tiny_llama
    texts = ["<|im_start|>user\nHi, I live in Oslo.<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nMy name is Maya and I have a cat. What pet?<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nHello.<|im_end|>\n<|im_start|>assistant\n"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    stops = [tok.eos_token_id]
    batched = generate(model, prompts, stops, tok.pad_token_id, GenerationOptions(max_new_tokens=8, batch_size=3))
    single = generate(model, prompts, stops, tok.pad_token_id, GenerationOptions(max_new_tokens=8, batch_size=1))
    assert batched == single
    for p, (out,) in zip(prompts, batched):
        ref = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=stops,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        ref = ref[: ref.index(stops[0])] if stops[0] in ref else ref
        assert out == ref


def test_validation_loss_is_token_weighted(tiny_llama, few_heldout):
    """eval_loss = sum of token losses / supervised tokens over the rows, not a mean of batch means,
    whatever the micro-batch and however the rows are dealt out to workers."""
    import numpy as np

    from chatsft.data.render import render_conversation
    from chatsft.data.schema import Row
    from chatsft.eval.loss import loss_sums
    from chatsft.model.loss import full_loss
    from chatsft.sources import read_local

    model, tok = tiny_llama
    samples = [s for conv in read_local(str(few_heldout))
               for s in render_conversation(conv, tok, "chatml").samples]
    assert len(samples) == 6
    rows = [Row(s.input_ids.astype(np.int64), s.labels.astype(np.int64)) for s in samples]

    def sums(micro, rank=0, world=1):
        return loss_sums(lambda inputs: model(**inputs), rows, loss=full_loss, micro_batch=micro,
                         collate=CAUSAL.batcher(tok.pad_token_id), rank=rank, world=world)

    losses = {}
    for mb in (1, 4):
        total, count = sums(mb)
        # Labels are shifted once; the first token of a dialogue is never supervised, so none is lost.
        assert count == sum(s.num_supervised for s in samples)
        losses[mb] = total / count
    assert losses[1] == pytest.approx(losses[4], rel=1e-5)
    shares = [sums(2, rank, 2) for rank in (0, 1)]  # two workers: each its share, sums added
    assert sum(c for _, c in shares) == count
    assert sum(t for t, _ in shares) / count == pytest.approx(losses[1], rel=1e-5)
    per_sample = []
    with torch.no_grad():
        for s in samples:
            out = model(input_ids=torch.tensor([s.input_ids.tolist()]), labels=torch.tensor([s.labels.tolist()]))
            per_sample.append((out.loss.item(), s.num_supervised))
    weighted = sum(l * n for l, n in per_sample) / sum(n for _, n in per_sample)
    assert losses[1] == pytest.approx(weighted, rel=1e-5)


def test_bad_records_follow_on_bad_record(tiny_llama, tmp_path):
    from chatsft.data.conversation import BadRecord
    from chatsft.eval.evaluate import evaluate_model

    model, tok = tiny_llama
    path = tmp_path / "eval.jsonl"
    good = HELDOUT.read_text().splitlines()[0]
    path.write_text(good + "\n{not json\n" + good + "\n")
    cfg = load_config(None, [f"data.eval={path}", "eval.max_new_tokens=2"])
    with pytest.raises(BadRecord, match=f"{path}:2"):
        evaluate_model(model, tok, cfg)
    cfg = load_config(None, [f"data.eval={path}", "eval.max_new_tokens=2", "data.on_bad_record=skip"])
    metrics = evaluate_model(model, tok, cfg)
    assert metrics["heldout/examples"] == 2 and metrics["heldout/skipped"] == 1

    mc = tmp_path / "quiz.jsonl"
    mc.write_text('{"question": "q?", "choices": ["a", "b"], "answer": "C"}\n')
    cfg = load_config(None, [f"eval.tasks=[mc:{mc}]"])
    with pytest.raises(UserError, match=f"{mc}:1: 'answer' must be one of A, B"):
        evaluate_model(model, tok, cfg)


def test_evaluate_model_on_tiny_t5(tiny_t5_dir, few_heldout, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from chatsft.eval.evaluate import evaluate_model

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)
    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text('{"question": "Which is a pet?", "choices": ["cat", "Oslo", "red"], "answer": 0}\n' * 3)
    cfg = load_config(None, ["model.name_or_path=builtin:tiny-t5", "data.organization=split_turn",
                             f"data.eval={few_heldout}", "eval.max_examples=2", "eval.max_new_tokens=4",
                             f"eval.tasks=[heldout, mc:{quiz}]"])
    runs = []
    metrics = evaluate_model(model, tok, cfg, runs=runs)
    assert set(metrics) == {"heldout/pass_at_1", "heldout/examples", "mc:quiz/accuracy", "mc:quiz/examples"}
    assert metrics["heldout/examples"] == 2
    picks = {o[0] for o in runs[1].outputs}
    assert len(picks) == 1 and picks <= {"A", "B", "C"}  # copies of one question: one pick for all
    assert metrics["mc:quiz/accuracy"] == (1.0 if picks == {"A"} else 0.0)


@pytest.mark.slow
def test_cli_eval_prints_table_with_the_loss_over_prepared_rows(tmp_path, few_heldout, capsys, tiny_llama):
    """`chatsft eval` prepares the eval rows (here: none yet) and measures eval_loss on them
    with the function training uses; the value is the token-weighted loss of those rows."""
    import numpy as np

    from chatsft.cli import main
    from chatsft.data.render import render_conversation
    from chatsft.sources import read_local

    args = [str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={tmp_path}/out", f"data.eval={few_heldout}",
            "eval.max_examples=2", "eval.max_new_tokens=2", "tracking.enabled=false"]
    rc = main(["eval", *args, "--model", "builtin:tiny-llama"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "heldout/pass_at_1" in out and "reference:" in out
    shown = float(next(line.split()[1] for line in out.splitlines() if line.startswith("eval_loss")))
    assert (tmp_path / "out" / "data" / "eval").is_dir()
    model, tok = tiny_llama
    total = count = 0.0
    with torch.no_grad():
        for conv in read_local(str(few_heldout)):
            for s in render_conversation(conv, tok, "chatml").samples:
                out = model(input_ids=torch.tensor([s.input_ids.tolist()]),
                            labels=torch.tensor([s.labels.astype(np.int64).tolist()]))
                total += out.loss.item() * s.num_supervised
                count += s.num_supervised
    assert shown == pytest.approx(total / count, abs=1e-4)


def test_cli_and_job_errors_are_one_line(tmp_path):
    cfg = REPO / "configs" / "tiny.yaml"
    for args, expect in [
        (["--model", str(tmp_path / "missing")], "no such model folder"),
        (["--model", str(tmp_path)], "not a Hugging Face model folder"),
        (["eval.tasks=[nope:x]"], "unknown task 'nope:x'"),
    ]:
        proc = subprocess.run([sys.executable, str(REPO / "jobs" / "eval.py"), str(cfg), *args],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "WARNING" not in line]
        assert lines == [lines[0]] and expect in lines[0] and lines[0].startswith("chatsft eval: error:")
