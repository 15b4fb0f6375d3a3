"""Templates: new workers forked from a process that has already imported the handler.

A cold start pays for an interpreter and the handler's imports; a fork of a
process that has paid them already costs about a millisecond, and a fork made
before anyone asked costs the asking call nothing. For each function revision
the pool keeps one `Template`: a Python worker started with
`_FAASD_TEMPLATE=1` (and the same isolation as any worker) that imports the
handler, runs `gc.freeze()`, says READY and from then on only forks.

The daemon keeps spares: children the template forked ahead of demand (FORK
{"count"}). Each spare takes a control socket and an output pipe of its own,
moves into a process group and (through a mount namespace, or a user and
mount namespace when unprivileged) a fresh tmpfs at /tmp, and waits; the
template passes the daemon its two descriptors and a pidfd (SPARE,
SCM_RIGHTS), and the daemon makes it a memory cgroup and a pids limit of its
own at once, which the spare joins itself (JOIN; a fork bomb in one forked
worker leaves its siblings and the template their processes).
A `ForkedWorker` takes a spare, sends it START with its per-call environment,
and has a worker as soon as it answers READY; the template forks a
replacement REPLACE_DELAY_S later, once the new worker has had the core.
The number of spares follows demand: one, plus one each time a call found
none ready (up to `MAX_SPARES`), falling back by one a minute while there is
no shortage. From READY on a forked worker is an
ordinary worker: frozen, thawed, timed out and retired like any other; its
parent, the template, reaps it and reports how it ended (EXITED).

A fork is only the worker a fresh start makes if the init left nothing a
fork cannot have: a template whose init left Python threads running, sockets
or pipes open, or files in its /tmp says so at READY ("unsafe"), and forks
nothing; the pool then starts that revision's workers fresh (pool.py).

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
from collections import deque
from dataclasses import dataclass

import orjson

from . import protocol
from .errors import INIT, FunctionError
from .limits import WorkerCgroup, remove_when_empty
from .sandbox import WorkerPlan, join_cgroups_of, self_join_file
from .spec import FunctionSpec
from .workers import (
    SITE_PATH_ENV, ProcessWorker, WorkerEnvironment, WorkerInitError, WorkerState, _Control,
    describe_exit, python_command, python_site_path,
)

log = logging.getLogger("faasd.zygote")

TEMPLATE_ENV = "_FAASD_TEMPLATE"
FORK_TIMEOUT_S = 5.0
EXIT_STATUS_WAIT_S = 0.5
MAX_SPARES = 4          # spares held per template, at most
SPARE_DECAY_S = 60.0    # without a shortage for this long, hold one spare fewer
# A held spare that is taken is replaced this much later, so that the fork (a
# copy of the template's page tables) does not compete for a core with the
# spare's START and its first call.
REPLACE_DELAY_S = 0.05
# A spare that died unused is replaced at once; if the next dies unused too,
# after SPARE_RETRY_S, and twice as late each time in a row up to
# SPARE_RETRY_MAX_S: spares that cannot live do not make the template fork
# without end.
SPARE_RETRY_S = 0.05
SPARE_RETRY_MAX_S = 30.0


@dataclass(slots=True)
class Groups:
    """The cgroups a forked worker is moved into, away from its template's."""

    memory: WorkerCgroup | None
    pids: WorkerPlan | None  # a cgroup v1 pids group (on cgroup v2 the memory one limits pids)

    def end(self, loop: asyncio.AbstractEventLoop) -> None:
        """Kill what is in them and remove them once it has exited."""
        groups = [group for group in (self.memory, self.pids) if group is not None]
        for group in groups:
            group.kill_all()
        remove_when_empty(loop, groups)


@dataclass(slots=True)
class Spare:
    """A child forked ahead of demand, waiting for its START."""

    pid: int
    control: int  # descriptors, owned by the holder
    output: int
    pidfd: int
    groups: asyncio.Task  # -> Groups: its own cgroups, being made

    def last_output(self) -> str:
        """What it wrote before it ended (a traceback, say), without waiting: at most 4 KB."""
        try:
            os.set_blocking(self.output, False)
            return os.read(self.output, 4096).decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def discard(self) -> None:
        """Let it go unused: closing its channel makes it exit; its cgroups go once it has."""
        for fd in (self.control, self.output, self.pidfd):
            os.close(fd)
        self.groups.add_done_callback(_end_groups)


class TemplateGone(Exception):
    """The template cannot fork (it died, or is stopping)."""


class Template(ProcessWorker):
    """The process a function's workers are forked from."""

    def __init__(self, spec: FunctionSpec, env: WorkerEnvironment) -> None:
        super().__init__(spec, env, python_command(spec, env),
                         {SITE_PATH_ENV: python_site_path(env.python), TEMPLATE_ENV: "1",
                          "_FAASD_TMP_MB": str(spec.tmp_mb)})
        self.id = "template-" + self.id
        self.tmp_dir = env.tmp_root / self.id
        self.children: set[str] = set()
        self._sock: socket.socket | None = None
        self._decoder = protocol.FrameDecoder()
        self._fds: list[int] = []  # received descriptors, in order, for SPARE frames
        self._spares: deque[Spare] = deque()
        self._spare_waiters: deque[asyncio.Future[Spare]] = deque()
        self._requested = 0  # spares asked of the template, not yet arrived
        self.want_spares = 1
        self._short_at = 0.0  # when a call last found no spare ready
        self._statuses: dict[int, int] = {}
        self._status_waiters: dict[int, asyncio.Future] = {}
        self._replace_timer: asyncio.TimerHandle | None = None
        self._spare_deaths = 0  # spares in a row that died unused
        # Why its forks would not be the workers a fresh start makes (its init
        # left threads, sockets or files behind), as it said at READY; "" if not.
        self.unsafe = ""

    async def start(self) -> None:
        await super().start()
        if self.cgroup is not None and not self.unsafe:
            self._lift_memory_limit(self.cgroup)
        self._top_up()

    def _lift_memory_limit(self, cgroup: WorkerCgroup) -> None:
        """The function's memory limit held the template's init, the function's code;
        from now on it only forks. Each fork's page tables, and the pages it copies
        before it joins its own group, stay charged to the template's group for the
        fork's life: some ninety forks of a 128 MB function would pass that limit,
        and the kernel would kill the template and with it every worker it forked."""
        try:
            cgroup.lift_limit()
        except FileNotFoundError:
            pass  # dropped while it started (its code changed again): its group went with it
        except OSError as exc:
            log.warning("cannot lift the memory limit of %s's template (%s): a burst of "
                        "workers may pass it and stop the template", self.spec.name, exc)

    @property
    def ready(self) -> bool:
        return (self.alive and self.init_ms is not None and not self.unsafe
                and self.state is not WorkerState.RETIRING)

    def _log_init(self, line: str) -> None:
        # Kept, not logged: the first worker forked from it logs it (hand_over_init_logs).
        if len(self.init_logs) < 1000:
            self.init_logs.append(line)

    def _log_init_start(self) -> None:
        pass  # it serves no calls: each worker forked from it starts its own log

    def hand_over_init_logs(self) -> list[str]:
        """What the handler's import printed here, for the first worker forked from it;
        nothing for the ones after."""
        lines, self.init_logs = self.init_logs, []
        return lines

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
            if kind == protocol.SPARE:
                self._on_spare(orjson.loads(payload))
            elif kind == protocol.EXITED:
                self._on_child_exit(orjson.loads(payload))
            elif kind == protocol.READY:
                self.unsafe = str(orjson.loads(payload).get("unsafe") or "")
                self._on_frame(kind, payload)
            else:
                self._on_frame(kind, payload)

    def _on_spare(self, reply: dict) -> None:
        self._requested = max(0, self._requested - 1)
        if "error" in reply or len(self._fds) < 3:
            log.warning("template of %s could not fork a spare: %s", self.spec.name,
                        reply.get("error", "no descriptors"))
            waiter = next_pending(self._spare_waiters)
            if waiter is not None:
                waiter.set_exception(TemplateGone(f"fork failed: {reply.get('error', 'no descriptors')}"))
            return
        pid = int(reply["pid"])
        control, output, pidfd = (self._fds.pop(0) for _ in range(3))
        try:
            # A duplicate for JOIN: discarding the spare closes `control` meanwhile.
            duplicate = os.dup(control)
        except OSError as exc:  # out of descriptors: the spare cannot be kept; closed, it exits
            for fd in (control, output, pidfd):
                os.close(fd)
            waiter = next_pending(self._spare_waiters)
            if waiter is not None:
                waiter.set_exception(TemplateGone(f"fork failed: {exc.strerror}"))
            return
        joining = self._groups_for(pid, duplicate)
        spare = Spare(pid, control, output, pidfd, self._loop.create_task(joining))
        waiter = next_pending(self._spare_waiters)
        if waiter is not None:
            waiter.set_result(spare)
        else:
            self._spares.append(spare)

    def _on_child_exit(self, report: dict) -> None:
        pid, code = int(report["pid"]), int(report["returncode"])
        for spare in self._spares:
            if spare.pid == pid:  # a spare died before it was needed
                self._spares.remove(spare)
                self._spare_died(spare, code)
                return
        waiter = self._status_waiters.pop(pid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(code)
        else:
            self._statuses[pid] = code

    def _spare_died(self, spare: Spare, code: int) -> None:
        """Replace a spare that died unused: at once the first time, later each time in a row."""
        output = spare.last_output()
        spare.discard()
        self._spare_deaths += 1
        deaths = self._spare_deaths
        delay = 0.0 if deaths == 1 else min(SPARE_RETRY_MAX_S, SPARE_RETRY_S * 2 ** (deaths - 2))
        log.warning("a spare of %s's template died before use (%s)%s; %s", self.spec.name,
                    describe_exit(code), f": {output.splitlines()[-1]}" if output else "",
                    "forking another" if not delay else
                    f"{deaths} in a row, the next fork in {delay:.2f} s")
        if output:
            log.debug("the spare's output:\n%s", output)
        if self._replace_timer is not None:
            self._replace_timer.cancel()
            self._replace_timer = None
        if delay:
            self._replace_timer = self._loop.call_later(delay, self._replace)
        else:
            self._top_up()

    async def _groups_for(self, pid: int, control: int) -> Groups:
        """A memory cgroup and a pids limit of its own for a spare, made off the event loop.

        The spare joins them itself (JOIN, which carries their v1 `tasks`
        files): moving a process from outside takes the kernel milliseconds
        and holds up every fork on the host meanwhile. Only cgroup v2 groups
        are moved into from here. `control` is a duplicate of the spare's
        channel, closed here.
        """
        name = f"{self.spec.name}-forked-{pid}"

        def create() -> Groups:
            channel = socket.socket(fileno=control)
            try:
                memory = self.env.memory.create(name, self.spec.memory_mb)
                pids = None
                if self.env.sandbox is not None:
                    try:
                        pids = self.env.sandbox.own_pids_limit(name, memory)
                    except OSError as exc:
                        log.warning("cannot give forked worker %s a pids limit of its own: %s; "
                                    "it shares its template's", pid, exc)
                groups = [group for group in (memory, pids) if group is not None]
                fds: list[int] = []
                names: list[str] = []
                try:
                    for group in groups:
                        directory = str(group.path if isinstance(group, WorkerCgroup) else group.pids_dir)
                        procs = os.path.join(directory, "cgroup.procs")
                        tasks = self_join_file(procs)
                        if tasks is None:
                            join_cgroups_of(pid, [procs])
                        else:
                            fds.append(os.open(tasks, os.O_WRONLY | os.O_CLOEXEC))
                            names.append(directory)
                    socket.send_fds(channel, [protocol.encode(
                        protocol.JOIN, orjson.dumps({"groups": names}))], fds)
                except OSError as exc:
                    # Without its JOIN the spare exits at its first frame:
                    # it never runs outside its groups.
                    log.warning("cannot move forked worker %s into its cgroups: %s", pid, exc)
                finally:
                    for fd in fds:
                        os.close(fd)
                return Groups(memory, pids)
            finally:
                channel.close()

        return await asyncio.to_thread(create)

    def _top_up(self) -> None:
        """Ask the template for the spares that `want_spares` and waiting calls lack."""
        if not self.ready:
            return
        if self.want_spares > 1 and time.monotonic() - self._short_at > SPARE_DECAY_S:
            self.want_spares -= 1
            self._short_at = time.monotonic()
        waiting = sum(1 for w in self._spare_waiters if not w.done())
        missing = self.want_spares + waiting - len(self._spares) - self._requested
        if missing > 0 and self._send(protocol.FORK, orjson.dumps({"count": missing})):
            self._requested += missing

    async def take_spare(self) -> Spare:
        """A spare for a new worker: one held already, else the next to arrive."""
        if not self.ready:
            raise TemplateGone("the template is not running")
        if self._spares:
            if self._replace_timer is None:
                self._replace_timer = self._loop.call_later(REPLACE_DELAY_S, self._replace)
            return self._spares.popleft()
        # A call waits for a fork: hold one spare more from now on.
        self._short_at = time.monotonic()
        self.want_spares = min(MAX_SPARES, self.want_spares + 1)
        waiter = self._loop.create_future()
        self._spare_waiters.append(waiter)
        self._top_up()
        if not self._requested and not waiter.done():
            waiter.cancel()
            raise TemplateGone("the template's channel is closed")
        try:
            spare = await asyncio.wait_for(waiter, FORK_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise TemplateGone(f"no fork within {FORK_TIMEOUT_S:g}s") from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._spares.appendleft(waiter.result())  # it arrived as the call gave up
            raise
        self._top_up()
        return spare

    def _replace(self) -> None:
        self._replace_timer = None
        self._top_up()

    def spare_served(self) -> None:
        """A spare became a worker: spares live here, the next that dies is replaced at once."""
        self._spare_deaths = 0

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

    def _close_channel(self) -> None:
        if self._replace_timer is not None:
            self._replace_timer.cancel()
            self._replace_timer = None
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        while self._spares:
            self._spares.popleft().discard()
        while (waiter := next_pending(self._spare_waiters)) is not None:
            waiter.set_exception(TemplateGone("the template's channel closed"))

    def _exited(self, returncode: int | None) -> None:
        super()._exited(returncode)
        for waiter in self._status_waiters.values():
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        self._close_channel()
        super().close()

    def to_json(self) -> dict:
        view = super().to_json()
        view.update(state="template", children=len(self.children), spares=len(self._spares))
        return view


def next_pending(waiters: deque[asyncio.Future]) -> asyncio.Future | None:
    """The first waiter still waiting, taken off the queue (cancelled ones are skipped)."""
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            return waiter
    return None


def _end_groups(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().end(task.get_loop())


class ForkedWorker(ProcessWorker):
    """A worker that came from a template's fork instead of a spawn."""

    def __init__(self, spec: FunctionSpec, env: WorkerEnvironment, template: Template) -> None:
        super().__init__(spec, env, command=[])
        self.template = template
        self.identity = template.identity  # a fork runs as its template does
        template.children.add(self.id)

    async def start(self) -> None:
        loop = self._loop
        started = time.monotonic()
        self._ready = loop.create_future()
        env = self.base_environment()
        # The per-call values a spawned worker gets in its environment.
        changes = {k: env[k] for k in ("AWS_LAMBDA_LOG_STREAM_NAME", "AWS_LAMBDA_INITIALIZATION_TYPE")}
        try:
            spare = await self.template.take_spare()
        except TemplateGone as exc:
            self.template.children.discard(self.id)
            raise WorkerInitError(FunctionError(INIT, "Runtime.Unknown", str(exc)),
                                  (time.monotonic() - started) * 1000, []) from exc
        self.pid = spare.pid
        self._pidfd = spare.pidfd
        loop.add_reader(self._pidfd, self._on_exit)  # at once if it has died already
        control = socket.socket(fileno=spare.control)
        try:
            # In its cgroups before START: from then on it runs user code.
            groups = await spare.groups
            self.cgroup, self.sandbox = groups.memory, groups.pids
            _, self._control = await loop.connect_accepted_socket(lambda: _Control(self), control)
        except BaseException:
            control.close()
            os.close(spare.output)
            raise
        self._log_init_start()
        # The import it starts from ran in the template: the first fork tells what it printed.
        for line in self.template.hand_over_init_logs():
            self._log_init(line)
        self._send(protocol.START, orjson.dumps({"id": self.id, "env": changes}))
        await self._await_ready(spare.output, started)
        self.template.spare_served()

    init_hint = "the forked worker never said READY"

    def _reap(self) -> None:
        # Not our child: its parent, the template, reaps it and reports how it ended.
        task = self._loop.create_task(self.template.exit_status(self.pid or 0))
        task.add_done_callback(lambda t: self._exited(None if t.cancelled() else t.result()))

    def _exited(self, returncode: int | None) -> None:
        super()._exited(returncode)
        self.template.children.discard(self.id)
