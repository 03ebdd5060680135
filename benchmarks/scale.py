"""Data at cluster scale: prepare throughput and memory, and what each training worker reads.

    python benchmarks/scale.py                          # 100k and 1M conversations
    python benchmarks/scale.py --records 100000         # one size
    python benchmarks/scale.py --records 20000 --steps 50 --workers 1 2   # a quick look
    python benchmarks/scale.py --records 100000 --synthetic-rows 1000000  # 1M on the training side only
    python benchmarks/scale.py --records --synthetic-rows 100000 --steps 0    # each worker's reads alone
    python benchmarks/scale.py --records 40000 --prepare-only       # prepare 1 vs 2 CPUs alone

For each corpus size (synthetic conversations, log-normal numbers of turns,
written on the fly as JSONL shards into a temp dir):

1. prepare (`prepare(plan, force=True)`: read, render, shuffle, write Parquet) in a
   fresh driver process pinned to 1 core with a Ray of 1 CPU, then to 2 cores with
   2 CPUs (the clock starts once Ray is up): wall time, tokens/s, the driver's peak
   RSS, the object store's peak (polled), and the CPU seconds of every process by
   what it ran (on a loaded machine wall times mislead; CPU seconds do not).
   Targets: 2 CPUs / 1 CPU >= 1.9x; driver peak RSS and the object store's peak at 1M within
   1.2x of 100k (prepare holds a bounded number of rendered blocks, not the corpus). The last
   prepare publishes its rows to a row cache (`data.cache`).
3. a new run (another output folder and learning rate) on a two-node cluster with that cache:
   its time from the call to the first optimizer step, and that it prepared nothing.
4. training on the prepared rows on a local multi-node Ray cluster
   (ray.cluster_utils.Cluster, two nodes), W = 1, 2, 4 workers, the tiny built-in
   Llama, a few hundred optimizer steps: time to the first optimizer step (from
   the call, including the driver's index of the row groups and the workers'
   start), peak RSS of the driver and of each worker, the object store's peak, and
   bytes read per worker as a ratio to total/W. Target: <= 1.1x total/W plus one
   row group (the largest row group is printed beside).

Each measurement runs in its own process, so peak RSS is that process's own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def peak_rss_mb() -> float:
    """This process's peak RSS since it started its program: VmHWM, not ru_maxrss, which keeps the
    peak of the parent's image a forked-then-exec'd child started as."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StorePeak:
    """The object store's peak use, polled once a second from the cluster's memory summary."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _poll(self) -> None:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        while not self._stop.is_set():
            try:  # ray.available_resources does not see objects; the raylets' store stats do
                used = get_memory_info_reply(state).store_stats.object_store_bytes_used
                self.peak = max(self.peak, used / 2**20)
            except Exception:
                if not ray.is_initialized():
                    return
            self._stop.wait(1.0)


class CpuByProcess:
    """CPU seconds (user + sys) of this process and every process under it (raylet, GCS, Ray
    workers and actors), sampled twice a second; the CPU a process used between two samples goes
    to what its title said then (a Ray worker's title names the task or actor method it runs), so
    stages show (read, render, stats, partition, write). A process that exits loses at most its
    last half second. Wall time on a shared machine says little; CPU seconds say where work goes."""

    def __init__(self) -> None:
        self.last: dict[int, float] = {}
        self.workers: set[int] = set()  # Ray worker processes seen (each pays Python's and Ray's start)
        self.spent: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        import psutil

        me = psutil.Process()
        self.last = {p.pid: sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)]}
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self._sample()

    @staticmethod
    def _role(name: str) -> str:
        for key, role in (("gcs_server", "gcs"), ("raylet", "raylet"), ("scale.py", "driver"),
                          ("MapBatches(Renderer)", "render actors"), ("Read", "read tasks"),
                          ("block_stats", "stats tasks"), ("partition_task", "partition tasks"),
                          ("write_part", "write tasks"), ("first_samples", "preview tasks"),
                          ("count_newlines", "newline counts"), ("IDLE", "idle ray workers"),
                          ("default_worker.py", "ray workers starting")):
            if key in name:
                return role
        if name.startswith("ray::"):
            return name.split()[0].split("(")[0].split(".")[0]
        return "other (dashboard, agents, log monitor)"

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                with p.oneshot():
                    cpu = sum(p.cpu_times()[:2])
                    name = " ".join(p.cmdline()[:3]) or p.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            role = self._role(name)
            if "default_worker.py" in name or name.startswith("ray::"):
                self.workers.add(p.pid)
            self.spent[role] = self.spent.get(role, 0.0) + cpu - self.last.get(p.pid, 0.0)
            self.last[p.pid] = cpu

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.5)

    def by_role(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in sorted(self.spent.items(), key=lambda kv: -kv[1]) if v >= 0.05}


# ------------------------------------------------------------------- children


def _pid() -> int:
    return os.getpid()


def child_prepare(cpus: int, out: str, cache: str, paths: list[str]) -> dict:
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= cpus:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])  # Ray's processes inherit it
    import ray
    from ray.data import DataContext

    from chatsft.config import load_config
    from chatsft.pipeline import prepare
    from chatsft.plan import RunPlan

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    DataContext.get_current().print_on_execution_start = False
    # The clock starts on a cluster that is up, as a cluster is when prepare is submitted to it: Ray's
    # own start (a worker process per CPU, importing Ray) is not prepare's, and at 1 CPU it would run
    # on the same core as the driver's checks.
    ray.get([ray.remote(num_cpus=1)(_pid).remote() for _ in range(cpus)])
    time.sleep(3)
    cfg = load_config(None, [f"run.output_dir={out}", f"data.train=[{', '.join(paths)}]", "data.max_length=1024",
                             "tracking.enabled=false", f"data.cache={'' if cache == '-' else cache}"])
    start = time.perf_counter()
    with StorePeak() as store, CpuByProcess() as cpu:
        p = prepare(RunPlan.resolve(cfg), force=True)
    wall = time.perf_counter() - start
    ray.shutdown()
    st = p.train_stats
    return {"wall": wall, "pipeline": st["seconds"], "tokens": st["tokens"], "samples": st["samples"],
            "rows": st["rows"], "driver_rss_mb": peak_rss_mb(), "store_peak_mb": store.peak,
            "train_dir": p.train_dir, "cpu_s": cpu.by_role(), "worker_processes": len(cpu.workers), "seconds_render": st["seconds_render"],
            "seconds_shuffle_write": st["seconds_shuffle_write"]}


def child_warm(cache: str, out: str, paths: list[str]) -> dict:
    """`chatsft train` of a new run (another output folder and learning rate) on a two-node
    cluster whose rows are in the cache: the time from the call to the first optimizer step,
    and whether anything was prepared (the driver's log says)."""
    import contextlib
    import io

    import ray
    from ray.cluster_utils import Cluster

    from chatsft.config import load_config
    from chatsft.raysetup import runtime_env
    from chatsft.train.driver import train

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env=runtime_env(), logging_level="ERROR", log_to_driver=False)
    os.makedirs(out, exist_ok=True)
    first = os.path.join(out, "first_step.txt")
    cfg = load_config(None, [
        f"run.output_dir={out}", "run.name=warm", "run.shared_storage=true", f"data.train=[{', '.join(paths)}]",
        "data.max_length=1024", f"data.cache={cache}", "train.micro_batch_size=4", "train.grad_accum=1",
        "train.max_steps=3", "train.log_every=1", "train.save_every=0", "train.precision=fp32",
        "train.deepspeed.stage=2", "train.lr=5e-4", "scaling.num_workers=1",
        "scaling.resources_per_worker={CPU: 1}", "tracking.enabled=false", "eval.tasks=[]"])
    log = io.StringIO()
    start = time.time()
    with contextlib.redirect_stdout(log):
        train(cfg, callbacks=[FirstStep(first)])
    ray.shutdown()
    cluster.shutdown()
    with open(first) as f:
        t_first = float(f.read()) - start
    text = log.getvalue()
    return {"first_step_s": t_first, "cache_hit": "cache hit" in text,
            "prepared": "rendered in" in text or "preparing it once" in text,
            "log": [ln for ln in text.splitlines() if ln.startswith("chatsft prepare")]}


class FirstStep:
    """Rank 0's callback: the wall time of the first optimizer step, written to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, step: int, metrics: dict) -> None:
        if not os.path.exists(self.path):
            with open(self.path, "w") as f:
                f.write(str(time.time()))


class WorkerRss:
    """Every rank, after the last step: its process's peak RSS, written to a file."""

    def __init__(self, folder: str, last: int) -> None:
        self.folder, self.last = folder, last

    def __call__(self, step: int, runtime) -> None:
        if step == self.last:
            with open(os.path.join(self.folder, f"rss_rank{runtime.rank}.txt"), "w") as f:
                f.write(str(peak_rss_mb()))


def epoch_read(index, seed: int, global_batch: int, rank: int, world: int) -> dict:
    """One worker's full epoch of rows through the trainer's own reader (no model): what it reads."""
    from chatsft.train.data import ChunkReader, worker_steps

    reader = ChunkReader(index)
    rows = 0
    t0 = time.perf_counter()
    # no read-ahead thread here: a step of a few rows costs less than a hand-over between threads
    for mine in worker_steps(index, reader, seed=seed, epoch=0, global_batch=global_batch, rank=rank, world=world):
        rows += sum(not r.empty for r in mine)
    return {"bytes": reader.bytes_read, "rows": rows, "seconds": time.perf_counter() - t0,
            "rss_mb": peak_rss_mb()}


def child_train(workers: int, steps: int, train_dir: str, out: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from chatsft.config import load_config
    from chatsft.plan import RunPlan
    from chatsft.train.data import RowIndex, count_rows
    from chatsft.train.driver import Extras, Rows, train_on_rows

    # two nodes of 2 logical CPUs: W = 4 spreads over both (the machine's cores are shared anyway)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    from chatsft.raysetup import runtime_env

    ray.init(address=cluster.address, runtime_env=runtime_env(), logging_level="ERROR", log_to_driver=False)
    os.makedirs(out, exist_ok=True)
    first = os.path.join(out, "first_step.txt")
    cfg = load_config(None, [
        f"run.output_dir={out}", "run.name=scale", "run.shared_storage=true", "model.name_or_path=builtin:tiny-llama",
        "train.micro_batch_size=4", "train.grad_accum=1", f"train.max_steps={steps}", "train.log_every=1",
        "train.save_every=0", "train.precision=fp32", "train.deepspeed.stage=2", "train.lr=1e-3",
        f"scaling.num_workers={workers}", "scaling.resources_per_worker={CPU: 0.5}", "tracking.enabled=false",
        "eval.tasks=[]"])
    plan = RunPlan.resolve(cfg)
    rows = Rows(train_dir, None, count_rows(train_dir), 0)
    start = time.time()
    m: dict = {}
    with StorePeak() as store:
        if steps > 0:  # --steps 0: the reads alone
            m = train_on_rows(plan, rows, Extras(callbacks=[FirstStep(first)], hooks=[WorkerRss(out, steps)],
                                                 export=False, tasks=[])).metrics
    end = time.time()
    index = RowIndex.build(train_dir)
    # A few hundred steps read a sliver of an epoch; what each worker reads of a whole one is
    # measured by the same reader over a full epoch, one Ray task per rank.
    task = ray.remote(num_cpus=0.5)(epoch_read)
    epoch = ray.get([task.remote(index, 0, plan.global_batch, r, workers) for r in range(workers)])
    ray.shutdown()
    cluster.shutdown()
    t_first, worker_rss = None, []
    if steps > 0:
        with open(first) as f:
            t_first = float(f.read()) - start
        worker_rss = [float(Path(out, f"rss_rank{r}.txt").read_text()) for r in range(workers)]
    return {"workers": workers, "first_step_s": t_first, "wall": end - start, "steps": m.get("step", 0),
            "bytes_read_steps": m.get("data_bytes_read", []), "bytes_total": index.total_bytes,
            "bytes_read": [e["bytes"] for e in epoch], "epoch_rows": [e["rows"] for e in epoch],
            "epoch_seconds": [e["seconds"] for e in epoch], "reader_rss_mb": [e["rss_mb"] for e in epoch],
            "largest_row_group": max(index.nbytes), "row_groups": len(index.nbytes),
            "driver_rss_mb": peak_rss_mb(), "worker_rss_mb": worker_rss, "store_peak_mb": store.peak}


def run_child(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "platform"), RAY_ADDRESS="local")
    res = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.strip().splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        print(res.stdout[-3000:], res.stderr[-5000:])
        raise SystemExit(f"child {args[:2]} failed")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------ main


def bench_size(records: int, files: int, workers: list[int], steps: int, cpus_list: list[int], tmp: str,
               warm_run: bool = True) -> dict:
    from prepare import make_corpus

    folder = Path(tmp) / f"corpus{records}"
    folder.mkdir()
    t0 = time.perf_counter()
    paths = make_corpus(folder, records, files=files)
    size = sum(os.path.getsize(p) for p in paths)
    print(f"\n== {records:,} conversations: {size / 1e6:,.0f} MB of JSONL in {len(paths)} shards "
          f"(generated in {time.perf_counter() - t0:.0f} s)", flush=True)
    prep = {}
    cache = os.path.join(tmp, f"cache{records}")
    for cpus in cpus_list:
        # the last prepare publishes its rows to a row cache: a later run takes them (step 3.)
        prep[cpus] = run_child("prepare", str(cpus), os.path.join(tmp, f"prep{records}_{cpus}"),
                               cache if cpus == cpus_list[-1] else "-", *paths)
        r = prep[cpus]
        print(f"   prepare, {cpus} CPU: {r['wall']:7.1f} s ({r['tokens'] / r['wall'] / 1e3:6.1f} k tokens/s; "
              f"{r['tokens']:,} tokens, {r['rows']:,} rows); driver peak RSS {r['driver_rss_mb']:.0f} MB, "
              f"object store peak {r['store_peak_mb']:.0f} MB", flush=True)
        print(f"      read+render {r['seconds_render']:.1f} s, shuffle+write {r['seconds_shuffle_write']:.1f} s; "
              f"{r['worker_processes']} Ray worker processes; CPU seconds {sum(r['cpu_s'].values()):.1f}: "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_s"].items()), flush=True)
    if 1 in prep and 2 in prep:
        print(f"   prepare 2 CPUs / 1 CPU: {prep[1]['wall'] / prep[2]['wall']:.2f}x   (target >= 1.9x); "
              f"the pipeline alone (stats.json seconds: read to written files, without the checks and the "
              f"tokenizer's load before it): {prep[1]['pipeline'] / prep[2]['pipeline']:.2f}x; CPU seconds "
              f"{sum(prep[1]['cpu_s'].values()):.1f} at 1 CPU, {sum(prep[2]['cpu_s'].values()):.1f} at 2")
    if len(prep) > 1:
        a, b = prep[min(prep)], prep[max(prep)]
        print(f"   object store peak: {a['store_peak_mb']:.0f} MB at {min(prep)} CPU, {b['store_peak_mb']:.0f} MB at "
              f"{max(prep)} (bound: {_store_bound_mb(min(prep)):.0f} and {_store_bound_mb(max(prep)):.0f} MB of "
              "rendered blocks in flight)", flush=True)
    warm = {}
    if warm_run:
        warm = run_child("warm", cache, os.path.join(tmp, f"warm{records}"), *paths)
        print(f"   warm cache, a new run (other output folder and lr) on 2 nodes: first optimizer step after "
              f"{warm['first_step_s']:.1f} s from the call; cache hit: {warm['cache_hit']}; prepared anything: "
              f"{warm['prepared']}; its log: {' | '.join(warm['log'])}", flush=True)
    runs = bench_train(str(records), prep[max(prep)]["train_dir"], workers, steps, tmp) if workers else {}
    return {"records": records, "prepare": prep, "train": runs, "warm": warm}


def _store_bound_mb(cpus: int) -> float:
    """What prepare lets into the object store at once (pipeline/run.py): Ray Data's budget and one
    pending spill group per CPU plus the one being filled, a group being GROUP_BYTES and at most
    one block past them."""
    from chatsft.pipeline.run import BLOCK_BYTES, GROUP_BYTES, STORE_PER_CPU

    return (STORE_PER_CPU * cpus + (GROUP_BYTES + BLOCK_BYTES) * (cpus + 1)) / 2**20


def synthetic_rows(folder: Path, rows: int, seed: int = 0) -> str:
    """Prepared training rows written as prepare writes them (files of about TOKENS_PER_PART tokens,
    bounded row groups), random ids of log-normal lengths: the training side at a size whose
    prepare does not fit the time at hand."""
    import numpy as np
    import pyarrow as pa

    from chatsft import storage
    from chatsft.data.schema import IGNORE, UNPACKED
    from chatsft.pipeline.rows import list_array
    from chatsft.pipeline.shuffle import TOKENS_PER_PART, row_group_rows

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(300), 0.9, rows)), 8, 1024).astype(np.int64)
    out = folder / "train"
    out.mkdir(parents=True)
    start, part = 0, 0
    while start < rows:
        end = start + max(1, int(np.searchsorted(np.cumsum(lengths[start:]), TOKENS_PER_PART)))
        end = min(end, rows)
        ids = [rng.integers(3, 500, n, dtype=np.int32) for n in lengths[start:end]]
        labels = [np.where(np.arange(n) < n // 2, IGNORE, a).astype(np.int32) for a, n in zip(ids, lengths[start:end])]
        offsets = pa.array(np.arange(end - start + 1, dtype=np.int32))
        table = pa.Table.from_arrays(
            [list_array(ids), list_array(labels),
             pa.ListArray.from_arrays(offsets, pa.array([f"synthetic:{i + 1}" for i in range(start, end)]))],
            schema=UNPACKED)
        storage.write_parquet(str(out / f"part-{part:05d}.parquet"), table, row_group_rows(table))
        start, part = end, part + 1
    return str(out)


def bench_train(label: str, train_dir: str, workers: list[int], steps: int, tmp: str) -> dict:
    runs = {}
    for w in workers:
        r = runs[w] = run_child("train", str(w), str(steps), train_dir, os.path.join(tmp, f"train{label}_{w}"))
        share = r["bytes_total"] / w
        ratios = [b / share for b in r["bytes_read"]]
        slack = [(b - share) / r["largest_row_group"] for b in r["bytes_read"]]
        ok = all(b <= 1.1 * share + r["largest_row_group"] for b in r["bytes_read"])
        if r["steps"]:
            print(f"   train W={w}: first optimizer step after {r['first_step_s']:.1f} s, {r['steps']} steps in "
                  f"{r['wall']:.0f} s; driver peak RSS {r['driver_rss_mb']:.0f} MB, workers "
                  f"{', '.join(f'{x:.0f}' for x in r['worker_rss_mb'])} MB; object store peak "
                  f"{r['store_peak_mb']:.1f} MB", flush=True)
        else:
            print(f"   reads alone, W={w}:", flush=True)
        print(f"      in those steps each worker read {', '.join(f'{b / 1e6:.1f}' for b in r['bytes_read_steps'])} MB; "
              f"over a full epoch ({', '.join(f'{n:,}' for n in r['epoch_rows'])} rows, read in "
              f"{', '.join(f'{t:.0f}' for t in r['epoch_seconds'])} s by the trainer's reader alone, peak RSS "
              f"{', '.join(f'{x:.0f}' for x in r['reader_rss_mb'])} MB):", flush=True)
        print(f"      bytes read per worker / (total/W): {', '.join(f'{x:.3f}x' for x in ratios)} "
              f"(total {r['bytes_total'] / 1e6:.1f} MB over {r['row_groups']} row groups; over the share: "
              f"{', '.join(f'{s:+.2f}' for s in slack)} of the largest row group, "
              f"{r['largest_row_group'] / 1e6:.2f} MB)   (target <= 1.1x + one row group: "
              f"{'met' if ok else 'NOT met'})", flush=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--files", type=int, default=16, help="JSONL shards of a corpus")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of each training run (0: reads only)")
    ap.add_argument("--prepare-cpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prepare-only", action="store_true", help="prepare at 1 and 2 CPUs, no training runs")
    ap.add_argument("--synthetic-rows", type=int, nargs="*", default=[],
                    help="also train on this many synthetic prepared rows (no prepare): the training side alone")
    ap.add_argument("--no-warm", action="store_true", help="skip the run on a warm row cache")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare_only:
        args.workers = []
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        if kind == "prepare":
            out = child_prepare(int(rest[0]), rest[1], rest[2], rest[3:])
        elif kind == "warm":
            out = child_warm(rest[0], rest[1], rest[2:])
        else:
            out = child_train(int(rest[0]), int(rest[1]), rest[2], rest[3])
        print(json.dumps(out))
        return
    os.environ.setdefault("CHATSFT_CACHE", str(ROOT / ".cache" / "chatsft"))
    print(f"machine: {os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.1f} "
          "(other work on the machine slows wall times)")
    results = []
    with tempfile.TemporaryDirectory(prefix="chatsft-scale-") as tmp:
        for records in args.records:
            results.append(bench_size(records, args.files, args.workers, args.steps, args.prepare_cpus, tmp,
                                      warm_run=not args.no_warm))
        for rows in args.synthetic_rows:
            t0 = time.perf_counter()
            train_dir = synthetic_rows(Path(tmp) / f"synthetic{rows}", rows)
            print(f"\n== {rows:,} synthetic prepared rows (written in {time.perf_counter() - t0:.0f} s; no prepare)",
                  flush=True)
            runs = bench_train(f"s{rows}", train_dir, args.workers, args.steps, tmp)
            if results:
                base = results[0]["train"]
                print("   driver peak RSS vs the first corpus: " + ", ".join(
                    f"W={w} {runs[w]['driver_rss_mb'] / base[w]['driver_rss_mb']:.2f}x" for w in runs if w in base)
                    + "   (target <= 1.2x)")
    if len(results) > 1:
        a, b = results[0], results[-1]
        ca, cb = max(a["prepare"]), max(b["prepare"])
        print(f"\nobject store peak in prepare, {b['records']:,} vs {a['records']:,} conversations: "
              + ", ".join(f"{c} CPU {b['prepare'][c]['store_peak_mb'] / max(1e-9, a['prepare'][c]['store_peak_mb']):.2f}x"
                          for c in sorted(set(a["prepare"]) & set(b["prepare"]))) + "   (target <= 1.2x)")
        print(f"driver peak RSS, {b['records']:,} vs {a['records']:,} conversations: prepare "
              f"{b['prepare'][cb]['driver_rss_mb'] / a['prepare'][ca]['driver_rss_mb']:.2f}x", end="")
        common = sorted(set(a["train"]) & set(b["train"]))
        for w in common:
            print(f"; train W={w} {b['train'][w]['driver_rss_mb'] / a['train'][w]['driver_rss_mb']:.2f}x", end="")
        print("   (target <= 1.2x)")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
