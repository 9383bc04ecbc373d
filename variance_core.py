"""Task variance (SPEC §5.2): the numerical core shared by the analysis stage, which computes
the matrices, and the clustering stage, which transforms and clusters them; and the names of
the representations and forms every later stage uses.

A *task-period* is one (rule, epoch) with epoch in PERIOD_EPOCHS, named like `dmcgo-delay1`;
the rows of every variance matrix, in task_periods order. For a representation z and one
task-period with step window [start, stop) shared by all the rule's trials, the task variance
of unit n is (mode "per_step", Yang et al. 2019) the variance of z[:, t, n] across the rule's
conditions at each step t, averaged over the period's steps; (mode "pooled", the reference's
definition) the variance of the stim1-direction means m[k, t, n] pooled over (k, t). Both are
population variances (ddof 0).

Representations (REP_TITLES order): input = x (the embedding output, N_pre columns), hidden =
h, modulation = M (N_post*N_pre synapses, streamed: the M history is never held),
modulation_weighted = W ⊙ M. Forms: `normalized` (each column / its max over rows) and
`unnormalized` (the raw variance; clustered as log1p).

Axis order: trials x time x units, (B, T, N). A modulation tensor M is (B, N_post, N_pre) and
a synapse column is its flattened post-major index `post * N_pre + pre`.
"""
import numpy as np
import torch

import helper

VARIANCE_MODES = ("per_step", "pooled")
UNIT_REPS = ("input", "hidden")  # representations whose columns are units
SYNAPSE_REPS = ("modulation", "modulation_weighted")  # columns are synapses (post-major)
REP_TITLES = {"input": "input x", "hidden": "hidden h", "modulation": "modulation M",
              "modulation_weighted": "W ⊙ M"}  # every representation, in this order
FORMS = ("normalized", "unnormalized")
REP_FORMS = {"input": FORMS, "hidden": FORMS, "modulation": FORMS,
             "modulation_weighted": ("unnormalized",)}  # W ⊙ M normalized = M normalized
REP_SHORT = {"input": "input", "hidden": "hidden", "modulation": "M",
             "modulation_weighted": "W⊙M"}  # in figure labels
FORM_SHORT = {"normalized": "norm", "unnormalized": "unnorm"}
PERIOD_EPOCHS = ("stim1", "delay1", "stim2", "delay2", "go1")  # row epochs, in trial order


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


def task_variance(z, window, stim1_dir_idx=None, mode="per_step"):
    """Task variance (units,) of z (trials, steps, units) within window = (start, stop) steps.

    mode "per_step": variance across trials at each step, averaged over the window's steps;
    "pooled": variance of the stim1-direction means (stim1_dir_idx (trials,)) pooled over
    (direction, step). z may be numpy or torch; the result is a float64 numpy array.
    """
    check_variance_mode(mode)
    if isinstance(z, torch.Tensor):
        z = z.detach().cpu().numpy()
    if len(z) == 0:
        raise helper.StageError("task variance needs at least one condition; the rule's "
                                "condition set is empty.")
    start, stop = window
    zw = np.asarray(z[:, start:stop], dtype=np.float64)
    if mode == "per_step":
        return zw.var(axis=0).mean(axis=0)
    dirs = np.asarray(stim1_dir_idx)
    m = np.stack([zw[dirs == k].mean(axis=0) for k in np.unique(dirs)])  # (K, steps, units)
    return m.reshape(-1, m.shape[-1]).var(axis=0)


def check_variance_mode(mode):
    if mode not in VARIANCE_MODES:
        raise helper.StageError(f"unknown variance mode {mode!r}; use one of "
                                f"{', '.join(VARIANCE_MODES)}.")


def task_variance_matrix(z_by_rule, windows_by_rule, dirs_by_rule=None, mode="per_step"):
    """(n_periods, units) task-variance matrix of in-memory activity, rows as task_periods."""
    rows = []
    for rule, windows in windows_by_rule.items():
        dirs = None if dirs_by_rule is None else dirs_by_rule[rule]
        for epoch in PERIOD_EPOCHS:
            if epoch in windows:
                rows.append(task_variance(z_by_rule[rule], windows[epoch], dirs, mode))
    return np.stack(rows)


def _period_rows(row_names, rule, windows):
    """[(row, start, stop, offset into a per-step buffer)] of a rule's periods; buffer steps."""
    periods, offset = [], 0
    for epoch in PERIOD_EPOCHS:
        if epoch in windows:
            start, stop = windows[epoch]
            periods.append((row_names.index(f"{rule}-{epoch}"), start, stop, offset))
            offset += stop - start
    return periods, offset


def _variance_of(m2, count, done, weight):
    """(n_rows, C) float64 numpy from (n_rows, C) M2 and (n_rows,) counts; NaN rows not done;
    weight W (N_post, N_pre) -> the variance of W ⊙ M, which is W² ⊙ var(M) (W is fixed)."""
    var = (m2 / count.clamp(min=1)[:, None]).cpu().numpy()
    var[~done] = np.nan
    if weight is not None:
        if isinstance(weight, torch.Tensor):
            weight = weight.detach().cpu().numpy()
        var = var * np.asarray(weight, dtype=np.float64).reshape(1, -1) ** 2
    return var


class StepModulationVariance:
    """Per-step task variance of M (B, N_post, N_pre) across conditions, streamed (SPEC §5.2).

    Same protocol as StreamingModulationVariance (start_rule, start_chunk, the m_reduce
    callback, end_rule, variance); directions are ignored. Per step t of the rule's periods a
    float64 accumulator holds (mean, M2) of M_{t-1} over the trials streamed so far; each
    chunk's own (mean, M2), computed in M's dtype around the chunk mean, is merged with Chan's
    pairwise update (the numerically stable form of sum / sum-of-squares accumulators). At
    end_rule each period's row is the mean over its steps of M2 / n_trials.
    Memory: 16 * C bytes per buffered step (C = N_post*N_pre; 210 MB for a delaydm rule at
    N = 300, quantile 1) plus 8 * n_rows * C for the rows (35 MB).
    W ⊙ M: W is fixed within a trial, so var(W ⊙ M) = W² ⊙ var(M) exactly: `variance(weight=W)`.
    """

    def __init__(self, row_names, n_post, n_pre, *, device="cpu", dtype=torch.float64):
        self.row_names = list(row_names)
        self.n_cols = n_post * n_pre
        self.device, self.dtype = torch.device(device), dtype
        self.rows = torch.zeros(len(self.row_names), self.n_cols, device=self.device, dtype=dtype)
        self.done = np.zeros(len(self.row_names), dtype=bool)
        self.rule = None

    def start_rule(self, rule, windows, dir_counts):
        """windows: {epoch: (start, stop)}; dir_counts: trials per direction (their sum is
        the number of trials the rule must stream)."""
        if self.rule is not None:
            raise RuntimeError(f"rule {self.rule!r} not ended; call end_rule() first")
        self.rule = rule
        self.periods, n_steps = _period_rows(self.row_names, rule, windows)
        self.expected, self.seen, self.n = int(np.sum(dir_counts)), 0, 0
        self.mean = torch.zeros(n_steps, self.n_cols, device=self.device, dtype=self.dtype)
        self.m2 = torch.zeros_like(self.mean)

    def start_chunk(self, stim1_dir_idx):
        """Declare the next chunk's trials (their number is what counts here)."""
        self.n = self.seen
        self.seen += len(stim1_dir_idx)

    def __call__(self, t, M_prev):
        """m_reduce callback: merge M_{t-1} (B, N_post, N_pre) of the current chunk at step t."""
        for _, start, stop, offset in self.periods:
            if start <= t < stop:
                flat = M_prev.detach().reshape(M_prev.shape[0], -1)
                n_b = flat.shape[0]
                mean_b = flat.mean(dim=0)
                m2_b = ((flat - mean_b) ** 2).sum(dim=0).to(self.dtype)
                i, n_a = offset + t - start, float(self.n)
                delta = mean_b.to(self.dtype) - self.mean[i]
                self.mean[i] += delta * (n_b / (n_a + n_b))
                self.m2[i] += m2_b + delta ** 2 * (n_a * n_b / (n_a + n_b))

    def end_rule(self):
        """Finalise the rule's rows (every declared trial must have been streamed)."""
        if self.seen != self.expected:
            raise RuntimeError(f"rule {self.rule!r}: streamed {self.seen} trials, expected "
                               f"{self.expected}")
        for row, start, stop, offset in self.periods:
            self.rows[row] = (self.m2[offset:offset + stop - start] / self.seen).mean(dim=0)
            self.done[row] = True
        self.rule = self.mean = self.m2 = None

    def variance(self, weight=None):
        """(n_rows, N_post*N_pre) float64 numpy; rows of rules never streamed are NaN."""
        return _variance_of(self.rows, torch.ones(len(self.rows), dtype=self.dtype,
                                                  device=self.device), self.done, weight)


class StreamingModulationVariance:
    """Exact `pooled` task variance of M (B, N_post, N_pre), streamed step by step.

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
        self.periods, self.n_buf_steps = _period_rows(self.row_names, rule, windows)
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
        return _variance_of(self.m2, self.count, self.done, weight)


def normalize_columns(V):
    """Each column divided by its max over rows; all-zero columns stay 0 (`normalized` form)."""
    V = np.asarray(V, dtype=np.float64)
    vmax = V.max(axis=0)
    safe = np.where(vmax > 0, vmax, 1.0)
    return np.where(vmax > 0, V / safe, 0.0)


def log_transform(V):
    """The `unnormalized` form as clustered: log1p of the raw task variance."""
    return np.log1p(np.asarray(V, dtype=np.float64))



MODULATION_STREAMS = {"per_step": StepModulationVariance, "pooled": StreamingModulationVariance}


def variance_provenance(train_cfg, step, analysis):
    """What a variance file is computed from: the run's config and checkpoint step plus the
    analysis settings it records (`analysis`, its attrs["analysis"]). Its helper.config_hash
    is the file's provenance hash; clustering.py recomputes it from the run's checkpoint and
    the file's own settings to refuse a stale file."""
    return {"run_config": train_cfg, "checkpoint_step": int(step), **analysis}
