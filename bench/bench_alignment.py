"""Cost of align.align_text over just tokenizing the same text with both tokenizers, on one core.

    python bench/bench_alignment.py              # Llama-3.2 student, Qwen3 teacher
    python bench/bench_alignment.py --repeats 3  # quicker
    python bench/bench_alignment.py --json OUT.json   # also write the headline figures

Baseline: `student_tok(text)` + `teacher_tok(text)`, the two calls no aligner can avoid. align_text
does those two encodings itself, through the Rust backend (`backend_tokenizer.encode`, which skips
some of transformers' Python work), then the byte spans and chunks: the last column is the cost
over those two backend calls alone. Texts: prose (this repo's LICENSE), code (tokens.py),
number-heavy text with CJK and emoji (generated, deterministic), and prose with accents written as
combining marks (NFD), which sends Qwen3's side through the slower offsets path (its NFC normalizer
changes the text); tokens.py holds special-token strings, which are read as text (fast path).
Each figure is the best of --repeats, the two timings alternate; tokens/s counts student tokens.
The per-tokenizer byte table is built once before timing (~0.6 s per tokenizer).
"""

from __future__ import annotations

import os

# one core: the Rust tokenizers and torch must not start thread pools
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import unicodedata  # noqa: E402

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from align import align_text  # noqa: E402
from tokens import load_tokenizer  # noqa: E402


def number_text(n_lines: int = 300, seed: int = 0) -> str:
    """Tables of figures, dates and prices, with CJK words and emoji between them."""
    rng = random.Random(seed)
    words = ["价格", "数量", "合計", "東京", "서울", "total", "item", "rate"]
    words += ["\U0001f600", "\U0001f680", "\U0001f469\u200d\U0001f4bb", "\U0001f1ef\U0001f1f5"]
    lines = []
    for i in range(n_lines):
        cells = [
            f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            f"{rng.choice(words)} {rng.randint(0, 10 ** rng.randint(1, 9))}",
            f"${rng.uniform(0, 1e5):,.2f}",
            f"{rng.uniform(-100, 100):.3f}%",
            f"{rng.randint(0, 999)}/{rng.randint(1, 999)}",
        ]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def tokenize_both(student, teacher, text: str) -> None:
    student(text), teacher(text)


def encode_both(student, teacher, text: str) -> None:  # what align_text itself calls
    student.backend_tokenizer.encode(text), teacher.backend_tokenizer.encode(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="pkg:llama-3.2")
    parser.add_argument("--teacher", default="pkg:qwen3")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", metavar="PATH", help="also write the headline figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    student, teacher = load_tokenizer(args.student), load_tokenizer(args.teacher)
    prose = open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    accented = (prose + " café naïve résumé Ångström Zürich São Paulo ") * 2
    code = open(os.path.join(ROOT, "tokens.py"), encoding="utf-8").read()
    texts = {
        "prose (LICENSE)": prose,
        "numbers + CJK + emoji": number_text(),
        "code (tokens.py, with special-token strings as text)": code,
        "prose, combining accents (NFC: offsets path)": unicodedata.normalize("NFD", accented),
    }
    align_text(student, teacher, "warm up: builds both byte tables once")

    print(f"student {args.student}, teacher {args.teacher}, 1 core, best of {args.repeats}\n")
    print(
        "| text | student tokens | tok(text) both: tok/s | align_text: tok/s | overhead "
        "| over backend encode |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    figures = []
    for name, text in texts.items():
        n_tokens = len(student(text)["input_ids"])
        times = {fn: [] for fn in (tokenize_both, encode_both, align_text)}
        for _ in range(args.repeats):  # alternate, so that all see the same machine load
            for fn, spent in times.items():
                spent.append(seconds(fn, student, teacher, text))
        t_tok, t_encode, t_align = (min(spent) for spent in times.values())
        print(
            f"| {name} | {n_tokens:,} | {n_tokens / t_tok:,.0f} | {n_tokens / t_align:,.0f} | "
            f"{100 * (t_align / t_tok - 1):+.0f}% | {100 * (t_align / t_encode - 1):+.0f}% |"
        )
        overhead = f"{100 * (t_align / t_tok - 1):+.0f}% ({n_tokens / t_align:,.0f} tok/s)"
        figures.append({"measure": f"align_text overhead, {name}", "figure": overhead})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"stage": "alignment", "figures": figures}, f, indent=1)


if __name__ == "__main__":
    main()
