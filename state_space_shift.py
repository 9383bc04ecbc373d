"""State-space geometry of trained networks across rules (SPEC §7), for the hidden activity h,
the modulation M (flattened) and the effective modulation W ⊙ M.

On `aligned` trials (every trial of a rule shares its epoch boundaries; trial i has stimulus
direction i % 8) with input noise sigma_x = 0.01:
  1. context-end PCA: the state at the last step before stimulus onset (stim1 onset − 1; the
     go1 onset − 1 for react rules, whose stimulus appears at go1), one point per trial,
     2-component PCA, coloured by rule and by task family;
  2. shift test: for every pair of rules and every stimulus direction, the distance between
     their pre-stimulus states vs the angle between their one-step displacements at stimulus
     onset (state at onset − state just before), each averaged over the cross-rule trial pairs
     of that direction; angle = slope · distance fitted through the origin, with the Pearson r
     and p (scipy.stats.pearsonr) of the points (p is nominal: the points share rules, so
     they are not independent);
  3. subspace angles (scipy.linalg.subspace_angles) between the rules' hidden-activity
     subspaces (top `subspace_dim` PCs of each rule's h over all steps of its trials), as a
     rules x rules heatmap of the mean (or max) principal angle in degrees.

The state at step t is what the network holds after processing input t: h_t, and
M_t = clip(λ M_{t−1} + η h_t x_tᵀ) (the matrix h_{t+1} will use), so the onset displacement
of M contains the stimulus's own Hebbian update. M is streamed through the model's
`m_reduce(t, M_{t−1})` callback and kept only at the two steps each rule needs; the full
history never exists. Vanilla-RNN and GRU runs have no M: only h is analysed.

Reads:  runs/<aname>/checkpoint.pt (its config gives the rules and io_mode).
Writes: runs/<aname>/state_space.pkl and runs/<aname>/figures/state_space_*.png; with
        several runs also runs/summary/state_space_summary.pkl and state_space_shift_r.png
        (shift-test r per representation, mean ± s.d. over runs).

Axis order: trials x time x units, (B, T, N); flattened synapses are post-major
(column i_post * N_pre + j_pre).

Example:
    python state_space_shift.py --run=everything_dmpn_seed749_L21e4_h300_b128
    python state_space_shift.py --run='everything_dmpn_seed*'
"""
import numpy as np
import torch

import helper

CONFIG = dict(
    run="everything_dmpn_seed*",  # run name or glob (quote globs in the shell)
    runs_dir=None,  # runs root; None = $MPN_RUNS_DIR, else runs/
    trials_per_rule=16,  # aligned trials per rule (trial i has stimulus direction i % 8)
    epoch_quantile=1.0,  # epoch durations at this quantile of their ranges (1.0 = longest)
    input_noise=0.01,  # sigma_x of the analysis trials (SPEC §2.3: 0.01 for analysis)
    trial_seed=0,  # seed of the numpy Generator drawing the analysis trials
    subspace_dim=3,  # top PCs of a rule's hidden activity spanning its subspace
    subspace_stat="mean",  # principal angles summarised by "mean" or "max" in the heatmap
    device="auto",  # "auto" (cuda if available), "cpu" or "cuda"
)

PRODUCER = "python state_space_shift.py"
REPRESENTATIONS = ("hidden", "M", "WM")  # h; M flattened; W ⊙ M flattened
REP_LABELS = {"hidden": "hidden h", "M": "modulation M", "WM": "W ⊙ M"}
N_DIRS = 8  # stimulus directions 0, 45, ..., 315 degrees


def family_of(rule):
    """Task family (Go/Anti, Reaction, Delay, Decision-making, Match) of a rule."""
    import mpn_tasks
    return mpn_tasks.RULE_GROUPS[rule]


def family_names():
    """The task families in rule order."""
    import mpn_tasks
    return list(dict.fromkeys(mpn_tasks.RULE_GROUPS.values()))


# ----------------------------------------------------------------------------------------
# Loading and running a network


def run_rules(train_cfg):
    """The rules a run was trained on, in SPEC order."""
    import mpn_tasks
    return list(mpn_tasks.RULESETS[train_cfg["ruleset"]])


def load_network(paths, device):
    """(net in eval mode, training config, checkpoint step) of one run."""
    import net_helpers
    ckpt = net_helpers.load_checkpoint(paths.checkpoint)
    net = net_helpers.model_from_checkpoint(ckpt, device=device).eval()
    return net, ckpt["config"], int(ckpt["step"])


def onset_step(batch):
    """Stimulus-onset step shared by the trials of an aligned batch: stim1 onset, or the go1
    onset for rules without a stim1 epoch (react: the stimulus appears at go1)."""
    epochs = batch.epochs
    has_stim1 = "stim1" in epochs and np.all(epochs["stim1"][:, 0] >= 0)
    starts = epochs["stim1"][:, 0] if has_stim1 else epochs["go1"][:, 0]
    if np.unique(starts).size != 1:
        raise ValueError("stimulus onset differs across trials; use an aligned batch")
    return int(starts[0])


def trial_directions(batch):
    """Stimulus-1 direction index (0..7) per trial."""
    index = np.arange(len(batch.rule)) % N_DIRS
    dirs = np.asarray(batch.stim1_dir, dtype=float)
    ok = np.isfinite(dirs)
    index[ok] = np.round(dirs[ok] / (2 * np.pi / N_DIRS)).astype(int) % N_DIRS
    return index


def m_capture(steps):
    """A m_reduce callback keeping M_{t−1}, flattened (B, N_post·N_pre), at the given t only."""
    captured = {}

    def m_reduce(t, M_prev):
        if t in steps:
            captured[t] = M_prev.detach().reshape(M_prev.shape[0], -1).float().cpu().numpy()

    return captured, m_reduce


@torch.no_grad()
def rule_states(net, batch, device):
    """Pre-onset states and onset displacements (B, D) per representation, and h (B, T, N).

    M_t (after step t) arrives as M_prev at step t + 1, so M at onset − 1 and at onset are
    captured at steps onset and onset + 1."""
    onset = onset_step(batch)
    if not 1 <= onset < batch.inputs.shape[1] - 1:
        raise ValueError(f"stimulus onset at step {onset} leaves no pre-onset or onset state")
    captured, m_reduce = m_capture({onset, onset + 1})
    dtype = next(net.parameters()).dtype
    inputs = torch.as_tensor(batch.inputs, dtype=dtype, device=device)
    out = net(inputs, m_reduce=m_reduce)
    h = out["h"].float().cpu().numpy()
    states = {"hidden": (h[:, onset - 1], h[:, onset] - h[:, onset - 1])}
    if captured:  # only plastic networks call m_reduce
        states["M"] = (captured[onset], captured[onset + 1] - captured[onset])
    return states, h, onset


def collect_states(net, rules, cfg, io_mode, device):
    """Run every rule's aligned batch; stack pre-onset states and displacements over rules.
    Returns (states {rep: (pre (R·B, D), disp (R·B, D))}, meta, per-rule h trajectories)."""
    import mpn_tasks
    rng = np.random.default_rng(cfg["trial_seed"])
    pre, disp, trajectories = {}, {}, []
    meta = {"rule": [], "direction": [], "onset_step": {}}
    for r, rule in enumerate(helper.progress(rules, desc="rules", leave=False)):
        batch = mpn_tasks.aligned_batch(rule, cfg["trials_per_rule"], rng,
                                        quantile=cfg["epoch_quantile"],
                                        sigma_x=cfg["input_noise"], io_mode=io_mode)
        states, h, onset = rule_states(net, batch, device)
        for rep, (p, d) in states.items():
            pre.setdefault(rep, []).append(p)
            disp.setdefault(rep, []).append(d)
        length = np.asarray(batch.length)
        trajectories.append([h[i, :length[i]] for i in range(len(h))])
        meta["rule"].append(np.full(len(h), r))
        meta["direction"].append(trial_directions(batch))
        meta["onset_step"][rule] = onset
    states = {rep: (np.concatenate(pre[rep]), np.concatenate(disp[rep])) for rep in pre}
    meta = dict(meta, rule=np.concatenate(meta["rule"]),
                direction=np.concatenate(meta["direction"]))
    return states, meta, trajectories


def effective_modulation(net, M_flat):
    """W ⊙ M for flattened (post-major) M of shape (B, N_post·N_pre)."""
    W = net.mp.W.detach().float().cpu().numpy().reshape(1, -1)
    return M_flat * W


# ----------------------------------------------------------------------------------------
# Analyses (plain numpy in, plain numpy out)


def top_pcs(X, k):
    """The k leading principal components of the rows of X (n, D), from the n x n Gram matrix
    when D > n (M has N² columns) or the D x D covariance otherwise. Returns the projection
    (n, k), the orthonormal components (D, k) and their explained variance ratio (k,); each
    component's sign makes its largest projection positive."""
    from scipy.linalg import eigh
    X = np.asarray(X, dtype=np.float64)
    X = X - X.mean(0)
    n, D = X.shape
    k = min(k, n, D)
    small = X.T @ X if D <= n else X @ X.T
    vals, vecs = eigh(small, subset_by_index=[len(small) - k, len(small) - 1])
    vals, vecs = np.clip(vals[::-1], 0.0, None), vecs[:, ::-1]
    if D <= n:
        components, proj = vecs, X @ vecs
    else:
        proj = vecs * np.sqrt(vals)
        components = X.T @ vecs / np.where(vals > 0, np.sqrt(vals), 1.0)
    sign = np.sign(proj[np.abs(proj).argmax(0), np.arange(k)])
    sign[sign == 0] = 1.0
    total = np.trace(small)
    return {"proj": proj * sign, "components": components * sign,
            "explained_variance_ratio": vals / total if total > 0 else np.zeros(k)}


def context_pca(pre):
    """2-component PCA of the pre-onset states (n, D): projection (n, 2), explained ratio."""
    pcs = top_pcs(pre, 2)
    return {"proj": pcs["proj"], "explained_variance_ratio": pcs["explained_variance_ratio"]}


def pairwise_distances(X):
    """Euclidean distances between the rows of X (n, D), through the Gram matrix."""
    X = np.asarray(X, dtype=np.float64)
    sq = (X ** 2).sum(1)
    return np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2.0 * X @ X.T, 0.0, None))


def pairwise_angles_deg(V):
    """Angles (degrees, 0..180) between the rows of V (n, D); nan where a row is zero."""
    V = np.asarray(V, dtype=np.float64)
    norm = np.linalg.norm(V, axis=1)
    U = V / np.where(norm > 1e-12, norm, np.nan)[:, None]
    return np.degrees(np.arccos(np.clip(U @ U.T, -1.0, 1.0)))


def shift_points(pre, disp, rule, direction):
    """One point per (rule pair, stimulus direction): the distance between the two rules'
    pre-onset states and the angle between their onset displacements, each averaged over the
    cross-rule trial pairs with that direction. Points with an undefined angle are dropped."""
    rules = np.unique(rule)
    rows = []
    for d in np.unique(direction):
        sel = direction == d
        dist, ang, r = pairwise_distances(pre[sel]), pairwise_angles_deg(disp[sel]), rule[sel]
        for i, a in enumerate(rules):
            for b in rules[i + 1:]:
                block = np.ix_(r == a, r == b)
                if dist[block].size and np.isfinite(ang[block]).any():
                    rows.append((a, b, d, dist[block].mean(), np.nanmean(ang[block])))
    rows = np.array(rows, dtype=float).reshape(-1, 5)
    return {"rule_pair": rows[:, :2].astype(int), "direction": rows[:, 2].astype(int),
            "distance": rows[:, 3], "angle_deg": rows[:, 4]}


def fit_through_origin(x, y):
    """Least-squares y = slope · x (no intercept), with the Pearson r and p of (x, y)."""
    from scipy.stats import pearsonr
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    slope = float((x * y).sum() / (x * x).sum()) if (x * x).sum() > 0 else np.nan
    if x.size >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        r, p = pearsonr(x, y)
    else:
        r, p = np.nan, np.nan
    return {"slope": slope, "r": float(r), "p": float(p), "n": int(x.size)}


def shift_test(pre, disp, rule, direction):
    points = shift_points(pre, disp, rule, direction)
    return dict(points, **fit_through_origin(points["distance"], points["angle_deg"]))


def rule_subspace(trajectories, dim):
    """Orthonormal basis (N, dim) of the top PCs of one rule's hidden states, all trials and
    steps pooled, with the variance ratio each PC explains."""
    pcs = top_pcs(np.concatenate(trajectories), dim)
    return pcs["components"], pcs["explained_variance_ratio"]


def subspace_angle_matrix(bases):
    """Principal angles (degrees) between every pair of subspaces: (R, R) max and mean."""
    from scipy.linalg import subspace_angles
    R = len(bases)
    largest, mean = np.zeros((R, R)), np.zeros((R, R))
    for i in range(R):
        for j in range(i + 1, R):  # symmetric, and 0 on the diagonal
            theta = np.degrees(subspace_angles(bases[i], bases[j]))
            largest[i, j] = largest[j, i] = theta.max()
            mean[i, j] = mean[j, i] = theta.mean()
    return {"max_deg": largest, "mean_deg": mean}


def subspace_analysis(trajectories, dim):
    n_states = min(sum(len(h) for h in trials) for trials in trajectories)
    dim = min(dim, n_states, trajectories[0][0].shape[1])
    fits = [rule_subspace(t, dim) for t in trajectories]
    out = subspace_angle_matrix([basis for basis, _ in fits])
    return dict(out, dim=dim, explained_variance_ratio=np.array([evr for _, evr in fits]))


def analyze_states(states, meta, net):
    """Context PCA and shift test for every representation, W ⊙ M made one at a time."""
    context, shift = {}, {}
    reps = [rep for rep in REPRESENTATIONS if rep in states or (rep == "WM" and "M" in states)]
    for rep in reps:
        if rep == "WM":
            pre, disp = (effective_modulation(net, a) for a in states["M"])
        else:
            pre, disp = states[rep]
        context[rep] = context_pca(pre)
        shift[rep] = shift_test(pre, disp, meta["rule"], meta["direction"])
        del pre, disp
    return reps, context, shift


# ----------------------------------------------------------------------------------------
# Figures: one function per panel, taking data and an ax


def rule_colors(rules):
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("tab20")
    return {rule: cmap(i % 20) for i, rule in enumerate(rules)}


def family_colors():
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("tab10")
    return {family: cmap(i) for i, family in enumerate(family_names())}


def plot_context_pca(ax, proj, evr, groups, names, colors, title):
    """Scatter of the 2-D context-end projection, one colour per group label."""
    for name in names:
        sel = groups == name
        if sel.any():
            ax.scatter(proj[sel, 0], proj[sel, 1], s=12, alpha=0.7, color=colors[name],
                       label=name, linewidths=0)
    ax.set_xlabel(f"PC1 ({100 * evr[0]:.0f}% var.)")
    ax.set_ylabel(f"PC2 ({100 * evr[1]:.0f}% var.)")
    ax.set_title(title)


def plot_shift_test(ax, shift, title):
    """Distance between pre-onset states vs angle between onset displacements, with the fit."""
    x, y = shift["distance"], shift["angle_deg"]
    ax.scatter(x, y, s=8, alpha=0.4, color="0.4", linewidths=0,
               label="rule pair x direction")
    xs = np.linspace(0.0, x.max() if x.size else 1.0, 50)
    ax.plot(xs, shift["slope"] * xs, color="tab:red",
            label=f"fit through 0: slope {shift['slope']:.3g} deg/unit")
    ax.set_xlabel("distance between pre-onset states (a.u.)")
    ax.set_ylabel("angle between onset displacements (deg)")
    ax.set_title(f"{title}\nr = {shift['r']:.2f}, p = {shift['p']:.2g}, n = {shift['n']}")
    ax.set_ylim(0, 180)
    ax.legend(loc="upper left", fontsize=7)


def plot_subspace_angles(ax, matrix, rules, stat, dim):
    """rules x rules heatmap of the principal angle statistic between hidden subspaces."""
    im = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=90)
    ax.set_xticks(range(len(rules)), rules, rotation=90)
    ax.set_yticks(range(len(rules)), rules)
    ax.set_title(f"{stat} principal angle between {dim}-D hidden subspaces")
    ax.figure.colorbar(im, ax=ax, label=f"{stat} principal angle (deg)", shrink=0.8)


def plot_shift_summary(ax, r_by_rep):
    """Shift-test r per representation: mean ± s.d. over runs, with each run as a dot."""
    reps = list(r_by_rep)
    for i, rep in enumerate(reps):
        r = np.asarray(r_by_rep[rep], dtype=float)
        ax.bar(i, np.nanmean(r), yerr=np.nanstd(r), capsize=4, color="tab:blue", alpha=0.5,
               label="mean ± s.d." if i == 0 else None)
        jitter = np.linspace(-0.15, 0.15, r.size) if r.size > 1 else np.zeros(1)
        ax.scatter(i + jitter, r, s=12, color="k", zorder=3, label="run" if i == 0 else None)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.legend(loc="best", fontsize=7)
    ax.set_xticks(range(len(reps)), [REP_LABELS[rep] for rep in reps])
    ax.set_ylabel("Pearson r (distance vs angle)")
    ax.set_xlabel("representation")


# ----------------------------------------------------------------------------------------
# Figure files


def figure_context_pca(result, path):
    import matplotlib.pyplot as plt
    reps, rules = result["representations"], result["rules"]
    rule_names = np.array(rules)[result["trial_rule"]]
    fams = np.array([family_of(rule) for rule in rule_names])
    fam_names = [f for f in family_names() if f in set(fams)]
    fig, axes = plt.subplots(2, len(reps), figsize=(3.6 * len(reps) + 1.6, 6.6), squeeze=False)
    for k, rep in enumerate(reps):
        pca = result["context_pca"][rep]
        plot_context_pca(axes[0, k], pca["proj"], pca["explained_variance_ratio"], rule_names,
                         rules, rule_colors(rules), f"{REP_LABELS[rep]}: by rule")
        plot_context_pca(axes[1, k], pca["proj"], pca["explained_variance_ratio"], fams,
                         fam_names, family_colors(), f"{REP_LABELS[rep]}: by task family")
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, markerscale=1.5)
    axes[1, -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, markerscale=1.5)
    fig.suptitle(f"{result['run']}: state just before stimulus onset (context end)")
    fig.tight_layout()
    return helper.save_figure(fig, path)


def figure_shift_test(result, path):
    import matplotlib.pyplot as plt
    reps = result["representations"]
    fig, axes = plt.subplots(1, len(reps), figsize=(3.8 * len(reps), 3.8), squeeze=False)
    for ax, rep in zip(axes[0], reps):
        plot_shift_test(ax, result["shift"][rep], REP_LABELS[rep])
    fig.suptitle(f"{result['run']}: shift test at stimulus onset")
    fig.tight_layout()
    return helper.save_figure(fig, path)


def figure_subspace_angles(result, path):
    import matplotlib.pyplot as plt
    sub = result["subspace"]
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    plot_subspace_angles(ax, sub[f"{sub['stat']}_deg"], result["rules"], sub["stat"], sub["dim"])
    fig.suptitle(result["run"], fontsize=8)
    fig.tight_layout()
    return helper.save_figure(fig, path)


def figure_summary(summary, path):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.3 * len(summary["r"]) + 1.5, 3.4))
    plot_shift_summary(ax, summary["r"])
    ax.set_title(f"shift test over {len(summary['runs'])} runs (mean ± s.d.)")
    fig.tight_layout()
    return helper.save_figure(fig, path)


# ----------------------------------------------------------------------------------------
# Stage


def analyze_run(paths, cfg):
    """Every analysis of one run, as the dict saved to its state_space.pkl."""
    device = helper.get_device(cfg["device"])
    net, train_cfg, step = load_network(paths, device)
    rules = run_rules(train_cfg)
    states, meta, trajectories = collect_states(net, rules, cfg,
                                                train_cfg.get("io_mode", "low_dim"), device)
    reps, context, shift = analyze_states(states, meta, net)
    subspace = subspace_analysis(trajectories, cfg["subspace_dim"])
    return {
        "run": paths.name, "step": step, "rules": rules,
        "families": {rule: family_of(rule) for rule in rules},
        "representations": reps, "trial_rule": meta["rule"],
        "trial_direction": meta["direction"], "onset_step": meta["onset_step"],
        "context_pca": context, "shift": shift,
        "subspace": dict(subspace, stat=cfg["subspace_stat"]),
        "config": dict(cfg, run=paths.name), "train_config": train_cfg,
    }


def save_run(result, paths):
    helper.save_pickle(paths.state_space, result, result["config"])
    figures = [figure_context_pca(result, paths.figure("state_space_context_pca")),
               figure_shift_test(result, paths.figure("state_space_shift_test")),
               figure_subspace_angles(result, paths.figure("state_space_subspace_angles"))]
    for rep in result["representations"]:
        s = result["shift"][rep]
        print(f"[{result['run']}] shift test {REP_LABELS[rep]}: slope {s['slope']:.3g} deg/unit,"
              f" r = {s['r']:.3f}, p = {s['p']:.2g} (n = {s['n']})")
    return figures


def summarize(results, cfg):
    """Shift-test r, slope and p per representation over runs, saved under runs/summary/."""
    reps = [rep for rep in REPRESENTATIONS if any(rep in r["shift"] for r in results)]
    pick = {key: {rep: [r["shift"][rep][key] for r in results if rep in r["shift"]]
                  for rep in reps} for key in ("r", "slope", "p")}
    summary = dict(pick, runs=[r["run"] for r in results],
                   r_mean={rep: float(np.nanmean(v)) for rep, v in pick["r"].items()},
                   r_std={rep: float(np.nanstd(v)) for rep, v in pick["r"].items()})
    out = helper.summary_paths(cfg["runs_dir"])
    helper.save_pickle(out.state_space, summary, cfg)
    figure = figure_summary(summary, out.figure("state_space_shift_r"))
    for rep in reps:
        print(f"shift-test r, {REP_LABELS[rep]}: {summary['r_mean'][rep]:.3f} ± "
              f"{summary['r_std'][rep]:.3f} over {len(pick['r'][rep])} runs")
    return summary, figure


def main(cfg):
    if cfg["subspace_stat"] not in ("mean", "max"):
        raise helper.StageError(f"subspace_stat must be 'mean' or 'max', "
                                f"got {cfg['subspace_stat']!r}.")
    helper.set_style()
    runs = helper.find_runs(cfg["run"], cfg["runs_dir"])
    results, figures = [], []
    for paths in runs:
        result = analyze_run(paths, cfg)
        figures += save_run(result, paths)
        results.append(result)
    summary = None
    if len(results) > 1:
        summary, figure = summarize(results, cfg)
        figures.append(figure)
    for path in figures:
        print(f"figure: {path}")
    return {"results": results, "summary": summary, "figures": figures}


if __name__ == "__main__":
    helper.run_main(main, CONFIG)
