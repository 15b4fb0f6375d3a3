"""The Python runtime shim: one worker process serving one function.

Started by the daemon through `python -I -S python_worker.py`, with the control
socket inherited (see faasd/protocol.py for the framing) and the
function's environment (`_HANDLER`, `LAMBDA_TASK_ROOT`, ...). It imports the
handler once, says READY, then serves INVOKE frames one at a time until
SHUTDOWN or end of file. Handler errors, import errors and their types follow
AWS's Python runtime so that logs and error payloads read the same, in Lambda's
Text log format or its JSON one (AWS_LAMBDA_LOG_FORMAT=JSON: each `logging`
record one JSON object, the root logger at AWS_LAMBDA_LOG_LEVEL).

Standard library only: the function's own code decides what else is loaded.
"""

import os
import sys
import time

_T0 = time.monotonic()

# Imported by python_worker.py as faasd.runtimes.python_runtime: the faasd
# package is loaded already, and its modules come from its own __path__ (the
# entry has taken the package's directory off sys.path again by the time user
# code runs).
from faasd import protocol  # noqa: E402

# Started with -S: the daemon names this interpreter's site-packages (it asked it
# at start), put on sys.path here without running their .pth files.
sys.path.extend(p for p in os.environ.pop("_FAASD_SITE_PATH", "").split(os.pathsep) if p)

import json  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402

# Not imported here unless the function needs them (each costs the first start
# milliseconds): traceback on errors, decimal when a result holds one, and
# logging when the function's code imports it (see _configure_logging_on_import).

_sock = socket.socket(fileno=int(os.environ.pop(protocol.CONTROL_FD_ENV, "3")))
_encode = protocol.encode
_header = protocol.HEADER
_header_size = protocol.HEADER_SIZE


def _send(kind, payload=b""):
    _sock.sendall(_encode(kind, payload))


_inbox = bytearray()  # bytes received past the last whole frame


def _recv_frame():
    """The next (kind, payload) from the daemon; (None, None) at end of file.

    Reads what the socket holds, not exact sizes, so that a frame usually
    costs one recv() rather than two.
    """
    buffer = _inbox
    while True:
        if len(buffer) >= _header_size:
            length, kind = _header.unpack_from(buffer)
            end = _header_size + length
            if len(buffer) >= end:
                payload = bytes(buffer[_header_size:end])
                del buffer[:end]
                return kind, payload
            want = end - len(buffer)
        else:
            want = 0
        chunk = _sock.recv(max(want, 65536))
        if not chunk:
            return None, None
        buffer += chunk


class _LogStream:
    """What a write-only, never-closed stream answers, for the two below."""

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def isatty(self):
        return False

    def readable(self):
        return False

    def writable(self):
        return True

    def seekable(self):
        return False

    @property
    def closed(self):
        return False


class _FrameWriter(_LogStream):
    """sys.stdout / sys.stderr: whole lines go to the daemon as LOG frames.

    A write's text up to its last newline goes at once; the rest of a line waits
    in the writer for its end, so that lines written in parts (print's text and
    then its newline, or write("a\\nb") and write("c\\n")) are the lines a
    terminal shows and a partial line of stdout never joins one of stderr.
    flush() sends a partial line too (the daemon holds it for the rest of its
    line); end_line() ends it, at the end of an invocation or of the init.

    It has what code expects of a text stream on Lambda: `buffer` for bytes,
    `reconfigure()` (output stays UTF-8 lines whatever it asks for), and the
    attributes of a line-buffered TextIOWrapper.
    """

    encoding = "utf-8"
    errors = "backslashreplace"
    mode = "w"
    newlines = None
    line_buffering = True
    write_through = False

    def __init__(self, name):
        self.name = name
        self._pending = []
        self._buffer = None

    @property
    def buffer(self):
        if self._buffer is None:
            self._buffer = _FrameBuffer(self)
        return self._buffer

    def reconfigure(self, *, encoding=None, errors=None, newline=None, line_buffering=None,
                    write_through=None):
        """As TextIOWrapper.reconfigure() takes them; the daemon reads UTF-8 lines regardless."""

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if "\n" in text:
            if text[-1] == "\n":  # whole lines: the usual case
                lines, rest = text, ""
            else:
                end = text.rfind("\n") + 1
                lines, rest = text[:end], text[end:]
            pending = self._pending
            if pending:
                pending.append(lines)
                lines = "".join(pending)
                pending.clear()
            _send(protocol.LOG, lines.encode("utf-8", "backslashreplace"))
            if rest:
                pending.append(rest)
        elif text:
            self._pending.append(text)
        return len(text)

    def flush(self):
        if self._pending:
            data = "".join(self._pending)
            self._pending.clear()
            _send(protocol.LOG, data.encode("utf-8", "backslashreplace"))

    def end_line(self):
        """Send a line still waiting for its newline as a whole line."""
        if self._pending:
            self._pending.append("\n")
            self.flush()

    def fileno(self):
        return 1 if self.name == "<stdout>" else 2


class _FrameBuffer(_LogStream):
    """sys.stdout.buffer: bytes written here reach the log as text, decoded as UTF-8
    across writes (a character split over two writes arrives whole), bad bytes escaped."""

    def __init__(self, text):
        import codecs

        self._text = text
        self._decode = codecs.getincrementaldecoder("utf-8")("backslashreplace").decode

    @property
    def raw(self):
        return self

    def write(self, data):
        data = bytes(data)  # bytearray and memoryview too
        self._text.write(self._decode(data))
        return len(data)

    def flush(self):
        self._text.flush()

    def fileno(self):
        return self._text.fileno()


class _FromDict:
    """An object with the keys of a dict named in __slots__ (missing ones None), as
    AWS's runtime builds context.identity and context.client_context."""

    __slots__ = ()

    def __init__(self, values=None):
        values = values if isinstance(values, dict) else {}
        for name in self.__slots__:
            setattr(self, name, values.get(name))

    def __repr__(self):
        fields = ",".join(f"{name}={getattr(self, name)}" for name in self.__slots__)
        return f"{type(self).__name__}([{fields}])"


class CognitoIdentity(_FromDict):
    """context.identity: an Amazon Cognito identity, which faasd never has (its fields are None)."""

    __slots__ = ("cognito_identity_id", "cognito_identity_pool_id")


class Client(_FromDict):
    __slots__ = ("installation_id", "app_title", "app_version_name", "app_version_code",
                 "app_package_name")


class ClientContext(_FromDict):
    """context.client_context: the caller's ClientContext (Lambda Invoke API, synchronous calls)."""

    __slots__ = ("custom", "env", "client")

    def __init__(self, values=None):
        super().__init__(values)
        if self.client is not None:
            self.client = Client(self.client)


# The W3C trace-context fields a caller's ClientContext may carry under `w3c`.
_W3C_FIELDS = ("traceparent", "tracestate", "baggage")


class LambdaContext:
    """The `context` argument: the attributes and methods of AWS's runtime's, and
    nothing else in sight (helpers are the module's, names starting with _ aside)."""

    # Read from the environment once the worker's environment is final (_serve),
    # as AWS's runtime does at start-up, not on every call: see _read_static_context.
    _static = {}
    _w3c = {}  # most calls have no client context, so none of its trace context either
    tenant_id = None  # Lambda's tenant isolation mode, which faasd does not have

    def __init__(self, request_id, deadline_ms, invoked_function_arn, client_context=None):
        self.__dict__.update(self._static)
        self.aws_request_id = request_id
        self.invoked_function_arn = invoked_function_arn
        self._deadline_ms = deadline_ms
        self.identity = CognitoIdentity()
        if client_context is None:
            self.client_context = None
        else:
            self.client_context = ClientContext(client_context)
            w3c = client_context.get("w3c") if isinstance(client_context, dict) else None
            if isinstance(w3c, dict):
                self._w3c = {name: w3c[name] for name in _W3C_FIELDS if isinstance(w3c.get(name), str)}

    def get_remaining_time_in_millis(self):
        return max(int(self._deadline_ms - time.time() * 1000), 0)

    def w3c(self):
        """The caller's W3C trace context: the string fields traceparent, tracestate
        and baggage of its ClientContext's `w3c`, as AWS's runtime gives them."""
        return dict(self._w3c)

    def log(self, message):
        # A line of its own, as each call is one record on Lambda.
        text = str(message)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()

    def __repr__(self):
        # As AWS's runtime shows it (print(context), logging it).
        return (f"{type(self).__name__}([aws_request_id={self.aws_request_id},"
                f"log_group_name={self.log_group_name},log_stream_name={self.log_stream_name},"
                f"function_name={self.function_name},memory_limit_in_mb={self.memory_limit_in_mb},"
                f"function_version={self.function_version},"
                f"invoked_function_arn={self.invoked_function_arn},client_context={self.client_context},"
                f"identity={self.identity},tenant_id={self.tenant_id}])")


def _read_static_context():
    """What every context of this worker shares, from its (now final) environment."""
    get = os.environ.get
    LambdaContext._static = {
        "function_name": get("AWS_LAMBDA_FUNCTION_NAME"),
        "function_version": get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        "memory_limit_in_mb": get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"),
        "log_group_name": get("AWS_LAMBDA_LOG_GROUP_NAME"),
        "log_stream_name": get("AWS_LAMBDA_LOG_STREAM_NAME"),
    }


_current_request_id = ""


def _log_settings():
    """(JSON logs?, the root logger's level name or ""), from AWS_LAMBDA_LOG_FORMAT and
    AWS_LAMBDA_LOG_LEVEL as AWS's Python runtime reads them: logging has no TRACE, so
    TRACE is DEBUG."""
    json_logs = os.environ.get("AWS_LAMBDA_LOG_FORMAT", "").upper() == "JSON"
    level = os.environ.get("AWS_LAMBDA_LOG_LEVEL", "").upper()
    return json_logs, "DEBUG" if level == "TRACE" else level


def _setup_logging(logging):
    """The root logger as AWS's runtime sets it up: Lambda's line format with the request
    id, or in JSON logs one JSON object a record; at the application log level if set."""

    class _RequestIdFilter(logging.Filter):
        def filter(self, record):
            record.aws_request_id = _current_request_id
            return True

    json_logs, level = _log_settings()
    handler = logging.StreamHandler(sys.stdout)
    if json_logs:
        handler.setFormatter(_json_formatter(logging)())
    else:
        handler.setFormatter(logging.Formatter(
            "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s\n",
            "%Y-%m-%dT%H:%M:%S",
        ))
        handler.formatter.converter = time.gmtime
        handler.terminator = ""  # the format ends the record, as AWS's does
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level if level in logging.getLevelNamesMapping() else logging.WARNING)


# A LogRecord's own attributes: any other one came from `extra` and joins the JSON record.
_RECORD_FIELDS = frozenset({
    "name", "msg", "args", "levelname", "levelno", "pathname", "filename", "module", "exc_info",
    "exc_text", "stack_info", "lineno", "funcName", "created", "msecs", "relativeCreated", "thread",
    "threadName", "processName", "process", "taskName", "message", "asctime", "aws_request_id",
})


def _iso_time(seconds):
    """2026-01-02T03:04:05Z: AWS's Python runtime times its JSON records (each
    `logging` record, and a handler's error) to the second, not the millisecond
    of the platform's records."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _json_formatter(logging):
    """The formatter of AWS's Python runtime in JSON logs: timestamp, level, message,
    logger, the exception's stackTrace, errorType, errorMessage and location where
    there is one, requestId, then the record's `extra` fields; nothing that is None."""
    encode = protocol.logging_json

    class JsonFormatter(logging.Formatter):
        def format(self, record):
            # Lambda's levels are the standard ones: a custom level rounds down to one.
            record.levelno = min(50, max(0, record.levelno)) // 10 * 10
            record.levelname = logging.getLevelName(record.levelno)
            exc_info = record.exc_info
            if not exc_info or exc_info[0] is None:
                exc_info = None
            result = {
                "timestamp": _iso_time(record.created),
                "level": record.levelname,
                "message": record.getMessage(),
                "logger": record.name,
            }
            if exc_info is not None:
                import traceback

                result["stackTrace"] = traceback.format_tb(exc_info[2])
                result["errorType"] = exc_info[0].__name__
                result["errorMessage"] = str(exc_info[1])
            result["requestId"] = getattr(record, "aws_request_id", None)
            if exc_info is not None:
                result["location"] = f"{record.pathname}:{record.funcName}:{record.lineno}"
            for key, value in record.__dict__.items():
                if key not in _RECORD_FIELDS and key not in result:
                    result[key] = value
            return encode({key: value for key, value in result.items() if value is not None})

    return JsonFormatter


class _configure_logging_on_import:
    """A meta path finder: when `logging` is first imported, set it up (_setup_logging)
    as soon as it has loaded, so that a function that never logs never pays for it."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "logging":
            return None
        sys.meta_path.remove(cls)
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_set_up(module):
            exec_module(module)
            _setup_logging(module)

        spec.loader.exec_module = exec_and_set_up
        return spec


def _install_logging():
    if "logging" in sys.modules:
        _setup_logging(sys.modules["logging"])
    else:
        sys.meta_path.insert(0, _configure_logging_on_import)


def _error(error_type, message, stack=None):
    # awslambdaric's error document: the invocation's request id, "" for an init error.
    return {"errorMessage": message, "errorType": error_type, "requestId": _current_request_id,
            "stackTrace": stack or []}


def _user_frames(tb):
    import traceback

    frames = traceback.extract_tb(tb)
    # Drop the shim's own frames: users see their code only, as on AWS.
    frames = [f for f in frames if f.filename != __file__]
    return traceback.format_list(frames)


def _load_handler():
    handler_spec = os.environ.get("_HANDLER", "")
    module_name, _, function_name = handler_spec.rpartition(".")
    if not module_name or not function_name:
        return None, _error("Runtime.MalformedHandlerName",
                            f"Bad handler '{handler_spec}': not enough values to unpack (expected 2, got 1)")
    task_root = os.environ.get("LAMBDA_TASK_ROOT", os.getcwd())
    sys.path.insert(0, task_root)
    import importlib

    dotted = module_name.replace("/", ".")
    try:
        module = importlib.import_module(dotted)
    except SyntaxError as exc:
        return None, _error("Runtime.UserCodeSyntaxError", f"Syntax error in module '{module_name}': {exc}",
                            [protocol.syntax_error_frame(exc.filename, exc.lineno, exc.text)])
    except ImportError as exc:
        message = f"Unable to import module '{module_name}': {exc}"
        if isinstance(exc, ModuleNotFoundError) and exc.name == dotted.split(".")[0]:
            message += _unreadable(task_root)
        return None, _error("Runtime.ImportModuleError", message)  # no stack trace, as AWS's runtime
    except Exception as exc:  # the module's own code raised at import
        # Not logged here: the daemon logs every init error, from its document.
        # Exception only, as awslambdaric's run() catches: a SystemExit (sys.exit())
        # or KeyboardInterrupt ends the process as Python ends it, and the daemon
        # reports the exit (Runtime.ExitError) as Lambda does.
        return None, _error(type(exc).__name__, str(exc), _user_frames(exc.__traceback__))
    handler = getattr(module, function_name, None)
    if handler is None:
        return None, _error("Runtime.HandlerNotFound",
                            f"Handler '{function_name}' missing on module '{module_name}'"
                            + _not_its_own(module, task_root))
    if not callable(handler):
        return None, _error("Runtime.HandlerNotFound",
                            f"Handler '{function_name}' on module '{module_name}' is not callable")
    return handler, None


def _not_its_own(module, task_root):
    """Why the module imported is not the function's file, or "": a module of
    that name (json, struct, ...) was loaded before the handler, by the runtime."""
    path = getattr(module, "__file__", None)
    if path and os.path.realpath(path).startswith(os.path.realpath(task_root) + os.sep):
        return ""
    return (f" (the module of that name already loaded is {path or 'built into Python'}, not the "
            "function's own file: give the file another name)")


def _unreadable(task_root):
    """Why this worker cannot read its code, or "": Python's import system takes a
    directory on sys.path that it may not read for one without the module."""
    try:
        os.listdir(task_root)
    except OSError as exc:
        return (f" (this worker runs as uid {os.getuid()}, which cannot read {task_root}: "
                f"{exc.strerror}; every directory above the code must be searchable by that user)")
    return ""


def _interpreter_unreadable():
    """Why this worker, now as its own user, cannot import the standard library,
    or "": its first import would fail as if the module were missing."""
    stdlib = os.path.dirname(os.__file__)
    try:
        os.close(os.open(stdlib, os.O_RDONLY | os.O_DIRECTORY))
    except OSError as exc:
        return (f"this worker runs as uid {os.getuid()}, which cannot read {stdlib}, the standard "
                f"library of {sys.executable}: {exc.strerror}; set [workers] python to an "
                "interpreter every worker's user can read (e.g. /usr/bin/python3), or install "
                "faasd in a virtual environment they can read")
    return ""


def _log_error(error):
    """Log an error document as AWS's runtime does (awslambdaric's log_error)."""
    json_logs, level = _log_settings()
    if json_logs:
        # The error document, at ERROR.
        if level not in ("FATAL", "CRITICAL"):
            sys.stdout.write(protocol.error_log_json(error, _iso_time(time.time()), _ENSURE_ASCII) + "\n")
            sys.stdout.flush()
        return
    sys.stdout.write(protocol.error_log_record(error["errorType"], error["errorMessage"],
                                               error["stackTrace"]) + "\n")
    sys.stdout.flush()


# A Decimal is written as its own digits, as awslambdaric writes it (str(value),
# unrounded: 1.10, 1E+2, Infinity; a NaN as NaN). json has no raw values, so the
# encoder writes the digits inside a string that starts with this mark, and
# _encode_result takes the quotes and the mark away. The mark is random and
# begins with a NUL, so no string of the handler's can look like one.
_RAW_MARK = f"\0{os.urandom(8).hex()}:"
_RAW_OPEN = json.dumps(_RAW_MARK)[:-1]  # '"\u0000<hex>:'
_RAW_CLOSE = json.dumps("\0")[1:]  # '\u0000"'
_raw_written = False


def _default(value):
    global _raw_written
    decimal = sys.modules.get("decimal")  # a Decimal exists only if decimal was imported
    if decimal is not None and isinstance(value, decimal.Decimal):
        if value.is_nan():
            return float("nan")
        _raw_written = True
        return f"{_RAW_MARK}{value}\0"
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_decode = json.JSONDecoder().decode
# awslambdaric writes the characters of a result or an error document as they are on
# Lambda's python3.12 and later, and as \uXXXX escapes on python3.11 and before
# (lambda_runtime_marshaller.Encoder); a worker's interpreter is its runtime's version.
_ENSURE_ASCII = protocol.ensure_ascii(sys.version_info)
# Built once: json.dumps(..., default=) would build a new encoder on every call.
_encode_with_marks = json.JSONEncoder(default=_default, ensure_ascii=_ENSURE_ASCII).encode
_encode_json = json.JSONEncoder(ensure_ascii=_ENSURE_ASCII).encode


def _utf8(text):
    """JSON text as bytes. Unescaped, a string may hold a lone surrogate (a file name
    decoded with surrogateescape), which UTF-8 cannot carry: it goes as its JSON escape."""
    return text.encode("utf-8", "backslashreplace")


def _encode_result(value):
    global _raw_written
    _raw_written = False
    text = _encode_with_marks(value)
    if not _raw_written:
        return text
    head, *marked = text.split(_RAW_OPEN)
    pieces = [head]
    for piece in marked:
        digits, _, rest = piece.partition(_RAW_CLOSE)
        pieces += (digits, rest)
    return "".join(pieces)


def _trace_id():
    """A new X-Ray trace header, in the format Lambda gives an invocation that came without one."""
    random = os.urandom(20).hex()
    return f"Root=1-{int(time.time()):08x}-{random[:24]};Parent={random[24:]};Sampled=0"


def _invoke(handler, payload):
    global _current_request_id
    head, _, body = payload.partition(b"\n")
    header = _decode(head.decode())
    request_id = _current_request_id = header["id"]
    os.environ["_X_AMZN_TRACE_ID"] = header.get("trace") or _trace_id()
    try:
        event = _decode(body.decode()) if body else None
    except ValueError as exc:  # UnicodeDecodeError included
        _send(protocol.ERROR, _utf8(_encode_json(_error(
            "Runtime.UnmarshalError", f"Unable to unmarshal input: {exc}"))))
        return
    context = LambdaContext(request_id, header["deadline_ms"], header.get("arn", ""),
                            header.get("client_context"))
    try:
        result = handler(event, context)
    except Exception as exc:
        error = _error(type(exc).__name__, str(exc), _user_frames(exc.__traceback__))
        _log_error(error)
        reply = protocol.ERROR, _utf8(_encode_json(error))
    else:
        try:
            # bytes are the response as they are, as awslambdaric posts them; the rest is JSON.
            data = result if isinstance(result, bytes) else _utf8(_encode_result(result))
        except Exception as exc:  # whatever encoding raised, as awslambdaric catches it
            reply = protocol.ERROR, _utf8(_encode_json(_error(
                "Runtime.MarshalError", f"Unable to marshal response: {exc}")))
        else:
            if len(data) > protocol.MAX_RESPONSE_BYTES:
                reply = protocol.ERROR, _utf8(_encode_json(_error(
                    "Function.ResponseSizeTooLarge", protocol.RESPONSE_TOO_LARGE)))
            else:
                reply = protocol.RESULT, data
    stdout, stderr = sys.stdout, sys.stderr
    if getattr(stdout, "_pending", True):
        _end_output(stdout)
    if getattr(stderr, "_pending", True):
        _end_output(stderr)
    _sock.sendall(_encode(protocol.STATS, _peak_kb()) + _encode(*reply))


def _end_output(stream):
    """Send what sys.stdout or sys.stderr holds as an invocation or the init ends:
    a line without its newline is a line of what ends, not the start of the next one's."""
    if isinstance(stream, _FrameWriter):
        stream.end_line()
    else:
        stream.flush()


# A spawned worker's getrusage() peak starts at the daemon's: an exec keeps
# the peak of the memory it replaces, and until its exec the new process ran
# in the daemon's memory (vfork). Where that inherited figure stands above the
# worker's own peak (VmHWM), the own one is reported, read again only after
# page faults may have raised it. Forked workers start with a peak of their own.
_inherited_kb = 0
_own = (-1, 0)  # (page faults when VmHWM was read, VmHWM in KiB)


def _peak_kb():
    """Peak resident memory of this worker and the children it waited for, in KiB."""
    global _own
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss
    if peak <= _inherited_kb:
        faults = usage.ru_minflt + usage.ru_majflt
        if faults != _own[0]:
            own = _vm_hwm_kb() or peak
            usage = resource.getrusage(resource.RUSAGE_SELF)  # the read faults too
            _own = (usage.ru_minflt + usage.ru_majflt, own)
        peak = _own[1]
    peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return peak.to_bytes(4, "big")


def _vm_hwm_kb():
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _note_inherited_peak():
    global _inherited_kb
    peak, own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _vm_hwm_kb()
    _inherited_kb = peak if own is not None and peak > own else 0


def _die_with_parent():
    """Ask the kernel for SIGKILL when the daemon dies, so no worker outlives it."""
    try:
        import signal

        from faasd import libc

        libc.call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    parent = os.environ.pop("_FAASD_PARENT_PID", None)
    if parent and os.getppid() != int(parent):
        os._exit(1)  # the daemon died before we could ask


# -- template mode (faasd/zygote.py) ---------------------------------------------------
#
# A template imports the handler once and forks ready workers on request, so
# a new worker costs a fork instead of an interpreter start and the imports.

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC, MS_PRIVATE = 16384, 1 << 18
PR_SET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_DUMPABLE = 1, 3, 4


def _serve_as_template():
    import gc
    import signal

    hazards = _fork_hazards()
    if hazards:
        # Its workers start fresh instead, each running the init itself.
        _send(protocol.READY, json.dumps({"init_ms": (time.monotonic() - _T0) * 1000,
                                          "unsafe": hazards}).encode())
        while True:
            kind, _ = _recv_frame()
            if kind is None or kind == protocol.SHUTDOWN:
                return 0

    # What forked workers need later is loaded now, once, in the template.
    for module in ("array", "faasd.libc"):
        __import__(module)

    gc.collect()
    gc.freeze()  # keep the collector from dirtying shared pages in every fork

    def reap(signum, frame):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            _send(protocol.EXITED, json.dumps({"pid": pid, "returncode": code}).encode())

    signal.signal(signal.SIGCHLD, reap)
    tmp_mb = int(os.environ.pop("_FAASD_TMP_MB", "512"))
    _send(protocol.READY, json.dumps({"init_ms": (time.monotonic() - _T0) * 1000}).encode())
    # The daemon asks for spares ahead of demand and holds them, so that a
    # call needing a new worker does not wait for a fork.
    while True:
        kind, payload = _recv_frame()
        if kind is None or kind == protocol.SHUTDOWN:
            return 0
        if kind == protocol.FORK:
            for _ in range(int(json.loads(payload).get("count", 1))):
                _fork_spare(tmp_mb)


def _fork_hazards():
    """Why a fork of this template would not be the worker a fresh start makes,
    as a phrase ("its init left ..."); "" if it would be.

    A fork has only the thread that forked: threads the init started (a pool
    it submits to, a daemon thread) are missing in every fork. It shares the
    template's open sockets and pipes: forks would talk over one connection
    and read each other's replies; and its kernel event objects (an epoll set,
    an eventfd, an inotify or timer descriptor): one set every fork adds to
    and waits on, one counter they all signal. And it gets a fresh /tmp and /dev/shm:
    what the init wrote there is missing. Native threads that C libraries
    start (OpenBLAS's) are no hazard: such libraries rebuild them in the
    child themselves (pthread_atfork), and only Python's threads are counted.
    """
    import threading

    sockets, pipes, events = [], [], []
    own = {0, 1, 2, _sock.fileno()}
    for name in os.listdir("/proc/self/fd"):
        if int(name) in own:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if target.startswith("socket:"):
            sockets.append(f"fd {name}, {target}")
        elif target.startswith("pipe:"):
            pipes.append(f"fd {name}, {target}")
        elif target.startswith("anon_inode:") and target != "anon_inode:[pidfd]":
            events.append(f"fd {name}, {target}")
    main = threading.main_thread()
    names = [thread.name for thread in threading.enumerate() if thread is not main]
    threads = max(len(names), _thread_count())
    written = []
    if "faasd.sandbox" in sys.modules:  # a template isolated in a /tmp of its own
        written = sys.modules["faasd.sandbox"].scratch_written()
    where = "/tmp" if all(path.startswith("/tmp/") for path in written) else "/tmp or /dev/shm"
    left = []
    for count, one, many, what, joint in (
            (len(sockets), "a socket open", "sockets open", sockets, "; "),
            (len(pipes), "a pipe open", "pipes open", pipes, "; "),
            (len(events), "an event descriptor open", "event descriptors open", events, "; "),
            (threads, "1 thread running", "threads running", names, ", "),
            (len(written), f"a file in {where}", f"files in {where}", written, ", ")):
        if count:
            shown = joint.join(what[:3]) + (joint + "..." if len(what) > 3 else "")
            left.append((one if count == 1 else f"{count} {many}") + (f" ({shown})" if shown else ""))
    if not left:
        return ""
    return "its init left " + (", ".join(left[:-1]) + " and " + left[-1] if len(left) > 1 else left[0])


def _thread_count():
    """Threads started through Python's _thread module and still running."""
    import _thread

    count = getattr(_thread, "_count", None)
    return count() if count is not None else 0


def _fork_spare(tmp_mb):
    """Fork a child that isolates itself and waits for its START; hand it to the daemon."""
    import array

    template_pid = os.getpid()
    try:
        control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_read, out_write = os.pipe()
        pid = os.fork()
    except OSError as exc:
        _send(protocol.SPARE, json.dumps({"error": f"cannot fork: {exc}"}).encode())
        return
    if pid == 0:
        control.close()
        os.close(out_read)
        try:
            _spare(child_control, out_write, tmp_mb, template_pid)
        except BaseException:
            import traceback

            traceback.print_exc()  # to its output: the daemon logs it when the spare dies
        finally:
            os._exit(70)
    child_control.close()
    os.close(out_write)
    try:
        # A pidfd names this very process even after it is reaped, so the
        # daemon can never mistake a recycled pid for its worker.
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        control.close()
        os.close(out_read)
        _send(protocol.SPARE, json.dumps({"error": f"the spare died at once: {exc}"}).encode())
        return
    frame = protocol.encode(protocol.SPARE, json.dumps({"pid": pid}).encode())
    fds = array.array("i", [control.fileno(), out_read, pidfd])
    try:
        _sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    finally:
        control.close()
        os.close(out_read)
        os.close(pidfd)


def _spare(control, out_write, tmp_mb, template_pid):
    """In a forked child: take the new channel and output, isolate /tmp, wait, then serve."""
    global _sock, _T0
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setpgid(0, 0)  # a process group of its own, killed as one
    _sock.close()
    _sock = control
    _inbox.clear()  # the template's unread frames are not this worker's
    os.dup2(out_write, 1)
    os.dup2(out_write, 2)
    os.close(out_write)
    own_tmp = _own_tmp(tmp_mb)
    # Die with the template. Set after entering a user namespace, which
    # clears the parent-death signal; then make sure the template is still
    # there (it may have died before the signal was armed).
    from faasd import libc

    libc.call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != template_pid:
        os._exit(0)
    _join_groups()
    kind, payload = _recv_frame()
    if kind != protocol.START:
        os._exit(0)  # the daemon let it go unused
    started = time.monotonic()
    request = json.loads(payload)
    os.environ.update(request.get("env", {}))
    if own_tmp:
        os.environ["TMPDIR"] = "/tmp"
        note = "own tmpfs"
    else:
        private = os.path.join("/tmp", request["id"])
        os.makedirs(private, mode=0o700, exist_ok=True)
        os.environ["TMPDIR"] = private
        note = f"shared /tmp, own {private}"
    if "tempfile" in sys.modules:
        sys.modules["tempfile"].tempdir = None  # the template's choice is not this worker's
    _reseed()
    _T0 = started
    _send(protocol.READY, json.dumps({"init_ms": (time.monotonic() - started) * 1000,
                                      "tmp": note}).encode())
    os._exit(_serve())


def _reseed():
    """Give this fork random numbers of its own: Python's `random` reseeds
    itself in a fork, numpy's global generator (np.random.rand, .choice, ...)
    does not, and every worker of a template would draw the same numbers."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        try:
            numpy.random.seed()
        except Exception:  # noqa: BLE001 - a numpy without it, or half imported
            pass


def _join_groups():
    """Take the daemon's JOIN and move into this worker's own cgroups.

    It carries each cgroup v1 group's `tasks` file, opened by the daemon (so
    writable whatever this process's user). Writing 0 to it moves this
    thread, and a fork has only the one: microseconds, where the daemon's
    move of the process took milliseconds and held up every fork on the host.
    """
    data, fds, _, _ = socket.recv_fds(_sock, 1 << 16, 8)
    if not data:
        os._exit(0)  # the daemon let it go unused
    _inbox.extend(data)
    kind, payload = _recv_frame()
    if kind != protocol.JOIN:
        os._exit(0)
    names = json.loads(payload).get("groups", [])
    for index, fd in enumerate(fds):
        try:
            os.write(fd, b"0")
        except OSError as exc:
            name = names[index] if index < len(names) else f"#{index}"
            os.write(2, f"cannot join cgroup {name}: {exc.strerror}\n".encode())
            os._exit(70)
        os.close(fd)


def _own_tmp(tmp_mb):
    """A fresh tmpfs at /tmp in a mount namespace of this worker's own; False if not allowed.

    Root unshares the mount namespace directly; anyone else through a new user
    namespace (mapping only its own uid). Where neither is allowed, the worker
    gets a directory of its own inside the template's /tmp instead.
    """
    from faasd import libc

    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNS
    if libc.call("unshare", flags) != 0:
        return False
    if flags & CLONE_NEWUSER:
        # A template that root started as run_as is undumpable, and so is this
        # fork: its /proc files belong to root, and it could not open its own
        # maps. It is dumpable for these three writes only, before any call
        # has reached it; in that window a process of the same user could
        # attach to it (with [workers] function_users: only its own function's).
        dumpable = libc.call("prctl", PR_GET_DUMPABLE, 0, 0, 0, 0)
        libc.call("prctl", PR_SET_DUMPABLE, 1, 0, 0, 0)
        try:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                               ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as handle:
                    handle.write(text)
        finally:
            libc.call("prctl", PR_SET_DUMPABLE, dumpable, 0, 0, 0)
    if libc.call("mount", None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        os._exit(71)  # half-isolated: never serve like this
    from faasd import sandbox  # loaded already where the template isolated itself

    try:
        sandbox.tmp_of_its_own(tmp_mb)
    except Exception as exc:  # SandboxError or OSError: its output tells the daemon why
        os.write(2, f"faasd could not give this worker a /tmp of its own: {exc}\n".encode())
        os._exit(71)
    return True


def _serve():
    handler = _HANDLER_FN
    _read_static_context()
    while True:
        kind, payload = _recv_frame()
        if kind is None or kind == protocol.SHUTDOWN:
            return 0
        if kind == protocol.INVOKE:
            _invoke(handler, payload)


_HANDLER_FN = None


def main():
    global _HANDLER_FN
    sandbox = os.environ.pop("_FAASD_SANDBOX", None)
    if sandbox:
        # Privileged setup (namespaces, /tmp, limits, user) before user code.
        from faasd import sandbox as _sandbox

        _sandbox.enter(sandbox)
        unreadable = _interpreter_unreadable()
        if unreadable:
            error = {"errorType": _sandbox.SETUP_ERROR, "errorMessage": unreadable, "stackTrace": []}
            _send(protocol.INIT_ERROR, json.dumps(error).encode())
            return 1
    _die_with_parent()
    # The interpreter's own stdout (fd 1, which the daemon reads too) is
    # block-buffered on a pipe: code writing to sys.__stdout__ would see its
    # lines held back until the worker exits. Each line goes out as written.
    if sys.__stdout__ is not None:
        sys.__stdout__.reconfigure(line_buffering=True)
    sys.stdout = _FrameWriter("<stdout>")
    sys.stderr = _FrameWriter("<stderr>")
    _install_logging()
    template = os.environ.pop("_FAASD_TEMPLATE", None) == "1"
    handler, error = _load_handler()
    _end_output(sys.stdout)
    _end_output(sys.stderr)
    if error is not None:
        _send(protocol.INIT_ERROR, json.dumps(error).encode())
        return 1
    _HANDLER_FN = handler
    if template:
        return _serve_as_template()
    _note_inherited_peak()
    _send(protocol.READY, json.dumps({"init_ms": (time.monotonic() - _T0) * 1000}).encode())
    return _serve()


if __name__ == "__main__":
    sys.exit(main())
