"""`distrain tune --config configs/tune_X.yaml [--set key=value ...] [--restart] [--retry-failed]`

Runs the sweep named by `tune.name` over `tune.space` (dotted config keys → distributions), each trial a Ray Train
run of the config with the trial's values. Running the same command again resumes an interrupted sweep. Prints the
table of trials, and ends with one JSON line: best_val_top1, best_config (best.yaml, a ready `distrain train`
config), trials_csv, best_model and num_trials. Works as the entrypoint of `ray job submit` unchanged.
"""

import sys

from distrain.cli import CommandError, emit_json
from distrain.config.args import add_run_arguments, config_from_args


def add_arguments(parser):
    add_run_arguments(parser, "tune")


def run(args) -> int:
    cfg = config_from_args(args)
    from distrain import runtime

    runtime.set_console(verbose=args.verbose)
    import ray

    from distrain.tune import SweepError, SweepInterrupted, run_sweep

    own_ray = not ray.is_initialized()
    try:
        sweep = run_sweep(cfg, restart=args.restart, retry_failed=args.retry_failed)
    except SweepInterrupted as e:
        print(f"distrain tune: {e}", file=sys.stderr)
        return 130
    except SweepError as e:
        raise CommandError(str(e)) from None
    finally:
        if own_ray:
            # Ray echoes worker logs on a background thread: disconnect first so that none lands after the JSON.
            ray.shutdown()
    s = sweep.summary
    print()
    print(sweep.format())
    print()
    print(f"sweep folder   {s['sweep_dir']}   ({s['num_completed']} completed, {s['num_stopped']} stopped early, "
          f"{s['num_failed']} failed)")
    print(f"trials table   {s['trials_csv']}")
    if s["best_trial"]:
        print(f"best trial     {s['best_trial']}: val top-1 {s['best_val_top1']:.4f} with "
              + ", ".join(f"{k}={v}" for k, v in s["best_params"].items()))
        print(f"best config    {s['best_config']}   (distrain train --config {s['best_config']})")
        print(f"best model     {s['best_model']}")
    emit_json({k: s[k] for k in ("best_val_top1", "best_config", "trials_csv", "best_model", "num_trials",
                                 "best_trial", "best_params", "num_completed", "num_stopped", "num_failed",
                                 "exploits",
                                 "sweep_dir", "resumed")})
    if not s["best_trial"]:
        print(f"distrain tune: error: no trial of {s['num_trials']} finished an epoch; see {s['trials_csv']}",
              file=sys.stderr)
        return 1
    return 0
