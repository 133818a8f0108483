"""X-Token's distillation losses (METHOD.md section 5), written as the equations.

Shapes and conventions
- Student logits `s_logits` [B, Ts, VS], teacher logits `t_logits` [B, Tt, VT], any float dtype;
  computed in float32 inside (float64 stays float64, for the tests).
- `s_chunk` [B, Ts], `t_chunk` [B, Tt]: for each POSITION, the chunk id (0..K-1, per sequence) of
  the token that position predicts: the predictor shift is already applied; -1 = no chunk.
- A chunk is valid when it has at least one position on both sides; the others are ignored.
- Chunk distributions (5.1): the student side is the mean of its positions' probability vectors
  (P-KL) or log-prob vectors (GOLD, ULD); the teacher side is the mean of log-prob vectors, not
  renormalised (a geometric mean: a chunk's P-KL or L_common can be slightly negative).
- Every KD loss is a 0-dim float32 tensor: the mean over valid chunks (positions for `kl_loss`)
  times temperature**2; with no valid chunk, an exact 0 that still backpropagates.
- Teacher logits are constants (no gradient). The teacher logits that are used must be finite.

How this file reads. Each loss is written ONCE, for a group of chunks: `pkl_terms`, `gold_terms`,
`kl_terms` and `ce_terms` take the student's and the teacher's logits at the positions of some
chunks, and for each side the mean that turns those positions into one row per chunk, and return
the SUM of the chunks' losses, the METHOD.md equation above the lines that compute it. Two ways run
them over a batch:
- `pkl_loss_plain`, `gold_loss_plain`, `kl_loss_plain`, `ce_loss_plain`: the whole batch at once,
  in a few lines each (find the valid chunks, gather their positions, one call, divide by their
  number). The reference: read these first.
- `pkl_loss`, `gold_loss`, `uld_loss`, `kl_loss`, `ce_loss`: the same terms block by block in
  bounded memory (blocked.py), one block's [rows, V] temporaries at a time: train.py's default.
  `train.py --loss-impl plain` trains with the plain ones.
`objective` puts CE and the KD terms together (5.5, 5.6): the one training loss train.py calls.
The tests check the two against each other and against float64 loops written from METHOD.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import blocked

NON_FINITE = blocked.NON_FINITE  # the error of non-finite teacher logits (train.py skips the step)
Q_FLOOR = 1e-10  # floor of projected probabilities: a subset id no student token reaches
# How P-KL floors log q (METHOD.md 5.2): "clamp" log(max(q / max(sum q, eps), eps)) gives an entry
# below eps no gradient; "add" log(q / (sum q + eps) + eps) keeps a damped one there.
Q_FLOORS = ("clamp", "add")


# ----------------------------------------------------------------------------- valid chunks


@dataclass
class Chunks:
    """A batch's valid chunks, numbered 0..n-1: each side's flat positions (b * T + p) in them and
    the chunk of each position."""

    s_rows: Tensor
    s_chunk: Tensor
    t_rows: Tensor
    t_chunk: Tensor
    n: int


def find_chunks(s_chunk: Tensor, t_chunk: Tensor) -> Chunks:
    """The chunks with a position on both sides (METHOD.md 5); chunk ids are per sequence."""
    width = 1 + max([0, *(int(c.max()) for c in (s_chunk, t_chunk) if c.numel())])
    s_key, t_key = (_keys(c, width) for c in (s_chunk, t_chunk))  # (sequence, chunk) as one key
    valid = torch.unique(s_key[s_key >= 0])
    valid = valid[torch.isin(valid, t_key)]
    s_rows = torch.isin(s_key, valid).nonzero().squeeze(1)
    t_rows = torch.isin(t_key, valid).nonzero().squeeze(1)
    number = partial(torch.searchsorted, valid)  # a key's place among the valid keys
    return Chunks(s_rows, number(s_key[s_rows]), t_rows, number(t_key[t_rows]), len(valid))


def _keys(chunk: Tensor, width: int) -> Tensor:
    sequence = torch.ones_like(chunk).cumsum(0) - 1  # [B, T]: the sequence of each position
    return torch.where(chunk >= 0, sequence * width + chunk, -1).flatten()


def chunk_mean(v: Tensor, chunk: Tensor, n: int) -> Tensor:
    """[rows, V] -> [n, V]: each chunk's mean over its rows (chunk [rows] in 0..n-1)."""
    count = torch.bincount(chunk, minlength=n).to(v.dtype)
    return v.new_zeros(n, v.shape[1]).index_add(0, chunk, v) / count[:, None]


# ----------------------------------------------------------------------------- the equations
# Each returns the SUM over a group of chunks. z_s [student rows, VS], z_t [teacher rows, V'] in
# float32 (float64 in the tests); s_mean, t_mean: [rows, V] -> [chunks, V], chunk i of both sides
# being the same chunk.


def project(p: Tensor, W: tuple[Tensor, Tensor, Tensor, int]) -> Tensor:
    """q = p W for a sparse W given by its non-zeros (rows, cols, weights, number of columns):
    q[:, t] = sum_s p[:, s] W[s, t]."""
    rows, cols, w, n_cols = W
    return p.new_zeros(len(p), n_cols).index_add(1, cols, p.index_select(1, rows) * w)


def pkl_terms(z_s, z_t, s_mean, t_mean, w, *, rows, cols, k, tau, floor="clamp") -> Tensor:
    """P-KL (5.2). z_t holds the teacher subset's columns only; W's non-zeros (rows, cols, w) are
    the ones in the subset, its columns numbered 0..k-1 (w may carry a gradient: a learned W)."""
    p_s = torch.softmax(z_s / tau, -1)
    # q = chunk mean of p_S W[:, subset], renormalised over the subset
    q = s_mean(project(p_s, (rows, cols, w, k)))
    if floor == "clamp":  # log max(q / max(sum q, eps), eps)
        log_q = (q / q.sum(-1, keepdim=True).clamp_min(Q_FLOOR)).clamp_min(Q_FLOOR).log()
    else:  # "add": log(q / (sum q + eps) + eps)
        log_q = (q / (q.sum(-1, keepdim=True) + Q_FLOOR) + Q_FLOOR).log()
    # a = chunk mean of the teacher's log-softmax over the subset (a geometric mean)
    a = t_mean(torch.log_softmax(z_t / tau, -1))
    # KL per chunk = sum_t exp(a_t) (a_t - log q_t)
    return (a.exp() * (a - log_q)).sum()


def gold_terms(z_s, z_t, s_mean, t_mean, *, pairs, us, ut, k, uld_weight, tau) -> Tensor:
    """GOLD / H-KL (5.3) = L_common + uld_weight * L_ULD. pairs = (student ids, teacher ids) of
    the common set C; us, ut: each side's uncommon ids (None: all); k: how many ULD sorts."""
    log_ps = s_mean(torch.log_softmax(z_s / tau, -1))
    log_pt = t_mean(torch.log_softmax(z_t / tau, -1))
    loss = log_ps[:, :0].sum()  # 0, but part of the graph
    cs, ct = pairs
    if len(cs):
        log_pt_c, log_ps_c = log_pt.index_select(1, ct), log_ps.index_select(1, cs)
        # L_common = sum_{(s,t) in C} pT[t] (log pT[t] - log pS[s])
        loss = (log_pt_c.exp() * (log_pt_c - log_ps_c)).sum()
    if k and uld_weight:
        with torch.no_grad():  # which uncommon ids rank in the top k (no gradient)
            top_ps_ids = _top_ids(log_ps, us, k)
            top_pt = log_pt.gather(1, _top_ids(log_pt, ut, k)).exp()
        top_ps = log_ps.gather(1, top_ps_ids).exp()
        # L_ULD = sum_i |sort(pS[U_S])_i - sort(pT[U_T])_i|, i < min(|U_S|, |U_T|, uld_topk)
        loss = loss + uld_weight * (top_ps - top_pt).abs().sum()
    return loss


def kl_terms(z_s, z_t, *, subset, tau) -> Tensor:
    """Same-tokenizer KD (5.4), per position (a chunk is a position: the means are identities).
    z_t holds the subset's columns only (subset None: the whole vocabulary)."""
    log_pt = torch.log_softmax(z_t / tau, -1)
    log_ps = torch.log_softmax((z_s if subset is None else z_s.index_select(1, subset)) / tau, -1)
    # KL(p_T || p_S) = sum_v p_T[v] (log p_T[v] - log p_S[v])
    return (log_pt.exp() * (log_pt - log_ps)).sum()


def ce_terms(z_s, labels) -> Tensor:
    """Next-token cross-entropy (5.5) of the given positions and their labels [rows]."""
    # CE = -log p_S[label]
    return F.cross_entropy(z_s, labels.reshape(-1), reduction="sum")


# ----------------------------------------------------------------------------- the whole batch


def pkl_loss_plain(
    s_logits, t_logits, s_chunk, t_chunk, W, *, vocab_topk=8192, temperature=1.0, floor="clamp"
) -> Tensor:
    """pkl_loss on the whole batch at once: the reference for the blocked pkl_loss."""
    _check(s_logits, t_logits, s_chunk, t_chunk, temperature)
    _check_floor(floor)
    _check_W(W, s_logits, t_logits)
    c, dtype = find_chunks(s_chunk, t_chunk), _dtype(s_logits)
    z_s, z_t = _rows(s_logits, c.s_rows, dtype), _rows(t_logits, c.t_rows, dtype)
    _check_finite(z_t)
    # the teacher subset: the K ids with the largest logit anywhere in the batch's valid positions
    subset = _subset(lambda: z_t.amax(0), c.n, vocab_topk, t_logits.shape[-1])
    rows, cols, w = _in_subset(W, subset, t_logits.shape[-1], s_logits.device)
    z_t = z_t if subset is None else z_t.index_select(1, subset)
    means = partial(chunk_mean, chunk=c.s_chunk, n=c.n), partial(chunk_mean, chunk=c.t_chunk, n=c.n)
    k = z_t.shape[-1]
    total = pkl_terms(
        z_s, z_t, *means, w.to(dtype), rows=rows, cols=cols, k=k, tau=temperature, floor=floor
    )
    return _mean(total, c.n, temperature, s_logits)


def gold_loss_plain(
    s_logits,
    t_logits,
    s_chunk,
    t_chunk,
    common_pairs,
    *,
    uld_topk=8192,
    temperature=1.0,
    uld_weight=1.0,
) -> Tensor:
    """gold_loss on the whole batch at once: the reference for the blocked gold_loss."""
    _check(s_logits, t_logits, s_chunk, t_chunk, temperature)
    c, dtype = find_chunks(s_chunk, t_chunk), _dtype(s_logits)
    z_s, z_t = _rows(s_logits, c.s_rows, dtype), _rows(t_logits, c.t_rows, dtype)
    _check_finite(z_t)
    common = _common(common_pairs, s_logits, t_logits, uld_topk)
    means = partial(chunk_mean, chunk=c.s_chunk, n=c.n), partial(chunk_mean, chunk=c.t_chunk, n=c.n)
    total = gold_terms(z_s, z_t, *means, **common, uld_weight=uld_weight, tau=temperature)
    return _mean(total, c.n, temperature, s_logits)


def uld_loss_plain(
    s_logits, t_logits, s_chunk, t_chunk, *, uld_topk=8192, temperature=1.0
) -> Tensor:
    """uld_loss on the whole batch at once: GOLD's sorted L1 with no common set."""
    no_pairs = torch.zeros(0, 2, dtype=torch.long, device=s_logits.device)
    return gold_loss_plain(
        s_logits, t_logits, s_chunk, t_chunk, no_pairs, uld_topk=uld_topk, temperature=temperature
    )


def kl_loss_plain(s_logits, t_logits, mask, *, vocab_topk=8192, temperature=1.0) -> Tensor:
    """kl_loss on the whole batch at once: the reference for the blocked kl_loss."""
    chunk = _kl_check(s_logits, t_logits, mask, temperature)
    c, dtype = find_chunks(chunk, chunk), _dtype(s_logits)
    z_s, z_t = _rows(s_logits, c.s_rows, dtype), _rows(t_logits, c.t_rows, dtype)
    _check_finite(z_t)
    subset = _subset(lambda: z_t.amax(0), c.n, vocab_topk, t_logits.shape[-1])
    z_t = z_t if subset is None else z_t.index_select(1, subset)
    total = kl_terms(z_s, z_t, subset=subset, tau=temperature)
    return _mean(total, c.n, temperature, s_logits)


def ce_loss_plain(s_logits: Tensor, labels: Tensor) -> Tensor:
    """ce_loss on the whole batch at once: the reference for the blocked ce_loss."""
    chunk = _ce_check(s_logits, labels)
    c, dtype = find_chunks(chunk, chunk), _dtype(s_logits)
    z_s = _rows(s_logits, c.s_rows, dtype)
    total = ce_terms(z_s, labels.flatten()[c.t_rows])
    return _mean(total, c.n, 1.0, s_logits)


# ----------------------------------------------------------------------------- blocked (train.py)


def pkl_loss(
    s_logits: Tensor,
    t_logits: Tensor,
    s_chunk: Tensor,
    t_chunk: Tensor,
    W: Tensor | LearnableProjection,
    *,
    vocab_topk: int = 8192,
    temperature: float = 1.0,
    floor: str = "clamp",
) -> Tensor:
    """P-KL (5.2): KL(teacher chunk || student chunk projected through W) over a teacher subset.

    The subset: the vocab_topk teacher ids with the largest logit anywhere in the batch's valid
    positions (0 or >= VT: all ids). The student softmax is over its full vocabulary, the projected
    chunk is renormalised over the subset, the teacher log-softmax is taken over the subset. floor:
    how log q is kept finite where q is ~0 (Q_FLOORS).
    """
    _check(s_logits, t_logits, s_chunk, t_chunk, temperature)
    _check_floor(floor)
    _check_W(W, s_logits, t_logits)
    vs, vt = s_logits.shape[-1], t_logits.shape[-1]
    k = vt if vocab_topk <= 0 else min(vocab_topk, vt)
    plan = _plan(s_chunk, t_chunk, s_logits, vs, k)
    subset = _subset(lambda: blocked.column_max(t_logits, plan), plan.n, vocab_topk, vt)
    rows, cols, w = _in_subset(W, subset, vt, s_logits.device)
    dtype = _dtype(s_logits)
    terms = partial(pkl_terms, rows=rows, cols=cols, k=k, tau=temperature, floor=floor)
    return blocked.block_sum(
        terms,
        plan,
        s_logits,
        t_logits,
        w.to(dtype),
        t_cols=subset,
        scale=temperature**2 / max(plan.n, 1),
        dtype=dtype,
    )


def gold_loss(
    s_logits: Tensor,
    t_logits: Tensor,
    s_chunk: Tensor,
    t_chunk: Tensor,
    common_pairs: Tensor,
    *,
    uld_topk: int = 8192,
    temperature: float = 1.0,
    uld_weight: float = 1.0,
) -> Tensor:
    """GOLD (5.3) = L_common + uld_weight * L_ULD. H-KL is GOLD with `hkl_pairs(W, exact_pairs)`
    (build_projection.py).

    Both sides: full-vocabulary log-softmax, chunk mean of the log-probs, no renormalisation. pS and
    pT are the exps of those chunk means: L_common weighs by them and ULD sorts them. L_ULD compares
    the top min(|U_S|, |U_T|, uld_topk) uncommon ones (uld_topk=0: no cut), found with topk.
    """
    _check(s_logits, t_logits, s_chunk, t_chunk, temperature)
    common = _common(common_pairs, s_logits, t_logits, uld_topk)
    plan = _plan(s_chunk, t_chunk, s_logits, s_logits.shape[-1], t_logits.shape[-1])
    terms = partial(gold_terms, **common, uld_weight=uld_weight, tau=temperature)
    return blocked.block_sum(
        terms,
        plan,
        s_logits,
        t_logits,
        dtype=_dtype(s_logits),
        scale=temperature**2 / max(plan.n, 1),
    )


def uld_loss(
    s_logits: Tensor,
    t_logits: Tensor,
    s_chunk: Tensor,
    t_chunk: Tensor,
    *,
    uld_topk: int = 8192,
    temperature: float = 1.0,
) -> Tensor:
    """ULD (Boizard et al. 2024): GOLD's sorted L1 over the whole vocabularies (no common set)."""
    no_pairs = torch.zeros(0, 2, dtype=torch.long, device=s_logits.device)
    return gold_loss(
        s_logits, t_logits, s_chunk, t_chunk, no_pairs, uld_topk=uld_topk, temperature=temperature
    )


def kl_loss(
    s_logits: Tensor,
    t_logits: Tensor,
    mask: Tensor,
    *,
    vocab_topk: int = 8192,
    temperature: float = 1.0,
) -> Tensor:
    """Same-tokenizer KD (5.4): KL(p_T || p_S) per position where mask [B, T] is True, mean.

    With 0 < vocab_topk < V both sides are renormalised over the teacher's top-K ids, chosen as
    for P-KL (largest logit anywhere in the masked positions); else the full vocabulary.
    """
    chunk = _kl_check(s_logits, t_logits, mask, temperature)
    v = s_logits.shape[-1]
    plan = _plan(chunk, chunk, s_logits, v, v)
    subset = _subset(lambda: blocked.column_max(t_logits, plan), plan.n, vocab_topk, v)
    # a chunk is a position: the engine's chunk means are identities, not passed on
    terms = lambda z_s, z_t, s_mean, t_mean: kl_terms(z_s, z_t, subset=subset, tau=temperature)
    return blocked.block_sum(
        terms,
        plan,
        s_logits,
        t_logits,
        t_cols=subset,
        dtype=_dtype(s_logits),
        scale=temperature**2 / max(plan.n, 1),
    )


def ce_loss(s_logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy, mean over labelled positions. labels [B, T] are aligned with the
    logits (position p's label is the token p predicts: no shift here); -100 is ignored."""
    chunk = _ce_check(s_logits, labels)
    plan = _plan(chunk, chunk, s_logits, s_logits.shape[-1], s_logits.shape[-1])
    terms = lambda z_s, labels, s_mean, t_mean: ce_terms(z_s, labels)  # a chunk is a position
    return blocked.block_sum(
        terms, plan, s_logits, labels, dtype=_dtype(s_logits), scale=1 / max(plan.n, 1)
    )


def _plan(s_chunk: Tensor, t_chunk: Tensor, s_logits: Tensor, s_vocab: int, t_vocab: int):
    """The valid chunks in blocks, found on the host from one copy of the chunk ids."""
    ids = torch.cat([s_chunk.flatten().long(), t_chunk.flatten().long()]).cpu()  # the one sync
    c = find_chunks(
        ids[: s_chunk.numel()].view(s_chunk.shape), ids[s_chunk.numel() :].view(t_chunk.shape)
    )
    device = s_logits.device
    budgets = blocked.rows_per_block(s_vocab, device), blocked.rows_per_block(t_vocab, device)
    return blocked.plan(
        (c.s_rows, c.s_chunk), (c.t_rows, c.t_chunk), c.n, budgets, device, s_chunk.numel()
    )


# ----------------------------------------------------------------------------- KD and CE together


def objective(
    ce: Tensor,
    kd_terms: Sequence[Tensor],
    weights: Sequence[float],
    *,
    shares: Sequence[Tensor | float] | None = None,
    dynamic: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    max_scale: float = math.inf,
) -> tuple[Tensor, Tensor]:
    """The training loss of one micro-batch (5.5, 5.6) and the KD scale applied in it.

    ce, kd_terms[m]: the micro-batch's means (CE over its labelled tokens, each teacher's KD over
    its valid chunks); KD = sum_m weights[m] * kd_terms[m]. The loss is a mean over the whole step
    (every micro-batch and rank), so each term enters times its `shares` entry (CE's, then each
    teacher's): the micro-batch's part of the step's count of that term's targets (None: 1, the
    micro-batch is the step). The scale comes from this micro-batch's means: no second pass, no
    communication. max_scale caps the dynamic scale (5.5: a student that nearly matches its teacher
    has KD -> 0, and CE / KD would let KD's gradient drown CE's).
    """
    if len(kd_terms) != len(weights):
        raise ValueError(f"{len(kd_terms)} KD terms but {len(weights)} weights")
    shares = [1.0] * (len(weights) + 1) if shares is None else shares
    kd_mean = sum((w * term for w, term in zip(weights, kd_terms)), ce.new_zeros(()))
    kd_parts = [term * s for term, s in zip(kd_terms, shares[1:])]
    kd = sum((w * part for w, part in zip(weights, kd_parts)), ce.new_zeros(()))
    if not dynamic:
        # loss = kd_weight * KD + ce_weight * CE
        scale = torch.as_tensor(kd_weight, dtype=kd.dtype, device=kd.device)
        return scale * kd + ce_weight * (ce * shares[0]), scale
    # loss = sg(min(CE / |KD|, max_scale)) * KD + CE: the KD gradient is scaled by CE / |KD| (the
    # absolute value: GOLD's and H-KL's unrenormalized chunk means can make KD negative, and a
    # negative scale would flip its gradient), at most max_scale; the scale is 1 where KD = 0
    kd_value, ce_value = kd_mean.detach().abs(), ce.detach()
    scale = (ce_value / kd_value).clamp(max=max_scale)
    scale = torch.where(kd_value > 0, scale, torch.ones_like(kd_value))
    return scale * kd + 1.0 * (ce * shares[0]), scale


# ----------------------------------------------------------------------------- learned W


class LearnableProjection(nn.Module):
    """W with a fixed sparsity pattern (each row's top `slots` teacher ids) and learned weights.

    A row's weights are the softmax of its `logits` over its non-empty slots, initialised to log(w):
    the module starts at W (rows renormalised). Empty rows stay empty. P-KL only; train.py gives it
    its own parameter group (lr 1e-2, no weight decay, no gradient clipping).
    """

    def __init__(self, W: Tensor, slots: int = 4):
        super().__init__()
        s, t, w = _sparse_entries(W)
        # by row, heaviest first (two stable sorts)
        order = torch.argsort(-w, stable=True)
        order = order[torch.argsort(s[order], stable=True)]
        s, t, w = s[order], t[order], w[order].float()
        rank = torch.arange(len(s), device=s.device) - torch.searchsorted(s, s)  # slot in row
        keep = rank < slots
        s, t, w, rank = s[keep], t[keep], w[keep], rank[keep]
        shape = (W.shape[0], slots)
        self.register_buffer("index", torch.zeros(shape, dtype=torch.long, device=s.device))
        self.register_buffer("mask", torch.zeros(shape, dtype=torch.bool, device=s.device))
        self.logits = nn.Parameter(torch.zeros(shape, device=s.device))
        with torch.no_grad():
            self.index[s, rank], self.mask[s, rank], self.logits[s, rank] = t, True, w.log()
        self.shape = torch.Size(W.shape)

    def weights(self) -> Tensor:
        """[VS, slots]: every non-empty row sums to 1; empty slots are 0."""
        return torch.softmax(self.logits.masked_fill(~self.mask, -1e9), -1) * self.mask

    def entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """(student ids, teacher ids, weights) of the non-zeros; the weights carry gradient."""
        keep = self.mask.flatten().nonzero().squeeze(1)  # one sync, not one per boolean mask
        s = torch.div(keep, self.mask.shape[1], rounding_mode="floor")
        return s, self.index.flatten()[keep], self.weights().flatten().index_select(0, keep)

    def forward(self) -> Tensor:
        """The current W as a sparse COO [VS, VT] tensor."""
        s, t, w = self.entries()
        W = torch.sparse_coo_tensor(torch.stack([s, t]), w, self.shape, check_invariants=False)
        return W.coalesce()


def _sparse_entries(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if W.layout not in (torch.sparse_coo, torch.sparse_csr):
        raise ValueError("W must be a sparse [VS, VT] tensor (COO or CSR) or a LearnableProjection")
    W = (W.to_sparse_coo() if W.layout == torch.sparse_csr else W).coalesce()
    return W.indices()[0], W.indices()[1], W.values()


# ----------------------------------------------------------------------------- shared pieces


def _check_W(W, s_logits: Tensor, t_logits: Tensor) -> None:
    vs, vt = s_logits.shape[-1], t_logits.shape[-1]
    if tuple(W.shape) != (vs, vt):
        raise ValueError(
            f"W is {list(W.shape)} but the logits have VS={vs}, VT={vt}: "
            "build W for these two models' vocabulary sizes"
        )


def _in_subset(W, subset: Tensor | None, vt: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """W's non-zeros (rows, cols, weights) in the teacher subset, its columns numbered 0..k-1."""
    rows, cols, w = (
        x.to(device)
        for x in (W.entries() if isinstance(W, LearnableProjection) else _sparse_entries(W))
    )
    if subset is not None:
        col_in_subset = torch.full((vt,), -1, dtype=torch.long, device=device)
        col_in_subset[subset] = torch.arange(len(subset), device=device)
        cols = col_in_subset[cols]
        keep = (cols >= 0).nonzero().squeeze(1)  # one sync (three boolean masks would be three)
        rows, cols, w = rows[keep], cols[keep], w[keep]
    return rows, cols, w


def _subset(best: Callable[[], Tensor], n: int, vocab_topk: int, vocab: int) -> Tensor | None:
    """The teacher subset (5.2): the vocab_topk ids with the largest best() (each id's largest
    logit over the valid positions), ascending; None: every id (vocab_topk 0 or >= the vocabulary,
    or no valid chunk)."""
    if n == 0 or vocab_topk <= 0 or vocab_topk >= vocab:
        return None
    return torch.topk(best().float(), vocab_topk).indices.sort().values


def _common(common_pairs: Tensor, s_logits: Tensor, t_logits: Tensor, uld_topk: int) -> dict:
    """gold_terms' arguments from the common pairs [n, 2], checked one-to-one and in range (one
    read of the device): the pairs, the uncommon ids of each side, how many of them ULD sorts."""
    vs, vt = s_logits.shape[-1], t_logits.shape[-1]
    pairs = common_pairs.reshape(-1, 2) if common_pairs.numel() == 0 else common_pairs
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.is_floating_point():
        raise ValueError(
            f"common_pairs must be integer (student_id, teacher_id) pairs [n, 2]; "
            f"got {pairs.dtype} {list(pairs.shape)}"
        )
    cs, ct = pairs[:, 0].to(s_logits.device), pairs[:, 1].to(s_logits.device)
    if len(pairs):
        outside = (cs.min() < 0) | (ct.min() < 0) | (cs.max() >= vs) | (ct.max() >= vt)
        twice = (_id_counts(cs, vs).max() > 1) | (_id_counts(ct, vt).max() > 1)
        outside, twice = torch.stack([outside, twice]).tolist()
        if outside:
            raise ValueError(
                f"common_pairs hold ids outside VS={vs} / VT={vt}: pairs of other models?"
            )
        if twice:
            raise ValueError(
                "common_pairs must be one-to-one: a student or teacher id appears twice"
            )
    k = min(vs - len(cs), vt - len(ct), uld_topk if uld_topk > 0 else vs)
    return {"pairs": (cs, ct), "us": _uncommon(cs, vs), "ut": _uncommon(ct, vt), "k": k}


def _id_counts(ids: Tensor, vocab: int) -> Tensor:
    """How many times each id of range(vocab) appears in ids (out-of-range ids clamped): a
    bincount would read ids.max() on the host."""
    counts = torch.zeros(vocab, dtype=torch.long, device=ids.device)
    return counts.index_add_(0, ids.clamp(0, vocab - 1), torch.ones_like(ids))


def _uncommon(common: Tensor, vocab: int) -> Tensor | None:
    """The ids of range(vocab) that are not in `common` (None: all of them), ascending. `common`
    holds distinct ids, so there are vocab - len(common) of them: no nonzero (a sync) needed."""
    if not len(common):
        return None
    # index_fill_, not keep[common] = False: on a GPU the latter copies False to the device, a sync
    keep = torch.ones(vocab, dtype=torch.bool, device=common.device).index_fill_(0, common, False)
    n = vocab - len(common)
    # the i-th kept id goes to slot i, the common ones to a spare slot n, dropped
    slot = torch.where(keep, torch.cumsum(keep, 0) - 1, n)
    ids = torch.arange(vocab, device=common.device)
    return torch.empty(n + 1, dtype=torch.long, device=common.device).scatter_(0, slot, ids)[:n]


def _top_ids(x: Tensor, ids: Tensor | None, k: int) -> Tensor:
    """Per row, the k ids among `ids` (None: all columns) with the largest x, largest first."""
    if ids is None:
        return torch.topk(x, k).indices
    return ids[torch.topk(x.index_select(1, ids), k).indices]


def _rows(x: Tensor, rows: Tensor, dtype: torch.dtype) -> Tensor:
    return x.flatten(0, 1)[rows].to(dtype)


def _mean(total: Tensor, n: int, tau: float, s_logits: Tensor) -> Tensor:
    """total / n * tau**2; with no valid chunk an exact 0 whose gradient is zeros."""
    if n == 0:
        return blocked.zero(s_logits).to(_dtype(s_logits))
    return total * tau**2 / n


def _check_finite(z_t: Tensor) -> None:
    if not bool(torch.isfinite(z_t).all()):
        raise ValueError(NON_FINITE)


def _dtype(s_logits: Tensor) -> torch.dtype:
    """float32 for any input (bf16 included); float64 stays float64, for the reference tests."""
    return torch.float64 if s_logits.dtype == torch.float64 else torch.float32


def _check_floor(floor: str) -> None:
    if floor not in Q_FLOORS:
        raise ValueError(f"floor {floor!r} is not one of {Q_FLOORS}")


def _check(s_logits: Tensor, t_logits: Tensor, s_chunk: Tensor, t_chunk: Tensor, tau: float):
    if s_logits.dim() != 3 or t_logits.dim() != 3 or len(s_logits) != len(t_logits):
        raise ValueError(
            f"logits must be [B, T, V] with the same B; got student "
            f"{list(s_logits.shape)}, teacher {list(t_logits.shape)}"
        )
    for name, chunk, logits in (("s_chunk", s_chunk, s_logits), ("t_chunk", t_chunk, t_logits)):
        if chunk.shape != logits.shape[:2] or chunk.is_floating_point():
            raise ValueError(
                f"{name} must be integer chunk ids [B, T] = {list(logits.shape[:2])}, one per "
                f"position of its logits; got {chunk.dtype} {list(chunk.shape)}"
            )
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got {tau}")


def _kl_check(s_logits: Tensor, t_logits: Tensor, mask: Tensor, tau: float) -> Tensor:
    """KL's inputs checked; its chunk ids (a chunk is a masked position)."""
    if s_logits.shape != t_logits.shape or mask.shape != s_logits.shape[:2]:
        raise ValueError(
            "same-tokenizer KD needs logits of one shape and a mask [B, T]; got "
            f"{list(s_logits.shape)}, {list(t_logits.shape)}, mask {list(mask.shape)}"
        )
    chunk = torch.where(mask.bool(), torch.arange(mask.shape[1], device=mask.device), -1)
    _check(s_logits, t_logits, chunk, chunk, tau)
    return chunk


def _ce_check(s_logits: Tensor, labels: Tensor) -> Tensor:
    """CE's inputs checked; its chunk ids (a chunk is a labelled position)."""
    if labels.shape != s_logits.shape[:2]:
        raise ValueError(
            f"labels must be [B, T] = {list(s_logits.shape[:2])}; got {list(labels.shape)}"
        )
    return torch.where(labels != -100, torch.arange(labels.shape[1], device=labels.device), -1)
