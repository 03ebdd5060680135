"""The GPU path, measured in one command on one GPU (never part of the tests): MFU, learned tokens/s and
peak GPU memory of full fine-tuning with each speed option on and off, LoRA and QLoRA, and TRL's
SFTTrainer on the same model, rows and settings, side by side in one run.

    PYTHONPATH=platform python benchmarks/gpu.py [--budget-s 420] [--micro 4] [--out DIR] [--only ROWS]
    PYTHONPATH=platform python benchmarks/gpu.py --dry-run    # any machine: the plan, one step of each row

The model: Qwen2.5-0.5B's shape (peers.QWEN_05B: 24 layers, hidden 896, 14 heads / 2 KV heads, MLP
4864, tied embeddings, the real 151,936-token vocabulary), seeded weights saved in bf16, nothing from
a hub; chatsft's tiny tokenizer. The rows: the package's sample conversations in ChatML, packed by
chatsft into rows of 4,096 tokens (peers.write_rows), of which only rows exactly 4,096 long are kept,
a whole number of steps of them: every step has one shape, so torch.compile never recompiles inside
the timed steps. Each step is one micro-batch of --micro rows (bf16, no gradient checkpointing).

The headline row is full fine-tuning with every speed option on: bf16 autocast over fp32 master
weights on the ddp engine (train.engine=ddp), packed rows without a mask,
flash-attention varlen where flash-attn is installed (else sdpa), train.compile=layers, fused AdamW,
the learned-position loss head. Each other chatsft row changes one thing from there (its name says
what); TRL's rows train the same rows in the same order with the same optimizer settings and
attention kernel (peers.trl_trainer: its padding-free collator, bf16 autocast, fused AdamW, no
gradient checkpointing), once plain and once with its Liger kernels (use_liger_kernel).

Every row runs in a process of its own through chatsft's in-process loop (`--local`: train/loop.py
run_local, one NCCL rank; Ray's wheel is too large to carry to the GPU machine), under a wall-clock
cap, and all of them under --budget-s: a row that breaks, runs out of memory or overruns its cap is
a FAILED row with its one-line reason and the next row still runs; a row whose package is missing,
or that the budget no longer fits, is SKIPPED without spending GPU time. The first steps of a row
(warm-up, compilation) are not timed; a step's time runs from the end of the previous step to the
end of this one, the device synchronized. Peak memory is torch.cuda.max_memory_allocated over the
row's whole run (TRL's likewise).

FLOPs of a step = 6 N T + 12 L h K. N: the weights of every matrix multiply (every layer and the
output head, tied to the embedding or not; the input embedding is a lookup); T: the tokens of the
step; L: layers; h: heads x head dim; K: the query-key pairs attended, causal inside each packed
sequence (sum of n(n+1)/2 over its sequences; K = c T with c measured on the rows). 6N is the
forward and backward of the matmuls (2 + 4 FLOPs per weight and token), 12 L h K is QK^T and PV
(2 matmuls x 2 FLOPs x h per pair, x 3 for forward and backward). MFU = FLOPs / step time / the
card's dense bf16 peak (989 TFLOP/s for an H100 SXM or an H200; --peak-tflops for another card).
The learned head runs the output layer on learned positions only: the footer says how much of the
counted work chatsft really does. MFU is shown for full fine-tuning only (LoRA does no weight
gradients for the frozen base).

After its timed steps the headline row profiles one more step (torch.profiler): the top kernels by
GPU time, how much of the step the GPU is busy, the matmul rate, and whether the step is
compute-bound, memory-bound or host-bound. Targets (issue 29): MFU >= 45% for full fine-tuning on
the best configuration; learned tokens/s >= 1.3x TRL's; peak memory below TRL's.

--dry-run builds every configuration as on the GPU (the 0.5B model's config on the meta device: its
parameter count and FLOPs per token), then runs two steps (the second timed) of every row that can
step on this machine, on a Qwen2 of 2 layers of width 64 (vocabulary 1,024) and rows of 256 tokens,
in one process (compiled in the headline row only), with the profile; rows that need CUDA say so.
Its child refuses `import ray` and `import mlflow` from chatsft's code, as the GPU machine has
neither.

On a GPU machine with torch and transformers and no network: fetch the wheels here first
(benchmarks/gpu_wheels.py writes .whl/, about 50 MiB), then run this one line there with `.whl`
carried (the benchmark within 7 minutes, then the gpu-marked tests within 130 s; what each wrote is
under $OUT: pip.log, gpu.log (this table), rows.log (every row's output), results.json, pytest.log;
about 9.5 minutes in all, so a 600 s timeout and a 15-minute lease with the machine's start):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1 || { tail -3 $OUT/pip.log; exit 1; }; export PYTHONPATH=/tmp/site:platform PYTHONUNBUFFERED=1 CHATSFT_CACHE=/tmp/chatsft-cache HF_HUB_OFFLINE=1; python3 benchmarks/gpu.py --budget-s 420 --out $OUT 2>&1 | tee $OUT/gpu.log; timeout -k 5 130 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 60 --durations 10 $(grep -rl "mark.gpu" tests) > $OUT/pytest.log 2>&1; echo "pytest exit $?"; tail -25 $OUT/pytest.log
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "platform"))
sys.path.insert(0, HERE)
import peers  # noqa: E402  (this folder: the model, the rows and TRL's side, shared with peers.py)

LENGTH, DRY_LENGTH = 4096, 256
# the dry run's model: 2 layers of width 64 and a vocabulary of 1,024 (the tiny tokenizer's 761 fit),
# so that TRL's full logits on a CPU take a second, not ten
DRY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1024)
TARGET_MFU, TARGET_SPEED = 0.45, 1.3
# dense bf16 peak, TFLOP/s, by device name (longest match first); else --peak-tflops
PEAKS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
ABSENT_THERE = ("ray", "mlflow")  # not on the GPU machine, too large to carry
LR = 1e-5


@dataclass
class Row:
    """One configuration of the table."""

    name: str
    side: str = "chatsft"  # or "trl"
    keys: tuple[str, ...] = ()  # chatsft config overrides on top of the headline's
    trl: dict = field(default_factory=dict)  # TRL side: SFTConfig settings
    needs: tuple[str, ...] = ()  # modules it imports (missing: SKIPPED)
    cuda_only: str = ""  # why it cannot step without CUDA ('' when it can)
    warm: int = 2  # untimed steps after the first (which compiles and allocates)
    timed: int = 5
    cap_s: int = 30  # wall-clock cap of its process on the GPU (start, load, compile, steps)
    profile: bool = False  # profile one more step after the timed ones
    full: bool = True  # full fine-tuning (MFU is reported)

    @property
    def steps(self) -> int:
        return 1 + self.warm + self.timed


def headline_keys(attn: str) -> list[str]:
    return [f"model.attn_implementation={attn}", "method.name=full", "train.precision=bf16",
            "train.engine=ddp", "train.compile=layers", "train.fused_optimizer=true",
            "train.loss_head=learned", "train.bf16_master_weights=true", "train.gradient_checkpointing=false"]


def table_rows(attn: str) -> list[Row]:
    """The rows in the order they run: the headline and TRL first, the rows that compile a graph of
    their own last (should the budget run out). Caps allow a first compilation of the layers."""
    other = "sdpa" if attn == "flash_attention_2" else "flash_attention_2"
    flash = dict(needs=("flash_attn",), cuda_only="flash-attn is a CUDA kernel")
    liger = "Liger's kernels are CUDA (Triton) only"
    return [
        Row(f"chatsft: all on ({'flash' if attn != 'sdpa' else 'sdpa'})", profile=True, cap_s=100),
        Row("TRL SFTTrainer", side="trl", needs=("trl",), cap_s=40),
        Row("TRL + Liger", side="trl", trl={"use_liger_kernel": True}, needs=("trl", "liger_kernel"),
            cuda_only=liger, cap_s=40),
        Row("  compile off", keys=("train.compile=off",), warm=1, cap_s=25),
        Row("  fused AdamW off", keys=("train.fused_optimizer=false",), cap_s=30),
        Row("  head liger", keys=("train.loss_head=liger",), needs=("liger_kernel",), cuda_only=liger, cap_s=30),
        Row("  head cce", keys=("train.loss_head=cce",), needs=("cut_cross_entropy",),
            cuda_only="Cut Cross-Entropy is CUDA (Triton) only", cap_s=30),
        Row("  QLoRA nf4 r=16, compile off", keys=("method.name=qlora", "train.compile=off"), full=False,
            needs=("bitsandbytes",), cuda_only="4-bit bitsandbytes weights need CUDA", warm=1, cap_s=30),
        Row("  LoRA r=16", keys=("method.name=lora",), full=False, cap_s=60),
        Row("  bf16 weights, no fp32 masters", keys=("train.bf16_master_weights=false",), cap_s=60),
        Row("  DeepSpeed ZeRO-2 (bf16, fp32 masters)", keys=("train.engine=deepspeed", "train.deepspeed.stage=2"),
            needs=("deepspeed",), cap_s=60),
        Row(f"  attention {'flash' if other != 'sdpa' else 'sdpa'}", keys=(f"model.attn_implementation={other}",),
            cap_s=60, **(flash if other != "sdpa" else {})),
    ]


# ------------------------------------------------------------------------------ setup


@dataclass
class Shape:
    """The model's FLOP terms (module docstring)."""

    params: int  # every parameter once
    matmul: int  # N
    head: int  # the output layer's weights (in N)
    layers: int
    attn_width: int  # h
    config: dict

    @classmethod
    def of(cls, folder_or_config) -> "Shape":
        """Counted on the meta device: no memory, no weights read."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = (AutoConfig.from_pretrained(folder_or_config) if isinstance(folder_or_config, str)
                  else folder_or_config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        params = sum(p.numel() for p in model.parameters())
        matmul = params - emb.numel() + (head.numel() if head is emb else 0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(params, matmul, head.numel(), config.num_hidden_layers, config.num_attention_heads * head_dim,
                   {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                    "num_hidden_layers", "num_attention_heads",
                                                    "num_key_value_heads", "tie_word_embeddings")})

    def flops(self, tokens: float, keys: float) -> float:
        return 6 * self.matmul * tokens + 12 * self.layers * self.attn_width * keys

    def done(self, tokens: float, learned: float, keys: float) -> float:
        """FLOPs of a step whose output layer runs on the learned positions only."""
        return 6 * (self.matmul - self.head) * tokens + 6 * self.head * learned + 12 * self.layers * self.attn_width * keys


def qwen_05b_config():
    from transformers import Qwen2Config

    return Qwen2Config(**peers.QWEN_05B, num_hidden_layers=24, max_position_embeddings=32768)


def build_model(dry: bool) -> str:
    import torch

    cache = os.path.join(os.environ["CHATSFT_CACHE"], "bench")
    if dry:
        return peers.qwen_shaped(os.path.join(cache, "qwen2-dry-2l-64-1024"), layers=2,
                                 max_positions=DRY_LENGTH, **DRY_SHAPE)
    return peers.qwen_shaped(os.path.join(cache, "qwen2.5-0.5b-shaped-24l-151936-bf16"), layers=24,
                             max_positions=32768, dtype=torch.bfloat16)


def write_step_rows(model: str, out: str, length: int, micro: int, limit: Optional[int]) -> dict:
    """chatsft's packed rows of the sample conversations, then only those exactly `length` tokens
    long, a whole number of steps of `micro` of them (all rows if fewer are full). Returns facts."""
    import numpy as np
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    every = out + "-all"
    peers.write_rows(peers.TRAIN, AutoTokenizer.from_pretrained(model), every, packed=True, capacity=length,
                     limit=limit)
    table = pq.read_table(os.path.join(every, "part-00000.parquet"))
    lengths = np.array([len(x) for x in table.column("input_ids").to_pylist()])
    full = np.flatnonzero(lengths == length)
    keep = full[:len(full) // micro * micro] if len(full) >= micro else np.arange(len(lengths))
    table = table.take(keep)
    os.makedirs(out, exist_ok=True)
    pq.write_table(table, os.path.join(out, "part-00000.parquet"))
    shutil.rmtree(every, ignore_errors=True)
    tokens = pairs = learned = 0
    for pos, labels in zip(table.column("position_ids").to_pylist(), table.column("labels").to_pylist()):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        pairs += sum((e - s) * (e - s + 1) // 2 for s, e in zip(starts, starts[1:]))
        tokens += len(pos)
        learned += sum(1 for i, x in enumerate(labels) if x != -100 and pos[i] != 0)
    return {"rows": len(keep), "of": len(lengths), "full": len(full) >= micro, "tokens": tokens,
            "c": pairs / tokens, "learned_share": learned / tokens, "sequences_per_row":
                sum(len(s) for s in table.column("source").to_pylist()) / len(keep)}


# ----------------------------------------------------------------------------- children


class _Done(Exception):
    """Raised by the step hook once the row has its measurements: the loop's final checkpoint
    (seconds of writing 6 GB) is not part of what is measured."""


def refuse_absent_imports() -> None:
    """`import ray` / `import mlflow` from chatsft's own code fails, as on the GPU machine."""
    import builtins

    real = builtins.__import__

    def guarded(name, globals=None, locals=None, fromlist=(), level=0):
        caller = (globals or {}).get("__name__") or ""
        if level == 0 and name.split(".")[0] in ABSENT_THERE and caller.startswith("chatsft"):
            raise ModuleNotFoundError(f"{caller} imports {name}, which the GPU machine does not have", name=name)
        return real(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded


def gemm_tflops() -> float:
    """The card's bf16 matmul rate on random 8192^3 products (the ceiling a matmul-bound step meets)."""
    import torch

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    rate = 10 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12
    del a, b
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return rate


def child_chatsft(spec: dict) -> dict:
    import torch

    from chatsft.config import load_config
    from chatsft.plan import RunPlan
    from chatsft.train.data import count_rows
    from chatsft.train.driver import Extras, Rows, train_on_rows

    row, cuda = Row(**spec["row"]), spec["cuda"]
    out: dict[str, Any] = {}
    if cuda and row.profile:
        out["gemm_tflops"] = gemm_tflops()
    ends: list[float] = []
    learned: list[int] = []
    tokens: list[float] = []
    last = row.steps
    prof: list = []

    def callback(step, m):
        if "supervised_tokens" in m:
            learned.append(int(m["supervised_tokens"]))
            tokens.append(round(m["tokens_per_second"] * m["step_time"]))  # one step a log line

    def hook(step, rt):
        if cuda:
            torch.cuda.synchronize()
        if step == last + 1:  # the profiled step
            prof[0].__exit__(None, None, None)
            out["profile_step_s"] = time.perf_counter() - ends[-1]
            raise _Done
        ends.append(time.perf_counter())
        if step == last:
            if cuda:
                out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                out["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            if not row.profile:
                raise _Done
            prof.append(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if cuda else [])))
            prof[0].__enter__()

    cfg = load_config(None, spec["keys"] + [f"train.max_steps={last + int(row.profile)}"])
    rows = Rows(spec["rows_dir"], None, count_rows(spec["rows_dir"]), 0)
    try:
        train_on_rows(RunPlan.resolve(cfg, local=True), rows,
                      Extras(export=False, tasks=[], callbacks=[callback], hooks=[hook]))
    except _Done:
        pass
    out.update(peers.summarize(ends, learned, row.warm))
    out["tokens_per_step"] = statistics.mean(tokens[row.warm + 1:len(ends)])
    if prof:
        out["profile"] = where_time_goes(prof[0], out["step_time"], cuda)
    return out


def child_trl(spec: dict) -> dict:
    import torch

    row, cuda = Row(**spec["row"]), spec["cuda"]
    a = {"model": spec["model"], "steps": row.steps, "rows": spec["micro"], "lr": LR, "max_length": spec["length"],
         "packed": True, "train_dir": spec["rows_dir"], "out": spec["out"]}
    trainer, clock = peers.trl_trainer(a, model_kwargs={"attn_implementation": spec["attn"]},
                                       bf16=True, use_cpu=not cuda, **row.trl)
    trainer.train()
    out = peers.summarize(clock.ends, clock.learned, row.warm)
    out["tokens_per_step"] = spec["micro"] * spec["length"]  # padding-free: the rows' tokens, all full
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def child(specs_path: str) -> None:
    """Run the rows of a spec file one after another, each result (or error) to its own file."""
    import traceback

    with open(specs_path) as f:
        specs = json.load(f)
    if specs[0]["dry"]:
        refuse_absent_imports()
    for spec in specs:
        print(f"\n===== {spec['row']['name'].strip()}", flush=True)
        t = time.perf_counter()
        try:
            got = (child_trl if spec["row"]["side"] == "trl" else child_chatsft)(spec)
            got["status"] = "OK"
        except Exception as e:
            traceback.print_exc()
            lines = [x for x in str(e).strip().splitlines() if x.strip()]
            got = {"status": "FAILED", "reason": f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]}
        import torch

        got["device"] = torch.cuda.get_device_name(0) if spec["cuda"] else "cpu"
        got["wall_s"] = time.perf_counter() - t
        with open(spec["result"], "w") as f:
            json.dump(got, f)
        print(f"===== {spec['row']['name'].strip()}: {got['status']} in {got['wall_s']:.0f} s", flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def where_time_goes(prof, step_s: float, cuda: bool) -> dict:
    """The profiled step: GPU kernels (CPU ops where there are none) by self time, and their classes."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    items = [(e.key, e.self_device_time_total, e.count) for e in events
             if cuda and e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    kernels = bool(items)
    if not kernels:
        items = [(e.key, e.self_cpu_time_total, e.count) for e in events if e.self_cpu_time_total > 0]
    items.sort(key=lambda x: -x[1])
    classes = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, t, _ in items:
        classes[kernel_class(name)] += t / 1e6
    return {"device": "cuda" if cuda else "cpu", "kernels": kernels, "step_s": step_s,
            "total_s": sum(t for _, t, _ in items) / 1e6, "classes": classes,
            "top": [{"name": n[:90], "ms": t / 1e3, "calls": c} for n, t, c in items[:10]]}


def kernel_class(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "attention", "attn", "sdpa")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "wgmma", "matmul", "aten::mm", "aten::addmm",
                              "aten::bmm", "aten::linear", "cublas")):
        return "matmul"
    return "other"


# ----------------------------------------------------------------------------- parent


def missing(row: Row) -> list[str]:
    return [m for m in row.needs if importlib.util.find_spec(m) is None]


def run_children(batch: list[tuple[Row, dict]], timeout: float, log_path: str) -> None:
    """One child process for the batch's specs, killed (with the compile workers it started) at
    `timeout`; a spec left without a result gets a FAILED one saying why."""
    path = batch[0][1]["result"] + ".specs.json"
    with open(path, "w") as f:
        json.dump([spec for _, spec in batch], f)
    t = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", path], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            why = (f"the process ended with {signal.Signals(-code).name}" if code < 0 else
                   f"the process exited with code {code}")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            why = f"over its {timeout:.0f} s cap"
    for row, spec in batch:
        if not os.path.exists(spec["result"]):
            with open(spec["result"], "w") as f:
                json.dump({"status": "FAILED", "reason": f"{why} (last output: {last_line(log_path)})",
                           "wall_s": time.perf_counter() - t}, f)


def last_line(log_path: str) -> str:
    with open(log_path, errors="replace") as f:
        lines = [x.strip() for x in f.read()[-20000:].splitlines() if x.strip()]
    return (lines[-1] if lines else "none")[:200]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="build every row, one step of each on this machine")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole table")
    p.add_argument("--micro", type=int, default=0, help="rows of 4,096 tokens per step (default 4; dry run 2)")
    p.add_argument("--only", default="", help="comma-separated row names (as printed, e.g. 'TRL SFTTrainer')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a chatsft config override for every chatsft row, after the row's own (repeatable)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the card's dense bf16 peak, if not in PEAKS")
    p.add_argument("--out", default="", help="folder for results.json (every figure) and rows.log (each row's "
                   "output)")
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    os.environ.setdefault("CHATSFT_CACHE", os.path.join(HERE, "..", ".cache", "chatsft"))
    started = time.perf_counter()
    deadline = started + args.budget_s
    import torch

    dry = args.dry_run
    cuda = torch.cuda.is_available() and not dry
    if not cuda and not dry:
        raise SystemExit("gpu.py: no CUDA device here; --dry-run runs the plan on this machine")
    micro = args.micro or (2 if dry else 4)
    length = DRY_LENGTH if dry else LENGTH
    attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    rows = table_rows(attn)
    if args.only:
        wanted = {x.strip() for x in args.only.split(",")}
        rows = [r for r in rows if r.name.strip() in wanted]
        if not rows:
            raise SystemExit(f"--only: no row named {sorted(wanted)}; rows: "
                             f"{', '.join(r.name.strip() for r in table_rows(attn))}")
    out_dir = args.out or tempfile.mkdtemp(prefix="chatsft-gpu-")
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="chatsft-gpu-work-")
    log_path = os.path.join(out_dir, "rows.log")
    open(log_path, "w").close()
    try:
        run(args, dry, cuda, micro, length, attn, rows, out_dir, work, log_path, started, deadline)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, dry, cuda, micro, length, attn, rows, out_dir, work, log_path, started, deadline) -> None:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    print("gpu.py: " + ("DRY RUN on this machine's CPU" if dry else "on the GPU") + "; packages: " + ", ".join(
        f"{n} {ver(n)}" for n in ("torch", "transformers", "peft", "trl", "datasets", "deepspeed", "liger-kernel",
                                  "cut-cross-entropy", "bitsandbytes", "flash-attn", "pyarrow")), flush=True)
    real = Shape.of(qwen_05b_config())
    per_token = 6 * real.matmul
    print(f"model: Qwen2.5-0.5B-shaped Qwen2, {real.params:,} parameters, N = {real.matmul:,} in matmuls "
          f"(output head {real.head:,}, tied to the embedding), L = {real.layers}, h = {real.attn_width}; "
          f"{', '.join(f'{k} {v}' for k, v in real.config.items())}", flush=True)
    print(f"FLOPs per step = 6 N T + 12 L h K (T tokens, K attended query-key pairs = c T): "
          f"{per_token / 1e9:.3f} GFLOP per token + {12 * real.layers * real.attn_width / 1e6:.3f} MFLOP x c",
          flush=True)

    # ------------------------------------------------------------------ the plan
    print(f"\nplan: budget {args.budget_s:.0f} s of wall time; each row in a process of its own, capped; "
          f"rows run in this order, one that would start with less than half its cap left is SKIPPED", flush=True)
    print(f"  setup: the model ({'2 layers of width 64, vocabulary 1,024' if dry else '0.5B, bf16 on disk'}), "
          f"rows of {length} tokens, {micro} per step", flush=True)
    print(f"  {'row':42s}{'steps: first+warm-up+timed(+profiled)':>38s}{'cap s':>7s}  {'not run because':s}")
    for r in rows:
        why = ("needs " + ", ".join(missing(r))) if missing(r) else (r.cuda_only if dry and r.cuda_only else "")
        print(f"  {r.name:42s}{f'1+{r.warm}+{r.timed}' + ('+1' if r.profile else ''):>38s}{r.cap_s:7d}  {why}")
    caps = sum(r.cap_s for r in rows if not missing(r))
    print(f"  caps total {caps} s + setup; budget {args.budget_s:.0f} s"
          + (" (dry run: every row in one process, two steps each, the second timed; compiled in the "
             "headline row only)" if dry else ""), flush=True)

    # ------------------------------------------------------------------ setup
    t = time.perf_counter()
    model = build_model(dry)
    shape = Shape.of(model)
    facts = write_step_rows(model, os.path.join(work, "rows"), length, micro, 400 if dry else None)
    print(f"\nsetup {time.perf_counter() - t:.0f} s: model {model} ({shape.params:,} parameters); "
          f"{facts['rows']} rows of {length} tokens{'' if facts['full'] else ' or fewer'} (of {facts['of']} "
          f"packed), {facts['sequences_per_row']:.1f} conversations a row, learned share "
          f"{facts['learned_share']:.1%}, c = {facts['c']:.1f} keys per token", flush=True)

    base = [f"run.name=gpu", "run.seed=0", f"model.name_or_path={model}", f"data.max_length={length}",
            "data.packing=true", f"train.micro_batch_size={micro}", "train.grad_accum=1", f"train.lr={LR}",
            "train.betas=[0.9, 0.95]", "train.eps=1e-8", "train.weight_decay=0.0", "train.schedule=cosine",
            "train.warmup_steps=0", "train.min_lr_frac=0.0", "train.clip_grad=1.0", "train.log_every=1",
            "train.eval_every=0", "train.save_every=0", "scaling.num_workers=1", "tracking.enabled=false",
            "eval.tasks=[]"]
    from chatsft.config import ConfigError, load_config

    results: dict[str, dict] = {}
    specs: list[tuple[Row, dict]] = []
    for i, r in enumerate(rows):
        keys = base + headline_keys(attn) + list(r.keys) + args.set
        if r.side == "chatsft":
            try:  # every configuration is built as on the GPU, also in the dry run
                load_config(None, keys + ["scaling.use_gpu=true", f"run.output_dir={work}/check"])
            except ConfigError as e:
                results[r.name] = {"status": "FAILED", "reason": f"config: {e}"}
                continue
        if missing(r):
            results[r.name] = {"status": "SKIPPED", "reason": "not installed: " + ", ".join(missing(r))}
            continue
        if dry and r.cuda_only:
            results[r.name] = {"status": "CPU", "reason": f"built; no step here: {r.cuda_only}"}
            continue
        row = r
        if dry:
            row = dataclasses.replace(r, warm=0, timed=1)
            keys += [] if r.profile else ["train.compile=off"]
        keys += [f"run.output_dir={work}/run-{i}", f"scaling.use_gpu={str(cuda).lower()}"]
        specs.append((row, {"row": dataclasses.asdict(row), "keys": keys, "model": model, "attn": attn,
                            "rows_dir": os.path.join(work, "rows"), "micro": micro, "length": length,
                            "cuda": cuda, "dry": dry, "out": os.path.join(work, f"trl-{i}"),
                            "result": os.path.join(work, f"result-{i}.json")}))

    # ------------------------------------------------------------------ the rows
    if dry and specs:
        run_children(specs, max(deadline - time.perf_counter(), 1), log_path)
    for row, spec in specs:
        if not dry:
            left = deadline - time.perf_counter()
            if left < row.cap_s / 2:
                results[row.name] = {"status": "SKIPPED", "reason": f"budget: {left:.0f} s left, cap {row.cap_s} s"}
                continue
            run_children([(row, spec)], min(row.cap_s, left), log_path)
        with open(spec["result"]) as f:
            results[row.name] = json.load(f)
        got = results[row.name]
        print(f"  {row.name.strip()}: {got['status']} in {got.get('wall_s', 0):.0f} s"
              + (f"  ({got['reason']})" if got.get("reason") else ""), flush=True)
    report(rows, results, shape, facts, micro, length, args, dry, out_dir, time.perf_counter() - started)


# ------------------------------------------------------------------------------ report


def report(rows, results, shape: "Shape", facts, micro, length, args, dry, out_dir, wall) -> None:
    device = "cpu" if dry else next((r["device"] for r in results.values() if r.get("device")), "the GPU")
    gemm = next((r["gemm_tflops"] for r in results.values() if r.get("gemm_tflops")), None)
    peak = args.peak_tflops or next((v for k, v in sorted(PEAKS.items(), key=lambda kv: -len(kv[0]))
                                     if k in device), 0.0)
    c = facts["c"]
    for r in rows:
        got = results.get(r.name, {})
        if got.get("status") == "OK":
            tokens = got["tokens_per_step"]
            got["tflops"] = shape.flops(tokens, c * tokens) / got["step_time"] / 1e12 if r.full else None
            got["mfu"] = got["tflops"] / peak if peak and r.full else None
            got["tokens_s"] = tokens / got["step_time"]
    head_row = next((r for r in rows if r.profile), rows[0])
    head = results.get(head_row.name, {})
    print(f"\n== {device}: Qwen2.5-0.5B-shaped{' (dry run: 2 layers of width 64, vocabulary 1,024)' if dry else ''}, "
          f"rows of {length} tokens, {micro} a step, bf16; {wall:.0f} s wall")
    print(f"{'row':42s}{'status':>8s}{'step s':>8s}{'tokens/s':>10s}{'learned/s':>11s}{'TFLOP/s':>9s}{'MFU':>7s}"
          f"{'peak GiB':>10s}{'vs all on':>10s}")
    for r in rows:
        got = results.get(r.name, {"status": "-"})
        if got["status"] != "OK":
            print(f"{r.name:42s}{got['status']:>8s}  {got.get('reason', '')[:110]}")
            continue
        ratio = f"{got['learned_tok_s'] / head['learned_tok_s']:.2f}x" if head.get("status") == "OK" else "-"
        mfu = f"{got['mfu']:.1%}" if got["mfu"] else "-"
        mem = f"{got['peak_gib']:.1f}" if got.get("peak_gib") is not None else "-"
        tflops = f"{got['tflops']:.1f}" if got["tflops"] is not None else "-"
        print(f"{r.name:42s}{'OK':>8s}{got['step_time']:8.3f}{got['tokens_s']:10,.0f}{got['learned_tok_s']:11,.0f}"
              f"{tflops:>9s}{mfu:>7s}{mem:>10s}{ratio:>10s}")
    print(f"FLOPs per step = 6 N T + 12 L h K with N = {shape.matmul:,}, L = {shape.layers}, h = {shape.attn_width}, "
          f"T = tokens of the step, K = c T, c = {c:.1f} (causal pairs per token on these rows); MFU against "
          + (f"{peak:.0f} TFLOP/s dense bf16" if peak else "no known peak (--peak-tflops)")
          + (f"; this card's measured bf16 matmul rate {gemm:.0f} TFLOP/s" if gemm else ""))
    learned = facts["learned_share"]
    print(f"chatsft's loss heads (learned, liger, cce) run the output layer on the learned positions only "
          f"({learned:.1%} of the tokens): {shape.done(1, learned, c) / shape.flops(1, c):.0%} of the counted "
          f"FLOPs are done; TRL scores every position")
    verdicts = targets(rows, results)
    if dry:
        verdicts[0] = "targets (dry run: one timed CPU step a row, the code exercised, nothing measured):"
    for line in verdicts:
        print(line)
    prof = head.get("profile")
    if prof:
        print(profile_text(head_row.name, prof, head, gemm, shape, c, learned, any("MISSED" in v for v in verdicts)))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"device": device, "peak_tflops": peak, "gemm_tflops": gemm, "rows_facts": facts,
                   "shape": dataclasses.asdict(shape), "micro": micro, "length": length, "dry": dry,
                   "wall_s": wall, "rows": {r.name.strip(): results.get(r.name) for r in rows}}, f, indent=1)
    print(f"results: {os.path.join(out_dir, 'results.json')}; each row's output: {os.path.join(out_dir, 'rows.log')}")


def targets(rows, results) -> list[str]:
    ok = {r.name: results[r.name] for r in rows if results.get(r.name, {}).get("status") == "OK"}
    full = [r for r in rows if r.side == "chatsft" and r.full and r.name in ok]
    trl = [r for r in rows if r.side == "trl" and r.name in ok]
    out = ["targets:"]
    if full and any(ok[r.name].get("mfu") for r in full):
        best = max(full, key=lambda r: ok[r.name].get("mfu") or 0)
        m = ok[best.name]["mfu"]
        out.append(f"  MFU >= {TARGET_MFU:.0%} for full fine-tuning: best {m:.1%} ({best.name.strip()}) -> "
                   f"{'MET' if m >= TARGET_MFU else 'MISSED'}")
    else:
        out.append("  MFU: no full fine-tuning row measured against a known peak")
    if full and trl:
        fast = max(full, key=lambda r: ok[r.name]["learned_tok_s"])
        rival = max(trl, key=lambda r: ok[r.name]["learned_tok_s"])
        ratio = ok[fast.name]["learned_tok_s"] / ok[rival.name]["learned_tok_s"]
        out.append(f"  learned tokens/s >= {TARGET_SPEED}x TRL's: {fast.name.strip()} / {rival.name.strip()} "
                   f"(TRL's faster row) = {ratio:.2f}x -> {'MET' if ratio >= TARGET_SPEED else 'MISSED'}")
        mine, theirs = ok[fast.name].get("peak_gib"), min((ok[r.name].get("peak_gib") or 0) for r in trl)
        if mine is not None and theirs:
            out.append(f"  peak memory below TRL's: {mine:.1f} GiB ({fast.name.strip()}) vs {theirs:.1f} GiB "
                       f"(TRL's lower row) -> {'MET' if mine < theirs else 'MISSED'}")
        else:
            out.append("  peak memory: not measured here (no CUDA)")
    else:
        out.append("  TRL ratio: needs a full fine-tuning row and a TRL row measured")
    return out


def profile_text(name: str, prof: dict, head: dict, gemm, shape: "Shape", c: float, learned: float,
                 missed: bool) -> str:
    k = prof["total_s"] or 1e-12
    cls = prof["classes"]
    lines = [f"\n== where the time goes: one profiled step of '{name.strip()}'"
             + (" (a target was missed)" if missed else "")]
    if prof["device"] == "cuda" and not prof["kernels"]:
        lines.append("the profile recorded no GPU kernel (is CUPTI missing?): no verdict; top CPU ops by self time:")
    elif prof["device"] == "cuda":
        busy = k / prof["step_s"]
        tokens = head["tokens_per_step"]
        mm_flops = 6 * (shape.matmul - shape.head) * tokens + 6 * shape.head * learned * tokens
        rate = mm_flops / cls["matmul"] / 1e12 if cls["matmul"] else 0.0
        lines.append(f"GPU kernels {k * 1e3:.0f} ms in a {prof['step_s'] * 1e3:.0f} ms step (the mean timed step): "
                     f"busy {busy:.0%}; matmul {cls['matmul'] / k:.0%}, attention {cls['attention'] / k:.0%}, "
                     f"other (elementwise, norms, loss, optimizer, copies) {cls['other'] / k:.0%} of kernel time; "
                     f"matmuls at {rate:.0f} TFLOP/s" + (f" (the card's bf16 matmul rate {gemm:.0f})" if gemm else ""))
        if busy < 0.85:
            verdict = (f"host-bound: the GPU idles {1 - busy:.0%} of the step waiting for Python, kernel launches "
                       "or synchronizations")
        elif (cls["matmul"] + cls["attention"]) / k >= 0.7:
            verdict = (f"compute-bound: matmul and attention kernels hold "
                       f"{(cls['matmul'] + cls['attention']) / k:.0%} of the GPU time")
        else:
            verdict = (f"memory-bound: kernels other than matmul and attention hold {cls['other'] / k:.0%} of "
                       "the GPU time")
        lines.append(f"verdict: {verdict}")
        lines.append("top kernels by GPU time:")
    else:
        lines.append(f"CPU ops {k * 1e3:.0f} ms of self time (dry run: no GPU, no verdict); top ops:")
    for t in prof["top"]:
        lines.append(f"  {t['ms']:9.2f} ms {t['calls']:6d}x  [{kernel_class(t['name'])}] {t['name']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
