"""Function logs: one file per function, a copy on the daemon's stdout, and followers.

Lines are the ones Lambda writes to CloudWatch (START, what the handler
printed, END, REPORT). In `<data>/logs/NAME.log` each line is stored as
`<ISO time>\\t<request id>\\t<text>`; on stdout it goes through the
`faasd.function` logger with the function and request id attached, so the
daemon's log formatter (text or JSON) carries them. Writes are buffered and
flushed once per event-loop turn: a burst of invocations costs one write per
file, not one per line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import AsyncIterator, TextIO

log = logging.getLogger("faasd.function")

MAX_LINE = 16 * 1024  # longer lines are cut, with a marker


def iso_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class FunctionLogs:
    def __init__(self, directory: Path, *, echo: bool = True) -> None:
        self.directory = directory
        self.echo = echo
        self._files: dict[str, TextIO] = {}
        self._pending: dict[str, list[str]] = {}
        self._followers: dict[str, set[asyncio.Queue]] = {}
        self._flush_scheduled = False
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.log"

    def write(self, name: str, request_id: str, text: str) -> None:
        if len(text) > MAX_LINE:
            text = text[:MAX_LINE] + f" [faasd: line truncated, {len(text) - MAX_LINE} more characters]"
        if self.echo:
            log.info(text, extra={"function": name, "request_id": request_id})
        line = f"{iso_now()}\t{request_id}\t{text}\n"
        self._pending.setdefault(name, []).append(line)
        followers = self._followers.get(name)
        if followers:
            for queue in followers:
                if queue.qsize() < 10000:
                    queue.put_nowait(line)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for name, lines in pending.items():
            handle = self._files.get(name)
            if handle is None:
                handle = self._files[name] = open(self.path(name), "a", encoding="utf-8")
            handle.write("".join(lines))
            handle.flush()

    def tail(self, name: str, lines: int = 100) -> list[str]:
        if lines <= 0:
            return []
        self.flush()
        try:
            with open(self.path(name), "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - 256 * 1024))
                data = handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        return [line + "\n" for line in data.splitlines()[-lines:]]

    def follow(self, name: str) -> AsyncIterator[str]:
        """New lines of a function's log, from this call on (not from the first read)."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._followers.setdefault(name, set()).add(queue)

        async def lines() -> AsyncIterator[str]:
            try:
                while True:
                    yield await queue.get()
            finally:
                self._followers[name].discard(queue)

        return lines()

    def close(self) -> None:
        self.flush()
        for handle in self._files.values():
            handle.close()
        self._files.clear()


class LogCapture:
    """The lines of one invocation: written through, with a bounded tail kept."""

    __slots__ = ("logs", "name", "request_id", "tail", "_tail_bytes", "limit")

    def __init__(self, logs: FunctionLogs, name: str, request_id: str, limit: int = 4096) -> None:
        self.logs = logs
        self.name = name
        self.request_id = request_id
        self.tail: deque[str] = deque()
        self._tail_bytes = 0
        self.limit = limit

    def __call__(self, text: str) -> None:
        self.logs.write(self.name, self.request_id, text)
        self.tail.append(text)
        self._tail_bytes += len(text) + 1
        while self._tail_bytes > self.limit and len(self.tail) > 1:
            self._tail_bytes -= len(self.tail.popleft()) + 1

    def tail_text(self) -> str:
        """The last `limit` bytes of the invocation's log, as Lambda's LogType=Tail gives."""
        text = "".join(line + "\n" for line in self.tail).encode()
        return text[-self.limit:].decode("utf-8", "ignore")
