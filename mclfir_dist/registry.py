"""A tiny name -> builder registry, one per family (methods, trunks, schedules, distillation types,
loaders, converters, config sections). Config choices, `--help-config` and report labels are read
from them, so adding an entry is the only change a new family member needs.

A registry made with a `config_key` is listed in `config_choices()`: config.py validates that key
against the registered names without importing the modules that hold them (so no import circle)."""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, List, Optional, Sequence, TypeVar

from .errors import ConfigError

T = TypeVar("T")

_BY_CONFIG_KEY: Dict[str, "Registry"] = {}


class Registry(Generic[T]):
    def __init__(self, family: str, config_key: str = "", extra_choices: Sequence[str] = (), where: str = ""):
        self.family, self.config_key = family, config_key
        self.where = where or (f"config key '{config_key}'" if config_key else "")   # named in errors
        self.extra_choices = tuple(extra_choices)   # valid config values that are not entries (e.g. auto)
        self._entries: Dict[str, T] = {}
        self._labels: Dict[str, str] = {}
        if config_key:
            _BY_CONFIG_KEY[config_key] = self

    def register(self, name: str, label: str = "", replace: bool = False) -> Callable[[T], T]:
        """Decorator: `@METHODS.register("mclfir", label="MCL-FIR")`."""
        def add(obj: T) -> T:
            if name in self._entries and not replace:
                raise ValueError(f"{self.family} '{name}' is registered already")
            self._entries[name] = obj
            self._labels[name] = label or name
            return obj
        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            where = f"{self.where}: " if self.where else ""
            raise ConfigError(f"{where}unknown {self.family} {name!r} (registered: {', '.join(self.names())})")
        return self._entries[name]

    def label(self, name: str) -> str:
        return self._labels.get(name, name)

    def names(self) -> List[str]:
        return list(self._entries)

    def choices(self) -> tuple:
        return self.extra_choices + tuple(self._entries)

    def unregister(self, name: str) -> Optional[T]:
        self._labels.pop(name, None)
        return self._entries.pop(name, None)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


def config_choices() -> Dict[str, tuple]:
    """Config key -> its allowed values, for every registry tied to a key."""
    return {key: reg.choices() for key, reg in _BY_CONFIG_KEY.items()}


# Typed config sections that plug-ins add: `@CONFIG_SECTIONS.register("replay")` on a dataclass makes
# `replay.*` keys valid (validated, listed by --help-config, saved in config.yaml) and `cfg.replay` typed.
CONFIG_SECTIONS: Registry[type] = Registry("config section")
