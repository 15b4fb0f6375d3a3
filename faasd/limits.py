"""Per-worker memory limits: cgroups where the daemon may create them, else a monitor.

`MemoryLimits.detect()` picks, once at start:
  * cgroup v2 with the memory controller delegated to us (a writable
    subtree, as systemd's `Delegate=yes` gives), or
  * cgroup v1's memory hierarchy, writable (root on most hosts), or
  * monitoring: the daemon measures what a worker holds -- the resident
    memory of every process of it (`ProcessTree`) and its private tmpfs
    mounts, /tmp and /dev/shm -- once when it is ready and every 50 ms while
    it is busy, and checks each call's peak as the call ends; past the limit
    the worker is killed and the call fails as out of memory (faasd/workers.py).
Whatever the mode, `Max Memory Used` is the worker's true peak.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterable, Protocol, TypeVar

from .sandbox import live_thread, namespace_of, read_pids

log = logging.getLogger("faasd.limits")

CGROUP_ROOT = Path("/sys/fs/cgroup")
MB = 1024 * 1024
T = TypeVar("T")


LEGACY_NAME = "faasd"  # groups `faasd-<pid>`, of faasd before cgroup_name's tag


def cgroup_name(data_dir: str | os.PathLike) -> str:
    """The prefix of this daemon's cgroup v1 groups, `faasd-<tag>` (each group is
    `faasd-<tag>-<pid>`): the tag names the data dir, so that a daemon's next start
    on the same data dir -- its restart -- sweeps what a killed one left, and a
    daemon of another data dir (another faasd service on the host) does not."""
    real = os.fsencode(os.path.realpath(data_dir))
    return f"faasd-{hashlib.sha256(real).hexdigest()[:8]}"


class Removable(Protocol):
    def remove(self) -> bool: ...


class WorkerCgroup:
    """One worker's memory cgroup (v1 or v2)."""

    def __init__(self, path: Path, version: int) -> None:
        self.path = path
        self.version = version
        self._events: int | None = None  # memory.oom_control / memory.events, kept open

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def peak_bytes(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def oom_killed(self) -> bool:
        if self.oom_kills() > 0:
            return True
        if self.version == 1:
            try:  # kernels without oom_kill in oom_control: a limit hit at all
                return int((self.path / "memory.failcnt").read_text()) > 0 and not self.pids()
            except (OSError, ValueError):
                return False
        return False

    def oom_kills(self) -> int:
        """How many of its processes the kernel has killed for passing the limit; read
        through a descriptor kept open (a microsecond), as it is read after every call."""
        try:
            if self._events is None:
                name = "memory.oom_control" if self.version == 1 else "memory.events"
                self._events = os.open(self.path / name, os.O_RDONLY | os.O_CLOEXEC)
            for line in os.pread(self._events, 4096, 0).split(b"\n"):
                if line.startswith(b"oom_kill "):
                    return int(line[9:])
        except (OSError, ValueError):
            pass
        return 0

    def lift_limit(self) -> None:
        """Take the memory limit off (OOM reporting stays as it was)."""
        if self.version == 2:
            (self.path / "memory.max").write_text("max")
            return
        # The swap limit first: the memory limit may not be set above it.
        try:
            (self.path / "memory.memsw.limit_in_bytes").write_text("-1")
        except OSError:
            pass  # no swap accounting
        (self.path / "memory.limit_in_bytes").write_text("-1")

    def pids(self) -> list[int]:
        return read_pids(str(self.path))

    def kill_all(self) -> None:
        """SIGKILL everything in the cgroup, including processes that left the group."""
        if self.version == 2 and (self.path / "cgroup.kill").exists():
            try:
                (self.path / "cgroup.kill").write_text("1")
                return
            except OSError:
                pass
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> bool:
        """Remove the cgroup; False while it still has members (killed ones take a moment)."""
        if self._events is not None:
            os.close(self._events)
            self._events = None
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True


class MemoryLimits:
    """Creates a memory-limited cgroup for each worker, when it can."""

    def __init__(self, mode: str, base: Path | None, reason: str = "", fix: str = "") -> None:
        self.mode = mode  # "cgroup2" | "cgroup1" | "monitor"
        self.base = base
        self.reason = reason
        self.fix = fix  # under "monitor": how to get the kernel to enforce the limits

    @classmethod
    def detect(cls, name: str) -> "MemoryLimits":
        """`name`: cgroup_name() of the data dir."""
        reasons = []
        v2 = cls._try_v2(name)
        if isinstance(v2, MemoryLimits):
            return v2
        reasons.append(v2)
        v1 = cls._try_v1(name)
        if isinstance(v1, MemoryLimits):
            return v1
        reasons.append(v1)
        return cls("monitor", None, "; ".join(r for r in reasons if r), cls._fix())

    @staticmethod
    def _fix() -> str:
        """What gets workers memory cgroups on this host, given what _try_v2 and _try_v1 need."""
        if (CGROUP_ROOT / "cgroup.controllers").exists():
            return ("for the kernel to enforce them, run faasd under systemd with Delegate=yes "
                    "(systemd/faasd.service has Delegate=memory pids), which gives its cgroup "
                    "the memory controller")
        if (CGROUP_ROOT / "memory" / "memory.limit_in_bytes").exists():
            if os.geteuid() != 0:
                return ("for the kernel to enforce them, start faasd as root: on cgroup v1 only "
                        "root may create memory cgroups, and systemd's Delegate= does not hand "
                        "them over (on a cgroup v2 host it does)")
            return f"for the kernel to enforce them, let faasd write {CGROUP_ROOT / 'memory'}"
        return ("for the kernel to enforce them, run faasd where the cgroup memory controller "
                "is mounted: cgroup v2 at /sys/fs/cgroup, under systemd with Delegate=yes")

    @classmethod
    def _try_v2(cls, name: str) -> "MemoryLimits | str":
        root = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else None
        if root is None:
            return "cgroup v2 is not the mounted hierarchy"
        try:
            own = Path("/proc/self/cgroup").read_text()
        except OSError:
            return "cannot read /proc/self/cgroup"
        rel = next((line[3:] for line in own.splitlines() if line.startswith("0::")), None)
        if rel is None:
            return "no cgroup v2 entry in /proc/self/cgroup"
        mine = root / rel.lstrip("/")
        # A process may not sit in an inner node whose children take
        # controllers, so the daemon moves itself into a leaf "daemon" group
        # and puts workers in sibling groups.
        try:
            if "memory" not in (mine / "cgroup.controllers").read_text().split():
                return "the memory controller is not delegated to faasd's cgroup"
            leaf = mine / "daemon"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
            (mine / "cgroup.subtree_control").write_text("+memory")
            base = mine / "workers"
            base.mkdir(exist_ok=True)
            (base / "cgroup.subtree_control").write_text("+memory")
        except OSError as exc:
            return f"cgroup v2 subtree not writable ({exc.strerror})"
        return cls("cgroup2", base)

    @classmethod
    def _try_v1(cls, name: str) -> "MemoryLimits | str":
        root = CGROUP_ROOT / "memory"
        if not (root / "memory.limit_in_bytes").exists():
            return "no cgroup v1 memory hierarchy"
        sweep_stale_cgroups(root, name)
        base = root / f"{name}-{os.getpid()}"
        try:
            base.mkdir(exist_ok=True)
        except OSError as exc:
            return f"cgroup v1 memory hierarchy not writable ({exc.strerror})"
        return cls("cgroup1", base)

    def create(self, worker_id: str, memory_mb: int) -> WorkerCgroup | None:
        if self.base is None:
            return None
        path = self.base / worker_id
        try:
            path.mkdir()
            if self.mode == "cgroup1":
                limit = str(memory_mb * MB)
                (path / "memory.limit_in_bytes").write_text(limit)
                try:  # no swapping past the limit either, where swap accounting exists
                    (path / "memory.memsw.limit_in_bytes").write_text(limit)
                except OSError:
                    pass
                return WorkerCgroup(path, 1)
            (path / "memory.max").write_text(str(memory_mb * MB))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
            (path / "memory.oom.group").write_text("1")
            return WorkerCgroup(path, 2)
        except OSError as exc:
            log.warning("cannot create memory cgroup %s: %s; falling back to monitoring", path, exc)
            try:
                path.rmdir()
            except OSError:
                pass
            return None

    def close(self) -> None:
        if self.base is None or self.mode == "cgroup2":
            return
        remove_tree(self.base)


# Waits between attempts to remove a cgroup whose killed members are still exiting.
REMOVE_RETRY_S = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0)


def remove_when_empty(loop: asyncio.AbstractEventLoop, groups: Iterable[Removable],
                      attempt: int = 0) -> None:
    """Remove cgroups now, or as soon as their (killed) members have exited.

    rmdir fails while a member is still on its way out, and nothing else
    would try again while the daemon runs: this tries again on a backoff
    (about 8 s in all); what is still busy after that is left to the
    sweep at the daemon's next start.
    """
    left = [group for group in groups if not group.remove()]
    if not left:
        return
    if attempt >= len(REMOVE_RETRY_S):
        log.warning("cgroups still busy after %d attempts, left for the next start: %s",
                    attempt + 1, ", ".join(str(getattr(g, "path", g)) for g in left))
        return
    loop.call_later(REMOVE_RETRY_S[attempt], remove_when_empty, loop, left, attempt + 1)


# How long the sweep waits for the leftovers it killed to exit.
SWEEP_WAIT_S = 2.0


def sweep_stale_cgroups(root: Path, name: str) -> int:
    """Remove the cgroup trees `<name>-<pid>` of daemons that are gone.

    A daemon killed with SIGKILL cannot remove its cgroups; the next one on
    its data dir (`name` is cgroup_name's) does, here. Its workers die with
    it (PR_SET_PDEATHSIG), but what they started -- in a session of its own,
    or deaf to SIGHUP -- is still in the dead daemon's groups: it is killed
    first. A group whose daemon's pid is alive (even a reused pid) is left
    alone; a dead daemon its parent has not reaped yet (a zombie: an init
    that does not reap) is dead.

    The groups of another data dir -- another faasd service on the host --
    are that service's to sweep when it restarts, and to report in its own
    log: this daemon cannot tell one that died from one whose pid it cannot
    see (in another pid namespace).

    Groups named `faasd-<pid>`, as faasd named them before the tag, are swept
    by any daemon: no data dir can be told from such a name, and a daemon
    killed just before an upgrade left them for no one else.
    """
    removed = 0
    groups = [(base, base.name[len(prefix) + 1:])
              for prefix in (name, LEGACY_NAME) for base in root.glob(f"{prefix}-*")]
    for base, suffix in groups:
        if not suffix.isdigit() or _alive(int(suffix)) or not base.is_dir():
            continue
        killed, gone = remove_tree(base)
        if killed:
            log.warning("killed %d leftover process(es) of the faasd daemon that died (pid %s) in %s",
                        killed, suffix, base)
        removed += gone
    return removed


def remove_tree(base: Path) -> tuple[int, int]:
    """Kill every process in the cgroup tree `base` (v1), wait up to SWEEP_WAIT_S
    for them to exit, and remove its groups, deepest first: (processes killed,
    groups removed). A killed process holding much memory takes a while to
    exit, and its group cannot go before it has; a member that would not die
    in time leaves its groups to the next start's sweep."""
    paths = sorted(base.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [base]
    groups = [path for path in paths if path.is_dir()]
    deadline = time.monotonic() + SWEEP_WAIT_S  # for the killing and the removing together
    killed = _kill_members(groups, deadline)
    removed = 0
    for path in groups:
        while True:
            try:
                path.rmdir()
                removed += 1
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)  # an exited member still on its way out of the group
    return killed, removed


def _alive(pid: int) -> bool:
    try:
        return proc_stat_fields(pid)[0] != b"Z"
    except (OSError, IndexError):
        return False


def _kill_members(groups: list[Path], deadline: float) -> int:
    """SIGKILL every process in `groups` (cgroup directories); wait until `deadline`
    (time.monotonic()) at most for them to exit. The number of processes killed."""
    killed: set[int] = set()
    while True:
        members = {pid for group in groups for pid in read_pids(str(group)) if _alive(pid)}
        if not members or time.monotonic() > deadline:
            return len(killed)
        for group in groups:  # cgroup v2 (Linux 5.14+): the kernel kills the whole subtree
            if (group / "cgroup.kill").exists():
                try:
                    (group / "cgroup.kill").write_text("1")
                except OSError:
                    pass
        for pid in members - killed:  # v1, and what cgroup.kill missed: one by one
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        killed |= members
        time.sleep(0.01)


def rss_bytes(pid: int | str) -> tuple[int, int] | None:
    """(current RSS, peak RSS) of one process in bytes, from /proc; `pid` may also
    be "PID/task/TID", one thread's (which are the whole process's)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            text = status.read()
    except OSError:
        return None
    rss = hwm = 0
    for line in text.split(b"\n"):
        if line.startswith(b"VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith(b"VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return rss, hwm


def proc_stat_fields(pid: int | str) -> list[bytes]:
    """/proc/PID/stat after the command name: [0] is field 3 of proc(5), the state.

    OSError if the process is gone."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
LISTING_TTL_S = 0.02  # workers sampled this close together share one listing of /proc
_listing: tuple[float, frozenset[int]] = (float("-inf"), frozenset())


def proc_pids() -> frozenset[int]:
    """The processes in /proc: listed now, or at most LISTING_TTL_S ago."""
    global _listing
    now = time.monotonic()
    if now - _listing[0] > LISTING_TTL_S:
        _listing = (now, frozenset(int(name) for name in os.listdir("/proc") if name.isdigit()))
    return _listing[1]


class ProcessTree:
    """The processes of one worker, for the memory monitor where no cgroup counts them.

    Besides the worker's own process: every process whose parent is one of
    them, every process in its process group, and -- once `namespace` is
    set (sandbox.MountNamespace.key) -- every process in its mount
    namespace, which alone finds a process whose parent exited before it
    was seen (what `setsid` starts, say). A member stays one when its parent
    exits. There is no cheap list of a process's children (the `children`
    files of /proc/PID/task/ need a kernel option, and lose a child whose
    parent exits), so members are found as they appear: each sample lists
    /proc (one listing serves every worker sampled within LISTING_TTL_S) and
    reads the stat of the processes new since the last, then of each member.

    A process whose main thread has exited while its other threads run on
    (pthread_exit in main) reads as a zombie with no memory: its memory (and
    namespace, and mounts) is read through one of those threads instead. Its
    children still name it as their parent. Only such a process costs more
    to read: the others are told from it by what a sample reads anyway.
    """

    def __init__(self, leader: int) -> None:
        self.leader = leader
        self.namespace: tuple[int, int] | None = None
        # Listed before the worker can have started anything: none of these is its.
        self._seen = proc_pids()
        self._members: dict[int, bytes] = {}  # pid -> its start time (stat), against pid reuse
        self._headless: dict[int, str] = {}  # pid -> the thread it is read through (live_thread)

    def view(self, pid: int) -> int | str:
        """What to read in /proc for `pid`'s memory and mounts: its own entry, or, once
        its main thread has exited, one of its live threads' (as of the last sample)."""
        return self._headless.get(pid, pid)

    def sample(self) -> tuple[int, int, int] | None:
        """(resident bytes of all its processes, its own process's peak resident
        bytes, how many processes); None once its own process is gone."""
        own = rss_bytes(self.leader)
        if own is None:
            return None
        if not own[0]:  # nothing resident: a zombie, or a process whose main thread has exited
            own = self._through_thread(self.leader, rss_bytes) or own
        self._find_new()
        total = own[0]
        for pid, started in list(self._members.items()):
            try:
                fields = proc_stat_fields(pid)
            except OSError:
                fields = None
            if fields is None or fields[19] != started:  # gone (or its pid is another's now)
                del self._members[pid]
                self._headless.pop(pid, None)
                continue
            if fields[0] == b"Z" and fields[17] != b"1":  # a zombie with threads (fields[17]) running on
                fields = self._through_thread(pid, proc_stat_fields) or fields
            total += int(fields[21]) * PAGE_SIZE  # fields[21]: rss in pages (field 24 of stat)
        return total, own[1], 1 + len(self._members)

    def _through_thread(self, pid: int, read: Callable[[str], T]) -> T | None:
        """`read` of a process whose main thread has exited, through one of its other
        threads; None if it has none (a plain zombie, which holds nothing)."""
        thread = live_thread(pid)
        if thread is not None:
            try:
                found = read(thread)
            except OSError:  # that thread has just exited
                found = None
            if found is not None:
                self._headless[pid] = thread
                return found
        self._headless.pop(pid, None)
        return None

    def _find_new(self) -> None:
        pids = proc_pids()
        new, self._seen = pids - self._seen, pids
        unknown = {}  # pid -> (parent, start time) of the new ones not (yet) known as members
        for pid in new:
            if pid == self.leader:
                continue
            try:
                fields = proc_stat_fields(pid)
            except OSError:
                continue
            # fields[1], [2], [19]: ppid, pgrp, starttime (fields 4, 5 and 22 of stat).
            if int(fields[2]) == self.leader or (
                    self.namespace is not None and namespace_of(pid) == self.namespace):
                self._members[pid] = fields[19]
            else:
                unknown[pid] = (int(fields[1]), fields[19])
        found = True
        while found:  # children of members, and theirs, in whatever order /proc listed them
            found = False
            for pid, (parent, started) in list(unknown.items()):
                if parent == self.leader or parent in self._members:
                    self._members[pid] = started
                    del unknown[pid]
                    found = True

    def pss_bytes(self, counted_devices: frozenset[int] = frozenset()) -> int | None:
        """The proportional set size of all its processes: a page they share (as
        a fork shares its parent's) is counted once, as a cgroup counts it, where
        their resident sizes count it in each. Mappings of files on
        `counted_devices` (the worker's private tmpfs mounts, whose whole use
        is counted apart) are left out, so that their pages count once too.
        Walks their page tables, so it is read only when resident sizes add up
        past a limit. None if unreadable."""
        total = 0
        for pid in (self.leader, *self._members):
            try:
                total += _pss(self.view(pid), counted_devices)
            except (FileNotFoundError, ProcessLookupError):
                continue  # gone: it holds nothing
            except (OSError, ValueError, IndexError):
                return None
        return total


def _pss(pid: int | str, left_out: frozenset[int]) -> int:
    """One process's proportional set size in bytes, less its mappings of files on `left_out`."""
    if not left_out:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
            for line in rollup:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
        return 0
    total = 0
    counted = True
    with open(f"/proc/{pid}/smaps", "rb") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(b":"):
                # A mapping's first line: address perms offset major:minor inode [path]
                major, _, minor = fields[3].partition(b":")
                counted = os.makedev(int(major, 16), int(minor, 16)) not in left_out
            elif counted and fields[0] == b"Pss:":
                total += int(fields[1]) * 1024
    return total


_TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def process_cpu_ms(pid: int) -> float | None:
    """User plus system CPU time of a process so far (10 ms ticks); None if it is gone."""
    try:
        fields = proc_stat_fields(pid)
        # fields[11] and [12] are utime and stime (fields 14 and 15 of stat).
        return (int(fields[11]) + int(fields[12])) * _TICK_MS
    except (OSError, ValueError, IndexError):
        return None
