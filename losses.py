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

Memory: W is never dense. Positions are processed in blocks of whole chunks, about
_block_elements(device) logits per side (small on CPU, to stay in cache; on a GPU a share of its
memory, so that a call is a few large kernels rather than hundreds of small ones), and only a scalar
crosses blocks. A block's gradient is taken in the forward pass, while its softmax is at hand (as in
Liger-Kernel's fused losses), and written into one buffer shaped like s_logits; backward only
scales that buffer, once. Extra memory: the buffer + one block.

Host-device syncs: the blocks are planned on the host from one copy of the chunk ids, and their
index tensors go to the device in one transfer; nothing inside the loop over blocks reads a device
value (the teacher's finiteness is gathered on the device and read once, at the end). A call waits
for the device a fixed few times, however many blocks it has.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK_ELEMENTS = 1 << 21  # logits per side in a block on CPU: 8 MB in fp32 fits CPU caches
# On a GPU, total memory / this many bytes: a block's ~10 fp32 temporaries of [rows, V] take ~4% of
# it (H200: 147M logits, ~1,150 rows of a 128k vocabulary; 80 GB: ~600 rows)
CUDA_BYTES_PER_BLOCK_ELEMENT = 1024
# A chunk mean with at most this many (chunks x rows) is a dense matmul: one pass over the rows,
# the fastest for CPU-sized blocks; larger ones (GPU-sized blocks) go slot by slot (_Mean), as a
# dense [n, rows] matrix would grow quadratically with the block
DENSE_MEAN_ELEMENTS = 1024
Q_FLOOR = 1e-10  # floor of projected probabilities: a subset id no student token reaches
NON_FINITE = "teacher logits contain NaN or inf: check the teacher's forward pass and its dtype"


class _Mean(NamedTuple):
    """A chunk mean over a block's rows, slot by slot: slot j holds the j-th row of every chunk
    with more than j rows, so that a slot's chunks are distinct (no two rows add into one chunk at
    once: deterministic on a GPU too) and the work is one pass over the rows, not a dense matmul."""

    rows: Tensor  # [rows]: the block's local row indices, slot after slot (slot 0: chunk order)
    chunks: Tensor  # [rows]: the local chunk (0..n-1) of each
    weights: Tensor  # [rows] float64: 1 / the chunk's number of rows
    bounds: tuple[int, ...]  # slot j is [bounds[j], bounds[j + 1]); bounds[1] = n


class _Block(NamedTuple):
    s_rows: Tensor | slice  # flat student positions (b * Ts + p) of the block's chunks
    s_mean: Tensor | _Mean | None  # chunk means: [n, rows] matrix, slots, None (a row per chunk)
    t_rows: Tensor | slice
    t_mean: Tensor | _Mean | None
    n: int  # chunks in the block


class _Plan(NamedTuple):
    blocks: list[_Block]
    n_valid: int  # valid chunks
    s_unused: Tensor | None  # flat student positions outside every valid chunk (gradient 0)


def _block_elements(device: torch.device) -> int:
    """Logits per side in a block: BLOCK_ELEMENTS on CPU, a share of the memory of a GPU."""
    if device.type == "cuda":
        return _cuda_block_elements(torch.cuda.get_device_properties(device).total_memory)
    return BLOCK_ELEMENTS


def _cuda_block_elements(total_memory: int) -> int:
    return max(BLOCK_ELEMENTS, total_memory // CUDA_BYTES_PER_BLOCK_ELEMENT)


def _rows_per_block(vocab: int, device: torch.device) -> int:
    return max(1, _block_elements(device) // max(vocab, 1))


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host-to-device copy that does not wait for the device (a blocking one would)."""
    if device.type == "cuda":
        host = host.pin_memory()  # non_blocking from pinned memory: the host goes on at once
    return host.to(device, non_blocking=True)


def _chunk_blocks(s_chunk: Tensor, t_chunk: Tensor, s_budget: int, t_budget: int) -> _Plan:
    """Group the valid chunks into blocks of at most ~budget rows per side (a chunk larger than
    that gets a block of its own). Planned on the host: one device-to-host copy of the chunk ids
    (the one sync), and the blocks' index tensors go back in one host-to-device copy."""
    device = s_chunk.device
    s_flat, t_flat = s_chunk.reshape(-1).long(), t_chunk.reshape(-1).long()
    ids = torch.cat([s_flat, t_flat]).cpu()
    s_host, t_host = ids[: len(s_flat)].view(s_chunk.shape), ids[len(s_flat) :].view(t_chunk.shape)
    k = 1 + int(ids.max()) if len(ids) else 0
    batch = torch.arange(s_chunk.shape[0])[:, None]
    g_s, g_t = (torch.where(c >= 0, batch * k + c, -1).flatten() for c in (s_host, t_host))
    n_s, n_t = (torch.bincount(g[g >= 0], minlength=len(batch) * k) for g in (g_s, g_t))
    valid = (n_s > 0) & (n_t > 0)
    n_valid = int(valid.sum())
    if n_valid == 0:
        return _Plan([], 0, None)
    compact = torch.cumsum(valid, 0) - 1

    def rows_by_chunk(g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(rows sorted by chunk, their chunk, each chunk's row count)."""
        rows = ((g >= 0) & valid[g.clamp_min(0)]).nonzero().squeeze(1)
        chunk = compact[g[rows]]
        order = torch.argsort(chunk, stable=True)
        return rows[order], chunk[order], torch.bincount(chunk, minlength=n_valid)

    s_side, t_side = rows_by_chunk(g_s), rows_by_chunk(g_t)
    # greedy, as a loop over chunks would: a block takes chunks while both sides fit their budget
    s_end, t_end = ([0, *torch.cumsum(count, 0).tolist()] for _, _, count in (s_side, t_side))
    firsts = [0]
    while firsts[-1] < n_valid:
        c = firsts[-1]
        fits_s = bisect.bisect_right(s_end, s_end[c] + s_budget) - 1
        fits_t = bisect.bisect_right(t_end, t_end[c] + t_budget) - 1
        firsts.append(max(c + 1, min(fits_s, fits_t)))

    parts: list[Tensor] = []  # int64 host tensors, sent to the device at once
    size = [0]

    def put(x: Tensor) -> tuple[int, int]:
        parts.append(x)
        size[0] += len(x)
        return size[0] - len(x), size[0]

    def plan_side(rows: Tensor, chunk: Tensor, count: Tensor, end: list[int]) -> list:
        """Per block: (rows as a slice or a put range, mean as put ranges or None)."""
        rank = torch.arange(len(rows)) - (torch.cumsum(count, 0) - count)[chunk]
        breaks = [0, *torch.cumsum(rows[1:] != rows[:-1] + 1, 0).tolist()]
        weight = (1 / count.double())[chunk]
        out = []
        for first, stop in zip(firsts[:-1], firsts[1:]):
            a, b = end[first], end[stop]
            if breaks[b - 1] == breaks[a]:  # consecutive positions: read as a view
                block_rows = slice(int(rows[a]), int(rows[a]) + b - a)
            else:
                block_rows = put(rows[a:b])
            n = stop - first
            if b - a == n:
                out.append((block_rows, None))
                continue
            if n * (b - a) <= DENSE_MEAN_ELEMENTS:  # [n, rows]: 1 / size where a row is in a chunk
                dense = torch.zeros(n, b - a, dtype=torch.float64)
                dense[chunk[a:b] - first, torch.arange(b - a)] = weight[a:b]
                out.append((block_rows, (put(dense.flatten().view(torch.int64)), n)))
                continue
            # slot-major: by rank, then chunk (rows of a chunk are consecutive, ranks 0, 1, ...)
            order = torch.argsort(rank[a:b] * n + chunk[a:b] - first)
            slots = torch.bincount(rank[a:b]).cumsum(0).tolist()
            mean = (put(order), put(chunk[a:b][order] - first),
                    put(weight[a:b][order].view(torch.int64)), (0, *slots))  # fmt: skip
            out.append((block_rows, mean))
        return out

    s_plan, t_plan = plan_side(*s_side, s_end), plan_side(*t_side, t_end)
    unused = torch.ones(len(s_flat), dtype=torch.bool)
    unused[s_side[0]] = False
    unused_range = put(unused.nonzero().squeeze(1)) if bool(unused.any()) else None
    buffer = _to_device(torch.cat(parts), device) if parts else None

    def get(r: tuple[int, int] | slice) -> Tensor | slice:
        return r if isinstance(r, slice) else buffer[r[0] : r[1]]

    def mean(m) -> Tensor | _Mean | None:
        if m is None:
            return None
        if len(m) == 2:  # dense
            return get(m[0]).view(torch.float64).view(m[1], -1)
        return _Mean(get(m[0]), get(m[1]), get(m[2]).view(torch.float64), m[3])

    blocks = [
        _Block(get(sr), mean(sm), get(tr), mean(tm), stop - first)
        for (sr, sm), (tr, tm), first, stop in zip(s_plan, t_plan, firsts[:-1], firsts[1:])
    ]
    return _Plan(blocks, n_valid, None if unused_range is None else get(unused_range))


def _take(x: Tensor, rows: Tensor | slice) -> Tensor:
    """Rows of x [B, T, V] at flat positions (a slice of a contiguous x is a view, not a copy)."""
    if x.is_contiguous():
        return x.view(-1, x.shape[-1])[rows]
    rows = torch.arange(rows.start, rows.stop, device=x.device) if isinstance(rows, slice) else rows
    return x[rows // x.shape[1], rows % x.shape[1]]


def _chunk_mean(v: Tensor, mean: Tensor | _Mean | None) -> Tensor:
    """[rows, V] -> [n, V]: the mean of each chunk's rows (a small matmul, or slot by slot)."""
    if mean is None:
        return v
    if isinstance(mean, Tensor):
        return mean.to(v.dtype) @ v
    rows, chunks, w, bounds = mean
    w = w.to(v.dtype)[:, None]
    n = bounds[1]
    # mean_c = sum_j w_c v[row_j(c)], w_c = 1 / |c|: slot 0 (each chunk's first row) is gathered,
    # each further slot j is added into the chunks that have a j-th row
    out = v.index_select(0, rows[:n]) * w[:n]
    for lo, hi in zip(bounds[1:-1], bounds[2:]):
        out = out.index_add(0, chunks[lo:hi], v.index_select(0, rows[lo:hi]) * w[lo:hi])
    return out


class _Finite:
    """Whether every teacher logit read so far is finite, kept on the device and read once by
    check(): a bool() per block would make the host wait for the device at every block."""

    def __init__(self, device: torch.device):
        self.ok = torch.ones((), dtype=torch.bool, device=device)

    def add(self, x: Tensor) -> None:
        self.ok &= torch.isfinite(x).all()

    def check(self) -> None:
        if not bool(self.ok):
            raise ValueError(NON_FINITE)


def _teacher_rows(
    t_logits: Tensor, b: _Block, cols: Tensor | None, tau: float, dtype, finite: _Finite
) -> Tensor:
    """The block's teacher logits (only the columns `cols` if given) / tau, checked finite."""
    t = _take(t_logits, b.t_rows)
    t = (t if cols is None else t.index_select(1, cols)).to(dtype)
    finite.add(t.sum())  # a sum keeps NaN and inf, with no mask tensor
    return _scaled(t, tau)


def _teacher_subset(t_logits: Tensor, blocks: list[_Block], k: int, finite: _Finite):
    """The k teacher ids with the largest logit anywhere in the blocks' rows; None = all ids."""
    vt = t_logits.shape[-1]
    if k >= vt:
        return None
    best = torch.full((vt,), float("-inf"), dtype=t_logits.dtype, device=t_logits.device)
    for b in blocks:
        best = torch.maximum(best, _take(t_logits, b.t_rows).amax(0))
    finite.add(best)  # amax keeps NaN and +inf of any column
    return torch.topk(best.float(), k).indices.sort().values


class _BlockSum(torch.autograd.Function):
    """scale * sum over blocks of block_loss(student rows, block, *params), with the gradients of
    every block taken in forward; backward scales them by the incoming gradient, once."""

    @staticmethod
    def forward(ctx, block_loss, plan, scale, dtype, s_logits, *params):
        grads = [torch.zeros_like(p) if need else None
                 for p, need in zip(params, ctx.needs_input_grad[5:])]  # fmt: skip
        s_grad = None  # every row is written below, so the buffer starts empty, not zeroed
        if ctx.needs_input_grad[4]:
            s_grad = torch.empty_like(s_logits, memory_format=torch.contiguous_format)
            s_grad = s_grad.view(-1, s_logits.shape[-1])
        total = torch.zeros((), dtype=dtype, device=s_logits.device)
        for b in plan.blocks:
            leaves = [_take(s_logits, b.s_rows).detach().to(dtype).requires_grad_()]
            leaves += [p.detach().requires_grad_() for p in params]
            with torch.enable_grad():
                loss = block_loss(leaves[0], b, *leaves[1:]) * scale
                block_grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            total += loss.detach()
            if s_grad is not None:
                s_grad[b.s_rows] = block_grads[0].to(s_grad.dtype)
            for g, block_g in zip(grads, block_grads[1:]):
                if g is not None and block_g is not None:
                    g += block_g
        if s_grad is not None:
            if plan.s_unused is not None:  # positions outside every valid chunk
                s_grad.index_fill_(0, plan.s_unused, 0)
            s_grad = s_grad.view(s_logits.shape)
        ctx.grads = [s_grad, *grads]
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None  # hand the buffers over: no copy of [N, V]
        if grads is None:
            raise RuntimeError("a losses.py loss backpropagates once: compute it again")
        if bool(grad_out != 1):  # one sync per backward; it saves a pass over [N, V] when 1
            grads = [g if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]
        return None, None, None, None, *grads


def _block_sum(
    block_loss: Callable,
    plan: _Plan,
    scale: float,
    s_logits: Tensor,
    *params,
    finite: _Finite | None = None,
) -> Tensor:
    dtype = _compute_dtype(s_logits)
    if not plan.blocks:  # no valid chunk: an exact 0 whose gradient is zeros
        return s_logits[..., :0].sum().to(dtype)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (s_logits, *params)):
        total = _BlockSum.apply(block_loss, plan, scale, dtype, s_logits, *params)
    else:
        blocks = plan.blocks
        total = sum(block_loss(_take(s_logits, b.s_rows).to(dtype), b, *params) for b in blocks)
        total = total * scale
    if finite is not None:  # the one read of the teacher's finiteness, after every block
        finite.check()
    return total


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
    device = s_logits.device
    plan = _chunk_blocks(s_chunk, t_chunk, _rows_per_block(vs, device), _rows_per_block(k, device))
    finite = _Finite(t_logits.device)
    subset = _teacher_subset(t_logits, plan.blocks, k, finite) if plan.blocks else None
    rows, cols, w = (x.to(device) for x in _entries(W))
    if subset is not None:  # keep the entries of W that land in the subset, numbered 0..k-1
        col_in_subset = torch.full((vt,), -1, dtype=torch.long, device=cols.device)
        col_in_subset[subset] = torch.arange(k, device=cols.device)
        cols = col_in_subset[cols]
        keep = (cols >= 0).nonzero().squeeze(1)  # one sync (three boolean masks would be three)
        rows, cols, w = rows[keep], cols[keep], w[keep]
    dtype = _compute_dtype(s_logits)

    def block_loss(x: Tensor, b: _Block, w: Tensor) -> Tensor:
        p = torch.softmax(_scaled(x, temperature), -1)
        # q = p_S W[:, subset], summed over the non-zeros of W
        q = torch.zeros(len(p), k, dtype=dtype, device=p.device).index_add(
            1, cols, p.index_select(1, rows) * w
        )
        q = _chunk_mean(q, b.s_mean)
        log_q = (q / q.sum(-1, keepdim=True).clamp_min(Q_FLOOR)).clamp_min(Q_FLOOR).log()
        t = _teacher_rows(t_logits, b, subset, temperature, dtype, finite)
        a = _chunk_mean(torch.log_softmax(t, -1), b.t_mean)
        # KL per chunk = sum_t exp(a_t) (a_t - log q_t)
        return (a.exp() * (a - log_q)).sum()

    scale = temperature**2 / max(plan.n_valid, 1)
    return _block_sum(block_loss, plan, scale, s_logits, w.to(dtype), finite=finite)


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
    device = s_logits.device
    cs, ct = pairs[:, 0].to(device), pairs[:, 1].to(device)
    if len(pairs):  # both checks in one read of the device
        outside = (cs.min() < 0) | (ct.min() < 0) | (cs.max() >= vs) | (ct.max() >= vt)
        twice = (_id_counts(cs, vs).max() > 1) | (_id_counts(ct, vt).max() > 1)
        outside, twice = torch.stack([outside, twice]).tolist()
        if outside:
            raise ValueError(f"common_pairs hold ids outside VS={vs} / VT={vt}: pairs of other "
                             "models?")  # fmt: skip
        if twice:
            raise ValueError("common_pairs must be one-to-one: a student or teacher id appears "
                             "twice")  # fmt: skip
    us, ut = _uncommon(cs, vs), _uncommon(ct, vt)
    k = min(vs - len(cs), vt - len(ct), uld_topk if uld_topk > 0 else vs)
    plan = _chunk_blocks(s_chunk, t_chunk, _rows_per_block(vs, device), _rows_per_block(vt, device))
    finite = _Finite(t_logits.device)
    dtype = _compute_dtype(s_logits)

    def block_loss(x: Tensor, b: _Block) -> Tensor:
        log_ps = _chunk_mean(torch.log_softmax(_scaled(x, temperature), -1), b.s_mean)
        t = _teacher_rows(t_logits, b, None, temperature, dtype, finite)
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

    scale = temperature**2 / max(plan.n_valid, 1)
    return _block_sum(block_loss, plan, scale, s_logits, finite=finite)


def _id_counts(ids: Tensor, vocab: int) -> Tensor:
    """How many times each id of range(vocab) appears in ids (out-of-range ids clamped): a
    bincount would read ids.max() on the host."""
    counts = torch.zeros(vocab, dtype=torch.long, device=ids.device)
    return counts.index_add_(0, ids.clamp(0, vocab - 1), torch.ones_like(ids))


def _top_ids(x: Tensor, ids: Tensor | None, k: int) -> Tensor:
    """Per row, the k ids among `ids` (None: all columns) with the largest x, largest first."""
    if ids is None:
        return torch.topk(x, k).indices
    return ids[torch.topk(x.index_select(1, ids), k).indices]


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
    rows = _rows_per_block(v, s_logits.device)
    plan = _chunk_blocks(chunk, chunk, rows, rows)
    finite = _Finite(t_logits.device)
    subset = _teacher_subset(t_logits, plan.blocks, k, finite) if plan.blocks else None
    dtype = _compute_dtype(s_logits)

    def block_loss(x: Tensor, b: _Block) -> Tensor:
        t = _teacher_rows(t_logits, b, subset, temperature, dtype, finite)
        log_pt = torch.log_softmax(t, -1)
        x = x if subset is None else x.index_select(1, subset)
        log_ps = torch.log_softmax(_scaled(x, temperature), -1)
        # KL(p_T || p_S) = sum_v p_T[v] (log p_T[v] - log p_S[v])
        return (log_pt.exp() * (log_pt - log_ps)).sum()

    scale = temperature**2 / max(plan.n_valid, 1)
    return _block_sum(block_loss, plan, scale, s_logits, finite=finite)


def ce_loss(s_logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy, mean over labelled positions. labels [B, T] are aligned with the
    logits (position p's label is the token p predicts: no shift here); -100 is ignored."""
    if labels.shape != s_logits.shape[:2]:
        raise ValueError(
            f"labels must be [B, T] = {list(s_logits.shape[:2])}; got {list(labels.shape)}"
        )
    chunk = torch.where(labels != -100, torch.arange(labels.shape[1], device=labels.device), -1)
    rows = _rows_per_block(s_logits.shape[-1], s_logits.device)
    plan = _chunk_blocks(chunk, chunk, rows, rows)
    flat_labels = labels.reshape(-1)

    def block_loss(x: Tensor, b: _Block) -> Tensor:
        # CE = -log p_S[label]
        return F.cross_entropy(x, flat_labels[b.s_rows], reduction="sum")

    return _block_sum(block_loss, plan, 1 / max(plan.n_valid, 1), s_logits)


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
