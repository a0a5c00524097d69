"""The trainer's usual knobs act in the pipeline exactly as in one process.

LR schedule (cosine / step, with warm-up) and weight decay: the pipelined weights equal
one-process training with the same optimizer factory (1e-5), local backend and one Ray
run. --autocast bf16: the same under torch.autocast on both sides. --clip-grad-norm clips
each stage's own gradient (one stage: the usual global clip). An evaluation per epoch.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from brigade.engine import Pipeline
from brigade.engine.cli import main
from brigade.engine.optim import OptimConfig, OptimizerFactory, lr_factor

STEPS = 6
BALANCE = [2, 1]


def net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.Tanh()),
        nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
        nn.Linear(16, 3),
    )


def data(k: int = STEPS, n: int = 10):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(n, 1, 2, 3, generator=g), torch.randint(0, 3, (n,), generator=g))
            for _ in range(k)]


def one_process(model, factory, batches, microbatches=4, autocast=False):
    """Single-process training with the pipeline's microbatch split and accumulation."""
    model = copy.deepcopy(model)
    opt = factory(model.parameters())
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        n = x.shape[0]
        for xj, yj in zip(torch.tensor_split(x, microbatches), torch.tensor_split(y, microbatches)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.cross_entropy(model(xj), yj) * (xj.shape[0] / n)
            loss.backward()
        opt.step()
    return model.state_dict()


def pipelined(model, factory, batches, backend="local", **kw):
    with Pipeline(model, stages=BALANCE, microbatches=4, optimizer=factory,
                  loss_fn=nn.CrossEntropyLoss(), backend=backend, **kw) as pipe:
        pipe.run(batches)
        return pipe.state_dict()


def assert_same(got, want, tol=1e-5):
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol, msg=k)


def test_lr_factor_warmup_then_cosine_and_step():
    cos = OptimConfig(lr=1.0, lr_schedule="cosine", warmup_steps=2)
    assert [round(lr_factor(cos, t, 6), 6) for t in range(6)] == [
        0.5, 1.0, 1.0, round(0.5 * (1 + math.cos(math.pi / 4)), 6), 0.5,
        round(0.5 * (1 + math.cos(3 * math.pi / 4)), 6)]
    step = OptimConfig(lr=1.0, lr_schedule="step", lr_step_every=2, lr_gamma=0.5)
    assert [lr_factor(step, t, 6) for t in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert lr_factor(OptimConfig(lr=1.0), 5, 6) == 1.0


def test_the_schedule_changes_the_rate_the_optimizer_uses():
    factory = OptimizerFactory(OptimConfig(optimizer="sgd", lr=0.1, lr_schedule="cosine",
                                           warmup_steps=2), total_steps=STEPS)
    p = nn.Parameter(torch.zeros(1))
    opt = factory([p])
    lrs = []
    for _ in range(STEPS):
        p.grad = torch.ones(1)
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.1)
    assert lrs[-1] < lrs[2] and opt.param_groups[0]["updates"] == STEPS
    # the clock is saved with the optimizer: a restored one goes on where it was
    again = factory([nn.Parameter(torch.zeros(1))])
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[0]["updates"] == STEPS


@pytest.mark.parametrize("optimizer,schedule", [("momentum", "cosine"), ("adamw", "step"),
                                                ("sgd", "constant")])
def test_schedule_and_weight_decay_equal_one_process_local(optimizer, schedule):
    cfg = OptimConfig(optimizer=optimizer, lr=0.1, lr_schedule=schedule, warmup_steps=2,
                      weight_decay=0.05, lr_step_every=2)
    factory = OptimizerFactory(cfg, total_steps=STEPS)
    batches = data()
    want = one_process(net(), factory, batches)
    assert_same(pipelined(net(), factory, batches), want)
    # and the knobs did something: without them the weights differ
    plain = one_process(net(), OptimizerFactory(OptimConfig(optimizer=optimizer, lr=0.1),
                                                total_steps=STEPS), batches)
    assert any(not torch.allclose(plain[k], want[k]) for k in want)


@pytest.mark.ray
def test_cosine_warmup_and_weight_decay_equal_one_process_on_ray(ray_cluster):
    cfg = OptimConfig(optimizer="momentum", lr=0.1, lr_schedule="cosine", warmup_steps=2,
                      weight_decay=0.05)
    factory = OptimizerFactory(cfg, total_steps=STEPS)
    batches = data()
    want = one_process(net(), factory, batches)
    assert_same(pipelined(net(), factory, batches, backend="ray", cpus_per_stage=1), want)


def test_autocast_bf16_equals_one_process_under_the_same_autocast():
    factory = OptimizerFactory(OptimConfig(optimizer="momentum", lr=0.1), total_steps=STEPS)
    batches = data()
    want = one_process(net(), factory, batches, autocast=True)
    got = pipelined(net(), factory, batches, autocast="bf16")
    assert_same(got, want)
    assert all(v.dtype == torch.float32 for v in got.values())  # weights stay float32
    full = one_process(net(), factory, batches)  # and bf16 did round: not the fp32 weights
    assert any(not torch.allclose(full[k], want[k], atol=1e-6) for k in want)


def test_autocast_is_refused_where_the_forward_is_not_a_module_call():
    from brigade.engine import PipelineConfigError

    with pytest.raises(PipelineConfigError, match="--autocast bf16 is not supported with "
                                                  "method 'fwdgrad'"):
        Pipeline(net(), stages=2, method="fwdgrad", backend="local", autocast="bf16")


def test_clip_grad_norm_clips_each_stage_own_gradient():
    cfg = OptimConfig(optimizer="sgd", lr=0.5, clip_grad_norm=0.05)
    factory = OptimizerFactory(cfg, total_steps=STEPS)
    batches = data()
    # one stage: the usual clip over the whole model
    with Pipeline(net(), stages=[3], microbatches=4, optimizer=factory,
                  loss_fn=nn.CrossEntropyLoss(), backend="local") as pipe:
        pipe.run(batches)
        one_stage = pipe.state_dict()
    assert_same(one_stage, _clipped(net(), cfg, batches, [(0, 3)]))
    # two stages: each clips its own parameters (BALANCE = [2, 1]), not the global norm
    two = pipelined(net(), factory, batches)
    assert_same(two, _clipped(net(), cfg, batches, [(0, 2), (2, 3)]))
    assert any(not torch.allclose(two[k], one_stage[k]) for k in two)


def _clipped(model, cfg, batches, groups):
    """One process: accumulate, clip each group of blocks on its own, SGD step."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        n = x.shape[0]
        for xj, yj in zip(torch.tensor_split(x, 4), torch.tensor_split(y, 4)):
            (nn.functional.cross_entropy(model(xj), yj) * (xj.shape[0] / n)).backward()
        for lo, hi in groups:
            torch.nn.utils.clip_grad_norm_(
                [p for b in list(model)[lo:hi] for p in b.parameters()], cfg.clip_grad_norm)
        opt.step()
    return model.state_dict()


def test_an_evaluation_line_per_epoch_printed_and_in_json(tmp_path, capsys):
    out = tmp_path / "o.json"
    assert main(["train", "--model", "mlp", "--width", "16", "--data", "synthetic",
                 "--synthetic-size", "256", "--batch-size", "64", "--epochs", "2",
                 "--backend", "local", "--lr-schedule", "cosine", "--warmup-steps", "2",
                 "--weight-decay", "1e-4", "--clip-grad-norm", "5", "--quiet",
                 "--json", str(out)]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2 and "test accuracy" in lines[0] and "test loss" in lines[1]
    report = json.loads(out.read_text())
    epochs = report["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2] and [e["steps"] for e in epochs] == [4, 8]
    assert all(e["complete"] and 0 <= e["test_accuracy"] <= 1 and e["test_loss"] > 0
               for e in epochs)
    assert report["final_test_accuracy"] == epochs[-1]["test_accuracy"]
    assert report["config"]["lr_schedule"] == "cosine"
