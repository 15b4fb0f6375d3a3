"""The daemon's optional parts, started in this order once the core is up.

Each entry is a coroutine `start(daemon)` that wires one capability (the
asynchronous queue, an event source, metrics, ...) into the running daemon
through its hooks: `daemon.route_hooks` (extra HTTP routes),
`daemon.readiness_checks`, `daemon.describers` (extra fields in
/system/functions/NAME), `daemon.invoker.observers`, `daemon.registry.subscribe`
and `daemon.on_cleanup` (teardown, run in reverse order of registration).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable, Callable

if TYPE_CHECKING:
    from .daemon import Daemon

Extension = Callable[["Daemon"], Awaitable[None]]


def load() -> list[Extension]:
    parts: list[Extension] = []
    return parts
