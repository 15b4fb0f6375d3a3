"""Unit tests of faasd.sandbox: finding a worker's processes by its mount namespace, and
telling what a template's init wrote to its /tmp from what faasd put there."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

import pytest

from faasd.sandbox import MountNamespace

SYS_EXIT = {"x86_64": 60, "aarch64": 93}.get(platform.machine())

# In a mount namespace of its own, a process whose main thread exits while
# another thread runs on (what pthread_exit() in main does): its /proc/PID
# entry stays, as a zombie's, with no namespace of its own to show.
HEADLESS = f"""
import ctypes, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x00020000) != 0 and libc.unshare(0x10000000 | 0x00020000) != 0:
    sys.exit(77)  # no mount namespace may be made here
threading.Thread(target=time.sleep, args=(60,)).start()
libc.syscall({SYS_EXIT}, 0)
"""


def test_a_process_whose_main_thread_has_exited_is_still_found_and_killed():
    if SYS_EXIT is None:
        pytest.skip(f"no exit system call number known for {platform.machine()}")
    process = subprocess.Popen([sys.executable, "-c", HEADLESS], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None or process.returncode == 77, process.returncode
            if process.returncode == 77:
                pytest.skip("mount namespaces cannot be made here")
            tasks = os.listdir(f"/proc/{process.pid}/task")
            with open(f"/proc/{process.pid}/stat", "rb") as stat:
                state = stat.read().rsplit(b")", 1)[1].split()[0]
            if state == b"Z" and len(tasks) == 2:
                break
            assert time.monotonic() < deadline, "the main thread never exited"
            time.sleep(0.01)
        thread = next(tid for tid in tasks if tid != str(process.pid))
        fd = os.open(f"/proc/{process.pid}/task/{thread}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        held = os.fstat(fd)
        namespace = MountNamespace(fd, (held.st_dev, held.st_ino))
        try:
            assert namespace.pids() == [process.pid]
            namespace.kill_all()
            assert process.wait(5) == -9
        finally:
            namespace.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_what_an_init_wrote_to_tmp_is_told_apart_from_the_paths_kept_reachable_there(tmp_path, monkeypatch):
    from faasd import sandbox

    # The functions dir under the host's /tmp, bound into the worker's own
    # /tmp at the same path: its mount point and the directories leading to
    # it are faasd's, not the init's.
    kept = tmp_path / "pytest-1" / "functions"
    kept.mkdir(parents=True)
    (kept / "fn.py").write_text("")
    monkeypatch.setattr(sandbox, "_tmp", {"path": str(tmp_path), "keep": [str(kept)], "bound": []})
    assert sandbox.scratch_written() == []
    (tmp_path / "model.bin").write_bytes(b"x")
    (tmp_path / "pytest-1" / "cache").mkdir()
    assert sandbox.scratch_written() == [str(tmp_path / "model.bin"), str(tmp_path / "pytest-1" / "cache")]
