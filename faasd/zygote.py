"""Templates: new workers forked from a process that has already imported the handler.

A cold start pays for an interpreter and the handler's imports; a fork of a
process that has paid them already costs about a millisecond. For each
function revision the pool keeps one `Template`: a Python worker started
with `_FAASD_TEMPLATE=1` (and the same isolation as any worker) that imports
the handler, runs `gc.freeze()`, says READY and from then on only forks. A
`ForkedWorker` asks it for a child (FORK); the template forks, the child
takes a control socket and an output pipe of its own, moves into a process
group and (through a mount namespace, or a user and mount namespace when
unprivileged) a fresh tmpfs at /tmp, and says READY; the template passes the
daemon the child's two descriptors (FORKED, SCM_RIGHTS) and reaps it later
(EXITED with its status). The daemon puts the child in its own memory
cgroup, watches it through a pidfd, and from then on it is an ordinary
worker: frozen, thawed, timed out and retired like any other.

A template serves no invocations and is never frozen: it must answer a FORK
at any time. Its children die with it (PR_SET_PDEATHSIG), so the pool keeps
an old revision's template until its last child is gone.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import time

import orjson

from . import protocol
from .errors import INIT, FunctionError
from .limits import WorkerCgroup
from .spec import FunctionSpec
from .workers import (
    SITE_PATH_ENV, ProcessWorker, WorkerEnvironment, WorkerInitError, WorkerState, _Control,
    python_command, python_site_path,
)

log = logging.getLogger("faasd.zygote")

TEMPLATE_ENV = "_FAASD_TEMPLATE"
FORK_TIMEOUT_S = 5.0
EXIT_STATUS_WAIT_S = 0.5


class TemplateGone(Exception):
    """The template cannot fork (it died, or is stopping)."""


class Template(ProcessWorker):
    """The process a function's workers are forked from."""

    def __init__(self, spec: FunctionSpec, env: WorkerEnvironment) -> None:
        super().__init__(spec, env, python_command(spec, env),
                         {SITE_PATH_ENV: python_site_path(), TEMPLATE_ENV: "1",
                          "_FAASD_TMP_MB": str(spec.tmp_mb)})
        self.id = "template-" + self.id
        self.tmp_dir = env.tmp_root / self.id
        self.children: set[str] = set()
        self.forks = 0
        self._sock: socket.socket | None = None
        self._decoder = protocol.FrameDecoder()
        self._fds: list[int] = []  # received descriptors, in order, for FORKED frames
        self._forking: dict[str, asyncio.Future] = {}
        self._statuses: dict[int, int] = {}
        self._status_waiters: dict[int, asyncio.Future] = {}
        self._spare_cgroups: dict[int, asyncio.Task] = {}

    @property
    def ready(self) -> bool:
        return self.alive and self.init_ms is not None and self.state is not WorkerState.RETIRING

    # The template's channel carries descriptors, which asyncio transports
    # drop: it is read with recvmsg() from a plain reader callback instead.
    async def _open_control(self) -> socket.socket | None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent.setblocking(False)
        self._sock = parent
        self._loop.add_reader(parent.fileno(), self._readable)
        return child

    def _send(self, kind: int, payload: bytes = b"") -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.send(protocol.encode(kind, payload))  # tiny frames: never partial
        except OSError:
            return False
        return True

    def _readable(self) -> None:
        assert self._sock is not None
        try:
            data, ancdata, _, _ = self._sock.recvmsg(1 << 16, socket.CMSG_SPACE(64 * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancdata = b"", []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if not data:
            self._close_channel()
            self._on_control_lost()
            return
        for kind, payload in self._decoder.feed(data):
            if kind == protocol.FORKED:
                self._on_forked(orjson.loads(payload))
            elif kind == protocol.EXITED:
                self._on_child_exit(orjson.loads(payload))
            elif kind == protocol.SPARE:
                pid = int(orjson.loads(payload)["pid"])
                self._spare_cgroups[pid] = self._loop.create_task(self._cgroup_for(pid))
            else:
                self._on_frame(kind, payload)

    def _on_forked(self, reply: dict) -> None:
        future = self._forking.pop(reply.get("id"), None)
        if "error" in reply or len(self._fds) < 2:
            if future is not None and not future.done():
                future.set_exception(TemplateGone(f"fork failed: {reply.get('error', 'no descriptors')}"))
            return
        control, output = self._fds.pop(0), self._fds.pop(0)
        if future is None or future.done():
            os.close(control)
            os.close(output)
            return
        future.set_result((int(reply["pid"]), control, output))

    def _on_child_exit(self, report: dict) -> None:
        pid, code = int(report["pid"]), int(report["returncode"])
        waiter = self._status_waiters.pop(pid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(code)
        else:
            self._statuses[pid] = code

    async def _cgroup_for(self, pid: int) -> WorkerCgroup | None:
        """A memory cgroup of its own for a forked child, made off the event loop.

        Moving a process between cgroups can take the kernel milliseconds (it
        waits for an RCU grace period), so spares move as soon as they exist.
        """
        def create() -> WorkerCgroup | None:
            cgroup = self.env.memory.create(f"{self.spec.name}-forked-{pid}", self.spec.memory_mb)
            if cgroup is None:
                return None
            try:
                cgroup.add(pid)
            except OSError as exc:
                log.warning("cannot move forked worker %s into its cgroup: %s", pid, exc)
                cgroup.remove()
                return None
            return cgroup

        return await asyncio.to_thread(create)

    async def take_cgroup(self, pid: int) -> WorkerCgroup | None:
        """The cgroup prepared for a child handed out by FORK."""
        task = self._spare_cgroups.pop(pid, None)
        return await (task if task is not None else self._cgroup_for(pid))

    async def exit_status(self, pid: int) -> int | None:
        """A forked child's exit status as the template reaped it (None if it cannot tell)."""
        if pid in self._statuses:
            return self._statuses.pop(pid)
        if not self.alive:
            return None
        waiter = self._status_waiters[pid] = self._loop.create_future()
        try:
            return await asyncio.wait_for(waiter, EXIT_STATUS_WAIT_S)
        except asyncio.TimeoutError:
            return None
        finally:
            self._status_waiters.pop(pid, None)

    async def fork(self, worker_id: str, env: dict[str, str]) -> tuple[int, int, int]:
        """(pid, control fd, output fd) of a new child; TemplateGone if it cannot."""
        if not self.ready:
            raise TemplateGone("the template is not running")
        future = self._forking[worker_id] = self._loop.create_future()
        request = {"id": worker_id, "env": env, "tmp_mb": self.spec.tmp_mb}
        if not self._send(protocol.FORK, orjson.dumps(request)):
            self._forking.pop(worker_id, None)
            raise TemplateGone("the template's channel is closed")
        try:
            child = await asyncio.wait_for(future, FORK_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise TemplateGone(f"no fork within {FORK_TIMEOUT_S:g}s") from None
        finally:
            self._forking.pop(worker_id, None)
        self.forks += 1
        return child

    def _close_channel(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        for future in self._forking.values():
            if not future.done():
                future.set_exception(TemplateGone("the template's channel closed"))

    def _exited(self, returncode: int | None) -> None:
        super()._exited(returncode)
        for waiter in self._status_waiters.values():
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        self._close_channel()
        for task in self._spare_cgroups.values():  # spares never handed out
            task.add_done_callback(_remove_cgroup)
        self._spare_cgroups.clear()
        super().close()

    def to_json(self) -> dict:
        view = super().to_json()
        view.update(state="template", children=len(self.children))
        return view


def _remove_cgroup(task: asyncio.Task) -> None:
    cgroup = None if task.cancelled() or task.exception() else task.result()
    if cgroup is not None:
        cgroup.kill_all()
        cgroup.remove()


class ForkedWorker(ProcessWorker):
    """A worker that came from a template's fork instead of a spawn."""

    def __init__(self, spec: FunctionSpec, env: WorkerEnvironment, template: Template) -> None:
        super().__init__(spec, env, command=[])
        self.template = template
        template.children.add(self.id)

    async def start(self) -> None:
        loop = self._loop
        started = time.monotonic()
        self._ready = loop.create_future()
        env = self.base_environment()
        # The per-call values a spawned worker gets in its environment.
        changes = {k: env[k] for k in ("AWS_LAMBDA_LOG_STREAM_NAME", "AWS_LAMBDA_INITIALIZATION_TYPE")}
        try:
            pid, control, output = await self.template.fork(self.id, changes)
        except TemplateGone as exc:
            self.template.children.discard(self.id)
            raise WorkerInitError(FunctionError(INIT, "Runtime.Unknown", str(exc)),
                                  (time.monotonic() - started) * 1000, []) from exc
        self.pid = pid
        self.cgroup = await self.template.take_cgroup(pid)
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            os.close(control)
            os.close(output)
            self._exited(await self.template.exit_status(pid))
            raise WorkerInitError(FunctionError(INIT, "Runtime.ExitError", "the forked worker died at once"),
                                  (time.monotonic() - started) * 1000, []) from None
        loop.add_reader(self._pidfd, self._on_exit)
        _, self._control = await loop.connect_accepted_socket(
            lambda: _Control(self), socket.socket(fileno=control))
        await self._await_ready(output, started)

    init_hint = "the forked worker never said READY"

    def _reap(self) -> None:
        # Not our child: its parent, the template, reaps it and reports how it ended.
        task = self._loop.create_task(self.template.exit_status(self.pid or 0))
        task.add_done_callback(lambda t: self._exited(None if t.cancelled() else t.result()))

    def _exited(self, returncode: int | None) -> None:
        super()._exited(returncode)
        self.template.children.discard(self.id)
