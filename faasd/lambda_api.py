"""AWS Lambda's own API, so boto3 and the aws CLI talk to faasd as to Lambda.

Invoke (`POST /2015-03-31/functions/NAME/invocations`),
InvokeWithResponseStream (`POST /2021-11-15/functions/NAME/response-streaming-invocations`,
whose answer is an event stream: faasd/eventstream.py), the deprecated
InvokeAsync (`POST /2014-11-13/functions/NAME/invoke-async`) and the read-only
operations that deploy scripts, waiters and inventory tools use
(ListFunctions, GetFunction, GetFunctionConfiguration,
GetFunctionConcurrency, ListVersionsByFunction, ListAliases, ListTags,
GetAccountSettings, GetFunctionEventInvokeConfig and its List,
GetFunctionUrlConfig and its List, GetPolicy, ListLayers,
GetFunctionRecursionConfig), each telling what faasd does: the event invoke
config is the function's `[async]`, its URL `/function/NAME/`, and there
are no resource policies, layers or loop detection. All with Lambda's
headers, status codes and error shapes: service errors carry
`x-amzn-ErrorType` and `{"Type", "message"}` (`"Message"` for
ResourceNotFoundException, as botocore's model spells it; only
`{"message"}` for ValidationException, as AWS's front end answers), which
botocore turns into `ResourceNotFoundException` and friends; which one a
bad request gets is in faasd/errors.py. Any other Lambda API operation gets
501 `NotImplemented` saying what faasd serves: functions are files in
functions/, so there is no CreateFunction or UpdateFunctionCode.

A function is named as Lambda allows: `NAME`, `NAME:QUALIFIER`,
`ACCOUNT:function:NAME` or the full ARN; the only version is `$LATEST`.
Each operation holds the name in its path (and its `?Qualifier=`) to the
shape Lambda's API model gives that member, as AWS's front end does: a
value outside it is ValidationException, quoting the shape's pattern or
length; a well-formed name of no function here is ResourceNotFoundException.
`InvocationType=Event` answers 202 only once the event is committed to the
asynchronous queue (faasd/queue.py); in a cluster, an Event (or InvokeAsync)
of a function this node does not have is queued too when another live node
has it (a rolling deploy), as a function exists for Lambda region-wide,
not per machine. Its request id, the qualified ARN the
caller named and the caller's `X-Amzn-Trace-Id` are what the handler sees on
every attempt. A call's `X-Amzn-Trace-Id` is the `_X_AMZN_TRACE_ID` it runs
under; without one, the runtime makes a new one for it.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import functools
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import orjson
from aiohttp import web

from .errors import (
    FunctionNotFound, InvalidParameter, InvalidRequest, InvokeRefused, PayloadTooLarge, Throttled, ValidationFailed,
)
from .eventstream import encode_event
from .streaming import ResponseStream
from .spec import (
    FunctionSpec, caller_trace_id, code_sha256, config_file_of, function_arn, new_request_id, runtime_id,
    valid_name,
)
from .triggers.http import valid_text

if TYPE_CHECKING:
    from .daemon import Daemon
    from .invoker import Invocation

API = "/2015-03-31"
RUNTIME_API_PREFIX = "/2018-06-01/"  # the Lambda Runtime API: workers' own, not the Lambda API
SERVED = ("Invoke, InvokeWithResponseStream, InvokeAsync, ListFunctions, GetFunction, GetFunctionConfiguration, "
          "GetFunctionConcurrency, ListVersionsByFunction, ListAliases, ListTags, GetAccountSettings, "
          "GetFunctionEventInvokeConfig, ListFunctionEventInvokeConfigs, GetFunctionUrlConfig, "
          "ListFunctionUrlConfigs, GetPolicy, ListLayers and GetFunctionRecursionConfig")
# AccountLimit's code sizes, as Lambda states them; faasd enforces none of them.
CODE_SIZE_LIMITS = {"TotalCodeSize": 80530636800, "CodeSizeUnzipped": 262144000, "CodeSizeZipped": 52428800}
MAX_EVENT_BYTES = 1024 * 1024  # Lambda's limit for an asynchronous invocation's payload
MAX_INVOKE_ASYNC_BYTES = 256 * 1024  # and for InvokeAsync's ("The payload limit is 256KB")
INVOKE_ASYNC = "InvokeAsync"  # read_payload's name for that operation's payload
# The enums of Lambda's API model, in its order (and so in AWS's refusals).
LOG_TYPES = ("None", "Tail")
INVOCATION_TYPES = ("Event", "RequestResponse", "DryRun")
STREAM_INVOCATION_TYPES = ("RequestResponse", "DryRun")  # InvokeWithResponseStream has no Event
MAX_LIST_ITEMS = 10000  # ListFunctions' MaxItems: 1 to 10000
LIST_PAGE = 50  # but "ListFunctions returns a maximum of 50 items in each response"
# A route's function name: any path segment, an empty one or one with braces
# too, so that a name outside Lambda's model gets its ValidationException,
# not an unknown operation's answer.
NAME_SEGMENT = "{name:[^/]*}"
EVENT_STREAM = "application/vnd.amazon.eventstream"
STREAM_CHUNK = 64 * 1024  # the most result bytes in one PayloadChunk event


def answer(body: Any) -> web.Response:
    """A read operation's 200 answer: its JSON, and the request id every AWS
    answer carries (botocore's ResponseMetadata.RequestId)."""
    return web.Response(body=orjson.dumps(body), content_type="application/json",
                        headers={"x-amzn-RequestId": new_request_id()})


def service_error(exc: InvokeRefused, request_id: str = "") -> web.Response:
    headers = {"x-amzn-ErrorType": exc.error_type, "x-amzn-RequestId": request_id or new_request_id()}
    body = exc.to_lambda()
    if isinstance(exc, FunctionNotFound):
        body = {"Type": "User", "Message": exc.message}
    if isinstance(exc, Throttled):
        headers["Retry-After"] = "1"  # botocore: TooManyRequestsException.retryAfterSeconds
    return web.Response(status=exc.status, body=orjson.dumps(body),
                        content_type="application/json", headers=headers)


# Lambda's ServiceException, as its API reference words it: what faasd answers on a
# Lambda API path when it fails in a way it did not foresee (the log has the traceback).
SERVICE_ERROR = "The Lambda service encountered an internal error."


def function_configuration(spec: FunctionSpec, region: str, python: str, version: bool = False) -> dict[str, Any]:
    """FunctionConfiguration as Lambda returns it (`python`: the Python workers' interpreter).
    That of the version `$LATEST` (`version`), as a caller that names it gets it,
    has the version's ARN: the function's, qualified."""
    modified = _modified(spec)
    config: dict[str, Any] = {
        "FunctionName": spec.name,
        "FunctionArn": function_arn(spec.name, region) + (":$LATEST" if version else ""),
        "Runtime": runtime_id(spec.runtime, python),
        "Role": f"arn:aws:iam::000000000000:role/faasd-{spec.name}",
        "Handler": spec.handler,
        "CodeSize": _code_size(spec),
        "Description": "",
        "Timeout": max(1, int(round(spec.timeout_s))),
        "MemorySize": spec.memory_mb,
        "LastModified": lambda_time(modified),
        "CodeSha256": code_sha256(spec),
        "Version": "$LATEST",
        "Environment": {"Variables": dict(spec.env)},
        "TracingConfig": {"Mode": "PassThrough"},
        "RevisionId": spec.revision,
        "PackageType": "Zip",
        "Architectures": ["x86_64"],
        "EphemeralStorage": {"Size": spec.tmp_mb},
        "LoggingConfig": logging_config(spec),
        "State": "Failed" if spec.load_error else "Active",
        "LastUpdateStatus": "Failed" if spec.load_error else "Successful",
    }
    if spec.load_error:
        config["StateReason"] = spec.load_error
        config["StateReasonCode"] = "InvalidCode"
    return config


# What ListFunctions leaves out of each FunctionConfiguration: GetFunction's to tell.
NOT_LISTED = frozenset(("State", "StateReason", "StateReasonCode", "LastUpdateStatus", "LastUpdateStatusReason",
                        "LastUpdateStatusReasonCode", "RuntimeVersionConfig"))


def listed(config: dict[str, Any]) -> dict[str, Any]:
    """A FunctionConfiguration as ListFunctions gives it: without its state."""
    return {key: value for key, value in config.items() if key not in NOT_LISTED}


def logging_config(spec: FunctionSpec) -> dict[str, str]:
    """Lambda's LoggingConfig: the levels only with JSON logs, as Lambda reports them."""
    config = {"LogFormat": spec.log_format}
    if spec.application_log_level is not None:
        config["ApplicationLogLevel"] = spec.application_log_level
    if spec.system_log_level is not None:
        config["SystemLogLevel"] = spec.system_log_level
    config["LogGroup"] = f"/aws/lambda/{spec.name}"
    return config


def event_invoke_config(spec: FunctionSpec, region: str) -> dict[str, Any]:
    """FunctionEventInvokeConfig: the function's `[async]` settings. A destination
    is a function's ARN; the dead-letter dir (`on_failure = "dir"`) is faasd's
    own and has none, so it shows as no destination."""
    settings = spec.async_config
    destinations: dict[str, Any] = {"OnSuccess": {}, "OnFailure": {}}
    for key, target in (("OnSuccess", settings.on_success), ("OnFailure", settings.on_failure)):
        if target and target.startswith("function:"):
            destinations[key] = {"Destination": function_arn(target.split(":", 1)[1], region)}
    return {
        "LastModified": _modified(spec),
        "FunctionArn": function_arn(spec.name, region) + ":$LATEST",
        "MaximumRetryAttempts": settings.max_retries,
        "MaximumEventAgeInSeconds": int(settings.max_event_age_s),
        "DestinationConfig": destinations,
    }


def url_config(spec: FunctionSpec, region: str, base: str, auth: str | None) -> dict[str, Any]:
    """FunctionUrlConfig: every function answers at `/function/NAME/` (`base` is
    this daemon's scheme and host as the caller reached it). AuthType is
    AWS_IAM where a key guards it (SigV4 is accepted there) and NONE where it
    is public or, beyond what a Lambda URL can say, guarded by an authorizer
    function."""
    modified = lambda_time(_modified(spec))
    return {
        "FunctionUrl": f"{base}/function/{spec.name}/",
        "FunctionArn": function_arn(spec.name, region),
        "AuthType": "AWS_IAM" if auth == "key" else "NONE",
        "CreationTime": modified,
        "LastModifiedTime": modified,
        "InvokeMode": "BUFFERED",
    }


def lambda_time(when: float) -> str:
    """A time as Lambda writes LastModified: UTC, to the millisecond, `+0000`."""
    seconds, micros = divmod(round(when * 1_000_000), 1_000_000)  # whole microseconds: no float noise
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros // 1000:03d}+0000"


def _modified(spec: FunctionSpec) -> float:
    """When the function's code or settings last changed: the newest of their files."""
    source = spec.source
    paths = [source, *(p for p in source.rglob("*") if p.is_file())] if source.is_dir() else [source]
    config = config_file_of(source)
    if config is not None:
        paths.append(config)
    times = []
    for path in paths:
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            pass  # gone since it was listed
    return max(times, default=time.time())


def _code_size(spec: FunctionSpec) -> int:
    if spec.source.is_file():
        return spec.source.stat().st_size
    return sum(p.stat().st_size for p in spec.source.rglob("*") if p.is_file())


MAX_CLIENT_CONTEXT = 3583  # Lambda's limit, in characters of base64


def client_context(request: web.Request) -> dict[str, Any] | None:
    """`X-Amz-Client-Context` (boto3's ClientContext): base64 of a JSON object,
    which the handler sees as `context.client_context`. As in Lambda, only a
    synchronous call passes it on; any call with a malformed one is refused."""
    text = request.headers.get("X-Amz-Client-Context")
    if not text:
        return None
    if len(text) > MAX_CLIENT_CONTEXT:
        raise InvalidRequest(f"Client context must be at most {MAX_CLIENT_CONTEXT} characters of "
                             f"base64, not {len(text)}")
    try:
        value = orjson.loads(base64.b64decode(text, validate=True))
    except ValueError:  # binascii.Error and orjson.JSONDecodeError both are
        value = None
    if not isinstance(value, dict):
        raise InvalidRequest("Client context must be a valid Base64-encoded JSON object.")
    return value


@dataclass(frozen=True)
class Call:
    """An Invoke-style request, checked: what to run, on what, and what to send back."""

    function: str  # an Event's may be on other nodes of the cluster only (queue_target)
    invoked_arn: str | None  # the ARN the caller named with a qualifier; None: the function's own
    payload: bytes
    client_context: dict[str, Any] | None
    tail: bool  # X-Amz-Log-Type: Tail
    trace_id: str | None  # the caller's X-Amzn-Trace-Id; None: the runtime makes one


Problem = tuple[str, str, str]  # (member, value, constraint), as ValidationFailed takes them


def enum_problems(*headers: tuple[str, str, tuple[str, ...]]) -> list[Problem]:
    """Header values outside Lambda's enums, each given as (member, value, allowed)."""
    return [(member, valid_text(value)[:100], f"Member must satisfy enum value set: [{', '.join(allowed)}]")
            for member, value, allowed in headers if value not in allowed]


@dataclass(frozen=True)
class Constraint:
    """A string member of Lambda's API model: AWS's front end refuses a value
    of the wrong length, or one its pattern does not match whole, before
    Lambda looks anything up."""

    member: str  # as AWS's refusals name it
    pattern: str  # as the model spells it, and so as AWS's refusals quote it
    max_length: int

    @functools.cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)

    def problems(self, value: str) -> list[Problem]:
        shown = valid_text(value)
        found = []
        if not value:
            found.append((self.member, shown, "Member must have length greater than or equal to 1"))
        elif len(value) > self.max_length:
            found.append((self.member, shown, f"Member must have length less than or equal to {self.max_length}"))
        if self.regex.fullmatch(value) is None:
            found.append((self.member, shown, f"Member must satisfy regular expression pattern: {self.pattern}"))
        return found


# The shapes of Lambda's API model (botocore's data/lambda/2015-03-31/service-2.json)
# that name a function in a request's path or its `?Qualifier=`, under their names there.
_ARN_HEAD = (r"(arn:(aws[a-zA-Z-]*)?:lambda:)?((eusc-)?[a-z]{2}((-gov)|(-iso([a-z]?)))?-[a-z]+-\d{1}:)?"
             r"(\d{12}:)?(function:)?")  # what the function-name shapes begin with
NAMESPACED_FUNCTION_NAME = Constraint(
    "functionName", _ARN_HEAD + r"([a-zA-Z0-9-_\.]+)(:(\$LATEST(\.PUBLISHED)?|[a-zA-Z0-9-_]+))?", 256)
FUNCTION_NAME = Constraint("functionName", _ARN_HEAD + r"([a-zA-Z0-9-_]+)(:(\$LATEST|[a-zA-Z0-9-_]+))?", 140)
UNQUALIFIED_FUNCTION_NAME = Constraint("functionName", _ARN_HEAD + r"([a-zA-Z0-9-_]+)", 140)
FUNCTION_URL_FUNCTION_NAME = Constraint(
    "functionName", _ARN_HEAD + r"([a-zA-Z0-9-_]{1,64})(:((?!\d+$)[0-9a-zA-Z-_]+))?", 140)
TAGGABLE_RESOURCE = Constraint(
    "resource", r"arn:(aws[a-zA-Z-]*):lambda:(eusc-)?[a-z]{2}((-gov)|(-iso([a-z]?)))?-[a-z]+-\d{1}:\d{12}:"
    r"(function:[a-zA-Z0-9-_]+(:(\$LATEST|[a-zA-Z0-9-_]+))?|code-signing-config:csc-[a-z0-9]{17}|"
    r"event-source-mapping:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|"
    r"(capacity-provider|network-connector):[a-zA-Z0-9-_]{1,64})", 10000)
NUMERIC_LATEST_PUBLISHED_OR_ALIAS_QUALIFIER = Constraint(
    "qualifier", r"\$(LATEST(\.PUBLISHED)?)|[a-zA-Z0-9-_$]+", 128)
FUNCTION_URL_QUALIFIER = Constraint("qualifier", r"((?!^\d+$)^[0-9a-zA-Z-_]+$)", 128)
TENANT_ID = Constraint("tenantId", r"[a-zA-Z0-9\._:\/=+\-@ ]+", 256)  # Invoke's X-Amz-Tenant-Id


@dataclass(frozen=True)
class Naming:
    """How an operation names its function: the member in its path, and its
    `?Qualifier=` where it has one (an operation without one ignores it, as AWS does)."""

    function: Constraint
    qualifier: Constraint | None = None


# Invoke, InvokeWithResponseStream, GetFunction, GetFunctionConfiguration,
# GetFunctionEventInvokeConfig and GetPolicy name a function alike.
QUALIFIED = Naming(NAMESPACED_FUNCTION_NAME, NUMERIC_LATEST_PUBLISHED_OR_ALIAS_QUALIFIER)


def arn_region(head: str) -> str:
    """The region named in what comes before `:function:` in a name Lambda's
    pattern allowed (`arn:aws:lambda:REGION:ACCOUNT`, `REGION:ACCOUNT`, ...); '' for none."""
    fields = head.split(":")
    if fields[0] == "arn":
        fields = fields[3:]
    return fields[0] if fields and not fields[0].isdigit() else ""


def response_body(invocation: "Invocation") -> bytes:
    """What Invoke answers with: the function's result (`null` for none), or its error document."""
    if invocation.error is not None:
        return invocation.error.to_bytes()
    return invocation.payload if invocation.payload is not None else b"null"


def log_result(invocation: "Invocation") -> str:
    """LogType=Tail's answer: the base64 of the invocation's last 4 KB of log."""
    return base64.b64encode(invocation.log_tail.encode()[-4096:]).decode()


def payload_chunks(data: bytes) -> list[bytes]:
    """PayloadChunk events of `data`, at most STREAM_CHUNK bytes each."""
    return [encode_event("PayloadChunk", data[start:start + STREAM_CHUNK], "application/octet-stream")
            for start in range(0, len(data), STREAM_CHUNK)]


def stream_end(invocation: "Invocation", tail: bool, streamed: bool) -> bytes:
    """The events that end InvokeWithResponseStream's answer: the result in PayloadChunk
    events, unless the function streamed it (`streamed`: its chunks have gone out as it
    wrote them), then InvokeComplete with `ErrorCode`, `ErrorDetails` and `LogResult`
    where they apply. A function that fails after it streamed chunks ends so too: its
    caller has had the chunks, then gets the error, as Lambda passes on a runtime's
    error trailers."""
    complete: dict[str, str] = {}
    events = []
    if invocation.error is None:
        if not streamed:
            events = payload_chunks(response_body(invocation))
    else:
        complete["ErrorCode"] = invocation.error.error_type
        complete["ErrorDetails"] = invocation.error.to_bytes().decode("utf-8", "replace")
    if tail:
        complete["LogResult"] = log_result(invocation)
    events.append(encode_event("InvokeComplete", orjson.dumps(complete), "application/json"))
    return b"".join(events)


def is_lambda_api(path: str) -> bool:
    """Lambda's API lives under dated prefixes (/2015-03-31/, /2017-10-31/, ...)."""
    if len(path) < 12 or path[0] != "/" or path[11:12] != "/":
        return False
    head = path[1:11]
    return (head[:4].isdigit() and head[4] == "-" and head[5:7].isdigit() and head[7] == "-"
            and head[8:10].isdigit() and not path.startswith(RUNTIME_API_PREFIX))


def not_implemented(request: web.Request) -> web.Response:
    """A Lambda API operation faasd does not serve, named with what it does serve."""
    message = (f"faasd does not implement {request.method} {valid_text(request.path)[:200]} of the "
               f"Lambda API. It serves {SERVED}; functions are files in its functions/ "
               "directory: create, change or delete them there.")
    return web.Response(status=501, body=orjson.dumps({"Type": "User", "message": message}),
                        content_type="application/json",
                        headers={"x-amzn-ErrorType": "NotImplemented", "x-amzn-RequestId": new_request_id()})


def lambda_routes(app: web.Application, daemon: "Daemon") -> None:
    invoker = daemon.invoker
    region = daemon.region
    limit = daemon.config.server.max_body_bytes
    python = daemon.pool.env.python

    def target(request: web.Request, naming: Naming, *enums: tuple[str, str, tuple[str, ...]],
               trailing: list[Problem] | None = None) -> tuple[FunctionSpec, str | None]:
        """The function named, and the ARN it was invoked by when the caller
        named a qualifier (None: the function's own, unqualified ARN).

        First, as AWS's front end: ValidationFailed for every member outside
        Lambda's model (the name, the header `enums` given as enum_problems
        takes them, the qualifier, then the `trailing` members' problems, in the
        model's order), before anything is looked up. A name the model allows
        that names no function here is FunctionNotFound."""
        name, arn, invoked_arn = named(request, naming, *enums, trailing=trailing)
        spec = daemon.registry.get(name)
        if spec is None:
            raise FunctionNotFound(arn)  # its message reads "Function not found: ARN", as Lambda's
        return spec, invoked_arn

    def queue_target(request: web.Request, naming: Naming, *enums: tuple[str, str, tuple[str, ...]],
                     trailing: list[Problem] | None = None) -> tuple[str, str | None]:
        """As target(), for an event to queue: the function's name, which may be
        one this node does not have when another live node of the cluster has it
        (a rolling deploy): that node takes the event from the broker."""
        name, arn, invoked_arn = named(request, naming, *enums, trailing=trailing)
        elsewhere = getattr(daemon.queue, "loaded_elsewhere", None)
        if daemon.registry.get(name) is None and not (elsewhere is not None and elsewhere(name)):
            raise FunctionNotFound(arn)
        return name, invoked_arn

    def named(request: web.Request, naming: Naming, *enums: tuple[str, str, tuple[str, ...]],
              trailing: list[Problem] | None = None) -> tuple[str, str, str | None]:
        """target()'s checks: the function's name, the ARN named, and the ARN it is
        invoked by when the caller named a qualifier (None: its own)."""
        given = request.match_info["name"]
        queried = request.query.get("Qualifier", "") if naming.qualifier is not None else ""
        problems = naming.function.problems(given) + enum_problems(*enums)
        if queried and naming.qualifier is not None:
            problems += naming.qualifier.problems(queried)
        problems += trailing or []
        if problems:
            raise ValidationFailed(*problems)
        if given.startswith("arn:") and ":function:" not in given:
            raise FunctionNotFound(given)  # another Lambda resource (ListTags takes any)
        # Lambda accepts NAME, NAME:QUALIFIER, ACCOUNT:function:NAME[:QUALIFIER]
        # and the full ARN; `?Qualifier=` works too. The account in an ARN is
        # not held against it: faasd is one account, whichever a caller copies.
        head, _, name = given.rpartition(":function:")
        name, _, qualifier = name.partition(":")
        if qualifier and queried and qualifier != queried:
            raise InvalidParameter("The derived qualifier from the function name does not match "
                                   "the specified qualifier.")
        named_region = arn_region(head)
        if named_region and named_region != region:
            raise FunctionNotFound(given, f"Functions from '{named_region}' are not reachable in "
                                          f"this region ('{region}')")
        qualifier = qualifier or queried
        arn = function_arn(name, region) + (f":{qualifier}" if qualifier else "")
        if not valid_name(name) or qualifier not in ("", "$LATEST"):
            raise FunctionNotFound(arn)  # its message reads "Function not found: ARN", as Lambda's
        return name, arn, arn if qualifier else None

    async def read_call(request: web.Request, invocation_type: str, invocation_types: tuple[str, ...]) -> Call:
        """The function, payload and headers of an Invoke-style request, checked
        as Lambda checks them before anything runs (InvokeRefused if wrong)."""
        log_type = request.headers.get("X-Amz-Log-Type", "None")
        tenant = request.headers.get("X-Amz-Tenant-Id")
        # An Event is queued: another node of the cluster may run it.
        find = queue_target if invocation_type == "Event" else target
        found, invoked_arn = find(request, QUALIFIED, ("invocationType", invocation_type, invocation_types),
                                  ("logType", log_type, LOG_TYPES),
                                  trailing=TENANT_ID.problems(tenant) if tenant is not None else None)
        function = found if isinstance(found, str) else found.name
        if tenant is not None:
            # Lambda's answer for a function without tenant isolation, as every
            # function here is: never a call run in an environment other tenants share.
            raise InvalidParameter(f"The function {function} does not have tenant isolation enabled: "
                                   "invoke it without a TenantId (faasd has no tenant isolation mode)")
        payload = await read_payload(request, invocation_type)
        return Call(function, invoked_arn, payload, client_context(request), log_type == "Tail",
                    caller_trace_id(request.headers.get("X-Amzn-Trace-Id")))

    async def read_payload(request: web.Request, invocation_type: str) -> bytes:
        """The request's JSON payload (`{}` when empty), or Lambda's refusal of it.
        An Event's (and InvokeAsync's) is held to its own, lower limit."""
        from .api import read_body

        queued_limit = {"Event": MAX_EVENT_BYTES, INVOKE_ASYNC: MAX_INVOKE_ASYNC_BYTES}.get(invocation_type)
        if queued_limit is not None:
            queued_limit = min(limit, queued_limit)
            size = request.content_length
            if size is not None and size > queued_limit:
                what = "the Event invocation type" if invocation_type == "Event" else "the InvokeAsync operation"
                raise PayloadTooLarge(f"{size} byte payload is too large for {what} (limit {queued_limit} bytes)")
            payload = await read_body(request, queued_limit)
        else:
            payload = await read_body(request, limit)
        if not payload:
            return b"{}"
        try:
            orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(
                f"Could not parse request body into json: Could not parse payload into json: {exc}") from None
        return payload

    async def enqueue(function: str, payload: bytes, request_id: str, invoked_arn: str | None,
                      trace_id: str | None) -> web.Response:
        """202 once the event is committed to the asynchronous queue; InvokeRefused if it cannot be."""
        if daemon.queue is None:
            raise InvokeRefused("asynchronous invocation is not available")
        try:
            await daemon.queue.put(function, payload, request_id=request_id, source="api",
                                   invoked_arn=invoked_arn, trace_id=trace_id)
        except OSError as exc:  # the disk refused: say so, never answer 202
            raise InvokeRefused(f"the event could not be stored: {exc}") from None
        return web.Response(status=202, headers={"x-amzn-RequestId": request_id})

    async def run(call: Call, request_id: str, stream: ResponseStream | None = None) -> "Invocation":
        return await invoker.invoke(call.function, call.payload, request_id=request_id, source="api",
                                    client_context=call.client_context, invoked_arn=call.invoked_arn,
                                    trace_id=call.trace_id, stream=stream)

    async def invoke(request: web.Request) -> web.StreamResponse:
        request_id = new_request_id()
        invocation_type = request.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        try:
            call = await read_call(request, invocation_type, INVOCATION_TYPES)
            if invocation_type == "DryRun":
                return web.Response(status=204, headers={"x-amzn-RequestId": request_id})
            if invocation_type == "Event":
                return await enqueue(call.function, call.payload, request_id, call.invoked_arn, call.trace_id)
            invocation = await run(call, request_id)
        except InvokeRefused as exc:
            return service_error(exc, request_id)
        headers = {"x-amzn-RequestId": request_id, "X-Amz-Executed-Version": "$LATEST"}
        if call.tail:
            headers["X-Amz-Log-Result"] = log_result(invocation)
        if invocation.error is not None:
            headers["X-Amz-Function-Error"] = "Unhandled"
        return web.Response(status=200, body=response_body(invocation), content_type="application/json",
                            headers=headers)

    async def invoke_with_response_stream(request: web.Request) -> web.StreamResponse:
        """Lambda's answer as it comes: a function that streams its response (Node's
        streamifyResponse, a custom runtime's streamed post) has each piece sent on as a
        PayloadChunk as it writes it, so the caller reads the first bytes while the
        function still runs, and up to 200 MB of them; any other function's result goes
        out in PayloadChunk events once it has returned. Refusals are Invoke's, as plain
        JSON errors: the event stream has not started."""
        request_id = new_request_id()
        invocation_type = request.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        headers = {"x-amzn-RequestId": request_id, "X-Amz-Executed-Version": "$LATEST"}
        try:
            call = await read_call(request, invocation_type, STREAM_INVOCATION_TYPES)
            if invocation_type == "DryRun":
                return web.Response(status=204, headers={"x-amzn-RequestId": request_id})
            spec = daemon.registry.get(call.function)  # here: only an Event may be elsewhere
            if spec is not None and spec.runtime == "python":  # Lambda's Python runtime does not stream
                invocation = await run(call, request_id)
                return web.Response(status=200, body=stream_end(invocation, call.tail, False),
                                    content_type=EVENT_STREAM, headers=headers)
        except InvokeRefused as exc:
            return service_error(exc, request_id)
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = EVENT_STREAM

        async def send(stream: ResponseStream) -> bool:
            """Start the answer at the first piece, then send each as it comes; False
            if the caller went away (the function runs on to its end, as on Lambda)."""
            try:
                await response.prepare(request)
                while (chunk := await stream.read()) is not None:
                    await response.write(b"".join(payload_chunks(chunk)))
            except (ConnectionError, asyncio.CancelledError):
                stream.abandon()
                return False
            return True

        stream = ResponseStream()
        try:
            invocation, sending = await stream.carry(run(call, request_id, stream), send)
        except InvokeRefused as exc:  # before the function ran: nothing was streamed
            return service_error(exc, request_id)
        end = stream_end(invocation, call.tail, stream.started)
        if sending is None:
            return web.Response(status=200, body=end, content_type=EVENT_STREAM, headers=headers)
        if await sending:
            await response.write(end)
            await response.write_eof()
        return response

    async def invoke_async(request: web.Request) -> web.Response:
        # Lambda's InvokeAsync, deprecated for Invoke's Event but still served: the
        # event is queued as an Event's is, from a payload of at most 256 KB. As
        # Lambda says of it, no trace id is passed on: each run gets a new one.
        request_id = new_request_id()
        try:
            function, invoked_arn = queue_target(request, Naming(NAMESPACED_FUNCTION_NAME))
            payload = await read_payload(request, INVOKE_ASYNC)
            return await enqueue(function, payload, request_id, invoked_arn, None)
        except InvokeRefused as exc:
            return service_error(exc, request_id)

    async def list_functions(request: web.Request) -> web.Response:
        # FunctionVersion=ALL lists every version: here $LATEST is the only one.
        problems = enum_problems(("functionVersion", request.query.get("FunctionVersion", "ALL"), ("ALL",)))
        if problems:
            return service_error(ValidationFailed(*problems))
        # A marker is the name the next page starts at, not a position: a function
        # added or removed between two pages shifts no other in or out of the listing.
        marker = request.query.get("Marker", "")
        if marker and not valid_name(marker):
            return service_error(InvalidParameter(
                f"Marker must be a NextMarker that ListFunctions gave, not {valid_text(marker)[:100]!r}"))
        given = request.query.get("MaxItems", "")
        try:
            count = int(given) if given else 50
        except ValueError:
            return service_error(InvalidParameter(f"MaxItems must be a whole number, not {valid_text(given)[:100]!r}"))
        if not 1 <= count <= MAX_LIST_ITEMS:
            bound = ("greater than or equal to 1" if count < 1
                     else f"less than or equal to {MAX_LIST_ITEMS}")
            return service_error(ValidationFailed(("maxItems", str(count), f"Member must have value {bound}")))
        count = min(count, LIST_PAGE)  # past it, as Lambda: the page still ends at 50, with a NextMarker
        names = sorted(daemon.registry.specs)
        start = bisect.bisect_left(names, marker)
        specs = daemon.registry.specs
        page = [specs[name] for name in names[start:start + count]]
        # Off the event loop: the configuration walks (and, once per revision,
        # hashes) each function's files.
        configs = await asyncio.to_thread(lambda: [listed(configuration(s)) for s in page])
        body: dict[str, Any] = {"Functions": configs}
        if start + count < len(names):
            body["NextMarker"] = names[start + count]
        return answer(body)

    def read_only(view: Callable[[FunctionSpec], dict[str, Any]], naming: Naming):
        async def handler(request: web.Request) -> web.Response:
            try:
                spec = target(request, naming)[0]
            except InvokeRefused as exc:
                return service_error(exc)
            # Off the event loop: a configuration walks (and, once per
            # revision, hashes) the function's files.
            body = await asyncio.to_thread(view, spec)
            return answer(body)
        return handler

    def read_version(view: Callable[[FunctionSpec, bool], dict[str, Any]]):
        """GetFunction and GetFunctionConfiguration: `view` is told whether the
        caller named the version (`$LATEST`, the only one), as a qualifier."""
        async def handler(request: web.Request) -> web.Response:
            try:
                spec, named = target(request, QUALIFIED)
            except InvokeRefused as exc:
                return service_error(exc)
            return answer(await asyncio.to_thread(view, spec, named is not None))
        return handler

    def configuration(spec: FunctionSpec, version: bool = False) -> dict[str, Any]:
        return function_configuration(spec, region, python, version)

    def concurrency(spec: FunctionSpec) -> dict[str, Any]:
        return {} if spec.concurrency is None else {"ReservedConcurrentExecutions": spec.concurrency}

    def function(spec: FunctionSpec, version: bool = False) -> dict[str, Any]:
        body = {
            "Configuration": configuration(spec, version),
            "Code": {"RepositoryType": "S3", "Location": f"file://{spec.source}"},
        }
        if spec.concurrency is not None:
            body["Concurrency"] = concurrency(spec)
        return body

    async def account_settings(request: web.Request) -> web.Response:
        specs = list(daemon.registry.specs.values())
        total = daemon.config.limits.max_concurrency
        reserved = sum(spec.concurrency or 0 for spec in specs)
        sizes = await asyncio.to_thread(lambda: [_code_size(spec) for spec in specs])
        body = {
            "AccountLimit": {**CODE_SIZE_LIMITS, "ConcurrentExecutions": total,
                             "UnreservedConcurrentExecutions": max(0, total - reserved)},
            "AccountUsage": {"TotalCodeSize": sum(sizes), "FunctionCount": len(specs)},
        }
        return answer(body)

    def function_url(request: web.Request, spec: FunctionSpec) -> dict[str, Any]:
        auth = daemon.http_auth.setting(spec.name, None) if daemon.http_auth is not None else None
        return url_config(spec, region, f"{request.scheme}://{valid_text(request.host)}", auth)

    def with_request(view: Callable[[web.Request, FunctionSpec], dict[str, Any]], naming: Naming):
        async def handler(request: web.Request) -> web.Response:
            try:
                spec = target(request, naming)[0]
            except InvokeRefused as exc:
                return service_error(exc)
            return answer(view(request, spec))
        return handler

    async def no_policy(request: web.Request) -> web.Response:
        try:
            target(request, QUALIFIED)
        except InvokeRefused as exc:
            return service_error(exc)
        # Lambda's answer for a function with no resource policy.
        return web.Response(status=404, content_type="application/json", headers={
            "x-amzn-ErrorType": "ResourceNotFoundException", "x-amzn-RequestId": new_request_id()},
            body=b'{"Type":"User","Message":"The resource you requested does not exist."}')

    async def no_layers(request: web.Request) -> web.Response:
        return answer({"Layers": []})

    async def refuse(request: web.Request) -> web.Response:
        return not_implemented(request)

    name = NAME_SEGMENT
    from .api import continue_on_read  # 100 Continue only once the checks on the headers passed

    app.router.add_post(f"{API}/functions/{name}/invocations", invoke, expect_handler=continue_on_read)
    app.router.add_post(f"/2021-11-15/functions/{name}/response-streaming-invocations",
                        invoke_with_response_stream, expect_handler=continue_on_read)
    # boto3 calls it without the trailing slash Lambda's own documents gave it.
    for path in (f"/2014-11-13/functions/{name}/invoke-async", f"/2014-11-13/functions/{name}/invoke-async/"):
        app.router.add_post(path, invoke_async, expect_handler=continue_on_read)
    app.router.add_get(f"{API}/functions", list_functions)
    app.router.add_get(f"{API}/functions/", list_functions)  # before GetFunction, whose name may be empty
    app.router.add_get(f"{API}/functions/{name}", read_version(function))
    app.router.add_get(f"{API}/functions/{name}/configuration", read_version(configuration))
    app.router.add_get(f"/2019-09-30/functions/{name}/concurrency", read_only(concurrency, Naming(FUNCTION_NAME)))
    app.router.add_get(f"{API}/functions/{name}/versions",
                       read_only(lambda spec: {"Versions": [configuration(spec, version=True)]},
                                 Naming(NAMESPACED_FUNCTION_NAME)))
    app.router.add_get(f"{API}/functions/{name}/aliases",
                       read_only(lambda spec: {"Aliases": []}, Naming(FUNCTION_NAME)))
    app.router.add_get(f"/2017-03-31/tags/{name}", read_only(lambda spec: {"Tags": {}}, Naming(TAGGABLE_RESOURCE)))
    app.router.add_get("/2016-08-19/account-settings/", account_settings)
    app.router.add_get("/2016-08-19/account-settings", account_settings)
    app.router.add_get(f"/2019-09-25/functions/{name}/event-invoke-config",
                       read_only(lambda spec: event_invoke_config(spec, region), QUALIFIED))
    app.router.add_get(f"/2019-09-25/functions/{name}/event-invoke-config/list",
                       read_only(lambda spec: {"FunctionEventInvokeConfigs": [event_invoke_config(spec, region)]},
                                 Naming(NAMESPACED_FUNCTION_NAME)))
    app.router.add_get(f"/2021-10-31/functions/{name}/url",
                       with_request(function_url, Naming(FUNCTION_URL_FUNCTION_NAME, FUNCTION_URL_QUALIFIER)))
    app.router.add_get(f"/2021-10-31/functions/{name}/urls",
                       with_request(lambda request, spec: {"FunctionUrlConfigs": [function_url(request, spec)]},
                                    Naming(FUNCTION_URL_FUNCTION_NAME)))
    app.router.add_get(f"{API}/functions/{name}/policy", no_policy)
    app.router.add_get("/2018-10-31/layers", no_layers)
    # faasd does not detect recursive loops (Lambda's default, Terminate, would say it does).
    app.router.add_get(f"/2024-08-31/functions/{name}/recursion-config",
                       read_only(lambda spec: {"RecursiveLoop": "Allow"}, Naming(UNQUALIFIED_FUNCTION_NAME)))
    # The other methods on these paths are Lambda's write operations
    # (CreateFunction, DeleteFunction, ...); other paths reach not_implemented
    # through faasd/api.py's by_route, after the functions' own http routes.
    for path in (f"{API}/functions", f"{API}/functions/", f"{API}/functions/{name}"):
        app.router.add_route("*", path, refuse, expect_handler=continue_on_read)
