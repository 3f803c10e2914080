"""Submitting distrain commands as Ray jobs: every check that can fail before upload, then the job, then its logs.

Usage:
    from distrain.submit import SubmitOptions, SubmitRefused, submit
    result = submit(["train", "--config", "configs/resnet50_multigpu.yaml"],
                    SubmitOptions(address="http://HEAD:8265"))
    result["job_id"], result["status"], result["summary"]      # summary: the run's JSON line, when followed

    distrain submit --address http://HEAD:8265 -- train --config configs/resnet50_multigpu.yaml
    distrain submit --address http://HEAD:8265 --no-wait -- tune --config configs/my_sweep.yaml

A job costs an upload, a driver start and, for training, ~30 s of worker start-up before the first step, and on
an autoscaling cluster GPU nodes that bill while they boot. So `distrain submit` refuses, naming the cause, what
would fail later:
    working_dir  the directory Ray uploads (after `excludes` and .gitignore, as Ray itself walks it) is over the
                 dashboard's request limit (100 MiB); the largest files and folders are named.
    config       the --config file is outside the working directory or excluded, so the job could not read it.
    paths        relative data/output paths mean something else inside the job's unpacked working directory:
                 made absolute for a cluster on this machine, refused for a remote one.
    placement    workers × (CPUs, GPUs) do not fit the nodes (per node, not in total). A cluster on this machine
                 cannot grow, so that is a refusal; a remote one may autoscale, so it is a warning.
    storage      a run that spans nodes needs scaling.storage_path and data.shards on shared storage
                 (s3://, gs://, NFS, ...), the rule of `distrain.train.run.preflight`.
    data         the training driver's own preflight: manifest, shards present, enough samples for the world size
                 and loader workers, checkpoint compatible, storage writable.
    wandb        wandb.mode=online needs WANDB_API_KEY here (or --wandb-key-on-cluster); auto without a key
                 runs offline (warning).
The data and storage checks read paths as the cluster sees them. For a cluster on this machine, or URLs only, they
run here; for a remote cluster with local paths they run on the cluster, as a short check job
(`python -m distrain.submit check ...`) before the real one.

Secrets: WANDB_API_KEY goes from this process's environment into the job's runtime_env `env_vars`, in memory,
never into a file (runtime_env.yaml may not name it). Ray keeps a job's runtime_env in its job table, so whoever
can read the dashboard can read the key; clusters shared with others should take it from a Kubernetes secret
(cluster/kuberay/) and submit with --wandb-key-on-cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import importlib
import ipaddress
import json
import logging
import os
import re
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The dashboard's HTTP request limit (ray_constants.DASHBOARD_CLIENT_MAX_SIZE): the working directory travels as
# one uncompressed zip in one PUT request, so this caps the working directory after excludes.
WORKING_DIR_CAP = 100 * 1024**2
# Ray zips with ZIP_STORED: each file costs its bytes plus a local header and a central directory entry.
ZIP_ENTRY_OVERHEAD = 30 + 46 + 24
RUNTIME_ENV_FILE = "cluster/runtime_env.yaml"
# Used when the working directory has no cluster/runtime_env.yaml; kept equal to that file's list by a test.
DEFAULT_EXCLUDES = [
    ".git/", ".hg/", ".svn/",
    "/data/", "/outputs/", "/ray_results/", "wandb/",
    ".venv/", "venv/", ".conda/", ".tox/", ".nox/",
    "__pycache__/", "*.pyc", ".pytest_cache/", ".ruff_cache/", ".mypy_cache/", ".ipynb_checkpoints/",
    ".cache/", "*.egg-info/", "/build/", "/dist/",
]
SECRET_NAME = re.compile(r"(API_KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.IGNORECASE)
# Non-secret W&B settings that follow the key to the job when they are set here (self-hosted servers).
WANDB_FORWARD = ("WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT")
COMMANDS = ("train", "tune")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitRefused(Exception):
    """A job that was not submitted, because a check failed (the message names every failed check)."""

    def __init__(self, message: str, checks: list[Check] | None = None):
        super().__init__(message)
        self.checks = checks or []


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    where: str = "here"  # "here" or "cluster"


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
class Node:
    ip: str
    cpu: float
    gpu: float
    is_head: bool


@dataclass
class Cluster:
    address: str
    nodes: list[Node]
    local: bool  # the head node runs on this machine: local paths mean the same here and there

    def summary(self) -> dict[str, Any]:
        """The dict `distrain.train.run.preflight` takes (runtime.cluster_summary's keys)."""
        return {"nodes": len(self.nodes), "CPU": sum(n.cpu for n in self.nodes),
                "GPU": sum(n.gpu for n in self.nodes)}

    def describe(self) -> str:
        s = self.summary()
        where = "on this machine" if self.local else "remote"
        return f"{s['nodes']} node(s), {s['CPU']:g} CPUs, {s['GPU']:g} GPUs; {where}"


@dataclass
class WorkingDir:
    root: Path
    files: dict[str, int]  # path relative to root → bytes, exactly the files Ray would upload
    excludes: list[str]

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def upload_bytes(self) -> int:
        """Size of the zip Ray builds (stored, not compressed)."""
        return self.total_bytes + sum(ZIP_ENTRY_OVERHEAD + 2 * len(p.encode()) for p in self.files) + 22

    def largest_files(self, n: int = 5) -> list[tuple[str, int]]:
        return heapq.nlargest(n, self.files.items(), key=lambda kv: kv[1])

    def largest_entries(self, n: int = 5) -> list[tuple[str, int]]:
        """Top-level files and folders by uploaded bytes (a folder of many small files shows up here)."""
        sizes: dict[str, int] = {}
        for path, size in self.files.items():
            top = path.split("/", 1)[0] + ("/" if "/" in path else "")
            sizes[top] = sizes.get(top, 0) + size
        return heapq.nlargest(n, sizes.items(), key=lambda kv: kv[1])

    def includes(self, path: str | Path) -> bool:
        """Whether a file or (every file under) a folder is uploaded."""
        p = Path(path).absolute()
        try:
            rel = p.relative_to(self.root).as_posix()
        except ValueError:
            return False
        if p.is_file():
            return rel in self.files
        prefix = rel.rstrip("/") + "/"
        under = [f for f in _walk_files(p)]
        return bool(under) and all((prefix + f) in self.files for f in under)


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


# ------------------------------------------------------------------------------------------- runtime environment


def load_runtime_env(path: str | Path | None, working_dir: Path) -> tuple[dict[str, Any], str]:
    """The runtime_env YAML (default: <working_dir>/cluster/runtime_env.yaml, else the built-in excludes)."""
    if path is None:
        default = working_dir / RUNTIME_ENV_FILE
        if not default.exists():
            return {"excludes": list(DEFAULT_EXCLUDES)}, "built-in excludes"
        path = default
    p = Path(path)
    if not p.exists():
        raise SubmitRefused(f"--runtime-env {p}: file not found")
    try:
        env = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SubmitRefused(f"{p}: not valid YAML: {e}") from None
    if not isinstance(env, dict):
        raise SubmitRefused(f"{p}: expected a mapping of runtime_env fields, got {type(env).__name__}")
    for key in ("working_dir", "py_modules"):
        if key in env:
            raise SubmitRefused(f"{p}: '{key}' is set by `distrain submit --working-dir`, remove it from the file")
    excludes = env.get("excludes", [])
    if not isinstance(excludes, list) or not all(isinstance(e, str) for e in excludes):
        raise SubmitRefused(f"{p}: 'excludes' must be a list of .gitignore-style patterns")
    env_vars = env.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise SubmitRefused(f"{p}: 'env_vars' must be a mapping of names to strings")
    secrets = [k for k in env_vars if SECRET_NAME.search(str(k))]
    if secrets:
        raise SubmitRefused(f"{p}: env_vars names {', '.join(secrets)}: secrets do not belong in a file; export "
                            f"them in the submitting shell (WANDB_API_KEY is forwarded from there) or use a "
                            f"cluster-side secret")
    env["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
    return env, str(p)


def _include_gitignore() -> bool:
    # The same switch Ray's job SDK reads when it packs the working directory.
    return os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"


def scan_working_dir(root: str | Path, excludes: list[str]) -> WorkingDir:
    """The files Ray would upload from `root`: walked with Ray's own walker, its default excludes, `excludes` and
    .gitignore/.rayignore rules, so the size checked here is the size of the package (Ray's private helpers;
    ray is pinned)."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(root).absolute()
    if not root.is_dir():
        raise SubmitRefused(f"--working-dir {root}: not a directory")
    files: dict[str, int] = {}

    def handler(path: Path) -> None:
        if path.is_file():
            files[path.relative_to(root).as_posix()] = path.stat().st_size

    quiet = logging.getLogger("distrain.submit.scan")  # Ray's walker logs every ignore file it reads at INFO
    quiet.setLevel(logging.WARNING)
    _dir_travel(root, [_get_excludes(root, get_runtime_env_default_excludes() + list(excludes))], handler,
                include_gitignore=_include_gitignore(), logger=quiet)
    return WorkingDir(root=root, files=files, excludes=list(excludes))


def _walk_files(folder: Path) -> Iterator[str]:
    for dirpath, _, names in os.walk(folder):
        for name in names:
            yield (Path(dirpath) / name).relative_to(folder).as_posix()


def _mib(n: float) -> str:
    return f"{n / 1024**2:,.1f} MiB"


def check_working_dir(wd: WorkingDir, cap: int = WORKING_DIR_CAP) -> Check:
    size = wd.upload_bytes
    if size <= cap:
        return Check("working_dir", "ok", f"{wd.root}: {len(wd.files)} files, {_mib(size)} to upload "
                                          f"(limit {_mib(cap)})")
    files = ", ".join(f"{p} ({_mib(s)})" for p, s in wd.largest_files())
    entries = ", ".join(f"{p} ({_mib(s)})" for p, s in wd.largest_entries())
    return Check("working_dir", "fail",
                 f"{wd.root} is {_mib(size)} after excludes, over Ray's upload limit of {_mib(cap)}. Largest "
                 f"files: {files}. Largest top-level entries: {entries}. Add them to `excludes` in "
                 f"{RUNTIME_ENV_FILE} (or .gitignore / .rayignore), or point --working-dir at a smaller folder; "
                 f"data belongs on shared storage, not in the upload.")


# ------------------------------------------------------------------------------------------- the cluster


def enable_token_auth_if_available() -> bool:
    """Use Ray's token authentication when a token is at hand and the user has not chosen a mode, as `ray`'s
    own CLI does: clusters started with `ray start` require it (token in ~/.ray/auth_token)."""
    if "RAY_AUTH_MODE" in os.environ:
        return os.environ["RAY_AUTH_MODE"].lower() == "token"
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if not (os.environ.get("RAY_AUTH_TOKEN") or Path(token_file).is_file()):
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray" in sys.modules:  # Ray caches its config at import: let it read the mode again
        from ray._raylet import Config

        Config.initialize("")
    return True


def is_local_address(address: str) -> bool:
    """Whether a host, IP or URL names this machine (loopback, or an address bound to a local interface)."""
    from urllib.parse import urlsplit

    if "://" not in address and address.count(":") > 1:
        host = address.strip("[]")  # a bare IPv6 address
    else:
        host = urlsplit(address if "://" in address else f"http://{address}").hostname or ""
    if host in ("localhost", ""):
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        if ipaddress.ip_address(ip).is_loopback:
            return True
        # Binding succeeds only for addresses of this machine's interfaces.
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
            return True
    return False


UNREACHABLE = (". Is the cluster up, and its dashboard port reachable from here (`ray dashboard cluster/aws.yaml`, "
               "`kubectl port-forward svc/distrain-head-svc 8265:8265`)?")


def quiet_ray_loggers() -> None:
    """Ray's job SDK logs every ignore file it reads and each upload step at INFO, and warns once per default
    exclude that our excludes already cover: keep the submitter's output to the checks and the job's logs."""
    for name in ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk",
                 "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def client_for(address: str):
    from ray.job_submission import JobSubmissionClient

    enable_token_auth_if_available()
    quiet_ray_loggers()
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, authentication, version: all mean "cannot submit"
        raise SubmitRefused(f"cannot reach the Ray job API at {address}: {type(e).__name__}: {e}{UNREACHABLE}"
                            ) from None


def query_cluster(address: str) -> Cluster:
    """Alive nodes and their resources, through the dashboard's state API (no driver connection needed)."""
    from ray.util.state import list_nodes

    enable_token_auth_if_available()
    try:
        nodes = list_nodes(address=address, detail=True, raise_on_missing_output=False)
    except Exception as e:  # any failure here means the cluster cannot be asked
        first = str(e).strip().split(". ")[0]
        raise SubmitRefused(f"cannot list the nodes of {address}: {type(e).__name__}: {first}{UNREACHABLE}") from None
    alive = [Node(ip=n.node_ip, cpu=float((n.resources_total or {}).get("CPU", 0)),
                  gpu=float((n.resources_total or {}).get("GPU", 0)), is_head=bool(n.is_head_node))
             for n in nodes if n.state == "ALIVE"]
    # "On this machine" is decided by where the head node runs (where the job's driver reads paths), not by the
    # dashboard address: `ray dashboard` and `kubectl port-forward` make remote clusters answer on 127.0.0.1.
    heads = [n for n in alive if n.is_head] or alive[:1]
    return Cluster(address=address, nodes=alive, local=bool(heads) and all(is_local_address(n.ip) for n in heads))


# ------------------------------------------------------------------------------------------- the command


def parse_command(argv: list[str]):
    """(command, parsed args, Config) of a distrain command line such as `train --config X --set k=v`."""
    import argparse

    from distrain.config import ConfigError

    if not argv or argv[0] not in COMMANDS:
        got = argv[0] if argv else "nothing"
        raise SubmitRefused(f"expected a distrain command after `--` ({' or '.join(COMMANDS)}), got {got!r}; e.g. "
                            f"`distrain submit --address http://HEAD:8265 -- train --config configs/X.yaml`")
    command = argv[0]
    try:
        module = importlib.import_module(f"distrain.cli.{command}")
    except ModuleNotFoundError:
        raise SubmitRefused(f"`distrain {command}` is not available in this version") from None
    parser = argparse.ArgumentParser(prog=f"distrain {command}", add_help=False)
    module.add_arguments(parser)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit:
        raise SubmitRefused(f"`distrain {shlex.join(argv)}`: invalid arguments (see above)") from None
    from distrain.cli import config_from_args

    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        raise SubmitRefused(str(e)) from None
    return command, args, cfg


def _replace_config_arg(argv: list[str], new: str) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "-c") and i + 1 < len(argv):
            out += [a, new]
            i += 2
            continue
        if a.startswith("--config="):
            a = f"--config={new}"
        out.append(a)
        i += 1
    return out


# Config keys that name local paths: inputs (read by the job) and outputs (written by it).
INPUT_PATHS = ("data.shards", "model.weights")
OUTPUT_PATHS = ("scaling.storage_path", "wandb.dir")


def _path_value(cfg, key: str) -> str | None:
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if not isinstance(value, str) or not value:
        return None
    if key == "model.weights" and not (value.endswith((".pth", ".pt", ".safetensors", ".bin")) or "/" in value):
        return None  # `default`, `none`, a torchvision enum name
    return value


def job_paths(cfg, argv: list[str], args, wd: WorkingDir, cluster: Cluster) -> tuple[list[str], dict, list[Check]]:
    """The command as the job must run it: --config relative to the working directory, relative local paths
    made absolute (cluster on this machine) or refused (remote cluster). Returns (argv, overrides, checks)."""
    checks: list[Check] = []
    if args.config:
        cfg_path = Path(args.config).absolute()
        try:
            rel = cfg_path.relative_to(wd.root).as_posix()
        except ValueError:
            checks.append(Check("config", "fail", f"{args.config} is outside the working directory {wd.root}, "
                                                  f"so the job cannot read it: move it under {wd.root} or pass "
                                                  f"--working-dir"))
        else:
            if rel not in wd.files:
                checks.append(Check("config", "fail", f"{args.config} is excluded from the upload (excludes or "
                                                      f".gitignore), so the job cannot read it"))
            else:
                argv = _replace_config_arg(argv, rel)
                checks.append(Check("config", "ok", f"{rel} travels with the working directory"))
    overrides: dict[str, str] = {}
    problems = []
    for key in INPUT_PATHS + OUTPUT_PATHS:
        value = _path_value(cfg, key)
        if value is None or "://" in value.removeprefix("file://") or os.path.isabs(value.removeprefix("file://")):
            continue
        absolute = str(Path(value).absolute())
        if cluster.local:
            overrides[key] = absolute
        elif key in INPUT_PATHS and wd.includes(absolute):
            overrides[key] = Path(absolute).relative_to(wd.root).as_posix()  # the job's cwd is the upload
        else:
            problems.append(f"{key}={value!r}")
    if overrides:
        argv = argv + [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
        checks.append(Check("paths", "ok", "relative paths passed on as " +
                            ", ".join(f"{k}={v}" for k, v in overrides.items())))
    if problems:
        checks.append(Check("paths", "fail", f"{', '.join(problems)}: a relative local path would be resolved "
                                             f"inside the job's temporary copy of the working directory on the "
                                             f"cluster (where data and outputs are excluded). Use s3://, gs:// or "
                                             f"an absolute path on storage the cluster mounts."))
    return argv, overrides, checks


# ------------------------------------------------------------------------------------------- checks


def worker_fit(cfg, nodes: list[Node], use_gpu: bool) -> tuple[int, int]:
    """(workers the nodes hold in total, workers the largest node holds), counted per node."""
    from distrain.train.run import cpus_per_worker

    cpus = cpus_per_worker(cfg)
    gpus = cfg.scaling.gpus_per_worker if use_gpu else 0.0
    per_node = []
    for n in nodes:
        k = int(n.cpu // cpus + 1e-9) if cpus > 0 else 10**6
        if gpus > 0:
            k = min(k, int(n.gpu // gpus + 1e-9))
        per_node.append(k)
    return sum(per_node), max(per_node, default=0)


def check_placement(cfg, command: str, cluster: Cluster) -> tuple[Check, bool]:
    """Whether the workers fit the nodes; also returns whether the run spans more than one node."""
    from distrain.train.run import cpus_per_worker, resolve_gpu

    summary = cluster.summary()
    use_gpu = resolve_gpu(cfg, summary)
    world = cfg.scaling.num_workers
    total, best = worker_fit(cfg, cluster.nodes, use_gpu)
    spans = len(cluster.nodes) > 1 or best < world
    need = f"{world} worker(s) × {cpus_per_worker(cfg)} CPU" + (f" + {cfg.scaling.gpus_per_worker:g} GPU"
                                                               if use_gpu else "")
    if command == "tune":
        need += " per trial"
    if total >= world:
        where = "one node" if best >= world else "several nodes"
        check = Check("placement", "ok", f"{need} fit on {where} ({cluster.describe()})")
    else:
        msg = (f"{need} do not fit: the nodes hold {total} such worker(s) ({cluster.describe()}; counted per "
               f"node, a worker cannot straddle two)")
        if cluster.local:
            check = Check("placement", "fail", msg + ". Lower scaling.num_workers or data.loader_workers, or set "
                                                     "scaling.cpus_per_worker.")
        else:
            check = Check("placement", "warn", msg + f". The run waits for the autoscaler to add nodes and gives "
                                                     f"up after scaling.start_retries={cfg.scaling.start_retries} "
                                                     f"× 60 s.")
    if cfg.scaling.use_gpu == "auto" and summary["GPU"] == 0 and not cluster.local:
        check = Check("placement", "warn", check.detail + " scaling.use_gpu=auto and the cluster has no GPU "
                                                          "now: the run would train on CPUs. Set "
                                                          "scaling.use_gpu=true to have GPU nodes added.")
    return check, spans


def check_wandb(cfg, environ: dict[str, str], key_on_cluster: bool) -> tuple[Check, bool]:
    """(check, whether to pass WANDB_API_KEY on to the job)."""
    mode, has_key = cfg.wandb.mode, bool(environ.get("WANDB_API_KEY"))
    if mode in ("offline", "disabled"):
        return Check("wandb", "ok", f"wandb.mode={mode}" + (" (sync offline runs later with `wandb sync`)"
                                                            if mode == "offline" else "")), False
    if has_key:
        return Check("wandb", "ok", f"wandb.mode={mode}: WANDB_API_KEY from this environment goes to the job's "
                                    f"env_vars (in memory only)"), True
    if key_on_cluster:
        return Check("wandb", "ok", f"wandb.mode={mode}: the cluster's nodes provide WANDB_API_KEY"), False
    if mode == "online":
        return Check("wandb", "fail", "wandb.mode=online but WANDB_API_KEY is not set here: export it, pass "
                                      "--wandb-key-on-cluster if the nodes set it (Kubernetes secret), or set "
                                      "wandb.mode=offline"), False
    return Check("wandb", "warn", "wandb.mode=auto and no WANDB_API_KEY here: the run logs offline unless the "
                                  "cluster's nodes set the key (then pass --wandb-key-on-cluster)"), False


@contextlib.contextmanager
def _environ(overlay: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in overlay}
    os.environ.update(overlay)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def data_checks(cfg, cluster: dict[str, Any], spans: bool, command: str = "train",
                where: str = "here") -> list[Check]:
    """Shared storage for runs that span nodes, the sweep's own plan checks (tune), then the training driver's
    preflight, as seen from here. Run wherever local paths mean what they mean to the job (this machine, or
    the head node)."""
    from distrain.train.run import TrainingError, is_remote, mount_of, preflight, shared_mount, storage_root

    checks = []
    paths = {"scaling.storage_path": storage_root(cfg), "data.shards": cfg.data.shards.removeprefix("file://")}
    for key, path in paths.items():
        if is_remote(path):
            continue
        if spans and not shared_mount(path):
            mnt, fstype = mount_of(path)
            checks.append(Check("storage", "fail", f"{key}={path} is on a node-local filesystem ({fstype} at "
                                                   f"{mnt}) but the run spans nodes: "
                                                   + ("checkpoints written on one node are invisible to the "
                                                      "others, so the run could neither resume nor recover"
                                                      if key == "scaling.storage_path" else
                                                      "workers on other nodes cannot read the shards")
                                                   + ". Use s3://, gs:// or a shared mount (NFS, Lustre, a FUSE "
                                                     "bucket); DISTRAIN_SHARED_STORAGE declares paths shared.",
                                where))
    if any(c.status == "fail" for c in checks):
        return checks
    if spans:
        checks.append(Check("storage", "ok", "storage and shards are shared (remote URLs or shared mounts)", where))
    run_dir = None
    if command == "tune":
        from distrain.config import ConfigError
        from distrain.tune.results import RUNS
        from distrain.tune.space import num_grid_points, parse_space
        from distrain.tune.sweep import SweepError, check_plan, sweep_dir_of

        try:
            space = parse_space(cfg)
            check_plan(cfg, space)
        except (ConfigError, SweepError) as e:
            checks.append(Check("sweep", "fail", str(e), where))
            return checks
        total = cfg.tune.num_samples * num_grid_points(space)
        checks.append(Check("sweep", "ok", f"{total} trial(s) over {', '.join(space) or 'no keys'} "
                                           f"({cfg.tune.search_alg} search, {cfg.tune.scheduler} scheduler)", where))
        run_dir = f"{sweep_dir_of(cfg)}/{RUNS}"
    try:
        facts = preflight(cfg, cluster, run_dir=run_dir)
    except TrainingError as e:
        checks.append(Check("data", "fail", str(e), where))
        return checks
    m = facts["manifest"]
    shards = len(m.shard_urls(cfg.data.train_split))
    readers = cfg.scaling.num_workers * max(1, cfg.data.loader_workers)
    detail = (f"{m.num_samples(cfg.data.train_split):,} train samples in {shards} shard(s), "
              f"{m.num_classes} classes; run folder {facts['run_dir']} writable")
    checks.append(Check("data", "ok", detail, where))
    if shards < readers:
        checks.append(Check("shards", "warn", f"{shards} shard(s) for {cfg.scaling.num_workers} workers × "
                                              f"{max(1, cfg.data.loader_workers)} loader workers = {readers} "
                                              f"readers: readers share shards (sample ranges), which works but "
                                              f"reads less sequentially; rebuild with a smaller --shard-size for "
                                              f"throughput", where))
    return checks


# ------------------------------------------------------------------------------------------- plan and submit


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
    wd = scan_working_dir(root, base_env.get("excludes", []))
    checks = [check_working_dir(wd)]
    cluster = query_cluster(options.address)
    if not cluster.nodes:
        raise SubmitRefused(f"{options.address}: the cluster reports no alive nodes")
    job_argv, overrides, path_checks = job_paths(cfg, list(argv), args, wd, cluster)
    checks += path_checks
    if overrides:
        cfg = cfg.replace(overrides)
    placement, spans = check_placement(cfg, command, cluster)
    checks.append(placement)
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
            with _environ({**public_env, "RAY_ADDRESS": options.address}):
                checks += data_checks(cfg, cluster.summary(), spans, command)
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
    entrypoint = shlex.join(["python", "-m", "distrain.submit", "check", payload, "--", *plan.argv])
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


def format_checks(plan: Plan, env_source: str) -> str:
    head = (f"checks for `distrain {shlex.join(plan.argv)}` on {plan.cluster.address} "
            f"({plan.cluster.describe()}); runtime env: {env_source}")
    lines = [head]
    for c in plan.checks:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[c.status]
        where = " (on the cluster)" if c.where == "cluster" else ""
        lines.append(f"  {mark} {c.name:<11} {c.detail}{where}")
    return "\n".join(lines)


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


# ------------------------------------------------------------------------------------------- on the cluster


def _check_main(argv: list[str]) -> int:
    """`python -m distrain.submit check '{"cluster": ..., "spans": ...}' -- train ...`: the data and storage
    checks, run on the head node by `cluster_side_checks`. Prints one JSON line."""
    if len(argv) < 3 or argv[0] != "check" or argv[2] != "--":
        print("usage: python -m distrain.submit check JSON -- COMMAND ...", file=sys.stderr)
        return 2
    payload = json.loads(argv[1])
    try:
        command, _, cfg = parse_command(argv[3:])
        checks = data_checks(cfg, payload["cluster"], payload["spans"], command, where="cluster")
    except SubmitRefused as e:
        checks = [Check("config", "fail", str(e), "cluster")]
    print(json.dumps({"checks": [asdict(c) for c in checks]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_check_main(sys.argv[1:]))
