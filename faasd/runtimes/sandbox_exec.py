"""Launcher: isolate this process as faasd/sandbox.py plans, then exec the runtime.

Started by the daemon as `python -I -S sandbox_exec.py COMMAND...` with the
plan in `_FAASD_SANDBOX`. It sets up the worker's isolation (namespaces,
/tmp, rlimits, user, parent-death signal) and then execs COMMAND in the same
process, so every runtime -- Node.js, a custom `bootstrap`, anything else --
starts already confined. `--probe` carries out a plan and exits: the daemon
uses it at start to learn what the host allows.

Standard library only, and no site-packages (-S): nothing of the daemon's
environment is loaded into the worker.
"""

import os
import sys

# -I leaves the script's directory off sys.path; faasd's package sits two
# levels up. Take the module, then forget the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from faasd import sandbox  # noqa: E402

del sys.path[0]

if __name__ == "__main__":
    sandbox.launch(sys.argv[1:])
