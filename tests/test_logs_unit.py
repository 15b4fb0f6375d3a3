"""Unit tests of faasd.logs: the per-function log files and their tails."""

from __future__ import annotations

import asyncio
import io

from faasd.logs import FunctionLogs


async def _write(logs: FunctionLogs, count: int, width: int) -> None:
    for i in range(count):
        logs.write("fn", f"rid-{i}", f"line {i:06d} " + "x" * width)
    logs.flush()


def test_tail_returns_the_last_lines_even_far_back_in_a_large_file(tmp_path):
    logs = FunctionLogs(tmp_path, echo_format=None)
    asyncio.run(_write(logs, 5000, 200))  # about 1.2 MB
    tail = logs.tail("fn", 4000)
    assert len(tail) == 4000
    assert tail[0].split("\t")[2].startswith("line 001000 ")
    assert tail[-1].split("\t")[2].startswith("line 004999 ")
    assert logs.tail("fn", 0) == []
    assert len(logs.tail("fn", 10**6)) == 5000
    logs.close()


def test_lines_are_echoed_in_the_daemons_format_with_the_request_id(tmp_path):
    stream = io.BytesIO()
    logs = FunctionLogs(tmp_path, echo_format="json", stream=stream)
    asyncio.run(_write(logs, 2, 3))
    echoed = stream.getvalue().decode().splitlines()
    assert len(echoed) == 2 and '"request_id":"rid-1"' in echoed[1] and '"function":"fn"' in echoed[1]
    logs.close()


def test_timestamps_are_utc_with_milliseconds_across_second_boundaries(monkeypatch):
    from faasd import logs as logs_module

    for now, expected in ((1767323045.999, "2026-01-02T03:04:05.999Z"),
                          (1767323046.0004, "2026-01-02T03:04:06.000Z"),
                          (1767323046.0514, "2026-01-02T03:04:06.051Z"),
                          (1767323106.5, "2026-01-02T03:05:06.500Z")):
        monkeypatch.setattr(logs_module.time, "time", lambda now=now: now)
        assert logs_module.iso_now() == expected
