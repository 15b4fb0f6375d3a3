"""The `faasd` command: `serve` runs the daemon; the rest are its clients and tools."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterable
from urllib.parse import quote

from .config import ConfigError, load_config
from .spec import RUNTIMES, functions_dir_problem, reserved_path, this_user, valid_name

NAME_RULE = "use 1 to 64 of A-Z a-z 0-9 _ -"
# How the Lambda API takes a function: NAME, NAME:QUALIFIER,
# ACCOUNT:function:NAME[:QUALIFIER] or the function's ARN.
FUNCTION_REF_RE = re.compile(r"(?:(?:arn:aws[a-z-]*:lambda:[a-z0-9-]+:)?\d{12}:function:)?"
                             r"(?P<name>[^:]+)(?::[A-Za-z0-9$_-]{1,128})?")


def _config(args: argparse.Namespace):
    overrides = {
        "server": {"host": getattr(args, "host", None), "port": getattr(args, "port", None),
                   "insecure": True if getattr(args, "insecure", False) else None},
        "paths": {"functions": getattr(args, "functions", None), "data": getattr(args, "data_dir", None)},
        "log": {"format": getattr(args, "log_format", None), "level": getattr(args, "log_level", None)},
    }
    return load_config(args.config, overrides=overrides)


def _base_url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url.rstrip("/")
    return _config(args).url


def _credentials(args: argparse.Namespace) -> tuple[str, str] | None:
    """The key the client signs with: the first of [auth] keys in the config, else
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; None when neither is there."""
    try:
        keys = _config(args).auth.keys
    except ConfigError:
        keys = {}
    if keys:
        return next(iter(keys.items()))
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    return (key, secret) if key and secret else None


def _request(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None,
             method: str | None = None, timeout: float | None = 960,
             auth: tuple[str, str] | None = None):
    headers = dict(headers or {})
    if auth is not None:
        # The Lambda API wants a SigV4 signature; the operator views a bearer secret.
        if "/2015-03-31/" in url:
            from .sigv4 import sign_sigv4

            headers = sign_sigv4(method or ("POST" if data is not None else "GET"), url, headers,
                                 data or b"", access_key=auth[0], secret=auth[1],
                                 region=os.environ.get("AWS_REGION") or "us-east-1")
        else:
            headers["Authorization"] = f"Bearer {auth[1]}"
    try:
        request: urllib.request.Request | None = urllib.request.Request(
            url, data=data, headers=headers, method=method)
    except ValueError:  # not a URL at all
        request = None
    if request is None or request.type not in ("http", "https"):
        raise SystemExit(f"faasd: cannot call {url}: give the daemon's address as http://HOST:PORT")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        return exc
    except urllib.error.URLError as exc:
        reason = exc.reason.strerror if isinstance(exc.reason, OSError) and exc.reason.strerror else exc.reason
        base = urllib.parse.urlsplit(url)
        raise SystemExit(f"faasd: cannot reach the daemon at {base.scheme}://{base.netloc} ({reason}): "
                         "is `faasd serve` running there? --url, or the config's [server] host and "
                         "port, say where it listens") from None


def _error_message(body: bytes) -> str:
    """The text of an error answer: its `Message` (Lambda's ResourceNotFoundException)
    or `message` (faasd's other errors), with the `Reason` a 429 names, else the body
    as it came."""
    try:
        error = json.loads(body)
    except ValueError:
        error = None
    if not isinstance(error, dict):
        return body.decode(errors="replace")
    message = error.get("Message") or error.get("message")
    if not message:
        return body.decode(errors="replace")
    reason = error.get("Reason") or error.get("reason")
    return f"{message} ({reason})" if reason else str(message)


def _refuse_name(given: str, rule: str = NAME_RULE) -> int:
    print(f"faasd: invalid function name {given!r}: {rule}", file=sys.stderr)
    return 2


# -- commands ------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon import run
    from .logfmt import setup_logging

    config = _config(args)
    setup_logging(config.log.format, config.log.level)
    # SIGHUP rereads the same sources: --config/$FAASD_CONFIG, environment, flags.
    return run(config, loader=lambda: _config(args))


def cmd_invoke(args: argparse.Namespace) -> int:
    found = FUNCTION_REF_RE.fullmatch(args.name)
    if found is None or not valid_name(found["name"]):
        return _refuse_name(args.name, f"{NAME_RULE}; a :QUALIFIER or the function's ARN may be given")
    data = args.data
    if data is None:
        payload = b"{}" if sys.stdin.isatty() else sys.stdin.buffer.read() or b"{}"
    elif data.startswith("@"):
        try:
            payload = Path(data[1:]).read_bytes()
        except OSError as exc:
            raise SystemExit(f"faasd: cannot read {data[1:]}: {exc.strerror}") from None
    else:
        payload = data.encode()
    try:
        json.loads(payload)
    except ValueError as exc:
        raise SystemExit(f"faasd: the payload is not valid JSON: {exc}") from None
    headers = {"Content-Type": "application/json",
               "X-Amz-Invocation-Type": "Event" if args.async_ else "RequestResponse"}
    url = f"{_base_url(args)}/2015-03-31/functions/{quote(args.name, safe=':$')}/invocations"
    response = _request(url, data=payload, headers=headers, method="POST", auth=_credentials(args))
    body = response.read()
    if response.status == 202:
        print(f"queued: request id {response.headers.get('x-amzn-RequestId')}")
        return 0
    if response.status >= 400:
        print(f"faasd: {response.headers.get('x-amzn-ErrorType', response.status)}: "
              f"{_error_message(body)}", file=sys.stderr)
        return 2
    sys.stdout.write(body.decode(errors="replace") + "\n")
    return 1 if response.headers.get("X-Amz-Function-Error") else 0


def trigger_kinds(types: Iterable[str]) -> list[str]:
    """What fires a function, as `faasd list` and `faasd check` show it: http for all,
    since /function/NAME always works, then its other trigger types, each once."""
    return list(dict.fromkeys(["http", *types]))


def cmd_list(args: argparse.Namespace) -> int:
    if args.cluster:
        return cmd_list_cluster(args)
    response = _request(f"{_base_url(args)}/system/functions", auth=_credentials(args))
    if response.status != 200:
        print(f"faasd: the daemon answered {response.status}: {_error_message(response.read())}",
              file=sys.stderr)
        return 2
    functions = json.loads(response.read())["functions"]
    if args.json:
        print(json.dumps(functions, indent=2))
        return 0
    rows = [("NAME", "RUNTIME", "HANDLER", "WORKERS", "TRIGGERS", "STATUS")]
    for fn in functions:
        counts = fn.get("worker_counts", {})
        workers = " ".join(f"{k}={v}" for k, v in counts.items() if v) or "-"
        # A function that did not load shows none, as in `faasd check`: STATUS says why.
        triggers = "-" if fn["load_error"] else ",".join(trigger_kinds(t["type"] for t in fn["triggers"]))
        init_error = fn.get("init_error")  # the last worker start failed
        if fn["load_error"]:
            status = "error: " + fn["load_error"]
        elif init_error:
            message = (init_error.get("errorMessage") or "").splitlines()
            status = f"init-error: {init_error.get('errorType')}" + (f": {message[0]}" if message else "")
        else:
            status = "ok"
        rows.append((fn["name"], fn["runtime"], fn["handler"], workers, triggers, status))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5])
    return 0


def cmd_list_cluster(args: argparse.Namespace) -> int:
    """The nodes of the daemon's cluster (GET /system/cluster), their functions and load."""
    response = _request(f"{_base_url(args)}/system/cluster", auth=_credentials(args))
    if response.status != 200:
        print(f"faasd: the daemon answered {response.status}: {_error_message(response.read())}",
              file=sys.stderr)
        return 2
    view = json.loads(response.read())
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    rows = [("NODE", "ADDRESS", "STATE", "INFLIGHT", "LOAD1", "FUNCTIONS")]
    for node in view["nodes"]:
        load = node.get("load") or {}
        name = node["node"] + (" *" if node.get("schedule_owner") else "")
        functions = ", ".join(node.get("functions") or []) or "-"
        if node.get("failing"):
            functions += " (failing: " + ", ".join(node["failing"]) + ")"
        state = node.get("state", "?")
        inflight = f"{load.get('inflight', 0)}/{load.get('max_concurrency', '?')}"
        loadavg = str(load.get("loadavg_1m", "-"))
        if state in ("lost", "unknown"):
            # Not heard from: how long ago, and no load figures that are only its last word.
            state += f", {float(node.get('last_seen_s') or 0):.0f}s ago"
            inflight = loadavg = "-"
        rows.append((name, node.get("address") or "-", state, inflight, loadavg, functions))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5])
    if view.get("mode") == "amqp":
        print(f"\ncluster {view['cluster']} on {view['broker']['url']} ({view['broker']['state']}); "
              f"* fires the schedules")
    else:
        print("\nnot in a cluster ([cluster] mode = \"local\")")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    if not valid_name(args.name):
        return _refuse_name(args.name)
    query = f"lines={args.lines}" + ("&follow=1" if args.follow else "")
    response = _request(f"{_base_url(args)}/system/functions/{quote(args.name)}/logs?{query}",
                        timeout=None if args.follow else 60, auth=_credentials(args))
    if response.status != 200:
        print(f"faasd: {_error_message(response.read())}", file=sys.stderr)
        return 2
    try:
        for line in response:
            sys.stdout.write(_shown(line.decode(errors="replace")))
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0


def _shown(line: str) -> str:
    """A log line for a terminal. A record that holds \r (a Node message or an
    error with a stack: Lambda's runtimes join a record's lines with it) is
    shown as lines of their own, each with the record's time and request id,
    as CloudWatch shows it; printed as it is, each \r would return the cursor
    and the next part would overwrite the last."""
    if "\r" not in line:
        return line
    parts = line.rstrip("\n").split("\t", 2)
    if len(parts) < 3:
        return line.replace("\r", "\n")
    head = f"{parts[0]}\t{parts[1]}\t"
    return "".join(f"{head}{text}\n" for text in parts[2].split("\r"))


TEMPLATES = {
    "python": {
        "handler.py": '''\
            import json


            def handler(event, context):
                print(f"{context.function_name} got", json.dumps(event)[:200])
                return {"statusCode": 200, "body": json.dumps({"hello": "world"})}
            ''',
    },
    "node": {
        "index.mjs": '''\
            export const handler = async (event, context) => {
              console.log(`${context.functionName} got`, JSON.stringify(event).slice(0, 200));
              return { statusCode: 200, body: JSON.stringify({ hello: "world" }) };
            };
            ''',
    },
    "provided": {
        "bootstrap": '''\
            #!/bin/sh
            # A custom runtime: poll the Lambda Runtime API, answer each event.
            set -eu
            API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
            while true; do
              HEADERS="$(mktemp)"
              EVENT="$(curl -sS -LD "$HEADERS" "$API/invocation/next")"
              REQUEST_ID="$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)"
              curl -sS -X POST "$API/invocation/$REQUEST_ID/response" -d '{"hello": "world"}' >/dev/null
              rm -f "$HEADERS"
            done
            ''',
    },
}


def cmd_new(args: argparse.Namespace) -> int:
    if not valid_name(args.name):
        return _refuse_name(args.name)
    config = _config(args)
    functions = config.paths.functions
    target = functions / args.name
    try:
        if not functions.exists() and functions.parent.is_dir():
            functions.mkdir()  # as `faasd serve` creates it on a first run
    except OSError:
        pass  # said below
    problem = functions_dir_problem(functions)
    if problem:
        print(f"faasd: functions: {problem}", file=sys.stderr)
        return 2
    existing = [p for p in (target, target.with_suffix(".py"), target.with_suffix(".js"),
                            target.with_suffix(".mjs"), target.with_suffix(".cjs")) if p.exists()]
    if existing:
        print(f"faasd: {existing[0]} already exists", file=sys.stderr)
        return 2
    # Written aside (a dot name is no function) and renamed into place whole, so a
    # running daemon takes the function complete, its settings and route included.
    try:
        draft = Path(tempfile.mkdtemp(prefix=f".new-{args.name}-", dir=functions))
    except OSError as exc:
        print(f"faasd: cannot write in {functions} ({exc.strerror}) as {this_user()}: run `faasd new` "
              "as a user who may write there (the service's functions are root's)", file=sys.stderr)
        return 1
    try:
        umask = os.umask(0)
        os.umask(umask)
        draft.chmod(0o777 & ~umask)  # as a plain mkdir would have made it, not mkdtemp's 0700
        for filename, text in TEMPLATES[args.runtime].items():
            path = draft / filename
            path.write_text(textwrap.dedent(text))
            if filename == "bootstrap":
                path.chmod(0o755)
        route = f"/{args.name}"
        reserved = reserved_path(route)
        trigger = "" if reserved else f'\n[[triggers]]\ntype = "http"\npath = "{route}"\n'
        (draft / "function.toml").write_text(textwrap.dedent(f'''\
            runtime = "{args.runtime}"
            memory_mb = 128
            timeout_s = 3
            ''') + trigger)
        os.rename(draft, target)
    except OSError as exc:
        shutil.rmtree(draft, ignore_errors=True)
        print(f"faasd: cannot create {target}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"created {target}; try: curl {config.url}/function/{args.name}")
    if reserved:
        print(f"it has no http trigger at {route}: {route} is reserved by faasd")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .registry import scan
    from .sandbox import FunctionUsers, missing_python, unknown_run_as
    from .spec import functions_dir_problem, misnamed, shadowed
    from .triggers.http import claim, routes_of

    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"config: error: {exc}")
        return 1
    users = config.workers.function_users
    problem = ((FunctionUsers(*users, gid=0).clash() if users else None)
               or unknown_run_as(config.workers.run_as) or missing_python(config.workers.python))
    if problem:
        print(f"config: error: {problem}")
        return 1
    print(f"config: ok ({config.source or 'built-in defaults'})")
    problem = functions_dir_problem(config.paths.functions)
    if problem:
        print(f"functions: error: {problem}")
        return 1
    specs = scan(config.paths.functions, config.workers.python or sys.executable)
    # As the daemon starts: functions claim their routes in name order.
    _, conflicts = claim(routes_of(spec) for _, spec in sorted(specs.items()) if not spec.load_error)
    failed = 0
    for name, spec in sorted(specs.items()):
        error = (spec.load_error or (_node_syntax_error(spec) if spec.runtime == "node" else None)
                 or "; ".join(conflicts.get(name, [])))
        if error:
            failed += 1
            print(f"{name}: error: {error}")
        else:
            triggers = ", ".join(trigger_kinds(t.type for t in spec.triggers))
            print(f"{name}: ok ({spec.runtime}, {spec.handler}; triggers: {triggers})")
    unnamed = misnamed(config.paths.functions)
    for entry in unnamed:
        print(f"{entry}: error: the name is not valid UTF-8; a function's name is 1 to 64 of "
              "A-Z a-z 0-9 _ -: rename it")
    failed += len(unnamed)
    for entry, winner in shadowed(config.paths.functions).items():
        print(f"{entry}: warning: not a function: {winner} claims the same name and defines it")
    print(f"{len(specs) + len(unnamed)} functions, {failed} with errors")
    return 1 if failed else 0


def _node_syntax_error(spec) -> str | None:
    """`node --check` on a Node function's handler module (the daemon learns of
    syntax errors only when a worker loads it); None if fine or not checkable."""
    node = shutil.which("node")
    module = spec.handler.rsplit(".", 1)[0]
    candidates = [spec.task_root / f"{module}{suffix}" for suffix in ("", ".js", ".mjs", ".cjs")]
    source = next((c for c in candidates if c.is_file()), None)
    if node is None or source is None:
        return None
    try:
        checked = subprocess.run([node, "--check", str(source)], capture_output=True, text=True,
                                 timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if checked.returncode == 0:
        return None
    lines = [line for line in checked.stderr.splitlines() if line.strip()]
    where = lines[0] if lines else str(source)
    what = next((line for line in lines if "Error" in line.split(":", 1)[0]), "syntax error")
    return f"Runtime.UserCodeSyntaxError: {what} ({where})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faasd", description="A self-hosted AWS Lambda for one Linux box.")
    config_help = "config file (default: $FAASD_CONFIG, else ./config/faasd.toml)"
    parser.add_argument("--config", help=config_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", help="the daemon's address (default: from the config)")

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--functions", help="functions directory")
    serve.add_argument("--data-dir", dest="data_dir", help="data directory (queue, logs, dead letters)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-format", dest="log_format", choices=("text", "json"))
    serve.add_argument("--log-level", dest="log_level", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--insecure", action="store_true",
                       help="allow listening on a non-loopback address without [auth] keys")
    serve.set_defaults(func=cmd_serve)

    invoke = commands.add_parser("invoke", help="invoke a function and print its result")
    invoke.add_argument("name")
    invoke.add_argument("--data", help="JSON event, or @FILE (default: stdin, else {})")
    invoke.add_argument("--async", dest="async_", action="store_true", help="queue it (Event invocation)")
    client(invoke)
    invoke.set_defaults(func=cmd_invoke)

    listing = commands.add_parser("list", help="list functions and their workers")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--cluster", action="store_true",
                         help="list the cluster's nodes, their functions and load instead")
    client(listing)
    listing.set_defaults(func=cmd_list)

    logs = commands.add_parser("logs", help="print a function's log")
    logs.add_argument("name")
    logs.add_argument("--follow", "-f", action="store_true")
    logs.add_argument("--lines", "-n", type=int, default=100)
    client(logs)
    logs.set_defaults(func=cmd_logs)

    new = commands.add_parser("new", help="create a function from a template")
    new.add_argument("name")
    new.add_argument("--runtime", choices=RUNTIMES, default="python")
    new.add_argument("--functions", help="functions directory")
    new.set_defaults(func=cmd_new)

    check = commands.add_parser("check", help="validate the config and every function")
    check.add_argument("--functions", help="functions directory")
    check.set_defaults(func=cmd_check)

    # --config may come after the command too; there, it wins over one given before it.
    for command in commands.choices.values():
        command.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"faasd: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
