"""WAKE: a call is on its way, so the daemon wakes the worker it will most likely get
while it still builds the call (faasd/pool.py's wake_next, faasd/protocol.py's WAKE)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from faasd.limits import MemoryLimits
from faasd.pool import FunctionPool, PoolSettings
from faasd.spec import FunctionSpec
from faasd.workers import ReplyPoller, Worker, WorkerEnvironment, create_worker

RUNTIMES = {
    "python": ("fn.py", "def handler(event, context):\n    return event\n", "fn.handler"),
    "node": ("fn.mjs", "export const handler = async (event) => event;\n", "fn.handler"),
}


def context_switches(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines()
                    if line.startswith("voluntary_ctxt_switches:")).split()[1])


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
async def test_a_woken_worker_wakes_and_then_serves_its_call(tmp_path, runtime):
    filename, source, handler = RUNTIMES[runtime]
    (tmp_path / filename).write_text(source)
    spec = FunctionSpec(name="fn", runtime=runtime, handler=handler, task_root=tmp_path,
                        source=tmp_path / filename, revision="r1")
    env = WorkerEnvironment(data_dir=tmp_path / "data", memory=MemoryLimits("monitor", None))
    worker = create_worker(spec, env)
    await worker.start()
    try:
        for n in range(3):
            await asyncio.sleep(0.05)  # idle, blocked in its read
            before = context_switches(worker.pid)
            worker.wake()
            deadline = time.monotonic() + 5
            while context_switches(worker.pid) == before and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert context_switches(worker.pid) > before, "the WAKE did not wake the worker"
            result = await worker.run(f"call-{n}", b'{"n": %d}' % n, time.time() + 5, lambda line: None)
            assert (result.payload, result.error) == (b'{"n":%d}' % n if runtime == "node"
                                                      else b'{"n": %d}' % n, None)
    finally:
        await worker.stop()


class IdleWorker(Worker):
    """A worker that is up at once and notes its wakes."""

    def __init__(self, spec, env) -> None:
        super().__init__(spec, env)
        self.wakes = 0

    async def start(self) -> None:
        self.init_ms = self.init_cpu_ms = 1.0

    def freeze(self) -> None:
        self.frozen = True

    def thaw(self) -> None:
        self.frozen = False

    def wake(self) -> None:
        self.wakes += 1

    async def stop(self) -> None:
        if not self.exited.done():
            self.exited.set_result(0)


def pool_with(tmp_path: Path, replies: ReplyPoller | None) -> FunctionPool:
    spec = FunctionSpec(name="fn", runtime="python", handler="fn.handler", task_root=tmp_path,
                        source=tmp_path / "fn.py", revision="r1")
    env = WorkerEnvironment(data_dir=tmp_path, memory=None, replies=replies)  # type: ignore[arg-type]
    return FunctionPool(spec, env, PoolSettings(zygote=False, freeze_after_ms=60_000),
                        factory=lambda spec, env: IdleWorker(spec, env))


async def two_idle_workers(pool: FunctionPool) -> tuple[Worker, Worker]:
    (first, _), (second, _) = await pool.acquire(), await pool.acquire()
    pool.release(first, True)
    pool.release(second, True)  # the most recently released: the next call's
    return first, second


async def test_it_wakes_the_idle_worker_the_next_call_will_get(tmp_path):
    pool = pool_with(tmp_path, ReplyPoller(window_s=0.001, max_waiting=1))
    first, second = await two_idle_workers(pool)
    pool.wake_next()
    assert (first.wakes, second.wakes) == (0, 1)
    assert (await pool.acquire())[0] is second
    await pool.close()


async def test_no_wake_where_the_daemon_would_not_poll_for_the_reply(tmp_path):
    quiet = pool_with(tmp_path, None)  # [workers] reply_poll_us = 0
    first, second = await two_idle_workers(quiet)
    quiet.wake_next()
    assert first.wakes == second.wakes == 0
    await quiet.close()

    slow = pool_with(tmp_path, ReplyPoller(window_s=0.001, max_waiting=1))
    first, second = await two_idle_workers(slow)
    second.last_reply_s = 0.5  # its last call took half a second
    slow.wake_next()
    assert first.wakes == second.wakes == 0
    await slow.close()


async def test_no_wake_for_a_frozen_worker_or_when_none_is_idle(tmp_path):
    pool = pool_with(tmp_path, ReplyPoller(window_s=0.001, max_waiting=1))
    pool.wake_next()  # nothing started yet: nothing to wake, nothing started
    assert pool.workers == {}
    first, second = await two_idle_workers(pool)
    for worker in (first, second):  # as freeze_after_ms would
        pool._idle.remove(worker)
        pool._freeze(worker)
    pool.wake_next()
    assert first.wakes == second.wakes == 0
    await pool.close()
