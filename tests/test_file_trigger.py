"""File triggers end to end: a real daemon, real inotify, real files, real workers."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from faasd.spec import load_spec
from faasd.triggers.file import etag_of, matches, s3_key
from support import EXAMPLES, fill, small_disk, wait_until, write_function

# Prints one RECORD line per invocation; tests read them from the function's log.
RECORDER = """
import json, os, time

def handler(event, context):
    started = time.time()
    record = event["Records"][0]
    time.sleep(float(os.environ.get("SLEEP", "0")))
    print("RECORD " + json.dumps({"key": record["s3"]["object"]["key"],
                                  "size": record["s3"]["object"]["size"], "event": event,
                                  "request_id": context.aws_request_id,
                                  "start": started, "end": time.time()}))
    return "ok"
"""


def recorder(functions: Path, *, name: str = "uploads", dir: str = "uploads",
             patterns: str = '["*.jpg", "*.png"]', concurrency: int = 4, sleep: float = 0) -> None:
    write_function(functions, f"{name}/handler.py", RECORDER)
    write_function(functions, f"{name}/function.toml", f"""
        concurrency = {concurrency}
        timeout_s = 10
        [env]
        SLEEP = "{sleep}"
        [async]
        retry_delays_s = [0.2, 0.2]
        [[triggers]]
        type = "file"
        dir = "{dir}"
        patterns = {patterns}
        bucket = "photos"
    """)


def records(daemon, name: str = "uploads") -> list[dict]:
    """The RECORD lines of a function's log file (read from disk: the daemon may be down)."""
    log = daemon.data / "logs" / f"{name}.log"
    found = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        match = re.search(r"RECORD (\{.*\})\s*$", line)
        if match:
            found.append(json.loads(match.group(1)))
    return found


def keys(daemon, name: str = "uploads") -> list[str]:
    return [r["key"] for r in records(daemon, name)]


def trigger_state(daemon, name: str) -> dict:
    # {} while the function is listed without its trigger yet (its files still being written).
    return next((t["state"] for t in daemon.function(name)["triggers"] if t["type"] == "file"), {})


def watching(daemon, name: str = "uploads") -> bool:
    """The function's file trigger watches, and has looked at its dir once (a new
    trigger has taken its baseline)."""
    response = daemon.get(f"/system/functions/{name}")
    if response.status != 200:
        return False
    states = [t.get("state", {}) for t in response.json()["triggers"] if t["type"] == "file"]
    return bool(states) and states[0].get("status") == "watching" and states[0].get("rescans", 0) >= 1


@pytest.fixture
def setup(start_daemon, functions_dir, tmp_path):
    watched = tmp_path / "data" / "uploads"

    def start(watch_timeout: float = 10, **kw):
        recorder(functions_dir, **kw)
        daemon = start_daemon(functions_dir)
        wait_until(lambda: watching(daemon), timeout=watch_timeout, message="the file trigger to watch")
        return daemon

    return start, watched


def test_a_file_fires_once_only_after_it_is_completely_written(setup):
    start, watched = setup
    daemon = start()
    target = watched / "red flower.jpg"
    with open(target, "wb") as handle:
        handle.write(b"x" * 50_000)
        handle.flush()
        os.fsync(handle.fileno())
        time.sleep(2.5)  # longer than the settle window: a half-written file must not fire
        assert records(daemon) == []
        handle.write(b"y" * 50_000)
    wait_until(lambda: records(daemon), timeout=20, message="the file to fire")
    time.sleep(1.5)
    [fired] = records(daemon)
    assert fired["size"] == 100_000
    event = fired["event"]["Records"][0]
    assert event["eventSource"] == "aws:s3"
    assert event["eventName"] == "ObjectCreated:Put"
    assert event["s3"]["bucket"]["name"] == "photos"
    assert event["s3"]["object"] == {"key": "red+flower.jpg", "size": 100_000,
                                     "eTag": hashlib.md5(target.read_bytes()).hexdigest(),
                                     "sequencer": event["s3"]["object"]["sequencer"]}
    assert event["faasd"]["path"] == str(target)
    assert event["eventTime"].endswith("Z")
    # Appending after it fired is a new version of the object: one more event.
    # (Larger now: its eTag is read on its own, not in a batch of small files.)
    with open(target, "ab") as handle:
        handle.write(b"z" * 200_000)
    wait_until(lambda: len(records(daemon)) == 2, timeout=20)
    assert records(daemon)[1]["size"] == 300_000
    second = records(daemon)[1]["event"]["Records"][0]["s3"]["object"]
    assert second["eTag"] == hashlib.md5(target.read_bytes()).hexdigest() != event["s3"]["object"]["eTag"]
    state = trigger_state(daemon, "uploads")
    assert state["fired"] == 2 and state["ledger_entries"] == 1


def test_renames_moves_and_subdirectories_fire_once_and_hidden_temp_or_other_names_never(setup, tmp_path):
    start, watched = setup
    daemon = start()
    # Write a temp file, then rename it into place (rsync, most upload tools).
    (watched / ".upload-1.jpg.XYZ").write_bytes(b"a" * 10)
    os.rename(watched / ".upload-1.jpg.XYZ", watched / "renamed.jpg")
    (watched / "temp.jpg.part").write_bytes(b"b" * 10)
    os.rename(watched / "temp.jpg.part", watched / "from-part.png")
    # Moved in from outside the watched tree.
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"c" * 10)
    shutil.move(outside, watched / "moved-in.jpg")
    # A fresh subdirectory, written at once (before its watch may exist).
    (watched / "a" / "b").mkdir(parents=True)
    (watched / "a" / "b" / "deep.jpg").write_bytes(b"d" * 10)
    # A whole directory moved in.
    batch = tmp_path / "batch"
    batch.mkdir()
    (batch / "one.jpg").write_bytes(b"e")
    (batch / "two.png").write_bytes(b"f")
    shutil.move(batch, watched / "batch")
    # Never: hidden, in a hidden dir, temp names, other patterns.
    (watched / ".hidden.jpg").write_bytes(b"h")
    (watched / ".cache").mkdir()
    (watched / ".cache" / "x.jpg").write_bytes(b"h")
    (watched / "draft.jpg.tmp").write_bytes(b"t")
    (watched / "backup.jpg~").write_bytes(b"t")
    (watched / "notes.txt").write_bytes(b"n")
    expected = {"renamed.jpg", "from-part.png", "moved-in.jpg", "a/b/deep.jpg",
                "batch/one.jpg", "batch/two.png"}
    wait_until(lambda: set(keys(daemon)) >= expected, timeout=30,
               message=f"{expected} to fire; got {keys(daemon)}")
    time.sleep(3)  # past the settle window of rescans: anything else would have fired by now
    assert sorted(keys(daemon)) == sorted(expected)

    # A processed file renamed within the tree keeps its ledger entry: no second event.
    os.rename(watched / "renamed.jpg", watched / "a" / "renamed-again.jpg")
    (watched / "sentinel.jpg").write_bytes(b"s")
    wait_until(lambda: "sentinel.jpg" in keys(daemon), timeout=20)
    time.sleep(1)
    assert sorted(keys(daemon)) == sorted(expected | {"sentinel.jpg"})


def test_a_burst_of_1000_files_is_processed_each_once_within_the_concurrency(setup):
    start, watched = setup
    daemon = start(concurrency=3)
    names = [f"burst/img-{i:04d}.jpg" for i in range(1000)]
    (watched / "burst").mkdir()
    for name in names:
        (watched / name).write_bytes(name.encode())
    wait_until(lambda: len(records(daemon)) >= 1000, timeout=240, interval=0.5,
               message="1000 files to be processed")
    time.sleep(1)
    got = records(daemon)
    assert sorted(r["key"] for r in got) == sorted(names)
    # Never more than `concurrency` handlers running at once.
    edges = sorted([(r["start"], 1) for r in got] + [(r["end"], -1) for r in got],
                   key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak <= 3
    assert trigger_state(daemon, "uploads")["fired"] == 1000


def test_files_that_arrive_while_down_fire_once_and_processed_files_never_again(setup, start_daemon,
                                                                                  functions_dir, tmp_path):
    start, watched = setup
    daemon = start()
    for name in ("one.jpg", "two.jpg"):
        (watched / name).write_bytes(name.encode())
    # copy2 sets the old mtime after the close: still the same file, not a new one.
    original = tmp_path / "original.jpg"
    original.write_bytes(b"kept")
    os.utime(original, (1_000_000_000, 1_000_000_000))
    shutil.copy2(original, watched / "copied.jpg")
    wait_until(lambda: len(records(daemon)) == 3, timeout=20)
    assert daemon.stop() == 0

    (watched / "three.jpg").write_bytes(b"3")          # arrived while down
    (watched / "sub").mkdir()
    (watched / "sub" / "four.png").write_bytes(b"4")   # in a new subdirectory
    (watched / "two.jpg").write_bytes(b"two, version 2")  # replaced while down
    (watched / "one.jpg").unlink()
    (watched / "one.jpg").write_bytes(b"one")  # same name and content, but a new file
    old = time.time() - 60
    for name in ("three.jpg", "sub/four.png", "two.jpg", "one.jpg"):
        os.utime(watched / name, (old, old))  # written long ago: no settle wait
    daemon = start_daemon(functions_dir)
    wait_until(lambda: len(records(daemon)) == 7, timeout=20,
               message=f"the files written while down to fire; got {keys(daemon)}")
    assert sorted(keys(daemon)[3:]) == ["one.jpg", "sub/four.png", "three.jpg", "two.jpg"]
    assert daemon.stop() == 0

    # Nothing changed while down this time: nothing fires.
    daemon = start_daemon(functions_dir)
    wait_until(lambda: watching(daemon))
    (watched / "sentinel.jpg").write_bytes(b"s")
    wait_until(lambda: "sentinel.jpg" in keys(daemon), timeout=20)
    time.sleep(2.5)
    assert len(records(daemon)) == 8
    assert keys(daemon).count("copied.jpg") == 1


def test_a_file_still_open_for_writing_at_start_fires_at_its_close_not_before(setup, start_daemon,
                                                                              functions_dir):
    start, watched = setup
    daemon = start()
    assert daemon.stop() == 0
    target = watched / "slow upload.jpg"
    with open(target, "wb") as handle:  # a writer that pauses, longer than any settle window
        handle.write(b"x" * 100)
        handle.flush()
        old = time.time() - 60
        os.utime(target, (old, old))  # and whose last write looks long done
        daemon = start_daemon(functions_dir)
        wait_until(lambda: watching(daemon) and trigger_state(daemon, "uploads")["rescans"] >= 1,
                   message="the start-up rescan")
        time.sleep(3)  # past the settle window
        assert records(daemon) == []
        handle.write(b"y" * 100)
    wait_until(lambda: records(daemon), timeout=20, message="the file to fire at its close")
    time.sleep(1)
    assert [(r["key"], r["size"]) for r in records(daemon)] == [("slow+upload.jpg", 200)]


# -- a new trigger sees only new files, as an S3 notification sees only new objects -----------

def already_there(directory: Path, names: list[str]) -> None:
    """Files written long ago (no settle wait: without a baseline they would fire at once)."""
    old = time.time() - 3600
    for name in names:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(name.encode())
        os.utime(directory / name, (old, old))


def baselines(daemon, name: str = "uploads") -> list[tuple[str, int]]:
    """(dir, files taken as already there) of each baseline a function's file triggers took."""
    return [(match.group(1), int(match.group(2))) for match in re.finditer(
        rf"function {name}: new file trigger on (\S+) \(.*?\): (\d+) files already there taken as present",
        daemon.output())]


def test_a_new_trigger_does_not_fire_for_the_files_already_in_its_dir(setup):
    start, watched = setup
    there = ["a.jpg", "b.png", "sub/c.jpg", "red flower.jpg"]
    already_there(watched, there + ["notes.txt"])
    daemon = start()
    (watched / "new.jpg").write_bytes(b"new")
    with open(watched / "a.jpg", "ab") as handle:  # a file that was there, written again: a new version
        handle.write(b" again")
    wait_until(lambda: len(keys(daemon)) == 2, timeout=20, message=f"the new files to fire; got {keys(daemon)}")
    state = trigger_state(daemon, "uploads")
    # Queued (fired) are the two new files only; the others are in the ledger as they are.
    assert state["fired"] == 2 and state["pending"] == 0, state
    assert state["ledger_entries"] == 5, state
    assert sorted(keys(daemon)) == ["a.jpg", "new.jpg"]
    # Said once, with how many files were taken as there: why nothing fired.
    assert baselines(daemon) == [(str(watched), 4)], daemon.output()


def test_files_dropped_while_down_fire_at_the_next_start_of_a_known_trigger(setup, start_daemon,
                                                                            functions_dir):
    start, watched = setup
    already_there(watched, ["before.jpg"])
    daemon = start()
    assert daemon.stop() == 0
    assert baselines(daemon) == [(str(watched), 1)] and keys(daemon) == []
    already_there(watched, ["down-1.jpg", "sub/down-2.png"])
    daemon = start_daemon(functions_dir)
    wait_until(lambda: len(keys(daemon)) == 2, timeout=20,
               message=f"the files dropped while down to fire; got {keys(daemon)}")
    state = trigger_state(daemon, "uploads")
    assert state["fired"] == 2 and state["pending"] == 0, state
    assert sorted(keys(daemon)) == ["down-1.jpg", "sub/down-2.png"]
    assert baselines(daemon) == []  # known: no baseline this time


def test_a_file_still_open_for_writing_when_a_new_trigger_looks_fires_at_its_close(setup):
    start, watched = setup
    already_there(watched, ["done.jpg"])
    with open(watched / "slow upload.jpg", "wb") as handle:
        handle.write(b"x" * 100)
        handle.flush()
        daemon = start()
        assert trigger_state(daemon, "uploads")["fired"] == 0
        handle.write(b"y" * 100)
    wait_until(lambda: records(daemon), timeout=20, message="the file to fire at its close")
    assert trigger_state(daemon, "uploads")["fired"] == 1
    assert [(r["key"], r["size"]) for r in records(daemon)] == [("slow+upload.jpg", 200)]
    assert baselines(daemon) == [(str(watched), 1)]


def test_files_written_while_a_new_trigger_takes_its_baseline_fire(setup, tmp_path):
    """The dir is scanned while files keep coming: each written once the trigger watches
    fires, also while inotify's events reach the daemon late (watchdog holds the events
    behind a file moved out of the tree for up to 0.5 s, waiting for a move back in)."""
    start, watched = setup
    there = [f"d{i // 100:02d}/old-{i:04d}.jpg" for i in range(3000)]  # a scan that takes a while
    already_there(watched, there)
    written: list[str] = []
    marks: dict[str, int] = {}  # log line -> how many files were written before it was seen
    stop = threading.Event()

    def write_while_starting() -> None:
        lines = {"watching": f"watching {watched} for", "baseline": "new file trigger on"}
        while not stop.is_set() and len(written) < marks.get("baseline", 10**6) + 20:
            log = next(iter(tmp_path.glob("daemon-*.log")), None)
            output = log.read_text(errors="replace") if log else ""
            for mark, line in lines.items():
                if mark not in marks and line in output:
                    marks[mark] = len(written)
                    if mark == "watching":
                        os.rename(watched / there[0], tmp_path / "moved-out.jpg")
            name = f"race-{len(written):04d}.jpg"
            (watched / name).write_bytes(b"r")
            written.append(name)
            # A steady stream, not a flood: each file is an invocation, and a flood on a
            # slow machine would only delay the baseline it waits for.
            time.sleep(0.002)

    writer = threading.Thread(target=write_while_starting)
    writer.start()
    try:
        daemon = start(watch_timeout=60)  # a scan of 3,000 files on a loaded machine
    finally:
        stop.set()
        writer.join()
    after = set(written[marks["watching"]:])
    assert marks["baseline"] > marks["watching"], marks  # some came between the watch and the baseline
    wait_until(lambda: set(keys(daemon)) >= after, timeout=60,
               message=f"the {len(after)} files written once the trigger watched to fire; "
                       f"missing {sorted(after - set(keys(daemon)))[:5]}")
    # Every file ends up in the ledger, taken as there or fired: none is lost.
    wait_until(lambda: trigger_state(daemon, "uploads")["ledger_entries"] == len(there) - 1 + len(written),
               timeout=20, message="every file in the ledger")
    wait_until(lambda: len(keys(daemon)) == trigger_state(daemon, "uploads")["fired"], timeout=60,
               message="every event to run")
    assert not set(keys(daemon)) & set(there)
    assert len(keys(daemon)) == len(set(keys(daemon)))


def test_a_trigger_added_by_hot_reload_does_not_fire_for_the_files_already_in_its_dir(
        start_daemon, functions_dir, tmp_path):
    watched = tmp_path / "data" / "uploads"
    already_there(watched, ["a.jpg", "b.jpg"])
    daemon = start_daemon(functions_dir)
    recorder(functions_dir)  # a new function, dropped into functions/
    wait_until(lambda: watching(daemon), message="the new function's trigger to watch")
    (watched / "c.jpg").write_bytes(b"c")
    wait_until(lambda: "c.jpg" in keys(daemon), timeout=20, message=f"c.jpg to fire; got {keys(daemon)}")
    assert trigger_state(daemon, "uploads")["fired"] == 1
    assert keys(daemon) == ["c.jpg"]
    assert baselines(daemon) == [(str(watched), 2)]


def test_a_trigger_moved_to_another_dir_or_given_other_patterns_takes_a_new_baseline(
        start_daemon, functions_dir, tmp_path):
    first, second = tmp_path / "data" / "first", tmp_path / "data" / "second"
    already_there(second, ["s1.jpg", "s2.png"])
    daemon = start_daemon(functions_dir)
    recorder(functions_dir, dir="first", patterns='["*.jpg"]')
    wait_until(lambda: watching(daemon))
    (first / "f.jpg").write_bytes(b"f")
    wait_until(lambda: keys(daemon) == ["f.jpg"], timeout=20)

    recorder(functions_dir, dir="second", patterns='["*.jpg"]')
    wait_until(lambda: trigger_state(daemon, "uploads").get("dir") == str(second)
               and watching(daemon), message="the trigger to move")
    (second / "s3.jpg").write_bytes(b"s3")
    wait_until(lambda: "s3.jpg" in keys(daemon), timeout=20)
    assert trigger_state(daemon, "uploads")["fired"] == 1
    assert baselines(daemon)[-1] == (str(second), 1)

    # Other patterns, same dir: s2.png, which they match now, was there before: no event.
    recorder(functions_dir, dir="second", patterns='["*.jpg", "*.png"]')
    wait_until(lambda: trigger_state(daemon, "uploads").get("patterns") == ["*.jpg", "*.png"]
               and watching(daemon), message="the trigger to take its new patterns")
    (second / "s4.png").write_bytes(b"s4")
    wait_until(lambda: "s4.png" in keys(daemon), timeout=20)
    assert trigger_state(daemon, "uploads")["fired"] == 1
    assert keys(daemon) == ["f.jpg", "s3.jpg", "s4.png"]
    assert baselines(daemon)[-1] == (str(second), 3)


def test_a_function_deleted_and_added_again_sees_only_files_created_after(start_daemon, functions_dir,
                                                                          tmp_path):
    watched = tmp_path / "data" / "uploads"
    daemon = start_daemon(functions_dir)
    recorder(functions_dir)
    wait_until(lambda: watching(daemon))
    (watched / "one.jpg").write_bytes(b"1")
    wait_until(lambda: keys(daemon) == ["one.jpg"], timeout=20)

    shutil.rmtree(functions_dir / "uploads")
    wait_until(lambda: daemon.get("/system/functions/uploads").status == 404)
    already_there(watched, ["while-deleted.jpg"])
    recorder(functions_dir)
    wait_until(lambda: watching(daemon), message="the function to come back")
    (watched / "two.jpg").write_bytes(b"2")
    wait_until(lambda: "two.jpg" in keys(daemon), timeout=20)
    assert trigger_state(daemon, "uploads")["fired"] == 1
    assert baselines(daemon)[-1] == (str(watched), 2)
    assert daemon.stop() == 0

    # Deleted while the daemon was down: forgotten at its next start, just the same.
    shutil.rmtree(functions_dir / "uploads")
    daemon = start_daemon(functions_dir)
    assert daemon.stop() == 0
    already_there(watched, ["while-down.jpg"])
    recorder(functions_dir)
    daemon = start_daemon(functions_dir)
    wait_until(lambda: watching(daemon))
    (watched / "three.jpg").write_bytes(b"3")
    wait_until(lambda: "three.jpg" in keys(daemon), timeout=20)
    assert trigger_state(daemon, "uploads")["fired"] == 1
    assert keys(daemon) == ["one.jpg", "two.jpg", "three.jpg"]
    assert baselines(daemon) == [(str(watched), 4)]


def test_the_first_start_after_an_upgrade_fires_what_arrived_while_down_for_the_triggers_it_knew(
        start_daemon, functions_dir, tmp_path):
    """A ledger written by a faasd without baselines: a watch it has files of is known."""
    data = tmp_path / "data"
    kept, fresh = data / "uploads", data / "fresh"
    already_there(kept, ["fired-before.jpg", "arrived-while-down.jpg"])
    already_there(fresh, ["there.jpg"])
    ident = os.stat(kept / "fired-before.jpg")
    (data / "triggers").mkdir(parents=True)
    with sqlite3.connect(data / "triggers" / "files.db") as db:
        db.executescript(OLD_LEDGER_SCHEMA)
        db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (f"uploads:{kept}", "fired-before.jpg", ident.st_ino, ident.st_size,
                    ident.st_mtime_ns, "0b2d3c6e-0000-4000-8000-000000000000", time.time() - 600))
    db.close()
    recorder(functions_dir)
    recorder(functions_dir, name="newer", dir="fresh")
    daemon = start_daemon(functions_dir)
    wait_until(lambda: watching(daemon) and watching(daemon, "newer"))
    wait_until(lambda: "arrived-while-down.jpg" in keys(daemon), timeout=20,
               message=f"the file that arrived while down to fire; got {keys(daemon)}")
    assert trigger_state(daemon, "newer")["fired"] == 0
    assert trigger_state(daemon, "uploads")["fired"] == 1
    assert keys(daemon) == ["arrived-while-down.jpg"]
    assert baselines(daemon) == [] and baselines(daemon, "newer") == [(str(fresh), 1)]


# The ledger of faasd before baselines (a watch's files, no table of watches).
OLD_LEDGER_SCHEMA = """
CREATE TABLE files (
    watch TEXT NOT NULL, path TEXT NOT NULL, inode INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, request_id TEXT NOT NULL, fired_at REAL NOT NULL,
    PRIMARY KEY (watch, path)
) WITHOUT ROWID;
"""


def test_kill_9_right_after_a_burst_loses_no_file(setup, start_daemon, functions_dir):
    start, watched = setup
    daemon = start(sleep=0.05, concurrency=2)
    names = [f"k{i:03d}.jpg" for i in range(60)]
    for name in names:
        (watched / name).write_bytes(name.encode())
    wait_until(lambda: len(records(daemon)) >= 3, timeout=20)
    daemon.kill9()
    done_before = set(keys(daemon))
    assert len(done_before) < len(names), "the burst finished before kill -9; nothing was tested"
    daemon = start_daemon(functions_dir)
    wait_until(lambda: set(keys(daemon)) == set(names), timeout=90,
               message="every file to be processed after the restart")
    # At least once: a file whose event was running at the kill may run again.
    counts = {name: keys(daemon).count(name) for name in names}
    assert all(count >= 1 for count in counts.values())
    assert sum(counts.values()) <= len(names) + 4


def overflow_inotify(daemon, watched: Path, *, then: Callable[[], None] = lambda: None) -> None:
    """Make the daemon's inotify queue overflow; `then` runs while its events are being dropped."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    noise = [watched / ".noise-a", watched / ".noise-b"]
    for path in noise:
        path.write_bytes(b"")
    pid = daemon.process.pid
    os.kill(pid, signal.SIGSTOP)  # the daemon reads nothing: the kernel queue fills up
    try:
        for i in range(limit + 2000):
            os.utime(noise[i % 2])  # alternating names, so the kernel cannot merge them
        then()
    finally:
        os.kill(pid, signal.SIGCONT)


def test_an_inotify_queue_overflow_is_caught_up_by_a_rescan(setup):
    start, watched = setup
    daemon = start()

    def write_files() -> None:
        for i in range(5):
            (watched / f"lost-{i}.jpg").write_bytes(b"x")  # their events are dropped

    overflow_inotify(daemon, watched, then=write_files)
    wait_until(lambda: len(records(daemon)) >= 5, timeout=30,
               message="the files whose events were dropped to fire")
    time.sleep(1)
    assert sorted(keys(daemon)) == [f"lost-{i}.jpg" for i in range(5)]
    # Told once, though watchdog logs one overflow more than once.
    assert daemon.output().count("inotify dropped events (queue overflow)") == 1
    assert trigger_state(daemon, "uploads")["rescans"] >= 2


def test_a_file_the_full_disk_kept_out_of_the_queue_fires_once_there_is_room_again(
        start_daemon, functions_dir, tmp_path):
    watched = tmp_path / "watched"  # not on the full disk: the file itself can be written
    with small_disk(tmp_path / "data") as data:
        recorder(functions_dir, dir=str(watched))
        daemon = start_daemon(functions_dir, data=data)
        try:
            wait_until(lambda: watching(daemon), message="the file trigger to watch")
            filler = data / "filler"
            fill(filler)
            (watched / "during.jpg").write_bytes(b"during")
            wait_until(lambda: trigger_state(daemon, "uploads").get("failed") == 1,
                       message="the queue to refuse the file")
            time.sleep(3.5)  # offered again after 1 s and 2 s
            waiting = trigger_state(daemon, "uploads")
            ready = daemon.get("/readyz")
            filler.unlink()
            wait_until(lambda: "during.jpg" in keys(daemon), timeout=20,
                       message="the file to fire once the queue has room")
            assert waiting["failed"] == 1 and waiting["fired"] == 0, waiting
            assert waiting["unqueued"] == 1 and "not queued" in waiting["last_error"], waiting
            checks = ready.json()["checks"]
            assert ready.status == 503 and not checks["file_triggers"]["ok"], checks
            assert "1 file(s) not queued yet" in checks["file_triggers"]["detail"], checks
            assert "cannot write" in checks["async_queue"]["detail"], checks
            wait_until(lambda: daemon.get("/readyz").status == 200, message="/readyz to recover")
            state = trigger_state(daemon, "uploads")
            assert state["unqueued"] == 0 and state["fired"] == 1 and state["ledger_entries"] == 1, state
            (watched / "after.jpg").write_bytes(b"after")
            wait_until(lambda: "after.jpg" in keys(daemon), message="a later file")
            time.sleep(1)
            assert keys(daemon) == ["during.jpg", "after.jpg"]
            output = daemon.output()
            assert output.count("not queued") == 1, output
            assert output.count("every file that could not be queued is queued now") == 1
        finally:
            daemon.stop()


def write_bytes_named(directory: Path, name: bytes, content: bytes = b"x") -> None:
    """Write a file whose name is raw bytes (need not be valid UTF-8)."""
    with open(os.path.join(os.fsencode(directory), name), "wb") as handle:
        handle.write(content)


def test_a_name_that_is_not_utf8_is_skipped_with_one_warning_and_holds_up_no_other_file(
        setup, start_daemon, functions_dir, tmp_path):
    start, watched = setup
    daemon = start()
    # A directory of finished files moved in: a rescan of it finds the bad name among good ones.
    batch = tmp_path / "batch"
    batch.mkdir()
    moved_in = [f"g{i:02d}.jpg" for i in range(12)]
    for name in moved_in:
        (batch / name).write_bytes(name.encode())
    write_bytes_named(batch, b"bad\xe9.jpg")
    old = time.time() - 60
    for name in os.listdir(os.fsencode(batch)):
        os.utime(os.path.join(os.fsencode(batch), name), (old, old))  # written long ago: no settle wait
    shutil.move(batch, watched / "batch")
    # Written in place: the bad name has a close event of its own.
    write_bytes_named(watched, b"loose\xe9.jpg")
    (watched / "after.jpg").write_bytes(b"a")
    expected = {f"batch/{name}" for name in moved_in} | {"after.jpg"}
    wait_until(lambda: set(keys(daemon)) >= expected, timeout=20,
               message="every good file to fire")
    # Closed again and found again by a full rescan: the bad names are not warned about twice.
    write_bytes_named(watched, b"loose\xe9.jpg", b"again")
    rescans = trigger_state(daemon, "uploads")["rescans"]
    overflow_inotify(daemon, watched)
    wait_until(lambda: trigger_state(daemon, "uploads")["rescans"] > rescans, timeout=20,
               message="the rescan after the overflow")
    time.sleep(1)
    assert sorted(keys(daemon)) == sorted(expected)
    warnings = [line for line in daemon.output().splitlines() if "not valid UTF-8" in line]
    assert len(warnings) == 2, warnings
    for name in (b"batch/bad\xe9.jpg", b"loose\xe9.jpg"):
        assert any(" WARNING " in line and "function uploads" in line
                   and repr(os.fsencode(watched) + b"/" + name) in line for line in warnings), warnings
    assert "not valid UTF-8" in trigger_state(daemon, "uploads")["last_error"]
    assert "Traceback" not in daemon.output()
    assert daemon.stop() == 0

    # Written while down beside another bad name: the start-up rescan fires every good one.
    while_down = [f"d{i:02d}.jpg" for i in range(12)]
    for name in while_down:
        (watched / name).write_bytes(name.encode())
    write_bytes_named(watched, b"down\xe9.jpg")
    for name in [os.fsencode(name) for name in while_down] + [b"down\xe9.jpg"]:
        os.utime(os.path.join(os.fsencode(watched), name), (old, old))
    daemon = start_daemon(functions_dir)
    wait_until(lambda: set(keys(daemon)) >= expected | set(while_down), timeout=20,
               message="the files written while down to fire")
    # Renamed to a valid name, a skipped file fires.
    os.rename(os.path.join(os.fsencode(watched), b"loose\xe9.jpg"), watched / "loose.jpg")
    wait_until(lambda: "loose.jpg" in keys(daemon), timeout=20)
    time.sleep(1)
    assert sorted(keys(daemon)) == sorted(expected | set(while_down) | {"loose.jpg"})
    assert daemon.output().count("not valid UTF-8") == 3
    assert "Traceback" not in daemon.output()


def test_an_etag_is_read_only_from_the_file_that_was_checked(tmp_path):
    """A link checked as pointing inside the watched dir, then swapped for one pointing out
    before its eTag is read, is not read through: the read is of the file checked or none."""
    inside, secret = tmp_path / "inside.txt", tmp_path / "secret"
    inside.write_bytes(b"inside")
    secret.write_bytes(b"root only")
    link = tmp_path / "link.txt"
    link.symlink_to(inside)
    checked = os.stat(link).st_ino
    assert etag_of(str(link), checked) == hashlib.md5(b"inside").hexdigest()
    link.unlink()
    link.symlink_to(secret)
    with pytest.raises(FileNotFoundError, match="no longer the file that was checked"):
        etag_of(str(link), checked)


def test_a_symlink_out_of_the_watched_dir_never_fires(setup, start_daemon, functions_dir, tmp_path):
    """A bucket holds only what was put in it: a link to a file elsewhere on the
    host (the config, a key) does not hand its path, size and eTag to a function."""
    start, watched = setup
    secret = tmp_path / "secret.txt"
    secret.write_text("pin=4821\n")
    secret.chmod(0o600)
    assert start().stop() == 0  # the trigger is known now: what arrives while down fires at start
    inside = watched / "real.jpg"
    inside.write_bytes(b"real")
    old = time.time() - 60
    os.utime(inside, (old, old))
    # Arrived while down: found by the start-up rescan.
    (watched / "early.jpg").symlink_to(secret)
    daemon = start_daemon(functions_dir)
    wait_until(lambda: "real.jpg" in keys(daemon), timeout=20, message="the real file to fire")
    # Moved into place, as an uploader could: the move's event.
    staging = tmp_path / "staging"
    staging.mkdir()
    for name, target in (("late.jpg", secret), ("passwd.jpg", Path("/etc/passwd")),
                         ("twin.jpg", inside)):
        (staging / name).symlink_to(target)
        os.rename(staging / name, watched / name)
    (watched / "after.jpg").write_bytes(b"after")
    # A link within the watched dir is a file of the bucket.
    wait_until(lambda: {"after.jpg", "twin.jpg"} <= set(keys(daemon)), timeout=20,
               message="the files after the links to fire")

    def skipped() -> set[str]:
        return {line.split("skipping ")[1].split(":")[0] for line in daemon.output().splitlines()
                if "outside the watched dir" in line}

    # (The early link looks freshly written, as its target is: it settles first.)
    wait_until(lambda: skipped() == {"early.jpg", "late.jpg", "passwd.jpg"}, timeout=20,
               message="a warning for each link out")
    time.sleep(1)
    assert sorted(keys(daemon)) == ["after.jpg", "real.jpg", "twin.jpg"]
    assert hashlib.md5(secret.read_bytes()).hexdigest() not in daemon.log_of("uploads")
    assert "symlink out of the watched dir" in trigger_state(daemon, "uploads")["last_error"]
    assert "Traceback" not in daemon.output()


def test_file_triggers_follow_hot_reload(start_daemon, functions_dir, tmp_path):
    daemon = start_daemon(functions_dir)
    recorder(functions_dir, dir="first")
    wait_until(lambda: watching(daemon))
    (tmp_path / "data" / "first" / "a.jpg").write_bytes(b"a")
    wait_until(lambda: keys(daemon) == ["a.jpg"], timeout=20)

    recorder(functions_dir, dir="second")  # the trigger moves to another dir
    wait_until(lambda: trigger_state(daemon, "uploads").get("dir") == str(tmp_path / "data" / "second"))
    (tmp_path / "data" / "first" / "b.jpg").write_bytes(b"b")
    (tmp_path / "data" / "second" / "c.jpg").write_bytes(b"c")
    wait_until(lambda: "c.jpg" in keys(daemon), timeout=20)

    shutil.rmtree(functions_dir / "uploads")  # the function goes away, and its trigger
    wait_until(lambda: daemon.get("/system/functions/uploads").status == 404)
    (tmp_path / "data" / "second" / "d.jpg").write_bytes(b"d")
    time.sleep(2.5)
    assert keys(daemon) == ["a.jpg", "c.jpg"]


def test_the_thumbnail_example_resizes_an_uploaded_image(start_daemon, functions_dir, tmp_path):
    from PIL import Image

    shutil.copytree(EXAMPLES / "thumbnail", functions_dir / "thumbnail")
    daemon = start_daemon(functions_dir)
    wait_until(lambda: watching(daemon, "thumbnail"), message="the thumbnail trigger to watch")
    bucket = tmp_path / "data" / "uploads"
    images = bucket / "images"
    images.mkdir()
    staging = tmp_path / "staging"
    staging.mkdir()
    Image.new("RGB", (1600, 1200), (200, 30, 30)).save(staging / "red flower.jpg", quality=90)
    Image.new("RGBA", (600, 900), (0, 0, 255, 128)).save(staging / "tall.png")
    shutil.move(staging / "red flower.jpg", images / "red flower.jpg")  # a finished upload
    (images / "2024").mkdir()
    shutil.copyfile(staging / "tall.png", images / "2024" / "tall.png")  # written in place
    out = bucket / "thumbnails"
    expected = {
        out / "red flower-thumbnail.jpg": (200, 150),
        out / "red flower-medium.jpg": (800, 600),
        out / "2024" / "tall-thumbnail.png": (133, 200),
        out / "2024" / "tall-medium.png": (533, 800),
    }
    wait_until(lambda: all(path.exists() for path in expected), timeout=30,
               message=f"thumbnails in {out}:\n{daemon.log_of('thumbnail')}")
    for path, size in expected.items():
        with Image.open(path) as image:
            assert image.size == size, path
    # The handler says so once its outputs are in place: a moment after they appear.
    wait_until(lambda: "resized uploads/images/red flower.jpg: thumbnail 200x150, medium 800x600"
               in daemon.log_of("thumbnail"), message="the handler's own account")
    log = daemon.log_of("thumbnail")
    time.sleep(2.5)  # the outputs are in the bucket too, but outside the patterns: no more runs
    assert log.count("START RequestId") == daemon.log_of("thumbnail").count("START RequestId") == 2


def test_names_that_may_fire():
    assert matches("a.jpg", ["*.jpg"]) and matches("x/y/a.jpg", ["*.jpg"])
    assert matches("x/a.jpg", ["x/*.jpg"]) and not matches("y/a.jpg", ["x/*.jpg"])
    for name in (".a.jpg", ".dir/a.jpg", "a.jpg.tmp", "a.jpg~", "a.jpg.part", "~$a.jpg", "a.png"):
        assert not matches(name, ["*.jpg"]), name
    assert s3_key("red flower.jpg") == "red+flower.jpg"
    assert s3_key("dir/a+b (1).jpg") == "dir/a%2Bb+%281%29.jpg"


@pytest.mark.parametrize("toml, message", [
    ('[[triggers]]\ntype = "file"\npatterns = ["*.jpg"]\n',
     "function.toml: triggers[0] (file): a file trigger needs dir"),
    ('[[triggers]]\ntype = "file"\ndir = "up"\npattern = "*.jpg"\n',
     "function.toml: triggers[0] (file): unknown key 'pattern'"),
    ('[[triggers]]\ntype = "file"\ndir = "up"\npatterns = [1]\n',
     "function.toml: triggers[0] (file): patterns must be a string or a list of strings"),
])
def test_bad_file_trigger_options_name_the_file_and_the_key(tmp_path, toml, message):
    write_function(tmp_path, "fn/handler.py", "def handler(event, context):\n    return 1\n")
    write_function(tmp_path, "fn/function.toml", toml)
    spec = load_spec("fn", tmp_path / "fn")
    assert spec.load_error is not None and spec.load_error.startswith(message), spec.load_error


def test_a_function_sees_its_watched_dir_and_no_other_function_does(start_daemon, functions_dir, tmp_path):
    peek = "import os\ndef handler(event, context):\n    return {p: os.path.exists(p) for p in event['paths']}\n"
    write_function(functions_dir, "owner/handler.py", peek)
    write_function(functions_dir, "owner/function.toml", '[[triggers]]\ntype = "file"\ndir = "bucket"\n')
    write_function(functions_dir, "other.py", peek)
    daemon = start_daemon(functions_dir)
    wait_until(lambda: watching(daemon, "owner"))
    upload = tmp_path / "data" / "bucket" / "f.bin"
    upload.write_bytes(b"x")
    paths = [str(upload), str(tmp_path / "data" / "queue.db")]
    assert daemon.invoke("owner", {"paths": paths}).json() == {paths[0]: True, paths[1]: False}
    isolation = daemon.get("/system/info").json()["isolation"]
    if isolation["private_data"]["active"]:
        assert daemon.invoke("other", {"paths": paths}).json() == {paths[0]: False, paths[1]: False}


def test_a_daemon_started_on_a_full_disk_fires_the_files_written_meanwhile_once_there_is_room(
        start_daemon, functions_dir, tmp_path):
    watched = tmp_path / "watched"  # not on the full disk: the files can be written
    with small_disk(tmp_path / "data") as data:
        recorder(functions_dir, dir=str(watched))
        daemon = start_daemon(functions_dir, data=data)
        try:
            wait_until(lambda: watching(daemon), message="the file trigger to watch")
            (watched / "before.jpg").write_bytes(b"before")
            wait_until(lambda: "before.jpg" in keys(daemon), message="a file before the restart")
            assert daemon.stop() == 0
            filler = data / "filler"
            fill(filler)
            daemon.start(wait=False)
            wait_until(daemon.serving, timeout=20, message="the daemon to serve")
            (watched / "during.jpg").write_bytes(b"during")
            state = trigger_state(daemon, "uploads")
            assert state["status"] == "waiting" and "files.db" in state["reason"], state
            ready = daemon.get("/readyz")
            check = ready.json()["checks"]["file_triggers"]
            assert ready.status == 503 and not check["ok"] and "files.db" in check["detail"], check
            time.sleep(1.5)  # opening is tried again after 1 s, and fails again
            filler.unlink()
            wait_until(lambda: "during.jpg" in keys(daemon), timeout=20,
                       message=f"the file written meanwhile to fire\n{daemon.output()}")
            wait_until(lambda: daemon.get("/readyz").status == 200, message="/readyz to recover")
            (watched / "after.jpg").write_bytes(b"after")
            wait_until(lambda: "after.jpg" in keys(daemon), message="a later file")
            time.sleep(1)
            assert keys(daemon) == ["before.jpg", "during.jpg", "after.jpg"]
            output = daemon.output()
            assert "cannot start" not in output
            assert output.count("file triggers: cannot open") == 1, output
            assert output.count("files.db is open now") == 1, output
        finally:
            daemon.stop()
