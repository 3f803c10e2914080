"""Hyperparameter sweeps with Ray Tune over Ray Train runs, on a real local cluster (CPU, gloo).

Every trial is a Ray Train run (~30 s here, mostly worker start-up), so the sweeps are few and each checks a lot:
one 4-trial ASHA sweep of 2-worker trials (early stop, a failing trial, outputs, clean-up, best.yaml trains), and
one interrupted-then-resumed sweep driven through the CLI in subprocesses. The space parser is tested on its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distrain.config import load_config
from distrain.tune.space import parse_space
from tests.helpers import fast_train_overrides

ROOT = Path(__file__).resolve().parents[2]
# Actor classes a sweep creates: none may outlive it.
TRIAL_ACTORS = {"ResourceTrainable", "DistrainTrial", "ImplicitFunc"}  # Tune's trial actor, by whichever name
SWEEP_ACTORS = TRIAL_ACTORS | {"TrainController", "RayTrainWorker", "PlacementGroupCleaner", "_RunControl",
                               "SynchronizationActor"}


def test_concurrency_comes_from_what_a_trials_workers_hold(monkeypatch):
    from distrain.tune.sweep import SweepError, plan_concurrency

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    two_cpu = load_config(None, {"scaling.num_workers": 2, "data.loader_workers": 0})  # 2 workers × 1 CPU
    assert plan_concurrency(two_cpu, {"CPU": 2.0, "GPU": 0.0}, total_trials=4) == 1  # the driver takes no CPU
    assert plan_concurrency(two_cpu, {"CPU": 9.0, "GPU": 0.0}, total_trials=4) == 4
    assert plan_concurrency(two_cpu, {"CPU": 9.0, "GPU": 0.0}, total_trials=3) == 3
    three_cpu = two_cpu.replace({"data.loader_workers": 2})  # 3 CPUs per worker
    assert plan_concurrency(three_cpu, {"CPU": 16.0, "GPU": 0.0}, total_trials=8) == 2
    gpus = two_cpu.replace({"scaling.use_gpu": "auto", "scaling.gpus_per_worker": 1.0})
    assert plan_concurrency(gpus, {"CPU": 64.0, "GPU": 8.0}, total_trials=10) == 4  # GPUs bind first
    with pytest.raises(SweepError, match="holds 1 trial"):
        plan_concurrency(two_cpu.replace({"tune.max_concurrent_trials": 2}), {"CPU": 2.0, "GPU": 0.0}, 4)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a cluster that may autoscale: the user's number stands
    assert plan_concurrency(two_cpu.replace({"tune.max_concurrent_trials": 3}), {"CPU": 2.0, "GPU": 0.0}, 4) == 3


def test_plans_that_cannot_work_are_refused():
    from distrain.tune.sweep import SweepError, check_plan

    base = {"tune.space.optim.lr": "loguniform(1e-4, 1e-2)", "train.epochs": 3}
    check_plan(cfg := load_config(None, base), parse_space(cfg))
    for extra, message in [({"tune.grace_period": 3}, "ASHA could never stop"),
                           ({"tune.space.train.epochs": "choice([2, 3])"}, "fifo"),
                           ({"tune.search_alg": "optuna", "tune.space.optim.name": "grid([adamw, sgd])"},
                            "cannot search grid"),
                           ({"tune.metric": "val_acc"}, "not reported"),
                           ({"tune.scheduler": "pbt", "tune.perturbation_interval": 3}, "PBT would never exploit"),
                           ({"tune.scheduler": "pbt", "tune.space": {"model.unfreeze_depth": "choice([1, 2])"}},
                            "besides model.unfreeze_depth"),
                           ({"tune.scheduler": "pbt", "tune.space.train.epochs": "choice([2, 3])"}, "fixed for it")]:
        cfg = load_config(None, {**base, **extra})
        with pytest.raises(SweepError, match=message):
            check_plan(cfg, parse_space(cfg))


def test_a_pbt_winner_is_replayed_as_phases_along_its_lineage():
    """best.yaml of a PBT sweep: the winner trained epochs 1-2 as its donor (lr 0.003, itself from the start), then
    epoch 3 with its own perturbed lr: two phases reproduce that."""
    from distrain.tune.results import TrialRecord, best_config, pbt_schedule

    a = TrialRecord("trial_a", {"optim.lr": 0.003}, "", 3, starts=[{"params": {"optim.lr": 0.003}}])
    b = TrialRecord("trial_b", {"optim.lr": 0.0024}, "", 3, starts=[
        {"params": {"optim.lr": 1e-7}},
        {"params": {"optim.lr": 0.0024}, "from": "/s/trial_a/checkpoint_000001", "donor": "trial_a",
         "start_epoch": 2}])
    assert pbt_schedule("trial_b", 3, {"trial_a": a, "trial_b": b}) == [(2, {"optim.lr": 0.003}),
                                                                        (1, {"optim.lr": 0.0024})]
    cfg = load_config(None, {"tune.scheduler": "pbt", "train.epochs": 3, "tune.name": "p",
                             "tune.space.optim.lr": "loguniform(1e-7, 1e-2)"})
    best = best_config(cfg, b, [a, b])
    assert best.train.phases == [{"epochs": 2, "optim.lr": 0.003}, {"epochs": 1, "optim.lr": 0.0024}]
    assert best.tune.scheduler == "fifo" and best.tune.space == {} and best.train.epochs == 3


def test_asha_rungs_are_epochs_below_the_last():
    from distrain.tune.sweep import make_scheduler

    for epochs, rungs in [(2, [1]), (3, [2, 1]), (4, [2, 1]), (9, [8, 4, 2, 1])]:
        cfg = load_config(None, {"train.epochs": epochs, "tune.grace_period": 1, "tune.reduction_factor": 2})
        scheduler = make_scheduler(cfg)
        assert [m for m, _ in scheduler._brackets[0]._rungs] == rungs  # no stop at the last epoch: it saves nothing


def test_searchers_sample_inside_the_space():
    from ray.tune.search.variant_generator import generate_variants

    from distrain.tune.sweep import make_searcher

    cfg = load_config(None, {"tune.space.optim.lr": "loguniform(1e-4, 1e-2)", "tune.search_alg": "optuna",
                             "tune.space.model.unfreeze_depth": "choice([0, 1, all])"})
    space = parse_space(cfg)
    optuna = make_searcher(cfg, total_trials=4, concurrency=2)
    assert optuna.set_search_properties("val_top1", "max", {k: d.to_tune() for k, d in space.items()})
    picks = [optuna.suggest(f"t{i}") for i in range(3)]
    assert picks[2] is None  # the concurrency limit: two trials at once
    for pick in picks[:2]:
        assert 1e-4 <= pick["optim.lr"] <= 1e-2 and pick["model.unfreeze_depth"] in (0, 1, "all")
    grid = load_config(None, {"tune.space.optim.lr": "grid([0.1, 0.2])", "tune.space.data.aug_strength":
                              "grid([0, 0.5])"})
    variants = [v for _, v in generate_variants({k: d.to_tune() for k, d in parse_space(grid).items()})]
    assert len(variants) == 4 and {(v["optim.lr"], v["data.aug_strength"]) for v in variants} == {
        (0.1, 0), (0.1, 0.5), (0.2, 0), (0.2, 0.5)}


# ------------------------------------------------------------------------------------------------ a real sweep


def sweep_overrides(shards, storage, name, **extra) -> dict:
    """Tiny 2-epoch trials; grid() fixes the trial order, so the ASHA decisions below are certain."""
    overrides = fast_train_overrides(shards, storage, name="unused", **{
        "tune.name": name, "tune.num_samples": 1, "tune.scheduler": "asha", "tune.grace_period": 1,
        "tune.reduction_factor": 2})
    overrides.update(extra)
    return overrides


@pytest.fixture(scope="module")
def asha_sweep(ray_cluster, tiny_shards, tmp_path_factory):
    """3 trials of 2 workers, one at a time on 2 CPUs: a good lr (runs to the end, sets the rungs), a tiny lr
    (stopped at epoch 1 by ASHA) and a huge lr (non-finite loss: fails). Four epochs, so that the
    stopped trial still has epochs to go when Tune's decision reaches it (~1 s after its first report)."""
    from distrain.tune import run_sweep
    from distrain.tune.sweep import own_placement_groups

    storage = tmp_path_factory.mktemp("sweeps")
    groups_before = {g["placement_group_id"] for g in own_placement_groups()}
    actors_before = {a.actor_id for a in live_sweep_actors()}  # earlier tests' runs: not this sweep's to release
    cfg = load_config(None, sweep_overrides(tiny_shards, storage, "asha", **{
        "tune.space.optim.lr": "grid([0.003, 1e-7, 1e12])", "train.epochs": 4}))
    sweep = run_sweep(cfg)
    return cfg, sweep, (groups_before, actors_before)


def _actor_name(actor) -> str:  # 'with_resources.<locals>.ResourceTrainable' → 'ResourceTrainable'
    return actor.class_name.split(".")[-1]


def live_sweep_actors() -> list:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000, raise_on_missing_output=False)
    return [a for a in actors if a.state != "DEAD" and _actor_name(a) in SWEEP_ACTORS]


def by_lr(sweep) -> dict[float, dict]:
    return {row["optim.lr"]: row for row in sweep.table}


@pytest.mark.timeout(600)
def test_sweep_stops_early_records_failure_and_picks_best(asha_sweep):
    cfg, sweep, _ = asha_sweep
    s, rows = sweep.summary, by_lr(sweep)
    assert s["num_trials"] == 3 and len(rows) == 3
    assert rows[0.003]["status"] == "completed" and rows[0.003]["epochs"] == 4
    assert rows[0.003]["best_val_top1"] >= 0.8  # 3 learnable classes: chance is 0.33
    # lr 1e-7 learns nothing in epoch 1: below the rung set by the first trial, so ASHA stops it there; its workers
    # stop after the step during which the decision reaches them (an epoch here is ~0.5 s), and the table counts
    # what was trained.
    assert rows[1e-7]["status"] == "stopped early by ASHA" and rows[1e-7]["epochs"] < 4
    assert rows[1e-7]["best_val_top1"] < rows[0.003]["best_val_top1"]
    # lr 1e12 makes the loss non-finite: the trial fails with the training loop's reason, the sweep goes on.
    assert rows[1e12]["status"].startswith("failed: loss/gradients became non-finite at epoch 1")
    assert s["num_failed"] == 1 and s["num_stopped"] >= 1 and s["num_completed"] >= 1
    assert s["best_trial"] == rows[0.003]["trial"]
    assert s["best_val_top1"] == max(r["best_val_top1"] for r in sweep.table if r["best_val_top1"] is not None)
    assert s["resumed"] is False

    sweep_dir = Path(s["sweep_dir"])
    assert sweep_dir == Path(cfg.scaling.storage_path) / "asha"
    import csv

    with open(s["trials_csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["trial"] for r in csv_rows] == [r["trial"] for r in sweep.table]
    assert {r["status"].split(":")[0] for r in csv_rows} >= {"completed", "stopped early by ASHA", "failed"}
    assert json.loads((sweep_dir / "summary.json").read_text())["best_trial"] == s["best_trial"]
    assert (sweep_dir / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # Every trial ran once, as a Ray Train run in the sweep folder (W&B and Train run name = trial name).
    from distrain.tune.trial import attempts

    for row in sweep.table:
        assert attempts(str(sweep_dir), row["trial"]) == 1
        assert Path(row["run_dir"]).parent == sweep_dir / "runs"
        assert (Path(row["run_dir"]) / "config.yaml").exists()


@pytest.mark.timeout(120)
def test_nothing_is_left_on_the_cluster(asha_sweep):
    """Stopped and failed trials released their workers: no placement group or sweep actor is left."""
    import ray
    from ray.util.state import list_actors

    from distrain.tune.sweep import own_placement_groups

    _, _, (groups_before, actors_before) = asha_sweep
    assert {g["placement_group_id"] for g in own_placement_groups()} <= groups_before
    actors = list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000, raise_on_missing_output=False)
    names = {_actor_name(a) for a in actors}
    assert {"TrainController", "RayTrainWorker"} <= names and names & TRIAL_ACTORS  # the names checked are real
    assert not [a.class_name for a in live_sweep_actors() if a.actor_id not in actors_before]
    deadline = time.monotonic() + 15  # freed resources reach the scheduler's view within a heartbeat or two
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


@pytest.mark.timeout(300)
def test_best_yaml_and_best_model_are_ready_to_use(asha_sweep, tmp_path):
    from distrain.models.folder import load_model_dir
    from distrain.train import fit

    cfg, sweep, _ = asha_sweep
    s = sweep.summary
    best = load_config(s["best_config"])
    assert best.optim.lr == s["best_params"]["optim.lr"]
    assert best.tune.space == {} and best.train.name == "asha_best"
    assert best.data.shards == cfg.data.shards and best.model.backbone == cfg.model.backbone
    model = load_model_dir(s["best_model"])
    assert model.classes == ["class_0", "class_1", "class_2"]
    assert model.meta["provenance"]["trial"] == s["best_trial"]
    # best.yaml is a `distrain train` config: it trains as it is (one epoch here, to keep the test short).
    summary = fit(best.replace({"train.epochs": 1, "scaling.storage_path": str(tmp_path)}))
    assert summary["epochs"] == 1 and summary["best_val_top1"] >= 0.6
    assert Path(summary["run_dir"]) == tmp_path / "asha_best"


# ------------------------------------------------------------------------------------------------ resume


def live_placement_groups() -> set[str]:
    """Placement groups of any job on the cluster that are not removed."""
    import ray
    from ray.util.state import list_placement_groups

    return {g.placement_group_id for g in list_placement_groups(
        address=ray.get_runtime_context().gcs_address, filters=[("state", "!=", "REMOVED")],
        raise_on_missing_output=False)}


def experiment_status(sweep_dir: Path) -> dict[str, str]:
    """Trial id → status, as Tune's saved experiment state records it."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except ValueError:  # being written
        return {}
    return {json.loads(t[0])["trial_id"]: json.loads(t[0])["status"] for t in data["trial_data"]}


RESUMED_SWEEPS = {
    # The searched key is a phase-2 key of a head-first, then-deeper recipe (issue 18): the sweep covers both.
    "fifo": {"tune.space.train.phases.1.optim.lr": "grid([0.003, 0.002])", "tune.scheduler": "fifo",
             "train.phases": "[{epochs: 1, model.unfreeze_depth: 0}, {epochs: 1, model.unfreeze_depth: 2}]"},
    # Synchronous PBT, one trial at a time: the first trial pauses at epoch 1 until the second gets there, the
    # weaker one takes over the stronger's checkpoint, and the sweep is killed after the first trial ends.
    "pbt": {"tune.space.optim.lr": "grid([0.003, 1e-7])", "tune.scheduler": "pbt", "tune.synch": True,
            "tune.perturbation_interval": 1, "tune.quantile": 0.5},
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scheduler", list(RESUMED_SWEEPS))
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, tiny_shards, tmp_path, scheduler):
    """Run the CLI in a subprocess, kill it once the first trial is recorded as finished, run it again."""
    import ray

    from distrain.tune.trial import attempts

    groups_before = live_placement_groups()
    overrides = sweep_overrides(tiny_shards, tmp_path, "resume", **{
        "scaling.num_workers": 1, "tune.max_concurrent_trials": 1, "train.epochs": 2, **RESUMED_SWEEPS[scheduler]})
    command = [sys.executable, "-m", "distrain", "tune"] + [a for k, v in overrides.items()
                                                           for a in ("--set", f"{k}={v}")]
    # The subprocesses join this session's cluster, as `distrain tune` joins a user's cluster.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    sweep_dir = tmp_path / "resume"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and first.poll() is None:
            if "TERMINATED" in experiment_status(sweep_dir).values():
                break
            time.sleep(1)
        assert first.poll() is None, f"the first run ended early:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
        first.send_signal(signal.SIGKILL)  # the harshest interruption: no chance to save anything more
    finally:
        first.kill()
        first.wait()
        log.close()
    status = experiment_status(sweep_dir)
    done = [tid for tid, st in status.items() if st == "TERMINATED"]
    assert len(done) == 1, status
    done_name = f"trial_{done[0]}"
    done_summary = sweep_dir / "runs" / done_name / "summary.json"
    stamp = done_summary.stat().st_mtime_ns
    starts = attempts(str(sweep_dir), done_name)
    assert starts == 1 if scheduler == "fifo" else starts >= 1  # (a PBT trial restarts after each pause)

    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # the console: distrain's lines (one per trial event) and the final table, not Tune's boxed tables
    lines = [ln for ln in (second.stdout + second.stderr).splitlines() if ln.strip()]
    assert len(lines) <= 80 and not [ln for ln in lines if "╭" in ln or "(RayTrainWorker" in ln], "\n".join(lines)
    key = next(k for k in RESUMED_SWEEPS[scheduler] if k.startswith("tune.space."))[len("tune.space."):]
    assert any(f" starts: {key}=" in ln for ln in lines), "\n".join(lines)
    figures = json.loads(second.stdout.strip().splitlines()[-1])  # the last line is the JSON
    assert figures["resumed"] is True and figures["num_trials"] == 2 and figures["num_completed"] == 2, (
        second.stdout[-3000:] + second.stderr[-2000:])  # the trial table names the other trial's status
    assert set(figures) >= {"best_val_top1", "best_config", "trials_csv", "best_model", "num_trials"}
    assert Path(figures["best_config"]).exists() and Path(figures["best_model"], "config.json").exists()
    # The finished trial was not run again: no new start, its run folder untouched.
    assert attempts(str(sweep_dir), done_name) == starts
    assert done_summary.stat().st_mtime_ns == stamp
    import csv

    with open(figures["trials_csv"]) as f:
        trials = {r["trial"]: r for r in csv.DictReader(f)}
    assert len(trials) == 2 and trials[done_name]["status"] == "completed"
    other = next(name for name in trials if name != done_name)
    assert trials[other]["status"] == "completed" and attempts(str(sweep_dir), other) >= 1
    assert (sweep_dir / "runs" / other / "summary.json").exists()
    assert live_placement_groups() <= groups_before  # the killed run's groups went with its job
    if scheduler == "pbt":
        assert "exploits" in figures and all(t["status"] == "completed" for t in trials.values())
        return
    # each trial ran both phases, phase 2 at its own searched learning rate
    lrs = set()
    for name in trials:
        run_summary = json.loads((sweep_dir / "runs" / name / "summary.json").read_text())
        assert [h["phase"] for h in run_summary["history"]] == [1, 2]
        lrs.add(load_config(str(sweep_dir / "runs" / name / "config.yaml")).train.phases[1]["optim.lr"])
    assert lrs == {0.003, 0.002}

    # A changed config is refused rather than mixed into the sweep.
    changed = [*command, "--set", "optim.weight_decay=0.1"]
    third = subprocess.run(changed, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert third.returncode == 2 and "optim.weight_decay: 0.05 → 0.1" in third.stderr, third.stderr[-2000:]
