"""Name -> builder registries for datasets, models, attacks, defences and training methods.

Every component of advrepro is looked up by name in one of these registries, never through an
if-chain or ``eval`` of a config string.  Registering the same name twice is an error, so two
modules cannot silently shadow each other; looking up an unknown name lists what is registered.
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of builders.  Use :meth:`register` as a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


DATASETS: Registry[Callable] = Registry("dataset")
MODELS: Registry[Callable] = Registry("model")
METHODS: Registry[type] = Registry("method")
#: Evaluation attacks: name -> torch implementation (:mod:`methods.attacks`); the torch-free
#: spec of each name (fields, defaults, label) is in :mod:`methods.attack_specs`.
ATTACKS: Registry[Callable] = Registry("attack")
#: Evaluation-time defences: name -> torch implementation class (:mod:`methods.defenses`); the
#: torch-free spec of each name (fields, defaults, label) is in :mod:`methods.defenses.specs`.
DEFENSES: Registry[type] = Registry("defense")
