"""Several faasd nodes sharing RabbitMQ: real daemons on one machine, the real broker.

Each test runs its own cluster (a unique `[cluster] name`, so its own queues)
and deletes what the cluster declared on the broker when it ends.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import aio_pika
import aiormq
import pytest

from support import CALLER_TRACE, ROOT, Daemon, Proxy, free_port, http, wait_until, write_function

from faasd.cluster.topology import Names
from faasd.cluster.workqueue import ENVELOPE_HEADER, Job


class Cluster:
    """The nodes of one test cluster, all serving the same functions directory."""

    def __init__(self, name: str, url: str, functions: Path, tmp: Path,
                 start_daemon: Callable[..., Daemon]) -> None:
        self.name = name
        self.names = Names(name)
        self.url = url
        self.functions = functions
        self.tmp = tmp
        self.start_daemon = start_daemon
        self.nodes: dict[str, Daemon] = {}
        self.inboxes: set[str] = set()
        self.delays: set[tuple[str, int]] = set()  # (function, ms) delay queues the test causes
        self.dirs = {functions}  # every functions dir a node serves

    def start(self, node: str, *, wait: bool = True, url: str | None = None,
              functions: Path | None = None) -> Daemon:
        self.dirs.add(functions or self.functions)
        daemon = self.start_daemon(functions or self.functions, data=self.tmp / f"data-{node}", wait=wait,
                                   env=self.env(node, url))
        self.nodes[node] = daemon
        return daemon

    def env(self, node: str, url: str | None = None) -> dict[str, str]:
        return {"FAASD_CLUSTER_MODE": "amqp", "FAASD_AMQP_URL": url or self.url,
                "FAASD_CLUSTER_NAME": self.name, "FAASD_CLUSTER_NODE": node,
                "FAASD_CLUSTER_HEARTBEAT_S": "0.5"}

    def view(self, node: str) -> dict[str, Any]:
        response = self.nodes[node].get("/system/cluster")
        assert response.status == 200, response.text
        view = response.json()
        self.inboxes |= {self.names.inbox(n["node"], n["instance"]) for n in view["nodes"]}
        return view

    def wait_formed(self, count: int) -> None:
        """Every node sees `count` live nodes, and one of them fires the schedules."""
        def formed() -> bool:
            for node in self.nodes:
                if self.nodes[node].process is None:
                    continue
                view = self.view(node)
                live = [n for n in view["nodes"] if n["state"] == "ready"]
                if len(live) != count or view["schedule_owner"] is None:
                    return False
            return True

        wait_until(formed, 30, interval=0.1, message=f"a cluster of {count} nodes with a schedule owner")

    def stop(self) -> None:
        for daemon in self.nodes.values():
            daemon.stop()

    async def delete(self, functions: list[str]) -> None:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            queues = [self.names.function(f) for f in functions]
            queues += [self.names.delay(self.names.function(f), ms) for f, ms in self.delays]
            queues += [self.names.node_function(n, f) for n in self.nodes for f in functions]
            queues += [self.names.dead_letter, self.names.scheduler, *self.inboxes]
            queues += [self.names.claim(n) for n in self.nodes]  # gone with their connections
            for queue in queues:
                await channel.queue_delete(queue)
            await channel.exchange_delete(self.names.nodes)


@pytest.fixture
def cluster(amqp_url: str, tmp_path: Path, functions_dir: Path,
            start_daemon: Callable[..., Daemon]) -> Iterator[Cluster]:
    cluster = Cluster(f"test-{uuid.uuid4().hex[:10]}", amqp_url, functions_dir, tmp_path, start_daemon)
    yield cluster
    # Stopped before their queues go: a running node would declare them again.
    cluster.stop()
    functions = sorted({p.stem for d in cluster.dirs for p in d.iterdir() if p.suffix == ".py"})
    asyncio.run(cluster.delete(functions))


def event(daemon: Daemon, name: str, payload: dict) -> str:
    response = daemon.invoke(name, payload, **{"X-Amz-Invocation-Type": "Event"})
    assert response.status == 202, response.text
    return response.headers["x-amzn-requestid"]


def log_lines(daemon: Daemon, function: str, marker: str) -> list[tuple[str, ...]]:
    """The fields after `marker` on each line the function printed on this node."""
    path = daemon.data / "logs" / f"{function}.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return [tuple(m.group(1).split()) for m in re.finditer(rf"\b{marker} (.+)$", text, re.M)]


RECORDER = """
import time


def handler(event, context):
    print("BEGIN", event["i"], context.aws_request_id)
    time.sleep(event.get("sleep", 0))
    print("RAN", event["i"], context.aws_request_id)
    return event["i"]
"""


@pytest.mark.amqp
def test_events_spread_over_two_nodes_and_none_is_lost(cluster: Cluster):
    write_function(cluster.functions, "work.toml", "concurrency = 4\n")
    write_function(cluster.functions, "work.py", RECORDER)
    a, b = cluster.start("a"), cluster.start("b")
    cluster.wait_formed(2)

    count = 1000
    with ThreadPoolExecutor(16) as pool:
        # Half the events are put through each node, as a load balancer would.
        ids = list(pool.map(lambda i: event((a, b)[i % 2], "work", {"i": i}), range(count)))
    assert len(set(ids)) == count

    def ran() -> dict[str, set[str]]:
        return {node: {rid for _, rid in log_lines(daemon, "work", "RAN")}
                for node, daemon in cluster.nodes.items()}

    wait_until(lambda: set().union(*ran().values()) >= set(ids), 180, interval=0.5,
               message="every event to run on one node or the other")
    done = ran()
    assert set().union(*done.values()) == set(ids)  # every event ran; nothing else did
    assert done["a"] and done["b"], {n: len(r) for n, r in done.items()}  # both nodes worked

    def figures(daemon: Daemon) -> dict:
        return daemon.function("work")["queue"]

    wait_until(lambda: figures(a)["depth"] == 0 and figures(b)["depth"] == 0, 10,
               message="the queue to be empty")
    assert figures(a)["succeeded"] + figures(b)["succeeded"] >= count
    assert figures(a)["succeeded"] > 0 and figures(b)["succeeded"] > 0

    view = cluster.view("a")
    assert view["mode"] == "amqp" and view["cluster"] == cluster.name and view["node"] == "a"
    assert view["queue_type"] == "quorum" and view["broker"]["state"] == "connected"
    nodes = {n["node"]: n for n in view["nodes"]}
    assert set(nodes) == {"a", "b"}
    for name, daemon in (("a", a), ("b", b)):
        assert nodes[name]["address"] == daemon.url and nodes[name]["state"] == "ready"
        assert nodes[name]["functions"] == ["work"]
        assert nodes[name]["load"]["max_concurrency"] == 1000
    assert sum(1 for n in nodes.values() if n["schedule_owner"]) == 1

    listing = subprocess.run([sys.executable, "-m", "faasd", "list", "--cluster", "--url", a.url],
                             capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["NODE", "ADDRESS", "STATE", "INFLIGHT", "LOAD1", "FUNCTIONS"]
    assert any(line.startswith("a") and a.url in line and line.rstrip().endswith("work") for line in lines)
    assert any(line.startswith("b") and b.url in line for line in lines)
    assert f"cluster {cluster.name}" in listing.stdout


@pytest.mark.amqp
def test_the_events_of_a_killed_node_finish_on_the_other(cluster: Cluster):
    write_function(cluster.functions, "slow.toml", "concurrency = 2\ntimeout_s = 30\n")
    write_function(cluster.functions, "slow.py", RECORDER)
    a, b = cluster.start("a"), cluster.start("b")
    cluster.wait_formed(2)
    ids = {event((a, b)[i % 2], "slow", {"i": i, "sleep": 1.5}): i for i in range(24)}

    def in_flight_on_a() -> set[str]:
        begun = {rid for _, rid in log_lines(a, "slow", "BEGIN")}
        return begun - {rid for _, rid in log_lines(a, "slow", "RAN")}

    # Kill it once it has finished some events and is running others.
    wait_until(lambda: log_lines(a, "slow", "RAN") and in_flight_on_a(), 60, interval=0.05,
               message="node a to be running events")
    a.kill9()
    interrupted = in_flight_on_a()
    assert interrupted

    def ran_anywhere() -> set[str]:
        return {rid for d in (a, b) for _, rid in log_lines(d, "slow", "RAN")}

    wait_until(lambda: ran_anywhere() >= set(ids), 120, interval=0.2,
               message="every event to finish after node a was killed")
    on_b = {rid for _, rid in log_lines(b, "slow", "RAN")}
    assert interrupted <= on_b  # what a held unacknowledged was run again by b, with its request id
    wait_until(lambda: b.function("slow")["queue"]["depth"] == 0, 15, message="b's queue to empty")
    wait_until(lambda: "cluster: node a is lost, not heard from for" in daemon_lines(b), 30,
               message="node b to say that a is lost")


TICKER = """
def handler(event, context):
    print("TICK", event["time"], context.aws_request_id)
"""


def tick_times(daemons: list[Daemon]) -> list[float]:
    """The scheduled instant of every run, on any of `daemons`."""
    times = []
    for daemon in daemons:
        for fields in log_lines(daemon, "tick", "TICK"):
            times.append(float(calendar.timegm(time.strptime(fields[0], "%Y-%m-%dT%H:%M:%SZ"))))
    return sorted(times)


@pytest.mark.amqp
def test_cron_fires_once_per_tick_across_three_nodes_and_moves_when_its_owner_dies(cluster: Cluster):
    write_function(cluster.functions, "tick.py", TICKER)
    # Runs may overlap: this test counts ticks, and a slow run must not skip the next.
    write_function(cluster.functions, "tick.toml",
                   '[[triggers]]\ntype = "cron"\nschedule = "* * * * * *"\noverlap = "allow"\n')
    for node in ("a", "b", "c"):
        cluster.start(node)
    cluster.wait_formed(3)
    daemons = list(cluster.nodes.values())

    start = math.ceil(time.time()) + 1
    time.sleep(start + 10 - time.time() + 2)  # ten ticks, and time to run the last
    window = [t for t in tick_times(daemons) if start <= t < start + 10]
    assert 9 <= len(window) <= 11, window
    assert len(set(window)) == len(window), "a tick fired on more than one node"

    owner = cluster.view("a")["schedule_owner"]
    killed_at = time.time()
    cluster.nodes[owner].kill9()
    survivors = [d for name, d in cluster.nodes.items() if name != owner]
    wait_until(lambda: [t for t in tick_times(survivors) if t > killed_at], 15, interval=0.1,
               message="a tick after the owner was killed")
    resumed = min(t for t in tick_times(survivors) if t > killed_at)
    assert resumed - killed_at <= 5, f"firing resumed {resumed - killed_at:.1f}s after the owner died"

    survivor = next(name for name in cluster.nodes if name != owner)
    wait_until(lambda: cluster.view(survivor)["schedule_owner"] not in (None, owner), 10,
               message="a new schedule owner")
    time.sleep(3)
    later = [t for t in tick_times(survivors) if t > killed_at]
    assert len(set(later)) == len(later), "a tick fired twice after the takeover"


@pytest.mark.amqp
def test_catch_up_runs_the_latest_tick_no_node_fired_and_not_one_another_node_fired(cluster: Cluster):
    write_function(cluster.functions, "tick.py", TICKER)
    write_function(cluster.functions, "tick.toml", '[[triggers]]\ntype = "cron"\n'
                   'schedule = "*/2 * * * * *"\ncatch_up = 1\noverlap = "allow"\n')
    # b fires a tick, so that it has a last tick of its own; then a takes over.
    b = cluster.start("b")
    wait_until(lambda: tick_times([b]), 20, interval=0.1, message="b to fire a tick")
    a = cluster.start("a")
    cluster.wait_formed(2)
    assert b.stop() == 0
    wait_until(lambda: cluster.view("a")["schedule_owner"] == "a", 10, message="a to fire the schedules")
    # b comes back while a fires: the ticks a fires are not b's to run again.
    b = cluster.start("b")
    cluster.wait_formed(2)
    seen = time.time()
    wait_until(lambda: len([t for t in tick_times([a]) if t > seen]) >= 2, 20, interval=0.1,
               message="a to fire two ticks while b is up")
    assert a.stop() == 0  # b takes the schedules over
    wait_until(lambda: cluster.view("b")["schedule_owner"] == "b", 10, message="b to fire the schedules")
    wait_until(lambda: [t for t in tick_times([b]) if t > seen], 20, interval=0.1,
               message="b to fire a tick")
    assert b.stop() == 0
    stopped = time.time()
    wait_until(lambda: time.time() > stopped + 5, 10, message="two ticks to pass with no node up")
    b = cluster.start("b")

    def since_stopped() -> list[float]:
        return [t for t in tick_times([b]) if t > stopped]

    wait_until(lambda: len(since_stopped()) >= 3, 20, interval=0.1, message="b to fire again")
    # The latest tick that passed while no node fired ran once, caught up by
    # the node that took the schedules; the schedule went on from there.
    state = b.function("tick")["triggers"][0]["state"]
    assert state["caught_up"] == 1, state
    ticks = since_stopped()
    assert ticks == [ticks[0] + 2 * i for i in range(len(ticks))], ticks
    everything = tick_times([a, b])
    assert len(set(everything)) == len(everything), f"a tick ran twice: {everything}"


def tick_runs(daemons: list[Daemon]) -> dict[float, list[str]]:
    """The request ids each scheduled instant ran with, on any of `daemons`."""
    runs: dict[float, list[str]] = {}
    for daemon in daemons:
        for fields in log_lines(daemon, "tick", "TICK"):
            instant = float(calendar.timegm(time.strptime(fields[0], "%Y-%m-%dT%H:%M:%SZ")))
            runs.setdefault(instant, []).append(fields[1])
    return runs


@pytest.mark.amqp
def test_no_tick_is_lost_when_the_schedule_owner_freezes_across_ticks_and_dies(cluster: Cluster):
    write_function(cluster.functions, "tick.py", TICKER)
    write_function(cluster.functions, "tick.toml", '[[triggers]]\ntype = "cron"\n'
                   'schedule = "*/2 * * * * *"\noverlap = "allow"\n')
    for node in ("a", "b"):
        cluster.start(node)
    cluster.wait_formed(2)
    owner = cluster.view("a")["schedule_owner"]
    other = "b" if owner == "a" else "a"
    frozen, survivor = cluster.nodes[owner], cluster.nodes[other]
    wait_until(lambda: tick_runs([frozen]), 20, interval=0.1, message="the owner to fire a tick")
    start = max(tick_runs([frozen]))

    # Frozen just before a tick, the owner keeps its connection open: to the
    # broker and to the other node's heartbeats it is alive (a machine that
    # hangs or loses power looks the same until the AMQP heartbeat runs out).
    # It misses two ticks, and dies only then.
    due = math.floor(time.time() / 2) * 2 + 2
    if due - time.time() < 0.5:
        due += 2
    time.sleep(due - 0.3 - time.time())
    os.kill(frozen.process.pid, signal.SIGSTOP)
    time.sleep(due + 2.5 - time.time())
    frozen.kill9()  # SIGKILL ends a stopped process too
    wait_until(lambda: cluster.view(other)["schedule_owner"] == other, 15,
               message="the other node to take the schedules")
    end = math.floor(time.time() / 2) * 2 + 4
    wait_until(lambda: max(tick_runs([survivor]), default=0) >= end, 20, interval=0.1,
               message="the new owner to fire on")

    # Every tick ran at least once, each with the one request id of its
    # instant (a handler can de-duplicate), and none more than twice.
    runs = tick_runs([frozen, survivor])
    expected = [start + 2 * i for i in range(int((end - start) / 2) + 1)]
    missing = [time.strftime("%H:%M:%S", time.gmtime(t)) for t in expected if t not in runs]
    assert not missing, f"ticks never fired: {missing}"
    assert all(len(set(runs[t])) == 1 for t in expected), runs
    assert all(len(runs[t]) <= 2 for t in expected), runs


FAILING = """
def handler(event, context):
    print("ATTEMPT", event["i"], context.aws_request_id)
    raise ValueError("no good")
"""

CATCHER = """
import json


def handler(event, context):
    print("CAUGHT " + json.dumps(event))
"""


@pytest.mark.amqp
def test_retries_wait_on_the_broker_and_end_at_the_failure_destination(cluster: Cluster):
    write_function(cluster.functions, "flaky.py", FAILING)
    write_function(cluster.functions, "flaky.toml", '[async]\nmax_retries = 2\nretry_delays_s = [1]\n'
                                                     'on_failure = "function:catcher"\n')
    write_function(cluster.functions, "catcher.py", CATCHER)
    cluster.delays.add(("flaky", 1000))
    a, b = cluster.start("a"), cluster.start("b")
    cluster.wait_formed(2)
    request_id = event(a, "flaky", {"i": 7})

    def caught() -> list[dict]:
        found = []
        for daemon in (a, b):
            path = daemon.data / "logs" / "catcher.log"
            text = path.read_text() if path.exists() else ""
            found += [json.loads(m.group(1)) for m in re.finditer(r"CAUGHT (\{.*\})$", text, re.M)]
        return found

    wait_until(caught, 60, interval=0.2, message="the failure record at the destination")
    record = caught()[0]
    assert record["requestContext"]["requestId"] == request_id
    assert record["requestContext"]["condition"] == "RetriesExhausted"
    assert record["requestContext"]["approximateInvokeCount"] == 3
    assert record["requestPayload"] == {"i": 7}
    assert record["responsePayload"]["errorType"] == "ValueError"
    attempts = [fields for d in (a, b) for fields in log_lines(d, "flaky", "ATTEMPT")]
    assert [rid for _, rid in attempts] == [request_id] * 3  # one request id across the retries
    retried = sum(d.function("flaky")["queue"]["retried"] for d in (a, b))
    dead = sum(d.function("flaky")["queue"]["dead_lettered"] for d in (a, b))
    assert (retried, dead) == (2, 1)
    assert not any((d.data / "dead-letter" / "flaky").exists() for d in (a, b))


ARN_TELLER = """
import os

def handler(event, context):
    print("ARN", context.invoked_function_arn, os.environ["_X_AMZN_TRACE_ID"], context.aws_request_id)
    if event.get("fail"):
        raise ValueError("once more")
"""


SUCCEEDING = """
def handler(event, context):
    return {"done": event["i"]}
"""


@pytest.mark.amqp
def test_a_destination_function_on_other_nodes_only_gets_its_records(cluster: Cluster):
    # A rolling deploy: the node that runs `work` does not have its destination yet.
    write_function(cluster.functions, "catcher.py", CATCHER)
    behind = cluster.tmp / "functions-behind"
    write_function(behind, "work.py", SUCCEEDING)
    write_function(behind, "work.toml", '[async]\non_success = "function:catcher"\n')
    a, b = cluster.start("a"), cluster.start("b", functions=behind)
    cluster.wait_formed(2)
    request_id = event(b, "work", {"i": 3})

    def caught() -> list[dict]:
        path = a.data / "logs" / "catcher.log"
        text = path.read_text() if path.exists() else ""
        return [json.loads(m.group(1)) for m in re.finditer(r"CAUGHT (\{.*\})$", text, re.M)]

    wait_until(lambda: b.function("work")["queue"]["succeeded"] == 1, 30, message="work to run on b")
    wait_until(caught, 30, interval=0.2, message="the success record at the destination, on a")
    record = caught()[0]
    assert record["requestContext"]["requestId"] == request_id
    assert record["requestContext"]["condition"] == "Success"
    assert record["responsePayload"] == {"done": 3}
    assert "destination function catcher does not exist" not in b.output()


@pytest.mark.amqp
def test_an_event_for_a_function_only_other_nodes_have_is_queued_for_them(cluster: Cluster):
    # A rolling deploy: `work` is on a, not yet on b, and the load balancer sends to b.
    write_function(cluster.functions, "work.py", RECORDER)
    behind = cluster.tmp / "functions-behind"
    write_function(behind, "other.py", SUCCEEDING)
    a, b = cluster.start("a"), cluster.start("b", functions=behind)
    cluster.wait_formed(2)
    invoke = event(b, "work", {"i": 1})
    response = b.post("/2014-11-13/functions/work/invoke-async/", {"i": 2})
    assert response.status == 202, response.text
    queued = response.headers["x-amzn-requestid"]
    wait_until(lambda: {rid for _, rid in log_lines(a, "work", "RAN")} == {invoke, queued}, 30,
               interval=0.2, message="both events to run on a")
    # No live node has it: 404, as before; nor is a call run elsewhere (b has no worker for it).
    nowhere = b.invoke("nowhere", {}, **{"X-Amz-Invocation-Type": "Event"})
    assert nowhere.status == 404 and nowhere.json()["Type"] == "User", nowhere.text
    assert "Function not found: arn:aws:lambda:us-east-1:000000000000:function:nowhere" in nowhere.text
    assert b.invoke("work", {"i": 3}).status == 404
    # Once a is gone, b no longer takes events for it.
    a.stop()
    wait_until(lambda: b.invoke("work", {}, **{"X-Amz-Invocation-Type": "Event"}).status == 404, 30,
               message="b to refuse events of a function no live node has")


@pytest.mark.amqp
def test_an_event_keeps_its_qualifier_and_trace_through_the_broker_and_its_retries(cluster: Cluster):
    write_function(cluster.functions, "teller.toml", "[async]\nmax_retries = 1\nretry_delays_s = [1]\n")
    write_function(cluster.functions, "teller.py", ARN_TELLER)
    cluster.delays.add(("teller", 1000))
    a, b = cluster.start("a"), cluster.start("b")
    cluster.wait_formed(2)
    arn = "arn:aws:lambda:us-east-1:000000000000:function:teller"
    plain = event(a, "teller", {})
    qualified = event(a, "teller:$LATEST", {})
    response = b.invoke("teller:$LATEST", {"fail": True}, **{"X-Amz-Invocation-Type": "Event",
                                                               "X-Amzn-Trace-Id": CALLER_TRACE})
    assert response.status == 202, response.text
    retried = response.headers["x-amzn-requestid"]

    def runs() -> dict[str, list[tuple[str, str]]]:
        found: dict[str, list[tuple[str, str]]] = {}
        for daemon in (a, b):
            for seen, trace, request_id in log_lines(daemon, "teller", "ARN"):
                found.setdefault(request_id, []).append((seen, trace))
        return found

    wait_until(lambda: len(runs().get(retried, [])) == 2 and plain in runs() and qualified in runs(),
               60, interval=0.2, message="the three events to run, one of them twice")
    found = runs()
    assert [seen for seen, _ in found[plain]] == [arn]
    assert [seen for seen, _ in found[qualified]] == [f"{arn}:$LATEST"]
    assert found[retried] == [(f"{arn}:$LATEST", CALLER_TRACE)] * 2


def test_a_cluster_event_carries_its_invoked_arn_and_trace_and_one_from_an_earlier_release_reads_without(
        tmp_path):
    arn = "arn:aws:lambda:us-east-1:000000000000:function:fn:$LATEST"
    job = Job("fn", "rid-1", b"{}", "api", 1700000000.0, home="q", invoked_arn=arn, trace_id=CALLER_TRACE)
    carried = Job.from_message("fn", "q", job.to_message())
    assert (carried.invoked_arn, carried.trace_id) == (arn, CALLER_TRACE)
    # An earlier release's envelope has neither: the function's own ARN, and a new trace each run.
    earlier = Job("fn", "rid-2", b"{}", "api", 1700000000.0, home="q").to_message()
    assert not {"invoked_arn", "trace_id"} & set(json.loads(earlier.headers[ENVELOPE_HEADER]))
    read = Job.from_message("fn", "q", earlier)
    assert (read.invoked_arn, read.trace_id) == (None, None)
    envelope = json.loads(earlier.headers[ENVELOPE_HEADER])
    earlier.headers[ENVELOPE_HEADER] = json.dumps({**envelope, "invoked_arn": 7})
    with pytest.raises(ValueError, match="invoked_arn"):
        Job.from_message("fn", "q", earlier)
    # A last error that is not an error's JSON text is refused here, not when a retry reads it.
    for last_error in ({"errorType": "E"}, "not json", '["E"]'):
        earlier.headers[ENVELOPE_HEADER] = json.dumps({**envelope, "last_error": last_error})
        with pytest.raises(ValueError, match="last_error"):
            Job.from_message("fn", "q", earlier)
    earlier.headers[ENVELOPE_HEADER] = json.dumps({**envelope, "last_error": '{"errorType": "E"}'})
    assert Job.from_message("fn", "q", earlier).previous_error().error_type == "E"


def daemon_lines(daemon: Daemon) -> str:
    """What the daemon logged itself, without the lines of its functions (a function's
    record is one line, its own lines joined with \r, which splitlines() would cut)."""
    return "\n".join(line for line in daemon.output().split("\n") if not re.search(r" \[[\w-]+\] ", line))


async def name_held(url: str, claim: str) -> bool:
    """Whether a node's name claim (an exclusive queue) is held by a live connection."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(claim, passive=True)
        except aiormq.exceptions.ChannelLockedResource:
            return True
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return False


async def declare_classic(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)


async def delete_queue(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)


@pytest.mark.amqp
def test_a_retry_the_broker_refuses_is_held_not_run_again_and_sent_once_it_can_be(cluster: Cluster):
    write_function(cluster.functions, "flaky.py", FAILING)
    write_function(cluster.functions, "flaky.toml", "[async]\nmax_retries = 1\nretry_delays_s = [1]\n")
    cluster.delays.add(("flaky", 1000))
    # Its delay queue exists with other arguments (made by hand): the broker refuses the retry.
    delay_queue = cluster.names.delay(cluster.names.function("flaky"), 1000)
    asyncio.run(declare_classic(cluster.url, delay_queue))
    a = cluster.start("a")
    cluster.wait_formed(1)
    request_id = event(a, "flaky", {"i": 1})

    def attempts() -> list[str]:
        return [rid for _, rid in log_lines(a, "flaky", "ATTEMPT")]

    wait_until(attempts, 20, message="the event to run")
    time.sleep(4)  # handed back, it would have run again by now, once a second
    assert attempts() == [request_id]
    ready = a.get("/readyz")
    assert ready.status == 200  # the node serves; its /readyz says what it holds
    assert f"1 event(s) held back, the broker refusing what they send to {delay_queue}" in \
        ready.json()["checks"]["async_queue"]["detail"]
    said = [line for line in a.output().splitlines() if "cannot send the retry" in line]
    assert len(said) == 1 and "exists on the broker with other settings" in said[0], said
    assert "Traceback" not in daemon_lines(a)  # the function's own traceback is in its lines

    asyncio.run(delete_queue(cluster.url, delay_queue))
    dead_letter = a.data / "dead-letter" / "flaky" / f"{request_id}.json"
    wait_until(dead_letter.exists, 30, interval=0.2, message="the retry to run and end as a dead letter")
    assert attempts() == [request_id, request_id]  # the first attempt and its one retry
    assert json.loads(dead_letter.read_text())["requestContext"]["approximateInvokeCount"] == 2
    assert f"cluster: {delay_queue} takes events again" in a.output()
    assert "Traceback" not in daemon_lines(a)
    figures = a.function("flaky")["queue"]
    assert (figures["retried"], figures["dead_lettered"], figures["depth"]) == (1, 1, 0)


async def publish(url: str, queue: str, message: aio_pika.Message) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)


async def take_one(url: str, queue: str) -> aio_pika.abc.AbstractIncomingMessage | None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return await declared.get(no_ack=True, fail=False)


@pytest.mark.amqp
def test_an_event_the_node_cannot_process_goes_to_the_dead_letter_queue_on_its_third_fault(cluster: Cluster):
    write_function(cluster.functions, "poison.py", FAILING)
    write_function(cluster.functions, "poison.toml", "[async]\nmax_retries = 0\n")
    a = cluster.start("a")
    cluster.wait_formed(1)
    wait_until(lambda: a.get("/readyz").status == 200, 20, message="node a to take events")
    # A faulty producer's event: its time is past what the platform's time_t holds. It runs,
    # fails, and the node trips over that time when it writes the dead-letter record.
    message = Job("poison", "poison-1", b'{"i": 1}', "api", time.time()).to_message()
    envelope = json.loads(message.headers[ENVELOPE_HEADER])
    message.headers[ENVELOPE_HEADER] = json.dumps({**envelope, "enqueued_at": 1e20})
    asyncio.run(publish(cluster.url, cluster.names.function("poison"), message))

    # Handed back each time, it would run once a second up to the broker's delivery limit (50).
    dead = wait_until(lambda: asyncio.run(take_one(cluster.url, cluster.names.dead_letter)), 30,
                      interval=0.5, message="the event in the dead-letter queue")
    assert dead.message_id == "poison-1"
    assert dead.headers["x-death"][0]["reason"] == "rejected"  # by the node, not the delivery limit
    time.sleep(2)
    assert [rid for _, rid in log_lines(a, "poison", "ATTEMPT")] == ["poison-1"] * 3
    own = daemon_lines(a)
    assert own.count("Traceback") == 1  # the first fault's; one line each after
    assert (f"cluster: event poison-1 of poison (from api) could not be processed 3 times on this node "
            f"(last: OverflowError: timestamp out of range for platform time_t); it goes to "
            f"{cluster.names.dead_letter}, not handed back again") in own
    assert a.function("poison")["queue"]["dead_lettered"] == 1


@pytest.mark.amqp
def test_a_node_without_its_broker_is_not_ready_and_refuses_events(cluster: Cluster):
    write_function(cluster.functions, "work.py", RECORDER)
    dead_broker = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    node = cluster.start("lonely", wait=False, url=dead_broker)
    wait_until(lambda: _answers(node), 20, message="the daemon to listen")
    ready = node.get("/readyz")
    assert ready.status == 503
    check = ready.json()["checks"]["async_queue"]
    assert not check["ok"] and "127.0.0.1" in check["detail"], check
    refused = node.invoke("work", {"i": 1}, **{"X-Amz-Invocation-Type": "Event"})
    assert refused.status == 500
    assert "broker" in refused.json()["message"], refused.text
    assert refused.json()["Type"] == "Service"  # the service's fault, not the caller's
    # Synchronous calls do not need the broker.
    assert node.invoke("work", {"i": 2}).status == 200


@pytest.mark.amqp
def test_a_node_pointed_at_a_vhost_that_does_not_exist_says_so(cluster: Cluster, amqp_url: str):
    write_function(cluster.functions, "work.py", RECORDER)
    vhost = f"faasd-none-{uuid.uuid4().hex[:8]}"
    node = cluster.start("astray", wait=False, url=amqp_url.rstrip("/") + "/" + vhost)
    wait_until(lambda: _answers(node), 20, message="the daemon to listen")
    wait_until(lambda: node.get("/readyz").json()["checks"]["async_queue"]["detail"].count(vhost) == 2, 20,
               message="/readyz to name the virtual host")
    check = node.get("/readyz").json()["checks"]["async_queue"]
    assert not check["ok"]
    assert f"refused to open virtual host '{vhost}': it does not exist" in check["detail"], check
    assert f"virtual host '{vhost}': it does not exist" in node.output()
    assert "Connection.Close object" not in node.output() + check["detail"]


@pytest.mark.amqp
def test_a_node_stops_at_once_while_its_broker_is_unreachable(cluster: Cluster, amqp_url: str):
    # Letting a consumer go waits for the connection to come back: with the
    # broker gone, a stop that waited for it would wait for ever.
    write_function(cluster.functions, "work.py", RECORDER)
    proxy = Proxy(("127.0.0.1", 5672))
    try:
        node = cluster.start("cut", url=amqp_url.replace("127.0.0.1:5672", f"127.0.0.1:{proxy.port}"))
        cluster.wait_formed(1)
        assert event(node, "work", {"i": 1})
        wait_until(lambda: log_lines(node, "work", "RAN"), 20, message="the event to run")
        proxy.cut()
        wait_until(lambda: node.get("/readyz").status == 503, 20, message="/readyz to degrade")
        # The drain allows 30 s; a stop held up by the broker would be killed at 10.
        assert node.stop(timeout=10) == 0
    finally:
        proxy.close()


@pytest.mark.amqp
def test_a_node_cut_off_from_the_broker_says_so_and_does_not_call_the_others_lost(cluster: Cluster,
                                                                                  amqp_url: str):
    write_function(cluster.functions, "work.py", RECORDER)
    proxy = Proxy(("127.0.0.1", 5672))
    try:
        cut = cluster.start("cut", url=amqp_url.replace("127.0.0.1:5672", f"127.0.0.1:{proxy.port}"))
        cluster.start("other")
        cluster.wait_formed(2)
        proxy.cut()
        wait_until(lambda: cut.get("/readyz").status == 503, 20, message="the cut node to be unready")
        # Well past the three heartbeats (1.5 s) after which a silent node is lost.
        time.sleep(3)
        view = cluster.view("cut")
        states = {n["node"]: n["state"] for n in view["nodes"]}
        assert states == {"cut": "disconnected", "other": "unknown"}, view["nodes"]
        assert view["schedule_owner"] is None and view["broker"]["state"] != "connected"
        assert "node other is lost" not in cut.output()
        # The others, which do hear each other, see the cut node lost.
        assert {n["node"]: n["state"] for n in cluster.view("other")["nodes"]} == {
            "other": "ready", "cut": "lost"}
        listing = subprocess.run([sys.executable, "-m", "faasd", "list", "--cluster", "--url", cut.url],
                                 capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert re.search(r"^cut\s+\S+\s+disconnected\s", listing.stdout, re.M), listing.stdout
        # How long it has not been heard from; no load figures that are only its last word.
        assert re.search(r"^other\s+\S+\s+unknown, \d+s ago\s+-\s+-\s+work$", listing.stdout, re.M), \
            listing.stdout
        proxy.restore()
        cluster.wait_formed(2)
        assert "node other is lost" not in cut.output()
    finally:
        proxy.close()


@pytest.mark.amqp
def test_an_event_running_when_the_connection_drops_finishes_as_its_own_invocation(cluster: Cluster,
                                                                                   amqp_url: str):
    # The broker takes the event back when the connection drops, and runs it
    # again (at least once); the run already going must still end as an
    # invocation of its own, within the function's concurrency.
    write_function(cluster.functions, "slow.toml", "concurrency = 1\ntimeout_s = 30\n")
    write_function(cluster.functions, "slow.py", RECORDER)
    proxy = Proxy(("127.0.0.1", 5672))
    try:
        node = cluster.start("cut", url=amqp_url.replace("127.0.0.1:5672", f"127.0.0.1:{proxy.port}"))
        cluster.wait_formed(1)
        request_id = event(node, "slow", {"i": 1, "sleep": 3})
        wait_until(lambda: log_lines(node, "slow", "BEGIN"), 20, message="the event to begin")
        proxy.cut()
        proxy.restore()

        def settled() -> bool:
            # Nothing of the event running or held, and its last log line a REPORT.
            queue = node.function("slow")["queue"]
            last = [line for line in node.log_of("slow").splitlines() if request_id in line][-1]
            return queue["running"] == 0 and queue["held_here"] == 0 and "REPORT" in last

        wait_until(settled, 60, interval=0.1, message="the event to run again after the reconnect")
        # The node holds its name again on the new connection.
        assert asyncio.run(name_held(amqp_url, cluster.names.claim("cut")))
    finally:
        proxy.close()
    lines = [line.split("\t", 2) for line in node.log_of("slow").splitlines()]
    # Both runs are whole invocations: what the first printed is its own, and it has its END.
    assert [rid for _, rid, text in lines if text.startswith("RAN ")] == [request_id] * 2, lines
    assert sum(1 for _, _, text in lines if text == f"END RequestId: {request_id}") == 2, lines
    # concurrency = 1: the second run began once the first had ended.
    marks = [text.split()[0] for _, _, text in lines if text.split()[:1] in (["BEGIN"], ["RAN"])]
    assert marks == ["BEGIN", "RAN", "BEGIN", "RAN"], marks
    assert "no invocation in flight" not in node.output()
    # The first run's acknowledgement failed with its channel; the warning says why.
    reasons = re.findall(r"could not \w+ an event of slow \((.*?)\);", node.output())
    assert reasons and all(reason.strip() for reason in reasons), reasons


@pytest.mark.amqp
def test_a_second_node_under_a_name_in_use_refuses_to_run_and_the_first_runs_on(cluster: Cluster):
    # A config copied from another machine: the same [cluster] node twice.
    write_function(cluster.functions, "work.py", RECORDER)
    a, b = cluster.start("a"), cluster.start("b")
    cluster.wait_formed(2)
    twin = cluster.nodes["a-copy"] = cluster.start_daemon(
        cluster.functions, data=cluster.tmp / "data-a-copy", wait=False, env=cluster.env("a"))
    assert twin.process is not None
    wait_until(lambda: twin.process.poll() is not None, 30, message="the second node named a to stop")
    assert twin.process.returncode == 78, twin.output()  # EX_CONFIG: systemd does not restart it
    said = twin.output()
    assert (f"another node is running as 'a' (pid {a.process.pid} at {a.url}, instance "
            f"{cluster.view('a')['nodes'][0]['instance']}); node names must be unique: set [cluster] "
            "node (or FAASD_CLUSTER_NODE) to a name of this node's own") in said, said
    # It never announced itself: the others saw no second a, and a is as it was.
    assert "also calls itself" not in a.output() + b.output()
    nodes = {n["node"]: n for n in cluster.view("b")["nodes"]}
    assert set(nodes) == {"a", "b"} and nodes["a"]["address"] == a.url and nodes["a"]["state"] == "ready"
    assert a.get("/readyz").status == 200
    request_id = event(b, "work", {"i": 1})
    wait_until(lambda: request_id in {rid for d in (a, b) for _, rid in log_lines(d, "work", "RAN")}, 30,
               message="an event to run")


@pytest.mark.amqp
def test_a_node_waits_for_its_name_while_the_broker_holds_a_hung_one_then_the_hung_one_stops(
        cluster: Cluster):
    # The old process hangs (SIGSTOP): the broker holds its connection, and the
    # name, until the AMQP heartbeat (3 s here) runs out. The new one waits for
    # that, then runs; the old one, woken, finds the name taken and stops.
    write_function(cluster.functions, "work.py", RECORDER)
    url = cluster.url + "?heartbeat=3"
    old = cluster.start("a", url=url)
    cluster.wait_formed(1)
    assert old.process is not None
    old.process.send_signal(signal.SIGSTOP)
    try:
        new = cluster.nodes["a-new"] = cluster.start_daemon(
            cluster.functions, data=cluster.tmp / "data-a-new", wait=False, env=cluster.env("a", url))
        wait_until(lambda: "held on the broker by another connection" in new.output(), 20,
                   message="the new node to wait for its name")
        ready = new.get("/readyz")
        assert ready.status == 503 and "waiting for the node name a" in ready.text, ready.text
        wait_until(lambda: new.get("/readyz").status == 200, 30, message="the new node to take its name")
        assert "node name a is free again: this node takes it" in new.output()
    finally:
        old.process.send_signal(signal.SIGCONT)
    wait_until(lambda: old.process.poll() is not None, 30, message="the old node to stop")
    assert old.process.returncode == 78
    assert f"another node is running as 'a' (pid {new.process.pid} at {new.url}" in old.output()
    assert [(n["node"], n["address"]) for n in new.get("/system/cluster").json()["nodes"]] == [("a", new.url)]


def _answers(daemon: Daemon) -> bool:
    try:
        return daemon.get("/healthz", timeout=2).status == 200
    except OSError:
        return False


def test_a_local_node_shows_itself_as_the_whole_cluster(daemon: Daemon):
    view = daemon.get("/system/cluster").json()
    assert view["mode"] == "local" and view["cluster"] is None
    assert [n["address"] for n in view["nodes"]] == [daemon.url]
    assert view["nodes"][0]["schedule_owner"] is True and view["nodes"][0]["state"] == "ready"
    listing = subprocess.run([sys.executable, "-m", "faasd", "list", "--cluster", "--url", daemon.url],
                             capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert listing.returncode == 0 and daemon.url in listing.stdout, listing.stderr
    assert 'not in a cluster' in listing.stdout


UPLOADS = """
def handler(event, context):
    print("FILE", event["Records"][0]["s3"]["object"]["key"])
"""


@pytest.mark.amqp
def test_a_file_event_runs_on_the_node_that_saw_the_file(cluster: Cluster):
    write_function(cluster.functions, "uploads.py", UPLOADS)
    # A relative dir is under each node's own data dir: every node watches its own.
    write_function(cluster.functions, "uploads.toml", '[[triggers]]\ntype = "file"\ndir = "inbox"\n')
    a, b = cluster.start("a"), cluster.start("b")
    cluster.wait_formed(2)
    for daemon, names in ((a, ["a1.txt", "a2.txt", "a3.txt"]), (b, ["b1.txt", "b2.txt", "b3.txt"])):
        for name in names:
            (daemon.data / "inbox").mkdir(exist_ok=True)
            (daemon.data / "inbox" / name).write_text(name)

    def keys(daemon: Daemon) -> list[str]:
        return sorted(fields[0] for fields in log_lines(daemon, "uploads", "FILE"))

    wait_until(lambda: len(keys(a)) + len(keys(b)) >= 6, 30, interval=0.1, message="six file events")
    time.sleep(1)  # nothing else may come
    assert keys(a) == ["a1.txt", "a2.txt", "a3.txt"]
    assert keys(b) == ["b1.txt", "b2.txt", "b3.txt"]


# -- the load balancer configs the README documents -----------------------------------------

HELLO = """
def handler(event, context):
    print("HELLO", context.aws_request_id)
    return {"statusCode": 200, "body": "hi"}
"""


def readme_block(language: str) -> str:
    """The README's fenced block in `language` (there is one of each)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)
    assert len(blocks) == 1, f"expected one {language} block in README.md, found {len(blocks)}"
    return blocks[0]


def with_nodes(config: str, pattern: str, nodes: list[Daemon]) -> str:
    """`config` with its example node addresses replaced by `nodes`' ports."""
    examples = re.findall(pattern, config)
    assert len(examples) == len(nodes), examples
    for example, node in zip(examples, nodes):
        config = config.replace(example, f"127.0.0.1:{node.port}", 1)
    return config


def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if path is None:
        message = f"{tool} is not installed (apt-get install {tool})"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs it")
        pytest.skip(message)
    return path


@contextmanager
def running(args: list[str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def served_by(daemons: list[Daemon]) -> list[int]:
    return [len(log_lines(d, "hello", "HELLO")) for d in daemons]


@pytest.mark.amqp
def test_the_readme_nginx_config_balances_the_nodes_and_skips_a_stopped_one(cluster: Cluster, tmp_path):
    nginx = need("nginx")
    write_function(cluster.functions, "hello.py", HELLO)
    a, b = cluster.start("a"), cluster.start("b")
    port = free_port()
    site = with_nodes(readme_block("nginx"), r"10\.0\.0\.\d+:8080", [a, b])
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    (tmp_path / "faasd.conf").write_text(site)
    temp = "\n".join(f"    {kind}_temp_path {tmp_path}/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp_path / "nginx.conf").write_text(
        f"worker_processes 1;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/nginx-error.log;\n"
        f"events {{}}\nhttp {{\n    access_log {tmp_path}/nginx-access.log;\n{temp}\n"
        f"    include {tmp_path}/faasd.conf;\n}}\n")
    check = subprocess.run([nginx, "-t", "-c", str(tmp_path / "nginx.conf")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    with running([nginx, "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"], tmp_path / "nginx.log"):
        front = f"http://127.0.0.1:{port}"
        wait_until(lambda: _status(front + "/readyz") == 200, 20, message="nginx to answer")
        for _ in range(20):
            assert _status(front + "/function/hello") == 200
        assert all(count > 0 for count in served_by([a, b])), served_by([a, b])
        a.stop()
        before = served_by([b])[0]
        for _ in range(10):
            assert _status(front + "/function/hello") == 200
        assert served_by([b])[0] == before + 10


@pytest.mark.amqp
def test_the_readme_haproxy_config_sends_nothing_to_a_node_that_is_not_ready(cluster: Cluster, tmp_path):
    haproxy = need("haproxy")
    write_function(cluster.functions, "hello.py", HELLO)
    a = cluster.start("a")
    # Its broker does not answer: it serves, but /readyz says it is not ready.
    lonely = cluster.start("lonely", wait=False, url=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    wait_until(lambda: _answers(lonely), 20, message="the lonely node to listen")
    assert lonely.get("/readyz").status == 503
    port = free_port()
    config = with_nodes(readme_block("haproxy"), r"10\.0\.0\.\d+:8080", [a, lonely])
    config = config.replace("bind :80", f"bind 127.0.0.1:{port}")
    stats = tmp_path / "haproxy.sock"
    (tmp_path / "haproxy.cfg").write_text(f"global\n    stats socket {stats} level admin\n\n{config}")
    check = subprocess.run([haproxy, "-c", "-f", str(tmp_path / "haproxy.cfg")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    with running([haproxy, "-db", "-f", str(tmp_path / "haproxy.cfg")], tmp_path / "haproxy.log"):
        wait_until(lambda: _server_states(stats) == {"web1": "UP", "web2": "DOWN"}, 20, interval=0.2,
                   message="haproxy to mark the node that is not ready DOWN")
        front = f"http://127.0.0.1:{port}"
        for _ in range(20):
            assert _status(front + "/function/hello") == 200
        assert served_by([a, lonely]) == [20, 0]


def _status(url: str) -> int:
    try:
        return http("GET", url, timeout=10).status
    except OSError:
        return 0


def _server_states(path: Path) -> dict[str, str]:
    """web1/web2 -> UP/DOWN, from haproxy's stats socket."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return {}
    states = {}
    for line in data.decode().splitlines():
        fields = line.split(",")
        if len(fields) > 17 and fields[0] == "faasd" and fields[1].startswith("web"):
            states[fields[1]] = fields[17].split()[0]
    return states


def test_cluster_mode_without_a_broker_address_is_refused_at_load(tmp_path):
    config = tmp_path / "faasd.toml"
    config.write_text('[cluster]\nmode = "amqp"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAASD_")}
    check = subprocess.run([sys.executable, "-m", "faasd", "--config", str(config), "check"],
                           capture_output=True, text=True, timeout=30, cwd=tmp_path, env=env)
    assert check.returncode == 1
    assert f'{config}: [cluster] mode = "amqp" needs the broker\'s address' in check.stdout
    config.write_text('[cluster]\nmode = "amqp"\nname = "no spaces allowed"\n[amqp]\nurl = "amqp://x"\n')
    check = subprocess.run([sys.executable, "-m", "faasd", "--config", str(config), "check"],
                           capture_output=True, text=True, timeout=30, cwd=tmp_path, env=env)
    assert check.returncode == 1 and "cluster.name" in check.stdout, check.stdout
