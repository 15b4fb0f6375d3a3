"""AWS's own clients against a real daemon: boto3's Lambda client and the aws CLI."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from botocore.exceptions import ClientError

from probe import PROBE_HANDLER, Probe
from support import (CALLER_TRACE, ROOT, BodyStaller, assert_new_trace_id, lambda_client, newer_python, request_lines,
                     wait_until, write_function)

ECHO = """
def handler(event, context):
    print("echo got", event)
    return {"event": event, "request_id": context.aws_request_id,
            "arn": context.invoked_function_arn}
"""

FAIL = """
def handler(event, context):
    raise ValueError("the input was not what I wanted")
"""

SLEEPY = """
import time
def handler(event, context):
    time.sleep(10)
"""

CHATTY = """
def handler(event, context):
    for i in range(5):
        print(str(i) * 2000)
    return "ok"
"""


@pytest.fixture
def probe() -> Iterator[Probe]:
    probe = Probe()
    yield probe
    probe.close()


@pytest.fixture
def lam(daemon):
    write_function(daemon.functions, "echo.toml", "memory_mb = 256\ntimeout_s = 7\n")
    write_function(daemon.functions, "echo.py", ECHO)
    wait_loaded(daemon, "echo")
    return lambda_client(daemon.url)


def wait_loaded(daemon, *names: str) -> None:
    for name in names:
        wait_until(lambda: daemon.get(f"/system/functions/{name}").status == 200,
                   message=f"{name} to load")


def test_request_response_returns_the_result_and_the_handlers_request_id(daemon, lam):
    response = lam.invoke(FunctionName="echo", Payload=json.dumps({"k": [1, 2]}).encode())
    assert response["StatusCode"] == 200
    assert "FunctionError" not in response
    assert response["ExecutedVersion"] == "$LATEST"
    result = json.loads(response["Payload"].read())
    assert result["event"] == {"k": [1, 2]}
    assert result["request_id"] == response["ResponseMetadata"]["RequestId"]
    assert result["arn"] == "arn:aws:lambda:us-east-1:000000000000:function:echo"


def test_log_type_tail_returns_the_invocations_own_log(daemon, lam):
    response = lam.invoke(FunctionName="echo", Payload=b'{"n": 1}', LogType="Tail")
    request_id = response["ResponseMetadata"]["RequestId"]
    log = base64.b64decode(response["LogResult"]).decode()
    lines = log.splitlines()
    # A cold start: the new worker's INIT_START comes first, then the invocation's lines.
    assert lines[0].startswith("INIT_START Runtime Version: ")
    assert lines[1] == f"START RequestId: {request_id} Version: $LATEST"
    assert "echo got {'n': 1}" in lines
    assert f"END RequestId: {request_id}" in lines
    assert re.match(rf"REPORT RequestId: {request_id}\tDuration: [\d.]+ ms\tBilled Duration: \d+ ms\t"
                    r"Memory Size: 256 MB\tMax Memory Used: \d+ MB", lines[-1])
    # Without LogType there is no log in the answer.
    assert "LogResult" not in lam.invoke(FunctionName="echo", Payload=b"{}")


def refused(call, error_type: str, status: int, *, modeled: bool = True) -> dict:
    """The error response of `call`, which Lambda refuses with `error_type` and `status`:
    botocore's class of that name (ClientError where Lambda's model names none)."""
    with pytest.raises(ClientError) as caught:
        call()
    response = caught.value.response
    assert response["Error"]["Code"] == error_type, response
    assert response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-errortype"] == error_type
    assert (type(caught.value).__name__ == error_type) is modeled
    return response


def test_an_invocation_or_log_type_outside_lambdas_enums_is_a_validation_exception(daemon, lam):
    # AWS's front end refuses values outside the API model before Lambda looks at the call:
    # ValidationException, a code botocore has no class for; the function is not looked up.
    assert "LogResult" not in lam.invoke(FunctionName="echo", Payload=b"{}", LogType="None")
    runs = daemon.log_of("echo").count("START RequestId")
    for name in ("echo", "ghost"):
        for invocation_type in ("RequestResponse", "Event"):
            error = refused(lambda: lam.invoke(FunctionName=name, Payload=b"{}", LogType="Bogus",
                                               InvocationType=invocation_type), "ValidationException", 400,
                            modeled=False)
            assert error["Error"]["Message"] == (
                "1 validation error detected: Value 'Bogus' at 'logType' failed to satisfy constraint: "
                "Member must satisfy enum value set: [None, Tail]")
        error = refused(lambda: lam.invoke(FunctionName=name, InvocationType="Later", Payload=b"{}"),
                        "ValidationException", 400, modeled=False)
        assert error["Error"]["Message"] == (
            "1 validation error detected: Value 'Later' at 'invocationType' failed to satisfy constraint: "
            "Member must satisfy enum value set: [Event, RequestResponse, DryRun]")
    error = refused(lambda: lam.invoke(FunctionName="echo", InvocationType="Later", LogType="Bogus"),
                    "ValidationException", 400, modeled=False)
    assert error["Error"]["Message"] == (
        "2 validation errors detected: Value 'Later' at 'invocationType' failed to satisfy constraint: "
        "Member must satisfy enum value set: [Event, RequestResponse, DryRun]; Value 'Bogus' at 'logType' "
        "failed to satisfy constraint: Member must satisfy enum value set: [None, Tail]")
    # AWS's body for it is only {"message"}.
    raw = daemon.invoke("echo", **{"X-Amz-Invocation-Type": "Later"})
    assert raw.status == 400 and raw.headers["x-amzn-errortype"] == "ValidationException"
    assert list(raw.json()) == ["message"]
    assert daemon.log_of("echo").count("START RequestId") == runs


def test_log_tail_is_the_last_4_kb(daemon, lam):
    write_function(daemon.functions, "chatty.py", CHATTY)
    wait_loaded(daemon, "chatty")
    response = lam.invoke(FunctionName="chatty", LogType="Tail")
    log = base64.b64decode(response["LogResult"])
    assert 3000 < len(log) <= 4096
    assert log.decode().splitlines()[-1].startswith("REPORT RequestId:")
    assert not log.startswith(b"START")


def test_a_failed_run_is_200_with_function_error_unhandled(daemon, lam):
    write_function(daemon.functions, "fail.py", FAIL)
    wait_loaded(daemon, "fail")
    response = lam.invoke(FunctionName="fail", Payload=b"{}")
    assert response["StatusCode"] == 200
    assert response["FunctionError"] == "Unhandled"
    error = json.loads(response["Payload"].read())
    # awslambdaric's error document, the call's request id included.
    assert list(error) == ["errorMessage", "errorType", "requestId", "stackTrace"]
    assert error["errorMessage"] == "the input was not what I wanted"
    assert error["errorType"] == "ValueError"
    assert error["requestId"] == response["ResponseMetadata"]["RequestId"]
    assert isinstance(error["stackTrace"], list) and error["stackTrace"]
    assert any("fail.py" in frame for frame in error["stackTrace"])


def test_a_python_handler_returning_bytes_answers_with_those_bytes(daemon, lam):
    # awslambdaric posts a bytes result as it is, not as JSON: the caller gets the bytes.
    write_function(daemon.functions, "raw.py", """
def handler(event, context):
    return bytes.fromhex(event["hex"])
""")
    wait_loaded(daemon, "raw")
    for data in (b"plain text", b"\x89PNG\r\n\x1a\n\x00\xff"):
        response = lam.invoke(FunctionName="raw", Payload=json.dumps({"hex": data.hex()}))
        assert "FunctionError" not in response, response["Payload"].read()
        assert response["Payload"].read() == data


def test_a_python_handlers_decimals_are_written_as_awslambdaric_writes_them(daemon, lam):
    # Unrounded, as their own digits (DynamoDB's numbers are Decimals); an infinity or a
    # signalling NaN is a value too, not a crash of the worker.
    from awslambdaric.lambda_runtime_marshaller import to_json

    write_function(daemon.functions, "decimals.py", """
import decimal
def handler(event, context):
    return {"values": [decimal.Decimal(text) for text in event], "text": "1.10"}
""")
    wait_loaded(daemon, "decimals")
    import decimal

    texts = ["1.10", "1E+2", "12345678901234567890.123456789", "-0", "3", "Infinity", "-Infinity",
             "NaN", "sNaN"]
    response = lam.invoke(FunctionName="decimals", Payload=json.dumps(texts))
    assert "FunctionError" not in response, response["Payload"].read()
    expected = to_json({"values": [decimal.Decimal(text) for text in texts], "text": "1.10"})
    assert response["Payload"].read().decode() == expected
    assert expected.startswith('{"values": [1.10, 1E+2, 12345678901234567890.123456789, -0, 3, Infinity')


@pytest.mark.parametrize("worker_python", ["faasd's own", "3.12 or later"])
def test_a_python_result_s_characters_are_escaped_as_awslambdaric_of_that_version_does(
        start_daemon, functions_dir, monkeypatch, worker_python):
    # awslambdaric writes non-ASCII characters as they are on python3.12 and later, and
    # as \uXXXX escapes before: a worker writes them as its interpreter's runtime does.
    from awslambdaric.lambda_runtime_marshaller import to_json

    python = sys.executable if worker_python == "faasd's own" else newer_python()
    if python is None:
        pytest.skip("no Python 3.12 or later on this machine for workers")
    write_function(functions_dir, "accents.py", """
import sys
def handler(event, context):
    if event == "undecodable":  # a name os.fsdecode() gives a byte that is not UTF-8
        raise FileNotFoundError(b"no such file: \\xff".decode("utf-8", "surrogateescape"))
    return {"text": event, "version": "%d.%d" % sys.version_info[:2]}
""")
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_PYTHON": python})
    wait_loaded(daemon, "accents")
    text = "caf\u00e9 \u2615 \U0001d11e \u00ab\u00bb"
    body = daemon.invoke("accents", text).body
    version = json.loads(body)["version"]
    escaped = tuple(map(int, version.split("."))) < (3, 12)
    assert escaped == (worker_python == "faasd's own" and sys.version_info < (3, 12)), version
    monkeypatch.setenv("AWS_EXECUTION_ENV", f"AWS_Lambda_python{version}")
    assert body.decode() == to_json({"text": text, "version": version})
    assert (b"caf\\u00e9" in body) == escaped and ("caf\u00e9".encode() in body) != escaped, body
    # A lone surrogate, which UTF-8 cannot carry unescaped, fails the call, not the worker.
    [worker] = daemon.workers("accents")
    failed = daemon.invoke("accents", "undecodable")
    assert failed.headers["x-amz-function-error"] == "Unhandled", failed.body
    assert daemon.invoke("accents", text).body == body
    assert [w["pid"] for w in daemon.workers("accents")] == [worker["pid"]]


def test_a_result_that_cannot_be_encoded_is_a_marshal_error_whatever_encoding_raised(daemon, lam):
    # As awslambdaric reports any failure to encode, not only a TypeError; the worker lives on.
    write_function(daemon.functions, "unencodable.py", """
import os
class Lazy(dict):
    def items(self):
        raise RuntimeError("not yet")
def handler(event, context):
    if event == "deep":
        value = []
        for _ in range(100000):
            value = [value]
        return value
    if event == "lazy":
        return Lazy(a=1)
    return os.getpid()
""")
    wait_loaded(daemon, "unencodable")
    pid = json.loads(lam.invoke(FunctionName="unencodable", Payload=b'"pid"')["Payload"].read())
    for event, message in (("deep", "maximum recursion depth exceeded while encoding a JSON object"),
                           ("lazy", "not yet")):
        response = lam.invoke(FunctionName="unencodable", Payload=json.dumps(event))
        assert response.get("FunctionError") == "Unhandled"
        error = json.loads(response["Payload"].read())
        assert error["errorType"] == "Runtime.MarshalError", error
        assert error["errorMessage"] == f"Unable to marshal response: {message}"
    assert json.loads(lam.invoke(FunctionName="unencodable", Payload=b'"pid"')["Payload"].read()) == pid


def test_a_timeout_reads_as_lambdas_task_timed_out(daemon, lam):
    write_function(daemon.functions, "sleepy.toml", "timeout_s = 1\n")
    write_function(daemon.functions, "sleepy.py", SLEEPY)
    wait_loaded(daemon, "sleepy")
    response = lam.invoke(FunctionName="sleepy", Payload=b"{}", LogType="Tail")
    assert response["StatusCode"] == 200
    assert response["FunctionError"] == "Unhandled"
    error = json.loads(response["Payload"].read())
    assert error["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in error["errorMessage"]
    assert "\tStatus: timeout" in base64.b64decode(response["LogResult"]).decode()


def test_dry_run_checks_the_function_without_running_it(daemon, lam):
    response = lam.invoke(FunctionName="echo", InvocationType="DryRun")
    assert response["StatusCode"] == 204
    log = daemon.log_of("echo")
    assert response["ResponseMetadata"]["RequestId"] not in log
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="ghost", InvocationType="DryRun")


def test_event_returns_202_and_the_function_runs_with_that_request_id(daemon, probe):
    write_function(daemon.functions, "probed.toml", f'[env]\nPROBE = "{probe.url}"\n')
    write_function(daemon.functions, "probed.py", PROBE_HANDLER)
    wait_loaded(daemon, "probed")
    lam = lambda_client(daemon.url)
    response = lam.invoke(FunctionName="probed", InvocationType="Event", Payload=b'{"id": "e1"}')
    assert response["StatusCode"] == 202
    assert response["Payload"].read() == b""
    request_id = response["ResponseMetadata"]["RequestId"]
    [end] = probe.wait_for(1, "end", id="e1")
    assert end["rid"] == request_id


ARN_TELLER = """
import os

def handler(event, context):
    print("ARN", context.invoked_function_arn)
    print("TRACE", os.environ["_X_AMZN_TRACE_ID"])
    if event.get("fail"):
        raise ValueError("once more")
"""


def test_event_invocations_keep_the_qualifier_the_caller_named(daemon, lam):
    write_function(daemon.functions, "teller.toml", "[async]\nmax_retries = 1\nretry_delays_s = [1]\n")
    write_function(daemon.functions, "teller.py", ARN_TELLER)
    wait_loaded(daemon, "teller")
    arn = "arn:aws:lambda:us-east-1:000000000000:function:teller"

    def arns_seen(request_id: str, count: int = 1) -> list[str]:
        return told(daemon, "teller", request_id, "ARN", count)

    named = [({"FunctionName": "teller:$LATEST"}, f"{arn}:$LATEST"),
             ({"FunctionName": "teller", "Qualifier": "$LATEST"}, f"{arn}:$LATEST"),
             ({"FunctionName": f"{arn}:$LATEST"}, f"{arn}:$LATEST"),
             ({"FunctionName": "000000000000:function:teller:$LATEST"}, f"{arn}:$LATEST"),
             ({"FunctionName": "teller"}, arn)]
    for name, expected in named:
        response = lam.invoke(InvocationType="Event", Payload=b"{}", **name)
        assert response["StatusCode"] == 202
        assert arns_seen(response["ResponseMetadata"]["RequestId"]) == [expected], name
    # A retry is queued again, with the qualifier.
    response = lam.invoke(FunctionName="teller:$LATEST", InvocationType="Event", Payload=b'{"fail": true}')
    assert arns_seen(response["ResponseMetadata"]["RequestId"], 2) == [f"{arn}:$LATEST"] * 2


def told(daemon, name: str, request_id: str, what: str, count: int = 1) -> list[str]:
    """What `name` printed after `what` in each of `count` runs of `request_id`."""
    def seen() -> list[str]:
        found = [line.split(" ", 1)[1] for line in request_lines(daemon, name, request_id)
                 if line.startswith(what + " ")]
        return found if len(found) >= count else []
    return wait_until(seen, 30, message=f"{count} runs of {request_id}")


def test_an_event_runs_under_its_callers_trace_header_on_every_attempt(daemon, lam):
    write_function(daemon.functions, "teller.toml", "[async]\nmax_retries = 1\nretry_delays_s = [1]\n")
    write_function(daemon.functions, "teller.py", ARN_TELLER)
    wait_loaded(daemon, "teller")
    response = daemon.invoke("teller", {"fail": True}, **{"X-Amz-Invocation-Type": "Event",
                                                          "X-Amzn-Trace-Id": CALLER_TRACE})
    assert response.status == 202
    assert told(daemon, "teller", response.headers["x-amzn-requestid"], "TRACE", 2) == [CALLER_TRACE] * 2
    # Without one, each run gets a new one, as Lambda gives it.
    response = lam.invoke(FunctionName="teller", InvocationType="Event", Payload=b"{}")
    [trace] = told(daemon, "teller", response["ResponseMetadata"]["RequestId"], "TRACE")
    assert_new_trace_id(trace)


def test_the_deprecated_invoke_async_queues_the_event_as_lambda_does(daemon, lam):
    # Lambda still serves InvokeAsync (boto3's invoke_async): 202, the event queued
    # as an Event's, from a payload of at most 256 KB; no caller's trace id is passed on.
    write_function(daemon.functions, "teller.py", ARN_TELLER)
    wait_loaded(daemon, "teller")
    arn = "arn:aws:lambda:us-east-1:000000000000:function:teller"
    for name, expected in (("teller", arn), (f"{arn}:$LATEST", f"{arn}:$LATEST")):
        response = lam.invoke_async(FunctionName=name, InvokeArgs=b'{"k": 1}')
        assert response["Status"] == 202
        assert told(daemon, "teller", response["ResponseMetadata"]["RequestId"], "ARN") == [expected]
    answer = daemon.post("/2014-11-13/functions/teller/invoke-async/", b"{}",
                         headers={"X-Amzn-Trace-Id": CALLER_TRACE})
    assert answer.status == 202 and answer.body == b""
    [trace] = told(daemon, "teller", answer.headers["x-amzn-requestid"], "TRACE")
    assert_new_trace_id(trace)

    runs = daemon.log_of("teller").count("START RequestId")
    error = refused(lambda: lam.invoke_async(FunctionName="teller", InvokeArgs=b'"' + b"x" * (256 * 1024) + b'"'),
                    "RequestTooLargeException", 413)
    assert error["Error"]["Message"] == (
        "262146 byte payload is too large for the InvokeAsync operation (limit 262144 bytes)")
    refused(lambda: lam.invoke_async(FunctionName="teller", InvokeArgs=b"{not json"),
            "InvalidRequestContentException", 400)
    error = refused(lambda: lam.invoke_async(FunctionName="ghost", InvokeArgs=b"{}"),
                    "ResourceNotFoundException", 404)
    assert error["Error"]["Message"] == "Function not found: arn:aws:lambda:us-east-1:000000000000:function:ghost"
    refused(lambda: lam.invoke_async(FunctionName="no/such", InvokeArgs=b"{}"), "ValidationException", 400,
            modeled=False)
    assert daemon.log_of("teller").count("START RequestId") == runs


def test_unknown_functions_raise_resource_not_found(daemon, lam):
    # Well-formed names, as Lambda's model allows them, of functions that do not exist.
    arn = "arn:aws:lambda:us-east-1:000000000000:function"
    long = "g" * 65  # the model bounds the whole value, not the name in it
    for name, missing in (("ghost", f"{arn}:ghost"), (f"{arn}:ghost", f"{arn}:ghost"),
                          ("ghost:$LATEST", f"{arn}:ghost:$LATEST"), ("my.func", f"{arn}:my.func"),
                          (long, f"{arn}:{long}")):
        error = refused(lambda: lam.invoke(FunctionName=name, Payload=b"{}"), "ResourceNotFoundException", 404)
        assert error["Error"]["Message"] == f"Function not found: {missing}"
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName="ghost", InvocationType="Event", Payload=b"{}")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function(FunctionName="ghost")


def model_constraint(lam, operation: str, member: str) -> tuple[str, int]:
    """The pattern and maximum length of `operation`'s `member` in Lambda's model, as botocore has it."""
    shape = lam.meta.service_model.operation_model(operation).input_shape.members[member]
    return shape.metadata["pattern"], shape.metadata["max"]


def invalid(member: str, value: str, *constraints: str) -> str:
    """The message of AWS's ValidationException for `value` of `member` breaking `constraints`."""
    count = len(constraints)
    return f"{count} validation error{'s' if count > 1 else ''} detected: " + "; ".join(
        f"Value '{value}' at '{member}' failed to satisfy constraint: {constraint}" for constraint in constraints)


def test_a_function_name_outside_lambdas_model_is_a_validation_exception(daemon, lam):
    # AWS's front end checks every operation's function name against the shape
    # of Lambda's model that operation uses, before Lambda looks it up.
    runs = daemon.log_of("echo").count("START RequestId")
    arn = "arn:aws:lambda:us-east-1:000000000000:function:echo"
    pattern, _ = model_constraint(lam, "Invoke", "FunctionName")
    for name in ("no/such", "bad name", "arn:aws:s3:::bucket", "echo:bad!", "echo:$LATEST:more",
                 "arn:aws:lambda:us-east-1:000000000000:layer:echo:1"):
        for invocation_type in ("RequestResponse", "Event", "DryRun"):
            error = refused(lambda: lam.invoke(FunctionName=name, InvocationType=invocation_type, Payload=b"{}"),
                            "ValidationException", 400, modeled=False)
            assert error["Error"]["Message"] == invalid(
                "functionName", name, f"Member must satisfy regular expression pattern: {pattern}"), name
    error = refused(lambda: lam.invoke_with_response_stream(FunctionName="no/such"), "ValidationException", 400,
                    modeled=False)
    assert error["Error"]["Message"] == invalid(
        "functionName", "no/such", f"Member must satisfy regular expression pattern: {pattern}")
    # Too long for the model: Invoke's names are at most 256 characters.
    for name in ("x" * 257, f"{arn}:{'v' * 210}"):
        error = refused(lambda: lam.invoke(FunctionName=name), "ValidationException", 400, modeled=False)
        assert error["Error"]["Message"] == invalid(
            "functionName", name, "Member must have length less than or equal to 256")
    error = refused(lambda: lam.invoke(FunctionName="bad name" * 40), "ValidationException", 400, modeled=False)
    assert error["Error"]["Message"] == invalid(
        "functionName", "bad name" * 40, "Member must have length less than or equal to 256",
        f"Member must satisfy regular expression pattern: {pattern}")
    # A qualifier its pattern refuses, and each refusal of one call together, in the model's order.
    qualifier, _ = model_constraint(lam, "Invoke", "Qualifier")
    error = refused(lambda: lam.invoke(FunctionName="echo", Qualifier="bad!"), "ValidationException", 400,
                    modeled=False)
    assert error["Error"]["Message"] == invalid(
        "qualifier", "bad!", f"Member must satisfy regular expression pattern: {qualifier}")
    error = refused(lambda: lam.invoke(FunctionName="no/such", LogType="Bogus", Qualifier="bad!"),
                    "ValidationException", 400, modeled=False)
    assert error["Error"]["Message"] == (
        "3 validation errors detected: "
        f"Value 'no/such' at 'functionName' failed to satisfy constraint: Member must satisfy regular "
        f"expression pattern: {pattern}; "
        "Value 'Bogus' at 'logType' failed to satisfy constraint: Member must satisfy enum value set: "
        "[None, Tail]; "
        f"Value 'bad!' at 'qualifier' failed to satisfy constraint: Member must satisfy regular expression "
        f"pattern: {qualifier}")
    assert daemon.log_of("echo").count("START RequestId") == runs


def test_every_operation_checks_its_function_name_against_its_own_shape(daemon, lam):
    arn = "arn:aws:lambda:us-east-1:000000000000:function:echo"
    calls = {
        "GetFunction": lam.get_function, "GetFunctionConfiguration": lam.get_function_configuration,
        "GetFunctionConcurrency": lam.get_function_concurrency,
        "ListVersionsByFunction": lam.list_versions_by_function, "ListAliases": lam.list_aliases,
        "GetFunctionEventInvokeConfig": lam.get_function_event_invoke_config,
        "ListFunctionEventInvokeConfigs": lam.list_function_event_invoke_configs,
        "GetFunctionUrlConfig": lam.get_function_url_config,
        "ListFunctionUrlConfigs": lam.list_function_url_configs, "GetPolicy": lam.get_policy,
        "GetFunctionRecursionConfig": lam.get_function_recursion_config,
    }
    for operation, call in calls.items():
        pattern, longest = model_constraint(lam, operation, "FunctionName")
        for name in ("no/such", "bad name", "arn:aws:sqs:us-east-1:000000000000:queue"):
            error = refused(lambda: call(FunctionName=name), "ValidationException", 400, modeled=False)
            assert error["Error"]["Message"] == invalid(
                "functionName", name, f"Member must satisfy regular expression pattern: {pattern}"), operation
        # Too long; a name its pattern refuses too (FunctionUrlFunctionName's is 1 to 64 characters) says both.
        long = "n" * (longest + 1)
        also = [] if re.fullmatch(pattern, long) else [f"Member must satisfy regular expression pattern: {pattern}"]
        error = refused(lambda: call(FunctionName=long), "ValidationException", 400, modeled=False)
        assert error["Error"]["Message"] == invalid(
            "functionName", long, f"Member must have length less than or equal to {longest}", *also), operation
        # A well-formed name of no function is still not found.
        error = refused(lambda: call(FunctionName="ghost"), "ResourceNotFoundException", 404)
        assert "ghost" in error["Error"]["Message"], operation
    assert model_constraint(lam, "GetFunctionConcurrency", "FunctionName")[1] == 140

    # Shapes that take no qualifier, or not every one: each refuses what its pattern does.
    for operation, call, name in (("GetFunctionRecursionConfig", lam.get_function_recursion_config, "echo:$LATEST"),
                                  ("GetFunctionUrlConfig", lam.get_function_url_config, "echo:$LATEST"),
                                  ("GetFunctionConcurrency", lam.get_function_concurrency, "echo.v2"),
                                  ("ListAliases", lam.list_aliases, "echo.v2")):
        pattern, _ = model_constraint(lam, operation, "FunctionName")
        error = refused(lambda: call(FunctionName=name), "ValidationException", 400, modeled=False)
        assert error["Error"]["Message"] == invalid(
            "functionName", name, f"Member must satisfy regular expression pattern: {pattern}"), operation
    qualifier, _ = model_constraint(lam, "GetFunctionUrlConfig", "Qualifier")
    error = refused(lambda: lam.get_function_url_config(FunctionName="echo", Qualifier="$LATEST"),
                    "ValidationException", 400, modeled=False)
    assert error["Error"]["Message"] == invalid(
        "qualifier", "$LATEST", f"Member must satisfy regular expression pattern: {qualifier}")
    qualifier, _ = model_constraint(lam, "GetFunction", "Qualifier")
    for call in (lam.get_function, lam.get_function_configuration, lam.get_function_event_invoke_config,
                 lam.get_policy):
        error = refused(lambda: call(FunctionName="echo", Qualifier="v 1"), "ValidationException", 400,
                        modeled=False)
        assert error["Error"]["Message"] == invalid(
            "qualifier", "v 1", f"Member must satisfy regular expression pattern: {qualifier}")
    # ListTags names its resource by ARN only.
    resource, _ = model_constraint(lam, "ListTags", "Resource")
    for name in ("echo", "000000000000:function:echo", f"{arn}:bad!"):
        error = refused(lambda: lam.list_tags(Resource=name), "ValidationException", 400, modeled=False)
        assert error["Error"]["Message"] == invalid(
            "resource", name, f"Member must satisfy regular expression pattern: {resource}")
    error = refused(lambda: lam.list_tags(Resource="arn:aws:lambda:us-east-1:000000000000:code-signing-config:"
                                                   "csc-0123456789abcdefg"), "ResourceNotFoundException", 404)
    assert error["Error"]["Message"].endswith(":code-signing-config:csc-0123456789abcdefg")
    # And the well-formed names of a function that exists still reach it.
    assert lam.get_function(FunctionName=arn, Qualifier="$LATEST")["Configuration"]["FunctionName"] == "echo"
    assert "ReservedConcurrentExecutions" not in lam.get_function_concurrency(FunctionName=f"{arn}:$LATEST")
    assert lam.list_tags(Resource=arn)["Tags"] == {}
    assert lam.get_function_url_config(FunctionName=arn)["FunctionArn"] == arn
    # An operation that takes no qualifier ignores a `?Qualifier=`, as AWS does.
    assert daemon.get("/2024-08-31/functions/echo/recursion-config?Qualifier=prod").json() == {
        "RecursiveLoop": "Allow"}


def test_names_boto3_refuses_itself_are_validation_exceptions_over_http(daemon, lam):
    # boto3 refuses an empty name before sending it; over plain HTTP it is
    # refused as AWS's front end refuses it, not taken for another operation.
    pattern, _ = model_constraint(lam, "Invoke", "FunctionName")
    empty = invalid("functionName", "", "Member must have length greater than or equal to 1",
                    f"Member must satisfy regular expression pattern: {pattern}")
    for answer in (daemon.invoke(""), daemon.post("/2021-11-15/functions//response-streaming-invocations"),
                   daemon.get("/2015-03-31/functions//configuration")):
        assert (answer.status, answer.headers["x-amzn-errortype"]) == (400, "ValidationException")
        assert answer.json() == {"message": empty}
    concurrency, _ = model_constraint(lam, "GetFunctionConcurrency", "FunctionName")
    answer = daemon.get("/2019-09-30/functions//concurrency")
    assert answer.json()["message"] == invalid(
        "functionName", "", "Member must have length greater than or equal to 1",
        f"Member must satisfy regular expression pattern: {concurrency}")
    # Bytes that are not UTF-8, which boto3 cannot send, and braces, are no name either.
    for raw, shown in (("a%FFb", "a%FFb"), ("a{b}", "a{b}"), ("%7Becho%7D", "{echo}")):
        answer = daemon.invoke(raw)
        assert (answer.status, answer.headers["x-amzn-errortype"]) == (400, "ValidationException"), raw
        assert answer.json() == {"message": invalid(
            "functionName", shown, f"Member must satisfy regular expression pattern: {pattern}")}
    # GetFunction's path with no name is ListFunctions', as in Lambda.
    assert "Functions" in daemon.get("/2015-03-31/functions/").json()


def test_a_tenant_id_is_refused_as_lambda_refuses_it_for_a_function_without_tenant_isolation(daemon, lam):
    # faasd has no tenant isolation: a call that asks for it is refused, as Lambda
    # refuses it for such a function, never run in an environment tenants share.
    runs = daemon.log_of("echo").count("START RequestId")
    for invocation_type in ("RequestResponse", "Event", "DryRun"):
        error = refused(lambda: lam.invoke(FunctionName="echo", TenantId="blue", InvocationType=invocation_type),
                        "InvalidParameterValueException", 400)
        assert error["Error"]["Message"] == ("The function echo does not have tenant isolation enabled: invoke "
                                             "it without a TenantId (faasd has no tenant isolation mode)")
    refused(lambda: lam.invoke_with_response_stream(FunctionName="echo", TenantId="blue"),
            "InvalidParameterValueException", 400)
    refused(lambda: lam.invoke(FunctionName="ghost", TenantId="blue"), "ResourceNotFoundException", 404)
    # One outside the model's shape is AWS's ValidationException, after the name's, in the model's order.
    pattern, _ = model_constraint(lam, "Invoke", "TenantId")
    name_pattern, _ = model_constraint(lam, "Invoke", "FunctionName")
    error = refused(lambda: lam.invoke(FunctionName="no/such", TenantId="bad#"), "ValidationException", 400,
                    modeled=False)
    assert error["Error"]["Message"] == (
        "2 validation errors detected: Value 'no/such' at 'functionName' failed to satisfy constraint: Member "
        f"must satisfy regular expression pattern: {name_pattern}; Value 'bad#' at 'tenantId' failed to satisfy "
        f"constraint: Member must satisfy regular expression pattern: {pattern}")
    queue = daemon.function("echo")["queue"]
    assert (queue["depth"], queue["running"], queue["succeeded"], queue["retried"]) == (0, 0, 0, 0)
    assert daemon.log_of("echo").count("START RequestId") == runs


def test_names_arns_and_the_latest_qualifier_reach_the_function(daemon, lam):
    for name in ("echo:$LATEST", "000000000000:function:echo",
                 "arn:aws:lambda:us-east-1:000000000000:function:echo",
                 "arn:aws:lambda:us-east-1:000000000000:function:echo:$LATEST"):
        assert lam.invoke(FunctionName=name, Payload=b"{}")["StatusCode"] == 200, name
    assert lam.invoke(FunctionName="echo", Qualifier="$LATEST")["StatusCode"] == 200
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as caught:
        lam.invoke(FunctionName="echo", Qualifier="prod")
    assert caught.value.response["Error"]["Message"].endswith(":function:echo:prod")


def test_an_arn_of_another_region_or_a_qualifier_the_name_contradicts_is_refused(daemon, lam):
    west = "arn:aws:lambda:eu-west-1:000000000000:function:echo"
    for name in (west, f"{west}:$LATEST", "eu-west-1:000000000000:function:echo"):
        for call in (lambda: lam.invoke(FunctionName=name, Payload=b"{}"),
                     lambda: lam.get_function(FunctionName=name)):
            error = refused(call, "ResourceNotFoundException", 404)
            assert error["Error"]["Message"] == ("Functions from 'eu-west-1' are not reachable in this "
                                                 "region ('us-east-1')"), name
    error = refused(lambda: lam.invoke(FunctionName="echo:$LATEST", Qualifier="live", Payload=b"{}"),
                    "InvalidParameterValueException", 400)
    assert error["Error"]["Message"] == ("The derived qualifier from the function name does not match "
                                         "the specified qualifier.")
    # Named alike twice is no contradiction; another account's number is faasd's one account.
    assert lam.invoke(FunctionName="echo:$LATEST", Qualifier="$LATEST")["StatusCode"] == 200
    assert lam.invoke(FunctionName="arn:aws:lambda:us-east-1:123456789012:function:echo",
                      Payload=b"{}")["StatusCode"] == 200


def test_context_invoked_function_arn_is_the_arn_the_caller_named(daemon, lam):
    arn = "arn:aws:lambda:us-east-1:000000000000:function:echo"
    named = {"echo": arn, "echo:$LATEST": f"{arn}:$LATEST", "000000000000:function:echo": arn,
             arn: arn, f"{arn}:$LATEST": f"{arn}:$LATEST"}
    for name, expected in named.items():
        response = lam.invoke(FunctionName=name, Payload=b"{}")
        assert json.loads(response["Payload"].read())["arn"] == expected, name
    response = lam.invoke(FunctionName="echo", Qualifier="$LATEST")
    assert json.loads(response["Payload"].read())["arn"] == f"{arn}:$LATEST"
    # The same warm worker, called by its route: the qualifier was that call's only.
    assert daemon.get("/function/echo").json()["arn"] == arn


def test_a_busy_function_raises_too_many_requests(daemon, probe):
    write_function(daemon.functions, "single.py", PROBE_HANDLER)
    write_function(daemon.functions, "single.toml",
                   f'concurrency = 1\ntimeout_s = 60\n[env]\nPROBE = "{probe.url}"\n')
    wait_loaded(daemon, "single")
    lam = lambda_client(daemon.url)
    results: list[dict] = []
    slow = threading.Thread(target=lambda: results.append(
        lam.invoke(FunctionName="single", Payload=b'{"id": "slow", "gate": "g"}')))
    slow.start()
    try:
        probe.wait_for(1, "start", id="slow")
        with pytest.raises(lam.exceptions.TooManyRequestsException) as caught:
            lam.invoke(FunctionName="single", Payload=b'{"id": "second"}')
        error = caught.value.response
        assert error["ResponseMetadata"]["HTTPStatusCode"] == 429
        assert error["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
        assert error["Error"]["Message"] == "Rate Exceeded."
        with pytest.raises(lam.exceptions.TooManyRequestsException) as caught:
            lam.invoke_with_response_stream(FunctionName="single", Payload=b'{"id": "streamed"}')
        assert caught.value.response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    finally:
        probe.release("g")
        slow.join(60)
    assert results and results[0]["StatusCode"] == 200
    assert not probe.seen("start", id="second") and not probe.seen("start", id="streamed")


def test_reserved_concurrency_0_throttles_every_call_and_holds_its_events(daemon, probe):
    # Lambda: "To throttle a function, set the reserved concurrency to zero."
    write_function(daemon.functions, "stopped.py", PROBE_HANDLER)
    write_function(daemon.functions, "stopped.toml", f'concurrency = 0\n[env]\nPROBE = "{probe.url}"\n')
    wait_loaded(daemon, "stopped")
    lam = lambda_client(daemon.url)
    assert lam.get_function(FunctionName="stopped")["Concurrency"] == {"ReservedConcurrentExecutions": 0}
    assert lam.get_function_concurrency(FunctionName="stopped")["ReservedConcurrentExecutions"] == 0
    for call in (lambda: lam.invoke(FunctionName="stopped", Payload=b'{"id": "sync"}'),
                 lambda: lam.invoke_with_response_stream(FunctionName="stopped", Payload=b'{"id": "sync"}')):
        with pytest.raises(lam.exceptions.TooManyRequestsException) as caught:
            call()
        error = caught.value.response
        assert error["ResponseMetadata"]["HTTPStatusCode"] == 429
        assert error["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
        assert error["Error"]["Message"] == "Rate Exceeded."
    page = daemon.get("/function/stopped")
    assert page.status == 429 and page.json()["reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    # An Event is accepted and waits, tried again as Lambda retries a throttled event ...
    queued = lam.invoke(FunctionName="stopped", InvocationType="Event", Payload=b'{"id": "held"}')
    assert queued["StatusCode"] == 202
    wait_until(lambda: daemon.output().count(f"{queued['ResponseMetadata']['RequestId']} (from api): "
                                             "throttled") >= 2, timeout=20, message="two throttled tries")
    assert not probe.seen("start")
    # ... and runs once the function may run again, with its own request id.
    write_function(daemon.functions, "stopped.toml", f'concurrency = 1\n[env]\nPROBE = "{probe.url}"\n')
    [end] = probe.wait_for(1, "end", id="held", timeout=30)
    assert end["rid"] == queued["ResponseMetadata"]["RequestId"]
    assert not probe.seen("start", id="sync")


def test_a_payload_over_lambdas_limits_is_request_too_large(daemon, lam):
    runs = daemon.log_of("echo").count("START RequestId")
    error = refused(lambda: lam.invoke(FunctionName="echo", Payload=b'"' + b"x" * (6 * 1024 * 1024) + b'"'),
                    "RequestTooLargeException", 413)
    assert error["Error"]["Message"] == "Request must be smaller than 6291456 bytes for the InvokeFunction operation"
    assert error["Type"] == "User"
    # An asynchronous invocation's payload is held to Lambda's 1 MB, in Lambda's words.
    error = refused(lambda: lam.invoke(FunctionName="echo", InvocationType="Event",
                                       Payload=b'"' + b"x" * (1024 * 1024) + b'"'),
                    "RequestTooLargeException", 413)
    assert error["Error"]["Message"] == (
        "1048578 byte payload is too large for the Event invocation type (limit 1048576 bytes)")
    assert daemon.log_of("echo").count("START RequestId") == runs
    fits = lam.invoke(FunctionName="echo", InvocationType="Event",
                      Payload=b'"' + b"x" * (1024 * 1024 - 2) + b'"')
    assert fits["StatusCode"] == 202
    assert lam.invoke(FunctionName="echo", Payload=b'"' + b"x" * (2 * 1024 * 1024) + b'"')["StatusCode"] == 200


def test_a_payload_that_is_not_json_is_invalid_request_content(daemon, lam):
    runs = daemon.log_of("echo").count("START RequestId")
    for invocation_type in ("RequestResponse", "Event"):
        error = refused(lambda: lam.invoke(FunctionName="echo", InvocationType=invocation_type,
                                           Payload=b"{not json"), "InvalidRequestContentException", 400)
        assert error["Error"]["Message"].startswith(
            "Could not parse request body into json: Could not parse payload into json: "), error
        assert error["Type"] == "User"
    assert daemon.log_of("echo").count("START RequestId") == runs


def stream(lam, **call) -> tuple[dict, list[dict]]:
    """invoke_with_response_stream's answer, and the events boto3 read from its stream."""
    response = lam.invoke_with_response_stream(**call)
    return response, list(response["EventStream"])


def test_invoke_with_response_stream_sends_the_result_in_payload_chunks(daemon, lam):
    big = "v" * 150_000
    response, events = stream(lam, FunctionName="echo", Payload=json.dumps({"k": big}).encode())
    assert response["StatusCode"] == 200
    assert response["ExecutedVersion"] == "$LATEST"
    assert response["ResponseStreamContentType"] == "application/vnd.amazon.eventstream"
    *chunks, complete = events
    # The result, cut into chunks of at most 64 KiB, then InvokeComplete with no error.
    assert complete == {"InvokeComplete": {}}
    assert len(chunks) == 3 and all(len(c["PayloadChunk"]["Payload"]) <= 64 * 1024 for c in chunks)
    result = json.loads(b"".join(c["PayloadChunk"]["Payload"] for c in chunks))
    assert result["event"] == {"k": big}
    assert result["request_id"] == response["ResponseMetadata"]["RequestId"]
    # Named as Invoke names functions, qualifier included.
    arn = "arn:aws:lambda:us-east-1:000000000000:function:echo"
    for call in ({"FunctionName": f"{arn}:$LATEST"}, {"FunctionName": "echo", "Qualifier": "$LATEST"}):
        _, [chunk, complete] = stream(lam, **call)
        assert json.loads(chunk["PayloadChunk"]["Payload"])["arn"] == f"{arn}:$LATEST"
        assert complete == {"InvokeComplete": {}}


def test_a_failed_run_ends_the_stream_with_its_error_in_invoke_complete(daemon, lam):
    write_function(daemon.functions, "fail.py", FAIL)
    write_function(daemon.functions, "sleepy.toml", "timeout_s = 1\n")
    write_function(daemon.functions, "sleepy.py", SLEEPY)
    wait_loaded(daemon, "fail", "sleepy")
    response, [complete] = stream(lam, FunctionName="fail", Payload=b"{}")
    assert response["StatusCode"] == 200
    error = complete["InvokeComplete"]
    assert set(error) == {"ErrorCode", "ErrorDetails"}
    assert error["ErrorCode"] == "ValueError"
    details = json.loads(error["ErrorDetails"])
    assert details["errorMessage"] == "the input was not what I wanted"
    assert details["errorType"] == "ValueError"
    assert any("fail.py" in frame for frame in details["stackTrace"])
    # Failures faasd sees itself read the same way.
    _, [complete] = stream(lam, FunctionName="sleepy")
    assert complete["InvokeComplete"]["ErrorCode"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in json.loads(complete["InvokeComplete"]["ErrorDetails"])["errorMessage"]


def test_log_type_tail_puts_the_invocations_log_in_invoke_complete(daemon, lam):
    response, [chunk, complete] = stream(lam, FunctionName="echo", Payload=b'{"n": 2}', LogType="Tail")
    request_id = response["ResponseMetadata"]["RequestId"]
    assert json.loads(chunk["PayloadChunk"]["Payload"])["event"] == {"n": 2}
    lines = base64.b64decode(complete["InvokeComplete"]["LogResult"]).decode().splitlines()
    assert f"START RequestId: {request_id} Version: $LATEST" in lines
    assert "echo got {'n': 2}" in lines
    assert lines[-1].startswith(f"REPORT RequestId: {request_id}\tDuration: ")
    _, [_, complete] = stream(lam, FunctionName="echo", LogType="None")
    assert complete == {"InvokeComplete": {}}


def test_invoke_with_response_stream_refuses_as_invoke_does_before_anything_runs(daemon, lam):
    runs = daemon.log_of("echo").count("START RequestId")
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as caught:
        lam.invoke_with_response_stream(FunctionName="ghost", Payload=b"{}")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert caught.value.response["Error"]["Message"] == (
        "Function not found: arn:aws:lambda:us-east-1:000000000000:function:ghost")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke_with_response_stream(FunctionName="echo", Qualifier="prod")
    with pytest.raises(lam.exceptions.InvalidRequestContentException):
        lam.invoke_with_response_stream(FunctionName="echo", Payload=b"{not json")
    with pytest.raises(lam.exceptions.RequestTooLargeException) as caught:
        lam.invoke_with_response_stream(FunctionName="echo", Payload=b'"' + b"x" * (7 * 1024 * 1024) + b'"')
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    refused(lambda: lam.invoke_with_response_stream(FunctionName="echo", LogType="Bogus"),
            "ValidationException", 400, modeled=False)
    # Lambda streams synchronous calls only: Event is not one of its invocation types.
    error = refused(lambda: lam.invoke_with_response_stream(FunctionName="ghost", InvocationType="Event"),
                    "ValidationException", 400, modeled=False)
    assert error["Error"]["Message"] == (
        "1 validation error detected: Value 'Event' at 'invocationType' failed to satisfy constraint: "
        "Member must satisfy enum value set: [RequestResponse, DryRun]")
    response, events = stream(lam, FunctionName="echo", InvocationType="DryRun")
    assert response["StatusCode"] == 204 and events == []
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke_with_response_stream(FunctionName="ghost", InvocationType="DryRun")
    assert daemon.log_of("echo").count("START RequestId") == runs


def test_get_function_returns_the_configuration_boto3_parses(daemon, lam):
    response = lam.get_function(FunctionName="echo")
    config = response["Configuration"]
    assert config["FunctionName"] == "echo"
    assert config["FunctionArn"] == "arn:aws:lambda:us-east-1:000000000000:function:echo"
    assert re.fullmatch(r"python3\.\d+", config["Runtime"])
    assert config["Handler"] == "echo.handler"
    assert config["MemorySize"] == 256
    assert config["Timeout"] == 7
    assert config["CodeSize"] == (daemon.functions / "echo.py").stat().st_size
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000", config["LastModified"])
    assert config["State"] == "Active" and config["LastUpdateStatus"] == "Successful"
    assert config["Version"] == "$LATEST" and config["PackageType"] == "Zip"
    assert response["Code"]["RepositoryType"] == "S3"

    write_function(daemon.functions, "limited.toml", "concurrency = 3\n")
    write_function(daemon.functions, "limited.py", ECHO)
    write_function(daemon.functions, "broken.py", "def handler(event, context):\n    return (\n")
    wait_loaded(daemon, "limited", "broken")
    assert lam.get_function(FunctionName="limited")["Concurrency"] == {"ReservedConcurrentExecutions": 3}
    broken = lam.get_function(FunctionName="broken")["Configuration"]
    assert broken["State"] == "Failed"
    assert "Runtime.UserCodeSyntaxError" in broken["StateReason"]


def test_the_latest_versions_configuration_has_the_versions_arn(daemon, lam):
    # As Lambda lists versions, and answers a caller that names one: $LATEST's
    # FunctionArn is qualified; the function's own (unqualified) is the function's.
    arn = "arn:aws:lambda:us-east-1:000000000000:function:echo"
    [latest] = lam.list_versions_by_function(FunctionName="echo")["Versions"]
    assert (latest["Version"], latest["FunctionArn"]) == ("$LATEST", f"{arn}:$LATEST")
    for named in ({"FunctionName": "echo", "Qualifier": "$LATEST"}, {"FunctionName": "echo:$LATEST"},
                  {"FunctionName": f"{arn}:$LATEST"}):
        assert lam.get_function_configuration(**named)["FunctionArn"] == f"{arn}:$LATEST", named
        assert lam.get_function(**named)["Configuration"]["FunctionArn"] == f"{arn}:$LATEST", named
    for named in ({"FunctionName": "echo"}, {"FunctionName": arn}):
        assert lam.get_function_configuration(**named)["FunctionArn"] == arn, named
        assert lam.get_function(**named)["Configuration"]["FunctionArn"] == arn, named
    assert [f["FunctionArn"] for f in lam.list_functions()["Functions"]] == [arn]


def test_code_sha256_is_the_codes_sha256_and_settings_do_not_change_it(daemon, lam):
    # Lambda's CodeSha256 is base64 SHA-256 of the code; a settings change
    # (memory, env) gives a new RevisionId and leaves CodeSha256 as it was.
    write_function(daemon.functions, "hashed.py", ECHO)
    wait_loaded(daemon, "hashed")
    first = lam.get_function(FunctionName="hashed")["Configuration"]
    assert len(base64.b64decode(first["CodeSha256"], validate=True)) == 32

    write_function(daemon.functions, "hashed.toml", "memory_mb = 512\n")
    wait_until(lambda: lam.get_function(FunctionName="hashed")["Configuration"]["MemorySize"] == 512,
               message="the settings change to load")
    settings = lam.get_function(FunctionName="hashed")["Configuration"]
    assert settings["RevisionId"] != first["RevisionId"]
    assert settings["CodeSha256"] == first["CodeSha256"]

    write_function(daemon.functions, "hashed.py", ECHO + "# changed\n")
    wait_until(lambda: lam.get_function(FunctionName="hashed")["Configuration"]["RevisionId"]
               != settings["RevisionId"], message="the code change to load")
    code = lam.get_function(FunctionName="hashed")["Configuration"]
    assert code["CodeSha256"] != first["CodeSha256"]

    # A directory function: every code file counts, its function.toml does not.
    write_function(daemon.functions, "hashdir/handler.py", ECHO)
    write_function(daemon.functions, "hashdir/lib/util.py", "X = 1\n")
    wait_loaded(daemon, "hashdir")
    before = lam.get_function(FunctionName="hashdir")["Configuration"]["CodeSha256"]
    write_function(daemon.functions, "hashdir/function.toml", "timeout_s = 9\n")
    wait_until(lambda: lam.get_function(FunctionName="hashdir")["Configuration"]["Timeout"] == 9,
               message="hashdir's settings to load")
    assert lam.get_function(FunctionName="hashdir")["Configuration"]["CodeSha256"] == before
    write_function(daemon.functions, "hashdir/lib/util.py", "X = 2\n")
    wait_until(lambda: lam.get_function(FunctionName="hashdir")["Configuration"]["CodeSha256"] != before,
               message="hashdir's code change to change CodeSha256")
    # A FIFO among the files is no code: reading it would wait for a writer forever.
    revision = lam.get_function(FunctionName="hashdir")["Configuration"]["RevisionId"]
    os.mkfifo(daemon.functions / "hashdir" / "pipe")
    wait_until(lambda: lam.get_function(FunctionName="hashdir")["Configuration"]["RevisionId"]
               != revision, message="hashdir with its FIFO")
    assert daemon.get("/healthz").status == 200

def test_last_modified_follows_the_newest_code_or_settings_file(daemon, lam):
    def last_modified(name: str) -> str:
        return lam.get_function(FunctionName=name)["Configuration"]["LastModified"]

    def stamp(path: Path, when: int, millis: int) -> str:
        # To the millisecond, as Lambda writes it ("2019-10-01T16:47:28.490+0000").
        os.utime(path, ns=((when * 1000 + millis) * 1_000_000,) * 2)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{millis:03d}+0000"

    hour = int(time.time()) + 3600
    write_function(daemon.functions, "dated.py", ECHO)
    write_function(daemon.functions, "dated.toml", "memory_mb = 256\n")
    write_function(daemon.functions, "dateddir/handler.py", ECHO)
    write_function(daemon.functions, "dateddir/lib/util.py", "X = 1\n")
    wait_loaded(daemon, "dated", "dateddir")
    expected = stamp(daemon.functions / "dated.toml", hour, 490)  # a settings change is a change, as on Lambda
    wait_until(lambda: last_modified("dated") == expected, message="the settings' time")
    expected = stamp(daemon.functions / "dateddir" / "lib" / "util.py", hour + 60, 7)  # so is a nested file's
    wait_until(lambda: last_modified("dateddir") == expected, message="the nested file's time")
    assert lam.list_functions()["Functions"][0]["LastModified"]


def test_list_functions_takes_only_function_version_all(daemon, lam):
    assert "echo" in [f["FunctionName"] for f in lam.list_functions(FunctionVersion="ALL")["Functions"]]
    error = refused(lambda: lam.list_functions(FunctionVersion="LATEST"), "ValidationException", 400,
                    modeled=False)
    assert error["Error"]["Message"] == ("1 validation error detected: Value 'LATEST' at 'functionVersion' "
                                         "failed to satisfy constraint: Member must satisfy enum value set: [ALL]")


CONTEXT_PROBE = """
def handler(event, context):
    cc = context.client_context
    return {
        "identity": [context.identity.cognito_identity_id, context.identity.cognito_identity_pool_id],
        "client_context": None if cc is None else {
            "custom": cc.custom, "env": cc.env,
            "client": None if cc.client is None else
                      [cc.client.app_title, cc.client.installation_id, cc.client.app_version_code],
        },
        "w3c": context.w3c(),
    }
"""


def test_client_context_reaches_the_handler_as_lambdas_context_client_context(daemon, lam):
    write_function(daemon.functions, "ctxprobe.py", CONTEXT_PROBE)
    wait_loaded(daemon, "ctxprobe")
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    given = {"custom": {"tenant": "blue", "n": 3}, "env": {"locale": "en_GB"},
             "client": {"app_title": "shop", "installation_id": "i-1"},
             "w3c": {"traceparent": traceparent, "tracestate": "shop=1", "baggage": 7, "other": "x"}}
    encoded = base64.b64encode(json.dumps(given).encode()).decode()
    seen = json.loads(lam.invoke(FunctionName="ctxprobe", ClientContext=encoded)["Payload"].read())
    assert seen == {"identity": [None, None], "client_context": {
        "custom": {"tenant": "blue", "n": 3}, "env": {"locale": "en_GB"},
        "client": ["shop", "i-1", None]},
        # context.w3c(): the trace context's string fields, as awslambdaric gives them.
        "w3c": {"traceparent": traceparent, "tracestate": "shop=1"}}
    _, [chunk, _] = stream(lam, FunctionName="ctxprobe", ClientContext=encoded)
    assert json.loads(chunk["PayloadChunk"]["Payload"])["client_context"]["custom"] == {"tenant": "blue", "n": 3}
    # Without one, as in Lambda: client_context is None, identity still has its fields.
    plain = json.loads(lam.invoke(FunctionName="ctxprobe")["Payload"].read())
    assert plain == {"identity": [None, None], "client_context": None, "w3c": {}}

    for bad in ("not base64!", base64.b64encode(b"[1, 2]").decode(), base64.b64encode(b"{nope").decode()):
        with pytest.raises(lam.exceptions.InvalidRequestContentException) as refused:
            lam.invoke(FunctionName="ctxprobe", ClientContext=bad)
        assert "Client context must be a valid Base64-encoded JSON object" in str(refused.value)
    huge = base64.b64encode(json.dumps({"custom": {"x": "y" * 3000}}).encode()).decode()
    with pytest.raises(lam.exceptions.InvalidRequestContentException, match="at most 3583"):
        lam.invoke(FunctionName="ctxprobe", ClientContext=huge)

def test_read_only_operations_and_waiters_of_deploy_scripts_work(daemon, lam):
    write_function(daemon.functions, "limited.toml", "concurrency = 3\n")
    write_function(daemon.functions, "limited.py", ECHO)
    wait_loaded(daemon, "limited")
    config = lam.get_function_configuration(FunctionName="limited")
    config.pop("ResponseMetadata")
    assert config == lam.get_function(FunctionName="limited")["Configuration"]
    assert config["State"] == "Active"
    lam.get_waiter("function_active_v2").wait(FunctionName="limited", WaiterConfig={"MaxAttempts": 1})
    lam.get_waiter("function_updated").wait(FunctionName="limited", WaiterConfig={"MaxAttempts": 1})

    assert lam.get_function_concurrency(FunctionName="limited")["ReservedConcurrentExecutions"] == 3
    assert "ReservedConcurrentExecutions" not in lam.get_function_concurrency(FunctionName="echo")
    versions = lam.list_versions_by_function(FunctionName="limited")["Versions"]
    assert [v["Version"] for v in versions] == ["$LATEST"]
    assert lam.list_aliases(FunctionName="limited")["Aliases"] == []
    assert lam.list_tags(Resource=config["FunctionArn"])["Tags"] == {}
    for call in (lambda: lam.get_function_configuration(FunctionName="ghost"),
                 lambda: lam.get_function_concurrency(FunctionName="ghost"),
                 lambda: lam.list_tags(Resource="arn:aws:lambda:us-east-1:000000000000:function:ghost")):
        with pytest.raises(lam.exceptions.ResourceNotFoundException):
            call()


def test_lambda_operations_faasd_does_not_serve_say_so(daemon, lam):
    # Functions are files: writes through the API, and reads of things faasd
    # does not have, are refused with a message that says what it serves.
    for call in (lambda: lam.create_function(FunctionName="new", Role="arn:aws:iam::1:role/r",
                                             Code={"ZipFile": b"x"}, Runtime="python3.11",
                                             Handler="a.b"),
                 lambda: lam.delete_function(FunctionName="echo"),
                 lambda: lam.update_function_code(FunctionName="echo", ZipFile=b"x"),
                 lambda: lam.put_function_concurrency(FunctionName="echo", ReservedConcurrentExecutions=2),
                 lambda: lam.list_event_source_mappings()):
        with pytest.raises(ClientError) as refused:
            call()
        error = refused.value.response
        assert error["Error"]["Code"] == "NotImplemented"
        assert error["ResponseMetadata"]["HTTPStatusCode"] == 501
        assert "GetFunctionConfiguration" in error["Error"]["Message"]
        assert "functions/" in error["Error"]["Message"]
    assert lam.get_function(FunctionName="echo")["Configuration"]["FunctionName"] == "echo"
    # A path outside the Lambda API that no route matches is still a plain 404.
    assert daemon.get("/nowhere/at/all").status == 404

def test_an_unserved_operation_is_refused_even_where_a_catch_all_route_matches(daemon, lam):
    # A function serving a whole site (`/{path+}`) never gets an AWS client's call
    # of a Lambda operation faasd does not serve: boto3 would take its page for a
    # success (get_alias answered with nothing) and the function would run for it.
    write_function(daemon.functions, "site/function.toml", '[[triggers]]\ntype = "http"\npath = "/{path+}"\n')
    write_function(daemon.functions, "site/handler.py", """
def handler(event, context):
    print("SITE", event["rawPath"])
    return {"statusCode": 200, "headers": {"content-type": "text/html"}, "body": "<p>site</p>"}
""")
    wait_loaded(daemon, "site")
    for call in (lambda: lam.get_alias(FunctionName="echo", Name="prod"),
                 lambda: lam.list_event_source_mappings(),
                 lambda: lam.get_provisioned_concurrency_config(FunctionName="echo", Qualifier="1"),
                 lambda: lam.create_function(FunctionName="new", Role="arn:aws:iam::000000000000:role/r",
                                             Code={"ZipFile": b"x"}, Runtime="python3.11", Handler="a.b")):
        error = refused(call, "NotImplemented", 501, modeled=False)
        assert "faasd does not implement" in error["Error"]["Message"]
    assert "SITE" not in daemon.log_of("site")
    # The site's own visitors, who sign nothing, still reach it on any path.
    page = daemon.get("/2024-05-01/archive")
    assert (page.status, page.body) == (200, b"<p>site</p>")
    assert "SITE /2024-05-01/archive" in daemon.log_of("site")


def test_inventory_operations_say_what_faasd_does(daemon, lam):
    write_function(daemon.functions, "limited.toml",
                   'concurrency = 3\n[async]\nmax_retries = 1\nmax_event_age_s = 600\n'
                   'on_failure = "function:echo"\n')
    write_function(daemon.functions, "limited.py", ECHO)
    wait_loaded(daemon, "limited")
    echo_arn = "arn:aws:lambda:us-east-1:000000000000:function:echo"

    account = lam.get_account_settings()
    assert account["AccountLimit"]["ConcurrentExecutions"] == 1000  # [limits] max_concurrency
    assert account["AccountLimit"]["UnreservedConcurrentExecutions"] == 997  # limited reserves 3
    code = [p for p in daemon.functions.iterdir() if p.suffix in (".py", ".toml")]
    assert account["AccountUsage"] == {
        "FunctionCount": 2,
        "TotalCodeSize": sum(p.stat().st_size for p in code if p.suffix == ".py")}

    # The event invoke config is the function's [async]; the dead-letter dir has no ARN.
    limited = lam.get_function_event_invoke_config(FunctionName="limited")
    assert limited["FunctionArn"].endswith(":function:limited:$LATEST")
    assert (limited["MaximumRetryAttempts"], limited["MaximumEventAgeInSeconds"]) == (1, 600)
    assert limited["DestinationConfig"] == {"OnSuccess": {}, "OnFailure": {"Destination": echo_arn}}
    echo = lam.list_function_event_invoke_configs(FunctionName="echo")["FunctionEventInvokeConfigs"]
    assert [(c["MaximumRetryAttempts"], c["MaximumEventAgeInSeconds"], c["DestinationConfig"])
            for c in echo] == [(2, 21600, {"OnSuccess": {}, "OnFailure": {}})]

    # Every function's URL is /function/NAME/, and it answers there.
    url = lam.get_function_url_config(FunctionName="limited")
    assert url["FunctionUrl"] == f"{daemon.url}/function/limited/"
    assert (url["AuthType"], url["InvokeMode"]) == ("NONE", "BUFFERED")
    assert [c["FunctionUrl"] for c in lam.list_function_url_configs(FunctionName="limited")[
        "FunctionUrlConfigs"]] == [url["FunctionUrl"]]
    answer = daemon.get(url["FunctionUrl"][len(daemon.url):] + "?hello=1")
    assert answer.status == 200 and answer.json()["event"]["queryStringParameters"] == {"hello": "1"}

    # No resource policies, layers or recursive-loop detection here.
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_policy(FunctionName="limited")
    assert lam.list_layers()["Layers"] == []
    assert lam.get_function_recursion_config(FunctionName="limited")["RecursiveLoop"] == "Allow"

    for call in (lambda: lam.get_function_event_invoke_config(FunctionName="ghost"),
                 lambda: lam.get_function_url_config(FunctionName="ghost"),
                 lambda: lam.get_policy(FunctionName="ghost"),
                 lambda: lam.get_function_recursion_config(FunctionName="ghost")):
        with pytest.raises(lam.exceptions.ResourceNotFoundException) as missing:
            call()
        assert "ghost" in str(missing.value)


def test_every_answer_carries_a_request_id_as_aws_answers_do(daemon, lam):
    # botocore reads ResponseMetadata.RequestId from x-amzn-RequestId, which every AWS
    # answer carries: reads, refusals and operations faasd does not serve alike.
    arn = "arn:aws:lambda:us-east-1:000000000000:function:echo"
    calls = {
        "list_functions": lambda: lam.list_functions(),
        "get_function": lambda: lam.get_function(FunctionName="echo"),
        "get_function_configuration": lambda: lam.get_function_configuration(FunctionName="echo"),
        "get_function_concurrency": lambda: lam.get_function_concurrency(FunctionName="echo"),
        "list_versions_by_function": lambda: lam.list_versions_by_function(FunctionName="echo"),
        "list_aliases": lambda: lam.list_aliases(FunctionName="echo"),
        "list_tags": lambda: lam.list_tags(Resource=arn),
        "get_account_settings": lambda: lam.get_account_settings(),
        "get_function_event_invoke_config": lambda: lam.get_function_event_invoke_config(FunctionName="echo"),
        "list_function_event_invoke_configs": lambda: lam.list_function_event_invoke_configs(FunctionName="echo"),
        "get_function_url_config": lambda: lam.get_function_url_config(FunctionName="echo"),
        "list_function_url_configs": lambda: lam.list_function_url_configs(FunctionName="echo"),
        "list_layers": lambda: lam.list_layers(),
        "get_function_recursion_config": lambda: lam.get_function_recursion_config(FunctionName="echo"),
        "invoke": lambda: lam.invoke(FunctionName="echo"),
    }
    seen = set()
    for operation, call in calls.items():
        request_id = call()["ResponseMetadata"].get("RequestId")
        assert request_id and re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                                           request_id), (operation, request_id)
        seen.add(request_id)
    assert len(seen) == len(calls)
    for call in (lambda: lam.delete_function(FunctionName="echo"), lambda: lam.get_function(FunctionName="ghost"),
                 lambda: lam.list_functions(FunctionVersion="LATEST")):
        with pytest.raises(ClientError) as caught:
            call()
        assert caught.value.response["ResponseMetadata"].get("RequestId"), caught.value.response


def test_list_functions_pages_through_every_function(daemon, lam):
    for name in ("alpha", "beta", "gamma"):
        write_function(daemon.functions, f"{name}.py", ECHO)
    wait_loaded(daemon, "alpha", "beta", "gamma")
    first = lam.list_functions(MaxItems=2)
    assert [f["FunctionName"] for f in first["Functions"]] == ["alpha", "beta"]
    assert first["NextMarker"]
    names = [f["FunctionName"]
             for page in lam.get_paginator("list_functions").paginate(PaginationConfig={"PageSize": 2})
             for f in page["Functions"]]
    assert names == ["alpha", "beta", "echo", "gamma"]
    error = refused(lambda: lam.list_functions(Marker="no/such"), "InvalidParameterValueException", 400)
    assert error["Error"]["Message"] == "Marker must be a NextMarker that ListFunctions gave, not 'no/such'"
    # MaxItems is 1 to 10000 in Lambda's model (botocore itself refuses one below 1).
    error = refused(lambda: lam.list_functions(MaxItems=10001), "ValidationException", 400, modeled=False)
    assert error["Error"]["Message"] == ("1 validation error detected: Value '10001' at 'maxItems' failed to "
                                         "satisfy constraint: Member must have value less than or equal to 10000")
    below = daemon.get("/2015-03-31/functions/?MaxItems=0")
    assert below.status == 400 and below.headers["x-amzn-errortype"] == "ValidationException"
    assert below.json()["message"].endswith("Member must have value greater than or equal to 1")
    echo = next(f for f in lam.list_functions()["Functions"] if f["FunctionName"] == "echo")
    for key in ("FunctionArn", "Runtime", "Handler", "MemorySize", "Timeout", "LastModified",
                "CodeSha256", "Role"):
        assert key in echo, key
    # Lambda lists a subset of the configuration: its state is GetFunction's to tell,
    # so a script written here that read it from the listing would fail on AWS.
    assert not {"State", "StateReason", "StateReasonCode", "LastUpdateStatus"} & set(echo)
    config = lam.get_function_configuration(FunctionName="echo")
    assert (config["State"], config["LastUpdateStatus"]) == ("Active", "Successful")
    assert {k: v for k, v in config.items() if k not in ("ResponseMetadata", "State", "LastUpdateStatus")} == echo


def test_list_functions_gives_at_most_50_a_page_whatever_max_items_says(daemon, lam):
    # As Lambda: a client that asks for more and reads one page sees 50 here too,
    # not every function, and pages on with NextMarker.
    names = [f"f{index:02d}" for index in range(55)]
    for name in names:
        write_function(daemon.functions, f"{name}.py", ECHO)
    wait_loaded(daemon, *names)
    first = lam.list_functions(MaxItems=1000)
    assert [f["FunctionName"] for f in first["Functions"]] == ["echo", *names[:49]]
    second = lam.list_functions(MaxItems=1000, Marker=first["NextMarker"])
    assert [f["FunctionName"] for f in second["Functions"]] == names[49:] and "NextMarker" not in second
    assert len(lam.list_functions()["Functions"]) == 50
    pages = list(lam.get_paginator("list_functions").paginate(PaginationConfig={"PageSize": 100}))
    assert [len(page["Functions"]) for page in pages] == [50, 6]


def test_list_functions_pages_stay_whole_while_functions_come_and_go(daemon, lam):
    # A page's NextMarker holds its place whatever changes before it: a function
    # removed or added between two pages neither hides nor repeats another.
    for name in ("alpha", "beta", "gamma"):
        write_function(daemon.functions, f"{name}.py", ECHO)
    wait_loaded(daemon, "alpha", "beta", "gamma")

    def names(page: dict) -> list[str]:
        return [f["FunctionName"] for f in page["Functions"]]

    first = lam.list_functions(MaxItems=2)
    assert names(first) == ["alpha", "beta"]
    (daemon.functions / "alpha.py").unlink()
    wait_until(lambda: daemon.get("/system/functions/alpha").status == 404, message="alpha to go")
    second = lam.list_functions(MaxItems=2, Marker=first["NextMarker"])
    assert names(second) == ["echo", "gamma"] and "NextMarker" not in second

    first = lam.list_functions(MaxItems=2)
    assert names(first) == ["beta", "echo"]
    write_function(daemon.functions, "aardvark.py", ECHO)
    wait_loaded(daemon, "aardvark")
    assert names(lam.list_functions(MaxItems=2, Marker=first["NextMarker"])) == ["gamma"]


AWS = str(Path(sys.executable).parent / "aws")


def aws_cli(daemon, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="AKIDTEST", AWS_SECRET_ACCESS_KEY="secret",
               AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1",
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    return subprocess.run([AWS, "lambda", *args, "--endpoint-url", daemon.url],
                          capture_output=True, text=True, env=env, timeout=120)


def test_the_aws_cli_invokes_functions(daemon, lam, tmp_path):
    out = tmp_path / "out.json"
    result = aws_cli(daemon, "invoke", "--function-name", "echo", "--payload", '{"from": "cli"}',
                     "--log-type", "Tail", str(out))
    assert result.returncode == 0, result.stderr
    meta = json.loads(result.stdout)
    assert meta["StatusCode"] == 200 and meta["ExecutedVersion"] == "$LATEST"
    assert "echo got {'from': 'cli'}" in base64.b64decode(meta["LogResult"]).decode()
    assert json.loads(out.read_text())["event"] == {"from": "cli"}

    result = aws_cli(daemon, "invoke", "--function-name", "echo", "--invocation-type", "Event",
                     "--payload", "{}", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["StatusCode"] == 202

    result = aws_cli(daemon, "invoke", "--function-name", "ghost", str(out))
    assert result.returncode != 0
    assert "ResourceNotFoundException" in result.stderr

    result = aws_cli(daemon, "get-function", "--function-name", "echo")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["Configuration"]["FunctionName"] == "echo"


def test_the_faasd_cli_prints_an_invocations_result(daemon, lam):
    result = subprocess.run([sys.executable, "-m", "faasd", "invoke", "echo", "--data", '{"x": 1}',
                             "--url", daemon.url], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["event"] == {"x": 1}
    # An address without its scheme is named back, with the form it needs, not a traceback.
    for url in ("127.0.0.1:9", "not a url", "ftp://127.0.0.1"):
        answer = subprocess.run([sys.executable, "-m", "faasd", "invoke", "echo", "--url", url],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert answer.returncode == 1 and "Traceback" not in answer.stderr, answer.stderr
        assert answer.stderr.startswith(f"faasd: cannot call {url}") and "http://HOST:PORT" in answer.stderr


class ApiBodyStaller(BodyStaller):
    """Stalls the body of a Lambda API call."""

    STALLS = b"POST /2015-03-31/"


def test_a_stalled_body_on_the_lambda_api_is_a_request_timeout_exception(start_daemon, functions_dir):
    write_function(functions_dir, "echo.py", ECHO)
    daemon = start_daemon(functions_dir, env={"FAASD_SERVER_IDLE_TIMEOUT_S": "1"})
    wait_loaded(daemon, "echo")
    proxy = ApiBodyStaller(("127.0.0.1", daemon.port))
    try:
        lam = lambda_client(f"http://127.0.0.1:{proxy.port}")
        error = refused(lambda: lam.invoke(FunctionName="echo", Payload=b'{"k": 1}'),
                        "RequestTimeoutException", 408, modeled=False)
        assert error["Error"]["Message"] == "the request body stalled for over 1 s"
        assert error["ResponseMetadata"]["RequestId"]
    finally:
        proxy.close()


def test_an_unknown_host_on_the_lambda_api_is_access_denied(daemon, lam):
    def rebound(request, **_):
        request.headers["Host"] = f"rebind.example:{daemon.port}"

    lam.meta.events.register("before-send.lambda", rebound)
    error = refused(lambda: lam.get_function(FunctionName="echo"), "AccessDeniedException", 403, modeled=False)
    assert error["Error"]["Message"].startswith("Host 'rebind.example:")
    assert "DNS rebinding" in error["Error"]["Message"]
    assert error["ResponseMetadata"]["RequestId"]
    # Lambda's body for it: {"Message": ...}, as for an IAM refusal.
    raw = daemon.get("/2015-03-31/functions/echo", headers={"Host": "rebind.example"})
    assert raw.status == 403 and raw.headers["x-amzn-errortype"] == "AccessDeniedException"
    assert list(raw.json()) == ["Message"]
    # Elsewhere the refusal keeps its own shape.
    page = daemon.get("/function/echo", headers={"Host": "rebind.example"})
    assert page.status == 403 and "x-amzn-errortype" not in page.headers and "DNS rebinding" in page.json()["message"]
