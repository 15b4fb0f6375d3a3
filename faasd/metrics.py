"""`GET /metrics`: the daemon's state and history in Prometheus text format.

Counted as invocations finish (an invoker observer) or are refused (a
throttle observer):
    faasd_invocations_total{function,trigger,outcome}
        trigger: http | api | console (the dashboard) | file | cron | amqp | ...
        outcome: success | error | timeout | out_of_memory | crash | init_error
    faasd_invocation_duration_seconds{function}      histogram, handler run time
    faasd_init_duration_seconds{function}            histogram, cold-start inits
    faasd_cold_starts_total{function}
    faasd_throttles_total{function,trigger,reason}
Read from the live daemon at each scrape:
    faasd_concurrent_executions, faasd_function_concurrent_executions{function},
    faasd_concurrency_limit, faasd_workers{function,state},
    faasd_functions{state}, faasd_ready, faasd_readiness_check{check},
    faasd_async_queue_depth{function}, faasd_async_queue_running{function},
    faasd_async_queue_oldest_age_seconds{function},
    faasd_dead_letters_total{function}, faasd_async_retries_total{function},
    faasd_amqp_connected,
    faasd_config_reloads_total{result}, faasd_config_last_reload_successful,
    faasd_build_info, and the process_* / python_* collectors.

The registry is the daemon's own (not prometheus_client's global one), so
two daemons in one process, as in tests, never mix their numbers. The series
of a function that is removed from functions/ are dropped with it.
"""

from __future__ import annotations

import logging
import platform
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__
from .errors import CRASH, HANDLED, INIT, OUT_OF_MEMORY, TIMEOUT
from .invoker import Invocation
from .spec import FunctionSpec
from .workers import WorkerState

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("faasd.metrics")

OUTCOMES = {None: "success", HANDLED: "error", TIMEOUT: "timeout", OUT_OF_MEMORY: "out_of_memory",
            CRASH: "crash", INIT: "init_error"}

# Lambda handlers run from about a millisecond (warm, trivial) to 15 minutes.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 300.0, 900.0)
# An init is an interpreter start plus the user's imports: tens of ms to seconds.
INIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """One function's histogram: counts per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: a value on a bound counts in it
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        buckets, total = [], 0
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts):
            total += count
            buckets.append((bound, total))
        return buckets


class Metrics:
    """The daemon's metrics: counters fed by observers, gauges read at scrape time.

    The counters are plain dicts and lists, not prometheus_client's Counter and
    Histogram: those take a lock per value, and these run on every invocation,
    always on the event loop. They become metric families when scraped.
    """

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry(auto_describe=True)
        self.invocations: dict[tuple[str, str, str], int] = {}  # (function, trigger, outcome)
        self.durations: dict[str, Histogram] = {}
        self.inits: dict[str, Histogram] = {}
        self.cold_starts: dict[str, int] = {}
        self.throttles: dict[tuple[str, str, str], int] = {}  # (function, trigger, reason)
        self.registry.register(InvocationCollector(self))
        self.registry.register(DaemonCollector(daemon))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def observe(self, spec: FunctionSpec, invocation: Invocation, source: str) -> None:
        name = spec.name
        error = invocation.error
        key = (name, source, "success" if error is None else OUTCOMES.get(error.kind, "error"))
        counts = self.invocations
        counts[key] = counts.get(key, 0) + 1
        if error is None or error.kind != INIT or invocation.duration_ms:
            histogram = self.durations.get(name)
            if histogram is None:
                histogram = self.durations[name] = Histogram(DURATION_BUCKETS)
            histogram.observe(invocation.duration_ms / 1000)
        if invocation.init_ms is not None:
            histogram = self.inits.get(name)
            if histogram is None:
                histogram = self.inits[name] = Histogram(INIT_BUCKETS)
            histogram.observe(invocation.init_ms / 1000)
            self.cold_starts[name] = self.cold_starts.get(name, 0) + 1

    def throttled(self, spec: FunctionSpec, reason: str, source: str) -> None:
        key = (spec.name, source, reason)
        self.throttles[key] = self.throttles.get(key, 0) + 1

    def function_changed(self, old: FunctionSpec | None, new: FunctionSpec | None) -> None:
        if new is None and old is not None:
            name = old.name
            for by_labels in (self.invocations, self.throttles):
                for key in [key for key in by_labels if key[0] == name]:
                    del by_labels[key]
            for by_name in (self.durations, self.inits, self.cold_starts):
                by_name.pop(name, None)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class InvocationCollector(Collector):
    """The invocation counters and histograms, as metric families."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        invocations = CounterMetricFamily(
            "faasd_invocations", "Finished invocations, by function, trigger and outcome.",
            labels=("function", "trigger", "outcome"))
        for labels, count in sorted(metrics.invocations.items()):
            invocations.add_metric(labels, count)
        yield invocations
        for family, help_text, by_name in (
                ("faasd_invocation_duration_seconds", "Handler run time of finished invocations.",
                 metrics.durations),
                ("faasd_init_duration_seconds", "Worker init time of cold starts, including failed inits.",
                 metrics.inits)):
            histogram = HistogramMetricFamily(family, help_text, labels=("function",))
            for name, values in sorted(by_name.items()):
                histogram.add_metric((name,), values.cumulative(), values.sum)
            yield histogram
        cold = CounterMetricFamily("faasd_cold_starts", "Invocations that had to start a worker.",
                                   labels=("function",))
        for name, count in sorted(metrics.cold_starts.items()):
            cold.add_metric((name,), count)
        yield cold
        throttles = CounterMetricFamily("faasd_throttles", "Invocations refused for concurrency (HTTP 429).",
                                        labels=("function", "trigger", "reason"))
        for labels, count in sorted(metrics.throttles.items()):
            throttles.add_metric(labels, count)
        yield throttles


class DaemonCollector(Collector):
    """Gauges read from the running daemon at scrape time."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon

    def describe(self) -> Iterable[Metric]:
        return []  # only known at scrape time; skip the registry's trial collect

    def collect(self) -> Iterator[Metric]:
        daemon = self.daemon
        info = GaugeMetricFamily("faasd_build_info", "faasd's version; always 1.",
                                 labels=("version", "python"))
        info.add_metric((__version__, platform.python_version()), 1)
        yield info

        ready = GaugeMetricFamily("faasd_ready", "1 when every readiness check passes.")
        checks = GaugeMetricFamily("faasd_readiness_check", "Each readiness check: 1 ok, 0 failing.",
                                   labels=("check",))
        results = daemon.readiness()
        for name, check in results.items():
            checks.add_metric((name,), 1 if check["ok"] else 0)
        ready.add_metric((), 1 if all(c["ok"] for c in results.values()) else 0)
        yield ready
        yield checks

        specs = dict(daemon.registry.specs)
        functions = GaugeMetricFamily("faasd_functions", "Functions in functions/, by load state.",
                                      labels=("state",))
        broken = sum(1 for spec in specs.values() if spec.load_error)
        functions.add_metric(("ok",), len(specs) - broken)
        functions.add_metric(("load_error",), broken)
        yield functions

        active = GaugeMetricFamily("faasd_http_requests_in_progress",
                                   "HTTP requests being read or answered now, this scrape included.")
        active.add_metric((), daemon.http_active)
        yield active

        invoker = daemon.invoker
        total = GaugeMetricFamily("faasd_concurrent_executions", "Invocations running now.")
        total.add_metric((), invoker.inflight)
        yield total
        limit = GaugeMetricFamily("faasd_concurrency_limit", "[limits] max_concurrency.")
        limit.add_metric((), invoker.global_limit.limit or 0)
        yield limit
        per_function = GaugeMetricFamily("faasd_function_concurrent_executions",
                                         "Invocations of each function running now.",
                                         labels=("function",))
        for name, spec in sorted(specs.items()):
            per_function.add_metric((name,), invoker.function_limit(spec).used)
        yield per_function

        workers = GaugeMetricFamily("faasd_workers", "Worker processes, by function and state.",
                                    labels=("function", "state"))
        for name in sorted(specs):
            pool = daemon.pool.pools.get(name)
            counts = pool.counts() if pool else {state.value: 0 for state in WorkerState}
            for state, count in counts.items():
                workers.add_metric((name, state), count)
        yield workers

        yield from self._queue(specs)
        yield from self._amqp(results)

        reloads = CounterMetricFamily("faasd_config_reloads", "Config reloads (SIGHUP), by result.",
                                      labels=("result",))
        state = daemon.reload_state
        reloads.add_metric(("success",), state.succeeded)
        reloads.add_metric(("refused",), state.refused)
        yield reloads
        last = GaugeMetricFamily("faasd_config_last_reload_successful",
                                 "0 when the last config reload was refused.")
        last.add_metric((), 1 if state.last_ok else 0)
        yield last

    def _queue(self, specs: dict[str, FunctionSpec]) -> Iterator[Metric]:
        depth = GaugeMetricFamily("faasd_async_queue_depth",
                                  "Asynchronous events waiting or running, by function.",
                                  labels=("function",))
        age = GaugeMetricFamily("faasd_async_queue_oldest_age_seconds",
                                "Age of the oldest asynchronous event not yet done, by function.",
                                labels=("function",))
        dead = CounterMetricFamily("faasd_dead_letters",
                                   "Asynchronous events given up on and dead-lettered, by function.",
                                   labels=("function",))
        retries = CounterMetricFamily("faasd_async_retries",
                                      "Failed asynchronous attempts scheduled to run again, by function.",
                                      labels=("function",))
        running = GaugeMetricFamily("faasd_async_queue_running",
                                    "Asynchronous events being run now, by function.",
                                    labels=("function",))
        for name, stats in sorted(queue_stats(self.daemon, specs).items()):
            depth.add_metric((name,), stats["depth"])
            running.add_metric((name,), stats["running"])
            age.add_metric((name,), stats["oldest_age_s"])
            dead.add_metric((name,), stats["dead_lettered"])
            retries.add_metric((name,), stats["retried"])
        yield depth
        yield running
        yield age
        yield dead
        yield retries

    def _amqp(self, readiness: dict[str, dict[str, Any]]) -> Iterator[Metric]:
        state = amqp_state(self.daemon, readiness)
        if state is None:
            return  # AMQP not configured: no series rather than a misleading 0
        connected = GaugeMetricFamily("faasd_amqp_connected",
                                      "1 while the AMQP broker connection is up.")
        connected.add_metric((), 1 if state else 0)
        yield connected


# The async queue's figures, under the names it may give them.
_QUEUE_FIELDS = {
    "depth": ("depth",),
    "running": ("running",),
    "oldest_age_s": ("oldest_age_s", "oldest_event_age_s", "oldest_age"),
    "dead_lettered": ("dead_lettered", "dead_letters"),
    "retried": ("retried", "retries"),
}


def queue_stats(daemon: "Daemon", specs: dict[str, FunctionSpec]) -> dict[str, dict[str, float]]:
    """Per function: depth, running, oldest_age_s, dead_lettered, retried (`daemon.queue.stats()`).

    Every function has an entry (zeros when the queue is not running or has
    nothing for it), so "empty" and "not reported" look alike only when they are.
    """
    stats = {name: dict.fromkeys(_QUEUE_FIELDS, 0) for name in specs}
    reader = getattr(getattr(daemon, "queue", None), "stats", None)
    if not callable(reader):
        return stats
    try:
        for name, values in (reader() or {}).items():
            entry = stats.setdefault(name, dict.fromkeys(_QUEUE_FIELDS, 0))
            for key, spellings in _QUEUE_FIELDS.items():
                for spelling in spellings:
                    value = (values.get(spelling) if isinstance(values, dict)
                             else getattr(values, spelling, None))
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        entry[key] = value
                        break
    except Exception:
        log.exception("cannot read the async queue's figures")
    return stats


def amqp_state(daemon: "Daemon", readiness: dict[str, dict[str, Any]] | None = None) -> bool | None:
    """True/False for the broker connection, None when AMQP is not configured."""
    connected = getattr(daemon, "amqp_connected", None)
    if isinstance(connected, bool):
        return connected
    if not daemon.config.amqp.url:
        return None
    results = readiness if readiness is not None else daemon.readiness()
    check = results.get("amqp")
    return None if check is None else bool(check["ok"])


async def start(daemon: "Daemon") -> None:
    metrics = Metrics(daemon)
    daemon.metrics = metrics  # type: ignore[attr-defined]
    daemon.invoker.observers.append(metrics.observe)
    daemon.invoker.throttle_observers.append(metrics.throttled)
    daemon.registry.subscribe(metrics.function_changed)

    async def handler(request: web.Request) -> web.Response:
        started = time.perf_counter()
        body, content_type = metrics.render(request.headers.get("Accept"))
        response = web.Response(body=body, headers={"Content-Type": content_type})
        response.headers["X-Duration-Seconds"] = f"{time.perf_counter() - started:.6f}"
        return response

    daemon.route_hooks.append(lambda app: app.router.add_get("/metrics", handler))
