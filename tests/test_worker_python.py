"""Python functions on the workers' own interpreter (`[workers] python`)."""

from __future__ import annotations

import base64
import site
import subprocess
import sys
from pathlib import Path

import pytest

import faasd
from support import loaded, newer_python, write_function

WHERE = """
import os, sys
def handler(event, context):
    import {module}
    return {{"version": "%d.%d" % sys.version_info[:2], "path": sys.path, "module": {module}.__file__,
            "execution_env": os.environ["AWS_EXECUTION_ENV"], "task_root": os.environ["LAMBDA_TASK_ROOT"]}}
"""


def _version(python: str) -> str:
    return subprocess.run([python, "-I", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def other_python() -> str:
    """An interpreter of another Python version than faasd's own, for workers."""
    python = newer_python()
    if python is None or _version(python) == "%d.%d" % sys.version_info[:2]:
        pytest.skip("no Python 3.12 or later of another version than faasd's on this machine for workers")
    return python


def test_workers_on_another_python_import_from_its_site_packages_not_the_daemons(
        start_daemon, functions_dir, tmp_path, other_python):
    # A virtual environment of that Python, with a module of its own installed: the
    # daemon's site-packages (another version's: its compiled extensions do not
    # load there) are not the workers'.
    venv = tmp_path / "venv"
    subprocess.run([other_python, "-m", "venv", "--without-pip", str(venv)], check=True)
    [own_site] = venv.glob("lib/python3.*/site-packages")
    (own_site / "only_in_the_workers_env.py").write_text("VALUE = 1\n")
    write_function(functions_dir, "where.py", WHERE.format(module="only_in_the_workers_env"))
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_PYTHON": str(venv / "bin" / "python")})
    loaded(daemon, "where")
    response = daemon.invoke("where")
    seen = response.json()
    assert "x-amz-function-error" not in response.headers, seen
    assert seen["version"] == _version(other_python)
    assert seen["module"] == str(own_site / "only_in_the_workers_env.py")
    daemons = [path for path in site.getsitepackages() if Path(path).is_dir()]
    assert daemons and not set(daemons) & set(seen["path"]), seen["path"]


def test_the_runtime_named_is_the_workers_pythons_not_the_daemons(start_daemon, functions_dir, other_python):
    # GetFunction's Runtime, AWS_EXECUTION_ENV and the INIT_START runtime version all name it.
    version = _version(other_python)
    write_function(functions_dir, "where.py", WHERE.format(module="json"))
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_PYTHON": other_python})
    loaded(daemon, "where")
    response = daemon.invoke("where", **{"X-Amz-Log-Type": "Tail"})
    seen = response.json()
    assert seen["version"] == version
    assert seen["execution_env"] == f"AWS_Lambda_python{version}"
    assert daemon.get("/2015-03-31/functions/where").json()["Configuration"]["Runtime"] == f"python{version}"
    tail = base64.b64decode(response.headers["x-amz-log-result"]).decode()
    assert f"INIT_START Runtime Version: python{version}:faasd-{faasd.__version__}\t" in tail, tail
