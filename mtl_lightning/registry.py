"""A registry by name, as in timm: `@register` a class, `create(name, ...)` it, and a clear error otherwise."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import MTLError
from .plugins import origin

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes by name: `WEIGHTINGS`, `DATASETS`, `ARCHITECTURES` and `MERGINGS` are registries.

    Args:
        kind: what the entries are, for messages ("weighting").
        key: the config key that selects an entry ("weighting"), for messages.

    Example:
        `@WEIGHTINGS.register("my_method")` on a `Weighting` subclass makes `weighting=my_method` build it;
        `WEIGHTINGS.get("pcgrad")` returns the class, and an unknown name raises `MTLError` with the closest
        name and every valid one.
    """

    def __init__(self, kind: str, key: str):
        self.kind, self.key, self._items = kind, key, {}  # key: the config key that selects an entry

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """A class decorator: `@WEIGHTINGS.register("my_method")` makes `weighting=my_method` build it."""

        def deco(cls: type[T]) -> type[T]:
            if name in self._items:
                old = self._items[name]
                raise MTLError(
                    f"The {self.kind} {name!r} is registered twice: by {where(old)} and by {where(cls)}. Give one of "
                    f"them another name ({self.key}={name} must name one thing)."
                )
            cls.name = name
            self._items[name] = cls
            return cls

        return deco

    def items(self) -> list[tuple[str, type[T]]]:
        """Every (name, class), sorted by name."""
        return sorted(self._items.items())

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._items)

    def get(self, name: str) -> type[T]:
        """The class registered as `name`.

        Raises:
            MTLError: `name` is not registered; the message names the closest name and every valid one.
        """
        if name not in self._items:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise MTLError(f"Unknown {self.kind} {self.key}={name!r}.{hint} Valid choices: {', '.join(self.names())}.")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items


def where(obj) -> str:
    """Where a registered class comes from: the plugin or entry point that defined it, or the library."""
    return origin(obj.__module__) or f"mtl_lightning ({obj.__module__})"
