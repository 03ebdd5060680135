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

from chatsft.config import Config, ConfigError, describe, load_config
from chatsft.data.conversation import BadRecord
from chatsft.data.template_report import REPORT_RECORDS
from chatsft.data.templates import TemplateError
from chatsft.errors import UserError

USER_ERRORS = (ConfigError, BadRecord, TemplateError, UserError, FileNotFoundError)


def _prepare(cfg: Config, args: argparse.Namespace) -> None:
    from chatsft.pipeline import prepare

    prepare(cfg, force=True)


def _train(cfg: Config, args: argparse.Namespace) -> None:
    from chatsft.train.driver import train

    train(cfg, local=args.local)


def _sweep(cfg: Config, args: argparse.Namespace) -> None:
    from chatsft.sweep import sweep

    sweep(cfg)


def _eval(cfg: Config, args: argparse.Namespace) -> None:
    from chatsft.evaluate import evaluate_cli

    evaluate_cli(cfg, args.model)


def _inspect(cfg: Config, args: argparse.Namespace) -> None:
    """Render the first samples of the first train source and show what each token teaches."""
    from chatsft.data.preview import to_html, to_terminal, weights_table
    from chatsft.data.render import RenderOptions, render_conversation
    from chatsft.data.sources import read_local
    from chatsft.data.stats import sample_stats, turn_weights
    from chatsft.data.templates import get_template
    from chatsft.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    opts = RenderOptions.from_config(cfg.data)
    template = get_template(cfg.data.template, tokenizer, opts.think)
    color = sys.stdout.isatty()
    shown = []
    for item in read_local(cfg.data.train[0].path, limit=args.num):
        if isinstance(item, BadRecord):
            print(f"bad record: {item.message}")
            continue
        result = render_conversation(item, tokenizer, template, **vars(opts))
        print(f"== {item.source}  ({cfg.data.template.value}, {opts.organization.value}, "
              f"train_on={opts.train_on.value})")
        for s in result.samples:
            st = sample_stats(s)
            print(f"-- {s.source}: {st['tokens']} tokens, {st['supervised']} supervised "
                  f"({st['ratio']:.0%}){', truncated' if s.truncated else ''}")
            print(to_terminal(tokenizer, s, color=color))
        for reason, n in result.dropped.items():
            print(f"-- dropped {n} sample(s): {reason}")
        print(weights_table(turn_weights(result.samples, "token"), "per-turn loss weight, token mean (trained)"))
        print(weights_table(turn_weights(result.samples, "sample"), "per-turn loss weight, per-sample mean"))
        print()
        shown += result.samples
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(to_html(tokenizer, shown))
        print(f"wrote {args.html}")


def _template(cfg: Config, args: argparse.Namespace) -> None:
    """What the chat template will teach: strategy, stops, think policy, learned tokens by role, refusals."""
    from chatsft.data.template_report import first_records, format_report, template_report
    from chatsft.data.templates import get_template
    from chatsft.model import load_tokenizer, model_kind

    if model_kind(cfg.model) == "seq2seq":
        print("chat template: none (an encoder-decoder model: the history goes to the encoder, each answer "
              "to the decoder)")
        return
    tokenizer = load_tokenizer(cfg.model)
    template = get_template(cfg.data.template, tokenizer, cfg.data.think)
    report = template_report(template, tokenizer, first_records([s.path for s in cfg.data.train], args.num))
    print(format_report(report))


def _export(cfg: Config, args: argparse.Namespace) -> None:
    from chatsft.train.export import export_cli

    export_cli(cfg, checkpoint=args.checkpoint, out=args.out, adapter_only=args.adapter_only)


VERBS: dict[str, tuple[Callable, str]] = {
    "prepare": (_prepare, "JSONL -> Parquet rows + stats.json + mask preview (Ray Data)"),
    "train": (_train, "prepare if needed, then train (Ray Train; --local: in this process)"),
    "sweep": (_sweep, "Ray Tune over train"),
    "eval": (_eval, "evaluate a checkpoint or exported model"),
    "inspect": (_inspect, "show rendered samples coloured by supervision, and per-turn loss weights"),
    "template": (_template, "what the chat template will teach: strategy, stops, think policy, learned "
                            "tokens by role, records refused"),
    "export": (_export, "write a Hugging Face model folder (LoRA merged or the adapter alone)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatsft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
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
        if verb == "export":
            p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the latest)")
            p.add_argument("--out", default=None, help="output folder (default: <run.output_dir>/model)")
            p.add_argument("--adapter-only", action="store_true", help="PEFT: write the adapter, not merged")
    keys = sub.add_parser("keys", help="list every config key with its default and meaning")
    keys.add_argument("prefix", nargs="?", default="", help="only keys under this section")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
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
        for key, default, text in describe():
            if key.startswith(args.prefix):
                print(f"{key} = {default}\n    {text}")
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        VERBS[args.verb][0](cfg, args)
    except USER_ERRORS as e:
        print(f"chatsft {args.verb}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chatsft {args.verb}: interrupted", file=sys.stderr)
        return 130
    return 0


def job_main(verb: str, argv: Sequence[str]) -> int:
    """`jobs/<verb>.py`: the same verb inside a Ray job. It joins the cluster it was submitted
    to before anything else, so prepare, train and sweep all run there; exit codes (and so
    `ray job status`) are the CLI's."""
    from chatsft.raysetup import ensure_ray

    if verb != "eval":  # eval runs in the job's own process
        ensure_ray()
    return main([verb, *argv])


def _one_line(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.filename}: file not found"
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
