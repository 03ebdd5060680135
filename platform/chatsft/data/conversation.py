"""Records: one JSON object a line, `{"messages": [{"role", "content"}, ...]}`.

Parsing is the first pure stage (line -> Conversation); every way a record can
be wrong has a reason from `REASONS`, and the error carries `path:line` so the
user can open the file at the right place.

Reasoning and tools come in the shape Hugging Face chat templates read: an
assistant message may carry `reasoning_content` (a string) and `tool_calls`
(`[{"type": "function", "function": {"name", "arguments"}, "id"?}]`, content then
optional), a `tool` message `tool_call_id` and `name`, and the record a `tools`
list of JSON schemas. Tool calls and schemas are kept as the JSON text the
record gave, so a template gets back exactly what the record said and a
Conversation stays hashable.

A call's `arguments` may be an object or its JSON text (OpenAI's wire format; Parquet
files store them so, where one Arrow schema cannot hold every tool's argument names):
text must decode to an object, else the record is refused (`bad_tool_arguments`), unless
`tool_arguments="keep_text"` keeps such text as the record gave it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO, Iterable, Iterator, Optional, Sequence, Union

from chatsft.errors import REASONS, BadRecord  # noqa: F401  (the record errors: defined with the others)

ROLES = ("system", "user", "assistant", "tool")
PART_TYPES = ("text", "python", "python_output")

# Oddities of a record that is kept: counted by name in stats.json (`notes_by_reason`) and in
# prepare's summary, so nothing is dropped unseen.
NOTES = {
    "trailing_turn": "the dialogue goes on after its last answer (a user or tool turn): that part teaches nothing",
    "ignored_field": "a message has a field its role does not carry (reasoning_content or tool_calls off an "
                     "answer, tool_call_id or name off a tool message, or a key chatsft does not read); it is "
                     "ignored",
}
# The keys each role's message is read with; any other (not null) is an ignored field.
CARRIED = {"system": ("role", "content"), "user": ("role", "content"),
           "assistant": ("role", "content", "reasoning_content", "tool_calls"),
           "tool": ("role", "content", "tool_call_id", "name")}


@dataclass(frozen=True)
class Part:
    type: str  # text | python | python_output
    text: str


Content = Union[str, tuple[Part, ...]]


@lru_cache(maxsize=256)
def loads(text: str) -> Any:
    """JSON text -> value, cached: a corpus repeats the same tools list in record after record.
    Callers must not mutate the result."""
    return json.loads(text)


@dataclass(frozen=True)
class ToolCall:
    name: str
    raw: str  # the call as the record gave it, JSON text
    id: Optional[str] = None  # the call's `id`, if the record gave one

    @property
    def call(self) -> dict:
        return loads(self.raw)

    @property
    def arguments(self) -> Any:
        """An object, or the string of JSON the record gave (OpenAI style)."""
        return self.call["function"]["arguments"]

    @property
    def arguments_object(self) -> Optional[dict]:
        """The arguments as an object (JSON text decoded); None for text kept as text (not JSON)."""
        args = self.arguments
        if isinstance(args, dict):
            return args
        try:
            value = json.loads(args)  # not through `loads`: arguments rarely repeat, and would evict the tools lists
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Message:
    role: str
    content: Optional[Content]  # None only for an assistant message that only calls tools
    reasoning: Optional[str] = None  # reasoning_content
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: Optional[str] = None
    name: Optional[str] = None

    @property
    def text(self) -> str:
        """The content as plain text (parts joined), for formats that have no parts."""
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            return ""
        return "".join(p.text for p in self.content)

    @property
    def extras(self) -> bool:
        """Carries reasoning or tool fields (formats without them must refuse it)."""
        return (self.reasoning is not None or bool(self.tool_calls) or self.tool_call_id is not None
                or self.name is not None)

    def extra_fields(self) -> dict:
        """The record keys of the reasoning and tool fields that are set, as a record spells them."""
        d: dict = {}
        if self.reasoning is not None:
            d["reasoning_content"] = self.reasoning
        if self.tool_calls:
            d["tool_calls"] = [t.call for t in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            d["name"] = self.name
        return d


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    source: str = ""  # "path:line"
    tools: Optional[str] = None  # the record's tools list, JSON text
    notes: tuple[str, ...] = ()  # keys of NOTES: what is odd about this kept record

    @property
    def tool_schemas(self) -> Optional[list]:
        return None if self.tools is None else loads(self.tools)

    def to_record(self) -> dict:
        def content(c: Optional[Content]):
            return c if isinstance(c, str) or c is None else [{"type": p.type, "text": p.text} for p in c]

        record: dict = {"messages": [{"role": m.role, "content": content(m.content), **m.extra_fields()}
                                     for m in self.messages]}
        if self.tools is not None:
            record["tools"] = loads(self.tools)
        return record


def parse_line(line: Union[str, bytes], source: str = "", tool_arguments: str = "json") -> Conversation:
    """One JSONL line -> Conversation, or BadRecord with its reason and source. `tool_arguments`:
    data.tool_arguments (options.ToolArguments: json or keep_text)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord("invalid_utf8", f"byte {e.start}", source) from None
    line = line.lstrip("\ufeff")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord("invalid_json", f"{e.msg} at column {e.colno}", source) from None
    return parse_record(record, source, tool_arguments)


def parse_record(record: object, source: str = "", tool_arguments: str = "json") -> Conversation:
    """A decoded JSON value -> Conversation, validating the schema (not the template's rules)."""
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"got {type(record).__name__}", source)
    if "messages" not in record:
        raise BadRecord("missing_messages", f"keys: {sorted(record)[:5]}", source)
    raw = record["messages"]
    if not isinstance(raw, list):
        raise BadRecord("messages_not_a_list", f"got {type(raw).__name__}", source)
    if not raw:
        raise BadRecord("empty_messages", "", source)
    messages = []
    ignored = False
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRecord("message_not_an_object", f"messages[{i}] is {type(m).__name__}", source)
        role = m.get("role")
        if role not in ROLES:
            raise BadRecord("unknown_role", f"messages[{i}].role = {role!r}", source)
        value = m.get("content")
        calls = _parse_tool_calls(m, i, source, tool_arguments) if role == "assistant" and "tool_calls" in m else ()
        # An answer that only calls tools may leave content out (null), as OpenAI-style records do.
        content = None if value is None and calls else _parse_content(value, i, source)
        if role == "assistant" and not calls and not _has_text(content):
            raise BadRecord("empty_answer", f"messages[{i}]", source)
        if len(m) == 2 and not calls:  # role and content: the common case, kept cheap
            messages.append(Message(role, content))
            continue
        ignored = ignored or any(v is not None and k not in CARRIED[role] for k, v in m.items())
        reasoning = m.get("reasoning_content") if role == "assistant" else None
        if reasoning is not None and not isinstance(reasoning, str):
            raise BadRecord("bad_reasoning", f"messages[{i}].reasoning_content is {type(reasoning).__name__}",
                            source)
        call_id = m.get("tool_call_id") if role == "tool" else None
        name = m.get("name") if role == "tool" else None
        for key, v in (("tool_call_id", call_id), ("name", name)):
            if v is not None and not isinstance(v, str):
                raise BadRecord("bad_tool_message", f"messages[{i}].{key} is {type(v).__name__}", source)
        messages.append(Message(role, content, reasoning, calls, call_id, name))
    if not any(m.role == "assistant" for m in messages):
        raise BadRecord("no_assistant", "", source)
    notes = (("trailing_turn",) if messages[-1].role != "assistant" else ()) + (("ignored_field",) if ignored else ())
    tools = record.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise BadRecord("bad_tools", f"got {type(tools).__name__}", source)
        tools = json.dumps(tools, ensure_ascii=False)
    return Conversation(tuple(messages), source, tools, notes)


def _parse_tool_calls(m: dict, i: int, source: str, tool_arguments: str) -> tuple[ToolCall, ...]:
    calls = m["tool_calls"]
    if calls is None:
        return ()
    if not isinstance(calls, list):
        raise BadRecord("bad_tool_call", f"messages[{i}].tool_calls is {type(calls).__name__}", source)
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if (not isinstance(fn, dict) or c.get("type", "function") != "function"
                or not isinstance(fn.get("name"), str) or not fn["name"]
                or not isinstance(fn.get("arguments"), (dict, str))
                or not isinstance(c.get("id", ""), (str, type(None)))):
            raise BadRecord("bad_tool_call", f"messages[{i}].tool_calls[{j}]", source)
        call = ToolCall(fn["name"], json.dumps(c, ensure_ascii=False), c.get("id") or None)
        if tool_arguments != "keep_text" and isinstance(fn["arguments"], str) and call.arguments_object is None:
            raise BadRecord("bad_tool_arguments", f"messages[{i}].tool_calls[{j}].function.arguments "
                            f"{_not_an_object(fn['arguments'])}; set data.tool_arguments=keep_text to train on "
                            "it as the text it is", source)
        out.append(call)
    return tuple(out)


def _not_an_object(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"is not JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')}: {text[:40]!r})"
    return f"is JSON of a {type(value).__name__}, not of an object"


def _parse_content(value: object, i: int, source: str) -> Content:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadRecord("bad_content", f"messages[{i}].content is {type(value).__name__}", source)
    parts = []
    for j, p in enumerate(value):
        if (
            not isinstance(p, dict)
            or p.get("type") not in PART_TYPES
            or not isinstance(p.get("text"), str)
        ):
            shown = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise BadRecord("bad_part", f"messages[{i}].content[{j}] ({shown!r})", source)
        parts.append(Part(p["type"], p["text"]))
    return tuple(parts)


def _has_text(content: Optional[Content]) -> bool:
    if content is None:
        return False
    if isinstance(content, str):
        return bool(content.strip())
    return any(p.text.strip() for p in content)


def iter_lines(data: bytes, path: str) -> Iterator[tuple[str, bytes]]:
    """(`path:line`, raw line) for each non-blank line; 1-based; BOM and CRLF tolerated."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for n, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if raw.strip():
            yield f"{path}:{n}", raw


def merge_system(messages: Sequence[Message]) -> tuple[Message, ...]:
    """Fold system messages into the first user turn, for formats with no system role."""
    system = [m.text for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    if not system:
        return tuple(rest)
    prefix = "\n\n".join(system)
    for k, m in enumerate(rest):
        if m.role == "user":
            rest[k] = Message("user", f"{prefix}\n\n{m.text}", m.reasoning, m.tool_calls, m.tool_call_id, m.name)
            return tuple(rest)
    return (Message("user", prefix), *rest)


def iter_stream_lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of each non-blank line of a byte stream read in chunks.

    The same lines as `conversation.iter_lines` on the whole file (a leading BOM
    and CRLF endings tolerated, blank lines skipped but counted), without holding
    the file in memory.
    """
    bom = b"\xef\xbb\xbf"
    n = 0
    carry = b""
    head = True  # the BOM check waits until the first 3 bytes are in
    for chunk in chunks:
        data = carry + chunk if carry else chunk
        if head:
            if len(data) < 3:
                carry = data
                continue
            if data.startswith(bom):
                data = data[3:]
            head = False
        lines = data.split(b"\n")
        carry = lines.pop()
        for raw in lines:
            n += 1
            raw = raw.rstrip(b"\r")
            if raw.strip():
                yield n, raw
    # End of stream: a file shorter than a BOM was never split; the last line has no newline.
    for raw in carry.split(b"\n"):
        n += 1
        raw = raw.rstrip(b"\r")
        if raw.strip():
            yield n, raw


def read_chunks(stream: BinaryIO, size: int = 1 << 22) -> Iterator[bytes]:
    while True:
        chunk = stream.read(size)
        if not chunk:
            return
        yield bytes(chunk)
