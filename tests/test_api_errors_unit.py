"""faasd/api.py's one middleware on its own, over real HTTP: what a handler's unforeseen
failure answers, on a Lambda API path (as boto3 reads it) and elsewhere."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from types import SimpleNamespace
from typing import Iterator

import pytest
from aiohttp import web

from faasd.api import guard_middleware
from support import lambda_client


@pytest.fixture
def failing_server() -> Iterator[str]:
    """A server whose every handler raises, behind the daemon's middleware; its URL."""

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug in faasd")

    daemon = SimpleNamespace(request_guard=None, loopback_hosts=None, http_active=0, http_stopping=False,
                             http_request_ended=lambda: None)
    app = web.Application(middlewares=[guard_middleware(daemon)])
    app.router.add_get("/2015-03-31/functions/{name}", broken)
    app.router.add_get("/other", broken)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_an_unforeseen_failure_on_the_lambda_api_is_lambdas_service_exception(failing_server):
    lam = lambda_client(failing_server)
    with pytest.raises(lam.exceptions.ServiceException) as caught:
        lam.get_function(FunctionName="echo")
    error = caught.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert error["Error"]["Code"] == "ServiceException"
    assert error["Error"]["Message"] == "The Lambda service encountered an internal error."
    assert error["Type"] == "Service"
    assert error["ResponseMetadata"]["RequestId"]
    assert "a bug in faasd" not in json.dumps(error)


def test_an_unforeseen_failure_elsewhere_keeps_its_plain_500(failing_server):
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(failing_server + "/other", timeout=10)
    assert caught.value.code == 500
    assert caught.value.headers.get("x-amzn-ErrorType") is None
    assert json.loads(caught.value.read()) == {"message": "Internal Server Error"}

