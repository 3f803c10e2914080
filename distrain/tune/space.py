"""The search space: dotted config keys → distributions, parsed without eval and checked against the config tree.

Usage:
    from distrain.tune.space import parse_space
    space = parse_space(cfg)     # {'optim.lr': Dist('loguniform', (1e-05, 0.01)), ...}; raises SpaceError
    space["optim.lr"].to_tune()  # a ray.tune domain (tune.loguniform(1e-05, 0.01))
    str(space["optim.lr"])       # 'loguniform(1e-05, 0.01)'

Written in the config as `tune.space` (YAML, or `--set tune.space.optim.lr="loguniform(1e-5, 1e-2)"`):

    loguniform(lo, hi)      floats, log-uniform on [lo, hi], 0 < lo < hi (learning rates, weight decay)
    uniform(lo, hi)         floats, uniform on [lo, hi]
    quniform(lo, hi, q)     uniform rounded to a multiple of q (integer keys take integer lo, hi, q)
    randint(lo, hi)         integers lo..hi, both ends included
    choice([a, b, ...])     one of the values, sampled; bare words are strings: choice([0, 1, 2, all])
    grid([a, b, ...])       every value in turn: each grid point is run tune.num_samples times (random search only)

Every spec is checked before any trial starts: the function name and its argument count, the range, and that every
value the distribution can produce is a valid value of its key (the key's type and range from distrain/config.py,
e.g. `model.unfreeze_depth` takes integers >= 0 or `all`, `optim.lr` must be > 0). Keys that fix a trial's resources
or identity (`scaling.*`, `data.loader_workers`, `train.name`) cannot be searched: the sweep plans concurrency from
them.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from distrain.config import Config, ConfigError

# name → (number of arguments, how it is written)
KINDS: dict[str, tuple[int, str]] = {
    "loguniform": (2, "loguniform(lo, hi)"),
    "uniform": (2, "uniform(lo, hi)"),
    "quniform": (3, "quniform(lo, hi, q)"),
    "randint": (2, "randint(lo, hi)"),
    "choice": (1, "choice([a, b, ...])"),
    "grid": (1, "grid([a, b, ...])"),
}
NUMERIC = ("loguniform", "uniform", "quniform", "randint")

# Keys a sweep cannot vary: they set a trial's resources (which concurrency is planned from) or its identity.
RESERVED_PREFIXES = ("scaling.", "tune.")
RESERVED_KEYS = ("train.name", "data.loader_workers")
# Keys whose config range allows 0 but where a searched 0 only wastes a trial.
STRICTLY_POSITIVE = ("optim.lr",)


class SpaceError(ConfigError):
    """A search-space entry that is not a valid distribution for its key."""


@dataclass(frozen=True)
class Dist:
    """One parsed distribution."""

    kind: str
    args: tuple

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(_fmt(a) for a in self.args)})"

    @property
    def values(self) -> list | None:
        """The finite set of values (choice, grid), or None for a range."""
        return list(self.args[0]) if self.kind in ("choice", "grid") else None

    def extremes(self) -> list:
        """Values that bound what the distribution produces: every value of a set, both ends of a range."""
        if self.values is not None:
            return self.values
        lo, hi = self.args[0], self.args[1]
        if self.kind == "quniform":
            q = self.args[2]
            lo, hi = math.ceil(lo / q - 1e-9) * q, math.floor(hi / q + 1e-9) * q
            lo, hi = _tidy(lo, q), _tidy(hi, q)
        return [lo, hi]

    def to_mutation(self):
        """PBT's hyperparam_mutations entry: a distribution to perturb or resample (lists are resampled from)."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        return self.to_tune()

    def to_tune(self):
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "quniform":
            return tune.quniform(*self.args)
        if self.kind == "randint":
            return tune.randint(self.args[0], self.args[1] + 1)  # ray's upper bound is exclusive, ours is not
        if self.kind == "choice":
            return tune.choice(self.values)
        return tune.grid_search(self.values)


def _tidy(x: float, q: float) -> float | int:
    """A multiple of q without float noise (0.30000000000000004 → 0.3); ints stay ints."""
    if isinstance(q, int) and float(x).is_integer():
        return int(x)
    return round(x, 12)


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# ------------------------------------------------------------------------------------------------ parsing


def _literal(node: ast.AST, where: str) -> Any:
    """A value from the spec's syntax tree: numbers, strings, bare words (as strings), true/false, lists."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
        return node.value
    if isinstance(node, ast.Constant) and node.value is None:
        raise SpaceError(f"{where}: None is not a config value")
    if isinstance(node, ast.Name):  # a bare word: `all`, `adamw`; true/false as in YAML
        low = node.id.lower()
        return low == "true" if low in ("true", "false") else node.id
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, where)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, where) for e in node.elts]
    raise SpaceError(f"{where}: {ast.unparse(node)!r} is not a plain value (numbers, words, quoted strings, "
                     f"true/false and [lists] only)")


def parse_dist(key: str, spec: Any) -> Dist:
    """'loguniform(1e-5, 1e-2)' → Dist('loguniform', (1e-05, 0.01)); checks syntax and argument counts only."""
    where = f"tune.space.{key}"
    forms = ", ".join(form for _, form in KINDS.values())
    if not isinstance(spec, str):
        hint = f" (for a set of values write choice({_fmt(list(spec))}))" if isinstance(spec, list) else ""
        raise SpaceError(f"{where}: expected a distribution string like 'loguniform(1e-5, 1e-2)', got "
                         f"{spec!r}{hint}; distributions: {forms}")
    try:
        tree = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError:
        raise SpaceError(f"{where}: cannot parse {spec!r}; distributions: {forms}") from None
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
        raise SpaceError(f"{where}: {spec!r} is not a distribution; distributions: {forms}")
    kind = tree.func.id
    if kind not in KINDS:
        import difflib

        close = difflib.get_close_matches(kind, list(KINDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SpaceError(f"{where}: unknown distribution '{kind}'{hint}; distributions: {forms}")
    if tree.keywords:
        raise SpaceError(f"{where}: {kind} takes positional arguments only: {KINDS[kind][1]}")
    nargs, form = KINDS[kind]
    if len(tree.args) != nargs:
        raise SpaceError(f"{where}: {kind} takes {nargs} argument{'s' * (nargs > 1)} ({form}), got "
                         f"{len(tree.args)} in {spec!r}")
    args = tuple(_literal(a, f"{where}: {spec!r}") for a in tree.args)
    return _check_args(where, spec, Dist(kind, args))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_args(where: str, spec: str, d: Dist) -> Dist:
    if d.kind in ("choice", "grid"):
        values = d.args[0]
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{where}: {d.kind} takes one non-empty [list] of values, got {spec!r}")
        if len({repr(v) for v in values}) != len(values):
            raise SpaceError(f"{where}: {spec!r} lists a value twice")
        return d
    if not all(_is_number(a) for a in d.args):
        raise SpaceError(f"{where}: {d.kind} takes finite numbers, got {spec!r}")
    lo, hi = d.args[0], d.args[1]
    if not lo < hi:
        raise SpaceError(f"{where}: {spec!r} needs lo < hi (a single value is not a search: set the key in the "
                         f"config instead)")
    if d.kind == "loguniform" and lo <= 0:
        raise SpaceError(f"{where}: {spec!r}: loguniform needs 0 < lo")
    if d.kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise SpaceError(f"{where}: {spec!r}: randint takes integers")
    if d.kind == "quniform":
        q = d.args[2]
        if q <= 0:
            raise SpaceError(f"{where}: {spec!r}: the step q must be > 0")
        lo_q, hi_q = d.extremes()
        if lo_q > hi_q:
            raise SpaceError(f"{where}: {spec!r}: no multiple of {_fmt(q)} lies in [{_fmt(lo)}, {_fmt(hi)}]")
    return Dist(d.kind, tuple(float(a) if d.kind in ("loguniform", "uniform") else a for a in d.args))


# ------------------------------------------------------------------------------------------------ checking


def _annotation(key: str) -> Any:
    phase = re.fullmatch(r"train\.phases\.\d+\.(.+)", key)
    if phase:  # a phase key has the type of the key it overrides in that phase
        key = phase.group(1)
        if key == "epochs":
            return int
    section, name = key.split(".", 1)
    cls = next(f.default_factory for f in dataclasses.fields(Config) if f.name == section)
    return typing.get_type_hints(cls)[name]


def _kinds_of(typ: Any) -> set[type]:
    args = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else (typ,)
    return {typing.get_origin(a) or a for a in args}


def check_dist(key: str, d: Dist, base: Config) -> None:
    """Every value `d` can produce must be a valid value of `key` (type and range), checked on `base`."""
    where = f"tune.space.{key}"
    kinds = _kinds_of(_annotation(key))
    if d.kind in NUMERIC:
        if not kinds & {int, float}:
            names = "/".join(sorted(getattr(t, "__name__", str(t)) for t in kinds))
            raise SpaceError(f"{where}: {d} is numeric but {key} takes a {names}: use choice([...]) or grid([...])")
        integral = float not in kinds
        if integral and (d.kind in ("loguniform", "uniform")
                         or (d.kind == "quniform" and not all(float(a).is_integer() for a in d.args))):
            raise SpaceError(f"{where}: {key} takes integers but {d} yields fractions: use randint(lo, hi), "
                             f"quniform with integer lo, hi and q, or choice([...])")
    for value in d.extremes():
        if key in STRICTLY_POSITIVE and _is_number(value) and value <= 0:
            raise SpaceError(f"{where}: {d} can yield {_fmt(value)}, but {key} must be > 0")
        try:
            base.replace({key: value})
        except ConfigError as e:
            raise SpaceError(f"{where}: {d} can yield {_fmt(value)}, which the config rejects: {e}") from None


def parse_space(cfg: Config) -> dict[str, Dist]:
    """Parse and check all of cfg.tune.space. Raises SpaceError naming the first bad key or value."""
    if not cfg.tune.space:
        raise SpaceError("tune.space is empty: nothing to search (e.g. tune.space.optim.lr="
                         "'loguniform(1e-5, 1e-2)')")
    space: dict[str, Dist] = {}
    for key, spec in cfg.tune.space.items():
        if key.startswith(RESERVED_PREFIXES) or key in RESERVED_KEYS:
            raise SpaceError(f"tune.space.{key}: cannot be searched (it sets a trial's resources or name, which "
                             f"the sweep plans concurrency and folders from); set it in the config instead")
        d = parse_dist(key, spec)
        check_dist(key, d, cfg)
        space[key] = d
    return space


def num_grid_points(space: dict[str, Dist]) -> int:
    """How many combinations the grid() entries span (1 without grids)."""
    n = 1
    for d in space.values():
        if d.kind == "grid":
            n *= len(d.values or [])
    return n
