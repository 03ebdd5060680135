"""FSDP2 against DeepSpeed ZeRO-3 and ZeRO-2: mean step time and each worker's peak RSS, 2 workers
(CPU, gloo), side by side in one run, as ratios.

Model: a Qwen2.5-0.5B-shaped Qwen2 (peers.QWEN_05B: hidden 896, 14 / 2 KV heads, MLP 4864, tied
151,936-token embeddings) with --layers layers; full fine-tuning, fp32, AdamW, micro-batch 1,
accumulation 2, rows of --length tokens (all supervised after the first quarter), the default
learned loss head. Each engine runs in fresh processes (one per worker), one engine after the
other; --rounds repeats the sequence (engines alternate, so load on the machine hits them alike).

Per worker: RSS once the engine is built (the steady state: weights, gradients and optimizer
state as the engine keeps them), and the peak RSS over the timed steps (VmHWM reset after
building, through /proc/self/clear_refs; the load of the full checkpoint before sharding is
the same for every engine and is not counted). Step time: wall and CPU seconds per optimizer
step after --warmup steps, rank 0's, the median over rounds.

Targets (issue 23): fsdp2 peak RSS <= ZeRO-3's, fsdp2 step time <= 1.1x ZeRO-3's.

    PYTHONPATH=platform python benchmarks/engines.py [--layers 2] [--length 256] [--steps 4] [--rounds 1]
    PYTHONPATH=platform python benchmarks/engines.py --model tiny --steps 1 --warmup 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procmem import reset_peak, status_mb  # noqa: E402  (beside this file)

ENGINES = {
    "fsdp2": ["train.engine=fsdp2"],
    "zero3": ["train.engine=deepspeed", "train.deepspeed.stage=3"],
    "zero2": ["train.engine=deepspeed", "train.deepspeed.stage=2"],
}
WORLD = 2


def worker(rank: int, port: int, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import gc

    import numpy as np
    import torch
    import torch.distributed as dist

    from chatsft.config import load_config
    from chatsft.data.schema import IGNORE, Row
    from chatsft.model import load_model, load_tokenizer
    from chatsft.model.batch import collate
    from chatsft.model.loss import loss_function
    from chatsft.train.engines import build_engine
    from chatsft.train.optim import param_groups

    torch.set_num_threads(args["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    accum = 2
    cfg = load_config(None, [f"model.name_or_path={args['model']}", "train.precision=fp32", "train.lr=1e-4",
                             "train.micro_batch_size=1", f"train.grad_accum={accum}", "tracking.enabled=false",
                             *ENGINES[args["engine"]]])
    torch.manual_seed(0)
    model = load_model(cfg, "causal", tokenizer=load_tokenizer(cfg.model))
    loss, _ = loss_function(model, "learned")
    engine = build_engine(model, param_groups(model, cfg.train), cfg.train, world_size=WORLD,
                          device=torch.device("cpu"))
    engine.train()
    gc.collect()
    built = status_mb("VmRSS")
    g = np.random.default_rng(rank)
    length = args["length"]

    def batch():
        ids = g.integers(5, 700, length)
        labels = ids.copy()
        labels[: length // 4] = IGNORE
        return collate([Row(ids, labels)], pad_id=0)

    n = int((length - length // 4) * accum * WORLD)
    times, cpus = [], []
    for i in range(args["warmup"] + args["steps"]):
        if i == args["warmup"]:
            gc.collect()
            reset = reset_peak()
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(accum):
            b = batch()
            total, _ = loss(engine.forward, b.inputs, b.targets)
            engine.backward(total * (WORLD / n))
        engine.step(1.0)
        dist.barrier()
        if i >= args["warmup"]:
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    got = {"rank": rank, "built_mb": built, "peak_mb": status_mb("VmHWM"), "peak_reset": reset,
           "step_s": statistics.mean(times), "cpu_s": statistics.mean(cpus)}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(got, f)
    dist.barrier()
    dist.destroy_process_group()


def run_engine(engine: str, args: argparse.Namespace, model: str) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        out = os.path.join(tmp, "got")
        mp.spawn(worker, args=(port, {"engine": engine, "model": model, "length": args.length, "steps": args.steps,
                                      "warmup": args.warmup, "threads": args.threads}, out), nprocs=WORLD)
        results = []
        for rank in range(WORLD):
            with open(f"{out}.{rank}") as f:
                results.append(json.load(f))
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen", help="qwen (Qwen2.5-0.5B-shaped) or tiny (builtin:tiny-llama)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "chatsft-bench-models"))
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.model == "tiny":
        model, what = "builtin:tiny-llama", "builtin:tiny-llama"
    else:
        import peers

        model = peers.qwen_shaped(os.path.join(args.cache, f"qwen2-shaped-{args.layers}l-151936"),
                                  layers=args.layers, max_positions=max(1024, args.length))
        what = f"Qwen2.5-0.5B-shaped Qwen2, {args.layers} layers"
    rows: dict[str, list[list[dict]]] = {e: [] for e in ENGINES}
    for r in range(args.rounds):
        order = list(ENGINES) if r % 2 == 0 else list(reversed(ENGINES))
        for engine in order:
            rows[engine].append(run_engine(engine, args, model))
    print(f"\n{what}; {WORLD} workers (gloo, CPU, {args.threads} thread(s) each); full fine-tuning fp32, "
          f"micro-batch 1 x accumulation 2 of {args.length} tokens; {args.steps} timed steps after {args.warmup}, "
          f"{args.rounds} round(s)")
    summary = {}
    print(f"{'engine':8s} {'built RSS MB':>13s} {'peak RSS MB':>12s} {'step s':>8s} {'CPU s/step':>11s}")
    for engine, runs in rows.items():
        built = statistics.median(max(w["built_mb"] for w in run) for run in runs)
        peak = statistics.median(max(w["peak_mb"] for w in run) for run in runs)
        step = statistics.median(run[0]["step_s"] for run in runs)
        cpu = statistics.median(run[0]["cpu_s"] for run in runs)
        summary[engine] = {"built_mb": built, "peak_mb": peak, "step_s": step, "cpu_s": cpu}
        print(f"{engine:8s} {built:13.0f} {peak:12.0f} {step:8.3f} {cpu:11.3f}")
    f, z3, z2 = summary["fsdp2"], summary["zero3"], summary["zero2"]
    ratios = {"peak_rss_vs_zero3": f["peak_mb"] / z3["peak_mb"], "step_vs_zero3": f["step_s"] / z3["step_s"],
              "cpu_vs_zero3": f["cpu_s"] / z3["cpu_s"], "peak_rss_vs_zero2": f["peak_mb"] / z2["peak_mb"],
              "step_vs_zero2": f["step_s"] / z2["step_s"]}
    print(f"fsdp2 / ZeRO-3: peak RSS {ratios['peak_rss_vs_zero3']:.2f}x (target <= 1), step time "
          f"{ratios['step_vs_zero3']:.2f}x (target <= 1.1), CPU per step {ratios['cpu_vs_zero3']:.2f}x")
    print(f"fsdp2 / ZeRO-2: peak RSS {ratios['peak_rss_vs_zero2']:.2f}x, step time {ratios['step_vs_zero2']:.2f}x")
    return {"engines": summary, "ratios": ratios}


if __name__ == "__main__":
    main()
