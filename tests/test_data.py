"""data.py: reading every kind of local data, bad data counted and skipped, windows and their
teacher text, sharding across ranks and DataLoader workers, exact resume, collate."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import unicodedata
from collections import Counter
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

import data
from data import AlignedWindows, advance_state, collate, issue_counts
from flags import make_tiny_corpus
from tokens import end_of_document_id, token_bytes, tokenizer_hash


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return make_tiny_corpus(str(tmp_path_factory.mktemp("tiny")), n_docs=40, seed=1)


def write_jsonl(path, texts) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)


def loader(dataset, batch_size=2, num_workers=0):
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=partial(collate, pad_ids=dataset.pad_ids),
    )


def text_of(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_every_bad_record_is_counted_with_a_warning_and_never_fatal(tmp_path, llama, qwen, caplog):
    write_jsonl(tmp_path / "a.jsonl", ["good one", "", " \n\t "])
    with open(tmp_path / "a.jsonl", "ab") as f:  # a JSON escape of a lone surrogate; raw latin-1
        f.write(b'{"text": "\\ud800 lone"}\n{"text": 5}\n{"body": "no text"}\nnot json\n')
        f.write(b'{"text": "caf\xe9"}\n\n')
    (tmp_path / "b.txt").write_bytes(b"latin-1 \xe9t\xe9 text")
    (tmp_path / "c.txt").write_text("   \n")  # whitespace only
    (tmp_path / "d.jsonl").write_bytes(b"")  # empty file
    (tmp_path / "e.txt").symlink_to(tmp_path / "missing")  # unreadable
    pq.write_table(pa.table({"text": ["parquet doc", None, ""]}), tmp_path / "f.parquet")
    pq.write_table(pa.table({"body": ["no text column"]}), tmp_path / "g.parquet")
    (tmp_path / "z.txt").write_text("the end")  # counts travel with windows: one comes last
    with caplog.at_level(logging.WARNING, logger="data"):
        data._warned.clear()
        dataset = AlignedWindows(
            str(tmp_path), llama, [qwen], seq_len=32, pack=False, shuffle=False
        )
        state, texts = None, []
        for batch in loader(dataset):
            state = advance_state(state, batch)
            texts += [
                text_of(llama, ids[ids != llama.pad_token_id]) for ids in batch["student_ids"]
            ]
    # what is left of the bad records: U+FFFD for each bad byte or surrogate
    kept = [
        "\ufffd\ufffd\ufffd lone",
        "caf\ufffd",
        "good one",
        "latin-1 \ufffdt\ufffd text",
        "parquet doc",
        "the end",
    ]
    assert sorted(texts) == sorted(kept)
    expected = {
        "invalid_utf8": 3,  # the surrogate, the latin-1 byte in a.jsonl, b.txt
        "empty_document": 4,  # "", " \n\t ", c.txt, parquet ""
        "missing_text_field": 4,  # 5, {"body"}, parquet None, g.parquet's one row
        "bad_json": 1,
        "empty_file": 1,
        "unreadable_file": 1,
    }
    assert issue_counts(state) == expected
    assert {r.getMessage().split()[1] for r in caplog.records} >= set(expected)


def test_an_entirely_empty_dataset_is_a_clear_error(tmp_path, llama, qwen):
    (tmp_path / "empty.txt").write_bytes(b"")
    write_jsonl(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="no usable document"):
        AlignedWindows(str(tmp_path), llama, [qwen], seq_len=32)
    with pytest.raises(ValueError, match="no such file"):
        AlignedWindows(str(tmp_path / "nope.jsonl"), llama, [qwen], seq_len=32)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="holds no"):
        AlignedWindows(str(tmp_path / "sub"), llama, [qwen], seq_len=32)


def test_a_glob_and_a_list_of_files_name_the_same_documents(corpus):
    jsonl = os.path.join(corpus, "part-000.jsonl")
    assert data.resolve_files(os.path.join(corpus, "*.jsonl")) == [jsonl]
    assert data.resolve_files([jsonl, os.path.join(corpus, "note.txt")])[1] == jsonl
    assert data.resolve_files("someone/some-hub-dataset") is None


def test_a_directory_reads_every_document_once_and_says_what_it_skips(tmp_path, caplog):
    # the data reader's file rules (data.py's docstring, Files): a notebook's hidden checkpoint
    # copies are never read (each document would train twice), other files are counted
    write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    (tmp_path / ".ipynb_checkpoints").mkdir()
    write_jsonl(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.jsonl", ["one", "two"])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("three")
    (tmp_path / ".hidden.jsonl").write_text('{"text": "secret"}\n')
    (tmp_path / "README.md").write_text("# a dataset\n")
    (tmp_path / "notes.csv").write_text("a,b\n")
    with caplog.at_level(logging.WARNING, logger="data"):
        data._warned.clear()
        files = data.resolve_files(str(tmp_path))
    assert files == [str(tmp_path / "a.jsonl"), str(tmp_path / "sub" / "b.txt")]
    source = data.DocumentSource(str(tmp_path), files, shuffle=False)
    assert [text for _, text in data.documents(source, 0, 0, 1, Counter())] == [
        "one",
        "two",
        "three",
    ]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning == (
        f"data: {tmp_path}: reads 2 files; skipped: 2 hidden (.hidden.jsonl, "
        ".ipynb_checkpoints/), 2 of another kind (README.md, notes.csv)"
    )
    # a glob never matched hidden names: the same files
    assert data.resolve_files(str(tmp_path / "**" / "*.*")) == files


@pytest.mark.parametrize("name", ["b.jsonl.gz", "b.json.zst", "b.txt.bz2", "b.parquet.zip"])
def test_a_compressed_data_file_is_an_error_not_skipped(tmp_path, name):
    write_jsonl(tmp_path / "a.jsonl", ["one"])
    (tmp_path / name).write_bytes(b"\x1f\x8b compressed")
    message = f"holds 1 compressed data file(s) this reader does not read ({name}); decompress"
    with pytest.raises(ValueError, match=re.escape(message)):
        data.resolve_files(str(tmp_path))
    os.remove(tmp_path / "a.jsonl")  # alone, the same error (not "holds no ... files")
    with pytest.raises(ValueError, match=re.escape(message)):
        data.resolve_files(str(tmp_path))
    # naming only the files to read reads them
    write_jsonl(tmp_path / "a.jsonl", ["one"])
    assert data.resolve_files(str(tmp_path / "*.jsonl")) == [str(tmp_path / "a.jsonl")]


def test_a_json_file_holding_an_array_is_read_as_records(tmp_path):
    records = [{"text": "first"}, {"text": "second"}, {"body": "no text"}, {"text": "third"}]
    (tmp_path / "a.json").write_text("\ufeff" + json.dumps(records, indent=2))  # BOM, pretty
    write_jsonl(tmp_path / "b.json", ["JSON lines in a .json file"])  # still JSON lines
    (tmp_path / "c.json").write_text('[{"text": "cut"}, {"te')  # invalid: counted, not fatal
    source = data.DocumentSource(str(tmp_path), data.resolve_files(str(tmp_path)), shuffle=False)
    issues = Counter()
    texts = [text for _, text in data.documents(source, 0, 0, 1, issues)]
    assert texts == ["first", "second", "third", "JSON lines in a .json file"]
    assert issues == {"missing_text_field": 1, "unreadable_file": 1}


def test_a_teacher_cap_that_leaves_no_aligned_chunk_is_an_error(tmp_path, llama, qwen):
    write_jsonl(tmp_path / "a.jsonl", ["The cat sat on the mat."] * 4)
    for teacher in (qwen, llama):  # no leading special token; a BOS (same tokenizer: kl)
        with pytest.raises(ValueError, match="--teacher-cap 1 leaves .* no distillation signal"):
            AlignedWindows(str(tmp_path), llama, [teacher], seq_len=32, teacher_cap=1)
    # the smallest cap that can hold a chunk: Qwen3's second token (" cat", one piece on both
    # sides; the first token is never predicted)
    dataset = AlignedWindows(str(tmp_path), llama, [qwen], seq_len=32, teacher_cap=2, shuffle=False)
    item = next(iter(dataset))
    assert (item["teacher_chunk_0"] >= 0).any()


def test_documents_gives_a_shards_usable_texts_and_a_resume_reads_nothing_twice(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["zero", "", "two", "three", "four"])
    source = data.DocumentSource(str(tmp_path), data.resolve_files(str(tmp_path)), shuffle=False)
    issues = Counter()
    assert list(data.documents(source, 0, 0, 2, issues)) == [(0, "zero"), (1, "two"), (2, "four")]
    assert list(data.documents(source, 0, 1, 2, issues)) == [(1, "three")]
    assert issues == {"empty_document": 1}  # document 0 of shard 1
    resumed = Counter()  # inside the saved document, whose problems the saved counts hold
    assert list(data.documents(source, 0, 1, 2, resumed, resume_doc=0)) == [(1, "three")]
    assert list(data.documents(source, 0, 0, 2, resumed, resume_doc=2)) == [(2, "four")]
    assert not resumed


def stream_texts(dataset, tok, num_workers=0, batch_size=2) -> list[str]:
    """The documents a dataset's windows spell, rebuilt from the student's token bytes alone:
    each worker's windows in order, the leading special tokens dropped, split at every
    end-of-document token."""
    table, eod = token_bytes(tok), end_of_document_id(tok)
    pending: dict[int, bytes] = {}
    texts = []
    for batch in loader(dataset, batch_size=batch_size, num_workers=num_workers):
        for position, ids, mask in zip(
            batch["position"], batch["student_ids"], batch["student_mask"]
        ):
            worker = int(position[2])
            for i in ids[mask.bool()].tolist():
                if i == eod:
                    texts.append(pending.pop(worker, b"").decode())
                elif table[i] is not None:
                    pending[worker] = pending.get(worker, b"") + table[i]
    assert not pending, "every document ends with an end-of-document token"
    return texts


def same_text(a: bytes, b: bytes) -> bool:
    """Equal bytes up to the prefix space a SentencePiece model puts before each text it encodes
    (no source byte), or, where a tokenizer normalizes its input (Mistral's NFKC), equal text
    after Unicode normalization."""
    if a == b or b == b" " + a:  # or the prefix space a SentencePiece tokenizer adds to a text
        return True
    try:
        return unicodedata.normalize("NFKC", a.decode()) == unicodedata.normalize(
            "NFKC", b.decode()
        )
    except UnicodeDecodeError:
        return False


def check_window(item: dict, student, teachers: list, seq_len: int, capped: bool = False):
    """One window checked from the tokenizers' token bytes, independently of data.py: every
    teacher spells the same documents as the student (split at each side's own end-of-document
    token), a same-tokenizer teacher has the student's ids, every valid chunk covers equal bytes
    on both sides (same_text; this fails if a chunk lost a side's first token, which has no
    predictor), no chunk holds a special token, and labels are the next ids (special targets:
    only the EOD)."""
    s_ids = item["student_ids"].tolist()
    assert 2 <= len(s_ids) <= seq_len
    s_table, s_eod = token_bytes(student), end_of_document_id(student)
    want = [i if (s_table[i] is not None or i == s_eod) else -100 for i in s_ids[1:]] + [-100]
    assert item["labels"].tolist() == want

    def documents(ids, table, eod):
        pieces = [b""]
        for i in ids:
            if i == eod:
                pieces.append(b"")
            elif table[i] is not None:
                pieces[-1] += table[i]
        return pieces

    for k, teacher in enumerate(teachers):
        t_ids = item[f"teacher_ids_{k}"].tolist()
        t_table, t_eod = token_bytes(teacher), end_of_document_id(teacher)
        if tokenizer_hash(teacher) == tokenizer_hash(student):
            assert t_ids == s_ids
        s_docs, t_docs = documents(s_ids, s_table, s_eod), documents(t_ids, t_table, t_eod)
        if not capped:  # a teacher cut at --teacher-cap spells only a prefix
            assert len(s_docs) == len(t_docs) and all(map(same_text, s_docs, t_docs))
        # token-level chunk ids: position p holds the chunk of token p + 1
        s_chunk = np.append(-1, item[f"student_chunk_{k}"][:-1])
        t_chunk = np.append(-1, item[f"teacher_chunk_{k}"][:-1])
        for ids, chunk, table in ((s_ids, s_chunk, s_table), (t_ids, t_chunk, t_table)):
            assert all(table[ids[p]] is not None for p in np.flatnonzero(chunk >= 0))
        valid = set(s_chunk[s_chunk >= 0].tolist()) & set(t_chunk[t_chunk >= 0].tolist())
        for c in valid:
            s_bytes = b"".join(s_table[s_ids[p]] for p in np.flatnonzero(s_chunk == c))
            t_bytes = b"".join(t_table[t_ids[p]] for p in np.flatnonzero(t_chunk == c))
            assert same_text(s_bytes, t_bytes), (c, s_bytes, t_bytes)


REAL_LIKE = [  # documents of very different lengths, as a web crawl has
    "Short note.",
    " ".join(f"Item {i} costs ${i * 3.5:.2f}, naïve cafe\u0301 😀." for i in range(120)),
    "日本語のテキスト 👩\u200d👩\u200d👧 " * 30,
    "def f(x):\n    return x * 2024  # 2024 is a year\n" * 12,
    "2024 was the year: 1234567 people, 3.14159 and 10,000 more.",
    *(f"Paragraph {i}: the {i * 37} cats of Zürich sat on {i + 1} mats." for i in range(40)),
]


def test_packed_windows_are_full_and_spell_every_document_exactly_once(tmp_path, llama, qwen):
    write_jsonl(tmp_path / "docs.jsonl", REAL_LIKE)
    packed = AlignedWindows(str(tmp_path), llama, [qwen], seq_len=64)
    items = list(packed)
    lengths = [len(item["student_ids"]) for item in items]
    assert sum(lengths) / (64 * len(items)) >= 0.97  # the last window may be short
    assert all(n == 64 for n in lengths[:-1]) or sum(n < 60 for n in lengths) <= 2
    assert sorted(stream_texts(packed, llama)) == sorted(REAL_LIKE)
    several = [item for item in items if (item["student_ids"] == end_of_document_id(llama)).sum()]
    assert len(several) > 5  # windows that hold the end of one document and more
    one_each = AlignedWindows(str(tmp_path), llama, [qwen], seq_len=64, pack=False)
    assert sorted(stream_texts(one_each, llama)) == sorted(REAL_LIKE)
    assert sum(len(item["student_ids"]) for item in one_each) / (64 * len(list(one_each))) < 0.8


@pytest.mark.parametrize("pack", [True, False])
def test_every_window_is_aligned_byte_exactly_with_every_teacher(
    corpus, llama, qwen, mistral, pack
):
    dataset = AlignedWindows(corpus, llama, [qwen, mistral, llama], seq_len=48, pack=pack)
    for item in dataset:
        check_window(item, llama, [qwen, mistral, llama], 48)


def test_first_token_without_predictor_drops_its_chunk_on_both_sides(tmp_path, llama, qwen):
    # Llama: BOS "202" "4" " was"; Qwen3 adds no BOS: "2" "0" "2" "4" " was". The chunk "202" holds
    # Qwen's first token, which no position predicts: kept, its teacher side would lack the "2"
    write_jsonl(tmp_path / "d.jsonl", ["2024 was a year."])
    item = next(iter(AlignedWindows(str(tmp_path), llama, [qwen], seq_len=32)))
    s_chunk, t_chunk = item["student_chunk_0"], item["teacher_chunk_0"]
    assert item["teacher_ids_0"][:4].tolist() == [qwen.convert_tokens_to_ids(d) for d in "2024"]
    assert s_chunk[0] == -1 and (t_chunk[:2] == -1).all()  # "202": in no chunk on either side
    assert s_chunk[1] == t_chunk[2] >= 0  # "4" is the first valid chunk
    check_window(item, llama, [qwen], 32)


def test_a_sentencepiece_student_with_its_own_tokenizer_as_teacher_gets_its_ids(corpus, mistral):
    for item in AlignedWindows(corpus, mistral, [mistral], seq_len=40):
        assert item["teacher_ids_0"].tolist() == item["student_ids"].tolist()
        check_window(item, mistral, [mistral], 40)


def test_shuffle_is_seeded_reseeded_per_epoch_and_mixes_files(tmp_path, llama, qwen):
    for f in range(3):  # files grouped by topic, as large corpora often are
        write_jsonl(tmp_path / f"topic{f}.jsonl", [f"topic {f} document {i}." for i in range(12)])

    def order(seed, epochs=2, **kw):
        dataset = AlignedWindows(
            str(tmp_path), llama, [qwen], seq_len=512, pack=False, seed=seed, repeat=True, **kw
        )
        stream = iter(dataset)
        return [text_of(llama, next(stream)["student_ids"]) for _ in range(36 * epochs)]

    plain = order(0, shuffle=False)
    assert plain[:36] == [f"topic {f} document {i}." for f in range(3) for i in range(12)]
    first, again, other = order(0), order(0), order(1)
    assert first == again and first != other
    assert sorted(first[:36]) == sorted(plain[:36]) == sorted(first[36:])  # each once per epoch
    assert first[:36] != first[36:]  # reseeded per epoch
    assert len({t.split()[1] for t in first[:6]}) > 1  # topics mixed from the start
    assert order(0, shuffle_buffer=0)[:36] != plain[:36]  # file order and interleaving alone


def windows_by_document(dataset, num_workers=0) -> dict[int, list]:
    """One document per window (pack=False, shuffle=False): windows grouped by document."""
    docs: dict[int, list] = {}
    for batch in loader(dataset, num_workers=num_workers):
        for position, ids, mask in zip(
            batch["position"], batch["student_ids"], batch["student_mask"]
        ):
            docs.setdefault(int(position[5]), []).append(ids[mask.bool()].tolist())
    return docs


def test_unpacked_windows_rebuild_each_document_and_long_ones_are_split(tmp_path, llama, qwen):
    long_text = " ".join(f"Item {i} costs ${i * 3.5:.2f}, naïve cafe\u0301 😀." for i in range(80))
    texts = ["short one", long_text, "日本語のテキスト 👩\u200d👩\u200d👧 " * 30]
    write_jsonl(tmp_path / "docs.jsonl", texts)
    dataset = AlignedWindows(str(tmp_path), llama, [qwen], seq_len=48, pack=False, shuffle=False)
    docs = windows_by_document(dataset)
    assert sorted(docs) == [0, 1, 2]
    for doc, windows in docs.items():
        assert all(len(ids) <= 48 and ids[0] == llama.bos_token_id for ids in windows)
        assert "".join(text_of(llama, ids) for ids in windows) == texts[doc]
        assert windows[-1][-1] == end_of_document_id(llama)  # only the last window ends it
        assert all(end_of_document_id(llama) not in ids for ids in windows[:-1])
    assert len(docs[1]) >= len(llama(long_text)["input_ids"]) // 48
    assert len(docs[2]) > 1 and len(docs[0]) == 1


def test_a_huge_document_is_tokenized_part_by_part_and_still_rebuilt_exactly(
    tmp_path, llama, qwen, monkeypatch
):
    lines = [f"Line {i}: {i * 7} apples, cafe\u0301 😀\n" for i in range(60)]
    huge = "".join(lines) + "no final break " * 40
    write_jsonl(tmp_path / "huge.jsonl", [huge, "a second document"])
    parts = list(data._parts("".join(lines), size=300))
    assert len(parts) > 5 and all(len(p) <= 300 and p.endswith("\n") for _, p in parts)
    assert "".join(p for _, p in parts) == "".join(lines)
    assert all(text.startswith(p) for text in ["".join(lines)] for start, p in parts[:1])
    monkeypatch.setattr(data, "_parts", partial(data._parts, size=300))  # parts of 300 characters
    for pack in (True, False):
        dataset = AlignedWindows(str(tmp_path), llama, [qwen], seq_len=64, pack=pack)
        assert sorted(stream_texts(dataset, llama)) == sorted([huge, "a second document"])
        for item in dataset:
            check_window(item, llama, [qwen], 64)


def test_teacher_cap_truncates_and_turns_the_tail_into_a_gap(tmp_path, llama, qwen):
    text = "Totals: " + ", ".join(str(123456 + 7 * i) for i in range(30))  # Qwen: 1 token per digit
    write_jsonl(tmp_path / "n.jsonl", [text])
    full = next(iter(AlignedWindows(str(tmp_path), llama, [qwen], seq_len=256)))
    capped_set = AlignedWindows(str(tmp_path), llama, [qwen], seq_len=256, teacher_cap=60)
    capped = next(iter(capped_set))
    assert len(full["teacher_ids_0"]) > 60 == len(capped["teacher_ids_0"])
    assert capped["issues"][data.REASONS.index("teacher_truncated")] == 1
    # token-level chunk ids (undo the shift: position p holds the chunk of token p + 1)
    full_s, full_t = full["student_chunk_0"][:-1], full["teacher_chunk_0"][:-1]
    cap_s, cap_t = capped["student_chunk_0"][:-1], capped["teacher_chunk_0"][:-1]
    first_lost = full["teacher_chunk_0"][59]  # chunk of teacher token 60, the first one cut off
    assert first_lost >= 0
    assert cap_t.tolist() == np.where(full_t[:59] >= first_lost, -1, full_t[:59]).tolist()
    assert cap_s.tolist() == np.where(full_s >= first_lost, -1, full_s).tolist()
    assert (cap_s[-5:] == -1).all() and (cap_s >= 0).sum() > 10  # a tail gap, a valid head
    check_window(capped, llama, [qwen], 256, capped=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_read_disjoint_shards_covering_every_document_once(
    corpus, llama, qwen, num_workers
):
    everything = stream_texts(AlignedWindows(corpus, llama, [qwen], seq_len=40), llama)
    shards = [
        stream_texts(
            AlignedWindows(corpus, llama, [qwen], seq_len=40, rank=rank, world_size=2),
            llama,
            num_workers=num_workers,
        )
        for rank in (0, 1)
    ]
    assert sorted(shards[0] + shards[1]) == sorted(everything)
    assert abs(len(shards[0]) - len(shards[1])) <= 2
    # the 40 generated documents, the latin-1 line among the bad ones, note.txt and latin1.txt
    assert len(everything) == 40 + 3


def test_resume_from_a_saved_state_continues_with_exactly_the_next_window(corpus, llama, qwen):
    def make(start=None):
        dataset = AlignedWindows(corpus, llama, [qwen], seq_len=40, start=start)
        return loader(dataset, batch_size=3, num_workers=2)

    whole = list(make())
    assert len({b["position"][0, 2].item() for b in whole}) == 2  # both workers contribute
    for consumed in (3, 6):  # the next batch is worker 1's turn, then worker 0's
        state = None
        for k, batch in enumerate(make()):  # a run that stops after `consumed` batches
            state = advance_state(state, batch)
            if k + 1 == consumed:
                break
        buffer = io.BytesIO()
        torch.save(state, buffer)  # the trainer checkpoints it with the model
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        rest = list(make(start=state))
        assert len(rest) == len(whole) - consumed
        for got, want in zip(rest, whole[consumed:]):
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in got)


def test_resume_in_an_endless_stream_crosses_epochs_exactly(tmp_path, llama, qwen):
    write_jsonl(tmp_path / "few.jsonl", [f"document {i}: {i * 37} items" for i in range(5)])

    def batches(start=None, n=12):
        dataset = AlignedWindows(str(tmp_path), llama, [qwen], seq_len=32, start=start, repeat=True)
        stream = iter(loader(dataset, batch_size=2, num_workers=2))
        return [next(stream) for _ in range(n)]

    whole = batches()
    assert len({b["position"][0, 4].item() for b in whole}) > 2  # several epochs
    state = None
    for batch in whole[:5]:
        state = advance_state(state, batch)
    for got, want in zip(batches(start=state, n=7), whole[5:]):
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_refuses_another_number_of_workers(corpus, llama, qwen):
    dataset = AlignedWindows(corpus, llama, [qwen], seq_len=40)
    state = advance_state(None, next(iter(loader(dataset, num_workers=0))))
    resumed = AlignedWindows(corpus, llama, [qwen], seq_len=40, start=state)
    with pytest.raises(ValueError, match="DataLoader workers"):
        next(iter(loader(resumed, num_workers=2)))


def test_repeat_streams_epoch_after_epoch(tmp_path, llama, qwen):
    write_jsonl(tmp_path / "two.jsonl", ["first document", "second document"])
    kw = dict(seq_len=32, repeat=True, shuffle=False)
    stream = iter(AlignedWindows(str(tmp_path), llama, [qwen], pack=False, **kw))
    positions = [next(stream)["position"][4:6].tolist() for _ in range(5)]
    assert positions == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0]]  # (epoch, document)
    packed = iter(AlignedWindows(str(tmp_path), llama, [qwen], **kw))  # both in one window
    positions = [next(packed)["position"][4:6].tolist() for _ in range(3)]
    assert positions == [[1, -1], [2, -1], [3, -1]]  # the next window starts the next epoch


def test_collate_pads_ids_and_masks_them_with_no_chunk_and_no_label(corpus, llama, qwen):
    dataset = AlignedWindows(corpus, llama, [qwen], seq_len=40, pack=False)
    items = sorted(list(dataset)[:6], key=lambda item: len(item["student_ids"]))[::5]
    short, long = items
    assert len(short["student_ids"]) < len(long["student_ids"])
    batch = collate([short, long], dataset.pad_ids)
    n = len(short["student_ids"])
    assert batch["student_ids"].shape == batch["labels"].shape == batch["student_mask"].shape
    assert (batch["student_ids"][0, n:] == dataset.pad_ids["student_ids"]).all()
    assert batch["student_mask"][0].tolist() == [1] * n + [0] * (batch["student_ids"].shape[1] - n)
    assert (batch["labels"][0, n:] == -100).all() and (batch["student_chunk_0"][0, n:] == -1).all()
    m = len(short["teacher_ids_0"])
    assert batch["teacher_mask_0"][0].sum() == m and (batch["teacher_chunk_0"][0, m:] == -1).all()
    assert batch["position"].shape == (2, 7)


def test_a_hub_dataset_is_streamed_through_datasets(llama, qwen, monkeypatch):
    import datasets

    rows = [{"text": "streamed document one"}, {"text": ""}, {"text": "streamed two"}]
    stream = datasets.IterableDataset.from_generator(lambda: iter(rows))
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: asked.append((a, kw)) or stream)
    dataset = AlignedWindows(
        "someone/climbmix", llama, [qwen], seq_len=32, pack=False, shuffle=False
    )
    texts = [text_of(llama, item["student_ids"].tolist()) for item in dataset]
    assert texts == ["streamed document one", "streamed two"]
    assert asked[0][0][0] == "someone/climbmix" and asked[0][1]["streaming"] is True
    AlignedWindows("someone/climbmix", llama, [qwen], seq_len=32, data_config="en", split="dev")
    assert asked[-1][0][:2] == ("someone/climbmix", "en") and asked[-1][1]["split"] == "dev"


def test_a_hub_stream_splits_across_workers_and_resumes_exactly(llama, qwen, monkeypatch):
    import datasets

    rows = [{"text": f"hub document {i} has {i * 11} words"} for i in range(9)]
    stream = datasets.IterableDataset.from_generator(lambda: iter(rows))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: stream)

    def batches(start=None):
        dataset = AlignedWindows(
            "someone/climbmix", llama, [qwen], seq_len=32, start=start, pack=False
        )
        return list(loader(dataset, batch_size=2, num_workers=2))

    whole = batches()
    texts = [text_of(llama, ids.tolist()) for b in whole for ids in b["student_ids"]]
    assert sorted(texts) == sorted(row["text"] for row in rows)  # each document exactly once
    state = advance_state(advance_state(None, whole[0]), whole[1])
    state = advance_state(state, whole[2])  # worker 1's turn next
    rest = batches(start=state)
    assert len(rest) == len(whole) - 3
    for got, want in zip(rest, whole[3:]):
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_tiny_corpus_is_deterministic_and_has_the_promised_content(tmp_path):
    a = make_tiny_corpus(str(tmp_path / "a"), n_docs=30, seed=3)
    b = make_tiny_corpus(str(tmp_path / "b"), n_docs=30, seed=3)
    read = open(os.path.join(a, "part-000.jsonl"), "rb").read()
    assert read == open(os.path.join(b, "part-000.jsonl"), "rb").read()
    text = read.decode(errors="replace")
    assert unicodedata.normalize("NFC", text) != text  # combining marks
    assert "\u200d" in text and "東京" in text and "def " in text


def test_special_token_text_in_a_document_is_labelled_text_in_chunks(tmp_path, llama, qwen):
    from tokens import token_bytes

    def first_window(name, doc):
        write_jsonl(tmp_path / f"{name}.jsonl", [doc])
        dataset = AlignedWindows(str(tmp_path / f"{name}.jsonl"), llama, [qwen], seq_len=64)
        return next(iter(dataset))

    def around(ids, added):  # (leading, trailing) special ids of a window
        text = [k for k, i in enumerate(ids) if i not in added]
        return ids[: text[0]], ids[text[-1] + 1 :]

    doc = "see <|begin_of_text|> here, <|im_end|> and <think> 201 there<|eot_id|>"
    plain, item = first_window("plain", "see here"), first_window("markers", doc)
    s_ids, t_ids = item["student_ids"].tolist(), item["teacher_ids_0"].tolist()
    s_chunk, t_chunk = item["student_chunk_0"].tolist(), item["teacher_chunk_0"].tolist()
    labels = item["labels"].tolist()
    assert s_ids[0] == llama.bos_token_id
    sides = ((llama, "student_ids", s_ids, s_chunk), (qwen, "teacher_ids_0", t_ids, t_chunk))
    for tok, key, ids, chunk in sides:
        # the window's own specials (those of a plain document: the leading BOS, ...) are its only
        # special ids: the markers are text, spelling the document's bytes
        added = tok.backend_tokenizer.get_added_tokens_decoder().keys()
        lead, trail = around(plain[key].tolist(), added)
        n = len(ids) - len(trail)
        assert (ids[: len(lead)], ids[n:]) == (lead, trail) and not set(ids[len(lead) : n]) & added
        assert b"".join(token_bytes(tok)[i] for i in ids[len(lead) : n]) == doc.encode()
        # every position that predicts a text token after the first is in a chunk
        assert -1 not in chunk[len(lead) : n - 1], tok.name_or_path
    # ... which both sides have, and every text token is a label
    assert {c for c in s_chunk if c >= 0} == {c for c in t_chunk if c >= 0}
    assert labels[: len(s_ids) - 1 - len(trail)] == s_ids[1 : len(s_ids) - len(trail)]


def test_a_sentencepiece_student_resumes_exactly_after_any_window(tmp_path, mistral, qwen):
    # Mistral starts a text with a prefix-space token of no source bytes ("▁", "1", "9", ...): a
    # window must never end right after it, or a resumed run would emit it twice
    write_jsonl(
        tmp_path / "a.jsonl", [f"{1900 + 7 * i} was a year of {13 * i} events" for i in range(12)]
    )

    def windows(start=None, n=14):
        stream = iter(AlignedWindows(str(tmp_path), mistral, [qwen], 16, start=start, repeat=True))
        return [{k: torch.as_tensor(v)[None] for k, v in next(stream).items()} for _ in range(n)]

    whole, state = windows(), None
    for k in range(len(whole) - 1):
        state = advance_state(state, whole[k])
        resumed = windows(state, 1)[0]
        assert all(torch.equal(resumed[key], whole[k + 1][key]) for key in resumed), k
