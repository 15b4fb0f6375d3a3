"""What the event sources (file, cron, amqp) share: following functions as they come and go.

A `TriggerSource` owns every running trigger of one type. It follows the
registry: when a function appears, changes or goes away, the function's
triggers of that type are compared with what runs, and only those whose
options changed are stopped and started again (a code-only change leaves a
watcher, a schedule or a broker consumer untouched). A function that cannot
load has its triggers paused, so that events wait (files on disk, messages
in their queue) instead of failing while its author fixes it.

Each trigger's state is added to `/system/functions/NAME` under
`triggers[i].state`. Events go to the durable asynchronous queue
(`daemon.queue.put`), never straight to the invoker.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable

import orjson

from ..spec import FunctionSpec, Trigger

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger("faasd.triggers")


class RunningTrigger(ABC):
    """One trigger of one function, started by its source."""

    @abstractmethod
    async def start(self) -> None:
        """Begin producing events; must not wait for anything outside (a broker, a clock)."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop producing events; events already queued are not affected."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """What /system/functions/NAME shows; always has a "status"."""

    def update(self, spec: FunctionSpec) -> None:
        """The function changed in a way that does not need a restart of this trigger."""


class TriggerSource(ABC):
    kind: str

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.running: dict[tuple[str, int], tuple[Hashable, RunningTrigger]] = {}
        self.failures: dict[tuple[str, int], str] = {}  # triggers that could not start, and why
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    # -- what subclasses provide -------------------------------------------------------

    @abstractmethod
    def create(self, spec: FunctionSpec, trigger: Trigger, index: int) -> RunningTrigger:
        ...

    def fingerprint(self, spec: FunctionSpec, trigger: Trigger) -> Hashable:
        """Two triggers with equal fingerprints need no restart between them."""
        return orjson.dumps(dict(trigger.options), option=orjson.OPT_SORT_KEYS)

    def not_running_reason(self, spec: FunctionSpec) -> str | None:
        """Why this source starts nothing for `spec` (e.g. no broker configured), or None."""
        return None

    def applied(self, name: str, spec: FunctionSpec | None) -> None:
        """`name`'s triggers are in line with `spec` now (None: the function is gone)."""

    # -- lifecycle ---------------------------------------------------------------------

    async def attach(self) -> None:
        """Start the triggers of every function known now, then follow the registry."""
        self.daemon.registry.subscribe(self._function_changed)
        self.daemon.describers.append(self.describe)
        self.daemon.on_cleanup(self.close)
        for name in sorted(self.daemon.registry.specs):
            await self.apply(name)

    def _function_changed(self, old: FunctionSpec | None, new: FunctionSpec | None) -> None:
        name = (new or old).name  # type: ignore[union-attr]
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self.apply(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def apply(self, name: str) -> None:
        """Bring `name`'s running triggers in line with its current spec."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if self._closed:
                return
            # The newest spec, not the one of the change that woke us: changes coalesce.
            spec = self.daemon.registry.get(name)
            wanted: dict[int, tuple[Hashable, Trigger]] = {}
            if spec is not None and spec.ok and self.not_running_reason(spec) is None:
                for index, trigger in enumerate(spec.triggers):
                    if trigger.type == self.kind:
                        wanted[index] = (self.fingerprint(spec, trigger), trigger)
            for key in [k for k in self.running if k[0] == name]:
                fingerprint, running = self.running[key]
                if key[1] in wanted and wanted[key[1]][0] == fingerprint:
                    assert spec is not None
                    running.update(spec)
                    continue
                del self.running[key]
                await self._stop(name, running)
            for index, (fingerprint, trigger) in wanted.items():
                if (name, index) in self.running:
                    continue
                assert spec is not None
                try:
                    running = self.create(spec, trigger, index)
                    await running.start()
                except Exception as exc:
                    log.exception("function %s: cannot start its %s trigger #%d: %s",
                                  name, self.kind, index, exc)
                    self.failures[(name, index)] = f"cannot start: {exc}"
                    continue
                self.failures.pop((name, index), None)
                self.running[(name, index)] = (fingerprint, running)
            for key in [k for k in self.failures if k[0] == name and k[1] not in wanted]:
                del self.failures[key]
            self.applied(name, spec)
            if spec is None:
                self._locks.pop(name, None)

    async def _stop(self, name: str, running: RunningTrigger) -> None:
        try:
            await running.stop()
        except Exception:
            log.exception("function %s: error while stopping a %s trigger", name, self.kind)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        running, self.running = self.running, {}
        for (name, _), (_, trigger) in running.items():
            await self._stop(name, trigger)

    # -- views -------------------------------------------------------------------------

    def describe(self, name: str, view: dict[str, Any]) -> None:
        spec = self.daemon.registry.get(name)
        for index, entry in enumerate(view.get("triggers") or []):
            if entry.get("type") != self.kind:
                continue
            found = self.running.get((name, index))
            if found is not None:
                entry["state"] = found[1].state()
            elif spec is not None and not spec.ok:
                entry["state"] = {"status": "paused", "reason": "the function cannot load; "
                                  "events wait until it is fixed"}
            elif (name, index) in self.failures:
                entry["state"] = {"status": "error", "reason": self.failures[(name, index)]}
            elif spec is not None and (reason := self.not_running_reason(spec)):
                entry["state"] = {"status": "disabled", "reason": reason}
            else:
                entry["state"] = {"status": "starting"}


def open_state_db(path: Path, schema: str) -> sqlite3.Connection:
    """A small SQLite file in the data dir for a source's own state (ledger, last ticks).

    WAL with synchronous=NORMAL: a commit survives the daemon being killed
    (it is in the OS's cache); a power cut may lose the last few, which at
    worst makes an event fire again, never lose one, because each source
    records an event only after the queue has it on disk.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(schema)
    return db


def queue_of(daemon: "Daemon") -> Any:
    """The asynchronous queue, or a clear error when it is not running."""
    queue = getattr(daemon, "queue", None)
    if queue is None:
        raise RuntimeError("the asynchronous invocation queue is not running")
    return queue
