"""File triggers: a directory as an S3 bucket. A file written into it becomes one `ObjectCreated:Put`.

    [[triggers]]
    type = "file"
    dir = "uploads/images"     # relative to the data dir, or absolute; created if missing
    patterns = ["*.jpg"]       # fnmatch on the file name (or on the relative path if it has a /)
    bucket = "images"          # default: the dir's base name

When a file fires: once it is completely written, that is on close after
writing (inotify IN_CLOSE_WRITE) or when it is renamed or moved into the
watched tree (rsync, "write a temp file then rename"). Subdirectories are
watched. Never: hidden files (or files in hidden directories), temp files
(`*.tmp`, `*.part`, `*~`, ...), names that match none of `patterns`.

A new trigger sees only new files, as an S3 notification sees only the
objects created after it was configured. A trigger the ledger does not know
(a new function or trigger, another dir or other patterns, the first start
of a data dir) takes a baseline: the files already in its dir are recorded
as there, and never fire unless they change. What is created once it is
configured fires: inotify watches before the dir is scanned, and a file
that inotify reports, or whose ctime says it changed since, is new. A file
that is open for writing then fires at its close. One info line per
baseline says how many files were taken as there.

Nothing is lost, nothing fires twice. Every file that fired is in a ledger,
`<data-dir>/triggers/files.db`, with the identity it had (inode, size,
mtime): a file fires again only when it changes. The ledger is written only
after the queue has the event on disk. A file whose event the queue could
not store (a full disk) waits, and is offered again after 1 s, doubling up
to 30 s, until it is queued, for as long as it exists unchanged (a change
is an event of its own). At the start of a trigger the ledger knows, and
whenever inotify reports that its queue overflowed (events were dropped),
the tree is rescanned and every matching file not in the ledger fires:
files that arrived while the daemon was down or during the overflow are
caught up. The ledger forgets the triggers a function no longer has, and
all of a deleted function's: added again, a trigger is new (see
FileSource.applied).
A file found by a rescan that some process still has open for writing is
being written: it fires at its close. One modified in the last `SETTLE_S`
seconds may be too, by a process the daemon cannot look into (another
user's, where the daemon is not root); it fires once it has stayed
unchanged that long and no process it can see writes it (or at its close,
whichever comes first). A processed file that is renamed
or moved within the tree keeps its ledger entry and does not fire again.
Attribute changes right after a write (`cp -p`, `tar x` setting the mtime)
update the ledger entry instead of making the file look new.

A file whose path is not valid UTF-8 never fires: an S3 key, the ledger's
path and `Records[0].faasd.path` are all text, and none of them could name
it. It is skipped with one warning (per name, per start); renamed to a
valid name, it fires.

The record's object has the key (URL-encoded, as S3 sends it), the size
and the eTag: the MD5 of the content in hex, as S3 gives an object uploaded
in one part, read in a thread (see ETags). Events go to the asynchronous
queue with a request id derived from the file's identity, so a file is one
event even if it were offered twice.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import os
import stat
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus

import orjson
from watchdog.events import (
    DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileAttribEvent, FileClosedEvent,
    FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler,
)
from watchdog.observers.api import ObservedWatch
from watchdog.observers.inotify import InotifyObserver

from ..queue import outcome_retry_delays
from ..spec import FunctionSpec, Trigger, is_utf8
from .base import RunningTrigger, StateFile, TriggerSource, queue_of
from .options import file_trigger_dir

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger("faasd.triggers.file")

SETTLE_S = 2.0
WRITERS_FRESH_S = 0.5  # how long one look at which files are open for writing serves
STOP_WAIT_S = 5.0
OVERFLOW_TOLD_ONCE_S = 1.0  # overflow lines closer than this are one overflow
# Names that editors, browsers, rsync and upload tools use while a file is
# still being written; the finished file gets its real name by a rename.
TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", ".filepart",
                 ".swp", ".swx", ".swo", "~", ".!sync", ".lock")
TEMP_PREFIXES = ("~$", ".#", "#")
# FileModifiedEvent is only here because watchdog asks inotify for IN_ATTRIB
# (FileAttribEvent) under that name; modifications are dropped in _Dispatch.
EVENT_TYPES: list[type[FileSystemEvent]] = [
    FileClosedEvent, FileMovedEvent, FileDeletedEvent, FileAttribEvent, FileModifiedEvent,
    DirCreatedEvent, DirMovedEvent, DirDeletedEvent,
]
# Files up to this size have their eTags read in batches of up to ETAG_BATCH_FILES (see ETags).
ETAG_BATCH_FILE_SIZE = 256 * 1024
ETAG_BATCH_FILES = 64
REQUEST_ID_NAMESPACE = uuid.UUID("6f3a5e2c-8d1b-4c7e-9a0f-2b4d6e8f1a3c")

# The kernel stamps files with a clock that lags the one time.time_ns() reads
# by up to a tick: a file changed just after a trigger was set up may look
# this much older.
FILE_CLOCK_LAG_NS = 20_000_000
BASELINE = "baseline"  # the request id of a ledger entry for a file that was already there

Identity = tuple[int, int, int]  # inode, size, mtime_ns

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    watch TEXT NOT NULL,          -- function name and watched dir
    path TEXT NOT NULL,           -- relative to the watched dir
    inode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    fired_at REAL NOT NULL,
    PRIMARY KEY (watch, path)
) WITHOUT ROWID;
"""
# The triggers whose baseline was taken: a trigger not in it is new. A ledger
# of an older faasd has no such table: each watch it has files of is known,
# its patterns not (''), so that an upgrade fires what arrived while down.
WATCHES_SCHEMA = """
CREATE TABLE watches (
    watch TEXT NOT NULL,          -- as in files
    patterns TEXT NOT NULL,       -- the trigger's patterns (patterns_key), '' if not known
    since REAL NOT NULL,
    PRIMARY KEY (watch, patterns)
) WITHOUT ROWID;
INSERT INTO watches SELECT DISTINCT watch, '', 0 FROM files;
"""


class Ledger(StateFile):
    """Which files fired, with the identity they had then."""

    schema = LEDGER_SCHEMA

    def open(self) -> None:
        super().open()
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'watches'").fetchone() is None:
            self.db.executescript(f"BEGIN; {WATCHES_SCHEMA} COMMIT;")

    def knows(self, watch: str, patterns: str) -> bool:
        """Whether the trigger (`watch`, `patterns`) took its baseline, here or in an older faasd."""
        return self.db.execute("SELECT 1 FROM watches WHERE watch = ? AND patterns IN (?, '')",
                               (watch, patterns)).fetchone() is not None

    def know(self, watch: str, patterns: str, present: dict[str, Identity] | None = None) -> None:
        """The trigger is known from now on; `present`: its baseline, the files already there."""
        self.db.execute("BEGIN")
        try:
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                                [(watch, rel, *ident, BASELINE, time.time())
                                 for rel, ident in (present or {}).items()])
            self.db.execute("INSERT OR REPLACE INTO watches VALUES (?, ?, ?)", (watch, patterns, time.time()))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def functions(self) -> set[str]:
        """The functions the ledger has watches or files of."""
        rows = self.db.execute("SELECT watch FROM watches UNION SELECT DISTINCT watch FROM files")
        return {watch.split(":", 1)[0] for (watch,) in rows}

    def keep_only(self, function: str, in_use: set[tuple[str, str]]) -> None:
        """Forget `function`'s triggers other than `in_use` (watch, patterns), and the files
        of its watches no trigger in use has."""
        prefix = function + ":"
        watches = {watch for watch, _ in in_use}
        self.db.execute("BEGIN")
        try:
            for watch, patterns in self.db.execute(
                    "SELECT watch, patterns FROM watches WHERE substr(watch, 1, ?) = ?",
                    (len(prefix), prefix)).fetchall():
                if (watch, patterns) not in in_use:
                    self.db.execute("DELETE FROM watches WHERE watch = ? AND patterns = ?", (watch, patterns))
            for (watch,) in self.db.execute("SELECT DISTINCT watch FROM files WHERE substr(watch, 1, ?) = ?",
                                            (len(prefix), prefix)).fetchall():
                if watch not in watches:
                    self.db.execute("DELETE FROM files WHERE watch = ?", (watch,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def get(self, watch: str, rel: str) -> Identity | None:
        row = self.db.execute("SELECT inode, size, mtime_ns FROM files WHERE watch = ? AND path = ?",
                              (watch, rel)).fetchone()
        return tuple(row) if row else None  # type: ignore[return-value]

    def all(self, watch: str) -> dict[str, Identity]:
        rows = self.db.execute("SELECT path, inode, size, mtime_ns FROM files WHERE watch = ?", (watch,))
        return {row[0]: (row[1], row[2], row[3]) for row in rows}

    def record(self, watch: str, rel: str, ident: Identity, request_id: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (watch, rel, *ident, request_id, time.time()))

    def forget(self, watch: str, rels: list[str]) -> None:
        if rels:
            self.db.executemany("DELETE FROM files WHERE watch = ? AND path = ?",
                                [(watch, rel) for rel in rels])

    def move(self, watch: str, src: str, dest: str) -> None:
        self.db.execute("DELETE FROM files WHERE watch = ? AND path = ?", (watch, dest))
        self.db.execute("UPDATE files SET path = ? WHERE watch = ? AND path = ?", (dest, watch, src))

    def move_tree(self, watch: str, src: str, dest: str) -> None:
        rows = self.db.execute("SELECT path FROM files WHERE watch = ? AND substr(path, 1, ?) = ?",
                               (watch, len(src) + 1, src + "/")).fetchall()
        self.db.execute("BEGIN")
        try:
            for (path,) in rows:
                self.move(watch, path, dest + path[len(src):])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def forget_tree(self, watch: str, prefix: str) -> None:
        self.db.execute("DELETE FROM files WHERE watch = ? AND substr(path, 1, ?) = ?",
                        (watch, len(prefix) + 1, prefix + "/"))

    def count(self, watch: str) -> int:
        return self.db.execute("SELECT count(*) FROM files WHERE watch = ?", (watch,)).fetchone()[0]


def identity(st: os.stat_result) -> Identity:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def watch_of(function: str, trigger: Trigger, data_dir: Path) -> tuple[Path, str, str]:
    """A file trigger's dir, its watch (the ledger's key of its files) and its patterns
    as the ledger keeps them: another dir is another watch; other patterns, on the
    same watch, another trigger."""
    root = file_trigger_dir(trigger.get("dir"), data_dir)
    patterns = orjson.dumps(sorted(set(trigger.get("patterns", ["*"])))).decode()
    return root, f"{function}:{root}", patterns


@dataclass
class Baseline:
    """A new trigger's first look at its dir: what is there already does not fire."""

    since_ns: int  # when it was set up: a file whose ctime is later is new
    reported: set[str] = field(default_factory=set)  # paths inotify named since: new

    def is_new(self, rel: str) -> bool:
        """Whether inotify named `rel`, or a directory it is in (moved in whole)."""
        parts = rel.split("/")
        return any("/".join(parts[:i]) in self.reported for i in range(1, len(parts) + 1))

    def was_there(self, st: os.stat_result, now_ns: int) -> bool:
        """Unchanged since the trigger was set up, by its ctime (which a rename, a write or
        a touch sets, and no one can set back); a ctime ahead of our clock (another
        machine's, on a network file system) says nothing: the file is taken as there."""
        return not self.since_ns <= st.st_ctime_ns <= now_ns


def is_hidden_or_temp(rel: str) -> bool:
    parts = rel.split("/")
    if any(part.startswith(".") for part in parts):
        return True
    name = parts[-1]
    return name.endswith(TEMP_SUFFIXES) or name.startswith(TEMP_PREFIXES)


def matches(rel: str, patterns: list[str]) -> bool:
    """Whether a file (path relative to the watched dir, / separated) may fire."""
    if is_hidden_or_temp(rel):
        return False
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel if "/" in p else name, p) for p in patterns)


def s3_key(rel: str) -> str:
    """S3 URL-encodes object keys in notifications: `red flower.jpg` -> `red+flower.jpg`."""
    return quote_plus(rel, safe="/")


def etag_of(path: str, inode: int | None = None) -> str:
    """S3's eTag of an object uploaded in one part: the hex MD5 of its content.
    `inode`: the file's as it was checked; FileNotFoundError if `path` opens another
    (a symlink swapped since for one out of the watched dir, a file replaced)."""
    with open(path, "rb") as handle:
        if inode is not None and os.fstat(handle.fileno()).st_ino != inode:
            raise FileNotFoundError(f"{path} is no longer the file that was checked")
        # A checksum, not a security use: FIPS builds allow MD5 only when told so.
        digest = hashlib.file_digest(handle, lambda: hashlib.md5(usedforsecurity=False))
    return digest.hexdigest()


def _etags_of(files: list[tuple[str, int]]) -> list[str | OSError]:
    """The eTag of each (path, inode), or why it could not be read (runs in a thread)."""
    results: list[str | OSError] = []
    for path, inode in files:
        try:
            results.append(etag_of(path, inode))
        except OSError as exc:
            results.append(exc)
    return results


class ETags:
    """Reads files' eTags in the default executor, small files in batches.

    Handing one small file to a thread costs more than reading it, so the
    small files asked for in one turn of the loop (a burst, a rescan) go to
    a thread together, up to ETAG_BATCH_FILES at a time. A larger file is
    read on its own, and holds up no batch.
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[tuple[str, int], asyncio.Future[str]]] = []

    async def of(self, path: str, size: int, inode: int) -> str:
        """The eTag of the file at `path`, `size` bytes long and inode `inode` when it was
        seen; OSError if unreadable, FileNotFoundError if another file is there now."""
        loop = asyncio.get_running_loop()
        if size > ETAG_BATCH_FILE_SIZE:
            return await loop.run_in_executor(None, etag_of, path, inode)
        if not self._waiting:
            loop.call_soon(self._hand_over)
        future: asyncio.Future[str] = loop.create_future()
        self._waiting.append(((path, inode), future))
        if len(self._waiting) >= ETAG_BATCH_FILES:
            self._hand_over()
        return await future

    def _hand_over(self) -> None:
        batch, self._waiting = self._waiting, []
        if batch:
            job = asyncio.get_running_loop().run_in_executor(None, _etags_of, [file for file, _ in batch])
            job.add_done_callback(lambda job: self._deliver(batch, job))

    @staticmethod
    def _deliver(batch: list[tuple[tuple[str, int], asyncio.Future[str]]], job: asyncio.Future) -> None:
        try:
            results = job.result()
        except BaseException as exc:
            results = [exc] * len(batch)
        for (_, future), result in zip(batch, results):
            if future.done():
                continue  # its _fire was cancelled
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


def iso_ms(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp * 1000) % 1000:03d}Z"


def s3_event(*, bucket: str, rel: str, path: str, ident: Identity, etag: str, region: str,
             request_id: str) -> dict[str, Any]:
    """The S3 ObjectCreated:Put notification Lambda receives, for one file."""
    _, size, mtime_ns = ident
    return {"Records": [{
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": region,
        "eventTime": iso_ms(mtime_ns / 1e9),
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "faasd"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": request_id.replace("-", "")[:16].upper(),
                             "x-amz-id-2": request_id},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "faasd-file-trigger",
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": "faasd"},
                       "arn": f"arn:aws:s3:::{bucket}"},
            "object": {"key": s3_key(rel), "size": size, "eTag": etag,
                       "sequencer": f"{mtime_ns:016X}"},
        },
        "faasd": {"path": path},
    }]}


# -- watchdog glue --------------------------------------------------------------------

class _Dispatch(FileSystemEventHandler):
    """Runs in watchdog's thread; hands each event to the loop, to every trigger on that dir."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.triggers: set[FileTrigger] = set()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if type(event) is FileModifiedEvent or self.loop.is_closed():
            return  # every write(2) of a file: the close that follows is what counts
        for trigger in tuple(self.triggers):
            try:
                self.loop.call_soon_threadsafe(trigger.on_event, event)
            except RuntimeError:
                return  # the loop closed while we were handing over


class _OverflowHook:
    """watchdog reports a kernel queue overflow only by a log line; turn it into rescans."""

    sources: "weakref.WeakSet[FileSource]" = weakref.WeakSet()
    _installed = False
    _lock = threading.Lock()

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "overflow" in record.getMessage().lower():
                for source in tuple(_OverflowHook.sources):
                    source.overflowed_threadsafe()

    @classmethod
    def add(cls, source: "FileSource") -> None:
        with cls._lock:
            cls.sources.add(source)
            if not cls._installed:
                for name in ("watchdog.observers.inotify_c", "watchdog.observers.inotify"):
                    logger = logging.getLogger(name)
                    # Warnings must be produced even when faasd logs only errors.
                    if logger.getEffectiveLevel() > logging.WARNING:
                        logger.setLevel(logging.WARNING)
                    logger.addHandler(cls._Handler(logging.WARNING))
                cls._installed = True


class FileSource(TriggerSource):
    kind = "file"

    def __init__(self, daemon: "Daemon") -> None:
        super().__init__(daemon)
        self.data_dir = daemon.config.paths.data
        self.ledger = self.store = Ledger(self.data_dir / "triggers" / "files.db")
        self.observer = InotifyObserver(generate_full_events=True)
        self.observer.daemon = True
        self._watches: dict[str, tuple[ObservedWatch, _Dispatch]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.etags = ETags()
        self.overflows = 0
        self._last_overflow = float("-inf")

    async def attach(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.observer.start()
        _OverflowHook.add(self)
        self.daemon.readiness_checks["file_triggers"] = self.readiness
        await super().attach()

    def store_opened(self) -> None:
        for name in self.ledger.functions() - set(self.daemon.registry.specs):
            self.applied(name, None)  # deleted while the daemon was down

    def applied(self, name: str, spec: FunctionSpec | None) -> None:
        """Forget the triggers `name` no longer has: all of them once it is deleted.

        Added again later, a trigger is new and takes a baseline, as a deleted
        and re-created S3 notification (or a re-created function) only sees
        the objects created after it: its dir may have filled up meanwhile, and
        firing all that at once is what a new trigger must not do. A function
        that cannot load keeps them: its triggers are only paused, and what
        arrives meanwhile fires once it is fixed.
        """
        if spec is not None and not spec.ok:
            return
        in_use: set[tuple[str, str]] = set()
        for trigger in spec.triggers if spec is not None else ():
            if trigger.type == self.kind:
                try:
                    in_use.add(watch_of(name, trigger, self.data_dir)[1:])
                except (OSError, RuntimeError, TypeError, ValueError):
                    return  # a dir that cannot be named: keep everything rather than guess
        self.ledger.keep_only(name, in_use)

    def readiness(self) -> tuple[bool, str]:
        """Not ready while files wait for the queue to take their events."""
        if self.store_error is not None:
            return False, (f"cannot open {self.ledger.path} ({self.store_error}): file triggers "
                           "start once it opens; trying again")
        triggers = [running for _, running in self.running.values()]
        waiting = [t for t in triggers if isinstance(t, FileTrigger) and t.unqueued]
        if not waiting:
            return True, f"{len(triggers)} file trigger(s) watching"
        files = sum(len(t.unqueued) for t in waiting)
        return False, (f"{files} file(s) not queued yet, offered again until they are "
                       f"(function {waiting[0].spec.name}: {waiting[0].last_error})")

    def create(self, spec: FunctionSpec, trigger: Trigger, index: int) -> "FileTrigger":
        return FileTrigger(self, spec, trigger, index)

    def watch(self, trigger: "FileTrigger") -> None:
        key = str(trigger.root)
        entry = self._watches.get(key)
        if entry is None:
            assert self._loop is not None
            dispatch = _Dispatch(self._loop)
            watch = self.observer.schedule(dispatch, key, recursive=True, event_filter=EVENT_TYPES)
            entry = self._watches[key] = (watch, dispatch)
        entry[1].triggers.add(trigger)

    def unwatch(self, trigger: "FileTrigger") -> None:
        key = str(trigger.root)
        entry = self._watches.get(key)
        if entry is None:
            return
        watch, dispatch = entry
        dispatch.triggers.discard(trigger)
        if not dispatch.triggers:
            del self._watches[key]
            try:
                self.observer.unschedule(watch)
            except (KeyError, OSError):
                pass  # the dir is gone, and its watch with it

    def overflowed_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._overflowed)
            except RuntimeError:
                pass

    def _overflowed(self) -> None:
        # watchdog tells of one overflow in several log lines (one of them per
        # watch): it is said once, and each line asks for a rescan, which
        # rescans already pending absorb.
        now = time.monotonic()
        if now - self._last_overflow > OVERFLOW_TOLD_ONCE_S:
            self.overflows += 1
            log.warning("inotify dropped events (queue overflow): rescanning every watched dir")
        self._last_overflow = now
        for _, running in list(self.running.values()):
            assert isinstance(running, FileTrigger)
            running.request_rescan("inotify queue overflow")

    async def close(self) -> None:
        await super().close()
        _OverflowHook.sources.discard(self)
        self.observer.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.observer.join, 2.0)
        self.ledger.close()


class FileTrigger(RunningTrigger):
    def __init__(self, source: FileSource, spec: FunctionSpec, trigger: Trigger, index: int) -> None:
        self.source = source
        self.spec = spec
        self.index = index
        self.root, self.watch_key, self.patterns_key = watch_of(spec.name, trigger, source.data_dir)
        self.patterns: list[str] = list(trigger.get("patterns", ["*"]))
        self.bucket: str = trigger.get("bucket") or self.root.name
        self.ledger = source.ledger
        self._baseline: Baseline | None = None  # while a new trigger has not taken its baseline
        self.pending: dict[str, Identity] = {}
        self._deferred: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._rescan_task: asyncio.Task | None = None
        self._rescan_again: str | None = None
        self._skipped: set[str] = set()  # names not UTF-8, symlinks out: warned about once
        self._writers: asyncio.Future | None = None  # open_for_writing(root), as last looked up
        self._writers_at = 0.0
        # Files the queue could not take, with the identity they had then; offered again.
        self.unqueued: dict[str, Identity] = {}
        self._unqueued_retry: asyncio.TimerHandle | None = None
        self._unqueued_delays = outcome_retry_delays()
        self._stopped = False
        self.fired = 0
        self.failed = 0
        self.rescans = 0
        self.last_fired: dict[str, Any] | None = None
        self.last_error: str | None = None
        self.status = "starting"

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        since = time.time_ns() - FILE_CLOCK_LAG_NS
        if self.ledger.knows(self.watch_key, self.patterns_key):
            self.ledger.know(self.watch_key, self.patterns_key)  # an older faasd's watch: ours now
        else:
            self._baseline = Baseline(since)
        self.root.mkdir(parents=True, exist_ok=True)
        # Watch first, then rescan: a file closed in between is seen by both,
        # and the ledger makes it fire once.
        self.source.watch(self)
        self.status = "watching"
        log.info("function %s: watching %s for %s (bucket %s)", self.spec.name, self.root,
                 ", ".join(self.patterns), self.bucket)
        self.request_rescan("start")

    async def stop(self) -> None:
        self._stopped = True
        self.status = "stopped"
        self.source.unwatch(self)
        for handle in self._deferred.values():
            handle.cancel()
        self._deferred.clear()
        if self._unqueued_retry is not None:
            self._unqueued_retry.cancel()
            self._unqueued_retry = None
        if self._rescan_task is not None:
            self._rescan_task.cancel()
        # Events being handed to the queue finish, so that what the queue
        # accepted is also in the ledger.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_WAIT_S)

    def update(self, spec: FunctionSpec) -> None:
        self.spec = spec

    def state(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "dir": str(self.root),
            "bucket": self.bucket,
            "patterns": self.patterns,
            "fired": self.fired,
            "failed": self.failed,
            "pending": len(self.pending) + len(self._deferred),
            "unqueued": len(self.unqueued),
            "ledger_entries": self.ledger.count(self.watch_key),
            "rescans": self.rescans,
            "last_fired": self.last_fired,
            "last_error": self.last_error,
        }

    # -- events (in the loop) ----------------------------------------------------------

    def rel(self, path: str | bytes) -> str | None:
        """`path` relative to the watched dir, / separated; None outside it or if not UTF-8."""
        path = os.fsdecode(path)
        if not path:
            return None
        rel = os.path.relpath(path, self.root)
        if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
            return None
        rel = rel.replace(os.sep, "/")
        if not is_utf8(rel):
            self._skip_undecodable(rel)
            return None
        return rel

    def _skip_undecodable(self, rel: str) -> None:
        if rel in self._skipped or not matches(rel, self.patterns):
            return
        self._skipped.add(rel)
        path = os.fsencode(self.root / rel)
        self.last_error = f"{path!r}: name is not valid UTF-8; skipped"
        log.warning("function %s: skipping %r: its name is not valid UTF-8, which an S3 key must be "
                    "(renamed to a valid name, it fires)", self.spec.name, path)

    def _skip_link_out(self, rel: str) -> None:
        if rel in self._skipped:
            return
        self._skipped.add(rel)
        self.last_error = f"{rel}: a symlink out of the watched dir; skipped"
        log.warning("function %s: skipping %s: it is a symlink to %s, outside the watched dir %s",
                    self.spec.name, rel, os.path.realpath(self.root / rel), self.root)

    def on_event(self, event: FileSystemEvent) -> None:
        if self._stopped:
            return
        try:
            self._handle(event)
        except Exception:
            log.exception("function %s: cannot handle %s", self.spec.name, event)

    def _handle(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileClosedEvent):
            rel = self.rel(event.src_path)
            if rel is not None:
                self.consider(rel)
        elif isinstance(event, FileMovedEvent):
            src, dest = self.rel(event.src_path), self.rel(event.dest_path)
            if src is not None and dest is not None and self._keep_moved(src, dest):
                return
            if src is not None:
                self.ledger.forget(self.watch_key, [src])
            if dest is not None:
                self.consider(dest)
        elif isinstance(event, FileDeletedEvent):
            rel = self.rel(event.src_path)
            if rel is not None:
                self.ledger.forget(self.watch_key, [rel])
        elif isinstance(event, FileAttribEvent):
            rel = self.rel(event.src_path)
            if rel is not None:
                self._attributes_changed(rel)
        elif isinstance(event, DirMovedEvent):
            src, dest = self.rel(event.src_path), self.rel(event.dest_path)
            if src is not None and dest is not None:
                self.ledger.move_tree(self.watch_key, src, dest)
            elif src is not None:
                self.ledger.forget_tree(self.watch_key, src)
            if dest is not None and self._baseline is not None and src is None:
                # Moved in whole: its files keep their ctimes, but none was there before.
                self._baseline.reported.add(dest)
            if dest is not None:
                # Files inside arrived complete, with no event of their own.
                self.request_rescan(f"directory {dest} moved in", subtree=dest)
        elif isinstance(event, DirCreatedEvent):
            rel = self.rel(event.src_path)
            if rel is not None:
                # A file closed before the new directory's watch was in place
                # has no close event; the rescan finds it.
                self.request_rescan(f"directory {rel} created", subtree=rel)
        elif isinstance(event, DirDeletedEvent):
            if os.fsdecode(event.src_path) == str(self.root):
                self.status = "dir deleted"
                self.last_error = f"{self.root} was deleted; recreated and watched again"
                log.warning("function %s: watched dir %s was deleted; recreating it",
                            self.spec.name, self.root)
                asyncio.get_running_loop().call_later(0.5, self._rewatch)
            else:
                rel = self.rel(event.src_path)
                if rel is not None:
                    self.ledger.forget_tree(self.watch_key, rel)

    def _rewatch(self) -> None:
        if self._stopped:
            return
        self.source.unwatch(self)
        self.root.mkdir(parents=True, exist_ok=True)
        self.source.watch(self)
        self.status = "watching"
        self.request_rescan("watched dir recreated")

    def _keep_moved(self, src: str, dest: str) -> bool:
        """A file that already fired, renamed within the tree, keeps its entry and does not fire."""
        recorded = self.ledger.get(self.watch_key, src)
        if recorded is None:
            return False
        try:
            st = os.stat(self.root / dest)
        except OSError:
            return False
        if recorded[:2] != identity(st)[:2]:
            return False
        self.ledger.move(self.watch_key, src, dest)
        self.ledger.record(self.watch_key, dest, identity(st),
                           self._request_id(dest, identity(st)))
        return True

    def _attributes_changed(self, rel: str) -> None:
        """Same inode and size, new mtime: `cp -p`/`tar x` finishing a file, not a new file."""
        try:
            st = os.stat(self.root / rel)
        except OSError:
            return
        ident = identity(st)
        pending = self.pending.get(rel)
        if pending is not None and pending[:2] == ident[:2]:
            self.pending[rel] = ident
            return
        recorded = self.ledger.get(self.watch_key, rel)
        if recorded is not None and recorded[:2] == ident[:2] and recorded != ident:
            self.ledger.record(self.watch_key, rel, ident, self._request_id(rel, recorded))

    def consider(self, rel: str, seen: Identity | None = None) -> None:
        """Fire `rel` if it matches, is a regular file and is not already fired as it is now."""
        if self._stopped or not matches(rel, self.patterns):
            return
        if self._baseline is not None:
            self._baseline.reported.add(rel)  # written since the watch began: not a file already there
        try:
            st = _stat_inside(self.root, rel)
        except OSError:
            return  # gone again (a temp file, or deleted at once)
        if st is None:
            self._skip_link_out(rel)
            return
        if not stat.S_ISREG(st.st_mode):
            return
        ident = identity(st)
        if seen is not None and seen != ident:
            self._defer(rel, ident)  # still changing: wait for it to settle
            return
        if self.pending.get(rel) == ident or self.ledger.get(self.watch_key, rel) == ident:
            return
        handle = self._deferred.pop(rel, None)
        if handle is not None:
            handle.cancel()
        self.pending[rel] = ident
        task = asyncio.get_running_loop().create_task(self._fire(rel, ident))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _defer(self, rel: str, ident: Identity) -> None:
        old = self._deferred.pop(rel, None)
        if old is not None:
            old.cancel()
        self._deferred[rel] = asyncio.get_running_loop().call_later(
            SETTLE_S, self._settled, rel, ident)

    def _settled(self, rel: str, ident: Identity) -> None:
        self._deferred.pop(rel, None)
        task = asyncio.get_running_loop().create_task(self._settle(rel, ident))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, rel: str, ident: Identity) -> None:
        """A deferred file unchanged for SETTLE_S: it fires, unless a writer still
        has it open (paused, not done): then its close fires it, or a later look."""
        writing = await self._being_written()
        if self._stopped:
            return
        if rel in writing:
            self._defer(rel, ident)
        else:
            self.consider(rel, seen=ident)

    async def _being_written(self) -> set[str]:
        """open_for_writing(root), one look shared by those within WRITERS_FRESH_S:
        a rescan's many deferred files settle together, each would read /proc."""
        loop = asyncio.get_running_loop()
        if self._writers is None or loop.time() - self._writers_at > WRITERS_FRESH_S:
            self._writers_at = loop.time()
            self._writers = loop.run_in_executor(None, open_for_writing, self.root)
        return await asyncio.shield(self._writers)

    def _request_id(self, rel: str, ident: Identity) -> str:
        return str(uuid.uuid5(REQUEST_ID_NAMESPACE, f"{self.watch_key}\0{rel}\0{ident[0]}:{ident[1]}:{ident[2]}"))

    async def _fire(self, rel: str, ident: Identity) -> None:
        request_id = self._request_id(rel, ident)
        path = str(self.root / rel)
        try:
            etag = await self._etag(rel, path, ident)
            if etag is None:
                return
            event = s3_event(bucket=self.bucket, rel=rel, path=path, ident=ident, etag=etag,
                             region=self.source.daemon.region, request_id=request_id)
            await queue_of(self.source.daemon).put(self.spec.name, orjson.dumps(event),
                                                   request_id=request_id, source="file")
        except Exception as exc:
            self._not_queued(rel, ident, path, exc)
            return
        finally:
            pending = self.pending.get(rel)
            current = self.pending.pop(rel) if pending and pending[:2] == ident[:2] else ident
        if self.unqueued.pop(rel, None) is not None and not self.unqueued:
            self._unqueued_delays = outcome_retry_delays()
            if self._unqueued_retry is not None:
                self._unqueued_retry.cancel()
                self._unqueued_retry = None
            log.info("function %s: every file that could not be queued is queued now", self.spec.name)
        # `current` carries an mtime update seen while queueing (see _attributes_changed).
        self.ledger.record(self.watch_key, rel, current, request_id)
        self.fired += 1
        self.last_fired = {"path": path, "size": ident[1], "request_id": request_id,
                           "at": time.time()}
        log.debug("function %s: %s queued as %s", self.spec.name, path, request_id)

    def _not_queued(self, rel: str, ident: Identity, path: str, exc: Exception) -> None:
        """Keep a file the queue refused, and offer it again later (not in the ledger yet)."""
        if self.unqueued.get(rel) != ident:
            self.failed += 1  # once per version of a file, not per try
        self.last_error = f"{rel}: not queued: {exc}"
        if not self.unqueued:
            log.error("function %s: file %s not queued: %s; it and any other file the queue "
                      "refuses are offered again (1 s, doubling to 30 s) until they are queued",
                      self.spec.name, path, exc)
        else:
            log.debug("function %s: file %s not queued: %s", self.spec.name, path, exc)
        self.unqueued[rel] = ident
        if self._unqueued_retry is None and not self._stopped:
            self._unqueued_retry = asyncio.get_running_loop().call_later(
                next(self._unqueued_delays), self._offer_unqueued)

    def _offer_unqueued(self) -> None:
        """Offer again each file the queue refused that is still there as it was then."""
        self._unqueued_retry = None
        if self._stopped:
            return
        for rel, ident in list(self.unqueued.items()):
            if rel in self.pending:
                continue  # being offered right now
            try:
                st = os.stat(self.root / rel)
            except OSError:
                st = None
            # Gone, rewritten or replaced (which fires it as a new version), or recorded
            # since. A new mtime alone (touch, cp -p) is still this file.
            if (st is None or identity(st)[:2] != ident[:2]
                    or self.ledger.get(self.watch_key, rel) == identity(st)):
                del self.unqueued[rel]
                continue
            self.consider(rel)
        if not self.unqueued:
            self._unqueued_delays = outcome_retry_delays()

    async def _etag(self, rel: str, path: str, ident: Identity) -> str | None:
        """The file's eTag, or None if it cannot be read (then it does not fire)."""
        try:
            return await self.source.etags.of(path, ident[1], ident[0])
        except FileNotFoundError:
            return None  # deleted since, or renamed: its new name fires as itself
        except OSError as exc:
            # Not in the ledger: the next rescan (or restart) offers it again.
            self.failed += 1
            self.last_error = f"{rel}: cannot be read: {exc}"
            log.error("function %s: file %s cannot be read: %s", self.spec.name, path, exc)
            return None

    # -- rescans -----------------------------------------------------------------------

    def request_rescan(self, reason: str, subtree: str | None = None) -> None:
        """Rescan (the whole tree, or one subtree) soon; rescans never overlap."""
        if self._stopped:
            return
        if self._rescan_task is not None and not self._rescan_task.done():
            # Whatever was asked while a rescan runs is covered by one full rescan after it.
            self._rescan_again = reason
            return
        self._rescan_task = asyncio.get_running_loop().create_task(self._rescan(reason, subtree))

    async def _rescan(self, reason: str, subtree: str | None) -> None:
        while True:
            try:
                await self._rescan_once(reason, subtree)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"rescan failed: {exc}"
                log.exception("function %s: rescanning %s failed", self.spec.name, self.root)
            if self._rescan_again is None or self._stopped:
                return
            reason, subtree, self._rescan_again = self._rescan_again, None, None

    def _take_baseline(self, baseline: Baseline, stats: dict[str, os.stat_result], writing: set[str]) -> None:
        """Record the files already in a new trigger's dir as seen, without firing them (as S3
        notifies only the objects created after a notification is configured). The others,
        inotify's or changed since, and those still open for writing, are left to the rescan."""
        now = time.time_ns()
        present = {rel: identity(st) for rel, st in stats.items()
                   if baseline.was_there(st, now) and rel not in writing
                   and not baseline.is_new(rel) and is_utf8(rel)}
        self.ledger.know(self.watch_key, self.patterns_key, present)
        self._baseline = None
        log.info("function %s: new file trigger on %s (%s): %d files already there taken as "
                 "present, not fired; files written from now on fire", self.spec.name, self.root,
                 ", ".join(self.patterns), len(present))

    async def _rescan_once(self, reason: str, subtree: str | None) -> None:
        top = self.root / subtree if subtree else self.root
        patterns = self.patterns
        root = self.root
        loop = asyncio.get_running_loop()
        stats = await loop.run_in_executor(None, _walk, root, top, patterns)
        writing = await self._being_written() if stats else set()
        if self._stopped:
            return
        self.rescans += 1
        if self._baseline is not None and subtree is None:
            self._take_baseline(self._baseline, stats, writing)
        found = {rel: identity(st) for rel, st in stats.items()}
        recorded = self.ledger.all(self.watch_key)
        now = time.time()
        fired_before = self.fired + len(self.pending)
        for rel, ident in found.items():
            if recorded.get(rel) == ident or self.pending.get(rel) == ident:
                continue
            if not is_utf8(rel):
                self._skip_undecodable(rel)
                continue
            try:
                if rel in writing or now - ident[2] / 1e9 < SETTLE_S:
                    self._defer(rel, ident)  # being written, or may still be
                else:
                    self.consider(rel)
            except Exception:
                log.exception("function %s: rescan: cannot consider %s", self.spec.name, self.root / rel)
        if subtree is None:
            # Entries of files that are gone: keeps the ledger as small as the dir. One the
            # walk did not see may be of a file written after it, and fired since: kept.
            gone = [rel for rel in recorded if rel not in found and rel not in self.pending
                    and not os.path.lexists(self.root / rel)]
            self.ledger.forget(self.watch_key, gone)
        queued = self.fired + len(self.pending) - fired_before
        if queued or reason != "start":
            log.info("function %s: rescan of %s (%s): %d files, %d new", self.spec.name, top,
                     reason, len(found), queued)


def open_for_writing(root: Path) -> set[str]:
    """The files under `root` that a process has open for writing, relative to
    it: of every process where the daemon runs as root, else of its own user's
    (the others' descriptors cannot be read)."""
    prefix = os.path.realpath(root) + os.sep
    found: set[str] = set()
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        fds = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fds)
        except OSError:
            continue  # gone, or not ours to look into
        for fd in names:
            try:
                target = os.readlink(f"{fds}/{fd}")
            except OSError:
                continue
            if not target.startswith(prefix):
                continue
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = next((int(line.split()[1], 8) for line in info if line.startswith("flags:")), 0)
            except (OSError, ValueError, IndexError):
                continue
            if flags & os.O_ACCMODE != os.O_RDONLY:
                found.add(target[len(prefix):])
    return found


def _stat_inside(root: Path, rel: str) -> os.stat_result | None:
    """What `rel` is, a symlink followed only to a file inside the watched dir;
    None for a symlink out of it. As an S3 bucket holds only what was put
    there, a link cannot hand a function (its path, size and eTag, read by the
    daemon) a file from elsewhere on the host."""
    path = root / rel
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        real_root = os.path.realpath(root)
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            return None
        st = os.stat(path)
    return st


def _walk(root: Path, top: Path, patterns: list[str]) -> dict[str, os.stat_result]:
    """Every matching regular file under `top`, with its stat (runs in a thread)."""
    found: dict[str, os.stat_result] = {}
    for directory, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = os.path.relpath(directory, root)
        for name in files:
            rel = name if base == "." else f"{base}/{name}".replace(os.sep, "/")
            if not matches(rel, patterns):
                continue
            try:
                st = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found[rel] = st
    return found


async def start(daemon: "Daemon") -> None:
    """Extension entry point: file triggers for every function that has them."""
    source = FileSource(daemon)
    daemon.file_triggers = source  # type: ignore[attr-defined]
    await source.attach()


__all__ = ["FileSource", "FileTrigger", "Ledger", "matches", "s3_event", "s3_key", "start"]
