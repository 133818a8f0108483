"""Time and memory of each loss in losses.py against the floor no implementation can avoid.

    python bench/bench_losses.py            # N = 4096 positions, VS = 128,256, VT = 151,936, fp32
    python bench/bench_losses.py --quick    # N = 512, one repeat: a smoke test in a minute
    python bench/bench_losses.py --json OUT.json   # also write the headline figures

Floor: log_softmax forward+backward over the student logits + log_softmax forward over the teacher
logits (for kl, a teacher with the student's vocabulary). Each loss runs in a fresh subprocess:
its inputs are made, then one forward+backward measures the peak memory above the inputs (the
process's ru_maxrss before and after; the gradient of s_logits, which any loss must return, is
reported inside that figure and also subtracted), then the floor and the loss are timed alternately
in that same process (best of --repeats), so the ratio compares like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import losses  # noqa: E402
from build_projection import hkl_pairs  # noqa: E402

warnings.filterwarnings("ignore", "Sparse invariant checks")
LOSSES = ["pkl", "pkl_learnable", "gold", "hkl", "uld", "kl", "ce"]
# (student positions, teacher positions) of a chunk and its probability: ~1.2 student per teacher
CHUNK_SHAPES = [
    ((1, 1), 0.70),
    ((2, 1), 0.15),
    ((3, 1), 0.05),
    ((1, 2), 0.04),
    ((2, 2), 0.03),
    ((1, 3), 0.03),
]


def chunk_ids(batch: int, positions: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random alignments: BOS on the student side only, 1% one-sided chunks, teacher padding."""
    shapes = torch.tensor([s for s, _ in CHUNK_SHAPES])
    probs = torch.tensor([p for _, p in CHUNK_SHAPES])
    s_chunk = torch.full((batch, positions), -1)
    t_chunk = torch.full((batch, positions), -1)
    for b in range(batch):
        draws = shapes[torch.multinomial(probs, positions, replacement=True, generator=g)]
        one_sided = torch.rand(positions, generator=g) < 0.01
        draws[one_sided, 1] = 0
        s_ids = torch.repeat_interleave(torch.arange(positions), draws[:, 0])[: positions - 1]
        t_ids = torch.repeat_interleave(torch.arange(positions), draws[:, 1])
        t_ids = t_ids[t_ids <= s_ids[-1]][:positions]
        s_chunk[b, 1:] = s_ids
        t_chunk[b, : len(t_ids)] = t_ids
    return s_chunk, t_chunk


def random_projection(vs: int, vt: int, n_exact: int, g: torch.Generator) -> tuple:
    """A W shaped like Llama -> Qwen: n_exact one-hot rows (one-to-one), the rest 2-4 pieces
    weighted 0.9 * 0.1**i and normalised, 64 empty rows."""
    student = torch.randperm(vs, generator=g)
    exact_s, multi_s = student[:n_exact], student[n_exact : vs - 64]
    exact_t = torch.randperm(vt, generator=g)[:n_exact]
    pieces = 2 + torch.randint(0, 3, (len(multi_s),), generator=g)
    rows = torch.repeat_interleave(multi_s, pieces)
    slot = torch.arange(len(rows)) - torch.repeat_interleave(
        torch.cumsum(pieces, 0) - pieces, pieces
    )
    weight = 0.9 * 0.1 ** slot.double()
    weight = weight / torch.zeros(vs, dtype=torch.double).index_add(0, rows, weight)[rows]
    cols = torch.randint(0, vt, (len(rows),), generator=g)
    indices = torch.stack([torch.cat([exact_s, rows]), torch.cat([exact_t, cols])])
    values = torch.cat([torch.ones(n_exact), weight.float()])
    W = torch.sparse_coo_tensor(indices, values, (vs, vt)).coalesce()
    exact = torch.stack([exact_s, exact_t], 1)
    return W, exact[torch.argsort(exact[:, 0])]


def make_inputs(name: str, args) -> tuple:
    g = torch.Generator().manual_seed(0)
    batch, positions = 4, args.n // 4
    s_chunk, t_chunk = chunk_ids(batch, positions, g)
    vt = args.vs if name == "kl" else args.vt
    s = torch.randn(batch, positions, args.vs, generator=g).mul_(2).requires_grad_()
    t = torch.randn(batch, positions, vt, generator=g).mul_(2)
    if name == "floor":
        return s, t, None
    if name == "kl":
        return s, t, lambda: losses.kl_loss(s, t, s_chunk >= 0, vocab_topk=args.k)
    if name == "ce":
        labels = torch.randint(0, args.vs, s_chunk.shape, generator=g)
        return s, t, lambda: losses.ce_loss(s, labels)
    if name == "uld":
        return s, t, lambda: losses.uld_loss(s, t, s_chunk, t_chunk, uld_topk=args.k)
    W, exact = random_projection(args.vs, vt, int(0.8 * args.vs), g)
    if name == "pkl":
        return s, t, lambda: losses.pkl_loss(s, t, s_chunk, t_chunk, W, vocab_topk=args.k)
    if name == "pkl_learnable":
        proj = losses.LearnableProjection(W)
        return s, t, lambda: losses.pkl_loss(s, t, s_chunk, t_chunk, proj, vocab_topk=args.k)
    pairs = hkl_pairs(W, exact) if name == "hkl" else exact
    return s, t, lambda: losses.gold_loss(s, t, s_chunk, t_chunk, pairs, uld_topk=args.k)


def max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(name: str, args) -> dict:
    s, t, loss_fn = make_inputs(name, args)

    def floor():
        torch.log_softmax(s, -1).sum().backward()
        with torch.no_grad():
            torch.log_softmax(t, -1)

    def loss():
        loss_fn().backward() if loss_fn else floor()

    before = max_rss_gb()
    (floor if name == "floor" else loss)()
    extra = max_rss_gb() - before
    grad_gb = s.grad.numel() * s.grad.element_size() / 2**30
    wall = {"floor": [], "loss": []}
    cpu = {"floor": [], "loss": []}
    for _ in range(args.repeats):
        for key, fn in (("floor", floor), ("loss", loss)):
            s.grad = None
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    best = {key: min(v) for key, v in wall.items()}
    return {
        "loss": name,
        "floor_s": best["floor"],
        "loss_s": best["loss"],
        "ratio": best["loss"] / best["floor"],
        "cpu_ratio": min(cpu["loss"]) / min(cpu["floor"]),
        "extra_peak_gb": extra,
        "extra_peak_minus_grad_gb": extra - grad_gb,
        "grad_gb": grad_gb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--n", type=int, default=4096, help="positions B*T (B = 4)")
    parser.add_argument("--vs", type=int, default=128256)
    parser.add_argument("--vt", type=int, default=151936)
    parser.add_argument("--k", type=int, default=8192, help="vocab_topk and uld_topk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="N = 512, one repeat")
    parser.add_argument("--losses", default="floor," + ",".join(LOSSES))
    parser.add_argument("--json", metavar="PATH", help="also write the headline figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.n, args.repeats = 512, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    print(
        f"N={args.n} VS={args.vs} VT={args.vt} K={args.k} fp32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}"
    )
    print(
        f"{'loss':<14}{'floor s':>9}{'loss s':>9}{'x floor':>9}{'x floor cpu':>13}"
        f"{'extra GB':>10}{'- grad GB':>11}"
    )
    figures = []
    for name in args.losses.split(","):
        argv = [sys.executable, __file__, "--child", name] + [
            f"--{k}={getattr(args, k)}" for k in ("n", "vs", "vt", "k", "repeats", "threads")
        ]
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode:
            print(f"{name:<14}failed: {out.stderr.strip().splitlines()[-1]}")
            figures.append({"measure": f"{name}: time / floor, extra peak", "figure": "failed"})
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{name:<14}{r['floor_s']:>9.2f}{r['loss_s']:>9.2f}{r['ratio']:>9.2f}"
            f"{r['cpu_ratio']:>13.2f}{r['extra_peak_gb']:>10.2f}"
            f"{r['extra_peak_minus_grad_gb']:>11.2f}"
        )
        gb, beyond = r["extra_peak_gb"], r["extra_peak_minus_grad_gb"]
        figure = f"{r['ratio']:.2f}x floor; {gb:.2f} GB extra peak ({beyond:.2f} beyond the grad)"
        measure = "the floor, run against itself" if name == "floor" else f"{name}: time / floor"
        figures.append({"measure": measure + ", extra peak", "figure": figure})
    if args.json:
        setting = f"N={args.n} VS={args.vs} VT={args.vt} K={args.k}, best of {args.repeats}"
        with open(args.json, "w") as f:
            json.dump({"stage": "losses", "setting": setting, "figures": figures}, f, indent=1)


if __name__ == "__main__":
    main()
