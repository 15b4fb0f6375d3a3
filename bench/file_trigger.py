"""Target 7: 1,000 files dropped at once are all processed, >= 1,000 files/s end to end.

A no-op function has a file trigger on <data>/drop. FILES files are written
into a staging directory beside it, then renamed into the watched directory
in one burst (the "write, then rename into place" pattern); the clock runs
from the first rename to the moment the daemon's metrics count one finished
invocation per file (polling /metrics is light; reading the whole log every
few milliseconds would cost the daemon more than the files do). Each round
uses new names, so every file is new to the ledger. The first round finds no
worker and no template: it is reported apart from the warm rounds after it.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

from common import emit_json, faasd_server, median, report

FILES = int(os.environ.get("BENCH_FILES", "1000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
FUNCTIONS = {
    "sink.py": "def handler(event, context):\n    return None\n",
    "sink.toml": '[[triggers]]\ntype = "file"\ndir = "drop"\npatterns = ["*.dat"]\n',
}


def finished(url: str) -> int:
    """Invocations of `sink` the daemon has finished, from its Prometheus metrics."""
    with urllib.request.urlopen(f"{url}/metrics") as response:
        return int(sum(float(line.rsplit(None, 1)[1]) for line in response
                       if line.startswith(b'faasd_invocations_total{function="sink"')))


def cold_starts(url: str) -> int:
    with urllib.request.urlopen(f"{url}/metrics") as response:
        return int(sum(float(line.rsplit(None, 1)[1]) for line in response
                       if line.startswith(b'faasd_cold_starts_total{function="sink"')))


def main() -> None:
    with faasd_server(FUNCTIONS) as url:
        data = Path(json.loads(urllib.request.urlopen(url + "/system/info").read())["data_dir"])
        drop, staging = data / "drop", data / "staging"
        deadline = time.monotonic() + 10
        while not drop.is_dir():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{drop} was never created by the file trigger")
            time.sleep(0.05)
        staging.mkdir(exist_ok=True)
        rates, seconds = [], []
        done = 0
        for round_no in range(ROUNDS):
            names = [f"r{round_no}-{i:05d}.dat" for i in range(FILES)]
            for name in names:
                (staging / name).write_bytes(b"x" * 100)
            started = time.perf_counter()
            for name in names:
                os.rename(staging / name, drop / name)
            done += FILES
            limit = time.monotonic() + 120
            while finished(url) < done:
                if time.monotonic() > limit:
                    raise RuntimeError(f"only {finished(url)} of {done} files were processed")
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
            seconds.append(elapsed)
            rates.append(FILES / elapsed)
        total, workers_started = finished(url), cold_starts(url)
    warm = rates[1:] or rates
    report(f"file trigger, {FILES} files per round, {ROUNDS} rounds", [
        ("first round (no worker yet)", f"{seconds[0]:.2f} s, {rates[0]:,.0f} files/s"),
        ("later rounds, median", f"{median(seconds[1:] or seconds):.2f} s"),
        ("throughput, later rounds median", f"{median(warm):,.0f} files/s  (target >= 1,000)"),
        ("invocations / files", f"{total} / {FILES * ROUNDS}"),
        ("workers started", f"{workers_started}"),
    ])
    emit_json("file_trigger", {"files_per_s": median(warm), "first_round_files_per_s": rates[0],
                               "seconds": median(seconds[1:] or seconds), "invocations": total,
                               "files": FILES * ROUNDS, "workers_started": workers_started})


if __name__ == "__main__":
    main()
