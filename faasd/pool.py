"""Worker lifecycle: which worker serves the next call, and when workers sleep and die.

Every worker is in one state:

    STARTING --ready--> BUSY --release--> IDLE --freeze_after_ms--> FROZEN
                          ^                 |                          |
                          +----acquire------+<------acquire (SIGCONT)--+
    any --crash / timeout / OOM / stale code / keep_warm_s--> RETIRING --> gone

`acquire()` takes, in order: the most recently used idle worker, the most
recently frozen worker (still stopped: its `run()` sends SIGCONT right after
writing the call, so it wakes once, to the call), or the first worker to become
free, whether released by another call or newly started. Each waiting call
has a start under way for it, but only a few per function at a time: a
burst of a thousand calls starts workers as fast as they come up, and calls
that finish meanwhile serve the rest, instead of a thousand interpreters
fighting for two cores. Starting an interpreter and importing a handler is
CPU work, and more starts at once than there are cores only make each one
later: a function starts `CPU_BOUND_STARTS` (the number of cores) at once,
until one of its starts is seen to spend most of its time waiting (an init
that calls the network, say); then it starts up to `MAX_STARTING`. An idle worker is
frozen with SIGSTOP after `freeze_after_ms`; frozen longer than
`keep_warm_s`, it is retired, keeping `min_warm` workers per function. A
new code revision retires idle and frozen workers at once and busy ones as
they finish, so in-flight calls end on the old code.

Workers come from `workers.create_worker()`; the pool never knows which
runtime it holds, so a faster source of workers (a forking template) plugs in
there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

from .errors import ShuttingDown
from .spec import FunctionSpec
from .zygote import ForkedWorker, Template, TemplateGone, next_pending
from .workers import (
    HostShortage, Occasional, Worker, WorkerEnvironment, WorkerInitError, WorkerState, clear_bytecode,
    create_worker, start_failure,
)

log = logging.getLogger("faasd.pool")
# A host out of descriptors or processes fails every start at once: said once a minute.
SHORTAGES = Occasional(log)

# Worker starts under way at once for one function's waiting calls: as many
# as there are cores, or up to MAX_STARTING where starts mostly wait.
CPU_BOUND_STARTS = max(2, os.cpu_count() or 2)
MAX_STARTING = 16


@dataclass(frozen=True, kw_only=True)
class PoolSettings:
    freeze_after_ms: int = 100
    keep_warm_s: float = 600.0
    zygote: bool = True  # fork Python workers from a per-revision template (faasd/zygote.py)


WorkerFactory = Callable[[FunctionSpec, WorkerEnvironment], Worker]
# A worker whose init failed while its code was being written is started again, this many
# times at most: a file written to without end must not hold calls for ever.
CODE_RETRIES = 10


class CodeState(Protocol):
    """Whether a function's files are being written (faasd/registry.py)."""

    def writes(self, name: str) -> int | None: ...

    async def settled(self, name: str) -> int: ...


def explain_exit(returncode: int | None) -> str:
    if returncode is None:
        return "an unknown status"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        hint = " (perhaps out of memory, or killed by an operator?)" if name == "SIGKILL" else ""
        return f"signal {name}{hint}"
    return f"exit code {returncode}"


class FunctionPool:
    """The workers of one function."""

    def __init__(self, spec: FunctionSpec, env: WorkerEnvironment, settings: PoolSettings,
                 factory: WorkerFactory = create_worker, code: CodeState | None = None) -> None:
        self.spec = spec
        self.env = env
        self.settings = settings
        self.factory = factory
        self.code = code
        self.workers: dict[str, Worker] = {}
        self._idle: list[Worker] = []    # stack: the most recently used is last
        self._frozen: list[Worker] = []  # stack: the most recently frozen is last
        self._idle_since: dict[str, float] = {}  # loop time each idle worker was released
        self._freeze_timer: asyncio.TimerHandle | None = None
        self._frozen_at: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._waiters: deque[asyncio.Future[tuple[Worker, bool]]] = deque()  # calls without a worker
        self._starting = 0  # starts under way for waiting calls
        self.start_limit = CPU_BOUND_STARTS
        self.closing = False
        self.last_init_error: WorkerInitError | None = None
        self.template: Template | None = None
        self._old_templates: list[Template] = []  # retired, waiting for their children to go
        self._template_failed: str | None = None  # the revision whose template could not start
        # (revision, why): a revision whose template's state would not survive a
        # fork as a fresh worker's does; its workers start fresh.
        self._template_unsafe: tuple[str, str] | None = None
        self._template_used = 0.0
        self.cold_starts = 0
        self.retired = 0
        self._loop = asyncio.get_running_loop()

    # -- serving ----------------------------------------------------------------

    async def acquire(self) -> tuple[Worker, bool]:
        """A worker in state BUSY for one call, and whether it was started for it."""
        worker = self._take_ready()
        if worker is not None:
            worker.set_state(WorkerState.BUSY)
            return worker, False
        waiter: asyncio.Future[tuple[Worker, bool]] = self._loop.create_future()
        self._waiters.append(waiter)
        self._start_for_waiters()
        try:
            return await waiter
        except asyncio.CancelledError:
            if not waiter.done():
                self._waiters.remove(waiter)
            elif not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result()[0], True)  # handed over as the call was cancelled
            raise

    def wake_next(self) -> None:
        """A call is on its way (an HTTP request for the function is being read):
        wake the idle worker it will most likely get, so that the worker's core
        is up when the call is written. Only where the daemon will poll for that
        worker's reply (a quick function, a quiet daemon): under load, or for a
        slow function, the write would buy nothing."""
        replies = self.env.replies
        if self._idle and replies is not None:
            worker = self._idle[-1]
            if worker.spec.revision == self.spec.revision and replies.would_poll(worker.last_reply_s):
                worker.wake()

    def _take_ready(self) -> Worker | None:
        """The most recently used idle worker, else the most recently frozen one."""
        revision = self.spec.revision
        while self._idle:
            worker = self._idle.pop()
            self._idle_since.pop(worker.id, None)
            if worker.alive and worker.spec.revision == revision:
                return worker
            self.retire(worker)
        while self._frozen:
            worker = self._frozen.pop()
            self._frozen_at.pop(worker.id, None)
            if worker.alive and worker.spec.revision == revision:
                return worker  # still stopped: run() thaws it once its call is written
            self.retire(worker)
        return None

    def _start_for_waiters(self) -> None:
        """Start workers until every waiting call has one coming, a few at a time."""
        if self.closing:
            self._refuse_waiters()
            return
        while len(self._waiters) > self._starting and self._starting < self.start_limit:
            self._starting += 1
            self._background(self._start_for_waiter())

    async def _start_for_waiter(self) -> None:
        try:
            worker = await self._spawn()
        except WorkerInitError as exc:
            self._starting -= 1
            waiter = next_pending(self._waiters)
            if waiter is not None:  # this call reports the failed init; the others try again
                waiter.set_exception(exc)
            self._start_for_waiters()
            return
        except BaseException:
            self._starting -= 1
            raise
        self._starting -= 1
        waiter = next_pending(self._waiters) if worker.spec.revision == self.spec.revision else None
        if waiter is None:
            # Calls that finished meanwhile served every waiter (or the code
            # changed while it started): it idles, or retires.
            self.release(worker, True)
        else:
            worker.set_state(WorkerState.BUSY)
            self.cold_starts += 1
            waiter.set_result((worker, True))
        self._start_for_waiters()

    def _refuse_waiters(self) -> None:
        while (waiter := next_pending(self._waiters)) is not None:
            waiter.set_exception(ShuttingDown("faasd is shutting down"))

    def _learn_from_start(self, worker: Worker) -> None:
        """Let starts overlap more only if this one mostly waited instead of computing."""
        init_ms, cpu_ms = worker.init_ms, worker.init_cpu_ms
        if init_ms is not None and cpu_ms is not None:
            waited = init_ms >= 100 and cpu_ms < 0.25 * init_ms
            self.start_limit = MAX_STARTING if waited else CPU_BOUND_STARTS

    def release(self, worker: Worker, reusable: bool) -> None:
        """Give a worker back after a call; it idles, or retires if it cannot serve again."""
        if (not reusable or self.closing or not worker.alive
                or worker.spec.revision != self.spec.revision):
            self.retire(worker)
            self._start_for_waiters()
            return
        waiter = next_pending(self._waiters)
        if waiter is not None:
            worker.set_state(WorkerState.BUSY)
            waiter.set_result((worker, False))
            return
        worker.set_state(WorkerState.IDLE)
        self._idle.append(worker)
        self._idle_since[worker.id] = self._loop.time()
        if self._freeze_timer is None:
            self._freeze_timer = self._loop.call_later(
                self.settings.freeze_after_ms / 1000, self._freeze_due)

    def _freeze_due(self) -> None:
        """Freeze every worker idle for freeze_after_ms; one timer per pool, not per call."""
        self._freeze_timer = None
        delay = self.settings.freeze_after_ms / 1000
        now = self._loop.time()
        # The idle stack is in release order: the bottom has waited longest.
        while self._idle:
            worker = self._idle[0]
            since = self._idle_since.get(worker.id, now)
            if since + delay > now:
                self._freeze_timer = self._loop.call_at(since + delay, self._freeze_due)
                return
            self._idle.pop(0)
            self._idle_since.pop(worker.id, None)
            if worker.alive and worker.state is WorkerState.IDLE:
                self._freeze(worker)

    def _freeze(self, worker: Worker) -> None:
        worker.freeze()
        worker.set_state(WorkerState.FROZEN)
        # Keep the stack ordered by freeze time: the most recently used worker
        # (warmest caches) is thawed first, the least recently used retires first.
        self._frozen.append(worker)
        self._frozen_at[worker.id] = time.monotonic()

    async def start_again(self) -> Worker:
        """A new worker for the call whose worker has just failed its init, started now
        and for that call alone (BUSY): Lambda tries a failed init again in the invoke
        phase of the call it failed for. Its start logs no INIT_START, as Lambda writes
        none for that init. Raises WorkerInitError as the first start did, or ShuttingDown."""
        if self.closing:
            raise ShuttingDown("faasd is shutting down")
        worker = await self._spawn(phase="invoke")
        worker.set_state(WorkerState.BUSY)
        self.cold_starts += 1
        return worker

    async def _spawn(self, phase: str = "init") -> Worker:
        """A new worker, started; whatever keeps it from starting is a WorkerInitError
        (a HostShortage when the host lacks something: no init error of the function).
        `phase`: Lambda's phase its init runs in (Worker.init_phase).

        A file being written in place is half there: a worker starts once none
        of the function's files is, and one whose init failed while its code was
        written to (it may have read half of it) is started again.
        """
        attempts = 0
        while True:
            attempts += 1
            mark = await self._code_settled()
            try:
                return await self._spawn_once(phase)
            except WorkerInitError as exc:
                if isinstance(exc, HostShortage) or not self._rewritten(mark) or attempts >= CODE_RETRIES:
                    raise
            log.info("function %s: a worker's init failed while its code was being written; "
                     "starting it again once the code is complete", self.spec.name)

    async def _code_settled(self) -> int | None:
        """Wait until no file of the function is being written; a mark for `_rewritten`."""
        return await self.code.settled(self.spec.name) if self.code is not None else None

    def _rewritten(self, mark: int | None) -> bool:
        """Whether the function's files were written to since `mark` was taken."""
        return self.code is not None and self.code.writes(self.spec.name) != mark

    async def _spawn_once(self, phase: str = "init") -> Worker:
        try:
            return await self._new_worker(phase)
        except Exception as exc:
            failure = start_failure(exc)
            if isinstance(failure, HostShortage):
                SHORTAGES.error("function %s: %s", self.spec.name, failure.error.message)
            else:
                if failure is not exc:
                    log.error("cannot start a worker of %s", self.spec.name, exc_info=exc)
                self.last_init_error = failure
            if failure is exc:
                raise
            raise failure from exc

    async def _new_worker(self, phase: str = "init") -> Worker:
        """A new worker: forked from the revision's template when one is ready, else spawned."""
        template = self.template
        if template is not None and template.ready and template.spec.revision == self.spec.revision:
            self._template_used = time.monotonic()
            try:
                return await self._start(ForkedWorker(self.spec, self.env, template), phase)
            except WorkerInitError as exc:
                if not isinstance(exc.__cause__, TemplateGone):
                    raise
                log.warning("template of %s cannot fork (%s); starting a worker from scratch",
                            self.spec.name, exc.__cause__)
                self._drop_template(template)
        worker = await self._start(self.factory(self.spec, self.env), phase)
        self._ensure_template()
        return worker

    async def _start(self, worker: Worker, phase: str = "init") -> Worker:
        worker.init_phase = phase
        self.workers[worker.id] = worker
        worker.exited.add_done_callback(lambda _: self._on_exit(worker))
        try:
            await worker.start()
        except BaseException:
            self._forget(worker)
            await worker.stop()
            raise
        self.last_init_error = None
        self._learn_from_start(worker)
        return worker

    def _on_exit(self, worker: Worker) -> None:
        if worker.state not in (WorkerState.RETIRING, WorkerState.BUSY, WorkerState.STARTING):
            log.warning("worker %s (pid %s) of %s died while %s, with %s",
                        worker.id, worker.pid, self.spec.name, worker.state.value,
                        explain_exit(worker.returncode))
            self.retire(worker)
            self._start_prewarm()

    def _forget(self, worker: Worker) -> None:
        self.workers.pop(worker.id, None)
        self._idle_since.pop(worker.id, None)
        self._frozen_at.pop(worker.id, None)
        for stack in (self._idle, self._frozen):
            if worker in stack:
                stack.remove(worker)

    def retire(self, worker: Worker) -> None:
        """Stop a worker in the background; it leaves the pool now."""
        if worker.state is WorkerState.RETIRING:
            return
        worker.set_state(WorkerState.RETIRING)
        self._forget(worker)
        self.workers[worker.id] = worker  # listed as retiring until it is gone
        self.retired += 1
        self._background(self._stop(worker))

    async def _stop(self, worker: Worker) -> None:
        try:
            await worker.stop()
        finally:
            self.workers.pop(worker.id, None)

    def _background(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- keeping warm -----------------------------------------------------------

    def live_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.state is not WorkerState.RETIRING)

    def _start_prewarm(self) -> None:
        if not self.closing and self.spec.ok and self.live_count() < self.spec.min_warm:
            self._background(self.prewarm())

    async def prewarm(self) -> None:
        """Start workers until `min_warm` are alive; each idles (then freezes) when ready."""
        while not self.closing and self.spec.ok and self.live_count() < self.spec.min_warm:
            try:
                worker = await self._spawn()
            except WorkerInitError as exc:
                log.error("cannot prewarm %s: %s", self.spec.name, exc)
                return
            self.release(worker, True)

    # -- templates ----------------------------------------------------------------

    def _ensure_template(self) -> None:
        """Start this revision's template in the background, once, if Python and enabled."""
        if (not self.settings.zygote or self.closing or self.spec.runtime != "python"
                or self._template_failed == self.spec.revision
                or self.not_fork_safe):
            return
        sandbox = self.env.sandbox
        if sandbox is not None and not sandbox.mount:
            # Without mount namespaces a forked worker's /tmp would escape the
            # per-worker quota the daemon measures: spawn every worker instead.
            return
        current = self.template
        if current is not None and current.spec.revision == self.spec.revision and current.alive:
            return
        if current is not None:
            self._drop_template(current)
        template = self.template = Template(self.spec, self.env)
        template.exited.add_done_callback(lambda _: self._template_exited(template))
        self._background(self._start_template(template))

    async def _start_template(self, template: Template) -> None:
        mark = await self._code_settled()
        try:
            await template.start()
        except Exception as exc:
            # Its workers would fail the same way; spawned workers report it. A
            # shortage of the host's passes, and so does code read half-written:
            # the next worker started tries again.
            failure = start_failure(exc)
            if isinstance(failure, HostShortage):
                SHORTAGES.error("function %s: %s", self.spec.name, failure.error.message)
            elif not self._rewritten(mark):
                log.warning("no template for %s: %s", self.spec.name, failure)
                self._template_failed = template.spec.revision
            self._drop_template(template)
            return
        if template.unsafe:
            # A fork would start from the state its init left: a socket every
            # fork reads and writes, threads no fork has, files in a /tmp that
            # is not the fork's. Each worker runs that init itself instead.
            log.warning("%s: %s; its workers start fresh, each with its own init, instead of "
                        "forked from a template", self.spec.name, template.unsafe)
            self._template_unsafe = (template.spec.revision, template.unsafe)
            self._drop_template(template)
            return
        template.set_state(WorkerState.IDLE)
        self._template_used = time.monotonic()

    def _template_exited(self, template: Template) -> None:
        if self.template is template:
            self.template = None
            if not self.closing:
                log.warning("template %s (pid %s) of %s died with %s", template.id, template.pid,
                            self.spec.name, explain_exit(template.returncode))
        if template in self._old_templates:
            self._old_templates.remove(template)
        if template.state is not WorkerState.RETIRING and not self.closing:
            # Died on its own: nothing else would end what it leaves (its
            # cgroups, tmp dir, channel, the spares it held).
            template.set_state(WorkerState.RETIRING)
            self._background(template.stop())

    def _drop_template(self, template: Template) -> None:
        """Stop using a template; it stops once its last forked worker has gone."""
        if self.template is template:
            self.template = None
        if template not in self._old_templates:
            self._old_templates.append(template)
        self._stop_unused_templates()

    def _stop_unused_templates(self) -> None:
        for template in list(self._old_templates):
            if not template.children:
                self._old_templates.remove(template)
                template.set_state(WorkerState.RETIRING)
                self._background(template.stop())

    def template_json(self) -> dict | None:
        """The revision's template; {"state": "off", "reason"} where it was found
        not fork-safe; None while there is none."""
        if self.template is not None:
            return self.template.to_json()
        if self.not_fork_safe:
            return {"state": "off", "reason": self.not_fork_safe}
        return None

    @property
    def not_fork_safe(self) -> str:
        """Why this revision's workers are not forked from a template, or ""."""
        unsafe = self._template_unsafe
        return unsafe[1] if unsafe is not None and unsafe[0] == self.spec.revision else ""

    def sweep(self, now: float) -> None:
        """Retire workers frozen longer than keep_warm_s, oldest first, keeping min_warm."""
        self._stop_unused_templates()
        template = self.template
        if (template is not None and template.ready and not template.children
                and self.live_count() == 0
                and now - self._template_used >= self.settings.keep_warm_s):
            log.info("retiring the template of %s: unused for over %gs",
                     self.spec.name, self.settings.keep_warm_s)
            self._drop_template(template)
        keep = self.spec.min_warm
        while self._frozen and self.live_count() > keep:
            oldest = self._frozen[0]
            if now - self._frozen_at.get(oldest.id, now) < self.settings.keep_warm_s:
                break
            log.info("retiring worker %s of %s: frozen for over %gs",
                     oldest.id, self.spec.name, self.settings.keep_warm_s)
            self.retire(oldest)

    def update(self, spec: FunctionSpec) -> None:
        """New code or config: idle and frozen workers go now, busy ones when done."""
        if spec.revision != self.spec.revision and spec.runtime == "python":
            clear_bytecode(spec)
        self.spec = spec
        for worker in list(self._idle) + list(self._frozen):
            if worker.spec.revision != spec.revision:
                self.retire(worker)
        if self.template is not None and self.template.spec.revision != spec.revision:
            self._drop_template(self.template)
        self._start_prewarm()

    async def close(self) -> None:
        """Stop every worker. Busy ones are killed: the invoker drains before this."""
        self.closing = True
        self._refuse_waiters()
        if self._freeze_timer is not None:
            self._freeze_timer.cancel()
            self._freeze_timer = None
        for worker in list(self.workers.values()):
            if worker.state is not WorkerState.RETIRING:
                self.retire(worker)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        # Workers first: a template's children die with it.
        templates = self._old_templates + ([self.template] if self.template else [])
        self.template, self._old_templates = None, []
        await asyncio.gather(*(t.stop() for t in templates), return_exceptions=True)

    def to_json(self) -> list[dict]:
        return [w.to_json() for w in self.workers.values()]

    def counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in WorkerState}
        for worker in self.workers.values():
            counts[worker.state.value] += 1
        return counts


class WorkerPool:
    """Every function's pool, plus the sweeper that retires long-frozen workers."""

    def __init__(self, env: WorkerEnvironment, settings: PoolSettings,
                 factory: WorkerFactory = create_worker, code: CodeState | None = None) -> None:
        self.env = env
        self.settings = settings
        self.factory = factory
        self.code = code
        self.pools: dict[str, FunctionPool] = {}
        self._sweeper: asyncio.Task | None = None

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    def get(self, spec: FunctionSpec) -> FunctionPool:
        pool = self.pools.get(spec.name)
        if pool is None:
            pool = self.pools[spec.name] = FunctionPool(spec, self.env, self.settings, self.factory,
                                                        self.code)
        elif pool.spec.revision != spec.revision or pool.spec is not spec:
            pool.update(spec)
        return pool

    def function_changed(self, old: FunctionSpec | None, new: FunctionSpec | None) -> None:
        """Registry listener: keep pools in step with functions/."""
        if new is None:
            if old is not None and old.name in self.pools:
                pool = self.pools.pop(old.name)
                asyncio.get_running_loop().create_task(pool.close())
            return
        pool = self.get(new)
        if new.ok and new.min_warm:
            pool._start_prewarm()

    async def _sweep_forever(self) -> None:
        interval = min(1.0, self.settings.keep_warm_s / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for pool in list(self.pools.values()):
                pool.sweep(now)

    def refuse_waiting(self) -> None:
        """Refuse (ShuttingDown) every call still waiting for a worker: it never started."""
        for pool in self.pools.values():
            pool._refuse_waiters()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.gather(*(pool.close() for pool in self.pools.values()),
                             return_exceptions=True)
        self.pools.clear()
