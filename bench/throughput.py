"""Targets 1 and 2: HTTP-trigger throughput and added latency against bare aiohttp.

A no-op Python function behind /function/noop versus a bare aiohttp + uvloop
hello world, measured interleaved (bare, faasd, bare, faasd, ...):
  * throughput: wrk -t1 -c16 (unpinned); target >= 0.6 x bare, p99 <= 5 ms, 0 errors
  * latency: wrk -t1 -c1; target p50 difference <= 80 us, p99 difference <= 250 us
"""

from __future__ import annotations

from common import REPS, bare_server, emit_json, faasd_server, median, report, wrk

NOOP = {"noop.py": "def handler(event, context):\n    return 'ok'\n",
        "noop.toml": "min_warm = 2\n"}


def main() -> None:
    with bare_server() as bare, faasd_server(NOOP) as faasd:
        target = faasd + "/function/noop"
        wrk(bare, seconds=2)
        wrk(target, seconds=2)  # warm both
        runs: dict[str, list[dict]] = {"bare": [], "faasd": [], "bare1": [], "faasd1": []}
        for _ in range(REPS):
            runs["bare"].append(wrk(bare, connections=16))
            runs["faasd"].append(wrk(target, connections=16))
            runs["bare1"].append(wrk(bare, connections=1, seconds=3))
            runs["faasd1"].append(wrk(target, connections=1, seconds=3))

    def med(side: str, key: str) -> float:
        return median([r[key] for r in runs[side]])

    ratio = med("faasd", "rps") / med("bare", "rps")
    errors = sum(r["errors"] for r in runs["faasd"] + runs["faasd1"])
    dp50 = (med("faasd1", "p50_ms") - med("bare1", "p50_ms")) * 1000
    dp99 = (med("faasd1", "p99_ms") - med("bare1", "p99_ms")) * 1000
    report(f"throughput, wrk -t1 -c16, medians of {REPS}", [
        ("bare aiohttp+uvloop", f"{med('bare', 'rps'):,.0f} req/s  p99 {med('bare', 'p99_ms'):.2f} ms"),
        ("faasd no-op function", f"{med('faasd', 'rps'):,.0f} req/s  p99 {med('faasd', 'p99_ms'):.2f} ms"),
        ("ratio faasd/bare", f"{ratio:.2f}  (target >= 0.60)"),
        ("faasd errors", f"{errors}  (target 0)"),
    ])
    report(f"latency at 1 connection, wrk -t1 -c1, medians of {REPS}", [
        ("bare p50 / p99", f"{med('bare1', 'p50_ms') * 1000:.0f} / {med('bare1', 'p99_ms') * 1000:.0f} us"),
        ("faasd p50 / p99", f"{med('faasd1', 'p50_ms') * 1000:.0f} / {med('faasd1', 'p99_ms') * 1000:.0f} us"),
        ("added p50", f"{dp50:.0f} us  (target <= 80)"),
        ("added p99", f"{dp99:.0f} us  (target <= 250)"),
    ])
    emit_json("throughput", {"bare_rps": med("bare", "rps"), "faasd_rps": med("faasd", "rps"),
                             "ratio": ratio, "faasd_p99_ms": med("faasd", "p99_ms"), "errors": errors,
                             "added_p50_us": dp50, "added_p99_us": dp99})


if __name__ == "__main__":
    main()
