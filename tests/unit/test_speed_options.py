"""The GPU fast path's options (train.compile, train.fused_optimizer, flash attention on packed rows,
train.loss_head=liger|cce, train.bf16_master_weights=false): their rules and CPU fallbacks here, the
GPU behaviour in the gpu-marked tests (run `pytest -m gpu` on a CUDA machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatsft.config import ConfigError, load_config
from chatsft.data.schema import IGNORE, Row
from chatsft.errors import UserError
from chatsft.model import load_model, load_tokenizer
from chatsft.model.batch import collate
from chatsft.model.load import compile_model, decoder_layers, load_dtype
from chatsft.model.loss import full_loss, loss_function
from chatsft.train.engines import build_engine
from chatsft.train.optim import param_groups

def cfg_with(*overrides):
    return load_config(None, ["train.precision=fp32", *overrides])


def rows(n=3, seed=0, vocab=700):
    g = np.random.default_rng(seed)
    out = []
    for length in (19, 11, 7)[:n]:
        ids = g.integers(5, vocab, length)
        labels = ids.copy()
        labels[: length // 2] = IGNORE
        out.append(Row(ids, labels))
    return out


def packed(rs):
    return [Row(np.concatenate([r.input_ids for r in rs]), np.concatenate([r.labels for r in rs]),
                np.concatenate([np.arange(len(r.input_ids)) for r in rs]))]


# ------------------------------------------------------------------------- config rules


@pytest.mark.parametrize("overrides, key", [
    (["train.loss_head=liger"], "train.loss_head=liger"),
    (["train.loss_head=cce"], "train.loss_head=cce"),
    (["train.bf16_master_weights=false"], "train.bf16_master_weights"),  # DeepSpeed on by default
    (["train.bf16_master_weights=false", "train.engine=ddp", "train.precision=fp32"],
     "train.bf16_master_weights"),
    (["train.compile=layers", "train.deepspeed.stage=3"], "train.compile=layers"),
])
def test_cross_key_rules_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_gpu_options_load_where_they_apply():
    cfg = load_config(None, ["train.loss_head=liger", "scaling.use_gpu=true", "train.compile=layers",
                             "train.bf16_master_weights=false", "train.engine=ddp"])
    assert cfg.train.loss_head == "liger" and cfg.train.compile == "layers"


# ------------------------------------------------------------------------- fused kernels


@pytest.mark.parametrize("head", ["liger", "cce"])
def test_fused_kernel_on_cpu_is_a_user_error(tiny_llama_dir, head):
    model = load_model(cfg_with(), "causal")
    with pytest.raises(UserError, match=f"train.loss_head={head}.*CUDA"):
        loss_function(model, head, device="cpu")


@pytest.mark.parametrize("head, package", [("liger", "liger-kernel"), ("cce", "cut-cross-entropy")])
def test_fused_kernel_missing_is_a_user_error(tiny_llama_dir, head, package):
    try:
        __import__({"liger": "liger_kernel", "cce": "cut_cross_entropy"}[head])
        pytest.skip(f"{package} is installed here")
    except ImportError:
        pass
    model = load_model(cfg_with(), "causal")
    with pytest.raises(UserError, match=f"train.loss_head={head}.*pip install {package}"):
        loss_function(model, head, device="cuda")  # a CUDA device asked for: the package decides


def test_cce_refuses_an_output_bias(tiny_llama_dir):
    """Cut Cross-Entropy (25.1.1, the version on PyPI) has no bias argument: a biased head is refused
    by name before any package or device is looked at."""
    model = load_model(cfg_with(), "causal")
    head = model.get_output_embeddings()
    model.set_output_embeddings(torch.nn.Linear(head.in_features, head.out_features, bias=True))
    with pytest.raises(UserError, match="train.loss_head=cce: Cut Cross-Entropy takes no output bias"):
        loss_function(model, "cce", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head", ["liger", "cce"])
@pytest.mark.parametrize("pack", [False, True])
def test_fused_kernel_equals_full_logits_on_gpu(tiny_llama_dir, head, pack):
    pytest.importorskip({"liger": "liger_kernel", "cce": "cut_cross_entropy"}[head])
    model = load_model(cfg_with(), "causal").cuda()
    batch = collate(packed(rows()) if pack else rows(), pad_id=0)
    inputs = {k: v.cuda() for k, v in batch.inputs.items()}
    fwd = lambda x: model(**x, use_cache=False)  # noqa: E731
    ref, n = full_loss(fwd, inputs, batch.targets.cuda())
    fn, how = loss_function(model, head, device="cuda")
    got, m = fn(fwd, inputs, batch.targets.cuda())
    assert int(n) == int(m) and head in how
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------- compile


def test_compile_targets_the_decoder_layers(tiny_llama_dir):
    model = load_model(cfg_with(), "causal")
    layers = decoder_layers(model.get_decoder())
    assert len(layers) == 4 and all(type(m).__name__ == "LlamaDecoderLayer" for m in layers)
    assert compile_model(model, "off") == ""
    assert compile_model(model, "layers").startswith("4 decoder layers")
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in keys  # names unchanged: checkpoints and export


@pytest.mark.slow
def test_compiled_layers_give_the_same_loss_on_cpu(tiny_llama_dir):
    """The option is not GPU-only: torch.compile (inductor) of the layers runs on CPU as well."""
    model = load_model(cfg_with(), "causal")
    loss, _ = loss_function(model, "learned")
    batch = collate(rows(), pad_id=0)
    fwd = lambda x: model(**x, use_cache=False)  # noqa: E731
    ref, _ = loss(fwd, batch.inputs, batch.targets)
    compile_model(model, "layers")
    got, _ = loss(fwd, batch.inputs, batch.targets)
    got.backward()
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------- optimizer and precision


@pytest.mark.parametrize("fused", [True, False])
def test_fused_adamw_on_cpu_steps_like_the_loop(tiny_llama_dir, fused):
    """train.fused_optimizer picks the kernel (CPU has one too); both step alike."""
    results = {}
    for flag in (fused, not fused):
        cfg = cfg_with("train.engine=ddp", f"train.fused_optimizer={str(flag).lower()}", "train.lr=1e-2")
        torch.manual_seed(0)
        model = load_model(cfg, "causal")
        engine = build_engine(model, param_groups(model, cfg.train), cfg.train, world_size=1,
                              device=torch.device("cpu"))
        assert bool(engine.optimizer.defaults.get("fused")) is flag
        loss, _ = loss_function(model, "learned")
        batch = collate(rows(), pad_id=0)
        for _ in range(2):
            total, n = loss(engine.forward, batch.inputs, batch.targets)
            engine.backward(total / n)
            engine.step(1.0)
        results[flag] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # An update is lr-sized (1e-2); the kernels round Adam's sqrt(v) + eps differently, which a
    # near-zero second moment turns into ~1e-6 on a rare element, so the tolerance sits between.
    for k in results[True]:
        torch.testing.assert_close(results[True][k], results[False][k], rtol=1e-4, atol=1e-5)


def test_bf16_without_master_weights_steps_bf16_tensors_on_cpu(tiny_llama_dir):
    cfg = load_config(None, ["train.precision=bf16", "train.engine=ddp",
                             "train.bf16_master_weights=false", "train.lr=1e-2"])
    assert load_dtype(cfg, cuda=False) == torch.bfloat16
    assert load_dtype(load_config(None, ["train.precision=bf16", "train.engine=ddp"]),
                      cuda=False) == torch.float32  # the default keeps fp32 weights on CPU
    model = load_model(cfg, "causal")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    engine = build_engine(model, param_groups(model, cfg.train), cfg.train, world_size=1, device=torch.device("cpu"))
    loss, _ = loss_function(model, "learned")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = collate(rows(), pad_id=0)
    total, n = loss(engine.forward, batch.inputs, batch.targets)
    engine.backward(total / n)
    applied, norm = engine.step(1.0)
    assert applied and norm > 0
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    state = engine.optimizer.state[next(model.parameters())]
    assert state["exp_avg"].dtype == torch.bfloat16  # no fp32 copy anywhere
    assert any(not torch.equal(before[k], p) for k, p in model.named_parameters())


# ---------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_adamw_and_compile_on_gpu(tiny_llama_dir):
    cfg = cfg_with("train.engine=ddp", "train.compile=layers")
    model = load_model(cfg, "causal")
    loss, _ = loss_function(model, "learned", device="cuda")
    engine = build_engine(model, param_groups(model, cfg.train), cfg.train, world_size=1,
                          device=torch.device("cuda", 0))
    assert engine.optimizer.defaults.get("fused") is True
    batch = collate(packed(rows()), pad_id=0)
    inputs, targets = {k: v.cuda() for k, v in batch.inputs.items()}, batch.targets.cuda()
    ref, n = loss(engine.forward, inputs, targets)
    compile_model(model, "layers")
    got, _ = loss(engine.forward, inputs, targets)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    engine.backward(got / n)
    assert engine.step(1.0)[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flash_attention_varlen_on_packed_rows(tiny_llama_dir):
    pytest.importorskip("flash_attn")
    cfg = load_config(None, ["model.attn_implementation=flash_attention_2", "model.dtype=bfloat16"])
    model = load_model(cfg, "causal").cuda().eval()
    assert model.config._attn_implementation == "flash_attention_2"
    loss, _ = loss_function(model, "learned", device="cuda")
    fwd = lambda x: model(**x, use_cache=False)  # noqa: E731
    with torch.no_grad():
        pb = collate(packed(rows()), pad_id=0)  # position_ids, no mask: varlen
        ub = collate(rows(), pad_id=0)
        p, pn = loss(fwd, {k: v.cuda() for k, v in pb.inputs.items()}, pb.targets.cuda())
        u, un = loss(fwd, {k: v.cuda() for k, v in ub.inputs.items()}, ub.targets.cuda())
    assert int(pn) == int(un)
    torch.testing.assert_close(p / pn, u / un, rtol=0.02, atol=0.02)  # bf16 kernels, tiled differently


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_without_master_weights_on_gpu(tiny_llama_dir):
    cfg = load_config(None, ["train.precision=bf16", "train.engine=ddp",
                             "train.bf16_master_weights=false"])
    model = load_model(cfg, "causal")
    engine = build_engine(model, param_groups(model, cfg.train), cfg.train, world_size=1,
                          device=torch.device("cuda", 0))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    loss, _ = loss_function(model, "learned", device="cuda")
    batch = collate(rows(), pad_id=0)
    total, n = loss(engine.forward, {k: v.cuda() for k, v in batch.inputs.items()}, batch.targets.cuda())
    engine.backward(total / n)
    assert engine.step(1.0)[0]
