"""Unit tests of faasd.logfmt's filter of the AMQP libraries' reconnect noise."""

from __future__ import annotations

import logging

import pytest

from faasd.logfmt import BrokerReconnectNoise


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def attempt(connection: str = "amqp://guest:******@broker:5672/") -> logging.LogRecord:
    return logging.LogRecord(
        "aio_pika.robust_connection", logging.WARNING, __file__, 1,
        'Connection attempt to "%s" failed: %s. Reconnecting after %r seconds.',
        (connection, ConnectionRefusedError(111, "Connection refused"), 2), None)


@pytest.fixture
def info_level():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    yield
    root.setLevel(level)


def test_attempts_of_a_run_are_told_at_info_sparser_as_it_goes_on(info_level):
    clock = Clock()
    noise = BrokerReconnectNoise(clock)
    told = []
    for _ in range(300):
        clock.now += 2
        record = attempt()
        if noise.filter(record):
            assert record.levelno == logging.INFO
            told.append(record.getMessage())
        else:
            assert record.levelno == logging.DEBUG
    assert [m.rsplit("(attempt ", 1)[1] for m in told] == \
        ["1)", "2)", "4)", "8)", "16)", "32)", "64)", "128)", "256)"]
    assert told[0].startswith('Connection attempt to "amqp://guest:******@broker:5672/" failed')
    # Past the powers of two, every 128th attempt: a broker gone for hours is still said.
    later = []
    for _ in range(301, 641):
        clock.now += 2
        record = attempt()
        if noise.filter(record):
            later.append(record.getMessage().rsplit("(attempt ", 1)[1])
    assert later == ["384)", "512)", "640)"]


def test_a_new_run_counts_from_one_and_each_connection_counts_its_own(info_level):
    clock = Clock()
    noise = BrokerReconnectNoise(clock)
    for _ in range(5):
        clock.now += 2
        noise.filter(attempt())
    other = attempt("amqp://guest:******@other:5672/")
    assert noise.filter(other) and other.getMessage().endswith("(attempt 1)")
    clock.now += BrokerReconnectNoise.RUN_ENDS_S + 1  # the connection came back meanwhile
    again = attempt()
    assert noise.filter(again) and again.getMessage().endswith("(attempt 1)")


def test_the_other_lines_are_untouched_or_demoted_as_before(info_level):
    noise = BrokerReconnectNoise(Clock())
    ours = logging.LogRecord("faasd.amqp", logging.WARNING, __file__, 1, "lost", (), None)
    assert noise.filter(ours) and ours.levelno == logging.WARNING
    transport = logging.LogRecord("aiormq.connection", logging.ERROR, __file__, 1,
                                  "error when creating transport", (), None)
    assert not noise.filter(transport) and transport.levelno == logging.DEBUG
