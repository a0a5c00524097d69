"""brigade.schedulers: pipeline schedules as data, a simulator and idle-time reports.

Pure Python (no torch, no ray). A schedule is one ordered list of actions per worker; the
simulator and the engine execute the same lists and produce the same :class:`Timeline`,
so a measured run prints beside its prediction::

    from brigade.schedulers import build, simulate, Costs, compare_table
    sched = build("1f1b", stages=4, microbatches=8)
    print(sched.grid())
    tl = simulate(sched, Costs(f=1, b=2))
    tl.bubble_fraction, tl.idle_fraction(0), tl.peak_activations(0)
"""

from .actions import (
    BACKWARD_KINDS,
    COMM_KINDS,
    COMPUTE_KINDS,
    FORWARD_KINDS,
    KIND_NAMES,
    KINDS,
    Action,
    parse_actions,
)
from .calibrate import costs_from_timeline, predict, predict_from_profile, schedule_of
from .costs import Costs
from .deps import Dependencies
from .errors import ScheduleError
from .generators import interleaved_rounds
from .kinds import ActionKind, Need, kind_of, register_action_kind, unregister_action_kind
from .lowering import lower, unlower
from .plot import plot_gantt
from .registry import (DECOUPLED, ScheduleSpec, build, names, options_of, register_schedule,
                       schedule_spec, specs)
from .report import compare_table, grid_text, side_by_side, summary_table
from .schedule import Schedule
from .simulate import simulate
from .timeline import CATEGORIES, Event, Timeline
from .trace import chrome_trace, read_chrome_trace, write_chrome_trace
from .validate import validate

__all__ = [
    # actions
    "Action", "parse_actions", "KINDS", "COMPUTE_KINDS", "COMM_KINDS", "FORWARD_KINDS",
    "BACKWARD_KINDS", "KIND_NAMES",
    # the table of kinds
    "ActionKind", "Need", "kind_of", "register_action_kind", "unregister_action_kind",
    # schedules
    "Schedule", "build", "names", "options_of", "DECOUPLED", "ScheduleSpec",
    "register_schedule", "schedule_spec", "specs", "interleaved_rounds",
    "validate", "Dependencies", "lower", "unlower",
    # simulation
    "Costs", "simulate", "Timeline", "Event", "CATEGORIES",
    "costs_from_timeline", "predict", "predict_from_profile", "schedule_of",
    # reports
    "compare_table", "side_by_side", "summary_table", "grid_text", "plot_gantt",
    "write_chrome_trace", "chrome_trace", "read_chrome_trace",
    # errors
    "ScheduleError",
]
