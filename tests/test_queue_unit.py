"""Unit tests of faasd.queue's dispatcher: how it tells of claims that keep failing."""

from __future__ import annotations

import asyncio
import logging

import pytest

from faasd import queue
from faasd.queue import AsyncQueue


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
