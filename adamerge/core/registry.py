"""One registry class for every pluggable part: methods, objectives, balances, granularities, problem kinds.

A :class:`Registry` maps names to components, filled by its ``register`` decorator. Looking up a
name it does not hold raises one error format everywhere: the kind of component, the unknown
name, the closest registered one and the registered names. Registries that accept user code
(``dotted_paths=True``) also resolve ``package.module:Name`` or ``package.module.Name``.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """An unknown or unimportable name; a ``KeyError`` and a ``ValueError``, printed as plain text."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Name → component for one ``kind`` of component (the word used in error messages)."""

    def __init__(self, kind: str, dotted_paths: bool = False):
        self.kind = kind
        self.dotted_paths = dotted_paths
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None) -> Callable[[T], T]:
        """Decorator (``@registry.register("name")``) or call with ``entry``; a different
        component under a name already taken is refused (re-registering the same one is fine)."""

        def decorate(component: T) -> T:
            held = self._entries.get(name)
            if held is not None and held is not component and not _same_definition(held, component):
                article = "an" if self.kind[:1] in "aeiou" else "a"
                raise ValueError(f"{article} {self.kind} named {name!r} is already registered")
            self._entries[name] = component
            return component

        if entry is not None:
            decorate(entry)
        return decorate

    def unregister(self, name: str) -> T:
        """Remove and return the component registered as ``name`` (a test's own, say)."""
        if name not in self._entries:
            raise UnknownNameError(self.unknown_message(name))
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The component registered as ``name``, or (with ``dotted_paths``) the one it imports."""
        if name in self._entries:
            return self._entries[name]
        if self.dotted_paths and (":" in name or "." in name):
            return self._import(name)
        raise UnknownNameError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        known = sorted(self._entries)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        paths = " or a dotted path package.module:Name" if self.dotted_paths else ""
        return f"unknown {self.kind} {name!r}{hint}; use one of {known}{paths}"

    def _import(self, path: str) -> T:
        """Import ``package.module:Name``; a module not on ``sys.path`` is looked for in the
        working directory too, as ``python -m`` would (e.g. ``benchmarks.zoos.text:problem``)."""
        module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
        try:
            try:
                loaded = importlib.import_module(module)
            except ModuleNotFoundError:
                if os.getcwd() in sys.path:
                    raise
                sys.path.append(os.getcwd())
                loaded = importlib.import_module(module)
            return getattr(loaded, attr)
        except (ImportError, AttributeError) as error:
            raise UnknownNameError(f"cannot import {self.kind} {path!r}: {error}") from error

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()


def _same_definition(a: object, b: object) -> bool:
    """The same function or class defined again (a module re-imported), not a clash."""
    return getattr(a, "__module__", None) == getattr(b, "__module__", None) and getattr(
        a, "__qualname__", None
    ) == getattr(b, "__qualname__", None) and getattr(a, "__qualname__", None) is not None
