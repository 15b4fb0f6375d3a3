"""The durable queue of asynchronous invocations: every Event invoke, file, cron and AMQP event.

Asynchronous work enters here and nowhere else:

    await daemon.queue.put(function, payload, *, request_id=None, source="api",
                           on_done=None, invoked_arn=None, trace_id=None) -> str

  * `function`: the function's name; `FunctionNotFound` if it does not exist.
  * `payload`: the event, as JSON bytes (handed to the handler unchanged).
  * `request_id`: the invocation's request id, kept across every retry (the
    handler's `context.aws_request_id`); a new UUID when None. A source that
    wants idempotent ids (e.g. cron's "NAME:timestamp") passes its own.
  * `source`: a short label ("api", "file", "cron", "amqp", ...) shown in logs,
    dead-letter records and invocation observers.
  * `invoked_arn`: the ARN an Invoke API call named when it carried a
    qualifier (`NAME:$LATEST`): every attempt's `context.invoked_function_arn`,
    as a synchronous call's. None: the function's own, unqualified ARN.
  * `trace_id`: the caller's X-Ray trace header, every attempt's
    `_X_AMZN_TRACE_ID`. None: each attempt gets a new one.
  * `on_done`: called once, in the event loop, with a `QueuedOutcome` when the
    event finally succeeded or was dead-lettered (sync or async callable;
    its exceptions are logged and ignored). It lives in memory only: after a
    daemon crash the event still runs, but the callback is gone, which suits
    a broker consumer that acks in `on_done` (the unacked message comes back).
  * Returns the request id once the event is committed to disk (SQLite, WAL,
    synchronous=FULL): from then on it survives kill -9 and power loss.
    Raises `ShuttingDown` once the queue is closing, and OSError while the
    disk keeps the file shut (a full disk at start: see `AsyncQueue.open`).
  * `durable=False`: for a source that keeps the event itself until
    `on_done` (a broker's unacknowledged message). The event takes the same
    path -- dispatch, limits, retries, dead letters, destinations -- but is
    held in memory only, so it costs no disk writes; after a crash the
    source delivers it again. Dead-letter files and destination events it
    produces are durable as always.

Delivery is at least once. An event leaves the queue only after its
invocation ended and its outcome (success, retry, dead letter) is committed;
events that were running when the daemon died run again at the next start
(an interruption is not counted as a failed attempt). Duplicates are
possible, losses are not.

Dispatch runs each ready event through `Invoker.invoke(..., wait=True)`, so
asynchronous work waits for a concurrency slot instead of being refused. At
most `concurrency` (or the global `max_concurrency`) events of a function are
taken off the queue at once, oldest first. A failed attempt (handler error,
timeout, OOM, crash, init error, unknown function) is retried after
`[async] retry_delays_s` up to `max_retries` times; an event older than
`max_event_age_s` is not run again. Then the event is dead-lettered: to the
`on_failure = "function:NAME"` function as a new queued event, or else as a
JSON file in `<data-dir>/dead-letter/NAME/<request id>.json`. A success is
sent to the `on_success` function, when set. Both use Lambda's destination
record (`version`, `timestamp`, `requestContext{requestId, functionArn,
condition, approximateInvokeCount}`, `requestPayload`, `responseContext
{statusCode, executedVersion, functionError}`, `responsePayload`), plus a
`faasd` object with the source, first-enqueue and last-attempt times.
Destination records chain at most MAX_DESTINATION_HOPS functions deep, so a
cycle of destinations ends in the dead-letter directory.

Storage: `<data-dir>/queue.db`, one row per pending event (deleted when done)
plus lifetime totals per function. SQLite runs on one thread of its own;
writes from many coroutines are grouped into one transaction and one fsync.
The file is locked (`queue.lock`): two daemons never share a queue. Columns
added since the first release (`ADDED_COLUMNS`) are added to an older file as
it is opened, and its events run as they did; a faasd from before them uses
the file as it is, so the schema version stays 1 and a downgrade keeps it.

Figures for health and metrics: `stats()` (every function) and
`function_stats(name)` give depth, running, oldest event age, succeeded,
retried and dead-lettered totals, kept in memory and cheap to read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import logging
import os
import re
import sqlite3
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

import orjson

from .errors import HANDLED, FunctionError, FunctionNotFound, InvokeRefused, ShuttingDown, Throttled
from .spec import AsyncConfig, function_arn, new_request_id

if TYPE_CHECKING:
    from .daemon import Daemon
    from .invoker import Invocation, Invoker
    from .registry import Registry

log = logging.getLogger("faasd.queue")

SCHEMA_VERSION = 1
# Nullable columns of `events` added since schema 1 came out, which a file
# written before them gets when it is opened (NULL: as events ran before).
ADDED_COLUMNS = ("invoked_arn", "trace_id")
MAX_DESTINATION_HOPS = 5
# Functions that are not (or no longer) in functions/ are tried one event at
# a time: each attempt fails fast and is retried or dead-lettered.
UNKNOWN_FUNCTION_CAP = 1
# The dispatcher looks at the queue at least this often, whatever it was
# told: a guard against a lost wake-up or a jump of the wall clock.
MAX_IDLE_S = 5.0
DISPATCH_RETRY_S = 1.0  # after a dispatch that failed (a full disk, a locked database)
# An event's outcome that cannot be written (a full disk) is tried again after
# this long, doubling up to OUTCOME_RETRY_MAX_S, until it is written.
OUTCOME_RETRY_FIRST_S = 1.0
OUTCOME_RETRY_MAX_S = 30.0
SUCCESS = "Success"
RETRIES_EXHAUSTED = "RetriesExhausted"
EVENT_AGE_EXCEEDED = "EventAgeExceeded"

OnDone = Callable[["QueuedOutcome"], "Awaitable[None] | None"]


def outcome_retry_delays() -> Iterator[float]:
    """How long to wait before each new try of what must be written or sent
    before an event can be let go: OUTCOME_RETRY_FIRST_S, doubling up to
    OUTCOME_RETRY_MAX_S, for as long as it takes."""
    delay = OUTCOME_RETRY_FIRST_S
    while True:
        yield delay
        delay = min(delay * 2, OUTCOME_RETRY_MAX_S)


# SQLite's primary result codes for a file the disk will not hold or let be created:
# SQLITE_IOERR (its -shm file cannot be sized), SQLITE_FULL, SQLITE_CANTOPEN.
_DISK_SQLITE_CODES = {10, 13, 14}
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}


def disk_refused(exc: BaseException) -> bool:
    """Whether `exc` says the disk has no room (or failed), rather than that the file is bad:
    what is tried again once there may be room, where other errors stop."""
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _DISK_SQLITE_CODES
    return isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS


@dataclass(frozen=True, slots=True)
class QueuedOutcome:
    """How a queued event ended, given once to its `on_done` callback."""

    request_id: str
    function: str
    source: str
    succeeded: bool
    condition: str            # Success | RetriesExhausted | EventAgeExceeded
    attempts: int             # invocations that ran to an outcome
    error: FunctionError | None = None   # the last attempt's error, if it failed
    response: bytes | None = None        # the function's result, on success
    destination: str | None = None       # "function:NAME" or the dead-letter file's path


@dataclass(slots=True)
class _Event:
    id: int
    function: str
    request_id: str
    payload: bytes
    source: str
    enqueued_at: float
    attempts: int
    hops: int
    last_error: bytes | None  # the last failed attempt's error, as Lambda's JSON
    invoked_arn: str | None = None  # context.invoked_function_arn when the caller named a qualifier
    trace_id: str | None = None     # the caller's X-Ray trace header

    def previous_error(self) -> FunctionError | None:
        if not self.last_error:
            return None
        return FunctionError.from_payload(HANDLED, orjson.loads(self.last_error))


@dataclass(slots=True)
class _Counts:
    """One function's figures; kept in memory so that reading them costs nothing."""

    pending: dict[int, float] = field(default_factory=dict)  # event id -> enqueued_at, oldest first
    running: int = 0
    succeeded: int = 0
    retried: int = 0
    dead_lettered: int = 0

    def to_json(self, now: float) -> dict[str, Any]:
        oldest = next(iter(self.pending.values()), None)
        return {
            "depth": len(self.pending),  # not done yet: waiting, or running now
            "running": self.running,
            "oldest_age_s": round(max(0.0, now - oldest), 3) if oldest is not None else 0.0,
            "succeeded": self.succeeded,
            "retried": self.retried,
            "dead_lettered": self.dead_lettered,
        }


Op = Callable[[sqlite3.Connection], Any]


class Journal:
    """queue.db, used from one thread only (the queue's executor)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None
        self.commit_ms: deque[float] = deque(maxlen=256)
        self.wrote = False  # the last transaction committed a change (not only reads)

    def open(self) -> tuple[list[tuple[int, str, float]], dict[tuple[str, str], int], int]:
        """Open (creating) the database; put interrupted events back; return what is there."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            found = self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        return found

    def _prepare(self, conn: sqlite3.Connection
                 ) -> tuple[list[tuple[int, str, float]], dict[tuple[str, str], int], int]:
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk (fsynced) before put() returns, so a
        # queued event survives power loss as well as kill -9.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} was written by a newer faasd (schema {version})")
        conn.executescript("""
            BEGIN;
            CREATE TABLE IF NOT EXISTS events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                function TEXT NOT NULL,
                request_id TEXT NOT NULL,
                payload BLOB NOT NULL,
                source TEXT NOT NULL,
                enqueued_at REAL NOT NULL,
                next_at REAL NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                interruptions INTEGER NOT NULL DEFAULT 0,
                hops INTEGER NOT NULL DEFAULT 0,
                running INTEGER NOT NULL DEFAULT 0,
                last_error TEXT,
                invoked_arn TEXT,
                trace_id TEXT
            );
            CREATE INDEX IF NOT EXISTS events_ready ON events (running, function, next_at, id);
            CREATE INDEX IF NOT EXISTS events_due ON events (running, next_at);
            CREATE TABLE IF NOT EXISTS totals (
                function TEXT NOT NULL,
                outcome TEXT NOT NULL,
                count INTEGER NOT NULL,
                PRIMARY KEY (function, outcome)
            ) WITHOUT ROWID;
            PRAGMA user_version = 1;
            COMMIT;
        """)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
        for column in ADDED_COLUMNS:
            if column not in columns:
                conn.execute(f"ALTER TABLE events ADD COLUMN {column} TEXT")
        # Events that were running when the daemon died: their outcome was
        # never recorded, so they run again (the lost attempt is not counted).
        interrupted = conn.execute(
            "UPDATE events SET running = 0, interruptions = interruptions + 1 WHERE running = 1"
        ).rowcount
        pending = conn.execute("SELECT id, function, enqueued_at FROM events ORDER BY id").fetchall()
        totals = {(f, o): c for f, o, c in conn.execute("SELECT function, outcome, count FROM totals")}
        return pending, totals, interrupted

    def apply(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        """Run `ops` in one transaction (one fsync); each in a savepoint so one failure stays its own."""
        conn = self.conn
        assert conn is not None
        started = time.perf_counter()
        results: list[tuple[bool, Any]] = []
        changes = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((True, op(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:  # noqa: BLE001 - handed back to the op's caller
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((False, exc))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.commit_ms.append((time.perf_counter() - started) * 1000)
        self.wrote = conn.total_changes != changes
        return results

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# -- operations on the journal (run in its thread) ----------------------------------------

def _probe(conn: sqlite3.Connection) -> None:
    """A transaction that writes (a row in and out again) and leaves the journal as it was."""
    conn.execute("INSERT OR REPLACE INTO totals VALUES ('', 'write-probe', 0)")
    conn.execute("DELETE FROM totals WHERE function = '' AND outcome = 'write-probe'")


def _bump(conn: sqlite3.Connection, function: str, outcome: str) -> None:
    conn.execute(
        "INSERT INTO totals (function, outcome, count) VALUES (?, ?, 1) "
        "ON CONFLICT (function, outcome) DO UPDATE SET count = count + 1", (function, outcome))


def _insert(conn: sqlite3.Connection, function: str, request_id: str, payload: bytes,
            source: str, enqueued_at: float, hops: int = 0, invoked_arn: str | None = None,
            trace_id: str | None = None) -> int:
    cursor = conn.execute(
        "INSERT INTO events (function, request_id, payload, source, enqueued_at, next_at, hops, "
        "invoked_arn, trace_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (function, request_id, payload, source, enqueued_at, enqueued_at, hops, invoked_arn, trace_id))
    return int(cursor.lastrowid)  # type: ignore[arg-type]


def write_file_durably(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that it survives power loss: temp file, fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


def dead_letter_path(root: Path, function: str, request_id: str) -> Path:
    return root / function / (_UNSAFE.sub("_", request_id)[:200] + ".json")


def iso_time(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"


def _json_or_text(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", "replace")


# -- what every queue's put(), retry policy and destination records share (faasd/cluster/) --

async def notify_done(callback: OnDone | None, outcome: QueuedOutcome) -> None:
    """Run an event's on_done callback (sync or async); its errors are logged, never raised."""
    if callback is None:
        return
    try:
        result = callback(outcome)
        if asyncio.iscoroutine(result):
            await result
    except Exception:
        log.exception("asynchronous queue: on_done callback of %s failed", outcome.request_id)


def admit(closing: bool, registry: "Registry", function: str, payload: Any,
          request_id: str | None, elsewhere: Callable[[str], bool] | None = None) -> tuple[str, bytes]:
    """The checks of put(): the request id to use and the payload as bytes, or the error.

    `elsewhere(name)`: whether another node that takes the event has the function (a cluster's).
    """
    if closing:
        raise ShuttingDown("faasd is shutting down: the event was not queued")
    if registry.get(function) is None and not (elsewhere is not None and elsewhere(function)):
        raise FunctionNotFound(function)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be JSON bytes, not {type(payload).__name__}")
    return request_id or new_request_id(), bytes(payload)


def next_attempt(config: AsyncConfig, attempts: int, enqueued_at: float,
                 now: float) -> tuple[float, None] | tuple[None, str]:
    """After `attempts` failed attempts: `(delay, None)` to try again, or `(None, condition)` to give up."""
    if attempts > config.max_retries:
        return None, RETRIES_EXHAUSTED
    delay = config.retry_delay(attempts)
    if now + delay - enqueued_at > config.max_event_age_s:
        return None, EVENT_AGE_EXCEEDED
    return delay, None


# Lambda retries a throttled event "for up to 6 hours by default. The retry interval increases
# exponentially from 1 second after the first attempt to a maximum of 5 minutes."
THROTTLE_RETRY_MAX_S = 300.0


def throttle_delay(config: AsyncConfig, enqueued_at: float, now: float) -> float:
    """How long a throttled event (its function's `concurrency` is 0) waits before it is
    tried again: about its age so far (so the waits double), from 1 s to 5 minutes, and
    never past its `max_event_age_s`, at which it is given up (EventAgeExceeded) on time.
    A throttled try is not one of its `max_retries` attempts: the function never ran."""
    delay = min(THROTTLE_RETRY_MAX_S, max(1.0, now - enqueued_at))
    return max(0.0, min(delay, enqueued_at + config.max_event_age_s - now + 0.001))


def destination_function(registry: "Registry", target: str | None, *, function: str,
                         request_id: str, hops: int,
                         elsewhere: Callable[[str], bool] | None = None) -> str | None:
    """The function a destination record goes to, or None (the dead-letter dir / nowhere).

    `elsewhere(name)`: whether another node that takes the record has the function (a cluster's).
    """
    if not target or not target.startswith("function:"):
        return None
    name = target.split(":", 1)[1]
    if registry.get(name) is None and not (elsewhere is not None and elsewhere(name)):
        log.error("async %s: destination function %s does not exist", function, name)
        return None
    if hops + 1 > MAX_DESTINATION_HOPS:
        log.error("async %s %s: destination %s not followed: records have already passed "
                  "through %d destinations (a cycle?)", function, request_id, name, hops)
        return None
    return name


def destination_record(*, request_id: str, function: str, payload: bytes, source: str,
                       enqueued_at: float, condition: str, attempts: int, region: str,
                       invocation: "Invocation | None", error: FunctionError | None) -> dict[str, Any]:
    """Lambda's destination record for one event, plus faasd's own details."""
    now = time.time()
    record: dict[str, Any] = {
        "version": "1.0",
        "timestamp": iso_time(now),
        "requestContext": {
            "requestId": request_id,
            "functionArn": f"{function_arn(function, region)}:$LATEST",
            "condition": condition,
            "approximateInvokeCount": attempts,
        },
        "requestPayload": _json_or_text(payload),
    }
    if attempts:
        response: dict[str, Any] = {"statusCode": 200, "executedVersion": "$LATEST"}
        if error is not None:
            response["functionError"] = "Unhandled"
        record["responseContext"] = response
        record["responsePayload"] = (
            error.to_lambda() if error is not None
            else _json_or_text(invocation.payload if invocation else None))
    record["faasd"] = {
        "function": function,
        "source": source,
        "enqueuedAt": iso_time(enqueued_at),
        "lastAttemptAt": iso_time(invocation.started_at) if invocation else None,
        "attempts": attempts,
        "error": error.to_lambda() if error is not None else None,
    }
    return record


class AsyncQueue:
    """The queue, its dispatcher and its figures. See the module docstring."""

    def __init__(self, data_dir: Path, registry: "Registry", invoker: "Invoker", *,
                 max_concurrency: int, region: str) -> None:
        self.path = data_dir / "queue.db"
        self.dead_letter_dir = data_dir / "dead-letter"
        self.registry = registry
        self.invoker = invoker
        self.max_concurrency = max_concurrency
        self.region = region
        self._journal = Journal(self.path)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="faasd-queue")
        self._lock_fd: int | None = None
        self._pending_ops: list[tuple[Op, Callable[[Any], None] | None, asyncio.Future]] = []
        self._writer: asyncio.Task | None = None
        self._open_error: str | None = None  # why the file would not open, until it does
        self._reopener: asyncio.Task | None = None
        self._write_failing = False  # said once, until a transaction that writes commits
        self._write_error = ""  # why the last transaction failed, while _write_failing
        self._write_probe: asyncio.Task | None = None
        self._unwritten: dict[int, str] = {}  # event id -> why its outcome is not written yet
        self._dispatcher: asyncio.Task | None = None
        self._tasks: dict[int, asyncio.Task] = {}
        self._callbacks: dict[int, OnDone] = {}
        # Events put with durable=False, by function, in arrival order; negative ids.
        self._held: dict[str, dict[int, _Event]] = {}
        self._held_due: dict[int, float] = {}  # next attempt time of each held event
        self._held_running: set[int] = set()
        self._held_ids = 0
        self._counts: dict[str, _Counts] = {}
        self._wake = asyncio.Event()
        self._closing = False
        self._loop = asyncio.get_running_loop()

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file and start dispatching; raise OSError if the file cannot serve.

        A disk with no room (or failing) is no reason not to start: what
        needs no queue (synchronous calls, HTTP triggers) serves, events are
        refused with the cause (`put`, readiness), and the file is opened
        again (1 s, doubling to 30 s) until it opens; then what it holds runs.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._opened(*await self._loop.run_in_executor(self._executor, self._journal.open))
        except (sqlite3.Error, RuntimeError) as exc:
            if not disk_refused(exc):
                self._unlock()
                raise OSError(f"cannot open the asynchronous queue {self.path}: {exc}") from None
            self._open_error = str(exc)
            log.error("asynchronous queue: cannot open %s (%s); faasd runs without it: synchronous "
                      "invocations and HTTP triggers serve, asynchronous invocations and file, cron "
                      "and AMQP events are refused until it opens, tried again every %gs (doubling "
                      "to %gs)", self.path, exc, OUTCOME_RETRY_FIRST_S, OUTCOME_RETRY_MAX_S)
            self._reopener = self._loop.create_task(self._reopen(), name="faasd-queue-reopen")

    async def _reopen(self) -> None:
        """Open the file the disk kept shut at start, as soon as it lets it."""
        for delay in outcome_retry_delays():
            await asyncio.sleep(delay)
            if self._closing:
                return
            try:
                found = await self._loop.run_in_executor(self._executor, self._journal.open)
            except (sqlite3.Error, RuntimeError) as exc:
                self._open_error = str(exc)
                log.debug("asynchronous queue: %s does not open yet: %s", self.path, exc)
                continue
            self._open_error = None
            log.warning("asynchronous queue: %s is open now; asynchronous invocations and "
                        "events are taken again", self.path)
            self._opened(*found)
            return

    def _opened(self, pending: list[tuple[int, str, float]], totals: dict[tuple[str, str], int],
                interrupted: int) -> None:
        """The journal is open: take its figures and start dispatching what it holds."""
        for event_id, function, enqueued_at in pending:
            self._count(function).pending[event_id] = enqueued_at
        for (function, outcome), count in totals.items():
            counts = self._count(function)
            if outcome in ("succeeded", "retried", "dead_lettered"):
                setattr(counts, outcome, count)
        if pending:
            log.info("asynchronous queue: %d events waiting%s", len(pending),
                     f", {interrupted} of them were running when faasd stopped and run again"
                     if interrupted else "")
        self._dispatcher = self._loop.create_task(self._dispatch_forever(), name="faasd-queue-dispatch")

    def _lock(self) -> None:
        lock_path = self.path.with_name("queue.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OSError(f"the data dir {self.path.parent} is in use by another faasd (pid {holder}); "
                          "give each daemon its own --data-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    async def close(self) -> None:
        """Stop dispatching; give running events back to the queue; close the file.

        The daemon drains the invoker first, so events still running here are
        ones whose invocation outlived the drain: they run again next start.
        """
        self._closing = True
        self._wake.set()
        if self._reopener is not None:
            self._reopener.cancel()
            await asyncio.gather(self._reopener, return_exceptions=True)
        if self._dispatcher is None:  # never opened: nothing ran, nothing to write
            # After an open the cancelled reopen may have left running in the thread.
            await self._loop.run_in_executor(self._executor, self._journal.close)
            self._executor.shutdown(wait=True)
            self._unlock()
            return
        await asyncio.gather(self._dispatcher, return_exceptions=True)
        if self._tasks:
            # Outcomes being recorded right now are let through.
            await asyncio.wait(list(self._tasks.values()), timeout=2.0)
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        try:
            returned, waiting = await self._write(lambda conn: (
                conn.execute("UPDATE events SET running = 0 WHERE running = 1").rowcount,
                conn.execute("SELECT count(*) FROM events").fetchone()[0]))
            if returned:
                log.info("asynchronous queue: %d running events go back to the queue", returned)
            if waiting:
                log.info("asynchronous queue: %d events wait in %s for the next start", waiting, self.path)
        except Exception:
            log.exception("asynchronous queue: cannot mark running events as queued; "
                          "they run again at the next start")
        if self._write_probe is not None:
            self._write_probe.cancel()
            await asyncio.gather(self._write_probe, return_exceptions=True)
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        await self._loop.run_in_executor(self._executor, self._journal.close)
        self._executor.shutdown(wait=True)
        self._unlock()

    # -- the API for event sources -----------------------------------------------------------

    async def put(self, function: str, payload: bytes, *, request_id: str | None = None,
                  source: str = "api", on_done: OnDone | None = None, durable: bool = True,
                  invoked_arn: str | None = None, trace_id: str | None = None) -> str:
        """Queue one event durably; return its request id. See the module docstring."""
        request_id, data = admit(self._closing, self.registry, function, payload, request_id)
        if self._open_error is not None:
            raise OSError(f"the asynchronous queue cannot open {self.path}: {self._open_error}")
        now = time.time()

        def committed(event_id: int) -> None:
            self._count(function).pending[event_id] = now
            if on_done is not None:
                self._callbacks[event_id] = on_done
            self._wake.set()

        if not durable:
            self._held_ids -= 1
            event = _Event(self._held_ids, function, request_id, data, source, now, 0, 0, None,
                           invoked_arn, trace_id)
            self._held.setdefault(function, {})[event.id] = event
            self._held_due[event.id] = now
            committed(event.id)
            return request_id
        await self._write(lambda conn: _insert(conn, function, request_id, data, source, now,
                                               invoked_arn=invoked_arn, trace_id=trace_id), committed)
        return request_id

    def function_stats(self, name: str) -> dict[str, Any]:
        """depth, running, oldest_age_s, succeeded, retried, dead_lettered of one function."""
        counts = self._counts.get(name) or _Counts()
        return counts.to_json(time.time())

    def stats(self) -> dict[str, dict[str, Any]]:
        """`function_stats` of every function the queue has seen."""
        now = time.time()
        return {name: counts.to_json(now) for name, counts in sorted(self._counts.items())}

    def commit_latency_ms(self) -> dict[str, float]:
        """Median and worst commit time of the last 256 transactions (fsync included)."""
        samples = sorted(self._journal.commit_ms)
        if not samples:
            return {"p50": 0.0, "max": 0.0, "samples": 0}
        return {"p50": round(samples[len(samples) // 2], 3), "max": round(samples[-1], 3),
                "samples": len(samples)}

    def _count(self, function: str) -> _Counts:
        counts = self._counts.get(function)
        if counts is None:
            counts = self._counts[function] = _Counts()
        return counts

    # -- group commit ----------------------------------------------------------------------

    async def _write(self, op: Op, committed: Callable[[Any], None] | None = None) -> Any:
        """Run `op` in the journal's thread, in the next transaction; then `committed(result)`.

        `committed` runs in the loop, in commit order, before any later
        transaction's callbacks: the in-memory figures follow the file.
        """
        future = self._loop.create_future()
        self._pending_ops.append((op, committed, future))
        if self._writer is None or self._writer.done():
            self._writer = self._loop.create_task(self._write_batches(), name="faasd-queue-writer")
        return await asyncio.shield(future)

    async def _write_outcome(self, event: _Event, op: Op, committed: Callable[[Any], None]) -> None:
        """`_write` an event's outcome, trying again (1 s, doubling to 30 s) until it is written.

        Until then the event stays running, so it is neither lost nor run
        again, and the queue's readiness check fails.
        """
        delays = outcome_retry_delays()
        while True:
            try:
                await self._write(op, committed)
            except (OSError, sqlite3.Error) as exc:
                if not self._unwritten:
                    log.error("asynchronous queue: cannot write the outcome of %s %s (%s); it "
                              "stays running, and is written as soon as the disk allows",
                              event.function, event.request_id, exc)
                self._unwritten[event.id] = str(exc)
                await asyncio.sleep(next(delays))
                continue
            if self._unwritten.pop(event.id, None) is not None and not self._unwritten:
                log.info("asynchronous queue: every outcome held back is written")
            return

    async def _write_batches(self) -> None:
        while self._pending_ops:
            batch, self._pending_ops = self._pending_ops, []
            try:
                results = await self._loop.run_in_executor(
                    self._executor, self._journal.apply, [op for op, _, _ in batch])
            except Exception as exc:
                if not self._write_failing:
                    log.error("asynchronous queue: a transaction on %s failed: %s", self.path, exc)
                    self._write_failing = True
                self._write_error = str(exc)
                if not self._closing and (self._write_probe is None or self._write_probe.done()):
                    self._write_probe = self._loop.create_task(
                        self._probe_writes(), name="faasd-queue-write-probe")
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(OSError(f"the asynchronous queue cannot write {self.path}: {exc}"))
                continue
            if self._write_failing and self._journal.wrote:  # reads commit on a full disk too
                log.info("asynchronous queue: transactions on %s commit again", self.path)
                self._write_failing = False
            for (_, committed, future), (ok, value) in zip(batch, results):
                if ok and committed is not None:
                    try:
                        committed(value)
                    except Exception:
                        log.exception("asynchronous queue: post-commit step failed")
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    async def _probe_writes(self) -> None:
        """While transactions fail, try one that writes (1 s, doubling to 30 s).

        Readiness fails until a transaction that writes commits; without
        this, a daemon taken out of service for it would get no event whose
        put could show that the disk has room again.
        """
        for delay in outcome_retry_delays():
            await asyncio.sleep(delay)
            if not self._write_failing or self._closing:
                return
            try:
                await self._write(_probe)
            except (OSError, sqlite3.Error):
                continue

    # -- dispatch --------------------------------------------------------------------------

    def _candidates(self) -> tuple[list[tuple[str, int]], int]:
        """Functions with events waiting and room to run more (oldest event first), and the global room.

        Read from memory, so that a long backlog of a saturated function costs
        the dispatcher nothing.
        """
        # The global limit may change on a config reload: read it each time.
        global_limit = self.invoker.global_limit.limit or self.max_concurrency
        total = global_limit - sum(c.running for c in self._counts.values())
        found: list[tuple[float, str, int]] = []
        for name, counts in self._counts.items():
            waiting = len(counts.pending) - counts.running
            if waiting <= 0:
                continue
            spec = self.registry.get(name)
            if spec is None:
                limit = UNKNOWN_FUNCTION_CAP
            elif spec.concurrency == 0:
                # Throttled: its due events are taken only to be put back (_throttled),
                # or given up once too old; none runs.
                limit = global_limit
            else:
                limit = spec.concurrency or global_limit
            take = min(limit - counts.running, waiting)
            if take > 0:
                found.append((next(iter(counts.pending.values())), name, take))
        found.sort()
        return [(name, take) for _, name, take in found], max(0, total)

    async def _dispatch_forever(self) -> None:
        failures = 0  # in a row: the first is told with its traceback, the recovery once
        while not self._closing:
            self._wake.clear()
            try:
                delay = await self._claim_ready()
            except Exception:
                failures += 1
                if failures == 1:
                    log.exception("asynchronous queue: dispatch failed; trying again every %gs, "
                                  "and saying so again when it works", DISPATCH_RETRY_S)
                else:
                    log.debug("asynchronous queue: dispatch failed again (%d in a row)", failures,
                              exc_info=True)
                delay = DISPATCH_RETRY_S
            else:
                if failures:
                    log.warning("asynchronous queue: dispatching again after %d failed attempts",
                                failures)
                    failures = 0
            if self._closing:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, min(delay, MAX_IDLE_S)))
            except asyncio.TimeoutError:
                pass

    async def _claim_ready(self) -> float:
        """Take the ready events there is room for; return seconds until the next one is due."""
        if self.invoker.draining:
            return MAX_IDLE_S  # the daemon is stopping: what is queued stays for the next start
        candidates, total = self._candidates()
        now = time.time()
        # Held (memory-only) events first: they cost no transaction.
        held, candidates, total, held_due = self._claim_held(candidates, total, now)
        self._start_events(held)

        def claim(conn: sqlite3.Connection) -> tuple[list[_Event], float | None]:
            left = total
            events: list[_Event] = []
            for function, take in candidates:
                if left <= 0:
                    break
                rows = conn.execute(
                    "SELECT id, function, request_id, payload, source, enqueued_at, attempts, hops, "
                    "last_error, invoked_arn, trace_id FROM events "
                    "WHERE running = 0 AND function = ? AND next_at <= ? "
                    "ORDER BY next_at, id LIMIT ?", (function, now, min(take, left))).fetchall()
                conn.executemany("UPDATE events SET running = 1 WHERE id = ?", [(r[0],) for r in rows])
                events += [_Event(*row) for row in rows]
                left -= len(rows)
            due = conn.execute("SELECT MIN(next_at) FROM events WHERE running = 0 AND next_at > ?",
                               (now,)).fetchone()[0]
            return events, due

        def started(result: tuple[list[_Event], float | None]) -> None:
            self._start_events(result[0])

        if candidates and total > 0 or not held:
            _, due = await self._write(claim, started)
        else:
            due = None
        due = min((d for d in (due, held_due) if d is not None), default=None)
        return MAX_IDLE_S if due is None else due - time.time()

    def _claim_held(self, candidates: list[tuple[str, int]], total: int, now: float
                    ) -> tuple[list[_Event], list[tuple[str, int]], int, float | None]:
        """Take ready held events; return them, what is left to take from disk, and the next due time."""
        events: list[_Event] = []
        rest: list[tuple[str, int]] = []
        next_due: float | None = None
        for function, take in candidates:
            for event_id, event in self._held.get(function, {}).items():
                if take <= 0 or total <= 0:
                    break
                if event_id in self._held_running:
                    continue
                due = self._held_due[event_id]
                if due > now:
                    next_due = due if next_due is None else min(next_due, due)
                    continue
                self._held_running.add(event_id)
                events.append(event)
                take -= 1
                total -= 1
            if take > 0:
                rest.append((function, take))
        return events, rest, total, next_due

    def _start_events(self, events: list[_Event]) -> None:
        for event in events:
            self._count(event.function).running += 1
            task = self._loop.create_task(self._run(event), name=f"faasd-queue-{event.request_id}")
            self._tasks[event.id] = task
            task.add_done_callback(lambda _, event_id=event.id: self._tasks.pop(event_id, None))

    def _forget_held(self, event: _Event) -> None:
        self._held.get(event.function, {}).pop(event.id, None)
        self._held_due.pop(event.id, None)
        self._held_running.discard(event.id)

    async def _run(self, event: _Event) -> None:
        try:
            await self._attempt(event)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("asynchronous queue: event %s of %s could not be processed; "
                          "it stays queued", event.request_id, event.function)
            await asyncio.sleep(1.0)  # no tight loop on a persistent fault
            await self._release(event)

    async def _attempt(self, event: _Event) -> None:
        spec = self.registry.get(event.function)
        config = spec.async_config if spec is not None else AsyncConfig()
        if time.time() - event.enqueued_at > config.max_event_age_s:
            await self._finish_failed(event, config, EVENT_AGE_EXCEEDED, event.attempts,
                                      None, event.previous_error())
            return
        invocation: Invocation | None = None
        try:
            invocation = await self.invoker.invoke(event.function, event.payload,
                                                   request_id=event.request_id, wait=True,
                                                   source=event.source, invoked_arn=event.invoked_arn,
                                                   trace_id=event.trace_id)
            error = invocation.error
        except ShuttingDown:
            await self._release(event)
            return
        except Throttled:  # its concurrency is 0: it waits, as Lambda holds a throttled event
            await self._throttled(event, config)
            return
        except InvokeRefused as exc:  # the function is gone: an attempt that failed
            error = FunctionError(HANDLED, exc.error_type, exc.message)
        if error is None:
            await self._finish_succeeded(event, config, invocation)
            return
        attempts = event.attempts + 1
        now = time.time()
        delay, condition = next_attempt(config, attempts, event.enqueued_at, now)
        if delay is None:
            assert condition is not None
            await self._finish_failed(event, config, condition, attempts, invocation, error)
            return
        next_at = now + delay
        log.warning("async %s %s (from %s): attempt %d failed with %s: %s; retry %d of %d in %gs",
                    event.function, event.request_id, event.source, attempts, error.error_type,
                    error.message[:200], attempts, config.max_retries, delay)
        last_error = orjson.dumps(error.to_lambda())

        def retry(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE events SET running = 0, attempts = ?, next_at = ?, last_error = ? "
                         "WHERE id = ?", (attempts, next_at, last_error, event.id))
            _bump(conn, event.function, "retried")

        def committed(_: None) -> None:
            counts = self._count(event.function)
            counts.running -= 1
            counts.retried += 1
            self._wake.set()

        if event.id < 0:  # held in memory
            event.attempts, event.last_error = attempts, last_error
            self._held_due[event.id] = next_at
            self._held_running.discard(event.id)
            committed(None)
            return
        await self._write_outcome(event, retry, committed)

    async def _throttled(self, event: _Event, config: AsyncConfig) -> None:
        """Put a throttled event back, due again after throttle_delay; its attempts stay as they were."""
        now = time.time()
        next_at = now + throttle_delay(config, event.enqueued_at, now)
        log.info("async %s %s (from %s): throttled (concurrency 0); tried again in %.0fs",
                 event.function, event.request_id, event.source, next_at - now)

        def wait(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE events SET running = 0, next_at = ? WHERE id = ?", (next_at, event.id))

        def committed(_: None) -> None:
            self._count(event.function).running -= 1
            self._wake.set()

        if event.id < 0:  # held in memory
            self._held_due[event.id] = next_at
            self._held_running.discard(event.id)
            committed(None)
            return
        await self._write_outcome(event, wait, committed)

    async def _release(self, event: _Event) -> None:
        """Put a claimed event back as it was: it runs again when the dispatcher next looks."""

        def committed(_: None) -> None:
            self._count(event.function).running -= 1
            if not self._closing and not self.invoker.draining:
                self._wake.set()

        if event.id < 0:
            self._held_running.discard(event.id)
            committed(None)
            return
        await self._write_outcome(event, lambda conn: conn.execute(
            "UPDATE events SET running = 0 WHERE id = ?", (event.id,)), committed)

    # -- outcomes ----------------------------------------------------------------------------

    def _record(self, event: _Event, condition: str, attempts: int,
                invocation: "Invocation | None", error: FunctionError | None) -> dict[str, Any]:
        """Lambda's destination record for `event`, plus faasd's own details."""
        return destination_record(
            request_id=event.request_id, function=event.function, payload=event.payload,
            source=event.source, enqueued_at=event.enqueued_at, condition=condition,
            attempts=attempts, region=self.region, invocation=invocation, error=error)

    def _destination(self, target: str | None, event: _Event) -> str | None:
        """The function a destination record goes to, or None (the dead-letter dir / nowhere)."""
        return destination_function(self.registry, target, function=event.function,
                                    request_id=event.request_id, hops=event.hops)

    async def _finish_succeeded(self, event: _Event, config: AsyncConfig,
                                invocation: "Invocation | None") -> None:
        attempts = event.attempts + 1
        target = self._destination(config.on_success, event)
        record = (orjson.dumps(self._record(event, SUCCESS, attempts, invocation, None))
                  if target else None)
        now = time.time()
        destination_request_id = new_request_id()

        def done(conn: sqlite3.Connection) -> int | None:
            if event.id > 0:
                conn.execute("DELETE FROM events WHERE id = ?", (event.id,))
                _bump(conn, event.function, "succeeded")
            if target is None or record is None:
                return None
            return _insert(conn, target, destination_request_id, record, "destination", now, event.hops + 1)

        def committed(destination_id: int | None) -> None:
            self._settled(event, target, destination_id, now).succeeded += 1

        if event.id < 0:
            self._forget_held(event)
            if target is None:
                committed(None)  # nothing to write
            else:
                await self._write_outcome(event, done, committed)
        else:
            await self._write_outcome(event, done, committed)
        if attempts > 1 or event.source == "destination":
            log.info("async %s %s (from %s): succeeded on attempt %d", event.function,
                     event.request_id, event.source, attempts)
        await self._done(event, QueuedOutcome(
            request_id=event.request_id, function=event.function, source=event.source,
            succeeded=True, condition=SUCCESS, attempts=attempts,
            response=invocation.payload if invocation else None,
            destination=f"function:{target}" if target else None))

    def _settled(self, event: _Event, target: str | None, destination_id: int | None,
                 now: float) -> _Counts:
        """Count an event that left the queue (and its destination event, if one was
        written); return its function's counts for the caller to add the outcome."""
        counts = self._count(event.function)
        counts.pending.pop(event.id, None)
        counts.running -= 1
        if destination_id is not None and target is not None:
            self._count(target).pending[destination_id] = now
        self._wake.set()
        return counts

    async def _finish_failed(self, event: _Event, config: AsyncConfig, condition: str, attempts: int,
                             invocation: "Invocation | None", error: FunctionError | None) -> None:
        target = self._destination(config.on_failure, event)
        record = orjson.dumps(self._record(event, condition, attempts, invocation, error),
                              option=orjson.OPT_INDENT_2)
        path = dead_letter_path(self.dead_letter_dir, event.function, event.request_id)
        now = time.time()
        destination_request_id = new_request_id()

        def dead_letter(conn: sqlite3.Connection) -> int | None:
            destination_id = None
            if target is not None:
                destination_id = _insert(conn, target, destination_request_id, record, "destination",
                                         now, event.hops + 1)
            else:
                # The file is on disk before the event leaves the queue: a
                # crash in between writes the same file again, never loses it.
                write_file_durably(path, record)
            if event.id > 0:
                conn.execute("DELETE FROM events WHERE id = ?", (event.id,))
                _bump(conn, event.function, "dead_lettered")
            return destination_id

        def committed(destination_id: int | None) -> None:
            self._settled(event, target, destination_id, now).dead_lettered += 1

        if event.id < 0:
            self._forget_held(event)
        await self._write_outcome(event, dead_letter, committed)
        where = f"function {target}" if target else str(path)
        reason = f"{error.error_type}: {error.message[:200]}" if error else "never ran"
        log.error("async %s %s (from %s): %s after %d attempts (%s); record sent to %s",
                  event.function, event.request_id, event.source, condition, attempts, reason, where)
        await self._done(event, QueuedOutcome(
            request_id=event.request_id, function=event.function, source=event.source,
            succeeded=False, condition=condition, attempts=attempts, error=error,
            destination=f"function:{target}" if target else str(path)))

    async def _done(self, event: _Event, outcome: QueuedOutcome) -> None:
        await notify_done(self._callbacks.pop(event.id, None), outcome)


# -- wiring ---------------------------------------------------------------------------------

async def start(daemon: "Daemon") -> None:
    """Extension: open the queue, start dispatching, and show its figures."""
    queue = AsyncQueue(daemon.config.paths.data, daemon.registry, daemon.invoker,
                       max_concurrency=daemon.config.limits.max_concurrency, region=daemon.region)
    await queue.open()
    daemon.queue = queue
    daemon.on_cleanup(queue.close)

    def describe(name: str, view: dict) -> None:
        view["queue"] = queue.function_stats(name)

    def ready() -> tuple[bool, str]:
        if queue._open_error is not None:
            return False, (f"cannot open {queue.path} ({queue._open_error}): events are refused "
                           "until it opens; trying again")
        dispatcher = queue._dispatcher
        if dispatcher is None or dispatcher.done():
            return False, "the dispatcher is not running"
        if queue._unwritten:
            reason = next(iter(queue._unwritten.values()))
            return False, (f"{len(queue._unwritten)} event outcomes not yet written ({reason}); "
                           "trying again")
        if queue._write_failing:
            return False, (f"the queue cannot write {queue.path} ({queue._write_error}): events "
                           "are refused until a write commits; trying again")
        depth = sum(len(c.pending) for c in queue._counts.values())
        commits = queue.commit_latency_ms()
        return True, (f"{depth} events queued; commit p50 {commits['p50']} ms, "
                      f"max {commits['max']} ms over the last {commits['samples']}")

    daemon.describers.append(describe)
    daemon.readiness_checks["async_queue"] = ready
