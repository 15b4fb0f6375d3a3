"""Unit tests of faasd.reload: a reload that fails is refused, counted and ends in READY=1."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace

from faasd.config import Config, ConfigError
from faasd.reload import ReloadState, reload


class Notes:
    """A Notifier that records what it was told."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str | None]] = []

    def reloading(self, status: str | None = None) -> bool:
        self.sent.append(("RELOADING", status))
        return True

    def ready(self, status: str | None = None) -> bool:
        self.sent.append(("READY", status))
        return True


def _daemon() -> SimpleNamespace:
    return SimpleNamespace(config=Config(source=Path("/etc/faasd/faasd.toml")),
                           registry=SimpleNamespace(specs={}), address=("127.0.0.1", 8080))


def _fail(exc: Exception):
    def loader() -> Config:
        raise exc
    return loader


def test_any_error_of_the_loader_refuses_the_reload_in_one_line_and_sends_ready(caplog):
    daemon, notes, state = _daemon(), Notes(), ReloadState()
    caplog.set_level(logging.INFO, logger="faasd.reload")
    failures = [
        (ConfigError("/etc/faasd/faasd.toml: limits.max_concurrency: -3 is not valid"),
         "/etc/faasd/faasd.toml: limits.max_concurrency: -3 is not valid"),
        (RuntimeError("Symlink loop from '/etc/faasd/loop'"),
         "/etc/faasd/faasd.toml: RuntimeError: Symlink loop from '/etc/faasd/loop'"),
        (MemoryError(), "/etc/faasd/faasd.toml: MemoryError: "),
    ]
    for error, problem in failures:
        caplog.clear()
        assert asyncio.run(reload(daemon, _fail(error), notes, state)) is False
        [line] = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert line.levelno == logging.ERROR and line.exc_info is None
        assert line.getMessage() == f"config reload refused, the running configuration is kept: {problem}"
        assert notes.sent[-2] == ("RELOADING", "Reloading configuration")
        assert notes.sent[-1] == ("READY", "Serving 0 functions on http://127.0.0.1:8080; "
                                           f"reload refused: {problem}")
        assert state.last_ok is False and state.last_error == problem
    assert state.refused == 3 and state.succeeded == 0
