"""Every YAML in configs/ loads and validates, and the real recipes say what hardware they are for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chatsft.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
RECIPES = [p for p in CONFIGS if not p.name.startswith("tiny")]  # tiny*: the embedded default


def test_the_recipes_are_there():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "qwen2.5-0.5b-lora.yaml", "qwen2.5-7b-full-zero3.yaml", "qwen2.5-7b-lora.yaml",
            "llama3-8b-full-zero3.yaml", "llama3-8b-qlora.yaml", "flan-t5-base.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.run.name and cfg.data.train


def header(path: Path) -> str:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_header_names_gpus_memory_and_sources(path):
    text = header(path)
    assert len(text.splitlines()) >= 5, "a recipe starts with a comment saying what it is for and why"
    assert re.search(r"\b(one|\d+)\b[^\n]*GPUs?", text), "GPU count"
    assert re.search(r"\d+ GB", text), "GPU memory"
    assert re.search(r"torchtune|technical report|TRL|documentation|Dettmers", text), "where the numbers come from"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_consistent(path):
    cfg = load_config(path)
    body = path.read_text(encoding="utf-8")
    assert cfg.scaling.use_gpu and cfg.train.precision == "bf16"
    assert all(s.path.startswith("s3://your-bucket/") for s in cfg.data.train), "placeholder data path"
    assert "Placeholder" in body
    n = cfg.scaling.num_workers
    gpus = re.search(r"on (one|\d+) GPUs?", header(path)).group(1)
    assert n == (1 if gpus == "one" else int(gpus))
    if n > 1:
        assert cfg.train.deepspeed.enabled, "several GPUs: DeepSpeed shards the state"
        assert "://" in cfg.run.output_dir, "multi-GPU runs write where every node can read"
    if cfg.train.deepspeed.enabled and cfg.train.deepspeed.stage == 3:
        assert "ZeRO-3" in header(path)
    if cfg.method.name in ("lora", "qlora"):
        assert 1e-4 <= cfg.train.lr <= 1e-3  # adapters take ~10x the full fine-tuning rate
    else:
        assert cfg.train.lr <= 1e-4
    if cfg.method.name == "qlora":
        assert "chatsft[qlora]" in body and not cfg.train.deepspeed.enabled


def test_seq2seq_recipe_is_split_turn():
    cfg = load_config(Path(CONFIGS[0]).parent / "flan-t5-base.yaml")
    assert cfg.model.kind == "seq2seq" and cfg.data.organization.value == "split_turn"
    assert not cfg.data.packing


def test_template_matches_the_model_family():
    for path in RECIPES:
        cfg = load_config(path)
        name = cfg.model.name_or_path.lower()
        if "llama-3" in name:
            assert cfg.data.template.value == "llama3", path.name
        if "qwen" in name:
            assert cfg.data.template.value in ("hf", "chatml"), path.name
