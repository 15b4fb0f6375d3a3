"""A loopback HTTP server that test handlers report to and wait on.

Workers run in a sandbox whose /tmp is private and whose data dir is hidden,
so a handler cannot leave files for the test to read; it talks HTTP instead:

    POST /note   {json}  -> recorded in `Probe.notes` (with the arrival time)
    GET  /gate/NAME      -> blocks until the test calls `release(NAME)`

`PROBE_HANDLER` is a Python function that uses it: it notes "start", waits on
the event's `gate` if any, fails if the event says `fail`, notes "end" and
returns; the probe's URL reaches it through the function's [env] PROBE.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from support import wait_until

PROBE_HANDLER = """
import json
import os
import time
import urllib.error
import urllib.request


def ask(request, timeout):
    for attempt in range(3):  # a connection the loaded test process reset is tried again
        try:
            urllib.request.urlopen(request, timeout=timeout).read()
            return
        except (urllib.error.URLError, ConnectionError):
            if attempt == 2:
                raise
            time.sleep(0.2)


def note(kind, payload, context, **extra):
    body = {"kind": kind, "fn": context.function_name, "rid": context.aws_request_id,
            "id": payload.get("id"), **extra}
    ask(urllib.request.Request(os.environ["PROBE"] + "/note", json.dumps(body).encode(), method="POST"), 30)


def handler(event, context):
    note("start", event, context, event=event)
    if event.get("gate"):
        ask(os.environ["PROBE"] + "/gate/" + event["gate"], 120)
    if event.get("fail"):
        raise RuntimeError(f"failing on purpose: {event.get('id')}")
    note("end", event, context)
    return {"id": event.get("id"), "rid": context.aws_request_id}
"""


class Probe:
    def __init__(self) -> None:
        self.notes: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._gates: dict[str, threading.Event] = {}
        probe = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                note = json.loads(body)
                note["at"] = time.time()
                with probe._lock:
                    probe.notes.append(note)
                self._reply()

            def do_GET(self) -> None:  # noqa: N802
                name = self.path.rsplit("/", 1)[-1]
                probe.gate(name).wait(110)
                self._reply()

            def _reply(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def gate(self, name: str) -> threading.Event:
        with self._lock:
            return self._gates.setdefault(name, threading.Event())

    def release(self, name: str) -> None:
        self.gate(name).set()

    def seen(self, kind: str | None = None, **match: Any) -> list[dict[str, Any]]:
        with self._lock:
            notes = list(self.notes)
        return [n for n in notes if (kind is None or n["kind"] == kind)
                and all(n.get(k) == v for k, v in match.items())]

    def wait_for(self, count: int, kind: str, timeout: float = 30, **match: Any) -> list[dict[str, Any]]:
        return wait_until(lambda: len(self.seen(kind, **match)) >= count and self.seen(kind, **match),
                          timeout, message=f"{count} {kind!r} notes matching {match}; have {self.notes}")

    def close(self) -> None:
        with self._lock:
            for gate in self._gates.values():
                gate.set()
        self.server.shutdown()
        self.server.server_close()
