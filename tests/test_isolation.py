"""Worker isolation, with real daemons and real worker processes.

Each containment is exercised by a function that tries to break out of it;
every fault case ends with the daemon still serving another function.
Needs root (as CI runs): the `faasd` system user is created when missing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from packaging.requirements import Requirement

from faasd.limits import cgroup_name
from faasd.sandbox import tree_bytes
from support import (
    MEMORY_HOLDER, ROOT, concurrent, descendants, free_port, http, loaded, max_memory_used,
    own_groups, parent_of, pids_with_env, process_state, report_of, wait_until, write_function,
)

OK = """
def handler(event, context):
    return {"ok": True}
"""


def invoke(daemon, name: str, event=None) -> tuple[dict | list | str | None, str | None]:
    """(the function's result or error payload, its error type or None)."""
    response = daemon.invoke(name, event or {})
    assert response.status == 200, (response.status, response.text)
    error = response.headers.get("x-amz-function-error")
    body = response.json()
    return body, (body.get("errorType") if error else None)


def still_serving(daemon) -> None:
    """The daemon answers, and a healthy function runs."""
    if not (daemon.functions / "ok.py").exists():
        write_function(daemon.functions, "ok.py", OK)
        wait_until(lambda: daemon.get("/system/functions/ok").status == 200, message="ok loaded")
    assert invoke(daemon, "ok") == ({"ok": True}, None)
    assert daemon.get("/healthz").status == 200


def needs_root() -> None:
    if os.geteuid() != 0:
        message = "isolation tests need root (namespaces, cgroups, another user)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def faasd_user() -> pwd.struct_passwd:
    """The unprivileged system user `faasd`, created when missing (as the install does)."""
    needs_root()
    try:
        return pwd.getpwnam("faasd")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                        "--shell", "/usr/sbin/nologin", "faasd"], check=True)
        return pwd.getpwnam("faasd")


def _runs_as(user: pwd.struct_passwd, command: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(command, user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                          capture_output=True, text=True, timeout=30, **kw)


@pytest.fixture(scope="module")
def readable_install(faasd_user, tmp_path_factory) -> dict[str, str]:
    """Environment for a daemon whose workers run as `faasd`: faasd's package and a
    Python interpreter that user can read (this checkout may sit under /root)."""
    base = Path(tempfile.mkdtemp(prefix="faasd-install-", dir="/tmp"))
    os.chmod(base, 0o755)
    shutil.copytree(ROOT / "faasd", base / "faasd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in base.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    def usable(python: str) -> bool:
        try:
            return _runs_as(faasd_user, [python, "-I", "-c", "import decimal, email.parser"]).returncode == 0
        except OSError:
            return False

    candidates = [sys.executable, shutil.which("python3", path="/usr/bin:/bin")]
    python = next((p for p in candidates if p and usable(p)), None)
    assert python, f"no Python that the faasd user can run among {candidates}"
    yield {"PYTHONPATH": str(base), "FAASD_WORKERS_RUN_AS": "faasd", "FAASD_WORKERS_PYTHON": python}
    shutil.rmtree(base, ignore_errors=True)


# -- who the worker is, what it can see and write ----------------------------------------

WHOAMI = """
import errno, json, os

def attempt(action):
    try:
        action()
        return "allowed"
    except OSError as exc:
        return errno.errorcode[exc.errno]

def handler(event, context):
    code = os.path.abspath(__file__)
    return {
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
        "write_code": attempt(lambda: open(code, "a").close()),
        "new_function": attempt(lambda: open(os.path.join(os.path.dirname(code), "evil.py"), "w").close()),
        "data_dir": sorted(os.listdir(event["data"])) if os.path.isdir(event["data"]) else None,
        "config": open(event["config"]).read() if os.path.exists(event["config"]) else None,
        "setuid_root": attempt(lambda: os.setuid(0)),
        "tmpdir": os.environ.get("TMPDIR"),
        "status": {k: v.strip() for k, v in (l.split(":", 1) for l in open("/proc/self/status"))
                   if k in ("NoNewPrivs", "CapEff", "CapPrm")},
    }
"""


def test_workers_run_as_the_dedicated_user_and_cannot_touch_code_data_or_config(
        start_daemon, functions_dir, tmp_path, faasd_user, readable_install):
    config = tmp_path / "faasd.toml"
    config.write_text('# secret: do-not-leak\n[workers]\nkeep_warm_s = 600\n')
    write_function(functions_dir, "whoami.py", WHOAMI)
    daemon = start_daemon(functions_dir, config=config, env=readable_install)
    result, error = invoke(daemon, "whoami", {"data": str(daemon.data), "config": str(config)})
    assert error is None, result
    assert result["uid"] == result["euid"] == faasd_user.pw_uid
    assert result["gid"] == faasd_user.pw_gid
    assert result["groups"] in ([], [faasd_user.pw_gid])  # no supplementary groups
    assert result["write_code"] in ("EROFS", "EACCES")
    assert result["new_function"] in ("EROFS", "EACCES")
    assert not (functions_dir / "evil.py").exists()
    assert result["data_dir"] in (None, []), "other functions' logs and queued events are hidden"
    assert result["config"] in (None, ""), "the config file (auth secrets) is hidden"
    assert result["setuid_root"] == "EPERM"
    assert result["status"]["NoNewPrivs"] == "1"
    assert int(result["status"]["CapEff"], 16) == 0 and int(result["status"]["CapPrm"], 16) == 0
    assert result["tmpdir"] == "/tmp"
    isolation = daemon.get("/system/info").json()["isolation"]
    assert isolation["run_as"]["active"] is True
    assert "faasd" in isolation["run_as"]["note"]
    assert isolation["nproc_limit"]["active"] is True
    assert "running as root with no [workers] run_as" not in daemon.output()


def test_root_without_run_as_is_warned_about_at_start(start_daemon, functions_dir):
    needs_root()
    daemon = start_daemon(functions_dir)
    assert "running as root with no [workers] run_as" in daemon.output()
    isolation = daemon.get("/system/info").json()["isolation"]
    assert isolation["run_as"] == {
        "active": False,
        "note": "running as root without [workers] run_as: function code runs as root"}


def test_run_as_root_is_warned_about_as_no_run_as_and_not_listed_as_isolation(start_daemon, functions_dir):
    """run_as = "root" (or any user of uid 0) keeps nothing from function code: faasd says so
    at start, and /system/info lists neither a user of their own nor a private process list."""
    needs_root()
    write_function(functions_dir, "whoami.py", "import os\ndef handler(e, c):\n    return os.getuid()\n")
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_RUN_AS": "root"})
    assert "[workers] run_as = 'root' is uid 0: function code runs as root" in daemon.output()
    isolation = daemon.get("/system/info").json()["isolation"]
    assert isolation["run_as"]["active"] is False, isolation["run_as"]
    assert isolation["process_list"]["active"] is False, isolation["process_list"]
    assert invoke(daemon, "whoami") == (0, None)


def test_system_info_states_every_isolation_feature_and_why_not(start_daemon, functions_dir):
    needs_root()
    daemon = start_daemon(functions_dir)
    isolation = daemon.get("/system/info").json()["isolation"]
    for feature in ("memory_limit", "process_groups", "run_as", "function_users", "mount_namespace",
                    "tmp", "code_read_only", "private_data", "rlimits", "nproc_limit", "pids_limit",
                    "no_new_privileges", "pdeathsig", "env_allowlist", "process_list",
                    "pid_namespace", "network_namespace", "daemon_memory_private", "api_auth",
                    "api_closed_to_workers"):
        assert isinstance(isolation[feature]["active"], bool), feature
        assert isolation[feature]["note"], f"{feature} says nothing about itself"
    assert isolation["tmp"]["mode"] == "tmpfs"
    assert "charged to the worker's memory cgroup" in isolation["tmp"]["note"]
    assert "memory cgroup" in isolation["worker_templates"]["note"]
    assert isolation["mount_namespace"]["active"] is True
    # Root without run_as: its workers would see every process anyway.
    assert isolation["process_list"]["active"] is False
    assert "run_as" in isolation["process_list"]["note"]


# -- /tmp quota ---------------------------------------------------------------------------

FILL_TMP = """
import errno, os, tempfile

def handler(event, context):
    chunk = b"x" * (1024 * 1024)
    written = 0
    try:
        if event.get("files"):
            for n in range(event["mb"]):
                with open(os.path.join(tempfile.gettempdir(), f"f{n}"), "wb") as f:
                    f.write(chunk)
                written += len(chunk)
        else:
            with open(os.path.join(event.get("dir") or tempfile.gettempdir(), "big"), "wb") as f:
                for _ in range(event["mb"]):
                    f.write(chunk)
                    f.flush()
                    written += len(chunk)
    except OSError as exc:
        return {"errno": errno.errorcode[exc.errno], "written": written}
    return {"errno": None, "written": written}
"""


def test_tmp_past_tmp_mb_fails_with_enospc_in_a_private_tmpfs(start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "fill.toml", "tmp_mb = 8\nmemory_mb = 256\n")
    write_function(functions_dir, "fill.py", FILL_TMP)
    daemon = start_daemon(functions_dir)
    before = shutil.disk_usage("/tmp").used
    # Many files: the tmpfs is full.
    result, error = invoke(daemon, "fill", {"mb": 32, "files": True})
    assert error is None, result
    assert result["errno"] == "ENOSPC"
    assert 6 * 1024 * 1024 <= result["written"] <= 8 * 1024 * 1024
    # One file: full too (or past RLIMIT_FSIZE, the same size).
    result, error = invoke(daemon, "fill", {"mb": 32})
    assert result["errno"] in ("ENOSPC", "EFBIG")
    # /var/tmp is the same quota, and nothing reached the host's disk.
    result, error = invoke(daemon, "fill", {"mb": 32, "dir": "/var/tmp"})
    assert result["errno"] in ("ENOSPC", "EFBIG")
    assert not Path("/tmp/big").exists() and not Path("/var/tmp/big").exists()
    assert shutil.disk_usage("/tmp").used - before < 8 * 1024 * 1024
    still_serving(daemon)


def test_tmp_on_disk_is_limited_per_file_and_in_total(start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "fill.toml", "tmp_mb = 8\ntimeout_s = 20\n")
    write_function(functions_dir, "fill.py", FILL_TMP)
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_TMPFS": "false"})
    isolation = daemon.get("/system/info").json()["isolation"]
    assert isolation["tmp"]["mode"] == "disk" and "tmpfs = false" in isolation["tmp"]["note"]
    assert "code that writes to /tmp itself shares the host's /tmp" in isolation["tmp"]["note"]
    # Workers that run as the daemon's user, in no mount namespace of their own, can reach its files.
    assert isolation["private_data"]["active"] is False
    assert "can read and change the data dir" in isolation["private_data"]["note"]
    # One file: RLIMIT_FSIZE stops it at tmp_mb.
    result, error = invoke(daemon, "fill", {"mb": 32})
    assert error is None and result == {"errno": "EFBIG", "written": 8 * 1024 * 1024}
    # Many files: the daemon measures the directory and stops the worker.
    workers_dir = daemon.data / "workers"
    result, error = invoke(daemon, "fill", {"mb": 4000, "files": True})
    assert error == "Runtime.ExitError", result
    assert "tmp_mb quota of 8 MB" in result["errorMessage"]
    wait_until(lambda: tree_bytes(str(workers_dir)) < 8 * 1024 * 1024,
               message="the worker's /tmp to be deleted")
    still_serving(daemon)


# -- memory --------------------------------------------------------------------------------

HOG = """
def handler(event, context):
    blocks = []
    for _ in range(event["mb"]):
        blocks.append(bytearray(1024 * 1024))
    return len(blocks)
"""


def _check_oom(daemon) -> None:
    response = daemon.invoke("hog", {"mb": 400})
    result = response.json()
    assert result["errorType"] == "Runtime.OutOfMemory", result
    assert "memory limit of 64 MB exceeded" in result["errorMessage"]
    report = report_of(daemon, "hog", response.headers["x-amzn-requestid"])
    assert "\tStatus: error\tError Type: Runtime.OutOfMemory" in report
    assert max_memory_used(report) >= 48, report  # about the limit, read before the kill
    # A run within the limit reports what it used, truthfully.
    result, error = invoke(daemon, "hog", {"mb": 20})
    assert (result, error) == (20, None)
    report = [line for line in daemon.log_of("hog").splitlines() if "REPORT" in line][-1]
    used = int(report.split("Max Memory Used: ")[1].split(" MB")[0])
    assert 20 <= used <= 64, report
    still_serving(daemon)


def test_out_of_memory_with_cgroups(start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "hog.toml", "memory_mb = 64\ntimeout_s = 20\n")
    write_function(functions_dir, "hog.py", HOG)
    daemon = start_daemon(functions_dir)
    assert daemon.get("/system/info").json()["isolation"]["memory_limit"]["mode"] in ("cgroup1", "cgroup2")
    _check_oom(daemon)


# A child over the limit, whose death the handler shrugs off (as `subprocess.call` does).
CHILD_SHRUGGED_OFF = """
import os, subprocess, sys

def handler(event, context):
    hold = f"b = b'x' * ({event['mb']} << 20)"
    return {"pid": os.getpid(), "child": subprocess.run([sys.executable, "-c", hold]).returncode}
"""


def test_a_child_over_the_limit_fails_the_call_with_cgroups_as_without(start_daemon, functions_dir):
    """The kernel kills the process of a cgroup that needs the most: the child, and the
    handler would go on. The worker passed its memory_mb all the same: it is killed and
    the call fails, as the monitor and a cgroup v2 group (memory.oom.group) have it."""
    needs_root()
    write_function(functions_dir, "parent.toml", "memory_mb = 64\ntimeout_s = 20\n")
    write_function(functions_dir, "parent.py", CHILD_SHRUGGED_OFF)
    daemon = start_daemon(functions_dir)
    assert daemon.get("/system/info").json()["isolation"]["memory_limit"]["mode"] in ("cgroup1", "cgroup2")
    within, error = invoke(daemon, "parent", {"mb": 8})
    assert error is None and within["child"] == 0, within
    response = daemon.invoke("parent", {"mb": 400})
    result = response.json()
    assert result.get("errorType") == "Runtime.OutOfMemory", result
    assert "memory limit of 64 MB exceeded" in result["errorMessage"]
    report = report_of(daemon, "parent", response.headers["x-amzn-requestid"])
    assert "\tStatus: error\tError Type: Runtime.OutOfMemory" in report
    assert max_memory_used(report) >= 48, report
    wait_until(lambda: process_state(within["pid"]) in (None, "Z"), message="the worker to be killed")
    again, error = invoke(daemon, "parent", {"mb": 8})
    assert error is None and again["child"] == 0 and again["pid"] != within["pid"], again
    still_serving(daemon)


def test_with_cgroups_an_init_over_the_limit_fails_as_out_of_memory(start_daemon, functions_dir):
    """The kernel kills a worker whose init passes memory_mb: its init fails with
    Runtime.OutOfMemory, as the monitor has it, not as a crash."""
    needs_root()
    write_function(functions_dir, "inithog.toml", "memory_mb = 128\n")
    write_function(functions_dir, "inithog.py", INIT_HOG)
    daemon = start_daemon(functions_dir)
    assert daemon.get("/system/info").json()["isolation"]["memory_limit"]["mode"] in ("cgroup1", "cgroup2")
    response = daemon.invoke("inithog")
    result = response.json()
    assert result.get("errorType") == "Runtime.OutOfMemory", result
    assert "memory limit of 128 MB exceeded" in result["errorMessage"]
    assert "Phase: init\tStatus: error\tError Type: Runtime.OutOfMemory" in daemon.log_of("inithog")
    still_serving(daemon)


# A host without a memory cgroup faasd may use: the daemon runs in a mount
# namespace where the memory hierarchies are empty directories.
_HIDE_CGROUPS = ("for d in /sys/fs/cgroup/memory /sys/fs/cgroup/unified /sys/fs/cgroup; do "
                 "[ -d $d ] && mount -t tmpfs -o size=4k none $d 2>/dev/null; done; exec \"$@\"")
WITHOUT_MEMORY_CGROUPS = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                          _HIDE_CGROUPS, "sh"]


def _start_without_memory_cgroups(start_daemon, functions_dir):
    daemon = start_daemon(functions_dir, prefix=WITHOUT_MEMORY_CGROUPS)
    memory = daemon.get("/system/info").json()["isolation"]["memory_limit"]
    assert memory["mode"] == "monitor", memory
    return daemon


def test_without_a_cgroup_system_info_says_what_the_monitor_does_instead(start_daemon, functions_dir):
    needs_root()
    daemon = _start_without_memory_cgroups(start_daemon, functions_dir)
    isolation = daemon.get("/system/info").json()["isolation"]
    notes = {name: feature["note"] for name, feature in isolation.items()}
    assert not any("memory cgroup" in note for note in notes.values()), notes
    assert "every process of each worker and its private /tmp" in notes["memory_limit"]
    assert isolation["tmp"]["mode"] == "tmpfs"
    assert "the memory monitor counts what it holds toward memory_mb" in notes["tmp"]
    assert isolation["worker_templates"]["active"] is True
    assert "memory limit kept by the monitor" in notes["worker_templates"]
    assert isolation["pids_limit"]["active"] is False
    assert "killed with it by its mount namespace" in notes["pids_limit"]
    # The start-up warning says what would get the kernel to enforce them instead.
    assert ("not by the kernel: cgroup v2 is not the mounted hierarchy; no cgroup v1 memory hierarchy; "
            "for the kernel to enforce them, run faasd where the cgroup memory controller is mounted: "
            "cgroup v2 at /sys/fs/cgroup, under systemd with Delegate=yes") in daemon.output()


# A child in a session of its own, out of the worker's process group, that spins.
SPINNER = """
import os, subprocess, sys

spinner = None

def handler(event, context):
    global spinner
    if spinner is None:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    return {"worker": os.getpid(), "spinner": spinner.pid}
"""


def test_without_a_cgroup_a_frozen_worker_stops_its_children_in_other_sessions_too(
        start_daemon, functions_dir):
    """Found in the worker's mount namespace where no cgroup lists them: a frozen worker
    runs nothing, and its next call thaws them with it."""
    needs_root()
    write_function(functions_dir, "spinner.py", SPINNER)
    daemon = _start_without_memory_cgroups(start_daemon, functions_dir)
    first, error = invoke(daemon, "spinner")
    assert error is None and os.getpgid(first["spinner"]) != first["worker"], first
    wait_until(lambda: process_state(first["worker"]) == "T", message="the idle worker to be stopped")
    wait_until(lambda: process_state(first["spinner"]) == "T", timeout=3,
               message="its child in another session to be stopped too")
    again, error = invoke(daemon, "spinner")
    assert error is None and again == first, again
    assert process_state(first["spinner"]) in ("R", "S")  # thawed with the worker for the call
    wait_until(lambda: process_state(first["spinner"]) == "T", timeout=3, message="stopped again")
    still_serving(daemon)


def test_out_of_memory_with_the_monitor_when_no_cgroup_is_writable(start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "hog.toml", "memory_mb = 64\ntimeout_s = 20\n")
    write_function(functions_dir, "hog.py", HOG)
    _check_oom(_start_without_memory_cgroups(start_daemon, functions_dir))


def test_without_a_cgroup_a_call_that_times_out_or_crashes_reports_the_memory_it_used(
        start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "holder.toml", "memory_mb = 256\ntimeout_s = 1\n")
    write_function(functions_dir, "holder.py", MEMORY_HOLDER)
    daemon = _start_without_memory_cgroups(start_daemon, functions_dir)
    # Each on a new worker: no earlier call's figure to fall back on, and the
    # process (with its own record of its peak) is gone by the time the call ends.
    for event, error_type in (({"sleep_s": 30}, "Sandbox.Timedout"),
                              ({"sleep_s": 0.3, "exit": True}, "Runtime.ExitError")):
        response = daemon.invoke("holder", {"mb": 100, **event})
        assert response.json()["errorType"] == error_type, response.text
        report = report_of(daemon, "holder", response.headers["x-amzn-requestid"])
        assert "\tStatus: " in report and max_memory_used(report) >= 100, report


CHILD_HOG = """
import subprocess, sys, time

def handler(event, context):
    hold = f"b = b'x' * ({event['mb']} << 20)"
    if event.get("keep_s"):
        # A child in a session of its own, holding its memory while the handler waits.
        subprocess.Popen([sys.executable, "-c", hold + "; import time; time.sleep(60)"],
                         start_new_session=True)
        time.sleep(event["keep_s"])
    else:
        subprocess.run([sys.executable, "-c", hold], check=True)
    return "done"
"""


def test_without_a_cgroup_memory_held_by_a_workers_children_counts(start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "children.toml", "memory_mb = 128\ntimeout_s = 20\n")
    write_function(functions_dir, "children.py", CHILD_HOG)
    daemon = _start_without_memory_cgroups(start_daemon, functions_dir)
    for event in ({"mb": 600}, {"mb": 300, "keep_s": 5}):
        response = daemon.invoke("children", event)
        result = response.json()
        assert result.get("errorType") == "Runtime.OutOfMemory", (event, result)
        assert "memory limit of 128 MB exceeded" in result["errorMessage"]
        report = report_of(daemon, "children", response.headers["x-amzn-requestid"])
        assert "\tError Type: Runtime.OutOfMemory" in report and max_memory_used(report) >= 128, report
    # Within the limit, a child is no problem.
    assert invoke(daemon, "children", {"mb": 20}) == ("done", None)
    # A child that came and went before anything could sample it (at init): the
    # worker's peak, which its first call reports, says it all the same.
    write_function(functions_dir, "initchild.toml", "memory_mb = 128\n")
    write_function(functions_dir, "initchild.py", INIT_CHILD)
    loaded(daemon, "initchild")
    result, error = invoke(daemon, "initchild")
    assert error == "Runtime.OutOfMemory", result
    still_serving(daemon)


HEADLESS_HOG = """
import ctypes, subprocess, sys, threading, time

# Its main thread exits (pthread_exit in main), then another takes the memory:
# the process's own /proc entries read as a zombie's by then, holding nothing.
HOLD = '''
import ctypes, threading, time
threading.Thread(target=lambda: (time.sleep(0.5), b"x" * ({mb} << 20), time.sleep(60))).start()
ctypes.CDLL(None).pthread_exit(None)
'''

def handler(event, context):
    if event.get("helper"):
        subprocess.Popen([sys.executable, "-c", HOLD.format(mb=event["mb"])])
        time.sleep(event["keep_s"])
        return "done"
    # The worker's own main thread, the one that would answer, exits.
    exec(HOLD.format(mb=event["mb"]))
"""


def test_without_a_cgroup_memory_held_by_threads_after_the_main_one_exited_counts(
        start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "headless.toml", "memory_mb = 128\ntimeout_s = 10\n")
    write_function(functions_dir, "headless.py", HEADLESS_HOG)
    daemon = _start_without_memory_cgroups(start_daemon, functions_dir)
    # A helper program it starts, then the worker itself.
    for event in ({"helper": True, "mb": 300, "keep_s": 5}, {"mb": 300}):
        response = daemon.invoke("headless", event)
        result = response.json()
        assert isinstance(result, dict) and result.get("errorType") == "Runtime.OutOfMemory", (event, result)
        assert "memory limit of 128 MB exceeded" in result["errorMessage"]
        report = report_of(daemon, "headless", response.headers["x-amzn-requestid"])
        assert "\tError Type: Runtime.OutOfMemory" in report and max_memory_used(report) >= 128, report
    # Within the limit, it is no problem.
    assert invoke(daemon, "headless", {"helper": True, "mb": 20, "keep_s": 0.5}) == ("done", None)
    still_serving(daemon)


INIT_CHILD = """
import subprocess, sys

subprocess.run([sys.executable, "-c", "b = b'x' * (300 << 20)"], check=True)

def handler(event, context):
    return "done"
"""


INIT_HOG = """
held = b"x" * (400 << 20)

def handler(event, context):
    return len(held)
"""


def test_without_a_cgroup_a_worker_over_its_memory_at_init_fails_its_init(start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "inithog.toml", "memory_mb = 128\n")
    write_function(functions_dir, "inithog.py", INIT_HOG)
    daemon = _start_without_memory_cgroups(start_daemon, functions_dir)
    for _ in range(2):  # the second call finds no warm worker, and no template, either
        response = daemon.invoke("inithog")
        result = response.json()
        assert result.get("errorType") == "Runtime.OutOfMemory", result
        assert "memory limit of 128 MB exceeded" in result["errorMessage"]
        assert "Phase: init\tStatus: error\tError Type: Runtime.OutOfMemory" in daemon.log_of("inithog")
        wait_until(lambda: not daemon.workers("inithog") and daemon.function("inithog")["template"] is None,
                   message="no worker and no template of inithog left")
    holders = [pid for pid in descendants(daemon.process.pid) if (process_rss_mb(pid) or 0) > 128]
    assert not holders, [(pid, process_rss_mb(pid)) for pid in holders]
    still_serving(daemon)


TMP_HOG = """
import os, time

def handler(event, context):
    with open("/tmp/big", "wb") as f:
        for _ in range(event["mb"]):
            f.write(b"x" * (1 << 20))
    time.sleep(event.get("sleep_s", 0))
    return os.path.getsize("/tmp/big")
"""


def test_without_a_cgroup_a_workers_private_tmp_counts_toward_its_memory(start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "tmphog.toml", "memory_mb = 128\ntmp_mb = 512\ntimeout_s = 20\n")
    write_function(functions_dir, "tmphog.py", TMP_HOG)
    daemon = _start_without_memory_cgroups(start_daemon, functions_dir)
    assert daemon.get("/system/info").json()["isolation"]["tmp"]["mode"] == "tmpfs"
    result, error = invoke(daemon, "tmphog", {"mb": 200, "sleep_s": 2})
    assert error == "Runtime.OutOfMemory", result
    result, error = invoke(daemon, "tmphog", {"mb": 40})
    assert (result, error) == (40 << 20, None)
    still_serving(daemon)


SHM_HOG = """
import mmap, time

def handler(event, context):
    held = b"x" * (event["hold_mb"] << 20)
    with open("/dev/shm/big", "w+b") as f:
        for _ in range(event["shm_mb"]):
            f.write(b"x" * (1 << 20))
        f.flush()
        if event.get("mapped"):
            # Mapped, its pages are resident in the worker too: still counted once.
            view = mmap.mmap(f.fileno(), 0)
            total = sum(view[i] for i in range(0, len(view), 4096))
    time.sleep(event.get("sleep_s", 0))
    return len(held) >> 20
"""


def test_without_a_cgroup_a_workers_private_dev_shm_counts_toward_its_memory(start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "shmhog.toml", "memory_mb = 128\ntimeout_s = 20\n")
    write_function(functions_dir, "shmhog.py", SHM_HOG)
    daemon = _start_without_memory_cgroups(start_daemon, functions_dir)
    # 80 MB held and 60 MB in /dev/shm: over 128 MB only with both counted.
    result, error = invoke(daemon, "shmhog", {"hold_mb": 80, "shm_mb": 60, "sleep_s": 2})
    assert error == "Runtime.OutOfMemory", result
    # 20 MB held and 60 MB in /dev/shm, mapped: 80 MB, not the 140 MB of counting the map twice.
    result, error = invoke(daemon, "shmhog", {"hold_mb": 20, "shm_mb": 60, "mapped": True, "sleep_s": 2})
    assert (result, error) == (20, None)
    still_serving(daemon)


# -- processes, files, output, results ------------------------------------------------------

FORKS = """
import errno, os, time

def handler(event, context):
    if event.get("bomb"):
        print(f"bomb pid={os.getpid()}", flush=True)
        while True:
            try:
                os.fork()
            except OSError:
                time.sleep(0.01)
    children = []
    try:
        while len(children) < 5000:
            pid = os.fork()
            if pid == 0:
                try:
                    os.execv("/bin/sleep", ["sleep", "60"])  # small: 1000 of them fit in memory
                finally:
                    os._exit(1)
            children.append(pid)
        failure = None
    except OSError as exc:
        failure = errno.errorcode[exc.errno]
    for pid in children:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return {"forked": len(children), "failure": failure}
"""


def test_fork_bomb_is_contained(start_daemon, functions_dir):
    needs_root()
    # Forking up to the limit and reaping every child takes seconds on a slow
    # machine: that call gets time enough. The bomb ends at its timeout.
    write_function(functions_dir, "forks.toml", "timeout_s = 20\nmemory_mb = 1024\n")
    write_function(functions_dir, "forks.py", FORKS)
    write_function(functions_dir, "bomb.toml", "timeout_s = 3\nmemory_mb = 1024\n")
    write_function(functions_dir, "bomb.py", FORKS)
    daemon = start_daemon(functions_dir)
    assert daemon.get("/system/info").json()["isolation"]["pids_limit"]["active"] is True
    result, error = invoke(daemon, "forks")
    assert error is None, result
    assert result["failure"] == "EAGAIN" and result["forked"] < 1024
    # The real thing: every process of it dies with the invocation.
    result, error = invoke(daemon, "bomb", {"bomb": True})
    assert error in ("Sandbox.Timedout", "Runtime.OutOfMemory"), result
    pid = int(daemon.log_of("bomb").split("bomb pid=")[1].split()[0])

    def group_gone() -> bool:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(group_gone, timeout=10, message="every process of the fork bomb to be gone")
    still_serving(daemon)


HEAVY_CHILD = """
import os, subprocess, sys

def handler(event, context):
    # A child in a session of its own (out of the worker's process group)
    # with 300 MB resident: killed, it takes a moment to exit.
    child = subprocess.Popen([sys.executable, "-c",
                              "import time; b = bytearray(300 << 20); b[::4096] = b'x' * (300 << 8); time.sleep(600)"],
                             start_new_session=True)
    return {"worker": os.getpid(), "child": child.pid}
"""


def test_a_killed_workers_cgroups_go_once_its_last_process_has_exited(start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "heavy.toml", "memory_mb = 1024\n")
    write_function(functions_dir, "heavy.py", HEAVY_CHILD)
    # Not frozen meanwhile: freezing the worker stops the child too, before its 300 MB.
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_FREEZE_AFTER_MS": "600000"})
    assert daemon.get("/system/info").json()["isolation"]["memory_limit"]["mode"] != "monitor"
    result, error = invoke(daemon, "heavy")
    assert error is None, result
    wait_until(lambda: (process_rss_mb(result["child"]) or 0) >= 300, message="the child's 300 MB")
    groups = own_groups(result["worker"])
    assert groups and all(group.exists() for group in groups)
    os.kill(result["worker"], signal.SIGKILL)
    wait_until(lambda: process_state(result["child"]) in (None, "Z"), message="the child to be killed with it")
    # The groups could not be removed while the child was still exiting.
    wait_until(lambda: not any(group.exists() for group in groups), timeout=10,
               message=f"the dead worker's cgroups to go: {groups}")
    still_serving(daemon)


def test_a_stop_removes_every_cgroup_even_while_a_killed_child_is_still_exiting(
        start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "heavy.toml", "memory_mb = 1024\n")
    write_function(functions_dir, "heavy.py", HEAVY_CHILD)
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_FREEZE_AFTER_MS": "600000"})
    result, error = invoke(daemon, "heavy")
    assert error is None, result
    wait_until(lambda: (process_rss_mb(result["child"]) or 0) >= 300, message="the child's 300 MB")
    groups = own_groups(result["worker"])
    roots = {group.parent for group in groups}  # faasd-<tag>-<pid> in each hierarchy
    own = f"{cgroup_name(daemon.data)}-{daemon.process.pid}"
    assert groups and all(root.name == own for root in roots), groups
    assert daemon.stop() == 0
    assert process_state(result["child"]) in (None, "Z")
    assert not [root for root in roots if root.exists()]  # none left for the next start to sweep


ESCAPES = """
import subprocess, time

def handler(event, context):
    # `setsid` forks when it leads its group: the sleep is orphaned at once,
    # in a session of its own, and no longer a child of anything of the worker's.
    subprocess.Popen(["setsid", "sleep", event["tag"]], start_new_session=True)
    time.sleep(event.get("sleep_s", 0))
    return "started"
"""


def pids_running(*argv: str) -> list[int]:
    """Processes whose command line is exactly `argv`."""
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if entry.isdigit() and cmdline.read() == wanted:
                    found.append(int(entry))
        except OSError:
            continue
    return found


def test_without_a_pids_cgroup_what_a_worker_starts_in_another_session_dies_with_it(
        start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "escapes.toml", "timeout_s = 1\n")
    write_function(functions_dir, "escapes.py", ESCAPES)
    daemon = _start_without_memory_cgroups(start_daemon, functions_dir)
    assert daemon.get("/system/info").json()["isolation"]["pids_limit"]["active"] is False
    # Durations no other process on the host sleeps for.
    timed_out, retired = (f"{90000 + os.getpid() % 10000}.{n}" for n in (1, 2))
    try:
        response = daemon.invoke("escapes", {"tag": timed_out, "sleep_s": 30})
        assert response.json()["errorType"] == "Sandbox.Timedout", response.text
        wait_until(lambda: not pids_running("sleep", timed_out), timeout=5,
                   message="the timed-out worker's sleep (another session) to be killed with it")
        # A worker that ends normally (here: the daemon stops) takes its processes along too.
        assert invoke(daemon, "escapes", {"tag": retired}) == ("started", None)
        wait_until(lambda: pids_running("sleep", retired), message="the second sleep to start")
        still_serving(daemon)
        daemon.stop()
        wait_until(lambda: not pids_running("sleep", retired), timeout=5,
                   message="the retired worker's sleep to be killed with it")
    finally:
        for pid in pids_running("sleep", timed_out) + pids_running("sleep", retired):
            os.kill(pid, signal.SIGKILL)


def process_rss_mb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


FDS = """
import errno

def handler(event, context):
    files = []
    try:
        while len(files) < 100000:
            files.append(open("/dev/null"))
    except OSError as exc:
        failure = errno.errorcode[exc.errno]
    count = len(files)
    for f in files:
        f.close()
    return {"opened": count, "failure": failure}
"""


def test_fd_flood_stops_at_the_open_files_limit(start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "fds.py", FDS)
    daemon = start_daemon(functions_dir)
    result, error = invoke(daemon, "fds")
    assert error is None, result
    assert result["failure"] == "EMFILE" and 900 < result["opened"] < 1024
    still_serving(daemon)


FLOOD = """
import os, sys

def handler(event, context):
    line = "y" * 1023
    for _ in range(event["kb"]):
        print(line)
    os.write(1, b"raw line from fd 1\\n" * 10000)
    if event.get("fail"):
        raise ValueError("the real cause")
    return "flooded"
"""


def test_log_flood_is_truncated_with_a_marker(start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "flood.toml", "timeout_s = 30\n")
    write_function(functions_dir, "flood.py", FLOOD)
    daemon = start_daemon(functions_dir)
    result, error = invoke(daemon, "flood", {"kb": 8 * 1024})  # 8 MB of output
    assert (result, error) == ("flooded", None)
    log = daemon.log_of("flood")
    assert log.count("[faasd: output truncated: this invocation printed more than 1048576 bytes") == 1
    assert len(log.encode()) < 3 * 1024 * 1024
    assert "REPORT RequestId" in log.splitlines()[-1]
    assert (daemon.data / "logs" / "flood.log").stat().st_size < 3 * 1024 * 1024
    # Past the budget the last lines are still kept: what ended the call, its error.
    result, error = invoke(daemon, "flood", {"kb": 2 * 1024, "fail": True})
    assert error == "ValueError", result
    lines = daemon.log_of("flood").split("\n")  # a record may hold \r
    end = max(i for i, line in enumerate(lines) if "END RequestId" in line)
    kept = [i for i, line in enumerate(lines) if "were left out; its last 50 follow" in line]
    assert len(kept) == 2 and kept[-1] == end - 51, lines[-60:]  # one for each flooding call
    assert "ValueError: the real cause" in "\n".join(lines[kept[-1]:end])
    still_serving(daemon)


RESULTS = """
def handler(event, context):
    if event["kind"] == "huge":
        return "x" * (7 * 1024 * 1024)
    if event["kind"] == "object":
        return {"value": object()}
    return {"kind": event["kind"]}
"""


def test_huge_and_unserialisable_results_fail_that_invocation_only(start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "results.py", RESULTS)
    daemon = start_daemon(functions_dir)
    result, error = invoke(daemon, "results", {"kind": "huge"})
    assert error == "Function.ResponseSizeTooLarge", result
    assert result["errorMessage"] == "Response payload size exceeded maximum allowed payload size (6291556 bytes)."
    result, error = invoke(daemon, "results", {"kind": "object"})
    assert error == "Runtime.MarshalError", result
    assert "Unable to marshal response" in result["errorMessage"]
    # The same worker goes on serving.
    assert invoke(daemon, "results", {"kind": "fine"}) == ({"kind": "fine"}, None)
    assert len(daemon.workers("results")) == 1
    still_serving(daemon)


STUBBORN = """
import os, signal, sys, time

def handler(event, context):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"worker pid={os.getpid()}", flush=True)
    if event.get("child"):
        if os.fork() == 0:
            os.setsid()  # leaves the worker's process group
            os.execv("/bin/sleep", ["sleep", "300.25"])  # SIGTERM stays ignored across exec
    time.sleep(event.get("sleep", 0))
    return os.getpid()
"""


def _sleepers(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and open(f"/proc/{entry}/cmdline", "rb").read() == f"sleep\0{marker}\0".encode():
                found.append(int(entry))
        except OSError:
            pass
    return found


def test_handler_ignoring_sigterm_is_killed_on_timeout_and_at_shutdown(start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "stubborn.toml", "timeout_s = 1\n")
    write_function(functions_dir, "stubborn.py", STUBBORN)
    daemon = start_daemon(functions_dir)
    result, error = invoke(daemon, "stubborn", {"sleep": 30, "child": True})
    assert error == "Sandbox.Timedout", result
    pid = int(daemon.log_of("stubborn").split("worker pid=")[1].split()[0])
    wait_until(lambda: process_state(pid) in (None, "Z") and not _sleepers("300.25"), timeout=10,
               message="the worker and the child that left its process group to die")
    still_serving(daemon)
    # A worker that ignores SIGTERM does not hold up the daemon's exit.
    pid, error = invoke(daemon, "stubborn")
    assert error is None
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 15
    assert process_state(pid) is None


BUSY_PY = """
import signal, time

def handler(event, context):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # an orphaned process group's SIGHUP
    time.sleep(120)
"""

# Blocks its event loop: it cannot notice its control socket closing.
BUSY_NODE = """
export const handler = async () => {
  process.on("SIGHUP", () => {});
  const end = Date.now() + 120000;
  while (Date.now() < end) {}
};
"""


def test_workers_die_with_a_daemon_killed_by_sigkill(start_daemon, functions_dir):
    needs_root()
    names = ["busy_py", "idle"]
    write_function(functions_dir, "busy_py.py", BUSY_PY)
    write_function(functions_dir, "idle.py", OK)
    write_function(functions_dir, "idle.toml", "min_warm = 1\n")  # frozen when the daemon dies
    if shutil.which("node"):
        write_function(functions_dir, "busy_node.mjs", BUSY_NODE)
        names.append("busy_node")
    elif os.environ.get("CI"):
        pytest.fail("node is not installed (.ci/run installs it)")
    for name in names[:1] + names[2:]:
        write_function(functions_dir, f"{name}.toml", "timeout_s = 300\n")
    daemon = start_daemon(functions_dir)
    for name in names[:1] + names[2:]:
        def call(n=name):
            try:
                daemon.get(f"/function/{n}", timeout=300)
            except OSError:
                pass  # the daemon is killed mid-call

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        wait_until(lambda n=name: daemon.function(n)["inflight"] == 1, timeout=20,
                   message=f"{name} to be busy")
    wait_until(lambda: all(daemon.workers(n) for n in names), timeout=20, message="workers")
    workers = {w["pid"] for n in names for w in daemon.workers(n)}
    wait_until(lambda: daemon.workers("idle")[0]["state"] == "frozen", message="a frozen worker")
    daemon_pid = daemon.process.pid
    daemon.kill9()
    wait_until(lambda: all(process_state(p) in (None, "Z") for p in workers), timeout=10,
               message="every worker, busy or frozen, to die with its daemon")
    # A worker still starting (its interpreter not yet at the point where it
    # asks for the parent-death signal) finds its parent gone there and exits.
    wait_until(lambda: not pids_with_env("_FAASD_PARENT_PID", str(daemon_pid)), timeout=10,
               message="workers that were still starting to exit too")


# Starts what outlives its worker: a child in the worker's session and one in
# a session of its own, then is still busy when the daemon is killed.
LEAVES_CHILDREN = """
import subprocess, time

def handler(event, context):
    subprocess.Popen(["sleep", event["marker"]])
    subprocess.Popen(["sleep", event["marker"]], start_new_session=True)
    time.sleep(5)
"""


def _marked(marker: str) -> set[int]:
    """Live processes running `sleep MARKER`."""
    return {pid for pid in _sleepers(marker) if process_state(pid) not in (None, "Z")}


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_the_next_daemon_on_its_data_dir_kills_what_workers_of_a_killed_one_left_in_its_cgroups(
        start_daemon, functions_dir, tmp_path, reaped):
    """Whether or not the killed daemon's parent has reaped it yet (an init that does not
    reap leaves it a zombie, /proc/PID still there), its groups are swept by its restart,
    which says so in its log; a daemon of another data dir (another faasd service on the
    host) leaves them alone."""
    needs_root()
    write_function(functions_dir, "leaves.py", LEAVES_CHILDREN)
    write_function(functions_dir, "leaves.toml", "timeout_s = 10\n")
    marker = f"3041.{os.getpid()}{time.monotonic_ns() % 10**6}"
    bases: set[Path] = set()
    try:
        daemon = start_daemon(functions_dir)
        loaded(daemon, "leaves")
        response = daemon.invoke("leaves", {"marker": marker}, **{"X-Amz-Invocation-Type": "Event"})
        assert response.status == 202, response.text
        wait_until(lambda: len(_marked(marker)) == 2, timeout=20, message="the handler's children")
        leftovers = _marked(marker)
        workers = {w["pid"] for w in daemon.workers("leaves")}
        for pid in leftovers:
            for group in own_groups(pid):
                index = next(i for i, part in enumerate(group.parts) if part.startswith("faasd-"))
                bases.add(Path(*group.parts[:index + 1]))  # the daemon's faasd-<tag>-<pid> group
        if not bases:
            pytest.skip("workers are in no faasd-<tag>-<pid> cgroup on this host")
        daemon_pid = daemon.process.pid
        if reaped:
            daemon.kill9()
        else:
            daemon.process.kill()
            wait_until(lambda: process_state(daemon_pid) == "Z", message="the killed daemon, a zombie")
        wait_until(lambda: all(process_state(p) in (None, "Z") for p in workers), timeout=10,
                   message="the worker to die with its daemon")
        assert _marked(marker) == leftovers  # what the worker started is still running
        other = start_daemon(functions_dir, data=tmp_path / "other-service")
        assert other.stop() == 0
        assert _marked(marker) == leftovers and all(base.exists() for base in bases)
        assert "leftover" not in other.output(), other.output()
        again = start_daemon(functions_dir)
        wait_until(lambda: not (_marked(marker) & leftovers), timeout=5,
                   message="the leftovers to be killed")
        assert not [base for base in bases if base.exists()]
        assert (f"killed 2 leftover process(es) of the faasd daemon that died (pid {daemon_pid})"
                in again.output())
        if not reaped:
            assert process_state(daemon_pid) == "Z"  # swept while its parent has not reaped it
    finally:  # whatever failed: nothing of this test's is left running
        for pid in _marked(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while _marked(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        for base in bases:
            for path in sorted((p for p in base.rglob("*") if p.is_dir()),
                               key=lambda p: len(p.parts), reverse=True) + [base]:
                try:
                    path.rmdir()
                except OSError:
                    pass


ENVIRON = """
import os

def handler(event, context):
    return dict(os.environ)
"""

ALLOWED = {
    "PATH", "LANG", "TZ", "TMPDIR", "_HANDLER", "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EXECUTION_ENV", "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_VERSION", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME", "AWS_LAMBDA_INITIALIZATION_TYPE", "AWS_LAMBDA_LOG_FORMAT",
    "_X_AMZN_TRACE_ID", "GREETING",
}


def test_workers_get_an_allowlisted_environment(start_daemon, functions_dir):
    needs_root()
    write_function(functions_dir, "environ.toml", '[env]\nGREETING = "hi"\n')
    write_function(functions_dir, "environ.py", ENVIRON)
    daemon = start_daemon(functions_dir, env={
        "DATABASE_PASSWORD": "hunter2", "AWS_SECRET_ACCESS_KEY": "daemon-secret",
        "FAASD_AUTH_KEYS": "AKIDTEST=the-secret-of-faasd", "LD_PRELOAD": ""})
    # The keys make the Lambda API want signatures; the HTTP path is public.
    response = daemon.get("/function/environ")
    assert response.status == 200, response.text
    environ = response.json()
    assert set(environ) <= ALLOWED, sorted(set(environ) - ALLOWED)
    assert environ["GREETING"] == "hi" and environ["AWS_LAMBDA_FUNCTION_NAME"] == "environ"
    text = json.dumps(environ)
    for secret in ("hunter2", "daemon-secret", "the-secret-of-faasd", "FAASD"):
        assert secret not in text


def test_a_worker_as_the_dedicated_user_cannot_read_the_daemon(start_daemon, functions_dir,
                                                               faasd_user, readable_install):
    write_function(functions_dir, "peek.py",
                   "import os\ndef handler(e, c):\n"
                   "    found = {}\n"
                   "    for what in ('environ', 'mem', 'cmdline'):\n"
                   "        try:\n            found[what] = len(open(f'/proc/{os.getppid()}/{what}', 'rb').read(64))\n"
                   "        except OSError as exc:\n            found[what] = exc.strerror\n"
                   "    try:\n        os.kill(os.getppid(), 0)\n        found['signal'] = 'allowed'\n"
                   "    except OSError as exc:\n        found['signal'] = exc.strerror\n"
                   "    return found\n")
    daemon = start_daemon(functions_dir, env={**readable_install, "FAASD_AUTH_KEYS": "AKID=s3cret-value"})
    response = daemon.get("/function/peek")
    assert response.status == 200, response.text
    found = response.json()
    # The worker's own /proc (hidepid=2) does not list the daemon at all, not
    # even its command line; without it, environ and mem would be EACCES.
    assert found == {"environ": "No such file or directory", "mem": "No such file or directory",
                     "cmdline": "No such file or directory", "signal": "Operation not permitted"}


@pytest.fixture
def searchable_tmp() -> Iterator[Path]:
    """A directory every user may enter (pytest's own are 0700), removed after the test."""
    base = Path(tempfile.mkdtemp(prefix="faasd-test-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("runtime", ["python", "node"])
def test_code_the_run_as_user_cannot_read_fails_with_an_init_error_that_says_so(
        start_daemon, searchable_tmp, faasd_user, readable_install, runtime):
    """Python and Node take code they may not read for code that is not there
    ("No module named ..."); the init error says which user and which directory."""
    if runtime == "node" and shutil.which("node") is None:
        if os.environ.get("CI"):
            pytest.fail("node is not installed (CI requires it: .ci/run installs nodejs)")
        pytest.skip("node is not installed; apt-get install nodejs")
    private = searchable_tmp / "private"  # root's and 0700: faasd may not enter it
    private.mkdir(mode=0o700)
    functions = private / "functions"
    if runtime == "python":
        write_function(functions, "locked.py", "def handler(event, context):\n    return 1\n")
    else:
        write_function(functions, "locked.js", "exports.handler = async () => 1;\n")
    write_function(functions, "locked.toml", "timeout_s = 10\n")
    # Without mount namespaces nothing re-exposes the code under /tmp.
    daemon = start_daemon(functions, env={**readable_install, "FAASD_WORKERS_TMPFS": "false"})
    body, error = invoke(daemon, "locked")
    assert error == "Runtime.ImportModuleError", body
    message = body["errorMessage"]
    assert f"this worker runs as uid {faasd_user.pw_uid}, which cannot read {functions}" in message
    assert "ermission denied" in message  # EACCES, as each runtime spells it
    private.chmod(0o755)  # the operator's fix: the next worker loads the code
    wait_until(lambda: invoke(daemon, "locked")[1] is None, message="the code, once readable, to load")


def test_a_bootstrap_the_run_as_user_may_not_run_is_an_invalid_entrypoint(
        start_daemon, searchable_tmp, faasd_user, readable_install):
    """Root may run it, so the daemon's own check passes; the worker's user may not."""
    functions = searchable_tmp / "functions"
    bootstrap = write_function(functions, "rootonly/bootstrap", "#!/bin/sh\nexit 0\n")
    bootstrap.chmod(0o700)  # root's
    daemon = start_daemon(functions, env=readable_install)
    body, error = invoke(daemon, "rootonly")
    assert error == "Runtime.InvalidEntrypoint", body
    # Lambda's words for an init error it finds itself: the call's request id first.
    assert re.fullmatch(rf"RequestId: [0-9a-f-]+ Error: cannot run {re.escape(str(bootstrap))}: Permission denied",
                        body["errorMessage"]), body

# -- templates of run_as workers -----------------------------------------------------------

FORKED = """
import os, time
def handler(event, context):
    time.sleep(event.get("sleep", 0))
    open(os.path.join("/tmp", event["write"]), "w").write("x")
    open(os.path.join("/dev/shm", event["write"]), "w").write("x")
    return {"pid": os.getpid(), "uid": os.getuid(), "tmp": sorted(os.listdir("/tmp")),
            "shm": sorted(os.listdir("/dev/shm")), "tmpdir": os.environ["TMPDIR"]}
"""


@pytest.mark.parametrize("own_users", [False, True], ids=["shared-run_as", "function_users"])
def test_workers_forked_from_a_run_as_template_get_their_own_tmpfs_and_spares_live(
        start_daemon, functions_dir, faasd_user, readable_install, own_users):
    """A template that root started as run_as is undumpable; its forks must still be able to
    map their own user namespace for a tmpfs of their own (they used to die at once, and the
    template forked without end)."""
    write_function(functions_dir, "fn.toml", "timeout_s = 10\n")
    write_function(functions_dir, "fn.py", FORKED)
    env = dict(readable_install)
    if own_users:
        env["FAASD_WORKERS_FUNCTION_USERS"] = "%d-%d" % FUNCTION_USERS
    daemon = start_daemon(functions_dir, env=env)
    first = invoke(daemon, "fn", {"write": "first"})[0]
    template = wait_until(lambda: (daemon.function("fn")["template"] or {}).get("spares") == 1
                          and daemon.function("fn")["template"], message="the template and its spare")
    results = concurrent(daemon, "fn", [{"sleep": 2, "write": f"mine-{i}"} for i in range(3)])
    forked = [r for r in results if r["pid"] != first["pid"]]
    assert len(forked) >= 2, results
    for index, result in enumerate(results):
        assert [name for name in result["tmp"] if name.startswith("mine-")] == [f"mine-{index}"]
        assert [name for name in result["shm"] if name.startswith("mine-")] == [f"mine-{index}"]
        assert result["tmpdir"] == "/tmp" and result["uid"] == first["uid"]
    assert all(parent_of(r["pid"]) == template["pid"] for r in forked)
    # Each joined cgroups of its own as that user, inside its user namespace,
    # through the files the daemon opened for it (JOIN).
    hierarchies = len(own_groups(template["pid"]))
    for result in forked:
        groups = own_groups(result["pid"])
        assert len(groups) == hierarchies and {g.name for g in groups} == {f"fn-forked-{result['pid']}"}
    wait_until(lambda: daemon.function("fn")["template"]["spares"] >= 1, message="a new spare")
    time.sleep(0.5)
    assert "died before use" not in daemon.output()
    assert (first["uid"] == faasd_user.pw_uid) is not own_users


# -- a file trigger's bucket, for run_as workers --------------------------------------------

BUCKET_WRITER = """
import os
from pathlib import Path
from typing import Iterator

def handler(event, context):
    for record in event.get("Records", []):
        key = record["s3"]["object"]["key"]
        source = Path(record["faasd"]["path"])
        bucket = source.parents[len(Path(key).parts) - 1]
        (bucket / "out").mkdir(exist_ok=True)
        # As the thumbnail example does: whoever sees the output sees all of it.
        partial = bucket / "out" / ("." + source.name + ".partial")
        partial.write_text(source.read_text().upper())
        partial.replace(bucket / "out" / (source.name + ".done"))
    return {"uid": os.getuid()}
"""


def test_run_as_workers_write_their_outputs_into_a_bucket_in_the_data_dir(
        start_daemon, functions_dir, faasd_user, readable_install, tmp_path):
    """Root creates a file trigger's dir; a handler running as run_as writes its outputs
    beside the inputs (the thumbnail example); an operator's dir it cannot write is named."""
    write_function(functions_dir, "writer/handler.py", BUCKET_WRITER)
    write_function(functions_dir, "writer/function.toml",
                   '[[triggers]]\ntype = "file"\ndir = "bucket"\npatterns = ["in/*.txt"]\n')
    operators = tmp_path / "operators"
    operators.mkdir(mode=0o755)
    write_function(functions_dir, "elsewhere/handler.py", BUCKET_WRITER)
    write_function(functions_dir, "elsewhere/function.toml",
                   f'[[triggers]]\ntype = "file"\ndir = "{operators}"\npatterns = ["*.txt"]\n')
    daemon = start_daemon(functions_dir, env=readable_install)
    bucket = daemon.data / "bucket"
    wait_until(bucket.is_dir, message="the bucket dir")
    (bucket / "in").mkdir()
    (bucket / "in" / "a.txt").write_text("hello")
    done = bucket / "out" / "a.txt.done"
    wait_until(done.exists, timeout=20, message="the handler's output")
    assert done.read_text() == "HELLO"
    assert done.stat().st_uid == faasd_user.pw_uid
    assert bucket.stat().st_gid == faasd_user.pw_gid and bucket.stat().st_mode & 0o2070 == 0o2070
    assert invoke(daemon, "elsewhere")[0] == {"uid": faasd_user.pw_uid}
    wait_until(lambda: f"cannot write its file trigger's dir {operators}" in daemon.output(),
               message="the warning about the operator's dir")
    assert operators.stat().st_mode & 0o777 == 0o755  # not faasd's to change


# -- one user per function ----------------------------------------------------------------

KEEPER = "export const handler = async () => ({ok: true});\n"
SNOOP = """
import os

def handler(event, context):
    needle = event["needle"].encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as environ:
                    if needle in environ.read():
                        found.append(int(entry))
            except OSError:
                pass
    try:
        with open(f"/proc/{event['pid']}/environ", "rb") as environ:
            environ.read()
        read = "allowed"
    except OSError as exc:
        read = exc.strerror
    visible = {name: os.path.exists(f"/proc/{event[name]}") for name in ("pid", "daemon")}
    try:
        os.kill(event["pid"], 0)
        signal = "allowed"
    except OSError as exc:
        signal = exc.strerror
    return {"found": found, "read": read, "signal": signal, "uid": os.getuid(), "gid": os.getgid(),
            "visible": visible, "self": os.path.exists(f"/proc/{os.getpid()}/status")}
"""
FUNCTION_USERS = (3_800_000_000, 3_800_000_099)  # no host has users this high


def _process_ids(pid: int) -> tuple[int, int]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["Uid"].split()[1]), int(status["Gid"].split()[1])


@pytest.mark.parametrize("own_users", [False, True], ids=["shared-run_as", "function_users"])
def test_with_function_users_no_function_can_read_or_signal_another_functions_worker(
        start_daemon, functions_dir, faasd_user, readable_install, own_users):
    """A Node worker execs node after dropping to its user, which leaves it dumpable: with
    one shared run_as user the code of another function reads its environment (the limit
    the README states); with function_users it cannot, nor signal it."""
    if shutil.which("node") is None:
        pytest.fail("node is missing: .ci/run installs the Debian package nodejs")
    secret = f"keeper-secret-{os.getpid()}-{own_users}"
    write_function(functions_dir, "keeper.mjs", KEEPER)
    write_function(functions_dir, "keeper.toml", f'[env]\nSECRET = "{secret}"\n')
    write_function(functions_dir, "snoop.py", SNOOP)
    env = dict(readable_install)
    if own_users:
        env["FAASD_WORKERS_FUNCTION_USERS"] = "%d-%d" % FUNCTION_USERS
    daemon = start_daemon(functions_dir, env=env)
    assert invoke(daemon, "keeper") == ({"ok": True}, None)
    keeper = sorted(pids_with_env("SECRET", secret))
    assert keeper, "the keeper's worker holds its secret in its environment"
    result, error = invoke(daemon, "snoop", {"needle": secret, "pid": keeper[0], "daemon": daemon.process.pid})
    assert error is None, result
    keeper_ids = _process_ids(keeper[0])
    isolation = daemon.get("/system/info").json()["isolation"]
    # Each worker's own /proc (hidepid=2) shows it no process of another user.
    assert result["self"] is True and result["visible"]["daemon"] is False
    assert isolation["process_list"]["active"] is True
    if own_users:
        # The keeper's worker is not even listed: its /proc entry does not exist.
        assert result["found"] == [] and result["read"] == "No such file or directory"
        assert result["visible"]["pid"] is False
        assert result["signal"] == "Operation not permitted"
        assert "another function's" in isolation["process_list"]["note"]
        uids = {keeper_ids[0], result["uid"]}
        assert len(uids) == 2 and all(FUNCTION_USERS[0] <= uid <= FUNCTION_USERS[1] for uid in uids)
        # /system/functions/NAME says which uid each worker runs as.
        assert {w["uid"] for w in daemon.workers("keeper")} == {keeper_ids[0]}
        assert {w["uid"] for w in daemon.workers("snoop")} == {result["uid"]}
        assert keeper_ids[1] == result["gid"] == faasd_user.pw_gid  # in run_as's group
        assert isolation["function_users"]["active"] is True
    else:
        assert set(result["found"]) & set(keeper) and result["read"] == "allowed"
        assert result["visible"]["pid"] is True
        assert result["signal"] == "allowed"
        assert "function_users hides those too" in isolation["process_list"]["note"]
        assert keeper_ids == (result["uid"], result["gid"]) == (faasd_user.pw_uid, faasd_user.pw_gid)
        assert isolation["function_users"]["active"] is False
        assert "function_users" in isolation["function_users"]["note"]
    still_serving(daemon)


API_PEEK = """
import json, os, urllib.error, urllib.request

def handler(event, context):
    url = os.environ["API"] + "/2015-03-31/functions/keeper"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return {"status": response.status,
                    "env": json.load(response)["Configuration"]["Environment"]["Variables"]}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "env": None}
"""


@pytest.mark.parametrize("keys", [False, True], ids=["open-api", "auth-keys"])
def test_function_users_keep_secrets_apart_only_while_auth_keys_guard_the_api(
        start_daemon, functions_dir, readable_install, keys):
    """Own uids keep functions out of each other's processes, not out of the API on
    loopback: without [auth] keys faasd says at start and in /system/info that any
    function can read another's [env] through GetFunction."""
    port = free_port()
    write_function(functions_dir, "keeper.py", OK)
    write_function(functions_dir, "keeper.toml", '[env]\nSECRET = "kept-apart"\n')
    write_function(functions_dir, "peek.py", API_PEEK)
    write_function(functions_dir, "peek.toml", f'[env]\nAPI = "http://127.0.0.1:{port}"\n')
    env = {**readable_install, "FAASD_WORKERS_FUNCTION_USERS": "%d-%d" % FUNCTION_USERS}
    if keys:
        env["FAASD_AUTH_KEYS"] = "AKID=s3cret-value"
    daemon = start_daemon(functions_dir, port=port, env=env)
    response = daemon.get("/function/peek")  # an http trigger: public either way
    assert response.status == 200, response.text
    found = response.json()
    bearer = {"Authorization": "Bearer s3cret-value"} if keys else {}
    isolation = http("GET", daemon.url + "/system/info", headers=bearer).json()["isolation"]
    entry = isolation["api_closed_to_workers"]
    warning = "but no [auth] keys guard the API"
    if keys:
        assert found == {"status": 403, "env": None}
        assert entry["active"] is True
        assert warning not in daemon.output()
    else:
        assert found == {"status": 200, "env": {"SECRET": "kept-apart"}}
        assert entry["active"] is False
        assert "read another's [env] (GetFunction)" in entry["note"]
        assert "set [auth] keys" in entry["note"]
        said = [line for line in daemon.output().splitlines() if warning in line]
        assert len(said) == 1 and "each function runs as a uid of its own" in said[0], daemon.output()
        assert "set [auth] keys to keep functions' secrets apart" in said[0]
    assert isolation["function_users"]["active"] is True


SETTINGS_PEEK = """
import os

def handler(event, context):
    found = {}
    for name in ("open.toml", "closed.toml"):
        try:
            with open(os.path.join(os.environ["LAMBDA_TASK_ROOT"], name)) as settings:
                found[name] = settings.read()
        except OSError as exc:
            found[name] = exc.strerror
    return found
"""


def test_with_function_users_a_settings_file_every_function_can_read_is_warned_of(
        start_daemon, functions_dir, readable_install):
    """Code stays readable to every function's user, and so, by default, do the settings
    files beside it: another function reads their [env]. faasd names each such file
    holding [env] values; one only faasd (root) reads keeps its secrets."""
    for name in ("open", "closed", "plain"):
        write_function(functions_dir, f"{name}.py", OK)
    write_function(functions_dir, "open.toml", '[env]\nSECRET = "open-secret"\n')
    write_function(functions_dir, "closed.toml", '[env]\nSECRET = "closed-secret"\n')
    write_function(functions_dir, "plain.toml", "memory_mb = 256\n")  # no [env]: nothing to keep
    for name in ("open", "closed", "plain"):
        (functions_dir / f"{name}.toml").chmod(0o600 if name == "closed" else 0o644)
    write_function(functions_dir, "peek.py", SETTINGS_PEEK)
    env = {**readable_install, "FAASD_WORKERS_FUNCTION_USERS": "%d-%d" % FUNCTION_USERS}
    daemon = start_daemon(functions_dir, env=env)
    found, error = invoke(daemon, "peek")
    assert error is None, found
    assert "open-secret" in found["open.toml"] and found["closed.toml"] == "Permission denied"
    warned = [line for line in daemon.output().splitlines() if "holds [env] values" in line]
    assert len(warned) == 1, warned
    assert f"function open: its settings file {functions_dir / 'open.toml'} holds" in warned[0]
    assert "(mode 0644)" in warned[0] and "chmod 600 it" in warned[0]
    assert invoke(daemon, "closed") == invoke(daemon, "open")  # faasd reads both
    still_serving(daemon)


def test_an_interpreter_the_function_users_cannot_read_fails_python_inits_and_says_why(
        start_daemon, functions_dir, faasd_user, readable_install):
    """Without [workers] python, workers run faasd's own interpreter: where its library is out of
    their reach (a virtual environment under /root), the user switch still holds for Node
    workers, and each Python init fails naming the directory and the fix."""
    stdlib = os.path.dirname(os.__file__)
    try:
        readable = _runs_as(faasd_user, [sys.executable, "-I", "-c", "import decimal"]).returncode == 0
    except OSError:
        readable = False
    if readable:
        pytest.skip(f"the faasd user can read {sys.executable}'s library: the case needs one it "
                    "cannot (faasd run from a virtual environment under /root)")
    if shutil.which("node") is None:
        pytest.fail("node is missing: .ci/run installs the Debian package nodejs")
    write_function(functions_dir, "py.py", OK)
    write_function(functions_dir, "js.js", "exports.handler = async () => process.getuid();\n")
    env = {"PYTHONPATH": readable_install["PYTHONPATH"], "FAASD_WORKERS_RUN_AS": "faasd",
           "FAASD_WORKERS_FUNCTION_USERS": "%d-%d" % FUNCTION_USERS}
    daemon = start_daemon(functions_dir, env=env)
    uid, error = invoke(daemon, "js")
    assert error is None and FUNCTION_USERS[0] <= uid <= FUNCTION_USERS[1], uid
    body, error = invoke(daemon, "py")
    assert error == "Sandbox.SetupFailed", body
    assert re.match(rf"this worker runs as uid (\d+), which cannot read {re.escape(stdlib)}, the "
                    rf"standard library of {re.escape(sys.executable)}: Permission denied; set "
                    r"\[workers\] python to an interpreter", body["errorMessage"]), body
    assert daemon.function("py")["init_error"]["errorType"] == "Sandbox.SetupFailed"
    isolation = daemon.get("/system/info").json()["isolation"]
    for name in ("run_as", "function_users"):
        assert isolation[name]["active"] is True, isolation[name]
        assert "Python workers as uid" in isolation[name]["note"], isolation[name]
    assert "run_as (" not in daemon.output() and "function_users (" not in daemon.output()
    assert f"Python workers as uid {FUNCTION_USERS[0]}" in daemon.output()


def test_a_function_past_the_end_of_function_users_fails_its_init_and_the_rest_runs(
        start_daemon, functions_dir, readable_install):
    write_function(functions_dir, "first.py", OK)
    write_function(functions_dir, "second.py", OK)
    daemon = start_daemon(functions_dir, env={**readable_install, "FAASD_WORKERS_FUNCTION_USERS":
                                              "%d-%d" % (FUNCTION_USERS[0], FUNCTION_USERS[0])})
    assert invoke(daemon, "first") == ({"ok": True}, None)
    result, error = invoke(daemon, "second")
    assert error == "Sandbox.SetupFailed"
    assert "has no uid left for second" in result["errorMessage"], result
    assert invoke(daemon, "first") == ({"ok": True}, None)


def test_function_users_that_hold_a_hosts_user_or_lack_run_as_are_refused(
        start_daemon, functions_dir, readable_install):
    from faasd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="function_users needs run_as"):
        load_config(None, env={"FAASD_WORKERS_FUNCTION_USERS": "200000-200100"})
    with pytest.raises(ConfigError, match="is not valid: expected a range of uids"):
        load_config(None, env={"FAASD_WORKERS_FUNCTION_USERS": "lots", "FAASD_WORKERS_RUN_AS": "x"})
    nobody = pwd.getpwnam("nobody").pw_uid
    clashing = {**readable_install, "FAASD_WORKERS_FUNCTION_USERS": f"{nobody - 10}-{nobody + 10}"}
    said = f"holds uids of this host's users (nobody ({nobody}))"
    check = subprocess.run([sys.executable, "-m", "faasd", "check", "--functions", str(functions_dir)],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, **clashing, "PYTHONPATH": str(ROOT)})
    assert check.returncode == 1 and "config: error: [workers] function_users" in check.stdout
    assert said in check.stdout
    daemon = start_daemon(functions_dir, wait=False, env=clashing)
    assert daemon.process.wait(timeout=30) == 1
    assert said in daemon.output()


@pytest.mark.parametrize("key, value, said", [
    ("RUN_AS", "faasd-no-such-user", "[workers] run_as = 'faasd-no-such-user': no such user"),
    ("PYTHON", "/no/such/python3", "[workers] python = '/no/such/python3': no such executable"),
], ids=["run_as", "python"])
def test_a_run_as_user_or_python_that_does_not_exist_is_refused(start_daemon, functions_dir, key, value, said):
    """A mistyped run_as must not leave function code running as root, nor a mistyped
    python pass for a host without mount namespaces (and leave every worker without
    them): `faasd check` reports it and `faasd serve`, started as root, refuses to start."""
    needs_root()
    write_function(functions_dir, "whoami.py", "import os\ndef handler(e, c):\n    return os.getuid()\n")
    mistyped = {f"FAASD_WORKERS_{key}": value}
    check = subprocess.run([sys.executable, "-m", "faasd", "check", "--functions", str(functions_dir)],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, **mistyped, "PYTHONPATH": str(ROOT)})
    assert check.returncode == 1 and f"config: error: {said}" in check.stdout, check.stdout
    daemon = start_daemon(functions_dir, wait=False, env=mistyped)
    assert daemon.process.wait(timeout=30) == 1, daemon.output()
    assert f"cannot start: {said}" in daemon.output()


# -- the whole daemon, unprivileged -----------------------------------------------------------

def _distributions(name: str) -> dict[str, importlib.metadata.Distribution]:
    """`name`'s installed distribution and every one it needs, on this platform."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [name]
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in found:
            continue
        found[key] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


@pytest.fixture(scope="module")
def unprivileged_install(readable_install) -> dict[str, str]:
    """readable_install plus faasd's dependencies, for a daemon that is not root."""
    base = Path(readable_install["PYTHONPATH"])
    site = base / "site"
    for key, dist in _distributions("faasd").items():
        if key == "faasd":
            continue
        for file in dist.files or []:
            source = Path(dist.locate_file(file))
            if source.is_file() and "__pycache__" not in file.parts and not str(file).startswith(".."):
                (site / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, site / file)
    for path in site.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    os.chmod(site, 0o755)
    return {**readable_install, "PYTHONPATH": f"{base}{os.pathsep}{site}"}


def test_an_unprivileged_daemon_serves_and_says_which_isolation_it_could_not_use(
        start_daemon, faasd_user, unprivileged_install):
    home = Path(tempfile.mkdtemp(prefix="faasd-unprivileged-", dir="/tmp"))
    try:
        os.chmod(home, 0o755)
        functions, data = home / "functions", home / "data"
        write_function(functions, "hello.py", "import os\ndef handler(e, c):\n    return os.getuid()\n")
        data.mkdir()
        for path in (home, *home.rglob("*")):
            os.chown(path, faasd_user.pw_uid, faasd_user.pw_gid)
        # Started from a working directory that user may not read, as `runuser` from /root is.
        daemon = start_daemon(functions, data=data, python=unprivileged_install["FAASD_WORKERS_PYTHON"],
                              prefix=_as_user(faasd_user), env=unprivileged_install)
        status = Path(f"/proc/{daemon.process.pid}/status").read_text()
        assert f"Uid:\t{faasd_user.pw_uid}\t" in status
        response = daemon.invoke("hello")
        assert response.status == 200 and response.json() == faasd_user.pw_uid, response.text

        output = daemon.output()
        assert "[workers] run_as = 'faasd' is not used: it needs faasd started as root" in output
        isolation = daemon.get("/system/info").json()["isolation"]
        assert isolation["run_as"]["active"] is False
        # Every protection it could not use has one line of its own, with the
        # reason /system/info gives, and no other protection has one.
        said = [line.split("isolation not in use: ", 1)[1] for line in output.splitlines()
                if "isolation not in use: " in line]
        missing = {name for name, entry in isolation.items() if not entry["active"]
                   and name not in {"pid_namespace", "network_namespace", "function_users", "api_auth",
                                    "api_closed_to_workers"}}
        assert missing, isolation
        assert sorted(said) == sorted(f"{name}: {isolation[name]['note']}" for name in missing), output
    finally:
        shutil.rmtree(home, ignore_errors=True)


# The cgroup hierarchies an unprivileged daemon finds, each in a mount namespace of its own.
_HIERARCHIES = {
    "cgroup v2": "mount -t cgroup2 none /sys/fs/cgroup",
    "cgroup v1": ("mount -t tmpfs -o size=4k none /sys/fs/cgroup && mkdir /sys/fs/cgroup/memory && "
                  "mount -t cgroup -o memory none /sys/fs/cgroup/memory"),
}


@pytest.mark.parametrize("hierarchy, fix", [
    ("cgroup v2", "for the kernel to enforce them, run faasd under systemd with Delegate=yes "
                  "(systemd/faasd.service has Delegate=memory pids), which gives its cgroup the "
                  "memory controller"),
    ("cgroup v1", "for the kernel to enforce them, start faasd as root: on cgroup v1 only root may "
                  "create memory cgroups, and systemd's Delegate= does not hand them over (on a "
                  "cgroup v2 host it does)"),
])
def test_an_unprivileged_daemon_without_memory_cgroups_says_how_to_get_them(
        start_daemon, faasd_user, unprivileged_install, hierarchy, fix):
    home = Path(tempfile.mkdtemp(prefix="faasd-monitor-", dir="/tmp"))
    try:
        os.chmod(home, 0o755)
        functions, data = home / "functions", home / "data"
        functions.mkdir()
        data.mkdir()
        os.chown(data, faasd_user.pw_uid, faasd_user.pw_gid)
        prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                  f"set -e; {_HIERARCHIES[hierarchy]}; cd /root; exec setpriv --reuid={faasd_user.pw_uid} "
                  f'--regid={faasd_user.pw_gid} --clear-groups -- "$@"', "sh"]
        daemon = start_daemon(functions, data=data, python=unprivileged_install["FAASD_WORKERS_PYTHON"],
                              prefix=prefix, env=unprivileged_install)
        assert daemon.get("/system/info").json()["isolation"]["memory_limit"]["mode"] == "monitor"
        warning = next((line for line in daemon.output().splitlines()
                        if "memory limits by watching each worker's memory" in line), "")
        assert warning.endswith(f"; {fix}"), daemon.output()
        assert daemon.get("/system/info").json()["isolation"]["memory_limit"]["note"].endswith(f"; {fix}")
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _as_user(user: pwd.struct_passwd) -> list[str]:
    """A prefix that runs a command as `user`, from a working directory it may not read."""
    return ["sh", "-c", f'cd /root && exec setpriv --reuid={user.pw_uid} --regid={user.pw_gid} '
                        '--clear-groups -- "$@"', "sh"]


def test_functions_an_unprivileged_daemon_may_not_read_stop_serve_and_check_saying_how_to_fix_it(
        start_daemon, faasd_user, unprivileged_install):
    home = Path(tempfile.mkdtemp(prefix="faasd-unreadable-", dir="/tmp"))
    try:
        os.chmod(home, 0o755)
        functions, data = home / "functions", home / "data"
        write_function(functions, "hello.py", OK)
        os.chmod(functions, 0o700)  # root's, as a copy made by root without care is
        data.mkdir()
        os.chown(data, faasd_user.pw_uid, faasd_user.pw_gid)
        said = (f"{functions} cannot be read by uid {faasd_user.pw_uid} (faasd), whom "
                "faasd runs as: make it and every directory above it readable by that user, or set "
                "[paths] functions (or --functions) to the directory that holds them")
        daemon = start_daemon(functions, data=data, wait=False, prefix=_as_user(faasd_user),
                              python=unprivileged_install["FAASD_WORKERS_PYTHON"], env=unprivileged_install)
        assert f"cannot start: functions: {said}" in daemon.refused(), daemon.output()

        check = _runs_as(faasd_user, [unprivileged_install["FAASD_WORKERS_PYTHON"], "-m", "faasd", "check",
                                      "--functions", str(functions)],
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": unprivileged_install["PYTHONPATH"]},
                         cwd="/")
        assert check.returncode == 1 and f"functions: error: {said}" in check.stdout, check.stdout
        assert "Traceback" not in check.stderr, check.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_a_data_dir_an_unprivileged_daemon_may_not_write_stops_it_saying_how_to_fix_it(
        start_daemon, faasd_user, unprivileged_install):
    """A data dir a run as root left (its queue and logs root's), or one the user may not
    create, is refused at start with the command that fixes it; given to the user, it serves."""
    home = Path(tempfile.mkdtemp(prefix="faasd-data-", dir="/tmp"))
    try:
        os.chmod(home, 0o755)
        functions, data = home / "functions", home / "data"
        write_function(functions, "hello.py", OK)
        root_run = start_daemon(functions, data=data)  # as root: its files are root's
        assert root_run.invoke("hello").status == 200
        assert root_run.stop() == 0
        assert (data / "queue.db").stat().st_uid == 0
        os.chmod(data, 0o777)  # the dir itself the user may write: its files still refuse it

        def refused(data_dir: Path) -> str:
            daemon = start_daemon(functions, data=data_dir, wait=False, prefix=_as_user(faasd_user),
                                  python=unprivileged_install["FAASD_WORKERS_PYTHON"],
                                  env=unprivileged_install)
            return daemon.refused()

        user = f"uid {faasd_user.pw_uid} (faasd)"
        output = refused(data)
        assert re.search(rf"cannot start: data: {re.escape(str(data))}/\S+ \(and \d+ more\) cannot be "
                         rf"written; faasd runs as {re.escape(user)}: give it the data dir "
                         rf"\(chown -R faasd: {re.escape(str(data))}\), or set \[paths\] data", output), output

        locked = home / "locked"
        locked.mkdir(mode=0o755)  # root's: the user cannot create its data dir in it
        output = refused(locked / "data")
        assert (f"cannot start: data: cannot create {locked / 'data'} (Permission denied); faasd runs "
                f"as {user}: create the data dir for it (install -d -o faasd {locked / 'data'})") in output

        subprocess.run(["chown", "-R", "faasd:", str(data)], check=True)
        daemon = start_daemon(functions, data=data, prefix=_as_user(faasd_user),
                              python=unprivileged_install["FAASD_WORKERS_PYTHON"], env=unprivileged_install)
        assert daemon.invoke("hello").json() == {"ok": True}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_a_privileged_port_stops_an_unprivileged_daemon_saying_how_to_fix_it(
        start_daemon, faasd_user, unprivileged_install, tmp_path):
    first_free = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if first_free == 0:
        pytest.skip("net.ipv4.ip_unprivileged_port_start = 0: every port is open to every user")
    home = Path(tempfile.mkdtemp(prefix="faasd-port-", dir="/tmp"))
    try:
        os.chmod(home, 0o755)
        (home / "functions").mkdir()
        (home / "data").mkdir()
        for path in (home, *home.iterdir()):
            os.chown(path, faasd_user.pw_uid, faasd_user.pw_gid)
        daemon = start_daemon(home / "functions", data=home / "data", port=first_free - 1, wait=False,
                              prefix=_as_user(faasd_user), env=unprivileged_install,
                              python=unprivileged_install["FAASD_WORKERS_PYTHON"])
        assert daemon.process.wait(timeout=30) == 1
        assert (f"cannot start: cannot listen on 127.0.0.1 port {first_free - 1}: Permission denied: "
                "a port below 1024 needs root or CAP_NET_BIND_SERVICE; set [server] port (or --port) "
                "to 1024 or above, or let systemd hold the port (systemd/faasd.socket)") in daemon.output()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_a_config_file_the_unprivileged_daemon_may_not_read_is_refused_saying_how_to_fix_it(
        faasd_user, unprivileged_install, tmp_path):
    config = tmp_path / "faasd.toml"
    config.write_text('[auth]\nkeys = { AKIDEXAMPLE = "secret" }\n')
    os.chmod(config, 0o600)  # root's alone, as `install` without -g leaves it
    os.chmod(tmp_path, 0o755)
    said = (f"{config}: cannot be read by uid {faasd_user.pw_uid} (faasd), whom faasd runs as: let "
            f"its group read it (chgrp faasd {config} && chmod 640 {config})")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": unprivileged_install["PYTHONPATH"]}
    python = unprivileged_install["FAASD_WORKERS_PYTHON"]
    serve = _runs_as(faasd_user, [python, "-m", "faasd", "--config", str(config), "serve"], env=env, cwd="/")
    assert serve.returncode == 2 and serve.stderr.strip() == f"faasd: {said}", serve.stderr
    check = _runs_as(faasd_user, [python, "-m", "faasd", "--config", str(config), "check"], env=env, cwd="/")
    assert check.returncode == 1 and check.stdout.strip() == f"config: error: {said}", check.stdout


def test_faasd_new_in_functions_its_user_may_not_write_says_so_without_a_traceback(
        faasd_user, unprivileged_install):
    home = Path(tempfile.mkdtemp(prefix="faasd-new-", dir="/tmp"))
    try:
        os.chmod(home, 0o755)
        functions = home / "functions"
        functions.mkdir(mode=0o755)  # root's, as the service's are
        done = _runs_as(faasd_user, [unprivileged_install["FAASD_WORKERS_PYTHON"], "-m", "faasd", "new",
                                     "fresh", "--functions", str(functions)],
                        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": unprivileged_install["PYTHONPATH"]},
                        cwd="/")
        assert done.returncode == 1 and done.stderr.strip() == (
            f"faasd: cannot write in {functions} (Permission denied) as uid {faasd_user.pw_uid} (faasd): "
            "run `faasd new` as a user who may write there (the service's functions are root's)"), done.stderr
        assert list(functions.iterdir()) == []
    finally:
        shutil.rmtree(home, ignore_errors=True)


# -- the worker half alone, unprivileged ---------------------------------------------------

def test_an_unprivileged_worker_isolates_itself_in_a_user_namespace(faasd_user, readable_install):
    """As a daemon that is not root does it: a user namespace of the worker's own."""
    base = Path(readable_install["PYTHONPATH"])
    code = Path(tempfile.mkdtemp(prefix="faasd-code-", dir="/tmp"))
    try:
        os.chmod(code, 0o755)
        (code / "handler.py").write_text("x = 1\n")
        os.chmod(code / "handler.py", 0o666)  # writable by anyone, on the host
        plan = {"mount": True, "userns": True, "tmp_mb": 4, "tmp_paths": ["/tmp", "/var/tmp"],
                "read_only": [str(code), str(base / "faasd")],
                "visible": [str(code), str(base / "faasd")],
                "hide": [], "rlimits": {"NOFILE": 256, "CORE": 0, "FSIZE": 4 * 1024 * 1024},
                "chdir": str(code), "tmpdir": "/tmp"}
        script = ("set -u; id -u; df -k /tmp | tail -1; "
                  "echo x >> handler.py 2>/dev/null && echo code-writable || echo code-read-only; "
                  "dd if=/dev/zero of=/tmp/big bs=1M count=16 2>/dev/null; ls -l /tmp/big | awk '{print $5}'; "
                  "ulimit -n; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status")
        done = _runs_as(faasd_user, [readable_install["FAASD_WORKERS_PYTHON"], "-I", "-S",
                                     str(base / "faasd" / "runtimes" / "sandbox_exec.py"),
                                     "/bin/sh", "-c", script],
                        env={"PATH": "/usr/bin:/bin", "_FAASD_SANDBOX": json.dumps(plan)})
        if "user namespace" in done.stderr and "Operation not permitted" in done.stderr:
            pytest.skip(f"this kernel refuses unprivileged user namespaces: {done.stderr.strip()}")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.split("\n")
        assert lines[0] == str(faasd_user.pw_uid)
        assert lines[1].split()[1] == "4096", lines[1]  # a 4 MB tmpfs at /tmp
        assert lines[2] == "code-read-only"
        assert int(lines[3]) <= 4 * 1024 * 1024
        assert lines[4] == "256"
        assert "CapEff:\t0000000000000000" in done.stdout and "NoNewPrivs:\t1" in done.stdout
        assert (code / "handler.py").read_text() == "x = 1\n"
    finally:
        shutil.rmtree(code, ignore_errors=True)


def test_a_plan_that_cannot_be_carried_out_stops_the_worker_before_user_code(tmp_path):
    needs_root()
    plan = {"mount": False, "rlimits": {}, "cgroups": [str(tmp_path / "no" / "such" / "cgroup.procs")]}
    marker = tmp_path / "ran"
    done = subprocess.run([sys.executable, "-I", "-S", str(ROOT / "faasd" / "runtimes" / "sandbox_exec.py"),
                           "/bin/touch", str(marker)], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "_FAASD_SANDBOX": json.dumps(plan)})
    assert done.returncode == 70
    assert "faasd could not isolate this worker: cannot join cgroup" in done.stderr
    assert not marker.exists()
