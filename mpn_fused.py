"""Engine "fused" of mpn_engine: the plastic recurrence of SPEC §1.1 with each time step
written as one pure function that torch.compile fuses into a few kernels. Meant for CUDA,
where the fast engine's ~25 separate elementwise launches per step move each M-sized tensor
through memory again (70 ms per training step measured at the paper size on an H200, against
a goal of ≤ 50; benchmarks/GPU_NOTES.md). On the CPU the compiled kernel of mpn_cpp does the
same fusion by hand and is the engine to use; this one runs there too, for its tests.

Axis order: trials x time x units, (B, T, N); W is (N_post, N_pre), M is (B, N_post, N_pre).

Forward step (`_forward_step`), with M = M_{t-1}:
    a_t = Σ_j (W ⊙ (1 + M))_ij x_j + b [+ W_rec h_{t-1}]      (mult; add: W + M)
    g_t = tanh(a_t), h_t = g_t ⊙ mask, M_t = clip(λ ⊙ M + η ⊙ post_t x_tᵀ) ⊙ keep
The row sum over j and the update of row i (which needs only h_i) share their iteration
space, so inductor can emit them as one reduction-then-pointwise kernel, as for a softmax:
one read and one write of M per step, against ~4.5 passes in the fast engine. W x_t is summed
inside that row sum (W is read there anyway) rather than for all steps by one matmul as in
the fast engine, so every step depends only on its own inputs: a sequence continued from its
final M (m_init) equals one call bit for bit, whatever the lengths.

Reverse step (`_reverse_step`), G = dL/dM_t on entry, the pre-clip value recomputed from
M_{t-1} (no extra pass: M_{t-1} is read anyway):
    G̃ = G ⊙ 1[lo ≤ λ ⊙ M_{t-1} + η ⊙ post_t x_tᵀ ≤ hi] ⊙ keep   (torch.clamp's convention)
    dL/dpost_t = (G̃ ⊙ η) x_t,  dL/dx_t = (G̃ ⊙ η)ᵀ post_t + (W ⊙ M_{t-1})ᵀ δ_t
    δ_t = (dL/dh_t + [hebb_assoc] dL/dpost_t + W_recᵀ δ_{t+1}) ⊙ (1 − g_t²) ⊙ mask
    E = δ_t x_tᵀ;  dW += E ⊙ M_{t-1} (mult);  dL/dM_{t-1} = λ ⊙ G̃ + W ⊙ E  (add: + E)
    dλ += G̃ ⊙ M_{t-1},  dη += G̃ ⊙ post_t x_tᵀ, each summed to its parameter's shape.
Everything here is a row reduction over j followed by row-wise updates (one kernel reading
G, M_{t-1} and the dW accumulator and writing G and the accumulator: 5 passes) except the
column sums for dL/dx_t (a second kernel: 2 reads). 7 passes per reverse step, 2 per forward
step, 2 more to recompute the forward storing M's history: ~11 passes of 46 MB per step at
the paper size, ~50 GB per training step of T = 100, i.e. ~15 ms at 3.5 TB/s against the fast
engine's ~190 GB (expected, unmeasured until `benchmarks/gpu_check.sh` runs on a GPU).

The step functions are pure (they return new tensors and never write their inputs), so a
step that fails to compile (no C++ compiler, no Triton) reruns the same function uncompiled:
the answer stays right and a warning says it is slow. `COMPILE = False` runs them uncompiled
from the start (the CPU tests of the equations use this; tests/test_engine.py compiles too).
The first call on a new shape, dtype or option set compiles (seconds per function, once per
process).
"""
import logging

import torch

import mpn_engine  # the autograd node and call checks live there; it imports this module

COMPILE = True  # False: run the step functions uncompiled (same equations, many more kernels)
RECOMPILE_LIMIT = 64  # graphs per step function per process (torch's default, 8, is too few
#                       for the lesion stage's mix of masks, per-trial W and trial counts)

log = logging.getLogger(__name__)
_state = {"compiled": {}, "error": None}


def _pre_clip(M, post, x_t, lam, eta):
    """λ ⊙ M + η ⊙ post x_tᵀ (lam, eta broadcast to (N_post, N_pre))."""
    return lam * M + eta * (post[:, :, None] * x_t[:, None, :])


def _post(h, assoc, post_const):
    return h if assoc else torch.full_like(h, post_const)


def _forward_step(M, x_t, h_prev, W, b, W_rec, lam, eta, keep, mask, *, mult, assoc, bounds,
                  post_const):
    """One step from M = M_{t-1}: returns g_t = tanh(a_t), h_t and M_t (a new tensor)."""
    W_eff = W * (1.0 + M) if mult else W + M
    a = (W_eff * x_t[:, None, :]).sum(-1) + b
    if W_rec is not None:
        a = a + h_prev @ W_rec.T
    g = torch.tanh(a)
    h = g if mask is None else g * mask
    M_new = _pre_clip(M, _post(h, assoc, post_const), x_t, lam, eta)
    if bounds is not None:
        M_new = M_new.clamp(bounds[0], bounds[1])
    if keep is not None:
        M_new = M_new * keep
    return g, h, M_new


def _sum_to(full, kind):
    """Reduce a (B, N_post, N_pre) product to a parameter's 2-D shape, summing rows (or
    columns) first so the reduction shares its kernel with the step's other row (column)
    sums."""
    if kind == "scalar":
        return full.sum(-1).sum().reshape(1, 1)
    if kind == "post":
        return full.sum(-1).sum(0)[:, None]
    if kind == "pre":
        return full.sum(1).sum(0)[None, :]
    return full.sum(0)


def _through_update(Gt, post, x_t, eta, eta_kind, want_post, want_x, want_eta):
    """Push G̃ through η ⊙ post x_tᵀ: (dL/dpost or None, dL/dx_t or None, dη or None)."""
    dpost = dx = deta = None
    if eta_kind in ("scalar", "post"):
        eta_col = eta[:, 0]  # (1,) or (N_post,)
        if want_post or want_eta:
            v = (Gt * x_t[:, None, :]).sum(-1)  # G̃ x_t
            dpost = v * eta_col if want_post else None
            if want_eta:
                deta = (v * post).sum().reshape(1, 1) if eta_kind == "scalar" else \
                    (v * post).sum(0)[:, None]
        if want_x:
            dx = (Gt * (post * eta_col)[:, :, None]).sum(1)
    elif eta_kind == "pre":
        eta_row = eta[0]
        if want_post:
            dpost = (Gt * (x_t * eta_row)[:, None, :]).sum(-1)
        if want_x or want_eta:
            u = (Gt * post[:, :, None]).sum(1)  # G̃ᵀ post
            dx = u * eta_row if want_x else None
            deta = (u * x_t).sum(0)[None, :] if want_eta else None
    else:
        Ge = Gt * eta
        dpost = (Ge * x_t[:, None, :]).sum(-1) if want_post else None
        dx = (Ge * post[:, :, None]).sum(1) if want_x else None
        deta = (Gt * (post[:, :, None] * x_t[:, None, :])).sum(0) if want_eta else None
    return dpost, dx, deta


def _reverse_step(G, M_prev, x_t, post, fac_t, gh_t, carry, acc, W, W_rec, lam, eta, keep, *,
                  mult, assoc, bounds, eta_kind, lam_kind, need_x, need_eta, need_lam):
    """One reverse step (module docstring). Returns dL/dM_{t-1}, the dW accumulator, δ_t,
    the M-dependent part of dL/dx_t, W_recᵀ δ_t and the dη, dλ contributions (None where
    not needed)."""
    Gt = G
    if bounds is not None:
        pre = _pre_clip(M_prev, post, x_t, lam, eta)
        Gt = Gt * ((pre >= bounds[0]) & (pre <= bounds[1])).to(G.dtype)
    if keep is not None:
        Gt = Gt * keep
    dlam = _sum_to(Gt * M_prev, lam_kind) if need_lam else None
    dpost, dx, deta = _through_update(Gt, post, x_t, eta, eta_kind, assoc, need_x, need_eta)
    dh = gh_t + carry
    if dpost is not None:
        dh = dh + dpost
    delta = dh * fac_t
    WM = W * M_prev if mult else M_prev
    if need_x:
        dx = dx + (WM * delta[:, :, None]).sum(1)
    E = delta[:, :, None] * x_t[:, None, :]
    if acc is not None:
        acc = acc + E * M_prev
    G_prev = lam * Gt + (E * W if mult else E)
    carry = delta @ W_rec if W_rec is not None else torch.zeros_like(delta)
    return G_prev, acc, delta, dx, carry, deta, dlam


def _compiled(fn):
    """fn compiled once per process (inductor: Triton on CUDA, C++ on the CPU)."""
    if fn.__name__ not in _state["compiled"]:
        import torch._dynamo  # noqa: F401  (imported on first use only: it is slow to load)
        cfg = torch._dynamo.config
        for key in ("recompile_limit", "cache_size_limit"):  # the name changed across torch
            if hasattr(cfg, key):
                setattr(cfg, key, max(getattr(cfg, key), RECOMPILE_LIMIT))
        _state["compiled"][fn.__name__] = torch.compile(fn, fullgraph=True)
    return _state["compiled"][fn.__name__]


def _step(fn, *args, **kw):
    """fn compiled where possible; uncompiled from a compile failure on (warned once). A call
    that fails uncompiled too is wrong in itself: its error is raised and compiling stays on."""
    if not COMPILE or _state["error"] is not None:
        return fn(*args, **kw)
    try:
        return _compiled(fn)(*args, **kw)
    except Exception as e:  # noqa: BLE001 -- judged by the uncompiled rerun below
        out = fn(*args, **kw)
        _state["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("engine 'fused': torch.compile failed (%s); its steps now run "
                    "uncompiled (correct, but slower than engine 'fast')", _state["error"])
        return out


def _flags(L):
    return dict(mult=L.mult, assoc=L.assoc, bounds=L.bounds)


def _time_major(t):
    """(B, T, N) -> contiguous (T, B, N): each step's slice is then a contiguous (B, N) whose
    strides do not depend on T (a T-dependent stride would recompile at every new length)."""
    return t.transpose(0, 1).contiguous()


def _forward(L, x, record=None, m_init=None, history=False):
    """All T steps. Returns h (B, T, N_post), g = tanh(a) (B, T, N_post), the final M and,
    with history=True, the list [M_{-1}, ..., M_{T-2}] the reverse pass reads."""
    B, T = L.B, L.T
    xs = _time_major(x)
    if m_init is None:
        M = x.new_zeros(B, L.n_post, L.n_pre)
    else:
        M = m_init.expand(B, L.n_post, L.n_pre).contiguous()
    h = x.new_zeros(B, L.n_post)
    keep = L.keep_of(slice(None))
    kw = dict(_flags(L), post_const=L.post_const)
    hs, gs, Ms = [], [], []
    for t in range(T):
        if record is not None:
            record(t, M)
        if history:
            Ms.append(M)
        g, h, M = _step(_forward_step, M, xs[t], h, L.W, L.b, L.W_rec, L.lam2, L.eta2, keep,
                        L.hid_mask, **kw)
        hs.append(h)
        gs.append(g)
    return torch.stack(hs, 1), torch.stack(gs, 1), M, Ms


def _backward(L, x, gh, gM, need):
    """The reverse pass over the whole batch; returns what mpn_engine._chunk_grads folds in."""
    hs, gs, _, Ms = _forward(L, x, history=True)
    fac = 1.0 - gs * gs
    if L.hid_mask is not None:
        fac = fac * L.hid_mask[:, None, :]
    xs, facs = _time_major(x), _time_major(fac)
    posts = _time_major(L.post(hs))
    ghs = _time_major(gh) if gh is not None else torch.zeros_like(facs)
    G = gM.contiguous() if gM is not None else torch.zeros_like(Ms[0])
    acc = torch.zeros_like(Ms[0]) if (L.mult and need["W"]) else None
    carry = torch.zeros_like(facs[0])
    keep = L.keep_of(slice(None))
    kw = dict(_flags(L), eta_kind=L.eta_kind, lam_kind=L.lam_kind, need_x=need["x"],
              need_eta=need["eta"], need_lam=need["lam"])
    deltas, dxs = [None] * L.T, [None] * L.T
    deta = torch.zeros_like(L.eta2) if need["eta"] else None
    dlam = torch.zeros_like(L.lam2) if need["lam"] else None
    for t in reversed(range(L.T)):
        M_prev = Ms[t]
        Ms[t] = None  # free each M_{t-1} once read
        G, acc, deltas[t], dxs[t], carry, de, dl = _step(
            _reverse_step, G, M_prev, xs[t], posts[t], facs[t], ghs[t], carry, acc, L.W,
            L.W_rec, L.lam2, L.eta2, keep, **kw)
        if de is not None:
            deta = deta + de
        if dl is not None:
            dlam = dlam + dl
    dx = torch.stack(dxs, 1) if need["x"] else None
    return dict(dx=dx, deltas=torch.stack(deltas, 1), hs=hs, acc=acc, deta=deta, dlam=dlam)


def _forward_pass(L, x, record, m_init):
    h, _, M, _ = _forward(L, x, record, m_init)
    return h, M


def _backward_pass(L, x, gh, gM, need, n_in, dx, dW):
    r = _backward(L, x, gh, gM, need)
    return [mpn_engine._chunk_grads(L, slice(None), x, r, need, n_in, dx, dW)]


def plastic_forward_fused(x, W, b, eta, lam, *, mp_type="mult", m_update="hebb_assoc",
                          m_bounds=(-1.0, 1.0), W_rec=None, hid_mask=None, m_freeze=None,
                          record=None, m_init=None):
    """Same arguments and calls as the fast engine (`mpn_engine.plastic_forward`), with the
    same autograd node around this module's forward and reverse passes."""
    return mpn_engine.run_sequence(
        "fused", (_forward_pass, _backward_pass), x, W, b, eta, lam, mp_type=mp_type,
        m_update=m_update, m_bounds=m_bounds, W_rec=W_rec, hid_mask=hid_mask,
        m_freeze=m_freeze, record=record, m_init=m_init)
