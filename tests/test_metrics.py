"""`GET /metrics` against a real daemon: every figure is driven by real invocations."""

from __future__ import annotations

import threading
import time

from support import free_port, http, metric, scrape, value, wait_until, write_function

WORK = """
import os, time

def handler(event, context):
    gate = event.get("gate") if isinstance(event, dict) else None
    if gate is None and isinstance(event, dict) and "rawPath" in event:
        gate = (event.get("queryStringParameters") or {}).get("gate")
    deadline = time.time() + 30
    while gate and not os.path.exists(gate) and time.time() < deadline:
        time.sleep(0.01)
    if event.get("fail"):
        raise RuntimeError("asked to fail")
    if event.get("sleep"):
        time.sleep(event["sleep"])
    return "done"
"""


def test_invocations_durations_and_cold_starts_by_function_trigger_and_outcome(daemon):
    write_function(daemon.functions, "work.toml", "timeout_s = 1\n")
    write_function(daemon.functions, "work.py", WORK)
    wait_until(lambda: daemon.get("/system/functions/work").status == 200)

    assert daemon.get("/function/work").status == 200                     # http, success, cold
    assert daemon.invoke("work", {"fail": True}).headers.get("x-amz-function-error") == "Unhandled"
    assert daemon.invoke("work", {"sleep": 5}).status == 200               # api, timeout (killed)
    assert daemon.invoke("work", {}).status == 200                         # api, success, cold again
    assert daemon.get("/function/no-such-function").status == 404          # never ran: not counted

    samples = scrape(daemon)
    assert value(samples, "faasd_invocations_total", function="work", trigger="http", outcome="success") == 1
    assert value(samples, "faasd_invocations_total", function="work", trigger="api", outcome="error") == 1
    assert value(samples, "faasd_invocations_total", function="work", trigger="api", outcome="timeout") == 1
    assert value(samples, "faasd_invocations_total", function="work", trigger="api", outcome="success") == 1
    assert not any(name == "faasd_invocations_total" and dict(labels)["function"] == "no-such-function"
                   for name, labels in samples)
    assert value(samples, "faasd_invocation_duration_seconds_count", function="work") == 4
    # The timed-out call ran for its full second.
    assert value(samples, "faasd_invocation_duration_seconds_sum", function="work") >= 1.0
    assert value(samples, "faasd_invocation_duration_seconds_bucket", function="work", le="0.5") <= 3
    assert value(samples, "faasd_cold_starts_total", function="work") == 2
    assert value(samples, "faasd_init_duration_seconds_count", function="work") == 2
    assert value(samples, "faasd_init_duration_seconds_sum", function="work") > 0
    assert value(samples, "faasd_functions", state="ok") == 1
    assert value(samples, "faasd_ready") == 1
    assert value(samples, "process_resident_memory_bytes") > 0


def gate_file(daemon):
    """A file the handler waits for; in functions/, the one directory workers share with us."""
    return daemon.functions / f".gate-{time.monotonic_ns()}"


def test_throttles_concurrency_and_worker_states(daemon):
    write_function(daemon.functions, "held.toml", "concurrency = 1\ntimeout_s = 60\n")
    write_function(daemon.functions, "held.py", WORK)
    wait_until(lambda: daemon.get("/system/functions/held").status == 200)
    gate = gate_file(daemon)
    statuses: list[int] = []
    first = threading.Thread(target=lambda: statuses.append(
        daemon.get(f"/function/held?gate={gate}", timeout=60).status))
    first.start()
    try:
        wait_until(lambda: metric(daemon, "faasd_workers", function="held", state="busy") == 1,
                   message="a busy worker")
        samples = scrape(daemon)
        assert value(samples, "faasd_concurrent_executions") == 1
        assert value(samples, "faasd_function_concurrent_executions", function="held") == 1

        assert daemon.get("/function/held").status == 429
        assert daemon.invoke("held", {}).status == 429
        samples = scrape(daemon)
        reason = "ReservedFunctionConcurrentInvocationLimitExceeded"
        assert value(samples, "faasd_throttles_total", function="held", trigger="http", reason=reason) == 1
        assert value(samples, "faasd_throttles_total", function="held", trigger="api", reason=reason) == 1
    finally:
        gate.touch()
        first.join(60)
    assert statuses == [200]
    wait_until(lambda: metric(daemon, "faasd_workers", function="held", state="frozen") == 1,
               message="the worker to freeze once idle")
    samples = scrape(daemon)
    assert value(samples, "faasd_workers", function="held", state="busy") == 0
    assert value(samples, "faasd_concurrent_executions") == 0


def test_async_queue_depth_oldest_age_and_dead_letters(daemon):
    write_function(daemon.functions, "held.toml", "concurrency = 1\ntimeout_s = 60\n")
    write_function(daemon.functions, "held.py", WORK)
    write_function(daemon.functions, "doomed.toml", "[async]\nmax_retries = 0\n")
    write_function(daemon.functions, "doomed.py", WORK)
    wait_until(lambda: daemon.get("/system/functions/doomed").status == 200)
    gate = gate_file(daemon)
    try:
        for _ in range(3):
            response = daemon.invoke("held", {"gate": str(gate)}, **{"X-Amz-Invocation-Type": "Event"})
            assert response.status == 202
        wait_until(lambda: metric(daemon, "faasd_async_queue_running", function="held") == 1,
                   message="one event running, the others waiting for the function's one slot")
        time.sleep(1.2)
        samples = scrape(daemon)
        assert value(samples, "faasd_async_queue_depth", function="held") >= 2
        assert value(samples, "faasd_async_queue_oldest_age_seconds", function="held") >= 1.0
    finally:
        gate.touch()
    wait_until(lambda: metric(daemon, "faasd_async_queue_depth", function="held") == 0, 30,
               message="the queue to drain")
    assert metric(daemon, "faasd_invocations_total", function="held", trigger="api", outcome="success") == 3

    assert daemon.invoke("doomed", {"fail": True}, **{"X-Amz-Invocation-Type": "Event"}).status == 202
    wait_until(lambda: metric(daemon, "faasd_dead_letters_total", function="doomed") == 1, 30,
               message="the failed event to be dead-lettered")
    assert metric(daemon, "faasd_dead_letters_total", function="held") == 0


def test_amqp_connection_state(start_daemon, functions_dir, amqp_url):
    # faasd connects to the broker for the AMQP triggers it has.
    write_function(functions_dir, "consumer.py", WORK)
    write_function(functions_dir, "consumer.toml", """
        [[triggers]]
        type = "amqp"
        exchange = "faasd-test-metrics"
        routing_key = "metrics.#"
    """)
    up = start_daemon(functions_dir, env={"FAASD_AMQP_URL": amqp_url})
    wait_until(lambda: metric(up, "faasd_amqp_connected") == 1, 30, message="AMQP connected = 1")
    assert metric(up, "faasd_readiness_check", check="amqp") == 1
    # A broker that is not there: the daemon serves (not ready), and says why.
    down = start_daemon(functions_dir, env={"FAASD_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/"},
                        data=functions_dir.parent / "data2", wait=False)
    wait_until(lambda: _answers(down) and metric(down, "faasd_amqp_connected") == 0, 30,
               message="AMQP connected = 0")
    samples = scrape(down)
    assert value(samples, "faasd_readiness_check", check="amqp") == 0
    assert value(samples, "faasd_ready") == 0
    # Without [amqp] url there is no series at all, rather than a misleading 0.
    assert metric(start_daemon(functions_dir, data=functions_dir.parent / "data3"),
                  "faasd_amqp_connected") is None


def _answers(daemon) -> bool:
    try:
        return daemon.get("/healthz", timeout=2).status == 200
    except OSError:
        return False


def test_a_removed_function_takes_its_series_with_it(daemon):
    write_function(daemon.functions, "gone.py", WORK)
    wait_until(lambda: daemon.get("/function/gone").status == 200)
    assert metric(daemon, "faasd_invocations_total", function="gone", trigger="http", outcome="success") == 1
    (daemon.functions / "gone.py").unlink()
    wait_until(lambda: daemon.get("/system/functions/gone").status == 404)
    text = daemon.get("/metrics").text
    assert 'function="gone"' not in text


def test_openmetrics_on_request(daemon):
    response = http("GET", daemon.url + "/metrics",
                    headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    assert "# TYPE faasd_invocations counter" in response.text


def test_histogram_counts_a_value_on_a_bound_in_that_bound_and_is_cumulative():
    from faasd.metrics import Histogram

    histogram = Histogram((0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.002, 0.01, 5.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [("0.001", 2), ("0.01", 4), ("+Inf", 5)]
    assert histogram.sum == 0.0005 + 0.001 + 0.002 + 0.01 + 5.0
