"""Benchmark: a train.py step with each loss against a CE-only step (tiny preset, one process).

Each loss trains the tiny preset (random 2-layer models with the real 128k/152k vocabularies) for
--steps steps in this process; a step's time is read from metrics.jsonl (tokens_per_s), the first
two steps are dropped as warm-up, and the median is compared with the CE-only baseline's.

    python bench/bench_train.py [--steps 12] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

# (label, train.py arguments): the same student and data, one teacher or none
RUNS = [
    ("ce only", ["--loss", "ce"]),
    ("pkl", ["--loss", "pkl"]),
    ("pkl, learned W", ["--loss", "pkl", "--learn-projection"]),
    ("hkl", ["--loss", "hkl"]),
    ("gold", ["--loss", "gold"]),
    ("uld", ["--loss", "uld"]),
    ("kl (Llama-tokenizer teacher)", ["--teacher", "pkg:llama-3.2", "--loss", "kl"]),
]


def step_seconds(args: list[str], steps: int, cache: str) -> float:
    """Median seconds per step after two warm-up steps."""
    with tempfile.TemporaryDirectory() as out:
        common = ["--preset", "tiny", "--out-dir", out, "--projection-cache", cache]
        common += ["--num-workers", "1", "--max-steps", str(steps), "--save-every", str(10 * steps)]
        train.main([*common, *args])
        with open(os.path.join(out, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f][2:]
    # tokens_per_s = the step's real student tokens ("tokens") / its seconds
    return statistics.median(r["tokens"] / r["tokens_per_s"] for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="at least 3 (2 are warm-up)")
    parser.add_argument("--json", metavar="PATH", help="also write the headline figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        times = {label: step_seconds(run, args.steps, cache) for label, run in RUNS}
    base = times["ce only"]
    print(
        f"\nmachine: {os.cpu_count()} CPU cores; tiny preset, 1 process, median of "
        f"{args.steps - 2} steps\n"
    )
    print("| loss | s/step | x CE-only step |\n|---|---:|---:|")
    for label, seconds in times.items():
        print(f"| {label} | {seconds:.3f} | {seconds / base:.2f} |")
    if args.json:
        figures = [
            {
                "measure": f"{label}: s/step",
                "figure": f"{seconds:.3f} s ({seconds / base:.2f}x CE-only)",
            }
            for label, seconds in times.items()
        ]
        with open(args.json, "w") as f:
            json.dump({"stage": "train step", "figures": figures}, f, indent=1)


if __name__ == "__main__":
    main()
