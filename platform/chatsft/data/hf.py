"""`data.template: hf`: the tokenizer's own chat template, learned exactly as the model generates it.

The rule (docs/templates.md states it for users):
- the text is `apply_chat_template(messages, tools=...)` of the whole record, with no generation
  prompt; the conversation is never rewritten, except that a template which raises on a system
  message gets the system folded into the first user turn (and the report says so);
- learned, for each answer: what the model emits after the prompt of that turn: everything from
  the end of the assistant header (the generation prompt, as far as the history shares it) through
  the stop (the template's end-of-turn marker; without one, the next role tag or the eos the
  template writes after the last message). So a separator after the header, a think block, the
  answer and its tool calls are learned; nothing of another message is.

How, without rendering every prefix (quadratic in turns): probes rendered once per template give
the assistant header as the history shows it, what the generation prompt adds beyond it, the stop
markers and the think tags. Each record is then rendered once, and its messages are found in order
in that one text: an answer starts at the last header before its first piece (reasoning, content,
tool call) and ends at the first stop after its last piece. Where the header cannot be found
(a template that writes none after a tool result, say) that record falls back to rendering the
prompt of each turn and taking what it shares with the whole. An answer whose text is not in the
render, or a final answer whose reasoning the template dropped, is refused with a reason: never a
silently wrong mask.

A template with `{% generation %}` markers: its spans (Hugging Face's assistant mask) are used,
and each record's spans must equal what the rule locates.

Features degrade one at a time: a probe for reasoning, tool calls or tool results that fails turns
that feature off alone (`Shape.features` says why); records that do not use it render as before,
records that do are refused with the feature named (`reasoning_unsupported`, ...).

Tool calls go to the template as it renders them: `arguments` as an object or as JSON text,
whichever the probes show it renders as an object (never a double-encoded string), and, for a
template that names a call by its id rather than its function (Kimi K2), an id
`functions.NAME:IDX` (IDX counting the record's calls from 0) for every call without one.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from chatsft.data.conversation import BadRecord, Message, ToolCall, merge_system
from chatsft.errors import one_line

# Probe texts: words no template writes, so each is found exactly where its message went.
_SYS, _U1, _A1, _U2, _A2 = ("Zqs system probe.", "Zqu first question?", "Zqa first answer.",
                            "Zqu second question?", "Zqa second answer.")
_R1, _R2, _TOOL = "Zqr first thought.", "Zqr second thought.", "Zqt tool result."
_FN = "zq_lookup"
_ARGS = {"zq_key": "zq value"}
_CALL = {"type": "function", "function": {"name": _FN, "arguments": _ARGS}}
# Ids a call probe tries, after none: Kimi K2's form, and Mistral's nine alphanumerics.
_CALL_IDS = (f"functions.{_FN}:0", "zqcall001")
FEATURES = {"reasoning": "reasoning_content", "tool_calls": "tool calls", "tool_results": "tool results"}
_SCHEMA = {"type": "function", "function": {"name": _FN, "description": "Zq probe tool.",
                                            "parameters": {"type": "object",
                                                           "properties": {"zq_key": {"type": "string"}}}}}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class Unlocatable(Exception):
    """The fast path cannot place an answer; the record may still be placed turn by turn. `reason`:
    the refusal it becomes if that cannot place it either."""

    def __init__(self, detail: str, reason: Optional[str] = None):
        super().__init__(detail)
        self.reason = reason


@dataclass
class Shape:
    """What probes tell about a template, once."""

    header: str  # the assistant header as the history shows it ('' when the prompt ends at the user's closing)
    gen_extra: str  # what the generation prompt adds after that header (history may lack it)
    turn_end: Optional[str]  # the marker after every answer, if there is one
    stops: tuple[str, ...]  # where an answer ends: the turn end, or the next role tags / a final eos
    think_open: Optional[str]
    think_close: Optional[str]
    lead: str  # what the history puts between the header and a final answer without reasoning
    system: str  # kept | moved | dropped | folded
    reasoning: str  # which answers' reasoning the template renders: all | final | none
    tools: bool  # renders tool calls
    markers: bool  # {% generation %} markers used for the mask
    closers: tuple[str, ...] = ()  # without a header: the markers that end a user turn / tool result
    markers_note: str = ""  # why markers were not used, if present but disagreeing
    render: str = "compiled"  # compiled | apply_chat_template (when the direct render differed)
    default_think: str = "learn"
    default_think_why: str = ""
    features: dict = field(default_factory=dict)  # FEATURES key -> what the template does wrong (absent: fine)
    call_key: str = "name"  # a call is found in the render by its function's name, or by its id (Kimi K2)
    arguments: str = "object"  # what the template gets as a call's arguments: object, or JSON text
    call_stop: Optional[str] = None  # what ends an answer that calls tools, where no turn end follows it
    result_closers: tuple[str, ...] = ()  # the marker that ends a tool result (before the answer after it)


# The sandbox decides, on every `message.content.strip()` or `loop.index0`, whether the
# attribute may be used: jinja2's rule (no `_` names, no internals of functions, methods, code,
# frames, generators; no mutating method of a known mutable type) reads only the type of the
# object and the name, never the value, and asking it is half the cost of rendering a record.
# So the answer is remembered per (type, name), where the environment's rule is jinja2's own.


def _remember_safe_attributes(env: Any) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEnvironment

    rule = type(env).is_safe_attribute
    if rule not in (ImmutableSandboxedEnvironment.is_safe_attribute, SandboxedEnvironment.is_safe_attribute):
        return  # a rule of someone else's may read the value
    decide = env.is_safe_attribute
    known: dict[tuple[type, str], bool] = {}

    def is_safe_attribute(obj: Any, attr: str, value: Any) -> bool:
        key = (type(obj), attr)
        if key not in known:
            known[key] = decide(obj, attr, value)
        return known[key]

    env.is_safe_attribute = is_safe_attribute


# `m.role` on a message dict: the sandbox tries the attribute first (a dict has none of that name: an
# AttributeError raised and caught), then the key, and a missing key raises a KeyError too. A plain dict's
# attributes are its class's (no instance __dict__), so for a name the class lacks the answer is the key,
# or undefined: the same value without the exceptions, a third of the render of a template that reads
# message fields (Gemma 4, Kimi K2 style).
_DICT_ATTRIBUTES = frozenset(dir(dict))


def _dict_keys_directly(env: Any) -> None:
    attribute_of = env.getattr
    undefined = env.undefined

    def getattr_(obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            return obj[attribute] if attribute in obj else undefined(obj=obj, name=attribute)
        return attribute_of(obj, attribute)

    env.getattr = getattr_


class Jinja:
    """Renders the template exactly as apply_chat_template(tokenize=False) does, without its
    per-call overhead (several times the cost of the render itself)."""

    def __init__(self, tokenizer: Any, extra: Optional[dict] = None):
        self.tok = tokenizer
        self.extra = dict(extra or {})  # data.chat_template_kwargs: over the special tokens, as transformers does
        self.kwargs = {**tokenizer.special_tokens_map, **self.extra}
        self.slow = False
        self._sources: dict[bool, str] = {}
        self._compiled: dict[str, Any] = {}
        try:
            from transformers.utils.chat_template_utils import (_cached_compile_jinja_template,
                                                                _render_with_assistant_indices)

            self._fresh, self._indices = _cached_compile_jinja_template, _render_with_assistant_indices
        except ImportError:  # another transformers: its public path, slower but the same text
            self.slow = True

    def _compile(self, source: str) -> Any:
        """The template compiled as transformers compiles it (the same sandbox), in an environment
        of our own whose attribute checks are remembered for immutable builtin values."""
        if source not in self._compiled:
            template = self._fresh(source)
            _remember_safe_attributes(template.environment)
            _dict_keys_directly(template.environment)
            self._compiled[source] = template
        return self._compiled[source]

    def source(self, tools: Optional[list]) -> str:
        key = tools is not None
        if key not in self._sources:
            self._sources[key] = self.tok.get_chat_template(None, tools)
        return self._sources[key]

    def render(self, msgs: list[dict], tools: Optional[list], gen: bool) -> str:
        if self.slow:
            return self.reference(msgs, tools, gen)
        return self._compile(self.source(tools)).render(messages=msgs, tools=tools, documents=None,
                                                        add_generation_prompt=gen, **self.kwargs)

    def render_marked(self, msgs: list[dict], tools: Optional[list]) -> tuple[str, list[tuple[int, int]]]:
        return self._indices(self._compile(self.source(tools)), msgs, tools, None, False, **self.kwargs)

    def reference(self, msgs: list[dict], tools: Optional[list], gen: bool) -> str:
        return self.tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen,
                                            **self.extra)


def hf_message(m: Message, fenced: Optional[str] = None) -> dict:
    """A message as apply_chat_template hands it to the template (None-valued keys dropped,
    reasoning also under `thinking`, as transformers aliases it)."""
    if not m.extras and isinstance(m.content, str):
        return {"role": m.role, "content": m.content}  # the common case, kept cheap
    content = m.content if isinstance(m.content, str) or m.content is None else fenced
    d: dict = {"role": m.role}
    if content is not None:
        d["content"] = content
    d.update(m.extra_fields())
    if m.reasoning is not None:
        d = {"thinking": m.reasoning, **d, "reasoning_content": m.reasoning}
    return d


# ------------------------------------------------------------------------ helpers


def common_prefix_len(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # slices compare in C: log n of them beat a character loop in Python
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def find_any(text: str, variants: Sequence[str], lo: int, hi: int) -> tuple[int, int]:
    """(start, length) of the first variant found inside text[lo:hi], else (-1, 0)."""
    for v in variants:
        if v:
            at = text.find(v, lo, hi)
            if at >= 0:
                return at, len(v)
    return -1, 0


def find_text(text: str, body: str, lo: int, hi: int, variants: Any) -> tuple[int, int]:
    """find_any over variants(body), trying body itself first: the variants cost more than the search."""
    at = text.find(body, lo, hi) if body else -1
    if at >= 0:
        return at, len(body)
    return find_any(text, variants(body), lo, hi)


def content_variants(text: str) -> list[str]:
    """The text, then what templates commonly make of it: trimmed, or its part after an inline
    think block (Qwen3 and DeepSeek-R1 templates split `<think>...</think>` off the content)."""
    out = [text, text.strip(), text.lstrip("\n")]
    if "</think>" in text:
        tail = text.split("</think>")[-1]
        out += [tail.lstrip("\n"), tail.strip(), tail]
    return list(dict.fromkeys(v for v in out if v))


def context_variants(text: str) -> list[str]:
    """A user, system or tool text as templates print it: as is, trimmed, or inside JSON (tool results)."""
    quoted = json.dumps(text, ensure_ascii=False)[1:-1]
    return list(dict.fromkeys(v for v in (text, text.strip(), quoted, json.dumps(text)[1:-1]) if v))


def inline_reasoning(text: str) -> Optional[str]:
    if "</think>" not in text:
        return None
    return text.split("</think>")[0].split("<think>")[-1]


def reasoning_variants(text: str) -> list[str]:
    return list(dict.fromkeys(v for v in (text, text.strip("\n"), text.strip()) if v))


def shown(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


class Atoms:
    """The tokenizer's added tokens (special or not): strings that always encode as one token,
    so a cut inside one would split a token."""

    def __init__(self, tokenizer: Any):
        added = [t for t in (getattr(tokenizer, "get_added_vocab", dict)() or {}) if t and not t.isspace()]
        added += [t for t in getattr(tokenizer, "all_special_tokens", []) or [] if t]
        self.tokens = sorted(set(added), key=len, reverse=True)
        self.re = re.compile("|".join(re.escape(t) for t in self.tokens)) if self.tokens else None
        self.longest = max((len(t) for t in self.tokens), default=0)

    def first(self, text: str, lo: int = 0, hi: Optional[int] = None) -> Optional[re.Match]:
        if self.re is None:
            return None
        return self.re.search(text, lo, len(text) if hi is None else hi)

    def last(self, text: str, lo: int, hi: int) -> Optional[re.Match]:
        found = None
        if self.re is not None:
            for found in self.re.finditer(text, lo, hi):
                pass
        return found

    def safe_cut(self, text: str, n: int) -> int:
        """n, moved back to the start of an added token it would cut."""
        if self.re is None or n <= 0:
            return n
        lo = max(0, n - self.longest)
        for m in self.re.finditer(text, lo, min(len(text), n + self.longest)):
            if m.start() < n < m.end():
                return m.start()
        return n


# ----------------------------------------------------------------------- probes


def analyse(j: Jinja, atoms: Atoms) -> Shape:
    """Read the template's shape off a few probe renders (raises ValueError with the reason)."""
    u1, a1, u2, a2 = ({"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
                      {"role": "user", "content": _U2}, {"role": "assistant", "content": _A2})
    try:
        two = j.render([u1, a1, u2, a2], None, False)
        one = j.render([u1, a1], None, False)
        prompt = j.render([u1], None, True)
    except Exception as e:
        raise ValueError(f"it fails on a plain dialogue: {one_line(e)}") from None
    for probe in (_U1, _A1, _U2, _A2):
        if probe not in two:
            raise ValueError(f"the probe text {probe!r} is not in its render: the template drops or rewrites "
                             "what messages say")
    if _U1 not in prompt:
        raise ValueError("the generation prompt does not hold the user's message")

    # Header: what the prompt and the history share after the user's message, less the user's closing.
    after_user = prompt[prompt.find(_U1) + len(_U1):]
    x = one.find(_U1) + len(_U1)
    between = one[x: one.find(_A1)]
    shared = atoms.safe_cut(between, common_prefix_len(after_user, between))
    try:
        alone = j.render([u1], None, False)
        closing = alone[alone.find(_U1) + len(_U1):]
    except Exception:
        closing = ""
    closing_len = atoms.safe_cut(between, common_prefix_len(closing, between[:shared]))
    header = between[closing_len:shared]
    gen_extra = after_user[shared:]
    lead = between[shared:]

    # Stops: the first added token after a non-final and after the final answer.
    e1, e2 = two.find(_A1) + len(_A1), two.find(_A2) + len(_A2)
    t1 = atoms.first(two, e1, two.find(_U2))
    t2 = atoms.first(two, e2)
    if t1 is None:
        raise ValueError("nothing marks where an answer ends (no end-of-turn marker and no special token "
                         "before the next turn): a model would never learn to stop")
    turn_end = t1.group(0) if t2 is not None and t2.group(0) == t1.group(0) else None
    stops = [t1.group(0)] if turn_end else [t1.group(0)] + ([t2.group(0)] if t2 is not None else [])

    # System: kept where it was, moved (into a later turn), dropped, or folded (the template refuses it).
    system = "kept"
    try:
        with_sys = j.render([{"role": "system", "content": _SYS}, u1, a1, u2, a2], None, False)
        if _SYS not in with_sys:
            system = "dropped"
        elif with_sys.find(_SYS) > with_sys.find(_U1):
            system = "moved"
    except Exception:
        system = "folded"

    # Reasoning: rendered for every answer, the final one only, or none; its think tags.
    features: dict[str, str] = {}
    reasoning, think_open, think_close = "none", None, None
    try:
        r = j.render([u1, {**a1, "thinking": _R1, "reasoning_content": _R1}, u2,
                      {"thinking": _R2, **a2, "reasoning_content": _R2}], None, False)
    except Exception as e:
        r = ""
        features["reasoning"] = f"fails on an answer with reasoning_content ({one_line(e)})"
    if _R2 in r:
        reasoning = "all" if _R1 in r else "final"
        y = r.find(_U2) + len(_U2)
        think_open = r[y + shared: r.find(_R2)].strip() or None  # after the user's closing and the header
        think_close = r[r.find(_R2) + len(_R2): r.find(_A2)].strip() or None
        if think_open is None and y + shared > r.find(_R2):  # the header as found holds the opener (below)
            opener = atoms.last(r, y, r.find(_R2))
            think_open = r[opener.start(): r.find(_R2)].strip() or None if opener is not None else None
    # Thinking off by the template's variables (Kimi's thinking=false, Qwen3's enable_thinking=false): the
    # generation prompt closes an empty think block that a final answer's history writes too, so the
    # probes read it as part of the header. It is what the prompt adds: an answer with reasoning opens its
    # own block right after the header.
    if think_open and think_close and think_open in header:
        h = header.rfind(think_open)
        block = header[h:]
        if block.startswith(think_open) and block[len(think_open):].strip() == think_close:
            header, gen_extra, lead = header[:h], block + gen_extra, block + lead

    # Without a header, an answer starts after the marker that closes the user turn (or tool result).
    closers = []
    last = atoms.last(between, 0, shared)
    if last is not None:
        closers.append(last.group())

    # Tools: how a call is given and shown, what ends an answer that calls, where a tool result goes.
    tools, arguments, call_key, call_stop, result_closers = False, "object", "name", None, ()
    try:
        arguments, call_key, call, call_only = _probe_calls(j, u1)
    except ValueError as e:
        features["tool_calls"] = str(e)
        features["tool_results"] = "cannot render the tool calls they answer"
    else:
        tools = True
        call_msg = {"role": "assistant", "tool_calls": [call]}
        key = call["id"] if call_key == "id" else _FN
        tool_msg = {"role": "tool", "content": _TOOL, "tool_call_id": call.get("id", "call_zq"), "name": _FN}
        try:
            with_tool = j.render([u1, call_msg, tool_msg, a2], [_SCHEMA], False)
        except Exception as e:
            with_tool = ""
            features["tool_results"] = f"fails on a tool result after a call ({one_line(e)})"
        if with_tool and _TOOL not in with_tool:
            features["tool_results"] = "drops what a tool returned"
        elif with_tool:
            x = with_tool.find(key, with_tool.find(_U1) + len(_U1)) + len(key)
            tool_at = with_tool.find(_TOOL, x)
            cut = atoms.safe_cut(with_tool, common_prefix_len(call_only, with_tool))
            after = tool_at + len(_TOOL)
            closed = atoms.last(with_tool, after, with_tool.find(_A2, after))
            if closed is not None:
                result_closers = (closed.group(),)
                if not header and closed.group() not in closers:
                    closers.append(closed.group())
            if not turn_end:  # GLM: the model stops at the tag that opens the tool result
                opener = atoms.first(with_tool, cut)
                if opener is not None and opener.group(0) not in stops:
                    stops.append(opener.group(0))
            elif with_tool.find(turn_end, x, tool_at) < 0:
                # No turn end between the calls and their results (Gemma 4: the results go into the model's
                # turn): the answer stops at the last marker the template writes after the calls either way.
                closed = atoms.last(with_tool, x, cut)
                if closed is None:
                    features["tool_calls"] = ("writes nothing between a call and its result: a model would never "
                                              "learn to stop after its calls")
                    features["tool_results"] = features["tool_calls"]
                else:
                    call_stop = closed.group()
                    if call_stop not in stops:
                        stops.append(call_stop)

    eos = getattr(j.tok, "eos_token", None)
    if not turn_end and eos and eos not in stops and atoms.re is not None and eos in atoms.tokens:
        stops.append(eos)

    markers = bool(_GENERATION_TAG.search(j.source(None) or "")) and not j.slow
    shape = Shape(header, gen_extra, turn_end, tuple(stops), think_open, think_close, lead, system,
                  reasoning, tools, markers, closers=tuple(closers), features=features, call_key=call_key,
                  arguments=arguments, call_stop=call_stop, result_closers=result_closers)
    shape.default_think, shape.default_think_why = default_think(shape)
    return shape


def _probe_calls(j: Jinja, u1: dict) -> tuple[str, str, dict, str]:
    """How the template takes a call: (arguments "object" or "text", found by "name" or "id", the probe
    call in that form, the render of the dialogue ending in that call). ValueError: it takes none."""
    seen: list[str] = []
    for probe_id in (None, *_CALL_IDS):
        chosen = None
        for arguments, value in (("object", _ARGS), ("text", json.dumps(_ARGS))):
            call = {"type": "function", "function": {"name": _FN, "arguments": value}}
            if probe_id:
                call["id"] = probe_id
            try:
                text = j.render([u1, {"role": "assistant", "tool_calls": [call]}], [_SCHEMA], False)
            except Exception as e:
                seen.append(f"fails on a tool call ({one_line(e)})")
                continue
            after = text[text.find(_U1) + len(_U1):]
            if '\\"zq_key' in after or "'zq_key'" in after:  # a JSON string of JSON, or Python's repr
                seen.append(f"renders the arguments as a string, not an object "
                            f"({shown(after[max(0, after.find('zq_key') - 3):], 30)})")
                continue
            chosen = (arguments, call, text, after)
            break
        if chosen is None:
            continue
        arguments, call, text, after = chosen
        if probe_id and probe_id in after:
            return arguments, "id", call, text
        if _FN in after:
            return arguments, "name", call, text
        seen.append("writes neither the function's name nor the call's id")
    raise ValueError(seen[0] if seen else "renders no tool call")


def default_think(s: Shape) -> tuple[str, str]:
    """What the template does at inference, as a think policy."""
    if s.gen_extra and s.think_close and s.think_close in s.gen_extra:
        return "mask_empty", (f"the generation prompt already holds a closed think block "
                              f"({shown(s.gen_extra)}): thinking is off at inference, so an empty block is "
                              "prompt, not output")
    if s.reasoning == "final":
        return "drop_history", ("the template renders reasoning for the final answer only: earlier think "
                                "blocks are the template's rewriting, not what the model wrote")
    if s.reasoning == "all":
        return "learn", "the template keeps every answer's reasoning as written"
    return "learn", "the template renders no reasoning"


# ---------------------------------------------------------------------- the locator


@dataclass(slots=True)
class _Answer:
    start: int  # first learned character
    end: int  # end of the learned stop (or of the last piece, without one)
    stop: Optional[str]
    pieces: list  # (kind, start, end)
    masked: list  # (start, end) of think blocks the policy makes context
    content_at: tuple[int, int]  # where the content text is (-1, -1 without content)
    message: Message


class Locator:
    """Text and learned character spans of one record, under the rule."""

    def __init__(self, tokenizer: Any, think: Optional[str], template_kwargs: Optional[dict] = None):
        self.j = Jinja(tokenizer, template_kwargs)
        self.atoms = Atoms(tokenizer)
        self.shape = analyse(self.j, self.atoms)
        self.think = think or self.shape.default_think
        self._marks_re: Optional[re.Pattern] = None
        # A header holding a special token occurs only where the template writes it: no message text may
        # hold one (ChatTemplate.check_content).
        special = [t for t in getattr(tokenizer, "all_special_tokens", []) or [] if t]
        self.header_marked = any(t in self.shape.header for t in special)
        self._verify_render()

    def _verify_render(self) -> None:
        """The direct render must give apply_chat_template's text, or that slower path is used."""
        probes = [([{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}], None, False),
                  ([{"role": "user", "content": _U1}], None, True)]
        if self.shape.tools:
            call = self.call_dict(ToolCall(_FN, json.dumps(_CALL)), 0)
            probes.append(([{"role": "user", "content": _U1}, {"role": "assistant", "tool_calls": [call]}],
                           [_SCHEMA], False))
        if self.j.slow:
            self.shape.render = "apply_chat_template"
            return
        for msgs, tools, gen in probes:
            try:
                same = self.j.render(msgs, tools, gen) == self.j.reference(msgs, tools, gen)
            except Exception:
                same = False
            if not same:
                self.j.slow = True
                self.shape.render = "apply_chat_template"
                self.shape.markers = False
                return

    # -------------------------------------------------------------- one record

    def messages(self, messages: Sequence[Message]) -> tuple[Sequence[Message], bool]:
        if self.shape.system == "folded" and any(m.role == "system" for m in messages):
            return merge_system(messages), True
        return messages, False

    def call_dict(self, t: ToolCall, index: int) -> dict:
        """A call as the template takes it: arguments as it renders an object (decoded from JSON text, or
        encoded as such), and an id functions.NAME:INDEX where the template names calls by id."""
        c = t.call
        fn = c["function"]
        args = fn["arguments"]
        if self.shape.arguments == "object" and isinstance(args, str):
            decoded = t.arguments_object
            args = decoded if decoded is not None else args  # text kept as text (data.tool_arguments)
        elif self.shape.arguments == "text" and not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        named = self.shape.call_key == "id" and t.id is None
        if args is fn["arguments"] and not named:
            return c
        out = {**c, "function": {**fn, "arguments": args}}
        if named:
            out["id"] = f"functions.{t.name}:{index}"
        return out

    def dicts(self, typed: Sequence[Message], fenced: Any, notes: Optional[Counter] = None) -> list[dict]:
        """The messages as the template gets them (tool calls as call_dict makes them)."""
        out = []
        calls = 0
        for m in typed:
            d = hf_message(m, None if isinstance(m.content, str) or m.content is None else fenced(m))
            if m.tool_calls:
                d["tool_calls"] = [self.call_dict(t, calls + k) for k, t in enumerate(m.tool_calls)]
                if notes is not None and self.shape.call_key == "id":
                    given = sum(t.id is None for t in m.tool_calls)
                    if given:
                        notes["tool calls given an id functions.NAME:IDX (the record had none)"] += given
                calls += len(m.tool_calls)
            out.append(d)
        return out

    def refuse_unsupported(self, typed: Sequence[Message]) -> None:
        """A record that uses a feature the template cannot render is refused, naming the feature."""
        off = self.shape.features
        if not off:
            return
        for i, m in enumerate(typed):
            if m.role == "tool" and "tool_results" in off:
                feature, what = "tool_results", "is a tool result"
            elif m.tool_calls and "tool_calls" in off:
                feature, what = "tool_calls", "calls a tool"
            elif m.reasoning is not None and "reasoning" in off:
                feature, what = "reasoning", "carries reasoning_content"
            else:
                continue
            raise BadRecord(f"{feature}_unsupported", f"messages[{i}] {what}, and the template {off[feature]}")

    def contexts(self, messages: Sequence[Message], tools: Optional[list], fenced: Any) -> list[Optional[str]]:
        """What the model reads before each answer at inference: the template's render of the history with
        the generation prompt (None where the template fails on it)."""
        typed, _ = self.messages(messages)
        msgs = self.dicts(typed, fenced)
        out: list[Optional[str]] = []
        for i, m in enumerate(typed):
            if m.role == "assistant":
                try:
                    out.append(self.j.render(msgs[:i], tools, True))
                except Exception:
                    out.append(None)
        return out

    def locate(self, messages: Sequence[Message], tools: Optional[list], fenced: Any,
               notes: Optional[Counter] = None) -> tuple[str, list[_Answer], list[dict]]:
        """(text, one _Answer per assistant message, the dicts rendered)."""
        typed, folded = self.messages(messages)
        self.refuse_unsupported(typed)
        msgs = self.dicts(typed, fenced, notes)
        spans = None
        try:
            if self.shape.markers:
                full, spans = self.j.render_marked(msgs, tools)
            else:
                full = self.j.render(msgs, tools, False)
        except Exception as e:
            raise BadRecord("template_error", one_line(e)) from None
        if notes is not None and folded:
            notes["system folded into the first user turn"] += 1
        answers = self._answers(full, typed, msgs, tools, notes)
        if spans is not None:
            self._check_markers(full, answers, spans)
        return full, answers, msgs

    def _marks(self, full: str) -> tuple[list[int], list, list[int]]:
        """Header positions, and (position, stop) of every stop, in one pass over the text."""
        if self._marks_re is None:
            alts = sorted({t for t in (self.shape.header, *self.shape.stops) if t}, key=len, reverse=True)
            self._marks_re = re.compile("|".join(re.escape(t) for t in alts))
        header = self.shape.header
        heads, stop_at = [], []
        for hit in self._marks_re.finditer(full):
            text = hit.group()
            if text == header:
                heads.append(hit.start())
            else:
                stop_at.append((hit.start(), text))
        return heads, stop_at, [p for p, _ in stop_at]

    def _answers(self, full: str, typed: Sequence[Message], msgs: list[dict], tools: Optional[list],
                 notes: Optional[Counter]) -> list[_Answer]:
        s = self.shape
        H = s.header
        heads, stop_at, stop_pos = self._marks(full)
        last_user = -1
        following: list[Optional[str]] = [None] * len(typed)  # the next user or tool text after message i
        after: Optional[str] = None
        n_answers = 0
        for i in range(len(typed) - 1, -1, -1):
            following[i] = after
            role = typed[i].role
            if role == "user" and last_user < 0:
                last_user = i
            elif role == "assistant":
                n_answers += 1
            elif role == "tool":
                text = msgs[i].get("content")
                if isinstance(text, str) and text.strip():
                    after = text
            if role == "user":
                text = msgs[i].get("content")
                if isinstance(text, str) and text.strip():
                    after = text
        out: list[_Answer] = []
        cursor = 0
        found = True  # was the message before this one found (so the cursor is past it)?
        quick = bool(H)  # a plain answer after a header: placed inline, below
        # A header holding a special token is only where the template wrote it; one per answer, they
        # are the answers' in order: the user and tool texts need not be found (the report still does).
        ordered = notes is None and self.header_marked and len(heads) == n_answers
        for i, m in enumerate(typed):
            if ordered and m.role != "assistant":
                continue
            hk = heads
            if H and not ordered and m.role == "assistant" and following[i] is not None:
                k = bisect_left(heads, cursor)
                if k < len(heads) and full.find(following[i], cursor, heads[k]) >= 0:
                    # The first header comes after the next user or tool text: it is a later turn's, and
                    # this answer has none of its own (DeepSeek after tool results).
                    hk = heads[:k]
            if quick and hk is heads and m.role == "assistant" and m.reasoning is None and not m.tool_calls:
                a = self._quick(full, m, cursor, heads, stop_at, stop_pos, i > last_user)
                if a is not None:
                    out.append(a)
                    cursor, found = a.end, True
                    continue
            if m.role != "assistant":
                if m.role == "system":
                    continue  # never an anchor: templates move the system prompt (Mistral) or drop it
                text = msgs[i].get("content")
                if not isinstance(text, str) or not text.strip():
                    continue  # nothing to anchor on: a blank text is found anywhere
                # A user or tool text precedes the next answer's header: found past it, it is not this one.
                k = bisect_left(heads, cursor)
                hi = heads[k] if k < len(heads) else len(full)
                at, n = find_text(full, text, cursor, hi, context_variants)
                if at >= 0 and not H and self.atoms.safe_cut(full, at) != at:
                    at = -1  # inside a marker ("I" in "[INST]"): not the message
                found = at >= 0
                if found:
                    cursor = at + n
                elif notes is not None:
                    notes[f"{m.role} message not in the render"] += 1
                continue
            final = i > last_user
            try:
                if not s.header and not found:
                    raise Unlocatable("the message before it is not in the render, and the template has no "
                                      "assistant header to find the answer by")
                a = self._place(full, i, m, msgs[i], cursor, hk, stop_at, stop_pos, final, notes, None, False)
            except Unlocatable as why:
                start = self._prefix_start(full, msgs, i, tools, cursor)
                # After a tool result, with no header of its own (Gemma 4 goes on in the model's turn): the
                # answer starts after the marker that closes a tool result, where its own prompt, rendered
                # otherwise than the whole (earlier reasoning kept), does not show it.
                after_result = start is None and bool(s.result_closers) and i > 0 and typed[i - 1].role == "tool"
                if start is None and not after_result:
                    if why.reason:
                        raise BadRecord(why.reason, str(why)) from None
                    raise BadRecord("answer_not_located", f"answer {len(out)} (messages[{i}]): {why}; "
                                    "rendering its prompt alone does not match the whole either") from None
                try:
                    a = self._place(full, i, m, msgs[i], cursor, heads, stop_at, stop_pos, final, notes, start, True,
                                    after_result)
                except Unlocatable as why2:
                    raise BadRecord(why2.reason or "answer_not_in_render",
                                    f"answer {len(out)} (messages[{i}]): {why2}") from None
                if notes is not None:
                    notes["answers placed after the tool result they follow (no header before them)" if after_result
                          else "answers placed by rendering their own prompt (no header before them)"] += 1
            out.append(a)
            cursor, found = a.end, True
        return out

    def _quick(self, full: str, m: Message, cursor: int, heads: list[int], stop_at: list, stop_pos: list[int],
               final: bool) -> Optional[_Answer]:
        """_place for the common answer (text only, its own header, found verbatim); None: use _place."""
        content = m.content
        if not isinstance(content, str) or "</think>" in content or not content.strip():
            return None
        k = bisect_left(heads, cursor)
        if k == len(heads):
            return None
        start = heads[k] + len(self.shape.header)
        j = bisect_left(stop_pos, start)
        if j == len(stop_pos) or (k + 1 < len(heads) and heads[k + 1] < stop_pos[j]):
            return None  # no stop before the next header: _place decides
        bound, stop = stop_at[j]
        extra = self.shape.gen_extra
        if extra and full.startswith(extra, start, bound):
            start += len(extra)  # the prompt at inference holds it: context, as _place makes it
        p = start
        close = self.shape.think_close
        if close:
            cl = full.find(close, p, bound)
            if cl >= 0:
                p = cl + len(close)
        at = full.find(content, p, bound)
        if at < 0:
            return None
        end = at + len(content)
        masked = self._think_mask(full, start, at, final) if close and self.think != "learn" else []
        return _Answer(start, bound + len(stop), stop, [("content", at, end)], masked, (at, end), m)

    def _prefix_start(self, full: str, msgs: list[dict], i: int, tools: Optional[list], cursor: int) -> Optional[int]:
        try:
            prompt = self.j.render(msgs[:i], tools, True)
        except Exception:
            return None
        start = self.atoms.safe_cut(full, common_prefix_len(prompt, full))
        return start if start >= cursor else None

    def _place(self, full: str, i: int, m: Message, d: dict, cursor: int, heads: list[int],
               stop_at: list, stop_pos: list[int], final: bool, notes: Optional[Counter],
               start: Optional[int], last_try: bool, after_result: bool = False) -> _Answer:
        """Where answer i is. Until the last try (the answer's own prompt rendered), anything not found
        may mean the wrong header was taken: Unlocatable, and the caller tries that way. `after_result`:
        the answer starts after the marker closing the tool result before it (no header is looked for)."""

        def refuse(reason: str, detail: str) -> Exception:
            return BadRecord(reason, detail) if last_try else Unlocatable(detail, reason)

        s = self.shape
        H = s.header
        if start is None and H and not after_result:
            k = bisect_left(heads, cursor)
            if k == len(heads):
                raise Unlocatable("no assistant header after the previous message")
            start = heads[k] + len(H)
        lo = start if start is not None else cursor
        # The answer lies before the first stop and before the next header.
        k = bisect_left(stop_pos, lo)
        bound, stop = (stop_at[k][0], stop_at[k][1]) if k < len(stop_at) else (len(full), None)
        if H:
            nh = bisect_left(heads, lo)
            if nh < len(heads) and heads[nh] < bound:
                bound, stop = heads[nh], None
        pieces = []
        p = lo
        content = d.get("content")
        reasoning = m.reasoning
        if reasoning is None and isinstance(content, str):
            reasoning = inline_reasoning(content)
        if reasoning is not None and reasoning.strip():
            at, n = find_any(full, reasoning_variants(reasoning), p, bound)
            if at >= 0:
                pieces.append(("reasoning", at, at + n))
                p = at + n
            elif final:
                raise refuse("reasoning_not_rendered", f"messages[{i}]: the template renders no think block "
                             "for this final answer; training on it would teach the model to answer "
                             "without thinking")
            elif notes is not None:
                notes["reasoning of an earlier answer dropped by the template"] += 1
        if s.think_close:
            cl = full.find(s.think_close, p, bound)
            if cl >= 0:
                p = cl + len(s.think_close)
        content_at = (-1, -1)
        if isinstance(content, str) and content.strip():
            at, n = find_text(full, content, p, bound, content_variants)
            if at < 0:
                raise Unlocatable(f"its text {shown(content)} is not where the template puts the answer: "
                                  "the template rewrites what the assistant said")
            pieces.append(("content", at, at + n))
            content_at = (at, at + n)
            p = at + n
        by_id = s.call_key == "id"
        for call in d.get("tool_calls", ()):
            name = call["function"]["name"]
            key = call["id"] if by_id else name
            at = full.find(key, p, bound)
            if at < 0:
                what = f"the call {key!r} to {name!r}" if by_id else f"the call to {name!r}"
                raise refuse("tool_call_not_in_render", f"messages[{i}]: {what} is not in the render")
            pieces.append(("tool_call", at, at + len(key)))
            p = at + len(key)
        if not pieces:
            raise Unlocatable("it has nothing to find")
        first = pieces[0][1]
        if start is None:  # no header: the prompt ends with the closing marker of a user turn or tool result
            marks = s.result_closers if after_result else s.closers
            start = max((full.rfind(c, cursor, first) + len(c) for c in marks
                         if full.rfind(c, cursor, first) >= 0), default=-1)
            if start < 0:
                raise Unlocatable("no closing marker between the previous message and the answer")
        elif H:
            h2 = full.rfind(H, start, first)  # a header text inside skipped context is not this turn's
            if h2 >= 0:
                start = h2 + len(H)
        if s.gen_extra and full.startswith(s.gen_extra, start) and start + len(s.gen_extra) <= first:
            start += len(s.gen_extra)  # the prompt at inference holds it: context, as there
        if stop is not None:
            end = bound + len(stop)
        else:  # no stop follows: the answer runs to the next message (tool-call arguments included)
            end = p + len(full[p:bound].rstrip())
        masked = self._think_mask(full, start, content_at[0] if content_at[0] >= 0 else first, final)
        return _Answer(start, end, stop, pieces, masked, content_at, m)

    def _think_mask(self, full: str, start: int, content: int, final: bool) -> list[tuple[int, int]]:
        s = self.shape
        if self.think == "learn" or not s.think_close:
            return []
        cl = full.rfind(s.think_close, start, content)
        if cl < 0:
            return []
        op = full.rfind(s.think_open, start, cl) if s.think_open else -1
        inner = full[op + len(s.think_open): cl] if op >= 0 else full[start:cl]
        end = cl + len(s.think_close)
        while end < content and full[end].isspace():
            end += 1
        if self.think == "mask_empty" and not inner.strip():
            return [(start, end)]
        if self.think == "drop_history" and not final:
            return [(start, end)]
        return []

    def _check_markers(self, full: str, answers: list[_Answer], spans: list[tuple[int, int]]) -> None:
        located = [(a.start, a.end) for a in answers]
        if _merged(spans) != _merged(located):
            diff = _first_difference(full, _merged(spans), _merged(located))
            raise BadRecord("generation_mask_mismatch", diff)


def _merged(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(x for x in spans if x[1] > x[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _first_difference(full: str, markers: list, located: list) -> str:
    mine, theirs = _chars(located), _chars(markers)
    for chars, other, says in ((theirs, mine, "also learn {}, which the model does not emit"),
                               (mine, theirs, "leave out {}, which the model emits")):
        only = sorted(chars - other)
        if only:
            end = only[0]
            while end + 1 in chars and end + 1 not in other and end - only[0] < 40:
                end += 1
            return "the markers " + says.format(shown(full[only[0]: end + 1]))
    return "the markers differ"


def _chars(spans: list) -> set:
    out: set = set()
    for a, b in spans:
        out.update(range(a, b))
    return out
