"""Targets 1 and 2 for two checkouts of faasd, interleaved in one run: what a change bought.

    python bench/revisions.py BEFORE_ROOT [AFTER_ROOT]    # AFTER_ROOT defaults to this checkout

Both daemons serve the no-op function of bench/throughput.py side by side,
with bare aiohttp as the yardstick; each repetition (BENCH_REPS, default 5)
runs wrk -t1 -c16 against bare, before, after, then wrk -t1 -c1 against each,
so that the machine's drift falls on both checkouts alike. Printed: medians
of req/s, the ratio to bare, the CPU time per request of each daemon and of
its workers at -c16, and p50 / p99 at one connection; then the after/before
ratio of each.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import REPS, ROOT, bare_server, emit_json, faasd_server, interleaved, median, report
from throughput import NOOP


def main() -> None:
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    roots = {"before": Path(sys.argv[1]).resolve(),
             "after": Path(sys.argv[2]).resolve() if len(sys.argv) == 3 else ROOT}
    with bare_server() as bare, faasd_server(NOOP, root=roots["before"]) as before, \
            faasd_server(NOOP, root=roots["after"]) as after:
        urls = {"bare": bare, "before": before + "/function/noop", "after": after + "/function/noop"}
        runs = interleaved(urls, {"bare": bare.pid, "before": before.pid, "after": after.pid})

    def med(side: str, key: str) -> float:
        return median([r[key] for r in runs[side]])

    figures = {side: {"rps": med(side, "rps"), "ratio": med(side, "rps") / med("bare", "rps"),
                      "p99_ms": med(side, "p99_ms"), "errors": sum(r["errors"] for r in runs[side] + runs[side + "1"]),
                      "daemon_us": med(side, "cpu_server_us"), "workers_us": med(side, "cpu_children_us"),
                      "p50_c1_us": med(side + "1", "p50_ms") * 1000, "p99_c1_us": med(side + "1", "p99_ms") * 1000}
               for side in urls}
    rows = [(side, f"{f['rps']:,.0f} req/s ({f['ratio']:.3f} x bare), p99 {f['p99_ms']:.2f} ms, "
                   f"CPU per request {f['daemon_us']:.1f} us daemon / {f['workers_us']:.1f} us workers; "
                   f"at -c1 p50 {f['p50_c1_us']:.0f} us, p99 {f['p99_c1_us']:.0f} us; errors {f['errors']}")
            for side, f in figures.items()]
    b, a = figures["before"], figures["after"]
    rows.append(("after / before", f"req/s {a['rps'] / b['rps']:.3f}, daemon CPU per request "
                                   f"{a['daemon_us'] / b['daemon_us']:.3f}, p50 at -c1 {a['p50_c1_us'] / b['p50_c1_us']:.3f}"))
    rows.append(("added p50 at -c1", f"before {b['p50_c1_us'] - figures['bare']['p50_c1_us']:.0f} us, "
                                     f"after {a['p50_c1_us'] - figures['bare']['p50_c1_us']:.0f} us"))
    report(f"before {roots['before']} / after {roots['after']}, medians of {REPS}", rows)
    emit_json("revisions", figures)


if __name__ == "__main__":
    main()
