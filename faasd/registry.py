"""functions/ on disk -> the current set of FunctionSpecs, kept fresh by inotify.

The registry owns the answer to "which functions exist, and what is their
code right now". It rescans on any filesystem event under functions/
(watchdog; debounced), compares each entry's revision (a stat of its files)
with what it had, loads the functions that are new or changed, and tells its
listeners about each function that appeared, changed or went away. A
periodic rescan covers events inotify may drop (queue overflow, network
filesystems).

A function's code is taken only once it is completely written, as Lambda's
code updates are atomic: a file being written in place (`cat > f.py`, an
editor that truncates and writes, scp) is one inotify reported a write to
and no close after it yet. While any of a function's files is, the function
keeps the code it has, and is looked at again at the close (or once no write
came for SETTLE_S, for a writer that keeps the file open). A file written
elsewhere and renamed into place is complete at once: no delay.

The file work of a rescan runs in a thread, so that a big function's code
stalls no request while it loads (spec.py parses big modules in a child
process, as the parser would hold the GIL); the listeners hear of the
changes on the event loop, in order. One rescan runs at a time.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from watchdog.events import (
    DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileAttribEvent, FileClosedEvent,
    FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileSystemEvent,
    FileSystemEventHandler,
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
# Writes (FileModifiedEvent) say that a file is being written, until its close.
WATCHED_EVENTS = [FileCreatedEvent, FileClosedEvent, FileDeletedEvent, FileMovedEvent,
                  FileModifiedEvent, FileAttribEvent, DirCreatedEvent, DirDeletedEvent, DirMovedEvent]
FALLBACK_RESCAN_S = 5.0
# A file written to and not closed is taken as complete once no write came for this long.
SETTLE_S = 1.0
SETTLE_POLL_S = 0.02  # how often a worker start waiting for a file's close looks again


def scan(functions_dir: Path, python: str = sys.executable) -> dict[str, FunctionSpec]:
    """Load every function in a directory (used by `faasd check` too); `python`: the
    Python workers' interpreter."""
    return {name: load_spec(name, path, python) for name, path in discover(functions_dir).items()}


def compare(functions_dir: Path, known: dict[str, FunctionSpec], python: str,
            unsettled: frozenset[str] = frozenset()) -> list[Change]:
    """What changed in `functions_dir` since `known`, as (old, new) pairs: only the
    functions that are new or whose revision changed are loaded again, and not
    those `unsettled` (being written: looked at again once they are not)."""
    found = discover(functions_dir)
    changes: list[Change] = [(old, None) for name, old in known.items() if name not in found]
    for name, path in found.items():
        if name in unsettled:
            continue
        old = known.get(name)
        if (old is not None and old.source == path
                and old.revision == revision_of(path, config_file_of(path))):
            continue
        new = load_spec(name, path, python)
        if new.revision != revision_of(path, new.config_file):
            continue  # written to while it was read: perhaps half of it; its close looks again
        changes.append((old, new))
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
        # Files written to and not closed yet -> when the last write was seen (monotonic).
        self._writing: dict[Path, float] = {}
        self._writes: dict[str, int] = {}  # function name -> writes seen to its files
        self._closed: dict[str, float] = {}  # function name -> when a file written to was last closed
        self._settle_handle: asyncio.TimerHandle | None = None

    def get(self, name: str) -> FunctionSpec | None:
        return self.specs.get(name)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def rescan(self) -> list[Change]:
        """Rescan now; tell listeners what changed; return the changes."""
        async with self._scanning:
            writes = dict(self._writes)
            changes, unnamed, losers = await asyncio.to_thread(
                self._look, dict(self.specs), self.unsettled())
            self._warn_misnamed(unnamed)
            self._warn_shadowed(losers)
            # A write that began while the thread read the files: what it read may be
            # half of it. The function keeps its code; its close brings another look.
            changes = [(old, new) for old, new in changes
                       if new is None or self._writes.get(new.name) == writes.get(new.name)]
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

    def _look(self, known: dict[str, FunctionSpec], unsettled: frozenset[str]
              ) -> tuple[list[Change], list[str], dict[str, str]]:
        return (compare(self.functions_dir, known, self.python, unsettled), misnamed(self.functions_dir),
                shadowed(self.functions_dir))

    def unsettled(self) -> frozenset[str]:
        """The functions with a file being written: written to, not closed, and
        written to within SETTLE_S."""
        now = time.monotonic()
        for path, at in list(self._writing.items()):
            if now - at >= SETTLE_S:
                del self._writing[path]
        return frozenset(filter(None, map(self._owner, self._writing)))

    def writes(self, name: str) -> int | None:
        """How many writes to `name`'s files were seen; None while one is being written, or
        was closed less than DEBOUNCE_S ago (the next may follow). A worker that loaded the
        code between two equal counts read it complete."""
        if name in self.unsettled() or time.monotonic() - self._closed.get(name, float("-inf")) < DEBOUNCE_S:
            return None
        return self._writes.get(name, 0)

    async def settled(self, name: str) -> int:
        """Wait until no file of `name` is being written (SETTLE_S at most); its `writes` then."""
        while (count := self.writes(name)) is None:
            await asyncio.sleep(SETTLE_POLL_S)
        return count

    def _owner(self, path: Path) -> str | None:
        """The name of the function `path` (in functions/) belongs to, if any."""
        try:
            parts = path.relative_to(self.functions_dir).parts
        except ValueError:
            return None
        if not parts:
            return None
        return parts[0] if len(parts) > 1 else Path(parts[0]).stem

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
        handler = _Handler(self._event_threadsafe)
        self._observer = Observer()
        self._observer.schedule(handler, str(self.functions_dir), recursive=True,
                                event_filter=WATCHED_EVENTS)
        self._observer.daemon = True
        self._observer.start()
        self._watcher = self._loop.create_task(self._rescan_when_due())

    def _event_threadsafe(self, kind: str, path: str, dest: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._event, kind, Path(path), dest)

    def _event(self, kind: str, path: Path, dest: str = "") -> None:
        """A change under functions/ (in the loop): a write marks its file as being
        written; its close (or its going away) ends that, and asks for a rescan."""
        if kind == "modified":
            self._writing[path] = time.monotonic()
            name = self._owner(path)
            if name is not None:
                self._writes[name] = self._writes.get(name, 0) + 1
            # A writer that keeps the file open: the file is taken once no write comes.
            if self._settle_handle is not None:
                self._settle_handle.cancel()
            self._settle_handle = asyncio.get_running_loop().call_later(SETTLE_S, self._due.set)
            return
        if self._writing.pop(path, None) is not None and (name := self._owner(path)) is not None:
            self._closed[name] = time.monotonic()
        if dest:
            self._writing.pop(Path(dest), None)
        self._schedule()

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
        for handle in (self._rescan_handle, self._settle_handle):
            if handle is not None:
                handle.cancel()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=2)


class _Handler(FileSystemEventHandler):
    def __init__(self, notify: Callable[[str, str, str], None]) -> None:
        self._notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads change nothing
        path = str(event.src_path)
        if "/__pycache__" in path:
            return
        if event.event_type == "modified" and event.is_directory:
            return
        self._notify(event.event_type, path, str(getattr(event, "dest_path", "") or ""))
