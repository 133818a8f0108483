"""The teacher's own context (METHOD.md 4.3) and the teacher cache (cache_teacher.py, 5.7): a
teacher run once serves any student, exactly; a cache that does not serve a run is refused.

The module makes two whole-vocabulary caches (--topk 0) of tiny random teachers over three short
real-like documents (a Qwen3 teacher and a Llama-3.2 one) and shares them between its tests.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from test_data import same_text

import cache_teacher
import train
from conftest import read_metrics, tiny_argv
from data import AlignedWindows, collate
from tokens import token_bytes

DOCS = [
    "The 3 cats of Zürich sat on 12 mats in 2024, and 1234 people watched them.",
    "def add(x):\n    return x + 42  # 42 + 1 = 43\n",
    "Paragraph two: naïve café owners sold 5,000 croissants at $3.50 each; 日本語のテキスト 😀.",
]
# the metrics an exact cache must reproduce (the loss alone is 2 x CE under dynamic scaling)
COMPARED = ("loss", "ce", "kd", "kd_scale", "grad_norm", "valid_chunks")


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS))
    return str(path)


def make_cache(out, docs: str, teacher: str, *extra: str) -> str:
    argv = ["--preset", "tiny", "--teacher", teacher, "--data", docs, "--out", str(out), *extra]
    assert cache_teacher.main(argv) == 0
    return str(out)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, docs) -> dict[str, str]:
    """Whole-vocabulary caches of the tiny Qwen3 and Llama-3.2 teachers."""
    root = tmp_path_factory.mktemp("teacher_caches")
    return {
        name: make_cache(root / name, docs, f"pkg:{name}", "--topk", "0")
        for name in ("qwen3", "llama-3.2")
    }


def run(out_dir, w_cache: str, docs: str, *extra: str) -> list[dict]:
    argv = ["--data", docs, "--max-steps", "2", "--save-every", "0", "--grad-accum", "2"]
    train.main(tiny_argv(out_dir, w_cache, *argv, *extra))
    return read_metrics(out_dir)


def assert_same_run(a: list[dict], b: list[dict], teachers: list[str]) -> None:
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for key in [*COMPARED, *(f"kd/{t}" for t in teachers)]:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (key, x, y)
    assert any(r["kd"] != 0 for r in a)


# ----------------------------------------------------------------------------- exactness


def test_a_whole_vocabulary_cache_trains_as_the_teacher_running_pkl_kl_and_mixed(
    tmp_path, cache, docs, caches
):
    """P-KL with a Qwen3 teacher and KL with a Llama-3.2 one (same tokenizer as the student), in
    one run: online, then each teacher from its cache while the other runs (mixed)."""
    teachers = ["--teacher", "pkg:qwen3", "--loss", "pkl", "--teacher", "pkg:llama-3.2"]
    teachers += ["--loss", "kl"]
    online = run(tmp_path / "online", cache, docs, *teachers)
    first = run(tmp_path / "qwen_cached", cache, docs, *teachers, "--teacher-cache",
                caches["qwen3"], "--teacher-cache", "none")  # fmt: skip
    second = run(tmp_path / "llama_cached", cache, docs, *teachers, "--teacher-cache", "none",
                 "--teacher-cache", caches["llama-3.2"])  # fmt: skip
    assert_same_run(online, first, ["pkg:qwen3", "pkg:llama-3.2"])
    assert_same_run(online, second, ["pkg:qwen3", "pkg:llama-3.2"])


@pytest.mark.parametrize("loss", ["hkl", "gold"])
def test_a_whole_vocabulary_cache_trains_as_the_teacher_running_hkl_gold(
    tmp_path, cache, docs, caches, loss
):
    online = run(tmp_path / "online", cache, docs, "--loss", loss)
    cached = run(tmp_path / "cached", cache, docs, "--loss", loss, "--teacher-cache",
                 caches["qwen3"])  # fmt: skip
    assert_same_run(online, cached, ["pkg:qwen3"])


def test_one_qwen3_cache_also_trains_a_sentencepiece_student(tmp_path, cache, docs, caches):
    """The cache the Llama-3.2 student trained from (above) serves a Mistral student too: the
    teacher's outputs do not depend on the student."""
    student = ["--student", "pkg:mistral-v1", "--loss", "pkl"]
    online = run(tmp_path / "online", cache, docs, *student)
    cached = run(tmp_path / "cached", cache, docs, *student, "--teacher-cache", caches["qwen3"])
    assert_same_run(online, cached, ["pkg:qwen3"])
    assert all(r["valid_chunks"] > 0.5 for r in cached)


# ----------------------------------------------------------------------------- the top-K rule


def test_topk_records_rebuild_the_logits_of_the_rest_bucket_rule(tmp_path, docs, caches, qwen):
    """K > 0 (float32 storage): the rebuilt logits follow METHOD.md 5.7, checked against a float64
    reference written from the equation and the whole-vocabulary cache's logits."""
    k = 5
    small = cache_teacher.TeacherCache(make_cache(tmp_path / "k5", docs, "pkg:qwen3", "--topk",
                                                  str(k), "--dtype", "float32"), qwen)  # fmt: skip
    whole = cache_teacher.TeacherCache(caches["qwen3"], qwen)
    text = DOCS[0]
    tokens = np.arange(1, 12)  # a window's token 0 has no predictor (Qwen3 adds no BOS)
    ids = qwen(text, add_special_tokens=False)["input_ids"]
    z = torch.from_numpy(whole.read(text, 0, tokens, ids)["cache_logits"]).double()
    read = small.read(text, 0, tokens, ids)
    batch = {f"{key}_0": torch.from_numpy(value)[None] for key, value in read.items()}
    rebuilt = cache_teacher.teacher_logits(batch, 0, small.vocab)[0].double()
    # the reference: p = softmax(z); the top k keep log p + lse, the rest share 1 - sum top p
    lse = torch.logsumexp(z, -1, keepdim=True)
    logp = z - lse
    top = logp.topk(k, -1).indices
    rest = 1 - logp.gather(-1, top).exp().sum(-1, keepdim=True)
    want = (torch.log(rest / (small.vocab - k)) + lse).expand_as(z).clone()
    want.scatter_(-1, top, (logp + lse).gather(-1, top))
    assert torch.equal(rebuilt.topk(k, -1).indices.sort().values, top.sort().values)
    torch.testing.assert_close(rebuilt, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.softmax(rebuilt, -1).sum(-1), torch.ones(len(tokens)).double())


def test_packed_entries_keep_ids_exactly_and_log_probs_to_2_to_the_minus_10():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1 << cache_teacher.ID_BITS, size=5000)
    logp = -np.concatenate(
        [rng.exponential(3.0, 4990), [0.0, 1e-8, 60.0, 7e4, 0.5, 1, 2, 4, 8, 16]]
    )
    got_ids, got = cache_teacher.unpack(cache_teacher.pack(ids, logp.astype(np.float32)))
    assert np.array_equal(got_ids, ids)
    want = np.maximum(logp, -65504.0)
    assert np.all(np.abs(got - want) <= np.abs(want) * 2.0**-10 + 1e-7)


# ----------------------------------------------------------------------------- the context rule


@pytest.mark.parametrize("student", ["llama", "mistral"])
def test_the_teacher_reads_each_document_alone_in_its_own_windows(docs, qwen, llama, mistral,
                                                                 student, request):  # fmt: skip
    """Checked from the tokenizers alone: every teacher row is the teacher's tokenization of ONE
    document from a teacher-window start (whatever the student and its window length), and every
    valid chunk spells the same bytes on both sides."""
    student_tok = request.getfixturevalue(student)
    window = 8
    own = [qwen(d, add_special_tokens=False)["input_ids"] for d in DOCS]
    s_table, t_table = token_bytes(student_tok), token_bytes(qwen)
    for seq_len in (16, 40):
        data = AlignedWindows(docs, student_tok, [qwen], seq_len, teacher_window=window,
                              shuffle=False)  # fmt: skip
        for item in data:
            ids, pos = item["teacher_ids_0"].tolist(), item["teacher_pos_0"]
            starts = [*np.flatnonzero(pos == 0).tolist(), len(ids)]
            for a, b in zip(starts, starts[1:]):
                row = ids[a:b]
                assert any(
                    doc[w : w + len(row)] == row for doc in own for w in range(0, len(doc), window)
                ), row
            s_ids, t_chunk = item["student_ids"], item["teacher_chunk_0"]
            s_chunk = np.append(
                -1, item["student_chunk_0"][:-1]
            )  # the token each position predicts
            for c in set(s_chunk[s_chunk >= 0].tolist()):
                qs = np.flatnonzero(t_chunk == c)
                assert len(qs) and all(pos[q + 1] == pos[q] + 1 for q in qs)
                s_bytes = b"".join(s_table[s_ids[p]] for p in np.flatnonzero(s_chunk == c))
                t_bytes = b"".join(t_table[ids[q + 1]] for q in qs)
                assert same_text(s_bytes, t_bytes), (s_bytes, t_bytes)


def test_packed_rows_give_each_row_the_logits_it_gets_alone(qwen):
    """Positions restarting at 0 keep attention within each row (what the online teacher and the
    cache pass rely on, in this transformers version)."""
    import argparse

    ns = argparse.Namespace(preset="tiny", seed=0, seq_len=64, attn_implementation=None,
                            trust_remote_code=False)  # fmt: skip
    model = train.load_model("pkg:qwen3", qwen, ns, torch.float32, torch.device("cpu")).eval()
    rows = [qwen(d, add_special_tokens=False)["input_ids"][:20] for d in DOCS]
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([r]), use_cache=False).logits[0] for r in rows]
        packed = model(
            input_ids=torch.tensor([sum(rows, [])]),
            position_ids=torch.tensor([sum((list(range(len(r))) for r in rows), [])]),
            use_cache=False,
        ).logits[0]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_a_same_tokenizer_teacher_is_matched_to_the_student_by_token(docs, llama):
    data = AlignedWindows(docs, llama, [llama], 24, teacher_window=8, shuffle=False)
    for item in data:
        at, s_ids, t_ids = item["teacher_at_0"], item["student_ids"], item["teacher_ids_0"]
        assert (at >= 0).sum() > 0
        for p in np.flatnonzero(at >= 0):  # both predict the same next token
            assert t_ids[at[p] + 1] == s_ids[p + 1]


# ----------------------------------------------------------------------------- refused, never wrong


def test_a_cache_for_another_teacher_weights_or_context_is_refused(caches, qwen):
    c = cache_teacher.TeacherCache(caches["qwen3"], qwen)
    m = c.manifest
    right = (m["teacher"], m["tokenizer_hash"], m["weights"], m["rule"])
    c.check(*right)
    wrongs = [
        ("pkg:o200k", "teacher"),
        ("x", "tokenizer_hash"),
        ("preset tiny seed 7 pkg:qwen3", "weights"),
        ({**m["rule"], "teacher_window": 64}, "rule"),
    ]
    for k, (wrong, named) in enumerate(wrongs):
        args = list(right)
        args[k] = wrong
        with pytest.raises(cache_teacher.CacheError, match=f"made with {named} .*this run has"):
            c.check(*args)
    with pytest.raises(cache_teacher.CacheError, match="made with data_files"):
        c.check_data({"other.jsonl": 10})


def test_train_refuses_a_cache_made_with_other_weights_in_one_line(tmp_path, cache, docs, caches,
                                                                   capsys):  # fmt: skip
    with pytest.raises(SystemExit) as e:
        run(tmp_path, cache, docs, "--seed", "7", "--teacher-cache", caches["qwen3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made with weights" in err[0] and "seed 1337" in err[0]


def test_a_document_missing_from_the_cache_is_an_error_not_a_fallback(caches, qwen):
    c = cache_teacher.TeacherCache(caches["qwen3"], qwen)
    with pytest.raises(cache_teacher.CacheError, match="has no document"):
        c.read("a document nobody cached", 0, np.arange(1, 3), [1, 2, 3])


def test_damaged_or_truncated_shards_are_found(tmp_path, caches, qwen):
    copy = shutil.copytree(caches["qwen3"], tmp_path / "copy")
    shard = next(p for p in os.listdir(copy) if p.endswith(".npy"))
    with open(copy / shard, "r+b") as f:  # one byte of a record, flipped
        f.seek(-1000, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1000, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    c = cache_teacher.TeacherCache(str(copy), qwen)
    text = DOCS[-1]  # the last records: the last document's
    ids = qwen(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(cache_teacher.CacheError, match="fail their checksum"):
        c.read(text, 0, np.arange(1, len(ids)), ids)
    with open(copy / shard, "r+b") as f:
        f.truncate(os.path.getsize(copy / shard) - 8)
    with pytest.raises(cache_teacher.CacheError, match="truncated shard"):
        cache_teacher.TeacherCache(str(copy), qwen)


def test_a_killed_pass_resumes_and_an_unfinished_shard_never_looks_complete(tmp_path, docs, capsys):
    args = ["--topk", "4", "--shard-documents", "1"]
    out = make_cache(tmp_path / "c", docs, "pkg:qwen3", *args)
    names = sorted(p for p in os.listdir(out) if p.startswith("shard-"))
    assert len(names) == 6  # 3 documents, one shard each: records and index
    before = {p: open(os.path.join(out, p), "rb").read() for p in names}
    first_mtime = os.path.getmtime(os.path.join(out, names[0]))
    index = [p for p in names if p.endswith(".json")][-1]
    os.remove(os.path.join(out, index))  # killed after the shard's records, before its index
    c = cache_teacher.TeacherCache(out, get_qwen())
    assert len(c.shards) == 2  # the records without an index are not read
    make_cache(tmp_path / "c", docs, "pkg:qwen3", *args)  # the rerun resumes
    assert {p: open(os.path.join(out, p), "rb").read() for p in names} == before
    assert os.path.getmtime(os.path.join(out, names[0])) == first_mtime  # not recomputed
    with pytest.raises(SystemExit) as e:  # other settings on the same --out: one line, exit 2
        make_cache(tmp_path / "c", docs, "pkg:qwen3", "--topk", "8", "--shard-documents", "1")
    assert e.value.code == 2 and "made with topk 4, not 8" in capsys.readouterr().err


def get_qwen():
    from conftest import get_tokenizer

    return get_tokenizer("qwen3")


def test_cached_windows_collate_and_rebuild_the_logits_train_reads(docs, caches, llama, qwen):
    data = AlignedWindows(docs, llama, [qwen], 32, teacher_window=128, shuffle=False)
    data.caches = [cache_teacher.TeacherCache(caches["qwen3"], qwen)]
    batch = collate(list(data)[:2], data.pad_ids)
    logits = cache_teacher.teacher_logits(batch, 0, len(qwen))
    assert logits.shape[:2] == batch["teacher_chunk_0"].shape and logits.shape[-1] == len(qwen)
    assert "teacher_ids_0" not in batch  # nothing for a forward


def test_training_on_a_document_the_cache_lacks_stops_in_one_line(tmp_path, cache, docs, capsys):
    """A cache of the first 2 documents, a run over all 3 (from a DataLoader worker): exit 2 with
    the cache's line, not a traceback and not the teacher run in its place."""
    partial = make_cache(tmp_path / "c", docs, "pkg:qwen3", "--topk", "4", "--max-documents", "2")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", cache, docs, "--teacher-cache", partial, "--num-workers", "1")
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "has no document" in err[0], err


def torchrun(script: str, port: int, *argv: str) -> None:
    """A 2-process torchrun job on CPU (gloo) that must succeed."""
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += [f"--master_port={port}", os.path.join(ROOT, script), *argv]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]


def test_two_ranks_split_the_pass_and_train_from_it_under_ddp(tmp_path, cache, docs, caches, qwen):
    """torchrun: each rank caches its documents into its own shards (the same distributions as
    one process's), and a 2-rank DDP run from that cache logs what the 2-rank online run logs."""
    out = str(tmp_path / "c2")
    torchrun("cache_teacher.py", 29531, "--preset", "tiny", "--teacher", "pkg:qwen3", "--data",
             docs, "--out", out, "--topk", "0")  # fmt: skip
    two, one = (
        cache_teacher.TeacherCache(out, qwen),
        cache_teacher.TeacherCache(caches["qwen3"], qwen),
    )
    assert sorted({os.path.basename(p).split("-")[1] for p, _, _ in two.shards}) == [
        "00000",
        "00001",
    ]
    for text in DOCS:
        ids = qwen(text, add_special_tokens=False)["input_ids"]
        tokens = np.arange(1, len(ids))
        a, b = (c.read(text, 0, tokens, ids)["cache_logits"] for c in (one, two))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    ddp = ["--preset", "tiny", "--data", docs, "--max-steps", "2", "--save-every", "0",
           "--num-workers", "0", "--projection-cache", cache]  # fmt: skip
    torchrun("train.py", 29533, *ddp, "--out-dir", str(tmp_path / "online"))
    torchrun("train.py", 29535, *ddp, "--out-dir", str(tmp_path / "cached"), "--teacher-cache", out)
    online, cached = read_metrics(tmp_path / "online"), read_metrics(tmp_path / "cached")
    assert_same_run(online, cached, ["pkg:qwen3"])
