"""Build the sparse projection matrix W between a student and a teacher vocabulary.

W[s, t] is the share of student token s's probability mass that lands on teacher token t
(METHOD.md section 2). Deterministic, built once per (student, teacher) pair, in seconds:
  1. exact pass: student bytes == teacher bytes -> one-hot row (the strict common set);
  2. multi-token pass: re-encode the student token's bytes with the teacher tokenizer, give piece i
     the weight 0.9 * 0.1**i, keep the first 4 pieces ("201" -> "2" .9009, "0" .0901, "1" .0090);
  3. special tokens by meaning (special_pairs): end of document <-> end of document, then bos,
     pad, unk where both sides have a distinct such token; other specials empty;
  4. top-4 per row, rows normalized to 1 (or empty); optional reverse pass (--reverse).
W is never dense: [128k x 152k] would be ~78 GB in fp32.

    python build_projection.py --student meta-llama/Llama-3.2-1B --teacher Qwen/Qwen3-4B --out W.pt
    python build_projection.py --student pkg:llama-3.2 --teacher pkg:qwen3 --out W.pt  # offline
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

from tokens import (
    atomic_write,
    encode_bytes,
    end_of_document_id,
    is_byte_fallback_piece,
    load_tokenizer,
    special_roles,
    token_bytes,
    tokenizer_hash,
)

# 2: special tokens paired by meaning, "special_pairs" recorded (1 paired them by role name)
FORMAT_VERSION = 2
SPECIAL_ROLES = ("end_of_document", "bos", "pad", "unk")  # pairing priority
DEFAULTS = {
    "first_weight": 0.9,
    "decay": 0.1,
    "max_pieces": 4,
    "top_k": 4,
    "reverse": False,
}


def model_vocab_size(name_or_path: str) -> int | None:
    """The model's embedding rows (config.json vocab_size) when a model is named, else None."""
    if name_or_path.startswith("pkg:") or os.path.isfile(name_or_path):
        return None
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "config.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        return config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    try:  # a hub name: its config, when reachable
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path)
        return getattr(config, "vocab_size", None) or config.get_text_config().vocab_size
    except Exception:
        return None


def _teacher_index(t_bytes: list[bytes | None], t_vocab: dict[str, int]) -> dict[bytes, int]:
    """bytes -> teacher id. Where two teacher ids share bytes (SentencePiece '<0x41>' and 'A'),
    the regular piece wins over the byte-fallback piece, then the lowest id."""
    fallback = {i for text, i in t_vocab.items() if is_byte_fallback_piece(text)}
    index: dict[bytes, int] = {}
    for i in sorted(range(len(t_bytes)), key=lambda i: (i not in fallback, -i)):
        if t_bytes[i] is not None:
            index[t_bytes[i]] = i
    return index


def _piece_weights(n: int, first_weight: float, decay: float, max_pieces: int) -> list[float]:
    # w_i = 0.9 * 0.1**i for the first max_pieces pieces (strictly decreasing: this is the top-k)
    return [first_weight * decay**i for i in range(min(n, max_pieces))]


def special_pairs(student_tok, teacher_tok) -> list[tuple[str, int, int]]:
    """(role, student id, teacher id) of the special tokens W pairs, by meaning, not config name:
    end of document <-> end of document (tokens.end_of_document_id: Llama's <|end_of_text|> with
    Qwen3's <|endoftext|>, not with <|im_end|>, which Qwen3's config calls eos); then bos, pad,
    unk, each only where BOTH sides have it as a token distinct from the roles before it (o200k's
    <|endoftext|> is bos and eos: it is its end of document, never also its bos; Qwen3's pad is
    its end of document). Only added tokens (no bytes): text is matched by its bytes."""
    sides = []
    for tok in (student_tok, teacher_tok):
        table, roles = token_bytes(tok), special_roles(tok)
        ids = [("end_of_document", end_of_document_id(tok))]
        ids += [(role, roles.get(role)) for role in SPECIAL_ROLES[1:]]
        taken: set[int] = set()
        available = {}
        for role, i in ids:
            if i is not None and i not in taken and i < len(table) and table[i] is None:
                available[role] = i
            taken.add(i)
        sides.append(available)
    s_roles, t_roles = sides
    return [(r, s_roles[r], t_roles[r]) for r in SPECIAL_ROLES if r in s_roles and r in t_roles]


def build_projection(
    student_tok,
    teacher_tok,
    *,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    reverse: bool = False,
    first_weight: float = 0.9,
    decay: float = 0.1,
    max_pieces: int = 4,
    top_k: int = 4,
) -> dict:
    """Build W and return the dict that save_projection writes (see the module docstring)."""
    import torch

    t_vocab = teacher_tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    s_bytes, t_bytes = token_bytes(student_tok), token_bytes(teacher_tok, t_vocab)
    vs = student_vocab_size or len(s_bytes)
    vt = teacher_vocab_size or len(t_bytes)
    for side, size, n in (("student", vs, len(s_bytes)), ("teacher", vt, len(t_bytes))):
        if size < n:
            raise ValueError(
                f"{side} vocab size {size} is smaller than its tokenizer ({n} ids); "
                f"pass --{side}-vocab-size >= {n} (the model's embedding rows)"
            )
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []

    # 1. exact pass: identical bytes -> one-hot row; the lowest student id claims each teacher id
    index = _teacher_index(t_bytes, t_vocab)
    exact_pairs, claimed, multi = [], set(), []
    for s, b in enumerate(s_bytes):
        if b is None:
            continue
        t = index.get(b)
        if t is None:
            multi.append(s)
            continue
        rows.append(s), cols.append(t), vals.append(1.0)
        if t not in claimed:
            claimed.add(t)
            exact_pairs.append((s, t))

    # 2. multi-token pass: teacher pieces of the student token's bytes, weights 0.9 * 0.1**i
    pieces = encode_bytes(teacher_tok, [s_bytes[s] for s in multi])
    for s, ids in zip(multi, pieces):
        for t, w in zip(ids, _piece_weights(len(ids), first_weight, decay, max_pieces)):
            rows.append(s), cols.append(t), vals.append(w)

    # 3. special tokens by meaning, each an exact pair; other specials keep an empty row
    specials = []
    for role, s, t in special_pairs(student_tok, teacher_tok):
        rows.append(s), cols.append(t), vals.append(1.0)
        claimed.add(t)  # an added token has no bytes: the exact pass never claimed it
        exact_pairs.append((s, t))
        specials.append({"role": role, "student_id": s, "teacher_id": t,
                         "student_token": student_tok.convert_ids_to_tokens(s),
                         "teacher_token": teacher_tok.convert_ids_to_tokens(t)})  # fmt: skip

    # 5. optional reverse pass: teacher token t re-encoded by the student, piece s_i adds w_i
    if reverse:
        t_ids = [t for t, b in enumerate(t_bytes) if b is not None]
        s_pieces = encode_bytes(student_tok, [t_bytes[t] for t in t_ids])
        for t, ids in zip(t_ids, s_pieces):
            for s, w in zip(ids, _piece_weights(len(ids), first_weight, decay, max_pieces)):
                if s_bytes[s] is not None:  # never a special row (text "</s>" -> Mistral's </s>)
                    rows.append(s), cols.append(t), vals.append(w)

    # 4. sum duplicate entries, keep the top-k of each row, normalize rows to 1
    r, c, v = _top_k_normalized(np.array(rows), np.array(cols), np.array(vals), vt, top_k)
    indices = torch.from_numpy(np.stack([r, c]))
    values = torch.from_numpy(v.astype(np.float32))
    W = torch.sparse_coo_tensor(indices, values, (vs, vt), check_invariants=True).coalesce()
    exact = torch.tensor(sorted(exact_pairs), dtype=torch.long).reshape(-1, 2)

    def identity(tok, size):
        name = getattr(tok, "name_or_path", "") or ""
        return {"name": name, "vocab_size": size, "tokenizer_size": len(tok),
                "sha256": tokenizer_hash(tok)}  # fmt: skip

    return {
        "W": W,
        "exact_pairs": exact,
        "special_pairs": specials,
        "student": identity(student_tok, vs),
        "teacher": identity(teacher_tok, vt),
        "params": {
            "first_weight": first_weight,
            "decay": decay,
            "max_pieces": max_pieces,
            "top_k": top_k,
            "reverse": reverse,
        },  # fmt: skip
        "version": FORMAT_VERSION,
    }


def _top_k_normalized(rows, cols, vals, n_cols: int, k: int):
    key = rows.astype(np.int64) * n_cols + cols
    unique, inverse = np.unique(key, return_inverse=True)
    summed = np.bincount(inverse, weights=vals)
    rows, cols = unique // n_cols, unique % n_cols
    order = np.lexsort((cols, -summed, rows))  # by row, then weight descending, then teacher id
    rows, cols, summed = rows[order], cols[order], summed[order]
    starts = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
    rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    keep = rank < k
    rows, cols, summed = rows[keep], cols[keep], summed[keep]
    row_sum = np.bincount(rows, weights=summed, minlength=rows.max() + 1 if len(rows) else 0)
    return rows, cols, summed / row_sum[rows]


# ----------------------------------------------------------------------------- file I/O


def save_projection(projection: dict, path: str) -> None:
    """torch.save to a temp file in the same directory, then rename: never a half-written W."""
    import torch

    atomic_write(path, lambda f: torch.save(projection, f))


def load_projection(path: str, student_tok=None, teacher_tok=None) -> dict:
    """Load a W file (weights_only: no pickles) and check it against the given tokenizers."""
    import torch

    if not os.path.isfile(path):
        raise ValueError(
            f"projection file {path} does not exist; build it with build_projection.py"
        )
    try:
        projection = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(
            f"{path} is not a readable W file (corrupt or truncated: "
            f"{str(e).splitlines()[0][:80]}); rebuild it with build_projection.py"
        ) from e
    if not isinstance(projection, dict) or "version" not in projection:
        raise ValueError(f"{path} is not a W file written by build_projection.py; rebuild it")
    if projection["version"] != FORMAT_VERSION:
        why = " (it paired special tokens by role name)" if projection["version"] == 1 else ""
        raise ValueError(
            f"{path} has W format version {projection['version']!r}{why}, this code reads "
            f"version {FORMAT_VERSION}; rebuild it with build_projection.py"
        )
    missing = {"W", "exact_pairs", "special_pairs", "student", "teacher", "params"}
    missing -= set(projection)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}; rebuild it with build_projection.py")
    for side, tok in (("student", student_tok), ("teacher", teacher_tok)):
        if tok is None:
            continue
        expected, actual = projection[side]["sha256"], tokenizer_hash(tok)
        if expected != actual:
            raise ValueError(
                f"{path} was built for another {side} tokenizer (W has sha256 {expected[:16]}..., "
                f"{getattr(tok, 'name_or_path', side)} has {actual[:16]}...); "
                "rebuild W for this pair"
            )
    return projection


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--student", required=True, help="hub name, directory, tokenizer file, pkg:NAME"
    )
    parser.add_argument(
        "--teacher", required=True, help="hub name, directory, tokenizer file, pkg:NAME"
    )
    parser.add_argument("--out", required=True, help="output file (torch.save dict)")
    parser.add_argument(
        "--student-vocab-size", type=int, help="default: model config, else tokenizer"
    )
    parser.add_argument(
        "--teacher-vocab-size", type=int, help="default: model config, else tokenizer"
    )
    parser.add_argument(
        "--reverse", action="store_true", help="add the reverse pass (off by default)"
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)

    # torch's import (~2 s) overlaps the tokenizer work; nothing here needs it until W is built
    threading.Thread(target=__import__, args=("torch",), daemon=True).start()
    start = time.perf_counter()
    try:
        student = load_tokenizer(args.student, trust_remote_code=args.trust_remote_code)
        teacher = load_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code)
        projection = build_projection(
            student,
            teacher,
            student_vocab_size=args.student_vocab_size or model_vocab_size(args.student),
            teacher_vocab_size=args.teacher_vocab_size or model_vocab_size(args.teacher),
            reverse=args.reverse,
        )
        save_projection(projection, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    W = projection["W"]
    print(
        f"W {tuple(W.shape)}: {W._nnz():,} entries, "
        f"{len(projection['exact_pairs']):,} exact pairs, "
        f"built in {time.perf_counter() - start:.1f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
