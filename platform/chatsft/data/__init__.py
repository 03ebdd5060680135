"""Pure data stages: records -> conversations -> token ids and loss masks (no Ray, no torch)."""

from chatsft.data.render import render_conversation

__all__ = ["render_conversation"]
