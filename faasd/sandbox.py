"""Worker isolation: what a worker process may touch, set up inside it before user code runs.

Two halves in one module. The worker half is standard library only and is
imported by worker processes, so this module must stay import-light.

Daemon half -- `Sandbox.detect()` runs once at start and decides, by
probing, what this host allows; `Sandbox.prepare()` gives each worker a
`WorkerPlan`: the JSON that the worker receives in `_FAASD_SANDBOX`, its pids
cgroup, and the `/tmp` usage check when `/tmp` is a plain directory.
`Sandbox.describe()` says which protections are active, and why not, for
/system/info. Where no cgroup holds a worker's processes, `MountNamespace`
finds them by the mount namespace the worker made for itself.

Worker half -- `enter(plan)` is the first thing a worker does: the Python
shim calls it itself; every other runtime is started through
`runtimes/sandbox_exec.py`, which calls it and then execs the runtime (same
pid), so one code path isolates every runtime. In order:

  1. join the worker's cgroups (memory, pids): everything it forks stays in them
     (cgroup v1 groups it joins itself, in microseconds: self_join_file);
  2. a private mount namespace -- as root, or inside a new user namespace
     when the daemon is unprivileged -- with a tmpfs of `tmp_mb` at /tmp (also
     seen at /var/tmp) and a small one at /dev/shm, the functions dir and
     faasd's package read-only, the data dir (other functions' logs, queued
     events) and the config file (auth secrets) hidden;
  3. rlimits: NOFILE, FSIZE (= tmp_mb), CORE = 0, and NPROC when the worker
     runs as a dedicated user (NPROC counts every process of a uid, so on a
     uid shared with the daemon it would throttle the daemon too);
  4. no new privileges (setuid binaries gain nothing), then the drop to
     `run_as` -- or to the function's own uid, with `[workers] function_users`
     (FunctionUsers) -- with no supplementary groups; inside a user
     namespace, every capability is dropped instead;
  5. PR_SET_PDEATHSIG: the kernel kills the worker when the daemon dies.
     Set last, because a change of credentials clears it.

Where a mount namespace is impossible (systemd's RestrictNamespaces=, a
container without CAP_SYS_ADMIN) or `[workers] tmpfs = false`, /tmp stays a
per-worker directory on the data disk: RLIMIT_FSIZE stops any one file at
`tmp_mb` (the write fails with EFBIG), and the daemon measures the directory
while an invocation runs, stopping the worker when the total passes `tmp_mb`.

A plan that cannot be carried out stops the worker before user code runs:
faasd never runs a function with less isolation than it promised.
"""

from __future__ import annotations

import json
import os
import sys

from . import libc  # the worker half's system calls; light, unlike ctypes (faasd/libc.py)

TYPE_CHECKING = False  # typing itself costs a worker's start a few ms
if TYPE_CHECKING:
    from typing import Any, Callable

# Names the plan in a worker's environment; removed before user code runs.
PLAN_ENV = "_FAASD_SANDBOX"
# The error type of a worker whose isolation could not be set up.
SETUP_ERROR = "Sandbox.SetupFailed"
# How a probe says that the plan worked but the interpreter's library is out of reach.
IMPORTS_FAILED = "cannot import the standard library: "
MB = 1024 * 1024

# Lambda's per-environment limits.
MAX_OPEN_FILES = 1024
MAX_PROCESSES_PER_WORKER = 1024  # processes and threads, enforced with a pids cgroup
SHM_MAX_MB = 64  # /dev/shm, as Docker's default
PARENT_JOIN_WAIT_S = 2.0  # how long a worker waits for the daemon to move it into its cgroups

# Linux constants (uapi headers).
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# statvfs f_flag bits -> the mount flags a remount must keep (a user
# namespace may not clear flags it inherited locked).
_LOCKED_FLAGS = ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC),
                 (1024, MS_NOATIME), (2048, MS_NODIRATIME), (4096, MS_RELATIME))


class SandboxError(Exception):
    """The worker's isolation could not be set up as planned."""


# -- worker half ------------------------------------------------------------------------

def _check(result: int, what: str) -> None:
    if result != 0:
        raise SandboxError(f"{what}: {os.strerror(libc.errno())}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(libc.call("mount", source.encode() if source else None, target.encode(),
                 fstype.encode() if fstype else None, flags, data.encode() if data else None),
           f"mount {fstype or 'bind'} on {target}")


def _prctl(option: int, arg: int) -> None:
    _check(libc.call("prctl", option, arg, 0, 0, 0), f"prctl({option})")


def _locked_flags(path: str) -> int:
    flags = os.statvfs(path).f_flag
    return sum(ms for st, ms in _LOCKED_FLAGS if flags & st)


def _write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def _is_member(procs_file: str, pid: str) -> bool:
    try:
        with open(procs_file) as handle:
            return pid in handle.read().split()
    except OSError:
        return False


def self_join_file(procs_file: str) -> str | None:
    """The `tasks` file of the cgroup v1 group whose `cgroup.procs` is
    `procs_file`; None on cgroup v2, which has no such file.

    Writing 0 to `tasks` moves the writing thread only, and the kernel does
    that without its global threadgroup lock. Moving a whole process
    (`cgroup.procs`, or any pid but 0) takes that lock for writing, which
    waits out an RCU grace period (5 to 20 ms) and holds up every fork and
    exit on the host meanwhile. For a process with one thread, as every
    worker is when it joins, moving its thread moves the process.
    """
    tasks = os.path.join(os.path.dirname(procs_file), "tasks")
    return tasks if os.path.exists(tasks) else None


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _join_cgroups(procs_files: list[str]) -> None:
    """Be in every cgroup of `procs_files` before going on.

    A cgroup v1 group it joins itself, through its `tasks` file
    (self_join_file: microseconds). A cgroup v2 one the daemon moves it into
    already, while the interpreter starts (join_cgroups_of): wait for that,
    and join only what it has not done in time.
    """
    pid = str(os.getpid())
    single = _single_threaded()
    waiting = []
    for path in procs_files:
        tasks = self_join_file(path)
        if tasks is not None and single:
            _join(path, tasks, "0")
        else:
            waiting.append(path)
    procs_files = waiting
    if procs_files and all(os.path.exists(path) for path in procs_files):  # else nobody can join it
        import time

        deadline = time.monotonic() + PARENT_JOIN_WAIT_S
        while True:
            procs_files = [path for path in procs_files if not _is_member(path, pid)]
            if not procs_files or time.monotonic() > deadline:
                break
            time.sleep(0.0005)
    for path in procs_files:
        _join(path, path, pid)


def _join(procs_file: str, target: str, text: str) -> None:
    """Write `text` to `target`, a file of the group of `procs_file`, or say which group failed."""
    try:
        _write(target, text)
    except OSError as exc:
        raise SandboxError(f"cannot join cgroup {os.path.dirname(procs_file)}: {exc.strerror}") from None


def parent_moves(procs_files: list[str]) -> list[str]:
    """Of a worker's cgroups, those the daemon moves it into (cgroup v2's):
    it joins the others by itself."""
    return [path for path in procs_files if self_join_file(path) is None]


def join_cgroups_of(pid: int, procs_files: list[str]) -> None:
    """The daemon's half of _join_cgroups: move a just-started worker into its parent_moves()."""
    for path in procs_files:
        _write(path, str(pid))


def _new_namespaces(plan: dict[str, Any]) -> None:
    if plan.get("userns"):
        uid, gid = os.getuid(), os.getgid()
        _check(libc.call("unshare", CLONE_NEWUSER | CLONE_NEWNS), "unshare(user, mount namespace)")
        # The worker keeps its own uid inside; it gets no other.
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    else:
        _check(libc.call("unshare", CLONE_NEWNS), "unshare(mount namespace)")
    # Nothing mounted here may propagate back to the host.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)


# The worker's private /tmp: where it is, the others bound to it, what in it
# stays reachable, and whether /dev/shm is a tmpfs of its own too ("shm").
# Kept for the workers a template forks, each of which covers them with a
# /tmp and a /dev/shm of its own (tmp_of_its_own).
_tmp: dict[str, Any] = {}


def _set_up_mounts(plan: dict[str, Any]) -> None:
    tmp_mb = int(plan["tmp_mb"])
    needed = plan.get("visible", [])
    scratch = [p for p in plan.get("tmp_paths", ["/tmp"]) if os.path.isdir(p)]
    if scratch:
        first = scratch[0]
        _tmp.update(path=first, keep=_within(needed, first),
                    bound=[other for other in scratch[1:] if not _within(needed, other)])
        _cover_tmp(tmp_mb)
    if os.path.isdir("/dev/shm") and not _within(needed, "/dev/shm"):
        _tmp["shm"] = True
        _cover_shm(tmp_mb)
    for path in plan.get("read_only", []):
        if os.path.exists(path):
            _mount(path, path, None, MS_BIND | MS_REC)
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _locked_flags(path))
    for path, keep in plan.get("hide", []):
        if os.path.isdir(path):
            _cover(path, MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=0755",
                   keep=keep, read_only=True)
        elif os.path.exists(path):
            _mount("/dev/null", path, None, MS_BIND)
    if plan.get("private_proc"):
        # A /proc of the worker's own whose processes of other users are
        # invisible (hidepid=2): the daemon, the host's services and, under
        # function_users, every other function's workers. Last: the steps
        # above may read the host's /proc.
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    chdir = plan.get("chdir")
    if chdir:
        # The cwd still points into the mount below the new ones.
        os.chdir(chdir)


def _cover_tmp(tmp_mb: int) -> None:
    path = _tmp["path"]
    _cover(path, MS_NOSUID | MS_NODEV, f"size={tmp_mb}m,nr_inodes={max(4096, tmp_mb * 256)},mode=1777",
           keep=_tmp["keep"], read_only=False)
    for other in _tmp["bound"]:
        _mount(path, other, None, MS_BIND)


def tmp_of_its_own(tmp_mb: int) -> None:
    """In a worker forked from a template, in a mount namespace of its own: a
    fresh /tmp, made as the template's was, keeping reachable what the
    template's kept (its code, its Python, where they live under the host's
    /tmp); a plain one where the template made none. And a fresh /dev/shm
    where the template had one of its own, which its forks would share."""
    if "path" not in _tmp:
        _tmp.update(path="/tmp", keep=[], bound=[])
    _cover_tmp(tmp_mb)
    if _tmp.get("shm"):
        _cover_shm(tmp_mb)


def scratch_written() -> list[str]:
    """What this worker's private /tmp and /dev/shm hold beyond what faasd put
    there (the paths kept reachable, and the directories leading to them): in
    a template, what its init wrote, which a fork's fresh ones would lack."""
    roots = [(_tmp["path"], _tmp["keep"])] if "path" in _tmp else []
    if _tmp.get("shm"):
        roots.append(("/dev/shm", []))
    written: list[str] = []
    for root, keep in roots:
        written += _written_in(root, keep)
    return written


def _written_in(directory: str, keep: list[str]) -> list[str]:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    written = []
    for name in names:
        path = os.path.join(directory, name)
        if path in keep:
            continue
        inner = [k for k in keep if k.startswith(path + "/")]
        if inner and os.path.isdir(path) and not os.path.islink(path):
            written += _written_in(path, inner)
        else:
            written.append(path)
    return written


def _cover_shm(tmp_mb: int) -> None:
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
           f"size={min(SHM_MAX_MB, tmp_mb)}m,mode=1777")


def _within(paths: list[str], directory: str) -> list[str]:
    """The entries of `paths` inside `directory`, outermost only."""
    prefix = directory.rstrip("/") + "/"
    inside = sorted(p for p in paths if p == directory or p.startswith(prefix))
    outermost = []
    for path in inside:
        if not any(path == o or path.startswith(o.rstrip("/") + "/") for o in outermost):
            outermost.append(path)
    return outermost


def _cover(path: str, flags: int, options: str, keep: list[str], read_only: bool) -> None:
    """Mount a fresh tmpfs on `path`, leaving the entries of `keep` (inside
    it) reachable at their old paths: the functions dir may live under /tmp,
    a worker's bytecode cache under the hidden data dir."""
    held = []
    for inner in keep:
        if inner != path and os.path.exists(inner):
            held.append((inner, os.path.isdir(inner), os.open(inner, os.O_PATH)))
    _mount("tmpfs", path, "tmpfs", flags, options)
    for inner, is_dir, fd in held:
        if is_dir:
            os.makedirs(inner, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(inner), exist_ok=True)
            os.close(os.open(inner, os.O_CREAT | os.O_WRONLY, 0o600))
        _mount(f"/proc/self/fd/{fd}", inner, None, MS_BIND | MS_REC)
        os.close(fd)
    if read_only:
        _mount(None, path, None, MS_REMOUNT | MS_RDONLY | flags)


def _set_limits(plan: dict[str, Any]) -> None:
    import resource

    for name, value in plan.get("rlimits", {}).items():
        which = getattr(resource, f"RLIMIT_{name}")
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and (value == resource.RLIM_INFINITY or value > hard):
            value = hard  # cannot raise past the hard limit without privilege
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError) as exc:
            raise SandboxError(f"cannot set RLIMIT_{name} to {value}: {exc}") from None


def _drop_capabilities() -> None:
    import struct

    # struct __user_cap_header_struct {u32 version; int pid}, and two (version 3)
    # struct __user_cap_data_struct {u32 effective, permitted, inheritable}: all zero.
    header = libc.buffer(8)
    struct.pack_into("=Ii", header, 0, _LINUX_CAPABILITY_VERSION_3, 0)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _check(libc.call("capset", header, libc.buffer(24)), "capset")


def _drop_privileges(plan: dict[str, Any]) -> None:
    uid, gid = plan.get("uid"), plan.get("gid")
    if uid is None:
        if plan.get("userns"):
            _drop_capabilities()
        return
    if os.geteuid() != 0:
        raise SandboxError(f"cannot switch to uid {uid}: the worker is not root")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgroups() not in ([], [gid]):
        raise SandboxError(f"switching to uid {uid} did not take")


def _die_with_parent(parent: int | str | None) -> None:
    import signal

    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent and os.getppid() != int(parent):
        raise SandboxError("the daemon exited while the worker started")


def apply(plan: dict[str, Any]) -> None:
    """Carry out a plan in this process. Raises SandboxError (or OSError)."""
    # Everything this needs is loaded now: after the drop to run_as, the
    # interpreter's own library may not be readable.
    for module in ("resource", "signal", "struct"):
        __import__(module)

    # Armed now for the wait below, and again at the end: a new user namespace
    # or a change of uid clears it.
    _die_with_parent(plan.get("parent_pid"))
    _join_cgroups(plan.get("cgroups", []))
    if plan.get("mount"):
        _new_namespaces(plan)
        _set_up_mounts(plan)
    _set_limits(plan)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _drop_privileges(plan)
    _die_with_parent(plan.get("parent_pid"))
    if plan.get("tmpdir"):
        os.environ["TMPDIR"] = plan["tmpdir"]


# How launch() says that the runtime could not be executed, where no control
# channel carries its INIT_ERROR (a provided bootstrap's worker): its last
# line of output starts with EXEC_FAILED, and it exits with EXEC_FAILED_STATUS.
EXEC_FAILED = "cannot run "
EXEC_FAILED_STATUS = 127


def _report(plan: Any, text: str, error_type: str = SETUP_ERROR) -> None:
    """Tell the daemon (INIT_ERROR on the control channel, when there is one) and stderr."""
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    fd = plan.get("control_fd") if isinstance(plan, dict) else None
    if fd is None:
        return
    from faasd import protocol

    payload = json.dumps({"errorType": error_type, "errorMessage": text, "stackTrace": []})
    try:
        os.write(int(fd), protocol.encode(protocol.INIT_ERROR, payload.encode()))
    except OSError:
        pass


def enter(value: str) -> None:
    """Isolate this worker process as `value` (the plan's JSON) says, or exit.

    Called before any user code runs. On failure the worker reports why and
    exits with status 70: it never runs with less isolation than planned.
    """
    plan = None
    try:
        plan = json.loads(value)
        apply(plan)
    except Exception as exc:  # whatever went wrong, user code must not run
        reason = str(exc) if isinstance(exc, (SandboxError, OSError)) else f"{type(exc).__name__}: {exc}"
        _report(plan, f"faasd could not isolate this worker: {reason}")
        os._exit(70)


# -- daemon half ------------------------------------------------------------------------
# Everything below runs in the daemon only.

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtimes", "sandbox_exec.py")
PYTHON_SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runtimes", "python_worker.py")
PIDS_V1_ROOT = "/sys/fs/cgroup/pids"
TMP_CHECK_INTERVAL_S = 0.25


def user_process_limit() -> int:
    """RLIMIT_NPROC for a dedicated run_as user: every task (process or
    thread) of that uid, all workers together. A quarter of the kernel's pid
    space, at most 16384: a fork bomb cannot starve the box of pids."""
    try:
        with open("/proc/sys/kernel/pid_max") as handle:
            pid_max = int(handle.read())
    except (OSError, ValueError):
        pid_max = 32768
    return max(1024, min(16384, pid_max // 4))


def tree_bytes(path: str) -> int:
    """Disk blocks used under `path`, in bytes (symlinks not followed)."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return total


class WorkerPlan:
    """One worker's isolation, from the daemon's side."""

    def __init__(self, sandbox: Sandbox, worker_id: str, plan: dict[str, Any],
                 pids_dir: str | None, tmp_dir: str, tmp_limit: int | None) -> None:
        self.sandbox = sandbox
        self.worker_id = worker_id
        self.plan = plan
        self.pids_dir = pids_dir  # a cgroup v1 pids group of this worker's own
        self.tmp_dir = tmp_dir
        self.tmp_limit = tmp_limit  # bytes, when /tmp is a directory the daemon measures

    def environment(self, control_fd: int | None = None) -> str:
        """The value of `_FAASD_SANDBOX` for the process."""
        plan = dict(self.plan)
        if control_fd is not None:
            plan["control_fd"] = control_fd
        return json.dumps(plan, separators=(",", ":"))

    def wrap(self, command: list[str]) -> list[str]:
        """The command that isolates the process before it becomes `command`."""
        if PYTHON_SHIM in command:
            return list(command)  # the Python shim calls enter() itself
        return [self.sandbox.python, "-I", "-S", LAUNCHER, *command]

    def tmp_exceeded(self) -> bool:
        """True when /tmp is a directory and it holds more than tmp_mb."""
        return self.tmp_limit is not None and tree_bytes(self.tmp_dir) > self.tmp_limit

    def kill_all(self) -> None:
        """SIGKILL every process of the worker's pids cgroup (those that left its process group too)."""
        if self.pids_dir is not None:
            pids_dir = self.pids_dir
            kill_every(lambda: set(read_pids(pids_dir)))

    def remove(self) -> bool:
        """Remove the pids cgroup; False while it still has members (killed ones take a moment)."""
        if self.pids_dir is not None:
            try:
                os.rmdir(self.pids_dir)
            except FileNotFoundError:
                pass
            except OSError:
                return False
        return True


def kill_every(members: Callable[[], set[int]]) -> None:
    """SIGKILL every process `members()` lists, again as long as it lists new ones
    (a fork bomb may add processes while we kill; killed ones may still be listed
    on their way out)."""
    import signal

    signalled: set[int] = set()
    for _ in range(20):
        pids = members()
        if pids <= signalled:
            return
        for pid in pids - signalled:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        signalled |= pids


class MountNamespace:
    """A worker's own mount namespace: where no cgroup holds a worker's
    processes, this one does.

    Every process a worker starts stays in the namespace it made for itself
    (sandbox `enter`, or a spare's own tmpfs), whatever its session, process
    group or parent, and nothing else is in it: only CAP_SYS_ADMIN could
    leave it or join it. The namespace is held open from the moment it is
    found, so that its inode number names it alone until close(): a freed
    namespace's number is soon reused by a new one (another worker's).
    """

    def __init__(self, fd: int, key: tuple[int, int]) -> None:
        self.fd = fd
        self.key = key  # (st_dev, st_ino) of its nsfs inode

    @classmethod
    def of(cls, pid: int) -> MountNamespace | None:
        """The mount namespace of process `pid` if it is its own: not its
        parent's (the daemon's, or a forked worker's template's); else None."""
        try:
            fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            mine = os.fstat(fd)
            with open(f"/proc/{pid}/stat", "rb") as stat:
                parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
            key = (mine.st_dev, mine.st_ino)
            others = {namespace_key(p) for p in (parent, os.getpid())}
        except (OSError, ValueError, IndexError):
            others = {None}
        if None in others or key in others:  # unknown counts as shared
            os.close(fd)
            return None
        return cls(fd, key)

    def pids(self) -> list[int]:
        """Every process in the namespace (a scan of /proc)."""
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit() and self._holds(name):
                found.append(int(name))
        return found

    def _holds(self, pid: str) -> bool:
        return namespace_of(pid) == self.key

    def kill_all(self) -> None:
        """SIGKILL every process in the namespace."""
        kill_every(lambda: set(self.pids()))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def namespace_key(pid: int | str) -> tuple[int, int] | None:
    """What names the mount namespace of process `pid` (None: gone, or not ours to look at);
    `pid` may also be "PID/task/TID", one thread's."""
    try:
        st = os.stat(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def live_thread(pid: int | str) -> str | None:
    """A thread of `pid` other than its main one, as "PID/task/TID": where /proc
    shows the process's memory, mounts and namespace once its main thread has
    exited while others run on (pthread_exit in main), its own entries then
    reading as a zombie's, holding nothing. None if it has no other thread."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    return next((f"{pid}/task/{tid}" for tid in threads if tid != str(pid)), None)


def namespace_of(pid: int | str) -> tuple[int, int] | None:
    """What names the mount namespace of process `pid`, read through another
    of its threads where its main thread has exited (None: gone)."""
    key = namespace_key(pid)
    if key is None:  # gone, or its main thread has exited: then its other threads say
        thread = live_thread(pid)
        key = namespace_key(thread) if thread is not None else None
    return key


# The tmpfs mounts a worker in a mount namespace of its own has to itself
# (_set_up_mounts; /var/tmp is /tmp's): the pages of their files are memory.
PRIVATE_TMPFS = ("/tmp", "/dev/shm")


def private_tmpfs_usage(pid: int | str) -> tuple[int, frozenset[int]]:
    """What the private tmpfs mounts of a worker in a mount namespace of its own
    hold, in bytes, and their devices (st_dev). A mount that cannot be read,
    or that is the daemon's own file system, counts for nothing. `pid` may
    also be "PID/task/TID", one thread's."""
    used = 0
    devices = []
    for path in PRIVATE_TMPFS:
        inside = f"/proc/{pid}/root{path}"
        try:
            device = os.stat(inside).st_dev
            if device == os.stat(path).st_dev:
                continue
            st = os.statvfs(inside)
        except OSError:
            continue
        used += (st.f_blocks - st.f_bfree) * st.f_frsize
        devices.append(device)
    return used, frozenset(devices)


def read_pids(directory: str) -> list[int]:
    try:
        with open(os.path.join(directory, "cgroup.procs")) as handle:
            return [int(p) for p in handle.read().split()]
    except (OSError, ValueError):
        return []


def unknown_run_as(name: str | None) -> str | None:
    """Why `[workers] run_as` cannot be had on this host (no such user), or None."""
    import pwd

    if not name:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        return f"[workers] run_as = {name!r}: no such user (create it, or leave run_as out)"
    return None


def missing_python(python: str | None) -> str | None:
    """Why `[workers] python` cannot be run (no such executable), or None."""
    import shutil

    if not python or shutil.which(python):
        return None
    return f"[workers] python = {python!r}: no such executable"


class FunctionUsers:
    """A uid of its own for each function's workers (`[workers] function_users`).

    Workers of different functions then differ in uid, so none can read
    another's /proc/PID/environ or memory, ptrace it, signal it, or reach its
    Runtime API, whatever its runtime execs. Every uid is in run_as's group
    (code readable by that group stays readable) and has no passwd entry: the
    range must be one no other user or service on the host has. A function
    keeps its uid for the daemon's life; uids are not reused.
    """

    def __init__(self, first: int, last: int, gid: int) -> None:
        self.first, self.last, self.gid = first, last, gid
        self._uids: dict[str, int] = {}

    def identity(self, function: str) -> tuple[int, int]:
        """(uid, gid) for a function's workers. Raises SandboxError when the range is used up."""
        uid = self._uids.get(function)
        if uid is None:
            uid = self.first + len(self._uids)
            if uid > self.last:
                raise SandboxError(
                    f"[workers] function_users {self.first}-{self.last} has no uid left for "
                    f"{function}: {len(self._uids)} functions hold one; widen the range")
            self._uids[function] = uid
        return uid, self.gid

    def clash(self) -> str | None:
        """Why the range cannot be used on this host (it holds accounts), or None."""
        import pwd

        taken = sorted(f"{entry.pw_name} ({entry.pw_uid})" for entry in pwd.getpwall()
                       if self.first <= entry.pw_uid <= self.last)
        if not taken:
            return None
        return (f"[workers] function_users {self.first}-{self.last} holds uids of this host's "
                f"users ({', '.join(taken[:5])}): choose a range no one has")


class Sandbox:
    """What isolation this host allows, decided once at daemon start."""

    def __init__(self, *, python: str, run_as: tuple[int, int] | None = None,
                 run_as_name: str | None = None, mount: bool = False, userns: bool = False,
                 mount_note: str = "", pids_mode: str | None = None, pids_base: str | None = None,
                 pids_note: str = "", read_only: list[str] | tuple[()] = (),
                 hide: list[tuple[str, list[str]]] | tuple[()] = (), hide_note: str = "",
                 run_as_note: str = "", python_note: str = "", users: FunctionUsers | None = None,
                 private_proc: bool = False, proc_note: str = "") -> None:
        self.python = python
        self.run_as = run_as
        self.users = users
        self.run_as_name = run_as_name
        self.mount = mount
        self.userns = userns
        self.mount_note = mount_note
        self.pids_mode = pids_mode  # "cgroup1" | "cgroup2" | None
        self.pids_base = pids_base
        self.pids_note = pids_note
        self.read_only = list(read_only)
        self.hide = list(hide)  # (path, [paths inside it to keep])
        self.hide_note = hide_note
        self.run_as_note = run_as_note  # the switch to run_as failed: no worker runs as it
        self.python_note = python_note  # the interpreter is not readable as run_as
        self.private_proc = private_proc  # each worker mounts a /proc with hidepid=2
        self.proc_note = proc_note
        self.nproc = user_process_limit() if run_as else None
        # The worker interpreter's installation, which it reads from after the
        # mounts -- and, when `python` is a virtual environment's, that
        # environment too: a bootstrap may run it by its own path.
        self.python_prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
        self.python_env = os.path.dirname(os.path.dirname(os.path.abspath(python)))

    # -- start --------------------------------------------------------------------------

    @classmethod
    def detect(cls, *, python: str, run_as: tuple[int, int] | None, run_as_name: str | None,
               functions_dir: str | os.PathLike, data_dir: str | os.PathLike,
               config_file: str | os.PathLike | None, memory: Any, tmpfs: bool = True,
               users: FunctionUsers | None = None) -> Sandbox:
        """Probe what this host allows. Blocking (runs short probe processes)."""
        import logging

        log = logging.getLogger("faasd.sandbox")
        package_dir = os.path.dirname(os.path.abspath(__file__))
        functions_dir = os.path.realpath(functions_dir)
        data_dir = os.path.realpath(data_dir)
        read_only = _unique([functions_dir, package_dir])
        hide, hide_note = _hidden_paths(data_dir, config_file, [functions_dir, package_dir, python])
        sandbox = cls(python=python, run_as=run_as, run_as_name=run_as_name,
                      read_only=read_only, hide=hide, hide_note=hide_note, users=users)
        sandbox._detect_pids(memory, data_dir)
        if not tmpfs:
            sandbox.mount_note = "[workers] tmpfs = false: /tmp is a directory on the data disk"
        else:
            userns = os.geteuid() != 0
            mounts = {"mount": True, "userns": userns, "tmp_mb": 1, "tmp_paths": ["/tmp"],
                      "read_only": read_only, "hide": hide, "rlimits": {}}
            problem = sandbox._probe(mounts)
            if problem is None:
                sandbox.mount, sandbox.userns = True, userns
                sandbox.mount_note = ("a user namespace of the worker's own" if userns
                                      else "created as root")
                sandbox._detect_private_proc(mounts)
            else:
                how = "unprivileged user namespaces" if userns else "as root"
                sandbox.mount_note = f"mount namespaces are not available ({how}): {problem}"
                log.warning("no private /tmp for workers: %s; /tmp is limited per file "
                            "(RLIMIT_FSIZE) and by a usage check", sandbox.mount_note)
        if run_as is not None:
            # The interpreter and its standard library must be readable by the
            # run_as user (or the functions' users), or every Python worker
            # fails at its first import.
            plan = sandbox._base_plan(tmp_mb=1)
            who = run_as_name
            if users is not None:
                plan["uid"], who = users.first, f"uid {users.first} ([workers] function_users)"
            problem = sandbox._probe(plan, check_imports=True)
            if problem is not None and problem.startswith(IMPORTS_FAILED):
                # The user switch worked: workers of other runtimes run as
                # that user; Python ones fail their init (python_runtime says why).
                sandbox.python_note = (
                    f"Python workers as {who} cannot run {python}: {problem}; every Python "
                    f"function fails its init until [workers] python names an interpreter that "
                    f"user can read (e.g. /usr/bin/python3)")
                log.error("%s", sandbox.python_note)
            elif problem is not None:
                sandbox.run_as_note = (
                    f"workers as {who} cannot run {python}: {problem}; install faasd "
                    f"where that user can read it, or set [workers] python to an interpreter "
                    f"it can run (e.g. /usr/bin/python3)")
                log.error("%s", sandbox.run_as_note)
        return sandbox

    def _detect_private_proc(self, mounts: dict[str, Any]) -> None:
        """Whether workers can mount a /proc of their own that hides other users' processes,
        on top of `mounts` (the plan that probed their mount namespace)."""
        if self.userns:
            self.proc_note = ("needs root: a worker in a user namespace of its own may not mount "
                              "/proc; workers see every process of the host")
            return
        if self.run_as is None:
            self.proc_note = "workers run as root, who sees every process: set [workers] run_as"
            return
        problem = self._probe({**mounts, "private_proc": True})
        if problem is not None:
            self.proc_note = f"a /proc of the worker's own could not be mounted: {problem}"
            return
        self.private_proc = True

    def _detect_pids(self, memory: Any, data_dir: str) -> None:
        if memory is not None and getattr(memory, "mode", None) == "cgroup2" and memory.base:
            base = str(memory.base)
            parent = os.path.dirname(base)
            try:
                with open(os.path.join(parent, "cgroup.controllers")) as handle:
                    available = handle.read().split()
                if "pids" not in available:
                    self.pids_note = "the pids controller is not delegated to faasd's cgroup"
                    return
                _write(os.path.join(parent, "cgroup.subtree_control"), "+pids")
                _write(os.path.join(base, "cgroup.subtree_control"), "+pids")
            except OSError as exc:
                self.pids_note = f"cannot enable the pids controller ({exc.strerror})"
                return
            self.pids_mode, self.pids_base = "cgroup2", base
            return
        if os.path.isfile(os.path.join(PIDS_V1_ROOT, "cgroup.procs")):
            from pathlib import Path

            from .limits import cgroup_name, sweep_stale_cgroups

            name = cgroup_name(data_dir)
            sweep_stale_cgroups(Path(PIDS_V1_ROOT), name)  # of daemons killed before they could
            base = os.path.join(PIDS_V1_ROOT, f"{name}-{os.getpid()}")
            try:
                os.makedirs(base, exist_ok=True)
            except OSError as exc:
                self.pids_note = f"cgroup v1 pids hierarchy not writable ({exc.strerror})"
                return
            self.pids_mode, self.pids_base = "cgroup1", base
            return
        self.pids_note = "no pids cgroup controller available to faasd"

    def _probe(self, plan: dict[str, Any], check_imports: bool = False) -> str | None:
        """Run a plan in a short-lived process: None if it works, else why not."""
        import subprocess

        env = {"PATH": "/usr/bin:/bin", PLAN_ENV: json.dumps(plan)}
        command = [self.python, "-I", "-S", LAUNCHER, "--probe"]
        if check_imports:
            command.append("--imports")
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=20,
                                  cwd="/")
        except (OSError, subprocess.SubprocessError) as exc:
            return str(exc)
        if done.returncode == 0:
            return None
        lines = [line for line in (done.stderr or "").splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        return reason.replace("faasd could not isolate this worker: ", "")

    # -- per worker ---------------------------------------------------------------------

    def _base_plan(self, *, tmp_mb: int) -> dict[str, Any]:
        plan = {
            "mount": self.mount,
            "userns": self.userns,
            "tmp_mb": tmp_mb,
            "tmp_paths": ["/tmp", "/var/tmp"],
            "read_only": self.read_only,
            "hide": self.hide,
            # What workers need that a tmpfs over /tmp would cover.
            "visible": _unique(self.read_only + [self.python_prefix, self.python_env]),
            "private_proc": self.private_proc,
            "rlimits": {"NOFILE": MAX_OPEN_FILES, "CORE": 0, "FSIZE": tmp_mb * MB},
            "uid": None,
            "gid": None,
            "parent_pid": os.getpid(),
        }
        if self.run_as is not None:
            plan["uid"], plan["gid"] = self.run_as
            plan["rlimits"]["NPROC"] = self.nproc
        if self.mount:
            plan["tmpdir"] = "/tmp"
        return plan

    def prepare(self, *, worker_id: str, task_root: str | os.PathLike, tmp_dir: str | os.PathLike,
                tmp_mb: int, memory_cgroup: Any = None, visible: list[str] | tuple[()] = (),
                user: tuple[int, int] | None = None) -> WorkerPlan:
        """The isolation of one worker. Creates its pids cgroup.

        `visible`: paths the runtime reads (its libraries) that must stay
        reachable even where they sit under /tmp or the data dir. `user`:
        (uid, gid) to run as instead of run_as (a function's own user).
        """
        plan = self._base_plan(tmp_mb=tmp_mb)
        if user is not None:
            plan["uid"], plan["gid"] = user
        plan["chdir"] = str(task_root)
        task_root = os.path.realpath(task_root)
        if not any(_inside(task_root, p) for p in self.read_only):
            plan["read_only"] = self.read_only + [task_root]
        keep = [os.path.realpath(path) for path in visible if path]
        plan["visible"] = _unique(plan["visible"] + [task_root] + keep)
        if self.hide:
            plan["hide"] = [(path, [k for k in keep if _inside(k, path)]) for path, _ in self.hide]
        cgroups = []
        if memory_cgroup is not None:
            cgroups.append(os.path.join(str(memory_cgroup.path), "cgroup.procs"))
        pids_dir = None
        if self.pids_mode == "cgroup2" and memory_cgroup is not None and memory_cgroup.version == 2:
            _write(os.path.join(str(memory_cgroup.path), "pids.max"), str(MAX_PROCESSES_PER_WORKER))
        elif self.pids_mode == "cgroup1":
            pids_dir = os.path.join(self.pids_base, worker_id)
            os.makedirs(pids_dir, exist_ok=True)
            _write(os.path.join(pids_dir, "pids.max"), str(MAX_PROCESSES_PER_WORKER))
            cgroups.append(os.path.join(pids_dir, "cgroup.procs"))
        plan["cgroups"] = cgroups
        tmp_limit = None if self.mount else tmp_mb * MB
        return WorkerPlan(self, worker_id, plan, pids_dir, str(tmp_dir), tmp_limit)

    def own_pids_limit(self, worker_id: str, memory_cgroup: Any = None) -> WorkerPlan | None:
        """A pids limit of its own for a worker forked from a template.

        A fork starts in its template's cgroups; without this, every worker
        forked from one template would share one MAX_PROCESSES_PER_WORKER,
        and a fork bomb in one would stop its siblings (and the template)
        from starting a thread. Where the memory cgroup is a cgroup v2 one,
        the limit is set on it (the fork is moved there anyway) and None is
        returned; with cgroup v1 the returned plan's `plan["cgroups"]` names
        the new pids group's `cgroup.procs` for the caller to move the
        process into, and its `kill_all`/`remove` end it.
        """
        if self.pids_mode == "cgroup2" and memory_cgroup is not None and memory_cgroup.version == 2:
            _write(os.path.join(str(memory_cgroup.path), "pids.max"), str(MAX_PROCESSES_PER_WORKER))
            return None
        if self.pids_mode != "cgroup1":
            return None
        pids_dir = os.path.join(self.pids_base, worker_id)
        os.makedirs(pids_dir, exist_ok=True)
        _write(os.path.join(pids_dir, "pids.max"), str(MAX_PROCESSES_PER_WORKER))
        plan = {"cgroups": [os.path.join(pids_dir, "cgroup.procs")]}
        return WorkerPlan(self, worker_id, plan, pids_dir, "", None)

    def close(self) -> None:
        if self.pids_mode != "cgroup1" or not self.pids_base:
            return
        from pathlib import Path

        from .limits import remove_tree  # the daemon's half: not loaded by workers

        remove_tree(Path(self.pids_base))

    # -- report -------------------------------------------------------------------------

    def describe(self, memory_mode: str | None = None) -> dict[str, dict[str, Any]]:
        """Each protection: active or not, and why, for /system/info. `memory_mode`
        is MemoryLimits.mode: "monitor" where workers have no memory cgroup."""
        def item(active: Any, note: str, **extra: Any) -> dict[str, Any]:
            return {"active": bool(active), "note": note, **extra}

        root = os.geteuid() == 0
        user = self.run_as_name
        # Python workers that cannot run as that user do not stop workers of
        # other runtimes from running as it.
        python_note = f"; {self.python_note}" if self.python_note else ""
        if self.run_as is not None:
            run_as = item(not self.run_as_note,
                          self.run_as_note or f"workers run as {user} (uid {self.run_as[0]}) "
                                              f"with no supplementary groups{python_note}")
        elif root:
            run_as = item(False, "running as root without [workers] run_as: function code runs as root")
        else:
            run_as = item(False, f"workers run as the daemon's own user (uid {os.getuid()}): "
                                 "they can signal the daemon; start faasd as root with "
                                 "[workers] run_as for a separate user")
        limits = f"NOFILE {MAX_OPEN_FILES}, FSIZE = tmp_mb, CORE 0"
        if self.users is not None and not self.run_as_note:
            function_users = item(True, f"each function's workers run as a uid of their own from "
                                        f"{self.users.first}-{self.users.last}, in {user}'s group: "
                                        f"no function can read or signal another's processes"
                                        f"{python_note}")
        elif self.users is not None:
            function_users = item(False, self.run_as_note)
        elif self.run_as is not None:
            function_users = item(False, f"the workers of every function run as {user}: a program "
                                         "a worker execs can be read by the others' code; set "
                                         "[workers] function_users to give each function a uid")
        else:
            function_users = item(False, "needs root and [workers] run_as")
        if self.nproc and self.users is not None:
            nproc = item(True, f"at most {self.nproc} processes/threads for each function's user")
        elif self.nproc:
            nproc = item(True, f"at most {self.nproc} processes/threads for {user}, all workers together")
        else:
            nproc = item(False, "RLIMIT_NPROC counts every process of a uid: not set while workers "
                                "share a uid with the daemon or root")
        monitored = memory_mode == "monitor"
        if self.pids_mode:
            pids = item(True, f"at most {MAX_PROCESSES_PER_WORKER} processes/threads per worker "
                              f"({self.pids_mode} pids controller)")
        elif not monitored:
            pids = item(False, f"{self.pids_note}; a worker's memory cgroup still holds every "
                               "process it starts, and they are killed with it")
        elif self.mount:
            pids = item(False, f"{self.pids_note}; what a worker starts in another session is "
                               "still killed with it by its mount namespace")
        else:
            pids = item(False, f"{self.pids_note}; with no mount namespace either, what a worker "
                               "starts in another session can outlive it")
        if self.mount:
            held = ("the memory monitor counts what it holds toward memory_mb" if monitored
                    else "its pages are charged to the worker's memory cgroup")
            tmp = item(True, f"a private tmpfs of tmp_mb at /tmp and /var/tmp ({self.mount_note}); "
                             f"{held}", mode="tmpfs")
        else:
            tmp = item(True, f"{self.mount_note}; TMPDIR is a directory of the worker's own, each "
                             "file limited to tmp_mb (RLIMIT_FSIZE) and the worker stopped when the "
                             "directory passes tmp_mb; code that writes to /tmp itself shares the "
                             "host's /tmp", mode="disk")
        if self.mount:
            code = item(True, "functions/ and faasd's code are mounted read-only in every worker")
            hidden = item(bool(self.hide), self.hide_note)
        else:
            owner = f"by {user}" if user else "by the workers' user"
            code = item(False, f"no mount namespace: keep functions/ not writable {owner}")
            if self.run_as is None:
                hidden = item(False, "no mount namespace, and workers run as the daemon's own user: "
                                     "function code can read and change the data dir (queue, logs, "
                                     "dead letters) and read the config file, [auth] keys included")
            else:
                hidden = item(False, f"no mount namespace: the data dir and config file are kept "
                                     f"from {user} by file permissions only")
        if self.private_proc and self.users is not None:
            processes = item(True, "each worker has a /proc of its own (hidepid=2) and sees only its "
                                   "function's processes: not the daemon's, the host's services' "
                                   "or another function's")
        elif self.private_proc:
            processes = item(True, f"each worker has a /proc of its own (hidepid=2) and sees only "
                                   f"{user}'s processes: not the daemon's or the host's services', but "
                                   "every function's workers; [workers] function_users hides those too")
        else:
            processes = item(False, self.proc_note or "no mount namespace: workers see every process "
                                                      "of the host")
        return {
            "run_as": run_as,
            "function_users": function_users,
            "mount_namespace": item(self.mount, self.mount_note),
            "tmp": tmp,
            "code_read_only": code,
            "private_data": hidden,
            "rlimits": item(True, limits),
            "nproc_limit": nproc,
            "pids_limit": pids,
            "no_new_privileges": item(True, "setuid binaries gain nothing (PR_SET_NO_NEW_PRIVS)"),
            "pdeathsig": item(True, "workers are killed by the kernel when the daemon dies"),
            "env_allowlist": item(True, "workers get Lambda's variables and the function's [env] only"),
            "process_list": processes,
            "pid_namespace": item(False, "not used: workers share the host's process ids"),
            "network_namespace": item(False, "not used: workers share the host's network"),
        }


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _unique(paths: list[str]) -> list[str]:
    out = []
    for path in paths:
        if path and path not in out and not any(_inside(path, p) for p in out):
            out.append(path)
    return out


def _hidden_paths(data_dir: str, config_file: str | os.PathLike | None,
                  needed: list[str]) -> tuple[list[tuple[str, list[str]]], str]:
    """What workers must not see: the data dir, unless something they need lives in it, and the config file."""
    hide = []
    notes = []
    blocking = [p for p in needed if p and _inside(p, data_dir)]
    if blocking:
        notes.append(f"the data dir holds {blocking[0]}, which workers need: not hidden")
    else:
        hide.append((data_dir, []))
        notes.append(f"the data dir ({data_dir}) is hidden")
    if config_file and os.path.isfile(config_file):
        config_file = os.path.realpath(config_file)
        if not any(_inside(config_file, p) for p, _ in hide):
            hide.append((config_file, []))
        notes.append(f"the config file ({config_file}) is hidden")
    return hide, "; ".join(notes) + " in every worker"


def set_daemon_undumpable() -> bool:
    """PR_SET_DUMPABLE 0 for the daemon: processes of its uid (workers, when
    they share it) cannot ptrace it or read its memory and environment, where
    the auth secrets live."""
    try:
        _prctl(PR_SET_DUMPABLE, 0)
        return True
    except (SandboxError, OSError, AttributeError):
        return False


def _probe_main(argv: list[str]) -> None:
    """`sandbox_exec.py --probe`: carry out the plan, then exit 0 (or 70 via enter)."""
    enter(os.environ.pop(PLAN_ENV, "{}"))
    if "--imports" in argv:
        try:
            for module in ("decimal", "email.parser"):  # modules the worker has not loaded yet
                __import__(module)
        except (ImportError, OSError) as exc:
            sys.stderr.write(f"{IMPORTS_FAILED}{exc}\n")
            os._exit(71)
    os._exit(0)


def launch(argv: list[str]) -> None:
    """`sandbox_exec.py COMMAND...`: isolate this process, then become COMMAND."""
    if argv[:1] == ["--probe"]:
        _probe_main(argv)
    value = os.environ.pop(PLAN_ENV, None)
    if value is None:
        sys.stderr.write(f"faasd: {PLAN_ENV} is not set\n")
        os._exit(70)
    enter(value)
    if not argv:
        _report(json.loads(value), "faasd could not start this worker: no command to run")
        os._exit(70)
    import signal

    # Python ignores SIGPIPE; the runtime gets the default back. SIGXFSZ
    # stays ignored, so a write past RLIMIT_FSIZE fails with EFBIG instead of
    # killing the process.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        os.execvpe(argv[0], argv, os.environ)
    except OSError as exc:
        _report(json.loads(value), f"{EXEC_FAILED}{argv[0]}: {exc.strerror}", "Runtime.InvalidEntrypoint")
        os._exit(EXEC_FAILED_STATUS)
