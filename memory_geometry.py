"""Memory geometry of sibling rules (SPEC §7.2): how a network holds the sample of dmcgo /
dmcnogo and the first stimulus of delaydm1 / delaydm2 through a long delay, in the hidden
activity h and in the effective modulation W ⊙ M.

For each sibling pair, long-delay trials (delay1 stretched to `delay_ms`, the `long_delay`
option of mpn_tasks.aligned_batch), `trials_per_direction` noisy trials per (rule, stim1
direction), input noise sigma_x = `input_noise`. During delay1:
  1. PCA of the delay states pooled over both rules, all trials and all delay steps, by a
     streamed randomized PCA (Halko et al. 2011: one pass sketches Xᵀ X Ω with a fixed-seed
     Gaussian Ω, a second pass projects onto its range and finishes exactly there), so the
     N² states of W ⊙ M are never all held; h goes through the same code. The PCA seed is a
     config value, never chosen by a score; the plane shown is PC1-PC2, always;
  2. end-of-delay points (the state after the last delay step) per trial, and trajectories
     (delay onset to end) in the PC1-PC2 plane;
  3. convergence, in the full state space, on the same trials without input noise (with it,
     every step carries fresh noise): per trial, the mean step ‖s_t − s_{t−1}‖ over the last
     `converge_window` delay steps divided by the delay excursion max_t ‖s_t − s_0‖ (s_0 the
     state after the first delay step); converged when below `converge_tol`. Also the late
     drift ‖s_end − s_3/4‖ / excursion over the delay's last quarter, since on a long delay
     the ratio passes even a steady drift;
  4. cross-validated linear decoding (ridge classifier on standardised top-`n_pcs` PCs of the
     end-of-delay points; the PCA is label-free) of the task-relevant grouping: dmc: category,
     rule and category x rule with one stim1 direction held out per fold (the code must
     generalise across directions); delaydm: stim1 direction with one noisy repeat held out,
     and across rules (train on one rule, test on the other). Baselines: a label-permutation
     null (`n_shuffles`, one-sided p), chance 1 / n_classes, and the untrained network (the
     run's seeded step-0 weights) through the same analysis.

Vanilla-RNN and GRU runs have no M: only h is analysed.

Reads:  runs/<aname>/checkpoint.pt (its config gives the rules and io_mode).
Writes: runs/<aname>/memory_geometry.h5 (network / pair / representation groups: PC
        trajectories, end points, explained variance, convergence, decoding with its null) and
        runs/<aname>/figures/memory_geometry_{pca,decoding,convergence}.png.

Axis order: trials x time x units, (B, T, N); W ⊙ M flattened post-major.

Example:
    python memory_geometry.py --run=everything_dmpn_seed749_L21e4_h64_b32
"""
import numpy as np
import torch

import helper
import mpn
import mpn_tasks
from mpn_tasks import DT_MS, N_DIRS
from variance_core import REP_TITLES

CONFIG = dict(
    run="everything_dmpn_seed*",  # run name or glob (quote globs in the shell) {@run_pattern}
    runs_dir=None,  # runs root; None = $MPN_RUNS_DIR, else runs/ {None | @path}
    delay_ms=10_000,  # delay1 length of the probe trials, ms (SPEC §7.2: 10 s) {>= 400}
    trials_per_direction=4,  # noisy trials per (rule, stim1 direction) {>= 1}
    input_noise=0.01,  # sigma_x of the probe trials (SPEC §2.3: 0.01 for analysis) {>= 0}
    trial_seed=0,  # seed of the numpy Generator drawing the probe trials {>= 0}
    pca_seed=0,  # seed of the randomized PCA's test matrix: fixed, never picked by a score {>= 0}
    n_pcs=10,  # principal components kept: decoding features; PC1-PC2 is the plane shown {>= 2}
    pca_oversample=10,  # extra random columns of the randomized PCA sketch {>= 0}
    converge_window=5,  # last delay steps whose mean step size judges convergence {>= 1}
    converge_tol=0.05,  # converged when mean step / delay excursion is below this {> 0}
    ridge=1.0,  # ridge penalty of the linear decoder on standardised features {> 0}
    n_shuffles=200,  # label permutations of the decoding null {>= 0}
    untrained_baseline=True,  # also analyse the untrained network (the run's step-0 weights) {@bool}
    figures=True,  # draw the figures {@bool}
    device="auto",  # "auto" (cuda if available), "cpu" or "cuda" {@device}
)

PAIRS = {"dmc": ("dmcgo", "dmcnogo"), "delaydm": ("delaydm1", "delaydm2")}
REP_LABELS = {"hidden": REP_TITLES["hidden"], "WM": REP_TITLES["modulation_weighted"]}
# (label, held-out grouping) per pair: what is decoded, and what a CV fold leaves out
DECODINGS = {"dmc": (("category", "direction"), ("rule", "direction"),
                     ("category_x_rule", "direction")),
             "delaydm": (("direction", "repeat"), ("direction", "rule"))}


# ----------------------------------------------------------------------------------------
# Probe trials


def probe_batch(pair, cfg, io_mode, sigma_x):
    """Long-delay trials of both rules of a pair and their labels (rule, direction index,
    category, repeat), with the delay1 window [start, stop) the trials share. Each rule draws
    from its own seeded Generator, conditions before noise, so every sigma_x gives the same
    conditions."""
    batches, labels = [], {"rule": [], "direction": [], "repeat": []}
    for r, rule in enumerate(PAIRS[pair]):
        n_dirs = len(mpn_tasks.TASKS[rule].stim1_dirs)
        n = n_dirs * cfg["trials_per_direction"]
        rng = np.random.default_rng([cfg["trial_seed"], mpn_tasks.RULES.index(rule)])
        batch = mpn_tasks.aligned_batch(rule, n, rng, sigma_x=sigma_x, io_mode=io_mode,
                                        long_delay=cfg["delay_ms"])
        batches.append(batch)
        labels["rule"].append(np.full(n, r))
        labels["direction"].append(mpn_tasks.direction_index(batch.stim1_dir))
        labels["repeat"].append(np.arange(n) // n_dirs)
    batch = mpn_tasks.concat_batches(batches)
    labels = {k: np.concatenate(v) for k, v in labels.items()}
    labels["category"] = (labels["direction"] > N_DIRS // 2).astype(int)  # θ > π: 0, π unused
    labels["category_x_rule"] = 2 * labels["rule"] + labels["category"]
    window = np.unique(batch.epochs["delay1"], axis=0)
    if len(window) != 1:
        raise ValueError("delay1 differs across the probe trials")
    return batch, labels, (int(window[0, 0]), int(window[0, 1]))


# ----------------------------------------------------------------------------------------
# Streamed randomized PCA and convergence statistics (rows arrive one delay step at a time)


class StreamedPCA:
    """Randomized PCA of rows streamed twice. Pass 1 (`sketch`) accumulates Σ x, Σ‖x‖² and
    Xᵀ X Ω (D x l, Ω Gaussian from `seed`); its centred version spans the leading right
    singular subspace (one power iteration). Pass 2 (`project`) keeps each row's coordinates
    in that basis Q; `finish` does an exact PCA inside it."""

    def __init__(self, dim, n_components, oversample, seed):
        self.k, width = n_components, min(dim, n_components + oversample)
        self.omega = np.random.default_rng(seed).standard_normal((dim, width))
        self.Z = np.zeros((dim, width))
        self.total, self.sq, self.n = np.zeros(dim), 0.0, 0
        self.Q, self.coords = None, []

    def sketch(self, rows):
        rows = np.asarray(rows, dtype=np.float64)
        self.Z += rows.T @ (rows @ self.omega)
        self.total += rows.sum(0)
        self.sq += float((rows ** 2).sum())
        self.n += len(rows)

    def basis(self):
        mean = self.total / self.n
        Zc = self.Z - self.n * np.outer(mean, mean @ self.omega)
        self.Q = np.linalg.qr(Zc)[0]
        return self.Q

    def project(self, rows):
        self.coords.append((np.asarray(rows, dtype=np.float64) - self.total / self.n) @ self.Q)

    def finish(self, coords_shape):
        """Projections (coords_shape + (k,)), components (D, k), explained variance ratio."""
        P = np.concatenate(self.coords)
        P = P - P.mean(0)  # exact centring inside the subspace
        _, s, Vt = np.linalg.svd(P, full_matrices=False)
        k = min(self.k, len(s))
        V = Vt[:k].T
        proj = P @ V
        sign = np.sign(proj[np.abs(proj).argmax(0), np.arange(k)])
        sign[sign == 0] = 1.0
        mean = self.total / self.n
        total_var = self.sq - self.n * float(mean @ mean)
        evr = s[:k] ** 2 / total_var if total_var > 0 else np.zeros(k)
        return (proj * sign).reshape(*coords_shape, k), self.Q @ V * sign, evr


class DelayPath:
    """Per-trial step sizes ‖s_t − s_{t−1}‖, the excursion max_t ‖s_t − s_0‖ over a delay of
    n_steps states streamed one step at a time, and the late drift ‖s_end − s_late‖ over its
    last quarter (s_late the state at 3/4 of the delay)."""

    def __init__(self, n_steps):
        self.late_index, self.count = (3 * (n_steps - 1)) // 4, 0
        self.first = self.prev = self.late = None
        self.steps, self.excursion = [], None

    def add(self, rows):
        rows = np.asarray(rows, dtype=np.float64)
        if self.first is None:
            self.first, self.excursion = rows, np.zeros(len(rows))
        else:
            self.steps.append(np.linalg.norm(rows - self.prev, axis=1))
            self.excursion = np.maximum(self.excursion, np.linalg.norm(rows - self.first, axis=1))
        if self.count == self.late_index:
            self.late = rows
        self.prev, self.count = rows, self.count + 1

    def result(self, window, tol):
        steps = np.stack(self.steps, axis=1)  # (B, L - 1)
        excursion = np.where(self.excursion > 0, self.excursion, np.nan)
        ratio = steps[:, -window:].mean(1) / excursion
        late = np.linalg.norm(self.prev - self.late, axis=1) / excursion
        return {"step_norm": steps, "excursion": self.excursion, "ratio": ratio,
                "converged": ratio < tol, "late_drift": late}


def convergence(path, window, tol):
    """The DelayPath result with its summary: converged fraction, median ratio and median
    late drift. SPEC §7.2's ratio compares one step with the whole excursion, so on a long
    delay even a steady drift passes it (100 equal steps: ratio 0.01); the late drift (a
    steady drift: 0.25) tells a settled state from a slowly moving one."""
    out = path.result(window, tol)
    out["fraction_converged"] = float(np.mean(out["converged"]))
    out["median_ratio"] = float(np.nanmedian(out["ratio"]))
    out["median_late_drift"] = float(np.nanmedian(out["late_drift"]))
    return out


# ----------------------------------------------------------------------------------------
# Delay states of one network: h from its output, W ⊙ M streamed through m_reduce


def stream_delay(net, inputs, window, consumers):
    """Run the trials once; hand each consumer (rep -> list of callables) the delay state
    rows (B, D) of every delay step, in order. Returns h (B, T, N) as numpy."""
    start, stop = window

    def m_reduce(t, M_prev):  # M_prev = M_{t-1}: delay states M_start..M_{stop-1}
        if "WM" in consumers and start + 1 <= t <= stop:
            rows = net.effective_modulation(M_prev).reshape(M_prev.shape[0], -1)
            rows = rows.double().cpu().numpy()
            for consume in consumers["WM"]:
                consume(rows)

    with torch.no_grad():
        h = net(inputs, m_reduce=m_reduce)["h"].double().cpu().numpy()
    for consume in consumers.get("hidden", ()):
        for t in range(start, stop):
            consume(h[:, t])
    return h


def delay_geometry(net, batch, clean, window, cfg, device):
    """PCA and end points (on the noisy trials `batch`) and convergence (on the same trials
    without input noise, `clean`: with noise every step would carry the noise) of every
    representation of one network."""
    dtype = next(net.parameters()).dtype
    inputs = torch.as_tensor(batch.inputs, dtype=dtype, device=device)
    reps = ["hidden", "WM"] if getattr(net, "state_name", "h") == "M" else ["hidden"]
    pcas, paths = {}, {rep: DelayPath(window[1] - window[0]) for rep in reps}

    def sketcher(rep):
        def consume(rows):
            if rep not in pcas:
                pcas[rep] = StreamedPCA(rows.shape[1], cfg["n_pcs"], cfg["pca_oversample"],
                                        cfg["pca_seed"])
            pcas[rep].sketch(rows)
        return consume

    stream_delay(net, inputs, window, {rep: [sketcher(rep)] for rep in reps})
    for rep in reps:
        pcas[rep].basis()
    stream_delay(net, inputs, window, {rep: [pcas[rep].project] for rep in reps})
    clean_inputs = torch.as_tensor(clean.inputs, dtype=dtype, device=device)
    stream_delay(net, clean_inputs, window, {rep: [paths[rep].add] for rep in reps})
    out, B, L = {}, len(batch.inputs), window[1] - window[0]
    for rep in reps:
        proj, _, evr = pcas[rep].finish((L, B))
        out[rep] = dict(trajectory=proj.transpose(1, 0, 2).astype(np.float32),
                        explained_variance_ratio=evr,
                        convergence=convergence(paths[rep], cfg["converge_window"],
                                                cfg["converge_tol"]))
        out[rep]["end_point"] = out[rep]["trajectory"][:, -1]
    return out


# ----------------------------------------------------------------------------------------
# Cross-validated linear decoding (plain numpy)


def ridge_predict(X_train, y_train, X_test, ridge):
    """Ridge regression onto one-hot labels of standardised features; the arg-max class."""
    mean, sd = X_train.mean(0), X_train.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    Z, Zt = (X_train - mean) / sd, (X_test - mean) / sd
    classes = np.unique(y_train)
    Y = (y_train[:, None] == classes[None, :]).astype(float)
    Y_mean = Y.mean(0)
    coef = np.linalg.solve(Z.T @ Z + ridge * np.eye(Z.shape[1]), Z.T @ (Y - Y_mean))
    return classes[np.argmax(Zt @ coef + Y_mean, axis=1)]


def cv_accuracy(X, y, groups, ridge):
    """Accuracy pooled over folds that each hold out one value of `groups` (the plain loop;
    `cv_accuracies` is the same for many labellings at once)."""
    correct = 0
    for g in np.unique(groups):
        test = groups == g
        correct += int((ridge_predict(X[~test], y[~test], X[test], ridge) == y[test]).sum())
    return correct / len(y)


def cv_accuracies(X, labels, groups, ridge):
    """cv_accuracy of every labelling row of labels (P, n) in one pass per fold: the ridge fit
    is linear in the targets, so each fold's hat operator H (n_test, n_train) serves every
    labelling. A class absent from a fold's training labels is never predicted."""
    classes = np.unique(labels)
    correct = np.zeros(len(labels))
    for g in np.unique(groups):
        test = groups == g
        mean, sd = X[~test].mean(0), X[~test].std(0)
        sd = np.where(sd > 1e-12, sd, 1.0)
        Z, Zt = (X[~test] - mean) / sd, (X[test] - mean) / sd
        H = Zt @ np.linalg.solve(Z.T @ Z + ridge * np.eye(Z.shape[1]), Z.T)
        Y = (labels[:, ~test, None] == classes).astype(float)  # (P, n_train, C)
        Y_mean = Y.mean(1, keepdims=True)
        scores = np.einsum("ij,pjc->pic", H, Y - Y_mean) + Y_mean
        scores = np.where(Y.any(1, keepdims=True), scores, -np.inf)
        correct += (classes[scores.argmax(-1)] == labels[:, test]).sum(1)
    return correct / labels.shape[1]


def decode(X, y, groups, ridge, n_shuffles, rng):
    """CV accuracy, its label-permutation null, one-sided p and chance (1 / n_classes)."""
    if np.unique(groups).size < 2:
        return {"accuracy": np.nan, "null": np.full(n_shuffles, np.nan), "p": np.nan,
                "chance": 1.0 / np.unique(y).size}
    labels = np.stack([y] + [rng.permutation(y) for _ in range(n_shuffles)])
    accs = cv_accuracies(X, labels, groups, ridge)
    acc, null = accs[0], accs[1:]
    p = (1 + np.sum(null >= acc)) / (1 + n_shuffles)
    return {"accuracy": acc, "null": null, "p": float(p), "chance": 1.0 / np.unique(y).size}


def decode_pair(pair, geometry, labels, cfg, rng):
    """Every decoding of DECODINGS[pair] for every representation of one network."""
    out = {}
    for rep, geo in geometry.items():
        X = geo["end_point"][:, :cfg["n_pcs"]].astype(np.float64)
        out[rep] = {f"{label}_by_{held}": decode(X, labels[label], labels[held], cfg["ridge"],
                                                 cfg["n_shuffles"], rng)
                    for label, held in DECODINGS[pair]}
    return out


# ----------------------------------------------------------------------------------------
# Figures: one function per panel, taking data and an ax


def trial_style(pair, labels, i):
    """(colour, marker) of trial i: dmc by category, delaydm by stim1 direction; marker by rule."""
    import matplotlib.pyplot as plt
    marker = "o^"[labels["rule"][i]]
    if pair == "dmc":
        return ("tab:blue", "tab:orange")[labels["category"][i]], marker
    return plt.get_cmap("hsv")(labels["direction"][i] / N_DIRS), marker


def plot_plane(ax, geo, pair, labels, title):
    """Delay trajectories (first repeat of each condition) and every end-of-delay point in
    the PC1-PC2 plane; a cross marks where each drawn trajectory starts."""
    traj, evr = geo["trajectory"], geo["explained_variance_ratio"]
    for i in range(len(traj)):
        color, marker = trial_style(pair, labels, i)
        if labels["repeat"][i] == 0:
            ax.plot(traj[i, :, 0], traj[i, :, 1], color=color, lw=0.7, alpha=0.6)
            ax.scatter(traj[i, 0, 0], traj[i, 0, 1], marker="x", s=12, color=color, lw=0.8)
        ax.scatter(traj[i, -1, 0], traj[i, -1, 1], marker=marker, s=22, color=color,
                   edgecolors="k", linewidths=0.4, zorder=3)
    ax.set_xlabel(f"PC1 ({100 * evr[0]:.0f}% var.)")
    ax.set_ylabel(f"PC2 ({100 * evr[1]:.0f}% var.)")
    ax.set_title(title)


def plane_legend(ax, pair):
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    rules = PAIRS[pair]
    handles = [Line2D([], [], ls="", marker=m, color="0.5", label=f"{r} end")
               for m, r in zip("o^", rules)]
    handles.append(Line2D([], [], ls="", marker="x", color="0.5", label="delay onset"))
    if pair == "dmc":
        handles += [Line2D([], [], color=c, label=lab) for c, lab in
                    (("tab:blue", "category θ < π"), ("tab:orange", "category θ > π"))]
    else:
        handles += [Line2D([], [], color=plt.get_cmap("hsv")(d / N_DIRS), label=f"{45 * d}°")
                    for d in range(N_DIRS)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)


REP_COLORS = {"hidden": "tab:blue", "WM": "tab:green"}


def plot_decoding(ax, decodings, reps, pair, networks):
    """CV accuracy per decoding (groups) and representation (bars): trained bar, untrained
    dot, the 95th percentile of the label-permutation null (black tick), chance (red dashes)."""
    names = [f"{label}_by_{held}" for label, held in DECODINGS[pair]]
    width = 0.8 / len(reps)
    for g, name in enumerate(names):
        for j, rep in enumerate(reps):
            x = g + (j - (len(reps) - 1) / 2) * width
            d = decodings["trained"][rep][name]
            ax.bar(x, d["accuracy"], width * 0.9, color=REP_COLORS[rep], alpha=0.75,
                   label=f"trained, {REP_LABELS[rep]}" if g == 0 else None)
            if "untrained" in networks:
                ax.scatter(x, decodings["untrained"][rep][name]["accuracy"], color="0.2",
                           zorder=3, s=16, label="untrained" if g == j == 0 else None)
            if np.isfinite(d["null"]).any():
                ax.plot([x - width / 2, x + width / 2], [np.nanpercentile(d["null"], 95)] * 2,
                        color="k", lw=1.5, label="shuffled labels, 95th pct." if g == j == 0
                        else None)
        ax.plot([g - 0.45, g + 0.45], [decodings["trained"][reps[0]][name]["chance"]] * 2,
                color="tab:red", ls="--", lw=1, label="chance" if g == 0 else None)
    labels = [name.replace("_x_", " x ").replace("_by_", "\n(held out: ") + ")" for name in names]
    ax.set_xticks(range(len(names)), labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("cross-validated accuracy")
    ax.set_title(f"{' / '.join(PAIRS[pair])}: decoding at the end of the delay")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)


def plot_convergence(ax, conv_by_net, cfg, title):
    """Step size / delay excursion over the delay: median over trials and 10-90% band."""
    for name, color in (("trained", "tab:blue"), ("untrained", "0.5")):
        if name not in conv_by_net:
            continue
        conv = conv_by_net[name]
        rel = conv["step_norm"] / np.where(conv["excursion"] > 0, conv["excursion"], np.nan)[:, None]
        t_s = (np.arange(rel.shape[1]) + 1) * 0.04
        lo, mid, hi = np.nanpercentile(rel, [10, 50, 90], axis=0)
        ax.fill_between(t_s, lo, hi, color=color, alpha=0.25, lw=0)
        ax.plot(t_s, mid, color=color, label=f"{name}: {100 * conv['fraction_converged']:.0f}% "
                                              f"converged, late drift "
                                              f"{conv['median_late_drift']:.2f}")
    ax.axhline(cfg["converge_tol"], color="tab:red", ls="--", lw=1, label="criterion")
    ax.set_yscale("log")
    ax.set_xlabel("time in delay (s)")
    ax.set_ylabel("step size / delay excursion")
    ax.set_title(title)
    ax.legend(fontsize=6, loc="upper right")


def figure_planes(result, path):
    import matplotlib.pyplot as plt
    pairs, reps = result["pairs"], result["representations"]
    fig, axes = plt.subplots(len(pairs), len(reps), figsize=(4.0 * len(reps) + 1.6,
                                                             3.6 * len(pairs)), squeeze=False)
    for i, pair in enumerate(pairs):
        for j, rep in enumerate(reps):
            plot_plane(axes[i, j], result["trained"][pair][rep], pair, result["labels"][pair],
                       f"{' / '.join(PAIRS[pair])}: {REP_LABELS[rep]}")
        plane_legend(axes[i, -1], pair)
    fig.suptitle(f"{result['run']}: delay trajectories ({result['delay_s']:.0f} s) and "
                 f"end-of-delay points, PCA of the pooled delay states", fontsize=9)
    fig.tight_layout()
    return helper.save_figure(fig, path)


def figure_decoding(result, path):
    import matplotlib.pyplot as plt
    pairs = result["pairs"]
    fig, axes = plt.subplots(1, len(pairs), figsize=(6.4 * len(pairs), 3.6), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        decodings = {name: {rep: result[name][pair][rep]["decoding"]
                            for rep in result["representations"]} for name in result["networks"]}
        plot_decoding(ax, decodings, result["representations"], pair, result["networks"])
    fig.suptitle(result["run"], fontsize=8)
    fig.tight_layout()
    return helper.save_figure(fig, path)


def figure_convergence(result, cfg, path):
    import matplotlib.pyplot as plt
    pairs, reps = result["pairs"], result["representations"]
    fig, axes = plt.subplots(len(pairs), len(reps), figsize=(4.0 * len(reps), 3.2 * len(pairs)),
                             squeeze=False)
    for i, pair in enumerate(pairs):
        for j, rep in enumerate(reps):
            conv = {name: result[name][pair][rep]["convergence"] for name in result["networks"]}
            plot_convergence(axes[i, j], conv, cfg, f"{' / '.join(PAIRS[pair])}: {REP_LABELS[rep]}")
    fig.suptitle(f"{result['run']}: do the delay dynamics settle?", fontsize=9)
    fig.tight_layout()
    return helper.save_figure(fig, path)


# ----------------------------------------------------------------------------------------
# Stage


def check_config(cfg):
    if cfg["n_pcs"] < 2:
        raise helper.StageError(f"n_pcs must be at least 2 (the plane is PC1-PC2), got {cfg['n_pcs']}.")
    if cfg["delay_ms"] < DT_MS * (cfg["converge_window"] + 2):
        raise helper.StageError(f"delay_ms = {cfg['delay_ms']} leaves fewer than converge_window"
                                f" + 2 = {cfg['converge_window'] + 2} delay steps; lengthen it.")
    if cfg["trials_per_direction"] < 1 or cfg["n_shuffles"] < 0:
        raise helper.StageError("trials_per_direction must be >= 1 and n_shuffles >= 0.")


def run_pairs(paths, train_cfg):
    """The sibling pairs whose two rules the run was trained on (a clear error if none)."""
    rules = set(mpn_tasks.run_rules(train_cfg))
    pairs = [pair for pair, siblings in PAIRS.items() if set(siblings) <= rules]
    if not pairs:
        raise helper.StageError(f"run {paths.name!r} was trained on ruleset "
                                f"{train_cfg['ruleset']!r}, which holds neither dmcgo/dmcnogo "
                                f"nor delaydm1/delaydm2; train on 'everything' or 'match'.")
    return pairs


def analyze_run(paths, cfg):
    """Geometry, convergence and decoding of every network and sibling pair of one run."""
    device = helper.get_device(cfg["device"])
    net, train_cfg, step = mpn.load_run(paths, device)
    nets = mpn.with_untrained(net, cfg["untrained_baseline"])
    pairs = run_pairs(paths, train_cfg)
    result = {"run": paths.name, "step": step, "pairs": pairs, "networks": list(nets),
              "labels": {}, "delay_window": {}, "delay_s": cfg["delay_ms"] / 1000}
    for p, pair in enumerate(helper.progress(pairs, desc="sibling pairs", leave=False)):
        io_mode = train_cfg.get("io_mode", "low_dim")
        batch, labels, window = probe_batch(pair, cfg, io_mode, cfg["input_noise"])
        clean = probe_batch(pair, cfg, io_mode, 0.0)[0]
        result["labels"][pair], result["delay_window"][pair] = labels, np.array(window)
        for name, net in nets.items():
            with helper.single_thread():
                geometry = delay_geometry(net, batch, clean, window, cfg, device)
            decoding = decode_pair(pair, geometry, labels, cfg,
                                   np.random.default_rng([cfg["trial_seed"], p, 1]))
            for rep in geometry:
                geometry[rep]["decoding"] = decoding[rep]
            result.setdefault(name, {})[pair] = geometry
    result["representations"] = list(result["trained"][pairs[0]])
    return result


def save_run(result, paths, cfg):
    arrays = {key: result[key] for key in ("labels", "delay_window", *result["networks"])}
    attrs = {key: result[key] for key in ("run", "step", "pairs", "networks",
                                          "representations", "delay_s")}
    helper.save_h5(paths.memory_geometry, arrays, attrs=attrs, cfg=cfg,
                   inputs=[paths.checkpoint])
    for pair in result["pairs"]:
        for rep in result["representations"]:
            geo = result["trained"][pair][rep]
            conv, dec = geo["convergence"], geo["decoding"]
            text = ", ".join(f"{k} {d['accuracy']:.2f} (chance {d['chance']:.2f}, p {d['p']:.3g})"
                             for k, d in dec.items())
            print(f"[{result['run']}] {pair} {REP_LABELS[rep]}: converged "
                  f"{100 * conv['fraction_converged']:.0f}% (median ratio "
                  f"{conv['median_ratio']:.3g}, late drift {conv['median_late_drift']:.3g}); "
                  f"decoding: {text}")
    if not cfg["figures"]:
        return []
    return [figure_planes(result, paths.figure("memory_geometry_pca")),
            figure_decoding(result, paths.figure("memory_geometry_decoding")),
            figure_convergence(result, cfg, paths.figure("memory_geometry_convergence"))]


def main(cfg):
    check_config(cfg)
    helper.set_style()
    results, figures = helper.each_run(cfg, analyze_run, save_run)
    for path in figures:
        print(f"figure: {path}")
    return {"results": results, "figures": figures}


if __name__ == "__main__":
    helper.run_main(main, CONFIG)
