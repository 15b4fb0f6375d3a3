"""The shipped systemd units: valid for systemd, consistent with faasd, and as hardened as the README says."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from faasd.cli import build_parser
from faasd.config import WorkersConfig
from faasd.daemon import EXIT_CONFIG
from support import ROOT

UNITS = ROOT / "systemd"
INSTALLED_FAASD = "/opt/faasd/bin/faasd"  # where the README installs it


def analyzer() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing: .ci/run installs the systemd package")
    return path


def directives(unit: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment, in order (keys may repeat)."""
    section, found = "", []
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(unit: Path, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in directives(unit) if s == section and k == key]


def one(unit: Path, key: str, section: str = "Service") -> str:
    found = values(unit, key, section)
    assert len(found) == 1, f"{unit.name}: expected one {key}=, found {found}"
    return found[0]


def seconds(span: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min)?", span)
    assert match, span
    return float(match[1]) * {"ms": 0.001, "s": 1, "min": 60, None: 1}[match[2]]


@pytest.fixture
def checkable_units(tmp_path: Path) -> Path:
    """The units, with ExecStart pointing at this checkout's faasd instead of /opt/faasd.

    `systemd-analyze verify` checks that the executable exists; nothing else changes.
    """
    faasd = Path(sys.executable).parent / "faasd"
    assert faasd.exists(), f"{faasd}: the faasd entry point is not installed in this venv"
    for name in ("faasd.service", "faasd.socket"):
        text = (UNITS / name).read_text().replace(INSTALLED_FAASD, str(faasd))
        (tmp_path / name).write_text(text)
    return tmp_path


def test_units_pass_systemd_analyze_verify(checkable_units):
    result = subprocess.run([analyzer(), "verify", str(checkable_units / "faasd.service"),
                             str(checkable_units / "faasd.socket")],
                            capture_output=True, text=True, timeout=60)
    # verify prints problems and exits non-zero on any; nothing may be reported.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr + result.stdout


def test_exposure_score_is_the_one_the_readme_states(checkable_units):
    result = subprocess.run([analyzer(), "security", "--offline=yes", "--no-pager",
                             str(checkable_units / "faasd.service")],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for faasd\.service: (\d+\.\d)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    measured = float(match[1])
    stated = re.search(r"exposure level of\s+\*\*(\d+\.\d)\*\*", (ROOT / "README.md").read_text())
    assert stated, "README.md must state the unit's `systemd-analyze security` exposure level"
    assert measured == float(stated[1]), (
        f"systemd-analyze security rates faasd.service {measured}, README.md says {stated[1]}")
    assert measured < 3.0  # well within "OK": hardening was not quietly dropped


def test_service_is_a_notify_service_with_watchdog_reload_and_ordered_stop():
    unit = UNITS / "faasd.service"
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert seconds(one(unit, "WatchdogSec")) >= 10
    reload = shlex.split(one(unit, "ExecReload"))
    assert reload[0].endswith("kill") and "-HUP" in reload and "$MAINPID" in reload
    assert one(unit, "KillMode") == "mixed"
    assert one(unit, "Restart") == "on-failure"
    # A daemon that must not run as configured is not restarted in a loop.
    assert one(unit, "RestartPreventExitStatus") == str(EXIT_CONFIG)
    # systemd must not SIGKILL the daemon while it drains.
    assert seconds(one(unit, "TimeoutStopSec")) > WorkersConfig().drain_timeout_s + 5


def test_service_runs_faasd_serve_with_a_config_faasd_accepts():
    unit = UNITS / "faasd.service"
    argv = shlex.split(one(unit, "ExecStart"))
    assert argv[0] == INSTALLED_FAASD
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.config == "/etc/faasd/faasd.toml"
    assert one(unit, "ConfigurationDirectory") == "faasd"


def test_service_runs_as_a_dedicated_user_with_its_own_directories():
    unit = UNITS / "faasd.service"
    assert one(unit, "User") == "faasd" and one(unit, "Group") == "faasd"
    assert one(unit, "StateDirectory") == "faasd"
    assert one(unit, "LogsDirectory") == "faasd"
    assert one(unit, "RuntimeDirectory") == "faasd"
    environment = dict(item.split("=", 1) for value in values(unit, "Environment")
                       for item in shlex.split(value))
    # The data dir is the state dir, and function logs (<data>/logs) land in the logs dir.
    assert environment["FAASD_PATHS_DATA"] == "/var/lib/faasd"
    assert one(unit, "BindPaths") == "/var/log/faasd:/var/lib/faasd/logs"


def test_service_is_hardened_in_ways_workers_survive():
    unit = UNITS / "faasd.service"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                "ProtectClock", "ProtectHostname", "RestrictRealtime",
                "RestrictSUIDSGID", "LockPersonality", "PrivateMounts"):
        assert one(unit, key) == "yes", key
    assert one(unit, "ProtectSystem") == "strict"
    assert one(unit, "CapabilityBoundingSet") == ""
    assert set(one(unit, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # Only the namespaces a worker's sandbox creates (faasd/sandbox.py).
    assert set(one(unit, "RestrictNamespaces").split()) == {"user", "mnt"}
    assert values(unit, "SystemCallFilter") == ["@system-service @mount", "~@privileged", "capset"]
    # A refused call must fail with an error faasd can fall back from, not kill the daemon.
    assert one(unit, "SystemCallErrorNumber") == "EPERM"
    # Workers need these: Node's JIT maps W+X pages; memory cgroups live under /sys/fs/cgroup.
    assert values(unit, "MemoryDenyWriteExecute") in ([], ["no"])
    assert one(unit, "ProtectControlGroups") == "no"
    assert "memory" in one(unit, "Delegate").split()


def test_socket_unit_feeds_the_service():
    socket_unit, service = UNITS / "faasd.socket", UNITS / "faasd.service"
    assert values(socket_unit, "ListenStream", "Socket"), "faasd.socket must listen somewhere"
    assert len(values(socket_unit, "ListenStream", "Socket")) == 1  # faasd serves one socket
    assert "faasd.socket" in one(service, "Requires", "Unit").split()
    assert "faasd.socket" in one(service, "After", "Unit").split()
    assert one(socket_unit, "WantedBy", "Install") == "sockets.target"


def installed_by_the_readme() -> dict[str, Path]:
    """What the README's install steps put where: {installed path: file in this checkout}."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running as a systemd service", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    installed = {}
    for line in block.splitlines():
        for command in " ".join(shlex.split(line, comments=True)).split(" && "):
            argv = shlex.split(command)
            if not argv or argv[0] != "install" or "-d" in argv:
                continue
            operands, skip = [], False
            for arg in argv[1:]:
                if skip:
                    skip = False
                elif arg in ("-m", "-g", "-o"):
                    skip = True
                elif not arg.startswith("-"):
                    operands.append(arg)
            *sources, target = operands
            for source in sources:
                dest = target if len(sources) == 1 and not target.endswith("/") else \
                    f"{target.rstrip('/')}/{Path(source).name}"
                installed[dest] = ROOT / source
    return installed


def test_the_units_documentation_is_a_file_the_readmes_install_puts_there():
    installed = installed_by_the_readme()
    # The parse finds the steps that install the units themselves.
    assert installed["/etc/systemd/system/faasd.service"] == UNITS / "faasd.service"
    for name in ("faasd.service", "faasd.socket"):
        for value in values(UNITS / name, "Documentation", "Unit"):
            for uri in value.split():
                if not uri.startswith("file:"):
                    continue  # man:, https:: not the install's
                path = uri.removeprefix("file:")
                assert path in installed, f"{name}: Documentation={uri}, which the README never installs"
                assert installed[path].is_file(), installed[path]
    assert "file:/usr/share/doc/faasd/README.md" in one(UNITS / "faasd.service", "Documentation", "Unit")
