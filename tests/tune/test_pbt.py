"""Population Based Training over Ray Train V2 runs, on a real local cluster: weak trials take over a strong trial's
checkpoint (weights, optimizer state, epoch and history) and continue from it with perturbed values; the lineage
is recorded; nothing is left on the cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distrain.config import load_config
from tests.helpers import fast_train_overrides
from tests.tune.test_sweep import live_placement_groups


@pytest.mark.timeout(600)
def test_pbt_exploits_continue_from_the_donors_checkpoint(ray_cluster, tiny_shards, tmp_path):
    from distrain.tune import run_sweep

    groups_before = live_placement_groups()
    # two learning rates that learn these 3 colours in an epoch, two that cannot: PBT's bottom quantile (1 of 4)
    # takes over a top trial's checkpoint after epoch 1. Synchronous PBT: the whole population is compared at
    # epoch 1, whatever order the trials report in (asynchronous PBT exploits only when a top trial happened to
    # report after a weaker one, which made this test a coin toss). Half a CPU per trial, on these 2 cores.
    cfg = load_config(None, fast_train_overrides(tiny_shards, tmp_path, name="unused", **{
        "scaling.num_workers": 1, "scaling.cpus_per_worker": 0.5,
        "train.epochs": 2, "tune.name": "pbt", "tune.scheduler": "pbt",
        "tune.perturbation_interval": 1, "tune.synch": True, "tune.quantile": 0.25, "tune.num_samples": 1,
        "tune.space.optim.lr": "grid([0.003, 1e-7, 0.002, 3e-7])", "tune.max_concurrent_trials": 4}))
    sweep = run_sweep(cfg, restart=True)  # --restart of a sweep that never ran: nothing to remove but its own folder
    s = sweep.summary
    assert s["num_trials"] == 4 and s["num_failed"] == 0 and s["exploits"] >= 1, sweep.format()
    sweep_dir = Path(s["sweep_dir"])
    from distrain.tune.results import exploits_of
    from distrain.tune.trial import lineage

    checked = 0
    for row in sweep.table:
        starts = lineage(str(sweep_dir), row["trial"])
        for x, start in zip(exploits_of(row["trial"], starts), [st for st in starts if st.get("from")]):
            assert x["donor"] != row["trial"] and x["donor"].startswith("trial_")
            e = x["epoch"]
            donor_meta = json.loads((Path(start["from"]) / "meta.json").read_text())
            assert donor_meta["epoch"] == e
            run = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
            # the run continued from the donor's checkpoint: its first epochs are the donor's, metric for metric
            mine = [(h["epoch"], h["train_loss"], h["val_top1"]) for h in run["history"][:e]]
            theirs = [(h["epoch"], h["train_loss"], h["val_top1"]) for h in donor_meta["history"]]
            if row["run_dir"].endswith(f"-g{starts.index(start)}"):
                assert mine == theirs
                # and the epoch right after trained on from the donor's weights, not from a fresh head
                if theirs[-1][2] >= 0.9 and len(run["history"]) > e:
                    assert run["history"][e]["val_top1"] >= 0.8, run["history"]
                checked += 1
    assert checked >= 1
    assert "exploits" in sweep.table[0] and any(r["exploits"] for r in sweep.table)
    best = load_config(s["best_config"])
    assert best.tune.space == {} and best.train.init_from == "" and best.tune.scheduler == "fifo"
    if best.train.phases:  # the winner's values changed along its lineage: replayed as phases
        assert sum(p["epochs"] for p in best.train.phases) == 2
    assert live_placement_groups() <= groups_before
