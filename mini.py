"""Mini reproduction on CPU: does GOLD lose the student's numerals, and does P-KL keep them?

    python mini.py --out out/mini           # make mini: 10 rows, 2 seeds (~30 min, 2 cores)
    python mini.py --out out/mini-quick --quick     # make mini-quick: 3 rows, 1 seed (~3.5 min)

The paper's headline: distilling Llama-3.2-1B from Qwen3-4B with GOLD collapses GSM8k (2.56, below
CE-only continued pre-training at 10.25) while P-KL recovers it (15.54). Qwen3 writes numbers one
digit per token; Llama has a token for every numeral up to 999, none of which has an exact twin in
Qwen3. GOLD distils only over the exact twins (the "common set") and, by Proposition 1 (METHOD.md
5.3), pushes down the student's probability of every other token: here, all multi-digit numerals.

The toy, with the REAL tokenizers:
  1. data: templated word problems ("Mia had 47 apples and found 58 more, so she has 105
     apples."); the teacher trains on many, the student on few; a test split of (a, b) pairs that
     no training document uses.
  2. vocabularies: each model keeps only the token ids the corpus uses, plus every all-digit token
     and every special token (so the output layer is small enough for a CPU). The tokenizers stay
     the real ones: their ids are renumbered, kept ids first. W is the real W over the renumbered
     ids, cut to the kept ids, rows renormalized; the audit on it reports the same numeral
     coverage as on the full vocabularies (0 of 1,100 multi-digit numerals in the common set).
  3. teachers: a Qwen3-architecture model with the Qwen3 tokenizer (and, for the same-tokenizer
     reference row, a Llama-architecture one with the Llama tokenizer), trained with train.py.
  4. students: Llama-architecture, Llama tokenizer, one train.py run per row and seed.
  5. evaluate.py (lm-eval, a local generative task, greedy, exact match on the answer), and the
     student's probability mass on multi-digit numeral tokens at the answer's first position.
  6. results.md / results.json: mean and spread over seeds.

A finished stage is not redone: rerunning continues an interrupted reproduction.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from audit import audit
from build_projection import build_projection, load_projection, save_projection
from cli import ArgumentParser, atomic_write, check_output_dir, int_flag, one_line_errors
from tokens import load_tokenizer, token_bytes

ROOT = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------- settings
# Sizes of the full and quick reproductions. Steps are train.py optimizer steps.
SETTINGS = {
    "full": dict(
        teacher_docs=30_000,
        student_docs=1_500,
        test_docs=400,
        teacher_steps=1_500,
        teacher_batch=64,
        student_steps=800,
        student_batch=32,
        seeds=[0, 1],
    ),
    "quick": dict(
        teacher_docs=30_000,
        student_docs=1_500,
        test_docs=300,
        teacher_steps=600,
        teacher_batch=64,
        student_steps=400,
        student_batch=32,
        seeds=[0],
    ),
    # a plumbing check for the tests: every stage, numbers meaningless
    "smoke": dict(
        teacher_docs=300,
        student_docs=60,
        test_docs=16,
        teacher_steps=4,
        teacher_batch=8,
        student_steps=3,
        student_batch=8,
        seeds=[0],
    ),
}
# Both architectures: 4 layers, width 128 (the vocabularies are pruned, see prune_tokenizer).
MODEL = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)
# Tokens per window: one document each (at most 23 Llama tokens with BOS, 26 Qwen3 tokens).
SEQ_LEN, TEACHER_SEQ_LEN = 24, 32
# (row, teacher, train.py arguments). "qwen": the Qwen3-tokenizer teacher; "llama": the
# Llama-tokenizer teacher (same tokenizer as the student: plain KL). Dynamic KD scaling unless
# "static w" (loss = CE + w * KD).
ROWS = [
    ("ce only", None, ["--loss", "ce"]),
    ("gold", "qwen", ["--loss", "gold"]),
    ("gold, static 1.0", "qwen", ["--loss", "gold", "--kd-scaling", "static"]),
    (
        "gold, static 0.1",
        "qwen",
        ["--loss", "gold", "--kd-scaling", "static", "--kd-weight", "0.1"],
    ),
    ("pkl, merge mean", "qwen", ["--loss", "pkl", "--chunk-merge", "mean"]),
    ("pkl, merge first", "qwen", ["--loss", "pkl", "--chunk-merge", "first"]),
    (
        "pkl, merge first, learned W",
        "qwen",
        ["--loss", "pkl", "--chunk-merge", "first", "--learn-projection"],
    ),
    (
        "pkl, merge first, static 1.0",
        "qwen",
        ["--loss", "pkl", "--chunk-merge", "first", "--kd-scaling", "static"],
    ),
    (
        "pkl, merge first, static 0.1",
        "qwen",
        ["--loss", "pkl", "--chunk-merge", "first", "--kd-scaling", "static", "--kd-weight", "0.1"],
    ),
    ("kl, same tokenizer", "llama", ["--loss", "kl"]),
    # Not run by default: on this pair H-KL's pairs are GOLD's exact pairs (a numeral's top
    # teacher digit is already paired with the single-digit student token), so it trains the
    # same student as "gold" (tests/test_mini.py checks the pairs).
    ("hkl", "qwen", ["--loss", "hkl"]),
]
# Each teacher's architecture (and tokenizer: "qwen3" is Qwen3's, "llama" Llama-3.2's).
TEACHER_ARCH = {"qwen": "qwen3", "llama": "llama"}
FULL_ROWS = [r[0] for r in ROWS if r[0] != "hkl"]
QUICK_ROWS = ["ce only", "gold", "pkl, merge first"]
TASK = "xtoken_mini_arith"

# ----------------------------------------------------------------------------- 1. data
NAMES = [
    ("Mia", "She"),
    ("Tom", "He"),
    ("Ana", "She"),
    ("Ben", "He"),
    ("Zoe", "She"),
    ("Sam", "He"),
    ("Lily", "She"),
    ("Max", "He"),
    ("Ella", "She"),
    ("Leo", "He"),
    ("Nora", "She"),
    ("Jack", "He"),
    ("Ruby", "She"),
    ("Omar", "He"),
    ("Ivy", "She"),
    ("Noah", "He"),
]
ITEMS = [
    "apples",
    "books",
    "coins",
    "stamps",
    "shells",
    "cards",
    "pencils",
    "marbles",
    "stickers",
    "cookies",
    "beads",
    "stones",
]
GAIN = ["got {b} more", "found {b} more", "bought {b} more", "was given {b} more"]


def problem(rng: random.Random, a: int, b: int) -> dict:
    """One sentence about a + b; the prompt ends where the answer begins (" 105 apples.")."""
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    event = rng.choice(GAIN).format(b=b)
    prompt = f"{name} had {a} {item} and {event}, so {pronoun.lower()} has"
    return {"prompt": prompt, "answer": str(a + b), "text": f"{prompt} {a + b} {item}."}


def make_data(out: str, s: dict, seed: int = 0) -> dict[str, str]:
    """train_teacher.jsonl, train_student.jsonl (a smaller share of it) and test.jsonl. The test
    split holds its own (a, b) pairs, which no training document uses: it measures addition, not
    memory. Operands 0..99: sums of 1 to 3 digits, each one Llama token and 1 to 3 Qwen3 tokens."""
    paths = {k: os.path.join(out, "data", f"{k}.jsonl") for k in ("teacher", "student", "test")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    test_pairs, train_pairs = pairs[: s["test_docs"]], pairs[s["test_docs"] :]
    test = [problem(rng, a, b) for a, b in test_pairs]
    teacher = [problem(rng, *rng.choice(train_pairs)) for _ in range(s["teacher_docs"])]
    student = teacher[: s["student_docs"]]  # the teacher has seen all of the student's data
    for key, rows in (("teacher", teacher), ("student", student), ("test", test)):
        write_jsonl(paths[key], rows)
    return paths


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_jsonl(path: str, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- 2. vocabularies
def is_numeral(b: bytes | None) -> bool:
    """A token's canonical bytes (tokens.token_bytes) are all ASCII digits."""
    return bool(b) and b.isdigit()


def prune_tokenizer(name: str, texts: list[str], out_dir: str) -> tuple:
    """The real tokenizer with ids renumbered: the kept ids (used by `texts`, all-digit tokens,
    special tokens) first, in their original order, then the rest. Returns (tokenizer, kept).
    A model with `kept` output rows then never sees or emits an id outside them on this data."""
    done = os.path.join(out_dir, "kept.json")  # written last: the tokenizer is complete
    if os.path.exists(done):
        with open(done) as f:
            return load_tokenizer(out_dir), json.load(f)["kept"]
    tok = load_tokenizer(name)
    spec = json.loads(tok.backend_tokenizer.to_str())
    used = {i for ids in tok(texts)["input_ids"] for i in ids}
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    used |= {i for i, b in enumerate(token_bytes(tok)) if is_numeral(b)}
    used |= {a["id"] for a in spec["added_tokens"]}
    order = sorted(used) + sorted(set(range(len(vocab))) - used)
    new_id = {old: new for new, old in enumerate(order)}

    spec["model"]["vocab"] = {t: new_id[i] for t, i in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:  # specials move into the model's vocab: the tokenizers
        added["id"] = new_id[added["id"]]  # library numbers added tokens after it otherwise
        spec["model"]["vocab"][added["content"]] = added["id"]

    def remap_post_processor(node):  # TemplateProcessing keeps special tokens' ids
        if isinstance(node, dict):
            if "ids" in node and "tokens" in node:
                node["ids"] = [new_id[i] for i in node["ids"]]
            for value in node.values():
                remap_post_processor(value)
        elif isinstance(node, list):
            for value in node:
                remap_post_processor(value)

    remap_post_processor(spec.get("post_processor"))
    roles = {f"{r}_token": getattr(tok, f"{r}_token") for r in ("bos", "eos", "pad", "unk")}
    pruned = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        **{k: v for k, v in roles.items() if v is not None},
    )
    pruned.save_pretrained(out_dir)
    write_text(done, json.dumps({"source": name, "kept": len(used), "tokenizer_size": len(vocab)}))
    return load_tokenizer(out_dir), len(used)


def pruned_projection(student_tok, teacher_tok, n_student: int, n_teacher: int) -> dict:
    """The real W (built over the renumbered ids) cut to the kept ids, rows renormalized."""
    full = build_projection(student_tok, teacher_tok)
    W = full["W"].coalesce()
    (rows, cols), vals = W.indices(), W.values()
    keep = (rows < n_student) & (cols < n_teacher)
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    sums = torch.zeros(n_student).index_add_(0, rows, vals)
    vals = vals / sums[rows]
    W = torch.sparse_coo_tensor(
        torch.stack([rows, cols]), vals, (n_student, n_teacher), check_invariants=True
    )
    pairs = full["exact_pairs"]
    pairs = pairs[(pairs[:, 0] < n_student) & (pairs[:, 1] < n_teacher)]
    full["student"]["vocab_size"], full["teacher"]["vocab_size"] = n_student, n_teacher
    full["params"]["pruned"] = True
    return {**full, "W": W.coalesce(), "exact_pairs": pairs}


def init_model(arch: str, tok, vocab: int, out_dir: str, seed: int) -> str:
    """A random model with `vocab` output rows, saved with its tokenizer (train.py loads both)."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    torch.manual_seed(seed)
    ids = {f"{r}_token_id": getattr(tok, f"{r}_token_id") for r in ("bos", "eos", "pad")}
    config = dict(MODEL, vocab_size=vocab, **{k: v for k, v in ids.items() if v is not None})
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**config))
    else:
        model = LlamaForCausalLM(LlamaConfig(**config))
    tmp = out_dir + ".tmp"  # renamed when complete: a stopped run never leaves half a model
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


# ----------------------------------------------------------------------------- 3-4. training
def train_job(
    label: str,
    init: str,
    data: str,
    out_dir: str,
    steps: int,
    batch: int,
    seed: int,
    extra: list[str],
    seq_len: int = SEQ_LEN,
) -> dict:
    """A train.py command; done when its last checkpoint exists (then it is not rerun)."""
    flags = {
        "--student": init,
        "--data": data,
        "--out-dir": out_dir,
        "--seq-len": str(seq_len),
        "--batch-size": str(batch),
        "--grad-accum": "1",
        "--max-steps": str(steps),
        "--lr": "3e-3",
        "--min-lr": "3e-4",
        "--warmup-steps": "50",
        "--weight-decay": "0.0",
        "--num-workers": "0",
        "--save-every": str(steps),
        "--keep-last": "1",
        "--log-every": "50",
        "--seed": str(seed),
    }
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    cmd += [word for flag, value in flags.items() for word in (flag, value)]
    # one problem per window in file order: the setting the table was measured in
    cmd += ["--overwrite", "--no-pack", "--no-shuffle", *extra]
    return {"label": label, "cmd": cmd, "final": os.path.join(out_dir, f"step_{steps}")}


def run_jobs(jobs: list[dict], parallel: int, log_dir: str) -> None:
    """Run train.py jobs `parallel` at a time, one thread each; skip finished ones."""
    os.makedirs(log_dir, exist_ok=True)
    todo = [j for j in jobs if not os.path.exists(j["final"])]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    running: list[tuple[dict, subprocess.Popen, float]] = []
    try:
        while todo or running:
            while todo and len(running) < parallel:
                job = todo.pop(0)
                log = open(os.path.join(log_dir, slug(job["label"]) + ".log"), "w")
                proc = subprocess.Popen(job["cmd"], stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((job, proc, time.perf_counter()))
            time.sleep(0.5)
            for item in list(running):
                job, proc, started = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode:
                    log = os.path.join(log_dir, slug(job["label"]) + ".log")
                    raise SystemExit(f"error: {job['label']} failed; see {log}")
                seconds = time.perf_counter() - started
                print(f"  trained {job['label']} in {seconds:.0f} s", flush=True)
    finally:  # on a failure or ^C, stop the other runs too (a rerun starts them again)
        for _, proc, _ in running:
            proc.terminate()
            proc.wait()


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-").lower()


# ----------------------------------------------------------------------------- 5. measurement
def write_task(out: str, test_path: str) -> str:
    """A local lm-eval task: greedy generation after the prompt, the first number extracted."""
    task_dir = os.path.join(out, "task")
    os.makedirs(task_dir, exist_ok=True)
    yaml = f"""# Generated by mini.py: held-out problems; the answer is the first number generated.
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(os.path.abspath(test_path))}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  do_sample: false
  max_gen_toks: 8
filter_list:
  - name: "first-number"
    filter:
      - function: "regex"
        regex_pattern: "(-?[0-9]+)"
        group_select: 0
      - function: "take_first"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    write_text(os.path.join(task_dir, f"{TASK}.yaml"), yaml)
    return task_dir


def evaluate_all(models: dict[str, str], task_dir: str, out: str) -> dict[str, float]:
    """evaluate.py over every model (cached per model x task): exact match in percent."""
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--include-path", task_dir]
    cmd += ["--tasks", TASK, "--out-dir", os.path.join(out, "eval"), "--device", "cpu"]
    cmd += ["--batch-size", "64", "--num-fewshot", "0"]
    for label, path in models.items():  # evaluate.py labels: letters, digits, . _ -
        cmd += ["--model", f"{slug(label)}={path}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: evaluate.py failed:\n{done.stderr[-2000:]}")
    with open(os.path.join(out, "eval", "results.csv")) as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    return {label: float(rows[slug(label)][TASK]) for label in models}


def numeral_mass(model_dir: str, test: list[dict]) -> dict[str, float]:
    """At the position that predicts the answer's first token (answers >= 10), the student's
    total probability on multi-digit numeral tokens, and on the correct token."""
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    multi = torch.tensor([is_numeral(b) and len(b) > 1 for b in token_bytes(tok)[:vocab]])
    items = [d for d in test if int(d["answer"]) >= 10]
    masses, correct = [], []
    for start in range(0, len(items), 64):
        batch = items[start : start + 64]
        enc = [tok(d["text"], return_offsets_mapping=True) for d in batch]
        width = max(len(e["input_ids"]) for e in enc)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        targets = []
        for row, (d, e) in enumerate(zip(batch, enc)):
            ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[row, : len(e["input_ids"])] = 1
            answer_at = len(d["prompt"]) + 1  # the prompt, a space, then the answer
            pos = next(i for i, (a, b) in enumerate(e["offset_mapping"]) if a <= answer_at < b)
            targets.append((row, pos - 1, e["input_ids"][pos]))
        with torch.no_grad():
            probs = model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)
        for row, pos, target in targets:
            masses.append(float(probs[row, pos][multi].sum()))
            correct.append(float(probs[row, pos, target]))
    return {"multi_digit_mass": statistics.mean(masses), "p_correct": statistics.mean(correct)}


# ----------------------------------------------------------------------------- 6. report
def summarize(results: dict, rows: list[str], seeds: list[int]) -> str:
    def spread(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    lines = [
        "| row | exact match % (mean ± sd) | per seed | multi-digit mass | p(answer token) |",
        "|---|---|---|---|---|",
    ]
    for label in rows:
        per = [results[f"{label} / seed {s}"] for s in seeds]
        em = [r["exact_match"] for r in per]
        mass = [r["multi_digit_mass"] for r in per]
        p = [r["p_correct"] for r in per]
        lines.append(
            f"| {label} | {spread(em)} | {', '.join(f'{v:.1f}' for v in em)} | "
            f"{statistics.mean(mass):.3f} | {statistics.mean(p):.3f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_seeds(text: str) -> list[int]:
    """--seeds: comma-separated distinct integers in [0, 2**32 - 1] (numpy's seed range)."""
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers; give e.g. 0,1,2"
        ) from None
    bad = [x for x in seeds if not 0 <= x < 2**32]
    if bad:
        message = f"seeds {bad} are out of range; give integers in [0, 2**32)"
        raise argparse.ArgumentTypeError(message)
    repeated = sorted({x for x in seeds if seeds.count(x) > 1})
    if repeated:  # two runs of one seed would share, and overwrite, one run directory
        raise argparse.ArgumentTypeError(f"seeds {repeated} are repeated; give each seed once")
    return seeds


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="mini.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/mini", help="output directory (created if needed)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="3 rows, 1 seed, shorter training")
    size.add_argument("--smoke", action="store_true", help="a plumbing check in a minute (tests)")
    p.add_argument(
        "--parallel",
        type=int_flag(1, what=" (train.py runs at once)"),
        default=2,
        help="train.py runs at once (1 thread each), at least 1",
    )
    p.add_argument(
        "--row",
        action="append",
        help="a row's label, repeatable (default: the "
        "setting's rows; 'hkl' is only run when named)",
    )
    p.add_argument(
        "--seeds", type=parse_seeds, help="comma-separated student seeds (default: the setting's)"
    )
    args = p.parse_args(argv)
    return one_line_errors(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    """The reproduction, stage by stage; each stage skips what an earlier run finished."""
    setting, s, rows = chosen_setting(args)
    check_output_dir(args.out, "--out")  # before any work
    out = args.out
    started = time.perf_counter()

    print("1. data", flush=True)
    paths = make_data(out, s)
    test = read_jsonl(paths["test"])

    print("2. pruned vocabularies and W", flush=True)
    vocab = prune_vocabularies(out, [d["text"] for d in read_jsonl(paths["teacher"]) + test])

    print("3. teachers (and the CE-only students)", flush=True)
    teachers = teacher_jobs(out, s, rows, vocab, paths["teacher"])
    teacher_dirs = {key: job["final"] for key, job in teachers.items()}
    students = student_jobs(out, s, rows, vocab, paths["student"], teacher_dirs)
    train_all(
        list(teachers.values()),
        students,
        f"{len(rows)} rows x {len(s['seeds'])} seeds",
        args.parallel,
        os.path.join(out, "logs"),
    )

    print("5. evaluate.py and numeral mass", flush=True)
    models = {f"teacher {k}": v for k, v in teacher_dirs.items()}
    models |= {job["label"]: job["final"] for job in students}
    results = measure(models, out, paths["test"], test)

    print("6. results", flush=True)
    minutes = (time.perf_counter() - started) / 60
    md = write_report(out, setting, s, rows, list(teacher_dirs), results, vocab, len(test), minutes)
    print(md)
    return 0


def chosen_setting(args: argparse.Namespace) -> tuple[str, dict, list[tuple]]:
    """(the setting's name, its sizes with --seeds applied, the ROWS to run); a ValueError for an
    unknown --row."""
    setting = "smoke" if args.smoke else "quick" if args.quick else "full"
    s = SETTINGS[setting]
    wanted = args.row or (FULL_ROWS if setting == "full" else QUICK_ROWS)
    unknown = sorted(set(wanted) - {r[0] for r in ROWS})
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {[r[0] for r in ROWS]}")
    if args.seeds is not None:
        s = dict(s, seeds=args.seeds)
    return setting, s, [r for r in ROWS if r[0] in wanted]


@dataclass
class Vocabularies:
    """The pruned tokenizers and their kept sizes, W's file, the audit's numeral coverage."""

    s_tok: PreTrainedTokenizerFast  # student: Llama-3.2
    n_s: int
    q_tok: PreTrainedTokenizerFast  # teacher: Qwen3
    n_q: int
    w_path: str
    coverage: dict[str, str]  # "digits_2", "digits_3": "common/total"


def prune_vocabularies(out: str, texts: list[str]) -> Vocabularies:
    """Stage 2: both pruned tokenizers, the pruned W (saved once), and the audit on it."""
    s_tok, n_s = prune_tokenizer("pkg:llama-3.2", texts, os.path.join(out, "tok", "llama"))
    q_tok, n_q = prune_tokenizer("pkg:qwen3", texts, os.path.join(out, "tok", "qwen"))
    w_path = os.path.join(out, "W_llama_qwen.pt")
    if not os.path.exists(w_path):
        save_projection(pruned_projection(s_tok, q_tok, n_s, n_q), w_path)
    report = audit(s_tok, load_projection(w_path, s_tok, q_tok))
    cats = report["categories"]
    coverage = {k: f"{cats[k]['common']}/{cats[k]['total']}" for k in ("digits_2", "digits_3")}
    print(
        f"   student vocab {n_s} of {len(s_tok)}, teacher {n_q} of {len(q_tok)}; audit on the "
        f"pruned W: common 2-digit {coverage['digits_2']}, 3-digit {coverage['digits_3']}, "
        f"recommends {report['recommended']}",
        flush=True,
    )
    return Vocabularies(s_tok, n_s, q_tok, n_q, w_path, coverage)


def teacher_jobs(out: str, s: dict, rows: list[tuple], vocab: Vocabularies, data: str) -> dict:
    """{"qwen": its train.py job, and "llama" when a row needs it}, their models initialized."""
    teachers = {"qwen": (vocab.q_tok, vocab.n_q)}
    if any(t == "llama" for _, t, _ in rows):
        teachers["llama"] = (vocab.s_tok, vocab.n_s)
    jobs = {}
    for key, (tok, n) in teachers.items():
        init_dir = os.path.join(out, "init", f"teacher-{key}")
        init = init_model(TEACHER_ARCH[key], tok, n, init_dir, seed=100)
        run_dir = os.path.join(out, "runs", f"teacher-{key}")
        jobs[key] = train_job(
            f"teacher {key}",
            init,
            data,
            run_dir,
            s["teacher_steps"],
            s["teacher_batch"],
            100,
            ["--loss", "ce"],
            TEACHER_SEQ_LEN,
        )
    return jobs


def student_jobs(
    out: str,
    s: dict,
    rows: list[tuple],
    vocab: Vocabularies,
    data: str,
    teacher_dirs: dict[str, str],
) -> list[dict]:
    """One train.py job per row and seed; each seed's model initialized, its data shuffled."""
    jobs = []
    for seed in s["seeds"]:
        init_dir = os.path.join(out, "init", f"student-{seed}")
        init = init_model("llama", vocab.s_tok, vocab.n_s, init_dir, seed)
        seed_data = shuffled_data(out, data, seed)
        for label, teacher, extra in rows:
            extra = list(extra)
            if teacher:
                extra = ["--teacher", teacher_dirs[teacher], *extra]
                if teacher == "qwen":
                    extra += ["--projection", vocab.w_path]
            run_dir = os.path.join(out, "runs", f"{slug(label)}-seed{seed}")
            jobs.append(
                train_job(
                    f"{label} / seed {seed}",
                    init,
                    seed_data,
                    run_dir,
                    s["student_steps"],
                    s["student_batch"],
                    seed,
                    extra,
                )
            )
    return jobs


def shuffled_data(out: str, data: str, seed: int) -> str:
    """The student's documents in a seed's own order, written once."""
    path = os.path.join(out, "data", f"student-seed{seed}.jsonl")
    if not os.path.exists(path):
        docs = read_jsonl(data)
        random.Random(seed).shuffle(docs)
        write_jsonl(path, docs)
    return path


def train_all(
    teachers: list[dict], students: list[dict], size: str, parallel: int, log_dir: str
) -> None:
    """The teachers with the CE-only students beside them, then (stage 4) the other students."""
    no_teacher = [j for j in students if "--teacher" not in j["cmd"]]
    run_jobs(teachers + no_teacher, parallel, log_dir)
    print(f"4. students: {size}", flush=True)
    run_jobs([j for j in students if j not in no_teacher], parallel, log_dir)


def measure(models: dict[str, str], out: str, test_path: str, test: list[dict]) -> dict:
    """Stage 5: {label: exact match (evaluate.py), multi-digit mass, p(answer token)}."""
    accuracy = evaluate_all(models, write_task(out, test_path), out)
    return {
        label: {"exact_match": accuracy[label], **numeral_mass(path, test)}
        for label, path in models.items()
    }


def write_report(
    out: str,
    setting: str,
    s: dict,
    rows: list[tuple],
    teachers: list[str],
    results: dict,
    vocab: Vocabularies,
    n_test: int,
    minutes: float,
) -> str:
    """Stage 6: results.md (returned) and results.json."""
    lines = [summarize(results, [r[0] for r in rows], s["seeds"])]
    for k in teachers:
        r = results[f"teacher {k}"]
        lines.append(
            f"| teacher {k} ({TEACHER_ARCH[k]} tokenizer) | {r['exact_match']:.1f} | | "
            f"{r['multi_digit_mass']:.3f} | {r['p_correct']:.3f} |"
        )
    table = "\n".join(lines)
    coverage = vocab.coverage
    md = (
        f"# Mini reproduction ({setting})\n\n{table}\n\n"
        f"Test: {n_test} held-out problems, greedy exact match (lm-eval via evaluate.py). "
        f"Mass: at the answer's first position, answers >= 10. Student vocab {vocab.n_s}, "
        f"teacher {vocab.n_q}; audit on the pruned W: 2-digit {coverage['digits_2']}, 3-digit "
        f"{coverage['digits_3']} in the common set. {minutes:.1f} min.\n"
    )
    write_text(os.path.join(out, "results.md"), md)
    summary = {
        "setting": setting,
        "settings": s,
        "rows": [r[0] for r in rows],
        "results": results,
        "audit": coverage,
        "vocab": {"student": vocab.n_s, "teacher": vocab.n_q},
        "minutes": minutes,
    }
    write_text(os.path.join(out, "results.json"), json.dumps(summary, indent=2))
    return md


if __name__ == "__main__":
    sys.exit(main())
