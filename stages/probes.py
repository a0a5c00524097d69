"""Gradient-quality probes (``--probe-every N``): how close an unlocked rule's gradients are
to the true ones, measured during training.

Every N steps, between pipelined runs (nothing in flight, off the training clock), the
driver takes the pipeline's weights and method state (``Pipeline.checkpoint_state``) and
works on a COPY of the model:

- dni / cdni: for the first microbatch of the step's batch it runs the whole model forward
  and backpropagates the true loss (times the microbatch's loss weight, as the pipeline
  scales it), which gives the true dL/dh at every stage boundary; each non-last stage's
  synthesizer, rebuilt from its state, predicts dL/dh for the same h (and labels). Per
  boundary: cosine similarity, relative error ``|sg - g| / |g|`` and relative norm error
  ``(|sg| - |g|) / |g|`` (signed: below 0, the synthetic gradient is too small).
  The prediction goes through the stage's own clip, as in training.
- petra: measured in the stage (``PetraStage(probe_every=N, microbatches=m)``): for the
  first microbatch of every N-th step it keeps each reversible block's true input and,
  when the reverse pass rebuilds it with the weights of that later time, records the
  relative error ``|x_rebuilt - x| / |x|`` and the weight versions (optimizer steps) taken
  between the forward and that reverse.
- staleness in weight versions between a microbatch's forward and the weights its gradient
  is applied to: petra measured as above; dni 0 (a stage steps in the same action as the
  forward) with the synthesizer's target arriving ``lag`` versions later (measured in the
  stage); stale: the update of step t applies the gradient of step k*floor(t/k), t mod k
  versions old (mean (k-1)/2, max k-1), from the schedule.

Each rule's declaration carries its probe (``MethodSpec.probe``, a :class:`ProbeHook`:
``SYNTHETIC_GRADIENT_PROBE`` for dni/cdni, ``RECONSTRUCTION_PROBE`` for petra,
``SCHEDULE_STALENESS_PROBE`` for stale), so a rule brought from outside brings its own and
the engine names no rule; ``probed_methods()`` lists the rules that have one. The driver's
side (when to probe, the model copy, the records) is ``brigade.engine.probes.Prober``;
``Prober.figures()`` is what goes into ``--json`` (``probes``); ``plot_probes`` draws the
side-by-side heat map of one microbatch's synthetic and true gradient (the view of the seed
post "A bird's eye view of synthetic gradients") and the hook's figure over steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["gradient_agreement", "true_boundary_gradients", "plot_probes", "probed_methods",
           "ProbeContext", "ProbeHook", "SYNTHETIC_GRADIENT_PROBE", "RECONSTRUCTION_PROBE",
           "SCHEDULE_STALENESS_PROBE"]


@dataclass
class ProbeContext:
    """What a probe is given at a probed step (taken between runs, nothing in flight).

    ``states``: ``Pipeline.checkpoint_state()`` by stage; ``x, y, weight``: the step's first
    microbatch and its loss weight; ``pieces()``: a copy of the model at these weights, cut
    as the pipeline is; ``stage_options``: the stage class's keywords; ``seen``: keys of the
    stage-side records taken already (a stage keeps its records for the whole run). A probe
    may set ``heatmap`` (``{"step", "stage", "synthetic", "true"}``) for the picture."""

    step: int
    rule: Any
    states: dict[int, dict[str, Any]]
    x: Tensor
    y: Tensor
    weight: float
    loss_fn: nn.Module
    pieces: Callable[[], list[nn.Module]]
    stage_options: dict[str, Any] = field(default_factory=dict)
    schedule_options: dict[str, Any] = field(default_factory=dict)
    seen: set = field(default_factory=set)
    heatmap: dict[str, Any] | None = None


@dataclass(frozen=True)
class ProbeHook:
    """How ``--probe-every`` measures one rule: ``measure(ctx) -> records`` (one dict per
    stage or block: ``step``, ``stage`` and numbers); ``figure``: the record key the probe
    picture draws over steps."""

    measure: Callable[[ProbeContext], list[dict[str, Any]]]
    figure: str = "cosine"


def probed_methods() -> list[str]:
    """The registered rules whose declaration carries a probe."""
    from .rules import get_method, method_names

    return [n for n in method_names() if get_method(n).probe is not None]


def gradient_agreement(sg: Tensor, g: Tensor) -> dict[str, float]:
    """Cosine, relative error and signed relative norm error of ``sg`` against ``g``."""
    a, b = sg.reshape(-1).double(), g.reshape(-1).double()
    gn = float(b.norm())
    if gn == 0.0:
        raise ConfigError("the true gradient is exactly zero: nothing to compare a synthetic one with")
    an = float(a.norm())
    cos = float(a @ b) / (an * gn) if an > 0 else 0.0
    return {"cosine": cos, "rel_error": float((a - b).norm()) / gn,
            "rel_norm_error": (an - gn) / gn}


def true_boundary_gradients(pieces: list[nn.Module], x: Tensor, y: Tensor,
                            loss_fn: nn.Module, weight: float = 1.0
                            ) -> tuple[list[Tensor], list[Tensor]]:
    """Run the stages in order with autograd; return each non-last stage's output h and
    the true d(loss * weight)/dh there."""
    hs: list[Tensor] = []
    h = x
    with torch.enable_grad():
        for i, piece in enumerate(pieces):
            h = piece(h)
            if i < len(pieces) - 1:
                h.retain_grad()
                hs.append(h)
        (loss_fn(h, y) * weight).backward()
    return [t.detach() for t in hs], [t.grad.detach().clone() for t in hs]


def _synthetic_gradient(ctx: ProbeContext) -> list[dict[str, Any]]:
    """dni / cdni: each non-last stage's synthesizer, rebuilt from its state on the model
    copy, against the true dL/dh of the same h (and labels); the target lag the stage
    measured; the first boundary's pair as the heat map."""
    from .stage import StageSpec

    pieces = ctx.pieces()
    hs, gs = true_boundary_gradients(pieces, ctx.x, ctx.y, ctx.loss_fn, ctx.weight)
    out, n = [], len(pieces)
    for s in range(n - 1):
        extra = ctx.states[s]["extra"]
        if extra is None or extra.get("sg") is None:
            continue  # no synthesizer yet (before the stage's first forward)
        stage = ctx.rule.stage_class(pieces[s], StageSpec(s, n), None, None, **ctx.stage_options)
        stage.load_state_dict_extra(extra)
        sg = stage.synthetic_gradient(hs[s], ctx.y if stage.conditioned else None)
        rec = {"step": ctx.step, "stage": s, **gradient_agreement(sg, gs[s])}
        lag = extra.get("staleness")
        if lag:
            rec["sg_target_staleness_mean"] = lag["sum"] / max(1, lag["count"])
            rec["sg_target_staleness_max"] = lag["max"]
        rec["staleness_max"] = 0  # the stage steps with its forward
        out.append(rec)
        if s == 0:
            ctx.heatmap = {"step": ctx.step, "stage": 0, "synthetic": sg.reshape(sg.shape[0], -1),
                           "true": gs[0].reshape(gs[0].shape[0], -1)}
    return out


def _stage_records(ctx: ProbeContext) -> list[dict[str, Any]]:
    """petra: the records the stages took themselves (``probe_every`` reaches them through
    the rule's options), each once."""
    out = []
    for s, state in sorted(ctx.states.items()):
        for rec in (state.get("extra") or {}).get("probes", []):
            key = (rec["step"], s, rec.get("block", -1))
            if key in ctx.seen:
                continue
            ctx.seen.add(key)
            out.append({**rec, "stage": s})
    return out


def _schedule_staleness(ctx: ProbeContext) -> list[dict[str, Any]]:
    """stale: the update of step t applies the gradient of step k*floor(t/k), t mod k
    versions old: mean (k-1)/2, max k-1, from the schedule's period."""
    k = int(ctx.schedule_options.get("k", 1))
    return [{"step": ctx.step, "stage": s, "staleness_mean": (k - 1) / 2,
             "staleness_max": k - 1, "source": "schedule"} for s in range(len(ctx.states))]


SYNTHETIC_GRADIENT_PROBE = ProbeHook(_synthetic_gradient, "cosine")
RECONSTRUCTION_PROBE = ProbeHook(_stage_records, "recon_rel_error")
SCHEDULE_STALENESS_PROBE = ProbeHook(_schedule_staleness, "staleness_mean")


def plot_probes(figures: dict[str, Any], heatmap: dict[str, Any] | None = None,
                path: str | None = None):
    """Left: the synthetic gradient beside the true one for one microbatch (examples x
    units, a shared colour scale); right: the probe's figure (``figures["figure"]``: cosine
    for dni, reconstruction error for petra) per stage over steps. Returns the figure; saved to ``path`` when given."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if heatmap is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.8), dpi=110, squeeze=False)
    axes = axes[0]
    if heatmap is not None:
        sg, g = heatmap["synthetic"].float(), heatmap["true"].float()
        cols = min(sg.shape[1], 128)  # the first units: a readable picture
        lim = float(max(sg[:, :cols].abs().max(), g[:, :cols].abs().max())) or 1.0
        for ax, data, name in ((axes[0], sg, "synthetic dL/dh"), (axes[1], g, "true dL/dh")):
            im = ax.imshow(data[:, :cols].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim,
                           aspect="auto", interpolation="nearest")
            ax.set_title(f"{name}, stage {heatmap['stage']} (step {heatmap['step']})", fontsize=9)
            ax.set_xlabel(f"unit (first {cols})")
            ax.set_ylabel("example of the microbatch")
        fig.colorbar(im, ax=axes[1], fraction=0.046)
    ax = axes[-1]
    key = figures.get("figure", "cosine")  # the rule's probe says which
    by_stage: dict[int, list[tuple[int, float]]] = {}
    for r in figures["records"]:
        if key in r:
            by_stage.setdefault(r["stage"], []).append((r["step"], r[key]))
    for s, pts in sorted(by_stage.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                label=f"stage {s}")
    ax.set_xlabel("training step")
    ax.set_ylabel({"cosine": "cosine(synthetic, true)",
                   "recon_rel_error": "relative reconstruction error"}.get(
                       key, key.replace("_", " ")))
    ax.set_title(f"{figures['method']}: {key.replace('_', ' ')} over training", fontsize=9)
    ax.grid(alpha=0.3)
    if by_stage:
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
