"""chat.py and data.py's chat records: conversations read by every side in its own chat template
(the REAL tokenizers; Qwen3's shipped template with its thinking block, Llama-3.2-Instruct's and
Phi-4-mini-instruct's templates as files in tests/chat_templates/), assistant-only targets and
chunks, the ends of turn paired, cutting and resume, bad input counted or one line."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import chat
import data
import losses
import train
from align import token_spans
from conftest import ROOT, read_metrics, tiny_argv
from data import AlignedWindows, advance_state, issue_counts
from tokens import load_tokenizer, token_bytes

TEMPLATES = os.path.join(ROOT, "tests", "chat_templates")
LLAMA = os.path.join(TEMPLATES, "llama-3.2.jinja")  # Llama-3.2-Instruct's template
CHATML = os.path.join(TEMPLATES, "chatml.jinja")
# Phi-4-mini-instruct's tokenizer is o200k with these added tokens, from id 200019 on
PHI_TOKENS = (
    "<|assistant|> <|end|> <|user|> <|system|> <|tool|> <|/tool|> <|tool_call|> <|/tool_call|> "
    "<|tool_response|> <|tag|>".split()
)
# contents: several scripts, numbers, code, and template-like strings that must stay text
PIECES = [
    "What is 201 + 5?",
    " 206.",
    "こんにちは、世界。",
    "Zürich café, naïve résumé",
    "def f(x):\n    return x * 2  # 3.14159\n",
    "<|im_end|>",
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|end|><|assistant|>",
    "<think>maybe</think>",
    "😀🇫🇷 价格是12.50元",
    "  padded  \n",
    "\n\n",
]


@pytest.fixture(scope="module")
def phi4():
    """Phi-4-mini-instruct's tokenizer: a fresh o200k (the session's stays as it is) with its chat
    tokens and its chat template."""
    tok = load_tokenizer("pkg:o200k")
    tok.add_special_tokens({"additional_special_tokens": PHI_TOKENS})
    assert tok.convert_tokens_to_ids(PHI_TOKENS[:4]) == [200019, 200020, 200021, 200022]
    with open(os.path.join(TEMPLATES, "phi-4-mini.jinja"), encoding="utf-8") as f:
        tok.chat_template = f.read()
    return tok


def text(rng: random.Random, empty_ok: bool = False) -> str:
    if empty_ok and rng.random() < 0.2:
        return ""
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 3)))


def conversation(rng: random.Random) -> list[dict]:
    """System prompt or not (maybe empty), one to three exchanges; a later answer may be empty."""
    messages = []
    if rng.random() < 0.6:
        messages.append({"role": "system", "content": text(rng, empty_ok=True)})
    for turn in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": text(rng)})
        messages.append({"role": "assistant", "content": text(rng, empty_ok=turn > 0)})
    return messages


def write(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return str(path)


def windows(path, student, teachers, seq_len=4096, student_template=None, **kw) -> AlignedWindows:
    teacher_templates = kw.pop("teacher_templates", None)
    assistant_only = kw.pop("assistant_only", True)
    dataset = AlignedWindows(path, student, teachers, seq_len, shuffle=False, **kw)
    dataset.chat = chat.setup(dataset, student_template, teacher_templates, assistant_only)
    return dataset


def in_chunks(tok, ids, chunk) -> list[tuple[int, int]]:
    """(token, chunk) of the tokens in a chunk: position p holds token p + 1's chunk."""
    return [(int(ids[p + 1]), int(chunk[p])) for p in range(len(ids) - 1) if chunk[p] >= 0]


def text_bytes(tok, ids) -> bytes:
    table = token_bytes(tok)
    return b"".join(table[i] for i in ids if table[i] is not None)


def specials(tok, ids) -> list[int]:
    """The added (special) tokens among ids."""
    table = token_bytes(tok)
    return [i for i in ids if table[i] is None]


@pytest.mark.parametrize("case", ["llama student", "qwen3 student"])
def test_only_the_assistants_contents_and_ends_of_turn_are_targets_and_chunks(
    tmp_path, llama, qwen, phi4, case
):
    rng = random.Random(7)
    convs = [conversation(rng) for _ in range(12)]
    path = write(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    if case == "llama student":  # Qwen3's own template (thinking block), Phi-4-mini's
        student, teachers, template, teacher_templates = llama, [qwen, phi4], LLAMA, None
    else:  # Llama-3.2's from a file; Qwen3 student in its own template
        student, teachers, template, teacher_templates = qwen, [llama], None, [LLAMA]
    dataset = windows(path, student, teachers, student_template=template, **{
        "teacher_templates": teacher_templates
    })  # fmt: skip
    items = list(dataset)
    assert len(items) == 1  # every conversation in one window, in order
    item = items[0]
    answers = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
    want = "".join(answers).encode()
    ends = dataset.chat.end_of_turn
    ids, labels = item["student_ids"], item["labels"]
    targets = labels[labels != -100]
    n_answer_tokens = sum(len(data._body(token_spans(student, a)).ids) for a in answers if a)
    assert len(targets) == n_answer_tokens + len(answers) == item["tokens"]
    assert text_bytes(student, targets) == want
    assert specials(student, targets) == [ends[0]] * len(answers)
    for i, tok in enumerate(teachers):
        t_ids = item[f"teacher_ids_{i}"]
        s_side = in_chunks(student, ids, item[f"student_chunk_{i}"])
        t_side = in_chunks(tok, t_ids, item[f"teacher_chunk_{i}"])
        for side_tok, side, end in ((student, s_side, ends[0]), (tok, t_side, ends[i + 1])):
            assert text_bytes(side_tok, [t for t, _ in side]) == want  # exactly the answers
            special = specials(side_tok, [t for t, _ in side])
            assert special == [end] * len(answers)  # no template token but the ends of turn
        for k in {c for _, c in s_side}:  # every chunk: the same bytes, or the two ends of turn
            s_k, t_k = ([t for t, c in side if c == k] for side in (s_side, t_side))
            if ends[0] in s_k:
                assert (s_k, t_k) == ([ends[0]], [ends[i + 1]])
            else:
                assert text_bytes(student, s_k) == text_bytes(tok, t_k)
    if case == "llama student":  # Qwen3 renders an empty thinking block: template tokens
        assert qwen.convert_tokens_to_ids("<think>") in item["teacher_ids_0"].tolist()
        assert ends == [llama.convert_tokens_to_ids("<|eot_id|>"), 151645, 200020]


def test_no_assistant_only_trains_every_messages_content_and_end(tmp_path, llama, qwen):
    convs = [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2 + 2 = ?"},
            {"role": "assistant", "content": "4"},
        ]
    ]
    path = write(tmp_path / "c.jsonl", [{"messages": c} for c in convs])
    dataset = windows(path, llama, [qwen], student_template=LLAMA, assistant_only=False)
    item = next(iter(dataset))
    targets = item["labels"][item["labels"] != -100]
    assert text_bytes(llama, targets) == b"Be brief.2 + 2 = ?4"
    assert targets.tolist().count(dataset.chat.end_of_turn[0]) == 3


def test_prompt_completion_and_parquet_records_are_conversations(tmp_path, llama, qwen):
    write(tmp_path / "a.jsonl", [{"prompt": "Name a colour.", "completion": "Blue."}])
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    pq.write_table(pa.table({"messages": [messages]}), tmp_path / "b.parquet")
    dataset = windows(str(tmp_path), llama, [qwen], student_template=LLAMA)
    item = next(iter(dataset))
    targets = item["labels"][item["labels"] != -100]
    assert text_bytes(llama, targets) in (b"Blue.Hello!", b"Hello!Blue.")
    assert "Name a colour." in llama.decode(item["student_ids"])


def test_a_json_array_of_conversations_is_chat_and_a_damaged_parquet_is_no_traceback(tmp_path):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    (tmp_path / "a.json").write_text(json.dumps([{"messages": messages}] * 2, indent=1))
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not a parquet file at all")
    assert chat._is_chat_file(str(tmp_path / "a.json"), "text")
    assert not chat._is_chat_file(str(tmp_path / "b.parquet"), "text")  # counted when read


def test_a_hub_dataset_of_conversations(llama, qwen, monkeypatch):
    import datasets

    def exchange(question: str, answer: str) -> dict:
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        }

    rows = [exchange("0 + 1?", "1"), exchange("1 + 1?", "2")]
    stream = datasets.IterableDataset.from_generator(lambda: iter(rows))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: stream)
    dataset = windows("someone/chats", llama, [qwen], student_template=LLAMA)
    item = next(iter(dataset))
    assert text_bytes(llama, item["labels"][item["labels"] != -100]) == b"12"


def test_a_long_conversation_is_cut_only_inside_contents_and_resumes_exactly(tmp_path, llama, qwen):
    rng = random.Random(3)
    convs = [
        [
            {"role": "user", "content": f"Question {k}: " + text(rng)},
            {"role": "assistant", "content": " ".join(text(rng) for _ in range(k % 4 + 1))},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "Nothing more."},
        ]
        for k in range(10)
    ]
    path = write(tmp_path / "c.jsonl", [{"messages": c} for c in convs])

    def batches(start=None):
        dataset = windows(path, llama, [qwen], seq_len=40, student_template=LLAMA, start=start)
        return list(torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=collate(dataset)))

    whole = batches()
    assert len(whole) > 10
    eot, header_end = llama.convert_tokens_to_ids(["<|eot_id|>", "<|end_header_id|>"])
    targets = []
    for batch in whole:
        ids, labels = batch["student_ids"][0].tolist(), batch["labels"][0]
        assert ids[1] != eot and ids[1] != header_end  # after the window's BOS
        assert ids[-1] != header_end and ids[-2] != header_end  # a head stays with its content
        assert batch["teacher_ids_0"][0, 0].item() != qwen.convert_tokens_to_ids("<|im_end|>")
        targets += labels[labels != -100].tolist()
    answers = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
    assert text_bytes(llama, targets) == "".join(answers).encode()  # nothing lost or repeated
    assert targets.count(eot) == len(answers)
    state = None
    for batch in whole[:5]:
        state = advance_state(state, batch)
    for got, want in zip(batches(start=state), whole[5:], strict=True):
        assert all(torch.equal(got[k], want[k]) for k in want)


def collate(dataset):
    return lambda batch: data.collate(batch, dataset.pad_ids)


def test_bad_chat_records_are_counted_and_skipped(tmp_path, llama, qwen):
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    raising = os.path.join(tmp_path, "strict.jinja")  # a template that rejects the tool role
    with open(raising, "w") as f:
        f.write(
            "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}"
            "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        )
    records = [
        {"messages": good},
        {"title": "neither text nor messages"},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": "not a list"},
        {"prompt": "a prompt without its completion"},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "tool", "content": "{}"}, *good]},  # the teacher's template raises
        {"messages": [{"role": "narrator", "content": "Once"}, *good]},  # the student's: fine
        {"messages": good},
    ]
    path = write(tmp_path / "c.jsonl", records)
    dataset = windows(path, llama, [qwen], student_template=LLAMA, teacher_templates=[raising])
    state, items = None, 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=collate(dataset)):
        state, items = advance_state(state, batch), items + 1
    assert items == 1
    assert issue_counts(state) == Counter(
        missing_text_field=1, bad_conversation=3, no_assistant_content=1, chat_template=1
    )
    # Qwen3's own template drops a role it does not know: counted, never a silent misalignment
    dataset = windows(path, llama, [qwen], student_template=LLAMA)
    issues = Counter()
    conv = data.Conversation({"messages": records[-2]["messages"]}, "text", "a test")
    assert list(dataset.chat.segments(conv, 0, issues, data._Window(64, True, True))) == []
    assert issues == Counter(chat_template=1)


def test_bad_templates_and_missing_ones_are_one_line_errors(tmp_path, llama, qwen):
    path = write(tmp_path / "c.jsonl", [{"prompt": "Hi", "completion": "Hello"}])
    plain = write(tmp_path / "p.jsonl", [{"text": "just text"}])
    assert windows(plain, llama, [qwen]).chat is None  # plain text needs no template
    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ raise_exception('this template refuses everything') }}")
    cases = [
        ({}, "the student (pkg:llama-3.2) has no chat template in its tokenizer: give "
         "--student-chat-template"),
        ({"student_template": CHATML}, "ends an assistant's turn with no special token"),
        ({"student_template": str(broken)}, "refuses everything"),
        ({"student_template": LLAMA, "teacher_templates": ["/no/such.jinja"]},
         "--teacher-chat-template /no/such.jinja"),
        ({"student_template": LLAMA, "teacher_templates": [CHATML, CHATML]}, "one per teacher"),
        ({"student_template": LLAMA, "teacher_templates": [CHATML], "same": True},
         "reads the student's ids"),
    ]  # fmt: skip
    for kw, message in cases:
        with pytest.raises(ValueError) as info:
            windows(path, llama, [llama if kw.pop("same", False) else qwen], **kw)
        assert message in str(info.value) and "\n" not in str(info.value)


def test_a_run_pairs_the_two_ends_of_turn_in_W_and_the_common_set():
    W = torch.sparse_coo_tensor(
        [[0, 1, 1], [0, 1, 2]], [1.0, 0.9, 0.1], (8, 9), check_invariants=True
    )
    W = W.coalesce()
    teachers = [
        SimpleNamespace(W=W, pairs=None),
        SimpleNamespace(W=losses.LearnableProjection(W), pairs=None),
        SimpleNamespace(W=None, pairs=torch.tensor([[0, 0]])),
    ]
    student = SimpleNamespace(chat_template=None)
    sides, windows = [SimpleNamespace(template="T")], SimpleNamespace(student_tok=student)
    run = SimpleNamespace(end_of_turn=[5, 7, 7, 7], sides=sides, windows=windows)
    chat.prepare_run(teachers, run)
    assert student.chat_template == "T"  # its checkpoints keep the template
    assert teachers[0].W.to_dense()[5].tolist() == [0.0] * 7 + [1.0, 0.0]
    assert teachers[1].W().to_dense()[5, 7].item() == 1.0
    assert teachers[2].pairs.tolist() == [[0, 0], [5, 7]]


def test_a_chat_run_trains_on_the_assistants_tokens(tmp_path, cache, capsys):
    rng = random.Random(1)
    path = write(tmp_path / "chat.jsonl", [{"messages": conversation(rng)} for _ in range(20)])
    out = tmp_path / "run"
    argv = ["--data", path, "--max-steps", "2", "--save-every", "0", "--loss", "pkl"]
    with pytest.raises(SystemExit) as info:  # no template for the student: one line, exit 2
        train.main(tiny_argv(out, cache, *argv))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--student-chat-template" in err[0]
    out = tmp_path / "run2"
    train.main(tiny_argv(out, cache, *argv, "--student-chat-template", LLAMA))
    records = read_metrics(out)
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    assert all(0 < r["tokens"] < 2 * 64 for r in records)  # the answers' tokens only
    assert all(set(r["data_issues"]) <= {"split_document"} for r in records)
