"""The cluster's asynchronous queue: `daemon.queue` when `[cluster] mode = "amqp"`.

Same interface and the same semantics as the embedded queue (faasd/queue.py):
`put(function, payload, *, request_id=None, source="api", on_done=None,
durable=True, invoked_arn=None, trace_id=None) -> request_id`, `stats()`,
`function_stats(name)`; the retry policy (`[async] max_retries`,
`retry_delays_s`, `max_event_age_s`), the dead-letter files and the
destination records are faasd/queue.py's own helpers (`next_attempt`,
`destination_function`, `destination_record`).

Where events wait: one durable queue per function on the broker,
`faasd.cluster.<name>.fn.<function>` (faasd/cluster/topology.py). One queue
per function rather than one shared queue, because then a node consumes only
the functions it has, within each function's own limit (the prefetch is the
function's `concurrency`, else `[cluster] prefetch`), and a backlog of one
function never sits in front of another's events. `put` returns once the
broker has confirmed the message (publisher confirms: on a quorum queue, once
a majority of the broker nodes wrote it).

How an event runs: every node with the function consumes its queue; the
broker hands each event to one node, which runs it through the invoker
(waiting for a concurrency slot, as queued events do) and acknowledges the
message only after the invocation ended:
  * success: the `on_success` destination record is published, then ack;
  * failure with retries left: a copy with the attempt counted is published to
    `<work queue>.delay.<ms>` (its TTL sends it back to the work queue when
    due), then ack;
  * given up: the record goes to the `on_failure` function (published) or to
    `<data-dir>/dead-letter/NAME/` of the node that ran the last attempt,
    then ack. A dead-letter file the disk refuses (full, read-only) is tried
    again (1 s, doubling to 30 s) until it is written, as the embedded queue
    does with an outcome it cannot write: until then the event stays here
    unacknowledged, neither lost nor run again, and `/readyz` fails.
A retry or destination record the broker does not take (a queue declared
with other arguments, a full queue, a channel closed mid-way) is sent again
the same way (1 s, doubling to 30 s) until the broker takes it, and the event
stays here unacknowledged meanwhile: it has run, and handed back it would run
again, in a loop for as long as the broker refuses. The log says so once per
queue, and `/readyz` names it without failing (the broker refuses every node
alike, and synchronous calls do not need it). If the connection the event
came on drops while its dead letter, retry or record waits, the broker has it
back already: it is delivered again and runs again, and this node gives up
what it held, so that the next run's is the only one. A run going on when
the connection drops goes on to its end, as an invocation of its own and
within the function's concurrency; the redelivered event waits its turn.
An event whose processing raises here (a fault of faasd's own, neither the
function's failure nor a refusal of the broker's) is handed back after
NACK_DELAY_S, to run again; the MAX_FAULTS-th time on the same node it is
rejected instead, and the broker moves it to `faasd.cluster.<name>.dead-letter`
(its `on_done` is told it failed): a poison event would otherwise run its
function again every second, for ever on a classic queue, and up to the
delivery limit (MAX_DELIVERIES) on a quorum one.
A node that dies before the ack loses nothing: the broker gives its
unacknowledged events to another node (at least once; an interrupted run is
not counted as an attempt). A node that is stopping cancels its consumers at
the start of the drain and hands back what it had not started.

`on_done` (e.g. cron's overlap tracking) reaches the node that put the
event: the message names that node's inbox (`reply_to`), and the node that
finishes the event sends the outcome there (directly, when it is the same
node). As with the embedded queue, the callback lives in memory: if
the putting node is gone, the event still runs and the outcome is dropped.

`durable=False` events (an AMQP trigger's message, held by the broker until
`on_done`) run on the node that received them, with retries waiting in
memory, exactly as the embedded queue runs them: the trigger's own queue has
already spread them over the nodes. One whose processing raises MAX_FAULTS
times is given up as a failure (RetriesExhausted, nothing written): its
source settles it as it settles any failure, and does not deliver it again
(an AMQP trigger rejects its message into the trigger's dead-letter queue).

File events are the exception to "any node": the event names a file on
the disk of the node that saw it, so it goes to that node's own queue of the
function, `faasd.cluster.<name>.node.<node>.fn.<function>`, which only that
node consumes (its retries come back there too). If the node is down, its
file events wait for it on the broker.

A function that cannot load on this node is not consumed here: its events
wait for a node that can load it (or for the fix), instead of being
dead-lettered because of one broken node. Likewise a destination function
that another live node has (its heartbeat says so) gets its records from
this node, which does not have it (yet), and so does an Event invoke of it
sent to this node (`put` with a durable, shared source).

Figures (`stats()`): `depth` is the events waiting on the broker (every
node's, refreshed at each heartbeat) plus those this node holds; `running`,
`succeeded`, `retried` and `dead_lettered` are this node's since it started.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel

from ..broker import let_go
from ..errors import HANDLED, FunctionError, InvokeRefused, ShuttingDown, Throttled
from ..queue import (
    OUTCOME_RETRY_MAX_S, RETRIES_EXHAUSTED, SUCCESS, EVENT_AGE_EXCEEDED, OnDone, QueuedOutcome, admit,
    dead_letter_path, destination_function, destination_record, next_attempt, notify_done,
    outcome_retry_delays, throttle_delay, write_file_durably,
)
from ..spec import AsyncConfig, FunctionSpec, new_request_id
from .link import BrokerLink
from .topology import (
    Names, dead_letter_arguments, delay_queue_arguments, supports_quorum, work_queue_arguments,
)

if TYPE_CHECKING:
    from ..invoker import Invocation, Invoker
    from ..registry import Registry

log = logging.getLogger("faasd.cluster")

EVENT_TYPE = "faasd.event"
OUTCOME_TYPE = "faasd.outcome"
ENVELOPE_HEADER = "faasd"
ENVELOPE_VERSION = 1
# Texts of a job that its envelope holds only when set (None when absent).
OPTIONAL_KEYS = ("invoked_arn", "trace_id")
# How long `put` waits for the broker before refusing the event.
PUBLISH_WAIT_S = 5.0
PUBLISH_TIMEOUT_S = 30.0
# Before handing back an event this node cannot run, so that it does not spin.
NACK_DELAY_S = 1.0
# An event whose processing raised this many times on this node (a fault of
# faasd's, not the function's) is given up rather than run again: a poison
# event must not run its function for ever. The counts of at most FAULTS_KEPT
# events are kept; the oldest go first.
MAX_FAULTS = 3
FAULTS_KEPT = 1000
CLOSE_WAIT_S = 2.0
QUORUM_SETTLE_S = 1.0
# An on_done callback whose outcome never came (its event ran on a node that
# died after running it) is forgotten this long after the event's max age.
CALLBACK_GRACE_S = 3600.0

SUCCEEDED, RETRY, FAILED, INTERRUPTED = "succeeded", "retry", "failed", "interrupted"
# A file event names a file on the disk of the node that saw it: only that node
# runs it, from its own queue of the function (see the module docstring).
NODE_LOCAL_SOURCES = frozenset({"file"})
NODE_LOCAL_TRIGGERS = frozenset({"file"})


class ClusterUnavailable(OSError):
    """The broker cannot take the event now (unreachable, or it refused the message)."""


class _DeliveryGone(Exception):
    """The channel an event came on closed before it was settled: the broker has it back."""


@dataclass(slots=True)
class Job:
    """One asynchronous event as it travels between nodes: the message body is the payload."""

    function: str
    request_id: str
    payload: bytes
    source: str
    enqueued_at: float
    attempts: int = 0
    hops: int = 0
    last_error: str | None = None   # the last failed attempt's error, as Lambda's JSON text
    reply_to: str | None = None     # the inbox of the node waiting for the outcome
    callback: str | None = None     # which of its callbacks
    home: str = ""                  # the work queue it belongs to (retries come back there)
    invoked_arn: str | None = None  # context.invoked_function_arn when the caller named a qualifier
    trace_id: str | None = None     # the caller's X-Ray trace header

    def previous_error(self) -> FunctionError | None:
        if not self.last_error:
            return None
        return FunctionError.from_payload(HANDLED, orjson.loads(self.last_error))

    def to_message(self) -> aio_pika.Message:
        envelope = {"v": ENVELOPE_VERSION, "function": self.function, "source": self.source,
                    "enqueued_at": self.enqueued_at, "attempts": self.attempts, "hops": self.hops,
                    "last_error": self.last_error}
        # Keys earlier releases did not write (they read an envelope without them).
        for key in OPTIONAL_KEYS:
            value = getattr(self, key)
            if value is not None:
                envelope[key] = value
        return aio_pika.Message(
            self.payload, content_type="application/json", type=EVENT_TYPE, app_id="faasd",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=self.request_id,
            timestamp=datetime.fromtimestamp(self.enqueued_at, timezone.utc),
            headers={ENVELOPE_HEADER: orjson.dumps(envelope).decode()},
            reply_to=self.reply_to, correlation_id=self.callback)

    @classmethod
    def from_message(cls, function: str, home: str, message: AbstractIncomingMessage) -> "Job":
        """The job in `message`, taken from `function`'s queue `home`; ValueError if it is not one."""
        raw = (message.headers or {}).get(ENVELOPE_HEADER)
        if isinstance(raw, bytes):
            raw = raw.decode()
        if not isinstance(raw, str) or not message.message_id:
            raise ValueError("it has no faasd envelope or message id")
        try:
            envelope = orjson.loads(raw)
            optional = {key: envelope.get(key) for key in OPTIONAL_KEYS}
            for key, value in optional.items():
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{key} is {type(value).__name__}, not text")
            last_error = envelope.get("last_error")
            if last_error is not None and not _is_error_json(last_error):
                raise ValueError("last_error is not the JSON text of an error")
            return cls(function=function, request_id=str(message.message_id), payload=message.body,
                       source=str(envelope["source"]), enqueued_at=float(envelope["enqueued_at"]),
                       attempts=int(envelope["attempts"]), hops=int(envelope.get("hops", 0)),
                       last_error=last_error, reply_to=message.reply_to,
                       callback=message.correlation_id, home=home, **optional)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"its faasd envelope is malformed: {exc}") from None


def _is_error_json(text: object) -> bool:
    try:
        return isinstance(text, str) and isinstance(orjson.loads(text), dict)
    except orjson.JSONDecodeError:
        return False


@dataclass(slots=True)
class Step:
    """How one attempt ended."""

    kind: str                               # SUCCEEDED | RETRY | FAILED | INTERRUPTED
    attempts: int = 0                       # attempts that ran to an outcome, this one included
    invocation: "Invocation | None" = None
    error: FunctionError | None = None
    delay: float = 0.0                      # RETRY: seconds until the next attempt
    condition: str = ""                     # FAILED: RetriesExhausted | EventAgeExceeded


def outcome_to_json(outcome: QueuedOutcome) -> bytes:
    return orjson.dumps({
        "request_id": outcome.request_id, "function": outcome.function, "source": outcome.source,
        "succeeded": outcome.succeeded, "condition": outcome.condition, "attempts": outcome.attempts,
        "error": outcome.error.to_lambda() if outcome.error else None,
        "error_kind": outcome.error.kind if outcome.error else None,
        "response": base64.b64encode(outcome.response).decode() if outcome.response is not None else None,
        "destination": outcome.destination,
    })


def outcome_from_json(data: bytes) -> QueuedOutcome:
    raw = orjson.loads(data)
    error = (FunctionError.from_payload(raw.get("error_kind") or HANDLED, raw["error"])
             if raw.get("error") else None)
    return QueuedOutcome(
        request_id=raw["request_id"], function=raw["function"], source=raw["source"],
        succeeded=bool(raw["succeeded"]), condition=raw["condition"], attempts=int(raw["attempts"]),
        error=error, response=base64.b64decode(raw["response"]) if raw.get("response") is not None else None,
        destination=raw.get("destination"))


@dataclass(slots=True)
class _Figures:
    """One function's figures on this node."""

    running: int = 0
    succeeded: int = 0
    retried: int = 0
    dead_lettered: int = 0
    waiting: int = 0  # ready on the broker, every node's, as of the last refresh
    holding: dict[int, float] = field(default_factory=dict)  # events held here -> enqueued_at

    def to_json(self, now: float) -> dict[str, Any]:
        oldest = min(self.holding.values(), default=None)
        return {
            "depth": self.waiting + len(self.holding),
            "running": self.running,
            "oldest_age_s": round(max(0.0, now - oldest), 3) if oldest is not None else 0.0,
            "succeeded": self.succeeded,
            "retried": self.retried,
            "dead_lettered": self.dead_lettered,
            "waiting_on_broker": self.waiting,
            "held_here": len(self.holding),
        }


@dataclass(slots=True)
class _Consumer:
    function: str
    queue_name: str
    channel: AbstractRobustChannel
    queue: AbstractQueue
    tag: str
    prefetch: int
    cancelled: bool = False


class ClusterQueue:
    """See the module docstring."""

    def __init__(self, *, link: BrokerLink, names: Names, registry: "Registry", invoker: "Invoker",
                 data_dir: Any, region: str, prefetch: int, max_concurrency: int, node: str,
                 inbox: str, loaded_elsewhere: Callable[[str], bool] = lambda name: False) -> None:
        self.link = link
        # Whether another live node runs a function: its destination records go to its queue
        # even where it is not loaded (a rolling deploy, functions dirs that differ).
        self.loaded_elsewhere = loaded_elsewhere
        self.node = node
        self.names = names
        self.registry = registry
        self.invoker = invoker
        self.dead_letter_dir = data_dir / "dead-letter"
        self.region = region
        self.default_prefetch = prefetch
        self.max_concurrency = max_concurrency
        self.inbox = inbox
        self.quorum = True
        self._publisher: AbstractRobustChannel | None = None
        self._stats_channel: AbstractChannel | None = None
        self._declared: dict[str, str] = {}     # work queues declared on the publisher channel -> function
        self._consumers: dict[str, _Consumer] = {}  # by queue name
        self._locks: dict[str, asyncio.Lock] = {}
        self._follows: set[asyncio.Task] = set()
        self._tasks: set[asyncio.Task] = set()  # deliveries and held events being processed
        self._callbacks: dict[str, tuple[OnDone, float]] = {}
        self._figures: dict[str, _Figures] = {}
        self._unwritten: dict[str, str] = {}  # request id -> why its dead letter is not written yet
        self._unsent: dict[str, tuple[str, str]] = {}  # request id -> (queue, why) the broker refuses
        self._faults: dict[str, int] = {}  # request id -> how often processing it raised here, oldest first
        self._closing = False
        self._consuming = True
        self._subscribed = False
        self._starting: list[asyncio.Task | None] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def setup(self, connection: Any) -> None:
        """On the first connect: the publishing channel, the dead-letter queue, consumers."""
        self.quorum = supports_quorum(self.link.version)
        self._publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await self._publisher.declare_queue(self.names.dead_letter, durable=True,
                                            arguments=dead_letter_arguments(self.quorum))
        self._declared.clear()
        if not self._subscribed:
            self._subscribed = True
            self.registry.subscribe(self._function_changed)
        self._starting = [self._follow_soon(name) for name in sorted(self.registry.specs)]

    def consuming(self) -> tuple[bool, str]:
        """Whether the consumers of the functions known at start are running (for /readyz)."""
        waiting = [task for task in self._starting if task is not None and not task.done()]
        if waiting:
            return False, f"starting the consumers of {len(waiting)} function(s)"
        return True, f"taking events of {len(self.consumed())} function(s)"

    def held_back(self) -> str | None:
        """Why events are held here unacknowledged, their dead letters not yet written (for /readyz)."""
        if not self._unwritten:
            return None
        reason = next(iter(self._unwritten.values()))
        return f"{len(self._unwritten)} dead letter(s) not yet written ({reason}); trying again"

    def unsent(self) -> str | None:
        """Which events are held here unacknowledged, the broker refusing their retry or destination."""
        if not self._unsent:
            return None
        queues = ", ".join(sorted({queue for queue, _ in self._unsent.values()}))
        return (f"{len(self._unsent)} event(s) held back, the broker refusing what they send to {queues}; "
                "trying again")

    async def close(self) -> None:
        """Stop consuming; let outcomes being recorded finish; hand the rest back to the broker."""
        self._closing = True
        for task in list(self._follows):
            task.cancel()
        await asyncio.gather(*self._follows, return_exceptions=True)
        await self.stop_consuming()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CLOSE_WAIT_S)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Closing a channel returns its unacknowledged messages to their queue.
        for consumer in list(self._consumers.values()):
            await _close_channel(consumer.channel)
        self._consumers.clear()
        for channel in (self._publisher, self._stats_channel):
            if channel is not None:
                await _close_channel(channel)

    async def stop_consuming(self) -> None:
        """Take no more events from the broker (the daemon is draining or stopping)."""
        if not self._consuming:
            return
        self._consuming = False
        cancelled = 0
        for consumer in list(self._consumers.values()):
            if await self._cancel(consumer):
                cancelled += 1
        if cancelled:
            log.info("cluster: stopped taking events of %d functions; the other nodes take them", cancelled)

    # -- the API for event sources -----------------------------------------------------------

    async def put(self, function: str, payload: bytes, *, request_id: str | None = None,
                  source: str = "api", on_done: OnDone | None = None, durable: bool = True,
                  invoked_arn: str | None = None, trace_id: str | None = None) -> str:
        """Queue one event on the broker; return its request id once the broker confirmed it.

        A function this node does not have is taken too when another live node
        has it (a rolling deploy): that node runs it. Not an event run here
        (durable=False) or one only this node may run (a file's)."""
        shared = durable and source not in NODE_LOCAL_SOURCES
        request_id, data = admit(self._closing, self.registry, function, payload, request_id,
                                 elsewhere=self.loaded_elsewhere if shared else None)
        job = Job(function, request_id, data, source, time.time(), home=self._home(function, source),
                  invoked_arn=invoked_arn, trace_id=trace_id)
        if not durable:
            self._hold(job, on_done)
            return request_id
        if on_done is not None:
            job.callback = uuid.uuid4().hex
            job.reply_to = self.inbox
            self._callbacks[job.callback] = (on_done, job.enqueued_at)
        try:
            await self._publish_work(job)
        except BaseException:
            if job.callback:
                self._callbacks.pop(job.callback, None)
            raise
        return request_id

    def function_stats(self, name: str) -> dict[str, Any]:
        return (self._figures.get(name) or _Figures()).to_json(time.time())

    def stats(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        return {name: figures.to_json(now) for name, figures in sorted(self._figures.items())}

    def load(self) -> dict[str, int]:
        """Events running on this node, by function (for the heartbeat)."""
        return {name: f.running for name, f in sorted(self._figures.items()) if f.running}

    def consumed(self) -> list[str]:
        return sorted({c.function for c in self._consumers.values() if not c.cancelled})

    def _home(self, function: str, source: str) -> str:
        """The work queue of a new event: the function's, or this node's own for node-local sources."""
        if source in NODE_LOCAL_SOURCES:
            return self.names.node_function(self.node, function)
        return self.names.function(function)

    def _wanted_queues(self, spec: FunctionSpec) -> list[str]:
        queues = [self.names.function(spec.name)]
        local = self.names.node_function(self.node, spec.name)
        # Once consumed, this node's own queue stays consumed while the function
        # is here, so that events queued before its file trigger went away still run.
        if local in self._consumers or any(t.type in NODE_LOCAL_TRIGGERS for t in spec.triggers):
            queues.append(local)
        return queues

    def _figure(self, function: str) -> _Figures:
        figures = self._figures.get(function)
        if figures is None:
            figures = self._figures[function] = _Figures()
        return figures

    # -- publishing --------------------------------------------------------------------------

    async def _channel(self) -> AbstractRobustChannel:
        connection = await self.link.wait(PUBLISH_WAIT_S)
        if connection is None or self._publisher is None:
            state = self.link.state
            raise ClusterUnavailable(
                f"the cluster's broker {state['url']} is {state['state']}"
                + (f" ({state['last_error']})" if state.get("last_error") else ""))
        return self._publisher

    async def _publish_work(self, job: Job) -> None:
        """Publish `job` to its work queue (declared first), confirmed."""
        queue = job.home or self.names.function(job.function)
        for attempt in (1, 2):
            channel = await self._channel()
            try:
                if queue not in self._declared:
                    await channel.declare_queue(queue, durable=True,
                                                arguments=work_queue_arguments(self.names, self.quorum))
                    self._declared[queue] = job.function
                await channel.default_exchange.publish(job.to_message(), routing_key=queue,
                                                       mandatory=True, timeout=PUBLISH_TIMEOUT_S)
                return
            except aio_pika.exceptions.DeliveryError as exc:
                # Unroutable (someone deleted the queue) or refused: declare again, once.
                self._declared.pop(queue, None)
                if attempt == 2:
                    raise ClusterUnavailable(f"the broker refused the event for {job.function}: {exc}") from None
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise ClusterUnavailable(
                    f"queue {queue} exists on the broker with other settings (a classic queue made "
                    f"by hand, or by another version): {exc}; delete it or use another "
                    "[cluster] name") from None
            except (aiormq.exceptions.AMQPError, ConnectionError, asyncio.TimeoutError, RuntimeError) as exc:
                self._declared.pop(queue, None)
                raise ClusterUnavailable(f"the event could not be sent to the broker: {exc}") from None

    def _retry_queue(self, job: Job, delay: float) -> tuple[str, int]:
        """Where `job` waits `delay` seconds, and how many milliseconds: its work queue when none."""
        delay_ms = int(round(delay * 1000))
        home = job.home or self.names.function(job.function)
        return (self.names.delay(home, delay_ms) if delay_ms > 0 else home), delay_ms

    async def _publish_retry(self, job: Job, delay: float) -> None:
        """Publish `job` so that it is back in its work queue after `delay` seconds."""
        queue, delay_ms = self._retry_queue(job, delay)
        if delay_ms <= 0:
            await self._publish_work(job)
            return
        home = job.home or self.names.function(job.function)
        channel = await self._channel()
        try:
            # Declared before every publish: that keeps it from expiring while it holds messages.
            await channel.declare_queue(queue, durable=True, robust=False,
                                        arguments=delay_queue_arguments(home, delay_ms, self.quorum))
            await channel.default_exchange.publish(job.to_message(), routing_key=queue,
                                                   mandatory=True, timeout=PUBLISH_TIMEOUT_S)
        except (aiormq.exceptions.AMQPError, ConnectionError, asyncio.TimeoutError, RuntimeError) as exc:
            raise ClusterUnavailable(f"the retry could not be sent to the broker: {_explain(exc)}") from None

    # -- following the registry: which queues this node consumes -----------------------------

    def _function_changed(self, old: FunctionSpec | None, new: FunctionSpec | None) -> None:
        name = (new or old).name  # type: ignore[union-attr]
        self._follow_soon(name)

    def _follow_soon(self, name: str) -> asyncio.Task | None:
        return None if self._closing else self._background(self._follow(name))

    def _background(self, work: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(work)
        self._follows.add(task)
        task.add_done_callback(self._follows.discard)
        return task

    def _prefetch(self, spec: FunctionSpec) -> int:
        limit = self.invoker.global_limit.limit or self.max_concurrency
        return max(1, min(spec.concurrency or self.default_prefetch, limit))

    async def _follow(self, name: str) -> None:
        """Consume `name`'s queues while the function is here and loads; stop otherwise."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            delay = 1.0
            while not self._closing:
                spec = self.registry.get(name)
                wanted = (self._wanted_queues(spec)
                          if spec is not None and spec.ok and self._consuming else [])
                mine = {q: c for q, c in self._consumers.items() if c.function == name}
                try:
                    for queue_name, consumer in mine.items():
                        if queue_name not in wanted:
                            del self._consumers[queue_name]
                            await self._retire(consumer, spec)
                    if not wanted:
                        return
                    assert spec is not None
                    prefetch = self._prefetch(spec)
                    for queue_name in wanted:
                        consumer = self._consumers.get(queue_name)
                        if consumer is None:
                            connection = await self.link.wait(None)
                            if connection is None:
                                raise ClusterUnavailable("the broker connection is closed")
                            await self._consume(connection, spec, queue_name)
                        elif consumer.prefetch != prefetch:
                            consumer.prefetch = prefetch
                            await consumer.channel.set_qos(prefetch_count=prefetch)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.error("cluster: cannot consume the queue of %s: %s; retrying in %gs",
                              name, _explain(exc), delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)

    async def _consume(self, connection: Any, spec: FunctionSpec, queue_name: str) -> None:
        name = spec.name
        channel = await connection.channel()
        try:
            prefetch = self._prefetch(spec)
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.declare_queue(queue_name, durable=True,
                                                arguments=work_queue_arguments(self.names, self.quorum))
            if self.quorum:
                # RabbitMQ before 4.1 answers a declare before a new quorum queue's
                # replica runs, and a consume in that gap kills the connection.
                await asyncio.sleep(QUORUM_SETTLE_S)
            tag = await queue.consume(partial(self._on_message, name, queue_name))
        except BaseException:
            await _close_channel(channel)
            raise
        self._consumers[queue_name] = _Consumer(name, queue_name, channel, queue, tag, prefetch)
        local = queue_name != self.names.function(name)
        log.info("cluster: taking %sevents of %s (up to %d at once)",
                 "this node's own " if local else "", name, prefetch)

    async def _cancel(self, consumer: _Consumer) -> bool:
        if consumer.cancelled:
            return False
        consumer.cancelled = True
        if self.link.connected:  # else the broker has dropped the consumer with the connection
            await let_go(consumer.queue.cancel(consumer.tag), log,
                         f"cancelling the consumer of {consumer.function}")
        return True

    async def _retire(self, consumer: _Consumer, spec: FunctionSpec | None) -> None:
        why = ("it was removed" if spec is None else "it cannot load here" if not spec.ok
               else "its triggers changed")
        log.info("cluster: no longer taking events of %s from %s: %s", consumer.function,
                 consumer.queue_name, why)
        await self._cancel(consumer)
        # Events already taken finish (or are handed back) on this channel; then it closes.
        mine = [t for t in self._tasks if t.get_name() == f"faasd-cluster-{consumer.queue_name}"]
        if mine:
            await asyncio.wait(mine, timeout=60)
        await _close_channel(consumer.channel)

    # -- running events ---------------------------------------------------------------------

    async def _on_message(self, function: str, home: str, message: AbstractIncomingMessage) -> None:
        # In a task of our own, not aiormq's: aiormq cancels its consumer
        # callbacks when their channel closes, and a dropped connection would
        # then abandon a running invocation, whose worker goes on outside the
        # function's concurrency and its log. The run ends; its settling finds
        # the delivery gone (_held_until, _settle), and the broker's redelivery
        # runs the event again.
        task = asyncio.get_running_loop().create_task(self._handle(function, home, message),
                                                      name=f"faasd-cluster-{home}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, function: str, home: str, message: AbstractIncomingMessage) -> None:
        if self._closing or self.invoker.draining:
            # Stopping: the event goes back for the other nodes, untouched.
            self._background(self.stop_consuming())
            await _settle(message.nack(requeue=True), function, "hand back")
            return
        try:
            job = Job.from_message(function, home, message)
        except ValueError as exc:
            log.error("cluster: a message in the queue of %s is not a faasd event (%s); "
                      "it goes to %s", function, exc, self.names.dead_letter)
            await _settle(message.reject(requeue=False), function, "dead-letter")
            return
        spec = self.registry.get(function)
        if spec is None or not spec.ok:
            # Removed or broken here since the broker sent it: another node may run it.
            await asyncio.sleep(NACK_DELAY_S)
            await _settle(message.nack(requeue=True), function, "hand back")
            return
        figures = self._figure(function)
        figures.holding[id(job)] = job.enqueued_at
        try:
            await self._process(job, message, figures)
        except asyncio.CancelledError:
            raise  # unsettled: the broker gets it back when the channel closes
        except _DeliveryGone:
            pass  # the broker has it back, to deliver again (logged where it was found)
        except Exception as exc:
            await self._faulted(job, message, figures, exc)
        else:
            self._faults.pop(job.request_id, None)
        finally:
            figures.holding.pop(id(job), None)

    async def _faulted(self, job: Job, message: AbstractIncomingMessage, figures: _Figures,
                       exc: Exception) -> None:
        """Processing `job` raised: hand it back to run again, or, the MAX_FAULTS-th time here,
        reject it into the dead-letter queue and tell its `on_done` that it failed."""
        faults = self._faults.pop(job.request_id, 0) + 1
        if faults < MAX_FAULTS:
            self._faults[job.request_id] = faults
            while len(self._faults) > FAULTS_KEPT:
                del self._faults[next(iter(self._faults))]
            _log_fault(job, faults, exc, "handing it back")
            await asyncio.sleep(NACK_DELAY_S)
            await _settle(message.nack(requeue=True), job.function, "hand back")
            return
        log.error("cluster: event %s of %s (from %s) could not be processed %d times on this node "
                  "(last: %s); it goes to %s, not handed back again", job.request_id, job.function,
                  job.source, faults, _explain(exc), self.names.dead_letter)
        await _settle(message.reject(requeue=False), job.function, "dead-letter")
        await self._report(job, self._given_up(job, figures, self.names.dead_letter))

    def _given_up(self, job: Job, figures: _Figures, destination: str | None) -> QueuedOutcome:
        """The failure outcome of an event given up after MAX_FAULTS faults, made of its envelope
        alone: its last error is not parsed, nor a record written, either of which may be what raised."""
        figures.dead_lettered += 1
        return QueuedOutcome(request_id=job.request_id, function=job.function, source=job.source,
                             succeeded=False, condition=RETRIES_EXHAUSTED, attempts=job.attempts,
                             destination=destination)

    async def _process(self, job: Job, message: AbstractIncomingMessage, figures: _Figures) -> None:
        step = await self._attempt(job, figures)
        if step.kind == INTERRUPTED:
            await _settle(message.nack(requeue=True), job.function, "hand back")
            return
        if step.kind == RETRY:
            assert step.error is not None
            retry = replace(job, attempts=step.attempts,
                            last_error=orjson.dumps(step.error.to_lambda()).decode())
            queue, _ = self._retry_queue(retry, step.delay)
            await self._until_sent(job, "the retry", queue, partial(self._publish_retry, retry, step.delay),
                                   message)
            await _settle(message.ack(), job.function, "acknowledge")
            self._retried(job, step, figures)
            return
        outcome = await self._finish(job, step, figures, message)
        await _settle(message.ack(), job.function, "acknowledge")
        await self._report(job, outcome)

    def _hold(self, job: Job, on_done: OnDone | None) -> None:
        task = asyncio.get_running_loop().create_task(self._run_held(job, on_done),
                                                      name=f"faasd-cluster-held-{job.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_held(self, job: Job, on_done: OnDone | None) -> None:
        """A durable=False event: run here, retries wait in memory; the source keeps the original."""
        figures = self._figure(job.function)
        figures.holding[id(job)] = job.enqueued_at
        faults = 0
        try:
            while not self._closing:
                try:
                    step = await self._attempt(job, figures)
                    if step.kind == INTERRUPTED:
                        return  # the source delivers it again
                    if step.kind == RETRY:
                        assert step.error is not None
                        job.attempts = step.attempts
                        job.last_error = orjson.dumps(step.error.to_lambda()).decode()
                        self._retried(job, step, figures)
                        await asyncio.sleep(step.delay)
                        continue
                    outcome = await self._finish(job, step, figures)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    faults += 1
                    if faults < MAX_FAULTS:
                        _log_fault(job, faults, exc, "trying again")
                        await asyncio.sleep(NACK_DELAY_S)
                        continue
                    # Its source would deliver it again if not told, and run it again: it
                    # is told it failed, and settles it as any failure (the AMQP trigger
                    # rejects its message into the trigger's dead-letter queue).
                    log.error("cluster: event %s of %s (from %s) could not be processed %d times "
                              "(last: %s); given up: its source is told it failed, so that it is "
                              "not delivered and run again", job.request_id, job.function,
                              job.source, faults, _explain(exc))
                    outcome = self._given_up(job, figures, None)
                await notify_done(on_done, outcome)
                return
        finally:
            figures.holding.pop(id(job), None)

    async def _attempt(self, job: Job, figures: _Figures) -> Step:
        spec = self.registry.get(job.function)
        config = spec.async_config if spec is not None else AsyncConfig()
        if time.time() - job.enqueued_at > config.max_event_age_s:
            return Step(FAILED, job.attempts, None, job.previous_error(), condition=EVENT_AGE_EXCEEDED)
        invocation: Invocation | None = None
        figures.running += 1
        try:
            invocation = await self.invoker.invoke(job.function, job.payload, request_id=job.request_id,
                                                   wait=True, source=job.source,
                                                   invoked_arn=job.invoked_arn, trace_id=job.trace_id)
            error = invocation.error
        except ShuttingDown:
            return Step(INTERRUPTED)
        except Throttled as exc:  # its concurrency is 0: tried again later, as Lambda does; no attempt
            error = FunctionError(HANDLED, exc.error_type, exc.message)
            return Step(RETRY, job.attempts, None, error,
                        delay=throttle_delay(config, job.enqueued_at, time.time()))
        except InvokeRefused as exc:  # the function is gone: an attempt that failed
            error = FunctionError(HANDLED, exc.error_type, exc.message)
        finally:
            figures.running -= 1
        attempts = job.attempts + 1
        if error is None:
            return Step(SUCCEEDED, attempts, invocation)
        delay, condition = next_attempt(config, attempts, job.enqueued_at, time.time())
        if delay is None:
            assert condition is not None
            return Step(FAILED, attempts, invocation, error, condition=condition)
        return Step(RETRY, attempts, invocation, error, delay=delay)

    def _retried(self, job: Job, step: Step, figures: _Figures) -> None:
        assert step.error is not None
        figures.retried += 1
        spec = self.registry.get(job.function)
        retries = spec.async_config.max_retries if spec is not None else AsyncConfig().max_retries
        log.warning("async %s %s (from %s): attempt %d failed with %s: %s; retry %d of %d in %gs",
                    job.function, job.request_id, job.source, step.attempts, step.error.error_type,
                    step.error.message[:200], step.attempts, retries, step.delay)

    async def _finish(self, job: Job, step: Step, figures: _Figures,
                      message: AbstractIncomingMessage | None = None) -> QueuedOutcome:
        """Send the success or failure record where `[async]` says; count it; return the outcome.

        `message` is the delivery of `job`, None for an event run here for its source.
        """
        spec = self.registry.get(job.function)
        config = spec.async_config if spec is not None else AsyncConfig()
        succeeded = step.kind == SUCCEEDED
        condition = SUCCESS if succeeded else step.condition
        target = destination_function(self.registry, config.on_success if succeeded else config.on_failure,
                                      function=job.function, request_id=job.request_id, hops=job.hops,
                                      elsewhere=self.loaded_elsewhere)
        record = None
        if target is not None or not succeeded:
            record = destination_record(
                request_id=job.request_id, function=job.function, payload=job.payload,
                source=job.source, enqueued_at=job.enqueued_at, condition=condition,
                attempts=step.attempts, region=self.region, invocation=step.invocation,
                error=None if succeeded else step.error)
        destination: str | None = None
        if target is not None and record is not None:
            sent = Job(target, new_request_id(), orjson.dumps(record), "destination", time.time(),
                       hops=job.hops + 1, home=self._home(target, "destination"))
            what = "the on_success record" if succeeded else "the on_failure record"
            await self._until_sent(job, what, sent.home, partial(self._publish_work, sent), message)
            destination = f"function:{target}"
        elif record is not None:
            path = dead_letter_path(self.dead_letter_dir, job.function, job.request_id)
            await self._write_dead_letter(job, path, orjson.dumps(record, option=orjson.OPT_INDENT_2),
                                          message)
            destination = str(path)
        if succeeded:
            figures.succeeded += 1
            if step.attempts > 1 or job.source == "destination":
                log.info("async %s %s (from %s): succeeded on attempt %d", job.function,
                         job.request_id, job.source, step.attempts)
        else:
            figures.dead_lettered += 1
            error = step.error
            reason = f"{error.error_type}: {error.message[:200]}" if error else "never ran"
            log.error("async %s %s (from %s): %s after %d attempts (%s); record sent to %s",
                      job.function, job.request_id, job.source, condition, step.attempts, reason,
                      f"function {target}" if target else destination)
        return QueuedOutcome(
            request_id=job.request_id, function=job.function, source=job.source, succeeded=succeeded,
            condition=condition, attempts=step.attempts, error=None if succeeded else step.error,
            response=step.invocation.payload if succeeded and step.invocation else None,
            destination=destination)

    async def _write_dead_letter(self, job: Job, path: Path, data: bytes,
                                 message: AbstractIncomingMessage | None) -> None:
        """Write `job`'s dead-letter file, trying again (1 s, doubling to 30 s) until it is written.

        Until then its message stays unacknowledged on this node: handed back,
        it would run again and fail again, a loop for as long as the disk is full.
        Given up once the delivery is gone (see _held_until).
        """
        async def write() -> str | None:
            try:
                await asyncio.to_thread(write_file_durably, path, data)
            except OSError as exc:
                return exc.strerror or str(exc)
            return None

        def refused(reason: str, delay: float) -> None:
            if not self._unwritten:
                log.error("cluster: cannot write the dead letter of %s %s to %s (%s); the event "
                          "stays here unacknowledged, and the file is written as soon as the "
                          "disk allows", job.function, job.request_id, path.parent, reason)
            self._unwritten[job.request_id] = reason

        try:
            await _held_until(job, "its dead letter was written", message, write, refused)
            if self._unwritten.pop(job.request_id, None) is not None and not self._unwritten:
                log.info("cluster: every dead letter held back is written")
        finally:
            self._unwritten.pop(job.request_id, None)

    async def _until_sent(self, job: Job, what: str, queue: str, send: Callable[[], Awaitable[None]],
                          message: AbstractIncomingMessage | None) -> None:
        """Send `what` of `job` to `queue`, trying again (1 s, doubling to 30 s) until the broker takes it.

        Meanwhile the event stays here unacknowledged: it has run, and handed
        back it would run again, in a loop for as long as the broker refuses.
        Given up once the delivery is gone (see _held_until).
        """
        async def publish() -> str | None:
            try:
                await send()
            except ClusterUnavailable as exc:
                return str(exc)
            return None

        def refused(reason: str, delay: float) -> None:
            if not self._holding_for(queue):
                log.error("cluster: cannot send %s of %s %s to %s (%s); the event stays on this node "
                          "unacknowledged, not run again, and is sent as soon as the broker takes it "
                          "(tried again after %gs, doubling up to %gs)", what, job.function,
                          job.request_id, queue, reason, delay, OUTCOME_RETRY_MAX_S)
            self._unsent[job.request_id] = (queue, reason)

        try:
            await _held_until(job, f"{what} was sent", message, publish, refused)
            if self._unsent.pop(job.request_id, None) is not None and not self._holding_for(queue):
                log.info("cluster: %s takes events again; what was held back for it is sent", queue)
        finally:
            self._unsent.pop(job.request_id, None)

    def _holding_for(self, queue: str) -> bool:
        return any(held == queue for held, _ in self._unsent.values())

    # -- outcomes for on_done ----------------------------------------------------------------

    async def _report(self, job: Job, outcome: QueuedOutcome) -> None:
        if not job.callback or not job.reply_to:
            return
        if job.reply_to == self.inbox:
            await self.outcome_arrived(job.callback, outcome)
            return
        try:
            channel = await self._channel()
            # Not mandatory: an inbox that is gone belongs to a node that is gone.
            await channel.default_exchange.publish(
                aio_pika.Message(outcome_to_json(outcome), type=OUTCOME_TYPE, app_id="faasd",
                                 correlation_id=job.callback, content_type="application/json"),
                routing_key=job.reply_to, timeout=PUBLISH_TIMEOUT_S)
        except Exception as exc:
            log.warning("cluster: the outcome of %s could not be sent to the node that queued it (%s)",
                        job.request_id, exc)

    async def outcome_arrived(self, callback: str, outcome: QueuedOutcome) -> None:
        entry = self._callbacks.pop(callback, None)
        if entry is not None:
            await notify_done(entry[0], outcome)

    async def on_inbox_outcome(self, message: AbstractIncomingMessage) -> None:
        if not message.correlation_id:
            return
        try:
            outcome = outcome_from_json(message.body)
        except Exception as exc:
            log.warning("cluster: a malformed outcome message arrived (%s); ignored", exc)
            return
        await self.outcome_arrived(message.correlation_id, outcome)

    def forget_stale_callbacks(self) -> None:
        """Drop callbacks whose outcome can no longer come (their event is far past its max age)."""
        now = time.time()
        for key, (_, queued_at) in list(self._callbacks.items()):
            if now - queued_at > AsyncConfig().max_event_age_s + CALLBACK_GRACE_S:
                del self._callbacks[key]

    # -- figures from the broker ------------------------------------------------------------

    async def refresh_depths(self, connection: Any) -> None:
        """How many events wait on the broker, per function, in the queues this node uses."""
        queues = dict(self._declared)
        queues.update({name: c.function for name, c in self._consumers.items()})
        waiting: dict[str, int] = {}
        for queue, function in sorted(queues.items()):
            if self._stats_channel is None or self._stats_channel.is_closed:
                self._stats_channel = await connection.channel(publisher_confirms=False)
            try:
                declared = await self._stats_channel.declare_queue(queue, passive=True, robust=False)
            except aiormq.exceptions.ChannelNotFoundEntity:
                # Deleted behind our back; the broker closed the channel: start a new one.
                self._declared.pop(queue, None)
                channel, self._stats_channel = self._stats_channel, None
                await _close_channel(channel)
                continue
            count = int(declared.declaration_result.message_count or 0)
            waiting[function] = waiting.get(function, 0) + count
        for function, count in waiting.items():
            self._figure(function).waiting = count


async def _settle(settle: Any, function: str, what: str) -> None:
    try:
        await settle
    except Exception as exc:
        # The channel the message came on is gone: the broker has it back already.
        log.warning("cluster: could not %s an event of %s (%s); the broker delivers it again",
                    what, function, _explain(exc))


def _log_fault(job: Job, faults: int, exc: Exception, then: str) -> None:
    """The traceback the first time `job` could not be processed, one line each time after."""
    if faults == 1:
        log.error("cluster: event %s of %s could not be processed (1 of %d times before it is "
                  "given up); %s", job.request_id, job.function, MAX_FAULTS, then, exc_info=exc)
    else:
        log.error("cluster: event %s of %s could not be processed again (%d of %d times: %s); %s",
                  job.request_id, job.function, faults, MAX_FAULTS, _explain(exc), then)


async def _held_until(job: Job, done: str, message: AbstractIncomingMessage | None,
                      attempt: Callable[[], Awaitable[str | None]],
                      refused: Callable[[str, float], None]) -> None:
    """Run `attempt` (None: it worked; else why not) until it works, telling `refused`
    why and the pause before the next try (outcome_retry_delays(): 1 s, doubling to 30 s).

    Meanwhile `job`'s event stays here unacknowledged. Once the channel
    `message` came on has closed (the connection dropped, during the run or
    since), the broker has the event back to deliver again: this gives up
    (_DeliveryGone) rather than do what the next run does too. An event run
    here for its source (`message` None) waits for as long as it takes.
    """
    delays = outcome_retry_delays()
    reason = ""
    while True:
        if _delivery_gone(message):
            log.warning("cluster: the connection that delivered %s %s closed before %s%s; the broker "
                        "delivers the event again, and it runs again", job.function, job.request_id,
                        done, f" ({reason})" if reason else "")
            raise _DeliveryGone
        failed = await attempt()
        if failed is None:
            return
        reason = failed
        if _delivery_gone(message):
            continue  # the broker has it back: given up above
        delay = next(delays)
        refused(reason, delay)
        await asyncio.sleep(delay)


def _delivery_gone(message: AbstractIncomingMessage | None) -> bool:
    """Whether the channel `message` came on has closed: then the broker has it back."""
    if message is None:
        return False
    try:
        return message.channel.is_closed
    except aiormq.exceptions.ChannelInvalidStateError:  # aio-pika's answer once it has closed
        return True


async def _close_channel(channel: Any) -> None:
    # A robust channel closed by the broker reopens itself unless told to close.
    if channel is None or (channel.is_closed and not isinstance(channel, AbstractRobustChannel)):
        return
    await let_go(channel.close(), log, "closing a broker channel")


def _explain(exc: BaseException) -> str:
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        return (f"the queue exists on the broker with other settings (a classic queue where a "
                f"quorum one is expected, or other arguments): {exc}")
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return f"the broker refused access: {exc}"
    return f"{type(exc).__name__}: {exc}"
