"""Lambda's JSON log format (`log_format = "JSON"`): the runtimes' JSON records, the
application and system log levels, and the platform records in place of START/REPORT,
read back as a user reads them (`faasd logs`, the logs API, GetFunction)."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys

import pytest

from support import ROOT, awslambdaric_init_records, loaded, request_lines, wait_until, write_function

ORDERS = """
import logging

logger = logging.getLogger("orders")
print("orders module loaded")


def handler(event, context):
    print("a plain print")
    logger.debug("a debug record")
    logger.info("order %s taken", 7, extra={"order_id": 7, "customer": {"tier": "gold"}})
    logger.warning("stock is low")
    try:
        1 / 0
    except ZeroDivisionError:
        logger.exception("division failed")
    if event.get("fail"):
        raise ValueError("the input was not what I wanted")
    return {"level": logging.getLogger().level}
"""

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
# AWS's Python runtime (awslambdaric) times its JSON records to the second.
ISO_SECONDS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def faasd_logs(daemon, name: str) -> list[str]:
    """`faasd logs NAME`, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "faasd", "logs", name, "--lines", "1000",
                           "--url", daemon.url], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def texts_of(lines: list[str], request_id: str) -> list[str]:
    """The texts of one invocation's lines (`<time>\\t<request id>\\t<text>`)."""
    return [line.split("\t", 2)[2] for line in lines if line.split("\t", 2)[1:2] == [request_id]]


def records(texts: list[str]) -> list[dict]:
    return [json.loads(text) for text in texts if text.startswith("{")]


def platform(texts: list[str], kind: str) -> list[dict]:
    return [r for r in records(texts) if r.get("type") == kind]


def wait_report(daemon, name: str, request_id: str) -> None:
    wait_until(lambda: any('"type":"platform.report"' in text
                           for text in request_lines(daemon, name, request_id)),
               message=f"the platform.report record of {request_id}")


def test_a_python_function_logs_lambdas_json_records_and_platform_events(daemon):
    write_function(daemon.functions, "orders.py", ORDERS)
    write_function(daemon.functions, "orders.toml", 'log_format = "JSON"\n')
    loaded(daemon, "orders")
    response = daemon.invoke("orders", {})
    assert response.status == 200, response.text
    # The application log level (INFO unless set) is the root logger's.
    assert response.json() == {"level": 20}
    request_id = response.headers["x-amzn-requestid"]
    wait_report(daemon, "orders", request_id)
    lines = faasd_logs(daemon, "orders")
    texts = texts_of(lines, request_id)

    # No Text platform lines at all: their JSON records instead.
    assert not any(re.match(r"(INIT_START|START|END|REPORT) ", line.split("\t", 2)[2]) for line in lines)
    init_start, = platform(texts_of(lines, "-"), "platform.initStart")
    assert ISO.fullmatch(init_start["time"])
    assert init_start["record"]["functionName"] == "orders"
    assert init_start["record"]["initializationType"] == "on-demand"
    assert init_start["record"]["phase"] == "init" and init_start["record"]["functionVersion"] == "$LATEST"
    assert init_start["record"]["runtimeVersion"].startswith("python3.")
    assert init_start["record"]["runtimeVersionArn"].startswith("arn:aws:lambda:us-east-1::runtime:")
    # What the module printed as it loaded stays text, with no request id.
    assert "orders module loaded" in texts_of(lines, "-")

    assert json.loads(texts[0]) == {"time": json.loads(texts[0])["time"], "type": "platform.start",
                                    "record": {"requestId": request_id, "version": "$LATEST"}}
    assert "a plain print" in texts  # print() stays plain text
    app = [r for r in records(texts) if "level" in r]
    assert [(r["level"], r["message"]) for r in app] == [
        ("INFO", "order 7 taken"), ("WARNING", "stock is low"), ("ERROR", "division failed")]
    info, warning, failed = app
    assert ISO_SECONDS.fullmatch(info["timestamp"])
    assert info["logger"] == "orders" and info["requestId"] == request_id
    # `extra` fields join the record; exception fields only where there is one.
    assert info["order_id"] == 7 and info["customer"] == {"tier": "gold"}
    assert "errorType" not in info and "stackTrace" not in info and "location" not in info
    assert list(warning) == ["timestamp", "level", "message", "logger", "requestId"]
    assert failed["errorType"] == "ZeroDivisionError" and failed["errorMessage"] == "division by zero"
    assert any("1 / 0" in frame for frame in failed["stackTrace"])
    assert failed["location"].endswith(":handler:16") and "orders.py" in failed["location"]

    report, = platform(texts, "platform.report")
    assert texts[-1] == json.dumps(report, separators=(",", ":"))
    assert report["record"]["requestId"] == request_id and report["record"]["status"] == "success"
    metrics = report["record"]["metrics"]
    assert set(metrics) == {"durationMs", "billedDurationMs", "memorySizeMB", "maxMemoryUsedMB",
                            "initDurationMs"}
    assert metrics["memorySizeMB"] == 128 and metrics["maxMemoryUsedMB"] > 0
    assert metrics["billedDurationMs"] >= metrics["durationMs"] + metrics["initDurationMs"]
    # runtimeDone is a DEBUG record: left out at the default system log level (INFO).
    assert not platform(texts, "platform.runtimeDone")

    # A handler error: the runtime's JSON error record, and the report says so.
    failed = daemon.invoke("orders", {"fail": True})
    assert failed.headers["x-amz-function-error"] == "Unhandled"
    failed_id = failed.headers["x-amzn-requestid"]
    wait_report(daemon, "orders", failed_id)
    texts = texts_of(faasd_logs(daemon, "orders"), failed_id)
    error = records(texts)[-2]
    assert list(error) == ["timestamp", "level", "errorMessage", "errorType", "requestId", "stackTrace"]
    assert error["level"] == "ERROR" and error["errorType"] == "ValueError"
    assert ISO_SECONDS.fullmatch(error["timestamp"])
    assert error["errorMessage"] == "the input was not what I wanted" and error["requestId"] == failed_id
    assert any("raise ValueError" in frame for frame in error["stackTrace"])
    assert not any("LAMBDA_WARNING" in text for text in texts)  # awslambdaric warns at init only
    report, = platform(texts, "platform.report")
    assert report["record"]["status"] == "error" and report["record"]["errorType"] == "ValueError"
    assert "initDurationMs" not in report["record"]["metrics"]  # a warm call


def test_log_levels_filter_the_application_and_the_system_records(daemon):
    write_function(daemon.functions, "quiet.py", ORDERS)
    write_function(daemon.functions, "quiet.toml",
                   'log_format = "JSON"\napplication_log_level = "WARN"\nsystem_log_level = "WARN"\n')
    write_function(daemon.functions, "chatty.py", ORDERS)
    write_function(daemon.functions, "chatty.toml",
                   'log_format = "json"\napplication_log_level = "trace"\nsystem_log_level = "debug"\n')
    loaded(daemon, "quiet")
    loaded(daemon, "chatty")

    quiet = daemon.invoke("quiet", {})
    assert quiet.json() == {"level": 30}
    request_id = quiet.headers["x-amzn-requestid"]
    wait_until(lambda: "division failed" in daemon.log_of("quiet"), message="quiet's last record")
    lines = daemon.log_of("quiet").splitlines()
    texts = texts_of(lines, request_id)
    assert [r["message"] for r in records(texts)] == ["stock is low", "division failed"]
    # WARN: not one platform record, not even initStart; print() is not filtered.
    assert not any('"type":"platform.' in line for line in lines)
    assert "a plain print" in texts

    chatty = daemon.invoke("chatty", {})
    assert chatty.json() == {"level": 10}  # TRACE: logging's lowest level, DEBUG
    request_id = chatty.headers["x-amzn-requestid"]
    wait_report(daemon, "chatty", request_id)
    texts = request_lines(daemon, "chatty", request_id)
    assert [r["level"] for r in records(texts) if "level" in r] == ["DEBUG", "INFO", "WARNING", "ERROR"]
    # DEBUG: runtimeDone too, between the handler's output and the report.
    assert [r["type"] for r in records(texts) if "type" in r] == [
        "platform.start", "platform.runtimeDone", "platform.report"]
    done, = platform(texts, "platform.runtimeDone")
    assert done["record"]["requestId"] == request_id and done["record"]["status"] == "success"
    assert done["record"]["metrics"]["producedBytes"] == len(b'{"level": 10}')  # as the shim encodes it


NODE = """
exports.handler = async (event) => {
  console.trace("a trace");
  console.debug("a debug");
  console.info("an info");
  console.log("a log");
  console.warn("a warning", { n: 1 });
  console.error("an error");
  return { format: process.env.AWS_LAMBDA_LOG_FORMAT, level: process.env.AWS_LAMBDA_LOG_LEVEL };
};
"""


@pytest.mark.parametrize("level, kept", [
    ("WARN", ["WARN", "ERROR"]),
    ("DEBUG", ["DEBUG", "INFO", "INFO", "WARN", "ERROR"]),
    ("TRACE", ["TRACE", "DEBUG", "INFO", "INFO", "WARN", "ERROR"]),
])
def test_a_node_function_drops_console_calls_below_its_application_log_level(daemon, level, kept):
    write_function(daemon.functions, "levels.js", NODE)
    write_function(daemon.functions, "levels.toml",
                   f'log_format = "JSON"\napplication_log_level = "{level}"\n')
    loaded(daemon, "levels")
    response = daemon.invoke("levels", {})
    assert response.json() == {"format": "JSON", "level": level}
    request_id = response.headers["x-amzn-requestid"]
    wait_report(daemon, "levels", request_id)
    texts = request_lines(daemon, "levels", request_id)
    app = [r for r in records(texts) if "level" in r]
    assert [r["level"] for r in app] == kept
    assert all(r["requestId"] == request_id and ISO.fullmatch(r["timestamp"]) for r in app)
    warning = next(r for r in app if r["level"] == "WARN")
    assert warning["message"] == "a warning { n: 1 }"
    assert [r["type"] for r in records(texts) if "type" in r] == ["platform.start", "platform.report"]
    init_start, = platform(texts_of(daemon.log_of("levels").splitlines(), "-"), "platform.initStart")
    assert init_start["record"]["runtimeVersion"].startswith("nodejs")


def test_a_timeout_and_a_failed_init_are_reported_in_json(daemon):
    write_function(daemon.functions, "slow.py", "import time\ndef handler(e, c):\n    time.sleep(5)\n")
    write_function(daemon.functions, "slow.toml", 'log_format = "JSON"\ntimeout_s = 0.5\n')
    write_function(daemon.functions, "broken.py", "def handler(event, context):\n    return (\n")
    write_function(daemon.functions, "broken.toml", 'log_format = "JSON"\n')
    loaded(daemon, "slow")
    loaded(daemon, "broken")

    slow = daemon.invoke("slow", {})
    request_id = slow.headers["x-amzn-requestid"]
    wait_report(daemon, "slow", request_id)
    texts = request_lines(daemon, "slow", request_id)
    # Lambda's own words for a timeout stay a line of text, before the report.
    assert texts[-2] == f"RequestId: {request_id} Error: Task timed out after 0.50 seconds"
    report, = platform(texts, "platform.report")
    assert report["record"]["status"] == "timeout"
    assert report["record"]["errorType"] == "Sandbox.Timedout"

    broken = daemon.invoke("broken", {})
    request_id = broken.headers["x-amzn-requestid"]
    wait_report(daemon, "broken", request_id)
    texts = request_lines(daemon, "broken", request_id)
    # The runtime logs the error during init; the platform reports the init once it ended,
    # then again for the init it tries in the call's invoke phase.
    assert [r.get("type", r.get("level")) for r in records(texts)] == [
        "WARNING", "ERROR", "platform.initReport", "WARNING", "ERROR", "platform.initReport",
        "platform.start", "platform.report"]
    _, error, init_report, _, again, invoke_report, _, report = records(texts)
    assert [r["record"]["phase"] for r in (init_report, invoke_report)] == ["init", "invoke"]
    for init in (init_report, invoke_report):
        assert init["record"]["status"] == "error"
        assert init["record"]["errorType"] == "Runtime.UserCodeSyntaxError"
    assert error["errorType"] == "Runtime.UserCodeSyntaxError" and error["requestId"] == ""
    assert again == {**error, "timestamp": again["timestamp"]}
    assert report["record"]["status"] == "error"
    assert report["record"]["errorType"] == "Runtime.UserCodeSyntaxError"
    # No initDurationMs: the init tried again is in the call's duration, billed as it.
    metrics = report["record"]["metrics"]
    assert "initDurationMs" not in metrics, metrics
    assert metrics["billedDurationMs"] == max(1, math.ceil(metrics["durationMs"])), metrics


INIT_ERRORS = {
    # One the daemon finds before any worker starts, and one a worker reports.
    "syntax": "def handler(event, context)\n    return 1\n",
    "import": "raise KeyError('missing at import')\ndef handler(event, context):\n    return 1\n",
}


@pytest.mark.parametrize("where", list(INIT_ERRORS))
def test_a_python_init_errors_record_is_awslambdarics_with_no_request_id(daemon, where):
    # awslambdaric logs an init error's document as it posts it (log_error, after a
    # timestamp to the second and the level), and make_error gives it no request id.
    write_function(daemon.functions, "unready.py", INIT_ERRORS[where])
    write_function(daemon.functions, "unready.toml", 'log_format = "JSON"\n')
    loaded(daemon, "unready")
    response = daemon.invoke("unready", {})
    document = response.json()
    request_id = response.headers["x-amzn-requestid"]
    wait_report(daemon, "unready", request_id)
    error = next(r for r in records(request_lines(daemon, "unready", request_id)) if r.get("level") == "ERROR")
    assert list(error) == ["timestamp", "level", "errorMessage", "errorType", "requestId", "stackTrace"]
    assert ISO_SECONDS.fullmatch(error.pop("timestamp")) and error.pop("level") == "ERROR"
    assert error == document and error["requestId"] == "", (error, document)


@pytest.mark.parametrize("level", ["INFO", "WARN", "ERROR"])
@pytest.mark.parametrize("where", list(INIT_ERRORS))
def test_a_python_init_error_is_warned_of_at_warning_level_first(daemon, where, level):
    # awslambdaric (3.1.1 on) logs lambda_unhandled_exception_warning_message with
    # logging.warning before an init error's record: a JSON record of the root logger,
    # which an application log level above WARN leaves out.
    from awslambdaric.lambda_literals import lambda_unhandled_exception_warning_message

    write_function(daemon.functions, "unready.py", INIT_ERRORS[where])
    write_function(daemon.functions, "unready.toml",
                   f'log_format = "JSON"\napplication_log_level = "{level}"\n')
    loaded(daemon, "unready")
    request_id = daemon.invoke("unready", {}).headers["x-amzn-requestid"]
    wait_report(daemon, "unready", request_id)
    found = records(request_lines(daemon, "unready", request_id))
    kinds = [r.get("type", r.get("level")) for r in found]
    warned = ["WARNING"] if level != "ERROR" else []
    attempt = [*warned, "ERROR", "platform.initReport"]  # the init phase's, then the invoke phase's
    assert kinds == [*attempt, *attempt, "platform.start", "platform.report"], kinds
    if warned:
        warning = found[0]
        assert list(warning) == ["timestamp", "level", "message", "logger", "requestId"]
        assert ISO_SECONDS.fullmatch(warning["timestamp"])
        assert warning["message"] == lambda_unhandled_exception_warning_message
        assert (warning["logger"], warning["requestId"]) == ("root", "")


@pytest.mark.parametrize("where", list(INIT_ERRORS))
def test_a_failed_inits_json_log_starts_with_init_start_wherever_it_was_found(daemon, where):
    # A syntax error the daemon finds before starting a worker logs as a worker's failed
    # init does: platform.initStart (no invocation's: request id `-`) first, in the tail too.
    write_function(daemon.functions, "unready.py", INIT_ERRORS[where])
    write_function(daemon.functions, "unready.toml", 'log_format = "JSON"\n')
    loaded(daemon, "unready")
    response = daemon.invoke("unready", {}, **{"X-Amz-Log-Type": "Tail"})
    request_id = response.headers["x-amzn-requestid"]
    attempt = ["WARNING", "ERROR", "platform.initReport"]  # the init phase's, then the invoke phase's
    expected = ["platform.initStart", *attempt, *attempt, "platform.start", "platform.report"]
    wait_report(daemon, "unready", request_id)
    lines = daemon.log_of("unready").splitlines()
    # The one initStart: the init tried again in the call is no new one's.
    init_start, = platform(texts_of(lines, "-"), "platform.initStart")
    assert init_start["record"]["functionName"] == "unready"
    assert init_start["record"]["runtimeVersion"].startswith("python3.")
    assert [r.get("type", r.get("level")) for r in records(texts_of(lines, request_id))] == expected[1:]
    # The tail has them too, from what fits in its 4 KB on (the awslambdaric warnings are long).
    tail = base64.b64decode(response.headers["x-amz-log-result"]).decode().split("\n")
    kinds = [r.get("type", r.get("level")) for r in records(tail[1:])]  # its first line may be cut
    assert kinds and kinds == expected[len(expected) - len(kinds):], tail


NON_ASCII_INIT_ERRORS = {
    # Where the worker's Python decides how awslambdaric writes "café ☕": in the
    # syntax error's frame (found by the daemon), in the message (by a worker).
    "syntax": "x = 'café ☕' +\ndef handler(event, context):\n    return 1\n",
    "import": "raise ValueError('café ☕')\ndef handler(event, context):\n    return 1\n",
}


def assert_init_records_are_awslambdarics(daemon, where: str, version: str) -> None:
    """A failed init's JSON records are the bytes awslambdaric on python`version` writes:
    json's separators, and its escapes (python3.11 and before) or none (3.12 on)."""
    write_function(daemon.functions, "accents.py", NON_ASCII_INIT_ERRORS[where])
    write_function(daemon.functions, "accents.toml", 'log_format = "JSON"\n')
    loaded(daemon, "accents")
    response = daemon.invoke("accents", {})
    document = response.json()
    request_id = response.headers["x-amzn-requestid"]
    wait_report(daemon, "accents", request_id)
    texts = [text for text in request_lines(daemon, "accents", request_id)
             if text.startswith("{") and json.loads(text).get("level") in ("WARNING", "ERROR")]
    assert [json.loads(text)["level"] for text in texts] == ["WARNING", "ERROR"] * 2, texts
    assert texts == awslambdaric_init_records(texts, document, version)
    escaped = tuple(int(part) for part in version.split(".")) < (3, 12)
    errors = [text for text in texts if '"level": "ERROR"' in text]
    assert all(("\\u2615" in text) == escaped and ("☕" in text) != escaped for text in errors), errors


@pytest.mark.parametrize("where", list(NON_ASCII_INIT_ERRORS))
def test_a_python_init_errors_json_records_are_the_bytes_awslambdaric_writes(daemon, where):
    # The daemon writes awslambdaric's records of an init error (its LAMBDA_WARNING and
    # log_error's record) as the worker's Python would: this daemon's own, here.
    assert_init_records_are_awslambdarics(daemon, where, "%d.%d" % sys.version_info[:2])


def test_get_function_reports_the_logging_config_boto3_parses(daemon):
    from test_lambda_api import lambda_client

    write_function(daemon.functions, "plain.py", ORDERS)
    write_function(daemon.functions, "structured.py", ORDERS)
    write_function(daemon.functions, "structured.toml",
                   'log_format = "JSON"\napplication_log_level = "ERROR"\n')
    write_function(daemon.functions, "refused.py", ORDERS)
    write_function(daemon.functions, "refused.toml", 'application_log_level = "DEBUG"\n')
    for name in ("plain", "structured", "refused"):
        loaded(daemon, name)
    lam = lambda_client(daemon.url)
    assert lam.get_function(FunctionName="plain")["Configuration"]["LoggingConfig"] == {
        "LogFormat": "Text", "LogGroup": "/aws/lambda/plain"}
    expected = {"LogFormat": "JSON", "ApplicationLogLevel": "ERROR", "SystemLogLevel": "INFO",
                "LogGroup": "/aws/lambda/structured"}
    assert lam.get_function(FunctionName="structured")["Configuration"]["LoggingConfig"] == expected
    assert lam.get_function_configuration(FunctionName="structured")["LoggingConfig"] == expected
    listed = {f["FunctionName"]: f for f in lam.list_functions()["Functions"]}
    assert listed["structured"]["LoggingConfig"] == expected
    # A level without JSON is refused at load, saying what to write instead.
    problem = ('refused.toml: application_log_level = \'DEBUG\' needs log_format = "JSON": as in '
               "Lambda, log levels are filtered only in JSON logs")
    assert daemon.function("refused")["load_error"] == problem
    structured = daemon.function("structured")
    assert (structured["log_format"], structured["application_log_level"]) == ("JSON", "ERROR")


def test_the_dashboards_log_tail_gives_json_records_their_own_level(daemon):
    write_function(daemon.functions, "orders.py", ORDERS)
    write_function(daemon.functions, "orders.toml", 'log_format = "JSON"\n')
    loaded(daemon, "orders")
    request_id = daemon.invoke("orders", {}).headers["x-amzn-requestid"]
    wait_report(daemon, "orders", request_id)

    def ours() -> list[dict]:
        tail = daemon.get("/system/log?after=0").json()["lines"]
        return [line for line in tail if line["request_id"] == request_id]

    wait_until(lambda: any('"platform.report"' in line["message"] for line in ours()),
               message="the report in the dashboard's tail")
    levels = {line["message"]: line["level"] for line in ours()}
    assert levels["a plain print"] == "info"
    found = {json.loads(m).get("message", json.loads(m).get("type")): level
             for m, level in levels.items() if m.startswith("{")}
    assert found == {"platform.start": "info", "order 7 taken": "info", "stock is low": "warning",
                     "division failed": "error", "platform.report": "info"}


ENV_BOOTSTRAP = f"""\
#!{sys.executable}
# Answers each event with the log settings Lambda gave it.
import json, os, urllib.request

API = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime"
while True:
    with urllib.request.urlopen(API + "/invocation/next") as response:
        request_id = response.headers["Lambda-Runtime-Aws-Request-Id"]
    print("serving", request_id, flush=True)
    body = json.dumps({{key: os.environ.get(key) for key in ("AWS_LAMBDA_LOG_FORMAT", "AWS_LAMBDA_LOG_LEVEL")}})
    urllib.request.urlopen(API + f"/invocation/{{request_id}}/response", data=body.encode()).read()
"""


def test_a_custom_runtime_gets_the_log_settings_and_the_platform_records(daemon):
    write_function(daemon.functions, "custom/bootstrap", ENV_BOOTSTRAP)
    write_function(daemon.functions, "custom/function.toml",
                   'runtime = "provided"\nlog_format = "JSON"\napplication_log_level = "ERROR"\n')
    write_function(daemon.functions, "plain/bootstrap", ENV_BOOTSTRAP)
    loaded(daemon, "custom")
    loaded(daemon, "plain")
    assert daemon.invoke("plain").json() == {"AWS_LAMBDA_LOG_FORMAT": "Text", "AWS_LAMBDA_LOG_LEVEL": None}
    response = daemon.invoke("custom")
    assert response.json() == {"AWS_LAMBDA_LOG_FORMAT": "JSON", "AWS_LAMBDA_LOG_LEVEL": "ERROR"}
    request_id = response.headers["x-amzn-requestid"]
    wait_report(daemon, "custom", request_id)
    texts = request_lines(daemon, "custom", request_id)
    # What the bootstrap writes is its own business: it reaches the log as it is.
    assert f"serving {request_id}" in texts
    assert [r["type"] for r in records(texts)] == ["platform.start", "platform.report"]


FORKED = """
import logging, os, time

logging.getLogger().info("set up in %s", os.getpid())


def handler(event, context):
    time.sleep(event.get("sleep", 0))
    logging.getLogger("forks").info("served by %s", os.getpid())
    return {"pid": os.getpid(), "request_id": context.aws_request_id}
"""


def test_workers_forked_from_a_template_log_json_as_the_first_one(daemon):
    from support import concurrent, parent_of
    from test_zygote import ready_template

    write_function(daemon.functions, "forked.py", FORKED)
    write_function(daemon.functions, "forked.toml", 'log_format = "JSON"\ntimeout_s = 10\n')
    loaded(daemon, "forked")
    first = daemon.invoke("forked").json()
    template = ready_template(daemon, "forked")
    results = concurrent(daemon, "forked", [{"sleep": 2}] * 3)
    forked = [r for r in results if r["pid"] != first["pid"]]
    assert forked and all(parent_of(r["pid"]) == template["pid"] for r in forked), results
    for result in [first, *forked]:
        wait_report(daemon, "forked", result["request_id"])
        served, = records(request_lines(daemon, "forked", result["request_id"]))[1:-1]
        assert (served["level"], served["logger"]) == ("INFO", "forks")
        assert served["message"] == f"served by {result['pid']}"
        assert served["requestId"] == result["request_id"]
    idle = texts_of(daemon.log_of("forked").splitlines(), "-")
    # The template's import logged its record once, for its first fork; each worker its initStart.
    assert sum('"set up in ' in text for text in idle) == 2
    assert len(platform(idle, "platform.initStart")) == 1 + len({r["pid"] for r in forked})
