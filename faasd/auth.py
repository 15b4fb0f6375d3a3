"""Who may call what: the daemon's API authentication, and HTTP trigger authorizers.

With `[auth] keys` set (access key id -> secret):
  * the Lambda API (`/2015-03-31/...` and Lambda's other dated paths) checks
    AWS Signature Version 4 as AWS does -- canonical request, string to sign,
    signing key, a clock skew of at most 5 minutes, the body's SHA-256 -- so
    boto3 and the aws CLI configured with a key work unchanged. Failures are
    403s in Lambda's error shape (`{"Type": "User", "message"}` with
    `x-amzn-ErrorType`: MissingAuthenticationTokenException,
    IncompleteSignatureException, InvalidSignatureException or
    UnrecognizedClientException), which botocore raises as ClientError;
  * `/system/*`, `/metrics` and `/ui/` want `Authorization: Bearer <secret>`
    (or HTTP Basic with the key id and secret, which browsers can send).
Without keys, nothing is checked, and `check_exposure()` keeps the daemon on
loopback unless `--insecure` says otherwise.

HTTP triggers are public unless a trigger sets `auth`:
  * `auth = "key"`: `Authorization: Bearer <secret>`, `x-api-key: <secret>`,
    or a SigV4 signature (service `execute-api`, as API Gateway's IAM
    authorization) made with one of the keys;
  * `auth = "function:NAME"`: the function NAME is invoked first with API
    Gateway's Lambda authorizer event (payload 2.0) and answers
    `{"isAuthorized": bool, "context": {...}}` (or an IAM policy); the
    context reaches the handler as `event.requestContext.authorizer.lambda`.
`/function/NAME` is guarded like the function's most guarded http trigger,
so an authorizer cannot be bypassed through it.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import logging
import socket
from typing import TYPE_CHECKING, Any, Mapping

import orjson
from multidict import CIMultiDict
from aiohttp import web

from .api import BODY_KEY, host_name, on_lambda_api, read_body
from .config import Config, ConfigError
from .errors import AccessDenied, InvokeRefused
from .sigv4 import ALGORITHM, AuthError, precheck_sigv4, verify_sigv4
from .spec import ACCOUNT_ID, FunctionSpec, new_request_id

if TYPE_CHECKING:
    from .daemon import Daemon
    from .triggers.http import Route

log = logging.getLogger("faasd.auth")

OPERATOR_PREFIXES = ("/system/", "/ui/")
OPERATOR_PATHS = ("/system", "/metrics", "/ui")

# -- bearer secrets --------------------------------------------------------------------

def bearer_key(header: str | None, keys: Mapping[str, str], api_key: str | None = None) -> str | None:
    """The access key id whose secret the request presents, or None.

    Accepts `Authorization: Bearer <secret>`, `Authorization: Basic <id:secret>`
    and, where given, an `x-api-key` value. Every secret is compared in
    constant time.
    """
    presented: str | None = None
    claimed: str | None = None
    if header:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            presented = value.strip()
        elif scheme.lower() == "basic":
            try:
                claimed, _, presented = base64.b64decode(value.strip(), validate=True) \
                    .decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
    if presented is None and api_key:
        presented = api_key.strip()
    if not presented:
        return None
    found = None
    for key_id, secret in keys.items():
        # A header's bytes that are not UTF-8 are lone surrogates here: compared as sent.
        if hmac.compare_digest(secret.encode(), presented.encode("utf-8", "surrogateescape")) \
                and claimed in (None, key_id):
            found = key_id
    return found


# -- where the checks apply ------------------------------------------------------------

def is_operator_path(path: str) -> bool:
    return path in OPERATOR_PATHS or path.startswith(OPERATOR_PREFIXES) or path.startswith("/metrics/")


def lambda_error(error: AuthError) -> web.Response:
    return web.Response(status=error.status, content_type="application/json",
                        body=orjson.dumps({"Type": "User", "message": error.message}),
                        headers={"x-amzn-ErrorType": error.error_type,
                                 "x-amzn-RequestId": new_request_id()})


def operator_refusal(present: bool) -> web.Response:
    message = ("the bearer secret is not one of [auth] keys" if present else
               "authentication required: send Authorization: Bearer <secret> of an [auth] key")
    return web.Response(status=401, content_type="application/json",
                        body=orjson.dumps({"message": message}),
                        # One challenge per header: browsers only find Basic (and
                        # prompt) when it is not folded into the Bearer challenge.
                        headers=CIMultiDict([("WWW-Authenticate", 'Basic realm="faasd"'),
                                             ("WWW-Authenticate", 'Bearer realm="faasd"')]))


async def read_body_once(request: web.Request, limit: int) -> bytes:
    """The body, read once and kept on the request for the handler (faasd/api.py read_body)."""
    body = await read_body(request, limit)
    request[BODY_KEY] = body
    return body


class Keys:
    """The [auth] keys in force; a config reload (SIGHUP) replaces them."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.current: dict[str, str] = dict(daemon.config.auth.keys)

    def reload(self, old: Config, new: Config) -> set[str]:
        address = self.daemon.address
        exposed = address is not None and not is_loopback(str(address[0]))
        if self.current and not new.auth.keys and exposed and not new.server.insecure:
            log.error("reload: the new config has no [auth] keys but faasd listens on %s: "
                      "keeping the current keys until a restart (or pass --insecure)", address[0])
            return set()
        if new.auth.keys != self.current:
            log.info("reload: %d [auth] keys in force", len(new.auth.keys))
        self.current = dict(new.auth.keys)
        return set()


class RequestGuard:
    """Checks a request to the Lambda API or an operator path, while [auth] keys are set.

    faasd/api.py's one middleware calls it before any handler, and only while
    `active` (keys are configured): without keys it costs a request nothing.
    """

    def __init__(self, daemon: "Daemon", state: Keys) -> None:
        self._state = state
        self.limit = daemon.config.server.max_body_bytes

    @property
    def active(self) -> bool:
        return bool(self._state.current)

    async def check(self, request: web.Request) -> web.Response | None:
        """A refusal, or None when the request may go on."""
        keys = self._state.current
        # Classify by the decoded and the raw path alike: `%2F` and friends
        # cannot move a request out from under a check.
        if on_lambda_api(request):
            try:
                # The cheap checks first: an unsigned caller costs no upload.
                precheck_sigv4(request.rel_url.raw_query_string, request.headers, keys,
                               service="lambda")
                body = await read_body_once(request, self.limit)
                verify_sigv4(request.method, request.rel_url.raw_path,
                             request.rel_url.raw_query_string, request.headers, body, keys,
                             service="lambda")
            except AuthError as exc:
                log.info("refused %s %s from %s: %s", request.method, request.path,
                         request.remote, exc.error_type)
                return lambda_error(exc)
            except InvokeRefused as exc:
                from .lambda_api import service_error

                return service_error(exc)
        elif any(is_operator_path(p) for p in (request.path, request.rel_url.raw_path)):
            header = request.headers.get("Authorization")
            if bearer_key(header, keys) is None:
                return operator_refusal(bool(header))
        return None


class LoopbackHosts:
    """Without [auth] keys, where faasd listens on loopback: refuses requests whose Host
    names faasd by anything but `localhost` or an IP address.

    Such an API is open to whoever can connect, which loopback keeps to this
    machine's users, but not to the web pages their browsers show: a page
    whose own domain is resolved again to 127.0.0.1 (DNS rebinding) reaches
    faasd as same-origin and can read what it answers (every function's
    [env], through GetFunction). Its requests carry that domain as Host.
    """

    def __init__(self) -> None:
        self._known: dict[str, bool] = {}  # Host header -> allowed

    def refusal(self, request: web.Request) -> web.Response | None:
        host = request.headers.get("Host")
        if host is None:
            return None  # HTTP/1.0 without Host: no browser sends that
        allowed = self._known.get(host)
        if allowed is None:
            if len(self._known) >= 1024:
                self._known.clear()
            allowed = self._known[host] = names_this_machine(host)
        if allowed:
            return None
        log.info("refused %s %s from %s: Host %r", request.method, request.path, request.remote, host)
        message = (f"Host {host!r} is refused: without [auth] keys faasd answers only requests that name "
                   "it by localhost or an IP address, not a page of another site reaching it through "
                   "DNS rebinding; set [auth] keys to serve other names")
        if on_lambda_api(request):
            from .lambda_api import service_error

            return service_error(AccessDenied(message))  # Lambda's 403, which botocore names
        return web.json_response({"message": message}, status=403)


def names_this_machine(host: str) -> bool:
    """Whether a Host header (name or address, maybe with a port) is `localhost`, a name
    under it, or an IP address: nothing a DNS server of another site answers for."""
    name = host_name(host)
    if name is None:
        return False
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# -- HTTP trigger auth -----------------------------------------------------------------

def function_auth(spec: FunctionSpec | None) -> str | None:
    """What guards `/function/NAME`: the function's most guarded http trigger."""
    if spec is None:
        return None
    settings = [t.get("auth") for t in spec.triggers if t.type == "http" and t.get("auth")]
    authorizers = [s for s in settings if s.startswith("function:")]
    if authorizers:
        return authorizers[0]
    return "key" if settings else None


class TriggerAuth:
    """Checks a request to an HTTP trigger before its function is invoked."""

    def __init__(self, daemon: "Daemon", keys: Keys) -> None:
        self.daemon = daemon
        self._keys = keys
        self.limit = daemon.config.server.max_body_bytes
        self._by_function: dict[str, tuple[FunctionSpec, str | None]] = {}

    @property
    def keys(self) -> dict[str, str]:
        return self._keys.current

    def setting(self, function: str, route: "Route | None") -> str | None:
        """What guards this request: None (public), "key" or "function:NAME"."""
        if route is not None:
            return route.auth
        spec = self.daemon.registry.get(function)
        if spec is None:
            return None
        cached = self._by_function.get(function)
        if cached is None or cached[0] is not spec:
            cached = self._by_function[function] = (spec, function_auth(spec))
        return cached[1]

    async def check(self, request: web.Request, setting: str, route_key: str,
                    path_parameters: dict[str, str] | None
                    ) -> tuple[web.Response | None, dict[str, Any] | None]:
        """(a refusal, or None) and the `requestContext.authorizer` the handler sees."""
        if setting == "key":
            return await self._key(request)
        return await self._authorizer(request, setting.split(":", 1)[1], route_key, path_parameters)

    async def _key(self, request: web.Request) -> tuple[web.Response | None, dict[str, Any] | None]:
        header = request.headers.get("Authorization", "")
        key_id = None
        if header.startswith(ALGORITHM):
            try:
                raw_query = request.rel_url.raw_query_string
                precheck_sigv4(raw_query, request.headers, self.keys, service="execute-api")
                body = await read_body_once(request, self.limit)
                key_id = verify_sigv4(request.method, request.rel_url.raw_path, raw_query,
                                      request.headers, body, self.keys, service="execute-api")
            except AuthError:
                return _http_refusal(403, "Forbidden"), None
        else:
            key_id = bearer_key(header, self.keys, request.headers.get("x-api-key"))
            if key_id is None:
                present = bool(header or request.headers.get("x-api-key"))
                return _http_refusal(403 if present else 401,
                                     "Forbidden" if present else "Unauthorized"), None
        return None, {"iam": {"accessKey": key_id, "accountId": ACCOUNT_ID, "callerId": key_id,
                              "principalOrgId": None, "userId": key_id,
                              "userArn": f"arn:aws:iam::{ACCOUNT_ID}:user/{key_id}"}}

    async def _authorizer(self, request: web.Request, name: str, route_key: str,
                          path_parameters: dict[str, str] | None
                          ) -> tuple[web.Response | None, dict[str, Any] | None]:
        from .triggers.http import build_event

        event = build_event(request, b"", route_key=route_key, path_parameters=path_parameters,
                            request_id=new_request_id())
        region = self.daemon.region
        event.pop("body", None)
        event.pop("isBase64Encoded", None)
        method = request.method
        event.update({
            "type": "REQUEST",
            "routeArn": f"arn:aws:execute-api:{region}:{ACCOUNT_ID}:faasd/$default/{method}{request.path}",
            "identitySource": [v for v in [request.headers.get("Authorization")] if v],
            "stageVariables": {},
        })
        try:
            invocation = await self.daemon.invoker.invoke(name, orjson.dumps(event), source="authorizer",
                                                          trace_id=event["headers"]["x-amzn-trace-id"])
        except InvokeRefused as exc:
            log.warning("authorizer %s refused the call: %s", name, exc.message)
            status = exc.status if exc.status in (429, 503) else 502
            return _http_refusal(status, "Internal Server Error" if status == 502 else exc.message), None
        if invocation.error is not None:
            log.warning("authorizer %s failed: %s: %s", name, invocation.error.error_type,
                        invocation.error.message)
            return _http_refusal(502, "Internal Server Error"), None
        try:
            answer = orjson.loads(invocation.payload or b"null")
        except orjson.JSONDecodeError:
            answer = None
        allowed, context = _authorizer_answer(answer)
        if allowed is None:
            log.warning("authorizer %s returned neither isAuthorized nor a policyDocument", name)
            return _http_refusal(502, "Internal Server Error"), None
        if not allowed:
            return _http_refusal(403, "Forbidden"), None
        return None, {"lambda": context}


def _authorizer_answer(answer: Any) -> tuple[bool | None, dict[str, Any]]:
    """(allowed, context) from a simple response or an IAM policy; (None, {}) if neither."""
    if not isinstance(answer, dict):
        return None, {}
    context = answer.get("context") if isinstance(answer.get("context"), dict) else {}
    if "isAuthorized" in answer:
        return answer["isAuthorized"] is True, context
    policy = answer.get("policyDocument")
    if isinstance(policy, dict):
        statements = policy.get("Statement")
        if isinstance(statements, dict):
            statements = [statements]
        if not isinstance(statements, list):
            return False, context
        effects = {str(s.get("Effect", "")).lower() for s in statements if isinstance(s, dict)}
        return "allow" in effects and "deny" not in effects, context
    return None, {}


def _http_refusal(status: int, message: str) -> web.Response:
    return web.Response(status=status, content_type="application/json",
                        body=orjson.dumps({"message": message}))


# -- start-up --------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """True when every address `host` stands for is a loopback address."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_exposure(config: Config, sock: socket.socket | None = None) -> str:
    """Refuse (ConfigError) an open API on a non-loopback address; else say how it is guarded."""
    if sock is not None and sock.family == socket.AF_UNIX and not config.auth.keys:
        # A unix socket (systemd socket activation) is guarded by its file's permissions.
        return f"listening on the unix socket {sock.getsockname()}: open to whoever may connect to it"
    if sock is not None:
        try:
            host = str(sock.getsockname()[0])
        except (OSError, IndexError):
            host = "?"
    else:
        host = config.server.host
    keys = config.auth.keys
    if keys:
        return (f"API authentication on ({len(keys)} key{'s' if len(keys) != 1 else ''}): "
                "SigV4 for the Lambda API, a bearer secret for /system, /metrics and /ui/")
    if is_loopback(host):
        return (f"no [auth] keys: the API is open to anyone who can connect, so faasd "
                f"listens on loopback only ({host})")
    if not config.server.insecure:
        raise ConfigError(
            f"[server] host = {host!r} is not a loopback address and no [auth] keys are set: "
            "anyone who can reach it could invoke, list and read every function. Set [auth] keys, "
            "listen on 127.0.0.1, or pass --insecure to accept an open API")
    return (f"--insecure: the API on {host} is OPEN to anyone who can reach it "
            "(no [auth] keys are set)")


class _ClientErrorFilter(logging.Filter):
    """aiohttp logs every malformed request with a traceback at ERROR: a client
    could fill the log with them. They become one INFO line each."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            first = str(exc.message).strip().splitlines()[0] if exc.message else ""
            record.msg, record.args = "refused a malformed request: %s %s", (exc.code, first[:200])
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


async def start(daemon: "Daemon") -> None:
    """Extension: the API request guard, trigger auth and the OpenAPI document."""
    from .openapi import openapi_handler

    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientErrorFilter) for f in server_log.filters):
        server_log.addFilter(_ClientErrorFilter())

    keys = Keys(daemon)
    daemon.reload_hooks.append(keys.reload)
    daemon.http_auth = TriggerAuth(daemon, keys)
    daemon.request_guard = RequestGuard(daemon, keys)
    guarded = [(name, t.get("auth")) for name, spec in daemon.registry.specs.items()
               for t in spec.triggers if t.type == "http" and t.get("auth") == "key"]
    if guarded and not keys.current:
        log.warning("http triggers with auth = \"key\" (%s) refuse every request: no [auth] keys are set",
                    ", ".join(sorted({name for name, _ in guarded})))

    def routes(app: web.Application) -> None:
        app.router.add_get("/openapi.json", openapi_handler(daemon))

    daemon.route_hooks.append(routes)
