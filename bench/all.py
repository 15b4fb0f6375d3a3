"""Run every benchmark script in turn and print the README's results table.

    .venv/bin/python bench/all.py          # about 10 minutes on 2 cores

Each script prints its own report and a `JSON name {...}` line; this collects
the JSON lines into one markdown table of figures against their targets.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["throughput", "thaw", "zygote", "coldstart", "density", "file_trigger", "amqp"]


def run(name: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE / f"{name}.py")], capture_output=True, text=True)
    sys.stdout.write(out.stdout)
    if out.returncode != 0:
        sys.stdout.write(out.stderr[-2000:])
        return {}
    for line in out.stdout.splitlines():
        if line.startswith("JSON "):
            return json.loads(line.split(" ", 2)[2])
    return {}


def main() -> None:
    r = {name: run(name) for name in SCRIPTS}

    def f(name: str, key: str, fmt: str) -> str:
        value = r.get(name, {}).get(key)
        return "n/a" if value is None else format(value, fmt)

    rows = [
        ("1. HTTP throughput, wrk -t1 -c16", f"{f('throughput', 'ratio', '.2f')} x bare aiohttp "
         f"({f('throughput', 'faasd_rps', ',.0f')} vs {f('throughput', 'bare_rps', ',.0f')} req/s), "
         f"p99 {f('throughput', 'faasd_p99_ms', '.2f')} ms, {f('throughput', 'errors', 'd')} errors; "
         f"the floor design {f('throughput', 'floor_ratio', '.2f')} x",
         ">= 0.6 x, p99 <= 5 ms, 0 errors"),
        ("2. added latency at 1 connection", f"p50 {f('throughput', 'added_p50_us', '+.0f')} us, "
         f"p99 {f('throughput', 'added_p99_us', '+.0f')} us; the floor design "
         f"{f('throughput', 'floor_added_p50_us', '+.0f')} / {f('throughput', 'floor_added_p99_us', '+.0f')} us",
         "p50 <= 80 us, p99 <= 250 us"),
        ("3. thaw (frozen vs warm worker)", f"{f('thaw', 'added_us', '+.0f')} us", "<= 50 us"),
        ("4. forked worker ready", f"p50 {f('zygote', 'forked_p50_ms', '.2f')} ms, p99 "
         f"{f('zygote', 'forked_p99_ms', '.2f')} ms, {f('zygote', 'speedup', '.0f')}x faster than "
         f"python -I + imports (template {f('zygote', 'template_rss_mb', '.0f')} MB)",
         "<= 3 / 6 ms, >= 50x"),
        ("5. first start (no template)", f"{f('coldstart', 'overhead_ms', '+.1f')} ms over interpreter "
         f"+ imports ({f('coldstart', 'faasd_init_ms', '.1f')} vs {f('coldstart', 'imports_ms', '.1f')} ms)",
         "<= +5 ms"),
        ("6. density", f"frozen worker USS {f('density', 'worker_uss_mb', '.1f')} MB, idle daemon RSS "
         f"{f('density', 'daemon_rss_mb', '.1f')} MB", "<= 2 MB, <= 60 MB"),
        ("7. file trigger, 1,000 files", f"{f('file_trigger', 'files_per_s', ',.0f')} files/s once "
         f"workers exist; {f('file_trigger', 'first_round_files_per_s', ',.0f')} files/s in the first, "
         f"cold round; {f('file_trigger', 'workers_started', 'd')} workers started for "
         f"{f('file_trigger', 'files', ',d')} files", ">= 1,000 files/s"),
        ("8. AMQP, 10,000 messages", f"{f('amqp', 'ratio', '.2f')} x bare aio-pika "
         f"({f('amqp', 'faasd_msg_s', ',.0f')} vs {f('amqp', 'bare_msg_s', ',.0f')} msg/s)", ">= 0.5 x"),
    ]
    print(f"\nMachine: {platform.machine()}, {platform.system()} {platform.release()}, "
          f"Python {platform.python_version()}\n")
    print("| target | measured | goal |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
