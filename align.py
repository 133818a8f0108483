"""Aligning two tokenizations of the same text, byte by byte (METHOD.md section 4). Used by data.py;
`align_text(student_tok, teacher_tok, text)` is the one-call form.

Each tokenizer encodes the same source text with its own special tokens around it (its
post-processor: Llama-3 its BOS, Mistral its <s>, Qwen3/o200k nothing) and reads everything inside
it as text: a special-token string in the text ("<|eot_id|>", "<think>", "<s>") is never matched as
that token (`tokens.text_only`), so both sides spell the same bytes and no control token appears
mid-document. Every non-special token gets an exact byte span of the SOURCE text (`token_spans`),
and a chunk boundary is a source byte offset where both sides have a token boundary (`chunk_ids`):
two boolean masks over the text's bytes, AND, cumsum. Linear time.

Exact spans. Fast path (almost all text): the concatenated canonical bytes of the tokens equal the
source bytes (for a SentencePiece model, after the one prefix space it adds, which belongs to no
source byte), so a token's span is a cumulative sum of byte lengths; this is exact even where a
byte-level token ends inside a multi-byte character. Slow path (a normalizer changed the text): the
tokenizer's character offsets, which are lossy there (`_spans_from_offsets`):
 1. Tokens whose character spans overlap (pieces of one character) form a group; a group is clean
    when its bytes equal the source bytes it claims: its inner boundaries are cumulative lengths.
 2. Any other group was changed by the normalizer (NFC merges "e" + U+0301 into "é" and leaves
    U+0301 covered by no offset). Its true extent is found by trying its claimed span widened by
    the uncovered characters on either side: the one whose normalization gives exactly the group's
    bytes. Only its outer edges are boundaries, so the region lives inside one chunk, whose two
    sides are equal after that tokenizer's own normalization. If nothing matches (no known real
    tokenizer), the group and its neighbouring uncovered text form one region, merged with
    touching ones of that kind: coarser chunks, never wrong ones.
 3. Special/added tokens get chunk -1. None is matched inside the text; were a model to spell an
    added id itself (no known real tokenizer), that token keeps its span's edges.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerFast

from tokens import text_only, token_bytes


@dataclass
class TokenSpans:
    """One tokenizer's view of one text, in source bytes (see the comment block above)."""

    ids: list[int]
    text: np.ndarray  # [n] bool: a text token (False for special/added tokens: chunk -1)
    start: np.ndarray  # [n] source byte where the token starts (its region's start inside a
    # normalized region); -1 for special tokens outside the text (BOS, EOS)
    cut: np.ndarray  # [n] bool: the token starts exactly at one of `boundaries`
    boundaries: np.ndarray  # sorted source byte offsets where this side has a token boundary
    n_bytes: int  # length of the source text in bytes


# per tokenizer object (weakly held) and vocabulary size: what token_spans reads for every text
_VOCAB_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocab_tables(tok: PreTrainedTokenizerFast) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """(bytes of every id with b"" for added tokens, byte lengths, is-added mask)."""
    cached = _VOCAB_TABLES.get(tok)
    if cached is None or cached[0] != len(tok):
        table = token_bytes(tok)
        added = np.array([b is None for b in table], dtype=bool)
        table = [b"" if b is None else b for b in table]
        cached = (len(tok), table, np.array([len(b) for b in table], dtype=np.int64), added)
        _VOCAB_TABLES[tok] = cached
    return cached[1:]


def char_byte_offsets(text: str) -> np.ndarray:
    """[len(text) + 1] byte offset of every character offset."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate(([0], np.cumsum(width)))


def token_spans(tok: PreTrainedTokenizerFast, text: str) -> TokenSpans:
    """Encode text with tok's own special tokens around it, every added-token string inside it
    read as text (`text_only`), and give every token its exact source byte span."""
    table, lengths, is_added = _vocab_tables(tok)
    encoding = text_only(tok.backend_tokenizer).encode(text)  # its own BOS/EOS, as tok(text) adds
    ids = encoding.ids
    idx = np.asarray(ids, dtype=np.int64)
    added = is_added[idx]
    src = text.encode()
    concat = b"".join(map(table.__getitem__, ids))
    length = lengths[idx]
    if concat != src:
        first = int(np.argmax(~added)) if len(ids) else 0
        if not (concat[:1] == b" " and concat[1:] == src and len(ids) and not added[first]):
            return _spans_from_offsets(tok, text, src, ids, added, length, encoding.offsets)
        length[first] -= 1  # the prefix space a SentencePiece model adds: no source byte
    end = np.cumsum(length)
    start = np.where(added, -1, end - length)
    bounds = np.concatenate(([0], end[length > 0]))
    return TokenSpans(ids, ~added, start, ~added, bounds, len(src))


def _spans_from_offsets(tok, text, src, ids, added, length, offsets) -> TokenSpans:
    """Slow path of token_spans: steps 1-3 of the comment block above."""
    n, n_bytes = len(ids), len(src)
    char_bytes = char_byte_offsets(text)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    lo, hi = char_bytes[offsets[:, 0]], char_bytes[offsets[:, 1]]  # lossy inside a character
    item = np.flatnonzero(~added | (lo < hi))  # all but special tokens outside the text (BOS)
    if len(item) == 0:
        none = np.zeros(n, dtype=bool)
        return TokenSpans(ids, ~added, np.full(n, -1), none, np.unique([0, n_bytes]), n_bytes)
    a, b = lo[item], hi[item]
    size = np.where(added[item], b - a, length[item])  # a special token in the text: its span
    table = _vocab_tables(tok)[0]
    pieces = [table[i] for i in np.asarray(ids)[item].tolist()]
    for k in np.flatnonzero(added[item]).tolist():
        pieces[k] = src[a[k] : b[k]]
    concat = np.frombuffer(b"".join(pieces), dtype=np.uint8)

    # 1. groups of tokens that share a character; a clean group's bytes equal the source it claims
    new = np.ones(len(item), dtype=bool)
    new[1:] = a[1:] >= np.maximum.accumulate(b)[:-1]
    first = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    g_lo, g_hi, g_size = a[first], np.maximum.reduceat(b, first), np.add.reduceat(size, first)
    g_off = np.cumsum(g_size) - g_size  # where each group starts in concat
    same_size = g_size == g_hi - g_lo
    byte_group = np.repeat(np.arange(len(first)), g_size)
    src_pos = np.arange(len(concat)) - g_off[byte_group] + g_lo[byte_group]
    source = np.frombuffer(src + b"\0", dtype=np.uint8)  # one spare byte: indexing never fails
    differs = same_size[byte_group] & (source[np.clip(src_pos, 0, n_bytes)] != concat)
    clean = same_size & (np.bincount(byte_group[differs], minlength=len(first)) == 0)

    # 2. the true extent of every other group (the SentencePiece prefix space first)
    normalizer = tok.backend_tokenizer.normalizer
    normalize = normalizer.normalize_str if normalizer else (lambda s: s)
    region_lo, region_hi = g_lo.copy(), g_hi.copy()
    fuzzy = np.zeros(len(first), dtype=bool)
    phantom = np.zeros(len(first), dtype=bool)
    for g in np.flatnonzero(~clean):
        group_bytes = concat[g_off[g] : g_off[g] + g_size[g]].tobytes()
        claimed = src[g_lo[g] : g_hi[g]]
        prefixes = [b""]
        if g == 0 or added[item[first[g] - 1]]:  # a prefix space can follow a special token
            prefixes.append(b" ")
            if group_bytes == b" " + claimed:
                clean[g] = phantom[g] = True
                continue
        left = region_hi[g - 1] if g else 0  # uncovered text before / after the group
        right = g_lo[g + 1] if g + 1 < len(first) else n_bytes
        extents = dict.fromkeys([(g_lo[g], g_hi[g]), (g_lo[g], right), (left, g_hi[g])])
        extents[(left, right)] = None
        for prefix, (x, y) in ((p, e) for p in prefixes for e in extents):
            if prefix + normalize(src[x:y].decode()).encode() == group_bytes:
                region_lo[g], region_hi[g] = x, y
                break
        else:
            region_lo[g], region_hi[g], fuzzy[g] = left, right, True
    join = np.zeros(len(first), dtype=bool)  # fuzzy groups that touch form one region
    join[1:] = fuzzy[1:] & fuzzy[:-1] & (region_lo[1:] <= region_hi[:-1])
    head = np.flatnonzero(~join)
    region = (np.cumsum(~join) - 1)[group]
    r_lo, r_hi = region_lo[head], np.maximum.reduceat(region_hi, head)

    # token starts: cumulative sizes in clean groups, the region's start elsewhere
    size[first[phantom]] -= 1
    end = np.cumsum(size)
    exact_start = g_lo[group] + (end - size) - (end - size)[first][group]
    item_clean = clean[group]
    item_start = np.where(item_clean, exact_start, r_lo[region])
    item_cut = item_clean | (new & ~join[group])
    start = np.full(n, -1, dtype=np.int64)
    start[item] = item_start
    cut = np.zeros(n, dtype=bool)
    cut[item] = item_cut
    is_bound = np.zeros(n_bytes + 1, dtype=bool)  # a mask, not a sort: linear time
    for bounds in ([0, n_bytes], (exact_start + size)[item_clean], item_start[item_cut], r_hi):
        is_bound[bounds] = True
    return TokenSpans(ids, ~added, start, cut, np.flatnonzero(is_bound), n_bytes)


def chunk_ids(student: TokenSpans, teacher: TokenSpans) -> tuple[np.ndarray, np.ndarray]:
    """Token-level chunk ids of two views of the same text: 0..K-1 in text order, -1 = none."""
    if student.n_bytes != teacher.n_bytes:
        raise ValueError("chunk_ids needs two tokenizations of the same text")
    common = np.zeros(student.n_bytes + 1, dtype=bool)
    common[student.boundaries] = True
    in_teacher = np.zeros_like(common)
    in_teacher[teacher.boundaries] = True
    common &= in_teacher  # 0 and n_bytes are on both sides
    # chunk k runs from the k-th common boundary to the next; a token's start says which it is in
    number = np.minimum(np.cumsum(common) - 1, max(int(common.sum()) - 2, 0))
    chunks = [np.where(s.text, number[np.maximum(s.start, 0)], -1) for s in (student, teacher)]
    used = np.zeros(len(number) + 1, dtype=bool)  # renumber 0..K-1 over the chunks in use
    for c in chunks:
        used[c[c >= 0]] = True
    renumber = np.cumsum(used) - 1
    return tuple(np.where(c >= 0, renumber[c], -1) for c in chunks)


def align_text(
    student_tok: PreTrainedTokenizerFast, teacher_tok: PreTrainedTokenizerFast, text: str
) -> tuple[list[int], list[int], list[int], list[int]]:
    """(student_ids, teacher_ids, student_chunk, teacher_chunk) for one text: each tokenizer's own
    special tokens, token-level chunk ids (before the predictor shift), -1 for no chunk."""
    student, teacher = token_spans(student_tok, text), token_spans(teacher_tok, text)
    student_chunk, teacher_chunk = chunk_ids(student, teacher)
    return student.ids, teacher.ids, student_chunk.tolist(), teacher_chunk.tolist()


def predictor_chunks(token_chunk: list[int] | np.ndarray) -> np.ndarray:
    """The predictor shift: position p predicts token p + 1, so it takes that token's chunk; the
    last position predicts nothing (-1)."""
    token_chunk = np.asarray(token_chunk, dtype=np.int64)
    shifted = np.full(len(token_chunk), -1, dtype=np.int64)
    shifted[:-1] = token_chunk[1:]
    return shifted
