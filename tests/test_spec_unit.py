"""Unit tests of faasd.spec: what function.toml may say, and what is refused at load."""

from __future__ import annotations

import logging
import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from faasd.config import Config
from faasd.daemon import Daemon
from faasd.spec import MAX_TRACE_HEADER, caller_trace_id, load_spec, new_request_id, new_trace_id, runtime_id

HANDLER = "def handler(event, context):\n    return event\n"


def _load(tmp_path: Path, toml: str, name: str = "fn"):
    functions = tmp_path / "functions"
    functions.mkdir(exist_ok=True)
    (functions / f"{name}.py").write_text(HANDLER)
    (functions / f"{name}.toml").write_text(textwrap.dedent(toml))
    return load_spec(name, functions / f"{name}.py")


def test_a_nul_in_an_env_value_or_the_handler_is_a_load_error(tmp_path):
    # Popen refuses it ("embedded null byte"): no worker could ever start.
    spec = _load(tmp_path, '[env]\nGREETING = "a\\u0000b"\n')
    assert spec.load_error == "fn.toml: env.GREETING holds a NUL character, which no environment variable can"
    spec = _load(tmp_path, 'handler = "fn\\u0000.handler"\n')
    assert spec.load_error == "fn.toml: handler must be a string like 'module.function'"
    assert _load(tmp_path, '[env]\nGREETING = "a\\tb"\n').load_error is None


def test_a_nul_in_a_file_triggers_dir_is_a_load_error(tmp_path):
    spec = _load(tmp_path, '[[triggers]]\ntype = "file"\ndir = "up\\u0000loads"\n')
    assert spec.load_error == ("fn.toml: triggers[0] (file): dir = 'up\\x00loads': a NUL character "
                               "cannot be part of a path")


@pytest.mark.parametrize("path, problem", [
    ("/y/{a}/{a}", "names the parameter {a} more than once: each needs a name of its own"),
    ("/y/{a}/{a+}", "names the parameter {a} more than once: each needs a name of its own"),
    ("/y/{1a}", "cannot be routed: bad character in group name '1a'"),
])
def test_an_http_path_the_route_table_cannot_compile_is_a_load_error(tmp_path, path, problem):
    spec = _load(tmp_path, f'[[triggers]]\ntype = "http"\npath = "{path}"\n')
    assert spec.load_error == f"fn.toml: triggers[0]: http trigger path {path!r} {problem}"
    assert _load(tmp_path, '[[triggers]]\ntype = "http"\npath = "/y/{a}/{b+}"\n').load_error is None


def test_a_cron_rate_over_ten_years_is_a_load_error(tmp_path):
    spec = _load(tmp_path, '[[triggers]]\ntype = "cron"\nschedule = "rate(99999999999999 days)"\n')
    assert spec.load_error == ("fn.toml: triggers[0] (cron): schedule = 'rate(99999999999999 days)': a "
                               "rate is at most 10 years (rate(3650 days), 87600 hours or 5256000 minutes)")
    for fine in ("rate(3650 days)", "rate(87600 hours)", "rate(5256000 minutes)"):
        assert _load(tmp_path, f'[[triggers]]\ntype = "cron"\nschedule = "{fine}"\n').load_error is None
    assert _load(tmp_path, '[[triggers]]\ntype = "cron"\nschedule = "rate(3651 days)"\n').load_error


def test_a_describer_that_fails_leaves_its_fields_out_and_is_logged_once(tmp_path, caplog):
    daemon = Daemon(Config())
    daemon.pool = SimpleNamespace(pools={})
    daemon.invoker = SimpleNamespace(function_limit=lambda spec: SimpleNamespace(used=0))
    daemon.registry.specs["fn"] = _load(tmp_path, "")

    def broken(name: str, view: dict) -> None:
        raise OverflowError("timestamp out of range for platform time_t")

    def fine(name: str, view: dict) -> None:
        view["fine"] = name

    daemon.describers += [broken, fine]
    caplog.set_level(logging.ERROR, logger="faasd")
    for _ in range(3):
        view = daemon.describe("fn")
        assert view["name"] == "fn" and view["fine"] == "fn"
    [record] = caplog.records
    assert record.getMessage().startswith("describing function fn failed in <function ")
    assert record.exc_info[0] is OverflowError


@pytest.mark.parametrize("version, expected", [("v22.9.0", "nodejs22.x"), ("v20.20.2", "nodejs20.x"),
                                               (None, "nodejs20.x")])
def test_the_node_runtime_is_named_for_the_node_on_path(tmp_path, monkeypatch, version, expected):
    if version is not None:
        node = tmp_path / "node"
        node.write_text(f"#!/bin/sh\necho {version}\n")
        node.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))  # no node on it at all, for None
    runtime_id.cache_clear()
    try:
        assert runtime_id("node") == expected
        assert runtime_id("provided") == "provided.al2023"
    finally:
        runtime_id.cache_clear()


@pytest.mark.parametrize("toml, expected", [
    ("", ("Text", None, None)),
    ('log_format = "Text"\n', ("Text", None, None)),
    ('log_format = "json"\n', ("JSON", "INFO", "INFO")),
    ('log_format = "JSON"\napplication_log_level = "trace"\nsystem_log_level = "Warn"\n',
     ("JSON", "TRACE", "WARN")),
    ('log_format = "JSON"\napplication_log_level = "FATAL"\n', ("JSON", "FATAL", "INFO")),
    # What [env] said before these keys: read as them, and no longer in [env].
    ('[env]\nAWS_LAMBDA_LOG_FORMAT = "JSON"\nAWS_LAMBDA_LOG_LEVEL = "WARN"\nGREETING = "hi"\n',
     ("JSON", "WARN", "INFO")),
])
def test_the_logging_config_is_lambdas_with_levels_only_in_json(tmp_path, toml, expected):
    spec = _load(tmp_path, toml)
    assert spec.load_error is None
    assert (spec.log_format, spec.application_log_level, spec.system_log_level) == expected
    assert not {"AWS_LAMBDA_LOG_FORMAT", "AWS_LAMBDA_LOG_LEVEL"} & set(spec.env)


@pytest.mark.parametrize("toml, problem", [
    ('log_format = "XML"\n', "log_format = 'XML': expected one of Text, JSON"),
    ("log_format = true\n", "log_format = True: expected one of Text, JSON"),
    ('log_format = "JSON"\napplication_log_level = "VERBOSE"\n',
     "application_log_level = 'VERBOSE': expected one of TRACE, DEBUG, INFO, WARN, ERROR, FATAL"),
    ('log_format = "JSON"\nsystem_log_level = "ERROR"\n',
     "system_log_level = 'ERROR': expected one of DEBUG, INFO, WARN"),
    ('application_log_level = "DEBUG"\n', "application_log_level = 'DEBUG' needs log_format = \"JSON\": "
     "as in Lambda, log levels are filtered only in JSON logs"),
    ('log_format = "Text"\nsystem_log_level = "WARN"\n', "system_log_level = 'WARN' needs log_format = "
     "\"JSON\": as in Lambda, log levels are filtered only in JSON logs"),
    ('[env]\nAWS_LAMBDA_LOG_LEVEL = "WARN"\n', "[env] AWS_LAMBDA_LOG_LEVEL = 'WARN' needs log_format = "
     "\"JSON\": as in Lambda, log levels are filtered only in JSON logs"),
    ('[env]\nAWS_LAMBDA_LOG_FORMAT = "yaml"\n', "[env] AWS_LAMBDA_LOG_FORMAT = 'yaml': expected one of "
     "Text, JSON"),
    ('log_format = "JSON"\n[env]\nAWS_LAMBDA_LOG_FORMAT = "JSON"\n', "[env] sets AWS_LAMBDA_LOG_FORMAT "
     "and log_format is set too: keep log_format only (faasd sets AWS_LAMBDA_LOG_FORMAT from it)"),
])
def test_a_logging_setting_lambda_would_refuse_is_a_load_error_that_says_why(tmp_path, toml, problem):
    assert _load(tmp_path, toml).load_error == f"fn.toml: {problem}"


def test_a_callers_trace_header_is_passed_on_only_as_a_line_of_printable_ascii():
    given = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
    assert caller_trace_id(given) == given
    assert caller_trace_id("Root=1-abc") == "Root=1-abc"  # X-Ray's to judge, as Lambda leaves it
    for refused in (None, "", "Root=1-\x00", "Root=1-\tx", "Root=1-é", "R" * (MAX_TRACE_HEADER + 1)):
        assert caller_trace_id(refused) is None, refused
    made = new_trace_id(0x5759E988)
    assert re.fullmatch(r"Root=1-5759e988-[0-9a-f]{24};Parent=[0-9a-f]{16};Sampled=0", made), made
    assert made != new_trace_id(0x5759E988)


def test_a_request_id_is_a_random_version_4_uuid_in_its_usual_text():
    import uuid

    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        value = uuid.UUID(text)
        assert str(value) == text  # lower case, 8-4-4-4-12
        assert value.version == 4 and value.variant == uuid.RFC_4122
    # Every random hex digit takes every value (the fixed ones are the version and variant's).
    for position in (0, 9, 15, 20, 35):
        assert len({text[position] for text in ids}) == 16


def test_a_new_trace_header_is_lambdas_with_its_root_at_the_given_second():
    headers = [new_trace_id(1_700_000_000.7) for _ in range(2000)]
    assert len(set(headers)) == len(headers)
    shape = re.compile(r"Root=1-6553f100-([0-9a-f]{24});Parent=([0-9a-f]{16});Sampled=0")
    found = [shape.fullmatch(header) for header in headers]
    assert all(found)
    for group in (1, 2):  # the first and last digit of each random part take every value
        for position in (0, -1):
            assert len({match[group][position] for match in found}) == 16
