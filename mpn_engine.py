"""The plastic-layer recurrence of SPEC §1.1, as one function over a whole trial sequence.

Axis order: trials x time x units, (B, T, N). W is (N_post, N_pre), M is (B, N_post, N_pre).

At every step t, with presynaptic activity x_t (already computed by the embedding):
    a_t = (W ⊙ (1 + M_{t-1})) x_t + b [+ W_rec h_{t-1}]     (mp_type "mult")
    a_t = (W + M_{t-1}) x_t + b [+ W_rec h_{t-1}]            (mp_type "add")
    h_t = tanh(a_t)  (then silenced units are zeroed)
    M_t = clip(λ M_{t-1} + η post_t x_tᵀ, lo, hi)            post_t = h_t ("hebb_assoc") or 1/√N_post ("hebb_pre")
with M_{-1} = 0. Synapses in a freeze mask keep M = 0.

`plastic_forward(..., engine="reference")` is the plain per-step loop: the obviously-correct
implementation every faster engine is tested against. engine="fast" is the same model, run
chunk by chunk in place with a hand-derived backward (section "Fast engine" below).
engine="cpp" runs the compiled CPU kernel of mpn_cpp.py (one fused pass over M per step,
built on first use) and hands every call it does not handle, or every call when the kernel
cannot be built, to "fast". engine="fused" (mpn_fused.py) is meant for CUDA: each time step
is one pure function that torch.compile fuses into a few kernels. engine="auto" takes "cpp" whenever `fast_unsupported` finds
nothing against it, and the reference loop otherwise.

Cost floor (2-core Xeon, measured with a 1 GB tensor copy: ~28 GB/s read+write when the
machine is idle, 7-15 GB/s while shared). At the paper size (N = 300, B = 128) one step must
at least read and write M once if M lives in DRAM: 2·B·N²·4 B = 92 MB, i.e. 3.3 ms per step,
0.33 s per 100-step forward, and ~3.5x that (forward, recompute, reverse pass over M and
dL/dM) ≈ 1.2 s for forward+backward. The fast engine keeps each chunk's M in cache for the
whole sequence, so its forward is bounded by in-cache passes instead (~4 passes/step over
M-sized blocks); its backward additionally writes and re-reads the M history once (2 · 4.6 GB
per batch ≈ 0.33 s of DRAM time) and makes ~12 in-cache passes per step. See
benchmarks/bench_engine.py for measured numbers.
"""
import math
import queue
from concurrent.futures import ThreadPoolExecutor

import torch

import mpn_cpp
import mpn_fused  # engine "fused"; it imports this module back for the shared helpers

ENGINES = ("reference", "fast", "cpp", "fused", "auto")


def _post_term(h, m_update, n_post):
    """Postsynaptic factor of the Hebbian update: h itself, or a constant 1/√N_post."""
    if m_update == "hebb_assoc":
        return h
    if m_update == "hebb_pre":
        return torch.full_like(h, 1.0 / math.sqrt(n_post))
    raise ValueError(f"unknown m_update {m_update!r}; use 'hebb_assoc' or 'hebb_pre'")


def _check_m_init(m_init, W_rec, grad=False):
    """m_init continues a sequence from a given M: forward only (the fast engines' backward
    starts every trial at M = 0) and without W_rec (h_{-1} is not carried over)."""
    if m_init is not None and (grad or W_rec is not None):
        raise ValueError("m_init continues a sequence forward only, without W_rec")


def plastic_forward_reference(x, W, b, eta, lam, *, mp_type="mult", m_update="hebb_assoc",
                              m_bounds=(-1.0, 1.0), W_rec=None, hid_mask=None, m_freeze=None,
                              record=None, m_init=None):
    """Plain loop over time. See `plastic_forward` for the arguments."""
    B, T, n_pre = x.shape
    n_post = W.shape[-2]
    _check_m_init(m_init, W_rec)
    M = x.new_zeros(B, n_post, n_pre) if m_init is None else m_init.expand(B, n_post, n_pre)
    h = x.new_zeros(B, n_post)
    keep = None if m_freeze is None else 1.0 - m_freeze
    hs = []
    for t in range(T):
        if record is not None:
            record(t, M)
        x_t = x[:, t]
        if mp_type == "mult":
            W_eff = W * (1.0 + M)
        elif mp_type == "add":
            W_eff = W + M
        else:
            raise ValueError(f"unknown mp_type {mp_type!r}; use 'mult' or 'add'")
        a = torch.einsum("bij,bj->bi", W_eff, x_t) + b
        if W_rec is not None:
            a = a + h @ W_rec.T
        h = torch.tanh(a)
        if hid_mask is not None:
            h = h * hid_mask
        post = _post_term(h, m_update, n_post)
        M = lam * M + eta * post[:, :, None] * x_t[:, None, :]
        if m_bounds is not None:
            M = torch.clamp(M, m_bounds[0], m_bounds[1])
        if keep is not None:
            M = M * keep
        hs.append(h)
    return torch.stack(hs, dim=1), M


# ---------------------------------------------------------------------------------------
# Fast engine: the same equations, reordered for the cache and for memory.
#
# Trials never interact, so the batch is cut into chunks of c trials and each chunk runs its
# whole time loop before the next starts: the chunk's M (c, N_post, N_pre) stays in cache
# for all T steps instead of streaming 46 MB through DRAM at every step, and every update is
# in place into preallocated buffers (mul_ + addcmul_ for λM + η post xᵀ, clamp_, mul_).
# Chunks run in parallel, one per CPU thread, each op single-threaded (OpenMP fork/join per
# small op costs more than it gains, and collapses when the machine is oversubscribed).
# W ⊙ (1 + M) is never built: a_t = (W x_t + b) + (W ⊙ M_{t-1}) x_t, with W x_t for all
# steps in one matmul. The whole sequence is one autograd Function (`_PlasticSequence`): its
# forward keeps no state beyond its inputs; its backward reruns each chunk's forward storing
# that chunk's M_{t-1} history (c·T·N_post·N_pre values, a few MB to ~100 MB), then walks
# back in time with the exact reverse recurrence (see `_backward_chunk`). On CUDA the whole
# batch is one chunk (bmm instead of per-trial mv). Launches on CUDA: ~7 per forward step
# (W⊙M, bmm, add, tanh, λM, addcmul, clamp) and ~18 per reverse step, ~3,200 per training
# step at T = 100. At the paper size each moves 46-92 MB (15-30 µs on an H100/H200), longer
# than its launch, so the step is bandwidth-bound (~190 GB; expected 45-60 ms, measured 70 ms
# forward+backward on an H200); at N = 64 it is launch-bound (~20 ms expected, unmeasured).
# Fusing each step's elementwise chain is the next gain: engine "fused" (mpn_fused.py) does it
# with torch.compile (~15 ms expected, unmeasured); CUDA graphs only help small networks.
# Numbers and reasoning: benchmarks/GPU_NOTES.md; tests/test_cuda.py checks this engine on
# CUDA against the reference loop.
# ---------------------------------------------------------------------------------------
CHUNK_BYTES = 1 << 20  # size of one chunk's M block; ~L2-sized blocks keep the step in cache


def _param_kind(p, n_post, n_pre):
    """'scalar' | 'pre' (1, N_pre) | 'post' (N_post, 1) | 'matrix' (N_post, N_pre) | None."""
    if p.dim() > 2:
        return None
    shape = (1,) * (2 - p.dim()) + tuple(p.shape)
    for kind, want in (("scalar", (1, 1)), ("pre", (1, n_pre)), ("post", (n_post, 1)),
                       ("matrix", (n_post, n_pre))):
        if shape == want:
            return kind
    return None


def fast_unsupported(x, W, b, eta, lam, *, mp_type="mult", m_update="hebb_assoc",
                     m_bounds=(-1.0, 1.0), W_rec=None, hid_mask=None, m_freeze=None):
    """Why the fast engine cannot run this call (one sentence), or None when it can."""
    if x.dim() != 3 or W.dim() not in (2, 3):
        return "x must be (B, T, N_pre) and W (N_post, N_pre) or (B, N_post, N_pre)"
    if x.dtype not in (torch.float32, torch.float64):
        return f"dtype {x.dtype} is not float32/float64"
    if mp_type not in ("mult", "add") or m_update not in ("hebb_assoc", "hebb_pre"):
        return f"unknown mp_type {mp_type!r} or m_update {m_update!r}"
    n_post, n_pre = W.shape[-2:]
    for name, p in (("eta", eta), ("lam", lam)):
        if not torch.is_tensor(p) or _param_kind(p, n_post, n_pre) is None:
            return f"{name} must be a tensor of shape (), (1, N_pre), (N_post, 1) or (N_post, N_pre)"
    for name, m in (("hid_mask", hid_mask), ("m_freeze", m_freeze)):
        if m is not None and m.requires_grad:
            return f"{name} requires grad; the fast engine treats masks as constants"
    tensors = [t for t in (x, W, b, eta, lam, W_rec, hid_mask, m_freeze) if torch.is_tensor(t)]
    if len({t.device for t in tensors}) != 1 or len({t.dtype for t in tensors}) != 1:
        return "all tensors must share one device and dtype"
    return None


class _Layer:
    """The constants of one call, prepared once in the shapes the in-place kernels want."""

    def __init__(self, x, W, b, eta, lam, mp_type, m_update, m_bounds, W_rec, hid_mask, keep):
        self.B, self.T, self.n_pre = x.shape
        self.n_post = W.shape[-2]
        self.W, self.b, self.W_rec = W, b, W_rec
        self.per_trial_W = W.dim() == 3
        self.mult = mp_type == "mult"
        self.assoc = m_update == "hebb_assoc"
        self.bounds = None if m_bounds is None else (float(m_bounds[0]), float(m_bounds[1]))
        self.eta_kind = _param_kind(eta, self.n_post, self.n_pre)
        self.lam_kind = _param_kind(lam, self.n_post, self.n_pre)
        self.eta2 = eta.detach().reshape((1,) * (2 - eta.dim()) + tuple(eta.shape))
        self.lam2 = lam.detach().reshape((1,) * (2 - lam.dim()) + tuple(lam.shape))
        self.eta_s = float(self.eta2) if self.eta_kind == "scalar" else 1.0
        self.lam_s = float(self.lam2) if self.lam_kind == "scalar" else None
        self.eta_row = self.eta2[0] if self.eta_kind == "pre" else None    # (N_pre,)
        self.eta_col = self.eta2[:, 0] if self.eta_kind == "post" else None  # (N_post,)
        self.hid_mask = None if hid_mask is None else hid_mask.expand(self.B, self.n_post)
        self.keep = keep
        self.keep_binary = keep is None or bool(((keep == 0) | (keep == 1)).all())
        self.post_const = 1.0 / math.sqrt(self.n_post)
        per_trial = self.n_post * self.n_pre * x.element_size()
        # at least one chunk per CPU thread: chunks run in parallel, each op single-threaded
        per_thread = -(-self.B // torch.get_num_threads())
        self.chunk = self.B if x.is_cuda else max(1, min(per_thread, CHUNK_BYTES // per_trial))

    def chunks(self):
        return [slice(s, min(s + self.chunk, self.B)) for s in range(0, self.B, self.chunk)]

    def W_of(self, sl):
        return self.W[sl] if self.per_trial_W else self.W

    def keep_of(self, sl):
        if self.keep is None:
            return None
        return self.keep[sl] if self.keep.dim() == 3 and self.keep.shape[0] == self.B else self.keep

    def drive(self, x_c, W_c):
        """W x_t + b for every step of the chunk at once: (c, T, N_post)."""
        if self.per_trial_W:
            return torch.baddbmm(self.b, x_c, W_c.transpose(1, 2))
        return torch.addmm(self.b, x_c.reshape(-1, self.n_pre), W_c.T).view(
            x_c.shape[0], self.T, self.n_post)

    def post(self, h):
        return h if self.assoc else torch.full_like(h, self.post_const)

    def pre_clip(self, M, post, x_t, out, scratch):
        """out = λ ⊙ M + η ⊙ post x_tᵀ (out may be M; scratch is only used for a matrix η).
        Two passes (scale, then a broadcast addcmul_); baddbmm with k = 1 was slower here."""
        torch.mul(M, self.lam2 if self.lam_s is None else self.lam_s, out=out)
        if self.eta_kind == "matrix":
            torch.mul(post[:, :, None], x_t[:, None, :], out=scratch)
            return out.addcmul_(scratch, self.eta2)
        if self.eta_kind == "post":
            post = post * self.eta_col
        elif self.eta_kind == "pre":
            x_t = x_t * self.eta_row
        return out.addcmul_(post[:, :, None], x_t[:, None, :], value=self.eta_s)

    def strictly_inside(self, M_t, out, scratch):
        """1[lo < M_t < hi] as a float tensor (bool kernels are several times slower here).

        With M_t = clip(M̃_t) ⊙ keep and keep ∈ {0, 1}, this is the clip's gradient mask read
        off the stored M_t, with no recompute of M̃_t; it differs from torch.clamp's
        convention (which passes the gradient at M̃ = lo or hi exactly) only where M̃ lands
        exactly on a bound.
        """
        lo, hi = self.bounds
        if lo == -hi:
            return torch.lt(torch.abs(M_t, out=out), hi, out=out)
        return torch.gt(M_t, lo, out=out).mul_(torch.lt(M_t, hi, out=scratch))

    def update(self, M, post, x_t, out, scratch, keep_c):
        """out = clip(λ ⊙ M + η ⊙ post x_tᵀ) ⊙ keep."""
        self.pre_clip(M, post, x_t, out, scratch)
        if self.bounds is not None:
            out.clamp_(*self.bounds)
        if keep_c is not None:
            out.mul_(keep_c)
        return out


def _bmv(A, v, transpose=False):
    """Batched matrix-vector product A_k v_k (or A_kᵀ v_k). On CPU one mv per trial: batched
    gemv through bmm is ~5x slower than a loop of mv calls for these shapes."""
    if A.is_cuda:
        A = A.transpose(1, 2) if transpose else A
        return torch.bmm(A, v[:, :, None]).squeeze(2)
    out = v.new_empty(A.shape[0], A.shape[2] if transpose else A.shape[1])
    for A_k, v_k, out_k in zip(A.unbind(0), v.unbind(0), out.unbind(0)):
        torch.mv(A_k.T if transpose else A_k, v_k, out=out_k)
    return out


def _map_chunks(fn, chunks, cpu=True):
    """fn over the chunks, spread over torch's CPU threads with one thread per chunk: chunks
    are independent, and per-op OpenMP fork/join on small blocks costs more than it gains
    (badly so on a shared, oversubscribed machine)."""
    def run(sl):  # grad mode is thread-local: the engine's own ops never build a graph
        with torch.no_grad():
            return fn(sl)

    n = torch.get_num_threads()
    if n <= 1 or not cpu:
        return [run(sl) for sl in chunks]
    torch.set_num_threads(1)
    try:
        if len(chunks) == 1:
            return [run(chunks[0])]
        with ThreadPoolExecutor(min(n, len(chunks)), initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            return list(pool.map(run, chunks))
    finally:
        torch.set_num_threads(n)


def _forward_chunk(L, sl, x_c, store=None, record=None, m_init=None):
    """Run trials `sl` through all T steps, M updated in place (from m_init[sl] when given,
    forward only).

    store (T + 1, c, N_post, N_pre), when given, receives M_{t-1} at store[t] (the backward's
    history; store[T] is the final M). record gets a fresh tensor
    per step, exactly as from the reference loop. Returns h (c,T,N_post), g = tanh(a)
    (before the unit mask) or None, and the final M.
    """
    c, T = x_c.shape[0], L.T
    W_c, keep_c = L.W_of(sl), L.keep_of(sl)
    mask_c = None if L.hid_mask is None else L.hid_mask[sl]
    drive = L.drive(x_c, W_c)
    if store is not None:
        store[0].zero_()
        M = store[0]
    elif m_init is not None:
        M = m_init.expand(L.B, L.n_post, L.n_pre)[sl].clone()
    else:
        M = x_c.new_zeros(c, L.n_post, L.n_pre)
    tmp = torch.empty_like(M) if (L.mult or L.eta_kind == "matrix") else None
    hs = x_c.new_empty(c, T, L.n_post)
    gs = x_c.new_empty(c, T, L.n_post) if (store is not None and mask_c is not None) else None
    h = None
    xs, drives, hs_t = x_c.unbind(1), drive.unbind(1), hs.unbind(1)
    gs_t = hs_t if gs is None else gs.unbind(1)
    for t in range(T):
        x_t = xs[t]
        if record is not None:
            record(t, M)
        a = drives[t]
        if t > 0 or m_init is not None:  # M_{-1} = 0 and h_{-1} = 0 at a trial's start
            A = torch.mul(M, W_c, out=tmp) if L.mult else M
            a = a + _bmv(A, x_t)
            if L.W_rec is not None:
                a = torch.addmm(a, h, L.W_rec.T)
        g = torch.tanh(a, out=gs_t[t])
        h = g if mask_c is None else torch.mul(g, mask_c, out=hs_t[t])
        if store is not None:
            M = L.update(M, L.post(h), x_t, store[t + 1], tmp, keep_c)
        else:
            out = torch.empty_like(M) if record is not None else M
            M = L.update(M, L.post(h), x_t, out, tmp, keep_c)
    return hs, (hs if gs is None else gs), M


def _sum_to(grad_full_b, kind):
    """Reduce a (c, N_post, N_pre) per-trial gradient to eta/lam's shape kind (2-D)."""
    if kind == "scalar":
        return grad_full_b.sum().reshape(1, 1)
    if kind == "pre":
        return grad_full_b.sum((0, 1))[None, :]
    if kind == "post":
        return grad_full_b.sum((0, 2))[:, None]
    return grad_full_b.sum(0)


def _backward_chunk(L, sl, x_c, gh_c, gM_c, buf, need):
    """Gradients for trials `sl`; returns dict of per-chunk contributions.

    Reverse recurrence, per step t from T-1 to 0 (G = dL/dM_t on entry):
        G̃ = G ⊙ 1[lo ≤ M̃_t ≤ hi] ⊙ keep          (M̃_t: the pre-clip value, recomputed)
        dλ += G̃ ⊙ M_{t-1},  dη += G̃ ⊙ post_t x_tᵀ  (summed to their shapes)
        dL/dpost_t = (G̃ ⊙ η) x_t,  dL/dx_t += (G̃ ⊙ η)ᵀ post_t
        δ_t = (dL/dh_t + [hebb_assoc] dL/dpost_t + W_recᵀ δ_{t+1}) ⊙ mask ⊙ (1 − tanh²(a_t))
        dL/dM_{t-1} = λ ⊙ G̃ + W ⊙ δ_t x_tᵀ  (mult; add: + δ_t x_tᵀ)
        dW += δ_t x_tᵀ ⊙ (1 + M_{t-1}),  dx_t += (W ⊙ (1 + M_{t-1}))ᵀ δ_t
    The M-free parts (W x_t, b, W_rec h_{t-1}) are summed over all steps at once afterwards.
    """
    c, T = x_c.shape[0], L.T
    W_c, keep_c = L.W_of(sl), L.keep_of(sl)
    mask_c = None if L.hid_mask is None else L.hid_mask[sl]
    store = buf["store"][:, :c]
    tmp, tmp2 = buf["tmp"][:c], buf["tmp2"][:c]
    hs, gs, _ = _forward_chunk(L, sl, x_c, store=store)
    G = None
    if gM_c is not None:
        G = buf["G"][:c].copy_(gM_c)
    acc = buf["acc"][:c].zero_() if (L.mult and need["W"]) else None
    dx = torch.zeros_like(x_c) if need["x"] else None
    deltas = torch.empty_like(hs)
    deta = torch.zeros_like(L.eta2) if need["eta"] else None
    dlam = torch.zeros_like(L.lam2) if need["lam"] else None
    fac = 1.0 - gs * gs  # dh/da = (1 - tanh²) ⊙ mask, for every step at once
    if mask_c is not None:
        fac.mul_(mask_c[:, None, :])
    # per-step views made once (unbind), not by indexing inside the loop
    xs, Ms, hs_t, facs, dels = (x_c.unbind(1), store.unbind(0), hs.unbind(1), fac.unbind(1),
                                deltas.unbind(1))
    ghs = None if gh_c is None else gh_c.unbind(1)
    dxs = None if dx is None else dx.unbind(1)
    carry = None
    for t in reversed(range(T)):
        x_t, M_prev = xs[t], Ms[t]
        post = L.post(hs_t[t])
        dh = ghs[t] if ghs is not None else torch.zeros_like(post)
        if G is not None:
            if L.bounds is not None and L.keep_binary:
                G.mul_(L.strictly_inside(Ms[t + 1], tmp, tmp2))
            elif L.bounds is not None:
                Mt = L.pre_clip(M_prev, post, x_t, tmp, tmp2)
                G.mul_(torch.eq(Mt, torch.clamp(Mt, *L.bounds, out=tmp2), out=tmp2))
            if keep_c is not None:
                G.mul_(keep_c)
            if dlam is not None and t > 0:
                dlam += _sum_to(torch.mul(G, M_prev, out=tmp2), L.lam_kind)
            dpost, dxu = _through_update(L, G, post, x_t, tmp2, deta, need["x"])
            if dpost is not None:
                dh = dh + dpost
            if dxu is not None:
                dxs[t].add_(dxu)
        if carry is not None:
            dh = dh + carry
        delta = torch.mul(dh, facs[t], out=dels[t])
        if t == 0:
            break
        if dx is not None:
            A = torch.mul(M_prev, W_c, out=tmp2) if L.mult else M_prev
            dxs[t].add_(_bmv(A, delta, transpose=True))
        E = torch.mul(delta[:, :, None], x_t[:, None, :], out=tmp)
        if acc is not None:
            acc.addcmul_(E, M_prev)
        if G is None:
            G = buf["G"][:c]
            torch.mul(E, W_c, out=G) if L.mult else G.copy_(E)
        else:
            G.mul_(L.lam2 if L.lam_s is None else L.lam_s)
            G.addcmul_(E, W_c) if L.mult else G.add_(E)
        if L.W_rec is not None:
            carry = delta @ L.W_rec
    return dict(dx=dx, deltas=deltas, hs=hs, acc=acc, deta=deta, dlam=dlam)


def _through_update(L, G, post, x_t, scratch, deta, need_x):
    """Push G̃ = dL/dM̃_t through η ⊙ post x_tᵀ: returns (dL/dpost or None, dL/dx_t or None)
    and accumulates dη into deta in place."""
    want_post = L.assoc
    if L.eta_kind == "matrix":
        if deta is not None:
            deta += torch.mul(post[:, :, None], x_t[:, None, :], out=scratch).mul_(G).sum(0)
        Ge = torch.mul(G, L.eta2, out=scratch)
        dpost = _bmv(Ge, x_t) if want_post else None
        dxu = _bmv(Ge, post, transpose=True) if need_x else None
        return dpost, dxu
    kind = L.eta_kind
    x_s = x_t * L.eta_row if kind == "pre" else x_t
    p_s = post * L.eta_col if kind == "post" else post
    v = u = None
    if want_post or (deta is not None and kind != "pre"):
        v = _bmv(G, x_s)  # G̃ x  (x scaled by η if pre)
    if need_x or (deta is not None and kind == "pre"):
        u = _bmv(G, p_s, transpose=True)  # G̃ᵀ post
    if deta is not None:
        if kind == "scalar":
            deta += (v * post).sum()
        elif kind == "post":
            deta += (v * post).sum(0)[:, None]
        else:
            deta += (u * x_t).sum(0)[None, :]
    dpost = dxu = None
    if want_post:
        dpost = v * L.eta_s if kind != "post" else v * L.eta_col
    if need_x:
        dxu = u * L.eta_s if kind != "pre" else u * L.eta_row
    return dpost, dxu


def _prepare(x, W, b, eta, lam, W_rec, hid_mask, keep, cfg):
    mp_type, m_update, m_bounds = cfg
    return _Layer(x, W, b, eta, lam, mp_type, m_update, m_bounds, W_rec, hid_mask, keep)


def _run_forward(L, x, record, m_init=None):
    """Forward over all chunks (or, with a record callback, over the whole batch at once so
    that record sees M_{t-1} of every trial at step t)."""
    if record is not None:
        h, _, M = _forward_chunk(L, slice(None), x, record=record, m_init=m_init)
        return h, M
    h = x.new_empty(L.B, L.T, L.n_post)
    M = x.new_empty(L.B, L.n_post, L.n_pre)

    def one(sl):
        h[sl], _, M[sl] = _forward_chunk(L, sl, x[sl], m_init=m_init)

    _map_chunks(one, L.chunks(), not x.is_cuda)
    return h, M


def _chunk_grads(L, sl, x, r, need, n_in, dx, dW):
    """Fold one chunk's reverse-pass results into dx / per-trial dW, and return its shared
    gradient contributions (db, dη, dλ, dW, dW_rec) for summing over chunks."""
    d, W_c, x_c = r["deltas"], L.W_of(sl), x[sl]
    if dx is not None:
        dx[sl] = r["dx"] + (torch.bmm(d, W_c) if L.per_trial_W else d @ W_c)
    out = dict(db=d.sum((0, 1)), deta=r["deta"], dlam=r["dlam"], dW=None, dW_rec=None)
    if need["W"] and L.per_trial_W:
        dW[sl] = torch.bmm(d.transpose(1, 2), x_c)
        if r["acc"] is not None:
            dW[sl] += r["acc"]
    elif need["W"]:
        out["dW"] = d.reshape(-1, L.n_post).T @ x_c.reshape(-1, L.n_pre)
        if r["acc"] is not None:
            out["dW"] += r["acc"].sum(0)
    if n_in[5] and L.T > 1:
        out["dW_rec"] = (d[:, 1:].reshape(-1, L.n_post).T
                         @ r["hs"][:, :-1].reshape(-1, L.n_post))
    return out


def _fast_backward(L, x, gh, gM, need, n_in, dx, dW):
    """The reverse pass chunk by chunk (one set of work buffers per worker thread); returns
    each chunk's `_chunk_grads` contributions."""
    shape = (L.chunk, L.n_post, L.n_pre)
    free = queue.SimpleQueue()
    for _ in range(min(torch.get_num_threads(), len(L.chunks()))):
        free.put(dict(store=x.new_empty((L.T + 1,) + shape), tmp=x.new_empty(shape),
                      tmp2=x.new_empty(shape), G=x.new_empty(shape),
                      acc=x.new_empty(shape) if (L.mult and need["W"]) else None))

    def one(sl):
        # r["acc"] is a view of this worker's buffer: consume it before handing the
        # buffer to the next chunk
        buf = free.get()
        try:
            r = _backward_chunk(L, sl, x[sl], None if gh is None else gh[sl],
                                None if gM is None else gM[sl], buf, need)
            return _chunk_grads(L, sl, x, r, need, n_in, dx, dW)
        finally:
            free.put(buf)

    return _map_chunks(one, L.chunks(), not x.is_cuda)


class _PlasticSequence(torch.autograd.Function):
    """The whole plastic sequence as one autograd node; saves only its inputs. `passes` is
    the engine's pair (forward(L, x, record, m_init) -> h, M; backward(L, x, gh, gM, need,
    n_in, dx, dW) -> list of `_chunk_grads` contributions): "fast" and "fused" share the rest."""

    @staticmethod
    def forward(ctx, x, W, b, eta, lam, W_rec, hid_mask, keep, cfg, record, passes):
        L = _prepare(x, W, b, eta, lam, W_rec, hid_mask, keep, cfg)
        h, M = passes[0](L, x, record, None)
        ctx.save_for_backward(x, W, b, eta, lam, W_rec, hid_mask, keep)
        ctx.cfg, ctx.passes = cfg, passes
        ctx.set_materialize_grads(False)
        return h, M

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh, gM):
        if gh is None and gM is None:
            return (None,) * 11
        x, W, b, eta, lam, W_rec, hid_mask, keep = ctx.saved_tensors
        L = _prepare(x, W, b, eta, lam, W_rec, hid_mask, keep, ctx.cfg)
        n_in = ctx.needs_input_grad
        need = dict(x=n_in[0], W=n_in[1], eta=n_in[3], lam=n_in[4])
        dx = torch.zeros_like(x) if need["x"] else None
        dW = torch.zeros_like(W) if (need["W"] and L.per_trial_W) else None
        parts = ctx.passes[1](L, x, gh, gM, need, n_in, dx, dW)
        return _finish_grads(parts, n_in, dx, dW, eta, lam, W_rec) + (None,) * 5


def run_sequence(engine, passes, x, W, b, eta, lam, *, mp_type, m_update, m_bounds, W_rec,
                 hid_mask, m_freeze, record, m_init):
    """Check the call, then run `passes` (see `_PlasticSequence`) with or without autograd."""
    why = fast_unsupported(x, W, b, eta, lam, mp_type=mp_type, m_update=m_update,
                           m_bounds=m_bounds, W_rec=W_rec, hid_mask=hid_mask, m_freeze=m_freeze)
    if why is not None:
        raise ValueError(f"engine '{engine}' cannot run this call: {why}; use engine='reference'")
    keep = None if m_freeze is None else 1.0 - m_freeze
    cfg = (mp_type, m_update, None if m_bounds is None else tuple(m_bounds))
    args = (x, W, b, eta, lam, W_rec, hid_mask, keep)
    grad = torch.is_grad_enabled() and any(torch.is_tensor(a) and a.requires_grad for a in args)
    _check_m_init(m_init, W_rec, grad)
    if grad:
        return _PlasticSequence.apply(*args, cfg, record, passes)
    with torch.no_grad():
        return passes[0](_prepare(*args, cfg), x, record, m_init)


def _finish_grads(parts, n_in, dx, dW, eta, lam, W_rec):
    """Sum the chunks' shared contributions (from `_chunk_grads`) into the gradients of
    x, W, b, eta, lam and W_rec, in the shapes of those inputs (None where not needed)."""
    total = {k: None if parts[0][k] is None else sum(p[k] for p in parts)
             for k in ("db", "deta", "dlam", "dW", "dW_rec")}
    if dW is None:
        dW = total["dW"]
    db = total["db"] if n_in[2] else None
    dW_rec = total["dW_rec"] if n_in[5] else None
    deta, dlam = total["deta"], total["dlam"]
    if n_in[5] and dW_rec is None:  # T == 1: W_rec never acts
        dW_rec = torch.zeros_like(W_rec)
    deta = None if deta is None else deta.reshape(eta.shape)
    dlam = None if dlam is None else dlam.reshape(lam.shape)
    return dx, dW, db, deta, dlam, dW_rec


def plastic_forward_fast(x, W, b, eta, lam, *, mp_type="mult", m_update="hebb_assoc",
                         m_bounds=(-1.0, 1.0), W_rec=None, hid_mask=None, m_freeze=None,
                         record=None, m_init=None):
    """Chunked, in-place, recompute-in-backward engine. Same arguments as `plastic_forward`."""
    return run_sequence("fast", (_run_forward, _fast_backward), x, W, b, eta, lam,
                        mp_type=mp_type, m_update=m_update, m_bounds=m_bounds, W_rec=W_rec,
                        hid_mask=hid_mask, m_freeze=m_freeze, record=record, m_init=m_init)


def plastic_forward_cpp(x, W, b, eta, lam, *, mp_type="mult", m_update="hebb_assoc",
                        m_bounds=(-1.0, 1.0), W_rec=None, hid_mask=None, m_freeze=None,
                        record=None, m_init=None):
    """The compiled kernel (mpn_cpp) where it handles the call and builds; "fast" otherwise.
    Same arguments as `plastic_forward`."""
    kwargs = dict(mp_type=mp_type, m_update=m_update, m_bounds=m_bounds, W_rec=W_rec,
                  hid_mask=hid_mask, m_freeze=m_freeze)
    why = fast_unsupported(x, W, b, eta, lam, **kwargs)
    if why is not None:
        raise ValueError(f"engine 'cpp' cannot run this call: {why}; use engine='reference'")
    if (mpn_cpp.unsupported(x, W, b, eta, lam, W_rec=W_rec, hid_mask=hid_mask,
                            m_freeze=m_freeze, record=record) is not None
            or mpn_cpp.kernel() is None):
        return plastic_forward_fast(x, W, b, eta, lam, record=record, m_init=m_init, **kwargs)
    keep = None if m_freeze is None else 1.0 - m_freeze
    cfg = (mp_type, m_update, None if m_bounds is None else tuple(m_bounds))
    return mpn_cpp.plastic_forward_cpp(x, W, b, eta, lam, keep, cfg, W_rec=W_rec,
                                       hid_mask=hid_mask, m_init=m_init)


def plastic_forward(x, W, b, eta, lam, *, mp_type="mult", m_update="hebb_assoc",
                    m_bounds=(-1.0, 1.0), W_rec=None, hid_mask=None, m_freeze=None,
                    record=None, engine="reference", m_init=None):
    """Run the plastic layer over a batch of trials.

    x: (B, T, N_pre) presynaptic activity (embedding output, unit masks already applied).
    W: (N_post, N_pre), or (B, N_post, N_pre) when a perturbation gives each trial its own W.
    b: (N_post,). eta, lam: tensors broadcastable to (N_post, N_pre): shape (), (1, N_pre),
    (N_post, 1) or (N_post, N_pre).
    W_rec: (N_post, N_post) or None. hid_mask: (B, N_post) of 0/1, or None.
    m_freeze: (B, N_post, N_pre) or (N_post, N_pre) of 0/1, 1 where M is held at 0; or None.
    record: optional callable record(t, M_prev) called at every step with M_{t-1} (the matrix
    used to compute h_t), for streaming statistics; it must not modify M.
    m_init: (B, N_post, N_pre) or None: the M entering the first step (the final M of an
    earlier call continues that sequence: two calls give the same h and M as one); None = 0,
    a trial's start. Forward only, without W_rec (h_{-1} is not carried over).
    Returns h (B, T, N_post) and the final M (B, N_post, N_pre).
    """
    kwargs = dict(mp_type=mp_type, m_update=m_update, m_bounds=m_bounds, W_rec=W_rec,
                  hid_mask=hid_mask, m_freeze=m_freeze)
    if engine == "auto":
        engine = "reference" if fast_unsupported(x, W, b, eta, lam, **kwargs) else "cpp"
    if engine == "reference":
        return plastic_forward_reference(x, W, b, eta, lam, record=record, m_init=m_init,
                                         **kwargs)
    if engine == "fast":
        return plastic_forward_fast(x, W, b, eta, lam, record=record, m_init=m_init, **kwargs)
    if engine == "cpp":
        return plastic_forward_cpp(x, W, b, eta, lam, record=record, m_init=m_init, **kwargs)
    if engine == "fused":
        return mpn_fused.plastic_forward_fused(x, W, b, eta, lam, record=record, m_init=m_init,
                                               **kwargs)
    raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
