"""The one path every invocation takes, whatever triggered it.

trigger -> Invoker.invoke() -> concurrency limits -> pool.acquire() ->
worker.run() -> logs (START/END/REPORT, or Lambda's JSON records: faasd/platform_log.py)
-> Invocation.

Limits: a call holds one slot of the global `max_concurrency` and one of the
function's `concurrency`. A synchronous call that finds either full is
refused at once (`Throttled`, HTTP 429); an asynchronous one (`wait=True`)
waits its turn, first come first served, but for a function whose
`concurrency` is 0: no turn ever comes, so it is refused too, and the queue
tries it again later as Lambda retries a throttled event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NoReturn

import orjson

from .errors import FunctionError, FunctionNotFound, ShuttingDown, Throttled
from .logs import FunctionLogs, LogCapture, iso_now
from .platform_log import billed_ms, init_start_lines, json_platform_log
from .protocol import ensure_ascii, error_log_json, error_log_record, logging_json
from .pool import WorkerPool
from .registry import Registry
from .sandbox import SETUP_ERROR
from .spec import FunctionSpec, new_request_id, python_interpreter
from .streaming import ResponseStream
from .workers import HostShortage, Worker, WorkerInitError

log = logging.getLogger("faasd.invoker")

# What awslambdaric (3.1.1 and later) logs through `logging.warning` before the record
# of an init error it caught (lambda_literals.lambda_unhandled_exception_warning_message,
# its \r included); not before a handler's error, nor does Node's runtime log it.
UNHANDLED_WARNING = (
    "LAMBDA_WARNING: Unhandled exception. The most likely cause is an issue in the function code. "
    "However, in rare cases, a Lambda runtime update can cause unexpected function behavior. "
    "For functions using managed runtimes, runtime updates can be triggered by a function change, "
    "or can be applied automatically. To determine if the runtime has been updated, check the "
    "runtime version in the INIT_START log entry. If this error correlates with a change in the "
    "runtime version, you may be able to mitigate this error by temporarily rolling back to the "
    "previous runtime version. For more information, see "
    "https://docs.aws.amazon.com/lambda/latest/dg/runtimes-update.html\r")


class Limiter:
    """A counting semaphore that can refuse (`try_acquire`) or queue (`acquire`)."""

    __slots__ = ("limit", "used", "_waiters")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future] = deque()

    def try_acquire(self) -> bool:
        if self.limit is not None and (self.used >= self.limit or self._waiters):
            return False
        self.used += 1
        return True

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the slot was handed over as we were cancelled
            else:
                self._waiters.remove(future)
            raise

    def set_limit(self, limit: int | None) -> None:
        """Change the limit; waiters that fit under a raised limit get their slot now."""
        self.limit = limit
        while self._waiters and (limit is None or self.used < limit):
            future = self._waiters.popleft()
            if not future.done():
                self.used += 1
                future.set_result(None)

    def release(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)  # the slot passes straight to the waiter
                return
        self.used -= 1


@dataclass(slots=True)
class Invocation:
    """What happened to one invocation."""

    request_id: str
    function: str
    payload: bytes | None = None
    error: FunctionError | None = None
    duration_ms: float = 0.0
    init_ms: float | None = None
    # Its worker's init ran within the call: Lambda's second try of a failed init, in the
    # invoke phase. Its REPORT has no Init Duration; its Duration covers that init.
    init_in_call: bool = False
    max_memory_mb: int = 0
    log_lines: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def reported_init_ms(self) -> float | None:
        """The Init Duration of its REPORT, billed with it: a cold start's. None where the
        init was tried again in the call (the failed init phase had an INIT_REPORT)."""
        return None if self.init_in_call else self.init_ms

    @property
    def log_tail(self) -> str:
        """The last 4 KB of the invocation's log, as Lambda's LogType=Tail gives."""
        lines = self.log_lines
        start = len(lines)
        size = 0
        while start and size < 4096:  # characters: no more than the bytes they take
            start -= 1
            size += len(lines[start]) + 1
        text = "".join(line + "\n" for line in lines[start:]).encode()
        return text[-4096:].decode("utf-8", "ignore")


InvocationObserver = Callable[[FunctionSpec, Invocation, str], None]
# (spec, reason, source) of a call refused for concurrency, before Throttled is raised.
ThrottleObserver = Callable[[FunctionSpec, str, str], None]


class Invoker:
    def __init__(self, registry: Registry, pool: WorkerPool, logs: FunctionLogs,
                 max_concurrency: int) -> None:
        self.registry = registry
        self.pool = pool
        self.logs = logs
        self.global_limit = Limiter(max_concurrency)
        self._function_limits: dict[str, Limiter] = {}
        self.inflight = 0
        self.draining = False  # no queued event starts any more (SIGTERM)
        self._calls_refused = False  # nor any call: the drain has begun
        self._idle = asyncio.Event()
        self._idle.set()
        self._called: set[Worker] = set()  # workers running a synchronous call
        self.observers: list[InvocationObserver] = []
        self.throttle_observers: list[ThrottleObserver] = []

    def spec(self, name: str) -> FunctionSpec:
        spec = self.registry.get(name)
        if spec is None:
            raise FunctionNotFound(name)
        return spec

    def expect(self, name: str) -> None:
        """A call of `name` is being prepared: the pool may wake the worker it
        will most likely use while the caller builds the event. Only on a quiet
        daemon: with calls in flight the cores are awake anyway, and the pool
        would not poll for the reply (faasd/workers.py's ReplyPoller)."""
        replies = self.pool.env.replies
        if replies is None or self.inflight >= replies.max_waiting:
            return
        spec = self.registry.get(name)
        if spec is not None and not spec.load_error:
            self.pool.get(spec).wake_next()

    def function_limit(self, spec: FunctionSpec) -> Limiter:
        limiter = self._function_limits.get(spec.name)
        if limiter is None:
            limiter = self._function_limits[spec.name] = Limiter(spec.concurrency)
        limiter.limit = spec.concurrency
        return limiter

    async def invoke(self, name: str, event: bytes, *, request_id: str | None = None,
                     wait: bool = False, source: str = "api",
                     client_context: dict | None = None,
                     invoked_arn: str | None = None, trace_id: str | None = None,
                     stream: ResponseStream | None = None) -> Invocation:
        """Run `name` on `event` (JSON bytes) and report how it went.

        `client_context` is the caller's ClientContext (Lambda Invoke API),
        the handler's `context.client_context`. `invoked_arn` is the ARN the
        caller named when it carries a qualifier (`NAME:$LATEST`), the
        handler's `context.invoked_function_arn`; None gives the function's
        own unqualified ARN. `trace_id` is the X-Ray trace header the call
        runs under (`_X_AMZN_TRACE_ID`); None: the runtime makes a new one.
        `stream` is a streaming caller's (InvokeWithResponseStream): a
        function that streams its response feeds it as it writes, and the
        result then holds none of it (faasd/streaming.py).

        With `wait` (the queues dispatching an event) it waits for a free
        concurrency slot instead of raising Throttled, and is refused from
        the start of a shutdown (stop_events); other calls only once the
        drain begins.

        Raises FunctionNotFound, Throttled (when `wait` is false, or the
        function's `concurrency` is 0) or ShuttingDown; every failure of the
        function itself is in the result.
        """
        if self.draining and (wait or self._calls_refused):
            raise ShuttingDown("faasd is shutting down")
        spec = self.spec(name)
        fn_limit = self.function_limit(spec)
        if wait and fn_limit.limit == 0:
            self._throttled(spec, "ReservedFunctionConcurrentInvocationLimitExceeded", source)
        if wait:
            await fn_limit.acquire()
            try:
                await self.global_limit.acquire()
            except BaseException:
                fn_limit.release()
                raise
            if self.draining:
                # It waited past the start of a drain: it must not start now
                # (the asynchronous queue keeps the event for the next start).
                self.global_limit.release()
                fn_limit.release()
                raise ShuttingDown("faasd is shutting down")
        else:
            if not fn_limit.try_acquire():
                self._throttled(spec, "ReservedFunctionConcurrentInvocationLimitExceeded", source)
            if not self.global_limit.try_acquire():
                fn_limit.release()
                self._throttled(spec, "ConcurrentInvocationLimitExceeded", source)
        self.inflight += 1
        self._idle.clear()
        try:
            # The spec may have changed while we waited for a slot.
            spec = self.registry.get(name) or spec
            invocation = await self._run(spec, event, request_id or new_request_id(), client_context,
                                         invoked_arn, trace_id, called=not wait, stream=stream)
        finally:
            self.inflight -= 1
            fn_limit.release()
            self.global_limit.release()
            if self.inflight == 0:
                self._idle.set()
        for observer in self.observers:
            try:
                observer(spec, invocation, source)
            except Exception:
                log.exception("invocation observer failed")
        return invocation

    def _throttled(self, spec: FunctionSpec, reason: str, source: str) -> NoReturn:
        for observer in self.throttle_observers:
            try:
                observer(spec, reason, source)
            except Exception:
                log.exception("throttle observer failed")
        raise Throttled(reason, "Rate Exceeded.")

    async def _run(self, spec: FunctionSpec, event: bytes, request_id: str,
                   client_context: dict | None = None, invoked_arn: str | None = None,
                   trace_id: str | None = None, called: bool = False,
                   stream: ResponseStream | None = None) -> Invocation:
        capture = LogCapture(self.logs, spec.name, request_id)
        invocation = Invocation(request_id=request_id, function=spec.name)
        if spec.load_error:
            error = FunctionError.from_load_error(spec.load_error, spec.runtime, spec.load_trace)
            # Found before any worker started: its init fails as a worker's would, and its
            # log is the same, from Lambda's INIT_START (belonging to no invocation) on;
            # the runtime would find it again in the invoke phase, in no time either.
            env = self.pool.env
            init_start = init_start_lines(spec, env.region, env.python)
            for line in init_start:
                self.logs.write_idle(spec.name, line)
            self._log_init_phase(capture, spec, error, 0.0, init_start)
            invocation.init_in_call = True
            self._fail_invoke_init(capture, invocation, spec, WorkerInitError(error, 0.0, []))
            return invocation
        pool = self.pool.get(spec)
        # The invoke phase's start: the call's, or that of the init Lambda tries again in it.
        started: float | None = None
        try:
            worker, cold = await pool.acquire()
        except HostShortage as exc:
            raise exc.refusal from None  # faasd's fault, not the function's: refused, a 503
        except WorkerInitError as exc:
            # Lambda reports the failed init phase, then tries the init once more in the
            # invoke phase of this call, in a new runtime.
            self._log_init_phase(capture, spec, exc.error, exc.init_ms, exc.logs)
            invocation.init_ms = exc.init_ms
            invocation.init_in_call = True
            started = time.perf_counter()
            try:
                worker = await pool.start_again()
            except HostShortage as again:
                raise again.refusal from None
            except WorkerInitError as again:
                invocation.duration_ms = (time.perf_counter() - started) * 1000
                self._fail_invoke_init(capture, invocation, spec, again)
                return invocation
            cold = True  # it served: a suppressed init, in the call's Duration (no Init Duration)
        if cold:
            invocation.init_ms = worker.init_ms
            capture.logged(worker.init_logs)
        platform = json_platform_log(spec)
        if platform is None:
            capture.opening(f"START RequestId: {request_id} Version: $LATEST")
        else:
            for line in platform.start(request_id):  # none where the system log level leaves it out
                capture.opening(line)
        if started is None:
            started = time.perf_counter()
        deadline = time.time() + spec.timeout_s
        result = None
        if called:
            self._called.add(worker)
        try:
            result = await worker.run(request_id, event, deadline, capture, client_context, invoked_arn,
                                      trace_id, stream)
        finally:
            self._called.discard(worker)
            invocation.duration_ms = (time.perf_counter() - started) * 1000
            pool.release(worker, result is not None and result.reusable)
        invocation.payload = result.payload
        invocation.error = result.error
        invocation.max_memory_mb = result.max_memory_mb
        if platform is not None:
            said = [result.error.message] if result.error is not None and result.error.kind != "error" else []
            capture(*said, *platform.done(invocation))
            invocation.log_lines = capture.lines
            return invocation
        end = f"END RequestId: {request_id}"
        if result.error is not None and result.error.kind != "error":
            capture(result.error.message, end, self._report(spec, invocation))
        else:
            capture(end, self._report(spec, invocation))
        invocation.log_lines = capture.lines
        return invocation

    @staticmethod
    def _init_error(error: FunctionError, request_id: str) -> FunctionError:
        """A failed init's error as the caller gets it. One the runtime reported is its
        document; one Lambda finds itself (the runtime exited, cannot be started, ...) is
        in Lambda's words for the call it failed, as it reports a runtime that exits during
        a call: `RequestId: ID Error: Runtime exited with error: exit status 1`."""
        if error.document is not None:
            return error
        return dataclasses.replace(error, message=f"RequestId: {request_id} Error: {error.message}")

    def _log_init_phase(self, capture: LogCapture, spec: FunctionSpec, error: FunctionError,
                        init_ms: float, init_logs: list[str], phase: str = "init") -> None:
        """A failed init, in Lambda's `phase`: what the worker printed while it started, the
        runtime's record of its error, and Lambda's report of the init (INIT_REPORT)."""
        capture.logged(init_logs)
        # The runtime logs the error while it initialises (awslambdaric's log_error, then
        # its post_init_error); Lambda reports the init once it has ended. An error Lambda
        # found itself is no runtime's record: its words are a line of the call.
        capture(*self._init_error_lines(spec, error, capture.request_id))
        platform = json_platform_log(spec)
        if platform is not None:
            capture(*platform.init_report(error, init_ms, phase))
        else:
            capture(f"INIT_REPORT Init Duration: {init_ms:.2f} ms\tPhase: {phase}\t"
                    f"Status: error\tError Type: {error.error_type}")

    def _fail_invoke_init(self, capture: LogCapture, invocation: Invocation, spec: FunctionSpec,
                          failure: WorkerInitError) -> None:
        """The init Lambda tried again in the call's invoke phase failed too: its report
        (INIT_REPORT, `Phase: invoke`), then the call's START, END and REPORT."""
        self._log_init_phase(capture, spec, failure.error, failure.init_ms, failure.logs, "invoke")
        error = invocation.error = self._init_error(failure.error, invocation.request_id)
        said = [error.message] if error.document is None else []
        platform = json_platform_log(spec)
        if platform is not None:
            capture(*platform.start(invocation.request_id), *said, *platform.done(invocation))
        else:
            capture(f"START RequestId: {invocation.request_id} Version: $LATEST", *said,
                    f"END RequestId: {invocation.request_id}", self._report(spec, invocation, status="error"))
        invocation.log_lines = capture.lines

    def _init_error_lines(self, spec: FunctionSpec, error: FunctionError, request_id: str) -> list[str]:
        """What the runtime logs of its failed init, in the function's log format: nothing
        where it reported none (it exited, or never started)."""
        if error.document is None:
            return []
        python = spec.runtime == "python"
        # awslambdaric warns of an error it caught in its init (not of one faasd's
        # sandbox reports: that is no error of the code), at WARNING on the root logger.
        warns = python and error.error_type != SETUP_ERROR
        if spec.log_format == "JSON":
            level = spec.application_log_level
            if level == "FATAL":
                return []  # the one level that leaves an ERROR record out
            if python:
                seconds = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # awslambdaric's stamp
                lines = []
                # Byte for byte as the worker's Python would write them: the Python
                # runtime's own encoders, with its separators and its escapes.
                if warns and level != "ERROR":
                    # As its JsonFormatter writes a `logging.warning` of the root logger.
                    lines.append(logging_json({
                        "timestamp": seconds, "level": "WARNING", "message": UNHANDLED_WARNING,
                        "logger": "root", "requestId": ""}))
                # awslambdaric's log_error in JSON: its error document after the timestamp
                # and the level. make_error gives an init error no request id:
                # "requestId": "" (the invocation's id is not known during init).
                document = {"errorMessage": error.message, "errorType": error.error_type, "requestId": "",
                            "stackTrace": error.stack_trace}
                version = python_interpreter(self.pool.env.python).version
                lines.append(error_log_json(document, seconds, ensure_ascii(version)))
                return lines
            return [orjson.dumps({
                "timestamp": iso_now(), "level": "ERROR", "errorMessage": error.message,
                "errorType": error.error_type, "requestId": request_id,
                "stackTrace": error.stack_trace}).decode()]
        if python:
            # An error the Python runtime reports itself (or that the daemon's look at
            # the code found first): logged as awslambdaric logs the init errors it catches,
            # after its warning in Lambda's Text format for `logging` (the root logger is at
            # WARNING in Text logs; the request id is empty during init).
            record = error_log_record(error.error_type, error.message, error.stack_trace)
            return [f"[WARNING]\t{iso_now()}\t\t{UNHANDLED_WARNING}", record] if warns else [record]
        return [f"[ERROR] {error.error_type}: {error.message}"]

    @staticmethod
    def _report(spec: FunctionSpec, invocation: Invocation, status: str | None = None) -> str:
        duration = invocation.duration_ms
        init = invocation.reported_init_ms
        billed = billed_ms(duration, init)
        line = (f"REPORT RequestId: {invocation.request_id}\tDuration: {duration:.2f} ms\t"
                f"Billed Duration: {billed} ms\t"
                f"Memory Size: {spec.memory_mb} MB\tMax Memory Used: {invocation.max_memory_mb} MB")
        if init is not None:
            line += f"\tInit Duration: {init:.2f} ms"
        error = invocation.error
        if status is None and error is not None and error.kind in ("timeout", "oom", "crash"):
            status = {"timeout": "timeout", "oom": "error", "crash": "error"}[error.kind]
        if status:
            line += f"\tStatus: {status}"
            if error is not None and error.kind != "timeout":
                line += f"\tError Type: {error.error_type}"
        return line

    def stop_events(self) -> None:
        """From now on no queued event starts: its dispatch raises ShuttingDown and
        it waits for the next start. Synchronous calls (HTTP requests the server
        has already read) still run, until drain()."""
        self.draining = True

    def stop_calls(self, why: str) -> int:
        """The drain is over (`why`, for the calls' errors): end each synchronous call still
        running as failed (its worker is killed), so that its caller gets an answer and its
        log its END and REPORT. A call still waiting for a worker (a cold start) never started:
        it is refused as faasd shuts down, a queued event back to its queue. Queued events
        that run are left to be cancelled: they wait for the next start. How many running
        calls it ended."""
        self.pool.refuse_waiting()
        for worker in list(self._called):
            worker.stop_call(why)
        return len(self._called)

    async def drain(self, timeout: float) -> bool:
        """Refuse new calls; wait up to `timeout` for in-flight ones. True if all ended."""
        self.stop_events()
        self._calls_refused = True
        if self._idle.is_set():  # wait_for with no time left would say it timed out
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
