"""The Python worker's entry point: `python -I -S python_worker.py`.

Python compiles a script from source every time it runs, but loads an
imported module from its cached bytecode. The shim itself is
faasd/runtimes/python_runtime.py; this file only imports it (as
`faasd.runtimes.python_runtime`, a name no function's module can take) and
runs it, so that a worker's start does not compile the shim (about 3 ms).

Standard library only.
"""

import os
import sys

# -I leaves the script's own directory off sys.path; the faasd package sits
# two levels up. Take the shim, then forget the path so that user code does
# not see the daemon's package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from faasd.runtimes import python_runtime  # noqa: E402

del sys.path[0]

if __name__ == "__main__":
    sys.exit(python_runtime.main())
