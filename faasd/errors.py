"""The failures a caller can see, each mapped once to its HTTP status and Lambda shape.

Two families:
  * `InvokeRefused` subclasses: the invocation never ran (unknown function,
    throttled, payload too large, a request Lambda would refuse). Raised by
    the invoker and the Lambda API; API layers turn them into Lambda's
    service errors (`{"Type", "message"}` + `x-amzn-ErrorType`), and so does
    the HTTP layer for what it refuses on a Lambda API path (a stalled body,
    an unknown Host, an error of faasd's own: a 500 ServiceException). Which one
    a bad request gets is Lambda's choice: a value outside its API model's
    constraints (an InvocationType or LogType not in the enum, a MaxItems
    out of range, a function name or qualifier its patterns or lengths do
    not allow) is `ValidationFailed`, refused before anything else is
    looked at; a body that is not JSON, or a header Lambda cannot read (a
    ClientContext), `InvalidRequest`; a value the model allows but Lambda
    does not (a ListFunctions Marker it never gave) `InvalidParameter`; a
    payload over the limit `PayloadTooLarge`.
  * `FunctionError`: the invocation ran and failed (handler error, timeout,
    out of memory, crash, init error). Returned inside an `Invocation`, never
    raised. The caller gets the error document the runtime reported, as
    Lambda passes it on (Python's `{"errorMessage", "errorType", "stackTrace"}`,
    Node's `{"errorType", "errorMessage", "trace"}`, whatever a custom runtime
    posted), or, for failures faasd itself saw, Python's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import orjson


class InvokeRefused(Exception):
    status = 500
    error_type = "ServiceException"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_lambda(self) -> dict[str, Any]:
        # Lambda's Type says whose fault it was: the caller's, or the service's (5xx).
        return {"Type": "Service" if self.status >= 500 else "User", "message": self.message}


class FunctionNotFound(InvokeRefused):
    status = 404
    error_type = "ResourceNotFoundException"

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(message or f"Function not found: {name}")
        self.name = name


class InvalidRequest(InvokeRefused):
    status = 400
    error_type = "InvalidRequestContentException"


class InvalidParameter(InvokeRefused):
    status = 400
    error_type = "InvalidParameterValueException"


class ValidationFailed(InvokeRefused):
    """Values outside the constraints of Lambda's API model, refused by AWS's
    front end before Lambda sees the request: 400 `ValidationException`,
    whose body is only `{"message"}`. botocore has no class of its own for it
    (Lambda's model does not name it): a ClientError with that code."""

    status = 400
    error_type = "ValidationException"

    def __init__(self, *problems: tuple[str, str, str]) -> None:
        """Each problem is (member, value, constraint), as AWS words them."""
        count = len(problems)
        super().__init__(f"{count} validation error{'s' if count > 1 else ''} detected: " + "; ".join(
            f"Value '{value}' at '{member}' failed to satisfy constraint: {constraint}"
            for member, value, constraint in problems))

    def to_lambda(self) -> dict[str, Any]:
        return {"message": self.message}


class Throttled(InvokeRefused):
    status = 429
    error_type = "TooManyRequestsException"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def to_lambda(self) -> dict[str, Any]:
        return {"Type": "User", "message": self.message, "Reason": self.reason}


class PayloadTooLarge(InvokeRefused):
    status = 413
    error_type = "RequestTooLargeException"


class RequestTimedOut(InvokeRefused):
    """A request body that stalled or came too slowly (faasd/api.py read_body): AWS's
    RequestTimeoutException, which botocore's standard retry mode counts as transient."""

    status = 408
    error_type = "RequestTimeoutException"


class AccessDenied(InvokeRefused):
    """A request faasd does not serve to its sender (an unknown Host without [auth] keys):
    Lambda's AccessDeniedException, whose body is `{"Message"}`."""

    status = 403
    error_type = "AccessDeniedException"

    def to_lambda(self) -> dict[str, Any]:
        return {"Message": self.message}


class ShuttingDown(InvokeRefused):
    status = 503
    error_type = "ServiceException"


class ServiceUnavailable(InvokeRefused):
    """faasd lacks what the call needs from the host (open files, processes, memory):
    its own fault, not the function's, so Lambda's answer to its own faults, a 5xx
    ServiceException, never a `Runtime.*` error that blames the code. Worth trying again."""

    status = 503
    error_type = "ServiceException"


# How a failed run ended; decides the HTTP-trigger status and whether the
# worker can be reused.
HANDLED = "error"          # the handler raised; worker reusable
TIMEOUT = "timeout"        # Sandbox.Timedout; worker killed
OUT_OF_MEMORY = "oom"      # Runtime.OutOfMemory; worker killed
CRASH = "crash"            # Runtime.ExitError; worker gone
INIT = "init"              # the function could not load

HTTP_STATUS = {HANDLED: 502, TIMEOUT: 504, OUT_OF_MEMORY: 502, CRASH: 502, INIT: 502}


@dataclass(frozen=True)
class FunctionError:
    kind: str
    error_type: str
    message: str
    stack_trace: list[str] = field(default_factory=list)
    # What the runtime reported, which the caller gets unchanged: a JSON value,
    # or the bytes of a body that is not JSON. None: an error faasd describes.
    document: Any = None

    def to_lambda(self) -> Any:
        """The error as a JSON value, for the caller and for records."""
        document = self.document
        if document is None:
            return {"errorMessage": self.message, "errorType": self.error_type,
                    "stackTrace": self.stack_trace}
        if isinstance(document, bytes):
            return document.decode("utf-8", "replace")
        return document

    def to_bytes(self) -> bytes:
        """The error as the Invoke API's response body."""
        if isinstance(self.document, bytes):
            return self.document
        return orjson.dumps(self.to_lambda())

    @classmethod
    def from_payload(cls, kind: str, payload: Any, error_type: str = "Error") -> "FunctionError":
        """The error a runtime reported; `error_type` where the document names none."""
        if not isinstance(payload, dict):
            return cls(kind, error_type, str(payload), document=payload)
        trace = payload.get("stackTrace", payload.get("trace")) or []
        if not isinstance(trace, list):
            trace = [str(trace)]
        return cls(kind, str(payload.get("errorType") or error_type),
                   str(payload.get("errorMessage") or ""), [str(t) for t in trace], payload)

    @classmethod
    def from_load_error(cls, text: str, runtime: str | None = None,
                        trace: Sequence[str] = ()) -> "FunctionError":
        """The init error of a function that cannot load (`FunctionSpec.load_error`, with
        `load_trace`, the stack trace its runtime would give it)."""
        error_type, sep, message = text.partition(": ")
        if not sep or not error_type.startswith("Runtime."):
            return cls(INIT, "Runtime.InvalidConfiguration", text)
        if runtime == "python":  # what awslambdaric posts for a failed init: no request id
            return cls(INIT, error_type, message, list(trace), document={
                "errorMessage": message, "errorType": error_type, "requestId": "", "stackTrace": list(trace)})
        return cls(INIT, error_type, message, list(trace))

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.kind, 502)
