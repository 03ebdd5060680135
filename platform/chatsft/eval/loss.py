"""Validation loss: the one definition, over prepared rows, used by training and by `chatsft eval`.

eval_loss = (sum of token cross-entropies over every supervised token of the
split) / (number of those tokens): the training loss's own normalization, on
the same rows (packed or not) the trainer would read. With several workers,
each reads its own contiguous share of the stored rows (train/data.py
`shard_rows`) and runs `forwards` micro-batches, filled with empty rows where its
share runs out, so every rank runs as many forwards (ZeRO-3 needs it); the
caller all-reduces the sums. A caller holding every row may instead deal them
out itself (`rank`, `world`: row j to worker j % world).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from chatsft.data.order import filled
from chatsft.data.schema import EMPTY, Row


def loss_sums(forward: Callable[[dict], Any], rows: Iterable[Row], *, loss: Callable, micro_batch: int,
              collate: Callable[[list[Row]], Any], device: Any = "cpu",
              rank: int = 0, world: int = 1, forwards: Optional[int] = None,
              sequence: tuple[int, int] = (0, 1)) -> tuple[float, int]:
    """(sum of token losses, supervised tokens) over this worker's share of `rows`.

    `forward(inputs)` runs the model (a Hugging Face model, a PEFT model or a
    training engine) in eval mode under no_grad; the caller sets the mode. `loss` is
    the training's own loss function (chatsft.model.loss.loss_function), so both
    measure alike; `collate` the training's batching (the model kind's `batcher`). `sequence`
    (part, parts): under sequence parallelism this rank runs part `part` of each row cut into
    `parts` (the group's ranks read the same rows).
    """
    import torch

    from chatsft.model.batch import shard_sequence

    if world > 1:
        rows = [r for batch in filled(iter(rows), micro_batch * world) for r in batch[rank::world]]
    total, count = 0.0, 0
    with torch.no_grad():
        for mine in _padded(filled(iter(rows), micro_batch), micro_batch, forwards):
            b = shard_sequence(collate(mine), *sequence)
            s, c = loss(forward, {k: v.to(device) for k, v in b.inputs.items()}, b.targets.to(device))
            total += float(s)
            count += int(c)
    return total, count


def _padded(batches: Iterable[list[Row]], micro: int, forwards: Optional[int]) -> Iterable[list[Row]]:
    n = 0
    for b in batches:
        n += 1
        yield b
    while forwards is not None and n < forwards:
        n += 1
        yield [EMPTY] * micro
