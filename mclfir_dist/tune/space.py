"""A search space: {config key: spec}, spec one of {log: [lo, hi]} (log-uniform), {uniform: [lo, hi]},
{int: [lo, hi]} or {choices: [a, b, ...]}. From a YAML file, or the method's own `tune_space` (every built-in
method has one; a plug-in method declares its own). Every key and every bound is checked against the config
before anything runs: a wrong key or value is the config's own one-line error."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import ConfigError

KINDS = ("log", "uniform", "int", "choices")


def load_space(path: Optional[str], method: str) -> Dict[str, dict]:
    """The space of a YAML file, or the method's default; checked for shape (not yet against the config)."""
    if path is None:
        from ..methods import METHODS
        space = dict(getattr(METHODS.get(method), "tune_space", {}) or {})
        if not space:
            raise ConfigError(f"method {method!r} declares no tune_space: give --space SPACE.yaml")
        where = f"method {method!r}'s tune_space"
    else:
        import yaml
        try:
            space = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"--space: no such file: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--space {path}: not YAML ({str(e).splitlines()[0]})") from None
        where = f"--space {path}"
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}: give {{config.key: {{log: [lo, hi]}} | {{uniform: ...}} | {{int: ...}} | "
                          "{choices: [...]}}}")
    return {str(k): _spec(str(k), v, where) for k, v in space.items()}


def _spec(key: str, spec, where: str) -> dict:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{where}: {key}: give exactly one of {', '.join(KINDS)} (got {spec!r})")
    (kind, value), = spec.items()
    if kind == "choices":
        if not isinstance(value, list) or not value or len(set(map(repr, value))) != len(value):
            raise ConfigError(f"{where}: {key}: choices must be a non-empty list of distinct values, got {value!r}")
        return {kind: list(value)}
    if not (isinstance(value, list) and len(value) == 2 and all(_number(x, kind) for x in value)):
        raise ConfigError(f"{where}: {key}: {kind} takes [low, high], two {'integers' if kind == 'int' else 'numbers'},"
                          f" got {value!r}")
    low, high = value
    if not low < high:
        raise ConfigError(f"{where}: {key}: the range [{low}, {high}] is empty (low must be below high)")
    if kind == "log" and low <= 0:
        raise ConfigError(f"{where}: {key}: a log range must be above 0, got [{low}, {high}]")
    return {kind: [low, high]}


def _number(x, kind: str) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return False
    return isinstance(x, int) if kind == "int" else True


def probe_values(spec: dict) -> List[object]:
    """The values whose config a space is checked with: both bounds, or every choice."""
    (kind, value), = spec.items()
    return list(value)


def check_against_config(space: Dict[str, dict], config: str, overrides: List[str]) -> None:
    """Every key is a config key and every bound or choice a valid value for it (ConfigError names it)."""
    from ..configure import load_config
    for key, spec in space.items():
        for value in probe_values(spec):
            try:
                load_config(config, [*overrides, f"{key}={value}"])
            except ConfigError as e:
                raise ConfigError(f"search space {key}: {e}") from None


def config_point(space: Dict[str, dict], cfg) -> dict:
    """The config's own value of every key (for --start-at-config); ConfigError when one is outside its range."""
    from ..config import to_dict
    flat, point = to_dict(cfg), {}
    for key in space:
        node = flat
        for part in key.split("."):
            node = node[part]
        (kind, value), = space[key].items()
        inside = node in value if kind == "choices" else value[0] <= node <= value[1]
        if not inside:
            raise ConfigError(f"--start-at-config: the config's {key}={node} is outside its space {space[key]}")
        point[key] = node
    return point


def distributions(space: Dict[str, dict]) -> dict:
    """Optuna's distribution for each key (the same for every worker: a study refuses another space)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    out = {}
    for key, spec in space.items():
        (kind, value), = spec.items()
        out[key] = (CategoricalDistribution(value) if kind == "choices" else
                    IntDistribution(value[0], value[1]) if kind == "int" else
                    FloatDistribution(float(value[0]), float(value[1]), log=kind == "log"))
    return out


def grid(space: Dict[str, dict]) -> Dict[str, list]:
    """The grid sampler's values: choices only (a range has no grid)."""
    ranges = [k for k, spec in space.items() if "choices" not in spec]
    if ranges:
        raise ConfigError(f"--sampler grid needs choices for every key; {', '.join(ranges)} "
                          "is a range (write it as {choices: [...]})")
    return {k: spec["choices"] for k, spec in space.items()}


def ladder(spec: dict) -> Optional[list]:
    """The ordered values of a choices knob (for 'interior'), None for a range."""
    return sorted(spec["choices"]) if "choices" in spec and all(_number(x, "float") for x in spec["choices"]) \
        else None
