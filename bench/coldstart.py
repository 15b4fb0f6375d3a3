"""Target 5: a function's first start costs <= interpreter start + its own imports + 5 ms.

Interleaved, REPS rounds of:
  * `python -I -c pass` (the interpreter alone),
  * `python -I -c "import <the handler's modules>"` (interpreter + imports),
  * a cold start in faasd: the handler file is rewritten (a new code revision,
    so no warm worker and no template can serve it) and invoked until the new
    revision answers; that call's REPORT line's Init Duration is the worker's
    time from spawn to ready. (A call that still meets the old revision may be
    served by a fork of its template, which also reports an Init Duration: the
    handler returns its revision so that such a call is never counted.)
faasd's overhead is Init Duration minus the interpreter-plus-imports median.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common import emit_json, faasd_server, median, report

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "15"))
IMPORTS = "json, email.message, http.client, decimal, uuid"
HANDLER = f"import {IMPORTS}\n\nREVISION = {{revision}}\n\ndef handler(event, context):\n    return REVISION\n"


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True)
    return (time.perf_counter() - started) * 1000


def cold_init_ms(url: str, source: Path, round_no: int) -> float:
    source.write_text(HANDLER.format(revision=round_no))
    deadline = time.monotonic() + 10
    while True:
        request = urllib.request.Request(
            f"{url}/2015-03-31/functions/cold/invocations", data=b"{}", method="POST",
            headers={"X-Amz-Log-Type": "Tail"})
        with urllib.request.urlopen(request) as response:
            log = base64.b64decode(response.headers["X-Amz-Log-Result"]).decode()
            revision = json.loads(response.read())
        match = re.search(r"Init Duration: ([\d.]+) ms", log)
        if revision == round_no:
            if match is None:
                raise RuntimeError(f"revision {round_no} answered without a cold start")
            return float(match.group(1))
        if time.monotonic() > deadline:
            raise RuntimeError("no cold start observed")
        time.sleep(0.05)


def main() -> None:
    python = sys.executable
    with faasd_server({"cold.py": HANDLER.format(revision=-1)}, env={"FAASD_WORKERS_FREEZE_AFTER_MS": "3600000"}) as url:
        functions = Path(json.loads(urllib.request.urlopen(url + "/system/info").read())["functions_dir"])
        bare, imports, faasd = [], [], []
        for round_no in range(ROUNDS):
            bare.append(timed([python, "-I", "-c", "pass"]))
            imports.append(timed([python, "-I", "-c", f"import {IMPORTS}"]))
            time.sleep(0.1)  # let the previous revision's change settle
            faasd.append(cold_init_ms(url, functions / "cold.py", round_no))
    overhead = median(faasd) - median(imports)
    report(f"cold start, {ROUNDS} interleaved rounds, medians", [
        ("python -I -c pass", f"{median(bare):.1f} ms"),
        (f"python -I -c 'import {IMPORTS}'", f"{median(imports):.1f} ms"),
        ("faasd Init Duration (spawn to ready)", f"{median(faasd):.1f} ms"),
        ("faasd overhead", f"{overhead:+.1f} ms  (target <= +5 ms)"),
    ])
    emit_json("coldstart", {"python_ms": median(bare), "imports_ms": median(imports),
                            "faasd_init_ms": median(faasd), "overhead_ms": overhead})


if __name__ == "__main__":
    main()
