"""Validation loss: the one definition, over prepared rows, used by training and by `chatsft eval`.

eval_loss = (sum of token cross-entropies over every supervised token of the
split) / (number of those tokens): the training loss's own normalization, on
the same rows (packed or not) the trainer would read. With several workers,
rows are dealt out as training deals them (global batches of micro x world rows,
row j to worker j % world, the last batch filled with empty rows so every rank
runs as many forwards, which ZeRO-3 needs); the caller all-reduces the sums.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from chatsft.data.order import global_batches, worker_micro_batches
from chatsft.data.schema import Row


def loss_sums(forward: Callable[[dict], Any], rows: Iterable[Row], *, loss: Callable, micro_batch: int,
              pad_id: int, seq2seq: bool, decoder_start: Optional[Callable] = None, device: Any = "cpu",
              rank: int = 0, world: int = 1) -> tuple[float, int]:
    """(sum of token losses, supervised tokens) over this worker's share of `rows`.

    `forward(inputs)` runs the model (a Hugging Face model, a PEFT model or a
    training engine) in eval mode under no_grad; the caller sets the mode. `loss` is
    the training's own loss function (chatsft.model.loss.loss_function), so both
    measure alike.
    """
    import torch

    from chatsft.model.batch import collate

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in global_batches(rows, micro_batch * world):
            (mine,) = worker_micro_batches(batch, rank=rank, world=world, micro=micro_batch)
            b = collate(mine, pad_id=pad_id, seq2seq=seq2seq, decoder_start=decoder_start)
            s, c = loss(forward, {k: v.to(device) for k, v in b.inputs.items()}, b.targets.to(device))
            total += float(s)
            count += int(c)
    return total, count
