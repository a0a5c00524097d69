"""Reports: predictions beside measurements, the target checks, terminal tables, markdown
and the Gantt picture."""

from __future__ import annotations

import os
from pathlib import Path

from brigade import schedulers
from brigade.schedulers import Timeline

from .config import (
    BenchConfig, _PREDICT_TOLERANCE, _RATIO_SCHEDULES, _RATIO_TARGET, _SPEEDUP_TARGET,
)

__all__ = [
    "MEASURED_COLUMNS", "SIM_COLUMNS", "add_predictions", "measured_table_rows", "print_report",
    "sim_table_rows", "target_checks", "write_gantt", "write_markdown",
]


# -- reports -----------------------------------------------------------------------------------------
def add_predictions(rows: list[dict]) -> None:
    """Give each measured brigade row its simulated twin's throughput and the error."""
    sims = {(r["model"], r["shape"], r["stages"], r["schedule"]): r
            for r in rows if r["runner"] == "simulated" and r.get("samples_per_s")}
    for r in rows:
        if r["runner"] != "brigade":
            continue
        sim = sims.get((r["model"], r["shape"], r["stages"], r["schedule"]))
        if sim:
            r["predicted_samples_per_s"] = sim["samples_per_s"]
            r["predicted_over_measured"] = sim["samples_per_s"] / r["samples_per_s"]
            r["predicted_bubble_fraction"] = sim["bubble_fraction"]
            r["predicted_busy_per_step_s"] = sim["busy_per_step_s"]


def target_checks(rows: list[dict]) -> list[dict]:
    """The three targets, one line per measured brigade row and target, met or not."""
    checks = []
    for r in rows:
        if r["runner"] != "brigade":
            continue
        name = f"{r['model']} {r['schedule']} (brigade on {r['backend']})"
        if r["schedule"] in _RATIO_SCHEDULES and r.get("ratio_vs_torch"):
            checks.append({"check": f"{name} / torch step time", "value": r["ratio_vs_torch"],
                           "target": f"<= {_RATIO_TARGET}",
                           "met": r["ratio_vs_torch"] <= _RATIO_TARGET})
        if r["schedule"] in schedulers.DECOUPLED and r.get("torch_step_time_s"):
            speedup = r["torch_step_time_s"] / r["step_time_s"]
            m, p = r["microbatches"], r["stages"]
            checks.append({"check": f"{name} / torch 1f1b throughput",
                           "value": speedup, "target": f">= {_SPEEDUP_TARGET}x",
                           "met": speedup >= _SPEEDUP_TARGET,
                           "note": f"no flush gains at most (m+p-1)/m = {(m + p - 1) / m:.3f}x "
                                   f"at p={p}, m={m} on balanced stages"})
        source = next((k for k in ("in_place", "predicted") if r.get(f"{k}_over_measured")), None)
        if source:  # the in-place profile's prediction where the row has one
            ratio = r[f"{source}_over_measured"]
            checks.append({"check": f"{name} simulated ({_PROFILE_LABEL[source]} profile) / "
                                    "measured throughput",
                           "value": ratio, "target": f"within {_PREDICT_TOLERANCE:.0%}",
                           "met": abs(ratio - 1) <= _PREDICT_TOLERANCE})
    return checks


_PROFILE_LABEL = {"in_place": "in-place", "predicted": "isolated"}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def measured_table_rows(rows: list[dict]) -> list[list[str]]:
    """Measured brigade rows beside torch and the simulator, as text cells."""
    out = []
    for r in rows:
        if r["runner"] != "brigade":
            continue
        out.append([r["model"], r["schedule"], r["backend"], _ms(r["step_time_s"]),
                    f"{r['samples_per_s']:.1f}", _pct(r["bubble_fraction"]),
                    f"{r.get('torch_schedule', '-')}",
                    _ms(r.get("torch_step_time_s")),
                    f"{r['ratio_vs_torch']:.2f} ({r['min_ratio_vs_torch']:.2f})"
                    if r.get("ratio_vs_torch") else "-",
                    _ratio_cells(r, "in_place"), _ratio_cells(r, "predicted"),
                    f"{r['calibrated_samples_per_s']:.1f}" if r.get("calibrated_samples_per_s") else "-",
                    _busy_cell(r)])
    return out


MEASURED_COLUMNS = ["model", "schedule", "brigade backend", "brigade step ms",
                    "brigade samples/s", "brigade bubble", "torch schedule", "torch step ms", "brigade/torch step (of fastest steps)",
                    "simulated samples/s, in-place profile (/measured)",
                    "simulated samples/s, isolated profile (/measured)", "calibrated samples/s",
                    "compute ms/step per worker, measured (simulated)"]


def _ratio_cells(r: dict, source: str) -> str:
    """A prediction's samples/s and (its ratio to the measured), or "-"."""
    if not r.get(f"{source}_samples_per_s"):
        return "-"
    return f"{r[f'{source}_samples_per_s']:.1f} ({r[f'{source}_over_measured']:.2f})"


def _busy_cell(r: dict) -> str:
    """Per worker: compute milliseconds per step measured, and (simulated)."""
    meas, sim = r.get("busy_per_step_s", []), r.get("predicted_busy_per_step_s", [])
    return " ".join(f"{1e3 * m:.0f}" + (f" ({1e3 * sim[w]:.0f})" if w < len(sim) else "")
                    for w, m in enumerate(meas))
SIM_COLUMNS = ["model", "shape", "stages", "schedule", "step ms", "samples/s", "bubble",
               "idle per worker", "peak act. MiB", "balance", "costs"]


def sim_table_rows(rows: list[dict]) -> list[list[str]]:
    """Simulated (and torch) rows as text cells."""
    out = []
    for r in rows:
        if r["runner"] == "brigade":
            continue
        if r.get("skipped"):
            out.append([r["model"], r["shape"], str(r["stages"]), r["schedule"],
                        "-", "-", "-", f"skipped: {r['skipped']}", "-", "-", "-"])
            continue
        idle = " ".join(f"{100 * x:.0f}" for x in r.get("idle_per_stage", []))
        label = r["schedule"] + ("" if r["runner"] == "simulated" else f" ({r['runner']}, measured)")
        out.append([r["model"], r["shape"], str(r["stages"]), label, _ms(r["step_time_s"]),
                    f"{r['samples_per_s']:.1f}", _pct(r["bubble_fraction"]), idle,
                    _mib(r.get("peak_activation_bytes")),
                    str(r.get("balance", "-")).replace(" ", ""), r.get("costs", r["runner"])])
    return out


def print_report(console, cfg: BenchConfig, rows: list[dict], checks: list[dict]) -> None:
    """Rich tables: simulated splits, then measured side by side, then the targets."""
    from rich.table import Table

    t = Table(title=f"simulated splits (width {cfg.width}, batch {cfg.batch_size}, "
                    f"m={cfg.microbatches}, 1 thread per stage; idle % per worker)",
              title_justify="left")
    for col in SIM_COLUMNS:
        t.add_column(col, justify="left" if col in ("model", "schedule", "costs", "balance") else "right")
    for cells in sim_table_rows(rows):
        t.add_row(*cells)
    console.print(t)
    measured = measured_table_rows(rows)
    if measured:
        m = Table(title=f"measured: {cfg.measure_stages} stages, {cfg.measure_shape}, median of "
                        f"timed steps; brigade (Ray actors or torchrun ranks, 2 x 1 thread) and "
                        f"torch.distributed.pipelining (torchrun gloo, 2 x 1 thread) in rotation",
                  title_justify="left")
        for col in MEASURED_COLUMNS:
            m.add_column(col, justify="left" if col in ("model", "schedule", "brigade backend",
                                                        "torch schedule") else "right")
        for cells in measured:
            m.add_row(*cells)
        console.print(m)
    loads = [x for r in rows for x in r.get("load_avg_1min", [])]
    if loads:
        console.print(f"1-minute load average during the measurements: {min(loads):.1f}-"
                      f"{max(loads):.1f} on {os.cpu_count()} cores (above ~2, other processes "
                      "shared the cores and the timings carry their noise)")
    for c in checks:
        mark = "[green]met[/]" if c["met"] else "[red]not met[/]"
        note = f"; {c['note']}" if c.get("note") else ""
        console.print(f"{c['check']}: {c['value']:.2f} (target {c['target']}) {mark}{note}")


def write_markdown(path: Path, cfg: BenchConfig, rows: list[dict], checks: list[dict],
                   wall_s: float) -> None:
    """The measured and simulated tables and the targets, as GitHub markdown."""
    def table(cols: list[str], body: list[list[str]]) -> list[str]:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        return lines + ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in body]

    loads = [x for r in rows for x in r.get("load_avg_1min", [])]
    load = (f" 1-minute load average during the measurements: {min(loads):.1f}-{max(loads):.1f} "
            f"on {os.cpu_count()} cores." if loads else "")
    out = ["# ResNet stage splits: brigade vs torch.distributed.pipelining",
           "", f"width {cfg.width}, batch {cfg.batch_size}, {cfg.microbatches} microbatches, "
               f"one CPU thread per stage; run took {wall_s:.0f} s.{load}"
               + (f" Worker environment: {' '.join(cfg.worker_env)}." if cfg.worker_env else ""),
           ""]
    measured = measured_table_rows(rows)
    if measured:
        out += [f"## Measured ({cfg.measure_stages} stages, {cfg.measure_shape}, median of timed "
                "steps, runners in rotation)", ""] + table(MEASURED_COLUMNS, measured) + [""]
    if checks:
        out += ["## Targets", ""] + [
            f"- {c['check']}: {c['value']:.2f} (target {c['target']}): "
            f"{'met' if c['met'] else 'NOT met'}" + (f" ({c['note']})" if c.get("note") else "")
            for c in checks] + [""]
    out += ["## Simulated (and torch measured)", ""] + table(SIM_COLUMNS, sim_table_rows(rows))
    path.write_text("\n".join(out) + "\n")


def write_gantt(path: Path, cfg: BenchConfig, measured: dict[tuple[str, str, str], Timeline],
                simulated: dict[tuple[str, str], Timeline]) -> Path:
    """Measured rounds (brigade, and torch's) beside brigade's simulation of the same steps,
    or, with nothing measured, the simulated schedules; one time axis in seconds."""
    panels: dict[str, Timeline] = {}
    for (model, runner, schedule), tl in measured.items():
        tl.meta["time_unit"] = "s"
        panels[f"{model} {schedule}: {runner}, measured"] = tl
        if runner.startswith("brigade") and (model, schedule) in simulated:
            panels[f"{model} {schedule}: brigade, simulated"] = simulated[(model, schedule)]
    if panels:
        title = (f"measured rounds of {cfg.window} steps and brigade's simulation of them "
                 f"({cfg.measure_stages} stages, {cfg.measure_shape}, width {cfg.width}, "
                 f"m={cfg.microbatches}, batch {cfg.batch_size})")
    else:
        panels = {f"{m} {s}: simulated": tl for (m, s), tl in simulated.items()}
        title = f"simulated schedules (width {cfg.width}, m={cfg.microbatches})"
    return schedulers.plot_gantt(panels, path, title=title, dpi=150 if len(panels) <= 12 else 80)
