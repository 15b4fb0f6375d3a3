"""The dashboard: a static page at `/ui/` and the JSON it reads under `/system/`.

The page (index.html, app.js, style.css beside this file) is plain HTML and
JavaScript: no build step, nothing fetched from outside, charts drawn as
inline SVG. It polls the daemon:

    GET  /system/functions            functions, triggers, load errors, workers (api.py)
    GET  /system/info, /readyz        version, uptime, isolation, readiness (api.py)
    GET  /system/activity             per-5-second invocations, errors, throttles,
                                      p50/p99 latency over the last 15 minutes;
                                      recent errors; async queue figures
    GET  /system/log?after=SEQ        the daemon's recent log lines (ring of 1000), and
                                      the id of this daemon's start: lines are
                                      numbered anew from 1 at each start
    POST /system/functions/NAME/invoke  run NAME on the JSON body, as the
                                      Lambda console's Test button does:
                                      result, error, duration and log tail as JSON

What the page shows is kept here, in memory: `Activity` is fed by the
invoker's observers; `LogRing` holds the daemon's records (a handler on the
`faasd` logger) and the functions' lines (a tap on FunctionLogs), from the
first line of the daemon's start (the daemon attaches it, as daemon.log_ring).
"""

from __future__ import annotations

import logging
import math
import random
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from ..api import continue_on_read, host_name, read_body
from ..errors import InvokeRefused, Throttled
from ..invoker import Invocation
from ..logs import Entry
from ..spec import FunctionSpec, valid_name

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger("faasd.ui")

STATIC = Path(__file__).resolve().parent
ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css",
          "favicon.svg": "image/svg+xml"}

BUCKET_S = 5
WINDOW_S = 15 * 60
SAMPLES_PER_BUCKET = 2000  # durations kept per bucket for percentiles (reservoir beyond)
RECENT_ERRORS = 50
LOG_LINES = 1000


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (as CloudWatch reports pNN)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Bucket:
    start: int
    count: int = 0
    errors: int = 0
    throttles: int = 0
    cold_starts: int = 0
    durations: list[float] = field(default_factory=list)

    def add_duration(self, value: float) -> None:
        if len(self.durations) < SAMPLES_PER_BUCKET:
            self.durations.append(value)
        else:  # reservoir sampling keeps a uniform sample of a busy bucket
            slot = random.randrange(self.count)
            if slot < SAMPLES_PER_BUCKET:
                self.durations[slot] = value


class Activity:
    """Invocation history for the charts: one bucket per BUCKET_S over WINDOW_S."""

    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        self.buckets: deque[Bucket] = deque()
        self.errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)
        self.totals = {"invocations": 0, "errors": 0, "throttles": 0, "cold_starts": 0}

    def _bucket(self, now: float) -> Bucket:
        start = int(now // BUCKET_S * BUCKET_S)
        if not self.buckets or self.buckets[-1].start != start:
            self.buckets.append(Bucket(start))
        while self.buckets and self.buckets[0].start <= start - WINDOW_S:
            self.buckets.popleft()
        return self.buckets[-1]

    def observe(self, spec: FunctionSpec, invocation: Invocation, source: str) -> None:
        bucket = self._bucket(self.clock())
        bucket.count += 1
        self.totals["invocations"] += 1
        if invocation.init_ms is not None:
            bucket.cold_starts += 1
            self.totals["cold_starts"] += 1
        if invocation.duration_ms or invocation.error is None:
            bucket.add_duration(invocation.duration_ms)
        error = invocation.error
        if error is not None:
            bucket.errors += 1
            self.totals["errors"] += 1
            self.errors.appendleft({
                "time": self.clock(), "function": spec.name, "request_id": invocation.request_id,
                "trigger": source, "kind": error.kind, "error_type": error.error_type,
                "message": error.message[:500], "duration_ms": round(invocation.duration_ms, 3),
            })

    def throttled(self, spec: FunctionSpec, reason: str, source: str) -> None:
        self._bucket(self.clock()).throttles += 1
        self.totals["throttles"] += 1
        self.errors.appendleft({
            "time": self.clock(), "function": spec.name, "request_id": None, "trigger": source,
            "kind": "throttled", "error_type": "TooManyRequestsException",
            "message": reason, "duration_ms": None,
        })

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        current = self._bucket(now).start
        by_start = {b.start: b for b in self.buckets}
        series: dict[str, list[Any]] = {k: [] for k in
                                        ("t", "invocations", "rate", "errors", "throttles",
                                         "cold_starts", "p50_ms", "p99_ms")}
        recent: list[float] = []
        for start in range(current - WINDOW_S + BUCKET_S, current + BUCKET_S, BUCKET_S):
            bucket = by_start.get(start) or Bucket(start)
            ordered = sorted(bucket.durations)
            # The current bucket is not over yet: its rate is over the time elapsed.
            span = min(BUCKET_S, max(1.0, now - start))
            series["t"].append(start)
            series["invocations"].append(bucket.count)
            series["rate"].append(round(bucket.count / span, 3))
            series["errors"].append(bucket.errors)
            series["throttles"].append(bucket.throttles)
            series["cold_starts"].append(bucket.cold_starts)
            series["p50_ms"].append(_round(percentile(ordered, 50)))
            series["p99_ms"].append(_round(percentile(ordered, 99)))
            if start > now - 60:
                recent.extend(bucket.durations)
        recent.sort()
        last_minute = [b for b in self.buckets if b.start > now - 60]
        count = sum(b.count for b in last_minute)
        errors = sum(b.errors for b in last_minute)
        return {
            "now": now, "bucket_s": BUCKET_S, "window_s": WINDOW_S, "series": series,
            "totals": dict(self.totals),
            "last_minute": {"invocations": count, "errors": errors,
                            "rate": round(count / 60, 3),
                            "p50_ms": _round(percentile(recent, 50)),
                            "p99_ms": _round(percentile(recent, 99))},
            "recent_errors": list(self.errors),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


_LINE_FIELDS = ("seq", "time", "level", "logger", "function", "request_id", "message")


# A runtime's JSON record (log_format = "JSON"): Node's and Python's both begin so.
_RECORD_LEVEL = re.compile(r'\{"timestamp": ?"[^"]*", ?"level": ?"([A-Z]+)"')
_LEVELS = {"TRACE": "debug", "DEBUG": "debug", "INFO": "info", "WARN": "warning", "WARNING": "warning",
           "ERROR": "error", "FATAL": "critical", "CRITICAL": "critical"}


def _record_level(text: str) -> str:
    """The dashboard's level of a function's line: a JSON record's own, else info."""
    found = _RECORD_LEVEL.match(text)
    return _LEVELS.get(found[1], "info") if found else "info"


class LogRing(logging.Handler):
    """The last LOG_LINES records of the daemon's log, numbered for polling.

    Lines are kept as tuples (the fields of _LINE_FIELDS) and become dicts
    only when read: a function's lines arrive here on every call. `start`
    is random, one per daemon start: a reader that sees it change knows the
    numbering began again (the new daemon's seq may be past the old one's).
    """

    def __init__(self, capacity: int = LOG_LINES) -> None:
        super().__init__(logging.DEBUG)
        self.lines: deque[tuple] = deque(maxlen=capacity)
        self.seq = 0
        self.start = secrets.token_hex(8)
        self._guard = threading.Lock()  # records arrive from watchdog's thread too

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            message += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        with self._guard:
            self.seq += 1
            self.lines.append((self.seq, record.created, record.levelname.lower(), record.name,
                               getattr(record, "function", None),
                               getattr(record, "request_id", None), message[:4000]))

    def tap(self, entries: list[Entry]) -> None:
        """Functions' log lines, a batch a flush (faasd/logs.py writes those without `logging`)."""
        now = time.time()
        with self._guard:
            seq = self.seq
            append = self.lines.append
            for function, _, request_id, texts in entries:
                for text in texts:
                    seq += 1
                    level = _record_level(text) if text[:1] == "{" else "info"
                    append((seq, now, level, "faasd.function", function, request_id, text[:4000]))
            self.seq = seq

    def after(self, seq: int, limit: int = 500) -> tuple[list[dict[str, Any]], int]:
        with self._guard:
            lines = [line for line in self.lines if line[0] > seq][-limit:]
            last = self.seq
        return [dict(zip(_LINE_FIELDS, line)) for line in lines], last


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(value), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _error(status: int, message: str) -> web.Response:
    return _json({"message": message}, status)


def _cross_site(request: web.Request) -> bool:
    """Whether a browser sent this request for a page of another site: a form
    or script there posting to the dashboard with the Basic sign-in the browser
    keeps for it. Its Origin names another host than the one the request went
    to (or a proxy in front, X-Forwarded-Host); clients that are no browser
    send no Origin. Hosts are compared without ports: a proxy's Host often
    has none."""
    origin = request.headers.get("Origin")
    if origin is None:
        return request.headers.get("Sec-Fetch-Site") == "cross-site"
    try:
        hostname = urlsplit(origin).hostname
    except ValueError:
        return True
    if not hostname:
        return True  # "null": a sandboxed frame, a file, a redirect across sites
    hosts = [request.headers.get("Host", ""), *request.headers.getall("X-Forwarded-Host", [])]
    return not any(host_name(host.split(",")[0]) == hostname for host in hosts)


def routes(daemon: "Daemon", activity: Activity, ring: LogRing):
    async def page(request: web.Request) -> web.StreamResponse:
        return _asset("index.html")

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["asset"]
        if name not in ASSETS:
            return _error(404, f"no such dashboard file: {name}")
        return _asset(name)

    async def to_page(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently("/ui/")

    async def activity_view(request: web.Request) -> web.Response:
        from ..metrics import amqp_state, queue_stats

        view = activity.snapshot()
        view["queue"] = queue_stats(daemon, dict(daemon.registry.specs))
        view["queue_running"] = getattr(daemon, "queue", None) is not None
        view["amqp_connected"] = amqp_state(daemon)
        state = daemon.reload_state
        view["reload"] = {"succeeded": state.succeeded, "refused": state.refused,
                          "last_ok": state.last_ok, "last_at": state.last_at,
                          "last_error": state.last_error}
        return _json(view)

    async def log_view(request: web.Request) -> web.Response:
        try:
            after = int(request.query.get("after", "0"))
        except ValueError:
            return _error(400, "after must be a whole number (the last seq you have)")
        lines, last = ring.after(after)
        return _json({"lines": lines, "last": last, "start": ring.start})

    async def invoke(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if _cross_site(request):
            return _error(403, "the dashboard invokes only for its own pages: this request came "
                               "from a page of another site")
        if not valid_name(name):
            return _error(400, f"invalid function name {name!r}: use 1 to 64 of A-Z a-z 0-9 _ -")
        limit = daemon.config.server.max_body_bytes
        try:
            payload = await read_body(request, limit)
        except InvokeRefused as exc:  # too large (413); a body sent too slowly raises
            # web.HTTPRequestTimeout (408), answered as it is through the middleware
            return _error(exc.status, exc.message)
        payload = payload.strip() or b"{}"
        try:
            orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            return _error(400, f"the payload is not valid JSON: {exc}")
        if request.query.get("type") == "Event":
            queue = getattr(daemon, "queue", None)
            if queue is None:
                return _error(503, "asynchronous invocations are not available: the queue is not running")
            try:
                request_id = await queue.put(name, payload, source="console")
            except InvokeRefused as exc:
                return _error(exc.status, exc.message)
            return _json({"function": name, "requestId": request_id, "queued": True}, 202)
        try:
            invocation = await daemon.invoker.invoke(name, payload, source="console")
        except Throttled as exc:
            return _error(429, f"{exc.message} ({exc.reason})")
        except InvokeRefused as exc:
            return _error(exc.status, exc.message)
        result: Any = None
        if invocation.payload is not None:
            try:
                result = orjson.loads(invocation.payload)
            except orjson.JSONDecodeError:
                result = invocation.payload.decode(errors="replace")
        return _json({
            "function": name, "requestId": invocation.request_id, "ok": invocation.ok,
            "durationMs": round(invocation.duration_ms, 3),
            "initMs": None if invocation.init_ms is None else round(invocation.init_ms, 3),
            # 0 when no worker ran the handler (the function cannot load, its init
            # failed): there is no figure to show. A worker's run says 1 MB at least.
            "maxMemoryUsedMb": invocation.max_memory_mb or None,
            "result": result,
            "error": invocation.error.to_lambda() if invocation.error else None,
            "logTail": invocation.log_tail,
        })

    def install(app: web.Application) -> None:
        app.router.add_get("/ui", to_page)
        app.router.add_get("/ui/", page)
        app.router.add_get("/ui/{asset}", asset)
        app.router.add_get("/system/activity", activity_view)
        app.router.add_get("/system/log", log_view)
        app.router.add_post("/system/functions/{name}/invoke", invoke, expect_handler=continue_on_read)

    return install


def _asset(name: str) -> web.StreamResponse:
    return web.FileResponse(STATIC / name, headers={
        "Content-Type": ASSETS[name], "Cache-Control": "no-cache",
        # Everything the page needs is served from here; nothing else may load.
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                   "style-src 'self'; script-src 'self'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
    })


async def start(daemon: "Daemon") -> None:
    activity = Activity()
    daemon.invoker.observers.append(activity.observe)
    daemon.invoker.throttle_observers.append(activity.throttled)
    # daemon.log_ring has held the daemon's records and functions' lines since
    # the start began (Daemon.start), before this part was started.
    daemon.route_hooks.append(routes(daemon, activity, daemon.log_ring))
