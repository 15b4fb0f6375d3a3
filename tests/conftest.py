from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faasd.limits import CGROUP_ROOT, cgroup_name, sweep_stale_cgroups  # noqa: E402
from faasd.sandbox import PIDS_V1_ROOT  # noqa: E402
from support import Daemon, descendants, free_port, pids_with_env, process_state, wait_until  # noqa: E402

AMQP_URL = os.environ.get("FAASD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture
def functions_dir(tmp_path: Path) -> Path:
    path = tmp_path / "functions"
    path.mkdir()
    return path


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start `faasd serve` processes; every one is stopped, and checked for leftovers, after the test."""
    started: list[Daemon] = []

    def start(functions: Path | None = None, *, wait: bool = True, port: int | None = None,
              data: Path | None = None, config: Path | None = None,
              env: dict[str, str] | None = None, args: list[str] | None = None,
              prefix: list[str] | None = None, python: str = sys.executable) -> Daemon:
        daemon = Daemon(
            functions=functions or (tmp_path / "functions"),
            data=data or (tmp_path / "data"),
            port=port or free_port(),
            config=config,
            env=env or {},
            extra_args=args or [],
            prefix=prefix or [],
            python=python,
        )
        daemon.functions.mkdir(parents=True, exist_ok=True)
        started.append(daemon)
        return daemon.start(wait=wait)

    yield start
    suspects: set[int] = set()
    for daemon in started:
        live = daemon.process.pid if daemon.process else None
        suspects |= descendants(live) if live else set()
        daemon.stop()
        for pid in daemon.pids:
            # Workers re-parented after their daemon died still name it.
            suspects |= pids_with_env("_FAASD_PARENT_PID", str(pid))

    def alive() -> list[str]:
        return [f"{pid} ({_cmdline(pid)})" for pid in sorted(suspects)
                if process_state(pid) not in (None, "Z")]

    try:
        wait_until(lambda: not alive(), timeout=5, message="processes to exit")
    except AssertionError:
        pytest.fail(f"processes left behind: {alive()}")
    finally:
        # The cgroup v1 groups of a daemon a test killed are swept by the next start on
        # its data dir, and no daemon starts on these again: sweep them as it would.
        for data in {daemon.data for daemon in started}:
            for root in (CGROUP_ROOT / "memory", Path(PIDS_V1_ROOT)):
                if root.is_dir():
                    sweep_stale_cgroups(root, cgroup_name(data))


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon], functions_dir: Path) -> Daemon:
    return start_daemon(functions_dir)


def _broker_answers(url: str) -> bool:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def amqp_url() -> str:
    """The RabbitMQ URL; fails under CI when the broker is absent, skips elsewhere."""
    if not _broker_answers(AMQP_URL):
        message = f"RabbitMQ is not answering at {AMQP_URL}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI requires it: .ci/run starts it)")
        pytest.skip(message + "; start it with `rabbitmq-server -detached`")
    return AMQP_URL
