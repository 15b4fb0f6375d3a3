"""Unit tests of faasd.limits: cgroup trees on a plain directory tree, and the monitor's ProcessTree
on real processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

import pytest

from support import wait_until

from faasd.limits import MB, ProcessTree, cgroup_name, sweep_stale_cgroups
from faasd.sandbox import namespace_key


def test_stale_trees_of_dead_daemons_of_this_data_dir_are_removed_and_the_rest_kept(tmp_path):
    name, elsewhere = cgroup_name(tmp_path / "data"), cgroup_name(tmp_path / "other-data")
    assert name.startswith("faasd-") and name != elsewhere
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f"{name}-{dead}" / "fn-1" / "inner").mkdir(parents=True)
    (tmp_path / f"{name}-{os.getpid()}" / "fn-2").mkdir(parents=True)
    (tmp_path / f"{elsewhere}-{dead}" / "fn-4").mkdir(parents=True)  # another service's to sweep
    (tmp_path / "other-123").mkdir()
    (tmp_path / f"faasd-{dead}" / "fn-5").mkdir(parents=True)  # named before the tag: anyone's
    (tmp_path / f"faasd-{os.getpid()}").mkdir()  # a live daemon's, named before the tag
    leftover = subprocess.Popen(["sleep", "60"])  # in a dead daemon's group: killed
    kept = subprocess.Popen(["sleep", "60"])  # in a live daemon's group: left alone
    theirs = subprocess.Popen(["sleep", "60"])  # in another data dir's dead daemon's: left alone
    try:
        busy = tmp_path / f"{name}-{dead}0"
        (busy / "fn-3").mkdir(parents=True)
        (busy / "fn-3" / "cgroup.procs").write_text(f"{leftover.pid}\n")
        (tmp_path / f"{name}-{os.getpid()}" / "fn-2" / "cgroup.procs").write_text(f"{kept.pid}\n")
        (tmp_path / f"{elsewhere}-{dead}" / "fn-4" / "cgroup.procs").write_text(f"{theirs.pid}\n")
        # A plain directory keeps its cgroup.procs file: the busy tree stays, its process killed.
        assert sweep_stale_cgroups(tmp_path, name) == 5
        assert leftover.wait(1) == -signal.SIGKILL
        assert kept.poll() is None and theirs.poll() is None
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [f"{name}-{os.getpid()}", f"{elsewhere}-{dead}", "other-123", f"{name}-{dead}0",
             f"faasd-{os.getpid()}"])
    finally:
        for process in (leftover, kept, theirs):
            process.kill()
            process.wait()


# A program whose main thread exits (pthread_exit in main) while another thread
# holds 60 MB and has started a child that holds 30 MB. Its /proc/PID entries
# then read as a zombie's: no memory, no memory map, no namespace.
HEADLESS = r"""
import ctypes, subprocess, sys, threading, time

def hold():
    held = b"x" * (60 << 20)
    child = subprocess.Popen([sys.executable, "-c", "held = b'y' * (30 << 20); print(flush=True); "
                              "import time; time.sleep(60)"], stdout=subprocess.PIPE)
    child.stdout.readline()
    print(child.pid, flush=True)
    time.sleep(60)

print("up", flush=True)
sys.stdin.readline()  # go: the test has listed /proc by now
threading.Thread(target=hold).start()
ctypes.CDLL(None).pthread_exit(None)
"""


class Headless:
    """HEADLESS, running: `go()` lets it start its thread and child and waits for its main thread to exit."""

    def __init__(self, prefix: tuple[str, ...]) -> None:
        self.process = subprocess.Popen([*prefix, sys.executable, "-c", HEADLESS], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.pid = self.process.pid
        assert self.process.stdout.readline() == "up\n"

    def go(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip().isdigit()  # its child's pid: it holds its memory
        wait_until(lambda: _state(self.pid) == "Z", message="its main thread to exit")


@contextmanager
def headless(prefix: tuple[str, ...] = ()) -> Iterator[Headless]:
    program = Headless(prefix)
    try:
        yield program
    finally:
        os.killpg(program.pid, signal.SIGKILL)  # its child is in its process group
        program.process.wait()


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(line.split()[1] for line in status if line.startswith("State:"))
    except OSError:
        return None


def test_a_worker_whose_main_thread_has_exited_counts_what_its_threads_and_children_hold():
    with headless() as worker:
        tree = ProcessTree(worker.pid)
        worker.go()
        resident, peak, processes = tree.sample()
        assert processes == 2  # it, and the child one of its threads started
        assert resident >= 90 * MB and peak >= 60 * MB, (resident // MB, peak // MB)
        assert tree.pss_bytes() >= 90 * MB
        assert tree.pss_bytes(frozenset({os.stat("/dev/shm").st_dev})) >= 90 * MB  # read from smaps


def test_a_process_whose_main_thread_has_exited_is_found_by_its_namespace_and_counts():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a mount namespace")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        tree = ProcessTree(sleeper.pid)
        # Neither its child nor in its process group (setsid): a process of the
        # worker only its mount namespace names, as what `setsid` starts after its parent exits.
        with headless(("unshare", "--mount", "--propagation", "private", "--")) as process:
            tree.namespace = namespace_key(process.pid)
            assert tree.namespace != namespace_key(os.getpid())
            process.go()
            resident, _, processes = tree.sample()
            assert processes == 3, processes
            assert resident >= 90 * MB, resident // MB
            assert tree.pss_bytes() >= 90 * MB
    finally:
        sleeper.kill()
        sleeper.wait()
