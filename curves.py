"""The training curves of a run directory: metrics.jsonl -> one PNG (train.py draws it at the end of
a run; this draws it for any run, finished or not).

    python curves.py out/pkl-qwen                 # -> out/pkl-qwen/curves.png
    python curves.py out/pkl-qwen --out pkl.png

Six panels against the step: the loss with CE and KD (METHOD.md 5.5), each teacher's KD term,
the applied KD/CE scale (log axis: dynamic scaling moves it by orders of magnitude), the share of
chunks valid on both sides, the learning rate, and student tokens/s. Skipped steps are marked.
"""

from __future__ import annotations

import json
import math
import os
import sys

from cli import ArgumentParser, atomic_write, check_output_file, one_line_errors


def read_metrics(run_dir: str) -> list[dict]:
    """The records of run_dir/metrics.jsonl: JSON objects with an integer step; any other line (a
    half-written last line of a killed run, a damaged one) is left out, with a warning."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: pass a train.py --out-dir that has logged a step")
    records, bad = [], []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:  # not JSON, not UTF-8
                record = None
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                records.append(record)
            elif line.strip():
                bad.append(n)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + " ..." * (len(bad) > 5)
        print(f"warning: {path}: {len(bad)} line(s) not a step's record, left out: {shown}",
              file=sys.stderr)  # fmt: skip
    if not records:
        raise ValueError(f"{path} holds no step yet: plot it once the run has logged one")
    return records


def number(record: dict, key: str) -> float | None:
    """record[key] if it is a finite number (not a bool), else None."""
    value = record.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a metric, leaving out the steps that lack it or whose value is not finite
    (a skipped step's loss is NaN)."""
    pairs = [(r["step"], number(r, key)) for r in records]
    pairs = [(s, v) for s, v in pairs if v is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def panels(records: list[dict]) -> list[tuple[str, dict[str, tuple[list, list]], bool]]:
    """What each panel shows: (title, {label: (steps, values)}, log y axis)."""
    teachers = [k for k in dict.fromkeys(k for r in records for k in r) if k.startswith("kd/")]
    return [
        ("objective", {k: series(records, k) for k in ("loss", "ce", "kd")}, False),
        ("KD per teacher", {k[3:]: series(records, k) for k in teachers}, False),
        ("applied KD/CE scale", {"kd_scale": series(records, "kd_scale")}, True),
        ("valid chunk share", {"valid_chunks": series(records, "valid_chunks")}, False),
        ("learning rate", {"lr": series(records, "lr")}, False),
        ("student tokens/s", {"tokens_per_s": series(records, "tokens_per_s")}, False),
    ]


def plot_curves(run_dir: str, out: str | None = None) -> str:
    """Draw run_dir's curves into `out` (default run_dir/curves.png), atomically; returns it."""
    import matplotlib  # optional: only pictures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = out or os.path.join(run_dir, "curves.png")
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), constrained_layout=True)
    pairs = zip([{}, *records], records)  # a logged step whose skipped count grew
    skipped = [
        r["step"]
        for prev, r in pairs
        if (number(r, "skipped") or 0) > (number(prev, "skipped") or 0)
    ]
    for ax, (title, lines, log) in zip(axes.flat, panels(records)):
        for label, (steps, values) in lines.items():
            if steps:
                ax.plot(steps, values, label=label, marker="." if len(steps) < 50 else None)
        for step in skipped:
            ax.axvline(step, color="red", alpha=0.3, linewidth=1)
        values = [v for _, vs in lines.values() for v in vs]
        if log and values and min(values) > 0 and max(values) > 20 * min(values):
            ax.set_yscale("log")  # a scale that moves by orders of magnitude
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if any(steps for steps, _ in lines.values()):
            ax.legend(fontsize="small")
    name = os.path.basename(os.path.abspath(run_dir))
    note = f", {len(skipped)} skipped steps (red)" if skipped else ""
    fig.suptitle(f"{name}: {len(records)} logged steps, last {records[-1]['step']}{note}")
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="curves.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a train.py --out-dir")
    parser.add_argument("--out", help="the PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)

    def run() -> int:
        if args.out is not None:
            check_output_file(args.out, "--out", "curves.png")
        try:
            print(plot_curves(args.run_dir, args.out))
        except ImportError:
            raise ValueError("curves need matplotlib: pip install matplotlib") from None
        return 0

    return one_line_errors(run)


if __name__ == "__main__":
    sys.exit(main())
