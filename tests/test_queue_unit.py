"""Unit tests of faasd.queue: how its dispatcher tells of claims that keep failing, and the file
an earlier release wrote."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from contextlib import closing
from types import SimpleNamespace

import pytest

from faasd import queue
from faasd.invoker import Invocation
from faasd.queue import AsyncQueue
from faasd.spec import AsyncConfig


@pytest.mark.asyncio
async def test_a_dispatch_that_keeps_failing_is_told_once_and_its_recovery_once(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(queue, "DISPATCH_RETRY_S", 0.01)
    events = AsyncQueue(tmp_path, registry=None, invoker=None, max_concurrency=10, region="us-east-1")
    attempts = 0
    recovered = asyncio.Event()

    async def claim_ready() -> float:
        nonlocal attempts
        attempts += 1
        if attempts <= 5:
            raise OSError(28, "No space left on device")
        recovered.set()
        return 60.0

    monkeypatch.setattr(events, "_claim_ready", claim_ready)
    caplog.set_level(logging.INFO, logger="faasd.queue")
    await events.open()
    try:
        await asyncio.wait_for(recovered.wait(), 5)
    finally:
        await events.close()
    told = [r for r in caplog.records if r.name == "faasd.queue" and r.levelno >= logging.INFO]
    failed = [r for r in told if "dispatch failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None  # with its traceback, once
    assert [r.getMessage() for r in told if "dispatching again" in r.getMessage()] == [
        "asynchronous queue: dispatching again after 5 failed attempts"]


class Recorder:
    """An invoker that runs nothing: it notes each call and says it succeeded."""

    draining = False

    def __init__(self) -> None:
        self.global_limit = SimpleNamespace(limit=10)
        self.calls: asyncio.Queue = asyncio.Queue()

    async def invoke(self, function: str, payload: bytes, **options) -> Invocation:
        await self.calls.put((function, payload, options))
        return Invocation(request_id=options["request_id"], function=function, payload=b"null")


# The events table as faasd wrote it before events kept the ARN their caller named.
SCHEMA_BEFORE_INVOKED_ARN = """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        function TEXT NOT NULL,
        request_id TEXT NOT NULL,
        payload BLOB NOT NULL,
        source TEXT NOT NULL,
        enqueued_at REAL NOT NULL,
        next_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        interruptions INTEGER NOT NULL DEFAULT 0,
        hops INTEGER NOT NULL DEFAULT 0,
        running INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE TABLE totals (
        function TEXT NOT NULL,
        outcome TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (function, outcome)
    ) WITHOUT ROWID;
    PRAGMA user_version = 1;
"""


async def test_events_queued_by_an_earlier_release_still_run_and_new_ones_keep_arn_and_trace(tmp_path):
    now = time.time()
    with closing(sqlite3.connect(tmp_path / "queue.db")) as db:
        db.executescript(SCHEMA_BEFORE_INVOKED_ARN)
        db.execute("INSERT INTO events (function, request_id, payload, source, enqueued_at, next_at) "
                   "VALUES ('fn', 'old-1', ?, 'api', ?, ?)", (b'{"n": 1}', now, now))
        db.commit()
    spec = SimpleNamespace(async_config=AsyncConfig(), concurrency=None)
    invoker = Recorder()
    events = AsyncQueue(tmp_path, registry=SimpleNamespace(get=lambda name: spec), invoker=invoker,
                        max_concurrency=10, region="us-east-1")
    await events.open()
    try:
        function, payload, options = await asyncio.wait_for(invoker.calls.get(), 5)
        assert (function, payload, options["request_id"]) == ("fn", b'{"n": 1}', "old-1")
        # Its own, unqualified ARN, and a new trace header, as before.
        assert (options["invoked_arn"], options["trace_id"]) == (None, None)

        arn = "arn:aws:lambda:us-east-1:000000000000:function:fn:$LATEST"
        trace = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
        await events.put("fn", b"{}", request_id="new-1", invoked_arn=arn, trace_id=trace)
        function, payload, options = await asyncio.wait_for(invoker.calls.get(), 5)
        assert (options["request_id"], options["invoked_arn"], options["trace_id"]) == ("new-1", arn, trace)
    finally:
        await events.close()
    with closing(sqlite3.connect(tmp_path / "queue.db")) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1  # an earlier release still opens it
        assert {"invoked_arn", "trace_id"} <= {row[1] for row in db.execute("PRAGMA table_info(events)")}
        assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0


def test_a_throttled_event_waits_longer_each_time_up_to_5_minutes_and_never_past_its_age():
    from faasd.queue import throttle_delay

    config = AsyncConfig(max_event_age_s=3600)
    start = 1_000_000.0
    assert throttle_delay(config, start, start) == 1.0  # Lambda's first wait: 1 second
    assert throttle_delay(config, start, start + 1) == 1.0
    assert throttle_delay(config, start, start + 2) == 2.0  # doubling: as old again
    assert throttle_delay(config, start, start + 40) == 40.0
    assert throttle_delay(config, start, start + 1000) == 300.0  # at most 5 minutes
    # The last wait ends just past its max_event_age_s, where it is given up.
    assert throttle_delay(config, start, start + 3500) == pytest.approx(100.001)
    assert throttle_delay(config, start, start + 3700) == 0.0
