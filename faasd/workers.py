"""One worker process, seen from the daemon: spawn, invoke, freeze, thaw, stop.

A `Worker` owns its process (a process group of its own), its control
socket, its output pipe, its tmp dir and its memory cgroup. It serves one
function revision and one invocation at a time. It never decides its own
fate: the pool (faasd/pool.py) moves it between states, and the invoker
(faasd/invoker.py) tells it what to run. How it runs is the runtime's
business: `ProcessWorker` speaks faasd/protocol.py to a shim (Python, Node);
other runtimes subclass `Worker`.
"""

from __future__ import annotations

import asyncio
import enum
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
from typing import Callable, Mapping

import orjson

from . import protocol
from .errors import CRASH, HANDLED, INIT, OUT_OF_MEMORY, TIMEOUT, FunctionError
from .limits import MB, MemoryLimits, WorkerCgroup, rss_bytes
from .spec import DEFAULT_REGION, FunctionSpec, function_arn

log = logging.getLogger("faasd.worker")

RUNTIME_DIR = Path(__file__).parent / "runtimes"
MONITOR_INTERVAL_S = 0.05
STOP_GRACE_S = 1.0
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


@dataclass(slots=True)
class RunResult:
    payload: bytes | None
    error: FunctionError | None
    max_memory_mb: int
    reusable: bool


@dataclass(frozen=True, kw_only=True)
class WorkerEnvironment:
    """What every worker of this daemon shares: where to put things, as whom to run."""

    data_dir: Path
    memory: MemoryLimits
    region: str = DEFAULT_REGION
    run_as: tuple[int, int] | None = None  # (uid, gid)
    python: str = sys.executable
    node: str | None = None

    @property
    def tmp_root(self) -> Path:
        return self.data_dir / "workers"


_ids = itertools.count(1)

LineSink = Callable[[str], None]


def describe_exit(returncode: int | None) -> str:
    """Lambda's wording for how a runtime process ended."""
    if returncode is None:
        return "Runtime exited without providing a reason"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        words = {
            "SIGKILL": "killed", "SIGSEGV": "segmentation fault", "SIGABRT": "aborted",
            "SIGTERM": "terminated", "SIGBUS": "bus error", "SIGILL": "illegal instruction",
            "SIGFPE": "floating point exception",
        }
        return f"Runtime exited with error: signal: {words.get(name, name)}"
    return f"Runtime exited with error: exit status {returncode}"


class Worker:
    """Base: state and bookkeeping common to every runtime's worker."""

    def __init__(self, spec: FunctionSpec, env: WorkerEnvironment) -> None:
        self.spec = spec
        self.env = env
        self.id = f"{spec.name}-{os.getpid()}-{next(_ids)}"
        self.state = WorkerState.STARTING
        self.pid: int | None = None
        self.started_at = time.time()
        self.state_since = time.monotonic()
        self.init_ms: float | None = None
        self.invocations = 0
        self.tmp_dir = env.tmp_root / self.id
        self.cgroup: WorkerCgroup | None = None
        self.returncode: int | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # Output printed outside any invocation (at init) goes here.
        self.idle_sink: LineSink = lambda line: log.info("[%s] %s", spec.name, line)

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
            "AWS_LAMBDA_LOG_STREAM_NAME": time.strftime("%Y/%m/%d/[$LATEST]") + self.id,
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "AWS_REGION": self.env.region,
            "AWS_DEFAULT_REGION": self.env.region,
            "AWS_EXECUTION_ENV": f"AWS_Lambda_{spec.runtime}",
            "_HANDLER": spec.handler,
            "LAMBDA_TASK_ROOT": str(spec.task_root),
            "LAMBDA_RUNTIME_DIR": str(RUNTIME_DIR),
            "TMPDIR": str(self.tmp_dir),
        }
        return env

    # Subclasses implement these.
    async def start(self) -> None:
        raise NotImplementedError

    async def run(self, request_id: str, event: bytes, deadline: float, sink: LineSink) -> RunResult:
        raise NotImplementedError

    def freeze(self) -> None:
        raise NotImplementedError

    def thaw(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


class _Call:
    """The invocation in flight on a ProcessWorker."""

    __slots__ = ("request_id", "future", "sink", "oom", "timed_out")

    def __init__(self, request_id: str, future: asyncio.Future, sink: LineSink) -> None:
        self.request_id = request_id
        self.future = future
        self.sink = sink
        self.oom = False
        self.timed_out = False


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
        if len(self.partial) > 256 * 1024:  # a line without end: cut it
            lines.append(self.partial)
            self.partial = b""
        for line in lines:
            self.worker._on_output(line.decode("utf-8", "backslashreplace"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.partial:
            self.worker._on_output(self.partial.decode("utf-8", "backslashreplace"))
            self.partial = b""


class ProcessWorker(Worker):
    """A worker running a shim that speaks faasd/protocol.py on fd 3."""

    def __init__(self, spec: FunctionSpec, env: WorkerEnvironment, command: list[str]) -> None:
        super().__init__(spec, env)
        self.command = command
        self.popen: subprocess.Popen | None = None
        self._control: _Control | None = None
        self._output_transport: asyncio.BaseTransport | None = None
        self._pidfd: int | None = None
        self._ready: asyncio.Future | None = None
        self._call: _Call | None = None
        self._init_logs: list[str] = []
        self._deadline_handle: asyncio.TimerHandle | None = None
        self._monitor_handle: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def environment(self) -> dict[str, str]:
        env = self.base_environment()
        env["_FAASD_PARENT_PID"] = str(os.getpid())
        return env

    async def start(self) -> None:
        loop = self._loop
        started = time.monotonic()
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        if self.env.run_as:
            os.chown(self.tmp_dir, *self.env.run_as)
        os.chmod(self.tmp_dir, 0o700)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_read, out_write = os.pipe()
        try:
            self.popen = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=out_write,
                stderr=out_write,
                pass_fds=(child_sock.fileno(),),
                cwd=self.spec.task_root,
                env={**self.environment(), protocol.CONTROL_FD_ENV: str(child_sock.fileno())},
                process_group=0,
                close_fds=True,
                **self._credentials(),
            )
        except OSError as exc:
            parent_sock.close()
            os.close(out_read)
            raise WorkerInitError(
                FunctionError(INIT, "Runtime.InvalidEntrypoint", f"cannot start the runtime: {exc}"),
                (time.monotonic() - started) * 1000, [],
            ) from None
        finally:
            child_sock.close()
            os.close(out_write)
        self.pid = self.popen.pid
        self.cgroup = self.env.memory.create(self.id, self.spec.memory_mb)
        if self.cgroup is not None:
            try:
                self.cgroup.add(self.pid)
            except OSError as exc:
                log.warning("cannot move worker %s into its cgroup: %s", self.id, exc)
                self.cgroup.remove()
                self.cgroup = None
        self._pidfd = os.pidfd_open(self.pid)
        loop.add_reader(self._pidfd, self._on_exit)
        _, self._control = await loop.connect_accepted_socket(lambda: _Control(self), parent_sock)
        self._output_transport, _ = await loop.connect_read_pipe(
            lambda: _Output(self), os.fdopen(out_read, "rb", buffering=0))
        self._ready = loop.create_future()
        try:
            await self._ready
        except WorkerInitError:
            await self._wait_exit(STOP_GRACE_S)
            self.kill()
            raise
        self.init_ms = (time.monotonic() - started) * 1000

    def _credentials(self) -> dict:
        if self.env.run_as is None:
            return {}
        uid, gid = self.env.run_as
        return {"user": uid, "group": gid, "extra_groups": []}

    # -- events from the process -------------------------------------------------

    def _on_frame(self, kind: int, payload: bytes) -> None:
        call = self._call
        if kind == protocol.LOG:
            text = payload.decode("utf-8", "backslashreplace")
            lines = text.split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            for line in lines:
                self._on_output(line)
        elif kind == protocol.RESULT or kind == protocol.ERROR:
            if call is None or call.future.done():
                log.warning("worker %s sent a reply with no invocation in flight", self.id)
                return
            if kind == protocol.RESULT:
                call.future.set_result((payload, None))
            else:
                call.future.set_result((None, FunctionError.from_payload(HANDLED, _loads(payload))))
        elif kind == protocol.READY:
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif kind == protocol.INIT_ERROR:
            if self._ready is not None and not self._ready.done():
                error = FunctionError.from_payload(INIT, _loads(payload))
                self._ready.set_exception(WorkerInitError(error, 0.0, list(self._init_logs)))
        else:
            log.warning("worker %s sent an unknown frame kind %d", self.id, kind)

    def _on_output(self, line: str) -> None:
        call = self._call
        if call is not None:
            call.sink(line)
        else:
            if self.state is WorkerState.STARTING and len(self._init_logs) < 1000:
                self._init_logs.append(line)
            self.idle_sink(line)

    def _on_control_lost(self) -> None:
        # The process closed its socket: it exited or is about to. The pidfd
        # tells us how; give it a moment before failing the call without a code.
        if self._ready is not None and not self._ready.done():
            self._loop.create_task(self._fail_start_after_exit())

    async def _fail_start_after_exit(self) -> None:
        code = await self._wait_exit(STOP_GRACE_S)
        if self._ready is not None and not self._ready.done():
            error = FunctionError(INIT, "Runtime.ExitError", describe_exit(code))
            self._ready.set_exception(WorkerInitError(error, 0.0, list(self._init_logs)))

    def _on_exit(self) -> None:
        if self._pidfd is None:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        assert self.popen is not None
        self.returncode = self.popen.wait()
        # Whatever the leader left behind in its group goes with it.
        self._killpg(signal.SIGKILL)
        call = self._call
        if call is not None and not call.future.done():
            call.future.set_result((None, self._death_error(call)))
        if self._ready is not None and not self._ready.done():
            error = FunctionError(INIT, "Runtime.ExitError", describe_exit(self.returncode))
            self._ready.set_exception(WorkerInitError(error, 0.0, list(self._init_logs)))
        if not self.exited.done():
            self.exited.set_result(self.returncode)

    def _death_error(self, call: _Call) -> FunctionError:
        prefix = f"RequestId: {call.request_id} Error: "
        if call.timed_out:
            return FunctionError(
                TIMEOUT, "Sandbox.Timedout",
                f"{prefix}Task timed out after {self.spec.timeout_s:.2f} seconds")
        if call.oom or (self.cgroup is not None and self.cgroup.oom_killed()):
            return FunctionError(
                OUT_OF_MEMORY, "Runtime.OutOfMemory",
                f"{prefix}Runtime exited with error: signal: killed "
                f"(memory limit of {self.spec.memory_mb} MB exceeded)")
        return FunctionError(CRASH, "Runtime.ExitError", prefix + describe_exit(self.returncode))

    # -- invocation -------------------------------------------------------------

    async def run(self, request_id: str, event: bytes, deadline: float, sink: LineSink) -> RunResult:
        """Run one invocation. `deadline` is in epoch seconds."""
        loop = self._loop
        if not self.alive or self._control is None or self._control.transport is None:
            error = FunctionError(CRASH, "Runtime.ExitError",
                                  f"RequestId: {request_id} Error: {describe_exit(self.returncode)}")
            return RunResult(None, error, 0, False)
        future = loop.create_future()
        call = self._call = _Call(request_id, future, sink)
        header = orjson.dumps({"id": request_id, "deadline_ms": int(deadline * 1000),
                               "arn": function_arn(self.spec.name, self.env.region)})
        self._control.transport.write(protocol.encode(protocol.INVOKE, header + b"\n" + event))
        self._deadline_handle = loop.call_at(
            loop.time() + max(deadline - time.time(), 0), self._on_deadline, call)
        if self.cgroup is None:
            self._monitor_handle = loop.call_later(MONITOR_INTERVAL_S, self._monitor, call)
        try:
            payload, error = await future
        finally:
            self._call = None
            self._deadline_handle.cancel()
            if self._monitor_handle is not None:
                self._monitor_handle.cancel()
                self._monitor_handle = None
        self.invocations += 1
        if error is not None and error.kind in (TIMEOUT, OUT_OF_MEMORY, CRASH):
            # Usually from _on_exit already; make sure nothing of it lingers.
            self.kill()
        reusable = self.alive and (error is None or error.kind == HANDLED)
        return RunResult(payload, error, self.max_memory_mb(), reusable)

    def _on_deadline(self, call: _Call) -> None:
        if call.future.done():
            return
        call.timed_out = True
        self.kill()
        # _on_exit resolves the call once the kernel reports the death; resolve
        # now anyway so a process stuck in uninterruptible sleep cannot hold it.
        call.future.set_result((None, self._death_error(call)))

    def _monitor(self, call: _Call) -> None:
        if call.future.done() or self.pid is None:
            return
        sample = rss_bytes(self.pid)
        if sample is not None and sample[0] > self.spec.memory_mb * MB:
            call.oom = True
            log.warning("worker %s passed its %d MB memory limit (RSS %d MB); killing it",
                        self.id, self.spec.memory_mb, sample[0] // MB)
            self.kill()
            call.future.set_result((None, self._death_error(call)))
            return
        self._monitor_handle = self._loop.call_later(MONITOR_INTERVAL_S, self._monitor, call)

    def max_memory_mb(self) -> int:
        peak = self.cgroup.peak_bytes() if self.cgroup is not None else None
        if peak is None and self.pid is not None:
            sample = rss_bytes(self.pid)
            peak = sample[1] if sample else None
        return max(1, round((peak or 0) / MB))

    # -- lifecycle ----------------------------------------------------------------

    def _killpg(self, sig: int) -> None:
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def freeze(self) -> None:
        self._killpg(signal.SIGSTOP)

    def thaw(self) -> None:
        self._killpg(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the worker's process group (and its cgroup, if any)."""
        self._killpg(signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill_all()

    async def _wait_exit(self, timeout: float) -> int | None:
        try:
            return await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except asyncio.TimeoutError:
            return None

    async def stop(self) -> None:
        """Ask the worker to exit, then make sure it and its group are gone."""
        if self.alive and self.pid is not None:
            self.thaw()  # a stopped process cannot read SHUTDOWN
            transport = self._control.transport if self._control else None
            if transport is not None and not transport.is_closing():
                transport.write(protocol.encode(protocol.SHUTDOWN))
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
        if self.cgroup is not None:
            self.cgroup.remove()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def _loads(payload: bytes) -> dict:
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return {"errorType": "Runtime.InvalidResponse", "errorMessage": payload[:1000].decode(errors="replace")}
    return value if isinstance(value, dict) else {"errorType": "Error", "errorMessage": str(value)}


def python_command(spec: FunctionSpec, env: WorkerEnvironment) -> list[str]:
    # Bytecode is cached per code revision, outside functions/: a .pyc records
    # its source's mtime in whole seconds, so two same-size edits within one
    # second would otherwise run stale code.
    cache = env.data_dir / "pycache" / f"{spec.name}-{spec.revision}"
    if not cache.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        if env.run_as:
            os.chown(cache, *env.run_as)
    return [env.python, "-I", "-X", f"pycache_prefix={cache}", str(RUNTIME_DIR / "python_worker.py")]


def create_worker(spec: FunctionSpec, env: WorkerEnvironment) -> Worker:
    """The worker for a spec's runtime. Runtimes register here."""
    factory = WORKER_FACTORIES.get(spec.runtime)
    if factory is None:
        raise WorkerInitError(
            FunctionError(INIT, "Runtime.InvalidRuntime", f"runtime {spec.runtime!r} is not available"),
            0.0, [])
    return factory(spec, env)


WORKER_FACTORIES: dict[str, Callable[[FunctionSpec, WorkerEnvironment], Worker]] = {
    "python": lambda spec, env: ProcessWorker(spec, env, python_command(spec, env)),
}
