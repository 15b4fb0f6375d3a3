"""Target 6: a frozen worker's private memory (USS), and the idle daemon's RSS.

Starts faasd on the example functions plus a no-op function with min_warm =
WORKERS, waits until every worker is frozen, then reads
/proc/PID/smaps_rollup: USS = Private_Clean + Private_Dirty (what killing
the process would give back), RSS for the daemon itself.
Targets: a frozen (forked) worker adds <= 2 MB USS; idle daemon RSS <= 60 MB.
"""

from __future__ import annotations

import json
import time
import urllib.request

from common import emit_json, faasd_server, median, report

WORKERS = 8


def rollup(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                values[parts[0].rstrip(":")] = int(parts[1])
    return values


def main() -> None:
    functions = {"noop.py": "def handler(event, context):\n    return 1\n",
                 "noop.toml": f"min_warm = {WORKERS}\n"}
    with faasd_server(functions, env={"FAASD_WORKERS_FREEZE_AFTER_MS": "50"}) as url:
        def view() -> dict:
            return json.loads(urllib.request.urlopen(url + "/system/functions/noop").read())

        deadline = time.monotonic() + 60
        while sum(1 for w in view()["workers"] if w["state"] == "frozen") < WORKERS:
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers never all froze: {view()['workers']}")
            time.sleep(0.1)
        time.sleep(1)
        daemon_pid = json.loads(urllib.request.urlopen(url + "/system/info").read())["pid"]
        uss = []
        for worker in view()["workers"]:
            r = rollup(worker["pid"])
            uss.append((r["Private_Clean"] + r["Private_Dirty"]) / 1024)
        daemon = rollup(daemon_pid)
    report(f"density, {WORKERS} frozen workers of one function", [
        ("frozen worker USS, median", f"{median(uss):.1f} MB  (target <= 2 MB)"),
        ("idle daemon RSS", f"{daemon['Rss'] / 1024:.1f} MB  (target <= 60 MB)"),
    ])
    emit_json("density", {"worker_uss_mb": median(uss), "daemon_rss_mb": daemon["Rss"] / 1024})


if __name__ == "__main__":
    main()
