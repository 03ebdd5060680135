"""train.engine: the key and its rules, and a checkpoint resumed only by the engine that wrote it."""

import pytest

from chatsft.config import ConfigError, load_config
from chatsft.errors import UserError
from chatsft.train.checkpoint import TrainState
from chatsft.train.resume import check_engine, saved_engine


def test_engine_key_and_its_sections():
    cfg = load_config(None, ["train.engine=fsdp2", "train.fsdp2.cpu_offload=true",
                             "train.fsdp2.reshard_after_forward=false"])
    assert (cfg.train.engine, cfg.train.fsdp2.cpu_offload, cfg.train.fsdp2.reshard_after_forward) == ("fsdp2", True, False)
    assert load_config(None, []).train.engine == "deepspeed"
    assert load_config(None, ["train.deepspeed.stage=3"]).train.zero3
    assert not load_config(None, ["train.engine=fsdp2", "train.deepspeed.stage=3"]).train.zero3
    with pytest.raises(ConfigError, match="train.engine: expected one of deepspeed, fsdp2, ddp"):
        load_config(None, ["train.engine=fsdp"])


@pytest.mark.parametrize("value", ["false", "true"])
def test_the_old_deepspeed_switch_is_refused_naming_train_engine(value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"train.deepspeed.enabled={value}"])
    text = str(e.value)
    assert "\n" not in text and "train.deepspeed.enabled: replaced by train.engine" in text
    assert "train.engine=ddp" in text


def test_fp16_and_bf16_masters_name_the_engine():
    with pytest.raises(ConfigError, match="train.precision=fp16: needs train.engine=deepspeed"):
        load_config(None, ["train.engine=fsdp2", "train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.bf16_master_weights=false: needs .* train.engine=ddp"):
        load_config(None, ["train.engine=fsdp2", "train.bf16_master_weights=false"])


def test_a_checkpoint_of_another_engine_is_refused_in_one_line(tmp_path):
    folder = str(tmp_path / "checkpoint_000004")
    check_engine(folder, TrainState(engine="fsdp2"), "fsdp2")
    with pytest.raises(UserError) as e:
        check_engine(folder, TrainState(engine="fsdp2"), "deepspeed")
    assert "\n" not in str(e.value)
    assert "train.engine=deepspeed: the checkpoint" in str(e.value) and "written by train.engine=fsdp2" in str(e.value)
    # a checkpoint of a chatsft before engines were recorded: told by its files
    (tmp_path / "checkpoint_000004").mkdir()
    (tmp_path / "checkpoint_000004" / "torch_state.pt").write_bytes(b"")
    assert saved_engine(folder, TrainState()) == "ddp"
    with pytest.raises(UserError, match="written by train.engine=ddp"):
        check_engine(folder, TrainState(), "fsdp2")
