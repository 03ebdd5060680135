"""One small interface over the two ways a worker can step a model.

`deepspeed`: a DeepSpeed engine (ZeRO 0-3, CPU offload, bf16/fp16 with fp32
master weights). `torch` (train.deepspeed.enabled: false): the model itself,
or DDP when there are several workers, with torch's AdamW and autocast; it
needs no DeepSpeed install (GPU benchmarks on machines without it).

Non-finite gradients skip the optimizer step and are counted. DeepSpeed's
ZeRO optimizers (stages 1-3, any precision) and its bf16/fp16 wrappers check
the global gradient norm themselves and skip (engine.skipped_steps); DeepSpeed
stage 0 in fp32 hands the step to the plain torch optimizer with no check, so
there, as on the torch path, this module checks the all-reduced gradient norm
and drops the gradients (torch's AdamW leaves parameters without a gradient
untouched) before stepping.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from chatsft.train.ds_config import deepspeed_config
from chatsft.train.optim import adamw

BASE_LR = "chatsft_base_lr"  # kept in each param group: the schedule multiplies it


@dataclass
class Engine:
    kind: str  # "deepspeed" | "torch"
    model: torch.nn.Module  # the unwrapped HF / PEFT model
    forward_module: Any  # what the loop calls: the DeepSpeed engine, DDP, or the model
    optimizer: Any  # torch optimizer whose param_groups carry the lr
    base_lrs: list[float]
    world_size: int
    grad_accum: int
    ds: Any = None
    autocast: Optional[torch.dtype] = None  # torch path: autocast dtype
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    skipped: int = 0  # steps skipped by our own check (stage 0 fp32, torch path)
    _micro: int = 0

    # ---------------------------------------------------------------- stepping

    def set_lr(self, multiplier: float) -> float:
        """Every group's lr = its base lr x multiplier; returns the lr of the first group."""
        lrs = []
        for group in self.optimizer.param_groups:
            group["lr"] = group[BASE_LR] * multiplier
            lrs.append(group["lr"])
        return lrs[0] if lrs else 0.0

    def _no_sync(self):
        # DDP: all-reduce only on the last micro-batch of a step
        if self.kind == "torch" and self.world_size > 1 and self._micro < self.grad_accum - 1:
            return self.forward_module.no_sync()
        return contextlib.nullcontext()

    def forward(self, inputs: dict[str, Any]):
        ctx = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
               else contextlib.nullcontext())
        with ctx, self._no_sync():
            # use_cache=False: a cache object in training turns off transformers'
            # detection of packed rows from position_ids (masking_utils)
            return self.forward_module(**inputs, use_cache=False)

    def backward(self, loss: torch.Tensor) -> None:
        if self.kind == "deepspeed":
            # The loop already scaled the loss by world/N for the whole step:
            # DeepSpeed must not divide it by the accumulation steps again.
            self.ds.backward(loss, scale_wrt_gas=False)
            if self._micro < self.grad_accum - 1:
                self.ds.step()  # not a boundary: DeepSpeed only counts the micro-step
        else:
            with self._no_sync():
                loss.backward()
        self._micro += 1

    def step(self, clip: float) -> tuple[bool, float]:
        """The optimizer step after the last micro-batch: (applied, gradient norm before clipping)."""
        assert self._micro == self.grad_accum, "step() after exactly grad_accum backward() calls"
        self._micro = 0
        if self.kind == "deepspeed":
            own_check = self.ds.zero_optimization_stage() == 0 and not (
                self.ds.bfloat16_enabled() or self.ds.fp16_enabled())
            norm = None
            clipping = self.ds._config.gradient_clipping
            if own_check:
                norm = _grad_norm(self.model)  # stage 0 all-reduced the grads in backward
                if not math.isfinite(norm):
                    _drop_grads(self.model)
                    # DeepSpeed's fp32 clipping indexes the gradients it finds: none left
                    self.ds._config.gradient_clipping = 0.0
            before = self.ds.skipped_steps
            try:
                self.ds.step()
            finally:
                self.ds._config.gradient_clipping = clipping
            if own_check:
                applied = math.isfinite(norm)
                self.skipped += 0 if applied else 1
                return applied, norm
            applied = self.ds.skipped_steps == before
            got = self.ds.get_global_grad_norm()
            norm = float(got) if got is not None else float("nan")
            return applied, (norm if applied else float("inf"))
        norm = _grad_norm(self.model)
        applied = math.isfinite(norm)
        if applied:
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()
        else:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        return applied, norm

    def skip(self) -> None:
        """A step with no supervised token anywhere: nothing to learn, no optimizer update."""
        self._micro = 0

    @property
    def skipped_steps(self) -> int:
        return self.skipped + (self.ds.skipped_steps if self.ds is not None else 0)

    def train(self) -> None:
        self.forward_module.train()

    def eval(self) -> None:
        self.forward_module.eval()

    # ------------------------------------------------------------- checkpoints

    def save(self, folder: str, rank: int) -> None:
        """Weights and optimizer state; collective (every rank calls it, writing its own shards)."""
        if self.kind == "deepspeed":
            self.ds.save_checkpoint(folder, tag="state", client_state={"skipped": self.skipped})
            return
        if rank == 0:  # the torch path keeps identical replicas on every rank
            os.makedirs(folder, exist_ok=True)
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "skipped": self.skipped}, os.path.join(folder, "torch_state.pt"))

    def load(self, folder: str, saved_world: Optional[int] = None) -> None:
        """Weights and optimizer state from a checkpoint written by `saved_world` workers (this
        engine's world size may differ: the torch path and DeepSpeed stage 0 save whole state,
        ZeRO 1-3 checkpoints are converted to DeepSpeed's universal checkpoint first).
        The optimizer's hyperparameters (lr, betas, eps, weight decay of each group) stay the
        config's: a resumed run applies changed values from its first step (train/resume.py),
        never the checkpoint's."""
        config_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if self.kind == "deepspeed":
            stage = self.ds.zero_optimization_stage()
            if saved_world not in (None, self.world_size) and stage >= 1:
                # ZeRO partitions the optimizer state by world size and DeepSpeed refuses another
                # one; its universal checkpoint is the world-size-free form it loads at any size.
                with _universal(folder) as converted:
                    self.ds._config.load_universal_checkpoint = True
                    try:
                        _, client = self.ds.load_checkpoint(converted, tag="state", load_optimizer_states=True,
                                                            load_lr_scheduler_states=False)
                    finally:
                        self.ds._config.load_universal_checkpoint = False
            else:
                _, client = self.ds.load_checkpoint(folder, tag="state", load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
            if client is None:
                raise RuntimeError(f"{folder}: no DeepSpeed checkpoint to resume from")
            self.skipped = int(client.get("skipped", 0))
        else:
            state = torch.load(os.path.join(folder, "torch_state.pt"), map_location=self.device,
                               weights_only=False)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.skipped = int(state["skipped"])
        for group, settings in zip(self.optimizer.param_groups, config_groups):
            group.update(settings)


@contextlib.contextmanager
def _universal(folder: str):
    """The DeepSpeed checkpoint under `folder` converted to the universal format (world-size free),
    in a scratch folder for the duration."""
    import shutil
    import tempfile
    from types import SimpleNamespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = tempfile.mkdtemp(prefix="chatsft-universal-")
    try:
        ds_to_universal(SimpleNamespace(
            input_folder=os.path.join(folder, "state"), output_folder=os.path.join(out, "state"),
            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
            inject_missing_state=True))
        with open(os.path.join(out, "latest"), "w") as f:
            f.write("state")
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def _drop_grads(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


# --------------------------------------------------------------------- building


def build_engine(model: torch.nn.Module, groups: list[dict], train: Any, *, world_size: int,
                 device: torch.device) -> Engine:
    groups = [dict(g) for g in groups]
    for g in groups:
        g.setdefault("lr", train.lr)
        g[BASE_LR] = g["lr"]
    base_lrs = [g["lr"] for g in groups]
    if train.deepspeed.enabled:
        return _deepspeed_engine(model, groups, train, world_size, device, base_lrs)
    return _torch_engine(model, groups, train, world_size, device, base_lrs)


def _deepspeed_engine(model, groups, train, world_size, device, base_lrs) -> Engine:
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    config = deepspeed_config(train, world_size)
    optimizer = adamw(groups, train, train.deepspeed.offload_optimizer)
    ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                       dist_init_required=False)
    # ZeRO keeps the param-group dicts of the optimizer it wraps: lr set there is used
    opt = getattr(ds.optimizer, "optimizer", ds.optimizer)
    return Engine("deepspeed", model, ds, opt, base_lrs, world_size, train.grad_accum, ds=ds, device=device)


def _torch_engine(model, groups, train, world_size, device, base_lrs) -> Engine:
    model.to(device)
    optimizer = adamw(groups, train, False, fused=train.fused_optimizer)
    forward_module = model
    if world_size > 1:
        forward_module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision)
    if train.precision == "fp16":
        raise ValueError("train.precision: fp16 needs train.deepspeed.enabled (loss scaling); use bf16")
    return Engine("torch", model, forward_module, optimizer, base_lrs, world_size, train.grad_accum,
                  autocast=autocast, device=device)
