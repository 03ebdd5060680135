"""Training throughput, measured side by side in one run (never part of the tests).

On this CPU: the embedded default's model and data, the same number of optimizer steps:
  1. supervised tokens/s with packed rows vs padded rows (--local, 1 worker); target:
     packing's speed-up at least matches the padding it removes;
  2. step time through Ray Train (1 worker) vs --local; target: Ray costs at most 10%.

    PYTHONPATH=platform python benchmarks/train.py [--steps 40] [--repeats 2]

On a GPU: benchmarks/gpu.py (MFU, memory and TRL side by side, every speed option on and off).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "platform"))
os.environ.setdefault("CHATSFT_CACHE", os.path.join(HERE, "..", ".cache", "chatsft"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------------ CPU


def _cpu_cfg(out: str, steps: int, *extra: str):
    from chatsft.config import load_config

    return load_config(os.path.join(HERE, "..", "configs", "tiny.yaml"), [
        f"run.output_dir={out}", "run.name=bench", f"train.max_steps={steps}", "train.log_every=1",
        "train.micro_batch_size=8", "train.grad_accum=1", "train.save_every=0", "train.eval_every=0",
        "scaling.num_workers=1", "tracking.enabled=false", "data.eval=[]", *extra])


def _run(cfg, rows, local: bool):
    from chatsft.plan import RunPlan
    from chatsft.train.driver import Extras, train_on_rows

    seen: list[dict] = []
    t0 = time.perf_counter()
    result = train_on_rows(RunPlan.resolve(cfg, local=local), rows,
                           Extras(export=False, callbacks=[lambda s, m: seen.append(m)]))
    return result.metrics, seen, time.perf_counter() - t0


def _throughput(seen: list[dict]) -> tuple[float, float]:
    """(supervised tokens/s, pad fraction) over the steps after the first (warm-up)."""
    steady = seen[1:]
    sup = sum(m["supervised_tokens"] for m in steady)
    secs = sum(m["step_time"] for m in steady)
    pad = statistics.mean(m["pad_fraction"] for m in steady)
    return sup / secs, pad


def _model_only(cfg, train_dir: str, micro: int, batches: int, rounds: int = 3) -> tuple[float, float]:
    """(supervised tokens/s, real-token share of the slots) of the model's forward + backward
    alone on the first rows of train_dir: no optimizer, data loading or logging."""
    from chatsft.model import load_model, load_tokenizer
    from chatsft.data.schema import iter_rows
    from chatsft.model.batch import collate
    from chatsft.model.loss import token_loss
    from chatsft.train.data import file_batches

    tok = load_tokenizer(cfg.model)
    model = load_model(cfg, "causal", tokenizer=tok)
    rows = []
    for row in iter_rows(file_batches(train_dir)()):
        rows.append(row)
        if len(rows) == micro * batches:
            break
    data = [collate(rows[i:i + micro], pad_id=tok.pad_token_id) for i in range(0, len(rows), micro)]

    def once() -> float:
        t0 = time.perf_counter()
        for b in data:
            total, count = token_loss(model(**b.inputs).logits, b.targets)
            (total / count).backward()
        return time.perf_counter() - t0

    once()  # warm-up
    secs = min(once() for _ in range(rounds))
    return sum(b.num_targets for b in data) / secs, sum(b.tokens for b in data) / sum(b.slots for b in data)


def cpu(args) -> None:
    import ray

    from chatsft.plan import RunPlan
    from chatsft.raysetup import runtime_env
    from chatsft.train.driver import prepared_rows

    tmp = tempfile.mkdtemp(prefix="chatsft-bench-")
    padded_cfg = _cpu_cfg(os.path.join(tmp, "padded"), args.steps)
    packed_cfg = _cpu_cfg(os.path.join(tmp, "packed"), args.steps, "data.packing=true")
    padded_rows, packed_rows = (prepared_rows(RunPlan.resolve(c, local=True)) for c in (padded_cfg, packed_cfg))
    print(f"rows: padded {padded_rows.train_rows}, packed {packed_rows.train_rows} "
          f"(max_length {padded_cfg.data.max_length}); {args.steps} optimizer steps of "
          f"{padded_cfg.train.micro_batch_size} rows each")

    results: dict[str, list] = {"padded": [], "packed": [], "local": [], "ray": []}
    if not ray.is_initialized():  # prepare may have started one
        ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env())
    try:
        for r in range(args.repeats):
            for name, cfg, rows in (("padded", padded_cfg, padded_rows), ("packed", packed_cfg, packed_rows)):
                cfg.run.output_dir = os.path.join(tmp, f"{name}-{r}")
                _, seen, _ = _run(cfg, rows, local=True)
                results[name].append(_throughput(seen))
            for name, local in (("local", True), ("ray", False)):
                # the default logging cadence: what a run pays for progress lines and reports
                cfg = _cpu_cfg(os.path.join(tmp, f"{name}-{r}"), args.steps, "train.log_every=10")
                metrics, _, wall = _run(cfg, padded_rows, local=local)
                results[name].append((metrics["mean_step_time"], wall))
    finally:
        ray.shutdown()

    best = {k: max(v, key=lambda x: x[0]) for k, v in results.items() if k in ("padded", "packed")}
    (pad_tps, pad_frac), (pack_tps, pack_frac) = best["padded"], best["packed"]
    speedup = pack_tps / pad_tps
    removed = (1 - pack_frac) / (1 - pad_frac)  # real-token share of the computed positions
    print("\n== packed vs padded (--local, 1 worker, best of %d)" % args.repeats)
    print(f"padded: {pad_tps:8.0f} supervised tok/s   pad fraction {pad_frac:.3f}")
    print(f"packed: {pack_tps:8.0f} supervised tok/s   pad fraction {pack_frac:.3f}")
    print(f"speed-up {speedup:.2f}x; padding removed predicts {removed:.2f}x "
          f"-> {'OK' if speedup >= removed else 'BELOW'} (target: speed-up >= prediction)")
    micro = padded_cfg.train.micro_batch_size
    (pad_m, pad_real), (pack_m, pack_real) = (_model_only(c, r.train_dir, micro, args.steps)
                                              for c, r in ((padded_cfg, padded_rows), (packed_cfg, packed_rows)))
    print(f"model forward + backward alone on the same rows (no optimizer, loading, logging): "
          f"speed-up {pack_m / pad_m:.2f}x; padding removed predicts {pack_real / pad_real:.2f}x")

    local_step = min(x[0] for x in results["local"])
    ray_step = min(x[0] for x in results["ray"])
    print("\n== Ray Train vs --local (1 worker, padded rows, best of %d)" % args.repeats)
    print(f"--local: {local_step * 1e3:7.1f} ms/step   (end to end {min(x[1] for x in results['local']):.1f}s)")
    print(f"Ray:     {ray_step * 1e3:7.1f} ms/step   (end to end {min(x[1] for x in results['ray']):.1f}s, "
          "includes starting the worker group)")
    over = ray_step / local_step - 1
    print(f"Ray overhead per step {over:+.1%} -> {'OK' if over <= 0.10 else 'ABOVE'} (target <= +10%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=2, help="runs of each variant (best is kept)")
    cpu(p.parse_args())


if __name__ == "__main__":
    main()
