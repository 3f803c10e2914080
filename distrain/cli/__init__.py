"""The `distrain` command: one subcommand per capability, each a thin module in `distrain/cli/`.

Usage:
    distrain shards build SOURCE --out DIR      distrain train --config configs/fashion_mnist_cpu.yaml
    distrain tune --config configs/tune_fashion_mnist_cpu.yaml --set tune.num_samples=8
    distrain eval|predict|export --model outputs/RUN/model ...

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Only the chosen one is imported,
so `distrain --help` answers without importing torch or Ray. Commands that produce figures end with one line of
JSON (`emit_json`), which scripts read with `tail -n 1`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# name → (module in distrain.cli, one-line help)
COMMANDS = {
    "shards": ("shards", "build and inspect WebDataset shards"),
    "models": ("models", "list backbones, show a backbone's stages"),
    "train": ("train", "fine-tune a backbone with Ray Train (DDP)"),
    "tune": ("tune", "hyperparameter sweep with Ray Tune"),
    "eval": ("evaluate", "evaluate a trained model on a shard split"),
    "predict": ("predict", "classify image files, folders or shards"),
    "export": ("export", "export a trained model to TorchScript, ONNX or safetensors"),
    "submit": ("submit", "check and submit a distrain command as a Ray job"),
    "bench": ("bench", "benchmarks: shards, data pipeline, training"),
    "config": ("config", "print the resolved config or the config reference"),
    "runs": ("runs", "list the runs and sweeps in a storage folder, or show one"),
    "demo": ("demo", "the embedded default end to end: Fashion-MNIST sweep, train, evaluate, export"),
}


from distrain.config.args import count, number  # noqa: E402,F401  (argparse types every command uses)


class CommandError(Exception):
    """An error a command reports as one clear line (exit code 2), without a traceback."""


def emit_json(figures: dict) -> None:
    """The last line of a command that produces figures: one JSON object (credentials redacted)."""
    from distrain.redact import redact

    try:
        sys.stdout.flush()
        print(json.dumps(redact(figures), default=str), flush=True)
    except BrokenPipeError:  # `distrain ... | head` closed the pipe: not an error of ours
        sys.stderr.close()


def build_parser() -> argparse.ArgumentParser:
    from distrain import __version__

    parser = argparse.ArgumentParser(prog="distrain", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"distrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(f"distrain.cli.{COMMANDS[name][0]}")
    sub = argparse.ArgumentParser(prog=f"distrain {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    try:
        args = sub.parse_args(rest)
    except SystemExit as e:  # argparse has printed the usage and the one-line reason
        return int(e.code or 0)
    from distrain.config import ConfigError

    try:
        return int(module.run(args) or 0)
    except (CommandError, ConfigError) as e:
        from distrain.redact import redact_text

        print(f"distrain {name}: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distrain {name}: interrupted", file=sys.stderr)
        return 130
