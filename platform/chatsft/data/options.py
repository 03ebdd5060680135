"""The choices that shape a sample, as enums (the masking policy is one value, not flags)."""

from __future__ import annotations

import enum


class Template(str, enum.Enum):
    CHATML = "chatml"
    LLAMA3 = "llama3"
    CHATGLM2 = "chatglm2"
    SPECIAL = "special"
    HF = "hf"


class Organization(str, enum.Enum):
    SESSION = "session"  # one sample per dialogue, every answer supervised
    SPLIT_TURN = "split_turn"  # one sample per answer, history as unsupervised context


class TrainOn(str, enum.Enum):
    """Which tokens carry loss (the masking policy)."""

    ALL_ASSISTANT = "all_assistant"  # every assistant answer and its end-of-turn token
    LAST_ASSISTANT = "last_assistant"  # only the final answer of the dialogue
    ALL_TOKENS = "all_tokens"  # everything, prompts included (continued pre-training style)


class Truncation(str, enum.Enum):
    """What to do with a sample longer than data.max_length."""

    TURNS = "turns"  # keep the longest prefix of whole turns: no answer is ever cut
    RIGHT = "right"  # cut at max_length; a cut answer loses its end token (counted)
    DROP = "drop"  # drop the sample (counted)


class Think(str, enum.Enum):
    """What of an answer's think block is learned (unset in the config: what the template does at
    inference, see templates.default_think)."""

    LEARN = "learn"  # every think block as rendered, empty or not
    MASK_EMPTY = "mask_empty"  # an empty think block is context: the model must not learn to skip thinking
    DROP_HISTORY = "drop_history"  # only the final exchange's think blocks; earlier ones are context


class ToolArguments(str, enum.Enum):
    """What becomes of a tool call's `arguments` given as text that is not JSON of an object."""

    JSON = "json"  # refused (bad_tool_arguments): a model must not learn to call with broken arguments
    KEEP_TEXT = "keep_text"  # kept as the text the record gave, and rendered as the template renders text
