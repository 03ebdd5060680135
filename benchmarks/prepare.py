"""Prepare throughput and packing, measured side by side in one run.

    python benchmarks/prepare.py                  # everything (a few minutes on 2 cores)
    python benchmarks/prepare.py --records 20000  # a smaller corpus (start-up weighs more)
    python benchmarks/prepare.py --only hf        # 4. alone: the hf template vs a built-in (seconds)

Prints, on the same texts:
1. raw `tokenizer(texts)` batch encode of the rendered texts, and `render_batch`
   (layout + encode + masks from the char -> token map) in one process: target render <= 1.3x raw.
   Both run single-threaded (TOKENIZERS_PARALLELISM=false, as in a render actor);
   times are the best of several rounds, in process CPU time (robust on a shared
   machine) and in wall time.
2. the Ray Data pipeline end to end (`prepare(plan, force=True)`: read, render,
   shuffle, write Parquet) in a subprocess pinned to 1 CPU core with
   ray.init(num_cpus=1), and to 2 cores with num_cpus=2: target 2-CPU >= 1.6x.
3. padding: best-fit-decreasing packing vs per-micro-batch padding on log-normal
   lengths (median 300 tokens, max_length 2048): target packed <= 3%.
4. `data.template: hf` against the built-in chatml on the same 5-turn conversations,
   `render_batch` in one process: the tokenizer's own chatml Jinja, a Qwen3-style
   template (think blocks, last-query scan), and the Gemma-4-style (thinking off and on)
   and Kimi-K2-style templates of the tests (tests/unit/chat_families.py; their markers
   added to the same tokenizer as special tokens): target hf <= 1.5x the built-in.

The corpus: conversations of the embedded sample generator, several joined into
one dialogue (a log-normal number of them) for a realistic spread of lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "tests" / "unit"))  # chat_families: the family templates the tests write
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def make_corpus(folder: Path, records: int, files: int = 8, seed: int = 0) -> list[str]:
    from chatsft.samples.generate import conversation

    rng = random.Random(seed)
    paths = []
    per_file = -(-records // files)
    made = 0
    for f in range(files):
        path = folder / f"part-{f}.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for _ in range(min(per_file, records - made)):
                k = min(12, max(1, round(rng.lognormvariate(0.8, 0.7))))
                messages = []
                for i in range(k):
                    messages += [m for m in conversation(rng)["messages"] if not (i and m["role"] == "system")]
                out.write(json.dumps({"messages": messages}) + "\n")
                made += 1
        paths.append(str(path))
    return paths


def best(fn, rounds: int) -> tuple[float, float]:
    """(best CPU seconds, best wall seconds) over rounds."""
    cpu, wall = float("inf"), float("inf")
    for _ in range(rounds):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu, wall = min(cpu, time.process_time() - c), min(wall, time.perf_counter() - w)
    return cpu, wall


def bench_render(paths: list[str], n: int, rounds: int) -> None:
    from chatsft.config import ModelConfig
    from chatsft.data.conversation import iter_lines, parse_line
    from chatsft.data.render import RenderOptions, layout, render_batch
    from chatsft.data.templates import get_template
    from chatsft.model import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    tpl = get_template("chatml", tok)
    convs = []
    for p in paths:
        for src, raw in iter_lines(Path(p).read_bytes(), p):
            convs.append(parse_line(raw, src))
            if len(convs) >= n:
                break
        if len(convs) >= n:
            break
    texts = [layout(c, tpl).text for c in convs]
    opts = RenderOptions(max_length=4096)
    batch = 256
    tokens = sum(len(ids) for i in range(0, len(texts), batch) for ids in tok(texts[i:i + batch])["input_ids"])

    def raw():
        for i in range(0, len(texts), batch):
            tok(texts[i:i + batch])

    def render():
        for i in range(0, len(convs), batch):
            render_batch(convs[i:i + batch], tok, tpl, opts)

    backend = tok.backend_tokenizer

    def rust_only():
        for i in range(0, len(texts), batch):
            backend.encode_batch(texts[i:i + batch], add_special_tokens=False)

    raw_t = best(raw, rounds)
    ren_t = best(render, rounds)
    rust_t = best(rust_only, rounds)
    lay_t = best(lambda: [layout(c, tpl) for c in convs], rounds)
    print(f"\n1. encode vs render, one process, {len(convs):,} conversations, {tokens:,} tokens "
          f"(batches of {batch}, best of {rounds})")
    for name, (c, w) in (("raw tokenizer(texts)", raw_t), ("render_batch (masks)", ren_t)):
        print(f"   {name:22s} {tokens / c / 1e3:8.0f} k tokens/s CPU   {tokens / w / 1e3:8.0f} k tokens/s wall")
    print(f"   render / raw time: {ren_t[0] / raw_t[0]:.2f}x CPU, {ren_t[1] / raw_t[1]:.2f}x wall   "
          f"(target <= 1.3x)")
    print(f"   CPU s: raw {raw_t[0]:.2f} = Rust encode_batch {rust_t[0]:.2f} + wrapper; render {ren_t[0]:.2f} "
          f"= that encode + template layout {lay_t[0]:.2f} + masks/rest {ren_t[0] - rust_t[0] - lay_t[0]:.2f}")


QWEN3_STYLE = (  # a reasoning template of the Qwen3 kind, written for this benchmark
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content if m.content is string else '' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{- '<think>\\n' + (m.reasoning_content or '').strip('\\n') + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def five_turn_corpus(n: int, seed: int = 0) -> list:
    """n conversations of exactly 5 user/assistant turns (sample conversations joined and cut)."""
    from chatsft.data.conversation import parse_record
    from chatsft.samples.generate import conversation

    rng = random.Random(seed)
    out = []
    while len(out) < n:
        msgs: list = []
        while sum(m["role"] == "assistant" for m in msgs) < 5:
            msgs += [m for m in conversation(rng)["messages"] if not (msgs and m["role"] == "system")]
        cut = [i for i, m in enumerate(msgs) if m["role"] == "assistant"][4]
        out.append(parse_record({"messages": msgs[: cut + 1]}, f"five:{len(out) + 1}"))
    return out


def with_template(tok, source: str, specials: tuple = (), added: tuple = ()):
    """A copy of the tokenizer with another chat template (and its markers as single tokens)."""
    import copy

    out = copy.deepcopy(tok)
    if specials:
        out.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in out.get_vocab()]})
    if added:
        out.add_tokens(list(added))
    out.chat_template = source
    return out


def bench_hf(n: int, rounds: int) -> dict:
    from chat_families import FAMILIES

    from chatsft.config import ModelConfig
    from chatsft.data.render import RenderOptions, layout, render_batch
    from chatsft.data.templates import get_template
    from chatsft.model import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    qwen = with_template(tok, QWEN3_STYLE)
    gemma = with_template(tok, FAMILIES["gemma4"].template, FAMILIES["gemma4"].specials)
    kimi = with_template(tok, FAMILIES["kimi"].template, FAMILIES["kimi"].specials, FAMILIES["kimi"].added)
    convs = five_turn_corpus(n)
    opts = RenderOptions(max_length=8192)
    batch = 256
    builtin = get_template("chatml", tok)
    runs = {"built-in chatml": (tok, builtin), "hf, the tokenizer's chatml Jinja": (tok, get_template("hf", tok)),
            "hf, a Qwen3-style template": (qwen, get_template("hf", qwen)),
            "hf, Gemma-4 style, thinking off": (gemma, get_template("hf", gemma)),
            "hf, Gemma-4 style, enable_thinking": (gemma, get_template("hf", gemma, None, {"enable_thinking": True})),
            "hf, Kimi-K2 style": (kimi, get_template("hf", kimi))}
    texts = [layout(c, builtin).text for c in convs]
    tokens = sum(len(e.ids) for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False))
    jobs, counts = {}, {}
    for name, (t, tpl) in runs.items():
        def render(t=t, tpl=tpl):
            for i in range(0, len(convs), batch):
                render_batch(convs[i:i + batch], t, tpl, opts)
        jobs[name] = render
        counts[name] = sum(len(s.input_ids) for r in render_batch(convs, t, tpl, opts) for s in r.samples)
        if tpl.name == "hf":  # the template's own Jinja, once per record: what no locator can save
            msgs = [[{"role": m.role, "content": m.content} for m in c.messages] for c in convs]
            jobs["jinja " + name] = lambda f=_jinja(t, tpl.info.get("chat_template_kwargs")), msgs=msgs: [
                f(m) for m in msgs]
    # Rounds interleave the variants, so a change in the machine's load hits them alike.
    times = {name: (float("inf"), float("inf")) for name in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            c, w = best(job, 1)
            times[name] = (min(times[name][0], c), min(times[name][1], w))
    jinja = {name[len("jinja "):]: times.pop(name)[0] for name in list(times) if name.startswith("jinja ")}
    base = times["built-in chatml"]
    print(f"\n4. data.template=hf vs built-in chatml, {len(convs):,} conversations of 5 turns, {tokens:,} tokens "
          f"(render_batch, batches of {batch}, best of {rounds})")
    for name, (c, w) in times.items():
        extra = f"; of which the template's Jinja alone {jinja[name]:.2f} s" if name in jinja else ""
        print(f"   {name:34s} {c:6.2f} s CPU  {counts[name] / c / 1e3:6.0f} k tokens/s   "
              f"{c / base[0]:.2f}x CPU, {w / base[1]:.2f}x wall the built-in{extra}")
    worst = max(c / base[0] for name, (c, _) in times.items() if name != "built-in chatml")
    print(f"   (target hf <= 1.5x the built-in; the slowest hf here: {worst:.2f}x CPU)")
    return times


def _jinja(tokenizer, extra=None):
    """One render of the template as apply_chat_template runs it, without that call's overhead."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    compiled = _compile_jinja_template(tokenizer.chat_template)
    kwargs = {**tokenizer.special_tokens_map, **(extra or {})}
    return lambda msgs: compiled.render(messages=msgs, tools=None, documents=None, add_generation_prompt=False,
                                        **kwargs)


def bench_pipeline(paths: list[str], cpus: int, out: str) -> dict:
    """Run prepare in a fresh process pinned to `cpus` cores with a Ray of num_cpus=cpus."""
    cmd = [sys.executable, __file__, "--child", str(cpus), out, *paths]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "platform"))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stdout[-3000:], res.stderr[-3000:])
        raise SystemExit(f"pipeline child with {cpus} CPUs failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def child(cpus: int, out: str, paths: list[str]) -> None:
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= cpus:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])  # Ray's processes inherit it
    import ray
    from ray.data import DataContext

    from chatsft.config import load_config
    from chatsft.pipeline import prepare
    from chatsft.plan import RunPlan

    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    DataContext.get_current().print_on_execution_start = False
    cfg = load_config(None, [f"run.output_dir={out}", f"data.train=[{', '.join(paths)}]",
                             "data.max_length=4096"])
    start = time.perf_counter()
    p = prepare(RunPlan.resolve(cfg), force=True)
    wall = time.perf_counter() - start
    ray.shutdown()
    st = p.train_stats
    print(json.dumps({"wall": wall, "pipeline": st["seconds"], "render": st["seconds_render"],
                      "tokens": st["tokens"], "samples": st["samples"], "rows": st["rows"]}))


def bench_packing(n: int, seed: int = 0) -> None:
    import numpy as np

    from chatsft.data.packing import fill_pad_fraction, pack_in_windows
    from chatsft.data.stats import batch_pad_fraction

    max_length, mb = 2048, 4
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(300), 0.9, n)), 1, max_length).astype(int).tolist()
    tokens = sum(lengths)
    print(f"\n3. padding, {n:,} samples, log-normal lengths (median {int(np.median(lengths))}, "
          f"mean {tokens / n:.0f}, {sum(x == max_length for x in lengths)} cut at {max_length})")
    print(f"   unpacked, each micro-batch of {mb} padded to its longest row: "
          f"{batch_pad_fraction(lengths, mb):6.1%}")
    print(f"   unpacked, every row padded to max_length {max_length}:        "
          f"{1 - tokens / (n * max_length):6.1%}")
    for window in (256, 1024, 8192):
        start = time.perf_counter()
        bins = pack_in_windows(lengths, max_length, window)
        took = time.perf_counter() - start
        sizes = [sum(lengths[i] for i in b) for b in bins]
        print(f"   packed (best-fit decreasing, window {window:5d}): {fill_pad_fraction(sizes, max_length):6.2%} "
              f"to max_length, {batch_pad_fraction(sizes, mb):6.2%} per micro-batch; {len(bins):,} rows, "
              f"{took:.2f} s   (target <= 3%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000, help="conversations in the pipeline corpus")
    ap.add_argument("--render-records", type=int, default=8000, help="conversations for the in-process part")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pack-samples", type=int, default=100_000)
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--only", choices=["hf"], help="run one comparison alone: hf = 4.")
    ap.add_argument("--hf-records", type=int, default=2000, help="5-turn conversations for 4.")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1], args.child[2:])
        return
    os.environ.setdefault("CHATSFT_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "chatsft"))
    if args.only == "hf":
        print(f"machine: {os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.1f}")
        bench_hf(args.hf_records, args.rounds)
        return
    print(f"machine: {os.cpu_count()} CPUs; load average at start {os.getloadavg()[0]:.1f} "
          "(other work on the machine slows wall times; CPU times are per process)")
    with tempfile.TemporaryDirectory(prefix="chatsft-bench-") as tmp:
        paths = make_corpus(Path(tmp), max(args.records, args.render_records))
        size = sum(os.path.getsize(p) for p in paths)
        print(f"corpus: {max(args.records, args.render_records):,} conversations, {size / 1e6:.0f} MB in "
              f"{len(paths)} files")
        bench_render(paths, args.render_records, args.rounds)
        if not args.skip_pipeline:
            runs = {c: bench_pipeline(paths, c, os.path.join(tmp, f"run{c}")) for c in (1, 2)}
            print(f"\n2. Ray Data pipeline end to end (prepare, force=True), {runs[1]['samples']:,} samples, "
                  f"{runs[1]['tokens']:,} tokens")
            for c, r in runs.items():
                print(f"   {c} CPU: {r['wall']:6.1f} s prepare() ({r['tokens'] / r['wall'] / 1e3:6.0f} k tokens/s); "
                      f"pipeline alone {r['pipeline']:6.1f} s ({r['tokens'] / r['pipeline'] / 1e3:6.0f} k tokens/s, "
                      f"of which read+render {r['render']:.1f} s)")
            print(f"   2 CPU / 1 CPU throughput: {runs[1]['wall'] / runs[2]['wall']:.2f}x prepare(), "
                  f"{runs[1]['pipeline'] / runs[2]['pipeline']:.2f}x pipeline   (target >= 1.6x)")
        bench_packing(args.pack_samples)
        bench_hf(args.hf_records, args.rounds)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
