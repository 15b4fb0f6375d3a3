"""Applying a new configuration to the running daemon (SIGHUP, `systemctl reload faasd`).

The config file is read and validated in full before anything changes: a
file that does not load is refused with one log line naming the file, the key
and the problem, and the running configuration stays as it was.

A valid config takes effect at once for what can change live (`LIVE`):
  * `[limits] max_concurrency` (waiting asynchronous calls that now fit start)
  * `[workers] freeze_after_ms`, `keep_warm_s`
  * `[log] format`, `level`, `max_file_mb`, `keep_files`; and the function log
    files are reopened (so that an external logrotate can move them)
  * `[auth] keys` (through faasd/auth.py's reload hook)
  * and the functions directory is rescanned, as if every file had changed.
Every other key was bound when the daemon started (`[server]`, `[paths]`, the
other `[workers]` keys, `[amqp] url`): a change keeps the running value until a
restart and is logged as a warning, never ignored silently; `daemon.config`
always shows what is in force. Extensions react through `daemon.reload_hooks`:
`hook(old, new)` returns the `section.key` names it took live.
"""

from __future__ import annotations

import logging
import time
from dataclasses import fields, is_dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from .config import Config, ConfigError, http_url
from .limits import MB
from .logfmt import setup_logging

if TYPE_CHECKING:
    from .daemon import Daemon
    from .sdnotify import Notifier

log = logging.getLogger("faasd.reload")

ConfigLoader = Callable[[], Config]
ReloadHook = Callable[[Config, Config], "set[str] | None"]

# section.key that take effect without a restart; every other key that
# changes keeps its running value until the next start, and is logged.
LIVE = {
    "limits.max_concurrency", "workers.freeze_after_ms", "workers.keep_warm_s",
    "log.format", "log.level", "log.max_file_mb", "log.keep_files",
    "auth.keys",  # faasd/auth.py's reload hook swaps the keys in force
}


class ReloadState:
    """What `/metrics` and `systemctl status` say about reloads."""

    def __init__(self) -> None:
        self.succeeded = 0
        self.refused = 0
        self.last_ok: bool = True
        self.last_at: float | None = None
        self.last_error: str | None = None


def changed_keys(old: Config, new: Config) -> set[str]:
    """`section.key` of every value that differs between two configs."""
    changed = set()
    for section in fields(Config):
        if section.name == "source":
            continue
        before, after = getattr(old, section.name), getattr(new, section.name)
        if not is_dataclass(before):
            if before != after:
                changed.add(section.name)
            continue
        for key in fields(before):
            if getattr(before, key.name) != getattr(after, key.name):
                changed.add(f"{section.name}.{key.name}")
    return changed


def apply(daemon: "Daemon", new: Config) -> set[str]:
    """Make `new` the running config; return the restart-only keys left at their old values."""
    old = daemon.config
    changed = changed_keys(old, new)
    taken_live: set[str] = set()
    for hook in getattr(daemon, "reload_hooks", []):
        try:
            taken_live |= hook(old, new) or set()
        except Exception:
            log.exception("a reload hook failed; the rest of the reload goes on")
    pending = changed - LIVE - taken_live

    # Keys that only a restart can change keep their running values, so that
    # daemon.config always describes what is actually in force.
    sections: dict[str, Any] = {}
    for key in pending:
        section, _, name = key.partition(".")
        if not name:
            sections[section] = getattr(old, section)
            continue
        current = sections.get(section, getattr(new, section))
        sections[section] = replace(current, **{name: getattr(getattr(old, section), name)})
    daemon.config = replace(new, **sections)

    daemon.invoker.global_limit.set_limit(new.limits.max_concurrency)
    # The other pool settings (e.g. zygote) were bound at start and stay.
    settings = replace(daemon.pool.settings, freeze_after_ms=new.workers.freeze_after_ms,
                       keep_warm_s=new.workers.keep_warm_s)
    daemon.pool.settings = settings
    for pool in daemon.pool.pools.values():
        pool.settings = settings
    if new.log != old.log:
        setup_logging(new.log.format, new.log.level)
        # Function lines are echoed by FunctionLogs itself, in the same format.
        quiet = new.log.level in ("warning", "error")
        daemon.logs.echo_format = None if quiet else new.log.format
        daemon.logs.max_file_bytes = new.log.max_file_mb * MB
        daemon.logs.keep_files = new.log.keep_files
    daemon.logs.reopen()
    daemon.registry.rescan_soon()
    return pending


async def reload(daemon: "Daemon", loader: ConfigLoader, notifier: "Notifier",
                 state: ReloadState) -> bool:
    """Reload the config from its source; True if the new one is in force.

    However it ends, it is counted, said in one log line, and followed by
    READY=1: systemd waits for that after RELOADING=1.
    """
    notifier.reloading("Reloading configuration")
    state.last_at = time.time()
    source = daemon.config.source or "built-in defaults"
    try:
        new = loader()
    except Exception as exc:
        if isinstance(exc, ConfigError):  # it names the file, the key and the problem
            problem = str(exc)
        else:
            problem = f"{source}: {type(exc).__name__}: {exc}"
            log.debug("config reload: reading %s failed", source, exc_info=True)
        log.error("config reload refused, the running configuration is kept: %s", problem)
        _refused(daemon, notifier, state, problem, "reload refused")
        return False
    try:
        pending = apply(daemon, new)
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
        log.exception("config reload failed part-way (%s); restart faasd to be sure of its config",
                      problem)
        _refused(daemon, notifier, state, problem, "reload failed")
        return False
    state.succeeded += 1
    state.last_ok = True
    state.last_error = None
    for key in sorted(pending):
        log.warning("config reload: %s changed; it takes effect at the next restart", key)
    log.info("configuration reloaded from %s", new.source or source)
    notifier.ready(status_line(daemon))
    return True


def _refused(daemon: "Daemon", notifier: "Notifier", state: ReloadState, problem: str,
             outcome: str) -> None:
    state.refused += 1
    state.last_ok = False
    state.last_error = problem
    notifier.ready(f"{status_line(daemon)}; {outcome}: {problem}")


def status_line(daemon: "Daemon") -> str:
    """One line for `systemctl status`: what the daemon is serving right now."""
    specs = daemon.registry.specs
    broken = sum(1 for spec in specs.values() if spec.load_error)
    where = http_url(*daemon.address) if daemon.address else "its socket"
    line = f"Serving {len(specs)} functions on {where}"
    if broken:
        line += f" ({broken} failed to load)"
    inflight = getattr(getattr(daemon, "invoker", None), "inflight", 0)
    if inflight:
        line += f", {inflight} in flight"
    return line
