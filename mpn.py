"""The models: the multi-plastic network "dmpn" (SPEC §1.1) and the vanilla-RNN and GRU
baselines (SPEC §1.2), all behind one interface (net_helpers.BaseNetwork).

Axis order: trials x time x units, (B, T, N). Weights are (N_post, N_pre); M is
(B, N_post, N_pre) and is reset to zero at the start of every trial.

Example:
    net, train_cfg, step = load_run(helper.run_paths(aname), device="cpu")  # a trained run
    net = build_model("dmpn", n_hidden=300, seed=749)
    out = net(inputs)                      # inputs (B, T, 21) -> out["y"] (B, T, 3), out["h"]
    out = net(inputs, record=("x", "M"))   # also x (B, T, N) and M_{t-1} (B, T, N, N)

Perturbations (net_helpers.Perturbation) each model applies:
    dmpn:    in_mask on x (the embedding output, or u itself when input_layer=False),
             hid_mask on h, w_mask / w_noise on W (the plastic layer), m_freeze on M.
    vanilla: hid_mask on h; w_mask / w_noise on W_rec (N, N). No embedding, so no in_mask.
    gru:     hid_mask on h; w_mask / w_noise on the recurrent weights, the same (N, N) mask or
             noise applied to each of the three gate blocks of W_rec. No in_mask.
A field a model cannot apply is a ValueError, never silently ignored.
"""
import numpy as np
import torch
from torch import nn

import mpn_engine
import net_helpers
from mpn_tasks import DT_MS
from net_helpers import BaseNetwork, bias_normal, make_generator, per_trial, xavier_uniform

COEF_TYPES = ("scalar", "pre_vector", "post_vector", "matrix")


def coef_shape(kind, n_post, n_pre):
    """Shape of η or λ for eta_type / lam_type `kind` (broadcasts against (N_post, N_pre))."""
    shapes = {"scalar": (), "pre_vector": (1, n_pre), "post_vector": (n_post, 1),
              "matrix": (n_post, n_pre)}
    if kind not in shapes:
        raise ValueError(f"unknown coefficient type {kind!r}; use one of {COEF_TYPES}")
    return shapes[kind]


def resolve_engine(engine):
    """'auto' falls back to the reference loop until mpn_engine provides it."""
    if engine == "auto" and "auto" not in mpn_engine.ENGINES:
        return "reference"
    return engine


def tanh_of_runs(z):
    """torch.tanh(z) for z (..., N), bit for bit, evaluated once per run of equal consecutive
    rows. The embedding x = tanh(W_in u) of a task batch repeats one row for a whole epoch
    (inputs are piecewise constant without input noise, and zero after a trial's end): a CPU
    preset training batch has ~180 runs in 4,300 rows, and torch.tanh (~3 ns an element on
    this CPU, unvectorised) took ~0.95 ms of a ~20 ms training step and ~15% of a validation
    pass; this takes ~0.3 ms. Runs are found on z's bits, so a run's rows are equal inputs,
    and torch.tanh's value does not depend on where in a tensor an element sits (tested): the
    result is exactly torch.tanh(z). The gradient is aten's tanh_backward from the output, as
    torch.tanh's own. Off the CPU, for other dtypes, or where more than half the rows start a
    run (input noise), it is torch.tanh itself."""
    if z.device.type != "cpu" or z.dtype not in (torch.float32, torch.float64) \
            or z.ndim < 2 or z.numel() == 0:
        return torch.tanh(z)
    return _TanhOfRuns.apply(z)


def _runs_tanh(z):
    flat = z.detach().reshape(-1, z.shape[-1]).contiguous()
    rows = flat.numpy()
    bits = rows.view(np.int64 if rows.shape[1] * rows.itemsize % 8 == 0 else np.int32)
    if 2 * np.count_nonzero(bits[1:, 0] != bits[:-1, 0]) >= len(rows):  # noisy: no runs
        return torch.tanh(z.detach())
    new = np.empty(len(rows), dtype=bool)
    new[0] = True
    np.any(bits[1:] != bits[:-1], axis=1, out=new[1:])
    starts = np.flatnonzero(new)
    if 2 * len(starts) > len(rows):
        return torch.tanh(z.detach())
    run = torch.from_numpy(np.cumsum(new, dtype=np.int64) - 1)
    first = flat.index_select(0, torch.from_numpy(starts))
    return torch.tanh(first).index_select(0, run).reshape(z.shape)


class _TanhOfRuns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        y = _runs_tanh(z)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


def perturbed_weight(W, pert):
    """W with a Perturbation's synapse mask (zero_W) and then its additive noise applied."""
    if pert.w_mask is not None:
        W = W * pert.w_mask
    if pert.w_noise is not None:
        W = W + pert.w_noise
    return W


class MultiPlasticLayer(nn.Module):
    """The plastic layer N_pre -> N_post of SPEC §1.1 (steps 2 and 4), run over whole trials
    by mpn_engine.plastic_forward."""

    def __init__(self, n_pre, n_post, gen, *, mp_type="mult", m_update="hebb_assoc",
                 eta_type="scalar", lam_type="scalar", eta_train=True, lam_train=False,
                 eta_init=1.0, lam_init=0.99, lam_max=0.99, m_bounds=(-1.0, 1.0),
                 recurrent=False, engine="auto"):
        super().__init__()
        if mp_type not in ("mult", "add"):
            raise ValueError(f"unknown mp_type {mp_type!r}; use 'mult' or 'add'")
        if m_update not in ("hebb_assoc", "hebb_pre"):
            raise ValueError(f"unknown m_update {m_update!r}; use 'hebb_assoc' or 'hebb_pre'")
        self.mp_type, self.m_update, self.engine = mp_type, m_update, engine
        self.m_bounds = None if m_bounds is None else (float(m_bounds[0]), float(m_bounds[1]))
        self.lam_max = lam_max
        self.W = nn.Parameter(xavier_uniform((n_post, n_pre), gen))
        self.b = nn.Parameter(bias_normal(n_post, gen))
        eta = torch.full(coef_shape(eta_type, n_post, n_pre), float(eta_init))
        lam = torch.full(coef_shape(lam_type, n_post, n_pre), float(lam_init))
        self._coef("eta", eta, eta_train)
        self._coef("lam", lam, lam_train)
        self.W_rec = nn.Parameter(xavier_uniform((n_post, n_post), gen)) if recurrent else None

    def _coef(self, name, value, trainable):
        if trainable:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def clamp_parameters(self):
        """λ in [0, 1 − dt/tau_M] when it is trained; η is never clamped."""
        if isinstance(self.lam, nn.Parameter):
            with torch.no_grad():
                self.lam.clamp_(0.0, self.lam_max)

    def forward(self, x, pert=None, record=None):
        """x (B, T, N_pre) -> h (B, T, N_post), final M (B, N_post, N_pre)."""
        B = x.shape[0]
        W, hid_mask, m_freeze = self.W, None, None
        if pert is not None:
            W = perturbed_weight(W, pert)
            hid_mask = per_trial(pert.hid_mask, 1, B)
            m_freeze = pert.m_freeze
        return mpn_engine.plastic_forward(
            x, W, self.b, self.eta, self.lam, mp_type=self.mp_type, m_update=self.m_update,
            m_bounds=self.m_bounds, W_rec=self.W_rec, hid_mask=hid_mask, m_freeze=m_freeze,
            record=record, engine=resolve_engine(self.engine))


class DeepMultiPlasticNet(BaseNetwork):
    """dmpn: x_t = tanh(W_in u_t); h_t = tanh((W ⊙ (1 + M_{t-1})) x_t + b); y_t = W_out h_t;
    M_t = clip(λ M_{t-1} + η h_t x_tᵀ, −1, 1). Options as SPEC §1.1."""
    net_type = "dmpn"
    perturbable = ("in_mask", "hid_mask", "w_mask", "m_freeze", "w_noise")
    plastic = True

    def __init__(self, n_input=21, n_hidden=300, n_output=3, *, mp_type="mult",
                 m_update="hebb_assoc", eta_type="scalar", lam_type="scalar", eta_train=True,
                 lam_train=False, eta_init=1.0, tau_M_ms=4000.0, dt_ms=DT_MS,
                 m_bounds=(-1.0, 1.0), recurrent=False, input_layer=True, seed=0,
                 engine="auto"):
        super().__init__()
        m_bounds = None if m_bounds is None else [float(m_bounds[0]), float(m_bounds[1])]
        self.init_args = dict(
            n_input=n_input, n_hidden=n_hidden, n_output=n_output, mp_type=mp_type,
            m_update=m_update, eta_type=eta_type, lam_type=lam_type, eta_train=eta_train,
            lam_train=lam_train, eta_init=eta_init, tau_M_ms=tau_M_ms, dt_ms=dt_ms,
            m_bounds=m_bounds, recurrent=recurrent, input_layer=input_layer, seed=seed,
            engine=engine)
        gen = make_generator(seed)
        self.input_layer = input_layer
        n_pre = n_hidden if input_layer else n_input
        # Drawn in a fixed order (W_in, W, b, W_out, W_rec) so an option never changes the
        # initial values of the weights it does not add.
        self.W_in = nn.Parameter(xavier_uniform((n_hidden, n_input), gen)) if input_layer else None
        lam0 = 1.0 - dt_ms / tau_M_ms
        self.mp = MultiPlasticLayer(
            n_pre, n_hidden, gen, mp_type=mp_type, m_update=m_update, eta_type=eta_type,
            lam_type=lam_type, eta_train=eta_train, lam_train=lam_train, eta_init=eta_init,
            lam_init=lam0, lam_max=lam0, m_bounds=m_bounds, recurrent=False, engine=engine)
        self.W_out = nn.Parameter(xavier_uniform((n_output, n_hidden), gen))
        if recurrent:
            self.mp.W_rec = nn.Parameter(xavier_uniform((n_hidden, n_hidden), gen))

    def weight_params(self):
        ws = [self.W_in, self.mp.W, self.W_out, self.mp.W_rec]
        return [w for w in ws if w is not None]

    def clamp_parameters(self):
        self.mp.clamp_parameters()

    # ------------------------------------------------------------------------------------
    # What the analysis and lesion stages read of the plastic layer (BaseNetwork)

    def synapse_weight(self):
        return self.mp.W

    def set_engine(self, engine):
        self.mp.engine = engine

    def rows_independent(self):
        """Without W_rec and under hebb_assoc each hidden unit reads only its own row of W, b,
        η, λ and M (under hebb_pre the update constant 1/√N_post depends on how many rows run
        together)."""
        return self.mp.W_rec is None and self.mp.m_update == "hebb_assoc"

    def plastic_coefficients(self):
        """(b (N_post,), η, λ) of the plastic layer, detached (η, λ as their eta_type /
        lam_type shapes)."""
        return self.mp.b.detach(), self.mp.eta.detach(), self.mp.lam.detach()

    def forward_rows(self, x, W, b, eta, lam, m_freeze=None, m_init=None):
        """The plastic layer's equations, options and engine on a "virtual" layer of stacked
        rows sharing the presynaptic input x (B, T, N_pre): W (K, N_pre), b (K,), η and λ
        scalar or one row each, m_freeze (K, N_pre) or None, m_init (B, K, N_pre) the M
        entering the first step or None (zeros) -> (h (B, T, K), final M).
        Valid when rows_independent(): each row then runs as it would in the whole layer."""
        mp = self.mp
        return mpn_engine.plastic_forward(
            x, W, b, eta, lam, mp_type=mp.mp_type, m_update=mp.m_update, m_bounds=mp.m_bounds,
            m_freeze=m_freeze, engine=resolve_engine(mp.engine), m_init=m_init)

    def forward(self, inputs, perturbation=None, record=(), m_reduce=None):
        pert = self._perturbation(perturbation, inputs)
        x = tanh_of_runs(inputs @ self.W_in.T) if self.input_layer else inputs
        if pert is not None and pert.in_mask is not None:
            m = pert.in_mask
            x = x * (m[:, None, :] if m.ndim == 2 else m)
        Ms = [] if "M" in record else None

        def on_step(t, M_prev):
            if Ms is not None:
                Ms.append(M_prev.clone())
            if m_reduce is not None:
                m_reduce(t, M_prev)

        hook = on_step if (Ms is not None or m_reduce is not None) else None
        h, M_final = self.mp(x, pert, record=hook)
        out = {"y": h @ self.W_out.T, "h": h, "M_final": M_final}
        if "x" in record:
            out["x"] = x
        if Ms is not None:
            out["M"] = torch.stack(Ms, dim=1)
        return out

    # ------------------------------------------------------------------------------------
    # One step at a given state, for the dynamics stages (fixed points, timescales, memory
    # geometry). The dynamical state of a dmpn without recurrence is M alone: h_t is a
    # function of (u_t, M_{t-1}).

    state_name = "M"  # what `step` and `states_at` carry

    def presynaptic(self, u):
        """x = tanh(W_in u) (u itself without an input layer), for inputs (..., n_input)."""
        return torch.tanh(u @ self.W_in.T) if self.input_layer else u

    def plastic_step(self, M, u):
        """One step of SPEC §1.1 from M_{t-1} (K, N_post, N_pre) under input u (K, n_input)
        or (n_input,): returns (h_t (K, N_post), M_t (K, N_post, N_pre)). Differentiable
        (torch.func.jvp works through it); the same equations as the reference engine."""
        if self.mp.W_rec is not None:
            raise ValueError("a recurrent dmpn's state is (h, M); plastic_step covers the "
                             "network without recurrence")
        mp = self.mp
        x = self.presynaptic(u).expand(M.shape[0], M.shape[-1])
        W_eff = mp.W * (1.0 + M) if mp.mp_type == "mult" else mp.W + M
        h = torch.tanh(torch.einsum("kij,kj->ki", W_eff, x) + mp.b)
        post = mpn_engine._post_term(h, mp.m_update, M.shape[-2])
        M = mp.lam * M + mp.eta * post[:, :, None] * x[:, None, :]
        if mp.m_bounds is not None:
            M = torch.clamp(M, mp.m_bounds[0], mp.m_bounds[1])
        return h, M

    def constant_input_step(self, u):
        """The map M_{t-1} -> M_t (K, N_post, N_pre) under a fixed input u (K, n_input), for
        running many steps under one input (fixed points): the terms of u alone (x, W ⊙ x,
        W x + b) are computed once, the drive is (W x)_i + b_i + Σ_j M_ij W_ij x_j (mult;
        Σ_j (W_ij + M_ij) x_j for add), and the update is one baddbmm and an in-place clip,
        ~5 passes over M per step instead of ~12. Same equations as plastic_step (tested)."""
        if self.mp.W_rec is not None:
            raise ValueError("constant_input_step covers the dmpn without recurrence")
        mp = self.mp
        x = self.presynaptic(u)
        wx = mp.W * x[:, None, :] if mp.mp_type == "mult" else None
        drive = x @ mp.W.T + mp.b
        scalar = mp.lam.numel() == 1 and mp.eta.numel() == 1
        lam, eta = (float(mp.lam), float(mp.eta)) if scalar else (mp.lam, mp.eta)

        def step(M):
            if wx is None:
                h = torch.tanh(drive + torch.einsum("kij,kj->ki", M, x))
            else:
                h = torch.tanh(drive + torch.einsum("kij,kij->ki", M, wx))
            post = mpn_engine._post_term(h, mp.m_update, M.shape[-2])
            if scalar:
                new = torch.baddbmm(M, post[:, :, None], x[:, None, :], beta=lam, alpha=eta)
            else:
                new = lam * M + eta * post[:, :, None] * x[:, None, :]
            return new if mp.m_bounds is None else new.clamp_(*mp.m_bounds)

        return step

    def state_shape(self):
        """Shape of one trial's dynamical state M: (N_post, N_pre)."""
        return tuple(self.mp.W.shape)

    def step(self, state, u):
        """The next dynamical state (M_t) from M_{t-1} under input u; see plastic_step."""
        return self.plastic_step(state, u)[1]

    def linearized_step(self, M, u):
        """(M_t, tangent) at M_{t-1} = M: tangent(V) = ∂M_t/∂M_{t-1} · V in closed form, with
        the terms that do not depend on V (x, h, the clip mask) computed once, so that the
        many products of an eigensolver cost a few array operations each. M, V (K, N_post,
        N_pre). The clip passes the tangent where lo <= M_t <= hi, as torch.clamp does."""
        if self.mp.W_rec is not None:
            raise ValueError("linearized_step covers the dmpn without recurrence")
        mp = self.mp
        x = self.presynaptic(u).expand(M.shape[0], M.shape[-1])
        W_eff = mp.W * (1.0 + M) if mp.mp_type == "mult" else mp.W + M
        h = torch.tanh(torch.einsum("kij,kj->ki", W_eff, x) + mp.b)
        post = mpn_engine._post_term(h, mp.m_update, M.shape[-2])
        new = mp.lam * M + mp.eta * post[:, :, None] * x[:, None, :]
        inside = None
        if mp.m_bounds is not None:
            lo, hi = mp.m_bounds
            inside = ((new >= lo) & (new <= hi)).to(M.dtype)
            new = torch.clamp(new, lo, hi)
        # hebb_assoc: h_i moves by (1 − h_i²) Σ_j W_ij V_ij x_j (mult; Σ_j V_ij x_j for add),
        # and M_ij by η x_j times that; the pre-only rule's post term does not depend on M
        assoc = mp.m_update == "hebb_assoc"
        wx = (mp.W * x[:, None, :] if mp.mp_type == "mult" else x[:, None, :]) if assoc else None
        eta_x = mp.eta * x[:, None, :] if assoc else None
        slope = 1 - h ** 2

        def tangent(V):
            d_new = V * mp.lam
            if assoc:
                dh = slope * torch.einsum("kij,kij->ki", V, wx.expand_as(V))
                d_new.addcmul_(dh[:, :, None], eta_x)
            return d_new if inside is None else d_new.mul_(inside)

        return new, tangent

    def step_jvp(self, M, u, V):
        """(M_t, ∂M_t/∂M_{t-1} · V): one step and its Jacobian-vector product in closed form
        (a few array operations; tested against forward-mode autodiff). M, V (K, N_post,
        N_pre); see linearized_step."""
        new, tangent = self.linearized_step(M, u)
        return new, tangent(V)

    def decay(self):
        """λ, broadcastable against M (N_post, N_pre): M's per-step decay at zero input."""
        return self.mp.lam.detach()

    def effective_modulation(self, M):
        """The weight change M makes: W ⊙ M (mp_type "mult") or M itself ("add"); M may be
        (..., N_post, N_pre) or flattened post-major (..., N_post·N_pre)."""
        if self.mp.mp_type == "add":
            return M
        W = self.mp.W.detach()
        return M * (W if M.shape[-2:] == W.shape else W.reshape(-1))

    @torch.no_grad()
    def states_at(self, inputs, steps):
        """M_t (the state after processing input t) at each t in `steps`, for every trial:
        (B, len(steps), N_post, N_pre). M_t reaches the engine as M_prev at step t + 1."""
        steps = [int(t) for t in steps]
        want = {t + 1: i for i, t in enumerate(steps)}
        kept = {}

        def keep(t, M_prev):
            if t in want:
                kept[want[t]] = M_prev.detach().clone()

        out = self(inputs, m_reduce=keep)
        for i, t in enumerate(steps):
            if t == inputs.shape[1] - 1:
                kept[i] = out["M_final"].detach()
        return torch.stack([kept[i] for i in range(len(steps))], dim=1)


def forward_jvp(step, state, u, tangent):
    """(step(state, u), its Jacobian-vector product along `tangent`) by forward-mode AD."""
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        out = fwAD.unpack_dual(step(fwAD.make_dual(state, tangent), u))
        return out.primal, out.tangent


def _recurrent_weights(W_rec, pert, n_blocks=1):
    """W_rec with the perturbation's synapse mask and noise; per trial when they are."""
    if pert is None:
        return W_rec
    for name in ("w_mask", "w_noise"):
        v = getattr(pert, name)
        if v is None:
            continue
        v = torch.cat([v] * n_blocks, dim=-2) if n_blocks > 1 else v
        W_rec = W_rec * v if name == "w_mask" else W_rec + v
    return W_rec


def _rec_input(W_rec, h):
    """W_rec h for a shared (N_out, N) or per-trial (B, N_out, N) W_rec."""
    if W_rec.ndim == 3:
        return torch.einsum("bij,bj->bi", W_rec, h)
    return h @ W_rec.T


class HiddenStateDynamics:
    """The dynamics interface of the recurrent baselines, whose state is h (the class also
    defines `step(h, u)`): used by the fixed-point and timescale stages."""

    state_name = "h"  # what `step` and `states_at` carry

    def step_jvp(self, h, u, V):
        """(h_t, ∂h_t/∂h_{t-1} · V) by forward-mode autodiff of `step`."""
        return forward_jvp(self.step, h, u, V)

    def constant_input_step(self, u):
        """The map h_{t-1} -> h_t under a fixed input u (K, n_input): `step` itself (h is
        small, nothing is worth precomputing)."""
        return lambda h: self.step(h, u)

    def linearized_step(self, h, u):
        """(h_t, tangent) with tangent(V) = ∂h_t/∂h_{t-1} · V (forward-mode autodiff: h is
        small, so nothing is worth caching between products)."""
        return self.step(h, u), lambda V: forward_jvp(self.step, h, u, V)[1]

    def state_shape(self):
        """Shape of one trial's dynamical state h: (N,)."""
        return (self.W_out.shape[1],)

    @torch.no_grad()
    def states_at(self, inputs, steps):
        """h_t at each t in `steps`, for every trial: (B, len(steps), N)."""
        return self(inputs)["h"][:, [int(t) for t in steps]]


class VanillaRNN(HiddenStateDynamics, BaseNetwork):
    """Leaky RNN: h_t = (1−α) h_{t−1} + α tanh(W_in u_t + W_rec h_{t−1} + b), α = dt/tau;
    y_t = W_out h_t (SPEC §1.2)."""
    net_type = "vanilla"
    perturbable = ("hid_mask", "w_mask", "w_noise")

    def __init__(self, n_input=21, n_hidden=300, n_output=3, *, tau_ms=200.0, dt_ms=DT_MS,
                 seed=0):
        super().__init__()
        self.init_args = dict(n_input=n_input, n_hidden=n_hidden, n_output=n_output,
                              tau_ms=tau_ms, dt_ms=dt_ms, seed=seed)
        self.alpha = dt_ms / tau_ms
        gen = make_generator(seed)
        self.W_in = nn.Parameter(xavier_uniform((n_hidden, n_input), gen))
        self.W_rec = nn.Parameter(xavier_uniform((n_hidden, n_hidden), gen))
        self.b = nn.Parameter(bias_normal(n_hidden, gen))
        self.W_out = nn.Parameter(xavier_uniform((n_output, n_hidden), gen))

    def weight_params(self):
        return [self.W_in, self.W_rec, self.W_out]

    def synapse_weight(self):
        return self.W_rec

    def forward(self, inputs, perturbation=None, record=(), m_reduce=None):
        pert = self._perturbation(perturbation, inputs)
        B, T, _ = inputs.shape
        W_rec = _recurrent_weights(self.W_rec, pert)
        hid_mask = None if pert is None else per_trial(pert.hid_mask, 1, B)
        drive = inputs @ self.W_in.T + self.b
        h = inputs.new_zeros(B, self.W_rec.shape[0])
        hs = []
        for t in range(T):
            h = (1 - self.alpha) * h + self.alpha * torch.tanh(drive[:, t] + _rec_input(W_rec, h))
            if hid_mask is not None:
                h = h * hid_mask
            hs.append(h)
        h = torch.stack(hs, dim=1)
        out = {"y": h @ self.W_out.T, "h": h}
        if "x" in record:
            out["x"] = inputs
        return out

    def step(self, h, u):
        """h_t from h_{t-1} (K, N) under input u (K, n_input) or (n_input,); the same update
        as `forward` without perturbations, differentiable."""
        drive = u @ self.W_in.T + self.b + h @ self.W_rec.T
        return (1 - self.alpha) * h + self.alpha * torch.tanh(drive)


class GRUNet(HiddenStateDynamics, BaseNetwork):
    """GRU with torch.nn.GRUCell semantics (gate order r, z, n):
    r = σ(W_ir u + b_ir + W_hr h + b_hr), z = σ(W_iz u + b_iz + W_hz h + b_hz),
    n = tanh(W_in u + b_in + r ⊙ (W_hn h + b_hn)), h' = (1 − z) ⊙ n + z ⊙ h; y = W_out h.
    W_in (3N, n_in) and W_rec (3N, N) are Xavier-uniform per gate block, biases zero."""
    net_type = "gru"
    perturbable = ("hid_mask", "w_mask", "w_noise")

    def __init__(self, n_input=21, n_hidden=300, n_output=3, *, seed=0):
        super().__init__()
        self.init_args = dict(n_input=n_input, n_hidden=n_hidden, n_output=n_output, seed=seed)
        gen = make_generator(seed)
        N = n_hidden
        self.W_in = nn.Parameter(torch.cat([xavier_uniform((N, n_input), gen) for _ in range(3)]))
        self.W_rec = nn.Parameter(torch.cat([xavier_uniform((N, N), gen) for _ in range(3)]))
        self.b_in = nn.Parameter(torch.zeros(3 * N))
        self.b_rec = nn.Parameter(torch.zeros(3 * N))
        self.W_out = nn.Parameter(xavier_uniform((n_output, N), gen))

    def weight_params(self):
        return [self.W_in, self.W_rec, self.W_out]

    def synapse_weight(self):
        """The candidate (n) gate block of W_rec; w_mask / w_noise act on all three blocks."""
        return self.W_rec[-self.W_out.shape[1]:]

    def forward(self, inputs, perturbation=None, record=(), m_reduce=None):
        pert = self._perturbation(perturbation, inputs)
        B, T, _ = inputs.shape
        N = self.W_out.shape[1]
        if pert is None:  # torch's fused GRU: the same equations, half the time of the loop
            h, _ = torch.gru(inputs, inputs.new_zeros(1, B, N),
                             [self.W_in, self.W_rec, self.b_in, self.b_rec],
                             True, 1, 0.0, self.training, False, True)
            return self._outputs(h, inputs, record)
        W_rec = _recurrent_weights(self.W_rec, pert, n_blocks=3)
        hid_mask = None if pert is None else per_trial(pert.hid_mask, 1, B)
        gi = inputs @ self.W_in.T + self.b_in
        h = inputs.new_zeros(B, N)
        hs = []
        for t in range(T):
            gh = _rec_input(W_rec, h) + self.b_rec
            i_r, i_z, i_n = gi[:, t].split(N, dim=-1)
            h_r, h_z, h_n = gh.split(N, dim=-1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
            if hid_mask is not None:
                h = h * hid_mask
            hs.append(h)
        return self._outputs(torch.stack(hs, dim=1), inputs, record)

    def _outputs(self, h, inputs, record):
        out = {"y": h @ self.W_out.T, "h": h}
        if "x" in record:
            out["x"] = inputs
        return out

    def step(self, h, u):
        """h_t from h_{t-1} (K, N) under input u (K, n_input) or (n_input,); the same update
        as `forward` without perturbations, differentiable."""
        N = h.shape[-1]
        i_r, i_z, i_n = (u @ self.W_in.T + self.b_in).split(N, dim=-1)
        h_r, h_z, h_n = (h @ self.W_rec.T + self.b_rec).split(N, dim=-1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        return (1 - z) * torch.tanh(i_n + r * h_n) + z * h


MODELS = {"dmpn": DeepMultiPlasticNet, "vanilla": VanillaRNN, "gru": GRUNet}


def build_model(net, **kwargs):
    """The model `net` ("dmpn", "vanilla" or "gru") built from its constructor arguments."""
    if net not in MODELS:
        raise ValueError(f"unknown net {net!r}; choose one of {sorted(MODELS)}")
    return MODELS[net](**kwargs)


def model_from_checkpoint(ckpt, device="cpu"):
    """The one function that rebuilds any model from a checkpoint dict (or its path)."""
    if not isinstance(ckpt, dict):
        ckpt = net_helpers.load_checkpoint(ckpt)
    net = build_model(ckpt["net_type"], **ckpt["init_args"])
    net.load_state_dict(ckpt["state_dict"])
    return net.to(device)


def load_run(paths, device="cpu", engine=None):
    """The one way a stage loads a trained run (a helper.RunPaths): (network in eval mode on
    `device`, its training config, the checkpoint step). `engine` (mpn_engine) replaces the
    plastic-layer engine it was trained with; None keeps it."""
    ckpt = net_helpers.load_checkpoint(paths.checkpoint)
    net = model_from_checkpoint(ckpt, device=device).eval()
    if engine is not None:
        net.set_engine(engine)
    return net, ckpt["config"], int(ckpt["step"])


def untrained_twin(net):
    """The same architecture at its seeded initial weights (the run's step-0 weights: training
    draws them from the same seed), on the device and dtype of `net`, in eval mode, its
    parameters requiring gradients as those of `net` do."""
    p = next(net.parameters())
    twin = build_model(net.net_type, **net.init_args)
    return twin.to(device=p.device, dtype=p.dtype).eval().requires_grad_(p.requires_grad)


def with_untrained(net, untrained=True):
    """{"trained": net} and, when `untrained`, {"untrained": its untrained_twin}: the networks
    a dynamics stage analyses, the untrained one as its baseline."""
    return {"trained": net, **({"untrained": untrained_twin(net)} if untrained else {})}
