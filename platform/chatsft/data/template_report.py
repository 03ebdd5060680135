"""What a chat template will teach, read before compute is spent (`chatsft template`, prepare, stats.json).

`template_report` renders the first records exactly as prepare does and says: which strategy placed
the answers (built-in, located, {% generation %} markers), the stop each answer learns, the think
policy and why it is the default, which features (reasoning, tool calls, tool results) the template
renders, the tokens of each role and how many of them are learned (only answers may be), the kinds
of record the template refuses, with an example each, and the serving parity.

Serving parity: of the answers, how many are trained on a context whose ids are exactly what the
model reads at inference before it (`apply_chat_template(history, add_generation_prompt=True)`,
`ChatTemplate.contexts`); for the others, why not (the generation prompt adds an empty think block
the history lacks, the record's render drops earlier reasoning that the prompt keeps, ...). A model
trained on contexts it never sees served learns well and answers badly.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import Counter
from typing import Any, Iterable, Optional, Sequence, Union

from chatsft.data.conversation import BadRecord, Conversation
from chatsft.data.templates import ChatTemplate, Segment

ROLES = ("system", "user", "tool", "assistant", "template")
REPORT_RECORDS = 200  # records read for the report: enough to meet a corpus's kinds of record, quickly


def template_report(template: ChatTemplate, tokenizer: Any,
                    records: Iterable[Union[Conversation, BadRecord]]) -> dict:
    """The report as a JSON-able dict (stats.json key `template`)."""
    explain = template.explain or (lambda messages, tools=None, notes=None: template.segments(messages, tools))
    notes: Counter = Counter()
    refused: Counter = Counter()
    examples: dict[str, str] = {}
    tokens, learned = Counter(), Counter()
    stops: Counter = Counter()
    answers = masked_think = rendered = 0
    parity_same = 0
    parity_why: Counter = Counter()
    parity_examples: dict[str, str] = {}
    backend = tokenizer.backend_tokenizer
    stop_texts = [s for s in template.info.get("stops", []) if s]
    for item in records:
        if isinstance(item, BadRecord):
            refused[item.reason] += 1
            examples.setdefault(item.reason, item.message)
            continue
        try:
            template.check_content(item.messages)
            segs = explain(item.messages, item.tool_schemas, notes)
        except BadRecord as e:
            e = e.at(item.source)
            refused[e.reason] += 1
            examples.setdefault(e.reason, e.message)
            continue
        rendered += 1
        text = "".join(s.text for s in segs)
        owner = _char_roles(text, segs, item)
        enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        sup = _supervised_chars(segs, len(text))
        for a, b in enc.offsets:
            role = owner[a] if a < len(text) else "template"
            tokens[role] += 1
            if b > a and any(sup[a:b]):
                learned[role] += 1
        per_answer = _answers(segs)
        answers += len(per_answer)
        if template.contexts is not None:
            starts = _answer_starts(segs)
            offsets = [a for a, _ in enc.offsets]
            for k, (start, served) in enumerate(zip(starts, template.contexts(item.messages, item.tool_schemas))):
                why, detail = _parity(text, start, served, enc.ids[:bisect_left(offsets, start)], backend,
                                      _history(item, k))
                if why is None:
                    parity_same += 1
                else:
                    parity_why[why] += 1
                    parity_examples.setdefault(why, f"{item.source} answer {k}{': ' + detail if detail else ''}")
        for k, (learned_text, holes) in per_answer.items():
            hit = next((s for s in stop_texts if learned_text.rstrip().endswith(s)), None)
            stops[hit or "none"] += 1
            masked_think += holes
    info = dict(template.info)
    return {
        "template": template.name,
        **info,
        "records": {"read": rendered + sum(refused.values()), "rendered": rendered,
                    "refused": dict(sorted(refused.items())), "refused_examples": examples},
        "roles": {r: {"tokens": tokens[r], "learned": learned[r],
                      "learned_share": round(learned[r] / tokens[r], 4) if tokens[r] else 0.0}
                  for r in ROLES},
        "answers": answers,
        "stops_learned": dict(sorted(stops.items())),
        "context_blocks_in_answers": masked_think,
        "notes": dict(sorted(notes.items())),
        "serving_parity": {"reference": info.get("serving_reference", ""), "answers": answers,
                           "same": parity_same,
                           "share": round(parity_same / answers, 4) if answers else None,
                           "differ": dict(parity_why.most_common()), "examples": parity_examples},
    }


def _answer_starts(segs: Sequence[Segment]) -> list[int]:
    """The character where each answer's first segment starts (what the model emits after its prompt)."""
    starts: dict[int, int] = {}
    pos = 0
    for s in segs:
        if s.answer >= 0 and s.answer not in starts:
            starts[s.answer] = pos
        pos += len(s.text)
    return [starts[k] for k in sorted(starts)]


def _history(conv: Conversation, k: int) -> list:
    """The messages before answer k."""
    seen = -1
    for i, m in enumerate(conv.messages):
        if m.role == "assistant":
            seen += 1
            if seen == k:
                return list(conv.messages[:i])
    return list(conv.messages)


def _parity(text: str, start: int, served: Optional[str], trained_ids: list, backend: Any,
            history: list) -> tuple[Optional[str], str]:
    """(None, "") when the ids before the answer are what a server puts before it; else (why, detail)."""
    if served is None:
        return "the template fails on the history alone (with the generation prompt)", ""
    trained = text[:start]
    if served == trained:
        if backend.encode(served, add_special_tokens=False).ids == trained_ids:
            return None, ""
        return "the answer's first token merges with the end of the prompt: the ids differ at the boundary", ""
    if served.startswith(trained):
        return f"the generation prompt adds {_shown(served[len(trained):])}, which the history does not hold", ""
    if trained.startswith(served):
        return (f"the history holds {_shown(trained[len(served):])} before the answer, where the generation "
                "prompt ends"), ""
    thoughts = [m.reasoning.strip() for m in history if m.role == "assistant" and m.reasoning and m.reasoning.strip()]
    if any(r in served and r not in trained for r in thoughts):
        return "the record's render drops earlier reasoning that the prompt at inference holds", ""
    if any(r in trained and r not in served for r in thoughts):
        return "the prompt at inference drops earlier reasoning that the record's render holds", ""
    cut = next((i for i, (a, b) in enumerate(zip(served, trained)) if a != b), min(len(served), len(trained)))
    return ("the history before the answer renders otherwise at inference",
            f"served {_shown(served[cut:])}, trained {_shown(trained[cut:])}")


def _shown(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _supervised_chars(segs: Sequence[Segment], n: int) -> bytearray:
    sup = bytearray(n)
    pos = 0
    for s in segs:
        if s.supervised:
            sup[pos: pos + len(s.text)] = b"\x01" * len(s.text)
        pos += len(s.text)
    return sup


def _answers(segs: Sequence[Segment]) -> dict[int, tuple[str, int]]:
    """answer -> (its learned text, how many of its pieces are context: think blocks, tool output)."""
    out: dict[int, list] = {}
    for s in segs:
        if s.answer < 0:
            continue
        entry = out.setdefault(s.answer, ["", 0])
        if s.supervised:
            entry[0] += s.text
        else:
            entry[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def _char_roles(text: str, segs: Sequence[Segment], conv: Conversation) -> list[str]:
    """The role of each character: an answer's, a message's text found in order, or the template's."""
    owner = ["template"] * len(text)
    pos = 0
    for s in segs:
        if s.answer >= 0:
            owner[pos: pos + len(s.text)] = ["assistant"] * len(s.text)
        pos += len(s.text)
    cursor = 0
    for m in conv.messages:
        if m.role == "assistant" or not m.text.strip():
            continue
        body = m.text if m.text in text else m.text.strip()
        # The system prompt may sit anywhere (a template can move it); the others follow in order.
        at = text.find(body, 0 if m.role == "system" else cursor)
        if at < 0:
            continue
        owner[at: at + len(body)] = [m.role] * len(body)
        if m.role != "system":
            cursor = at + len(body)
    return owner


def format_report(r: dict, limit: Optional[int] = None) -> str:
    """The report as the user reads it."""
    lines = [f"chat template: {r['template']}  (strategy: {_strategy(r)})"]

    def row(label: str, value: str) -> None:
        lines.append(f"  {label:<22}{value}")

    if r.get("header") is not None:
        row("assistant header", repr(r["header"]) if r["header"] else "none: the answer follows the user's "
            "closing marker")
    if r.get("generation_prompt_extra"):
        row("generation prompt", f"adds {r['generation_prompt_extra']!r} after the header: context, where "
            "an answer's history holds it too")
    lead = r.get("between_header_and_answer")
    if lead:
        tags = r.get("think_tags") or []
        what = "a think block: learned as the think policy says" if tags and tags[-1] in lead else \
            "learned: the model writes it"
        row("before an answer", f"{lead!r} ({what})")
    row("stop learned", f"{', '.join(repr(s) for s in r.get('stops', []))} ({r.get('stop_kind', '')})")
    row("system message", r.get("system", ""))
    if r.get("chat_template_kwargs"):
        row("template variables", ", ".join(f"{k}={v!r}" for k, v in r["chat_template_kwargs"].items()))
    if r.get("think_tags"):
        row("think tags", f"{r['think_tags'][0]!r} {r['think_tags'][1]!r}")
    default = r.get("think_default")
    think = r.get("think", "")
    row("think policy", f"{think}" + (" (default: " + r.get("think_default_why", "") + ")" if think == default
                                       else f" (set in data.think; the template's default is {default})"))
    if r.get("render") == "apply_chat_template":
        row("render", "through apply_chat_template (the direct render differed)")
    if r.get("markers_note"):
        row("markers", r["markers_note"])
    lines.append("features")
    for key, label in (("reasoning", "reasoning_content"), ("tool_calls", "tool calls"),
                       ("tool_results", "tool results")):
        f = r.get("features", {}).get(key)
        if f is not None:
            lines.append(f"  {label:<20}{'supported' if f['supported'] else 'UNSUPPORTED'}: {f['how']}")
    rec = r["records"]
    lines.append(f"first {rec['read']} records{'' if limit is None else f' (of --num {limit})'}: "
                 f"{rec['rendered']} rendered, {sum(rec['refused'].values())} refused")
    lines.append(f"  {'role':<10}{'tokens':>10}{'learned':>10}{'share':>9}")
    for role, v in r["roles"].items():
        if v["tokens"] or role == "assistant":
            lines.append(f"  {role:<10}{v['tokens']:>10,}{v['learned']:>10,}{v['learned_share']:>9.1%}")
    answers = r["answers"]
    if answers:
        stops = ", ".join(f"{repr(k) if k != 'none' else 'none'} {v} ({v / answers:.0%})"
                          for k, v in r["stops_learned"].items())
        if "none" in r["stops_learned"]:
            stops += "; none: the template writes no stop after that answer (the last message), so the ids hold none"
        lines.append(f"  answers {answers:,}; their stop: {stops}")
    if r.get("context_blocks_in_answers"):
        lines.append(f"  pieces of answers kept as context (think blocks by the policy, tool output): "
                     f"{r['context_blocks_in_answers']:,}")
    for note, n in r.get("notes", {}).items():
        lines.append(f"  {note}: {n:,}")
    for reason, n in rec["refused"].items():
        lines.append(f"  refused {reason}: {n:,}, e.g. {rec['refused_examples'][reason]}")
    p = r.get("serving_parity")
    if p and p["answers"]:
        lines.append(f"serving parity: {p['same']:,} of {p['answers']:,} answers ({p['share']:.1%}) are trained on "
                     f"exactly the ids the model reads before them at inference, {p['reference']}")
        for why, n in p["differ"].items():
            lines.append(f"  differ {n:,}: {why}, e.g. {p['examples'][why]}")
    return "\n".join(lines)


def _strategy(r: dict) -> str:
    return {"built-in": "built-in format", "located": "located: answers found in one render of each record",
            "markers": "markers: the template's {% generation %} spans, checked against the located ones"}.get(
        r.get("strategy", ""), r.get("strategy", ""))


def report_json(r: dict) -> str:
    return json.dumps(r, indent=2, ensure_ascii=False) + "\n"
