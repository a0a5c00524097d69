"""Synthetic-gradient modules and the DNI / cDNI stage, on CPU without Ray (tiny models)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from brigade.schedulers import build
from brigade.stages.dni import DNIStage
from brigade.stages.errors import ConfigError
from brigade.stages.stage import StageSpec
from brigade.stages.synthetic import ConvSynthesizer, MLPSynthesizer, make_synthesizer

SHAPES = {"mlp": (8, 12), "conv": (8, 4, 5, 5)}


def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("hidden_layers", [0, 1, 2])
@pytest.mark.parametrize("num_classes", [None, 3])
def test_synthesizer_starts_at_exactly_zero(kind, hidden_layers, num_classes):
    torch.manual_seed(0)
    sg = make_synthesizer(SHAPES[kind], hidden_layers, num_classes)
    assert isinstance(sg, MLPSynthesizer if kind == "mlp" else ConvSynthesizer)
    h = torch.randn(SHAPES[kind])
    labels = torch.randint(0, 3, (h.shape[0],)) if num_classes else None
    g = sg(h, labels)
    assert g.shape == h.shape
    assert torch.equal(g, torch.zeros_like(h))


def test_flat_synthesizer_for_other_ranks_and_resolution_preserved():
    sg = make_synthesizer((2, 3, 4), 1)  # rank 3: flattened MLP, prediction reshaped back
    assert isinstance(sg, MLPSynthesizer) and sg(torch.randn(2, 3, 4)).shape == (2, 3, 4)
    conv = ConvSynthesizer(4, 2, kernel=5)
    assert conv(torch.randn(2, 4, 7, 9)).shape == (2, 4, 7, 9)
    with pytest.raises(ConfigError, match="0, 1 or 2 hidden layers"):
        make_synthesizer((2, 3), 3)
    with pytest.raises(ConfigError, match="needs the labels"):
        make_synthesizer((2, 3), 0, num_classes=4)(torch.randn(2, 3))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_synthesizer_loss_falls_on_a_fixed_target(kind):
    torch.manual_seed(0)
    sg = make_synthesizer(SHAPES[kind], 1)
    h, target = torch.randn(SHAPES[kind]), torch.randn(SHAPES[kind])
    opt = torch.optim.Adam(sg.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(sg(h), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses[::10]  # conv: ~0.95 -> ~0.50 in 60 steps


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_cdni_synthesizer_uses_the_label(kind):
    """Targets depend on the label only: after training, changing the label changes the output."""
    torch.manual_seed(0)
    shape, classes = SHAPES[kind], 3
    sg = make_synthesizer(shape, 1, num_classes=classes)
    per_class = torch.randn(classes, *shape[1:])
    opt = torch.optim.Adam(sg.parameters(), lr=1e-2)
    for _ in range(80):
        h, y = torch.randn(shape), torch.randint(0, classes, (shape[0],))
        loss = nn.functional.mse_loss(sg(h, y), per_class[y])
        opt.zero_grad()
        loss.backward()
        opt.step()
    h = torch.randn(shape)
    zeros, ones = torch.zeros(shape[0], dtype=torch.long), torch.ones(shape[0], dtype=torch.long)
    with torch.no_grad():
        a, b = sg(h, zeros), sg(h, ones)
    gap = (a - b).norm() / a.norm()
    assert gap > 0.3, float(gap)
    # and it moved toward the right class's target
    assert (a - per_class[0]).norm() < (a - per_class[1]).norm()


# -- the stage ---------------------------------------------------------------------------------
def two_stages(conditioned=False, **options):
    torch.manual_seed(0)
    s0 = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
    s1 = nn.Sequential(nn.Linear(16, 3))
    kw = dict(conditioned=conditioned, num_classes=3 if conditioned else None, **options)
    st0 = DNIStage(s0, StageSpec(0, 2), sgd(0.1), **kw)
    st1 = DNIStage(s1, StageSpec(1, 2), sgd(0.1), nn.CrossEntropyLoss(), **kw)
    return st0, st1


def test_forward_updates_weights_at_once_and_returns_the_synthetic_backprop_gradient():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 7), nn.Tanh())
    stage = DNIStage(module, StageSpec(1, 3), sgd(0.5), sg_hidden_layers=0)
    x = torch.randn(4, 5)
    stage.forward(0, x)  # builds the SG module (zero output: no update yet)
    with torch.no_grad():  # give the SG a non-zero prediction
        for p in stage.sg.parameters():
            p.normal_(0, 0.3)
    before = copy.deepcopy(module)
    out, dx = stage.forward(1, x)
    # the reference: backprop the (same) synthetic gradient through the stage as it was
    xr = x.clone().requires_grad_()
    h = before(xr)
    g = stage.sg(h.detach())  # the SG did not change between the two calls
    h.backward(g)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out, h.detach())
    for p, q in zip(module.parameters(), before.parameters()):
        assert not torch.equal(p, q), "forward must update the weights at once"
        torch.testing.assert_close(p, q - 0.5 * q.grad)  # one SGD step with the SG gradient
    assert stage.stored_microbatches == 2 and stage.stored_bytes() == 2 * 4 * 7 * 4
    stage.train_sg(0, torch.zeros(4, 7))
    assert stage.stored_microbatches == 1 and stage.peak_stored_bytes == 2 * 4 * 7 * 4


def test_first_stage_sends_no_gradient_and_last_stage_sends_the_true_one():
    st0, st1 = two_stages()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    h, dx0 = st0.forward(0, x)
    assert dx0 is None
    ref = copy.deepcopy(st1.module)
    loss, dx1 = st1.forward(0, h, y, weight=0.5)
    hr = h.clone().requires_grad_()
    ref_loss = nn.functional.cross_entropy(ref(hr), y) * 0.5
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(dx1, hr.grad)
    for p, q in zip(st1.module.parameters(), ref.parameters()):  # the last stage stepped at once
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * q.grad)
    assert st1.pop_losses() == [pytest.approx(float(ref_loss.detach()))] and st1.pop_losses() == []
    assert st0.train_sg(0, dx1) > 0 and st0.stored_microbatches == 0
    with pytest.raises(ConfigError, match="last stage"):
        st1.train_sg(0, dx1)


def blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0, 0]])
    y = torch.randint(0, 3, (n,), generator=g)
    return centres[y] + 0.7 * torch.randn(n, 6, generator=g), y


def drive(conditioned, steps, update_prob=1.0):
    """stage0.forward -> stage1.forward -> stage0.train_sg(stage1's gradient), by hand."""
    st0, st1 = two_stages(conditioned, sg_lr=3e-3)
    st0.update_prob = update_prob  # stage 1 always learns from the true loss
    xt, yt = blobs(256, 1)

    def test_loss():
        with torch.no_grad():
            return float(nn.functional.cross_entropy(st1.infer(st0.infer(xt)), yt))

    start, cos = test_loss(), []
    for j in range(steps):
        x, y = blobs(32, 100 + j)
        h, _ = st0.forward(j, x, label=y)
        _, g = st1.forward(j, h, y, label=y)
        with torch.no_grad():
            pred = st0.sg(h, y if conditioned else None)
        cos.append(float(nn.functional.cosine_similarity(pred.flatten(), g.flatten(), dim=0)))
        st0.train_sg(j, g)
    assert st0.stored_microbatches == 0 and len(st0.pop_sg_losses()) == steps
    return start, test_loss(), cos, st0


@pytest.mark.parametrize("conditioned", [False, True])
def test_two_stage_chain_driven_by_hand_learns(conditioned):
    start, end, cos, st0 = drive(conditioned, 100)
    assert end < 0.3 * start, (start, end)
    assert st0.updates == 100
    # the synthetic gradient learned to point like the true one; the label helps a lot
    # (measured: ~0.1 without it, ~0.75 with it)
    late = sum(cos[-20:]) / 20
    assert late > (0.5 if conditioned else 0.02), cos[-20:]
    # and stage 0's synthetic-gradient updates matter: freezing it (update_prob=0) is worse
    _, frozen, _, st0 = drive(conditioned, 100, update_prob=0.0)
    assert st0.updates == 0 and end < 0.7 * frozen, (end, frozen)


def test_update_prob_skips_updates_deterministically():
    runs = []
    for _ in range(2):
        st0, _ = two_stages(update_prob=0.5, seed=3)
        for j in range(40):
            st0.forward(j, torch.randn(2, 6))
        runs.append(st0.updates)
    assert runs[0] == runs[1] and 5 < runs[0] < 35


def test_cdni_needs_labels_and_num_classes():
    with pytest.raises(ConfigError, match="num_classes"):
        DNIStage(nn.Linear(2, 2), StageSpec(0, 2), conditioned=True)
    st0, _ = two_stages(conditioned=True)
    with pytest.raises(ConfigError, match="labels"):
        st0.forward(0, torch.randn(2, 6))


def test_conv_stage_and_state_dict_extra_round_trip():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    stage = DNIStage(module, StageSpec(0, 2), sgd(0.1), conditioned=True, num_classes=10)
    x, y = torch.randn(3, 1, 6, 6), torch.randint(0, 10, (3,))
    h, _ = stage.forward(0, x, label=y)
    assert isinstance(stage.sg, ConvSynthesizer)
    stage.train_sg(0, torch.randn_like(h))
    extra = stage.state_dict_extra()
    other = DNIStage(copy.deepcopy(module), StageSpec(0, 2), sgd(0.1), conditioned=True, num_classes=10)
    other.load_state_dict_extra(extra)
    torch.testing.assert_close(other.synthetic_gradient(h, y), stage.synthetic_gradient(h, y))
    assert other.sg_optimizer.state_dict()["state"].keys() == stage.sg_optimizer.state_dict()["state"].keys()
    assert DNIStage(nn.Linear(2, 2), StageSpec(0, 2)).state_dict_extra()["sg"] is None


@pytest.mark.parametrize("lag", [0, 2])
def test_dni_schedule_drives_three_stages(lag):
    """The ``dni`` schedule's S and T actions, run in order: S(s, j) takes stage s-1's output,
    T(s, j) takes the gradient stage s+1's S(j) sent back; everything kept is freed."""
    torch.manual_seed(0)
    p, m, steps = 3, 2, 3
    mods = [nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
            nn.Sequential(nn.Linear(8, 3))]
    stages = [DNIStage(mod, StageSpec(i, p), sgd(0.1), nn.CrossEntropyLoss() if i == p - 1 else None,
                       conditioned=True, num_classes=3) for i, mod in enumerate(mods)]
    sched = build("dni", stages=p, microbatches=m, steps=steps, lag=lag)
    data = [blobs(4, j) for j in range(m * steps)]
    msgs, pos, rows = {}, [0] * p, sched.workers
    while any(pos[w] < len(rows[w]) for w in range(p)):
        moved = False
        for w in range(p):
            if pos[w] >= len(rows[w]):
                continue
            a = rows[w][pos[w]]
            s, j, st = a.stage, a.microbatch, stages[a.stage]
            x, y = data[j]
            if a.kind == "S":
                if s and ("x", s, j) not in msgs:
                    continue
                out, grad_in = st.forward(j, msgs.pop(("x", s, j)) if s else x, y, 1.0, label=y)
                if s < p - 1:
                    msgs[("x", s + 1, j)] = out
                if s:
                    msgs[("g", s - 1, j)] = grad_in
                else:
                    assert grad_in is None
            elif a.kind == "T":
                if ("g", s, j) not in msgs:
                    continue
                st.train_sg(j, msgs.pop(("g", s, j)))
            else:  # pragma: no cover
                raise AssertionError(a)
            pos[w] += 1
            moved = True
        assert moved, "deadlock"
    assert not msgs
    assert all(st.stored_microbatches == 0 for st in stages)
    assert [len(st.pop_sg_losses()) for st in stages] == [m * steps, m * steps, 0]
    assert len(stages[-1].pop_losses()) == m * steps
    assert stages[0].peak_stored_bytes == (lag + 1) * 4 * 8 * 4 + (lag + 1) * 4 * 8  # h + labels
