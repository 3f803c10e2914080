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
