"""HTTP triggers: requests in, API Gateway HTTP API (payload 2.0) events out, and back.

`/function/NAME[/rest]` always reaches NAME; each `[[triggers]] type = "http"`
adds a route like `/thumbs/{id}` (with `{name+}` for a greedy tail). The
request becomes the event API Gateway would send; the handler's return value
becomes the response by API Gateway's payload 2.0 rules, and a streamed
response with HttpResponseStream metadata as a function URL answers it.
"""

from __future__ import annotations

import base64
import logging
import binascii
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import parse_qsl

import orjson
from aiohttp import web
from multidict import CIMultiDict

from ..errors import FunctionError
from ..spec import ACCOUNT_ID, FunctionSpec, caller_trace_id, new_trace_id

log = logging.getLogger("faasd.http")

TEXT_TYPES = ("text/", "application/json", "application/javascript", "application/xml",
              "application/x-www-form-urlencoded", "application/graphql", "+json", "+xml")
# Hop-by-hop and framing headers belong to this connection, not the handler's response.
DROPPED_RESPONSE_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass(frozen=True)
class Route:
    function: str
    template: str
    methods: frozenset[str]
    pattern: re.Pattern
    literal_length: int
    auth: str | None = None  # None (public), "key" or "function:NAME" (faasd/auth.py)

    def route_key(self, method: str) -> str:
        """The key of the route `method` was served by, as API Gateway names it: a
        route key the function has, so HEAD served by a GET route is `GET ...`."""
        if "ANY" in self.methods:
            declared = "ANY"
        elif method in self.methods:
            declared = method
        else:
            declared = "GET"  # HEAD, which RouteTable.match gives to a GET route
        return f"{declared} {self.template}"


# A route parameter is a whole segment of the path: `{name}`, or `{name+}` for
# the rest of it. Braces anywhere else are literal text.
PARAMETER_RE = re.compile(r"\{([A-Za-z0-9_]+)(\+?)\}")


def _parameter(segment: str) -> tuple[str, bool] | None:
    """(name, greedy) if the path segment is a parameter, else None."""
    match = PARAMETER_RE.fullmatch(segment)
    return (match[1], bool(match[2])) if match else None


def parameter_names(template: str) -> list[str]:
    """The names of a route's parameters, in path order."""
    return [parameter[0] for parameter in map(_parameter, template.split("/")) if parameter]


def compile_template(template: str) -> tuple[re.Pattern, int]:
    """`/thumbs/{id}` -> a regex with named groups; `{rest+}` matches the remainder."""
    parts = []
    literal = 0
    for segment in template.strip("/").split("/"):
        parameter = _parameter(segment)
        if parameter:
            name, greedy = parameter
            parts.append(f"(?P<{name}>.+)" if greedy else f"(?P<{name}>[^/]+)")
        else:
            parts.append(re.escape(segment))
            literal += len(segment) + 1
    return re.compile("^/" + "/".join(parts) + "/?$"), literal


def routes_of(spec: FunctionSpec) -> list[Route]:
    """The routes a function's http triggers ask for."""
    routes = []
    for trigger in spec.triggers:
        if trigger.type == "http":
            pattern, literal = compile_template(trigger.get("path"))
            routes.append(Route(spec.name, trigger.get("path"), frozenset(trigger.get("methods", ["ANY"])),
                                pattern, literal, trigger.get("auth")))
    return routes


def claim(claims: Iterable[list[Route]]) -> tuple[list[Route], dict[str, list[str]]]:
    """Each function's routes, in the order they were claimed: those kept, and for
    each function the routes it cannot have because an earlier one holds them
    (the same path, parameters' names aside, with methods in common)."""
    kept: list[Route] = []
    conflicts: dict[str, list[str]] = {}
    for routes in claims:
        for route in routes:
            shape = _shape(route.template)
            holder = next((k for k in kept if k.function != route.function and _shape(k.template) == shape
                           and ("ANY" in k.methods or "ANY" in route.methods
                                or not k.methods.isdisjoint(route.methods))), None)
            if holder is None:
                kept.append(route)
            else:
                conflicts.setdefault(route.function, []).append(
                    f"http trigger path {route.template!r} is already the route of function "
                    f"{holder.function!r}; it is not served here")
    return kept, conflicts


def _shape(template: str) -> str:
    """The route with its parameters' names left out: routes of one shape match the same paths."""
    segments = []
    for segment in template.rstrip("/").split("/"):
        parameter = _parameter(segment)
        segments.append(segment if parameter is None else "{+}" if parameter[1] else "{}")
    return "/".join(segments) or "/"


class RouteTable:
    """The routes of every function's http triggers, most specific first.

    A route that another function already has is not taken (see `claim`):
    the function that claimed it first keeps it, and `conflicts(name)` says
    why the other's is missing. At start functions claim routes in name
    order; a function changed later keeps its place.
    """

    def __init__(self) -> None:
        self._claims: dict[str, list[Route]] = {}  # in the order functions claimed them
        self._ordered: list[Route] = []
        self._conflicts: dict[str, list[str]] = {}

    def function_changed(self, old: FunctionSpec | None, new: FunctionSpec | None) -> None:
        name = (new or old).name  # type: ignore[union-attr]
        routes = routes_of(new) if new is not None else []
        if routes:
            self._claims[name] = routes
        else:
            self._claims.pop(name, None)
        kept, conflicts = claim(self._claims.values())
        for function, problems in conflicts.items():
            if problems != self._conflicts.get(function):
                for problem in problems:
                    log.warning("function %s: %s", function, problem)
        self._conflicts = conflicts
        self._ordered = sorted(kept, key=lambda r: -r.literal_length)

    def conflicts(self, name: str) -> list[str]:
        return self._conflicts.get(name, [])

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        """The route for a request, with its path parameters; None if none fits.

        A route is its method and its path, as in an API Gateway HTTP API: a path
        that only another method's route has matches nothing (404, not 405).
        """
        for route in self._ordered:
            if "ANY" in route.methods or method in route.methods or (
                    method == "HEAD" and "GET" in route.methods):
                found = route.pattern.match(path)
                if found is not None:
                    return route, found.groupdict()
        return None

    def routes(self, name: str) -> list[Route]:
        """The routes `name` is served at (not those another function holds)."""
        return [route for route in self._ordered if route.function == name]


def is_text(content_type: str) -> bool:
    content_type = content_type.lower()
    return any(marker in content_type for marker in TEXT_TYPES)


_PROTOCOLS = {(1, 1): "HTTP/1.1", (1, 0): "HTTP/1.0", (2, 0): "HTTP/2.0"}


def _protocol(version: Any) -> str:
    return _PROTOCOLS.get(tuple(version)) or f"HTTP/{version.major}.{version.minor}"


_clf_second = -1
_clf_text = ""


def _clf_time(now: float) -> str:
    """API Gateway's requestContext.time (12/Mar/2020:19:03:58 +0000), formatted once a second."""
    global _clf_second, _clf_text
    second = int(now)
    if second != _clf_second:
        _clf_second = second
        _clf_text = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now))
    return _clf_text


def valid_text(value: str) -> str:
    """A header value as valid UTF-8 text. aiohttp keeps bytes that are not UTF-8
    as lone surrogates, which no JSON encoder accepts: they become U+FFFD."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


TRACE_KEY = "faasd.trace_id"  # where a request keeps the trace header made for it


def _local_address(request: web.Request) -> Any:
    """The address the request's connection was accepted on (a transport's `sockname`).

    aiohttp 3.10 and later keep it per connection (RequestHandler.sockname); asking
    the transport instead costs uvloop about a microsecond on every request."""
    try:
        return request.protocol.sockname
    except AttributeError:  # an older aiohttp
        transport = request.transport
        return transport.get_extra_info("sockname") if transport is not None else None


def _add_forwarding(request: web.Request, headers: dict[str, str], now: float) -> None:
    peer = request.remote or ""
    forwarded = headers.get("x-forwarded-for")
    headers["x-forwarded-for"] = f"{forwarded}, {peer}" if forwarded else peer
    if "x-forwarded-proto" not in headers:
        headers["x-forwarded-proto"] = request.scheme
    if "x-forwarded-port" not in headers:
        local = _local_address(request)
        if isinstance(local, tuple):  # a unix socket's name is its path
            headers["x-forwarded-port"] = str(local[1])
    trace_id = headers.get("x-amzn-trace-id")
    if trace_id is None or caller_trace_id(trace_id) is None:
        # Stored only where an authorizer's event was built first; a request's storage
        # is otherwise empty, and Mapping.get would raise and catch a KeyError to say so.
        made = request.get(TRACE_KEY) if len(request) else None
        if made is None:
            made = request[TRACE_KEY] = new_trace_id(now)
        headers["x-amzn-trace-id"] = made


def _without_port(host: str) -> str:
    """`host` (a Host header: name, IPv4 or [IPv6], maybe :port) without its port."""
    if host.startswith("["):
        return host[:host.find("]") + 1] or host
    return host.partition(":")[0]


def build_event(request: web.Request, body: bytes, *, route_key: str,
                path_parameters: dict[str, str] | None, request_id: str) -> dict[str, Any]:
    """The API Gateway HTTP API payload 2.0 event for a request.

    Its headers hold what API Gateway and function URLs add to every request:
    `x-forwarded-for` (the caller's address, after any the request came
    with), `x-forwarded-proto` and `x-forwarded-port` (unless a proxy in front
    set them: it knows the scheme and port the client used), and
    `x-amzn-trace-id`, the X-Ray trace header the function runs under: the
    caller's, or a new one, the same for a request's authorizer and function.
    """
    headers: dict[str, str] = {}
    cookies: list[str] = []
    for key, value in request.headers.items():
        lower = key.lower()
        if not value.isascii():
            value = valid_text(value)
        if lower == "cookie":
            cookies.extend(c.strip() for c in value.split(";") if c.strip())
            continue
        headers[lower] = f"{headers[lower]},{value}" if lower in headers else value
    host = request.host
    if not host.isascii():
        host = valid_text(host)
    domain = _without_port(host)  # as API Gateway's domainName: the name, never a port
    url = request.rel_url
    raw_query = url.raw_query_string
    now = time.time()
    _add_forwarding(request, headers, now)
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": url.raw_path,
        "rawQueryString": raw_query,
        "headers": headers,
        "requestContext": {
            "accountId": ACCOUNT_ID,
            "apiId": "faasd",
            "domainName": domain,
            "domainPrefix": domain.split(".")[0],
            "http": {
                "method": request.method,
                "path": url.path,
                "protocol": _protocol(request.version),
                "sourceIp": request.remote or "",
                "userAgent": headers.get("user-agent", ""),
            },
            "requestId": request_id,
            "routeKey": route_key,
            "stage": "$default",
            "time": _clf_time(now),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": False,
    }
    if cookies:
        event["cookies"] = cookies
    if raw_query:
        params: dict[str, str] = {}
        for key, value in parse_qsl(raw_query, keep_blank_values=True):
            params[key] = f"{params[key]},{value}" if key in params else value
        event["queryStringParameters"] = params
    if path_parameters:
        event["pathParameters"] = path_parameters
    if body:
        content_type = request.headers.get("Content-Type", "")
        text = None
        if is_text(content_type) or not content_type:
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                text = None
        if text is not None:
            event["body"] = text
        else:
            event["body"] = base64.b64encode(body).decode()
            event["isBase64Encoded"] = True
    return event


class MalformedResponse(ValueError):
    """A handler's return value that payload 2.0 cannot turn into a response; says why."""


def build_response(payload: bytes | None) -> web.Response:
    """Turn a handler's return value into the HTTP response, by payload 2.0 rules.

    A dict with `statusCode` is the response; it must have API Gateway's
    shape, or MalformedResponse says what is wrong with it. Any other value
    is the JSON body of a 200. Payload 2.0 has no `multiValueHeaders`: an
    HTTP API and a function URL ignore them, and so does faasd.
    """
    if payload is None:
        return web.Response(status=200, body=b"null", content_type="application/json")
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        value = _streamed_response(payload)
        if value is None:
            raise MalformedResponse("the response is not JSON") from None
    if not isinstance(value, dict) or "statusCode" not in value:
        return web.Response(status=200, body=payload, content_type="application/json")
    status, headers = response_head(value)
    body = value.get("body")
    encoded = value.get("isBase64Encoded")
    if encoded is not None and not isinstance(encoded, bool):
        raise MalformedResponse(f"isBase64Encoded must be true or false, not {_kind(encoded)}")
    if body is None:
        data = b""
    elif isinstance(body, bytes):  # a streamed response's body, as it came
        data = body
    elif not isinstance(body, str):
        raise MalformedResponse(f"body must be a string, not {_kind(body)}")
    elif encoded:
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedResponse("isBase64Encoded is true but the body is not valid base64") from None
    else:
        data = body.encode()
    if "Content-Type" not in headers and data:
        headers["Content-Type"] = "application/json"
    return web.Response(status=status, body=data, headers=headers)


def response_head(value: dict[str, Any]) -> tuple[int, CIMultiDict[str]]:
    """The status and headers (cookies among them) of a payload 2.0 response, or of a
    streamed response's HttpResponseStream metadata; MalformedResponse says what is wrong."""
    status = value["statusCode"]
    if isinstance(status, str) and status.isdigit():
        status = int(status)
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise MalformedResponse(f"statusCode {value['statusCode']!r} is not an HTTP status code")
    if status < 200:
        # An informational status is no final answer: the client would wait on
        # for one (or, after 101, speak another protocol).
        raise MalformedResponse(f"statusCode {status} is an informational status, not a response's")
    headers: CIMultiDict[str] = CIMultiDict()
    single = value.get("headers")
    if single:
        if not isinstance(single, dict):
            raise MalformedResponse(f"headers must be an object, not {_kind(single)}")
        for key, item in single.items():
            if key.lower() not in DROPPED_RESPONSE_HEADERS:
                headers[_header_name(key)] = _header_value(key, item)
    cookies = value.get("cookies")
    if cookies:
        if not isinstance(cookies, list):
            raise MalformedResponse(f"cookies must be a list of strings, not {_kind(cookies)}")
        for cookie in cookies:
            if not isinstance(cookie, str):
                raise MalformedResponse(f"cookies must be a list of strings; one is {_kind(cookie)}")
            headers.add("Set-Cookie", _header_value("Set-Cookie", cookie))
    return status, headers


# A streamed response with HttpResponseStream metadata (Lambda's
# application/vnd.awslambda.http-integration-response): a JSON prelude, then
# eight NUL bytes, then the body.
PRELUDE_END = bytes(8)


def streamed_head(data: bytes) -> tuple[dict[str, Any] | None, bytes] | None:
    """The start of a streamed response, as a function URL reads it: (the
    HttpResponseStream metadata, as payload 2.0's response without its body, and the
    body's first bytes), or (None, b"") when the stream has no metadata (its bytes are
    a return value); None while `data` is too short to tell."""
    if not data.startswith(b"{"):
        return None if not data else (None, b"")
    prelude, end, body = data.partition(PRELUDE_END)
    if not end:
        return None
    value = _streamed_response(prelude + end)
    return (value, body) if value is not None else (None, b"")


def _streamed_response(payload: bytes) -> dict[str, Any] | None:
    """What a function URL answers a streamed response with: the prelude's
    statusCode (200 if absent), headers and cookies, and the body as it is.
    None if `payload` is not such a response."""
    prelude, end, body = payload.partition(PRELUDE_END)
    if not end:
        return None
    try:
        metadata = orjson.loads(prelude)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(metadata, dict):
        return None
    return {"statusCode": 200, **metadata, "body": body}


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# What a header value cannot carry (RFC 9110 5.5): the control characters but
# the tab. CR and LF would start a header of the handler's making; each is a space.
_CONTROLS = {code: " " for code in [*range(0x09), *range(0x0a, 0x20), 0x7f]}


def _header_name(name: str) -> str:
    if _TOKEN.fullmatch(name) is None:
        raise MalformedResponse(f"{name!r} is not a valid header name")
    return name


def _header_value(name: str, item: Any) -> str:
    if isinstance(item, str):
        return item.translate(_CONTROLS)
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, (int, float)):
        return str(item)
    raise MalformedResponse(f"header {name!r} must have a string value, not {_kind(item)}")


def _kind(value: Any) -> str:
    """A JSON value's type, as an error message names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def error_response(status: int, message: str, headers: dict[str, str] | None = None,
                   **fields: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"message": message, **fields}),
                        content_type="application/json", headers=headers)


FAILURE_MESSAGES = {502: "Internal Server Error", 504: "Endpoint request timed out"}


def failure_response(error: FunctionError, request_id: str) -> web.Response:
    """A failed invocation as the HTTP caller sees it: no traceback, just a status."""
    status = error.http_status
    return error_response(status, FAILURE_MESSAGES.get(status, "Internal Server Error"),
                          {"X-Amzn-ErrorType": error.error_type, "apigw-requestid": request_id})
