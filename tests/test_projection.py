"""build_projection.py on the real tokenizers: METHOD.md section 2, checked from its definitions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import build_projection
from build_projection import build_projection as build
from build_projection import export_topk, load_projection, save_projection, to_topk
from conftest import ROOT, get_projection, get_tokenizer
from tokens import end_of_document_id, load_tokenizer, token_bytes, tokenizer_hash


def row(projection: dict, student_id: int) -> dict[int, float]:
    """{teacher_id: weight} of one student row."""
    W = projection["W"].coalesce()
    mask = W.indices()[0] == student_id
    return dict(zip(W.indices()[1][mask].tolist(), W.values()[mask].tolist()))


def single_id(tok, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1, f"{text!r} is not one token: {ids}"
    return ids[0]


def test_201_maps_to_three_qwen_digits(llama, qwen, W_llama_qwen):
    # METHOD.md 2.2: piece i weighs 0.9 * 0.1**i, then the row is normalized
    raw = [0.9 * 0.1**i for i in range(3)]
    expected = {
        single_id(qwen, d): w / sum(raw) for d, w in zip("201", raw)
    }  # "2" .9009, "0" .0901, "1" .0090
    got = row(W_llama_qwen, single_id(llama, "201"))
    assert got.keys() == expected.keys()
    for t, w in expected.items():
        assert got[t] == pytest.approx(w, abs=1e-6)
    assert got[single_id(qwen, "2")] == pytest.approx(0.9009, abs=1e-4)


def test_exact_pairs_have_identical_bytes_and_one_hot_rows(llama, qwen, W_llama_qwen):
    s_bytes, t_bytes = token_bytes(llama), token_bytes(qwen)
    pairs = W_llama_qwen["exact_pairs"].tolist()
    assert len(pairs) > 100_000  # both are byte-level BPEs trained on similar text
    text_pairs = [(s, t) for s, t in pairs if s_bytes[s] is not None]
    assert all(s_bytes[s] == t_bytes[t] for s, t in text_pairs)
    the = single_id(llama, " the")
    assert row(W_llama_qwen, the) == {single_id(qwen, " the"): 1.0}
    # 1-to-1 on both sides
    assert len({s for s, _ in pairs}) == len(pairs) == len({t for _, t in pairs})


def test_utf8_fragments_map_to_teacher_tokens_covering_the_same_bytes(llama, qwen, W_llama_qwen):
    s_bytes, t_bytes = token_bytes(llama), token_bytes(qwen)
    replacement = set(qwen.encode("\ufffd", add_special_tokens=False))
    fragments = []
    for s, b in enumerate(s_bytes):
        if b is None:
            continue
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            fragments.append(s)
    assert 1300 < len(fragments) < 1400  # METHOD.md: about 1,361 Llama-3 tokens
    for s in fragments:
        entries = row(W_llama_qwen, s)
        assert entries, f"fragment {s_bytes[s]!r} has an empty row"
        assert not replacement & entries.keys(), f"{s_bytes[s]!r} maps through U+FFFD"
        # the heaviest piece starts the fragment and every piece is part of it (a repeated
        # piece such as b"\xac" twice is one entry, so the pieces need not concatenate to it)
        ordered = [t for t, _ in sorted(entries.items(), key=lambda e: -e[1])]
        assert s_bytes[s].startswith(t_bytes[ordered[0]])
        assert all(t_bytes[t] in s_bytes[s] for t in ordered)


def test_rows_sum_to_one_or_are_empty(W_llama_qwen, W_llama_o200k):
    for projection in (W_llama_qwen, W_llama_o200k):
        W = projection["W"]
        assert W.is_sparse and W.dtype == torch.float32
        sums = torch.zeros(W.shape[0]).index_add_(0, W.indices()[0], W.values())
        nonempty = sums > 0
        assert torch.allclose(sums[nonempty], torch.ones(int(nonempty.sum())), atol=1e-6)
        counts = torch.bincount(W.indices()[0], minlength=W.shape[0])
        assert int(counts.max()) <= 4  # top-4


def special(projection: dict) -> list[tuple[str, str, str]]:
    """(role, student token, teacher token) of the special pairs a W records."""
    return [
        (p["role"], p["student_token"], p["teacher_token"]) for p in projection["special_pairs"]
    ]


def test_llama_end_of_text_pairs_with_qwens_endoftext_not_its_im_end(llama, qwen, W_llama_qwen):
    # Qwen3's config calls <|im_end|> (end of a chat turn) eos and <|endoftext|> (end of a
    # document) pad; Llama-3.2's eos <|end_of_text|> ends a document: it pairs with <|endoftext|>
    end_of_text = llama.convert_tokens_to_ids("<|end_of_text|>")
    endoftext = qwen.convert_tokens_to_ids("<|endoftext|>")
    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    assert (end_of_text, endoftext, im_end) == (128001, 151643, 151645)
    assert row(W_llama_qwen, end_of_text) == {endoftext: 1.0}
    assert not (W_llama_qwen["W"].coalesce().indices()[1] == im_end).any()  # no row reaches it
    assert [end_of_text, endoftext] in W_llama_qwen["exact_pairs"].tolist()
    # Qwen3 declares no BOS; Llama's pad would pair with <|endoftext|>, already its end of text
    assert row(W_llama_qwen, llama.convert_tokens_to_ids("<|begin_of_text|>")) == {}
    assert row(W_llama_qwen, llama.convert_tokens_to_ids("<|finetune_right_pad_id|>")) == {}
    assert row(W_llama_qwen, llama.convert_tokens_to_ids("<|eot_id|>")) == {}
    assert row(W_llama_qwen, llama.convert_tokens_to_ids("<|reserved_special_token_10|>")) == {}
    assert special(W_llama_qwen) == [("end_of_document", "<|end_of_text|>", "<|endoftext|>")]
    assert W_llama_qwen["special_pairs"][0]["student_id"] == end_of_text
    assert W_llama_qwen["special_pairs"][0]["teacher_id"] == endoftext


def test_llama_vs_o200k_pairs_end_of_text_and_leaves_bos_unpaired(llama, o200k, W_llama_o200k):
    # o200k has one <|endoftext|> (id 199999) as both bos and eos: it is the end of a document
    begin, end = (llama.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|end_of_text|>"))
    endoftext = o200k.convert_tokens_to_ids("<|endoftext|>")
    assert endoftext == 199_999
    assert row(W_llama_o200k, end) == {endoftext: 1.0}
    assert row(W_llama_o200k, begin) == {}
    pairs = W_llama_o200k["exact_pairs"].tolist()
    assert [end, endoftext] in pairs and begin not in [s for s, _ in pairs]
    assert special(W_llama_o200k) == [("end_of_document", "<|end_of_text|>", "<|endoftext|>")]


def test_llama_vs_mistral_pairs_end_of_document_and_bos(llama, mistral):
    projection = get_projection("llama-3.2", "mistral-v1")
    end, begin = mistral.convert_tokens_to_ids("</s>"), mistral.convert_tokens_to_ids("<s>")
    assert (begin, end) == (1, 2)
    assert row(projection, llama.convert_tokens_to_ids("<|end_of_text|>")) == {end: 1.0}
    assert row(projection, llama.convert_tokens_to_ids("<|begin_of_text|>")) == {begin: 1.0}
    assert special(projection) == [
        ("end_of_document", "<|end_of_text|>", "</s>"),
        ("bos", "<|begin_of_text|>", "<s>"),
    ]


def test_mistral_v1_vs_v3_pairs_every_role_and_unk(mistral):
    projection = build(mistral, get_tokenizer("mistral-v3"))
    assert special(projection) == [
        ("end_of_document", "</s>", "</s>"),
        ("bos", "<s>", "<s>"),
        ("unk", "<unk>", "<unk>"),
    ]
    for s, t in ((2, 2), (1, 1), (0, 0)):
        assert row(projection, s) == {t: 1.0}
        assert [s, t] in projection["exact_pairs"].tolist()


def test_reverse_pass_keeps_special_rows_one_hot(mistral, qwen):
    # Qwen3 has "</s>" as plain TEXT (not its special token); re-encoded by Mistral it could
    # spell Mistral's special </s> (it did before encode_bytes read every string as text): the
    # reverse pass adds nothing to a special token's row, which stays its exact pair
    text_eos = qwen.backend_tokenizer.get_vocab()["</s>"]
    assert token_bytes(qwen)[text_eos] == b"</s>"
    projection = build(mistral, qwen, reverse=True)
    assert row(projection, mistral.convert_tokens_to_ids("</s>")) == {
        qwen.convert_tokens_to_ids("<|endoftext|>"): 1.0
    }


@pytest.mark.parametrize(
    "name, expected",
    [
        ("llama-3.2", "<|end_of_text|>"),
        ("qwen3", "<|endoftext|>"),
        ("o200k", "<|endoftext|>"),
        ("mistral-v1", "</s>"),
        ("mistral-v3", "</s>"),
    ],
)
def test_end_of_document_id_of_each_packaged_tokenizer(name, expected):
    tok = get_tokenizer(name)
    token_id = end_of_document_id(tok)
    assert token_id == tok.convert_tokens_to_ids(expected)
    assert token_bytes(tok)[token_id] is None  # an added token, not text


@pytest.mark.parametrize("eos", ["<|im_end|>", "<|endoftext|>", None])
def test_end_of_document_id_of_qwen3_instruct_base_and_bare_configs(eos):
    # Qwen3 (instruct): eos <|im_end|>, pad <|endoftext|>; Qwen3-Base: eos <|endoftext|>
    tok = load_tokenizer("pkg:qwen3")  # a fresh object: the session fixture stays as shipped
    tok.eos_token = eos
    assert tok.eos_token_id == (None if eos is None else tok.convert_tokens_to_ids(eos))
    assert end_of_document_id(tok) == tok.convert_tokens_to_ids("<|endoftext|>") == 151643


def test_end_of_document_id_of_llama_instruct_config():
    tok = load_tokenizer("pkg:llama-3.2")
    tok.eos_token = "<|eot_id|>"  # Llama-3.2-Instruct's config
    assert tok.eos_token_id == 128009
    assert end_of_document_id(tok) == tok.convert_tokens_to_ids("<|end_of_text|>") == 128001


def test_end_of_document_id_falls_back_to_eos_and_ignores_plain_text():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"a": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    backend.add_special_tokens(["<|im_end|>"])  # id 3
    turn_only = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    assert end_of_document_id(turn_only) == 3  # "</s>" here is text, not an end of document
    assert end_of_document_id(PreTrainedTokenizerFast(tokenizer_object=backend)) is None


def test_sentencepiece_and_byte_level_match_through_bytes(llama, mistral):
    sp_to_bl = get_projection("mistral-v1", "llama-3.2")
    assert row(sp_to_bl, mistral.convert_tokens_to_ids("▁the")) == {
        llama.convert_tokens_to_ids("Ġthe"): 1.0
    }
    # byte-fallback pieces are bytes: <0x41> is "A", <0xE4> is Llama's single-byte token 0xE4
    byte_e4 = [i for i, b in enumerate(token_bytes(llama)) if b == b"\xe4"]
    assert row(sp_to_bl, mistral.convert_tokens_to_ids("<0x41>")) == {single_id(llama, "A"): 1.0}
    assert row(sp_to_bl, mistral.convert_tokens_to_ids("<0xE4>")) == {byte_e4[0]: 1.0}
    bl_to_sp = get_projection("llama-3.2", "mistral-v1")
    assert row(bl_to_sp, llama.convert_tokens_to_ids("Ġthe")) == {
        mistral.convert_tokens_to_ids("▁the"): 1.0
    }
    # re-encoding adds no prefix space: " cats" -> ("▁c", "ats")-style pieces covering " cats" only
    m_bytes = token_bytes(mistral)
    for text in ("201", "ing", "Hello"):
        entries = row(bl_to_sp, single_id(llama, text))
        pieces = b"".join(m_bytes[t] for t, _ in sorted(entries.items(), key=lambda e: -e[1]))
        assert pieces == text.encode(), (text, pieces)


def test_sentencepiece_byte_fallback_prefers_the_regular_piece(llama, mistral):
    # Llama's "A" could match Mistral's "A" or its <0x41> byte piece: the regular piece wins
    bl_to_sp = get_projection("llama-3.2", "mistral-v1")
    assert row(bl_to_sp, single_id(llama, "A")) == {mistral.convert_tokens_to_ids("A"): 1.0}


def test_W_is_shaped_to_model_vocab_sizes_with_empty_padding(llama, qwen):
    projection = build(llama, qwen, student_vocab_size=128_300, teacher_vocab_size=151_936)
    W = projection["W"]
    assert tuple(W.shape) == (128_300, 151_936)
    assert int(W.indices()[0].max()) < len(llama)  # padding rows empty
    assert int(W.indices()[1].max()) < len(qwen)  # padding columns unused
    assert projection["student"]["vocab_size"] == 128_300
    assert projection["teacher"]["tokenizer_size"] == len(qwen)


def test_vocab_size_smaller_than_tokenizer_is_an_error(llama, qwen):
    with pytest.raises(ValueError, match="smaller than its tokenizer"):
        build(llama, qwen, teacher_vocab_size=1000)


def test_a_model_with_fewer_rows_than_its_tokenizer_hears_that_they_disagree(llama, qwen):
    # train.py builds W with the teacher model's output rows: 151,000 rows for 151,669 ids is a
    # model and a tokenizer that do not belong together, not a flag to pass (train.py has none)
    with pytest.raises(ValueError) as info:
        build(llama, qwen, teacher_vocab_size=151_000)
    message = str(info.value)
    assert "vocab size 151000 (the model's embedding rows) is smaller than its tokenizer" in message
    assert "(151669 ids; ids >= 151000 would have no row)" in message
    assert "the model and its tokenizer disagree; use the tokenizer saved with" in message
    assert "--teacher-vocab-size" not in message and "\n" not in message


def test_reverse_pass_is_off_by_default_and_adds_links(mistral):
    # The mistral-v1 pair is small (32k x 32k) so that the reverse pass stays quick.
    v3 = get_tokenizer("mistral-v3")
    forward = build(mistral, v3)
    assert forward["params"]["reverse"] is False
    both = build(mistral, v3, reverse=True)
    assert both["params"]["reverse"] is True
    assert both["W"]._nnz() > forward["W"]._nnz()


def test_file_loads_with_weights_only_and_has_the_documented_keys(tmp_path, llama, qwen):
    path = str(tmp_path / "W.pt")
    save_projection(get_projection("llama-3.2", "qwen3"), path)
    loaded = torch.load(path, weights_only=True)
    assert {"W", "exact_pairs", "student", "teacher", "params", "version"} <= loaded.keys()
    assert loaded["version"] == 2
    assert [p["role"] for p in loaded["special_pairs"]] == ["end_of_document"]
    assert loaded["W"].is_sparse and loaded["W"].dtype == torch.float32
    assert loaded["exact_pairs"].dtype == torch.long and loaded["exact_pairs"].shape[1] == 2
    assert loaded["student"]["sha256"] == tokenizer_hash(llama)
    assert loaded["teacher"]["sha256"] == tokenizer_hash(qwen)
    assert load_projection(path, llama, qwen)["version"] == loaded["version"]


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "W.pt"
    path.write_bytes(b"previous")

    def crash(obj, f):
        f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_projection({"W": None}, str(path))
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["W.pt"]  # no temp file left behind


# ----------------------------------------------------------------------------- bad input


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = build_projection.main(argv)
    err = capsys.readouterr().err
    return code, err


def test_unknown_tokenizer_path_is_a_one_line_error(tmp_path, capsys):
    code, err = run_cli(
        ["--student", "./no/such/dir", "--teacher", "pkg:qwen3", "--out", str(tmp_path / "W.pt")],
        capsys,
    )
    assert code == 2 and "does not exist" in err and err.count("\n") == 1


def test_a_file_that_is_not_a_tokenizer_is_a_one_line_error(tmp_path, capsys):
    bogus = tmp_path / "tokenizer.json"
    bogus.write_text('{"hello": 1}')
    code, err = run_cli(
        ["--student", str(bogus), "--teacher", "pkg:qwen3", "--out", str(tmp_path / "W.pt")],
        capsys,
    )
    assert code == 2 and "not a tokenizer" in err and err.count("\n") == 1


def test_unwritable_output_directory_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a directory should be
    out = str(blocker / "sub" / "W.pt")
    code, err = run_cli(
        ["--student", "pkg:mistral-v1", "--teacher", "pkg:mistral-v3", "--out", out], capsys
    )
    assert code == 2 and "cannot write" in err and err.count("\n") == 1


def test_corrupt_and_truncated_W_files_are_clear_errors(tmp_path, llama, qwen):
    good = tmp_path / "W.pt"
    save_projection(get_projection("llama-3.2", "qwen3"), str(good))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file" * 10)
    cut_short = tmp_path / "cut_short.pt"
    cut_short.write_bytes(good.read_bytes()[:-10])
    for path in (truncated, garbage, cut_short):
        with pytest.raises(ValueError, match="corrupt or truncated") as info:
            load_projection(str(path), llama, qwen)
        assert "\n" not in str(info.value)


def test_W_from_another_tokenizer_pair_names_both_hashes(tmp_path, llama, qwen, o200k):
    path = str(tmp_path / "W.pt")
    save_projection(get_projection("llama-3.2", "qwen3"), path)
    with pytest.raises(ValueError) as info:
        load_projection(path, llama, o200k)
    message = str(info.value)
    assert tokenizer_hash(qwen)[:16] in message and tokenizer_hash(o200k)[:16] in message


def test_W_of_format_version_1_is_refused_in_one_line(tmp_path, capsys, llama, qwen):
    # version 1 paired special tokens by config role name: it must be rebuilt, never reused
    old = {k: v for k, v in get_projection("llama-3.2", "qwen3").items() if k != "special_pairs"}
    path = str(tmp_path / "W.pt")
    save_projection(dict(old, version=1), path)
    with pytest.raises(ValueError, match="version 1 .*role name.*rebuild it"):
        load_projection(path, llama, qwen)
    import audit

    code = audit.main(
        ["--student", "pkg:llama-3.2", "--teacher", "pkg:qwen3", "--projection", path]
    )
    err = capsys.readouterr().err
    assert code == 2 and "version 1" in err and err.count("\n") == 1
    save_projection(dict(old, version=build_projection.FORMAT_VERSION), path)
    with pytest.raises(ValueError, match="lacks \\['special_pairs'\\]"):
        load_projection(path, llama, qwen)


def test_W_of_an_unknown_version_is_a_clear_error(tmp_path):
    projection = dict(get_projection("llama-3.2", "qwen3"), version=99)
    path = str(tmp_path / "W.pt")
    save_projection(projection, path)
    with pytest.raises(ValueError, match="version 99"):
        load_projection(path)


def test_cli_builds_a_loadable_file_in_a_fresh_process(tmp_path):
    out = tmp_path / "W.pt"
    result = subprocess.run(
        [
            sys.executable,
            "build_projection.py",
            "--student",
            "pkg:llama-3.2",
            "--teacher",
            "pkg:qwen3",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "exact pairs" in result.stdout
    loaded = torch.load(out, weights_only=True)
    assert tuple(loaded["W"].shape) == (
        len(get_tokenizer("llama-3.2")),
        len(get_tokenizer("qwen3")),
    )


# ----------------------------------------------------------------------------- the CLIs' bad input
# Shared by test_audit.py and mini/test_mini.py (imported from here). Every CLI runs in-process
# through its main(argv); a bad input is ONE line on stderr, exit status 2, no traceback, nothing
# written.


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of main(argv); argparse's errors leave through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert fragment in err, err


class ReachedTheWork(AssertionError):
    """Raised where slow work would start: an input check came too late."""


def no_work(*args, **kwargs):
    raise ReachedTheWork("the input checks let the command start its work")


@pytest.fixture
def cached_tokenizers(monkeypatch):
    """pkg:NAME from the session's cache (conftest), every other name as the CLIs load it."""
    import audit
    import conftest
    import tokens

    real = tokens.load_tokenizer

    def load(name, **kwargs):
        if not name.startswith("pkg:"):
            return real(name, **kwargs)
        if name[4:] not in conftest._TOKENIZERS:  # get_tokenizer would call this patch again
            conftest._TOKENIZERS[name[4:]] = real(name)
        return conftest._TOKENIZERS[name[4:]]

    monkeypatch.setattr(audit, "load_tokenizer", load)
    monkeypatch.setattr(build_projection, "load_tokenizer", load)


@pytest.fixture
def readonly_dir(tmp_path, monkeypatch):
    """A directory nobody may write into. Root ignores the mode bits: there tempfile.mkstemp (the
    only way these CLIs create files) is refused in it, as the kernel refuses everyone else."""
    import errno
    import tempfile

    directory = tmp_path / "readonly"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        (directory / "probe").touch()
    except PermissionError:
        pass
    else:  # root
        (directory / "probe").unlink()
        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and os.path.abspath(dir) == str(directory):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    yield directory
    directory.chmod(0o755)


@pytest.fixture
def full_disk(monkeypatch):
    """Every write to a file opened from a descriptor (cli.atomic_write's temp file) fails
    with ENOSPC, as on a full disk."""
    import errno

    real = os.fdopen

    class Full:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real(*a, **k)))


PAIR = ["--student", "pkg:llama-3.2", "--teacher", "pkg:qwen3"]

BAD_BUILD_INPUTS = [
    (
        ["--student-vocab-size", "0"],
        "argument --student-vocab-size: 0 is out of range; give an integer >= 1",
    ),
    (["--teacher-vocab-size", "-5"], "argument --teacher-vocab-size: -5 is out of range"),
    (["--student-vocab-size", "12.5"], "argument --student-vocab-size: '12.5' is not an integer"),
    (
        ["--student-vocab-size", "1000"],
        "--student-vocab-size 1000 is smaller than the student tokenizer (128257 ids); give at "
        "least 128257 (the model's embedding rows)",
    ),
    (
        ["--teacher-vocab-size", "151000"],
        "--teacher-vocab-size 151000 is smaller than the teacher tokenizer (151669 ids)",
    ),
    (["--out", "{tmp}"], "is a directory; name a file, e.g. --out {tmp}/W.pt"),
    (["--out", "{tmp}/new/"], "ends with a slash (a directory)"),
    (["--out", ""], "--out is empty"),
    (["--out", "{tmp}/file/sub/W.pt"], "{tmp}/file is a file, not a directory"),
    (
        ["--student", "no-such-org/no-such-model"],
        "cannot load tokenizer 'no-such-org/no-such-model'",
    ),
    (["--student", "./no/such/dir"], "tokenizer path ./no/such/dir does not exist"),
    (["--teacher"], "argument --teacher: expected one argument"),
    (["--export-topk", "{tmp}"], "--export-topk {tmp} is a directory; name a file"),
    (["--export-topk", "{tmp}/W.pt"], "--out and --export-topk name the same file"),
    (["--export-topk", "{tmp}/file/W_topk.pt"], "{tmp}/file is a file, not a directory"),
]


@pytest.mark.parametrize(
    "extra, message", BAD_BUILD_INPUTS, ids=[" ".join(a) for a, _ in BAD_BUILD_INPUTS]
)
def test_build_projection_bad_input_is_one_line_and_exit_2(
    extra, message, tmp_path, capsys, cached_tokenizers, monkeypatch
):
    (tmp_path / "file").write_text("x")
    argv = [*PAIR, "--out", str(tmp_path / "W.pt"), *extra]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    monkeypatch.setattr(build_projection, "_top_k_normalized", no_work)  # W is never built
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: the hub name is unreachable
    code, err = run_main(build_projection.main, argv, capsys)
    assert_one_line_error(code, err, message.replace("{tmp}", str(tmp_path)))
    assert sorted(os.listdir(tmp_path)) == ["file"]  # nothing written


def test_build_projection_checks_sizes_it_is_given(llama, qwen):
    # 0 was replaced by the tokenizer's size ("or"): a size is a size, 0 included
    with pytest.raises(ValueError, match="student pkg:llama-3.2: vocab size 0 .* is smaller than"):
        build(llama, qwen, student_vocab_size=0)


def test_model_config_with_a_bad_vocab_size_is_a_clear_error(tmp_path):
    config = tmp_path / "config.json"
    config.write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json \(not valid JSON.*pass --teacher-vocab"):
        build_projection.model_vocab_size(str(tmp_path), "--teacher-vocab-size")
    for bad in ("0", '"128256"', "-1"):
        config.write_text(f'{{"vocab_size": {bad}}}')
        with pytest.raises(ValueError, match="not a positive integer; fix it or pass"):
            build_projection.model_vocab_size(str(tmp_path))
    config.write_text('{"vocab_size": null, "text_config": {"vocab_size": 128256}}')
    assert build_projection.model_vocab_size(str(tmp_path)) == 128256


@pytest.mark.parametrize("where", ["W.pt", "sub/dir/W.pt"])
def test_build_projection_refuses_a_read_only_directory_before_any_work(
    where, readonly_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(build_projection, "load_tokenizer", no_work)
    out = str(readonly_dir / where)
    code, err = run_main(build_projection.main, [*PAIR, "--out", out], capsys)
    assert_one_line_error(code, err, f"cannot write {out}: {readonly_dir} is not writable")
    assert os.listdir(readonly_dir) == []


def test_build_projection_on_a_full_disk_is_one_line_and_keeps_the_old_file(
    tmp_path, capsys, monkeypatch, cached_tokenizers, full_disk, W_llama_qwen
):
    monkeypatch.setattr(build_projection, "build_projection", lambda *a, **k: W_llama_qwen)
    out = tmp_path / "W.pt"
    out.write_bytes(b"previous")
    code, err = run_main(build_projection.main, [*PAIR, "--out", str(out)], capsys)
    assert_one_line_error(code, err, f"cannot write {out}: No space left on device")
    assert "; free some space" in err
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["W.pt"]


@pytest.fixture
def filling_disk(monkeypatch):
    """A disk that fills during a write, as a real one does: a write takes what still fits and
    says how much (a short write), the next one fails with ENOSPC. torch.save writing into such
    a file raises RuntimeError ("unexpected pos"), not an OSError. 64 kB fit."""
    import errno

    real, room = os.fdopen, {"left": 64_000}

    class Filling:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            n = min(len(memoryview(data).cast("B")), room["left"])
            if n == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            room["left"] -= n
            return self._f.write(memoryview(data).cast("B")[:n])

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Filling(real(*a, **k)))


@pytest.mark.parametrize("flag", ["--out", "--export-topk"])
@pytest.mark.usefixtures("cached_tokenizers")
def test_a_disk_that_fills_while_w_is_written_is_one_line_with_the_free_space(
    flag, tmp_path, capsys, monkeypatch, filling_disk, W_llama_qwen
):
    monkeypatch.setattr(build_projection, "build_projection", lambda *a, **k: W_llama_qwen)
    out = tmp_path / "W.pt"
    out.write_bytes(b"previous")
    code, err = run_main(build_projection.main, [*PAIR, flag, str(out)], capsys)
    assert_one_line_error(code, err, f"cannot write {out}: No space left on device (")
    assert " free on " in err and "; free some space" in err  # cli.free_space
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["W.pt"]  # no temp file


def test_a_projection_directory_or_unreadable_file_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="is a directory; pass the W file in it"):
        load_projection(str(tmp_path))
    path = tmp_path / "W.pt"
    path.write_bytes(b"x")

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(torch, "load", unreadable)
    with pytest.raises(ValueError, match="cannot read .*W.pt: Permission denied; check its perm"):
        load_projection(str(path))


NOT_W_FILES = {
    "empty": (b"", "is empty (0 bytes"),
    "text": (b"hello, this is not a W file\n", "is not a readable W file (corrupt or truncated"),
    "one byte": (b"x", "is not a readable W file"),
    "zeros": (bytes(4096), "is not a readable W file"),
    "a zip that is not torch's": (b"PK\x03\x04" + bytes(60), "is not a readable W file"),
    "JSON": (b'{"W": [[1.0]]}', "is not a readable W file"),
}


@pytest.mark.parametrize("what", list(NOT_W_FILES))
@pytest.mark.usefixtures("cached_tokenizers")
def test_a_file_that_is_no_w_file_is_one_line_naming_it(what, tmp_path, capsys):
    import audit

    content, message = NOT_W_FILES[what]
    path = tmp_path / "W.pt"
    path.write_bytes(content)
    code, err = run_main(audit.main, [*PAIR, "--projection", str(path)], capsys)
    assert_one_line_error(code, err, f"{path} {message}")
    assert "rebuild it with build_projection.py" in err


def tampered(projection: dict, **changes) -> dict:
    """A copy of a W dict with W's values mapped (`values`), or other keys replaced."""
    W = projection["W"].coalesce()
    values = changes.pop("values", lambda v: v)(W.values().clone())
    changed = torch.sparse_coo_tensor(W.indices(), values, W.shape, check_invariants=True)
    changed = changed.coalesce()
    return {**projection, "W": changed, **changes}


def bad_ours(W_llama_qwen, what: str) -> dict:
    W = W_llama_qwen["W"].coalesce()
    if what == "halved":  # every row sums to 0.5: H-KL's added set changes silently
        return tampered(W_llama_qwen, values=lambda v: v / 2)
    if what == "x5":
        return tampered(W_llama_qwen, values=lambda v: v * 5)
    if what == "one row off":
        return tampered(W_llama_qwen, values=lambda v: torch.cat([v[:1] * 0.9, v[1:]]))
    if what == "negative":  # rows still sum to 1
        return tampered(W_llama_qwen, values=lambda v: torch.cat([-v[:1], v[1:]]))
    if what == "nan":
        return tampered(W_llama_qwen, values=lambda v: torch.cat([v[:1] * float("nan"), v[1:]]))
    if what == "teacher id beyond the tokenizer":  # in W's padded columns
        indices = W.indices().clone()
        indices[1, 0] = W.shape[1] + 99
        bigger = (W.shape[0], W.shape[1] + 100)
        moved = torch.sparse_coo_tensor(indices, W.values(), bigger, check_invariants=True)
        moved = moved.coalesce()
        return {**W_llama_qwen, "W": moved}
    if what == "dense W":
        return {**W_llama_qwen, "W": torch.zeros(3, 3)}
    if what == "pair out of range":
        return {**W_llama_qwen, "exact_pairs": torch.tensor([[0, 10**7]])}
    raise AssertionError(what)


BAD_OURS = {
    "halved": "128,001 of W's 128,001 non-empty rows do not sum to 1 (student id 0 sums to 0.5)",
    "x5": "rows do not sum to 1 (student id 0 sums to 5)",
    "one row off": "1 of W's 128,001 non-empty rows do not sum to 1 (student id 0 sums to 0.9)",
    "negative": "W has negative or non-finite weights",
    "nan": "W has negative or non-finite weights",
    "teacher id beyond the tokenizer": "to teacher id 151768, but the teacher tokenizer pkg:qwen3 "
    "has 151669 ids: it was built for another teacher or is damaged",
    "dense W": "'W' is not a sparse float matrix [V_S, V_T]",
    "pair out of range": "'exact_pairs' is not a Long [n, 2] of (student id, teacher id) within W",
}


@pytest.mark.parametrize("what", list(BAD_OURS))
@pytest.mark.usefixtures("cached_tokenizers")
def test_a_w_file_with_invalid_entries_is_refused_in_one_line(what, tmp_path, capsys, W_llama_qwen):
    import audit

    path = str(tmp_path / "W.pt")
    torch.save(bad_ours(W_llama_qwen, what), path)
    code, err = run_main(audit.main, [*PAIR, "--projection", path], capsys)
    assert_one_line_error(code, err, BAD_OURS[what])
    assert err.startswith(f"error: {path}") and "rebuild it with build_projection.py" in err


def test_every_stage_reads_w_through_the_one_check():
    # audit.py and train.py (attach_projection) load W only through load_projection, which checks
    # every W it returns (check_entries): neither reads a W file on its own
    import audit
    import train

    for module in (audit, train):
        text = open(module.__file__).read()
        assert "load_projection(" in text and "torch.load(" not in text.replace("# torch.load(", "")


# ----------------------------------------------------------------------------- the top-k format
# NeMo-RL's and TRL's X-Token W: "indices" Long [V_S, k] (-1 pads), "likelihoods" [V_S, k], model
# ids as "student_model_id"/"teacher_model_id" (older files: "model_A_id"/"model_B_id").


def test_topk_export_round_trips_to_an_identical_W(tmp_path, llama, qwen, W_llama_qwen):
    path = str(tmp_path / "W_topk.pt")
    export_topk(W_llama_qwen, path, student_model_id="S", teacher_model_id="T")
    raw = torch.load(path, weights_only=True)
    assert raw["student_model_id"] == "S" and raw["teacher_model_id"] == "T"
    assert raw["enable_scale_trick"] is False  # no 0.2 slot (their sort_and_cut reads this)
    assert raw["student_tokenizer_sha256"] == tokenizer_hash(llama)
    indices, likelihoods = raw["indices"], raw["likelihoods"]
    assert indices.dtype == torch.long and likelihoods.dtype == torch.float32
    assert indices.shape == likelihoods.shape == (W_llama_qwen["W"].shape[0], 4)
    assert torch.equal(indices == -1, likelihoods == 0)  # -1 pads exactly the empty slots
    assert bool((likelihoods[:, :-1] >= likelihoods[:, 1:]).all())  # weight descending
    the, num = single_id(llama, " the"), single_id(llama, "201")
    # an exact pair is their strict exact map: [t, -1, ...] with weights [1, 0, ...]
    assert indices[the].tolist() == [single_id(qwen, " the"), -1, -1, -1]
    assert likelihoods[the].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert indices[num].tolist() == [single_id(qwen, d) for d in "201"] + [-1]

    loaded = load_projection(path, llama, qwen)
    W, back = W_llama_qwen["W"].coalesce(), loaded["W"]
    assert back.shape == W.shape and back.is_coalesced()
    assert torch.equal(back.indices(), W.indices()) and torch.equal(back.values(), W.values())
    assert torch.equal(loaded["exact_pairs"], W_llama_qwen["exact_pairs"])
    assert loaded["special_pairs"] == W_llama_qwen["special_pairs"]
    assert loaded["student"] == W_llama_qwen["student"]
    assert loaded["teacher"] == W_llama_qwen["teacher"]
    assert loaded["version"] == build_projection.FORMAT_VERSION
    assert loaded["params"]["source"] == "topk" and loaded["params"]["verified"] is True


def test_topk_export_keeps_a_padded_teacher_vocabulary(tmp_path, llama, qwen):
    projection = build(llama, qwen, student_vocab_size=128_300, teacher_vocab_size=151_936)
    path = str(tmp_path / "W_topk.pt")
    export_topk(projection, path, student_model_id="S", teacher_model_id="T")
    assert tuple(load_projection(path, llama, qwen)["W"].shape) == (128_300, 151_936)


def test_to_topk_never_cuts_a_row():
    W = torch.sparse_coo_tensor(
        [[0, 0, 0], [1, 2, 3]], [0.5, 0.3, 0.2], (2, 4), check_invariants=True
    )
    with pytest.raises(ValueError, match="a row of 3 entries, more than k = 2"):
        to_topk(W, 2)
    indices, likelihoods = to_topk(W, 3)
    assert indices.tolist() == [[1, 2, 3], [-1, -1, -1]]


def test_a_topk_file_with_hashes_is_verified_like_ours(tmp_path, llama, qwen, o200k, W_llama_qwen):
    path = str(tmp_path / "W_topk.pt")
    export_topk(W_llama_qwen, path, student_model_id="S", teacher_model_id="T")
    with pytest.raises(ValueError) as info:
        load_projection(path, llama, o200k)
    message = str(info.value)
    assert "another teacher tokenizer" in message and "\n" not in message
    assert tokenizer_hash(qwen)[:16] in message and tokenizer_hash(o200k)[:16] in message
    # its exact pairs come from the tokenizers: both are needed
    for tokenizers in ((), (llama,)):
        with pytest.raises(ValueError, match="top-k W file .*: pass --student and --teacher"):
            load_projection(path, *tokenizers)


def nemo_topk(llama, qwen, *, legacy: bool) -> tuple[dict, dict]:
    """A top-k file as NeMo-RL's tools write it (no tokenizer hashes, k = 4), by hand, and the
    rows {student id: {teacher id: weight}} it holds. "201" carries their scale trick: the last
    slot is 0.2 on an unrelated teacher id (" the"), then the row is normalized again."""
    rows = len(llama)
    indices = torch.full((rows, 4), -1, dtype=torch.long)
    likelihoods = torch.zeros((rows, 4))
    num, the, dot = single_id(llama, "201"), single_id(llama, " the"), single_id(llama, ".")
    digits = [single_id(qwen, d) for d in "201"]
    unrelated = single_id(qwen, " the")
    raw = [0.9 / 0.999, 0.09 / 0.999, 0.009 / 0.999, 0.2]
    indices[num] = torch.tensor([*digits, unrelated])
    likelihoods[num] = torch.tensor(raw) / sum(raw)
    indices[the], likelihoods[the, 0] = torch.tensor([unrelated, -1, -1, -1]), 1.0
    # a dense top-k slot of weight 0 (a real teacher id), and TRL's 0.2 on a -1 slot: no entries
    indices[dot] = torch.tensor([single_id(qwen, "."), single_id(qwen, ","), -1, -1])
    likelihoods[dot] = torch.tensor([1.0, 0.0, 0.0, 0.2])
    expected = {
        num: dict(zip([*digits, unrelated], (torch.tensor(raw) / sum(raw)).tolist())),
        the: {unrelated: 1.0},
        dot: {single_id(qwen, "."): 1.0},
    }
    ids = ("model_A_id", "model_B_id") if legacy else ("student_model_id", "teacher_model_id")
    data = {
        "indices": indices,
        # NeMo-RL's multitoken tool keeps the bfloat16 of its matrix; TRL writes float32
        "likelihoods": likelihoods.to(torch.bfloat16) if legacy else likelihoods,
        ids[0]: "meta-llama/Llama-3.2-1B",
        ids[1]: "Qwen/Qwen3-4B",
        "enable_scale_trick": True,
    }
    return data, expected


@pytest.mark.parametrize("legacy", [False, True], ids=["student_model_id", "model_A_id"])
def test_a_nemo_topk_file_loads_with_a_warning_and_no_padding_entries(
    legacy, tmp_path, capsys, llama, qwen, W_llama_qwen
):
    data, expected = nemo_topk(llama, qwen, legacy=legacy)
    path = str(tmp_path / "nemo.pt")
    torch.save(data, path)
    loaded = load_projection(path, llama, qwen)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ") and "cannot be verified" in err
    assert "built for meta-llama/Llama-3.2-1B -> Qwen/Qwen3-4B" in err
    W = loaded["W"]
    assert tuple(W.shape) == (len(llama), len(qwen)) and W.dtype == torch.float32
    assert int((W.indices()[1] < 0).sum()) == 0  # -1 padding never becomes an entry
    assert W._nnz() == sum(len(r) for r in expected.values())  # nor does a 0-weight slot
    tolerance = 1e-2 if legacy else 1e-6  # bfloat16
    for s, entries in expected.items():
        got = row(loaded, s)
        assert got.keys() == entries.keys()
        assert all(got[t] == pytest.approx(w, abs=tolerance) for t, w in entries.items())
    # the pairs come from the tokenizers, as build_projection computes them
    assert torch.equal(loaded["exact_pairs"], W_llama_qwen["exact_pairs"])
    assert loaded["special_pairs"] == W_llama_qwen["special_pairs"]
    assert loaded["params"] == {
        "source": "topk",
        "top_k": 4,
        "verified": False,
        "student_model_id": "meta-llama/Llama-3.2-1B",
        "teacher_model_id": "Qwen/Qwen3-4B",
    }


@pytest.mark.usefixtures("cached_tokenizers")
def test_audit_shows_the_scale_trick_entry_of_a_nemo_file(tmp_path, capsys, llama, qwen):
    import audit

    data, expected = nemo_topk(llama, qwen, legacy=False)
    path = str(tmp_path / "nemo.pt")
    torch.save(data, path)
    code = audit.main([*PAIR, "--projection", path, "--show", "201"])
    captured = capsys.readouterr()
    assert code == 0 and "cannot be verified" in captured.err
    weights = expected[single_id(llama, "201")]
    shown = ", ".join(
        f"{qwen.convert_ids_to_tokens(t)!r} ({t}) {w:.4f}"
        for t, w in sorted(weights.items(), key=lambda e: -e[1])
    )
    assert f"'201' (679) -> {shown}" in captured.out
    assert "'Ġthe' (279) 0.1667" in shown  # the 0.2 slot on an unrelated teacher id, normalized


def test_a_topk_file_without_hashes_needs_both_tokenizers(tmp_path, llama, qwen):
    data, _ = nemo_topk(llama, qwen, legacy=True)
    path = str(tmp_path / "nemo.pt")
    torch.save(data, path)
    message = (
        f"{path} is a top-k W file (NeMo-RL/TRL format) without tokenizer hashes: pass "
        "--student and --teacher; it cannot be verified against them"
    )
    for tokenizers in ((), (llama,), (None, qwen)):
        with pytest.raises(ValueError) as info:
            load_projection(path, *tokenizers)
        assert str(info.value) == message


def bad_topk(llama, qwen, what: str) -> dict:
    data, _ = nemo_topk(llama, qwen, legacy=False)
    indices, likelihoods = data["indices"], data["likelihoods"]
    if what == "fewer rows":  # a W for a smaller student vocabulary
        data["indices"], data["likelihoods"] = indices[:32_000], likelihoods[:32_000]
    elif what == "other k":
        data["likelihoods"] = likelihoods[:, :3]
    elif what == "1-D":
        data["indices"], data["likelihoods"] = indices[:, 0], likelihoods[:, 0]
    elif what == "float ids":
        data["indices"] = indices.float()
    elif what == "id -2":
        data["indices"][5, 0] = -2
    elif what == "nan weight":
        data["likelihoods"][5, 0] = float("nan")
    elif what == "not tensors":
        data["indices"] = indices.tolist()[:3]
    elif what == "teacher id 999999":  # audit.py showed its row; train.py refused the file
        data["indices"][single_id(llama, "201"), 3] = 999_999
    elif what == "halved":
        data["likelihoods"] = likelihoods / 2
    elif what == "rows sum to 5":
        data["likelihoods"] = likelihoods * 5
    return data


BAD_TOPK = {
    "fewer rows": "has 32000 rows (student ids) but the student tokenizer",
    "other k": "'indices' (128257, 4) and 'likelihoods' (128257, 3) are not one shape [V_S, k]",
    "1-D": "are not one shape [V_S, k]",
    "float ids": "'indices' is torch.float32, not integer teacher ids",
    "id -2": "'indices' has teacher id -2 (only -1 pads a row)",
    "nan weight": "'likelihoods' has negative or non-finite weights",
    "not tensors": "'indices' and 'likelihoods' are not tensors",
    "teacher id 999999": "maps student id 679 to teacher id 999999, but the teacher tokenizer "
    "pkg:qwen3 has 151669 ids: it was built for another teacher or is damaged; re-export it",
    "halved": "3 of W's 3 non-empty rows do not sum to 1 (student id 13 sums to 0.5)",
    "rows sum to 5": "rows do not sum to 1 (student id 13 sums to 5)",
}


@pytest.mark.parametrize("what", list(BAD_TOPK))
@pytest.mark.usefixtures("cached_tokenizers")
def test_a_bad_topk_file_is_a_one_line_error(what, tmp_path, capsys, llama, qwen):
    import audit

    path = str(tmp_path / "bad.pt")
    torch.save(bad_topk(llama, qwen, what), path)
    code, err = run_main(audit.main, [*PAIR, "--projection", path], capsys)
    assert_one_line_error(code, err, BAD_TOPK[what])
    assert "cannot be verified" not in err  # refused before it is used


@pytest.mark.usefixtures("cached_tokenizers")
def test_cli_exports_topk_alone_or_beside_ours(tmp_path, capsys, monkeypatch, W_llama_qwen):
    monkeypatch.setattr(build_projection, "build_projection", lambda *a, **k: W_llama_qwen)
    alone = tmp_path / "alone"
    code, err = run_main(
        build_projection.main, [*PAIR, "--export-topk", str(alone / "W_topk.pt")], capsys
    )
    assert code == 0, err
    assert os.listdir(alone) == ["W_topk.pt"]
    raw = torch.load(alone / "W_topk.pt", weights_only=True)
    assert (raw["student_model_id"], raw["teacher_model_id"]) == ("pkg:llama-3.2", "pkg:qwen3")
    both = [*PAIR, "--out", str(tmp_path / "W.pt"), "--export-topk", str(tmp_path / "W_topk.pt")]
    assert run_main(build_projection.main, both, capsys)[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["W.pt", "W_topk.pt", "alone"]
    assert torch.load(tmp_path / "W.pt", weights_only=True)["version"] == 2


def test_cli_without_an_output_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setattr(build_projection, "load_tokenizer", no_work)
    code, err = run_main(build_projection.main, PAIR, capsys)
    assert_one_line_error(code, err, "no output: pass --out W.pt, --export-topk W_topk.pt, or both")
