"""Action handlers: what one action kind does with a stage, and which messages it waits for.

A rule's declaration (``brigade.stages.rules.MethodSpec.handlers``) maps each action kind
its schedules use to a :class:`Handler`; the engine's worker builds its dispatch table from
it (the instruction-to-handler map of DeepSpeed's pipeline engine). A handler sees the
worker only through the :class:`Port` protocol (take a message, send one, record a loss),
so handlers live here, beside the stages, and know nothing of processes or transport.

Message keys: ``("x", s, j)`` the input of stage s for microbatch j (for forward gradients
the pair of the activation and its tangent), ``("g", s, j)`` what comes back to stage s for
j (the gradient of its output; for PETRA the pair of its reconstructed output and that
gradient), ``("d", s, j)`` scalars the last stage sends every stage (forward gradients:
d = ∇L·v, one number per projection), ``("y", j)`` the target and loss weight of j (last
stage), and ``("l", j)`` the label and loss weight of j for earlier stages that the rule shows
labels to (its exposure: cDNI, DGL, local-guess forward gradients).

The generic handlers below are backprop's (F, B, I, W, U); rule-specific ones sit in the
rule's module beside its stage class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol

__all__ = ["Port", "Handler", "forward", "backward", "backward_input", "backward_weight",
           "update", "evaluate", "BACKPROP_HANDLERS", "take_label", "label_key", "no_messages"]


class Port(Protocol):
    """What a handler may ask of the worker that runs it."""

    num_stages: int
    training: bool  # train mode (False: evaluation forwards, ``infer``)

    def stage(self, s: int) -> Any:
        """The stage object (a ``StageBase``) of stage ``s``, held by this worker."""

    def take(self, key: Hashable) -> Any:
        """Take a message that :meth:`Handler.needs` said must be there."""

    def send(self, action: Any, key: tuple, value: Any) -> None:
        """Route ``value`` to the worker holding stage ``key[1]`` (``("y"/"l", j)`` keys
        are never sent by handlers)."""

    def loss(self, mb: int, value: float) -> None:
        """Record microbatch ``mb``'s loss, already weighted by its share of the batch."""

    def output(self, mb: int, value: Any) -> None:
        """Record an evaluation output of the last stage."""

    def forward_only(self, s: int, mb: int) -> bool:
        """Whether this program runs no backward for ``(s, mb)`` (nothing to store)."""

    def gets_labels(self, s: int) -> bool:
        """Whether the rule shows stage ``s`` (not the last) the labels (its exposure)."""


Needs = Callable[[Port, Any], list]
Run = Callable[[Port, Any], None]


@dataclass(frozen=True)
class Handler:
    """One action kind's behaviour: ``run(port, action)``, the message keys ``needs(port,
    action)`` that must have arrived first, and whether it ``frees`` the microbatch's stored
    forward (a backward kind: a forward without one stores nothing)."""

    run: Run
    needs: Needs
    frees: bool = False


def label_key(port: Port, s: int, j: int) -> list:
    """``[("l", j)]`` where stage ``s`` is an earlier stage that sees labels, else []."""
    return [("l", j)] if s < port.num_stages - 1 and port.gets_labels(s) else []


def take_label(port: Port, s: int, j: int) -> tuple[Any, float]:
    """``(label, weight)`` of ``j`` for stage ``s`` if its rule shows it one (training
    only), else ``(None, 1.0)``: the weight is the microbatch's share n_j / N of the batch,
    for rules whose earlier stages weigh a loss of their own (DGL's heads)."""
    return port.take(("l", j)) if label_key(port, s, j) else (None, 1.0)


# -- F --------------------------------------------------------------------------------------
def _needs_forward(port: Port, a) -> list:
    s, j = a.stage, a.microbatch
    keys: list = [("x", s, j)]
    if s == port.num_stages - 1:
        keys.append(("y", j))
    elif port.training:
        keys += label_key(port, s, j)
    return keys


def evaluate(port: Port, a) -> None:
    """An evaluation forward (every rule's F in eval mode): ``infer``, output on the last."""
    s, j = a.stage, a.microbatch
    out = port.stage(s).infer(port.take(("x", s, j)))
    if s == port.num_stages - 1:
        port.take(("y", j))
        port.output(j, out)
    else:
        port.send(a, ("x", s + 1, j), out)


def _forward(port: Port, a) -> None:
    """Backprop's forward: store for the backward (or not, when none follows), send on;
    the last stage records its weighted loss."""
    if not port.training:
        evaluate(port, a)
        return
    s, j = a.stage, a.microbatch
    stage, last = port.stage(s), s == port.num_stages - 1
    x = port.take(("x", s, j))
    target, weight = port.take(("y", j)) if last else (None, 1.0)
    label = None if last else take_label(port, s, j)[0]
    if port.forward_only(s, j):
        out = stage.forward_only(j, x, target, weight)
    else:
        out = stage.forward(j, x, target, weight, label=label)
    if last:
        port.loss(j, float(out))
    else:
        port.send(a, ("x", s + 1, j), out)


forward = Handler(_forward, _needs_forward)


# -- B, I, W, U ------------------------------------------------------------------------------
def _needs_grad(port: Port, a) -> list:
    return [] if a.stage == port.num_stages - 1 else [("g", a.stage, a.microbatch)]


def _grad(port: Port, a):
    return None if a.stage == port.num_stages - 1 else port.take(("g", a.stage, a.microbatch))


def _backward(port: Port, a) -> None:
    grad_in = port.stage(a.stage).backward(a.microbatch, _grad(port, a))
    if a.stage > 0:
        port.send(a, ("g", a.stage - 1, a.microbatch), grad_in)


def _backward_input(port: Port, a) -> None:
    grad_in = port.stage(a.stage).backward_input(a.microbatch, _grad(port, a))
    if a.stage > 0:
        port.send(a, ("g", a.stage - 1, a.microbatch), grad_in)


def no_messages(port: Port, a) -> list:
    """A kind that waits for no message."""
    return []


backward = Handler(_backward, _needs_grad, frees=True)
backward_input = Handler(_backward_input, _needs_grad, frees=True)
def _backward_weight(port: Port, a) -> None:
    port.stage(a.stage).backward_weight(a.microbatch)


def _update(port: Port, a) -> None:
    port.stage(a.stage).update()


backward_weight = Handler(_backward_weight, no_messages)
update = Handler(_update, no_messages)

# The handler table of backprop schedules (gpipe, 1f1b, interleaved, zb1p, stale).
BACKPROP_HANDLERS: dict[str, Handler] = {
    "F": forward, "B": backward, "I": backward_input, "W": backward_weight, "U": update,
}
