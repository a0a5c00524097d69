"""Forward-gradient estimator, guesses and optimizers: CPU, no Ray, small models."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from brigade.stages import fwdgrad as fg
from brigade.stages.errors import ConfigError
from brigade.stages.fg_optim import DEFAULTS, OPTIMIZERS, FGOptimizer, clip_by_norm, make_optimizer


# forward-mode AD loads torch's jvp decompositions through torch.jit.script, which warns
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def small_model(seed: int = 0, width: int = 12) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(1), nn.Linear(10, width), nn.Tanh()),
        nn.Sequential(nn.Linear(width, width), nn.ReLU()),
        nn.Linear(width, 3),
    )


def batch(seed: int = 1, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


LOSS = nn.CrossEntropyLoss()


# -- the estimate matches autograd --------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(dist="gaussian"),
        dict(scope="block"),
        dict(mode="activation"),
        dict(mode="activation", scope="block"),
    ],
    ids=["weight-global-rademacher", "weight-global-gaussian", "weight-block", "activation-global", "activation-block"],
)
def test_many_projections_match_autograd(kw):
    m = small_model()
    x, y = batch()
    true = fg.true_gradient(m, x, y, LOSS)
    P = sum(p.numel() for p in m.parameters())
    n = 3000
    est = fg.forward_gradient(m, x, y, LOSS, projections=n, seed=3, **kw)
    cos = fg.cosine_similarity(est.grads, true)
    assert cos > 0.9, (kw, cos, P)
    assert est.loss == pytest.approx(LOSS(m(x), y).item(), rel=1e-5)


@pytest.mark.parametrize("kw", [dict(projections=5), dict(projections=5, dist="gaussian"),
                                dict(scope="block", projections=[3, 0, 2])],
                         ids=["global", "global-gaussian", "block-with-a-skipped-block"])
def test_estimate_is_what_combine_makes_of_the_derivatives(kw):
    """The estimate reuses the directions it drew; a data-parallel driver regenerates them
    from the seed (combine). Both must give the same gradient, bit for bit."""
    m = small_model()
    x, y = batch()
    est = fg.forward_gradient(m, x, y, LOSS, seed=7, keys=(2,), **kw)
    n = [du.numel() for du in est.d]
    again = fg.combine(m, [du / max(k, 1) for du, k in zip(est.d, n)], seed=7, keys=(2,),
                       dist=kw.get("dist", "rademacher"), scope=kw.get("scope", "global"))
    for g, h in zip(est.grads, again):
        assert torch.equal(g, h)
    assert any(g.abs().sum() > 0 for g in est.grads)
    if "scope" in kw:  # the block with no projections is not updated
        assert all(g.abs().sum() == 0 for g in est.grads[2:4])


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_single_projection_is_unbiased(dist):
    """Mean of M one-projection estimates (M seeds) is within a few standard errors."""
    m = small_model(width=6)
    x, y = batch()
    true = torch.cat([t.reshape(-1) for t in fg.true_gradient(m, x, y, LOSS)])
    M = 1500
    samples = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in fg.forward_gradient(m, x, y, LOSS, projections=1, dist=dist, seed=s).grads])
            for s in range(M)
        ]
    )
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(M)
    z = (mean - true) / se
    assert z.abs().max() < 5.0, z.abs().max()
    assert 0.6 < float(z.pow(2).mean()) < 1.5  # ≈ 1 for an unbiased estimate
    # projected on the true gradient: E[g·∇]/|∇|² = 1
    proj = samples @ true / true.dot(true)
    assert abs(float(proj.mean()) - 1.0) < 4 * float(proj.std()) / math.sqrt(M)


def test_local_guess_beats_random():
    m = small_model(width=32)
    x, y = batch(n=64)
    true = fg.true_gradient(m, x, y, LOSS)
    heads = fg.LocalHeads(m, x)
    local = fg.forward_gradient(m, x, y, LOSS, guess="local", heads=heads)
    rnd = [fg.cosine_similarity(fg.forward_gradient(m, x, y, LOSS, projections=1, seed=s).grads, true) for s in range(20)]
    c_local = fg.cosine_similarity(local.grads, true)
    assert c_local > 0.3
    assert c_local > max(abs(c) for c in rnd)
    assert local.head_grads is not None and len(local.head_grads) == len(list(heads.parameters()))
    # the projection never points uphill: g·∇ >= 0 block by block
    for b in fg.param_blocks(m):
        dot = sum(float((local.grads[i] * true[i]).sum()) for i in b.index)
        assert dot >= -1e-8
    # activation perturbation takes the local guess too
    act = fg.forward_gradient(m, x, y, LOSS, guess="local", heads=heads, mode="activation")
    assert fg.cosine_similarity(act.grads, true) > max(abs(c) for c in rnd)


# -- directions regenerate from the seed ----------------------------------------------------
def _direction_hash(seed: int) -> str:
    import hashlib

    m = small_model(seed=99)
    h = hashlib.sha256()
    for v in fg.directions(list(m.parameters()), seed, (5, 2), n=3):
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def test_same_seed_same_directions_in_another_process():
    here = _direction_hash(7)
    assert here == _direction_hash(7)
    assert here != _direction_hash(8)
    code = (
        "import sys; sys.path.insert(0, %r); import torch; torch.set_num_threads(1);"
        "from test_fwdgrad import _direction_hash; print(_direction_hash(7))" % str(__import__("pathlib").Path(__file__).parent)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here


def test_directions_of_a_slice_match_the_whole_model():
    m = small_model()
    params = list(m.parameters())
    whole = fg.directions(params, 4, (1,), n=2)
    part = fg.directions(params[2:4], 4, (1,), n=2, indices=[2, 3])
    assert all(torch.equal(a, b) for a, b in zip(whole[2:4], part))
    r = fg.directions(params, 4, (1,))[0]
    assert set(r.unique().tolist()) <= {-1.0, 1.0}
    assert fg.mix_seed(1, 2) != fg.mix_seed(2, 1)


# -- per-stage pieces: the tangent flows stage to stage ---------------------------------------
def test_stage_jvp_chain_equals_whole_model():
    m = small_model()
    x, y = batch()
    n, seed, keys = 4, 11, (3,)
    stage1, stage2 = m[:2], m[2:]
    idx1 = list(range(len(list(stage1.parameters()))))
    idx2 = [len(idx1) + i for i in range(len(list(stage2.parameters())))]
    h, th = fg.jvp_forward(stage1, x, None, seed, keys=keys, n=n, indices=idx1)
    out, tout = fg.jvp_forward(stage2, h, th, seed, keys=keys, n=n, indices=idx2)
    assert torch.allclose(out, m(x), atol=1e-6)
    # the last stage turns the tangent into d through the loss
    d = torch.stack([torch.func.jvp(lambda o: LOSS(o, y), (out,), (tout[k],))[1] for k in range(n)])
    loss, d_whole = fg.directional_derivatives(m, x, y, LOSS, seed=seed, keys=keys, projections=n)
    assert len(d_whole) == 1
    assert torch.allclose(d, d_whole[0], rtol=1e-4, atol=1e-6)
    fg.set_forward_gradient(stage1, d, seed, keys=keys, indices=idx1)
    fg.set_forward_gradient(stage2, d, seed, keys=keys, indices=idx2)
    est = fg.forward_gradient(m, x, y, LOSS, projections=n, seed=seed, keys=keys)
    for p, g in zip(m.parameters(), est.grads):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)
    single_out, single_tan = fg.jvp_forward(m, x, None, seed, keys=keys)
    assert single_tan.shape == single_out.shape


def test_batchnorm_statistics_move_once():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU()), nn.Linear(8, 3))
    ref = nn.Sequential(nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU()), nn.Linear(8, 3))
    ref.load_state_dict(m.state_dict())
    x, y = batch()
    with torch.no_grad():
        ref(x)  # one plain training forward
    for kw in (dict(projections=5), dict(projections=5, scope="block")):
        mm = nn.Sequential(nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU()), nn.Linear(8, 3))
        mm.load_state_dict(m.state_dict())
        fg.forward_gradient(mm, x, y, LOSS, **kw)
        assert torch.allclose(mm[0][1].running_mean, ref[0][1].running_mean)
        assert int(mm[0][1].num_batches_tracked) == 1
    frozen = nn.Sequential(nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU()), nn.Linear(8, 3))
    frozen.load_state_dict(m.state_dict())
    for kw in (dict(), dict(scope="block")):
        fg.forward_gradient(frozen, x, y, LOSS, projections=3, update_stats=False, **kw)
        assert torch.equal(frozen[0][1].running_mean, m[0][1].running_mean)
        assert int(frozen[0][1].num_batches_tracked) == 0
    # the estimate still matches the batch-statistics gradient
    est = fg.forward_gradient(frozen, x, y, LOSS, projections=3000, update_stats=False, seed=2)
    assert fg.cosine_similarity(est.grads, fg.true_gradient(frozen, x, y, LOSS)) > 0.9


def test_bad_options_name_the_choices():
    m = small_model()
    x, y = batch()
    with pytest.raises(ConfigError, match="rademacher"):
        fg.forward_gradient(m, x, y, LOSS, dist="uniform")
    with pytest.raises(ConfigError, match="local"):
        fg.forward_gradient(m, x, y, LOSS, guess="oracle")
    with pytest.raises(ConfigError, match="LocalHeads"):
        fg.forward_gradient(m, x, y, LOSS, guess="local")
    with pytest.raises(ConfigError, match="at least 1"):
        fg.forward_gradient(m, x, y, LOSS, projections=0)
    with pytest.raises(ConfigError, match="sgd"):
        make_optimizer("lbfgs", m.parameters())


# -- optimizers -------------------------------------------------------------------------------
def test_optimizers_match_torch_and_take_explicit_grads():
    torch.manual_seed(0)
    for kind, ref_cls, kw in [
        ("sgd", torch.optim.SGD, {}),
        ("momentum", torch.optim.SGD, {"momentum": 0.9}),
        ("nesterov", torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
        ("adam", torch.optim.Adam, {}),
        ("rmsprop", torch.optim.RMSprop, {}),
    ]:
        a = nn.Linear(4, 3)
        b = nn.Linear(4, 3)
        b.load_state_dict(a.state_dict())
        ours = FGOptimizer(a.parameters(), kind, 0.01, **({"momentum": 0.9} if "momentum" in kw else {}))
        ref = ref_cls(b.parameters(), lr=0.01, **kw)
        for step in range(5):
            gs = [torch.randn_like(p) for p in a.parameters()]
            ours.step(grads=gs)
            for p, g in zip(b.parameters(), gs):
                p.grad = g.clone()
            ref.step()
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, atol=1e-6), kind


def test_clipping_and_decay():
    p = nn.Parameter(torch.zeros(4))
    opt = FGOptimizer([p], "sgd", 1.0, clip_norm=0.5, decay="inverse", decay_steps=10)
    opt.step(grads=[torch.full((4,), 10.0)])
    assert float(p.detach().norm()) == pytest.approx(0.5, rel=1e-6)
    assert opt.last_norm == pytest.approx(20.0)
    assert opt.lr_factor(10) == pytest.approx(0.5)
    cos = FGOptimizer([p], "sgd", 1.0, decay="cosine", total_steps=100, warmup=10)
    assert cos.lr_factor(0) == pytest.approx(0.1 * 1.0)
    assert cos.lr_factor(100) == pytest.approx(0.0, abs=1e-12)
    gs = [torch.tensor([3.0, 4.0])]
    assert clip_by_norm(gs, 1.0) == pytest.approx(5.0)
    with pytest.raises(ConfigError):
        FGOptimizer([p], "sgd", 1.0, decay="cosine")
    sd = opt.state_dict()
    opt2 = FGOptimizer([p], "sgd", 1.0, clip_norm=0.5, decay="inverse", decay_steps=10)
    opt2.load_state_dict(sd)
    assert opt2.t == 1


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_every_optimizer_descends_with_noisy_estimates(kind):
    """A linear least-squares problem trained by forward gradients with each rule."""
    torch.manual_seed(0)
    w_true = torch.randn(8, 1)
    x = torch.randn(256, 8)
    y = x @ w_true
    model = nn.Sequential(nn.Linear(8, 1))
    loss_fn = nn.MSELoss()
    lr = {"sgd": 0.02, "momentum": 0.003, "nesterov": 0.003, "adam": 0.02, "rmsprop": 0.01}[kind]
    opt = make_optimizer(kind, model.parameters(), lr, clip_norm=10.0)
    trainer = fg.ForwardGradient(model, loss_fn, projections=4, seed=1)
    first = loss_fn(model(x), y).item()
    for t in range(300):
        trainer.step(x, y, opt)
    last = loss_fn(model(x), y).item()
    assert last < 0.2 * first, (kind, first, last)
    assert set(DEFAULTS["random"]) == set(OPTIMIZERS) == set(DEFAULTS["local"])


# -- training steps -----------------------------------------------------------------------------
@pytest.mark.parametrize("guess", ["random", "local"])
def test_fg_train_step_lowers_the_loss(guess):
    m = small_model(width=16)
    x, _ = batch(n=64)
    y = x[:, :3].argmax(1)  # a learnable rule
    opt = make_optimizer("adam", m.parameters(), 0.01, guess=guess)
    first = LOSS(m(x), y).item()
    for t in range(80):
        out = fg.fg_train_step(m, x, y, LOSS, opt, guess=guess, projections=8, seed=0)
    assert set(out) >= {"loss"}
    assert LOSS(m(x), y).item() < 0.8 * first
    # 'auto' picks per-block projections for the random guess
    if guess == "random":
        fg.fg_train_step(m, x, y, LOSS, opt, guess=guess, projections="auto", seed=0)
        trainer = fg._TRAINERS[m][1]
        assert trainer.scope == "block" and trainer.projections == (1, 1, 256)
    # the heads live beside the model, not in it: the state_dict keys are unchanged
    assert set(m.state_dict()) == set(small_model().state_dict())
