"""The working directory a job uploads: runtime_env.yaml, Ray's own file walk, the upload cap, secrets."""

from __future__ import annotations

import os

import pytest
import yaml

from distrain.launch import checks, job, probe, workdir
from tests.helpers import CLUSTER, ROOT, sparse_file

# ------------------------------------------------------------------------------------------- working directory


def test_runtime_env_yaml_is_the_default_and_keeps_data_out(tmp_path):
    env, source = workdir.load_runtime_env(None, ROOT)
    assert source == str(CLUSTER / "runtime_env.yaml")
    assert env["excludes"] == workdir.DEFAULT_EXCLUDES
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
    wd = workdir.scan_working_dir(tmp_path, env["excludes"])
    assert set(wd.files) == {"distrain/__init__.py", "distrain/data/loader.py", "configs/a.yaml",
                             "cluster/Dockerfile"}
    # The repository itself uploads code only.
    repo = workdir.scan_working_dir(ROOT, env["excludes"])
    tops = {p.split("/")[0] for p in repo.files}
    assert {"distrain", "configs", "cluster"} <= tops
    assert not tops & {".git", ".venv", "data", "outputs", "wandb", ".cache"}
    assert any(p.startswith("distrain/data/") for p in repo.files)
    assert workdir.check_working_dir(repo).status == "ok"


def test_working_dir_over_the_cap_is_refused_naming_the_largest_files(tmp_path):
    mib = 1024**2
    sparse_file(tmp_path / "notebooks" / "features.npy", 60 * mib)
    sparse_file(tmp_path / "weights" / "backbone.pth", 45 * mib)
    sparse_file(tmp_path / "weights" / "head.pth", 2 * mib)
    sparse_file(tmp_path / ".git" / "objects" / "pack" / "huge.pack", 900 * mib)  # excluded: does not count
    sparse_file(tmp_path / "data" / "shards" / "train-0.tar", 900 * mib)  # excluded
    (tmp_path / "train.py").write_text("print('hi')\n")
    wd = workdir.scan_working_dir(tmp_path, workdir.DEFAULT_EXCLUDES)
    assert wd.total_bytes == 107 * mib + len("print('hi')\n")
    check = workdir.check_working_dir(wd)
    assert check.status == "fail"
    assert "notebooks/features.npy (60.0 MiB)" in check.detail and "weights/backbone.pth (45.0 MiB)" in check.detail
    assert check.detail.index("features.npy") < check.detail.index("backbone.pth") < check.detail.index("head.pth")
    assert "weights/ (47.0 MiB)" in check.detail  # largest top-level entries
    assert "huge.pack" not in check.detail and "train-0.tar" not in check.detail
    # Excluding the biggest file brings it under the cap.
    smaller = workdir.scan_working_dir(tmp_path, [*workdir.DEFAULT_EXCLUDES, "/notebooks/"])
    assert workdir.check_working_dir(smaller).status == "ok"
    assert workdir.WORKING_DIR_CAP == 100 * mib


def test_runtime_env_file_and_env_flags_refuse_secrets(tmp_path):
    bad = tmp_path / "runtime_env.yaml"
    bad.write_text(yaml.safe_dump({"excludes": [".git/"], "env_vars": {"WANDB_API_KEY": "abc"}}))
    with pytest.raises(checks.SubmitRefused, match="WANDB_API_KEY: secrets do not belong in a file"):
        workdir.load_runtime_env(bad, tmp_path)
    bad.write_text(yaml.safe_dump({"working_dir": "."}))
    with pytest.raises(checks.SubmitRefused, match="'working_dir' is set by `distrain submit --working-dir`"):
        workdir.load_runtime_env(bad, tmp_path)
    # --env with a secret is refused before anything is contacted (the address leads nowhere).
    opts = job.SubmitOptions(address="http://127.0.0.1:1", working_dir=str(ROOT), env={"HF_TOKEN": "x"})
    with pytest.raises(checks.SubmitRefused, match=r"--env HF_TOKEN=\.\.\.: secrets on a command line"):
        job.prepare(["train", "--set", "train.epochs=1"], opts, log=lambda s: None)


def test_command_and_config_path_checks(tmp_path):
    with pytest.raises(checks.SubmitRefused, match="expected a distrain command after `--`"):
        job.parse_command(["python", "train.py"])
    with pytest.raises(checks.SubmitRefused, match=r"config key 'optim\.lrr'"):
        job.parse_command(["train", "--set", "optim.lrr=1"])
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "run.yaml").write_text("train:\n  epochs: 1\n")
    (project / "data").mkdir()
    (project / "data" / "run.yaml").write_text("train:\n  epochs: 1\n")  # excluded folder
    (tmp_path / "elsewhere.yaml").write_text("train:\n  epochs: 1\n")
    wd = workdir.scan_working_dir(project, workdir.DEFAULT_EXCLUDES)
    local = probe.Cluster("http://127.0.0.1:8265", [probe.Node("127.0.0.1", 2, 0, True)], local=True)
    remote = probe.Cluster("http://10.0.0.5:8265", [probe.Node("10.0.0.5", 8, 1, True)], local=False)
    cwd = os.getcwd()
    os.chdir(project)
    try:
        argv = ["train", "--config", "configs/run.yaml", "--set", "data.shards=data/shards"]
        _, args, cfg = job.parse_command(argv)
        job_argv, overrides, found = workdir.job_paths(cfg, argv, args, wd, local)
        assert [c.status for c in found] == ["ok", "ok"]
        # Relative paths become absolute for a cluster on this machine; later --set wins in load_config.
        assert overrides == {"data.shards": str(project / "data/shards"),
                             "scaling.storage_path": str(project / "outputs")}
        assert job_argv[-4:] == ["--set", f"data.shards={project}/data/shards",
                                 "--set", f"scaling.storage_path={project}/outputs"]
        _, _, found = workdir.job_paths(cfg, argv, args, wd, remote)
        fail = [c for c in found if c.status == "fail"]
        assert len(fail) == 1 and "data.shards='data/shards', scaling.storage_path='outputs'" in fail[0].detail
        for config, message in [("data/run.yaml", "excluded from the upload"),
                                (str(tmp_path / "elsewhere.yaml"), "outside the working directory")]:
            argv = ["train", "--config", config]
            _, args, cfg = job.parse_command(argv)
            _, _, found = workdir.job_paths(cfg, argv, args, wd, local)
            assert found[0].status == "fail" and message in found[0].detail
    finally:
        os.chdir(cwd)


