"""audit.py on the real tokenizers: the paper's Table 8 and the loss it recommends."""

from __future__ import annotations

import json
import os
import sys

import pytest
from test_projection import (  # noqa: F401  (fixtures)
    PAIR,
    assert_one_line_error,
    cached_tokenizers,
    full_disk,
    no_work,
    readonly_dir,
    run_main,
)

import audit
from audit import CATEGORIES, categorize


def test_llama_vs_qwen3_has_no_multi_digit_numeral_in_common_and_recommends_pkl(
    llama, W_llama_qwen
):
    report = audit.audit(llama, W_llama_qwen)
    digits = report["categories"]
    # the paper's Table 8: 2-digit 0/100, 3-digit 0/1000 for Qwen3-4B
    assert (digits["digits_2"]["total"], digits["digits_2"]["common"]) == (100, 0)
    assert (digits["digits_3"]["total"], digits["digits_3"]["common"]) == (1000, 0)
    # Qwen splits digits: every numeral maps through several teacher pieces
    assert digits["digits_3"]["multi_piece"] == 1000
    assert digits["digits_1"]["common"] == digits["digits_1"]["total"] == 10
    assert report["recommended"] == "pkl"
    assert "0/1100" in report["reason"]


def test_llama_vs_o200k_has_every_numeral_in_common_and_recommends_hkl(llama, W_llama_o200k):
    report = audit.audit(llama, W_llama_o200k)
    digits = report["categories"]
    assert (digits["digits_2"]["total"], digits["digits_2"]["common"]) == (100, 100)
    assert (digits["digits_3"]["total"], digits["digits_3"]["common"]) == (1000, 1000)
    assert report["recommended"] == "hkl"


def test_category_counts_partition_the_vocabulary(llama, W_llama_qwen):
    report = audit.audit(llama, W_llama_qwen)
    rows = {**report["categories"], "other": report["other"]}
    assert sum(r["total"] for r in rows.values()) == len(llama)
    for name, r in rows.items():
        parts = r["common"] + r["hkl_added"] + r["multi_piece"] + r["unmapped"]
        assert parts == r["total"], name
    # every ASCII punctuation character is a token of both
    assert rows["punct_ascii"]["common"] >= 32
    assert rows["utf8_fragment"]["unmapped"] == 0


def test_categorize_follows_the_definitions():
    assert categorize(b"7") == "digits_1" and categorize(b" 42") == "digits_2"
    assert categorize(b"201") == "digits_3" and categorize(b"2010") != "digits_3"
    assert categorize(b" the") == "alpha" and categorize(b"\n\n") == "whitespace"
    assert categorize(b"...") == "punct_ascii" and categorize("é".encode()) == "non_ascii"
    assert categorize(b"\xe4\xb8") == "utf8_fragment" and categorize(None) == "special"


def test_cli_writes_the_json_schema_and_shows_rows(tmp_path, capsys, llama, qwen):
    out = tmp_path / "audit.json"
    code = audit.main(
        [
            "--student",
            "pkg:llama-3.2",
            "--teacher",
            "pkg:qwen3",
            "--json",
            str(out),
            "--show",
            "201",
            " the",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads(out.read_text())
    assert set(CATEGORIES) <= report["categories"].keys()
    for row in report["categories"].values():
        assert set(row) == {"total", "common", "hkl_added", "multi_piece", "unmapped"}
    assert report["recommended"] == "pkl" and report["reason"]
    assert "recommended loss: pkl" in printed
    assert "'201' (679) -> '2' (17) 0.9009, '0' (15) 0.0901, '1' (16) 0.0090" in printed
    assert "'Ġthe' (279) -> 'Ġthe' (279) 1.0000" in printed
    # the special tokens paired, by meaning: Llama's end of text with Qwen3's end of document
    # <|endoftext|> (151643), not with <|im_end|> (151645), which Qwen3's config calls eos
    end_of_text, endoftext = "<|end_of_text|>", "<|endoftext|>"
    assert report["special_pairs"] == [
        {
            "role": "end_of_document",
            "student_id": llama.convert_tokens_to_ids(end_of_text),
            "student_token": end_of_text,
            "teacher_id": qwen.convert_tokens_to_ids(endoftext),
            "teacher_token": endoftext,
        }
    ]
    assert (
        "special tokens paired:\n  end_of_document  '<|end_of_text|>' (128001) <-> "
        "'<|endoftext|>' (151643)\nrecommended loss" in printed
    )


def test_llama_vs_o200k_pairs_only_the_end_of_document(llama, o200k, W_llama_o200k):
    # o200k's <|endoftext|> is its bos and its eos: Llama's <|begin_of_text|> stays unpaired
    report = audit.audit(llama, W_llama_o200k)
    pairs = [(p["role"], p["student_token"], p["teacher_token"]) for p in report["special_pairs"]]
    assert pairs == [("end_of_document", "<|end_of_text|>", "<|endoftext|>")]
    assert report["special_pairs"][0]["teacher_id"] == o200k.convert_tokens_to_ids("<|endoftext|>")
    assert report["categories"]["special"]["common"] == 1  # only that pair among Llama's specials
    assert "special tokens paired:\n  end_of_document " in audit.format_table(report)


def test_cli_uses_a_W_file_and_rejects_one_from_another_pair(tmp_path, capsys, W_llama_qwen):
    from build_projection import save_projection

    path = str(tmp_path / "W.pt")
    save_projection(W_llama_qwen, path)
    code = audit.main(
        ["--student", "pkg:llama-3.2", "--teacher", "pkg:qwen3", "--projection", path]
    )
    assert code == 0 and "recommended loss: pkl" in capsys.readouterr().out
    code = audit.main(
        ["--student", "pkg:llama-3.2", "--teacher", "pkg:mistral-v1", "--projection", path]
    )
    err = capsys.readouterr().err
    assert code == 2 and "another teacher tokenizer" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- bad input

BAD_AUDIT_INPUTS = [
    (
        ["--min-coverage", "-1", "--threshold", "5"],
        "argument --min-coverage: -1 is out of range; give a number in [0, 1]",
    ),
    (["--threshold", "5"], "argument --threshold: 5 is out of range; give a number in (0, 1]"),
    (["--threshold", "0"], "argument --threshold: 0 is out of range"),
    (["--threshold", "nan"], "argument --threshold: nan is out of range"),
    (["--threshold", "inf"], "argument --threshold: inf is out of range"),
    (["--min-coverage", "1.5"], "argument --min-coverage: 1.5 is out of range"),
    (["--min-coverage", "most"], "argument --min-coverage: 'most' is not a number"),
    (
        ["--critical", "digits_2,digits_9"],
        "--critical: unknown category ['digits_9']; choose from digits_1",
    ),
    (["--json", "{tmp}"], "--json {tmp} is a directory; name a file, e.g. --json {tmp}/audit.json"),
    (
        ["--json", "{tmp}/file/audit.json"],
        "cannot write {tmp}/file/audit.json: {tmp}/file is a file, not a directory",
    ),
    (["--plot", "{tmp}"], "--plot {tmp} is a directory; name a file, e.g. --plot {tmp}/audit.png"),
    (["--plot", "{tmp}/file/a.png"], "cannot write {tmp}/file/a.png: {tmp}/file is a file"),
    (["--projection", "{tmp}"], "projection file {tmp} is a directory"),
    (["--projection", "{tmp}/W.pt"], "projection file {tmp}/W.pt does not exist; build it"),
    (
        ["--teacher", "no-such-org/no-such-model"],
        "cannot load tokenizer 'no-such-org/no-such-model'",
    ),
]


@pytest.mark.parametrize(
    "extra, message", BAD_AUDIT_INPUTS, ids=[" ".join(a) for a, _ in BAD_AUDIT_INPUTS]
)
@pytest.mark.usefixtures("cached_tokenizers")
def test_audit_bad_input_is_one_line_and_exit_2(extra, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in [*PAIR, *extra]]
    monkeypatch.setattr(audit, "audit", no_work)  # no bad input gets as far as the audit
    monkeypatch.setattr(audit, "build_projection", no_work)
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: the hub name is unreachable
    code, err = run_main(audit.main, argv, capsys)
    assert_one_line_error(code, err, message.replace("{tmp}", str(tmp_path)))
    assert os.listdir(tmp_path) == ["file"]  # nothing written


def test_audit_function_refuses_out_of_range_settings(llama, W_llama_qwen):
    for kwargs, message in (
        ({"threshold": 5}, r"threshold 5 .* \(0, 1\]"),
        ({"threshold": float("nan")}, "threshold nan"),
        ({"min_coverage": -1}, r"min_coverage -1 .* \[0, 1\]"),
        ({"critical": ("digits_9",)}, "unknown category"),
    ):
        with pytest.raises(ValueError, match=message):
            audit.audit(llama, W_llama_qwen, **kwargs)


def test_audit_refuses_a_read_only_json_location_before_any_work(request, capsys, monkeypatch):
    readonly = request.getfixturevalue("readonly_dir")
    monkeypatch.setattr(audit, "load_tokenizer", no_work)
    out = str(readonly / "audit.json")
    code, err = run_main(audit.main, [*PAIR, "--json", out], capsys)
    assert_one_line_error(code, err, f"cannot write {out}: {readonly} is not writable")
    assert os.listdir(readonly) == []


@pytest.mark.usefixtures("cached_tokenizers", "full_disk")
def test_audit_json_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch, W_llama_qwen):
    monkeypatch.setattr(audit, "build_projection", lambda *a, **k: W_llama_qwen)
    out = tmp_path / "audit.json"
    code, err = run_main(audit.main, [*PAIR, "--json", str(out)], capsys)
    assert_one_line_error(code, err, f"cannot write {out}: No space left on device")
    assert "; free some space" in err
    assert os.listdir(tmp_path) == []  # no temp file left


# ----------------------------------------------------------------------------- --plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_data_gives_the_reports_shares(llama, W_llama_qwen):
    report = audit.audit(llama, W_llama_qwen)
    bars = audit.plot_data(report)
    rows = {**report["categories"], "other": report["other"]}
    assert [b["category"] for b in bars] == list(rows)  # every category of Llama has tokens
    for bar in bars:
        row = rows[bar["category"]]
        assert bar["total"] == row["total"]
        assert bar["counts"] == {k: row[k] for k in audit.STATUSES}
        for key in audit.STATUSES:
            assert bar["shares"][key] == row[key] / row["total"]
        assert sum(bar["shares"].values()) == pytest.approx(1)
    by_name = {b["category"]: b for b in bars}
    assert by_name["digits_3"]["shares"]["multi_piece"] == 1.0  # Qwen3 splits every numeral
    assert by_name["digits_1"]["shares"]["common"] == 1.0
    assert [b["category"] for b in bars if b["critical"]] == ["digits_2", "digits_3"]
    # a category without tokens has no bar (no share of nothing)
    empty = dict(
        report, categories=dict(report["categories"], digits_1=dict.fromkeys(rows["alpha"], 0))
    )
    assert "digits_1" not in [b["category"] for b in audit.plot_data(empty)]


@pytest.mark.usefixtures("cached_tokenizers")
def test_cli_plot_writes_a_png(tmp_path, capsys, monkeypatch, W_llama_qwen):
    from matplotlib.image import imread

    monkeypatch.setattr(audit, "build_projection", lambda *a, **k: W_llama_qwen)
    out = tmp_path / "audit.png"
    code, err = run_main(audit.main, [*PAIR, "--plot", str(out)], capsys)
    assert code == 0, err
    data = out.read_bytes()
    assert len(data) > 10_000 and data.startswith(PNG_SIGNATURE)
    height, width, _ = imread(str(out)).shape  # decodes: a whole PNG
    assert width > 1000 and 400 < height < width
    assert os.listdir(tmp_path) == ["audit.png"]  # no temp file left


def test_plot_without_matplotlib_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setattr(audit, "load_tokenizer", no_work)
    out = tmp_path / "audit.png"
    code, err = run_main(audit.main, [*PAIR, "--plot", str(out)], capsys)
    assert_one_line_error(code, err, "--plot needs matplotlib, which is not installed: pip install")
    assert os.listdir(tmp_path) == []


@pytest.mark.usefixtures("cached_tokenizers", "full_disk")
def test_audit_plot_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch, W_llama_qwen):
    monkeypatch.setattr(audit, "build_projection", lambda *a, **k: W_llama_qwen)
    out = tmp_path / "audit.png"
    code, err = run_main(audit.main, [*PAIR, "--plot", str(out)], capsys)
    assert_one_line_error(code, err, f"cannot write {out}: No space left on device")
    assert "; free some space" in err
    assert os.listdir(tmp_path) == []
