"""Exact schedules for small cases, written as the staircases they draw (unit-time slots)."""

from __future__ import annotations

import textwrap

import pytest

from brigade.schedulers import Action, build, lower, names, unlower, validate


def grid(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


GRIDS = {
    ("gpipe", 3, 4, 1, 1): """
        w0 | 0F0 0F1 0F2 0F3                 0B0 0B1 0B2 0B3 0U0
        w1 |     1F0 1F1 1F2 1F3         1B0 1B1 1B2 1B3 1U0
        w2 |         2F0 2F1 2F2 2F3 2B0 2B1 2B2 2B3 2U0
        """,
    ("1f1b", 3, 4, 1, 1): """
        w0 | 0F0 0F1 0F2         0B0 0F3 0B1     0B2     0B3 0U0
        w1 |     1F0 1F1     1B0 1F2 1B1 1F3 1B2     1B3 1U0
        w2 |         2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3 2U0
        """,
    # worker w holds stages w and w+2; warm-up (v-1)*p + 2*(p-1-w) forwards
    ("interleaved", 2, 4, 2, 1): """
        w0 | 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1     2B2     2B3 0B2 0B3 0U0 2U0
        w1 |     1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3 1U0 3U0
        """,
    # stage s defers s weight-gradients (W) to the drain
    ("zb1p", 3, 4, 1, 1): """
        w0 | 0F0 0F1 0F2         0I0 0W0 0F3 0I1 0W1 0I2 0W2 0I3 0W3 0U0
        w1 |     1F0 1F1     1I0 1F2 1I1 1W0 1F3 1I2 1W1 1I3 1W2 1W3 1U0
        w2 |         2F0 2I0 2F1 2I1 2F2 2I2 2W0 2F3 2I3 2W1 2W2 2W3 2U0
        """,
    # two flushed steps: microbatch indices are global, U carries the step
    ("gpipe", 2, 2, 1, 2): """
        w0 | 0F0 0F1         0B0 0B1 0U0 0F2 0F3         0B2 0B3 0U1
        w1 |     1F0 1F1 1B0 1B1 1U0         1F2 1F3 1B2 1B3 1U1
        """,
    # no flush: step 1's forwards run while step 0's backwards drain
    ("petra", 3, 2, 1, 2): """
        w0 | 0F0 0F1 0F2 0F3     0R0     0R1 0U0     0R2     0R3 0U1
        w1 |     1F0 1F1 1F2 1R0 1F3 1R1 1U0     1R2     1R3 1U1
        w2 |         2F0 2R0 2F1 2R1 2U0 2F2 2R2 2F3 2R3 2U1
        """,
    ("dni", 3, 3, 1, 1): """
        w0 | 0S0 0S1 0T0 0S2 0T1 0T2
        w1 |     1S0 1S1 1T0 1S2 1T1 1T2
        w2 |         2S0 2S1     2S2
        """,
}


@pytest.mark.parametrize("key", list(GRIDS), ids=lambda k: "-".join(map(str, k)))
def test_exact_staircase(key):
    name, p, m, v, steps = key
    assert build(name, p, m, virtual=v, steps=steps).grid() == grid(GRIDS[key])


def test_stale_backprops_every_kth_step_and_reuses_the_gradient_between():
    s = build("stale", 2, 2, steps=3, k=2)
    assert s.grid() == grid("""
        w0 | 0F0 0F1         0B0 0B1 0U0 0F2 0F3 0U1 0F4 0F5         0B4 0B5 0U2
        w1 |     1F0 1F1 1B0 1B1 1U0         1F2 1F3 1U1 1F4 1F5 1B4 1B5 1U2
        """)


def test_wrapped_grid_splits_into_blocks():
    text = build("gpipe", 2, 4).grid(width=30)
    assert text.startswith("slots 0-5:") and "slots 6-" in text
    assert all(len(line) <= 30 for line in text.splitlines())


SIZES = [(p, m) for p in (1, 2, 3, 4, 5) for m in (1, 2, 3, 4, 5, 6, 8, 10, 12)]


@pytest.mark.parametrize("name", names())
def test_every_generated_schedule_validates(name):
    """A table of sizes: each either builds (and validates) or says what would work."""
    built = 0
    for p, m in SIZES:
        for steps in (1, 2):
            v = 2 if name == "interleaved" else 1
            try:
                s = build(name, p, m, virtual=v, steps=steps)
            except ValueError as err:
                assert "use" in str(err)
                continue
            built += 1
            assert s.total_microbatches == m * steps
            validate(lower(s))
            assert unlower(lower(s)) == s
    assert built > 20


def test_lowering_inserts_sends_and_receives():
    s = lower(build("gpipe", 2, 1))
    assert [str(a) for a in s.workers[0]] == ["0F0", "0SF0", "0RB0", "0B0", "0U0"]
    assert [str(a) for a in s.workers[1]] == ["1RF0", "1F0", "1B0", "1SB0", "1U0"]
    assert Action.parse("1SB0") in s.workers[1]
