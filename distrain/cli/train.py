"""`distrain train --config configs/X.yaml [--set key=value ...] [--restart]`

Connects to the Ray cluster in RAY_ADDRESS (or starts a local one), runs the training run named by `train.name`
(resuming it when its folder holds a checkpoint), and ends with the run's summary as one JSON line. Works as the
entrypoint of `ray job submit` unchanged.
"""

from distrain.cli import CommandError, emit_json
from distrain.config.args import add_run_arguments, config_from_args


def add_arguments(parser):
    add_run_arguments(parser, "train")


def run(args) -> int:
    cfg = config_from_args(args)
    from distrain import runtime

    runtime.set_console(verbose=args.verbose)
    from distrain.train import TrainingError, fit
    from distrain.train.run import format_summary

    try:
        summary = fit(cfg, restart=args.restart)
    except TrainingError as e:
        raise CommandError(str(e)) from None
    print(format_summary(summary))
    emit_json({k: v for k, v in summary.items() if k != "history"})
    return 0
