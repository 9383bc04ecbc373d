"""Task-variance matrices of a trained network (SPEC §5.2).

Reads:  runs/<aname>/checkpoint.pt (its config gives the rules and io_mode).
Writes: runs/<aname>/task_variance.h5: groups input, hidden, modulation (datasets normalized
        and unnormalized, 49 task-periods x columns; raw task variance, log1p is applied only
        when clustering) and modulation_weighted (unnormalized only: its normalized form
        equals modulation's exactly, SPEC §5.2), root dataset row_names, group perturbed
        (per perturbed design, input and hidden raw task variance: the stability designs of
        SPEC §5.3), group pca (per rule the stim1-direction-mean hidden trajectories on their
        first 3 PCs), and attrs: provenance, analysis config, run, checkpoint step, epoch
        windows, designs; runs/<aname>/figures/variance_*.png, weights.png, hidden_pca.png.
        Summaries across seeds and architectures: seed_summary.py.

Axis order: trials x time x units, (B, T, N). A modulation tensor M is (B, N_post, N_pre) and
a synapse column is its flattened post-major index `post * N_pre + pre`.

Trials: per rule its complete condition set (`mpn_tasks.condition_set`, SPEC §5.1): fixed by
the rule, noise-free, every epoch at `epoch_quantile` of its range; nothing is sampled, so the
matrices are a function of the network alone (two analyses give bit-identical files).

Task-periods, the two variance modes (`variance`: per_step or pooled), the representations
(input x, hidden h, modulation M, W ⊙ M) and forms are defined in variance_core.py, the
numerical core this stage shares with clustering.py. Vanilla-RNN and GRU runs have no
embedding and no M: only hidden.

Stability designs (SPEC §5.3): the same condition sets with input noise sigma_x =
`stability_input_noise` (one design per seed in range(`stability_seeds`)) and noise-free at each
of `stability_epoch_quantiles`; only input and hidden are recomputed (clustering re-chooses k on them).

Example:
    python multiple_task_analysis.py --run=everything_dmpn_seed749_L21e4_h300_b128
"""
import time

import numpy as np
import torch

import helper
import mpn
import mpn_tasks
from mpn_tasks import N_DIRS, direction_index
from variance_core import (
    FORMS, MODULATION_STREAMS, REP_FORMS, REP_TITLES, check_variance_mode,
    normalize_columns, rule_windows, task_periods, task_variance_matrix, variance_provenance)

CONFIG = dict(
    run="everything_dmpn_seed*",  # run name or glob (quote globs in the shell) {@run_pattern}
    runs_dir=None,  # runs root; None = $MPN_RUNS_DIR, else runs/ {None | @path}
    variance="per_step",  # "per_step": Yang's variance across conditions per step, averaged over the period; "pooled": the reference's direction means pooled over (direction, t) {per_step | pooled}
    epoch_quantile=1.0,  # epoch durations at this quantile of their ranges (1.0 = longest) {>= 0, <= 1}
    stability_seeds=5,  # stability designs: input-noise seeds of the condition set (0: none) {>= 0}
    stability_input_noise=0.01,  # sigma_x of those designs (SPEC §2.3 analysis noise) {> 0}
    stability_epoch_quantiles=[0.25, 0.5, 0.75],  # stability designs: noise-free, durations at these quantiles {each >= 0, <= 1}
    chunk_size=64,  # trials per forward pass (M stream: 64 x N^2 floats per step) {>= 1}
    device="auto",  # "auto" (cuda if available), "cpu" or "cuda" {@device}
    engine="auto",  # plastic-layer engine of mpn_engine: "auto", "fast" or "reference" {@engine}
    num_threads=1,  # torch CPU threads (0: default); N=300, shared 2 cores: 1 -> 28 s, 2 -> 380 s {>= 0}
    figures=True,  # draw the figures (the HDF5 file is written either way) {@bool}
)

ANALYSIS_KEYS = ("variance", "epoch_quantile", "stability_seeds", "stability_input_noise",
                 "stability_epoch_quantiles")  # what the variance file depends on
TRIAL_STREAM = 60  # second entry of the noise designs' numpy seed list, after the run seed


# ---------------------------------------------------------------------------------------
# Stage: run the trained network on the analysis trials, write the variance file
# ---------------------------------------------------------------------------------------

def analysis_trials(rules, run_seed=0, io_mode="low_dim", quantile=1.0, sigma_x=0.0, seed=0):
    """{rule: dict(inputs (B, T, n_in) float32, dirs (B,) stim1 direction index, windows)}:
    the rule's condition set (sorted by stim1 direction, as `pooled` streaming wants); with
    sigma_x > 0 the input noise is drawn from the seed list [run_seed, TRIAL_STREAM, seed]."""
    rng = np.random.default_rng([int(run_seed), TRIAL_STREAM, int(seed)]) if sigma_x > 0 else None
    trials = {}
    for rule in rules:
        batch = mpn_tasks.condition_set(rule, rng, quantile=quantile, sigma_x=sigma_x,
                                        io_mode=io_mode)
        dirs = direction_index(batch.stim1_dir)
        order = np.argsort(dirs, kind="stable")
        trials[rule] = dict(inputs=batch.inputs[order], dirs=dirs[order],
                            windows=rule_windows(batch))
    return trials


def stability_designs(cfg):
    """{name: dict(quantile, sigma_x, seed)} of the perturbed designs (SPEC §5.3)."""
    designs = {f"noise_seed{s}": dict(quantile=cfg["epoch_quantile"],
                                      sigma_x=cfg["stability_input_noise"], seed=s)
               for s in range(cfg["stability_seeds"])}
    designs.update({f"quantile_{q:g}": dict(quantile=float(q), sigma_x=0.0, seed=0)
                    for q in cfg["stability_epoch_quantiles"]})
    return designs


@torch.no_grad()
def run_rule(net, trials, chunk_size, acc=None):
    """x, h (B, T, N) float32 numpy of one rule's trials, run chunk by chunk; the M stream
    `acc` (or None) sees every chunk through the model's m_reduce callback."""
    p0 = next(net.parameters())
    xs, hs = [], []
    for start in range(0, len(trials["dirs"]), chunk_size):
        sl = slice(start, start + chunk_size)
        inputs = torch.as_tensor(trials["inputs"][sl], device=p0.device, dtype=p0.dtype)
        if acc is not None:
            acc.start_chunk(trials["dirs"][sl])
        out = net(inputs, record=("x",), m_reduce=acc)
        xs.append(out["x"].float().cpu().numpy())
        hs.append(out["h"].float().cpu().numpy())
    return np.concatenate(xs), np.concatenate(hs)


def compute_variances(net, trials, chunk_size, mode="per_step", modulation=True,
                      desc="task variance"):
    """(raw task-variance matrices {rep: (n_periods, n_columns)}, row names, per rule the
    stim1-direction means of h (n_dirs, T, N)). Modulation rows are streamed (never the M
    history) when `modulation`; vanilla/GRU nets give hidden only."""
    check_variance_mode(mode)
    rows = task_periods({rule: t["windows"] for rule, t in trials.items()})
    acc = None
    if net.plastic and modulation:
        n_post, n_pre = net.synapse_shape()
        acc = MODULATION_STREAMS[mode](rows, n_post, n_pre, device=net.synapse_weight().device)
    x_rows, h_rows, h_means = [], [], {}
    for rule, t in helper.progress(trials.items(), desc=desc, total=len(trials)):
        if acc is not None:
            acc.start_rule(rule, t["windows"], np.bincount(t["dirs"], minlength=N_DIRS))
        x, h = run_rule(net, t, chunk_size, acc)
        if acc is not None:
            acc.end_rule()
        one = ({rule: t["windows"]}, {rule: t["dirs"]}, mode)
        x_rows.append(task_variance_matrix({rule: x}, *one))
        h_rows.append(task_variance_matrix({rule: h}, *one))
        h_means[rule] = np.stack([h[t["dirs"] == k].mean(axis=0) for k in np.unique(t["dirs"])])
    raw = {"input": np.concatenate(x_rows)} if net.plastic else {}
    raw["hidden"] = np.concatenate(h_rows)
    if acc is not None:
        raw.update(modulation=acc.variance(),
                   modulation_weighted=acc.variance(weight=net.synapse_weight()))
    return raw, rows, h_means


def compute_stability(net, rules, cfg, run_seed, io_mode, name):
    """{design: {rep: raw (n_periods, n_columns)}} of input and hidden on each perturbed
    design (no modulation stream: the synapse clusterings are not re-chosen)."""
    out = {}
    for design, spec in stability_designs(cfg).items():
        trials = analysis_trials(rules, run_seed, io_mode, **spec)
        raw, _, _ = compute_variances(net, trials, cfg["chunk_size"], cfg["variance"],
                                      modulation=False, desc=f"{name} {design}")
        out[design] = raw
    return out


def hidden_pca(h_means, n_pc=3):
    """Per rule: its direction-mean hidden trajectories (n_dirs, T, N) projected on that rule's
    first n_pc principal components -> dict(trajectories (n_dirs, T, n_pc), explained (n_pc,)
    fraction of the trajectories' variance)."""
    out = {}
    for rule, m in h_means.items():
        flat = m.reshape(-1, m.shape[-1]).astype(np.float64)
        flat -= flat.mean(axis=0)
        _, s, vt = np.linalg.svd(flat, full_matrices=False)
        n = min(n_pc, len(s))
        total = (s ** 2).sum()
        out[rule] = dict(trajectories=(flat @ vt[:n].T).reshape(*m.shape[:2], n),
                         explained=s[:n] ** 2 / total if total > 0 else np.zeros(n))
    return out


def variance_arrays(raw):
    """{rep: {form: matrix}} as saved: raw ("unnormalized") and column-max ("normalized")
    forms, float32 (halves the file; far finer than the estimates' own precision), only the
    forms REP_FORMS lists (W ⊙ M normalized would duplicate M normalized)."""
    forms = {"normalized": normalize_columns, "unnormalized": lambda V: V}
    return {rep: {form: forms[form](V).astype(np.float32) for form in REP_FORMS[rep]}
            for rep, V in raw.items()}


def save_variance(paths, raw, rows, pca, trials, perturbed, attrs, provenance_cfg):
    """task_variance.h5: {rep: {form}}, row_names, perturbed/<design>/<rep>, pca/<rule>/..."""
    arrays = variance_arrays(raw)
    arrays["row_names"] = np.array(rows)
    arrays["perturbed"] = {d: {rep: V.astype(np.float32) for rep, V in reps.items()}
                           for d, reps in perturbed.items()}
    arrays["pca"] = {rule: {"trajectories": p["trajectories"].astype(np.float32),
                            "explained": p["explained"],
                            "directions": np.unique(trials[rule]["dirs"])}
                     for rule, p in pca.items()}
    helper.save_h5(paths.variance, arrays, attrs, cfg=provenance_cfg,
                   inputs=[paths.checkpoint])


def analyze_run(paths, cfg):
    """Variance matrices, stability designs, PCA trajectories and figures of one run;
    returns (raw matrices, row names, pca)."""
    t0 = time.time()
    net, train_cfg, step = mpn.load_run(paths, helper.get_device(cfg["device"]), cfg["engine"])
    rules, io_mode = mpn_tasks.run_rules(train_cfg), train_cfg.get("io_mode", "low_dim")
    trials = analysis_trials(rules, train_cfg["seed"], io_mode, quantile=cfg["epoch_quantile"])
    raw, rows, h_means = compute_variances(net, trials, cfg["chunk_size"], cfg["variance"],
                                           desc=f"{paths.name} task variance")
    perturbed = compute_stability(net, rules, cfg, train_cfg["seed"], io_mode, paths.name)
    attrs = dict(run=paths.name, net_type=net.net_type, checkpoint_step=step,
                 analysis={k: cfg[k] for k in ANALYSIS_KEYS},
                 windows={rule: t["windows"] for rule, t in trials.items()},
                 n_conditions={rule: len(t["dirs"]) for rule, t in trials.items()},
                 designs=stability_designs(cfg),
                 n_columns={rep: V.shape[1] for rep, V in raw.items()})
    pca = hidden_pca(h_means)
    save_variance(paths, raw, rows, pca, trials, perturbed, attrs,
                  variance_provenance(train_cfg, step, {k: cfg[k] for k in ANALYSIS_KEYS}))
    print(f"[{paths.name}] {len(rows)} task-periods x "
          f"{', '.join(f'{rep} {V.shape[1]}' for rep, V in raw.items())} columns, "
          f"{sum(attrs['n_conditions'].values())} conditions, {len(perturbed)} stability "
          f"designs in {time.time() - t0:.0f} s -> {paths.variance}")
    if cfg["figures"]:
        for path in make_figures(paths, net):
            print(f"figure: {path}")
    return raw, rows, pca


# ---------------------------------------------------------------------------------------
# Figures of one run (read the variance file and the network's weights)
# ---------------------------------------------------------------------------------------

def column_order(V):
    """Columns sorted by the task-period where they peak (row order), then by peak height."""
    return np.lexsort((-V.max(axis=0), V.argmax(axis=0)))


def plot_variance(ax, V, row_names, title, show_rows=True, vmin=None, vmax=None):
    """One task-variance matrix, columns sorted by peak task-period; returns the image."""
    # many more columns than pixels: antialias; otherwise show each column as it is
    interp = "antialiased" if V.shape[1] > 2000 else "nearest"
    im = ax.imshow(V[:, column_order(V)], aspect="auto", interpolation=interp,
                   vmin=vmin, vmax=vmax, cmap="magma")
    ax.set_yticks(np.arange(len(row_names)))
    ax.set_yticklabels(row_names if show_rows else [], fontsize=5.5)
    ax.set_xlabel(f"{V.shape[1]:,} columns\n(sorted by peak task-period)")
    ax.set_title(title)
    return im


def figure_variance(arrays, form, path):
    import matplotlib.pyplot as plt
    reps = [rep for rep in REP_TITLES if rep in arrays and form in arrays[rep]]
    rows = list(arrays["row_names"])
    fig, axes = plt.subplots(1, len(reps), figsize=(2.9 * len(reps) + 1.2, 7.0), squeeze=False,
                             constrained_layout=True)
    for i, (ax, rep) in enumerate(zip(axes[0], reps)):
        V = arrays[rep][form]
        if form == "normalized":
            im = plot_variance(ax, V, rows, REP_TITLES[rep], i == 0, 0.0, 1.0)
            label = "task variance / column max"
        else:  # log10 of the raw variance; zeros shown at the floor
            floor = max(V.max(), 1e-30) * 1e-6
            im = plot_variance(ax, np.log10(np.maximum(V, floor)), rows, REP_TITLES[rep], i == 0)
            label = "log10 task variance"
        if form != "normalized" or i == len(reps) - 1:
            fig.colorbar(im, ax=ax, shrink=0.6, label=label)
    fig.suptitle(f"task variance ({form}): rows = task-periods")
    return helper.save_figure(fig, path)


WEIGHT_LABELS = {  # parameter name -> (title, row label, column label)
    "W_in": ("W_in (input)", "hidden unit (gates stacked for GRU)", "input channel u"),
    "mp.W": ("W (plastic layer)", "hidden unit (post)", "embedding unit x (pre)"),
    "mp.W_rec": ("W_rec (plastic layer)", "hidden unit (post)", "hidden unit (pre)"),
    "W_rec": ("W_rec (recurrent)", "hidden unit (post)", "hidden unit (pre)"),
    "W_out": ("W_outᵀ (readout, transposed)", "hidden unit", "output channel"),
}


def weight_matrices(net):
    """[(title, matrix (rows, cols), row label, column label)] of the net's 2-D weights as
    (post, pre), readout last and transposed so that each panel has one row per unit."""
    out = []
    for name, p in net.named_parameters():
        w = p.detach().float().cpu().numpy()
        if w.ndim != 2 or min(w.shape) < 2:
            continue
        title, ylabel, xlabel = WEIGHT_LABELS.get(name, (name, "post", "pre"))
        if name == "W_in" and net.plastic:
            title, ylabel = "W_in (embedding)", "embedding unit x"
        w = w.T if name == "W_out" else w
        out.append((f"{title}\n{w.shape[0]} x {w.shape[1]}", w, ylabel, xlabel))
    return sorted(out, key=lambda item: item[0].startswith("W_out"))


def figure_weights(net, path):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    mats = weight_matrices(net)
    ratios = [float(np.clip(m.shape[1] / max(m.shape[0], 1), 0.2, 1.0)) for _, m, _, _ in mats]
    fig, axes = plt.subplots(1, len(mats), figsize=(2.0 + 4.0 * sum(ratios), 4.4), squeeze=False,
                             gridspec_kw={"width_ratios": ratios}, constrained_layout=True)
    for ax, (title, w, ylabel, xlabel) in zip(axes[0], mats):
        lim = float(np.abs(w).max()) or 1.0
        im = ax.imshow(w, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim,
                       interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        fig.colorbar(im, ax=ax, shrink=0.7, label="weight")
    fig.suptitle("weight matrices (post x pre)")
    return helper.save_figure(fig, path)


def plot_pca_rule(ax, traj, directions, windows, rule, explained):
    """Direction-mean hidden trajectories of one rule on its first PCs (3-D if available)."""
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("hsv")
    go = windows.get("go1", (None,))[0]
    stim = windows.get("stim1", (None,))[0]
    for traj_k, k in zip(traj, directions):
        pts = [traj_k[:, i] for i in range(traj.shape[-1])]
        color = cmap(k / N_DIRS)
        ax.plot(*pts, color=color, lw=0.9)
        for step, marker in ((stim, "o"), (go, "^")):
            if step is not None and step < traj.shape[1]:
                ax.scatter(*[p[step:step + 1] for p in pts], color=color, marker=marker, s=10,
                           edgecolors="k", linewidths=0.4)
    ax.set_title(f"{rule} ({100 * explained.sum():.0f}% var)", fontsize=8, pad=0)
    ax.tick_params(labelsize=5, pad=0)
    ax.locator_params(nbins=4)
    for i, setter in enumerate((ax.set_xlabel, ax.set_ylabel, getattr(ax, "set_zlabel", None))):
        if setter is not None and i < traj.shape[-1]:
            setter(f"PC{i + 1}", fontsize=6, labelpad=-8)


def figure_pca(pca, windows, path):
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    rules = list(pca)
    ncols = min(5, len(rules))
    nrows = int(np.ceil(len(rules) / ncols))
    fig = plt.figure(figsize=(2.5 * ncols, 2.5 * nrows + 0.6))
    for i, rule in enumerate(rules):
        traj = pca[rule]["trajectories"]
        ax = fig.add_subplot(nrows, ncols, i + 1,
                             projection="3d" if traj.shape[-1] == 3 else None)
        plot_pca_rule(ax, traj, pca[rule]["directions"], windows[rule], rule,
                      pca[rule]["explained"])
    cmap = plt.get_cmap("hsv")
    handles = [Line2D([], [], color=cmap(k / N_DIRS), label=f"{45 * k}°") for k in range(N_DIRS)]
    handles += [Line2D([], [], ls="", marker=m, color="grey", markeredgecolor="k", label=lab)
                for m, lab in (("o", "stim1 onset"), ("^", "go onset"))]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7,
               title="stim1 direction (mean over trials)", title_fontsize=7)
    fig.suptitle("hidden-state trajectories on each rule's first 3 PCs", y=0.995)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.08, wspace=0.05, hspace=0.12)
    return helper.save_figure(fig, path)


def make_figures(paths, net):
    """Every figure of the analysis stage, from the variance file and the weights."""
    helper.set_style()
    arrays, attrs = helper.load_h5(paths.variance)
    figures = [figure_variance(arrays, form, paths.figure(f"variance_{form}")) for form in FORMS]
    figures.append(figure_weights(net, paths.figure("weights")))
    windows = {rule: {e: tuple(w) for e, w in ws.items()} for rule, ws in attrs["windows"].items()}
    pca = {rule: arrays["pca"][rule] for rule in attrs["windows"]}  # rule order, not h5's
    figures.append(figure_pca(pca, windows, paths.figure("hidden_pca")))
    return figures


# ---------------------------------------------------------------------------------------


def check_config(cfg):
    """One sentence for a setting the analysis cannot use."""
    check_variance_mode(cfg["variance"])
    quantiles = [cfg["epoch_quantile"], *cfg["stability_epoch_quantiles"]]
    if not all(0.0 <= q <= 1.0 for q in quantiles):
        raise helper.StageError(f"duration quantiles must lie in [0, 1], got {quantiles}.")
    if cfg["stability_seeds"] < 0 or cfg["stability_input_noise"] <= 0 or cfg["chunk_size"] < 1:
        raise helper.StageError("stability_seeds must be >= 0, stability_input_noise > 0 and "
                                "chunk_size >= 1.")


def main(cfg):
    """Analyse every run matching cfg["run"]; returns {aname: (raw matrices, row names, pca)}."""
    check_config(cfg)
    threads = torch.get_num_threads()
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    try:
        out = {}
        for paths in helper.find_runs(cfg["run"], cfg["runs_dir"]):
            with helper.run_lock(paths.dir):
                out[paths.name] = analyze_run(paths, cfg)
        return out
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    helper.run_main(main, CONFIG)
