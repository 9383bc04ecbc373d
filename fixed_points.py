"""Fixed and slow points of the network dynamics under each task period's constant input, and
the leading eigenvalues of the linearised dynamics there (SPEC §7.3; Sussillo & Barak 2013).

The dynamical state s is M for a dmpn without recurrence (h_t is a function of u_t and
M_{t−1}, so F(M) = clip(λM + η post(h(M, u)) xᵀ) is the whole dynamics) and h for the vanilla
RNN and the GRU (F(h) = one step of the cell). For every rule of the run, every epoch
(task period) and every stim1 direction of `trials_per_rule` noise-free aligned trials:
  1. u = the period's input (constant within a period without noise) and s_0 = the state the
     trial reaches at the period's end;
  2. s_0 is run forward under F for at most `n_relax` steps (a stable point attracts it; a
     condition stops early once its RMS step is below `relax_tol`), in float32 by default;
     conditions still above `polish_tol` are then polished in float64 by L-BFGS on q(s) =
     ½‖F(s) − s‖² (`polish_iters`); the point's speed is the RMS step ‖F(s) − s‖ / √D, and it
     is "fixed" when the speed is below `fixed_tol`, else "slow";
  3. the `n_eigs` eigenvalues of ∂F/∂s of largest modulus, matrix-free: Jacobian-vector
     products (the model's linearized_step: closed form for M, forward-mode autodiff for h)
     handed to ARPACK (scipy.sparse.linalg.eigs), on the coordinates whose Jacobian row is
     not zero (clipped synapses add only zeros to the spectrum); D = N² for M;
  4. baselines: the same for the untrained network (the run's seeded step-0 weights, on
     `untrained_trials_per_rule` trials per rule), and, for M, λ itself (at zero
     presynaptic input every eigenvalue equals λ).
Polishing and eigenvalues run in float64 on the CPU (ARPACK is a CPU library). Cost at
N = 300 (D = 90,000): ~0.35 s of relaxing and ~0.75 s of ARPACK per point (see
benchmarks/bench_fixed_points.py).

Reads:  runs/<aname>/checkpoint.pt.
Writes: runs/<aname>/fixed_points.h5 (per network: rule, epoch, direction of every point, its
        speed, clipped fraction, leading eigenvalues, 2-D PCA of the points and of their
        starting states) and runs/<aname>/figures/fixed_points_{spectra,pca}.png.

Axis order: conditions x state, (K, D); M flattened post-major.

Example:
    python fixed_points.py --run=everything_dmpn_seed749_L21e4_h64_b32
"""
import copy

import numpy as np
import torch
# Loaded before helper.single_thread() limits the BLAS thread pools: threadpoolctl limits only
# the libraries already loaded, and ARPACK's (scipy's own OpenBLAS) otherwise runs 2 spinning
# threads on a busy machine (measured at N = 300: 3-6 s of CPU per eigensolve instead of 0.7).
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigs

import helper
import mpn
import mpn_tasks

CONFIG = dict(
    run="everything_dmpn_seed*",  # run name or glob (quote globs in the shell) {@run_pattern}
    runs_dir=None,  # runs root; None = $MPN_RUNS_DIR, else runs/ {None | @path}
    rules=None,  # rules analysed: None = the run's ruleset, or a list of its rules, e.g. ["dmcgo"] {None | @rules}
    trials_per_rule=8,  # noise-free aligned trials per rule; trial i has direction i % 8 {>= 1}
    epoch_quantile=1.0,  # epoch durations at this quantile of their ranges (1.0 = longest) {>= 0, <= 1}
    n_relax=2000,  # at most this many steps of the dynamics from the period-end state before polishing (2000 = 80 s) {>= 0}
    relax_tol=1e-7,  # a condition stops relaxing once its RMS step is below this: it then sits at a fixed point (fixed_tol / 10; above relax_float32's rounding floor, ~1e-8) {>= 0}
    relax_float32=True,  # relax in float32 (3x faster per step at N = 300), then polish and take eigenvalues in float64 {@bool}
    polish_iters=50,  # at most this many L-BFGS iterations minimising q = ½‖F(s) − s‖² {>= 0}
    polish_tol=1e-6,  # polishing leaves out conditions whose RMS step is already below this and stops once all are (= fixed_tol: on the N = 64 net 50 L-BFGS iterations took relaxed points' median RMS step only from 7.7e-8 to 5.5e-8) {>= 0}
    fixed_tol=1e-6,  # a point whose RMS step ‖F(s) − s‖/√D is below this is "fixed" {> 0}
    n_eigs=10,  # leading Jacobian eigenvalues (largest modulus) per point {>= 1}
    batch_values=2**18,  # state values relaxed together (conditions per batch = batch_values // D, at least 1): 1 MB of float32 stays in cache (per value 2-3x faster than 2-8 MB batches; 64 x 90,000 float64 took 25x longer per condition than 16 x 90,000) {>= 1}
    untrained_baseline=True,  # also analyse the untrained network (the run's step-0 weights) {@bool}
    untrained_trials_per_rule=2,  # trials per rule for the untrained network: its points are one pooled baseline distribution, never matched condition by condition, and 2 instead of 8 cut its cost ~4x (at N = 300 ~1 s per point) {>= 1}
    figures=True,  # draw the figures {@bool}
)



# ----------------------------------------------------------------------------------------
# Loading


def load_networks(paths, untrained):
    """{"trained": net[, "untrained": its seeded step-0 twin]} in float64 on the CPU, the
    training config and the checkpoint step."""
    net, train_cfg, step = mpn.load_run(paths)
    if net.state_name == "M" and net.init_args.get("recurrent"):
        raise helper.StageError(f"run {paths.name!r} is a recurrent dmpn, whose state is (h, M);"
                                f" fixed_points.py handles dmpn without recurrence, vanilla, gru.")
    return mpn.with_untrained(net.double().requires_grad_(False), untrained), train_cfg, step


# ----------------------------------------------------------------------------------------
# Task-period conditions


def rule_conditions(net, rule, cfg, io_mode):
    """Inputs u (K, n_in), period-end states s_0 (K, D) and labels (epoch name, direction) of
    every (epoch, trial) of one rule."""
    batch = mpn_tasks.aligned_batch(rule, cfg["trials_per_rule"], np.random.default_rng(0),
                                    quantile=cfg["epoch_quantile"], io_mode=io_mode)
    inputs = torch.as_tensor(batch.inputs, dtype=torch.float64)
    epochs = [name for name in mpn_tasks.epoch_names(rule)
              if batch.epochs[name][0, 1] > batch.epochs[name][0, 0]]
    ends = [int(batch.epochs[name][0, 1]) - 1 for name in epochs]
    states = net.states_at(inputs, ends)  # (B, n_epochs, *state)
    directions = mpn_tasks.direction_index(batch.stim1_dir)
    u, s0, labels = [], [], {"epoch": [], "direction": []}
    for e, (name, end) in enumerate(zip(epochs, ends)):
        u.append(inputs[:, end])
        s0.append(states[:, e].reshape(len(batch.inputs), -1))
        labels["epoch"] += [mpn_tasks.EPOCH_NAMES.index(name)] * len(batch.inputs)
        labels["direction"] += list(directions)
    return torch.cat(u), torch.cat(s0), labels


def period_conditions(net, rules, cfg, io_mode):
    """Every rule's conditions stacked: u (K, n_in), s_0 (K, D), labels (K,) each."""
    u, s0, labels = [], [], {"rule": [], "epoch": [], "direction": []}
    for rule in rules:
        ur, sr, lr = rule_conditions(net, rule, cfg, io_mode)
        u.append(ur)
        s0.append(sr)
        labels["rule"] += [mpn_tasks.RULES.index(rule)] * len(ur)
        for key in ("epoch", "direction"):
            labels[key] += lr[key]
    return torch.cat(u), torch.cat(s0), {k: np.array(v) for k, v in labels.items()}


# ----------------------------------------------------------------------------------------
# The map F, its fixed points and its Jacobian


def step_map(net, state_shape):
    """F on flattened states: (K, D) states and (K, n_in) inputs -> (K, D) next states."""
    def F(s, u):
        return net.step(s.reshape(len(s), *state_shape), u).reshape(len(s), -1)
    return F


def constant_input_map(net, u):
    """s -> F(s, u) on flattened states (K, D) under the fixed inputs u (K, n_in), by the
    model's constant_input_step (the terms of u alone computed once)."""
    step, shape = net.constant_input_step(u), net.state_shape()
    return lambda s: step(s.reshape(len(s), *shape)).reshape(len(s), -1)


def relax(net, u, s, n_steps, tol=0.0, check_every=50):
    """s after n_steps of s <- F(s, u). With tol > 0 a condition stops as soon as its RMS
    step ‖F(s) − s‖/√D is below tol (checked every `check_every` steps): it then sits at a
    fixed point to tol, and the batch shrinks to the conditions still moving."""
    s = s.clone()
    idx, s_a, u_a = torch.arange(len(s)), s, u
    G = constant_input_map(net, u)
    with torch.no_grad():
        for t in range(1, n_steps + 1):
            new = G(s_a)
            if tol > 0 and t % check_every == 0:
                moving = ((new - s_a) ** 2).mean(1).sqrt() >= tol
                if not moving.all():
                    s[idx[~moving]] = new[~moving]
                    idx, new, u_a = idx[moving], new[moving], u_a[moving]
                    if not len(idx):
                        return s
                    G = constant_input_map(net, u_a)
            s_a = new
        s[idx] = s_a
    return s


def polish(F, u, s, iters, tol=0.0, round_iters=10):
    """Minimise q(s) = ½‖F(s) − s‖² (summed over conditions, which are independent) by
    L-BFGS with a strong-Wolfe line search, at most `iters` iterations. With tol > 0 the
    conditions whose RMS step is already below tol are left as they are, and the others stop
    once all of them are below tol (checked every `round_iters` iterations; L-BFGS keeps its
    history from round to round)."""
    todo = torch.ones(len(s), dtype=torch.bool) if tol <= 0 else \
        torch.as_tensor(rms_speed(F, u, s) >= tol)
    if iters == 0 or not todo.any():
        return s
    round_iters = iters if tol <= 0 else round_iters
    x, u_x = s[todo].clone().requires_grad_(True), u[todo]
    opt = torch.optim.LBFGS([x], max_iter=round_iters, tolerance_grad=1e-14,
                            tolerance_change=1e-16, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        q = 0.5 * ((F(x, u_x) - x) ** 2).sum()
        q.backward()
        return q

    for done in range(0, iters, round_iters):
        opt.param_groups[0]["max_iter"] = min(round_iters, iters - done)
        opt.step(closure)
        if tol > 0 and rms_speed(F, u_x, x.detach()).max() < tol:
            break
    s = s.clone()
    s[todo] = x.detach()
    return s


def rms_speed(F, u, s):
    with torch.no_grad():
        return ((F(s, u) - s) ** 2).mean(1).sqrt().numpy()


def jvp(net, u, s, v):
    """∂F/∂s (s) · v for one flattened state s (D,) under input u (n_in,), by the model's
    step_jvp (closed form for M, forward-mode autodiff for h)."""
    shape = (1, *net.state_shape())
    return net.step_jvp(s.reshape(shape), u[None], v.reshape(shape))[1].reshape(-1)


def linear_map(net, u, s):
    """v (D,) -> ∂F/∂s (s) · v at one flattened state s (D,) under input u (n_in,): the
    model's linearized_step, whose terms that do not depend on v are computed once (at
    N = 300 a product then costs 0.2 ms instead of 1-2 ms)."""
    shape = (1, *net.state_shape())
    _, tangent = net.linearized_step(s.reshape(shape), u[None])
    return lambda v: tangent(v.reshape(shape)).reshape(-1)


def moving_coordinates(J, D):
    """Mask (D,) of the coordinates whose row of the Jacobian J (a function v -> J v) is not
    zero, from two products with random vectors: a zero row (a clipped synapse, whose next
    value is the bound whatever the state) gives exactly 0 in both, a non-zero row gives an
    exact 0 with probability zero."""
    rng = np.random.default_rng(1)
    probes = [J(torch.as_tensor(rng.standard_normal(D))) for _ in range(2)]
    return ((probes[0] != 0) | (probes[1] != 0)).numpy()


def dense_jacobian(F, u, s):
    """The full D x D Jacobian (for checks at small D)."""
    return torch.func.jacfwd(lambda x: F(x[None], u[None])[0])(s).numpy()


def leading_eigenvalues(net, F, u, s, k):
    """The k eigenvalues of ∂F/∂s of largest modulus, in decreasing modulus.

    Coordinates whose Jacobian row is zero (clipped synapses: 30-60% of M at the points)
    are left out: with the others first, J = [[J_ff, J_fc], [0, 0]], so J's eigenvalues are
    J_ff's and zeros, and the k largest in modulus are J_ff's (zeros fill in when J_ff has
    fewer than k). J_ff's come from ARPACK on the matrix-free operator, or from a dense
    eigensolve when it is too small for ARPACK (fewer than k + 2 coordinates; its columns are
    products with unit vectors). M's spectrum is highly degenerate (λ on free synapses, a
    cluster around λ from the rank-one term of each unit), so ARPACK gets a random start, a
    wide Krylov space (60 vectors: on the CPU-preset run every point then matched the dense
    eigenvalues to 1e-9, where 40 vectors or a constant start missed some) and a bounded
    number of restarts; eigenvalues it has not converged are nan (counted in the output).
    On the untrained N = 64 net ~5% of points still miss (or leave nan) an eigenvalue of a
    cluster within 1e-5 of λ (checked against the per-unit closed form λ + η(1 − h_i²)
    Σ_free W_ij x_j²); at N = 300 none of 18 points checked did."""
    J, D = linear_map(net, u, s), s.numel()
    free = torch.as_tensor(np.flatnonzero(moving_coordinates(J, D)))
    n = len(free)

    full = s.new_zeros(D)  # its other coordinates stay 0

    def matvec(v):
        full[free] = torch.as_tensor(np.asarray(v, dtype=np.float64).ravel())
        return J(full)[free].numpy()

    if n < k + 2:
        J_ff = np.stack([matvec(e) for e in np.eye(n)], 1) if n else np.zeros((0, 0))
        vals = np.concatenate([np.linalg.eigvals(J_ff), np.zeros(min(D - n, k))])
    else:
        try:
            v0 = np.random.default_rng(0).standard_normal(n)  # a structured v0 missed some
            vals = eigs(LinearOperator((n, n), matvec=matvec, dtype=np.float64), k=k,
                        which="LM", v0=v0, tol=1e-6, return_eigenvectors=False,
                        ncv=min(n - 1, max(6 * k, 60)), maxiter=100)
        except ArpackNoConvergence as err:
            vals = np.asarray(err.eigenvalues)
    vals = vals[np.lexsort((-vals.imag, -np.abs(vals)))][:k]
    return np.pad(vals.astype(complex), (0, k - len(vals)), constant_values=np.nan)


# ----------------------------------------------------------------------------------------
# One network


def unique_rows(*arrays, decimals=9):
    """(first index, inverse) of the rows of the arrays taken together, equal after rounding
    to `decimals`: conditions that share input and state need one computation."""
    seen, first, inverse = {}, [], []
    for i, row in enumerate(zip(*arrays)):
        key = b"".join((np.round(np.asarray(r, dtype=np.float64), decimals) + 0.0).tobytes()
                       for r in row)
        if key not in seen:
            seen[key] = len(first)
            first.append(i)
        inverse.append(seen[key])
    return np.array(first), np.array(inverse)


def relax_and_polish(net, u, s0, cfg):
    """Relaxed, then polished, points of every condition, batch_values state values at a
    time. With relax_float32 the relaxing runs on a float32 copy of the network (its fixed
    points lie within ~1e-4 of float64's, rounding floor ~1e-8 in RMS step) and polishing in
    float64 takes the points the rest of the way."""
    F = step_map(net, net.state_shape())
    relax_net = copy.deepcopy(net).float() if cfg["relax_float32"] else net
    dtype = torch.float32 if cfg["relax_float32"] else s0.dtype
    size = max(1, cfg["batch_values"] // s0.shape[1])
    points = []
    for start in helper.progress(range(0, len(u), size), desc="relaxing", leave=False):
        sl = slice(start, start + size)
        s = relax(relax_net, u[sl].to(dtype), s0[sl].to(dtype), cfg["n_relax"], cfg["relax_tol"])
        points.append(polish(F, u[sl], s.to(s0.dtype), cfg["polish_iters"], cfg["polish_tol"]))
    return torch.cat(points)


def find_points(net, u, s0, cfg):
    """Points, RMS speeds and leading eigenvalues of every condition. Identical conditions
    (e.g. fix1 of every direction) are relaxed once, and conditions that reach the same
    point under the same input (e.g. every direction's delay) share one eigensolve."""
    F = step_map(net, net.state_shape())
    first, inverse = unique_rows(u.numpy(), s0.numpy(), decimals=12)
    s = relax_and_polish(net, u[first], s0[first], cfg)
    speed = rms_speed(F, u[first], s)
    first_p, inverse_p = unique_rows(u[first].numpy(), s.numpy())
    eigvals = np.array([leading_eigenvalues(net, F, u[first][k], s[k], cfg["n_eigs"])
                        for k in helper.progress(first_p, desc="eigenvalues", leave=False)])
    return (s.float().numpy()[inverse], speed[inverse], eigvals[inverse_p][inverse],
            len(first_p))


def pca_2d(points, starts):
    """PCA (2 components) of the points; the starting states projected on the same axes."""
    mean = points.mean(0)
    X = (points - mean).astype(np.float64)
    gram = X @ X.T  # K x K: cheap even when D = N²
    vals, vecs = np.linalg.eigh(gram)
    vals, vecs = np.clip(vals[::-1][:2], 0, None), vecs[:, ::-1][:, :2]
    comps = X.T @ vecs / np.where(vals > 0, np.sqrt(vals), 1.0)
    total = np.trace(gram)
    return {"points": X @ comps, "starts": (starts - mean) @ comps,
            "explained_variance_ratio": vals / total if total > 0 else np.zeros(2)}


def analyze_network(net, rules, cfg, io_mode):
    u, s0, labels = period_conditions(net, rules, cfg, io_mode)
    points, speed, eigvals, n_distinct = find_points(net, u, s0, cfg)
    out = dict(labels, speed=speed, fixed=speed < cfg["fixed_tol"], eigenvalues=eigvals,
               pca=pca_2d(points, s0.float().numpy()), n_distinct=n_distinct)
    if net.state_name == "M":
        bounds = net.init_args.get("m_bounds")
        out["clipped_fraction"] = (np.zeros(len(points)) if bounds is None else
                                   np.isin(points, np.float32(bounds)).mean(1))
        out["lam"] = float(net.decay().mean())
    return out


# ----------------------------------------------------------------------------------------
# Figures


def epoch_colors():
    import matplotlib.pyplot as plt
    return {name: plt.get_cmap("tab10")(i) for i, name in enumerate(mpn_tasks.EPOCH_NAMES)}


def plot_spectrum(ax, eigvals, lam, title, color):
    """Leading eigenvalues in the complex plane, zoomed on them (the unit circle and the
    circle |z| = λ appear as arcs), so eigenvalues bunched near λ stay visible."""
    from matplotlib.ticker import MaxNLocator
    z = eigvals[np.isfinite(eigvals)]
    theta = np.linspace(0, 2 * np.pi, 4000)
    ax.plot(np.cos(theta), np.sin(theta), color="k", lw=0.8, label="|z| = 1")
    if lam is not None:
        ax.plot(lam * np.cos(theta), lam * np.sin(theta), color="tab:red", lw=0.8, ls="--",
                label=f"|z| = λ = {lam:.3f}")
    ax.scatter(z.real, z.imag, s=8, alpha=0.5, color=color, linewidths=0)
    re = np.concatenate([z.real, [lam if lam is not None else 1.0, 1.0]])
    im_span = max(np.abs(z.imag).max(initial=0.0), 0.02)
    pad = 0.1 * max(np.ptp(re), 0.02)
    ax.set_xlim(re.min() - pad, re.max() + pad)
    ax.set_ylim(-1.2 * im_span, 1.2 * im_span)
    ax.xaxis.set_major_locator(MaxNLocator(3))
    ax.set_xlabel("Re eigenvalue")
    ax.set_ylabel("Im eigenvalue")
    ax.set_title(title)


def plot_leading_modulus(ax, results, lam):
    """Histogram of each point's largest |eigenvalue|, trained vs untrained."""
    for name, color in (("trained", "tab:blue"), ("untrained", "0.5")):
        if name in results:
            top = np.abs(results[name]["eigenvalues"][:, 0])
            top = top[np.isfinite(top)]  # fractions: the untrained net has fewer points
            ax.hist(top, bins=40, weights=np.full(len(top), 1 / max(len(top), 1)),
                    color=color, alpha=0.6, label=f"{name} ({len(top)})")
    if lam is not None:
        ax.axvline(lam, color="tab:red", ls="--", lw=1, label="λ")
    ax.axvline(1.0, color="k", lw=0.8, label="1 (stability edge)")
    ax.set_xlabel("largest |eigenvalue| at the point")
    ax.set_ylabel("fraction of points")
    ax.set_title("leading eigenvalue of every point")
    ax.legend(fontsize=7)


def figure_spectra(result, path):
    import matplotlib.pyplot as plt
    res, lam = result["trained"], result["trained"].get("lam")
    epochs = [e for e in range(len(mpn_tasks.EPOCH_NAMES)) if (res["epoch"] == e).any()]
    n_cols = min(4, len(epochs) + 1)
    n_rows = -(-(len(epochs) + 1) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.3 * n_cols, 3.0 * n_rows), squeeze=False)
    axes, colors = axes.ravel(), epoch_colors()
    for ax, e in zip(axes, epochs):
        name = mpn_tasks.EPOCH_NAMES[e]
        plot_spectrum(ax, res["eigenvalues"][res["epoch"] == e], lam,
                      f"{name} ({(res['epoch'] == e).sum()} points)", colors[name])
    axes[0].legend(fontsize=6, loc="lower left")
    plot_leading_modulus(axes[len(epochs)], result, lam)
    for ax in axes[len(epochs) + 1:]:
        ax.axis("off")
    fig.suptitle(f"{result['run']}: leading eigenvalues of ∂F/∂{result['state']} at the fixed "
                 f"and slow points, per task period", fontsize=9)
    fig.tight_layout()
    return helper.save_figure(fig, path)


def figure_pca(result, path):
    import matplotlib.pyplot as plt
    res, colors = result["trained"], epoch_colors()
    pca = res["pca"]
    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    for e, name in enumerate(mpn_tasks.EPOCH_NAMES):
        sel = res["epoch"] == e
        if not sel.any():
            continue
        for a, b in zip(pca["starts"][sel], pca["points"][sel]):
            ax.plot([a[0], b[0]], [a[1], b[1]], color=colors[name], lw=0.4, alpha=0.4)
        for kind, chosen in (("fixed", sel & res["fixed"]), ("slow", sel & ~res["fixed"])):
            if chosen.any():
                ax.scatter(*pca["points"][chosen].T, s=16, label=f"{name} {kind}",
                           facecolors=colors[name] if kind == "fixed" else "none",
                           edgecolors=colors[name])
    evr = pca["explained_variance_ratio"]
    ax.set_xlabel(f"PC1 ({100 * evr[0]:.0f}% var.)")
    ax.set_ylabel(f"PC2 ({100 * evr[1]:.0f}% var.)")
    ax.set_title(f"{result['run']}\nfixed (filled) and slow (open) points of "
                 f"{result['state']}; lines from the period-end state", fontsize=8)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    return helper.save_figure(fig, path)


# ----------------------------------------------------------------------------------------
# Stage


def chosen_rules(cfg, train_cfg):
    """The rules to analyse: the run's ruleset, or the configured subset of it."""
    trained = mpn_tasks.run_rules(train_cfg)
    if cfg["rules"] is None:
        return trained
    if isinstance(cfg["rules"], str) or not cfg["rules"] or \
            any(r not in trained for r in cfg["rules"]):
        raise helper.StageError(f"rules must be None or a non-empty list of the run's rules "
                                f"({', '.join(trained)}); got {cfg['rules']!r}.")
    return list(cfg["rules"])


def analyze_run(paths, cfg):
    nets, train_cfg, step = load_networks(paths, cfg["untrained_baseline"])
    rules = chosen_rules(cfg, train_cfg)
    result = {"run": paths.name, "step": step, "rules": rules, "networks": list(nets),
              "state": nets["trained"].state_name}
    with helper.single_thread():
        for name, net in nets.items():
            net_cfg = cfg if name == "trained" else \
                dict(cfg, trials_per_rule=cfg["untrained_trials_per_rule"])
            result[name] = analyze_network(net, rules, net_cfg,
                                           train_cfg.get("io_mode", "low_dim"))
    return result


def summary_line(result, name):
    res = result[name]
    top = np.abs(res["eigenvalues"][:, 0])
    text = (f"[{result['run']}] {name}: {len(top)} points ({res['n_distinct']} distinct), "
            f"{np.isnan(res['eigenvalues']).any(1).sum()} with unconverged eigenvalues, "
            f"{100 * res['fixed'].mean():.0f}% "
            f"fixed (median RMS speed {np.median(res['speed']):.2g}); largest |eigenvalue| "
            f"median {np.nanmedian(top):.4f} [{np.nanmin(top):.4f}, {np.nanmax(top):.4f}], "
            f"{100 * np.mean(top > 1):.0f}% above 1")
    if "lam" in res:
        text += (f"; λ = {res['lam']:.4f}, |leading − λ| < 1e-3 at "
                 f"{100 * np.mean(np.abs(top - res['lam']) < 1e-3):.0f}% of points; clipped "
                 f"synapses {100 * res['clipped_fraction'].mean():.0f}%")
    return text


def save_run(result, paths, cfg):
    arrays = {name: result[name] for name in result["networks"]}
    attrs = {k: result[k] for k in ("run", "step", "rules", "networks", "state")}
    helper.save_h5(paths.fixed_points, arrays, attrs=attrs, cfg=cfg,
                   inputs=[paths.checkpoint])
    for name in result["networks"]:
        print(summary_line(result, name))
    if not cfg["figures"]:
        return []
    return [figure_spectra(result, paths.figure("fixed_points_spectra")),
            figure_pca(result, paths.figure("fixed_points_pca"))]


def main(cfg):
    if min(cfg["trials_per_rule"], cfg["untrained_trials_per_rule"], cfg["n_eigs"],
           cfg["batch_values"]) < 1:
        raise helper.StageError("trials_per_rule, untrained_trials_per_rule, n_eigs and "
                                "batch_values must be at least 1.")
    helper.set_style()
    results, figures = helper.each_run(cfg, analyze_run, save_run)
    for path in figures:
        print(f"figure: {path}")
    return {"results": results, "figures": figures}


if __name__ == "__main__":
    helper.run_main(main, CONFIG)
