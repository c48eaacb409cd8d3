"""Importing plug-ins: the modules a config names (`plugins: [...]`) and those installed packages declare
under the entry-point group `mclfir_dist.plugins`. Light on purpose (no torch): the command line calls it
before it builds its parser, so that a plug-in's converters are valid choices there.

Only what the user names is imported: --plugins, the config file they pass, installed entry points. A run
folder, checkpoint or results file is data: the plug-ins its saved config lists must already be loaded
(`require_saved`), or the user says `--trust-run-plugins` to import that list."""
from __future__ import annotations

import importlib
import os
import re
import sys
from importlib.metadata import entry_points
from typing import Iterable, List

from .errors import PluginError

ENTRY_POINT_GROUP = "mclfir_dist.plugins"
TRUST = {"saved": False}   # --trust-run-plugins: a run's saved plug-in list may be imported
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


def trust_saved_plugins(on: bool = True) -> None:
    TRUST["saved"] = on


def require_saved(names, where: str) -> None:
    """The plug-ins a saved config (`where`) lists must be loaded already; with --trust-run-plugins they are
    imported now. Otherwise one line names the missing ones and both ways to load them."""
    names = [n for n in (names or []) if isinstance(n, str)]
    missing = [n for n in names if n not in sys.modules]
    if not missing:
        return
    if TRUST["saved"]:
        import_plugins(missing)
        return
    listed = ",".join(missing)
    raise PluginError(f"{where} names plug-ins that are not loaded: {listed}. A run's files run no code by "
                      f"themselves: load them with `mclfir --plugins {listed} ...`, or pass --trust-run-plugins "
                      "to import the run's own list")
