"""Unit tests of faasd.cluster.workqueue: how a node settles an event whose outcome it cannot record."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from types import SimpleNamespace

import orjson
import pytest

from faasd.cluster import workqueue
from faasd.cluster.topology import Names
from faasd.cluster.workqueue import ClusterQueue, Job
from faasd.errors import HANDLED, FunctionError
from faasd.invoker import Invocation
from faasd.spec import AsyncConfig


class Message:
    """An event as the broker delivers it; records how it was settled."""

    def __init__(self, job: Job) -> None:
        sent = job.to_message()
        self.headers, self.message_id, self.body = sent.headers, sent.message_id, sent.body
        self.reply_to = self.correlation_id = None
        self.settled: list[str] = []

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append("nack")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append("reject")


async def until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


class Invoker:
    draining = False

    def __init__(self) -> None:
        self.calls = 0

    async def invoke(self, function: str, payload: bytes, **_) -> Invocation:
        self.calls += 1
        return Invocation("r-1", function, error=FunctionError(HANDLED, "ValueError", "bad input"))


@pytest.mark.asyncio
async def test_a_dead_letter_the_disk_refuses_is_held_unacknowledged_and_written_once_it_can_be(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(workqueue, "OUTCOME_RETRY_FIRST_S", 0.01)
    spec = SimpleNamespace(name="flaky", ok=True, async_config=AsyncConfig(max_retries=0))
    registry = SimpleNamespace(get=lambda name: spec if name == "flaky" else None)
    invoker = Invoker()
    events = ClusterQueue(link=None, names=Names("test"), registry=registry, invoker=invoker,
                          data_dir=tmp_path, region="us-east-1", prefetch=1, max_concurrency=10,
                          node="a", inbox="inbox")
    refusals = 0
    written = asyncio.Event()
    write = workqueue.write_file_durably

    def disk_full_for_a_while(path, data):
        nonlocal refusals
        if refusals < 4:
            refusals += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data)
        written.set()

    monkeypatch.setattr(workqueue, "write_file_durably", disk_full_for_a_while)
    caplog.set_level(logging.INFO, logger="faasd.cluster")
    message = Message(Job("flaky", "r-1", b'{"n": 1}', "api", time.time()))
    handling = asyncio.create_task(events._handle("flaky", "faasd.cluster.test.fn.flaky", message))
    await until(lambda: refusals >= 2 or handling.done())
    # Held: neither handed back (to run again) nor acknowledged (and lost).
    assert message.settled == []
    assert events.held_back() == "1 dead letter(s) not yet written (No space left on device); trying again"
    await asyncio.wait_for(handling, 5)
    assert written.is_set() and message.settled == ["ack"]
    assert invoker.calls == 1  # the event ran once
    record = orjson.loads((tmp_path / "dead-letter" / "flaky" / "r-1.json").read_bytes())
    assert record["requestContext"]["condition"] == "RetriesExhausted"
    assert events.held_back() is None
    assert events.function_stats("flaky")["dead_lettered"] == 1
    told = [r for r in caplog.records if r.name == "faasd.cluster"]
    errors = [r for r in told if r.levelno >= logging.ERROR and "cannot write" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is None  # one line, no traceback
    assert "cluster: every dead letter held back is written" in [r.getMessage() for r in told]
