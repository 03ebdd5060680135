"""chatsft's --local loop against TRL's SFTTrainer on this CPU, side by side (never part of the tests).

Both sides train the same model from the same weights on the same conversations (the
package's sample data, ChatML, assistant-only loss), with the same max length, rows
per optimizer step, AdamW settings (each side's default kernel: fused on both, TRL's
`adamw_torch_fused` and chatsft's train.fused_optimizer), cosine schedule, clipping,
fp32 and threads, no gradient checkpointing (TRL's default is on; chatsft's off);
packing on both (chatsft's best-fit-decreasing rows, fed to TRL pre-tokenized with
their sequence lengths for its padding-free collator) or padding on both (TRL renders
and tokenizes the conversations itself). Both see the same batches in the same order:
TRL's training set is chatsft's rows in chatsft's step order (`chatsft_order`), read
sequentially (train_sampling_strategy="sequential"), so per-step train losses agree;
with TRL's own random sampler the eval loss after a few steps differed by ~2-3% from
the order alone. Each run is a subprocess of its own (peak RSS is its
ru_maxrss); runs alternate (chatsft, TRL, then TRL, chatsft, ...) and the figures are
medians over the pairs, the ratios medians of per-pair ratios.

Models: `tiny` is builtin:tiny-llama (vocab 761); `qwen` is a Qwen2.5-0.5B-shaped
Qwen2 with 2 layers (hidden 896, 14 heads / 2 KV heads, MLP 4864, tied embeddings)
and the full 151,936-token vocabulary, built here with seeded weights; it reuses the
tiny tokenizer (ids < 761 occur, but every step still scores all 151,936 classes).

Measured per run: learned tokens/s (supervised tokens of the timed steps over their
time; a step's time is from the end of the previous step to the end of this one, the
first step excluded), mean step time, peak RSS, the last step's train loss, and the
eval loss of the trained model over the held-out conversations, computed the same way
for both (chatsft.eval.loss: summed token losses / supervised tokens). On the qwen
model chatsft also runs with train.loss_head=full: its RSS before the learned head.

    PYTHONPATH=platform python benchmarks/peers.py [--models tiny,qwen] [--pairs 2]
    PYTHONPATH=platform python benchmarks/peers.py --check 5     # the learned tokens agree

Needs the `bench` extra (trl); TRL is imported only by this file's child processes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(ROOT, "platform"))
os.environ.setdefault("CHATSFT_CACHE", os.path.join(ROOT, ".cache", "chatsft"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# TRL's assistant-only loss needs {% generation %} markers; the span is what chatsft's chatml
# learns (the answer and its <|im_end|>), checked token for token by --check.
CHATML_GENERATION = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TRAIN = "chatsft://samples/train.jsonl"
HELDOUT = "chatsft://samples/heldout.jsonl"
WARM = 1  # steps not timed (the first allocates and warms up)


# ------------------------------------------------------------------------ shared setup


# Qwen2.5-0.5B's shape: hidden 896, 14 heads / 2 KV heads, MLP 4864, tied embeddings and the full
# 151,936-token vocabulary (benchmarks/gpu.py builds all 24 layers, this file 2).
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                num_key_value_heads=2, tie_word_embeddings=True)


def model_dir(name: str, cache: str) -> str:
    from chatsft.builtin import resolve

    if name == "tiny":
        return resolve("builtin:tiny-llama")
    return qwen_shaped(os.path.join(cache, "qwen2-shaped-2l-151936"), layers=2, max_positions=1024)


def qwen_shaped(out: str, *, layers: int, max_positions: int, dtype=None, **shape) -> str:
    """A Qwen2 of QWEN_05B's shape (`shape` overrides it) with `layers` layers and seeded weights,
    saved in `dtype` (default fp32) with the tiny tokenizer (ids < 761 occur, but every step
    still scores the whole vocabulary); built once into `out`."""
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from chatsft.builtin import resolve

    tok = AutoTokenizer.from_pretrained(resolve("builtin:tiny-llama"))
    config = Qwen2Config(**{**QWEN_05B, **shape}, num_hidden_layers=layers, max_position_embeddings=max_positions,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    tmp = out + ".tmp"
    model = Qwen2ForCausalLM(config)
    (model if dtype is None else model.to(dtype)).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def samples(path: str, tokenizer, limit=None):
    from chatsft.data.render import render_conversation
    from chatsft.sources import read_local

    return [s for conv in read_local(path, limit=limit)
            for s in render_conversation(conv, tokenizer, "chatml").samples]


def write_rows(path: str, tokenizer, out: str, *, packed: bool, capacity: int, seed: int = 0,
               limit=None) -> int:
    """chatsft's training rows (what `prepare` writes), from the same pure functions: render,
    a seeded shuffle, best-fit-decreasing packing."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chatsft.data.packing import pack_in_windows

    got = samples(path, tokenizer, limit)
    got = [got[i] for i in np.random.default_rng(seed).permutation(len(got))]
    bins = pack_in_windows([len(s.input_ids) for s in got], capacity, 8192) if packed else [[i] for i in
                                                                                               range(len(got))]
    cols: dict[str, list] = {"input_ids": [], "labels": [], "source": []}
    if packed:
        cols["position_ids"] = []
    for b in bins:
        cols["input_ids"].append(np.concatenate([got[i].input_ids for i in b]).astype(np.int32))
        cols["labels"].append(np.concatenate([got[i].labels for i in b]).astype(np.int32))
        cols["source"].append([got[i].source for i in b])
        if packed:
            cols["position_ids"].append(np.concatenate([np.arange(len(got[i].input_ids)) for i in b]).astype(np.int32))
    os.makedirs(out, exist_ok=True)
    table = pa.table({k: pa.array([list(map(int, v)) for v in vals], type=pa.list_(pa.int32())) if k != "source"
                      else pa.array(vals, type=pa.list_(pa.string())) for k, vals in cols.items()})
    pq.write_table(table, os.path.join(out, "part-00000.parquet"))
    return table.num_rows


def chatsft_order(train_dir: str, rows: int, steps: int, seed: int = 0) -> list[int]:
    """The stored row numbers chatsft's loop trains on, step after step (`rows` per step, one
    worker): chatsft.data.order's lanes over the epoch order of `seed` (train/data.py
    worker_steps), so the other side can be fed the very same batches in the same order."""
    from chatsft.data.order import EpochOrder, lane_bounds
    from chatsft.train.data import RowIndex

    index = RowIndex.build(train_dir)
    out: list[int] = []
    epoch = 0
    while len(out) < steps * rows:
        order = EpochOrder(index.sizes, seed, epoch)
        stored = order.stored_rows(index.chunk_starts)
        b = lane_bounds(order.rows, rows)
        for k in range(int(b[1] - b[0])):
            if any(b[lane] + k >= b[lane + 1] for lane in range(rows)):
                break  # the epoch's last, partly empty step: not reproduced on the other side
            out.extend(int(stored[b[lane] + k]) for lane in range(rows))
        epoch += 1
    return out[:steps * rows]


def trl_rows(a: dict):
    """TRL's training set: chatsft's rows in chatsft's step order. Padded: the conversations
    themselves (TRL renders and tokenizes them; --check shows it gets the same tokens).
    Packed: chatsft's packed rows, pre-tokenized (input_ids, labels, seq_lengths for TRL's
    padding-free collator), since TRL's own BFD would bin (and order) them differently."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    from chatsft.sources import read_local

    table = pq.read_table(os.path.join(a["train_dir"], "part-00000.parquet")).to_pydict()
    order = chatsft_order(a["train_dir"], a["rows"], a["steps"])
    if not a["packed"]:
        convs = {conv.source: conv for conv in read_local(TRAIN)}
        picked = [convs[table["source"][i][0]] for i in order]
        return Dataset.from_list([{"messages": [{"role": m.role, "content": m.content} for m in conv.messages]}
                                  for conv in picked])

    def lengths(pos: list[int]) -> list[int]:
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        return [e - s for s, e in zip(starts, starts[1:])]

    return Dataset.from_list([{"input_ids": table["input_ids"][i], "labels": table["labels"][i],
                               "seq_lengths": lengths(table["position_ids"][i])} for i in order])


def eval_loss(model, eval_dir: str, pad_id: int) -> float:
    """The held-out loss by chatsft's definition, the same for both sides."""
    import torch

    from chatsft.data.schema import iter_rows
    from chatsft.eval.loss import loss_sums
    from chatsft.model.kind import CAUSAL
    from chatsft.model.loss import loss_function
    from chatsft.train.data import file_batches

    loss, _ = loss_function(model, "learned")
    model.eval()
    with torch.no_grad():
        total, count = loss_sums(lambda inputs: model(**inputs, use_cache=False),
                                 iter_rows(file_batches(eval_dir)()), loss=loss, micro_batch=16,
                                 collate=CAUSAL.batcher(pad_id))
    return total / count


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def summarize(ends: list[float], learned: list[int], warm: int = WARM) -> dict:
    """Step ends (from the first step's) and learned tokens per step -> time and learned tokens/s
    of the steps after the first `warm` + 1 (a step's time runs from the previous step's end)."""
    times = [b - a for a, b in zip(ends[warm:], ends[warm + 1:])]
    tokens = learned[warm + 1:len(ends)]
    return {"step_time": sum(times) / len(times), "learned_tok_s": sum(tokens) / sum(times),
            "learned_per_step": sum(tokens) / len(tokens)}


# --------------------------------------------------------------------------- children


def child_chatsft(a: dict) -> dict:
    import torch

    from chatsft.config import load_config
    from chatsft.plan import RunPlan
    from chatsft.train.driver import Extras, Rows, train_on_rows
    from chatsft.train.data import count_rows

    torch.set_num_threads(a["threads"])
    cfg = load_config(None, [
        f"run.output_dir={a['out']}", "run.name=bench", f"model.name_or_path={a['model']}",
        f"data.max_length={a['max_length']}", f"data.packing={str(a['packed']).lower()}",
        f"train.max_steps={a['steps']}", f"train.micro_batch_size={a['rows']}", "train.grad_accum=1",
        f"train.lr={a['lr']}", "train.betas=[0.9, 0.95]", "train.eps=1e-8", "train.weight_decay=0.0",
        "train.schedule=cosine", "train.warmup_steps=0", "train.min_lr_frac=0.0", "train.clip_grad=1.0",
        "train.precision=fp32", "train.engine=ddp", "train.log_every=1", "train.eval_every=0",
        "train.save_every=0", f"train.threads={a['threads']}", f"train.loss_head={a['head']}",
        "scaling.num_workers=1", "tracking.enabled=false", "eval.tasks=[]", "run.seed=0"])
    ends: list[float] = []
    learned: list[int] = []
    losses: list[float] = []

    def callback(step, m):
        if "supervised_tokens" in m:
            learned.append(int(m["supervised_tokens"]))
            losses.append(m.get("train_loss", float("nan")))

    rows = Rows(a["train_dir"], a["eval_dir"], count_rows(a["train_dir"]), count_rows(a["eval_dir"]))
    result = train_on_rows(RunPlan.resolve(cfg, local=True), rows,
                           Extras(export=False, tasks=[], callbacks=[callback],
                                  hooks=[lambda step, rt: ends.append(time.perf_counter())]))
    return {**summarize(ends, learned), "peak_mb": peak_mb(), "train_loss": losses[-1],
            "eval_loss": result.metrics["eval_loss"], "steps": len(ends),
            "optim": f"AdamW fused={cfg.train.fused_optimizer}", "losses": losses}


def trl_trainer(a: dict, model_kwargs: Optional[dict] = None, **settings):
    """TRL's SFTTrainer set up as the module docstring says, on `a` (model, rows, steps, lr, ...);
    `settings` replace SFTConfig fields and `model_kwargs` from_pretrained's (benchmarks/gpu.py: bf16
    on CUDA, Liger, an attention kernel). Returns (trainer, clock): clock.ends are the times
    steps end (the device synchronized first), clock.learned the learned tokens of each batch
    the collator made, clock.losses the logged losses; None with a["check"]."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from chatsft.sources import read_local

    tok = AutoTokenizer.from_pretrained(a["model"])
    tok.chat_template = CHATML_GENERATION
    if a.get("check"):
        data = Dataset.from_list([{"messages": [{"role": m.role, "content": m.content} for m in conv.messages]}
                                  for conv in read_local(TRAIN)])
    else:
        data = trl_rows(a)
    model = AutoModelForCausalLM.from_pretrained(a["model"], **{"dtype": torch.float32, **(model_kwargs or {})})
    args = SFTConfig(**{**dict(
        output_dir=a["out"], max_steps=a["steps"], per_device_train_batch_size=a["rows"],
        gradient_accumulation_steps=1, learning_rate=a["lr"], lr_scheduler_type="cosine", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        bf16=False, fp16=False, use_cpu=True, seed=0, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        max_length=None if a["packed"] and not a.get("check") else a["max_length"],  # packed: rows fit it
        packing=False, padding_free=a["packed"],
        assistant_only_loss=bool(a.get("check")) or not a["packed"],  # packed rows carry their labels
        # chatsft's order (trl_rows), read as it is; TRL's default of gradient checkpointing
        # (on) set to chatsft's (train.gradient_checkpointing=false)
        train_sampling_strategy="sequential", gradient_checkpointing=False), **settings})
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    if a.get("check"):
        return trainer, None
    collate = trainer.data_collator

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.learned: list[int] = []
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    clock = Clock()

    def counting(features):
        batch = collate(features)
        clock.learned.append(int((batch["labels"] != -100).sum()))
        return batch

    trainer.data_collator = counting
    trainer.train_dataset = trainer.train_dataset  # the dataloader is built at train(): it takes `counting`
    trainer.add_callback(clock)
    return trainer, clock


def child_trl(a: dict) -> dict:
    import torch

    torch.set_num_threads(a["threads"])
    trainer, clock = trl_trainer(a)
    if a.get("check"):
        rows = [trainer.train_dataset[i] for i in range(a["check"])]
        return {"rows": [{"input_ids": r["input_ids"], "mask": [int(x != -100) for x in r["labels"]]} for r in rows]}
    trainer.train()
    peak = peak_mb()  # before the eval below, which is chatsft's code
    ev = eval_loss(trainer.model, a["eval_dir"], trainer.processing_class.pad_token_id)
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return {**summarize(clock.ends, clock.learned), "peak_mb": peak, "train_loss": clock.losses[-1], "eval_loss": ev,
            "steps": len(clock.ends), "optim": f"{trainer.args.optim} fused={opt.defaults.get('fused')}",
            "losses": clock.losses}


def child_rss(a: dict) -> dict:
    """Peak RSS of one optimizer step on the first `rows` rows and nothing else (no eval, no
    checkpoint): chatsft's engine with either head, or TRL's trainer with max_steps=1."""
    import torch

    torch.set_num_threads(a["threads"])
    if a["side"] == "trl":
        a = {**a, "steps": 1}
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer
        from datasets import Dataset

        from chatsft.sources import read_local

        tok = AutoTokenizer.from_pretrained(a["model"])
        tok.chat_template = CHATML_GENERATION
        data = Dataset.from_list([{"messages": [{"role": m.role, "content": m.content} for m in conv.messages]}
                                  for conv in read_local(TRAIN, limit=4 * a["rows"])])
        model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
        args = SFTConfig(output_dir=a["out"], max_steps=1, per_device_train_batch_size=a["rows"],
                         gradient_checkpointing=False,
                         learning_rate=a["lr"], bf16=False, fp16=False, use_cpu=True, save_strategy="no",
                         report_to=[], disable_tqdm=True, max_length=a["max_length"], packing=a["packed"],
                         padding_free=a["packed"], assistant_only_loss=True, logging_steps=1)
        t = time.perf_counter()
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok).train()
        return {"peak_mb": peak_mb(), "seconds": time.perf_counter() - t}
    from chatsft.config import load_config
    from chatsft.data.schema import iter_rows
    from chatsft.model import load_model, load_tokenizer
    from chatsft.model.batch import collate
    from chatsft.model.loss import loss_function
    from chatsft.train.data import file_batches
    from chatsft.train.engines import build_engine
    from chatsft.train.optim import param_groups

    cfg = load_config(None, [f"model.name_or_path={a['model']}", "train.precision=fp32",
                             "train.engine=ddp", f"train.lr={a['lr']}"])
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg, "causal", tokenizer=tok)
    loss, _ = loss_function(model, a["head"])
    engine = build_engine(model, param_groups(model, cfg.train), cfg.train, world_size=1, device=torch.device("cpu"))
    rows = []
    for r in iter_rows(file_batches(a["train_dir"])()):
        rows.append(r)
        if len(rows) == a["rows"]:
            break
    b = collate(rows, pad_id=tok.pad_token_id)
    t = time.perf_counter()
    total, n = loss(engine.forward, b.inputs, b.targets)
    engine.backward(total / n)
    engine.step(1.0)
    return {"peak_mb": peak_mb(), "seconds": time.perf_counter() - t}


# ----------------------------------------------------------------------------- parent


def run_child(side: str, a: dict) -> dict:
    out = tempfile.mkdtemp(prefix=f"peers-{side}-")
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", side, json.dumps({**a, "out": out})],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a["threads"])})
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"{side} run failed")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def check(n: int, cache: str, max_length: int) -> None:
    """TRL's tokens and assistant masks equal chatsft's render on the first n conversations."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir("tiny", cache))
    mine = samples(TRAIN, tok)[:n]
    got = run_child("trl", {"model": model_dir("tiny", cache), "threads": 1, "steps": 1, "rows": 1, "lr": 1e-3,
                            "max_length": max_length, "packed": False, "check": n, "eval_dir": ""})["rows"]
    same = 0
    for s, r in zip(mine, got):
        ids_ok = list(map(int, s.input_ids)) == r["input_ids"]
        mask_ok = [int(x != -100) for x in s.labels] == r["mask"]
        same += ids_ok and mask_ok
        print(f"  {s.source}: {len(r['input_ids'])} tokens, {sum(r['mask'])} learned; ids "
              f"{'equal' if ids_ok else 'DIFFER'}, learned tokens {'equal' if mask_ok else 'DIFFER'}")
    print(f"check: {same}/{n} conversations give identical ids and learned tokens on both sides")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--models", default="tiny,qwen")
    p.add_argument("--modes", default="padded,packed")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--steps", default="tiny=20,qwen=5", help="optimizer steps per run, per model")
    p.add_argument("--eval-convs", type=int, default=64, help="held-out conversations for the eval loss")
    # 16 rows of at most 256 tokens, one micro-batch: the setting on both models. The
    # learned head saves memory in proportion to the logits it never builds: at qwen=8 its peak
    # is 0.76x the full head's, at 16 0.53x (measured side by side, 2026-12-02).
    p.add_argument("--rows", default="tiny=16,qwen=16", help="rows per optimizer step, per model")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--check", type=int, default=0, help="only compare the learned tokens of N conversations")
    p.add_argument("--rss-step", action="store_true",
                   help="only the peak RSS of one optimizer step, per side (chatsft learned, full; TRL)")
    args = p.parse_args()
    if args.child:
        side, a = args.child[0], json.loads(args.child[1])
        out = child_rss(a) if side == "rss" else child_chatsft(a) if side == "chatsft" else child_trl(a)
        print(json.dumps(out))
        return
    cache = os.path.join(os.environ["CHATSFT_CACHE"], "bench")
    if args.check:
        check(args.check, cache, args.max_length)
        return
    steps = dict(kv.split("=") for kv in args.steps.split(","))
    rows_per = dict(kv.split("=") for kv in args.rows.split(","))
    from transformers import AutoTokenizer

    if args.rss_step:
        rss_step(args, cache, rows_per)
        return

    work = tempfile.mkdtemp(prefix="peers-rows-")
    print(f"peers: {args.threads} threads, max length {args.max_length}, lr {args.lr} cosine, AdamW(0.9, 0.95), "
          f"clip 1.0, fp32; {args.pairs} alternating pairs; chatsft --local on the torch engine (no DeepSpeed)")
    print("  both sides train on chatsft's rows in chatsft's order (TRL: sequential sampler), no gradient "
          "checkpointing;\n  peak RSS: chatsft's whole run (eval before and after training, final checkpoint "
          "save; no export), TRL's training only (its eval loss is computed after the peak is read); on the qwen "
          "model chatsft's peak is in the backward of a training step, not in eval or save", flush=True)
    try:
        for name in args.models.split(","):
            folder = model_dir(name, cache)
            tok = AutoTokenizer.from_pretrained(folder)
            for mode in args.modes.split(","):
                packed = mode == "packed"
                train_dir, eval_dir = os.path.join(work, f"{name}-{mode}-train"), os.path.join(work, f"{name}-{mode}-eval")
                if not os.path.exists(train_dir):
                    write_rows(TRAIN, tok, train_dir, packed=packed, capacity=args.max_length)
                    write_rows(HELDOUT, tok, eval_dir, packed=False, capacity=args.max_length,
                               limit=args.eval_convs)
                base = {"model": folder, "threads": args.threads, "steps": int(steps[name]),
                        "rows": int(rows_per[name]), "lr": args.lr, "max_length": args.max_length,
                        "packed": packed, "train_dir": train_dir, "eval_dir": eval_dir}
                # chatsft's own full head (its memory before the learned head): Qwen-shaped, padded
                sides = ["chatsft", "trl"] + (["chatsft-full"] if name == "qwen" and not packed else [])
                runs: dict[str, list[dict]] = {s: [] for s in sides}
                for pair in range(args.pairs):
                    order = sides if pair % 2 == 0 else sides[::-1]
                    for side in order:
                        head = "full" if side == "chatsft-full" else "learned"
                        r = run_child("trl" if side == "trl" else "chatsft", {**base, "head": head})
                        runs[side].append(r)
                        print(f"  [{name} {mode} pair {pair + 1}] {side:12s} {r['learned_tok_s']:8.0f} learned tok/s  "
                              f"step {r['step_time']:.3f}s  peak {r['peak_mb']:.0f} MB  train loss "
                              f"{r['train_loss']:.4f}  eval loss {r['eval_loss']:.4f}  ({r['optim']})", flush=True)
                        print(f"      train loss per step: {' '.join(f'{x:.5f}' for x in r['losses'])}", flush=True)
                report(name, mode, runs, base)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def rss_step(args, cache: str, rows_per: dict) -> None:
    from transformers import AutoTokenizer

    work = tempfile.mkdtemp(prefix="peers-rows-")
    try:
        for name in args.models.split(","):
            folder = model_dir(name, cache)
            write_rows(TRAIN, AutoTokenizer.from_pretrained(folder), work + "/t", packed=False,
                       capacity=args.max_length)
            got = {}
            for side in ("chatsft", "chatsft-full", "trl"):
                got[side] = run_child("rss", {"model": folder, "threads": args.threads, "rows": int(rows_per[name]),
                                              "lr": args.lr, "max_length": args.max_length, "packed": False,
                                              "train_dir": work + "/t", "side": side,
                                              "head": "full" if side == "chatsft-full" else "learned"})
                print(f"  [{name} padded, one step of {rows_per[name]} rows] {side:12s} peak "
                      f"{got[side]['peak_mb']:.0f} MB  ({got[side]['seconds']:.0f} s)", flush=True)
            print(f"{name}: peak RSS learned / full head {got['chatsft']['peak_mb'] / got['chatsft-full']['peak_mb']:.2f}x, "
                  f"chatsft / TRL {got['chatsft']['peak_mb'] / got['trl']['peak_mb']:.2f}x", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(name: str, mode: str, runs: dict, base: dict) -> None:
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("learned_tok_s", "step_time", "peak_mb",
                                                                 "train_loss", "eval_loss", "learned_per_step")}
           for s, rs in runs.items()}
    speed = statistics.median(c["learned_tok_s"] / t["learned_tok_s"] for c, t in zip(runs["chatsft"], runs["trl"]))
    rss = statistics.median(c["peak_mb"] / t["peak_mb"] for c, t in zip(runs["chatsft"], runs["trl"]))
    print(f"{name} {mode} ({base['rows']} rows/step, {base['steps']} steps; medians of {len(runs['trl'])} pairs)")
    print(f"  {'':14s}{'learned tok/s':>14s}{'learned/step':>14s}{'step s':>9s}{'peak MB':>9s}"
          f"{'train loss':>12s}{'eval loss':>11s}")
    for s, m in med.items():
        print(f"  {s:14s}{m['learned_tok_s']:14.0f}{m['learned_per_step']:14.0f}{m['step_time']:9.3f}"
              f"{m['peak_mb']:9.0f}{m['train_loss']:12.4f}{m['eval_loss']:11.4f}")
    line = (f"  chatsft / TRL: learned tokens/s {speed:.2f}x, peak RSS {rss:.2f}x, eval loss "
            f"{med['chatsft']['eval_loss'] / med['trl']['eval_loss'] - 1:+.1%}")
    if "chatsft-full" in runs:
        own = statistics.median(c["peak_mb"] / f["peak_mb"] for c, f in zip(runs["chatsft"], runs["chatsft-full"]))
        line += f"; learned head / full head peak RSS {own:.2f}x"
    print(line, flush=True)


if __name__ == "__main__":
    main()
