"""Training throughput, measured side by side in one run (never part of the tests).

CPU (default): the embedded default's model and data, the same number of optimizer steps:
  1. supervised tokens/s with packed rows vs padded rows (--local, 1 worker); target:
     packing's speed-up at least matches the padding it removes;
  2. step time through Ray Train (1 worker) vs --local; target: Ray costs at most 10%.

    PYTHONPATH=platform python benchmarks/train.py [--steps 40] [--repeats 2]

GPU (--gpu-mfu): model FLOPs utilization of a ~0.5B Llama-shaped model built from a config,
full fine-tuning, bf16 autocast (fp32 master weights, torch AdamW), packed 2048-token rows,
through the same per-worker loop with --local (no Ray, no DeepSpeed needed):

    PYTHONPATH=platform python benchmarks/train.py --gpu-mfu [--micro 8] [--steps 12]

FLOPs per trained token = 6 * N + 12 * L * d * c, where N counts the parameters of every
matrix multiply (all layers and the LM head; the input embedding is a lookup, not a matmul),
L the layers, d the hidden size, and c the mean number of keys a query attends to (causal,
inside its own packed sequence: c = sum over sequences of n(n+1)/2 / tokens). 6N is the
forward + backward of the matmuls (2 + 4 FLOPs per weight and token); 12 L d c is QK^T and
softmax(.)V (2 matmuls x 2 FLOPs x d x c, times 3 for forward + backward). MFU divides by the
dense bf16 peak: 989 TFLOP/s for an H100 SXM (--peak-tflops to change).
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
    data = [collate(rows[i:i + micro], pad_id=tok.pad_token_id, seq2seq=False) for i in range(0, len(rows), micro)]

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


# ------------------------------------------------------------------------ GPU


def _write_packed_rows(folder: str, n_rows: int, length: int, vocab: int, docs: int, seed: int) -> float:
    """Random-token rows of exactly `length` tokens, each `docs` packed sequences; returns c."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    ids, labels, pos, keys = [], [], [], 0
    for _ in range(n_rows):
        cuts = np.sort(rng.choice(np.arange(1, length), size=docs - 1, replace=False)) if docs > 1 else []
        lens = np.diff(np.concatenate([[0], cuts, [length]])).astype(int)
        row = rng.integers(3, vocab, size=length)
        ids.append(row.tolist())
        labels.append(row.tolist())  # every token supervised (pre-training-like), the worst case
        pos.append(np.concatenate([np.arange(n) for n in lens]).tolist())
        keys += int(sum(n * (n + 1) // 2 for n in lens))
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.table({
        "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
        "labels": pa.array(labels, type=pa.list_(pa.int32())),
        "position_ids": pa.array(pos, type=pa.list_(pa.int32())),
        "source": pa.array([["synthetic"]] * n_rows, type=pa.list_(pa.string())),
    }), os.path.join(folder, "part-00000.parquet"))
    return keys / (n_rows * length)


def gpu_mfu(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatsft.config import load_config
    from chatsft.plan import RunPlan
    from chatsft.train.driver import Extras, Rows, train_on_rows

    assert torch.cuda.is_available(), "--gpu-mfu needs a CUDA GPU"
    tmp = tempfile.mkdtemp(prefix="chatsft-mfu-")
    conf = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                       num_key_value_heads=args.hidden // 64, max_position_embeddings=4096,
                       tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(conf)
    model.save_pretrained(os.path.join(tmp, "model"))
    n_total = sum(p.numel() for p in model.parameters())
    n_matmul = n_total - model.get_input_embeddings().weight.numel()
    del model
    torch.cuda.empty_cache()

    G = args.micro * args.accum
    rows_dir = os.path.join(tmp, "rows")
    c = _write_packed_rows(rows_dir, G * args.steps, args.length, args.vocab, args.docs, 0)
    cfg = load_config(None, [
        f"run.output_dir={tmp}/out", "run.name=mfu", f"model.name_or_path={tmp}/model",
        "model.tokenizer=builtin:tiny-llama", f"model.attn_implementation={args.attn}",
        f"data.max_length={args.length}", "data.packing=true",
        f"train.micro_batch_size={args.micro}", f"train.grad_accum={args.accum}", f"train.max_steps={args.steps}",
        "train.precision=bf16", "train.deepspeed.enabled=false", "train.lr=1e-4", "train.log_every=1",
        f"train.gradient_checkpointing={str(args.checkpointing).lower()}",
        "scaling.num_workers=1", "scaling.use_gpu=true", "tracking.enabled=false"])
    seen: list[dict] = []
    result = train_on_rows(RunPlan.resolve(cfg, local=True), Rows(rows_dir, None, G * args.steps, 0),
                           Extras(export=False, callbacks=[lambda s, m: seen.append(m)]))
    step = result.metrics["mean_step_time"]
    tokens = G * args.length
    flops_token = 6 * n_matmul + 12 * args.layers * args.hidden * c
    achieved = flops_token * tokens / step
    print(f"\n== MFU: Llama-shaped, {n_total / 1e6:.0f}M parameters ({n_matmul / 1e6:.0f}M in matmuls), "
          f"{args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}")
    print(f"rows of {args.length} tokens, {args.docs} packed sequences each (mean attended keys c={c:.0f}), "
          f"micro {args.micro} x accum {args.accum}, bf16 autocast, attention {args.attn}, "
          f"gradient checkpointing {args.checkpointing}")
    print(f"step time {step * 1e3:.0f} ms over steps 2..{args.steps}, {tokens / step:,.0f} tokens/s, "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"model FLOPs/token {flops_token / 1e9:.2f} GFLOP (6N {6 * n_matmul / 1e9:.2f} + attention "
          f"{12 * args.layers * args.hidden * c / 1e9:.2f})")
    print(f"achieved {achieved / 1e12:.0f} TFLOP/s -> MFU {achieved / (args.peak_tflops * 1e12):.1%} "
          f"of {args.peak_tflops:.0f} TFLOP/s (target >= 45%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    p.add_argument("--repeats", type=int, default=2, help="CPU: runs of each variant (best is kept)")
    p.add_argument("--gpu-mfu", action="store_true", help="model FLOPs utilization on a GPU")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--docs", type=int, default=4, help="packed sequences per row")
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2", "auto"])
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    args = p.parse_args()
    if args.gpu_mfu:
        args.steps = args.steps or 12
        gpu_mfu(args)
    else:
        args.steps = args.steps or 40
        cpu(args)


if __name__ == "__main__":
    main()
