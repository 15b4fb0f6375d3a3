"""Target 4: a worker forked from its function's template is ready in <= 3 ms p50 / 6 ms p99.

The function imports a few standard modules and holds TEMPLATE_MB of data at
module level (templates up to 100 MB must fork fast). Each round fires
BURST concurrent slow calls, so the pool needs new workers and forks them
from the template; the daemon's own `init_ms` of each forked worker (FORK
sent -> READY received) is collected, then the workers retire
(keep_warm_s = 1) and the next round forks again. Interleaved with the
rounds, the same modules are imported by a fresh `python -I` process: the
cost a worker would pay without a template. Target: >= 50x faster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

from common import emit_json, faasd_server, median, report

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "12"))
BURST = int(os.environ.get("BENCH_BURST", "2"))
TEMPLATE_MB = int(os.environ.get("BENCH_TEMPLATE_MB", "80"))
IMPORTS = "json, email.message, http.client, decimal, uuid"
HANDLER = f"""\
import time
import {IMPORTS}
BALLAST = bytearray({TEMPLATE_MB} * 1024 * 1024)
for i in range(0, len(BALLAST), 4096):
    BALLAST[i] = 1  # resident, not just reserved

def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return 1
"""


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("PPid:"))
    except (FileNotFoundError, ProcessLookupError):
        return None


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def main() -> None:
    functions = {"z.py": HANDLER, "z.toml": "min_warm = 1\nconcurrency = 32\nmemory_mb = 512\ntimeout_s = 10\n"}
    env = {"FAASD_WORKERS_KEEP_WARM_S": "1", "FAASD_WORKERS_FREEZE_AFTER_MS": "10"}
    with faasd_server(functions, env=env) as url:
        def view() -> dict:
            return json.loads(urllib.request.urlopen(url + "/system/functions/z").read())

        def invoke(sleep: float) -> None:
            request = urllib.request.Request(f"{url}/2015-03-31/functions/z/invocations",
                                             data=json.dumps({"sleep": sleep}).encode(), method="POST")
            urllib.request.urlopen(request, timeout=30).read()

        invoke(0)
        deadline = time.monotonic() + 30
        while not (view().get("template") or {}).get("init_ms"):
            if time.monotonic() > deadline:
                raise RuntimeError("the template never became ready")
            time.sleep(0.1)
        template_rss = 0
        forked: list[float] = []
        fresh: list[float] = []
        seen: set[str] = set()
        for _ in range(ROUNDS):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-I", "-c", f"import {IMPORTS}"], check=True)
            fresh.append((time.perf_counter() - started) * 1000)
            threads = [threading.Thread(target=invoke, args=(0.3,)) for _ in range(BURST)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            current = view()
            template = current["template"]
            with open(f"/proc/{template['pid']}/status") as status:
                template_rss = max(template_rss, next(int(line.split()[1]) for line in status
                                                      if line.startswith("VmRSS:")) / 1024)
            for worker in current["workers"]:
                if worker["id"] not in seen and worker["init_ms"] is not None:
                    seen.add(worker["id"])
                    # Only the template's children: a worker spawned before the
                    # template was ready is a cold start, not a fork.
                    if parent_of(worker["pid"]) == template["pid"]:
                        forked.append(worker["init_ms"])
            # Let the forked workers retire so the next round forks anew.
            time.sleep(2.5)
    p50, p99 = median(forked), percentile(forked, 99)
    speedup = median(fresh) / p50
    report(f"zygote, {len(forked)} forked workers over {ROUNDS} rounds, template RSS {template_rss:.0f} MB", [
        ("forked worker ready p50 / p99", f"{p50:.2f} / {p99:.2f} ms  (target <= 3 / 6 ms)"),
        ("fresh python -I + imports p50", f"{median(fresh):.1f} ms"),
        ("speed-up", f"{speedup:.0f}x  (target >= 50x)"),
    ])
    emit_json("zygote", {"forked_p50_ms": p50, "forked_p99_ms": p99, "fresh_ms": median(fresh),
                         "speedup": speedup, "template_rss_mb": template_rss})


if __name__ == "__main__":
    main()
