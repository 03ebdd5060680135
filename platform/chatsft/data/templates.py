"""Chat formats: messages -> text segments that say what is learned.

A format turns a validated conversation into a list of `Segment`s whose texts
concatenate to exactly the string the model reads; each segment says whether
its characters are supervised and to which answer they belong. Rendering to
text first (and tokenizing the whole string once, see render.py) is what makes
`hf` agree with `tokenizer.apply_chat_template` token for token, and keeps the
built-in formats byte-identical to their reference prompts.

Formats:
- chatml   `<|im_start|>role\\n...<|im_end|>\\n`
- llama3   `<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`
- chatglm2 `[Round N]\\n\\n问：...\\n\\n答：...</s>\\n\\n` (system folded into the first question)
- special  nanochat-style: `<|bos|><|user_start|>...<|user_end|><|assistant_start|>...<|assistant_end|>`
           with `<|python_start|>...<|python_end|>` (learned) and `<|output_start|>...<|output_end|>`
           (not learned) for tool parts
- hf       the tokenizer's own Jinja template; answer spans are located by rendering prefixes.

Tool parts in text formats (chatml, llama3, chatglm2) are written as fenced
blocks: ```python ...``` is learned, ```output ...``` is not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

from chatsft.data.conversation import BadRecord, Message, Part, merge_system


class TemplateError(ValueError):
    """The chat format cannot be used with this tokenizer (a config error, not a record error)."""


class Segment(NamedTuple):
    # A tuple, not a frozen dataclass: a dialogue makes dozens and prepare makes them by the
    # million; a frozen dataclass costs several times more to build.
    text: str
    supervised: bool = False
    answer: int = -1  # index of the assistant answer these characters belong to, -1 for none


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format bound to a tokenizer."""

    name: str
    segments: Callable[[Sequence[Message]], list[Segment]]
    prompt: Callable[[Sequence[Message]], str]  # history + the opening of the next answer
    end_of_turn: str  # the token that ends an answer: learned, and where generation stops
    control_tokens: tuple[str, ...]  # strings that must never appear inside content
    _control_re: Optional[re.Pattern] = None

    def check_content(self, messages: Sequence[Message]) -> None:
        if self._control_re is None:
            return
        for i, m in enumerate(messages):
            hit = self._control_re.search(m.text)
            if hit:
                raise BadRecord("control_token_in_content", f"messages[{i}] contains {hit.group(0)!r}")


# ----------------------------------------------------------------- building blocks


def _answer_segments(m: Message, k: int, fence: bool) -> list[Segment]:
    """The supervised body of answer k; tool output inside it is context, not target."""
    if isinstance(m.content, str):
        return [Segment(m.content, True, k)]
    out = []
    for p in m.content:
        out.append(_part_segment(p, k, fence))
    return out


def _part_segment(p: Part, k: int, fence: bool) -> Segment:
    if p.type == "text":
        return Segment(p.text, True, k)
    if fence:
        if p.type == "python":
            return Segment(f"```python\n{p.text}\n```\n", True, k)
        return Segment(f"```output\n{p.text}\n```\n", False, k)
    if p.type == "python":
        return Segment(f"<|python_start|>{p.text}<|python_end|>", True, k)
    return Segment(f"<|output_start|>{p.text}<|output_end|>", False, k)


def _fenced_text(m: Message) -> str:
    return "".join(s.text for s in _answer_segments(m, 0, fence=True))


def _require_alternation(messages: Sequence[Message], name: str) -> None:
    for i, m in enumerate(messages):
        if m.role not in ("user", "assistant"):
            raise BadRecord("unsupported_role", f"{name} has no {m.role!r} role (messages[{i}])")
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            raise BadRecord("bad_order", f"{name} needs user/assistant turns alternating from user; "
                                         f"messages[{i}] is {m.role}")


def _strip_after_last_answer(messages: Sequence[Message]) -> Sequence[Message]:
    # Turns after the last answer carry no loss and would only cost tokens.
    last = max(i for i, m in enumerate(messages) if m.role == "assistant")
    return messages[: last + 1]


# ------------------------------------------------------------------------- chatml


def _chatml_segments(messages: Sequence[Message]) -> list[Segment]:
    segs: list[Segment] = []
    k = 0
    for m in _strip_after_last_answer(messages):
        if m.role == "assistant":
            segs.append(Segment("<|im_start|>assistant\n"))
            segs += _answer_segments(m, k, fence=True)
            segs += [Segment("<|im_end|>", True, k), Segment("\n")]
            k += 1
        else:
            body = _fenced_text(m) if not isinstance(m.content, str) else m.content
            segs.append(Segment(f"<|im_start|>{m.role}\n{body}<|im_end|>\n"))
    return segs


def _chatml_prompt(messages: Sequence[Message]) -> str:
    hist = "".join(
        f"<|im_start|>{m.role}\n{m.text if isinstance(m.content, str) else _fenced_text(m)}<|im_end|>\n"
        for m in messages
    )
    return hist + "<|im_start|>assistant\n"


# ------------------------------------------------------------------------- llama3

_LLAMA3_ROLE = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython"}


def _llama3_header(role: str) -> str:
    return f"<|start_header_id|>{_LLAMA3_ROLE[role]}<|end_header_id|>\n\n"


def _llama3_segments(messages: Sequence[Message]) -> list[Segment]:
    # Like Meta's template, message content is stripped of surrounding whitespace.
    segs = [Segment("<|begin_of_text|>")]
    k = 0
    for m in _strip_after_last_answer(messages):
        segs.append(Segment(_llama3_header(m.role)))
        if m.role == "assistant":
            body = _answer_segments(_stripped(m), k, fence=True)
            segs += body + [Segment("<|eot_id|>", True, k)]
            k += 1
        else:
            segs.append(Segment(_stripped(m).text + "<|eot_id|>" if isinstance(m.content, str)
                                else _fenced_text(_stripped(m)) + "<|eot_id|>"))
    return segs


def _stripped(m: Message) -> Message:
    if isinstance(m.content, str):
        return Message(m.role, m.content.strip())
    parts = list(m.content)
    if parts:
        parts[0] = Part(parts[0].type, parts[0].text.lstrip()) if parts[0].type == "text" else parts[0]
        parts[-1] = Part(parts[-1].type, parts[-1].text.rstrip()) if parts[-1].type == "text" else parts[-1]
    return Message(m.role, tuple(parts))


def _llama3_prompt(messages: Sequence[Message]) -> str:
    out = "<|begin_of_text|>"
    for m in messages:
        body = _stripped(m).text if isinstance(m.content, str) else _fenced_text(_stripped(m))
        out += _llama3_header(m.role) + body + "<|eot_id|>"
    return out + _llama3_header("assistant")


# ----------------------------------------------------------------------- chatglm2


def _chatglm2_pairs(messages: Sequence[Message]) -> Sequence[Message]:
    merged = merge_system(messages)
    _require_alternation(merged, "chatglm2")
    return merged


def _chatglm2_segments(messages: Sequence[Message], eos: str) -> list[Segment]:
    msgs = _strip_after_last_answer(_chatglm2_pairs(messages))
    segs: list[Segment] = []
    for k in range(0, len(msgs), 2):
        q, a = msgs[k], msgs[k + 1]
        segs.append(Segment(f"[Round {k // 2 + 1}]\n\n问：{q.text}\n\n答："))
        segs += _answer_segments(a, k // 2, fence=True)
        segs += [Segment(eos, True, k // 2), Segment("\n\n")]
    return segs


def _chatglm2_prompt(messages: Sequence[Message], eos: str) -> str:
    msgs = list(merge_system(messages))
    out = ""
    for k in range(0, len(msgs) - 1, 2):
        out += f"[Round {k // 2 + 1}]\n\n问：{msgs[k].text}\n\n答：{_fenced_text(msgs[k + 1])}{eos}\n\n"
    last = msgs[-1].text if len(msgs) % 2 == 1 else ""
    return out + f"[Round {len(msgs) // 2 + 1}]\n\n问：{last}\n\n答："


# ------------------------------------------------------------------------ special

SPECIAL_TOKENS = (
    "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
)


def _special_segments(messages: Sequence[Message]) -> list[Segment]:
    msgs = _strip_after_last_answer(merge_system(messages))
    _require_alternation(msgs, "special")
    segs = [Segment("<|bos|>")]
    k = 0
    for m in msgs:
        if m.role == "user":
            segs.append(Segment(f"<|user_start|>{m.text}<|user_end|>"))
        else:
            segs.append(Segment("<|assistant_start|>"))
            segs += _answer_segments(m, k, fence=False)
            segs.append(Segment("<|assistant_end|>", True, k))
            k += 1
    return segs


def _special_prompt(messages: Sequence[Message]) -> str:
    out = "<|bos|>"
    for m in merge_system(messages):
        if m.role == "user":
            out += f"<|user_start|>{m.text}<|user_end|>"
        else:
            out += "<|assistant_start|>" + "".join(s.text for s in _answer_segments(m, 0, False))
            out += "<|assistant_end|>"
    return out + "<|assistant_start|>"


# ----------------------------------------------------------------------------- hf


def _hf_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content if isinstance(m.content, str) else _fenced_text(m)}
            for m in messages]


def _hf_template(tokenizer: Any) -> ChatTemplate:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"data.template=hf: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template"
        )

    def apply(msgs: list[dict], generation: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)

    # Two answers, mixed case: catches templates that drop or rewrite earlier answers.
    probe = [Message("system", "System probe."), Message("user", "User probe one."),
             Message("assistant", "Answer probe one."), Message("user", "User probe two."),
             Message("assistant", "Answer probe two.")]
    try:
        keeps_system = "System probe." in apply(_hf_messages(probe))
    except Exception:  # templates without a system role raise from Jinja
        keeps_system = False

    def segments(messages: Sequence[Message]) -> list[Segment]:
        typed = list(_strip_after_last_answer(messages if keeps_system else merge_system(messages)))
        msgs = _hf_messages(typed)
        try:
            full = apply(msgs)
        except Exception as e:
            raise BadRecord("template_error", _short(e)) from None
        segs: list[Segment] = []
        cursor = 0
        k = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            try:
                before = apply(msgs[:i], generation=True)
                through = apply(msgs[: i + 1])
            except Exception as e:
                raise BadRecord("template_error", f"rendering up to messages[{i}]: {_short(e)}") from None
            if not (full.startswith(before) and full.startswith(through) and len(before) >= cursor):
                raise BadRecord("template_error", f"the template renders the dialogue before answer {k} "
                                "differently from the whole dialogue; its answers cannot be located")
            span = full[len(before): len(through)]
            body = m["content"]
            at = span.find(body)
            if at < 0 or span[:at].strip():
                body = body.strip()
                at = span.find(body)
            if at < 0 or span[:at].strip():
                raise BadRecord("template_error", f"answer {k} does not appear verbatim where the template "
                                "puts it")
            tail = span[at + len(body):]
            eot = tail.rstrip()
            if not eot:
                raise BadRecord("template_error", f"nothing follows answer {k}: the template has no "
                                "end-of-turn marker, so a model would never learn to stop")
            start = len(before) + at
            segs.append(Segment(full[cursor:start]))
            segs += _locate_parts(typed[i], body, k)
            segs.append(Segment(eot, True, k))
            cursor = start + len(body) + len(eot)
            k += 1
        segs.append(Segment(full[cursor:]))
        return [s for s in segs if s.text]

    def prompt(messages: Sequence[Message]) -> str:
        msgs = messages if keeps_system else merge_system(messages)
        return apply(_hf_messages(msgs), generation=True)

    try:
        probe_segs = segments(probe)
    except BadRecord as e:
        raise TemplateError(f"data.template=hf: cannot locate the assistant's answers in the tokenizer's "
                            f"chat template ({e.detail}); pick a built-in template instead") from None
    eot = next(s.text for s in probe_segs if s.supervised and not s.text.startswith("Answer probe"))
    eot = eot.strip() or eot
    special = tuple(sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if t}, key=len, reverse=True))
    return _with_control_re(ChatTemplate("hf", segments, prompt, eot, ()), special)


def _locate_parts(m: Message, body: str, k: int) -> list[Segment]:
    """Segments of an answer as the hf template printed it (body may be stripped)."""
    if isinstance(m.content, str):
        return [Segment(body, True, k)]
    segs = [_part_segment(p, k, fence=True) for p in m.content]
    full = "".join(s.text for s in segs)
    lead = full.find(body)  # how much leading whitespace the template stripped
    out, pos = [], 0
    for s in segs:
        a, b = max(pos, lead), min(pos + len(s.text), lead + len(body))
        if b > a:
            out.append(Segment(full[a:b], s.supervised, k))
        pos += len(s.text)
    return out


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


# ---------------------------------------------------------------------- registry


def get_template(name: str, tokenizer: Any) -> ChatTemplate:
    """Bind a format to a tokenizer; refuse it if its control tokens are not single tokens."""
    name = getattr(name, "value", name)
    if name == "hf":
        return _hf_template(tokenizer)
    eos = getattr(tokenizer, "eos_token", None)
    if name == "chatml":
        t = ChatTemplate("chatml", _chatml_segments, _chatml_prompt, "<|im_end|>",
                         ("<|im_start|>", "<|im_end|>"))
    elif name == "llama3":
        t = ChatTemplate("llama3", _llama3_segments, _llama3_prompt, "<|eot_id|>",
                         ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    elif name == "chatglm2":
        if not eos:
            raise TemplateError("data.template=chatglm2: the tokenizer has no eos_token to end answers with")
        t = ChatTemplate("chatglm2", lambda m: _chatglm2_segments(m, eos),
                         lambda m: _chatglm2_prompt(m, eos), eos, (eos,))
    elif name == "special":
        t = ChatTemplate("special", _special_segments, _special_prompt, "<|assistant_end|>", SPECIAL_TOKENS)
    else:
        raise TemplateError(f"data.template: unknown template {name!r}; "
                            "expected chatml, llama3, chatglm2, special or hf")
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in t.control_tokens if tok not in vocab]
    if missing:
        raise TemplateError(
            f"data.template={name}: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no single "
            f"token for {', '.join(missing)}; add them as special tokens or use data.template=hf"
        )
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    markers = tuple(sorted(set(t.control_tokens) | {s for s in special if s}, key=len, reverse=True))
    return _with_control_re(t, markers)


def _with_control_re(t: ChatTemplate, markers: tuple[str, ...]) -> ChatTemplate:
    pattern = re.compile("|".join(re.escape(m) for m in markers)) if markers else None
    return ChatTemplate(t.name, t.segments, t.prompt, t.end_of_turn, markers, pattern)
