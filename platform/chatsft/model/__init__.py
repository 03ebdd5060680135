"""Models: the tokenizer (tokenizer.py), the kind of model as one object (kind.py), loading with a method applied (load.py),
PEFT wrapping (peft.py), export to and reload from Hugging Face folders (export.py)."""

from chatsft.model.export import export_model, load_exported
from chatsft.model.load import attn_implementation, load_dtype, load_model
from chatsft.model.peft import default_target_modules, num_virtual_tokens
from chatsft.model.kind import resolve_kind
from chatsft.model.tokenizer import load_tokenizer

__all__ = ["attn_implementation", "default_target_modules", "export_model", "load_dtype", "load_exported",
           "load_model", "load_tokenizer", "num_virtual_tokens", "resolve_kind"]
