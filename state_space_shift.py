"""State-space geometry of trained networks across rules (SPEC §7.1), for the hidden activity
h, the modulation M (flattened) and the effective modulation W ⊙ M.

On each rule's complete condition set (mpn_tasks.condition_set; at most `trials_per_rule`
trials taken at an even stride, which keeps the stimulus directions balanced) with input
noise sigma_x = 0.01:
  1. context-end PCA: the state at the last step before stimulus onset (stim1 onset − 1; the
     go1 onset − 1 for react rules, whose stimulus appears at go1), one point per trial,
     2-component PCA, coloured by rule and by task family;
  2. shift test, one point per rule pair: the distance between the two rules' pre-onset
     states vs the angle between their one-step displacements at stimulus onset (state at
     onset − state just before), each averaged over the cross-rule trial pairs of one stimulus
     direction, then over directions. Pearson r of the points with its ordinary least-squares
     line; permutation p (one-sided, r above chance) from `n_permutations` shuffles of the
     trials' rule labels within each direction. Baselines, on the same trials: the untrained
     network (the run's step-0 snapshot) and one shuffle of the rule labels, each with its own
     r, line and p. A claim that plasticity carries context needs the trained r above both;
  3. subspace angles (scipy.linalg.subspace_angles) between the rules' hidden-activity
     subspaces (top `subspace_dim` PCs of each rule's h over all steps of its trials), as a
     rules x rules heatmap of the mean (or max) principal angle in degrees.

The state at step t is what the network holds after processing input t: h_t, and
M_t = clip(λ M_{t−1} + η h_t x_tᵀ) (the matrix h_{t+1} will use), so the onset displacement
of M contains the stimulus's own Hebbian update. M is streamed through the model's
`m_reduce(t, M_{t−1})` callback and kept only at the two steps each rule needs; the full
history never exists. Vanilla-RNN and GRU runs have no M: only h is analysed.

Reads:  runs/<aname>/checkpoint.pt and snapshots/weights_step0000000.pt (its config gives the
        rules and io_mode).
Writes: runs/<aname>/state_space.h5 (arrays; run, step and config as attributes) and
        runs/<aname>/figures/state_space_*.png. The shift test across seeds and architectures
        is seed_summary.py's.

Axis order: trials x time x units, (B, T, N); flattened synapses are post-major
(column i_post * N_pre + j_pre).

Example:
    python state_space_shift.py --run=everything_dmpn_seed749_L21e4_h300_b128
    python state_space_shift.py --run='everything_dmpn_seed*'
"""
import numpy as np
import torch

import helper
import mpn
import mpn_tasks
from variance_core import REP_TITLES

CONFIG = dict(
    run="everything_dmpn_seed*",  # run name or glob (quote globs in the shell) {@run_pattern}
    runs_dir=None,  # runs root; None = $MPN_RUNS_DIR, else runs/ {None | @path}
    trials_per_rule=64,  # at most this many trials of each rule's condition set (even stride; memory of M at N = 300: 15 x 64 x 90,000 floats per state) {>= 8}
    epoch_quantile=1.0,  # epoch durations at this quantile of their ranges (1.0 = longest) {>= 0, <= 1}
    input_noise=0.01,  # sigma_x of the analysis trials (SPEC §2.3: 0.01 for analysis) {>= 0}
    trial_seed=0,  # seed of the numpy Generator drawing the input noise and the label shuffles {>= 0}
    n_permutations=1000,  # rule-label shuffles behind the permutation p of the shift test {>= 1}
    subspace_dim=3,  # top PCs of a rule's hidden activity spanning its subspace {>= 1}
    subspace_stat="mean",  # principal angles summarised by "mean" or "max" in the heatmap {mean | max}
    device="auto",  # "auto" (cuda if available), "cpu" or "cuda" {@device}
)

# key in state_space.h5 -> its representation (variance_core): h; M and W ⊙ M flattened
REPRESENTATIONS = {"hidden": "hidden", "M": "modulation", "WM": "modulation_weighted"}
REP_LABELS = {key: REP_TITLES[rep] for key, rep in REPRESENTATIONS.items()}


def family_of(rule):
    """Task family (Go/Anti, Reaction, Delay, Decision-making, Match) of a rule."""
    return mpn_tasks.RULE_GROUPS[rule]


def family_names():
    """The task families in rule order."""
    return list(dict.fromkeys(mpn_tasks.RULE_GROUPS.values()))


# ----------------------------------------------------------------------------------------
# Running a network


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
    index = np.arange(len(batch.rule)) % mpn_tasks.N_DIRS
    dirs = np.asarray(batch.stim1_dir, dtype=float)
    ok = np.isfinite(dirs)
    index[ok] = mpn_tasks.direction_index(dirs[ok])
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


def make_trials(rules, cfg, io_mode):
    """Per rule, its condition set at `epoch_quantile` with input noise, at most
    `trials_per_rule` trials at an even stride (the set varies stimulus direction slowest,
    so every direction keeps its share)."""
    rng = np.random.default_rng(cfg["trial_seed"])
    batches = []
    for rule in rules:
        batch = mpn_tasks.condition_set(rule, rng=rng, quantile=cfg["epoch_quantile"],
                                        sigma_x=cfg["input_noise"], io_mode=io_mode)
        n = len(batch.rule)
        keep = min(n, cfg["trials_per_rule"])
        batches.append(batch.take((np.arange(keep) * n) // keep))
    return batches


def collect_states(net, batches, device):
    """Run every rule's trials; stack pre-onset states and displacements over rules.
    Returns (states {rep: (pre (Σ B, D), disp (Σ B, D))}, meta, per-rule h trajectories)."""
    pre, disp, trajectories = {}, {}, []
    meta = {"rule": [], "direction": [], "onset_step": []}
    for r, batch in enumerate(helper.progress(batches, desc="rules", leave=False)):
        states, h, onset = rule_states(net, batch, device)
        for rep, (p, d) in states.items():
            pre.setdefault(rep, []).append(p)
            disp.setdefault(rep, []).append(d)
        length = np.asarray(batch.length)
        trajectories.append([h[i, :length[i]] for i in range(len(h))])
        meta["rule"].append(np.full(len(h), r))
        meta["direction"].append(trial_directions(batch))
        meta["onset_step"].append(onset)
    states = {rep: (np.concatenate(pre[rep]), np.concatenate(disp[rep])) for rep in pre}
    meta = dict(meta, rule=np.concatenate(meta["rule"]),
                direction=np.concatenate(meta["direction"]),
                onset_step=np.array(meta["onset_step"]),
                rule_names=[mpn_tasks.RULES[int(b.rule[0])] for b in batches])
    return states, meta, trajectories


def effective_modulation(net, M_flat):
    """W ⊙ M (the model's effective_modulation) for flattened (post-major) M of shape
    (B, N_post·N_pre), numpy in and out."""
    W = net.synapse_weight()
    with torch.no_grad():
        M = torch.as_tensor(M_flat, device=W.device, dtype=W.dtype)
        return net.effective_modulation(M).float().cpu().numpy()


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


def direction_blocks(pre, disp, direction):
    """Per stimulus direction: the trials' indices, their pairwise pre-onset distances and
    the pairwise angles (degrees; nan where a displacement is zero) of their displacements."""
    blocks = []
    for d in np.unique(direction):
        idx = np.flatnonzero(direction == d)
        blocks.append((idx, pairwise_distances(pre[idx]), pairwise_angles_deg(disp[idx])))
    return blocks


def pair_matrices(blocks, rule, n_rules):
    """(R, R) mean distance and mean angle between the trials of every two rules, averaged
    over the cross-rule trial pairs of each direction, then over directions. The means are
    block sums Gᵀ X G of the trial matrices with G the one-hot rule labels."""
    D, A, n_dirs = np.zeros((n_rules, n_rules)), np.zeros((n_rules, n_rules)), np.zeros((n_rules, n_rules))
    for idx, dist, ang in blocks:
        G = np.eye(n_rules)[rule[idx]]
        ok = np.isfinite(ang)
        pairs = np.outer(G.sum(0), G.sum(0))
        n_ang = G.T @ ok @ G
        with np.errstate(invalid="ignore", divide="ignore"):
            d_mean = (G.T @ dist @ G) / pairs
            a_mean = (G.T @ np.where(ok, ang, 0.0) @ G) / n_ang
        use = (pairs > 0) & (n_ang > 0)
        D += np.where(use, d_mean, 0.0)
        A += np.where(use, a_mean, 0.0)
        n_dirs += use
    with np.errstate(invalid="ignore", divide="ignore"):
        return D / n_dirs, A / n_dirs


def shift_points(D, A):
    """One point per rule pair (a < b) with a finite distance and angle."""
    a, b = np.triu_indices(len(D), 1)
    ok = np.isfinite(D[a, b]) & np.isfinite(A[a, b])
    return {"rule_pair": np.stack([a[ok], b[ok]], axis=1), "distance": D[a, b][ok],
            "angle_deg": A[a, b][ok]}


def pearson_ols(x, y):
    """Pearson r of the points and the least-squares line y = slope · x + intercept."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"r": np.nan, "slope": np.nan, "intercept": np.nan, "n": int(x.size)}
    slope, intercept = np.polyfit(x, y, 1)
    return {"r": float(np.corrcoef(x, y)[0, 1]), "slope": float(slope),
            "intercept": float(intercept), "n": int(x.size)}


def shuffle_within(rule, direction, rng):
    """Rule labels permuted among the trials of each stimulus direction."""
    out = rule.copy()
    for d in np.unique(direction):
        idx = np.flatnonzero(direction == d)
        out[idx] = rule[rng.permutation(idx)]
    return out


def shift_r(blocks, rule, n_rules):
    points = shift_points(*pair_matrices(blocks, rule, n_rules))
    return dict(points, **pearson_ols(points["distance"], points["angle_deg"]))


def shift_test(pre, disp, rule, direction, n_permutations, rng):
    """The shift test on the real rule labels and on one shuffle of them, each with a
    one-sided permutation p from `n_permutations` further shuffles (within directions):
    (1 + #{r_shuffled ≥ r}) / (1 + n_permutations). Also the shuffles' r (the null)."""
    n_rules = int(rule.max()) + 1
    blocks = direction_blocks(pre, disp, direction)
    real = shift_r(blocks, rule, n_rules)
    shuffled = shift_r(blocks, shuffle_within(rule, direction, rng), n_rules)
    null = np.array([shift_r(blocks, shuffle_within(rule, direction, rng), n_rules)["r"]
                     for _ in range(n_permutations)])
    for res in (real, shuffled):
        res["p"] = float((1 + np.sum(null >= res["r"])) / (1 + n_permutations)) \
            if np.isfinite(res["r"]) else np.nan
    return {"real": real, "shuffled": shuffled, "null_r": null}


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


def analyze_states(states, meta, net, cfg):
    """Context PCA and shift test for every representation, W ⊙ M made one at a time."""
    context, shift = {}, {}
    rng = np.random.default_rng([cfg["trial_seed"], 1])
    reps = [rep for rep in REPRESENTATIONS if rep in states or (rep == "WM" and "M" in states)]
    for rep in reps:
        if rep == "WM":
            pre, disp = (effective_modulation(net, a) for a in states["M"])
        else:
            pre, disp = states[rep]
        context[rep] = context_pca(pre)
        shift[rep] = shift_test(pre, disp, meta["rule"], meta["direction"],
                                cfg["n_permutations"], rng)
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


SHIFT_SERIES = (("trained", "trained", "tab:red"), ("untrained", "untrained (step 0)", "tab:blue"),
                 ("shuffled", "shuffled rule labels", "0.5"))


def plot_shift_test(ax, shift, title):
    """Distance between pre-onset states vs angle between onset displacements, one point per
    rule pair, for the trained network, the untrained one and shuffled rule labels, each
    with its least-squares line, Pearson r and permutation p."""
    for key, label, color in SHIFT_SERIES:
        if key not in shift:
            continue
        s = shift[key]
        x, y = s["distance"], s["angle_deg"]
        ax.scatter(x, y, s=9, alpha=0.6, color=color, linewidths=0)
        if np.isfinite(s["slope"]):
            xs = np.linspace(x.min(), x.max(), 2)
            ax.plot(xs, s["slope"] * xs + s["intercept"], color=color, lw=1.5,
                    label=f"{label}: r = {s['r']:.2f}, p = {s['p']:.2g}")
    lo, hi = np.percentile(shift["null_r"], [2.5, 97.5])
    ax.set_xlabel("distance between pre-onset states (a.u.)")
    ax.set_ylabel("angle between onset displacements (deg)")
    ax.set_title(f"{title} ({shift['trained']['n']} rule pairs)\nshuffled-label r, 95%: "
                 f"[{lo:.2f}, {hi:.2f}]", fontsize=9)
    ax.set_ylim(0, 180)
    ax.legend(loc="upper left", fontsize=6)


def plot_subspace_angles(ax, matrix, rules, stat, dim):
    """rules x rules heatmap of the principal angle statistic between hidden subspaces."""
    im = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=90)
    ax.set_xticks(range(len(rules)), rules, rotation=90)
    ax.set_yticks(range(len(rules)), rules)
    ax.set_title(f"{stat} principal angle between {dim}-D hidden subspaces")
    ax.figure.colorbar(im, ax=ax, label=f"{stat} principal angle (deg)", shrink=0.8)


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
    fig, axes = plt.subplots(1, len(reps), figsize=(4.2 * len(reps), 4.2), squeeze=False)
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


# ----------------------------------------------------------------------------------------
# Stage


def load_untrained(paths, device):
    """The run's step-0 snapshot as a network, or None (with a note) when it was not kept."""
    path = paths.snapshot(0)
    if not path.exists():
        print(f"[{paths.name}] no step-0 snapshot ({path.name}): the untrained baseline of the "
              f"shift test is skipped")
        return None
    return mpn.model_from_checkpoint(path, device=device).eval()


def analyze_run(paths, cfg):
    """Every analysis of one run, as the dict saved to its state_space.h5."""
    device = helper.get_device(cfg["device"])
    net, train_cfg, step = mpn.load_run(paths, device)
    rules = mpn_tasks.run_rules(train_cfg)
    batches = make_trials(rules, cfg, train_cfg.get("io_mode", "low_dim"))
    states, meta, trajectories = collect_states(net, batches, device)
    reps, context, tests = analyze_states(states, meta, net, cfg)
    shift = {rep: {"trained": t["real"], "shuffled": t["shuffled"], "null_r": t["null_r"]}
             for rep, t in tests.items()}
    untrained = load_untrained(paths, device)
    if untrained is not None:
        u_states, u_meta, _ = collect_states(untrained, batches, device)
        for rep, t in analyze_states(u_states, u_meta, untrained, cfg)[2].items():
            shift[rep].update(untrained=t["real"], null_r_untrained=t["null_r"])
    subspace = subspace_analysis(trajectories, cfg["subspace_dim"])
    return {
        "run": paths.name, "step": step, "rules": rules,
        "families": [family_of(rule) for rule in rules],
        "representations": reps, "trial_rule": meta["rule"],
        "trial_direction": meta["direction"], "onset_step": meta["onset_step"],
        "context_pca": context, "shift": shift,
        "subspace": dict(subspace, stat=cfg["subspace_stat"]),
        "config": dict(cfg, run=paths.name),
    }


def _arrays(tree):
    """Numbers, strings and lists of a nested dict as arrays (save_h5 stores arrays)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = _arrays(value)
        elif isinstance(value, (str, int, float, np.number)):
            out[key] = np.array([value])
        else:
            out[key] = np.asarray(value)
    return out


def save_run(result, paths):
    arrays = _arrays({k: v for k, v in result.items() if k not in ("run", "step", "config")})
    helper.save_h5(paths.state_space, arrays,
                   attrs={"run": result["run"], "step": result["step"]}, cfg=result["config"],
                   inputs=[paths.checkpoint])
    figures = [figure_context_pca(result, paths.figure("state_space_context_pca")),
               figure_shift_test(result, paths.figure("state_space_shift_test")),
               figure_subspace_angles(result, paths.figure("state_space_subspace_angles"))]
    for rep in result["representations"]:
        line = ", ".join(f"{key} r = {s['r']:.3f} (p = {s['p']:.3g})"
                         for key, s in ((k, result["shift"][rep].get(k)) for k, _, _ in SHIFT_SERIES)
                         if s is not None)
        print(f"[{result['run']}] shift test {REP_LABELS[rep]}: {line}")
    return figures


def main(cfg):
    if cfg["subspace_stat"] not in ("mean", "max"):
        raise helper.StageError(f"subspace_stat must be 'mean' or 'max', "
                                f"got {cfg['subspace_stat']!r}.")
    helper.set_style()
    runs = helper.find_runs(cfg["run"], cfg["runs_dir"])
    results, figures = [], []
    for paths in runs:
        with helper.run_lock(paths.dir):
            result = analyze_run(paths, cfg)
            figures += save_run(result, paths)
        results.append(result)
    for path in figures:
        print(f"figure: {path}")
    return {"results": results, "figures": figures}


if __name__ == "__main__":
    helper.run_main(main, CONFIG)
