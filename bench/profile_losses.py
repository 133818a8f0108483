"""Count what makes a loss slow on a GPU, on a CPU: host-device syncs, blocks and kernel launches.

    python bench/profile_losses.py                    # N = 4096, the real vocabularies, bf16
    python bench/profile_losses.py --like-cuda 141    # blocks as on a GPU with 141 GB (an H200)
    python bench/profile_losses.py --n 512 --vs 16384 --vt 19000   # quicker
    # the blocks of the real shapes at 1/8 of the work: vocabularies, K and block sizes / 8
    python bench/profile_losses.py --vs 16032 --vt 18992 --k 1024 --block-elements 262144

A GPU runs kernels asynchronously: a loss is fast there when the host queues kernels without
waiting. Each call is run once (warm-up), then once under torch modes that count:
- syncs: the calls on device tensors that make the host wait for the GPU: .item() / bool() / int(),
  .cpu() / .tolist(), nonzero, boolean-mask indexing, one-argument where, bincount, unique,
  masked_select, torch.equal, and blocking host-to-device copies (torch.tensor(..., device=...),
  .to(device) without non_blocking, x[index tensor] = python scalar: they wait for the stream
  too; the last one was found by torch.cuda.set_sync_debug_mode on an H200). Host tensors (made
  by .cpu(), or by factories with no device=) are followed through the ops and not counted.
  The modes do not see inside a custom autograd Function's backward: blocked.py's backward reads
  grad_out once (bool(grad_out != 1)), one more sync per call than printed, before and after;
- ops: every aten op run, forward and backward: about one kernel launch each on a GPU;
- blocks: the calls of the loss's per-block function (one autograd.grad each).
On CPU the same code runs, so the counts are those a GPU run would make (--like-cuda picks the
block size that blocked.py would pick on a CUDA device with that many GB).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)  # bench_losses, when this file is loaded from elsewhere (the tests)
from bench_losses import chunk_ids, random_projection  # noqa: E402
from sync_counter import OpCounter, SyncCounter  # noqa: E402

import blocked  # noqa: E402
import losses  # noqa: E402
from build_projection import hkl_pairs  # noqa: E402

warnings.filterwarnings("ignore", "Sparse invariant checks")
LOSSES = ["pkl", "pkl_learnable", "gold", "hkl", "uld", "kl", "ce"]


def loss_fn(name: str, args, g: torch.Generator):
    s_chunk, t_chunk = chunk_ids(4, args.n // 4, g)
    vt = args.vs if name == "kl" else args.vt
    s = torch.randn(4, args.n // 4, args.vs, generator=g).to(torch.bfloat16).requires_grad_()
    t = torch.randn(4, args.n // 4, vt, generator=g).to(torch.bfloat16)
    if name == "kl":
        return s, lambda: losses.kl_loss(s, t, s_chunk >= 0, vocab_topk=args.k)
    if name == "ce":
        labels = torch.randint(0, args.vs, s_chunk.shape, generator=g)
        return s, lambda: losses.ce_loss(s, labels)
    if name == "uld":
        return s, lambda: losses.uld_loss(s, t, s_chunk, t_chunk, uld_topk=args.k)
    W, exact = random_projection(args.vs, vt, int(0.8 * args.vs), g)
    if name == "pkl":
        return s, lambda: losses.pkl_loss(s, t, s_chunk, t_chunk, W, vocab_topk=args.k)
    if name == "pkl_learnable":
        proj = losses.LearnableProjection(W)
        return s, lambda: losses.pkl_loss(s, t, s_chunk, t_chunk, proj, vocab_topk=args.k)
    pairs = hkl_pairs(W, exact) if name == "hkl" else exact
    return s, lambda: losses.gold_loss(s, t, s_chunk, t_chunk, pairs, uld_topk=args.k)


def count_blocks(fn) -> tuple[int, object]:
    """Run fn, counting the calls of the per-block function (the `terms` that the losses hand to
    blocked.block_sum, called once per block)."""
    calls = [0]
    inner = blocked.block_sum

    def counting(terms, *rest, **kw):
        def wrapped(*a, **k):
            calls[0] += 1
            return terms(*a, **k)

        return inner(wrapped, *rest, **kw)

    blocked.block_sum = counting  # the losses call it through the module: they get this one
    try:
        out = fn()
    finally:
        blocked.block_sum = inner
    return calls[0], out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--vs", type=int, default=128256)
    p.add_argument("--vt", type=int, default=151936)
    p.add_argument("--k", type=int, default=8192)
    p.add_argument("--like-cuda", type=float, metavar="GB", help="block size of a GPU this big")
    p.add_argument("--block-elements", type=int, help="blocked.BLOCK_ELEMENTS (CPU's block size)")
    p.add_argument("--losses", default=",".join(LOSSES))
    args = p.parse_args()
    if args.block_elements:
        blocked.BLOCK_ELEMENTS = args.block_elements
    if args.like_cuda:
        elements = blocked.cuda_block_elements(int(args.like_cuda * 2**30))
        blocked.block_elements = lambda device: elements
    print(f"N={args.n} VS={args.vs} VT={args.vt} K={args.k} bf16; per call, forward + backward")
    print(f"{'loss':<14}{'blocks':>7}{'syncs':>7}{'aten ops':>9}  syncs by kind")
    for name in args.losses.split(","):
        s, fn = loss_fn(name, args, torch.Generator().manual_seed(0))
        fn().backward()  # warm-up: first-call work (coalesce flags, caches) is not counted
        s.grad = None
        syncs, ops = SyncCounter(), OpCounter()
        with syncs, ops:
            blocks, loss = count_blocks(fn)
            loss.backward()
        kinds = ", ".join(f"{k} {v}" for k, v in syncs.syncs.most_common())
        print(f"{name:<14}{blocks:>7}{sum(syncs.syncs.values()):>7}{ops.ops:>9}  {kinds}")
        del s, fn, loss


if __name__ == "__main__":
    main()
