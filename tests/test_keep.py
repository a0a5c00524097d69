"""Weights kept mid-run (``Pipeline.run(batches, keep=...)``): what the race evaluates at
its intervals instead of cutting the run there.

A kept step's weights must be the weights that step left: for a flush schedule exactly a
shorter run's final weights; for every rule, the last step's kept weights are the run's
final ones (each stage's last work is that step's), and keeping changes nothing that is
computed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brigade.engine import Pipeline, PipelineConfigError
from brigade.engine.pipeline import keep_points
from brigade.schedulers import Action

from _nets import mlp
from test_engine_methods import METHODS, data, sgd


def _pipe(make=mlp, balance=(2, 2), schedule=None, method="backprop", backend="local", **kw):
    return Pipeline(make(), stages=list(balance), schedule=schedule, method=method,
                    microbatches=3, optimizer=sgd, loss_fn=nn.CrossEntropyLoss(),
                    backend=backend, **kw)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "zb1p"])
def test_a_flush_schedules_kept_step_is_the_shorter_runs_result(schedule):
    batches = data(5)
    with _pipe(schedule=schedule) as pipe:
        outs = pipe.run(batches, keep=[1, 3])
        final = pipe.state_dict()
    assert [("weights" in o) for o in outs] == [False, True, False, True, False]
    assert outs[1]["weights_at"] < outs[3]["weights_at"]
    for t in (1, 3):
        with _pipe(schedule=schedule) as ref:
            ref.run(batches[: t + 1])
            _same(outs[t]["weights"], ref.state_dict())
    with _pipe(schedule=schedule) as plain:
        plain.run(batches)
        _same(final, plain.state_dict())  # keeping copies; it changes nothing


@pytest.mark.parametrize("method,schedule,make,balance,kw", METHODS,
                         ids=[m[0] for m in METHODS])
def test_every_rules_last_kept_step_is_the_runs_final_weights(method, schedule, make,
                                                             balance, kw):
    batches = data(4)
    with _pipe(make, balance, schedule, method, **kw) as pipe:
        outs = pipe.run(batches, keep=[1, 3])
        final = pipe.state_dict()
    with _pipe(make, balance, schedule, method, **kw) as plain:
        plain.run(batches)
        _same(final, plain.state_dict())
    _same(outs[3]["weights"], final)
    changed = [k for k in final if not torch.equal(outs[1]["weights"][k], final[k])]
    assert changed, "step 1's weights are not the end's: two more steps updated them"


def test_keep_points_follow_a_stage_past_its_trailing_updates():
    row = [Action(0, "F", 0), Action(1, "F", 0), Action(0, "B", 0), Action(1, "B", 0),
           Action(0, "U", 0), Action(1, "U", 0), Action(0, "F", 1), Action(0, "B", 1),
           Action(0, "U", 1)]
    assert keep_points(row, [0], 1) == {Action(0, "U", 0): 0, Action(1, "U", 0): 0}
    assert keep_points(row, [1], 1) == {Action(0, "U", 1): 1}
    # a stage whose next work is step 1's keeps no update it does not have before it
    row2 = [Action(0, "F", 0), Action(0, "F", 1), Action(0, "U", 0)]
    assert keep_points(row2, [0], 1) == {Action(0, "F", 0): 0}


def test_kept_steps_outside_the_run_are_refused():
    with _pipe() as pipe:
        with pytest.raises(PipelineConfigError, match=r"keep steps \[3\] are outside this "
                                                      r"run of 2 steps"):
            pipe.run(data(2), keep=[3])


@pytest.mark.slow
def test_ray_actors_hand_back_the_kept_weights_the_local_run_keeps(ray_cluster):
    batches = data(4)
    with _pipe(method="dni", schedule="dni", balance=(1, 2, 1)) as local:
        want = local.run(batches, keep=[2])[2]["weights"]
    with _pipe(method="dni", schedule="dni", balance=(1, 2, 1), backend="ray") as remote:
        got = remote.run(batches, keep=[2])[2]
    _same(got["weights"], want)
    assert got["weights_at"] > 0
