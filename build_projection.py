"""Build the sparse projection matrix W between a student and a teacher vocabulary.

W[s, t] is the share of student token s's probability mass that lands on teacher token t
(METHOD.md section 2). Deterministic, built once per (student, teacher) pair, in seconds:
  1. exact pass: student bytes == teacher bytes -> one-hot row (the strict common set);
  2. multi-token pass: re-encode the student token's bytes with the teacher tokenizer, give piece i
     the weight 0.9 * 0.1**i, keep the first 4 pieces ("201" -> "2" .9009, "0" .0901, "1" .0090);
  3. special tokens by meaning (special_pairs): end of document <-> end of document, then bos,
     pad, unk where both sides have a distinct such token; other specials empty;
  4. top-4 per row, rows normalized to 1 (or empty); optional reverse pass (--reverse).
W is never dense: [128k x 152k] would be ~78 GB in fp32. Also here, as functions of W: the file
format (save_projection / load_projection: bound to both tokenizers by hash; load_projection also
reads the top-k format of NeMo-RL's and TRL's X-Token, topk_interop.py), train.py's W cache
(cached_projection), and H-KL's common set (hkl_pairs: the exact pairs widened by W's top entries).

    python build_projection.py --student meta-llama/Llama-3.2-1B --teacher Qwen/Qwen3-4B --out W.pt
    python build_projection.py --student pkg:llama-3.2 --teacher pkg:qwen3 --out W.pt  # offline
    python build_projection.py --student S --teacher T --export-topk W_topk.pt  # NeMo-RL/TRL's
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import Tensor
from transformers import AutoConfig

from cli import (
    ArgumentParser,
    add_model_flags,
    atomic_write,
    check_output_file,
    int_flag,
    one_line_errors,
)
from tokens import (
    encode_bytes,
    end_of_document_id,
    is_byte_fallback_piece,
    load_tokenizer,
    special_roles,
    token_bytes,
    tokenizer_hash,
)
from topk_interop import TOPK_K, export_topk, is_topk, read_topk, saved
from topk_interop import to_topk as to_topk  # re-exported: build_projection.to_topk

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


def model_vocab_size(name_or_path: str, flag: str = "--student-vocab-size") -> int | None:
    """The model's embedding rows (config.json vocab_size) when a model is named, else None.
    A config that cannot be read, or whose vocab_size is not a positive integer, is an error
    (ValueError) that names `flag`, the way to give the size by hand."""
    if name_or_path.startswith("pkg:") or os.path.isfile(name_or_path):
        return None
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "config.json")
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) else f"not valid JSON: {e}"
            raise ValueError(f"cannot read {path} ({why}); fix it or pass {flag}") from e
        if not isinstance(config, dict):
            raise ValueError(f"{path} is not a model config (a JSON object); fix it or pass {flag}")
        size, text_config = config.get("vocab_size"), config.get("text_config")
        if size is None and isinstance(text_config, dict):  # multimodal: the text model's
            size = text_config.get("vocab_size")
    else:
        try:  # a hub name: its config, when reachable (the hub's errors are OSErrors)
            config = AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError):
            return None
        text_config = config.get_text_config()  # a multimodal model's text model: its vocabulary
        size = getattr(config, "vocab_size", None) or getattr(text_config, "vocab_size", None)
        path = f"{name_or_path}'s config"
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(
            f"{path} has vocab_size {size!r}, not a positive integer; fix it or pass {flag}"
        )
    return size


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
    s_bytes, t_bytes = token_bytes(student_tok), token_bytes(teacher_tok)
    vs = _vocab_size(student_vocab_size, len(s_bytes), "student", student_tok)
    vt = _vocab_size(teacher_vocab_size, len(t_bytes), "teacher", teacher_tok)
    weights = lambda n: _piece_weights(n, first_weight, decay, max_pieces)  # noqa: E731
    entries: list[tuple[int, int, float]] = []  # (student id, teacher id, weight), summed later

    # 1. exact pass: identical bytes -> one-hot row
    matches, exact_pairs, multi = _exact_pass(student_tok, teacher_tok)
    entries += [(s, t, 1.0) for s, t in matches]

    # 2. multi-token pass: teacher pieces of the student token's bytes, weights 0.9 * 0.1**i
    for s, ids in zip(multi, encode_bytes(teacher_tok, [s_bytes[s] for s in multi])):
        entries += [(s, t, w) for t, w in zip(ids, weights(len(ids)))]

    # 3. special tokens by meaning, each an exact pair; other specials keep an empty row
    specials = _special_records(student_tok, teacher_tok)
    entries += [(p["student_id"], p["teacher_id"], 1.0) for p in specials]

    # 5. optional reverse pass: teacher token t re-encoded by the student, piece s_i adds w_i
    if reverse:
        t_ids = [t for t, b in enumerate(t_bytes) if b is not None]
        for t, ids in zip(t_ids, encode_bytes(student_tok, [t_bytes[t] for t in t_ids])):
            # never a special row (the text "</s>" -> Mistral's </s>)
            entries += [(s, t, w) for s, w in zip(ids, weights(len(ids))) if s_bytes[s] is not None]

    # 4. sum duplicate entries, keep the top-k of each row, normalize rows to 1
    rows, cols, vals = (np.array(x) for x in zip(*entries))
    r, c, v = _top_k_normalized(rows, cols, vals, vt, top_k)
    indices = torch.from_numpy(np.stack([r, c]))
    values = torch.from_numpy(v.astype(np.float32))
    W = torch.sparse_coo_tensor(indices, values, (vs, vt), check_invariants=True).coalesce()
    params = {
        "first_weight": first_weight,
        "decay": decay,
        "max_pieces": max_pieces,
        "top_k": top_k,
        "reverse": reverse,
    }
    return {
        "W": W,
        "exact_pairs": _pairs_tensor(exact_pairs, specials),
        "special_pairs": specials,
        "student": _identity(student_tok, vs),
        "teacher": _identity(teacher_tok, vt),
        "params": params,
        "version": FORMAT_VERSION,
    }


def _exact_pass(student_tok, teacher_tok) -> tuple[list, list, list]:
    """Step 1: every (student id, teacher id) of identical bytes (a one-hot row), the exact pairs
    among them (the lowest student id claims each teacher id: one-to-one), and the student ids
    with bytes but no match (step 2's). Special tokens (no bytes) are step 3's."""
    s_bytes, t_bytes = token_bytes(student_tok), token_bytes(teacher_tok)
    t_vocab = teacher_tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    index = _teacher_index(t_bytes, t_vocab)
    matches, exact_pairs, claimed, multi = [], [], set(), []
    for s, b in enumerate(s_bytes):
        if b is None:
            continue
        t = index.get(b)
        if t is None:
            multi.append(s)
            continue
        matches.append((s, t))
        if t not in claimed:
            claimed.add(t)
            exact_pairs.append((s, t))
    return matches, exact_pairs, multi


def _special_records(student_tok, teacher_tok) -> list[dict]:
    """special_pairs() as the W file records them (the "special_pairs" key)."""
    return [
        {
            "role": role,
            "student_id": s,
            "teacher_id": t,
            "student_token": student_tok.convert_ids_to_tokens(s),
            "teacher_token": teacher_tok.convert_ids_to_tokens(t),
        }
        for role, s, t in special_pairs(student_tok, teacher_tok)
    ]


def _pairs_tensor(exact_pairs: list, specials: list[dict]) -> Tensor:
    """The "exact_pairs" key: the exact pass's pairs and the special pairs (an added token has no
    bytes, so the exact pass never claimed its teacher id), sorted, LongTensor [n, 2]."""
    pairs = exact_pairs + [(p["student_id"], p["teacher_id"]) for p in specials]
    return torch.tensor(sorted(pairs), dtype=torch.long).reshape(-1, 2)


def _vocab_size(size: int | None, n: int, side: str, tok=None) -> int:
    """W's rows or columns: the model's embedding rows if given (at least the tokenizer's n ids).
    Fewer rows than ids: the model and its tokenizer disagree (a caller that takes the size from
    a flag says so in its own words first: build_projection.py's _run)."""
    if size is None:
        return n
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"{side} vocab size {size!r} is not an integer")
    if size < n:
        raise ValueError(
            f"{side}{_named(tok)}: vocab size {size} (the model's embedding rows) is smaller than "
            f"its tokenizer ({n} ids; ids >= {size} would have no row): the model and its "
            "tokenizer disagree; use the tokenizer saved with this model"
        )
    return size


def _identity(tok, size: int) -> dict:
    """What a W file records of a tokenizer: its hash binds the file to it."""
    name = getattr(tok, "name_or_path", "") or ""
    return {
        "name": name,
        "vocab_size": size,
        "tokenizer_size": len(tok),
        "sha256": tokenizer_hash(tok),
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


# ----------------------------------------------------------------------------- H-KL's common set


def hkl_pairs(
    W: Tensor | torch.nn.Module, exact_pairs: Tensor, *, threshold: float = 0.6
) -> Tensor:
    """H-KL's common set (METHOD.md 5.3): the exact pairs, plus each other student row's top
    teacher id under W when its weight is >= threshold and that teacher id is not an exact pair's.
    A teacher id that several rows claim goes to the highest weight, ties to the lowest student id.
    One-to-one. W: sparse [VS, VT] (or a module whose forward gives it: a learned W).
    Returns a LongTensor [n', 2] of (student_id, teacher_id), sorted by student id.
    """
    W = W() if isinstance(W, torch.nn.Module) else W
    W = (W.to_sparse_coo() if W.layout == torch.sparse_csr else W).coalesce().detach()
    s, t, w = W.indices()[0], W.indices()[1], W.values()
    exact = exact_pairs.reshape(-1, 2).long().to(s.device)
    order = _lexsort(t, -w, s)  # each row's heaviest entry first (ties: lowest teacher id)
    s, t, w = s[order], t[order], w[order]
    top = _first_of_runs(s) & (w >= threshold)
    top &= ~torch.isin(s, exact[:, 0]) & ~torch.isin(t, exact[:, 1])  # exact pairs keep priority
    s, t, w = s[top], t[top], w[top]
    order = _lexsort(s, -w, t)  # each teacher id's highest weight first (ties: lowest student id)
    s, t = s[order], t[order]
    keep = _first_of_runs(t)
    pairs = torch.cat([exact, torch.stack([s[keep], t[keep]], 1)])
    return pairs[torch.argsort(pairs[:, 0], stable=True)]


def _lexsort(*keys: Tensor) -> Tensor:
    """The order that sorts by the last key, then the one before, ... (as numpy.lexsort)."""
    order = torch.arange(len(keys[0]), device=keys[0].device)
    for key in keys:
        order = order[torch.argsort(key[order], stable=True)]
    return order


def _first_of_runs(key: Tensor) -> Tensor:
    """True where a sorted key starts a run of equal values."""
    return torch.cat([torch.ones_like(key[:1], dtype=torch.bool), key[1:] != key[:-1]])


# ----------------------------------------------------------------------------- file I/O


def cached_projection(
    cache_dir: str,
    student_tok,
    teacher_tok,
    student_vocab_size: int,
    teacher_vocab_size: int,
    *,
    build: bool = True,
) -> str:
    """The W file of this pair in cache_dir, named by the W format, both tokenizer hashes and the
    vocabulary sizes (a changed tokenizer or format never finds a stale W); built there first
    when it is missing and `build` (train.py: each node's first rank), written atomically."""
    key = f"{tokenizer_hash(student_tok)[:16]}-{tokenizer_hash(teacher_tok)[:16]}"
    name = f"W-v{FORMAT_VERSION}-{key}-{student_vocab_size}x{teacher_vocab_size}.pt"
    path = os.path.join(cache_dir, name)
    if build and not os.path.exists(path):
        print(
            f"building W for {student_tok.name_or_path} -> {teacher_tok.name_or_path} into {path}"
        )
        projection = build_projection(
            student_tok,
            teacher_tok,
            student_vocab_size=student_vocab_size,
            teacher_vocab_size=teacher_vocab_size,
        )
        save_projection(projection, path)
    return path


def save_projection(projection: dict, path: str) -> None:
    """torch.save to a temp file in the same directory, then rename: never a half-written W; a
    full disk is one line naming the path and the free space, the old file stays (saved)."""
    atomic_write(path, saved(projection))


# ----------------------------------------------------------------------------- the top-k format


def _from_topk(data: dict, path: str, student_tok, teacher_tok) -> dict:
    """A top-k file (NeMo-RL / TRL: topk_interop.read_topk, checked) as our dict: exact and
    special pairs recomputed from the tokenizers as build_projection does."""
    W, params = read_topk(
        data,
        path,
        student_tok,
        teacher_tok,
        check_tokenizers=_check_tokenizers,
        check_entries=check_entries,
    )
    _, exact_pairs, _ = _exact_pass(student_tok, teacher_tok)
    specials = _special_records(student_tok, teacher_tok)
    return {
        "W": W,
        "exact_pairs": _pairs_tensor(exact_pairs, specials),
        "special_pairs": specials,
        "student": _identity(student_tok, W.shape[0]),
        "teacher": _identity(teacher_tok, W.shape[1]),
        "params": params,
        "version": FORMAT_VERSION,
    }


def _name(tok, default: str) -> str:
    return getattr(tok, "name_or_path", "") or default


def _check_tokenizers(path: str, expected: dict, student_tok, teacher_tok) -> None:
    """Each given tokenizer's hash is the one the W file records."""
    for side, tok in (("student", student_tok), ("teacher", teacher_tok)):
        if tok is None:
            continue
        actual = tokenizer_hash(tok)
        if expected[side] != actual:
            raise ValueError(
                f"{path} was built for another {side} tokenizer (W has sha256 "
                f"{expected[side][:16]}..., {_name(tok, side)} has {actual[:16]}...); "
                "rebuild W for this pair"
            )


def load_projection(path: str, student_tok=None, teacher_tok=None) -> dict:
    """Load a W file (weights_only: no pickles) and check it against the given tokenizers: ours,
    or a top-k file of NeMo-RL / TRL (both tokenizers required), converted to ours."""
    if os.path.isdir(path):
        raise ValueError(f"projection file {path} is a directory; pass the W file in it")
    if not os.path.isfile(path):
        raise ValueError(
            f"projection file {path} does not exist; build it with build_projection.py"
        )
    if os.path.getsize(path) == 0:
        raise ValueError(
            f"{path} is empty (0 bytes: a write that never finished?); rebuild it with "
            "build_projection.py"
        )
    try:
        projection = torch.load(path, weights_only=True, map_location="cpu")
    except OSError as e:  # the file is there but cannot be read (permissions, I/O)
        raise ValueError(f"cannot read {path}: {e.strerror or e}; check its permissions") from e
    except MemoryError:
        raise
    except Exception as e:  # torch.load's parsers raise what they meet: text gives a KeyError,
        # a cut file EOFError or RuntimeError, a pickle weights_only refuses UnpicklingError
        raise ValueError(
            f"{path} is not a readable W file (corrupt or truncated, or no torch.save file: "
            f"{_why(e)}); rebuild it with build_projection.py"
        ) from e
    if is_topk(projection) and "version" not in projection:
        return _from_topk(projection, path, student_tok, teacher_tok)
    if not isinstance(projection, dict) or "version" not in projection:
        raise ValueError(
            f"{path} is not a W file (build_projection.py's, or a top-k file with 'indices' "
            "and 'likelihoods'); rebuild it with build_projection.py"
        )
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
    fix = "rebuild it with build_projection.py"
    sides = ("student", "teacher")
    if not all(isinstance(projection[side], dict) for side in sides) or not all(
        isinstance(projection[side].get("sha256"), str) for side in sides
    ):
        raise ValueError(f"{path}: its 'student'/'teacher' records lack a tokenizer hash; {fix}")
    expected = {side: projection[side]["sha256"] for side in sides}
    _check_tokenizers(path, expected, student_tok, teacher_tok)
    W, pairs = projection["W"], projection["exact_pairs"]
    if (
        not (isinstance(W, Tensor) and W.layout == torch.sparse_coo and W.dim() == 2)
        or not W.dtype.is_floating_point
    ):
        raise ValueError(f"{path}: 'W' is not a sparse float matrix [V_S, V_T]; {fix}")
    W = W.coalesce()
    s, t = W.indices()
    # its hashes matched the student's tokenizer: fewer rows than the tokenizer's ids is then a W
    # cut to a model's kept ids (mini/'s pruned vocabularies), not a W of another student
    check_entries(path, s, t, W.values(), tuple(W.shape), None, teacher_tok, W.dtype, fix)
    if not (isinstance(pairs, Tensor) and pairs.dtype == torch.long and pairs.dim() == 2) or (
        pairs.shape[1] != 2
        or bool((pairs < 0).any())
        or bool((pairs[:, 0] >= W.shape[0]).any() or (pairs[:, 1] >= W.shape[1]).any())
    ):
        raise ValueError(
            f"{path}: 'exact_pairs' is not a Long [n, 2] of (student id, teacher id) within "
            f"W {tuple(W.shape)}; {fix}"
        )
    return projection


def check_entries(path, s, t, w, shape, student_tok, teacher_tok, dtype, fix: str) -> None:
    """Every stage's one check of a loaded W's entries (student ids s, teacher ids t, weights w;
    ours and the top-k format alike), so that audit.py and train.py refuse the same files: the
    weights are finite and >= 0, every teacher id is one of the teacher tokenizer's (W's columns
    without it), the student tokenizer's ids are all rows, and every non-empty row sums to 1 (a
    distribution; to a tolerance that the weights' dtype sets: bfloat16 rounds each weight to 2^-8).
    A ValueError that names the file, the first bad entry and `fix`."""
    if len(w) and (not bool(torch.isfinite(w).all()) or bool((w < 0).any())):
        raise ValueError(f"{path}: W has negative or non-finite weights; {fix}")
    n_teacher = len(teacher_tok) if teacher_tok is not None else shape[1]
    beyond = t >= n_teacher
    if bool(beyond.any()):
        first = int(torch.nonzero(beyond)[0, 0])
        whose = f"the teacher tokenizer{_named(teacher_tok)}" if teacher_tok else "W"
        raise ValueError(
            f"{path} maps student id {int(s[first])} to teacher id {int(t[first])}, but {whose} "
            f"has {n_teacher} ids: it was built for another teacher or is damaged; {fix}"
        )
    if student_tok is not None and shape[0] < len(student_tok):
        raise ValueError(
            f"{path} has {shape[0]} rows but the student tokenizer{_named(student_tok)} has "
            f"{len(student_tok)} ids: it was built for another student; {fix}"
        )
    rows, inverse = torch.unique(s, return_inverse=True)
    sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, inverse, w.double())
    tolerance = max(1e-5, 4 * torch.finfo(dtype).eps)
    bad = torch.nonzero((sums - 1).abs() > tolerance).flatten()
    if len(bad):
        first = int(bad[0])
        raise ValueError(
            f"{path}: {len(bad):,} of W's {len(rows):,} non-empty rows do not sum to 1 (student "
            f"id {int(rows[first])} sums to {float(sums[first]):.4g}): each row is a "
            f"distribution over the teacher's tokens; the file is damaged or not a W; {fix}"
        )


def _named(tok) -> str:
    """The tokenizer's name after a space, or "" when it has none."""
    name = _name(tok, "")
    return f" {name}" if name else ""


def _why(e: BaseException) -> str:
    """An exception as a short phrase: its type and the first line of its message."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:80]}" if lines else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="build_projection.py", description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    parser.add_argument("--out", help="W file in this repo's format (torch.save dict)")
    parser.add_argument(
        "--export-topk",
        metavar="FILE",
        help="(also) write W in NeMo-RL/TRL's top-k format: indices/likelihoods [V_S, 4]",
    )
    size = int_flag(1, what=" (the model's embedding rows, at least the tokenizer's size)")
    parser.add_argument(
        "--student-vocab-size", type=size, help="default: model config, else tokenizer"
    )
    parser.add_argument(
        "--teacher-vocab-size", type=size, help="default: model config, else tokenizer"
    )
    parser.add_argument(
        "--reverse", action="store_true", help="add the reverse pass (off by default)"
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)

    return one_line_errors(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.out is None and args.export_topk is None:
        raise ValueError("no output: pass --out W.pt, --export-topk W_topk.pt, or both")
    if args.out is not None:  # before the slow work
        check_output_file(args.out, "--out", "W.pt")
    if args.export_topk is not None:
        check_output_file(args.export_topk, "--export-topk", "W_topk.pt")
        if args.out is not None and os.path.abspath(args.out) == os.path.abspath(args.export_topk):
            raise ValueError("--out and --export-topk name the same file; give two names")
    student = load_tokenizer(args.student, trust_remote_code=args.trust_remote_code)
    teacher = load_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code)
    sizes = {}
    for side, name, given, tok in (
        ("student", args.student, args.student_vocab_size, student),
        ("teacher", args.teacher, args.teacher_vocab_size, teacher),
    ):
        flag = f"--{side}-vocab-size"
        if given is not None and given < len(tok):
            raise ValueError(
                f"{flag} {given} is smaller than the {side} tokenizer ({len(tok)} ids); give at "
                f"least {len(tok)} (the model's embedding rows)"
            )
        sizes[side] = given if given is not None else model_vocab_size(name, flag)
    projection = build_projection(
        student,
        teacher,
        student_vocab_size=sizes["student"],
        teacher_vocab_size=sizes["teacher"],
        reverse=args.reverse,
    )
    if args.out is not None:
        save_projection(projection, args.out)
    if args.export_topk is not None:
        export_topk(
            projection,
            args.export_topk,
            student_model_id=args.student,
            teacher_model_id=args.teacher,
        )
    W = projection["W"]
    written = [args.out] if args.out is not None else []
    if args.export_topk is not None:
        written.append(f"{args.export_topk} (top-{TOPK_K} format)")
    print(
        f"W {tuple(W.shape)}: {W._nnz():,} entries, "
        f"{len(projection['exact_pairs']):,} exact pairs, "
        f"built in {time.perf_counter() - start:.1f} s -> {', '.join(written)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
