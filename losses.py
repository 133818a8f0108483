"""X-Token distillation losses (METHOD.md section 5) as pure tensor functions.

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

Memory: W is never dense. Positions are processed in blocks of whole chunks, about BLOCK_ELEMENTS
logits per side, and only a scalar crosses blocks. A block's gradient is taken in the forward pass,
while its softmax is at hand (as in Liger-Kernel's fused losses), and written into one buffer shaped
like s_logits; backward only scales that buffer, once. Extra memory: the buffer + one block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK_ELEMENTS = 1 << 21  # logits per side in a block: 8 MB in fp32 fits CPU caches; GPUs: 1 << 24
Q_FLOOR = 1e-10  # floor of projected probabilities: a subset id no student token reaches
NON_FINITE = "teacher logits contain NaN or inf: check the teacher's forward pass and its dtype"


class _Block(NamedTuple):
    s_rows: Tensor | slice  # flat student positions (b * Ts + p) of the block's chunks
    s_mean: Tensor | None  # [n, rows]: chunk means = s_mean @ rows (None: one row per chunk)
    t_rows: Tensor | slice
    t_mean: Tensor | None
    n: int  # chunks in the block


def _chunk_blocks(
    s_chunk: Tensor, t_chunk: Tensor, s_budget: int, t_budget: int
) -> tuple[list[_Block], int]:
    """Group the valid chunks into blocks of at most ~budget rows per side -> (blocks, n_valid)."""
    device = s_chunk.device
    k = 1 + max([-1] + [int(c.max()) for c in (s_chunk, t_chunk) if c.numel()])
    batch = torch.arange(s_chunk.shape[0], device=device)[:, None]
    g_s, g_t = (torch.where(c >= 0, batch * k + c, -1).flatten() for c in (s_chunk, t_chunk))
    n_s, n_t = (torch.bincount(g[g >= 0], minlength=len(batch) * k) for g in (g_s, g_t))
    valid = (n_s > 0) & (n_t > 0)
    n_valid = int(valid.sum())
    if n_valid == 0:
        return [], 0
    compact = torch.cumsum(valid, 0) - 1

    def rows_by_chunk(g: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        rows = ((g >= 0) & valid[g.clamp_min(0)]).nonzero().squeeze(1)
        chunk = compact[g[rows]]
        order = torch.argsort(chunk, stable=True)
        return rows[order], chunk[order], torch.bincount(chunk, minlength=n_valid).tolist()

    def side(rows: Tensor, chunk: Tensor, count: list[int], a: int, first: int, n: int):
        """(rows, mean matrix) of chunks first..first+n-1, whose rows start at a."""
        b = a + sum(count[first : first + n])
        r = rows[a:b].cpu()
        if torch.equal(r, r[0] + torch.arange(b - a)):  # consecutive positions: read as a view
            rows_ab = slice(int(r[0]), int(r[0]) + b - a)
        else:
            rows_ab = rows[a:b]
        if b - a == n:
            return rows_ab, None
        size = torch.tensor(count[first : first + n], device=device, dtype=torch.float64)
        mean = torch.zeros(n, b - a, device=device, dtype=torch.float64)
        mean[chunk[a:b] - first, torch.arange(b - a, device=device)] = 1 / size[chunk[a:b] - first]
        return rows_ab, mean

    (s_rows, s_cid, s_count), (t_rows, t_cid, t_count) = rows_by_chunk(g_s), rows_by_chunk(g_t)
    blocks, first, s0, t0, ns, nt = [], 0, 0, 0, 0, 0
    for c in range(n_valid + 1):
        if c > first and (c == n_valid or ns + s_count[c] > s_budget or nt + t_count[c] > t_budget):
            s_side = side(s_rows, s_cid, s_count, s0, first, c - first)
            t_side = side(t_rows, t_cid, t_count, t0, first, c - first)
            blocks.append(_Block(*s_side, *t_side, c - first))
            first, s0, t0, ns, nt = c, s0 + ns, t0 + nt, 0, 0
        if c < n_valid:
            ns, nt = ns + s_count[c], nt + t_count[c]
    return blocks, n_valid


def _take(x: Tensor, rows: Tensor | slice) -> Tensor:
    """Rows of x [B, T, V] at flat positions (a slice of a contiguous x is a view, not a copy)."""
    if x.is_contiguous():
        return x.view(-1, x.shape[-1])[rows]
    rows = torch.arange(rows.start, rows.stop, device=x.device) if isinstance(rows, slice) else rows
    return x[rows // x.shape[1], rows % x.shape[1]]


def _chunk_mean(v: Tensor, mean: Tensor | None) -> Tensor:
    """[rows, V] -> [n, V]: the mean of each chunk's rows (a small matmul)."""
    return v if mean is None else mean.to(v.dtype) @ v


def _teacher_rows(t_logits: Tensor, b: _Block, cols: Tensor | None, tau: float, dtype) -> Tensor:
    """The block's teacher logits (only the columns `cols` if given) / tau, checked finite."""
    t = _take(t_logits, b.t_rows)
    t = (t if cols is None else t.index_select(1, cols)).to(dtype)
    if not bool(torch.isfinite(t.sum())):  # a sum keeps NaN and inf, with no mask tensor
        raise ValueError(NON_FINITE)
    return _scaled(t, tau)


def _teacher_subset(t_logits: Tensor, blocks: list[_Block], k: int) -> Tensor | None:
    """The k teacher ids with the largest logit anywhere in the blocks' rows; None = all ids."""
    vt = t_logits.shape[-1]
    if k >= vt:
        return None
    best = torch.full((vt,), float("-inf"), dtype=t_logits.dtype, device=t_logits.device)
    for b in blocks:
        best = torch.maximum(best, _take(t_logits, b.t_rows).amax(0))
    if not bool(torch.isfinite(best).all()):  # amax keeps NaN and +inf of any column
        raise ValueError(NON_FINITE)
    return torch.topk(best.float(), k).indices.sort().values


class _BlockSum(torch.autograd.Function):
    """scale * sum over blocks of block_loss(student rows, block, *params), with the gradients of
    every block taken in forward; backward scales them by the incoming gradient, once."""

    @staticmethod
    def forward(ctx, block_loss, blocks, scale, dtype, s_logits, *params):
        grads = [torch.zeros_like(p) if need else None
                 for p, need in zip(params, ctx.needs_input_grad[5:])]  # fmt: skip
        s_grad = None  # every row is written below, so the buffer starts empty, not zeroed
        if ctx.needs_input_grad[4]:
            s_grad = torch.empty_like(s_logits, memory_format=torch.contiguous_format)
            unused = torch.ones(s_grad.shape[:2], dtype=torch.bool, device=s_grad.device).flatten()
            s_grad = s_grad.view(-1, s_logits.shape[-1])
        total = torch.zeros((), dtype=dtype, device=s_logits.device)
        for b in blocks:
            leaves = [_take(s_logits, b.s_rows).detach().to(dtype).requires_grad_()]
            leaves += [p.detach().requires_grad_() for p in params]
            with torch.enable_grad():
                loss = block_loss(leaves[0], b, *leaves[1:]) * scale
                block_grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            total += loss.detach()
            if s_grad is not None:
                s_grad[b.s_rows] = block_grads[0].to(s_grad.dtype)
                unused[b.s_rows] = False
            for g, block_g in zip(grads, block_grads[1:]):
                if g is not None and block_g is not None:
                    g += block_g
        if s_grad is not None:
            s_grad[unused.nonzero().squeeze(1)] = 0  # positions outside every valid chunk
            s_grad = s_grad.view(s_logits.shape)
        ctx.grads = [s_grad, *grads]
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None  # hand the buffers over: no copy of [N, V]
        if grads is None:
            raise RuntimeError("a losses.py loss backpropagates once: compute it again")
        if bool(grad_out != 1):
            grads = [g if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]
        return None, None, None, None, *grads


def _block_sum(block_loss: Callable, blocks, scale: float, s_logits: Tensor, *params) -> Tensor:
    dtype = _compute_dtype(s_logits)
    if not blocks:  # no valid chunk: an exact 0 whose gradient is zeros
        return s_logits[..., :0].sum().to(dtype)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (s_logits, *params)):
        return _BlockSum.apply(block_loss, blocks, scale, dtype, s_logits, *params)
    total = sum(block_loss(_take(s_logits, b.s_rows).to(dtype), b, *params) for b in blocks)
    return total * scale


def _check(s_logits: Tensor, t_logits: Tensor, s_chunk: Tensor, t_chunk: Tensor, tau: float):
    if s_logits.dim() != 3 or t_logits.dim() != 3 or len(s_logits) != len(t_logits):
        raise ValueError(f"logits must be [B, T, V] with the same B; got student "
                         f"{list(s_logits.shape)}, teacher {list(t_logits.shape)}")  # fmt: skip
    for name, chunk, logits in (("s_chunk", s_chunk, s_logits), ("t_chunk", t_chunk, t_logits)):
        if chunk.shape != logits.shape[:2] or chunk.is_floating_point():
            raise ValueError(
                f"{name} must be integer chunk ids [B, T] = {list(logits.shape[:2])}, one per "
                f"position of its logits; got {chunk.dtype} {list(chunk.shape)}"
            )
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got {tau}")


def _compute_dtype(s_logits: Tensor) -> torch.dtype:
    """float32 for any input (bf16 included); float64 stays float64, for the reference tests."""
    return torch.float64 if s_logits.dtype == torch.float64 else torch.float32


def _rows_per_block(vocab: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(vocab, 1))


def _scaled(x: Tensor, tau: float) -> Tensor:
    return x if tau == 1 else x / tau


# ----------------------------------------------------------------------------- projection W


class LearnableProjection(nn.Module):
    """W with a fixed sparsity pattern (each row's top `slots` teacher ids) and learned weights.

    A row's weights are the softmax of its `logits` over its non-empty slots, initialised to log(w):
    the module starts at W (rows renormalised). Empty rows stay empty. P-KL only; train.py gives it
    its own parameter group (lr 1e-2, no weight decay, no gradient clipping).
    """

    def __init__(self, W: Tensor, slots: int = 4):
        super().__init__()
        s, t, w = _sparse_entries(W)
        order = _lexsort(-w, s)  # by row, heaviest first
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
        s = torch.arange(self.shape[0], device=self.index.device)[:, None].expand_as(self.index)
        return s[self.mask], self.index[self.mask], self.weights()[self.mask]

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


def _entries(W: Tensor | LearnableProjection) -> tuple[Tensor, Tensor, Tensor]:
    return W.entries() if isinstance(W, LearnableProjection) else _sparse_entries(W)


def _lexsort(*keys: Tensor) -> Tensor:
    """The order that sorts by the last key, then the one before, ... (as numpy.lexsort)."""
    order = torch.arange(len(keys[0]), device=keys[0].device)
    for key in keys:
        order = order[torch.argsort(key[order], stable=True)]
    return order


def _first_of_runs(key: Tensor) -> Tensor:
    """True where a sorted key starts a run of equal values."""
    return torch.cat([torch.ones_like(key[:1], dtype=torch.bool), key[1:] != key[:-1]])


# ----------------------------------------------------------------------------- losses


def pkl_loss(
    s_logits: Tensor,
    t_logits: Tensor,
    s_chunk: Tensor,
    t_chunk: Tensor,
    W: Tensor | LearnableProjection,
    *,
    vocab_topk: int = 8192,
    temperature: float = 1.0,
) -> Tensor:
    """P-KL (5.2): KL(teacher chunk || student chunk projected through W) over a teacher subset.

    The subset: the vocab_topk teacher ids with the largest logit anywhere in the batch's valid
    positions (0 or >= VT: all ids). The student softmax is over its full vocabulary, the projected
    chunk is renormalised over the subset, the teacher log-softmax is taken over the subset.
    """
    _check(s_logits, t_logits, s_chunk, t_chunk, temperature)
    vs, vt = s_logits.shape[-1], t_logits.shape[-1]
    if tuple(W.shape) != (vs, vt):
        raise ValueError(f"W is {list(W.shape)} but the logits have VS={vs}, VT={vt}: "
                         "build W for these two models' vocabulary sizes")  # fmt: skip
    k = vt if vocab_topk <= 0 else min(vocab_topk, vt)
    blocks, n_valid = _chunk_blocks(s_chunk, t_chunk, _rows_per_block(vs), _rows_per_block(k))
    subset = _teacher_subset(t_logits, blocks, k) if blocks else None
    rows, cols, w = (x.to(s_logits.device) for x in _entries(W))
    if subset is not None:  # keep the entries of W that land in the subset, numbered 0..k-1
        col_in_subset = torch.full((vt,), -1, dtype=torch.long, device=cols.device)
        col_in_subset[subset] = torch.arange(k, device=cols.device)
        cols = col_in_subset[cols]
        rows, cols, w = rows[cols >= 0], cols[cols >= 0], w[cols >= 0]
    dtype = _compute_dtype(s_logits)

    def block_loss(x: Tensor, b: _Block, w: Tensor) -> Tensor:
        p = torch.softmax(_scaled(x, temperature), -1)
        # q = p_S W[:, subset], summed over the non-zeros of W
        q = torch.zeros(len(p), k, dtype=dtype, device=p.device).index_add(
            1, cols, p.index_select(1, rows) * w
        )
        q = _chunk_mean(q, b.s_mean)
        log_q = (q / q.sum(-1, keepdim=True).clamp_min(Q_FLOOR)).clamp_min(Q_FLOOR).log()
        t = _teacher_rows(t_logits, b, subset, temperature, dtype)
        a = _chunk_mean(torch.log_softmax(t, -1), b.t_mean)
        # KL per chunk = sum_t exp(a_t) (a_t - log q_t)
        return (a.exp() * (a - log_q)).sum()

    return _block_sum(block_loss, blocks, temperature**2 / max(n_valid, 1), s_logits, w.to(dtype))


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
    """GOLD (5.3) = L_common + uld_weight * L_ULD. H-KL is GOLD with `hkl_pairs(W, exact_pairs)`.

    Both sides: full-vocabulary log-softmax, chunk mean of the log-probs, no renormalisation. pS and
    pT are the exps of those chunk means: L_common weighs by them and ULD sorts them. L_ULD compares
    the top min(|U_S|, |U_T|, uld_topk) uncommon ones (uld_topk=0: no cut), found with topk.
    """
    _check(s_logits, t_logits, s_chunk, t_chunk, temperature)
    vs, vt = s_logits.shape[-1], t_logits.shape[-1]
    pairs = common_pairs.reshape(-1, 2) if common_pairs.numel() == 0 else common_pairs
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.is_floating_point():
        raise ValueError(f"common_pairs must be integer (student_id, teacher_id) pairs [n, 2]; "
                         f"got {pairs.dtype} {list(pairs.shape)}")  # fmt: skip
    cs, ct = pairs[:, 0].to(s_logits.device), pairs[:, 1].to(s_logits.device)
    if len(pairs) and (min(cs.min(), ct.min()) < 0 or cs.max() >= vs or ct.max() >= vt):
        raise ValueError(f"common_pairs hold ids outside VS={vs} / VT={vt}: pairs of other models?")
    if len(pairs) and max(torch.bincount(cs).max(), torch.bincount(ct).max()) > 1:
        raise ValueError("common_pairs must be one-to-one: a student or teacher id appears twice")
    us, ut = _uncommon(cs, vs), _uncommon(ct, vt)
    k = min(vs - len(cs), vt - len(ct), uld_topk if uld_topk > 0 else vs)
    blocks, n_valid = _chunk_blocks(s_chunk, t_chunk, _rows_per_block(vs), _rows_per_block(vt))
    dtype = _compute_dtype(s_logits)

    def block_loss(x: Tensor, b: _Block) -> Tensor:
        log_ps = _chunk_mean(torch.log_softmax(_scaled(x, temperature), -1), b.s_mean)
        t = _teacher_rows(t_logits, b, None, temperature, dtype)
        log_pt = _chunk_mean(torch.log_softmax(t, -1), b.t_mean)
        loss = log_ps[:, :0].sum()  # 0, but part of the graph
        if len(pairs):
            log_pt_c = log_pt.index_select(1, ct)
            pt_at_student_ids = log_pt.new_zeros(log_ps.shape).index_copy_(1, cs, log_pt_c.exp())
            # L_common = sum_{(s,t) in C} pT[t] (log pT[t] - log pS[s])
            loss = (log_pt_c.exp() * log_pt_c).sum() - (pt_at_student_ids * log_ps).sum()
        if k and uld_weight:
            with torch.no_grad():  # which uncommon ids rank in the top k (no gradient)
                top_ps_ids = _top_ids(log_ps, us, k)
                top_pt = log_pt.gather(1, _top_ids(log_pt, ut, k)).exp()
            top_ps = log_ps.gather(1, top_ps_ids).exp()
            # L_ULD = sum_i |sort(pS[U_S])_i - sort(pT[U_T])_i|, i < min(|U_S|, |U_T|, uld_topk)
            loss = loss + uld_weight * (top_ps - top_pt).abs().sum()
        return loss

    return _block_sum(block_loss, blocks, temperature**2 / max(n_valid, 1), s_logits)


def _top_ids(x: Tensor, ids: Tensor | None, k: int) -> Tensor:
    """Per row, the k ids among `ids` (None: all columns) with the largest x, largest first."""
    if ids is None:
        return torch.topk(x, k).indices
    return ids[torch.topk(x.index_select(1, ids), k).indices]


def _uncommon(common: Tensor, vocab: int) -> Tensor | None:
    """The ids of range(vocab) that are not in `common` (None: all of them)."""
    if not len(common):
        return None
    keep = torch.ones(vocab, dtype=torch.bool, device=common.device)
    keep[common] = False
    return keep.nonzero().squeeze(1)


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
    return gold_loss(s_logits, t_logits, s_chunk, t_chunk, no_pairs, uld_topk=uld_topk,
                     temperature=temperature)  # fmt: skip


def hkl_pairs(
    W: Tensor | LearnableProjection, exact_pairs: Tensor, *, threshold: float = 0.6
) -> Tensor:
    """H-KL's common set (5.3): the exact pairs, plus each other student row's top teacher id under
    W when its weight is >= threshold and that teacher id is not an exact pair's. A teacher id that
    several rows claim goes to the highest weight, ties to the lowest student id. One-to-one.
    Returns a LongTensor [n', 2] of (student_id, teacher_id), sorted by student id.
    """
    s, t, w = (x.detach() for x in _entries(W))
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
    if s_logits.shape != t_logits.shape or mask.shape != s_logits.shape[:2]:
        raise ValueError(
            "same-tokenizer KD needs logits of one shape and a mask [B, T]; got "
            f"{list(s_logits.shape)}, {list(t_logits.shape)}, mask {list(mask.shape)}"
        )
    chunk = torch.where(mask.bool(), torch.arange(mask.shape[1], device=mask.device), -1)
    _check(s_logits, t_logits, chunk, chunk, temperature)
    v = s_logits.shape[-1]
    k = v if vocab_topk <= 0 else min(vocab_topk, v)
    blocks, n_valid = _chunk_blocks(chunk, chunk, _rows_per_block(v), _rows_per_block(v))
    subset = _teacher_subset(t_logits, blocks, k) if blocks else None
    dtype = _compute_dtype(s_logits)

    def block_loss(x: Tensor, b: _Block) -> Tensor:
        log_pt = torch.log_softmax(_teacher_rows(t_logits, b, subset, temperature, dtype), -1)
        x = x if subset is None else x.index_select(1, subset)
        log_ps = torch.log_softmax(_scaled(x, temperature), -1)
        # KL(p_T || p_S) = sum_v p_T[v] (log p_T[v] - log p_S[v])
        return (log_pt.exp() * (log_pt - log_ps)).sum()

    return _block_sum(block_loss, blocks, temperature**2 / max(n_valid, 1), s_logits)


def ce_loss(s_logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy, mean over labelled positions. labels [B, T] are aligned with the
    logits (position p's label is the token p predicts: no shift here); -100 is ignored."""
    if labels.shape != s_logits.shape[:2]:
        raise ValueError(
            f"labels must be [B, T] = {list(s_logits.shape[:2])}; got {list(labels.shape)}"
        )
    chunk = torch.where(labels != -100, torch.arange(labels.shape[1], device=labels.device), -1)
    rows = _rows_per_block(s_logits.shape[-1])
    blocks, n_valid = _chunk_blocks(chunk, chunk, rows, rows)
    flat_labels = labels.reshape(-1)

    def block_loss(x: Tensor, b: _Block) -> Tensor:
        # CE = -log p_S[label]
        return F.cross_entropy(x, flat_labels[b.s_rows], reduction="sum")

    return _block_sum(block_loss, blocks, 1 / max(n_valid, 1), s_logits)


def combine(
    ce: Tensor,
    kd_terms: Sequence[Tensor],
    weights: Sequence[float],
    *,
    dynamic: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
) -> Tensor:
    """The training loss (5.5, 5.6), with KD = sum_m weights[m] * kd_terms[m].

    dynamic: sg(CE / KD) * KD + CE: its value is 2 * CE and the KD gradient is scaled by CE / KD.
    The scale is 1 when KD <= 0 (a negative KD would flip the sign of its gradient).
    static: kd_weight * KD + ce_weight * CE.
    """
    if len(kd_terms) != len(weights):
        raise ValueError(f"{len(kd_terms)} KD terms but {len(weights)} weights")
    kd = sum((w * term for w, term in zip(weights, kd_terms)), ce.new_zeros(()))
    if not dynamic:
        return kd_weight * kd + ce_weight * ce
    kd_value, ce_value = kd.detach(), ce.detach()
    # loss = sg(CE / KD) * KD + CE
    scale = torch.where(kd_value > 0, ce_value / kd_value, torch.ones_like(kd_value))
    return scale * kd + ce
