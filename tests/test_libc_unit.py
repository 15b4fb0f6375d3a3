"""faasd/libc.py: libc calls through _ctypes, as a worker makes them before user code."""

import errno
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from faasd import libc

ROOT = Path(__file__).resolve().parent.parent


def test_a_call_returns_the_c_result():
    assert libc.call("getpid") == os.getpid()


def test_a_failed_call_leaves_its_errno():
    assert libc.call("close", -1) == -1
    assert libc.errno() == errno.EBADF
    assert libc.call("mount", None, b"/no/such/dir/for/faasd", None, 0, None) == -1
    assert libc.errno() in (errno.ENOENT, errno.EPERM)


def test_a_buffer_is_passed_by_pointer_and_written_to():
    header = libc.buffer(8)
    struct.pack_into("=Ii", header, 0, 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = libc.buffer(24)
    assert libc.call("capget", header, data) == 0
    effective = struct.unpack_from("=II", bytes(data), 0)[0] | struct.unpack_from("=I", bytes(data), 12)[0] << 32
    status = Path("/proc/self/status").read_text()
    expected = int(next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16)
    assert effective == expected


def test_a_function_libc_lacks_raises_attribute_error():
    with pytest.raises(AttributeError):
        libc.call("faasd_no_such_function")


def test_it_does_not_load_the_ctypes_package():
    """The point of the module: a worker's start pays for _ctypes only."""
    code = ("import sys; from faasd import libc; libc.call('getpid'); "
            "print('ctypes' in sys.modules, '_ctypes' in sys.modules)")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]
