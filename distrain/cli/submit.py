"""`distrain submit --address http://HEAD:8265 [options] -- train|tune --config configs/X.yaml [--set k=v ...]`

Checks the command against the cluster and the working directory (see distrain/submit.py for the list), submits
it as a Ray job with the runtime environment of cluster/runtime_env.yaml, and follows its logs to the end. Ends
with one JSON line: job id, status, and the run's own summary line when the job was followed to completion.
Exit status: 0 when the job SUCCEEDED (or was submitted with --no-wait, or passed --check-only), 1 when it FAILED
or was STOPPED, 2 when it was refused before submitting.
"""

import os

from distrain.cli import CommandError, emit_json


def _env_pair(text: str) -> tuple[str, str]:
    import argparse

    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def add_arguments(parser):
    default_address = os.environ.get("RAY_API_SERVER_ADDRESS") or (
        os.environ.get("RAY_ADDRESS", "") if os.environ.get("RAY_ADDRESS", "").startswith("http") else None)
    parser.add_argument("--address", default=default_address, required=default_address is None,
                        help="the cluster's dashboard, e.g. http://127.0.0.1:8265 (default: RAY_API_SERVER_ADDRESS, "
                             "or RAY_ADDRESS when it is an http:// address)")
    parser.add_argument("--working-dir", default=".",
                        help="folder uploaded with the job (default: the current directory, the repository root)")
    parser.add_argument("--runtime-env", default=None,
                        help="runtime_env YAML (default: <working-dir>/cluster/runtime_env.yaml)")
    parser.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    parser.add_argument("--env", action="append", type=_env_pair, default=[], metavar="KEY=VALUE",
                        help="extra environment variable for the job (repeatable; not for secrets)")
    parser.add_argument("--job-id", default=None, help="submission id (default: distrain-<command>-<name>-<time>)")
    parser.add_argument("--cluster-check", choices=("auto", "here", "cluster"), default="auto",
                        help="where the data/storage checks run: auto = on the cluster (a short check job) when "
                             "it is remote and the config names local paths, else here")
    parser.add_argument("--wandb-key-on-cluster", action="store_true",
                        help="the cluster's nodes set WANDB_API_KEY themselves (e.g. a Kubernetes secret)")
    parser.add_argument("--check-only", action="store_true", help="run the checks, submit nothing")
    parser.add_argument("command", nargs="*", metavar="-- COMMAND",
                        help="the distrain command to run on the cluster, after `--`: train ... or tune ...")


def run(args) -> int:
    from distrain.launch import SubmitOptions, SubmitRefused, submit

    if not args.command:
        raise CommandError("nothing to submit: add the command after `--`, e.g. `distrain submit --address "
                           "http://HEAD:8265 -- train --config configs/X.yaml`")
    options = SubmitOptions(address=args.address, working_dir=args.working_dir, runtime_env=args.runtime_env,
                            wait=not args.no_wait, env=dict(args.env), job_id=args.job_id,
                            cluster_check=args.cluster_check, wandb_key_on_cluster=args.wandb_key_on_cluster,
                            check_only=args.check_only)
    try:
        result = submit(list(args.command), options)
    except SubmitRefused as e:
        raise CommandError(str(e)) from None
    if result.get("message"):
        print(f"distrain submit: job {result['job_id']} {result['status']}: {result['message']}")
    emit_json(result)
    return 0 if result["status"] not in ("FAILED", "STOPPED") else 1
