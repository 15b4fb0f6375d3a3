"""Target 8: 10,000 AMQP messages through a no-op function at >= 0.5 x a bare aio-pika consumer.

Same broker, same run, interleaved (bare, faasd, bare, faasd, ...):
  * bare: an aio-pika consumer on a durable queue that acks each message
    (prefetch 100), timed from the first publish-confirmed backlog to the
    last ack;
  * faasd: a function with an amqp trigger (format = "raw") on an exchange;
    MESSAGES are published to it and the clock runs until the function's
    log holds one REPORT line per message.
Both sides start with the whole backlog already in the broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
import uuid

import aio_pika

from common import emit_json, faasd_server, median, report

URL = os.environ.get("FAASD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MESSAGES = int(os.environ.get("BENCH_MESSAGES", "10000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))


async def publish(channel: aio_pika.abc.AbstractChannel, exchange: str, key: str) -> None:
    target = await channel.get_exchange(exchange) if exchange else channel.default_exchange
    for i in range(MESSAGES):
        await target.publish(aio_pika.Message(b'{"n": %d}' % i), routing_key=key)


async def bare_round() -> float:
    connection = await aio_pika.connect_robust(URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        queue = await channel.declare_queue(f"bench-bare-{uuid.uuid4().hex[:8]}", durable=True)
        await publish(channel, "", queue.name)
        await asyncio.sleep(0.5)
        await channel.set_qos(prefetch_count=100)
        done = asyncio.get_running_loop().create_future()
        count = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            await message.ack()
            count += 1
            if count == MESSAGES and not done.done():
                done.set_result(None)

        started = time.perf_counter()
        await queue.consume(on_message)
        await asyncio.wait_for(done, 300)
        elapsed = time.perf_counter() - started
        await queue.delete(if_unused=False, if_empty=False)
        return elapsed


def reports(url: str) -> int:
    """Events of the function that ended in success (the queue's own count)."""
    with urllib.request.urlopen(f"{url}/system/functions/sink") as response:
        return json.loads(response.read())["queue"]["succeeded"]


async def faasd_round(url: str, exchange: str, done_before: int) -> float:
    connection = await aio_pika.connect_robust(URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        await publish(channel, exchange, "bench.msg")
    started = time.perf_counter()
    limit = time.monotonic() + 300
    while await asyncio.to_thread(reports, url) < done_before + MESSAGES:
        if time.monotonic() > limit:
            raise RuntimeError("the function did not get every message")
        await asyncio.sleep(0.05)
    return time.perf_counter() - started


async def main_async() -> None:
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    functions = {
        "sink.py": "def handler(event, context):\n    return None\n",
        "sink.toml": (f'concurrency = 16\n[[triggers]]\ntype = "amqp"\nexchange = "{exchange}"\n'
                      'exchange_type = "topic"\nrouting_key = "bench.#"\nformat = "raw"\n'),
    }
    with faasd_server(functions, env={"FAASD_AMQP_URL": URL}) as url:
        await asyncio.sleep(2)  # the trigger declares its queue and binding
        bare, faasd = [], []
        for round_no in range(ROUNDS):
            bare.append(await bare_round())
            faasd.append(await faasd_round(url, exchange, round_no * MESSAGES))
    ratio = median(bare) / median(faasd)
    report(f"AMQP, {MESSAGES} messages, {ROUNDS} interleaved rounds, medians", [
        ("bare aio-pika consumer", f"{MESSAGES / median(bare):,.0f} msg/s"),
        ("faasd no-op function", f"{MESSAGES / median(faasd):,.0f} msg/s"),
        ("ratio faasd/bare", f"{ratio:.2f}  (target >= 0.5)"),
    ])
    emit_json("amqp", {"bare_msg_s": MESSAGES / median(bare), "faasd_msg_s": MESSAGES / median(faasd),
                       "ratio": ratio})


if __name__ == "__main__":
    asyncio.run(main_async())
