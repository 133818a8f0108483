"""Benchmark: chat data (chat.py) against plain text, on the same texts.

Corpus, built offline from Debian's package descriptions: the installed packages' full records
(/var/lib/dpkg/status: a one-line summary and a long description) and a seeded sample of the
archive's (`apt-cache dumpavail`: the summary alone). Each package is a conversation: a system
prompt in 60% (empty in a sixth of those), the user asking what the package is (one of several
phrasings), the assistant answering with its description; where the record names dependencies, a
second exchange about its section and dependencies. Written to a jsonl in a temp dir; the plain
corpus holds the same conversations' contents joined by blank lines, one document each.

Student Llama-3.2 in Llama-3.2-Instruct's template (tests/chat_templates/llama-3.2.jinja),
teacher Qwen3 in its own shipped template, --seq-len 2,048, packed, shuffled as train.py does.
  masked       share of the student positions that are no CE target: template tokens (role
               headers, the Llama system header's dates, Qwen3's empty thinking block on the teacher
               side), and the system prompts' and users' contents; the teacher's positions in no
               chunk the same way.
  throughput   the data pipeline as a DataLoader worker runs it (data.AlignedWindows, one
               process): conversations and student positions per second over the whole corpus,
               chat against plain, the fastest of --repeats alternating passes; and the share of
               a first chat pass (fresh caches) spent rendering the templates (chat.Chat._shape:
               each side's template with sentinels, split, tokenized; cached per tuple of roles),
               from cProfile.
  run          train.py --preset tiny on the chat corpus (P-KL, Qwen3 teacher), --steps steps of
               2 x --run-seq-len (README's chat run): its first and last metrics.jsonl lines and
               curves.png (--curves PATH copies it); --steps 0: none.

    python bench/bench_chat.py [--packages 2000] [--repeats 3] [--steps 20] [--json PATH|-]
        [--corpus debian_qa.jsonl] [--curves curves.png]
    python bench/bench_chat.py --quick      # 300 packages, 1 pass, 3 steps: a smoke test
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import chat  # noqa: E402
from data import AlignedWindows  # noqa: E402
from tokens import load_tokenizer, token_bytes  # noqa: E402

TEMPLATE = os.path.join(ROOT, "tests", "chat_templates", "llama-3.2.jinja")
ASK = [
    "What is the Debian package {p}?",
    "What does {p} do?",
    "Tell me about {p}.",
    "I found {p} in the archive. What is it for?",
]
SYSTEM = ["You are a helpful assistant who knows the Debian archive.", "Answer briefly.", ""]


def stanzas(text: str) -> list[dict]:
    """Package records (dpkg's status or apt's Packages format) as {field: value}."""
    records = []
    for block in text.split("\n\n"):
        fields, key = {}, None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line[1:]
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if "Package" in fields and "Description" in fields:
            records.append(fields)
    return records


def answer(record: dict) -> str:
    """The description as prose: the summary, then the long description's paragraphs."""
    summary, _, long = record["Description"].partition("\n")
    paragraphs = [p.strip() for p in long.replace("\n.\n", "\n\n").split("\n\n") if p.strip()]
    paragraphs = [p.replace("\n", " ") if "  " not in p else p for p in paragraphs]
    return "\n\n".join([f"{record['Package']}: {summary}.", *paragraphs])


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """One conversation per package: every installed one, then a seeded sample of the archive."""
    with open("/var/lib/dpkg/status", encoding="utf-8", errors="replace") as f:
        installed = stanzas(f.read())
    archive = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True).stdout
    rng = random.Random(seed)
    others = stanzas(archive)
    rng.shuffle(others)
    seen, convs = set(), []
    for record in installed + others:
        if len(convs) == n or record["Package"] in seen:
            continue
        seen.add(record["Package"])
        messages = []
        if rng.random() < 0.6:
            messages.append({"role": "system", "content": rng.choice(SYSTEM)})
        ask = rng.choice(ASK).format(p=record["Package"])
        messages += [
            {"role": "user", "content": ask},
            {"role": "assistant", "content": answer(record)},
        ]
        if record.get("Depends"):
            messages.append(
                {"role": "user", "content": "Which section is it in, and what does it need?"}
            )
            messages.append(
                {
                    "role": "assistant",
                    "content": f"It is in section {record.get('Section', 'misc')}. It depends on "
                    f"{record['Depends']}.",
                }
            )
        convs.append(messages)
    return convs


def write_corpora(convs: list[list[dict]], out_dir: str) -> tuple[str, str]:
    chat_path, plain_path = (
        os.path.join(out_dir, "chat.jsonl"),
        os.path.join(out_dir, "plain.jsonl"),
    )
    with open(chat_path, "w", encoding="utf-8") as c, open(plain_path, "w", encoding="utf-8") as p:
        for messages in convs:
            c.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            text = "\n\n".join(m["content"] for m in messages if m["content"])
            p.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return chat_path, plain_path


def dataset(path: str, student, teacher, seq_len: int) -> AlignedWindows:
    windows = AlignedWindows(path, student, [teacher], seq_len, seed=0)
    windows.chat = chat.setup(windows, TEMPLATE)
    return windows


def one_pass(windows: AlignedWindows) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    items = list(windows)
    return time.perf_counter() - started, items


def masked(items: list[dict], student, teacher) -> dict:
    """Shares of positions: student targets, template tokens, other contents; teacher in chunks."""
    s_added = np.array([b is None for b in token_bytes(student)])
    positions = sum(len(it["student_ids"]) for it in items)
    targets = sum(int((it["labels"] != -100).sum()) for it in items)
    template = sum(int(s_added[it["student_ids"]].sum()) for it in items)  # specials only
    t_positions = sum(len(it["teacher_ids_0"]) for it in items)
    t_chunked = sum(int((it["teacher_chunk_0"] >= 0).sum()) for it in items)
    return {
        "student_positions": positions,
        "student_targets": targets,
        "student_masked_share": 1 - targets / positions,
        "student_special_token_share": template / positions,
        "teacher_positions": t_positions,
        "teacher_in_no_chunk_share": 1 - t_chunked / t_positions,
    }


def rendering_share(path: str, student, teacher, seq_len: int) -> float:
    """The share of a first chat pass (fresh caches) spent in rendering: chat.Chat._shape (each
    side's template with sentinels, split, tokenized, as segments), cProfile's cumulative time."""
    windows = dataset(path, student, teacher, seq_len)
    profile = cProfile.Profile()
    profile.enable()
    list(windows)
    profile.disable()
    stats = pstats.Stats(profile)
    shape = sum(v[3] for k, v in stats.stats.items() if k[2] == "_shape" and "chat.py" in k[0])
    return shape / stats.total_tt


def tiny_run(corpus: str, steps: int, seq_len: int, out_dir: str, curves: str | None) -> list:
    out = os.path.join(out_dir, "run")
    argv = [
        *("--preset", "tiny", "--data", corpus, "--student-chat-template", TEMPLATE),
        *("--loss", "pkl", "--max-steps", str(steps), "--seq-len", str(seq_len)),
        *("--save-every", "0", "--num-workers", "1", "--out-dir", out),
        *("--projection-cache", os.path.join(out_dir, "w_cache")),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *argv]
    print("run: python train.py " + " ".join(argv[:-2]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"error: train.py failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    if curves:
        shutil.copy(os.path.join(out, "curves.png"), curves)
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packages", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--run-seq-len", type=int, default=256)
    p.add_argument("--curves", help="copy the run's curves.png here")
    p.add_argument("--corpus", help="also write the chat corpus (jsonl) here")
    p.add_argument("--json", help="write the figures here (- for stdout)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.packages, args.repeats, args.steps = 300, 1, 3
    student, teacher = load_tokenizer("pkg:llama-3.2"), load_tokenizer("pkg:qwen3")
    result = {"packages": args.packages, "seq_len": args.seq_len}
    with tempfile.TemporaryDirectory() as tmp:
        convs = conversations(args.packages)
        chat_path, plain_path = write_corpora(convs, tmp)
        if args.corpus:
            shutil.copy(chat_path, args.corpus)
        chars = sum(len(m["content"]) for c in convs for m in c)
        print(f"corpus: {len(convs)} conversations, {chars / 1e6:.2f}M characters of contents")
        chat_data = dataset(chat_path, student, teacher, args.seq_len)
        plain_data = dataset(plain_path, student, teacher, args.seq_len)
        assert plain_data.chat is None and chat_data.chat is not None
        one_pass(chat_data), one_pass(plain_data)  # warm: the token tables, the layout cache
        times = {"chat": [], "plain": []}
        for _ in range(args.repeats):  # alternating: a busy spell slows both
            for name, windows in (("chat", chat_data), ("plain", plain_data)):
                seconds, items = one_pass(windows)
                times[name].append(seconds)
                if name == "chat":
                    chat_items = items
                else:
                    plain_items = items
        best = {k: min(v) for k, v in times.items()}
        result |= masked(chat_items, student, teacher)
        result |= {
            "chat_s": best["chat"],
            "plain_s": best["plain"],
            "conversations_per_s_chat": len(convs) / best["chat"],
            "documents_per_s_plain": len(convs) / best["plain"],
            "chat_over_plain_time": best["chat"] / best["plain"],
            "rendering_share_of_chat_pass": rendering_share(
                chat_path, student, teacher, args.seq_len
            ),
            "windows_chat": len(chat_items),
            "windows_plain": len(plain_items),
            "positions_per_s_chat": sum(len(i["student_ids"]) for i in chat_items) / best["chat"],
            "positions_per_s_plain": sum(len(i["student_ids"]) for i in plain_items)
            / best["plain"],
        }
        print(
            f"masked: {result['student_masked_share']:.1%} of the student's positions are no "
            f"target ({result['student_special_token_share']:.1%} special tokens); "
            f"{result['teacher_in_no_chunk_share']:.1%} of the teacher's in no chunk"
        )
        print(
            f"throughput: chat {result['conversations_per_s_chat']:.0f} conversations/s, plain "
            f"{result['documents_per_s_plain']:.0f} documents/s "
            f"(x{result['chat_over_plain_time']:.2f} the time); rendering "
            f"{result['rendering_share_of_chat_pass']:.2%} of a first chat pass; per student "
            f"position: chat {result['positions_per_s_chat']:,.0f}/s, plain "
            f"{result['positions_per_s_plain']:,.0f}/s ({result['windows_chat']} and "
            f"{result['windows_plain']} windows)"
        )
        if args.steps:  # --steps 0: no run
            records = tiny_run(chat_path, args.steps, args.run_seq_len, tmp, args.curves)
            result["run_first"], result["run_last"] = records[0], records[-1]
            print(f"metrics.jsonl, first and last:\n{json.dumps(records[0])}")
            print(json.dumps(records[-1]))
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
