"""Unit tests of faasd.triggers.http's routes: what a path template matches, and which routes clash."""

from __future__ import annotations

from faasd.triggers.http import Route, claim, compile_template


def route(function: str, template: str, methods: tuple[str, ...] = ("ANY",)) -> Route:
    pattern, literal = compile_template(template)
    return Route(function, template, frozenset(methods), pattern, literal)


def test_a_parameter_is_a_whole_segment_and_braces_inside_one_are_literal():
    thumbs, files = route("a", "/thumbs/{id}"), route("a", "/files/{path+}")
    assert thumbs.pattern.match("/thumbs/7")["id"] == "7"
    assert not thumbs.pattern.match("/thumbs/7/8")
    assert files.pattern.match("/files/a/b.txt")["path"] == "a/b.txt"
    literal = route("a", "/v1/x{id}")
    assert literal.pattern.match("/v1/x{id}") and not literal.pattern.match("/v1/x7")


def test_routes_that_differ_only_in_their_parameters_names_clash_and_literal_ones_do_not():
    first, renamed, greedy = route("a", "/thumbs/{id}"), route("b", "/thumbs/{name}/"), route("c", "/thumbs/{rest+}")
    # Braces inside a segment are literal text: these two serve different paths.
    braced, other_braced = route("d", "/v1/x{id}"), route("e", "/v1/x{name}")
    kept, conflicts = claim([[first], [renamed], [greedy], [braced], [other_braced]])
    assert kept == [first, greedy, braced, other_braced]
    assert conflicts == {"b": ["http trigger path '/thumbs/{name}/' is already the route of function 'a'; "
                               "it is not served here"]}


def test_the_events_forwarded_port_is_the_port_each_connection_came_in_on(tmp_path):
    """On TCP every request of a keep-alive connection names the port it reached faasd
    on (x-forwarded-port); over a unix socket, which has no port, there is none."""
    import asyncio
    import socket

    import uvloop
    from aiohttp import web

    from faasd.triggers.http import build_event

    async def handler(request: web.Request) -> web.Response:
        event = build_event(request, b"", route_key="ANY /x", path_parameters=None, request_id="r")
        return web.Response(text=event["headers"].get("x-forwarded-port", "none"))

    async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        return (await reader.readexactly(length)).decode()

    async def scenario() -> tuple[int, list[str], list[str]]:
        app = web.Application()
        app.router.add_get("/x", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        tcp = socket.create_server(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        await web.SockSite(runner, tcp).start()
        path = str(tmp_path / "faasd.sock")
        await web.UnixSite(runner, path).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            over_tcp = [await ask(reader, writer) for _ in range(3)]
            writer.close()
            reader, writer = await asyncio.open_unix_connection(path)
            over_unix = [await ask(reader, writer) for _ in range(2)]
            writer.close()
        finally:
            await runner.cleanup()
        return port, over_tcp, over_unix

    port, over_tcp, over_unix = uvloop.run(scenario())
    assert over_tcp == [str(port)] * 3
    assert over_unix == ["none", "none"]
