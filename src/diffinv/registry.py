"""One way to keep the named things that vary (classifiers, data formats, export formats, generation methods):
timm's register / create / list. Each registry belongs to the library module whose things it lists; a new one is a
function or module registered there, plus its test.

    ARCHITECTURES = Registry("architecture")

    @ARCHITECTURES.register("small-cnn", "three conv blocks, for CPUs")
    def small_cnn(num_classes, image_size, small): ...

    ARCHITECTURES.get("small-cnn")   # or ARCHITECTURES["small-cnn"]; an unknown name is a clear error
    ARCHITECTURES.names()            # in the order they were registered
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from diffinv.errors import UserError

T = TypeVar("T")


class RegistryError(UserError, KeyError):
    """A name that is not registered; the message lists the ones that are."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Registry(Generic[T]):
    """Named things of one kind, in the order they were registered, each with a line of help."""

    def __init__(self, kind: str, error: type[Exception] = RegistryError):
        self.kind, self.error = kind, error
        self._things: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        """A decorator adding the decorated thing as ``name``."""
        def add(thing: T) -> T:
            self.add(name, thing, help)
            return thing
        return add

    def add(self, name: str, thing: T, help: str = "") -> None:
        if name in self._things:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._things[name], self._help[name] = thing, help

    def get(self, name: str) -> T:
        """The thing called ``name``; an error naming the registered ones otherwise."""
        if name not in self._things:
            raise self.error(f"{self.kind} must be one of {', '.join(self._things)}; got {name!r}")
        return self._things[name]

    def help(self, name: str) -> str:
        self.get(name)
        return self._help[name]

    def names(self) -> list[str]:
        return list(self._things)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._things)

    def __contains__(self, name: object) -> bool:
        return name in self._things

    def __len__(self) -> int:
        return len(self._things)
