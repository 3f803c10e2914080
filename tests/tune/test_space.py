"""The search space: dotted config keys → distributions, parsed without eval and checked against the config tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distrain.config import ConfigError, load_config
from distrain.tune.space import Dist, SpaceError, parse_dist, parse_space

ROOT = Path(__file__).resolve().parents[2]



def space_of(**specs) -> dict[str, Dist]:
    return parse_space(load_config(None, {f"tune.space.{k.replace('__', '.')}": v for k, v in specs.items()}))


def test_good_specs_parse_to_their_distributions():
    space = space_of(optim__lr="loguniform(1e-5, 1e-2)", model__unfreeze_depth="choice([0, 1, 2, 4, all])",
                     data__aug_strength="uniform(0.0, 1.0)", data__batch_size="randint(8, 64)",
                     optim__weight_decay="quniform(0, 0.1, 0.01)", optim__name="grid([adamw, sgd])",
                     model__head_hidden="quniform(0, 256, 64)", data__channels_last="choice([true, false])")
    assert space["optim.lr"] == Dist("loguniform", (1e-5, 1e-2))
    assert space["model.unfreeze_depth"].values == [0, 1, 2, 4, "all"]  # bare word → string
    assert space["data.aug_strength"] == Dist("uniform", (0.0, 1.0))
    assert space["data.batch_size"] == Dist("randint", (8, 64))
    assert space["optim.name"].values == ["adamw", "sgd"]
    assert space["data.channels_last"].values == [True, False]
    assert space["model.head_hidden"].extremes() == [0, 256]
    assert str(space["optim.lr"]) == "loguniform(1e-05, 0.01)"

    from ray import tune

    lr = space["optim.lr"].to_tune()
    samples = [lr.sample() for _ in range(200)]
    assert all(1e-5 <= s <= 1e-2 for s in samples)
    ints = [space["data.batch_size"].to_tune().sample() for _ in range(400)]
    assert min(ints) == 8 and max(ints) == 64  # both ends included (ray's randint excludes the upper one)
    q = [space["optim.weight_decay"].to_tune().sample() for _ in range(100)]
    assert all(abs(v / 0.01 - round(v / 0.01)) < 1e-6 for v in q)
    assert space["optim.name"].to_tune() == tune.grid_search(["adamw", "sgd"])


@pytest.mark.parametrize("key,spec,message", [
    ("optim.lr", "loguniform(0, 1e-2)", "0 < lo"),
    ("optim.lr", "loguniform(1e-2, 1e-5)", "lo < hi"),
    ("optim.lr", "uniform(1e-3)", "takes 2 arguments"),
    ("optim.lr", "uniform(1e-3, 1e-2, 3)", "takes 2 arguments"),
    ("optim.lr", "logunifrom(1e-5, 1e-2)", "did you mean 'loguniform'"),
    ("optim.lr", "loguniform(1e-5, 1e-2", "cannot parse"),
    ("optim.lr", "__import__('os').system('true')", "not a distribution"),
    ("optim.lr", "__import__('os')", "unknown distribution '__import__'"),
    ("optim.lr", "choice([1e-3, open('x')])", "not a plain value"),
    ("optim.lr", "uniform(0, 1e-2)", "must be > 0"),
    ("optim.lr", "choice([1e-3, -1])", "must be > 0"),
    ("optim.lr", "choice([])", "non-empty"),
    ("optim.lr", "choice([1e-3, 1e-3])", "twice"),
    ("optim.lr", "uniform(lo=1, hi=2)", "positional"),
    ("optim.lr", "1e-3", "not a distribution"),
    ("optim.lr", [1e-3, 1e-2], "choice([0.001, 0.01])"),
    ("model.unfreeze_depth", "choice([0, 1, two])", "'two'"),
    ("model.unfreeze_depth", "uniform(0, 4)", "takes integers"),
    ("model.unfreeze_depth", "randint(-1, 2)", "-1"),
    ("data.batch_size", "randint(1.5, 8)", "randint takes integers"),
    ("data.batch_size", "quniform(8, 64, 2.5)", "takes integers"),
    ("optim.weight_decay", "quniform(0.01, 0.02, 0.5)", "no multiple"),
    ("data.aug_strength", "uniform(0, 2)", "outside [0.0, 1.0]"),
    ("optim.name", "choice([adam, sgd])", "not one of adamw, sgd"),
    ("optim.name", "uniform(0, 1)", "choice([...])"),
    ("scaling.num_workers", "choice([1, 2])", "cannot be searched"),
    ("data.loader_workers", "choice([0, 2])", "cannot be searched"),
    ("train.name", "choice([a, b])", "cannot be searched"),
])
def test_bad_specs_name_the_key_and_the_problem(key, spec, message):
    with pytest.raises(SpaceError) as err:
        parse_space(load_config(None, {f"tune.space.{key}": spec}))
    assert f"tune.space.{key}" in str(err.value) and message in str(err.value), str(err.value)


def test_unknown_key_and_empty_space_fail_at_load():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'optim\.lr'"):
        load_config(None, ["tune.space.optim.lrr=uniform(0, 1)"])
    with pytest.raises(SpaceError, match="empty"):
        parse_space(load_config(None))
    assert parse_dist("optim.lr", " loguniform( 1e-5 ,1e-2 ) ") == Dist("loguniform", (1e-5, 1e-2))


def test_bad_space_fails_before_ray_starts(tmp_path):
    """Through the CLI, in a fresh process: the error is one line and no Ray cluster or sweep folder appears."""
    out = subprocess.run(
        [sys.executable, "-m", "distrain", "tune", "--set", "tune.space.optim.lr=loguniform(0, 1)",
         "--set", f"scaling.storage_path={tmp_path}", "--set", "data.shards=/nonexistent"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("distrain tune: error: tune.space.optim.lr:")
    assert "Started a local Ray instance" not in out.stderr + out.stdout
    assert not any(tmp_path.iterdir())


def test_config_file_of_the_demo_sweep_is_valid():
    cfg = load_config(ROOT / "configs" / "tune_fashion_mnist_cpu.yaml")
    space = parse_space(cfg)
    assert {"optim.lr", "model.unfreeze_depth", "data.aug_strength"} <= set(space)
    assert cfg.data.shards == "data/fashion-mnist" and cfg.data.train_limit > 0
    assert cfg.tune.scheduler == "asha" and cfg.tune.grace_period < cfg.train.epochs


# ------------------------------------------------------------------------------------------------ planning


