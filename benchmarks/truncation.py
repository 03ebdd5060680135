"""Rendering cost of long dialogues truncated by turns: it must grow linearly with the dialogue.

A dialogue of N messages rendered with data.max_length=256 and truncation=turns, for
N = 1,000 and 2,000, every built-in template, session and split-turn samples. Prints the
best CPU time of several rounds for each and the ratio 2,000 / 1,000 (linear: about 2;
target: at most 2.2).

    PYTHONPATH=platform .venv/bin/python benchmarks/truncation.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import time


def dialogue(n: int) -> dict:
    msgs = []
    for i in range(n // 2):
        msgs += [{"role": "user", "content": f"Question number {i}: where do I live, and what is my dog called?"},
                 {"role": "assistant", "content": f"You live in Oslo and your dog is Rex (answer {i})."}]
    return {"messages": msgs}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 2000])
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from chatsft.builtin import resolve
    from chatsft.data.conversation import parse_record
    from chatsft.data.render import RenderOptions, render_batch
    from chatsft.data.templates import get_template

    tok = AutoTokenizer.from_pretrained(resolve("builtin:tiny-llama"))
    small, large = args.sizes
    print(f"{'template':<10} {'organization':<12} {small:>6} msgs  {large:>6} msgs   ratio")
    worst = 0.0
    for organization in ("session", "split_turn"):
        opts = RenderOptions(organization=organization, max_length=256, truncation="turns")
        for name in ("chatml", "llama3", "chatglm2", "special"):
            template = get_template(name, tok)
            best = {}
            for n in (small, large):
                conv = parse_record(dialogue(n), f"long:{n}")
                times = []
                for _ in range(args.rounds):
                    t = time.process_time()
                    (result,) = render_batch([conv], tok, template, opts)
                    times.append(time.process_time() - t)
                assert not isinstance(result, Exception) and all(len(s) <= 256 for s in result.samples)
                best[n] = min(times)
            ratio = best[large] / best[small]
            worst = max(worst, ratio)
            print(f"{name:<10} {organization:<12} {best[small] * 1e3:8.1f} ms  {best[large] * 1e3:8.1f} ms   "
                  f"{ratio:5.2f}x")
    print(f"worst ratio {worst:.2f}x (target <= 2.2x)")


if __name__ == "__main__":
    main()
