"""GPU benchmark: each loss at N=4096 in bf16, and train.py's throughput at the paper's shapes.

    python bench/bench_gpu.py                       # on a GPU machine (one GPU is enough)
    python bench/bench_gpu.py --smoke               # CPU plumbing check: tiny preset, small N

1. Losses: bf16 logits of the real vocabulary sizes (128,256 / 151,936), N = 4096 positions, each
   loss forward+backward against the floor (log_softmax forward+backward of the student logits and
   forward of the teacher's), CUDA-event timed, best of --repeats; extra peak memory above the
   inputs from torch.cuda.max_memory_allocated (it includes the logits' gradient, reported apart).
2. Training: train.py --preset shapes-1b-4b (random weights, Llama-3.2-1B student and Qwen3-4B
   teacher shapes, sequence length 2,048, 6 sequences per GPU per step as in the public reference
   run) for each loss; median student tokens/s after two warm-up steps, and peak GPU memory.
   The public reference reports about 3k tokens/s per GPU for P-KL at these shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from bench_losses import chunk_ids, random_projection  # noqa: E402

import losses  # noqa: E402
from build_projection import hkl_pairs  # noqa: E402
from data import make_tiny_corpus  # noqa: E402

LOSSES = ["pkl", "pkl_learnable", "gold", "hkl", "uld", "kl", "ce"]
TRAIN_LOSSES = ["ce", "pkl", "gold", "hkl"]


def loss_inputs(name: str, n: int, vs: int, vt: int, k: int, device, dtype) -> tuple:
    """bf16 logits on the device and a closure that runs the loss (None: the floor)."""
    g = torch.Generator().manual_seed(0)
    s_chunk, t_chunk = chunk_ids(4, n // 4, g)
    vt = vs if name == "kl" else vt
    s = torch.randn(4, n // 4, vs, generator=g).mul_(2).to(device, dtype).requires_grad_()
    t = torch.randn(4, n // 4, vt, generator=g).mul_(2).to(device, dtype)
    s_chunk, t_chunk = s_chunk.to(device), t_chunk.to(device)
    if name == "floor":
        return s, t, None
    if name == "kl":
        return s, t, lambda: losses.kl_loss(s, t, s_chunk >= 0, vocab_topk=k)
    if name == "ce":
        labels = torch.randint(0, vs, s_chunk.shape, generator=g).to(device)
        return s, t, lambda: losses.ce_loss(s, labels)
    if name == "uld":
        return s, t, lambda: losses.uld_loss(s, t, s_chunk, t_chunk, uld_topk=k)
    W, exact = random_projection(vs, vt, int(0.8 * vs), g)
    W, exact = W.to(device), exact.to(device)
    if name == "pkl":
        return s, t, lambda: losses.pkl_loss(s, t, s_chunk, t_chunk, W, vocab_topk=k)
    if name == "pkl_learnable":
        proj = losses.LearnableProjection(W).to(device)
        return s, t, lambda: losses.pkl_loss(s, t, s_chunk, t_chunk, proj, vocab_topk=k)
    pairs = hkl_pairs(W, exact) if name == "hkl" else exact
    return s, t, lambda: losses.gold_loss(s, t, s_chunk, t_chunk, pairs, uld_topk=k)


def time_losses(args) -> list[dict]:
    device, dtype = torch.device(args.device), torch.bfloat16
    cuda = device.type == "cuda"
    rows = []
    for name in LOSSES:
        try:
            s, t, fn = loss_inputs(name, args.n, args.vs, args.vt, args.k, device, dtype)

            def floor(s=s, t=t):
                torch.log_softmax(s.float(), -1).sum().backward()
                with torch.no_grad():
                    torch.log_softmax(t.float(), -1)

            def loss(fn=fn):
                fn().backward()

            def timed(f, s=s) -> float:
                s.grad = None
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                f()
                if cuda:
                    torch.cuda.synchronize()
                return time.perf_counter() - start

            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            loss()  # first call: warm-up and the memory reading
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
            grad_gb = s.numel() * s.element_size() / 2**30
            floor_s = min(timed(floor) for _ in range(args.repeats))
            loss_s = min(timed(loss) for _ in range(args.repeats))
            rows.append(
                {
                    "loss": name,
                    "floor_s": floor_s,
                    "loss_s": loss_s,
                    "ratio": loss_s / floor_s,
                    "extra_peak_gb": peak,
                    "grad_gb": grad_gb,
                }
            )
            del s, t, fn
        except (RuntimeError, ValueError) as e:  # out of memory, a CUDA error: report, go on
            traceback.print_exc()  # the whole trace: a bug must not pass for a device limit
            rows.append({"loss": name, "error": f"{type(e).__name__}: {e}"[:300]})
        if cuda:
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    return rows


def long_doc_corpus(path: str) -> str:
    """Documents of several thousand tokens, so that 2,048-token windows are full."""
    src = make_tiny_corpus(os.path.join(path, "src"), n_docs=3000, seed=1)
    texts = []
    with open(os.path.join(src, "part-000.jsonl"), "rb") as f:
        for line in f:
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                continue
            if text.strip():
                texts.append(text)
    out = os.path.join(path, "long")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "part-000.jsonl"), "w", encoding="utf-8") as f:
        for i in range(0, len(texts), 60):
            f.write(json.dumps({"text": "\n\n".join(texts[i : i + 60])}, ensure_ascii=False) + "\n")
    return out


def time_training(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus, cache = long_doc_corpus(tmp), os.path.join(tmp, "cache")
        for loss in TRAIN_LOSSES:
            out = os.path.join(tmp, f"run-{loss}")
            cmd = [
                sys.executable,
                os.path.join(ROOT, "train.py"),
                "--preset",
                args.preset,
                "--loss",
                loss,
                "--max-steps",
                str(args.steps),
                "--data",
                corpus,
                "--out-dir",
                out,
                "--projection-cache",
                cache,
                "--save-every",
                "0",
            ]
            if args.preset == "tiny":
                cmd += ["--num-workers", "1"]
            started = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if done.returncode:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                rows.append({"loss": loss, "error": " | ".join(tail)[:500]})
            else:
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    records = [json.loads(line) for line in f]
                timed = records[2:] or records
                rows.append(
                    {
                        "loss": loss,
                        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
                        "peak_mem_gb": max(r.get("peak_mem_gb", float("nan")) for r in records),
                        "steps": len(records),
                        "wall_s": wall,
                    }
                )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU: tiny preset, N=256, small vocab")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--vs", type=int, default=128256)
    p.add_argument("--vt", type=int, default=151936)
    p.add_argument("--k", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--preset", default="shapes-1b-4b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip", choices=["losses", "train"], help="run only the other part")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    if args.smoke:
        args.n, args.vs, args.vt, args.k, args.repeats = 256, 4096, 5120, 512, 1
        args.preset, args.steps = "tiny", 4
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"GPU: {gpu}; torch {torch.__version__}", flush=True)
    result = {"gpu": gpu, "torch": torch.__version__}
    if args.skip != "losses":
        result["losses"] = time_losses(args)
    if args.skip != "train":
        result["train"] = time_training(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print_table(
        f"{gpu}: losses at N={args.n}, bf16, best of {args.repeats}",
        ["loss", "floor ms", "loss ms", "x floor", "extra peak GB (logits grad)"],
        result.get("losses", []),
        lambda r: [
            f"{1e3 * r['floor_s']:.1f}",
            f"{1e3 * r['loss_s']:.1f}",
            f"{r['ratio']:.2f}",
            f"{r['extra_peak_gb']:.2f} ({r['grad_gb']:.2f})",
        ],
    )
    print_table(
        f"{gpu}: train.py --preset {args.preset}, median tokens/s of steps 3-{args.steps}",
        ["loss", "student tokens/s per GPU", "x reference 3k", "peak GB"],
        result.get("train", []),
        lambda r: [
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s'] / 3000:.2f}",
            f"{r['peak_mem_gb']:.1f}",
        ],
    )


def print_table(title: str, header: list[str], rows: list[dict], cells) -> None:
    """A markdown table: the loss, then cells(row), or the error where a row failed."""
    print(f"\n{title}\n| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for r in rows:
        rest = [f"failed: {r['error']}"] + [""] * (len(header) - 2) if "error" in r else cells(r)
        print("| " + " | ".join([r["loss"], *rest]) + " |")


if __name__ == "__main__":
    main()
