"""The FSDP2 engine: PyTorch's `fully_shard` on each decoder layer, then the root.

Parameters, gradients and optimizer state are sharded (DTensors along dim 0) over the
workers; a layer's full weights exist only around its forward and backward
(`train.fsdp2.reshard_after_forward`). Mixed precision: bf16 compute parameters when
`train.precision=bf16`, fp32 gradient reduction, the sharded masters in the dtype they were
loaded in (fp32 for full fine-tuning: model/load.py). `train.fsdp2.cpu_offload` keeps the
sharded parameters, gradients and optimizer state in CPU memory (the optimizer steps there).
LoRA: the frozen base is sharded like the rest and gets no gradients.

Checkpoints go through torch.distributed.checkpoint (DCP): every rank writes its shards
(`fsdp2/__<rank>_0.distcp`, rank 0 the `.metadata`) into its own folder and the loop copies
them into the run's checkpoint folder. DCP reshards on load, so a checkpoint of W workers
loads into any other number, with no conversion.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import torch

from chatsft.train.engines.base import Accumulation, config_groups, restore_groups, set_lr

STATE_DIR = "fsdp2"


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of the decoder (and encoder, seq2seq): one FSDP unit each."""
    from chatsft.model.load import decoder_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    bodies = []
    for name in ("get_encoder", "get_decoder"):
        body = getattr(base, name)() if hasattr(base, name) else None
        if body is not None and all(body is not b for b in bodies):
            bodies.append(body)
    layers: dict[int, torch.nn.Module] = {}  # a body may hold the other (get_encoder of a causal LM)
    for body in bodies:
        layers.update((id(layer), layer) for layer in decoder_layers(body))
    return list(layers.values())


class FSDP2Engine:
    kind = "fsdp2"
    shards = True

    def __init__(self, model: torch.nn.Module, groups: list[dict], train: Any, world_size: int,
                 device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        from chatsft.train.optim import adamw

        if train.precision == "fp16":
            raise ValueError("train.precision: fp16 needs train.engine=deepspeed (loss scaling); use bf16")
        names = {id(p): n for n, p in model.named_parameters()}
        self.dtype = torch.bfloat16 if train.precision == "bf16" else torch.float32
        mp = MixedPrecisionPolicy(param_dtype=self.dtype if train.precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if train.fsdp2.cpu_offload else OffloadPolicy()
        if not train.fsdp2.cpu_offload:
            model.to(device)
        mesh = init_device_mesh(device.type, (world_size,))
        self.reshard_after_forward = train.fsdp2.reshard_after_forward
        layers = _layers(model)
        if not layers:
            raise ValueError(f"train.engine=fsdp2: found no decoder layers in {type(model).__name__} to shard")
        for layer in layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=mp,
                        offload_policy=offload)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=mp,
                    offload_policy=offload)
        self.layers = layers
        # fully_shard replaced every parameter by a sharded one of the same name
        now = dict(model.named_parameters())
        sharded = [dict(g, params=[now[names[id(p)]] for p in g["params"]]) for g in groups]
        # torch's fused AdamW over DTensors on the accelerator; the per-tensor loop for CPU-held shards
        fused = train.fused_optimizer and device.type == "cuda" and not train.fsdp2.cpu_offload
        self.optimizer = adamw(sharded, train, fused=fused)
        self.model = model
        self.device, self.world_size, self.grad_accum = device, world_size, train.grad_accum
        self.acc = Accumulation(train.grad_accum)

    def set_lr(self, multiplier: float) -> float:
        return set_lr(self.optimizer, multiplier)

    def forward(self, inputs: dict[str, Any]):
        # use_cache=False: a cache object in training turns off transformers'
        # detection of packed rows from position_ids (masking_utils)
        return self.model(**inputs, use_cache=False)

    def backward(self, loss: torch.Tensor) -> None:
        # reduce-scatter the gradients on the last micro-batch of a step only
        self.model.set_requires_gradient_sync(self.acc.last_micro())
        loss.backward()
        self.acc.micro += 1

    def step(self, clip: float) -> tuple[bool, float]:
        return self.acc.step(self.model, self.optimizer, clip)

    def skip(self) -> None:
        self.acc.micro = 0

    @property
    def skipped_steps(self) -> int:
        return self.acc.skipped

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    @contextlib.contextmanager
    def gathered(self):
        # Every unit all-gathered now and kept so: rank 0's forwards then need no collective.
        self.model.set_reshard_after_forward(False)
        for unit in [*self.layers, self.model]:
            unit.unshard()
        try:
            yield
        finally:
            for unit in [*self.layers, self.model]:
                unit.reshard()
            for layer in self.layers:
                layer.set_reshard_after_forward(self.reshard_after_forward, recurse=False)

    def full_state_dict(self, rank: int) -> Optional[dict[str, torch.Tensor]]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if rank == 0 else None

    # ------------------------------------------------------------- checkpoints

    def save(self, folder: str, rank: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        path = os.path.join(folder, STATE_DIR)
        os.makedirs(path, exist_ok=True)
        dcp.save({"model": model_state, "optim": optim_state, "skipped": self.acc.skipped}, checkpoint_id=path)

    def load(self, folder: str, saved_world: Optional[int] = None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        groups = config_groups(self.optimizer)
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state, "skipped": 0}
        dcp.load(state, checkpoint_id=os.path.join(folder, STATE_DIR))  # into this world's shards
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self.acc.skipped = int(state["skipped"])
        restore_groups(self.optimizer, groups)


def holds(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, STATE_DIR))


def checkpoint_weights(folder: str) -> dict:
    """The full model weights of an FSDP2 checkpoint, in this process (no process group)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="chatsft-dcp-") as tmp:
        out = os.path.join(tmp, "full.pt")
        dcp_to_torch_save(os.path.join(folder, STATE_DIR), out)
        return torch.load(out, map_location="cpu", weights_only=False)["model"]
