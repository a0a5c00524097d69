"""``Pipeline.profile``: every action timed in place (record one step, replay without
waiting), and nothing about training changed by it.

The checks that can fail: training after a profile must equal training without one, bit for
bit (weights, BatchNorm statistics, momentum, dropout's random stream); the profile's
timeline must hold exactly the replayed program's compute actions, and their sends, which
the receivers drop (a dropped-message leak would fail the next step with "delivered twice"
or leave messages queued).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from brigade.engine import Pipeline, PipelineConfigError, PipelineError
from brigade.engine.worker import Worker
from brigade.schedulers import Action, costs_from_timeline, predict

G = torch.Generator().manual_seed(1)
X, Y = torch.randn(20, 6, generator=G), torch.randint(0, 3, (20,), generator=G)


def _net(dropout: float = 0.2) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 16), nn.Dropout(dropout), nn.Tanh()),
        nn.Linear(16, 3),
    )


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _train(profile: bool, schedule: str = "1f1b", method: str = "backprop",
           backend: str = "local", stages: int = 3, dropout: float = 0.2):
    """Three steps (seeded alike), with a 2-step profile before the second when asked."""
    with Pipeline(_net(dropout), stages=stages, schedule=schedule, method=method,
                  microbatches=4, backend=backend, optimizer=_sgd) as pipe:
        losses, profiled = [], None
        for k in range(3):
            torch.manual_seed(10 + k)
            if k == 1 and profile:
                profiled = pipe.profile(X, Y, steps=2)
                timeline_steps = pipe.timeline().meta["steps"]
            losses.append(pipe.step(X, Y)["loss"])
        assert not profile or timeline_steps == 1  # the profile's steps are not the run's
        pipe.checkpoint_state()  # refused while any message (a replay's too) is queued
        return losses, pipe.state_dict(), profiled, pipe.schedule


def _same_training(a, b) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k


@pytest.mark.parametrize("schedule,method", [("gpipe", "backprop"), ("1f1b", "backprop"),
                                             ("zb1p", "backprop"), ("dni", "dni"),
                                             ("fwdgrad", "fwdgrad")])
def test_a_profile_times_every_action_and_changes_nothing(schedule, method):
    with_profile = _train(True, schedule, method)
    _same_training(with_profile, _train(False, schedule, method))
    tl, sched = with_profile[2], with_profile[3]
    assert tl.meta["source"] == "profiled" and tl.meta["steps"] == 2
    assert tl.samples == 2 * X.shape[0]
    per_step = Counter((a.stage, a.kind) for prog in sched.workers for a in prog)
    computed = Counter((e.stage, e.kind) for e in tl.events if e.category == "compute")
    assert computed == Counter({k: 2 * n for k, n in per_step.items()})
    assert [e for e in tl.events if e.category == "send"]  # the messages went out (nobody
    # waited: checked on the actors below; this local backend never records a wait)
    costs = costs_from_timeline(tl)
    assert all(f > 0 for f in costs.f)
    assert predict(tl, costs).throughput > 0


@pytest.mark.ray
def test_profile_on_ray_actors_changes_nothing_and_sends_for_real(ray_cluster):
    a = _train(True, "1f1b", backend="ray", stages=2, dropout=0.0)
    b = _train(False, "1f1b", backend="ray", stages=2, dropout=0.0)
    _same_training(a, b)
    tl = a[2]
    assert {e.worker for e in tl.events if e.category == "compute"} == {0, 1}
    sends = Counter((e.worker, e.kind) for e in tl.events if e.category == "send")
    assert sends == {(0, "F"): 8, (1, "B"): 8}  # 2 steps x 4 microbatches each way
    assert not [e for e in tl.events if e.category == "wait"]  # nobody waited (the actors
    # record waits; the local backend never does)


def test_profile_arguments_and_a_replay_without_a_record_are_refused():
    with Pipeline(_net(), stages=3, schedule="1f1b", microbatches=4, backend="local",
                  optimizer=_sgd) as pipe:
        with pytest.raises(PipelineConfigError, match="steps must be >= 1 to profile .got 0"):
            pipe.profile(X, Y, steps=0)
    worker = Worker(0, {}, [0])
    with pytest.raises(PipelineError, match="a replay needs a record step first"):
        worker.begin(True, [], [Action(0, "F", 0)], mode="replay")
    with pytest.raises(PipelineError, match="unknown step mode 'profile'; modes are run"):
        worker.begin(True, [], [], mode="profile")


def test_a_record_step_begins_after_a_neighbours_message_for_it_arrived():
    """On actors the driver starts every worker's record step at once: a neighbour that
    begins first can deliver this step's activation before this worker has begun. Its
    snapshot is of the training state, so that is no error (it was, as a checkpoint's
    "messages still queued": a CI run on 2 cores hit it); a checkpoint still refuses."""
    worker = Worker(1, {}, [0, 1])
    worker.mailbox.put(("x", 1, 0), torch.ones(2))  # stage 0's F for microbatch 0, early
    with pytest.raises(PipelineError, match="cannot checkpoint with messages still queued"):
        worker.checkpoint_state()
    worker.begin(True, [], [], mode="record")
    assert worker.mailbox.pending() == [("x", 1, 0)]  # kept for the step to take


def test_a_replays_messages_are_dropped_on_arrival():
    worker = Worker(1, {}, [0, 1])
    worker.deliver(("x", 1, -1), torch.ones(1))  # microbatch 0 of a replay
    worker.deliver(("x", 1, 0), torch.ones(1))
    assert worker.mailbox.pending() == [("x", 1, 0)]
