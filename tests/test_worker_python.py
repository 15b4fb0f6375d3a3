"""Python functions on the workers' own interpreter (`[workers] python`), and
what a function can import: its own directory, then that interpreter's site-packages."""

from __future__ import annotations

import base64
import hashlib
import site
import subprocess
import sys
import zipfile
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


def test_code_is_checked_at_load_in_the_grammar_of_the_workers_python(start_daemon, functions_dir, other_python):
    # `type X = ...` (3.12) is a syntax error to the daemon's 3.11, not to the workers'
    # interpreter, which runs the code; and a real error reads as that interpreter says it.
    if sys.version_info >= (3, 12):
        pytest.skip("faasd's own Python already reads 3.12's syntax")
    write_function(functions_dir, "typed.py", "type Number = int\ndef handler(event, context):\n    return 1\n")
    write_function(functions_dir, "broken.py", "def handler(event, context)\n    return 1\n")
    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_PYTHON": other_python})
    loaded(daemon, "typed")
    assert daemon.function("typed")["load_error"] is None
    assert daemon.invoke("typed").json() == 1
    said = subprocess.run([other_python, "-I", "-c", "compile(open('broken.py').read(), 'broken.py', 'exec')"],
                          cwd=functions_dir, capture_output=True, text=True).stderr.strip().splitlines()[-1]
    reason = said.removeprefix("SyntaxError: ")
    assert daemon.function("broken")["load_error"] == (
        f"Runtime.UserCodeSyntaxError: Syntax error in module 'broken': {reason} (broken.py, line 1)")


@pytest.mark.parametrize("where", ["syntax", "import"])
def test_a_python_init_errors_json_records_are_what_the_workers_python_writes(
        start_daemon, functions_dir, other_python, where):
    # awslambdaric writes log_error's record of an init error with \\u escapes on
    # python3.11 and before, and its characters as they are on 3.12 and later: the
    # workers' Python's way, not the daemon's.
    from test_json_logs import assert_init_records_are_awslambdarics

    daemon = start_daemon(functions_dir, env={"FAASD_WORKERS_PYTHON": other_python})
    assert_init_records_are_awslambdarics(daemon, where, _version(other_python))


def _wheel(directory: Path, name: str, version: str, module: str) -> Path:
    """A pure-Python wheel of one module, as a package index serves one."""
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n{module}",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record + [f"{name}-{version}.dist-info/RECORD,,"]) + "\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_a_package_pip_installed_into_a_function_directory_is_imported_from_there_first(
        daemon, tmp_path):
    # As a Lambda deployment package: `pip install --target functions/NAME pkg`. The
    # function's directory comes first on sys.path (as /var/task), then the workers'
    # interpreter's site-packages, where boto3 installed next to faasd is found.
    wheel = _wheel(tmp_path, "faasd_shipped", "1.2.3", "def greet():\n    return 'shipped'\n")
    write_function(daemon.functions, "shipping/handler.py", """
        import sys
        from importlib.metadata import version
        import boto3
        import faasd_shipped

        def handler(event, context):
            return {"greeting": faasd_shipped.greet(), "module": faasd_shipped.__file__,
                    "version": version("faasd_shipped"), "boto3": boto3.__file__, "path": sys.path}
    """)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--target", str(daemon.functions / "shipping"), str(wheel)], check=True)
    loaded(daemon, "shipping")
    response = daemon.invoke("shipping")
    seen = response.json()
    assert "x-amz-function-error" not in response.headers, seen
    root = str(daemon.functions / "shipping")
    assert seen["greeting"] == "shipped" and seen["version"] == "1.2.3"
    assert seen["module"] == f"{root}/faasd_shipped/__init__.py"
    boto3_site = str(Path(seen["boto3"]).parent.parent)
    assert boto3_site in site.getsitepackages(), seen["boto3"]
    assert seen["path"].index(root) < seen["path"].index(boto3_site), seen["path"]
