"""A run from a command line: the arguments of `distrain train` and `distrain tune`, and the config they give.

Usage:
    parser = argparse.ArgumentParser(prog="distrain train")
    add_run_arguments(parser, "train")          # --config, --set (repeatable), --restart, -v/--verbose
    args = parser.parse_args(["--config", "configs/x.yaml", "--set", "optim.lr=3e-4"])
    cfg = config_from_args(args)

The same definitions serve the command line (distrain/cli/) and `distrain submit`, which parses the command it will
run on the cluster to check it first: the two cannot disagree about what a command means.
"""

from __future__ import annotations

import argparse

from distrain.config.parse import Config, load_config

RUN_COMMANDS = ("train", "tune")


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--config", "-c", required=required, help="YAML config file (see configs/)")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)")


def add_run_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The arguments of a run command (`train` or `tune`)."""
    add_config_arguments(parser)
    if command == "train":
        parser.add_argument("--restart", action="store_true",
                            help="delete the run folder (only one distrain made) and start over instead of resuming")
    else:
        parser.add_argument("--restart", action="store_true",
                            help="delete the sweep folder (only one distrain made, with all its trials) and start "
                                 "over instead of resuming")
        parser.add_argument("--retry-failed", action="store_true",
                            help="when resuming, run failed trials again (from their last checkpoint)")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show Ray's own output (worker logs, Train/Tune internals) on the console too")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def count(minimum: int = 0, maximum: int | None = None):
    """An argparse type: an integer in [minimum, maximum]; anything else is one line naming the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    parse.__name__ = "count"
    return parse


def number(minimum: float | None = None, maximum: float | None = None):
    """An argparse type: a finite number in [minimum, maximum] (NaN and inf are refused)."""
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be in [{minimum}, {maximum}], got {value:g}")
        return value
    parse.__name__ = "number"
    return parse
