"""Validation of the `file`, `cron` and `amqp` trigger tables of function.toml.

`check_trigger(kind, options)` returns the options normalised (lists where a
single value is allowed, defaults filled in) or raises `ValueError` with a
message that names the key and what would be accepted; spec.py prefixes it
with the file and the trigger's index. Kept free of heavy imports: `faasd
check` and every registry rescan run it.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("faasd.triggers")

FILE_KEYS = {"dir", "patterns", "bucket"}
CRON_KEYS = {"schedule", "timezone", "input", "catch_up", "overlap"}
AMQP_KEYS = {"exchange", "exchange_type", "routing_key", "routing_keys", "format", "queue", "prefetch"}

OVERLAP_MODES = ("skip", "allow")
EXCHANGE_TYPES = ("topic", "direct", "fanout", "headers")
AMQP_FORMATS = ("sns", "rmq", "raw")
MAX_CATCH_UP = 100
# AMQP short strings (exchange and queue names) are at most 255 bytes; the
# dead-letter queue adds a suffix to the queue name.
MAX_AMQP_NAME = 200
AMQP_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]+$")
RATE_RE = re.compile(r"^rate\(\s*(\d+)\s+(minute|minutes|hour|hours|day|days)\s*\)$")
RATE_UNITS = {"minute": 60, "hour": 3600, "day": 86400}
MAX_RATE_S = 3650 * 86400  # ten years: past them no tick comes, and times stop being printable


def check_trigger(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    checker: Callable[[dict[str, Any]], dict[str, Any]] | None = _CHECKERS.get(kind)
    if checker is None:
        return options
    return checker(dict(options))


def _unknown(options: dict[str, Any], known: set[str], kind: str) -> None:
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} for a {kind} trigger; known keys: "
                         f"type, {', '.join(sorted(known))}")


def _string_list(options: dict[str, Any], key: str, default: list[str]) -> list[str]:
    value = options.get(key, default)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a string or a list of strings, e.g. [\"*.jpg\", \"*.png\"]")
    return list(value)


def check_file(options: dict[str, Any]) -> dict[str, Any]:
    _unknown(options, FILE_KEYS, "file")
    directory = options.get("dir")
    if not isinstance(directory, str) or not directory.strip():
        raise ValueError("a file trigger needs dir = \"uploads/images\" (relative to the data dir, or absolute)")
    if "\0" in directory:
        raise ValueError(f"dir = {directory!r}: a NUL character cannot be part of a path")
    patterns = _string_list(options, "patterns", ["*"])
    if not patterns or any(not p for p in patterns):
        raise ValueError("patterns must not be empty: leave it out to match every file")
    bucket = options.get("bucket", os.path.basename(os.path.normpath(directory)))
    if not isinstance(bucket, str) or not bucket:
        raise ValueError("bucket must be a non-empty string (default: the dir's base name)")
    return {"dir": directory, "patterns": patterns, "bucket": bucket}


def parse_rate(schedule: str) -> int | None:
    """`rate(5 minutes)` -> 300 (seconds); None if `schedule` is not a rate."""
    match = RATE_RE.match(schedule.strip())
    if match is None:
        return None
    value, written = int(match.group(1)), match.group(2)
    unit = written.rstrip("s")
    if value < 1:
        raise ValueError(f"schedule = {schedule!r}: the rate must be at least 1, as EventBridge "
                         f"requires: use rate(1 {unit}) or more")
    # EventBridge rejects rate(1 hours) and rate(5 hour): one takes the singular, more the plural.
    expected = unit if value == 1 else unit + "s"
    if written != expected:
        raise ValueError(f"schedule = {schedule!r}: EventBridge takes the unit singular for 1 and "
                         f"plural above it: use rate({value} {expected})")
    seconds = value * RATE_UNITS[unit]
    if seconds > MAX_RATE_S:
        raise ValueError(f"schedule = {schedule!r}: a rate is at most 10 years "
                         "(rate(3650 days), 87600 hours or 5256000 minutes)")
    return seconds


AWS_CRON_RE = re.compile(r"^cron\((.*)\)$")
FIRST_YEAR, LAST_YEAR = 1970, 2099
_WEEKDAY_FORMS = "1-7 (1 is Sunday) or SUN-SAT, with , - * ? L #"


def aws_cron(schedule: str) -> str | None:
    """EventBridge's `cron(Minutes Hours Day-of-month Month Day-of-week Year)` as
    a croniter expression with seconds first and the year last; None if
    `schedule` is not one. Its `?` is croniter's `*`, its weekdays 1-7 from
    Sunday croniter's 0-6, `6L` (the month's last Friday) croniter's `L5`."""
    match = AWS_CRON_RE.match(schedule.strip())
    if match is None:
        return None
    fields = match.group(1).split()
    if len(fields) != 6:
        raise ValueError(f"schedule = {schedule!r}: expected cron(Minutes Hours Day-of-month Month "
                         "Day-of-week Year), 6 fields, as EventBridge takes it")
    minutes, hours, day, month, weekday, year = fields
    if (day == "?") == (weekday == "?"):
        raise ValueError(f"schedule = {schedule!r}: one of Day-of-month and Day-of-week must be ?, "
                         "the other not, as EventBridge requires (cron(0 10 * * ? *) is every day at 10:00)")
    if "?" in minutes + hours + month + year:
        raise ValueError(f"schedule = {schedule!r}: ? stands only in Day-of-month or Day-of-week")
    if "#" in weekday and "," in weekday:
        raise ValueError(f"schedule = {schedule!r}: with # the Day-of-week field holds one "
                         "expression, as EventBridge requires (3#1,6#3 is two): use one cron "
                         "trigger per weekday, e.g. cron(0 9 ? * 3#1 *) and cron(0 9 ? * 6#3 *)")
    if day == "LW":
        raise ValueError(f"schedule = {schedule!r}: LW (the month's last weekday) is not supported")
    _check_years(schedule, year)
    weekday = "*" if weekday == "?" else ",".join(_weekday(schedule, part) for part in weekday.split(","))
    return " ".join(("0", minutes, hours, "*" if day == "?" else day, month, weekday, year))


def _check_years(schedule: str, field: str) -> None:
    """Every year a Year field names (not its steps) is one faasd can schedule."""
    for part in field.split(","):
        for value in re.findall(r"\d+", part.split("/", 1)[0]):
            if not FIRST_YEAR <= int(value) <= LAST_YEAR:
                # EventBridge takes up to 2199; croniter, which faasd schedules with, stops at 2099.
                raise ValueError(f"schedule = {schedule!r}: Year {value} is out of range: use "
                                 f"{FIRST_YEAR}-{LAST_YEAR}, or * for every year")


def _weekday(schedule: str, part: str) -> str:
    """One item of an EventBridge Day-of-week list in croniter's numbering."""
    def day(token: str) -> str:
        if not token.isdigit():
            return token  # a name (SUN-SAT) or *, as croniter reads them
        if not 1 <= int(token) <= 7:
            raise ValueError(f"schedule = {schedule!r}: Day-of-week {token!r} is out of range: "
                             f"use {_WEEKDAY_FORMS}")
        return str(int(token) - 1)

    if "#" in part:
        weekday, nth = part.split("#", 1)
        return f"{day(weekday)}#{nth}"
    if part == "L":
        return "6"  # the week's last day: Saturday
    if part.endswith("L"):
        return f"L{day(part[:-1])}"
    if "/" in part:
        # The start (3/2: Tuesday, then every second day) is a weekday to
        # renumber like any other; the step is a count of days.
        start, step = part.split("/", 1)
        return f"{_weekday(schedule, start)}/{step}"
    if "-" in part:
        first, last = part.split("-", 1)
        return f"{day(first)}-{day(last)}"
    return day(part)


def cron_fields(schedule: str) -> tuple[str, bool]:
    """The expression croniter understands and whether it has a seconds field (first)."""
    converted = aws_cron(schedule)
    if converted is not None:
        return converted, True
    expression = " ".join(schedule.split())
    if expression.startswith("@"):
        return expression, False
    fields = expression.split(" ")
    if len(fields) == 5:
        return expression, False
    if len(fields) == 6:
        return expression, True
    raise ValueError(
        f"schedule = {schedule!r}: expected 5 cron fields (minute hour day month weekday), "
        "6 with seconds first, cron(...) as EventBridge takes it, or rate(N minutes|hours|days)")


def check_cron(options: dict[str, Any]) -> dict[str, Any]:
    _unknown(options, CRON_KEYS, "cron")
    schedule = options.get("schedule")
    if not isinstance(schedule, str) or not schedule.strip():
        raise ValueError("a cron trigger needs schedule = \"*/5 * * * *\" (or 6 fields with seconds "
                         "first, or rate(5 minutes))")
    if schedule.strip().startswith("rate"):
        if parse_rate(schedule) is None:
            raise ValueError(f"schedule = {schedule!r}: expected rate(N minutes|hours|days), "
                             "e.g. rate(5 minutes), or rate(1 minute|hour|day)")
    else:
        expression, seconds = cron_fields(schedule)
        from croniter import croniter  # imported here: only cron triggers need it

        if aws_cron(schedule) is not None:
            # Tried in any year: one whose Year field has passed is valid, and ends at once.
            expression = expression.rsplit(" ", 1)[0] + " *"
        try:
            croniter(expression, second_at_beginning=seconds).get_next()  # Feb 30 never comes
        except (ValueError, KeyError, TypeError) as exc:  # croniter's errors are ValueErrors
            raise ValueError(f"schedule = {schedule!r}: not a valid cron expression: {exc}") from None
    timezone = options.get("timezone", "UTC")
    if not isinstance(timezone, str) or not timezone:
        raise ValueError("timezone must be an IANA zone name such as \"Europe/Berlin\"")
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"timezone = {timezone!r}: unknown time zone; use an IANA name such as "
                         "\"UTC\" or \"Europe/Berlin\"") from None
    catch_up = options.get("catch_up", 0)
    if isinstance(catch_up, bool):
        catch_up = int(catch_up)
    if not isinstance(catch_up, int) or not 0 <= catch_up <= MAX_CATCH_UP:
        raise ValueError(f"catch_up = {catch_up!r}: expected how many missed ticks to run after a "
                         f"restart, from 0 (default) to {MAX_CATCH_UP}; 1 runs the most recent one")
    overlap = options.get("overlap", "skip")
    if overlap not in OVERLAP_MODES:
        raise ValueError(f"overlap = {overlap!r}: expected \"skip\" (a tick is skipped while the "
                         "previous run is still going) or \"allow\"")
    checked = {"schedule": schedule.strip(), "timezone": timezone, "catch_up": catch_up,
               "overlap": overlap}
    if "input" in options:
        checked["input"] = options["input"]
    return checked


def _amqp_name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_AMQP_NAME or not AMQP_NAME_RE.match(value):
        raise ValueError(f"{key} = {value!r}: expected a name of letters, digits and . _ - : "
                         f"(at most {MAX_AMQP_NAME} characters)")
    return value


def check_amqp(options: dict[str, Any]) -> dict[str, Any]:
    _unknown(options, AMQP_KEYS, "amqp")
    if "exchange" not in options:
        raise ValueError("an amqp trigger needs exchange = \"orders\"")
    exchange = _amqp_name(options["exchange"], "exchange")
    exchange_type = options.get("exchange_type", "topic")
    if exchange_type not in EXCHANGE_TYPES:
        raise ValueError(f"exchange_type = {exchange_type!r}: expected one of {', '.join(EXCHANGE_TYPES)}")
    if "routing_key" in options and "routing_keys" in options:
        raise ValueError("set routing_key or routing_keys, not both")
    key = "routing_keys" if "routing_keys" in options else "routing_key"
    default = ["#"] if exchange_type == "topic" else [""]
    routing_keys = _string_list(options, key, default)
    if not routing_keys:
        raise ValueError(f"{key} must name at least one routing key")
    fmt = options.get("format", "sns")
    if fmt not in AMQP_FORMATS:
        raise ValueError(f"format = {fmt!r}: expected \"sns\" (default), \"rmq\" or \"raw\"")
    checked: dict[str, Any] = {"exchange": exchange, "exchange_type": exchange_type,
                               "routing_keys": routing_keys, "format": fmt}
    if "queue" in options:
        queue = _amqp_name(options["queue"], "queue")
        if queue.startswith("amq."):
            raise ValueError(f"queue = {queue!r}: names starting with amq. are reserved by the broker")
        checked["queue"] = queue
    if "prefetch" in options:
        prefetch = options["prefetch"]
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 1 <= prefetch <= 65535:
            raise ValueError(f"prefetch = {prefetch!r}: expected a whole number from 1 to 65535")
        checked["prefetch"] = prefetch
    return checked


_CHECKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "file": check_file, "cron": check_cron, "amqp": check_amqp,
}


def file_trigger_dir(directory: str, data_dir: Path) -> Path:
    """Where a file trigger's `dir` points: relative to the data dir, or absolute."""
    path = Path(os.path.expanduser(directory))
    return (path if path.is_absolute() else data_dir / path).resolve()


def file_trigger_dirs(spec: Any, data_dir: Path, user: tuple[int, int] | None = None) -> list[str]:
    """The dirs a function's file triggers watch, created if missing.

    Its workers must see them, read-write, even where they sit in the data
    dir or under /tmp, which the worker sandbox hides: they are its bucket.
    `user`: the workers' (uid, gid), where they run as another user than the
    daemon (root with run_as). A bucket inside the data dir is faasd's own:
    it is given to that group, writable and setgid (what the workers create
    there stays in the group); one elsewhere is the operator's, and a warning
    says when the workers cannot write it.
    """
    dirs = []
    for trigger in getattr(spec, "triggers", ()):
        if trigger.type == "file" and isinstance(trigger.get("dir"), str):
            path = file_trigger_dir(trigger.get("dir"), data_dir)
            try:
                path.mkdir(parents=True, exist_ok=True)
                if user is not None:
                    _share_with_workers(spec.name, path, data_dir, user)
            except OSError:
                continue  # reported by the trigger itself when it starts
            dirs.append(str(path))
    return dirs


_warned_unwritable: set[str] = set()


def _share_with_workers(function: str, path: Path, data_dir: Path, user: tuple[int, int]) -> None:
    uid, group = user
    status = path.stat()
    if ((status.st_uid == uid and status.st_mode & stat.S_IWUSR)
            or (status.st_gid == group and status.st_mode & stat.S_IWGRP)
            or status.st_mode & stat.S_IWOTH):
        return
    if path.resolve().is_relative_to(data_dir.resolve()):
        os.chown(path, -1, group)
        os.chmod(path, stat.S_IMODE(status.st_mode) | stat.S_IRWXG | stat.S_ISGID)
    elif str(path) not in _warned_unwritable:
        _warned_unwritable.add(str(path))
        log.warning("function %s: its workers (uid %d, gid %d) cannot write its file trigger's "
                    "dir %s: a handler that writes its outputs there will fail", function, uid,
                    group, path)
