"""Benchmark: does writing the cache slow the teacher down? cache_teacher.py's pass against the
teacher's bare forward, at a teacher size where the forward is the work.

A random Qwen3-architecture teacher (the real Qwen3 tokenizer, 151,669 ids) of a flags.SHAPES
entry's dimensions (default `llama-3.2-1b`: hidden 2,048, 16 layers, ~1.6B parameters with
Qwen3's vocabulary; float32 on the CPU), over the first --tokens teacher tokens of real documents
(Debian's git-doc, bench_packing.build_corpus) in teacher windows of --window tokens:
  - bare: the teacher's forward on the packed windows (`model(...)`, what the pass calls);
  - pass: `cache_teacher.Writer.forward` on the same windows: the forward, then the top-K records
    (topk, one exp over the vocabulary, packing) written into the shard's arrays.
Alternating, --repeat times each; the best of each. What the records cost per token does not
depend on the teacher's size; the forward's does (~2 x parameters FLOPs per token), so the ratio
at a real 4B teacher is higher still than here.

    python bench/bench_cache_pass.py [--shape llama-3.2-1b] [--tokens 512] [--topk 64]

Runtime on the 2-core CPU machine: ~5 minutes (mostly the model's random initialisation and
2 x 2 forwards of 512 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)
from bench_packing import build_corpus  # noqa: E402

import cache_teacher  # noqa: E402
from flags import tiny_model  # noqa: E402
from tokens import load_tokenizer  # noqa: E402
from train import trim_output_vocabulary  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.2-1b", help="a flags.SHAPES entry")
    p.add_argument("--tokens", type=int, default=512, help="teacher tokens per forward")
    p.add_argument("--window", type=int, default=256, help="teacher tokens per window")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    torch.manual_seed(0)
    tok = load_tokenizer("pkg:qwen3")
    with tempfile.TemporaryDirectory() as work:
        with open(build_corpus(work), encoding="utf-8") as f:
            text = "".join(json.loads(line)["text"] for line in f)
    ids = np.asarray(tok(text[: 20 * args.tokens], add_special_tokens=False)["input_ids"])
    ids = ids[: args.tokens]
    started = time.perf_counter()
    model = tiny_model("qwen3", len(tok), args.window, args.shape).eval().requires_grad_(False)
    trim_output_vocabulary(model, len(tok))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"teacher {args.shape} dims, {n_params / 1e9:.2f}B parameters, made in "
          f"{time.perf_counter() - started:.0f} s; {len(ids)} real teacher tokens")  # fmt: skip
    window = args.window
    records = np.zeros(len(ids), cache_teacher.record_dtype(args.topk, "packed", len(tok)))
    records["token"] = ids
    rows = [(records, a, min(a + window, len(ids))) for a in range(0, len(ids), window)]
    manifest = {"dtype": "packed", "vocab": len(tok)}
    writer = cache_teacher.Writer(
        SimpleNamespace(topk=args.topk, teacher_window=window),
        manifest,
        tok,
        model,
        SimpleNamespace(device=torch.device("cpu"), cuda=False, master=False),
    )
    writer.started = time.perf_counter()
    seq = torch.as_tensor(ids)[None]
    pos = torch.as_tensor(np.concatenate([np.arange(b - a) for _, a, b in rows]))[None]
    bare, full = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        with torch.no_grad():
            model(input_ids=seq, position_ids=pos, use_cache=False)
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        writer.forward(rows)
        full.append(time.perf_counter() - t)
    figures = {
        "shape": args.shape,
        "parameters": n_params,
        "tokens": len(ids),
        "topk": args.topk,
        "bare_s": [round(x, 2) for x in bare],
        "pass_s": [round(x, 2) for x in full],
        "bare_tokens_per_s": round(len(ids) / min(bare), 1),
        "pass_tokens_per_s": round(len(ids) / min(full), 1),
        "ratio": round(min(bare) / min(full), 3),
        "records_ms_per_token": round((min(full) - min(bare)) / len(ids) * 1e3, 2),
        "load_average": round(os.getloadavg()[0], 2),
    }
    print(
        "| teacher | tokens | bare forward tokens/s | pass tokens/s | ratio | records, ms/token |\n"
        "|---|---|---|---|---|---|\n"
        f"| {args.shape} dims, {n_params / 1e9:.2f}B | {len(ids)} | "
        f"{figures['bare_tokens_per_s']} | {figures['pass_tokens_per_s']} | "
        f"{figures['ratio']} | {figures['records_ms_per_token']} |"
    )
    print(
        f"(bare {figures['bare_s']} s, pass {figures['pass_s']} s; load {figures['load_average']})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
