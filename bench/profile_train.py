"""Host-device syncs per training step of train.py, counted on a CPU as a GPU would make them.

    python bench/profile_train.py                      # this checkout, P-KL and two teachers
    python bench/profile_train.py --repo OTHER_CHECKOUT  # the same count for another version

A GPU step is fast when the host queues kernels without waiting for them; every read of a device
value (.item(), bool(), .tolist(), a blocking copy, ...; bench/profile_losses.py lists them) makes
it wait. train.main runs in this process on the tiny preset (in-process, no DataLoader workers)
under sync_counter.SyncCounter, once for 2 steps and once for 6: the difference / 4 is what one
step costs, start-up and the last step's checkpoint left out. Everything the step runs is counted:
the student's and teachers' forward (transformers' own checks included), the losses, backward,
the optimizer (fused, as on a GPU), logging.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CASES = {
    "ce": ["--loss", "ce"],
    "pkl": ["--teacher", "pkg:qwen3", "--loss", "pkl"],
    "two-teachers": [
        *("--teacher", "pkg:o200k", "--loss", "hkl", "--teacher-weight", "0.8"),
        *("--teacher", "pkg:llama-3.2", "--loss", "kl", "--teacher-weight", "0.2"),
    ],
}


class FusedAdamW(torch.optim.AdamW):
    """AdamW as train.py makes it on a GPU (fused: no sync); on a CPU it would read each
    parameter's step count (an .item() per parameter), which a GPU run does not."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "fused": True})


def count(train, argv: list[str]) -> collections.Counter:
    from sync_counter import SyncCounter

    counter = SyncCounter()
    real, torch.optim.AdamW = torch.optim.AdamW, FusedAdamW
    try:
        with counter:
            train.main(argv)
    finally:
        torch.optim.AdamW = real
    return counter.syncs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=os.path.dirname(HERE), help="the checkout whose train.py runs")
    p.add_argument("--grad-accum", type=int, default=2)
    args = p.parse_args()
    sys.path.insert(0, os.path.abspath(args.repo))  # its modules; sync_counter.py from here
    os.chdir(args.repo)
    train = importlib.import_module("train")
    cache = tempfile.mkdtemp(prefix="w_cache_")
    print(f"syncs per step ({args.repo}, tiny preset, --grad-accum {args.grad_accum}):")
    for name, extra in CASES.items():
        runs = {}
        for steps in (2, 6):
            out = tempfile.mkdtemp(prefix="profile_train_")
            argv = [
                *("--preset", "tiny", "--out-dir", out, "--projection-cache", cache),
                *("--num-workers", "0", "--max-steps", str(steps), "--save-every", "0"),
                *("--log-every", "1", "--grad-accum", str(args.grad_accum), *extra),
            ]
            runs[steps] = count(train, argv)
        per_step = {k: (runs[6][k] - runs[2][k]) / 4 for k in runs[6] | runs[2]}
        per_step = {k: v for k, v in sorted(per_step.items(), key=lambda kv: -kv[1]) if v}
        total = sum(per_step.values())
        detail = ", ".join(f"{k} {v:g}" for k, v in per_step.items())
        print(f"  {name}: {total:g} per step ({detail})")


if __name__ == "__main__":
    main()
