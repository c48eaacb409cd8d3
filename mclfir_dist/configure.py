"""A validated run config, with its registries filled: the built-in families (methods, trunks,
loaders, schedules, distillation types, converters) and the plug-ins.

Plug-ins are Python modules that register things: listed in the config's top-level `plugins` key
(saved with the run, so `--resume` imports them again) or declared by an installed package under
the entry-point group `mclfir_dist.plugins`. Every process imports them before validation, so a
plug-in's method, trunk or config section is valid under `mclfir train` and `accelerate launch`.

config.py holds the schema and never imports the registries' modules; this module does, which is
what keeps the package free of import circles."""
from __future__ import annotations

import importlib
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterable, List, Optional

from . import config as schema
# the modules that register the built-in family members, imported for that
from . import methods  # noqa: F401  mclfir, finetune, lwf, frozen, static_joint
from .config import RunConfig
from .data import LOADERS, converters  # noqa: F401  torch, torch_gpu, dali; fashionai, deepfashion, darn, zappos
from .errors import PluginError
from .model import trunks  # noqa: F401  resnet18..101, efficientnet_lite0
from .training import losses, optim  # noqa: F401  distillation types; lr schedules

log = logging.getLogger("mclfir")

ENTRY_POINT_GROUP = "mclfir_dist.plugins"


def import_plugins(names: Iterable[str]) -> List[str]:
    """Import the entry-point plug-ins and the named modules (once each); returns the modules imported."""
    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:   # a broken installed plug-in is named, whatever it raised
            raise PluginError(f"entry point '{ep.name}' ({ep.value}) of group {ENTRY_POINT_GROUP}: "
                              f"{type(e).__name__}: {e}") from None
        loaded.append(ep.value)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())   # as `python -m` does: a plug-in file beside the config is found
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise PluginError(f"config key 'plugins': cannot import {name!r} ({e}); put the module on "
                              "PYTHONPATH or install the package that holds it") from None
        loaded.append(name)
    return loaded


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None) -> RunConfig:
    """YAML file + dotted `key=value` overrides -> validated RunConfig, plug-ins imported first."""
    import_plugins(schema.peek_plugins(path, overrides))
    return schema.load_config(path, overrides)


def config_from_dict(d: dict) -> RunConfig:
    """A saved config (config.yaml, a checkpoint's) -> RunConfig, after importing the plug-ins it names."""
    import_plugins(list(d.get("plugins") or []))
    cfg = schema.from_dict(d)
    schema.validate(cfg)
    return cfg
