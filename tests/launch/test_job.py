"""Cluster deployment: the files in cluster/, `distrain submit` and its checks, jobs on real local Ray clusters.

Real parts only: the launcher YAML is validated with the schema and the validator that ship with Ray, the
manifests are parsed and their KubeRay fields checked, working directories are real folders (sparse files stand in
for big ones), and jobs run on a `ray start --head` cluster and on a two-node cluster (two raylets on one machine,
`ray.cluster_utils.Cluster` in a helper process), every connection on 127.0.0.1. Each cluster starts once per test
class and is stopped by process id when the class ends.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from distrain.launch import job as launch_job
from tests.helpers import ROOT, VENV_BIN, fast_train_overrides, sparse_file
from tests.launch.conftest import LocalCluster, _non_loopback_connections


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


def _sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def _train_figures(shards: Path) -> str:
    from distrain.shards.manifest import load_manifest

    m = load_manifest(str(shards))
    return f"{m.num_samples('train'):,} train samples in {len(m.shard_urls('train'))} shard(s), {m.num_classes} classes"


def _jobs(cluster: LocalCluster) -> list[dict]:
    return cluster.api("/api/jobs/")


class TestSingleNode:
    def test_the_cluster_refuses_callers_without_its_token(self, head, tmp_path):
        """`ray start` clusters run with Ray's token authentication: a job submitted without the token is refused,
        and `distrain submit` without one says so in one line (with the token, the tests below submit fine)."""
        import urllib.error

        req = urllib.request.Request(head.address + "/api/jobs/", method="POST", data=json.dumps(
            {"entrypoint": "echo pwned"}).encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code in (401, 403)
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        (stranger / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
        code, _, out = head.submit("--check-only", "--", "train", env={"HOME": str(stranger),
                                                                       "RAY_AUTH_MODE": "disabled"})
        assert code == 2, out
        (line,) = [x for x in out.splitlines() if x.startswith("distrain submit: error:")]
        assert "requires Ray's token authentication and refused this request" in line and "RAY_AUTH_TOKEN" in line
        assert "Traceback" not in out
        assert "echo pwned" not in json.dumps(_jobs(head))

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
        sparse_file(big / "data_copy" / "images.npy", 70 * 1024**2)
        sparse_file(big / "model.pth", 40 * 1024**2)
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
        summary = launch_job.last_json(logs)
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
        assert launch_job.last_json(out.stdout)["run_dir"] == str(runs / "stock")
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
