"""``brigade race``: methods one after another for the same training time; who gets there first."""

from __future__ import annotations

import argparse
import shutil

from rich.console import Console
from rich.table import Table

from . import UsageError, int_list, output

NAME = "race"
HELP = ("Race learning rules on one model, data set and split for the same wall-clock "
        "budget; print time to a target accuracy, draw accuracy against seconds.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``brigade race`` (README: "Racing the methods")."""
    from brigade.engine.race import DEFAULT_METHODS

    default = ",".join(DEFAULT_METHODS)
    p.add_argument("--methods", default=default,
                   help=f"comma-separated methods, run one after another; the first is the "
                        f"reference the others' times are compared with (default {default})")
    p.add_argument("--model", default="mlp")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--data", default="synthetic")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--balance", default=None, help="blocks per stage for every method")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--budget-s", type=float, default=None, metavar="SECONDS",
                   help="training seconds each method gets (evaluation not charged)")
    p.add_argument("--epochs", type=int, default=None, help="or: epochs each method gets")
    p.add_argument("--eval-every-s", type=float, default=None, metavar="SECONDS",
                   help="training seconds between evaluations (default budget/20; with "
                        "--epochs: once per epoch)")
    p.add_argument("--eval-size", type=int, default=2000,
                   help="test examples per curve point (the final accuracy uses all)")
    p.add_argument("--target", type=float, default=None, help="accuracy to time, e.g. 0.95")
    p.add_argument("--lrs", default=None,
                   help="learning-rate grid run for every method, e.g. 0.01,0.03,0.1; each "
                        "method is reported at its best (default: each method's own rate)")
    p.add_argument("--optimizer", default=None,
                   help="one optimizer for every method (default: each method's own)")
    p.add_argument("--backend", default="local", choices=["local", "ray"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="accuracy against training seconds, one line per method (PNG/SVG)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="write scalars for TensorBoard, one run per method and rate")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _floats(flag: str, text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r} must be comma-separated numbers, e.g. 0.01,0.03,0.1") from None
    if not values:
        raise UsageError(f"{flag} {text!r} names no value, e.g. 0.01,0.03,0.1")
    return values


def config_from_args(args: argparse.Namespace):
    """Parsed flags -> RaceConfig (every lane's TrainConfig is checked here)."""
    from brigade.engine.race import RaceConfig

    if args.plot and not args.plot.lower().endswith((".png", ".svg")):
        raise UsageError(f"--plot {args.plot!r} must end in .png or .svg")
    if args.tensorboard:
        from brigade.engine.tensorboard import check_available

        check_available()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return RaceConfig(
        methods=methods, model=args.model, width=args.width, data=args.data,
        data_dir=args.data_dir, stages=args.stages,
        balance=None if args.balance is None else int_list("--balance", args.balance, "1,2"),
        microbatches=args.microbatches, batch_size=args.batch_size, budget_s=args.budget_s,
        epochs=args.epochs, eval_every_s=args.eval_every_s, eval_size=args.eval_size,
        target=args.target, lrs=_floats("--lrs", args.lrs), optimizer=args.optimizer,
        backend=args.backend, seed=args.seed, tensorboard=args.tensorboard,
    )


def run(args: argparse.Namespace) -> int:
    from brigade.engine.race import plot_race, run_race

    rc = config_from_args(args).validate()  # bad input fails here, before data or processes
    err = Console(stderr=True)
    with output.progress_bar(err, "racing", disable=args.quiet) as update:
        result = run_race(rc, progress=update)
    # nine columns: never narrower than 120 (a pipe or log file would get 80 and cut names)
    print_table(result, Console(width=max(120, shutil.get_terminal_size((120, 24)).columns)))
    if args.json:
        output.write_json(args.json, result)
    if args.plot:
        plot_race(result, args.plot)
    return 0


def _s(v: float | None) -> str:
    return "never" if v is None else f"{v:.1f}"


def _final(lane: dict) -> str:
    """The final accuracy, or the step where the lane's loss became nan/inf."""
    step = lane.get("diverged_at_step")
    return f"diverged at step {step}" if step is not None else f"{lane['final_test_accuracy']:.4f}"


def print_table(result: dict, console: Console) -> None:
    """One row per method at its best rate; the grid's other rates below when there is one."""
    cfg = result["config"]
    budget = f"{cfg['budget_s']:g} s" if cfg["budget_s"] else f"{cfg['epochs']} epochs"
    table = Table(title=f"race: {cfg['model']} on {cfg['data']}, {cfg['stages']} stages, "
                        f"m={cfg['microbatches']}, {budget} each, backend {cfg['backend']}")
    target = cfg["target"]
    cols = ("method", "optim", "lr", f"s to {target:g}" if target else "s to target",
            "final acc", "samples/s", "updates", "idle/stage")
    for c in cols:
        table.add_column(c, justify="left" if c in ("method", "optim") else "right")
    for name, r in result["methods"].items():
        table.add_row(name, r["optimizer"], f"{r['lr']:g}", _s(r["time_to_target_s"]),
                      _final(r), f"{r['samples_per_s']:.0f}",
                      ",".join(map(str, r["updates"])),
                      ",".join(f"{100 * f:.0f}%" for f in r["idle_fraction"]))
    console.print(table)
    if len(result["lanes"]) > len(result["methods"]):
        grid = Table(title="every rate of the grid")
        for c in ("method", "lr", "s to target", "final acc"):
            grid.add_column(c, justify="right")
        for r in result["lanes"]:
            grid.add_row(r["method"], f"{r['lr']:g}", _s(r["time_to_target_s"]), _final(r))
        console.print(grid)
    ref_name = cfg["methods"][0]  # the reference: the first of --methods
    ref = result["methods"][ref_name]
    if target and ref["time_to_target_s"]:
        for name, r in result["methods"].items():
            if name != ref_name and r["time_to_target_s"]:
                ratio = r["time_to_target_s"] / ref["time_to_target_s"]
                console.print(f"{name}: {ratio:.2f}x {ref_name}'s time to {target:g}")
