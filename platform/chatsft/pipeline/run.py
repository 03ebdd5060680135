"""`prepare`: JSONL conversations -> shuffled (optionally packed) Parquet rows, stats and a mask preview.

The graph, in three phases (render, write, report):

    JsonlLines (raw lines + path:line)        read.py; local files read on the driver's node
      -> map_batches(Renderer), actors        render.py; parse, validate, render, mixture copies
      -> blocks, consumed as they come        each block carries its batches' stats rows
      -> spill tasks, one per group of blocks shuffle.spill_group: stats, first samples, and the
                                              samples sorted by the shuffle key, written as a run
                                              file to the output's storage (_spill/)
      -> one task per partition               shuffle.write_part: its key range of every run, sorted
                                              (or packed window by window), part-NNNNN.parquet
      -> report                               stats.json, mask_preview.html, bad_records.jsonl

Bounded memory: the object store holds rendered blocks in flight, never the
corpus. Ray Data's budget is STORE_PER_CPU x CPUs (its streaming executor holds
back reads and renders past it), its blocks are at most about BLOCK_BYTES (so a
task in flight holds a small block, not one the size of its file), and the
blocks it hands out are grouped by GROUP_BYTES and given to a spill task at
once, with at most one pending spill task per CPU: about (STORE_PER_CPU +
GROUP_BYTES + BLOCK_BYTES) x CPUs + GROUP_BYTES + BLOCK_BYTES, 56 MB per CPU
plus 24 MB (136 MB on 2 CPUs), whatever the corpus (benchmarks/scale.py
measures it; docs/architecture.md has the figures). What outgrows that goes to
the output's own storage (the cache's bucket, or the run's data folder) as
sorted runs, by design, not to the head node's spill directory.

The shuffle uses plain Ray tasks rather than Dataset.sort: the shuffle key is a
uniform hash, so fixed key ranges partition it evenly without a sampling pass,
and the partitions (hence the files) are the same whatever the number of blocks
or groups (a part's samples are the keys of its range in every run).

Row order is a pure function of the config and seed: every random decision is
a hash of (seed, path:line) and rows are written in the order of a sort on
those hashes, so the number of CPUs, actors and blocks never changes a row.

Where rows go: with `data.cache`, into a new attempt folder of the cache entry
of the content fingerprint, published by its manifest (pipeline/cache.py); a
run whose fingerprint is published prepares nothing. Without it, under
`<run.output_dir>/data/` with `prepare.json` naming the fingerprint.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from chatsft import storage
from chatsft.config import Config, ConfigError
from chatsft.data.conversation import BadRecord, Conversation, Message
from chatsft.data.render import RenderOptions, Sample
from chatsft.data.stats import MaskStats
from chatsft.data.template_report import REPORT_RECORDS, format_report, template_report
from chatsft.data.templates import TemplateError
from chatsft.errors import UserError, user_errors_unwrapped
from chatsft.pipeline import shuffle
from chatsft.pipeline import cache
from chatsft.pipeline.fingerprint import content_hashes, fingerprint, rows_identity
from chatsft.pipeline.render import FileRole, RenderSpec, Renderer
from chatsft.pipeline.rows import EVAL, SPLITS, TRAIN
from chatsft.plan import RunPlan
from chatsft.sources import SourceFile, expand_source, first_records, iter_records, unknown_format

@dataclass
class Prepared:
    """Where the prepared rows are and what stats.json says about them."""

    train_dir: str
    eval_dir: Optional[str]  # None when there is no eval split
    train_stats: dict
    eval_stats: Optional[dict]


@dataclass
class Checked:
    """What `check` found, for `prepare` to go on from: the files, the tokenizer and format,
    and the identity of the rows they make (the fingerprint's payload; checkpoints keep it)."""

    files: list[tuple[SourceFile, FileRole]]
    tokenizer: Any
    fmt: Any
    opts: RenderOptions
    identity: dict
    report: Optional[dict]  # the chat template's report over the first records (None: an encoder-decoder)


def check_prepare(plan: RunPlan) -> Checked:
    """Everything that can be told without Ray and without writing a file: the sources exist
    and are not empty, the format renders with this tokenizer, an answer fits in max_length,
    the first records of each split are good. Seconds, whatever the corpus."""
    from chatsft.model import load_tokenizer

    cfg = plan.config
    files = plan_files(cfg)
    tokenizer = load_tokenizer(cfg.model)
    opts = RenderOptions.from_config(cfg.data)
    fmt = plan.kind.format(cfg.data.template, tokenizer, opts.think, opts.chat_template_kwargs)
    check_renders(plan, fmt, opts)
    report = None
    if plan.kind.decoder_only:  # what the template will teach, read before anything is spent on it
        report = template_report(fmt.template, tokenizer, first_records(cfg.data.train, REPORT_RECORDS,
                                                                          opts.tool_arguments))
        print(format_report(report), flush=True)
    early_records(plan, files, fmt, opts)
    hashes = content_hashes([f for f, _ in files], bool(cfg.run.shared_storage))
    identity = rows_identity(cfg, plan.kind.name, [(SPLITS[r.split], r.weight, f) for f, r in files], hashes, tokenizer)
    return Checked(files, tokenizer, fmt, opts, identity, report)


def prepare(plan: RunPlan, *, force: bool = False, checked: Optional[Checked] = None) -> Prepared:
    """The rows of the run: from the row cache (data.cache) when its fingerprint is there, else
    prepared once and published to it; without a cache, under <run.output_dir>/data/, reusing
    fresh ones there (unless force). `checked`: `check_prepare(plan)`'s result, when the caller ran it."""
    checked = checked or check_prepare(plan)
    fp = fingerprint(checked.identity)
    has_eval = plan.eval_split != "none"
    if plan.config.data.cache:
        return _prepare_cached(plan, checked, plan.config.data.cache, fp)
    root = plan.data_dir
    if not force:
        reused = reuse(root, fp, has_eval)
        if reused is not None:
            print(f"chatsft prepare: reusing {root} (config, tokenizer and source contents unchanged)")
            return reused
    prepared = _run(plan, checked, root)
    storage.write_text(storage.join(root, "prepare.json"), json.dumps(
        {"fingerprint": fp, "train_dir": prepared.train_dir, "eval_dir": prepared.eval_dir,
         "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    return prepared


def _prepare_cached(plan: RunPlan, checked: Checked, store: str, fp: str) -> Prepared:
    """Take the cache's entry of `fp`, or prepare it into an attempt folder of our own and publish
    it. A lease on the entry is held while this process lives (`chatsft cache prune` skips it)."""
    has_eval = plan.eval_split != "none"
    found = cache.lookup(store, fp)
    if found is not None:
        cache.lease(store, fp)
        cache.touch(store, fp)
        m = found.manifest
        print(f"chatsft prepare: cache hit: {fp[:16]} in {store} ({m.get('records', 0):,} records, "
              f"{m.get('tokens', 0):,} tokens, published {_when(m.get('published'))}); nothing to prepare",
              flush=True)
        return _from_entry(found, has_eval)
    writing = cache.lease(store, fp, "write")
    attempt = cache.new_attempt(store, fp)
    print(f"chatsft prepare: {fp[:16]} is not in the cache {store}: preparing it once", flush=True)
    try:
        prepared = _run(plan, checked, attempt)
        records = sum(st["records_read"] for st in (prepared.train_stats, prepared.eval_stats) if st)
        tokens = sum(st["tokens"] for st in (prepared.train_stats, prepared.eval_stats) if st)
        entry = cache.publish(store, fp, attempt, {"records": records, "tokens": tokens, "has_eval": has_eval,
                                                   "identity": checked.identity})
    except BaseException:
        storage.remove(attempt)  # never published: nobody reads it
        cache.release(writing)
        raise
    cache.lease(store, fp)
    cache.release(writing)
    if entry.folder != attempt:
        print(f"chatsft prepare: another prepare published {fp[:16]} first; using its rows (the same bytes)",
              flush=True)
        return _from_entry(entry, has_eval)
    print(f"chatsft prepare: published {fp[:16]} to the cache {store}", flush=True)
    return prepared


def _from_entry(entry: "cache.Entry", has_eval: bool) -> Prepared:
    got = _read_dir(entry.folder, has_eval)
    if got is None:
        raise UserError(f"data.cache: the entry {entry.folder} lost its stats.json since it was looked up")
    return got


def _when(t: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "at an unknown time"


# --------------------------------------------------------------------------- checks


def plan_files(cfg: Config) -> list[tuple[SourceFile, FileRole]]:
    """Every file of every source in config order, with its split and mixture weight."""
    carve = not cfg.data.eval and cfg.data.eval_fraction > 0
    out = []
    for key, sources, split in (("data.train", cfg.data.train, TRAIN), ("data.eval", cfg.data.eval, EVAL)):
        for i, src in enumerate(sources):
            found = expand_source(src.path, src.format)
            if not found:
                raise UserError(f"{key}[{i}].path: no JSONL or Parquet file matches {src.path!r}")
            unknown = unknown_format(found, f"{key}[{i}]")
            if unknown:
                raise UserError(unknown)
            for f in found:
                out.append((f, FileRole(f.display, split, src.weight, carve and split == TRAIN)))
    for key, split in (("data.train", TRAIN), ("data.eval", EVAL)):
        mine = [f for f, r in out if r.split == split]
        empty = [f.display for f in mine if f.size == 0]
        if mine and len(empty) == len(mine):
            raise UserError(f"{key}: {_names(empty)} {'is' if len(empty) == 1 else 'are'} empty (0 bytes): "
                            "no records to learn from")
        if empty:
            print(f"chatsft prepare: note: {_names(empty)} {'is' if len(empty) == 1 else 'are'} empty (0 bytes)")
    return out


def _names(paths: list[str], most: int = 3) -> str:
    shown = ", ".join(paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


EARLY_RECORDS = 256  # records of each split's first file rendered on the driver before Ray starts


def check_renders(plan: RunPlan, fmt: Any, opts: RenderOptions) -> None:
    """Fail on a config problem (template, tokenizer, a max_length no answer fits) here,
    before any worker starts."""
    probe = Conversation((Message("user", "hi"), Message("assistant", "hello")), "preflight")
    (result,) = fmt.render([probe], opts)
    if isinstance(result, BadRecord):
        raise TemplateError(f"data.template={plan.config.data.template.value}: it cannot render even a "
                            f"one-word exchange ({result.reason}: {result.detail})")
    if not result.samples:
        # The shortest dialogue there is: if its answer does not fit, no record's does.
        (whole,) = fmt.render([probe], RenderOptions(opts.organization, opts.train_on, think=opts.think))[0].samples
        raise ConfigError(f"data.max_length={opts.max_length}: no answer can fit; the shortest possible exchange "
                          f"(one word each) takes {len(whole)} tokens in the {fmt.name} format")


def early_records(plan: RunPlan, files: list[tuple[SourceFile, FileRole]], fmt: Any, opts: RenderOptions) -> None:
    """Render the first records of each split's first file here, before Ray starts: under
    on_bad_record=error the first bad record of the corpus, if it is among them, stops the run
    in seconds (the first file comes first in file order); a first batch in which nothing at
    all can be learned gets a warning that names the file and the reasons."""
    from chatsft.data.conversation import parse_line

    for split in (TRAIN, EVAL):
        first = next((f for f, r in files if r.split == split and f.size > 0), None)
        if first is None:
            continue
        convs, bad = [], []
        for n, raw in iter_records(first):
            try:
                convs.append(parse_line(raw, f"{first.display}:{n}", opts.tool_arguments))
            except BadRecord as e:
                bad.append(e)
            if len(convs) + len(bad) >= EARLY_RECORDS:
                break
        outcomes = fmt.render(convs, opts)
        bad += [o for o in outcomes if isinstance(o, BadRecord)]
        if bad and plan.config.data.on_bad_record == "error":
            raise min(bad, key=lambda e: int(e.source.rsplit(":", 1)[1]))
        results = [o for o in outcomes if not isinstance(o, BadRecord)]
        if convs and not any(r.samples for r in results):
            reasons = Counter(e.reason for e in bad)
            for r in results:
                reasons.update(r.dropped)
            print(f"chatsft prepare: warning: none of the first {len(convs) + len(bad)} records of {first.display} "
                  f"gives a sample to learn from ({', '.join(f'{k} {v}' for k, v in reasons.most_common())})",
                  flush=True)


def reuse(root: str, fp: str, has_eval: bool) -> Optional[Prepared]:
    meta = storage.read_json(storage.join(root, "prepare.json"))
    if meta is None or meta.get("fingerprint") != fp:
        return None
    return _read_dir(root, has_eval)


def _read_dir(root: str, has_eval: bool) -> Optional[Prepared]:
    """The Prepared of a folder of train/ (and eval/) rows with their stats.json."""
    train_stats = storage.read_json(storage.join(root, "train", "stats.json"))
    eval_stats = storage.read_json(storage.join(root, "eval", "stats.json")) if has_eval else None
    if train_stats is None or (has_eval and eval_stats is None):
        return None
    return Prepared(storage.join(root, "train"), storage.join(root, "eval") if has_eval else None,
                    train_stats, eval_stats)


# ----------------------------------------------------------------------------- run


@dataclass(frozen=True)
class BadExample:
    """One bad record as the render stage reports it (its first `data.bad_examples` of a batch)."""

    file_idx: int
    line: int
    split: int
    example: dict  # source, reason, detail, the start of the raw line: a line of bad_records.jsonl

    def error(self) -> BadRecord:
        return BadRecord(self.example["reason"], self.example["detail"], self.example["source"])


@dataclass
class Rendered:
    """What the render phase leaves: counts, bad records, the first samples of each split, and
    each split's sorted runs spilled to the output's storage (one file per group of blocks)."""

    stats: dict[int, MaskStats]
    bad: list[BadExample]  # in file order
    previews: dict[int, list[dict]]
    runs: dict[int, list[str]]
    spill: str  # the folder of the runs, removed once the parts are written
    seconds: float  # from the start of the pipeline to the last run spilled


# Ray Data's object store budget for rendering, per CPU of the cluster, the most bytes of one block,
# and the rendered bytes one spill task takes: together they bound what prepare holds in the object
# store (see _render).
STORE_PER_CPU = 32 << 20
GROUP_BYTES = 16 << 20
# Ray Data's own block size (DataContext.target_max_block_size, 128 MiB by default) merges what a
# read task yields into blocks of up to that size: a read task made its whole file (or 64 MiB range)
# one block, and the render task of that block one block of about twice its bytes. Its budget stops
# new tasks, never a running one, so every task in flight held a block that grew with the files
# (and so with the corpus) until the cap. Small blocks keep a task's output a small step.
BLOCK_BYTES = 8 << 20


def _run(plan: RunPlan, checked: Checked, root: str) -> Prepared:
    from chatsft.raysetup import ensure_ray

    ensure_ray()
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    with bounded_blocks(cpus), user_errors_unwrapped():  # a user error raised in a Ray worker comes back wrapped
        return _execute(plan, checked, root, cpus)


@contextmanager
def bounded_blocks(cpus: int) -> Iterator[None]:
    """Ray Data's settings for the datasets made inside: blocks in order, its object store budget
    STORE_PER_CPU x `cpus`, blocks of at most about BLOCK_BYTES; the caller's settings come back after."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.execution_options.resource_limits, ctx.target_max_block_size
    # Blocks in order: the first blocks hold the first records of the files (previews, the first
    # bad record), and group g of blocks is the g-th run of the stream.
    ctx.execution_options.preserve_order = True
    ctx.execution_options.resource_limits = saved[1].copy(object_store_memory=STORE_PER_CPU * cpus)
    ctx.target_max_block_size = BLOCK_BYTES
    try:
        yield
    finally:
        (ctx.execution_options.preserve_order, ctx.execution_options.resource_limits,
         ctx.target_max_block_size) = saved


def _execute(plan: RunPlan, checked: Checked, root: str, cpus: int) -> Prepared:
    """The three phases: render (and spill), write the parts, report."""
    started = time.time()  # stats.json times the pipeline itself, not Ray's or the tokenizer's start-up
    rendered = _render(plan, checked, root, cpus)
    _refuse(plan, checked, rendered)
    print(f"chatsft prepare: rendered in {rendered.seconds:.1f} s; shuffling"
          f"{' and packing' if plan.config.data.packing else ''} into Parquet files", flush=True)
    lengths = _write(plan, rendered, root)
    now = time.time()
    seconds = {"seconds": now - started, "seconds_render": rendered.seconds,
               "seconds_shuffle_write": now - started - rendered.seconds}
    prepared = _report(plan, checked, root, rendered, lengths, seconds)
    print(summary(prepared, plan.config.data.on_bad_record))
    return prepared


def _render(plan: RunPlan, checked: Checked, root: str, cpus: int) -> Rendered:
    """Read and render the sources with Ray Data, and spill the rendered samples as they come.

    Memory: Ray Data keeps at most STORE_PER_CPU x CPUs of blocks in the object store (its
    streaming executor holds back reads and renders past that budget), each block about
    BLOCK_BYTES at most (bounded_blocks), and this loop hands each
    run of GROUP_BYTES of consecutive blocks to a spill task at once, with at most one pending
    spill task per CPU: the object store holds those, never the corpus. Each spill task sorts
    its samples by the shuffle key and writes them to the output's own storage (a sorted run),
    which the write phase reads back by key range."""
    import ray
    from ray.data import read_datasource

    from chatsft.pipeline.read import make_datasource, plan_units

    started = time.time()
    cfg = plan.config
    files, tokenizer, opts = checked.files, checked.tokenizer, checked.opts
    data = cfg.data
    spec = RenderSpec(model=cfg.model, template=getattr(data.template, "value", data.template),
                      options=opts, kind=plan.kind,
                      seed=cfg.run.seed, eval_fraction=data.eval_fraction,
                      files=tuple(r for _, r in files), bad_examples=data.bad_examples,
                      tokenizer=tokenizer if _pickles(tokenizer) else None)
    concurrency = data.map_concurrency or (1, cpus)
    # Reading lines is I/O and costs little next to rendering them. The read tasks reserve no
    # CPU: with one render actor per CPU, a read task that waited for a free CPU would wait forever.
    # Without a CPU to count, their number is capped here instead: one per 4 CPUs (reading costs
    # about 1/200 of rendering what it reads for JSONL, 1/20 for Parquet rows; each reader is a
    # process to start, so a small cluster gets one; local reads all run on the driver's node).
    sources = [f for f, _ in files]
    shared = bool(cfg.run.shared_storage)
    units = plan_units(sources, lambda asked: _count_newlines(sources, asked, shared),
                       groups=lambda asked: _row_groups(sources, asked, shared))
    readers = min(len(units), 64)  # read tasks, each a run of files or byte ranges; each streams in blocks
    lines = read_datasource(make_datasource(sources, units, shared), num_cpus=0, override_num_blocks=readers,
                            concurrency=min(readers, max(1, cpus // 4)))
    rendered = lines.map_batches(Renderer, fn_constructor_args=(spec,), batch_size=data.map_batch_size,
                                 batch_format="pyarrow", compute=_actor_pool(concurrency), num_cpus=1)
    spill = storage.join(root, "_spill")
    storage.remove(spill)
    # No CPU reserved: the render actors hold every CPU until the last block is rendered, and a spill
    # task waiting for one would stop this loop, hence the stream (the pending ones are capped instead).
    task = ray.remote(num_cpus=0)(shuffle.spill_group).options(**_write_placement(root))
    splits = [TRAIN, EVAL] if plan.eval_split != "none" else [TRAIN]
    pending: dict[Any, int] = {}
    gathered = _Gathered(splits, data.preview_samples, data.bad_examples)
    group: list = []
    size = 0
    groups = 0

    def submit() -> None:
        nonlocal group, size, groups
        pending[task.remote(spill, groups, splits, data.preview_samples, *group)] = groups
        group, size, groups = [], 0, groups + 1
        while len(pending) > cpus:
            collect(1)

    def collect(n: int) -> None:
        done, _ = ray.wait(list(pending), num_returns=n)
        for ref in done:
            gathered.add(pending.pop(ref), ray.get(ref))

    for bundle in rendered.iter_internal_ref_bundles():
        for ref, meta in zip(bundle.block_refs, bundle.metadata):
            group.append(ref)
            size += meta.size_bytes or 0
            if size >= GROUP_BYTES:
                submit()
        del bundle
    if group:
        submit()
    if pending:
        collect(len(pending))
    assert not gathered.waiting, "a spill group's result never came"
    return Rendered(gathered.stats, gathered.bad, gathered.previews, gathered.runs, spill, time.time() - started)


def _refuse(plan: RunPlan, checked: Checked, rendered: Rendered) -> None:
    """on_bad_record=error: the first bad record in file order; a split left with no samples."""
    if rendered.bad and plan.config.data.on_bad_record == "error":
        storage.remove(rendered.spill)
        raise rendered.bad[0].error()
    for split in ([TRAIN, EVAL] if plan.eval_split != "none" else [TRAIN]):
        st = rendered.stats[split]
        if st.samples == 0:
            storage.remove(rendered.spill)
            raise UserError(_nothing_left(split, st, plan.config,
                                          [f.display for f, r in checked.files if r.split == split or r.carve]))


def _write(plan: RunPlan, rendered: Rendered, root: str) -> dict[int, list]:
    """Cut each split into parts by key range, pack or sort each, write part-NNNNN.parquet: one task
    a part, reading its key range of every spilled run. Returns each part's pad summaries."""
    import ray

    cfg, data = plan.config, plan.config.data
    for name in ("prepare.json", "train", "eval"):
        storage.remove(storage.join(root, name))  # stale rows must never mix with new ones
    plans = [shuffle.plan_split(s, rendered.stats[s].samples, rendered.stats[s].tokens, data.packing,
                                data.pack_window, data.max_length, cfg.run.seed, storage.join(root, SPLITS[s]))
             for s in rendered.runs]
    for split_plan in plans:
        storage.make_dirs(split_plan.folder)
    write = ray.remote(num_cpus=1)(shuffle.write_part).options(**_write_placement(root))
    pending = {sp.split: [write.remote(sp, p, cfg.train.micro_batch_size, rendered.runs[sp.split])
                          for p in range(sp.parts)] for sp in plans}
    lengths = {s: ray.get(refs) for s, refs in pending.items()}
    storage.remove(rendered.spill)
    return lengths


def _report(plan: RunPlan, checked: Checked, root: str, rendered: Rendered, lengths: dict[int, list],
            seconds: dict) -> Prepared:
    """stats.json, the mask preview, the template report and bad_records.jsonl of each split."""
    cfg, data = plan.config, plan.config.data
    splits = list(lengths)
    all_tokens = sum(rendered.stats[s].tokens for s in splits)
    out: dict[int, dict] = {}
    for split in splits:
        folder = storage.join(root, SPLITS[split])
        d = split_stats(rendered.stats[split], lengths[split], cfg, plan.kind, seconds, all_tokens)
        if checked.report is not None:
            d["template"] = checked.report
            d["serving_parity"] = checked.report["serving_parity"]["share"]  # a number: an MLflow metric
            storage.write_text(storage.join(folder, "template_report.txt"), format_report(checked.report) + "\n")
        storage.write_text(storage.join(folder, "stats.json"), json.dumps(d, indent=2, ensure_ascii=False) + "\n")
        storage.write_text(storage.join(folder, "mask_preview.html"),
                           _preview_html(checked.tokenizer, rendered.previews[split], plan.kind, SPLITS[split]))
        mine = [b.example for b in rendered.bad if b.split == split][: data.bad_examples]
        if mine:
            storage.write_text(storage.join(folder, "bad_records.jsonl"),
                               "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in mine))
        out[split] = d
    return Prepared(storage.join(root, "train"), storage.join(root, "eval") if EVAL in out else None,
                    out[TRAIN], out.get(EVAL))


def _pickles(obj: Any) -> bool:
    import pickle

    try:
        pickle.dumps(obj)
        return True
    except Exception:  # e.g. a remote-code tokenizer holding a handle: actors load their own
        return False


def _actor_pool(concurrency: Any) -> Any:
    from ray.data import ActorPoolStrategy

    if isinstance(concurrency, tuple):
        return ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    return ActorPoolStrategy(size=concurrency)


def _write_placement(root: str) -> dict:
    """A local output folder is on the driver's disk: its files are written there."""
    return _on_driver_node() if storage.is_local(root) else {}


def _on_driver_node() -> dict:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                  soft=False)}


def _where_files_are(fn: Any, files: list[SourceFile], indices: list[int], shared: bool) -> Any:
    """`fn` as a Ray task that runs where the files of `indices` are: on the driver's node when
    one of them is on its disk and other nodes do not see it (run.shared_storage off)."""
    import ray

    task = ray.remote(num_cpus=1)(fn)
    if not shared and any(files[fi].local for fi in indices):
        task = task.options(**_on_driver_node())
    return task


def _count_newlines(files: list[SourceFile], asked: list[tuple[int, int, int]], shared: bool) -> list[int]:
    """Newlines of each (file, start, end) range, counted by Ray tasks where the files are."""
    import ray

    from chatsft.pipeline.read import count_newlines

    task = _where_files_are(count_newlines, files, [fi for fi, _, _ in asked], shared)
    return ray.get([task.remote(files[fi].location, a, b) for fi, a, b in asked])


def _row_groups(files: list[SourceFile], asked: list[int], shared: bool) -> list[list[tuple[int, int]]]:
    """(rows, bytes) of every row group of each asked Parquet file, read from its footer by Ray
    tasks where the files are (the driver keeps the counts only)."""
    import ray

    from chatsft.pipeline.read import row_groups

    task = _where_files_are(row_groups, files, asked, shared)
    return ray.get([task.remote(files[fi].location, files[fi].display) for fi in asked])


class _Gathered:
    """The spill groups' results, folded in group order as they come: the driver keeps the counts,
    the first bad records of each split in file order, the first preview samples and the run paths,
    not each batch's statistics (a list that grew with the corpus); results that come before an
    earlier group's wait (at most one per pending spill task)."""

    def __init__(self, splits: list[int], preview: int, bad_examples: int):
        self.stats = {TRAIN: MaskStats(), EVAL: MaskStats()}
        self.bad: list[BadExample] = []  # in file order
        self.previews: dict[int, list[dict]] = {s: [] for s in splits}
        self.runs: dict[int, list[str]] = {s: [] for s in splits}
        self.waiting: dict[int, dict] = {}
        self._next = 0
        self._preview, self._bad_kept = preview, max(1, bad_examples)

    def add(self, g: int, result: dict) -> None:
        self.waiting[g] = result
        while self._next in self.waiting:
            self._fold(self.waiting.pop(self._next))
            self._next += 1

    def _fold(self, result: dict) -> None:
        for text in result["stats"]:
            part = json.loads(text)
            for split, name in SPLITS.items():
                self.stats[split].merge(MaskStats.from_dict(part["stats"][name]))
            self.bad.extend(BadExample(*b) for b in part["bad"])
        self.bad.sort(key=lambda b: (b.file_idx, b.line))  # file order: the first bad record is the one to name
        kept: Counter = Counter()
        first = []
        for b in self.bad:  # the first bad_examples of each split
            kept[b.split] += 1
            if kept[b.split] <= self._bad_kept:
                first.append(b)
        self.bad = first
        for s, mine in self.previews.items():
            mine.extend(result["preview"][s][: self._preview - len(mine)])
            if result["runs"][s]:
                self.runs[s].append(result["runs"][s])


# --------------------------------------------------------------------------- reports


def split_stats(st: MaskStats, parts: list[tuple[dict, dict]], cfg: Config, kind: Any,
                seconds: dict, all_tokens: int) -> dict:
    """stats.json of one split.

    pad_fraction is the padding the trainer will add: rows are read in their
    stored order in micro-batches of train.micro_batch_size, and each micro-batch
    is padded to its longest row; pad_fraction = 1 - tokens / padded slots. For
    packed rows, pad_fraction_to_max_length is the padding if every row were
    padded to data.max_length (static shapes). The model's kind says what is padded
    (an encoder-decoder pads encoder and decoder tensors separately, and both count).

    seconds: wall time of the pipeline for both splits, read through written
    files (seconds_render: reading and rendering; seconds_shuffle_write: the
    rest), not counting Ray's or the driver's tokenizer start-up;
    tokens_per_second: the tokens of both splits over seconds.
    """
    mb = cfg.train.micro_batch_size
    inputs, labels = [p[0] for p in parts], [p[1] for p in parts]  # pad summaries of the parts, in order
    rows = sum(p["n"] for p in inputs)
    tokens, slots = kind.padding(inputs, labels, mb)
    d = st.to_dict()
    d.update({
        "rows": rows,
        "packing": bool(cfg.data.packing),
        "max_length": cfg.data.max_length,
        "pad_fraction": float(1 - tokens / slots) if slots else 0.0,
        "pad_micro_batch_size": mb,
        "pad_definition": f"1 - tokens / slots when rows are read in stored order in micro-batches of "
                          f"{mb}, each padded to its longest row",
        **{k: round(v, 3) for k, v in seconds.items()},
        "tokens_per_second": round(all_tokens / seconds["seconds"], 1) if seconds["seconds"] > 0 else 0.0,
    })
    if cfg.data.packing:
        d["pad_fraction_to_max_length"] = float(1 - tokens / (rows * cfg.data.max_length)) if rows else 0.0
        d["sequences_per_row"] = st.samples / rows if rows else 0.0
    return d


def _nothing_left(split: int, st: MaskStats, cfg: Config, paths: list[str]) -> str:
    key = "data.train" if split == TRAIN else ("data.eval" if cfg.data.eval else "data.eval_fraction")
    bad = ", ".join(f"{k} {v}" for k, v in sorted(st.bad_by_reason.items())) or "none"
    return (f"{key} ({_names(paths)}): no {SPLITS[split]} samples left: {st.records_read} records read, "
            f"{st.records_bad} bad "
            f"({bad}), {st.dropped_no_supervision} dropped with no supervised token, "
            f"{st.dropped_too_long} dropped as too long")


def _preview_html(tokenizer: Any, rows: list[dict], kind: Any, name: str) -> str:
    from chatsft.data.preview import to_html

    samples = [kind.shown(Sample(np.asarray(r["input_ids"], np.int32), np.asarray(r["labels"], np.int32),
                                 r["source"], truncated=bool(r["truncated"]))) for r in rows]
    return to_html(tokenizer, samples, title=f"chatsft mask preview: {name} (first records in file order)")


def summary(p: Prepared, on_bad_record: str) -> str:
    """The one-screen report printed at the end."""
    lines = []
    for name, folder, st in (("train", p.train_dir, p.train_stats), ("eval", p.eval_dir, p.eval_stats)):
        if st is None:
            continue
        bad = ", ".join(f"{k} {v}" for k, v in st["bad_by_reason"].items()) or "none"
        noted = ", ".join(f"{k} {v}" for k, v in st.get("notes_by_reason", {}).items())
        lines += [
            f"{name}: {folder}",
            f"  records read {st['records_read']:,}   bad {st['records_bad']:,} ({bad})"
            + ("   [skipped: on_bad_record=skip; examples in bad_records.jsonl]"
               if st["records_bad"] and on_bad_record == "skip" else "")
            + (f"   kept but noted: {noted}" if noted else ""),
            f"  samples {st['samples']:,}   rows {st['rows']:,}"
            + (f" (packed, {st['sequences_per_row']:.1f} per row)" if st["packing"] else "")
            + f"   tokens {st['tokens']:,}   supervised {st['supervised_tokens']:,} "
              f"({st['supervision_ratio']:.1%})",
            f"  truncated {st['truncated_samples']:,}   dropped: no supervised token "
            f"{st['dropped_no_supervision']:,}, too long {st['dropped_too_long']:,}",
            f"  pad fraction {st['pad_fraction']:.1%} (micro-batches of {st['pad_micro_batch_size']}, "
            f"each padded to its longest row)"
            + (f"; {st['pad_fraction_to_max_length']:.1%} if padded to max_length {st['max_length']}"
               if st["packing"] else ""),
        ]
    t = p.train_stats
    lines.append(f"done in {t['seconds']:.1f} s, {t['tokens_per_second']:,.0f} tokens/s; "
                 f"files: *.parquet, stats.json, template_report.txt, mask_preview.html")
    return "\n".join(lines)
