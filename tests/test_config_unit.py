"""Unit tests of faasd.config: what a relative path is relative to, and what is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from faasd.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def _layout(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A config file in etc/ and a current directory elsewhere."""
    etc, cwd = tmp_path / "etc", tmp_path / "work"
    etc.mkdir()
    cwd.mkdir()
    (etc / "faasd.toml").write_text('[paths]\nfunctions = "fns"\n')
    monkeypatch.chdir(cwd)
    return etc, cwd


def test_paths_in_the_file_and_the_defaults_are_relative_to_the_file(tmp_path, monkeypatch):
    etc, _ = _layout(tmp_path, monkeypatch)
    config = load_config(etc / "faasd.toml", env={})
    assert config.paths.functions == etc / "fns"
    assert config.paths.data == etc / ".faasd"


def test_paths_given_by_flags_or_the_environment_are_relative_to_the_current_directory(
        tmp_path, monkeypatch):
    # `faasd serve --functions functions` means ./functions, wherever the config file is.
    etc, cwd = _layout(tmp_path, monkeypatch)
    config = load_config(etc / "faasd.toml", env={"FAASD_PATHS_DATA": "state"},
                         overrides={"paths": {"functions": "functions"}})
    assert config.paths.functions == cwd / "functions"
    assert config.paths.data == cwd / "state"
    absolute = load_config(etc / "faasd.toml", env={},
                           overrides={"paths": {"functions": str(tmp_path / "elsewhere")}})
    assert absolute.paths.functions == tmp_path / "elsewhere"


def test_without_a_file_everything_is_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, env={})
    assert config.paths.functions == tmp_path / "functions"
    assert config.paths.data == tmp_path / ".faasd"


FLOAT_KEYS = ["server.max_body_mb", "server.idle_timeout_s", "server.body_timeout_s", "workers.keep_warm_s",
              "workers.drain_timeout_s", "cluster.heartbeat_s"]
INT_KEYS = ["server.port", "limits.max_concurrency", "workers.freeze_after_ms",
            "workers.reply_poll_us", "cluster.prefetch", "log.max_file_mb", "log.keep_files"]


@pytest.mark.parametrize("key", FLOAT_KEYS + INT_KEYS)
@pytest.mark.parametrize("number", ["nan", "inf", "-inf"])
def test_a_number_that_is_not_finite_is_refused_in_the_file_and_the_environment(
        tmp_path, key, number):
    section, name = key.split(".")
    config = tmp_path / "faasd.toml"
    config.write_text(f"[{section}]\n{name} = {number}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(config, env={})
    assert f"{config}: {key}: {number} is not valid: expected a" in str(refused.value)
    variable = f"FAASD_{section.upper()}_{name.upper()}"
    with pytest.raises(ConfigError) as refused:
        load_config(None, env={variable: number})
    assert f"${variable}: {number!r} is not valid: expected a" in str(refused.value)


@pytest.mark.parametrize("text, refusal", [
    ("[workers]\nfreeze_after_ms = 1.5\n", "workers.freeze_after_ms: 1.5 is not valid: expected a whole number"),
    ("[server]\nmax_body_mb = 1e308\n", "server.max_body_mb: 1e\\+308 is not valid: expected a size in MB"),
    ('[paths]\ndata = "state\\u0000"\n', "paths.data: .* a NUL character cannot be part of a path"),
    ('[workers]\nrun_as = "faasd\\u0000"\n', "workers.run_as: .* a NUL character cannot be part of it"),
])
def test_whole_numbers_refuse_fractions_and_sizes_stay_numbers(tmp_path, text, refusal):
    config = tmp_path / "faasd.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=refusal):
        load_config(config, env={})


@pytest.mark.parametrize("keys, refusal", [
    ('{ "AK/ID" = "secret" }', "access key id 'AK/ID' is not"),
    ('{ "AK:ID" = "secret" }', "access key id 'AK:ID' is not"),
    ('{ "AK ID" = "secret" }', "access key id 'AK ID' is not"),
    ('{ AKID = " padded " }', "the secret of 'AKID' starts or ends with a space"),
    ('{ AKID = "tab\\there" }', "the secret of 'AKID' .* control character"),
])
def test_auth_keys_no_client_could_present_are_refused(tmp_path, keys, refusal):
    config = tmp_path / "faasd.toml"
    config.write_text(f"[auth]\nkeys = {keys}\n")
    with pytest.raises(ConfigError, match=f"auth.keys: .*{refusal}"):
        load_config(config, env={})


@pytest.mark.parametrize("keys", ['"abc"', '["AKID", "secret"]', "42"])
def test_auth_keys_in_the_file_that_are_no_table_are_refused_asking_for_a_table(tmp_path, keys):
    # The file's form is a table; the pairs are the variable's, and not what a file should say.
    config = tmp_path / "faasd.toml"
    config.write_text(f"[auth]\nkeys = {keys}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(config, env={})
    assert str(refused.value).endswith(
        'is not valid: expected a table of access key id = secret, such as keys = { AKID = "secret" }')
    assert "ACCESS_KEY=SECRET" not in str(refused.value)
    with pytest.raises(ConfigError, match=r"^\$FAASD_AUTH_KEYS: .* is not valid: expected "
                                          r"ACCESS_KEY=SECRET pairs separated by commas$"):
        load_config(None, env={"FAASD_AUTH_KEYS": "abc"})


@pytest.mark.parametrize("keys, said", [
    ('{ "AK/ID" = "s3cret-value" }', "auth.keys: {'AK/ID': '***'} is not valid: the access key id"),
    ('{ AKID = "s3cret-value\\t" }', "auth.keys: {'AKID': '***'} is not valid: the secret of 'AKID'"),
    ('"AKID:s3cret-value"', "auth.keys: a string is not valid: expected a table"),
])
def test_a_refused_auth_keys_value_is_shown_without_its_secrets(tmp_path, keys, said):
    # The refusal goes to the log (at start, and at each SIGHUP that brings it): no secret in it.
    config = tmp_path / "faasd.toml"
    config.write_text(f"[auth]\nkeys = {keys}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(config, env={})
    assert said in str(refused.value) and "s3cret" not in str(refused.value), str(refused.value)
    for value, shown in (("AK1=one,AK2:s3cret-value", "'AK1=***,***'"), ("AK/1=s3cret-value", "'AK/1=***'")):
        with pytest.raises(ConfigError) as refused:
            load_config(None, env={"FAASD_AUTH_KEYS": value})
        assert str(refused.value).startswith(f"$FAASD_AUTH_KEYS: {shown} is not valid: "), str(refused.value)
        assert "s3cret" not in str(refused.value) and "one" not in str(refused.value)


def test_auth_keys_of_any_printable_secret_are_taken(tmp_path):
    config = tmp_path / "faasd.toml"
    config.write_text('[auth]\nkeys = { AKIDFAASD_1 = "s3cr\u00e9t with spaces/and:colons=" }\n')
    assert load_config(config, env={}).auth.keys == {"AKIDFAASD_1": "s3cr\u00e9t with spaces/and:colons="}
    assert load_config(None, env={"FAASD_AUTH_KEYS": "AK1=one,AK2=two"}).auth.keys == {"AK1": "one", "AK2": "two"}


def test_a_file_that_cannot_be_read_as_toml_is_one_config_error(tmp_path):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"# caf\xe9\n[limits]\nmax_concurrency = 5\n")
    with pytest.raises(ConfigError, match=r"latin1.toml: not valid TOML: byte 5 is not UTF-8"):
        load_config(latin1, env={})
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: cannot be read: not a regular file$"):
        load_config(tmp_path, env={})
    unreadable = tmp_path / "unreadable.toml"
    unreadable.write_text("")
    unreadable.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(ConfigError, match="unreadable.toml: cannot be read by uid "):
            load_config(unreadable, env={})


def test_a_fifo_as_the_config_file_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "faasd.toml"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            load_config(fifo, env={})
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # let the blocked open go, to fail the test rather than hang it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail("load_config waited for a writer to open the FIFO")
    assert isinstance(outcome[0], ConfigError)
    assert str(outcome[0]) == f"{fifo}: cannot be read: not a regular file"


def _faasd(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FAASD_")}
    return subprocess.run([sys.executable, "-m", "faasd", *argv], capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(ROOT), **env}, timeout=60)


def test_serve_and_check_refuse_a_nan_setting_in_one_line(tmp_path):
    (tmp_path / "functions").mkdir()
    env = {"FAASD_SERVER_MAX_BODY_MB": "nan"}
    check = _faasd("check", "--functions", str(tmp_path / "functions"), env=env)
    assert check.returncode == 1
    assert check.stdout.strip() == ("config: error: $FAASD_SERVER_MAX_BODY_MB: 'nan' is not valid: "
                                    "expected a finite number, not nan or inf")
    serve = _faasd("serve", "--functions", str(tmp_path / "functions"), "--data-dir",
                   str(tmp_path / "data"), "--port", "0", env=env)
    assert serve.returncode == 2
    assert serve.stderr.strip() == ("faasd: $FAASD_SERVER_MAX_BODY_MB: 'nan' is not valid: "
                                    "expected a finite number, not nan or inf")
    assert "Traceback" not in serve.stdout + serve.stderr


def test_a_symlink_loop_or_a_nesting_too_deep_is_one_config_error(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(ConfigError, match=rf"^{loop}: cannot be resolved: Symlink loop"):
        load_config(loop, env={})
    config = tmp_path / "faasd.toml"
    config.write_text('[paths]\nfunctions = "loop"\n')
    with pytest.raises(ConfigError, match="^paths.functions: cannot be resolved: Symlink loop"):
        load_config(config, env={})
    config.write_text("[limits]\nmax_concurrency = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="faasd.toml: cannot be read: arrays or tables nested too deeply"):
        load_config(config, env={})


@pytest.mark.parametrize("url, refusal", [
    ("http://broker:5672/", "'http://broker:5672/' is not valid: expected amqp://USER:PASSWORD@HOST:PORT/VHOST"),
    ("amqp//faasd:s3cret@broker/", "'amqp//faasd:***@broker/' is not valid: expected amqp://"),
    ("amqp://faasd:s3cret@broker:56x2/", "'amqp://faasd:***@broker:56x2/' is not valid: the port is not"),
])
def test_an_amqp_url_that_is_not_one_is_refused_without_its_password(tmp_path, url, refusal):
    config = tmp_path / "faasd.toml"
    config.write_text(f'[amqp]\nurl = "{url}"\n')
    with pytest.raises(ConfigError) as refused:
        load_config(config, env={})
    assert str(refused.value).startswith(f"{config}: amqp.url: {refusal}"), refused.value
    assert "s3cret" not in str(refused.value)
    with pytest.raises(ConfigError, match=r"^\$FAASD_AMQP_URL: ") as refused:
        load_config(None, env={"FAASD_AMQP_URL": url})
    assert "s3cret" not in str(refused.value)


def test_amqp_and_amqps_urls_are_taken(tmp_path):
    for url in ("amqp://guest:guest@127.0.0.1:5672/", "amqps://faasd:secret@rabbit.internal/prod",
                "amqp://localhost"):
        assert load_config(None, env={"FAASD_AMQP_URL": url}).amqp.url == url


@pytest.mark.parametrize("name, key", [("FAASD_WORKERS_RUNAS", "workers.runas"),
                                       ("FAASD_PATHS_DAT", "paths.dat"),
                                       ("FAASD_SERVER_PROT", "server.prot")])
def test_a_mistyped_environment_variable_of_a_known_section_is_refused(name, key):
    # A file's unknown key is refused; so is the variable's, which would change nothing unsaid.
    with pytest.raises(ConfigError, match=rf"^\${name}: unknown key {key}; known keys: .*\(as FAASD_"):
        load_config(None, env={name: "faasd"})


def test_variables_of_no_section_are_not_faasds_settings_and_are_left_alone():
    config = load_config(None, env={"FAASD_TEST_AMQP_URL": "x", "FAASD_CONFIGURED": "1",
                                    "FAASD_WORKERS_RUN_AS": "nobody"})
    assert config.workers.run_as == "nobody"
