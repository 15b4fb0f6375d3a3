"""functions/ on disk -> the current set of FunctionSpecs, kept fresh by inotify.

The registry owns the answer to "which functions exist, and what is their
code right now". It rescans on any filesystem event under functions/
(watchdog; debounced), compares each entry's revision (a stat of its files)
with what it had, loads the functions that are new or changed, and tells its
listeners about each function that appeared, changed or went away. A
periodic rescan covers events inotify may drop (queue overflow, network
filesystems).

The file work of a rescan runs in a thread, so that a big function's code
stalls no request while it loads (spec.py parses big modules in a child
process, as the parser would hold the GIL); the listeners hear of the
changes on the event loop, in order. One rescan runs at a time.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Callable

from watchdog.events import (
    DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileAttribEvent, FileClosedEvent,
    FileCreatedEvent, FileDeletedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler,
)
from watchdog.observers import Observer

from .spec import FunctionSpec, config_file_of, discover, load_spec, misnamed, revision_of, shadowed

log = logging.getLogger("faasd.registry")

Listener = Callable[[FunctionSpec | None, FunctionSpec | None], None]
Change = tuple[FunctionSpec | None, FunctionSpec | None]

DEBOUNCE_S = 0.05
# Only changes matter. Leaving out opens and reads keeps the inotify thread
# quiet while workers import modules from functions/ (it would otherwise
# wake, and take the GIL, on every directory listing an import does).
WATCHED_EVENTS = [FileCreatedEvent, FileClosedEvent, FileDeletedEvent, FileMovedEvent,
                  FileAttribEvent, DirCreatedEvent, DirDeletedEvent, DirMovedEvent]
FALLBACK_RESCAN_S = 5.0


def scan(functions_dir: Path, python: str = sys.executable) -> dict[str, FunctionSpec]:
    """Load every function in a directory (used by `faasd check` too); `python`: the
    Python workers' interpreter."""
    return {name: load_spec(name, path, python) for name, path in discover(functions_dir).items()}


def compare(functions_dir: Path, known: dict[str, FunctionSpec], python: str) -> list[Change]:
    """What changed in `functions_dir` since `known`, as (old, new) pairs: only the
    functions that are new or whose revision changed are loaded again."""
    found = discover(functions_dir)
    changes: list[Change] = [(old, None) for name, old in known.items() if name not in found]
    for name, path in found.items():
        old = known.get(name)
        if (old is not None and old.source == path
                and old.revision == revision_of(path, config_file_of(path))):
            continue
        changes.append((old, load_spec(name, path, python)))
    return changes


class Registry:
    def __init__(self, functions_dir: Path, python: str = sys.executable) -> None:
        self.functions_dir = functions_dir
        self.python = python  # the Python workers' interpreter
        self.specs: dict[str, FunctionSpec] = {}
        self._listeners: list[Listener] = []
        self._observer: Observer | None = None
        self._rescan_handle: asyncio.TimerHandle | None = None
        self._due = asyncio.Event()
        self._scanning = asyncio.Lock()
        self._watcher: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._misnamed: set[str] = set()  # warned of once, while they stay
        self._shadowed: dict[str, str] = {}  # likewise

    def get(self, name: str) -> FunctionSpec | None:
        return self.specs.get(name)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def rescan(self) -> list[Change]:
        """Rescan now; tell listeners what changed; return the changes."""
        async with self._scanning:
            changes, unnamed, losers = await asyncio.to_thread(self._look, dict(self.specs))
            self._warn_misnamed(unnamed)
            self._warn_shadowed(losers)
            for old, new in changes:
                if new is None:
                    del self.specs[old.name]  # type: ignore[union-attr]
                else:
                    self.specs[new.name] = new
                self._report(old, new)
                for listener in self._listeners:
                    try:
                        listener(old, new)
                    except Exception:
                        log.exception("listener failed on a change of %s", (new or old).name)
            return changes

    def _look(self, known: dict[str, FunctionSpec]) -> tuple[list[Change], list[str], dict[str, str]]:
        return (compare(self.functions_dir, known, self.python), misnamed(self.functions_dir),
                shadowed(self.functions_dir))

    def rescan_soon(self) -> None:
        """Have the watcher rescan as soon as it can (e.g. after a config reload)."""
        self._due.set()

    def _warn_misnamed(self, names: list[str]) -> None:
        for name in names:
            if name not in self._misnamed:
                log.warning("%s/%s is skipped: its name is not valid UTF-8, and a function's name is "
                            "1 to 64 of A-Z a-z 0-9 _ -; rename it", self.functions_dir, name)
        self._misnamed = set(names)

    def _warn_shadowed(self, losers: dict[str, str]) -> None:
        for entry, winner in losers.items():
            if self._shadowed.get(entry) != winner:
                log.warning("%s/%s is not a function: %s claims the same name and defines it; "
                            "rename or remove one", self.functions_dir, entry, winner)
        self._shadowed = losers

    @staticmethod
    def _report(old: FunctionSpec | None, new: FunctionSpec | None) -> None:
        if new is None:
            log.info("function %s removed", old.name)  # type: ignore[union-attr]
        elif new.load_error:
            log.error("function %s cannot load: %s", new.name, new.load_error)
        else:
            log.info("function %s %s (%s, %s)", new.name, "loaded" if old is None else "reloaded",
                     new.runtime, new.handler)

    # -- watching -----------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.functions_dir.mkdir(exist_ok=True)  # the daemon refuses a missing parent
        handler = _Handler(self._schedule_threadsafe)
        self._observer = Observer()
        self._observer.schedule(handler, str(self.functions_dir), recursive=True,
                                event_filter=WATCHED_EVENTS)
        self._observer.daemon = True
        self._observer.start()
        self._watcher = self._loop.create_task(self._rescan_when_due())

    def _schedule_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        if self._rescan_handle is not None:
            self._rescan_handle.cancel()
        self._rescan_handle = asyncio.get_running_loop().call_later(DEBOUNCE_S, self._due.set)

    async def _rescan_when_due(self) -> None:
        """Every rescan after the first: on a (debounced) event, else every FALLBACK_RESCAN_S."""
        while True:
            try:
                await asyncio.wait_for(self._due.wait(), FALLBACK_RESCAN_S)
            except asyncio.TimeoutError:
                pass
            self._due.clear()
            try:
                await self.rescan()
            except Exception:
                log.exception("rescanning %s failed", self.functions_dir)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._rescan_handle is not None:
            self._rescan_handle.cancel()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)


class _Handler(FileSystemEventHandler):
    def __init__(self, notify: Callable[[], None]) -> None:
        self._notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads change nothing
        path = str(event.src_path)
        if "/__pycache__" in path:
            return
        self._notify()
