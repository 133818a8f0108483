"""Benchmark: build_projection.py as a whole process (wall time and peak RSS).

Each build runs in a fresh subprocess (imports, tokenizer loading and torch.save included), so the
figures are what a user waits for. Peak memory is the child's ru_maxrss.

    python bench/bench_projection.py [--repeat 3] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = [("pkg:llama-3.2", "pkg:qwen3"), ("pkg:llama-3.2", "pkg:o200k")]


def run_once(student: str, teacher: str, out: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one build in a fresh process."""
    code = (
        "import resource, sys, build_projection; rc = build_projection.main(sys.argv[1:]); "
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
    )
    start = time.perf_counter()
    argv = [sys.executable, "-c", code, "--student", student, "--teacher", teacher, "--out", out]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    peak_kb = int(result.stdout.split("PEAK_KB")[1].split()[0])
    return wall, peak_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="also write the headline figures here")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores; best of {args.repeat} fresh processes")
    print("| student | teacher | wall (s) | peak RSS (MB) |\n|---|---|---|---|")
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for student, teacher in PAIRS:
            runs = [run_once(student, teacher, f"{tmp}/W.pt") for _ in range(args.repeat)]
            wall = min(r[0] for r in runs)
            peak = max(r[1] for r in runs)
            print(f"| {student} | {teacher} | {wall:.1f} | {peak:.0f} |")
            measure = f"{student} -> {teacher}: wall, peak RSS"
            figures.append({"measure": measure, "figure": f"{wall:.1f} s, {peak:.0f} MB peak RSS"})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"stage": "W build", "figures": figures}, f, indent=1)


if __name__ == "__main__":
    main()
