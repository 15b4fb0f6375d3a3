"""Unit tests of faasd.zygote's spares: how many the daemon asks for and holds, and
the pids limit each gets of its own.

The Template is the real class; its process is played by the test at the
other end of its socket pair, answering FORK with SPARE frames that carry
three real descriptors, as the template process does.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import sys

import orjson
import pytest

from faasd import protocol, zygote
from faasd.limits import MemoryLimits, WorkerCgroup
from faasd.sandbox import MAX_PROCESSES_PER_WORKER, Sandbox
from faasd.spec import FunctionSpec
from faasd.workers import WorkerEnvironment, WorkerState


class TemplateProcess:
    """The template's side of the channel."""

    def __init__(self, template: zygote.Template) -> None:
        daemon_end, self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        daemon_end.setblocking(False)
        self.sock.setblocking(False)
        template._sock = daemon_end
        template._loop.add_reader(daemon_end.fileno(), template._readable)
        template.init_ms = 1.0  # said READY
        template.set_state(WorkerState.IDLE)
        self.template = template
        self.decoder = protocol.FrameDecoder()
        self.next_pid = 40000

    def asked(self) -> int:
        """Spares the daemon asked for since the last look."""
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return 0
        return sum(orjson.loads(payload)["count"] for kind, payload in self.decoder.feed(data)
                   if kind == protocol.FORK)

    def spare(self, says: bytes = b"") -> int:
        """Hand the daemon one spare: its control socket, output pipe (holding what it
        `says`) and pidfd."""
        self.next_pid += 1
        control, _ = socket.socketpair()
        out_read, out_write = os.pipe()
        os.write(out_write, says)
        pidfd = os.pidfd_open(os.getpid())
        frame = protocol.encode(protocol.SPARE, orjson.dumps({"pid": self.next_pid}))
        fds = array.array("i", [control.fileno(), out_read, pidfd])
        self.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        for fd in (control.detach(), out_read, out_write, pidfd):
            os.close(fd)
        return self.next_pid

    def exited(self, pid: int, returncode: int = -9) -> None:
        self.sock.send(protocol.encode(protocol.EXITED, orjson.dumps({"pid": pid, "returncode": returncode})))

    @staticmethod
    async def settle() -> None:
        for _ in range(5):
            await asyncio.sleep(0.01)


@pytest.fixture
async def process(tmp_path):
    spec = FunctionSpec(name="fn", runtime="python", handler="fn.handler", task_root=tmp_path,
                        source=tmp_path / "fn.py", revision="r1")
    env = WorkerEnvironment(data_dir=tmp_path, memory=MemoryLimits("monitor", None))
    template = zygote.Template(spec, env)
    process = TemplateProcess(template)
    yield process
    template._close_channel()
    process.sock.close()


async def take(template: zygote.Template) -> zygote.Spare:
    spare = await template.take_spare()
    spare.discard()  # the test has no use for the process behind it
    return spare


async def replaced() -> None:
    """Past the delay before a taken spare's replacement is asked for."""
    await asyncio.sleep(zygote.REPLACE_DELAY_S * 2)


async def test_one_spare_is_held_and_replaced_shortly_after_it_is_taken(process):
    template = process.template
    template._top_up()
    assert process.asked() == 1
    pid = process.spare()
    await process.settle()
    assert template.to_json()["spares"] == 1
    assert (await take(template)).pid == pid
    assert template.want_spares == 1  # it was there: no shortage
    # Not at once: the fork would compete with the taken spare's start.
    assert process.asked() == 0
    await replaced()
    assert process.asked() == 1


async def test_a_call_that_finds_no_spare_waits_for_the_next_and_one_more_is_held_after(process):
    template = process.template
    template._top_up()
    process.asked()
    waiting = asyncio.ensure_future(take(template))  # the first spare has not arrived yet
    await process.settle()
    assert template.want_spares == 2
    assert process.asked() == 2  # one for the waiting call, one more to hold
    first = process.spare()
    await process.settle()
    assert waiting.done() and waiting.result().pid == first
    process.spare()
    process.spare()
    await process.settle()
    assert template.to_json()["spares"] == 2


async def test_spares_held_never_pass_max_spares_and_fall_back_without_a_shortage(process, monkeypatch):
    template = process.template
    for _ in range(zygote.MAX_SPARES + 2):  # shortage after shortage
        while template.to_json()["spares"]:
            await take(template)
        waiting = asyncio.ensure_future(take(template))
        await process.settle()
        for _ in range(process.asked()):
            process.spare()
        await process.settle()
        assert waiting.done()
    assert template.want_spares == zygote.MAX_SPARES
    assert template.to_json()["spares"] == zygote.MAX_SPARES
    await replaced()
    process.asked()
    monkeypatch.setattr(zygote, "SPARE_DECAY_S", 0.0)  # a quiet minute has passed
    await take(template)
    await replaced()
    assert template.want_spares == zygote.MAX_SPARES - 1
    assert process.asked() == 0  # three are still held: none to ask for


async def test_a_spare_that_dies_while_held_is_dropped_and_replaced(process):
    template = process.template
    template._top_up()
    process.asked()
    dead = process.spare()
    await process.settle()
    process.exited(dead)
    await process.settle()
    assert template.to_json()["spares"] == 0
    assert process.asked() == 1
    alive = process.spare()
    await process.settle()
    assert (await take(template)).pid == alive


async def test_spares_that_keep_dying_unused_are_forked_later_each_time_and_say_why(
        process, monkeypatch, caplog):
    monkeypatch.setattr(zygote, "SPARE_RETRY_S", 0.05)
    template = process.template
    template._top_up()
    process.asked()
    delays = []
    for _ in range(4):
        dead = process.spare(says=b"Traceback (most recent call last):\nPermissionError: denied\n")
        await process.settle()
        started = asyncio.get_running_loop().time()
        process.exited(dead, returncode=70)
        while not process.asked():  # the replacement's FORK
            await asyncio.sleep(0.005)
        delays.append(asyncio.get_running_loop().time() - started)
    # The first is replaced at once (as in the test above); then no sooner than 0.05,
    # 0.1 and 0.2 s after each death.
    assert delays[1] >= 0.05 and delays[2] >= 0.1 and delays[3] >= 0.2
    warnings = [r.getMessage() for r in caplog.records if "died before use" in r.getMessage()]
    assert len(warnings) == 4
    assert "exit status 70): PermissionError: denied; forking another" in warnings[0]
    assert "4 in a row, the next fork in 0.20 s" in warnings[3]
    # A spare that becomes a worker ends the streak: the next death is replaced at once.
    template.spare_served()
    dead = process.spare()
    await process.settle()
    process.exited(dead)
    await process.settle()
    assert process.asked() == 1


async def test_a_failed_fork_fails_the_waiting_call_with_template_gone(process):
    template = process.template
    waiting = asyncio.ensure_future(template.take_spare())
    await process.settle()
    process.sock.send(protocol.encode(protocol.SPARE, orjson.dumps({"error": "cannot fork: out of memory"})))
    await process.settle()
    with pytest.raises(zygote.TemplateGone, match="out of memory"):
        waiting.result()


# -- the pids limit a spare gets of its own (faasd/sandbox.py) ------------------------------

def test_with_cgroup_v1_a_spare_gets_a_pids_group_of_its_own(tmp_path):
    base = tmp_path / "pids" / "faasd-1"
    base.mkdir(parents=True)
    sandbox = Sandbox(python=sys.executable, pids_mode="cgroup1", pids_base=str(base))
    plan = sandbox.own_pids_limit("fn-forked-42")
    assert plan is not None
    group = base / "fn-forked-42"
    assert (group / "pids.max").read_text() == str(MAX_PROCESSES_PER_WORKER)
    assert plan.plan["cgroups"] == [str(group / "cgroup.procs")]
    assert plan.pids_dir == str(group)  # what kill_all() empties and remove() removes


def test_with_cgroup_v2_the_spares_memory_cgroup_carries_its_pids_limit(tmp_path):
    memory = WorkerCgroup(tmp_path / "fn-forked-42", 2)
    memory.path.mkdir()
    sandbox = Sandbox(python=sys.executable, pids_mode="cgroup2", pids_base=str(tmp_path))
    assert sandbox.own_pids_limit("fn-forked-42", memory) is None  # nothing more to move into
    assert (memory.path / "pids.max").read_text() == str(MAX_PROCESSES_PER_WORKER)


def test_without_a_pids_controller_a_spare_gets_no_group(tmp_path):
    assert Sandbox(python=sys.executable).own_pids_limit("fn-forked-42") is None
