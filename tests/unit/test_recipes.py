"""Every YAML in configs/ loads and validates, and the real recipes say what hardware they are for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from chatsft.config import describe, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
RECIPES = [p for p in CONFIGS if not p.name.startswith("tiny")]  # tiny*: the embedded default


def test_the_recipes_are_there():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "qwen2.5-0.5b-lora.yaml", "qwen2.5-7b-full-zero3.yaml", "qwen2.5-7b-lora.yaml",
            "llama3-8b-full-zero3.yaml", "llama3-8b-qlora.yaml", "flan-t5-base.yaml",
            "qwen3-8b-lora.yaml", "qwen3-32b-full-zero3.yaml", "gemma4-31b-lora.yaml", "llama3.1-8b-full-zero3.yaml",
            "qwen3-8b-reasoning-32k.yaml"} <= names


MAPPINGS = {"scaling.resources_per_worker", "data.chat_template_kwargs", "train.deepspeed.overrides", "sweep.space"}


def leaves(node, prefix=""):
    """(dotted key, value) of every key a YAML file sets (a mapping-valued key is one leaf)."""
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and dotted not in MAPPINGS:
            yield from leaves(value, dotted)
        else:
            yield dotted, value


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_key_a_config_sets_is_a_documented_key_that_keeps_its_value(path):
    known = {key for key, _, _ in describe()}
    flat = load_config(path).flat()
    for key, value in leaves(yaml.safe_load(path.read_text(encoding="utf-8")) or {}):
        if key.startswith("sweep.space") or key in ("data.train", "data.eval"):
            continue  # a search space and sources are checked by their own tests
        assert key in known, f"{path.name}: {key} is not a config key"
        got = flat[key] if key in flat else {k[len(key) + 1:]: v for k, v in flat.items() if k.startswith(key + ".")}
        want = float(value) if isinstance(got, float) and isinstance(value, (int, str)) else value
        assert got == want, f"{path.name}: {key} = {value!r} became {got!r}"


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
        assert cfg.train.engine in ("deepspeed", "fsdp2"), "several GPUs: a sharding engine"
        assert "://" in cfg.run.output_dir, "multi-GPU runs write where every node can read"
    if cfg.train.zero3:
        assert "ZeRO-3" in header(path)
    if cfg.method.name in ("lora", "qlora"):
        assert 1e-4 <= cfg.train.lr <= 1e-3  # adapters take ~10x the full fine-tuning rate
    else:
        assert cfg.train.lr <= 1e-4
    if cfg.method.name == "qlora":
        assert "chatsft[qlora]" in body and cfg.train.engine == "ddp"


def test_seq2seq_recipe_is_split_turn():
    cfg = load_config(Path(CONFIGS[0]).parent / "flan-t5-base.yaml")
    assert cfg.model.kind == "seq2seq" and cfg.data.organization.value == "split_turn"
    assert not cfg.data.packing


def test_template_matches_the_model_family():
    for path in RECIPES:
        cfg = load_config(path)
        name = cfg.model.name_or_path.lower()
        if "llama-3" in name:
            assert cfg.data.template.value in ("llama3", "hf"), path.name
        if "qwen" in name:
            assert cfg.data.template.value in ("hf", "chatml"), path.name
        if "gemma" in name:
            assert cfg.data.template.value == "hf", path.name


# The family whose template (tests/unit/chat_families.py, written in the style of the published one)
# stands in for a recipe's model, which cannot be downloaded here.
FAMILY_OF = {"qwen3": "qwen3", "gemma-4": "gemma4", "llama-3.1": "llama31"}


@pytest.mark.parametrize("path", [p for p in RECIPES if any(k in p.name.replace("gemma4", "gemma-4").replace(
    "llama3.1", "llama-3.1") for k in FAMILY_OF)], ids=lambda p: p.name)
def test_recipe_template_settings_render_its_family(path, tmp_path):
    from chat_families import build

    from chatsft.data.templates import get_template

    cfg = load_config(path)
    family = next(f for k, f in FAMILY_OF.items() if k in cfg.model.name_or_path.lower())
    tok = build(family, tmp_path)
    t = get_template(cfg.data.template.value, tok, cfg.data.think, cfg.data.chat_template_kwargs)
    assert t.info["strategy"] == "located"
    supported = {k for k, f in t.info["features"].items() if f["supported"]}
    assert supported >= {"tool_calls", "tool_results"}, t.info["features"]
    thinking_off = cfg.data.chat_template_kwargs.get("enable_thinking") is False
    # Thinking off: the empty think block the generation prompt closes is context, never learned.
    assert (t.think == "mask_empty") == thinking_off, (path.name, t.think)
