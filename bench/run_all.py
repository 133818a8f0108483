"""Run the five benchmarks one after another, then print their headline figures in one table.

    python bench/run_all.py            # the full figures (what `make bench` runs)
    python bench/run_all.py --quick    # each script's small settings: a smoke test in minutes
    python bench/run_all.py --only losses,evaluate

Each script runs in its own subprocess, never two at once (they time themselves); its output
streams through as it comes. Each writes its headline figures with --json to a temporary file and
the combined table (stage | measure | figure) is built from those files, not parsed from the
printed tables. A script that fails (or reports a figure as failed) shows as failed in the table,
the others still run, and the exit code is 1. The machine (CPU model and count, memory, GPU if
torch sees one) heads the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# script: (stage, its quick arguments); full runs use each script's own defaults
SCRIPTS = {
    "bench_projection.py": ("W build", ["--repeat", "1"]),
    "bench_alignment.py": ("alignment", ["--repeats", "3"]),  # seconds each: 1 is too noisy
    "bench_losses.py": ("losses", ["--quick"]),
    "bench_train.py": ("train step", ["--steps", "3"]),  # 2 warm-up steps + 1 timed
    "bench_evaluate.py": ("evaluate", ["--quick"]),
    "bench_packing.py": ("packing", ["--quick"]),  # real documents: apt-get install -y git-doc
}


def machine() -> str:
    """CPU model and count, memory, and the GPU torch sees (if any)."""
    info = {}
    for path, key in (("/proc/cpuinfo", "model name"), ("/proc/meminfo", "MemTotal")):
        try:
            with open(path) as f:
                info[key] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith(key))
        except (OSError, StopIteration):  # not Linux, or a field this kernel does not give
            info[key] = "?"
    cpu = f"{os.cpu_count()} x {info['model name']}"
    memory = info["MemTotal"]
    if memory.endswith(" kB"):
        memory = f"{int(memory[:-3]) / 2**20:.0f} GB"
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        gpu = f"{n} x {torch.cuda.get_device_name(0)}"
    else:
        gpu = "no GPU"
    return f"{cpu}, {memory} RAM, {gpu}; torch {torch.__version__}"


def run(script: str, extra: list[str], json_path: str) -> tuple[int, float]:
    """(exit code, wall seconds) of one script, its output going straight to ours."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # stream as it prints, even into a pipe
    env.setdefault("HF_HUB_OFFLINE", "1")  # bench never downloads anything
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    argv = [sys.executable, os.path.join(HERE, script), *extra, "--json", json_path]
    print(f"\n=== {script} {' '.join(extra)}", flush=True)
    start = time.perf_counter()
    rc = subprocess.run(argv, cwd=os.path.dirname(HERE), env=env).returncode
    wall = time.perf_counter() - start
    print(f"=== {script}: exit code {rc} after {wall:.0f} s", flush=True)
    return rc, wall


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="each script's small settings")
    parser.add_argument("--only", help="comma-separated stages or script names (default: all)")
    args = parser.parse_args()
    chosen = list(SCRIPTS)
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        chosen = [s for s in SCRIPTS if {s, s[6:-3], SCRIPTS[s][0]} & wanted]
        if not chosen:
            parser.error(f"--only {args.only}: none of {', '.join(SCRIPTS)}")

    rows, failed, start = [], False, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for script in chosen:
            stage, quick = SCRIPTS[script]
            json_path = os.path.join(tmp, script + ".json")
            rc, wall = run(script, quick if args.quick else [], json_path)
            try:
                with open(json_path) as f:
                    result = json.load(f)
            except (OSError, ValueError):  # died before writing, or wrote half a file
                result = None
            if rc != 0 or result is None:
                failed = True
                rows.append((stage, script, f"failed (exit code {rc}) after {wall:.0f} s"))
                continue
            for figure in result["figures"]:
                rows.append((stage, figure["measure"], figure["figure"]))
                failed |= figure["figure"] == "failed"  # one case of a script that carried on

    mode = "quick settings (smoke test, not for the README)" if args.quick else "full settings"
    print(f"\n## Benchmarks: {mode}, {time.perf_counter() - start:.0f} s in all\n")
    print(f"machine: {machine()}\n")
    print("| stage | measure | figure |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
