"""API security, end to end: SigV4 as AWS checks it, bearer secrets, trigger auth,
refusals of bad input, and a Schemathesis run against /openapi.json."""

from __future__ import annotations

import datetime as dt
import http.client as http_client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import botocore.auth
import botocore.exceptions
import pytest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

import support
from support import Response, http, wait_until, write_function

KEY_ID = "AKIDFAASDTEST"
SECRET = "a-long-random-secret-for-tests"
KEYS_ENV = {"FAASD_AUTH_KEYS": f"{KEY_ID}={SECRET},AKIDOTHER=another-secret"}

HELLO = """
def handler(event, context):
    return {"hello": event.get("name", "world") if isinstance(event, dict) else "world"}
"""

ECHO_EVENT = """
def handler(event, context):
    return {"statusCode": 200, "body": __import__("json").dumps(
        {"authorizer": event["requestContext"].get("authorizer"), "path": event["rawPath"],
         "trace": event["headers"]["x-amzn-trace-id"]})}
"""

AUTHORIZER = """
def handler(event, context):
    token = event["headers"].get("x-token")
    if token == "explode":
        raise RuntimeError("authorizer failure")
    return {"isAuthorized": token == "let-me-in",
            "context": {"user": "alice", "route": event["routeKey"], "trace": event["headers"]["x-amzn-trace-id"]}}
"""


def lambda_client(daemon, *, key: str = KEY_ID, secret: str = SECRET):
    return support.lambda_client(daemon.url, key=key, secret=secret, read_timeout=30)


def signed(daemon, method: str, path: str, body: bytes = b"", *, secret: str = SECRET,
           key: str = KEY_ID, service: str = "lambda", headers: dict[str, str] | None = None,
           when: dt.datetime | None = None, tamper: bytes | None = None, chunked: bool = False):
    """A request signed by botocore's own SigV4 signer (not faasd's), sent as is;
    `chunked`: its body in chunks, with no Content-Length."""
    request = AWSRequest(method=method, url=daemon.url + path, data=body,
                         headers={"Content-Type": "application/json", **(headers or {})})
    signer = botocore.auth.SigV4Auth(Credentials(key, secret), service, "us-east-1")
    if when is not None:
        with mock.patch("botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)):
            signer.add_auth(request)
    else:
        signer.add_auth(request)
    prepared = request.prepare()
    if chunked:
        return chunked_request(daemon, method, path, body, {
            k: v for k, v in prepared.headers.items() if k.lower() != "content-length"})
    return http(method, prepared.url, tamper if tamper is not None else body,
                headers=dict(prepared.headers))


def chunked_request(daemon, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
    connection = http_client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        connection.request(method, path, body=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                           headers=headers, encode_chunked=True)
        answer = connection.getresponse()
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read())
    finally:
        connection.close()


@pytest.fixture
def secured(start_daemon, functions_dir):
    write_function(functions_dir, "hello.py", HELLO)
    return start_daemon(functions_dir, env=KEYS_ENV)


def bearer(secret: str = SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


# -- SigV4 on the Lambda API -----------------------------------------------------------

def test_boto3_with_the_right_key_invokes_lists_and_gets(secured):
    client = lambda_client(secured)
    response = client.invoke(FunctionName="hello", Payload=json.dumps({"name": "sigv4"}))
    assert response["StatusCode"] == 200
    assert json.loads(response["Payload"].read()) == {"hello": "sigv4"}
    # Names that botocore percent-encodes (an ARN's colons) are signed as AWS signs them.
    arn = "arn:aws:lambda:us-east-1:000000000000:function:hello"
    assert client.invoke(FunctionName=arn, Payload=b"{}")["StatusCode"] == 200
    assert [f["FunctionName"] for f in client.list_functions(MaxItems=10)["Functions"]] == ["hello"]
    assert client.get_function(FunctionName="hello")["Configuration"]["FunctionName"] == "hello"
    # The second key works as well.
    other = lambda_client(secured, key="AKIDOTHER", secret="another-secret")
    assert other.invoke(FunctionName="hello", Payload=b"{}")["StatusCode"] == 200
    # InvokeWithResponseStream is signed, and checked, as Invoke is.
    streamed = client.invoke_with_response_stream(FunctionName=arn, Payload=json.dumps({"name": "stream"}))
    [chunk, complete] = streamed["EventStream"]
    assert json.loads(chunk["PayloadChunk"]["Payload"]) == {"hello": "stream"}
    assert complete == {"InvokeComplete": {}}


def test_a_signed_event_is_held_to_lambdas_1_mb_as_an_unsigned_one_is(secured):
    # The body is read to check its signature, under the general 6 MB limit;
    # an Event call is still held to its own.
    client = lambda_client(secured)
    big = b'"' + b"x" * (1024 * 1024) + b'"'
    with pytest.raises(client.exceptions.RequestTooLargeException) as caught:
        client.invoke(FunctionName="hello", InvocationType="Event", Payload=big)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert caught.value.response["Error"]["Message"] == (
        "1048578 byte payload is too large for the Event invocation type (limit 1048576 bytes)")
    # Without a Content-Length the size is known only once the body is read.
    response = signed(secured, "POST", "/2015-03-31/functions/hello/invocations", big,
                      headers={"X-Amz-Invocation-Type": "Event"}, chunked=True)
    assert response.status == 413, response.text
    assert response.headers["x-amzn-errortype"] == "RequestTooLargeException"
    assert response.json()["message"] == "Request must be smaller than 1048576 bytes for the InvokeFunction operation"
    fits = signed(secured, "POST", "/2015-03-31/functions/hello/invocations", b'{"name": "chunks"}',
                  headers={"X-Amz-Invocation-Type": "Event"}, chunked=True)
    assert fits.status == 202, fits.text
    wait_until(lambda: secured.get("/system/functions/hello", headers=bearer()).json()["queue"]["succeeded"] == 1,
               message="the one event that fits to run")


def test_the_aws_cli_with_the_right_key_works_and_a_wrong_one_does_not(secured, tmp_path):
    aws = Path(sys.executable).parent / "aws"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_MAX_ATTEMPTS": "1"}
    out = tmp_path / "out.json"
    done = subprocess.run([str(aws), "lambda", "invoke", "--endpoint-url", secured.url,
                           "--function-name", "hello", "--payload", '{"name": "cli"}', str(out)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == {"hello": "cli"}
    env["AWS_SECRET_ACCESS_KEY"] = "wrong"
    done = subprocess.run([str(aws), "lambda", "list-functions", "--endpoint-url", secured.url],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0 and "InvalidSignatureException" in done.stderr


def _refusal(response, error_type: str) -> str:
    assert response.status == 403, (response.status, response.text)
    assert response.headers["x-amzn-errortype"] == error_type
    body = response.json()
    assert set(body) == {"Type", "message"} and body["Type"] == "User"
    return body["message"]


def test_a_wrong_secret_is_refused_as_aws_refuses_it(secured):
    message = _refusal(signed(secured, "POST", "/2015-03-31/functions/hello/invocations", b"{}",
                              secret="not-the-secret"), "InvalidSignatureException")
    assert message.startswith("The request signature we calculated does not match")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        lambda_client(secured, secret="not-the-secret").list_functions()
    assert caught.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        lambda_client(secured, secret="not-the-secret").invoke_with_response_stream(FunctionName="hello")
    assert caught.value.response["Error"]["Code"] == "InvalidSignatureException"


def test_an_unknown_key_and_a_missing_signature_are_refused(secured):
    message = _refusal(signed(secured, "GET", "/2015-03-31/functions/", key="AKIDUNKNOWN"),
                       "UnrecognizedClientException")
    assert message == "The security token included in the request is invalid."
    for path in ("/2015-03-31/functions/hello/invocations",
                 "/2021-11-15/functions/hello/response-streaming-invocations"):
        message = _refusal(http("POST", secured.url + path, b"{}"), "MissingAuthenticationTokenException")
        assert message == "Missing Authentication Token"
    garbled = http("GET", secured.url + "/2015-03-31/functions/",
                   headers={"Authorization": "AWS4-HMAC-SHA256 Credential=x", "X-Amz-Date": "now"})
    _refusal(garbled, "IncompleteSignatureException")


def test_a_stale_or_future_date_is_refused(secured):
    now = dt.datetime.now(dt.timezone.utc)
    message = _refusal(signed(secured, "GET", "/2015-03-31/functions/", when=now - dt.timedelta(minutes=6)),
                       "InvalidSignatureException")
    assert message.startswith("Signature expired: ") and "- 5 min.)" in message
    message = _refusal(signed(secured, "GET", "/2015-03-31/functions/", when=now + dt.timedelta(minutes=6)),
                       "InvalidSignatureException")
    assert message.startswith("Signature not yet current: ")
    # Within the 5 minutes AWS allows, the same request passes.
    response = signed(secured, "GET", "/2015-03-31/functions/", when=now - dt.timedelta(minutes=4))
    assert response.status == 200, response.text


def test_a_tampered_body_is_refused_and_nothing_runs(secured):
    path = "/2015-03-31/functions/hello/invocations"
    response = signed(secured, "POST", path, b'{"name": "alice"}', tamper=b'{"name": "eve!!"}')
    message = _refusal(response, "InvalidSignatureException")
    assert "signature we calculated does not match" in message
    log = secured.get("/system/functions/hello/logs?lines=1000", headers=bearer()).text
    assert "START RequestId" not in log
    # The untampered request runs.
    response = signed(secured, "POST", path, b'{"name": "alice"}')
    assert response.status == 200 and response.json() == {"hello": "alice"}


def test_the_faasd_client_signs_with_the_configured_key(secured):
    env = {**os.environ, **KEYS_ENV, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for command, expected in ((["invoke", "hello", "--data", '{"name": "cli"}'], '{"hello":"cli"}'),
                              (["list"], "hello"), (["logs", "hello"], "STARTRequestId")):
        done = subprocess.run([sys.executable, "-m", "faasd", *command, "--url", secured.url],
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert expected in done.stdout.replace(" ", ""), (command, done.stdout)
    # Without the key the daemon refuses it.
    env.pop("FAASD_AUTH_KEYS")
    done = subprocess.run([sys.executable, "-m", "faasd", "invoke", "hello", "--url", secured.url],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "MissingAuthenticationTokenException" in done.stderr
    # `faasd list` says why, in the daemon's words.
    done = subprocess.run([sys.executable, "-m", "faasd", "list", "--url", secured.url],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and done.stderr.startswith("faasd: the daemon answered 401: "), done.stderr
    assert len(done.stderr.strip()) > len("faasd: the daemon answered 401: "), done.stderr


def test_credentials_that_are_not_ascii_are_refused_never_a_server_error(secured):
    """Bytes that are not UTF-8, or letters beyond ASCII, in any part of the
    credentials: refused as AWS refuses a wrong signature, never a 500."""
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ").encode()
    scope = b"Credential=" + KEY_ID.encode() + b"/" + date[:8] + b"/us-east-1/lambda/aws4_request"
    sigv4 = b"Authorization: AWS4-HMAC-SHA256 " + scope + b", SignedHeaders=host;x-amz-date, Signature="
    head = b"GET /2015-03-31/functions/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    refusals = {
        "a signature of bytes that are not UTF-8": sigv4 + b"\xff\xfe\r\nX-Amz-Date: " + date,
        "a signature of letters beyond ASCII": sigv4 + "\u00e9\u00e9".encode() + b"\r\nX-Amz-Date: " + date,
        "a signed header that is not UTF-8": sigv4.replace(b"host;x-amz-date", b"host;x-amz-date;x-evil")
        + b"00\r\nX-Evil: \xff\r\nX-Amz-Date: " + date,
        "a region that is not UTF-8": sigv4.replace(b"us-east-1", b"us-east-\xff") + b"00\r\nX-Amz-Date: " + date,
        "a date that is not UTF-8": sigv4 + b"00\r\nX-Amz-Date: \xff" + date,
    }
    for what, headers in refusals.items():
        status, answer = raw(secured, head + headers + b"\r\n\r\n")
        assert status == 403, (what, answer[-300:])
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["Type"] == "User" and body["message"], (what, body)
    for header in (b"Bearer \xff\xfe", "Bearer s\u00e9cret".encode(), b"Basic \xff"):
        status, answer = raw(secured, b"GET /system/info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                                      b"Authorization: " + header + b"\r\n\r\n")
        assert status == 401, (header, answer[-300:])
    assert "Traceback" not in secured.output() and "unhandled error" not in secured.output()
    assert secured.get("/system/info", headers=bearer()).status == 200


def test_a_trigger_with_auth_key_refuses_credentials_that_are_not_ascii(start_daemon, functions_dir):
    write_function(functions_dir, "private/handler.py", ECHO_EVENT)
    write_function(functions_dir, "private/function.toml",
                   '[[triggers]]\ntype = "http"\npath = "/private"\nauth = "key"\n')
    daemon = start_daemon(functions_dir, env=KEYS_ENV)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ").encode()
    for header in (b"Bearer \xff", b"x-api-key: \xff", b"AWS4-HMAC-SHA256 Credential=" + KEY_ID.encode()
                   + b"/" + date[:8] + b"/us-east-1/execute-api/aws4_request, SignedHeaders=host;x-amz-date, "
                   b"Signature=\xff\r\nX-Amz-Date: " + date):
        line = header if header.startswith(b"x-api-key") else b"Authorization: " + header
        status, answer = raw(daemon, b"GET /private HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                                     + line + b"\r\n\r\n")
        assert status == 403, (header, answer[-300:])
    assert "Traceback" not in daemon.output()


# -- bearer on the operator views -------------------------------------------------------

def test_system_metrics_and_ui_want_a_bearer_secret(secured):
    for path in ("/system/info", "/system/functions", "/system/functions/hello",
                 "/system/functions/hello/logs", "/metrics", "/ui/", "/system%2Finfo"):
        refused = secured.get(path)
        assert refused.status == 401, (path, refused.status)
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert secured.get(path, headers=bearer("wrong")).status == 401, path
    for path in ("/system/info", "/system/functions", "/system/functions/hello", "/metrics"):
        assert secured.get(path, headers=bearer()).status == 200, path
    basic = "Basic " + __import__("base64").b64encode(f"{KEY_ID}:{SECRET}".encode()).decode()
    assert secured.get("/system/info", headers={"Authorization": basic}).status == 200
    # Probes, the API description and http triggers stay public.
    for path in ("/healthz", "/readyz", "/openapi.json", "/function/hello"):
        assert secured.get(path).status == 200, path
    info = secured.get("/system/info", headers=bearer()).json()
    assert info["isolation"]["api_auth"]["active"] is True


# -- trigger auth -------------------------------------------------------------------------

def test_a_trigger_with_auth_key_wants_one_of_the_keys(start_daemon, functions_dir):
    write_function(functions_dir, "private/handler.py", ECHO_EVENT)
    write_function(functions_dir, "private/function.toml",
                   '[[triggers]]\ntype = "http"\npath = "/private"\nauth = "key"\n')
    daemon = start_daemon(functions_dir, env=KEYS_ENV)
    assert daemon.get("/private").status == 401
    assert daemon.get("/private").json() == {"message": "Unauthorized"}
    assert daemon.get("/private", headers=bearer("wrong")).status == 403
    # /function/NAME is guarded the same way: no way around the key.
    assert daemon.get("/function/private").status == 401
    ok = daemon.get("/private", headers=bearer())
    assert ok.status == 200, ok.text
    assert ok.json()["authorizer"]["iam"]["accessKey"] == KEY_ID
    assert daemon.get("/function/private", headers={"x-api-key": "another-secret"}).status == 200
    # IAM-style: a SigV4 signature for execute-api, as API Gateway takes.
    response = signed(daemon, "GET", "/private", service="execute-api")
    assert response.status == 200 and response.json()["authorizer"]["iam"]["accessKey"] == KEY_ID
    assert signed(daemon, "GET", "/private", service="execute-api", secret="nope").status == 403
    # Its function URL says it wants IAM (SigV4) auth.
    url = lambda_client(daemon).get_function_url_config(FunctionName="private")
    assert url["AuthType"] == "AWS_IAM" and url["FunctionUrl"] == f"{daemon.url}/function/private/"


def test_an_authorizer_function_allows_denies_and_passes_its_context(start_daemon, functions_dir):
    write_function(functions_dir, "authz.py", AUTHORIZER)
    write_function(functions_dir, "guarded/handler.py", ECHO_EVENT)
    write_function(functions_dir, "guarded/function.toml",
                   '[[triggers]]\ntype = "http"\npath = "/guarded/{id}"\nauth = "function:authz"\n')
    daemon = start_daemon(functions_dir)  # no [auth] keys needed for an authorizer
    ok = daemon.get("/guarded/7", headers={"x-token": "let-me-in"})
    assert ok.status == 200, ok.text
    seen = ok.json()
    # One request, one trace: the authorizer and the function run under the same header.
    trace = seen.pop("trace")
    assert trace.startswith("Root=1-")
    assert seen == {"authorizer": {"lambda": {"user": "alice", "route": "ANY /guarded/{id}", "trace": trace}},
                    "path": "/guarded/7"}
    denied = daemon.get("/guarded/7", headers={"x-token": "guess"})
    assert denied.status == 403 and denied.json() == {"message": "Forbidden"}
    assert daemon.get("/function/guarded").status == 403
    failed = daemon.get("/guarded/7", headers={"x-token": "explode"})
    assert failed.status == 502 and failed.json() == {"message": "Internal Server Error"}
    # The handler never ran for a refused call.
    log = daemon.log_of("guarded")
    assert log.count("START RequestId") == 1


def test_trigger_auth_settings_are_validated(start_daemon, functions_dir):
    write_function(functions_dir, "typo/handler.py", HELLO)
    write_function(functions_dir, "typo/function.toml",
                   '[[triggers]]\ntype = "http"\npath = "/typo"\nauht = "key"\n')
    write_function(functions_dir, "bogus/handler.py", HELLO)
    write_function(functions_dir, "bogus/function.toml",
                   '[[triggers]]\ntype = "http"\npath = "/bogus"\nauth = "password"\n')
    daemon = start_daemon(functions_dir)
    assert "unknown key 'auht'" in daemon.function("typo")["load_error"]
    assert "auth = 'password'" in daemon.function("bogus")["load_error"]
    assert daemon.get("/typo").status == 404 and daemon.get("/bogus").status == 404


# -- where faasd listens -------------------------------------------------------------------

def test_a_public_address_without_keys_is_refused_unless_insecure(start_daemon, functions_dir):
    daemon = start_daemon(functions_dir, wait=False, args=["--host", "0.0.0.0"])
    assert daemon.process.wait(30) == 1
    output = daemon.output()
    assert "cannot start: [server] host = '0.0.0.0' is not a loopback address and no [auth] keys" in output
    assert "pass --insecure" in output


def test_a_taken_port_stops_the_start_before_any_trigger_fires(start_daemon, functions_dir, tmp_path):
    write_function(functions_dir, "tick.toml", 'min_warm = 1\n[[triggers]]\ntype = "cron"\n'
                                               'schedule = "* * * * * *"\ncatch_up = 1\n')
    write_function(functions_dir, "tick.py", "def handler(e, c):\n    print('TICKED')\n")
    data = tmp_path / "data"
    first = start_daemon(functions_dir, data=data)
    wait_until(lambda: "TICKED" in first.output(), message="a tick")
    assert first.stop() == 0
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        daemon = start_daemon(functions_dir, wait=False, port=holder.getsockname()[1], data=data)
        assert daemon.process.wait(30) == 1
    output = daemon.output()
    assert (f"cannot start: cannot listen on 127.0.0.1 port {daemon.port}: Address already in use: "
            f"another process listens there (ss -ltnp 'sport = :{daemon.port}' names it); stop it, or "
            "set [server] port (or --port) to a free one") in output, output
    # Nothing ran for a daemon that could not serve: no tick was caught up or fired,
    # and nothing was in flight to drain.
    assert "catching up" not in output and "TICKED" not in output, output
    assert "draining" not in output and "releasing what the start set up" in output, output


def test_a_public_address_with_keys_is_served(start_daemon, functions_dir):
    daemon = start_daemon(functions_dir, env=KEYS_ENV, args=["--host", "0.0.0.0"])
    assert "API authentication on (2 keys)" in daemon.output()
    assert daemon.get("/system/info").status == 401


def test_without_keys_faasd_says_it_is_open_on_loopback_only(start_daemon, functions_dir):
    daemon = start_daemon(functions_dir)
    assert "no [auth] keys: the API is open to anyone who can connect, so faasd listens on " \
           "loopback only (127.0.0.1)" in daemon.output()


def test_without_keys_a_request_naming_faasd_by_another_sites_name_is_refused(start_daemon, functions_dir):
    """A web page whose domain is resolved again to 127.0.0.1 (DNS rebinding) reaches an open
    faasd as its own origin; its requests name that domain as Host, and are refused."""
    write_function(functions_dir, "hello.py", HELLO)
    daemon = start_daemon(functions_dir)
    assert daemon.get("/function/hello").status == 200
    port = daemon.port
    for host in ("rebind.example", f"rebind.example:{port}", f"127.0.0.1.nip.io:{port}",
                 f"localhost.example:{port}"):
        for path in ("/system/functions", "/2015-03-31/functions/hello", "/function/hello", "/ui/"):
            response = daemon.get(path, headers={"Host": host})
            assert response.status == 403, (host, path, response.status, response.text)
            # On the Lambda API, in Lambda's shape: AccessDeniedException, {"Message"}.
            key = "Message" if path.startswith("/2015-03-31/") else "message"
            assert response.json()[key].startswith(f"Host {host!r} is refused: without [auth] keys")
    for host in ("localhost", f"localhost:{port}", f"app.localhost:{port}", f"127.0.0.1:{port}",
                 f"[::1]:{port}", "10.1.2.3"):
        assert daemon.get("/function/hello", headers={"Host": host}).json() == {"hello": "world"}, host
    status, answer = raw(daemon, b"GET /function/hello HTTP/1.0\r\n\r\n")  # no Host at all
    assert status == 200, answer
    daemon.stop()
    keyed = start_daemon(functions_dir, env=KEYS_ENV)  # keys decide, whatever the Host
    assert keyed.get("/system/info", headers={"Host": "faasd.example", **bearer()}).status == 200
    assert keyed.get("/function/hello", headers={"Host": "faasd.example"}).status == 200


def test_insecure_accepts_an_open_public_address_with_a_warning():
    from faasd.auth import check_exposure
    from faasd.config import load_config

    config = load_config(None, env={}, overrides={"server": {"host": "0.0.0.0", "insecure": True}})
    assert "OPEN to anyone" in check_exposure(config)


# -- bad input -------------------------------------------------------------------------------

def raw(daemon, data: bytes, timeout: float = 10) -> tuple[int | None, bytes]:
    """Send bytes as they are; (status, whole answer). None: closed without an answer."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    if not answer.startswith(b"HTTP/1."):
        return None, answer
    return int(answer.split(b" ", 2)[1]), answer


BAD_REQUESTS = [
    # header values that are not UTF-8 reach the handler as text
    (b"GET /function/hello HTTP/1.1\r\nHost: localhost\r\nX-Bad: \xff\xfe\x80\r\n"
     b"User-Agent: \xc3\x28\r\nCookie: a=\xff\r\n\r\n", {200}),
    (b"POST /function/hello HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain; charset=\xff\r\n"
     b"Content-Length: 3\r\n\r\n\xff\xfe\x00", {200}),
    (b"POST /2015-03-31/functions/hello/invocations HTTP/1.1\r\nHost: localhost\r\n"
     b"X-Amz-Invocation-Type: \xff\r\nContent-Length: 2\r\n\r\n{}", {400}),
    (b"POST /2015-03-31/functions/hello/invocations HTTP/1.1\r\nHost: localhost\r\n"
     b"Content-Length: 9\r\n\r\n{\"a\": 1,}", {400}),
    (b"GET /function/hello HTTP/1.1\r\nHost: localhost\r\nX-Null: a\x00b\r\n\r\n", {400}),
    (b"GET /function/hello?a=\xff HTTP/1.1\r\nHost: localhost\r\n\r\n", {400}),
    (b"GET /function/hello HTTP/1.1\r\nHost: localhost\r\nX-Long: " + b"a" * 11000 + b"\r\n\r\n", {400, 431}),
    (b"GET /function/hello HTTP/1.1\r\nHost: localhost\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n", {400, 431}),
    (b"POST /function/hello HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n", {400}),
    (b"POST /function/hello HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}", {400}),
    (b"POST /function/hello HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", {400}),
    (b"GARBAGE\r\n\r\n", {400}),
    # names with .., %2f, NUL, and paths that try to climb
    (b"GET /function/..%2f..%2fetc%2fpasswd HTTP/1.1\r\nHost: localhost\r\n\r\n", {400, 404}),
    (b"GET /function/%2e%2e HTTP/1.1\r\nHost: localhost\r\n\r\n", {400, 404}),
    (b"GET /function/a%00b HTTP/1.1\r\nHost: localhost\r\n\r\n", {400, 404}),
    (b"GET /system/functions/..%2F..%2Fetc%2Fpasswd/logs HTTP/1.1\r\nHost: localhost\r\n\r\n", {400, 404}),
    (b"GET /system/functions/a%00b/logs HTTP/1.1\r\nHost: localhost\r\n\r\n", {400, 404}),
    (b"GET /system/functions/%2e%2e/logs HTTP/1.1\r\nHost: localhost\r\n\r\n", {400, 404}),
    (b"GET /system/functions/hello/logs?lines=1e99 HTTP/1.1\r\nHost: localhost\r\n\r\n", {400}),
    # (names outside Lambda's model: its ValidationException)
    (b"POST /2015-03-31/functions/..%2F..%2Fetc%2Fpasswd/invocations HTTP/1.1\r\nHost: localhost\r\n"
     b"Content-Length: 2\r\n\r\n{}", {400}),
    (b"GET /2015-03-31/functions/%00 HTTP/1.1\r\nHost: localhost\r\n\r\n", {400}),
    (b"GET /2015-03-31/functions/?MaxItems=x&Marker=%ff HTTP/1.1\r\nHost: localhost\r\n\r\n", {400}),
    (b"GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: localhost\r\n\r\n", {404}),
    (b"GET /function/hello/..%2f..%2f..%2fetc%2fpasswd HTTP/1.1\r\nHost: localhost\r\n\r\n", {200}),
]


def test_bad_input_never_gets_a_server_error(start_daemon, functions_dir):
    write_function(functions_dir, "hello.py", HELLO)
    daemon = start_daemon(functions_dir)
    for request, expected in BAD_REQUESTS:
        status, answer = raw(daemon, request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        assert status in expected, (request[:120], answer[:300])
        assert b"root:x:0:0" not in answer
    output = daemon.output()
    assert "Traceback" not in output and "unhandled error" not in output
    assert daemon.get("/function/hello").status == 200


def test_oversize_bodies_are_refused_with_413(start_daemon, functions_dir):
    write_function(functions_dir, "hello.py", HELLO)
    daemon = start_daemon(functions_dir, env={"FAASD_SERVER_MAX_BODY_MB": "1"})
    big = b'"' + b"x" * (1024 * 1024 + 10) + b'"'
    response = daemon.post("/2015-03-31/functions/hello/invocations", big)
    assert response.status == 413
    assert response.headers["x-amzn-errortype"] == "RequestTooLargeException"
    assert daemon.post("/function/hello", big).status == 413
    # Chunked, with no Content-Length to refuse up front.
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20)) + b"0\r\n\r\n"
    status, _ = raw(daemon, b"POST /function/hello HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
                            b"Connection: close\r\n\r\n" + body)
    assert status == 413
    assert daemon.get("/function/hello").status == 200


def test_slow_clients_are_cut_off(start_daemon, functions_dir):
    write_function(functions_dir, "hello.py", HELLO)
    daemon = start_daemon(functions_dir, env={"FAASD_SERVER_IDLE_TIMEOUT_S": "1"})
    # Headers that never end: the connection is closed.
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=15) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /function/hello HTTP/1.1\r\nHost: localhost\r\n")
        closed = False
        while time.monotonic() - started < 12:
            try:
                sock.sendall(b"X-Slow: 1\r\n")
                if sock.recv(1024, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.2)
        assert closed, "a client trickling headers kept its connection"
        assert time.monotonic() - started < 8
    # A body that stalls: 408.
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=15) as sock:
        sock.sendall(b"POST /function/hello HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{\"a\":")
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer
    assert daemon.get("/function/hello").status == 200


def test_a_body_that_trickles_in_gets_408_at_its_deadline_while_others_are_served(start_daemon, functions_dir):
    """A client sending a byte every half second is never silent for idle_timeout_s, yet its
    body is cut off at body_timeout_s; other requests are served meanwhile."""
    write_function(functions_dir, "hello.py", HELLO)
    daemon = start_daemon(functions_dir, env={"FAASD_SERVER_BODY_TIMEOUT_S": "2"})
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=0.5) as sock:
        sock.sendall(b"POST /function/hello HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n")
        answer, sent, served = b"", 0, 0
        while not answer and sent < 60:  # a byte each 0.5 s: the 100 would take 50 s
            sock.sendall(b"x")
            sent += 1
            served += daemon.get("/function/hello").status == 200
            try:
                answer = sock.recv(4096)
            except socket.timeout:
                pass
    assert answer.startswith(b"HTTP/1.1 408 "), (sent, answer)
    assert answer.endswith(b'{"message":"the request body was not complete within 2 s"}'), answer
    assert b"\r\nConnection: close\r\n" in answer
    assert sent < 100 and served >= 1, (sent, served)
    assert daemon.get("/function/hello").status == 200


def test_symlinks_out_of_functions_are_refused(start_daemon, functions_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.py"
    secret.write_text("SECRET-CONTENT = 1\n")  # a syntax error that would quote the line
    (outside / "app").mkdir()
    (outside / "app" / "handler.py").write_text(HELLO)
    (functions_dir / "leak.py").symlink_to(secret)
    (functions_dir / "linked").symlink_to(outside / "app")
    write_function(functions_dir, "inner/handler.py", HELLO)
    (functions_dir / "alias.py").symlink_to(functions_dir / "inner" / "handler.py")  # inside: fine
    daemon = start_daemon(functions_dir)
    for name in ("leak", "linked"):
        error = daemon.function(name)["load_error"]
        assert "is a symlink to" in error and "outside the functions directory" in error, error
        response = daemon.get(f"/function/{name}")
        assert response.status == 502
        assert b"SECRET-CONTENT" not in response.body
    assert "SECRET-CONTENT" not in daemon.get("/system/functions").text
    assert daemon.function("alias")["load_error"] is None
    assert daemon.get("/function/alias").json() == {"hello": "world"}


# -- the OpenAPI document, checked by Schemathesis ---------------------------------------------

def test_schemathesis_finds_no_server_error(start_daemon, functions_dir, tmp_path):
    write_function(functions_dir, "hello.py", HELLO)
    daemon = start_daemon(functions_dir)
    document = daemon.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    assert "/2015-03-31/functions/{name}/invocations" in document["paths"]
    assert "/2021-11-15/functions/{name}/response-streaming-invocations" in document["paths"]
    # 501 is faasd's deliberate answer to a Lambda API operation it does not
    # serve (PublishVersion is POST on the path of ListVersionsByFunction, and
    # Schemathesis tries every method); any other 5xx is a server error.
    (tmp_path / "schemathesis.toml").write_text(
        '[checks.not_a_server_error]\nexpected-statuses = ["2xx", "3xx", "4xx", "501"]\n')
    done = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", daemon.url + "/openapi.json",
         "--checks", "not_a_server_error", "--max-time", "40", "--workers", "1",
         "--request-timeout", "10", "--seed", "1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "NO_COLOR": "1"})
    summary = done.stdout[-3000:]
    assert done.returncode == 0, summary + done.stderr[-2000:]
    assert "generated" in summary and " passed" in summary
    assert "Traceback" not in daemon.output()


# -- Expect: 100-continue -------------------------------------------------------------------

def expect_continue(daemon, head: bytes, body: bytes | None = None) -> tuple[bytes, bytes]:
    """Send a request's head with `Expect: 100-continue` and no body, as curl and the AWS SDKs
    do, and wait for the first answer; then, if given, send `body` and read the final answer.
    (The first answer, the final one after the body.)"""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n", 1))
        first = sock.recv(65536)
        if body is None:
            return first, b""
        sock.sendall(body)
        rest = b""
        while not (b"\r\n\r\n" in rest and len(rest.split(b"\r\n\r\n", 1)[1]) >= int(
                rest.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])):
            chunk = sock.recv(65536)
            assert chunk, f"closed before the answer was complete: {rest!r}"
            rest += chunk
    return first, rest


def signed_head(daemon, path: str, body: bytes, content_length: int | None = None) -> bytes:
    """The head of a POST of `body` signed by botocore; `content_length` to claim another length."""
    request = AWSRequest(method="POST", url=daemon.url + path, data=body,
                         headers={"Content-Type": "application/json"})
    botocore.auth.SigV4Auth(Credentials(KEY_ID, SECRET), "lambda", "us-east-1").add_auth(request)
    headers = {k: v for k, v in request.prepare().headers.items() if k.lower() != "content-length"}
    length = len(body) if content_length is None else content_length
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{daemon.port}", f"Content-Length: {length}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_expect_100_continue_is_answered_only_after_the_checks_on_the_headers(start_daemon, functions_dir):
    """A request the size or auth check refuses gets its final status, not 100 Continue
    (which would have the client upload a body only to be refused); a request that passes
    them gets 100 Continue, then its answer."""
    write_function(functions_dir, "hello.py", HELLO)
    write_function(functions_dir, "private/handler.py", ECHO_EVENT)
    write_function(functions_dir, "private/function.toml",
                   '[[triggers]]\ntype = "http"\npath = "/private"\nauth = "key"\n')
    daemon = start_daemon(functions_dir, env=KEYS_ENV)
    huge = 7 * 1024 * 1024  # over the 6 MB limit
    post = "POST {} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n{}\r\n"
    refused = [
        (post.format("/function/hello", huge, ""), b"HTTP/1.1 413 "),
        (post.format("/private", 10, ""), b"HTTP/1.1 401 "),
        (post.format("/private", 10, "Authorization: Bearer wrong\r\n"), b"HTTP/1.1 403 "),
        (post.format("/private", huge, f"Authorization: Bearer {SECRET}\r\n"), b"HTTP/1.1 413 "),
        (post.format("/2015-03-31/functions/hello/invocations", 10, ""), b"HTTP/1.1 403 "),
        (post.format("/system/functions/hello/invoke", 10, ""), b"HTTP/1.1 401 "),
    ]
    for head, status in refused:
        first, _ = expect_continue(daemon, head.encode())
        assert first.startswith(status), (head, first[:200])
        # Whether the client then sends its body or not, the connection carries no other request.
        assert b"\r\nConnection: close\r\n" in first, (head, first[:300])
    first, _ = expect_continue(daemon, signed_head(daemon, "/2015-03-31/functions/hello/invocations", b"{}",
                                                   huge))
    assert first.startswith(b"HTTP/1.1 413 ") and b"RequestTooLargeException" in first, first[:300]
    # Accepted on its headers: 100 Continue, then the body, then the answer.
    body = b'{"name": "expect"}'
    first, rest = expect_continue(daemon, post.format("/function/hello", len(body), "").encode(), body)
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n", first
    assert rest.startswith(b"HTTP/1.1 200 "), rest
    first, rest = expect_continue(
        daemon, post.format("/private", len(body), f"Authorization: Bearer {SECRET}\r\n").encode(), body)
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n" and rest.startswith(b"HTTP/1.1 200 "), (first, rest)
    # A signed invocation: 100 Continue comes once the signature's headers passed; the signature
    # itself covers the body, which is then read and checked.
    first, rest = expect_continue(daemon, signed_head(daemon, "/2015-03-31/functions/hello/invocations", body),
                                  body)
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n", first
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b'{"hello": "expect"}'), rest
    assert daemon.get("/function/hello").status == 200
