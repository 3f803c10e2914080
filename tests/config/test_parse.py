"""The config tree: loading YAML and overrides, errors that name the key, the rules that span fields, freezing."""

from __future__ import annotations

import dataclasses

import pytest

from distrain.config import Config, ConfigError, load_config, save_config


def test_config_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*did you mean 'optim.lr'"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config section 'optm'.*did you mean 'optim'"):
        load_config(None, ["optm.lr=0.1"])


def test_config_type_choice_and_range_errors():
    with pytest.raises(ConfigError, match=r"'data.batch_size': expected an integer, got 'abc'"):
        load_config(None, ["data.batch_size=abc"])
    with pytest.raises(ConfigError, match=r"'optim.name': 'adam' is not one of adamw, sgd"):
        load_config(None, ["optim.name=adam"])
    with pytest.raises(ConfigError, match=r"'data.aug_strength': 1.5 is outside \[0.0, 1.0\]"):
        load_config(None, ["data.aug_strength=1.5"])
    with pytest.raises(ConfigError, match="model.unfreeze_depth"):
        load_config(None, ["model.unfreeze_depth=some"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(None, ["optim.lr"])
    cfg = load_config(None, ["model.unfreeze_depth=all", "train.tags=a,b", "data.channels_last=no"])
    assert cfg.model.unfreeze_depth == "all" and cfg.train.tags == ["a", "b"]
    assert cfg.data.channels_last is False


def test_config_yaml_override_and_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  batch_size: 32\n  shards: data/pets\noptim:\n  lr: 1e-3\n  name: sgd\n"
                    "tune:\n  space:\n    optim.lr: loguniform(1e-5, 1e-2)\n")
    cfg = load_config(path, ["optim.lr=3e-4", "scaling.num_workers=4"])
    assert cfg.data.batch_size == 32 and cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.name == "sgd"
    assert cfg.scaling.num_workers == 4 and cfg.tune.space == {"optim.lr": "loguniform(1e-5, 1e-2)"}
    saved = save_config(cfg, tmp_path / "saved" / "config.yaml")
    assert load_config(saved).to_dict() == cfg.to_dict()
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=rf"{path.name}.*'optim.learning_rate'"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_tune_space_keys_are_checked():
    cfg = load_config(None, ["tune.space.optim.lr=loguniform(1e-5, 1e-2)",
                             "tune.space.model.unfreeze_depth=choice([0, 1, all])"])
    assert set(cfg.tune.space) == {"optim.lr", "model.unfreeze_depth"}
    with pytest.raises(ConfigError, match=r"'optim.lrr' is not a searchable config key.*mean 'optim.lr'"):
        load_config(None, ["tune.space.optim.lrr=uniform(0, 1)"])
    with pytest.raises(ConfigError, match="'tune.num_samples' is not a searchable"):
        load_config(None, ["tune.space.tune.num_samples=choice([1, 2])"])


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "-x", ".hidden", "x" * 129, "a b"])
def test_run_and_sweep_names_are_one_safe_folder_name(name):
    with pytest.raises(ConfigError, match=r"'train.name'.*not a valid name: use a letter or digit"):
        load_config(None, {"train.name": name})
    with pytest.raises(ConfigError, match=r"'tune.name'.*not a valid name"):
        load_config(None, {"tune.name": name})


def test_good_names_load():
    cfg = load_config(None, {"train.name": "resnet50_v2.1-final", "tune.name": "Sweep3"})
    assert cfg.train.name == "resnet50_v2.1-final" and cfg.tune.name == "Sweep3"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan"), float("inf")])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match=r"'optim.lr': .* is not a finite number"):
        load_config(None, {"optim.lr": value})


@pytest.mark.parametrize("key,value,message", [
    ("data.batch_size", 0, r"'data.batch_size': 0 is outside \[1, inf\]"),
    ("data.batch_size", -4, r"'data.batch_size': -4 is outside"),
    ("scaling.num_workers", 0, r"'scaling.num_workers': 0 is outside"),
    ("data.loader_workers", -1, r"'data.loader_workers': -1 is outside"),
    ("model.unfreeze_depth", -1, r"'model.unfreeze_depth'"),
    ("train.amp", "bf32", r"'train.amp': 'bf32' is not one of auto, bf16, fp16, off"),
    ("scaling.use_gpu", "sometimes", r"'scaling.use_gpu': expected true/false or 'auto'"),
])
def test_bad_numbers_and_choices_name_key_and_value(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {key: value})


def test_config_is_frozen_and_replace_validates_again():
    cfg = load_config(None, ["optim.lr=0.01"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0
    new = cfg.replace({"optim.lr": 0.02, "data.affine.rotation": 40})
    assert (cfg.optim.lr, new.optim.lr, new.data.affine.rotation) == (0.01, 0.02, 40.0)
    with pytest.raises(ConfigError, match="'optim.lr'"):
        cfg.replace({"optim.lr": "fast"})
    assert isinstance(new, Config)


def test_literal_choices_and_unions_are_the_annotations():
    from distrain.config import choices_of, key_type

    assert choices_of(key_type("optim.name")[0]) == ("adamw", "sgd")
    assert choices_of(key_type("model.unfreeze_depth")[0]) == ("all",)
    assert load_config(None, {"model.unfreeze_depth": "3"}).model.unfreeze_depth == 3
    assert load_config(None, {"tune.scheduler": "ASHA"}).tune.scheduler == "asha"


def test_phases_sum_to_epochs_and_bad_phases_name_index_and_key():
    cfg = load_config(None, {"train.phases": [{"epochs": 2, "model.unfreeze_depth": 0, "optim.lr": 1e-3},
                                              {"epochs": 3, "model": {"unfreeze_depth": "all"}, "optim.lr": "1e-4"}]})
    assert cfg.train.epochs == 5
    assert cfg.train.phases[1] == {"epochs": 3, "model.unfreeze_depth": "all", "optim.lr": 1e-4}
    ok = load_config(None, {"train.epochs": 3, "train.phases": [{"epochs": 1}, {"epochs": 2}]})
    assert ok.train.epochs == 3
    with pytest.raises(ConfigError, match=r"'train.epochs' \(4\) and 'train.phases' \(epochs summing to 3\)"):
        load_config(None, {"train.epochs": 4, "train.phases": [{"epochs": 1}, {"epochs": 2}]})
    with pytest.raises(ConfigError, match=r"train.phases\[1\] \(phase 2\): 'optim.momentum' cannot be set per "
                                          r"phase"):
        load_config(None, {"train.phases": [{"epochs": 1}, {"epochs": 1, "optim.momentum": 0.5}]})
    with pytest.raises(ConfigError, match=r"'train.phases\[0\].epochs': 0 is outside"):
        load_config(None, {"train.phases": [{"epochs": 0}]})
    with pytest.raises(ConfigError, match=r"train.phases\[0\] \(phase 1\): has no 'epochs'"):
        load_config(None, {"train.phases": [{"optim.lr": 0.1}]})
    with pytest.raises(ConfigError, match=r"'train.phases\[0\].optim.lr': expected a number"):
        load_config(None, {"train.phases": [{"epochs": 1, "optim.lr": "quick"}]})
    # a phase key of the CLI and of Tune: train.phases.<index>.<key>
    tuned = cfg.replace({"train.phases.1.optim.lr": 3e-4})
    assert tuned.train.phases[1]["optim.lr"] == 3e-4 and tuned.train.epochs == 5
    with pytest.raises(ConfigError, match="names phase index 5"):
        cfg.replace({"train.phases.5.optim.lr": 3e-4})


def test_phases_from_the_command_line():
    cfg = load_config(None, ["train.phases=[{epochs: 1, model.unfreeze_depth: 0}, "
                             "{epochs: 2, model.unfreeze_depth: 3, optim.lr: 0.0003}]"])
    assert cfg.train.epochs == 3 and cfg.train.phases[1]["model.unfreeze_depth"] == 3
    assert load_config(None, ["tune.space.train.phases.1.optim.lr=loguniform(1e-5, 1e-3)",
                              "train.phases=[{epochs: 1}, {epochs: 1}]"]).tune.space


def test_config_file_that_is_not_utf8_or_not_a_mapping(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("train:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(listing)
