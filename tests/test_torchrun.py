"""The torchrun backend: 2 ranks (gloo, CPU) train to single-process weights; none linger."""

from __future__ import annotations


import pytest
import torch


from _nets import local_and_torchrun
from _procs import wait_gone, with_cmdline

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "fwdgrad"])
def test_torchrun_weights_equal_single_process_and_processes_end(tmp_path, schedule):
    flags = ["--model", "mlp", "--width", "32", "--data", "synthetic", "--batch-size", "30",
             "--microbatches", "4", "--steps", "5", "--schedule", schedule, "--quiet"]
    if schedule == "fwdgrad":  # the forward-only pipeline: (h, tangent) on, d back
        flags += ["--method", "fwdgrad"]
    a, b, report = local_and_torchrun(tmp_path, flags)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)
    assert report["config"]["backend"] == "torchrun" and len(report["stages"]) == 2
    assert wait_gone(with_cmdline(str(tmp_path / "o.json")), 10)


def test_torchrun_backend_outside_torchrun_says_how_to_start(capsys):
    from brigade.engine import Pipeline, PipelineConfigError
    from brigade.stages.models import build_model

    with pytest.raises(PipelineConfigError, match="torchrun --nproc-per-node P -m "
                                                  "brigade.engine.launch"):
        Pipeline(build_model("mlp", width=8), stages=2, backend="torchrun",
                 optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
