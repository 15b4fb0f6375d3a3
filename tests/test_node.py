"""Node.js functions end to end: a real daemon, real `node` workers, real HTTP over loopback."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import (
    EXAMPLES, ROOT, assert_callers_trace_ids_pass_on, assert_own_trace_ids, lambda_client, loaded, max_memory_used,
    process_state, report_of, request_lines, wait_until, write_function,
)

NODE = shutil.which("node")


@pytest.fixture(autouse=True)
def node_installed(request: pytest.FixtureRequest) -> None:
    """Node tests need the machine's `node`: CI installs it (.ci/run); elsewhere they skip."""
    if request.node.get_closest_marker("without_node") or NODE is not None:
        return
    if os.environ.get("CI"):
        pytest.fail("node is not installed (CI requires it: .ci/run installs nodejs)")
    pytest.skip("node is not installed; apt-get install nodejs")


def test_commonjs_esm_and_directory_handlers_in_every_style(daemon):
    functions = daemon.functions
    write_function(functions, "asyncjs.js", """
        exports.handler = async (event) => ({ style: "async", n: event.n });
    """)
    write_function(functions, "esm.mjs", """
        import { basename } from "node:path";
        export const handler = async (event) => ({ style: "esm", n: event.n, file: basename(import.meta.url) });
    """)
    write_function(functions, "promise.js", """
        module.exports.handler = (event) =>
          new Promise((resolve) => setTimeout(() => resolve({ style: "promise", n: event.n }), 10));
    """)
    write_function(functions, "callback.js", """
        exports.handler = (event, context, callback) => {
          setTimeout(() => callback(null, { style: "callback", n: event.n }), 10);
        };
    """)
    write_function(functions, "succeed.js", """
        exports.handler = (event, context) => { context.succeed({ style: "succeed", n: event.n }); };
    """)
    write_function(functions, "nothing.js", """
        exports.handler = (event) => { return "ignored, as on Lambda"; };
    """)
    # A directory of ES modules (package.json "type": "module"), with a helper module.
    write_function(functions, "esmdir/package.json", '{"type": "module"}')
    write_function(functions, "esmdir/lib.js", "export const double = (n) => n * 2;\n")
    write_function(functions, "esmdir/index.js", """
        import { double } from "./lib.js";
        export async function handler(event) { return { style: "esmdir", n: double(event.n) }; }
    """)
    # A CommonJS directory with the handler in a subdirectory, named in function.toml.
    write_function(functions, "cjsdir/src/util.js", "exports.triple = (n) => n * 3;\n")
    write_function(functions, "cjsdir/src/app.js", """
        const { triple } = require("./util");
        exports.api = { handler: async (event) => ({ style: "cjsdir", n: triple(event.n) }) };
    """)
    write_function(functions, "cjsdir/function.toml", 'runtime = "node"\nhandler = "src/app.api.handler"\n')
    expected = {
        "asyncjs": {"style": "async", "n": 7},
        "esm": {"style": "esm", "n": 7, "file": "esm.mjs"},
        "promise": {"style": "promise", "n": 7},
        "callback": {"style": "callback", "n": 7},
        "succeed": {"style": "succeed", "n": 7},
        "nothing": None,
        "esmdir": {"style": "esmdir", "n": 14},
        "cjsdir": {"style": "cjsdir", "n": 21},
    }
    for name, result in expected.items():
        loaded(daemon, name)
        response = daemon.invoke(name, {"n": 7})
        assert response.status == 200, (name, response.text)
        assert "x-amz-function-error" not in response.headers, (name, response.text)
        assert response.json() == result, name
        assert daemon.function(name)["runtime"] == "node"


def test_cjs_files_are_node_functions_as_js_and_mjs_are(daemon):
    functions = daemon.functions
    # Under a package.json that makes .js files ES modules, .cjs stays CommonJS.
    write_function(functions, "package.json", '{"type": "module"}')
    write_function(functions, "plain.cjs", """
        const { basename } = require("path");
        exports.handler = async (event) => ({ n: event.n, file: basename(__filename) });
    """)
    write_function(functions, "cjsindex/index.cjs", """
        exports.handler = (event, context, callback) => callback(null, { n: event.n * 2 });
    """)
    loaded(daemon, "plain")
    loaded(daemon, "cjsindex")
    assert daemon.invoke("plain", {"n": 3}).json() == {"n": 3, "file": "plain.cjs"}
    assert daemon.invoke("cjsindex", {"n": 3}).json() == {"n": 6}
    for name in ("plain", "cjsindex"):
        assert daemon.function(name)["runtime"] == "node"
        assert daemon.function(name)["load_error"] is None
    assert daemon.get("/function/plain").status == 200


def test_context_and_environment_are_lambdas(start_daemon, functions_dir):
    write_function(functions_dir, "ctx.js", """
        exports.handler = async (event, context) => ({
          env: process.env,
          ctx: {
            functionName: context.functionName, functionVersion: context.functionVersion,
            invokedFunctionArn: context.invokedFunctionArn, memoryLimitInMB: context.memoryLimitInMB,
            awsRequestId: context.awsRequestId, logGroupName: context.logGroupName,
            remaining: context.getRemainingTimeInMillis(),
            waits: context.callbackWaitsForEmptyEventLoop,
            // As on Lambda: there, and undefined unless the function uses tenant isolation.
            tenantId: "tenantId" in context ? String(context.tenantId) : "absent",
          },
        });
    """)
    write_function(functions_dir, "ctx.toml", 'memory_mb = 256\ntimeout_s = 5\n[env]\nGREETING = "hi"\n')
    daemon = start_daemon(functions_dir, env={"DAEMON_SECRET": "s3cr3t"})
    response = daemon.invoke("ctx")
    body = response.json()
    env, ctx = body["env"], body["ctx"]
    assert ctx == {
        "functionName": "ctx", "functionVersion": "$LATEST",
        "invokedFunctionArn": ctx["invokedFunctionArn"], "memoryLimitInMB": "256",
        "awsRequestId": response.headers["x-amzn-requestid"], "logGroupName": "/aws/lambda/ctx",
        "remaining": ctx["remaining"], "waits": True, "tenantId": "undefined",
    }
    assert ctx["invokedFunctionArn"].endswith(":function:ctx")
    assert 0 < ctx["remaining"] <= 5000
    assert env["GREETING"] == "hi" and env["_HANDLER"] == "ctx.handler"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256"
    runtime = daemon.get("/2015-03-31/functions/ctx").json()["Configuration"]["Runtime"]
    # The Node.js that runs it: nodejs20.x for node v20, nodejs22.x for v22.
    major = subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout.strip()[1:].split(".")[0]
    assert runtime == f"nodejs{major}.x" and env["AWS_EXECUTION_ENV"] == f"AWS_Lambda_{runtime}"
    assert env["LAMBDA_TASK_ROOT"] == str(functions_dir)
    assert Path(env["TMPDIR"]).is_dir()
    assert "DAEMON_SECRET" not in env
    assert not any(key.startswith("_FAASD") for key in env)


def test_each_call_has_an_xray_trace_id_of_its_own_in_lambdas_format(daemon):
    write_function(daemon.functions, "tracejs.js", """
        exports.handler = async () => process.env._X_AMZN_TRACE_ID;
    """)
    loaded(daemon, "tracejs")
    assert_own_trace_ids(daemon, "tracejs")


def test_the_callers_trace_header_is_the_one_a_node_handler_runs_under(daemon):
    write_function(daemon.functions, "passjs.js", """
        exports.handler = async (event) =>
          [process.env._X_AMZN_TRACE_ID, (event.headers || {})["x-amzn-trace-id"] ?? null];
    """)
    loaded(daemon, "passjs")
    assert_callers_trace_ids_pass_on(daemon, "passjs")


def test_client_context_is_context_client_context(daemon):
    write_function(daemon.functions, "nodecc.js", """
        exports.handler = async (event, context) => ({
          cc: context.clientContext === undefined ? "undefined" : context.clientContext,
        });
    """)
    loaded(daemon, "nodecc")
    given = {"custom": {"tenant": "blue"}, "client": {"app_title": "shop"}}
    response = daemon.post("/2015-03-31/functions/nodecc/invocations", "{}", headers={
        "Content-Type": "application/json",
        "X-Amz-Client-Context": base64.b64encode(json.dumps(given).encode()).decode()})
    assert response.status == 200, response.text
    assert response.json() == {"cc": given}
    assert daemon.invoke("nodecc").json() == {"cc": "undefined"}

def test_context_invoked_function_arn_carries_the_callers_qualifier(daemon):
    write_function(daemon.functions, "nodearn.js", """
        exports.handler = async (event, context) => context.invokedFunctionArn;
    """)
    loaded(daemon, "nodearn")
    arn = "arn:aws:lambda:us-east-1:000000000000:function:nodearn"
    assert daemon.invoke("nodearn:$LATEST").json() == f"{arn}:$LATEST"
    assert daemon.invoke(f"{arn}:$LATEST").json() == f"{arn}:$LATEST"
    assert daemon.invoke("nodearn").json() == arn
    assert daemon.get("/function/nodearn").json() == arn


def test_the_request_id_is_in_the_global_where_aws_s_runtime_keeps_it(daemon):
    # Libraries (loggers, tracers) read the invocation's id from this global, as AWS's
    # runtime sets it: nothing during init, then each invocation's own.
    write_function(daemon.functions, "nodeid.mjs", """
        const REQUEST_ID = Symbol.for("aws.lambda.runtime.requestId");
        const atInit = String(globalThis[REQUEST_ID]);
        export const handler = async (event, context) => ({
          atInit, now: globalThis[REQUEST_ID], context: context.awsRequestId });
    """)
    loaded(daemon, "nodeid")
    for _ in range(2):
        response = daemon.invoke("nodeid")
        request_id = response.headers["x-amzn-requestid"]
        assert response.json() == {"atInit": "undefined", "now": request_id, "context": request_id}


def test_console_output_lands_between_start_and_end_with_the_request_id(daemon):
    write_function(daemon.functions, "talk.mjs", """
        export const handler = async () => {
          console.log("hello", 42, { a: 1 });
          console.warn("careful");
          console.error(new Error("shown, not thrown").message);
          console.log();
          process.stdout.write("raw stdout line\\n");
          process.stdout.write(("y".repeat(15000) + "\\n").repeat(5));  // past a pipe's buffer
          process.stderr.write(Buffer.from("raw stderr, its line left open"));
          return "ok";
        };
    """)
    loaded(daemon, "talk")
    response = daemon.invoke("talk")
    request_id = response.headers["x-amzn-requestid"]
    wait_until(lambda: any(line.startswith("REPORT") for line in request_lines(daemon, "talk", request_id)),
               message="the REPORT line")
    lines = request_lines(daemon, "talk", request_id)
    start = lines.index(f"START RequestId: {request_id} Version: $LATEST")
    end = lines.index(f"END RequestId: {request_id}")
    printed = lines[start + 1:end]
    # Lambda's Node format: time, request id, level, message.
    assert [line.split("\t", 1)[1] for line in printed if "\t" in line] == [
        f"{request_id}\tINFO\thello 42 {{ a: 1 }}",
        f"{request_id}\tWARN\tcareful",
        f"{request_id}\tERROR\tshown, not thrown",
        f"{request_id}\tINFO\tundefined",  # console.log(): util.format(undefined), as AWS's runtime
    ]
    assert printed[0].split("\t")[0].endswith("Z")
    # Written to process.stdout and stderr directly: the call's lines too, before its END.
    tail = printed[-7:]
    assert tail[0] == "raw stdout line" and tail[-1] == "raw stderr, its line left open", tail[::6]
    assert [len(line) for line in tail[1:6]] == [15000] * 5 and set("".join(tail[1:6])) == {"y"}
    assert lines[end + 1].startswith(f"REPORT RequestId: {request_id}\tDuration: ")
    assert "Init Duration:" in lines[end + 1]


def test_a_multi_line_message_is_one_log_record_with_its_newlines_as_cr(daemon):
    write_function(daemon.functions, "lines.js", """
        exports.handler = async () => {
          console.log("first\\nsecond\\nthird");
          console.error(new Error("with a stack"));
          return "ok";
        };
    """)
    loaded(daemon, "lines")
    request_id = daemon.invoke("lines").headers["x-amzn-requestid"]
    wait_until(lambda: f"REPORT RequestId: {request_id}" in daemon.log_of("lines"), message="the REPORT line")
    # Lines of the log end at \n only: a record may hold \r.
    records = [line.split("\t", 2)[2] for line in daemon.log_of("lines").split("\n")
               if line.count("\t") >= 2 and line.split("\t", 2)[1] == request_id]
    printed = records[1:records.index(f"END RequestId: {request_id}")]
    assert len(printed) == 2, printed
    assert printed[0].endswith(f"\t{request_id}\tINFO\tfirst\rsecond\rthird")
    message = printed[1].split(f"\t{request_id}\tERROR\t", 1)[1]
    assert message.startswith("Error: with a stack\r    at ") and "\n" not in message
    # `faasd logs` shows each part of a record on a line of its own, with the record's request id.
    shown = subprocess.run([sys.executable, "-m", "faasd", "logs", "lines", "--url", daemon.url],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           timeout=60)
    assert shown.returncode == 0 and "\r" not in shown.stdout
    texts = [line.split("\t", 2)[2] for line in shown.stdout.splitlines()
             if line.count("\t") >= 2 and line.split("\t", 2)[1] == request_id]
    assert texts[1:4] == [f"{printed[0].split(chr(13))[0]}", "second", "third"]
    assert texts[4].endswith("\tERROR\tError: with a stack") and texts[5].startswith("    at ")


def test_json_log_format_writes_one_json_object_per_console_call(daemon):
    write_function(daemon.functions, "jsonlog.js", """
        exports.handler = async (event) => {
          console.log("hello", 42);
          console.info({ order: 7, items: ["a", "b"] });
          console.warn("two\\nlines");
          console.debug("below the level");
          console.error("failed:", new RangeError("too far"));
          console.log();
          if (event.fail) throw new TypeError("kaboom");
          return "ok";
        };
    """)
    # As it was written before function.toml had log_format: [env] sets the runtime's
    # variables, and they are read as log_format and application_log_level.
    write_function(daemon.functions, "jsonlog.toml",
                   '[env]\nAWS_LAMBDA_LOG_FORMAT = "JSON"\nAWS_LAMBDA_LOG_LEVEL = "INFO"\n')
    loaded(daemon, "jsonlog")
    assert daemon.function("jsonlog")["log_format"] == "JSON"
    response = daemon.invoke("jsonlog", {"fail": True})
    request_id = response.headers["x-amzn-requestid"]
    wait_until(lambda: any('"type":"platform.report"' in line
                           for line in request_lines(daemon, "jsonlog", request_id)),
               message="the platform.report record")
    lines = [json.loads(line) for line in request_lines(daemon, "jsonlog", request_id)]
    # The platform's START and REPORT are Lambda's JSON records too.
    assert lines[0]["type"] == "platform.start" and lines[-1]["type"] == "platform.report"
    assert lines[-1]["record"]["status"] == "error" and lines[-1]["record"]["errorType"] == "TypeError"
    records = lines[1:-1]
    for record in records:
        assert record["timestamp"].endswith("Z") and record["requestId"] == request_id
    assert [(r["level"], r["message"]) for r in records[:3]] == [
        ("INFO", "hello 42"),
        ("INFO", {"order": 7, "items": ["a", "b"]}),
        ("WARN", "two\nlines"),
    ]
    failed = records[3]
    assert failed["level"] == "ERROR" and failed["message"].startswith("failed: RangeError: too far")
    assert failed["errorType"] == "RangeError" and failed["errorMessage"] == "too far"
    assert failed["stackTrace"][0] == "RangeError: too far"
    assert records[4]["level"] == "INFO" and "message" not in records[4]  # console.log(), as AWS writes it
    # The runtime's own record of the handler's error: the error is the message.
    invoke_error = records[5]
    assert invoke_error["level"] == "ERROR" and len(records) == 6
    assert invoke_error["message"]["errorType"] == "TypeError"
    assert invoke_error["message"]["errorMessage"] == "kaboom"
    assert invoke_error["message"]["stackTrace"][0] == "TypeError: kaboom"


def test_thrown_errors_have_lambdas_node_shape_and_the_worker_survives(daemon):
    write_function(daemon.functions, "boom.js", """
        function helper() { throw new TypeError("kaboom 42"); }
        exports.handler = async (event) => {
          if (event.kind === "string") throw "just a string";
          if (event.kind === "ok") return process.pid;
          console.log("before the fall");
          helper();
        };
    """)
    write_function(daemon.functions, "cberr.js", """
        exports.handler = (event, context, callback) => callback(new RangeError("out of range"));
    """)
    loaded(daemon, "boom")
    pid = daemon.invoke("boom", {"kind": "ok"}).json()
    response = daemon.invoke("boom")
    assert response.headers["x-amz-function-error"] == "Unhandled"
    error = response.json()
    # Lambda's Node runtime: `trace`, the lines of error.stack (Python's runtime says stackTrace).
    assert list(error) == ["errorType", "errorMessage", "trace"]
    assert error["errorType"] == "TypeError" and error["errorMessage"] == "kaboom 42"
    assert error["trace"][0] == "TypeError: kaboom 42"
    assert any("at helper" in frame for frame in error["trace"])
    assert not any("node_worker" in frame for frame in error["trace"])
    request_id = response.headers["x-amzn-requestid"]
    wait_until(lambda: any("Invoke Error" in line for line in request_lines(daemon, "boom", request_id)),
               message="the Invoke Error log line")
    logged = next(line for line in request_lines(daemon, "boom", request_id) if "Invoke Error" in line)
    assert f"\t{request_id}\tERROR\tInvoke Error \t" in logged
    assert json.loads(logged.split("Invoke Error \t", 1)[1])["errorType"] == "TypeError"

    string = daemon.invoke("boom", {"kind": "string"}).json()
    assert string == {"errorType": "string", "errorMessage": "just a string", "trace": []}
    http = daemon.get("/function/boom")
    assert http.status == 502 and http.json() == {"message": "Internal Server Error"}
    assert "kaboom" not in http.text
    # A handled error does not cost the worker.
    assert daemon.invoke("boom", {"kind": "ok"}).json() == pid

    loaded(daemon, "cberr")
    assert daemon.invoke("cberr").json()["errorType"] == "RangeError"


def test_streamify_response_handlers_run_and_their_stream_is_the_result(daemon):
    write_function(daemon.functions, "stream.js", """
        exports.handler = awslambda.streamifyResponse(async (event, responseStream, context) => {
          responseStream.setContentType("text/plain");
          responseStream.write("Hello, ");
          await new Promise((resolve) => setTimeout(resolve, 10));
          responseStream.write({ n: event.n, id: context.awsRequestId.length });
          if (event.fail) throw new RangeError("stream broke");
          responseStream.end("!");
        });
    """)
    # ES modules see the global too; the metadata is a function URL's.
    write_function(daemon.functions, "streamhttp.mjs", """
        import { Readable } from "node:stream";
        import { pipeline } from "node:stream/promises";
        export const handler = awslambda.streamifyResponse(async (event, responseStream) => {
          const metadata = { statusCode: 201, headers: { "content-type": "text/html", "x-streamed": "yes" },
                             cookies: ["flavour=mint"] };
          responseStream = awslambda.HttpResponseStream.from(responseStream, metadata);
          await pipeline(Readable.from(["<p>", "streamed", "</p>"]), responseStream);
        });
    """)
    loaded(daemon, "stream")
    response = daemon.invoke("stream", {"n": 1})
    assert "x-amz-function-error" not in response.headers, response.text
    assert response.body == b'Hello, {"n":1,"id":36}!'
    failed = daemon.invoke("stream", {"n": 2, "fail": True})
    assert failed.headers["x-amz-function-error"] == "Unhandled"
    assert failed.json()["errorType"] == "RangeError" and failed.json()["errorMessage"] == "stream broke"
    assert daemon.invoke("stream", {"n": 3}).body == b'Hello, {"n":3,"id":36}!'
    # boto3's InvokeWithResponseStream reads the same stream as PayloadChunk events.
    answer = lambda_client(daemon.url).invoke_with_response_stream(FunctionName="stream", Payload=b'{"n": 4}')
    *chunks, complete = list(answer["EventStream"])
    assert b"".join(c["PayloadChunk"]["Payload"] for c in chunks) == b'Hello, {"n":4,"id":36}!'
    assert complete == {"InvokeComplete": {}}

    loaded(daemon, "streamhttp")
    page = daemon.get("/function/streamhttp")
    assert page.status == 201, page.text
    assert page.headers["content-type"] == "text/html" and page.headers["x-streamed"] == "yes"
    assert page.headers["set-cookie"] == "flavour=mint"
    assert page.body == b"<p>streamed</p>"
    # The Invoke API gives what Lambda's gives for it: the prelude, eight NUL bytes, the body.
    buffered = daemon.invoke("streamhttp").body
    prelude, body = buffered.split(bytes(8))
    assert json.loads(prelude)["statusCode"] == 201 and body == b"<p>streamed</p>"


# A streamified handler that writes, then waits on the test's probe gate (GET PROBE/gate/NAME,
# answered once the test releases it), then writes again, or throws, or ends.
GATED_STREAM = """
    const http = require("node:http");
    const gate = (name) => new Promise((resolve, reject) =>
      http.get(`${process.env.PROBE}/gate/${name}`, (res) => { res.resume(); res.on("end", resolve); })
        .on("error", reject));
    exports.handler = awslambda.streamifyResponse(async (event, responseStream) => {
      responseStream.write("first chunk;");
      await gate(event.gate);
      if (event.fail) throw new RangeError("broke after the first chunk");
      responseStream.end("second chunk");
    });
"""


@pytest.fixture
def probe():
    from probe import Probe

    probe = Probe()
    yield probe
    probe.close()


def test_a_streamed_chunk_reaches_the_caller_while_the_function_still_runs(daemon, probe):
    write_function(daemon.functions, "gated.js", GATED_STREAM)
    write_function(daemon.functions, "gated.toml", f'timeout_s = 60\n[env]\nPROBE = "{probe.url}"\n')
    loaded(daemon, "gated")
    lam = lambda_client(daemon.url)
    answer = lam.invoke_with_response_stream(FunctionName="gated", Payload=b'{"gate": "g"}')
    assert answer["StatusCode"] == 200
    events = iter(answer["EventStream"])
    # The function is waiting on the gate, which only this test opens: the chunk came first.
    assert next(events) == {"PayloadChunk": {"Payload": b"first chunk;"}}
    assert not probe.gate("g").is_set()
    probe.release("g")
    rest = list(events)
    assert rest[-1] == {"InvokeComplete": {}}
    assert b"".join(e["PayloadChunk"]["Payload"] for e in rest[:-1]) == b"second chunk"
    # The buffered Invoke gets the whole of it, once it has ended.
    probe.release("g2")
    assert daemon.invoke("gated", {"gate": "g2"}).body == b"first chunk;second chunk"


def test_chunks_written_before_a_streamed_function_throws_reach_the_caller_then_its_error(daemon, probe):
    write_function(daemon.functions, "gated.js", GATED_STREAM)
    write_function(daemon.functions, "gated.toml", f'timeout_s = 60\n[env]\nPROBE = "{probe.url}"\n')
    loaded(daemon, "gated")
    answer = lambda_client(daemon.url).invoke_with_response_stream(
        FunctionName="gated", Payload=b'{"gate": "g", "fail": true}', LogType="Tail")
    events = iter(answer["EventStream"])
    assert next(events) == {"PayloadChunk": {"Payload": b"first chunk;"}}
    probe.release("g")
    [complete] = list(events)
    ended = complete["InvokeComplete"]
    assert ended["ErrorCode"] == "RangeError"
    details = json.loads(ended["ErrorDetails"])
    assert details["errorType"] == "RangeError" and details["errorMessage"] == "broke after the first chunk"
    assert "broke after the first chunk" in base64.b64decode(ended["LogResult"]).decode()
    # The worker goes on serving.
    probe.release("g2")
    assert daemon.invoke("gated", {"gate": "g2"}).body == b"first chunk;second chunk"


def test_a_function_url_answers_with_the_streams_metadata_and_then_its_body_as_written(daemon, probe):
    write_function(daemon.functions, "page.mjs", """
        import http from "node:http";
        const gate = (name) => new Promise((resolve, reject) =>
          http.get(`${process.env.PROBE}/gate/${name}`, (res) => { res.resume(); res.on("end", resolve); })
            .on("error", reject));
        export const handler = awslambda.streamifyResponse(async (event, responseStream) => {
          responseStream = awslambda.HttpResponseStream.from(responseStream, {
            statusCode: 201, headers: { "content-type": "text/plain", "x-streamed": "yes" } });
          responseStream.write("first chunk;");
          await gate(event.rawPath.split("/").pop());
          responseStream.end("second chunk");
        });
    """)
    write_function(daemon.functions, "page.toml", f'timeout_s = 60\n[env]\nPROBE = "{probe.url}"\n')
    loaded(daemon, "page")
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=50)
    try:
        connection.request("GET", "/function/page/g1")
        response = connection.getresponse()
        # Status and headers came with the first chunk, while the function waits on the gate.
        assert response.status == 201
        assert response.getheader("content-type") == "text/plain" and response.getheader("x-streamed") == "yes"
        assert response.getheader("apigw-requestid")
        assert response.read1(65536) == b"first chunk;"
        assert not probe.gate("g1").is_set()
        probe.release("g1")
        assert response.read() == b"second chunk"
    finally:
        connection.close()


def test_a_streamed_response_may_pass_the_6_mb_of_a_buffered_one(daemon):
    write_function(daemon.functions, "big.js", """
        const { Readable } = require("node:stream");
        const { pipeline } = require("node:stream/promises");
        exports.handler = awslambda.streamifyResponse(async (event, responseStream) => {
          const piece = Buffer.alloc(100 * 1024, "z");
          async function* pieces() { for (let i = 0; i < event.pieces; i++) yield piece; }
          await pipeline(Readable.from(pieces()), responseStream);
        });
    """)
    write_function(daemon.functions, "big.toml", "timeout_s = 60\nmemory_mb = 256\n")
    loaded(daemon, "big")
    lam = lambda_client(daemon.url)
    pieces = 80  # 8000 KiB: past Lambda's 6291556 bytes of a buffered response
    answer = lam.invoke_with_response_stream(FunctionName="big", Payload=json.dumps({"pieces": pieces}).encode())
    *chunks, complete = list(answer["EventStream"])
    assert complete == {"InvokeComplete": {}}
    data = b"".join(c["PayloadChunk"]["Payload"] for c in chunks)
    assert len(data) == pieces * 100 * 1024 and set(data) == {ord("z")}
    assert all(len(c["PayloadChunk"]["Payload"]) <= 64 * 1024 for c in chunks)
    # Invoke buffers it, and so holds it to Lambda's limit of a buffered response.
    failed = daemon.invoke("big", {"pieces": pieces})
    assert failed.headers["x-amz-function-error"] == "Unhandled"
    assert failed.json()["errorType"] == "Function.ResponseSizeTooLarge"
    assert failed.json()["errorMessage"] == (
        "Response payload size exceeded maximum allowed payload size (6291556 bytes).")
    assert len(daemon.invoke("big", {"pieces": 60}).body) == 60 * 100 * 1024  # within it: whole


def test_callback_waits_for_an_empty_event_loop_unless_told_not_to(daemon):
    write_function(daemon.functions, "later.js", """
        exports.handler = (event, context, callback) => {
          context.callbackWaitsForEmptyEventLoop = event.wait;
          setTimeout(() => console.log("timer fired"), 500);
          callback(null, "answered");
        };
    """)
    loaded(daemon, "later")
    for wait, timer_in_this_call in ((True, True), (False, False)):
        response = daemon.invoke("later", {"wait": wait})
        assert response.json() == "answered"
        request_id = response.headers["x-amzn-requestid"]
        wait_until(lambda: any(line.startswith("REPORT") for line in request_lines(daemon, "later", request_id)))
        lines = request_lines(daemon, "later", request_id)
        end = lines.index(f"END RequestId: {request_id}")
        assert any(line.endswith("\tINFO\ttimer fired") for line in lines[:end]) is timer_in_this_call, lines


def test_an_uncaught_exception_fails_the_call_and_replaces_the_worker(daemon):
    write_function(daemon.functions, "wild.js", """
        exports.handler = async (event) => {
          if (event.kind === "throw") {
            setTimeout(() => { throw new Error("thrown from a timer"); }, 0);
            return new Promise(() => {});
          }
          if (event.kind === "reject") {
            Promise.reject(new Error("nobody caught me"));
            return new Promise((resolve) => setTimeout(resolve, 1000));
          }
          if (event.kind === "reject nothing") {
            Promise.reject();
            return new Promise((resolve) => setTimeout(resolve, 1000));
          }
          if (event.kind === "unsettled") {
            return new Promise(() => {}); // the loop runs dry with the promise pending
          }
          return process.pid;
        };
    """)
    write_function(daemon.functions, "wild.toml", "timeout_s = 10\n")
    loaded(daemon, "wild")
    first = daemon.invoke("wild").json()
    error = daemon.invoke("wild", {"kind": "throw"}).json()
    assert error["errorType"] == "Error" and error["errorMessage"] == "thrown from a timer"
    second = daemon.invoke("wild").json()
    assert second != first
    wait_until(lambda: process_state(first) is None, message="the old worker to be gone")

    error = daemon.invoke("wild", {"kind": "reject"}).json()
    assert error["errorType"] == "Runtime.UnhandledPromiseRejection"
    assert error["errorMessage"] == "Error: nobody caught me"
    third = daemon.invoke("wild").json()
    assert third != second
    error = daemon.invoke("wild", {"kind": "reject nothing"}).json()  # AWS: new Error(undefined)
    assert (error["errorType"], error["errorMessage"]) == ("Runtime.UnhandledPromiseRejection", "")
    third = daemon.invoke("wild").json()

    error = daemon.invoke("wild", {"kind": "unsettled"}).json()
    assert error["errorType"] == "Runtime.NodeJsExit"
    assert "never settled" in error["errorMessage"]
    assert daemon.invoke("wild").json() == third  # the runtime itself is fine


def test_a_response_may_be_lambdas_6291556_bytes_and_one_over_it_is_too_large(daemon):
    write_function(daemon.functions, "sized.js", """
        // A JSON string of `bytes` bytes: the characters and their two quotes.
        exports.handler = async (event) => "x".repeat(event.bytes - 2);
    """)
    loaded(daemon, "sized")
    fits = daemon.invoke("sized", {"bytes": 6291556})
    assert "x-amz-function-error" not in fits.headers, fits.body[:300]
    assert len(fits.body) == 6291556
    over = daemon.invoke("sized", {"bytes": 6291557})
    assert over.headers["x-amz-function-error"] == "Unhandled"
    assert over.json()["errorType"] == "Function.ResponseSizeTooLarge"
    assert over.json()["errorMessage"] == (
        "Response payload size exceeded maximum allowed payload size (6291556 bytes).")
    assert daemon.invoke("sized", {"bytes": 4}).json() == "xx"


def test_process_exit_in_the_handler_is_an_exit_error_in_lambdas_words(daemon):
    write_function(daemon.functions, "quits.js", """
        exports.handler = async (event) => {
          if (event.code !== undefined) process.exit(event.code);
          return process.pid;
        };
    """)
    loaded(daemon, "quits")
    first = daemon.invoke("quits").json()
    for code, words in ((3, "Runtime exited with error: exit status 3"),
                        (0, "Runtime exited without providing a reason")):
        response = daemon.invoke("quits", {"code": code})
        assert response.headers["x-amz-function-error"] == "Unhandled"
        request_id = response.headers["x-amzn-requestid"]
        assert response.json()["errorType"] == "Runtime.ExitError"
        assert response.json()["errorMessage"] == f"RequestId: {request_id} Error: {words}"
    assert daemon.invoke("quits").json() != first  # a new worker took the exited one's place


def test_init_errors_are_lambdas_and_other_functions_keep_working(daemon):
    functions = daemon.functions
    write_function(functions, "good.mjs", "export const handler = async () => 'fine';\n")
    write_function(functions, "missing.js", """
        const nope = require("not-a-module-anywhere");
        exports.handler = async () => 1;
    """)
    write_function(functions, "missingesm.mjs", """
        import nope from "not-a-package-anywhere";
        export const handler = async () => 1;
    """)
    write_function(functions, "nohandler.mjs", "export const other = async () => 1;\n")
    write_function(functions, "notafunction.js", "exports.handler = 42;\n")
    write_function(functions, "syntax.js", "exports.handler = async () => {\n")
    write_function(functions, "throws.js", """
        throw new Error("bad config at load");
        exports.handler = async () => 1;
    """)
    # A promise made at load that rejects before anything awaits it fails init, as on Lambda.
    write_function(functions, "rejects.js", """
        const connection = Promise.reject(new Error("database unreachable"));
        exports.handler = async () => connection;
    """)
    write_function(functions, "rejectsesm.mjs", """
        const connection = Promise.reject(new RangeError("no such region"));
        export const handler = async () => connection;
    """)
    expectations = {
        "missing": ("Runtime.ImportModuleError", "Cannot find module 'not-a-module-anywhere'"),
        "missingesm": ("Error", "Cannot find package 'not-a-package-anywhere'"),
        "nohandler": ("Runtime.HandlerNotFound", "nohandler.handler is undefined or not exported"),
        "notafunction": ("Runtime.HandlerNotFound", "notafunction.handler is not a function"),
        "syntax": ("Runtime.UserCodeSyntaxError", "SyntaxError"),
        "throws": ("Error", "bad config at load"),
        "rejects": ("Runtime.UnhandledPromiseRejection", "Error: database unreachable"),
        "rejectsesm": ("Runtime.UnhandledPromiseRejection", "RangeError: no such region"),
    }
    for name, (error_type, message) in expectations.items():
        loaded(daemon, name)
        response = daemon.invoke(name)
        error = response.json()
        assert response.headers["x-amz-function-error"] == "Unhandled", name
        assert error["errorType"] == error_type, (name, error)
        assert message in error["errorMessage"], (name, error)
        assert daemon.get(f"/function/{name}").status == 502
        assert daemon.function(name)["init_error"]["errorType"] == error_type
        log = daemon.log_of(name)
        assert f"Status: error\tError Type: {error_type}" in log, log
    # As AWS's runtime reports them: require()'s error whole, its require stack included (the
    # runtime's own file last, here faasd's shim), and an ES module's missing package as it is.
    shim = ROOT / "faasd" / "runtimes" / "node_worker.js"
    missing = daemon.invoke("missing").json()
    assert missing["errorMessage"] == ("Error: Cannot find module 'not-a-module-anywhere'\nRequire stack:\n"
                                       f"- {functions}/missing.js\n- {shim}"), missing
    assert missing["trace"][:3] == ["Runtime.ImportModuleError: Error: Cannot find module 'not-a-module-anywhere'",
                                    "Require stack:", f"- {functions}/missing.js"], missing
    esm = daemon.invoke("missingesm").json()
    assert esm["errorMessage"] == (f"Cannot find package 'not-a-package-anywhere' imported from "
                                   f"{functions}/missingesm.mjs"), esm
    assert esm["trace"][0] == f"Error [ERR_MODULE_NOT_FOUND]: {esm['errorMessage']}", esm
    assert daemon.invoke("good").json() == "fine"


def test_timeout_is_504_and_the_worker_and_its_children_are_killed(daemon):
    write_function(daemon.functions, "slow.js", """
        const { spawn } = require("child_process");
        exports.handler = async () => {
          const child = spawn("sleep", ["300"], { stdio: "ignore" });
          console.log("child", child.pid);
          await new Promise((resolve) => setTimeout(resolve, 30000));
        };
    """)
    write_function(daemon.functions, "slow.toml", "timeout_s = 1\n")
    loaded(daemon, "slow")
    response = daemon.get("/function/slow")
    assert response.status == 504
    log = daemon.log_of("slow")
    child_pid = int(log.split("INFO\tchild ", 1)[1].split()[0])
    wait_until(lambda: process_state(child_pid) in (None, "Z"), message="the handler's child to die")
    assert "Task timed out after 1.00 seconds" in log and "Status: timeout" in log
    error = daemon.invoke("slow").json()
    assert error["errorType"] == "Sandbox.Timedout"


def test_memory_over_the_limit_fails_the_call_and_replaces_the_worker(daemon):
    write_function(daemon.functions, "hog.js", """
        const blocks = [];
        exports.handler = async (event) => {
          if (event.hog) {
            for (let i = 0; i < 40; i++) blocks.push(Buffer.alloc(16 * 1024 * 1024, 1));
          }
          return process.pid;
        };
    """)
    write_function(daemon.functions, "hog.toml", "memory_mb = 128\ntimeout_s = 20\n")
    loaded(daemon, "hog")
    pid = daemon.invoke("hog").json()
    response = daemon.invoke("hog", {"hog": True})
    error = response.json()
    assert response.headers["x-amz-function-error"] == "Unhandled"
    assert error["errorType"] == "Runtime.OutOfMemory", error
    assert "128 MB" in error["errorMessage"]
    assert daemon.invoke("hog").json() != pid


def test_max_memory_used_of_a_warm_node_worker_is_at_least_its_resident_memory(daemon):
    # Much of a node worker's memory is the node binary's pages, which its
    # memory cgroup may not count (they were charged to whoever read them first).
    write_function(daemon.functions, "rss.js", "exports.handler = async () => process.memoryUsage().rss;\n")
    loaded(daemon, "rss")
    daemon.invoke("rss")
    response = daemon.invoke("rss")
    rss_mb = response.json() / (1024 * 1024)
    report = report_of(daemon, "rss", response.headers["x-amzn-requestid"])
    assert "Init Duration" not in report
    assert max_memory_used(report) >= rss_mb - 1, (report, rss_mb)


def test_idle_node_workers_freeze_and_thaw_with_their_state_and_tmp(start_daemon, functions_dir):
    write_function(functions_dir, "count.js", """
        const fs = require("fs");
        const path = require("path");
        let count = 0;
        exports.handler = async () => {
          count += 1;
          const file = path.join(process.env.TMPDIR, "seen");
          const existed = fs.existsSync(file);
          fs.appendFileSync(file, "x");
          return { count, existed, pid: process.pid };
        };
    """)
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_FREEZE_AFTER_MS": "50"})
    first = daemon.invoke("count").json()
    wait_until(lambda: process_state(first["pid"]) == "T", message="the idle node worker to be stopped")
    assert daemon.workers("count")[0]["state"] == "frozen"
    second = daemon.invoke("count").json()
    assert second == {"count": 2, "existed": True, "pid": first["pid"]}
    wait_until(lambda: process_state(first["pid"]) == "T", message="the worker to freeze again")


def test_min_warm_prewarms_node_workers(start_daemon, functions_dir):
    write_function(functions_dir, "warm.mjs", "export const handler = async () => process.pid;\n")
    write_function(functions_dir, "warm.toml", "min_warm = 2\n")
    daemon = start_daemon(functions_dir)
    wait_until(lambda: len(daemon.workers("warm")) == 2, message="two prewarmed node workers")
    pids = {w["pid"] for w in daemon.workers("warm")}
    response = daemon.invoke("warm")
    assert response.json() in pids
    request_id = response.headers["x-amzn-requestid"]
    report = next(line for line in request_lines(daemon, "warm", request_id) if line.startswith("REPORT"))
    assert "Init Duration" not in report  # a prewarmed worker is no cold start


@pytest.mark.without_node
def test_without_node_node_functions_give_a_clear_init_error_and_others_work(start_daemon, functions_dir,
                                                                           tmp_path):
    write_function(functions_dir, "js.mjs", "export const handler = async () => 1;\n")
    write_function(functions_dir, "py.py", "def handler(event, context):\n    return 'python ok'\n")
    no_node = tmp_path / "bin-without-node"
    no_node.mkdir()
    daemon = start_daemon(functions_dir, env={"PATH": str(no_node)})
    assert daemon.invoke("py").json() == "python ok"
    response = daemon.invoke("js")
    error = response.json()
    assert response.headers["x-amz-function-error"] == "Unhandled"
    assert error["errorType"] == "Runtime.InvalidRuntime"
    assert "Node.js is not installed" in error["errorMessage"]
    assert "install Node.js" in error["errorMessage"]
    assert daemon.get("/function/js").status == 502
    assert daemon.function("js")["init_error"]["errorType"] == "Runtime.InvalidRuntime"
    assert "Node.js is not installed" in daemon.log_of("js")
    assert daemon.invoke("py").json() == "python ok"


def test_the_node_example_says_hello(start_daemon, tmp_path):
    functions = tmp_path / "examples"
    functions.mkdir()
    shutil.copy(EXAMPLES / "hello-node.mjs", functions / "hello-node.mjs")
    daemon = start_daemon(functions)
    response = daemon.get("/function/hello-node?name=you")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "Hello, you!\n"
    assert daemon.get("/function/hello-node").text == "Hello, world!\n"
    wait_until(lambda: "saying hello to you" in daemon.log_of("hello-node"), message="the example's log line")


def test_faasd_check_finds_a_node_syntax_error_before_any_worker_loads_it(tmp_path):
    functions = tmp_path / "functions"
    write_function(functions, "broken.js", "exports.handler = async (event) => {\n  return { ok: true\n};\n")
    write_function(functions, "fine.mjs", "export const handler = async () => 1;\n")
    check = subprocess.run([sys.executable, "-m", "faasd", "check", "--functions", str(functions)],
                           capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert check.returncode == 1, check.stdout
    assert "broken: error: Runtime.UserCodeSyntaxError: SyntaxError:" in check.stdout
    assert "broken.js:" in check.stdout  # where
    assert "fine: ok (node" in check.stdout
