"""Cron triggers: DST rules through an injected clock, and real ticks through a real daemon."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from faasd.spec import load_spec
from faasd.triggers.cron import CronTrigger, Schedule, TickStore
from support import ROOT, fill, small_disk, wait_until, write_function


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def iso(instant: float) -> str:
    return datetime.fromtimestamp(instant, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def ticks(schedule: Schedule, start: str, count: int) -> list[str]:
    found, instant = [], utc(start)
    for _ in range(count):
        instant = schedule.next_after(instant)
        found.append(iso(instant))
    return found


# -- schedules and DST (pure) ----------------------------------------------------------

def test_a_local_time_skipped_by_spring_forward_fires_once_at_the_change():
    # Europe/Berlin, 2024-03-31: 02:00 CET becomes 03:00 CEST (01:00 UTC); 02:30 never happens.
    daily = Schedule("30 2 * * *", "Europe/Berlin")
    assert ticks(daily, "2024-03-29 12:00:00", 3) == [
        "2024-03-30 01:30:00",  # 02:30 CET
        "2024-03-31 01:00:00",  # the change itself, 03:00 CEST
        "2024-04-01 00:30:00",  # 02:30 CEST
    ]
    # Every 15 minutes in New York, 2024-03-10: 02:00-02:59 EST do not exist;
    # the four skipped times collapse into one run at the change (07:00 UTC).
    quarter = Schedule("*/15 * * * *", "America/New_York")
    assert ticks(quarter, "2024-03-10 06:30:00", 4) == [
        "2024-03-10 06:45:00",  # 01:45 EST
        "2024-03-10 07:00:00",  # 03:00 EDT (02:00, 02:15, 02:30, 02:45 and 03:00 at once)
        "2024-03-10 07:15:00",  # 03:15 EDT
        "2024-03-10 07:30:00",
    ]


def test_a_local_time_repeated_by_fall_back_fires_once_at_its_first_occurrence():
    # Europe/Berlin, 2024-10-27: 03:00 CEST becomes 02:00 CET (01:00 UTC); 02:30 happens twice.
    daily = Schedule("30 2 * * *", "Europe/Berlin")
    assert ticks(daily, "2024-10-25 12:00:00", 3) == [
        "2024-10-26 00:30:00",  # 02:30 CEST
        "2024-10-27 00:30:00",  # the first 02:30 (CEST); not again at 01:30 UTC
        "2024-10-28 01:30:00",  # 02:30 CET
    ]
    half_hourly = Schedule("*/30 * * * *", "Europe/Berlin")
    assert ticks(half_hourly, "2024-10-26 23:15:00", 5) == [
        "2024-10-26 23:30:00",  # 01:30 CEST
        "2024-10-27 00:00:00",  # 02:00 CEST
        "2024-10-27 00:30:00",  # 02:30 CEST
        "2024-10-27 02:00:00",  # 03:00 CET: 02:00 and 02:30 CET were already run
        "2024-10-27 02:30:00",
    ]
    # Starting inside the repeated hour (second pass) does not run those times again.
    assert ticks(half_hourly, "2024-10-27 01:10:00", 1) == ["2024-10-27 02:00:00"]


def test_seconds_rates_and_utc():
    assert ticks(Schedule("*/20 * * * * *"), "2024-01-01 00:00:05", 3) == [
        "2024-01-01 00:00:20", "2024-01-01 00:00:40", "2024-01-01 00:01:00"]
    assert ticks(Schedule("0 12 * * MON", "UTC"), "2024-01-01 12:00:00", 1) == ["2024-01-08 12:00:00"]
    # Rates are absolute intervals aligned to the epoch: DST does not bend them.
    assert ticks(Schedule("rate(5 minutes)"), "2024-01-01 00:07:00", 2) == [
        "2024-01-01 00:10:00", "2024-01-01 00:15:00"]
    assert ticks(Schedule("rate(1 hour)", "Europe/Berlin"), "2024-03-31 00:30:00", 3) == [
        "2024-03-31 01:00:00", "2024-03-31 02:00:00", "2024-03-31 03:00:00"]
    assert ticks(Schedule("rate(2 days)"), "2024-01-01 00:00:00", 1) == ["2024-01-02 00:00:00"]


def test_eventbridge_cron_expressions_fire_as_on_aws():
    # EventBridge numbers weekdays 1-7 from Sunday and puts ? in Day-of-month or Day-of-week.
    monday = "2026-12-07 00:00:00"
    assert ticks(Schedule("cron(0 10 * * ? *)"), monday, 2) == ["2026-12-07 10:00:00", "2026-12-08 10:00:00"]
    assert ticks(Schedule("cron(0 12 ? * 1 *)"), monday, 1) == ["2026-12-13 12:00:00"]  # Sunday
    assert ticks(Schedule("cron(15 12 ? * 2-6 *)"), "2026-12-11 13:00:00", 2) == [  # Friday, then Monday
        "2026-12-14 12:15:00", "2026-12-15 12:15:00"]
    assert ticks(Schedule("cron(0/30 8 ? * MON-FRI *)"), monday, 2) == ["2026-12-07 08:00:00", "2026-12-07 08:30:00"]
    assert ticks(Schedule("cron(0 18 ? * 6L *)"), monday, 2) == [  # the month's last Friday
        "2026-12-25 18:00:00", "2027-01-29 18:00:00"]
    assert ticks(Schedule("cron(0 9 ? * 3#2 *)"), monday, 1) == ["2026-12-08 09:00:00"]  # its second Tuesday
    assert ticks(Schedule("cron(0 12 L * ? *)"), monday, 1) == ["2026-12-31 12:00:00"]
    assert ticks(Schedule("cron(0 12 15W * ? *)"), "2027-05-01 00:00:00", 1) == ["2027-05-14 12:00:00"]
    yearly = Schedule("cron(0 0 1 1 ? 2028-2029)")
    assert ticks(yearly, monday, 2) == ["2028-01-01 00:00:00", "2029-01-01 00:00:00"]
    assert yearly.next_after(utc("2029-06-01 00:00:00")) is None


def test_eventbridge_weekday_steps_count_from_the_weekday_they_name():
    monday = "2026-12-07 00:00:00"
    # 3/2: Tuesday, then every second day of the week (Tuesday, Thursday, Saturday).
    assert ticks(Schedule("cron(0 10 ? * 3/2 *)"), monday, 4) == [
        "2026-12-08 10:00:00", "2026-12-10 10:00:00", "2026-12-12 10:00:00", "2026-12-15 10:00:00"]
    # 2-7/2: Monday, Wednesday, Friday; Sunday is not in the range.
    assert ticks(Schedule("cron(0 10 ? * 2-7/2 *)"), monday, 4) == [
        "2026-12-07 10:00:00", "2026-12-09 10:00:00", "2026-12-11 10:00:00", "2026-12-14 10:00:00"]
    # 1-6/3: Sunday and Wednesday.
    assert ticks(Schedule("cron(0 10 ? * 1-6/3 *)"), monday, 3) == [
        "2026-12-09 10:00:00", "2026-12-13 10:00:00", "2026-12-16 10:00:00"]


def test_recent_ticks_for_catch_up():
    schedule = Schedule("0 * * * *")
    recent = schedule.recent(utc("2024-01-01 00:30:00"), utc("2024-01-01 05:10:00"), 2)
    assert [iso(t) for t in recent] == ["2024-01-01 04:00:00", "2024-01-01 05:00:00"]
    assert schedule.recent(utc("2024-01-01 05:00:00"), utc("2024-01-01 05:10:00"), 1) == []
    rate = Schedule("rate(10 minutes)")
    assert [iso(t) for t in rate.recent(utc("2024-01-01 00:00:00"), utc("2024-01-01 00:35:00"), 1)] == [
        "2024-01-01 00:30:00"]
    # The collapsed spring-forward times are one tick here too.
    quarter = Schedule("*/15 * * * *", "America/New_York")
    assert [iso(t) for t in quarter.recent(utc("2024-03-10 06:50:00"), utc("2024-03-10 07:10:00"), 5)] == [
        "2024-03-10 07:00:00"]


# -- the runner, with an injected clock -----------------------------------------------

class FakeClock:
    """Time that jumps straight to whatever the scheduler waits for."""

    def __init__(self, start: float) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    async def sleep_until(self, when: float) -> None:
        self.t = max(self.t, when)
        await asyncio.sleep(0)


class Submissions:
    """Stands in for the queue: records what is put, finishes runs when told."""

    def __init__(self, finish_at_once: bool = True) -> None:
        self.items: list[tuple[str, dict, str]] = []
        self.callbacks: list[Any] = []
        self.finish_at_once = finish_at_once

    async def __call__(self, function: str, payload: bytes, *, request_id: str, source: str,
                       on_done: Any) -> str:
        assert source == "cron"
        self.items.append((function, json.loads(payload), request_id))
        if self.finish_at_once:
            on_done(None)
        else:
            self.callbacks.append(on_done)
        return request_id


async def run_until(trigger: CronTrigger, submissions: Submissions, count: int) -> None:
    await trigger.start()
    for _ in range(100_000):
        if len(submissions.items) >= count:
            break
        await asyncio.sleep(0)
    await trigger.stop()


def make_trigger(tmp_path: Path, clock: FakeClock, submit: Submissions, **options: Any) -> CronTrigger:
    return CronTrigger(function="report", options={"timezone": "UTC", **options}, index=0,
                       clock=clock, submit=submit, store=tick_store(tmp_path),
                       region="eu-central-1")


def tick_store(tmp_path: Path) -> TickStore:
    store = TickStore(tmp_path / "cron.db")
    store.open()
    return store


async def test_the_scheduler_fires_each_local_time_once_across_both_dst_changes(tmp_path):
    clock = FakeClock(utc("2024-03-29 12:00:00"))
    submit = Submissions()
    trigger = make_trigger(tmp_path, clock, submit, schedule="30 2 * * *", timezone="Europe/Berlin")
    await run_until(trigger, submit, 3)
    times = [event["time"] for _, event, _ in submit.items[:3]]
    assert times == ["2024-03-30T01:30:00Z", "2024-03-31T01:00:00Z", "2024-04-01T00:30:00Z"]
    function, event, request_id = submit.items[0]
    assert function == "report"
    assert event == {
        "version": "0", "id": request_id, "detail-type": "Scheduled Event", "source": "aws.events",
        "account": "000000000000", "time": "2024-03-30T01:30:00Z", "region": "eu-central-1",
        "resources": ["arn:aws:events:eu-central-1:000000000000:rule/report-cron-0"], "detail": {},
    }

    clock = FakeClock(utc("2024-10-26 23:10:00"))
    submit = Submissions()
    trigger = make_trigger(tmp_path, clock, submit, schedule="*/30 * * * *", timezone="Europe/Berlin")
    await run_until(trigger, submit, 5)
    assert [event["time"] for _, event, _ in submit.items[:5]] == [
        "2024-10-26T23:30:00Z", "2024-10-27T00:00:00Z", "2024-10-27T00:30:00Z",
        "2024-10-27T02:00:00Z", "2024-10-27T02:30:00Z"]
    assert len({request_id for _, _, request_id in submit.items}) == len(submit.items)


async def test_a_schedule_whose_last_year_has_passed_ends_without_firing(tmp_path):
    submit = Submissions()
    trigger = make_trigger(tmp_path, FakeClock(utc("2026-12-07 00:00:00")), submit,
                           schedule="cron(0 0 1 * ? 2020-2025)")
    await trigger.start()
    for _ in range(100):
        await asyncio.sleep(0)
    assert trigger.state()["status"] == "ended" and trigger.state()["next"] is None
    assert submit.items == [] and trigger.last_error is None
    await trigger.stop()


async def test_overlap_skips_ticks_while_the_previous_run_goes_on_unless_allowed(tmp_path):
    clock = FakeClock(utc("2024-01-01 00:00:00"))
    submit = Submissions(finish_at_once=False)
    trigger = make_trigger(tmp_path, clock, submit, schedule="* * * * *")
    await trigger.start()
    for _ in range(200):
        await asyncio.sleep(0)
    # The first run never finished: every later tick was skipped.
    assert len(submit.items) == 1 and trigger.skipped > 5
    submit.callbacks[0](None)
    submit.finish_at_once = True
    for _ in range(200):
        await asyncio.sleep(0)
    await trigger.stop()
    assert len(submit.items) > 5

    submit = Submissions(finish_at_once=False)
    trigger = make_trigger(tmp_path, FakeClock(utc("2024-01-01 00:00:00")), submit,
                           schedule="* * * * *", overlap="allow")
    await run_until(trigger, submit, 5)
    assert trigger.skipped == 0 and len(submit.items) >= 5


async def test_a_tick_skipped_for_overlap_is_not_caught_up_after_a_restart(tmp_path):
    clock = FakeClock(utc("2024-01-01 00:00:30"))
    submit = Submissions(finish_at_once=False)
    trigger = make_trigger(tmp_path, clock, submit, schedule="* * * * *")
    await trigger.start()
    for _ in range(50):
        await asyncio.sleep(0)
    await trigger.stop()
    assert len(submit.items) == 1 and trigger.skipped >= 3  # 00:01 runs on; the next ticks skip
    last_skipped = tick_store(tmp_path).last(trigger.key)
    assert last_skipped is not None and last_skipped > utc("2024-01-01 00:03:00")
    # Restarted half a minute after the last tick that came (skipped): nothing was missed
    # while down, so catch_up runs nothing; before, it ran a skipped tick as if missed.
    clock = FakeClock(last_skipped + 30)
    submit = Submissions()
    trigger = make_trigger(tmp_path, clock, submit, schedule="* * * * *", catch_up=1)
    await run_until(trigger, submit, 1)
    assert trigger.caught_up == 0
    assert submit.items[0][1]["time"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last_skipped + 60))


async def test_ticks_missed_by_a_suspend_are_skipped_not_run_late(tmp_path):
    class Suspending(FakeClock):
        suspended = False

        async def sleep_until(self, when: float) -> None:
            await super().sleep_until(when)
            if not self.suspended:
                self.suspended = True
                self.t += 600  # the machine slept through ten minutes

    submit = Submissions()
    trigger = make_trigger(tmp_path, Suspending(utc("2024-01-01 00:00:30")), submit, schedule="* * * * *")
    await run_until(trigger, submit, 1)
    assert submit.items[0][1]["time"] == "2024-01-01T00:12:00Z"
    assert trigger.missed == 1


async def test_input_replaces_the_scheduled_event(tmp_path):
    submit = Submissions()
    trigger = make_trigger(tmp_path, FakeClock(utc("2024-01-01 00:00:00")), submit,
                           schedule="rate(1 minute)", input={"report": "daily", "n": [1, 2]})
    await run_until(trigger, submit, 1)
    assert submit.items[0][1] == {"report": "daily", "n": [1, 2]}


# -- a real daemon ----------------------------------------------------------------------

RECORDER = """
import json, os, time

def handler(event, context):
    started = time.time()
    time.sleep(float(os.environ.get("SLEEP", "0")))
    print("RECORD " + json.dumps({"event": event, "start": started, "end": time.time(),
                                  "request_id": context.aws_request_id}))
"""


def cron_function(functions: Path, name: str, trigger: str, *, sleep: float = 0) -> None:
    write_function(functions, f"{name}/handler.py", RECORDER)
    write_function(functions, f"{name}/function.toml",
                   f'timeout_s = 10\n[env]\nSLEEP = "{sleep}"\n[[triggers]]\ntype = "cron"\n{trigger}\n')


def records(daemon, name: str) -> list[dict]:
    log = daemon.data / "logs" / f"{name}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return [json.loads(m.group(1)) for m in re.finditer(r"RECORD (\{.*\})\s*$", text, re.M)]


def cron_state(daemon, name: str) -> dict:
    """The cron trigger's state; {} while the function is listed without its trigger yet."""
    return next((t["state"] for t in daemon.function(name)["triggers"] if t["type"] == "cron"), {})


def tick_time(record: dict) -> float:
    return datetime.strptime(record["event"]["time"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=timezone.utc).timestamp()


def test_an_every_second_schedule_fires_each_second_in_real_time(start_daemon, functions_dir):
    # Runs may overlap: a slow cold start must not make this test about the overlap rule.
    cron_function(functions_dir, "tick", 'schedule = "* * * * * *"\noverlap = "allow"')
    daemon = start_daemon(functions_dir)

    def six_in_a_row() -> bool:  # no tick lost: a lost one would leave a gap for ever
        times = sorted(tick_time(r) for r in records(daemon, "tick"))
        return times[:6] == [times[0] + i for i in range(6)] if times else False

    wait_until(six_in_a_row, timeout=30, message="six consecutive ticks")
    got = sorted(records(daemon, "tick"), key=tick_time)
    times = [tick_time(r) for r in got]
    assert len(set(times)) == len(times)  # none repeated
    event = got[0]["event"]
    assert event["source"] == "aws.events" and event["detail-type"] == "Scheduled Event"
    assert event["detail"] == {} and event["resources"][0].endswith(":rule/tick-cron-0")
    assert event["id"] == got[0]["request_id"]
    # Each run starts soon after its scheduled second (generous: a loaded CI box,
    # and the first run includes the worker's cold start).
    assert all(0 <= r["start"] - t < 5.0 for r, t in zip(got, times))
    state = cron_state(daemon, "tick")
    assert state["status"] == "scheduled" and state["fired"] >= 6 and state["skipped_overlap"] == 0
    assert state["max_lateness_ms"] is not None and state["last_lateness_ms"] >= 0


def test_eventbridge_cron_schedules_load_and_say_their_next_tick(start_daemon, functions_dir):
    cron_function(functions_dir, "minutely", 'schedule = "cron(* * * * ? *)"')
    cron_function(functions_dir, "expired", 'schedule = "cron(0 0 1 1 ? 2020)"')
    daemon = start_daemon(functions_dir)
    wait_until(lambda: cron_state(daemon, "minutely").get("next"), timeout=20, message="a next tick")
    state = cron_state(daemon, "minutely")
    next_tick = datetime.strptime(state["next"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    assert state["status"] == "scheduled" and next_tick % 60 == 0 and 0 < next_tick - time.time() <= 61
    wait_until(lambda: cron_state(daemon, "expired").get("status") == "ended", timeout=20)
    assert daemon.function("expired")["load_error"] is None  # the function itself still serves
    assert "cron schedule cron(0 0 1 1 ? 2020) has no tick left" in daemon.output()


def test_a_tick_is_skipped_while_the_previous_run_is_still_going(start_daemon, functions_dir):
    cron_function(functions_dir, "slow", 'schedule = "* * * * * *"', sleep=2.5)
    daemon = start_daemon(functions_dir)
    wait_until(lambda: len(records(daemon, "slow")) >= 3, timeout=30, message="three slow runs")
    got = records(daemon, "slow")
    spans = sorted((r["start"], r["end"]) for r in got)
    assert all(later[0] >= earlier[1] - 0.05 for earlier, later in zip(spans, spans[1:]))
    assert cron_state(daemon, "slow")["skipped_overlap"] >= 3
    assert "skipped: the run of" in daemon.output()


def test_input_is_the_event_when_given(start_daemon, functions_dir):
    cron_function(functions_dir, "constant", 'schedule = "* * * * * *"\ninput = { report = "daily" }')
    daemon = start_daemon(functions_dir)
    wait_until(lambda: records(daemon, "constant"), timeout=20)
    assert records(daemon, "constant")[0]["event"] == {"report": "daily"}


def test_two_triggers_on_one_schedule_fire_as_two_events_with_their_own_ids(start_daemon, functions_dir):
    # Two EventBridge rules on one function, one schedule, each with its own input.
    cron_function(functions_dir, "tenants", 'schedule = "* * * * * *"\ninput = { tenant = "a" }\n'
                  '[[triggers]]\ntype = "cron"\nschedule = "* * * * * *"\ninput = { tenant = "b" }')
    daemon = start_daemon(functions_dir)
    wait_until(lambda: len(records(daemon, "tenants")) >= 6, timeout=20, message="six runs")
    got = records(daemon, "tenants")
    assert {r["event"]["tenant"] for r in got} == {"a", "b"}
    assert len({r["request_id"] for r in got}) == len(got)


@pytest.mark.parametrize("catch_up", [0, 1])
def test_missed_ticks_run_only_with_catch_up(start_daemon, functions_dir, catch_up):
    cron_function(functions_dir, "daily", f'schedule = "* * * * * *"\ncatch_up = {catch_up}')
    daemon = start_daemon(functions_dir)
    wait_until(lambda: records(daemon, "daily"), timeout=20)
    assert daemon.stop() == 0
    stopped = time.time()
    time.sleep(3)  # about three ticks missed
    before = len(records(daemon, "daily"))
    starting = time.time()
    daemon = start_daemon(functions_dir)
    restarted = time.time()
    wait_until(lambda: len(records(daemon, "daily")) >= before + 2, timeout=20)
    # A tick queued just before the stop may run after the restart; a tick of
    # the downtime runs only when caught up.
    missed = [t for t in map(tick_time, records(daemon, "daily")[before:]) if stopped < t < starting]
    if catch_up:
        # The most recent missed tick, and only that one: every tick of the
        # downtime up to it is missing, and the schedule goes on after it.
        told = re.findall(r"catching up the tick of (\S+) missed", daemon.output())
        assert len(told) == 1, told
        caught = datetime.strptime(told[0], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
        assert stopped < caught < restarted
        after = list(map(tick_time, records(daemon, "daily")[before:]))
        assert [t for t in after if stopped < t <= caught] == [caught]
        assert cron_state(daemon, "daily")["caught_up"] == 1
    else:
        assert missed == []
        assert cron_state(daemon, "daily")["caught_up"] == 0


def test_a_daemon_started_on_a_full_disk_starts_its_schedules_once_there_is_room(
        start_daemon, functions_dir, tmp_path):
    cron_function(functions_dir, "tick", 'schedule = "* * * * * *"\ncatch_up = 1')
    with small_disk(tmp_path / "data") as data:
        daemon = start_daemon(functions_dir, data=data)
        try:
            wait_until(lambda: records(daemon, "tick"), timeout=20, message="a tick")
            assert daemon.stop() == 0
            filler = data / "filler"
            fill(filler)
            daemon.start(wait=False)
            wait_until(daemon.serving, timeout=20, message="the daemon to serve")
            state = cron_state(daemon, "tick")
            assert state["status"] == "waiting" and "cron.db" in state["reason"], state
            time.sleep(1.5)  # opening is tried again after 1 s, and fails again
            filler.unlink()
            freed = time.time()
            wait_until(lambda: cron_state(daemon, "tick").get("fired", 0) >= 2, timeout=20,
                       message=f"the schedule to fire\n{daemon.output()}")
            state = cron_state(daemon, "tick")
            # The tick missed meanwhile runs, as after a stop (catch_up = 1).
            assert state["status"] == "scheduled" and state["caught_up"] == 1, state
            wait_until(lambda: any(tick_time(r) > freed for r in records(daemon, "tick")),
                       message="a tick after the disk has room")
            output = daemon.output()
            assert output.count("cron triggers: cannot open") == 1, output
            assert output.count("cron.db is open now") == 1, output
        finally:
            daemon.stop()


@pytest.mark.parametrize("trigger, message", [
    ('schedule = "61 * * * *"', "triggers[0] (cron): schedule = '61 * * * *': not a valid cron expression"),
    ('schedule = "* * *"', "triggers[0] (cron): schedule = '* * *': expected 5 cron fields"),
    ('schedule = "rate(5 weeks)"', "triggers[0] (cron): schedule = 'rate(5 weeks)': expected rate(N"),
    ('schedule = "0 0 30 2 *"', "triggers[0] (cron): schedule = '0 0 30 2 *': not a valid cron"),
    # EventBridge: "If the value is equal to 1, then the unit must be singular. If the value is
    # greater than 1, the unit must be plural."
    ('schedule = "rate(1 minutes)"', "schedule = 'rate(1 minutes)': EventBridge takes the unit "
     "singular for 1 and plural above it: use rate(1 minute)"),
    ('schedule = "rate(5 hour)"', "schedule = 'rate(5 hour)': EventBridge takes the unit singular "
     "for 1 and plural above it: use rate(5 hours)"),
    ('schedule = "rate(1 days)"', "use rate(1 day)"),
    ('schedule = "rate(0 minutes)"', "schedule = 'rate(0 minutes)': the rate must be at least 1"),
    ('schedule = "rate(0 minute)"', "use rate(1 minute) or more"),
    # EventBridge: with #, Day-of-week holds one expression; "3#1,6#3" is two.
    ('schedule = "cron(0 9 ? * 3#1,6#3 *)"', "schedule = 'cron(0 9 ? * 3#1,6#3 *)': with # the "
     "Day-of-week field holds one expression"),
    ('schedule = "cron(0 9 ? * 2,3#2 *)"', "use one cron trigger per weekday"),
    ('schedule = "cron(0 10 * * * *)"', "schedule = 'cron(0 10 * * * *)': one of Day-of-month and Day-of-week must be ?"),
    ('schedule = "cron(0 10 ? * 8 *)"', "schedule = 'cron(0 10 ? * 8 *)': Day-of-week '8' is out of range"),
    ('schedule = "cron(0 10 * * ?)"', "expected cron(Minutes Hours Day-of-month Month Day-of-week Year)"),
    ('schedule = "cron(0 10 * * ? 1960)"', "schedule = 'cron(0 10 * * ? 1960)': Year 1960 is out of range"),
    ('schedule = "cron(0 10 * * ? 2026,2150)"', "Year 2150 is out of range: use 1970-2099"),
    ('schedule = "* * * * *"\ntimezone = "Mars/Olympus"', "timezone = 'Mars/Olympus': unknown time zone"),
    ('schedule = "* * * * *"\noverlap = "queue"', "overlap = 'queue': expected \"skip\""),
    ('schedule = "* * * * *"\ncatch_up = -1', "catch_up = -1: expected how many missed ticks"),
    ('every = "day"', "triggers[0] (cron): unknown key 'every'"),
])
def test_bad_cron_options_name_the_file_and_the_key(tmp_path, trigger, message):
    write_function(tmp_path, "fn/handler.py", "def handler(event, context):\n    return 1\n")
    write_function(tmp_path, "fn/function.toml", f'[[triggers]]\ntype = "cron"\n{trigger}\n')
    spec = load_spec("fn", tmp_path / "fn")
    assert spec.load_error is not None
    assert spec.load_error.startswith("function.toml: "), spec.load_error
    assert message in spec.load_error, spec.load_error


def test_rates_eventbridge_refuses_stop_check_and_the_daemon(start_daemon, functions_dir):
    """`faasd check` names the function, the trigger and the fix; the daemon does not schedule
    it, and still serves the functions whose schedules are valid."""
    cron_function(functions_dir, "plural", 'schedule = "rate(1 minutes)"')
    cron_function(functions_dir, "singular", 'schedule = "rate(5 minute)"')
    cron_function(functions_dir, "fine", 'schedule = "rate(1 minute)"')
    check = subprocess.run([sys.executable, "-m", "faasd", "check", "--functions", str(functions_dir)],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert check.returncode == 1, check.stdout + check.stderr
    assert ("plural: error: function.toml: triggers[0] (cron): schedule = 'rate(1 minutes)': "
            "EventBridge takes the unit singular for 1 and plural above it: use rate(1 minute)"
            ) in check.stdout, check.stdout
    assert "singular: error: function.toml: triggers[0] (cron): schedule = 'rate(5 minute)'" in check.stdout
    assert "use rate(5 minutes)" in check.stdout
    assert "fine: ok" in check.stdout, check.stdout
    daemon = start_daemon(functions_dir)
    wait_until(lambda: cron_state(daemon, "fine").get("next"), timeout=20, message="fine's next tick")
    assert "use rate(1 minute)" in daemon.function("plural")["load_error"]
    assert "use rate(5 minutes)" in daemon.function("singular")["load_error"]
    assert cron_state(daemon, "plural") == {} and cron_state(daemon, "singular") == {}
    assert "function plural cannot load: function.toml: triggers[0] (cron): schedule = 'rate(1 minutes)'" \
        in daemon.output()
