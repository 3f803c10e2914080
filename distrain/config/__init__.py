"""The one config tree: a run is a config.

Usage:
    from distrain.config import load_config, save_config
    cfg = load_config("configs/fashion_mnist_cpu.yaml", ["optim.lr=3e-4", "data.aug_strength=0.5"])
    cfg.optim.lr                      # 0.0003
    cfg = cfg.replace({"train.epochs": 5})
    save_config(cfg, run_dir + "/config.yaml")

Every component has one frozen dataclass (`schema.py`: data, model, optim, train, scaling, tune, wandb); every
field carries its documentation (the README's config reference is generated from it, and a test keeps the two in
sync). YAML files in `configs/` set fields; `--set a.b=value` overrides them, values parsed as YAML. Parsing is
apart from the schema (`parse.py`): an unknown key or a value of the wrong type raises `ConfigError` naming the key
(and the closest valid one) before any work starts. A Tune search space is a mapping of dotted keys of this same
tree to distributions (`tune.space`).
"""

from distrain.config.parse import (
    PHASE_KEYS,
    Config,
    ConfigError,
    all_keys,
    check_name,
    choices_of,
    from_dict,
    key_type,
    load_config,
    parse_override,
    reference_markdown,
    searchable,
    to_yaml,
)


def save_config(cfg: Config, path: str) -> str:
    """Write the resolved config atomically (local path or fsspec URL); it loads back to the same Config."""
    from distrain.storage import write_text

    write_text(str(path), to_yaml(cfg))
    return str(path)


__all__ = ["PHASE_KEYS", "Config", "ConfigError", "all_keys", "check_name", "choices_of", "from_dict", "key_type",
           "load_config", "parse_override", "reference_markdown", "save_config", "searchable", "to_yaml"]
