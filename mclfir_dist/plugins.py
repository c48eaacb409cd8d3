"""Importing plug-ins: the modules a config names (`plugins: [...]`) and those installed packages declare
under the entry-point group `mclfir_dist.plugins`. Light on purpose (no torch): the command line calls it
before it builds its parser, so that a plug-in's converters are valid choices there."""
from __future__ import annotations

import importlib
import os
import re
import sys
from importlib.metadata import entry_points
from typing import Iterable, List

from .errors import PluginError

ENTRY_POINT_GROUP = "mclfir_dist.plugins"
MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")   # a dotted module name, never a path


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
        if not MODULE_NAME.fullmatch(name):
            raise PluginError(f"config key 'plugins': {name!r} is not a module name (dotted.module.name, no path)")
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise PluginError(f"config key 'plugins': cannot import {name!r} ({e}); put the module on "
                              "PYTHONPATH or install the package that holds it") from None
        except Exception as e:   # the module imported but raised while running: named, not a traceback
            raise PluginError(f"config key 'plugins': importing {name!r} raised {type(e).__name__}: {e}") from None
        loaded.append(name)
    return loaded
