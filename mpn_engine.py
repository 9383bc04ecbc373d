"""The plastic-layer recurrence of SPEC §1.1, as one function over a whole trial sequence.

Axis order: trials x time x units, (B, T, N). W is (N_post, N_pre), M is (B, N_post, N_pre).

At every step t, with presynaptic activity x_t (already computed by the embedding):
    a_t = (W ⊙ (1 + M_{t-1})) x_t + b [+ W_rec h_{t-1}]     (mp_type "mult")
    a_t = (W + M_{t-1}) x_t + b [+ W_rec h_{t-1}]            (mp_type "add")
    h_t = tanh(a_t)  (then silenced units are zeroed)
    M_t = clip(λ M_{t-1} + η post_t x_tᵀ, lo, hi)            post_t = h_t ("hebb_assoc") or 1/√N_post ("hebb_pre")
with M_{-1} = 0. Synapses in a freeze mask keep M = 0.

`plastic_forward(..., engine="reference")` is the plain per-step loop: the obviously-correct
implementation every faster engine is tested against.
"""
import math

import torch

ENGINES = ("reference",)


def _post_term(h, m_update, n_post):
    """Postsynaptic factor of the Hebbian update: h itself, or a constant 1/√N_post."""
    if m_update == "hebb_assoc":
        return h
    if m_update == "hebb_pre":
        return torch.full_like(h, 1.0 / math.sqrt(n_post))
    raise ValueError(f"unknown m_update {m_update!r}; use 'hebb_assoc' or 'hebb_pre'")


def plastic_forward_reference(x, W, b, eta, lam, *, mp_type="mult", m_update="hebb_assoc",
                              m_bounds=(-1.0, 1.0), W_rec=None, hid_mask=None, m_freeze=None,
                              record=None):
    """Plain loop over time. See `plastic_forward` for the arguments."""
    B, T, n_pre = x.shape
    n_post = W.shape[-2]
    M = x.new_zeros(B, n_post, n_pre)
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


def plastic_forward(x, W, b, eta, lam, *, mp_type="mult", m_update="hebb_assoc",
                    m_bounds=(-1.0, 1.0), W_rec=None, hid_mask=None, m_freeze=None,
                    record=None, engine="reference"):
    """Run the plastic layer over a batch of trials.

    x: (B, T, N_pre) presynaptic activity (embedding output, unit masks already applied).
    W: (N_post, N_pre), or (B, N_post, N_pre) when a perturbation gives each trial its own W.
    b: (N_post,). eta, lam: tensors broadcastable to (N_post, N_pre): shape (), (1, N_pre),
    (N_post, 1) or (N_post, N_pre).
    W_rec: (N_post, N_post) or None. hid_mask: (B, N_post) of 0/1, or None.
    m_freeze: (B, N_post, N_pre) or (N_post, N_pre) of 0/1, 1 where M is held at 0; or None.
    record: optional callable record(t, M_prev) called at every step with M_{t-1} (the matrix
    used to compute h_t), for streaming statistics; it must not modify M.
    Returns h (B, T, N_post) and the final M (B, N_post, N_pre).
    """
    if engine == "reference":
        return plastic_forward_reference(x, W, b, eta, lam, mp_type=mp_type, m_update=m_update,
                                         m_bounds=m_bounds, W_rec=W_rec, hid_mask=hid_mask,
                                         m_freeze=m_freeze, record=record)
    raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
