"""Does the tiny model learn the sample task, and how fast? A plain torch loop, no Ray, no DeepSpeed.

Trains a tiny Llama full-parameter with AdamW (token-weighted loss over the
supervised tokens, cosine schedule with warmup) on rendered sample dialogues, and
measures generative pass@1 (greedy, exact match on the final answer) on the
held-out split with chatsft's own evaluation code, before and after, with
points of the learning curve in between. It is the yardstick for configs/tiny.yaml:
the real `make run` adds Ray, DeepSpeed and two workers on top of the same loss.

    python benchmarks/learnability.py                          # the embedded default, 360 steps of 32
    python benchmarks/learnability.py --seconds 150 --eval-every 30   # on the clock, with a curve
    python benchmarks/learnability.py --train my.jsonl --heldout my_eval.jsonl --layers 2 --hidden 256

With --seconds the schedule runs on the clock (evaluation pauses excluded), so
runs of different speeds compare at equal training time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

SAMPLES_TRAIN, SAMPLES_HELDOUT = "chatsft://samples/train.jsonl", "chatsft://samples/heldout.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", default=SAMPLES_TRAIN)
    p.add_argument("--heldout", default=SAMPLES_HELDOUT)
    p.add_argument("--steps", type=int, default=360, help="optimizer steps (0: train on the clock, see --seconds)")
    p.add_argument("--seconds", type=float, default=0.0, help="training time budget; replaces --steps")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=float, default=0.05, help="warmup fraction")
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (train.betas[1])")
    p.add_argument("--organization", default="session", choices=["session", "split_turn"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=float, default=0.0, help="seconds (steps without --seconds) between curve points")
    p.add_argument("--eval-examples", type=int, default=100, help="held-out dialogues for curve points")
    p.add_argument("--final-examples", type=int, default=300, help="held-out dialogues for before/after")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--layers", type=int, default=0, help="with any size option: a fresh Llama of that size")
    p.add_argument("--hidden", type=int, default=0)
    p.add_argument("--heads", type=int, default=0)
    p.add_argument("--intermediate", type=int, default=0)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--show-errors", type=int, default=0, help="print this many wrong answers at the end")
    p.add_argument("--save", default=None, help="save the trained model and tokenizer here (for chatsft eval)")
    return p.parse_args(argv)


def build_model(args, workdir: str):
    """builtin:tiny-llama, or a tokenizer trained on --train and a Llama of the given size."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from chatsft.builtin import build_tokenizer, resolve
    from chatsft.sources import read_local

    custom = args.layers or args.hidden or args.heads or args.intermediate or \
        args.train != SAMPLES_TRAIN or args.vocab != 1024
    if not custom:
        path = resolve("builtin:tiny-llama")
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    import torch

    texts = [m.text for c in read_local(args.train) for m in c.messages]
    tok = build_tokenizer(Path(workdir), texts=texts, vocab_size=args.vocab)
    hidden = args.hidden or 128
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=args.intermediate or 3 * hidden,
        num_hidden_layers=args.layers or 4, num_attention_heads=args.heads or 4,
        num_key_value_heads=args.heads or 4, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tok


def render_samples(path: str, tokenizer, organization: str = "session"):
    from chatsft.data.render import RenderOptions, render_batch
    from chatsft.sources import read_local
    from chatsft.data.templates import get_template

    template = get_template("chatml", tokenizer)
    convs = list(read_local(path))
    return [s for r in render_batch(convs, tokenizer, template, RenderOptions(organization=organization))
            for s in r.samples]


def heldout_loss(model, tokenizer, path: str, organization: str = "session") -> float:
    """eval_loss over the held-out dialogues, by chatsft's own definition (chatsft.eval.loss)."""
    import numpy as np

    from chatsft.data.schema import Row
    from chatsft.eval.loss import loss_sums
    from chatsft.model.kind import CAUSAL
    from chatsft.model.loss import full_loss

    rows = [Row(s.input_ids.astype(np.int64), s.labels.astype(np.int64))
            for s in render_samples(path, tokenizer, organization)]
    was = model.training
    model.eval()
    total, count = loss_sums(lambda inputs: model(**inputs), rows, loss=full_loss, micro_batch=32,
                             collate=CAUSAL.batcher(tokenizer.pad_token_id), device=model.device)
    model.train(was)
    return total / count


def train_plain(model, tokenizer, samples, *, lr: float, batch: int, steps: int = 0, seconds: float = 0.0,
                warmup: float = 0.05, min_lr_frac: float = 0.1, beta2: float = 0.95, seed: int = 0,
                eval_every: float = 0.0,
                on_point: Optional[Callable[[int, float, float], None]] = None) -> dict:
    """AdamW on the token-weighted loss (sum over supervised tokens / their count), cosine with warmup.

    Runs `steps` optimizer steps, or for `seconds` of training time when steps is 0;
    `on_point(step, seconds, loss)` is called every `eval_every` steps (or seconds)
    with the clock stopped.
    """
    import torch

    from chatsft.model.loss import causal_targets, token_loss

    if not steps and not seconds:
        raise ValueError("give steps or seconds")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, beta2), weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    pad = tokenizer.pad_token_id

    def lr_at(frac: float) -> float:
        if frac < warmup:
            return lr * (frac / warmup + 1e-3)
        p = min(1.0, (frac - warmup) / max(1e-9, 1 - warmup))
        return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    trained, step, next_point, tokens, loss = 0.0, 0, eval_every, 0, torch.tensor(float("nan"))
    cpu0 = time.process_time()
    model.train()
    while True:
        frac = step / steps if steps else trained / seconds
        if frac >= 1.0:
            break
        t0 = time.time()
        if len(order) < batch:
            idx = list(range(len(samples)))
            rng.shuffle(idx)
            order += idx
        rows = [samples[i] for i in order[:batch]]
        del order[:batch]
        width = max(len(s) for s in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, s in enumerate(rows):
            ids[i, : len(s)] = torch.as_tensor(s.input_ids)
            labels[i, : len(s)] = torch.as_tensor(s.labels)
            mask[i, : len(s)] = 1
        tokens += int(mask.sum())
        total, count = token_loss(model(input_ids=ids, attention_mask=mask).logits, causal_targets(labels))
        loss = total / max(1, count)
        for g in opt.param_groups:
            g["lr"] = lr_at(frac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        trained += time.time() - t0
        clock = trained if seconds and not steps else step
        if eval_every and on_point is not None and clock >= next_point:
            next_point += eval_every
            on_point(step, trained, loss.item())
            model.train()
    model.eval()
    return {"steps": step, "train_seconds": round(trained, 1), "cpu_seconds": round(time.process_time() - cpu0, 1),
            "sec_per_step": round(trained / max(1, step), 3), "tokens": tokens, "loss": round(loss.item(), 4)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from chatsft.config import load_config
    from chatsft.eval.evaluate import evaluate_model
    from chatsft.eval.tasks import generative_task

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = build_model(args, tempfile.mkdtemp(prefix="learnability-"))
    samples = render_samples(args.train, tok, args.organization)
    cfg = load_config(None, [f"data.eval={args.heldout}", "eval.batch_size=32",
                             f"eval.max_new_tokens={args.max_new_tokens}", "train.micro_batch_size=32"])
    task = generative_task("heldout", [args.heldout])
    runs: list = []

    def measure(n: int) -> dict:
        cfg.eval.max_examples = n
        t = time.time()
        runs.clear()
        m = evaluate_model(model, tok, cfg, [task], runs=runs)
        if n == args.final_examples:
            m["eval_loss"] = heldout_loss(model, tok, args.heldout)
        return {**m, "eval_seconds": round(time.time() - t, 1)}

    head = {"tag": args.tag, "params": sum(p.numel() for p in model.parameters()), "samples": len(samples),
            "lr": args.lr, "batch": args.batch, "organization": args.organization, "threads": args.threads}
    print(json.dumps(head), flush=True)
    before = measure(args.final_examples)
    print(json.dumps({"tag": args.tag, "point": "before", **before}), flush=True)

    def point(step: int, seconds: float, loss: float) -> None:
        print(json.dumps({"tag": args.tag, "step": step, "train_seconds": round(seconds, 1), "loss": round(loss, 4),
                          **measure(args.eval_examples)}), flush=True)

    stats = train_plain(model, tok, samples, lr=args.lr, batch=args.batch,
                        steps=0 if args.seconds else args.steps, seconds=args.seconds, warmup=args.warmup,
                        min_lr_frac=args.min_lr_frac, beta2=args.beta2, seed=args.seed,
                        eval_every=args.eval_every, on_point=point)
    if args.save:
        model.save_pretrained(args.save)
        tok.save_pretrained(args.save)
    after = measure(args.final_examples)
    summary = {"tag": args.tag, "point": "after", **stats, "before_pass@1": before["heldout/pass_at_1"], **after}
    print(json.dumps(summary), flush=True)
    wrong = [(ex, out[0]) for ex, out, sc in zip(runs[0].examples, runs[0].outputs, runs[0].scores) if sc[0] < 0.5]
    for ex, out in wrong[: args.show_errors]:
        print(f"wrong {ex.source}: asked {ex.messages[-1].text!r} want {ex.reference!r} got {out!r}")
    print(f"held-out pass@1: before {before['heldout/pass_at_1']:.3f}, after {after['heldout/pass_at_1']:.3f} "
          f"({stats['steps']} steps of {args.batch}, lr {args.lr}, {stats['train_seconds']} s training, "
          f"{args.threads} threads)")
    return summary


if __name__ == "__main__":
    main()
