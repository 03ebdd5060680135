"""How a model reads a conversation: a chat template (decoder-only) or input/target pairs (seq2seq).

A `Format` is what every caller holds, so none of them branches on the kind of
model: it renders conversations into samples (training rows), renders the
prompt of a next answer (evaluation), checks a record without rendering it
(records sampled out of a mixture), and names the marker that ends an answer
(where generation stops). Bound to a tokenizer once, by the model's kind
(`chatsft.model.kind.ModelKind.format`), the one object that knows which
format a model reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, Union

from chatsft.data.conversation import BadRecord, Conversation, Message
from chatsft.data.render import RenderOptions, RenderResult, layout, render_batch, render_seq2seq, seq2seq_source
from chatsft.data.templates import ChatTemplate


class Format(Protocol):
    name: str
    end_of_turn: Optional[str]  # the marker that ends an answer, learned; None: the tokenizer's EOS

    def render(self, convs: Sequence[Conversation], opts: RenderOptions) -> list[Union[RenderResult, BadRecord]]:
        """Samples of every conversation, or the BadRecord that refuses it (with its source)."""

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The ids the model reads before its next answer, exactly as training renders them."""

    def check(self, conv: Conversation) -> None:
        """Raise BadRecord if the conversation could not be rendered (without tokenizing it)."""


@dataclass(frozen=True)
class ChatFormat:
    """A decoder-only model: one sequence per sample, the template says what is learned."""

    template: ChatTemplate
    tokenizer: Any

    @property
    def name(self) -> str:
        return self.template.name

    @property
    def end_of_turn(self) -> Optional[str]:
        return self.template.end_of_turn

    def render(self, convs: Sequence[Conversation], opts: RenderOptions) -> list[Union[RenderResult, BadRecord]]:
        return render_batch(convs, self.tokenizer, self.template, opts)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        self.template.check_content(messages)
        return list(self.tokenizer(self.template.prompt(messages), add_special_tokens=False)["input_ids"])

    def check(self, conv: Conversation) -> None:
        layout(conv, self.template)


@dataclass(frozen=True)
class Seq2SeqFormat:
    """An encoder-decoder model: the history to the encoder, each answer to the decoder,
    tokenized separately (render.render_seq2seq); the decoder ends an answer with EOS."""

    tokenizer: Any
    name: str = "seq2seq"
    end_of_turn: Optional[str] = None

    def render(self, convs: Sequence[Conversation], opts: RenderOptions) -> list[Union[RenderResult, BadRecord]]:
        out: list[Union[RenderResult, BadRecord]] = []
        for conv in convs:
            try:
                out.append(render_seq2seq(conv, self.tokenizer, opts))
            except BadRecord as e:
                out.append(e.at(conv.source))
        return out

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        return list(self.tokenizer(seq2seq_source(messages), add_special_tokens=True)["input_ids"])

    def check(self, conv: Conversation) -> None:
        return None  # any valid record has an encoder text and a target

