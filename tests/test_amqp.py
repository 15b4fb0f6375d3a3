"""AMQP triggers against the real RabbitMQ: fan-out, formats, acks, dead letters, cuts, kill -9."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

import aio_pika
import pytest

from faasd.spec import load_spec
from support import EXAMPLES, Proxy, free_port, http, wait_until, write_function

pytestmark = pytest.mark.amqp


# -- the broker, from the test's side ---------------------------------------------------

async def _with_channel(url: str, work):
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        return await work(channel)
    finally:
        await connection.close()


def publish(url: str, exchange: str, messages: list[dict], exchange_type: str = "topic") -> None:
    """Publish persistent messages: {"key", "body", "headers"?, "id"?, ...properties}."""
    async def work(channel):
        target = await channel.declare_exchange(exchange, exchange_type, durable=True)
        for item in messages:
            body = item["body"] if isinstance(item["body"], bytes) else json.dumps(item["body"]).encode()
            await target.publish(aio_pika.Message(
                body, headers=item.get("headers"), message_id=item.get("id"),
                content_type=item.get("content_type"), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=item["key"])
    asyncio.run(_with_channel(url, work))


def ready_count(url: str, queue: str) -> int:
    async def work(channel):
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count
    return asyncio.run(_with_channel(url, work))


def get_message(url: str, queue: str) -> aio_pika.abc.AbstractIncomingMessage | None:
    async def work(channel):
        declared = await channel.declare_queue(queue, passive=True)
        message = await declared.get(fail=False)
        if message is not None:
            await message.ack()
        return message
    return asyncio.run(_with_channel(url, work))


class Names:
    """Unique exchange names per test; everything declared under them is deleted after."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"faasd-test-{uuid.uuid4().hex[:10]}"
        self.exchanges: list[str] = []
        self.queues: list[str] = []

    def exchange(self, label: str = "orders") -> str:
        name = f"{self.prefix}.{label}"
        self.exchanges.append(name)
        return name

    def consumer_queue(self, function: str, exchange: str) -> str:
        queue = f"faasd.{function}.{exchange}"
        self.queues += [queue, f"{queue}.dead-letter"]
        return queue

    def cleanup(self) -> None:
        async def work(channel):
            for queue in self.queues:
                await channel.queue_delete(queue)
            for exchange in self.exchanges:
                await channel.exchange_delete(exchange)
        asyncio.run(_with_channel(self.url, work))


@pytest.fixture
def names(amqp_url: str) -> Iterator[Names]:
    """Listed first by each test, so that it is torn down after the daemons (which would
    re-declare a deleted queue they consume)."""
    found = Names(amqp_url)
    yield found
    found.cleanup()


# -- the daemon's side ------------------------------------------------------------------

RECORDER = """
import json, os, time

def handler(event, context):
    time.sleep(float(os.environ.get("SLEEP", "0")))
    if os.environ.get("FAIL"):
        raise RuntimeError("this function always fails")
    print("RECORD " + json.dumps({"event": event, "request_id": context.aws_request_id}))
    return "ok"
"""


def amqp_function(functions: Path, name: str, trigger: str, *, sleep: float = 0, fail: bool = False,
                  concurrency: int = 4, extra: str = "") -> None:
    write_function(functions, f"{name}/handler.py", RECORDER)
    env = f'SLEEP = "{sleep}"\n' + ('FAIL = "1"\n' if fail else "")
    write_function(functions, f"{name}/function.toml",
                   f"timeout_s = 10\nconcurrency = {concurrency}\n{extra}\n[env]\n{env}"
                   f'[[triggers]]\ntype = "amqp"\n{trigger}\n')


def config(tmp_path: Path, url: str | None) -> Path:
    path = tmp_path / "faasd.toml"
    path.write_text(f'[amqp]\nurl = "{url}"\n' if url else "")
    return path


def records(daemon, name: str) -> list[dict]:
    log = daemon.data / "logs" / f"{name}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return [json.loads(m.group(1)) for m in re.finditer(r"RECORD (\{.*\})\s*$", text, re.M)]


def amqp_state(daemon, name: str) -> dict:
    # {} while the function is listed without its trigger yet (its files still being written).
    return next((t["state"] for t in daemon.function(name)["triggers"] if t["type"] == "amqp"), {})


def consuming(daemon, name: str) -> bool:
    response = daemon.get(f"/system/functions/{name}")
    return response.status == 200 and amqp_state(daemon, name).get("status") == "consuming"


def sns_messages(daemon, name: str) -> list[str]:
    return [r["event"]["Records"][0]["Sns"]["Message"] for r in records(daemon, name)]


# -- tests ------------------------------------------------------------------------------

def test_one_order_fans_out_to_both_example_functions_as_sns(
        names, start_daemon, functions_dir, tmp_path, amqp_url):
    exchange = names.exchange()
    for example in ("order-billing", "order-shipping"):
        shutil.copytree(EXAMPLES / example, functions_dir / example)
        toml = functions_dir / example / "function.toml"
        toml.write_text(toml.read_text().replace('exchange = "orders"', f'exchange = "{exchange}"'))
        names.consumer_queue(example, exchange)
    amqp_function(functions_dir, "audit", f'exchange = "{exchange}"\nrouting_key = "order.#"')
    names.consumer_queue("audit", exchange)
    daemon = start_daemon(functions_dir, config=config(tmp_path, amqp_url))
    for name in ("order-billing", "order-shipping", "audit"):
        wait_until(lambda: consuming(daemon, name), message=f"{name} to consume")
    order = {"id": 42, "customer": "ada", "items": [{"sku": "tea", "qty": 2, "price": 4.5}],
             "address": "1 Analytical St"}
    publish(amqp_url, exchange, [{"key": "order.created", "body": order, "id": "order-42",
                                  "headers": {"tenant": "acme", "attempt": 3, "urgent": True}}])
    wait_until(lambda: "billing order 42" in daemon.log_of("order-billing"), timeout=20)
    wait_until(lambda: "shipping order 42" in daemon.log_of("order-shipping"), timeout=20)
    assert "billing order 42 (order.created, tenant acme): total 9.00" in daemon.log_of("order-billing")
    assert "shipping order 42: ship to 1 Analytical St" in daemon.log_of("order-shipping")

    wait_until(lambda: records(daemon, "audit"), timeout=20)
    record = records(daemon, "audit")[0]["event"]["Records"][0]
    assert record["EventSource"] == "aws:sns"
    sns = record["Sns"]
    assert sns["Type"] == "Notification"
    assert sns["TopicArn"] == f"arn:aws:sns:us-east-1:000000000000:{exchange}"
    assert sns["TopicArn"].endswith(exchange)
    assert sns["Subject"] == "order.created"
    assert json.loads(sns["Message"]) == order
    assert sns["MessageId"] == "order-42"
    assert sns["MessageAttributes"] == {"tenant": {"Type": "String", "Value": "acme"},
                                        "attempt": {"Type": "Number", "Value": "3"},
                                        "urgent": {"Type": "String", "Value": "true"}}
    # A routing key only the wildcard bindings match: shipping and audit, not billing.
    publish(amqp_url, exchange, [{"key": "order.cancelled", "body": {"id": 43}}])
    wait_until(lambda: "shipping order 43: cancel shipment" in daemon.log_of("order-shipping"), timeout=20)
    wait_until(lambda: len(records(daemon, "audit")) == 2, timeout=20)
    time.sleep(0.5)
    assert "order 43" not in daemon.log_of("order-billing")
    state = amqp_state(daemon, "order-billing")
    assert state["acked"] == 1 and state["queue"] == f"faasd.order-billing.{exchange}"


def test_raw_and_rmq_formats(names, start_daemon, functions_dir, tmp_path, amqp_url):
    exchange = names.exchange("events")
    amqp_function(functions_dir, "raw", f'exchange = "{exchange}"\nformat = "raw"')
    amqp_function(functions_dir, "rmq", f'exchange = "{exchange}"\nformat = "rmq"')
    for name in ("raw", "rmq"):
        names.consumer_queue(name, exchange)
    daemon = start_daemon(functions_dir, config=config(tmp_path, amqp_url))
    wait_until(lambda: consuming(daemon, "raw") and consuming(daemon, "rmq"))
    publish(amqp_url, exchange, [
        {"key": "a.json", "body": {"answer": 42}, "headers": {"h": "v"}, "content_type": "application/json"},
        {"key": "b.text", "body": b"plain words"},
    ])
    wait_until(lambda: len(records(daemon, "raw")) == 2 and len(records(daemon, "rmq")) == 2, timeout=20)
    assert sorted((r["event"] for r in records(daemon, "raw")), key=str) == sorted(
        [{"answer": 42}, "plain words"], key=str)
    events = [r["event"] for r in records(daemon, "rmq")]
    first = next(e for e in events if e["rmqMessagesByQueue"][f"faasd.rmq.{exchange}::/"][0]["data"]
                 == base64.b64encode(b'{"answer": 42}').decode())
    assert first["eventSource"] == "aws:rmq"
    message = first["rmqMessagesByQueue"][f"faasd.rmq.{exchange}::/"][0]
    assert message["redelivered"] is False
    assert message["basicProperties"]["contentType"] == "application/json"
    assert message["basicProperties"]["headers"] == {"h": {"bytes": list(b"v")}}
    assert message["basicProperties"]["deliveryMode"] == 2
    assert message["basicProperties"]["bodySize"] == len(b'{"answer": 42}')


def test_fifty_messages_none_lost_and_every_one_acknowledged(
        names, start_daemon, functions_dir, tmp_path, amqp_url):
    exchange = names.exchange()
    amqp_function(functions_dir, "orders", f'exchange = "{exchange}"\nrouting_key = "order.*"',
                  concurrency=4)
    queue = names.consumer_queue("orders", exchange)
    daemon = start_daemon(functions_dir, config=config(tmp_path, amqp_url))
    wait_until(lambda: consuming(daemon, "orders"))
    publish(amqp_url, exchange, [{"key": "order.created", "body": {"n": i}} for i in range(50)])
    wait_until(lambda: len(records(daemon, "orders")) >= 50, timeout=60, message="50 messages")
    assert sorted(json.loads(m)["n"] for m in sns_messages(daemon, "orders")) == list(range(50))
    wait_until(lambda: amqp_state(daemon, "orders")["acked"] == 50, timeout=10)
    assert ready_count(amqp_url, queue) == 0
    assert amqp_state(daemon, "orders")["max_inflight"] <= 4


def test_prefetch_keeps_a_backlog_on_the_broker(
        names, start_daemon, functions_dir, tmp_path, amqp_url):
    exchange = names.exchange()
    amqp_function(functions_dir, "slow", f'exchange = "{exchange}"', sleep=0.2, concurrency=2)
    queue = names.consumer_queue("slow", exchange)
    daemon = start_daemon(functions_dir, config=config(tmp_path, amqp_url))
    wait_until(lambda: consuming(daemon, "slow"))
    publish(amqp_url, exchange, [{"key": "k", "body": {"n": i}} for i in range(300)])
    time.sleep(2)
    # Read the broker first: work goes on while the test looks, and each later
    # count can only grow, so the bounds below hold whatever runs in between.
    ready = ready_count(amqp_url, queue)
    state = amqp_state(daemon, "slow")
    assert state["prefetch"] == 2
    done = len(records(daemon, "slow"))
    # Everything not done and not among the (at most 2) in flight is still on the broker.
    assert ready >= 300 - done - 2 - 1
    assert state["max_inflight"] <= 2 and state["received"] <= done + 2 + 1


def test_failures_are_retried_then_dead_lettered_to_the_broker_and_the_dir(
        names, start_daemon, functions_dir, tmp_path, amqp_url):
    exchange = names.exchange()
    amqp_function(functions_dir, "broken", f'exchange = "{exchange}"', fail=True,
                  extra="[async]\nmax_retries = 1\nretry_delays_s = [0.2]")
    queue = names.consumer_queue("broken", exchange)
    daemon = start_daemon(functions_dir, config=config(tmp_path, amqp_url))
    wait_until(lambda: consuming(daemon, "broken"))
    publish(amqp_url, exchange, [{"key": "k", "body": {"order": 7}, "id": "m-7"}])
    wait_until(lambda: amqp_state(daemon, "broken")["dead_lettered"] == 1, timeout=30)
    assert daemon.log_of("broken").count("this function always fails") >= 2  # first try and one retry
    message = None
    deadline = time.monotonic() + 10
    while message is None and time.monotonic() < deadline:
        message = get_message(amqp_url, f"{queue}.dead-letter")
        time.sleep(0.1)
    assert message is not None and json.loads(message.body) == {"order": 7}
    assert message.headers["x-death"][0]["queue"] == queue
    assert ready_count(amqp_url, queue) == 0
    dead = list((tmp_path / "data" / "dead-letter" / "broken").glob("*.json"))
    assert len(dead) == 1
    recorded = json.loads(dead[0].read_text())
    assert recorded["requestContext"]["condition"] == "RetriesExhausted"
    assert recorded["requestPayload"]["Records"][0]["Sns"]["MessageId"] == "m-7"


def test_messages_that_share_a_message_id_are_each_their_own_event_and_dead_letter(
        names, start_daemon, functions_dir, tmp_path, amqp_url):
    # Publishers reuse message ids: an order's id on every message about that order.
    exchange = names.exchange()
    amqp_function(functions_dir, "broken", f'exchange = "{exchange}"', fail=True,
                  extra="[async]\nmax_retries = 0")
    names.consumer_queue("broken", exchange)
    daemon = start_daemon(functions_dir, config=config(tmp_path, amqp_url))
    wait_until(lambda: consuming(daemon, "broken"))
    publish(amqp_url, exchange, [{"key": f"order.{step}", "body": {"order": 7, "step": step}, "id": "order-7"}
                                 for step in ("created", "paid", "shipped")])
    wait_until(lambda: amqp_state(daemon, "broken")["dead_lettered"] == 3, timeout=30)
    dead = [json.loads(path.read_text())
            for path in (tmp_path / "data" / "dead-letter" / "broken").glob("*.json")]
    assert sorted(d["requestPayload"]["Records"][0]["Sns"]["Subject"] for d in dead) == [
        "order.created", "order.paid", "order.shipped"]
    assert len({d["requestContext"]["requestId"] for d in dead}) == 3


def test_a_cut_connection_is_restored_with_readyz_degraded_meanwhile_and_nothing_lost(
        names, start_daemon, functions_dir, tmp_path, amqp_url):
    exchange = names.exchange()
    amqp_function(functions_dir, "steady", f'exchange = "{exchange}"', sleep=0.1, concurrency=2)
    queue = names.consumer_queue("steady", exchange)
    proxy = Proxy(("127.0.0.1", 5672))
    try:
        proxied = amqp_url.replace("127.0.0.1:5672", f"127.0.0.1:{proxy.port}")
        assert proxied != amqp_url
        daemon = start_daemon(functions_dir, config=config(tmp_path, proxied))
        wait_until(lambda: consuming(daemon, "steady"))
        assert daemon.get("/readyz").status == 200
        publish(amqp_url, exchange, [{"key": "k", "body": {"n": i}, "id": f"m{i}"} for i in range(30)])
        wait_until(lambda: len(records(daemon, "steady")) >= 5, timeout=20)

        proxy.cut()  # mid-stream: some messages are in flight, unacknowledged
        wait_until(lambda: daemon.get("/readyz").status == 503, timeout=20, message="/readyz to degrade")
        ready = daemon.get("/readyz").json()
        assert ready["checks"]["amqp"]["ok"] is False
        assert amqp_state(daemon, "steady")["connection"] in ("reconnecting", "retrying")
        time.sleep(3)  # the broker stays unreachable for a while
        assert daemon.get("/healthz").status == 200
        proxy.restore()

        wait_until(lambda: daemon.get("/readyz").status == 200, timeout=30, message="/readyz to recover")
        wait_until(lambda: {json.loads(m)["n"] for m in sns_messages(daemon, "steady")} == set(range(30)),
                   timeout=60, message="every message after the reconnect")
        state = amqp_state(daemon, "steady")
        assert state["status"] == "consuming" and state["connection"] == "connected"
        wait_until(lambda: ready_count(amqp_url, queue) == 0, timeout=10)
        output = daemon.output()
        assert "AMQP reconnected" in output
        # The loss is told once in faasd's words, not in the libraries' tracebacks and ERRORs.
        assert " lost (" in output and "Traceback" not in output
        # Acks of the messages in flight failed with the channel; each says why.
        assert all(reason.strip() for reason in re.findall(r"could not \w+ an AMQP message \((.*?)\);", output))
        assert not [line for line in output.splitlines()
                    if " ERROR " in line and ("aio_pika" in line or "aiormq" in line)]
        # Still consuming: a message published after the reconnect is handled too.
        publish(amqp_url, exchange, [{"key": "k", "body": {"n": 99}}])
        wait_until(lambda: 99 in {json.loads(m)["n"] for m in sns_messages(daemon, "steady")}, timeout=20)
    finally:
        proxy.close()


def test_a_broker_gone_for_good_is_told_quietly_and_faasd_stops_at_once(
        names, start_daemon, functions_dir, tmp_path, amqp_url):
    exchange = names.exchange()
    amqp_function(functions_dir, "steady", f'exchange = "{exchange}"')
    amqp_function(functions_dir, "other", f'exchange = "{exchange}"')
    proxy = Proxy(("127.0.0.1", 5672))
    try:
        proxied = amqp_url.replace("127.0.0.1:5672", f"127.0.0.1:{proxy.port}")
        daemon = start_daemon(functions_dir, config=config(tmp_path, proxied))
        wait_until(lambda: consuming(daemon, "steady") and consuming(daemon, "other"))
    finally:
        proxy.close()  # connections cut, the port closed: every attempt is refused
    wait_until(lambda: daemon.get("/readyz").status == 503, timeout=20, message="/readyz to degrade")
    wait_until(lambda: daemon.output().count("Connection refused") >= 2, timeout=20,
               message="two refused reconnect attempts")
    output = daemon.output()
    # The loss told once; then one line per attempt, not the libraries' ERRORs and repeats.
    assert output.count(" lost (") == 1, output
    assert not [line for line in output.splitlines()
                if " ERROR " in line and ("aio_pika" in line or "aiormq" in line)]
    assert "closed. Reconnecting after" not in output
    # A consumer's cancel waits for the connection to come back: a stop that
    # waited for it would wait for ever. The drain allows 30 s; a stop held up
    # by the broker would be killed at 10.
    assert daemon.stop(timeout=10) == 0


def test_kill_9_with_messages_pending_they_are_redelivered_on_restart(
        names, start_daemon, functions_dir, tmp_path, amqp_url):
    exchange = names.exchange()
    amqp_function(functions_dir, "worker", f'exchange = "{exchange}"', sleep=0.2, concurrency=2)
    queue = names.consumer_queue("worker", exchange)
    cfg = config(tmp_path, amqp_url)
    daemon = start_daemon(functions_dir, config=cfg)
    wait_until(lambda: consuming(daemon, "worker"))
    publish(amqp_url, exchange, [{"key": "k", "body": {"n": i}} for i in range(20)])
    wait_until(lambda: len(records(daemon, "worker")) >= 3, timeout=20)
    daemon.kill9()
    done = {json.loads(m)["n"] for m in sns_messages(daemon, "worker")}
    assert len(done) < 20, "all messages were done before kill -9: nothing was tested"
    # Nothing is lost: what was not acknowledged is back on the broker.
    wait_until(lambda: ready_count(amqp_url, queue) >= 20 - len(done) - 2, timeout=20)
    daemon = start_daemon(functions_dir, config=cfg)
    wait_until(lambda: {json.loads(m)["n"] for m in sns_messages(daemon, "worker")} == set(range(20)),
               timeout=60, message="every message after the restart")
    wait_until(lambda: ready_count(amqp_url, queue) == 0, timeout=20)


def test_without_a_broker_amqp_triggers_are_disabled_or_retrying_and_the_rest_works(
        names, start_daemon, functions_dir, tmp_path):
    exchange = names.exchange()
    amqp_function(functions_dir, "listener", f'exchange = "{exchange}"')
    write_function(functions_dir, "hello.py", "def handler(event, context):\n    return 'hi'\n")

    # No [amqp] url: disabled, said once.
    daemon = start_daemon(functions_dir, config=config(tmp_path, None))
    assert daemon.get("/function/hello").json() == "hi"
    state = amqp_state(daemon, "listener")
    assert state["status"] == "disabled" and "no [amqp] url" in state["reason"]
    assert daemon.get("/readyz").status == 200
    assert daemon.output().count("AMQP triggers are disabled") == 1
    daemon.stop()

    # A url nobody answers: retrying, /readyz says why, HTTP functions work.
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    daemon = start_daemon(functions_dir, config=config(tmp_path, dead), wait=False)
    wait_until(lambda: _answers(daemon.url + "/healthz"), timeout=20)
    assert daemon.get("/function/hello").json() == "hi"
    wait_until(lambda: amqp_state(daemon, "listener")["status"] == "retrying", timeout=20)
    ready = daemon.get("/readyz")
    assert ready.status == 503
    assert ready.json()["checks"]["amqp"]["ok"] is False
    assert "unreachable" in ready.json()["checks"]["amqp"]["detail"]
    assert daemon.output().count("not reachable") == 1


def _answers(url: str) -> bool:
    try:
        return http("GET", url, timeout=2).status == 200
    except OSError:
        return False


def test_amqp_triggers_follow_hot_reload(names, start_daemon, functions_dir, tmp_path, amqp_url):
    first, second = names.exchange("first"), names.exchange("second")
    names.consumer_queue("mover", first)
    names.consumer_queue("mover", second)
    daemon = start_daemon(functions_dir, config=config(tmp_path, amqp_url))
    amqp_function(functions_dir, "mover", f'exchange = "{first}"')
    wait_until(lambda: consuming(daemon, "mover"), timeout=20)
    publish(amqp_url, first, [{"key": "k", "body": "one"}])
    wait_until(lambda: sns_messages(daemon, "mover") == ['"one"'], timeout=20)

    amqp_function(functions_dir, "mover", f'exchange = "{second}"')
    wait_until(lambda: amqp_state(daemon, "mover").get("exchange") == second
               and consuming(daemon, "mover"), timeout=20)
    publish(amqp_url, second, [{"key": "k", "body": "two"}])
    wait_until(lambda: '"two"' in sns_messages(daemon, "mover"), timeout=20)
    # The old queue is no longer consumed: its message waits on the broker.
    publish(amqp_url, first, [{"key": "k", "body": "three"}])
    wait_until(lambda: ready_count(amqp_url, f"faasd.mover.{first}") == 1, timeout=10)
    assert '"three"' not in sns_messages(daemon, "mover")


@pytest.mark.parametrize("trigger, message", [
    ('routing_key = "a"', "triggers[0] (amqp): an amqp trigger needs exchange"),
    ('exchange = "x"\nformat = "json"', "triggers[0] (amqp): format = 'json': expected \"sns\""),
    ('exchange = "x"\nexchange_type = "fan"', "exchange_type = 'fan': expected one of topic"),
    ('exchange = "bad name!"', "exchange = 'bad name!': expected a name"),
    ('exchange = "x"\nroutingkey = "a"', "triggers[0] (amqp): unknown key 'routingkey'"),
    ('exchange = "x"\nprefetch = 0', "prefetch = 0: expected a whole number"),
])
def test_bad_amqp_options_name_the_file_and_the_key(tmp_path, trigger, message):
    write_function(tmp_path, "fn/handler.py", "def handler(event, context):\n    return 1\n")
    write_function(tmp_path, "fn/function.toml", f'[[triggers]]\ntype = "amqp"\n{trigger}\n')
    spec = load_spec("fn", tmp_path / "fn")
    assert spec.load_error is not None and spec.load_error.startswith("function.toml: "), spec.load_error
    assert message in spec.load_error, spec.load_error

