"""Unit tests of faasd.workers: the bytecode Python workers load at start."""

from __future__ import annotations

import importlib.util
import os

from faasd.workers import SHIM_SOURCES, compile_shim


def test_the_shims_bytecode_is_written_once_and_again_when_its_source_changes(tmp_path):
    source = tmp_path / "shim.py"
    source.write_text("VALUE = 1\n")
    cached = importlib.util.cache_from_source(str(source))
    assert compile_shim([source]) == [] and os.path.exists(cached)
    written = os.stat(cached).st_mtime_ns
    assert compile_shim([source]) == []
    assert os.stat(cached).st_mtime_ns == written  # up to date: left alone
    source.write_text("VALUE = 2\n")
    os.utime(source, ns=(written + 2_000_000_000, written + 2_000_000_000))
    assert compile_shim([source]) == []
    assert os.stat(cached).st_mtime_ns != written


def test_what_cannot_be_written_is_named_and_nothing_is_raised(tmp_path):
    missing = tmp_path / "gone.py"
    assert compile_shim([missing]) == [missing]


def test_the_shim_sources_are_the_files_a_python_worker_imports():
    names = {path.relative_to(SHIM_SOURCES[1].parent).as_posix() for path in SHIM_SOURCES}
    assert names == {"runtimes/python_runtime.py", "__init__.py", "protocol.py", "sandbox.py",
                     "libc.py"}
    assert all(path.is_file() for path in SHIM_SOURCES)
