"""The libc calls a worker makes before its function's code runs (prctl,
unshare, mount, capset), made through `_ctypes`, the C module under ctypes.

Every Python worker makes at least one of them (PR_SET_PDEATHSIG), so the
import is part of every first start. `import ctypes` defines some seventy
classes and loads struct and ctypes._endian: 2.4 ms before a call on a 2-core
VM where this module takes 0.45 ms. These calls pass only ints, bytes, None
and buffers and return a C int, which `_ctypes` converts by itself; one
function type and one int type are all they need.

    libc.call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # -> int
    libc.errno()  # after a call that returned -1
"""

import _ctypes


class _Int(_ctypes._SimpleCData):
    _type_ = "i"


class _Byte(_ctypes._SimpleCData):
    _type_ = "B"


class _Function(_ctypes.CFuncPtr):
    """A C function taking what ctypes converts by default and returning int; errno kept."""

    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _Int


class _Program:
    """The symbols of the running program and its libraries, libc's among them."""

    _handle = _ctypes.dlopen(None)


_functions = {}


def call(name, *args):
    """libc's `name`(*args) and its int result; `errno()` says why a -1 failed.

    Raises AttributeError when libc has no such function.
    """
    function = _functions.get(name)
    if function is None:
        function = _functions[name] = _Function((name, _Program))
    return function(*args)


def buffer(size):
    """`size` zeroed bytes that a call may write to, passed as a pointer
    (struct.pack_into and bytes() work on it)."""

    class Buffer(_ctypes.Array):
        _type_ = _Byte
        _length_ = size

    return Buffer()


errno = _ctypes.get_errno
