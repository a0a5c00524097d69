"""PETRA stages on CPU without Ray: exact reverse when weights have not moved, BatchNorm
statistics updated once, bounded buffers for non-reversible blocks, accumulation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from brigade.schedulers import build
from brigade.stages.errors import ConfigError
from brigade.stages.models import build_model
from brigade.stages.partition import split
from brigade.stages.petra import PetraStage
from brigade.stages.revnet import RevBlock
from brigade.stages.stage import StageSpec

# revnet18: 0 Stem, 1 Rev, 2 Rev, 3 Down, 4 Rev, 5 Down, 6 Rev, 7 Down, 8 Rev, 9 Head
BALANCE = [1, 2, 2, 2, 3]  # stem | rev rev | down rev | down rev | down rev head
KINDS = {0: "first (stem)", 1: "all reversible", 2: "mixed", 4: "last (with head)"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def bn_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr)


def model_and_batch(seed=0, n=4):
    torch.manual_seed(seed)
    model = build_model("revnet18", width=8, image_size=8).train()
    return model, torch.randn(n, 3, 8, 8), torch.randint(0, 10, (n,))


def stage_input(model, index, x):
    """The input of stage ``index`` as the model produces it in train mode (on a copy, so
    the real model's statistics are untouched)."""
    pre = copy.deepcopy(model)
    with torch.no_grad():
        for block in split(pre, BALANCE)[:index]:
            x = block(x)
    return x


@pytest.mark.parametrize("index", sorted(KINDS), ids=KINDS.values())
def test_reverse_matches_autograd_with_stored_activations(index):
    model, x, y = model_and_batch()
    x = stage_input(model, index, x)
    module = split(model, BALANCE)[index]
    ref = copy.deepcopy(module)
    spec = StageSpec(index, len(BALANCE))
    last = spec.is_last
    stage = PetraStage(module, spec, None, nn.CrossEntropyLoss() if last else None)

    # autograd with stored activations, train mode
    xr = x.clone().requires_grad_(not spec.is_first)
    out = ref(xr)
    if last:
        ref_loss = nn.functional.cross_entropy(out, y) * 0.5
        ref_loss.backward()
    else:
        dy = torch.randn_like(out)
        out.backward(dy)

    # PETRA: forward stores nothing for reversible blocks; reverse rebuilds and backprops
    got = stage.forward(7, x, y if last else None, weight=0.5)
    if last:
        assert float(got) == pytest.approx(float(ref_loss.detach()), rel=1e-6)
        assert stage.pop_losses() == [pytest.approx(float(got))]
        x_rec, dx = stage.reverse(7)
    else:
        assert rel_err(got, out.detach()) < 1e-6
        x_rec, dx = stage.reverse(7, got, dy)
    if spec.is_first:
        assert (x_rec, dx) == (None, None)
    else:
        assert rel_err(x_rec, x) < 1e-5, "reconstructed input"
        assert rel_err(dx, xr.grad) < 1e-5, "input gradient"
    checked = 0
    for (name, p), q in zip(module.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5, name
        checked += 1
    assert checked > 0
    # BatchNorm running statistics: moved exactly once (by the forward), as the reference's
    for key, value in bn_state(module).items():
        assert torch.equal(value, bn_state(ref)[key]), key
        if key.endswith("num_batches_tracked"):
            assert int(value) == 1
    assert stage.stored_bytes() == 0 and stage.stored_microbatches == 0


def test_whole_pipeline_reverse_equals_backprop_before_any_update():
    """Five PETRA stages, one microbatch forward then reverse: backprop's gradients."""
    model, x, y = model_and_batch(1)
    ref = copy.deepcopy(model)
    nn.functional.cross_entropy(ref(x), y).backward()
    stages = [
        PetraStage(m, StageSpec(i, len(BALANCE)), sgd(0.1), nn.CrossEntropyLoss(), accumulate=2)
        for i, m in enumerate(split(model, BALANCE))
    ]
    h = x
    for s in stages:
        h = s.forward(0, h, y)
    msg = (None, None)
    for s in reversed(stages):
        msg = s.reverse(0, *msg)
    assert msg == (None, None)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    want = torch.cat([q.grad.flatten() for q in ref.parameters()])
    assert rel_err(got, want) < 1e-5
    # per tensor, relative to the whole gradient's scale: some BatchNorm biases followed by
    # another BatchNorm have a true gradient of 0 that both sides compute as rounding noise
    scale = float(want.abs().max())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert float((p.grad - q.grad).abs().max()) < 1e-5 * scale, name
    for key, value in bn_state(model).items():
        assert torch.equal(value, bn_state(ref)[key]), key
    assert all(s.steps == 0 for s in stages)  # accumulate=2: nothing applied yet


def test_all_reversible_stage_stores_nothing():
    model, x, _ = model_and_batch()
    stage = PetraStage(split(model, BALANCE)[1], StageSpec(1, 5))
    assert stage.all_reversible
    x = stage_input(model, 1, x)
    outs = [stage.forward(j, x) for j in range(4)]
    assert stage.stored_bytes() == 0 and stage.peak_stored_bytes == 0
    assert stage.stored_microbatches == 0 and stage.max_buffered == 0
    x_rec, _ = stage.reverse(0, outs[0], torch.ones_like(outs[0]))
    assert rel_err(x_rec, x) < 1e-5


@pytest.mark.parametrize("delay", [0, 1, 3])
def test_non_reversible_buffer_is_bounded_by_the_delay(delay):
    """Forward runs ``delay`` microbatches ahead of reverse: at most delay + 1 inputs held."""
    model, x, _ = model_and_batch()
    x = stage_input(model, 2, x)
    stage = PetraStage(split(model, BALANCE)[2], StageSpec(2, 5), sgd(0.01), accumulate=2)
    outs, n = {}, 12
    for j in range(n):
        outs[j] = stage.forward(j, x + 0.01 * j)
        assert stage.stored_microbatches <= delay + 1
        if j >= delay:
            out = outs.pop(j - delay)
            stage.reverse(j - delay, out, torch.full_like(out, 1e-3))
    for i in sorted(outs):
        stage.reverse(i, outs[i], torch.full_like(outs[i], 1e-3))
    assert stage.max_buffered == delay + 1
    assert stage.peak_stored_bytes == (delay + 1) * x.numel() * x.element_size()
    assert stage.stored_bytes() == 0 and stage.stored_microbatches == 0
    assert stage.steps == n // 2


def test_accumulate_steps_once_per_k_reverses():
    model, x, _ = model_and_batch()
    x = stage_input(model, 1, x)
    module = split(model, BALANCE)[1]
    ref = copy.deepcopy(module)
    stage = PetraStage(module, StageSpec(1, 5), sgd(0.1), accumulate=3)
    before = [p.detach().clone() for p in module.parameters()]
    xs = [x + 0.1 * j for j in range(4)]
    dys = [torch.randn_like(x) for _ in range(4)]
    for j in range(3):
        out = stage.forward(j, xs[j])
        stage.reverse(j, out, dys[j])
        ref(xs[j]).backward(dys[j])  # the reference accumulates the same three gradients
        unchanged = all(torch.equal(p, b) for p, b in zip(module.parameters(), before))
        assert unchanged == (j < 2), f"after {j + 1} reverses"
    assert stage.steps == 1
    for p, b, q in zip(module.parameters(), before, ref.parameters()):
        assert p.grad is None  # zeroed after the step
        assert rel_err((b - p.detach()) / 0.1, q.grad) < 1e-5  # one step, the sum of three
    out = stage.forward(3, xs[3])
    stage.reverse(3, out, dys[3])
    assert stage.steps == 1
    stage.update()  # flush the partial accumulation
    assert stage.steps == 2
    stage.update()  # nothing pending: no-op
    assert stage.steps == 2


def test_weights_changed_between_forward_and_reverse_use_the_current_ones():
    """One weight version: the rebuild uses the weights of now, so it differs from the true
    input once an update has happened in between (the PETRA approximation), but stays close."""
    torch.manual_seed(0)
    block = nn.Sequential(RevBlock(8)).train()
    stage = PetraStage(block, StageSpec(1, 3), sgd(0.05), accumulate=1)
    x = torch.randn(4, 8, 6, 6)
    y0 = stage.forward(0, x)
    y1 = stage.forward(1, x)
    stage.reverse(1, y1, 1e-4 * torch.randn_like(y1))  # steps: weights move a little
    x_rec, _ = stage.reverse(0, y0, 1e-4 * torch.randn_like(y0))
    err = rel_err(x_rec, x)
    assert 1e-5 < err < 0.05, err


def run_schedule(stages, sched, batches):
    """A tiny in-order executor: each worker runs its next action when its message is there."""
    msgs, rows, pos = {}, sched.workers, [0] * len(sched.workers)
    last = len(stages) - 1
    while any(pos[w] < len(rows[w]) for w in range(len(rows))):
        progressed = False
        for w, row in enumerate(rows):
            if pos[w] >= len(row):
                continue
            a = row[pos[w]]
            s, j, st = a.stage, a.microbatch, stages[a.stage]
            x, y = batches[j]
            if a.kind == "F":
                key = ("x", s, j)
                if s and key not in msgs:
                    continue
                out = st.forward(j, msgs.pop(key) if s else x, y, 1 / sched.microbatches)
                if s < last:
                    msgs[("x", s + 1, j)] = out
            elif a.kind == "R":
                key = ("g", s, j)
                if s < last and key not in msgs:
                    continue
                back = st.reverse(j, *msgs.pop(key, (None, None)))
                if s:
                    msgs[("g", s - 1, j)] = back
            elif a.kind == "U":
                st.update()
            else:  # pragma: no cover
                raise AssertionError(a)
            pos[w] += 1
            progressed = True
        assert progressed, "deadlock"
    assert not msgs


def test_petra_schedule_runs_with_bounded_buffers_and_one_stats_update_per_microbatch():
    model, _, _ = model_and_batch(2)
    p, m, steps = 3, 4, 3
    sched = build("petra", stages=p, microbatches=m, steps=steps)
    balance = [4, 3, 3]  # stem rev rev down | rev down rev | down rev head
    stages = [
        PetraStage(mod, StageSpec(i, p), sgd(0.05), nn.CrossEntropyLoss(),
                   accumulate=sched.options["accumulate"])
        for i, mod in enumerate(split(model, balance))
    ]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g))
               for _ in range(m * steps)]
    run_schedule(stages, sched, batches)
    for s, st in enumerate(stages):
        assert st.max_buffered == 2 * (p - 1 - s) + 1, f"stage {s}"
        assert st.steps == steps, "U after an automatic step must not step again"
        assert st.stored_microbatches == 0
    assert len(stages[-1].pop_losses()) == m * steps
    for key, value in bn_state(model).items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == m * steps, key


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="accumulate"):
        PetraStage(nn.Sequential(RevBlock(4)), StageSpec(0, 2), accumulate=0)
    with pytest.raises(ConfigError, match="loss_fn"):
        PetraStage(nn.Sequential(RevBlock(4)), StageSpec(1, 2))
    stage = PetraStage(nn.Sequential(RevBlock(4)), StageSpec(0, 2))
    with pytest.raises(ConfigError, match="dL/dy"):
        stage.reverse(0, torch.zeros(1, 4, 2, 2), None)


def test_last_stage_ending_in_a_reversible_block_keeps_its_output():
    """A loss directly on a reversible block's output: the stage keeps that output (the only
    case where the last stage stores more than non-reversible inputs) and still matches."""
    torch.manual_seed(0)
    module = nn.Sequential(RevBlock(4)).train()
    ref = copy.deepcopy(module)
    mse = nn.MSELoss()
    stage = PetraStage(module, StageSpec(1, 2), None, mse)
    x, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    xr = x.clone().requires_grad_()
    (mse(ref(xr), t) * 2.0).backward()
    stage.forward(0, x, t, weight=2.0)
    assert stage.stored_bytes() == x.numel() * 4 and stage.stored_microbatches == 1
    x_rec, dx = stage.reverse(0)
    assert rel_err(x_rec, x) < 1e-5 and rel_err(dx, xr.grad) < 1e-5
    for p, q in zip(module.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5
    assert stage.stored_bytes() == 0
