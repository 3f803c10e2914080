"""Submitting distrain commands as Ray jobs: every check that can fail before upload, then the job, then its logs.

Usage:
    from distrain.launch import SubmitOptions, SubmitRefused, submit
    result = submit(["train", "--config", "configs/resnet50_multigpu.yaml"],
                    SubmitOptions(address="http://HEAD:8265"))
    result["job_id"], result["status"], result["summary"]      # summary: the run's JSON line, when followed

    distrain submit --address http://HEAD:8265 -- train --config configs/resnet50_multigpu.yaml
    distrain submit --address http://HEAD:8265 --no-wait -- tune --config configs/my_sweep.yaml

A job costs an upload, a driver start and, for training, ~30 s of worker start-up before the first step, and on
an autoscaling cluster GPU nodes that bill while they boot. So `distrain submit` refuses, naming the cause, what
would fail later:
    auth         the cluster requires Ray's token authentication and we have no (or a wrong) token.
    working_dir  the directory Ray uploads (after `excludes` and .gitignore, as Ray itself walks it) is over the
                 dashboard's request limit (100 MiB); the largest files and folders are named (workdir.py).
    config       the --config file is outside the working directory or excluded, so the job could not read it.
    secrets      a `--set` value carries credentials: the entrypoint is kept in Ray's job table, so secrets travel
                 in the environment (AWS_*, WANDB_API_KEY), never on the command line.
    paths        relative data/output paths mean something else inside the job's unpacked working directory:
                 made absolute for a cluster on this machine, refused for a remote one.
    placement    workers × (CPUs, GPUs) do not fit the nodes (per node, not in total). A cluster on this machine
                 cannot grow, so that is a refusal; a remote one may autoscale, so it is a warning.
    storage      a run that spans nodes needs scaling.storage_path and data.shards on shared storage.
    data         the training driver's own preflight (distrain.train.preflight): manifest, shards, model skeleton
                 and weights, enough samples for the world size, checkpoint compatible, storage writable (with
                 `--restart`, the checks a restart makes).
    wandb        wandb.mode=online needs WANDB_API_KEY here (or --wandb-key-on-cluster); auto without a key
                 runs offline (warning).
The data and storage checks read paths as the cluster sees them. For a cluster on this machine, or URLs only, they
run here; for a remote cluster with local paths they run on the cluster, as a short check job
(`python -m distrain.launch.job check ...`) before the real one.

Secrets: WANDB_API_KEY goes from this process's environment into the job's runtime_env `env_vars`, in memory,
never into a file (runtime_env.yaml may not name it). Ray keeps a job's runtime_env in its job table, so whoever
can read the dashboard can read the key; clusters shared with others should take it from a Kubernetes secret
(cluster/kuberay/) and submit with --wandb-key-on-cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distrain.config.args import RUN_COMMANDS, add_run_arguments, config_from_args
from distrain.launch.checks import (
    Check,
    SubmitRefused,
    check_placement,
    check_wandb,
    data_checks,
    environ,
    format_checks,
)
from distrain.launch.probe import Cluster, client_for, query_cluster
from distrain.launch.workdir import (
    INPUT_PATHS,
    OUTPUT_PATHS,
    WorkingDir,
    _path_value,
    check_working_dir,
    job_paths,
    load_runtime_env,
    scan_working_dir,
)
from distrain.redact import SECRET_NAME, has_credentials

WANDB_FORWARD = ("WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT")
COMMANDS = RUN_COMMANDS


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass


class SubmitOptions:
    address: str
    working_dir: str = "."
    runtime_env: str | None = None      # YAML file; default <working_dir>/cluster/runtime_env.yaml
    wait: bool = True                   # follow the logs to the end (False: return once submitted)
    env: dict[str, str] = field(default_factory=dict)  # extra env_vars for the job (not secrets)
    job_id: str | None = None
    cluster_check: str = "auto"         # where data/storage checks run: auto, here, cluster
    wandb_key_on_cluster: bool = False  # the cluster's nodes set WANDB_API_KEY themselves
    check_only: bool = False            # run the checks, submit nothing


@dataclass


class Plan:
    """Everything decided before submitting: the job as it will be sent, and what the checks found."""

    command: str
    argv: list[str]             # the distrain command as the job runs it
    entrypoint: str
    runtime_env: dict[str, Any]  # holds secrets (env_vars): never print or write it
    cluster: Cluster
    working_dir: WorkingDir
    checks: list[Check]
    name: str

    def warnings(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if c.status == "warn"]


def parse_command(argv: list[str]):
    """(command, parsed args, Config) of a distrain command line such as `train --config X --set k=v`."""
    import argparse

    from distrain.config import ConfigError

    if not argv or argv[0] not in COMMANDS:
        got = argv[0] if argv else "nothing"
        raise SubmitRefused(f"expected a distrain command after `--` ({' or '.join(COMMANDS)}), got {got!r}; e.g. "
                            f"`distrain submit --address http://HEAD:8265 -- train --config configs/X.yaml`")
    command = argv[0]
    parser = argparse.ArgumentParser(prog=f"distrain {command}", add_help=False)
    add_run_arguments(parser, command)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit:
        raise SubmitRefused(f"`distrain {shlex.join(argv)}`: invalid arguments (see above)") from None

    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        raise SubmitRefused(str(e)) from None
    return command, args, cfg


def restart_of(args) -> bool:
    """Whether the command asks to start over (`train --restart`, `tune --restart`): its checks then are those of a
    restart (the folder must be distrain's own), not those of a resume."""
    return bool(getattr(args, "restart", False))


def _job_name(command: str, cfg) -> str:
    return cfg.tune.name if command == "tune" else cfg.train.name


def _new_job_id(command: str, name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", name)[:40].strip("-") or "run"
    return f"distrain-{command}-{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def prepare(argv: list[str], options: SubmitOptions, log: Callable[[str], None] = print) -> Plan:
    """Every check, in order of cost; raises SubmitRefused naming all failed checks. Submits nothing except,
    for a remote cluster with local paths, the short check job."""
    command, args, cfg = parse_command(argv)
    root = Path(options.working_dir).absolute()
    base_env, env_source = load_runtime_env(options.runtime_env, root)
    for k in options.env:
        if SECRET_NAME.search(k):
            raise SubmitRefused(f"--env {k}=...: secrets on a command line end up in shell history and `ps`; "
                                f"export WANDB_API_KEY instead, or use a cluster-side secret")
    secret_args = [a for a in argv if has_credentials(a)]
    if secret_args:
        raise SubmitRefused("the command carries credentials (" + ", ".join(
            a.split("=", 1)[0] + "=<redacted>" for a in secret_args) + "): Ray keeps a job's entrypoint in its "
            "job table, readable by anyone with the dashboard; give credentials through the environment instead "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws on the nodes, WANDB_API_KEY here)")
    wd = scan_working_dir(root, base_env.get("excludes", []))
    checks = [check_working_dir(wd)]
    cluster = query_cluster(options.address)
    if not cluster.nodes:
        raise SubmitRefused(f"{options.address}: the cluster reports no alive nodes")
    job_argv, overrides, path_checks = job_paths(cfg, list(argv), args, wd, cluster)
    checks += path_checks
    if overrides:
        cfg = cfg.replace(overrides)
    placed, spans = check_placement(cfg, command, cluster)
    checks.append(placed)
    wandb_check, pass_key = check_wandb(cfg, dict(os.environ), options.wandb_key_on_cluster)
    checks.append(wandb_check)

    env_vars = dict(base_env.get("env_vars", {}))
    env_vars.update({k: os.environ[k] for k in WANDB_FORWARD if os.environ.get(k)})
    env_vars.update(options.env)
    public_env = dict(env_vars)  # what the checks see: the job's variables, without secrets
    if pass_key:
        env_vars["WANDB_API_KEY"] = os.environ["WANDB_API_KEY"]
    runtime_env = {k: v for k, v in base_env.items() if k != "env_vars"}
    runtime_env.update(working_dir=str(root), env_vars=env_vars)
    entrypoint = shlex.join(["python", "-m", "distrain", *job_argv])
    plan = Plan(command=command, argv=job_argv, entrypoint=entrypoint, runtime_env=runtime_env, cluster=cluster,
                working_dir=wd, checks=checks, name=_job_name(command, cfg))

    if not any(c.status == "fail" for c in checks):
        # Data and storage checks read the paths where the job will: here when that is the same thing.
        local_paths = [v for k in INPUT_PATHS + OUTPUT_PATHS if (v := _path_value(cfg, k)) and "://" not in
                       v.removeprefix("file://")]
        where = options.cluster_check
        if where == "auto":
            where = "cluster" if local_paths and not cluster.local else "here"
        if where == "here":
            # With the job's variables (e.g. DISTRAIN_SHARED_STORAGE), and RAY_ADDRESS set as in the job: preflight
            # then skips its embedded-cluster resource check, which check_placement has done per node.
            with environ({**public_env, "RAY_ADDRESS": options.address}):
                checks += data_checks(cfg, cluster.summary(), spans, command, restart=restart_of(args))
        else:
            checks += cluster_side_checks(plan, public_env, spans, log)
    failed = [c for c in checks if c.status == "fail"]
    log(format_checks(plan, env_source))
    if failed:
        raise SubmitRefused("refused before submitting: " + " | ".join(f"{c.name}: {c.detail}" for c in failed),
                            checks)
    return plan


def cluster_side_checks(plan: Plan, env_vars: dict[str, str], spans: bool, log: Callable[[str], None]) -> list[Check]:
    """Run `data_checks` on the cluster's head node as a short job (same working directory and variables)."""
    client = client_for(plan.cluster.address)
    payload = json.dumps({"cluster": plan.cluster.summary(), "spans": spans, "command": plan.command})
    entrypoint = shlex.join(["python", "-m", "distrain.launch.job", "check", payload, "--", *plan.argv])
    runtime_env = dict(plan.runtime_env, env_vars=env_vars)  # no secrets for the check
    log(f"checking data and storage on the cluster (job {entrypoint[:60]}...)")
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                               submission_id=_new_job_id("check", plan.name),
                               metadata={"distrain": "preflight check"})
    status = wait_for(client, job_id, timeout=600)
    logs = client.get_job_logs(job_id)
    result = last_json(logs)
    if status != "SUCCEEDED" or not result or "checks" not in result:
        tail = "\n".join(logs.strip().splitlines()[-15:])
        return [Check("data", "fail", f"the check job {job_id} ended {status} without a result:\n{tail}",
                      "cluster")]
    return [Check(**c) for c in result["checks"]]


def wait_for(client, job_id: str, timeout: float | None = None, poll_s: float = 0.5) -> str:
    t0 = time.monotonic()
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if timeout is not None and time.monotonic() - t0 > timeout:
            return status
        time.sleep(poll_s)


def follow(client, job_id: str, out=None) -> str:
    """Stream the job's logs to `out` until it ends; returns its final status."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except (OSError, RuntimeError) as e:  # the log stream broke (dashboard restart): fall back to polling
        print(f"distrain submit: log stream of {job_id} ended early ({e}); waiting for the job", file=sys.stderr)
    return wait_for(client, job_id)


def last_json(logs: str) -> dict | None:
    """The last line of the logs that is a JSON object: the command's figures (`emit_json`)."""
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def error_line(logs: str) -> str | None:
    """The one-line error a distrain command prints before exiting, if the job's logs hold one."""
    for line in reversed(logs.splitlines()):
        if re.match(r"^distrain [a-z]+: error: ", line.strip()):
            return line.strip()
    return None


def submit(argv: list[str], options: SubmitOptions, log: Callable[[str], None] = print, out=None) -> dict:
    """Check, submit and (unless options.wait is False) follow a distrain command as a Ray job.

    Returns {"job_id", "status", "address", "command", "entrypoint", "warnings", "summary", "message"}; summary
    is the run's JSON line when the job was followed to SUCCEEDED."""
    plan = prepare(argv, options, log)
    result: dict[str, Any] = {"job_id": None, "status": "CHECKED", "address": options.address,
                              "command": plan.command, "entrypoint": plan.entrypoint, "warnings": plan.warnings(),
                              "summary": None}
    if options.check_only:
        return result
    client = client_for(options.address)
    job_id = options.job_id or _new_job_id(plan.command, plan.name)
    try:
        client.submit_job(entrypoint=plan.entrypoint, runtime_env=plan.runtime_env, submission_id=job_id,
                          metadata={"distrain": plan.command, "name": plan.name})
    except Exception as e:  # upload or API errors, reported as one line
        raise SubmitRefused(f"ray job submit failed: {type(e).__name__}: {e}") from None
    result["job_id"] = job_id
    log(f"submitted job {job_id}: {plan.entrypoint}")
    if not options.wait:
        result["status"] = str(client.get_job_status(job_id).value)
        log(f"follow it with `ray job logs --follow {job_id} --address {options.address}`; stop it with "
            f"`ray job stop {job_id} --address {options.address}`")
        return result
    try:
        status = follow(client, job_id, out)
    except KeyboardInterrupt:
        print(f"\njob {job_id} keeps running on the cluster: `ray job logs --follow {job_id} --address "
              f"{options.address}` to follow it again, `ray job stop {job_id} --address {options.address}` to "
              f"stop it", file=sys.stderr)
        raise
    logs = client.get_job_logs(job_id)
    result["status"] = status
    if status == "SUCCEEDED":
        result["summary"] = last_json(logs)
    else:
        info = client.get_job_info(job_id)
        result["message"] = error_line(logs) or (info.message or "").strip() or f"job ended {status}"
    return result


def _check_main(argv: list[str]) -> int:
    """`python -m distrain.launch.job check '{"cluster": ..., "spans": ...}' -- train ...`: the data and storage
    checks, run on the head node by `cluster_side_checks`. Prints one JSON line."""
    if len(argv) < 3 or argv[0] != "check" or argv[2] != "--":
        print("usage: python -m distrain.launch.job check JSON -- COMMAND ...", file=sys.stderr)
        return 2
    payload = json.loads(argv[1])
    try:
        command, args, cfg = parse_command(argv[3:])
        checks = data_checks(cfg, payload["cluster"], payload["spans"], command, where="cluster",
                             restart=restart_of(args))
    except SubmitRefused as e:
        checks = [Check("config", "fail", str(e), "cluster")]
    print(json.dumps({"checks": [asdict(c) for c in checks]}), flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(_check_main(sys.argv[1:]))
