"""Cluster deployment: the files in cluster/, `distrain submit` and its checks, jobs on real local Ray clusters.

Real parts only: the launcher YAML is validated with the schema and the validator that ship with Ray, the
manifests are parsed and their KubeRay fields checked, working directories are real folders (sparse files stand in
for big ones), and jobs run on a `ray start --head` cluster and on a two-node cluster (two raylets on one machine,
`ray.cluster_utils.Cluster` in a helper process), every connection on 127.0.0.1. Each cluster starts once per test
class and is stopped by process id when the class ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import fast_train_overrides

from distrain import runtime
from distrain import submit as ds

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
VENV_BIN = Path(sys.executable).parent
RAY_PIN = next(d.split("==")[1] for d in
               __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
               if d.startswith("ray["))


# ------------------------------------------------------------------------------------------- deployment files


def test_aws_launcher_yaml_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` runs: defaults filled in, node types cross-checked

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no training on the head
    gpu = [t for name, t in types.items() if name != config["head_node_type"]]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 < gpu[0]["max_workers"] <= config["max_workers"]
    assert gpu[0]["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU instance family
    assert config["docker"]["image"].endswith(":0.1.0")
    assert any("--shm-size" in o for o in config["docker"]["run_options"])
    assert "~/.ray/auth_token" in config["file_mounts"].values()
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in start


def _pod_templates(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]) for name, g in groups]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_name_the_fields_kuberay_requires(name):
    doc = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[name]
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        assert spec["entrypoint"].startswith("python -m distrain ")
        assert spec["shutdownAfterJobFinishes"] is True
        spec = spec["rayClusterSpec"]
    assert spec["rayVersion"] == RAY_PIN
    assert isinstance(spec["headGroupSpec"]["rayStartParams"], dict)
    workers = spec["workerGroupSpecs"]
    assert workers
    for g in workers:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams"} <= set(g)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    pvc = yaml.safe_load((CLUSTER / "kuberay" / "storage.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    images = set()
    for group, pod in _pod_templates(spec):
        shared = [v["name"] for v in pod["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]]
        assert len(shared) == 1, f"{group}: no volume from the shared PVC"
        for c in pod["containers"]:
            images.add(c["image"])
            limits = c["resources"]["limits"]
            assert {"cpu", "memory"} <= set(limits)
            assert ("nvidia.com/gpu" in limits) == (group != "head"), group  # GPUs on workers, not on the head
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert mounts[shared[0]] == "/mnt/shared", f"{group}: shared volume not mounted"
            key = [e for e in c["env"] if e["name"] == "WANDB_API_KEY"]
            assert key and key[0]["valueFrom"]["secretKeyRef"]["name"] == "wandb", f"{group}: no W&B secret"
            assert "value" not in key[0]  # never the key itself
    assert len(images) == 1  # every pod runs the same image


def test_rayjob_entrypoint_is_a_valid_distrain_command_on_the_shared_volume():
    spec = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "distrain"]
    # The config path is the image's copy of configs/ (WORKDIR /home/ray/distrain in the Dockerfile).
    in_image = "/home/ray/distrain/"
    config = argv[argv.index("--config") + 1]
    assert config.startswith(in_image)
    local = [a if a != config else str(ROOT / config[len(in_image):]) for a in argv[3:]]
    command, _, cfg = ds.parse_command(local)
    assert command == "train"
    assert cfg.data.shards.startswith("/mnt/shared/") and cfg.scaling.storage_path.startswith("/mnt/shared/")


def test_dockerfile_builds_the_pinned_stack_from_pyproject():
    text = (CLUSTER / "Dockerfile").read_text()
    base = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ARG RAY_IMAGE="))
    assert base.startswith(f"rayproject/ray:{RAY_PIN}-py311")  # official image, same Ray as the pin
    assert "FROM ${RAY_IMAGE}" in text
    assert "tomllib.load(open('pyproject.toml'" in text and "pip install -r /tmp/requirements.txt" in text
    assert f"ray.__version__ == '{RAY_PIN}'" in text
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:4] and "!distrain/" in ignore and "!.git" not in ignore
    assert not any(i.startswith(("!data", "!outputs", "!.venv", "!wandb")) for i in ignore)


# ------------------------------------------------------------------------------------------- working directory


def test_runtime_env_yaml_is_the_default_and_keeps_data_out(tmp_path):
    env, source = ds.load_runtime_env(None, ROOT)
    assert source == str(CLUSTER / "runtime_env.yaml")
    assert env["excludes"] == ds.DEFAULT_EXCLUDES
    assert not any("KEY" in k or "TOKEN" in k for k in env["env_vars"])
    # A project laid out like this repository: what goes, what stays.
    for rel, size in [("distrain/__init__.py", 10), ("distrain/data/loader.py", 10), ("configs/a.yaml", 10),
                      ("cluster/Dockerfile", 10), (".git/objects/pack/big.pack", 10), ("data/x/train-0.tar", 10),
                      ("outputs/run/checkpoint/weights.pt", 10), ("wandb/run-1/files/x", 10),
                      ("outputs/wandb/run-2/x", 10), (".venv/lib/torch.so", 10), ("distrain/__pycache__/a.pyc", 10),
                      ("sub/.git/HEAD", 10), ("distrain.egg-info/PKG-INFO", 10), ("venv/bin/python", 10)]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * size)
    wd = ds.scan_working_dir(tmp_path, env["excludes"])
    assert set(wd.files) == {"distrain/__init__.py", "distrain/data/loader.py", "configs/a.yaml",
                             "cluster/Dockerfile"}
    # The repository itself uploads code only.
    repo = ds.scan_working_dir(ROOT, env["excludes"])
    tops = {p.split("/")[0] for p in repo.files}
    assert {"distrain", "configs", "cluster"} <= tops
    assert not tops & {".git", ".venv", "data", "outputs", "wandb", ".cache"}
    assert any(p.startswith("distrain/data/") for p in repo.files)
    assert ds.check_working_dir(repo).status == "ok"


def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)  # a sparse file: its size counts, no disk is used


def test_working_dir_over_the_cap_is_refused_naming_the_largest_files(tmp_path):
    mib = 1024**2
    _sparse(tmp_path / "notebooks" / "features.npy", 60 * mib)
    _sparse(tmp_path / "weights" / "backbone.pth", 45 * mib)
    _sparse(tmp_path / "weights" / "head.pth", 2 * mib)
    _sparse(tmp_path / ".git" / "objects" / "pack" / "huge.pack", 900 * mib)  # excluded: does not count
    _sparse(tmp_path / "data" / "shards" / "train-0.tar", 900 * mib)  # excluded
    (tmp_path / "train.py").write_text("print('hi')\n")
    wd = ds.scan_working_dir(tmp_path, ds.DEFAULT_EXCLUDES)
    assert wd.total_bytes == 107 * mib + len("print('hi')\n")
    check = ds.check_working_dir(wd)
    assert check.status == "fail"
    assert "notebooks/features.npy (60.0 MiB)" in check.detail and "weights/backbone.pth (45.0 MiB)" in check.detail
    assert check.detail.index("features.npy") < check.detail.index("backbone.pth") < check.detail.index("head.pth")
    assert "weights/ (47.0 MiB)" in check.detail  # largest top-level entries
    assert "huge.pack" not in check.detail and "train-0.tar" not in check.detail
    # Excluding the biggest file brings it under the cap.
    smaller = ds.scan_working_dir(tmp_path, [*ds.DEFAULT_EXCLUDES, "/notebooks/"])
    assert ds.check_working_dir(smaller).status == "ok"
    assert ds.WORKING_DIR_CAP == 100 * mib


def test_runtime_env_file_and_env_flags_refuse_secrets(tmp_path):
    bad = tmp_path / "runtime_env.yaml"
    bad.write_text(yaml.safe_dump({"excludes": [".git/"], "env_vars": {"WANDB_API_KEY": "abc"}}))
    with pytest.raises(ds.SubmitRefused, match="WANDB_API_KEY: secrets do not belong in a file"):
        ds.load_runtime_env(bad, tmp_path)
    bad.write_text(yaml.safe_dump({"working_dir": "."}))
    with pytest.raises(ds.SubmitRefused, match="'working_dir' is set by `distrain submit --working-dir`"):
        ds.load_runtime_env(bad, tmp_path)
    # --env with a secret is refused before anything is contacted (the address leads nowhere).
    opts = ds.SubmitOptions(address="http://127.0.0.1:1", working_dir=str(ROOT), env={"HF_TOKEN": "x"})
    with pytest.raises(ds.SubmitRefused, match=r"--env HF_TOKEN=\.\.\.: secrets on a command line"):
        ds.prepare(["train", "--set", "train.epochs=1"], opts, log=lambda s: None)


def test_command_and_config_path_checks(tmp_path):
    with pytest.raises(ds.SubmitRefused, match="expected a distrain command after `--`"):
        ds.parse_command(["python", "train.py"])
    with pytest.raises(ds.SubmitRefused, match=r"config key 'optim\.lrr'"):
        ds.parse_command(["train", "--set", "optim.lrr=1"])
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "run.yaml").write_text("train:\n  epochs: 1\n")
    (project / "data").mkdir()
    (project / "data" / "run.yaml").write_text("train:\n  epochs: 1\n")  # excluded folder
    (tmp_path / "elsewhere.yaml").write_text("train:\n  epochs: 1\n")
    wd = ds.scan_working_dir(project, ds.DEFAULT_EXCLUDES)
    local = ds.Cluster("http://127.0.0.1:8265", [ds.Node("127.0.0.1", 2, 0, True)], local=True)
    remote = ds.Cluster("http://10.0.0.5:8265", [ds.Node("10.0.0.5", 8, 1, True)], local=False)
    cwd = os.getcwd()
    os.chdir(project)
    try:
        argv = ["train", "--config", "configs/run.yaml", "--set", "data.shards=data/shards"]
        _, args, cfg = ds.parse_command(argv)
        job_argv, overrides, checks = ds.job_paths(cfg, argv, args, wd, local)
        assert [c.status for c in checks] == ["ok", "ok"]
        # Relative paths become absolute for a cluster on this machine; later --set wins in load_config.
        assert overrides == {"data.shards": str(project / "data/shards"),
                             "scaling.storage_path": str(project / "outputs")}
        assert job_argv[-4:] == ["--set", f"data.shards={project}/data/shards",
                                 "--set", f"scaling.storage_path={project}/outputs"]
        _, _, checks = ds.job_paths(cfg, argv, args, wd, remote)
        fail = [c for c in checks if c.status == "fail"]
        assert len(fail) == 1 and "data.shards='data/shards', scaling.storage_path='outputs'" in fail[0].detail
        for config, message in [("data/run.yaml", "excluded from the upload"),
                                (str(tmp_path / "elsewhere.yaml"), "outside the working directory")]:
            argv = ["train", "--config", config]
            _, args, cfg = ds.parse_command(argv)
            _, _, checks = ds.job_paths(cfg, argv, args, wd, local)
            assert checks[0].status == "fail" and message in checks[0].detail
    finally:
        os.chdir(cwd)


def test_placement_is_counted_per_node():
    _, _, cfg = ds.parse_command(["train", "--set", "scaling.num_workers=2", "--set", "data.loader_workers=1"])
    two_small = [ds.Node("a", 2, 0, True), ds.Node("b", 2, 0, False)]
    assert ds.worker_fit(cfg, two_small, use_gpu=False) == (2, 1)  # 2 CPUs per worker: one per node
    local = ds.Cluster("http://127.0.0.1:1", two_small, local=True)
    check, spans = ds.check_placement(cfg, "train", local)
    assert check.status == "ok" and "several nodes" in check.detail and spans
    # 3 CPUs in total, but no node holds a 2-CPU worker twice: 4 workers cannot fit.
    _, _, cfg4 = ds.parse_command(["train", "--set", "scaling.num_workers=4"])
    check, _ = ds.check_placement(cfg4, "train", local)
    assert check.status == "fail" and "hold 2 such worker(s)" in check.detail
    remote = ds.Cluster("http://10.0.0.5:8265", [ds.Node("10.0.0.5", 8, 0, True)], local=False)
    _, _, gpu = ds.parse_command(["train", "--set", "scaling.use_gpu=true", "--set", "scaling.num_workers=8"])
    check, spans = ds.check_placement(gpu, "train", remote)  # a head-only autoscaling cluster: it may grow
    assert check.status == "warn" and "autoscaler" in check.detail and spans
    _, _, auto = ds.parse_command(["train"])
    check, _ = ds.check_placement(auto, "train", remote)
    assert check.status == "warn" and "would train on CPUs" in check.detail


def test_wandb_key_present_or_offline_chosen():
    def cfg(mode):
        return ds.parse_command(["train", "--set", f"wandb.mode={mode}"])[2]

    assert ds.check_wandb(cfg("online"), {}, False)[0].status == "fail"
    check, pass_key = ds.check_wandb(cfg("online"), {"WANDB_API_KEY": "k"}, False)
    assert check.status == "ok" and pass_key
    assert ds.check_wandb(cfg("online"), {}, True)[0].status == "ok"  # the nodes hold the key (Kubernetes secret)
    assert ds.check_wandb(cfg("offline"), {"WANDB_API_KEY": "k"}, False)[1] is False  # offline: the key stays here
    assert ds.check_wandb(cfg("auto"), {}, False)[0].status == "warn"


def test_local_addresses_and_job_log_parsing():
    assert ds.is_local_address("http://127.0.0.1:8265") and ds.is_local_address("http://localhost:8265")
    assert not ds.is_local_address("http://203.0.113.7:8265")  # TEST-NET: not an address of this machine
    assert ds.is_local_address("127.0.0.1") and not ds.is_local_address("10.255.255.1")  # node IPs, no scheme
    logs = 'noise\n{"not": json\n{"best_val_top1": 0.9, "run_dir": "/r"}\n(RayTrainWorker pid=1) {"x": 1}\n'
    assert ds.last_json(logs) == {"best_val_top1": 0.9, "run_dir": "/r"}
    assert ds.error_line("a\ndistrain train: error: data.shards: no shards manifest at x\n") == (
        "distrain train: error: data.shards: no shards manifest at x")


def test_declared_shared_storage(tmp_path, monkeypatch):
    from distrain.train.run import shared_mount

    shared, private = tmp_path / "shared", tmp_path / "shared-not"
    shared.mkdir()
    private.mkdir()
    assert not shared_mount(str(shared / "runs"))
    monkeypatch.setenv("DISTRAIN_SHARED_STORAGE", f"/nonexistent{os.pathsep}{shared}")
    assert shared_mount(str(shared / "runs")) and shared_mount(str(shared))
    assert not shared_mount(str(private))  # a prefix of the name is not a parent folder


# ------------------------------------------------------------------------------------------- local clusters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env(temp: Path) -> dict[str, str]:
    """Environment of everything a test cluster runs: its own HOME (bootstrap config: no cloud probes; its
    own auth token), its own Ray temp dir (RAY_TMPDIR: no shared /tmp/ray/ray_current_cluster), no usage
    report, the project's Python first on PATH (the job's `python`)."""
    home = temp / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text(runtime.BOOTSTRAP_CONFIG)
    env = {**os.environ, **runtime.QUIET_RAY_ENV, "HOME": str(home), "RAY_TMPDIR": str(temp),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "WANDB_MODE": "offline"}
    # SIGTERM would otherwise drain the node for up to 30 s (for Serve replicas) before stopping it.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    return env


class LocalCluster:
    def __init__(self, address: str, env: dict[str, str], proc: subprocess.Popen, log: Path):
        self.address, self.env, self.proc, self.log = address, env, proc, log
        self.outside: list[str] = []  # connections to non-loopback addresses seen while submitting
        self.seen: set[str] = set()  # names of the processes whose connections were sampled

    def submit(self, *args: str, working_dir: Path = ROOT, env: dict | None = None,
               timeout: float = 300) -> tuple[int, dict | None, str]:
        """Run `distrain submit --address ... ARGS` as a user would; returns (exit code, its last stdout line as
        JSON, stdout + stderr). Meanwhile the TCP connections of the cluster's processes and of the submitter
        are sampled every 0.5 s: any to an address other than loopback is recorded in self.outside."""
        cmd = [sys.executable, "-m", "distrain", "submit", "--address", self.address, "--working-dir",
               str(working_dir), *args]
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            p = subprocess.Popen(cmd, env={**self.env, **(env or {})}, stdout=out, stderr=err, text=True, cwd=ROOT)
            t0 = time.monotonic()
            while p.poll() is None:
                self.sample({p.pid})
                if time.monotonic() - t0 > timeout:
                    p.kill()
                time.sleep(0.5)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        lines = stdout.strip().splitlines()
        result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
        return p.returncode, result, stdout + stderr

    def sample(self, extra_pids: set[int] = frozenset()) -> None:
        """Record the TCP connections the cluster's processes (and `extra_pids`) hold right now."""
        for line, peer, name in _connections(self.pids() | set(extra_pids)):
            self.seen.add(name)
            if peer not in ("127.0.0.1", "::1"):
                self.outside.append(line)

    def api(self, path: str):
        req = urllib.request.Request(self.address + path)
        token = Path(self.env["HOME"], ".ray", "auth_token")
        if token.exists():
            req.add_header("Authorization", f"Bearer {token.read_text().strip()}")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def pids(self) -> set[int]:
        """The cluster's processes: the session its starter leads (start_new_session). Ray's workers run in
        process groups of their own but stay in that session."""
        return set(_session(self.proc.pid))

    def stop(self) -> None:
        """SIGTERM to the process that started the cluster (it shuts its nodes down), then SIGKILL, by pid, to
        whatever of its session is left: only processes this test started."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(20):
            if not _session(self.proc.pid):
                return
            time.sleep(0.5)
        for pid in _session(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _session(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies excluded)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], check=False, capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines()]
    return [int(r[0]) for r in rows if len(r) == 3 and int(r[1]) == sid and "Z" not in r[2]]


def _connections(pids: set[int]) -> list[tuple[str, str, str]]:
    """(ss line, peer host, process name) of every TCP connection these processes hold."""
    out = subprocess.run(["ss", "-tnpH"], check=False, capture_output=True, text=True).stdout.splitlines()
    found = []
    for line in out:
        parts = line.split()
        users = parts[-1] if len(parts) >= 6 else ""
        for name, pid in re.findall(r'\("([^"]*)",pid=(\d+),', users):
            if int(pid) in pids:
                peer = parts[4].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
                found.append((line, peer, name))
    return found


def _non_loopback_connections(pids: set[int]) -> list[str]:
    """TCP connections of these processes to anything but 127.0.0.1 / ::1."""
    return [line for line, peer, _ in _connections(pids) if peer not in ("127.0.0.1", "::1")]


def test_connection_sampler_sees_non_loopback_connections():
    """The loopback assertions below are only as good as this detector: connect to this machine's own outward
    address (not loopback) and check that the connection is reported, while a loopback one is not."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # UDP connect sends nothing; it picks the outward interface
            outward = probe.getsockname()[0]
        except OSError:
            pytest.skip("no non-loopback interface")
    if outward.startswith("127."):
        pytest.skip("no non-loopback interface")
    with socket.socket() as server:
        server.bind(("0.0.0.0", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection((outward, port)) as out, socket.create_connection(("127.0.0.1", port)) as lo:
            bad = _non_loopback_connections({os.getpid()})
            assert any(f"{outward}:{port}" in line for line in bad)
            assert not any(line.split()[4].endswith(f"127.0.0.1:{port}") for line in bad)
            assert out.fileno() > 0 and lo.fileno() > 0


def _wait_for_log(proc: subprocess.Popen, log: Path, text: str, timeout: float = 90) -> None:
    t0 = time.monotonic()
    while text not in log.read_text():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            raise RuntimeError(f"cluster did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def _wait_for_jobs_api(cluster: LocalCluster, nodes: int, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while True:
        try:
            cluster.api("/api/jobs/")
            alive = [n for n in cluster.api("/api/v0/nodes")["data"]["result"]["result"] if n["state"] == "ALIVE"]
            if len(alive) >= nodes:
                return
        except OSError:
            pass
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"job API of {cluster.address} not ready:\n{cluster.log.read_text()[-3000:]}")
        time.sleep(0.5)


@contextlib.contextmanager
def _serving(cluster: LocalCluster, ready: str, nodes: int, temp: Path):
    """Wait until the cluster's starter logs `ready` and its jobs API sees `nodes` nodes; at the end stop it (a
    starter that reads stdin is told by closing it), check nothing of it is left and remove its temp dir."""
    try:
        _wait_for_log(cluster.proc, cluster.log, ready)
        _wait_for_jobs_api(cluster, nodes=nodes)
        yield cluster
    finally:
        if cluster.proc.stdin:
            cluster.proc.stdin.close()  # the two-node helper shuts its cluster down
            with contextlib.suppress(subprocess.TimeoutExpired):
                cluster.proc.wait(timeout=45)
        cluster.stop()
        assert not _session(cluster.proc.pid)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="class")
def head():
    """`ray start --head` on this machine (2 CPUs), bound to 127.0.0.1, in the foreground (--block) so that
    SIGTERM to it stops the whole cluster."""
    temp = Path(tempfile.mkdtemp(prefix="dt", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = _ray_env(temp)
    env.update(runtime.local_cluster_env())  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: bind to 127.0.0.1
    dash = _free_port()
    ports = {"--port": _free_port(), "--dashboard-port": dash, "--ray-client-server-port": _free_port(),
             "--dashboard-agent-listen-port": _free_port(), "--dashboard-agent-grpc-port": _free_port(),
             "--metrics-export-port": _free_port(), "--runtime-env-agent-port": _free_port(),
             "--node-manager-port": _free_port(), "--object-manager-port": _free_port()}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus",
           "2", "--num-gpus", "0", "--object-store-memory", str(400 * 1024**2), "--dashboard-host", "127.0.0.1",
           "--temp-dir", str(temp), "--disable-usage-stats", *[str(x) for kv in ports.items() for x in kv]]
    log = temp / "ray-start.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    with _serving(LocalCluster(f"http://127.0.0.1:{dash}", env, proc, log), "Ray runtime started", 1, temp) as c:
        yield c


# Run by the `two_nodes` fixture as `python -c HOLD_TWO_NODES TEMP DASHBOARD_PORT AGENT_PORT`: start the cluster,
# say so, hold it until stdin closes, shut it down.
HOLD_TWO_NODES = """
import os
import sys

from ray._private.utils import write_ray_address
from ray.cluster_utils import Cluster

temp, dashboard_port, agent_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# The head's temp dir is Ray's default one under RAY_TMPDIR (set to `temp` by the fixture): Cluster records the
# cluster's address in the default dir's ray_current_cluster, where job supervisors look for it. Left at /tmp/ray,
# that file is shared with every other Ray on the machine, and jobs would connect to whichever wrote it last.
head_temp = os.path.join(os.environ["RAY_TMPDIR"], "ray")
mem = 300 * 1024**2
cluster = Cluster(initialize_head=True, head_node_args=dict(
    num_cpus=1, num_gpus=0, object_store_memory=mem, include_dashboard=True, dashboard_host="127.0.0.1",
    dashboard_port=dashboard_port, dashboard_agent_listen_port=agent_port, temp_dir=head_temp))
write_ray_address(cluster.address, head_temp)
# Its own temp dir: two nodes sharing one session folder would unpack job packages over each other.
cluster.add_node(num_cpus=1, num_gpus=0, object_store_memory=mem, temp_dir=os.path.join(temp, "node2"))
print("CLUSTER READY", cluster.address, flush=True)
try:
    sys.stdin.read()
finally:
    cluster.shutdown()
    print("CLUSTER DOWN", flush=True)
"""


@pytest.fixture(scope="class")
def two_nodes():
    """A real two-node Ray cluster on this machine: two raylets with 1 CPU each, on 127.0.0.1. `ray start` cannot
    make one (with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 a second `ray start --address` aborts, without it Ray
    replaces 127.0.0.1 by the machine's outward address), so a helper process holds a ray.cluster_utils.Cluster
    until its stdin closes (HOLD_TWO_NODES)."""
    temp = Path(tempfile.mkdtemp(prefix="dt", dir="/tmp"))
    env = _ray_env(temp)
    env.update(runtime.local_cluster_env())
    dash = _free_port()
    log = temp / "cluster.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-u", "-c", HOLD_TWO_NODES, str(temp), str(dash),
                                 str(_free_port())], env=env, stdin=subprocess.PIPE, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    with _serving(LocalCluster(f"http://127.0.0.1:{dash}", env, proc, log), "CLUSTER READY", 2, temp) as c:
        yield c


def _sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def _train_figures(shards: Path) -> str:
    from distrain.shards.manifest import load_manifest

    m = load_manifest(str(shards))
    return f"{m.num_samples('train'):,} train samples in {len(m.shard_urls('train'))} shard(s), {m.num_classes} classes"


def _jobs(cluster: LocalCluster) -> list[dict]:
    return cluster.api("/api/jobs/")


class TestSingleNode:
    def test_check_only_passes_and_reports(self, head, tiny_shards, tmp_path):
        before = _jobs(head)
        code, result, out = head.submit("--check-only", "--", "train", "--set", f"data.shards={tiny_shards}",
                                        "--set", f"scaling.storage_path={tmp_path / 'runs'}",
                                        "--set", "scaling.num_workers=1", "--set", "data.batch_size=8",
                                        "--set", "wandb.mode=offline")
        assert code == 0, out
        assert result["status"] == "CHECKED" and result["job_id"] is None
        assert result["entrypoint"].startswith("python -m distrain train --set")
        for name in ("working_dir", "placement", "wandb", "data"):
            assert f"ok   {name}" in out, out
        assert "1 node(s), 2 CPUs, 0 GPUs; on this machine" in out
        assert _train_figures(tiny_shards) in out
        # A sweep gets the sweep's own plan checks too.
        code, result, out = head.submit("--check-only", "--", "tune", "--set", f"data.shards={tiny_shards}",
                                        "--set", f"scaling.storage_path={tmp_path / 'runs'}",
                                        "--set", "scaling.num_workers=1", "--set", "data.batch_size=8",
                                        "--set", "tune.space.optim.lr=loguniform(1e-4, 1e-2)",
                                        "--set", "tune.num_samples=3", "--set", "wandb.mode=offline")
        assert code == 0 and result["command"] == "tune", out
        assert "ok   sweep       3 trial(s) over optim.lr (random search, asha scheduler)" in out
        assert f"run folder {tmp_path / 'runs'}/sweep/runs writable" in out
        assert _jobs(head) == before  # nothing submitted

    def test_wandb_key_goes_to_the_job_from_the_environment_only(self, head, tiny_shards, tmp_path):
        key = "distrain-test-key-0123456789abcdef"
        args = ["--check-only", "--", "train", "--set", f"data.shards={tiny_shards}", "--set", "data.batch_size=8",
                "--set", f"scaling.storage_path={tmp_path / 'runs'}", "--set", "scaling.num_workers=1"]
        code, _, out = head.submit(*args, "--set", "wandb.mode=online", env={"WANDB_API_KEY": key})
        assert code == 0 and "WANDB_API_KEY from this environment goes to the job's env_vars" in out, out
        assert key not in out  # never printed, in the checks or the JSON line

    def test_data_checks_can_run_on_the_cluster(self, head, tiny_shards, tmp_path):
        # What a remote cluster gets when the config names local paths: a short check job on the head node.
        before = {j["submission_id"] for j in _jobs(head)}
        code, result, out = head.submit("--check-only", "--cluster-check", "cluster", "--", "train",
                                        "--set", f"data.shards={tiny_shards}", "--set", "data.batch_size=8",
                                        "--set", f"scaling.storage_path={tmp_path / 'runs'}",
                                        "--set", "scaling.num_workers=1", "--set", "wandb.mode=offline")
        assert code == 0 and result["status"] == "CHECKED", out
        assert _train_figures(tiny_shards) + "; run folder" in out and "(on the cluster)" in out
        new = [j for j in _jobs(head) if j["submission_id"] not in before]
        assert [(j["metadata"], j["status"]) for j in new] == [({"distrain": "preflight check"}, "SUCCEEDED")]
        # The same check job reports a refusal it finds on the cluster.
        code, _, out = head.submit("--cluster-check", "cluster", "--", "train",
                                   "--set", f"data.shards={tmp_path / 'none'}", "--set", "wandb.mode=offline",
                                   "--set", "scaling.num_workers=1")
        assert code == 2 and "no shards manifest" in out and "(on the cluster)" in out, out
        new = [j for j in _jobs(head) if j["submission_id"] not in before]
        assert [j["metadata"] for j in new] == [{"distrain": "preflight check"}] * 2  # and no training job

    def test_refusals_before_submitting(self, head, tiny_shards, tmp_path):
        before = _jobs(head)
        # No shards where the config says: the training driver's own preflight, reused.
        code, _, out = head.submit("--", "train", "--set", f"data.shards={tmp_path / 'nothing'}", "--set",
                                   f"scaling.storage_path={tmp_path}", "--set", "scaling.num_workers=1",
                                   "--set", "wandb.mode=offline")
        assert code == 2 and "refused before submitting" in out and "FAIL data" in out, out
        assert f"no shards manifest at {tmp_path / 'nothing'}/manifest.json" in out
        # Workers that do not fit a cluster that cannot grow, and W&B online without a key: every failed check
        # is named at once.
        code, _, out = head.submit("--", "train", "--set", f"data.shards={tiny_shards}", "--set",
                                   "scaling.num_workers=3", "--set", "wandb.mode=online")
        assert code == 2 and "FAIL placement" in out and "hold 1 such worker(s)" in out, out
        assert "FAIL wandb" in out and "wandb.mode=online but WANDB_API_KEY is not set here" in out
        assert "error: refused before submitting: placement: " in out and " | wandb: " in out
        # A sweep whose scheduler could never stop a trial.
        code, _, out = head.submit("--", "tune", "--set", f"data.shards={tiny_shards}", "--set",
                                   "scaling.num_workers=1", "--set", "wandb.mode=offline", "--set",
                                   "train.epochs=1", "--set", "tune.space.optim.lr=uniform(0.001, 0.01)")
        assert code == 2 and "FAIL sweep" in out and "tune.grace_period=1 is not below train.epochs=1" in out, out
        # A working directory over the upload limit, with its largest files named.
        big = tmp_path / "project"
        _sparse(big / "data_copy" / "images.npy", 70 * 1024**2)
        _sparse(big / "model.pth", 40 * 1024**2)
        code, _, out = head.submit("--", "train", "--set", f"data.shards={tiny_shards}", "--set",
                                   "scaling.num_workers=1", "--set", "wandb.mode=offline", working_dir=big)
        assert code == 2, out
        assert "over Ray's upload limit of 100.0 MiB" in out
        assert "data_copy/images.npy (70.0 MiB), model.pth (40.0 MiB)" in out
        assert _jobs(head) == before

    @pytest.mark.timeout(400)
    def test_submitted_training_run_succeeds(self, head, tiny_shards, tmp_path):
        # --no-wait here (the two-node test follows its job's logs): submit, return, then watch the job.
        runs = tmp_path / "runs"
        overrides = fast_train_overrides(tiny_shards, runs, name="submitted", **{
            "train.epochs": 1, "scaling.num_workers": 1, "wandb.mode": "offline"})
        code, result, out = head.submit("--no-wait", "--", "train", *_sets(overrides))
        assert code == 0, out
        assert result["status"] in ("PENDING", "RUNNING") and result["summary"] is None
        assert result["job_id"].startswith("distrain-train-submitted-")
        assert f"ray job logs --follow {result['job_id']} --address {head.address}" in out
        t0 = time.monotonic()
        while (job := next(j for j in _jobs(head) if j["submission_id"] == result["job_id"]))["status"] not in (
                "SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() - t0 < 300:
            head.sample()
            time.sleep(0.5)
        logs = head.api(f"/api/jobs/{result['job_id']}/logs")["logs"]
        assert job["status"] == "SUCCEEDED", logs[-3000:]
        assert job["entrypoint"] == result["entrypoint"]
        # The run's summary line ends the job's logs; summary.json is where it says.
        summary = ds.last_json(logs)
        assert summary["run_dir"] == str(runs / "submitted") and summary["epochs"] == 1
        on_disk = json.loads((runs / "submitted" / "summary.json").read_text())
        assert on_disk["best_val_top1"] == summary["best_val_top1"] and 0 <= summary["best_val_top1"] <= 1
        assert (runs / "submitted" / "model").is_dir()
        assert job["runtime_env"]["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"  # cluster/runtime_env.yaml
        assert "WANDB_API_KEY" not in job["runtime_env"]["env_vars"]  # offline: the key is not needed, not sent
        # Every connection on loopback, sampled across the cluster, the job driver and the training worker.
        assert head.outside == [], head.outside
        assert {"gcs_server", "raylet", "ray::RayTrainWo"} <= head.seen, head.seen


    def test_plain_ray_job_submit_runs_distrain_train(self, head, tiny_shards, tmp_path):
        # The stock Ray CLI, no distrain wrapper: `distrain train` is a valid `ray job submit` entrypoint as it is.
        runs = tmp_path / "runs"
        overrides = fast_train_overrides(tiny_shards, runs, name="stock", **{
            "train.epochs": 1, "scaling.num_workers": 1, "wandb.mode": "disabled"})
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", head.address, "--working-dir", str(ROOT),
               "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"), "--",
               "python", "-m", "distrain", "train", *_sets(overrides)]
        out = subprocess.run(cmd, env=head.env, capture_output=True, text=True,
                             timeout=300, cwd=ROOT)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert re.search(r"Job '\S+' succeeded", out.stdout + out.stderr), out.stdout[-2000:]
        assert ds.last_json(out.stdout)["run_dir"] == str(runs / "stock")
        assert json.loads((runs / "stock" / "summary.json").read_text())["epochs"] == 1


class TestTwoNodes:
    def test_node_local_storage_is_refused_before_training(self, two_nodes, tiny_shards, tmp_path):
        # The shards are declared shared (both nodes read this machine's disk); the run folder is not.
        code, _, out = two_nodes.submit("--env", f"DISTRAIN_SHARED_STORAGE={tiny_shards}", "--", "train",
                                        "--set", f"data.shards={tiny_shards}",
                                        "--set", f"scaling.storage_path={tmp_path / 'runs'}",
                                        "--set", "scaling.num_workers=2", "--set", "data.loader_workers=0",
                                        "--set", "data.batch_size=8", "--set", "wandb.mode=offline")
        assert code == 2, out
        assert "2 node(s), 2 CPUs, 0 GPUs; on this machine" in out
        assert "ok   placement   2 worker(s) × 1 CPU fit on several nodes" in out
        assert f"FAIL storage     scaling.storage_path={tmp_path / 'runs'} is on a node-local filesystem" in out
        assert "data.shards" not in out.split("FAIL storage")[1].split("\n")[0]  # declared shared: accepted
        assert _jobs(two_nodes) == []  # refused before anything reached the cluster

    @pytest.mark.timeout(400)
    def test_two_worker_run_places_one_worker_per_node(self, two_nodes, tiny_shards, tmp_path):
        # Both "nodes" are this machine, so the test declares its storage shared, as a user would an NFS path
        # that /proc/mounts does not show as such.
        shared = tmp_path / "shared"
        overrides = fast_train_overrides(tiny_shards, shared / "runs", name="two-nodes", **{"train.epochs": 1})
        code, result, out = two_nodes.submit("--env", f"DISTRAIN_SHARED_STORAGE={tiny_shards}:{shared}", "--",
                                             "train", *_sets(overrides))
        assert code == 0, out
        assert "ok   storage" in out and "ok   placement   2 worker(s) × 1 CPU fit on several nodes" in out
        # Followed to the end: the job's logs streamed, then its status and the run's summary line.
        assert "best val top-1" in out
        assert result["status"] == "SUCCEEDED" and result["summary"]["epochs"] == 1
        run_dir = shared / "runs" / "two-nodes"
        assert result["summary"]["run_dir"] == str(run_dir)
        assert json.loads((run_dir / "summary.json").read_text())["best_val_top1"] == result["summary"][
            "best_val_top1"]
        nodes = {n["node_id"] for n in two_nodes.api("/api/v0/nodes")["data"]["result"]["result"]}
        actors = two_nodes.api("/api/v0/actors?limit=1000&detail=1")["data"]["result"]["result"]
        workers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
        assert len(workers) == 2 and {w["node_id"] for w in workers} == nodes and len(nodes) == 2
        assert two_nodes.outside == [], two_nodes.outside
        assert {"gcs_server", "raylet", "ray::RayTrainWo"} <= two_nodes.seen, two_nodes.seen
