"""The daemon's HTTP surface: HTTP triggers, the Lambda API, health and system views.

Handlers are built by factories that receive what they need (the invoker,
the registry, ...) and nothing else; the app is assembled in `build_app`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from aiohttp import HttpVersion11, hdrs, web

from . import __version__
from .errors import HANDLED, FunctionError, FunctionNotFound, InvokeRefused, PayloadTooLarge, RequestTimedOut, Throttled
from .lambda_api import SERVICE_ERROR, is_lambda_api, not_implemented, service_error as lambda_service_error
from .protocol import MAX_RESPONSE_BYTES, RESPONSE_TOO_LARGE
from .sigv4 import signed_for
from .spec import new_request_id, valid_name
from .streaming import ResponseStream
from .triggers.http import (
    MalformedResponse, Route, RouteTable, build_event, build_response, error_response, failure_response,
    response_head, streamed_head,
)

if TYPE_CHECKING:
    from .daemon import Daemon
    from .invoker import Invocation

log = logging.getLogger("faasd.api")

JSON = "application/json"


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(value), content_type=JSON, headers=headers)


BODY_KEY = "faasd.body"  # a body already read (to check its signature) is kept here
CONTINUED_KEY = "faasd.continued"  # set once 100 Continue was sent
IDLE_TIMEOUT_KEY = web.AppKey("faasd.idle_timeout_s", float)
BODY_TIMEOUT_KEY = web.AppKey("faasd.body_timeout_s", float)


def expects_continue(request: web.BaseRequest) -> bool:
    return (request.version == HttpVersion11
            and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue")


async def continue_on_read(request: web.Request) -> None:
    """The expect_handler of the routes that take a body.

    aiohttp's own answers `Expect: 100-continue` with 100 Continue as soon as
    the route is found, before any check: the client then uploads a body the
    size or auth check refuses. Here 100 Continue waits for read_body, the
    first read of the body, so a request refused on its headers (too large,
    no or a bad key) gets its final status instead, and sends nothing more.
    Any other expectation gets 417, as with aiohttp's.
    """
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version == HttpVersion11 and expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")


async def _send_continue(request: web.Request) -> None:
    if expects_continue(request) and not request.get(CONTINUED_KEY):
        request[CONTINUED_KEY] = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # not part of the response (as aiohttp's handler does)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, or PayloadTooLarge past `limit` bytes.

    A client that stops sending for longer than [server] idle_timeout_s, or
    whose body is not complete [server] body_timeout_s after the first read,
    gets 408: a slow sender, even one that sends a byte every few seconds,
    cannot hold a request and its buffers forever.
    """
    if not request.body_exists:
        return b""
    cached = request.get(BODY_KEY)
    if cached is not None:
        # Read under the general limit (to check a signature): this call's may be lower.
        if len(cached) > limit:
            raise _too_large(limit)
        return cached
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    await _send_continue(request)  # the checks on the headers are behind: the client may send
    idle = request.app.get(IDLE_TIMEOUT_KEY)
    whole = request.app.get(BODY_TIMEOUT_KEY)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + whole if whole is not None else None
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            wait = idle
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    raise _timed_out(f"the request body was not complete within {whole:g} s")
                wait = left if wait is None else min(wait, left)
            try:
                chunk = await asyncio.wait_for(request.content.readany(), wait)
            except asyncio.TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    raise _timed_out(f"the request body was not complete within {whole:g} s") from None
                raise _timed_out(f"the request body stalled for over {idle:g} s") from None
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except asyncio.LimitOverrunError:
        raise _too_large(limit) from None
    return b"".join(chunks)


def _timed_out(message: str) -> web.HTTPRequestTimeout:
    refusal = web.HTTPRequestTimeout(body=orjson.dumps({"message": message}), content_type=JSON)
    # The rest of the body may still come: the connection carries no next request.
    refusal.force_close()
    return refusal


def _too_large(limit: int) -> PayloadTooLarge:
    """Lambda's words for a payload over the limit."""
    return PayloadTooLarge(f"Request must be smaller than {limit} bytes for the InvokeFunction operation")


# -- HTTP triggers ------------------------------------------------------------------

HTTP_REFUSALS = {
    404: "Not Found", 429: "Too Many Requests", 413: "Request Entity Too Large",
    503: "Service Unavailable", 400: "Bad Request",
}


def http_trigger_handler(daemon: "Daemon"):
    """`/function/NAME[/rest]` and every http trigger route."""
    invoker = daemon.invoker
    routes: RouteTable = daemon.routes
    limit = daemon.config.server.max_body_bytes

    async def invoke(request: web.Request, name: str, route_key: str,
                     params: dict[str, str] | None, route: Route | None = None) -> web.Response:
        request_id = new_request_id()
        try:
            authorizer = None
            trigger_auth = daemon.http_auth
            setting = trigger_auth.setting(name, route) if trigger_auth is not None else None
            if setting:
                # Before the body is read: an unauthorised caller costs no upload.
                refusal, authorizer = await trigger_auth.check(request, setting, route_key, params)
                if refusal is not None:
                    return refusal
            invoker.expect(name)  # the worker wakes while the body is read and the event built
            body = await read_body(request, limit)
            event = build_event(request, body, route_key=route_key,
                                path_parameters=params, request_id=request_id)
            if authorizer is not None:
                event["requestContext"]["authorizer"] = authorizer
            payload = orjson.dumps(event)
            if len(payload) > limit:
                # Lambda's limit is the event's: a binary body grows by a third as base64.
                raise _too_large(limit)
            trace_id = event["headers"]["x-amzn-trace-id"]
            spec = daemon.registry.get(name)
            if spec is not None and spec.runtime != "python":  # Lambda's Python runtime does not stream
                return await streamed(request, name, payload, request_id, trace_id)
            invocation = await invoker.invoke(name, payload, request_id=request_id,
                                              source="http", trace_id=trace_id)
        except InvokeRefused as exc:
            return refused(exc)
        return answer(name, invocation, request_id, invocation.payload)

    def refused(exc: InvokeRefused) -> web.Response:
        headers = {"X-Amzn-ErrorType": exc.error_type}
        message = HTTP_REFUSALS.get(exc.status, exc.message)
        if isinstance(exc, Throttled):
            headers["Retry-After"] = "1"
            return error_response(exc.status, message, headers, reason=exc.reason)
        return error_response(exc.status, message, headers)

    def answer(name: str, invocation: "Invocation", request_id: str, payload: bytes | None) -> web.Response:
        """The response to a call that ran: its result by payload 2.0's rules, or its failure."""
        if invocation.error is not None:
            return failure_response(invocation.error, request_id)
        try:
            response = build_response(payload)
        except MalformedResponse as exc:
            daemon.logs.write(name, request_id, f"Malformed Lambda proxy response: {exc}")
            response = error_response(502, "Internal Server Error")
        response.headers["apigw-requestid"] = request_id
        response.headers["X-Duration-Seconds"] = f"{invocation.duration_ms / 1000:.6f}"
        return response

    async def streamed(request: web.Request, name: str, payload: bytes, request_id: str,
                       trace_id: str) -> web.StreamResponse:
        """A call of a function that may stream its response (Node, provided), answered as a
        function URL answers one: once the stream's HttpResponseStream metadata has come, its
        status and headers go out, then each piece of the body as the function writes it. A
        stream without metadata is a return value, read whole (at most 6 MB) and answered by
        payload 2.0's rules, as is a function's result. A function that fails after its body
        started leaves the body as far as it got; its log tells the error."""
        head = bytearray()  # what came before the body started, or all of a return value
        started: list[web.StreamResponse] = []  # the response, once the metadata has come

        async def read(stream: ResponseStream) -> None:
            """From the first piece on: the metadata, then the body as it comes."""
            buffered = False  # no metadata: a return value, read whole
            try:
                while (chunk := await stream.read()) is not None:
                    if started:
                        await started[0].write(chunk)
                        continue
                    if len(head) <= MAX_RESPONSE_BYTES:
                        head.extend(chunk)
                    if buffered:
                        continue
                    found = streamed_head(bytes(head)) if len(head) <= MAX_RESPONSE_BYTES else (None, b"")
                    if found is None:
                        continue
                    metadata, body = found
                    try:
                        if metadata is None:
                            raise MalformedResponse("no metadata")
                        status, headers = response_head(metadata)
                    except MalformedResponse:
                        buffered = True  # a return value (answered once the call has ended)
                        continue
                    headers["apigw-requestid"] = request_id
                    response = web.StreamResponse(status=status, headers=headers)
                    started.append(response)
                    await response.prepare(request)
                    if body:
                        await response.write(body)
            except (ConnectionError, asyncio.CancelledError):
                stream.abandon()  # the caller went away: the function runs on to its end

        stream = ResponseStream()
        try:
            invocation, reading = await stream.carry(invoker.invoke(
                name, payload, request_id=request_id, source="http", trace_id=trace_id, stream=stream), read)
        except InvokeRefused as exc:  # before the function ran: nothing was streamed
            return refused(exc)
        if reading is None:
            return answer(name, invocation, request_id, invocation.payload)
        await reading
        if started:
            response = started[0]
            if response.prepared and not _gone(request):
                await response.write_eof()
            return response
        if invocation.error is None and stream.size > MAX_RESPONSE_BYTES:
            invocation.error = FunctionError(HANDLED, "Function.ResponseSizeTooLarge", RESPONSE_TOO_LARGE)
        return answer(name, invocation, request_id, bytes(head))

    async def by_name(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not valid_name(name):
            return error_response(400, f"invalid function name {name!r}: use 1 to 64 of A-Z a-z 0-9 _ -")
        rest = request.match_info.get("rest")
        if rest is not None and not rest:
            rest = None
        route_key = f"ANY /function/{name}/{{proxy+}}" if rest else f"ANY /function/{name}"
        return await invoke(request, name, route_key, {"proxy": rest} if rest else None)

    async def by_route(request: web.Request) -> web.Response:
        lambda_path = is_lambda_api(request.path)
        if lambda_path and signed_for(request.headers, "lambda"):
            # An AWS client's call of a Lambda operation faasd does not serve: never
            # a function's, even where an http trigger's route (`/{path+}`) matches.
            return not_implemented(request)
        found = routes.match(request.method, request.path)
        if found is None:
            if lambda_path:
                return not_implemented(request)
            return error_response(404, "Not Found")
        route, params = found
        return await invoke(request, route.function, route.route_key(request.method), params or None,
                            route)

    return by_name, by_route


# -- health and system views ----------------------------------------------------------

def system_handlers(daemon: "Daemon"):
    async def healthz(request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        checks = daemon.readiness()
        ok = all(check["ok"] for check in checks.values())
        return json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)

    async def functions(request: web.Request) -> web.Response:
        return json_response({"functions": [daemon.describe(name) for name in sorted(daemon.registry.specs)]})

    async def function(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if daemon.registry.get(name) is None:
            return json_response({"message": f"Function not found: {name}"}, status=404)
        return json_response(daemon.describe(name))

    async def info(request: web.Request) -> web.Response:
        return json_response(daemon.info())

    async def logs(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not valid_name(name):
            return json_response({"message": "invalid function name"}, status=400)
        if daemon.registry.get(name) is None and not daemon.logs.path(name).exists():
            return json_response({"message": f"Function not found: {name}"}, status=404)
        given = request.query.get("lines", "100")
        try:
            lines = int(given)
        except ValueError:
            lines = -1
        if lines < 0:
            return json_response({"message": f"lines must be a whole number of 0 or more, not {given[:100]!r}"},
                                 status=400)
        lines = min(lines, 100000)
        follow = request.query.get("follow", "") in ("1", "true", "yes")
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        # aiohttp does not cancel a handler whose client went away: the follow checks.
        stream = daemon.logs.follow(name, gone=lambda: _gone(request)) if follow else None
        for line in daemon.logs.tail(name, lines):
            await response.write(line.encode())
        if stream is not None:
            async for line in stream:
                await response.write(line.encode())
        await response.write_eof()
        return response

    return healthz, readyz, functions, function, info, logs


def host_name(host: str) -> str | None:
    """The name or address a Host (or X-Forwarded-Host) header gives, lower case, without
    its port or an IPv6 address's brackets; None where it is not a host at all."""
    try:
        return urlsplit(f"//{host.strip()}").hostname
    except ValueError:
        return None


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# -- the one middleware: auth for the API, errors the framework raises -------------------

def guard_middleware(daemon: "Daemon"):
    """Checks the request (faasd/auth.py's RequestGuard, while keys are set), then
    turns what the framework or a handler raises into JSON errors.

    One middleware, not one per concern: each layer costs every request.
    """
    guard = daemon.request_guard
    perf_counter = time.perf_counter

    @web.middleware
    async def guarded(request: web.Request, handler) -> web.StreamResponse:
        started = perf_counter()
        daemon.http_active += 1  # a stop waits for these (Daemon._stop_http)
        try:
            if guard is not None and guard.active:
                refusal = await guard.check(request)
            elif daemon.loopback_hosts is not None:  # no keys: see auth.LoopbackHosts
                refusal = daemon.loopback_hosts.refusal(request)
            else:
                refusal = None
            response = refusal if refusal is not None else await handler(request)
        except web.HTTPException as exc:
            if exc.status == 408 and on_lambda_api(request):
                # read_body's refusal (a stalled or slow body), in Lambda's error shape
                response = lambda_service_error(RequestTimedOut(_message_of(exc)))
                response.force_close()  # the rest of the body may still come
            elif exc.status < 400 or exc.content_type == JSON:
                raise
            else:
                message = exc.reason if exc.status != 413 else "Request Entity Too Large"
                response = error_response(exc.status, message, dict(exc.headers) if exc.status == 405 else None)
        except FunctionNotFound as exc:
            response = error_response(404, exc.message)
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            if on_lambda_api(request):
                response = lambda_service_error(InvokeRefused(SERVICE_ERROR))
            else:
                response = error_response(500, "Internal Server Error")
        finally:
            daemon.http_active -= 1
            if daemon.http_stopping:
                daemon.http_request_ended()
        if daemon.http_stopping and not response.prepared:
            response.force_close()  # faasd is stopping: no next request on this connection
        elif (request.body_exists and not request.get(CONTINUED_KEY) and not response.prepared
              and expects_continue(request)):
            # Refused before 100 Continue: the client may send its body or not, so the
            # connection cannot carry another request (Connection: close). aiohttp reads and
            # drops a body that still comes, for a while, before it closes the connection.
            response.force_close()
        if isinstance(response, web.Response) and "X-Duration-Seconds" not in response.headers:
            response.headers["X-Duration-Seconds"] = f"{perf_counter() - started:.6f}"
        return response

    return guarded


def on_lambda_api(request: web.BaseRequest) -> bool:
    """Whether the request is for the Lambda API (by its decoded or its raw path), whose
    errors are Lambda's: `x-amzn-ErrorType` and a JSON body botocore reads."""
    return is_lambda_api(request.path) or is_lambda_api(request.rel_url.raw_path)


def _message_of(exc: web.HTTPException) -> str:
    """The message of a refusal made with error_response's JSON body."""
    try:
        return str(orjson.loads(exc.body)["message"])  # type: ignore[arg-type]
    except (TypeError, ValueError, KeyError):
        return exc.reason


def build_app(daemon: "Daemon") -> web.Application:
    app = web.Application(
        middlewares=[guard_middleware(daemon)],
        client_max_size=daemon.config.server.max_body_bytes + 1024,
    )
    app[IDLE_TIMEOUT_KEY] = daemon.config.server.idle_timeout_s
    app[BODY_TIMEOUT_KEY] = daemon.config.server.body_timeout_s
    by_name, by_route = http_trigger_handler(daemon)
    healthz, readyz, functions, function, info, logs = system_handlers(daemon)
    from .lambda_api import lambda_routes

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/system/functions", functions)
    app.router.add_get("/system/functions/{name}", function)
    app.router.add_get("/system/functions/{name}/logs", logs)
    app.router.add_get("/system/info", info)
    lambda_routes(app, daemon)
    for extra in daemon.route_hooks:
        extra(app)
    app.router.add_route("*", "/function/{name}", by_name, expect_handler=continue_on_read)
    app.router.add_route("*", "/function/{name}/{rest:.*}", by_name, expect_handler=continue_on_read)
    app.router.add_route("*", "/{tail:.*}", by_route, expect_handler=continue_on_read)
    app["server_version"] = __version__
    return app
