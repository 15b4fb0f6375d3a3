"""Shared plumbing for the benchmark scripts: start servers, run wrk, summarise.

Every script measures its two sides interleaved (A B A B ...) in one run and
prints medians and their ratio, because this kind of machine is shared and
noisy: only side-by-side figures mean anything.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
# The faasd checkout to measure (default: this one).
FAASD_ROOT = Path(os.environ.get("FAASD_BENCH_ROOT", ROOT))
REPS = int(os.environ.get("BENCH_REPS", "5"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@contextmanager
def process(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
            ready_url: str | None = None, cpu: int | None = None) -> Iterator[subprocess.Popen]:
    """Run a server in its own process group; kill the group on exit."""
    if cpu is not None:
        args = ["taskset", "-c", str(cpu), *args]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if ready_url:
            try:
                wait_http(ready_url)
            except RuntimeError:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace"))
                raise
        yield proc
    except BaseException:
        # The server's own account of a failed run is the first thing to read.
        log.seek(0)
        tail = log.read().decode(errors="replace").splitlines()[-200:]
        sys.stderr.write(f"--- last lines of {args[0]}'s output ---\n" + "\n".join(tail) + "\n")
        raise
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.close()


class Served(str):
    """A server's URL that also names the server's process (the root of its tree, for CPU time)."""

    pid: int

    @classmethod
    def of(cls, url: str, proc: subprocess.Popen) -> "Served":
        served = cls(url)
        served.pid = proc.pid
        return served


@contextmanager
def bare_server(cpu: int | None = None) -> Iterator[Served]:
    port = free_port()
    with process([sys.executable, str(ROOT / "bench" / "bare_server.py"), str(port)],
                 ready_url=f"http://127.0.0.1:{port}/", cpu=cpu) as proc:
        yield Served.of(f"http://127.0.0.1:{port}/", proc)


@contextmanager
def floor_server(workers: int = 16) -> Iterator[Served]:
    """bench/floor_server.py: aiohttp in front of `workers` subprocesses and nothing else."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/function/noop"
    with process([sys.executable, str(ROOT / "bench" / "floor_server.py"), str(port), str(workers)],
                 ready_url=url) as proc:
        yield Served.of(url, proc)


@contextmanager
def faasd_server(functions: dict[str, str], *, env: dict[str, str] | None = None,
                 cpu: int | None = None, root: Path | None = None) -> Iterator[Served]:
    """faasd serving `functions` ({relative path: source}) from a temporary directory,
    with the code of the checkout `root` (default FAASD_ROOT)."""
    with tempfile.TemporaryDirectory(prefix="faasd-bench-") as tmp:
        fdir = Path(tmp) / "functions"
        for rel, source in functions.items():
            path = fdir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(source))
        port = free_port()
        args = [sys.executable, "-m", "faasd", "serve", "--functions", str(fdir),
                "--data-dir", str(Path(tmp) / "data"), "--port", str(port)]
        with process(args, env={"PYTHONPATH": str(root or FAASD_ROOT), **(env or {})}, cwd=Path(tmp),
                     ready_url=f"http://127.0.0.1:{port}/readyz", cpu=cpu) as proc:
            yield Served.of(f"http://127.0.0.1:{port}", proc)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def _cpu_seconds(pid: int) -> float | None:
    """CPU time a process has used (all its threads, user + system)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds of `root` and of every process descended from it, by pid."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found: dict[int, float] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        seconds = _cpu_seconds(pid)
        if seconds is not None:
            found[pid] = seconds
            stack.extend(children.get(pid, []))
    return found


def wrk(url: str, *, threads: int = 1, connections: int = 16, seconds: int = 5,
        cpu: int | None = None, server: int | None = None) -> dict[str, float]:
    """Run wrk; return req/s, p50/p99 latency in ms, and errors.

    With `server` (the pid of the server's root process): also the CPU time
    per request, in microseconds, of that process (`cpu_server_us`), of the
    processes under it (`cpu_children_us`: workers) and of wrk (`cpu_client_us`).
    """
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if cpu is not None:
        args = ["taskset", "-c", str(cpu), *args]
    before = tree_cpu(server) if server is not None else {}
    client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = tree_cpu(server) if server is not None else {}
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    if server is not None and requests:
        used = {pid: seconds - before.get(pid, 0.0) for pid, seconds in after.items()}
        per_request = 1e6 / requests
        result["cpu_server_us"] = used.get(server, 0.0) * per_request
        result["cpu_children_us"] = sum(v for pid, v in used.items() if pid != server) * per_request
        result["cpu_client_us"] = (client_after.ru_utime + client_after.ru_stime
                                   - client_before.ru_utime - client_before.ru_stime) * per_request
    for pct in ("50", "99"):
        result[f"p{pct}_ms"] = _ms(re.search(rf"\s{pct}%\s+(\S+)", out).group(1))
    errors = 0
    for pattern in (r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                    r"Non-2xx or 3xx responses: (\d+)"):
        match = re.search(pattern, out)
        if match:
            errors += sum(int(g) for g in match.groups())
    result["errors"] = errors
    return result


def interleaved(urls: dict[str, str], servers: dict[str, int]) -> dict[str, list[dict]]:
    """Targets 1 and 2's runs, side by side: each side warmed, then REPS rounds of
    wrk -c16 on every side in turn (CPU counted for `servers`' pids), then -c1 on
    every side. Keyed by side, and by side + "1" for the one-connection runs."""
    for url in urls.values():
        wrk(url, seconds=2)  # warm each
    runs: dict[str, list[dict]] = {f"{side}{c}": [] for side in urls for c in ("", "1")}
    for _ in range(REPS):
        for side, url in urls.items():
            runs[side].append(wrk(url, connections=16, server=servers[side]))
        for side, url in urls.items():
            runs[side + "1"].append(wrk(url, connections=1, seconds=3))
    return runs


def median(values: list[float]) -> float:
    return statistics.median(values)


def report(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n== {title}")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")


def emit_json(name: str, data: dict) -> None:
    """Machine-readable figures alongside the text, for the README table."""
    print(f"JSON {name} {json.dumps(data)}")
