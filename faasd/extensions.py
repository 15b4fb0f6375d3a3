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
    # First: event sources put their events into daemon.queue, which is the
    # embedded queue (faasd/queue.py), or the cluster's on RabbitMQ (faasd/cluster/).
    from . import cluster
    parts.append(cluster.start)
    from .triggers import amqp, cron, file  # event sources: after the queue they feed
    parts += [file.start, cron.start, amqp.start]
    from . import metrics, ui  # observers and views of everything above
    parts += [metrics.start, ui.start]
    from . import auth  # API authentication, trigger authorizers, /openapi.json
    parts.append(auth.start)
    return parts
