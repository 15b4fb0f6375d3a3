"""Unit tests of faasd.streaming: a streamed response's way from a worker to its caller."""

from __future__ import annotations

import asyncio

from faasd.streaming import HIGH_WATER, LOW_WATER, ResponseStream


def run(coroutine):
    return asyncio.run(coroutine)


def test_pieces_reach_the_reader_in_order_and_the_end_after_the_last():
    async def scenario():
        stream = ResponseStream()
        stream.feed(b"one,")
        stream.feed(b"")  # nothing: not a piece
        stream.feed(b"two")
        stream.close()
        return [await stream.read(), await stream.read(), await stream.read()], stream.size

    assert run(scenario()) == ([b"one,", b"two", None], 7)


def test_a_reader_waits_for_the_next_piece():
    async def scenario():
        stream = ResponseStream()
        reading = asyncio.ensure_future(stream.read())
        await asyncio.sleep(0)
        assert not reading.done()
        stream.feed(b"late")
        return await reading

    assert run(scenario()) == b"late"


def test_the_worker_is_paused_while_the_caller_has_not_taken_what_came():
    async def scenario():
        calls: list[bool] = []
        stream = ResponseStream()
        stream.attach(calls.append)
        piece = b"x" * (64 * 1024)
        fed = 0
        while fed < HIGH_WATER:
            stream.feed(piece)
            fed += len(piece)
        assert calls == [True]  # paused once, at the high-water mark
        room = asyncio.ensure_future(stream.drained())
        await asyncio.sleep(0)
        assert not room.done()
        while fed > LOW_WATER:
            await stream.read()
            fed -= len(piece)
        assert calls == [True, False]  # and on again once below the low-water mark
        await room
        stream.detach()
        return calls

    assert run(scenario()) == [True, False]


def test_a_caller_that_goes_away_lets_the_worker_run_on_and_drops_what_comes():
    async def scenario():
        calls: list[bool] = []
        stream = ResponseStream()
        stream.attach(calls.append)
        stream.feed(b"y" * HIGH_WATER)
        stream.abandon()
        stream.feed(b"more")
        stream.close()
        return calls, await stream.read(), stream.size

    assert run(scenario()) == ([True, False], None, HIGH_WATER + 4)


def test_the_end_of_its_call_never_leaves_a_worker_paused():
    async def scenario():
        calls: list[bool] = []
        stream = ResponseStream()
        stream.attach(calls.append)
        stream.feed(b"z" * HIGH_WATER)
        stream.detach()
        await stream.drained()  # nothing of the call waits for room any more
        return calls

    assert run(scenario()) == [True, False]


def test_past_its_limit_a_stream_only_counts():
    async def scenario():
        stream = ResponseStream(limit=10)
        stream.feed(b"0123456789")
        stream.feed(b"!")
        stream.close()
        return await stream.read(), await stream.read(), stream.too_large

    assert run(scenario()) == (b"0123456789", None, True)


def test_the_caller_is_told_of_the_first_piece_only():
    async def scenario():
        starts: list[int] = []
        stream = ResponseStream()
        stream.on_start = lambda: starts.append(stream.size)
        stream.feed(b"")
        assert starts == []  # nothing streamed yet: no reader needed
        stream.feed(b"ab")
        stream.feed(b"cd")
        return starts

    assert run(scenario()) == [2]
