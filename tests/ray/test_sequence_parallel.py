"""Sequence parallelism is exact: on real Ray Train workers over gloo, the same rows of a step give
the same loss and the same gradients (relative 1e-4) whether 2 workers read 2 rows each (N=1,
2 data-parallel) or share each row (N=2, 1 data-parallel x 2 sequence-parallel, accumulation 2).
On the tiny Llama (4 heads) and a Qwen3-shaped model with grouped-query attention (4 heads, 2
key-value heads: 1 per rank under N=2), padded and packed rows, ZeRO-2 and ZeRO-3, full and LoRA,
with gradient checkpointing and activation offload in some cases. One TorchTrainer runs them all.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.conftest import use_local_ray

pytestmark = pytest.mark.slow

# (model, packed, ZeRO stage, method, gradient checkpointing + activation offload): every value of
# every dimension at least once, each model padded and packed, each stage with each method
CASES = [
    ("llama", False, 2, "full", False),
    ("llama", True, 3, "lora", True),
    ("qwen3", True, 2, "lora", False),
    ("qwen3", False, 3, "full", True),
    ("qwen3", True, 3, "full", False),
]
ROWS = 4  # rows of the step: 2 per worker under N=1, all 4 on both under N=2


def rows(packed: bool):
    """Rows of odd lengths (padding to a multiple of 2 is exercised), a third of each unlearned;
    packed rows hold two or three sequences with restarting positions."""
    from chatsft.data.schema import IGNORE, Row

    g = np.random.default_rng(7)
    out = []
    for n in (29, 40, 17, 33):
        ids = g.integers(5, 300, n).astype(np.int64)
        labels = ids.copy()
        labels[: n // 3] = IGNORE
        pos = None
        if packed:
            cuts = sorted(g.choice(np.arange(3, n - 3), size=1 + n % 2, replace=False))
            pos = np.concatenate([np.arange(b - a) for a, b in zip([0, *cuts], [*cuts, n])])
        out.append(Row(ids, labels, pos))
    return out


def one_case(model_dir: str, packed: bool, stage: int, method: str, checkpointing: bool, n: int) -> dict:
    """Loss and full gradients of one step in the layout of `n`, the loop's own pieces."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from chatsft.config import load_config
    from chatsft.data.order import micro_batches
    from chatsft.model import load_model, load_tokenizer
    from chatsft.model.batch import collate, shard_sequence
    from chatsft.model.loss import loss_function
    from chatsft.train import sequence_parallel
    from chatsft.train.engines import build_engine
    from chatsft.train.loop import offloaded
    from chatsft.train.optim import param_groups

    rank, world = dist.get_rank(), dist.get_world_size()
    # LoRA's dropout draws per rank and token: no layout reproduces another's masks
    lora = ["method.lora.dropout=0"] if method == "lora" else []
    cfg = load_config(None, lora + [f"model.name_or_path={model_dir}", f"train.deepspeed.stage={stage}",
                             f"method.name={method}", "train.precision=fp32",
                             f"train.gradient_checkpointing={str(checkpointing).lower()}",
                             f"train.activation_offload={str(checkpointing).lower()}",
                             "train.micro_batch_size=2", "tracking.enabled=false", "scaling.num_workers=2",
                             f"scaling.sequence_parallel={n}"])
    sg = sequence_parallel.start(rank, world, n)
    torch.manual_seed(0)
    model = load_model(cfg, "causal", tokenizer=load_tokenizer(cfg.model))
    sequence_parallel.enable(model, sg)
    loss, _ = loss_function(model, "learned")
    accum = ROWS // (2 * sg.dp_world)
    train = dataclasses.replace(cfg.train, grad_accum=accum)
    engine = build_engine(model, param_groups(model, train), train, world_size=world, device=torch.device("cpu"))
    share = ROWS // sg.dp_world
    mine = rows(packed)[sg.dp_rank * share:(sg.dp_rank + 1) * share]
    micro = [shard_sequence(collate(mb, pad_id=0, multiple=n), sg.index, n)
             for mb in micro_batches(mine, 2)]
    count = dist_sum(sum(b.num_targets for b in micro))
    total = 0.0
    for b in micro:
        with offloaded(checkpointing, "cpu"):
            s, _ = loss(engine.forward, b.inputs, b.targets)
        engine.backward(s * (world / count))
        total += float(s.detach())
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p)
            grads[name] = g.detach().clone().float()
    engine.step(0.0)
    deepspeed.comm.barrier()
    return {"loss": dist_sum(total) / count, "count": count, "grads": grads}


def dist_sum(x: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0])


def worker(config: dict) -> None:
    import torch
    import ray.train

    out = {}
    for case in CASES:
        model_dir = config["dirs"][case[0]]
        for n in (1, 2):
            got = one_case(model_dir, *case[1:], n)
            out[(case, n)] = got
    if ray.train.get_context().get_world_rank() == 0:
        torch.save(out, config["out"])


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory, tiny_llama_dir):
    """A Qwen3-shaped model: grouped-query attention (4 heads, 2 KV heads), q/k norms, untied head."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    out = tmp_path_factory.mktemp("qwen3")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=512, tie_word_embeddings=False)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_two_ranks_sharing_each_row_train_exactly_like_two_data_parallel_workers(tmp_path, tiny_llama_dir,
                                                                                 qwen3_dir):
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import sys

    import ray.cloudpickle

    use_local_ray()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    out = str(tmp_path / "out.pt")
    TorchTrainer(worker, train_loop_config={"dirs": {"llama": tiny_llama_dir, "qwen3": qwen3_dir}, "out": out},
                 torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name="sp", storage_path=str(tmp_path / "ray"))).fit()
    got = torch.load(out, weights_only=False)
    for case in CASES:
        one, two = got[(case, 1)], got[(case, 2)]
        assert one["count"] == two["count"] > 0, case
        assert abs(one["loss"] - two["loss"]) <= 1e-4 * abs(one["loss"]), (case, one["loss"], two["loss"])
        assert one["grads"].keys() == two["grads"].keys() and one["grads"], case
        for name, g in one["grads"].items():
            rel = float((g - two["grads"][name]).norm() / g.norm().clamp_min(1e-12))
            assert rel <= 1e-4, (case, name, rel)
        if case[3] == "lora":
            assert all("lora_" in k for k in one["grads"]), case


def test_the_training_loop_with_two_ranks_per_sequence_steps_like_one_worker(tmp_path, tiny_llama_dir):
    """The real loop (rows by data-parallel rank, the cut, eval, export with the model's own
    attention): N=2 on 2 Ray workers makes the step of 1 worker (--local), its first AdamW step made
    linear in the gradient (tests/ray/test_train_equivalence.py), on packed rows."""
    import json

    from test_train_equivalence import assert_same, gradient
    from trainkit import rows_for, tiny_cfg

    cfg = tiny_cfg(tmp_path, "data.packing=true")
    rows = rows_for(cfg, str(tmp_path), train_limit=8, eval_limit=4)
    ref = gradient(tmp_path, "n1", tiny_llama_dir, rows, "data.packing=true", "train.micro_batch_size=4",
                   "train.grad_accum=1")
    use_local_ray()
    two = gradient(tmp_path, "n2", tiny_llama_dir, rows, "data.packing=true", "train.micro_batch_size=2",
                   "train.grad_accum=2", "scaling.num_workers=2", "scaling.sequence_parallel=2", local=False)
    assert_same(ref, two, "1 worker (--local) vs 1 data-parallel x 2 sequence-parallel Ray workers")
    exported = json.loads((tmp_path / "n2" / "out" / "model" / "config.json").read_text())
    assert "sequence_parallel" not in json.dumps(exported)  # the model's own attention was exported


def test_two_by_two_checkpoint_resumes_on_one_by_two_like_an_uninterrupted_two_worker_run(tmp_path, local_ray):
    """Elastic resume under sequence parallelism: 2 data-parallel x 2 sequence-parallel (4 workers)
    checkpoint at step 2, resumed on 1 x 2 (2 workers), ends with the weights of 2 plain workers."""
    from chatsft.train.driver import Extras
    from tests.faults import StopAt
    from trainkit import rows_for, tiny_cfg, train_rows, weights

    run = ["train.max_steps=4", "train.save_every=2", "train.micro_batch_size=2", "train.grad_accum=1",
           "train.lr=1e-3", "train.eps=1e-3", "train.schedule=constant", "train.deepspeed.stage=2",
           "scaling.max_failures=0", "scaling.resources_per_worker={CPU: 0.5}"]
    rows = rows_for(tiny_cfg(tmp_path), str(tmp_path), train_limit=24, eval_limit=0)
    straight = train_rows(tiny_cfg(tmp_path / "straight", *run, "scaling.num_workers=2"), rows, local=False)
    sp = ["scaling.sequence_parallel=2"]
    with pytest.raises(Exception, match="stopped after step 2"):
        train_rows(tiny_cfg(tmp_path / "sp", *run, *sp, "scaling.num_workers=4"), rows, local=False,
                   extras=Extras(hooks=[StopAt(2)], export=False))
    resumed = train_rows(tiny_cfg(tmp_path / "sp", *run, *sp, "scaling.num_workers=2"), rows, local=False)
    assert resumed.resume.step == 2 and resumed.resume.workers == (2, 1) and resumed.resume.accum == (1, 2)
    assert resumed.metrics["step"] == straight.metrics["step"] == 4
    wa, wb = weights(straight.model_dir), weights(resumed.model_dir)
    worst = max(((wa[k] - wb[k]).abs().max() / wa[k].abs().max()).item() for k in wa)
    print(f"2x2 -> 1x2 vs 2 plain workers: worst relative weight difference {worst:.2e}")
    assert worst < 1e-4
