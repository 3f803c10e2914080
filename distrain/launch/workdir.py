"""The working directory a job uploads: its runtime environment file, the files Ray would pack, their size, and the
paths of the command as the job will see them.

Usage:
    from distrain.launch.workdir import load_runtime_env, scan_working_dir, check_working_dir, job_paths
    env, source = load_runtime_env(None, Path("."))            # cluster/runtime_env.yaml, or the built-in excludes
    wd = scan_working_dir(".", env["excludes"])                 # exactly the files Ray would upload
    check_working_dir(wd)                                       # a Check: over the dashboard's 100 MiB limit?
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distrain.launch.checks import Check, SubmitRefused
from distrain.redact import SECRET_NAME

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
    ".env", "*.pem", "*.key", ".netrc", ".aws/", ".ssh/",
]


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
    .gitignore/.rayignore rules, so the size checked here is the size of the package (distrain._compat)."""
    from distrain import _compat

    root = Path(root).absolute()
    if not root.is_dir():
        raise SubmitRefused(f"--working-dir {root}: not a directory")
    files = _compat.upload_files(root, list(excludes), _include_gitignore())
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


def job_paths(cfg, argv: list[str], args, wd: WorkingDir, cluster) -> tuple[list[str], dict, list[Check]]:
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
