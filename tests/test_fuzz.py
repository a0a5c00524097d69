"""Fuzzed configurations (hypothesis): whatever a user asks for either fails with one clear
configuration error or trains to the one-process run's weights.

Four properties:

- every schedule x stage count x microbatches x virtual x steps either raises ScheduleError
  or builds a schedule that validates and simulates under random per-stage costs (pure);
- the default CPU share and the placement pre-check agree with the nodes: a share the
  cluster is offered never asks for more than it has, and a group the pre-check passes
  fits on the nodes (pure; ``brigade.engine.placement``);
- generated models (depth, widths, BatchNorm or not) x stage counts 1-8 (including
  counts that do not divide the cores or the blocks) x balance lists x microbatches x
  virtual stages x batch sizes that do not split evenly x every schedule/rule pair, on the
  local backend: a config error with one line, or a run whose weights equal (a) the
  analytic one-process reference where there is one (backprop schedules: gradient
  accumulation over the same split; stale; petra's first step; fwdgrad: the single-process
  estimator) and (b) the same run under a random interleaving of the workers' actions (what
  asynchronous processes may do);
- a few of those on the shared Ray cluster, equal to the local run.

Profiles: ``fast`` (default, CI: derandomized, small example counts, well under a minute
on 2 cores) and ``long`` (``BRIGADE_FUZZ=long``: random seeds, hundreds of examples).
``BRIGADE_FUZZ_COUNTS=PATH`` writes how many configurations were generated, refused, run.
Shrunk counterexamples that found bugs are kept as plain tests at the end of the file.
"""

from __future__ import annotations

import copy
import json
import os
import random
from collections import Counter, deque

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from brigade import schedulers
from brigade.engine import Pipeline, PipelineConfigError
from brigade.engine.placement import (bundles, fair_share, shortfall,
                                      trusted_shortfall, trusted_workers)
from brigade.schedulers import Costs, ScheduleError, simulate, validate
from brigade.stages.errors import ConfigError
from brigade.stages.fwdgrad import ForwardGradient
from brigade.stages.trainer import reference_step

LONG = os.environ.get("BRIGADE_FUZZ", "").lower() == "long"
settings.register_profile("fast", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("long" if LONG else "fast")


def examples(fast: int, long: int):
    return settings(max_examples=long if LONG else fast)


COUNTS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    line = ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items()))
    print(f"\nfuzz counts: {line}")
    if os.environ.get("BRIGADE_FUZZ_COUNTS"):
        with open(os.environ["BRIGADE_FUZZ_COUNTS"], "w") as f:
            json.dump(dict(COUNTS), f, indent=2, sort_keys=True)


CONFIG_ERRORS = (PipelineConfigError, ScheduleError, ConfigError)
RULES = ("backprop", "dni", "cdni", "petra", "stale", "fwdgrad")
SCHEDULES = tuple(schedulers.names())


def assert_clear(err: BaseException) -> None:
    """One line that says something (a value, a name), not a traceback."""
    msg = str(err)
    assert msg and len(msg.splitlines()) == 1 and len(msg) < 600, msg


# -- schedules: pure, many examples ----------------------------------------------------------
@examples(300, 3000)
@given(name=st.sampled_from(SCHEDULES), stages=st.integers(1, 8),
       microbatches=st.integers(1, 16), virtual=st.integers(1, 4), steps=st.integers(1, 4),
       k=st.integers(1, 5), data=st.data())
def test_every_generated_schedule_validates_and_simulates(name, stages, microbatches, virtual,
                                                          steps, k, data):
    COUNTS["schedules generated"] += 1
    options = {"k": k} if name == "stale" else {}
    try:
        sched = schedulers.build(name, stages=stages, microbatches=microbatches,
                                 virtual=virtual, steps=steps, **options)
    except ScheduleError as err:
        assert_clear(err)
        COUNTS["schedules refused"] += 1
        return
    validate(sched)
    n = sched.num_stages
    costs = Costs(f=data.draw(st.lists(st.floats(0.1, 3.0), min_size=n, max_size=n)),
                  b=data.draw(st.lists(st.floats(0.1, 6.0), min_size=n, max_size=n)))
    tl = simulate(sched, costs)
    span = tl.makespan
    assert span > 0
    assert 0.0 <= tl.bubble_fraction < 1.0
    for w in range(sched.num_workers):
        assert tl.busy(w) <= span * (1 + 1e-9)
    COUNTS["schedules simulated"] += 1


# -- resources: pure -------------------------------------------------------------------------
cpu_counts = st.lists(st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0]), min_size=1,
                      max_size=4)


@examples(300, 3000)
@given(workers=st.integers(1, 8), node_cpus=cpu_counts,
       strategy=st.sampled_from(["pack", "spread", "strict_pack", "strict_spread"]),
       method=st.sampled_from(RULES), trusted_on=st.lists(st.booleans(), min_size=4,
                                                          max_size=4))
def test_the_default_share_never_asks_more_than_the_nodes_hold(workers, node_cpus, strategy,
                                                                method, trusted_on):
    COUNTS["resource requests generated"] += 1
    nodes = [{"CPU": c, **({"trusted": 1.0} if t else {})}
             for c, t in zip(node_cpus, trusted_on)]
    flags = _trusted(method, workers)
    held = [n["CPU"] for n in nodes if "trusted" in n]
    # half the examples ask for trusted placement, half not
    ask_trust = bool(trusted_on[-1])
    share = fair_share(workers, node_cpus, strategy, held if ask_trust else None,
                       sum(flags) if ask_trust else 0)
    bundle = {"CPU": share}
    why = shortfall(workers, bundle, strategy, nodes)
    if strategy == "strict_spread" and len(nodes) < workers:
        assert why is not None and "strict_spread" in why
        return
    # every strategy the nodes can satisfy at all gets a share they hold
    assert why is None, (workers, node_cpus, strategy, share, why)
    if not ask_trust:
        COUNTS["resource requests checked"] += 1
        return
    assert share * workers <= sum(node_cpus) + 1e-9
    assert share >= 0.01 and (share < 1 or share == int(share))
    # trusted bundles: refused exactly when no share could put them on the nodes with it
    group = bundles(workers, share, 0.0, flags, "trusted")
    assert sum("trusted" in b for b in group) == sum(flags)
    t_why = trusted_shortfall(group, "trusted", strategy, nodes, method)
    holders = [n for n in nodes if "trusted" in n]
    need = sum(flags)
    if not holders:
        assert t_why is not None and "no node of the cluster has" in t_why
    elif strategy == "strict_spread":
        assert (t_why is None) == (len(holders) >= need), (t_why, share)
    else:
        assert t_why is None, (t_why, share)
    COUNTS["resource requests checked"] += 1


def _trusted(method: str, workers: int, **options) -> list[bool]:
    """trusted_workers of a one-stage-per-worker split, labels as the rule's exposure says."""
    from brigade.stages.rules import get_method

    rule = get_method(method)
    opts = rule.make_options(**options)
    labels = {s for s in range(workers) if rule.labels_to(s, workers, opts)}
    return trusted_workers(list(range(workers)), labels, workers)


def test_trusted_workers_follow_the_exposure():
    """Inputs to worker 0, labels to the last; rules that show every stage the labels
    (cdni's synthesizers, dgl's heads, the local guess's heads) make every worker trusted;
    interleaved: the worker of the last stage, whichever it is."""
    assert _trusted("backprop", 1) == [True]
    assert _trusted("dni", 4) == [True, False, False, True]
    assert _trusted("cdni", 3) == [True, True, True]
    assert _trusted("dgl", 3) == [True, True, True]
    assert _trusted("fwdgrad", 3) == [True, False, True]
    assert _trusted("fwdgrad", 3, guess="local") == [True, True, True]
    assert trusted_workers([0, 1, 0, 1], set(), 2) == [True, True]  # interleaved, v = 2
    assert trusted_workers([0, 1, 2, 0, 1, 2], set(), 3) == [True, False, True]


# -- the engine on generated configurations --------------------------------------------------
@st.composite
def configs(draw, rules=RULES):
    """A model, a split, a schedule/rule pair, microbatches, a batch size, steps. Mostly
    configurations that should run (a fifth or so are off on purpose: more stages than
    blocks, a balance that does not sum, a batch smaller than its microbatches, a schedule
    the rule cannot run), so that both outcomes are exercised."""
    def mostly() -> bool:  # 11 in 12; the odd one out is not a bound (hypothesis likes those)
        return draw(st.integers(0, 11)) != 5

    rule = draw(st.sampled_from(rules))
    valid = schedulers_for(rule)
    schedule = draw(st.sampled_from(valid) if mostly() else st.sampled_from(SCHEDULES))
    workers = draw(st.integers(1, 8))
    virtual = draw(st.integers(2, 3)) if schedule == "interleaved" else (
        1 if mostly() else draw(st.integers(2, 3)))
    n = workers * virtual
    blocks = draw(st.integers(max(2, n), n + 3) if mostly() else st.integers(2, 7))
    widths = draw(st.lists(st.integers(2, 10), min_size=blocks - 1, max_size=blocks - 1))
    bn = draw(st.booleans())
    if draw(st.booleans()):
        stages: int | list[int] = workers
    elif blocks >= n and mostly():  # a balance that sums to the blocks
        cuts = sorted(draw(st.sets(st.integers(1, blocks - 1), min_size=n - 1,
                                   max_size=n - 1))) if n > 1 else []
        edges = [0, *cuts, blocks]
        stages = [b - a for a, b in zip(edges, edges[1:])]
    else:
        stages = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    microbatches = draw(st.integers(1, 8))
    batch = draw(st.integers(2 * microbatches, 2 * microbatches + 7) if mostly()
                 else st.integers(1, 13))
    steps = draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return dict(widths=widths, bn=bn, rule=rule, schedule=schedule, workers=workers,
                virtual=virtual, stages=stages, blocks=blocks, microbatches=microbatches,
                batch=batch, steps=steps, k=k, seed=seed)


def schedulers_for(rule: str) -> tuple[str, ...]:
    from brigade.stages.rules import get_method

    return get_method(rule).schedules


def build_net(widths: list[int], bn: bool, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    blocks, w_in = [], 4
    for i, w in enumerate(widths):
        layers = [nn.Linear(w_in, w)] + ([nn.BatchNorm1d(w)] if bn else [])
        layers.append(nn.Tanh() if i % 2 else nn.ReLU())
        blocks.append(nn.Sequential(*layers))
        w_in = w
    blocks.append(nn.Linear(w_in, 3))
    return nn.Sequential(*blocks)


def make_batches(c: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(c["seed"])
    return [(torch.randn(c["batch"], 4, generator=g), torch.randint(0, 3, (c["batch"],),
                                                                   generator=g))
            for _ in range(c["steps"])]


def optimizer_for(rule: str):
    if rule == "fwdgrad":
        return lambda p: torch.optim.SGD(p, lr=0.05)
    if rule == "backprop":
        return lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
    return lambda p: torch.optim.SGD(p, lr=0.05)


def pipeline_kwargs(c: dict) -> dict:
    kw = dict(stages=c["stages"], schedule=c["schedule"], method=c["rule"],
              microbatches=c["microbatches"], virtual=c["virtual"],
              optimizer=optimizer_for(c["rule"]), loss_fn=nn.CrossEntropyLoss())
    if c["rule"] == "stale" and c["schedule"] == "stale":
        kw["schedule_options"] = {"k": c["k"]}
    if c["rule"] == "fwdgrad":
        kw.update(projections=2, seed=c["seed"] % 97)
    return kw


def random_order(backend, rng: random.Random):
    """LocalBackend.run_step with the next action taken from a random ready worker each
    time: one of the interleavings that asynchronous processes may produce."""
    def run_step(training, programs, messages, mode="run", keep=None, then=None):
        for w, (worker, msgs, program) in enumerate(zip(backend.workers, messages, programs)):
            worker.begin(training, msgs, program, mode, keep[w] if keep else None)
        queues = [deque(p) for p in programs]
        while any(queues):
            ready = [w for w, q in enumerate(queues) if q and backend.workers[w].ready(q[0])]
            if not ready:
                raise AssertionError("deadlock under a random order")
            w = rng.choice(ready)
            backend.workers[w].execute(queues[w].popleft())
        return [worker.end() for worker in backend.workers]
    return run_step


def train(c: dict, backend: str = "local", order_seed: int | None = None):
    """(state_dict, losses) of the configuration, or the config error it raised."""
    model = build_net(c["widths"], c["bn"], c["seed"])
    try:
        with Pipeline(copy.deepcopy(model), backend=backend, **pipeline_kwargs(c)) as pipe:
            if order_seed is not None:
                pipe._backend.run_step = random_order(pipe._backend, random.Random(order_seed))
            losses = [o["loss"] for o in pipe.run(make_batches(c))]
            return model, pipe.state_dict(), losses
    except CONFIG_ERRORS as err:
        return model, err, None


def reference(c: dict, model: nn.Module) -> dict | None:
    """The analytic one-process run where there is one (None: no closed form here)."""
    rule, m = c["rule"], c["microbatches"]
    model = copy.deepcopy(model)
    opt = optimizer_for(rule)(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    batches = make_batches(c)
    if rule == "backprop":
        for x, y in batches:
            reference_step(model, opt, loss_fn, x, y, m)
        return model.state_dict()
    if rule == "stale":  # a true gradient every k-th step, reused by the steps between
        k = c["k"] if c["schedule"] == "stale" else 4
        grads: list[torch.Tensor] = []
        for t, (x, y) in enumerate(batches):
            if t % k == 0:
                reference_step(model, opt, loss_fn, x, y, m)
                grads = [p.grad.clone() for p in model.parameters()]
                continue
            with torch.no_grad():  # the forwards still run (BatchNorm statistics move)
                for xj in torch.tensor_split(x, m):
                    model(xj)
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
        return model.state_dict()
    if rule == "petra" and len(batches) == 1:  # before any update: exact gradients
        reference_step(model, opt, loss_fn, *batches[0], m)
        return model.state_dict()
    if rule == "fwdgrad" and (m == 1 or not c["bn"]):
        fg = ForwardGradient(model, loss_fn, projections=2, seed=c["seed"] % 97)
        for x, y in batches:
            fg.step(x, y, opt)
        return model.state_dict()
    return None


def assert_close_states(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert list(got) == list(want)
    for key in want:
        if want[key].is_floating_point():
            torch.testing.assert_close(got[key], want[key], rtol=tol, atol=tol, msg=key)
        else:
            assert torch.equal(got[key], want[key]), key


def check(c: dict) -> None:
    COUNTS["engine configs generated"] += 1
    COUNTS[f"generated {c['rule']}"] += 1
    model, got, losses = train(c)
    if isinstance(got, BaseException):
        assert_clear(got)
        COUNTS["engine configs refused (one-line config error)"] += 1
        if os.environ.get("BRIGADE_FUZZ_WHY"):
            COUNTS["why: " + str(got)[:50]] += 1
        return
    assert all(map(lambda v: v == v, losses)), losses  # no NaN
    want = reference(c, model)
    if want is not None:
        assert_close_states(got, want)
        COUNTS["engine runs equal to the analytic reference"] += 1
    _, shuffled, _ = train(c, order_seed=c["seed"])
    assert_close_states(shuffled, got, tol=1e-6)
    COUNTS["engine runs equal under a random interleaving"] += 1
    COUNTS[f"ran {c['rule']}"] += 1


@pytest.mark.parametrize("rule", RULES)
def test_generated_configurations_fail_clearly_or_train_to_the_reference(rule):
    """Per rule, so that every rule gets its share of examples."""
    @examples(12, 120)
    @given(c=configs(rules=(rule,)))
    def run(c):
        check(c)

    run()


@pytest.mark.ray
@examples(3, 30)
@given(c=configs(rules=("backprop", "dni", "cdni", "petra", "stale", "fwdgrad")))
def test_generated_configurations_on_ray_equal_the_local_run(ray_cluster, c):
    assume(isinstance(c["stages"], int) and c["stages"] <= 4
           or isinstance(c["stages"], list) and len(c["stages"]) // c["virtual"] <= 4)
    assume(c["schedule"] in schedulers_for(c["rule"]))
    COUNTS["ray configs generated"] += 1
    _, want, want_losses = train(c)
    assume(not isinstance(want, BaseException))
    _, got, losses = train(c, backend="ray")
    assert not isinstance(got, BaseException), got
    assert losses == pytest.approx(want_losses, rel=1e-5, abs=1e-7)
    assert_close_states(got, want)
    COUNTS["ray runs equal to the local run"] += 1


# -- shrunk counterexamples, kept as plain tests ---------------------------------------------
def test_batchnorm1d_and_one_sample_microbatches_is_a_config_error_not_a_torch_trace():
    """Found by the fuzzer (shrunk): BatchNorm model, batch 1, one microbatch. torch's
    "Expected more than 1 value per channel when training" came out of the stage."""
    c = dict(widths=[2], bn=True, rule="backprop", schedule="gpipe", workers=1, virtual=1,
             stages=1, blocks=2, microbatches=1, batch=1, steps=1, k=1, seed=0)
    _, err, _ = train(c)
    assert isinstance(err, PipelineConfigError), err
    assert str(err) == ("a batch of 1 samples in 1 microbatches gives microbatches of 1 "
                        "sample, and the model's BatchNorm1d cannot train on one sample; use "
                        "a batch size >= 2 or fewer microbatches")
    c.update(batch=9, microbatches=4)  # 3, 2, 2, 2: trains, and equals the reference
    model, got, _ = train(c)
    assert_close_states(got, reference(c, model))


def test_a_trusted_stage_gets_a_share_its_trusted_node_can_hold():
    """Found by the fuzzer (shrunk): one worker, strict_spread, the only node with the
    resource has 0.5 CPU; the share used to come from the 1-CPU node alone."""
    share = fair_share(1, [1.0, 0.5], "strict_spread", trusted_cpus=[0.5], trusted=1)
    assert share == 0.5
    nodes = [{"CPU": 1.0}, {"CPU": 0.5, "trusted": 1.0}]
    group = bundles(1, share, 0.0, [True], "trusted")
    assert trusted_shortfall(group, "trusted", "strict_spread", nodes, "backprop") is None


@pytest.mark.parametrize("workers,cpus,share", [(3, 2, 0.66), (5, 2, 0.4), (7, 2, 0.28),
                                                (3, 4, 1.0), (2, 2, 1.0), (8, 2, 0.25)])
def test_the_default_share_on_one_node(workers, cpus, share):
    """3 stages on 2 CPUs asked 0.67 each (2.01 in all) and were refused."""
    assert fair_share(workers, [cpus]) == pytest.approx(share)
    assert shortfall(workers, {"CPU": share}, "pack", [{"CPU": cpus}]) is None
