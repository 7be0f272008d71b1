"""One registry for every kind of thing prolip finds by name (few-shot methods, test-time methods): a name is taken
once. A second class under a taken name is refused, as it would silently replace the first; the same class again
(its module reloaded) replaces itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes by name; ``unknown`` builds the error for a name nobody registered (naming the ones there are)."""

    def __init__(self, kind: str, unknown: Callable[[str], Exception]):
        self.kind, self._unknown = kind, unknown
        self._classes: dict[str, T] = {}

    def add(self, name: str, cls: T) -> T:
        taken = self._classes.get(name)
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered ({taken.__module__}.{taken.__qualname__}); "
                f"give {cls.__module__}.{cls.__qualname__} another name"
            )
        self._classes[name] = cls
        return cls

    def get(self, name: str) -> T:
        if name not in self._classes:
            raise self._unknown(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._classes)}")
        return self._classes[name]

    def names(self) -> list[str]:
        """In the order registered."""
        return list(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes
