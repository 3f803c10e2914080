"""The cluster harness of the launch tests: real local Ray clusters (`ray start --head`, and two raylets on one
machine), started once per test class, every connection sampled and checked to stay on 127.0.0.1, and stopped by
process id at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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

from distrain import runtime
from tests.helpers import ROOT, VENV_BIN


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
    SIGTERM to it stops the whole cluster; with Ray's token authentication on (RAY_AUTH_MODE=token, a token generated
    into its HOME first, as cluster/aws.yaml does on real nodes)."""
    temp = Path(tempfile.mkdtemp(prefix="dt", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = _ray_env(temp)
    env.update(runtime.local_cluster_env())  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: bind to 127.0.0.1
    env["RAY_AUTH_MODE"] = "token"
    subprocess.run([str(VENV_BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=60)
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


