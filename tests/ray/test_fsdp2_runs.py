"""FSDP2 runs end to end on real Ray Train workers: its DCP checkpoints reshard (3 workers ->
2), a killed worker resumes bit-identically, and its export is the Hugging Face folder the
DeepSpeed engine writes (same tokens generated)."""

import json
import os
import shutil

import pytest
import torch

from chatsft.train.driver import Extras
from tests.faults import ExitOnce
from trainkit import Timer, rows_for, state_of, tiny_cfg, train_rows, weights

pytestmark = pytest.mark.slow

# 6 rows per step: 3 workers x 2 micro-batches of 1, or 2 workers x 3
RUN = ["train.engine=fsdp2", "train.max_steps=4", "train.save_every=2", "train.micro_batch_size=1",
       "train.keep_checkpoints=0", "train.schedule=constant", "train.eval_every=0",
       "scaling.resources_per_worker={CPU: 0.5}",
       # Adam eps far above rounding noise: the 3-worker steps sum in another order, and a near-zero
       # gradient element must not flip its +-lr update by that noise
       "train.eps=1e-6"]


def _rel(a, b):
    return float(torch.linalg.vector_norm(a.float() - b.float()) / torch.linalg.vector_norm(b.float()))


def test_fsdp2_reshards_on_resume_and_a_killed_worker_resumes_bit_identically(tmp_path, local_ray):
    two = tiny_cfg(tmp_path / "two", *RUN, "scaling.num_workers=2", "train.grad_accum=3", "scaling.max_failures=0")
    rows = rows_for(two, str(tmp_path), train_limit=30, eval_limit=6)
    with Timer():
        straight = train_rows(two, rows, local=False)  # 2 workers, uninterrupted
    assert straight.metrics["step"] == 4

    # A worker killed after step 3: Ray Train restarts the group, which resumes step 2's checkpoint.
    marker = tmp_path / "killed-once"
    killed_cfg = tiny_cfg(tmp_path / "killed", *RUN, "scaling.num_workers=2", "train.grad_accum=3",
                          "scaling.max_failures=1")
    with Timer():
        killed = train_rows(killed_cfg, rows, local=False, extras=Extras(hooks=[ExitOnce(3, marker, rank=1)]))
    assert marker.exists(), "the worker was never killed"
    a, b = weights(straight.model_dir), weights(killed.model_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]

    # 3 workers save step 2 (their DCP shards: one file per rank), then 2 workers resume it.
    three = tiny_cfg(tmp_path / "three", *RUN, "scaling.num_workers=3", "train.grad_accum=2", "train.max_steps=2")
    with Timer():
        first = train_rows(three, rows, local=False)
    saved = first.checkpoint
    assert state_of(saved)["world_size"] == 3
    with open(os.path.join(saved, "train_state_rank0.json")) as f:
        assert json.load(f)["state"]["engine"] == "fsdp2"
    assert sorted(n for n in os.listdir(os.path.join(saved, "fsdp2")) if n.endswith(".distcp")) == \
        ["__0_0.distcp", "__1_0.distcp", "__2_0.distcp"]
    at_two = {k: v.clone() for k, v in weights(first.model_dir).items()}
    resumed_cfg = tiny_cfg(tmp_path / "three", *RUN, "scaling.num_workers=2", "train.grad_accum=2")
    with Timer():
        resumed = train_rows(resumed_cfg, rows, local=False)
    assert resumed.metrics["resumed_from"] == saved
    assert resumed.metrics["step"] == 4
    c = weights(resumed.model_dir)
    assert c.keys() == a.keys()
    worst = max(_rel(c[k], a[k]) for k in a)
    assert worst < 1e-4, worst  # the 2-worker run's weights, up to the order of sums
    assert max(_rel(c[k], at_two[k]) for k in a) > 1e-3  # and it did train on from the checkpoint

    # Another engine's checkpoint is refused in one line naming train.engine.
    other = tiny_cfg(tmp_path / "three", *RUN, "scaling.num_workers=2", "train.grad_accum=2",
                     "train.engine=ddp", "train.max_steps=6")
    from chatsft.errors import UserError

    with pytest.raises(UserError, match=r"train.engine=ddp: the checkpoint .* was written by train.engine=fsdp2"):
        train_rows(other, rows, local=False)


def test_fsdp2_export_generates_what_the_deepspeed_export_does(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = ["train.max_steps=3", "train.micro_batch_size=2", "train.grad_accum=2"]
    fsdp2 = tiny_cfg(tmp_path / "fsdp2", "train.engine=fsdp2", *common)
    rows = rows_for(fsdp2, str(tmp_path), train_limit=24, eval_limit=0)
    a = train_rows(fsdp2, rows, local=True)
    b = train_rows(tiny_cfg(tmp_path / "zero3", "train.engine=deepspeed", "train.deepspeed.stage=3", *common),
                   rows, local=True)
    assert sorted(os.listdir(a.model_dir)) == sorted(os.listdir(b.model_dir))
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    prompt = tok("hello there, how are", return_tensors="pt")
    out = []
    for folder in (a.model_dir, b.model_dir):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            out.append(model.generate(**prompt, max_new_tokens=12, do_sample=False)[0].tolist())
    assert out[0] == out[1]
    wa, wb = weights(a.model_dir), weights(b.model_dir)
    assert max(_rel(wa[k], wb[k]) for k in wa) < 1e-4
    # `chatsft export` rebuilds the same folder from the FSDP2 checkpoint (DCP, no process group)
    from chatsft.plan import RunPlan
    from chatsft.train.export import export_cli

    again = export_cli(RunPlan.resolve(fsdp2, local=True), out=str(tmp_path / "again"))
    wc = weights(again)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    shutil.rmtree(again)
