"""Wiring: builds every long-lived part in order, runs until a signal, unwinds in reverse.

Start:  data dirs -> memory limits -> registry (scan + watch) -> pool ->
        invoker -> HTTP app and listener -> ready.
Stop (SIGTERM/SIGINT): not ready -> stop listening and let in-flight HTTP
        calls finish (bounded by drain_timeout_s) -> drain other invocations
        -> stop every worker (frozen ones are thawed first) -> close the rest.
Signal handlers only set an event; the work happens in the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import signal
import socket
import sys
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from . import __version__, extensions
from .api import build_app
from .config import Config
from .invoker import Invoker
from .limits import MemoryLimits
from .logs import FunctionLogs
from .pool import PoolSettings, WorkerPool
from .registry import Registry
from .spec import DEFAULT_REGION
from .triggers.http import RouteTable
from .workers import WorkerEnvironment

log = logging.getLogger("faasd")


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.region = os.environ.get("AWS_REGION") or DEFAULT_REGION
        self.started_at = time.time()
        self.ready = False
        self.registry = Registry(config.paths.functions)
        self.routes = RouteTable()
        self.logs: FunctionLogs
        self.pool: WorkerPool
        self.invoker: Invoker
        self.queue: Any = None  # the asynchronous invocation queue, when running
        self.route_hooks: list[Callable[[web.Application], None]] = []
        self.readiness_checks: dict[str, Callable[[], tuple[bool, str]]] = {}
        self.describers: list[Callable[[str, dict], None]] = []
        self.isolation: dict[str, Any] = {}
        self._runner: web.AppRunner | None = None
        self._cleanups: list[Callable[[], Awaitable[None] | None]] = []
        self.address: tuple[str, int] | None = None

    # -- start / stop -----------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None) -> None:
        config = self.config
        data = config.paths.data
        for sub in ("logs", "workers"):
            (data / sub).mkdir(parents=True, exist_ok=True)
        # Tmp dirs of workers from a previous run that died with it.
        for stale in (data / "workers").iterdir():
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(data / "pycache", ignore_errors=True)

        memory = MemoryLimits.detect()
        self._cleanups.append(memory.close)
        run_as = self._resolve_run_as()
        self.isolation = {
            "memory_limit": {"mode": memory.mode, "note": memory.reason or "enforced by the kernel"},
            "run_as": {"active": run_as is not None,
                       "note": self._run_as_note(run_as)},
            "process_groups": {"active": True, "note": "each worker leads its own group; killed as one"},
        }
        log.info("faasd %s starting: functions %s, data %s", __version__, config.paths.functions, data)
        if memory.mode == "monitor":
            log.warning("memory limits by monitoring RSS, not the kernel: %s", memory.reason)
        if os.geteuid() == 0 and run_as is None:
            log.warning("running as root with no [workers] run_as: function code runs as root")

        self.logs = FunctionLogs(data / "logs")
        self._cleanups.append(self.logs.close)
        env = WorkerEnvironment(data_dir=data, memory=memory, region=self.region, run_as=run_as)
        self.pool = WorkerPool(env, PoolSettings(freeze_after_ms=config.workers.freeze_after_ms,
                                                 keep_warm_s=config.workers.keep_warm_s))
        self.pool.start()
        self._cleanups.append(self.pool.close)
        self.invoker = Invoker(self.registry, self.pool, self.logs, config.limits.max_concurrency)

        self.registry.subscribe(self.routes.function_changed)
        self.registry.subscribe(self.pool.function_changed)
        self.registry.refresh()
        self.registry.start()
        self._cleanups.append(self.registry.stop)

        for extension in extensions.load():
            await extension(self)

        app = build_app(self)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=config.workers.drain_timeout_s)
        await self._runner.setup()
        if sock is not None:
            site: web.BaseSite = web.SockSite(self._runner, sock)
        else:
            site = web.TCPSite(self._runner, config.server.host, config.server.port,
                               reuse_address=True, backlog=1024)
        await site.start()
        server = site._server  # the listening sockets, to learn the bound port
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.address = sockets[0].getsockname()[:2]
        self.ready = True
        log.info("listening on http://%s:%s with %d functions", *(self.address or ("?", "?")),
                 len(self.registry.specs))

    def on_cleanup(self, callback: Callable[[], Awaitable[None] | None]) -> None:
        """Run `callback` at shutdown, before everything started earlier."""
        self._cleanups.append(callback)

    async def stop(self) -> None:
        self.ready = False
        timeout = self.config.workers.drain_timeout_s
        log.info("shutting down: draining in-flight invocations (up to %gs)", timeout)
        if self._runner is not None:
            await self._runner.cleanup()
        if hasattr(self, "invoker") and not await self.invoker.drain(timeout):
            log.warning("drain timed out with %d invocations in flight; their workers are killed",
                        self.invoker.inflight)
        while self._cleanups:
            callback = self._cleanups.pop()
            try:
                result = callback()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("error during shutdown")
        log.info("stopped")

    # -- views -------------------------------------------------------------------------

    def _resolve_run_as(self) -> tuple[int, int] | None:
        name = self.config.workers.run_as
        if not name or os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            log.error("[workers] run_as = %r: no such user; workers run as root", name)
            return None
        return entry.pw_uid, entry.pw_gid

    def _run_as_note(self, run_as: tuple[int, int] | None) -> str:
        if run_as is not None:
            return f"workers run as {self.config.workers.run_as} (uid {run_as[0]})"
        if os.geteuid() != 0:
            return f"workers run as the daemon's own user (uid {os.geteuid()}); not root"
        return "running as root without [workers] run_as: workers run as root"

    def readiness(self) -> dict[str, dict[str, Any]]:
        checks = {"listening": {"ok": self.ready, "detail": "accepting requests" if self.ready else "not ready"}}
        for name, check in self.readiness_checks.items():
            ok, detail = check()
            checks[name] = {"ok": ok, "detail": detail}
        return checks

    def describe(self, name: str) -> dict[str, Any]:
        spec = self.registry.get(name)
        assert spec is not None
        pool = self.pool.pools.get(name)
        view = spec.to_json()
        view["routes"] = [f"/function/{name}"] + [r.template for r in self.routes.routes(name)]
        view["workers"] = pool.to_json() if pool else []
        view["worker_counts"] = pool.counts() if pool else {}
        last = pool.last_init_error if pool else None
        view["init_error"] = last.error.to_lambda() if last else None
        limiter = self.invoker.function_limit(spec)
        view["inflight"] = limiter.used
        for describer in self.describers:
            describer(name, view)
        return view

    def info(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "python": sys.version.split()[0],
            "functions_dir": str(self.config.paths.functions),
            "data_dir": str(self.config.paths.data),
            "max_concurrency": self.config.limits.max_concurrency,
            "inflight": self.invoker.inflight,
            "isolation": self.isolation,
        }


def install_event_loop() -> str:
    """uvloop when available, else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def serve(config: Config) -> int:
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await daemon.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        await daemon.stop()
        return 1
    await stop.wait()
    await daemon.stop()
    return 0


def run(config: Config) -> int:
    loop_name = install_event_loop()
    log.debug("event loop: %s", loop_name)
    return asyncio.run(serve(config))

