"""Cron triggers: EventBridge schedules. Each tick becomes one `Scheduled Event` in the queue.

    [[triggers]]
    type = "cron"
    schedule = "*/5 * * * *"   # 5 fields; 6 with seconds first ("*/10 * * * * *"); rate(5 minutes);
                               # cron(0 10 ? * MON-FRI *), EventBridge's 6 fields, weekdays 1-7 from Sunday
    timezone = "Europe/Berlin" # the cron fields are local times there (default UTC)
    input = { report = "daily" }  # optional: this constant event instead of the Scheduled Event
    catch_up = 0               # after a restart, run this many of the missed ticks (1: the latest)
    overlap = "skip"           # "skip": no tick while the previous one's run is still going; "allow"

Time zones and DST: cron fields are local wall-clock times, and each local
time that matches fires once. A local time skipped by a spring-forward
change fires once, at the change (02:30 that never comes runs at 03:00); a
local time that occurs twice at a fall-back change fires once, at its first
occurrence. Several skipped times collapse into that one run. `rate(N unit)`
is an interval in absolute time, aligned to the Unix epoch (rate(5 minutes)
fires at :00, :05, ... UTC) so that restarts do not shift it; DST does not
affect it.

Precision: the scheduler sleeps on the event loop until the tick's instant
and hands the event to the queue at once; `state()` reports how late the
last and the worst tick were woken. If the daemon was suspended or the
clock jumped so that ticks were missed, they are skipped (and logged),
except for `catch_up` at start.

In a cluster (faasd/cluster/lease.py) only the node holding the schedule
lease queues ticks. The others note each tick that passes while another node
holds the lease, until that node's heartbeat says it fired it. A node that
takes the lease fires the noted ticks not known fired, with their own
instant and request id, whatever `catch_up` says: the old owner may have
died before them while it still held the lease (the broker notices a dead
machine only when its AMQP heartbeat runs out). Delivery is at least once,
as EventBridge's: a tick fired after the old owner's last heartbeat runs
again, with the same request id. `catch_up` then runs for the ticks that
passed while no node fired them (the whole cluster down, or its broker).

Overlap: a tick's run is "still going" from the tick until its event
finally succeeded or was dead-lettered (retries included). Ticks run by
`catch_up` ignore it. The last tick of each schedule is kept in
`<data-dir>/triggers/cron.db` for `catch_up`.

The clock is injectable (`Clock`): tests drive DST transitions through a
fake one instead of waiting for them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Coroutine, Protocol
from zoneinfo import ZoneInfo

import orjson
from croniter import CroniterBadDateError, croniter

from ..spec import ACCOUNT_ID, FunctionSpec, Trigger
from .base import RunningTrigger, StateFile, TriggerSource, queue_of
from .options import cron_fields, parse_rate

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger("faasd.triggers.cron")

# Sleep in slices no longer than this, so that a wall-clock step (NTP, a
# suspend) is noticed before the tick rather than after it.
MAX_SLEEP_S = 30.0
# A tick woken later than this is counted as missed (suspend, clock jump).
MISSED_AFTER_S = 5.0
# Bound on the croniter steps one lookup may take (a fall-back hour of a
# per-second schedule is 3,600).
MAX_STEPS = 100_000
# A tick noted while another node held the schedules and not known fired after
# this long is taken as fired: a dead owner loses the lease well within it
# (two AMQP heartbeats), and an owner alive all along fired it but did not
# say so (an older faasd, or the function does not load there).
HELD_ELSEWHERE_S = 30.0
REQUEST_ID_NAMESPACE = uuid.UUID("0b7f2d6c-51a4-4f0e-8a3e-c9d2e1f40a57")

CRON_SCHEMA = """
CREATE TABLE IF NOT EXISTS ticks (
    schedule TEXT PRIMARY KEY,    -- function, schedule and time zone
    last_tick REAL NOT NULL,      -- the scheduled instant (Unix time) of the last queued tick
    request_id TEXT NOT NULL,
    queued_at REAL NOT NULL
) WITHOUT ROWID;
"""


class Clock(Protocol):
    def now(self) -> float:
        """Unix time, in seconds."""

    async def sleep_until(self, when: float) -> None:
        """Return at `when` (Unix time) or soon after."""


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep_until(self, when: float) -> None:
        while True:
            delay = when - time.time()
            if delay <= 0:
                return
            await asyncio.sleep(min(delay, MAX_SLEEP_S))


class Schedule:
    """When a cron expression or a rate fires, as Unix instants."""

    def __init__(self, expression: str, tz: str = "UTC") -> None:
        self.expression = expression
        self.timezone = tz
        self.tz = ZoneInfo(tz)
        self.interval = parse_rate(expression)
        if self.interval is None:
            self.cron, self.seconds = cron_fields(expression)
            croniter(self.cron, second_at_beginning=self.seconds)  # raises on a bad expression

    def __repr__(self) -> str:
        return f"Schedule({self.expression!r}, {self.timezone!r})"

    def _iter(self, start: datetime) -> croniter:
        return croniter(self.cron, start, second_at_beginning=self.seconds, ret_type=datetime)

    def local(self, instant: float) -> datetime:
        """The naive local wall-clock time at `instant` (whole seconds)."""
        return datetime.fromtimestamp(math.floor(instant), self.tz).replace(tzinfo=None)

    def instant(self, local: datetime) -> float:
        """When a local wall-clock time happens: once, the first time, or at the DST gap's end."""
        early = local.replace(tzinfo=self.tz, fold=0).timestamp()
        late = local.replace(tzinfo=self.tz, fold=1).timestamp()
        if early == late:
            return early
        if self.local(early) == local and self.local(late) == local:
            return min(early, late)  # repeated by a fall-back change: the first occurrence
        # Skipped by a spring-forward change: fold=1 lands before the gap and
        # fold=0 after it; the change itself is the first instant past `local`.
        low, high = int(min(early, late)), int(math.ceil(max(early, late)))
        while high - low > 1:
            middle = (low + high) // 2
            if self.local(middle) > local:
                high = middle
            else:
                low = middle
        return float(high)

    def next_after(self, after: float) -> float | None:
        """The first tick strictly after `after`; None once there is none (the
        last year of a `cron(...)` schedule with a Year field has passed)."""
        if self.interval is not None:
            return float((math.floor(after / self.interval) + 1) * self.interval)
        ticks = self._iter(self.local(after))
        for _ in range(MAX_STEPS):
            try:
                local = ticks.get_next()
            except CroniterBadDateError:
                return None
            when = self.instant(local)
            if when > after:
                return when
        raise RuntimeError(f"{self!r}: no tick found after {after}")

    def recent(self, after: float, until: float, limit: int) -> list[float]:
        """Up to `limit` latest ticks in (after, until], oldest first."""
        found: list[float] = []
        if limit <= 0 or until <= after:
            return found
        if self.interval is not None:
            tick = math.floor(until / self.interval) * self.interval
            while tick > after and len(found) < limit:
                found.append(float(tick))
                tick -= self.interval
            return found[::-1]
        ticks = self._iter(self.local(until) + _ONE_SECOND)
        for _ in range(MAX_STEPS):
            when = self.instant(ticks.get_prev())
            if when <= after:
                break
            if when <= until and when not in found:
                found.append(when)
                if len(found) >= limit:
                    break
        return sorted(found)


_ONE_SECOND = timedelta(seconds=1)


def iso_seconds(instant: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(instant))


def scheduled_event(*, request_id: str, instant: float, region: str, rule: str) -> dict[str, Any]:
    """The EventBridge `Scheduled Event` Lambda receives."""
    return {
        "version": "0",
        "id": request_id,
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": ACCOUNT_ID,
        "time": iso_seconds(instant),
        "region": region,
        "resources": [f"arn:aws:events:{region}:{ACCOUNT_ID}:rule/{rule}"],
        "detail": {},
    }


class TickStore(StateFile):
    """The last queued tick of each schedule, for catch_up after a restart."""

    schema = CRON_SCHEMA

    def last(self, key: str) -> float | None:
        row = self.db.execute("SELECT last_tick FROM ticks WHERE schedule = ?", (key,)).fetchone()
        return row[0] if row else None

    def record(self, key: str, instant: float, request_id: str) -> None:
        self.db.execute(
            "INSERT INTO ticks VALUES (?, ?, ?, ?) ON CONFLICT(schedule) DO UPDATE SET "
            "last_tick = max(last_tick, excluded.last_tick), request_id = excluded.request_id, "
            "queued_at = excluded.queued_at", (key, instant, request_id, time.time()))


# put(function, payload, request_id=..., source=..., on_done=...) -> request id
Submit = Callable[..., Awaitable[str]]


class CronTrigger(RunningTrigger):
    def __init__(self, *, function: str, options: dict[str, Any], index: int, clock: Clock,
                 submit: Submit, store: TickStore, region: str,
                 owner: Callable[[], bool] | None = None,
                 elsewhere: Callable[[], bool] | None = None,
                 fired_elsewhere: Callable[[str], float | None] | None = None,
                 decided: dict[str, float] | None = None) -> None:
        self.function = function
        # In a cluster only the node that owns the schedules queues ticks (faasd/cluster/lease.py);
        # `elsewhere` says whether another node holds them now, `fired_elsewhere`
        # the last tick of a schedule another node is known to have fired.
        self.owner: Callable[[], bool] = owner or (lambda: True)
        self.elsewhere: Callable[[], bool] = elsewhere or (lambda: False)
        self.fired_elsewhere: Callable[[str], float | None] = fired_elsewhere or (lambda key: None)
        self.standby = 0  # ticks left to the node that owns the schedules
        self.held: list[float] = []  # of those, the ticks not yet known fired
        self.taken_over = 0  # ticks fired on taking the schedules over
        # The last tick this node fired or skipped, per schedule: shared by the
        # source's triggers, and kept after they stop (a node hands the lease over last).
        self.decided: dict[str, float] = decided if decided is not None else {}
        self.index = index
        self.schedule = Schedule(options["schedule"], options.get("timezone", "UTC"))
        self.input = options.get("input")
        self.catch_up: int = options.get("catch_up", 0)
        self.overlap: str = options.get("overlap", "skip")
        self.clock = clock
        self.submit = submit
        self.store = store
        self.region = region
        self.key = f"{function}|{self.schedule.expression}|{self.schedule.timezone}"
        self.rule = f"{function}-cron-{index}"
        self.running: dict[str, float] = {}  # request id -> tick, until its outcome
        self._task: asyncio.Task | None = None
        self._puts: set[asyncio.Task] = set()
        self._catching_up = asyncio.Lock()
        self.next_at: float | None = None
        self.fired = 0
        self.skipped = 0
        self.missed = 0
        self.failed = 0
        self.caught_up = 0
        self.last_tick: float | None = None
        self.last_lateness_ms: float | None = None
        self.max_lateness_ms = 0.0
        self.last_error: str | None = None
        self.status = "starting"

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.status = "failed"
            self.last_error = repr(task.exception())
            log.error("function %s: cron schedule %s stopped: %r", self.function,
                      self.schedule.expression, task.exception())

    async def stop(self) -> None:
        self.status = "stopped"
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._puts:
            await asyncio.wait(self._puts, timeout=5)

    def state(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "schedule": self.schedule.expression,
            "timezone": self.schedule.timezone,
            "next": iso_seconds(self.next_at) if self.next_at else None,
            "last_tick": iso_seconds(self.last_tick) if self.last_tick else None,
            "fired": self.fired,
            "skipped_overlap": self.skipped,
            "missed": self.missed,
            "caught_up": self.caught_up,
            "standby": self.standby,
            "taken_over": self.taken_over,
            "failed": self.failed,
            "running": len(self.running),
            "last_lateness_ms": self.last_lateness_ms,
            "max_lateness_ms": round(self.max_lateness_ms, 3),
            "last_error": self.last_error,
        }

    async def _run(self) -> None:
        self.status = "scheduled"
        now = self.clock.now()
        if self.catch_up and self.owner():
            await self._catch_up(now)
        tick = self.schedule.next_after(now)
        while tick is not None:
            self.next_at = tick
            await self.clock.sleep_until(tick)
            woke = self.clock.now()
            lateness = woke - tick
            if lateness > MISSED_AFTER_S:
                # Suspended, or the clock stepped forward: those ticks are gone.
                self.missed += 1
                next_tick = self.schedule.next_after(woke)
                log.warning("function %s: cron tick of %s missed (woke %.1fs late); next tick %s",
                            self.function, iso_seconds(tick), lateness,
                            iso_seconds(next_tick) if next_tick is not None else "none")
                tick = next_tick
                continue
            self.last_lateness_ms = round(lateness * 1000, 3)
            self.max_lateness_ms = max(self.max_lateness_ms, lateness * 1000)
            self._tick(tick)
            tick = self.schedule.next_after(tick)
        self.status = "ended"
        self.next_at = None
        log.info("function %s: cron schedule %s has no tick left (its last year has passed)",
                 self.function, self.schedule.expression)

    async def _catch_up(self, until: float) -> None:
        """Queue the latest `catch_up` ticks up to `until` that came after the last one queued."""
        async with self._catching_up:
            last = self.store.last(self.key)
            if last is None:
                return
            for tick in self.schedule.recent(last, until, self.catch_up):
                log.info("function %s: catching up the tick of %s missed while faasd was down",
                         self.function, iso_seconds(tick))
                self.caught_up += 1
                await self._put(tick, catching_up=True)

    def schedules_taken(self) -> None:
        """This node has just taken the cluster's schedules: fire the ticks the old
        owner is not known to have fired, then catch up the ticks that passed
        while no node fired them (the whole cluster down, or its broker)."""
        if self._task is None or self._task.done():
            return
        self._confirm()
        held, self.held = self.held, []
        if not held and not self.catch_up:
            return
        now = self.clock.now()
        # The tick the loop waits for is its own to fire, even if due this instant.
        until = min(now, self.next_at - 0.001) if self.next_at is not None else now
        self._spawn(self._take_over(held, until))

    async def _take_over(self, held: list[float], until: float) -> None:
        async with self._catching_up:
            for tick in held:
                log.info("function %s: firing the tick of %s, which the node that held the "
                         "schedules is not known to have fired", self.function, iso_seconds(tick))
                self.taken_over += 1
                await self._put(tick)
        if self.catch_up:
            await self._catch_up(until)

    def _confirm(self) -> None:
        """Forget the held ticks another node is known to have fired, or that are
        too old to be lost (HELD_ELSEWHERE_S); note the latest as this schedule's last."""
        known = [t for t in self.held if t < self.clock.now() - HELD_ELSEWHERE_S]
        fired = self.fired_elsewhere(self.key)
        if fired is not None:
            known.append(fired)
        if known:
            settled = max(known)
            self.held = [t for t in self.held if t > settled]
            self.store.record(self.key, settled, "")

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._puts.add(task)
        task.add_done_callback(self._puts.discard)

    def _tick(self, tick: float) -> None:
        if not self.owner():
            self.standby += 1
            if self.elsewhere():
                # The owner's to fire; this node's if the owner turns out dead.
                self.held.append(tick)
            self._confirm()
            return
        self._decide(tick)
        if self.overlap == "skip" and self.running:
            self.skipped += 1
            log.info("function %s: cron tick of %s skipped: the run of %s is still going "
                     "(overlap = \"skip\")", self.function, iso_seconds(tick),
                     iso_seconds(max(self.running.values())))
            # Its time has come and gone: a restart's catch_up does not run it (no request id).
            self.store.record(self.key, tick, "")
            return
        self._spawn(self._put(tick))

    def _decide(self, tick: float) -> None:
        # Said at once (in heartbeats, in the token handed over), before the event is queued.
        self.decided[self.key] = max(tick, self.decided.get(self.key, tick))

    async def _put(self, tick: float, *, catching_up: bool = False) -> None:
        self._decide(tick)
        # One id per trigger (rule) and instant: the same tick is the same event,
        # and two triggers of one function on one schedule are two events.
        request_id = str(uuid.uuid5(REQUEST_ID_NAMESPACE, f"{self.key}|{self.rule}:{tick:.3f}"))
        if self.input is not None:
            payload = orjson.dumps(self.input)
        else:
            payload = orjson.dumps(scheduled_event(request_id=request_id, instant=tick,
                                                   region=self.region, rule=self.rule))
        self.running[request_id] = tick
        try:
            await self.submit(self.function, payload, request_id=request_id, source="cron",
                              on_done=lambda outcome: self._done(request_id))
        except Exception as exc:
            self.running.pop(request_id, None)
            self.failed += 1
            self.last_error = f"tick of {iso_seconds(tick)} not queued: {exc}"
            log.error("function %s: cron tick of %s not queued: %s", self.function,
                      iso_seconds(tick), exc)
            return
        self.fired += 1
        self.last_tick = tick
        self.store.record(self.key, tick, request_id)

    def _done(self, request_id: str) -> None:
        self.running.pop(request_id, None)


class CronSource(TriggerSource):
    kind = "cron"

    def __init__(self, daemon: "Daemon", clock: Clock | None = None) -> None:
        super().__init__(daemon)
        self.clock = clock or SystemClock()
        self.store: TickStore = TickStore(daemon.config.paths.data / "triggers" / "cron.db")
        # A cluster's (faasd/cluster/lease.py).
        self.decided: dict[str, float] = {}  # see CronTrigger.decided
        taken = getattr(daemon, "schedules_taken", None)
        if taken is not None:
            taken.append(self.schedules_taken)
        fired = getattr(daemon, "schedules_fired", None)
        if fired is not None:
            fired.append(self.fired_ticks)

    def schedules_taken(self) -> None:
        for _, trigger in list(self.running.values()):
            trigger.schedules_taken()  # type: ignore[attr-defined]

    def fired_ticks(self) -> dict[str, float]:
        """The last tick this node fired or skipped of each schedule."""
        return dict(self.decided)

    def create(self, spec: FunctionSpec, trigger: Trigger, index: int) -> CronTrigger:
        daemon = self.daemon

        async def submit(function: str, payload: bytes, **kwargs: Any) -> str:
            return await queue_of(daemon).put(function, payload, **kwargs)

        return CronTrigger(function=spec.name, options=dict(trigger.options), index=index,
                           clock=self.clock, submit=submit, store=self.store, region=daemon.region,
                           owner=getattr(daemon, "schedule_owner", None),
                           elsewhere=getattr(daemon, "schedules_elsewhere", None),
                           fired_elsewhere=getattr(daemon, "schedules_fired_elsewhere", None),
                           decided=self.decided)

    async def close(self) -> None:
        await super().close()
        self.store.close()


async def start(daemon: "Daemon") -> None:
    """Extension entry point: cron triggers for every function that has them."""
    source = CronSource(daemon)
    daemon.cron_triggers = source  # type: ignore[attr-defined]
    await source.attach()
