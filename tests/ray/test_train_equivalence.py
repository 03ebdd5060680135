"""micro x accumulation and 1 vs 2 vs 3 workers give the same gradients (fp32, tight tolerance).

The first AdamW step is made linear in the gradient (eps far above any gradient
entry, lr = eps: the update is lr * g / (|g| + eps) ~= g), so the weight change of
one optimizer step *is* the step's gradient, read back from the exported model.
A mistake in the loss normalisation (a mean per micro-batch, a missing division by
the accumulation steps or by the workers) scales it and fails the comparison.
"""

import pytest

from tests.conftest import use_local_ray
from trainkit import Timer, rows_for, tiny_cfg, train_rows, weights

LINEAR_STEP = ["train.lr=1e6", "train.eps=1e6", "train.clip_grad=0", "train.weight_decay=0",
               "train.max_steps=1", "train.schedule=constant"]


def gradient(tmp_path, name, tiny_llama_dir, rows, *overrides, local=True):
    cfg = tiny_cfg(tmp_path / name, *LINEAR_STEP, *overrides)
    with Timer():
        result = train_rows(cfg, rows, local=local)
    assert result.metrics["step"] == 1
    before, after = weights(tiny_llama_dir), weights(result.model_dir)
    return {k: after[k] - before[k] for k in before if k in after}


def assert_same(a, b, what):
    worst = 0.0
    for k in a:
        scale = a[k].abs().max().item()
        assert scale > 0 or b[k].abs().max().item() == 0, k
        if scale:
            worst = max(worst, (a[k] - b[k]).abs().max().item() / scale)
    print(f"{what}: worst relative difference {worst:.2e}")
    assert worst < 1e-4, what


@pytest.mark.slow
def test_micro_accum_and_workers_give_the_same_gradient(tmp_path, tiny_llama_dir):
    cfg = tiny_cfg(tmp_path)
    rows = rows_for(cfg, str(tmp_path), train_limit=8, eval_limit=0)
    # 12 rows a step, on every split below; the 8 rows fill 8 of them
    ref = gradient(tmp_path, "m12a1", tiny_llama_dir, rows, "train.micro_batch_size=12", "train.grad_accum=1")
    assert sum(d.abs().sum().item() for d in ref.values()) > 0
    other = gradient(tmp_path, "m1a12", tiny_llama_dir, rows, "train.micro_batch_size=1", "train.grad_accum=12")
    assert_same(ref, other, "micro 12 x accum 1 vs micro 1 x accum 12 (ZeRO-2)")
    torch_path = gradient(tmp_path, "torch", tiny_llama_dir, rows, "train.micro_batch_size=6",
                          "train.grad_accum=2", "train.engine=ddp")
    assert_same(ref, torch_path, "micro 12 x accum 1 (ZeRO-2) vs micro 6 x accum 2 (plain torch)")
    use_local_ray()
    two = gradient(tmp_path, "w2", tiny_llama_dir, rows, "train.micro_batch_size=2", "train.grad_accum=3",
                   "scaling.num_workers=2", local=False)
    three = gradient(tmp_path, "w3", tiny_llama_dir, rows, "train.micro_batch_size=1", "train.grad_accum=4",
                     "scaling.num_workers=3", "scaling.resources_per_worker={CPU: 0.5}", local=False)
    assert_same(ref, two, "1 worker micro 12 (--local) vs 2 Ray workers micro 2 x accum 3 (ZeRO-2)")
    assert_same(ref, three, "1 worker micro 12 (--local) vs 3 Ray workers micro 1 x accum 4 (ZeRO-2)")


@pytest.mark.slow
def test_learned_loss_head_trains_like_the_full_logits_under_zero3(tmp_path, tiny_llama_dir):
    """2 Ray workers, ZeRO-3 (the head weight partitioned, gathered inside the model's forward):
    train.loss_head=learned moves the weights as train.loss_head=full does, step for step."""
    cfg = tiny_cfg(tmp_path)
    rows = rows_for(cfg, str(tmp_path), train_limit=8, eval_limit=4)
    common = [*LINEAR_STEP, "train.max_steps=2", "train.micro_batch_size=1", "train.grad_accum=2",
              "scaling.num_workers=2", "train.deepspeed.stage=3"]
    use_local_ray()
    runs = {}
    for head in ("full", "learned"):
        with Timer():
            runs[head] = train_rows(tiny_cfg(tmp_path / head, *common, f"train.loss_head={head}"),
                                    rows, local=False)
    before = weights(tiny_llama_dir)
    moved = {h: {k: w - before[k] for k, w in weights(r.model_dir).items() if k in before}
             for h, r in runs.items()}
    assert sum(d.abs().sum().item() for d in moved["full"].values()) > 0
    assert_same(moved["full"], moved["learned"], "ZeRO-3, 2 workers, 2 steps: full logits vs learned head")
    full, learned = runs["full"].metrics, runs["learned"].metrics
    assert abs(full["eval_loss"] - learned["eval_loss"]) < 1e-4 * full["eval_loss"]
    assert abs(full["train_loss"] - learned["train_loss"]) < 1e-4 * full["train_loss"]
