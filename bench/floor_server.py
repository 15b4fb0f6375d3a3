"""The floor under any design that runs handlers in subprocess workers.

aiohttp + uvloop in front, a fixed set of prestarted worker processes behind,
one call per worker at a time, length-prefixed frames over Unix socket pairs,
an asyncio Protocol on the daemon side. Nothing else: no Lambda event, no
logs, limits, timeouts, metrics or response mapping. Against bare aiohttp it
shows what the two extra socket writes, the two wake-ups and the worker's
read and reply cost on this machine, whatever a real daemon adds on top.

    python bench/floor_server.py PORT [WORKERS]
"""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys
from collections import deque

import uvloop
from aiohttp import web

FRAME = struct.Struct("!I")

# The worker: read a frame, answer "ok". Standard library only, as a shim is.
WORKER = r'''
import socket, struct, sys
FRAME = struct.Struct("!I")
sock = socket.socket(fileno=int(sys.argv[1]))
buffer = b""
while True:
    data = sock.recv(65536)
    if not data:
        break
    buffer += data
    while len(buffer) >= 4:
        (size,) = FRAME.unpack_from(buffer)
        if len(buffer) < 4 + size:
            break
        buffer = buffer[4 + size:]
        sock.sendall(FRAME.pack(4) + b'"ok"')
'''


class Channel(asyncio.Protocol):
    """The daemon's end of one worker's socket pair."""

    def __init__(self) -> None:
        self.buffer = b""
        self.reply: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            (size,) = FRAME.unpack_from(self.buffer)
            if len(self.buffer) < 4 + size:
                return
            payload, self.buffer = self.buffer[4:4 + size], self.buffer[4 + size:]
            reply, self.reply = self.reply, None
            if reply is not None:
                reply.set_result(payload)


async def serve(port: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    idle: deque[Channel] = deque()
    waiting: deque[asyncio.Future[Channel]] = deque()
    for _ in range(count):
        ours, theirs = socket.socketpair()
        subprocess.Popen([sys.executable, "-I", "-S", "-c", WORKER, str(theirs.fileno())],
                         pass_fds=[theirs.fileno()])
        theirs.close()
        _, channel = await loop.connect_accepted_socket(Channel, ours)
        idle.append(channel)

    async def invoke(request: web.Request) -> web.Response:
        if idle:
            channel = idle.pop()
        else:
            turn: asyncio.Future[Channel] = loop.create_future()
            waiting.append(turn)
            channel = await turn
        event = b'{"rawPath":"' + request.raw_path.encode() + b'"}'
        channel.reply = reply = loop.create_future()
        assert channel.transport is not None
        channel.transport.write(FRAME.pack(len(event)) + event)
        payload = await reply
        if waiting:
            waiting.popleft().set_result(channel)
        else:
            idle.append(channel)
        return web.Response(body=payload, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/function/{name}", invoke)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 16))
