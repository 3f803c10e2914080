"""Reading a config: YAML files and dotted overrides → one validated, frozen Config.

Usage:
    from distrain.config import load_config, save_config
    cfg = load_config("configs/fashion_mnist_cpu.yaml", ["optim.lr=3e-4", "data.aug_strength=0.5"])
    cfg.optim.lr                      # 0.0003
    save_config(cfg, run_dir / "config.yaml")

How: the defaults become a plain nested dict; the file's values and then the overrides are assigned into it by
dotted key (each key resolved against the schema, so a typo fails naming the key and its closest valid neighbour);
then the dict is built into the frozen dataclasses once, coercing each value by its annotation (`Literal` choices,
`int | Literal["all"]`, finite floats, ranges) and checking the rules that span fields (names, phases). Errors are
`ConfigError`s naming the key and the value, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from distrain.config.schema import NAME_PATTERN, NAME_RULE, ConfigTree


class ConfigError(ValueError):
    """A config file or override that does not fit the config tree."""


# Keys a phase of train.phases may set (its own `epochs` aside): what changes between the steps of a transfer recipe.
PHASE_KEYS = ("model.unfreeze_depth", "optim.lr", "optim.layer_decay", "optim.weight_decay", "optim.warmup_epochs",
              "optim.min_lr_ratio", "data.aug_strength")
_PHASE_KEY = re.compile(r"train\.phases\.(\d+)\.(.+)")


@dataclasses.dataclass(frozen=True)
class Config(ConfigTree):
    """A whole distrain run: the schema's tree (schema.py), validated and frozen."""

    def replace(self, overrides: dict[str, Any]) -> Config:
        """A new, validated config with dotted-key overrides applied (values typed, or YAML strings)."""
        return build(self.to_dict(), list(overrides.items()), source="override", explicit=set(overrides))


# --------------------------------------------------------------------------------------------------- the schema


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every leaf key of the tree, dotted: 'data.shards', 'data.affine.rotation', ..., 'tune.space'."""
    out: list[str] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            out += all_keys(typ, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def key_type(dotted: str) -> tuple[Any, dataclasses.Field]:
    """(annotation, field) of a dotted leaf key; ConfigError naming the closest key when there is none."""
    cls: Any = Config
    parts = dotted.split(".")
    sections = [f.name for f in dataclasses.fields(Config)]
    if parts[0] not in sections:
        raise ConfigError(f"unknown config section '{parts[0]}' in '{dotted}'{_closest(parts[0], sections)}; "
                          f"sections: {', '.join(sections)}")
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            raise ConfigError(f"unknown config key '{dotted}'{_closest(dotted, all_keys())}")
        typ = _hints(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(typ):
                raise ConfigError(f"config key '{dotted}' is a section; set one of its keys "
                                  f"({', '.join(all_keys(typ, dotted + '.'))})")
            return typ, _field(cls, part)
        if not dataclasses.is_dataclass(typ):
            raise ConfigError(f"unknown config key '{dotted}'{_closest(dotted, all_keys())}")
        cls = typ
    raise ConfigError(f"unknown config key '{dotted}'")  # pragma: no cover - the loop always returns


def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def choices_of(typ: Any) -> tuple | None:
    """The values of a Literal annotation (or of the Literal part of a union), else None."""
    if typing.get_origin(typ) is Literal:
        return typing.get_args(typ)
    if typing.get_origin(typ) in (Union, types.UnionType):
        lits = [a for a in typing.get_args(typ) if typing.get_origin(a) is Literal]
        return tuple(v for lit in lits for v in typing.get_args(lit)) or None
    return None


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(typ))
    if typing.get_origin(typ) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(typ))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(typ, getattr(typ, "__name__", str(typ)))


# --------------------------------------------------------------------------------------------------- coercion


def coerce(key: str, value: Any, typ: Any, rng: tuple | None = None) -> Any:
    """`value` checked against the annotation `typ` (and the inclusive range `rng`), converting only where lossless."""
    out = _coerce(key, value, typ)
    if rng and isinstance(out, (int, float)) and not isinstance(out, bool):
        lo, hi = rng
        if (lo is not None and out < lo) or (hi is not None and out > hi):
            bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ConfigError(f"config key '{key}': {out!r} is outside {bounds}")
    return out


def _coerce(key: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(typ):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(typ)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(typ)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        if isinstance(value, str) and value.strip().lower() in allowed:
            return value.strip().lower()
        raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, allowed))}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML reads "1e-3" as a string
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}': {value!r} is not a finite number")
        return number
    if typ is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if typ is list or origin is list:
        if value is None:
            return []
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
    if typ is dict or origin is dict:
        if value is None:
            return {}
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {typ}")  # pragma: no cover - schema types only


# --------------------------------------------------------------------------------------------------- assignment


def _flatten_raw(raw: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """A YAML mapping to (dotted key, value) pairs, opening mappings down to the schema's leaves: a mapping under
    a leaf of type dict (tune.space) stays one value; under a section it is opened up."""
    out: list[tuple[str, Any]] = []
    leaves = set(all_keys())
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in leaves and not dotted.startswith("tune.space."):
            out += _flatten_raw(value, dotted + ".")
        else:
            out.append((dotted, value))
    return out


def _assign(tree: dict, dotted: str, value: Any, source: str) -> None:
    """Put `value` at `dotted` into the plain nested dict `tree` (no coercion yet: that happens once, in build)."""
    m = _PHASE_KEY.fullmatch(dotted)
    if m:  # one key of one phase: train.phases.1.optim.lr (index from 0, as in the YAML list)
        index, key = int(m.group(1)), m.group(2)
        phases = tree["train"]["phases"]
        if not isinstance(phases, list) or index >= len(phases):
            raise ConfigError(f"{source}: '{dotted}' names phase index {index}, but train.phases has "
                              f"{len(phases) if isinstance(phases, list) else 0} phase(s) (indices from 0)")
        phase = dict(phases[index]) if isinstance(phases[index], dict) else {}
        phase[key] = value
        tree["train"]["phases"] = [*phases[:index], phase, *phases[index + 1:]]
        return
    parts = dotted.split(".")
    if parts[0] == "tune" and len(parts) > 2 and parts[1] == "space":
        # A dict field takes the rest as one key: tune.space.optim.lr=... sets space["optim.lr"].
        tree["tune"]["space"] = {**tree["tune"]["space"], ".".join(parts[2:]): value}
        return
    try:
        key_type(dotted)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    node = tree
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def build(tree: dict, items: list[tuple[str, Any]] | None = None, *, source: str = "config",
          explicit: set[str] | None = None) -> Config:
    """Apply (dotted key, value) items to a plain config dict, then build and validate the frozen Config.

    `explicit` holds keys the user set (train.epochs is derived from train.phases unless it is one of them)."""
    tree = _copy(tree)
    explicit = set(explicit or ())
    for key, value in items or []:
        _assign(tree, key, value, source)
        explicit.add(key)
    cfg = _build(Config, tree, "")
    return _check(cfg, explicit)


def _copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy(v) for v in tree]
    return tree


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        typ, key = hints[f.name], f"{prefix}{f.name}"
        raw = values.get(f.name, dataclasses.MISSING)
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, raw if isinstance(raw, dict) else {}, key + ".")
        elif raw is not dataclasses.MISSING:
            kwargs[f.name] = coerce(key, raw, typ, f.metadata.get("range"))
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------- rules


def _check(cfg: Config, explicit: set[str]) -> Config:
    """The rules that span fields; returns the config with derived values (train.epochs from the phases) set."""
    for key in ("train.name", "tune.name"):
        check_name(key, cfg.get(key))
    phases = normalize_phases(cfg.train.phases)
    train = cfg.train
    if phases:
        total = sum(p["epochs"] for p in phases)
        if "train.epochs" in explicit and train.epochs != total:
            raise ConfigError(f"config keys 'train.epochs' ({train.epochs}) and 'train.phases' (epochs summing to "
                              f"{total}) disagree: drop train.epochs (it is the phases' sum) or make them agree")
        train = dataclasses.replace(train, phases=phases, epochs=total)
    cfg = dataclasses.replace(cfg, train=train)
    label = cfg.data.ray_data.node_label
    if label and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*=[A-Za-z0-9][A-Za-z0-9._-]*", label):
        raise ConfigError(f"config key 'data.ray_data.node_label': {label!r} is not key=value (a Ray node label, "
                          f"as in `ray start --labels key=value`)")
    for key in cfg.tune.space:
        if not searchable(key, cfg):
            raise ConfigError(f"config key 'tune.space': '{key}' is not a searchable config key"
                              f"{_closest(key, all_keys())}")
    return cfg


def check_name(key: str, value: str) -> str:
    """A run or sweep name must be one safe path component (it becomes a folder that --restart may delete)."""
    if not re.fullmatch(NAME_PATTERN, value or ""):
        raise ConfigError(f"config key '{key}': {value!r} is not a valid name: use {NAME_RULE}")
    return value


def normalize_phases(phases: list) -> list[dict]:
    """train.phases checked and in canonical form: [{'epochs': 2, 'model.unfreeze_depth': 0, ...}, ...]; errors
    name the phase (from 1, as the console counts them) and the key."""
    out = []
    for i, phase in enumerate(phases):
        where = f"train.phases[{i}] (phase {i + 1})"
        if not isinstance(phase, dict):
            raise ConfigError(f"{where}: expected a mapping like {{epochs: 2, optim.lr: 1e-3}}, got {phase!r}")
        flat = dict(_flatten_raw(phase)) if any(isinstance(v, dict) for v in phase.values()) else dict(phase)
        if "epochs" not in flat:
            raise ConfigError(f"{where}: has no 'epochs'")
        entry = {"epochs": coerce(f"train.phases[{i}].epochs", flat.pop("epochs"), int, (1, None))}
        for key, value in flat.items():
            if key not in PHASE_KEYS:
                raise ConfigError(f"{where}: '{key}' cannot be set per phase{_closest(key, list(PHASE_KEYS))}; "
                                  f"phase keys: epochs, {', '.join(PHASE_KEYS)}")
            typ, f = key_type(key)
            entry[key] = coerce(f"train.phases[{i}].{key}", value, typ, f.metadata.get("range"))
        out.append(entry)
    return out


def searchable(key: str, cfg: Config) -> bool:
    """Whether `key` names a value a sweep could set: a leaf of the tree outside tune.*, or a phase key."""
    m = _PHASE_KEY.fullmatch(key)
    if m:
        return m.group(2) in (*PHASE_KEYS, "epochs") and int(m.group(1)) < len(cfg.train.phases)
    return key in all_keys() and not key.startswith("tune.")


# --------------------------------------------------------------------------------------------------- files


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=3e-4' → ('optim.lr', 0.0003); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml(path: str | Path) -> dict:
    """A config file as a mapping; ConfigError naming the file when it is missing, unreadable or not a mapping."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def from_dict(raw: dict | None, source: str = "config") -> Config:
    """A Config from nested dicts (a YAML file's content, or Config.to_dict()); errors name the key."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    return build(Config().to_dict(), _flatten_raw(raw), source=source)


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Read a YAML config (or the defaults when path is None) and apply dotted overrides."""
    items: list[tuple[str, Any]] = []
    source = "defaults"
    if path:
        items += _flatten_raw(read_yaml(path))
        source = str(path)
    if isinstance(overrides, dict):
        items += list(overrides.items())
    else:
        items += [parse_override(o) for o in overrides or []]
    return build(Config().to_dict(), items, source=source)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, width=100, allow_unicode=True)


def reference_markdown() -> str:
    """The config reference section of the README, generated from the field docs."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        lines.append(f"#### `{section.name}` — {(cls.__doc__ or '').strip()}\n")
        lines.append("| key | default | meaning |")
        lines.append("| --- | --- | --- |")
        lines += _reference_rows(cls, section.name)
        lines.append("")
    return "\n".join(lines)


def _reference_rows(cls: type, prefix: str) -> list[str]:
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            rows += _reference_rows(typ, f"{prefix}.{f.name}")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = choices_of(typ)
        extra = " One of: " + ", ".join(f"`{c}`" for c in choices) + "." if choices and typing.get_origin(typ) \
            is Literal else ""
        help_text = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{prefix}.{f.name}` | `{default!r}` | {help_text}{extra} |")
    return rows
