"""One worker's side of the engine comparisons: every engine built in turn on the same process
group from the same seed and rows, stepped, and what it did written down (full gradients of
each step, the gradient norm the engine reports, the full weights after the last step)."""

from __future__ import annotations

import gc
import sys
from typing import Any

import numpy as np
import torch

ENGINES = {
    "fsdp2": ["train.engine=fsdp2"],
    "ddp": ["train.engine=ddp"],
    "zero2": ["train.engine=deepspeed", "train.deepspeed.stage=2"],
    "zero3": ["train.engine=deepspeed", "train.deepspeed.stage=3"],
}
METHODS = {
    # gradient checkpointing on: FSDP2 recomputes inside its all-gathered layers
    "full": ["method.name=full", "train.gradient_checkpointing=true"],
    "lora": ["method.name=lora", "method.lora.dropout=0.0"],  # dropout draws per-rank random numbers
}
# eps 1e-6: Adam turns a gradient element far below eps into a small step, not into +-lr by its
# sign, so rounding noise in a near-zero element (sums in another order) does not flip a weight
GLOBAL_BATCH, STEPS = 6, 2


def config(engine: str, method: str, world: int):
    from chatsft.config import load_config

    return load_config(None, [
        "model.name_or_path=builtin:tiny-llama", "train.precision=fp32", "train.lr=1e-2", "train.clip_grad=1.0",
        "train.micro_batch_size=1", f"train.grad_accum={GLOBAL_BATCH // world}", "train.fused_optimizer=false",
        "train.weight_decay=0.1", "train.eps=1e-6", "tracking.enabled=false", *ENGINES[engine], *METHODS[method]])


def rows(step: int):
    """The step's global batch: the same rows whatever the world."""
    from chatsft.data.schema import IGNORE, Row

    g = np.random.default_rng(100 + step)
    out = []
    for length in g.integers(6, 24, GLOBAL_BATCH):
        ids = g.integers(5, 700, length)
        labels = ids.copy()
        labels[: length // 3] = IGNORE
        out.append(Row(ids, labels))
    return out


def full_grads(engine) -> dict[str, torch.Tensor]:
    """Every trainable parameter's whole (world-averaged) gradient, through each library's public API."""
    out = {}
    for name, p in engine.model.named_parameters():
        if not p.requires_grad:
            continue
        if engine.kind == "deepspeed":
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
        else:
            g = p.grad
            if g is not None and hasattr(g, "full_tensor"):
                g = g.full_tensor()
        if g is not None:
            out[name] = g.detach().float().cpu().clone()
    return out


def run_engine(engine_name: str, method: str, rank: int, world: int) -> dict[str, Any]:
    from chatsft.model import load_model, load_tokenizer
    from chatsft.model.batch import collate
    from chatsft.model.loss import loss_function
    from chatsft.train.engines import build_engine
    from chatsft.train.optim import param_groups

    cfg = config(engine_name, method, world)
    torch.manual_seed(0)
    model = load_model(cfg, "causal", tokenizer=load_tokenizer(cfg.model))
    loss, _ = loss_function(model, "learned")
    engine = build_engine(model, param_groups(model, cfg.train), cfg.train, world_size=world,
                          device=torch.device("cpu"))
    engine.train()
    grads, norms = [], []
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        engine.set_lr(1.0)
        batch = rows(step)
        n = sum(collate([r], pad_id=0).num_targets for r in batch)
        for row in batch[rank * share:(rank + 1) * share]:
            b = collate([row], pad_id=0)
            total, _ = loss(engine.forward, b.inputs, b.targets)
            engine.backward(total * (world / n))
        grads.append(full_grads(engine))
        applied, norm = engine.step(cfg.train.clip_grad)
        assert applied
        norms.append(norm)
    weights = engine.full_state_dict(rank)
    out = {"grads": grads, "norms": norms,
           "weights": {k: v.detach().float().cpu().clone() for k, v in (weights or {}).items()}}
    del engine, model
    gc.collect()
    return out


def compare_all(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    return {(method, name): run_engine(name, method, rank, world) for method in METHODS for name in ENGINES}


def ray_worker(config: dict) -> None:
    """Ray Train's worker function: rank 0 saves what every engine did."""
    import ray.train

    ctx = ray.train.get_context()
    got = compare_all(ctx.get_world_rank(), ctx.get_world_size())
    if ctx.get_world_rank() == 0:
        torch.save(got, config["out"])


def reference(method: str) -> dict:
    """The same steps on one process with no process group: the model and torch's AdamW (ddp, world 1)."""
    return run_engine("ddp", method, 0, 1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-12))


def _ship_by_value() -> None:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


_ship_by_value()
