"""A validated run config, with its registries filled: the built-in families (methods, trunks,
loaders, schedules, distillation types, converters) and the plug-ins.

Plug-ins are Python modules that register things: listed in the config's top-level `plugins` key
(saved with the run, so `--resume` imports them again) or declared by an installed package under
the entry-point group `mclfir_dist.plugins`. Every process imports them before validation, so a
plug-in's method, trunk or config section is valid under `mclfir train` and `accelerate launch`.

config.py holds the schema and never imports the registries' modules; this module does, which is
what keeps the package free of import circles."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from . import config as schema
# the modules that register the built-in family members, imported for that
from . import methods  # noqa: F401  mclfir, finetune, lwf, frozen, static_joint
from .config import RunConfig
from .data import LOADERS, converters  # noqa: F401  torch, torch_gpu, dali; fashionai, deepfashion, darn, zappos
from .model import trunks  # noqa: F401  resnet18..101, efficientnet_lite0
from .plugins import import_plugins, require_saved
from .methods import losses, optim  # noqa: F401  distillation types; lr schedules


__all__ = ["config_from_dict", "import_plugins", "load_config"]


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None) -> RunConfig:
    """YAML file + dotted `key=value` overrides -> validated RunConfig, plug-ins imported first."""
    import_plugins(schema.peek_plugins(path, overrides))
    return schema._load_config(path, overrides)


def config_from_dict(d: dict, where: str = "a saved config") -> RunConfig:
    """A saved config (config.yaml, a checkpoint's) -> RunConfig. The plug-ins it names must be loaded already
    (or trusted: --trust-run-plugins); reading it imports nothing by itself."""
    require_saved(d.get("plugins") or [], where)
    cfg = schema.from_dict(d)
    schema.validate(cfg)
    return cfg
