"""systemd's protocols against a real daemon: sd_notify on a real unix datagram
socket, SIGHUP config reload, and socket activation across a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from faasd.sdnotify import Notifier, listen_sockets, monotonic_usec
from support import ROOT, descendants, free_port, http, pids_with_env, wait_until, write_function

CONFIG = """
[limits]
max_concurrency = {max_concurrency}
[workers]
freeze_after_ms = 100
"""


class NotifySocket:
    """What systemd listens on: a bound AF_UNIX datagram socket.

    A thread receives every message as it arrives and stamps its arrival time.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._changed:
                self.messages.append((time.monotonic(), fields))
                self._changed.notify_all()

    def wait_for(self, key: str, value: str | None = None, *, after: int = 0,
                 timeout: float = 20) -> tuple[int, dict[str, str]]:
        """The first message from index `after` on that sets `key` (to `value`)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in range(after, len(self.messages)):
                    fields = self.messages[index][1]
                    if key in fields and (value is None or fields[key] == value):
                        return index, fields
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [m for _, m in self.messages if "WATCHDOG" not in m]
                    raise AssertionError(f"no {key}={value or '*'} within {timeout}s; got {seen}")
                self._changed.wait(left)

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_ready_status_watchdog_reload_refusal_and_stopping(start_daemon, functions_dir, tmp_path,
                                                            notify_socket):
    write_function(functions_dir, "hello.py", """
        def handler(event, context):
            return "hi"
    """)
    config = tmp_path / "faasd.toml"
    config.write_text(CONFIG.format(max_concurrency=50))
    daemon = start_daemon(functions_dir, config=config, wait=False, env={
        "NOTIFY_SOCKET": str(notify_socket.path),
        "WATCHDOG_USEC": "400000",  # pings every 0.2 s
    })

    # READY=1 comes once the daemon listens with its functions loaded: the
    # very next request is served.
    ready_at, ready = notify_socket.wait_for("READY", "1")
    assert daemon.get("/function/hello").json() == "hi"
    assert ready["STATUS"].startswith(f"Serving 1 functions on http://127.0.0.1:{daemon.port}")
    assert "WATCHDOG" not in ready

    # Watchdog pings keep coming from the event loop at half WATCHDOG_USEC.
    time.sleep(1.5)
    pings = [t for t, m in notify_socket.messages[ready_at:] if m.get("WATCHDOG") == "1"]
    assert len(pings) >= 3, pings
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) < 0.4 + 0.6, gaps  # under the deadline, with slack for a busy machine

    # A good config: RELOADING=1 with MONOTONIC_USEC, then READY=1; it is in force.
    config.write_text(CONFIG.format(max_concurrency=7))
    before = len(notify_socket.messages)
    sent_at = monotonic_usec()
    daemon.process.send_signal(signal.SIGHUP)
    index, reloading = notify_socket.wait_for("RELOADING", "1", after=before)
    stamp = int(reloading["MONOTONIC_USEC"])
    assert sent_at <= stamp <= monotonic_usec()  # CLOCK_MONOTONIC, as systemd compares it
    assert reloading["STATUS"] == "Reloading configuration"
    _, done = notify_socket.wait_for("READY", "1", after=index + 1)
    assert "refused" not in done["STATUS"]
    assert daemon.get("/system/info").json()["max_concurrency"] == 7

    # A bad config: refused with a clear line, the running one kept, READY=1 again.
    config.write_text(CONFIG.format(max_concurrency=-3))
    before = len(notify_socket.messages)
    daemon.process.send_signal(signal.SIGHUP)
    index, _ = notify_socket.wait_for("RELOADING", "1", after=before)
    _, refused = notify_socket.wait_for("READY", "1", after=index + 1)
    assert "reload refused" in refused["STATUS"]
    assert "limits.max_concurrency" in refused["STATUS"]
    assert daemon.get("/system/info").json()["max_concurrency"] == 7
    assert daemon.get("/function/hello").json() == "hi"
    wait_until(lambda: "config reload refused, the running configuration is kept" in daemon.output(),
               message="the refusal in the log")
    line = next(l for l in daemon.output().splitlines() if "config reload refused" in l)
    assert f"{config}: limits.max_concurrency: -3 is not valid: expected a positive whole number" in line
    assert "ERROR" in line

    # SIGTERM: STOPPING=1 first, then a clean exit.
    before = len(notify_socket.messages)
    daemon.process.send_signal(signal.SIGTERM)
    _, stopping = notify_socket.wait_for("STOPPING", "1", after=before)
    assert stopping["STATUS"].startswith("Stopping: draining")
    assert daemon.stop() == 0


def test_reload_applies_live_keys_at_once_and_names_restart_only_ones(start_daemon, functions_dir,
                                                                       tmp_path, notify_socket):
    write_function(functions_dir, "hello.py", """
        def handler(event, context):
            return "hi"
    """)
    config = tmp_path / "faasd.toml"
    config.write_text(CONFIG.format(max_concurrency=50))
    daemon = start_daemon(functions_dir, config=config, env={"NOTIFY_SOCKET": str(notify_socket.path)})
    notify_socket.wait_for("READY", "1")
    assert daemon.get("/function/hello").status == 200
    wait_until(lambda: [w["state"] for w in daemon.workers("hello")] == ["frozen"],
               message="the worker to freeze after 100 ms")

    config.write_text(CONFIG.format(max_concurrency=50).replace("freeze_after_ms = 100",
                                                                "freeze_after_ms = 600000")
                      + "[server]\nmax_body_mb = 1\n")
    before = len(notify_socket.messages)
    daemon.process.send_signal(signal.SIGHUP)
    index, _ = notify_socket.wait_for("RELOADING", "1", after=before)
    notify_socket.wait_for("READY", "1", after=index + 1)
    wait_until(lambda: "server.max_body_mb changed; it takes effect at the next restart" in daemon.output(),
               message="the restart-only warning")
    assert "configuration reloaded from" in daemon.output()

    # freeze_after_ms is live: the worker now stays idle after a call.
    assert daemon.get("/function/hello").status == 200
    time.sleep(1.0)
    assert [w["state"] for w in daemon.workers("hello")] == ["idle"]
    # max_body_mb is not: a 2 MB body still fits under the running 6 MB limit.
    assert daemon.post("/function/hello", b"x" * (2 * 1024 * 1024)).status == 200


def test_a_config_that_is_not_utf8_is_refused_and_the_next_sighup_still_reloads(
        start_daemon, functions_dir, tmp_path, notify_socket):
    config = tmp_path / "faasd.toml"
    config.write_text(CONFIG.format(max_concurrency=50))
    daemon = start_daemon(functions_dir, config=config, env={"NOTIFY_SOCKET": str(notify_socket.path)})
    notify_socket.wait_for("READY", "1")

    config.write_bytes(b"# caf\xe9\n" + CONFIG.format(max_concurrency=5).encode())
    before = len(notify_socket.messages)
    daemon.process.send_signal(signal.SIGHUP)
    index, _ = notify_socket.wait_for("RELOADING", "1", after=before)
    _, refused = notify_socket.wait_for("READY", "1", after=index + 1)
    assert f"reload refused: {config}: not valid TOML: byte 5 is not UTF-8" in refused["STATUS"]
    wait_until(lambda: "config reload refused" in daemon.output(), message="the refusal in the log")
    [line] = [l for l in daemon.output().splitlines() if "config reload refused" in l]
    assert f"{config}: not valid TOML: byte 5 is not UTF-8" in line
    assert "Traceback" not in daemon.output()
    assert daemon.get("/system/info").json()["max_concurrency"] == 50

    config.write_text(CONFIG.format(max_concurrency=7))
    before = len(notify_socket.messages)
    daemon.process.send_signal(signal.SIGHUP)
    index, _ = notify_socket.wait_for("RELOADING", "1", after=before)
    _, done = notify_socket.wait_for("READY", "1", after=index + 1)
    assert "refused" not in done["STATUS"]
    assert daemon.get("/system/info").json()["max_concurrency"] == 7
    metrics = daemon.get("/metrics").text
    assert 'faasd_config_reloads_total{result="refused"} 1.0' in metrics
    assert 'faasd_config_reloads_total{result="success"} 1.0' in metrics
    assert "faasd_config_last_reload_successful 1.0" in metrics


def test_without_systemd_serve_runs_the_same_and_sighup_still_reloads(start_daemon, functions_dir, tmp_path):
    config = tmp_path / "faasd.toml"
    config.write_text(CONFIG.format(max_concurrency=50))
    daemon = start_daemon(functions_dir, config=config)
    config.write_text(CONFIG.format(max_concurrency=9))
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.get("/system/info").json()["max_concurrency"] == 9,
               message="the reload without NOTIFY_SOCKET")
    metrics = daemon.get("/metrics").text
    assert 'faasd_config_reloads_total{result="success"} 1.0' in metrics


# -- in-process: the watchdog lives on the event loop ------------------------------------

def test_a_blocked_event_loop_stops_the_watchdog_pings(tmp_path):
    receiver = NotifySocket(tmp_path / "wd.sock")
    notifier = Notifier(str(receiver.path), watchdog_usec=100_000)  # ping every 50 ms

    async def scenario() -> tuple[float, float]:
        task = asyncio.get_running_loop().create_task(notifier.run_watchdog())
        await asyncio.sleep(0.4)
        blocked_from = time.monotonic()
        time.sleep(0.8)  # the loop is stuck: no coroutine runs
        blocked_until = time.monotonic()
        await asyncio.sleep(0.4)
        task.cancel()
        return blocked_from, blocked_until

    try:
        blocked_from, blocked_until = asyncio.run(scenario())
    finally:
        notifier.close()
        receiver.close()
    arrivals = [t for t, m in receiver.messages if m == {"WATCHDOG": "1"}]
    before = [t for t in arrivals if t < blocked_from]
    during = [t for t in arrivals if blocked_from + 0.02 < t < blocked_until]
    after = [t for t in arrivals if t > blocked_until]
    assert len(before) >= 3 and len(after) >= 3, arrivals
    assert during == [], "pings were sent while the event loop was blocked"


def test_environment_is_taken_so_workers_never_inherit_it(tmp_path):
    env = {"NOTIFY_SOCKET": "@faasd-test", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid()),
           "LISTEN_PID": "1", "LISTEN_FDS": "1", "OTHER": "kept"}
    notifier = Notifier.from_environment(env)
    assert notifier.enabled and notifier.watchdog_interval == 1.0
    assert listen_sockets(env) == []  # LISTEN_PID names another process
    assert env == {"OTHER": "kept"}
    notifier.close()
    # The watchdog belongs to the process WATCHDOG_PID names, and only to it.
    other = Notifier.from_environment({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000",
                                       "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.enabled and other.watchdog_interval is None
    other.close()
    assert not Notifier.from_environment({}).enabled
    assert Notifier.from_environment({}).send("READY=1") is False


# -- socket activation ------------------------------------------------------------------------

# Exec faasd with the listening socket as fd 3 and LISTEN_PID set to its own
# pid, as systemd does (the pid is only known after fork, hence the exec).
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "faasd", *sys.argv[2:]])
"""


class Activated:
    """`faasd serve` started on a socket this test holds, as faasd.socket would."""

    def __init__(self, listener: socket.socket, functions: Path, data: Path, log: Path) -> None:
        self.decoy_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAASD_")}
        env["PYTHONPATH"] = str(ROOT)
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", ACTIVATE, str(listener.fileno()), "serve",
                 "--functions", str(functions), "--data-dir", str(data),
                 "--port", str(self.decoy_port)],
                pass_fds=(listener.fileno(),), stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def test_socket_activation_serves_the_passed_socket_and_a_restart_loses_no_connection(
        functions_dir, tmp_path):
    write_function(functions_dir, "hello.py", """
        def handler(event, context):
            return "hi"
    """)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/function/hello"
    log = tmp_path / "activated.log"
    started: list[Activated] = []
    results: list[int | str] = []
    done = threading.Event()

    def client() -> None:
        # A new connection per request, as browsers and load balancers open them.
        while not done.is_set():
            try:
                response = http("GET", url, headers={"Connection": "close"}, timeout=60)
                results.append(response.status)
            except OSError as exc:
                results.append(repr(exc))
            time.sleep(0.01)

    try:
        first = Activated(listener, functions_dir, tmp_path / "data", log)
        started.append(first)
        wait_until(lambda: http("GET", url, timeout=5).status == 200, timeout=30,
                   message=f"the activated daemon to serve\n{log.read_text()}")
        output = log.read_text()
        assert "using the listening socket passed by systemd" in output
        with pytest.raises(OSError):  # [server] port is not used when a socket is passed
            socket.create_connection(("127.0.0.1", first.decoy_port), timeout=2).close()

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(results) >= 20, timeout=30, message="traffic before the restart")
        assert first.stop() == 0
        served_before_restart = len(results)
        second = Activated(listener, functions_dir, tmp_path / "data", log)
        started.append(second)
        wait_until(lambda: len(results) >= served_before_restart + 40, timeout=60,
                   message="traffic after the restart")
        done.set()
        for thread in threads:
            thread.join(90)
        assert results and all(status == 200 for status in results), \
            [r for r in results if r != 200][:5]
        assert second.stop() == 0
    finally:
        done.set()
        leftovers = []
        for daemon in started:
            pid = daemon.process.pid
            before = descendants(pid) if daemon.process.poll() is None else set()
            daemon.stop()
            leftovers += [p for p in before if os.path.exists(f"/proc/{p}")]
            leftovers += sorted(pids_with_env("_FAASD_PARENT_PID", str(pid)))
        listener.close()
        assert not leftovers, f"processes left behind: {leftovers}"


def test_socket_activation_on_a_unix_socket(functions_dir, tmp_path):
    import http.client

    write_function(functions_dir, "hello.py", """
        def handler(event, context):
            return "over a unix socket"
    """)
    path = tmp_path / "faasd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(str(path))

    def get(target: str) -> tuple[int, bytes]:
        connection = UnixConnection("localhost")
        try:
            connection.request("GET", target)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    daemon = Activated(listener, functions_dir, tmp_path / "data", tmp_path / "unix.log")
    try:
        def answers() -> bool:
            try:
                return get("/readyz")[0] == 200
            except OSError:
                return False

        wait_until(answers, 30, message=f"the daemon on {path}\n" + (tmp_path / "unix.log").read_text())
        assert get("/function/hello") == (200, b'"over a unix socket"')
        assert f"listening on {path}" in (tmp_path / "unix.log").read_text()
    finally:
        pid = daemon.process.pid
        before = descendants(pid) if daemon.process.poll() is None else set()
        assert daemon.stop() == 0
        listener.close()
        leftovers = [p for p in before if os.path.exists(f"/proc/{p}")]
        leftovers += sorted(pids_with_env("_FAASD_PARENT_PID", str(pid)))
        assert not leftovers, f"processes left behind: {leftovers}"
