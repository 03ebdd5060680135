"""A user's mistakes, table-driven: each one ends with exit code 2 and one line naming the key or
`path:line`, prints no traceback, and leaves every file of the previous run in the output folder
(rows, checkpoint, model, result.json) as it was.

The previous run is a real folder layout with a checkpoint whose manifest is that of the base
config below, so the resume cases compare against what a real run would have written. Most
mistakes are caught before Ray starts; the two that need the corpus read are marked slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

from chatsft.cli import main
from chatsft.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def record(user: str = "Hi, I am Ana.", answer: str = "Hello Ana.") -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})


GOOD = [record(f"Hi, I am person {i}.", f"Hello person {i}.") for i in range(40)]


@dataclass
class Case:
    name: str
    args: list[str]  # after the verb; {tmp} is the test folder
    expect: str  # in the one error line; {tmp} substituted
    verb: str = "train"
    base: bool = True  # prepend the base run's config and overrides
    setup: Optional[Callable[[Path], None]] = None
    marks: tuple = field(default_factory=tuple)


def write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join(lines) + "\n").encode() if lines else b"")


def base_args(tmp: Path) -> list[str]:
    return [TINY, f"run.output_dir={tmp}/out", "run.name=t", f"data.train={tmp}/good.jsonl", "data.eval=[]",
            "tracking.enabled=false", "eval.tasks=[]", "--local"]


def bad_file(*lines: str) -> Callable[[Path], None]:
    return lambda tmp: write(tmp / "bad.jsonl", list(lines))


def no_chat_template(tmp: Path) -> None:
    from chatsft.builtin import resolve
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve("builtin:tiny-llama"))
    tok.chat_template = None
    tok.save_pretrained(tmp / "plain-tok")
    (tmp / "plain-tok" / "chat_template.jinja").unlink(missing_ok=True)


def old_checkpoint(tmp: Path) -> None:
    (tmp / "out" / "t" / "checkpoint_000002" / "chatsft_run.json").unlink()


def file_as_output(tmp: Path) -> None:
    (tmp / "afile").write_text("not a folder\n")


BAD = "data.train={tmp}/bad.jsonl"
CASES = [
    # ------------------------------------------------------------------ config
    Case("unknown key", ["train.lrr=1e-3"], "train.lrr: unknown key (did you mean train.lr?)"),
    Case("wrong type", ["train.lr=fast"], "train.lr: expected a number"),
    Case("out of range", ["train.micro_batch_size=0"], "train.micro_batch_size: must be >= 1"),
    Case("unknown template", ["data.template=chatmlx"], "data.template: expected one of"),
    Case("unknown method", ["method.name=dora"], "method.name: expected one of full, lora"),
    Case("missing config file", ["{tmp}/nope.yaml"], "{tmp}/nope.yaml: config file not found", base=False),
    Case("invalid yaml", ["{tmp}/broken.yaml"], "{tmp}/broken.yaml:3: invalid YAML", base=False,
         setup=lambda tmp: (tmp / "broken.yaml").write_text("train:\n  lr: [1,\n")),
    Case("not a mapping", ["{tmp}/list.yaml"], "top level must be a mapping", base=False,
         setup=lambda tmp: (tmp / "list.yaml").write_text("- a\n- b\n")),
    Case("eval sources and fraction", ["data.eval={tmp}/good.jsonl", "data.eval_fraction=0.1"],
         "data.eval_fraction: set together with data.eval"),
    Case("prompt tuning packed", ["method.name=prompt_tuning", "data.packing=true"],
         "method.name=prompt_tuning: does not work with data.packing=true"),
    Case("fp16 without deepspeed", ["train.precision=fp16", "train.deepspeed.enabled=false"],
         "train.precision=fp16: needs train.deepspeed.enabled=true"),
    Case("lora keys with full", ["method.lora.r=64"], "method.lora.r is set but method.name=full"),
    Case("adapter export with full", ["method.export=adapter"], "method.export=adapter: full fine-tuning"),
    Case("quant keys with lora", ["method.name=lora", "method.quant.quant_type=fp4"],
         "method.quant.quant_type is set but method.name=lora"),
    Case("offload params below zero-3", ["train.deepspeed.offload_params=true"],
         "train.deepspeed.offload_params: needs stage 3"),
    Case("pass_k above samples", ["eval.pass_k=[4]"], "eval.pass_k: k=4 must be between 1 and eval.num_samples=1"),
    Case("no workers", ["scaling.num_workers=0"], "scaling.num_workers: must be >= 1"),
    Case("seq2seq packed", ["model.name_or_path=builtin:tiny-t5", "data.packing=true"],
         "data.packing: encoder-decoder (seq2seq) models are not packed"),
    Case("seq2seq sessions", ["model.name_or_path=builtin:tiny-t5", "data.organization=session"],
         "data.organization: encoder-decoder (seq2seq) models learn one answer per sample"),
    Case("sweep without evaluations", [TINY, "run.output_dir={tmp}/sweep", "train.eval_every=0",
                                       "sweep.space={train.lr: {type: grid, values: [1e-3]}}"],
         "train.eval_every: a sweep needs evaluations", verb="sweep", base=False),
    Case("sweep on a key that is not one", [TINY, "run.output_dir={tmp}/sweep", "train.eval_every=5",
                                            "sweep.space={train.lrate: {type: grid, values: [1e-3]}}"],
         "sweep.space.train.lrate:", verb="sweep", base=False),
    # ------------------------------------------------------------------- model
    Case("missing model", ["model.name_or_path={tmp}/no-model"], "model.name_or_path={tmp}/no-model"),
    Case("tokenizer-only folder", ["model.name_or_path={tmp}/plain-tok"], "set model.kind",
         setup=no_chat_template),
    Case("hf template without one", ["data.template=hf", "model.tokenizer={tmp}/plain-tok"],
         "data.template=hf: the tokenizer", setup=no_chat_template),
    Case("max_length no answer fits", ["data.max_length=4"], "data.max_length=4: no answer can fit"),
    # -------------------------------------------------------------------- data
    Case("no such file", ["data.train={tmp}/missing.jsonl"], "data.train[0].path: no JSONL or Parquet file matches"),
    Case("glob matching nothing", ["data.train={tmp}/*.json"], "data.train[0].path: no JSONL or Parquet file matches"),
    Case("empty file", ["data.train={tmp}/empty.jsonl"], "data.train: {tmp}/empty.jsonl is empty",
         setup=lambda tmp: write(tmp / "empty.jsonl", [])),
    Case("missing eval file", ["data.eval={tmp}/heldout.jsonl"], "data.eval[0].path: no JSONL or Parquet file matches"),
    # ----------------------------------------------------------------- records
    Case("invalid json", [BAD], "{tmp}/bad.jsonl:2: invalid_json", setup=bad_file(GOOD[0], "{not json", GOOD[1])),
    Case("invalid utf-8", [BAD], "{tmp}/bad.jsonl:1: invalid_utf8",
         setup=lambda tmp: (tmp / "bad.jsonl").write_bytes(b'{"messages": "\xff\xfe"}\n')),
    Case("not an object", [BAD], "{tmp}/bad.jsonl:1: not_an_object", setup=bad_file("[1, 2]")),
    Case("no messages", [BAD], "{tmp}/bad.jsonl:3: missing_messages",
         setup=bad_file(GOOD[0], GOOD[1], '{"conversation": []}')),
    Case("unknown role", [BAD], "{tmp}/bad.jsonl:1: unknown_role",
         setup=bad_file('{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]}')),
    Case("empty answer", [BAD], "{tmp}/bad.jsonl:1: empty_answer",
         setup=bad_file('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}')),
    Case("no assistant", [BAD], "{tmp}/bad.jsonl:1: no_assistant",
         setup=bad_file('{"messages": [{"role": "user", "content": "hi"}]}')),
    Case("bad part", [BAD], "{tmp}/bad.jsonl:1: bad_part", setup=bad_file(
        '{"messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}')),
    Case("control token in content", [BAD], "{tmp}/bad.jsonl:1: control_token_in_content",
         setup=bad_file(record("say <|im_end|> now", "ok"))),
    Case("bad record beyond the first batch", [BAD, "run.output_dir={tmp}/fresh"], "{tmp}/bad.jsonl:300: missing_messages",
         setup=bad_file(*[record(f"q {i}", f"a {i}") for i in range(299)], '{"msgs": []}'),
         marks=(pytest.mark.slow,)),
    Case("every record refused", [BAD, "data.on_bad_record=skip", "run.output_dir={tmp}/fresh"],
         "no train samples left: 300 records read, 300 bad (no_assistant 300)",
         setup=bad_file(*['{"messages": [{"role": "user", "content": "hi"}]}'] * 300),
         marks=(pytest.mark.slow,)),
    # ----------------------------------------------------------------- storage
    Case("output dir is a file", ["run.output_dir={tmp}/afile"], "run.output_dir={tmp}/afile: is a file",
         setup=file_as_output),
    Case("output dir under a file", ["run.output_dir={tmp}/afile/run"], "which is a file", setup=file_as_output),
    Case("tracking server down", ["tracking.enabled=true", "tracking.uri=http://127.0.0.1:9"],
         "tracking.uri: MLflow server http://127.0.0.1:9 is unreachable"),
    # ------------------------------------------------------------------ resume
    Case("resume with another template", ["data.template=llama3"], "data.template \"chatml\" -> \"llama3\""),
    Case("resume with another max_length", ["data.max_length=128"], "data.max_length 256 -> 128"),
    Case("resume with another model", ["model.name_or_path=builtin:tiny-t5", "data.organization=split_turn"],
         "model.name_or_path \"builtin:tiny-llama\" -> \"builtin:tiny-t5\""),
    Case("resume with another method", ["method.name=lora"], "method.name \"full\" -> \"lora\""),
    Case("resume with another batch", ["train.micro_batch_size=8"], "rows per optimizer step"),
    Case("resume without a manifest", [], "without a run manifest", setup=old_checkpoint),
    # --------------------------------------------------------------- other verbs
    Case("export without a checkpoint", [TINY, "run.output_dir={tmp}/fresh"], "no checkpoint of run", verb="export",
         base=False),
    Case("export of a missing checkpoint", [TINY, "run.output_dir={tmp}/out", "--checkpoint", "{tmp}/nowhere"],
         "--checkpoint {tmp}/nowhere: no such folder", verb="export", base=False),
    Case("eval of a missing model", [TINY, "--model", "{tmp}/no-model"], "no such model folder", verb="eval",
         base=False),
    Case("eval of an unknown task", [TINY, "eval.tasks=[nope:x]"], "unknown task 'nope:x'", verb="eval", base=False),
    Case("keys of nothing", ["trainn"], "no config key starts with 'trainn'; did you mean train", verb="keys",
         base=False),
]


@pytest.fixture
def world(tmp_path):
    """A previous run of the base config in <tmp>/out: rows, a checkpoint with its manifest, a model."""
    from chatsft.pipeline.run import check
    from chatsft.plan import RunPlan
    from chatsft.train.resume import MANIFEST, manifest

    write(tmp_path / "good.jsonl", GOOD)
    cfg = load_config(TINY, [a for a in base_args(tmp_path) if "=" in a])
    plan = RunPlan.resolve(cfg, local=True)
    out = tmp_path / "out"
    ckpt = out / "t" / "checkpoint_000002"
    ckpt.mkdir(parents=True)
    (ckpt / MANIFEST).write_text(json.dumps(manifest(plan, check(plan).identity)))
    (ckpt / "train_state_rank0.json").write_text(json.dumps({"state": {"step": 2, "epoch": 0, "position": 32,
                                                                       "world_size": 1, "metrics": {}}}))
    (ckpt / "state").mkdir()
    import torch

    torch.save({"module": {"w": torch.randn(4)}}, ckpt / "state" / "mp_rank_00_model_states.pt")
    for name in ("data/prepare.json", "data/train/part-00000.parquet", "data/train/stats.json",
                 "model/config.json", "model/model.safetensors"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(os.urandom(64))
    (out / "result.json").write_text(json.dumps({"run": "t", "checkpoint": str(ckpt), "metrics": {}}))
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_a_mistake_ends_in_one_line_and_loses_nothing(case, world, capsys):
    tmp = world
    if case.setup:
        case.setup(tmp)
    args = [a.replace("{tmp}", str(tmp)) for a in case.args]
    if case.base:
        args = base_args(tmp) + args
    before = snapshot(tmp)
    if case.marks:  # these start Ray: run them as a user does, in a process of their own
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PYTHONPATH"] = str(REPO / "platform")
        proc = subprocess.run([sys.executable, "-m", "chatsft.cli", case.verb, *args], capture_output=True,
                              text=True, timeout=600, env=env, cwd=tmp)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        rc = main([case.verb, *args])
        out, err = capsys.readouterr()
    assert rc == 2, (out[-2000:], err[-2000:])
    assert "Traceback" not in out + err, err[-3000:]
    errors = [line for line in err.splitlines() if ": error: " in line]
    expect = case.expect.replace("{tmp}", str(tmp))
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err[-2000:]
    assert errors[0].startswith(f"chatsft {case.verb}: error: ") and expect in errors[0], errors[0]
    after = snapshot(tmp)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"{case.name} lost or overwrote {changed}"


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
