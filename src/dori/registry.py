"""Registries of named methods (mitigations, attack recipes): adding one is adding one module.

A method registers itself where it is defined::

    @MITIGATIONS.register("nemo")
    class NeMo: ...

A registry finds its methods in three places, the first time a name is looked up:

1. the modules of its own package (every module of ``dori.mitigations``, ``dori.attack.recipes``),
   imported by name, so a new file there is found without touching a dispatcher;
2. installed plugins: the entry points of group ``dori.mitigations`` / ``dori.recipes`` (a package
   declares ``[project.entry-points."dori.mitigations"] mine = "my_pkg.my_module"``);
3. the modules named in the environment variable ``DORI_PLUGINS`` (comma-separated), e.g. for a
   method that lives in a script folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import DoriError

logger = logging.getLogger(__name__)

T = TypeVar("T")
PLUGINS_ENV = "DORI_PLUGINS"


class Registry(Generic[T]):
    """Name -> object (a class or a factory), filled by :meth:`register` as modules are imported."""

    def __init__(self, what: str, package: str, group: str, skip: tuple[str, ...] = ()):
        self.what, self.package, self.group, self.skip = what, package, group, skip
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated class or function under ``name``."""
        if not name or name != name.strip():
            raise DoriError(f"{self.what}: a registered name must be a non-empty word, got {name!r}")

        def decorate(item: T) -> T:
            origin = f"{getattr(item, '__module__', '?')}.{getattr(item, '__qualname__', item)}"
            if name in self._items and self._origin[name] != origin:
                raise DoriError(f"{self.what}: {name!r} is registered twice ({self._origin[name]} and {origin})")
            self._items[name] = item
            self._origin[name] = origin
            return item

        return decorate

    def discover(self) -> None:
        """Import the package's modules and the installed plugins (once), and the modules named in
        ``$DORI_PLUGINS`` (each call: the variable may have been set since)."""
        self._import_named_plugins()
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_") and info.name not in self.skip:
                importlib.import_module(f"{self.package}.{info.name}")
        from importlib.metadata import entry_points

        for entry in entry_points(group=self.group):
            try:
                entry.load()
            except Exception as exc:  # a broken plugin must not take the built-in methods down
                logger.warning("%s plugin %s could not be loaded: %s", self.what, entry.value, exc)

    @staticmethod
    def _import_named_plugins() -> None:
        for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise DoriError(f"{PLUGINS_ENV}: cannot import {module!r} ({exc})") from exc

    def get(self, name: str) -> T:
        if name not in self._items:
            self.discover()
        if name not in self._items:
            raise DoriError(f"{self.what}: no method named {name!r}; registered: {', '.join(self.names())} "
                            f"(a plugin module can be named in ${PLUGINS_ENV})")
        return self._items[name]

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._items)

    def origin(self, name: str) -> str:
        """``module.QualName`` of a registered method."""
        self.get(name)
        return self._origin[name]

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._items
