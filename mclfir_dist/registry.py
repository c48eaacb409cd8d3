"""A tiny name -> builder registry, one per family (methods, trunks, schedules, distillation types,
loaders, converters). Config choices, `--help-config` and report labels are read from them, so
adding an entry is the only change a new family member needs."""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, List, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, family: str, config_key: str = ""):
        self.family, self.config_key = family, config_key
        self._entries: Dict[str, T] = {}
        self._labels: Dict[str, str] = {}

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
            from .config import ConfigError
            where = f"config key '{self.config_key}': " if self.config_key else ""
            raise ConfigError(f"{where}unknown {self.family} {name!r} (registered: {', '.join(self.names())})")
        return self._entries[name]

    def label(self, name: str) -> str:
        return self._labels.get(name, name)

    def names(self) -> List[str]:
        return list(self._entries)

    def unregister(self, name: str) -> Optional[T]:
        self._labels.pop(name, None)
        return self._entries.pop(name, None)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
