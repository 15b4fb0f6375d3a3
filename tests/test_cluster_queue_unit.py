"""Unit tests of faasd.cluster.workqueue: how a node settles an event whose outcome it cannot
record, or whose processing raises."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from dataclasses import replace
from types import SimpleNamespace

import aiormq
import orjson
import pytest

from faasd import queue as embedded_queue
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
        self.reply_to, self.correlation_id = sent.reply_to, sent.correlation_id
        self.channel = SimpleNamespace(is_closed=False)  # the channel it came on
        self.settled: list[str] = []

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append("nack")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append("reject, requeue" if requeue else "reject")


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
    monkeypatch.setattr(embedded_queue, "OUTCOME_RETRY_FIRST_S", 0.01)
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


@pytest.mark.asyncio
async def test_a_dead_letter_held_back_is_left_to_the_broker_once_the_connection_it_came_on_is_gone(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(embedded_queue, "OUTCOME_RETRY_FIRST_S", 0.01)
    spec = SimpleNamespace(name="flaky", ok=True, async_config=AsyncConfig(max_retries=0))
    registry = SimpleNamespace(get=lambda name: spec if name == "flaky" else None)
    events = ClusterQueue(link=None, names=Names("test"), registry=registry, invoker=Invoker(),
                          data_dir=tmp_path, region="us-east-1", prefetch=1, max_concurrency=10,
                          node="a", inbox="inbox")
    refusals = 0

    def disk_full(path, data):
        nonlocal refusals
        refusals += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(workqueue, "write_file_durably", disk_full)
    caplog.set_level(logging.INFO, logger="faasd.cluster")
    message = Message(Job("flaky", "r-1", b'{"n": 1}', "api", time.time()))
    handling = asyncio.create_task(events._handle("flaky", "faasd.cluster.test.fn.flaky", message))
    await until(lambda: refusals >= 2 or handling.done())
    assert events.held_back() is not None
    message.channel.is_closed = True  # the connection dropped: the broker has the event back
    await asyncio.wait_for(handling, 5)
    # Its next delivery runs it again and writes its own dead letter: this one would be a second.
    assert message.settled == [] and not (tmp_path / "dead-letter" / "flaky").exists()
    assert events.held_back() is None and events.function_stats("flaky")["held_here"] == 0
    told = [r for r in caplog.records if r.name == "faasd.cluster" and r.levelno >= logging.WARNING]
    assert [r.levelname for r in told] == ["ERROR", "WARNING"] and not any(r.exc_info for r in told)
    assert told[1].getMessage() == (
        "cluster: the connection that delivered flaky r-1 closed before its dead letter was written "
        "(No space left on device); the broker delivers the event again, and it runs again")


# -- a retry or destination record the broker refuses -----------------------------------------

REFUSAL = ("PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'faasd.cluster.test.fn.ship' "
           "in vhost '/': received the value 'quorum' of type 'longstr' but current is none")


class Link:
    connected = True
    state = {"url": "amqp://127.0.0.1:5672/", "state": "connected"}

    async def wait(self, timeout: float | None) -> object:
        return object()


class Publisher:
    """The node's publishing channel: refuses the first `refusals` publishes, as the broker refuses
    a queue declared with other arguments (and closes the channel, which aio-pika reopens)."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.tried = 0
        self.published: list[tuple[str, bytes]] = []
        self.default_exchange = SimpleNamespace(publish=self._publish)

    async def declare_queue(self, name: str, **_) -> None:
        self.tried += 1
        if self.refusals:
            self.refusals -= 1
            raise aiormq.exceptions.ChannelPreconditionFailed(REFUSAL)

    async def _publish(self, message, routing_key: str, **_) -> None:
        self.published.append((routing_key, message.body))


class Outcomes(Invoker):
    """Fails while `failing`, then succeeds."""

    def __init__(self, failing: bool) -> None:
        super().__init__()
        self.failing = failing

    async def invoke(self, function: str, payload: bytes, **_) -> Invocation:
        self.calls += 1
        if self.failing:
            return Invocation("r-1", function, error=FunctionError(HANDLED, "ValueError", "bad input"))
        return Invocation("r-1", function, payload=b'"shipped"')


def node(tmp_path, invoker: Invoker, publisher: Publisher, config: AsyncConfig) -> ClusterQueue:
    specs = {"orders": SimpleNamespace(name="orders", ok=True, async_config=config),
             "ship": SimpleNamespace(name="ship", ok=True, async_config=AsyncConfig())}
    registry = SimpleNamespace(get=specs.get)
    events = ClusterQueue(link=Link(), names=Names("test"), registry=registry, invoker=invoker,
                          data_dir=tmp_path, region="us-east-1", prefetch=1, max_concurrency=10,
                          node="a", inbox="inbox")
    events._publisher = publisher
    return events


# A failed attempt with retries left goes to a delay queue; a success to its on_success function.
CASES = {
    "retry": (True, AsyncConfig(max_retries=2, retry_delays_s=(60.0,)),
              "faasd.cluster.test.fn.orders.delay.60000"),
    "destination": (False, AsyncConfig(on_success="function:ship"), "faasd.cluster.test.fn.ship"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", sorted(CASES))
async def test_an_outcome_the_broker_refuses_is_held_unacknowledged_and_sent_once_it_takes_it(
        case, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(embedded_queue, "OUTCOME_RETRY_FIRST_S", 0.01)
    failing, config, queue = CASES[case]
    invoker, publisher = Outcomes(failing), Publisher(refusals=4)
    events = node(tmp_path, invoker, publisher, config)
    caplog.set_level(logging.INFO, logger="faasd.cluster")
    message = Message(Job("orders", "r-1", b'{"n": 1}', "api", time.time()))
    handling = asyncio.create_task(events._handle("orders", "faasd.cluster.test.fn.orders", message))
    await until(lambda: publisher.tried >= 2 or handling.done())
    # Held: neither handed back (to run again) nor acknowledged (and lost).
    assert message.settled == []
    assert events.unsent() == (f"1 event(s) held back, the broker refusing what they send to {queue}; "
                               "trying again")
    await asyncio.wait_for(handling, 5)
    assert message.settled == ["ack"]
    assert invoker.calls == 1  # the event ran once
    assert [routing_key for routing_key, _ in publisher.published] == [queue]
    assert events.unsent() is None
    figures = events.function_stats("orders")
    assert (figures["retried"], figures["succeeded"], figures["held_here"]) == (
        (1, 0, 0) if failing else (0, 1, 0))
    told = [r for r in caplog.records if r.name == "faasd.cluster"]
    errors = [r for r in told if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, errors  # one line, no traceback
    said = errors[0].getMessage()
    assert queue in said and "exists on the broker with other settings" in said and "not run again" in said
    assert f"cluster: {queue} takes events again; what was held back for it is sent" in [
        r.getMessage() for r in told]


@pytest.mark.asyncio
async def test_an_outcome_held_back_is_left_to_the_broker_once_the_connection_it_came_on_is_gone(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(embedded_queue, "OUTCOME_RETRY_FIRST_S", 0.01)
    invoker, publisher = Outcomes(failing=False), Publisher(refusals=1000)
    events = node(tmp_path, invoker, publisher, AsyncConfig(on_success="function:ship"))
    caplog.set_level(logging.INFO, logger="faasd.cluster")
    message = Message(Job("orders", "r-1", b'{"n": 1}', "api", time.time()))
    handling = asyncio.create_task(events._handle("orders", "faasd.cluster.test.fn.orders", message))
    await until(lambda: publisher.tried >= 2 or handling.done())
    message.channel.is_closed = True  # the connection dropped: the broker has the event back
    await asyncio.wait_for(handling, 5)
    # Settling it now would fail; the broker delivers it again, and it runs again (at least once).
    assert message.settled == [] and publisher.published == []
    assert events.unsent() is None and events.function_stats("orders")["held_here"] == 0
    told = [r for r in caplog.records if r.name == "faasd.cluster" and r.levelno >= logging.WARNING]
    assert [r.levelname for r in told] == ["ERROR", "WARNING"] and not any(r.exc_info for r in told)
    assert "the broker delivers the event again" in told[1].getMessage()


@pytest.mark.asyncio
async def test_nothing_is_sent_for_an_event_whose_connection_dropped_while_it_ran(tmp_path, caplog):
    invoker, publisher = Outcomes(failing=True), Publisher(refusals=0)
    events = node(tmp_path, invoker, publisher, AsyncConfig(max_retries=2, retry_delays_s=(60.0,)))
    message = Message(Job("orders", "r-1", b'{"n": 1}', "api", time.time()))
    message.channel.is_closed = True
    await events._handle("orders", "faasd.cluster.test.fn.orders", message)
    # Its next delivery runs it again and sends its own retry: this one would be a second.
    assert invoker.calls == 1 and publisher.published == [] and message.settled == []
    told = [r.getMessage() for r in caplog.records
            if r.name == "faasd.cluster" and r.levelno >= logging.WARNING]
    assert told == ["cluster: the connection that delivered orders r-1 closed before the retry was sent; "
                    "the broker delivers the event again, and it runs again"]


@pytest.mark.asyncio
async def test_an_event_run_here_whose_destination_the_broker_refuses_is_not_run_again(
        tmp_path, monkeypatch):
    # durable=False (an AMQP trigger's message): run here, the source holds the original.
    monkeypatch.setattr(embedded_queue, "OUTCOME_RETRY_FIRST_S", 0.01)
    invoker, publisher = Outcomes(failing=False), Publisher(refusals=4)
    events = node(tmp_path, invoker, publisher, AsyncConfig(on_success="function:ship"))
    outcomes = []
    await events.put("orders", b'{"n": 1}', durable=False, on_done=outcomes.append)
    await until(lambda: outcomes, timeout=10)
    assert invoker.calls == 1
    assert outcomes[0].succeeded and outcomes[0].destination == "function:ship"
    assert [routing_key for routing_key, _ in publisher.published] == ["faasd.cluster.test.fn.ship"]


# -- an event whose processing raises (a fault of faasd's, not the function's) ------------------

def broken_record(**_):
    raise KeyError("responsePayload")


def faults_told(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "faasd.cluster" and r.levelno >= logging.ERROR]


@pytest.mark.asyncio
async def test_an_event_whose_processing_raises_is_handed_back_then_dead_lettered_on_the_third_fault(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(workqueue, "NACK_DELAY_S", 0)
    monkeypatch.setattr(workqueue, "destination_record", broken_record)
    invoker = Outcomes(failing=True)
    events = node(tmp_path, invoker, Publisher(refusals=0), AsyncConfig(max_retries=0))
    outcomes = []
    events._callbacks["cb-1"] = (outcomes.append, time.time())  # put through this node
    job = Job("orders", "r-1", b'{"n": 1}', "cron", time.time(), reply_to="inbox", callback="cb-1")
    deliveries = [Message(job) for _ in range(3)]
    for message in deliveries:  # the broker delivers it again each time it is handed back
        await events._handle("orders", "faasd.cluster.test.fn.orders", message)
    assert [m.settled for m in deliveries] == [["nack"], ["nack"], ["reject"]]
    assert invoker.calls == 3 and events._faults == {}
    # Its on_done learns it failed (a cron schedule with overlap = "skip" fires again).
    assert [(o.succeeded, o.condition, o.destination) for o in outcomes] == [
        (False, "RetriesExhausted", "faasd.cluster.test.dead-letter")]
    assert events.function_stats("orders")["dead_lettered"] == 1
    told = faults_told(caplog)
    assert [bool(r.exc_info) for r in told] == [True, False, False]  # one traceback, then lines
    assert "(2 of 3 times: KeyError: 'responsePayload'); handing it back" in told[1].getMessage()
    assert told[2].getMessage() == (
        "cluster: event r-1 of orders (from cron) could not be processed 3 times on this node "
        "(last: KeyError: 'responsePayload'); it goes to faasd.cluster.test.dead-letter, "
        "not handed back again")


@pytest.mark.asyncio
async def test_the_faults_of_an_event_are_forgotten_once_it_settles_and_only_the_latest_are_kept(
        tmp_path, monkeypatch):
    monkeypatch.setattr(workqueue, "NACK_DELAY_S", 0)
    monkeypatch.setattr(workqueue, "FAULTS_KEPT", 2)
    invoker = Outcomes(failing=True)
    events = node(tmp_path, invoker, Publisher(refusals=0), AsyncConfig(max_retries=0))
    job = Job("orders", "r-1", b'{"n": 1}', "api", time.time())

    async def deliver(job: Job) -> list[str]:
        message = Message(job)
        await events._handle("orders", "faasd.cluster.test.fn.orders", message)
        return message.settled

    with monkeypatch.context() as broken:
        broken.setattr(workqueue, "destination_record", broken_record)
        assert [await deliver(job) for _ in range(2)] == [["nack"], ["nack"]]
    assert events._faults == {"r-1": 2}
    assert await deliver(job) == ["ack"]  # dead-lettered to its file, the fault gone
    assert events._faults == {}
    with monkeypatch.context() as broken:
        broken.setattr(workqueue, "destination_record", broken_record)
        # Counted from one again: handed back, not dead-lettered.
        assert [await deliver(job) for _ in range(2)] == [["nack"], ["nack"]]
        for request_id in ("r-2", "r-3"):
            assert await deliver(replace(job, request_id=request_id)) == ["nack"]
    assert events._faults == {"r-2": 1, "r-3": 1}  # the oldest went first


@pytest.mark.asyncio
async def test_an_event_run_here_whose_processing_raises_is_given_up_as_a_failure_on_the_third_fault(
        tmp_path, monkeypatch, caplog):
    # durable=False (an AMQP trigger's message): told it failed, the trigger dead-letters its
    # message; not told, it would wait for ever, the event running again every second.
    monkeypatch.setattr(workqueue, "NACK_DELAY_S", 0)
    monkeypatch.setattr(workqueue, "destination_record", broken_record)
    invoker = Outcomes(failing=True)
    events = node(tmp_path, invoker, Publisher(refusals=0), AsyncConfig(max_retries=0))
    outcomes = []
    request_id = await events.put("orders", b'{"n": 1}', source="amqp", durable=False,
                                  on_done=outcomes.append)
    await until(lambda: outcomes)
    await asyncio.sleep(0.05)  # nothing else comes
    assert invoker.calls == 3
    assert [(o.request_id, o.succeeded, o.condition, o.destination) for o in outcomes] == [
        (request_id, False, "RetriesExhausted", None)]
    figures = events.function_stats("orders")
    assert (figures["dead_lettered"], figures["held_here"]) == (1, 0)
    told = faults_told(caplog)
    assert [bool(r.exc_info) for r in told] == [True, False, False]
    assert "(2 of 3 times: KeyError: 'responsePayload'); trying again" in told[1].getMessage()
    assert told[2].getMessage() == (
        f"cluster: event {request_id} of orders (from amqp) could not be processed 3 times "
        "(last: KeyError: 'responsePayload'); given up: its source is told it failed, so that it is "
        "not delivered and run again")
