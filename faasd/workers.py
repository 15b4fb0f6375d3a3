"""One worker process, seen from the daemon: spawn, invoke, freeze, thaw, stop.

A `Worker` owns its process (a process group of its own), its control
socket, its output pipe, its tmp dir and its memory cgroup. It serves one
function revision and one invocation at a time. It never decides its own
fate: the pool (faasd/pool.py) moves it between states, and the invoker
(faasd/invoker.py) tells it what to run. How it runs is the runtime's
business: `ProcessWorker` speaks faasd/protocol.py to a shim (Python, Node);
`runtime_api.ProvidedWorker` serves a custom `bootstrap` the Lambda Runtime
API through the same frames (the `_open_control` and `_send` hooks); other
runtimes may subclass `Worker`. Runtimes register in `WORKER_FACTORIES`.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import errno
import functools
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import orjson

from . import protocol
from .errors import CRASH, HANDLED, INIT, OUT_OF_MEMORY, TIMEOUT, FunctionError, ServiceUnavailable
from .limits import (
    MB, MemoryLimits, ProcessTree, WorkerCgroup, process_cpu_ms, remove_when_empty, rss_bytes,
)
from .platform_log import init_start_lines
from .sandbox import (
    EXEC_FAILED, EXEC_FAILED_STATUS, PLAN_ENV, SETUP_ERROR, FunctionUsers, MountNamespace, Sandbox,
    SandboxError, WorkerPlan, join_cgroups_of, parent_moves, private_tmpfs_usage, read_pids,
)
from .spec import DEFAULT_REGION, FunctionSpec, function_arn, python_interpreter, runtime_id
from .streaming import ResponseStream
from .triggers.options import file_trigger_dirs  # a file trigger's dir is its function's bucket

log = logging.getLogger("faasd.worker")

RUNTIME_DIR = Path(__file__).parent / "runtimes"
MONITOR_INTERVAL_S = 0.05
TMP_CHECK_INTERVAL_S = 0.25  # how often a plain-directory /tmp is measured during a call
MAX_LOG_BYTES = 1024 * 1024  # output kept per invocation; the rest is dropped with a marker
# ... but for its last lines, kept past it and written when the call ends:
# they hold what ended it (an error's traceback, a timeout's last words).
KEEP_LAST_LINES = 50
KEEP_LAST_LINE_BYTES = 16 * 1024  # each cut to this
MAX_PARTIAL_LINE = 256 * 1024  # a line without end is cut here, not held on to
STOP_GRACE_S = 1.0
INIT_TIMEOUT_S = 10.0  # Lambda's init phase limit
# The PATH workers get: the daemon's own PATH may name private directories.
WORKER_PATH = "/usr/local/bin:/usr/bin:/bin"


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    FROZEN = "frozen"
    RETIRING = "retiring"


class WorkerInitError(Exception):
    """The worker could not load the function."""

    def __init__(self, error: FunctionError, init_ms: float, logs: list[str]) -> None:
        super().__init__(f"{error.error_type}: {error.message}")
        self.error = error
        self.init_ms = init_ms
        self.logs = logs


# A worker start that fails for one of these lacks something the host gives; and the fix.
HOST_SHORTAGES = {
    errno.EMFILE: "raise faasd's limit on open files (LimitNOFILE= in faasd.service, or ulimit -n)",
    errno.ENFILE: "the system's table of open files is full: raise fs.file-max",
    errno.EAGAIN: "the system refused a new process: raise its process limits (ulimit -u, kernel.pid_max)",
    errno.ENOMEM: "the system is out of memory",
    errno.ENOSPC: "the data dir's disk is full",
}


class HostShortage(WorkerInitError):
    """A worker could not start for lack of something the host gives: faasd's fault, not
    the function's. Its call is refused (`refusal`, a 503 ServiceException); it is no init
    error of the function, and says nothing of its code."""

    def __init__(self, exc: OSError) -> None:
        message = f"faasd cannot start a worker: {exc.strerror}; {HOST_SHORTAGES[exc.errno]}"
        super().__init__(FunctionError(INIT, ServiceUnavailable.error_type, message), 0.0, [])
        self.refusal = ServiceUnavailable(message)


class Occasional:
    """A fault that recurs in bursts, logged at most once every `every_s` seconds."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0) -> None:
        self.logger = logger
        self.every_s = every_s
        self._said_at = float("-inf")
        self._since = 0  # times it happened since it was last said

    def error(self, message: str, *args: object) -> bool:
        """Log it, unless it was said less than `every_s` ago; whether it was."""
        now = time.monotonic()
        if now - self._said_at < self.every_s:
            self._since += 1
            return False
        if self._since:
            message += f" (and {self._since} times more since it was last said)"
        self.logger.error(message, *args)
        self._said_at, self._since = now, 0
        return True


def start_failure(exc: BaseException, init_ms: float = 0.0, logs: Iterable[str] = ()) -> WorkerInitError:
    """What a worker start that raised `exc` fails with: a WorkerInitError as it is, a
    HostShortage for what the host lacks, else Runtime.InvalidEntrypoint."""
    if isinstance(exc, WorkerInitError):
        return exc
    if isinstance(exc, OSError) and exc.errno in HOST_SHORTAGES:
        return HostShortage(exc)
    return WorkerInitError(FunctionError(INIT, "Runtime.InvalidEntrypoint", f"cannot start the runtime: {exc}"),
                           init_ms, list(logs))


@dataclass(slots=True)
class RunResult:
    payload: bytes | None
    error: FunctionError | None
    max_memory_mb: int
    reusable: bool


class ReplyPoller:
    """Keeps the event loop polling, not sleeping, for a short while after a call is written.

    At low load the daemon has nothing to do while a worker runs a call: its
    event loop sleeps in epoll_wait, and the worker's reply has to wake its
    core again. On a VM waking an idle core takes tens of microseconds, paid
    on every call. Instead, for up to `window_s` after a call is written, the
    loop keeps a callback ready, so it polls (epoll_wait with no timeout) and
    reads a quick reply as soon as it lands; past the window it sleeps as
    before. A worker whose last reply took longer than the window is not
    polled for, so a slow function costs no polling at all, and a fast one
    at most `window_s` of the daemon's CPU a call. With more calls in flight
    than the cores the daemon may use beside its own (none on one core), it
    does not poll either: the workers need every core, and a loop that
    sleeps now and then reads several replies per wake-up.
    """

    def __init__(self, window_s: float, max_waiting: int | None = None) -> None:
        self.window_s = window_s
        if max_waiting is None:
            # The cores this daemon may run on, less its own; on one core it never polls.
            max_waiting = len(os.sched_getaffinity(0)) - 1
        self.max_waiting = max_waiting
        self._waiting = 0  # calls written and polled for, not yet answered
        # time.monotonic() when polling stops (uvloop's loop.time() counts whole milliseconds)
        self._until = 0.0
        self._polling = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def would_poll(self, last_reply_s: float) -> bool:
        """Whether a call written now, to a worker whose previous call took
        `last_reply_s` to answer, would be polled for."""
        return last_reply_s <= self.window_s and self._waiting < self.max_waiting

    def begin(self, last_reply_s: float) -> bool:
        """A call was written to a worker whose previous call took `last_reply_s`
        to answer (0 for its first). Unless that was longer than the window,
        poll for up to window_s from now and return True: end() must follow."""
        if last_reply_s > self.window_s:
            return False
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._waiting += 1
        self._until = time.monotonic() + self.window_s
        if not self._polling:
            self._polling = True
            loop.call_soon(self._poll)
        return True

    def end(self) -> None:
        """Its reply came (or the call ended otherwise)."""
        self._waiting -= 1

    def _poll(self) -> None:
        if 0 < self._waiting <= self.max_waiting and time.monotonic() < self._until:
            self._loop.call_soon(self._poll)  # type: ignore[union-attr]
        else:
            self._polling = False


@dataclass(frozen=True, kw_only=True)
class WorkerEnvironment:
    """What every worker of this daemon shares: where to put things, as whom to run."""

    data_dir: Path
    memory: MemoryLimits
    region: str = DEFAULT_REGION
    run_as: tuple[int, int] | None = None  # (uid, gid)
    python: str = sys.executable
    node: str | None = None
    # Namespaces, /tmp, rlimits, user (faasd/sandbox.py); None: spawn unconfined.
    sandbox: Sandbox | None = None
    # A uid for each function ([workers] function_users); None: all run as run_as.
    users: FunctionUsers | None = None
    # Polls for quick replies ([workers] reply_poll_us); None: the loop sleeps at once.
    replies: ReplyPoller | None = None
    # Where a worker's output outside any invocation goes, as idle_log(function, line):
    # the function's log (FunctionLogs.write_idle); None: the daemon's own log.
    idle_log: Callable[[str, str], None] | None = None

    def identity(self, function: str) -> tuple[int, int] | None:
        """(uid, gid) the workers of `function` run as; None: the daemon's own.
        Raises SandboxError when function_users has no uid left."""
        if self.users is not None and self.run_as is not None:
            return self.users.identity(function)
        return self.run_as

    @property
    def tmp_root(self) -> Path:
        return self.data_dir / "workers"


_ids = itertools.count(1)

LineSink = Callable[[str], None]


def describe_exit(returncode: int | None) -> str:
    """Lambda's wording for how a runtime process ended (exit status 0 gives no reason)."""
    if returncode is None or returncode == 0:
        return "Runtime exited without providing a reason"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        words = {
            "SIGKILL": "killed", "SIGSEGV": "segmentation fault", "SIGABRT": "aborted",
            "SIGTERM": "terminated", "SIGBUS": "bus error", "SIGILL": "illegal instruction",
            "SIGFPE": "floating point exception", "SIGINT": "interrupt",
        }
        return f"Runtime exited with error: signal: {words.get(name, name)}"
    return f"Runtime exited with error: exit status {returncode}"


class Worker:
    """Base: state and bookkeeping common to every runtime's worker."""

    # Lambda's phase its init runs in: "init" for a new execution environment, whose
    # log opens with INIT_START; "invoke" for Lambda's second try of a failed init,
    # within the call it failed for, of which Lambda's log has no INIT_START.
    init_phase = "init"

    def __init__(self, spec: FunctionSpec, env: WorkerEnvironment) -> None:
        self.spec = spec
        self.env = env
        self.id = f"{spec.name}-{os.getpid()}-{next(_ids)}"
        self.state = WorkerState.STARTING
        self.pid: int | None = None
        self.started_at = time.time()
        self.state_since = time.monotonic()
        self.init_ms: float | None = None
        self.init_cpu_ms: float | None = None  # CPU time the process spent getting ready
        self.invocations = 0
        # Stopped by freeze() and not yet thawed. The pool hands a frozen
        # worker out still stopped; run() thaws it once the call is written.
        self.frozen = False
        self.last_reply_s = 0.0  # how long its last call took to answer (0: none yet)
        self.tmp_dir = env.tmp_root / self.id
        # context.log_stream_name, as Lambda names an execution environment's stream
        self.log_stream = time.strftime("%Y/%m/%d/[$LATEST]", time.gmtime()) + os.urandom(16).hex()
        # context.invoked_function_arn, unless the caller named a qualifier
        self.arn = function_arn(spec.name, env.region)
        self.cgroup: WorkerCgroup | None = None
        self.sandbox: WorkerPlan | None = None
        self.returncode: int | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # Output printed outside any invocation (at init, between calls) goes here.
        if env.idle_log is not None:
            self.idle_sink: LineSink = functools.partial(env.idle_log, spec.name)
        else:
            self.idle_sink = lambda line: log.info("[%s] %s", spec.name, line)
        # What it printed while it started: in the function's log as it came, and
        # kept for the tail of the call it was started for, or for its init error.
        self.init_logs: list[str] = []

    def set_state(self, state: WorkerState) -> None:
        self.state = state
        self.state_since = time.monotonic()

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def to_json(self) -> dict:
        return {
            "id": self.id, "pid": self.pid, "state": self.state.value,
            "revision": self.spec.revision, "invocations": self.invocations,
            "init_ms": None if self.init_ms is None else round(self.init_ms, 3),
            "started_at": self.started_at,
            "state_for_s": round(time.monotonic() - self.state_since, 3),
            "tmp_dir": str(self.tmp_dir),
        }

    def base_environment(self) -> dict[str, str]:
        """Lambda's reserved variables plus the function's [env]; nothing of the daemon's."""
        spec = self.spec
        env = {
            "PATH": WORKER_PATH,
            "LANG": "C.UTF-8",
            "TZ": ":UTC",
            **spec.env,
            "AWS_LAMBDA_FUNCTION_NAME": spec.name,
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": self.log_stream,
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "AWS_LAMBDA_LOG_FORMAT": spec.log_format,
            "AWS_REGION": self.env.region,
            "AWS_DEFAULT_REGION": self.env.region,
            "_HANDLER": spec.handler,
            "LAMBDA_TASK_ROOT": str(spec.task_root),
            "LAMBDA_RUNTIME_DIR": str(RUNTIME_DIR),
            "TMPDIR": str(self.tmp_dir),
        }
        if spec.application_log_level is not None:  # JSON logs: what the runtime lets through
            env["AWS_LAMBDA_LOG_LEVEL"] = spec.application_log_level
        if spec.runtime != "provided":  # Lambda's OS-only runtimes leave it unset
            env["AWS_EXECUTION_ENV"] = f"AWS_Lambda_{runtime_id(spec.runtime, self.env.python)}"
        return env

    # Subclasses implement these.
    async def start(self) -> None:
        raise NotImplementedError

    async def run(self, request_id: str, event: bytes, deadline: float, sink: LineSink,
                  client_context: dict | None = None, invoked_arn: str | None = None,
                  trace_id: str | None = None, stream: ResponseStream | None = None) -> RunResult:
        """Run one invocation. `deadline` is in epoch seconds; `invoked_arn`
        is context.invoked_function_arn when not the function's own (`arn`);
        `trace_id` the X-Ray trace header, when the runtime is not to make one.
        With `stream` (a caller that streams), a streamed response goes there
        piece by piece as the function writes it, and is not in the result;
        without, it is the result, held to the 6 MB of a buffered response."""
        raise NotImplementedError

    def freeze(self) -> None:
        raise NotImplementedError

    def thaw(self) -> None:
        """Undo freeze(). run() calls it for a worker still frozen when taken."""
        raise NotImplementedError

    def wake(self) -> None:
        """A call for this idle worker is probably on its way: get its core up.
        Optional; by default nothing."""

    def stop_call(self, why: str) -> None:
        """faasd stops and the call in flight has outlived the drain (`why`, for its error):
        end it as failed. By default nothing (it is cancelled with its request)."""

    async def stop(self) -> None:
        raise NotImplementedError


class _Call:
    """The invocation in flight on a ProcessWorker."""

    __slots__ = ("request_id", "future", "sink", "oom", "timed_out", "fatal", "tmp_full", "stopped",
                 "log_bytes", "last_lines", "left_out", "stream", "parts", "streamed")

    def __init__(self, request_id: str, future: asyncio.Future, sink: LineSink,
                 stream: ResponseStream | None = None) -> None:
        self.request_id = request_id
        self.future = future
        self.sink = sink
        self.stream = stream  # the caller's, for a streamed response; None: it is kept in parts
        self.parts: list[bytes] = []  # a streamed response's pieces, while within MAX_RESPONSE_BYTES
        self.streamed = 0  # bytes of streamed response so far
        self.oom = False
        self.timed_out = False
        self.fatal = False  # the runtime said it exits after this call's error
        self.tmp_full = False  # /tmp (a plain directory) passed tmp_mb
        self.stopped: str | None = None  # killed as faasd stopped: why, for its error
        self.log_bytes = 0  # output so far, against MAX_LOG_BYTES
        self.last_lines: collections.deque[str] | None = None  # past it: the latest lines
        self.left_out = 0  # lines past MAX_LOG_BYTES, kept or not

    def keep_last(self, line: str) -> None:
        """A line past MAX_LOG_BYTES: among the last ones, written at the end."""
        if self.last_lines is None:
            self.last_lines = collections.deque(maxlen=KEEP_LAST_LINES)
        self.left_out += 1
        self.last_lines.append(line[:KEEP_LAST_LINE_BYTES])

    def write_last(self) -> None:
        """The last lines past MAX_LOG_BYTES, after a line that counts what was left out."""
        kept = self.last_lines
        if not kept:
            return
        self.last_lines = None
        self.sink(f"[faasd: {self.left_out - len(kept)} lines of this invocation were left out; "
                  f"its last {len(kept)} follow]")
        for line in kept:
            self.sink(line)


class _Control(asyncio.Protocol):
    def __init__(self, worker: "ProcessWorker") -> None:
        self.worker = worker
        self.decoder = protocol.FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except protocol.ProtocolError as exc:
            log.error("worker %s broke the protocol: %s; killing it", self.worker.id, exc)
            self.worker.kill()
            return
        for kind, payload in frames:
            self.worker._on_frame(kind, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker._on_control_lost()


class _Output(asyncio.Protocol):
    """The worker's fds 1 and 2: raw lines, attributed to the call in flight."""

    def __init__(self, worker: "ProcessWorker") -> None:
        self.worker = worker
        self.partial = b""

    def data_received(self, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > MAX_PARTIAL_LINE:  # a line without end: cut it
            lines.append(self.partial)
            self.partial = b""
        for line in lines:
            self.worker._on_output(line.decode("utf-8", "backslashreplace"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.flush()

    def flush(self) -> None:
        """Hand over a last line that has no newline (yet)."""
        if self.partial:
            self.worker._on_output(self.partial.decode("utf-8", "backslashreplace"))
            self.partial = b""


class ProcessWorker(Worker):
    """A worker running a shim that speaks faasd/protocol.py on fd 3."""

    def __init__(self, spec: FunctionSpec, env: WorkerEnvironment, command: list[str],
                 extra_env: dict[str, str] | None = None) -> None:
        super().__init__(spec, env)
        self.command = command
        self.extra_env = extra_env or {}  # runtime plumbing the shim removes before user code
        self.identity: tuple[int, int] | None = None  # (uid, gid) it runs as; None: the daemon's
        self.popen: subprocess.Popen | None = None
        self._control: _Control | None = None
        self._output_transport: asyncio.BaseTransport | None = None
        self._output: _Output | None = None
        self._pidfd: int | None = None
        self._stopped_strays: list[int] = []  # what freeze() stopped outside the process group
        self._freezes = 0  # freeze() calls so far: a scan for strays stops them in its own only
        # Without a cgroup, the scan for strays that freeze() starts (held: a task must be)
        self._finding_strays: asyncio.Task | None = None
        # Without a memory cgroup: the mount namespace it made itself, which
        # holds every process it starts (what a pids cgroup would), once known.
        self.namespace: MountNamespace | None = None
        self._tree: ProcessTree | None = None  # its processes, for the memory monitor
        self._ready: asyncio.Future | None = None
        self._call: _Call | None = None
        self._deadline_handle: asyncio.TimerHandle | None = None
        self._monitor_handle: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        # This call's peak memory in KiB: its STATS frame, or read before the
        # daemon killed the worker. None: read it when the call ends.
        self._peak_kb: int | None = None
        self._idle_log_bytes = 0  # output outside invocations, against MAX_LOG_BYTES
        self._log_partial = ""  # the start of a line a LOG frame left unfinished

    def environment(self) -> dict[str, str]:
        env = self.base_environment()
        env.update(self.extra_env)
        env["_FAASD_PARENT_PID"] = str(os.getpid())
        return env

    async def start(self) -> None:
        loop = self._loop
        started = time.monotonic()
        self._log_init_start()
        try:
            self.identity = self.env.identity(self.spec.name)
        except SandboxError as exc:
            raise WorkerInitError(FunctionError(INIT, SETUP_ERROR, str(exc)), 0.0,
                                  list(self.init_logs)) from None
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        if self.identity:
            os.chown(self.tmp_dir, *self.identity)
        os.chmod(self.tmp_dir, 0o700)
        # Created first: the process may say READY as soon as it runs.
        self._ready = loop.create_future()
        child_sock = await self._open_control()
        child_env = self.environment()
        if child_sock is not None:
            child_env[protocol.CONTROL_FD_ENV] = str(child_sock.fileno())
        # The cgroup exists before the process does: the process joins it
        # itself, before any user code can fork.
        self.cgroup = self.env.memory.create(self.id, self.spec.memory_mb)
        command, credentials = self.command, self._credentials()
        if self.env.sandbox is not None:
            # The process isolates itself (and drops to run_as) before user code.
            self.sandbox = self.env.sandbox.prepare(
                worker_id=self.id, task_root=self.spec.task_root, tmp_dir=self.tmp_dir,
                tmp_mb=self.spec.tmp_mb, memory_cgroup=self.cgroup,
                visible=child_env.get(SITE_PATH_ENV, "").split(os.pathsep)
                + file_trigger_dirs(self.spec, self.env.data_dir, self.identity), user=self.identity)
            command, credentials = self.sandbox.wrap(self.command), {}
            child_env[PLAN_ENV] = self.sandbox.environment(
                child_sock.fileno() if child_sock is not None else None)
        out_read, out_write = os.pipe()
        try:
            self.popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out_write,
                stderr=out_write,
                pass_fds=(child_sock.fileno(),) if child_sock is not None else (),
                cwd=self.spec.task_root,
                env=child_env,
                process_group=0,
                close_fds=True,
                **credentials,
            )
        except Exception as exc:  # OSError, or ValueError for a NUL in an argument or variable
            os.close(out_read)
            raise start_failure(exc, (time.monotonic() - started) * 1000, self.init_logs) from None
        finally:
            if child_sock is not None:
                child_sock.close()
            os.close(out_write)
        self.pid = self.popen.pid
        self._pidfd = os.pidfd_open(self.pid)
        loop.add_reader(self._pidfd, self._on_exit)
        joining = None
        moves = parent_moves(self.sandbox.plan["cgroups"]) if self.sandbox is not None else []
        if moves:
            # Moved while its interpreter starts (cgroup v2; it joins v1
            # groups by itself). It waits for this before user code runs, and
            # joins by itself what is not done in time.
            joining = loop.create_task(self._join_cgroups(moves))
        elif self.cgroup is not None and self.sandbox is None:
            try:
                await asyncio.to_thread(self.cgroup.add, self.pid)  # blocks ~15 ms on cgroup v1
            except OSError as exc:
                log.warning("cannot move worker %s into its cgroup: %s", self.id, exc)
                self.cgroup.remove()
                self.cgroup = None
        try:
            await self._await_ready(out_read, started)
        finally:
            if joining is not None:
                await joining

    async def _join_cgroups(self, procs_files: list[str]) -> None:
        try:
            await asyncio.to_thread(join_cgroups_of, self.pid, procs_files)
        except OSError as exc:
            # The process joins by itself after a while, or reports why it cannot.
            log.debug("could not move worker %s into its cgroups: %s", self.id, exc)

    async def _await_ready(self, output_fd: int, started: float) -> None:
        """Read the process's output from `output_fd`; wait for its READY; set init_ms."""
        if self.cgroup is None and self.pid is not None:
            self._tree = ProcessTree(self.pid)  # before it can start a process
        self._output_transport, self._output = await self._loop.connect_read_pipe(
            lambda: _Output(self), os.fdopen(output_fd, "rb", buffering=0))
        # As Lambda: 10 s to initialise, or the function's timeout if longer.
        init_timeout = max(INIT_TIMEOUT_S, self.spec.timeout_s)
        try:
            await asyncio.wait_for(self._ready, init_timeout)
        except WorkerInitError as exc:
            # Failed inits are billed and reported too: INIT_REPORT's duration.
            exc.init_ms = exc.init_ms or (time.monotonic() - started) * 1000
            await self._wait_exit(STOP_GRACE_S)
            self.kill()
            raise
        except asyncio.TimeoutError:
            self.kill()
            error = FunctionError(INIT, "Sandbox.Timedout",
                                  f"Init timed out after {init_timeout:.2f} seconds: {self.init_hint}")
            raise WorkerInitError(error, (time.monotonic() - started) * 1000,
                                  list(self.init_logs)) from None
        self.init_ms = (time.monotonic() - started) * 1000
        self.init_cpu_ms = process_cpu_ms(self.pid) if self.pid else None

    # What a process that never says READY failed to do, for the init timeout error.
    init_hint = "the function's initialisation code did not finish"

    async def _open_control(self) -> socket.socket | None:
        """Open the control channel; return the socket the process inherits (None: none)."""
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        _, self._control = await self._loop.connect_accepted_socket(lambda: _Control(self), parent_sock)
        return child_sock

    def _send(self, kind: int, payload: bytes = b"") -> bool:
        """Write one frame to the process; False when the channel is closed."""
        transport = self._control.transport if self._control is not None else None
        if transport is None or transport.is_closing():
            return False
        transport.write(protocol.encode(kind, payload))
        return True

    def to_json(self) -> dict:
        view = super().to_json()
        view["uid"] = self.identity[0] if self.identity is not None else os.getuid()
        return view

    def _credentials(self) -> dict:
        if self.identity is None:
            return {}
        uid, gid = self.identity
        return {"user": uid, "group": gid, "extra_groups": []}

    # -- events from the process -------------------------------------------------

    def _on_frame(self, kind: int, payload: bytes) -> None:
        call = self._call
        if kind == protocol.STATS:
            if len(payload) >= 4:
                # What the monitor saw (children alive, /tmp) may be more.
                self._peak_kb = max(self._peak_kb or 0, int.from_bytes(payload[:4], "big"))
        elif kind == protocol.LOG:
            # A frame ends in a newline unless the function flush()ed in the
            # middle of a line: that part waits for the rest of its line.
            lines = (self._log_partial + payload.decode("utf-8", "backslashreplace")).split("\n")
            partial = self._log_partial = lines.pop()
            if len(partial) > MAX_PARTIAL_LINE:
                lines.append(partial)
                self._log_partial = ""
            for line in lines:
                self._on_output(line)
        elif kind == protocol.CHUNK:
            self._on_chunk(payload)
        elif kind == protocol.RESULT or kind == protocol.ERROR:
            if call is None or call.future.done():
                log.warning("worker %s sent a reply with no invocation in flight", self.id)
                return
            if kind == protocol.RESULT and call.streamed:
                self._end_stream(call, payload)
            elif kind == protocol.RESULT and len(payload) > protocol.MAX_RESPONSE_BYTES:
                # Every runtime's shim should refuse this itself; the daemon makes sure.
                call.future.set_result((None, FunctionError(
                    HANDLED, "Function.ResponseSizeTooLarge", protocol.RESPONSE_TOO_LARGE)))
            elif kind == protocol.RESULT:
                call.future.set_result((payload, None))
            else:
                data = _loads(payload)
                fatal = data.pop("fatal", False) is True
                self._fail_call(FunctionError.from_payload(HANDLED, data), fatal)
        elif kind == protocol.READY:
            if self._ready is not None and not self._ready.done():
                self._end_log_line()  # what it printed before READY is its init's
                self._drain_output()
                self._find_namespace()
                if self.cgroup is None and self._out_of_memory_at_init():
                    return  # _ready holds its init error
                self._ready.set_result(None)
        elif kind == protocol.INIT_ERROR:
            self._end_log_line()
            self._fail_init(FunctionError.from_payload(INIT, _loads(payload)))
        else:
            log.warning("worker %s sent an unknown frame kind %d", self.id, kind)

    def _on_chunk(self, data: bytes) -> None:
        """A piece of the call's streamed response: on to a caller that streams, as it
        comes, or kept for the result (counted only, past a buffered response's limit)."""
        call = self._call
        if call is None or call.future.done() or not data:
            return
        call.streamed += len(data)
        if call.stream is not None:
            call.stream.feed(data)
        elif call.streamed <= protocol.MAX_RESPONSE_BYTES:
            call.parts.append(data)

    def _end_stream(self, call: _Call, rest: bytes) -> None:
        """A streamed response has ended well (`rest`: its last bytes, if any): the
        call's result is what the caller has not had of it."""
        self._on_chunk(rest)
        limit = protocol.MAX_RESPONSE_BYTES if call.stream is None else call.stream.limit
        if call.streamed > limit:
            call.future.set_result((None, FunctionError(
                HANDLED, "Function.ResponseSizeTooLarge", protocol.response_too_large(limit))))
        elif call.stream is not None:
            call.future.set_result((None, None))
        else:
            call.future.set_result((b"".join(call.parts), None))

    def response_limit(self) -> int:
        """The most bytes the call in flight may stream: a streaming caller's limit, or a
        buffered response's."""
        call = self._call
        return call.stream.limit if call is not None and call.stream is not None else protocol.MAX_RESPONSE_BYTES

    async def chunk_room(self) -> None:
        """Wait while a streaming caller has not taken what the call streamed so far."""
        call = self._call
        if call is not None and call.stream is not None:
            await call.stream.drained()

    def _pause_reading(self, paused: bool) -> None:
        """Backpressure from a streaming caller: stop reading the worker's frames, or go on."""
        transport = self._control.transport if self._control is not None else None
        if transport is None or transport.is_closing():
            return
        if paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _fail_call(self, error: FunctionError, fatal: bool = False) -> None:
        """The runtime reported the call in flight failed (`fatal`: and it exits)."""
        call = self._call
        if call is None or call.future.done():
            log.warning("worker %s sent a reply with no invocation in flight", self.id)
            return
        call.fatal = fatal
        call.future.set_result((None, error))

    def _fail_init(self, error: FunctionError) -> None:
        """The runtime reported it could not load the function."""
        if self._ready is not None and not self._ready.done():
            self._find_namespace()  # before it exits: its init may have left processes
            self._ready.set_exception(WorkerInitError(error, 0.0, list(self.init_logs)))

    def _on_output(self, line: str) -> None:
        call = self._call
        if call is not None:
            # A flood of output would fill the disk with this function's log:
            # past the budget, lines are counted and dropped.
            call.log_bytes += len(line) + 1
            if call.log_bytes <= MAX_LOG_BYTES:
                call.sink(line)
                return
            if call.last_lines is None:
                call.sink(f"[faasd: output truncated: this invocation printed more than "
                          f"{MAX_LOG_BYTES} bytes; the rest is dropped but for its last lines, "
                          "written when it ends]")
            call.keep_last(line)
        else:
            self._idle_log_bytes += len(line) + 1
            if self._idle_log_bytes > MAX_LOG_BYTES:
                if self._idle_log_bytes - len(line) - 1 <= MAX_LOG_BYTES:
                    self.idle_sink(f"[faasd: output truncated: more than {MAX_LOG_BYTES} bytes "
                                   "printed outside an invocation; the rest is dropped]")
                return
            if self.state is WorkerState.STARTING:
                self._log_init(line)
            else:
                self.idle_sink(line)

    def _end_log_line(self) -> None:
        """Hand over a LOG line still waiting for its newline: it belongs to what
        ends now (the call, the init, the process)."""
        if self._log_partial:
            line, self._log_partial = self._log_partial, ""
            self._on_output(line)

    def _log_init(self, line: str) -> None:
        """A line printed while the worker starts: logged now, and kept (the first 1000)."""
        if len(self.init_logs) < 1000:
            self.init_logs.append(line)
        self.idle_sink(line)

    def _log_init_start(self) -> None:
        """Lambda's first line of a new execution environment: the runtime version it runs."""
        if self.init_phase != "init":
            return
        for line in init_start_lines(self.spec, self.env.region, self.env.python):
            self._log_init(line)

    def _on_control_lost(self) -> None:
        # The process closed its socket: it exited or is about to. The pidfd
        # tells us how; give it a moment before failing the call without a code.
        self._end_log_line()
        if self._ready is not None and not self._ready.done():
            self._loop.create_task(self._fail_start_after_exit())

    async def _fail_start_after_exit(self) -> None:
        self._fail_start(await self._wait_exit(STOP_GRACE_S))

    def _drain_output(self) -> None:
        """Read what the process printed and the event loop has not read yet.

        Its output and its answers (or its exit) travel on different
        descriptors; without this, its last lines could be read too late: a
        bootstrap's after the invocation's END, a failed start's after the
        error that they explain.
        """
        transport = self._output_transport
        if transport is None or transport.is_closing():
            return
        pipe = transport.get_extra_info("pipe")
        if pipe is None:
            return
        receiver = transport.get_protocol()
        while True:
            try:
                data = os.read(pipe.fileno(), 256 * 1024)
            except OSError:  # BlockingIOError included: nothing more to read now
                return
            if not data:
                return
            receiver.data_received(data)

    def _fail_start(self, code: int | None) -> None:
        """A process that ended before READY without saying why: fail its start."""
        if self._ready is None or self._ready.done():
            return
        self._drain_output()
        last = self.init_logs[-1] if self.init_logs else ""
        if code == EXEC_FAILED_STATUS and last.startswith(EXEC_FAILED):
            # The launcher could not exec the runtime (a bootstrap the worker's
            # user may not run): Lambda's error for an entrypoint it cannot start.
            error = FunctionError(INIT, "Runtime.InvalidEntrypoint", last)
        elif self.cgroup is not None and self.cgroup.oom_killed():
            error = self._out_of_memory(INIT)  # as the monitor says it of an init over the limit
        else:
            error = FunctionError(INIT, "Runtime.ExitError", describe_exit(code))
        self._ready.set_exception(WorkerInitError(error, 0.0, list(self.init_logs)))

    def _on_exit(self) -> None:
        """The pidfd says the process ended: reap it (our child) and settle everything."""
        if self._pidfd is None:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self._reap()

    def _reap(self) -> None:
        assert self.popen is not None
        self._exited(self.popen.wait())

    def _exited(self, returncode: int | None) -> None:
        """The process is gone (`returncode` as Popen's; None if unknown): settle everything."""
        self.returncode = returncode
        # Whatever the leader left behind in its group goes with it.
        self._killpg(signal.SIGKILL)
        call = self._call
        if call is not None and not call.future.done():
            call.future.set_result((None, self._death_error(call)))
        self._fail_start(self.returncode)
        if not self.exited.done():
            self.exited.set_result(self.returncode)

    def _death_error(self, call: _Call) -> FunctionError:
        prefix = f"RequestId: {call.request_id} Error: "
        if call.timed_out:
            return FunctionError(
                TIMEOUT, "Sandbox.Timedout",
                f"{prefix}Task timed out after {self.spec.timeout_s:.2f} seconds")
        if call.tmp_full:
            return FunctionError(
                CRASH, "Runtime.ExitError",
                f"{prefix}Runtime exited with error: signal: killed "
                f"(/tmp holds more than its tmp_mb quota of {self.spec.tmp_mb} MB)")
        if call.stopped is not None:
            return FunctionError(
                CRASH, "Runtime.ExitError", f"{prefix}Runtime exited with error: signal: killed ({call.stopped})")
        if call.oom or (self.cgroup is not None and self.cgroup.oom_killed()):
            return self._out_of_memory(OUT_OF_MEMORY, prefix)
        return FunctionError(CRASH, "Runtime.ExitError", prefix + describe_exit(self.returncode))

    # -- invocation -------------------------------------------------------------

    async def run(self, request_id: str, event: bytes, deadline: float, sink: LineSink,
                  client_context: dict | None = None, invoked_arn: str | None = None,
                  trace_id: str | None = None, stream: ResponseStream | None = None) -> RunResult:
        loop = self._loop
        future = loop.create_future()
        call = self._call = _Call(request_id, future, sink, stream)
        fields = {"id": request_id, "deadline_ms": int(deadline * 1000), "arn": invoked_arn or self.arn}
        if client_context is not None:
            fields["client_context"] = client_context
        if trace_id is not None:
            fields["trace"] = trace_id
        header = orjson.dumps(fields)
        self._peak_kb = None
        if not self.alive or not self._send(protocol.INVOKE, header + b"\n" + event):
            self._call = None
            error = FunctionError(CRASH, "Runtime.ExitError",
                                  f"RequestId: {request_id} Error: {describe_exit(self.returncode)}")
            return RunResult(None, error, 0, False)
        if self.frozen:
            # SIGCONT after the call is written: the worker wakes once, to a
            # frame already waiting, instead of once for the signal (to block
            # in its read again) and once more for the frame.
            self.thaw()
        self._deadline_handle = loop.call_at(
            loop.time() + max(deadline - time.time(), 0), self._on_deadline, call)
        if self.cgroup is None:
            self._monitor_handle = loop.call_later(MONITOR_INTERVAL_S, self._monitor, call)
        tmp_check = None
        if self.sandbox is not None and self.sandbox.tmp_limit is not None:
            tmp_check = loop.create_task(self._watch_tmp(call))
        replies = self.env.replies
        polled = replies is not None and replies.begin(self.last_reply_s)
        written = time.monotonic()
        if stream is not None:
            stream.attach(self._pause_reading)
        try:
            payload, error = await future
        finally:
            if stream is not None:
                stream.detach()
            self.last_reply_s = time.monotonic() - written
            if polled:
                replies.end()  # type: ignore[union-attr]
            # Output without a final newline belongs to this call, not the next.
            if self._log_partial:
                self._end_log_line()
            if self._output is not None:
                self._output.flush()
            call.write_last()
            self._call = None
            self._idle_log_bytes = 0
            self._deadline_handle.cancel()
            if self._monitor_handle is not None:
                self._monitor_handle.cancel()
                self._monitor_handle = None
            if tmp_check is not None:
                tmp_check.cancel()
        self.invocations += 1
        if (self.cgroup is None and self._peak_kb is not None and self._peak_kb > self.spec.memory_mb * 1024
                and (error is None or error.kind == HANDLED)):
            # Without a cgroup: its peak (STATS, children it waited for included)
            # passed the limit where no sample saw it.
            call.oom = True
            log.warning("worker %s of %s passed its %d MB memory limit (peak %d MB); killing it",
                        self.id, self.spec.name, self.spec.memory_mb, self._peak_kb // 1024)
            payload, error = None, self._death_error(call)
        elif self.cgroup is not None and (error is None or error.kind == HANDLED) and self.cgroup.oom_kills():
            # The kernel killed the process that needed the most, a child say, and the
            # call went on without it: the worker passed its limit all the same.
            call.oom = True
            log.warning("worker %s of %s passed its %d MB memory limit (the kernel killed one of its "
                        "processes); killing it", self.id, self.spec.name, self.spec.memory_mb)
            self._peak_kb = max(self._read_peak_kb() or 0, self._peak_kb or 0) or None
            payload, error = None, self._death_error(call)
        if tmp_check is not None and error is None and await self._tmp_exceeded():
            # Written just before the reply: this call stands, the worker goes.
            log.warning("worker %s: /tmp holds more than %d MB; retiring it", self.id, self.spec.tmp_mb)
            call.fatal = True
        if error is not None and error.kind in (TIMEOUT, OUT_OF_MEMORY, CRASH):
            # Usually from _on_exit already; make sure nothing of it lingers.
            self.kill()
        reusable = self.alive and not call.fatal and (error is None or error.kind == HANDLED)
        return RunResult(payload, error, self.max_memory_mb(), reusable)

    async def _tmp_exceeded(self) -> bool:
        assert self.sandbox is not None
        return await asyncio.to_thread(self.sandbox.tmp_exceeded)

    async def _watch_tmp(self, call: _Call) -> None:
        """Where /tmp is a plain directory: stop the worker when it passes tmp_mb."""
        while not call.future.done():
            await asyncio.sleep(TMP_CHECK_INTERVAL_S)
            if not call.future.done() and await self._tmp_exceeded() and not call.future.done():
                call.tmp_full = True
                log.warning("worker %s of %s: /tmp passed its %d MB quota; killing it",
                            self.id, self.spec.name, self.spec.tmp_mb)
                self._kill_for(call)

    def stop_call(self, why: str) -> None:
        """faasd stops and the call in flight has outlived the drain: kill the worker and
        fail the call, so that its caller is answered and its log ends."""
        call = self._call
        if call is not None and not call.future.done():
            call.stopped = why
            self._kill_for(call)

    def _on_deadline(self, call: _Call) -> None:
        if call.future.done():
            return
        call.timed_out = True
        self._kill_for(call)

    def _monitor(self, call: _Call) -> None:
        if call.future.done() or self.pid is None:
            return
        sample = self._memory_in_use()
        if sample is not None:
            # Kept for a process that dies by itself: its VmHWM goes with it.
            self._peak_kb = max(self._peak_kb or 0, max(sample) // 1024)
        if sample is not None and sample[0] > self.spec.memory_mb * MB:
            call.oom = True
            log.warning("worker %s of %s passed its %d MB memory limit (%d MB); killing it",
                        self.id, self.spec.name, self.spec.memory_mb, sample[0] // MB)
            self._kill_for(call)
            return
        self._monitor_handle = self._loop.call_later(MONITOR_INTERVAL_S, self._monitor, call)

    def _memory_in_use(self) -> tuple[int, int] | None:
        """Without a cgroup: (what the worker holds now, in bytes: the resident
        memory of all its processes and what its private /tmp and /dev/shm
        hold; its own process's peak resident memory). None once it is gone."""
        tree = self._tree
        sample = tree.sample() if tree is not None else None
        if sample is None:
            return None
        resident, peak, processes = sample
        tmpfs, devices = (private_tmpfs_usage(tree.view(tree.leader)) if self.namespace is not None
                          else (0, frozenset()))
        if resident + tmpfs > self.spec.memory_mb * MB and (processes > 1 or tmpfs):
            # Its processes may share pages (a fork, say), and a file of its tmpfs
            # that it maps is resident too: a cgroup counts each page once.
            resident = tree.pss_bytes(devices) or resident
        return resident + tmpfs, peak

    def _out_of_memory_at_init(self) -> bool:
        """Without a cgroup, init's memory is looked at once, at READY: a worker
        that holds more than memory_mb by then, or whose process did at its
        peak, fails its init, as the kernel would have killed it. A template
        that does is not used. True if it failed."""
        sample = self._memory_in_use()
        if sample is None or max(sample) <= self.spec.memory_mb * MB:
            return False
        log.warning("worker %s of %s passed its %d MB memory limit at init (%d MB); killing it",
                    self.id, self.spec.name, self.spec.memory_mb, max(sample) // MB)
        self.kill()
        assert self._ready is not None
        self._ready.set_exception(WorkerInitError(self._out_of_memory(INIT), 0.0, list(self.init_logs)))
        return True

    def _out_of_memory(self, kind: str, prefix: str = "") -> FunctionError:
        return FunctionError(kind, "Runtime.OutOfMemory", f"{prefix}Runtime exited with error: signal: "
                             f"killed (memory limit of {self.spec.memory_mb} MB exceeded)")

    def _kill_for(self, call: _Call) -> None:
        """Kill the worker and fail `call` (the flag saying why is set): its peak
        memory is read first, while the process still has it to read."""
        self._peak_kb = max(self._read_peak_kb() or 0, self._peak_kb or 0) or None
        self.kill()
        # _on_exit resolves the call once the kernel reports the death; resolve
        # now anyway so a process stuck in uninterruptible sleep cannot hold it.
        call.future.set_result((None, self._death_error(call)))

    def _read_peak_kb(self) -> int | None:
        """The worker's peak memory in KiB: the larger of its cgroup's peak, where it has
        one, and its process's high-water mark (VmHWM); None when neither can be read.
        The cgroup counts the worker's children, but not the pages of a file that
        another cgroup read first (most of a `node` binary's, when node ran before):
        VmHWM counts those."""
        peak = self.cgroup.peak_bytes() if self.cgroup is not None else None
        sample = rss_bytes(self.pid) if self.pid is not None else None
        if sample is not None:
            peak = max(peak or 0, sample[1])
        return None if peak is None else peak // 1024

    def max_memory_mb(self) -> int:
        """`Max Memory Used` of the call that just ended."""
        peak_kb = self._peak_kb if self._peak_kb is not None else self._read_peak_kb()
        return max(1, round((peak_kb or 0) / 1024))

    # -- lifecycle ----------------------------------------------------------------

    def _killpg(self, sig: int) -> None:
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def freeze(self) -> None:
        """SIGSTOP the worker's process group, and the processes of its cgroup that
        left the group (a child in a session of its own): the whole execution
        environment stops, as Lambda freezes it. Without a cgroup, the processes
        of its mount namespace: a scan of /proc, made off the event loop."""
        self._killpg(signal.SIGSTOP)
        self._stopped_strays = self._stop_strays()
        self.frozen = True
        self._freezes += 1
        if (self.cgroup is None and (self.sandbox is None or self.sandbox.pids_dir is None)
                and self.namespace is not None):
            self._finding_strays = self._loop.create_task(self._stop_strays_in(self.namespace, self._freezes))

    async def _stop_strays_in(self, namespace: MountNamespace, freeze: int) -> None:
        """Stop the strays among the processes of `namespace`, the worker's, if the
        worker is still in the freeze that asked for them."""
        found = await asyncio.to_thread(namespace.pids)
        if self.frozen and self._freezes == freeze and self.namespace is namespace:
            self._stopped_strays += self._stop_strays(lambda: found)

    def _stop_strays(self, members: Callable[[], list[int]] | None = None) -> list[int]:
        """SIGSTOP the members of the worker's cgroup (or `members()`) outside its
        process group; those stopped. Listed again while stopping them turns up new
        ones (a child forking meanwhile)."""
        if self.pid is None:
            return []
        if members is None:
            if self.cgroup is not None:
                members = self.cgroup.pids
            elif self.sandbox is not None and self.sandbox.pids_dir is not None:
                members = functools.partial(read_pids, self.sandbox.pids_dir)
            else:
                return []
        stopped: list[int] = []
        seen: set[int] = set()
        for _ in range(5):
            new = [pid for pid in members() if pid not in seen]
            if not new:
                break
            seen.update(new)
            for pid in new:
                try:
                    if os.getpgid(pid) == self.pid:
                        continue  # stopped with its group
                    os.kill(pid, signal.SIGSTOP)
                except (ProcessLookupError, PermissionError):
                    continue
                stopped.append(pid)
        return stopped

    def wake(self) -> None:
        # A WAKE frame: reading it wakes the process, and with it its core,
        # while the daemon still builds the call (a frozen one stays as it is).
        if self._call is None and not self.frozen:
            self._send(protocol.WAKE)

    def thaw(self) -> None:
        self.frozen = False
        if self._stopped_strays:
            # Before the worker: once woken it may take this core at once, and
            # its call must find the rest of its environment running.
            strays, self._stopped_strays = self._stopped_strays, []
            for pid in strays:
                try:
                    os.kill(pid, signal.SIGCONT)
                except (ProcessLookupError, PermissionError):
                    pass
        self._killpg(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the worker's process group, and the rest of its processes
        (those in other sessions): by its cgroups, else by its mount namespace."""
        self._find_namespace()  # killed before READY: its init may have left processes
        self._killpg(signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill_all()
        if self.sandbox is not None:
            self.sandbox.kill_all()
        if self.namespace is not None:
            self.namespace.kill_all()

    def _find_namespace(self) -> None:
        """Without a memory cgroup, hold on to the mount namespace the worker made
        itself (MountNamespace), if it has made one by now."""
        sandbox = self.env.sandbox
        if (self.namespace is not None or self.cgroup is not None or self.pid is None
                or self._pidfd is None or sandbox is None or not sandbox.mount):
            return
        namespace = MountNamespace.of(self.pid)
        if namespace is None:
            return
        try:
            # Alive after the namespace was opened: that was its pid, not a reused one.
            signal.pidfd_send_signal(self._pidfd, 0)
        except OSError:
            namespace.close()
            return
        self.namespace = namespace
        if self._tree is not None:
            self._tree.namespace = namespace.key

    async def _wait_exit(self, timeout: float) -> int | None:
        try:
            return await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except asyncio.TimeoutError:
            return None

    async def stop(self) -> None:
        """Ask the worker to exit, then make sure it and its group are gone."""
        if self.alive and self.pid is not None:
            self.thaw()  # a stopped process cannot read SHUTDOWN
            self._send(protocol.SHUTDOWN)
            if await self._wait_exit(STOP_GRACE_S) is None:
                self.kill()
                await self._wait_exit(STOP_GRACE_S)
        self.kill()
        self.close()

    def close(self) -> None:
        """Release the daemon-side resources of a dead worker."""
        if self._control is not None and self._control.transport is not None:
            self._control.transport.close()
        if self._output_transport is not None:
            self._output_transport.close()
        # Its processes are killed, but some may still be on their way out.
        remove_when_empty(self._loop, [g for g in (self.cgroup, self.sandbox) if g is not None])
        if self.namespace is not None:
            self.namespace.close()  # from now on its number may name another's
            self.namespace = None
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def _loads(payload: bytes) -> dict:
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return {"errorType": "Runtime.InvalidResponse", "errorMessage": payload[:1000].decode(errors="replace")}
    return value if isinstance(value, dict) else {"errorType": "Error", "errorMessage": str(value)}


# What a Python worker imports from faasd before user code: loaded from their
# cached bytecode, they cost a start no compilation.
SHIM_SOURCES = (RUNTIME_DIR / "python_runtime.py", RUNTIME_DIR.parent / "__init__.py",
                RUNTIME_DIR.parent / "protocol.py", RUNTIME_DIR.parent / "sandbox.py",
                RUNTIME_DIR.parent / "libc.py")


def compile_shim(sources: Iterable[Path] = SHIM_SOURCES) -> list[Path]:
    """Write the bytecode of `sources` where it is missing or stale; return what
    could not be written. A worker writes it itself on its first start, but
    not as a `run_as` user who may not write to faasd's package directory."""
    import compileall

    failed = []
    for source in sources:
        try:
            ok = source.is_file() and compileall.compile_file(str(source), quiet=2)
        except OSError:
            ok = False
        if not ok:
            failed.append(source)
    return failed


def python_command(spec: FunctionSpec, env: WorkerEnvironment) -> list[str]:
    # -S: the shim puts site-packages on sys.path itself (SITE_PATH_ENV),
    # without running their .pth files, which cost a worker tens of ms at start.
    return [env.python, "-I", "-S", str(RUNTIME_DIR / "python_worker.py")]


SITE_PATH_ENV = "_FAASD_SITE_PATH"


def python_site_path(python: str) -> str:
    """The site-packages directories of `python`, the workers' interpreter (not
    the daemon's, which may be another version), for workers started with -S."""
    return os.pathsep.join(python_interpreter(python).site_packages)


def clear_bytecode(spec: FunctionSpec) -> None:
    """Delete the function's cached bytecode after its code changed.

    A .pyc records its source's mtime in whole seconds and its size, so a
    same-size edit within one second would otherwise run the old code.
    """
    if spec.source.is_dir():
        for cache in spec.source.rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)
        return
    for pyc in (spec.task_root / "__pycache__").glob(f"{spec.source.stem}.*.pyc"):
        try:
            pyc.unlink()
        except OSError:
            pass


def node_worker(spec: FunctionSpec, env: WorkerEnvironment) -> Worker:
    """A worker running faasd/runtimes/node_worker.js on the machine's `node`."""
    node = env.node or shutil.which("node")
    if node is None:
        raise WorkerInitError(FunctionError(
            INIT, "Runtime.InvalidRuntime",
            "Node.js is not installed: there is no `node` executable on the faasd daemon's "
            "PATH; install Node.js 18 or later (e.g. apt-get install nodejs)"), 0.0, [])
    # As Lambda's Node bootstrap: size V8's heap from the function's memory, so
    # that the garbage collector runs before the memory limit kills the worker.
    new_space = spec.memory_mb // 10
    return ProcessWorker(spec, env, [
        node,
        f"--max-semi-space-size={max(1, new_space // 2)}",
        f"--max-old-space-size={spec.memory_mb - new_space}",
        str(RUNTIME_DIR / "node_worker.js"),
    ])


def provided_worker(spec: FunctionSpec, env: WorkerEnvironment) -> Worker:
    """A worker running the function's `bootstrap` against the Lambda Runtime API."""
    from .runtime_api import ProvidedWorker  # it builds on this module

    return ProvidedWorker(spec, env)


def create_worker(spec: FunctionSpec, env: WorkerEnvironment) -> Worker:
    """The worker for a spec's runtime. Runtimes register here."""
    factory = WORKER_FACTORIES.get(spec.runtime)
    if factory is None:
        raise WorkerInitError(
            FunctionError(INIT, "Runtime.InvalidRuntime", f"runtime {spec.runtime!r} is not available"),
            0.0, [])
    return factory(spec, env)


WORKER_FACTORIES: dict[str, Callable[[FunctionSpec, WorkerEnvironment], Worker]] = {
    "python": lambda spec, env: ProcessWorker(spec, env, python_command(spec, env),
                                              {SITE_PATH_ENV: python_site_path(env.python)}),
    "node": node_worker,
    "provided": provided_worker,
}
