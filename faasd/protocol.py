"""The daemon <-> worker wire protocol. Standard library only: workers import it.

Each worker inherits one end of a Unix stream socket pair; its descriptor
number is in the environment variable `_FAASD_CONTROL_FD` (which the shim
removes before user code runs). Both directions carry frames:

    +----------------+-----------+---------------------+
    | length: uint32 | kind: u8  | payload: length B   |
    | big-endian     |           |                     |
    +----------------+-----------+---------------------+

`length` counts the payload only. Payloads are UTF-8 JSON unless noted.

daemon -> worker
    INVOKE    header JSON, one b"\\n", then the event's JSON bytes untouched
              (so the daemon never re-encodes an event it already holds as
              bytes). Header: {"id": request id, "deadline_ms": epoch ms,
              "arn": invoked function ARN}, "client_context" (the caller's
              ClientContext object) when the call has one, and "trace" (the
              X-Ray trace header, `_X_AMZN_TRACE_ID`) when the daemon has
              one for it; without it the runtime makes a new one.
    SHUTDOWN  empty; the worker exits 0.
    WAKE      empty; a call for this worker is probably on its way (an HTTP
              request for its function is being read). The worker reads it
              and waits on: the point is that its core is awake by the time
              the INVOKE comes. Any frame a worker does not know it ignores.

worker -> daemon
    READY       {"init_ms": float} once the handler is imported.
    INIT_ERROR  the error document, as ERROR's; the worker exits.
    LOG         raw text: whole lines the handler printed during this
                invocation, sent as they are written so that a killed worker
                still leaves its output behind. Text after the last newline
                (a flush() in the middle of a line) is the start of a line
                the next LOG frame goes on with; the daemon ends it when the
                invocation or the init ends.
    STATS       optional, just before RESULT or ERROR: uint32 big-endian, the
                worker's peak resident memory in KiB (so the daemon need not
                read /proc or the cgroup on every call for `Max Memory Used`).
    CHUNK       raw bytes: the next piece of a streamed response (a Node
                `awslambda.streamifyResponse` handler's stream), sent as the
                handler writes it, before the RESULT or ERROR that ends the
                invocation. The response is the chunks in order (then the
                RESULT's bytes, normally none); an ERROR after chunks fails
                the invocation once its caller has had them, as on Lambda.
                The daemon stops reading the socket while a slow caller has
                not taken what came (faasd/streaming.py): a worker's writes
                then wait, and should wait, for the socket to drain.
    RESULT      the handler's return value as JSON bytes. Ends an invocation.
    ERROR       the error document the caller gets, in the runtime's Lambda
                shape: {"errorType", "errorMessage", "stackTrace"} (Python),
                {"errorType", "errorMessage", "trace"} (Node). Ends an
                invocation. With "fatal": true (removed from the document) the
                runtime exits after it (an uncaught exception), so the daemon
                does not reuse the worker.

Templates (faasd/zygote.py): a worker started with `_FAASD_TEMPLATE=1`
imports the handler, says READY, and then serves only these. Its READY
carries {"unsafe": why} when its init left what a fork cannot share or lacks
(threads, sockets, pipes, files in /tmp): it then forks nothing and waits
for SHUTDOWN.

daemon -> template
    FORK      {"count": n}: fork n spares.
template -> daemon
    SPARE     {"pid"}, carrying three descriptors as SCM_RIGHTS ancillary
              data: the spare's control socket, its output pipe and a pidfd
              for it. A spare is a forked child, isolated and waiting for its
              START; the daemon holds it until a call needs a worker. On
              failure {"error"} and no descriptors.
    EXITED    {"pid", "returncode"} (negative: the signal) when a forked worker
              ends: the template is its parent and reaps it.
daemon -> spare
    JOIN      {"groups": [names]}, carrying as SCM_RIGHTS one descriptor per
              group: its cgroup v1 `tasks` file, opened by the daemon. Always
              the spare's first frame. The spare writes "0" to each and closes
              it, which moves it (one thread) into its own memory cgroup and
              pids group without the kernel's global lock (sandbox.py,
              self_join_file); the daemon moves it into cgroup v2 groups
              itself. A spare that cannot join exits.
    START     {"id": worker id, "env": {NAME: value}}: become this worker;
              it answers READY and then serves INVOKE like any worker.

One invocation is in flight per worker at a time: the daemon sends INVOKE
only after the previous RESULT or ERROR, so replies need no ids. Anything a
worker writes to its file descriptors 1 and 2 (C extensions, subprocesses)
goes to a separate pipe and is attributed to the invocation in flight.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("!IB")
HEADER_SIZE = HEADER.size
MAX_FRAME = 64 * 1024 * 1024  # larger than any payload Lambda accepts
# Lambda's synchronous response limit ("6 MB": 100 bytes over 6 MiB, as its error
# says), and its error's message; every runtime refuses a larger result itself
# (node_worker.js has its own copy), and the daemon makes sure. A streamed response
# (CHUNK frames) is the daemon's to count: its limit is its caller's (faasd/streaming.py).
MAX_RESPONSE_BYTES = 6291556


def response_too_large(limit: int) -> str:
    """Lambda's Function.ResponseSizeTooLarge message, for a response over `limit` bytes."""
    return f"Response payload size exceeded maximum allowed payload size ({limit} bytes)."


RESPONSE_TOO_LARGE = response_too_large(MAX_RESPONSE_BYTES)


def syntax_error_frame(filename: str | None, lineno: int | None, text: str | None) -> str:
    """The one frame of the stack trace awslambdaric gives a handler module that does
    not parse (Runtime.UserCodeSyntaxError), from the SyntaxError's fields: the daemon,
    which finds most such errors before any worker starts, and the Python runtime
    report it alike."""
    return '  File "%s" Line %s\n    %s' % (filename, lineno, text)


def error_log_record(error_type: str, message: str, stack_trace: list[str]) -> str:
    """awslambdaric's Text log of an error it reports (bootstrap.log_error), from the
    error document's fields: "[ERROR] Type: message", "Traceback (most recent call
    last):" (even with no frame) and each line of each frame, its indent in no-break
    spaces, as one record. Its lines are joined with \r, as awslambdaric's sink
    outside Lambda joins them; so is a newline of the message, which would otherwise
    cut the record in two in a log of lines (on Lambda it is one record whole)."""
    head = "[ERROR]"
    if error_type:
        head += " " + error_type
    if message:
        head += (":" if error_type else "") + " " + message
    lines = [head, "Traceback (most recent call last):"]
    for frame in stack_trace:
        lines += [_no_break_indent(line) for line in frame.splitlines()] if frame else [""]
    return "\r".join(lines).replace("\n", "\r")


def _no_break_indent(line: str) -> str:
    text = line.lstrip(" ")
    return "\u00a0" * (len(line) - len(text)) + text


def ensure_ascii(version: tuple[int, ...]) -> bool:
    """Whether awslambdaric on Python `version` writes the non-ASCII characters of a
    result, an error document or log_error's JSON record as \\uXXXX escapes: on
    python3.11 and before. Its lambda_runtime_marshaller.Encoder sets ensure_ascii=False
    for AWS_Lambda_python3.12 and later only."""
    return tuple(version[:2]) < (3, 12)


def error_log_json(error: dict, timestamp: str, ascii_only: bool) -> str:
    """awslambdaric's JSON log of an error it reports (bootstrap.log_error in JSON logs):
    the error document after "timestamp" and "level": "ERROR", as its to_json writes it,
    with json's default separators (", " and ": "), `ascii_only` as ensure_ascii() says.
    The Python runtime writes a handler's error with it, the daemon an init's."""
    import json  # loaded already wherever an error is logged; not at the worker's start

    return json.JSONEncoder(ensure_ascii=ascii_only).encode({"timestamp": timestamp, "level": "ERROR", **error})


_logging_encode = None  # built at the first record: a function that never logs never needs it


def logging_json(record: dict) -> str:
    """A `logging` record as awslambdaric's JsonFormatter encodes it in JSON logs
    (lambda_runtime_log_utils: json.JSONEncoder(ensure_ascii=False, default=str),
    whatever the Python version), without the newline it ends the record with.
    The Python runtime writes every record with it, the daemon awslambdaric's
    LAMBDA_WARNING before an init error."""
    global _logging_encode
    if _logging_encode is None:
        import json

        _logging_encode = json.JSONEncoder(ensure_ascii=False, default=str).encode
    return _logging_encode(record)


# daemon -> worker
INVOKE = 1
SHUTDOWN = 2
WAKE = 5

# worker -> daemon
READY = 10
INIT_ERROR = 11
LOG = 12
RESULT = 13
ERROR = 14
STATS = 15
CHUNK = 16

# templates
FORK = 3
START = 4
JOIN = 6
EXITED = 17
SPARE = 18

KIND_NAMES = {
    INVOKE: "INVOKE", SHUTDOWN: "SHUTDOWN", READY: "READY", INIT_ERROR: "INIT_ERROR",
    LOG: "LOG", RESULT: "RESULT", ERROR: "ERROR", STATS: "STATS", CHUNK: "CHUNK", FORK: "FORK", WAKE: "WAKE",
    START: "START", JOIN: "JOIN", EXITED: "EXITED", SPARE: "SPARE",
}

CONTROL_FD_ENV = "_FAASD_CONTROL_FD"  # names the control socket's descriptor in a worker


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


def encode(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), kind) + payload


class FrameDecoder:
    """Incremental decoder: feed bytes, get complete (kind, payload) frames."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer
        buffer += data
        frames = []
        offset = 0
        end = len(buffer)
        while end - offset >= HEADER_SIZE:
            length, kind = HEADER.unpack_from(buffer, offset)
            if length > MAX_FRAME:
                raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME} byte limit")
            stop = offset + HEADER_SIZE + length
            if stop > end:
                break
            frames.append((kind, bytes(buffer[offset + HEADER_SIZE:stop])))
            offset = stop
        if offset:
            del buffer[:offset]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buffer)
