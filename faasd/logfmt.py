"""The daemon's own log lines: human-readable text by default, JSON on request.

Function output arrives through the `faasd.function` logger with `function`
and `request_id` attributes; both formats show them, so every line of an
invocation can be found by its request id.
"""

from __future__ import annotations

import logging
import sys
import time

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
    errors and the repeats go to debug level, and each attempt (one line) to info.
    """

    DEBUG = (("aiormq.connection", "Cancelling cause reader exited abnormally"),
             ("aiormq.connection", "error when creating transport"),
             ("aio_pika.robust_connection", "closed. Reconnecting after"),
             ("aio_pika.tools", "RobustChannel._on_close"))
    INFO = (("aio_pika.robust_connection", "Connection attempt to"),)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO or not record.name.startswith(("aiormq", "aio_pika")):
            return True
        message = record.getMessage()
        for level, patterns in ((logging.DEBUG, self.DEBUG), (logging.INFO, self.INFO)):
            if any(record.name == name and text in message for name, text in patterns):
                record.levelno, record.levelname = level, logging.getLevelName(level)
                return logging.getLogger().isEnabledFor(level)
        return True


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(BrokerReconnectNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
