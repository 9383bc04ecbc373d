"""Task-variance matrices of a trained network (SPEC §5.1).

Axis order: trials x time x units, (B, T, N). A modulation tensor M is (B, N_post, N_pre) and
a synapse column is its flattened post-major index `post * N_pre + pre`.

A *task-period* is one (rule, epoch) with epoch in PERIOD_EPOCHS, named like `dmcgo-delay1`.
For a representation z and one task-period with step window [start, stop) shared by all the
rule's (aligned) trials: m[k, t, n] = mean of z[trials with stim1 direction k, t, n]; the task
variance of unit n is the variance of m[:, :, n] pooled over (k, t) (population variance,
ddof 0; only directions that occur in the rule's trials count).

The stage `main` (reads the trained run, writes the variance HDF5 and figures) is added below
the numerical core.
"""
import numpy as np
import torch

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
