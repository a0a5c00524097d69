"""Engine tests: pipelined backprop equals single-process training; failures surface fast.

Every pipeline schedule is checked on a BatchNorm-free model with uneven stages and on a
BatchNorm model, with a batch (10 samples) that does not divide into its 4 microbatches
(torch.tensor_split gives 3, 3, 2, 2). The reference is single-process training with the
same microbatch split and gradient accumulation; for the BatchNorm-free model it is also
plain full-batch training.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from brigade.engine import Pipeline, PipelineConfigError, StageFailedError
from brigade.stages.trainer import reference_step

from _procs import wait_gone

SCHEDULES = [
    # (schedule, workers, virtual, balance)
    ("gpipe", 3, 1, [1, 3, 1]),
    ("1f1b", 3, 1, [2, 2, 1]),
    ("zb1p", 2, 1, [3, 2]),
    ("interleaved", 2, 2, [1, 2, 1, 1]),
]
STEPS = 3


def plain_net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh()),
        nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
        nn.Linear(8, 8),
        nn.Linear(8, 3),
    )


def bn_net() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
        nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)),
        nn.Linear(8, 3),
    )


def batches(k: int, n: int = 10):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(n, 1, 2, 3, generator=g), torch.randint(0, 3, (n,), generator=g))
            for _ in range(k)]


def optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def reference(model: nn.Module, data, microbatches: int) -> dict:
    model = copy.deepcopy(model)
    opt = optimizer(model.parameters())
    for x, y in data:
        reference_step(model, opt, nn.CrossEntropyLoss(), x, y, microbatches)
    return model.state_dict()


def assert_same_state(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        if want[k].is_floating_point():
            torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol, msg=k)
        else:
            assert torch.equal(got[k], want[k]), k


def run_pipeline(model, schedule, workers, virtual, balance, backend, data) -> tuple[dict, list]:
    with Pipeline(model, stages=balance, schedule=schedule, microbatches=4, virtual=virtual,
                  optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(), backend=backend) as pipe:
        assert pipe.config.num_workers == workers
        losses = [pipe.step(x, y)["loss"] for x, y in data]
        return pipe.state_dict(), losses


@pytest.mark.parametrize("schedule,workers,virtual,balance", SCHEDULES)
@pytest.mark.parametrize("make", [plain_net, bn_net], ids=["plain", "batchnorm"])
def test_local_backend_matches_single_process(make, schedule, workers, virtual, balance):
    model, data = make(), batches(STEPS)
    got, _ = run_pipeline(model, schedule, workers, virtual, balance, "local", data)
    assert_same_state(got, reference(model, data, microbatches=4))


@pytest.mark.ray
@pytest.mark.parametrize("schedule,workers,virtual,balance", SCHEDULES)
@pytest.mark.parametrize("make", [plain_net, bn_net], ids=["plain", "batchnorm"])
def test_ray_backend_matches_single_process(ray_cluster, make, schedule, workers, virtual,
                                            balance):
    model, data = make(), batches(STEPS)
    got, losses = run_pipeline(model, schedule, workers, virtual, balance, "ray", data)
    assert_same_state(got, reference(model, data, microbatches=4))
    if make is plain_net:  # BatchNorm-free: the microbatch split changes nothing
        assert_same_state(got, reference(model, data, microbatches=1))
    assert all(l > 0 for l in losses)


def test_loss_is_the_batch_mean():
    model, data = plain_net(), batches(1, n=9)
    x, y = data[0]
    want = float(nn.CrossEntropyLoss()(model(x), y).detach())
    with Pipeline(model, stages=[2, 3], schedule="1f1b", microbatches=4, backend="local",
                  optimizer=optimizer) as pipe:
        assert pipe.step(x, y)["loss"] == pytest.approx(want, rel=1e-6)


def test_predict_matches_model_in_eval_mode():
    model, data = bn_net(), batches(2)
    with Pipeline(model, stages=[2, 3], schedule="gpipe", microbatches=4, backend="local",
                  optimizer=optimizer) as pipe:
        pipe.step(*data[0])
        trained = copy.deepcopy(model)
        trained.load_state_dict(pipe.state_dict())
        trained.eval()
        torch.testing.assert_close(pipe.predict(data[1][0]), trained(data[1][0]))


def test_timeline_records_every_action_and_frees_activations():
    model, data = plain_net(), batches(2)
    with Pipeline(model, stages=[2, 3], schedule="1f1b", microbatches=4, backend="local",
                  optimizer=optimizer) as pipe:
        for x, y in data:
            pipe.step(x, y)
        tl = pipe.timeline()
        compute = [e for e in tl.events if e.category == "compute"]
        # per step: 2 stages x 4 microbatches x (F + B) + 2 updates
        assert len(compute) == 2 * (2 * 4 * 2 + 2)
        assert tl.samples == 20
        for w in pipe._backend.workers:
            assert all(st.stored_microbatches == 0 for st in w.stages.values())
            assert w.mailbox.pending() == []
        assert all(b > 0 for b in tl.meta["peak_stored_activation_bytes"])
        assert tl.meta["steps"] == 2
        pipe.reset_timeline()  # e.g. after warm-up: the timeline covers what follows only
        pipe.step(*data[0])
        tl = pipe.timeline()
        assert tl.meta["steps"] == 1 and tl.samples == 10
        assert len([e for e in tl.events if e.category == "compute"]) == 2 * 4 * 2 + 2


class Boom(nn.Module):
    """Raises on its ``fail_at``-th forward call."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.calls = 0
        self.fail_at = fail_at
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("boom in forward")
        return self.lin(x)


@pytest.mark.ray
def test_failing_stage_surfaces_naming_the_stage_and_actors_die(ray_cluster):
    model = plain_net()
    model[3] = Boom(fail_at=6)  # second step, stage 1
    pipe = Pipeline(model, stages=[2, 2, 1], schedule="1f1b", microbatches=4, backend="ray",
                    optimizer=optimizer, timeout_s=60)
    pids = pipe.worker_pids
    data = batches(2)
    pipe.step(*data[0])
    t0 = time.monotonic()
    with pytest.raises(StageFailedError, match=r"stage 1 \(worker 1\) failed: RuntimeError: boom"):
        pipe.step(*data[1])
    assert time.monotonic() - t0 < 10
    assert wait_gone(pids), pids
    with pytest.raises(Exception, match="shut down"):
        pipe.step(*data[0])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(stages=[2, 2]), "sums to 4 but the model has 5 blocks"),
        (dict(stages=0), "--stages 0 must be >= 1 (stages=)"),
        (dict(microbatches=0), "--microbatches 0 must be >= 1 (microbatches=)"),
        (dict(schedule="interleaved", virtual=1), "interleaved needs virtual >= 2"),
        (dict(schedule="gpipe", virtual=2), "needs schedule='interleaved'"),
        (dict(method="hebbian"), "unknown method 'hebbian'; valid methods: backprop"),
        (dict(backend="mpi"), "unknown backend 'mpi'; valid backends: ray, local, torchrun"),
        (dict(transport="nccl"), "unknown transport 'nccl'; valid transports: p2p, gloo, ray"),
        (dict(backend="torchrun", transport="ray"), "transport 'ray' does not run under torchrun"),
        (dict(stages=[2, 2, 1], virtual=2, schedule="interleaved"), "not a multiple of"),
    ],
)
def test_bad_pipeline_arguments(kwargs, message):
    args = dict(stages=2, schedule="1f1b", microbatches=4, backend="local")
    args.update(kwargs)
    with pytest.raises(PipelineConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Pipeline(plain_net(), optimizer=optimizer, **args)


def test_batch_smaller_than_microbatches_is_refused():
    with Pipeline(plain_net(), stages=2, microbatches=4, backend="local",
                  optimizer=optimizer) as pipe:
        x, y = batches(1, n=3)[0]
        with pytest.raises(PipelineConfigError, match="batch of 3 samples cannot be split into 4"):
            pipe.step(x, y)


def test_a_compute_span_ends_where_its_send_starts():
    """A handler's sends are their own spans, outside its compute span (as the simulator
    charges them): busy time does not count a send blocked on the receiver."""
    from brigade.engine.worker import Worker
    from brigade.schedulers import Action
    from brigade.stages.stage import Stage, StageSpec

    def slow_send(dest, key, payload):
        time.sleep(0.05)  # a send waiting for the receiver

    stage = Stage(nn.Sequential(nn.Linear(4, 4)), StageSpec(0, 2))
    worker = Worker(0, {0: stage}, [0, 1], send=slow_send)
    program = [Action(0, "F", 0), Action(0, "B", 0)]  # F keeps what B needs
    worker.begin(True, [(("x", 0, 0), torch.randn(2, 4))], program)
    worker.run([Action(0, "F", 0)])
    compute, send = worker.end().events
    assert (compute[2], compute[6], send[6]) == ("F", "compute", "send")
    assert compute[5] <= send[4] and compute[5] - compute[4] < 0.04
    assert send[5] - send[4] >= 0.05
