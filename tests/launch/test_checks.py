"""`distrain submit`'s checks: placement per node, W&B keys, local addresses, shared storage, job logs."""

from __future__ import annotations

import os

from distrain.launch import checks, job, probe
from distrain.train import placement


def test_placement_is_counted_per_node():
    _, _, cfg = job.parse_command(["train", "--set", "scaling.num_workers=2", "--set", "data.loader_workers=1"])
    two_small = [probe.Node("a", 2, 0, True), probe.Node("b", 2, 0, False)]
    nodes = [{"CPU": n.cpu, "GPU": n.gpu} for n in two_small]
    assert placement.fits(cfg, nodes, gpu=False) == (2, 1)  # 2 CPUs per worker: one per node
    local = probe.Cluster("http://127.0.0.1:1", two_small, local=True)
    check, spans = checks.check_placement(cfg, "train", local)
    assert check.status == "ok" and "several nodes" in check.detail and spans
    # 3 CPUs in total, but no node holds a 2-CPU worker twice: 4 workers cannot fit.
    _, _, cfg4 = job.parse_command(["train", "--set", "scaling.num_workers=4"])
    check, _ = checks.check_placement(cfg4, "train", local)
    assert check.status == "fail" and "hold 2 such worker(s)" in check.detail
    remote = probe.Cluster("http://10.0.0.5:8265", [probe.Node("10.0.0.5", 8, 0, True)], local=False)
    _, _, gpu = job.parse_command(["train", "--set", "scaling.use_gpu=true", "--set", "scaling.num_workers=8"])
    check, spans = checks.check_placement(gpu, "train", remote)  # a head-only autoscaling cluster: it may grow
    assert check.status == "warn" and "autoscaler" in check.detail and spans
    _, _, auto = job.parse_command(["train"])
    check, _ = checks.check_placement(auto, "train", remote)
    assert check.status == "warn" and "would train on CPUs" in check.detail


def test_wandb_key_present_or_offline_chosen():
    def cfg(mode):
        return job.parse_command(["train", "--set", f"wandb.mode={mode}"])[2]

    assert checks.check_wandb(cfg("online"), {}, False)[0].status == "fail"
    check, pass_key = checks.check_wandb(cfg("online"), {"WANDB_API_KEY": "k"}, False)
    assert check.status == "ok" and pass_key
    assert checks.check_wandb(cfg("online"), {}, True)[0].status == "ok"  # the nodes hold the key (Kubernetes secret)
    assert checks.check_wandb(cfg("offline"), {"WANDB_API_KEY": "k"}, False)[1] is False  # offline: the key stays here
    assert checks.check_wandb(cfg("auto"), {}, False)[0].status == "warn"


def test_local_addresses_and_job_log_parsing():
    assert probe.is_local_address("http://127.0.0.1:8265") and probe.is_local_address("http://localhost:8265")
    assert not probe.is_local_address("http://203.0.113.7:8265")  # TEST-NET: not an address of this machine
    assert probe.is_local_address("127.0.0.1") and not probe.is_local_address("10.255.255.1")  # node IPs, no scheme
    logs = 'noise\n{"not": json\n{"best_val_top1": 0.9, "run_dir": "/r"}\n(RayTrainWorker pid=1) {"x": 1}\n'
    assert job.last_json(logs) == {"best_val_top1": 0.9, "run_dir": "/r"}
    assert job.error_line("a\ndistrain train: error: data.shards: no shards manifest at x\n") == (
        "distrain train: error: data.shards: no shards manifest at x")


def test_declared_shared_storage(tmp_path, monkeypatch):
    from distrain.storage import shared as shared_mount

    shared, private = tmp_path / "shared", tmp_path / "shared-not"
    shared.mkdir()
    private.mkdir()
    assert not shared_mount(str(shared / "runs"))
    monkeypatch.setenv("DISTRAIN_SHARED_STORAGE", f"/nonexistent{os.pathsep}{shared}")
    assert shared_mount(str(shared / "runs")) and shared_mount(str(shared))
    assert not shared_mount(str(private))  # a prefix of the name is not a parent folder


