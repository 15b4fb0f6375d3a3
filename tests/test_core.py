"""The core runtime end to end: a real daemon, real workers, real HTTP over loopback."""

from __future__ import annotations

import base64
import gzip
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from support import (
    MEMORY_HOLDER, ROOT, assert_callers_trace_ids_pass_on, assert_own_trace_ids, concurrent, descendants,
    free_port, http, loaded, max_memory_used, metric, process_state, report_of, request_lines, wait_until,
    write_function,
)

HELLO = """
def handler(event, context):
    return {"statusCode": 200, "body": "v1"}
"""


def test_a_dropped_file_is_served_then_changed_then_deleted_without_restart(daemon):
    assert daemon.get("/function/hello").status == 404
    write_function(daemon.functions, "hello.py", HELLO)
    wait_until(lambda: daemon.get("/function/hello").status == 200, message="hello to appear")
    assert daemon.get("/function/hello/any/path?x=1").text == "v1"

    write_function(daemon.functions, "hello.py", HELLO.replace("v1", "v2"))
    wait_until(lambda: daemon.get("/function/hello").text == "v2", message="new code to serve")

    (daemon.functions / "hello.py").unlink()
    wait_until(lambda: daemon.get("/function/hello").status == 404, message="hello to go away")
    assert daemon.get("/function/hello").json() == {"message": "Not Found"}


def test_a_function_rewritten_in_place_while_it_is_called_serves_only_complete_code(daemon):
    """`cat > f.py`, an editor or scp write the file in place: truncated, then written,
    which may take a while. No call sees the code half-written: each gets the old or the new."""
    path = daemon.functions / "inplace.py"

    def code(version: int) -> str:
        return f"def handler(event, context):\n    return {version}\n" + "# padding\n" * 400

    write_function(daemon.functions, "inplace.py", code(0))
    wait_until(lambda: daemon.get("/function/inplace").status == 200, message="the function to load")
    stop = threading.Event()
    failures: list[str] = []
    served: list[int] = []

    def call() -> None:
        while not stop.is_set():
            response = daemon.invoke("inplace")
            if response.status == 200 and isinstance(response.json(), int):
                served.append(response.json())
            else:  # an init error, or half of the code that happened to run
                failures.append(response.text)

    callers = [threading.Thread(target=call) for _ in range(2)]
    for caller in callers:
        caller.start()
    try:
        for version in range(1, 21):
            text = code(version)
            with open(path, "w") as handle:  # truncates it, in place
                handle.write(text[:20])
                handle.flush()
                time.sleep(0.1)  # a writer that takes its time: part of it is there meanwhile
                handle.write(text[20:])
            time.sleep(0.15)
        wait_until(lambda: served and served[-1] == 20, timeout=20, message="the last version to serve")
    finally:
        stop.set()
        for caller in callers:
            caller.join(30)
    assert failures == [], f"{len(failures)} of {len(failures) + len(served)} calls failed: {failures[:3]}"
    assert len(set(served)) > 2, served  # new code was taken up meanwhile, not only at the end


def test_lambda_handler_is_used_when_handler_is_absent(daemon):
    write_function(daemon.functions, "lh.py", """
        def lambda_handler(event, context):
            return "from lambda_handler"
    """)
    wait_until(lambda: daemon.get("/function/lh").status == 200)
    assert daemon.get("/function/lh").json() == "from lambda_handler"


def test_a_module_may_share_a_name_with_the_runtimes_own_files(daemon):
    """The shim is loaded as faasd.runtimes.python_runtime (from its cached
    bytecode): a function's modules named like its files are the function's."""
    for name in ("python_runtime", "python_worker"):
        write_function(daemon.functions, f"{name}.py", """
            import sys

            def handler(event, context):
                shim = sys.modules["faasd.runtimes.python_runtime"]
                return {"mine": __name__, "shim_from_bytecode_cache": shim.__cached__ is not None}
        """)
        loaded(daemon, name)
        assert daemon.get(f"/function/{name}").json() == {"mine": name, "shim_from_bytecode_cache": True}


def test_a_worker_starts_without_the_ctypes_package(daemon):
    """Its libc calls (parent-death signal, sandbox) go through faasd/libc.py:
    `import ctypes` would cost every first start milliseconds."""
    write_function(daemon.functions, "lean.py", """
        import sys

        def handler(event, context):
            return {"ctypes": "ctypes" in sys.modules, "libc": "faasd.libc" in sys.modules}
    """)
    loaded(daemon, "lean")
    assert daemon.get("/function/lean").json() == {"ctypes": False, "libc": True}


def test_directory_function_with_function_toml_and_sidecar_toml(daemon):
    write_function(daemon.functions, "dirfn/main.py", """
        import os
        def run(event, context):
            return {"greeting": os.environ["GREETING"], "memory": context.memory_limit_in_mb}
    """)
    write_function(daemon.functions, "dirfn/function.toml", """
        handler = "main.run"
        memory_mb = 256
        [env]
        GREETING = "hi"
    """)
    write_function(daemon.functions, "side.py", """
        import os
        def handler(event, context):
            return {"timeout_left_under": context.get_remaining_time_in_millis() <= 7000,
                    "color": os.environ["COLOR"]}
    """)
    write_function(daemon.functions, "side.toml", 'timeout_s = 7\n[env]\nCOLOR = "blue"\n')
    wait_until(lambda: daemon.get("/function/dirfn").status == 200)
    assert daemon.get("/function/dirfn").json() == {"greeting": "hi", "memory": "256"}
    wait_until(lambda: daemon.get("/function/side").status == 200)
    assert daemon.get("/function/side").json() == {"timeout_left_under": True, "color": "blue"}


ECHO = """
def handler(event, context):
    return event
"""


def test_payload_2_0_event_carries_the_request(daemon):
    write_function(daemon.functions, "echo.py", ECHO)
    wait_until(lambda: daemon.get("/function/echo").status == 200)
    response = http("POST", daemon.url + "/function/echo/a/b?x=1&x=2&y=",
                    b'{"k": "v"}', headers={"Content-Type": "application/json",
                                            "X-Custom": "One", "Cookie": "a=1; b=2",
                                            "User-Agent": "tester/1"})
    event = response.json()
    assert event["version"] == "2.0"
    assert event["routeKey"] == "ANY /function/echo/{proxy+}"
    assert event["rawPath"] == "/function/echo/a/b"
    assert event["rawQueryString"] == "x=1&x=2&y="
    assert event["queryStringParameters"] == {"x": "1,2", "y": ""}
    assert event["pathParameters"] == {"proxy": "a/b"}
    assert event["cookies"] == ["a=1", "b=2"]
    assert event["headers"]["x-custom"] == "One"
    assert "cookie" not in event["headers"]
    # What API Gateway adds to every request.
    port = daemon.url.rsplit(":", 1)[1]
    assert (event["headers"]["x-forwarded-for"], event["headers"]["x-forwarded-proto"],
            event["headers"]["x-forwarded-port"]) == ("127.0.0.1", "http", port)
    http_ctx = event["requestContext"]["http"]
    assert http_ctx == {"method": "POST", "path": "/function/echo/a/b", "protocol": "HTTP/1.1",
                        "sourceIp": "127.0.0.1", "userAgent": "tester/1"}
    assert event["requestContext"]["requestId"] == response.headers["apigw-requestid"]
    assert abs(event["requestContext"]["timeEpoch"] / 1000 - time.time()) < 60
    assert event["body"] == '{"k": "v"}' and event["isBase64Encoded"] is False
    # The domain name without the port the Host header carries, as API Gateway gives it.
    assert event["headers"]["host"] == f"127.0.0.1:{port}"
    assert (event["requestContext"]["domainName"], event["requestContext"]["domainPrefix"]) == (
        "127.0.0.1", "127")
    named = daemon.get("/function/echo", headers={"Host": f"api.localhost:{port}"}).json()
    assert (named["requestContext"]["domainName"], named["requestContext"]["domainPrefix"]) == (
        "api.localhost", "api")
    bracketed = daemon.get("/function/echo", headers={"Host": f"[::1]:{port}"}).json()
    assert bracketed["requestContext"]["domainName"] == "[::1]"


def test_a_proxy_in_front_keeps_its_forwarding_headers_and_faasd_adds_its_peer(daemon):
    write_function(daemon.functions, "echo.py", ECHO)
    wait_until(lambda: daemon.get("/function/echo").status == 200)
    headers = daemon.get("/function/echo", headers={
        "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https", "X-Forwarded-Port": "443"}).json()["headers"]
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert (headers["x-forwarded-proto"], headers["x-forwarded-port"]) == ("https", "443")


def test_binary_bodies_round_trip_base64(daemon):
    write_function(daemon.functions, "bin.py", """
        import base64
        def handler(event, context):
            data = base64.b64decode(event["body"]) if event["isBase64Encoded"] else b""
            return {"statusCode": 201, "isBase64Encoded": True,
                    "headers": {"content-type": "application/octet-stream"},
                    "body": base64.b64encode(data[::-1]).decode()}
    """)
    wait_until(lambda: daemon.get("/function/bin").status == 201)
    blob = bytes(range(256)) * 4
    response = http("POST", daemon.url + "/function/bin", blob,
                    headers={"Content-Type": "application/octet-stream"})
    assert response.status == 201
    assert response.body == blob[::-1]
    assert response.headers["content-type"] == "application/octet-stream"


def test_a_compressed_body_reaches_the_handler_as_sent_with_its_content_encoding(daemon):
    """API Gateway and function URLs pass a body on as the client sent it: a
    handler that honours `content-encoding` gets the gzip bytes (base64, being
    binary) and decompresses them itself, on AWS and here alike."""
    write_function(daemon.functions, "echo.py", ECHO)
    loaded(daemon, "echo")
    sent = gzip.compress(b'{"k": "v"}')
    event = http("POST", daemon.url + "/function/echo", sent, headers={
        "Content-Type": "application/json", "Content-Encoding": "gzip"}).json()
    assert event["headers"]["content-encoding"] == "gzip"
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == sent
    assert event["headers"]["content-length"] == str(len(sent))


def test_headers_and_urls_as_long_as_api_gateway_takes_reach_the_handler(daemon):
    """An HTTP API takes a request line and headers of up to 10240 bytes: a
    9 KB token or cookie header, or a 9 KB URL, is served, not refused."""
    write_function(daemon.functions, "echo.py", ECHO)
    loaded(daemon, "echo")
    token = "t" * 9000
    query = "q=" + "u" * 9000
    response = daemon.get(f"/function/echo?{query}", headers={"Authorization": f"Bearer {token}",
                                                             "Cookie": f"session={token}"})
    assert response.status == 200, response.text
    event = response.json()
    assert event["headers"]["authorization"] == f"Bearer {token}"
    assert event["cookies"] == [f"session={token}"]
    assert event["rawQueryString"] == query


def test_payload_2_0_response_rules(daemon):
    write_function(daemon.functions, "resp.py", """
        def handler(event, context):
            kind = event["queryStringParameters"]["kind"]
            if kind == "full":
                return {"statusCode": 418, "headers": {"X-A": "1"}, "cookies": ["c1=x", "c2=y"],
                        "body": "teapot"}
            if kind == "list":
                return [1, 2, 3]
            if kind == "string":
                return "plain"
            if kind == "none":
                return None
            return {"no": "statusCode"}
    """)
    wait_until(lambda: daemon.get("/function/resp?kind=list").status == 200)
    full = daemon.get("/function/resp?kind=full")
    assert full.status == 418 and full.text == "teapot" and full.headers["x-a"] == "1"
    import urllib.request

    raw = urllib.request.urlopen(urllib.request.Request(daemon.url + "/function/resp?kind=list"))
    assert raw.headers["Content-Type"].startswith("application/json")
    assert json.loads(raw.read()) == [1, 2, 3]
    assert daemon.get("/function/resp?kind=string").body == b'"plain"'
    assert daemon.get("/function/resp?kind=none").body == b"null"
    assert daemon.get("/function/resp?kind=dict").json() == {"no": "statusCode"}
    # Set-Cookie is repeated, one per cookie.
    conn_headers = _raw_headers(daemon.url + "/function/resp?kind=full")
    assert sorted(v for k, v in conn_headers if k.lower() == "set-cookie") == ["c1=x", "c2=y"]


MALFORMED = {
    "headers": ({"statusCode": 200, "headers": 5}, "headers must be an object"),
    "header_value": ({"statusCode": 200, "headers": {"X-A": {"v": 1}}}, "header 'X-A'"),
    "header_name": ({"statusCode": 200, "headers": {"X-A\nB": "1"}}, "not a valid header name"),
    "cookies": ({"statusCode": 200, "cookies": 5}, "cookies must be a list of strings"),
    "body": ({"statusCode": 200, "body": {"k": "v"}}, "body must be a string, not an object"),
    "base64": ({"statusCode": 200, "isBase64Encoded": True, "body": "not base64!"}, "not valid base64"),
    "flag": ({"statusCode": 200, "isBase64Encoded": "yes", "body": "eWVz"}, "isBase64Encoded must be"),
    "status": ({"statusCode": "teapot"}, "statusCode 'teapot'"),
    "informational": ({"statusCode": 101, "headers": {"Upgrade": "h2c"}}, "statusCode 101 is an informational"),
    "continue": ({"statusCode": "100"}, "statusCode 100 is an informational"),
}


def test_multi_value_headers_are_not_part_of_a_payload_2_0_response(daemon):
    """HTTP APIs (payload 2.0) and function URLs ignore a response's
    multiValueHeaders: headers set only there reach no client on AWS, so they
    reach none here; `headers` and `cookies` are the ways to set them."""
    write_function(daemon.functions, "multi.py", """
        def handler(event, context):
            kind = event["queryStringParameters"]["kind"]
            if kind == "shape":
                return {"statusCode": 200, "body": "ok", "multiValueHeaders": "x"}
            return {"statusCode": 200, "body": "ok", "headers": {"X-Single": "1"},
                    "multiValueHeaders": {"X-Multi": ["a", "b"], "X-Single": ["2", "3"]}}
    """)
    loaded(daemon, "multi")
    headers = _raw_headers(daemon.url + "/function/multi?kind=values")
    assert [v for k, v in headers if k.lower() == "x-single"] == ["1"]
    assert not [v for k, v in headers if k.lower() == "x-multi"]
    shape = daemon.get("/function/multi?kind=shape")
    assert (shape.status, shape.text) == (200, "ok")


def test_a_malformed_response_is_502_and_the_log_says_what_is_wrong(daemon):
    write_function(daemon.functions, "shapes.py", f"""
        MALFORMED = {MALFORMED!r}

        def handler(event, context):
            return MALFORMED[event["queryStringParameters"]["kind"]][0]
    """)
    loaded(daemon, "shapes")
    for kind, (_, problem) in MALFORMED.items():
        response = daemon.get(f"/function/shapes?kind={kind}")
        assert response.status == 502, (kind, response.status, response.text)
        assert response.json() == {"message": "Internal Server Error"}, kind
        line = next(line for line in daemon.log_of("shapes").splitlines()
                    if line.split("\t")[1:2] == [response.headers["apigw-requestid"]]
                    and "Malformed Lambda proxy response" in line)
        assert problem in line, (kind, line)
    assert "Traceback" not in daemon.output()
    assert daemon.get("/function/shapes?kind=nope").status == 502  # the handler's own KeyError


def test_control_characters_in_response_headers_cannot_break_the_response(daemon):
    """CR and LF would start a header of the handler's making, NUL and the other
    control characters no HTTP client takes: each becomes a space."""
    write_function(daemon.functions, "inject.py", """
        def handler(event, context):
            return {"statusCode": 200, "body": "ok",
                    "headers": {"X-Crlf": "a\\r\\nSet-Cookie: evil=1", "X-Nul": "a\\x00b",
                                "X-Controls": "a\\x01\\x0b\\x1b\\x7fb", "X-Tab": "a\\tb"},
                    "cookies": ["c=1\\x00; Path=/\\nX-Injected: 1"]}
    """)
    loaded(daemon, "inject")
    headers = _raw_headers(daemon.url + "/function/inject")
    by_name = {k.lower(): v for k, v in headers}
    assert by_name["x-crlf"] == "a  Set-Cookie: evil=1"
    assert by_name["x-nul"] == "a b"
    assert by_name["x-controls"] == "a    b"
    assert by_name["x-tab"] == "a\tb"
    assert [v for k, v in headers if k.lower() == "set-cookie"] == ["c=1 ; Path=/ X-Injected: 1"]
    assert "x-injected" not in by_name
    assert "Traceback" not in daemon.output()


def _raw_headers(url: str) -> list[tuple[str, str]]:
    import http.client
    from urllib.parse import urlparse

    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    conn.request("GET", parsed.path + "?" + parsed.query)
    response = conn.getresponse()
    response.read()
    headers = response.getheaders()
    conn.close()
    return headers


def test_http_trigger_routes_with_path_parameters_and_methods(daemon):
    write_function(daemon.functions, "thumbs/handler.py", ECHO)
    write_function(daemon.functions, "thumbs/function.toml", """
        [[triggers]]
        type = "http"
        path = "/thumbs/{id}/size/{size}"
        methods = ["GET"]
    """)
    wait_until(lambda: daemon.get("/thumbs/7/size/large").status == 200)
    event = daemon.get("/thumbs/7/size/large").json()
    assert event["pathParameters"] == {"id": "7", "size": "large"}
    assert event["routeKey"] == "GET /thumbs/{id}/size/{size}"
    assert daemon.get("/thumbs/7").status == 404
    # A route is a method and a path, as in an API Gateway HTTP API: another method's
    # request matches no route, and is answered as one for an unknown path.
    wrong_method = daemon.post("/thumbs/7/size/large", "x")
    assert (wrong_method.status, wrong_method.json()) == (404, {"message": "Not Found"})
    assert "allow" not in wrong_method.headers


def test_a_head_request_served_by_a_get_route_names_that_route(daemon):
    """routeKey is the key of a route the function has: a handler that
    dispatches on it finds `GET /...` for the HEAD its GET route serves."""
    write_function(daemon.functions, "keys/handler.py", """
        def handler(event, context):
            return {"statusCode": 200, "body": "",
                    "headers": {"x-route-key": event["routeKey"],
                                "x-context-route-key": event["requestContext"]["routeKey"],
                                "x-method": event["requestContext"]["http"]["method"]}}
    """)
    write_function(daemon.functions, "keys/function.toml", """
        [[triggers]]
        type = "http"
        path = "/keys/{id}"
        methods = ["GET", "POST"]
    """)
    wait_until(lambda: daemon.get("/keys/1").status == 200)
    head = http("HEAD", daemon.url + "/keys/1").headers
    assert (head["x-route-key"], head["x-context-route-key"], head["x-method"]) == (
        "GET /keys/{id}", "GET /keys/{id}", "HEAD")
    assert daemon.post("/keys/1", "x").headers["x-route-key"] == "POST /keys/{id}"


NAMED = """
import os
def handler(event, context):
    return context.function_name
"""
SHARED_ROUTE = '[[triggers]]\ntype = "http"\npath = "/shared/{id}"\n'


def test_a_route_two_functions_claim_stays_with_the_first_and_the_other_is_told(
        start_daemon, functions_dir, tmp_path):
    for name in ("alpha", "beta"):
        write_function(functions_dir, f"{name}.toml", SHARED_ROUTE.replace("{id}", f"{{{name}_id}}"))
        write_function(functions_dir, f"{name}.py", NAMED)
    config = tmp_path / "faasd.toml"
    config.write_text(f'[paths]\nfunctions = "{functions_dir}"\n')
    checked = run_cli("--config", str(config), "check")
    assert checked.returncode == 1, checked.stdout
    assert ("beta: error: http trigger path '/shared/{beta_id}' is already the route of function "
            "'alpha'; it is not served here") in checked.stdout
    assert "alpha: ok" in checked.stdout

    daemon = start_daemon(functions_dir)
    assert daemon.get("/shared/1").json() == "alpha"  # at start, in name order
    assert daemon.function("beta")["route_conflicts"] == [
        "http trigger path '/shared/{beta_id}' is already the route of function 'alpha'; it is not served here"]
    assert daemon.function("beta")["routes"] == ["/function/beta"]
    assert daemon.function("alpha")["route_conflicts"] == []
    assert "function beta: http trigger path '/shared/{beta_id}' is already the route" in daemon.output()
    assert daemon.get("/function/beta").json() == "beta"

    (functions_dir / "alpha.toml").unlink()  # alpha lets go: beta is served there
    wait_until(lambda: daemon.get("/shared/1").json() == "beta", message="beta on /shared")
    assert daemon.function("beta")["route_conflicts"] == []
    write_function(functions_dir, "alpha.toml", SHARED_ROUTE)  # back: beta keeps it now
    wait_until(lambda: daemon.function("alpha")["route_conflicts"], message="alpha told")
    assert daemon.get("/shared/1").json() == "beta"


def test_context_and_environment_are_lambdas_and_the_daemons_do_not_leak(start_daemon, functions_dir):
    write_function(functions_dir, "env.py", """
        import os
        def handler(event, context):
            return {"env": dict(os.environ), "ctx": {
                "function_name": context.function_name,
                "function_version": context.function_version,
                "invoked_function_arn": context.invoked_function_arn,
                "memory_limit_in_mb": context.memory_limit_in_mb,
                "aws_request_id": context.aws_request_id,
                "log_group_name": context.log_group_name,
                "log_stream_name": context.log_stream_name,
                "tenant_id": context.tenant_id,
                "repr": repr(context),
                "public": sorted(name for name in dir(context) if not name.startswith("_")),
                "remaining": context.get_remaining_time_in_millis()}}
    """)
    daemon = start_daemon(functions_dir, env={"DAEMON_SECRET": "s3cr3t", "AWS_SECRET_ACCESS_KEY": "nope"})
    response = daemon.invoke("env")
    body = response.json()
    env, ctx = body["env"], body["ctx"]
    assert "DAEMON_SECRET" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert "s3cr3t" not in json.dumps(env)
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "env"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "128"
    assert env["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST"
    assert env["_HANDLER"] == "env.handler"
    assert env["LAMBDA_TASK_ROOT"] == str(functions_dir)
    assert env["AWS_REGION"]
    # The runtime identifier GetFunction reports, as Lambda's runtimes set it (python3.11, ...).
    runtime = daemon.get("/2015-03-31/functions/env").json()["Configuration"]["Runtime"]
    assert runtime == f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert env["AWS_EXECUTION_ENV"] == f"AWS_Lambda_{runtime}"
    assert Path(env["TMPDIR"]).is_absolute()
    assert not any(k.startswith("_FAASD") for k in env)
    assert ctx["function_name"] == "env" and ctx["function_version"] == "$LATEST"
    assert ctx["invoked_function_arn"].endswith(":function:env")
    assert ctx["memory_limit_in_mb"] == "128"
    assert ctx["aws_request_id"] == response.headers["x-amzn-requestid"]
    assert ctx["log_group_name"] == "/aws/lambda/env"
    assert 0 < ctx["remaining"] <= 3000
    assert ctx["tenant_id"] is None
    # What a handler finds on it is what awslambdaric's LambdaContext has, and no more.
    assert ctx["public"] == [
        "aws_request_id", "client_context", "function_name", "function_version",
        "get_remaining_time_in_millis", "identity", "invoked_function_arn", "log", "log_group_name",
        "log_stream_name", "memory_limit_in_mb", "tenant_id", "w3c"]
    # print(context) shows what AWS's runtime shows.
    assert ctx["repr"] == (
        f"LambdaContext([aws_request_id={ctx['aws_request_id']},log_group_name=/aws/lambda/env,"
        f"log_stream_name={ctx['log_stream_name']},function_name=env,memory_limit_in_mb=128,"
        f"function_version=$LATEST,invoked_function_arn={ctx['invoked_function_arn']},"
        "client_context=None,identity=CognitoIdentity([cognito_identity_id=None,"
        "cognito_identity_pool_id=None]),tenant_id=None])")


def test_each_call_has_an_xray_trace_id_of_its_own_in_lambdas_format(daemon):
    write_function(daemon.functions, "tracepy.py", """
        import os
        def handler(event, context):
            return os.environ.get("_X_AMZN_TRACE_ID")
    """)
    loaded(daemon, "tracepy")
    assert_own_trace_ids(daemon, "tracepy")


def test_the_callers_trace_header_is_the_one_a_python_handler_runs_under(daemon):
    write_function(daemon.functions, "passpy.py", """
        import os
        def handler(event, context):
            return [os.environ.get("_X_AMZN_TRACE_ID"), (event.get("headers") or {}).get("x-amzn-trace-id")]
    """)
    loaded(daemon, "passpy")
    assert_callers_trace_ids_pass_on(daemon, "passpy")


def test_module_state_and_tmp_files_survive_warm_invocations(daemon):
    write_function(daemon.functions, "state.py", """
        import os
        COUNT = 0
        def handler(event, context):
            global COUNT
            COUNT += 1
            path = os.path.join(os.environ["TMPDIR"], "seen")
            existed = os.path.exists(path)
            open(path, "a").write("x")
            return {"count": COUNT, "existed": existed, "pid": os.getpid(),
                    "size": os.path.getsize(path)}
    """)
    wait_until(lambda: daemon.get("/function/state").status == 200)
    second = daemon.get("/function/state").json()
    third = daemon.get("/function/state").json()
    assert (second["count"], third["count"]) == (2, 3)
    assert third["existed"] and third["size"] == 3
    assert second["pid"] == third["pid"]


def test_handler_exception_is_502_without_traceback_and_logged_in_full(daemon):
    write_function(daemon.functions, "boom.py", """
        def helper():
            raise ValueError("kaboom 42")
        def handler(event, context):
            print("before the fall")
            helper()
    """)
    wait_until(lambda: daemon.get("/function/boom").status == 502)
    response = daemon.get("/function/boom")
    assert response.json() == {"message": "Internal Server Error"}
    assert "kaboom" not in response.text and "Traceback" not in response.text
    log = daemon.log_of("boom")
    assert "before the fall" in log
    assert "[ERROR] ValueError: kaboom 42" in log
    assert "Traceback (most recent call last)" in log and "in helper" in log
    # The worker survives a handled error.
    pids = {w["pid"] for w in daemon.workers("boom")}
    daemon.get("/function/boom")
    assert {w["pid"] for w in daemon.workers("boom")} == pids
    # The Lambda API gives the error payload.
    error = daemon.invoke("boom")
    assert error.headers["x-amz-function-error"] == "Unhandled"
    assert error.json()["errorType"] == "ValueError"
    assert error.json()["errorMessage"] == "kaboom 42"
    assert any("in helper" in frame for frame in error.json()["stackTrace"])


def test_timeout_is_504_and_the_worker_and_its_children_are_killed(daemon):
    write_function(daemon.functions, "slow.py", """
        import os, subprocess, time
        def handler(event, context):
            child = subprocess.Popen(["sleep", "300"])
            open(os.path.join(os.environ["TMPDIR"], "child"), "w").write(str(child.pid))
            print("child", child.pid, flush=True)
            time.sleep(30)
    """)
    write_function(daemon.functions, "slow.toml", "timeout_s = 1\n")
    loaded(daemon, "slow")
    started = time.monotonic()
    response = daemon.get("/function/slow")
    elapsed = time.monotonic() - started
    assert response.status == 504
    assert 0.9 < elapsed < 10
    log = daemon.log_of("slow")
    child_pid = int(log.split("child ", 1)[1].split()[0])
    wait_until(lambda: process_state(child_pid) in (None, "Z"), message="the handler's child to die")
    assert "Task timed out after 1.00 seconds" in log
    assert "Status: timeout" in log
    error = daemon.invoke("slow").json()
    assert error["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in error["errorMessage"]


@pytest.mark.parametrize("how", ["os._exit(3)", "os.kill(os.getpid(), signal.SIGSEGV)",
                                 "os.kill(os.getpid(), signal.SIGKILL)"])
def test_a_crashing_worker_gives_502_and_is_replaced(daemon, how):
    write_function(daemon.functions, "crash.py", f"""
        import os, signal
        def handler(event, context):
            if event.get("rawQueryString") == "crash":
                {how}
            return os.getpid()
    """)
    wait_until(lambda: daemon.get("/function/crash").status == 200)
    before = daemon.get("/function/crash").json()
    response = daemon.get("/function/crash?crash")
    assert response.status == 502 and response.json() == {"message": "Internal Server Error"}
    after = daemon.get("/function/crash").json()
    assert after != before
    assert process_state(before) in (None, "Z")
    error = daemon.invoke("crash", {"rawQueryString": "crash"}).json()
    assert error["errorType"] == "Runtime.ExitError"
    assert "Runtime exited with error" in error["errorMessage"]


def test_a_call_that_times_out_or_crashes_reports_the_memory_it_used(daemon):
    write_function(daemon.functions, "holder.toml", "memory_mb = 256\ntimeout_s = 1\n")
    write_function(daemon.functions, "holder.py", MEMORY_HOLDER)
    loaded(daemon, "holder")
    for event, error_type in (({"sleep_s": 30}, "Sandbox.Timedout"),
                              ({"exit": True}, "Runtime.ExitError")):
        # A warm worker: the peak it reported for a small call must not stand for the next.
        assert daemon.invoke("holder", {"mb": 1}).json()["held"] == 1024 * 1024
        # 100 MB: more than any small call reports.
        response = daemon.invoke("holder", {"mb": 100, **event})
        assert response.json()["errorType"] == error_type, response.text
        report = report_of(daemon, "holder", response.headers["x-amzn-requestid"])
        assert "\tStatus: " in report and max_memory_used(report) >= 100, report


def test_a_spawned_worker_reports_its_own_memory_not_the_daemons(daemon):
    # The kernel starts a spawned process's getrusage() peak at its parent's
    # (the daemon's, some 50 MB); the REPORT line must show the worker's own.
    write_function(daemon.functions, "small.py", "import os\ndef handler(e, c):\n    return os.getpid()\n")
    loaded(daemon, "small")
    for _ in range(3):
        response = daemon.invoke("small", {})
        pid = response.json()
        report = report_of(daemon, "small", response.headers["x-amzn-requestid"])
        status = Path(f"/proc/{pid}/status").read_text()
        own_mb = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
        daemon_mb = int(next(line for line in Path(f"/proc/{daemon.process.pid}/status").read_text()
                             .splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
        assert own_mb + 10 < daemon_mb, (own_mb, daemon_mb)  # else this test shows nothing
        assert abs(max_memory_used(report) - own_mb) <= 2, (report, own_mb)


def test_memory_over_the_limit_fails_the_invocation_and_replaces_the_worker(daemon):
    write_function(daemon.functions, "hog.py", """
        import os
        def handler(event, context):
            if event.get("hog") or event.get("rawQueryString") == "hog":
                blocks = []
                for _ in range(400):
                    blocks.append(bytearray(1024 * 1024))
            return os.getpid()
    """)
    write_function(daemon.functions, "hog.toml", "memory_mb = 64\ntimeout_s = 20\n")
    loaded(daemon, "hog")
    pid = daemon.invoke("hog").json()
    response = daemon.invoke("hog", {"hog": True})
    error = response.json()
    assert response.headers["x-amz-function-error"] == "Unhandled"
    assert error["errorType"] == "Runtime.OutOfMemory"
    assert "64 MB" in error["errorMessage"]
    assert daemon.invoke("hog").json() != pid
    assert daemon.get("/function/hog?hog").status == 502


def test_unknown_names_bad_names_and_traversal_are_refused(daemon):
    write_function(daemon.functions, "ok.py", ECHO)
    wait_until(lambda: daemon.get("/function/ok").status == 200)
    assert daemon.get("/function/nope").status == 404
    assert daemon.get("/function/" + "a" * 65).status == 400
    assert daemon.get("/function/bad.name").status == 400
    for path in ("/function/..%2f..%2fetc%2fpasswd", "/function/%2e%2e", "/function/ok%00"):
        assert daemon.get(path).status in (400, 404), path
    missing = daemon.invoke("nope")
    assert missing.status == 404
    assert missing.headers["x-amzn-errortype"] == "ResourceNotFoundException"


def test_body_over_the_limit_is_413(start_daemon, functions_dir):
    write_function(functions_dir, "ok.py", ECHO)
    daemon = start_daemon(functions_dir, env={"FAASD_SERVER_MAX_BODY_MB": "1"})
    big = b"x" * (1024 * 1024 + 10)
    assert daemon.post("/function/ok", big).status == 413
    response = daemon.invoke("ok", {"k": "x" * (1024 * 1024)})
    assert response.status == 413
    assert response.headers["x-amzn-errortype"] == "RequestTooLargeException"
    assert daemon.post("/function/ok", b"small").status == 200


def test_the_limit_counts_the_event_so_a_binary_body_base64_makes_larger_is_413(start_daemon, functions_dir):
    """Lambda's payload limit is the event's size: a binary body, base64 in the
    event, fits only if three quarters of the limit does, on AWS and here alike."""
    write_function(functions_dir, "size.py", """
        def handler(event, context):
            return len(event["body"])
    """)
    daemon = start_daemon(functions_dir, env={"FAASD_SERVER_MAX_BODY_MB": "1"})
    body = b"x" * (800 * 1024)
    assert daemon.post("/function/size", body, headers={"Content-Type": "text/plain"}).json() == len(body)
    refused = daemon.post("/function/size", body, headers={"Content-Type": "application/octet-stream"})
    assert refused.status == 413, refused.text
    assert refused.json() == {"message": "Request Entity Too Large"}
    assert refused.headers["x-amzn-errortype"] == "RequestTooLargeException"
    assert daemon.log_of("size").count("START RequestId") == 1  # the text body's call alone ran


def test_a_function_that_fails_to_load_is_reported_and_others_keep_working(daemon):
    write_function(daemon.functions, "good.py", ECHO)
    write_function(daemon.functions, "syntax.py", "def handler(event, context:\n    return 1\n")
    write_function(daemon.functions, "nohandler.py", "def other(event, context):\n    return 1\n")
    write_function(daemon.functions, "badtoml.toml", "memory_mb = [\n")
    write_function(daemon.functions, "badtoml.py", ECHO)
    write_function(daemon.functions, "importerr.py", "import not_a_module_anywhere\ndef handler(e, c):\n    return 1\n")
    write_function(daemon.functions, "reserved.toml", '[env]\nAWS_REGION = "eu-west-1"\nTMPDIR = "/x"\n')
    write_function(daemon.functions, "reserved.py", ECHO)
    loaded(daemon, "importerr")
    loaded(daemon, "reserved")
    expectations = {
        "syntax": "Runtime.UserCodeSyntaxError",
        "nohandler": "Runtime.HandlerNotFound",
        "badtoml": "Runtime.InvalidConfiguration",
        "reserved": "Runtime.InvalidConfiguration",
        "importerr": "Runtime.ImportModuleError",
    }
    for name, error_type in expectations.items():
        assert daemon.get(f"/function/{name}").status == 502, name
        error = daemon.invoke(name).json()
        assert error["errorType"] == error_type, (name, error)
        view = daemon.function(name)
        reported = view["load_error"] or (view["init_error"] or {}).get("errorMessage")
        assert reported, view
    assert daemon.get("/function/good").status == 200
    assert daemon.invoke("syntax").json()["requestId"] == ""  # as awslambdaric reports an init's
    assert daemon.invoke("importerr").json() == {  # AWS's runtime gives no stack for it
        "errorMessage": "Unable to import module 'importerr': No module named 'not_a_module_anywhere'",
        "errorType": "Runtime.ImportModuleError", "requestId": "", "stackTrace": []}  # an init's: no id
    # nohandler's own file has no handler; json's file is not the module of that name the
    # runtime had loaded, and the error says so.
    assert daemon.invoke("nohandler").json()["errorMessage"] == "Handler 'handler' missing on module 'nohandler'"
    write_function(daemon.functions, "json.py", ECHO)
    loaded(daemon, "json")
    error = daemon.invoke("json").json()
    assert error["errorType"] == "Runtime.HandlerNotFound", error
    assert error["errorMessage"].startswith("Handler 'handler' missing on module 'json' (the module of that "
                                            "name already loaded is /"), error
    assert error["errorMessage"].endswith("json/__init__.py, not the function's own file: give the file "
                                          "another name)"), error
    # A worker that started and failed to import reports how long it took, as Lambda does.
    [init_report] = [line for line in daemon.log_of("importerr").splitlines()
                     if "\tINIT_REPORT Init Duration:" in line][-1:]
    assert float(init_report.split("Init Duration: ")[1].split(" ms")[0]) > 0, init_report
    check = subprocess.run([sys.executable, "-m", "faasd", "check", "--functions", str(daemon.functions)],
                           capture_output=True, text=True, cwd=daemon.data.parent,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert check.returncode == 1
    assert "syntax: error: Runtime.UserCodeSyntaxError" in check.stdout
    assert "badtoml: error: badtoml.toml: not valid TOML" in check.stdout
    assert "reserved: error: reserved.toml: [env] sets AWS_REGION, TMPDIR: reserved, as in Lambda" in check.stdout
    assert "good: ok" in check.stdout


def test_a_python_syntax_error_has_awslambdaric_s_one_frame_whoever_finds_it(daemon):
    """awslambdaric reports a module that does not parse with one frame: the file as
    imported, the line number, and the line. faasd finds a handler file's syntax error
    before any worker starts, and a worker finds one in a module the handler imports:
    both give that frame."""
    write_function(daemon.functions, "broken.py", "import os\n\ndef handler(event, context)\n    return 1\n")
    write_function(daemon.functions, "importsbroken/handler.py", """
        import helper
        def handler(event, context):
            return helper.value
    """)
    write_function(daemon.functions, "importsbroken/helper.py", "value = 1\n  other = 2\n")
    loaded(daemon, "importsbroken")
    functions = daemon.functions
    assert daemon.invoke("broken").json() == {
        "errorMessage": "Syntax error in module 'broken': expected ':' (broken.py, line 3)",
        "errorType": "Runtime.UserCodeSyntaxError", "requestId": "",
        "stackTrace": [f'  File "{functions}/broken.py" Line 3\n    def handler(event, context)\n']}
    error = daemon.invoke("importsbroken").json()
    assert error["errorType"] == "Runtime.UserCodeSyntaxError", error
    assert error["errorMessage"] == "Syntax error in module 'handler': unexpected indent (helper.py, line 2)"
    assert error["stackTrace"] == [f'  File "{functions}/importsbroken/helper.py" Line 2\n      other = 2\n'], error
    # The JSON log's error record carries the same trace.
    write_function(daemon.functions, "broken.toml", 'log_format = "JSON"\n')
    wait_until(lambda: daemon.function("broken")["log_format"] == "JSON")
    request_id = daemon.invoke("broken").headers["x-amzn-requestid"]
    # One for the init phase, one for the init tried again in the call's invoke phase.
    records = [record for record in (json.loads(line) for line in request_lines(daemon, "broken", request_id)
                                     if line.startswith("{")) if record.get("level") == "ERROR"]
    assert len(records) == 2, records
    for record in records:
        assert record["stackTrace"] == [f'  File "{functions}/broken.py" Line 3\n    def handler(event, context)\n']


def test_settings_that_are_a_directory_are_a_load_error(start_daemon, functions_dir):
    write_function(functions_dir, "good.py", ECHO)
    write_function(functions_dir, "sidecar.py", ECHO)
    write_function(functions_dir, "dirfn/handler.py", ECHO)
    (functions_dir / "dirfn" / "function.toml").mkdir()
    daemon = start_daemon(functions_dir)
    assert daemon.function("sidecar")["load_error"] is None
    (functions_dir / "sidecar.toml").mkdir()
    for name, settings in (("sidecar", "sidecar.toml"), ("dirfn", "function.toml")):
        wait_until(lambda: daemon.function(name)["load_error"], message=f"{name}'s load error")
        assert daemon.function(name)["load_error"] == f"{settings} is a directory, not a TOML file of settings"
        error = daemon.invoke(name).json()
        assert error["errorType"] == "Runtime.InvalidConfiguration", error
        assert settings in error["errorMessage"]
    assert daemon.get("/function/good").status == 200
    (functions_dir / "sidecar.toml").rmdir()
    write_function(functions_dir, "sidecar.toml", "timeout_s = 5\n")
    wait_until(lambda: daemon.function("sidecar")["load_error"] is None, message="the settings file to load")
    assert daemon.function("sidecar")["timeout_s"] == 5


def test_settings_that_would_fail_later_are_load_errors_and_the_listing_stays_up(daemon):
    write_function(daemon.functions, "good.py", ECHO)
    write_function(daemon.functions, "nul.toml", '[env]\nGREETING = "a\\u0000b"\n')
    write_function(daemon.functions, "nul.py", ECHO)
    write_function(daemon.functions, "rare.toml",
                   '[[triggers]]\ntype = "cron"\nschedule = "rate(99999999999999 days)"\n')
    write_function(daemon.functions, "rare.py", ECHO)
    write_function(daemon.functions, "twice.toml", '[[triggers]]\ntype = "http"\npath = "/y/{a}/{a}"\n')
    write_function(daemon.functions, "twice.py", ECHO)
    for name in ("good", "nul", "rare", "twice"):
        loaded(daemon, name)
    listing = daemon.get("/system/functions")
    assert listing.status == 200, listing.text
    errors = {f["name"]: f["load_error"] for f in listing.json()["functions"]}
    assert errors["good"] is None
    assert "env.GREETING holds a NUL character" in errors["nul"]
    assert "a rate is at most 10 years" in errors["rare"]
    assert "names the parameter {a} more than once" in errors["twice"]
    started = time.monotonic()
    failed = http("POST", f"{daemon.url}/2015-03-31/functions/nul/invocations", "{}", timeout=20)
    assert failed.status == 200 and failed.headers["x-amz-function-error"] == "Unhandled"
    assert failed.json()["errorType"] == "Runtime.InvalidConfiguration"
    assert time.monotonic() - started < 10
    assert daemon.invoke("good", {"a": 1}).json() == {"a": 1}


def test_a_fifo_in_functions_is_a_load_error_and_blocks_nothing(daemon):
    # Reading a FIFO waits for a writer that never comes: faasd must not try.
    write_function(daemon.functions, "good.py", ECHO)
    loaded(daemon, "good")
    os.mkfifo(daemon.functions / "fifo.py")
    write_function(daemon.functions, "piped.py", ECHO)
    os.mkfifo(daemon.functions / "piped.toml")
    write_function(daemon.functions, "pkg/function.toml", 'runtime = "python"\nhandler = "main.handler"\n')
    os.mkfifo(daemon.functions / "pkg" / "main.py")
    for name in ("fifo", "piped", "pkg"):
        loaded(daemon, name)
    assert daemon.function("fifo")["load_error"].startswith("fifo.py: not a regular file")
    assert daemon.function("piped")["load_error"] == "piped.toml: cannot be read: not a regular file"
    assert daemon.function("pkg")["load_error"] == (
        "Runtime.ImportModuleError: Unable to import module 'main': main.py: not a regular file")
    assert daemon.invoke("good", {"still": "here"}).json() == {"still": "here"}
    assert daemon.get("/function/fifo").status == 502
    started = time.monotonic()
    check = subprocess.run([sys.executable, "-m", "faasd", "check", "--functions", str(daemon.functions)],
                           capture_output=True, text=True, cwd=daemon.data.parent, timeout=30,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert time.monotonic() - started < 15
    assert check.returncode == 1, check.stdout
    assert "fifo: error: fifo.py: not a regular file" in check.stdout
    assert "piped: error: piped.toml: cannot be read: not a regular file" in check.stdout
    assert "good: ok" in check.stdout


def _big_module(revision: int) -> str:
    """About 1.5 MB of Python: a module-level table, as handlers that embed one have."""
    rows = "".join(f"    {{'id': {i}, 'name': 'item{i * 7919 % 100003}', 'v': {i / 7:.6f}}},\n"
                   for i in range(30000))
    return f"# revision {revision}\nTABLE = [\n{rows}]\n\ndef handler(event, context):\n    return len(TABLE)\n"


@pytest.mark.parametrize("problem", ["syntax error", "missing handler"])
def test_a_big_modules_syntax_error_or_missing_handler_is_a_load_error_as_a_small_ones(daemon, problem):
    # A module over 64 KB is parsed in a child process: that child used to die at
    # start, and such a module was then taken for a good one until a worker imported it.
    code = ("def handler(event, context)\n    return 1\n" if problem == "syntax error"
            else "def other(event, context):\n    return 1\n")
    padding = "".join(f"# line {i} of a long comment that pads this module past 64 KB\n" for i in range(1200))
    assert len(padding) > 64 * 1024
    write_function(daemon.functions, "small.py", code)
    write_function(daemon.functions, "big.py", padding + code)
    loaded(daemon, "small")
    loaded(daemon, "big")
    small, big = daemon.function("small")["load_error"], daemon.function("big")["load_error"]
    expected = {
        "syntax error": "Runtime.UserCodeSyntaxError: Syntax error in module '{}': expected ':' ({}.py, line {})",
        "missing handler": "Runtime.HandlerNotFound: Handler 'handler' missing on module '{}'",
    }[problem]
    assert small == expected.format("small", "small", 1)
    assert big == expected.format("big", "big", 1201)
    # Found before any worker starts: the call fails at once, and no worker was started.
    error = daemon.invoke("big").json()
    assert f"{error['errorType']}: {error['errorMessage']}" == big
    assert daemon.function("big")["workers"] == []


def _worst_latency_ms(daemon, seconds: float) -> float:
    worst = 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        assert daemon.get("/healthz").status == 200
        worst = max(worst, (time.monotonic() - started) * 1000)
        time.sleep(0.01)
    return worst


def test_a_big_function_stalls_no_request_at_rescans_or_when_it_changes(start_daemon, functions_dir):
    # The parser holds the GIL: parsing 1.5 MB on the event loop (or in one of
    # the daemon's threads) stopped every request for seconds at each rescan.
    (functions_dir / "big.py").write_text(_big_module(1))
    write_function(functions_dir, "hello.py", HELLO)
    daemon = start_daemon(functions_dir)
    assert daemon.function("big")["load_error"] is None
    revision = daemon.function("big")["revision"]
    # Two periodic rescans (every 5 s) find nothing changed.
    assert _worst_latency_ms(daemon, 6.0) < 1000
    write_function(functions_dir, "big.py", _big_module(2))
    assert _worst_latency_ms(daemon, 3.0) < 1000
    wait_until(lambda: daemon.function("big")["revision"] != revision, message="big.py to reload")
    assert daemon.get("/function/hello").status == 200


def test_a_name_that_is_not_utf8_is_skipped_with_one_warning_and_the_rest_is_served(
        start_daemon, functions_dir):
    write_function(functions_dir, "good.py", ECHO)
    (functions_dir / os.fsdecode(b"bad\xff.py")).write_text(ECHO)
    write_function(functions_dir, "tree/handler.py", ECHO)
    (functions_dir / "tree" / os.fsdecode(b"data-\xfe.bin")).write_bytes(b"\x00")
    daemon = start_daemon(functions_dir)
    assert daemon.invoke("good", {"a": 1}).json() == {"a": 1}
    assert daemon.invoke("tree", {"b": 2}).json() == {"b": 2}
    listed = daemon.get("/system/functions")
    assert listed.status == 200 and sorted(f["name"] for f in listed.json()["functions"]) == ["good", "tree"]
    assert daemon.get("/2015-03-31/functions/tree").status == 200  # its code hash covers the file
    # A rescan (any change under functions/) does not warn again.
    write_function(functions_dir, "later.py", ECHO)
    loaded(daemon, "later")
    warnings = [line for line in daemon.output().splitlines() if "not valid UTF-8" in line]
    assert len(warnings) == 1, warnings
    assert "bad\\xff.py is skipped: its name is not valid UTF-8" in warnings[0]
    check = run_cli("check", "--functions", str(functions_dir))
    assert check.returncode == 1, check.stdout
    assert "bad\\xff.py: error: the name is not valid UTF-8" in check.stdout
    assert "tree: ok" in check.stdout and "good: ok" in check.stdout


def test_entries_that_claim_a_taken_name_or_start_with_an_underscore_are_not_functions(
        start_daemon, functions_dir):
    write_function(functions_dir, "dup/handler.py", "def handler(event, context):\n    return 'dir'\n")
    write_function(functions_dir, "dup.py", "def handler(event, context):\n    return 'file'\n")
    write_function(functions_dir, "pair.mjs", "export const handler = async () => 'mjs';\n")
    write_function(functions_dir, "pair.py", "def handler(event, context):\n    return 'py'\n")
    write_function(functions_dir, "_shared.py", "def handler(event, context):\n    return 'shared'\n")
    daemon = start_daemon(functions_dir)
    assert daemon.invoke("dup", {}).json() == "dir"
    assert daemon.invoke("pair", {}).json() == "mjs"
    assert daemon.get("/function/_shared").status == 404
    listed = sorted(f["name"] for f in daemon.get("/system/functions").json()["functions"])
    assert listed == ["dup", "pair"]
    # One warning for each entry left out, not repeated by a rescan.
    write_function(functions_dir, "later.py", ECHO)
    loaded(daemon, "later")
    warnings = [line for line in daemon.output().splitlines() if "claims the same name" in line]
    assert len(warnings) == 2, warnings
    assert any("dup.py is not a function: dup claims the same name and defines it" in w for w in warnings)
    assert any("pair.py is not a function: pair.mjs claims the same name" in w for w in warnings)
    check = run_cli("check", "--functions", str(functions_dir))
    assert check.returncode == 0, check.stdout
    assert "dup.py: warning: not a function: dup claims the same name and defines it" in check.stdout
    assert "pair.py: warning: not a function: pair.mjs claims the same name" in check.stdout


def test_handlers_may_write_bytes_reconfigure_and_use_the_original_stdout(daemon):
    # What runs on Lambda: sys.stdout.buffer (click, structlog), reconfigure()
    # (scripts that force UTF-8), and the interpreter's own sys.__stdout__.
    write_function(daemon.functions, "streams.py", r"""
        import sys
        def handler(event, context):
            sys.stdout.reconfigure(encoding="utf-8", line_buffering=True)
            word = "caf\u00e9 bytes\n".encode()
            sys.stdout.buffer.write(word[:4])
            sys.stdout.buffer.write(word[4:])  # the split character arrives whole
            sys.stderr.buffer.write(b"raw \xff\n")
            sys.__stdout__.write("through sys.__stdout__\n")
            return [sys.stdout.line_buffering, sys.stdout.mode, sys.stdout.buffer.writable()]
    """)
    loaded(daemon, "streams")
    response = daemon.invoke("streams")
    assert response.json() == [True, "w", True], response.text
    request_id = response.headers["x-amzn-requestid"]
    wait_until(lambda: f"REPORT RequestId: {request_id}" in daemon.log_of("streams"), message="REPORT")
    lines = [line.split("\t", 2)[2] for line in daemon.log_of("streams").splitlines()
             if line.split("\t", 2)[1] == request_id]
    printed = lines[1:lines.index(f"END RequestId: {request_id}")]
    assert sorted(printed) == sorted(["caf\u00e9 bytes", "raw \\xff", "through sys.__stdout__"]), printed


def test_logs_have_start_end_report_and_init_duration_on_cold_start(daemon):
    write_function(daemon.functions, "talk.py", """
        def handler(event, context):
            print("hello from the handler")
            return 1
    """)
    wait_until(lambda: daemon.get("/function/talk").status == 200)
    daemon.get("/function/talk")
    log = daemon.log_of("talk")
    reports = [line for line in log.splitlines() if "\tREPORT RequestId:" in line]
    assert len(reports) == 2
    assert "Init Duration:" in reports[0] and "Init Duration:" not in reports[1]
    for field in ("Duration:", "Billed Duration:", "Memory Size: 128 MB", "Max Memory Used:"):
        assert field in reports[1]
    lines = [line.split("\t", 2)[2] for line in log.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("START RequestId:"))
    assert lines[start + 1] == "hello from the handler"
    assert lines[start + 2].startswith("END RequestId:")
    assert lines[start].endswith("Version: $LATEST")
    # The daemon's stdout carries the same lines.
    assert "hello from the handler" in daemon.output()
    assert "REPORT RequestId:" in daemon.output()


def report_ms(report: str, field: str) -> float:
    """A field of a REPORT line, in ms: `Duration`, `Billed Duration`, `Init Duration`."""
    return float(report.split(f"\t{field}: ")[1].split(" ms")[0])


def test_billed_duration_of_a_cold_start_includes_its_init_duration(daemon):
    # Lambda bills the INIT phase of every runtime (since 1 August 2025).
    write_function(daemon.functions, "slowinit.py", """
        import time
        time.sleep(0.3)
        def handler(event, context):
            return 1
    """)
    loaded(daemon, "slowinit")
    cold, warm = (daemon.invoke("slowinit").headers["x-amzn-requestid"] for _ in range(2))
    report = report_of(daemon, "slowinit", cold)
    duration, init = report_ms(report, "Duration"), report_ms(report, "Init Duration")
    assert init >= 300, report
    assert abs(report_ms(report, "Billed Duration") - math.ceil(duration + init)) <= 1, report
    report = report_of(daemon, "slowinit", warm)
    assert "Init Duration" not in report
    assert abs(report_ms(report, "Billed Duration") - max(1, math.ceil(report_ms(report, "Duration")))) <= 1



def test_cli_invoke_list_logs_check_and_new(daemon, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "faasd"]
    write_function(daemon.functions, "echo.py", ECHO)
    wait_until(lambda: daemon.get("/function/echo").status == 200)
    result = subprocess.run(cli + ["invoke", "echo", "--data", '{"a": 1}', "--url", daemon.url],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0 and json.loads(result.stdout) == {"a": 1}
    payload = tmp_path / "event.json"
    payload.write_text('{"from": "file"}')
    result = subprocess.run(cli + ["invoke", "echo", "--data", f"@{payload}", "--url", daemon.url],
                            capture_output=True, text=True, env=env)
    assert json.loads(result.stdout) == {"from": "file"}
    result = subprocess.run(cli + ["invoke", "missing", "--url", daemon.url], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "ResourceNotFoundException" in result.stderr
    listing = subprocess.run(cli + ["list", "--url", daemon.url], capture_output=True, text=True, env=env)
    assert listing.returncode == 0 and "echo" in listing.stdout and "python" in listing.stdout
    logs = subprocess.run(cli + ["logs", "echo", "--url", daemon.url], capture_output=True, text=True, env=env)
    assert "REPORT RequestId" in logs.stdout
    new = subprocess.run(cli + ["new", "fresh", "--functions", str(daemon.functions)],
                         capture_output=True, text=True, env={**env, "FAASD_SERVER_HOST": "0.0.0.0"},
                         cwd=tmp_path)
    assert new.returncode == 0, new.stderr
    assert "try: curl http://127.0.0.1:8080/function/fresh" in new.stdout  # where a client finds it
    wait_until(lambda: daemon.get("/fresh").status == 200, message="the new function's route")
    assert daemon.get("/function/fresh").json() == {"hello": "world"}
    again = subprocess.run(cli + ["new", "fresh", "--functions", str(daemon.functions)],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


def run_cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAASD_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "faasd", *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=60)


def test_cli_reaches_a_daemon_that_listens_on_every_ipv6_address(start_daemon, functions_dir, tmp_path):
    """`host = "::"` listens on IPv6 only (asyncio sets IPV6_V6ONLY): the client commands
    of the same config reach it on IPv6's loopback, and the log names the address as a URL."""
    port = free_port()
    config = tmp_path / "faasd.toml"
    config.write_text(f'[server]\nhost = "::"\nport = {port}\ninsecure = true\n'
                      f'[paths]\nfunctions = "{functions_dir}"\n')
    write_function(functions_dir, "echo.py", ECHO)
    daemon = start_daemon(functions_dir, port=port, wait=False, args=["--config", str(config), "--host", "::"])
    wait_until(lambda: "listening on" in daemon.output(), message=f"faasd to listen\n{daemon.output()}")
    assert f"listening on http://[::]:{port} " in daemon.output(), daemon.output()
    invoked = run_cli("invoke", "echo", "--config", str(config), "--data", '{"a": 1}')
    assert invoked.returncode == 0 and json.loads(invoked.stdout) == {"a": 1}, invoked.stderr
    listing = run_cli("list", "--config", str(config))
    assert listing.returncode == 0 and "echo" in listing.stdout, listing.stderr


def test_client_commands_without_a_daemon_say_where_they_looked_and_what_to_check():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for command in (["invoke", "hello"], ["list"], ["logs", "hello"]):
        done = run_cli(*command, "--url", url)
        assert done.returncode == 1, done
        assert done.stderr.strip() == (
            f"faasd: cannot reach the daemon at {url} (Connection refused): is `faasd serve` running "
            "there? --url, or the config's [server] host and port, say where it listens"), done.stderr


def test_the_readme_names_every_flag_of_faasd_serve():
    import argparse
    import re

    from faasd.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = {option for action in commands.choices["serve"]._actions for option in action.option_strings
             if option.startswith("--") and option != "--help"}
    readme = (ROOT / "README.md").read_text()
    synopsis = re.search(r"`faasd serve (\[[^`]*)` runs in the foreground", readme)
    assert synopsis, "README.md: the `faasd serve [...]` synopsis under Operating it"
    named = set(re.findall(r"\[(--[a-z-]+)", synopsis[1]))
    assert named == flags, f"missing from README: {sorted(flags - named)}; not a flag: {sorted(named - flags)}"


def test_cli_takes_config_after_the_command_as_well_as_before_it(start_daemon, functions_dir, tmp_path):
    port = free_port()
    config = tmp_path / "faasd.toml"
    config.write_text(f'[server]\nport = {port}\n[paths]\nfunctions = "{functions_dir}"\n'
                      f'[limits]\nmax_concurrency = 7\n')
    daemon = start_daemon(functions_dir, port=port, args=["--config", str(config)])
    assert daemon.get("/system/info").json()["max_concurrency"] == 7
    write_function(functions_dir, "echo.py", ECHO)
    wait_until(lambda: daemon.get("/function/echo").status == 200)

    invoked = run_cli("invoke", "echo", "--config", str(config), "--data", '{"a": 1}')
    assert invoked.returncode == 0 and json.loads(invoked.stdout) == {"a": 1}, invoked.stderr
    listing = run_cli("list", "--config", str(config))
    assert listing.returncode == 0 and "echo" in listing.stdout, listing.stderr
    logs = run_cli("logs", "echo", "--config", str(config))
    assert "REPORT RequestId" in logs.stdout, logs.stderr
    new = run_cli("new", "fresh", "--config", str(config), cwd=tmp_path)
    assert new.returncode == 0 and (functions_dir / "fresh" / "function.toml").is_file(), new.stderr
    check = run_cli("check", "--config", str(config), cwd=tmp_path)
    assert check.returncode == 0 and f"config: ok ({config})" in check.stdout, check.stdout
    # Before the command it still counts; after it, it wins.
    before = run_cli("--config", str(config), "list")
    assert before.returncode == 0 and "echo" in before.stdout, before.stderr
    both = run_cli("--config", str(tmp_path / "absent.toml"), "list", "--config", str(config))
    assert both.returncode == 0 and "echo" in both.stdout, both.stderr


@pytest.mark.parametrize("host, said", [
    ("192.0.2.1", "cannot listen on 192.0.2.1 port {port}: Cannot assign requested address: no interface "
                  "of this machine has that address; set [server] host (or --host) to one it has"),
    ("nosuch.invalid", "[server] host = 'nosuch.invalid' is not an address of this machine ("),
])
def test_serve_refuses_a_host_that_is_not_this_machines_saying_what_to_set(tmp_path, host, said):
    from support import Daemon

    functions = tmp_path / "functions"
    functions.mkdir()
    daemon = Daemon(functions=functions, data=tmp_path / "data", port=free_port(),
                    extra_args=["--host", host, "--insecure"])
    # The fixture's --host 127.0.0.1 comes first; this one, given after it, wins.
    daemon.start(wait=False)
    try:
        output = daemon.refused()
        assert f"cannot start: {said.format(port=daemon.port)}" in output, output
        assert "[Errno" not in output, output
    finally:
        daemon.stop()


def test_serve_refuses_a_data_dir_that_is_a_file_saying_what_to_set(tmp_path):
    from support import Daemon

    functions = tmp_path / "functions"
    functions.mkdir()
    afile = tmp_path / "data.txt"
    afile.write_text("")
    daemon = Daemon(functions=functions, data=afile, port=free_port()).start(wait=False)
    try:
        assert (f"cannot start: data: {afile} is not a directory: set [paths] data (or --data-dir, "
                "FAASD_PATHS_DATA) to a directory faasd may write") in daemon.refused(), daemon.output()
    finally:
        daemon.stop()


def _tmpfs(path: Path, options: str) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "faasd-test", str(path)], check=True)


READ_ONLY_FIX = ("(Read-only file system); its file system is mounted read-only: remount it read-write, "
                 "or set [paths] data (or --data-dir, FAASD_PATHS_DATA) to a directory on one that is "
                 "not; under systemd/faasd.service (ProtectSystem=strict) a data dir outside "
                 "/var/lib/faasd also needs a ReadWritePaths= line (systemctl edit faasd)")


@pytest.mark.parametrize("disk", ["read-only", "read-only, set up before", "full"])
def test_serve_refuses_a_data_dir_on_a_disk_that_takes_no_writes_saying_what_to_do(tmp_path, disk):
    """No worker could start there (each makes its scratch dir in it): serve stops, naming the
    setting and the fix. (A data dir set up before its disk filled up starts: test_async.)"""
    from support import Daemon

    functions, data = tmp_path / "functions", tmp_path / "data"
    functions.mkdir()
    # Full: a tmpfs with no inode to spare, where no directory can be made.
    _tmpfs(data, "size=1m,nr_inodes=1" if disk == "full" else "size=1m")
    try:
        said = f"cannot create {data / 'logs'} {READ_ONLY_FIX}"
        if disk == "full":
            said = (f"cannot create {data / 'logs'} (No space left on device); its disk is full: free "
                    "space on it, or set [paths] data (or --data-dir, FAASD_PATHS_DATA) to a directory "
                    "on a disk with room")
        elif disk == "read-only, set up before":
            for sub in ("logs", "workers"):
                (data / sub).mkdir()
            (data / "queue.lock").write_text("")
            said = f"{data} cannot be written {READ_ONLY_FIX}"
        if disk != "full":
            subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
        daemon = Daemon(functions=functions, data=data, port=free_port()).start(wait=False)
        try:
            output = daemon.refused()
            assert f"cannot start: data: {said}" in output, output
            assert "[Errno" not in output, output
        finally:
            daemon.stop()
    finally:
        subprocess.run(["umount", str(data)], check=True)


def test_serve_refuses_a_functions_dir_whose_parent_is_missing_and_creates_a_missing_leaf(tmp_path):
    """A mistyped --functions stops serve with the line `faasd check` prints; the directory
    itself, where its parent exists, is created as a first run needs, and said so."""
    from support import Daemon

    typo = tmp_path / "no" / "such" / "functions"
    refused = Daemon(functions=typo, data=tmp_path / "data", port=free_port()).start(wait=False)
    try:
        assert (f"cannot start: functions: {typo} does not exist: create it, or set [paths] "
                "functions (or --functions) to the directory that holds them") in refused.refused()
        assert not (tmp_path / "no").exists()
    finally:
        refused.stop()
    check = run_cli("check", "--functions", str(typo))
    assert check.returncode == 1 and f"functions: error: {typo} does not exist: create it" in check.stdout
    afile = tmp_path / "functions.txt"
    afile.write_text("")
    check = run_cli("check", "--functions", str(afile))
    assert check.returncode == 1 and f"functions: error: {afile} is not a directory: set [paths]" in check.stdout
    fresh = tmp_path / "fresh"
    daemon = Daemon(functions=fresh, data=tmp_path / "data", port=free_port()).start()
    try:
        assert fresh.is_dir()
        assert f"created the functions directory {fresh}" in daemon.output()
    finally:
        assert daemon.stop() == 0


def test_list_shows_a_function_whose_last_init_failed(start_daemon, functions_dir):
    write_function(functions_dir, "broken.py", "import nonexistent_mod_xyz\n"
                                                "def handler(event, context):\n    return 1\n")
    write_function(functions_dir, "echo.py", ECHO)
    daemon = start_daemon(functions_dir)
    assert daemon.invoke("broken").headers.get("x-amz-function-error") == "Unhandled"
    listing = run_cli("list", "--url", daemon.url)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert rows["broken"].endswith("init-error: Runtime.ImportModuleError: Unable to import module "
                                   "'broken': No module named 'nonexistent_mod_xyz'"), rows["broken"]
    assert rows["echo"].endswith("  ok"), rows["echo"]


def test_list_and_check_name_the_same_triggers_http_for_every_function(start_daemon, functions_dir):
    """/function/NAME always works: a function with no [[triggers]] is fired by http, and so
    is one with only a cron trigger; a function that did not load shows none."""
    write_function(functions_dir, "plain.py", ECHO)
    write_function(functions_dir, "ticks.py", ECHO)
    write_function(functions_dir, "ticks.toml", '[[triggers]]\ntype = "cron"\nschedule = "0 0 1 1 *"\n')
    write_function(functions_dir, "routed.py", ECHO)
    write_function(functions_dir, "routed.toml", '[[triggers]]\ntype = "http"\npath = "/a"\n'
                                                 '[[triggers]]\ntype = "http"\npath = "/b"\n'
                                                 '[[triggers]]\ntype = "cron"\nschedule = "0 0 1 1 *"\n')
    write_function(functions_dir, "broken.py", "def handler(event, context:\n")
    daemon = start_daemon(functions_dir)
    assert daemon.get("/function/plain").status == 200 and daemon.get("/function/ticks").status == 200
    listing = run_cli("list", "--url", daemon.url)
    assert listing.returncode == 0, listing.stderr
    header, *lines = listing.stdout.splitlines()
    column = header.split().index("TRIGGERS")
    listed = {line.split()[0]: line.split()[column] for line in lines}
    assert listed == {"plain": "http", "ticks": "http,cron", "routed": "http,cron", "broken": "-"}, \
        listing.stdout
    check = run_cli("check", "--functions", str(functions_dir))
    checked = {line.split(":")[0]: line.rsplit("triggers: ", 1)[1].rstrip(")")
               for line in check.stdout.splitlines() if "triggers: " in line}
    assert checked == {name: kinds.replace(",", ", ") for name, kinds in listed.items() if kinds != "-"}, \
        check.stdout
    assert "broken: error:" in check.stdout, check.stdout


def test_cli_refuses_an_invalid_function_name_before_any_request(daemon):
    write_function(daemon.functions, "echo.py", ECHO)
    wait_until(lambda: daemon.get("/function/echo").status == 200)
    nobody = f"http://127.0.0.1:{free_port()}"
    for url in (daemon.url, nobody):
        for argv in (["invoke", "bad name"], ["invoke", "a/b"], ["invoke", "../../system/info"],
                     ["invoke", "echo:a/b"], ["invoke", "x" * 65], ["logs", "a b"], ["logs", "a/b"],
                     ["logs", "echo:$LATEST"]):
            result = run_cli(*argv, "--url", url)
            assert result.returncode == 2, (argv, result.stderr)
            assert result.stderr.startswith(f"faasd: invalid function name {argv[1]!r}"), (argv, result.stderr)
    for given in ("echo:$LATEST", "000000000000:function:echo",
                  "arn:aws:lambda:us-east-1:000000000000:function:echo:$LATEST"):
        result = run_cli("invoke", given, "--data", '{"b": 2}', "--url", daemon.url)
        assert result.returncode == 0 and json.loads(result.stdout) == {"b": 2}, (given, result.stderr)


def test_cli_invoke_of_a_missing_function_prints_lambdas_message(daemon):
    result = run_cli("invoke", "nosuch", "--url", daemon.url)
    assert result.returncode == 2
    assert result.stderr.startswith("faasd: ResourceNotFoundException: Function not found: arn:"), result.stderr
    assert result.stderr.endswith(":function:nosuch\n"), result.stderr


def test_cli_new_makes_a_function_that_loads_when_its_name_is_a_path_of_faasds(daemon, tmp_path):
    names = ("healthz", "readyz", "metrics", "system", "ui", "2015-03-31")
    for name in names:
        new = run_cli("new", name, "--functions", str(daemon.functions), cwd=tmp_path)
        assert new.returncode == 0, new.stderr
        assert f"/{name} is reserved by faasd" in new.stdout and f"/function/{name}" in new.stdout, new.stdout
    check = run_cli("check", "--functions", str(daemon.functions), cwd=tmp_path)
    assert check.returncode == 0, check.stdout
    for name in names:
        assert f"{name}: ok (python, handler.handler; triggers: http)" in check.stdout, check.stdout
    wait_until(lambda: daemon.get("/function/healthz").status == 200, message="healthz the function")
    assert daemon.get("/function/healthz").json() == {"hello": "world"}
    assert daemon.get("/healthz").json() != {"hello": "world"}
    assert daemon.function("metrics")["load_error"] is None


def test_cli_new_refuses_a_mistyped_functions_dir_instead_of_creating_it(tmp_path):
    typo = tmp_path / "no" / "such" / "functions"
    new = run_cli("new", "fresh", "--functions", str(typo), cwd=tmp_path)
    assert new.returncode == 2 and new.stderr.strip() == (
        f"faasd: functions: {typo} does not exist: create it, or set [paths] functions (or "
        "--functions) to the directory that holds them"), new.stderr
    assert not (tmp_path / "no").exists()
    # A missing leaf whose parent exists is a first run's: created, as serve creates it.
    fresh = tmp_path / "functions"
    made = subprocess.run(["sh", "-c", 'umask 027; exec "$@"', "sh", sys.executable, "-m", "faasd", "new",
                           "fresh", "--functions", str(fresh)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in fresh.iterdir()) == ["fresh"]  # nothing left aside
    assert sorted(p.name for p in (fresh / "fresh").iterdir()) == ["function.toml", "handler.py"]
    assert (fresh / "fresh").stat().st_mode & 0o777 == 0o750  # the umask's, as mkdir makes it


def follow_echo(daemon, lines: int) -> subprocess.Popen:
    """`faasd logs echo --follow -n LINES` against `daemon`, once echo answers."""
    write_function(daemon.functions, "echo.py", ECHO)
    wait_until(lambda: daemon.get("/function/echo").status == 200)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "faasd", "logs", "echo", "--follow", "-n", str(lines),
                             "--url", daemon.url], stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def test_logs_follow_streams_new_lines(daemon):
    follower = follow_echo(daemon, 0)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(follower.stdout), daemon=True)
    reader.start()
    try:
        request_ids: list[str] = []

        def followed() -> bool:
            request_ids.append(daemon.get("/function/echo").headers["apigw-requestid"])
            return any(f"START RequestId: {rid}" in line for line in list(seen) for rid in request_ids)

        wait_until(followed, timeout=15, interval=0.3, message="a new invocation in the followed log")
        # Only new lines: the first invocation (before following) is not replayed.
        first = daemon.log_of("echo").splitlines()[0]
        assert first not in "".join(seen)
    finally:
        os.killpg(follower.pid, signal.SIGTERM)
        follower.wait(10)


def test_logs_refuse_lines_that_is_not_a_whole_number_of_0_or_more(daemon):
    write_function(daemon.functions, "echo.py", ECHO)
    wait_until(lambda: daemon.get("/function/echo").status == 200)
    for lines in ("-1", "-100", "x", "1.5"):
        response = daemon.get(f"/system/functions/echo/logs?lines={lines}")
        assert response.status == 400, (lines, response.status, response.text)
        assert response.json() == {"message": f"lines must be a whole number of 0 or more, not {lines!r}"}
    assert daemon.get("/system/functions/echo/logs?lines=0").text == ""
    assert "START RequestId" in daemon.get("/system/functions/echo/logs?lines=5").text


def test_an_open_follow_ends_when_faasd_stops_and_does_not_hold_the_stop_up(daemon):
    follower = follow_echo(daemon, 1)
    try:
        assert "REPORT RequestId" in follower.stdout.readline()  # following now
        # The drain allows 30 s; a stop held up by the follow would be killed at 10.
        assert daemon.stop(timeout=10) == 0
        assert follower.wait(10) == 0  # its stream ended: the follow saw faasd go
    finally:
        if follower.poll() is None:
            os.killpg(follower.pid, signal.SIGTERM)
            follower.wait(10)


def test_health_readiness_and_system_views(daemon):
    write_function(daemon.functions, "echo.py", ECHO)
    wait_until(lambda: daemon.get("/function/echo").status == 200)
    assert daemon.get("/healthz").json() == {"status": "ok"}
    assert daemon.get("/readyz").json()["ready"] is True
    listing = daemon.get("/system/functions").json()["functions"]
    assert [f["name"] for f in listing] == ["echo"]
    view = daemon.function("echo")
    assert view["memory_mb"] == 128 and view["runtime"] == "python" and view["load_error"] is None
    worker = view["workers"][0]
    assert worker["pid"] > 0 and worker["state"] in ("idle", "frozen")
    assert view["routes"][0] == "/function/echo"
    assert daemon.get("/system/functions/nope").status == 404


def test_idle_workers_are_frozen_and_thawed_by_the_same_pid(start_daemon, functions_dir):
    write_function(functions_dir, "pid.py", "import os\ndef handler(e, c):\n    return os.getpid()\n")
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_FREEZE_AFTER_MS": "50"})
    pid = daemon.invoke("pid").json()
    wait_until(lambda: process_state(pid) == "T", message="the idle worker to be stopped (state T)")
    assert daemon.workers("pid")[0]["state"] == "frozen"
    assert daemon.invoke("pid").json() == pid
    assert process_state(pid) in ("S", "R", "T")
    wait_until(lambda: process_state(pid) == "T", message="the worker to freeze again")


STRAY = """
import os
import subprocess

stray = None


def handler(event, context):
    global stray
    if stray is None:  # a child in a session of its own, outside the worker's process group
        stray = subprocess.Popen(["sleep", "300"], start_new_session=True)
    with open(f"/proc/{stray.pid}/stat", "rb") as stat:
        state = stat.read().rsplit(b")", 1)[1].split()[0].decode()
    return {"worker": os.getpid(), "stray": stray.pid, "state": state}
"""


def test_a_frozen_worker_stops_its_children_in_other_sessions_too(start_daemon, functions_dir):
    write_function(functions_dir, "stray.py", STRAY)
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_FREEZE_AFTER_MS": "50"})
    pids = daemon.invoke("stray").json()
    assert os.getpgid(pids["stray"]) != pids["worker"]
    wait_until(lambda: process_state(pids["worker"]) == "T", message="the idle worker to be stopped")
    assert process_state(pids["stray"]) == "T"  # Lambda freezes the whole environment
    again = daemon.invoke("stray").json()
    assert again["worker"] == pids["worker"] and again["stray"] == pids["stray"]
    assert again["state"] in ("S", "R")  # thawed with the worker for the call
    wait_until(lambda: process_state(pids["worker"]) == "T", message="the worker to freeze again")
    assert process_state(pids["stray"]) == "T"
    daemon.stop()
    wait_until(lambda: process_state(pids["stray"]) in (None, "Z"), message="the stray to be killed")


def test_reply_polling_can_be_turned_off_and_refuses_a_negative_window(start_daemon, functions_dir):
    write_function(functions_dir, "quick.py", "def handler(e, c):\n    return e\n")
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_REPLY_POLL_US": "0"})
    assert [daemon.invoke("quick", {"n": n}).json() for n in range(3)] == [{"n": 0}, {"n": 1}, {"n": 2}]
    daemon.stop()
    refused = start_daemon(functions_dir, env={"FAASD_WORKERS_REPLY_POLL_US": "-1"}, wait=False)
    assert refused.process.wait(timeout=30) == 2
    assert "FAASD_WORKERS_REPLY_POLL_US: '-1' is not valid" in refused.output()


def test_frozen_workers_retire_after_keep_warm_but_min_warm_stay(start_daemon, functions_dir):
    write_function(functions_dir, "cold.py", "import os\ndef handler(e, c):\n    return os.getpid()\n")
    write_function(functions_dir, "warm.toml", "min_warm = 1\n")
    write_function(functions_dir, "warm.py", "import os\ndef handler(e, c):\n    return os.getpid()\n")
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_FREEZE_AFTER_MS": "10",
                                              "FAASD_WORKERS_KEEP_WARM_S": "1"})
    wait_until(lambda: len(daemon.workers("warm")) == 1, message="min_warm worker to be prewarmed")
    cold_pid = daemon.invoke("cold").json()
    warm_pid = daemon.workers("warm")[0]["pid"]
    wait_until(lambda: process_state(cold_pid) is None, timeout=15, message="the cold worker to retire")
    assert daemon.workers("cold") == []
    time.sleep(1.5)
    assert [w["pid"] for w in daemon.workers("warm")] == [warm_pid]
    assert daemon.invoke("warm").json() == warm_pid


def test_concurrency_one_throttles_the_second_call_with_429(daemon):
    write_function(daemon.functions, "one.toml", "concurrency = 1\ntimeout_s = 10\n")
    write_function(daemon.functions, "one.py", "import time\ndef handler(e, c):\n    time.sleep(1.5)\n    return 1\n")
    loaded(daemon, "one")
    results = {}

    def first():
        results["first"] = daemon.get("/function/one").status

    thread = threading.Thread(target=first)
    thread.start()
    wait_until(lambda: daemon.function("one")["inflight"] == 1, message="the first call in flight")
    second = daemon.get("/function/one")
    thread.join()
    assert results["first"] == 200
    assert second.status == 429
    assert second.json() == {"message": "Too Many Requests",
                             "reason": "ReservedFunctionConcurrentInvocationLimitExceeded"}


def test_faasd_invoke_names_the_limit_that_throttled_it(daemon):
    write_function(daemon.functions, "one.toml", "concurrency = 1\ntimeout_s = 10\n")
    write_function(daemon.functions, "one.py", "import time\ndef handler(e, c):\n    time.sleep(3)\n    return 1\n")
    loaded(daemon, "one")
    thread = threading.Thread(target=lambda: daemon.get("/function/one"))
    thread.start()
    wait_until(lambda: daemon.function("one")["inflight"] == 1, message="the first call in flight")
    refused = run_cli("invoke", "one", "--url", daemon.url)
    thread.join()
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("faasd: TooManyRequestsException: Rate Exceeded. "
                                      "(ReservedFunctionConcurrentInvocationLimitExceeded)"), refused.stderr


def test_the_global_limit_throttles_with_its_own_reason(start_daemon, functions_dir):
    daemon = start_daemon(functions_dir, env={"FAASD_LIMITS_MAX_CONCURRENCY": "1"})
    write_function(daemon.functions, "long.py", "import time\ndef handler(e, c):\n    time.sleep(1.5)\n    return 1\n")
    write_function(daemon.functions, "other.py", "def handler(e, c):\n    return 2\n")
    loaded(daemon, "long")
    loaded(daemon, "other")
    thread = threading.Thread(target=lambda: daemon.get("/function/long"))
    thread.start()
    wait_until(lambda: daemon.function("long")["inflight"] == 1, message="the first call in flight")
    refused = daemon.get("/function/other")
    thread.join()
    assert refused.status == 429
    assert refused.json() == {"message": "Too Many Requests", "reason": "ConcurrentInvocationLimitExceeded"}
    assert daemon.get("/function/other").json() == 2


def test_a_burst_is_not_held_to_the_soft_limit_on_open_files_it_was_started_with(
        start_daemon, functions_dir):
    # Each worker holds a few of the daemon's descriptors: forty at once need
    # more than 128, the soft limit here (systemd's default is 1024).
    daemon = start_daemon(functions_dir, prefix=["prlimit", "--nofile=128:8192", "--"])
    write_function(daemon.functions, "fn.toml", "timeout_s = 10\n")
    write_function(daemon.functions, "fn.py", """
        import os, time
        def handler(event, context):
            time.sleep(2)
            return os.getpid()
    """)
    loaded(daemon, "fn")
    results = concurrent(daemon, "fn", [{}] * 40)
    failed = [r for r in results if not isinstance(r, int)]
    assert not failed, f"{len(failed)} of 40 failed, e.g. {failed[0]}"
    # Function code keeps Lambda's 1024.
    with open(f"/proc/{results[0]}/limits") as limits:
        assert next(line for line in limits if line.startswith("Max open files")).split()[3:5] == ["1024", "1024"]


def test_running_out_of_file_descriptors_is_faasds_fault_and_is_said_once_with_the_fix(
        start_daemon, functions_dir):
    daemon = start_daemon(functions_dir, prefix=["prlimit", "--nofile=64:64", "--"])
    write_function(daemon.functions, "fn.toml", "timeout_s = 10\n")
    write_function(daemon.functions, "fn.py", """
        import time
        def handler(event, context):
            time.sleep(2)
            return "ran"
    """)
    loaded(daemon, "fn")
    # Each worker holds a few of the daemon's descriptors: thirty at once need more than 64.
    answers: list[tuple[int, dict[str, str], bytes] | str] = []

    def call() -> None:
        try:
            response = daemon.invoke("fn")
            answers.append((response.status, response.headers, response.body))
        except OSError as exc:  # a connection reset for want of a descriptor to accept it
            answers.append(repr(exc))

    threads = [threading.Thread(target=call) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    refused = [a for a in answers if not isinstance(a, str) and a[2] != b'"ran"']
    assert refused, answers  # some starts found no descriptor
    for status, headers, body in refused:
        # A service fault, as Lambda reports its own: never a Runtime.* error blaming the code.
        assert status == 503 and headers["x-amzn-errortype"] == "ServiceException", (status, body)
        assert json.loads(body)["Type"] == "Service" and b"LimitNOFILE" in body, body
    assert daemon.function("fn")["init_error"] is None
    # Idle connections take what is left: the ones beyond it are reset, which is said once.
    held = []
    try:
        for _ in range(80):
            held.append(socket.create_connection(("127.0.0.1", daemon.port), timeout=5))
        try:
            wait_until(lambda: "out of file descriptors" in daemon.output(), timeout=20,
                       message="the shortage to be said")
        except AssertionError:  # say what the daemon held, to tell why it was not short
            held_fds = sorted(os.readlink(f"/proc/{daemon.process.pid}/fd/{fd}")
                              for fd in os.listdir(f"/proc/{daemon.process.pid}/fd"))
            raise AssertionError(f"no shortage said with {len(held)} connections made; the daemon "
                                 f"holds {len(held_fds)}: {held_fds}\n{daemon.output()[-4000:]}") from None
        time.sleep(2.5)  # looked at again twice, still short
    finally:
        for connection in held:
            connection.close()

    def served() -> bool:
        try:
            return daemon.invoke("fn").status == 200
        except OSError:  # reset: the daemon has not seen the others close yet
            return False

    wait_until(served, timeout=30, message="calls to be served again")
    output = daemon.output()
    assert output.count("out of file descriptors") == 1, output
    assert "LimitNOFILE" in output.split("out of file descriptors")[1].splitlines()[0]
    assert "Runtime.InvalidEntrypoint" not in output


def test_a_request_still_arriving_at_sigterm_is_served(daemon):
    # Read before SIGTERM, its body after: it is in flight, and is served.
    write_function(daemon.functions, "echo.py", ECHO)
    wait_until(lambda: daemon.get("/function/echo").status == 200)
    body = b'{"k": 1}'
    head = (f"POST /function/echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=20) as conn:
        conn.sendall(head + body[:3])
        # The handler waits for the rest of the body; the scrape counts itself.
        wait_until(lambda: metric(daemon, "faasd_http_requests_in_progress") == 2,
                   message="the request in progress")
        daemon.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "shutting down" in daemon.output(), message="the shutdown to begin")
        conn.sendall(body[3:])
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    status = reply.split(b"\r\n", 1)[0]
    assert status == b"HTTP/1.1 200 OK", reply[:300]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["body"] == '{"k": 1}'
    assert daemon.process.wait(20) == 0


def test_sigterm_drains_in_flight_calls_and_leaves_no_process(daemon):
    write_function(daemon.functions, "slow.toml", "timeout_s = 10\n")
    write_function(daemon.functions, "slow.py", "import time\ndef handler(e, c):\n    time.sleep(1.5)\n    return 'done'\n")
    write_function(daemon.functions, "other.toml", "min_warm = 2\n")
    write_function(daemon.functions, "other.py", ECHO)
    wait_until(lambda: len(daemon.workers("other")) == 2, message="prewarmed workers")
    loaded(daemon, "slow")
    pid = daemon.process.pid
    result = {}

    def call():
        result["response"] = daemon.get("/function/slow")

    thread = threading.Thread(target=call)
    thread.start()
    wait_until(lambda: daemon.function("slow")["inflight"] == 1, message="the call in flight")
    children = descendants(pid)
    assert len(children) >= 2  # the busy worker and the prewarmed ones
    daemon.process.send_signal(signal.SIGTERM)
    thread.join(20)
    assert result["response"].status == 200 and result["response"].json() == "done"
    assert daemon.process.wait(20) == 0
    wait_until(lambda: all(process_state(p) is None for p in children), timeout=5,
               message="every worker to be gone")


def test_a_second_stop_signal_ends_the_drain_at_once(start_daemon, functions_dir):
    """Ctrl-C twice: the second one does not wait out drain_timeout_s; a call still running
    is answered as failed, saying why."""
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_DRAIN_TIMEOUT_S": "60"})
    write_function(daemon.functions, "long.toml", "timeout_s = 120\n")
    write_function(daemon.functions, "long.py", "import time\ndef handler(e, c):\n    time.sleep(100)\n")
    loaded(daemon, "long")
    results = {}
    caller = threading.Thread(target=lambda: results.update(answer=daemon.invoke("long")))
    caller.start()
    # Running, past its worker's init: a call still waiting for one gets 503 when the drain ends.
    wait_until(lambda: [w["state"] for w in daemon.workers("long")] == ["busy"], message="the call running")
    daemon.process.send_signal(signal.SIGINT)
    wait_until(lambda: "draining in-flight invocations (up to 60s)" in daemon.output(),
               message="the drain to begin")
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGINT)
    assert daemon.process.wait(20) == 0
    assert time.monotonic() - started < 15
    caller.join(10)
    answer = results["answer"]
    assert answer.status == 200 and answer.headers["x-amz-function-error"] == "Unhandled", answer
    assert "(faasd stopped at once: a second stop signal)" in answer.json()["errorMessage"], answer.json()
    assert "a second stop signal: stopping now" in daemon.output()


def test_a_call_that_outlives_the_drain_is_answered_and_logged_as_failed(start_daemon, functions_dir):
    """At drain_timeout_s the calls still running have their workers killed: each caller gets
    an answer saying so, not a closed connection, and each call its END and REPORT."""
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_DRAIN_TIMEOUT_S": "1"})
    write_function(daemon.functions, "long.toml", "timeout_s = 30\n")
    write_function(daemon.functions, "long.py", "import time\ndef handler(e, c):\n    time.sleep(20)\n")
    # A call still waiting for its worker's init when the drain ends never started.
    write_function(daemon.functions, "cold.toml", "timeout_s = 30\n")
    write_function(daemon.functions, "cold.py", "import time\ntime.sleep(20)\ndef handler(e, c):\n    return 1\n")
    loaded(daemon, "long")
    loaded(daemon, "cold")
    results = {}

    def call(how: str) -> None:
        if how == "http":
            results[how] = daemon.get("/function/long", timeout=20)
        else:
            results[how] = daemon.invoke(how)

    threads = [threading.Thread(target=call, args=(how,)) for how in ("http", "long", "cold")]
    for thread in threads:
        thread.start()
    wait_until(lambda: daemon.function("long")["inflight"] == 2 and daemon.function("cold")["inflight"] == 1,
               message="the three calls in flight")
    daemon.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(20)
    assert daemon.process.wait(20) == 0
    routed, invoked, cold = results["http"], results["long"], results["cold"]
    assert cold.status == 503 and cold.json()["message"] == "faasd is shutting down", cold
    assert routed.status == 502 and routed.json() == {"message": "Internal Server Error"}, routed
    assert invoked.status == 200 and invoked.headers["x-amz-function-error"] == "Unhandled", invoked
    error = invoked.json()
    assert error["errorType"] == "Runtime.ExitError", error
    assert "faasd stopped: the call ran past [workers] drain_timeout_s (1 s)" in error["errorMessage"]
    log = (daemon.data / "logs" / "long.log").read_text()
    for request_id in (routed.headers["apigw-requestid"], invoked.headers["x-amzn-requestid"]):
        assert f"END RequestId: {request_id}" in log, log
        assert f"REPORT RequestId: {request_id}" in log and "Error Type: Runtime.ExitError" in log, log
    output = daemon.output()
    assert "2 calls still running at the drain's end: their workers are killed" in output, output
    assert "drain timed out" not in output, output
