"""What the HTML reports add to the participant level.

Runs the participant level twice on each dataset, each time in its own process
and into a fresh OUTPUT_DIR, once with ``--no-reports`` and once with reports,
then once more with ``--reports-only`` on the second output (the report step
alone), and prints wall and CPU time with the share the reports add. Datasets:

- ``benchmark``: the run of bench_firstlevel.py (MNI grid with nilearn's brain
  mask, real flanker timing, 3 contrasts), 200 volumes at 2 mm by default;
- ``multicontrast``: the demo dataset (4 subjects x 2 runs, 4 mm) with 5 contrasts.

    python benchmarks/bench_reports.py [--volumes 200] [--voxel-size 2] [--keep DIR] [--only NAME] [--n-cpus N]

With --n-cpus N every run gets ``--n-cpus N`` (the figures of one report are then drawn in N
threads, the reports of several subjects in N processes, whose CPU time is not counted:
measure CPU time with the default of 1).

CPU time is the steadier number on a shared machine; the load average is printed
with the results, because wall times on a loaded machine are not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_firstlevel import CONTRASTS, make_run  # noqa: E402

DEMO_CONTRASTS = {"difference": "incongruent_correct - congruent_correct", "congruent": "congruent_correct",
                  "incongruent": "incongruent_correct", "sum": "incongruent_correct + congruent_correct",
                  "errors": "incongruent_incorrect"}

RUN = textwrap.dedent("""
    import json, resource, sys, time
    t0, c0 = time.perf_counter(), time.process_time()
    import bidsglm.cli
    spent = {"wall": 0.0, "cpu": 0.0}
    real = bidsglm.cli.write_reports

    def timed(*args, **kwargs):  # the report step alone, inside the same run
        w, c = time.perf_counter(), time.process_time()
        try:
            return real(*args, **kwargs)
        finally:
            spent["wall"] += time.perf_counter() - w
            spent["cpu"] += time.process_time() - c

    bidsglm.cli.write_reports = timed
    assert bidsglm.cli.main(sys.argv[1:]) == 0
    print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                      "report_wall": spent["wall"], "report_cpu": spent["cpu"],
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def run(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN, *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(name: str, root: Path, work: Path, contrasts: dict, n_cpus: int = 1) -> None:
    common = ["--skip-bids-validation", "-q", "--n-cpus", str(n_cpus)]
    for label, expr in contrasts.items():
        common += ["--contrast", f"{label}={expr}"]
    results = {}
    for label, extra in (("without reports", ["--no-reports"]), ("with reports", [])):
        out = work / f"{name}-out-{'no' if extra else 'with'}-reports"
        shutil.rmtree(out, ignore_errors=True)
        results[label] = run([root, out, "participant", *common, *extra])
    # the reports written again from scratch (the previous report removed: no figure to reuse)
    for page in (work / f"{name}-out-with-reports").glob("sub-*.html"):
        page.unlink()
    results["reports only"] = run([root, work / f"{name}-out-with-reports", "participant", "-q", "--reports-only",
                                   "--n-cpus", str(n_cpus)])
    # and once more: every map unchanged, so no figure is drawn again
    results["rerun reports"] = run([root, work / f"{name}-out-with-reports", "participant", "-q", "--reports-only",
                                    "--n-cpus", str(n_cpus)])
    print(f"\n{name}: {root}")
    print(f"{'':18s} {'wall s':>8s} {'cpu s':>8s} {'report wall s':>14s} {'report cpu s':>13s} {'peak MB':>8s}")
    for label, r in results.items():
        print(f"{label:18s} {r['wall']:8.1f} {r['cpu']:8.1f} {r['report_wall']:14.2f} {r['report_cpu']:13.2f} "
              f"{r['maxrss_mb']:8.0f}")
    base, full = results["without reports"], results["with reports"]
    # two measures: the difference between the runs (noisy on a busy machine) and the report
    # step timed inside the run with reports, against the rest of that run
    print(f"reports add {100 * (full['wall'] / base['wall'] - 1):+.0f}% wall, "
          f"{100 * (full['cpu'] / base['cpu'] - 1):+.0f}% cpu (run against run); "
          f"the report step is {100 * full['report_wall'] / (full['wall'] - full['report_wall']):.0f}% wall, "
          f"{100 * full['report_cpu'] / (full['cpu'] - full['report_cpu']):.0f}% cpu of the rest of its run "
          "(target: at most 25%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--volumes", type=int, default=200)
    p.add_argument("--voxel-size", type=int, default=2)
    p.add_argument("--keep", type=Path, help="folder for the data and outputs (default: temporary)")
    p.add_argument("--only", choices=["benchmark", "multicontrast"])
    p.add_argument("--n-cpus", type=int, default=1)
    args = p.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bidsglm-bench-reports-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    if args.only in (None, "benchmark"):
        root = work / f"bench-{args.volumes}-{args.voxel_size}mm"
        if not (root / "dataset_description.json").exists():
            t = time.perf_counter()
            make_run(root, args.volumes, args.voxel_size)
            print(f"generated {args.volumes} volumes at {args.voxel_size} mm in {time.perf_counter() - t:.0f} s")
        measure("benchmark", root, work, CONTRASTS, args.n_cpus)
    if args.only in (None, "multicontrast"):
        from bidsglm.demo import make_demo

        root = work / "demo"
        if not (root / "dataset_description.json").exists():
            make_demo(root, n_subjects=4, voxel_size=4, seed=0)
        measure("multicontrast", root, work, DEMO_CONTRASTS, args.n_cpus)
    print(f"\nload average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
