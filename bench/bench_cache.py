"""Benchmark: the teacher cache (cache_teacher.py, train.py --teacher-cache) against the teacher run
online, and the teacher's own context (--teacher-window) against the student's packed window.

Corpus: the AsciiDoc sources of Debian's git-doc package (bench_packing.build_corpus), the first
--docs (48) documents in path order (docs.jsonl). Models: the tiny preset (random 2-layer models,
the real Llama-3.2 student and Qwen3 teacher tokenizers), float32, on the CPU. Five parts:

1. What top-K costs the method. Caches of the teacher over the corpus's short documents (those under
   --short-chars, 2,500 characters; a K = 0 cache keeps 607 KB per token, so part 1 caches few
   tokens) at K = 32, 64, 256, 1024 (--dtype packed), K = 64 in float16 and float32, and K = 0 (the
   exact logits: a sanity row, ~0). On --kd-batches batches of 2 x 128 student tokens, each made
   twice (the online teacher's ids; the cached records), per loss (pkl, hkl, gold, uld; train.py's
   defaults): the KD term and its gradient with respect to the student's logits, cached against
   online: |relative change| of the term, relative L2 norm of the gradient's change, cosine of the
   two gradients; means over the batches. Also the teacher's mass in its top K (a random teacher's
   distributions are nearly flat, entropy 11.92 nats of log |V| = 11.93: its top-64 holds 0.07%
   of the mass, its top-1024 1%, where a trained teacher's top-64 holds most of it; part 1's
   errors are those of a flat teacher, which a trained one need not share), and the distinct ids
   among the batch's top-K (P-KL's subset is the 8,192 ids of largest logit: below 8,192 distinct
   ids, the rest of the subset is picked among the tied "rest" ids).
2. Bytes per teacher token: the record (cache_teacher.record_dtype) and the cache directory on disk
   (records, .npy headers and the JSON indexes), and the disk for 10^9 teacher tokens.
3. Cache pass speed: a K = 64 pass (cache_teacher.Writer, in this process) over the documents that
   part 4 reads, its teacher calls timed inside the pass; then the same calls (the same packed
   rows) replayed bare (only `model(...)`). Ratio: the pass's teacher tokens/s over the bare
   forward's (goal >= 0.9).
4. Train step speed: train.py (a subprocess), --steps steps of 2 x --seq-len 256 tokens,
   --no-shuffle, three ways: CE only (--loss ce, no teacher: the same student and windows), P-KL
   with the teacher online, P-KL from part 3's cache. Median tokens_per_s over the steps after
   the first 5.
5. The teacher-context rule: online P-KL runs with --teacher-window 0 (the old rule: the teacher
   reads the student's packed window) and the default (the tiny preset's 128: each document alone,
   in windows of 128 teacher tokens), same seed: loss, CE and KD at the end; teacher tokens and
   forward positions (padding included) per step, and KD chunks per step, from the same windows
   rebuilt here; the same counts at --seq-len 2048 with --teacher-window 0, 1024, 2048 (train.py's
   default) and 4096, over the whole corpus, from the data alone.
Cache passes use cache_teacher.py's defaults (--batch-tokens 4096).

    python bench/bench_cache.py [--json bench/results/cache.json] [--steps 20] [--kd-batches 4]
    python bench/bench_cache.py --quick    # a smoke test: small settings, figures for nothing

Runtime on the 2-core CPU machine, shared (load average 3 to 6): 39 minutes with the defaults
(part 1's 4 batches ~12 min: 32 losses and gradients each; the four train runs ~18 min, ~15 s per
P-KL step); --quick 19 minutes. Speeds are single runs, with the load average beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]
from bench_packing import build_corpus  # noqa: E402

import cache_teacher  # noqa: E402
import flags  # noqa: E402
import train  # noqa: E402
from data import AlignedWindows, collate  # noqa: E402
from tokens import load_tokenizer  # noqa: E402

STUDENT, TEACHER = "pkg:llama-3.2", "pkg:qwen3"
CONFIGS = [
    (0, "float32"),
    (32, "packed"),
    (64, "packed"),
    (256, "packed"),
    (1024, "packed"),
    (64, "float16"),
    (64, "float32"),
]
LOSSES = ("pkl", "hkl", "gold", "uld")
BATCH, KD_SEQ_LEN = 2, 128
CPU = torch.device("cpu")
PASS_LINE = re.compile(r"cached ([\d,]+) teacher tokens \(([\d,]+)/s\)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=48, help="the first N git-doc documents")
    p.add_argument("--short-chars", type=int, default=2500, help="part 1: documents under this")
    p.add_argument("--kd-batches", type=int, default=4, help="part 1: batches of 2 x 128 tokens")
    p.add_argument("--steps", type=int, default=20, help="parts 4, 5: train steps per run")
    p.add_argument("--seq-len", type=int, default=256, help="parts 4, 5: student tokens a window")
    p.add_argument("--json", default=os.path.join(BENCH, "results", "cache.json"), help="or -")
    p.add_argument("--work", help="keep the caches and runs here (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="small settings: a smoke test")
    args = p.parse_args()
    if args.quick:
        args.docs, args.short_chars, args.kd_batches, args.steps = 12, 1500, 2, 7
    work = args.work or tempfile.mkdtemp(prefix="bench_cache_")
    os.makedirs(work, exist_ok=True)
    started = time.perf_counter()
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "work")},
    }
    try:
        corpus, short = make_corpus(work, args.docs, args.short_chars)
        results["corpus"] = describe_corpus(corpus, short)
        results["topk"] = part_topk(work, short, args.kd_batches)
        results["bytes"] = part_bytes(results["topk"]["caches"])
        train_docs, steps_data = part_data(corpus, args.steps, args.seq_len)
        results["cache_pass"], cache_dir = part_cache_pass(work, corpus, train_docs)
        runs = part_train(work, corpus, cache_dir, args.steps, args.seq_len)
        results["train"] = runs
        results["context_rule"] = part_context(runs, steps_data, corpus)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    results["wall_s"] = round(time.perf_counter() - started)
    print(f"\nwall time: {results['wall_s']} s")
    if args.json == "-":
        print(json.dumps(results, indent=1))
    elif args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")


# ----------------------------------------------------------------------------- corpus


def make_corpus(work: str, n_docs: int, short_chars: int) -> tuple[str, str]:
    """docs.jsonl: the first n_docs documents; short.jsonl: those of them under short_chars."""
    with open(build_corpus(work), encoding="utf-8") as f:
        lines = f.readlines()[:n_docs]
    corpus, short = os.path.join(work, "docs.jsonl"), os.path.join(work, "short.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        f.writelines(lines)
    with open(short, "w", encoding="utf-8") as f:
        f.writelines(x for x in lines if len(json.loads(x)["text"]) < short_chars)
    return corpus, short


def describe_corpus(corpus: str, short: str) -> dict:
    out = {}
    qwen = tokenizers()[1]
    for name, path in (("corpus", corpus), ("short", short)):
        with open(path, encoding="utf-8") as f:
            texts = [json.loads(x)["text"] for x in f]
        out[name] = {
            "documents": len(texts),
            "characters": sum(map(len, texts)),
            "teacher_tokens": sum(
                len(qwen(t, add_special_tokens=False)["input_ids"]) for t in texts
            ),
        }
    print(f"\ncorpus: {out['corpus']}; part 1 (short documents): {out['short']}")
    return out


_TOKS: list = []


def tokenizers():
    """(student, teacher) tokenizers, loaded once."""
    if not _TOKS:
        _TOKS.extend(load_tokenizer(name) for name in (STUDENT, TEACHER))
    return _TOKS


def windows(data: str, seq_len: int, teacher_window: int, *, repeat=False) -> AlignedWindows:
    """train.py's dataset for one teacher, documents in file order (--no-shuffle)."""
    student_tok, teacher_tok = tokenizers()
    return AlignedWindows(
        data,
        student_tok,
        [teacher_tok],
        seq_len,
        teacher_window=teacher_window,
        repeat=repeat,
        shuffle=False,
    )


def batches(dataset: AlignedWindows, n: int, size: int = BATCH):
    """Up to n collated batches of `size` windows (the last may be smaller)."""
    items = iter(dataset)
    for _ in range(n):
        group = [x for _, x in zip(range(size), items)]
        if not group:
            return
        yield collate(group, pad_ids=dataset.pad_ids)


def train_args(seq_len: int) -> argparse.Namespace:
    """train.py's flags for the tiny preset: the loss settings and the models' shapes."""
    return flags.parse_args(["--preset", "tiny", "--seq-len", str(seq_len)])


def load(name: str, tok, args, role: str):
    """A tiny-preset model as train.py makes it (its seed per role), float32 on the CPU."""
    model = train.load_model(name, tok, args, torch.float32, CPU, role)
    if role == "teacher":
        model.eval().requires_grad_(False)
        train.trim_output_vocabulary(model, len(tok))
    return model


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# ----------------------------------------------------------------------------- part 1


def cache_dir_name(work: str, topk: int, dtype: str) -> str:
    return os.path.join(work, f"cache-k{topk}-{dtype}")


def run_cache_pass(data: str, out: str, topk: int, dtype: str, extra=()) -> dict:
    """cache_teacher.py as a subprocess: its printed teacher tokens and rate, and the wall time."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "cache_teacher.py"),
        "--preset",
        "tiny",
        "--teacher",
        TEACHER,
        "--data",
        data,
        "--out",
        out,
        "--topk",
        str(topk),
        "--dtype",
        dtype,
        *extra,
    ]
    load_before, start = load_average(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    found = PASS_LINE.search(done.stdout)
    if done.returncode or not found:
        sys.exit(f"error: {' '.join(cmd)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {
        "tokens": int(found[1].replace(",", "")),
        "printed_tokens_per_s": int(found[2].replace(",", "")),
        "process_wall_s": round(wall, 1),
        "load_average": load_before,
    }


def part_topk(work: str, short: str, n_batches: int) -> dict:
    """Caches at each (K, dtype) of the short documents; KD terms and gradients, cached against
    online, per loss."""
    print(f"\n## 1. What top-K costs the method (caches of {short})")
    rows = []
    for topk, dtype in CONFIGS:
        out = cache_dir_name(work, topk, dtype)
        row = {"topk": topk, "dtype": dtype, **run_cache_pass(short, out, topk, dtype)}
        row["disk_bytes"] = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        rows.append(row)
        print(
            f"cache K={topk} {dtype}: {row['tokens']:,} tokens, {row['disk_bytes'] / 2**20:,.1f} "
            f"MiB, {row['printed_tokens_per_s']} tokens/s"
        )
    teacher = compare_kd(work, short, n_batches, rows)
    print_topk(rows, teacher)
    return {"caches": rows, "teacher": teacher}


def compare_kd(work: str, short: str, n_batches: int, rows: list[dict]) -> dict:
    """Fills each row with the mean, over the batches, of the KD term's and its gradient's change
    per loss, and the teacher's mass in its top K; what the teacher's distributions are like."""
    args = train_args(KD_SEQ_LEN)
    student_tok, teacher_tok = tokenizers()
    student = load(STUDENT, student_tok, args, "student").eval()
    # the cache's teacher: cache_teacher.load_teacher loads it with seq_len = the teacher window
    teacher = load(TEACHER, teacher_tok, train_args(args.teacher_window), "teacher")
    rows_out = teacher.get_input_embeddings().weight.shape[0]  # its output rows, untrimmed
    losses = {}
    for loss in LOSSES:  # one train.Teacher per loss: W (pkl) or the common set (hkl, gold)
        t = train.Teacher(TEACHER, teacher_tok, None, loss, 1.0, len(teacher_tok), rows_out)
        t.w_path = train.cached_projection(
            args.projection_cache,
            student_tok,
            teacher_tok,
            student.get_output_embeddings().weight.shape[0],
            t.vocab,
        )
        train.attach_projection(t, student_tok, student, args, CPU)
        losses[loss] = t
    online = windows(short, KD_SEQ_LEN, args.teacher_window)
    cached = []
    for row in rows:
        dataset = windows(short, KD_SEQ_LEN, args.teacher_window)
        dataset.caches = [
            cache_teacher.TeacherCache(cache_dir_name(work, row["topk"], row["dtype"]), teacher_tok)
        ]
        cached.append(batches(dataset, n_batches))
        row.update(kd={loss: [] for loss in LOSSES}, topk_mass=[], union_ids=[])
    packing_error, entropy, n = 0.0, [], 0
    for on, *cached_batches in zip(batches(online, n_batches), *cached):
        n += 1
        start = time.perf_counter()
        with torch.no_grad():
            s_logits = student(
                input_ids=on["student_ids"], attention_mask=on["student_mask"], use_cache=False
            ).logits
            t_logits = teacher(
                input_ids=on["teacher_ids_0"], position_ids=on["teacher_pos_0"], use_cache=False
            ).logits
        if n == 1:  # the packed rows against each row run alone (the attention of packed rows)
            packing_error = packed_vs_separate(teacher, on, t_logits)
        keep = on["teacher_chunk_0"] >= 0
        logp = torch.log_softmax(t_logits[keep], -1)
        entropy.append(float(-(logp.exp() * logp).sum(-1).mean()))
        reference = {
            loss: kd_and_grad(t, s_logits, t_logits, on, args) for loss, t in losses.items()
        }
        for row, batch in zip(rows, cached_batches):
            same_windows(on, batch)
            dense = cache_teacher.teacher_logits(batch, 0, len(teacher_tok))
            if row["topk"]:  # the mass the top K hold; the distinct ids among them (P-KL's
                # subset is the vocab_topk ids of largest logit: beyond these, ties of the rest)
                cached_at = batch["teacher_chunk_0"] >= 0
                held = batch["cache_logp_0"][cached_at].logsumexp(-1).exp()
                row["topk_mass"].append(float(held.mean()))
                row["union_ids"].append(len(batch["cache_ids_0"][cached_at].unique()))
            for loss, t in losses.items():
                kd, grad = kd_and_grad(t, s_logits, dense, batch, args)
                kd0, grad0 = reference[loss]
                row["kd"][loss].append(
                    {
                        "kd_online": kd0,
                        "kd_rel": abs(kd - kd0) / abs(kd0),
                        "grad_rel_l2": float((grad - grad0).norm() / grad0.norm()),
                        "grad_cos": float((grad * grad0).sum() / (grad.norm() * grad0.norm())),
                    }
                )
        print(
            f"batch {n}: {int(keep.sum())} teacher positions in chunks, "
            f"{time.perf_counter() - start:.0f} s"
        )
    for row in rows:
        row["batches"] = n
        row["topk_mass"] = statistics.mean(row["topk_mass"]) if row["topk"] else 1.0
        row["union_ids"] = statistics.mean(row["union_ids"]) if row["topk"] else len(teacher_tok)
        row["kd"] = {
            loss: {key: statistics.mean(b[key] for b in per) for key in per[0]}
            for loss, per in row["kd"].items()
        }
    return {
        "entropy_nats": statistics.mean(entropy),
        "log_vocab_nats": math.log(len(teacher_tok)),
        "packed_vs_separate_rows_max_abs_logit": packing_error,
    }


def kd_and_grad(t, s_logits, t_logits, batch, args) -> tuple[float, torch.Tensor]:
    """The KD term (train.kd_loss, train.py's default settings) and its gradient with respect
    to the student's logits."""
    s = s_logits.detach().requires_grad_(True)
    kd = train.kd_loss(t, s, t_logits, batch, 0, args)
    (grad,) = torch.autograd.grad(kd, s)
    return float(kd.detach()), grad.double()


def same_windows(online: dict, cached: dict) -> None:
    """The two datasets made the same windows and chunks (else the comparison means nothing)."""
    for key in ("student_ids", "student_chunk_0"):
        if not torch.equal(online[key], cached[key]):
            sys.exit(f"error: online and cached batches differ in {key}")
    for r in range(len(online["student_ids"])):
        a = online["teacher_chunk_0"][r]
        b = cached["teacher_chunk_0"][r]
        if not torch.equal(a[a >= 0], b[b >= 0]):
            sys.exit(f"error: online and cached batches differ in row {r}'s teacher chunks")


def packed_vs_separate(teacher, batch: dict, packed: torch.Tensor) -> float:
    """Max |logit difference| between the packed rows' forward and each row run on its own."""
    worst = 0.0
    for r, (ids, pos) in enumerate(zip(batch["teacher_ids_0"], batch["teacher_pos_0"])):
        length = int(batch["teacher_mask_0"][r].sum())
        starts = [*torch.nonzero(pos[:length] == 0).flatten().tolist(), length]
        for a, b in zip(starts, starts[1:]):
            with torch.no_grad():
                alone = teacher(input_ids=ids[None, a:b], use_cache=False).logits[0]
            worst = max(worst, float((alone - packed[r, a:b]).abs().max()))
    return worst


def print_topk(rows: list[dict], teacher: dict) -> None:
    print("\nKD term and its gradient (w.r.t. the student's logits), cached vs online teacher;")
    print(f"means over {rows[0]['batches']} batches of {BATCH} x {KD_SEQ_LEN} student tokens")
    print(
        "\n| K | dtype | top-K mass | distinct top-K ids | loss | KD online | KD rel. change | "
        "grad rel. L2 | grad cos |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for loss, v in row["kd"].items():
            print(
                f"| {row['topk'] or 'all'} | {row['dtype']} | {row['topk_mass']:.4f} | "
                f"{row['union_ids']:,.0f} | {loss} | "
                f"{v['kd_online']:.4g} | {v['kd_rel']:.2e} | {v['grad_rel_l2']:.2e} | "
                f"{v['grad_cos']:.6f} |"
            )
    print(
        f"\nteacher entropy {teacher['entropy_nats']:.3f} nats (log |V| = "
        f"{teacher['log_vocab_nats']:.3f}); packed rows vs each row alone: max |delta logit| "
        f"{teacher['packed_vs_separate_rows_max_abs_logit']:.2e}"
    )


# ----------------------------------------------------------------------------- part 2


def part_bytes(rows: list[dict]) -> list[dict]:
    print("\n## 2. Bytes per teacher token")
    vocab = len(tokenizers()[1])
    out = []
    print(
        "\n| K | dtype | record bytes/token | on disk bytes/token | GB per 10^9 tokens (record) |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        record = cache_teacher.record_dtype(row["topk"], row["dtype"], vocab).itemsize
        disk = row["disk_bytes"] / row["tokens"]
        out.append(
            {
                "topk": row["topk"],
                "dtype": row["dtype"],
                "record_bytes": record,
                "disk_bytes_per_token": round(disk, 1),
                "gb_per_billion": record,
            }
        )
        print(
            f"| {row['topk'] or 'all'} | {row['dtype']} | {record:,} | {disk:,.1f} | {record:,} |"
        )
    print(
        "(bytes per token = GB per 10^9 tokens; on disk adds the .npy headers and JSON indexes,"
        f" over {rows[0]['tokens']:,} tokens)"
    )
    return out


# ----------------------------------------------------------------------------- part 3


class TimedModel:
    """The teacher, its calls timed and their inputs kept (to replay them bare)."""

    def __init__(self, model):
        self.model, self.seconds, self.calls = model, 0.0, []

    def __call__(self, **inputs):
        start = time.perf_counter()
        out = self.model(**inputs)
        self.seconds += time.perf_counter() - start
        self.calls.append(inputs)
        return out


class TimedWriter(cache_teacher.Writer):
    """cache_teacher.Writer, the time in its forward() (the model and the top-K records) kept."""

    forward_seconds = 0.0

    def forward(self, *args) -> None:
        start = time.perf_counter()
        super().forward(*args)
        self.forward_seconds += time.perf_counter() - start


def part_cache_pass(work: str, corpus: str, n_docs: int) -> tuple[dict, str]:
    """A K = 64 pass over the first n_docs documents (cache_teacher.main's steps, in this process)
    against the same teacher calls replayed bare."""
    print(f"\n## 3. Cache pass speed (K = 64 packed, the first {n_docs} documents of the corpus)")
    out = cache_dir_name(work, 64, "train")
    args = cache_teacher.parse_args(
        [
            "--preset",
            "tiny",
            "--teacher",
            TEACHER,
            "--data",
            corpus,
            "--out",
            out,
            "--topk",
            "64",
            "--max-documents",
            str(n_docs),
        ]
    )
    job = SimpleNamespace(device=CPU, cuda=False, rank=0, world_size=1, master=True)
    tok, model, manifest = cache_teacher.prepare(args, corpus, job)
    cache_teacher.start_cache(out, manifest, True)
    timed = TimedModel(model)
    writer = TimedWriter(args, manifest, tok, timed, job)
    load_before, start = load_average(), time.perf_counter()
    writer.run(corpus)
    wall = time.perf_counter() - start
    bare = []
    for _ in range(2):  # the same calls again, only the model: twice, for the machine's noise
        start = time.perf_counter()
        with torch.no_grad():
            for inputs in timed.calls:
                _ = model(**inputs)
        bare.append(time.perf_counter() - start)
    tokens = writer.tokens
    result = {
        "documents": n_docs,
        "teacher_tokens": tokens,
        "forward_calls": len(timed.calls),
        "batch_tokens": args.batch_tokens,
        "pass_s": round(wall, 2),
        "pass_tokens_per_s": round(tokens / wall, 1),
        "in_pass_model_s": round(timed.seconds, 2),
        "in_pass_topk_records_s": round(writer.forward_seconds - timed.seconds, 2),
        "in_pass_other_s": round(wall - writer.forward_seconds, 2),
        "bare_forward_s": [round(b, 2) for b in bare],
        "bare_tokens_per_s": round(tokens / statistics.mean(bare), 1),
        "ratio_pass_to_bare": round(statistics.mean(bare) / wall, 3),
        "ratio_pass_to_in_pass_model": round(timed.seconds / wall, 3),
        "load_average": load_before,
        "load_average_after": load_average(),
    }
    print(
        "\n| teacher tokens | pass tokens/s | bare forward tokens/s | ratio | time in the pass: "
        "model / top-K records / other (s) |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| {tokens:,} | {result['pass_tokens_per_s']:,} | {result['bare_tokens_per_s']:,} | "
        f"{result['ratio_pass_to_bare']} | {result['in_pass_model_s']} / "
        f"{result['in_pass_topk_records_s']} / {result['in_pass_other_s']} |"
    )
    print(
        f"(bare forward runs: {result['bare_forward_s']} s; load average "
        f"{load_before} -> {result['load_average_after']})"
    )
    return result, out


# ----------------------------------------------------------------------------- part 4


def part_data(corpus: str, steps: int, seq_len: int) -> tuple[int, dict]:
    """The windows train.py will read (rebuilt here): how many documents the runs touch (with
    room for the DataLoader's prefetch), and per rule the teacher's work per step."""
    teacher_window = train_args(seq_len).teacher_window
    per_rule, last_doc = {}, 0
    for rule, window in (("own_context", teacher_window), ("student_window", 0)):
        per_step = []
        dataset = windows(corpus, seq_len, window, repeat=True)
        for batch in batches(dataset, steps + 10):  # + 10: what the DataLoader may prefetch
            last_doc = max(last_doc, int(batch["position"][:, 5].max()))
            if len(per_step) < steps:
                per_step.append(teacher_work(batch))
        per_rule[rule] = {"teacher_window": window, **mean_work(per_step)}
    return last_doc + 1, per_rule


def teacher_work(batch: dict) -> dict:
    """One step's teacher input (one micro-batch): real tokens, positions the forward computes
    (padding included), and KD chunks (valid: a position on both sides)."""
    valid, _ = train.chunk_counts(batch["student_chunk_0"], batch["teacher_chunk_0"])
    return {
        "student_tokens": int(batch["student_mask"].sum()),
        "teacher_tokens": int(batch["teacher_mask_0"].sum()),
        "teacher_positions": int(batch["teacher_ids_0"].numel()),
        "kd_chunks": valid,
    }


def mean_work(per_step: list[dict]) -> dict:
    out = {key: statistics.mean(s[key] for s in per_step) for key in per_step[0]}
    out["teacher_per_student_token"] = out["teacher_tokens"] / out["student_tokens"]
    out["positions_per_student_token"] = out["teacher_positions"] / out["student_tokens"]
    return out


def train_run(work: str, name: str, corpus: str, steps: int, seq_len: int, extra: list) -> dict:
    """train.py as a subprocess; its metrics.jsonl."""
    out = os.path.join(work, f"run-{name}")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--preset",
        "tiny",
        "--data",
        corpus,
        "--out-dir",
        out,
        "--max-steps",
        str(steps),
        "--seq-len",
        str(seq_len),
        "--save-every",
        "0",
        "--no-shuffle",
        *extra,
    ]
    load_before, start = load_average(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    path = os.path.join(out, "metrics.jsonl")
    if done.returncode or not os.path.exists(path):
        sys.exit(f"error: {' '.join(cmd)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    with open(path) as f:
        metrics = [json.loads(x) for x in f if x.strip()]
    after = [m["tokens_per_s"] for m in metrics if m["step"] > 5]
    last = metrics[-1]
    tail = metrics[-5:]
    return {
        "flags": extra,
        "steps": len(metrics),
        "median_tokens_per_s": statistics.median(after),
        "process_wall_s": round(wall, 1),
        "load_average": load_before,
        "final": {k: last[k] for k in ("loss", "ce", "kd", "kd_scale", "grad_norm")},
        "last5_mean": {k: statistics.mean(m[k] for m in tail) for k in ("loss", "ce", "kd")},
        "valid_chunks": statistics.mean(m["valid_chunks"] for m in metrics),
    }


def part_train(work: str, corpus: str, cache: str, steps: int, seq_len: int) -> dict:
    print(f"\n## 4. Train step speed (tiny preset, {steps} steps of {BATCH} x {seq_len} tokens)")
    plans = {
        "ce": ["--loss", "ce"],
        "pkl_online": ["--loss", "pkl"],
        "pkl_cached": ["--loss", "pkl", "--teacher-cache", cache],
        "pkl_online_window0": ["--loss", "pkl", "--teacher-window", "0"],
    }
    runs = {}
    for name, extra in plans.items():
        runs[name] = train_run(work, name, corpus, steps, seq_len, extra)
        print(
            f"{name}: {runs[name]['median_tokens_per_s']:.1f} tokens/s, "
            f"{runs[name]['process_wall_s']} s"
        )
    ce = runs["ce"]["median_tokens_per_s"]
    print("\n| run | median tokens/s (steps > 5) | vs CE only | process wall (s) | load avg |")
    print("|---|---|---|---|---|")
    for name in ("ce", "pkl_online", "pkl_cached"):
        r = runs[name]
        r["ratio_to_ce"] = r["median_tokens_per_s"] / ce
        print(
            f"| {name} | {r['median_tokens_per_s']:.1f} | {r['ratio_to_ce']:.2f} | "
            f"{r['process_wall_s']} | {r['load_average']} |"
        )
    return runs


# ----------------------------------------------------------------------------- part 5


def part_context(runs: dict, steps_data: dict, corpus: str) -> dict:
    print("\n## 5. The teacher-context rule (online P-KL, same seed)")
    rules = {
        "student_window": (runs["pkl_online_window0"], steps_data["student_window"]),
        "own_context": (runs["pkl_online"], steps_data["own_context"]),
    }
    print(
        "\n| rule | --teacher-window | loss (end) | CE (end) | KD (end) | mean of last 5 "
        "loss / CE / KD | tokens/s | teacher tokens / positions per step | teacher tokens "
        "per student token | KD chunks per step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rule, (run, work) in rules.items():
        f, t = run["final"], run["last5_mean"]
        print(
            f"| {rule} | {work['teacher_window']} | {f['loss']:.4f} | {f['ce']:.4f} | "
            f"{f['kd']:.4f} | {t['loss']:.4f} / {t['ce']:.4f} / {t['kd']:.4f} | "
            f"{run['median_tokens_per_s']:.1f} | {work['teacher_tokens']:.0f} / "
            f"{work['teacher_positions']:.0f} | {work['teacher_per_student_token']:.3f} | "
            f"{work['kd_chunks']:.1f} |"
        )
    out = {
        rule: {"run": run["final"], "last5_mean": run["last5_mean"], "steps": work}
        for rule, (run, work) in rules.items()
    }
    out["full_settings"] = full_settings(corpus)
    return out


def full_settings(corpus: str, seq_len: int = 2048) -> list[dict]:
    """The teacher's work per student window at train.py's --seq-len 2048, per --teacher-window
    (0: the old rule), over the whole corpus, one window at a time (no padding): data only."""
    print(f"\nAt --seq-len {seq_len} (the whole corpus, one window a batch, data only):")
    print("\n| --teacher-window | teacher tokens per student token | KD chunks per window |")
    print("|---|---|---|")
    out = []
    for window in (0, 1024, 2048, 4096):
        dataset = windows(corpus, seq_len, window)
        work = mean_work([teacher_work(b) for b in batches(dataset, 10**9, size=1)])
        out.append({"teacher_window": window, "seq_len": seq_len, **work})
        print(f"| {window} | {work['teacher_per_student_token']:.3f} | {work['kd_chunks']:.1f} |")
    return out


if __name__ == "__main__":
    main()
