"""Target 3: a call served by a frozen worker costs <= 50 us more than one served warm.

Two daemons serve the same no-op function: one freezes idle workers after
20 ms, the other keeps them warm (freeze_after_ms far away). Samples
alternate between them, each after the same 60 ms pause, so both sides pay
the same for a machine that has gone idle; the frozen side's worker is
checked to be stopped (state T in /proc) before its call, and to be the one
that answers. The difference of medians is what thawing adds (SIGCONT and
the scheduler waking a stopped process).

Timings of single calls after an idle pause spread by tens of microseconds
from run to run here, so the script also counts the frozen worker's context
switches across each cycle (its freeze and its call), which do not: the
worker should be switched in once for SIGSTOP and once for the call, not
once more for SIGCONT alone.
"""

from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlparse

from common import emit_json, faasd_server, median, report

SAMPLES = 200
PAUSE_S = 0.06
PID = {"pid.py": "import os\ndef handler(event, context):\n    return os.getpid()\n"}


def switches(pid: int) -> int:
    """Voluntary and involuntary context switches of a process so far."""
    total = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()[0].decode()


class Client:
    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port)

    def call(self) -> tuple[float, int]:
        started = time.perf_counter()
        self.conn.request("GET", "/function/pid")
        response = self.conn.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        assert response.status == 200, body
        return elapsed, json.loads(body)


def main() -> None:
    with faasd_server(PID, env={"FAASD_WORKERS_FREEZE_AFTER_MS": "20"}) as freezing, \
            faasd_server(PID, env={"FAASD_WORKERS_FREEZE_AFTER_MS": "3600000"}) as warm_url:
        frozen_client, warm_client = Client(freezing), Client(warm_url)
        _, frozen_pid = frozen_client.call()
        _, warm_pid = warm_client.call()
        warm: list[float] = []
        frozen: list[float] = []
        cycle_switches: list[int] = []
        for _ in range(SAMPLES):
            before = switches(frozen_pid)
            time.sleep(PAUSE_S)
            assert state(frozen_pid) == "T", "the idle worker was not frozen"
            elapsed, served_by = frozen_client.call()
            assert served_by == frozen_pid, "a frozen call was served by another worker"
            frozen.append(elapsed)
            cycle_switches.append(switches(frozen_pid) - before)
            time.sleep(PAUSE_S)
            assert state(warm_pid) != "T"
            elapsed, served_by = warm_client.call()
            assert served_by == warm_pid
            warm.append(elapsed)
    added = (median(frozen) - median(warm)) * 1e6
    report(f"thaw, {SAMPLES} interleaved samples each after a {PAUSE_S * 1000:.0f} ms pause", [
        ("warm worker, p50", f"{median(warm) * 1e6:.0f} us"),
        ("frozen worker, p50", f"{median(frozen) * 1e6:.0f} us"),
        ("added by thaw", f"{added:.0f} us  (target <= 50)"),
        ("worker switched in per freeze + call", f"{median(cycle_switches):g}  (2: stop, call)"),
    ])
    emit_json("thaw", {"warm_p50_us": median(warm) * 1e6, "frozen_p50_us": median(frozen) * 1e6,
                       "added_us": added, "switches_per_cycle": median(cycle_switches)})


if __name__ == "__main__":
    main()
