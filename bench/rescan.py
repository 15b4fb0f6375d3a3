"""Rescans of functions/ must not stall requests, however big a function's code.

faasd serves a 1.5 MB Python function (a module-level data table, as handlers
that embed a lookup table have) next to a small one. A client polls
/healthz one request at a time and records each request's latency:

  * idle:    nothing changes; the periodic rescan (every 5 s) runs twice
  * changed: the big file is rewritten (a deploy), then left alone

The worst latency of each phase is what a request pays for a rescan.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
import urllib.request
from urllib.parse import urlparse

from common import emit_json, faasd_server, report

SIZE = 1_500_000
IDLE_S = 11.0
CHANGED_S = 8.0
HELLO = "def handler(event, context):\n    return 'hi'\n"


def big_module(seed: int) -> str:
    rng = random.Random(seed)
    lines = [f"# revision {seed}", "TABLE = ["]
    size = 0
    while size < SIZE:
        line = f"    {{'id': {rng.randrange(10**6)}, 'name': 'item{rng.randrange(10**6)}', 'v': {rng.random()}}},"
        lines.append(line)
        size += len(line) + 1
    lines += ["]", "", "def handler(event, context):", "    return len(TABLE)", ""]
    return "\n".join(lines)


def poll(url: str, seconds: float) -> list[float]:
    """Latency of each of a run of sequential GET /healthz, in ms."""
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        latencies.append((time.perf_counter() - start) * 1000)
        time.sleep(0.005)
    conn.close()
    return latencies


def revision(url: str) -> str:
    with urllib.request.urlopen(f"{url}/system/functions/big", timeout=60) as response:
        return json.load(response)["revision"]


def summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[int(len(ordered) * 0.99)]
    return f"{len(ordered)} requests, p99 {p99:.1f} ms, worst {ordered[-1]:.0f} ms"


def main() -> None:
    with faasd_server({"big.py": big_module(1), "hello.py": HELLO}) as url:
        functions = os.path.join(os.readlink(f"/proc/{url.pid}/cwd"), "functions")  # see faasd_server
        idle = poll(url, IDLE_S)
        before = revision(url)
        path = os.path.join(functions, "big.py")
        tmp = path + ".tmp"
        with open(tmp, "w") as handle:
            handle.write(big_module(2))
        os.replace(tmp, path)
        changed = poll(url, CHANGED_S)
        if revision(url) == before:
            raise SystemExit("the changed function was not reloaded")
    report("rescans with a 1.5 MB function in functions/", [
        ("idle (periodic rescans)", summary(idle)),
        ("after the big file changed", summary(changed)),
    ])
    emit_json("rescan", {"idle_worst_ms": max(idle), "changed_worst_ms": max(changed)})


if __name__ == "__main__":
    main()
