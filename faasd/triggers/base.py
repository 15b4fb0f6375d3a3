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

from ..queue import OUTCOME_RETRY_FIRST_S, OUTCOME_RETRY_MAX_S, disk_refused, outcome_retry_delays
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


class StateFile:
    """A source's own small SQLite file (ledger, last ticks): `db` once `open()` succeeded."""

    schema = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db: sqlite3.Connection = None  # type: ignore[assignment]  # set by open()

    @property
    def is_open(self) -> bool:
        return self.db is not None

    def open(self) -> None:
        self.db = open_state_db(self.path, self.schema)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None  # type: ignore[assignment]


class TriggerSource(ABC):
    kind: str
    # The source's own file, if it has one. Its triggers start once it is open:
    # a disk with no room keeps it shut at start, and it is tried again (1 s,
    # doubling to 30 s) meanwhile; so is a trigger whose start the disk refused.
    store: StateFile | None = None

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.running: dict[tuple[str, int], tuple[Hashable, RunningTrigger]] = {}
        self.failures: dict[tuple[str, int], str] = {}  # triggers that could not start, and why
        self.store_error: str | None = None  # why the store does not open, until it does
        self._refused: set[str] = set()  # functions with a trigger whose start the disk refused
        self._storage_retry: asyncio.Task | None = None
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

    def store_opened(self) -> None:
        """The store is open and every function's triggers were applied."""

    # -- lifecycle ---------------------------------------------------------------------

    async def attach(self) -> None:
        """Start the triggers of every function known now, then follow the registry."""
        self.daemon.registry.subscribe(self._function_changed)
        self.daemon.describers.append(self.describe)
        self.daemon.on_cleanup(self.close)
        if self.store is not None:
            try:
                self.store.open()
            except (OSError, sqlite3.Error) as exc:
                if not disk_refused(exc):
                    raise
                self.store_error = str(exc)
                log.error("%s triggers: cannot open %s (%s); they start once it opens, tried again "
                          "every %gs (doubling to %gs)", self.kind, self.store.path, exc,
                          OUTCOME_RETRY_FIRST_S, OUTCOME_RETRY_MAX_S)
                self._retry_storage()
                return
        await self._apply_all()

    async def _apply_all(self) -> None:
        for name in sorted(self.daemon.registry.specs):
            await self.apply(name)
        self.store_opened()

    def _retry_storage(self) -> None:
        if self._storage_retry is None or self._storage_retry.done():
            self._storage_retry = asyncio.get_running_loop().create_task(
                self._storage_retries(), name=f"faasd-{self.kind}-storage-retry")

    async def _storage_retries(self) -> None:
        """Open the store, then start the triggers the disk refused, as soon as it lets them."""
        for delay in outcome_retry_delays():
            await asyncio.sleep(delay)
            if self._closed:
                return
            if self.store is not None and not self.store.is_open:
                try:
                    self.store.open()
                except (OSError, sqlite3.Error) as exc:
                    self.store_error = str(exc)
                    continue
                self.store_error = None
                log.warning("%s triggers: %s is open now; starting them", self.kind, self.store.path)
                self._refused.clear()
                await self._apply_all()
            else:
                refused, self._refused = self._refused, set()
                for name in sorted(refused):
                    await self.apply(name)
            if not self._refused:
                return

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
            if self._closed or self.store_error is not None:
                return  # nothing started yet; everything is applied once the store opens
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
                    if not disk_refused(exc):
                        log.exception("function %s: cannot start its %s trigger #%d: %s",
                                      name, self.kind, index, exc)
                    else:
                        if (name, index) not in self.failures:  # said once, not at each try
                            log.error("function %s: cannot start its %s trigger #%d: %s; tried "
                                      "again until the disk lets it", name, self.kind, index, exc)
                        self._refused.add(name)
                        self._retry_storage()
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
        tasks = [*self._tasks, *([self._storage_retry] if self._storage_retry else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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
            elif self.store_error is not None and self.store is not None:
                entry["state"] = {"status": "waiting", "reason": f"cannot open {self.store.path} "
                                  f"({self.store_error}); the trigger starts once it opens"}
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
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(schema)
    except BaseException:
        db.close()
        raise
    return db


def queue_of(daemon: "Daemon") -> Any:
    """The asynchronous queue, or a clear error when it is not running."""
    queue = getattr(daemon, "queue", None)
    if queue is None:
        raise RuntimeError("the asynchronous invocation queue is not running")
    return queue
