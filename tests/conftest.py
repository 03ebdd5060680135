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
