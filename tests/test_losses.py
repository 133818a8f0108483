"""losses.py against naive float64 references written from METHOD.md section 5.

The references loop over chunks, positions and vocabulary ids in Python, so they share nothing
with losses.py but the equations. Vocabularies are small to keep the whole file fast.
"""

import importlib.util
import math
import os

import pytest
import torch

import blocked
import losses
from build_projection import hkl_pairs

torch.set_num_threads(1)
pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled"),
]

# (student positions, teacher positions) of each chunk, per sequence: 1:1, 1:3, 3:1, 2:2, chunks
# with only one side (invalid), -1 positions (BOS, padding) and sequences of different lengths.
LAYOUT = [
    [(1, 1), (1, 3), (3, 1), (2, 2), (1, 0), (0, 2), (1, 1)],
    [(2, 2), (1, 1), (1, 3)],
    [(1, 2), (0, 1), (3, 3), (2, 1)],
]
VS, VT = 13, 11


def chunk_ids(layout):
    """s_chunk [B, Ts], t_chunk [B, Tt]; chunk ids skip numbers; student BOS and padding are -1."""
    s_rows, t_rows = [], []
    for chunks in layout:
        s, t = [-1], []
        for c, (ns, nt) in enumerate(chunks):
            s += [2 * c + 1] * ns
            t += [2 * c + 1] * nt
        s_rows.append(s)
        t_rows.append(t)
    ts, tt = max(map(len, s_rows)), max(map(len, t_rows))
    pad = lambda rows, n: torch.tensor([r + [-1] * (n - len(r)) for r in rows])  # noqa: E731
    return pad(s_rows, ts), pad(t_rows, tt)


def random_batch(seed, vs=VS, vt=VT, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s_chunk, t_chunk = chunk_ids(LAYOUT)
    B, ts, tt = len(LAYOUT), s_chunk.shape[1], t_chunk.shape[1]
    s = (scale * torch.randn(B, ts, vs, generator=g, dtype=torch.float64)).to(dtype)
    t = (scale * torch.randn(B, tt, vt, generator=g, dtype=torch.float64)).to(dtype)
    return s.requires_grad_(), t, s_chunk, t_chunk


def random_W(seed, vs=VS, vt=VT, empty_rows=(4,)):
    """Sparse W: 1-5 non-zeros per row, rows summing to 1 (one empty), every column reachable."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.zeros(vs, vt, dtype=torch.float64)
    for s in range(vs):
        if s in empty_rows:
            continue
        cols = torch.randperm(vt, generator=g)[: 1 + s % 4]
        dense[s, cols] = torch.rand(len(cols), generator=g, dtype=torch.float64) + 0.1
    for t in range(vt):
        if dense[:, t].sum() == 0:
            dense[(3 * t + 1) % vs if (3 * t + 1) % vs not in empty_rows else 0, t] = 0.5
    dense = dense / dense.sum(1, keepdim=True).clamp_min(1e-30)
    return dense.float().to_sparse_coo().coalesce()


def valid_chunks(s_chunk, t_chunk):
    """[(b, student positions, teacher positions)] for chunks with positions on both sides."""
    out = []
    for b in range(s_chunk.shape[0]):
        for c in sorted(set(s_chunk[b].tolist()) - {-1}):
            sp = [p for p in range(s_chunk.shape[1]) if s_chunk[b, p] == c]
            tp = [p for p in range(t_chunk.shape[1]) if t_chunk[b, p] == c]
            if sp and tp:
                out.append((b, sp, tp))
    return out


def log_softmax(z):
    m = max(float(v.detach()) for v in z)  # for stability only: any constant gives the same
    lse = m + torch.log(sum(torch.exp(v - m) for v in z))
    return torch.stack([v - lse for v in z])


def teacher_subset(t, positions, k):
    """Top-k teacher ids by their largest logit over the given (b, p) positions."""
    vt = t.shape[-1]
    if k <= 0 or k >= vt:
        return list(range(vt))
    best = [max(float(t[b, p, v]) for b, p in positions) for v in range(vt)]
    return sorted(sorted(range(vt), key=lambda v: -best[v])[:k])


def naive_pkl(s, t, s_chunk, t_chunk, W_dense, k, tau, floor="clamp"):
    s, t, W_dense = s.double(), t.double(), W_dense.double()
    chunks = valid_chunks(s_chunk, t_chunk)
    subset = teacher_subset(t, [(b, p) for b, _, tp in chunks for p in tp], k)
    total = 0
    for b, sp, tp in chunks:
        # student: mean over the chunk's positions of p_S W[:, subset]
        q = [0] * len(subset)
        for p in sp:
            prob = torch.exp(log_softmax(s[b, p] / tau))
            for j, tid in enumerate(subset):
                q[j] = q[j] + sum(prob[v] * W_dense[v, tid] for v in range(s.shape[-1])) / len(sp)
        z = sum(q)
        # teacher: mean over the chunk's positions of log-softmax restricted to the subset
        a = [0] * len(subset)
        for p in tp:
            lt = log_softmax(t[b, p, subset] / tau)
            a = [a[j] + lt[j] / len(tp) for j in range(len(subset))]
        if floor == "add":  # log(q / (sum q + 1e-10) + 1e-10)
            log_q = [torch.log(q[j] / (z + 1e-10) + 1e-10) for j in range(len(subset))]
        else:  # every q here is far above the floor: the plain log
            log_q = [torch.log(q[j] / z) for j in range(len(subset))]
        total = total + sum(torch.exp(a[j]) * (a[j] - log_q[j]) for j in range(len(subset)))
    return total / len(chunks) * tau**2


def naive_gold(s, t, s_chunk, t_chunk, pairs, uld_topk, tau, uld_weight=1.0):
    s, t = s.double(), t.double()
    chunks = valid_chunks(s_chunk, t_chunk)
    cs, ct = {int(a) for a, _ in pairs}, {int(b) for _, b in pairs}
    us = [v for v in range(s.shape[-1]) if v not in cs]
    ut = [v for v in range(t.shape[-1]) if v not in ct]
    k = min(len(us), len(ut), uld_topk if uld_topk > 0 else len(us))
    total = 0
    for b, sp, tp in chunks:
        log_ps = sum(log_softmax(s[b, p] / tau) for p in sp) / len(sp)
        log_pt = sum(log_softmax(t[b, p] / tau) for p in tp) / len(tp)
        for si, ti in pairs.tolist():
            total = total + torch.exp(log_pt[ti]) * (log_pt[ti] - log_ps[si])
        by_value = lambda p: float(p.detach())  # noqa: E731
        top_s = sorted((torch.exp(log_ps[v]) for v in us), key=by_value, reverse=True)[:k]
        top_t = sorted((torch.exp(log_pt[v]) for v in ut), key=by_value, reverse=True)[:k]
        total = total + uld_weight * sum(abs(a - c) for a, c in zip(top_s, top_t, strict=True))
    return total / len(chunks) * tau**2


def naive_kl(s, t, mask, k, tau):
    s, t = s.double(), t.double()
    positions = [(b, p) for b in range(mask.shape[0]) for p in range(mask.shape[1]) if mask[b, p]]
    subset = teacher_subset(t, positions, k)
    total = 0
    for b, p in positions:
        lt, ls = log_softmax(t[b, p, subset] / tau), log_softmax(s[b, p, subset] / tau)
        total = total + sum(torch.exp(lt[j]) * (lt[j] - ls[j]) for j in range(len(subset)))
    return total / len(positions) * tau**2


def grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


@pytest.fixture(
    params=[None, "slots", 1, 40],
    ids=["one-block", "one-block-slot-means", "block-per-chunk", "few-chunks-per-block"],
)
def block_elements(request, monkeypatch):
    """Run a test with everything in one block (chunk means as a matmul, or slot by slot as for
    GPU-sized blocks), one chunk per block, and blocks of a few chunks."""
    if request.param == "slots":
        monkeypatch.setattr(blocked, "DENSE_MEAN_ELEMENTS", 0)
    elif request.param is not None:
        monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", request.param)


# ----------------------------------------------------------------------------- naive references


@pytest.mark.parametrize("k,tau", [(5, 1.0), (0, 2.0)])
def test_pkl_matches_naive_reference_and_gradients(block_elements, k, tau):
    s, t, s_chunk, t_chunk = random_batch(0)
    W = random_W(0)
    fast = losses.pkl_loss(s, t, s_chunk, t_chunk, W, vocab_topk=k, temperature=tau)
    naive = naive_pkl(s, t, s_chunk, t_chunk, W.to_dense(), k, tau)
    naive_grad = grads(naive, s)[0]
    assert fast.dtype == torch.float64 and fast.shape == ()
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads(fast, s)[0], naive_grad, rtol=0, atol=1e-10)
    s32 = s.detach().float().requires_grad_()
    fast32 = losses.pkl_loss(s32, t.float(), s_chunk, t_chunk, W, vocab_topk=k, temperature=tau)
    assert abs(fast32.item() - naive.item()) < 1e-5
    assert (grads(fast32, s32)[0].double() - naive_grad).abs().max() < 1e-5


@pytest.mark.parametrize("k,tau", [(5, 1.0), (0, 2.0)])
def test_pkl_add_floor_matches_naive_reference_and_gradients(block_elements, k, tau):
    s, t, s_chunk, t_chunk = random_batch(3)
    W = random_W(3)
    for loss in (losses.pkl_loss, losses.pkl_loss_plain):
        fast = loss(s, t, s_chunk, t_chunk, W, vocab_topk=k, temperature=tau, floor="add")
        naive = naive_pkl(s, t, s_chunk, t_chunk, W.to_dense(), k, tau, floor="add")
        torch.testing.assert_close(fast, naive, rtol=0, atol=1e-10)
        torch.testing.assert_close(grads(fast, s)[0], grads(naive, s)[0], rtol=0, atol=1e-10)


def test_pkl_floor_decides_the_gradient_below_it():
    """One chunk, one position; student token 0 alone reaches teacher id 0, which holds half the
    teacher's mass, and the student gives it p ~ e^-40 / 2 (q_0 ~ 2e-18 < 1e-10). clamp: log q_0 is
    the constant log 1e-10, and z_S[0] gets only softmax coupling (~p_0); add: d/dz_0 of
    -0.5 log(q_0 / (sum q + eps) + eps) ~ -0.5 q_0 / (q_0 + eps), a damped pull upwards."""
    vt = 2  # the student has 3 ids
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64).to_sparse_coo()
    s = torch.tensor([[[0.0, 0.0, 0.0], [-40.0, 0.0, 0.0]]], dtype=torch.float64)
    t = torch.zeros(1, 2, vt, dtype=torch.float64)
    chunk = torch.tensor([[-1, 0]])  # the logits at position 1 are chunk 0's (position 0: none)
    got = {}
    for floor in losses.Q_FLOORS:
        z = s.clone().requires_grad_()
        loss = losses.pkl_loss(z, t, chunk, chunk, W, vocab_topk=0, floor=floor)
        got[floor] = (loss, grads(loss, z)[0][0, 1, 0])
    p0 = math.exp(-40) / (math.exp(-40) + 2)  # the student's p of token 0, = q_0 (W row 0)
    # clamp: 0.5 (log 0.5 - log 1e-10) + 0.5 (log 0.5 - log(1 - q_0))
    assert got["clamp"][0].item() == pytest.approx(
        0.5 * math.log(0.5 / 1e-10) + 0.5 * math.log(0.5), rel=1e-9
    )
    assert abs(got["clamp"][1].item()) < 1e-15  # only the coupling through the softmax
    expected = -0.5 * p0 / (p0 + 1e-10) * (1 - p0)  # the damped pull, to first order
    assert got["add"][1].item() == pytest.approx(expected, rel=1e-3)
    assert got["add"][1].item() < -1e-9


def test_pkl_accepts_csr_W_with_the_same_result():
    s, t, s_chunk, t_chunk = random_batch(1)
    W = random_W(1)
    coo = losses.pkl_loss(s, t, s_chunk, t_chunk, W, vocab_topk=6)
    csr = losses.pkl_loss(s, t, s_chunk, t_chunk, W.to_sparse_csr(), vocab_topk=6)
    torch.testing.assert_close(coo, csr)


@pytest.mark.parametrize("uld_topk,tau", [(4, 1.0), (0, 1.5)])
def test_gold_matches_naive_reference_and_gradients(block_elements, uld_topk, tau):
    s, t, s_chunk, t_chunk = random_batch(2)
    pairs = torch.tensor([[0, 3], [2, 0], [5, 5], [7, 1], [12, 10]])
    fast = losses.gold_loss(s, t, s_chunk, t_chunk, pairs, uld_topk=uld_topk, temperature=tau)
    naive = naive_gold(s, t, s_chunk, t_chunk, pairs, uld_topk, tau)
    naive_grad = grads(naive, s)[0]
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads(fast, s)[0], naive_grad, rtol=0, atol=1e-10)
    s32 = s.detach().float().requires_grad_()
    fast32 = losses.gold_loss(
        s32, t.float(), s_chunk, t_chunk, pairs, uld_topk=uld_topk, temperature=tau
    )
    assert abs(fast32.item() - naive.item()) < 1e-5
    assert (grads(fast32, s32)[0].double() - naive_grad).abs().max() < 1e-5


def test_uld_matches_naive_reference_and_gradients(block_elements):
    s, t, s_chunk, t_chunk = random_batch(3)
    no_pairs = torch.zeros(0, 2, dtype=torch.long)
    for uld_topk in (0, 6):
        fast = losses.uld_loss(s, t, s_chunk, t_chunk, uld_topk=uld_topk, temperature=1.3)
        naive = naive_gold(s, t, s_chunk, t_chunk, no_pairs, uld_topk, 1.3)
        torch.testing.assert_close(fast, naive, rtol=0, atol=1e-10)
        torch.testing.assert_close(grads(fast, s)[0], grads(naive, s)[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("k,tau", [(4, 1.0), (0, 2.0)])
def test_kl_matches_naive_reference_and_gradients(block_elements, k, tau):
    g = torch.Generator().manual_seed(4)
    s = (2 * torch.randn(3, 5, VS, generator=g, dtype=torch.float64)).requires_grad_()
    t = 2 * torch.randn(3, 5, VS, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) > 0.3
    fast = losses.kl_loss(s, t, mask, vocab_topk=k, temperature=tau)
    naive = naive_kl(s, t, mask, k, tau)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads(fast, s)[0], grads(naive, s)[0], rtol=0, atol=1e-10)


def test_ce_matches_cross_entropy_and_ignores_minus_100(block_elements):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, 6, VS, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, VS, (3, 6), generator=g)
    labels[0, :2] = labels[2, 5] = -100
    naive = -sum(
        log_softmax(s[b, p])[labels[b, p]] for b in range(3) for p in range(6) if labels[b, p] >= 0
    ) / int((labels >= 0).sum())
    fast = losses.ce_loss(s, labels)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads(fast, s)[0], grads(naive, s)[0], rtol=0, atol=1e-10)


def test_learnable_projection_gradients_match_naive(block_elements):
    s, t, s_chunk, t_chunk = random_batch(6)
    proj = losses.LearnableProjection(random_W(6)).double()
    fast = losses.pkl_loss(s, t, s_chunk, t_chunk, proj, vocab_topk=6)
    W_dense = torch.zeros(VS, VT, dtype=torch.float64).index_put(
        (torch.arange(VS)[:, None].expand_as(proj.index), proj.index),
        proj.weights(),
        accumulate=True,
    )
    naive = naive_pkl(s, t, s_chunk, t_chunk, W_dense, 6, 1.0)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-10)
    fast_grads, naive_grads = grads(fast, s, proj.logits), grads(naive, s, proj.logits)
    for a, b in zip(fast_grads, naive_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def plain_losses(s, t, s_chunk, t_chunk, seed):
    """The whole-batch references of all_losses' calls, with the same inputs."""
    W, pairs = random_W(seed), torch.tensor([[0, 3], [5, 5], [12, 10]])
    same_tok = s.detach().flip(-1)
    no_pairs = torch.zeros(0, 2, dtype=torch.long)
    return {
        "pkl": lambda proj: losses.pkl_loss_plain(s, t, s_chunk, t_chunk, W, vocab_topk=5),
        "pkl_learnable": lambda proj: losses.pkl_loss_plain(
            s, t, s_chunk, t_chunk, proj, vocab_topk=5
        ),
        "gold": lambda proj: losses.gold_loss_plain(s, t, s_chunk, t_chunk, pairs, uld_topk=4),
        "uld": lambda proj: losses.gold_loss_plain(s, t, s_chunk, t_chunk, no_pairs, uld_topk=0),
        "kl": lambda proj: losses.kl_loss_plain(s, same_tok, s_chunk >= 0, vocab_topk=4),
        "ce": lambda proj: losses.ce_loss_plain(s, torch.where(s_chunk >= 0, s_chunk % VS, -100)),
    }


@pytest.mark.parametrize("layout", ["short", "long"])
def test_plain_losses_equal_the_blocked_ones(block_elements, layout):
    """The whole-batch references and the blocked losses train.py uses: one set of equations
    (losses.*_terms), two ways to sum it; values and gradients (the learned W's too) agree."""
    s, t, s_chunk, t_chunk = random_batch(25) if layout == "short" else long_batch(25, True)
    blocked_calls, proj = all_losses(s, t, s_chunk, t_chunk, 25)
    for name, plain in plain_losses(s, t, s_chunk, t_chunk, 25).items():
        inputs = (s, proj.logits) if name == "pkl_learnable" else (s,)
        expected, got = plain(proj), blocked_calls[name]()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=name)
        for a, b in zip(grads(got, *inputs), grads(expected, *inputs), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("k,tau", [(5, 1.0), (0, 2.0)])
def test_plain_losses_match_naive_references(k, tau):
    s, t, s_chunk, t_chunk = random_batch(26)
    W, pairs = random_W(26), torch.tensor([[0, 3], [2, 0], [7, 1]])
    cases = [
        (
            losses.pkl_loss_plain(s, t, s_chunk, t_chunk, W, vocab_topk=k, temperature=tau),
            naive_pkl(s, t, s_chunk, t_chunk, W.to_dense(), k, tau),
        ),
        (
            losses.gold_loss_plain(s, t, s_chunk, t_chunk, pairs, uld_topk=k, temperature=tau),
            naive_gold(s, t, s_chunk, t_chunk, pairs, k, tau),
        ),
        (
            losses.kl_loss_plain(
                s, s.detach().flip(-1), s_chunk >= 0, vocab_topk=k, temperature=tau
            ),
            naive_kl(s, s.detach().flip(-1), s_chunk >= 0, k, tau),
        ),
    ]
    for plain, naive in cases:
        torch.testing.assert_close(plain, naive, rtol=0, atol=1e-10)
        torch.testing.assert_close(grads(plain, s)[0], grads(naive, s)[0], rtol=0, atol=1e-10)


def test_plain_losses_with_no_valid_chunk_are_a_zero_that_backpropagates():
    s, t, s_chunk, t_chunk = random_batch(27)
    none = torch.full_like(s_chunk, -1)
    for loss in (
        losses.pkl_loss_plain(s, t, none, t_chunk, random_W(27)),
        losses.gold_loss_plain(s, t, none, t_chunk, torch.tensor([[0, 3]])),
        losses.kl_loss_plain(s, s.detach(), none >= 0),
        losses.ce_loss_plain(s, torch.full_like(s_chunk, -100)),
    ):
        assert loss.item() == 0
        assert torch.equal(grads(loss, s)[0], torch.zeros_like(s))


def test_no_grad_gives_the_same_values():
    s, t, s_chunk, t_chunk = random_batch(17)
    W, pairs = random_W(17), torch.tensor([[0, 3], [5, 5]])
    calls = [
        lambda: losses.pkl_loss(s, t, s_chunk, t_chunk, W, vocab_topk=5),
        lambda: losses.gold_loss(s, t, s_chunk, t_chunk, pairs, uld_topk=4),
        lambda: losses.kl_loss(s, s.detach().flip(-1), s_chunk >= 0, vocab_topk=4),
        lambda: losses.ce_loss(s, s_chunk.clamp(0, VS - 1)),
    ]
    for call in calls:
        with_grad = call()
        with torch.no_grad():
            without = call()
        assert with_grad.requires_grad and not without.requires_grad
        torch.testing.assert_close(with_grad.detach(), without, rtol=1e-14, atol=0)


def test_pkl_stays_finite_when_a_subset_id_is_unreachable():
    # teacher id 0 is in the subset with most of the mass, but no student token maps to it
    s, t, s_chunk, t_chunk = random_batch(18)
    dense = random_W(18).to_dense()
    dense[:, 0] = 0
    W = (dense / dense.sum(1, keepdim=True).clamp_min(1e-30)).to_sparse_coo()
    t = t.clone()
    t[..., 0] += 5
    loss = losses.pkl_loss(s, t, s_chunk, t_chunk, W, vocab_topk=4)
    assert torch.isfinite(loss) and loss > 1  # -log(Q_FLOOR) ~ 23 per unit of teacher mass
    assert torch.isfinite(grads(loss, s)[0]).all()


def test_chunks_out_of_position_order_and_non_contiguous_logits_give_the_same_loss():
    s, t, s_chunk, t_chunk = random_batch(7)
    W = random_W(7)
    reference = losses.pkl_loss(s, t, s_chunk, t_chunk, W, vocab_topk=5)
    # the same chunks, renumbered so that ids run backwards along the sequence
    flip = lambda c: torch.where(c >= 0, 100 - c, -1)  # noqa: E731
    assert torch.allclose(
        reference, losses.pkl_loss(s, t, flip(s_chunk), flip(t_chunk), W, vocab_topk=5)
    )
    # logits read through a non-contiguous view (a slice of a wider tensor)
    wide = torch.cat([s.detach(), torch.zeros(*s.shape[:2], 4, dtype=s.dtype)], -1)[..., :VS]
    assert not wide.is_contiguous()
    assert torch.allclose(reference, losses.pkl_loss(wide, t, s_chunk, t_chunk, W, vocab_topk=5))
    wide = wide.requires_grad_()
    torch.testing.assert_close(
        grads(losses.pkl_loss(wide, t, flip(s_chunk), flip(t_chunk), W, vocab_topk=5), wide)[0],
        grads(reference, s)[0],
    )


# ----------------------------------------------------------------------------- blocks and syncs

# chunks of up to 7 positions per side (chunk means over several slots), gaps between them
LONG_LAYOUT = [
    [(1, 1), (5, 2), (1, 0), (2, 6), (7, 3), (1, 1)],
    [(3, 3), (0, 2), (4, 1), (1, 1)],
]


def long_batch(seed, interleave=False):
    g = torch.Generator().manual_seed(seed)
    s_chunk, t_chunk = chunk_ids(LONG_LAYOUT)
    if interleave:  # two chunks' positions interleaved: a chunk's rows are not consecutive
        s_chunk[0, [2, 8]] = s_chunk[0, [8, 2]].clone()
    s = 2 * torch.randn(2, s_chunk.shape[1], VS, generator=g, dtype=torch.float64)
    t = 2 * torch.randn(2, t_chunk.shape[1], VT, generator=g, dtype=torch.float64)
    return s.requires_grad_(), t, s_chunk, t_chunk


@pytest.mark.parametrize("interleave", [False, True])
def test_long_chunks_match_naive_references(block_elements, interleave):
    s, t, s_chunk, t_chunk = long_batch(20, interleave)
    W, pairs = random_W(20), torch.tensor([[0, 3], [2, 0], [7, 1]])
    pkl = losses.pkl_loss(s, t, s_chunk, t_chunk, W, vocab_topk=6, temperature=1.3)
    naive = naive_pkl(s, t, s_chunk, t_chunk, W.to_dense(), 6, 1.3)
    torch.testing.assert_close(pkl, naive, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads(pkl, s)[0], grads(naive, s)[0], rtol=0, atol=1e-10)
    gold = losses.gold_loss(s, t, s_chunk, t_chunk, pairs, uld_topk=5)
    naive = naive_gold(s, t, s_chunk, t_chunk, pairs, 5, 1.0)
    torch.testing.assert_close(gold, naive, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads(gold, s)[0], grads(naive, s)[0], rtol=0, atol=1e-10)


def test_block_size_is_chosen_per_device():
    assert blocked.block_elements(torch.device("cpu")) == blocked.BLOCK_ELEMENTS
    h200 = blocked.cuda_block_elements(141 * 2**30)
    assert h200 // 128256 > 1000  # a GPU block holds ~1,000 positions of a 128k vocabulary
    assert blocked.cuda_block_elements(2**20) == blocked.BLOCK_ELEMENTS  # never below CPU's


def all_losses(s, t, s_chunk, t_chunk, seed):
    W, pairs = random_W(seed), torch.tensor([[0, 3], [5, 5], [12, 10]])
    proj = losses.LearnableProjection(W).double()
    same_tok = s.detach().flip(-1)
    return {
        "pkl": lambda: losses.pkl_loss(s, t, s_chunk, t_chunk, W, vocab_topk=5),
        "pkl_learnable": lambda: losses.pkl_loss(s, t, s_chunk, t_chunk, proj, vocab_topk=5),
        "gold": lambda: losses.gold_loss(s, t, s_chunk, t_chunk, pairs, uld_topk=4),
        "uld": lambda: losses.uld_loss(s, t, s_chunk, t_chunk, uld_topk=0),
        "kl": lambda: losses.kl_loss(s, same_tok, s_chunk >= 0, vocab_topk=4),
        "ce": lambda: losses.ce_loss(s, torch.where(s_chunk >= 0, s_chunk % VS, -100)),
    }, proj


@pytest.mark.parametrize("layout", ["short", "long"])
def test_gpu_sized_blocks_give_the_results_of_cpu_sized_ones(monkeypatch, layout):
    # a GPU's block holds every position here: the all-at-once path, run on CPU
    s, t, s_chunk, t_chunk = random_batch(21) if layout == "short" else long_batch(21, True)
    results = {}
    for setting in ("cpu-one-chunk", "cpu-few-chunks", "gpu"):
        if setting == "gpu":  # at real sizes, a GPU block's chunk means go slot by slot
            elements = blocked.cuda_block_elements(141 * 2**30)
            monkeypatch.setattr(blocked, "block_elements", lambda device, e=elements: e)
            monkeypatch.setattr(blocked, "DENSE_MEAN_ELEMENTS", 0)
        else:
            monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 1 if setting == "cpu-one-chunk" else 40)
        calls, proj = all_losses(s, t, s_chunk, t_chunk, 21)
        for name, call in calls.items():
            loss = call()
            inputs = (s, proj.logits) if name == "pkl_learnable" else (s,)
            results[setting, name] = (loss, *grads(loss, *inputs))
    for name in calls:
        for setting in ("cpu-few-chunks", "gpu"):
            for a, b in zip(results[setting, name], results["cpu-one-chunk", name]):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_syncs_per_call_do_not_grow_with_the_number_of_blocks(monkeypatch):
    """The host-device syncs of a call (counted as on a GPU, see bench/profile_losses.py) are a
    fixed few, whether the call has one block or one block per chunk."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "profile_losses.py")
    spec = importlib.util.spec_from_file_location("profile_losses", path)
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    s, t, s_chunk, t_chunk = long_batch(22)
    counts = {}
    for elements in (None, 1):
        if elements is not None:
            monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", elements)
        calls, _ = all_losses(s, t, s_chunk, t_chunk, 22)
        for name, call in calls.items():
            counter = profile.SyncCounter()
            with counter:
                grads(call(), s)
            counts[elements, name] = sum(counter.syncs.values())
    for name in calls:
        assert counts[None, name] == counts[1, name] <= 4, (name, counts[1, name])


def test_uncommon_ids_are_the_ids_not_in_common():
    g = torch.Generator().manual_seed(23)
    for vocab, n in [(50, 0), (50, 17), (50, 50), (1, 1)]:
        common = torch.randperm(vocab, generator=g)[:n]
        keep = torch.ones(vocab, dtype=torch.bool)
        keep[common] = False
        expected = None if n == 0 else keep.nonzero().squeeze(1)
        got = losses._uncommon(common, vocab)
        assert (got is None) if expected is None else torch.equal(got, expected)


def test_learnable_projection_entries_are_the_masked_slots():
    proj = losses.LearnableProjection(random_W(24), slots=3)
    s, t, w = proj.entries()
    rows = torch.arange(proj.shape[0])[:, None].expand_as(proj.index)
    assert torch.equal(s, rows[proj.mask]) and torch.equal(t, proj.index[proj.mask])
    assert torch.equal(w, proj.weights()[proj.mask])
    (g,) = grads(w.sum() + (w**2).sum(), proj.logits)
    (expected,) = grads((lambda x: x.sum() + (x**2).sum())(proj.weights()[proj.mask]), proj.logits)
    torch.testing.assert_close(g, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- equivalences, dtypes


@pytest.mark.parametrize("k", [5, 0])
def test_pkl_with_identity_W_equals_same_tokenizer_kl(k):
    # one position per chunk (1:1), so P-KL's chunk means are the positions themselves
    g = torch.Generator().manual_seed(8)
    s = (2 * torch.randn(2, 6, VS, generator=g)).requires_grad_()
    t = 2 * torch.randn(2, 6, VS, generator=g)
    mask = torch.rand(2, 6, generator=g) > 0.25
    chunk = torch.where(mask, torch.arange(6), -1)
    identity = torch.eye(VS).to_sparse_coo()
    pkl = losses.pkl_loss(s, t, chunk, chunk, identity, vocab_topk=k, temperature=1.7)
    kl = losses.kl_loss(s, t, mask, vocab_topk=k, temperature=1.7)
    torch.testing.assert_close(pkl, kl, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads(pkl, s)[0], grads(kl, s)[0], rtol=1e-5, atol=1e-7)


def test_bf16_inputs_are_computed_in_float32_and_match_fp32():
    s, t, s_chunk, t_chunk = random_batch(9, vs=300, vt=260, dtype=torch.float32)
    W = random_W(9, vs=300, vt=260)
    pairs = torch.stack([torch.arange(0, 200, 2), torch.arange(0, 250, 2)[:100]], 1)
    same_tok_teacher = s.detach() + torch.randn(s.shape, generator=torch.Generator().manual_seed(9))
    calls = {  # name: (loss, teacher logits)
        "pkl": (lambda s, t: losses.pkl_loss(s, t, s_chunk, t_chunk, W, vocab_topk=0), t),
        "pkl-top64": (lambda s, t: losses.pkl_loss(s, t, s_chunk, t_chunk, W, vocab_topk=64), t),
        "gold": (lambda s, t: losses.gold_loss(s, t, s_chunk, t_chunk, pairs, uld_topk=32), t),
        "uld": (lambda s, t: losses.uld_loss(s, t, s_chunk, t_chunk), t),
        "kl": (lambda s, t: losses.kl_loss(s, t, s_chunk >= 0), same_tok_teacher),
        "ce": (lambda s, t: losses.ce_loss(s, s_chunk.clamp_min(0)), t),
    }
    for name, (call, t) in calls.items():
        s16 = s.detach().bfloat16().requires_grad_()
        fp32, bf16 = call(s, t), call(s16, t.bfloat16())
        assert bf16.dtype == torch.float32, name
        # the same bf16-rounded numbers computed in float32 give the same loss ...
        s_rounded = s.detach().bfloat16().float().requires_grad_()
        rounded = call(s_rounded, t.bfloat16().float())
        assert abs(bf16.item() - rounded.item()) < 1e-5, name
        g16, g_rounded = grads(bf16, s16)[0], grads(rounded, s_rounded)[0]
        assert g16.dtype == torch.bfloat16
        assert (g16.float() - g_rounded).abs().max() <= 2**-8 * g_rounded.abs().max(), name
        # ... which is within bf16 rounding of the fp32 loss (ids at the edge of the top-K
        # subset can swap under rounding: a different subset, not a tolerance)
        if name != "pkl-top64":
            assert abs(bf16.item() - fp32.item()) < 1e-2 * abs(fp32.item()), name


# ----------------------------------------------------------------------------- the objective


def combined(*args, **kwargs):
    """objective's loss (its scale is checked on its own below)."""
    return losses.objective(*args, **kwargs)[0]


def test_dynamic_scaling_value_is_twice_ce():
    ce, kd1, kd2 = torch.tensor(2.5), torch.tensor(0.7), torch.tensor(3.0)
    total = combined(ce, [kd1, kd2], [0.8, 0.2])
    assert torch.allclose(total, 2 * ce)


def test_dynamic_scaling_scales_the_kd_gradient_by_ce_over_kd_exactly():
    x = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1.1, 0.4], dtype=torch.float64, requires_grad=True)
    ce, kd = (x**2).sum() + 1, (y.exp()).sum()
    total = combined(ce, [kd], [0.5])
    gx, gy = grads(total, x, y)
    assert torch.equal(gx, 2 * x.detach())  # CE's own gradient, unscaled
    scale = ce.detach() / (0.5 * kd.detach())
    torch.testing.assert_close(gy, scale * 0.5 * y.detach().exp(), rtol=1e-15, atol=0)


def test_dynamic_scaling_scales_the_gradient_of_real_losses():
    # the block losses hand back gradients computed in forward: they must still be scaled
    s, t, s_chunk, t_chunk = random_batch(16)
    W, labels = random_W(16), s_chunk.clamp(0, VS - 1)
    ce_grad = grads(losses.ce_loss(s, labels), s)[0]
    kd = losses.pkl_loss(s, t, s_chunk, t_chunk, W)
    kd_grad = grads(kd, s)[0]
    ce, kd = losses.ce_loss(s, labels), losses.pkl_loss(s, t, s_chunk, t_chunk, W)
    total = combined(ce, [kd], [0.7])
    expected = ce_grad + (ce.detach() / (0.7 * kd.detach())) * 0.7 * kd_grad
    torch.testing.assert_close(grads(total, s)[0], expected, rtol=1e-12, atol=1e-14)


def test_dynamic_scale_is_one_at_zero_kd_and_ce_over_abs_kd_below_it():
    ce = torch.tensor(2.0)
    kd = torch.tensor(0.0, requires_grad=True)
    total = combined(ce, [kd], [1.0])
    assert torch.equal(total, ce + kd.detach()) and grads(total, kd)[0] == 1.0
    # a negative KD (GOLD's, H-KL's unrenormalized chunk means) keeps its gradient's sign: the
    # scale is CE / |KD| = 2 / 0.5, positive
    kd = torch.tensor(-0.5, requires_grad=True)
    total = combined(ce, [kd], [1.0])
    assert grads(total, kd)[0] == pytest.approx(4.0)
    assert total.item() == pytest.approx(4.0 * -0.5 + 2.0)
    assert combined(ce, [], []) == ce


def test_the_dynamic_scale_is_capped_at_max_scale():
    # KD -> 0 (a student that nearly matches its teacher): CE / KD = 2 / 0.004 = 500, capped at 10
    ce = torch.tensor(2.0)
    for value, expected in ((0.004, 10.0), (-0.004, 10.0), (0.5, 4.0)):
        kd = torch.tensor(value, requires_grad=True)
        loss, scale = losses.objective(ce, [kd], [1.0], max_scale=10.0)
        assert scale.item() == pytest.approx(expected)
        assert grads(loss, kd)[0] == pytest.approx(expected)
    _, scale = losses.objective(ce, [torch.tensor(0.004)], [1.0])  # no cap: the paper's formula
    assert scale.item() == pytest.approx(500.0)


def test_the_scale_returned_is_ce_over_kd_or_the_static_kd_weight():
    ce, kd1, kd2 = torch.tensor(2.0), torch.tensor(1.0), torch.tensor(4.0)
    _, scale = losses.objective(ce, [kd1, kd2], [0.75, 0.25])
    assert scale.item() == pytest.approx(2.0 / (0.75 * 1.0 + 0.25 * 4.0))
    _, scale = losses.objective(ce, [kd1], [1.0], dynamic=False, kd_weight=0.3)
    assert scale.item() == pytest.approx(0.3)


def test_shares_make_the_micro_batches_sum_the_step_mean():
    # two micro-batches: CE over 3 and 1 labelled tokens, KD over 1 and 3 valid chunks; the step's
    # loss under static weights is the mean over all 4 tokens plus the mean over all 4 chunks
    ce_sums, kd_sums = (
        (torch.tensor(6.0), torch.tensor(1.0)),
        (torch.tensor(2.0), torch.tensor(9.0)),
    )
    ce_n, kd_n = (3, 1), (1, 3)
    total = sum(
        combined(
            ce_sums[i] / ce_n[i],
            [kd_sums[i] / kd_n[i]],
            [1.0],
            shares=[ce_n[i] / 4, kd_n[i] / 4],
            dynamic=False,
        )
        for i in range(2)
    )
    assert total.item() == pytest.approx((6.0 + 1.0) / 4 + (2.0 + 9.0) / 4)
    # dynamic: each micro-batch's scale comes from its own means, CE / KD
    x = torch.tensor(2.0, requires_grad=True)
    loss, scale = losses.objective(torch.tensor(3.0), [x], [1.0], shares=[0.5, 0.25])
    (grad,) = torch.autograd.grad(loss, x)
    assert scale.item() == pytest.approx(1.5) and grad.item() == pytest.approx(1.5 * 0.25)
    assert loss.item() == pytest.approx(1.5 * 0.5 + 3.0 * 0.5)


def test_static_weights():
    ce, kd1, kd2 = torch.tensor(2.0), torch.tensor(1.0), torch.tensor(4.0)
    total = combined(ce, [kd1, kd2], [0.8, 0.2], dynamic=False, kd_weight=0.5, ce_weight=3.0)
    assert total.item() == pytest.approx(0.5 * (0.8 + 0.8) + 3.0 * 2.0)


# ----------------------------------------------------------------------------- bad input


def raises_one_line(match, call):
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


def test_bad_inputs_raise_one_line_value_errors():
    s, t, s_chunk, t_chunk = random_batch(10)
    W, pairs = random_W(10), torch.tensor([[0, 0]])
    raises_one_line(
        "W is", lambda: losses.pkl_loss(s, t, s_chunk, t_chunk, random_W(10, vs=VS + 1))
    )
    raises_one_line("sparse", lambda: losses.pkl_loss(s, t, s_chunk, t_chunk, W.to_dense()))
    raises_one_line("s_chunk", lambda: losses.pkl_loss(s, t, s_chunk[:, 1:], t_chunk, W))
    raises_one_line("t_chunk", lambda: losses.gold_loss(s, t, s_chunk, t_chunk.float(), pairs))
    raises_one_line("logits", lambda: losses.uld_loss(s[:2], t, s_chunk[:2], t_chunk))
    bad_pairs = {"outside VS": [[VS, 0]], "one-to-one": [[0, 1], [2, 1]]}
    for match, p in bad_pairs.items():
        raises_one_line(
            match, lambda p=p: losses.gold_loss(s, t, s_chunk, t_chunk, torch.tensor(p))
        )
    raises_one_line("mask", lambda: losses.kl_loss(s, s.detach(), s_chunk[:, 1:] >= 0))
    raises_one_line("labels", lambda: losses.ce_loss(s, s_chunk[:, 1:]))
    raises_one_line("temperature", lambda: losses.uld_loss(s, t, s_chunk, t_chunk, temperature=0))
    raises_one_line("weights", lambda: combined(torch.tensor(1.0), [torch.tensor(1.0)], []))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_teacher_logits_raise(bad):
    s, t, s_chunk, t_chunk = random_batch(11)
    t = t.clone()
    t[0, 2, 3] = bad  # a position inside a valid chunk
    calls = [
        lambda: losses.pkl_loss(s, t, s_chunk, t_chunk, random_W(11), vocab_topk=VT),
        lambda: losses.pkl_loss(s, t, s_chunk, t_chunk, random_W(11), vocab_topk=0),
        lambda: losses.gold_loss(s, t, s_chunk, t_chunk, torch.tensor([[0, 0]])),
        lambda: losses.uld_loss(s, t, s_chunk, t_chunk),
        lambda: losses.kl_loss(s[:, :4, :VT], t[:, :4], s_chunk[:, :4] >= 0, vocab_topk=0),
    ]
    for call in calls:
        raises_one_line("teacher logits", call)
    if bad != float("-inf"):  # NaN and +inf outside the top-K subset are caught too
        W = random_W(11)
        raises_one_line(
            "teacher logits", lambda: losses.pkl_loss(s, t, s_chunk, t_chunk, W, vocab_topk=3)
        )


def test_empty_batch_returns_zero_that_backpropagates():
    s, t, s_chunk, t_chunk = random_batch(12)
    only_student = torch.where(t_chunk >= 0, 1000, -1)  # no chunk id shared by both sides
    W = random_W(12)
    proj = losses.LearnableProjection(W).double()
    results = [
        losses.pkl_loss(s, t, s_chunk, only_student, W),
        losses.pkl_loss(s, t, s_chunk, only_student, proj),
        losses.gold_loss(s, t, s_chunk, only_student, torch.tensor([[0, 0]])),
        losses.uld_loss(s, t, s_chunk, only_student),
        losses.kl_loss(s, s.detach(), torch.zeros_like(s_chunk, dtype=torch.bool)),
        losses.ce_loss(s, torch.full_like(s_chunk, -100)),
    ]
    for loss in results:
        assert loss.item() == 0.0
        (g,) = grads(loss, s)
        assert torch.equal(g, torch.zeros_like(s))
    total = combined(results[-1], results[:1], [1.0])
    assert total.item() == 0.0 and not torch.isnan(grads(total, s)[0]).any()


def test_second_backward_raises_a_clear_error():
    s, t, s_chunk, t_chunk = random_batch(13)
    loss = losses.uld_loss(s, t, s_chunk, t_chunk)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


# ----------------------------------------------------------------------------- learnable W


def test_learnable_projection_starts_exactly_at_W():
    W = random_W(14)
    for source in (W, W.to_sparse_csr()):
        proj = losses.LearnableProjection(source)
        torch.testing.assert_close(proj().to_dense(), W.to_dense(), rtol=0, atol=1e-7)
        assert proj.weights()[4].sum() == 0  # an empty row stays empty
        assert proj.shape == W.shape


def test_learnable_projection_keeps_the_top_4_of_a_longer_row():
    W = torch.tensor([[0.05, 0.3, 0.12, 0.2, 0.25, 0.08]]).to_sparse_coo()
    proj = losses.LearnableProjection(W)
    assert sorted(proj.index[0].tolist()) == [1, 2, 3, 4]
    kept = torch.tensor([0.3, 0.12, 0.2, 0.25])
    torch.testing.assert_close(proj().to_dense()[0, 1:5], kept / kept.sum())


def test_learnable_projection_gets_finite_gradients():
    s, t, s_chunk, t_chunk = random_batch(15, dtype=torch.float32)
    proj = losses.LearnableProjection(random_W(15))
    losses.pkl_loss(s, t, s_chunk, t_chunk, proj, vocab_topk=6).backward()
    g = proj.logits.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert g[4].abs().sum() == 0  # the empty row has nothing to learn


# ----------------------------------------------------------------------------- H-KL pairs


def sparse(entries, vs=6, vt=6):
    rows, cols, vals = zip(*entries, strict=True)
    return torch.sparse_coo_tensor(
        torch.tensor([rows, cols]), torch.tensor(vals), (vs, vt)
    ).coalesce()


def test_hkl_pairs_add_each_rows_top_teacher_token_above_threshold():
    W = sparse(
        [
            (0, 0, 1.0),
            (1, 2, 0.7),
            (1, 3, 0.3),
            (2, 4, 0.55),
            (2, 5, 0.45),
            (3, 1, 0.6),
            (3, 5, 0.4),
        ]
    )
    pairs = hkl_pairs(W, torch.tensor([[0, 0]]), threshold=0.6)
    assert pairs.tolist() == [[0, 0], [1, 2], [3, 1]]  # row 2's top weight 0.55 < 0.6


def test_hkl_pairs_conflicts_go_to_the_highest_weight_then_lowest_student():
    W = sparse(
        [
            (1, 2, 0.7),
            (1, 3, 0.3),
            (2, 2, 0.9),
            (2, 4, 0.1),
            (3, 5, 0.8),
            (3, 1, 0.2),
            (4, 5, 0.8),
            (4, 0, 0.2),
        ]
    )
    pairs = hkl_pairs(W, torch.zeros(0, 2, dtype=torch.long))
    assert pairs.tolist() == [[2, 2], [3, 5]]


def test_hkl_pairs_exact_pairs_keep_priority_and_result_is_one_to_one():
    # row 2 points at teacher 0 (exact pair 0-0), row 0 (exact) is not duplicated
    W = sparse(
        [(0, 0, 1.0), (1, 1, 1.0), (2, 0, 0.9009), (2, 3, 0.0991), (5, 4, 0.95), (5, 1, 0.05)]
    )
    exact = torch.tensor([[0, 0], [1, 1]])
    for w in (W, W.to_sparse_csr(), losses.LearnableProjection(W)):
        pairs = hkl_pairs(w, exact)
        assert pairs.tolist() == [[0, 0], [1, 1], [5, 4]]
        assert len(set(pairs[:, 0].tolist())) == len(set(pairs[:, 1].tolist())) == len(pairs)


# ----------------------------------------------------------------------------- Proposition 1


def prop1_gold_common_gradient(W, exact_pairs, teacher_common_ids, seed=0):
    """d L_common / d z_S for one chunk of one position, a teacher with its mass on common ids."""
    vs, vt = W.shape
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(1, 1, vs, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 1, vt, generator=g, dtype=torch.float64)
    t[0, 0, teacher_common_ids] += 20.0
    one = torch.zeros(1, 1, dtype=torch.long)
    loss = losses.gold_loss(s, t, one, one, exact_pairs, uld_weight=0.0)
    (grad,) = grads(loss, s)
    p_s, p_t = torch.softmax(s.detach()[0, 0], -1), torch.softmax(t[0, 0], -1)
    mass_on_common = p_t[exact_pairs[:, 1]].sum()  # M_C(T)
    uncommon = torch.ones(vs, dtype=torch.bool)
    uncommon[exact_pairs[:, 0]] = False
    return grad[0, 0], p_s, mass_on_common, uncommon


def prop1_pkl_gradient(W, teacher_id, student_id, seed=0):
    vs, vt = W.shape
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(1, 1, vs, generator=g, requires_grad=True)
    t = torch.randn(1, 1, vt, generator=g)
    t[0, 0, teacher_id] += 20.0  # the teacher puts its mass on "2"
    one = torch.zeros(1, 1, dtype=torch.long)
    (grad,) = grads(losses.pkl_loss(s, t, one, one, W), s)
    return grad[0, 0, student_id]


def check_gold_common_suppresses_uncommon(W, exact_pairs, teacher_common_ids, student_201):
    grad, p_s, mass, uncommon = prop1_gold_common_gradient(W, exact_pairs, teacher_common_ids)
    assert mass > 0.99
    assert (grad[uncommon] >= 0).all()
    torch.testing.assert_close(grad[uncommon], p_s[uncommon] * mass, rtol=1e-9, atol=1e-15)
    assert grad[student_201] > 0  # "201" is pushed down whatever the text says


@pytest.fixture
def hand_made_W():
    """Student "2","0","1","a","b","201"; teacher "2","0","1","a","b","c"; "201" -> "2","0","1"."""
    W = sparse(
        [
            (0, 0, 1.0),
            (1, 1, 1.0),
            (2, 2, 1.0),
            (3, 3, 1.0),
            (4, 4, 1.0),
            (5, 0, 0.9009),
            (5, 1, 0.0901),
            (5, 2, 0.0090),
        ]
    )
    return W, torch.tensor([[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]])


def test_gold_common_kl_pushes_down_uncommon_logits_hand_made(hand_made_W):
    W, exact_pairs = hand_made_W
    check_gold_common_suppresses_uncommon(W, exact_pairs, [0], student_201=5)


def test_pkl_teacher_mass_on_2_pulls_up_201_hand_made(hand_made_W):
    W, _ = hand_made_W
    assert prop1_pkl_gradient(W, teacher_id=0, student_id=5) < 0


@pytest.fixture(scope="module")
def llama_qwen(W_llama_qwen):
    """(W, exact_pairs) of the real Llama-3.2 -> Qwen3 projection (conftest builds it once)."""
    return W_llama_qwen["W"], W_llama_qwen["exact_pairs"]


LLAMA_201, QWEN_2, QWEN_0, QWEN_1 = 679, 17, 15, 16


def test_201_maps_to_three_qwen_digits(llama_qwen):
    W, exact_pairs = llama_qwen
    row = W.index_select(0, torch.tensor([LLAMA_201])).coalesce()
    weights = dict(zip(row.indices()[1].tolist(), row.values().tolist(), strict=True))
    assert weights.keys() == {QWEN_2, QWEN_0, QWEN_1}
    assert math.isclose(weights[QWEN_2], 0.9009, abs_tol=1e-4)
    assert LLAMA_201 not in exact_pairs[:, 0].tolist()


def test_gold_common_kl_suppresses_every_uncommon_llama_logit_real_W(llama_qwen):
    W, exact_pairs = llama_qwen
    check_gold_common_suppresses_uncommon(W, exact_pairs, [QWEN_2, QWEN_0], student_201=LLAMA_201)


def test_pkl_teacher_mass_on_2_pulls_up_llama_201_real_W(llama_qwen):
    W, _ = llama_qwen
    assert prop1_pkl_gradient(W, teacher_id=QWEN_2, student_id=LLAMA_201) < 0


def test_hkl_leaves_llama_201_uncommon_because_qwen_2_is_an_exact_pair_real_W(llama_qwen):
    # why the audit picks P-KL for Qwen: widening cannot pair "201", its top teacher id is taken
    W, exact_pairs = llama_qwen
    pairs = hkl_pairs(W, exact_pairs)
    assert len(pairs) > len(exact_pairs)
    assert LLAMA_201 not in pairs[:, 0].tolist()
    assert [pairs[:, 0].unique().numel(), pairs[:, 1].unique().numel()] == [len(pairs)] * 2


# ----------------------------------------------------------------------------- the fused head


def head_losses(s, t, s_chunk, t_chunk, vs, same_tok):
    """Every loss on student logits s: a [B, T, vs] tensor or a blocked.Head giving them."""
    W = random_W(31, vs=vs, empty_rows=(4, *range(VS, vs)))  # padded ids: empty rows
    pairs = torch.tensor([[0, 3], [5, 5], [12, 10]])
    labels = torch.where(s_chunk >= 0, s_chunk % VS, -100)  # never a padded id
    return {
        "pkl": lambda: losses.pkl_loss(s, t, s_chunk, t_chunk, W, vocab_topk=5),
        "gold": lambda: losses.gold_loss(s, t, s_chunk, t_chunk, pairs, uld_topk=4),
        "uld": lambda: losses.uld_loss(s, t, s_chunk, t_chunk, uld_topk=0),
        "kl": lambda: losses.kl_loss(s, same_tok, s_chunk >= 0, vocab_topk=4),
        "ce": lambda: losses.ce_loss(s, labels),
    }


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("vs", [VS, VS + 3], ids=["vocab", "padded-vocab"])
@pytest.mark.parametrize("group", [1, None], ids=["a-block-a-group", "one-group"])
def test_fused_head_gives_the_values_and_gradients_of_the_logits(
    block_elements, tied, vs, group, monkeypatch
):
    if group:  # each block's logits computed on their own (else all blocks' at once)
        monkeypatch.setattr(blocked, "HEAD_BUFFER_BYTES", group)
    # the student's last hidden states h [B, T, H] and output layer E [vs, H]: logits h E^T
    g = torch.Generator().manual_seed(30)
    _, t, s_chunk, t_chunk = random_batch(30, dtype=torch.float32)
    E = torch.randn(vs, 8, generator=g).requires_grad_()
    if tied:  # h comes from E too (an input embedding): E's gradient adds both paths
        ids = torch.randint(0, vs, s_chunk.shape, generator=g)
        hidden = lambda: torch.tanh(E[ids] * 1.5)  # noqa: E731
    else:
        h0 = torch.randn(*s_chunk.shape, 8, generator=g).requires_grad_()
        hidden = lambda: h0  # noqa: E731
    same_tok = 2 * torch.randn(*s_chunk.shape, vs, generator=g)
    results = {}
    for fused in (False, True):
        h = hidden()
        s = blocked.Head(h, E) if fused else h @ E.T
        for name, call in head_losses(s, t, s_chunk, t_chunk, vs, same_tok).items():
            loss = call()
            leaves = (E,) if tied else (h0, E)
            results[fused, name] = (loss, *torch.autograd.grad(loss, leaves, retain_graph=True))
    for name in ("pkl", "gold", "uld", "kl", "ce"):
        for a, b in zip(results[True, name], results[False, name], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert results[True, name][0] != 0 and results[True, name][-1].abs().sum() > 0


def test_fused_head_never_builds_the_logits_or_their_gradient(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Widest(TorchDispatchMode):  # the most rows of any [rows, VS] tensor an op makes
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, tuple | list) else [out]:
                if not isinstance(x, torch.Tensor) or x.dim() < 2:
                    continue
                weight_t = x.shape == (H, VS)  # the output layer's weight, transposed
                if isinstance(x, torch.Tensor) and x.shape[-1] == VS and not weight_t:
                    Widest.rows = max(Widest.rows, x.shape[:-1].numel())
            return out

    monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 40)  # a few chunks a block
    monkeypatch.setattr(blocked, "HEAD_BUFFER_BYTES", 2 * 4 * VS * 6)  # 6 rows a group
    _, t, s_chunk, t_chunk = random_batch(32, dtype=torch.float32)
    H = 3
    h = torch.randn(*s_chunk.shape, H).requires_grad_()
    E = torch.randn(VS, H).requires_grad_()
    with Widest():
        loss = losses.pkl_loss(blocked.Head(h, E), t, s_chunk, t_chunk, random_W(32), vocab_topk=5)
        loss.backward()
    assert 0 < Widest.rows <= 6 < s_chunk.numel()  # never the batch's [B * T, VS]
    assert h.grad.shape == h.shape and E.grad.shape == E.shape


def test_a_fused_head_with_mismatched_shapes_is_one_line():
    with pytest.raises(ValueError, match=r"hidden \[B, T, H\] and weight \[V, H\]"):
        blocked.Head(torch.zeros(2, 3, 8), torch.zeros(5, 7))
