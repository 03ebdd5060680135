"""A ZeRO-3 checkpoint written by 2 workers loads into 1 (through DeepSpeed's universal
checkpoint): the weights are the saved ones exactly and Adam goes on from its saved step.
Real DeepSpeed over a real gloo group of processes (no Ray needed)."""

import os

import pytest
import torch

pytestmark = pytest.mark.slow


def _engine(world):
    from chatsft.config import load_config
    from chatsft.model import load_model, load_tokenizer
    from chatsft.train.engines import build_engine
    from chatsft.train.optim import param_groups

    cfg = load_config(None, ["model.name_or_path=builtin:tiny-llama", "train.deepspeed.stage=3",
                             "train.precision=fp32", "train.micro_batch_size=1", "train.grad_accum=1",
                             "tracking.enabled=false"])
    torch.manual_seed(0)
    model = load_model(cfg, "causal", tokenizer=load_tokenizer(cfg.model))
    return build_engine(model, param_groups(model, cfg.train), cfg.train, world_size=world, device=torch.device("cpu"))


def _step(engine, rank):
    ids = torch.arange(1, 17).unsqueeze(0) + rank
    engine.backward(engine.forward({"input_ids": ids, "labels": ids}).loss)
    engine.step(0.0)


def _worker(rank, world, port, folder, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    engine = _engine(world)
    if world == 2:
        _step(engine, rank)
        _step(engine, rank)
        engine.save(folder, rank)
    else:
        import deepspeed
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        engine.load(folder, saved_world=2)
        saved = get_fp32_state_dict_from_zero_checkpoint(folder, tag="state")
        with deepspeed.zero.GatheredParameters(list(engine.model.parameters())):
            worst = max((p.detach() - saved[n]).abs().max().item() for n, p in engine.model.named_parameters())
        steps = {float(s["step"]) for s in engine.optimizer.state.values() if "step" in s}
        _step(engine, rank)  # and it trains on
        torch.save({"worst": worst, "steps": sorted(steps)}, out)
    dist.barrier()
    dist.destroy_process_group()


def test_zero3_checkpoint_of_two_workers_loads_on_one(tmp_path):
    import socket

    import torch.multiprocessing as mp

    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    folder, out = str(tmp_path / "ck"), str(tmp_path / "out.pt")
    mp.spawn(_worker, args=(2, port(), folder, out), nprocs=2)
    mp.spawn(_worker, args=(1, port(), folder, out), nprocs=1)
    got = torch.load(out)
    assert got["worst"] == 0.0
    assert got["steps"] == [2.0]
