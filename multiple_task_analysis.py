"""Task-variance matrices of a trained network (SPEC §5.1), and the multi-seed summary.

Reads:  runs/<aname>/checkpoint.pt (its config gives the rules and io_mode).
Writes: runs/<aname>/task_variance.h5: groups input, hidden, modulation, modulation_weighted,
        each with datasets normalized and unnormalized (49 task-periods x columns; raw task
        variance, log1p is applied only when clustering), root dataset row_names, group pca
        (per rule the stim1-direction-mean hidden trajectories on their first 3 PCs), and
        attrs: provenance, analysis config, run, checkpoint step, epoch windows;
        runs/<aname>/figures/variance_*.png, weights.png, hidden_pca.png.
        With --summary=True: runs/summary/seed_summary.pkl and seed_summary.png (per-rule
        accuracy across seeds, selected k across seeds, co-clustering of sibling rules).

Axis order: trials x time x units, (B, T, N). A modulation tensor M is (B, N_post, N_pre) and
a synapse column is its flattened post-major index `post * N_pre + pre`.

A *task-period* is one (rule, epoch) with epoch in PERIOD_EPOCHS, named like `dmcgo-delay1`.
For a representation z and one task-period with step window [start, stop) shared by all the
rule's (aligned) trials: m[k, t, n] = mean of z[trials with stim1 direction k, t, n]; the task
variance of unit n is the variance of m[:, :, n] pooled over (k, t) (population variance,
ddof 0; only directions that occur in the rule's trials count).

Representations: input = x (the embedding output, N_pre columns), hidden = h, modulation = M
(N_post*N_pre synapses, streamed: the M history is never held), modulation_weighted = W ⊙ M.
Vanilla-RNN and GRU runs have no embedding and no M: only hidden.

Example:
    python multiple_task_analysis.py --run=everything_dmpn_seed749_L21e4_h300_b128
    python multiple_task_analysis.py --summary=True --runs='everything_dmpn_seed*'
"""
import time

import numpy as np
import torch

import helper

CONFIG = dict(
    run="everything_dmpn_seed*",  # run name or glob (quote globs in the shell)
    runs_dir=None,  # runs root; None = $MPN_RUNS_DIR, else runs/
    n_analysis=48,  # aligned trials per rule (>= 8; 48 balances the 8 directions and dmc's 6)
    quantile=1.0,  # epoch durations at this quantile of their ranges (1.0 = longest)
    trial_seed=0,  # seeds the trial conditions other than the stim1 direction (with the run seed)
    chunk_size=16,  # trials per forward pass (sorted by direction: few M-stream buffers open)
    device="auto",  # "auto" (cuda if available), "cpu" or "cuda"
    engine="auto",  # plastic-layer engine of mpn_engine: "auto", "fast" or "reference"
    torch_threads=1,  # torch CPU threads (0: default); N=300, shared 2 cores: 1 -> 28 s, 2 -> 380 s
    figures=True,  # draw the figures (the HDF5 file is written either way)
    summary=False,  # True: summarise the runs matching `runs` across seeds (instead of `run`)
    runs="everything_dmpn_seed*",  # run-name glob summarised by --summary=True
)

PRODUCER = "python multiple_task_analysis.py"
ANALYSIS_KEYS = ("n_analysis", "quantile", "trial_seed")  # what the variance matrices depend on
TRIAL_STREAM = 60  # second entry of the analysis trials' numpy seed list, after the run seed
UNIT_REPS = ("input", "hidden")  # representations whose columns are units
SYNAPSE_REPS = ("modulation", "modulation_weighted")  # columns are synapses (post-major)
FORMS = ("normalized", "unnormalized")
SIBLINGS = (("dmcgo", "dmcnogo"), ("delaydm1", "delaydm2"), ("contextdelaydm1", "contextdelaydm2"))

PERIOD_EPOCHS = ("stim1", "delay1", "stim2", "delay2", "go1")  # row epochs, in trial order
N_DIRS = 8  # stimulus directions 0, 45, ..., 315 degrees


# ---------------------------------------------------------------------------------------
# Numerical core: task-periods, task variance, streamed modulation variance, normalisation
# ---------------------------------------------------------------------------------------

def rule_windows(batch):
    """{epoch: (start, stop) steps} of the PERIOD_EPOCHS an aligned batch's trials have.

    Every trial of an aligned batch shares its epoch boundaries; a batch whose trials disagree
    is refused, because task variance averages trials step by step.
    """
    windows = {}
    for epoch in PERIOD_EPOCHS:
        ep = batch.epochs.get(epoch)
        if ep is None or (ep[:, 0] < 0).all():
            continue
        if not (ep == ep[0]).all():
            raise ValueError(f"epoch {epoch!r} is not aligned across trials; use an aligned batch")
        windows[epoch] = (int(ep[0, 0]), int(ep[0, 1]))
    return windows


def task_periods(epochs_by_rule):
    """Row names `rule-epoch` in the fixed order used by every variance matrix.

    epochs_by_rule: {rule: epochs the rule has} in rule order (e.g. {rule: rule_windows(b)};
    any iterable of epoch names works). Order: rule-major in the mapping's order (RULES
    order for the stage), then epochs in PERIOD_EPOCHS order (stim1, delay1, stim2, delay2,
    go1). For ruleset `everything` this gives the 49 rows of SPEC §5.1.
    """
    return [f"{rule}-{epoch}" for rule, epochs in epochs_by_rule.items()
            for epoch in PERIOD_EPOCHS if epoch in epochs]


def direction_index(angle, n_dirs=N_DIRS):
    """Nearest of the n_dirs stimulus directions (int index) for angles in radians."""
    return np.rint(np.asarray(angle) / (2 * np.pi / n_dirs)).astype(np.int64) % n_dirs


def task_variance(z, window, stim1_dir_idx):
    """Task variance (units,) of z (trials, steps, units) within window = (start, stop) steps.

    z may be numpy or torch; the result is a float64 numpy array.
    """
    if isinstance(z, torch.Tensor):
        z = z.detach().cpu().numpy()
    start, stop = window
    zw = np.asarray(z[:, start:stop], dtype=np.float64)
    dirs = np.asarray(stim1_dir_idx)
    m = np.stack([zw[dirs == k].mean(axis=0) for k in np.unique(dirs)])  # (K, steps, units)
    return m.reshape(-1, m.shape[-1]).var(axis=0)


def task_variance_matrix(z_by_rule, windows_by_rule, dirs_by_rule):
    """(n_periods, units) task-variance matrix of in-memory activity, rows as task_periods."""
    rows = []
    for rule, windows in windows_by_rule.items():
        for epoch in PERIOD_EPOCHS:
            if epoch in windows:
                rows.append(task_variance(z_by_rule[rule], windows[epoch], dirs_by_rule[rule]))
    return np.stack(rows)


class StreamingModulationVariance:
    """Exact task variance of M (B, N_post, N_pre), streamed step by step, never stored.

    Use per rule:
        acc.start_rule(rule, windows, dir_counts)
        for each chunk of the rule's trials:
            acc.start_chunk(stim1_dir_idx_of_chunk)
            net(inputs, m_reduce=acc)           # calls acc(t, M_prev) at every step t
        acc.end_rule()
    then `acc.variance()` (n_periods, N_post*N_pre) and `acc.variance(weight=W)` for W ⊙ M.

    Scheme: the direction mean m[k, t] is final only when every trial of direction k has
    passed step t, and chunks may split a direction. So per *open* direction (seen, not yet
    complete) a float64 buffer holds the per-step sums of M over that direction's trials, for
    the steps of the rule's periods. When a direction's trial count reaches `dir_counts[k]`
    (checked at each chunk boundary) its means m[k, :] are final: each period's (mean over
    steps, sum of squared deviations) is merged into the period's running (count, mean, M2)
    with Chan's pairwise update (numerically stable), and the buffer is freed.
    Memory: 16 * n_periods * C bytes for the running state (C = N_post*N_pre; 70 MB at
    N = 300, 49 rows) plus 8 * C * (sum of the rule's period steps) per open direction
    (~100 MB per direction for a delaydm rule at the maximum quantile, N = 300). Sort a rule's
    trials by direction before chunking so at most ~2 directions are open at once; with
    unsorted chunks all 8 may be open (~0.8 GB).

    W ⊙ M: W is constant within a trial, so its direction means are W ⊙ m and its task
    variance is exactly W² ⊙ var(M); `variance(weight=W)` returns that (one accumulation serves
    both matrices).
    """

    def __init__(self, row_names, n_post, n_pre, *, device="cpu", dtype=torch.float64):
        self.row_names = list(row_names)
        self.n_cols = n_post * n_pre
        self.device, self.dtype = torch.device(device), dtype
        n_rows = len(self.row_names)
        self.count = torch.zeros(n_rows, device=self.device, dtype=dtype)  # (k, t) cells merged
        self.mean = torch.zeros(n_rows, self.n_cols, device=self.device, dtype=dtype)
        self.m2 = torch.zeros(n_rows, self.n_cols, device=self.device, dtype=dtype)
        self.done = np.zeros(n_rows, dtype=bool)
        self.rule = None

    def start_rule(self, rule, windows, dir_counts):
        """windows: {epoch: (start, stop)}; dir_counts: (n_dirs,) trials per direction."""
        if self.rule is not None:
            raise RuntimeError(f"rule {self.rule!r} not ended; call end_rule() first")
        self.rule = rule
        self.periods = []  # (row, start, stop, offset into the step buffer)
        offset = 0
        for epoch in PERIOD_EPOCHS:
            if epoch in windows:
                start, stop = windows[epoch]
                self.periods.append((self.row_names.index(f"{rule}-{epoch}"), start, stop, offset))
                offset += stop - start
        self.n_buf_steps = offset
        self.dir_counts = np.asarray(dir_counts, dtype=np.int64)
        self.seen = np.zeros_like(self.dir_counts)
        self.buffers = {}  # direction -> (n_buf_steps, C) per-step sums
        self.chunk_dirs = None

    def start_chunk(self, stim1_dir_idx):
        """Declare the directions of the next chunk's trials, in trial order."""
        self._finalise_complete()
        dirs = np.asarray(stim1_dir_idx, dtype=np.int64)
        self.chunk_dirs = np.unique(dirs)
        onehot = dirs[None, :] == self.chunk_dirs[:, None]  # (K_chunk, B)
        self.onehot = torch.as_tensor(onehot, device=self.device, dtype=self.dtype)
        for k in self.chunk_dirs:
            if k not in self.buffers:
                self.buffers[k] = torch.zeros(self.n_buf_steps, self.n_cols,
                                              device=self.device, dtype=self.dtype)
        np.add.at(self.seen, dirs, 1)

    def __call__(self, t, M_prev):
        """m_reduce callback: add M_{t-1} (B, N_post, N_pre) of the current chunk at step t."""
        for _, start, stop, offset in self.periods:
            if start <= t < stop:
                # direction sums in M's own dtype (<= chunk terms; 4x faster than casting M
                # to float64 first), accumulated across chunks and steps in float64
                flat = M_prev.detach().reshape(M_prev.shape[0], -1)
                sums = (self.onehot.to(flat.dtype) @ flat).to(self.dtype)  # (K_chunk, C)
                for i, k in enumerate(self.chunk_dirs):
                    self.buffers[k][offset + t - start] += sums[i]

    def end_rule(self):
        """Finalise the rule's rows (every declared trial must have been streamed)."""
        if (self.seen != self.dir_counts).any():
            raise RuntimeError(f"rule {self.rule!r}: streamed {self.seen.tolist()} trials per "
                               f"direction, expected {self.dir_counts.tolist()}")
        self._finalise_complete()
        for row, *_ in self.periods:
            self.done[row] = True
        self.rule = None

    def _finalise_complete(self):
        for k in [k for k in self.buffers if self.seen[k] == self.dir_counts[k]]:
            means = self.buffers.pop(k) / float(self.dir_counts[k])
            for row, start, stop, offset in self.periods:
                block = means[offset:offset + stop - start]
                n_b = float(stop - start)
                mean_b = block.mean(dim=0)
                m2_b = ((block - mean_b) ** 2).sum(dim=0)
                n_a = float(self.count[row])
                delta = mean_b - self.mean[row]
                self.mean[row] += delta * (n_b / (n_a + n_b))
                self.m2[row] += m2_b + delta ** 2 * (n_a * n_b / (n_a + n_b))
                self.count[row] += n_b

    def variance(self, weight=None):
        """(n_rows, N_post*N_pre) float64 numpy; rows of rules never streamed are NaN.

        weight: W (N_post, N_pre) numpy or torch -> task variance of W ⊙ M.
        """
        var = (self.m2 / self.count.clamp(min=1)[:, None]).cpu().numpy()
        var[~self.done] = np.nan
        if weight is not None:
            if isinstance(weight, torch.Tensor):
                weight = weight.detach().cpu().numpy()
            var = var * np.asarray(weight, dtype=np.float64).reshape(1, -1) ** 2
        return var


def normalize_columns(V):
    """Each column divided by its max over rows; all-zero columns stay 0 (`normalized` form)."""
    V = np.asarray(V, dtype=np.float64)
    vmax = V.max(axis=0)
    safe = np.where(vmax > 0, vmax, 1.0)
    return np.where(vmax > 0, V / safe, 0.0)


def log_transform(V):
    """The `unnormalized` form as clustered: log1p of the raw task variance."""
    return np.log1p(np.asarray(V, dtype=np.float64))


# ---------------------------------------------------------------------------------------
# Stage: run the trained network on the analysis trials, write the variance file
# ---------------------------------------------------------------------------------------

def run_rules(train_cfg):
    """The rules a run was trained on, in SPEC order."""
    import mpn_tasks
    return list(mpn_tasks.RULESETS[train_cfg["ruleset"]])


def load_network(paths, cfg):
    """(net in eval mode, checkpoint dict) of one run."""
    import net_helpers
    ckpt = net_helpers.load_checkpoint(paths.checkpoint)
    net = net_helpers.model_from_checkpoint(ckpt, device=helper.get_device(cfg["device"]))
    if hasattr(net, "mp"):
        net.mp.engine = cfg["engine"]
    return net.eval(), ckpt


def variance_provenance(train_cfg, step, analysis_cfg):
    """What a variance file is computed from: the run's config and checkpoint step plus the
    analysis keys. Its helper.config_hash is the file's provenance hash; clustering.py
    recomputes it from the checkpoint to refuse a stale file."""
    return {"run_config": train_cfg, "checkpoint_step": int(step),
            **{k: analysis_cfg[k] for k in ANALYSIS_KEYS}}


def analysis_trials(rules, cfg, run_seed, io_mode="low_dim"):
    """{rule: dict(inputs (B, T, n_in) float32, dirs (B,), windows)}: `aligned` trials,
    sigma_x = 0, sorted by stim1 direction so that a chunk spans few directions."""
    import mpn_tasks
    rng = np.random.default_rng([int(run_seed), TRIAL_STREAM, int(cfg["trial_seed"])])
    trials = {}
    for rule in rules:
        batch = mpn_tasks.aligned_batch(rule, cfg["n_analysis"], rng, quantile=cfg["quantile"],
                                        sigma_x=0.0, io_mode=io_mode)
        dirs = direction_index(batch.stim1_dir)
        order = np.argsort(dirs, kind="stable")
        trials[rule] = dict(inputs=batch.inputs[order], dirs=dirs[order],
                            windows=rule_windows(batch))
    return trials


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


def compute_variances(net, trials, chunk_size, desc="task variance"):
    """(raw task-variance matrices {rep: (n_periods, n_columns)}, row names, per rule the
    stim1-direction means of h (n_dirs, T, N)). Modulation rows are streamed (never the M
    history); vanilla/GRU nets give hidden only."""
    rows = task_periods({rule: t["windows"] for rule, t in trials.items()})
    plastic = net.net_type == "dmpn"
    acc = None
    if plastic:
        n_post, n_pre = net.mp.W.shape
        acc = StreamingModulationVariance(rows, n_post, n_pre, device=net.mp.W.device)
    x_rows, h_rows, h_means = [], [], {}
    for rule, t in helper.progress(trials.items(), desc=desc, total=len(trials)):
        if acc is not None:
            acc.start_rule(rule, t["windows"], np.bincount(t["dirs"], minlength=N_DIRS))
        x, h = run_rule(net, t, chunk_size, acc)
        if acc is not None:
            acc.end_rule()
        one = ({rule: t["windows"]}, {rule: t["dirs"]})
        x_rows.append(task_variance_matrix({rule: x}, *one))
        h_rows.append(task_variance_matrix({rule: h}, *one))
        h_means[rule] = np.stack([h[t["dirs"] == k].mean(axis=0) for k in np.unique(t["dirs"])])
    raw = {"hidden": np.concatenate(h_rows)}
    if plastic:
        raw = {"input": np.concatenate(x_rows), "hidden": raw["hidden"],
               "modulation": acc.variance(), "modulation_weighted": acc.variance(weight=net.mp.W)}
    return raw, rows, h_means


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


def save_variance(paths, raw, rows, pca, trials, attrs, provenance_cfg):
    """task_variance.h5: {rep: {normalized, unnormalized}}, row_names, pca/<rule>/..."""
    # float32 on disk halves the file (120 -> 58 MiB at N = 300); 48-trial estimates are far
    # less precise than that
    arrays = {rep: {"normalized": normalize_columns(V).astype(np.float32),
                    "unnormalized": V.astype(np.float32)} for rep, V in raw.items()}
    arrays["row_names"] = np.array(rows)
    arrays["pca"] = {rule: {"trajectories": p["trajectories"].astype(np.float32),
                            "explained": p["explained"],
                            "directions": np.unique(trials[rule]["dirs"])}
                     for rule, p in pca.items()}
    helper.save_h5(paths.variance, arrays, attrs, cfg=provenance_cfg)


def analyze_run(paths, cfg):
    """Variance matrices, PCA trajectories and figures of one run; returns the arrays."""
    t0 = time.time()
    net, ckpt = load_network(paths, cfg)
    train_cfg = ckpt["config"]
    trials = analysis_trials(run_rules(train_cfg), cfg, train_cfg["seed"],
                             train_cfg.get("io_mode", "low_dim"))
    raw, rows, h_means = compute_variances(net, trials, cfg["chunk_size"],
                                           desc=f"{paths.name} task variance")
    pca = hidden_pca(h_means)
    attrs = dict(run=paths.name, net_type=net.net_type, checkpoint_step=int(ckpt["step"]),
                 analysis={k: cfg[k] for k in ANALYSIS_KEYS},
                 windows={rule: t["windows"] for rule, t in trials.items()},
                 n_columns={rep: V.shape[1] for rep, V in raw.items()},
                 seconds=round(time.time() - t0, 1))
    save_variance(paths, raw, rows, pca, trials, attrs,
                  variance_provenance(train_cfg, ckpt["step"], cfg))
    print(f"[{paths.name}] {len(rows)} task-periods x "
          f"{', '.join(f'{rep} {V.shape[1]}' for rep, V in raw.items())} columns in "
          f"{attrs['seconds']:.0f} s -> {paths.variance}")
    if cfg["figures"]:
        for path in make_figures(paths, net):
            print(f"figure: {path}")
    return raw, rows, pca


# ---------------------------------------------------------------------------------------
# Figures of one run (read the variance file and the network's weights)
# ---------------------------------------------------------------------------------------

REP_TITLES = {"input": "input x", "hidden": "hidden h", "modulation": "modulation M",
              "modulation_weighted": "W ⊙ M"}


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
    reps = [rep for rep in REP_TITLES if rep in arrays]
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
        if name == "W_in" and net.net_type == "dmpn":
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
    arrays, attrs = helper.load_h5(paths.variance, f"{PRODUCER} --run={paths.name}")
    figures = [figure_variance(arrays, form, paths.figure(f"variance_{form}")) for form in FORMS]
    figures.append(figure_weights(net, paths.figure("weights")))
    windows = {rule: {e: tuple(w) for e, w in ws.items()} for rule, ws in attrs["windows"].items()}
    pca = {rule: arrays["pca"][rule] for rule in attrs["windows"]}  # rule order, not h5's
    figures.append(figure_pca(pca, windows, paths.figure("hidden_pca")))
    return figures


# ---------------------------------------------------------------------------------------
# Multi-seed summary: accuracy, selected k, co-clustering of sibling rules
# ---------------------------------------------------------------------------------------

def final_accuracy(paths):
    """{"trial": {rule: acc}, "angle": {...}} of the run's last evaluation (log.json)."""
    log = helper.load_json(paths.log, "python multiple_task.py")
    if not log.get("evals"):
        raise helper.StageError(f"{str(paths.log)!r} has no evaluation yet; train the run "
                                f"longer with `python multiple_task.py`.")
    return log["evals"][-1]["acc"]


def cluster_entries(paths):
    """{(rep, form): R} from the run's cluster pickles ({} when clustering has not run)."""
    out = {}
    for attr in ("cluster_info", "cluster_info_mod"):
        path = getattr(paths, attr)
        if path.exists():
            info = helper.load_pickle(path, f"python clustering.py --run={paths.name}")
            out.update({(rep, form): R for rep, forms in info.items() if isinstance(forms, dict)
                        and rep in REP_TITLES for form, R in forms.items()})
    return out


def sibling_periods(row_names):
    """[(label, row_a, row_b)] of the task-periods that sibling rules share."""
    rows = list(row_names)
    return [(f"{a}/{b} {e}", rows.index(f"{a}-{e}"), rows.index(f"{b}-{e}"))
            for a, b in SIBLINGS for e in PERIOD_EPOCHS
            if f"{a}-{e}" in rows and f"{b}-{e}" in rows]


def summarize_seeds(runs):
    """The summary dict over runs (RunPaths with a log)."""
    names = [r.name for r in runs]
    accs = [final_accuracy(r) for r in runs]
    rules = list(accs[0]["trial"])
    acc = {m: np.array([[a[m].get(rule, np.nan) for rule in rules] for a in accs])
           for m in ("trial", "angle")}
    entries = {r.name: cluster_entries(r) for r in runs}
    clustered = [n for n in names if entries[n]]
    keys = [(rep, form) for rep in REP_TITLES for form in FORMS
            if any((rep, form) in entries[n] for n in clustered)]
    k = {f"{rep}-{form}": {axis: [int(entries[n][(rep, form)][key]) for n in clustered
                                  if (rep, form) in entries[n]]
                           for axis, key in (("columns", "k"), ("rows", "row_k"))}
         for rep, form in keys}
    sib_keys = [key for key in keys if key[0] != "modulation_weighted"]
    labels, same, n_seeds = [], None, np.zeros(len(sib_keys), dtype=int)
    for n in clustered:
        for j, key in enumerate(sib_keys):
            R = entries[n].get(key)
            if R is None:
                continue
            periods = sibling_periods(R["row_names"])
            if same is None:
                labels = [p[0] for p in periods]
                same = np.zeros((len(labels), len(sib_keys)), dtype=int)
            lab = np.asarray(R["row_labels"])
            same[:, j] += [int(lab[a] == lab[b]) for _, a, b in periods]
            n_seeds[j] += 1
    return dict(runs=names, rules=rules, acc=acc,
                acc_mean={m: np.nanmean(v, axis=0) for m, v in acc.items()},
                acc_std={m: np.nanstd(v, axis=0) for m, v in acc.items()},
                clustered_runs=clustered, k=k,
                siblings=dict(periods=labels, columns=[f"{r}-{f}" for r, f in sib_keys],
                              same=same if same is not None else np.zeros((0, len(sib_keys))),
                              n_seeds=n_seeds))


def print_summary(summary):
    n = len(summary["runs"])
    print(f"per-rule accuracy over {n} runs (mean ± s.d.):")
    print(f"  {'rule':16s} {'trial':>15s} {'angle':>15s}")
    for i, rule in enumerate(summary["rules"]):
        cells = [f"{summary['acc_mean'][m][i]:.3f} ± {summary['acc_std'][m][i]:.3f}"
                 for m in ("trial", "angle")]
        print(f"  {rule:16s} {cells[0]:>15s} {cells[1]:>15s}")
    print(f"selected k over {len(summary['clustered_runs'])} clustered runs (columns | rows):")
    for key, ks in summary["k"].items():
        print(f"  {key:32s} {ks['columns']} | {ks['rows']}")
    sib = summary["siblings"]
    if len(sib["periods"]):
        print("sibling task-periods in the same row cluster (seeds):")
        w_label, w = max(map(len, sib["periods"])), max(map(len, sib["columns"]))
        print("  " + " " * w_label + "".join(f" {c:>{w}s}" for c in sib["columns"]))
        for i, label in enumerate(sib["periods"]):
            cells = [f"{sib['same'][i, j]}/{sib['n_seeds'][j]}" for j in range(len(sib["columns"]))]
            print(f"  {label:{w_label}s}" + "".join(f" {c:>{w}s}" for c in cells))


def plot_seed_accuracy(ax, summary):
    x = np.arange(len(summary["rules"]))
    for off, m, color in ((-0.2, "trial", "C0"), (0.2, "angle", "C1")):
        ax.bar(x + off, summary["acc_mean"][m], 0.4, yerr=summary["acc_std"][m], color=color,
               alpha=0.7, label=f"{m} (mean ± s.d.)", error_kw={"lw": 0.8})
        for row in summary["acc"][m]:
            ax.plot(x + off, row, ".", color="k", ms=2)
    ax.set_xticks(x)
    ax.set_xticklabels(summary["rules"], rotation=60, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (final evaluation)")
    ax.set_title(f"per-rule accuracy over {len(summary['runs'])} seeds (dots: seeds)")
    ax.legend(loc="upper right", fontsize=7)


def plot_seed_k(ax, summary):
    keys = list(summary["k"])
    for j, (axis, marker) in enumerate((("columns", "o"), ("rows", "s"))):
        for i, key in enumerate(keys):
            ks = summary["k"][key][axis]
            ax.plot(np.full(len(ks), i + 0.15 * (2 * j - 1)), ks, marker, color=f"C{j}", ms=4,
                    alpha=0.7, label=axis if i == 0 else None)
    ax.set_xticks(np.arange(len(keys)))
    ax.set_xticklabels(keys, rotation=45, ha="right")
    ax.set_ylabel("selected k")
    ax.set_title("selected k across seeds")
    ax.legend(fontsize=7)


def plot_siblings(ax, summary):
    sib = summary["siblings"]
    frac = sib["same"] / np.maximum(sib["n_seeds"], 1)[None, :]
    im = ax.imshow(frac, vmin=0, vmax=1, cmap="Greens", aspect="auto")
    for (i, j), v in np.ndenumerate(sib["same"]):
        ax.text(j, i, f"{v}/{sib['n_seeds'][j]}", ha="center", va="center", fontsize=7,
                color="w" if frac[i, j] > 0.6 else "k")
    ax.set_yticks(np.arange(len(sib["periods"])))
    ax.set_yticklabels(sib["periods"], fontsize=7)
    ax.set_xticks(np.arange(len(sib["columns"])))
    ax.set_xticklabels(sib["columns"], rotation=45, ha="right")
    ax.set_title("sibling rows in the same row cluster")
    return im


def figure_seed_summary(summary, path):
    import matplotlib.pyplot as plt
    helper.set_style()
    fig = plt.figure(figsize=(13, 8.5), constrained_layout=True)
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.25])
    plot_seed_accuracy(fig.add_subplot(grid[0, :]), summary)
    if summary["k"]:
        plot_seed_k(fig.add_subplot(grid[1, 0]), summary)
        ax = fig.add_subplot(grid[1, 1])
        fig.colorbar(plot_siblings(ax, summary), ax=ax, shrink=0.8, label="fraction of seeds")
    fig.suptitle(f"multi-seed summary of {len(summary['runs'])} runs")
    return helper.save_figure(fig, path)


def seed_summary(cfg):
    """--summary=True: accuracy, selected k and sibling co-clustering across the runs."""
    runs = helper.find_runs(cfg["runs"], cfg["runs_dir"], need="log")
    summary = summarize_seeds(runs)
    missing = sorted(set(summary["runs"]) - set(summary["clustered_runs"]))
    if missing:
        print(f"no cluster_info for {missing}: run `python clustering.py --run=<aname>` to "
              f"include them in the k and sibling summaries")
    print_summary(summary)
    out = helper.summary_paths(cfg["runs_dir"])
    helper.save_pickle(out.seeds, summary, dict(cfg, runs_found=summary["runs"]))
    figure = figure_seed_summary(summary, out.figure("seed_summary"))
    print(f"summary: {out.seeds}\nfigure: {figure}")
    return summary


# ---------------------------------------------------------------------------------------


def main(cfg):
    """Analyse every run matching cfg["run"] (or summarise cfg["runs"] with summary=True);
    returns {aname: (raw matrices, row names, pca)} or the summary dict."""
    if cfg["summary"]:
        return seed_summary(cfg)
    if cfg["n_analysis"] < N_DIRS:
        raise helper.StageError(f"n_analysis={cfg['n_analysis']} leaves stim1 directions "
                                f"without trials; use at least {N_DIRS} (default 48).")
    threads = torch.get_num_threads()
    if cfg["torch_threads"]:
        torch.set_num_threads(cfg["torch_threads"])
    try:
        return {paths.name: analyze_run(paths, cfg)
                for paths in helper.find_runs(cfg["run"], cfg["runs_dir"])}
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    helper.run_main(main, CONFIG)
