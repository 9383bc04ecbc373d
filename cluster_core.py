"""Numerical core of the clustering stage (SPEC §5.3): Ward cuts, silhouette curves, the
column-permutation null band, the choice of k, synapse pre-grouping, over-membership.

A point set X is (n points, features). Clustering the columns of a task-variance matrix V
(n_periods, n_columns) uses X = V.T; clustering its rows (task-periods) uses X = V.

Choice of k (`choose_k`), for n points:
- Ward linkage (Euclidean) with optimal leaf ordering; its cut into exactly k clusters for
  every k in [K_MIN, min(k_max, n - 1)] (the first n - k merges; equal to
  `fcluster(Z, k, "maxclust")` when merge heights are distinct); labels numbered 0..k-1 in
  leaf order, so every cluster is a contiguous block of the dendrogram.
- silhouette (Euclidean) of each cut: the real curve.
- null: `n_null` copies of X with each point's features permuted independently (each column
  of V permuted across rows: keeps every unit's variance distribution, destroys shared
  selectivity), each Ward-clustered and scored the same way.
- null band: the SPEC's "95th percentile of the null" made simultaneous over k. Per k the
  null silhouettes have mean mu_k and s.d. sd_k; each null curve's largest standardised
  excess over k, max_k (s_k - mu_k) / sd_k (mean and s.d. from the *other* nulls), gives
  one number per null, and c is their `level` quantile (method "higher": with 20 nulls, the
  largest). band_k = mu_k + c·max(sd_k, SD_FLOOR). A structureless matrix crosses this band at *any* k
  with probability about 1 - level, while a per-k 95th percentile is crossed somewhere
  among ~50 ks most of the time. The per-k 95th percentile is kept for the figures.
- k is claimed only where the real silhouette exceeds band_k. Among those ks, every k whose
  silhouette is >= best - (1 - tol)·|best| (best over them) is a candidate, and the one
  with the largest merge-height gap wins, gap(k) = Z[-(k-1), 2] - Z[-k, 2] (the range of
  heights over which the k-cluster cut is stable; ties -> smaller k). No k above the band:
  k_selected = 0, "no structure above chance". k_argmax (largest real silhouette) is always
  recorded; k_ref = k_selected, or k_argmax when it is 0, is the k labels are reported at.

Speed: the silhouettes of all ks come from one pass over each linkage's merges: S[slot, i] =
sum of distances from point i to the members of cluster `slot` is updated by adding two rows
per merge (clusters kept in compact slots 0..k-1), vectorised over the real and null copies.
Synapse restarts compare their labellings with the ARI, whose contingency tables are updated
the same way (sum of squares changes by 2 <row_a, row_b> per merge).
"""
import numpy as np
import scipy.sparse
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import pdist, squareform
from sklearn.cluster import MiniBatchKMeans
from threadpoolctl import threadpool_limits

import forked_jobs

K_MIN = 5  # smallest k considered
ARI_MEMORY_BYTES = 128 * 2**20  # contingency tables held at once by _pairwise_ari_curves
SD_FLOOR = 0.01  # smallest null s.d. of a silhouette used: toward k = n real and null curves
#                  collapse to 0 together and their spread with them; excesses of a few
#                  thousandths there are not structure (one untrained-looking k = 59 of 64)


# ---------------------------------------------------------------------------------------
# Linkage, cuts and silhouette curves


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


def _pairwise_ari_curves(lo_hi, ks, weights, base):
    """(pairs (P, 2), ari (P, len(ks))) over all pairs r < s of copies (adjusted Rand index)
    of copies with their own groups of items: `base` gives their contingency (see
    _pair_square_sums), weights (R, n) the items per point."""
    R = lo_hi.shape[0]
    pairs = np.stack(np.triu_indices(R, 1), axis=1).astype(np.int64)
    if len(pairs) == 0:
        return pairs.reshape(0, 2), np.empty((0, len(ks)))
    n_items = weights[0].sum()
    sq = _pair_square_sums(lo_hi, ks, pairs, base)
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


def _curves(point_sets, ks):
    """(silhouettes (R, len(ks)), lo_hi (R, 2, n-1)) of the Ward cuts of R point sets."""
    n = len(point_sets[0])
    D = np.empty((len(point_sets), n, n), dtype=np.float32)
    lo_hi = np.empty((len(point_sets), 2, n - 1), dtype=np.int64)
    for r, X in enumerate(point_sets):
        d = _distances(X)
        D[r] = squareform(d)
        lo_hi[r] = _merge_slots(linkage(d, method="ward"))
    return _silhouette_curves(D, lo_hi, ks)[0], lo_hi


def permuted_copies(X, rng, n_null, axis=1):
    """n_null copies of X (points, features) permuted independently along `axis`: 1 for
    columns as points (X = V.T), 0 for rows as points (X = V); either way every column of the
    variance matrix V is permuted across its rows."""
    return [rng.permuted(X, axis=axis) for _ in range(n_null)]


def null_band(null_sil, level=0.95):
    """Simultaneous null band over k (module docstring) from (n_null, n_ks) null silhouettes:
    dict(band, pointwise (per-k `level` quantile), mean, sd, z_crit)."""
    n = len(null_sil)
    total, total_sq = null_sil.sum(axis=0), (null_sil ** 2).sum(axis=0)
    loo_mean = (total - null_sil) / (n - 1)  # each null against the others
    loo_var = (total_sq - null_sil ** 2 - (n - 1) * loo_mean ** 2) / (n - 2)
    loo_sd = np.sqrt(np.maximum(loo_var, 0.0))
    mean, sd = null_sil.mean(axis=0), null_sil.std(axis=0, ddof=1)
    floor = SD_FLOOR
    z_max = ((null_sil - loo_mean) / np.maximum(loo_sd, floor)).max(axis=1)
    z_crit = float(np.quantile(z_max, level, method="higher"))
    return dict(band=mean + z_crit * np.maximum(sd, floor), mean=mean, sd=sd, z_crit=z_crit,
                pointwise=np.quantile(null_sil, level, axis=0))


def silhouette_candidates(silhouette, tol=0.95, allowed=None):
    """Mask of the allowed ks whose silhouette is within (1 - tol) x |best| of the best
    allowed one (all False when none is allowed)."""
    silhouette = np.asarray(silhouette, dtype=np.float64)
    allowed = np.ones(len(silhouette), bool) if allowed is None else np.asarray(allowed)
    if not allowed.any():
        return np.zeros(len(silhouette), bool)
    best = np.nanmax(silhouette[allowed])
    return allowed & (silhouette >= best - (1.0 - tol) * abs(best))


def select_k(ks, silhouette, gaps, tol=0.95, above=None):
    """(k_selected (0 when no k is above the null), k_argmax, candidates): module docstring."""
    ks, gaps = np.asarray(ks), np.asarray(gaps)
    keep = silhouette_candidates(silhouette, tol, above)
    candidates = ks[keep]
    k_argmax = int(ks[np.nanargmax(silhouette)])
    if len(candidates) == 0:
        return 0, k_argmax, candidates
    return int(candidates[np.argmax(gaps[keep])]), k_argmax, candidates  # ties -> smaller k


def _axis_result(Z, ks, sil, null_sil, tol, level):
    """The per-axis dict shared by points and synapses (see choose_k)."""
    band = null_band(null_sil, level)
    above = sil > band["band"]
    gaps = merge_gaps(Z, ks)
    k_sel, k_arg, cand = select_k(ks, sil, gaps, tol, above)
    k_ref = k_sel or k_arg
    by_k = cut_labels(Z, ks)
    return dict(
        n=len(Z) + 1, ks=ks, silhouette=sil, null_silhouettes=null_sil, null_band=band["band"],
        null_pointwise=band["pointwise"], null_mean=band["mean"], null_z_crit=band["z_crit"],
        above=above, above_null=bool(above.any()), gap=gaps, k_candidates=cand,
        k_selected=k_sel, k_argmax=k_arg, k_ref=k_ref, linkage=Z, leaf_order=leaves_list(Z),
        labels=by_k[k_ref - ks[0]], labels_by_k=by_k)


def _trivial_axis(X):
    """Fewer than K_MIN + 1 points: every point its own cluster, no claim of structure."""
    n = len(X)
    Z = ward_linkage(X) if n > 1 else np.empty((0, 4))
    labels = np.arange(n, dtype=np.int32)
    nan = np.array([np.nan])
    return dict(n=n, ks=np.array([n]), silhouette=nan, null_silhouettes=nan[None],
                null_band=nan, null_pointwise=nan, null_mean=nan, null_z_crit=np.nan,
                above=np.array([False]), above_null=False, gap=nan, k_candidates=np.array([]),
                k_selected=0, k_argmax=n, k_ref=n, linkage=Z, leaf_order=np.arange(n),
                labels=labels, labels_by_k=labels[None])


def choose_k(X, rng, *, n_null=20, k_max=300, tol=0.95, level=0.95, null_axis=1):
    """Cluster the points X (n, features) and choose k against the null (module docstring).

    Returns dict: n, ks, silhouette (real, per k), null_silhouettes (n_null, n_ks),
    null_band, null_pointwise, null_mean, null_z_crit, above (per k), above_null, gap,
    k_candidates, k_selected (0 = no structure above chance), k_argmax, k_ref, linkage
    (optimal leaf order), leaf_order, labels (n,) at k_ref, labels_by_k (n_ks, n).
    null_axis: the axis of X permuted by the null (see permuted_copies).
    """
    X = np.asarray(X, dtype=np.float64)
    ks = k_range(len(X), k_max)
    if len(ks) == 0:
        return _trivial_axis(X)
    Z = ward_linkage(X)
    sil, _ = _curves([X] + permuted_copies(X, rng, n_null, null_axis), ks)
    return _axis_result(Z, ks, sil[0], sil[1:], tol, level)


# ---------------------------------------------------------------------------------------
# Synapses: pre-grouping


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


def cluster_synapses(X, rng, *, n_groups=300, n_restarts=20, n_null=20, k_max=300, tol=0.95,
                     level=0.95, processes=1):
    """Cluster many points (synapse columns) X (n, features) via pre-grouping (SPEC §5.3).

    Each restart groups the points with MiniBatchKMeans (G = min(n_groups, distinct points))
    and Ward-clusters the group means; the median over restarts of their silhouettes is the
    real curve. Each null permutes every point's features, pre-groups once and is scored the
    same way. The kept restart has the highest ARI with the other restarts (ARI on the
    points, averaged over the candidate ks, or over all ks when none is above the null);
    choose_k's rule on its linkage picks k. With n <= n_groups (or < K_MIN + 1 distinct
    points) the points are clustered directly (choose_k).
    Returns choose_k's dict, where linkage / leaf_order / labels_by_k refer to the groups of
    the kept restart, plus groups (n,) (point -> group), restart, ari_restarts (n_restarts,
    n_ks), point-level labels (n,) at k_ref and leaf_order_points (n,).
    The restarts and nulls (each one pre-grouping, linkage and silhouette curve, single-
    threaded) are shared among `processes` forked processes (forked_jobs.run_jobs; 0: one
    per core): the same numbers in any number, as every one has its own seed and the null
    copies are drawn here, in the order one process draws them.
    """
    X = np.asarray(X, dtype=np.float64)
    G = min(n_groups, len(np.unique(X, axis=0)))
    ks = k_range(G, k_max)
    if len(X) <= n_groups or len(ks) == 0:
        return choose_k(X, rng, n_null=n_null, k_max=k_max, tol=tol, level=level)
    seeds = rng.integers(0, 2**31 - 1, size=n_restarts + n_null)
    copies = permuted_copies(X, rng, n_null)
    processes = forked_jobs.process_count(processes)
    array = forked_jobs.shared_array if processes > 1 else np.empty  # as lesion_engine's

    groups = array((n_restarts, len(X)), np.int64)
    means = array((n_restarts, G, X.shape[1]), np.float64)
    sil = array((n_restarts, len(ks)), np.float64)
    lo_hi = array((n_restarts, 2, G - 1), np.int64)
    null_sil = array((n_null, len(ks)), np.float64)

    def restart_job(r):
        groups[r], means[r] = pregroup(X, G, int(seeds[r]))
        sil[r], lo_hi[r] = (a[0] for a in _curves([means[r]], ks))

    def null_job(i):
        null_sil[i] = _curves([pregroup(copies[i], G, int(seeds[n_restarts + i]))[1]], ks)[0][0]

    jobs = [(1, lambda r=r: restart_job(r)) for r in range(n_restarts)] + \
        [(1, lambda i=i: null_job(i)) for i in range(n_null)]
    forked_jobs.run_jobs(jobs, processes)
    groups, means, sil, lo_hi, null_sil = (np.array(a) for a in
                                           (groups, means, sil, lo_hi, null_sil))
    restart, per_restart = _consistent_restart(groups, lo_hi, ks, G, sil, null_sil, tol, level)
    out = _axis_result(ward_linkage(means[restart]), ks, np.median(sil, axis=0), null_sil,
                       tol, level)
    out.update(groups=groups[restart], restart=restart, ari_restarts=per_restart,
               labels=out["labels"][groups[restart]],
               leaf_order_points=_expand_leaf_order(out["leaf_order"], groups[restart]))
    return out


def _consistent_restart(groups, lo_hi, ks, G, sil, null_sil, tol, level):
    """(index of the restart most consistent with the others, per-restart mean ARI per k)."""
    sizes = np.stack([np.bincount(g, minlength=G) for g in groups]).astype(np.float64)

    def base(pc):
        codes = groups[pc[:, 0]] * G + groups[pc[:, 1]]
        return np.stack([np.bincount(c, minlength=G * G).reshape(G, G) for c in codes])

    n_restarts = len(groups)
    pairs, ari = _pairwise_ari_curves(lo_hi, ks, sizes, base)
    median = np.median(sil, axis=0)
    in_cand = silhouette_candidates(median, tol, median > null_band(null_sil, level)["band"])
    in_cand = in_cand if in_cand.any() else np.ones(len(ks), bool)
    per_restart = np.zeros((n_restarts, len(ks)))
    for col in (0, 1):
        np.add.at(per_restart, pairs[:, col], ari)
    per_restart /= max(n_restarts - 1, 1)
    return int(np.argmax(per_restart[:, in_cand].mean(axis=1))), per_restart


def _expand_leaf_order(group_leaves, groups):
    """Point order: groups in leaf order, points of a group in index order."""
    rank = np.empty(len(group_leaves), dtype=np.int64)
    rank[group_leaves] = np.arange(len(group_leaves))
    return np.argsort(rank[groups], kind="stable")


def labels_at(axis_info, k):
    """Column labels (every column) of one axis dict of clustering.cluster_representation at
    k; unresponsive columns get label k (their own, last cluster)."""
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


# ---------------------------------------------------------------------------------------
# Over-membership


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
