"""``brigade methods``: every registered learning rule, what it sends, what each stage sees.

Read off the rules' declarations (``brigade.stages.rules``): schedules (the default first),
the default optimizer, what crosses the wire per microbatch each way (kind, and size for a
boundary activation of ``--shape``), and the exposure table: for each stage of a
``--stages``-stage pipeline, whether it ever receives the raw inputs, the labels, or true
gradients (the stages with none of the three could train on resources that never see the
data). ``--import`` loads a user's own rules first (a module name or a ``.py`` path).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from . import UsageError, int_list, output

NAME = "methods"
HELP = ("List the learning rules: schedules, default optimizer, messages per microbatch each "
        "way, and which stages see inputs, labels or true gradients.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", type=int, default=4, help="pipeline depth of the exposure table "
                                                         "(default 4)")
    p.add_argument("--shape", default="16,1024",
                   help="boundary activation shape B,F... for message sizes (default 16,1024: "
                        "a 16-sample microbatch of 1024 features)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module (name or .py path) that registers rules; repeatable")
    p.add_argument("--json", default=None, metavar="PATH", help="write the table as JSON")


def describe(stages: int, shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """Every registered rule as a JSON-able record (what ``--json`` writes)."""
    from brigade.stages.rules import get_method, method_names

    out = []
    for name in method_names():
        rule = get_method(name)
        options = rule.make_options()
        out.append({
            "name": rule.name,
            "schedules": list(rule.schedules),
            "default_schedule": rule.default_schedule,
            "default_optimizer": {"name": rule.default_optimizer[0],
                                  "lr": rule.default_optimizer[1],
                                  "lr_schedule": rule.default_lr_schedule},
            "forward": [_message(m, shape, options) for m in rule.forward],
            "backward": [_message(m, shape, options) for m in rule.backward],
            "exposure": [{"stage": s, **dataclasses.asdict(rule.exposure(s, stages, options))}
                         for s in range(stages)],
            "options": [{"name": f.name, "default": _jsonable(f.default),
                         "flag": f.metadata.get("flag"), "help": f.metadata.get("help", "")}
                        for f in dataclasses.fields(rule.options)],
            "summary": rule.summary,
            "reference": rule.reference,
            "module": rule.stage_class.__module__,
        })
    return out


def _message(m, shape: tuple[int, ...], options: Any) -> dict[str, Any]:
    return {"what": m.what, "formula": m.formula, "elements": m.numel(shape, options)}


def _jsonable(value: Any) -> Any:
    if value is dataclasses.MISSING:
        return None
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def _wire(messages: list[dict[str, Any]]) -> str:
    if not messages:
        return "nothing"
    return "; ".join(f"{m['what']} [{m['formula']}"
                     + (f" = {m['elements']:,}" if m["elements"] is not None else "")
                     + "]" for m in messages)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from brigade.stages.rules import load_rules

    if args.stages < 1:
        raise UsageError(f"--stages {args.stages} must be >= 1")
    shape = tuple(int_list("--shape", args.shape, "16,1024"))
    if not shape or min(shape) < 1:
        raise UsageError(f"--shape {args.shape!r} must be positive sizes B,F..., e.g. 16,1024")
    for ref in args.imports:
        load_rules(ref)
    rules = describe(args.stages, shape)
    console = Console()
    table = Table(title=f"learning rules (message sizes in numbers, boundary shape "
                        f"{'x'.join(map(str, shape))})")
    for col in ("method", "schedules", "default optimizer", "forward per microbatch",
                "backward per microbatch"):
        table.add_column(col)
    for r in rules:
        opt = r["default_optimizer"]
        table.add_row(r["name"], ", ".join(r["schedules"]),
                      f"{opt['name']}" + (f" lr {opt['lr']:g}" if opt["lr"] else "")
                      + ("" if opt["lr_schedule"] == "constant" else f", {opt['lr_schedule']}"),
                      _wire(r["forward"]), _wire(r["backward"]))
    console.print(table)
    exposure = Table(title=f"what each stage receives, {args.stages}-stage pipeline "
                           "(I inputs, L labels, G true gradients; - none of them)")
    exposure.add_column("method")
    for s in range(args.stages):
        exposure.add_column(f"stage {s}", justify="center")
    for r in rules:
        cells = ["".join(c for c, on in (("I", e["inputs"]), ("L", e["labels"]),
                                          ("G", e["true_gradients"])) if on) or "-"
                 for e in r["exposure"]]
        exposure.add_row(r["name"], *cells)
    console.print(exposure)
    if args.json:
        output.write_json(args.json, {"stages": args.stages, "shape": list(shape),
                                      "methods": rules})
    return 0
