"""data.py: reading every kind of local data, bad data counted and skipped, windows and their
teacher text, sharding across ranks and DataLoader workers, exact resume, collate."""

from __future__ import annotations

import io
import json
import logging
import os
import unicodedata
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

import data
from data import AlignedWindows, advance_state, collate, issue_counts, make_tiny_corpus
from tokens import align_text, predictor_chunks


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
        dataset = AlignedWindows(str(tmp_path), llama, [qwen], seq_len=32)
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


def windows_by_document(dataset, num_workers=0) -> dict[int, list]:
    docs: dict[int, list] = {}
    for batch in loader(dataset, num_workers=num_workers):
        for position, ids, mask in zip(
            batch["position"], batch["student_ids"], batch["student_mask"]
        ):
            doc, window = position[5:].tolist()
            docs.setdefault(doc, []).append((window, ids[mask.bool()].tolist()))
    return docs


def test_windows_rebuild_each_document_exactly_and_long_ones_are_split(tmp_path, llama, qwen):
    long_text = " ".join(f"Item {i} costs ${i * 3.5:.2f}, naïve cafe\u0301 😀." for i in range(80))
    texts = ["short one", long_text, "日本語のテキスト 👩\u200d👩\u200d👧 " * 30]
    write_jsonl(tmp_path / "docs.jsonl", texts)
    dataset = AlignedWindows(str(tmp_path), llama, [qwen], seq_len=48)
    docs = windows_by_document(dataset)
    assert sorted(docs) == [0, 1, 2]
    for doc, windows in docs.items():
        assert [w for w, _ in windows] == list(range(len(windows)))
        assert all(len(ids) <= 48 and ids[0] == llama.bos_token_id for _, ids in windows)
        assert "".join(text_of(llama, ids) for _, ids in windows) == texts[doc]
    assert len(docs[1]) >= len(llama(long_text)["input_ids"]) // 48
    assert len(docs[2]) > 1 and len(docs[0]) == 1


def test_a_huge_document_is_tokenized_part_by_part_and_still_rebuilt_exactly(
    tmp_path, llama, qwen, monkeypatch
):
    lines = [f"Line {i}: {i * 7} apples, cafe\u0301 😀\n" for i in range(60)]
    huge = "".join(lines) + "no final break " * 40
    write_jsonl(tmp_path / "huge.jsonl", [huge])
    parts = list(data._parts("".join(lines), size=300))
    assert len(parts) > 5 and all(len(p) <= 300 and p.endswith("\n") for p in parts)
    monkeypatch.setattr(data, "_parts", partial(data._parts, size=300))  # parts of 300 characters
    dataset = AlignedWindows(str(tmp_path), llama, [qwen], seq_len=64)
    windows = windows_by_document(dataset)[0]
    assert [w for w, _ in windows] == list(range(len(windows)))
    assert (
        "".join(text_of(llama, ids) for _, ids in windows)
        == "".join(lines) + "no final break " * 40
    )


def test_each_window_gives_the_teacher_exactly_its_text_and_its_alignment(corpus, llama, qwen):
    dataset = AlignedWindows(corpus, llama, [qwen], seq_len=40)
    for item in dataset:
        student_ids = item["student_ids"].tolist()
        text = text_of(llama, student_ids)
        s_ids, t_ids, s_chunk, t_chunk = align_text(llama, qwen, text)
        assert item["teacher_ids_0"].tolist() == t_ids
        # a window cut from a document = the student's tokens of the document, which may differ
        # from tokenizing the window alone only at its edges: compare the alignment where equal
        if s_ids == student_ids:
            assert item["student_chunk_0"].tolist() == predictor_chunks(s_chunk).tolist()
            assert item["teacher_chunk_0"].tolist() == predictor_chunks(t_chunk).tolist()
        labels = item["labels"].tolist()
        assert labels == student_ids[1:] + [-100]
        assert llama.bos_token_id not in labels


def test_several_teachers_are_each_aligned_with_the_student(corpus, llama, qwen, mistral):
    item = next(iter(AlignedWindows(corpus, llama, [qwen, mistral], seq_len=40)))
    text = text_of(llama, item["student_ids"].tolist())
    for i, tok in enumerate([qwen, mistral]):
        _, t_ids, s_chunk, t_chunk = align_text(llama, tok, text)
        assert item[f"teacher_ids_{i}"].tolist() == t_ids
        assert item[f"student_chunk_{i}"].tolist() == predictor_chunks(s_chunk).tolist()
        assert item[f"teacher_chunk_{i}"].tolist() == predictor_chunks(t_chunk).tolist()
    assert item["student_chunk"].tolist() == item["student_chunk_0"].tolist()


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


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_read_disjoint_shards_covering_every_document_once(
    corpus, llama, qwen, num_workers
):
    everything = windows_by_document(AlignedWindows(corpus, llama, [qwen], seq_len=40))
    shards = [
        windows_by_document(
            AlignedWindows(corpus, llama, [qwen], seq_len=40, rank=rank, world_size=2),
            num_workers=num_workers,
        )
        for rank in (0, 1)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert {doc % 2 for doc in shards[1]} == {1}
    assert shards[0] | shards[1] == everything
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
    stream = iter(AlignedWindows(str(tmp_path), llama, [qwen], seq_len=32, repeat=True))
    positions = [next(stream)["position"][4:6].tolist() for _ in range(5)]
    assert positions == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0]]  # (epoch, document)


def test_collate_pads_ids_and_masks_them_with_no_chunk_and_no_label(corpus, llama, qwen):
    dataset = AlignedWindows(corpus, llama, [qwen], seq_len=40)
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
    dataset = AlignedWindows("someone/climbmix", llama, [qwen], seq_len=32)
    texts = [text_of(llama, item["student_ids"].tolist()) for item in dataset]
    assert texts == ["streamed document one", "streamed two"]
    assert asked[0][0][0] == "someone/climbmix" and asked[0][1]["streaming"] is True


def test_a_hub_stream_splits_across_workers_and_resumes_exactly(llama, qwen, monkeypatch):
    import datasets

    rows = [{"text": f"hub document {i} has {i * 11} words"} for i in range(9)]
    stream = datasets.IterableDataset.from_generator(lambda: iter(rows))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: stream)

    def batches(start=None):
        dataset = AlignedWindows("someone/climbmix", llama, [qwen], seq_len=32, start=start)
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


def test_special_token_text_in_a_document_is_never_a_label_nor_in_a_chunk(tmp_path, llama, qwen):
    write_jsonl(tmp_path / "s.jsonl", ["see <|begin_of_text|> here and 201 there"])
    item = next(iter(AlignedWindows(str(tmp_path), llama, [qwen], seq_len=32)))
    ids = item["student_ids"].tolist()
    inside = ids.index(llama.bos_token_id, 1)  # Llama reads the marker as its BOS token
    assert item["labels"][inside - 1] == -100 and item["student_chunk_0"][inside - 1] == -1
    assert item["labels"][inside] == ids[inside + 1]
