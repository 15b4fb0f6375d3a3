"""Custom runtimes end to end: real bootstraps (AWS's Python client, sh + curl, Go)
talking to faasd's Lambda Runtime API over loopback."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import (
    EXAMPLES, assert_callers_trace_ids_pass_on, lambda_client, loaded, process_state, request_lines, wait_until,
    write_function,
)


def printed(daemon, name: str, request_id: str) -> list[str]:
    """What the bootstrap printed during one invocation: the lines between START and END."""
    wait_until(lambda: any(line.startswith("REPORT") for line in request_lines(daemon, name, request_id)),
               message="the REPORT line")
    lines = request_lines(daemon, name, request_id)
    start = lines.index(f"START RequestId: {request_id} Version: $LATEST")
    return lines[start + 1:lines.index(f"END RequestId: {request_id}")]


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (CI requires it: .ci/run installs {package})")
        pytest.skip(f"{name} is not installed; apt-get install {package}")
    return path


# -- AWS's Python runtime interface client ------------------------------------------------

RIC_APP = """
import os

COUNT = 0

def handler(event, context):
    global COUNT
    COUNT += 1
    print("ric handler got", event)
    if event.get("fail"):
        raise ValueError("refused by the handler")
    return {"event": event, "count": COUNT, "pid": os.getpid(),
            "request_id": context.aws_request_id, "arn": context.invoked_function_arn,
            "remaining": context.get_remaining_time_in_millis(),
            "function_name": context.function_name, "memory": context.memory_limit_in_mb,
            "runtime_api": os.environ["AWS_LAMBDA_RUNTIME_API"],
            "custom": context.client_context and context.client_context.custom,
            "execution_env": os.environ.get("AWS_EXECUTION_ENV"),
            "trace": os.environ.get("_X_AMZN_TRACE_ID"),
            "faasd_vars": [k for k in os.environ if k.startswith("_FAASD")]}
"""


def ric_bootstrap(module: str) -> str:
    # The venv's python has awslambdaric (the `test` extra).
    return f"#!/bin/sh\nexec {sys.executable} -m awslambdaric {module}.handler\n"


def test_awss_python_runtime_interface_client_runs_unmodified(daemon):
    write_function(daemon.functions, "ric/app.py", RIC_APP)
    write_function(daemon.functions, "ric/bootstrap", ric_bootstrap("app"))
    write_function(daemon.functions, "ric/function.toml", "timeout_s = 5\nmemory_mb = 256\n")
    loaded(daemon, "ric")
    assert daemon.function("ric")["runtime"] == "provided"
    response = daemon.invoke("ric", {"k": "v"})
    assert "x-amz-function-error" not in response.headers, response.text
    body = response.json()
    request_id = response.headers["x-amzn-requestid"]
    assert body["event"] == {"k": "v"} and body["count"] == 1
    assert body["request_id"] == request_id
    assert body["arn"].endswith(":function:ric") and body["function_name"] == "ric"
    assert body["memory"] == "256"
    assert 0 < body["remaining"] <= 5000
    assert re.fullmatch(r"127\.0\.0\.1:\d+", body["runtime_api"])
    assert body["faasd_vars"] == []
    # Lambda's OS-only runtimes (provided.al2023) leave AWS_EXECUTION_ENV unset.
    assert body["execution_env"] is None
    assert body["custom"] is None
    # The client sets _X_AMZN_TRACE_ID from Lambda-Runtime-Trace-Id: the other runtimes' format.
    assert re.fullmatch(r"Root=1-[0-9a-f]{8}-[0-9a-f]{24};Parent=[0-9a-f]{16};Sampled=0", body["trace"])
    assert "ric handler got {'k': 'v'}" in printed(daemon, "ric", request_id)
    # A ClientContext reaches AWS's client as Lambda-Runtime-Client-Context.
    given = {"custom": {"tenant": "blue"}}
    with_context = daemon.invoke("ric", {"k": "cc"}, **{
        "X-Amz-Client-Context": base64.b64encode(json.dumps(given).encode()).decode()})
    assert with_context.json()["custom"] == {"tenant": "blue"}, with_context.text
    [worker] = daemon.workers("ric")
    assert worker["pid"] == body["pid"] and worker["runtime_api"] == body["runtime_api"]

    failed = daemon.invoke("ric", {"fail": True})
    assert failed.headers["x-amz-function-error"] == "Unhandled"
    error = failed.json()
    assert error["errorType"] == "ValueError" and error["errorMessage"] == "refused by the handler"
    assert any("raise ValueError" in frame for frame in error["stackTrace"])
    # The client's own keys too: Lambda passes the posted document on unchanged.
    assert error["requestId"] == failed.headers["x-amzn-requestid"]
    # The client logs the error itself; its \r-joined record reads as lines here.
    assert any(line.startswith("[ERROR] ValueError: refused by the handler")
               for line in printed(daemon, "ric", failed.headers["x-amzn-requestid"]))
    # Same worker, module state kept: a handled error does not cost the runtime.
    again = daemon.invoke("ric", {"k": 2}).json()
    assert again["pid"] == body["pid"] and again["count"] == 4  # the fourth call here
    assert again["trace"] != body["trace"]
    assert daemon.get("/function/ric").status == 200


TRACE_APP = """
import os

def handler(event, context):
    return [os.environ.get("_X_AMZN_TRACE_ID"), (event.get("headers") or {}).get("x-amzn-trace-id")]
"""


def test_the_callers_trace_header_reaches_a_custom_runtime_as_lambda_runtime_trace_id(daemon):
    # AWS's client sets _X_AMZN_TRACE_ID from each event's Lambda-Runtime-Trace-Id.
    write_function(daemon.functions, "rictrace/app.py", TRACE_APP)
    write_function(daemon.functions, "rictrace/bootstrap", ric_bootstrap("app"))
    loaded(daemon, "rictrace")
    assert_callers_trace_ids_pass_on(daemon, "rictrace")


def test_awslambdaric_init_errors_reach_the_caller(daemon):
    write_function(daemon.functions, "ricbad/app.py", "import not_a_module_anywhere\n" + RIC_APP)
    write_function(daemon.functions, "ricbad/bootstrap", ric_bootstrap("app"))
    write_function(daemon.functions, "ricnone/app.py", "def other(event, context):\n    return 1\n")
    write_function(daemon.functions, "ricnone/bootstrap", ric_bootstrap("app"))
    for name, error_type in (("ricbad", "Runtime.ImportModuleError"), ("ricnone", "Runtime.HandlerNotFound")):
        loaded(daemon, name)
        response = daemon.invoke(name)
        assert response.headers["x-amz-function-error"] == "Unhandled"
        assert response.json()["errorType"] == error_type, response.text
        assert daemon.function(name)["init_error"]["errorType"] == error_type
        assert daemon.get(f"/function/{name}").status == 502
        assert f"Error Type: {error_type}" in daemon.log_of(name)
    assert "not_a_module_anywhere" in daemon.invoke("ricbad").json()["errorMessage"]


POSTING_BOOTSTRAP = f"""\
#!{sys.executable}
# Posts, for each event, the error body and type header the event names.
import json, os, urllib.request

API = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime"
if os.environ.get("INIT_ERROR"):
    request = urllib.request.Request(API + "/init/error", data=os.environ["INIT_ERROR"].encode(),
                                     headers={{"Lambda-Runtime-Function-Error-Type": "Runtime.ConfigError"}})
    urllib.request.urlopen(request).read()
    raise SystemExit(1)
while True:
    with urllib.request.urlopen(API + "/invocation/next") as response:
        request_id = response.headers["Lambda-Runtime-Aws-Request-Id"]
        event = json.loads(response.read())
    headers = {{"Lambda-Runtime-Function-Error-Type": event["type"]}} if event.get("type") else {{}}
    request = urllib.request.Request(f"{{API}}/invocation/{{request_id}}/error",
                                     data=event["body"].encode(), headers=headers)
    urllib.request.urlopen(request).read()
"""


def test_a_posted_error_document_reaches_the_caller_unchanged(daemon):
    write_function(daemon.functions, "poster/bootstrap", POSTING_BOOTSTRAP)
    write_function(daemon.functions, "initposter/bootstrap", POSTING_BOOTSTRAP)
    write_function(daemon.functions, "initposter/function.toml",
                   '[env]\nINIT_ERROR = \'{"errorMessage": "DATABASE_URL is not set", "details": {"key": "DATABASE_URL"}}\'\n')
    loaded(daemon, "poster")
    # What AWS's Node runtime interface client posts: `trace`, not stackTrace.
    node = {"errorType": "TypeError", "errorMessage": "kaboom",
            "trace": ["TypeError: kaboom", "    at helper (/var/task/index.js:1:25)"]}
    # And what a handler's own error class may carry besides.
    extra = {"errorType": "DbError", "errorMessage": "no connection", "stackTrace": [],
             "code": "ECONNREFUSED", "details": {"host": "db", "port": 5432}}
    for document, header in ((node, "TypeError"), (extra, None)):
        response = daemon.invoke("poster", {"body": json.dumps(document), "type": header})
        assert response.headers["x-amz-function-error"] == "Unhandled"
        assert response.json() == document
        assert daemon.post("/function/poster", {"body": json.dumps(document)}).status == 502
    # The header types a document that does not say its type; the body is still the caller's.
    untyped = {"errorMessage": "no type in here"}
    response = daemon.invoke("poster", {"body": json.dumps(untyped), "type": "Custom.Untyped"})
    assert response.json() == untyped
    request_id = response.headers["x-amzn-requestid"]
    recorded = next(error for error in daemon.get("/system/activity").json()["recent_errors"]
                    if error["request_id"] == request_id)
    assert recorded["error_type"] == "Custom.Untyped"
    # A body that is not JSON is passed on as it came.
    response = daemon.invoke("poster", {"body": "segfault in module foo", "type": "Runtime.Crash"})
    assert response.headers["x-amz-function-error"] == "Unhandled"
    assert response.body == b"segfault in module foo"

    loaded(daemon, "initposter")
    response = daemon.invoke("initposter")
    assert response.headers["x-amz-function-error"] == "Unhandled"
    assert response.json() == {"errorMessage": "DATABASE_URL is not set", "details": {"key": "DATABASE_URL"}}
    init_error = daemon.function("initposter")["init_error"]
    assert init_error["details"] == {"key": "DATABASE_URL"}
    assert "Error Type: Runtime.ConfigError" in daemon.log_of("initposter")


# -- a shell script with curl, as in AWS's custom runtime tutorial --------------------------

TUTORIAL_BOOTSTRAP = """\
#!/bin/sh
set -eu

# Initialization - load function handler
. "$LAMBDA_TASK_ROOT/$(echo "$_HANDLER" | cut -d. -f1).sh"

# Processing
while true
do
  HEADERS="$(mktemp)"
  # Get an event. The HTTP request will block until one is received
  EVENT_DATA=$(curl -sS -LD "$HEADERS" "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/next")

  # Extract request ID by scraping response headers received above
  REQUEST_ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)

  # Run the handler function from the script
  RESPONSE=$($(echo "$_HANDLER" | cut -d. -f2) "$EVENT_DATA")

  # Send the response
  curl -sS "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/$REQUEST_ID/response" -d "$RESPONSE"
  rm -f "$HEADERS"
done
"""

TUTORIAL_FUNCTION = """\
handler () {
  EVENT_DATA=$1
  echo "$EVENT_DATA" 1>&2;
  RESPONSE="Echoing request: '$EVENT_DATA'"

  echo $RESPONSE
}
"""


def test_a_shell_and_curl_bootstrap_as_in_awss_tutorial(daemon):
    require_tool("curl", "curl")
    write_function(daemon.functions, "tutorial/bootstrap", TUTORIAL_BOOTSTRAP)
    write_function(daemon.functions, "tutorial/function.sh", TUTORIAL_FUNCTION)
    write_function(daemon.functions, "tutorial/function.toml", 'runtime = "provided"\nhandler = "function.handler"\n')
    loaded(daemon, "tutorial")
    for n in (1, 2):
        response = daemon.invoke("tutorial", {"n": n})
        assert response.status == 200 and "x-amz-function-error" not in response.headers
        # The tutorial answers with text, not JSON; the Invoke API passes it through.
        assert response.text == f"Echoing request: '{{\"n\": {n}}}'"
        # The handler's stderr; curl's output before it has no newline, so it shares the line.
        lines = printed(daemon, "tutorial", response.headers["x-amzn-requestid"])
        assert any(line.endswith(f'{{"n": {n}}}') for line in lines), lines
    # The tutorial's response POST prints RAPID's 202 body: the API answered as Lambda's does.
    assert '{"status":"OK"}' in daemon.log_of("tutorial")


ARN_BOOTSTRAP = """\
#!/bin/sh
set -eu
api="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true
do
  headers="$(mktemp)"
  curl -sS -o /dev/null -D "$headers" "$api/invocation/next"
  id=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$headers" | tr -d '[:space:]' | cut -d: -f2)
  arn=$(grep -Fi Lambda-Runtime-Invoked-Function-Arn "$headers" | cut -d' ' -f2 | tr -d '[:space:]')
  curl -sS -o /dev/null "$api/invocation/$id/response" -d "\\"$arn\\""
  rm -f "$headers"
done
"""


def test_the_invoked_function_arn_header_carries_the_callers_qualifier(daemon):
    require_tool("curl", "curl")
    write_function(daemon.functions, "shellarn/bootstrap", ARN_BOOTSTRAP)
    loaded(daemon, "shellarn")
    arn = "arn:aws:lambda:us-east-1:000000000000:function:shellarn"
    assert daemon.invoke("shellarn:$LATEST").json() == f"{arn}:$LATEST"
    assert daemon.invoke("shellarn").json() == arn
    assert daemon.get("/function/shellarn").json() == arn


def test_only_the_workers_own_user_reaches_its_runtime_api(daemon):
    """Loopback is every local user's: another user asking for the next event is refused."""
    curl = require_tool("curl", "curl")
    if os.geteuid() != 0:
        pytest.skip("connecting as another user needs root")
    write_function(daemon.functions, "tutorial/bootstrap", TUTORIAL_BOOTSTRAP)
    write_function(daemon.functions, "tutorial/function.sh", TUTORIAL_FUNCTION)
    write_function(daemon.functions, "tutorial/function.toml", 'runtime = "provided"\nhandler = "function.handler"\n')
    loaded(daemon, "tutorial")
    assert daemon.invoke("tutorial", {"n": 1}).status == 200
    address = daemon.workers("tutorial")[0]["runtime_api"]
    nobody = subprocess.run([curl, "-sS", "-m", "5", "-w", "\n%{http_code}",
                             f"http://{address}/2018-06-01/runtime/invocation/next"],
                            user=65534, group=65534, extra_groups=[], cwd="/",
                            capture_output=True, text=True, timeout=30)
    body, status = nobody.stdout.rsplit("\n", 1)
    assert status == "403", (nobody.stdout, nobody.stderr)
    assert json.loads(body) == {"errorType": "AccessDenied",
                                "errorMessage": "this Runtime API serves only its own worker's processes"}
    assert "refused a connection from uid 65534" in daemon.output()
    # The bootstrap's own polls still get their events.
    response = daemon.invoke("tutorial", {"n": 2})
    assert response.status == 200 and response.text == "Echoing request: '{\"n\": 2}'"


THIEF = """
import json, urllib.error, urllib.request

def handler(event, context):
    try:
        with urllib.request.urlopen(f"http://{event['api']}/2018-06-01/runtime/invocation/next",
                                    timeout=5) as response:
            return {"status": response.status}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": json.loads(exc.read())}
"""


def test_other_processes_of_the_workers_user_are_refused_too(daemon):
    """Workers of every function run as one user: the socket must be the worker's own."""
    curl = require_tool("curl", "curl")
    write_function(daemon.functions, "tutorial/bootstrap", TUTORIAL_BOOTSTRAP)
    write_function(daemon.functions, "tutorial/function.sh", TUTORIAL_FUNCTION)
    write_function(daemon.functions, "tutorial/function.toml", 'runtime = "provided"\nhandler = "function.handler"\n')
    write_function(daemon.functions, "thief.py", THIEF)
    loaded(daemon, "tutorial")
    loaded(daemon, "thief")
    assert daemon.invoke("tutorial", {"n": 1}).status == 200
    worker = daemon.workers("tutorial")[0]
    denied = {"errorType": "AccessDenied",
              "errorMessage": "this Runtime API serves only its own worker's processes"}
    # Another function's worker, as the same user.
    stolen = daemon.invoke("thief", {"api": worker["runtime_api"]}).json()
    assert stolen == {"status": 403, "body": denied}, stolen
    # Any other process of that user: this test's own.
    assert os.stat(f"/proc/{worker['pid']}").st_uid == os.geteuid()
    own = subprocess.run([curl, "-sS", "-m", "5", "-w", "\n%{http_code}",
                          f"http://{worker['runtime_api']}/2018-06-01/runtime/invocation/next"],
                         capture_output=True, text=True, timeout=30)
    body, status = own.stdout.rsplit("\n", 1)
    assert status == "403" and json.loads(body) == denied, (own.stdout, own.stderr)
    assert "that is not the worker's" in daemon.output()
    # The bootstrap (and the curl it runs for each poll) still gets its events.
    response = daemon.invoke("tutorial", {"n": 2})
    assert response.status == 200 and response.text == "Echoing request: '{\"n\": 2}'"


# -- a compiled bootstrap: Go, standard library only -------------------------------------------

GO_BOOTSTRAP = r"""
// A custom runtime in Go with the standard library only: the Runtime API loop.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

func main() {
	api := "http://" + os.Getenv("AWS_LAMBDA_RUNTIME_API") + "/2018-06-01/runtime"
	for {
		resp, err := http.Get(api + "/invocation/next")
		if err != nil {
			fmt.Fprintln(os.Stderr, "next:", err)
			os.Exit(1)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		id := resp.Header.Get("Lambda-Runtime-Aws-Request-Id")
		var event map[string]interface{}
		json.Unmarshal(body, &event)
		if text, ok := event["body"].(string); ok { // an HTTP request: its body says what to do
			var inner map[string]interface{}
			if json.Unmarshal([]byte(text), &inner) == nil {
				event = inner
			}
		}
		fmt.Println("go handling", id)
		switch {
		case event["fail"] != nil:
			post(api+"/invocation/"+id+"/error", map[string]interface{}{
				"errorType": "GoError", "errorMessage": fmt.Sprint(event["fail"]),
				"stackTrace": []string{"main.go:42"}})
		case event["big"] != nil:
			post(api+"/invocation/"+id+"/response", strings.Repeat("x", 7*1024*1024))
		case event["hang"] != nil:
			time.Sleep(time.Hour)
		case event["exit"] != nil:
			os.Exit(3)
		case event["hog"] != nil:
			var blocks [][]byte
			for i := 0; i < 64; i++ {
				block := make([]byte, 8*1024*1024)
				for j := range block {
					block[j] = 1
				}
				blocks = append(blocks, block)
			}
			post(api+"/invocation/"+id+"/response", len(blocks))
		default:
			file := filepath.Join(os.TempDir(), "seen")
			_, statErr := os.Stat(file)
			os.WriteFile(file, []byte("x"), 0o600)
			var faasdVars []string
			for _, kv := range os.Environ() {
				if strings.HasPrefix(kv, "_FAASD") {
					faasdVars = append(faasdVars, kv)
				}
			}
			post(api+"/invocation/"+id+"/response", map[string]interface{}{
				"echo": event, "requestId": id, "pid": os.Getpid(),
				"deadline": resp.Header.Get("Lambda-Runtime-Deadline-Ms"),
				"arn": resp.Header.Get("Lambda-Runtime-Invoked-Function-Arn"),
				"trace": resp.Header.Get("Lambda-Runtime-Trace-Id"),
				"tmpdir": os.TempDir(), "tmpExisted": statErr == nil, "faasdVars": faasdVars,
			})
		}
	}
}

func post(url string, value interface{}) {
	data, _ := json.Marshal(value)
	resp, err := http.Post(url, "application/json", bytes.NewReader(data))
	if err != nil {
		fmt.Fprintln(os.Stderr, "post:", err)
		os.Exit(1)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		fmt.Fprintln(os.Stderr, "runtime API refused the post:", resp.Status)
		os.Exit(2)
	}
}
"""


@pytest.fixture(scope="module")
def go_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go bootstrap, compiled once for this module's tests."""
    go = require_tool("go", "golang-go")
    build = tmp_path_factory.mktemp("go-bootstrap")
    (build / "main.go").write_text(GO_BOOTSTRAP)
    env = dict(os.environ)
    if not env.get("HOME") or not os.access(env["HOME"], os.W_OK):
        env["GOCACHE"] = str(build / "cache")
    subprocess.run([go, "build", "-o", "bootstrap", "main.go"], cwd=build, env=env, check=True,
                   capture_output=True, timeout=600)
    return build / "bootstrap"


def go_function(daemon, go_bootstrap: Path, name: str, toml: str = "") -> None:
    target = daemon.functions / name
    target.mkdir()
    if toml:
        (target / "function.toml").write_text(toml)
    shutil.copy(go_bootstrap, target / ".bootstrap.tmp")
    os.replace(target / ".bootstrap.tmp", target / "bootstrap")
    loaded(daemon, name)


def test_a_compiled_go_bootstrap_gets_the_runtime_api_headers(daemon, go_bootstrap):
    go_function(daemon, go_bootstrap, "gofn", "timeout_s = 4\n")
    before = time.time() * 1000
    response = daemon.invoke("gofn", {"hello": "go"})
    body = response.json()
    request_id = response.headers["x-amzn-requestid"]
    assert body["echo"] == {"hello": "go"} and body["requestId"] == request_id
    assert before < int(body["deadline"]) <= time.time() * 1000 + 4000
    assert body["arn"].endswith(":function:gofn")
    assert re.fullmatch(r"Root=1-[0-9a-f]{8}-[0-9a-f]{24};Parent=[0-9a-f]{16};Sampled=0", body["trace"])
    assert body["faasdVars"] is None
    assert printed(daemon, "gofn", request_id) == [f"go handling {request_id}"]

    error = daemon.invoke("gofn", {"fail": "bad input"})
    assert error.headers["x-amz-function-error"] == "Unhandled"
    assert error.json() == {"errorType": "GoError", "errorMessage": "bad input", "stackTrace": ["main.go:42"]}
    assert daemon.post("/function/gofn", {"fail": 1}).status == 502
    assert daemon.invoke("gofn").json()["pid"] == body["pid"]  # handled errors keep the worker


def test_provided_workers_freeze_thaw_and_keep_their_tmp(start_daemon, functions_dir, go_bootstrap):
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_FREEZE_AFTER_MS": "50"})
    go_function(daemon, go_bootstrap, "gofn")
    first = daemon.invoke("gofn").json()
    assert first["tmpExisted"] is False
    wait_until(lambda: process_state(first["pid"]) == "T", message="the idle bootstrap to be stopped")
    assert daemon.workers("gofn")[0]["state"] == "frozen"
    second = daemon.invoke("gofn").json()
    assert second["pid"] == first["pid"] and second["tmpExisted"] is True
    wait_until(lambda: process_state(first["pid"]) == "T", message="the bootstrap to freeze again")


def test_a_response_over_6_mb_is_function_response_size_too_large_and_the_worker_replaced(daemon, go_bootstrap):
    go_function(daemon, go_bootstrap, "gofn", "timeout_s = 10\n")
    pid = daemon.invoke("gofn").json()["pid"]
    response = daemon.invoke("gofn", {"big": True})
    assert response.headers["x-amz-function-error"] == "Unhandled"
    error = response.json()
    assert error["errorType"] == "Function.ResponseSizeTooLarge"
    assert error["errorMessage"] == "Response payload size exceeded maximum allowed payload size (6291556 bytes)."
    assert daemon.post("/function/gofn", {"big": True}).status == 502
    wait_until(lambda: process_state(pid) is None, message="the worker to be replaced")
    assert daemon.invoke("gofn").json()["pid"] != pid


def test_a_bootstrap_that_hangs_times_out_and_one_that_exits_is_an_exit_error(daemon, go_bootstrap):
    go_function(daemon, go_bootstrap, "gofn", "timeout_s = 1\n")
    pid = daemon.invoke("gofn").json()["pid"]
    response = daemon.post("/function/gofn", {"hang": True})
    assert response.status == 504
    error = daemon.invoke("gofn", {"hang": True}).json()
    assert error["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in error["errorMessage"]
    assert "Status: timeout" in daemon.log_of("gofn")
    assert process_state(pid) in (None, "Z")
    replaced = daemon.invoke("gofn").json()["pid"]
    assert replaced != pid

    crashed = daemon.invoke("gofn", {"exit": True}).json()
    assert crashed["errorType"] == "Runtime.ExitError"
    assert "exit status 3" in crashed["errorMessage"]
    assert daemon.invoke("gofn").json()["pid"] not in (pid, replaced)


def test_a_bootstrap_over_its_memory_limit_is_out_of_memory(daemon, go_bootstrap):
    go_function(daemon, go_bootstrap, "gofn", "memory_mb = 64\ntimeout_s = 20\n")
    pid = daemon.invoke("gofn").json()["pid"]
    error = daemon.invoke("gofn", {"hog": True}).json()
    assert error["errorType"] == "Runtime.OutOfMemory", error
    assert "64 MB" in error["errorMessage"]
    assert daemon.invoke("gofn").json()["pid"] != pid


def test_init_failures_are_reported_with_lambdas_error_types(daemon):
    functions = daemon.functions
    write_function(functions, "exits/bootstrap", "#!/bin/sh\necho 'cannot start: no config' >&2\nexit 3\n")
    write_function(functions, "posts/bootstrap", """\
        #!/bin/sh
        curl -sS -X POST "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/init/error" \\
          -H 'Lambda-Runtime-Function-Error-Type: Runtime.ConfigError' \\
          -d '{"errorType": "Runtime.ConfigError", "errorMessage": "DATABASE_URL is not set"}'
        exit 1
    """)
    write_function(functions, "noshebang/bootstrap", "echo this script has no interpreter line\n")
    write_function(functions, "quits/bootstrap", "#!/bin/sh\necho 'nothing to do'\nexit 0\n")
    expectations = {
        "exits": ("Runtime.ExitError", "exit status 3"),
        # Exit status 0 is no reason at all, in Lambda's words.
        "quits": ("Runtime.ExitError", "Runtime exited without providing a reason"),
        "posts": ("Runtime.ConfigError", "DATABASE_URL is not set"),
        "noshebang": ("Runtime.InvalidEntrypoint", "exec format error"),
    }
    if shutil.which("curl") is None:
        del expectations["posts"]
    for name, (error_type, message) in expectations.items():
        loaded(daemon, name)
        response = daemon.invoke(name)
        error = response.json()
        assert response.headers["x-amz-function-error"] == "Unhandled", name
        assert error["errorType"] == error_type and message in error["errorMessage"], (name, error)
        assert daemon.function(name)["init_error"]["errorType"] == error_type
    assert "cannot start: no config" in daemon.log_of("exits")


def test_a_bootstrap_that_exits_0_mid_invocation_exited_without_providing_a_reason(daemon):
    require_tool("curl", "curl")
    write_function(daemon.functions, "quitter/bootstrap", """\
        #!/bin/sh
        curl -sS -o /dev/null "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/invocation/next"
        exit 0
    """)
    loaded(daemon, "quitter")
    response = daemon.invoke("quitter")
    assert response.headers["x-amz-function-error"] == "Unhandled"
    request_id = response.headers["x-amzn-requestid"]
    assert response.json()["errorType"] == "Runtime.ExitError"
    assert response.json()["errorMessage"] == (
        f"RequestId: {request_id} Error: Runtime exited without providing a reason")


# Streams its response as AWS's Node client does for a streamified handler: chunked, in
# Lambda-Runtime-Function-Response-Mode streaming, an error mid-stream sent as trailers.
STREAMING_BOOTSTRAP = """\
#!{python}
import base64, json, os, socket

host, port = os.environ["AWS_LAMBDA_RUNTIME_API"].split(":")
api = socket.create_connection((host, int(port)))
reader = api.makefile("rb")

def answer():
    status = reader.readline()
    length = 0
    while (line := reader.readline()) != b"\\r\\n":
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, {{}}, reader.read(length)

while True:
    api.sendall(b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\\r\\nHost: api\\r\\n\\r\\n")
    status = reader.readline()
    headers, length = {{}}, 0
    while (line := reader.readline()) != b"\\r\\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    event = json.loads(reader.read(int(headers["content-length"])))
    request_id = headers["lambda-runtime-aws-request-id"]
    parts = [b"part one, ", b"part two"]
    trailers = b""
    if event.get("fail"):
        parts = parts[:1]
        error = {{"errorType": "RangeError", "errorMessage": "mid-stream failure", "trace": ["RangeError: x"]}}
        trailers = (b"Lambda-Runtime-Function-Error-Type: RangeError\\r\\n"
                    b"Lambda-Runtime-Function-Error-Body: " + base64.b64encode(json.dumps(error).encode()) + b"\\r\\n")
    body = b"".join(b"%x\\r\\n%s\\r\\n" % (len(part), part) for part in parts)
    api.sendall(b"POST /2018-06-01/runtime/invocation/" + request_id.encode() + b"/response HTTP/1.1\\r\\n"
                b"Host: api\\r\\nLambda-Runtime-Function-Response-Mode: streaming\\r\\n"
                b"Transfer-Encoding: chunked\\r\\nContent-Type: text/plain\\r\\n"
                b"Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\\r\\n\\r\\n"
                + body + b"0\\r\\n" + trailers + b"\\r\\n")
    print("posted:", answer()[0].decode().strip(), flush=True)
"""


def test_an_error_a_streamed_response_ends_with_fails_the_invocation(daemon):
    write_function(daemon.functions, "streamer/bootstrap", STREAMING_BOOTSTRAP.format(python=sys.executable))
    loaded(daemon, "streamer")
    streamed = daemon.invoke("streamer")
    assert "x-amz-function-error" not in streamed.headers, streamed.text
    assert streamed.body == b"part one, part two"
    failed = daemon.invoke("streamer", {"fail": True})
    assert failed.headers.get("x-amz-function-error") == "Unhandled", failed.text
    assert failed.json() == {"errorType": "RangeError", "errorMessage": "mid-stream failure",
                             "trace": ["RangeError: x"]}
    assert daemon.invoke("streamer").body == b"part one, part two"  # the same worker goes on


# Streams as AWS's Node client does, one chunk at a time: the first, then (after the probe's
# gate named in the event opens) the second, or an error in the trailers; or `size` bytes.
GATED_STREAMING_BOOTSTRAP = """\
#!{python}
import base64, json, os, socket, urllib.request

host, port = os.environ["AWS_LAMBDA_RUNTIME_API"].split(":")
api = socket.create_connection((host, int(port)))
reader = api.makefile("rb")

def head():
    reader.readline()
    headers = {{}}
    while (line := reader.readline()) != b"\\r\\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers

def chunk(data):
    api.sendall(b"%x\\r\\n%s\\r\\n" % (len(data), data))

while True:
    api.sendall(b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\\r\\nHost: api\\r\\n\\r\\n")
    headers = head()
    event = json.loads(reader.read(int(headers["content-length"])))
    request_id = headers["lambda-runtime-aws-request-id"]
    api.sendall(b"POST /2018-06-01/runtime/invocation/" + request_id.encode() + b"/response HTTP/1.1\\r\\n"
                b"Host: api\\r\\nLambda-Runtime-Function-Response-Mode: streaming\\r\\n"
                b"Transfer-Encoding: chunked\\r\\nContent-Type: text/plain\\r\\n"
                b"Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\\r\\n\\r\\n")
    trailers = b""
    if event.get("size"):
        for _ in range(event["size"] // 65536):
            chunk(b"z" * 65536)
    else:
        chunk(b"first chunk;")
        urllib.request.urlopen(os.environ["PROBE"] + "/gate/" + event["gate"], timeout=60).read()
        if event.get("fail"):
            error = {{"errorType": "RangeError", "errorMessage": "broke mid-stream", "trace": []}}
            trailers = (b"Lambda-Runtime-Function-Error-Type: RangeError\\r\\n"
                        b"Lambda-Runtime-Function-Error-Body: " + base64.b64encode(json.dumps(error).encode())
                        + b"\\r\\n")
        else:
            chunk(b"second chunk")
    api.sendall(b"0\\r\\n" + trailers + b"\\r\\n")
    length = int(head().get("content-length", 0))
    reader.read(length)
"""


def test_a_streamed_post_reaches_a_streaming_caller_chunk_by_chunk_then_its_error(daemon):
    from probe import Probe

    probe = Probe()
    try:
        write_function(daemon.functions, "gated/bootstrap", GATED_STREAMING_BOOTSTRAP.format(python=sys.executable))
        write_function(daemon.functions, "gated/function.toml",
                       f'timeout_s = 60\nmemory_mb = 256\n[env]\nPROBE = "{probe.url}"\n')
        loaded(daemon, "gated")
        lam = lambda_client(daemon.url)
        events = iter(lam.invoke_with_response_stream(FunctionName="gated", Payload=b'{"gate": "g1"}')["EventStream"])
        # The bootstrap waits on a gate only this test opens: its first chunk came first.
        assert next(events) == {"PayloadChunk": {"Payload": b"first chunk;"}}
        probe.release("g1")
        *chunks, complete = list(events)
        assert complete == {"InvokeComplete": {}}
        assert b"".join(c["PayloadChunk"]["Payload"] for c in chunks) == b"second chunk"

        events = iter(lam.invoke_with_response_stream(
            FunctionName="gated", Payload=b'{"gate": "g2", "fail": true}')["EventStream"])
        assert next(events) == {"PayloadChunk": {"Payload": b"first chunk;"}}
        probe.release("g2")
        [complete] = list(events)
        assert complete["InvokeComplete"]["ErrorCode"] == "RangeError"
        assert json.loads(complete["InvokeComplete"]["ErrorDetails"])["errorMessage"] == "broke mid-stream"

        # Past the 6 MB of a buffered response: streamed whole; Invoke refuses it.
        size = 100 * 65536
        *chunks, complete = list(lam.invoke_with_response_stream(
            FunctionName="gated", Payload=json.dumps({"size": size}).encode())["EventStream"])
        assert complete == {"InvokeComplete": {}}
        assert sum(len(c["PayloadChunk"]["Payload"]) for c in chunks) == size
        failed = daemon.invoke("gated", {"size": size})
        assert failed.json()["errorType"] == "Function.ResponseSizeTooLarge", failed.text
    finally:
        probe.close()


def test_a_bootstrap_that_never_polls_fails_init_with_a_timeout(daemon):
    write_function(daemon.functions, "sleepy/bootstrap", "#!/bin/sh\necho 'thinking'\nexec sleep 300\n")
    loaded(daemon, "sleepy")
    started = time.monotonic()
    response = daemon.invoke("sleepy")
    assert time.monotonic() - started >= 9  # Lambda's 10 s init limit
    error = response.json()
    assert response.headers["x-amz-function-error"] == "Unhandled"
    assert error["errorType"] == "Sandbox.Timedout"
    assert "Init timed out after 10.00 seconds" in error["errorMessage"]
    assert "never asked for an event" in error["errorMessage"]
    assert daemon.workers("sleepy") == []
    assert "thinking" in daemon.log_of("sleepy")


# A bootstrap's way to the Runtime API: call() answers (status, headers, body), errors included.
RUNTIME_API_CALL = """\
import json, os, urllib.error, urllib.request

API = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime"

def call(method, path, body=None):
    request = urllib.request.Request(API + path, data=body, method=method)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()
"""


PROBE_BOOTSTRAP = f"""\
#!{sys.executable}
# Calls the Runtime API out of order and reports how it answered.
""" + RUNTIME_API_CALL + """
status, headers, event = call("GET", "/invocation/next")
request_id = headers["Lambda-Runtime-Aws-Request-Id"]
seen = {}
for name, method, path, body in [
    ("wrong_id", "POST", "/invocation/not-this-one/response", b"1"),
    ("next_in_flight", "GET", "/invocation/next", None),
    ("init_error_late", "POST", "/init/error", b"{}"),
    ("unknown_path", "GET", "/nowhere", None),
]:
    code, _, answer = call(method, path, body)
    seen[name] = [code, json.loads(answer).get("errorType")]
seen["event"] = json.loads(event)
status, _, answer = call("POST", f"/invocation/{request_id}/response", json.dumps(seen).encode())
print("response accepted:", status, answer.decode(), flush=True)
status, _, answer = call("POST", f"/invocation/{request_id}/response", b"twice")
print("second response:", status, json.loads(answer)["errorType"], flush=True)
call("GET", "/invocation/next")
"""


def test_the_runtime_api_refuses_calls_out_of_order_as_rapid_does(daemon):
    write_function(daemon.functions, "probe/bootstrap", PROBE_BOOTSTRAP)
    loaded(daemon, "probe")
    response = daemon.invoke("probe", {"probe": 1})
    assert response.json() == {
        "wrong_id": [400, "InvalidRequestID"],
        "next_in_flight": [403, "InvalidStateTransition"],
        "init_error_late": [403, "InvalidStateTransition"],
        "unknown_path": [404, "NotFound"],
        "event": {"probe": 1},
    }
    # Printed after the invocation ended: the daemon's own log has it.
    wait_until(lambda: "second response: 403 InvalidStateTransition" in daemon.output(),
               message="the probe's report of a second response")
    assert 'response accepted: 202 {"status":"OK"}' in daemon.output()


REPLY_TWICE_BOOTSTRAP = f"""\
#!{sys.executable}
# Replies out of turn: before its first /next, and again after each response.
""" + RUNTIME_API_CALL + """
def answer(method, path, body):
    code, _, text = call(method, path, body)
    return [code, json.loads(text).get("errorType")]

seen = {"before_next": answer("POST", "/invocation/never-issued/response", b"1")}
while True:
    _, headers, _ = call("GET", "/invocation/next")
    request_id = headers["Lambda-Runtime-Aws-Request-Id"]
    call("POST", f"/invocation/{request_id}/response", json.dumps(seen).encode())
    seen = {
        "second_response": answer("POST", f"/invocation/{request_id}/response", b"2"),
        "error_after_response": answer("POST", f"/invocation/{request_id}/error", b"{}"),
        "never_issued": answer("POST", "/invocation/never-issued/response", b"3"),
    }
"""


def test_a_reply_before_the_first_next_or_after_the_response_is_an_invalid_state_transition(daemon):
    write_function(daemon.functions, "twice/bootstrap", REPLY_TWICE_BOOTSTRAP)
    loaded(daemon, "twice")
    # Each call returns what the API answered the replies out of turn before it.
    assert daemon.invoke("twice").json() == {"before_next": [403, "InvalidStateTransition"]}
    assert daemon.invoke("twice").json() == {
        "second_response": [403, "InvalidStateTransition"],
        "error_after_response": [403, "InvalidStateTransition"],
        "never_issued": [400, "InvalidRequestID"],
    }


def test_the_custom_runtime_example_answers(start_daemon, tmp_path):
    require_tool("curl", "curl")
    functions = tmp_path / "examples"
    shutil.copytree(EXAMPLES / "hello-sh", functions / "hello-sh")
    daemon = start_daemon(functions)
    response = daemon.get("/function/hello-sh?name=shell")
    assert response.status == 200, response.text
    assert response.text == "Hello, shell!\n"
    assert response.headers["content-type"].startswith("text/plain")
    assert json.loads(daemon.invoke("hello-sh", {"queryStringParameters": {"name": "api"}}).body) == {
        "statusCode": 200, "headers": {"content-type": "text/plain"}, "body": "Hello, api!\n"}
    wait_until(lambda: "saying hello to shell" in daemon.log_of("hello-sh"), message="the example's log line")
