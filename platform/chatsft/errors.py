"""Errors a user can cause, and how any error becomes the one line a user reads.

Every error of the user's input or environment is a `UserError`: the CLI and the
jobs print its `one_line` and exit 2; anything else is a bug and keeps its
traceback. The subclasses say which input: a config key (`ConfigError`), the
chat format (`TemplateError`), one record (`BadRecord`, whose reasons are the
fixed set `REASONS`, counted by name in stats.json), a file named by the user
that is not there (`MissingFile`). They stay ValueErrors (FileNotFoundError for
`MissingFile`) so a parser's `except ValueError` still catches them.

Ray hands a task's, actor's or training worker's exception back wrapped;
`user_error_in` is the one place that looks through those wrappers, and
`user_errors_unwrapped` re-raises the user's error itself around a Ray call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

LIMIT = 400  # characters of a one-line message; a longer one is a dump, not a sentence


class UserError(Exception):
    """A problem with the user's input or environment (config, files, cluster), not a bug."""


class ConfigError(UserError, ValueError):
    """A user error in a config file or override; the message names the key."""


class TemplateError(UserError, ValueError):
    """The chat format cannot be used with this tokenizer (a config error, not a record error)."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the user named is not there; the message is `path: what`."""

    def __init__(self, path: str, what: str = "file not found"):
        super().__init__(2, what, path)

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"

    def __reduce__(self):  # Ray pickles it back from a worker
        return MissingFile, (self.filename, self.strerror)


# The fixed set of reasons a record is refused. Counted by name in stats.json.
REASONS = {
    "invalid_utf8": "the line is not valid UTF-8",
    "invalid_json": "the line is not valid JSON",
    "not_an_object": "the record is not a JSON object",
    "missing_messages": "the record has no 'messages' key",
    "messages_not_a_list": "'messages' is not a list",
    "empty_messages": "'messages' is empty",
    "message_not_an_object": "a message is not a JSON object",
    "unknown_role": "a message has a role other than system, user, assistant, tool",
    "bad_content": "a message's content is not a string or a list of parts",
    "bad_part": "a content part is not {type, text} with a known type and string text",
    "bad_reasoning": "an assistant message's reasoning_content is not a string",
    "bad_tool_call": "a tool call is not {\"type\": \"function\", \"function\": {\"name\", \"arguments\"}}",
    "bad_tool_arguments": "a tool call's arguments are text that is not JSON of an object (data.tool_arguments)",
    "bad_tool_message": "a tool message's tool_call_id or name is not a string",
    "bad_tools": "the record's tools is not a list of JSON schema objects",
    "empty_answer": "an assistant message has no content",
    "no_assistant": "the dialogue has no assistant message to learn from",
    "bad_order": "the order of roles does not fit the chat template",
    "unsupported_role": "the chat template has no way to render this role",
    "control_token_in_content": "content contains a control token of the template",
    "template_error": "the tokenizer's chat template failed on this record",
    "unsupported_field": "the chat format has no rendering for reasoning_content, tool_calls or tools",
    "answer_not_in_render": "the chat template rewrites an answer: its text is not in the rendered conversation",
    "answer_not_located": "the assistant header before an answer cannot be found in the rendered conversation",
    "reasoning_not_rendered": "the chat template drops the reasoning of a final answer",
    "tool_call_not_in_render": "the chat template drops a tool call of an answer",
    "generation_mask_mismatch": "the template's {% generation %} markers disagree with what the model emits",
    "reasoning_unsupported": "the chat template cannot render reasoning_content (chatsft template says why)",
    "tool_calls_unsupported": "the chat template cannot render tool calls (chatsft template says why)",
    "tool_results_unsupported": "the chat template cannot render tool results as context (chatsft template says why)",
}


class BadRecord(UserError, ValueError):
    """A record that cannot be trained on. `reason` is a key of REASONS; `source` is its `path:line`."""

    def __init__(self, reason: str, detail: str = "", source: str = ""):
        assert reason in REASONS, reason
        self.reason = reason
        self.detail = detail
        self.source = source
        super().__init__(self.message)

    @property
    def message(self) -> str:
        where = f"{self.source}: " if self.source else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"{where}{self.reason}: {REASONS[self.reason]}{detail}"

    def at(self, source: str) -> "BadRecord":
        return BadRecord(self.reason, self.detail, source)

    def __reduce__(self):  # Ray pickles it back from a worker
        return BadRecord, (self.reason, self.detail, self.source)


def _ray_wrapped(error: BaseException) -> list[BaseException]:
    """The exceptions a Ray wrapper carries: a task's or actor's (RayTaskError.cause), a
    Ray Train controller's (`controller_failure`) and a worker group's (`worker_failures`)."""
    inner = [getattr(error, "cause", None), getattr(error, "controller_failure", None)]
    inner += list((getattr(error, "worker_failures", None) or {}).values())
    return [x for x in inner if isinstance(x, BaseException)]


def user_error_in(error: BaseException) -> Optional[UserError]:
    """The user error behind a failure that Ray wrapped, if any (the error itself when it is one).

    RayTaskError's class also subclasses the original's, so the original object found
    below it is preferred to Ray's subclassing wrapper."""
    seen, todo = set(), [error]
    found = None
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, UserError):
            if not _ray_wrapped(x):
                return x
            found = found or x
        todo += [*_ray_wrapped(x), x.__cause__, x.__context__]
    if found is not None:  # only Ray's wrapper survived: its last line is the error itself
        return UserError(str(found).strip().splitlines()[-1])
    return None


@contextmanager
def user_errors_unwrapped() -> Iterator[None]:
    """Around a Ray call: a user error raised in a task, actor or worker comes out as itself."""
    try:
        yield
    except UserError as e:
        user = user_error_in(e)
        if user is e:
            raise
        raise user from None
    except Exception as e:
        user = user_error_in(e)
        if user is None:
            raise
        raise user from None


def one_line(error: BaseException, limit: int = LIMIT) -> str:
    """The message a user reads: the error's own words (a Ray wrapper's original's), on one line,
    whitespace collapsed, cut at `limit` characters."""
    inner = _ray_wrapped(error)
    while inner:
        error = inner[0]
        inner = _ray_wrapped(error)
    if isinstance(error, FileNotFoundError) and error.filename and not isinstance(error, MissingFile):
        text = f"{error.filename}: file not found"
    else:
        text = str(error).strip()
        if type(error).__name__.startswith("RayTaskError"):  # the text is a traceback; its last line is the error
            text = text.splitlines()[-1] if text else ""
        text = text or type(error).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
