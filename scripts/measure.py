"""Run a command and print its wall time, CPU time and peak memory of the whole process tree.

`/usr/bin/time -v` reports the largest single process, which understates a command that runs
several processes at once (pytest-xdist workers, Dask workers, joblib): this sums the
proportional set size (PSS: shared pages split between the processes sharing them) of the
command and all its descendants, sampled every 0.2 s, and reports the largest sum.

    python scripts/measure.py -- .venv/bin/python -m pytest
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(_children(current))
    return found


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main(argv: list[str]) -> int:
    if "--" in argv:
        argv = argv[argv.index("--") + 1:]
    if not argv:
        print(__doc__)
        return 64
    load = os.getloadavg()[0]
    start = time.monotonic()
    proc = subprocess.Popen(argv)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(_pss_kib(p) for p in _tree(proc.pid)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    sampler.join()
    wall = time.monotonic() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"measure: exit {code}, wall {wall:.0f} s ({wall / 60:.1f} min), CPU {usage.ru_utime + usage.ru_stime:.0f} s, "
          f"peak memory of the process tree {peak[0] / 2**20:.2f} GiB (PSS sum), "
          f"largest single process {usage.ru_maxrss / 2**20:.2f} GiB, load average at the start {load:.1f}",
          file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
