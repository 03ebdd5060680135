"""What is learned, shown: supervised tokens in one colour, context in another (terminal or HTML)."""

from __future__ import annotations

import html
from typing import Any, Iterable, Sequence

import numpy as np

from chatsft.data.render import Sample
from chatsft.data.schema import IGNORE

GREEN, DIM, RESET, BOLD = "\033[32m", "\033[2m", "\033[0m", "\033[1m"


def joined(s: Sample) -> Sample:
    """An encoder-decoder sample as one line of text: the encoder text as context followed by the
    decoder target as learned (the two are separate sequences of the model)."""
    ids = np.concatenate([s.input_ids, s.labels]).astype(np.int32)
    labels = np.concatenate([np.full(len(s.input_ids), IGNORE, np.int32), s.labels]).astype(np.int32)
    return Sample(ids, labels, s.source, truncated=s.truncated)


def runs(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int]) -> list[tuple[str, bool]]:
    """(text, learned) runs; a run is decoded whole so multi-byte characters stay intact."""
    ids = np.asarray(input_ids)
    learned = np.asarray(labels) != IGNORE
    out: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or learned[i] != learned[start]:
            text = tokenizer.decode(ids[start:i].tolist(), skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
            out.append((text, bool(learned[start])))
            start = i
    return out


def to_terminal(tokenizer: Any, sample: Sample, color: bool = True) -> str:
    pieces = []
    for text, learned in runs(tokenizer, sample.input_ids, sample.labels):
        if color:
            pieces.append(f"{GREEN if learned else DIM}{text}{RESET}")
        else:
            pieces.append(f"[[{text}]]" if learned else text)
    return "".join(pieces)


def to_html(tokenizer: Any, samples: Iterable[Sample], title: str = "chatsft mask preview") -> str:
    blocks = []
    for s in samples:
        body = "".join(
            f'<span class="{"sup" if learned else "ctx"}">{html.escape(text)}</span>'
            for text, learned in runs(tokenizer, s.input_ids, s.labels)
        )
        n, sup = len(s.input_ids), s.num_supervised
        meta = (f"{html.escape(s.source)} &middot; {n} tokens &middot; {sup} supervised "
                f"({sup / max(n, 1):.0%}){' &middot; truncated' if s.truncated else ''}")
        blocks.append(f'<div class="sample"><div class="meta">{meta}</div><pre>{body}</pre></div>')
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body {{ font-family: sans-serif; margin: 2em; }}
pre {{ white-space: pre-wrap; font-size: 13px; line-height: 1.5; background: #fafafa; padding: 1em; }}
.sup {{ background: #c8f7c5; color: #064d00; }}
.ctx {{ color: #777; }}
.meta {{ font-size: 12px; color: #333; margin-top: 1.5em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p><span class="sup">green</span>: learned (label = token); grey: context (label -100).</p>
{''.join(blocks)}
</body></html>
"""


def weights_table(weights: dict[int, Any], label: str) -> str:
    cells = ", ".join(f"answer {k + 1}: {float(w):.3f} ({w})" for k, w in weights.items())
    return f"{label}: {cells}"
