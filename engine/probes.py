"""The driver's side of ``--probe-every N`` (what is measured and why: ``brigade.stages.probes``).

Every N steps the training loop ends a pipelined run at that step, and ``Prober.probe``
measures on a copy of the weights, between runs, off the training clock.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from torch import Tensor, nn

from brigade.stages.errors import ConfigError
from brigade.stages.probes import ProbeContext, plot_probes
from brigade.stages.rules import get_method

from .microbatch import loss_weights, split_batch

__all__ = ["Prober"]


class Prober:
    """The driver's side of ``--probe-every``: when to probe, what was measured. What is
    measured is the rule's own probe (its declaration's ``probe``)."""

    def __init__(self, method: str, every: int, writer=None,
                 model_factory: Callable[[], nn.Sequential] | None = None,
                 loss_fn: nn.Module | None = None) -> None:
        if every < 1:
            raise ConfigError(f"probe_every must be >= 1; got {every}")
        self.rule = get_method(method)
        if self.rule.probe is None:
            raise ConfigError(f"method {self.rule.name!r} declares no probe; drop probe_every")
        self.method = self.rule.name
        self.every = every
        self.writer = writer
        self.model_factory = model_factory
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.records: list[dict[str, Any]] = []  # one per probed step and stage
        self.heatmap: dict[str, Any] | None = None  # the last probe's sg and g, boundary 0
        self._seen: set[tuple[int, int, int]] = set()

    def steps_to_next(self, done: int) -> int:
        """Steps from ``done`` to the next probed step (at least 1)."""
        return self.every - done % self.every

    def due(self, step: int) -> bool:
        return step % self.every == 0

    # -- measuring --------------------------------------------------------------------------
    def probe(self, pipe, x: Tensor, y: Tensor, step: int, microbatches: int) -> list[dict]:
        """Measure at ``step`` (the pipeline has just finished it); returns the new records."""
        xs, ys = split_batch(x, microbatches), split_batch(y, microbatches)
        ctx = ProbeContext(
            step=step, rule=self.rule, states=pipe.checkpoint_state(), x=xs[0], y=ys[0],
            weight=loss_weights(xs)[0], loss_fn=self.loss_fn,
            pieces=lambda: self._model_copy(pipe), stage_options=dict(pipe._stage_options),
            schedule_options=dict(pipe.schedule.options), seen=self._seen)
        new = self.rule.probe.measure(ctx)
        if ctx.heatmap is not None:
            self.heatmap = ctx.heatmap
        self.records += new
        self._write(new)
        return new

    def _model_copy(self, pipe) -> list[nn.Module]:
        """The model at the pipeline's weights, on a copy, cut as the pipeline is."""
        from brigade.stages.partition import split

        if self.model_factory is None:
            raise ConfigError(f"a {self.method} probe needs model_factory= to rebuild the model")
        model = self.model_factory()
        model.load_state_dict(pipe.state_dict())
        return split(copy.deepcopy(model), list(pipe.balance))

    # -- reporting --------------------------------------------------------------------------
    def _write(self, records: list[dict]) -> None:
        if self.writer is None:
            return
        for r in records:
            values = {k: v for k, v in r.items() if k not in ("step", "stage", "source", "block")
                      and isinstance(v, (int, float))}
            self.writer.scalars(f"probe/stage{r['stage']}", values, r["step"])

    def figures(self) -> dict[str, Any]:
        """JSON: every record, and per stage the means over the run."""
        summary: dict[str, dict[str, float]] = {}
        for r in self.records:
            row = summary.setdefault(str(r["stage"]), {})
            for k, v in r.items():
                if k in ("step", "stage", "block") or not isinstance(v, (int, float)):
                    continue
                row.setdefault(k, []).append(v)  # type: ignore[arg-type]
        means = {s: {k: sum(v) / len(v) for k, v in row.items()} for s, row in summary.items()}
        return {"method": self.method, "every": self.every, "figure": self.rule.probe.figure,
                "records": self.records, "mean_per_stage": means}

    def heatmap_lists(self) -> dict[str, Any] | None:
        """The last heat map as plain lists (JSON; ``brigade report`` draws it)."""
        if self.heatmap is None:
            return None
        return {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in self.heatmap.items()}

    def write_figures(self, step: int) -> None:
        """The probe picture into TensorBoard (when anything was probed)."""
        if self.writer is None or not self.records:
            return
        fig = plot_probes(self.figures(), self.heatmap)
        self.writer.figure("probe/gradients", fig, step)
        import matplotlib.pyplot as plt

        plt.close(fig)
