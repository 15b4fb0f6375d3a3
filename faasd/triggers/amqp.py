"""AMQP triggers: RabbitMQ exchanges as SNS topics. A message becomes one SNS notification.

    [[triggers]]
    type = "amqp"
    exchange = "orders"          # declared durable if missing (amq.* exchanges are used as they are)
    exchange_type = "topic"      # topic (default) | direct | fanout | headers
    routing_key = "order.*"      # or a list; default "#" for topic, "" otherwise
    format = "sns"               # sns (default) | rmq (Amazon MQ aws:rmq event) | raw (the body)
    queue = "..."                # default faasd.<function>.<exchange>
    prefetch = 10                # default and upper bound: the function's concurrency (else 10)

Topology. Each trigger consumes its own durable queue, bound to the exchange
with each routing key, so several functions bound to one exchange each get
every matching message (fan-out). The queue dead-letters into the durable
direct exchange `faasd.dead-letter`, routed to the queue `<queue>.dead-letter`.
Queues outlive their function (a redeploy loses nothing); delete them with
the broker's tools when a trigger is retired.

Delivery. A message is put into the durable asynchronous queue and
acknowledged only when its event finally succeeded; when it is dead-lettered
(retries per `[async]` exhausted, or too old) it is rejected without requeue,
so the broker moves it to the dead-letter queue, and the async queue writes
its dead-letter record (`<data-dir>/dead-letter/NAME/`). If the daemon dies
or the connection drops before that, the message is still unacknowledged and
the broker delivers it again: at least once, never lost. At most `prefetch`
messages are unacknowledged per trigger, so a backlog of any size stays on
the broker, not in the daemon's memory.

Connection. One robust connection per daemon (`[amqp] url`). Without a url,
AMQP triggers are disabled (said once in the log). When the broker cannot be
reached, at start or later, the daemon keeps retrying by itself; meanwhile
the triggers say "retrying" with the broker's error as their reason (the
dashboard shows it on their chips), `/readyz` reports the `amqp` check as failing,
and everything else keeps working. On reconnect aio-pika restores channels,
prefetch, declarations, bindings and consumers. The connection state is in
`daemon.amqp_state` (a dict) and `daemon.amqp_connected` (for /metrics). The
connection itself (retries, state, close) is `faasd.broker.BrokerConnection`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import socket
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import aiormq
import orjson
from aio_pika.abc import (
    AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection, ExchangeType,
)
from yarl import URL

from ..broker import LET_GO_TIMEOUT_S, BrokerConnection, let_go
from ..spec import ACCOUNT_ID, FunctionSpec, Trigger, new_request_id
from .base import RunningTrigger, TriggerSource, queue_of

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger("faasd.triggers.amqp")

DEAD_LETTER_EXCHANGE = "faasd.dead-letter"
DEFAULT_PREFETCH = 10
RECONNECT_INTERVAL_S = 2
RETRY_MAX_S = 30.0
STOP_WAIT_S = 10.0
NACK_DELAY_S = 1.0  # before handing back a message the queue refused, so it does not spin
REQUEST_ID_NAMESPACE = uuid.UUID("2c9a4f1e-7b3d-4e8a-b5c6-d1e2f3a4b5c6")


# -- events -----------------------------------------------------------------------------

def _text(body: bytes) -> tuple[str, bool]:
    """The body as text, or base64 (True) when it is not UTF-8."""
    try:
        return body.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(body).decode(), True


def sns_attribute(value: Any) -> dict[str, str] | None:
    """An AMQP header value as an SNS MessageAttribute."""
    if value is None:
        return None
    if isinstance(value, bool):
        return {"Type": "String", "Value": "true" if value else "false"}
    if isinstance(value, (int, float, Decimal)):
        return {"Type": "Number", "Value": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return {"Type": "String", "Value": raw.decode("utf-8")}
        except UnicodeDecodeError:
            return {"Type": "Binary", "Value": base64.b64encode(raw).decode()}
    if isinstance(value, datetime):
        return {"Type": "String", "Value": _iso(value)}
    if isinstance(value, (list, tuple)):
        return {"Type": "String.Array", "Value": orjson.dumps(_jsonable(list(value))).decode()}
    if isinstance(value, dict):
        return {"Type": "String", "Value": orjson.dumps(_jsonable(value)).decode()}
    return {"Type": "String", "Value": str(value)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _text(bytes(value))[0]
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _iso(moment: datetime | None) -> str:
    if moment is None:
        moment = datetime.now(timezone.utc)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    moment = moment.astimezone(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def topic_arn(exchange: str, region: str) -> str:
    return f"arn:aws:sns:{region}:{ACCOUNT_ID}:{exchange}"


def sns_event(message: AbstractIncomingMessage, *, exchange: str, queue: str, region: str,
              message_id: str) -> dict[str, Any]:
    """The SNS notification Lambda receives: body as Message, routing key as Subject."""
    text, encoded = _text(message.body)
    attributes: dict[str, dict[str, str]] = {}
    for key, value in (message.headers or {}).items():
        attribute = sns_attribute(value)
        if attribute is not None:
            attributes[str(key)] = attribute
    if encoded:
        attributes["faasd.body-encoding"] = {"Type": "String", "Value": "base64"}
    arn = topic_arn(exchange, region)
    return {"Records": [{
        "EventSource": "aws:sns",
        "EventVersion": "1.0",
        "EventSubscriptionArn": f"{arn}:{queue}",
        "Sns": {
            "Type": "Notification",
            "MessageId": message_id,
            "TopicArn": arn,
            "Subject": message.routing_key or None,
            "Message": text,
            "Timestamp": _iso(message.timestamp),
            "SignatureVersion": "1",
            "Signature": "",
            "SigningCertUrl": "",
            "UnsubscribeUrl": "",
            "MessageAttributes": attributes,
        },
    }]}


def _rmq_header(value: Any) -> Any:
    # Amazon MQ shows AMQP long strings as their bytes.
    if isinstance(value, str):
        return {"bytes": list(value.encode())}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": list(bytes(value))}
    if isinstance(value, dict):
        return {str(k): _rmq_header(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rmq_header(v) for v in value]
    return _jsonable(value)


def _java_date(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    hour = moment.hour % 12 or 12
    return f"{moment:%b} {moment.day}, {moment.year}, {hour}:{moment:%M:%S} {'AM' if moment.hour < 12 else 'PM'}"


def rmq_event(message: AbstractIncomingMessage, *, queue: str, vhost: str, region: str,
              broker: str) -> dict[str, Any]:
    """Amazon MQ for RabbitMQ's `aws:rmq` event, with one message."""
    expiration = message.expiration
    properties = {
        "contentType": message.content_type,
        "contentEncoding": message.content_encoding,
        "headers": {str(k): _rmq_header(v) for k, v in (message.headers or {}).items()},
        "deliveryMode": int(message.delivery_mode) if message.delivery_mode else None,
        "priority": message.priority,
        "correlationId": message.correlation_id,
        "replyTo": message.reply_to,
        "expiration": str(int(expiration * 1000)) if expiration else None,
        "messageId": message.message_id,
        "timestamp": _java_date(message.timestamp),
        "type": message.type,
        "userId": message.user_id,
        "appId": message.app_id,
        "clusterId": None,
        "bodySize": len(message.body),
    }
    return {
        "eventSource": "aws:rmq",
        "eventSourceArn": f"arn:aws:mq:{region}:{ACCOUNT_ID}:broker:{broker}:b-faasd",
        "rmqMessagesByQueue": {
            f"{queue}::{vhost}": [{
                "basicProperties": properties,
                "redelivered": bool(message.redelivered),
                "data": base64.b64encode(message.body).decode(),
            }],
        },
    }


def raw_event(body: bytes) -> bytes:
    """The body itself when it is JSON; otherwise the body as a JSON string (base64 if binary)."""
    try:
        orjson.loads(body)
        return body
    except orjson.JSONDecodeError:
        return orjson.dumps(_text(body)[0])


# -- connection -------------------------------------------------------------------------

class AmqpSource(TriggerSource):
    kind = "amqp"

    def __init__(self, daemon: "Daemon") -> None:
        super().__init__(daemon)
        self.url = daemon.config.amqp.url
        self._said_disabled = False
        self.broker = BrokerConnection(
            self.url, connect_url=self._connect_url, log=log, prefix="AMQP ",
            waiting="AMQP triggers wait", restored="consumers restored", initial="idle",
            on_state=self._state_changed, close_error="error closing the AMQP connection",
            close_timeout=LET_GO_TIMEOUT_S)
        self.state = self.broker.state
        daemon.amqp_state = self.state  # type: ignore[attr-defined]
        self._set_connected(None if not self.url else False)

    @property
    def connection(self) -> AbstractRobustConnection | None:
        return self.broker.connection

    def _set_connected(self, value: bool | None) -> None:
        # /metrics reads a bool (absent when AMQP is not configured).
        if value is None:
            if hasattr(self.daemon, "amqp_connected"):
                delattr(self.daemon, "amqp_connected")
        else:
            self.daemon.amqp_connected = value  # type: ignore[attr-defined]

    def _state_changed(self, state: str) -> None:
        self._set_connected(state == "connected" if self.url else None)

    def not_running_reason(self, spec: FunctionSpec) -> str | None:
        if self.url:
            return None
        if not self._said_disabled and any(t.type == "amqp" for t in spec.triggers):
            self._said_disabled = True
            log.warning("AMQP triggers are disabled: no [amqp] url in the config "
                        "(or FAASD_AMQP_URL); function %s has one", spec.name)
        return "no [amqp] url in the config: AMQP triggers are disabled"

    async def attach(self) -> None:
        if self.url:
            self.daemon.readiness_checks["amqp"] = self.readiness
        await super().attach()

    def readiness(self) -> tuple[bool, str]:
        consuming = len(self.running)
        state = self.state["state"]
        if state == "connected" or consuming == 0:
            return True, f"{state}; {consuming} AMQP trigger(s)"
        return False, f"{state}: {self.broker_problem()}"

    def broker_problem(self) -> str:
        """What is said of a broker that is not connected: its url, the password
        masked, and its last error."""
        error = self.state.get("last_error")
        return f"broker {self.state['url']} unreachable" + (f" ({error})" if error else "")

    def ensure_connecting(self) -> None:
        if not self._closed:
            self.broker.start()

    async def connected(self) -> AbstractRobustConnection:
        self.ensure_connecting()
        await self.broker.ready.wait()
        assert self.connection is not None
        return self.connection

    def _connect_url(self) -> str:
        assert self.url is not None
        parsed = URL(self.url)
        extra: dict[str, str] = {}
        if "reconnect_interval" not in parsed.query:
            extra["reconnect_interval"] = str(RECONNECT_INTERVAL_S)
        if "name" not in parsed.query:
            extra["name"] = f"faasd {socket.gethostname()} pid {os.getpid()}"
        return str(parsed.update_query(extra)) if extra else self.url

    def create(self, spec: FunctionSpec, trigger: Trigger, index: int) -> "AmqpTrigger":
        self.ensure_connecting()
        same_exchange = [t for t in spec.triggers
                         if t.type == "amqp" and t.get("exchange") == trigger.get("exchange")]
        queue = trigger.get("queue") or f"faasd.{spec.name}.{trigger.get('exchange')}"
        if len(same_exchange) > 1 and not trigger.get("queue"):
            queue += f".{index}"
        return AmqpTrigger(self, spec, trigger, index, queue)

    async def close(self) -> None:
        self.broker.closing()
        await super().close()
        await self.broker.close("closed" if self.url else "disabled")


# -- one trigger ------------------------------------------------------------------------

class AmqpTrigger(RunningTrigger):
    def __init__(self, source: AmqpSource, spec: FunctionSpec, trigger: Trigger, index: int,
                 queue: str) -> None:
        self.source = source
        self.spec = spec
        self.index = index
        self.exchange: str = trigger.get("exchange")
        self.exchange_type: str = trigger.get("exchange_type", "topic")
        self.routing_keys: list[str] = list(trigger.get("routing_keys", ["#"]))
        self.format: str = trigger.get("format", "sns")
        self.queue_name = queue
        self.dead_letter_queue = f"{queue}.dead-letter"
        self.prefetch_option: int | None = trigger.get("prefetch")
        self.prefetch = self._prefetch(spec)
        self.channel: AbstractChannel | None = None
        self.queue: AbstractQueue | None = None
        self.consumer_tag: str | None = None
        self._task: asyncio.Task | None = None
        self._acks: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.status = "waiting for the broker"
        self.last_error: str | None = None
        self.received = 0
        self.acked = 0
        self.dead_lettered = 0
        self.requeued = 0
        self.ack_failures = 0
        self.inflight = 0
        self.max_inflight = 0

    def _prefetch(self, spec: FunctionSpec) -> int:
        limit = spec.concurrency or min(DEFAULT_PREFETCH, self.source.daemon.config.limits.max_concurrency)
        return min(self.prefetch_option or limit, limit)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        delay = 1.0
        failures = 0
        while True:
            if self.source.state["state"] != "connected":
                self.status = "waiting for the broker"
            connection = await self.source.connected()
            try:
                await self._setup(connection)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self.last_error = self._explain(exc)
                self.status = "error"
                (log.error if failures == 1 else log.debug)(
                    "function %s: cannot consume from exchange %s: %s; retrying", self.spec.name,
                    self.exchange, self.last_error)
                await self._close_channel()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self.status = "consuming"
            self.last_error = None
            log.info("function %s: consuming queue %s (exchange %s, keys %s, prefetch %d)",
                     self.spec.name, self.queue_name, self.exchange, ", ".join(map(repr, self.routing_keys)),
                     self.prefetch)
            return

    def _explain(self, exc: BaseException) -> str:
        if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
            return (f"exchange {self.exchange!r} or queue {self.queue_name!r} already exists with "
                    f"other settings (type, durability or arguments): {exc}")
        if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
            return f"the broker refused access: {exc}"
        if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
            return f"not found on the broker: {exc}"
        return f"{type(exc).__name__}: {exc}"

    async def _setup(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel()
        self.channel = channel
        await channel.set_qos(prefetch_count=self.prefetch)
        if self.exchange.startswith("amq."):
            exchange = await channel.get_exchange(self.exchange)  # the broker's own: never declared
        else:
            exchange = await channel.declare_exchange(self.exchange, ExchangeType(self.exchange_type),
                                                      durable=True)
        dead_letters = await channel.declare_exchange(DEAD_LETTER_EXCHANGE, ExchangeType.DIRECT,
                                                      durable=True)
        dead_letter_queue = await channel.declare_queue(self.dead_letter_queue, durable=True)
        await dead_letter_queue.bind(dead_letters, routing_key=self.queue_name)
        queue = await channel.declare_queue(self.queue_name, durable=True, arguments={
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": self.queue_name,
        })
        for key in self.routing_keys:
            await queue.bind(exchange, routing_key=key)
        self.queue = queue
        self.consumer_tag = await queue.consume(self._on_message)

    async def stop(self) -> None:
        self.status = "stopped"
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.queue is not None and self.consumer_tag is not None and self.source.broker.connected:
            # With the connection lost the broker has dropped the consumer already.
            await let_go(self.queue.cancel(self.consumer_tag), log, f"cancelling consumer {self.consumer_tag}")
        # Let events in flight finish and be acknowledged (not when the daemon
        # is stopping: it has drained what it could, the rest is redelivered).
        if not self.source._closed and self.inflight:
            try:
                await asyncio.wait_for(self._idle.wait(), STOP_WAIT_S)
            except asyncio.TimeoutError:
                log.warning("function %s: %d AMQP messages still in flight; the broker delivers "
                            "them again", self.spec.name, self.inflight)
        if self._acks:
            await asyncio.wait(self._acks, timeout=2)
        await self._close_channel()

    async def _close_channel(self) -> None:
        channel, self.channel = self.channel, None
        self.queue = None
        self.consumer_tag = None
        if channel is not None and not channel.is_closed:
            await let_go(channel.close(), log, "closing an AMQP channel")

    def update(self, spec: FunctionSpec) -> None:
        self.spec = spec
        prefetch = self._prefetch(spec)
        if prefetch != self.prefetch and self.channel is not None:
            self.prefetch = prefetch
            task = asyncio.get_running_loop().create_task(self.channel.set_qos(prefetch_count=prefetch))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

    def state(self) -> dict[str, Any]:
        status = self.status
        connection = self.source.state["state"]
        if status == "consuming" and connection != "connected":
            status = connection  # reconnecting: consumers come back with the connection
        elif status == "waiting for the broker" and connection == "retrying":
            status = "retrying"  # never connected yet: the broker is unreachable
        # The broker's error is the reason of a trigger it holds up, as /readyz says it.
        held_up = connection in ("retrying", "reconnecting") and status != "stopped"
        reason = self.source.broker_problem() if held_up else None
        return {
            "status": status,
            "reason": reason,
            "connection": connection,
            "queue": self.queue_name,
            "dead_letter_queue": self.dead_letter_queue,
            "exchange": self.exchange,
            "routing_keys": self.routing_keys,
            "format": self.format,
            "prefetch": self.prefetch,
            "received": self.received,
            "acked": self.acked,
            "dead_lettered": self.dead_lettered,
            "requeued": self.requeued,
            "ack_failures": self.ack_failures,
            "inflight": self.inflight,
            "max_inflight": self.max_inflight,
            "last_error": self.last_error,
        }

    # -- messages ------------------------------------------------------------------------

    def _event(self, message: AbstractIncomingMessage, message_id: str) -> bytes:
        region = self.source.daemon.region
        if self.format == "raw":
            return raw_event(message.body)
        if self.format == "rmq":
            vhost = URL(self.source.url or "").path.lstrip("/") or "/"
            return orjson.dumps(rmq_event(message, queue=self.queue_name, vhost=vhost,
                                          region=region, broker="faasd"))
        return orjson.dumps(sns_event(message, exchange=self.exchange, queue=self.queue_name,
                                      region=region, message_id=message_id))

    def _stable_request_id(self, message: AbstractIncomingMessage) -> str:
        """One request id for every delivery of one message, from its publisher's message id.

        Publishers reuse message ids (an order's id on each of its messages):
        the routing key and body are part of it, so that different messages
        never share a request id, and with it a log, a dead-letter file."""
        digest = hashlib.sha256(message.body).hexdigest()
        name = f"{self.queue_name}\0{message.message_id}\0{message.routing_key or ''}\0{digest}"
        return str(uuid.uuid5(REQUEST_ID_NAMESPACE, name))

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.received += 1
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        self._idle.clear()
        if message.message_id:
            message_id = message.message_id
            request_id = self._stable_request_id(message)
        else:
            request_id = message_id = new_request_id()
        try:
            payload = self._event(message, message_id)
            # The broker keeps the message until it is settled in on_done, so the
            # event need not be written to disk a second time (durable=False).
            await queue_of(self.source.daemon).put(
                self.spec.name, payload, request_id=request_id, source="amqp",
                on_done=lambda outcome: self._settle(message, outcome), durable=False)
        except Exception as exc:
            self.last_error = f"message not queued: {exc}"
            log.error("function %s: AMQP message from %s not queued (%s); handing it back to the broker",
                      self.spec.name, self.queue_name, exc)
            await asyncio.sleep(NACK_DELAY_S)
            self.requeued += 1
            await self._finish(message.nack(requeue=True), "return")

    async def _settle(self, message: AbstractIncomingMessage, outcome: Any) -> None:
        if getattr(outcome, "succeeded", False):
            self.acked += 1
            await self._finish(message.ack(), "acknowledge")
        else:
            # The broker routes it to the dead-letter queue (x-dead-letter-exchange).
            self.dead_lettered += 1
            await self._finish(message.reject(requeue=False), "dead-letter")

    async def _finish(self, settle: Any, what: str) -> None:
        try:
            await settle
        except Exception as exc:
            # The channel this message came on is gone (reconnect): the broker
            # has put the message back and will deliver it again.
            self.ack_failures += 1
            log.warning("function %s: could not %s an AMQP message (%s); the broker delivers it again",
                        self.spec.name, what, self._explain(exc))
        finally:
            self.inflight -= 1
            if self.inflight <= 0:
                self.inflight = 0
                self._idle.set()


async def start(daemon: "Daemon") -> None:
    """Extension entry point: AMQP triggers for every function that has them."""
    source = AmqpSource(daemon)
    daemon.amqp_triggers = source  # type: ignore[attr-defined]
    await source.attach()
