"""A faasd cluster on RabbitMQ: throughput of asynchronous events with 1 node and with 2.

Starts 1 or 2 `faasd serve` nodes with `[cluster] mode = "amqp"` on the same
functions directory (each with its own data dir), fires N Event invokes at a
no-op function, spread over the nodes from C concurrent connections, and
times how long until every node together has run them all. The two sides are
measured interleaved (1, 2, 1, 2, ...) and summarised by their medians.

On one machine the nodes share its cores, so a second node mostly adds
parallelism in talking to the broker, not compute: expect a small gain at
best. Each run uses its own cluster name and deletes its queues afterwards.

    BENCH_EVENTS (2000), BENCH_CONNECTIONS (32), BENCH_REPS (3),
    FAASD_BENCH_AMQP_URL (amqp://guest:guest@127.0.0.1:5672/)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import aio_pika
import aiohttp

from common import FAASD_ROOT, emit_json, free_port, median, process, report

sys.path.insert(0, str(FAASD_ROOT))
from faasd.cluster.topology import Names  # noqa: E402

N = int(os.environ.get("BENCH_EVENTS", "2000"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
REPS = int(os.environ.get("BENCH_REPS", "3"))
AMQP_URL = os.environ.get("FAASD_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
NOOP = "def handler(event, context):\n    return None\n"


@contextmanager
def nodes(count: int, cluster: str) -> Iterator[list[str]]:
    """`count` cluster nodes serving the no-op function; yields their URLs."""
    with tempfile.TemporaryDirectory(prefix="faasd-bench-cluster-") as tmp, ExitStack() as stack:
        functions = Path(tmp) / "functions"
        functions.mkdir()
        (functions / "noop.py").write_text(NOOP)
        (functions / "noop.toml").write_text("concurrency = 4\n")
        urls = []
        for index in range(count):
            port = free_port()
            env = {"PYTHONPATH": str(FAASD_ROOT), "FAASD_CLUSTER_MODE": "amqp",
                   "FAASD_AMQP_URL": AMQP_URL, "FAASD_CLUSTER_NAME": cluster,
                   "FAASD_CLUSTER_NODE": f"node{index}", "FAASD_LOG_LEVEL": "warning"}
            args = [sys.executable, "-m", "faasd", "serve", "--functions", str(functions),
                    "--data-dir", str(Path(tmp) / f"data{index}"), "--port", str(port)]
            stack.enter_context(process(args, env=env, cwd=Path(tmp),
                                        ready_url=f"http://127.0.0.1:{port}/readyz"))
            urls.append(f"http://127.0.0.1:{port}")
        yield urls


async def fire(urls: list[str]) -> None:
    """N Event invokes, spread round-robin over the nodes."""
    todo: asyncio.Queue[int] = asyncio.Queue()
    for i in range(N):
        todo.put_nowait(i)
    headers = {"X-Amz-Invocation-Type": "Event", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async def client() -> None:
            while not todo.empty():
                i = todo.get_nowait()
                url = f"{urls[i % len(urls)]}/2015-03-31/functions/noop/invocations"
                async with session.post(url, data=json.dumps({"i": i}), headers=headers) as response:
                    assert response.status == 202, await response.text()
        await asyncio.gather(*(client() for _ in range(CONNECTIONS)))


def succeeded(url: str) -> int:
    view = json.loads(urllib.request.urlopen(f"{url}/system/functions/noop", timeout=10).read())
    return int(view["queue"]["succeeded"])


async def delete(cluster: str) -> None:
    names = Names(cluster)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in (names.function("noop"), names.dead_letter, names.scheduler):
            await channel.queue_delete(queue)
        await channel.exchange_delete(names.nodes)


def run(count: int) -> dict[str, float]:
    cluster = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        with nodes(count, cluster) as urls:
            started = time.perf_counter()
            asyncio.run(fire(urls))
            accepted_s = time.perf_counter() - started
            shares = [0] * count
            deadline = time.monotonic() + 600
            while sum(shares) < N and time.monotonic() < deadline:
                time.sleep(0.05)
                shares = [succeeded(url) for url in urls]
            drained_s = time.perf_counter() - started
            if sum(shares) < N:
                raise RuntimeError(f"only {sum(shares)} of {N} events ran within 600s")
    finally:
        asyncio.run(delete(cluster))
    return {"accepted_per_s": N / accepted_s, "all_run_per_s": N / drained_s,
            "smallest_share": min(shares) / N}


def main() -> None:
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for _ in range(REPS):
        for count in (1, 2):
            results[count].append(run(count))
    figures = {"events": N, "connections": CONNECTIONS, "reps": REPS}
    for count in (1, 2):
        for key in ("accepted_per_s", "all_run_per_s"):
            figures[f"{count}_node_{key}"] = round(median([r[key] for r in results[count]]))
    figures["2_nodes_smallest_share"] = round(median([r["smallest_share"] for r in results[2]]), 2)
    figures["ratio_2_to_1"] = round(figures["2_node_all_run_per_s"] / figures["1_node_all_run_per_s"], 2)
    report("cluster: async events through RabbitMQ, 1 node vs 2",
           [(k, str(v)) for k, v in figures.items()])
    emit_json("cluster", figures)


if __name__ == "__main__":
    main()
