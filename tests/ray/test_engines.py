"""The engines agree: ddp, ZeRO-2, ZeRO-3 and FSDP2, full fine-tuning and LoRA, on real Ray Train
workers. One Ray Train run per world size: its worker function builds every engine in turn on
the same gloo group from the same seed and rows (tests/ray/enginekit.py), steps it, and rank 0
writes down each step's full gradients, the gradient norm the engine reports and the final full
weights; the test compares them with one process stepping the plain model (relative 1e-4)."""

import pytest
import torch

import enginekit

pytestmark = pytest.mark.slow

TOL = 1e-4


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_engine_steps_like_the_plain_model(world, tmp_path, local_ray):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = tmp_path / "got.pt"
    TorchTrainer(enginekit.ray_worker, train_loop_config={"out": str(out)},
                 torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=world, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name="engines", storage_path=str(tmp_path / "ray"))).fit()
    got = torch.load(out, weights_only=False)
    worst, refs = {}, {}
    for method in enginekit.METHODS:
        ref = refs[method] = enginekit.reference(method)
        for name in enginekit.ENGINES:
            run = got[(method, name)]
            for step in range(enginekit.STEPS):
                assert run["grads"][step].keys() == ref["grads"][step].keys(), (method, name, step)
                assert run["norms"][step] == pytest.approx(ref["norms"][step], rel=TOL), (method, name, step)
            assert run["weights"].keys() == ref["weights"].keys(), (method, name)
            g = max(enginekit.rel(run["grads"][s][k], ref["grads"][s][k])
                    for s in range(enginekit.STEPS) for k in ref["grads"][s])
            w = max(enginekit.rel(run["weights"][k], ref["weights"][k]) for k in ref["weights"])
            worst[(method, name)] = (g, w)
    print({k: f"grads {g:.1e} weights {w:.1e}" for k, (g, w) in worst.items()})
    bad = {k: v for k, v in worst.items() if max(v) > TOL}
    assert not bad, bad
    # LoRA trained only the adapters: the frozen base is the reference's, bit for bit
    lora = got[("lora", "fsdp2")]
    base = [k for k in lora["weights"] if "lora_" not in k]
    assert base and all(torch.equal(lora["weights"][k], refs["lora"]["weights"][k]) for k in base)
