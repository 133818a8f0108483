"""Each loss from the student's hidden states: the fused head (logits block by block) against
building the logits [N, VS] first (train.py --no-fused-head), in memory and time.

    python bench/bench_fused_head.py                 # N = 4096, VS = 128,256, VT = 151,936, H 2048
    python bench/bench_fused_head.py --hidden 512    # a cheaper output-layer matmul
    python bench/bench_fused_head.py --quick         # N = 512, H = 256: a smoke test

The student side is hidden [4, N/4, H] and the output layer's weight [VS, H] (fp32); the teacher's
logits are given, as train.py gets them. Each (loss, path) runs in a fresh subprocess: one forward
+ backward measures the peak memory above the inputs (ru_maxrss before and after), reported less
the weight's own gradient [VS, H] that both paths must return; then the two paths' time, best of
--repeats. The goal set for the fused path: extra memory <= 0.3 GB, time <= 1.2x the unfused one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_losses import chunk_ids, max_rss_gb, random_projection  # noqa: E402

import blocked  # noqa: E402
import losses  # noqa: E402
from build_projection import hkl_pairs  # noqa: E402

warnings.filterwarnings("ignore", "Sparse invariant checks")
LOSSES = ["pkl", "gold", "hkl", "uld", "kl", "ce"]


def make(name: str, args):
    """(hidden, weight, loss of a student side: logits or a blocked.Head)."""
    g = torch.Generator().manual_seed(0)
    s_chunk, t_chunk = chunk_ids(4, args.n // 4, g)
    hidden = torch.randn(4, args.n // 4, args.hidden, generator=g).requires_grad_()
    weight = torch.randn(args.vs, args.hidden, generator=g).div_(args.hidden**0.5).requires_grad_()
    vt = args.vs if name == "kl" else args.vt
    t = torch.randn(4, args.n // 4, vt, generator=g).mul_(2)
    if name == "kl":
        return hidden, weight, lambda s: losses.kl_loss(s, t, s_chunk >= 0, vocab_topk=args.k)
    if name == "ce":
        labels = torch.randint(0, args.vs, s_chunk.shape, generator=g)
        return hidden, weight, lambda s: losses.ce_loss(s, labels)
    if name == "uld":
        return hidden, weight, lambda s: losses.uld_loss(s, t, s_chunk, t_chunk, uld_topk=args.k)
    W, exact = random_projection(args.vs, vt, int(0.8 * args.vs), g)
    k = args.k
    if name == "pkl":
        return hidden, weight, lambda s: losses.pkl_loss(s, t, s_chunk, t_chunk, W, vocab_topk=k)
    pairs = hkl_pairs(W, exact) if name == "hkl" else exact
    return hidden, weight, lambda s: losses.gold_loss(s, t, s_chunk, t_chunk, pairs, uld_topk=k)


def child(name: str, fused: bool, args) -> dict:
    hidden, weight, loss_fn = make(name, args)

    def run():
        hidden.grad = weight.grad = None
        s = blocked.Head(hidden, weight) if fused else hidden @ weight.T
        loss_fn(s).backward()

    before = max_rss_gb()
    run()
    extra = max_rss_gb() - before
    weight_grad_gb = weight.numel() * 4 / 2**30
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"extra_gb": extra - weight_grad_gb, "seconds": min(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="positions B*T (B = 4)")
    p.add_argument("--vs", type=int, default=128256)
    p.add_argument("--vt", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=2048, help="the student's hidden size H")
    p.add_argument("--k", type=int, default=8192, help="vocab_topk and uld_topk")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="N = 512, H = 256, one repeat")
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.n, args.hidden, args.repeats = 512, 256, 1
    if args.child:
        print(json.dumps(child(args.child, args.fused, args)))
        return
    print(
        f"N={args.n} VS={args.vs} VT={args.vt} H={args.hidden} K={args.k} fp32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}"
    )
    print(f"{'loss':<8}{'logits GB':>11}{'fused GB':>10}{'logits s':>10}{'fused s':>9}{'x':>7}")
    for name in args.losses.split(","):
        r = {}
        for fused in (False, True):
            argv = [sys.executable, __file__, "--child", name, *(["--fused"] if fused else [])]
            argv += [
                f"--{k}={getattr(args, k)}" for k in ("n", "vs", "vt", "hidden", "k", "repeats")
            ]
            out = subprocess.run(argv, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{name}: {out.stderr.strip().splitlines()[-1]}")
            r[fused] = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{name:<8}{r[False]['extra_gb']:>11.2f}{r[True]['extra_gb']:>10.2f}"
            f"{r[False]['seconds']:>10.2f}{r[True]['seconds']:>9.2f}"
            f"{r[True]['seconds'] / r[False]['seconds']:>7.2f}"
        )


if __name__ == "__main__":
    main()
