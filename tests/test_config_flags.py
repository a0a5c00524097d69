"""One mapping from typed configs to flags, config files and the --json report, and back.

The flags of ``brigade train`` are derived from the dataclasses (a new field is a new
flag); a TOML file's top-level keys are the flags' names, sections beside them; flags on
the command line override the file; the report's ``config`` fed back gives the same
TrainConfig; a bad key or value exits 2 with one line; every --help shows defaults.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import pytest

from brigade.engine import Pipeline, PipelineConfigError
from brigade.engine.cli import build_parser, main
from brigade.engine.cli import train_cmd
from brigade.engine.config import ClusterConfig, PipelineConfig
from brigade.engine.flags import (add_dataclass_flags, dataclass_from_args, flat_dict, leaves,
                                  to_toml)
from brigade.engine.optim import OptimConfig
from brigade.engine.train import TrainConfig

SMALL = ["--model", "mlp", "--width", "16", "--data", "synthetic", "--backend", "local",
         "--batch-size", "32", "--steps", "2", "--quiet"]


def parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    return train_cmd.config_from_args(parser.parse_args(argv))


# -- flags derived from fields ---------------------------------------------------------------

def test_a_new_field_is_a_new_flag_with_its_type_default_help_and_choices(capsys):
    @dataclass
    class Knobs:
        """Knobs of a test."""

        depth: int = field(default=3, metadata={"help": "how deep"})
        rate: float | None = field(default=None, metadata={"help": "how fast"})
        mode: str = field(default="a", metadata={"help": "which", "choices": ("a", "b")})
        fast: bool = field(default=False, metadata={"help": "hurry"})

    parser = argparse.ArgumentParser(prog="t")
    add_dataclass_flags(parser, Knobs, prefix="k")
    text = parser.format_help()
    assert "--k-depth" in text and "how deep (default: 3)" in text
    assert "--k-mode {a,b}" in text and "--k-fast, --no-k-fast" in text
    got = dataclass_from_args(Knobs, parser.parse_args(["--k-depth", "5", "--k-rate", "0.5",
                                                        "--k-fast"]), prefix="k")
    assert got == Knobs(depth=5, rate=0.5, mode="a", fast=True)
    assert dataclass_from_args(Knobs, parser.parse_args([]), prefix="k") == Knobs()
    with pytest.raises(PipelineConfigError, match="--k-depth 'x' must be an integer"):
        dataclass_from_args(Knobs, parser.parse_args(["--k-depth", "x"]), prefix="k")


def test_every_config_key_is_a_train_flag_and_the_keys_are_unique():
    parser, _ = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    keys = leaves(TrainConfig)
    for leaf in keys.values():
        assert leaf.flag in flags, leaf.flag
    # the method flags of today, now from the rules' options dataclasses
    for flag in ("--sg-lr", "--sg-hidden-layers", "--update-prob", "--stale-k", "--accumulate",
                 "--guess", "--projections", "--placement-timeout", "--lr-schedule",
                 "--weight-decay", "--clip-grad-norm", "--autocast", "--warmup-steps"):
        assert flag in flags, flag
    assert len({leaf.flag for leaf in keys.values()}) == len(keys)


def test_flags_reach_the_nested_configs():
    cfg = parse(SMALL + ["--lr", "0.2", "--placement-timeout", "7", "--method", "stale",
                         "--stale-k", "2", "--balance", "1,2", "--transport", "gloo"])
    assert isinstance(cfg.pipeline, PipelineConfig) and isinstance(cfg.optim, OptimConfig)
    assert isinstance(cfg.pipeline.cluster, ClusterConfig)
    assert cfg.optim.lr == 0.2 and cfg.pipeline.cluster.placement_timeout_s == 7.0
    assert cfg.pipeline.schedule_options == {"k": 2} and cfg.pipeline.schedule == "stale"
    assert cfg.pipeline.balance == [1, 2] and cfg.pipeline.num_workers == 2
    assert cfg.pipeline.cluster.transport == "gloo"
    assert cfg.lr == 0.2 and cfg.microbatches == 4  # flat reads of nested keys


def test_python_keywords_take_nested_keys_and_objects():
    a = TrainConfig(method="dni", lr=0.1, address="auto", sg_lr=0.01, backend="local")
    b = TrainConfig(pipeline=PipelineConfig(method="dni", backend="local",
                                            cluster=ClusterConfig(address="auto")),
                    optim=OptimConfig(lr=0.1), options={"sg_lr": 0.01})
    assert a == b
    assert a.pipeline.options == {"sg_lr": 0.01} and a.optim.optimizer == "sgd"
    with pytest.raises(PipelineConfigError, match="unknown config key 'lrr'; valid keys: "):
        TrainConfig(lrr=0.1)


def test_pipeline_takes_one_config_object_or_the_keywords():
    from torch import nn

    def net():
        return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))

    cfg = PipelineConfig(stages=2, microbatches=2, backend="local", placement_timeout_s=5)
    with Pipeline(net(), config=cfg) as a, \
            Pipeline(net(), stages=2, microbatches=2, backend="local",
                     placement_timeout_s=5) as b:
        assert a.config == b.config == cfg
        assert a.config.cluster.placement_timeout_s == 5
    with pytest.raises(PipelineConfigError, match="either as config= or as keywords"):
        Pipeline(net(), microbatches=8, config=cfg)


# -- config files ------------------------------------------------------------------------------

def test_toml_top_level_keys_sections_and_flags_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "mlp"\nsteps = 3\nbatch-size = 16\nbackend = "local"\n'
                    '[optim]\nlr = 0.3\nlr_schedule = "cosine"\n'
                    '[cluster]\nplacement = "spread"\n')
    cfg = parse(["--config", str(path)])
    assert (cfg.steps, cfg.batch_size, cfg.optim.lr, cfg.optim.lr_schedule) == (3, 16, 0.3, "cosine")
    assert cfg.pipeline.cluster.placement == "spread"
    over = parse(["--config", str(path), "--steps", "5", "--lr", "0.1"])
    assert (over.steps, over.optim.lr, over.batch_size) == (5, 0.1, 16)  # flag > file > default


def test_json_report_config_fed_back_gives_the_same_train_config(tmp_path):
    out = tmp_path / "o.json"
    argv = SMALL + ["--lr-schedule", "cosine", "--warmup-steps", "1", "--weight-decay",
                    "0.01", "--balance", "1,2", "--json", str(out)]
    assert main(["train", *argv]) == 0
    want = parse(argv)
    report = json.loads(out.read_text())
    assert report["config"] == flat_dict(want)
    assert parse(["--config", str(out)]) == want  # the report itself, read as JSON
    toml = tmp_path / "again.toml"
    toml.write_text(to_toml(report["config"]))
    assert parse(["--config", str(toml)]) == want


def test_rule_options_round_trip_through_toml(tmp_path):
    want = parse(SMALL + ["--method", "dni", "--sg-lr", "0.002", "--update-prob", "0.5"])
    toml = tmp_path / "dni.toml"
    toml.write_text(to_toml(flat_dict(want)))
    assert "sg_lr = 0.002" in toml.read_text()
    assert parse(["--config", str(toml)]) == want


@pytest.mark.parametrize("text,message", [
    ("stepz = 3\n", "unknown config key 'stepz'; valid keys: "),
    ("steps = \"x\"\n", "steps 'x' must be an integer"),
    ("[optim]\nsteps = 3\n", "optim.steps is not a key of section [optim]; its keys: "),
    ("[optimizer]\nlr = 1\n", "optimizer {'lr': 1} must be a string"),
    ("lr = -1.0\n", "--lr -1.0 must be a positive number"),
    ("balance = [1, \"a\"]\n", "balance [1, 'a'] must be comma-separated integers"),
    ("steps = [\n", "is not TOML"),
])
def test_bad_config_files_exit_2_with_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["train", *SMALL, "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1, err


def test_unknown_key_names_the_valid_ones(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("stepz = 3\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "steps" in err and "lr_schedule" in err and "[optim]" in err


def test_bad_flag_values_exit_2_with_one_line(capsys):
    for argv, message in ((["--steps", "x"], "--steps 'x' must be an integer"),
                          (["--lr", "fast"], "--lr 'fast' must be a number"),
                          (["--lr-schedule", "linear"],
                           "unknown lr schedule 'linear'; valid lr schedules: constant, cosine, step"),
                          (["--autocast", "fp8"], "unknown autocast dtype 'fp8'"),
                          (["--config", "/nonexistent.toml"], "does not exist")):
        assert main(["train", *SMALL, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err, err
        assert len(err.splitlines()) == 1, err


# -- --version and --help ----------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("brigade 0.") and "torch" in out


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_help_shows_the_defaults():
    parser, _ = build_parser()
    checked = 0
    for p in _parsers(parser):
        text = p.format_help()
        for action in p._actions:
            if (not action.option_strings or action.nargs == 0
                    or action.default is argparse.SUPPRESS and not action.help):
                continue
            if action.help is argparse.SUPPRESS:
                continue
            start = text.index("\n  " + action.option_strings[0], text.index("\n\n"))
            # the help of this option, up to the next option
            chunk = text[start + 3:].split("\n  -", 1)[0]
            line = action.option_strings[-1]
            assert "(default:" in chunk, (p.prog, line, chunk)
            checked += 1
    assert checked > 80
    train = next(p for p in _parsers(parser) if p.prog.endswith("train"))
    assert "--lr-schedule {constant,cosine,step}" in train.format_help()


def test_the_readme_flags_table_is_the_generated_one():
    from pathlib import Path

    from brigade.engine.flags import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("<!-- flags table: generated -->\n", 1)[1].split("<!-- end", 1)[0]
    assert table == markdown_table(TrainConfig)
