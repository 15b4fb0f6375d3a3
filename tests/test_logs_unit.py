"""Unit tests of faasd.logs: the per-function log files and their tails."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import shutil

from faasd.logs import FunctionLogs, LogCapture


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


async def _write_flushed(logs: FunctionLogs, start: int, count: int, width: int) -> None:
    """Lines start .. start+count-1, one flush (one loop turn) each."""
    for i in range(start, start + count):
        logs.write("fn", f"rid-{i}", f"line {i:06d} " + "x" * width)
        logs.flush()


def test_a_file_past_its_size_is_rotated_and_the_oldest_goes(tmp_path):
    logs = FunctionLogs(tmp_path, echo_format=None, max_file_bytes=100_000, keep_files=2)
    asyncio.run(_write_flushed(logs, 0, 1500, 200))  # about 370 KB: more than 3 files' worth
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["fn.log", "fn.log.1", "fn.log.2"], names
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= 100_000 + 300  # past the size by at most one flush
    # The files hold the newest lines in order, with nothing between them lost.
    kept = [line for name in ("fn.log.2", "fn.log.1", "fn.log")
            for line in (tmp_path / name).read_text().splitlines()]
    numbers = [int(line.split("\t")[2].split()[1]) for line in kept]
    assert numbers == list(range(numbers[0], 1500)) and numbers[0] > 0
    # A tail reads across them.
    tail = logs.tail("fn", 700)
    assert [int(line.split("\t")[2].split()[1]) for line in tail] == list(range(800, 1500))
    assert len(logs.tail("fn", 10**6)) == len(kept)
    logs.close()


def test_rotation_off_keeps_one_growing_file(tmp_path):
    logs = FunctionLogs(tmp_path, echo_format=None, max_file_bytes=0)
    asyncio.run(_write_flushed(logs, 0, 600, 200))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fn.log"]
    logs.close()


def test_reopen_lets_an_external_logrotate_move_the_file(tmp_path):
    logs = FunctionLogs(tmp_path, echo_format=None)
    asyncio.run(_write_flushed(logs, 0, 3, 10))
    (tmp_path / "fn.log").rename(tmp_path / "fn.log-20261129")  # logrotate's create mode
    logs.reopen()
    asyncio.run(_write_flushed(logs, 3, 2, 10))
    assert len((tmp_path / "fn.log-20261129").read_text().splitlines()) == 3
    assert [line.split("\t")[1] for line in (tmp_path / "fn.log").read_text().splitlines()] == ["rid-3", "rid-4"]
    logs.close()


def test_a_removed_logs_directory_is_made_again_when_its_files_reopen(tmp_path):
    logs_dir = tmp_path / "logs"
    logs = FunctionLogs(logs_dir, echo_format=None)
    asyncio.run(_write_flushed(logs, 0, 2, 10))
    shutil.rmtree(logs_dir)  # an operator's clean-up, say
    logs.reopen()  # SIGHUP (or the file's idle close) opens it again
    asyncio.run(_write_flushed(logs, 2, 2, 10))
    assert [line.split("\t")[1] for line in (logs_dir / "fn.log").read_text().splitlines()] == ["rid-2", "rid-3"]
    logs.close()


class FullDisk:
    """A log file on a disk that fills up: takes `room` bytes, then ENOSPC until emptied."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.data = b""

    def write(self, data) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = bytes(data[:self.room])
        self.data += taken
        self.room -= len(taken)
        return len(taken)

    def close(self) -> None:
        pass


def test_a_full_disk_loses_file_lines_only_and_the_file_says_how_many(tmp_path, caplog):
    stream = io.BytesIO()
    logs = FunctionLogs(tmp_path, echo_format="text", stream=stream)
    disk = logs._files["fn"] = FullDisk(room=150)
    logs._sizes["fn"] = 0
    caplog.set_level(logging.WARNING, logger="faasd.logs")
    asyncio.run(_write_flushed(logs, 0, 5, 40))  # the first line fits, the second is cut
    # Every line still reached stdout; the file took one line and part of the next.
    assert len(stream.getvalue().decode().splitlines()) == 5
    assert disk.data.count(b"\n") == 1 and not disk.data.endswith(b"\n")
    assert [r.getMessage() for r in caplog.records] == [
        "cannot write the log of fn (No space left on device): its lines go to stdout only until it can"]
    disk.room = 10_000  # space again
    asyncio.run(_write_flushed(logs, 5, 1, 40))
    lines = disk.data.decode().splitlines()
    assert len(lines) == 4  # the first, the cut one, the marker on a line of its own, the new one
    assert lines[2].endswith("\t-\t[faasd: 4 lines could not be written here: No space left on device]")
    assert lines[3].split("\t")[1] == "rid-5"
    assert "writing the log of fn again; 4 lines could not be written to it" in caplog.text
    logs.close()


def test_the_file_of_a_function_that_stopped_logging_is_closed_and_reopened_on_its_next_line(
        tmp_path, monkeypatch):
    from faasd import logs as logs_module

    clock = [1000.0]
    monkeypatch.setattr(logs_module.time, "monotonic", lambda: clock[0])
    logs = FunctionLogs(tmp_path, echo_format=None)

    async def line(name: str, text: str) -> None:
        logs.write(name, "rid", text)
        logs.flush()

    asyncio.run(line("gone", "one"))
    asyncio.run(line("busy", "one"))
    assert set(logs._files) == {"gone", "busy"}
    clock[0] += logs_module.IDLE_CLOSE_S + 1
    asyncio.run(line("busy", "two"))
    assert set(logs._files) == {"busy"}  # a deleted or quiet function holds no descriptor
    asyncio.run(line("gone", "two"))
    assert [l.split("\t")[2] for l in (tmp_path / "gone.log").read_text().splitlines()] == ["one", "two"]
    logs.close()


def test_one_flush_writes_each_functions_lines_in_order_to_files_stdout_followers_and_taps(tmp_path):
    from faasd.ui import LogRing

    stream = io.BytesIO()
    logs = FunctionLogs(tmp_path, echo_format="text", stream=stream)
    ring = LogRing()
    logs.taps.append(ring.tap)

    async def scenario() -> list[str]:
        follower = logs.follow("a")
        first = asyncio.ensure_future(follower.__anext__())
        await asyncio.sleep(0)  # the follower is registered
        logs.write("a", "r1", "START a1")
        logs.write("b", "r2", "START b1", "b says hi")
        logs.write("a", "r1", "END a1", "REPORT a1")
        assert stream.getvalue() == b"" and ring.seq == 0  # nothing before the loop's turn ends
        followed = [await first] + [await follower.__anext__() for _ in range(2)]
        await follower.aclose()
        return followed

    followed = asyncio.run(scenario())
    assert [line.split("\t")[2] for line in followed] == ["START a1\n", "END a1\n", "REPORT a1\n"]
    assert [line.split("\t", 1)[1] for line in (tmp_path / "a.log").read_text().splitlines()] == [
        "r1\tSTART a1", "r1\tEND a1", "r1\tREPORT a1"]
    assert [line.split("\t", 1)[1] for line in (tmp_path / "b.log").read_text().splitlines()] == [
        "r2\tSTART b1", "r2\tb says hi"]
    echoed = stream.getvalue().decode().splitlines()
    assert [line.split(" ", 1)[1] for line in echoed] == [
        "INFO    [a] r1 START a1", "INFO    [b] r2 START b1", "INFO    [b] r2 b says hi",
        "INFO    [a] r1 END a1", "INFO    [a] r1 REPORT a1"]
    lines, last = ring.after(0)
    assert last == 5
    assert [(line["seq"], line["function"], line["request_id"], line["message"]) for line in lines] == [
        (1, "a", "r1", "START a1"), (2, "b", "r2", "START b1"), (3, "b", "r2", "b says hi"),
        (4, "a", "r1", "END a1"), (5, "a", "r1", "REPORT a1")]
    logs.close()


def test_a_follow_ends_at_shutdown_and_when_its_reader_is_gone(tmp_path, monkeypatch):
    import faasd.logs

    monkeypatch.setattr(faasd.logs, "FOLLOW_CHECK_S", 0.01)
    logs = FunctionLogs(tmp_path, echo_format=None)
    reader_left = False

    async def scenario() -> tuple[list[str], list[str]]:
        async def read(follower) -> list[str]:
            return [line.split("\t")[2] async for line in follower]

        stays = asyncio.ensure_future(read(logs.follow("a")))
        leaves = asyncio.ensure_future(read(logs.follow("a", gone=lambda: reader_left)))
        await asyncio.sleep(0.05)  # both registered, and quiet past several checks
        logs.write("a", "r1", "one")
        await asyncio.sleep(0.05)
        nonlocal reader_left
        reader_left = True
        left = await asyncio.wait_for(leaves, 5)
        assert not stays.done() and len(logs._followers["a"]) == 1
        logs.write("a", "r2", "two")
        await asyncio.sleep(0.05)
        logs.end_follows()
        return left, await asyncio.wait_for(stays, 5)

    left, stayed = asyncio.run(scenario())
    assert left == ["one\n"]
    assert stayed == ["one\n", "two\n"]
    assert logs._followers["a"] == set()
    logs.close()


def test_a_follower_that_falls_behind_is_told_how_many_lines_it_missed(tmp_path, monkeypatch):
    import faasd.logs

    monkeypatch.setattr(faasd.logs, "FOLLOW_BACKLOG", 3)
    logs = FunctionLogs(tmp_path, echo_format=None)

    async def scenario() -> list[str]:
        follower = logs.follow("a")
        for i in range(5):  # the reader reads nothing meanwhile
            logs.write("a", "r", f"line {i}")
        logs.flush()
        read = [await follower.__anext__() for _ in range(3)]
        logs.write("a", "r", "line 5")
        logs.flush()
        read += [await follower.__anext__() for _ in range(2)]
        logs.end_follows()
        assert [line async for line in follower] == []
        return [line.split("\t")[2].rstrip("\n") for line in read]

    assert asyncio.run(scenario()) == [
        "line 0", "line 1", "line 2",
        "[faasd: 2 lines were dropped here: this reader fell behind]", "line 5"]
    # The file has every line.
    assert len((tmp_path / "a.log").read_text().splitlines()) == 6
    logs.close()


def test_a_write_of_no_lines_writes_nothing(tmp_path):
    stream = io.BytesIO()
    logs = FunctionLogs(tmp_path, stream=stream)

    async def scenario() -> None:
        logs.write("fn", "rid")
        logs.flush()

    asyncio.run(scenario())
    assert stream.getvalue() == b"" and logs.tail("fn", 10) == []
    logs.close()


class _CountingStream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)


def test_a_start_line_waits_for_the_calls_next_lines_and_goes_out_with_them(tmp_path):
    stream = _CountingStream()
    logs = FunctionLogs(tmp_path, echo_format="text", stream=stream)

    async def scenario() -> None:
        logs.write_held("fn", "r1", "START r1")
        for _ in range(5):
            await asyncio.sleep(0)  # loop turns pass: a START alone is not written yet
        assert stream.writes == 0 and not (tmp_path / "fn.log").exists()
        logs.write("fn", "r1", "END r1", "REPORT r1")
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert stream.writes == 1  # START, END and REPORT in one write
    assert [line.split("\t")[2] for line in logs.tail("fn", 10)] == ["START r1\n", "END r1\n", "REPORT r1\n"]
    logs.close()


def test_a_start_line_of_a_longer_call_is_written_after_the_hold(tmp_path, monkeypatch):
    import faasd.logs

    monkeypatch.setattr(faasd.logs, "HOLD_S", 0.01)
    stream = _CountingStream()
    logs = FunctionLogs(tmp_path, echo_format="text", stream=stream)

    async def scenario() -> None:
        logs.write_held("fn", "r1", "START r1")
        await asyncio.sleep(0.05)
        assert stream.writes == 1 and (tmp_path / "fn.log").read_text().endswith("\tr1\tSTART r1\n")
        logs.write_held("fn", "r2", "START r2")  # held again; close() writes what is held
        logs.close()

    asyncio.run(scenario())
    assert [line.split("\t")[2] for line in logs.tail("fn", 10)] == ["START r1\n", "START r2\n"]


def test_an_invocation_keeps_its_last_lines_after_a_marker_that_counts_the_others(tmp_path, monkeypatch):
    import faasd.logs

    monkeypatch.setattr(faasd.logs, "KEEP_LINES", 10)
    logs = FunctionLogs(tmp_path, echo_format=None)

    async def scenario() -> LogCapture:
        capture = LogCapture(logs, "fn", "r1")
        capture.opening("START r1")
        for i in range(45):
            capture(f"l {i}")
        capture("END r1", "REPORT r1")
        logs.flush()
        return capture

    capture = asyncio.run(scenario())
    # 48 lines: at most twice KEEP_LINES held, the last ones always among them.
    assert capture.lines[-3:] == ["l 44", "END r1", "REPORT r1"]
    assert len(capture.lines) <= 21
    kept = len(capture.lines) - 1
    assert capture.lines[0] == (f"[faasd: {48 - kept} earlier lines of this invocation are left out here; "
                                "the function's log has them]")
    assert capture.lines[1:] == ([f"l {i}" for i in range(45)] + ["END r1", "REPORT r1"])[-kept:]
    assert len(logs.tail("fn", 100)) == 48  # the file has every line
    logs.close()
