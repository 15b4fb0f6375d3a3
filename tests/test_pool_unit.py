"""Unit tests of faasd.pool: how calls without a free worker get one.

The workers here are stand-ins whose start the test controls; everything
else is the real FunctionPool.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from faasd.errors import INIT, FunctionError, ShuttingDown
from faasd.pool import CPU_BOUND_STARTS, MAX_STARTING, FunctionPool, PoolSettings
from faasd.spec import FunctionSpec
from faasd.workers import Worker, WorkerEnvironment, WorkerInitError, WorkerState


class GatedWorker(Worker):
    """Starts when the test opens its gate; fails to start if the gate says so.

    Its init takes `bench.init` (wall ms, CPU ms), as the pool would measure it.
    """

    def __init__(self, spec, env, bench: "Bench") -> None:
        super().__init__(spec, env)
        self.bench = bench
        self.gate: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        self.bench.starting.append(self)
        self.bench.most_starting = max(self.bench.most_starting, len(self.bench.starting))
        try:
            ok = await self.gate
        finally:
            self.bench.starting.remove(self)
        if not ok:
            self.exited.set_result(1)
            raise WorkerInitError(FunctionError(INIT, "Runtime.ExitError", "init failed"), 1.0, [])
        self.init_ms, self.init_cpu_ms = self.bench.init

    def freeze(self) -> None:
        pass

    def thaw(self) -> None:
        pass

    async def stop(self) -> None:
        if not self.exited.done():
            self.exited.set_result(0)


class Bench:
    def __init__(self, tmp_path: Path) -> None:
        self.starting: list[GatedWorker] = []
        self.most_starting = 0
        self.init = (50.0, 45.0)  # an interpreter start: CPU all the way
        self.spec = FunctionSpec(name="fn", runtime="python", handler="fn.handler",
                                 task_root=tmp_path, source=tmp_path / "fn.py", revision="r1")
        env = WorkerEnvironment(data_dir=tmp_path, memory=None)  # type: ignore[arg-type]
        self.pool = FunctionPool(self.spec, env, PoolSettings(zygote=False),
                                 factory=lambda spec, env: GatedWorker(spec, env, self))

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    def open_gates(self, ok: bool = True, count: int | None = None) -> None:
        for worker in list(self.starting)[:count]:
            if not worker.gate.done():
                worker.gate.set_result(ok)


@pytest.fixture
async def bench(tmp_path):
    return Bench(tmp_path)


async def test_a_burst_starts_as_many_workers_at_once_as_there_are_cores_and_every_call_gets_one(bench):
    calls = [asyncio.ensure_future(bench.pool.acquire()) for _ in range(CPU_BOUND_STARTS * 5)]
    await bench.settle()
    assert len(bench.starting) == CPU_BOUND_STARTS
    while not all(call.done() for call in calls):
        bench.open_gates()
        await bench.settle()
    assert bench.most_starting == CPU_BOUND_STARTS
    workers = [call.result()[0] for call in calls]
    assert len({w.id for w in workers}) == len(calls)  # nobody shares a worker
    assert all(cold for _, cold in (call.result() for call in calls))
    assert all(w.state is WorkerState.BUSY for w in workers)
    await bench.pool.close()


async def test_starts_that_mostly_wait_overlap_up_to_max_starting(bench):
    bench.init = (1000.0, 30.0)  # an init that waits on the network
    first = asyncio.ensure_future(bench.pool.acquire())
    await bench.settle()
    bench.open_gates()
    await first
    calls = [asyncio.ensure_future(bench.pool.acquire()) for _ in range(MAX_STARTING * 2)]
    await bench.settle()
    assert len(bench.starting) == MAX_STARTING
    bench.init = (60.0, 55.0)  # the code changed: its starts compute again
    bench.open_gates(count=1)
    await bench.settle()
    assert len(bench.starting) == MAX_STARTING - 1  # no new start until below the core count
    while not all(call.done() for call in calls):
        bench.open_gates()
        await bench.settle()
    await bench.pool.close()


async def test_a_released_worker_goes_to_the_longest_waiting_call_warm(bench):
    first = asyncio.ensure_future(bench.pool.acquire())
    await bench.settle()
    bench.open_gates()
    worker, cold = await first
    assert cold
    second, third = (asyncio.ensure_future(bench.pool.acquire()) for _ in range(2))
    await bench.settle()
    assert len(bench.starting) == 2  # a start under way for each of them
    bench.pool.release(worker, True)
    await bench.settle()
    assert second.done() and second.result() == (worker, False)
    assert not third.done()
    bench.open_gates()  # both starts finish; the spare one idles
    await bench.settle()
    third_worker, third_cold = third.result()
    assert third_cold and third_worker is not worker
    assert bench.pool.counts()["idle"] == 1
    await bench.pool.close()


async def test_a_failed_start_fails_one_waiting_call_and_the_others_start_again(bench):
    calls = [asyncio.ensure_future(bench.pool.acquire()) for _ in range(3)]
    await bench.settle()
    bench.open_gates(ok=False, count=1)
    await bench.settle()
    failed = [call for call in calls if call.done()]
    assert len(failed) == 1 and isinstance(failed[0].exception(), WorkerInitError)
    assert failed[0] is calls[0]  # the longest-waiting call reports the failure
    assert len(bench.starting) == 2
    bench.open_gates()
    await bench.settle()
    assert all(call.done() and call.result()[1] for call in calls[1:])
    await bench.pool.close()


async def test_a_call_cancelled_while_waiting_leaves_no_trace_and_its_worker_serves_the_next(bench):
    cancelled = asyncio.ensure_future(bench.pool.acquire())
    await bench.settle()
    cancelled.cancel()
    await bench.settle()
    assert cancelled.cancelled()
    bench.open_gates()  # the start it asked for ends with nobody waiting: the worker idles
    await bench.settle()
    assert bench.pool.counts()["idle"] == 1
    worker, cold = await bench.pool.acquire()
    assert not cold and worker.state is WorkerState.BUSY
    await bench.pool.close()


async def test_calls_still_waiting_when_the_pool_closes_are_refused_as_shutting_down(bench):
    call = asyncio.ensure_future(bench.pool.acquire())
    await bench.settle()
    closing = asyncio.ensure_future(bench.pool.close())
    await bench.settle()
    assert isinstance(call.exception(), ShuttingDown)
    bench.open_gates()
    await closing
    assert all(not w.alive for w in bench.pool.workers.values())


async def test_a_start_that_raises_anything_fails_one_call_with_an_init_error_and_the_pool_serves_on(bench):
    calls = [asyncio.ensure_future(bench.pool.acquire()) for _ in range(2)]
    await bench.settle()
    broken = bench.starting[0]
    broken.gate.set_exception(ValueError("embedded null byte"))
    await bench.settle()
    error = calls[0].exception()
    assert isinstance(error, WorkerInitError)
    assert (error.error.error_type, error.error.message) == (
        "Runtime.InvalidEntrypoint", "cannot start the runtime: embedded null byte")
    assert broken.id not in bench.pool.workers and not broken.alive
    bench.open_gates()
    await bench.settle()
    assert calls[1].result()[1]
    assert bench.pool.last_init_error is None
    later = asyncio.ensure_future(bench.pool.acquire())
    await bench.settle()
    bench.open_gates()
    await bench.settle()
    assert later.done() and later.result()[1]
    await bench.pool.close()
