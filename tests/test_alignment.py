"""align.align_text on REAL tokenizer pairs, checked against expectations computed here from the
definitions (METHOD.md section 4): token bytes, cumulative byte boundaries, the teacher's own
normalization (Qwen3: NFC); never from the aligner's own intermediate results."""

from __future__ import annotations

import functools
import json
import random
import re
import unicodedata

import numpy as np
import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from align import _spans_from_offsets, align_text, predictor_chunks, token_spans
from conftest import get_tokenizer
from tokens import token_bytes

TEXTS = {
    "numbers": "In 2024, 201 of 1,234,567 users paid $3.14159 (0.5% vs 12.75%) on 10/20/30.",
    "code": "def f(x):\n\treturn {'a': x**2 + 201}  # note\r\n\n    if x >= 10: print(x)\n",
    "cjk": "日本語のテキスト、中文文本和한국어 텍스트。猫が好き",
    # ZWJ sequences (family, technologist with skin tone), flags (regional indicator pairs)
    "emoji": "Family \U0001f469\u200d\U0001f469\u200d\U0001f467 and "
    "\U0001f468\U0001f3fd\u200d\U0001f4bb, flags "
    "\U0001f1eb\U0001f1f7\U0001f1ef\U0001f1f5, smile \U0001f600!",
    # precomposed, then combining marks (NFC composes them), the Angstrom sign, a double accent
    "accents": "café naïve résumé | cafe\u0301 nai\u0308ve re\u0301sume\u0301 | \u212b "
    "e\u0301\u0301",
    "compat": "x\uf900y \uf9a8\uf9b0 ok",  # NFC changes these CJK compatibility ideographs
    "whitespace": "a    b\n\n\n\nc\t\td  \r\n  e   \r\n\r\n\t x",
    "leading_digit": "201 is the first token",
    "leading_space": "  the end",
}
TEXTS["all"] = " ".join(TEXTS.values())

# teacher name -> its normalization of text (what its token bytes spell)
NORMALIZE = {
    "qwen3": lambda s: unicodedata.normalize("NFC", s),
    "o200k": lambda s: s,
    "mistral-v1": lambda s: s,
    "llama-3.2": lambda s: s,
}
_BYTES: dict = {}


def bytes_of(name: str) -> list:
    if name not in _BYTES:
        _BYTES[name] = token_bytes(get_tokenizer(name))
    return _BYTES[name]


def token_pieces(name: str, ids: list[int], text: str) -> list:
    """Each token's bytes in the tokenizer's normalized text; None for special tokens. A
    SentencePiece model's added prefix space is not in the text: drop it from the first piece."""
    pieces = [bytes_of(name)[i] for i in ids]
    target = NORMALIZE[name](text).encode()
    spelled = b"".join(p for p in pieces if p is not None)
    if spelled != target:
        assert spelled == b" " + target, f"{name} tokens do not spell the text"
        first = next(i for i, p in enumerate(pieces) if p is not None)
        pieces[first] = pieces[first][1:]
    return pieces


def offset_map(text: str, normalize) -> dict[int, int]:
    """Byte offsets of normalize(text) -> byte offsets of text, where the two correspond. Text is
    cut into segments (a starter and what composes with it); a segment that normalization leaves
    alone maps byte by byte; inside another one, a character offset maps when normalizing the two
    sides separately gives the same text as normalizing the segment."""
    segments, current = [], ""
    for ch in text:  # a new segment at a starter that does not compose with what precedes it
        if (
            current
            and unicodedata.combining(ch) == 0
            and (normalize(current + ch) == normalize(current) + normalize(ch))
        ):
            segments.append(current)
            current = ""
        current += ch
    segments += [current] if current else []
    assert "".join(normalize(s) for s in segments) == normalize(text)
    mapping, src, norm = {0: 0}, 0, 0
    for seg in segments:
        raw, out = seg.encode(), normalize(seg).encode()
        if raw == out:
            mapping.update({norm + k: src + k for k in range(1, len(raw) + 1)})
        else:
            for i in range(1, len(seg) + 1):
                head = normalize(seg[:i])
                if head + normalize(seg[i:]) == out.decode():
                    mapping[norm + len(head.encode())] = src + len(seg[:i].encode())
        src, norm = src + len(raw), norm + len(out)
    return mapping


def check_alignment(student: str, teacher: str, text: str) -> None:
    s_tok, t_tok = get_tokenizer(student), get_tokenizer(teacher)
    s_ids, t_ids, s_chunk, t_chunk = align_text(s_tok, t_tok, text)
    assert s_ids == s_tok(text)["input_ids"] and t_ids == t_tok(text)["input_ids"]
    assert len(s_chunk) == len(s_ids) and len(t_chunk) == len(t_ids)
    source = text.encode()
    sides = {}
    for name, ids, chunk in ((student, s_ids, s_chunk), (teacher, t_ids, t_chunk)):
        pieces = token_pieces(name, ids, text)
        to_source = offset_map(text, NORMALIZE[name])
        # special tokens are in no chunk, every text token is in one; ids rise in text order
        assert all((c == -1) == (p is None) for p, c in zip(pieces, chunk)), name
        in_text = [c for c in chunk if c >= 0]
        assert in_text == sorted(in_text), f"{name}: chunks are not monotonic"
        # each chunk's tokens are consecutive; its span, mapped back to the source text
        spans, ends, pos = {}, set(), 0
        for piece, c in zip(pieces, chunk):
            if piece is None:
                continue
            lo, pos = pos, pos + len(piece)
            ends.add(pos)
            if c in spans:
                assert spans[c][1] == lo, f"{name}: chunk {c} is not contiguous"
                spans[c] = (spans[c][0], pos)
            else:
                spans[c] = (lo, pos)
        spans = {c: (to_source[lo], to_source[hi]) for c, (lo, hi) in spans.items()}
        boundaries = {to_source[e] for e in ends | {0} if e in to_source}
        sides[name] = (pieces, spans, boundaries)
    (s_pieces, s_spans, s_bounds), (t_pieces, t_spans, t_bounds) = sides.values()
    # both sides have the same chunks 0..K-1 and each covers the same span of the source text
    assert sorted(s_spans) == sorted(t_spans) == list(range(len(s_spans)))
    assert s_spans == t_spans
    # the chunks tile the text
    edges = [s_spans[c] for c in range(len(s_spans))]
    assert [lo for lo, _ in edges[1:]] == [hi for _, hi in edges[:-1]]
    assert (edges[0][0], edges[-1][1]) == (0, len(source)) if text else edges == []
    # each side spells its chunk's source text exactly, or after its own normalization
    for c, (lo, hi) in s_spans.items():
        raw = source[lo:hi]
        for name, pieces, chunk in ((student, s_pieces, s_chunk), (teacher, t_pieces, t_chunk)):
            spelled = b"".join(p for p, k in zip(pieces, chunk) if k == c)
            assert spelled == raw or spelled == NORMALIZE[name](raw.decode()).encode(), (c, name)
    # as fine as possible: chunk edges are exactly the common boundaries
    common = s_bounds & t_bounds | {0, len(source)}
    assert {lo for lo, _ in edges} | {len(source)} == common


PAIRS = [("llama-3.2", "qwen3"), ("llama-3.2", "o200k"), ("llama-3.2", "mistral-v1")]


@pytest.mark.parametrize("student,teacher", PAIRS)
@pytest.mark.parametrize("kind", TEXTS)
def test_chunks_cover_equal_text_and_are_as_fine_as_possible(student, teacher, kind):
    check_alignment(student, teacher, TEXTS[kind])


def test_sentencepiece_student_against_nfc_teacher():
    check_alignment("mistral-v1", "qwen3", TEXTS["all"])
    check_alignment("qwen3", "llama-3.2", TEXTS["all"])


def test_201_maps_to_three_qwen_digits_in_one_chunk(llama, qwen):
    s_ids, t_ids, s_chunk, t_chunk = align_text(llama, qwen, "201")
    assert [llama.decode([i]) for i in s_ids[1:]] == ["201"]
    assert [qwen.decode([i]) for i in t_ids] == ["2", "0", "1"]
    assert s_chunk == [-1, 0] and t_chunk == [0, 0, 0]


def test_the_maps_to_the_in_one_chunk_each(llama, qwen):
    _, t_ids, s_chunk, t_chunk = align_text(llama, qwen, "and the")
    assert [qwen.decode([i]) for i in t_ids] == ["and", " the"]
    assert s_chunk == [-1, 0, 1] and t_chunk == [0, 1]


def test_llama_bos_is_in_no_chunk_and_qwen_has_none(llama, qwen):
    s_ids, t_ids, s_chunk, t_chunk = align_text(llama, qwen, "Hello world")
    assert s_ids[0] == llama.bos_token_id and s_chunk[0] == -1
    assert llama.bos_token_id not in t_ids and -1 not in t_chunk


def test_empty_text_has_no_chunk(llama, qwen):
    assert align_text(llama, qwen, "") == ([llama.bos_token_id], [], [-1], [])


def test_combining_mark_joins_its_letter_in_one_chunk(llama, qwen):
    # Qwen3's NFC turns "e" + U+0301 into one "é": Llama's separate U+0301 token joins that chunk
    s_ids, t_ids, s_chunk, t_chunk = align_text(llama, qwen, "cafe\u0301 ok")
    s_text = {}
    for i, c in zip(s_ids, s_chunk):
        s_text[c] = s_text.get(c, b"") + (bytes_of("llama-3.2")[i] or b"")
    t_text = {}
    for i, c in zip(t_ids, t_chunk):
        t_text[c] = t_text.get(c, b"") + bytes_of("qwen3")[i]
    accented = next(c for c, b in t_text.items() if "é".encode() in b)
    assert s_text[accented].endswith("e\u0301".encode())


def test_sentencepiece_prefix_space_belongs_to_no_source_byte(llama, mistral):
    # mistral spells "201 x" as <s>, "▁", "2", "0", "1", "▁x": its "▁" joins the first chunk
    _, t_ids, s_chunk, t_chunk = align_text(llama, mistral, "201 x")
    assert mistral.convert_ids_to_tokens(t_ids)[:5] == ["<s>", "▁", "2", "0", "1"]
    assert s_chunk == [-1, 0, 1] and t_chunk == [-1, 0, 0, 0, 0, 1]


def test_special_token_text_inside_the_text_is_text_on_both_sides(llama, qwen):
    s_ids, t_ids, s_chunk, t_chunk = align_text(llama, qwen, "a<|endoftext|>b c")
    assert qwen.convert_tokens_to_ids("<|endoftext|>") not in t_ids
    assert s_ids[0] == llama.bos_token_id and llama.bos_token_id not in s_ids[1:]
    assert b"".join(bytes_of("qwen3")[i] for i in t_ids) == b"a<|endoftext|>b c"
    # the marker's pieces pair up like any text: every chunk is on both sides
    assert s_chunk[0] == -1 and -1 not in s_chunk[1:] + t_chunk
    assert set(s_chunk[1:]) == set(t_chunk) and len(set(t_chunk)) > 3


# ----------------------------------------------------------------------------- special-token text
# Every added-token string of both tokenizers, in a text, is TEXT on both sides: each side adds only
# its own specials around the text (what it adds to a plain word). Checked from each token's
# vocabulary string and the tokenizer's added-token table, not from tokens.py's byte tables.


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table inverted, character -> byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    kept += range(ord("®"), ord("ÿ") + 1)
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + k): b for k, b in enumerate(moved)}


BYTE_LEVEL_DECODER = _byte_level_decoder()


@functools.cache
def spelled(name: str, token_id: int) -> bytes:
    """The bytes a text token spells, from its vocabulary string."""
    piece = get_tokenizer(name).convert_ids_to_tokens(token_id)
    if name.startswith("mistral"):  # SentencePiece: "▁" is a space, "<0xHH>" the byte HH
        if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode()
    return bytes(BYTE_LEVEL_DECODER[c] for c in piece)


@functools.cache
def added_tokens(name: str) -> dict[int, str]:
    decoder = get_tokenizer(name).backend_tokenizer.get_added_tokens_decoder()
    return {i: t.content for i, t in decoder.items()}


@functools.cache
def own_specials(name: str) -> tuple[list[int], list[int], bytes]:
    """(ids before, ids after, prefix space) that the tokenizer puts around any text: those of a
    plain word through the ordinary tokenizer call."""
    ids = get_tokenizer(name)("word")["input_ids"]
    text = [k for k, i in enumerate(ids) if i not in added_tokens(name)]
    prefix = b"".join(spelled(name, ids[k]) for k in text).removesuffix(b"word")
    assert prefix in (b"", b" ")
    return ids[: text[0]], ids[text[-1] + 1 :], prefix


def special_string_texts(*names: str) -> list[str]:
    """Texts holding every added-token string of these tokenizers: one text per string (at the
    start, between words, glued to words, twice in a row, after a newline, at the end), then all
    of them in one text, between words and back to back."""
    strings = sorted({s for name in names for s in added_tokens(name).values()})
    texts = [f"{s}start and {s} between words{s}glued{s}{s} 201\n{s}" for s in strings]
    texts.append(" ".join(strings) + " mixed " + "".join(f"w{k}{s}" for k, s in enumerate(strings)))
    texts.append(" " + "".join(strings) + " é日本\U0001f600 " + "".join(reversed(strings)))
    return texts


def check_special_strings_are_text(student: str, teacher: str, text: str) -> None:
    s_tok, t_tok = get_tokenizer(student), get_tokenizer(teacher)
    s_ids, t_ids, s_chunk, t_chunk = align_text(s_tok, t_tok, text)
    source = text.encode()
    sides = []
    for name, ids, chunk in ((student, s_ids, s_chunk), (teacher, t_ids, t_chunk)):
        lead, trail, prefix = own_specials(name)
        n = len(ids) - len(trail)
        # (b) no added token but the side's own ones around the text, which are in no chunk
        assert ids[: len(lead)] == lead and ids[n:] == trail, name
        assert not set(ids[len(lead) : n]) & added_tokens(name).keys(), name
        assert set(chunk[: len(lead)] + chunk[n:]) <= {-1}, name
        # (c) the text tokens spell the source bytes (after a SentencePiece prefix space, which
        # Mistral leaves out before a leading space)
        pieces = [spelled(name, i) for i in ids[len(lead) : n]]
        assert b"".join(pieces) in (source, prefix + source), name
        if prefix and b"".join(pieces) != source:
            pieces[0] = pieces[0][len(prefix) :]
        # each chunk's span of the source, from the token bytes: contiguous, in text order
        spans, pos = {}, 0
        for piece, c in zip(pieces, chunk[len(lead) : n]):
            lo, pos = pos, pos + len(piece)
            assert c >= 0, name
            if c in spans:
                assert spans[c][1] == lo and c == max(spans), name
            spans[c] = (spans.get(c, (lo, pos))[0], pos)
        sides.append((spans, {c: source[lo:hi] for c, (lo, hi) in spans.items()}))
    (s_spans, s_bytes), (t_spans, t_bytes) = sides
    # (a) every chunk is on both sides and covers the same source bytes there
    assert s_spans.keys() == t_spans.keys()
    for c in s_spans:
        assert s_spans[c] == t_spans[c] and s_bytes[c] == t_bytes[c], c


@pytest.mark.parametrize("student,teacher", [*PAIRS, ("qwen3", "llama-3.2")])
def test_every_added_token_string_in_text_is_text_on_both_sides(student, teacher):
    texts = special_string_texts(student, teacher)
    assert len(texts) > len(added_tokens(student)) + len(added_tokens(teacher)) // 2
    for text in texts:
        check_special_strings_are_text(student, teacher, text)


TEXT_PIECES = [*"ab e12 \n\t.,;'\"-_()<>|/", "the", " word", "日本", "é", "\U0001f600", "  "]
TEXT_PIECES += ["\r\n", "<|", "|>", "<s", "/s>"]  # and halves of special-token strings


@pytest.mark.parametrize("student,teacher", [*PAIRS, ("qwen3", "llama-3.2")])
def test_random_texts_with_added_token_strings_are_text_on_both_sides(student, teacher):
    rng = random.Random(f"special-{student}-{teacher}")
    strings = sorted({*added_tokens(student).values(), *added_tokens(teacher).values()})
    for _ in range(60):
        pools = [strings if rng.random() < 0.25 else TEXT_PIECES for _ in range(rng.randint(1, 30))]
        text = "".join(map(rng.choice, pools))
        check_special_strings_are_text(student, teacher, text)


@pytest.mark.parametrize("name", ["mistral-v1", "mistral-v3"])
def test_sentencepiece_control_piece_strings_are_ordinary_text_pieces(name):
    # <s>, </s>, <unk> (and v3's [INST], ...) are also pieces of the model's own vocabulary: their
    # strings in a text are "<", "s", ">"-like pieces whose canonical bytes are the text's bytes
    tok = get_tokenizer(name)
    strings = list(added_tokens(name).values())
    text = "".join(strings) + " x" + " ".join(strings)
    spans = token_spans(tok, text)
    assert spans.ids[0] == tok.bos_token_id and not spans.text[0] and spans.text[1:].all()
    assert not set(spans.ids[1:]) & added_tokens(name).keys()
    assert b"".join(token_bytes(tok)[i] for i in spans.ids[1:]) == b" " + text.encode()


def test_unverifiable_normalization_falls_back_to_a_coarser_chunk(llama, qwen):
    # A normalizer that depends on context ("y" after a digit becomes "z"): the teacher's "z" cannot
    # be matched to source bytes alone; it must stay in one chunk with the "y" it came from.
    spec = json.loads(qwen.backend_tokenizer.to_str())
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "(?<=[0-9])y"}, "content": "z"},
        ],
    }
    teacher = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    s_ids, t_ids, s_chunk, t_chunk = align_text(llama, teacher, "see 1y here")
    assert teacher.convert_ids_to_tokens(t_ids)[2:4] == ["1", "z"]
    y = s_chunk[llama.convert_ids_to_tokens(s_ids).index("y")]
    assert t_chunk[3] == y >= 0 and -1 not in s_chunk[1:] + t_chunk
    assert s_chunk[1:] == sorted(s_chunk[1:]) and t_chunk == sorted(t_chunk)


def test_predictor_shift_gives_each_position_the_next_tokens_chunk():
    assert predictor_chunks([-1, 0, 1, 1, 2]).tolist() == [0, 1, 1, 2, -1]
    assert predictor_chunks(np.array([3])).tolist() == [-1]
    assert predictor_chunks([]).tolist() == []


def test_a_normalized_character_in_byte_pieces_is_never_cut_inside(qwen):
    # NFC maps U+F900 to U+8C48, which Qwen3 writes as two byte-level pieces: the second one does
    # not start at an exact source offset, so a window may not be cut before it
    spans = token_spans(qwen, "x\uf900y")
    assert qwen.convert_ids_to_tokens(spans.ids) == ["x", "è±", "Ī", "y"]
    assert spans.cut.tolist() == [True, True, False, True]
    assert spans.boundaries.tolist() == [0, 1, 4, 5]


@pytest.mark.parametrize("name", ["llama-3.2", "qwen3", "mistral-v1"])
def test_offsets_path_agrees_with_the_fast_path_on_unnormalized_text(name):
    tok = get_tokenizer(name)
    for text in (TEXTS["code"], TEXTS["emoji"], TEXTS["leading_digit"], TEXTS["cjk"]):
        fast = token_spans(tok, text)
        encoding = tok.backend_tokenizer.encode(text)
        lengths = np.array([len(bytes_of(name)[i] or b"") for i in fast.ids])
        slow = _spans_from_offsets(
            tok, text, text.encode(), fast.ids, ~fast.text, lengths, encoding.offsets
        )
        for field in ("text", "start", "cut", "boundaries"):
            assert getattr(slow, field).tolist() == getattr(fast, field).tolist(), field


PIECES = list("ab e1234567890 \n\t\r.,;'\"-_()") + [
    *["e\u0301", "\u0301", "\u0308", "é", "\u212b", "\uf900", "日本", "한", "\u1112\u1161\u11ab"],
    *["\U0001f600", "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\U0001f1eb\U0001f1f7", "ﬁ"],
    *["  ", "\r\n", "Ａ", "\u00a0", "\u200b", "\ufeff", "\x00"],
]


@pytest.mark.parametrize("student,teacher", [*PAIRS, ("mistral-v1", "qwen3")])
def test_random_mixed_texts_keep_every_property(student, teacher):
    rng = random.Random(f"{student}-{teacher}")
    for _ in range(40):
        check_alignment(student, teacher, "".join(rng.choices(PIECES, k=rng.randint(0, 40))))
