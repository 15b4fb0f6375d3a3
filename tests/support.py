"""Helpers for integration tests: a real daemon in a real process, real HTTP over loopback."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "functions"


def lambda_client(url: str, *, key: str = "AKIDTEST", secret: str = "secret", read_timeout: float = 90):
    """boto3's own Lambda client against a daemon, one attempt a call: a test
    sees each answer, not botocore's retries of it."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "lambda", endpoint_url=url, region_name="us-east-1", aws_access_key_id=key, aws_secret_access_key=secret,
        config=Config(retries={"total_max_attempts": 1}, read_timeout=read_timeout, connect_timeout=5))


def newer_python() -> str | None:
    """An interpreter of Python 3.12 or later on this machine, for workers; None if there is none."""
    found = [shutil.which(f"python3.{minor}") for minor in range(12, 20)]
    found += sorted(glob.glob("/root/.pyenv/versions/3.1[2-9]*/bin/python3.1[2-9]"))
    return next((path for path in found if path and subprocess.run(
        [path, "-I", "-c", "import sys; assert sys.version_info >= (3, 12)"], capture_output=True).returncode == 0),
        None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def http(method: str, url: str, body: bytes | str | None = None,
         headers: dict[str, str] | None = None, timeout: float = 30) -> Response:
    if isinstance(body, str):
        body = body.encode()
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Response(response.status, {k.lower(): v for k, v in response.headers.items()},
                            response.read())
    except urllib.error.HTTPError as exc:
        return Response(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def write_function(functions: Path, relpath: str, source: str) -> Path:
    """Write a function file atomically (temp + rename), as an editor or deploy would."""
    path = functions / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(textwrap.dedent(source))
    if path.suffix == "" and path.name == "bootstrap":
        tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


@contextmanager
def small_disk(path: Path) -> Iterator[Path]:
    """`path`, made a 16 MB tmpfs for the block's while: a disk that `fill` fills at once.
    A daemon using it is stopped inside the block: a mount in use is not unmounted."""
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "faasd-test", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill(path: Path) -> None:
    """Write `path` until its file system has no room left."""
    block = b"\0" * (64 * 1024)
    with open(path, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(block)
        except OSError:
            pass
        try:
            while True:
                handle.write(b"\0")
        except OSError:
            pass


def descendants(pid: int) -> set[int]:
    """Every live process whose ancestry leads to `pid`."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        children = {child for child, parent in parents.items() if parent in frontier}
        frontier = children - found
        found |= children
    return found


def own_groups(pid: int) -> list[Path]:
    """The cgroups of faasd's that a process is in (one per hierarchy)."""
    found = []
    with open(f"/proc/{pid}/cgroup") as lines:
        for line in lines:
            _, controllers, path = line.strip().split(":", 2)
            if "/faasd-" in path:
                hierarchy = Path("/sys/fs/cgroup", *(controllers.split(",")[:1] if controllers else []))
                found.append(hierarchy / path.lstrip("/"))
    return found


def process_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return None


def pids_with_env(key: str, value: str) -> set[int]:
    """Processes whose environment holds KEY=VALUE (finds orphaned workers)."""
    needle = f"{key}={value}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if needle in environ.read().split(b"\0"):
                    found.add(int(entry))
        except OSError:
            continue
    return found


@dataclass
class Daemon:
    """A `faasd serve` process started by a test."""

    functions: Path
    data: Path
    port: int
    config: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    pids: list[int] = field(default_factory=list)  # every process started, for leak checks
    # A command that execs the daemon (same pid), e.g. `unshare ... --` to run it on
    # a host that lacks something.
    prefix: list[str] = field(default_factory=list)
    python: str = sys.executable

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True, timeout: float = 20) -> "Daemon":
        self.log_path = self.data.parent / f"daemon-{self.port}-{time.monotonic_ns()}.log"
        args = [*self.prefix, self.python, "-m", "faasd"]
        if self.config is not None:
            args += ["--config", str(self.config)]
        args += ["serve", "--functions", str(self.functions), "--data-dir", str(self.data),
                 "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAASD_")}
        env.update({"PYTHONPATH": str(ROOT), "FAASD_TEST_MARKER": str(self.port), **self.env})
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=self.data.parent, env=env, start_new_session=True)
        self.pids.append(self.process.pid)
        if wait:
            wait_until(self._ready, timeout, message=f"faasd on port {self.port} to be ready\n{self.output()}")
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"faasd exited with {self.process.returncode}:\n{self.output()}")
        try:
            return http("GET", self.url + "/readyz", timeout=2).status == 200
        except OSError:
            return False

    def serving(self) -> bool:
        """The daemon answers HTTP, ready or not (a start on a full disk is not); an exit
        fails with its output."""
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"faasd exited with {self.process.returncode}:\n{self.output()}")
        try:
            return self.get("/healthz", timeout=2).status == 200
        except OSError:
            return False

    def output(self) -> str:
        """What the daemon wrote, as it wrote it: a function's record that holds \r stays one line."""
        if not (self.log_path and self.log_path.exists()):
            return ""
        return self.log_path.read_bytes().decode(errors="replace")

    def refused(self) -> str:
        """Wait for a start refused as a setting's fault (exit status 1, no traceback); what it said."""
        status = self.process.wait(timeout=30)
        output = self.output()
        assert status == 1 and "Traceback" not in output, (status, output)
        return output

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int | None:
        """Stop the daemon; then make sure nothing it started survives."""
        if self.process is None:
            return None
        pid = self.process.pid
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(pid, signal.SIGKILL)
                self.process.wait()
        code = self.process.returncode
        self._log.close()
        self.process = None
        return code

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self._log.close()
        self.process = None

    # conveniences
    def get(self, path: str, **kw: Any) -> Response:
        return http("GET", self.url + path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            kw.setdefault("headers", {"Content-Type": "application/json"})
        return http("POST", self.url + path, body, **kw)

    def invoke(self, name: str, event: Any = None, **headers: str) -> Response:
        return http("POST", f"{self.url}/2015-03-31/functions/{name}/invocations",
                    json.dumps({} if event is None else event), headers=headers)

    def function(self, name: str) -> dict:
        response = self.get(f"/system/functions/{name}")
        assert response.status == 200, response.text
        return response.json()

    def workers(self, name: str) -> list[dict]:
        """The function's live workers; none while the function is not (yet) known."""
        response = self.get(f"/system/functions/{name}")
        if response.status == 404:
            return []
        return [w for w in response.json()["workers"] if w["state"] != "retiring"]

    def log_of(self, name: str) -> str:
        return self.get(f"/system/functions/{name}/logs?lines=100000").text


def loaded(daemon, name: str) -> None:
    """Wait until the daemon lists function `name`."""
    wait_until(lambda: daemon.get(f"/system/functions/{name}").status == 200, message=f"{name} to load")


def request_lines(daemon, name: str, request_id: str) -> list[str]:
    """The text of every log line of one invocation, START to REPORT."""
    lines = []
    for line in daemon.log_of(name).splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[1] == request_id:
            lines.append(parts[2])
    return lines


def report_of(daemon, name: str, request_id: str) -> str:
    """The REPORT line of one invocation, once it is logged."""
    marker = f"REPORT RequestId: {request_id}"
    wait_until(lambda: marker in daemon.log_of(name), message=marker)
    return next(line for line in daemon.log_of(name).splitlines() if marker in line)


def max_memory_used(report: str) -> int:
    """The `Max Memory Used` of a REPORT line, in MB."""
    return int(report.split("Max Memory Used: ")[1].split(" MB")[0])


# Holds `mb` MB for `sleep_s` seconds, then exits the process (`exit`) or returns.
MEMORY_HOLDER = """
import os, time

def handler(event, context):
    held = b"x" * (event["mb"] * 1024 * 1024)
    time.sleep(event.get("sleep_s", 0))
    if event.get("exit"):
        os._exit(3)
    return {"pid": os.getpid(), "held": len(held)}
"""


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("PPid:"))


def concurrent(daemon, name: str, events: list[dict]) -> list[dict]:
    """Invoke `name` with each event at once, each on a thread of its own; the results in order."""
    results: list[dict] = [{}] * len(events)

    def call(index: int, event: dict) -> None:
        results[index] = daemon.invoke(name, event).json()

    threads = [threading.Thread(target=call, args=(i, e)) for i, e in enumerate(events)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


class Proxy:
    """A TCP proxy to the broker that a test can cut, refuse and restore."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.refusing = False
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                self.pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    @classmethod
    def _pump(cls, source: socket.socket, target: socket.socket) -> None:
        forward = cls.forwarding()
        try:
            while data := source.recv(65536):
                if data := forward(data):
                    target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def forwarding():
        """What one direction of a connection passes on of each chunk it reads (all of it)."""
        return lambda data: data

    def cut(self) -> None:
        """Drop every connection at once, as a broken network would; refuse new ones."""
        self.refusing = True
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def restore(self) -> None:
        self.refusing = False

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()

class BodyStaller(Proxy):
    """Passes requests on to the daemon, but not the body of one whose request
    line starts with STALLS: the daemon waits for it, then refuses with 408."""

    STALLS = b"POST /"

    @classmethod
    def forwarding(cls):
        stalled = False

        def forward(data: bytes) -> bytes:
            nonlocal stalled
            if stalled:
                return b""
            if data.startswith(cls.STALLS):
                data, stalled = data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n", True
            return data
        return forward


def scrape(daemon) -> dict[tuple[str, frozenset], float]:
    """`GET /metrics`, parsed: (sample name, labels) -> value."""
    response = daemon.get("/metrics")
    assert response.status == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def metric(daemon, name: str, **labels: str) -> float | None:
    return value(scrape(daemon), name, **labels)


XRAY_TRACE = re.compile(r"Root=1-[0-9a-f]{8}-[0-9a-f]{24};Parent=[0-9a-f]{16};Sampled=0")
CALLER_TRACE = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"


def assert_new_trace_id(trace: str) -> None:
    """`trace` is an X-Ray trace header as Lambda makes one, rooted now."""
    assert XRAY_TRACE.fullmatch(trace), trace
    assert abs(int(trace.split("-")[1], 16) - time.time()) < 60  # X-Ray's epoch seconds


def assert_own_trace_ids(daemon, name: str) -> None:
    """Two calls of `name`, which returns its _X_AMZN_TRACE_ID, each see one of their own, in X-Ray's form."""
    first, second = daemon.invoke(name).json(), daemon.invoke(name).json()
    for trace in (first, second):
        assert_new_trace_id(trace)
    assert first != second


def assert_callers_trace_ids_pass_on(daemon, name: str) -> None:
    """`name` returns [its _X_AMZN_TRACE_ID, its event's `headers["x-amzn-trace-id"]`]. A caller's
    X-Amzn-Trace-Id is the one it runs under, by the Invoke API and over HTTP (where its event
    holds it too); an HTTP request without one gets a new one, the same in its event and its
    environment, as a function URL adds one."""
    invoked = daemon.invoke(name, **{"X-Amzn-Trace-Id": CALLER_TRACE})
    assert invoked.json() == [CALLER_TRACE, None], invoked.text
    routed = daemon.get(f"/function/{name}", headers={"X-Amzn-Trace-Id": CALLER_TRACE})
    assert routed.json() == [CALLER_TRACE, CALLER_TRACE], routed.text
    first, second = daemon.get(f"/function/{name}").json(), daemon.get(f"/function/{name}").json()
    for environment, header in (first, second):
        assert environment == header
        assert_new_trace_id(header)
    assert first != second


def awslambdaric_init_records(texts: list[str], document: dict, version: str) -> list[str]:
    """What awslambdaric on python`version` writes in JSON logs for each WARNING and ERROR
    record among `texts` (one an init error's, at that record's timestamp): its
    LAMBDA_WARNING, `logging.warning` through its own filter and JsonFormatter, and
    log_error's record of the error `document` (to_json under that runtime's
    AWS_EXECUTION_ENV), each without the newline that ends it."""
    import calendar
    import logging

    from awslambdaric.bootstrap import LambdaLoggerFilter
    from awslambdaric.lambda_literals import lambda_unhandled_exception_warning_message
    from awslambdaric.lambda_runtime_log_utils import JsonFormatter
    from awslambdaric.lambda_runtime_marshaller import to_json

    expected = []
    for text in texts:
        if not text.startswith("{") or json.loads(text).get("level") not in ("WARNING", "ERROR"):
            continue
        timestamp = json.loads(text)["timestamp"]
        if json.loads(text)["level"] == "WARNING":
            record = logging.LogRecord("root", logging.WARNING, __file__, 1,
                                       lambda_unhandled_exception_warning_message, None, None)
            record.created = calendar.timegm(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ"))
            LambdaLoggerFilter().filter(record)
            formatter = JsonFormatter()
            formatter.converter = time.gmtime
            expected.append(formatter.format(record).removesuffix("\n"))
            continue
        saved = os.environ.get("AWS_EXECUTION_ENV")
        os.environ["AWS_EXECUTION_ENV"] = f"AWS_Lambda_python{version}"
        try:
            expected.append(to_json({"timestamp": timestamp, "level": "ERROR", **document}))
        finally:
            if saved is None:
                del os.environ["AWS_EXECUTION_ENV"]
            else:
                os.environ["AWS_EXECUTION_ENV"] = saved
    return expected
