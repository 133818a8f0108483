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
import errno
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable

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
        try:  # a hub name: its config, when reachable
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(name_or_path)
            size = getattr(config, "vocab_size", None) or config.get_text_config().vocab_size
        except Exception:
            return None
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
    import torch

    t_vocab = teacher_tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    s_bytes, t_bytes = token_bytes(student_tok), token_bytes(teacher_tok, t_vocab)
    vs = len(s_bytes) if student_vocab_size is None else student_vocab_size
    vt = len(t_bytes) if teacher_vocab_size is None else teacher_vocab_size
    for side, size, n in (("student", vs, len(s_bytes)), ("teacher", vt, len(t_bytes))):
        if isinstance(size, bool) or not isinstance(size, int):
            raise ValueError(f"{side} vocab size {size!r} is not an integer")
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

    if os.path.isdir(path):
        raise ValueError(f"projection file {path} is a directory; pass the W file in it")
    if not os.path.isfile(path):
        raise ValueError(
            f"projection file {path} does not exist; build it with build_projection.py"
        )
    try:
        projection = torch.load(path, weights_only=True, map_location="cpu")
    except OSError as e:  # the file is there but cannot be read (permissions, I/O)
        raise ValueError(f"cannot read {path}: {e.strerror or e}; check its permissions") from e
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


# ----------------------------------------------------------------------------- command line
# Shared by build_projection.py, audit.py and mini.py. Bad input is ONE line on stderr,
# "error: WHAT; WHAT TO DO", and exit status 2, checked before any slow work or any write.


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block): 'error: argument --x: ...'."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def int_flag(low: int, high: int | None = None, what: str = "") -> Callable:
    """An argparse type: an integer in [low, high] (high None: no upper bound)."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            message = f"{text!r} is not an integer; give {allowed}{what}"
            raise argparse.ArgumentTypeError(message) from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range; give {allowed}{what}")
        return value

    return parse


def float_flag(low: float, high: float, *, low_open: bool = False, what: str = "") -> Callable:
    """An argparse type: a finite number in [low, high], or (low, high] with low_open."""
    allowed = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number; give a number in {allowed}{what}"
            ) from None
        if not math.isfinite(value) or not low <= value <= high or (low_open and value == low):
            message = f"{text} is out of range; give a number in {allowed}{what}"
            raise argparse.ArgumentTypeError(message)
        return value

    return parse


def os_error_line(e: OSError) -> str:
    """An OS error as one line that says what is wrong and what to do."""
    where = f"{e.filename}: " if e.filename else ""
    hint = {
        errno.ENOSPC: "free some space or choose another location",
        errno.EDQUOT: "free some space or choose another location",
        errno.EACCES: "check the permissions or choose another location",
        errno.EPERM: "check the permissions or choose another location",
        errno.EROFS: "choose a location on a writable file system",
        errno.ENOENT: "check the path",
        errno.EISDIR: "name a file, not a directory",
        errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
    }.get(e.errno, "check the path and its permissions")
    return f"{where}{e.strerror or e}; {hint}"


def one_line_errors(run: Callable[[], int]) -> int:
    """run(), with bad input (ValueError) and OS errors as one line on stderr and status 2: the
    error path of every CLI here (a bug keeps its traceback)."""
    try:
        return run()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
    return 2


def _probe_directory(directory: str, path: str) -> None:
    """Create and remove a temp file in an existing directory: the only check that is right for
    root, ACLs and read-only mounts alike (os.access is not). Leaves nothing behind."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe-")
    except OSError as e:
        raise ValueError(
            f"cannot write {path}: {directory} is not writable ({e.strerror}); "
            "choose a writable location"
        ) from e
    os.close(fd)
    os.unlink(probe)


def _existing_ancestor(directory: str, path: str) -> str:
    """The nearest directory on the way up from `directory` that exists (os.makedirs creates the
    rest); an error if it is a file."""
    existing = directory
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(
            f"cannot write {path}: {existing} is a file, not a directory; choose another location"
        )
    return existing


def check_output_file(path: str, flag: str, example: str) -> None:
    """Fail fast (ValueError) when the file `path` could not be written: it is a directory, or
    its directory is not writable and cannot be created. Writes nothing."""
    if not path:
        raise ValueError(f"{flag} is empty; name a file, e.g. {flag} {example}")
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        what = "is a directory" if os.path.isdir(path) else "ends with a slash (a directory)"
        raise ValueError(
            f"{flag} {path} {what}; name a file, e.g. {flag} {os.path.join(path, example)}"
        )
    directory = os.path.dirname(os.path.abspath(path))
    _probe_directory(_existing_ancestor(directory, path), path)


def check_output_dir(path: str, flag: str) -> None:
    """Fail fast (ValueError) when the directory `path` could not be written or created."""
    if not path:
        raise ValueError(f"{flag} is empty; name a directory")
    path_abs = os.path.abspath(path)
    if os.path.lexists(path_abs) and not os.path.isdir(path_abs):
        raise ValueError(f"{flag} {path} is a file, not a directory; name a directory")
    _probe_directory(_existing_ancestor(path_abs, path), path)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="build_projection.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--student", required=True, help="hub name, directory, tokenizer file, pkg:NAME"
    )
    parser.add_argument(
        "--teacher", required=True, help="hub name, directory, tokenizer file, pkg:NAME"
    )
    parser.add_argument("--out", required=True, help="output file (torch.save dict)")
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
    check_output_file(args.out, "--out", "W.pt")  # before the slow work
    # torch's import (~2 s) overlaps the tokenizer work; nothing here needs it until W is built
    threading.Thread(target=__import__, args=("torch",), daemon=True).start()
    student = load_tokenizer(args.student, trust_remote_code=args.trust_remote_code)
    teacher = load_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code)
    sizes = {}
    for side, name, given in (("student", args.student, args.student_vocab_size),
                              ("teacher", args.teacher, args.teacher_vocab_size)):  # fmt: skip
        flag = f"--{side}-vocab-size"
        sizes[side] = given if given is not None else model_vocab_size(name, flag)
    projection = build_projection(
        student,
        teacher,
        student_vocab_size=sizes["student"],
        teacher_vocab_size=sizes["teacher"],
        reverse=args.reverse,
    )
    save_projection(projection, args.out)
    W = projection["W"]
    print(
        f"W {tuple(W.shape)}: {W._nnz():,} entries, "
        f"{len(projection['exact_pairs']):,} exact pairs, "
        f"built in {time.perf_counter() - start:.1f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
