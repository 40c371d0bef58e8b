"""One registry type for every pluggable part: models, datasets, objectives, samplers.

A part registers itself by decorator where it is defined, and each package imports all of
its own modules (`load_package`), so a new objective, model or dataset is one new file: the
command line, the space file's validation, the tests and the benchmarks take their lists
from the registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to parts of one kind; `kind` names them in errors ("unknown arch 'x'; known: ...")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.entries: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self.entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self.entries[name] = item
        return item

    def register(self, *names: str) -> Callable[[T], T]:
        """Decorator: `@MODELS.register("resnet8", "resnet14")`."""

        def wrap(item: T) -> T:
            for name in names:
                self.add(name, item)
            return item

        return wrap

    def get(self, name: str) -> T:
        if name not in self.entries:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self.entries[name]

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def load_package(package: str, path: Iterable[str]) -> None:
    """Import every module of a package, so each registers what it defines."""
    for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{info.name}")
