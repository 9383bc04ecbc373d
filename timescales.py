"""Timescales of the plastic matrix M and of the hidden units (SPEC §7.4).

1. M: from the state M_0 a trial reaches under the (noisy) fixation input, the network runs
   on zero input for `m_decay_steps`: with x = 0 the Hebbian term vanishes and each synapse
   decays as λ^t, so log|M_ij(t)| is a line of slope ln λ per step; the fitted timescale
   −dt / slope (per synapse, and of the norm ‖M_t‖) must equal −dt / ln λ (3980 ms at
   λ = 0.99).
2. Hidden units, per architecture: each rule's fixation input (fixation cue and rule cue, the
   first step of a noise-free aligned trial) held for `burn_in_steps` + `n_steps` with input
   noise `input_noise` (SPEC §2.3 scaling); after the burn-in, the autocorrelation ρ_i(k) of
   each unit's activity (trial means removed, pooled over trials) at lags k = 1..
   `max_lag_steps` is fitted with A·exp(−k·dt/τ_i) + B (scipy curve_fit; lag 0 is left out, as
   in the intrinsic-timescale literature, since the noise adds a white component there). A
   unit whose ρ(1) is within the noise floor 2/√(samples) has no measurable timescale (nan).
   Baselines: the untrained network (the run's seeded step-0 weights) and the input itself
   (white noise: no unit of it passes the floor).
Architectures and seeds are compared by seed_summary.py (median unit timescale per run).

Reads:  runs/<aname>/checkpoint.pt.
Writes: runs/<aname>/timescales.h5 (per network: per-unit τ, A, autocorrelations; M's per-
        synapse and norm timescales) and runs/<aname>/figures/timescales.png.

Axis order: trials x time x units, (B, T, N).

Example:
    python timescales.py --run=everything_dmpn_seed749_L21e4_h64_b32
    python timescales.py --run='everything_*_seed749_*'
"""
import numpy as np
import torch

import helper
import mpn
import mpn_tasks
from mpn_tasks import DT_MS

CONFIG = dict(
    run="everything_dmpn_seed*",  # run name or glob (quote globs in the shell) {@run_pattern}
    runs_dir=None,  # runs root; None = $MPN_RUNS_DIR, else runs/ {None | @path}
    trials_per_rule=2,  # noisy fixation trials per rule (each rule's own fixation input) {>= 1}
    burn_in_steps=250,  # steps dropped before measuring (10 s; M settles with τ ≈ 4 s) {>= 0}
    n_steps=500,  # steps measured per trial after the burn-in (500 = 20 s) {>= 20}
    input_noise=0.1,  # sigma_x of the input noise that drives the fluctuations {> 0}
    max_lag_steps=25,  # autocorrelation lags fitted, 1..max_lag_steps (25 = 1 s) {>= 3}
    m_decay_steps=250,  # zero-input steps over which M's decay is fitted (250 = 10 s) {>= 10}
    trial_seed=0,  # seed of the numpy Generator drawing the input noise {>= 0}
    untrained_baseline=True,  # also analyse the untrained network (the run's step-0 weights) {@bool}
    figures=True,  # draw the figures {@bool}
)

MAX_SYNAPSES = 20_000  # synapses whose own decay is fitted (trials x N_post x N_pre in all)


# ----------------------------------------------------------------------------------------
# Plain estimators (numpy in, numpy out)


def autocorrelation(x, max_lag):
    """ρ(k), k = 0..max_lag, of each unit of x (B, T, N): trial means removed, lag products
    and variances pooled over trials and time. Zero-variance units give nan."""
    x = x - x.mean(1, keepdims=True)
    var = (x ** 2).sum((0, 1))
    rho = np.stack([(x[:, :x.shape[1] - k] * x[:, k:]).sum((0, 1)) for k in range(max_lag + 1)])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 1e-20, rho / var, np.nan)


def fit_exponential(rho, dt_ms, floor):
    """(τ ms, A) of ρ(k) ≈ A·exp(−k·dt/τ) + B over lags k ≥ 1 for each column of rho (K+1, N);
    the offset B absorbs the negative bias that removing each trial's mean puts on every lag
    (Murray et al. 2014 fit the same form). nan where ρ(1) is below `floor` (no memory
    measurable at one step), the fit fails, or τ is unresolvable from these lags (below half a
    step, or above 20 x the longest lag: a flat autocorrelation)."""
    from scipy.optimize import curve_fit
    lags = np.arange(1, rho.shape[0]) * dt_ms
    tau, amp = np.full(rho.shape[1], np.nan), np.full(rho.shape[1], np.nan)
    for i in range(rho.shape[1]):
        r = rho[1:, i]
        if not np.isfinite(r).all() or r[0] < floor:
            continue
        guess = -dt_ms / np.log(np.clip(r[1] / r[0], 1e-3, 0.999)) if r[1] > 0 else dt_ms
        try:
            (a, t, _), _ = curve_fit(lambda k, a, t, b: a * np.exp(-k / t) + b, lags, r,
                                     p0=(r[0], guess, 0.0), bounds=([0, 1e-3, -1], [2, 1e7, 1]),
                                     maxfev=4000)
        except RuntimeError:
            continue
        if dt_ms / 2 <= t <= 20 * lags[-1]:  # outside: no decay resolvable in the window
            tau[i], amp[i] = t, a
    return tau, amp


def decay_timescale(norms, dt_ms):
    """−dt / slope of a least-squares line through log(norms) over time (norms (T, ...));
    one timescale per trailing index, nan where a series is not positive throughout."""
    norms = np.asarray(norms, dtype=np.float64)
    t = np.arange(len(norms))
    flat = norms.reshape(len(norms), -1)
    ok = (flat > 0).all(0)
    slope = np.full(flat.shape[1], np.nan)
    if ok.any():
        slope[ok] = np.polyfit(t, np.log(flat[:, ok]), 1)[0]
    with np.errstate(divide="ignore"):
        return (-dt_ms / slope).reshape(norms.shape[1:])


# ----------------------------------------------------------------------------------------
# Running the networks


def fixation_inputs(rules, cfg, io_mode, n_in_steps):
    """Noisy fixation inputs (R·trials_per_rule, T, n_in): each rule's first input step
    (fixation and rule cues), held, plus N(0, 1)·sigma_x·√(2/0.8) noise on every channel."""
    rng = np.random.default_rng(cfg["trial_seed"])
    base = np.stack([mpn_tasks.aligned_batch(rule, 1, np.random.default_rng(0),
                                             io_mode=io_mode).inputs[0, 0] for rule in rules])
    base = np.repeat(base, cfg["trials_per_rule"], axis=0)[:, None, :]
    noise = rng.standard_normal((len(base), n_in_steps, base.shape[-1]))
    return base + noise * cfg["input_noise"] * mpn_tasks.NOISE_SCALE


def unit_timescales(x, cfg):
    """Per-unit autocorrelation (lags 0..max_lag) and exponential fit of x (B, T, N)."""
    rho = autocorrelation(x, cfg["max_lag_steps"])
    floor = 2.0 / np.sqrt(x.shape[0] * x.shape[1])
    tau, amp = fit_exponential(rho, DT_MS, floor)
    return {"tau_ms": tau, "amplitude": amp, "autocorrelation": rho, "floor": floor}


def hidden_timescales(net, inputs, cfg):
    """unit_timescales of h after the burn-in."""
    with torch.no_grad():
        h = net(torch.as_tensor(inputs))["h"].numpy()
    return unit_timescales(h[:, cfg["burn_in_steps"]:], cfg)


class LogLineFit:
    """Least-squares line through log y_t against t = 0, 1, ..., for many series at once,
    from running sums (the series are never stored): −dt / slope is their timescale."""

    def __init__(self):
        self.n = self.st = self.stt = 0.0
        self.sy = self.sty = self.valid = None

    def add(self, y):
        # in place: a new array kept per step would pin freed M-sized blocks below it on the
        # heap (measured: +17 MB per step at N = 300)
        y = np.asarray(y, dtype=np.float64)
        if self.sy is None:
            self.sy, self.sty = np.zeros_like(y), np.zeros_like(y)
            self.valid = np.ones(y.shape, dtype=bool)
        self.valid &= y > 0
        logy = np.log(np.where(y > 0, y, 1.0))
        t = self.n
        self.sy += logy
        self.sty += t * logy
        self.n, self.st, self.stt = self.n + 1, self.st + t, self.stt + t * t

    def timescale(self, dt_ms):
        slope = (self.n * self.sty - self.st * self.sy) / (self.n * self.stt - self.st ** 2)
        with np.errstate(divide="ignore"):
            return np.where(self.valid, -dt_ms / slope, np.nan)


def m_decay(net, inputs, n_steps):
    """M from the end of the noisy fixation trials, then n_steps at zero input: ‖M_t‖ per
    trial, per-synapse timescales (of up to MAX_SYNAPSES synapses with M_0 ≠ 0, a seeded
    sample) and the theory −dt/ln λ. Streamed: the M history is never held."""
    with torch.no_grad():
        M = net.states_at(torch.as_tensor(inputs), [inputs.shape[1] - 1])[:, 0]
        nonzero = torch.nonzero(M.reshape(-1).abs() > 1e-12)[:, 0]
        pick = np.random.default_rng(0).permutation(len(nonzero))[:MAX_SYNAPSES]
        tracked = nonzero[np.sort(pick)]  # a fixed sample bounds the per-step work at N = 300
        zero = torch.zeros(inputs.shape[-1], dtype=M.dtype)
        norms, fit = np.zeros((n_steps + 1, len(M))), LogLineFit()
        for t in range(n_steps + 1):
            if t:
                M = net.step(M, zero)
            norms[t] = torch.linalg.vector_norm(M.reshape(len(M), -1), dim=1).numpy()
            fit.add(M.reshape(-1)[tracked].abs().numpy())
    lam = net.decay().numpy()
    return {"norm": norms, "tau_norm_ms": decay_timescale(norms, DT_MS),
            "tau_synapse_ms": fit.timescale(DT_MS),
            "tau_theory_ms": float(np.mean(-DT_MS / np.log(np.broadcast_to(lam, M.shape[1:]))))}


def analyze_network(net, inputs, cfg):
    out = {"hidden": hidden_timescales(net, inputs, cfg)}
    if net.state_name == "M":
        out["M"] = m_decay(net, inputs, cfg["m_decay_steps"])
    return out


# ----------------------------------------------------------------------------------------
# Figures: one function per panel, taking data and an ax


NET_COLORS = {"trained": "tab:blue", "untrained": "0.5"}


def log_bins(values, n=30):
    v = values[np.isfinite(values) & (values > 0)]
    lo, hi = (v.min(), v.max()) if v.size else (DT_MS, 10 * DT_MS)
    return np.geomspace(min(lo, DT_MS) * 0.8, max(hi, 10 * DT_MS) * 1.25, n)


def plot_lag1(ax, result):
    """Lag-1 autocorrelation of every hidden unit (trained, untrained) and input channel,
    against the noise floor below which no timescale is fitted."""
    groups = {name: result[name]["hidden"]["autocorrelation"][1] for name in result["networks"]}
    groups["input channels"] = result["input"]["autocorrelation"][1]
    values = np.concatenate([v[np.isfinite(v)] for v in groups.values()])
    bins = np.linspace(min(values.min(), -0.1), max(values.max(), 0.1), 40)
    colors = dict(NET_COLORS, **{"input channels": "tab:orange"})
    for name, rho1 in groups.items():
        ax.hist(rho1[np.isfinite(rho1)], bins=bins, color=colors[name], alpha=0.55, label=name)
    ax.axvspan(-result["input"]["floor"], result["input"]["floor"], color="tab:red", alpha=0.15,
               label="noise floor ± 2/√samples")
    ax.set_xlabel("autocorrelation at lag 1 (40 ms)")
    ax.set_ylabel("units / channels")
    ax.set_title(f"{result['net_type']}: one-step memory of each unit")
    ax.legend(fontsize=6)


def plot_tau_hist(ax, result):
    """Per-unit hidden timescales, trained vs untrained, with M's decay timescale."""
    taus = {name: result[name]["hidden"]["tau_ms"] for name in result["networks"]}
    bins = log_bins(np.concatenate(list(taus.values())))
    for name, tau in taus.items():
        ok = np.isfinite(tau)
        med = f"median {np.median(tau[ok]):.0f} ms" if ok.any() else "no unit above the noise floor"
        ax.hist(tau[ok], bins=bins, color=NET_COLORS[name], alpha=0.6,
                label=f"{name}: {med}, {ok.sum()}/{tau.size} units fitted")
    if "M" in result["trained"]:
        ax.axvline(result["trained"]["M"]["tau_theory_ms"], color="tab:red", ls="--",
                   label="M decay −dt/ln λ")
    if not any(np.isfinite(t).any() for t in taus.values()):
        ax.text(0.5, 0.5, "no unit above the noise floor:\nno measurable timescale of h",
                transform=ax.transAxes, ha="center", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("unit timescale τ (ms)")
    ax.set_ylabel("hidden units")
    ax.set_title("hidden-unit timescales (exponential fit)")
    ax.legend(fontsize=6, loc="upper left")


def plot_autocorrelations(ax, hidden, n_show=6):
    """Autocorrelation of the units with the most, median and least τ, with their fits."""
    rho, tau, amp = hidden["autocorrelation"], hidden["tau_ms"], hidden["amplitude"]
    lags_ms = np.arange(len(rho)) * DT_MS
    ok = np.flatnonzero(np.isfinite(tau))
    if not ok.size:  # nothing fitted: show the spread of all units' autocorrelations
        lo, mid, hi = np.nanpercentile(rho, [10, 50, 90], axis=1)
        ax.fill_between(lags_ms, lo, hi, color="tab:blue", alpha=0.3, label="units, 10-90%")
        ax.plot(lags_ms, mid, color="tab:blue", label="units, median")
    order = ok[np.argsort(tau[ok])]
    show = order[np.linspace(0, len(order) - 1, min(n_show, len(order))).astype(int)]
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("viridis")
    for j, i in enumerate(show):
        color = cmap(j / max(len(show) - 1, 1))
        ax.plot(lags_ms, rho[:, i], "o", ms=2.5, color=color)
        ax.plot(lags_ms[1:], amp[i] * np.exp(-lags_ms[1:] / tau[i]), color=color, lw=1,
                label=f"unit {i}: τ = {tau[i]:.0f} ms")
    ax.axhline(hidden["floor"], color="0.5", ls=":", lw=1, label="noise floor")
    ax.set_xlabel("lag (ms)")
    ax.set_ylabel("autocorrelation")
    ax.set_title("trained: autocorrelations (dots) and fits from lag 1")
    ax.legend(fontsize=6)


def plot_m_decay(ax, m):
    """‖M_t‖ / ‖M_0‖ at zero input, per trial, against λ^t."""
    rel = m["norm"] / m["norm"][:1]
    t_s = np.arange(len(rel)) * DT_MS / 1000
    ax.plot(t_s, rel, color="tab:blue", lw=0.6, alpha=0.5)
    ax.plot(t_s, np.exp(-t_s * 1000 / m["tau_theory_ms"]), color="tab:red", ls="--",
            label=f"λ^t (τ = −dt/ln λ = {m['tau_theory_ms']:.0f} ms)")
    syn = m["tau_synapse_ms"]
    ax.set_yscale("log")
    ax.set_xlabel("time at zero input (s)")
    ax.set_ylabel("‖M_t‖ / ‖M_0‖")
    ax.set_title(f"M at zero input: fitted τ {np.nanmedian(m['tau_norm_ms']):.0f} ms (norm),\n"
                 f"{np.nanmedian(syn):.0f} ms (median synapse)")
    ax.legend(fontsize=6)


def figure_run(result, path):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(10.5, 7.6))
    axes = axes.ravel()
    plot_lag1(axes[0], result)
    plot_tau_hist(axes[1], result)
    plot_autocorrelations(axes[2], result["trained"]["hidden"])
    if "M" in result["trained"]:
        plot_m_decay(axes[3], result["trained"]["M"])
    else:
        axes[3].axis("off")
    fig.suptitle(result["run"], fontsize=8)
    fig.tight_layout()
    return helper.save_figure(fig, path)


# ----------------------------------------------------------------------------------------
# Stage


def analyze_run(paths, cfg):
    net, train_cfg, step = mpn.load_run(paths)
    nets = mpn.with_untrained(net.double().requires_grad_(False), cfg["untrained_baseline"])
    rules = mpn_tasks.run_rules(train_cfg)
    inputs = fixation_inputs(rules, cfg, train_cfg.get("io_mode", "low_dim"),
                             cfg["burn_in_steps"] + cfg["n_steps"])
    result = {"run": paths.name, "step": step, "net_type": net.net_type, "networks": list(nets),
              "input": unit_timescales(inputs[:, cfg["burn_in_steps"]:], cfg)}
    with helper.single_thread():
        for name, net in helper.progress(nets.items(), desc="networks", leave=False):
            result[name] = analyze_network(net, inputs, cfg)
    return result


def summary_lines(result):
    lines = []
    for name in result["networks"]:
        tau = result[name]["hidden"]["tau_ms"]
        ok = np.isfinite(tau)
        q = np.percentile(tau[ok], [25, 50, 75]) if ok.any() else [np.nan] * 3
        line = (f"[{result['run']}] {name} h: τ median {q[1]:.0f} ms (IQR {q[0]:.0f}-{q[2]:.0f}),"
                f" {ok.sum()}/{tau.size} units above the noise floor")
        if "M" in result[name]:
            m = result[name]["M"]
            line += (f"; M decay τ {np.nanmedian(m['tau_norm_ms']):.1f} ms (norm), "
                     f"{np.nanmedian(m['tau_synapse_ms']):.1f} ms (synapse median) vs "
                     f"−dt/ln λ = {m['tau_theory_ms']:.1f} ms")
        lines.append(line)
    inp = result["input"]["tau_ms"]
    lines.append(f"[{result['run']}] input channels: {np.isfinite(inp).sum()}/{inp.size} above "
                 f"the noise floor (white noise: expect 0)")
    return lines


def save_run(result, paths, cfg):
    arrays = {name: result[name] for name in ("input", *result["networks"])}
    attrs = {k: result[k] for k in ("run", "step", "net_type", "networks")}
    helper.save_h5(paths.timescales, arrays, attrs=attrs, cfg=cfg,
                   inputs=[paths.checkpoint])
    for line in summary_lines(result):
        print(line)
    return [figure_run(result, paths.figure("timescales"))] if cfg["figures"] else []


def check_config(cfg):
    if cfg["max_lag_steps"] < 3 or cfg["n_steps"] < 2 * cfg["max_lag_steps"]:
        raise helper.StageError(f"max_lag_steps must be >= 3 and n_steps at least twice it; got "
                                f"{cfg['max_lag_steps']} and {cfg['n_steps']}.")
    if cfg["input_noise"] <= 0 or cfg["trials_per_rule"] < 1 or cfg["m_decay_steps"] < 10:
        raise helper.StageError("input_noise must be > 0, trials_per_rule >= 1 and "
                                "m_decay_steps >= 10.")


def main(cfg):
    check_config(cfg)
    helper.set_style()
    results, figures = helper.each_run(cfg, analyze_run, save_run)
    for path in figures:
        print(f"figure: {path}")
    return {"results": results, "figures": figures}


if __name__ == "__main__":
    helper.run_main(main, CONFIG)
