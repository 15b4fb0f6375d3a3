"""Workers forked from a per-revision template: real daemon, real forks, real /proc."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from faasd.pool import CPU_BOUND_STARTS
from support import (
    concurrent, descendants, loaded, own_groups, parent_of, process_state, wait_until,
    write_function,
)

STATE = """
import os, time
IMPORTED_AT = time.time()          # runs once, in the template
def handler(event, context):
    time.sleep(event.get("sleep", 0))
    if event.get("write"):
        open(os.path.join("/tmp", event["write"]), "w").write("x")
    if event.get("crash"):
        os.kill(os.getpid(), 11)
    return {"pid": os.getpid(), "imported_at": IMPORTED_AT, "tmp": sorted(os.listdir("/tmp")),
            "tmpdir": os.environ["TMPDIR"], "stream": context.log_stream_name}
"""


def template_of(daemon, name: str) -> dict | None:
    return daemon.function(name)["template"]


def ready_template(daemon, name: str) -> dict:
    """The function's template, once it has imported the handler."""
    return wait_until(lambda: (template_of(daemon, name) or {}).get("init_ms") and template_of(daemon, name),
                      message="the template to be ready")


def test_new_workers_are_forked_from_the_template_that_imported_the_handler(daemon):
    write_function(daemon.functions, "fn.toml", "timeout_s = 10\n")
    write_function(daemon.functions, "fn.py", STATE)
    loaded(daemon, "fn")
    first = daemon.invoke("fn").json()
    template = ready_template(daemon, "fn")
    # Each call outlasts a fork, even a slow one: a freed worker would serve a second call.
    results = concurrent(daemon, "fn", [{"sleep": 2}] * 3)
    forked = [r for r in results if r["pid"] != first["pid"]]
    assert len(forked) >= 2
    for result in forked:
        assert parent_of(result["pid"]) == template["pid"]
        assert result["stream"] != first["stream"]
        assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/\[\$LATEST\][0-9a-f]{32}", result["stream"])
    assert len({r["pid"] for r in forked}) == len(forked)
    # Module-level code ran once, in the template: every fork shares its result,
    # which is not the spawned first worker's.
    assert len({r["imported_at"] for r in forked}) == 1
    assert forked[0]["imported_at"] != first["imported_at"]
    workers = {w["pid"]: w for w in daemon.workers("fn")}
    assert all(workers[r["pid"]]["init_ms"] < 1000 for r in forked)
    assert daemon.get("/system/info").json()["isolation"]["worker_templates"]["active"] is True


LOUD_IMPORT = """
import os, time
print("imported in", os.getpid())
def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return {"pid": os.getpid(), "request_id": context.aws_request_id}
"""


def test_what_the_templates_import_printed_is_logged_once_by_its_first_forked_worker(daemon):
    write_function(daemon.functions, "fn.toml", "timeout_s = 10\n")
    write_function(daemon.functions, "fn.py", LOUD_IMPORT)
    loaded(daemon, "fn")
    first = daemon.invoke("fn").json()
    template = ready_template(daemon, "fn")
    imported = f"imported in {template['pid']}"
    tails: dict[str, list[str]] = {}

    def call() -> None:
        response = daemon.invoke("fn", {"sleep": 2}, **{"X-Amz-Log-Type": "Tail"})
        tails[response.json()["request_id"]] = base64.b64decode(
            response.headers["x-amz-log-result"]).decode().splitlines()

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    forked = [request_id for request_id, tail in tails.items()  # the cold starts
              if any(line.startswith("REPORT") and "Init Duration" in line for line in tail)]
    assert len(forked) >= 2, tails
    # The template imported the handler once, for every worker forked from it:
    # what that printed is told once, before the first forked worker's call.
    told = [request_id for request_id in forked if imported in tails[request_id]]
    assert len(told) == 1, tails
    tail = tails[told[0]]
    assert tail.index(imported) < tail.index(f"START RequestId: {told[0]} Version: $LATEST")
    log = [line.split("\t", 2)[2] for line in daemon.log_of("fn").splitlines()]
    assert log.count(imported) == 1 and log.count(f"imported in {first['pid']}") == 1, log
    assert daemon.output().count(imported) == 1


READS_ITS_FILES = """
import os, subprocess, sys, time
def handler(event, context):
    time.sleep(event.get("sleep", 0))
    data = open(os.path.join(os.environ["LAMBDA_TASK_ROOT"], "data.txt")).read()
    child = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True)
    return {"pid": os.getpid(), "data": data, "child": child.stdout.strip() or child.stderr[-300:]}
"""


def test_a_forked_worker_reaches_what_its_template_reaches_under_the_hosts_tmp(daemon):
    # This suite's functions (and a checkout's Python, in some CI clones) live
    # under the host's /tmp, which every worker covers with a /tmp of its own:
    # a fork must keep its code's files and its interpreter reachable there too.
    assert str(daemon.functions).startswith("/tmp/"), daemon.functions
    write_function(daemon.functions, "reader/function.toml", "timeout_s = 20\n")
    write_function(daemon.functions, "reader/handler.py", READS_ITS_FILES)
    write_function(daemon.functions, "reader/data.txt", "the function's own file")
    loaded(daemon, "reader")
    first = daemon.invoke("reader").json()
    template = ready_template(daemon, "reader")
    results = concurrent(daemon, "reader", [{"sleep": 2}] * 3)
    for result in results:
        assert result.get("data") == "the function's own file" and result["child"] == "42", result
    forked = [r for r in results if r["pid"] != first["pid"]]
    assert forked and all(parent_of(r["pid"]) == template["pid"] for r in forked), results


def test_each_forked_worker_has_its_own_tmp(daemon):
    write_function(daemon.functions, "fn.toml", "timeout_s = 10\n")
    write_function(daemon.functions, "fn.py", STATE)
    loaded(daemon, "fn")
    daemon.invoke("fn")
    wait_until(lambda: (template_of(daemon, "fn") or {}).get("init_ms"), message="the template")
    results = concurrent(daemon, "fn", [{"sleep": 2, "write": f"mine-{i}"} for i in range(3)])
    for index, result in enumerate(results):
        assert f"mine-{index}" in result["tmp"]
        assert not any(name.startswith("mine-") and name != f"mine-{index}" for name in result["tmp"])
        assert result["tmpdir"] == "/tmp"


THREADS = """
import os, threading, time

def handler(event, context):
    time.sleep(event.get("sleep", 0))
    release = threading.Event()
    threads = []
    failure = None
    try:
        while len(threads) < event.get("threads", 0):
            thread = threading.Thread(target=release.wait, args=(event.get("hold_s", 0),))
            thread.start()
            threads.append(thread)
    except RuntimeError as exc:  # "can't start new thread": the pids limit
        failure = str(exc)
    print(f"holding {len(threads)} threads", flush=True)
    time.sleep(event.get("hold_s", 0))
    release.set()
    for thread in threads:
        thread.join()
    return {"pid": os.getpid(), "threads": len(threads), "failure": failure}
"""


def test_each_forked_worker_has_a_pids_limit_of_its_own(daemon):
    # Every thread and process counts against a pids limit of 1024
    # (MAX_PROCESSES_PER_WORKER). Forks start in their template's cgroups:
    # shared, a sibling holding 600 threads would leave this one about 420.
    if not daemon.get("/system/info").json()["isolation"]["pids_limit"]["active"]:
        message = "this host gives faasd no pids cgroup controller"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    write_function(daemon.functions, "fn.toml", "timeout_s = 30\nmemory_mb = 512\n")
    write_function(daemon.functions, "fn.py", THREADS)
    loaded(daemon, "fn")
    spawned = daemon.invoke("fn").json()["pid"]
    template = ready_template(daemon, "fn")
    results: dict[str, dict] = {}

    def call(key: str, event: dict) -> None:
        results[key] = daemon.invoke("fn", event).json()

    # The spawned worker is kept busy, so both calls below get forked workers.
    busy = threading.Thread(target=call, args=("busy", {"sleep": 8}))
    busy.start()
    wait_until(lambda: any(w["state"] == "busy" and w["pid"] == spawned for w in daemon.workers("fn")),
               message="the spawned worker to be busy")
    holder = threading.Thread(target=call, args=("holder", {"threads": 600, "hold_s": 5}))
    holder.start()
    wait_until(lambda: "holding 600 threads" in daemon.log_of("fn"), timeout=15,
               message="a forked worker holding 600 threads")
    call("sibling", {"threads": 900, "hold_s": 0.5})
    holder.join(30)
    busy.join(30)
    assert results["holder"]["threads"] == 600, results["holder"]
    sibling = results["sibling"]
    assert sibling["failure"] is None and sibling["threads"] == 900, sibling
    for key in ("holder", "sibling"):
        assert parent_of(results[key]["pid"]) == template["pid"]
    # The template still forks: the next worker starts.
    assert daemon.invoke("fn", {"threads": 1}).json()["threads"] == 1


def test_a_code_change_builds_a_new_template_and_the_old_one_goes(daemon):
    write_function(daemon.functions, "fn.py", STATE)
    loaded(daemon, "fn")
    daemon.invoke("fn")
    old = ready_template(daemon, "fn")
    write_function(daemon.functions, "fn.py", STATE.replace("IMPORTED_AT = ", "VERSION = 2\nIMPORTED_AT = "))
    wait_until(lambda: daemon.function("fn")["revision"] != old["revision"], message="the new revision")
    daemon.invoke("fn")
    new = wait_until(lambda: (template_of(daemon, "fn") or {}).get("revision") != old["revision"]
                     and (template_of(daemon, "fn") or {}).get("init_ms") and template_of(daemon, "fn"),
                     message="the new template")
    assert new["pid"] != old["pid"]
    wait_until(lambda: process_state(old["pid"]) in (None, "Z"), timeout=15, message="the old template to stop")


def forked_groups(template_pid: int) -> set[Path]:
    """The cgroups of forked workers and spares beside a template's own (every hierarchy)."""
    return {child for group in own_groups(template_pid) for child in group.parent.iterdir()
            if "-forked-" in child.name}


def test_the_cgroups_of_unused_spares_go_with_their_template(daemon):
    old = with_a_spare(daemon)
    spares = wait_until(lambda: forked_groups(old["pid"]), message="the spare in cgroups of its own")
    write_function(daemon.functions, "fn.py", STATE.replace("IMPORTED_AT = ", "VERSION = 2\nIMPORTED_AT = "))
    wait_until(lambda: process_state(old["pid"]) in (None, "Z"), timeout=15, message="the old template to stop")
    # While the daemon runs on: nothing else would remove them.
    wait_until(lambda: not any(group.exists() for group in spares), timeout=5,
               message=f"the old spares' cgroups to go: {spares}")
    assert daemon.invoke("fn").json()["pid"] > 0


def test_a_crashing_forked_worker_reports_its_signal_and_is_replaced(daemon):
    write_function(daemon.functions, "fn.toml", "timeout_s = 10\n")
    write_function(daemon.functions, "fn.py", STATE)
    loaded(daemon, "fn")
    daemon.invoke("fn")
    wait_until(lambda: (template_of(daemon, "fn") or {}).get("init_ms"), message="the template")
    results = concurrent(daemon, "fn", [{"sleep": 0.5}, {"sleep": 0.1, "crash": True}])
    crashed = [r for r in results if "errorType" in r]
    assert crashed and crashed[0]["errorType"] == "Runtime.ExitError"
    assert "segmentation fault" in crashed[0]["errorMessage"]
    assert daemon.invoke("fn").json()["pid"] > 0


def test_when_the_template_dies_workers_are_spawned_again(daemon):
    write_function(daemon.functions, "fn.toml", "timeout_s = 10\n")
    write_function(daemon.functions, "fn.py", STATE)
    loaded(daemon, "fn")
    daemon.invoke("fn")
    template = ready_template(daemon, "fn")
    left = own_groups(template["pid"]) + [Path(template["tmp_dir"])]
    assert all(path.exists() for path in left), left
    os.kill(template["pid"], signal.SIGKILL)
    wait_until(lambda: (template_of(daemon, "fn") or {}).get("pid") != template["pid"], message="the template to go")
    results = concurrent(daemon, "fn", [{"sleep": 0.4}] * 3)
    assert all(r.get("pid") for r in results), results
    assert "died" in daemon.output()
    # What the dead template had goes too, while the daemon runs on.
    wait_until(lambda: not any(path.exists() for path in left), timeout=5,
               message=f"the dead template's cgroups and tmp dir to go: {left}")


def test_a_burst_of_forked_workers_leaves_their_template_running(daemon):
    # Each fork leaves some memory (page tables, pages it copied before it
    # joined its own group) charged to its template's cgroup while it lives:
    # forty at once are more than a 32 MB function's limit.
    write_function(daemon.functions, "fn.toml", "timeout_s = 10\nmemory_mb = 32\n")
    write_function(daemon.functions, "fn.py", STATE)
    loaded(daemon, "fn")
    daemon.invoke("fn")
    template = ready_template(daemon, "fn")
    results = concurrent(daemon, "fn", [{"sleep": 2}] * 40)
    failed = [r for r in results if not r.get("pid")]
    assert not failed, f"{len(failed)} of 40 failed, e.g. {failed[0]}"
    assert len({r["pid"] for r in results}) > 20  # the calls did overlap
    assert template_of(daemon, "fn")["pid"] == template["pid"]
    assert "died" not in daemon.output()


def spares_of(daemon, name: str, template: dict) -> set[int]:
    """The template's children that no worker owns: its spares."""
    workers = {w["pid"] for w in daemon.function(name)["workers"]}
    spares = set()
    for pid in descendants(template["pid"]) - workers:
        try:
            parent = parent_of(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended (a killed spare, reaped) between the listing and this look
        if parent == template["pid"]:
            spares.add(pid)
    return spares


def with_a_spare(daemon) -> dict:
    """Function `fn` called once, so that its template is up and holds its one spare."""
    write_function(daemon.functions, "fn.toml", "timeout_s = 10\n")
    write_function(daemon.functions, "fn.py", STATE)
    loaded(daemon, "fn")
    daemon.invoke("fn")
    return wait_until(lambda: (template_of(daemon, "fn") or {}).get("spares") == 1
                      and template_of(daemon, "fn"), message="the template and its spare")


def test_spares_and_forked_workers_are_in_cgroups_of_their_own(daemon):
    # A spare joins its own memory and pids groups while it is held (JOIN):
    # from its first frame on it is in every hierarchy its template is in,
    # in a group named for it, with the function's memory limit.
    template = with_a_spare(daemon)
    hierarchies = len(own_groups(template["pid"]))
    assert hierarchies >= 1

    def joined(pid: int) -> bool:
        groups = own_groups(pid)
        return len(groups) == hierarchies and {g.name for g in groups} == {f"fn-forked-{pid}"}

    spare = wait_until(lambda: next(iter(spares_of(daemon, "fn", template)), None), message="the spare")
    wait_until(lambda: joined(spare), timeout=5, message=f"the spare {spare} in its own groups")
    for group in own_groups(spare):
        for name in ("memory.limit_in_bytes", "memory.max"):
            if (group / name).exists():
                assert int((group / name).read_text()) == 128 * 1024 * 1024
    results = concurrent(daemon, "fn", [{"sleep": 0.5}] * 3)
    forked = [r["pid"] for r in results if parent_of(r["pid"]) == template["pid"]]
    assert forked
    for pid in forked:
        assert joined(pid), own_groups(pid)


def test_a_burst_that_found_no_spare_leaves_more_spares_for_the_next(daemon):
    template = with_a_spare(daemon)
    # The first worker serves one call; five more need forks at once, and one
    # spare is held: the others wait for forks, so more spares are held after.
    results = concurrent(daemon, "fn", [{"sleep": 2}] * 6)  # each outlasts the forks
    assert len({r["pid"] for r in results}) == 6
    wait_until(lambda: template_of(daemon, "fn")["spares"] >= 2, message="more spares")
    # Each held spare is a live child of the template, never more than MAX_SPARES.
    wait_until(lambda: len(spares_of(daemon, "fn", template)) == template_of(daemon, "fn")["spares"] <= 4,
               message="the spare processes")


def test_a_spare_that_dies_is_replaced_and_never_handed_out(daemon):
    template = with_a_spare(daemon)
    spares = wait_until(lambda: spares_of(daemon, "fn", template), message="the spare process")
    (dead,) = spares
    os.kill(dead, signal.SIGKILL)  # as the OOM killer might
    wait_until(lambda: spares_of(daemon, "fn", template) - {dead}, message="a new spare")
    assert template_of(daemon, "fn")["spares"] == 1
    results = concurrent(daemon, "fn", [{"sleep": 0.3}] * 2)
    assert all(r.get("pid") and r["pid"] != dead for r in results), results
    assert any(parent_of(r["pid"]) == template["pid"] for r in results)  # a fork, from the new spare


def test_templates_can_be_turned_off(start_daemon, functions_dir):
    write_function(functions_dir, "fn.py", STATE)
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_ZYGOTE": "false"})
    first = daemon.invoke("fn").json()
    results = concurrent(daemon, "fn", [{"sleep": 0.3}] * 2)
    time.sleep(0.5)
    assert template_of(daemon, "fn") is None
    templates = daemon.get("/system/info").json()["isolation"]["worker_templates"]
    assert templates["active"] is False and "zygote = false" in templates["note"]
    for result in results:
        if result["pid"] != first["pid"]:
            assert parent_of(result["pid"]) == daemon.process.pid
            assert result["imported_at"] != first["imported_at"]


def test_a_cold_burst_is_served_by_workers_as_they_start_and_free(daemon):
    burst = 400
    write_function(daemon.functions, "sink.py", "def handler(event, context):\n    return None\n")
    write_function(daemon.functions, "sink.toml",
                   '[[triggers]]\ntype = "file"\ndir = "drop"\npatterns = ["*.dat"]\n')
    loaded(daemon, "sink")
    drop, staging = daemon.data / "drop", daemon.data / "staging"
    wait_until(drop.is_dir, message="the watched directory")
    staging.mkdir()
    for i in range(burst):
        (staging / f"{i}.dat").write_bytes(b"x")
    for i in range(burst):  # all at once, before a single worker exists
        os.rename(staging / f"{i}.dat", drop / f"{i}.dat")
    reports = lambda: [l for l in daemon.log_of("sink").splitlines() if "\tREPORT RequestId:" in l]
    wait_until(lambda: len(reports()) >= burst, timeout=90, message=f"{burst} invocations")
    assert len(reports()) == burst and not any("Status: error" in line for line in reports())
    cold = [line for line in reports() if "Init Duration:" in line]
    # Calls that found no free worker took the first one to come free, so
    # the burst needed far fewer workers than calls, and the template kept up.
    assert 1 <= len(cold) <= burst // 2
    assert "cannot fork" not in daemon.output()


def test_starts_that_mostly_wait_run_side_by_side(start_daemon, functions_dir):
    # An init that sleeps (as one that calls the network): once a start shows
    # that, the pool lets more than one per core run at once.
    write_function(functions_dir, "slow.py", """
        import time
        time.sleep(2)
        def handler(event, context):
            time.sleep(3)
            return 1
    """)
    write_function(functions_dir, "slow.toml", "timeout_s = 10\n")
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_ZYGOTE": "false"})
    loaded(daemon, "slow")
    calls = threading.Thread(target=concurrent, args=(daemon, "slow", [{}] * 10))
    calls.start()
    starting = lambda: sum(1 for w in daemon.workers("slow") if w["state"] == "starting")
    wait_until(lambda: starting() >= 1, message="the first starts")
    assert starting() <= CPU_BOUND_STARTS  # nothing known yet: CPU-bound, one start per core
    wait_until(lambda: starting() >= 6, timeout=6, message="the rest of the starts at once")
    calls.join(30)
    assert not calls.is_alive()


def settled_template(daemon, name: str) -> dict:
    """The function's template once it has imported the handler, or once it was found not fork-safe."""
    return wait_until(lambda: ((template_of(daemon, name) or {}).get("init_ms")
                               or (template_of(daemon, name) or {}).get("state") == "off")
                      and template_of(daemon, name), message="the template to be ready or off")


FRESH = "its workers start fresh, each with its own init, instead of forked from a template"


def first_call(daemon, name: str, source: str) -> tuple[dict, dict]:
    """Function `name` (a 10 s timeout) called once: that call's result, and the
    template once it is ready or found not fork-safe."""
    write_function(daemon.functions, f"{name}.toml", "timeout_s = 10\n")
    write_function(daemon.functions, f"{name}.py", source)
    loaded(daemon, name)
    return daemon.invoke(name).json(), settled_template(daemon, name)

CONNECTED = """
import os, socket, time
conn = socket.create_connection(("127.0.0.1", {port}))   # as a database client at init
def handler(event, context):
    sent = f"ECHO {{context.aws_request_id}}\\n".encode()
    conn.sendall(sent)
    time.sleep(event.get("sleep", 0))   # the other calls send theirs meanwhile
    got = conn.recv(4096)
    return {{"pid": os.getpid(), "port": conn.getsockname()[1], "sent": sent.decode(), "got": got.decode()}}
"""


@pytest.fixture
def echo_server():
    """A line echo server on loopback; yields (port, the client ports it has seen)."""
    listener = socket.create_server(("127.0.0.1", 0))
    clients: list[int] = []

    def serve(conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                conn.sendall(line)

    def accept() -> None:
        while True:
            try:
                conn, address = listener.accept()
            except OSError:
                return
            clients.append(address[1])
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1], clients
    listener.close()


def test_an_init_that_opens_a_connection_gives_every_worker_a_connection_of_its_own(daemon, echo_server):
    port, clients = echo_server
    write_function(daemon.functions, "conn.toml", "timeout_s = 10\n")
    write_function(daemon.functions, "conn.py", CONNECTED.format(port=port))
    loaded(daemon, "conn")
    first = daemon.invoke("conn").json()
    assert first["got"] == first["sent"], first
    template = settled_template(daemon, "conn")
    results = concurrent(daemon, "conn", [{"sleep": 1}] * 6)
    # A fork would share the template's one connection: calls would read
    # each other's replies, or none.
    for result in results:
        assert result.get("got") == result.get("sent"), results
    ports = {r["pid"]: r["port"] for r in results}
    assert len(ports) == 6 and len(set(ports.values())) == 6, results
    assert set(ports.values()) <= set(clients)
    assert template["state"] == "off"
    assert re.fullmatch(r"its init left a socket open \(fd \d+, socket:\[\d+\]\)", template["reason"]), template
    assert all(parent_of(pid) == daemon.process.pid for pid in ports), "every worker started fresh"


THREAD_POOL = """
import os, time
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(max_workers=2)
pool.submit(time.sleep, 0).result()   # its first thread starts here, at init
def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return {"pid": os.getpid(), "answer": pool.submit(lambda: 6 * 7).result(timeout=1.5)}
"""


def test_an_init_that_starts_a_thread_pool_has_it_in_every_worker(daemon):
    first, template = first_call(daemon, "pooled", THREAD_POOL)
    assert first["answer"] == 42
    results = concurrent(daemon, "pooled", [{"sleep": 1}] * 4)
    assert [r.get("answer") for r in results] == [42] * 4, results
    assert len({r["pid"] for r in results}) == 4
    assert template["state"] == "off"
    assert template["reason"] == "its init left 1 thread running (ThreadPoolExecutor-0_0)", template


SEEDED_TMP = """
import os, time
with open("/tmp/seed.txt", "w") as seed:   # as a model or a cache fetched at init
    seed.write(str(os.getpid()))
def handler(event, context):
    time.sleep(event.get("sleep", 0))
    with open("/tmp/seed.txt") as seed:
        return {"pid": os.getpid(), "seed": seed.read()}
"""


def test_what_an_init_wrote_to_tmp_is_there_for_every_worker(daemon):
    _, template = first_call(daemon, "seeded", SEEDED_TMP)
    results = concurrent(daemon, "seeded", [{"sleep": 1}] * 4)
    # Each worker's /tmp is its own, kept while it lives: written by its own init.
    assert all(r.get("seed") == str(r.get("pid")) for r in results), results
    assert template["state"] == "off"
    assert template["reason"] == "its init left a file in /tmp (/tmp/seed.txt)", template


def test_a_function_that_is_not_fork_safe_is_warned_about_once_per_code_version(daemon, echo_server):
    port, _ = echo_server
    source = CONNECTED.format(port=port) + THREAD_POOL.replace("import os, time", "")
    write_function(daemon.functions, "both.toml", "timeout_s = 10\n")
    write_function(daemon.functions, "both.py", source)
    loaded(daemon, "both")
    daemon.invoke("both")
    template = settled_template(daemon, "both")
    for _ in range(3):
        concurrent(daemon, "both", [{"sleep": 0.3}] * 3)
    warning = f"both: {template['reason']}; {FRESH}"
    assert re.fullmatch(r"its init left a socket open \(fd \d+, socket:\[\d+\]\) "
                        r"and 1 thread running \(ThreadPoolExecutor-0_0\)", template["reason"]), template
    assert daemon.output().count(warning) == 1, daemon.output()
    revision = daemon.function("both")["revision"]
    write_function(daemon.functions, "both.py", source + "\nVERSION = 2\n")
    wait_until(lambda: daemon.function("both")["revision"] != revision, message="the new revision")
    daemon.invoke("both")
    settled_template(daemon, "both")
    wait_until(lambda: daemon.output().count("both: its init left") == 2, message="the new code's warning")


TIDY_INIT = """
import os, socket, tempfile, threading, time
from concurrent.futures import ThreadPoolExecutor
with ThreadPoolExecutor(max_workers=2) as setup:   # used at init, shut down
    CONFIG = setup.submit(lambda: {{"answer": 42}}).result()
socket.create_connection(("127.0.0.1", {port})).close()
with tempfile.TemporaryDirectory() as scratch:      # /tmp used at init, emptied
    open(os.path.join(scratch, "x"), "w").write("x")
threading.Thread(target=time.sleep, args=(0,)).start()
time.sleep(0.2)                                     # that thread has ended
def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return {{"pid": os.getpid(), "answer": CONFIG["answer"]}}
"""


def test_an_init_that_leaves_nothing_open_is_still_forked(daemon, echo_server):
    port, _ = echo_server
    write_function(daemon.functions, "tidy.toml", "timeout_s = 10\n")
    write_function(daemon.functions, "tidy.py", TIDY_INIT.format(port=port))
    loaded(daemon, "tidy")
    first = daemon.invoke("tidy").json()
    template = ready_template(daemon, "tidy")
    results = concurrent(daemon, "tidy", [{"sleep": 2}] * 3)
    forked = [r for r in results if r["pid"] != first["pid"]]
    assert len(forked) >= 2 and all(parent_of(r["pid"]) == template["pid"] for r in forked), results
    assert all(r["answer"] == 42 for r in results)
    assert template["state"] != "off" and "its init left" not in daemon.output()


NUMPY = """
import os, random, time
import numpy
WEIGHTS = numpy.arange(6.0).reshape(2, 3)          # OpenBLAS starts its threads
NOISE = numpy.random.rand(3)                       # the init draws: the generator is seeded
def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return {"pid": os.getpid(), "numpy": int(numpy.random.randint(1 << 30)),
            "random": random.random(), "sum": float((WEIGHTS @ WEIGHTS.T).sum())}
"""


def test_a_numpy_function_is_forked_and_each_fork_draws_its_own_random_numbers(daemon):
    write_function(daemon.functions, "np.toml", "timeout_s = 10\n")
    write_function(daemon.functions, "np.py", NUMPY)
    loaded(daemon, "np")
    first = daemon.invoke("np").json()
    template = ready_template(daemon, "np")
    results = concurrent(daemon, "np", [{"sleep": 2}] * 3)
    forked = [r for r in results if r["pid"] != first["pid"]]
    assert len(forked) >= 2 and all(parent_of(r["pid"]) == template["pid"] for r in forked), results
    assert all(r["sum"] == 83.0 for r in results)
    # Seeded in the template, a generator would give every fork the same draws.
    assert len({r["numpy"] for r in forked}) == len(forked), forked
    assert len({r["random"] for r in forked}) == len(forked), forked


EPOLL = """
import os, select, time
POLLER = select.epoll()                            # one set, shared by every fork
def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return {"pid": os.getpid(), "fd": POLLER.fileno()}
"""


def test_an_init_that_opens_an_epoll_set_starts_its_workers_fresh(daemon):
    _, template = first_call(daemon, "poller", EPOLL)
    assert template["state"] == "off", template
    assert re.fullmatch(r"its init left an event descriptor open \(fd \d+, anon_inode:\[eventpoll\]\)",
                        template["reason"]), template
    results = concurrent(daemon, "poller", [{"sleep": 1}] * 3)
    assert all(parent_of(r["pid"]) == daemon.process.pid for r in results), results
