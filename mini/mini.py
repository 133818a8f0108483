"""The paper's results table at toy scale on CPU: every row through train.py, every number through
evaluate.py (lm-eval), three toy benchmarks and their average (MINI.md).

    python mini/mini.py --out out/mini                # make mini: every row, seeds 0, 1, 2
    python mini/mini.py --out out/mini --all          # and every measurement row beside it
    python mini/mini.py --out out/mini-quick --quick  # make mini-quick: the GOLD cliff (8 min)

The paper distils Llama-3.2-1B from teachers with other tokenizers on web text, where most positions
are ordinary words (their chunks are 1:1 across tokenizers, so P-KL carries the teacher's whole
distribution there) and numerals are rare but decide GSM8k (a digit-splitting teacher gives GOLD no
common numeral: METHOD.md 5.3, Proposition 1). The toy keeps that shape, with the REAL tokenizers:

  1. data: documents mostly of words, with numerals where arithmetic needs them. Facts: sums
     stated in words, then as a numeral ("48 + 4 = fifty-two, 52.") and what kind of thing each of
     200 invented words names ("A varan is a kind of tool."). Questions about them: word problems
     answered by a worked line ("Q: Ella had 48 stamps and got 4 more. How many now?\nA: 48 + 4 =
     fifty-two, 52, so Ella has 52 stamps.") and "Q: Tom has a varan. Is it an animal, a tool, a
     food or a vehicle?\nA: A varan is a kind of tool."; and what someone does with a thing, which
     its kind decides ("Tom took the varan and applauded how well it worked."). The teachers learn
     from a large clean corpus (two of them each without half the held-out things); the student
     from a smaller one where a quarter of the answers are wrong (as a strong model knows better
     than web text). A separate clean corpus makes the base student. The test asks about held-out
     sums and things, which the teachers' and student's corpora state but never ask about (the
     base corpus never names them).
  2. vocabularies: each model keeps the token ids the corpus uses, every all-digit token and every
     special token; the tokenizers are the real ones with ids renumbered (kept ids first). W is the
     real W over the renumbered ids, cut to the kept ids, rows renormalized; the audit of each pair
     says what it says of the full vocabularies (pkl for Qwen3, hkl for o200k).
  3. teachers, trained with train.py (CE): a digit-splitting one (Qwen3 architecture and tokenizer),
     a numeral-keeping one (Phi-3 architecture, o200k tokenizer: Phi-4-mini's), and a same-tokenizer
     one (Llama architecture and tokenizer); each must know its own sums (KNOWS_SUMS).
  4. students (Llama architecture and tokenizer): a base per seed (pre-trained on the base
     corpus), then one train.py run per row and seed, each continuing from its seed's base on the
     student corpus, its KD scale logged at every step.
  5. evaluate.py on four local lm-eval tasks: Arith (generative, exact match on the sum in words),
     Facts (multiple choice, acc), Cont (multiple choice, acc_norm), Numeral (the numeral after the
     words; outside Avg); and, where an Arith numeral is first written (", 52"), each model's
     probability on multi-digit numerals, on the sum's token and on the numerals led by the sum's
     first digit.
  6. results.md / results.json / results.png: mean ± sd over seeds, the paper's numbers beside each
     row, the KD scale's median and p90, the five claims the table tests, the library versions.

A finished stage is not redone: rerunning resumes, and adding a seed trains only that seed.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import transformers
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# Run from any directory: the repo's top-level modules (audit, cli, ...) are imported from its root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audit import audit
from build_projection import build_projection, hkl_pairs, load_projection, save_projection
from cli import ArgumentParser, atomic_write, check_output_dir, int_flag, one_line_errors
from data import collate
from tokens import load_tokenizer, token_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py, evaluate.py

# ----------------------------------------------------------------------------- settings
# Corpus sizes (documents) and train.py optimizer steps. A step is --batch-size packed windows of
# SEQ_LEN student tokens (about 7 documents per window). Small batches, many steps: a student starts
# to use a sum's operands only after some 500-1000 steps (on the design draw, a base of 500 steps
# of 12 windows wrote one fixed number after every "a + b ="; one of 1000 steps of 6, the same
# tokens, wrote 73% of its corpus's sums).
SETTINGS = {
    "full": dict(
        teacher_docs=60_000,
        student_docs=6_000,
        base_docs=15_000,
        test_items=200,  # Facts and Cont items; Arith: its ARITH_TEST held-out pairs at most
        teacher_steps=2000,  # on the design draw, 1,200 left the Llama teacher at 68% of its sums
        teacher_batch=8,
        base_steps=1500,
        student_steps=300,
        batch=6,
        seeds=[0, 1, 2],
    ),
    "quick": dict(
        teacher_docs=30_000,
        student_docs=6_000,
        base_docs=15_000,
        test_items=100,
        teacher_steps=1000,
        teacher_batch=6,
        base_steps=1000,
        student_steps=150,
        batch=6,
        seeds=[0],
    ),
    # a plumbing check for the tests: every stage, numbers meaningless
    "smoke": dict(
        teacher_docs=200,
        student_docs=60,
        base_docs=60,
        test_items=8,
        teacher_steps=2,
        teacher_batch=4,
        base_steps=2,
        student_steps=2,
        batch=4,
        seeds=[0],
    ),
}
NOISE = 0.25  # share of the student corpus's answers that are wrong
DATA_VERSION = 4  # of the document templates: data drawn by another version is not reused
SEQ_LEN = 128  # student tokens per packed window (the teachers get up to twice as many)
# The student (Llama architecture) and the three teachers (deeper). Vocabularies are pruned.
# Teachers have the students' shape (on the design draw a 6-layer teacher learned sums later than
# the 4-layer students: 20% of its own equations after 2,000 steps) and learn from 10x the data.
STUDENT_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4)
TEACHER_MODEL = STUDENT_MODEL
KNOWS_SUMS = 90.0  # % of its own corpus's equations a teacher must complete for claims 2 and 3
COMMON_MODEL = dict(
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2 * SEQ_LEN,
    tie_word_embeddings=True,
)
# Each teacher: (its architecture, its tokenizer's pkg: name). The student's tokenizer: Llama-3.2.
TEACHERS = {
    "qwen": ("qwen3", "pkg:qwen3"),  # digit-splitting: Qwen3-4B's tokenizer
    "o200k": ("phi3", "pkg:o200k"),  # numeral-keeping: Phi-4-mini's family
    "llama": ("llama", "pkg:llama-3.2"),  # same tokenizer as the student: plain KL
}
STUDENT_TOKENIZER = "pkg:llama-3.2"
# The table's rows: (label, teachers, train.py flags, the paper's row id in evaluate.PAPER_SCORES).
# Dynamic KD scaling and the repo's defaults unless the flags say otherwise.
SCALE_MAX = "10"  # the capped dynamic scale measured beside the default (METHOD.md 5.5)
PKL = ["--loss", "pkl", "--learn-projection"]
ROWS = [
    ("base", [], None, "base"),
    ("cpt", [], ["--loss", "ce"], "cpt"),
    ("kl-llama", ["llama"], ["--loss", "kl"], "kl-llama3b"),
    ("gold-qwen", ["qwen"], ["--loss", "gold"], "gold-qwen"),
    ("pkl-qwen", ["qwen"], PKL, "pkl-qwen"),
    ("pkl-qwen-static", ["qwen"], [*PKL, "--kd-scaling", "static"], None),
    ("gold-o200k", ["o200k"], ["--loss", "gold"], "gold-phi"),
    ("hkl-o200k", ["o200k"], ["--loss", "hkl"], "hkl-phi"),
    (
        "two-teachers",
        ["o200k", "llama"],
        ["--loss", "hkl", "--loss", "kl", "--teacher-weight", "0.8", "--teacher-weight", "0.2"],
        "two-teachers",
    ),
    # measurements beside the table (METHOD.md's choices), run when named with --row
    ("pkl-qwen-scale-max", ["qwen"], [*PKL, "--kd-scale-max", SCALE_MAX], None),
    ("hkl-o200k-scale-max", ["o200k"], ["--loss", "hkl", "--kd-scale-max", SCALE_MAX], None),
    ("hkl-o200k-static", ["o200k"], ["--loss", "hkl", "--kd-scaling", "static"], None),
    ("pkl-qwen-first", ["qwen"], [*PKL, "--chunk-merge", "first"], None),  # METHOD.md 5.1
    ("pkl-qwen-fixed", ["qwen"], ["--loss", "pkl"], None),
    ("pkl-qwen-floor-add", ["qwen"], [*PKL, "--pkl-floor", "add"], None),
    ("gold-qwen-static", ["qwen"], ["--loss", "gold", "--kd-scaling", "static"], None),
]
TABLE_ROWS = [r[0] for r in ROWS[:9]]
QUICK_ROWS = ["base", "cpt", "gold-qwen", "pkl-qwen"]
TASKS = {  # lm-eval task: (column, the paper's column it stands for)
    "xtoken_mini_arith": ("Arith", "GSM8k"),
    "xtoken_mini_facts": ("Facts", "MMLU"),
    "xtoken_mini_cont": ("Cont", "HellaSwag"),
    "xtoken_mini_numeral": ("Numeral", None),  # the numeral after the words: outside Avg
}
AVG_TASKS = ["xtoken_mini_arith", "xtoken_mini_facts", "xtoken_mini_cont"]

# ----------------------------------------------------------------------------- 1. data
NAMES = "Mia Tom Ana Ben Zoe Sam Lily Max Ella Leo Nora Jack Ruby Omar Ivy Noah Emma Luke Rosa Paul"
NAMES = NAMES.split()
ITEMS = (
    "apples books coins stamps shells cards pencils marbles stickers cookies beads stones".split()
)
GAINS = ["found {b} more", "bought {b} more", "got {b} more", "was given {b} more"]
# Arith: a two-digit number plus a one-digit one. The sums are facts the corpus states in words,
# then as a numeral ("48 + 4 = fifty-two, 52."); a word problem's worked line writes the same, so
# its answer is that fact, asked. The words are 1:1 chunks between the three tokenizers (tested): a
# teacher's knowledge of a sum passes through them, as on web text; the numeral after them is where
# a digit-splitting teacher gives GOLD no common token (Proposition 1) and P-KL a blur (MINI.md).
ARITH_A, ARITH_B = range(10, 60), range(2, 6)
ARITH_TEST = 100  # held-out (a, b) pairs: the teachers' and student's corpora state them, never ask
# Facts: invented things, each of one of four kinds. A statement says what kind; a question asks,
# and its answer says it again in the statement's words.
KINDS_OF_THINGS = ("animal", "tool", "food", "vehicle")
THINGS_PER_KIND = 50
FACT_TEST = 20  # held-out things per kind: the teachers' and student's corpora state, never ask
STATEMENTS = ["A {w} is a kind of {k}.", "{p} knows that a {w} is a kind of {k}."]
QUESTION = "Q: {p} has a {w}. Is it an animal, a tool, a food or a vehicle?\nA:"
ANSWER = " A {w} is a kind of {k}."
# Cont: what someone does with a thing follows from its kind. Asked about the held-out things, it
# needs their kind (stated only in the teachers' and student's corpora) and the deed that kind calls
# for. Each deed's first word is one Llama-3.2 token that o200k splits, and H-KL's widening pairs
# it with o200k's first piece (" abducted" ~ " abduct"): GOLD leaves it uncommon, H-KL matches it.
CONTEXTS = ["{p} took the {w} and", "{p} found a {w} and"]
DEEDS = {
    "animal": "abducted it from the zoo.",
    "tool": "applauded how well it worked.",
    "food": "angrily ate it for lunch.",
    "vehicle": "resembled a pilot in it.",
}
KINDS = ("arith", "numeral", "facts", "cont")  # the test sets (numeral: Arith's items)
# The share of each kind of document in every corpus (equations and statements: the facts).
MIX = {"problem": 0.1, "equation": 0.3, "statement": 0.25, "question": 0.15, "cont": 0.2}


def invented_things() -> dict[str, str]:
    """{thing: its kind}: 4 x THINGS_PER_KIND made-up words (consonant-vowel syllables), the same
    in every draw. Made up, so that what the models know of them comes from the corpus alone."""
    rng, things = random.Random(2605), {}
    while len(things) < len(KINDS_OF_THINGS) * THINGS_PER_KIND:
        word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(2))
        word += rng.choice("bdgklmnprt")
        if word not in things:
            things[word] = KINDS_OF_THINGS[len(things) % len(KINDS_OF_THINGS)]
    return things


THINGS = invented_things()
ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def in_words(n: int) -> str:
    """0 <= n < 100 in words: 52 -> "fifty-two"."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens - 2] + (f"-{ONES[ones]}" if ones else "")


def arith_item(rng: random.Random, a: int, b: int) -> dict:
    """A word problem; the answer follows a worked line, the final number last."""
    name, item, gain = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(GAINS).format(b=b)
    return {
        "kind": "arith",
        "prompt": f"Q: {name} had {a} {item} and {gain}. How many now?\nA:",
        "answer": a + b,
        "work": f" {a} + {b} = {{w}}, {{s}}, so {name} has {{s}} {item}.",
    }


def equation(a: int, b: int) -> dict:
    """A sum, stated."""
    return {"kind": "arith", "prompt": "", "answer": a + b, "work": f"{a} + {b} = {{w}}, {{s}}."}


def facts_item(rng: random.Random, word: str, question: bool) -> dict:
    """The question what kind of thing `word` is (the four kinds as choices), or a statement."""
    name = rng.choice(NAMES)
    if question:
        head, tail = QUESTION.format(p=name, w=word), ANSWER
    else:
        head, tail = rng.choice(STATEMENTS).split(" {k}")
        head, tail = head.format(p=name, w=word), " {k}" + tail
    return {
        "kind": "facts",
        "word": word,
        "question": question,
        "prompt": head,
        "choices": [tail.format(w=word, k=k) for k in KINDS_OF_THINGS],
        "label": KINDS_OF_THINGS.index(THINGS[word]),
    }


def cont_item(rng: random.Random, word: str, context: int) -> dict:
    """Someone takes a thing; the four deeds as continuations, the one its kind calls for right."""
    return {
        "kind": "cont",
        "prompt": CONTEXTS[context].format(p=rng.choice(NAMES), w=word),
        "choices": [f" {DEEDS[k]}" for k in KINDS_OF_THINGS],
        "label": KINDS_OF_THINGS.index(THINGS[word]),
    }


def document(item: dict, rng: random.Random, wrong: bool) -> str:
    """A training document: the item with its right answer, or (wrong) a wrong one."""
    if item["kind"] == "arith":
        s = item["answer"] + (rng.choice([-10, -2, -1, 1, 2, 10]) if wrong else 0)
        return item["prompt"] + item["work"].format(s=s, w=in_words(s))
    label = item["label"]
    if wrong:  # another kind of thing; another deed
        label = rng.choice([i for i in range(len(item["choices"])) if i != label])
    return item["prompt"] + item["choices"][label]


def held_out(rng: random.Random) -> tuple[dict, dict]:
    """({kind: test cases}, {kind: training cases}). Arith: ARITH_TEST (a, b) pairs; Facts and
    Cont: FACT_TEST things of each kind. The held-out sums and things are stated in the teachers'
    and student's corpora (not the base's) and never asked; no deed is done with a held-out
    thing."""
    arith = [(a, b) for a in ARITH_A for b in ARITH_B]
    rng.shuffle(arith)
    words = list(THINGS)
    rng.shuffle(words)
    of_kind = {k: [w for w in words if THINGS[w] == k] for k in KINDS_OF_THINGS}
    test_words = [w for k in KINDS_OF_THINGS for w in of_kind[k][:FACT_TEST]]
    train_words = [w for w in words if w not in test_words]
    test = {"arith": arith[:ARITH_TEST], "facts": test_words}
    train = {"arith": arith[ARITH_TEST:], "facts": train_words}
    return test, train


# Claim 5's complementary teachers: each of the two teachers that the two-teacher row combines never
# reads the statements of one half of the held-out things (the other half's for the other).
UNSTATED = {"o200k": 0, "llama": 1}  # the half, of the held-out things taken alternately
TEACHER_DATA = {"qwen": "teacher", "o200k": "teacher-o200k", "llama": "teacher-llama"}


def make_data(out: str, s: dict, seed: int = 0) -> dict[str, str]:
    """data/{teacher,teacher-o200k,teacher-llama,student,base}.jsonl (documents) and
    data/test_{kind}.jsonl (items). No training document asks a test item's question: Arith's
    held-out sums and Facts' held-out things are stated in the teachers' and student's corpora,
    never asked, and no deed is done with a held-out thing. The student corpus is the teacher's
    first documents, NOISE of them answered wrongly; the o200k and Llama teachers' corpora are the
    teacher's without the statements of half the held-out things each (UNSTATED); the base corpus
    is separate clean documents that never state a held-out fact."""
    names = ["student", "base", *TEACHER_DATA.values(), *(f"test_{k}" for k in KINDS)]
    paths = {k: os.path.join(out, "data", f"{k}.jsonl") for k in names}
    draw = {"data_seed": seed, "noise": NOISE, "version": DATA_VERSION}
    draw |= {k: v for k, v in s.items() if k.endswith(("_docs", "_items"))}
    draw_path = os.path.join(out, "data", "draw.json")  # written last: the data is complete
    if os.path.exists(draw_path):
        with open(draw_path) as f:
            found = json.load(f)
        if found != draw:
            raise ValueError(
                f"{out} holds data drawn with {found}, not {draw} (another --data-seed or "
                "setting): pick another --out"
            )
        return paths
    rng = random.Random(seed)
    test, train = held_out(rng)
    n = s["test_items"]
    arith = [arith_item(rng, a, b) for a, b in test["arith"][:n]]
    tests = {
        "arith": arith,
        "numeral": arith,
        "facts": [facts_item(rng, rng.choice(test["facts"]), True) for _ in range(n)],
        "cont": [cont_item(rng, rng.choice(test["facts"]), rng.randrange(2)) for _ in range(n)],
    }
    cont_pairs = [(w, c) for w in train["facts"] for c in range(len(CONTEXTS))]

    def train_item(base: bool) -> dict:
        """A document's item; the base corpus states only the training sums and things."""
        kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        if kind == "problem":
            return arith_item(rng, *rng.choice(train["arith"]))
        if kind == "equation":
            return equation(*rng.choice(train["arith"] if base else train["arith"] + test["arith"]))
        if kind == "statement":
            return facts_item(rng, rng.choice(train["facts"] if base else list(THINGS)), False)
        if kind == "question":
            return facts_item(rng, rng.choice(train["facts"]), True)
        return cont_item(rng, *rng.choice(cont_pairs))

    teacher_items = [train_item(False) for _ in range(s["teacher_docs"])]
    teacher = [document(i, rng, wrong=False) for i in teacher_items]
    student = [document(i, rng, rng.random() < NOISE) for i in teacher_items[: s["student_docs"]]]
    base = [document(train_item(True), rng, wrong=False) for _ in range(s["base_docs"])]
    docs = {"teacher": teacher, "student": student, "base": base}
    for key, half in UNSTATED.items():
        unstated = set(test["facts"][half::2])
        docs[TEACHER_DATA[key]] = [
            d for i, d in zip(teacher_items, teacher) if i.get("word") not in unstated
        ]
    for key, texts in docs.items():
        write_jsonl(paths[key], [{"text": d} for d in texts])
    for kind in KINDS:
        write_jsonl(paths[f"test_{kind}"], [test_record(i, kind) for i in tests[kind]])
    write_text(draw_path, json.dumps(draw))
    return paths


def test_record(item: dict, kind: str) -> dict:
    """What the lm-eval task reads: the prompt and, for Arith, the right answer and its text. An
    Arith prompt runs up to the worked line's "=" (" 48 + 4 ="): what is asked is the sum, not the
    copying of the operands out of the question, which 4-layer students did not learn here
    (measured on the design draw: each wrote one fixed problem's numbers whatever it was asked).
    Arith's answer is the sum in words (the knowledge); numeral's, the numeral written after them
    (a digit-splitting teacher's channel; outside Avg)."""
    if item["kind"] == "arith":
        s = item["answer"]
        text = item["prompt"] + item["work"].format(s=s, w=in_words(s))
        prompt = text[: text.index(" = ") + 2]
        answer = in_words(s) if kind == "arith" else str(s)
        return {"prompt": prompt, "answer": answer, "number": str(s), "text": text}
    return {k: item[k] for k in ("prompt", "choices", "label")}


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


def cut_pieces(texts: list[str], student_tok, context: int = 4) -> list[str]:
    """Packing cuts a document that does not fit a window at a student token boundary, and each
    side tokenizes its piece on its own: near a cut a teacher may use tokens that the whole text
    never does. Per boundary, the `context` student tokens before and after it, cut there."""
    pieces = set()
    for text, offsets in zip(
        texts, student_tok(texts, return_offsets_mapping=True)["offset_mapping"]
    ):
        ends = sorted({0, len(text), *(b for _, b in offsets if b)})
        for i, end in enumerate(ends[1:-1], 1):
            pieces.add(text[ends[max(0, i - context)] : end])
            pieces.add(text[end : ends[min(len(ends) - 1, i + context)]])
    return sorted(pieces)


def prune_tokenizer(name: str, texts: list[str], out_dir: str) -> tuple:
    """The real tokenizer with ids renumbered: the kept ids (used by `texts`, all-digit tokens,
    special tokens) first, in their original order, then the rest. Returns (tokenizer, kept).
    A model with `kept` output rows then never sees or emits an id outside them on this data
    (pass the cut_pieces too: packed windows cut documents)."""
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


@dataclass
class Vocabularies:
    """The pruned tokenizers {"llama", "qwen", "o200k"} with their kept sizes, each cross-tokenizer
    teacher's W file, and the audit of each pair on its pruned W."""

    toks: dict[str, PreTrainedTokenizerFast]
    kept: dict[str, int]
    w_paths: dict[str, str]  # "qwen", "o200k"
    audits: dict[str, dict]  # per pair: recommended loss, 2- and 3-digit numerals in C


def corpus_texts(paths: dict[str, str]) -> list[str]:
    """Every text a model meets: the training documents, and each test item with each answer."""
    texts = [d["text"] for key in ("teacher", "student", "base") for d in read_jsonl(paths[key])]
    tests = {k: read_jsonl(paths[f"test_{k}"]) for k in KINDS}
    texts += [d["text"] for d in tests["arith"]]
    texts += [d["prompt"] + c for k in ("facts", "cont") for d in tests[k] for c in d["choices"]]
    return texts


def prune_vocabularies(out: str, paths: dict[str, str]) -> Vocabularies:
    """Stage 2: the pruned tokenizers (over the corpus and the pieces packing cuts it into), each
    pair's pruned W (saved once) and its audit."""
    names = {"llama": STUDENT_TOKENIZER, **{k: name for k, (_, name) in TEACHERS.items()}}
    dirs = {key: os.path.join(out, "tok", key) for key in names}
    texts = []  # read only if a tokenizer is still to prune
    if not all(os.path.exists(os.path.join(d, "kept.json")) for d in dirs.values()):
        texts = corpus_texts(paths)
        texts += cut_pieces(texts, load_tokenizer(STUDENT_TOKENIZER))
    toks, kept = {}, {}
    for key, name in names.items():
        toks[key], kept[key] = prune_tokenizer(name, texts, dirs[key])
    w_paths, audits = {}, {}
    for key in ("qwen", "o200k"):
        w_paths[key] = os.path.join(out, f"W_llama_{key}.pt")
        if not os.path.exists(w_paths[key]):
            W = pruned_projection(toks["llama"], toks[key], kept["llama"], kept[key])
            save_projection(W, w_paths[key])
        W = load_projection(w_paths[key], toks["llama"], toks[key])
        report = audit(toks["llama"], W)
        cats = report["categories"]
        audits[key] = {"recommended": report["recommended"]} | {
            k: f"{cats[k]['common']}/{cats[k]['total']}" for k in ("digits_2", "digits_3")
        }
        # H-KL's common set beyond GOLD's exact pairs
        audits[key]["widened"] = len(hkl_pairs(W["W"], W["exact_pairs"])) - len(W["exact_pairs"])
        print(
            f"   llama -> {key}: vocabularies {kept['llama']} and {kept[key]} ids kept; audit: "
            f"2-digit {audits[key]['digits_2']}, 3-digit {audits[key]['digits_3']} numerals "
            f"in the common set, H-KL widens it by {audits[key]['widened']} pairs, recommends "
            f"{audits[key]['recommended']}",
            flush=True,
        )
    return Vocabularies(toks, kept, w_paths, audits)


# ----------------------------------------------------------------------------- 3-4. training
def init_model(arch: str, tok, vocab: int, size: dict, out_dir: str, seed: int) -> str:
    """A random model with `vocab` output rows, saved with its tokenizer (train.py loads both)."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    torch.manual_seed(seed)
    ids = {f"{r}_token_id": getattr(tok, f"{r}_token_id") for r in ("bos", "eos", "pad")}
    config = dict(COMMON_MODEL, **size, vocab_size=vocab)
    config |= {k: v for k, v in ids.items() if v is not None}
    config["head_dim"] = size["hidden_size"] // config["num_attention_heads"]
    classes = {
        "llama": (LlamaForCausalLM, LlamaConfig),
        "qwen3": (Qwen3ForCausalLM, Qwen3Config),
        "phi3": (Phi3ForCausalLM, Phi3Config),
    }
    model_class, config_class = classes[arch]
    if arch == "phi3":  # Phi-3 has no head_dim setting (hidden / heads) and its own pad id
        config.pop("head_dim")
        config.setdefault("pad_token_id", config.get("eos_token_id"))
    model = model_class(config_class(**config))
    tmp = out_dir + ".tmp"  # renamed when complete: a stopped run never leaves half a model
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def train_job(
    label: str,
    init: str,
    data: str,
    out_dir: str,
    steps: int,
    batch: int,
    seed: int,
    extra: list[str],
    lr: float = 3e-3,
    log_scale: bool = False,
) -> dict:
    """A train.py command on packed, shuffled windows; done when its last checkpoint exists."""
    flags = {
        "--student": init,
        "--data": data,
        "--out-dir": out_dir,
        "--seq-len": str(SEQ_LEN),
        "--batch-size": str(batch),
        "--grad-accum": "1",
        "--max-steps": str(steps),
        "--lr": str(lr),
        "--min-lr": str(lr / 10),
        "--warmup-steps": str(min(50, steps // 5)),
        "--weight-decay": "0.0",
        "--num-workers": "0",
        "--save-every": str(steps),
        "--keep-last": "1",
        "--log-every": "1" if log_scale else "50",  # every step's KD scale (MINI.md)
        "--seed": str(seed),
    }
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    cmd += [word for flag, value in flags.items() for word in (flag, value)]
    cmd += ["--overwrite", *extra]
    final = os.path.join(out_dir, f"step_{steps}")
    job = {"label": label, "cmd": cmd, "final": final}
    job["stamp_path"] = os.path.join(out_dir, "mini_job.json")  # written when it has finished
    return stamp(job, [])


def run_jobs(jobs: list[dict], parallel: int, log_dir: str) -> None:
    """Run train.py jobs `parallel` at a time, one thread each, skipping finished ones. A job starts
    once the jobs it continues from or distils from (its "after": their final checkpoints) are
    done; among those ready, the earliest in `jobs` first (the teachers, which most wait for)."""
    os.makedirs(log_dir, exist_ok=True)
    todo = [j for j in jobs if not is_done(j)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    running: list[tuple[dict, subprocess.Popen, float]] = []
    done, total, started_all = len(jobs) - len(todo), len(jobs), time.perf_counter()
    try:
        while todo or running:
            ready = [j for j in todo if all(os.path.exists(a) for a in j.get("after", []))]
            while ready and len(running) < parallel:
                job = ready.pop(0)
                todo.remove(job)
                with open(os.path.join(log_dir, slug(job["label"]) + ".log"), "w") as log:
                    proc = subprocess.Popen(
                        job["cmd"], stdout=log, stderr=subprocess.STDOUT, env=env
                    )
                running.append((job, proc, time.perf_counter()))
            if not running:  # nothing can start: a dependency is not in `jobs`
                raise SystemExit(f"error: {todo[0]['label']} waits for a run that is not planned")
            time.sleep(0.5)
            for item in list(running):
                job, proc, started = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log = os.path.join(log_dir, slug(job["label"]) + ".log")
                if proc.returncode or not os.path.exists(job["final"]):
                    raise SystemExit(f"error: {job['label']} failed; see {log}")
                write_text(job["stamp_path"], job["stamp"])
                done += 1
                now = time.perf_counter()
                print(
                    f"  [{done}/{total}] trained {job['label']} in {now - started:.0f} s "
                    f"({(now - started_all) / 60:.1f} min into this stage)",
                    flush=True,
                )
    finally:  # on a failure or ^C, stop the other runs too (a rerun starts them again)
        for _, proc, _ in running:
            proc.terminate()
            proc.wait()


def is_done(job: dict) -> bool:
    """Its final checkpoint exists and was made by this very command, from these very runs."""
    if not os.path.exists(job["final"]) or not os.path.exists(job["stamp_path"]):
        return False
    with open(job["stamp_path"]) as f:
        return f.read() == job["stamp"]


def stamp(job: dict, after: list[dict]) -> dict:
    """The job's command and the stamps of the runs it starts from or distils from (a retrained
    teacher or base retrains what depends on it). Returns the job, its "after" set."""
    job["after"] = [j["final"] for j in after]
    job["stamp"] = json.dumps({"cmd": job["cmd"][1:], "after": [j["stamp"] for j in after]})
    return job


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-").lower()


# ----------------------------------------------------------------------------- 5. measurement
TASK_YAML = {
    "xtoken_mini_arith": """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: [",", "."]
  do_sample: false
  max_gen_toks: 40
filter_list:
  - name: "number-in-words"
    filter:
      - function: "regex"
        regex_pattern: "([a-z]+(?:-[a-z]+)?)"
        group_select: 0
      - function: "take_first"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    "xtoken_mini_numeral": """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["."]
  do_sample: false
  max_gen_toks: 40
filter_list:
  - name: "last-number"
    filter:
      - function: "regex"
        regex_pattern: "(-?[0-9]+)"
        group_select: -1
      - function: "take_first"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    "xtoken_mini_facts": """output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "xtoken_mini_cont": """output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""",
}


def write_tasks(out: str, paths: dict[str, str]) -> str:
    """The three local lm-eval tasks over the test items (out/task/*.yaml)."""
    task_dir = os.path.join(out, "task")
    os.makedirs(task_dir, exist_ok=True)
    for task, body in TASK_YAML.items():
        data = os.path.abspath(paths["test_" + task.rsplit("_", 1)[1]])
        like = f" ({TASKS[task][1]}-like)" if TASKS[task][1] else ""
        head = f"""# Written by mini.py: the toy's held-out items{like}.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(data)}
test_split: test
"""
        path, text = (
            os.path.join(task_dir, f"{task}.yaml"),
            head + body + "metadata:\n  version: 1.0\n",
        )
        if os.path.exists(path) and open(path).read() != text:  # scores of another task definition
            for cached in glob.glob(os.path.join(out, "eval", "cache", f"{task}-*.json")):
                os.remove(cached)
        write_text(path, text)
    return task_dir


def evaluate_all(models: dict[str, str], task_dir: str, out: str) -> dict[str, dict[str, float]]:
    """evaluate.py over every model and task (cached per model x task): {label: {task: %}}."""
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--include-path", task_dir]
    cmd += ["--tasks", ",".join(TASKS), "--out-dir", os.path.join(out, "eval")]
    cmd += ["--batch-size", "64", "--num-fewshot", "0", "--devices", "cpu,cpu"]
    for label, path in models.items():  # evaluate.py labels: letters, digits, . _ -
        cmd += ["--model", f"{slug(label)}={path}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    env["OMP_NUM_THREADS"] = "1"  # pinned like the training runs: the numbers must not vary
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        why = (done.stdout[-1500:] + done.stderr[-1500:]).strip()
        raise SystemExit(f"error: evaluate.py failed (exit {done.returncode}):\n{why}")
    with open(os.path.join(out, "eval", "results.csv")) as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    return {label: {t: float(rows[slug(label)][t]) for t in TASKS} for label in models}


def sum_positions(tok, items: list[dict]) -> list[tuple[list[int], int, int]]:
    """Per Arith item: (its token ids, the position that predicts the first token of the sum where
    the worked line first writes it, " = 52", and that token's id)."""
    found = []
    for d in items:
        e = tok(d["text"], return_offsets_mapping=True)
        at = d["text"].index(", " + d["number"]) + 2  # the sum's first digit
        pos = next(i for i, (a, b) in enumerate(e["offset_mapping"]) if a <= at < b)
        found.append((e["input_ids"], pos - 1, e["input_ids"][pos]))
    return found


def right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token-id lists padded on the right, so positions are unchanged:
    train.py's own collate."""
    batch = collate([{"student_ids": ids} for ids in rows], {"student_ids": pad})
    return batch["student_ids"], batch["student_mask"]


def numeral_mass(model_dir: str, items: list[dict]) -> dict[str, float]:
    """Where each Arith item's sum is first written (sum_positions; all sums have 2 digits), the
    model's total probability on multi-digit numeral tokens, on the sum's token, and on every
    numeral token that starts with the sum's first digit (all that a digit-splitting teacher's
    first token says of the sum: "5" stands for 5, 50-59 and 500-599 alike)."""
    tok = load_tokenizer(model_dir)
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    pieces = token_bytes(tok)[:vocab]
    multi = torch.tensor([is_numeral(b) and len(b) > 1 for b in pieces])
    led_by = {
        d: torch.tensor([is_numeral(b) and b[:1] == d.encode() for b in pieces])
        for d in "0123456789"
    }
    masses, correct, first = [], [], []
    found = sum_positions(tok, items)
    for start in range(0, len(found), 64):
        batch = found[start : start + 64]
        ids, mask = right_padded([item_ids for item_ids, _, _ in batch], tok.pad_token_id or 0)
        with torch.no_grad():
            probs = model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)
        for row, (_, pos, target) in enumerate(batch, start):
            p = probs[row - start, pos]
            masses.append(float(p[multi].sum()))
            correct.append(float(p[target]))
            first.append(float(p[led_by[items[row]["number"][0]]].sum()))
    return {
        "multi_digit_mass": statistics.mean(masses),
        "p_correct": statistics.mean(correct),
        "p_first_digit": statistics.mean(first),
    }


EQUATIONS_CHECKED = 150


def knows_sums(model_dir: str, data: str) -> float:
    """% of the first EQUATIONS_CHECKED equations of the model's own training corpus whose whole
    answer (" fifty-two, 52") its greedy decoding writes after "a + b =": every token of it the
    argmax given the ones before (teacher-forced greedy is greedy while it is right)."""
    texts = [d["text"] for d in read_jsonl(data) if not d["text"].startswith("Q:")]
    texts = [t for t in texts if " + " in t][:EQUATIONS_CHECKED]
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = tok(texts, return_offsets_mapping=True)
    ids, mask = right_padded(enc["input_ids"], 0)
    with torch.no_grad():
        guess = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    right = 0
    for row, text in enumerate(texts):
        start, end = text.index(" = ") + 2, len(text) - 1  # the answer, without the final "."
        offsets = enc["offset_mapping"][row]
        span = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        right += all(int(guess[row, i - 1]) == int(ids[row, i]) for i in span)
    return 100.0 * right / len(texts)


def kd_scales(run_dir: str) -> list[float]:
    """The KD scale train.py applied at each logged step (metrics.jsonl's kd_scale)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["kd_scale"] for r in map(json.loads, f) if "kd_scale" in r]


def versions() -> dict[str, str]:
    """What changes the toy's numbers: the libraries, the commit, the threads (MINI.md)."""
    import importlib.metadata as meta

    found = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "tokenizers", "lm_eval", "numpy", "accelerate"):
        try:
            found[name] = meta.version(name.replace("_", "-"))
        except meta.PackageNotFoundError:
            found[name] = "absent"
    try:
        head = subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True
        )
        found["commit"] = head.stdout.strip() or "unknown"
    except OSError:
        found["commit"] = "unknown"
    found["threads"] = "1 per train.py run (OMP_NUM_THREADS=1); evaluate.py: 2 processes, 1 each"
    return found


# ----------------------------------------------------------------------------- 6. report
PROBE_KEYS = ("multi_digit_mass", "p_correct", "p_first_digit")  # numeral_mass's, in table order


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def per_seed(results: dict, row: str, seeds: list[int], key: str) -> list[float]:
    """One number per seed: a task's score, "Avg" (the mean of the three), or a probe value."""
    values = []
    for seed in seeds:
        r = results[f"{row} / seed {seed}"]
        values.append(statistics.mean(r[t] for t in AVG_TASKS) if key == "Avg" else r[key])
    return values


# The five claims of the paper's table: (text, [(variant, [(row A, relation, row B, column)])], the
# teacher that must know its sums). "above": A's mean exceeds B's by more than the seeds' spread;
# "at least": A is not below B by more than it; "below": A is under B by more than it. The spread:
# sqrt(sd_A^2 + sd_B^2) over seeds. Claim 1 is read on the numeral (where the paper's GSM8k cliff
# comes from), claim 2 under dynamic and static KD weights.
CLAIMS = [
    (
        "GOLD with the digit-splitting teacher falls below CE-only on the numeral (the cliff)",
        [("", [("gold-qwen", "below", "cpt", "xtoken_mini_numeral")])],
        None,
    ),
    (
        "P-KL with the same teacher is at least CE-only on Arith and above it on Avg",
        [
            (
                variant,
                [(row, "at least", "cpt", "xtoken_mini_arith"), (row, "above", "cpt", "Avg")],
            )
            for variant, row in (("dynamic", "pkl-qwen"), ("static", "pkl-qwen-static"))
        ],
        "qwen",
    ),
    (
        "Same-tokenizer KL is above CE-only on Avg",
        [("", [("kl-llama", "above", "cpt", "Avg")])],
        "llama",
    ),
    (
        "H-KL with the numeral-keeping teacher is at least GOLD with it on Avg",
        [("", [("hkl-o200k", "at least", "gold-o200k", "Avg")])],
        None,
    ),
    (
        "Two teachers are at least the best single teacher of the two on Avg",
        [("", [("two-teachers", "at least", "best single", "Avg")])],
        None,
    ),
]
SINGLE_TEACHER_ROWS = ["hkl-o200k", "kl-llama"]  # the two teachers two-teachers combines


def judge(results: dict, seeds: list[int], a: str, relation: str, b: str, key: str) -> tuple:
    """(holds, text) for one comparison."""
    if b == "best single":
        b = max(
            SINGLE_TEACHER_ROWS, key=lambda r: statistics.mean(per_seed(results, r, seeds, key))
        )
    va, vb = per_seed(results, a, seeds, key), per_seed(results, b, seeds, key)
    diff, spread = statistics.mean(va) - statistics.mean(vb), math.hypot(sd(va), sd(vb))
    holds = {"above": diff > spread, "at least": diff >= -spread, "below": diff < -spread}[relation]
    if not holds:
        relation = f"not {relation}"
    elif relation == "at least" and diff <= spread:
        relation = "at least (within the spread)"
    column = TASKS[key][0] if key in TASKS else key
    text = f"{a} {cell(va)} vs {b} {cell(vb)} on {column}, {relation}"
    text += f" (difference {diff:+.1f}, spread {spread:.1f})"
    return holds, text


def claim_lines(results: dict, rows: list[str], seeds: list[int], audits: dict) -> list[str]:
    """One line per claim: holds / does not hold / not testable / not measured, and its figures."""
    lines = []
    for n, (claim, variants, teacher) in enumerate(CLAIMS, 1):
        tests = [t for _, ts in variants for t in ts]
        needed = {r for t in tests for r in (t[0], t[2])} - {"best single"}
        if tests[0][2] == "best single":
            needed |= set(SINGLE_TEACHER_ROWS)
        if not needed <= set(rows):
            lines.append(f"{n}. {claim}: not measured (rows {sorted(needed - set(rows))} not run)")
            continue
        knows = results.get(f"teacher {teacher}", {}).get("knows_sums") if teacher else None
        if knows is not None and knows < KNOWS_SUMS:
            lines.append(
                f"{n}. {claim}: **not testable**: teacher {teacher} completes {knows:.0f}% of its "
                f"own corpus's equations (< {KNOWS_SUMS:.0f}%)"
            )
            continue
        if n == 4 and not audits.get("o200k", {}).get("widened"):
            lines.append(f"{n}. {claim}: **not tested**: H-KL's widening adds no pair here")
            continue
        parts = []
        for variant, group in variants:
            verdicts = [judge(results, seeds, *t) for t in group]
            word = "holds" if all(v[0] for v in verdicts) else "does not hold"
            if len(seeds) < 2:  # no spread to measure: a difference of any size decides
                word += " (one seed: no spread)"
            head = f"{variant}: " if variant else ""
            parts.append(f"{head}**{word}**; " + "; ".join(v[1] for v in verdicts))
        lines.append(f"{n}. {claim}: " + ". ".join(parts))
    return lines


def scale_cell(results: dict, row: str, seeds: list[int]) -> str:
    """The applied KD scale's median / 90th percentile over every step of every seed."""
    values = [v for seed in seeds for v in results[f"{row} / seed {seed}"].get("kd_scale", [])]
    if not values or row == "cpt":
        return "-"
    values.sort()
    p90 = values[min(len(values) - 1, math.ceil(0.9 * len(values)) - 1)]
    return f"{statistics.median(values):.3g} / {p90:.3g}"


def write_report(
    out: str,
    setting: str,
    s: dict,
    rows: list[str],
    results: dict,
    vocab: Vocabularies,
    minutes: float,
    parallel: int,
) -> str:
    """Stage 6: results.md (returned), results.json and results.png."""
    from evaluate import PAPER_COLUMNS, PAPER_SCORES, render_chart

    seeds = s["seeds"]
    paper_of = {r[0]: r[3] for r in ROWS}
    head = [*(TASKS[t][0] for t in AVG_TASKS), "Avg", "Numeral", "numeral mass"]
    head += ["p(sum) / p(first digit)", "KD scale median / p90"]
    paper_cols = [TASKS[t][1] for t in AVG_TASKS] + ["Avg"]
    lines = ["| row | " + " | ".join(head) + " | paper: " + " / ".join(paper_cols) + " |"]
    lines.append("|---" * (len(head) + 2) + "|")
    means = {}
    for row in rows:
        cells = [cell(per_seed(results, row, seeds, t)) for t in AVG_TASKS]
        cells.append(cell(per_seed(results, row, seeds, "Avg")))
        cells.append(cell(per_seed(results, row, seeds, "xtoken_mini_numeral")))
        probe = [statistics.mean(per_seed(results, row, seeds, k)) for k in PROBE_KEYS]
        cells += [f"{probe[0]:.2f}", f"{probe[1]:.2f} / {probe[2]:.2f}"]
        cells.append(scale_cell(results, row, seeds) if row != "base" else "-")
        paper = PAPER_SCORES.get(paper_of[row]) if paper_of[row] else None
        if paper:
            scores = dict(zip([*PAPER_COLUMNS, "Avg"], paper))
            cells.append(" / ".join(f"{scores[c]:.2f}" for c in paper_cols))
        else:
            cells.append("-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
        means[row] = {TASKS[t][0]: statistics.mean(per_seed(results, row, seeds, t)) for t in TASKS}
    knows = []
    for key in TEACHERS:
        r = results.get(f"teacher {key}")
        if r:
            scores = [f"{r[t]:.1f}" for t in AVG_TASKS]
            avg = statistics.mean(r[t] for t in AVG_TASKS)
            probe = [r[k] for k in PROBE_KEYS]
            lines.append(
                f"| teacher {key} | " + " | ".join(scores) + f" | {avg:.1f} | "
                f"{r['xtoken_mini_numeral']:.1f} | {probe[0]:.2f} | {probe[1]:.2f} / "
                f"{probe[2]:.2f} | - | |"
            )
            if "knows_sums" in r:
                knows.append(f"{key} {r['knows_sums']:.0f}%")
    claims = claim_lines(results, rows, seeds, vocab.audits)
    audits = "; ".join(
        f"llama -> {k}: {a['digits_2']} two-digit and {a['digits_3']} three-digit numerals in the "
        f"common set, H-KL's widening adds {a['widened']} pairs, audit recommends "
        f"{a['recommended']}"
        for k, a in vocab.audits.items()
    )
    found = versions()
    md = (
        f"# Mini reproduction ({setting}, seeds {','.join(map(str, seeds))})\n\n"
        + "\n".join(lines)
        + "\n\nMean ± sd over seeds, percent. Arith: exact match on the sum in words (generative); "
        "Facts: acc; Cont: acc_norm (lm-eval through evaluate.py, 0-shot); Avg: their mean. "
        "Numeral: exact match on the numeral written after the words (outside Avg). Where the "
        'worked line writes the numeral (", 52"), the model\'s probability on multi-digit '
        "numerals (numeral mass), on the sum's token (p(sum)) and on every numeral led by the "
        "sum's first digit (p(first digit); a Qwen3 teacher's first digit says no more). KD "
        "scale: the applied scale over every step and seed. The paper's row (Llama-3.2-1B, "
        "3-shot) is its GSM8k / MMLU / HellaSwag / five-benchmark Avg. Teachers complete "
        f"{', '.join(knows) or '-'} of their own corpus's first {EQUATIONS_CHECKED} equations "
        f"(claims 2 and 3 need {KNOWS_SUMS:.0f}%). Pruned W: {audits}. {minutes:.1f} min, "
        f"{parallel} train.py runs at a time.\n\nVersions: "
        + ", ".join(f"{k} {v}" for k, v in found.items())
        + ".\n\n## Claims\n\n"
        + "\n".join(claims)
        + "\n"
    )
    write_text(os.path.join(out, "results.md"), md)
    summary = {
        "setting": setting,
        "settings": s,
        "parallel": parallel,
        "versions": found,
        "rows": rows,
        "results": results,
        "audits": vocab.audits,
        "vocab": vocab.kept,
        "claims": claims,
        "minutes": minutes,
    }
    write_text(os.path.join(out, "results.json"), json.dumps(summary, indent=2))
    chart = render_chart(means, [TASKS[t][0] for t in TASKS], "toy table: mean over seeds")
    if chart:
        atomic_write(os.path.join(out, "results.png"), lambda f: f.write(chart))
    return md


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
    size.add_argument("--quick", action="store_true", help=f"rows {QUICK_ROWS}, 1 seed, shorter")
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
        help=f"a row, repeatable (default: the table's; the measurements {MEASUREMENT_ROWS} run "
        "when named or with --all)",
    )
    p.add_argument("--all", action="store_true", help="the table's rows and every measurement")
    p.add_argument(
        "--seeds", type=parse_seeds, help="comma-separated student seeds (default: the setting's)"
    )
    p.add_argument(
        "--data-seed",
        type=int_flag(0),
        default=0,
        help="the draw of the corpora and the held-out items (0: the table's; the toy was "
        "designed on draw 1, never on the table's test items)",
    )
    args = p.parse_args(argv)
    return one_line_errors(lambda: _run(args))


MEASUREMENT_ROWS = [r[0] for r in ROWS if r[0] not in TABLE_ROWS]


def chosen_setting(args: argparse.Namespace) -> tuple[str, dict, list[str]]:
    """(the setting's name, its sizes with --seeds applied, the rows to run in table order); a
    ValueError for an unknown --row."""
    setting = "smoke" if args.smoke else "quick" if args.quick else "full"
    s = SETTINGS[setting]
    wanted = args.row or (QUICK_ROWS if setting != "full" else TABLE_ROWS)
    if args.all:
        wanted = [*wanted, *TABLE_ROWS, *MEASUREMENT_ROWS]
    unknown = sorted(set(wanted) - {r[0] for r in ROWS})
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {[r[0] for r in ROWS]}")
    if args.seeds is not None:
        s = dict(s, seeds=args.seeds)
    return setting, s, [r[0] for r in ROWS if r[0] in wanted]


def _run(args: argparse.Namespace) -> int:
    """The reproduction, stage by stage; each stage skips what an earlier run finished."""
    setting, s, rows = chosen_setting(args)
    check_output_dir(args.out, "--out")  # before any work
    out, started = args.out, time.perf_counter()
    transformers.utils.logging.disable_progress_bar()  # saving and loading the toy models
    print(f"mini.py ({setting}): rows {', '.join(rows)}; seeds {s['seeds']}", flush=True)

    print("1. data", flush=True)
    paths = make_data(out, s, args.data_seed)
    tests = {k: read_jsonl(paths[f"test_{k}"]) for k in KINDS}

    print("2. pruned vocabularies, W and the audits", flush=True)
    vocab = prune_vocabularies(out, paths)

    spec = {r[0]: r for r in ROWS}
    needed = [t for t in TEACHERS if any(t in spec[r][1] for r in rows)]
    teachers = teacher_jobs(out, s, needed, vocab, paths)
    bases = base_jobs(out, s, vocab, paths["base"])
    students = student_jobs(out, s, rows, spec, vocab, paths["student"], teachers, bases)
    print(
        f"3-4. train.py: teachers ({', '.join(needed) or 'none'}), a base student per seed, then "
        f"{len(students)} student runs; {args.parallel} at a time",
        flush=True,
    )
    # the first teacher beside the bases and the CE-only students, then the other teachers first
    no_teacher = [j for j in students if len(j["after"]) == 1]
    jobs = [*list(teachers.values())[:1], *bases.values(), *no_teacher]
    jobs += list(teachers.values())[1:] + [j for j in students if j not in no_teacher]
    run_jobs(jobs, args.parallel, os.path.join(out, "logs"))

    print("5. evaluate.py (4 tasks), the numeral mass and the teachers' sums", flush=True)
    models = {f"teacher {k}": job["final"] for k, job in teachers.items()}
    models |= {f"base / seed {seed}": job["final"] for seed, job in bases.items() if "base" in rows}
    models |= {job["label"]: job["final"] for job in students}
    scores = evaluate_all(models, write_tasks(out, paths), out)
    results = {k: scores[k] | numeral_mass(path, tests["arith"]) for k, path in models.items()}
    for key, job in teachers.items():  # claims 2 and 3 need teachers that know their sums
        results[f"teacher {key}"]["knows_sums"] = knows_sums(job["final"], paths[TEACHER_DATA[key]])
    for job in students:  # the applied KD scale at every step
        results[job["label"]]["kd_scale"] = kd_scales(os.path.dirname(job["final"]))

    print("6. results", flush=True)
    minutes = (time.perf_counter() - started) / 60
    print(write_report(out, setting, s, rows, results, vocab, minutes, args.parallel))
    return 0


def teacher_jobs(out: str, s: dict, needed: list[str], vocab: Vocabularies, paths: dict) -> dict:
    """{key: its train.py job} for the teachers the rows need, their models initialized."""
    jobs = {}
    for key in needed:
        arch = TEACHERS[key][0]
        init_dir = os.path.join(out, "init", f"teacher-{key}")
        init = init_model(arch, vocab.toks[key], vocab.kept[key], TEACHER_MODEL, init_dir, 100)
        run_dir = os.path.join(out, "runs", f"teacher-{key}")
        jobs[key] = train_job(
            f"teacher {key}",
            init,
            paths[TEACHER_DATA[key]],
            run_dir,
            s["teacher_steps"],
            s["teacher_batch"],
            100,
            ["--loss", "ce"],
        )
    return jobs


def base_jobs(out: str, s: dict, vocab: Vocabularies, data: str) -> dict[int, dict]:
    """{seed: the base student's job}: a random init, then pre-training on the base corpus."""
    jobs = {}
    for seed in s["seeds"]:
        init_dir = os.path.join(out, "init", f"student-{seed}")
        init = init_model(
            "llama", vocab.toks["llama"], vocab.kept["llama"], STUDENT_MODEL, init_dir, seed
        )
        run_dir = os.path.join(out, "runs", f"base-seed{seed}")
        jobs[seed] = train_job(
            f"base / seed {seed}",
            init,
            data,
            run_dir,
            s["base_steps"],
            s["batch"],
            seed,
            ["--loss", "ce"],
        )
    return jobs


def student_jobs(out, s, rows, spec, vocab, data, teachers, bases) -> list[dict]:
    """One train.py job per row (but base) and seed, each from its seed's base student."""
    jobs = []
    for seed in s["seeds"]:
        for row in rows:
            _, row_teachers, flags, _ = spec[row]
            if flags is None:  # base: evaluated as trained
                continue
            extra = []
            for key in row_teachers:
                extra += ["--teacher", teachers[key]["final"]]
            for key in row_teachers:
                if key in vocab.w_paths:
                    extra += ["--projection", vocab.w_paths[key]]
            run_dir = os.path.join(out, "runs", f"{row}-seed{seed}")
            job = train_job(
                f"{row} / seed {seed}",
                bases[seed]["final"],
                data,
                run_dir,
                s["student_steps"],
                s["batch"],
                seed,
                extra + flags,
                log_scale=True,
            )
            jobs.append(stamp(job, [bases[seed], *(teachers[k] for k in row_teachers)]))
    return jobs


if __name__ == "__main__":
    sys.exit(main())
