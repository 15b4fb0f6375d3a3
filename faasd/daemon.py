"""Wiring: builds every long-lived part in order, runs until a signal, unwinds in reverse.

Start:  data dirs -> memory limits -> registry (scan + watch) -> pool ->
        invoker -> HTTP app and listener -> ready.
Stop (SIGTERM/SIGINT): not ready -> stop listening and let in-flight HTTP
        calls finish (bounded by drain_timeout_s) -> drain other invocations
        -> stop every worker (frozen ones are thawed first) -> close the rest.
        A second SIGTERM/SIGINT (Ctrl-C again) ends the drain at once.
SIGHUP: reload the config (faasd/reload.py); a bad one is refused.
Signal handlers only set an event; the work happens in the loop. Under
systemd, serve() takes the listening socket it passes and tells it about
each step (faasd/sdnotify.py).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import pwd
import resource
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from . import __version__, auth, extensions
from .api import build_app
from .config import Config, ConfigError, http_url
from .invoker import Invoker
from .limits import MB, MemoryLimits, cgroup_name
from .logs import FunctionLogs
from .pool import PoolSettings, WorkerPool
from .registry import Registry
from .reload import ConfigLoader, ReloadHook, ReloadState, reload, status_line
from .sandbox import FunctionUsers, Sandbox, missing_python, set_daemon_undumpable, unknown_run_as
from .sdnotify import Notifier, listen_sockets
from .spec import (DEFAULT_REGION, FunctionSpec, InterpreterError, config_file_of, functions_dir_problem,
                   python_interpreter, runtime_id, this_user)
from .triggers.http import RouteTable
from .ui import LogRing
from .workers import HOST_SHORTAGES, Occasional, ReplyPoller, WorkerEnvironment, compile_shim

log = logging.getLogger("faasd")
# What is still in progress when the drain ends gets this long before it is cancelled.
HTTP_GRACE_S = 1.0
# The exit status of a daemon that must not run as configured (sysexits.h's
# EX_CONFIG): systemd/faasd.service does not restart it (RestartPreventExitStatus=).
EXIT_CONFIG = 78
# An API Gateway HTTP API takes a request line and headers of up to 10240
# bytes: a large token or a site's cookies pass aiohttp's 8190 a line.
MAX_HEADER_BYTES = 10240
# Not in use by design, or by the operator's choice: no gap to warn of at start.
NOT_ISOLATION_GAPS = {"pid_namespace", "network_namespace", "function_users", "api_auth",
                      "api_closed_to_workers"}


def check_address_free(host: str, port: int) -> None:
    """Raise ConfigError, saying what to change, if faasd cannot listen on `host`:`port`:
    another process listens there, the port needs privileges, or the host is not this
    machine's (0: any port will do)."""
    if not port:
        return
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"[server] host = {host!r} is not an address of this machine ({exc.strerror}): "
                          "set it (or --host) to one, such as 127.0.0.1, or 0.0.0.0 for all") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the site binds
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {address[0]} port {address[1]}: {exc.strerror}: "
                                  f"{_listen_fix(exc.errno, port)}") from None


def _listen_fix(code: int | None, port: int) -> str:
    if code == errno.EADDRINUSE:
        return (f"another process listens there (ss -ltnp 'sport = :{port}' names it); stop it, "
                "or set [server] port (or --port) to a free one")
    if code in (errno.EACCES, errno.EPERM):
        return ("a port below 1024 needs root or CAP_NET_BIND_SERVICE; set [server] port (or --port) "
                "to 1024 or above, or let systemd hold the port (systemd/faasd.socket)")
    if code == errno.EADDRNOTAVAIL:
        return ("no interface of this machine has that address; set [server] host (or --host) to "
                "one it has, such as 127.0.0.1, or 0.0.0.0 for all")
    return "set [server] host and port (or --host, --port) to an address faasd may listen on"


# What faasd writes in its data dir: these directories and the files and
# directories right in them (the function logs, the ledgers, dead letters).
DATA_SUBDIRS = ("logs", "workers", "triggers", "dead-letter")


def unwritable(data: Path) -> list[Path]:
    """What in the data dir faasd's user may not write: the dir, its files and
    DATA_SUBDIRS with their entries (on a file system that takes writes)."""
    try:
        entries = list(os.scandir(data))
    except OSError:
        return [data]
    found = [data] if not os.access(data, os.W_OK | os.X_OK) else []
    for entry in entries:
        if entry.name in DATA_SUBDIRS:
            try:
                inner = [entry, *os.scandir(entry.path)]
            except OSError:
                inner = [entry]
        elif entry.is_file(follow_symlinks=False):
            inner = [entry]
        else:
            continue  # a file trigger's bucket, say: its function's, not faasd's
        found += [Path(e.path) for e in inner if not os.access(e.path, os.W_OK, follow_symlinks=False)]
    return found


def _data_fix(data: Path) -> str:
    uid = os.geteuid()
    try:
        owner = pwd.getpwuid(uid).pw_name
    except KeyError:
        owner = str(uid)
    mend = (f"give it the data dir (chown -R {owner}: {data})" if os.path.lexists(data) else
            f"create the data dir for it (install -d -o {owner} {data})")
    return (f"faasd runs as {this_user()}: {mend}, or set [paths] data (or --data-dir, "
            "FAASD_PATHS_DATA) to a directory that user may write")


_DATA_ELSEWHERE = "set [paths] data (or --data-dir, FAASD_PATHS_DATA) to a directory faasd may create"
# A data dir that cannot be set up for want of a disk that takes writes. (One
# set up on a disk since full starts: its queue and logs wait for room.)
_DISK_FIXES = {
    errno.EROFS: ("its file system is mounted read-only: remount it read-write, or set [paths] "
                  "data (or --data-dir, FAASD_PATHS_DATA) to a directory on one that is not; under "
                  "systemd/faasd.service (ProtectSystem=strict) a data dir outside /var/lib/faasd "
                  "also needs a ReadWritePaths= line (systemctl edit faasd)"),
    errno.ENOSPC: ("its disk is full: free space on it, or set [paths] data (or --data-dir, "
                   "FAASD_PATHS_DATA) to a directory on a disk with room"),
    errno.EDQUOT: ("faasd's user is over its disk quota there: raise the quota, or set [paths] data "
                   "(or --data-dir, FAASD_PATHS_DATA) to a directory on another disk"),
}


class SettingsReadableWarning:
    """Registry listener under [workers] function_users: warn of each function whose
    settings hold [env] values in a file every function's user can read (others may
    read it, or run_as's group, theirs). Code must stay readable to them; settings,
    which only the daemon (root) reads, need not, and their secrets are safe from
    other functions only where they are not."""

    def __init__(self, gid: int) -> None:
        self.gid = gid
        self._warned: dict[str, tuple[str, int, int]] = {}  # name -> (file, mode, gid) warned of

    def __call__(self, old: FunctionSpec | None, new: FunctionSpec | None) -> None:
        if new is None or not new.env:
            if old is not None:
                self._warned.pop(old.name, None)
            return
        path = config_file_of(new.source)
        try:
            st = os.stat(path) if path is not None else None
        except OSError:
            st = None
        mode = st.st_mode & 0o777 if st is not None else 0
        if st is None or not (mode & 0o004 or (mode & 0o040 and st.st_gid == self.gid)):
            self._warned.pop(new.name, None)
            return
        seen = (str(path), mode, st.st_gid)
        if self._warned.get(new.name) == seen:
            return
        self._warned[new.name] = seen
        log.warning("function %s: its settings file %s holds [env] values and every function's "
                    "user can read it (mode %04o): [workers] function_users keeps them from other "
                    "functions only in a file faasd alone reads; chmod 600 it", new.name, path, mode)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.region = os.environ.get("AWS_REGION") or DEFAULT_REGION
        self.started_at = time.time()
        self.ready = False
        self.registry = Registry(config.paths.functions, config.workers.python or sys.executable)
        self.routes = RouteTable()
        self.logs: FunctionLogs
        self.log_ring = LogRing()  # the dashboard's log tail (faasd/ui)
        self.pool: WorkerPool
        self.invoker: Invoker
        self.queue: Any = None  # the asynchronous invocation queue, when running
        # Set by a stop signal, or by halt(): serve() then stops the daemon.
        self.stop_requested = asyncio.Event()
        self.exit_code = 0
        self.route_hooks: list[Callable[[web.Application], None]] = []
        self.readiness_checks: dict[str, Callable[[], tuple[bool, str]]] = {}
        self.describers: list[Callable[[str, dict], None]] = []
        self._failed_describers: set[Callable[[str, dict], None]] = set()  # logged once each
        self.reload_hooks: list[ReloadHook] = []  # see faasd/reload.py
        self.reload_state = ReloadState()
        self.isolation: dict[str, Any] = {}
        # Checks a request to an http trigger before its function runs (faasd/auth.py).
        self.http_auth: auth.TriggerAuth | None = None
        # Checks every request to the Lambda API and operator paths (faasd/auth.py).
        self.request_guard: auth.RequestGuard | None = None
        # Listening on loopback: the Host names a request may carry while no keys are set.
        self.loopback_hosts: auth.LoopbackHosts | None = None
        self._runner: web.AppRunner | None = None
        # HTTP requests in progress (kept by the middleware, faasd/api.py), and
        # whether a stop is waiting for them to end.
        self.http_active = 0
        self.http_stopping = False
        self._http_quiet = asyncio.Event()
        self._drain_cut = asyncio.Event()  # set by a second stop signal: see cut_drain()
        self._cleanups: list[Callable[[], Awaitable[None] | None]] = []
        self.address: tuple[str, int] | None = None

    # -- start / stop -----------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None) -> None:
        # The dashboard's log tail begins here: the start-up's warnings and
        # load errors are what an operator opening it most needs to see.
        log.addHandler(self.log_ring)
        self._cleanups.append(lambda: log.removeHandler(self.log_ring))
        config = self.config
        data = config.paths.data
        self._functions_dir()
        self._data_dir()
        # Tmp dirs of workers from a previous run that died with it.
        for stale in (data / "workers").iterdir():
            shutil.rmtree(stale, ignore_errors=True)

        # An open API on a public address is refused before anything starts,
        # and so is a taken address: no trigger fires for a daemon that cannot serve.
        exposure = auth.check_exposure(config, sock)
        if sock is None:
            check_address_free(config.server.host, config.server.port)
        undumpable = set_daemon_undumpable()
        raise_open_files_limit()
        memory = MemoryLimits.detect(cgroup_name(data))
        self._cleanups.append(memory.close)
        run_as = self._resolve_run_as()
        users = self._function_users(run_as)
        problem = missing_python(config.workers.python)
        if problem:  # else taken for a host without mount namespaces
            raise ConfigError(problem)
        python = config.workers.python or sys.executable
        try:  # asked once, off the loop: its version and site-packages are the workers'
            await asyncio.to_thread(python_interpreter, python)
        except InterpreterError as exc:
            raise ConfigError(f"[workers] python: {exc}") from None
        unwritten = await asyncio.to_thread(compile_shim)
        await asyncio.to_thread(runtime_id, "node")  # asks `node --version` once, off the loop
        if unwritten:
            log.debug("cannot write the bytecode of %s: Python workers compile them at each start",
                      ", ".join(str(path) for path in unwritten))
        sandbox = await asyncio.to_thread(
            Sandbox.detect, python=python, run_as=run_as, run_as_name=config.workers.run_as,
            functions_dir=config.paths.functions, data_dir=data, config_file=config.source,
            memory=memory, tmpfs=config.workers.tmpfs, users=users)
        self._cleanups.append(sandbox.close)
        if memory.mode == "monitor":
            memory_note = (f"{memory.reason}: the daemon counts every process of each worker and "
                           "its private /tmp and /dev/shm (tmpfs mounts, where mount namespaces "
                           "allow), once at init, every 50 ms during a call and at its end, and "
                           f"kills it past memory_mb; {memory.fix}")
            worker_limit = "memory limit kept by the monitor"
        else:
            memory_note = "a memory cgroup per worker, enforced by the kernel"
            worker_limit = "memory cgroup"
        self.isolation = {
            "memory_limit": {"active": True, "mode": memory.mode, "note": memory_note},
            "process_groups": {"active": True, "note": "each worker leads its own group; killed as one"},
            **sandbox.describe(memory.mode),
            "daemon_memory_private": {
                "active": undumpable,
                "note": "workers cannot ptrace the daemon or read its memory and environment"
                        if undumpable else "prctl(PR_SET_DUMPABLE) failed"},
            "api_auth": {"active": bool(config.auth.keys), "note": exposure},
            "api_closed_to_workers": self._api_from_workers(),
            "worker_templates": {
                "active": config.workers.zygote and sandbox.mount,
                "note": ("new Python workers fork from a per-revision template; each gets its own "
                         f"process group, {worker_limit}, pids limit (where pids_limit is active) "
                         "and tmpfs /tmp and /dev/shm" if config.workers.zygote and sandbox.mount else
                         "off: [workers] zygote = false" if not config.workers.zygote else
                         "off: without mount namespaces a forked worker's /tmp would escape its quota")},
        }
        log.info("faasd %s starting: functions %s, data %s", __version__, config.paths.functions, data)
        log.info("%s", exposure)
        if memory.mode == "monitor":
            log.warning("memory limits by watching each worker's memory (its processes, its /tmp and "
                        "/dev/shm), not by the kernel: %s; %s", memory.reason, memory.fix)
        if os.geteuid() == 0 and run_as is None and not config.workers.run_as:
            log.warning("running as root with no [workers] run_as: function code runs as root and "
                        "can do anything root can; set [workers] run_as = \"faasd\" (a user with "
                        "no other rights)")
        if run_as is not None and not config.auth.keys:
            # Each worker's own user keeps functions out of each other's
            # processes, not out of the API that serves every function.
            apart = ("each function runs as a uid of its own" if users is not None
                     else f"workers run as {config.workers.run_as}")
            log.warning("%s, but no [auth] keys guard the API, which function code can reach too: "
                        "any function can read another's [env] (GetFunction), invoke it and read "
                        "its logs (/system); set [auth] keys to keep functions' secrets apart", apart)
        # One line each: a note may hold its own "; ", and each gap has its own fix.
        for name, entry in self.isolation.items():
            if not entry["active"] and name not in NOT_ISOLATION_GAPS:
                log.warning("isolation not in use: %s: %s", name, entry["note"])

        quiet = config.log.level in ("warning", "error")  # function lines are info
        self.logs = FunctionLogs(data / "logs", echo_format=None if quiet else config.log.format,
                                 max_file_bytes=config.log.max_file_mb * MB,
                                 keep_files=config.log.keep_files)
        self._cleanups.append(self.logs.close)
        self.logs.taps.append(self.log_ring.tap)
        poll_s = config.workers.reply_poll_us / 1e6
        env = WorkerEnvironment(data_dir=data, memory=memory, region=self.region, run_as=run_as,
                                python=python, sandbox=sandbox, users=users,
                                replies=ReplyPoller(poll_s) if poll_s else None,
                                idle_log=self.logs.write_idle)
        self.pool = WorkerPool(env, PoolSettings(freeze_after_ms=config.workers.freeze_after_ms,
                                                 keep_warm_s=config.workers.keep_warm_s,
                                                 zygote=config.workers.zygote),
                               code=self.registry)
        self.pool.start()
        self._cleanups.append(self.pool.close)
        self.invoker = Invoker(self.registry, self.pool, self.logs, config.limits.max_concurrency)

        self.registry.subscribe(self.routes.function_changed)
        self.registry.subscribe(self.pool.function_changed)
        if users is not None:
            self.registry.subscribe(SettingsReadableWarning(users.gid))
        await self.registry.rescan()
        self.registry.start()
        self._cleanups.append(self.registry.stop)

        for extension in extensions.load():
            await extension(self)

        app = build_app(self)
        # keepalive_timeout also bounds how long a client may take to send a
        # request's headers (slow-loris): aiohttp closes a connection still
        # waiting for a complete request when it fires. Bodies are kept as
        # sent: API Gateway hands a gzip body to the handler still compressed,
        # beside its content-encoding header, and a SigV4 signature covers
        # the bytes on the wire.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=HTTP_GRACE_S,  # after _stop_http's own wait
                                     keepalive_timeout=config.server.idle_timeout_s,
                                     auto_decompress=False, max_line_size=MAX_HEADER_BYTES,
                                     max_field_size=MAX_HEADER_BYTES)
        await self._runner.setup()
        if sock is not None:
            site: web.BaseSite = web.SockSite(self._runner, sock)
        else:
            site = web.TCPSite(self._runner, config.server.host, config.server.port,
                               reuse_address=True, backlog=1024)
        await site.start()
        server = site._server  # the listening sockets, to learn the bound port
        sockets = getattr(server, "sockets", None) or []
        if sockets and sockets[0].family in (socket.AF_INET, socket.AF_INET6):
            self.address = sockets[0].getsockname()[:2]
            if auth.is_loopback(str(self.address[0])):
                self.loopback_hosts = auth.LoopbackHosts()
        # What start-up built lives as long as the daemon: moved out of the
        # collector's sight, a full collection under load scans only what
        # requests made since (without this, one took 130 ms here at 53,000
        # objects, and every request waiting then paid for it).
        gc.collect()
        gc.freeze()
        self.ready = True
        # A unix socket (socket activation) has a path, not a host and port.
        where = (http_url(*self.address) if self.address
                 else str(sockets[0].getsockname()) if sockets else "?")
        log.info("listening on %s with %d functions", where, len(self.registry.specs))

    def halt(self, reason: str) -> None:
        """Stop, as a stop signal does, and exit with EXIT_CONFIG: this node must not run as
        configured (its cluster node name is taken), and a restart would only be refused again."""
        if self.exit_code == 0:
            log.error("stopping: %s", reason)
            self.exit_code = EXIT_CONFIG
        self.stop_requested.set()

    def on_cleanup(self, callback: Callable[[], Awaitable[None] | None]) -> None:
        """Run `callback` at shutdown, before everything started earlier."""
        self._cleanups.append(callback)

    async def stop(self) -> None:
        served, self.ready = self.ready, False
        timeout = self.config.workers.drain_timeout_s
        if served:
            log.info("shutting down: draining in-flight invocations (up to %gs)", timeout)
        else:  # a start that failed: nothing was served, nothing waits
            log.info("shutting down: releasing what the start set up")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if hasattr(self, "invoker"):
            # No queued event starts from here on: one whose turn comes while
            # HTTP calls finish waits for the next start.
            self.invoker.stop_events()
        if hasattr(self, "logs"):
            self.logs.end_follows()  # else the runner's cleanup waits for each to the timeout
        if self._runner is not None:
            await self._stop_http(deadline)
        remaining = max(0.0, deadline - loop.time())
        if hasattr(self, "invoker") and not await self._unless_cut(self.invoker.drain(remaining)):
            log.warning("drain %s with %d invocations in flight; their workers are killed",
                        "cut short" if self._drain_cut.is_set() else "timed out", self.invoker.inflight)
        while self._cleanups:
            callback = self._cleanups.pop()
            try:
                result = callback()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("error during shutdown")
        log.info("stopped")

    async def _stop_http(self, deadline: float) -> None:
        """Stop listening, let the requests in progress end, then close every connection.

        aiohttp's own graceful shutdown stops reading from every connection at
        once, so a request whose body was still arriving would wait for it
        until the timeout. So first only the listening sockets close, and the
        requests in progress (uploads included) run to the deadline; each
        response from now on closes its connection (api.py's middleware).
        """
        assert self._runner is not None
        for site in list(self._runner.sites):
            await site.stop()
        self.http_stopping = True
        if self.http_active:
            self._http_quiet.clear()
            loop = asyncio.get_running_loop()

            async def quiet() -> bool:
                try:
                    await asyncio.wait_for(self._http_quiet.wait(), max(0.0, deadline - loop.time()))
                    return True
                except asyncio.TimeoutError:
                    return False

            if not await self._unless_cut(quiet()):
                log.warning("%d HTTP requests still in progress at the drain's end", self.http_active)
                if hasattr(self, "invoker"):
                    why = ("faasd stopped at once: a second stop signal" if self._drain_cut.is_set()
                           else "faasd stopped: the call ran past [workers] drain_timeout_s "
                                f"({self.config.workers.drain_timeout_s:g} s)")
                    stopped = self.invoker.stop_calls(why)
                    if stopped:
                        log.warning("%d calls still running at the drain's end: their workers are killed",
                                    stopped)
        await self._runner.cleanup()  # idle keep-alive connections; what is left, after HTTP_GRACE_S

    def cut_drain(self) -> None:
        """A second stop signal: end the drain now, as if its time had run out."""
        if not self._drain_cut.is_set():
            log.warning("a second stop signal: stopping now, without waiting for what runs")
            self._drain_cut.set()

    async def _unless_cut(self, waiting: Awaitable[bool]) -> bool:
        """What `waiting` (a wait of the drain) gives, or False once cut_drain() ends the drain."""
        task = asyncio.ensure_future(waiting)
        cut = asyncio.ensure_future(self._drain_cut.wait())
        try:
            await asyncio.wait({task, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False

    def http_request_ended(self) -> None:
        """Called by the middleware while stopping, as each request ends."""
        if self.http_active == 0:
            self._http_quiet.set()

    # -- views -------------------------------------------------------------------------

    def _functions_dir(self) -> None:
        """Create a missing functions directory, as a first run needs; refuse (ConfigError,
        as `faasd check` words it) one whose parent is missing too: a mistyped path."""
        functions = self.config.paths.functions
        try:
            missing = not functions.exists() and functions.parent.is_dir()
        except OSError:  # a directory above it this user may not search: said below
            missing = False
        if missing:
            try:
                functions.mkdir()
                log.info("created the functions directory %s", functions)
            except OSError as exc:
                raise ConfigError(f"functions: {functions} does not exist and cannot be created "
                                  f"by {this_user()}, whom faasd runs as ({exc.strerror}): create "
                                  "it, or set [paths] functions (or --functions) to the directory "
                                  "that holds them") from None
        problem = functions_dir_problem(functions)
        if problem:
            raise ConfigError(f"functions: {problem}")

    def _data_dir(self) -> None:
        """Create the data dir with its logs/ and workers/; refuse (ConfigError, with the fix)
        one this user may not write, such as one an earlier run as root left behind."""
        data = self.config.paths.data
        try:
            for sub in ("logs", "workers"):
                (data / sub).mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"data: {data} is not a directory: set [paths] data (or --data-dir, "
                              "FAASD_PATHS_DATA) to a directory faasd may write") from None
        except OSError as exc:
            fix = (_data_fix(data) if exc.errno in (errno.EACCES, errno.EPERM)
                   else _DISK_FIXES.get(exc.errno or 0, _DATA_ELSEWHERE))
            raise ConfigError(f"data: cannot create {exc.filename or data} ({exc.strerror}); "
                              f"{fix}") from None
        try:
            read_only = bool(os.statvfs(data).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        if read_only:
            # Not started without it, as on a full disk: no worker could start (each
            # makes its scratch dir in workers/), nor the queue lock its file.
            raise ConfigError(f"data: {data} cannot be written ({os.strerror(errno.EROFS)}); "
                              f"{_DISK_FIXES[errno.EROFS]}")
        refused = unwritable(data)
        if refused:
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            raise ConfigError(f"data: {refused[0]}{more} cannot be written; {_data_fix(data)}")

    def _resolve_run_as(self) -> tuple[int, int] | None:
        name = self.config.workers.run_as
        if not name:
            return None
        if os.geteuid() != 0:
            log.warning("[workers] run_as = %r is not used: it needs faasd started as root; workers "
                        "run as faasd's own user (uid %d)", name, os.geteuid())
            return None
        try:
            entry = pwd.getpwnam(name)
        except KeyError:  # not root in its place: function code would run as root
            raise ConfigError(unknown_run_as(name) or name) from None
        if entry.pw_uid == 0:  # no user of their own: as without run_as
            log.warning("[workers] run_as = %r is uid 0: function code runs as root and can do anything "
                        "root can; set run_as to a user with no other rights", name)
            return None
        return entry.pw_uid, entry.pw_gid

    def _function_users(self, run_as: tuple[int, int] | None) -> FunctionUsers | None:
        """[workers] function_users, where it can be had (root, with run_as)."""
        span = self.config.workers.function_users
        if span is None:
            return None
        if run_as is None:
            log.warning("[workers] function_users is not used: it needs faasd started as root, "
                        "with a run_as user")
            return None
        users = FunctionUsers(*span, gid=run_as[1])
        problem = users.clash()
        if problem:
            raise ConfigError(problem)
        return users

    def _api_from_workers(self) -> dict[str, Any]:
        """Whether function code is kept out of the Lambda API and /system (isolation listing)."""
        if self.config.auth.keys:
            return {"active": True,
                    "note": "the Lambda API, /system and /metrics want one of the [auth] keys, "
                            "which workers are not given"}
        return {"active": False,
                "note": "no [auth] keys: the Lambda API and /system are open to function code too, "
                        "whatever user it runs as; any function can read another's [env] "
                        "(GetFunction), invoke it and read its logs; set [auth] keys"}

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
        view["route_conflicts"] = self.routes.conflicts(name)
        view["workers"] = pool.to_json() if pool else []
        view["template"] = pool.template_json() if pool else None
        view["worker_counts"] = pool.counts() if pool else {}
        last = pool.last_init_error if pool else None
        view["init_error"] = last.error.to_lambda() if last else None
        limiter = self.invoker.function_limit(spec)
        view["inflight"] = limiter.used
        for describer in self.describers:
            try:
                describer(name, view)
            except Exception:
                if describer not in self._failed_describers:
                    self._failed_describers.add(describer)
                    log.exception("describing function %s failed in %r; its fields are left out "
                                  "of /system/functions (logged once)", name, describer)
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


def raise_open_files_limit() -> None:
    """Take the soft limit on open files up to the hard one.

    Each worker holds a few of the daemon's descriptors (its pidfd, control
    socket, output pipe and cgroup event file) and each connection one: at
    systemd's default soft limit, 1024, a burst of some two hundred workers,
    far under [limits] max_concurrency, failed its calls with EMFILE. The
    hard limit is the operator's word; workers still get 1024 (sandbox.py).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:  # a hard limit over fs.nr_open
        log.warning("cannot raise the limit on open files from %d to %d (%s): a burst of "
                    "workers may exhaust it, and its calls fail", soft, hard, exc)


class DescriptorWatch:
    """Says when faasd runs out of file descriptors, once, with the fix; and when it has some again.

    At the limit the kernel refuses every new descriptor, and nothing else
    says so: the event loop (libuv) resets each connection it cannot accept
    without a word, and workers cannot start. One open and close a second
    finds that state. A start is said at most once a minute, an end only
    after a start that was said.
    """

    PROBE_S = 1.0

    def __init__(self) -> None:
        self.short = False  # at the limit, as the last probe found
        self._told = Occasional(log)
        self._said_short = False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.PROBE_S)
            self.probe()

    def probe(self) -> None:
        try:
            os.close(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE) and not self.short:
                self.short = True
                self._said_short = self._told.error(
                    "out of file descriptors (%s, limit %d): new connections are reset unanswered "
                    "and workers cannot start until some close; %s", exc.strerror,
                    resource.getrlimit(resource.RLIMIT_NOFILE)[0], HOST_SHORTAGES[exc.errno])
            return
        if self.short:
            self.short = False
            if self._said_short:
                log.warning("file descriptors are available again: connections are accepted")


def install_event_loop() -> str:
    """uvloop when available, else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def serve(config: Config, loader: ConfigLoader | None = None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the config through `loader`.

    Under systemd: listens on the socket it passed (socket activation), and
    reports READY/RELOADING/STOPPING/STATUS and watchdog pings (faasd/sdnotify.py).
    """
    daemon = Daemon(config)
    notifier = Notifier.from_environment()
    passed = listen_sockets()
    stop = daemon.stop_requested
    hangup = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hangup.set)
    if passed:
        log.info("using the listening socket passed by systemd; [server] host and port are not used")
        for extra in passed[1:]:
            log.warning("ignoring extra socket %s passed by systemd: faasd listens on one",
                        extra.getsockname())
            extra.close()
    try:
        await daemon.start(sock=passed[0] if passed else None)
    except (OSError, ConfigError) as exc:
        log.error("cannot start: %s", exc)
        await daemon.stop()
        return 1
    notifier.ready(status_line(daemon))
    reloads = daemon.reload_state

    async def reload_on_hangup() -> None:
        while True:
            await hangup.wait()
            hangup.clear()  # SIGHUPs that arrive during a reload coalesce into one more
            if loader is None:
                log.warning("SIGHUP: no config source to reload from; ignored")
                continue
            try:
                await reload(daemon, loader, notifier, reloads)
            except Exception:  # the next SIGHUP must still find this task
                log.exception("config reload failed; the running configuration is kept")
                notifier.ready(status_line(daemon))

    watchdog = loop.create_task(notifier.run_watchdog())
    background = [loop.create_task(reload_on_hangup()),
                  loop.create_task(notifier.keep_status(lambda: status_line(daemon))),
                  loop.create_task(DescriptorWatch().run())]
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second one (Ctrl-C again): stop now
        loop.add_signal_handler(sig, daemon.cut_drain)
    notifier.stopping(f"Stopping: draining {daemon.invoker.inflight} in-flight invocations")
    for task in background:
        task.cancel()
    await daemon.stop()
    watchdog.cancel()  # pinged through the drain: a slow drain is not a hang
    await asyncio.gather(watchdog, *background, return_exceptions=True)
    notifier.close()
    return daemon.exit_code


def run(config: Config, loader: ConfigLoader | None = None) -> int:
    loop_name = install_event_loop()
    log.debug("event loop: %s", loop_name)
    return asyncio.run(serve(config, loader))

