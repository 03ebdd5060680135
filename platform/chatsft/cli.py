"""The `chatsft` command: `chatsft VERB CONFIG.yaml [section.key=value ...]`.

Each verb loads the config, then hands over to the module that does the work.
Errors a user can cause end in one line naming the cause and where it is
(file:line or config key) and exit code 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from chatsft.config import Config, describe, load_config
from chatsft.data.conversation import BadRecord
from chatsft.data.template_report import REPORT_RECORDS
from chatsft.errors import UserError, one_line, user_error_in


def _prepare(cfg: Config, args: argparse.Namespace) -> None:
    from chatsft.pipeline import prepare
    from chatsft.plan import RunPlan

    prepare(RunPlan.resolve(cfg), force=True)  # with data.cache: warms it (a published entry is kept)


def _train(cfg: Config, args: argparse.Namespace) -> None:
    from chatsft.train.driver import train

    train(cfg, local=args.local)


def _sweep(cfg: Config, args: argparse.Namespace) -> None:
    from chatsft.sweep import sweep

    sweep(cfg)


def _eval(cfg: Config, args: argparse.Namespace) -> None:
    """`chatsft eval CONFIG [--model PATH]`: the validation loss over the run's prepared eval
    rows (prepared if missing or stale) and the eval.tasks scores, as a table."""
    from chatsft.eval.evaluate import TaskRun, evaluate_model, format_metrics, load_for_eval
    from chatsft.eval.tasks import tasks_from_config
    from chatsft.plan import RunPlan

    plan = RunPlan.resolve(cfg)
    tasks = tasks_from_config(cfg)  # a bad task spec fails before the model loads
    path = args.model or plan.model_dir
    model, tokenizer = load_for_eval(path, cfg)
    metrics: dict[str, float] = {}
    if plan.eval_split != "none":
        metrics["eval_loss"] = _eval_loss(plan, model, tokenizer)
    runs: list[TaskRun] = []
    metrics.update(evaluate_model(model, tokenizer, cfg, tasks, runs=runs))
    for run in runs:
        for ex, outs, scores in list(zip(run.examples, run.outputs, run.scores))[:3]:
            mark = "ok " if scores[0] >= 0.5 else "bad"
            print(f"[{run.task}] {mark} {ex.source}\n    reference: {ex.reference!r}\n    output:    {outs[0]!r}")
    print(format_metrics(metrics, title=f"eval of {path}"))


def _eval_loss(plan, model, tokenizer) -> float:
    """eval_loss as training measures it: chatsft.eval.loss over the prepared eval rows."""
    from chatsft.data.schema import iter_rows
    from chatsft.eval.generation import model_device
    from chatsft.eval.loss import loss_sums
    from chatsft.model import load_tokenizer
    from chatsft.model.batch import pad_id
    from chatsft.model.loss import loss_function
    from chatsft.model.tokenizer import same_vocabulary
    from chatsft.pipeline import prepare
    from chatsft.train.data import file_batches

    if not same_vocabulary(tokenizer, load_tokenizer(plan.config.model)):
        raise UserError(f"eval: the model's tokenizer is not model.name_or_path's "
                        f"({plan.config.model.name_or_path}), which the eval rows are tokenized with; "
                        "set model.name_or_path (or model.tokenizer) to the model's own")
    prepared = prepare(plan)
    loss, _ = loss_function(model, plan.config.train.loss_head, plan.config.train.loss_chunk,
                            device=model_device(model))
    total, count = loss_sums(lambda inputs: model(**inputs), iter_rows(file_batches(prepared.eval_dir)()),
                             loss=loss,
                             micro_batch=plan.config.train.micro_batch_size,
                             collate=plan.kind.batcher(pad_id(tokenizer), model),
                             device=model_device(model))
    return total / count if count else float("nan")


def _inspect(cfg: Config, args: argparse.Namespace) -> None:
    """Render the first samples of the first train source and show what each token teaches."""
    from chatsft.data.preview import to_html, to_terminal, weights_table
    from chatsft.data.render import RenderOptions
    from chatsft.data.stats import sample_stats, turn_weights
    from chatsft.model import load_tokenizer
    from chatsft.plan import RunPlan
    from chatsft.sources import read_local

    plan = RunPlan.resolve(cfg)
    tokenizer = load_tokenizer(cfg.model)
    opts = RenderOptions.from_config(cfg.data)
    fmt = plan.kind.format(cfg.data.template, tokenizer, opts.think, opts.chat_template_kwargs)
    color = sys.stdout.isatty()
    shown = []
    for item in read_local(cfg.data.train[0].path, limit=args.num, declared=cfg.data.train[0].format,
                           tool_arguments=opts.tool_arguments):
        if isinstance(item, BadRecord):
            print(f"bad record: {item.message}")
            continue
        (result,) = fmt.render([item], opts)
        if isinstance(result, BadRecord):
            print(f"bad record: {result.message}")
            continue
        print(f"== {item.source}  ({fmt.name}, {opts.organization.value}, train_on={opts.train_on.value})")
        for s in result.samples:
            st = sample_stats(s)
            print(f"-- {s.source}: {st['tokens']} tokens, {st['supervised']} supervised "
                  f"({st['ratio']:.0%}){', truncated' if s.truncated else ''}")
            print(to_terminal(tokenizer, plan.kind.shown(s), color=color))
        for reason, n in result.dropped.items():
            print(f"-- dropped {n} sample(s): {reason}")
        if plan.kind.decoder_only:  # an encoder-decoder sample is one answer: there are no turns to weigh
            print(weights_table(turn_weights(result.samples, "token"), "per-turn loss weight, token mean (trained)"))
            print(weights_table(turn_weights(result.samples, "sample"), "per-turn loss weight, per-sample mean"))
        print()
        shown += [plan.kind.shown(s) for s in result.samples]
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(to_html(tokenizer, shown))
        print(f"wrote {args.html}")


def _template(cfg: Config, args: argparse.Namespace) -> None:
    """What the chat template will teach: strategy, stops, think policy, learned tokens by role, refusals."""
    from chatsft.data.template_report import format_report, template_report
    from chatsft.pipeline.rows import TRAIN
    from chatsft.pipeline.run import plan_files
    from chatsft.sources import first_records
    from chatsft.data.templates import get_template
    from chatsft.model import load_tokenizer
    from chatsft.plan import RunPlan

    if not RunPlan.resolve(cfg).kind.decoder_only:
        print("chat template: none (an encoder-decoder model: the history goes to the encoder, each answer "
              "to the decoder)")
        return
    files = plan_files(cfg)  # the sources exist, are not all empty and have a format
    records = list(first_records(cfg.data.train, args.num, cfg.data.tool_arguments))
    if not records:
        shown = ", ".join(f.display for f, role in files if role.split == TRAIN)
        raise UserError(f"data.train: {shown} hold no records (blank lines only): there is nothing to report on")
    tokenizer = load_tokenizer(cfg.model)
    template = get_template(cfg.data.template, tokenizer, cfg.data.think, cfg.data.chat_template_kwargs)
    report = template_report(template, tokenizer, records)
    print(format_report(report))


def _export(cfg: Config, args: argparse.Namespace) -> None:
    from chatsft.plan import RunPlan
    from chatsft.train.export import export_cli

    export_cli(RunPlan.resolve(cfg), checkpoint=args.checkpoint, out=args.out, adapter_only=args.adapter_only,
               force=args.force)


def _cache(cfg: Config, args: argparse.Namespace) -> None:
    """`chatsft cache list|prune CONFIG`: the entries of the config's data.cache."""
    import time

    from chatsft.pipeline import cache

    root = cfg.data.cache
    if not root:
        raise UserError("data.cache: not set in this config (a bucket prefix or a shared folder), so there is "
                        "no row cache to list or prune")
    if args.action == "prune":
        removed, in_use = cache.prune(root, args.unused_days * 86400)
        for fp in removed:
            print(f"removed {fp}")
        for fp in in_use:
            print(f"kept {fp}: in use (a job holds a live lease)")
        print(f"chatsft cache prune: {len(removed)} entries removed, {len(in_use)} in use kept ({root})")
        return
    found = cache.entries(root)
    print(f"{'fingerprint':<16}  {'state':<9} {'size':>10} {'records':>12} {'tokens':>14}  last use (UTC)  jobs")
    for e in found:
        state = "published" if e.published else "partial"
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.last_use)) if e.last_use else "never"
        print(f"{e.fingerprint[:16]}  {state:<9} {_size(e.bytes):>10} {e.records:>12,} {e.tokens:>14,}  "
              f"{when:<15} {e.leases}")
    print(f"{len(found)} entries in {root}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


VERBS: dict[str, tuple[Callable, str]] = {
    "prepare": (_prepare, "JSONL or Parquet conversations -> Parquet rows + stats.json + mask preview (Ray Data)"),
    "train": (_train, "prepare if needed, then train (Ray Train; --local: in this process)"),
    "sweep": (_sweep, "Ray Tune over train"),
    "eval": (_eval, "evaluate a checkpoint or exported model"),
    "inspect": (_inspect, "show rendered samples coloured by supervision, and per-turn loss weights"),
    "template": (_template, "what the chat template will teach: strategy, stops, think policy, features, "
                            "learned tokens by role, records refused, serving parity"),
    "export": (_export, "write a Hugging Face model folder (LoRA merged or the adapter alone)"),
    "cache": (_cache, "the row cache of data.cache: `list` its entries (fingerprint, size, records, tokens, "
                      "last use), `prune` the unused ones (never one a running job reads)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatsft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if verb == "cache":
            p.add_argument("action", choices=("list", "prune"))
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4")
        if verb == "train":
            p.add_argument("--local", action="store_true", help="run the training loop here, without Ray")
        if verb == "eval":
            p.add_argument("--model", default=None, help="model folder or checkpoint (default: the run's model/)")
        if verb == "inspect":
            p.add_argument("-n", "--num", type=int, default=3, help="samples to show")
            p.add_argument("--html", default=None, help="also write an HTML preview here")
        if verb == "template":
            p.add_argument("-n", "--num", type=int, default=REPORT_RECORDS,
                           help="records of data.train to render for the report")
        if verb == "cache":
            p.add_argument("--unused-days", type=float, default=7.0,
                           help="prune: remove entries not used for this many days (default 7; 0: every unused one)")
        if verb == "export":
            p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the latest)")
            p.add_argument("--out", default=None, help="output folder (default: the run's model/); it is replaced "
                           "whole, so it must be new, empty or a previous export of the same kind")
            p.add_argument("--force", action="store_true", help="replace --out even though it holds other files "
                           "(never the run's folder, one above it, or the working folder)")
            p.add_argument("--adapter-only", action="store_true", help="PEFT: write the adapter, not merged")
    keys = sub.add_parser("keys", help="list every config key with its default and meaning",
                          description="chatsft keys [PREFIX | CONFIG.yaml [PREFIX]] [overrides]: every config "
                                      "key with its default and meaning; with a config, its value beside the default")
    keys.add_argument("args", nargs="*", help="a key prefix (train, train.lr), a config file, or both; overrides")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from chatsft.console import quiet_driver

    quiet_driver()  # before any library loads: their progress bars and notes stay off the console
    parser = build_parser()
    # Overrides may come after flags (`train cfg.yaml --local train.lr=1e-3`): argparse leaves
    # the ones after a flag unparsed, so collect them here.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.verb == "keys":
        try:
            print(keys_listing([*args.args, *extra]))
        except BrokenPipeError:  # `chatsft keys | head`
            sys.stderr.close()
        except UserError as e:
            print(f"chatsft keys: error: {one_line(e)}", file=sys.stderr)
            return 2
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        VERBS[args.verb][0](cfg, args)
    except KeyboardInterrupt:
        print(f"chatsft {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # A user error raised inside a Ray task, actor or training worker reaches us wrapped.
        user = user_error_in(e)
        if user is None:
            raise
        print(f"chatsft {args.verb}: error: {one_line(user)}", file=sys.stderr)
        return 2
    return 0


def keys_listing(args: Sequence[str]) -> str:
    """`chatsft keys [PREFIX | CONFIG.yaml [PREFIX]] [key=value ...]`: every key under PREFIX with its
    default and meaning; with a config, the value it gives each key beside the default (`*` marks
    a changed one). A prefix that matches no key is an error that names the closest keys."""
    import difflib

    from chatsft.config import CONFIG_SUFFIXES

    config = next((a for a in args if a.endswith(CONFIG_SUFFIXES) and "=" not in a), None)
    overrides = [a for a in args if "=" in a]
    prefixes = [a for a in args if a != config and "=" not in a]
    if len(prefixes) > 1:
        raise UserError(f"one prefix at a time, got {', '.join(prefixes)}")
    prefix = prefixes[0] if prefixes else ""
    rows = describe()
    names = [key for key, _, _ in rows]
    chosen = [r for r in rows if not prefix or r[0] == prefix or r[0].startswith(prefix + ".")]
    if not chosen:
        sections = sorted({n.rsplit(".", 1)[0] for n in names} | set(names))
        near = difflib.get_close_matches(prefix, sections, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else "; `chatsft keys` lists them all"
        raise UserError(f"no config key starts with {prefix!r}{hint}")
    if config is None and not overrides:
        return "\n".join(f"{key} = {default}\n    {text}" for key, default, text in chosen)
    tree = load_config(config, overrides).to_dict()
    out = []
    for key, default, text in chosen:
        node = tree
        for part in key.split("."):  # not flat(): it splits a mapping-valued key into its entries
            node = node[part]
        value = repr(node)
        mark = "*" if value != default else " "
        out.append(f"{mark} {key} = {value}" + (f"   (default {default})" if value != default else "")
                   + f"\n      {text}")
    where = config or "the defaults"
    return f"# {where}{' with ' + ' '.join(overrides) if overrides else ''}; * marks a value that is not the " \
           f"default\n" + "\n".join(out)


def job_main(verb: str, argv: Sequence[str]) -> int:
    """`jobs/<verb>.py`: the same verb inside a Ray job. It joins the cluster it was submitted
    to before anything else, so prepare, train and sweep all run there; exit codes (and so
    `ray job status`) are the CLI's."""
    from chatsft.raysetup import ensure_ray

    if verb != "eval":  # eval joins only if its rows must be prepared (prepare joins then)
        ensure_ray()
    return main([verb, *argv])


if __name__ == "__main__":
    sys.exit(main())
