"""Gradient-quality probes: what they compare, on what, and where the figures go."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn

from brigade.engine.cli import main
from brigade.engine.microbatch import loss_weights, split_batch
from brigade.engine.pipeline import Pipeline
from brigade.engine.probes import Prober
from brigade.stages.dni import DNIStage
from brigade.stages.models import build_model
from brigade.stages.partition import split
from brigade.stages.petra import PetraStage
from brigade.stages.probes import gradient_agreement
from brigade.stages.revnet import RevBlock
from brigade.stages.stage import StageSpec

SMALL = ["--model", "mlp", "--width", "16", "--data", "synthetic", "--backend", "local",
         "--batch-size", "16", "--microbatches", "2", "--steps", "8", "--quiet"]


def test_agreement_figures():
    g = torch.randn(4, 8)
    assert gradient_agreement(g, g) == pytest.approx({"cosine": 1.0, "rel_error": 0.0,
                                                      "rel_norm_error": 0.0}, abs=1e-12)
    two = gradient_agreement(2 * g, g)
    assert two["cosine"] == pytest.approx(1.0) and two["rel_norm_error"] == pytest.approx(1.0)
    assert gradient_agreement(-g, g)["cosine"] == pytest.approx(-1.0)
    assert gradient_agreement(torch.zeros(4, 8), g)["rel_error"] == pytest.approx(1.0)


def test_dni_probe_gives_cosine_one_when_the_synthesizer_is_the_true_gradient(monkeypatch):
    """Replace the synthesizer's prediction by the true dL/dh of the probed microbatch
    (computed here independently, from the weights at the probe): the probe must report
    cosine 1 and zero error, so it compares the same microbatch, loss weight and h."""
    torch.manual_seed(0)
    factory = functools.partial(build_model, "mlp", width=16)
    model = factory()
    x, y = torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,))
    with Pipeline(model, stages=[1, 2], schedule="dni", method="dni", microbatches=3,
                  backend="local", optimizer=functools.partial(torch.optim.SGD, lr=0.05)) as pipe:
        pipe.run([(x, y)] * 2)
        ref = factory()
        ref.load_state_dict(pipe.state_dict())
        s0, s1 = split(ref, [1, 2])
        x0, y0 = split_batch(x, 3)[0], split_batch(y, 3)[0]
        h = s0(x0).detach().requires_grad_()
        (nn.CrossEntropyLoss()(s1(h), y0) * loss_weights(split_batch(x, 3))[0]).backward()
        true = h.grad.detach()

        def oracle(self, hh, label=None):
            assert torch.allclose(hh, h.detach(), atol=1e-6)  # the probe's h is the true one
            return true.clone()

        prober = Prober("dni", 2, model_factory=factory)
        real = prober.probe(pipe, x, y, 2, 3)[0]  # the trained synthesizer: not perfect
        assert -1.0 <= real["cosine"] < 0.9999
        monkeypatch.setattr(DNIStage, "synthetic_gradient", oracle)
        rec = prober.probe(pipe, x, y, 4, 3)[0]
    assert rec["stage"] == 0 and rec["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rec["rel_error"] == pytest.approx(0.0, abs=1e-5)
    assert rec["sg_target_staleness_max"] >= 0 and rec["staleness_max"] == 0
    assert prober.heatmap["synthetic"].shape == (4, 16)


def test_petra_probe_measures_reconstruction_error_and_staleness():
    torch.manual_seed(0)
    block = nn.Sequential(RevBlock(4), RevBlock(4))
    stage = PetraStage(block, StageSpec(1, 3), functools.partial(torch.optim.SGD, lr=0.0),
                       probe_every=1, microbatches=1)
    x = torch.randn(2, 4, 6, 6)
    y = stage.forward(0, x)
    stage.reverse(0, y, torch.ones_like(y))  # no update in between: exact up to rounding
    assert [r["block"] for r in stage.probe_records] == [1, 0]
    assert max(r["recon_rel_error"] for r in stage.probe_records) < 1e-5
    assert all(r["staleness"] == 0 for r in stage.probe_records)
    # forward mb 1, then the weights move (another microbatch's step): error and staleness
    y1 = stage.forward(1, x)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stage.steps += 1  # one version, as an optimizer step of another microbatch counts
    stage.reverse(1, y1, torch.ones_like(y1))
    late = [r for r in stage.probe_records if r["step"] == 2]
    assert len(late) == 2 and all(r["staleness"] == 1 for r in late)
    assert min(r["recon_rel_error"] for r in late) > 1e-3
    assert stage.state_dict_extra()["probes"] == stage.probe_records


def test_train_with_probes_into_json_report_and_tensorboard(tmp_path, capsys):
    out, trace, tb = tmp_path / "o.json", tmp_path / "t.json", tmp_path / "tb"
    assert main(["train", *SMALL, "--method", "cdni", "--probe-every", "4", "--json", str(out),
                 "--trace", str(trace), "--tensorboard", str(tb)]) == 0
    probes = json.loads(out.read_text())["probes"]
    assert [r["step"] for r in probes["records"]] == [4, 8]
    assert all(-1 <= r["cosine"] <= 1 for r in probes["records"])
    assert set(probes["mean_per_stage"]) == {"0"}
    capsys.readouterr()
    assert main(["report", str(trace), "--plot", str(tmp_path / "g.png")]) == 0
    printed = capsys.readouterr().out
    assert "gradient-quality probes" in printed and "cosine" in printed
    assert (tmp_path / "g.probes.png").read_bytes()[:4] == b"\x89PNG"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = acc.Tags()
    assert {"train_loss", "test_accuracy", "samples_per_s", "idle_fraction/stage0",
            "probe/stage0/cosine"} <= set(tags["scalars"])
    assert "probe/gradients" in tags["images"]


def test_probe_every_refuses_methods_without_an_approximation(capsys):
    assert main(["train", *SMALL, "--probe-every", "2"]) == 2
    err = capsys.readouterr().err
    assert "--probe-every measures" in err and "dni" in err and "method 'backprop'" in err
    # the probed rules are those whose declaration carries a probe
    from brigade.stages.probes import probed_methods

    assert set(probed_methods()) == {"dni", "cdni", "petra", "stale"}
