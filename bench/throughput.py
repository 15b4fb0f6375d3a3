"""Targets 1 and 2: HTTP-trigger throughput and added latency against bare aiohttp.

A no-op Python function behind /function/noop versus a bare aiohttp + uvloop
hello world, measured interleaved (bare, floor, faasd, bare, floor, faasd, ...):
  * throughput: wrk -t1 -c16 (unpinned); target >= 0.6 x bare, p99 <= 5 ms, 0 errors
  * latency: wrk -t1 -c1; target p50 difference <= 80 us, p99 difference <= 250 us

"floor" is bench/floor_server.py: aiohttp handing each request to one of 16
subprocess workers and nothing more. It is not a target; it shows how much of
the distance to bare aiohttp any design with subprocess workers pays on this
machine, and how much is faasd's own.

During the -c16 runs the script also counts CPU time per request: the
server's own process, the processes under it (workers) and wrk. Their sum is
what one request costs the machine; with two cores, 2 s of CPU per second
bounds the rate any side can reach however well it is scheduled.
"""

from __future__ import annotations

import os

from common import REPS, bare_server, emit_json, faasd_server, floor_server, interleaved, median, report

CPU_PARTS = ("cpu_server_us", "cpu_children_us", "cpu_client_us")

NOOP = {"noop.py": "def handler(event, context):\n    return 'ok'\n",
        "noop.toml": "min_warm = 2\n"}


def main() -> None:
    with bare_server() as bare, floor_server() as floor, faasd_server(NOOP) as faasd:
        target = faasd + "/function/noop"
        sides = {"bare": bare, "floor": floor, "faasd": target}
        runs = interleaved(sides, {"bare": bare.pid, "floor": floor.pid, "faasd": faasd.pid})

    def med(side: str, key: str) -> float:
        return median([r[key] for r in runs[side]])

    ratio = med("faasd", "rps") / med("bare", "rps")
    floor_ratio = med("floor", "rps") / med("bare", "rps")
    errors = sum(r["errors"] for r in runs["faasd"] + runs["faasd1"])
    dp50 = (med("faasd1", "p50_ms") - med("bare1", "p50_ms")) * 1000
    dp99 = (med("faasd1", "p99_ms") - med("bare1", "p99_ms")) * 1000
    floor_dp50 = (med("floor1", "p50_ms") - med("bare1", "p50_ms")) * 1000
    floor_dp99 = (med("floor1", "p99_ms") - med("bare1", "p99_ms")) * 1000
    report(f"throughput, wrk -t1 -c16, medians of {REPS}", [
        ("bare aiohttp+uvloop", f"{med('bare', 'rps'):,.0f} req/s  p99 {med('bare', 'p99_ms'):.2f} ms"),
        ("floor (16 bare workers)", f"{med('floor', 'rps'):,.0f} req/s  p99 {med('floor', 'p99_ms'):.2f} ms"),
        ("faasd no-op function", f"{med('faasd', 'rps'):,.0f} req/s  p99 {med('faasd', 'p99_ms'):.2f} ms"),
        ("ratio faasd/bare", f"{ratio:.2f}  (target >= 0.60)"),
        ("ratio floor/bare", f"{floor_ratio:.2f}"),
        ("faasd errors", f"{errors}  (target 0)"),
    ])
    report(f"latency at 1 connection, wrk -t1 -c1, medians of {REPS}", [
        ("bare p50 / p99", f"{med('bare1', 'p50_ms') * 1000:.0f} / {med('bare1', 'p99_ms') * 1000:.0f} us"),
        ("floor p50 / p99", f"{med('floor1', 'p50_ms') * 1000:.0f} / {med('floor1', 'p99_ms') * 1000:.0f} us"),
        ("faasd p50 / p99", f"{med('faasd1', 'p50_ms') * 1000:.0f} / {med('faasd1', 'p99_ms') * 1000:.0f} us"),
        ("added p50", f"{dp50:.0f} us  (target <= 80)"),
        ("added p99", f"{dp99:.0f} us  (target <= 250)"),
        ("floor added p50 / p99", f"{floor_dp50:.0f} / {floor_dp99:.0f} us"),
    ])
    cores = os.cpu_count() or 1
    cpu = {side: {part: med(side, part) for part in CPU_PARTS} for side in ("bare", "floor", "faasd")}
    total = {side: sum(parts.values()) for side, parts in cpu.items()}
    goal_rps = 0.6 * med("bare", "rps")
    report(f"CPU per request at wrk -t1 -c16, medians of {REPS}, in us: server / its workers / wrk = total", [
        *((side, f"{parts['cpu_server_us']:.0f} / {parts['cpu_children_us']:.0f} / "
                 f"{parts['cpu_client_us']:.0f} = {total[side]:.0f}  "
                 f"(at most {cores * 1e6 / total[side]:,.0f} req/s on {cores} cores)")
          for side, parts in cpu.items()),
        ("0.6 x bare would need", f"{goal_rps:,.0f} req/s x {total['faasd']:.0f} us = "
                                  f"{goal_rps * total['faasd'] / 1e6:.2f} cores for faasd, "
                                  f"{goal_rps * total['floor'] / 1e6:.2f} for the floor "
                                  f"(the daemon alone {goal_rps * cpu['faasd']['cpu_server_us'] / 1e6:.2f})"),
    ])
    emit_json("throughput", {"bare_rps": med("bare", "rps"), "faasd_rps": med("faasd", "rps"),
                             "ratio": ratio, "faasd_p99_ms": med("faasd", "p99_ms"), "errors": errors,
                             "added_p50_us": dp50, "added_p99_us": dp99,
                             "floor_rps": med("floor", "rps"), "floor_ratio": floor_ratio,
                             "floor_added_p50_us": floor_dp50, "floor_added_p99_us": floor_dp99,
                             "cpu_us": cpu})


if __name__ == "__main__":
    main()
