"""Sequence parallelism (scaling.sequence_parallel) and activation offload on long rows: per-rank
memory and step time of one training step, N ranks sharing one row, side by side in one run.

Model: a Qwen3-shaped model built locally (grouped-query attention: 8 heads, 4 key-value heads, so
N=4 splits both; q/k norms; untied head; MLP 4x the width; the tiny tokenizer's 761-token
vocabulary), --hidden wide and --layers deep, fp32, AdamW (train.engine=ddp: every rank holds the
whole model, as under sequence parallelism with any engine but ZeRO-3). The size is chosen so that
activations dominate the parameters: with hidden 128 and 4 layers (1.2M parameters) the weights,
gradients and AdamW state are ~20 MB per rank, while one step over a thousand tokens grows the
process by ~80 MB. A wider model at the same lengths would let the replicated weights and their
gradient buckets swamp the ratios; a longer one would make every search step minutes on 2 cores.

Each measurement runs in fresh processes (one per rank, torch.distributed over gloo on CPU,
1 thread each), forked from this process once it imported torch, transformers and chatsft (the
imports are not repeated per measurement; nothing has computed yet, so no thread pool is forked).
Every rank runs the platform's own path: chatsft.config, load_model (gradient checkpointing),
sequence_parallel.start / enable (the Ulysses attention registered in transformers), collate
(multiple=N) and shard_sequence, the learned-position loss head, the engine's backward and step,
and train.loop.offloaded for train.activation_offload. One row of max_length tokens (the first
quarter unlearned, random ids, not packed), micro-batch 1.

Memory is the growth of one step (forward + backward + optimizer step) over the RSS just before:
VmHWM after the step minus VmRSS before it, with VmHWM reset to VmRSS (/proc/self/clear_refs)
after a short warm-up step that allocated gradients and optimizer state. So it is the step's
activations and transients, not the fixed cost of imports and weights; the largest over the ranks.

Printed, for each of activation offload off (no gradient checkpointing) and on (gradient
checkpointing with the checkpointed activations offloaded; on a CPU the "offload" copies to the
same memory, so what shows here is the checkpointing: on a GPU the saved inputs leave GPU memory):
  1. per-rank step growth at max_length 2L with N=2 against L with N=1 (target <= 1.15x);
  2. the longest max_length whose step grows each rank by at most --cap MB, for N=1, 2, 4 (targets
     >= 1.8x and >= 3.2x the N=1 length): doubling, then bisection to 1/16 of the N=1 length (by
     default searched with offload off only, --search both for both: ~15 runs each);
  3. step time of N=2 at 2L against N=1 at L (equal tokens per rank; mean of --steps steps after
     the measured one, rank 0's): reported, no target (on 2 shared cores the N=2 ranks compete).

    PYTHONPATH=platform python benchmarks/long_context.py [--length 1024] [--cap 200] [--search both]
    PYTHONPATH=platform python benchmarks/long_context.py --tiny      # the fast test's sizes
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procmem import reset_peak, status_mb  # noqa: E402  (beside this file)

TINY = dict(hidden=32, layers=1, length=128, cap=4.0, start=128, steps=1, grain=2)
SHAPE = dict(heads=8, kv_heads=4)


def _exact_rss() -> None:
    """Every allocation over 64 KB gets its own mapping, returned on free (glibc's mallopt
    M_MMAP_THRESHOLD; a fixed threshold also stops glibc raising it as large blocks are freed), so
    RSS follows the live tensors, as a GPU allocator's reserved memory would, not what glibc's
    heap kept of the last free (which made one step grow 60 MB more for 128 tokens more). Set in
    each rank, for its allocations from then on; the parent (a test runner) keeps its own."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except OSError:  # not glibc: RSS keeps the allocator's slack
        pass


def model_dir(cache: str, hidden: int, layers: int) -> str:
    """The Qwen3-shaped model of this width and depth, seeded, built once into `cache`."""
    out = os.path.join(cache, f"qwen3-shaped-h{hidden}-l{layers}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from chatsft.builtin import resolve

    tok = AutoTokenizer.from_pretrained(resolve("builtin:tiny-llama"))
    head_dim = hidden // SHAPE["heads"]
    config = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=SHAPE["heads"],
                         num_key_value_heads=SHAPE["kv_heads"], head_dim=head_dim, max_position_embeddings=1 << 17,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    tmp = f"{out}.tmp{os.getpid()}"
    Qwen3ForCausalLM(config).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def worker(rank: int, n: int, port: int, job: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(n),
                      LOCAL_RANK=str(rank))
    _exact_rss()
    import gc

    import numpy as np
    import torch
    import torch.distributed as dist

    from chatsft.config import load_config
    from chatsft.data.schema import IGNORE, Row
    from chatsft.model import load_model, load_tokenizer
    from chatsft.model.batch import collate, shard_sequence
    from chatsft.model.loss import loss_function
    from chatsft.train import sequence_parallel
    from chatsft.train.engines import build_engine
    from chatsft.train.loop import offloaded
    from chatsft.train.optim import param_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=n)
    offload = job["offload"]
    # scaling.sequence_parallel is not set in the config: its check against this machine's CPUs
    # would refuse N=4 on 2 cores; the group is started as the loop starts it
    cfg = load_config(None, [f"model.name_or_path={job['model']}", "train.precision=fp32", "train.lr=1e-4",
                             "train.engine=ddp", "train.micro_batch_size=1", "tracking.enabled=false",
                             f"train.gradient_checkpointing={str(offload).lower()}",
                             f"train.activation_offload={str(offload).lower()}"])
    sg = sequence_parallel.start(rank, n, n)
    torch.manual_seed(0)
    model = load_model(cfg, "causal", tokenizer=load_tokenizer(cfg.model))
    sequence_parallel.enable(model, sg)
    loss, _ = loss_function(model, "learned")
    engine = build_engine(model, param_groups(model, cfg.train), cfg.train, world_size=n,
                          device=torch.device("cpu"))
    engine.train()
    g = np.random.default_rng(0)  # the same row on every rank of the group

    def step(length: int) -> None:
        ids = g.integers(5, 700, length)
        labels = ids.copy()
        labels[: length // 4] = IGNORE
        b = shard_sequence(collate([Row(ids, labels)], pad_id=0, multiple=n), sg.index, n)
        count = torch.tensor([float(b.num_targets)])
        dist.all_reduce(count)
        with offloaded(offload, "cpu"):
            total, _ = loss(engine.forward, b.inputs, b.targets)
        engine.backward(total * (n / float(count[0])))
        engine.step(1.0)

    step(8 * n)  # gradients and AdamW state exist from here on
    gc.collect()
    dist.barrier()
    before = status_mb("VmRSS")
    reset_peak()
    step(job["length"])
    growth = status_mb("VmHWM") - before
    times = []
    for _ in range(job["steps"]):
        dist.barrier()
        t0 = time.perf_counter()
        step(job["length"])
        dist.barrier()
        times.append(time.perf_counter() - t0)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"growth_mb": growth, "before_mb": before, "step_s": statistics.mean(times) if times else None}, f)
    dist.barrier()
    # no interpreter teardown: freeing DDP's reducer joins gloo's thread, which waits for the GIL
    # this thread holds (a hang at exit)
    os._exit(0)


def measure(n: int, length: int, *, model: str, offload: bool, steps: int = 0) -> dict:
    """One step at `length` tokens shared by `n` fresh ranks: the largest per-rank growth (MB) and
    rank 0's mean step time."""
    ctx = multiprocessing.get_context("fork")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-lc-") as tmp:
        out = os.path.join(tmp, "got")
        job = {"model": model, "length": length, "offload": offload, "steps": steps}
        procs = [ctx.Process(target=worker, args=(r, n, port, job, out)) for r in range(n)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"a rank failed: N={n}, max_length={length}, offload={offload} "
                               f"(exit codes {[p.exitcode for p in procs]})")
        got = []
        for r in range(n):
            with open(f"{out}.{r}") as f:
                got.append(json.load(f))
    return {"growth_mb": max(w["growth_mb"] for w in got), "step_s": got[0]["step_s"]}


def longest(n: int, cap: float, *, lo: int, hi: int | None, grain: int, model: str, offload: bool,
            log) -> tuple[int, int]:
    """The longest max_length (a multiple of `grain`, itself a multiple of 4) whose step grows each
    of `n` ranks by at most `cap` MB: `lo` is known to fit; `hi` (when known) not to. Doubling
    from `lo` until a length does not fit, then bisection to `grain`. Returns (length, steps run)."""
    runs = 0
    if hi is None:
        hi = 2 * lo
        while True:
            got = measure(n, hi, model=model, offload=offload)
            runs += 1
            log(n, hi, got["growth_mb"], cap)
            if got["growth_mb"] > cap:
                break
            lo, hi = hi, 2 * hi
    while hi - lo > grain:
        mid = (lo + hi) // 2 // grain * grain
        if mid <= lo:
            break
        got = measure(n, mid, model=model, offload=offload)
        runs += 1
        log(n, mid, got["growth_mb"], cap)
        if got["growth_mb"] <= cap:
            lo = mid
        else:
            hi = mid
    return lo, runs


def run_variant(offload: bool, args: argparse.Namespace, model: str, verbose: bool, search: bool) -> dict:
    name = "offload on " if offload else "offload off"

    def log(n, length, growth, cap):
        if verbose:
            print(f"  [{name.strip()}] N={n} max_length={length}: step growth {growth:.0f} MB "
                  f"({'fits' if growth <= cap else 'over'} {cap:.0f} MB)", flush=True)

    L = args.length
    one = measure(1, L, model=model, offload=offload, steps=args.steps)
    two = measure(2, 2 * L, model=model, offload=offload, steps=args.steps)
    res = {"peak_n1_mb": one["growth_mb"], "peak_n2_mb": two["growth_mb"],
           "peak_ratio": two["growth_mb"] / one["growth_mb"],
           "step_n1_s": one["step_s"], "step_n2_s": two["step_s"], "step_ratio": two["step_s"] / one["step_s"]}
    if verbose:
        print(f"  [{name.strip()}] N=1 at {L}: {one['growth_mb']:.0f} MB, {one['step_s']:.2f} s/step; "
              f"N=2 at {2 * L}: {two['growth_mb']:.0f} MB, {two['step_s']:.2f} s/step", flush=True)
    if not search:
        return res
    t0 = time.perf_counter()
    unit = 16  # every length a multiple of 16: N in (1, 2, 4) divides it
    first = max(unit, args.start // unit * unit)
    l1, runs = longest(1, args.cap, lo=first, hi=None, grain=max(unit, first // args.grain // unit * unit),
                       model=model, offload=offload, log=log)
    grain = max(unit, l1 // args.grain // unit * unit)
    l2, r2 = longest(2, args.cap, lo=l1, hi=None, grain=grain, model=model, offload=offload, log=log)
    # N=4 at N=2's longest: half the tokens per rank, so it fits
    l4, r4 = longest(4, args.cap, lo=l2, hi=None, grain=grain, model=model, offload=offload, log=log)
    res.update(longest={1: l1, 2: l2, 4: l4}, grain=grain, search_runs=runs + r2 + r4,
               search_s=time.perf_counter() - t0)
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for the fast test (seconds)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--length", type=int, default=1024, help="L: N=1 at L against N=2 at 2L")
    p.add_argument("--cap", type=float, default=200.0, help="per-rank step growth cap (MB) of the search")
    p.add_argument("--start", type=int, default=1024, help="first length of N=1's doubling (must fit)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after the measured one")
    p.add_argument("--offload", choices=["both", "off", "on"], default="both", help="the variants measured")
    p.add_argument("--search", choices=["both", "off", "on"], default="off",
                   help="the variants whose longest lengths are searched (the others: rows 1 and 3 only)")
    p.add_argument("--grain", type=int, default=16, help="the search stops at 1/grain of the N=1 length")
    p.add_argument("--quiet", action="store_true", help="no line per measurement")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "chatsft-bench-models"))
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "platform"))
    # imported here, once: the forked ranks find them loaded
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import chatsft.model  # noqa: F401
    import chatsft.train.engines  # noqa: F401
    import chatsft.train.loop  # noqa: F401
    import chatsft.train.sequence_parallel  # noqa: F401

    model = model_dir(args.cache, args.hidden, args.layers)
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.offload]
    t0 = time.perf_counter()
    searched = {"off": [False], "on": [True], "both": [False, True]}[args.search]
    got = {("on" if v else "off"): run_variant(v, args, model, not args.quiet, v in searched) for v in variants}
    print(f"\nQwen3-shaped model (hidden {args.hidden}, {args.layers} layers, 8 heads / 4 KV heads, fp32, AdamW, "
          f"train.engine=ddp); gloo on CPU, 1 thread per rank, one row per step; memory = per-rank growth of one "
          f"step over the RSS before it; {time.perf_counter() - t0:.0f} s")
    for key, r in got.items():
        print(f"activation offload {key:3s}: peak per rank N=2 at {2 * args.length} / N=1 at {args.length}: "
              f"{r['peak_ratio']:.2f}x (target <= 1.15; {r['peak_n2_mb']:.0f} / {r['peak_n1_mb']:.0f} MB)")
        lg = r.get("longest")
        if lg:
            print(f"activation offload {key:3s}: longest max_length within {args.cap:.0f} MB per rank: N=1 {lg[1]}, "
                  f"N=2 {lg[2]} ({lg[2] / lg[1]:.2f}x, target >= 1.8), N=4 {lg[4]} ({lg[4] / lg[1]:.2f}x, "
                  f"target >= 3.2); grain {r['grain']}, {r['search_runs']} runs, {r['search_s']:.0f} s")
        print(f"activation offload {key:3s}: step time N=2 at {2 * args.length} / N=1 at {args.length} "
              f"(equal tokens per rank): {r['step_ratio']:.2f}x ({r['step_n2_s']:.2f} / {r['step_n1_s']:.2f} s)")
    if len(got) == 2:
        on, off = got["on"], got["off"]
        both = "longest" in on and "longest" in off
        print(f"offload on / off: peak N=1 at {args.length} {on['peak_n1_mb'] / off['peak_n1_mb']:.2f}x, "
              + (f"longest N=1 {on['longest'][1] / off['longest'][1]:.2f}x, " if both else "")
              + f"step time N=1 {on['step_n1_s'] / off['step_n1_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(got, f)
    return got


if __name__ == "__main__":
    main()
