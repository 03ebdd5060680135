"""Sample organization: session-level vs split-turn samples, same data, same token budget.

Trains the tiny model twice from the same initial weights on the same sample
dialogues: once with one sample per dialogue (`session`: every answer supervised
in one pass) and once with one sample per answer (`split_turn`: the history
repeated as unsupervised context). Both runs read the same number of input
tokens, so split-turn, which re-reads each history, sees fewer dialogues.
Printed side by side: held-out eval loss, generative pass@1 on the final answer
and on every answer, and the per-turn loss weights each organization gives
(chatsft.data.stats.turn_weights on a few rendered dialogues).

    python benchmarks/organization.py                 # 360 session steps of 32, lr 1e-2, 2 threads
    python benchmarks/organization.py --steps 100     # quicker, less learned

Eval loss is the same quantity for both: in a causal model a token's loss
depends only on what precedes it, and both renderings put the same history
before every answer, so the held-out split is rendered once (session) for both.

Training runs through chatsft.train.driver.train(cfg, local=True) (the real
loop: prepare, DeepSpeed, export; --trainer driver, the default when chatsft.train
is there), or through the plain loop of benchmarks/learnability.py (--trainer
plain) with the same loss and hyperparameters.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "platform"))
sys.path.insert(0, str(HERE))

ORGS = ("session", "split_turn")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", default="chatsft://samples/train.jsonl")
    p.add_argument("--heldout", default="chatsft://samples/heldout.jsonl")
    p.add_argument("--steps", type=int, default=360, help="session steps; split-turn gets the same token budget")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--examples", type=int, default=300, help="held-out dialogues evaluated")
    p.add_argument("--dialogues", type=int, default=3, help="dialogues shown for per-turn weights")
    p.add_argument("--trainer", choices=["auto", "driver", "plain"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def all_answers_task(path: str, dialogues: int):
    """Every assistant answer of the first `dialogues` held-out dialogues as its own generative example."""
    from chatsft.data.conversation import BadRecord
    from chatsft.sources import read_local
    from chatsft.eval.metrics import exact_match
    from chatsft.eval.tasks import Example, Task, render_generative

    def examples():
        for conv in read_local(path, limit=dialogues):
            if isinstance(conv, BadRecord):
                yield conv
                continue
            for i, m in enumerate(conv.messages):
                if m.role == "assistant":
                    yield Example(f"{conv.source}#turn={i}", conv.messages[:i], m.text)

    return Task("every_answer", "generate", examples, render_generative,
                lambda ex, out: exact_match(out, ex.reference))


def weights_by_turn(path: str, tokenizer, n: int) -> dict[str, list[dict[int, Fraction]]]:
    """turn_weights of the first n dialogues with 3+ answers, per organization and normalization."""
    from chatsft.data.conversation import Conversation
    from chatsft.data.render import render_conversation
    from chatsft.sources import read_local
    from chatsft.data.stats import turn_weights

    convs = [c for c in read_local(path) if isinstance(c, Conversation)
             and sum(m.role == "assistant" for m in c.messages) >= 3][:n]
    out: dict[str, list] = {}
    for org in ORGS:
        results = [render_conversation(c, tokenizer, "chatml", organization=org).samples for c in convs]
        out[f"{org}/token"] = [turn_weights(s, "token") for s in results]
        if org == "split_turn":
            out[f"{org}/sample"] = [turn_weights(s, "sample") for s in results]
    return out


def train_one(org: str, steps: int, args, workdir: str):
    """(model, tokenizer, stats) after training with this organization."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatsft.builtin import resolve

    if args.trainer in ("auto", "driver"):
        try:
            from chatsft.train.driver import train
        except ImportError:
            if args.trainer == "driver":
                raise
            train = None
        if train is not None:
            from chatsft.config import load_config
            from chatsft.eval.evaluate import load_for_eval

            cfg = load_config(HERE.parent / "configs" / "tiny.yaml", [
                f"run.output_dir={workdir}/{org}", f"run.seed={args.seed}", f"data.organization={org}",
                f"data.train={args.train}", f"data.eval={args.heldout}", f"train.lr={args.lr}",
                f"train.micro_batch_size={args.batch}", "train.grad_accum=1", f"train.max_steps={steps}",
                "train.epochs=1000", "train.schedule=cosine", f"train.warmup_steps={max(1, steps // 20)}",
                "train.min_lr_frac=0.1", "train.betas=[0.9,0.95]", "train.weight_decay=0.0", "train.clip_grad=1.0",
                "train.precision=fp32", "train.eval_every=0", "train.save_every=0",
                "tracking.enabled=false"])
            t = time.time()
            result = train(cfg, local=True)
            model, tok = load_for_eval(result.model_dir, cfg)
            return model, tok, {"steps": steps, "train_seconds": round(time.time() - t, 1), "trainer": "driver"}
    from learnability import render_samples, train_plain

    path = resolve("builtin:tiny-llama")
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(path)
    samples = render_samples(args.train, tok, org)
    stats = train_plain(model, tok, samples, lr=args.lr, batch=args.batch, steps=steps, seed=args.seed)
    return model, tok, {**stats, "trainer": "plain"}


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoTokenizer

    from chatsft.builtin import resolve
    from chatsft.config import load_config
    from chatsft.eval.evaluate import evaluate_model
    from chatsft.eval.tasks import generative_task
    from learnability import heldout_loss, render_samples

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(resolve("builtin:tiny-llama"))
    # The token budget: what `steps` session batches read on average.
    lengths = {org: [len(s) for s in render_samples(args.train, tok, org)] for org in ORGS}
    mean = {org: sum(v) / len(v) for org, v in lengths.items()}
    budget = args.steps * args.batch * mean["session"]
    steps = {org: max(1, round(budget / (args.batch * mean[org]))) for org in ORGS}
    print(f"token budget {budget:,.0f}: " + ", ".join(
        f"{org} {len(lengths[org])} samples of {mean[org]:.0f} tokens -> {steps[org]} steps of {args.batch}"
        for org in ORGS), flush=True)

    cfg = load_config(None, [f"data.eval={args.heldout}", "data.organization=session", "eval.batch_size=32",
                             "eval.max_new_tokens=24", f"eval.max_examples={args.examples}",
                             "train.micro_batch_size=32"])
    every = copy.deepcopy(cfg)
    every.eval.max_examples = 0  # all answers of the same dialogues
    results = {}
    with tempfile.TemporaryDirectory(prefix="organization-") as workdir:
        for org in ORGS:
            model, mtok, stats = train_one(org, steps[org], args, workdir)
            metrics = evaluate_model(model, mtok, cfg, [generative_task("final_answer", [args.heldout])])
            metrics["eval_loss"] = heldout_loss(model, mtok, args.heldout)
            metrics.update(evaluate_model(model, mtok, every, [all_answers_task(args.heldout, args.examples)]))
            results[org] = {**stats, **metrics}
            print(json.dumps({"organization": org, **results[org]}), flush=True)

    rows = [("steps", "steps"), ("train seconds", "train_seconds"), ("eval loss", "eval_loss"),
            ("pass@1, final answer", "final_answer/pass_at_1"), ("pass@1, every answer", "every_answer/pass_at_1")]
    print(f"\n{'':24}{'session':>12}{'split_turn':>12}")
    for label, key in rows:
        cells = [results[o].get(key) for o in ORGS]
        fmt = ".1f" if key == "train_seconds" else ".4f"
        print(f"{label:24}" + "".join(f"{c:>12{fmt}}" if isinstance(c, float) else f"{str(c):>12}" for c in cells))

    weights = weights_by_turn(args.train, tok, args.dialogues)
    print("\nper-turn loss weights (share of the dialogue's loss each answer gets)")
    for i in range(args.dialogues):
        print(f"dialogue {i + 1}:")
        for kind, per_dialogue in weights.items():
            w = per_dialogue[i]
            print(f"  {kind:20}" + "  ".join(f"answer {k + 1}: {float(v):.3f}" for k, v in w.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": steps, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
