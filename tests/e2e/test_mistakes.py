"""A user's mistakes, table-driven: each one ends with exit code 2 and one line naming the key or
`path:line`, prints no traceback, comes before any compute (within `Case.within` seconds), and
leaves every file of the previous run in the output folder (rows, checkpoint, model,
result.json) and every file of the user's (the test folder holds them) as it was.

The previous run is a real folder layout with a checkpoint whose manifest is that of the base
config below, so the resume cases compare against what a real run would have written. Most
mistakes are caught before Ray starts and run in this process; the two that need the corpus
read are marked slow and run as a user runs them, in a process of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
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
    setup: Optional[Callable[[Path], Optional[dict]]] = None  # may return environment variables to set
    marks: tuple = field(default_factory=tuple)
    within: float = 60.0  # seconds before the refusal (a loaded 2-core machine; most take one or two)
    cwd: Optional[str] = None  # run in this folder under the test folder
    says: Optional[str] = None  # also on stdout before the refusal; {tmp} substituted


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


def mine(tmp: Path) -> None:
    """A folder of the user's own, which no export may take."""
    (tmp / "mine" / "notes").mkdir(parents=True)
    (tmp / "mine" / "notes" / "thesis.txt").write_text("three years of work\n")
    (tmp / "mine" / "config.json").write_text("{}\n")


def export_of(kind: str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / "prev").mkdir()
        (tmp / "prev" / "chatsft_export.json").write_text(json.dumps({"kind": kind, "run": "t"}))
        (tmp / "prev" / "adapter_config.json").write_text("{}\n")
    return make


def workdir(tmp: Path) -> None:
    (tmp / "work").mkdir()
    (tmp / "work" / "draft.txt").write_text("the working folder's own file\n")


CKPT = "{tmp}/out/t/checkpoint_000002"


def corrupt_checkpoint(tmp: Path) -> None:
    shard = tmp / "out" / "t" / "checkpoint_000002" / "state" / "mp_rank_00_model_states.pt"
    shard.write_bytes(b"\0" * shard.stat().st_size)


def partial_checkpoint(tmp: Path) -> None:
    (tmp / "out" / "t" / "checkpoint_000002" / "train_state_rank0.json").unlink()


def newer_partial(tmp: Path) -> None:
    """A save of step 3 cut off before it completed (no rank-0 state), beside the good step 2."""
    shutil.copytree(tmp / "out" / "t" / "checkpoint_000002", tmp / "out" / "t" / "checkpoint_000003")
    (tmp / "out" / "t" / "checkpoint_000003" / "train_state_rank0.json").unlink()


def glob_named(tmp: Path) -> None:
    """`chats[1].jsonl` is a file of its own; read as a glob it would be `chats1.jsonl`."""
    write(tmp / "chats[1].jsonl", ["{not json"])
    write(tmp / "chats1.jsonl", GOOD)


def json_lines_named_parquet(tmp: Path) -> None:
    write(tmp / "x.parquet", GOOD[:3])


def parquet_named_jsonl(tmp: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp / "x.jsonl")


def gzipped_jsonl(tmp: Path) -> None:
    import gzip

    with gzip.open(tmp / "x.jsonl", "wt") as f:
        f.write("\n".join(GOOD) + "\n")


def parquet_rows(rows: list) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if rows and "messages" in rows[0]:
            pq.write_table(pa.table({"messages": [r["messages"] for r in rows]}), tmp / "bad.parquet")
        else:
            pq.write_table(pa.table({"text": [r.get("text", "") for r in rows]}), tmp / "bad.parquet")
    return make


def model_copy(edit: Callable[[dict], Optional[dict]]) -> Callable[[Path], None]:
    """The tiny Llama's folder copied to <tmp>/model-copy, its config.json edited (or written as given)."""
    def make(tmp: Path) -> None:
        from chatsft.builtin import resolve

        shutil.copytree(resolve("builtin:tiny-llama"), tmp / "model-copy")
        conf_path = tmp / "model-copy" / "config.json"
        conf = json.loads(conf_path.read_text())
        edited = edit(conf)
        conf_path.write_text(json.dumps(edited) if edited is not None else "{not json")
    return make


def without(key: str) -> Callable[[dict], dict]:
    return lambda conf: {k: v for k, v in conf.items() if k != key}


def refusing_endpoint(tmp: Path) -> dict:
    """An S3 endpoint nothing listens on (connection refused), with credentials."""
    return {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
            "AWS_EC2_METADATA_DISABLED": "true"}


def silent_endpoint(tmp: Path) -> dict:
    """An S3 endpoint that takes connections and never answers (a firewall, a hung server)."""
    import socket
    import threading

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held = []

    def accept() -> None:
        while True:
            held.append(sock.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    return dict(refusing_endpoint(tmp), AWS_ENDPOINT_URL=f"http://127.0.0.1:{sock.getsockname()[1]}")


BAD = "data.train={tmp}/bad.jsonl"
TINY_RUN = "{tmp}/run.yaml"  # the base run's config as a file (export reads run.output_dir and run.name from it)
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
    Case("fp16 without deepspeed", ["train.precision=fp16", "train.engine=ddp"],
         "train.precision=fp16: needs train.engine=deepspeed"),
    Case("the retired deepspeed switch", ["train.deepspeed.enabled=false"],
         "train.deepspeed.enabled: replaced by train.engine"),
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
    # ============================================ issue 26: nothing a user has is ever lost
    # ----------------------------------------------------------- export: where it may write
    Case("export into a user's folder", [TINY_RUN, "--out", "{tmp}/mine"],
         "--out {tmp}/mine: the folder is not empty and is not a chatsft export", verb="export", base=False,
         setup=mine),
    Case("export into a user's folder offers --force", [TINY_RUN, "--out", "{tmp}/mine"], "add --force",
         verb="export", base=False, setup=mine),
    Case("export into the run's folder", [TINY_RUN, "--out", "{tmp}/out"],
         "--out {tmp}/out: it is the run's output folder", verb="export", base=False),
    Case("export into the run's folder, forced", [TINY_RUN, "--out", "{tmp}/out", "--force"],
         "--out {tmp}/out: it is the run's output folder", verb="export", base=False),
    Case("export into the run's parent", [TINY_RUN, "--out", "{tmp}", "--force"],
         "--out {tmp}: it holds the run's output folder", verb="export", base=False),
    Case("export into the working folder", [TINY_RUN, "--out", ".", "--force"],
         "--out .: it is the working folder", verb="export", base=False, setup=workdir, cwd="work"),
    Case("export into the checkpoints", [TINY_RUN, "--out", "{tmp}/out/t"],
         "--out {tmp}/out/t: it is the run's checkpoint folder", verb="export", base=False),
    Case("export into a checkpoint", [TINY_RUN, "--out", CKPT, "--force"],
         "it is inside the run's checkpoint folder", verb="export", base=False),
    Case("export into the prepared rows", [TINY_RUN, "--out", "{tmp}/out/data"],
         "--out {tmp}/out/data: it is the run's prepared rows", verb="export", base=False),
    Case("export onto a file", [TINY_RUN, "--out", "{tmp}/afile"], "--out {tmp}/afile: is a file", verb="export",
         base=False, setup=file_as_output),
    Case("export over an export of another kind", [TINY_RUN, "--out", "{tmp}/prev"],
         "--out {tmp}/prev: holds a previous export of another kind (adapter", verb="export", base=False,
         setup=export_of("adapter")),
    Case("export of an adapter from a full run", [TINY_RUN, "--adapter-only"],
         "--adapter-only: method.name=full trains every weight", verb="export", base=False),
    # ------------------------------------------------------- checkpoints: whole ones only
    Case("export of a corrupt checkpoint", [TINY_RUN, "--checkpoint", CKPT],
         "checkpoint_000002: corrupt: state/mp_rank_00_model_states.pt is not a readable torch file",
         verb="export", base=False, setup=corrupt_checkpoint),
    Case("export of a partial checkpoint", [TINY_RUN, "--checkpoint", CKPT],
         "checkpoint_000002: partial: no train_state_rank0.json", verb="export", base=False,
         setup=partial_checkpoint),
    Case("export when the only checkpoint is partial", [TINY_RUN], "no checkpoint of run 't' found",
         verb="export", base=False, setup=partial_checkpoint, says="skipping {tmp}/out/t/checkpoint_000002: partial"),
    Case("resume past a partial newer checkpoint", ["data.template=llama3"],
         "its checkpoint checkpoint_000002 is of another run", setup=newer_partial,
         says="skipping {tmp}/out/t/checkpoint_000003: partial"),
    Case("resume with another seed", ["run.seed=1"], "run.seed 0 -> 1"),
    Case("resume with another data file", ["data.train={tmp}/other.jsonl"], "data.train",
         setup=lambda tmp: write(tmp / "other.jsonl", GOOD[:20])),
    Case("an output folder whose data/ is the user's", ["run.output_dir={tmp}/proj",
                                                        "data.train={tmp}/proj/data/train/chats.jsonl"],
         "run.output_dir={tmp}/proj: {tmp}/proj/data/train holds files chatsft did not write (chats.jsonl)",
         setup=lambda tmp: write(tmp / "proj" / "data" / "train" / "chats.jsonl", GOOD)),
    # --------------------------------------------------------------------- data paths
    Case("a literal name with glob characters", ["data.train={tmp}/chats[1].jsonl"],
         "{tmp}/chats[1].jsonl:1: invalid_json", setup=glob_named),
    Case("a relative path is the working folder's", ["data.train=missing.jsonl"],
         "data.train[0].path: no JSONL or Parquet file matches '{tmp}/work/missing.jsonl'", setup=workdir, cwd="work"),
    Case("JSON lines named .parquet", ["data.train={tmp}/x.parquet"],
         "data.train[0].path: {tmp}/x.parquet is read as Parquet but holds JSON lines", setup=json_lines_named_parquet),
    Case("Parquet named .jsonl", ["data.train={tmp}/x.jsonl"],
         "data.train[0].path: {tmp}/x.jsonl is read as JSON lines but is a Parquet file", setup=parquet_named_jsonl),
    Case("gzip-compressed JSON lines", ["data.train={tmp}/x.jsonl"], "{tmp}/x.jsonl is read as JSON lines but is "
         "gzip-compressed", setup=gzipped_jsonl),
    Case("a declared format that is not the file's", ["data.train=[{path: '{tmp}/good.jsonl', format: parquet}]"],
         "data.train[0].path: {tmp}/good.jsonl is read as Parquet but holds JSON lines; name it .jsonl or set "
         "data.train[0].format: jsonl"),
    Case("an extension no format has", ["data.train={tmp}/chats.txt"], "data.train[0].path: '{tmp}/chats.txt' "
         "has extension .txt", setup=lambda tmp: write(tmp / "chats.txt", GOOD)),
    Case("eval file in another format", ["data.eval={tmp}/x.parquet"], "data.eval[0].path: {tmp}/x.parquet is "
         "read as Parquet", setup=json_lines_named_parquet),
    Case("empty eval file", ["data.eval={tmp}/empty.jsonl"], "data.eval: {tmp}/empty.jsonl is empty",
         setup=lambda tmp: write(tmp / "empty.jsonl", [])),
    Case("a folder without data files", ["data.train={tmp}/notes"], "data.train[0].path: no JSONL or Parquet "
         "file matches", setup=lambda tmp: write(tmp / "notes" / "readme.md", ["hello"])),
    Case("no sources at all", ["data.train=[]"], "data.train: at least one source is required"),
    Case("a bad Parquet row", ["data.train={tmp}/bad.parquet"], "{tmp}/bad.parquet:2: no_assistant",
         setup=parquet_rows([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                             {"messages": [{"role": "user", "content": "hi"}]}])),
    Case("Parquet without a messages column", ["data.train={tmp}/bad.parquet"], "{tmp}/bad.parquet:1: "
         "missing_messages", setup=parquet_rows([{"text": "hello"}])),
    # ----------------------------------------------------------------- object storage
    Case("data in a bucket whose endpoint refuses", ["data.train=s3://bucket/chats.jsonl"],
         "data.train[0].path=s3://bucket/chats.jsonl: the object store cannot be read", setup=refusing_endpoint,
         within=40),
    Case("output in a bucket whose endpoint refuses", ["run.output_dir=s3://bucket/run"],
         "run.output_dir=s3://bucket/run: the object store cannot be read", setup=refusing_endpoint, within=40),
    Case("a bucket whose endpoint never answers", ["run.output_dir=s3://bucket/run"],
         "run.output_dir=s3://bucket/run: the object store did not answer within 15 s", setup=silent_endpoint,
         within=40),
    # -------------------------------------------------------- the model, from its config
    Case("a model folder without model_type", ["model.name_or_path={tmp}/model-copy"],
         'its config.json names no model_type, which transformers needs to build the model (model.kind does not '
         'replace it); add it to {tmp}/model-copy/config.json ("model_type": "llama"',
         setup=model_copy(without("model_type"))),
    Case("model.kind does not replace model_type", ["model.name_or_path={tmp}/model-copy", "model.kind=causal"],
         "its config.json names no model_type", setup=model_copy(without("model_type"))),
    Case("a model config that is not JSON", ["model.name_or_path={tmp}/model-copy"],
         "model.name_or_path={tmp}/model-copy: {tmp}/model-copy/config.json is not valid JSON",
         setup=model_copy(lambda conf: None)),
    Case("max_length beyond the positions", ["data.max_length=4096"],
         "data.max_length=4096: the model builtin:tiny-llama has 1024 positions (max_position_embeddings"),
    Case("a LoRA target that is no module", ["method.name=lora", "method.lora.target_modules=[q_proj, qkv]"],
         "method.lora.target_modules: 'qkv' is no module of builtin:tiny-llama; its layers LoRA can adapt are "
         "named down_proj"),
    Case("a LoRA target that is no layer", ["method.name=lora", "method.lora.target_modules=[mlp]"],
         "method.lora.target_modules: 'mlp' is a LlamaMLP, not a layer LoRA can adapt"),
    # ------------------------------------------------------------------- the config
    Case("an empty config file", ["{tmp}/empty.yaml", "--local"], "{tmp}/empty.yaml: the config file is empty",
         base=False, setup=lambda tmp: (tmp / "empty.yaml").write_text("")),
    Case("a config of comments only", ["{tmp}/c.yaml"], "{tmp}/c.yaml: the config file is empty", base=False,
         setup=lambda tmp: (tmp / "c.yaml").write_text("# run:\n#   name: x\n")),
    Case("eval fraction of everything", ["data.eval_fraction=1.0"], "data.eval_fraction: must be in [0, 1)"),
    Case("min workers above workers", ["scaling.min_workers=3"], "scaling.min_workers: must be between 0 and "
         "num_workers (2)"),
    Case("elastic sizes that cannot share a step", [TINY, "run.output_dir={tmp}/out", "run.name=t",
                                                    "scaling.num_workers=3", "scaling.min_workers=2",
                                                    "train.micro_batch_size=4", "tracking.enabled=false"],
         "scaling.min_workers=2: with 2 workers the 12 rows per step", base=False),
    Case("compile under ZeRO-3", ["train.compile=layers", "train.deepspeed.stage=3"],
         "train.compile=layers: not with ZeRO-3"),
    Case("a CUDA loss kernel on CPU", ["train.loss_head=liger"], "train.loss_head=liger: a CUDA kernel"),
    Case("a uniform sweep without bounds", [TINY, "run.output_dir={tmp}/sweep", "train.eval_every=5",
                                            "sweep.space={train.lr: {type: uniform, low: 1e-3}}"],
         "sweep.space.train.lr: uniform needs low < high", verb="sweep", base=False),
    Case("--local says its batch before a refusal", [BAD, "run.output_dir={tmp}/fresh"], "{tmp}/bad.jsonl:1: "
         "invalid_json", setup=bad_file("{oops"),
         says="--local trains 1 worker: 16 rows per optimizer step (train.micro_batch_size 16 x train.grad_accum 1), "
              "not the 32 of the config's scaling.num_workers=2; set train.grad_accum=2"),
    # -------------------------------------------------------------- the other verbs
    Case("template of no records", [TINY, "data.train={tmp}/blank.jsonl"], "data.train: {tmp}/blank.jsonl hold no "
         "records", verb="template", base=False, setup=lambda tmp: (tmp / "blank.jsonl").write_text("\n  \n\n")),
    Case("template of a missing file", [TINY, "data.train={tmp}/nope.jsonl"],
         "data.train[0].path: no JSONL or Parquet file matches", verb="template", base=False),
    Case("inspect of a missing file", [TINY, "data.train={tmp}/nope.jsonl"], "{tmp}/nope.jsonl: file not found",
         verb="inspect", base=False),
    Case("eval of a missing task file", [TINY, "eval.tasks=[chat:{tmp}/nope.jsonl]"], "no such file "
         "{tmp}/nope.jsonl", verb="eval", base=False),
    Case("keys with two prefixes", ["train", "data"], "one prefix at a time", verb="keys", base=False),
]


@pytest.fixture
def world(tmp_path):
    """A previous run of the base config in <tmp>/out: rows, a checkpoint with its manifest, a model."""
    from chatsft.pipeline.run import check_prepare
    from chatsft.plan import RunPlan
    from chatsft.train.resume import MANIFEST, manifest

    write(tmp_path / "good.jsonl", GOOD)
    cfg = load_config(TINY, [a for a in base_args(tmp_path) if "=" in a])
    (tmp_path / "run.yaml").write_text(cfg.to_yaml())
    plan = RunPlan.resolve(cfg, local=True)
    out = tmp_path / "out"
    ckpt = out / "t" / "checkpoint_000002"
    ckpt.mkdir(parents=True)
    (ckpt / MANIFEST).write_text(json.dumps(manifest(plan, check_prepare(plan).identity)))
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
def test_a_mistake_ends_in_one_line_and_loses_nothing(case, world, capsys, monkeypatch):
    tmp = world
    env = case.setup(tmp) if case.setup else None
    for key, value in (env if isinstance(env, dict) else {}).items():
        monkeypatch.setenv(key, value)
    if case.cwd:
        monkeypatch.chdir(tmp / case.cwd)
    args = [a.replace("{tmp}", str(tmp)) for a in case.args]
    if case.base:
        args = base_args(tmp) + args
    before = snapshot(tmp)
    capsys.readouterr()
    started = time.perf_counter()
    if case.marks:  # these start Ray: run them as a user does, in a process of their own
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PYTHONPATH"] = str(REPO / "platform")
        proc = subprocess.run([sys.executable, "-m", "chatsft.cli", case.verb, *args], capture_output=True,
                              text=True, timeout=600, env=env, cwd=tmp)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        rc = main([case.verb, *args])
        out, err = capsys.readouterr()
    seconds = time.perf_counter() - started
    assert rc == 2, (out[-2000:], err[-2000:])
    assert seconds < case.within, f"{case.name}: refused after {seconds:.1f} s"
    if case.says:
        assert case.says.replace("{tmp}", str(tmp)) in out, out[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    errors = [line for line in err.splitlines() if ": error: " in line]
    expect = case.expect.replace("{tmp}", str(tmp))
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err[-2000:]
    assert errors[0].startswith(f"chatsft {case.verb}: error: ") and expect in errors[0], errors[0]
    after = snapshot(tmp)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"{case.name} lost or overwrote {changed}"


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 95 and len({c.name for c in CASES}) == len(CASES)
