"""Function lines: on the daemon's stdout every line of an invocation carries its request id,
in text and in JSON; what a worker prints while it loads is logged before its first START."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import faasd

from support import lambda_client, loaded, metric, request_lines, wait_until, write_function

CHATTY = """
import logging, sys

def handler(event, context):
    print("first line")
    print("second line", file=sys.stderr)
    logging.getLogger().warning("through logging")
    return "ok"
"""


def invoke_chatty(daemon) -> str:
    write_function(daemon.functions, "chatty.py", CHATTY)
    loaded(daemon, "chatty")
    response = daemon.invoke("chatty", {})
    assert response.status == 200, response.text
    request_id = response.headers["x-amzn-requestid"]
    wait_until(lambda: f"REPORT RequestId: {request_id}" in daemon.output(), message="the REPORT line")
    return request_id


def test_text_lines_of_an_invocation_all_carry_its_request_id(daemon):
    request_id = invoke_chatty(daemon)
    lines = [line for line in daemon.output().splitlines() if "[chatty]" in line]
    # The new worker's INIT_START belongs to no invocation: `-` for a request id.
    assert [line.split("[chatty] - ", 1)[1].split()[0] for line in lines if "[chatty] - " in line] == [
        "INIT_START"]
    lines = [line for line in lines if "[chatty] - " not in line]
    texts = [line.split(request_id, 1)[1].strip() if request_id in line else line for line in lines]
    assert any(t.startswith("START RequestId") for t in texts)
    assert "first line" in texts and "second line" in texts
    assert any("through logging" in t for t in texts)
    assert any(t.startswith("REPORT RequestId") for t in texts)
    assert all(request_id in line for line in lines), [l for l in lines if request_id not in l]


def test_a_logging_record_is_one_line_in_lambdas_text_format(daemon):
    request_id = invoke_chatty(daemon)
    lines = request_lines(daemon, "chatty", request_id)
    printed = lines[1:lines.index(f"END RequestId: {request_id}")]
    assert sorted(printed[:2]) == ["first line", "second line"]  # stdout and stderr, either first
    level, stamp, rid, message = printed[2].split("\t")
    assert (level, rid, message) == ("[WARNING]", request_id, "through logging")
    assert stamp.endswith("Z") and len(stamp) == len("2026-01-02T03:04:05.678Z")
    assert len(printed) == 3, printed  # no empty line after the record


@pytest.mark.parametrize("how", ["flag", "config"])
def test_json_lines_are_one_object_each_with_function_and_request_id(start_daemon, functions_dir,
                                                                     tmp_path, how):
    if how == "flag":
        daemon = start_daemon(functions_dir, args=["--log-format", "json"])
    else:
        config = tmp_path / "faasd.toml"
        config.write_text('[log]\nformat = "json"\n')
        daemon = start_daemon(functions_dir, config=config)
    request_id = invoke_chatty(daemon)
    entries = [json.loads(line) for line in daemon.output().splitlines() if line.strip()]
    assert all({"time", "level", "message"} <= set(entry) for entry in entries)
    ours = [entry for entry in entries if entry.get("function") == "chatty"]
    assert [entry["message"].split()[0] for entry in ours if entry["request_id"] == "-"] == ["INIT_START"]
    ours = [entry for entry in ours if entry["request_id"] != "-"]
    messages = [entry["message"] for entry in ours]
    assert "first line" in messages and "second line" in messages
    assert any(m.startswith("REPORT RequestId") for m in messages)
    assert all(entry["request_id"] == request_id for entry in ours)
    # The daemon's own lines are JSON too.
    assert any(entry.get("logger") == "faasd" and entry["message"].startswith("listening on")
               for entry in entries)


LOUD = """
def handler(event, context):
    for i in range(event["lines"]):
        print(f"call {event['call']} line {i} " + "x" * 200)
    return event["call"]
"""


def test_function_logs_are_rotated_by_size_and_read_across_files(start_daemon, functions_dir, tmp_path):
    config = tmp_path / "faasd.toml"
    config.write_text("[log]\nmax_file_mb = 1\nkeep_files = 2\n")
    daemon = start_daemon(functions_dir, config=config)
    write_function(daemon.functions, "loud.py", LOUD)
    loaded(daemon, "loud")
    for call in range(14):  # about 280 KB each: 3.8 MB in all, past three 1 MB files
        assert daemon.invoke("loud", {"call": call, "lines": 1200}).json() == call
    logs = daemon.data / "logs"
    assert sorted(p.name for p in logs.glob("loud.log*")) == ["loud.log", "loud.log.1", "loud.log.2"]
    assert all(p.stat().st_size < 1.4 * 1024 * 1024 for p in logs.glob("loud.log*"))
    # `faasd logs` (the log API) reads through the rotated files: the last
    # five calls (1,203 lines each) are more than loud.log holds.
    assert len((logs / "loud.log").read_text().splitlines()) < 5 * 1203
    tail = daemon.log_of("loud").splitlines()[-5 * 1203:]
    assert "\tSTART RequestId:" in tail[0] and "call 9 line 0 " in tail[1]
    assert sum("\tREPORT RequestId:" in line for line in tail) == 5
    assert "call 13 line 1199 " in tail[-3]
    # SIGHUP reopens the files, for an external logrotate that moves them.
    (logs / "loud.log").rename(logs / "loud.log.moved")
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in daemon.output(), message="the reload")
    assert daemon.invoke("loud", {"call": 14, "lines": 1}).json() == 14
    wait_until(lambda: (logs / "loud.log").exists() and "\tREPORT RequestId:" in (logs / "loud.log").read_text(),
               message="a new loud.log")
    assert "call 14 line 0" not in (logs / "loud.log.moved").read_text()


# What each runtime prints while it loads the function, and then in a call.
INIT_PRINTS = {
    "python": ("hello.py", """
        import sys
        print("init says hello")
        print("init warns", file=sys.stderr)
        def handler(event, context):
            print("handler says hi")
            return 1
    """),
    "node": ("hello.js", """
        console.log("init says hello");
        process.stderr.write("init warns\\n");
        exports.handler = async () => { console.log("handler says hi"); return 1; };
    """),
    "provided": ("hello/bootstrap", f"""\
        #!{sys.executable}
        import os, sys, urllib.request
        print("init says hello", flush=True)
        print("init warns", file=sys.stderr, flush=True)
        API = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime/invocation/"
        while True:
            with urllib.request.urlopen(API + "next") as event:
                request_id = event.headers["Lambda-Runtime-Aws-Request-Id"]
            print("handler says hi", flush=True)
            urllib.request.urlopen(urllib.request.Request(API + request_id + "/response", b"1")).read()
    """),
}


def said(lines: list[str], text: str) -> bool:
    """Whether one of `lines` ends with `text` (Node's lines start with a time and a request id)."""
    return any(line.endswith(text) for line in lines)


def call_hello(daemon, runtime: str) -> tuple[str, list[str], list[str]]:
    """Invoke the `hello` function of `runtime` once, cold: its request id, its log
    tail (X-Amz-Log-Result) and the function's log, as texts."""
    if runtime == "node" and shutil.which("node") is None:
        pytest.skip("node is not installed")
    path, source = INIT_PRINTS[runtime]
    write_function(daemon.functions, path, source)
    loaded(daemon, "hello")
    response = daemon.invoke("hello", **{"X-Amz-Log-Type": "Tail"})
    assert response.status == 200 and response.json() == 1, response.text
    request_id = response.headers["x-amzn-requestid"]
    tail = base64.b64decode(response.headers["x-amz-log-result"]).decode().splitlines()
    report = f"REPORT RequestId: {request_id}"
    wait_until(lambda: report in daemon.log_of("hello") and report in daemon.output(), message=report)
    log = [line.split("\t", 2)[2] for line in daemon.log_of("hello").splitlines()]
    return request_id, tail, log


@pytest.mark.parametrize("runtime", ["python", "node", "provided"])
def test_what_a_function_prints_while_it_loads_is_logged_before_its_first_start(daemon, runtime):
    request_id, tail, log = call_hello(daemon, runtime)
    start = f"START RequestId: {request_id} Version: $LATEST"
    for lines in (tail, log):
        before, after = lines[:lines.index(start)], lines[lines.index(start):]
        assert said(before, "init says hello") and said(before, "init warns"), lines
        assert said(after, "handler says hi") and not said(after, "init says hello"), lines
    # The daemon's stdout has each line once, as every function line.
    assert daemon.output().count("init says hello") == 1, daemon.output()


@pytest.mark.parametrize("runtime", ["python", "node", "provided"])
def test_a_cold_start_logs_init_start_with_the_runtime_version_first(daemon, runtime):
    request_id, tail, log = call_hello(daemon, runtime)
    configuration = daemon.get("/2015-03-31/functions/hello").json()["Configuration"]
    region = configuration["FunctionArn"].split(":")[3]
    version = f"{configuration['Runtime']}:faasd-{faasd.__version__}"
    init_start = re.compile(rf"INIT_START Runtime Version: {re.escape(version)}\t"
                            rf"Runtime Version ARN: arn:aws:lambda:{region}::runtime:[0-9a-f]{{64}}")
    for lines in (tail, log):
        assert init_start.fullmatch(lines[0]), lines
        assert said(lines[1:lines.index(f"START RequestId: {request_id} Version: $LATEST")], "init says hello")
    # One INIT_START for each new worker: a warm call adds none.
    response = daemon.invoke("hello", **{"X-Amz-Log-Type": "Tail"})
    assert "INIT_START" not in base64.b64decode(response.headers["x-amz-log-result"]).decode()
    wait_until(lambda: f"REPORT RequestId: {response.headers['x-amzn-requestid']}" in daemon.log_of("hello"),
               message="the warm call's REPORT")
    log = [line.split("\t", 2)[2] for line in daemon.log_of("hello").splitlines()]
    assert sum(text.startswith("INIT_START") for text in log) == 1, log


STREAM_NAMES = {
    "python": ("stream.py", "def handler(event, context):\n    return context.log_stream_name\n"),
    "node": ("stream.js", "exports.handler = async (event, context) => context.logStreamName;\n"),
    "provided": ("stream/bootstrap", f"""\
        #!{sys.executable}
        import json, os, urllib.request
        API = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime/invocation/"
        while True:
            with urllib.request.urlopen(API + "next") as event:
                request_id = event.headers["Lambda-Runtime-Aws-Request-Id"]
            name = json.dumps(os.environ["AWS_LAMBDA_LOG_STREAM_NAME"]).encode()
            urllib.request.urlopen(urllib.request.Request(API + request_id + "/response", name)).read()
    """),
}


@pytest.mark.parametrize("runtime", ["python", "node", "provided"])
def test_a_workers_log_stream_name_is_lambdas_and_lasts_its_life(daemon, runtime):
    if runtime == "node" and shutil.which("node") is None:
        pytest.skip("node is not installed")
    path, source = STREAM_NAMES[runtime]
    write_function(daemon.functions, path, source)
    loaded(daemon, "stream")
    days = {time.strftime("%Y/%m/%d", time.gmtime(time.time() + offset)) for offset in (-5, 0)}
    first, second = (daemon.invoke("stream").json() for _ in range(2))
    assert first == second  # one worker served both
    match = re.fullmatch(r"(\d{4}/\d{2}/\d{2})/\[\$LATEST\][0-9a-f]{32}", first)
    assert match and match.group(1) in days, first


PIECES = """
import json, sys

def handler(event, context):
    if event.get("again"):
        print("second call")
        return 2
    print(json.dumps({"a": 1, "b": 2}, indent=1))
    sys.stdout.write("p1\\np2"); sys.stdout.write(" rest\\n"); print("last")
    print("flushed", end="", flush=True); print(" then ended")
    sys.stdout.write("out part"); sys.stderr.write("err line\\n"); sys.stdout.write(" more\\n")
    sys.stdout.write("no newline")
    return 1
"""

PIECES_PRINTED = ["{", ' "a": 1,', ' "b": 2', "}", "p1", "p2 rest", "last", "flushed then ended",
                  "err line", "out part more", "no newline"]


def contains(lines: list[str], part: list[str]) -> bool:
    return any(lines[index:index + len(part)] == part for index in range(len(lines)))


@pytest.mark.parametrize("log_format", ["Text", "JSON"])
def test_what_python_prints_in_pieces_is_logged_as_the_lines_a_terminal_shows(daemon, log_format):
    write_function(daemon.functions, "pieces.py", PIECES)
    write_function(daemon.functions, "pieces.toml", f'log_format = "{log_format}"\n')
    loaded(daemon, "pieces")
    lam = lambda_client(daemon.url)
    first = lam.invoke(FunctionName="pieces", Payload=b"{}", LogType="Tail")
    assert json.loads(first["Payload"].read()) == 1
    tail = base64.b64decode(first["LogResult"]).decode().splitlines()
    request_id = first["ResponseMetadata"]["RequestId"]
    second = daemon.invoke("pieces", {"again": True})
    assert second.json() == 2
    again = second.headers["x-amzn-requestid"]
    for rid in (request_id, again):
        wait_until(lambda: "REPORT RequestId: " + rid in daemon.log_of("pieces")
                   or '"platform.report"' in "".join(request_lines(daemon, "pieces", rid)),
                   message="the REPORT of " + rid)
    lines = request_lines(daemon, "pieces", request_id)
    for found in (lines, tail):
        assert contains(found, PIECES_PRINTED), found
        assert "" not in found, found
    # A line left without its newline is its call's own: the next call's starts afresh.
    assert "no newline" not in "".join(request_lines(daemon, "pieces", again))
    assert "second call" in request_lines(daemon, "pieces", again)
    # The daemon's stdout has the same lines.
    output = [line.split(f"{request_id} ", 1)[1] for line in daemon.output().splitlines()
              if f"[pieces] {request_id} " in line]
    assert contains(output, PIECES_PRINTED), output


CHATTY_FAIL = """
def handler(event, context):
    for i in range(12000):
        print(f"l {i}")
    raise ValueError("the real cause")
"""


def test_the_log_tail_of_a_chatty_call_ends_with_its_error_end_and_report(daemon):
    write_function(daemon.functions, "talker.py", CHATTY_FAIL)
    loaded(daemon, "talker")
    response = lambda_client(daemon.url).invoke(FunctionName="talker", Payload=b"{}", LogType="Tail")
    assert response["FunctionError"] == "Unhandled"
    request_id = response["ResponseMetadata"]["RequestId"]
    tail = base64.b64decode(response["LogResult"]).decode().splitlines()
    end = tail.index(f"END RequestId: {request_id}")
    assert tail[end + 1].startswith(f"REPORT RequestId: {request_id}") and len(tail) == end + 2, tail
    assert "[ERROR] ValueError: the real cause" in tail, tail
    assert tail[end - 1].endswith('raise ValueError("the real cause")'), tail
    printed = [line for line in tail if line.startswith("l ")]
    assert printed and printed[-1] == "l 11999", tail
    # The dashboard's invoke answers with the same end.
    body = daemon.post("/system/functions/talker/invoke", {}).json()
    assert body["logTail"].splitlines()[-1].startswith(f"REPORT RequestId: {body['requestId']}")
    assert "[ERROR] ValueError: the real cause" in body["logTail"]


FD_WRITER = """
import os, subprocess
def handler(event, context):
    mark = context.aws_request_id[:8]
    subprocess.run(["sh", "-c", f"echo child-{mark}"], check=True)
    os.write(1, f"raw-{mark}\\n".encode())
    return "ok"
"""


@pytest.mark.parametrize("runtime", ["python", "node"])
def test_what_a_call_writes_to_its_stdout_descriptor_is_in_that_calls_log(daemon, runtime):
    # Output of a child process, or of a write to fd 1, travels apart from the
    # runtime's answer: it is still that call's, before its END (and in its tail).
    if runtime == "python":
        write_function(daemon.functions, "fdwriter.py", FD_WRITER)
    else:
        write_function(daemon.functions, "fdwriter.mjs", """
            import { execFileSync } from "node:child_process";
            import { writeSync } from "node:fs";
            export const handler = async (event, context) => {
              const mark = context.awsRequestId.slice(0, 8);
              execFileSync("sh", ["-c", `echo child-${mark}`], { stdio: "inherit" });
              writeSync(1, `raw-${mark}\\n`);
              return "ok";
            };
        """)
    loaded(daemon, "fdwriter")

    def call(_: int) -> str:
        response = daemon.invoke("fdwriter", {}, **{"X-Amz-Log-Type": "Tail"})
        assert response.status == 200, response.text
        mark = response.headers["x-amzn-requestid"][:8]
        tail = base64.b64decode(response.headers["x-amz-log-result"]).decode()
        end = tail.index("END RequestId")
        return "" if f"child-{mark}" in tail[:end] and f"raw-{mark}" in tail[:end] else tail

    with ThreadPoolExecutor(8) as pool:
        misplaced = [tail for tail in pool.map(call, range(200)) if tail]
    assert misplaced == [], misplaced[:3]


ERRORS = {
    # An error raised by the handler, by the module's own code at import, by an
    # import the module makes, and one the daemon finds before any worker starts.
    "invoke": ("def helper():\n    raise ValueError('refused')\ndef handler(event, context):\n    helper()\n",
               "ValueError"),
    "init": ("raise KeyError('missing at import')\ndef handler(event, context):\n    return 1\n", "KeyError"),
    "import": ("import no_such_package\ndef handler(event, context):\n    return 1\n",
               "Runtime.ImportModuleError"),
    "syntax": ("def handler(event, context)\n    return 1\n", "Runtime.UserCodeSyntaxError"),
}


def awslambdaric_record(error: dict) -> str:
    """What awslambdaric's log_error writes for an error document in Text logs (the
    sink it uses outside Lambda joins the lines of the record with \\r)."""
    import contextlib
    import io

    from awslambdaric import bootstrap

    written = io.StringIO()
    with contextlib.redirect_stdout(written):
        bootstrap.log_error(error, bootstrap.StandardLogSink())
    return written.getvalue().removesuffix("\n")


@pytest.mark.parametrize("where", list(ERRORS))
def test_a_python_error_is_logged_as_awslambdarics_one_record(daemon, where):
    # "[ERROR] Type: message", then "Traceback (most recent call last):" and the
    # frames (their indents no-break spaces), joined by \r into one record.
    source, error_type = ERRORS[where]
    write_function(daemon.functions, "failing.py", source)
    loaded(daemon, "failing")
    response = daemon.invoke("failing", **{"X-Amz-Log-Type": "Tail"})
    error = response.json()
    assert response.headers["x-amz-function-error"] == "Unhandled" and error["errorType"] == error_type, error
    request_id = response.headers["x-amzn-requestid"]
    wait_until(lambda: f"REPORT RequestId: {request_id}" in daemon.log_of("failing"), message="the REPORT")
    # Split at newlines only: a record's lines are joined by \r.
    lines = [line.split("\t", 2)[2] for line in daemon.log_of("failing").split("\n")
             if line.split("\t")[1:2] == [request_id]]
    records = [line for line in lines if line.startswith("[ERROR]")]
    # An init error is logged twice: Lambda tries the failed init again in the call.
    assert records == [awslambdaric_record(error)] * (1 if where == "invoke" else 2), lines
    record = records[0]
    assert record.startswith(f"[ERROR] {error_type}: ") and "\rTraceback (most recent call last):" in record
    assert ("\r\u00a0\u00a0File " in record) == bool(error["stackTrace"]), record
    assert "Traceback" not in "\n".join(line for line in lines if line != record), lines
    # awslambdaric warns of an unhandled exception before an init error's record only.
    warnings = [line for line in lines if "LAMBDA_WARNING" in line]
    assert warnings == ([] if where == "invoke" else [
        lines[index - 1] for index, line in enumerate(lines) if line == record]), lines


def awslambdaric_warning() -> re.Pattern:
    """The line awslambdaric's `logging.warning(lambda_unhandled_exception_warning_message)`
    writes at init in Text logs: level, time, an empty request id, the message (its \\r too)."""
    from awslambdaric.lambda_literals import lambda_unhandled_exception_warning_message

    return re.compile(r"\[WARNING\]\t\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\t\t"
                      + re.escape(lambda_unhandled_exception_warning_message))


@pytest.mark.parametrize("where", ["init", "import", "syntax"])
def test_a_failed_init_is_tried_again_in_the_calls_invoke_phase(daemon, where):
    # awslambdaric logs the error while it initialises, then reports it (post_init_error);
    # Lambda writes INIT_REPORT once the init phase has ended, then tries the init again
    # in the call's invoke phase (a new runtime: no INIT_START), which logs the same and
    # its own INIT_REPORT, `Phase: invoke`; START, END and REPORT follow.
    source, error_type = ERRORS[where]
    write_function(daemon.functions, "broken.py", "import os\nprint('imported by', os.getpid())\n" + source
                   if where != "syntax" else source)
    loaded(daemon, "broken")
    response = daemon.invoke("broken", **{"X-Amz-Log-Type": "Tail"})
    request_id = response.headers["x-amzn-requestid"]
    assert response.json()["errorType"] == error_type
    wait_until(lambda: f"REPORT RequestId: {request_id}" in daemon.log_of("broken"), message="the REPORT")
    logged = daemon.log_of("broken").split("\n")
    texts = [line.split("\t", 2)[2] for line in logged if line.count("\t") >= 2]
    kinds = [re.split(r"[ \t]", text, maxsplit=1)[0] for text in texts]
    # A syntax error the daemon finds before starting a worker has INIT_START too, but no prints.
    printed = ["imported"] if where != "syntax" else []
    attempt = [*printed, "[WARNING]", "[ERROR]", "INIT_REPORT"]
    assert kinds == ["INIT_START", *attempt, *attempt, "START", "END", "REPORT"], texts
    init_reports = [text for text in texts if text.startswith("INIT_REPORT ")]
    assert [report.split("\t")[1:] for report in init_reports] == [
        [f"Phase: {phase}", "Status: error", f"Error Type: {error_type}"] for phase in ("init", "invoke")]
    for text in texts:
        if text.startswith("[WARNING]"):
            assert awslambdaric_warning().fullmatch(text), text
    if printed:  # two imports, in two processes
        pids = {text.split()[-1] for text in texts if text.startswith("imported by ")}
        assert len(pids) == 2, texts
    # INIT_START belongs to no invocation, as a worker's: `-` for a request id; the
    # lines of the call are its own, the retried init's prints are no call's either.
    [init_start] = [line for line in logged if "\tINIT_START " in line]
    assert init_start.split("\t")[1] == "-"
    assert all(line.split("\t")[1] == request_id for line in logged
               if "\tINIT_REPORT " in line or "LAMBDA_WARNING" in line), logged
    # The call's REPORT: the init tried again is in its Duration, billed as it; no Init Duration.
    report = texts[-1]
    assert "Init Duration" not in report and report.endswith(f"\tStatus: error\tError Type: {error_type}")
    duration = float(re.search(r"\tDuration: ([\d.]+) ms", report).group(1))
    billed = int(re.search(r"\tBilled Duration: (\d+) ms", report).group(1))
    assert billed == max(1, math.ceil(duration)), report
    invoke_init = float(re.search(r"Init Duration: ([\d.]+) ms", init_reports[1]).group(1))
    assert duration >= invoke_init, (report, init_reports)
    # The call's tail has the same, as much as fits in 4 KB.
    tail = base64.b64decode(response.headers["x-amz-log-result"]).decode().split("\n")
    assert tail[-4:-1] == texts[-3:], tail


def test_an_init_that_fails_once_serves_the_call_from_its_second_try(daemon):
    # Lambda's init tried again in the invoke phase may succeed: the call is served. It
    # reports no second init ("a suppressed init": no INIT_REPORT for it); the call's
    # REPORT has no Init Duration, its Duration covering that init.
    # Each init asks the test whether to fail (a worker's /tmp is its own): the first does.
    listener = socket.create_server(("127.0.0.1", 0))
    answers = iter([b"fail"])

    def answer() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            with connection:
                connection.sendall(next(answers, b"pass"))

    with listener:
        threading.Thread(target=answer, daemon=True).start()
        write_function(daemon.functions, "flaky.py", f"""
            import socket
            with socket.create_connection(("127.0.0.1", {listener.getsockname()[1]})) as asking:
                if asking.recv(4) == b"fail":
                    raise RuntimeError("the first init fails")
            print("the second init passes")
            def handler(event, context):
                return "served"
        """)
        loaded(daemon, "flaky")
        response = daemon.invoke("flaky", **{"X-Amz-Log-Type": "Tail"})
        assert "x-amz-function-error" not in response.headers, response.text
        assert response.json() == "served"
        request_id = response.headers["x-amzn-requestid"]
        tail = base64.b64decode(response.headers["x-amz-log-result"]).decode().split("\n")
        kinds = [re.split(r"[ \t]", line, maxsplit=1)[0] for line in tail if line]
        assert kinds == ["INIT_START", "[WARNING]", "[ERROR]", "INIT_REPORT", "the", "START", "END", "REPORT"], tail
        assert tail[3].endswith("\tPhase: init\tStatus: error\tError Type: RuntimeError"), tail
        report = tail[-2]
        assert report.startswith(f"REPORT RequestId: {request_id}\t") and "Init Duration" not in report, report
        assert "Status" not in report, report
        # The next call is a warm one on the worker that served; the first was a cold start.
        again = daemon.invoke("flaky", **{"X-Amz-Log-Type": "Tail"})
        assert again.json() == "served"
        assert "INIT" not in base64.b64decode(again.headers["x-amz-log-result"]).decode()
        assert metric(daemon, "faasd_cold_starts_total", function="flaky") == 1


def test_a_function_that_cannot_load_logs_a_failed_init_from_init_start(daemon):
    # A setting faasd refuses at load fails the init as the code's errors do: the same
    # lines, INIT_START first. No runtime caught it (no awslambdaric warning nor record):
    # it is said as Lambda says what it finds itself, a line of the call.
    write_function(daemon.functions, "misset.py", "def handler(event, context):\n    return 1\n")
    write_function(daemon.functions, "misset.toml", 'timeout_s = "soon"\n')
    loaded(daemon, "misset")
    response = daemon.invoke("misset", **{"X-Amz-Log-Type": "Tail"})
    error = response.json()
    assert error["errorType"] == "Runtime.InvalidConfiguration", response.text
    request_id = response.headers["x-amzn-requestid"]
    assert error["errorMessage"].startswith(f"RequestId: {request_id} Error: "), error
    tail = base64.b64decode(response.headers["x-amz-log-result"]).decode().split("\n")
    kinds = [line.split(" ", 1)[0] for line in tail if line]
    # Found again in the call's invoke phase, as the runtime would find it: a second INIT_REPORT.
    assert kinds == ["INIT_START", "INIT_REPORT", "INIT_REPORT", "START", "RequestId:", "END", "REPORT"], tail
    assert error["errorMessage"] in tail, tail
    runtime = daemon.get("/2015-03-31/functions/misset").json()["Configuration"]["Runtime"]
    assert tail[0].startswith(f"INIT_START Runtime Version: {runtime}:faasd-{faasd.__version__}\t"), tail


EXITS = {
    # awslambdaric's run() catches Exception at import, not SystemExit or
    # KeyboardInterrupt: those end the runtime's process as Python ends it.
    "exit3": ("import sys\nsys.exit(3)\n", "Runtime exited with error: exit status 3", None),
    "exit0": ("import sys\nsys.exit()\n", "Runtime exited without providing a reason", None),
    "said": ("raise SystemExit('no config, giving up')\n", "Runtime exited with error: exit status 1",
             "no config, giving up"),
    "interrupted": ("raise KeyboardInterrupt\n", "Runtime exited with error: signal: interrupt",
                    "KeyboardInterrupt"),
}


@pytest.mark.parametrize("how", list(EXITS))
def test_a_python_module_that_exits_at_import_is_a_runtime_exit_error(daemon, how):
    # Lambda reports the runtime's exit itself, in its words for the call: no error of the
    # runtime's (no LAMBDA_WARNING, no [ERROR] record), its line between START and END.
    source, words, printed = EXITS[how]
    write_function(daemon.functions, "quits.py", source + "def handler(event, context):\n    return 1\n")
    loaded(daemon, "quits")
    response = daemon.invoke("quits", **{"X-Amz-Log-Type": "Tail"})
    request_id = response.headers["x-amzn-requestid"]
    assert response.headers["x-amz-function-error"] == "Unhandled", response.text
    error = response.json()
    assert (error["errorType"], error["errorMessage"]) == (
        "Runtime.ExitError", f"RequestId: {request_id} Error: {words}"), error
    tail = base64.b64decode(response.headers["x-amz-log-result"]).decode().split("\n")
    assert not [line for line in tail if "LAMBDA_WARNING" in line or line.startswith("[ERROR]")], tail
    start, end = tail.index(f"START RequestId: {request_id} Version: $LATEST"), tail.index(f"END RequestId: {request_id}")
    assert tail[start + 1:end] == [f"RequestId: {request_id} Error: {words}"], tail
    assert any(line.startswith("INIT_REPORT ") and line.endswith("Error Type: Runtime.ExitError") for line in tail)
    if printed:  # what Python itself writes to stderr as it exits
        assert any(printed in line for line in tail[:start]), tail


def test_nodes_runtime_logs_no_unhandled_exception_warning(daemon):
    # Lambda's Node.js runtime logs an init error ("Init Error") and a handler's ("Invoke
    # Error") with no LAMBDA_WARNING before them: only awslambdaric has one.
    write_function(daemon.functions, "nodeinit.js", "throw new Error('at load');\n")
    write_function(daemon.functions, "nodecall.js",
                   "exports.handler = async () => { throw new Error('in the call'); };\n")
    for name in ("nodeinit", "nodecall"):
        loaded(daemon, name)
        response = daemon.invoke(name, **{"X-Amz-Log-Type": "Tail"})
        assert response.headers["x-amz-function-error"] == "Unhandled", response.text
        tail = base64.b64decode(response.headers["x-amz-log-result"]).decode()
        assert "Error: " in tail and "LAMBDA_WARNING" not in tail, tail


def test_a_python_errors_multi_line_message_stays_one_record(daemon):
    write_function(daemon.functions, "lines.py", "def handler(event, context):\n    raise ValueError('one\\ntwo')\n")
    loaded(daemon, "lines")
    response = daemon.invoke("lines", **{"X-Amz-Log-Type": "Tail"})
    tail = base64.b64decode(response.headers["x-amz-log-result"]).decode().split("\n")
    [record] = [line for line in tail if line.startswith("[ERROR]")]
    assert record.startswith("[ERROR] ValueError: one\rtwo\rTraceback (most recent call last):\r"), tail
    assert "two" not in [line for line in tail if line != record], tail
