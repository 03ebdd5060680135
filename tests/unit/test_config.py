import dataclasses
import os
from pathlib import Path

import pytest

from chatsft.config import Config, ConfigError, TrainOn, describe, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.data.train, "a recipe must name its training data"


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg.train.lr == 2e-5
    assert cfg.data.train_on is TrainOn.ALL_ASSISTANT
    assert cfg.data.train[0].path == "chatsft://samples/train.jsonl"


def test_overrides_are_typed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 3e-4\n")  # PyYAML reads this as a string
    cfg = load_config(f, ["train.epochs=3", "data.packing=true", "data.train_on=last_assistant",
                          "scaling.resources_per_worker={CPU: 2, GPU: 1}", "method.name=lora", "method.lora.target_modules=[q_proj]"])
    assert cfg.train.lr == 3e-4 and cfg.train.epochs == 3 and cfg.data.packing is True
    assert cfg.data.train_on is TrainOn.LAST_ASSISTANT
    assert cfg.scaling.resources_per_worker == {"CPU": 2.0, "GPU": 1.0}
    assert cfg.method.lora.target_modules == ["q_proj"]


def test_off_is_the_choice_not_a_boolean(tmp_path):
    """YAML reads a bare `off` as false: a choice named off (train.compile) still takes it."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  compile: off\n")
    assert load_config(f).train.compile == "off"
    assert load_config(None, ["train.compile=layers", "train.compile=off"]).train.compile == "off"
    with pytest.raises(ConfigError, match="train.compile: expected one of off, layers, decoder; got True"):
        load_config(None, ["train.compile=on"])


def test_sources_accept_a_path_a_list_or_weighted_entries(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.train=a.jsonl"])
    assert [(s.path, s.weight) for s in cfg.data.train] == [(str(tmp_path / "a.jsonl"), 1.0)]
    cfg = load_config(None, ["data.train=[a.jsonl, {path: b.jsonl, weight: 2}]"])
    assert [(s.path, s.weight) for s in cfg.data.train] == [(str(tmp_path / "a.jsonl"), 1.0),
                                                            (str(tmp_path / "b.jsonl"), 2.0)]


def test_data_paths_are_absolute_from_config_load(tmp_path, monkeypatch):
    """A Ray task runs in another folder, a resume may start in another one or spell the file
    absolute: all of them see the one file the config named when it loaded."""
    monkeypatch.chdir(tmp_path)
    relative = load_config(None, ["data.train=data/x.jsonl", "data.eval=[~/h.jsonl]"])
    monkeypatch.chdir("/")
    absolute = load_config(None, [f"data.train={tmp_path}/data/x.jsonl", "data.eval=[~/h.jsonl]"])
    assert relative.data.train[0].path == absolute.data.train[0].path == str(tmp_path / "data" / "x.jsonl")
    assert relative.data.eval[0].path == os.path.expanduser("~/h.jsonl")
    uri = load_config(None, ["data.train=[s3://b/x.jsonl, chatsft://samples/train.jsonl]"])
    assert [s.path for s in uri.data.train] == ["s3://b/x.jsonl", "chatsft://samples/train.jsonl"]


def test_an_empty_config_file_is_refused(tmp_path):
    for text in ("", "# only a comment\n", "{}\n"):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ConfigError, match="the config file is empty"):
            load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "train.lrr: unknown key (did you mean train.lr?)"),
    ("trian.lr=1", "trian: unknown key (did you mean train?)"),
    ("train.lr=abc", "train.lr: expected a number, got 'abc'"),
    ("train.lr=-1", "train.lr: must be > 0, got -1.0"),
    ("train.epochs=1.5", "train.epochs: expected an integer, got 1.5"),
    ("data.packing=maybe", "data.packing: expected true or false, got 'maybe'"),
    ("data.template=vicuna", "data.template: expected one of chatml, llama3, chatglm2, special, hf; got 'vicuna'"),
    ("data.train=[{path: a.jsonl, weight: -1}]", "data.train[0].weight: must be >= 0, got -1.0"),
    ("data.train=[{path: a.jsonl, wieght: 2}]", "data.train[0].wieght: unknown key (did you mean data.train[0].weight?)"),
    ("train.deepspeed.stage=4", "train.deepspeed.stage: must be 0, 1, 2 or 3, got 4"),
    ("train.deepspeed.offload_params=true", "train.deepspeed.offload_params: needs stage 3, got stage 2"),
    ("method.name=dora", "method.name: expected one of full, lora, qlora, prompt_tuning; got 'dora'"),
    ("sweep.space={train.lr: {type: loguniform, low: 1}}", "sweep.space.train.lr: loguniform needs low < high"),
    ("train", "override 'train': expected key=value"),
])
def test_bad_values_name_the_full_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lr: [1, 2]\n")
    with pytest.raises(ConfigError, match=rf"^{f}: train.lr: expected a number"):
        load_config(f)
    f.write_text("train:\n  lr: 1\n   epochs: 2\n")
    with pytest.raises(ConfigError, match=rf"^{f}:3: invalid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_and_flat_keys():
    cfg = load_config(None, ["train.lr=0.1", "data.organization=split_turn"])
    from chatsft.config import from_dict

    assert from_dict(Config, cfg.to_dict()) == cfg
    flat = cfg.flat()
    assert flat["train.lr"] == 0.1 and flat["data.organization"] == "split_turn"


def test_every_key_is_documented():
    rows = describe()
    assert len(rows) > 80
    undocumented = [key for key, _, text in rows if not text]
    assert undocumented == []


def test_a_config_built_in_code_is_validated_like_a_loaded_one():
    from chatsft.config import replaced

    cfg = load_config(None, [])
    assert replaced(cfg.train, "train", grad_accum=3).grad_accum == 3
    with pytest.raises(ConfigError, match=r"^train.grad_accum: must be >= 1, got 0$"):
        replaced(cfg.train, "train", grad_accum=0)
    # the whole tree: a section's own rules and the rules across sections
    bad_train = dataclasses.replace(cfg.train, lr=-1.0)
    with pytest.raises(ConfigError, match=r"^train.lr: must be > 0"):
        replaced(cfg, train=bad_train)
    with pytest.raises(ConfigError, match="data.eval_fraction: set together with data.eval"):
        replaced(cfg, data=dataclasses.replace(cfg.data, eval_fraction=0.1, eval=list(cfg.data.train)))
