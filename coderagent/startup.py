"""What the agent loads once, when it starts, before it serves anything.

Building the agent (``tap.makeService``) touches no file; the token file and
the host keys are read here, as the first thing the running agent does, so
that a misconfigured agent stops with one clear line before it listens on
anything, and the services that need them get the values already loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.application.service import Service

T = TypeVar("T")


class Loaded(Generic[T]):
    """A value loaded at start-up; calling it before then loads it on the spot."""

    def __init__(self, load: Callable[[], T], what: type[Exception] | tuple[type[Exception], ...]):
        self._load = load
        self._errors = what
        self._value: tuple[T] | None = None

    def __call__(self) -> T:
        if self._value is None:
            try:
                self._value = (self._load(),)
            except self._errors as e:
                raise SystemExit(f"coder-agent: {e}") from e
        return self._value[0]


class Preflight(Service):
    """Loads every registered value when the agent starts, in order."""

    def __init__(self) -> None:
        self._loads: list[Loaded[Any]] = []

    def load(
        self, load: Callable[[], T], errors: type[Exception] | tuple[type[Exception], ...]
    ) -> Loaded[T]:
        """Register ``load``; an exception of type ``errors`` stops the agent with its message."""
        loaded = Loaded(load, errors)
        self._loads.append(loaded)
        return loaded

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        for loaded in self._loads:
            loaded()

    def startService(self) -> None:
        super().startService()
        for loaded in self._loads:
            loaded()
