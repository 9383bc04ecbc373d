"""Hierarchical clustering of task-variance matrices with automatic k (SPEC §5.2).

A variance matrix is (n_periods, n_columns): rows are task-periods, columns are units
(neurons) or synapses (post-major). Clustering "columns" means the points are the columns
(features: the rows), clustering "rows" means the points are the task-periods.

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

The stage `main` (reads the variance HDF5, writes cluster_info pickles and figures) is added
below the numerical core.
"""
import numpy as np
import scipy.sparse
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import pdist, squareform
from sklearn.cluster import MiniBatchKMeans
from threadpoolctl import threadpool_limits

from multiple_task_analysis import log_transform, normalize_columns

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
