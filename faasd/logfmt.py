"""The daemon's own log lines: human-readable text by default, JSON on request.

Function output arrives through the `faasd.function` logger with `function`
and `request_id` attributes; both formats show them, so every line of an
invocation can be found by its request id.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

import orjson


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        function = getattr(record, "function", None)
        where = f"[{function}]" if function else record.name
        request_id = getattr(record, "request_id", None)
        if request_id:
            where += f" {request_id}"
        line = f"{_timestamp(record)} {record.levelname:<7} {where} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("function", "request_id"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class BrokerReconnectNoise(logging.Filter):
    """Quiet aio-pika's and aiormq's own account of a lost broker connection.

    On every loss aiormq logs a WARNING with two tracebacks from its reader,
    aio-pika an ERROR from each channel's close callback, and a WARNING per
    reconnect attempt; while the broker refuses connections, each attempt
    also brings aiormq's ERROR "error when creating transport" and aio-pika's
    "Connection to ... closed. Reconnecting". faasd says the same once, in its
    own words ("AMQP connection to ... lost (reason); reconnecting", then
    "reconnected"), and /readyz and the metrics show it: the tracebacks, the
    errors and the repeats go to debug level.

    Each attempt is one line from aio-pika, every 1 to 2 s for as long as the
    broker stays away: the 1st, 2nd, 4th, 8th ... and then every 128th
    attempt of a run go to info, numbered, and the others to debug. A run
    ends when its connection has not retried for a minute (it came back).
    """

    DEBUG = (("aiormq.connection", "Cancelling cause reader exited abnormally"),
             ("aiormq.connection", "error when creating transport"),
             ("aio_pika.robust_connection", "closed. Reconnecting after"),
             ("aio_pika.tools", "RobustChannel._on_close"))
    ATTEMPT = ("aio_pika.robust_connection", "Connection attempt to")
    RUN_ENDS_S = 60.0
    EVERY = 128

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._runs: dict[str, tuple[int, float]] = {}  # connection -> (attempts, last)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO or not record.name.startswith(("aiormq", "aio_pika")):
            return True
        message = record.getMessage()
        if any(record.name == name and text in message for name, text in self.DEBUG):
            return self._demote(record, logging.DEBUG)
        if record.name == self.ATTEMPT[0] and self.ATTEMPT[1] in message:
            attempt = self._count(str(record.args[0]) if record.args else "")
            if attempt & (attempt - 1) and attempt % self.EVERY:
                return self._demote(record, logging.DEBUG)
            record.msg, record.args = f"{message} (attempt {attempt})", ()
            return self._demote(record, logging.INFO)
        return True

    def _count(self, connection: str) -> int:
        now = self._clock()
        attempts, last = self._runs.get(connection, (0, now))
        attempts = 1 if now - last > self.RUN_ENDS_S else attempts + 1
        self._runs[connection] = (attempts, now)
        return attempts

    @staticmethod
    def _demote(record: logging.LogRecord, level: int) -> bool:
        record.levelno, record.levelname = level, logging.getLevelName(level)
        return logging.getLogger().isEnabledFor(level)


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(BrokerReconnectNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
