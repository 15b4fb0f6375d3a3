"""Function logs: one file per function, a copy on the daemon's stdout, and followers.

Lines are the ones Lambda writes to CloudWatch (START, what the handler
printed, END, REPORT). In `<data>/logs/NAME.log` each line is stored as
`<ISO time>\\t<request id>\\t<text>`; on stdout it has the daemon's log
format (text, or JSON with `function` and `request_id` fields). Writes are
buffered and flushed once per event-loop turn: a burst of invocations costs
one write per file, not one per line. An invocation's START line waits up
to HOLD_S (5 ms) for the lines after it, so that a quick call, alone on a
quiet daemon, costs one write per file and not two; whatever is written
meanwhile takes it along, and a longer call's START is written at HOLD_S.

A file that grows past `max_file_bytes` is rotated: NAME.log becomes
NAME.log.1 (and .1 becomes .2, up to `keep_files`; the oldest goes), and
writing goes on in a new NAME.log. Reading a function's log reads the
rotated files too. `reopen()` (on SIGHUP) lets an external logrotate move
the files instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import AsyncIterator, BinaryIO, Callable

import orjson

log = logging.getLogger("faasd.logs")

MAX_LINE = 16 * 1024  # longer lines are cut, with a marker
IDLE_CLOSE_S = 60.0  # a log file not written for this long is closed (reopened on its next line)
MAX_TAIL_BYTES = 64 * 1024 * 1024  # the most a tail request reads back
FOLLOW_CHECK_S = 5.0  # how often a quiet follow checks that its reader is still there
FOLLOW_BACKLOG = 10000  # lines held for a follower that reads slower than they come
KEEP_LINES = 10000  # an invocation's last lines kept for LogType=Tail and the dashboard
# A START line waits this long for the invocation's next lines before it is
# written alone: a quick call's START, END and REPORT go out in one write.
HOLD_S = 0.005


_stamp_ms = -1
_stamp = ""
_second = -1
_second_text = ""


def iso_now() -> str:
    """The current UTC time as 2026-01-02T03:04:05.678Z; the date and time of day
    are formatted once a second, the milliseconds once each."""
    global _stamp_ms, _stamp, _second, _second_text
    ms = int(time.time() * 1000)
    if ms != _stamp_ms:
        _stamp_ms = ms
        second = ms // 1000
        if second != _second:
            _second = second
            _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamp = f"{_second_text}.{ms % 1000:03d}Z"
    return _stamp


# One write(): (function, ISO time, request id, lines without their newline).
Entry = tuple[str, str, str, tuple[str, ...]]


def _cut(text: str) -> str:
    if len(text) <= MAX_LINE:
        return text
    return text[:MAX_LINE] + f" [faasd: line truncated, {len(text) - MAX_LINE} more characters]"


class _FollowQueue(asyncio.Queue):
    """A follower's lines. Past FOLLOW_BACKLOG unread ones, new lines are
    dropped, and the reader is told how many where the gap is."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def offer(self, line: str) -> None:
        if self.qsize() >= FOLLOW_BACKLOG:
            self.dropped += 1
            return
        if self.dropped:
            self.put_nowait(f"{iso_now()}\t-\t[faasd: {self.dropped} lines were dropped here: "
                            f"this reader fell behind]\n")
            self.dropped = 0
        self.put_nowait(line)


class FunctionLogs:
    """Function log lines to files, stdout and followers, written in batches.

    Lines reach stdout in the daemon's log format (`echo_format` "text" or
    "json", the same shapes faasd/logfmt.py gives the `faasd.function`
    logger) without going through `logging`: at thousands of invocations a
    second, three records each, the logging machinery would cost more than
    the invocations.
    """

    def __init__(self, directory: Path, *, echo_format: str | None = "text",
                 stream: BinaryIO | None = None, max_file_bytes: int = 64 * 1024 * 1024,
                 keep_files: int = 3) -> None:
        self.directory = directory
        self.echo_format = echo_format
        self.max_file_bytes = max_file_bytes  # 0: never rotate
        self.keep_files = keep_files
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._files: dict[str, BinaryIO] = {}
        self._sizes: dict[str, int] = {}  # bytes in each open file
        self._lost: dict[str, tuple[int, str]] = {}  # lines a file did not take, and why
        self._cut: set[str] = set()  # files whose last write stopped inside a line
        self._written_at: dict[str, float] = {}  # monotonic time of each open file's last write
        self._idle_check_at = time.monotonic() + IDLE_CLOSE_S
        # What write() was given since the last flush: (function, stamp, request id, texts).
        # Lines are formatted in flush(), once per event-loop turn, not on every call.
        self._batch: list[Entry] = []
        self._followers: dict[str, set[_FollowQueue]] = {}
        # taps see every batch as flushed: tap(entries) (the dashboard's log tail)
        self.taps: list[Callable[[list[Entry]], None]] = []
        self._flush_scheduled = False
        self._hold_timer: asyncio.TimerHandle | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.log"

    def write(self, name: str, request_id: str, *texts: str) -> None:
        """Append lines (without their newline) to a function's log."""
        if max(map(len, texts), default=0) > MAX_LINE:
            texts = tuple(map(_cut, texts))
        self._batch.append((name, iso_now(), request_id, texts))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def write_held(self, name: str, request_id: str, text: str) -> None:
        """Append a line that may wait up to HOLD_S for the next write (an
        invocation's START, for its END and REPORT): it is flushed with the
        next line written, or alone once HOLD_S has passed."""
        self._batch.append((name, iso_now(), request_id, (_cut(text),)))
        if not self._flush_scheduled and self._hold_timer is None:
            self._hold_timer = asyncio.get_running_loop().call_later(HOLD_S, self.flush)

    def write_idle(self, name: str, text: str) -> None:
        """Append a line that belongs to no invocation (what a worker printed while it
        started, say); its request id is `-`."""
        self.write(name, "-", text)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        batch, self._batch = self._batch, []
        pending, echo = self._format(batch)
        if batch:
            for tap in self.taps:
                tap(batch)
        limit = self.max_file_bytes
        now = time.monotonic()
        for name, lines in pending.items():
            data = "".join(lines).encode("utf-8", "backslashreplace")
            try:
                self._append(name, data)
            except OSError as exc:
                self._unwritten(name, len(lines), exc)
                continue
            self._written_at[name] = now
            size = self._sizes[name]
            if limit and size > limit:
                self._rotate(name)
        if now >= self._idle_check_at:
            self._close_idle(now)
        if echo:
            try:
                self._stream.write("".join(echo).encode("utf-8", "backslashreplace"))
                self._stream.flush()
            except (BlockingIOError, BrokenPipeError, ValueError):
                pass  # stdout gone or full: the per-function files still have every line

    def _format(self, batch: list[Entry]) -> tuple[dict[str, list[str]], list[str]]:
        """The batch's lines: for each function's file, and for stdout; followers get theirs."""
        pending: dict[str, list[str]] = {}
        echo: list[str] = []
        echo_format = self.echo_format
        followers = self._followers
        for name, stamp, request_id, texts in batch:
            lines = pending.get(name)
            if lines is None:
                lines = pending[name] = []
            first = len(lines)
            head = f"{stamp}\t{request_id}\t"
            for text in texts:
                lines.append(f"{head}{text}\n")
            if echo_format == "text":
                # The request id on every line, as Lambda's runtimes log, so grep finds a whole invocation.
                head = f"{stamp} INFO    [{name}] {request_id} "
                for text in texts:
                    echo.append(f"{head}{text}\n")
            elif echo_format:
                for text in texts:
                    echo.append(orjson.dumps({
                        "time": stamp, "level": "info", "logger": "faasd.function", "message": text,
                        "function": name, "request_id": request_id},
                        option=orjson.OPT_APPEND_NEWLINE).decode())
            if followers and name in followers:
                for queue in followers[name]:
                    for line in lines[first:]:  # this entry's file lines
                        queue.offer(line)
        return pending, echo

    def _append(self, name: str, data: bytes) -> None:
        handle = self._files.get(name)
        if handle is None:
            path = self.path(name)
            try:
                handle = open(path, "ab", buffering=0)
            except FileNotFoundError:  # the directory was removed: made again, as at start
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(path, "ab", buffering=0)
            self._files[name] = handle
            self._sizes[name] = os.fstat(handle.fileno()).st_size
        lost = self._lost.get(name)
        if lost is not None:  # the file could not be written for a while: say so in it
            data = (f"{iso_now()}\t-\t[faasd: {lost[0]} lines could not be written here: "
                    f"{lost[1]}]\n".encode() + data)
            if name in self._cut:  # the last write stopped inside a line
                data = b"\n" + data
        view = memoryview(data)
        try:
            while view:  # a write near a full disk may take only part
                written = handle.write(view)
                self._sizes[name] += written
                view = view[written:]
        except OSError:
            if len(view) < len(data):
                self._cut.add(name)
            raise
        self._cut.discard(name)
        if lost is not None:
            del self._lost[name]
            log.warning("writing the log of %s again; %d lines could not be written to it",
                        name, lost[0])

    def _unwritten(self, name: str, count: int, exc: OSError) -> None:
        """Lines the file did not take (a full disk, say): they still reach stdout and
        followers; the file gets a marker line once it can be written again."""
        previous = self._lost.get(name)
        if previous is None:
            log.warning("cannot write the log of %s (%s): its lines go to stdout only until it can",
                        name, exc.strerror or exc)
        self._lost[name] = ((previous[0] if previous else 0) + count, exc.strerror or str(exc))

    def _close_idle(self, now: float) -> None:
        """Close the files of functions that have not logged for IDLE_CLOSE_S (deleted
        ones, renamed ones, quiet ones): open descriptors follow the functions in use."""
        self._idle_check_at = now + IDLE_CLOSE_S
        for name, written_at in list(self._written_at.items()):
            if now - written_at > IDLE_CLOSE_S:
                del self._written_at[name]
                self._close(name)

    def _close(self, name: str) -> None:
        """Close a function's file, if open; its next line opens it again."""
        handle = self._files.pop(name, None)
        if handle is not None:
            handle.close()
            self._sizes.pop(name, None)

    def _rotate(self, name: str) -> None:
        """NAME.log -> NAME.log.1 -> ... -> NAME.log.<keep_files>; the oldest goes."""
        self._close(name)
        path = self.path(name)
        try:
            for index in range(self.keep_files - 1, 0, -1):
                older = path.with_name(f"{path.name}.{index}")
                if older.exists():
                    os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
            os.replace(path, path.with_name(f"{path.name}.1"))
        except OSError as exc:  # the next flush appends to NAME.log again
            log.warning("cannot rotate %s: %s", path, exc)

    def reopen(self) -> None:
        """Close every file; the next lines open them anew (after an external logrotate)."""
        self.flush()
        for name in list(self._files):
            self._close(name)

    def tail(self, name: str, lines: int = 100) -> list[str]:
        """The last `lines` lines of a function's log, rotated files included
        (read backwards, block by block)."""
        if lines <= 0:
            return []
        self.flush()
        block = 64 * 1024
        path = self.path(name)
        chunks: list[bytes] = []  # newest first
        newlines = 0
        position = 0
        for index in range(self.keep_files + 1):
            try:
                handle = open(path if index == 0 else path.with_name(f"{path.name}.{index}"), "rb")
            except FileNotFoundError:
                if index == 0:
                    continue  # just rotated: NAME.log is not there until the next line
                break
            with handle:
                position = handle.seek(0, os.SEEK_END)
                while position > 0 and newlines <= lines and len(chunks) * block < MAX_TAIL_BYTES:
                    step = min(block, position)
                    position -= step
                    handle.seek(position)
                    chunk = handle.read(step)
                    chunks.append(chunk)
                    newlines += chunk.count(b"\n")
            if position > 0 or newlines > lines or len(chunks) * block >= MAX_TAIL_BYTES:
                break
        data = b"".join(reversed(chunks)).decode("utf-8", "replace")
        # Split at newlines only: a runtime's record may hold \r (Lambda's Node
        # runtime joins the lines of a multi-line message with it).
        found = data.split("\n")
        if found and found[-1] == "":
            found.pop()
        if position > 0 and found:
            found = found[1:]  # the first one may be cut
        return [line + "\n" for line in found[-lines:]]

    def follow(self, name: str, gone: Callable[[], bool] = lambda: False) -> AsyncIterator[str]:
        """New lines of a function's log, from this call on (not from the first read).

        It ends when faasd stops (end_follows) or, checked every
        FOLLOW_CHECK_S while no line comes, once `gone()` says the reader left.
        """
        queue = _FollowQueue()
        self._followers.setdefault(name, set()).add(queue)

        async def lines() -> AsyncIterator[str]:
            try:
                while True:
                    try:
                        line = await asyncio.wait_for(queue.get(), FOLLOW_CHECK_S)
                    except asyncio.TimeoutError:
                        if gone():
                            return
                        continue
                    if line is None:
                        return
                    yield line
            finally:
                self._followers[name].discard(queue)

        return lines()

    def end_follows(self) -> None:
        """End every follow (at shutdown: an open follow would hold it up)."""
        for queues in self._followers.values():
            for queue in queues:
                queue.put_nowait(None)

    def close(self) -> None:
        self.reopen()  # flushed, every file closed


class LogCapture:
    """The lines of one invocation: written through, and kept for LogType=Tail.

    The last KEEP_LINES at least are kept (the tail is the end of the log: the
    error, END, REPORT); past twice that many, the older ones are let go in one
    go and a marker line, first in `lines`, counts them.
    """

    __slots__ = ("logs", "name", "request_id", "lines", "left_out")

    def __init__(self, logs: FunctionLogs, name: str, request_id: str) -> None:
        self.logs = logs
        self.name = name
        self.request_id = request_id
        self.lines: list[str] = []
        self.left_out = 0  # lines no longer in `lines`

    def __call__(self, *texts: str) -> None:
        if not texts:
            return  # a JSON-format function's system level may leave every record out
        self.logs.write(self.name, self.request_id, *texts)
        lines = self.lines
        lines.extend(texts)
        if len(lines) > 2 * KEEP_LINES:
            self._let_go()

    def _let_go(self) -> None:
        """Keep the last KEEP_LINES lines, after a marker that counts the others."""
        lines = self.lines
        cut = len(lines) - KEEP_LINES
        self.left_out += cut - (1 if self.left_out else 0)  # the last marker is no line of the log
        lines[:cut] = [f"[faasd: {self.left_out} earlier lines of this invocation are left out "
                       f"here; the function's log has them]"]

    def opening(self, text: str) -> None:
        """The invocation's first line (START): written with the lines that follow
        it, or alone after FunctionLogs.HOLD_S (see write_held)."""
        self.logs.write_held(self.name, self.request_id, text)
        self.lines.append(text)

    def logged(self, texts: list[str]) -> None:
        """Lines in the function's log already (what the worker printed while it
        started for this invocation, at most 1000): kept for the tail only."""
        self.lines.extend(texts)
