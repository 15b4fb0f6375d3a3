"""The baseline: a bare aiohttp + uvloop hello world, as fast as aiohttp serves."""

import sys

import uvloop
from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


app = web.Application()
app.router.add_get("/", hello)
uvloop.install()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
