"""Lambda's system log records in JSON, for functions with `log_format = "JSON"`.

In Text format the daemon writes Lambda's INIT_START, START, END and REPORT
lines (faasd/invoker.py, faasd/workers.py). In JSON format Lambda writes
these events as records instead, one JSON object a line, and only those at
or above the function's `system_log_level`:

    platform.initStart    INFO   a new worker starts (INIT_START)
    platform.initReport   INFO   its init failed (INIT_REPORT)
    platform.start        INFO   an invocation starts (START)
    platform.runtimeDone  DEBUG  the runtime is done with it (END)
    platform.report       INFO   its metrics, status and error type (REPORT)

Each is `{"time": ..., "type": ..., "record": {...}}`, the shapes Lambda's
Telemetry API documents and CloudWatch shows. What a handler prints is the
runtime's business (faasd/runtimes/); what the daemon says about a failed
call (a timeout's "Task timed out after ...") stays a line of text, as on Lambda.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import orjson

from .logs import iso_now
from .spec import runtime_version

if TYPE_CHECKING:
    from .errors import FunctionError
    from .invoker import Invocation
    from .spec import FunctionSpec

DEBUG, INFO, WARN = 1, 2, 3
SYSTEM_LEVELS = {"DEBUG": DEBUG, "INFO": INFO, "WARN": WARN}
# Text's Status for each kind of failure (faasd/errors.py); a handled error is "error" too.
STATUS = {"error": "error", "timeout": "timeout", "oom": "error", "crash": "error", "init": "error"}


def billed_ms(duration_ms: float, init_ms: float | None) -> int:
    """Lambda bills the init phase too, in every runtime (since 1 August 2025)."""
    return max(1, math.ceil(duration_ms + (init_ms or 0)))


def _record(kind: str, record: dict[str, Any]) -> str:
    return orjson.dumps({"time": iso_now(), "type": kind, "record": record}).decode()


class JsonPlatformLog:
    """The system records of one JSON-format function, filtered by its system log level.
    Each method returns the lines to write: none where the level leaves the record out."""

    __slots__ = ("spec", "level")

    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec
        self.level = SYSTEM_LEVELS[spec.system_log_level or "INFO"]

    def init_start(self, runtime_version: str, runtime_version_arn: str) -> list[str]:
        if self.level > INFO:
            return []
        return [_record("platform.initStart", {
            "initializationType": "on-demand", "phase": "init",
            "runtimeVersion": runtime_version, "runtimeVersionArn": runtime_version_arn,
            "functionName": self.spec.name, "functionVersion": "$LATEST"})]

    def init_report(self, error: FunctionError, init_ms: float, phase: str = "init") -> list[str]:
        """A failed init's report, once it has ended (the runtime has logged the error
        by then: faasd/invoker.py's _init_error_lines). `phase`: "init", or "invoke" for
        the init Lambda tries again within the call it failed for."""
        if self.level > INFO:
            return []
        return [_record("platform.initReport", {
            "initializationType": "on-demand", "phase": phase, "status": "error",
            "errorType": error.error_type,
            "metrics": {"durationMs": round(init_ms, 3)}})]

    def start(self, request_id: str) -> list[str]:
        if self.level > INFO:
            return []
        return [_record("platform.start", {"requestId": request_id, "version": "$LATEST"})]

    def done(self, invocation: Invocation) -> list[str]:
        """runtimeDone (DEBUG) and report (INFO), with the outcome in `status` and `errorType`."""
        error = invocation.error
        outcome: dict[str, Any] = {"status": "success"}
        if error is not None:
            outcome = {"status": STATUS.get(error.kind, "error"), "errorType": error.error_type}
        lines = []
        if self.level <= DEBUG:
            produced = len(invocation.payload) if invocation.payload is not None else 0
            lines.append(_record("platform.runtimeDone", {
                "requestId": invocation.request_id, **outcome,
                "metrics": {"durationMs": round(invocation.duration_ms, 3), "producedBytes": produced}}))
        if self.level <= INFO:
            lines.append(self._report(invocation, outcome))
        return lines

    def _report(self, invocation: Invocation, outcome: dict[str, Any]) -> str:
        init = invocation.reported_init_ms
        metrics: dict[str, Any] = {
            "durationMs": round(invocation.duration_ms, 3),
            "billedDurationMs": billed_ms(invocation.duration_ms, init),
            "memorySizeMB": self.spec.memory_mb,
            "maxMemoryUsedMB": invocation.max_memory_mb,
        }
        if init is not None:
            metrics["initDurationMs"] = round(init, 3)
        return _record("platform.report", {"requestId": invocation.request_id, "metrics": metrics,
                                           **outcome})


def json_platform_log(spec: FunctionSpec) -> JsonPlatformLog | None:
    """The JSON records for a function with JSON logs; None for Text (the lines stay as they are)."""
    return JsonPlatformLog(spec) if spec.log_format == "JSON" else None


def init_start_lines(spec: FunctionSpec, region: str, python: str) -> list[str]:
    """Lambda's first line of a new execution environment, whatever its init comes to:
    INIT_START with the runtime version it runs, or in JSON its platform.initStart record
    (none where the system log level leaves it out). `python`: the Python workers' interpreter."""
    version, arn = runtime_version(spec.runtime, region, python)
    platform = json_platform_log(spec)
    if platform is None:
        return [f"INIT_START Runtime Version: {version}\tRuntime Version ARN: {arn}"]
    return platform.init_start(version, arn)
