"""Asynchronous invocations end to end: durable queueing, retries, destinations, kill -9."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing, contextmanager
from typing import Iterator

import pytest

from probe import PROBE_HANDLER, Probe
from support import ROOT, fill, http, small_disk, wait_until, write_function


@pytest.fixture
def probe() -> Iterator[Probe]:
    probe = Probe()
    yield probe
    probe.close()


def probed(daemon, probe: Probe, name: str, toml: str = "") -> None:
    """A function that reports to `probe`; `toml` adds to its config."""
    # The settings first: a lone NAME.toml is no function, so the code never runs without them.
    write_function(daemon.functions, f"{name}.toml",
                   f'timeout_s = 60\n{toml}\n[env]\nPROBE = "{probe.url}"\n')
    write_function(daemon.functions, f"{name}.py", PROBE_HANDLER)
    wait_until(lambda: daemon.get(f"/system/functions/{name}").status == 200,
               message=f"{name} to load")


def event(daemon, name: str, payload: dict) -> str:
    response = daemon.invoke(name, payload, **{"X-Amz-Invocation-Type": "Event"})
    assert response.status == 202, response.text
    assert response.body == b""
    return response.headers["x-amzn-requestid"]


def queue_view(daemon, name: str) -> dict:
    return daemon.function(name)["queue"]


def dead_letter(daemon, name: str, request_id: str) -> dict:
    path = daemon.data / "dead-letter" / name / f"{request_id}.json"
    wait_until(path.exists, 30, message=f"dead-letter record {path}")
    return json.loads(path.read_text())


ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_a_202_means_the_event_is_in_the_queue_file(daemon, probe):
    probed(daemon, probe, "held", "concurrency = 1")
    event(daemon, "held", {"id": "first", "gate": "g"})
    probe.wait_for(1, "start", id="first")
    request_id = event(daemon, "held", {"id": "second"})
    # Read the daemon's own file with a second connection, as a crash would leave it.
    with closing(sqlite3.connect(daemon.data / "queue.db")) as db:
        rows = db.execute("SELECT function, request_id, payload, source FROM events").fetchall()
    assert ("held", request_id, b'{"id": "second"}', "api") in [tuple(r) for r in rows]
    view = queue_view(daemon, "held")
    assert view["depth"] == 2 and view["running"] == 1
    assert view["oldest_age_s"] > 0
    probe.release("g")
    probe.wait_for(1, "end", id="second")
    wait_until(lambda: queue_view(daemon, "held")["depth"] == 0, message="the queue to empty")
    assert queue_view(daemon, "held")["oldest_age_s"] == 0
    assert queue_view(daemon, "held")["succeeded"] == 2


def test_failures_are_retried_with_one_request_id_then_dead_lettered(daemon, probe):
    probed(daemon, probe, "doomed", "[async]\nretry_delays_s = [1, 1]")
    request_id = event(daemon, "doomed", {"id": "d1", "fail": True})
    record = dead_letter(daemon, "doomed", request_id)
    starts = probe.seen("start", id="d1")
    assert [s["rid"] for s in starts] == [request_id] * 3  # max_retries = 2 by default
    gaps = [later["at"] - earlier["at"] for earlier, later in zip(starts, starts[1:])]
    assert all(gap >= 0.9 for gap in gaps), gaps  # retry_delays_s are waited

    assert record["version"] == "1.0"
    assert ISO.fullmatch(record["timestamp"])
    assert record["requestContext"] == {
        "requestId": request_id,
        "functionArn": "arn:aws:lambda:us-east-1:000000000000:function:doomed:$LATEST",
        "condition": "RetriesExhausted",
        "approximateInvokeCount": 3,
    }
    assert record["requestPayload"] == {"id": "d1", "fail": True}
    assert record["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST",
                                         "functionError": "Unhandled"}
    assert record["responsePayload"]["errorType"] == "RuntimeError"
    assert record["responsePayload"]["errorMessage"] == "failing on purpose: d1"
    assert record["responsePayload"]["stackTrace"]
    assert record["faasd"]["source"] == "api" and record["faasd"]["attempts"] == 3
    assert ISO.fullmatch(record["faasd"]["enqueuedAt"])
    # The record is written inside the transaction; the figures follow its commit.
    wait_until(lambda: queue_view(daemon, "doomed")["dead_lettered"] == 1, message="the figures")
    view = queue_view(daemon, "doomed")
    assert (view["depth"], view["retried"], view["dead_lettered"]) == (0, 2, 1)


def test_max_retries_zero_dead_letters_after_one_attempt(daemon, probe):
    probed(daemon, probe, "once", "[async]\nmax_retries = 0")
    request_id = event(daemon, "once", {"id": "o1", "fail": True})
    record = dead_letter(daemon, "once", request_id)
    assert record["requestContext"]["approximateInvokeCount"] == 1
    assert len(probe.seen("start", id="o1")) == 1


def test_a_retry_that_succeeds_is_not_dead_lettered(daemon, probe):
    write_function(daemon.functions, "flaky.py", """
        import os
        ATTEMPTS = []
        def handler(event, context):
            ATTEMPTS.append(context.aws_request_id)
            if len(ATTEMPTS) < 2:
                raise RuntimeError("first attempt fails")
            return {"attempts": len(ATTEMPTS)}
    """)
    write_function(daemon.functions, "flaky.toml",
                   'min_warm = 1\nconcurrency = 1\n[async]\nretry_delays_s = [0, 0]\n')
    # Module state lives in one worker: let the prewarmed one be the only one.
    wait_until(lambda: [w["state"] for w in daemon.workers("flaky")] in (["idle"], ["frozen"]),
               message="the prewarmed worker")
    event(daemon, "flaky", {})
    wait_until(lambda: queue_view(daemon, "flaky")["succeeded"] == 1, 30, message="a success")
    view = queue_view(daemon, "flaky")
    assert (view["retried"], view["dead_lettered"]) == (1, 0)
    assert not (daemon.data / "dead-letter" / "flaky").exists()


def test_destination_functions_receive_lambda_destination_records(daemon, probe):
    probed(daemon, probe, "sink")
    probed(daemon, probe, "worker", '[async]\nmax_retries = 1\nretry_delays_s = [0]\n'
                                    'on_success = "function:sink"\non_failure = "function:sink"')
    ok_id = event(daemon, "worker", {"id": "good"})
    bad_id = event(daemon, "worker", {"id": "bad", "fail": True})
    records = {n["event"]["requestContext"]["requestId"]: n
               for n in probe.wait_for(2, "start", fn="sink")}

    success = records[ok_id]["event"]
    assert success["version"] == "1.0" and ISO.fullmatch(success["timestamp"])
    assert success["requestContext"] == {
        "requestId": ok_id,
        "functionArn": "arn:aws:lambda:us-east-1:000000000000:function:worker:$LATEST",
        "condition": "Success", "approximateInvokeCount": 1}
    assert success["requestPayload"] == {"id": "good"}
    assert success["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST"}
    assert success["responsePayload"] == {"id": "good", "rid": ok_id}

    failure = records[bad_id]["event"]
    assert failure["requestContext"]["condition"] == "RetriesExhausted"
    assert failure["requestContext"]["approximateInvokeCount"] == 2
    assert failure["requestPayload"] == {"id": "bad", "fail": True}
    assert failure["responseContext"]["functionError"] == "Unhandled"
    assert failure["responsePayload"]["errorMessage"] == "failing on purpose: bad"
    # The sink's own invocations have request ids of their own.
    assert {records[ok_id]["rid"], records[bad_id]["rid"]}.isdisjoint({ok_id, bad_id})
    assert not (daemon.data / "dead-letter" / "worker").exists()
    wait_until(lambda: queue_view(daemon, "sink")["succeeded"] == 2, message="sink to finish")


def test_async_calls_wait_for_capacity_instead_of_429(daemon, probe):
    probed(daemon, probe, "narrow", "concurrency = 1")
    results: list = []
    sync = threading.Thread(target=lambda: results.append(
        daemon.invoke("narrow", {"id": "sync", "gate": "g"})))
    sync.start()
    try:
        probe.wait_for(1, "start", id="sync")
        assert daemon.invoke("narrow", {"id": "refused"}).status == 429
        ids = [event(daemon, "narrow", {"id": f"a{i}"}) for i in range(3)]
        time.sleep(0.5)
        assert not probe.seen("start", id="a0")  # waiting, not refused and not running
        assert queue_view(daemon, "narrow")["depth"] == 3
    finally:
        probe.release("g")
        sync.join(60)
    assert results[0].status == 200
    ends = [probe.wait_for(1, "end", id=f"a{i}")[0] for i in range(3)]
    assert [e["rid"] for e in ends] == ids
    assert queue_view(daemon, "narrow")["dead_lettered"] == 0


def test_faasd_invoke_async_queues_and_prints_the_request_id(daemon, probe):
    probed(daemon, probe, "cli")
    result = subprocess.run(
        [sys.executable, "-m", "faasd", "invoke", "cli", "--async", "--data", '{"id": "c1"}',
         "--url", daemon.url], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r"queued: request id (\S+)\n", result.stdout)
    assert match, result.stdout
    [end] = probe.wait_for(1, "end", id="c1")
    assert end["rid"] == match.group(1)


def test_kill_9_loses_no_event_and_reruns_the_ones_in_flight(start_daemon, functions_dir, probe):
    daemon = start_daemon(functions_dir)
    probed(daemon, probe, "durable", "concurrency = 2")
    ids = {f"k{i}": event(daemon, "durable", {"id": f"k{i}", "gate": "g"}) for i in range(6)}
    probe.wait_for(2, "start", fn="durable")
    # Events answered 202 an instant before the kill count too.
    ids.update({f"late{i}": event(daemon, "durable", {"id": f"late{i}"}) for i in range(3)})
    daemon.kill9()
    time.sleep(0.5)  # the kernel kills the workers with their daemon (PDEATHSIG)
    in_flight = {s["id"] for s in probe.seen("start")}
    assert len(in_flight) >= 2 and not probe.seen("end")

    probe.release("g")
    restarted = start_daemon(functions_dir, data=daemon.data)
    for key in ids:
        probe.wait_for(1, "end", id=key, timeout=60)
    for key in in_flight:
        again = probe.seen("start", id=key)
        assert len(again) >= 2, f"{key} was running at the kill and must run again"
        assert {s["rid"] for s in again} == {ids[key]}  # the same request id across the restart
    assert {e["id"]: e["rid"] for e in probe.seen("end")} == ids
    wait_until(lambda: queue_view(restarted, "durable")["depth"] == 0, message="the queue to empty")
    assert "run again" in restarted.output()


def test_sigterm_keeps_waiting_events_for_the_next_start(start_daemon, functions_dir, probe, tmp_path):
    config = tmp_path / "faasd.toml"
    config.write_text("[workers]\ndrain_timeout_s = 1\n")
    daemon = start_daemon(functions_dir, config=config)
    probed(daemon, probe, "patient", "concurrency = 1")
    ids = {f"s{i}": event(daemon, "patient", {"id": f"s{i}", "gate": "g"}) for i in range(3)}
    probe.wait_for(1, "start", fn="patient")
    assert daemon.stop(signal.SIGTERM) == 0
    # The one running outlived the 1 s drain: all three wait, and the log says so.
    assert "asynchronous queue: 3 events wait in " in daemon.output(), daemon.output()[-2000:]
    probe.release("g")
    restarted = start_daemon(functions_dir, config=config, data=daemon.data)
    for key, request_id in ids.items():
        assert probe.wait_for(1, "end", id=key, timeout=60)[0]["rid"] == request_id
    wait_until(lambda: queue_view(restarted, "patient")["depth"] == 0)


def test_nothing_new_starts_while_sigterm_waits_for_http_calls(start_daemon, functions_dir, probe, tmp_path):
    # SIGTERM first waits for HTTP calls in flight. A queued event that
    # would have started meanwhile (its slot came free) must wait for the
    # next start instead: started then, it could outlast the drain.
    config = tmp_path / "faasd.toml"
    config.write_text("[workers]\ndrain_timeout_s = 5\n")
    daemon = start_daemon(functions_dir, config=config)
    probed(daemon, probe, "patient", "concurrency = 1")
    write_function(daemon.functions, "slow.toml", "timeout_s = 10\n")
    write_function(daemon.functions, "slow.py", "import time\ndef handler(e, c):\n    time.sleep(2)\n    return 'done'\n")
    wait_until(lambda: daemon.get("/system/functions/slow").status == 200, message="slow to load")
    first = event(daemon, "patient", {"id": "first", "gate": "g"})
    probe.wait_for(1, "start", id="first")
    second = event(daemon, "patient", {"id": "second", "gate": "h"})  # waits for the one slot
    result = {}
    call = threading.Thread(target=lambda: result.update(response=daemon.get("/function/slow")))
    call.start()
    wait_until(lambda: daemon.function("slow")["inflight"] == 1, message="the HTTP call in flight")
    daemon.process.send_signal(signal.SIGTERM)
    wait_until(lambda: "shutting down" in daemon.output(), message="the shutdown to begin")
    probe.release("g")  # the first event ends while the HTTP call still runs: its slot is free
    assert probe.wait_for(1, "end", id="first")[0]["rid"] == first
    call.join(20)
    assert result["response"].status == 200 and result["response"].json() == "done"
    assert daemon.stop() == 0
    assert not probe.seen("start", id="second")
    probe.release("h")
    restarted = start_daemon(functions_dir, config=config, data=daemon.data)
    assert probe.wait_for(1, "end", id="second", timeout=60)[0]["rid"] == second
    wait_until(lambda: queue_view(restarted, "patient")["depth"] == 0)


def test_an_event_older_than_max_event_age_is_dead_lettered_unrun(start_daemon, functions_dir, probe):
    daemon = start_daemon(functions_dir)
    probed(daemon, probe, "stale", "concurrency = 1\n[async]\nmax_event_age_s = 60")
    event(daemon, "stale", {"id": "blocker", "gate": "g"})
    probe.wait_for(1, "start", id="blocker")
    request_id = event(daemon, "stale", {"id": "old"})
    daemon.kill9()
    with closing(sqlite3.connect(daemon.data / "queue.db")) as db:  # both queued an hour ago
        with db:
            db.execute("UPDATE events SET enqueued_at = enqueued_at - 3600")
    probe.release("g")
    restarted = start_daemon(functions_dir, data=daemon.data)
    record = dead_letter(restarted, "stale", request_id)
    assert record["requestContext"]["condition"] == "EventAgeExceeded"
    assert record["requestContext"]["approximateInvokeCount"] == 0
    assert "responseContext" not in record
    wait_until(lambda: queue_view(restarted, "stale")["dead_lettered"] == 2)
    assert not probe.seen("start", id="old")
    assert len(probe.seen("start", id="blocker")) == 1


def test_two_daemons_never_share_one_queue(start_daemon, functions_dir, tmp_path):
    first = start_daemon(functions_dir)
    second = start_daemon(functions_dir, data=first.data, wait=False)
    assert second.process.wait(30) == 1
    assert "in use by another faasd" in second.output()
    assert http("GET", first.url + "/readyz").status == 200


@contextmanager
def daemon_output_on_failure(daemon):
    """An assertion failing inside carries the end of the daemon's output: what it did meanwhile."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- the daemon's output, last lines:\n{daemon.output()[-6000:]}") from None


def test_readyz_fails_while_the_full_disk_refuses_events_and_recovers_without_one(
        start_daemon, functions_dir, probe, tmp_path):
    with small_disk(tmp_path / "data") as data:
        daemon = start_daemon(functions_dir, data=data)
        try:
            probed(daemon, probe, "steady")
            assert daemon.get("/readyz").status == 200
            filler = data / "filler"
            fill(filler)
            refused = daemon.invoke("steady", {"id": "refused"}, **{"X-Amz-Invocation-Type": "Event"})
            assert refused.status == 500, refused.text
            ready = daemon.get("/readyz")
            check = ready.json()["checks"]["async_queue"]
            assert ready.status == 503 and not check["ok"], check
            assert "cannot write" in check["detail"] and "full" in check["detail"], check
            time.sleep(1.5)  # a write tried after 1 s fails too
            assert daemon.get("/readyz").status == 503
            filler.unlink()
            # No event is put: the queue's own tries find the room.
            wait_until(lambda: daemon.get("/readyz").status == 200, timeout=10,
                       message="/readyz to recover")
            event(daemon, "steady", {"id": "after"})
            with daemon_output_on_failure(daemon):
                probe.wait_for(1, "end", id="after")
            wait_until(lambda: queue_view(daemon, "steady")["depth"] == 0, message="the event's outcome")
            assert daemon.output().count("a transaction on") == 1
        finally:
            daemon.stop()


def test_an_outcome_the_full_disk_refuses_is_written_once_there_is_room_again(
        start_daemon, functions_dir, probe, tmp_path):
    with small_disk(tmp_path / "data") as data:
        daemon = start_daemon(functions_dir, data=data)
        try:
            probed(daemon, probe, "steady", "concurrency = 1")
            first = event(daemon, "steady", {"id": "first", "gate": "g"})
            probe.wait_for(1, "start", id="first")
            filler = data / "filler"
            fill(filler)
            probe.release("g")
            with daemon_output_on_failure(daemon):
                probe.wait_for(1, "end", id="first")
            wait_until(lambda: daemon.get("/readyz").status == 503, message="/readyz to fail")
            check = daemon.get("/readyz").json()["checks"]["async_queue"]
            assert not check["ok"] and "not yet written" in check["detail"], check
            time.sleep(3.5)  # tried again after 1 s and 2 s
            assert queue_view(daemon, "steady")["running"] == 1
            filler.unlink()
            wait_until(lambda: queue_view(daemon, "steady")["succeeded"] == 1, timeout=10,
                       message="the first event's outcome to be written")
            assert daemon.get("/readyz").status == 200
            second = event(daemon, "steady", {"id": "second"})
            probe.wait_for(1, "end", id="second")
            wait_until(lambda: queue_view(daemon, "steady")["succeeded"] == 2, message="the second event")
            assert queue_view(daemon, "steady")["depth"] == 0
            assert [note["rid"] for note in probe.seen("start")] == [first, second]
            output = daemon.output()
            assert output.count("cannot write the outcome") == 1 and output.count("a transaction on") == 1
        finally:
            daemon.stop()


def test_a_daemon_started_on_a_full_disk_serves_calls_and_runs_its_queue_once_there_is_room(
        start_daemon, functions_dir, probe, tmp_path):
    with small_disk(tmp_path / "data") as data:
        daemon = start_daemon(functions_dir, data=data)
        try:
            probed(daemon, probe, "steady", 'concurrency = 1\n[[triggers]]\ntype = "http"\n'
                                            'path = "/steady"\nmethods = ["POST"]')
            event(daemon, "steady", {"id": "first", "gate": "g"})
            probe.wait_for(1, "start", id="first")
            waiting = event(daemon, "steady", {"id": "waiting"})
            daemon.process.send_signal(signal.SIGTERM)
            wait_until(lambda: "shutting down" in daemon.output(), message="the stop to begin")
            probe.release("g")  # the running event ends in the drain; the waiting one stays queued
            assert daemon.stop() == 0
            filler = data / "filler"
            fill(filler)
            daemon.start(wait=False)
            wait_until(daemon.serving, timeout=20, message="the daemon to serve")
            with daemon_output_on_failure(daemon):
                # What needs no disk serves: the Invoke API and HTTP triggers.
                called = daemon.invoke("steady", {"id": "sync"})
                assert called.status == 200 and called.json()["id"] == "sync", called.text
                routed = daemon.post("/steady", {"id": "routed"})
                assert routed.status == 200, routed.text
                # What needs the queue is refused, naming why.
                refused = daemon.invoke("steady", {"id": "refused"}, **{"X-Amz-Invocation-Type": "Event"})
                assert refused.status == 500, refused.text
                assert "queue.db" in refused.json()["message"], refused.text
                ready = daemon.get("/readyz")
                check = ready.json()["checks"]["async_queue"]
                assert ready.status == 503 and not check["ok"], check
                assert "cannot open" in check["detail"] and "queue.db" in check["detail"], check
                time.sleep(1.5)  # opening is tried again after 1 s, and fails again
                assert queue_view(daemon, "steady")["depth"] == 0  # not known yet
                filler.unlink()
                # The event queued before the restart runs; nothing is lost.
                probe.wait_for(1, "end", id="waiting", timeout=20)
                wait_until(lambda: daemon.get("/readyz").status == 200, message="/readyz to recover")
                after = event(daemon, "steady", {"id": "after"})
                probe.wait_for(1, "end", id="after")
                wait_until(lambda: queue_view(daemon, "steady")["depth"] == 0, message="the queue to empty")
            assert [n["rid"] for n in probe.seen("end") if n["id"] in ("waiting", "after")] == [waiting, after]
            assert not probe.seen("start", id="refused")
            output = daemon.output()
            assert "cannot start" not in output
            assert output.count("asynchronous queue: cannot open") == 1, output
            assert output.count("queue.db is open now") == 1, output
        finally:
            daemon.stop()
