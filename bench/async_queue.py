"""The asynchronous queue: how fast Event invokes are acknowledged (202 = fsynced), and drained.

Fires N `InvocationType: Event` calls from C concurrent connections at a no-op
function, timing each 202; then waits until the dispatcher has run them all.
Group commit is what keeps this fast: concurrent puts share one transaction
and one fsync (the readiness check reports the commit times).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request

import aiohttp

from common import emit_json, faasd_server, report

N = int(os.environ.get("BENCH_EVENTS", "2000"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
NOOP = "def handler(event, context):\n    return None\n"


async def fire(url: str) -> list[float]:
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(N):
        queue.put_nowait(i)
    headers = {"X-Amz-Invocation-Type": "Event", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async def client() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                started = time.perf_counter()
                async with session.post(f"{url}/2015-03-31/functions/noop/invocations",
                                        data=json.dumps({"i": i}), headers=headers) as response:
                    assert response.status == 202, await response.text()
                latencies.append((time.perf_counter() - started) * 1000)
        await asyncio.gather(*(client() for _ in range(CONNECTIONS)))
    return latencies


def get(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def main() -> None:
    with faasd_server({"noop.py": NOOP, "noop.toml": "concurrency = 4\n"}) as url:
        started = time.perf_counter()
        latencies = sorted(asyncio.run(fire(url)))
        accepted_s = time.perf_counter() - started
        while get(f"{url}/system/functions/noop")["queue"]["succeeded"] < N:
            time.sleep(0.05)
        drained_s = time.perf_counter() - started
        commits = get(f"{url}/readyz")["checks"]["async_queue"]["detail"]
    figures = {
        "events": N, "connections": CONNECTIONS,
        "accepted_per_s": round(N / accepted_s), "p50_202_ms": round(latencies[len(latencies) // 2], 2),
        "p99_202_ms": round(latencies[int(len(latencies) * 0.99)], 2),
        "all_run_per_s": round(N / drained_s),
    }
    report("async queue", [(k, str(v)) for k, v in figures.items()] + [("journal", commits)])
    emit_json("async_queue", figures)


if __name__ == "__main__":
    main()
