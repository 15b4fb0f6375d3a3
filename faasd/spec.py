"""What a function is: its files on disk turned into a `FunctionSpec`.

A spec is built from one entry of `functions/` (a file `NAME.py`, `NAME.js`,
`NAME.mjs` or `NAME.cjs` with an optional sidecar `NAME.toml`, or a directory
`NAME/` with an optional `function.toml`). Building never raises for the user's mistakes:
a spec that cannot load carries `load_error`, so that the function is listed
and reported while every other function keeps working.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from . import __version__
from .protocol import syntax_error_frame
from .pysource import ModuleFacts, parse

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RUNTIMES = ("python", "node", "provided")
# Lambda's runtime identifier (GetFunction's `Runtime`, and what AWS_EXECUTION_ENV
# names) where the machine does not tell: Python's is the workers' interpreter's
# version, Node's the `node` on PATH's, this one without a `node` (runtime_id).
RUNTIME_IDS = {"node": "nodejs20.x", "provided": "provided.al2023"}
FILE_RUNTIMES = {".py": "python", ".js": "node", ".mjs": "node", ".cjs": "node"}
DEFAULT_HANDLERS = {"python": "handler.handler", "node": "index.handler", "provided": "bootstrap"}
TRIGGER_TYPES = ("http", "file", "cron", "amqp")
# Lambda's LoggingConfig: the log format, and (JSON only) the levels that pass.
LOG_FORMATS = ("Text", "JSON")
APPLICATION_LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL")
SYSTEM_LOG_LEVELS = ("DEBUG", "INFO", "WARN")
ON_FAILURE_RE = re.compile(r"^(dir|function:[A-Za-z0-9_-]{1,64})$")

# Entries of functions/ that are never functions: editor droppings, hidden
# files, bytecode caches.
IGNORED_SUFFIXES = (".swp", ".swx", ".tmp", "~", ".pyc")


def valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name))


class SpecError(Exception):
    """A function's files or configuration are unusable; the text says why."""


@dataclass(frozen=True, kw_only=True)
class AsyncConfig:
    max_retries: int = 2
    retry_delays_s: tuple[float, ...] = (60.0, 120.0)
    max_event_age_s: float = 21600.0
    on_failure: str = "dir"
    on_success: str | None = None

    def retry_delay(self, attempt: int) -> float:
        """Delay before retry number `attempt` (1-based)."""
        delays = self.retry_delays_s or (0.0,)
        return delays[min(attempt, len(delays)) - 1]


@dataclass(frozen=True, kw_only=True)
class Trigger:
    type: str
    options: Mapping[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


@dataclass(frozen=True, kw_only=True)
class FunctionSpec:
    name: str
    runtime: str
    handler: str
    task_root: Path  # the directory put on the module path / cwd of workers
    source: Path  # the file or directory the function came from
    config_file: Path | None = None
    revision: str = ""  # changes whenever any of the function's files change
    memory_mb: int = 128
    timeout_s: float = 3.0
    tmp_mb: int = 512
    concurrency: int | None = None
    min_warm: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    async_config: AsyncConfig = field(default_factory=AsyncConfig)
    triggers: tuple[Trigger, ...] = ()
    log_format: str = "Text"  # "Text" or "JSON"
    application_log_level: str | None = None  # JSON only: TRACE ... FATAL
    system_log_level: str | None = None  # JSON only: DEBUG, INFO or WARN
    load_error: str | None = None
    load_trace: tuple[str, ...] = ()  # the stack trace the runtime gives load_error

    @property
    def ok(self) -> bool:
        return self.load_error is None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "runtime": self.runtime,
            "handler": self.handler,
            "source": str(self.source),
            "revision": self.revision,
            "memory_mb": self.memory_mb,
            "timeout_s": self.timeout_s,
            "tmp_mb": self.tmp_mb,
            "concurrency": self.concurrency,
            "min_warm": self.min_warm,
            "env": sorted(self.env),  # names only: values may be secrets
            "log_format": self.log_format,
            "application_log_level": self.application_log_level,
            "system_log_level": self.system_log_level,
            "async": {
                "max_retries": self.async_config.max_retries,
                "retry_delays_s": list(self.async_config.retry_delays_s),
                "max_event_age_s": self.async_config.max_event_age_s,
                "on_failure": self.async_config.on_failure,
                "on_success": self.async_config.on_success,
            },
            "triggers": [{"type": t.type, **t.options} for t in self.triggers],
            "load_error": self.load_error,
        }


def entry_name(path: Path) -> str | None:
    """The function name an entry of functions/ would define, or None."""
    base = path.name
    if base.startswith((".", "_")) or base.endswith(IGNORED_SUFFIXES):
        return None
    if path.is_dir():
        return base
    stem, suffix = os.path.splitext(base)
    if suffix in FILE_RUNTIMES:
        return stem
    return None


def discover(functions_dir: Path) -> dict[str, Path]:
    """Map function name -> the file or directory that defines it.

    Sidecar `NAME.toml` files are found by `load_spec`, not listed here. When
    two entries claim one name (`a.py` and `a/`), the directory wins, else
    the first by name (`a.mjs` before `a.py`); `shadowed` lists the others.
    """
    return _claims(functions_dir)[0]


def shadowed(functions_dir: Path) -> dict[str, str]:
    """Entries of functions/ that define no function because another entry
    claims the same name: {entry: the entry that defines the function}."""
    return _claims(functions_dir)[1]


def _claims(functions_dir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    found: dict[str, Path] = {}
    losers: dict[str, str] = {}
    try:
        entries = sorted(os.scandir(functions_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return found, losers
    for entry in entries:
        if not is_utf8(entry.name):
            continue  # see misnamed()
        path = Path(entry.path)
        name = entry_name(path)
        if name is None:
            continue
        if name in found:
            if not path.is_dir() or found[name].is_dir():
                losers[path.name] = found[name].name
                continue
            losers[found[name].name] = path.name
        found[name] = path
    return found, losers


def this_user() -> str:
    """`uid N (NAME)`: whom faasd runs as, for a message about what it may not read or write."""
    uid = os.geteuid()
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def functions_dir_problem(functions_dir: Path) -> str | None:
    """Why faasd cannot serve the functions in `functions_dir`, and the fix; None if it can.
    `faasd check` prints it and `faasd serve` stops with it."""
    elsewhere = "set [paths] functions (or --functions) to the directory that holds them"
    try:
        with os.scandir(functions_dir):
            return None
    except FileNotFoundError:
        return f"{functions_dir} does not exist: create it, or {elsewhere}"
    except NotADirectoryError:
        return f"{functions_dir} is not a directory: {elsewhere}"
    except PermissionError:
        return (f"{functions_dir} cannot be read by {this_user()}, whom faasd runs as: make it "
                f"and every directory above it readable by that user, or {elsewhere}")
    except OSError as exc:
        return f"{functions_dir} cannot be read: {exc.strerror}"


def config_file_of(source: Path) -> Path | None:
    """The function's settings: `function.toml` in its directory, or the sidecar
    `NAME.toml` of a single file; None where there is none."""
    path = source / "function.toml" if source.is_dir() else source.with_suffix(".toml")
    try:
        os.stat(path)
    except OSError:
        return None
    return path  # a directory too: load_spec says it cannot be settings


def read_file(path: Path) -> bytes:
    """The contents of a regular file, read without ever blocking.

    Anything else raises OSError "not a regular file" unread: a FIFO would
    hold the reader until some writer came, a device would never end. The
    open itself cannot wait either (O_NONBLOCK), should the file be swapped
    for a FIFO after the first look.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError("not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with open(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file")
        return handle.read()


def misnamed(functions_dir: Path) -> list[str]:
    """Entries of functions/ whose names are not valid UTF-8, with the bad bytes
    shown escaped (`bad\\xff.py`). `discover` leaves them out: no function may
    have such a name, and no listing, log line or metric label could carry it."""
    try:
        names = sorted(entry.name for entry in os.scandir(functions_dir))
    except FileNotFoundError:
        return []
    return [os.fsencode(name).decode(errors="backslashreplace") for name in names
            if not is_utf8(name) and entry_name(functions_dir / name) is not None]


def is_utf8(name: str) -> bool:
    """False for a name that was not valid UTF-8 on disk (os.fsdecode kept its bytes as surrogates)."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def load_spec(name: str, source: Path, python: str = sys.executable) -> FunctionSpec:
    """Build the spec for one entry of functions/ (`python`: the Python workers'
    interpreter, whose grammar the code is checked in). Never raises SpecError."""
    is_dir = source.is_dir()
    task_root = source if is_dir else source.parent
    config_file = config_file_of(source)
    base = FunctionSpec(
        name=name,
        runtime=_guess_runtime(source) or "python",
        handler="",
        task_root=task_root,
        source=source,
        config_file=config_file,
        revision=revision_of(source, config_file),
    )
    try:
        if not valid_name(name):
            raise SpecError(
                f"invalid function name {name!r}: use 1 to 64 of A-Z a-z 0-9 _ -"
            )
        for path in (source, config_file):
            problem = outside_functions(source.parent, path)
            if problem:
                raise SpecError(problem)
        if config_file is not None and config_file.is_dir():
            raise SpecError(f"{config_file.name} is a directory, not a TOML file of settings")
        if not is_dir and not _is_regular(source):
            raise SpecError(f"{source.name}: not a regular file: a function is a file or a directory "
                            "(a FIFO, socket or device cannot be one)")
        raw = _read_toml(config_file) if config_file else {}
        return _build(base, raw, is_dir, python)
    except SpecError as exc:
        return _with(base, load_error=str(exc), handler=base.handler or "?")


def outside_functions(functions_dir: Path, path: Path | None) -> str | None:
    """Why `path` may not be used: a symlink out of functions/ (faasd would read, and
    report, whatever it points at); None when it stays inside."""
    if path is None or not path.is_symlink() and path.parent == functions_dir:
        return None
    try:
        target = path.resolve(strict=True)
        root = functions_dir.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling link, or a loop
        return f"{path.name} is a broken symlink"
    if target != root and root not in target.parents:
        return (f"{path.name} is a symlink to {target}, outside the functions directory: "
                "copy the code into it instead")
    return None


def _with(spec: FunctionSpec, **changes: Any) -> FunctionSpec:
    return replace(spec, **changes)


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(read_file(path).decode())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path.name}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path.name}: cannot be read: {exc}") from None


def _guess_runtime(source: Path) -> str | None:
    if not source.is_dir():
        return FILE_RUNTIMES.get(source.suffix)
    if (source / "handler.py").is_file():
        return "python"
    if any((source / f"index{suffix}").is_file() for suffix in (".js", ".mjs", ".cjs")):
        return "node"
    bootstrap = source / "bootstrap"
    if bootstrap.is_file() and os.access(bootstrap, os.X_OK):
        return "provided"
    return None


_KNOWN_KEYS = {
    "runtime", "handler", "memory_mb", "timeout_s", "tmp_mb", "concurrency",
    "min_warm", "env", "async", "triggers", "log_format", "application_log_level", "system_log_level",
}


def _build(base: FunctionSpec, raw: dict[str, Any], is_dir: bool, python: str) -> FunctionSpec:
    where = base.config_file.name if base.config_file else base.source.name
    unknown = set(raw) - _KNOWN_KEYS
    if unknown:
        raise SpecError(
            f"{where}: unknown key {sorted(unknown)[0]!r}; known keys: {', '.join(sorted(_KNOWN_KEYS))}"
        )
    runtime = raw.get("runtime")
    if runtime is None and is_dir and isinstance(raw.get("handler"), str):
        # handler = "main.run" names the module: main.py is Python, main.js Node.
        module = raw["handler"].rpartition(".")[0].replace(".", "/")
        for suffix, guess in FILE_RUNTIMES.items():
            if module and (base.source / (module + suffix)).is_file():
                runtime = guess
                break
    if runtime is None:
        runtime = _guess_runtime(base.source)
        if runtime is None:
            raise SpecError(
                f"{base.source.name}/: cannot tell the runtime: add handler.py, index.js, "
                "an executable bootstrap, or set runtime in function.toml"
            )
    if runtime not in RUNTIMES:
        raise SpecError(f"{where}: runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if not is_dir and FILE_RUNTIMES.get(base.source.suffix) != runtime:
        raise SpecError(
            f"{where}: runtime {runtime!r} does not match the file {base.source.name}"
        )

    handler = raw.get("handler")
    if handler is None:
        handler = DEFAULT_HANDLERS[runtime] if is_dir else _single_file_handler(base.source, python)
    if not isinstance(handler, str) or not handler or "\0" in handler:
        raise SpecError(f"{where}: handler must be a string like 'module.function'")
    if runtime != "provided" and "." not in handler:
        raise SpecError(f"{where}: handler {handler!r} must be 'module.function'")

    env = _env(raw.get("env", {}), where)
    logging_config = _logging(raw, env, where)
    spec = _with(
        base,
        runtime=runtime,
        handler=handler,
        memory_mb=_int(raw, "memory_mb", 128, where, low=16, high=10240),
        timeout_s=_number(raw, "timeout_s", 3.0, where, low=0.001, high=900),
        tmp_mb=_int(raw, "tmp_mb", 512, where, low=1, high=10240),
        # 0 as Lambda allows it: "To throttle a function, set the reserved concurrency to zero."
        concurrency=_int(raw, "concurrency", None, where, low=0, high=100000),
        min_warm=_int(raw, "min_warm", 0, where, low=0, high=1000),
        env=env,
        **logging_config,
        async_config=_async(raw.get("async", {}), where),
        triggers=_triggers(raw.get("triggers", []), where),
    )
    if spec.concurrency is not None and spec.min_warm > spec.concurrency:
        raise SpecError(f"{where}: min_warm ({spec.min_warm}) exceeds concurrency ({spec.concurrency})")
    problem = check_code(spec, python)
    if problem:
        return _with(spec, load_error=problem[0], load_trace=problem[1])
    return spec


def _single_file_handler(source: Path, python: str) -> str:
    module = source.stem
    if source.suffix == ".py":
        # `handler`, or `lambda_handler` where `handler` is absent.
        try:
            names = module_facts(source, python).names
        except OSError:
            names = None
        if names is not None and "handler" not in names and "lambda_handler" in names:
            return f"{module}.lambda_handler"
    return f"{module}.handler"


def module_facts(path: Path, python: str = sys.executable) -> ModuleFacts:
    """The facts of a module file as `python` (the workers' interpreter) reads it,
    parsed once for each version of it (OSError if it cannot be read)."""
    status = os.stat(path)
    return _module_facts(path, status.st_ino, status.st_size, status.st_mtime_ns, python)


@functools.lru_cache(maxsize=64)
def _module_facts(path: Path, inode: int, size: int, mtime_ns: int, python: str) -> ModuleFacts:
    return parse(read_file(path), path.name, _other_grammar(python))


def _other_grammar(python: str) -> str | None:
    """`python` where it is another Python version than this one (code valid there,
    `type X = int` on 3.12, may not parse here, and the other way round); else None."""
    try:
        other = python_interpreter(python).version != sys.version_info[:2]
    except InterpreterError:  # the daemon refuses to start with it; `faasd check` says why
        return None
    return python if other else None


def check_code(spec: FunctionSpec, python: str = sys.executable) -> tuple[str, tuple[str, ...]] | None:
    """A static look at the handler's code: the errors Lambda reports at init, each
    with the stack trace its runtime gives it (a syntax error's one frame; else none).

    Only Python is checked here (syntax, module and handler presence); other
    runtimes report these errors when a worker starts.
    """
    if spec.runtime == "provided":
        bootstrap = spec.task_root / "bootstrap"
        if not bootstrap.is_file():
            return "Runtime.InvalidEntrypoint: no bootstrap file in the function directory", ()
        if not os.access(bootstrap, os.X_OK):
            return "Runtime.InvalidEntrypoint: bootstrap is not executable (chmod +x bootstrap)", ()
        return None
    if spec.runtime != "python":
        return None
    module, _, function = spec.handler.rpartition(".")
    path = spec.task_root / (module.replace(".", "/") + ".py")
    problem = outside_functions(spec.source.parent, path) if path.is_symlink() else None
    if problem:
        return f"Runtime.ImportModuleError: Unable to import module '{module}': {problem}", ()
    if not path.exists():
        if (spec.task_root / module.replace(".", "/") / "__init__.py").is_file():
            return None
        return f"Runtime.ImportModuleError: Unable to import module '{module}': No module named '{module}'", ()
    try:
        facts = module_facts(path, python)
    except OSError as exc:
        return f"Runtime.ImportModuleError: Unable to import module '{module}': {path.name}: {exc}", ()
    if facts.syntax_error:
        # awslambdaric's frame names the file as imported: the task root on sys.path, then the module.
        trace = () if facts.syntax_at is None else (syntax_error_frame(str(path), *facts.syntax_at),)
        return f"Runtime.UserCodeSyntaxError: Syntax error in module '{module}': {facts.syntax_error}", trace
    if facts.names is not None and function not in facts.names:
        return f"Runtime.HandlerNotFound: Handler '{function}' missing on module '{module}'", ()
    return None


def _int(raw: dict, key: str, default: int | None, where: str, *, low: int, high: int) -> int | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"{where}: {key} = {value!r}: expected a whole number from {low} to {high}")
    return value


def _number(raw: dict, key: str, default: float, where: str, *, low: float, high: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise SpecError(f"{where}: {key} = {value!r}: expected a number from {low:g} to {high:g}")
    return float(value)


# Set by faasd for every worker, as Lambda sets them: Lambda refuses them in a
# function's configuration, and faasd's own would win over them unseen.
RESERVED_ENV = frozenset({
    "_HANDLER", "_X_AMZN_TRACE_ID", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE", "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_LAMBDA_RUNTIME_API", "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR", "TMPDIR",
})


def _env(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise SpecError(f"{where}: [env] must be a table of NAME = \"value\"")
    reserved = sorted(RESERVED_ENV.intersection(value))
    if reserved:
        raise SpecError(f"{where}: [env] sets {', '.join(reserved)}: reserved, as in Lambda; faasd "
                        "sets them for every worker (AWS_REGION: the one faasd was started with)")
    env: dict[str, str] = {}
    for key, item in value.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise SpecError(f"{where}: env name {key!r} is not a valid environment variable name")
        if isinstance(item, bool):
            item = "true" if item else "false"
        if not isinstance(item, (str, int, float)):
            raise SpecError(f"{where}: env.{key} must be a string or a number")
        if isinstance(item, str) and "\0" in item:
            raise SpecError(f"{where}: env.{key} holds a NUL character, which no environment "
                            "variable can")
        env[key] = str(item)
    return env


# What [env] could set before function.toml had the logging keys: read as them.
LEGACY_LOG_ENV = {"AWS_LAMBDA_LOG_FORMAT": "log_format", "AWS_LAMBDA_LOG_LEVEL": "application_log_level"}


def _logging(raw: dict, env: dict[str, str], where: str) -> dict[str, str | None]:
    """The function's LoggingConfig: `log_format`, and with JSON `application_log_level`
    and `system_log_level` (INFO unless set), as Lambda allows them.

    Lambda sets AWS_LAMBDA_LOG_FORMAT and AWS_LAMBDA_LOG_LEVEL for the worker
    from these. An [env] that sets them (the way to JSON logs before these keys)
    is read as the key it stands for, and taken out of [env]; setting both is an error.
    """
    values = {key: raw[key] for key in ("log_format", "application_log_level", "system_log_level")
              if key in raw}
    labels = {key: key for key in values}
    for name, key in LEGACY_LOG_ENV.items():
        if name in env:
            if key in values:
                raise SpecError(f"{where}: [env] sets {name} and {key} is set too: keep {key} "
                                f"only (faasd sets {name} from it)")
            values[key] = env.pop(name)
            labels[key] = f"[env] {name}"

    def choice(key: str, choices: tuple[str, ...]) -> str | None:
        value = values.get(key)
        if value is None:
            return None
        # Any case in the file (`json` is JSON); as Lambda spells them in the result.
        for spelt in choices:
            if isinstance(value, str) and value.upper() == spelt.upper():
                return spelt
        raise SpecError(f"{where}: {labels[key]} = {value!r}: expected one of {', '.join(choices)}")

    log_format = choice("log_format", LOG_FORMATS) or "Text"
    levels = {"application_log_level": choice("application_log_level", APPLICATION_LOG_LEVELS),
              "system_log_level": choice("system_log_level", SYSTEM_LOG_LEVELS)}
    if log_format == "JSON":
        return {"log_format": log_format, **{key: level or "INFO" for key, level in levels.items()}}
    for key, level in levels.items():
        if level is not None:
            raise SpecError(f"{where}: {labels[key]} = {level!r} needs log_format = \"JSON\": as in "
                            "Lambda, log levels are filtered only in JSON logs")
    return {"log_format": log_format, **levels}


def _async(value: Any, where: str) -> AsyncConfig:
    if not isinstance(value, dict):
        raise SpecError(f"{where}: [async] must be a table")
    known = {"max_retries", "retry_delays_s", "max_event_age_s", "on_failure", "on_success"}
    unknown = set(value) - known
    if unknown:
        raise SpecError(f"{where}: unknown key async.{sorted(unknown)[0]}; known: {', '.join(sorted(known))}")
    max_retries = _int(value, "max_retries", 2, where + ": async", low=0, high=2)
    delays = value.get("retry_delays_s", [60, 120])
    if not isinstance(delays, list) or not all(
        isinstance(d, (int, float)) and not isinstance(d, bool) and d >= 0 for d in delays
    ):
        raise SpecError(f"{where}: async.retry_delays_s must be a list of seconds, e.g. [60, 120]")
    age = _number(value, "max_event_age_s", 21600, where + ": async", low=60, high=21600)
    on_failure = value.get("on_failure", "dir")
    if not isinstance(on_failure, str) or not ON_FAILURE_RE.match(on_failure):
        raise SpecError(f"{where}: async.on_failure must be \"dir\" or \"function:NAME\"")
    on_success = value.get("on_success")
    if on_success is not None and (
        not isinstance(on_success, str) or not on_success.startswith("function:")
        or not ON_FAILURE_RE.match(on_success)
    ):
        raise SpecError(f"{where}: async.on_success must be \"function:NAME\"")
    return AsyncConfig(
        max_retries=max_retries,
        retry_delays_s=tuple(float(d) for d in delays),
        max_event_age_s=age,
        on_failure=on_failure,
        on_success=on_success,
    )


def _triggers(value: Any, where: str) -> tuple[Trigger, ...]:
    if not isinstance(value, list):
        raise SpecError(f"{where}: triggers must be written as [[triggers]] tables")
    triggers = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise SpecError(f"{where}: triggers[{index}] must be a table")
        kind = item.get("type")
        if kind not in TRIGGER_TYPES:
            raise SpecError(
                f"{where}: triggers[{index}].type = {kind!r}: expected one of {', '.join(TRIGGER_TYPES)}"
            )
        options = {k: v for k, v in item.items() if k != "type"}
        if kind == "http":
            _check_http_trigger(options, f"{where}: triggers[{index}]")
        else:
            from .triggers.options import check_trigger  # file, cron, amqp

            try:
                options = check_trigger(kind, options)
            except ValueError as exc:
                raise SpecError(f"{where}: triggers[{index}] ({kind}): {exc}") from None
        triggers.append(Trigger(type=kind, options=options))
    return tuple(triggers)


HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "ANY"}


HTTP_TRIGGER_KEYS = {"path", "methods", "auth"}
# Lambda's API lives under dated prefixes (/2015-03-31/...), all of them faasd's.
DATED_PREFIX_RE = re.compile(r"^/\d{4}-\d{2}-\d{2}(/|$)")
HTTP_AUTH_RE = re.compile(r"^(key|function:[A-Za-z0-9_-]{1,64})$")


def reserved_path(path: str) -> bool:
    """Whether `path` is faasd's own, so that no http trigger may take it."""
    return (path.startswith(("/function/", "/system/", "/ui/", "/metrics/"))
            or DATED_PREFIX_RE.match(path) is not None
            or path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/system", "/ui"))


def _check_http_trigger(options: dict, where: str) -> None:
    unknown = set(options) - HTTP_TRIGGER_KEYS
    if unknown:
        # A misspelt `auth` must not leave a route silently public.
        raise SpecError(f"{where}: unknown key {sorted(unknown)[0]!r} in an http trigger; "
                        f"known keys: type, {', '.join(sorted(HTTP_TRIGGER_KEYS))}")
    path = options.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise SpecError(f"{where}: http trigger needs path = \"/some/{{param}}\" starting with /")
    if reserved_path(path):
        raise SpecError(f"{where}: http trigger path {path!r} is reserved by faasd")
    from .triggers.http import compile_template, parameter_names  # as the route table will

    try:
        compile_template(path)
    except re.error as exc:
        params = parameter_names(path)
        twice = sorted({param for param in params if params.count(param) > 1})
        if twice:
            raise SpecError(f"{where}: http trigger path {path!r} names the parameter {{{twice[0]}}} "
                            "more than once: each needs a name of its own") from None
        raise SpecError(f"{where}: http trigger path {path!r} cannot be routed: {exc.msg}") from None
    auth = options.get("auth")
    if auth is not None and (not isinstance(auth, str) or not HTTP_AUTH_RE.match(auth)):
        raise SpecError(f"{where}: auth = {auth!r}: expected \"key\" (one of [auth] keys) or "
                        "\"function:NAME\" (an authorizer function)")
    methods = options.get("methods", ["ANY"])
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list) or not all(
        isinstance(m, str) and m.upper() in HTTP_METHODS for m in methods
    ):
        raise SpecError(f"{where}: methods must be a list of HTTP methods, e.g. [\"GET\", \"POST\"]")
    options["methods"] = [m.upper() for m in methods]


def code_files(source: Path) -> list[Path]:
    """The files of a function's code, in path order: the source file, or every
    file under the source directory except hidden entries and bytecode caches."""
    if not source.is_dir():
        return [source]
    found: list[Path] = []
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        found.extend(Path(root) / name for name in sorted(files)
                     if not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES))
    return found


def revision_of(source: Path, config_file: Path | None) -> str:
    """A fingerprint of the function's files: (path, size, mtime) of each.

    A large function dir costs one stat per file, once per rescan.
    """
    parts: list[str] = []
    files = code_files(source)
    if config_file is not None and not source.is_dir():
        files.append(config_file)
    for path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.blake2b(os.fsencode("\n".join(parts)), digest_size=8).hexdigest()


def code_sha256(spec: FunctionSpec) -> str:
    """Lambda's CodeSha256 for a function: base64 SHA-256 of its code.

    Lambda hashes the deployment package; here the package is the function's
    files, so the hash covers each code file's path (relative to the source)
    and contents. As in Lambda, settings (function.toml or the NAME.toml
    sidecar) are not code: changing them leaves the hash as it was. The files
    are read once per revision.
    """
    return _code_sha256(spec.source, spec.config_file, spec.revision)


@functools.lru_cache(maxsize=1024)
def _code_sha256(source: Path, config_file: Path | None, revision: str) -> str:
    digest = hashlib.sha256()
    base = source if source.is_dir() else source.parent
    for path in code_files(source):
        if path == config_file:
            continue
        try:
            data = read_file(path)
        except OSError:
            continue
        name = os.fsencode(path.relative_to(base).as_posix())
        digest.update(len(name).to_bytes(4, "big") + name + len(data).to_bytes(8, "big") + data)
    return base64.b64encode(digest.digest()).decode()


# Identity faasd gives functions, in Lambda's formats. The account id is a
# placeholder: there is one account, this box.
ACCOUNT_ID = "000000000000"
DEFAULT_REGION = "us-east-1"


_random_bits = random.Random().getrandbits  # seeded from os.urandom


def new_request_id() -> str:
    """A random (version 4) UUID as text, as Lambda's request ids are; without
    uuid.uuid4()'s syscall and object, as every invocation takes one."""
    value = (_random_bits(128) & ~(0xF000 << 64) & ~(0xC000 << 48)) | (0x4000 << 64) | (0x8000 << 48)
    text = value.to_bytes(16, "big").hex()  # fewer instructions than format(value, "032x")
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


MAX_TRACE_HEADER = 8192  # Lambda's own limit for an X-Ray trace header (TraceHeader.XAmznTraceId)


def new_trace_id(now: float | None = None) -> str:
    """A new X-Ray trace header, in the form Lambda gives an invocation that
    came without one (`now`: the epoch seconds of its root, if at hand);
    without a syscall, as every HTTP request without one takes one."""
    second = int(time.time() if now is None else now)
    bits = _random_bits(160).to_bytes(20, "big").hex()  # the root's 96 random bits, the parent's 64
    return f"Root=1-{second:08x}-{bits[:24]};Parent={bits[24:]};Sampled=0"


def caller_trace_id(value: str | None) -> str | None:
    """The caller's `X-Amzn-Trace-Id`, which the function runs under, as
    Lambda passes it on; None where there is none to pass (absent, or not a
    line of printable ASCII of at most MAX_TRACE_HEADER characters)."""
    if value and len(value) <= MAX_TRACE_HEADER and value.isascii() and value.isprintable():
        return value
    return None


def function_arn(name: str, region: str = DEFAULT_REGION) -> str:
    return f"arn:aws:lambda:{region}:{ACCOUNT_ID}:function:{name}"


class InterpreterError(Exception):
    """The Python workers' interpreter could not say what it is; the text says why."""


@dataclass(frozen=True)
class Interpreter:
    """What the Python workers' interpreter says of itself."""

    version: tuple[int, int]
    # Its site-packages: workers start with -S (no site.py, whose .pth files
    # cost a start tens of ms) and put these on sys.path themselves.
    site_packages: tuple[str, ...]


# Run with -I but without -S: site.py is what makes a virtual environment's
# prefix the one getsitepackages() reads.
_ASK_INTERPRETER = ("import json, os, site, sys; print(json.dumps({'version': sys.version_info[:2], "
                    "'site': [p for p in site.getsitepackages() if os.path.isdir(p)]}))")


@functools.cache
def python_interpreter(python: str) -> Interpreter:
    """Ask `python` once (a blocking child process) its version and site-packages;
    the daemon's own interpreter (the default) answers in process.
    Raises InterpreterError if it cannot answer."""
    if python == sys.executable:
        import site

        return Interpreter(version=tuple(sys.version_info[:2]),  # type: ignore[arg-type]
                           site_packages=tuple(p for p in site.getsitepackages() if os.path.isdir(p)))
    try:
        done = subprocess.run([python, "-I", "-c", _ASK_INTERPRETER], capture_output=True,
                              text=True, timeout=30, cwd="/", stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        raise InterpreterError(f"cannot run {python}: {exc}") from None
    try:
        # The last line: a .pth file of its site-packages may print too.
        answer = json.loads(done.stdout.splitlines()[-1])
        return Interpreter(version=tuple(answer["version"]), site_packages=tuple(answer["site"]))
    except (ValueError, IndexError, KeyError, TypeError):
        said = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise InterpreterError(f"{python} did not tell its version and site-packages: {said[-1]}") from None


@functools.cache
def runtime_id(runtime: str, python: str = sys.executable) -> str:
    """Lambda's identifier of the runtime that serves `runtime` here, as GetFunction
    reports it and AWS_EXECUTION_ENV carries it: python3.X for `python`, the Python
    workers' interpreter, nodejs<major>.x for the `node` on PATH (asked once: `node --version`)."""
    if runtime == "python":
        return "python%d.%d" % python_interpreter(python).version
    if runtime == "node":
        major = _node_major()
        if major is not None:
            return f"nodejs{major}.x"
    return RUNTIME_IDS.get(runtime, runtime)


def _node_major() -> int | None:
    node = shutil.which("node")
    if node is None:
        return None
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.match(r"v(\d+)\.", version.strip())
    return int(found[1]) if found else None


@functools.cache
def runtime_version(runtime: str, region: str = DEFAULT_REGION,
                    python: str = sys.executable) -> tuple[str, str]:
    """The runtime version that serves `runtime` and its ARN, as Lambda's INIT_START line
    names them (`python:3.13.v14`, `arn:aws:lambda:REGION::runtime:<sha256>`): here the
    runtime's identifier and the faasd release whose shim runs it, and a digest of that."""
    version = f"{runtime_id(runtime, python)}:faasd-{__version__}"
    return version, f"arn:aws:lambda:{region}::runtime:{hashlib.sha256(version.encode()).hexdigest()}"

