"""W in the top-k format of NeMo-RL's and TRL's X-Token: interop with their tools.

NVIDIA NeMo-RL's X-Token tools (tools/x_token/minimal_projection_via_multitoken.py) and TRL's port
(trl/experimental/gold/scripts/xtoken/build_projection_matrix.py) write the projection W not as
this repo's sparse dict (build_projection.py) but as a dict of two dense arrays, one row per
student id:
  "indices"      Long [V_S, k]: the row's teacher ids by weight descending, -1 pads a row;
  "likelihoods"  float [V_S, k]: their weights, 0 where padded;
with "student_model_id" / "teacher_model_id" (legacy: "model_A_id" / "model_B_id"). Their strict
exact map is a row [t, -1, ...] of weights [1.0, 0, ...], which an exact pair here exports as.

It exists so that a W built here trains there and one built there is audited and trained here:
  - export_topk (build_projection.py --export-topk) writes our W in it, plus keys their readers
    ignore: both tokenizer hashes and W's padded column count, so the file is verifiable here;
  - read_topk (build_projection.load_projection, for a file with "indices" and "likelihoods")
    reads one back, checked; load_projection completes it as its own dict, the exact and special
    pairs recomputed from the tokenizers as build_projection does. Their own files carry no
    hashes: they load only with both tokenizers given, with a warning that the pair cannot be
    verified.
"""

from __future__ import annotations

import errno
import io
import os
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from cli import atomic_write

TOPK_K = 4  # their runtime top-k, and this W's top-k
TOPK_MODEL_IDS = {
    "student": ("student_model_id", "model_A_id"),
    "teacher": ("teacher_model_id", "model_B_id"),
}


def to_topk(W: Tensor, k: int = TOPK_K) -> tuple[Tensor, Tensor]:
    """W as top-k arrays: indices Long [V_S, k], each row's teacher ids by weight descending
    (ties: lowest id), -1 padded; likelihoods float32 [V_S, k], 0 where padded. An error when a
    row has more than k entries (never cut: the row would no longer sum to 1)."""
    W = W.coalesce()
    s, t, w = W.indices()[0], W.indices()[1], W.values()
    order = torch.arange(len(s), device=s.device)
    for key in (t, -w, s):  # stable sorts: by row, then weight descending, then teacher id
        order = order[torch.argsort(key[order], stable=True)]
    s, t, w = s[order], t[order], w[order]
    counts = torch.bincount(s, minlength=W.shape[0])
    if len(s) and int(counts.max()) > k:
        raise ValueError(f"W has a row of {int(counts.max())} entries, more than k = {k}")
    rank = torch.arange(len(s)) - (torch.cumsum(counts, 0) - counts)[s]
    indices = torch.full((W.shape[0], k), -1, dtype=torch.long)
    likelihoods = torch.zeros((W.shape[0], k), dtype=torch.float32)
    indices[s, rank], likelihoods[s, rank] = t, w.float()
    return indices, likelihoods


def export_topk(
    projection: dict, path: str, *, student_model_id: str, teacher_model_id: str
) -> None:
    """Write W (build_projection's dict) in the top-k format (atomically). Their readers ignore
    the keys they do not know: the tokenizer hashes make the file verifiable here, as ours is."""
    indices, likelihoods = to_topk(projection["W"])
    data = {
        "indices": indices,
        "likelihoods": likelihoods,
        "student_model_id": student_model_id,
        "teacher_model_id": teacher_model_id,
        "enable_scale_trick": False,  # no 0.2 slot in the last column (their sort_and_cut reads it)
        "student_tokenizer_sha256": projection["student"]["sha256"],
        "teacher_tokenizer_sha256": projection["teacher"]["sha256"],
        "teacher_vocab_size": int(projection["W"].shape[1]),  # W's columns, padding included
    }
    atomic_write(path, saved(data))


def saved(obj) -> Callable:
    """cli.atomic_write's write function for torch.save(obj) (build_projection.py's W files use it
    too): serialized in memory, then written in full. torch.save writing into the file itself turns
    a full disk's short write into a RuntimeError ("unexpected pos"), which would escape as a
    traceback; a plain write raises the OSError (ENOSPC) that atomic_write reports in one line with
    the path and the free space. The bytes are torch.save's own, as written to a file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)

    def write(f) -> None:
        view = buffer.getbuffer()
        while len(view):  # a raw file may take part of it: write the rest
            written = f.write(view)
            if written == 0:  # nothing taken: a full device that does not say so
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[len(view) if written is None else written :]

    return write


def is_topk(data) -> bool:
    """Whether a loaded file's content is a top-k file (it has "indices" and "likelihoods")."""
    return isinstance(data, dict) and "indices" in data and "likelihoods" in data


def read_topk(
    data: dict,
    path: str,
    student_tok,
    teacher_tok,
    *,
    check_tokenizers: Callable,
    check_entries: Callable,
) -> tuple[Tensor, dict]:
    """A top-k file's W, sparse [V_S, V_T] as stored (-1 and 0-weight slots dropped), and the
    "params" our dict records of it. Both tokenizers are required; a file with our hashes is
    checked against them with check_tokenizers(path, {side: sha256}, student_tok, teacher_tok)
    (load_projection's check), one without them is read with a warning on stderr. Its entries
    pass load_projection's check of every W (check_entries: teacher ids the teacher tokenizer
    has, rows that sum to 1) before W is made."""
    hashes = {side: data.get(f"{side}_tokenizer_sha256") for side in ("student", "teacher")}
    verified = all(isinstance(h, str) for h in hashes.values())
    if student_tok is None or teacher_tok is None:
        if verified:
            raise ValueError(
                f"{path} is a top-k W file (NeMo-RL/TRL format): pass --student and --teacher "
                "(its exact pairs are computed from both tokenizers)"
            )
        raise ValueError(
            f"{path} is a top-k W file (NeMo-RL/TRL format) without tokenizer hashes: pass "
            "--student and --teacher; it cannot be verified against them"
        )
    indices, likelihoods = _topk_arrays(data, path)
    if verified:
        check_tokenizers(path, hashes, student_tok, teacher_tok)
    rows, k = indices.shape
    if rows < len(student_tok):
        raise ValueError(
            f"{path} has {rows} rows (student ids) but the student tokenizer "
            f"{_name(student_tok, 'student')} has {len(student_tok)} ids: it was built for "
            "another student; rebuild it for this pair"
        )
    keep = (indices >= 0) & (likelihoods > 0)  # -1 pads a row; a 0 weight is no entry
    s = torch.arange(rows).unsqueeze(1).expand(rows, k)[keep]
    t, w = indices[keep], likelihoods[keep]
    vt = len(teacher_tok)
    fix = "re-export it (build_projection.py --export-topk) or rebuild it"
    check_entries(
        path, s, t, w, (rows, vt), student_tok, teacher_tok, data["likelihoods"].dtype, fix
    )
    if verified and isinstance(data.get("teacher_vocab_size"), int):
        vt = max(vt, data["teacher_vocab_size"])  # ours: W's padded columns come back too
    W = torch.sparse_coo_tensor(torch.stack([s, t]), w, (rows, vt), check_invariants=True)
    W = W.coalesce()
    ids = {side: _model_id(data, side) for side in TOPK_MODEL_IDS}
    if not verified:
        named = " -> ".join(i or "?" for i in ids.values())
        built = f" (built for {named})" if any(ids.values()) else ""
        print(
            f"warning: {path} is a top-k W file without tokenizer hashes{built}: it cannot be "
            f"verified against {_name(student_tok, 'the student')} -> "
            f"{_name(teacher_tok, 'the teacher')}; make sure it was built for them",
            file=sys.stderr,
        )
    params = {
        "source": "topk",
        "top_k": k,
        "verified": verified,
        "student_model_id": ids["student"],
        "teacher_model_id": ids["teacher"],
    }
    return W, params


def _topk_arrays(data: dict, path: str) -> tuple[Tensor, Tensor]:
    """indices (Long) and likelihoods (float32) of a top-k file, checked: one shape [V_S, k],
    teacher ids >= -1, weights finite and >= 0."""
    indices, likelihoods = data["indices"], data["likelihoods"]
    fix = "re-export it (build_projection.py --export-topk) or rebuild it"
    if not isinstance(indices, Tensor) or not isinstance(likelihoods, Tensor):
        raise ValueError(f"{path}: 'indices' and 'likelihoods' are not tensors; {fix}")
    if indices.dim() != 2 or indices.shape != likelihoods.shape or 0 in indices.shape:
        raise ValueError(
            f"{path}: 'indices' {tuple(indices.shape)} and 'likelihoods' "
            f"{tuple(likelihoods.shape)} are not one shape [V_S, k]; {fix}"
        )
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"{path}: 'indices' is {indices.dtype}, not integer teacher ids; {fix}")
    if not likelihoods.dtype.is_floating_point:
        raise ValueError(f"{path}: 'likelihoods' is {likelihoods.dtype}, not float; {fix}")
    indices, likelihoods = indices.long(), likelihoods.float()
    if bool((indices < -1).any()):
        raise ValueError(
            f"{path}: 'indices' has teacher id {int(indices.min())} (only -1 pads a row); {fix}"
        )
    if not bool(torch.isfinite(likelihoods).all()) or bool((likelihoods < 0).any()):
        raise ValueError(f"{path}: 'likelihoods' has negative or non-finite weights; {fix}")
    return indices, likelihoods


def _model_id(data: dict, side: str) -> str | None:
    for key in TOPK_MODEL_IDS[side]:
        if isinstance(data.get(key), str) and data[key]:
            return data[key]
    return None


def _name(tok, default: str) -> str:
    return getattr(tok, "name_or_path", "") or default
