"""Unit tests of faasd.workers.ReplyPoller: the event loop polls, not sleeps, while a quick
reply is due, and sleeps as before otherwise."""

from __future__ import annotations

import asyncio
import selectors
import time

from faasd.workers import ReplyPoller


class RecordingSelector(selectors.DefaultSelector):
    """The loop's selector, noting the timeout of every wait: 0 is a poll, anything else a sleep."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    def select(self, timeout=None):
        self.timeouts.append(timeout)
        return super().select(timeout)


def run(coro_fn):
    selector = RecordingSelector()
    loop = asyncio.SelectorEventLoop(selector)
    try:
        return loop.run_until_complete(coro_fn(selector))
    finally:
        loop.close()


def polls(timeouts: list[float | None]) -> int:
    return sum(1 for timeout in timeouts if timeout == 0)


# A loop left alone also polls now and then: a timer fires, and the coroutine
# it wakes runs after one more select with no timeout. Fewer polls than this
# in 20 ms is a loop that sleeps; the poller makes hundreds.
ASLEEP = 2


def test_while_a_reply_is_due_the_loop_polls_instead_of_sleeping():
    async def scenario(selector: RecordingSelector) -> tuple[int, int]:
        poller = ReplyPoller(window_s=10.0)
        reply = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.02, reply.set_result, b"ok")
        assert poller.begin(last_reply_s=0.0)
        selector.timeouts.clear()
        await reply
        poller.end()
        waited = list(selector.timeouts)
        selector.timeouts.clear()
        await asyncio.sleep(0.02)  # answered: nothing to poll for
        return polls(waited), polls(selector.timeouts)

    while_waiting, after = run(scenario)
    assert while_waiting > 10 * ASLEEP  # it polled all along the 20 ms
    assert after <= ASLEEP


def test_without_a_call_in_flight_the_loop_sleeps():
    async def scenario(selector: RecordingSelector) -> list[float | None]:
        ReplyPoller(window_s=10.0)
        selector.timeouts.clear()
        await asyncio.sleep(0.02)
        return selector.timeouts

    timeouts = run(scenario)
    assert polls(timeouts) <= ASLEEP and timeouts


def test_polling_stops_when_the_window_ends_though_the_reply_has_not_come():
    async def scenario(selector: RecordingSelector) -> tuple[int, int]:
        poller = ReplyPoller(window_s=0.005)
        assert poller.begin(last_reply_s=0.0)
        started = time.monotonic()
        while time.monotonic() - started < 0.05:
            await asyncio.sleep(0.01)
        selector.timeouts.clear()
        await asyncio.sleep(0.05)  # the call is still out, past the window
        later = polls(selector.timeouts)
        poller.end()
        return later, len(selector.timeouts)

    later, waits = run(scenario)
    assert later <= ASLEEP and waits > 0


def test_a_worker_that_answered_slowly_last_time_is_not_polled_for():
    async def scenario(selector: RecordingSelector) -> tuple[bool, int]:
        poller = ReplyPoller(window_s=0.001)
        selector.timeouts.clear()
        polled = poller.begin(last_reply_s=0.050)
        await asyncio.sleep(0.02)
        return polled, polls(selector.timeouts)

    polled, count = run(scenario)
    assert polled is False and count <= ASLEEP


def test_with_more_calls_out_than_spare_cores_it_does_not_poll():
    async def scenario(selector: RecordingSelector) -> tuple[int, int]:
        poller = ReplyPoller(window_s=10.0, max_waiting=1)
        assert poller.begin(0.0) and poller.begin(0.0)  # two calls out, room for one
        selector.timeouts.clear()
        await asyncio.sleep(0.02)
        crowded = polls(selector.timeouts)
        poller.end()
        poller.end()
        assert poller.begin(0.0)  # one call out
        selector.timeouts.clear()
        await asyncio.sleep(0.02)
        poller.end()
        return crowded, polls(selector.timeouts)

    crowded, alone = run(scenario)
    assert crowded <= ASLEEP
    assert alone > 10 * ASLEEP


def test_on_a_single_core_it_never_polls():
    """There is no other core to keep awake: the worker needs the daemon's."""
    async def scenario(selector: RecordingSelector) -> int:
        poller = ReplyPoller(window_s=10.0, max_waiting=0)
        assert poller.begin(0.0)
        selector.timeouts.clear()
        await asyncio.sleep(0.02)
        poller.end()
        return polls(selector.timeouts)

    assert run(scenario) <= ASLEEP


def test_a_daemon_confined_to_one_core_never_polls():
    """By default it counts the cores the daemon may run on (taskset, systemd's
    CPUAffinity=), not the machine's."""
    import subprocess
    import sys

    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from faasd.workers import ReplyPoller; print(ReplyPoller(window_s=0.001).max_waiting)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "0"
