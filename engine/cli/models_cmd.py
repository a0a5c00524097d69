"""``brigade models``: the built-in models with their block and parameter counts.

Block counts bound how many pipeline stages a model can be cut into; ``--data`` shapes
every model for a data set's images and classes, as ``brigade train`` would build it.
Models are built on the meta device, so listing even the full-width ones is instant.
"""

from __future__ import annotations

import argparse
import json

__all__ = ["NAME", "HELP", "add_arguments", "run"]

NAME = "models"
HELP = "List the built-in models with their block counts and parameter counts."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that shape the models the way ``brigade train`` would."""
    parser.add_argument("--width", type=int, default=None,
                        help="base channels (resnets, revnets, cnn) or hidden units (mlp); default per model")
    parser.add_argument("--data", default=None,
                        help="shape the models for this data set (synthetic, mnist, cifar10, digits)")
    parser.add_argument("--stem", default=None, help="cifar | imagenet (resnets and revnets)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON")


def _rows(args: argparse.Namespace) -> list[dict]:
    """One row per model; a model the options do not fit gets its error as a note."""
    from brigade.stages.errors import ConfigError
    from brigade.stages.models import model_info, model_names, model_options, shape_kwargs

    shape = {}
    if args.data is not None:
        from brigade.stages.data import dataset_spec

        shape = shape_kwargs(*dataset_spec(args.data))
    rows = []
    for name in model_names():
        accepted = model_options(name)
        kwargs = {k: v for k, v in {**shape, "width": args.width, "stem": args.stem}.items() if k in accepted}
        try:
            info = model_info(name, **kwargs)
        except ConfigError as err:
            rows.append({"model": name, "error": str(err)})
            continue
        rows.append({
            "model": info.name,
            "blocks": info.blocks,
            "reversible_blocks": info.reversible_blocks,
            "params": info.params,
            "input_shape": list(info.input_shape),
            "num_classes": info.num_classes,
            "width": info.width,
            "stem": info.stem,
        })
    return rows


def run(args: argparse.Namespace) -> int:
    """Print the table (and write JSON when asked)."""
    from rich.console import Console
    from rich.table import Table

    rows = _rows(args)
    table = Table(title="brigade models" + (f" for {args.data}" if args.data else ""))
    for col in ("model", "blocks", "reversible", "parameters", "width", "input", "classes"):
        table.add_column(col, justify="left" if col in ("model", "input") else "right")
    notes = []
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], "-", "-", "-", "-", "-", "-")
            notes.append(r["error"])
            continue
        table.add_row(
            r["model"], str(r["blocks"]), str(r["reversible_blocks"]), f"{r['params']:,}",
            str(r["width"]), "x".join(map(str, r["input_shape"])), str(r["num_classes"]),
        )
    console = Console()
    console.print(table)
    for note in notes:
        console.print(f"[red]{note}[/red]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"models": rows}, f, indent=2)
    return 0
