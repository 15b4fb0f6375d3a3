"""A streamed response on its way from a worker to its caller, as the function writes it.

A response streaming function (a Node `awslambda.streamifyResponse` handler, a
custom runtime posting in `Lambda-Runtime-Function-Response-Mode: streaming`)
hands its response over in pieces: CHUNK frames (faasd/protocol.py), or the
chunks of the Runtime API's chunked request body (faasd/runtime_api.py). For a
caller that streams (InvokeWithResponseStream), the worker feeds each piece to a
`ResponseStream` as it comes and the caller reads it from there, so the caller
sees the first bytes while the function still runs. A caller that does not
stream gets the whole response once the function has finished, as before.

Backpressure: a stream holds at most about HIGH_WATER bytes the caller has not
taken. Past it, the worker's side is paused (its control socket is no longer
read, or the Runtime API stops reading the request body), so the kernel's
buffers fill and the function's own writes wait, as they would on Lambda for a
slow client; it resumes once the caller has taken the stream below LOW_WATER.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Awaitable, Callable, TypeVar

# Lambda's limit for a streamed response: "response streaming functions can return
# payloads up to 200 MB, compared to the 6 MB maximum for buffered responses".
MAX_STREAMED_RESPONSE_BYTES = 200 * 1024 * 1024
HIGH_WATER = 1024 * 1024  # bytes the caller has not taken yet, past which the worker waits
LOW_WATER = 256 * 1024  # and below which it goes on

T = TypeVar("T")
R = TypeVar("R")

Throttle = Callable[[bool], None]  # True: stop reading from the worker; False: read again


class ResponseStream:
    """The pieces of one invocation's streamed response, between its worker and its caller."""

    __slots__ = ("limit", "size", "on_start", "_chunks", "_queued", "_closed", "_abandoned", "_paused",
                 "_readable", "_drained", "_throttle")

    def __init__(self, limit: int = MAX_STREAMED_RESPONSE_BYTES,
                 on_start: Callable[[], None] | None = None) -> None:
        self.limit = limit
        # Called at the first piece: the caller starts reading then, so a call whose
        # function does not stream costs no reader (a task) at all.
        self.on_start = on_start
        self.size = 0  # every byte the function streamed, past the limit too
        self._chunks: deque[bytes] = deque()
        self._queued = 0  # bytes in _chunks
        self._closed = False
        self._abandoned = False  # the caller went away: what comes is dropped
        self._paused = False
        self._readable = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._throttle: Throttle | None = None

    @property
    def started(self) -> bool:
        """Whether the function streamed anything (its response is these chunks, not a result)."""
        return self.size > 0

    @property
    def too_large(self) -> bool:
        return self.size > self.limit

    async def carry(self, call: Awaitable[T],
                    reader: Callable[[ResponseStream], Awaitable[R]]) -> tuple[T, asyncio.Task[R] | None]:
        """Await `call`, the invocation that feeds this stream, with `reader` (the caller's
        side) started as a task at the first piece the function streams: a call that
        streams nothing starts none. The stream is closed once `call` has ended or raised.
        `call`'s result, and the reader's task (None: nothing was streamed)."""
        reading: list[asyncio.Task[R]] = []
        self.on_start = lambda: reading.append(asyncio.ensure_future(reader(self)))
        try:
            result = await call
        finally:
            self.close()
        return result, reading[0] if reading else None

    # -- the worker's side -------------------------------------------------------------

    def attach(self, throttle: Throttle | None) -> None:
        """The worker that feeds the stream, and how to pause it (None: it waits on drained())."""
        self._throttle = throttle

    def detach(self) -> None:
        """The invocation is over: never leave its worker paused."""
        throttle, self._throttle = self._throttle, None
        if self._paused and throttle is not None:
            throttle(False)
        self._drained.set()  # nothing of this call waits for room any more

    def feed(self, chunk: bytes) -> None:
        """A piece of the response. Past the limit it is only counted: the invocation fails."""
        if not chunk:
            return
        first = self.size == 0
        self.size += len(chunk)
        if self._abandoned or self.size > self.limit:
            return
        self._chunks.append(chunk)
        self._queued += len(chunk)
        self._readable.set()
        if first and self.on_start is not None:
            self.on_start()
        if self._queued >= HIGH_WATER and not self._paused:
            self._paused = True
            self._drained.clear()
            if self._throttle is not None:
                self._throttle(True)

    async def drained(self) -> None:
        """Wait until the caller has room for more."""
        await self._drained.wait()

    def close(self) -> None:
        """Nothing more comes: read() answers None once the chunks are taken."""
        self._closed = True
        self._readable.set()

    # -- the caller's side -------------------------------------------------------------

    async def read(self) -> bytes | None:
        """The next piece, as the function wrote it; None at the end."""
        while not self._chunks:
            if self._closed:
                return None
            self._readable.clear()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        self._queued -= len(chunk)
        if self._paused and self._queued <= LOW_WATER:
            self._resume()
        return chunk

    def abandon(self) -> None:
        """The caller is gone: drop what is queued and what comes, and let the function run on."""
        self._abandoned = True
        self._chunks.clear()
        self._queued = 0
        if self._paused:
            self._resume()

    def _resume(self) -> None:
        self._paused = False
        self._drained.set()
        if self._throttle is not None:
            self._throttle(False)
