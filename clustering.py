"""Hierarchical clustering of task-variance matrices with automatic k (SPEC §5.2).

Reads:  runs/<aname>/task_variance.h5 (refused when missing or computed from another
        checkpoint / analysis config) and the run's checkpoint (to check that).
Writes: runs/<aname>/cluster_info.pkl      {"input": {"normalized": R, "unnormalized": R},
                                            "hidden": {...}, "fixed_k": int, ...}
        runs/<aname>/cluster_info_mod.pkl  {"modulation": {...}, "modulation_weighted": {...}}
        where R is the dict of `cluster_entry` (labels at the selected, argmax and every k,
        linkages, leaf orders, silhouette / ARI curves, the matrix clustered, row names);
        synapse entries also hold `over_membership` (OM of SPEC §5.2);
        runs/<aname>/figures/clusters_*.png, k_selection.png, over_membership_*.png.

A variance matrix is (n_periods, n_columns): rows are task-periods, columns are units
(neurons) or synapses (post-major). Clustering "columns" means the points are the columns
(features: the rows), clustering "rows" means the points are the task-periods.

Example:
    python clustering.py --run=everything_dmpn_seed749_L21e4_h300_b128

k selection (`choose_k`), for n points:
- Ward linkage (Euclidean) of the unperturbed points, with optimal leaf ordering.
- `n_repeats` jittered copies, every entry x (1 + N(0, jitter²)); each copy gets its own Ward
  linkage, cut at every k in [K_MIN, min(k_max, n - 1)]; silhouette (Euclidean) per copy
  and k; the median over copies is the silhouette curve.
- candidates: every k whose median silhouette >= best - (1 - tol) * |best| (= tol * best for
  a positive best, tol = 0.95).
- among the candidates, the k with the largest merge-height gap of the unperturbed linkage,
  gap(k) = Z[-(k-1), 2] - Z[-k, 2] = (height of the merge that goes from k to k-1 clusters)
  - (height of the merge that goes from k+1 to k clusters): the range of heights over which
  the k-cluster cut is stable. Ties go to the smaller k.
- also kept: the argmax-silhouette k and, per k, the mean adjusted Rand index over all pairs
  of copies.
Cuts take the first n - k merges of a linkage (exactly k clusters, equal to
`fcluster(Z, k, "maxclust")` when merge heights are distinct). Labels are numbered 0..k-1 in
dendrogram (leaf) order, so every cluster is a contiguous block of the leaf order.

Speed: silhouettes and ARIs for all k come from one pass over each linkage's merges. For the
silhouette, S[slot, i] = sum of distances from point i to the members of cluster `slot` is
updated by adding two rows per merge (clusters are kept in compact slots 0..k-1); for the
ARI, the contingency table of each pair of copies is updated the same way, and its sum of
squares changes by 2 <row_a, row_b> per merge. Everything is vectorised over copies/pairs.
"""
import time

import numpy as np
import scipy.sparse
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import pdist, squareform
from sklearn.cluster import MiniBatchKMeans
from threadpoolctl import threadpool_limits

import helper
import multiple_task_analysis as mta
from multiple_task_analysis import log_transform, normalize_columns

CONFIG = dict(
    run="everything_dmpn_seed*",  # run name or glob (quote globs in the shell)
    runs_dir=None,  # runs root; None = $MPN_RUNS_DIR, else runs/
    n_repeats=100,  # jittered copies behind each silhouette / ARI curve
    jitter=0.02,  # std of the multiplicative jitter: each entry x (1 + N(0, jitter²))
    k_max=300,  # largest k considered (rows: at most n_rows - 1)
    tol=0.95,  # k candidates: median silhouette >= best - (1 - tol) x |best|
    n_groups=300,  # synapses: MiniBatchKMeans pre-groups G per restart
    n_restarts=20,  # synapses: pre-grouping restarts (the most consistent one is kept)
    fixed_k=20,  # k later stages may cut at (clipped to the ks computed, e.g. 15 for N=16)
    cluster_seed=0,  # seeds the jitter and k-means restarts (one stream per representation, form)
    figures=True,  # draw the figures (the pickles are written either way)
)

PRODUCER = "python clustering.py"
CLUSTER_KEYS = ("n_repeats", "jitter", "k_max", "tol", "n_groups", "n_restarts", "fixed_k",
                "cluster_seed")  # the keys the clusterings depend on
K_MIN = 5  # smallest k considered
ARI_MEMORY_BYTES = 128 * 2**20  # contingency tables held at once by _pairwise_ari_curves


# ---------------------------------------------------------------------------------------
# Numerical core: linkage, cuts, silhouette/ARI curves, k rule, synapses, over-membership
# ---------------------------------------------------------------------------------------

def ward_linkage(X, optimal_ordering=True):
    """Ward linkage (Euclidean) of the rows of X (points, features), optimal leaf order."""
    return linkage(np.asarray(X, dtype=np.float64), method="ward", metric="euclidean",
                   optimal_ordering=optimal_ordering)


def k_range(n, k_max=300):
    """The ks considered for n points: K_MIN .. min(k_max, n - 1) (empty if n - 1 < K_MIN)."""
    return np.arange(K_MIN, min(k_max, n - 1) + 1)


def merge_gaps(Z, ks):
    """gap(k) = Z[-(k-1), 2] - Z[-k, 2] for each k in ks (see module docstring)."""
    h = Z[:, 2]
    ks = np.asarray(ks)
    return h[len(h) - ks + 1] - h[len(h) - ks]


def silhouette_candidates(silhouette, tol=0.95):
    """Mask of the ks whose silhouette is within (1 - tol) x |best| of the best."""
    silhouette = np.asarray(silhouette)
    best = np.nanmax(silhouette)
    return silhouette >= best - (1.0 - tol) * abs(best)


def select_k(ks, silhouette, gaps, tol=0.95):
    """(k_selected, k_argmax, candidates) by the rule in the module docstring."""
    ks, gaps = np.asarray(ks), np.asarray(gaps)
    keep = silhouette_candidates(silhouette, tol)
    candidates = ks[keep]
    k_selected = int(candidates[np.argmax(gaps[keep])])  # first max = smallest k on ties
    return k_selected, int(ks[np.nanargmax(silhouette)]), candidates


def unresponsive_columns(V, frac=1e-3):
    """Boolean mask of columns whose mean over rows is < frac x the largest column mean."""
    means = np.asarray(V, dtype=np.float64).mean(axis=0)
    return means < frac * means.max()


def _merge_slots(Z):
    """Per merge of Z: (lo, hi) compact slots merged; the cluster in slot k-1 then moves to hi.

    Before merge i there are k = n - i clusters in slots 0..k-1; the merged cluster takes
    slot lo = min, and the last slot's cluster fills the freed slot hi.
    """
    n = len(Z) + 1
    slot_of_node = np.empty(2 * n - 1, dtype=np.int64)
    slot_of_node[:n] = np.arange(n)
    node_of_slot = np.arange(n)
    lo_hi = np.empty((2, n - 1), dtype=np.int64)
    for i, (a, b) in enumerate(Z[:, :2].astype(np.int64)):
        sa, sb = slot_of_node[a], slot_of_node[b]
        lo, hi, last = min(sa, sb), max(sa, sb), n - i - 1
        slot_of_node[n + i], node_of_slot[lo] = lo, n + i
        moved = node_of_slot[last]
        node_of_slot[hi], slot_of_node[moved] = moved, hi
        lo_hi[:, i] = lo, hi
    return lo_hi


def _apply_merge(labels, lo, hi, last):
    """Relabel (R, n) slot labels for one merge per copy (lo, hi: (R,), last: int)."""
    labels = np.where(labels == hi[:, None], lo[:, None], labels)
    return np.where(labels == last, hi[:, None], labels)


def _silhouette_from_sums(S, counts, labels):
    """Mean silhouette per copy. S (R, k, n) distance sums per cluster, counts (R, k)."""
    own_sum = np.take_along_axis(S, labels[:, None, :], axis=1)[:, 0]
    own_n = np.take_along_axis(counts, labels, axis=1)
    a = own_sum / np.maximum(own_n - 1, 1)
    mean = S / counts[:, :, None]
    np.put_along_axis(mean, labels[:, None, :], np.inf, axis=1)
    b = mean.min(axis=1)
    denom = np.maximum(a, b)
    ok = (own_n > 1) & (denom > 0)  # singletons score 0, as in sklearn
    s = np.where(ok, (b - a) / np.where(ok, denom, 1.0), 0.0)
    return s.mean(axis=1)


def _silhouette_curves(D, lo_hi, ks):
    """(silhouettes (R, len(ks)), slot labels (R, len(ks), n)) of every copy's cut at every k.

    D (R, n, n) square distances per copy; lo_hi (R, 2, n-1) from _merge_slots.
    """
    R, n, _ = D.shape
    S = D.astype(np.float32, copy=True)  # S[r, slot, i]; float32 halves the memory traffic
    counts = np.ones((R, n), dtype=np.float32)
    labels = np.tile(np.arange(n), (R, 1))
    ar = np.arange(R)
    sil = np.empty((R, len(ks)))
    cut = np.empty((R, len(ks), n), dtype=np.int32)
    for i in range(n - ks[0]):
        last = n - i - 1
        lo, hi = lo_hi[:, 0, i], lo_hi[:, 1, i]
        S[ar, lo] += S[ar, hi]
        counts[ar, lo] += counts[ar, hi]
        S[ar, hi] = S[ar, last]
        counts[ar, hi] = counts[ar, last]
        labels = _apply_merge(labels, lo, hi, last)
        k = last  # clusters after this merge
        if k <= ks[-1]:
            sil[:, k - ks[0]] = _silhouette_from_sums(S[:, :k], counts[:, :k], labels)
            cut[:, k - ks[0]] = labels
    return sil, cut


def _label_pair_square_sums(cut, ks):
    """(P, len(ks)) sum of squared contingency entries for every pair of copies at every k.

    cut (R, len(ks), n) labels in [0, k). Per k: the pair codes a*k + b of every point are
    sorted per pair and the run lengths squared and summed.
    """
    R, _, n = cut.shape
    r, s = np.triu_indices(R, 1)
    out = np.empty((len(r), len(ks)))
    for j, k in enumerate(ks):
        codes = cut[r, j] * int(k) + cut[s, j]
        codes.sort(axis=1)
        new = np.empty(codes.shape, dtype=bool)
        new[:, 0] = True
        np.not_equal(codes[:, 1:], codes[:, :-1], out=new[:, 1:])
        starts = np.flatnonzero(new)
        runs = np.diff(np.append(starts, codes.size)).astype(np.float64)
        out[:, j] = np.bincount(starts // n, weights=runs ** 2, minlength=len(r))
    return out


def _size_square_sums(lo_hi, weights, ks):
    """(R, len(ks)) sum over clusters of (cluster weight)², weights (R, n) per point."""
    R, n = weights.shape
    w = weights.astype(np.float64, copy=True)
    sq = (w ** 2).sum(axis=1)
    ar = np.arange(R)
    out = np.empty((R, len(ks)))
    for i in range(n - ks[0]):
        last = n - i - 1
        lo, hi = lo_hi[:, 0, i], lo_hi[:, 1, i]
        sq += 2 * w[ar, lo] * w[ar, hi]
        w[ar, lo] += w[ar, hi]
        w[ar, hi] = w[ar, last]
        if last <= ks[-1]:
            out[:, last - ks[0]] = sq
    return out


def _pair_square_sums(lo_hi, ks, pairs, base):
    """(len(pairs), len(ks)) sum of squared contingency entries of each pair's cuts at each k.

    base(pairs_chunk) -> (c, n, n) contingency of the copies' points (items per point pair).
    """
    n = lo_hi.shape[2] + 1
    chunk = max(1, ARI_MEMORY_BYTES // (8 * n * n))
    out = np.empty((len(pairs), len(ks)))
    for c0 in range(0, len(pairs), chunk):
        pc = pairs[c0:c0 + chunk]
        N = base(pc).astype(np.float64, copy=False)
        ss = (N ** 2).sum(axis=(1, 2))
        cp = np.arange(len(pc))
        for i in range(n - ks[0]):
            last = n - i - 1
            for axis, copy_idx in ((1, pc[:, 0]), (2, pc[:, 1])):
                lo, hi = lo_hi[copy_idx, 0, i], lo_hi[copy_idx, 1, i]
                Nv = N if axis == 1 else N.transpose(0, 2, 1)
                a, b = Nv[cp, lo], Nv[cp, hi]
                ss += 2 * (a * b).sum(axis=1)
                Nv[cp, lo] = a + b
                Nv[cp, hi] = Nv[cp, last]
                Nv[cp, last] = 0.0
            if last <= ks[-1]:
                out[c0:c0 + len(pc), last - ks[0]] = ss
    return out


def _pairwise_ari_curves(lo_hi, ks, weights, base=None, cut=None):
    """(pairs (P, 2), ari (P, len(ks))) over all pairs r < s of copies (adjusted Rand index).

    Copies that share their points (weights 1, base None) use their cut labels `cut`;
    copies with their own groups of items use the contingency `base` (see _pair_square_sums).
    """
    R = lo_hi.shape[0]
    pairs = np.stack(np.triu_indices(R, 1), axis=1).astype(np.int64)
    if len(pairs) == 0:
        return pairs.reshape(0, 2), np.empty((0, len(ks)))
    n_items = weights[0].sum()
    sq = _label_pair_square_sums(cut, ks) if base is None else \
        _pair_square_sums(lo_hi, ks, pairs, base)
    index = (sq - n_items) / 2
    size_sq = (_size_square_sums(lo_hi, weights, ks) - n_items) / 2
    sa, sb = size_sq[pairs[:, 0]], size_sq[pairs[:, 1]]
    expected = sa * sb / (n_items * (n_items - 1) / 2)
    top = (sa + sb) / 2
    degenerate = np.isclose(top, expected)
    ari = np.where(degenerate, 1.0, (index - expected) / np.where(degenerate, 1.0, top - expected))
    return pairs, ari


def cut_labels(Z, ks):
    """(len(ks), n) labels of the linkage cut into exactly k clusters, numbered in leaf order."""
    n = len(Z) + 1
    lo_hi = _merge_slots(Z)[None]
    leaves = leaves_list(Z)
    labels = np.arange(n)[None]
    out = np.empty((len(ks), n), dtype=np.int32)
    want = {int(k): j for j, k in enumerate(ks)}
    if n in want:
        out[want[n]] = labels[0]
    for i in range(n - 1):
        last = n - i - 1
        labels = _apply_merge(labels, lo_hi[:, 0, i], lo_hi[:, 1, i], last)
        if last in want:
            out[want[last]] = labels[0]
    for row in out:  # renumber by first appearance along the leaves
        seq = row[leaves]
        _, first = np.unique(seq, return_index=True)
        mapping = np.empty(row.max() + 1, dtype=np.int32)
        mapping[seq[np.sort(first)]] = np.arange(len(first))
        row[:] = mapping[row]
    return out


def _distances(X):
    """Condensed Euclidean distances between the rows of X.

    Wide X (many more features than points, e.g. 49 task-periods x 90,000 synapses) goes
    through one Gram matmul, ~20x faster than pdist's loop there.
    """
    if X.shape[1] <= 4 * X.shape[0]:
        return pdist(X)
    sq = (X ** 2).sum(axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (X @ X.T)
    np.fill_diagonal(d2, 0.0)
    return squareform(np.sqrt(np.clip(d2, 0.0, None)), checks=False)


def _jittered_copies(X, rng, n_repeats, jitter):
    """(D (R, n, n), lo_hi (R, 2, n-1)) of n_repeats jittered copies of the points X.

    Copy r is X * (1 + jitter * E_r), E_r standard normal (float32 draws: half the cost).
    """
    D = np.empty((n_repeats, len(X), len(X)), dtype=np.float32)
    lo_hi = np.empty((n_repeats, 2, len(X) - 1), dtype=np.int64)
    for r in range(n_repeats):
        Xr = X * (1.0 + jitter * rng.standard_normal(X.shape, dtype=np.float32))
        d = _distances(Xr)
        D[r] = squareform(d)
        lo_hi[r] = _merge_slots(linkage(d, method="ward"))
    return D, lo_hi


def _axis_result(Z, ks, sil_copies, ari_pairs, tol):
    """The per-axis dict shared by points and synapses (see choose_k)."""
    n = len(Z) + 1
    sil = np.median(sil_copies, axis=0)
    gaps = merge_gaps(Z, ks)
    k_sel, k_arg, cand = select_k(ks, sil, gaps, tol)
    by_k = cut_labels(Z, ks)
    return dict(
        n=n, ks=ks, silhouette=sil, silhouette_copies=sil_copies,
        ari=ari_pairs.mean(axis=0) if len(ari_pairs) else np.full(len(ks), np.nan),
        gap=gaps, k_candidates=cand, k_selected=k_sel, k_argmax=k_arg,
        linkage=Z, leaf_order=leaves_list(Z), labels=by_k[k_sel - ks[0]], labels_by_k=by_k)


def _trivial_axis(X):
    """Fewer than K_MIN + 1 points: every point its own cluster."""
    n = len(X)
    Z = ward_linkage(X) if n > 1 else np.empty((0, 4))
    labels = np.arange(n, dtype=np.int32)
    return dict(n=n, ks=np.array([n]), silhouette=np.array([np.nan]),
                silhouette_copies=np.full((1, 1), np.nan), ari=np.array([np.nan]),
                gap=np.array([np.nan]), k_candidates=np.array([n]), k_selected=n, k_argmax=n,
                linkage=Z, leaf_order=np.arange(n), labels=labels, labels_by_k=labels[None])


def choose_k(X, rng, *, n_repeats=100, jitter=0.02, k_max=300, tol=0.95):
    """Cluster the points X (n, features) with the k rule of the module docstring.

    Returns dict: n, ks, silhouette (median per k), silhouette_copies (R, n_ks), ari (mean
    pairwise per k), gap, k_candidates, k_selected, k_argmax, linkage (unperturbed, optimal
    leaf order), leaf_order, labels (n,) at k_selected, labels_by_k (n_ks, n).
    """
    X = np.asarray(X, dtype=np.float64)
    ks = k_range(len(X), k_max)
    if len(ks) == 0:
        return _trivial_axis(X)
    Z = ward_linkage(X)
    D, lo_hi = _jittered_copies(X, rng, n_repeats, jitter)
    sil, cut = _silhouette_curves(D, lo_hi, ks)
    _, ari = _pairwise_ari_curves(lo_hi, ks, np.ones((n_repeats, len(X))), cut=cut)
    return _axis_result(Z, ks, sil, ari, tol)


# --- synapses: pre-grouping -------------------------------------------------------------

def pregroup(X, n_groups, seed):
    """(groups (n,), means (n_groups, d)) from MiniBatchKMeans; no group is left empty.

    Group means are the exact means of the final assignment. An empty group takes the point
    farthest from its own centre among groups of two or more. KMeans runs single-threaded:
    its OpenMP threads slow it down many-fold when the cores are shared (measured 40x on a
    loaded 2-core machine, and still 2x on 90,000 x 49 points).
    """
    km = MiniBatchKMeans(n_clusters=n_groups, n_init=1, batch_size=4096, random_state=seed)
    with threadpool_limits(limits=1):
        groups = km.fit(X).labels_.astype(np.int64)
    counts = np.bincount(groups, minlength=n_groups)
    if (counts == 0).any():
        dist = ((X - km.cluster_centers_[groups]) ** 2).sum(axis=1)
        for empty in np.flatnonzero(counts == 0):
            far = np.argmax(np.where(counts[groups] > 1, dist, -1.0))
            counts[groups[far]] -= 1
            groups[far], counts[empty], dist[far] = empty, 1, -1.0
    onehot = scipy.sparse.csr_matrix((np.ones(len(X)), (groups, np.arange(len(X)))),
                                     shape=(n_groups, len(X)))
    means = (onehot @ X) / counts[:, None]
    return groups, means


def cluster_synapses(X, rng, *, n_groups=300, n_restarts=20, k_max=300, tol=0.95,
                     n_repeats=100, jitter=0.02):
    """Cluster many points (synapse columns) X (n, features) via pre-grouping (SPEC §5.2).

    Each restart groups the points with MiniBatchKMeans (G = min(n_groups, distinct points))
    and Ward-clusters the (unweighted) group means; silhouettes on the group means per
    restart give the median curve and the candidate ks. The kept restart has the highest
    ARI with the other restarts (ARI on the points, averaged over the candidate ks); the gap
    rule on its linkage picks k. With n <= n_groups (or < K_MIN + 1 distinct points) the
    points are clustered directly
    (choose_k with jittered copies).
    Returns choose_k's dict, where linkage / leaf_order / labels_by_k refer to the groups of
    the kept restart, plus groups (n,) (point -> group), restart, ari_restarts (n_restarts,
    n_ks) and point-level labels (n,) at k_selected and leaf_order_points (n,).
    """
    X = np.asarray(X, dtype=np.float64)
    G = min(n_groups, len(np.unique(X, axis=0)))
    ks = k_range(G, k_max)
    if len(X) <= n_groups or len(ks) == 0:
        return choose_k(X, rng, n_repeats=n_repeats, jitter=jitter, k_max=k_max, tol=tol)
    seeds = rng.integers(0, 2**31 - 1, size=n_restarts)
    fits = [pregroup(X, G, int(seed)) for seed in seeds]
    groups = np.stack([g for g, _ in fits])
    D = np.stack([squareform(pdist(m)) for _, m in fits])
    lo_hi = np.stack([_merge_slots(linkage(pdist(m), method="ward")) for _, m in fits])
    sizes = np.stack([np.bincount(g, minlength=G) for g in groups]).astype(np.float64)
    sil, _ = _silhouette_curves(D, lo_hi, ks)

    def base(pc):
        codes = groups[pc[:, 0]] * G + groups[pc[:, 1]]
        return np.stack([np.bincount(c, minlength=G * G).reshape(G, G) for c in codes])

    pairs, ari = _pairwise_ari_curves(lo_hi, ks, sizes, base)
    in_cand = silhouette_candidates(np.median(sil, axis=0), tol)
    per_restart = np.zeros((n_restarts, len(ks)))
    for col in (0, 1):
        np.add.at(per_restart, pairs[:, col], ari)
    per_restart /= max(n_restarts - 1, 1)
    restart = int(np.argmax(per_restart[:, in_cand].mean(axis=1)))
    out = _axis_result(ward_linkage(fits[restart][1]), ks, sil, ari, tol)
    out.update(groups=groups[restart], restart=restart, ari_restarts=per_restart,
               labels=out["labels"][groups[restart]],
               leaf_order_points=_expand_leaf_order(out["leaf_order"], groups[restart]))
    return out


def _expand_leaf_order(group_leaves, groups):
    """Point order: groups in leaf order, points of a group in index order."""
    rank = np.empty(len(group_leaves), dtype=np.int64)
    rank[group_leaves] = np.arange(len(group_leaves))
    return np.argsort(rank[groups], kind="stable")


def labels_at(axis_info, k):
    """Column labels (every column) of one axis dict of cluster_representation at k.

    Unresponsive columns get label k (their own, last cluster).
    """
    j = int(np.searchsorted(axis_info["ks"], k))
    if j >= len(axis_info["ks"]) or axis_info["ks"][j] != k:
        raise ValueError(f"k={k} not computed; available {axis_info['ks'][0]}.."
                         f"{axis_info['ks'][-1]}")
    labels = axis_info["labels_by_k"][j]
    if "groups" in axis_info:
        labels = labels[axis_info["groups"]]
    responsive = axis_info.get("responsive")
    if responsive is None:
        return labels
    full = np.full(len(responsive), k, dtype=np.int32)
    full[responsive] = labels
    return full


# --- whole representation ---------------------------------------------------------------

def prepare_matrix(V, form):
    """(matrix to cluster, responsive column mask) for form 'normalized' or 'unnormalized'."""
    V = np.asarray(V, dtype=np.float64)
    if form == "normalized":
        return normalize_columns(V), np.ones(V.shape[1], dtype=bool)
    if form == "unnormalized":
        return log_transform(V), ~unresponsive_columns(V)
    raise ValueError(f"unknown form {form!r}; use 'normalized' or 'unnormalized'")


def cluster_representation(matrix, form, rng, *, row_names=None, synapses=False,
                           n_repeats=100, jitter=0.02, k_max=300, tol=0.95,
                           n_groups=300, n_restarts=20):
    """Cluster the columns and rows of one task-variance matrix (n_periods, n_columns).

    matrix: raw task variance; form: 'normalized' (column / column max) or 'unnormalized'
    (log1p; unresponsive columns excluded and labelled k). synapses=True pre-groups the
    columns (cluster_synapses). Rows are clustered on the responsive columns.
    Returns dict: form, row_names, matrix (the transformed matrix used, all columns),
    responsive (n_columns,) bool, columns and rows (choose_k / cluster_synapses dicts).
    `columns` covers every column: labels (n_columns,) with unresponsive = k_selected,
    leaf_order over all columns (unresponsive last); labels_by_k is over the responsive
    columns (or groups): use labels_at(result["columns"], k) for any k.
    """
    used, responsive = prepare_matrix(matrix, form)
    points = used[:, responsive].T
    opts = dict(n_repeats=n_repeats, jitter=jitter, k_max=k_max, tol=tol)
    if synapses:
        cols = cluster_synapses(points, rng, n_groups=n_groups, n_restarts=n_restarts, **opts)
    else:
        cols = choose_k(points, rng, **opts)
    rows = choose_k(used[:, responsive], rng, **opts)
    resp_idx = np.flatnonzero(responsive)
    order = cols.pop("leaf_order_points", cols["leaf_order"])
    labels = np.full(len(responsive), cols["k_selected"], dtype=np.int32)
    labels[responsive] = cols["labels"]
    cols.update(responsive=responsive, labels=labels,
                leaf_order=np.concatenate([resp_idx[order], np.flatnonzero(~responsive)]))
    if "groups" in cols:
        cols["group_leaf_order"] = leaves_list(cols["linkage"])
    return dict(form=form, row_names=None if row_names is None else list(row_names),
                matrix=used, responsive=responsive, columns=cols, rows=rows)


def over_membership(mod_labels, input_labels, hidden_labels):
    """OM[c, i, j] = count(c in block i x j) / (|I_i| |H_j| |c| / (N_pre N_post)).

    mod_labels (N_post*N_pre,) post-major synapse labels; input_labels (N_pre,) label the
    presynaptic (input) units, hidden_labels (N_post,) the postsynaptic (hidden) units.
    1 = the cluster fills the block in proportion to chance; 0 where a factor is empty.
    """
    n_post, n_pre = len(hidden_labels), len(input_labels)
    c = np.asarray(mod_labels).reshape(n_post, n_pre)
    i = np.broadcast_to(np.asarray(input_labels)[None, :], c.shape)
    j = np.broadcast_to(np.asarray(hidden_labels)[:, None], c.shape)
    nc, ni, nj = c.max() + 1, i.max() + 1, j.max() + 1
    count = np.bincount(((c * ni + i) * nj + j).ravel(), minlength=nc * ni * nj)
    count = count.reshape(nc, ni, nj).astype(np.float64)
    size_c = np.bincount(c.ravel(), minlength=nc)
    size_i = np.bincount(np.asarray(input_labels), minlength=ni)
    size_j = np.bincount(np.asarray(hidden_labels), minlength=nj)
    expected = size_c[:, None, None] * size_i[None, :, None] * size_j[None, None, :] \
        / float(n_pre * n_post)
    return np.divide(count, expected, out=np.zeros_like(count), where=expected > 0)


# ---------------------------------------------------------------------------------------
# Stage: cluster every representation of one run, write cluster_info pickles
# ---------------------------------------------------------------------------------------

def load_variance(paths):
    """(arrays, attrs) of the run's variance file, refused when it was computed from another
    checkpoint or analysis config than the run's current checkpoint."""
    import net_helpers
    producer = f"{mta.PRODUCER} --run={paths.name}"
    arrays, attrs = helper.load_h5(paths.variance, producer)
    if "analysis" not in attrs or "row_names" not in arrays:
        raise helper.StageError(f"{str(paths.variance)!r} was not written by the analysis "
                                f"stage; rerun `{producer}`.")
    ckpt = net_helpers.load_checkpoint(paths.checkpoint)
    expect = helper.config_hash(mta.variance_provenance(ckpt["config"], ckpt["step"],
                                                        attrs["analysis"]))
    helper.check_fresh(paths.variance, {"_provenance": attrs}, producer, expect)
    return arrays, attrs


def clip_k(k, ks):
    """k clipped to the range of ks computed."""
    return int(np.clip(k, ks[0], ks[-1]))


def cluster_entry(V, form, rng, row_names, synapses, cfg):
    """R of cluster_info: one representation in one form (see the module docstring).

    Column labels cover every column (unresponsive ones get label k). `col_labels_by_k`
    holds every k for units; for pre-grouped synapses only the selected, argmax and fixed k
    (90,000 labels per k), while `columns` keeps the group labels at every k:
    `labels_at(R["columns"], k)` expands any of them.
    """
    res = cluster_representation(V, form, rng, row_names=row_names, synapses=synapses,
                                 n_repeats=cfg["n_repeats"], jitter=cfg["jitter"],
                                 k_max=cfg["k_max"], tol=cfg["tol"], n_groups=cfg["n_groups"],
                                 n_restarts=cfg["n_restarts"])
    cols, rows = res["columns"], res["rows"]
    fixed = clip_k(cfg["fixed_k"], cols["ks"])
    keep = sorted({cols["k_selected"], cols["k_argmax"], fixed}) if "groups" in cols \
        else cols["ks"]
    matrix = res["matrix"].astype(np.float32) if synapses else res["matrix"]
    return dict(
        form=form, row_names=res["row_names"], matrix=matrix,
        responsive=res["responsive"], unresponsive=~res["responsive"],
        k=int(cols["k_selected"]), k_argmax=int(cols["k_argmax"]), fixed_k=fixed,
        k_candidates=cols["k_candidates"], ks=cols["ks"], silhouette=cols["silhouette"],
        ari=cols["ari"], gap=cols["gap"], col_labels=cols["labels"],
        col_labels_by_k={int(k): labels_at(cols, k) for k in keep},
        linkage=cols["linkage"], leaf_order=cols["leaf_order"],
        row_k=int(rows["k_selected"]), row_k_argmax=int(rows["k_argmax"]),
        row_labels=rows["labels"],
        row_labels_by_k={int(k): lab for k, lab in zip(rows["ks"], rows["labels_by_k"])},
        row_ks=rows["ks"], row_silhouette=rows["silhouette"], row_ari=rows["ari"],
        row_linkage=rows["linkage"], row_leaf_order=rows["leaf_order"],
        columns=cols, rows=rows)


def over_membership_entry(R_mod, ci, form):
    """OM of the synapse clusters in the (input cluster x hidden cluster) blocks, all at
    their selected k and in the same form (unresponsive labels count as a cluster)."""
    R_in, R_hid = ci["input"][form], ci["hidden"][form]
    return dict(om=over_membership(R_mod["col_labels"], R_in["col_labels"], R_hid["col_labels"]),
                form=form, k_mod=R_mod["k"], k_input=R_in["k"], k_hidden=R_hid["k"])


def cluster_run(paths, cfg):
    """Both cluster pickles (and figures) of one run; returns (cluster_info, cluster_info_mod)."""
    t0 = time.time()
    arrays, attrs = load_variance(paths)
    rows = list(arrays["row_names"])
    ci = {"fixed_k": cfg["fixed_k"], "run": paths.name, "variance_hash": attrs["config_hash"]}
    ci_mod = {"run": paths.name, "variance_hash": attrs["config_hash"]}
    todo = [(rep, form) for rep in mta.REP_TITLES if rep in arrays for form in mta.FORMS]
    reps = list(mta.REP_TITLES)
    for rep, form in helper.progress(todo, desc=f"{paths.name} clustering"):
        synapses = rep in mta.SYNAPSE_REPS
        rng = np.random.default_rng([cfg["cluster_seed"], reps.index(rep),
                                     mta.FORMS.index(form)])
        R = cluster_entry(arrays[rep][form], form, rng, rows, synapses, cfg)
        (ci_mod if synapses else ci).setdefault(rep, {})[form] = R
        print(f"[{paths.name}] {rep:19s} {form:12s} k = {R['k']:3d} (argmax {R['k_argmax']:3d}, "
              f"fixed {R['fixed_k']:3d}), {int(R['unresponsive'].sum())} unresponsive of "
              f"{len(R['col_labels'])}; task-period k = {R['row_k']}")
    for rep in (r for r in mta.SYNAPSE_REPS if r in ci_mod):
        for form, R in ci_mod[rep].items():
            if "input" in ci and "hidden" in ci:
                R["over_membership"] = over_membership_entry(R, ci, form)
    provenance = dict({k: cfg[k] for k in CLUSTER_KEYS}, variance_hash=attrs["config_hash"])
    helper.save_pickle(paths.cluster_info, ci, provenance)
    helper.save_pickle(paths.cluster_info_mod, ci_mod, provenance)
    print(f"[{paths.name}] clustered in {time.time() - t0:.0f} s -> "
          f"{paths.cluster_info}, {paths.cluster_info_mod}")
    if cfg["figures"]:
        for path in make_figures(paths, ci, ci_mod):
            print(f"figure: {path}")
    return ci, ci_mod


# ---------------------------------------------------------------------------------------
# Figures (read the cluster dicts only)
# ---------------------------------------------------------------------------------------

def plot_k_curve(ax, ks, sil, ari, k_sel, k_arg, k_fixed=None, title=""):
    """Median silhouette and mean pairwise ARI vs k; selected (solid), argmax (dashed) and
    fixed (dotted) k marked and named in the title."""
    ax.plot(ks, sil, ".-", color="C0", ms=3, lw=1)
    ax.set_ylabel("median silhouette", color="C0")
    twin = ax.twinx()
    twin.spines["right"].set_visible(True)
    twin.plot(ks, ari, ".-", color="C1", ms=3, lw=1)
    twin.set_ylabel("mean pairwise ARI", color="C1")
    twin.set_ylim(-0.05, 1.05)
    ax.axvline(k_sel, color="k", lw=1.2)
    ax.axvline(k_arg, color="k", ls="--", lw=0.9)
    marks = f"selected k = {k_sel} (solid), argmax {k_arg} (dashed)"
    if k_fixed is not None:
        ax.axvline(k_fixed, color="grey", ls=":", lw=0.9)
        marks += f", fixed {k_fixed} (dotted)"
    ax.set_xlabel("k")
    ax.set_title(f"{title}\n{marks}", fontsize=7.5)


def figure_k_selection(entries, path):
    """One row per (representation, form): columns (units/synapses) and task-period rows."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(entries), 2, figsize=(10, 2.4 * len(entries)), squeeze=False,
                             constrained_layout=True)
    for (name, R), row in zip(entries, axes):
        plot_k_curve(row[0], R["ks"], R["silhouette"], R["ari"], R["k"], R["k_argmax"],
                     R["fixed_k"], f"{name}: columns")
        plot_k_curve(row[1], R["row_ks"], R["row_silhouette"], R["row_ari"], R["row_k"],
                     R["row_k_argmax"], None, f"{name}: task-periods")
    fig.suptitle("k selection: silhouette (jittered copies) and ARI stability vs k")
    return helper.save_figure(fig, path)


def block_edges(labels):
    """Start positions of the runs of equal labels, plus the end."""
    change = np.flatnonzero(np.diff(labels) != 0) + 1
    return np.concatenate([[0], change, [len(labels)]])


def plot_dendrogram(ax, R):
    """Task-period dendrogram, leaves bottom to top, coloured at the selected row k."""
    from scipy.cluster.hierarchy import dendrogram
    Z, k = R["row_linkage"], R["row_k"]
    n = len(Z) + 1
    cut = 0.5 * (Z[-k, 2] + Z[-k + 1, 2]) if 1 < k < n else 0.0
    dendrogram(Z, orientation="left", ax=ax, no_labels=True, color_threshold=cut,
               above_threshold_color="grey")
    ax.set_ylim(0, 10 * n)
    ax.axis("off")


def plot_clustered_matrix(ax, R, label):
    """The clustered matrix in leaf order (rows bottom to top) with cluster boundaries."""
    rows, cols = np.asarray(R["row_leaf_order"]), np.asarray(R["leaf_order"])
    M = np.asarray(R["matrix"])[np.ix_(rows, cols)]
    interp = "antialiased" if M.shape[1] > 2000 else "nearest"
    im = ax.imshow(M, aspect="auto", origin="lower", interpolation=interp, cmap="magma",
                   extent=(0, M.shape[1], 0, M.shape[0]))
    col_lab, row_lab = np.asarray(R["col_labels"])[cols], np.asarray(R["row_labels"])[rows]
    col_edges, row_edges = block_edges(col_lab), block_edges(row_lab)
    for x in col_edges[1:-1]:
        ax.axvline(x, color="c", lw=0.6)
    for y in row_edges[1:-1]:
        ax.axhline(y, color="c", lw=0.6)
    centers = 0.5 * (col_edges[:-1] + col_edges[1:])
    names = ["unresp." if c == R["k"] and R["unresponsive"].any() else str(c)
             for c in col_lab[col_edges[:-1]]]
    step = int(np.ceil(len(centers) / 40))
    top = ax.secondary_xaxis("top")
    top.set_xticks(centers[::step])
    top.set_xticklabels(names[::step], fontsize=5, rotation=90)
    top.set_xlabel(f"column cluster (k = {R['k']})", fontsize=7)
    ax.set_yticks(np.arange(len(rows)) + 0.5)
    ax.set_yticklabels([R["row_names"][r] for r in rows], fontsize=5.5)
    ax.yaxis.tick_right()
    ax.set_xlabel(f"{M.shape[1]:,} {label} in dendrogram order")
    return im


def figure_clusters(R, title, label, path):
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(11, 7.5))
    # columns: dendrogram, matrix, room for the row names, colour bar
    grid = fig.add_gridspec(1, 4, width_ratios=[1.2, 9, 1.5, 0.25], wspace=0.02)
    plot_dendrogram(fig.add_subplot(grid[0]), R)
    ax = fig.add_subplot(grid[1])
    im = plot_clustered_matrix(ax, R, label)
    cax = fig.add_subplot(grid[3])
    fig.colorbar(im, cax=cax, label="task variance / column max" if R["form"] == "normalized"
                 else "log1p(task variance)")
    fig.suptitle(f"{title}: task-periods (k = {R['row_k']}) x {label} (k = {R['k']})", y=0.97)
    return helper.save_figure(fig, path)


def plot_om(ax, om, title, vlim=3.0):
    """log2 over-membership (input cluster x hidden cluster); 0 = chance."""
    with np.errstate(divide="ignore"):
        im = ax.imshow(np.clip(np.log2(om), -vlim, vlim), cmap="RdBu_r", vmin=-vlim, vmax=vlim,
                       aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=7)
    return im


def figure_over_membership(entry, title, path, max_panels=24):
    """Max over synapse clusters c of OM[c, i, j], and OM[c] of each c (up to max_panels)."""
    import matplotlib.pyplot as plt
    om = entry["om"]
    n_c = min(len(om), max_panels)
    ncols = int(np.ceil(np.sqrt(n_c)))
    fig = plt.figure(figsize=(12, 5.8), constrained_layout=True)
    outer = fig.add_gridspec(1, 2, width_ratios=[1, 1.4])
    ax = fig.add_subplot(outer[0])
    im = plot_om(ax, om.max(axis=0), "max over synapse clusters c")
    ax.set_xlabel(f"hidden (post) cluster j (k = {entry['k_hidden']})")
    ax.set_ylabel(f"input (pre) cluster i (k = {entry['k_input']})")
    inner = outer[1].subgridspec(int(np.ceil(n_c / ncols)), ncols)
    for c in range(n_c):
        sub = fig.add_subplot(inner[c // ncols, c % ncols])
        plot_om(sub, om[c], f"c = {c}")
        sub.set_xticks([])
        sub.set_yticks([])
    fig.colorbar(im, ax=ax, shrink=0.8,
                 label="log2 over-membership (0 = chance; -3 includes empty)")
    fig.suptitle(f"{title}: synapse clusters (k = {entry['k_mod']}) in input x hidden "
                 f"cluster blocks" + (f" (first {n_c} of {len(om)} shown)" if n_c < len(om)
                                      else ""))
    return helper.save_figure(fig, path)


def make_figures(paths, ci, ci_mod):
    """Every figure of the clustering stage, from the two cluster dicts."""
    helper.set_style()
    entries = [(f"{rep} {form}", rep, form, R) for info in (ci, ci_mod)
               for rep, forms in info.items() if rep in mta.REP_TITLES
               for form, R in forms.items()]
    figures = [figure_k_selection([(name, R) for name, _, _, R in entries],
                                  paths.figure("k_selection"))]
    for name, rep, form, R in entries:
        label = "synapses" if rep in mta.SYNAPSE_REPS else "units"
        figures.append(figure_clusters(R, f"{mta.REP_TITLES[rep]} ({form})", label,
                                       paths.figure(f"clusters_{rep}_{form}")))
        if "over_membership" in R:
            figures.append(figure_over_membership(
                R["over_membership"], f"{mta.REP_TITLES[rep]} ({form})",
                paths.figure(f"over_membership_{rep}_{form}")))
    return figures


# ---------------------------------------------------------------------------------------


def main(cfg):
    """Cluster every run matching cfg["run"]; returns {aname: (cluster_info, cluster_info_mod)}."""
    return {paths.name: cluster_run(paths, cfg)
            for paths in helper.find_runs(cfg["run"], cfg["runs_dir"])}


if __name__ == "__main__":
    helper.run_main(main, CONFIG)
