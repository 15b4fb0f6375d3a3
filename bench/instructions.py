"""The daemon's own cost per HTTP-triggered call, in instructions: repeatable on a noisy machine.

Timings on a shared VM move by tens of percent from one minute to the next;
instruction counts do not. This runs faasd's whole HTTP path (aiohttp, the
route, the event, limits, pool, logs, metrics, the response) in one process
with workers that answer at once from inside the daemon, so that neither a
worker process nor the scheduler enters the count, and drives it with a
client in the same process over loopback. valgrind's callgrind counts the
instructions of two runs that differ only in their number of requests; the
difference divided by the extra requests is the cost of one request, client
included. The same is done for a bare aiohttp handler, and the difference of
the two is what faasd adds to aiohttp.

Run it on an otherwise idle machine: the count does not depend on timing
except through how many requests one event-loop turn takes up, and with
another busy process on the same cores (a package install) the per-request
count for the same code moved from 463,554 to 543,060. Even on an idle
machine a run now and then batches differently (one commit measured 447,005,
447,342 and 374,597), so each side is counted BENCH_RUNS times (3),
interleaved, and the median is reported with every run's figure.

    python bench/instructions.py            # needs valgrind (apt-get install valgrind)

Compare two checkouts by running it with FAASD_BENCH_ROOT pointing at each.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from common import FAASD_ROOT, emit_json, median, report

SMALL, LARGE = 800, 2400  # requests in the two counted runs
# Each side is counted this many times, A B A B, and the median taken: now and
# then a run batches requests differently and lands far from the others.
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
CONNECTIONS = 16
REQUEST = b"GET /function/noop HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n\r\n"


# -- inside valgrind ----------------------------------------------------------------------

async def client(port: int, count: int) -> None:
    """`count` requests, one after another, on one keep-alive connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(count):
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = await reader.readexactly(int(match.group(1)) if match else 0)
        if not head.startswith(b"HTTP/1.1 200") or body != b'"ok"':
            raise SystemExit(f"unexpected response: {head!r} {body!r}")
    writer.close()


async def load(port: int, requests: int) -> None:
    await asyncio.gather(*(client(port, 20) for _ in range(CONNECTIONS)))  # warm
    await asyncio.gather(*(client(port, requests // CONNECTIONS) for _ in range(CONNECTIONS)))


def instant_workers() -> None:
    """Make the daemon's pools create workers that answer every call at once, in-process."""
    from faasd import pool, protocol
    from faasd.workers import ProcessWorker

    class NoCgroup:
        def oom_kills(self) -> int:
            return 0

    class InstantWorker(ProcessWorker):
        def __init__(self, spec, env) -> None:
            super().__init__(spec, env, ["(in-process)"])
            self.cgroup = NoCgroup()  # as under a memory cgroup: no RSS polling per call

        async def start(self) -> None:
            self.init_ms = self.init_cpu_ms = 1.0

        def _send(self, kind: int, payload: bytes = b"") -> bool:
            if kind == protocol.INVOKE:
                self._loop.call_soon(self._on_frame, protocol.STATS, (30 * 1024).to_bytes(4, "big"))
                self._loop.call_soon(self._on_frame, protocol.RESULT, b'"ok"')
            return True

        def freeze(self) -> None:
            pass

        def thaw(self) -> None:
            pass

        def kill(self) -> None:
            pass

        async def stop(self) -> None:
            if not self.exited.done():
                self.exited.set_result(0)

    # The factory is the first of WorkerPool's defaults; the others stay as they are.
    defaults = pool.WorkerPool.__init__.__defaults__
    pool.WorkerPool.__init__.__defaults__ = (InstantWorker, *defaults[1:])


async def serve_faasd(directory: Path, requests: int) -> None:
    from faasd.config import load_config
    from faasd.daemon import Daemon

    sock = socket.create_server(("127.0.0.1", 0))
    config = load_config(directory / "faasd.toml", overrides={
        "paths": {"functions": str(directory / "functions"), "data": str(directory / "data")}})
    daemon = Daemon(config)
    await daemon.start(sock=sock)
    while daemon.registry.get("noop") is None:
        await asyncio.sleep(0.05)
    await load(sock.getsockname()[1], requests)
    await daemon.stop()


async def serve_bare(requests: int) -> None:
    from aiohttp import web

    async def noop(request: web.Request) -> web.Response:
        return web.Response(body=b'"ok"', content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/function/{name}", noop)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    await load(sock.getsockname()[1], requests)
    await runner.cleanup()


def inner(side: str, requests: int, directory: Path) -> None:
    import logging

    from faasd.daemon import install_event_loop

    logging.basicConfig(level=logging.WARNING)
    install_event_loop()
    if side == "faasd":
        instant_workers()
        asyncio.run(serve_faasd(directory, requests))
    else:
        asyncio.run(serve_bare(requests))


# -- outside ----------------------------------------------------------------------------

def counted(side: str, requests: int, directory: Path) -> int:
    """Instructions callgrind counts for one whole run."""
    env = {**os.environ, "PYTHONPATH": str(FAASD_ROOT)}
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, __file__, "--inner", side, str(requests), str(directory)],
        env=env, capture_output=True, text=True, timeout=1800)
    match = re.search(r"Collected\s*:\s*(\d+)", result.stderr)
    if result.returncode != 0 or match is None:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"the {side} run under valgrind failed")
    return int(match.group(1))


def main() -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    with tempfile.TemporaryDirectory(prefix="faasd-bench-") as tmp:
        directory = Path(tmp)
        (directory / "functions").mkdir()
        (directory / "functions" / "noop.py").write_text("def handler(event, context):\n    return 'ok'\n")
        # Templates fork real processes; log lines still go to files and stdout.
        (directory / "faasd.toml").write_text('[workers]\nzygote = false\n[log]\nlevel = "info"\n')
        samples: dict[str, list[float]] = {"bare": [], "faasd": []}
        for _ in range(RUNS):
            for side in samples:
                small = counted(side, SMALL, directory)
                large = counted(side, LARGE, directory)
                samples[side].append((large - small) / (LARGE - SMALL))
        per_request = {side: median(values) for side, values in samples.items()}
    added = per_request["faasd"] - per_request["bare"]
    report(f"instructions per HTTP request, client included ({LARGE} - {SMALL} requests, "
           f"{CONNECTIONS} connections, median of {RUNS} runs)", [
        ("bare aiohttp handler", f"{per_request['bare']:,.0f}"),
        ("faasd, in-process workers", f"{per_request['faasd']:,.0f}"),
        ("added by faasd", f"{added:,.0f}  ({per_request['faasd'] / per_request['bare']:.2f} x bare)"),
        *((f"{side} runs", ", ".join(f"{value:,.0f}" for value in values))
          for side, values in samples.items()),
    ])
    emit_json("instructions", {"bare": per_request["bare"], "faasd": per_request["faasd"], "added": added})


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--inner":
        inner(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
