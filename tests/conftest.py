"""Shared fixtures: the tiny built-in tokenizer and model, built once into a repo-local cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Built models are deterministic; cache them beside the repo (git-ignored) so
# repeated runs and Ray workers started by the tests reuse one copy.
os.environ.setdefault("CHATSFT_CACHE", str(REPO / ".cache" / "chatsft"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama_dir() -> str:
    from chatsft.builtin import resolve

    return resolve("builtin:tiny-llama")


@pytest.fixture(scope="session")
def tiny_t5_dir() -> str:
    from chatsft.builtin import resolve

    return resolve("builtin:tiny-t5")


@pytest.fixture(scope="session")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture
def make_tokenizer(tmp_path_factory):
    """A BPE trained on exactly `texts` with room to spare: every word becomes one token,
    so tests can state expected tokens as words."""

    def build(texts, vocab_size=5000):
        from chatsft.builtin import build_tokenizer

        return build_tokenizer(tmp_path_factory.mktemp("tok"), texts=list(texts) * 3, vocab_size=vocab_size)

    return build
