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
- hf       the tokenizer's own Jinja template, learned as the model generates it (see hf.py).

Tool parts in text formats (chatml, llama3, chatglm2) are written as fenced
blocks: ```python ...``` is learned, ```output ...``` is not.

Reasoning and tool calls (`reasoning_content`, `tool_calls`, `tools`) are
rendered where the format's family defines a rendering: chatml as Qwen does
(`<think>...</think>` before the answer, `<tool_call>` JSON after it, the
tools listed in the system turn), llama3 as Llama 3.1 does (a JSON call, tools
in the system turn; it has no reasoning). chatglm2 and special have none and
refuse such records (`unsupported_field`).

The think policy (`data.think`, options.Think) is bound with the format:
`learn` learns every think block, `mask_empty` makes an empty one context,
`drop_history` learns only the final exchange's (built-in formats then do not
render earlier reasoning at all, as Qwen3's template does not). Unset, it is
what the format does at inference: `learn` for the built-ins, and for hf what
the template's own rendering says (hf.default_think).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Sequence

from chatsft.data.conversation import BadRecord, Message, Part, merge_system
from chatsft.errors import TemplateError  # noqa: F401  (raised here, defined with the others)


class Segment(NamedTuple):
    # A tuple, not a frozen dataclass: a dialogue makes dozens and prepare makes them by the
    # million; a frozen dataclass costs several times more to build.
    text: str
    supervised: bool = False
    answer: int = -1  # index of the assistant answer these characters belong to, -1 for none


Segments = Callable[..., list[Segment]]  # (messages, tools=None) -> segments


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format bound to a tokenizer (and a think policy)."""

    name: str
    segments: Segments  # (messages, tools JSON schemas or None) -> segments
    prompt: Callable[[Sequence[Message]], str]  # history + the opening of the next answer
    end_of_turn: str  # the token that ends an answer: learned, and where generation stops
    control_tokens: tuple[str, ...]  # strings that must never appear inside content
    _control_re: Optional[re.Pattern] = None
    think: str = "learn"  # the bound think policy (an options.Think value)
    # What `chatsft template` reports about the format: strategy, stops, think policy and why.
    info: dict = field(default_factory=dict, compare=False)
    # (messages, tools, notes Counter) -> segments, counting what happened into notes (the report).
    explain: Optional[Callable[..., list[Segment]]] = field(default=None, compare=False)
    # (messages, tools) -> for each answer, the text a server puts before it (None where it cannot):
    # what the serving-parity figure of the report compares with the training render.
    contexts: Optional[Callable[..., list[Optional[str]]]] = field(default=None, compare=False)

    def check_content(self, messages: Sequence[Message]) -> None:
        if self._control_re is None:
            return
        for i, m in enumerate(messages):
            hit = self._control_re.search(m.text)
            if hit is None and m.reasoning is not None:
                hit = self._control_re.search(m.reasoning)
            if hit is None and m.tool_calls:
                hit = self._control_re.search(" ".join(t.raw for t in m.tool_calls))
            if hit:
                raise BadRecord("control_token_in_content", f"messages[{i}] contains {hit.group(0)!r}")


# ----------------------------------------------------------------- building blocks


def _answer_segments(m: Message, k: int, fence: bool) -> list[Segment]:
    """The supervised body of answer k; tool output inside it is context, not target."""
    if isinstance(m.content, str):
        return [Segment(m.content, True, k)]
    if m.content is None:
        return []
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


def _refuse_extras(messages: Sequence[Message], tools: Optional[list], name: str) -> None:
    if tools is not None:
        raise BadRecord("unsupported_field", f"{name} has no rendering for a tools list")
    for i, m in enumerate(messages):
        if m.extras:
            what = "reasoning_content" if m.reasoning is not None else (
                "tool_calls" if m.tool_calls else "tool_call_id/name")
            raise BadRecord("unsupported_field", f"{name} has no rendering for {what} (messages[{i}])")


def _arguments_json(call: Any) -> str:
    args = call.arguments
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _last_user(messages: Sequence[Message]) -> int:
    return max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)


def _tools_text(tools: list, intro: str) -> str:
    return intro + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)


def _with_tools_in_system(messages: Sequence[Message], tools: Optional[list], intro: str) -> Sequence[Message]:
    """The tools listed in the system turn (a new one if the dialogue has none)."""
    if tools is None:
        return messages
    listing = _tools_text(tools, intro)
    if messages and messages[0].role == "system":
        return (Message("system", f"{messages[0].text}\n\n{listing}"), *messages[1:])
    return (Message("system", listing), *messages)


# ------------------------------------------------------------------------- chatml


_CHATML_TOOLS = "# Tools\n\nYou may call these functions; write each call as <tool_call>\n{\"name\": ..., " \
                "\"arguments\": ...}\n</tool_call>:\n"


def _chatml_segments(messages: Sequence[Message], tools: Optional[list] = None, think: str = "learn") -> list[Segment]:
    segs: list[Segment] = []
    k = 0
    msgs = _strip_after_last_answer(_with_tools_in_system(messages, tools, _CHATML_TOOLS))
    last_user = -2  # computed only for a dialogue that carries reasoning
    for i, m in enumerate(msgs):
        if m.role == "assistant":
            segs.append(Segment("<|im_start|>assistant\n"))
            if m.reasoning is not None or m.tool_calls:
                if last_user == -2:
                    last_user = _last_user(msgs)
                segs += _chatml_rich_answer(m, k, think, i > last_user)
            else:
                segs += _answer_segments(m, k, fence=True)
            segs += [Segment("<|im_end|>", True, k), Segment("\n")]
            k += 1
        else:
            body = _fenced_text(m) if not isinstance(m.content, str) else m.content
            segs.append(Segment(f"<|im_start|>{m.role}\n{body}<|im_end|>\n"))
    return segs


def _chatml_rich_answer(m: Message, k: int, think: str, final: bool) -> list[Segment]:
    """Qwen's rendering: the think block before the answer, each tool call after it."""
    segs: list[Segment] = []
    if m.reasoning is not None and (final or think != "drop_history"):
        empty = not m.reasoning.strip()
        learned = think == "learn" or (think == "mask_empty" and not empty) or think == "drop_history"
        segs.append(Segment(f"<think>\n{m.reasoning.strip(chr(10))}\n</think>\n\n", learned, k))
    segs += _answer_segments(m, k, fence=True)
    for j, call in enumerate(m.tool_calls):
        sep = "\n" if (j or m.text) else ""
        segs.append(Segment(f'{sep}<tool_call>\n{{"name": {json.dumps(call.name, ensure_ascii=False)}, '
                            f'"arguments": {_arguments_json(call)}}}\n</tool_call>', True, k))
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


_LLAMA3_TOOLS = "You have access to the following functions. To call one, answer with " \
                "{\"name\": function name, \"parameters\": arguments as an object}.\n\n"


def _llama3_segments(messages: Sequence[Message], tools: Optional[list] = None, think: str = "learn") -> list[Segment]:
    # Like Meta's template, message content is stripped of surrounding whitespace.
    segs = [Segment("<|begin_of_text|>")]
    k = 0
    for i, m in enumerate(messages):
        if m.reasoning is not None:
            raise BadRecord("unsupported_field", f"llama3 has no rendering for reasoning_content (messages[{i}])")
    for m in _strip_after_last_answer(_with_tools_in_system(messages, tools, _LLAMA3_TOOLS)):
        segs.append(Segment(_llama3_header(m.role)))
        if m.role == "assistant":
            body = _answer_segments(_stripped(m), k, fence=True)
            for j, call in enumerate(m.tool_calls):  # Llama 3.1's JSON call
                sep = "\n" if (j or _stripped(m).text) else ""
                body.append(Segment(f'{sep}{{"name": {json.dumps(call.name, ensure_ascii=False)}, '
                                    f'"parameters": {_arguments_json(call)}}}', True, k))
            segs += body + [Segment("<|eot_id|>", True, k)]
            k += 1
        else:
            segs.append(Segment(_stripped(m).text + "<|eot_id|>" if isinstance(m.content, str)
                                else _fenced_text(_stripped(m)) + "<|eot_id|>"))
    return segs


def _stripped(m: Message) -> Message:
    if isinstance(m.content, str):
        return Message(m.role, m.content.strip(), m.reasoning, m.tool_calls)
    if m.content is None:
        return Message(m.role, "", m.reasoning, m.tool_calls)
    parts = list(m.content)
    if parts:
        parts[0] = Part(parts[0].type, parts[0].text.lstrip()) if parts[0].type == "text" else parts[0]
        parts[-1] = Part(parts[-1].type, parts[-1].text.rstrip()) if parts[-1].type == "text" else parts[-1]
    return Message(m.role, tuple(parts), m.reasoning, m.tool_calls)


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


def _chatglm2_segments(messages: Sequence[Message], eos: str, tools: Optional[list] = None) -> list[Segment]:
    _refuse_extras(messages, tools, "chatglm2")
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


def _special_segments(messages: Sequence[Message], tools: Optional[list] = None) -> list[Segment]:
    _refuse_extras(messages, tools, "special")
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


def _hf_template(tokenizer: Any, think: Optional[str], template_kwargs: Optional[dict]) -> ChatTemplate:
    from chatsft.data.hf import Locator

    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"data.template=hf: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template"
        )
    try:
        loc = Locator(tokenizer, think, template_kwargs)
    except ValueError as e:
        raise TemplateError(f"data.template=hf: cannot locate the assistant's answers in the tokenizer's "
                            f"chat template ({e}); pick a built-in template instead") from None

    def explain(messages: Sequence[Message], tools: Optional[list] = None,
                notes: Optional[Counter] = None) -> list[Segment]:
        full, answers, _ = loc.locate(messages, tools, _fenced_text, notes)
        segs: list[Segment] = []
        pos = 0
        for k, a in enumerate(answers):
            if pos < a.start:
                segs.append(Segment(full[pos:a.start]))
            holes = a.masked
            if a.content_at[0] >= 0 and not isinstance(a.message.content, str):
                holes = holes + _output_holes(a.message, full, *a.content_at)
            at = a.start
            if holes:
                for h0, h1 in sorted(holes):
                    h0, h1 = max(h0, at), min(h1, a.end)
                    if h1 <= h0:
                        continue
                    if at < h0:
                        segs.append(Segment(full[at:h0], True, k))
                    segs.append(Segment(full[h0:h1], False, k))
                    at = h1
            if at < a.end:
                segs.append(Segment(full[at:a.end], True, k))
            pos = a.end
        if pos < len(full):
            segs.append(Segment(full[pos:]))
        return segs

    def segments(messages: Sequence[Message], tools: Optional[list] = None) -> list[Segment]:
        return explain(messages, tools, None)

    def prompt(messages: Sequence[Message]) -> str:
        return loc.j.render(loc.dicts(loc.messages(messages)[0], _fenced_text), None, True)

    def contexts(messages: Sequence[Message], tools: Optional[list] = None) -> list[Optional[str]]:
        return loc.contexts(messages, tools, _fenced_text)

    shape = loc.shape
    end = shape.turn_end or shape.stops[0]
    special = {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
    markers = tuple(sorted(special | set(shape.stops), key=len, reverse=True))
    t = _with_control_re(ChatTemplate("hf", segments, prompt, end, (), think=loc.think, explain=explain,
                                      info=_hf_info(loc), contexts=contexts), markers)
    _self_check(t, loc)
    t.info.update(_hf_info(loc))  # the check may have turned features (or the markers) off
    return t


def _output_holes(m: Message, full: str, at: int, end: int) -> list[tuple[int, int]]:
    """Tool output fenced inside an answer (as placed in the render): context, not target."""
    segs = [_part_segment(p, 0, fence=True) for p in m.content]
    whole = "".join(s.text for s in segs)
    lead = whole.find(full[at:end])  # how much leading whitespace the template stripped
    holes, pos = [], 0
    for s in segs:
        if not s.supervised:
            holes.append((at + max(0, pos - lead), at + max(0, pos + len(s.text) - lead)))
        pos += len(s.text)
    return [(a, min(b, end)) for a, b in holes if min(b, end) > a]


def _hf_info(loc: Any) -> dict:
    s = loc.shape
    how = {"kept": "kept where it is", "moved": "moved by the template into a later turn",
           "dropped": "dropped by the template", "folded": "folded into the first user turn (the template "
                                                          "raises on a system role)"}[s.system]
    info = {
        "strategy": "markers" if s.markers else "located",
        "render": s.render,
        "header": s.header,
        "generation_prompt_extra": s.gen_extra,
        "between_header_and_answer": s.lead,
        "stops": list(s.stops),
        "stop_kind": "end-of-turn marker" if s.turn_end else "next role tag (no end-of-turn marker)",
        "think": loc.think,
        "think_default": s.default_think,
        "think_default_why": s.default_think_why,
        "think_tags": [s.think_open, s.think_close] if s.think_close else None,
        "reasoning_rendered": s.reasoning,
        "tool_calls_rendered": s.tools and "tool_calls" not in s.features,
        "system": how,
        "features": _hf_features(s),
        "serving_reference": "apply_chat_template(history, add_generation_prompt=True)",
    }
    if s.markers_note:
        info["markers_note"] = s.markers_note
    if s.call_stop:
        info["call_stop"] = s.call_stop
    if loc.j.extra:
        info["chat_template_kwargs"] = dict(loc.j.extra)
    return info


def _hf_features(s: Any) -> dict:
    """Each feature: {"supported": bool, "how": what the template does with it (or why it cannot)}."""
    reasoning = {"all": "rendered for every answer", "final": "rendered for the answers after the last user "
                 "message only (earlier ones' reasoning is dropped, as at inference)",
                 "none": "not rendered: a final answer carrying it is refused (reasoning_not_rendered), an "
                 "earlier one's is dropped as the template drops it"}[s.reasoning]
    calls = (f"named by {'their id (calls without one get functions.NAME:IDX)' if s.call_key == 'id' else 'the function'}"
             f", arguments given as {'an object' if s.arguments == 'object' else 'JSON text'}"
             + (f", the answer stops at {s.call_stop!r} after its calls" if s.call_stop else ""))
    how = {"reasoning": reasoning, "tool_calls": calls, "tool_results": "context, never learned"}
    out = {}
    for key in ("reasoning", "tool_calls", "tool_results"):
        why = s.features.get(key)
        out[key] = ({"supported": False, "how": f"the template {why}; records that use it are refused "
                                                f"({key}_unsupported)"}
                    if why else {"supported": True, "how": how[key]})
    return out


def _self_check(t: ChatTemplate, loc: Any) -> None:
    """The locator on probe dialogues: every answer learned, no other message's text learned. A plain
    dialogue that fails refuses the template; one that uses a feature (reasoning, tool calls, tool
    results) turns that feature off alone. Also decides whether {% generation %} markers agree with the
    rule (else the located mask is used)."""
    from chatsft.data.conversation import ToolCall

    sys_, q1, q2, a1, a2, r2 = ("Zqs be brief.", "Zqu how far?", "Zqu and back?", "Zqa two miles.",
                                "Zqa four miles.", "Zqr add both legs.")
    call = ToolCall("zq_route", json.dumps({"type": "function", "function": {"name": "zq_route",
                                                                            "arguments": {"to": "zq"}}}))
    asks = Message("assistant", None, tool_calls=(call,))
    tools = [{"type": "function", "function": {"name": "zq_route", "parameters": {}}}]
    dialogues = [
        (None, (Message("system", sys_), Message("user", q1), Message("assistant", a1), Message("user", q2),
                Message("assistant", a2)), None),
        ("reasoning", (Message("user", q1), Message("assistant", a1), Message("user", q2),
                       Message("assistant", a2, reasoning=r2)), None),
        ("tool_calls", (Message("user", q1), asks), tools),
        ("tool_results", (Message("user", q1), asks, Message("tool", "Zqt 2 miles", tool_call_id="c1",
                                                             name="zq_route"), Message("assistant", a2)), tools),
    ]
    off = loc.shape.features
    for feature, msgs, tools in dialogues:
        if feature in off:
            continue
        try:
            segs = t.segments(msgs, tools)
        except BadRecord as e:
            if e.reason == "generation_mask_mismatch" and loc.shape.markers:
                loc.shape.markers = False
                loc.shape.markers_note = f"{{% generation %}} markers not used: {e.detail}"
                t.info["strategy"], t.info["markers_note"] = "located", loc.shape.markers_note
                return _self_check(t, loc)
            if e.reason == "reasoning_not_rendered" and feature == "reasoning":
                continue  # a template without reasoning: records that carry it are refused one by one
            problem = f"cannot place a probe's answer ({e.detail or e.reason})"
        else:
            problem = _learned_problem(segs, msgs, loc)
        if problem is None:
            continue
        if feature is None:
            raise TemplateError(f"data.template=hf: cannot locate the assistant's answers in the tokenizer's "
                                f"chat template ({problem}); pick a built-in template instead")
        off[feature] = problem
        if feature == "tool_calls":
            off.setdefault("tool_results", "cannot render the tool calls they answer")


def _learned_problem(segs: Sequence[Segment], msgs: Sequence[Message], loc: Any) -> Optional[str]:
    learned = "".join(s.text for s in segs if s.supervised)
    for m in msgs:
        text = m.text.strip()
        if m.role == "assistant" and text and text not in learned:
            return f"does not let the answer {text!r} of a probe be learned"
        if m.role == "tool" and text and text in learned:
            return ("writes what a tool returned where the next answer is learned (after its header): it would "
                    "be learned as the model's words")
        if m.role != "assistant" and text and text in learned:
            return f"puts the {m.role} text {text!r} of a probe where an answer is learned"
        for k, call in enumerate(m.tool_calls):
            key = loc.call_dict(call, k).get("id") if loc.shape.call_key == "id" else call.name
            if key not in learned:
                return f"does not let a probe's call to {call.name!r} be learned"
    return None


# ---------------------------------------------------------------------- registry


def get_template(name: str, tokenizer: Any, think: Optional[str] = None,
                 template_kwargs: Optional[dict] = None) -> ChatTemplate:
    """Bind a format (and a think policy; None: the format's own; and, for hf, the template's extra
    variables, data.chat_template_kwargs) to a tokenizer; refuse it if its control tokens are not
    single tokens."""
    name = getattr(name, "value", name)
    think = getattr(think, "value", think)
    if think is not None and think not in ("learn", "mask_empty", "drop_history"):
        raise TemplateError(f"data.think: expected learn, mask_empty or drop_history; got {think!r}")
    if name == "hf":
        return _hf_template(tokenizer, think, template_kwargs)
    if template_kwargs:
        raise TemplateError(f"data.chat_template_kwargs: only for data.template=hf, not {name}")
    eos = getattr(tokenizer, "eos_token", None)
    policy = think or "learn"
    if name == "chatml":
        t = ChatTemplate("chatml", lambda m, tools=None: _chatml_segments(m, tools, policy), _chatml_prompt,
                         "<|im_end|>", ("<|im_start|>", "<|im_end|>"))
    elif name == "llama3":
        t = ChatTemplate("llama3", lambda m, tools=None: _llama3_segments(m, tools, policy), _llama3_prompt,
                         "<|eot_id|>",
                         ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    elif name == "chatglm2":
        if not eos:
            raise TemplateError("data.template=chatglm2: the tokenizer has no eos_token to end answers with")
        t = ChatTemplate("chatglm2", lambda m, tools=None: _chatglm2_segments(m, eos, tools),
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
    served = bool(getattr(tokenizer, "chat_template", None))
    info = {"strategy": "built-in", "stops": [t.end_of_turn], "stop_kind": "end-of-turn marker",
            "think": policy, "think_default": "learn",
            "think_default_why": "a built-in format renders every think block a record carries",
            "reasoning_rendered": ("final" if policy == "drop_history" else "all") if name == "chatml" else "none",
            "tool_calls_rendered": name in ("chatml", "llama3"),
            "system": "folded into the first user turn" if name in ("chatglm2", "special") else "kept where it is",
            "features": _builtin_features(name),
            "serving_reference": ("apply_chat_template(history, add_generation_prompt=True): the tokenizer's own "
                                  "chat template, which a server uses" if served else
                                  f"the {name} prompt chatsft evaluates with (the tokenizer has no chat template)")}
    return _with_control_re(dataclasses.replace(t, think=policy, info=info,
                                                contexts=_served_contexts(tokenizer, t.prompt, served)), markers)


def _builtin_features(name: str) -> dict:
    family = {"chatml": "as Qwen renders them", "llama3": "as Llama 3.1 renders them"}
    out = {}
    for key, what in (("reasoning", "reasoning_content"), ("tool_calls", "tool_calls"),
                      ("tool_results", "tool messages")):
        if name == "chatml" or (name == "llama3" and key != "reasoning"):
            out[key] = {"supported": True, "how": f"rendered {family[name]}" if key != "tool_results"
                        else "context, never learned"}
        else:
            out[key] = {"supported": False, "how": f"{name} has no rendering for {what}; records that carry it are "
                                                   "refused (unsupported_field)"}
    return out


def _served_contexts(tokenizer: Any, prompt: Callable, served: bool) -> Callable:
    """For a built-in format: what a server puts before each answer (the tokenizer's own chat template,
    or without one, the format's prompt)."""
    from chatsft.data.hf import hf_message

    def contexts(messages: Sequence[Message], tools: Optional[list] = None) -> list[Optional[str]]:
        out: list[Optional[str]] = []
        msgs = [hf_message(m, None if isinstance(m.content, (str, type(None))) else _fenced_text(m))
                for m in messages] if served else []
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            try:
                out.append(tokenizer.apply_chat_template(msgs[:i], tools=tools, tokenize=False,
                                                         add_generation_prompt=True)
                           if served else prompt(messages[:i]))
            except Exception:
                out.append(None)
        return out

    return contexts


def _with_control_re(t: ChatTemplate, markers: tuple[str, ...]) -> ChatTemplate:
    pattern = re.compile("|".join(re.escape(m) for m in markers)) if markers else None
    return dataclasses.replace(t, control_tokens=markers, _control_re=pattern)
