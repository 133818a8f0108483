"""mini.py: the toy data, the pruned vocabularies and W, the numeral-mass probe, and one smoke run
of every stage (train.py, evaluate.py) with a few steps. The real tokenizers throughout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_projection import assert_one_line_error, full_disk, no_work, readonly_dir, run_main  # noqa: F401  (fixtures)

import mini
from build_projection import hkl_pairs
from conftest import ROOT

SETTING = mini.SETTINGS["smoke"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mini"))
    paths = mini.make_data(out, SETTING)
    docs = {k: mini.read_jsonl(p) for k, p in paths.items()}
    return out, paths, docs


@pytest.fixture(scope="module")
def pruned(corpus):
    out, _, docs = corpus
    texts = [d["text"] for d in docs["teacher"] + docs["test"]]
    s_tok, n_s = mini.prune_tokenizer("pkg:llama-3.2", texts, os.path.join(out, "tok", "llama"))
    q_tok, n_q = mini.prune_tokenizer("pkg:qwen3", texts, os.path.join(out, "tok", "qwen"))
    return texts, s_tok, n_s, q_tok, n_q


def test_data_test_pairs_are_unseen_and_the_student_share_is_the_teachers(corpus):
    _, _, docs = corpus

    def pair(d):
        a, b = [int(w) for w in d["prompt"].replace(",", " ").split() if w.isdigit()]
        assert (
            int(d["answer"]) == a + b
            and d["text"] == f"{d['prompt']} {d['answer']} " + (d["text"].rsplit(" ", 1)[1])
        )
        return a, b

    train_pairs = {pair(d) for d in docs["teacher"]}
    assert not train_pairs & {pair(d) for d in docs["test"]}
    assert len(docs["student"]) == SETTING["student_docs"]
    assert docs["student"] == docs["teacher"][: SETTING["student_docs"]]
    assert len(docs["test"]) == SETTING["test_docs"]


def test_pruned_tokenizers_segment_like_the_real_ones_within_the_kept_ids(pruned, llama, qwen):
    texts, s_tok, n_s, q_tok, n_q = pruned
    for real, small, n in ((llama, s_tok, n_s), (qwen, q_tok, n_q)):
        assert len(small) == len(real)  # renumbered, not removed
        for text in texts[:200]:
            ids = small(text)["input_ids"]
            assert max(ids) < n
            real_ids = real(text)["input_ids"]
            assert small.convert_ids_to_tokens(ids) == real.convert_ids_to_tokens(real_ids)
            assert small.decode(ids) == real.decode(real_ids)
    assert s_tok.bos_token == llama.bos_token and s_tok.bos_token_id < n_s
    assert s_tok(texts[0])["input_ids"][0] == s_tok.bos_token_id


def test_every_numeral_and_special_token_is_kept(pruned, llama):
    _, s_tok, n_s, _, _ = pruned
    kept = set(s_tok.convert_ids_to_tokens(list(range(n_s))))
    numerals = [f"{i}" for i in range(10)] + [f"{i:02d}" for i in range(100)]
    numerals += [f"{i:03d}" for i in range(1000)]
    assert set(numerals) <= kept  # the corpus uses sums up to 198 only; all are kept
    assert {t.content for t in llama.added_tokens_decoder.values()} <= kept


def test_pruned_W_is_the_real_W_restricted_and_renormalized(pruned, W_llama_qwen, llama, qwen):
    """Row by row against the full W built from the real ids, mapped through token strings."""
    from build_projection import build_projection  # noqa: F401  (W_llama_qwen is its output)

    _, s_tok, n_s, q_tok, n_q = pruned
    small = mini.pruned_projection(s_tok, q_tok, n_s, n_q)
    assert tuple(small["W"].shape) == (n_s, n_q)
    dense_small = small["W"].to_dense()
    full = W_llama_qwen["W"].coalesce()
    kept_teacher = {q_tok.convert_ids_to_tokens(i): i for i in range(n_q)}
    for piece in ["167", "Ġshells", "Ġ", "Ġhas", "999", "00", "M", "ia"]:
        s_full, s_small = llama.convert_tokens_to_ids(piece), s_tok.convert_tokens_to_ids(piece)
        row = full.index_select(0, torch.tensor([s_full])).coalesce()
        expected = torch.zeros(n_q)
        for col, val in zip(row.indices()[1].tolist(), row.values().tolist()):
            name = qwen.convert_ids_to_tokens(col)
            if name in kept_teacher:
                expected[kept_teacher[name]] += val
        if expected.sum() > 0:
            expected /= expected.sum()
        torch.testing.assert_close(dense_small[s_small], expected)
    # "167": Qwen3 digits 1, 6, 7 with the weights 0.9, 0.09, 0.009, normalized
    row = dense_small[s_tok.convert_tokens_to_ids("167")]
    digits = [q_tok.convert_tokens_to_ids(d) for d in "167"]
    torch.testing.assert_close(row[digits], torch.tensor([0.9, 0.09, 0.009]) / 0.999)


def test_audit_of_the_pruned_vocabularies_keeps_the_numeral_coverage(pruned):
    from audit import audit

    _, s_tok, n_s, q_tok, n_q = pruned
    report = audit(s_tok, mini.pruned_projection(s_tok, q_tok, n_s, n_q))
    cats = report["categories"]
    assert (cats["digits_2"]["common"], cats["digits_2"]["total"]) == (0, 100)
    assert (cats["digits_3"]["common"], cats["digits_3"]["total"]) == (0, 1000)
    assert (cats["digits_1"]["common"], cats["digits_1"]["total"]) == (10, 10)
    assert report["recommended"] == "pkl"


def test_numeral_mass_of_a_uniform_model(pruned, corpus, tmp_path):
    """Zero output weights give a uniform next-token distribution: the mass on multi-digit
    numerals is their share of the vocabulary, and p(answer token) is 1/vocab."""
    _, s_tok, n_s, _, _ = pruned
    _, _, docs = corpus
    path = mini.init_model("llama", s_tok, n_s, str(tmp_path / "uniform"), seed=0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # tied: the input embeddings too
    model.save_pretrained(path)
    pieces = s_tok.convert_ids_to_tokens(list(range(n_s)))
    n_multi = sum(p.isdigit() and p.isascii() and len(p) > 1 for p in pieces)
    got = mini.numeral_mass(path, docs["test"])
    assert got["multi_digit_mass"] == pytest.approx(n_multi / n_s, rel=1e-5)
    assert got["p_correct"] == pytest.approx(1 / n_s, rel=1e-5)


BAD_MINI_INPUTS = [
    (["--parallel", "0"], "argument --parallel: 0 is out of range; give an integer >= 1"),
    (["--parallel", "-2"], "argument --parallel: -2 is out of range"),
    (["--parallel", "two"], "argument --parallel: 'two' is not an integer"),
    (["--seeds", "0,one"], "argument --seeds: '0,one' is not a comma-separated list of integers"),
    (["--seeds", ""], "argument --seeds: '' is not a comma-separated list of integers"),
    (
        ["--seeds", "0,-1"],
        "argument --seeds: seeds [-1] are out of range; give integers in [0, 2**32)",
    ),
    (["--seeds", "4294967296"], "seeds [4294967296] are out of range"),
    (["--seeds", "1,0,1"], "argument --seeds: seeds [1] are repeated; give each seed once"),
    (["--quick"], "argument --quick: not allowed with argument --smoke"),
    (["--row", "gold", "--row", "nonsense"], "unknown rows ['nonsense']; choose from ['ce only'"),
    (["--out", "{tmp}/file"], "--out {tmp}/file is a file, not a directory; name a directory"),
    (
        ["--out", "{tmp}/file/mini"],
        "cannot write {tmp}/file/mini: {tmp}/file is a file, not a directory",
    ),
    (["--out", ""], "--out is empty"),
]


@pytest.mark.parametrize(
    "extra, message", BAD_MINI_INPUTS, ids=[" ".join(a) for a, _ in BAD_MINI_INPUTS]
)
def test_bad_input_is_one_line_and_exit_2_before_any_work(
    extra, message, tmp_path, capsys, monkeypatch
):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(mini, "make_data", no_work)  # the first stage: never reached
    argv = ["--out", str(tmp_path / "out"), "--smoke", *extra]
    code, err = run_main(mini.main, [a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert_one_line_error(code, err, message.replace("{tmp}", str(tmp_path)))
    assert os.listdir(tmp_path) == ["file"]  # nothing written


def test_read_only_out_is_refused_before_any_work(request, capsys, monkeypatch):
    readonly = request.getfixturevalue("readonly_dir")
    monkeypatch.setattr(mini, "make_data", no_work)
    for out in (readonly, readonly / "mini"):
        code, err = run_main(mini.main, ["--out", str(out), "--smoke"], capsys)
        assert_one_line_error(code, err, f"cannot write {out}: {readonly} is not writable")
    assert os.listdir(readonly) == []


@pytest.mark.usefixtures("full_disk")
def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main(mini.main, ["--out", str(out), "--smoke"], capsys)
    expected = f"cannot write {out / 'data' / 'teacher.jsonl'}: No space left on device; free"
    assert_one_line_error(code, err, expected)
    assert [files for _, _, files in os.walk(out)] == [[], []]  # out/ and out/data/: no file


def test_the_script_exits_2_with_one_line(tmp_path):
    """The same through `python mini.py` (its exit status is main's), in a fresh process."""
    result = subprocess.run(
        [sys.executable, "mini.py", "--out", str(tmp_path), "--smoke", "--parallel", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result.returncode, result.stderr, "--parallel: 0 is out of range")
    assert result.stdout == "" and os.listdir(tmp_path) == []


def test_hkl_pairs_equal_golds_on_the_pruned_pair(pruned):
    """Why the full run leaves H-KL out: its pairs add nothing to GOLD's here. A numeral's top
    teacher token is its first digit (weight 0.9 >= 0.6), already paired with the student's
    single-digit token, and exact pairs keep priority."""
    _, s_tok, n_s, q_tok, n_q = pruned
    small = mini.pruned_projection(s_tok, q_tok, n_s, n_q)
    pairs = hkl_pairs(small["W"], small["exact_pairs"], threshold=0.6)
    assert sorted(map(tuple, pairs.tolist())) == sorted(map(tuple, small["exact_pairs"].tolist()))
    assert "hkl" in [r[0] for r in mini.ROWS] and "hkl" not in mini.FULL_ROWS


def test_smoke_run_of_every_stage_then_a_rerun_redoes_nothing(tmp_path, capsys):
    out = str(tmp_path / "run")
    mini.main(["--out", out, "--smoke"])
    first = capsys.readouterr().out
    summary = json.load(open(os.path.join(out, "results.json")))
    assert summary["rows"] == mini.QUICK_ROWS
    assert summary["audit"] == {"digits_2": "0/100", "digits_3": "0/1000"}
    for label in [f"{r} / seed 0" for r in mini.QUICK_ROWS] + ["teacher qwen"]:
        result = summary["results"][label]
        assert 0 <= result["exact_match"] <= 100
        assert 0 <= result["multi_digit_mass"] <= 1 and 0 < result["p_correct"] < 1
    table = open(os.path.join(out, "results.md")).read()
    assert all(f"| {r} |" in table for r in mini.QUICK_ROWS)
    assert first.count("trained ") == 1 + len(mini.QUICK_ROWS)
    mini.main(["--out", out, "--smoke"])  # everything finished: no training again
    assert "trained " not in capsys.readouterr().out
