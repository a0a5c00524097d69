"""The stale-gradient baseline: backprop every k steps, the same gradient applied in between."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from brigade.schedulers import build
from brigade.stages.errors import ConfigError
from brigade.stages.stage import StageSpec
from brigade.stages.stale import StaleStage

LR = 0.1


def sgd(params):
    return torch.optim.SGD(params, lr=LR)


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def test_step_after_a_backprop_step_applies_exactly_the_old_gradient():
    model = tiny()
    stage = StaleStage(model, StageSpec(0, 1), sgd, nn.CrossEntropyLoss())
    x0, y0 = torch.randn(5, 4), torch.randint(0, 3, (5,))
    x1, y1 = torch.randn(5, 4), torch.randint(0, 3, (5,))

    # step 0: backprop
    ref = copy.deepcopy(model)
    nn.functional.cross_entropy(ref(x0), y0).backward()
    old_grad = [q.grad.clone() for q in ref.parameters()]
    stage.forward(0, x0, y0)
    stage.backward(0)
    stage.update()
    after0 = [p.detach().clone() for p in model.parameters()]
    for p, q, g in zip(after0, ref.parameters(), old_grad):
        torch.testing.assert_close(p, q.detach() - LR * g)

    # step 1: forward only (nothing stored), then update with the step-0 gradient
    peak = stage.peak_stored_bytes
    loss = stage.forward_only(1, x1, y1, weight=1.0)
    assert stage.stored_microbatches == 0 and stage.stored_bytes() == 0
    assert stage.peak_stored_bytes == peak
    assert not loss.requires_grad
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(nn.functional.cross_entropy(model(x1), y1)))
    stage.update()
    for p, before, g in zip(model.parameters(), after0, old_grad):
        torch.testing.assert_close(p.detach(), before - LR * g, rtol=1e-6, atol=1e-8)
    assert stage.stale_updates == 1
    assert len(stage.pop_losses()) == 2


def test_update_before_any_backward_does_nothing_and_fresh_gradients_replace_old_ones():
    model = tiny()
    stage = StaleStage(model, StageSpec(0, 1), sgd, nn.CrossEntropyLoss())
    before = [p.detach().clone() for p in model.parameters()]
    stage.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    stage.forward(0, x, y)
    stage.backward(0)
    stage.update()
    g1 = [g.clone() for g in stage._grads]
    stage.forward(1, 2 * x, y)
    stage.backward(1)
    stage.update()
    assert any(not torch.equal(a, b) for a, b in zip(g1, stage._grads))


def test_forward_routes_by_step_when_k_and_microbatches_are_given():
    stage = StaleStage(tiny(), StageSpec(0, 2), sgd, k=3, microbatches=2)
    x = torch.randn(5, 4)
    for mb in range(12):  # steps 0..5: steps 0 and 3 store, the others do not
        stage.forward(mb, x)
        step = mb // 2
        assert stage.is_backprop_step(mb) == (step % 3 == 0)
        assert (mb in stage._saved) == (step % 3 == 0)
    with pytest.raises(ConfigError, match="both k and microbatches"):
        StaleStage(tiny(), StageSpec(0, 2), sgd, k=3)
    with pytest.raises(ConfigError, match="positive integer"):
        StaleStage(tiny(), StageSpec(0, 2), sgd, k=0, microbatches=2)


def test_stale_schedule_on_two_stages_matches_the_single_process_rule():
    """The ``stale`` schedule (k=2) drives two stages; the weights follow, step by step,
    w_{t+1} = w_t - lr * g_{k*floor(t/k)} with g the full-batch gradient (mean loss)."""
    p, m, steps, k = 2, 2, 4, 2
    model = tiny(1)
    ref = copy.deepcopy(model)
    sched = build("stale", stages=p, microbatches=m, steps=steps, k=k)
    stages = [
        StaleStage(model[:2], StageSpec(0, p), sgd),
        StaleStage(model[2:], StageSpec(1, p), sgd, nn.CrossEntropyLoss(), k=k, microbatches=m),
    ]
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(steps)]

    msgs, pos = {}, [0, 0]
    rows = sched.workers
    while any(pos[w] < len(rows[w]) for w in range(p)):
        moved = False
        for w in range(p):
            if pos[w] >= len(rows[w]):
                continue
            a = rows[w][pos[w]]
            s, j, st = a.stage, a.microbatch, stages[a.stage]
            x, y = data[j // m]
            xs, ys = x.chunk(m)[j % m], y.chunk(m)[j % m]
            if a.kind == "F":
                if s and ("x", s, j) not in msgs:
                    continue
                inp = msgs.pop(("x", s, j)) if s else xs
                # stage 0 routes by hand (no k given), stage 1 by itself (k and microbatches)
                fwd = st.forward if s or (j // m) % k == 0 else st.forward_only
                out = fwd(j, inp, ys, len(ys) / len(y))
                if s == 0:
                    msgs[("x", 1, j)] = out
            elif a.kind == "B":
                if s == 0 and ("g", 0, j) not in msgs:
                    continue
                gin = st.backward(j, msgs.pop(("g", 0, j), None))
                if s == 1:
                    msgs[("g", 0, j)] = gin
            else:
                st.update()
            pos[w] += 1
            moved = True
        assert moved, "deadlock"
    assert not msgs and all(st.stored_microbatches == 0 for st in stages)
    assert len(stages[1].pop_losses()) == m * steps

    # the single-process rule
    grad = None
    for t, (x, y) in enumerate(data):
        if t % k == 0:
            ref.zero_grad()
            nn.functional.cross_entropy(ref(x), y).backward()
            grad = [q.grad.clone() for q in ref.parameters()]
        with torch.no_grad():
            for q, gq in zip(ref.parameters(), grad):
                q -= LR * gq
    for (name, pm), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(pm, q, rtol=1e-5, atol=1e-6, msg=name)
