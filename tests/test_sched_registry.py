"""Schedule declarations: each generator registers itself with its facts, and the code
that asks (costs, the decoupled set, the CLI's defaults) reads the facts, not names."""

from __future__ import annotations

import pytest

from brigade.schedulers import (
    DECOUPLED, Costs, Schedule, ScheduleError, build, names, options_of, register_schedule,
    schedule_spec, simulate, specs,
)
from brigade.schedulers.registry import unregister_schedule


def test_the_built_in_declarations_carry_their_facts():
    facts = {s.name: (s.decoupled, s.forward_only, s.stores_activations, s.default_virtual,
                      s.compared, s.options) for s in specs()}
    assert facts == {
        "gpipe": (False, False, True, 1, True, ()),
        "1f1b": (False, False, True, 1, True, ()),
        "interleaved": (False, False, True, 2, True, ()),
        "zb1p": (False, False, True, 1, True, ()),
        "dni": (True, False, True, 1, True, ("lag",)),
        "petra": (True, False, False, 1, True, ("accumulate",)),
        "stale": (False, False, True, 1, True, ("k",)),
        "fwdgrad": (False, True, False, 1, False, ()),
        "dgl": (True, False, False, 1, False, ()),
    }
    assert set(DECOUPLED) == {"dni", "petra", "dgl"} and "PETRA" in DECOUPLED
    assert schedule_spec(" 1F1B ").name == "1f1b"
    assert "1F1B" in schedule_spec("1f1b").summary


@pytest.mark.parametrize("name, stores", [("gpipe", True), ("petra", False),
                                           ("fwdgrad", False), ("not-registered", True)])
def test_costs_store_activations_by_the_declared_fact(name, stores):
    assert Costs().resolve(3, name).stores_activations == [stores] * 3


def test_an_unknown_name_lists_the_valid_ones():
    with pytest.raises(ScheduleError, match="valid names: gpipe, 1f1b, interleaved"):
        schedule_spec("zbv")


def test_a_schedule_declared_outside_the_package_is_known_everywhere():
    @register_schedule("reverse-gpipe", decoupled=True)
    def reverse_gpipe(stages, microbatches, virtual=1, steps=1, order: int = 1):
        """GPipe with the backwards in reverse microbatch order."""
        m = microbatches
        rows = [[f"{s}F{j}" for j in range(m)] + [f"{s}B{j}" for j in reversed(range(m))]
                + [f"{s}U0"] for s in range(stages)]
        return Schedule("reverse-gpipe", stages, stages, m, 1, 1, rows)

    try:
        assert names()[-1] == "reverse-gpipe" and options_of("Reverse-GPipe") == ("order",)
        assert "reverse-gpipe" in DECOUPLED
        tl = simulate(build("reverse-gpipe", stages=2, microbatches=3, order=1))
        assert tl.makespan > 0
        with pytest.raises(ScheduleError, match="takes no option k; its options: order"):
            build("reverse-gpipe", stages=2, microbatches=3, k=2)
        with pytest.raises(ScheduleError, match="already registered"):
            register_schedule("reverse-gpipe")(reverse_gpipe)
    finally:
        unregister_schedule("reverse-gpipe")
    assert "reverse-gpipe" not in names() and "reverse-gpipe" not in DECOUPLED
