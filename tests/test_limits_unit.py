"""Unit tests of faasd.limits on a plain directory tree standing in for a cgroup hierarchy."""

from __future__ import annotations

import os
import subprocess
import sys

from faasd.limits import sweep_stale_cgroups


def test_stale_trees_of_dead_daemons_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f"faasd-{dead}" / "fn-1" / "inner").mkdir(parents=True)
    (tmp_path / f"faasd-{os.getpid()}" / "fn-2").mkdir(parents=True)
    (tmp_path / "other-123").mkdir()
    busy = tmp_path / f"faasd-{dead}0"  # a dead pid whose group still has a member file
    busy.mkdir()
    (busy / "cgroup.procs").write_text("1\n")
    assert sweep_stale_cgroups(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"faasd-{os.getpid()}", "other-123", f"faasd-{dead}0"])
