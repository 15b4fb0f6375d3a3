"""The OpenAPI 3.1 document of faasd's HTTP API, served at `/openapi.json`.

It describes what a client can rely on: the Lambda API (Invoke,
InvokeWithResponseStream, InvokeAsync, ListFunctions, GetFunction and the other reads),
the `/function/NAME` HTTP invocation path, the health probes and the
operator views under `/system/`. Response bodies are
described where faasd fixes their shape; a function's own answers are the
function's business. The document is checked against the running daemon by
a Schemathesis run in the tests (tests/test_security.py): no request it can
generate may get a 5xx of faasd's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from . import __version__

if TYPE_CHECKING:
    from .daemon import Daemon

NAME = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$", "examples": ["hello"]}
LAMBDA_NAME = {
    "type": "string", "minLength": 1, "maxLength": 256,
    "description": "NAME, NAME:$LATEST, ACCOUNT:function:NAME or the function's ARN; one outside "
                   "the operation's shape in Lambda's API model is a 400 ValidationException",
    "examples": ["hello"],
}
MESSAGE = {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]}
LAMBDA_ERROR = {
    "type": "object",
    "description": "A Lambda service error; x-amzn-ErrorType names it.",
    "properties": {"Type": {"type": "string"}, "message": {"type": "string"},
                   "Message": {"type": "string"}, "Reason": {"type": "string"}},
}
def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _lambda_errors(*statuses: int) -> dict[str, Any]:
    words = {400: "ValidationException (a value outside Lambda's API model), InvalidRequestContentException "
                  "(a payload or ClientContext that is not JSON) or InvalidParameterValueException",
             403: "Missing or wrong SigV4 signature (when [auth] keys are set)",
             404: "ResourceNotFoundException",
             408: "The request body stalled, or was not complete within [server] body_timeout_s",
             413: "RequestTooLargeException", 429: "TooManyRequestsException",
             503: "faasd is shutting down"}
    return {str(s): _json(LAMBDA_ERROR, words[s]) for s in statuses}


def _operator(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "tags": ["system"], "security": [{"bearer": []}, {}],
            "responses": {**responses, "401": _json(MESSAGE, "Bearer secret missing or wrong")},
            **extra}


def _lambda_invoke(operation: str, name: dict[str, Any], invocation_types: list[str],
                   responses: dict[str, Any]) -> dict[str, Any]:
    """Invoke, or InvokeWithResponseStream: the same request, answered its own way."""
    return {
        "summary": operation, "tags": ["lambda"], "operationId": operation,
        "security": [{"sigv4": []}, {}],
        "parameters": [
            name,
            {"name": "X-Amz-Invocation-Type", "in": "header", "required": False,
             "schema": {"type": "string", "enum": invocation_types}},
            {"name": "X-Amz-Log-Type", "in": "header", "required": False,
             "schema": {"type": "string", "enum": ["None", "Tail"]}},
            {"name": "X-Amz-Client-Context", "in": "header", "required": False,
             "description": "base64 of a JSON object: the handler's context.client_context",
             "schema": {"type": "string", "maxLength": 3583}},
            {"name": "X-Amz-Tenant-Id", "in": "header", "required": False,
             "description": "refused (InvalidParameterValueException): faasd has no tenant isolation",
             "schema": {"type": "string", "maxLength": 256}},
            {"name": "X-Amzn-Trace-Id", "in": "header", "required": False,
             "description": "X-Ray trace header: the _X_AMZN_TRACE_ID the function runs under",
             "schema": {"type": "string", "maxLength": 8192}},
            {"name": "Qualifier", "in": "query", "required": False,
             "schema": {"type": "string", "enum": ["$LATEST"]}}],
        "requestBody": {"required": False, "content": {"application/json": {"schema": {}}}},
        "responses": {**responses, "204": {"description": "Validated (DryRun)"},
                      **_lambda_errors(400, 403, 404, 408, 413, 429, 503)},
    }


def _invoke_path(summary: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    responses = {
        "200": {"description": "What the function returned, by API Gateway payload 2.0 rules",
                "content": {"*/*": {"schema": {}}}},
        "400": _json(MESSAGE, "Invalid function name"),
        "401": _json(MESSAGE, "The function's http trigger wants a key"),
        "403": _json(MESSAGE, "The key or the authorizer refused the request"),
        "404": _json(MESSAGE, "No such function"),
        "405": _json(MESSAGE, "Method not allowed on this route"),
        "408": _json(MESSAGE, "The request body stalled, or was not complete within [server] body_timeout_s"),
        "413": _json(MESSAGE, "Body, or the event it makes (a binary body is base64), over [server] max_body_mb"),
        "429": _json(MESSAGE, "Throttled"),
        "502": _json(MESSAGE, "The function (or its authorizer) failed"),
        "503": _json(MESSAGE, "faasd is shutting down"),
        "504": _json(MESSAGE, "The function timed out"),
    }
    operation = {
        "tags": ["functions"], "parameters": params,
        "requestBody": {"required": False, "content": {"*/*": {"schema": {}}}},
        "responses": responses,
        "security": [{}, {"bearer": []}, {"apiKey": []}],
    }
    return {method: {**operation, "summary": f"{summary} ({method.upper()})",
                     "operationId": f"{method}{summary.title().replace(' ', '')}{len(params)}"}
            for method in ("get", "post", "put", "patch", "delete")}


def document() -> dict[str, Any]:
    name_param = {"name": "name", "in": "path", "required": True, "schema": NAME}
    lambda_name = {"name": "name", "in": "path", "required": True, "schema": LAMBDA_NAME}
    proxy = {"name": "proxy", "in": "path", "required": True,
             "schema": {"type": "string", "minLength": 1, "pattern": "^[A-Za-z0-9._~-]+$"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "faasd",
            "version": __version__,
            "description": (
                "A self-hosted AWS Lambda for one Linux box. With [auth] keys set, the Lambda "
                "API wants AWS Signature Version 4 (service `lambda`) and /system, /metrics and "
                "/ui/ want `Authorization: Bearer <secret>`. `GET /system/functions/{name}/logs"
                "?follow=1` streams new lines until the client hangs up."),
        },
        "components": {
            "securitySchemes": {
                "sigv4": {"type": "apiKey", "name": "Authorization", "in": "header",
                          "description": "AWS Signature Version 4, service `lambda`",
                          "x-amazon-apigateway-authtype": "awsSigv4"},
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "The secret of one of [auth] keys"},
                "apiKey": {"type": "apiKey", "name": "x-api-key", "in": "header",
                           "description": "For http triggers with auth = \"key\""},
            },
        },
        "paths": {
            "/healthz": {"get": {"summary": "Liveness", "tags": ["health"], "operationId": "healthz",
                                 "responses": {"200": _json({"type": "object"}, "Alive")}}},
            "/readyz": {"get": {"summary": "Readiness", "tags": ["health"], "operationId": "readyz",
                                "responses": {"200": _json({"type": "object"}, "Ready"),
                                              "503": _json({"type": "object"}, "Not ready")}}},
            "/openapi.json": {"get": {"summary": "This document", "tags": ["health"],
                                      "operationId": "openapi",
                                      "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")}}},
            "/system/info": {"get": _operator(
                "The daemon: version, limits, isolation in force",
                {"200": _json({"type": "object", "properties": {
                    "version": {"type": "string"}, "isolation": {"type": "object"}}}, "Daemon info")},
                operationId="systemInfo")},
            "/system/functions": {"get": _operator(
                "Every function, its workers and load errors",
                {"200": _json({"type": "object", "properties": {"functions": {"type": "array"}},
                               "required": ["functions"]}, "Functions")},
                operationId="systemFunctions")},
            "/system/functions/{name}": {"get": _operator(
                "One function", {"200": _json({"type": "object"}, "The function"),
                                 "404": _json(MESSAGE, "No such function")},
                operationId="systemFunction", parameters=[{**name_param, "schema": {"type": "string"}}])},
            "/system/functions/{name}/logs": {"get": _operator(
                "The function's log (the last `lines` lines)",
                {"200": {"description": "Log lines", "content": {"text/plain": {"schema": {"type": "string"}}}},
                 "400": _json(MESSAGE, "Invalid name or lines"),
                 "404": _json(MESSAGE, "No such function")},
                operationId="systemFunctionLogs",
                parameters=[name_param,
                            {"name": "lines", "in": "query", "required": False,
                             "schema": {"type": "integer", "minimum": 0, "maximum": 100000}}])},
            "/2015-03-31/functions/": {"get": {
                "summary": "ListFunctions", "tags": ["lambda"], "operationId": "ListFunctions",
                "security": [{"sigv4": []}, {}],
                "parameters": [
                    {"name": "Marker", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "MaxItems", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}],
                "responses": {"200": _json({"type": "object", "properties": {
                    "Functions": {"type": "array"}, "NextMarker": {"type": "string"}},
                    "required": ["Functions"]}, "Function configurations"),
                    **_lambda_errors(400, 403)}}},
            "/2015-03-31/functions/{name}": {"get": {
                "summary": "GetFunction", "tags": ["lambda"], "operationId": "GetFunction",
                "security": [{"sigv4": []}, {}], "parameters": [lambda_name],
                "responses": {"200": _json({"type": "object", "properties": {
                    "Configuration": {"type": "object"}, "Code": {"type": "object"}},
                    "required": ["Configuration"]}, "The function"),
                    **_lambda_errors(400, 403, 404)}}},
            "/2015-03-31/functions/{name}/invocations": {"post": _lambda_invoke(
                "Invoke", lambda_name, ["RequestResponse", "Event", "DryRun"],
                {"200": {"description": "The function's result, or its error with "
                                        "X-Amz-Function-Error: Unhandled",
                         "content": {"application/json": {"schema": {}}}},
                 "202": {"description": "Queued (Event)"}})},
            "/2021-11-15/functions/{name}/response-streaming-invocations": {"post": _lambda_invoke(
                "InvokeWithResponseStream", lambda_name, ["RequestResponse", "DryRun"],
                {"200": {"description": "An AWS event stream: the function's result in PayloadChunk "
                                        "events, then InvokeComplete (ErrorCode, ErrorDetails, "
                                        "LogResult). faasd sends it once the function has finished.",
                         "content": {"application/vnd.amazon.eventstream": {
                             "schema": {"type": "string", "format": "binary"}}}}})},
            "/2014-11-13/functions/{name}/invoke-async": {"post": {
                "summary": "InvokeAsync", "tags": ["lambda"], "operationId": "InvokeAsync",
                "description": "Deprecated by Lambda for Invoke's Event, and still served: the event is "
                               "queued as an Event's, from a payload of at most 256 KB.",
                "deprecated": True, "security": [{"sigv4": []}, {}], "parameters": [lambda_name],
                "requestBody": {"required": False, "content": {"application/json": {"schema": {}}}},
                "responses": {"202": {"description": "Queued"},
                              **_lambda_errors(400, 403, 404, 408, 413, 503)}}},
            **{path: {"get": {
                "summary": operation, "tags": ["lambda"], "operationId": operation,
                "security": [{"sigv4": []}, {}], "parameters": [lambda_name],
                "responses": {"200": _json({"type": "object"}, description),
                              **_lambda_errors(400, 403, 404)}}}
               for path, operation, description in (
                   ("/2015-03-31/functions/{name}/configuration", "GetFunctionConfiguration",
                    "The function's configuration"),
                   ("/2019-09-30/functions/{name}/concurrency", "GetFunctionConcurrency",
                    "ReservedConcurrentExecutions, when the function sets concurrency"),
                   ("/2015-03-31/functions/{name}/versions", "ListVersionsByFunction",
                    "$LATEST, the only version"),
                   ("/2015-03-31/functions/{name}/aliases", "ListAliases", "No aliases"),
                   ("/2017-03-31/tags/{name}", "ListTags", "No tags"),
                   ("/2019-09-25/functions/{name}/event-invoke-config", "GetFunctionEventInvokeConfig",
                    "The function's [async] settings"),
                   ("/2019-09-25/functions/{name}/event-invoke-config/list",
                    "ListFunctionEventInvokeConfigs", "The function's [async] settings, as a list"),
                   ("/2021-10-31/functions/{name}/url", "GetFunctionUrlConfig",
                    "The function's URL: /function/NAME/"),
                   ("/2021-10-31/functions/{name}/urls", "ListFunctionUrlConfigs",
                    "The function's URL, as a list"),
                   ("/2024-08-31/functions/{name}/recursion-config", "GetFunctionRecursionConfig",
                    "Allow: faasd does not detect recursive loops"))},
            "/2015-03-31/functions/{name}/policy": {"get": {
                "summary": "GetPolicy", "tags": ["lambda"], "operationId": "GetPolicy",
                "security": [{"sigv4": []}, {}], "parameters": [lambda_name],
                "responses": _lambda_errors(400, 403, 404)}},
            **{path: {"get": {
                "summary": operation, "tags": ["lambda"], "operationId": operation,
                "security": [{"sigv4": []}, {}],
                "responses": {"200": _json({"type": "object"}, description), **_lambda_errors(403)}}}
               for path, operation, description in (
                   ("/2016-08-19/account-settings/", "GetAccountSettings",
                    "Concurrency limits and the functions' count and code size"),
                   ("/2018-10-31/layers", "ListLayers", "No layers"))},
            "/function/{name}": _invoke_path("invoke function", [name_param]),
            "/function/{name}/{proxy}": _invoke_path("invoke function path", [name_param, proxy]),
        },
    }


def openapi_handler(daemon: "Daemon"):
    body = orjson.dumps(document())

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return openapi
