"""The blocked engine: a loss written per chunk (losses.py) summed over a batch in bounded memory.

A loss's terms function takes the student and teacher logits at the positions of some chunks and
returns the SUM of those chunks' losses (losses.pkl_terms and its siblings). Run on a whole batch,
its temporaries are several [positions, vocabulary] float32 tensors: gigabytes at 4,096 positions of
a 128k vocabulary. Here the batch's valid chunks are grouped into blocks of whole chunks, and the
terms run on one block at a time:

- a block holds about `block_elements(device)` logits per side: few on a CPU, to stay in its
  caches; a share of a GPU's memory, so that a call is a few large kernels, not hundreds of small
  ones;
- a block's gradient is taken in the forward pass, while its softmax is at hand (as Liger-Kernel's
  fused losses do), and written into one buffer shaped like the student logits; backward only
  scales that buffer. Extra memory: that buffer + one block's temporaries;
- blocks are planned on the host from one copy of the chunk ids, and their index tensors go to the
  device in two copies (integers, weights); nothing in the loop over blocks reads a device value
  (the teacher's finiteness is kept on the device and read once, at the end). A call waits for the
  device a fixed few times, however many blocks it has (bench/profile_losses.py counts them).

Imports nothing of this repository: losses.py imports it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

BLOCK_ELEMENTS = 1 << 21  # logits per side in a block on CPU: 8 MB in fp32 fits CPU caches
# On a GPU, total memory / this many bytes: a block's ~10 fp32 temporaries of [rows, V] take ~4% of
# it (H200: 147M logits, ~1,150 rows of a 128k vocabulary; 80 GB: ~600 rows)
CUDA_BYTES_PER_BLOCK_ELEMENT = 1024
# A chunk mean with at most this many (chunks x rows) is one small matmul: the fastest for CPU-sized
# blocks; larger ones (GPU-sized blocks) go slot by slot, as a dense [n, rows] matrix would grow
# quadratically with the block
DENSE_MEAN_ELEMENTS = 1024
# A fused head (Head) computes the logits of consecutive blocks together, and keeps their
# gradient, in buffers of this many bytes: each group of blocks passes over the output layer's
# weight [V, H] and its gradient, so fewer, larger groups are faster, at the price of the buffers
HEAD_BUFFER_BYTES = 1 << 27  # 128 MB: ~130 rows of a 128k vocabulary, for z and dL/dz
NON_FINITE = "teacher logits contain NaN or inf: check the teacher's forward pass and its dtype"


def block_elements(device: torch.device) -> int:
    """Logits per side in a block: BLOCK_ELEMENTS on CPU, a share of the memory of a GPU."""
    if device.type == "cuda":
        return cuda_block_elements(torch.cuda.get_device_properties(device).total_memory)
    return BLOCK_ELEMENTS


def cuda_block_elements(total_memory: int) -> int:
    return max(BLOCK_ELEMENTS, total_memory // CUDA_BYTES_PER_BLOCK_ELEMENT)


def rows_per_block(vocab: int, device: torch.device) -> int:
    return max(1, block_elements(device) // max(vocab, 1))


# ----------------------------------------------------------------------------- the plan


@dataclass
class Mean:
    """A block's chunk mean, [rows, V] -> [n, V]; the block's rows come sorted by chunk.

    One row per chunk: nothing to do (`matrix` and `slots` are None). A small block: one matmul
    with `matrix` [n, rows], 1/|c| where row r is in chunk c. A large one, slot by slot: slot j
    holds the j-th row of every chunk that has one, so that no two rows of a slot add into one chunk
    (deterministic on a GPU too) and the work is one pass over the rows. `slots` = (rows in slot
    order, their chunk, their 1/|c|, the bounds of each slot in that order; slot 0 is every chunk's
    first row, in chunk order)."""

    n: int
    matrix: Tensor | None = None
    slots: tuple[Tensor, Tensor, Tensor, list[int]] | None = None

    def on(self, upload: _Upload) -> Mean:
        """This mean with its tensors on the device (they were _Refs into upload)."""
        slots = self.slots and (*(upload.get(x) for x in self.slots[:3]), self.slots[3])
        return Mean(self.n, upload.get(self.matrix), slots)

    def __call__(self, v: Tensor) -> Tensor:
        if self.matrix is not None:
            return self.matrix.to(v.dtype) @ v
        if self.slots is None:
            return v
        rows, chunks, w, bounds = self.slots
        w = w.to(v.dtype)[:, None]
        # mean_c = sum_j w_c v[row_j(c)]: slot 0 is gathered, each further slot added in
        out = v.index_select(0, rows[: self.n]) * w[: self.n]
        for lo, hi in zip(bounds[1:-1], bounds[2:]):
            out = out.index_add(0, chunks[lo:hi], v.index_select(0, rows[lo:hi]) * w[lo:hi])
        return out


class _Finite:
    """Whether every teacher logit read so far is finite, kept on the device and read once by
    check(): a bool() per block would make the host wait for the device at every block."""

    def __init__(self, device: torch.device):
        self.ok, self.read = torch.ones((), dtype=torch.bool, device=device), False

    def add(self, x: Tensor) -> None:
        self.ok &= torch.isfinite(x).all()
        self.read = True

    def check(self) -> None:
        if self.read and not bool(self.ok):  # CE has no teacher: no read of the device
            raise ValueError(NON_FINITE)


@dataclass
class Block:
    s_rows: Tensor | slice  # flat student positions (b * Ts + p) of the block's chunks
    t_rows: Tensor | slice
    s_mean: Mean
    t_mean: Mean


@dataclass
class Plan:
    blocks: list[Block]
    n: int  # valid chunks
    s_unused: Tensor | None  # flat student positions outside every valid chunk (gradient 0)
    finite: _Finite  # whether the teacher logits read so far are finite (read once, at the end)


def plan(
    s: tuple[Tensor, Tensor],
    t: tuple[Tensor, Tensor],
    n: int,
    budgets: tuple[int, int],
    device: torch.device,
    n_student_positions: int,
) -> Plan:
    """Blocks of whole chunks with at most ~budget rows per side (a chunk larger than that gets a
    block of its own). s, t: each side's flat positions in valid chunks and the chunk (0..n-1) of
    each, on the host (losses.find_chunks); budgets: rows per block (student, teacher)."""
    finite = _Finite(device)
    if n == 0:
        return Plan([], 0, None, finite)
    s_side, t_side = _Side(*s, n), _Side(*t, n)
    firsts = [0]  # greedy, as a loop over chunks would: a block takes chunks while both sides fit
    while firsts[-1] < n:
        c = firsts[-1]
        fits_s = bisect.bisect_right(s_side.end, s_side.end[c] + budgets[0]) - 1
        fits_t = bisect.bisect_right(t_side.end, t_side.end[c] + budgets[1]) - 1
        firsts.append(max(c + 1, min(fits_s, fits_t)))
    upload = _Upload()
    spans = list(zip(firsts[:-1], firsts[1:]))
    halves = [(s_side.block(a, b, upload), t_side.block(a, b, upload)) for a, b in spans]
    unused = torch.ones(n_student_positions, dtype=torch.bool)
    unused[s[0]] = False
    unused_ref = upload.add(unused.nonzero().squeeze(1)) if bool(unused.any()) else None
    upload.send(device)
    blocks = [
        Block(upload.get(s_rows), upload.get(t_rows), s_mean.on(upload), t_mean.on(upload))
        for (s_rows, s_mean), (t_rows, t_mean) in halves
    ]
    return Plan(blocks, n, upload.get(unused_ref), finite)


class _Side:
    """One side's rows in valid chunks, sorted by chunk, and how to cut them into blocks."""

    def __init__(self, rows: Tensor, chunk: Tensor, n: int):
        order = torch.argsort(chunk, stable=True)
        self.rows, self.chunk = rows[order], chunk[order]
        count = torch.bincount(chunk, minlength=n)
        self.end = [0, *torch.cumsum(count, 0).tolist()]  # chunk c's rows: end[c]..end[c + 1]
        self.weight = (1 / count.double())[self.chunk]  # 1/|c| of each row

    def block(self, first: int, stop: int, upload: _Upload) -> tuple:
        """(rows, mean) of chunks first..stop-1, holding _Refs into upload."""
        a, b, n = self.end[first], self.end[stop], stop - first
        rows, chunk, weight = self.rows[a:b], self.chunk[a:b] - first, self.weight[a:b]
        if bool((rows[1:] == rows[:-1] + 1).all()):  # consecutive positions: read as a view
            rows = slice(int(rows[0]), int(rows[0]) + b - a)
        else:
            rows = upload.add(rows)
        if b - a == n:  # one row per chunk
            return rows, Mean(n)
        if n * (b - a) <= DENSE_MEAN_ELEMENTS:  # [n, rows]: 1/|c| where row r is in chunk c
            matrix = torch.zeros(n, b - a, dtype=torch.float64)
            matrix[chunk, torch.arange(b - a)] = weight
            return rows, Mean(n, matrix=upload.add(matrix))
        # slot-major order: by rank within the chunk, then chunk
        rank = torch.arange(a, b) - torch.tensor(self.end[first:stop])[chunk]
        order = torch.argsort(rank * n + chunk)
        bounds = [0, *torch.bincount(rank).cumsum(0).tolist()]
        slots = (upload.add(order), upload.add(chunk[order]), upload.add(weight[order]), bounds)
        return rows, Mean(n, slots=slots)


class _Ref(NamedTuple):
    """A host tensor's place in an _Upload: its dtype's copy, [lo, hi), and shape."""

    dtype: torch.dtype
    lo: int
    hi: int
    shape: tuple[int, ...]


class _Upload:
    """Host tensors gathered for two host-to-device copies (integers, float64 weights); each
    tensor comes back as a view of the copy it went into."""

    def __init__(self):
        self.parts: dict[torch.dtype, list[Tensor]] = {torch.int64: [], torch.float64: []}
        self.size = dict.fromkeys(self.parts, 0)
        self.sent: dict[torch.dtype, Tensor] = {}

    def add(self, x: Tensor) -> _Ref:
        lo = self.size[x.dtype]
        self.parts[x.dtype].append(x.flatten())
        self.size[x.dtype] += x.numel()
        return _Ref(x.dtype, lo, lo + x.numel(), tuple(x.shape))

    def send(self, device: torch.device) -> None:
        for dtype, parts in self.parts.items():
            if parts:
                host = torch.cat(parts)
                if device.type == "cuda":  # from pinned memory the copy does not make the host wait
                    host = host.pin_memory()
                self.sent[dtype] = host.to(device, non_blocking=True)

    def get(self, x):
        """The device view of a _Ref; anything else as it is."""
        return self.sent[x.dtype][x.lo : x.hi].view(x.shape) if isinstance(x, _Ref) else x


class Head:
    """The student's logits left unbuilt (train.py --fused-head): hidden [B, T, H] (its last
    layer's output) and the output layer's weight [V, H]; a block's logits are hidden[rows] @
    weight^T, computed when the block runs, in `dtype` (default hidden's: on a GPU, bf16 as under
    autocast). The losses take a Head wherever they take s_logits, and never hold [N, V] logits
    or their gradient: only one block's, and the gradients of hidden and weight."""

    def __init__(self, hidden: Tensor, weight: Tensor, dtype: torch.dtype | None = None):
        if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"a fused head needs hidden [B, T, H] and weight [V, H]; got "
                f"{list(hidden.shape)} and {list(weight.shape)}"
            )
        self.hidden, self.weight = hidden, weight
        self.shape = torch.Size((*hidden.shape[:2], weight.shape[0]))
        self.dtype, self.device = dtype or hidden.dtype, hidden.device

    def dim(self) -> int:
        return 3

    def __len__(self) -> int:
        return len(self.hidden)

    def logits(self, rows: Tensor | slice, weight: Tensor | None = None) -> Tensor:
        """[rows, V]: the logits at flat positions `rows` (weight: the weight in hidden's dtype)."""
        w = self.weight.to(self.dtype) if weight is None else weight
        return take(self.hidden, rows).to(self.dtype) @ w.T

    def zero(self) -> Tensor:
        """An exact 0 whose gradient reaches hidden and weight (as zeros)."""
        return self.hidden[..., :0].sum() + self.weight[:0].sum()


def zero(s_logits: Tensor | Head) -> Tensor:
    """An exact 0 from the student's logits whose gradient is zeros: a loss with no valid chunk."""
    return s_logits.zero() if isinstance(s_logits, Head) else s_logits[..., :0].sum()


def student_rows(s_logits: Tensor | Head, rows: Tensor | slice) -> Tensor:
    """The student's logits at flat positions `rows`: read, or computed from a Head."""
    return s_logits.logits(rows) if isinstance(s_logits, Head) else take(s_logits, rows)


def take(x: Tensor, rows: Tensor | slice) -> Tensor:
    """Rows of x [B, T, ...] at flat positions b * T + p (a slice of a contiguous x is a view)."""
    if x.is_contiguous():
        return x.flatten(0, 1)[rows]
    rows = torch.arange(rows.start, rows.stop, device=x.device) if isinstance(rows, slice) else rows
    return x[rows // x.shape[1], rows % x.shape[1]]


# ----------------------------------------------------------------------------- the sum


def column_max(t_logits: Tensor, plan: Plan) -> Tensor:
    """[VT]: each teacher id's largest logit over the plan's teacher positions (checked finite
    with the rest, by block_sum)."""
    best = torch.full(
        t_logits.shape[-1:], float("-inf"), dtype=t_logits.dtype, device=t_logits.device
    )
    for b in plan.blocks:
        best = torch.maximum(best, take(t_logits, b.t_rows).amax(0))
    plan.finite.add(best)  # amax keeps NaN and +inf of any column
    return best


def block_sum(
    terms: Callable[..., Tensor],
    plan: Plan,
    s_logits: Tensor | Head,
    t_side: Tensor,
    *params: Tensor,
    t_cols: Tensor | None = None,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """scale * the sum over the plan's blocks of terms(z_s, z_t, s_mean, t_mean, *params): z_s the
    block's student logits (read from s_logits, or computed from a Head), z_t its rows of t_side
    (teacher logits [B, Tt, VT], only the columns t_cols if given; or labels [B, T]); floating
    rows in `dtype`, the teacher's checked finite. Gradients reach s_logits (a Head's hidden and
    weight) and params (W's learnable weights)."""
    if not plan.blocks:  # no valid chunk: an exact 0 whose gradient is zeros
        return zero(s_logits).to(dtype)
    head_dtype = s_logits.dtype if isinstance(s_logits, Head) else None
    run = _BlockRun(terms, plan, t_side, t_cols, dtype, head_dtype)
    student = (s_logits.hidden, s_logits.weight) if run.head else (s_logits,)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (*student, *params)):
        total = _BlockSum.apply(run, scale, *student, *params)
    else:
        rows = (student_rows(s_logits, b.s_rows).to(dtype) for b in plan.blocks)
        total = sum(run(b, z_s, params) for b, z_s in zip(plan.blocks, rows)) * scale
    plan.finite.check()  # the one read of the teacher's finiteness, after every block
    return total


@dataclass
class _BlockRun:
    """terms on one block: its rows of both sides, in the compute dtype."""

    terms: Callable[..., Tensor]
    plan: Plan
    t_side: Tensor
    t_cols: Tensor | None
    dtype: torch.dtype
    head_dtype: torch.dtype | None  # a Head's matmul dtype: the student side is (hidden, weight)

    @property
    def head(self) -> bool:
        return self.head_dtype is not None

    def __call__(self, b: Block, z_s: Tensor, params) -> Tensor:
        z_t = take(self.t_side, b.t_rows)
        if z_t.is_floating_point():
            z_t = (z_t if self.t_cols is None else z_t.index_select(1, self.t_cols)).to(self.dtype)
            self.plan.finite.add(z_t.sum())  # a sum keeps NaN and inf, with no mask tensor
        return self.terms(z_s, z_t, b.s_mean, b.t_mean, *params)


def _head_blocks(run: _BlockRun, student, block, s_grad: Tensor | None, needs_w: bool):
    """A Head's blocks. The logits z = h W^T of a group of consecutive blocks are computed at
    once (up to HEAD_BUFFER_BYTES of them), each block's dL/dz goes into the group's buffer, then
    dL/dh = dL/dz W (the group's rows of s_grad) and dL/dW += dL/dz^T h. A group reads the [V, H]
    weight twice and its gradient once: groups of many blocks make few passes over them, while
    the losses' temporaries stay one block's. Returns dL/dW (None if not needed)."""
    head = Head(*(x.detach() for x in student), run.head_dtype)
    weight = head.weight.to(head.dtype)  # once per call, in the matmuls' dtype
    # dL/dW summed in fp32 over the groups (FSDP's gathered weight may be bf16), cast at the end
    w_grad = torch.zeros_like(head.weight, dtype=torch.float32) if needs_w else None
    budget = max(1, HEAD_BUFFER_BYTES // (2 * 4 * weight.shape[0]))  # rows of z and dL/dz
    for group in _groups(run.plan.blocks, budget):
        rows = group[0].s_rows
        if len(group) > 1:
            rows = torch.cat([_index(b.s_rows, weight.device) for b in group])
        h = take(head.hidden, rows).to(head.dtype)
        z = h @ weight.T
        dz, start = torch.empty_like(z), 0
        for b in group:
            n = _count(b.s_rows)
            dz[start : start + n] = block(b, z[start : start + n])
            start += n
        if w_grad is not None and w_grad.dtype == dz.dtype:  # dL/dW += dL/dz^T h, in place
            w_grad.addmm_(dz.T, h)
        elif w_grad is not None:  # bf16 matmuls (GPU): a [V, H] temporary, added in fp32
            w_grad += (dz.T @ h).to(w_grad.dtype)
        if s_grad is not None:  # dL/dh = dL/dz W
            s_grad[rows] = (dz @ weight).to(s_grad.dtype)
    return w_grad if w_grad is None else w_grad.to(head.weight.dtype)


def _groups(blocks: list[Block], budget: int) -> list[list[Block]]:
    """Consecutive blocks, as many as fit `budget` rows together (at least one a group)."""
    groups, rows = [], budget
    for b in blocks:
        n = _count(b.s_rows)
        if rows + n > budget:
            groups.append([])
            rows = 0
        groups[-1].append(b)
        rows += n
    return groups


def _count(rows: Tensor | slice) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else len(rows)


def _index(rows: Tensor | slice, device: torch.device) -> Tensor:
    return torch.arange(rows.start, rows.stop, device=device) if isinstance(rows, slice) else rows


class _BlockSum(torch.autograd.Function):
    """scale * sum over blocks of run(block), with every block's gradients taken in forward;
    backward scales them by the incoming gradient, once. The student side is its logits, or a
    Head's (hidden, weight): then see _head_blocks."""

    @staticmethod
    def forward(ctx, run: _BlockRun, scale: float, *inputs: Tensor) -> Tensor:
        n_student = 2 if run.head else 1
        student, params = inputs[:n_student], inputs[n_student:]
        needs = ctx.needs_input_grad[2:]
        grads = [
            torch.zeros_like(p) if need else None for p, need in zip(params, needs[n_student:])
        ]
        s_in = student[0]  # logits [B, T, V], or hidden [B, T, H]
        s_grad = None  # every row is written below, so the buffer starts empty, not zeroed
        if needs[0]:
            s_grad = torch.empty_like(s_in, memory_format=torch.contiguous_format)
            s_grad = s_grad.view(-1, s_in.shape[-1])
        total = torch.zeros((), dtype=run.dtype, device=s_in.device)

        def block(b: Block, z_s: Tensor) -> Tensor:
            """The block's loss added to total, its params' gradients to grads; returns dL/dz."""
            nonlocal total
            z_s = z_s.detach().to(run.dtype).requires_grad_()
            leaves = [p.detach().requires_grad_() for p in params]
            with torch.enable_grad():
                loss = run(b, z_s, leaves) * scale
                block_grads = torch.autograd.grad(loss, [z_s, *leaves], allow_unused=True)
            total += loss.detach()
            for g, block_g in zip(grads, block_grads[1:]):
                if g is not None and block_g is not None:
                    g += block_g
            return block_grads[0]

        w_grad = None
        if run.head:
            w_grad = _head_blocks(run, student, block, s_grad, needs[1])
        else:
            for b in run.plan.blocks:
                dz = block(b, take(s_in, b.s_rows))
                if s_grad is not None:
                    s_grad[b.s_rows] = dz.to(s_grad.dtype)
        if s_grad is not None:
            if run.plan.s_unused is not None:  # positions outside every valid chunk
                s_grad.index_fill_(0, run.plan.s_unused, 0)
            s_grad = s_grad.view(s_in.shape)
        ctx.grads = [s_grad, *([w_grad] if run.head else []), *grads]
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None  # hand the buffers over: no copy of [N, V]
        if grads is None:
            raise RuntimeError("a losses.py loss backpropagates once: compute it again")
        if bool(grad_out != 1):  # one sync per backward; it saves a pass over [N, V] when 1
            grads = [g if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]
        return None, None, *grads
