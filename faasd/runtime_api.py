"""The Lambda Runtime API, and the worker of a `provided` function that is served by it.

A function with `runtime = "provided"` is an executable `bootstrap` that
fetches events and posts results over HTTP, as on AWS, so that the runtime
interface clients AWS and others ship (for Python, Node, Java, Go, Rust, a
shell script with curl) work unmodified. Each `ProvidedWorker` gets a
`RuntimeApi` of its own: an HTTP server on a loopback port, named to the
bootstrap in `AWS_LAMBDA_RUNTIME_API` (`127.0.0.1:PORT`):

    GET  /2018-06-01/runtime/invocation/next         the next event; blocks until there is one.
         Headers: Lambda-Runtime-Aws-Request-Id, Lambda-Runtime-Deadline-Ms
         (epoch ms), Lambda-Runtime-Invoked-Function-Arn, Lambda-Runtime-Trace-Id
         (the caller's X-Amzn-Trace-Id, else a new one), and
         Lambda-Runtime-Client-Context when the caller sent a ClientContext.
    POST /2018-06-01/runtime/invocation/ID/response  the result (up to 6 MB)   -> 202
         (or streamed: Lambda-Runtime-Function-Response-Mode: streaming, chunked,
         each chunk passed on as it comes to a caller that streams, up to 200 MB,
         and an error that ends the stream in the trailers Lambda-Runtime-Function-
         Error-Type and -Error-Body, base64: the invocation fails with it, after
         the chunks)
    POST /2018-06-01/runtime/invocation/ID/error     the error document               -> 202
    POST /2018-06-01/runtime/init/error              the same, before the first /next -> 202

As on Lambda, the caller gets a posted error document unchanged (AWS's
clients post `{"errorMessage", "errorType", "stackTrace"}`, Node's with
`trace`, some with more keys), and the Lambda-Runtime-Function-Error-Type
header types one that does not name its `errorType`.

Refusals are RAPID's: 400 `InvalidRequestID` (a reply for a request that
is not in flight), 403 `InvalidStateTransition` (a reply before the first
/next, a second reply for the invocation just answered, init/error after
init, or /next before the event in flight is answered), 413
`RequestEntityTooLarge` (a response over 6 MB: the invocation fails with
`Function.ResponseSizeTooLarge`), 404 for any other path.

The API is an adapter onto the frames of faasd/protocol.py: the first /next
is READY, an INVOKE frame becomes the /next response, the posts become
RESULT, ERROR and INIT_ERROR. So `ProvidedWorker` is a `ProcessWorker` and
gets what every runtime gets from it: its own process group, freeze and thaw,
the timeout (a bootstrap that hangs is killed: `Sandbox.Timedout`), the memory
limit, the tmp dir, output captured into the invocation's log, and the init
timeout (a bootstrap that never polls: `Sandbox.Timedout`; one that exits:
`Runtime.ExitError`). A worker whose bootstrap failed is replaced.

Trust: the port listens on loopback only and lives as long as its worker.
Loopback is shared by every process of the machine -- other users', and
the workers of other functions, which run as the same `run_as` user -- so
each connection is checked when it is accepted: the kernel names the user
and the inode of the connecting socket (one sock_diag netlink lookup, or
/proc/net/tcp where netlink is not allowed), and the socket must be held
by one of the worker's own processes (its cgroup's members, or the
bootstrap and its descendants; found in /proc/PID/fd). Anything else gets
403 `AccessDenied` and the connection is closed before a byte of it is
read. Where the daemon may not look into a worker's /proc/PID/fd, only the
user is checked, and the log says so once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import logging
import os
import re
import signal
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import orjson
from aiohttp import web

from . import protocol
from .errors import HANDLED, INIT, FunctionError
from .spec import FunctionSpec, new_trace_id
from .sandbox import read_pids
from .workers import ProcessWorker, WorkerEnvironment, WorkerInitError

log = logging.getLogger("faasd.runtime_api")

API_VERSION = "2018-06-01"
NEXT_PATH = f"/{API_VERSION}/runtime/invocation/next"
INIT_ERROR_PATH = f"/{API_VERSION}/runtime/init/error"
REPLY_RE = re.compile(rf"^/{API_VERSION}/runtime/invocation/([^/]+)/(response|error)$")
ERROR_TYPE_HEADER = "Lambda-Runtime-Function-Error-Type"
# A streamed response (Lambda-Runtime-Function-Response-Mode: streaming) is chunked, and
# an error that ends it comes in trailers: its type, and its document in base64.
RESPONSE_MODE_HEADER = "Lambda-Runtime-Function-Response-Mode"
ERROR_BODY_TRAILER = "Lambda-Runtime-Function-Error-Body"


@dataclass(frozen=True, slots=True)
class _Event:
    request_id: str
    deadline_ms: int
    arn: str
    body: bytes
    client_context: str | None  # JSON text, for Lambda-Runtime-Client-Context
    trace: str | None  # Lambda-Runtime-Trace-Id, when the call came with one


def _refusal(status: int, error_type: str, message: str) -> web.Response:
    return web.Response(status=status, content_type="application/json",
                        body=orjson.dumps({"errorMessage": message, "errorType": error_type}))


_ACCEPTED = orjson.dumps({"status": "OK"})


def _posted_error(kind: str, body: bytes, header_type: str | None) -> FunctionError:
    """The error a runtime posted: its body is the document the caller gets."""
    error_type = header_type or "Unhandled"
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if isinstance(document, dict):
        return FunctionError.from_payload(kind, document, error_type)
    return FunctionError(kind, error_type, body[:4096].decode("utf-8", "replace"), document=body)


def _stream_error(request: web.BaseRequest) -> FunctionError | None:
    """The error a streamed response ended with, in its trailers; None if it ended well."""
    if request.headers.get(RESPONSE_MODE_HEADER, "").lower() != "streaming":
        return None
    gate = request.transport.get_protocol() if request.transport is not None else None
    trailers = gate.trailers.last if isinstance(gate, _Gate) else {}
    error_type = trailers.get(ERROR_TYPE_HEADER.lower())
    if not error_type:
        return None
    try:
        document = base64.b64decode(trailers.get(ERROR_BODY_TRAILER.lower(), ""))
    except (binascii.Error, ValueError):
        document = b""
    return _posted_error(HANDLED, document, error_type)


async def _read_body(request: web.BaseRequest, limit: int) -> tuple[bytes, bool]:
    """The request body, and whether it was over `limit` (then cut, not read to the end)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return b"", True  # aiohttp closes the connection on the unread rest
        parts.append(chunk)
    return b"".join(parts), False


PROC_NET_TCP = "/proc/net/tcp"

# sock_diag (linux/sock_diag.h, linux/inet_diag.h): ask the kernel about one TCP socket.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_LOOPBACK = socket.inet_aton("127.0.0.1") + bytes(12)  # an IPv4 address in a 16-byte field
# In an inet_diag_msg: family, state, timer, retransmits (4 bytes), the socket id
# (48), expires, read and write queues (12), then the uid.
_UID_OFFSET = _NLMSG_HEADER.size + 4 + 48 + 12


class Owner(NamedTuple):
    """Who a socket belongs to: its user, and its inode (what /proc/PID/fd links name)."""

    uid: int
    inode: int


def loopback_peer(listen_port: int, peer_port: int) -> Owner | None:
    """The owner of the socket 127.0.0.1:peer_port connected to 127.0.0.1:listen_port;
    None if there is no such connection. Raises OSError if the kernel cannot be asked."""
    try:
        return _diag_owner(listen_port, peer_port)
    except OSError:
        return proc_net_tcp_owner(listen_port, peer_port)


def _diag_owner(listen_port: int, peer_port: int) -> Owner | None:
    """One exact lookup over netlink: constant time, however many sockets the host has."""
    request = (struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
               + struct.pack("!HH", peer_port, listen_port) + _LOOPBACK + _LOOPBACK
               + struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    message = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY,
                                 NLM_F_REQUEST, 1, 0) + request
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as channel:
        channel.send(message)
        reply = channel.recv(8192)
    _, kind = struct.unpack_from("=IH", reply)
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, _NLMSG_HEADER.size)
        if code == -errno.ENOENT:
            return None
        raise OSError(-code, os.strerror(-code))
    return Owner(*struct.unpack_from("=II", reply, _UID_OFFSET))


def proc_net_tcp_owner(listen_port: int, peer_port: int, table: str = PROC_NET_TCP) -> Owner | None:
    """The same from the kernel's socket table, read line by line."""
    # Addresses are hex in host (little-endian) byte order, ports in network order.
    local = f"0100007F:{peer_port:04X}"
    remote = f"0100007F:{listen_port:04X}"
    with open(table) as lines:
        next(lines, None)  # the column titles
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[1] == local and fields[2] == remote:
                return Owner(int(fields[7]), int(fields[9]))
    return None


def descendants(pid: int) -> set[int]:
    """The processes under `pid` (from /proc/PID/task/TID/children), not `pid` itself."""
    found: set[int] = set()
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as handle:
                    children = [int(child) for child in handle.read().split()]
            except (OSError, ValueError):
                continue
            for child in children:
                if child not in found:
                    found.add(child)
                    stack.append(child)
    return found


def holds_socket(pid: int, inode: int) -> bool:
    """Whether process `pid` has the socket `inode` open. Raises PermissionError where
    its descriptors may not be read; a process that is gone holds nothing."""
    target = f"socket:[{inode}]"
    directory = f"/proc/{pid}/fd"
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, ProcessLookupError):
        return False
    for name in names:
        try:
            if os.readlink(f"{directory}/{name}") == target:
                return True
        except (FileNotFoundError, ProcessLookupError):
            continue
    return False


def process_uid(pid: int) -> int | None:
    """A process's effective uid (from /proc/PID/status: its directory's owner
    turns to root when a process that changed users is not dumpable)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Uid:"):
                    return int(line.split()[2])
    except OSError:
        return None
    return None


_DENIED_BODY = orjson.dumps({"errorType": "AccessDenied", "errorMessage":
                             "this Runtime API serves only its own worker's processes"})
DENIED_RESPONSE = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(_DENIED_BODY)).encode() +
                   b"\r\nConnection: close\r\n\r\n" + _DENIED_BODY)


class _Trailers:
    """Follows the requests of one connection as their bytes arrive, for the trailers of a
    chunked body, which aiohttp reads and drops. It only looks: where it cannot follow the
    stream, it stops, and the bodies it missed have no trailers."""

    def __init__(self) -> None:
        self.last: dict[str, str] = {}  # of the last chunked body, names in lower case
        self._buffer = b""
        self._state = "head"  # head | body | size | data | trailers | lost
        self._left = 0  # bytes of a body or a chunk still to come

    def feed(self, data: bytes) -> None:
        if self._state == "lost":
            return
        self._buffer += data
        try:
            while self._step():
                pass
        except (ValueError, UnicodeDecodeError):
            self._state, self._buffer = "lost", b""

    def _step(self) -> bool:
        """Take one step through the buffer; False when it needs more bytes."""
        if self._state in ("body", "data"):
            taken = min(self._left, len(self._buffer))
            self._buffer, self._left = self._buffer[taken:], self._left - taken
            if self._left:
                return False
            self._state = "head" if self._state == "body" else "size"
            return True
        if self._state == "head":
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > 64 * 1024:
                    raise ValueError("no end to a request's head")
                return False
            head, self._buffer = self._buffer[:end].decode("latin-1"), self._buffer[end + 4:]
            fields = dict(_field(line) for line in head.split("\r\n")[1:])
            if "chunked" in fields.get("transfer-encoding", "").lower():
                self._state, self.last = "size", {}
            else:
                self._state, self._left = "body", int(fields.get("content-length") or 0)
            return True
        end = self._buffer.find(b"\r\n")
        if end < 0:
            return False
        line, self._buffer = self._buffer[:end].decode("latin-1"), self._buffer[end + 2:]
        if self._state == "size":
            size = int(line.split(";", 1)[0], 16)
            self._state, self._left = ("trailers", 0) if size == 0 else ("data", size + 2)
        elif line:
            name, value = _field(line)
            self.last[name] = value
        else:
            self._state = "head"
        return True


def _field(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip().lower(), value.strip()


class _Gate(asyncio.Protocol):
    """One accepted connection: handed to aiohttp only if its owner may use the API."""

    def __init__(self, api: "RuntimeApi") -> None:
        self.api = api
        self.inner: asyncio.Protocol | None = None
        self.trailers = _Trailers()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.api.admits(transport):
            transport.write(DENIED_RESPONSE)  # type: ignore[attr-defined]
            transport.close()
            return
        assert self.api._server is not None
        self.inner = self.api._server()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.trailers.feed(data)
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


class RuntimeApi:
    """The Runtime API of one worker: its own loopback port, one event at a time."""

    _unchecked_warned = False  # the socket table could not be read: said once per daemon
    _unowned_warned = False  # a worker's /proc/PID/fd could not be read: said once per daemon

    def __init__(self, worker: ProvidedWorker) -> None:
        self.worker = worker
        self.address = ""  # host:port, once started
        self.polled = False  # the bootstrap asked for work: init is over
        self._server: web.Server | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._queued: _Event | None = None  # given by the daemon, not yet fetched
        self._current: str | None = None  # fetched by the bootstrap, not yet answered
        self._answered: str | None = None  # answered, and no /next has fetched another since
        # A /next waiting for an event; its result says whether one came (False: superseded).
        self._waiter: asyncio.Future[bool] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # handler_cancellation: a /next whose bootstrap went away stops waiting.
        self._server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        self._listener = await loop.create_server(lambda: _Gate(self), "127.0.0.1", 0,
                                                  family=socket.AF_INET)
        port = self._listener.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"

    def admits(self, transport: asyncio.BaseTransport) -> bool:
        """Whether the connecting socket is held by one of the worker's own processes."""
        pid = self.worker.pid
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        if pid is None or not peer or not sock:
            log.warning("Runtime API of worker %s: refused a connection before the worker started",
                        self.worker.id)
            return False
        worker_uid = process_uid(pid)
        if worker_uid is None:
            return False  # the worker is gone
        try:
            owner = loopback_peer(sock[1], peer[1])
        except OSError as exc:
            if not RuntimeApi._unchecked_warned:
                RuntimeApi._unchecked_warned = True
                log.warning("cannot tell who connects to a Runtime API (%s): any local process "
                            "can reach the APIs of provided workers", exc)
            return True
        if owner is None or owner.uid != worker_uid:
            log.warning("Runtime API of worker %s: refused a connection from uid %s (the worker runs "
                        "as uid %d)", self.worker.id, "unknown" if owner is None else owner.uid,
                        worker_uid)
            return False
        try:
            if any(holds_socket(member, owner.inode) for member in self._members(pid)):
                return True
        except PermissionError as exc:
            if not RuntimeApi._unowned_warned:
                RuntimeApi._unowned_warned = True
                log.warning("cannot read a worker's open files (%s): a Runtime API admits any "
                            "process of its worker's user, other functions' workers included", exc)
            return True
        log.warning("Runtime API of worker %s: refused a connection from a process of uid %d that "
                    "is not the worker's", self.worker.id, owner.uid)
        return False

    def _members(self, pid: int) -> list[int]:
        """The worker's processes, the bootstrap first: its cgroup's members where it has a
        cgroup (processes that left its process tree included), else its process tree."""
        members = [pid]
        worker = self.worker
        if worker.cgroup is not None:
            members += worker.cgroup.pids()
        elif worker.sandbox is not None and worker.sandbox.pids_dir is not None:
            members += read_pids(worker.sandbox.pids_dir)
        else:
            members += sorted(descendants(pid))
        return list(dict.fromkeys(members))

    async def close(self) -> None:
        self._wake(False)
        if self._listener is not None:
            self._listener.close()
        if self._server is not None:
            await self._server.shutdown(0.5)
        self._listener = self._server = None

    def deliver(self, payload: bytes) -> bool:
        """Take an INVOKE frame's payload: the next /next gets it."""
        head, _, body = payload.partition(b"\n")
        header = orjson.loads(head)
        context = header.get("client_context")
        self._queued = _Event(header["id"], int(header["deadline_ms"]), header.get("arn", ""), body,
                              None if context is None else orjson.dumps(context).decode(),
                              header.get("trace"))
        self._wake(True)
        return self._listener is not None

    def _wake(self, event_came: bool) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(event_came)
        self._waiter = None

    # -- HTTP ----------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path == NEXT_PATH:
            if request.method != "GET":
                return _refusal(405, "MethodNotAllowed", f"{path} takes GET")
            return await self._next(request)
        match = REPLY_RE.match(path)
        if match is not None:
            if request.method != "POST":
                return _refusal(405, "MethodNotAllowed", f"{path} takes POST")
            if match.group(2) == "response":
                return await self._response(request, match.group(1))
            return await self._error(request, match.group(1))
        if path == INIT_ERROR_PATH:
            if request.method != "POST":
                return _refusal(405, "MethodNotAllowed", f"{path} takes POST")
            return await self._init_error(request)
        return _refusal(404, "NotFound", f"no such Runtime API path: {path} (the API is /{API_VERSION}/runtime/...)")

    async def _next(self, request: web.BaseRequest) -> web.StreamResponse:
        if self._current is not None:
            return self._refuse_state(f"invocation {self._current} is in flight: post its response "
                                      "or error before asking for the next one")
        if not self.polled:
            self.polled = True
            self.worker.runtime_ready()
        while self._queued is None:
            # One poll waits at a time; a newer one replaces an abandoned one.
            self._wake(False)
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            if not await waiter:
                return _refusal(409, "Superseded", "another request for the next invocation replaced this one")
        transport = request.transport
        if transport is None or transport.is_closing():
            # The bootstrap went away: the event waits for its next poll.
            return _refusal(503, "Unavailable", "the connection closed before the event was sent")
        event, self._queued = self._queued, None
        self._current, self._answered = event.request_id, None
        headers = {
            "Lambda-Runtime-Aws-Request-Id": event.request_id,
            "Lambda-Runtime-Deadline-Ms": str(event.deadline_ms),
            "Lambda-Runtime-Invoked-Function-Arn": event.arn,
            "Lambda-Runtime-Trace-Id": event.trace or new_trace_id(),
        }
        if event.client_context is not None:
            headers["Lambda-Runtime-Client-Context"] = event.client_context
        return web.Response(body=event.body, content_type="application/json", headers=headers)

    def _out_of_turn(self, request_id: str) -> web.Response:
        """The refusal of a reply for `request_id`, which is not the invocation in flight."""
        if not self.polled:
            return self._refuse_state(f"a reply for request ID {request_id} before the runtime asked "
                                      "for its first invocation")
        if request_id == self._answered:
            return self._refuse_state(f"invocation {request_id} has been answered already")
        if self._current is None:
            message = f"request ID {request_id} is not in flight: no invocation is"
        else:
            message = f"request ID {request_id} is not in flight; {self._current} is"
        log.warning("worker %s: Runtime API refused a reply: %s", self.worker.id, message)
        return _refusal(400, "InvalidRequestID", message)

    def _refuse_state(self, message: str) -> web.Response:
        log.warning("worker %s: Runtime API refused a call: %s", self.worker.id, message)
        return _refusal(403, "InvalidStateTransition", message)

    async def _response(self, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        if request_id != self._current:
            return self._out_of_turn(request_id)
        if request.headers.get(RESPONSE_MODE_HEADER, "").lower() == "streaming":
            return await self._streamed_response(request, request_id)
        body, too_large = await _read_body(request, protocol.MAX_RESPONSE_BYTES)
        if request_id != self._current:  # timed out while the body arrived
            return self._out_of_turn(request_id)
        self._current, self._answered = None, request_id
        if too_large:
            # The runtime is usually in no state to go on (clients raise on
            # a 413), so this worker is replaced, as the error is reported.
            self.worker.runtime_error(FunctionError(
                HANDLED, "Function.ResponseSizeTooLarge", protocol.RESPONSE_TOO_LARGE), fatal=True)
            return _refusal(413, "RequestEntityTooLarge",
                            f"Exceeded maximum allowed payload size ({protocol.MAX_RESPONSE_BYTES} bytes).")
        self.worker.runtime_result(body)
        return web.Response(status=202, body=_ACCEPTED, content_type="application/json")

    async def _streamed_response(self, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        """A response posted as it is written (chunked): each piece goes on to the call as it
        comes, so a caller that streams reads it while the function runs; the body is read no
        faster than that caller takes it. Its limit is the caller's: 6 MB for one that does
        not stream, 200 MB for one that does."""
        worker = self.worker
        limit = worker.response_limit()
        size = 0
        async for data in request.content.iter_any():
            if request_id != self._current:  # timed out while the body arrived
                return self._out_of_turn(request_id)
            size += len(data)
            if size > limit:
                self._current, self._answered = None, request_id
                worker.runtime_error(FunctionError(
                    HANDLED, "Function.ResponseSizeTooLarge", protocol.response_too_large(limit)), fatal=True)
                return _refusal(413, "RequestEntityTooLarge", f"Exceeded maximum allowed payload size ({limit} bytes).")
            worker.runtime_chunk(data)
            await worker.chunk_room()
        if request_id != self._current:
            return self._out_of_turn(request_id)
        self._current, self._answered = None, request_id
        error = _stream_error(request)
        if error is not None:
            worker.runtime_error(error)
        else:
            worker.runtime_result(b"")
        return web.Response(status=202, body=_ACCEPTED, content_type="application/json")

    async def _error(self, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        if request_id != self._current:
            return self._out_of_turn(request_id)
        body, _ = await _read_body(request, protocol.MAX_RESPONSE_BYTES)
        if request_id != self._current:
            return self._out_of_turn(request_id)
        self._current, self._answered = None, request_id
        self.worker.runtime_error(_posted_error(HANDLED, body, request.headers.get(ERROR_TYPE_HEADER)))
        return web.Response(status=202, body=_ACCEPTED, content_type="application/json")

    async def _init_error(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.polled:
            return self._refuse_state("init/error after the runtime asked for its first invocation; "
                                      "post to /invocation/ID/error instead")
        body, _ = await _read_body(request, protocol.MAX_RESPONSE_BYTES)
        self.worker.runtime_init_error(_posted_error(INIT, body, request.headers.get(ERROR_TYPE_HEADER)))
        return web.Response(status=202, body=_ACCEPTED, content_type="application/json")


def check_bootstrap(path: Path) -> str | None:
    """Why the kernel would refuse to run `path`, in words a user can act on; None if it can run."""
    try:
        with open(path, "rb") as file:
            head = file.read(256)
    except OSError as exc:
        return f"cannot read {path.name}: {exc.strerror}"
    if not os.access(path, os.X_OK):
        return f"{path.name} is not executable (chmod +x {path.name})"
    if head.startswith(b"\x7fELF"):
        return None
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].split()
        if not words:
            return f"{path.name}: its #! line names no interpreter"
        interpreter = words[0].decode(errors="replace")
        if not os.access(interpreter, os.X_OK):
            return f"{path.name}: its interpreter {interpreter} does not exist or cannot be run"
        return None
    return (f"fork/exec {path.name}: exec format error: it is neither an executable binary "
            "nor a script starting with a #! line")


class ProvidedWorker(ProcessWorker):
    """A worker running the function's `bootstrap`, served by its own `RuntimeApi`."""

    init_hint = f"the bootstrap never asked for an event (GET {NEXT_PATH})"

    def __init__(self, spec: FunctionSpec, env: WorkerEnvironment) -> None:
        self.bootstrap = spec.task_root / "bootstrap"
        super().__init__(spec, env, [str(self.bootstrap)])
        self.api = RuntimeApi(self)

    def environment(self) -> dict[str, str]:
        # No faasd-internal variables: every process of the bootstrap sees this.
        env = self.base_environment()
        env["AWS_LAMBDA_RUNTIME_API"] = self.api.address
        return env

    def to_json(self) -> dict:
        view = super().to_json()
        view["runtime_api"] = self.api.address or None
        return view

    async def start(self) -> None:
        problem = check_bootstrap(self.bootstrap)
        if problem is not None:
            self._log_init_start()
            raise WorkerInitError(FunctionError(INIT, "Runtime.InvalidEntrypoint", problem), 0.0,
                                  list(self.init_logs))
        await super().start()

    async def _open_control(self) -> None:
        await self.api.start()
        return None  # the bootstrap inherits no socket: it finds the API by address

    def _send(self, kind: int, payload: bytes = b"") -> bool:
        if kind == protocol.INVOKE:
            return self.api.deliver(payload)
        if kind == protocol.SHUTDOWN:
            # A bootstrap has no shutdown call: SIGTERM lets it clean up, as
            # Lambda does before the sandbox goes; SIGKILL follows the grace.
            self._killpg(signal.SIGTERM)
            return True
        return False

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            await self.api.close()

    # -- from the RuntimeApi -----------------------------------------------------------

    def runtime_ready(self) -> None:
        self._on_frame(protocol.READY, b"")

    def runtime_result(self, payload: bytes) -> None:
        self._drain_output()
        self._on_frame(protocol.RESULT, payload)

    def runtime_chunk(self, data: bytes) -> None:
        self._on_chunk(data)

    def runtime_error(self, error: FunctionError, fatal: bool = False) -> None:
        self._drain_output()
        self._fail_call(error, fatal)

    def runtime_init_error(self, error: FunctionError) -> None:
        self._drain_output()
        self._fail_init(error)

    def _on_output(self, line: str) -> None:
        # AWS's runtime clients join the lines of one log record with \r
        # (CloudWatch keeps a record whole); a faasd log is plain lines.
        if "\r" not in line:
            super()._on_output(line)
            return
        for part in line.rstrip("\r").split("\r"):
            super()._on_output(part)

