"""How alike are the representations of different networks? Linear CKA and the orthogonal
Procrustes distance between runs' states on one shared condition set, an MDS picture, and a
permutation test of whether runs of one architecture are closer to each other than to the
others. The numerical core behind `seed_summary.py` (not a stage of its own).

States: for every rule of the runs' rule set, the noise-free factorial condition set
(mpn_tasks.condition_set, durations at `epoch_quantile`; at most `trials_per_rule` conditions
at an even stride, `m_trials_per_rule` of them for M), and within each task-period (rule,
epoch) `steps_per_period` evenly spaced steps.
One task-period gives a matrix X (conditions x steps, N) per run whose rows mean the same trial
and step in every run, so two runs compare row for row. For the dmpn, M (N x N_pre per step)
is also compared, reduced to its leading `m_pcs` principal components per run (PCA of that
run's M over all its task-periods; linear CKA and Procrustes are invariant to the rotation PCA
applies, so the reduction only drops the low-variance directions, whose share is reported).

Measures of one pair (X, Y), both column-centred:
  CKA(X, Y) = ‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)       1 for identical geometry, invariant to
                                                    rotations and isotropic scaling;
  d_P(X, Y) = min_Q ‖X/‖X‖_F − Y Q/‖Y‖_F‖_F over orthogonal Q = √(2 − 2‖XᵀY‖_*/(‖X‖_F‖Y‖_F)),
                                                    0 for identical geometry, at most √2
(the narrower matrix is padded with zero columns). A pair's value is the mean over
task-periods.

Permutation test: with D the run x run dissimilarity (d_P, or 1 − CKA), T = mean D between
runs of different architectures − mean D within one architecture; p = (1 + #{T_perm ≥ T}) /
(1 + n_permutations) over random relabellings that keep the group sizes.
"""
import numpy as np
import torch


# ----------------------------------------------------------------------------------------
# The two measures


def _centred(X):
    X = np.asarray(X, dtype=np.float64)
    return X - X.mean(axis=0, keepdims=True)


def linear_cka(X, Y):
    """Linear CKA of two (rows, features) matrices with the same rows; NaN when either
    has no variance."""
    X, Y = _centred(X), _centred(Y)
    xx, yy = np.linalg.norm(X.T @ X), np.linalg.norm(Y.T @ Y)
    if xx == 0 or yy == 0:
        return np.nan
    return float(np.linalg.norm(X.T @ Y) ** 2 / (xx * yy))


def procrustes_distance(X, Y):
    """Orthogonal Procrustes distance of the centred, unit-norm matrices (module docstring);
    NaN when either has no variance."""
    X, Y = _centred(X), _centred(Y)
    nx, ny = np.linalg.norm(X), np.linalg.norm(Y)
    if nx == 0 or ny == 0:
        return np.nan
    nuclear = np.linalg.svd((X / nx).T @ (Y / ny), compute_uv=False).sum()
    return float(np.sqrt(max(0.0, 2.0 - 2.0 * nuclear)))


def pairwise(states, keys=None):
    """{"cka": (n, n), "procrustes": (n, n), "periods": [...], "cka_by_period": (P, n, n),
    "procrustes_by_period": (P, n, n)} of the runs' states ({run: {period: X}}): each measure
    per task-period all runs share, and its mean over them."""
    names = list(states)
    periods = keys or sorted(set.intersection(*(set(states[n]) for n in names)))
    n, P = len(names), len(periods)
    cka = np.ones((P, n, n))
    dist = np.zeros((P, n, n))
    for i in range(n):
        for j in range(i + 1, n):
            a, b = states[names[i]], states[names[j]]
            for p, period in enumerate(periods):
                cka[p, i, j] = cka[p, j, i] = linear_cka(a[period], b[period])
                dist[p, i, j] = dist[p, j, i] = procrustes_distance(a[period], b[period])
    return {"runs": names, "periods": periods, "cka_by_period": cka,
            "procrustes_by_period": dist, "cka": np.nanmean(cka, axis=0),
            "procrustes": np.nanmean(dist, axis=0)}


# ----------------------------------------------------------------------------------------
# Grouping: permutation test and MDS


def group_statistic(D, labels):
    """Mean dissimilarity between groups minus mean within groups (off-diagonal pairs)."""
    labels = np.asarray(labels)
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    return float(D[off & ~same].mean() - D[off & same].mean())


def permutation_test(D, labels, n_permutations=9999, seed=0):
    """{"statistic", "p", "null"} of group_statistic under random relabellings (group sizes
    kept). Needs at least two groups and one group with two members."""
    labels = np.asarray(labels)
    groups, counts = np.unique(labels, return_counts=True)
    if len(groups) < 2 or counts.max() < 2:
        raise ValueError("the grouping test needs two groups and a group of two or more runs")
    rng = np.random.default_rng(seed)
    observed = group_statistic(D, labels)
    null = np.array([group_statistic(D, rng.permutation(labels)) for _ in range(n_permutations)])
    p = (1 + np.sum(null >= observed - 1e-12)) / (1 + n_permutations)
    return {"statistic": observed, "p": float(p), "null": null}


def within_between(D, labels):
    """{group: {"within": mean ± s.d., "between": ...}} of the off-diagonal dissimilarities."""
    labels = np.asarray(labels)
    out = {}
    for g in np.unique(labels):
        mine = labels == g
        within = D[np.ix_(mine, mine)][~np.eye(mine.sum(), dtype=bool)]
        between = D[np.ix_(mine, ~mine)].ravel()
        out[str(g)] = {name: [float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0]
                       for name, v in (("within", within), ("between", between)) if len(v)}
    return out


def mds(D):
    """(n, 2) classical (Torgerson) MDS coordinates of a dissimilarity matrix: the top two
    eigenvectors of the double-centred −D²/2, scaled by √eigenvalue (deterministic; sign
    fixed so each axis's largest |coordinate| is positive)."""
    D = np.asarray(D, dtype=np.float64)
    n = len(D)
    D = (D + D.T) / 2
    J = np.eye(n) - 1.0 / n
    B = -0.5 * J @ (D ** 2) @ J
    vals, vecs = np.linalg.eigh(B)
    order = np.argsort(vals)[::-1][:2]
    xy = vecs[:, order] * np.sqrt(np.maximum(vals[order], 0.0))
    flip = np.sign(xy[np.argmax(np.abs(xy), axis=0), np.arange(xy.shape[1])])
    xy = xy * np.where(flip == 0, 1.0, flip)
    return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))


# ----------------------------------------------------------------------------------------
# States of one network on the shared condition set


def period_steps(batch, epochs, steps_per_period):
    """{epoch: step indices} of an aligned batch: steps_per_period evenly spaced steps inside
    each epoch of `epochs` the batch has."""
    out = {}
    for epoch in epochs:
        ep = batch.epochs.get(epoch)
        if ep is None or (ep[:, 0] < 0).all():
            continue
        start, stop = int(ep[0, 0]), int(ep[0, 1])
        out[epoch] = np.unique(np.linspace(start, stop - 1, steps_per_period).round().astype(int))
    return out


def _even(n, m):
    return np.unique(np.linspace(0, n - 1, min(n, m)).round().astype(int))


def condition_batches(rules, cfg, io_mode):
    """{rule: (batch, trials for h, trials for M)}: the noise-free condition sets, at most
    trials_per_rule conditions each (m_trials_per_rule for M, a subset) at an even stride."""
    import mpn_tasks
    out = {}
    for rule in rules:
        batch = mpn_tasks.condition_set(rule, quantile=cfg["epoch_quantile"], io_mode=io_mode)
        keep = _even(batch.inputs.shape[0], cfg["trials_per_rule"])
        out[rule] = (batch, keep, keep[_even(len(keep), cfg["m_trials_per_rule"])])
    return out


@torch.no_grad()
def network_states(net, batches, epochs, steps_per_period):
    """{"h": {period: X}, ["M": {period: (trials x steps, N·N_pre) float32}]} of one network."""
    out = {"h": {}}
    if net.plastic:
        out["M"] = {}
    dtype = next(net.parameters()).dtype
    for rule, (batch, keep, keep_m) in batches.items():
        steps = period_steps(batch, epochs, steps_per_period)
        h = net(torch.as_tensor(batch.inputs[keep], dtype=dtype))["h"].cpu().numpy()
        for epoch, s in steps.items():
            out["h"][f"{rule}-{epoch}"] = h[:, s].reshape(-1, h.shape[-1]).astype(np.float64)
        if net.plastic:
            all_steps = sorted({int(t) for s in steps.values() for t in s})
            M = net.states_at(torch.as_tensor(batch.inputs[keep_m], dtype=dtype), all_steps)
            M = M.reshape(len(keep_m), len(all_steps), -1).cpu().numpy().astype(np.float32)
            for epoch, s in steps.items():
                idx = [all_steps.index(int(t)) for t in s]
                out["M"][f"{rule}-{epoch}"] = M[:, idx].reshape(len(keep_m) * len(idx), -1)
    return out


def reduce_by_pca(periods, n_pcs, seed=0):
    """The periods' matrices projected on their pooled leading n_pcs principal components
    (one randomized PCA over all rows, fixed seed), and the share of variance kept."""
    from sklearn.decomposition import PCA
    keys = list(periods)
    pooled = np.concatenate([periods[k] for k in keys])
    n_pcs = min(n_pcs, *pooled.shape)
    pca = PCA(n_components=n_pcs, svd_solver="randomized", random_state=seed).fit(pooled)
    return ({k: pca.transform(periods[k]).astype(np.float64) for k in keys},
            float(pca.explained_variance_ratio_.sum()))
