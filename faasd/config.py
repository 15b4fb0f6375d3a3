"""The daemon's configuration: one frozen `Config`, loaded and validated once.

Sources, lowest precedence first: built-in defaults, the TOML file
(`--config`, else `$FAASD_CONFIG`, else `./config/faasd.toml` if it exists),
`FAASD_<SECTION>_<KEY>` environment variables, then command-line flags.
Relative paths in the file (and the defaults, when there is a file) are
relative to the file's directory; those given by environment variables or
flags, and the defaults without a file, to the current directory. Every
error names the source, the key and what would be accepted.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from .spec import read_file, this_user


class ConfigError(Exception):
    """A configuration value is missing, malformed or out of range."""


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_mb: float = 6.0
    insecure: bool = False  # allow a non-loopback bind without auth keys
    # A client silent this long while sending a request's headers or body is
    # cut off (slow-loris); an idle keep-alive connection is closed after it.
    # It also bounds the headers as a whole: aiohttp's keep-alive timer runs
    # until a request's headers are complete.
    idle_timeout_s: float = 30.0
    # A request body not complete this long after faasd began to read it gets
    # 408, however steadily it trickles in (idle_timeout_s is between reads).
    body_timeout_s: float = 60.0

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


@dataclass(frozen=True, kw_only=True)
class PathsConfig:
    functions: Path = Path("functions")
    data: Path = Path(".faasd")


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    max_concurrency: int = 1000


@dataclass(frozen=True, kw_only=True)
class WorkersConfig:
    freeze_after_ms: int = 100
    # After writing a call, keep the event loop polling (not sleeping) this
    # long for the reply (faasd/workers.py's ReplyPoller); 0: off.
    reply_poll_us: int = 200
    keep_warm_s: float = 600.0
    run_as: str | None = None
    drain_timeout_s: float = 30.0
    zygote: bool = True  # fork new Python workers from a template that imported the handler
    # /tmp: a private tmpfs of tmp_mb per worker where mount namespaces allow
    # (its pages count toward the worker's memory); false: a directory on the
    # data disk, limited per file and by a usage check (faasd/sandbox.py).
    tmpfs: bool = True
    python: str | None = None  # the interpreter of Python workers (default: faasd's own)
    # uids "FIRST-LAST": each function's workers run as a uid of its own from
    # this range, in run_as's group, so that no function can read or signal
    # another's processes (faasd/sandbox.py's FunctionUsers). Needs run_as.
    function_users: tuple[int, int] | None = None


@dataclass(frozen=True, kw_only=True)
class AmqpConfig:
    url: str | None = None


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Several nodes sharing RabbitMQ as their work queue (faasd/cluster/)."""

    mode: str = "local"          # local: the embedded queue; amqp: queues on the [amqp] broker
    name: str = "faasd"          # broker objects are named faasd.cluster.<name>.*
    node: str | None = None      # this node's name (default: host name:port)
    address: str | None = None   # the URL others reach this node at (default: from [server])
    heartbeat_s: float = 2.0     # how often the node announces itself
    prefetch: int = 10           # events of a function without `concurrency` a node takes at once


@dataclass(frozen=True, kw_only=True)
class AuthConfig:
    keys: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    format: str = "text"  # text | json
    level: str = "info"
    max_file_mb: int = 64  # a function's log file past this is rotated (NAME.log.1, ...); 0: never
    keep_files: int = 3  # rotated files kept per function


@dataclass(frozen=True, kw_only=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    amqp: AmqpConfig = field(default_factory=AmqpConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: Path | None = None  # the file it came from, if any

    @property
    def url(self) -> str:
        """Where a client on this machine reaches the daemon (a wildcard host: loopback, of
        IPv6 for "::", on which the daemon listens for IPv6 only)."""
        host = self.server.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return http_url(host, self.server.port)


def http_url(host: str, port: int) -> str:
    """`http://HOST:PORT`, an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# Section name -> (dataclass, {key: coercer}). The coercers turn TOML values
# and environment strings alike into the field's type, or raise ValueError.
def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _whole_number(value: Any) -> int:
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ValueError("expected a whole number")  # 1.5, nan and inf too
    try:
        return int(value)
    except ValueError:
        raise ValueError("expected a whole number") from None


def _positive_int(value: Any) -> int:
    number = _whole_number(value)
    if number <= 0:
        raise ValueError("expected a positive whole number")
    return number


def _non_negative_int(value: Any) -> int:
    number = _whole_number(value)
    if number < 0:
        raise ValueError("expected zero or a positive whole number")
    return number


def _positive_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("expected a finite number, not nan or inf")
    if number <= 0:
        raise ValueError("expected a positive number")
    return number


# A request body is held in memory whole; past this, its size in bytes would
# not even be a number.
MAX_BODY_MB = 1024 * 1024


def _body_mb(value: Any) -> float:
    number = _positive_float(value)
    if number > MAX_BODY_MB:
        raise ValueError(f"expected a size in MB up to {MAX_BODY_MB}")
    return number


def _port(value: Any) -> int:
    number = _non_negative_int(value)
    if number > 65535:
        raise ValueError("expected a port number from 0 to 65535")
    return number


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    if "\0" in value:
        raise ValueError("a NUL character cannot be part of it")
    return value


def _path(value: Any) -> Path:
    path = Path(value)
    if "\0" in str(path):
        raise ValueError("a NUL character cannot be part of a path")
    return path


def _optional_str(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return _str(value)


def _amqp_url(value: Any) -> str | None:
    url = _optional_str(value)
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError("expected amqp://USER:PASSWORD@HOST:PORT/VHOST (amqps:// for TLS)")
    try:
        parts.port
    except ValueError:
        raise ValueError("the port is not a number from 0 to 65535") from None
    return url


# Shown in its error without its password, which a log must not hold.
_amqp_url.shown = lambda value: repr(re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", value)  # type: ignore[attr-defined]
                                     if isinstance(value, str) else value)


_KEYS_TABLE = 'expected a table of access key id = secret, such as keys = { AKID = "secret" }'


def _key_pairs(value: str, expected: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(expected)
    return {k.strip(): v.strip() for k, v in pairs}


def _keys(value: Any) -> dict[str, str]:
    """[auth] keys in the file: a table (a string of pairs, as in the variable, is taken too)."""
    if isinstance(value, str):
        value = _key_pairs(value, _KEYS_TABLE)
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in value.items()
    ):
        raise ValueError(_KEYS_TABLE)
    for key_id, secret in value.items():
        # A key no client could present would refuse every caller, silently.
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", key_id):
            raise ValueError(f"the access key id {key_id[:40]!r} is not 1 to 128 of A-Z a-z 0-9 _ . - "
                             "(a SigV4 credential scope is split at /, a Basic sign-in at :)")
        if secret != secret.strip() or not secret.isprintable():
            raise ValueError(f"the secret of {key_id!r} starts or ends with a space or holds a control "
                             "character, which no Authorization header can carry")
    return dict(value)


def _keys_from_env(value: str) -> dict[str, str]:
    """FAASD_AUTH_KEYS="AKID1=secret1,AKID2=secret2"."""
    return _keys(_key_pairs(value, "expected ACCESS_KEY=SECRET pairs separated by commas"))


_keys.from_env = _keys_from_env  # type: ignore[attr-defined]

# Shown in its error without its secrets, which a log must not hold: the key ids
# (and, in the variable, which item has no `=`) are what tells the fault.
_KINDS = {str: "a string", list: "an array", bool: "a boolean", int: "a number", float: "a number"}
_keys.shown = lambda value: (  # type: ignore[attr-defined]
    repr({key: "***" for key in value}) if isinstance(value, dict)
    else _KINDS.get(type(value), "a value of another type"))
_keys_from_env.shown = lambda value: repr(",".join(  # type: ignore[attr-defined]
    f"{item.split('=', 1)[0].strip()}=***" if "=" in item else "***"
    for item in value.split(",") if item.strip()))


def _uid_range(value: Any) -> tuple[int, int] | None:
    if value is None or value == "":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value) if isinstance(value, str) else None
    if match is None:
        raise ValueError('expected a range of uids such as "200000-299999"')
    first, last = int(match.group(1)), int(match.group(2))
    if not 1000 <= first <= last < 2**32 - 1:
        raise ValueError("expected FIRST-LAST with 1000 <= FIRST <= LAST < 4294967295")
    return first, last


def _cluster_name(value: Any) -> str:
    # Part of queue and exchange names: keep it to what reads well in them.
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise ValueError("expected 1 to 64 of A-Z a-z 0-9 _ . -")
    return value


def _choice(*options: str):
    def coerce(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return value

    return coerce


_SCHEMA: dict[str, tuple[type, dict[str, Any]]] = {
    "server": (ServerConfig, {"host": _str, "port": _port, "max_body_mb": _body_mb,
                              "insecure": _bool, "idle_timeout_s": _positive_float,
                              "body_timeout_s": _positive_float}),
    "paths": (PathsConfig, {"functions": _path, "data": _path}),
    "limits": (LimitsConfig, {"max_concurrency": _positive_int}),
    "workers": (WorkersConfig, {"freeze_after_ms": _non_negative_int,
                                "reply_poll_us": _non_negative_int,
                                "keep_warm_s": _positive_float, "run_as": _optional_str,
                                "drain_timeout_s": _positive_float, "zygote": _bool, "tmpfs": _bool,
                                "python": _optional_str, "function_users": _uid_range}),
    "amqp": (AmqpConfig, {"url": _amqp_url}),
    "cluster": (ClusterConfig, {"mode": _choice("local", "amqp"), "name": _cluster_name,
                                "node": _optional_str, "address": _optional_str,
                                "heartbeat_s": _positive_float, "prefetch": _positive_int}),
    "auth": (AuthConfig, {"keys": _keys}),
    "log": (LogConfig, {"format": _choice("text", "json"),
                        "level": _choice("debug", "info", "warning", "error"),
                        "max_file_mb": _non_negative_int, "keep_files": _positive_int}),
}


def default_config_path(env: Mapping[str, str] = os.environ) -> Path | None:
    """The config file `faasd` uses when `--config` is not given."""
    if env.get("FAASD_CONFIG"):
        return Path(env["FAASD_CONFIG"])
    candidate = Path("config/faasd.toml")
    try:
        return candidate if candidate.is_file() else None
    except OSError:  # a working directory this user may not search holds no config of theirs
        return None


def load_config(
    path: Path | str | None = None,
    *,
    env: Mapping[str, str] = os.environ,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Build the Config from file, environment and `overrides` (CLI flags).

    `overrides` is `{section: {key: value}}`; None values are ignored so that
    unset flags fall through to the file.
    """
    if path is None:
        path = default_config_path(env)
    raw: dict[str, Any] = {}
    base = Path.cwd()
    source: Path | None = None
    if path is not None:
        source = _resolve(Path(path), str(path))
        try:
            raw = tomllib.loads(read_file(source).decode())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: byte {exc.start} is not UTF-8, and TOML "
                              "files are UTF-8 text") from None
        except PermissionError:
            raise ConfigError(f"{path}: cannot be read by {this_user()}, whom faasd runs as: let its "
                              f"group read it (chgrp {_group_name()} {source} && chmod 640 {source})") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
        except RecursionError:
            raise ConfigError(f"{path}: cannot be read: arrays or tables nested too deeply") from None
        base = source.parent
        unknown = set(raw) - set(_SCHEMA)
        if unknown:
            raise ConfigError(
                f"{path}: unknown section [{sorted(unknown)[0]}]; "
                f"known sections: {', '.join(_SCHEMA)}"
            )

    for name in sorted(env):
        # A mistyped variable (FAASD_WORKERS_RUNAS) would otherwise change nothing, unsaid.
        section, _, key = name.removeprefix("FAASD_").partition("_")
        if name.startswith("FAASD_") and name.isupper() and section.lower() in _SCHEMA:
            fields = _SCHEMA[section.lower()][1]
            if key.lower() not in fields:
                raise ConfigError(f"${name}: unknown key {section.lower()}.{key.lower()}; known keys: "
                                  f"{', '.join(fields)} (as FAASD_{section}_<KEY>)")

    sections: dict[str, Any] = {}
    # What each [paths] value is relative to: the file's directory for the
    # file's values and the defaults, the current one for environment and flags.
    path_bases: dict[str, Path] = {}
    for section, (cls, fields) in _SCHEMA.items():
        values: dict[str, Any] = {}
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        for key, value in table.items():
            if key not in fields:
                raise ConfigError(
                    f"{path}: unknown key {section}.{key}; known keys: {', '.join(fields)}"
                )
            values[key] = _coerce(fields[key], value, f"{path}: {section}.{key}")
        for key, coercer in fields.items():
            env_name = f"FAASD_{section.upper()}_{key.upper()}"
            flag = (overrides or {}).get(section, {}).get(key)
            if env_name in env:
                values[key] = _coerce(getattr(coercer, "from_env", coercer), env[env_name],
                                      f"${env_name}")
            if flag is not None:
                values[key] = _coerce(coercer, flag, f"--{key.replace('_', '-')}")
            if section == "paths" and (env_name in env or flag is not None):
                path_bases[key] = Path.cwd()
        sections[section] = cls(**values)

    if sections["cluster"].mode == "amqp" and not sections["amqp"].url:
        raise ConfigError((f"{path}: " if path else "") + "[cluster] mode = \"amqp\" needs the "
                          "broker's address: set [amqp] url (or FAASD_AMQP_URL)")
    if sections["workers"].function_users and not sections["workers"].run_as:
        raise ConfigError((f"{path}: " if path else "") + "[workers] function_users needs run_as: "
                          "the functions' users join run_as's group")
    paths: PathsConfig = sections["paths"]
    sections["paths"] = replace(
        paths,
        functions=_resolve(path_bases.get("functions", base) / paths.functions, "paths.functions"),
        data=_resolve(path_bases.get("data", base) / paths.data, "paths.data"),
    )
    return Config(**sections, source=source)


def _group_name() -> str:
    import grp

    try:
        return grp.getgrgid(os.getegid()).gr_name
    except KeyError:
        return str(os.getegid())


def _resolve(path: Path, what: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise ConfigError(f"{what}: cannot be resolved: {exc}") from None


def _coerce(coercer: Any, value: Any, where: str) -> Any:
    try:
        return coercer(value)
    except (TypeError, ValueError, OverflowError) as exc:
        shown = getattr(coercer, "shown", repr)(value)
        raise ConfigError(f"{where}: {shown} is not valid: {exc}") from None
