"""Lowering: make every message between workers explicit as send/receive actions.

torch.distributed.pipelining lowers its compute-only orders the same way. After
``lower``, each edge that crosses workers reads ``producer, send`` on one worker and
``receive, consumer`` on the other::

    w0 | 0F0 0SF0 ...            (stage 0 sends microbatch 0's activation)
    w1 | 1RF0 1F0 ...            (stage 1 receives it, then runs its forward)

Forward-direction messages are ``SF``/``RF``, backward-direction ones (gradients, PETRA's
reconstructed inputs, DNI's returned gradients, fwdgrad's scalars d) ``SB``/``RB``;
fwdgrad's last stage sends d once (``SB``) and every earlier stage receives it (``RB``).
The simulator charges the bytes to the send and the latency to the receive.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING

from .actions import COMM_KINDS, Action
from .deps import Dependencies
from .errors import ScheduleError
from .kinds import message_kinds

if TYPE_CHECKING:  # pragma: no cover
    from .schedule import Schedule

__all__ = ["lower", "unlower"]


def lower(schedule: "Schedule") -> "Schedule":
    """A copy of ``schedule`` with a send after each remote producer and a receive before
    each consumer (a schedule that already has send/receive actions is refused)."""
    if any(a.kind in COMM_KINDS for _, a in schedule):
        raise ScheduleError(f"schedule {schedule.name!r} already has send/receive actions; "
                            "lower the compute-only schedule (see unlower)")
    deps = Dependencies(schedule)
    sends: dict[Action, list[Action]] = defaultdict(list)
    recvs: dict[Action, list[Action]] = defaultdict(list)
    for _, a in schedule:
        for d in deps.of(a):
            if deps.crosses(d, a):
                send_kind, recv_kind = message_kinds(forward=d.stage < a.stage)
                send = Action(d.stage, send_kind, a.microbatch)
                if send not in sends[d]:  # one send may reach several stages (fwdgrad's d)
                    sends[d].append(send)
                recvs[a].append(Action(a.stage, recv_kind, a.microbatch))
    rows = [[x for a in row for x in (*recvs[a], a, *sends[a])] for row in schedule.workers]
    return replace(schedule, workers=rows)


def unlower(schedule: "Schedule") -> "Schedule":
    """The compute-only schedule: every send/receive action dropped."""
    rows = [[a for a in row if a.kind not in COMM_KINDS] for row in schedule.workers]
    return replace(schedule, workers=rows)
