"""Clustering core (SPEC §5.2): exact curves, k rule, planted clusters, synapses, OM."""
import itertools

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from sklearn.metrics import adjusted_rand_score, silhouette_score

import clustering as cl


def _planted(rng, n_clusters=6, per_cluster=20, n_rows=49, noise=0.05):
    """(V (n_rows, n_cols) task variance with planted column clusters, true labels)."""
    profiles = rng.gamma(0.6, 1.0, size=(n_clusters, n_rows))
    truth = np.repeat(np.arange(n_clusters), per_cluster)
    scale = rng.uniform(0.5, 2.0, size=len(truth))  # per-column gain: removed by normalising
    noisy = profiles[truth] + noise * rng.standard_normal((len(truth), n_rows))
    V = noisy.clip(0) * scale[:, None]
    return V.T, truth


def test_silhouette_and_ari_curves_equal_sklearn_on_every_cut():
    X = np.random.default_rng(1).random((30, 6))
    ks = cl.k_range(len(X))
    D, lo_hi = cl._jittered_copies(X, np.random.default_rng(2), 3, 0.02)
    sil, cut = cl._silhouette_curves(D, lo_hi, ks)
    pairs, ari = cl._pairwise_ari_curves(lo_hi, ks, np.ones((3, len(X))), cut=cut)
    ref_rng = np.random.default_rng(2)
    labels = []
    for r in range(3):
        Xr = X * (1 + 0.02 * ref_rng.standard_normal(X.shape, dtype=np.float32))
        Z = linkage(pdist(Xr), method="ward")
        labels.append([fcluster(Z, k, "maxclust") for k in ks])
        np.testing.assert_allclose(sil[r], [silhouette_score(Xr, lab) for lab in labels[r]],
                                   atol=1e-5)  # float32 distance sums
    for p, (r, s) in enumerate(pairs):
        np.testing.assert_allclose(
            ari[p], [adjusted_rand_score(a, b) for a, b in zip(labels[r], labels[s])], atol=1e-12)


def test_gap_rule_picks_documented_k_on_constructed_linkage():
    # chain linkage of 10 leaves (merge i joins leaf i+1 to the cluster so far), known heights
    heights = np.array([1.0, 2.0, 3.0, 5.0, 6.0, 15.0, 16.0, 30.0, 31.0])
    Z = np.array([[0 if i == 0 else 9 + i, i + 1, h, i + 2] for i, h in enumerate(heights)])
    ks = cl.k_range(10)  # 5..9
    gaps = cl.merge_gaps(Z, ks)
    # gap(k) = Z[-(k-1), 2] - Z[-k, 2] = (merge k -> k-1) - (merge k+1 -> k)
    # k=5: 15 - 6; k=6: 6 - 5; k=7: 5 - 3; k=8: 3 - 2; k=9: 2 - 1
    np.testing.assert_array_equal(gaps, [9.0, 1.0, 2.0, 1.0, 1.0])
    assert cl.select_k(ks, np.ones(5), gaps)[0] == 5
    # k=5 scores under 95% of the best, so the largest gap among 6, 7, 8 wins
    k_sel, k_arg, cand = cl.select_k(ks, np.array([0.5, 0.98, 0.96, 1.0, 0.2]), gaps)
    assert (k_sel, k_arg, list(cand)) == (7, 8, [6, 7, 8])
    # ties go to the smaller k: candidates 6 and 8 both have gap 1
    assert cl.select_k(ks, np.array([0.5, 0.98, 0.5, 1.0, 0.2]), gaps)[0] == 6
    cuts = cl.cut_labels(Z, ks)
    assert [len(np.unique(c)) for c in cuts] == list(ks)


def test_wide_matrix_distances_equal_pdist():
    X = np.random.default_rng(0).random((12, 500))
    np.testing.assert_allclose(cl._distances(X), pdist(X), rtol=1e-10)


def test_cut_labels_match_fcluster_and_follow_leaf_order():
    X = np.random.default_rng(0).random((40, 5))
    Z = cl.ward_linkage(X)
    ks = cl.k_range(40)
    cuts = cl.cut_labels(Z, ks)
    leaves = cl.leaves_list(Z)
    for k, labels in zip(ks, cuts):
        assert adjusted_rand_score(fcluster(Z, k, "maxclust"), labels) == 1.0
        assert (np.diff(labels[leaves]) >= 0).all()  # 0..k-1 as contiguous leaf blocks


def test_planted_clusters_recovered_and_deterministic():
    V, truth = _planted(np.random.default_rng(0))
    out = cl.cluster_representation(V, "normalized", np.random.default_rng(5), n_repeats=10)
    cols = out["columns"]
    assert cols["k_selected"] == 6
    assert adjusted_rand_score(truth, cols["labels"]) > 0.9
    assert set(out) >= {"form", "row_names", "matrix", "responsive", "columns", "rows"}
    assert set(cols) >= {"labels", "labels_by_k", "ks", "silhouette", "ari", "gap", "linkage",
                         "leaf_order", "k_selected", "k_argmax", "k_candidates"}
    assert cols["labels_by_k"].shape == (len(cols["ks"]), V.shape[1])
    np.testing.assert_array_equal(cl.labels_at(cols, 6), cols["labels"])
    assert np.isclose(cols["ari"][cols["ks"] == 6][0], 1.0)
    assert out["rows"]["labels"].shape == (49,)
    again = cl.cluster_representation(V, "normalized", np.random.default_rng(5), n_repeats=10)
    np.testing.assert_array_equal(again["columns"]["labels_by_k"], cols["labels_by_k"])
    np.testing.assert_array_equal(again["columns"]["silhouette"], cols["silhouette"])
    np.testing.assert_array_equal(again["rows"]["labels"], out["rows"]["labels"])


def test_unresponsive_columns_get_their_own_last_label():
    V, truth = _planted(np.random.default_rng(1))
    dead = np.array([3, 50, 111])
    V[:, dead] *= 1e-5
    out = cl.cluster_representation(V, "unnormalized", np.random.default_rng(0), n_repeats=5)
    cols = out["columns"]
    assert np.flatnonzero(~out["responsive"]).tolist() == dead.tolist()
    k = cols["k_selected"]
    assert (cols["labels"][dead] == k).all() and (cols["labels"][out["responsive"]] < k).all()
    assert sorted(cols["leaf_order"][-3:]) == dead.tolist()
    assert (cl.labels_at(cols, 9)[dead] == 9).all()
    with pytest.raises(ValueError, match="not computed"):
        cl.labels_at(cols, 2)


def test_synapse_clustering_recovers_planted_groups():
    V, truth = _planted(np.random.default_rng(2), per_cluster=150)  # 900 synapse columns
    out = cl.cluster_representation(V, "normalized", np.random.default_rng(0), synapses=True,
                                    n_groups=40, n_restarts=3, n_repeats=5)
    cols = out["columns"]
    assert cols["k_selected"] == 6
    assert adjusted_rand_score(truth, cols["labels"]) > 0.9
    assert cols["groups"].shape == (900,) and cols["ari_restarts"].shape[0] == 3
    np.testing.assert_array_equal(cl.labels_at(cols, 6), cols["labels"])
    assert sorted(cols["leaf_order"]) == list(range(900))


def test_synapse_restart_ari_equals_sklearn():
    V, _ = _planted(np.random.default_rng(4), n_clusters=4, per_cluster=100, noise=0.3)
    X = V.T
    out = cl.cluster_synapses(X, np.random.default_rng(7), n_groups=30, n_restarts=3)
    seeds = np.random.default_rng(7).integers(0, 2**31 - 1, size=3)
    fits = [cl.pregroup(X, 30, int(s)) for s in seeds]
    cuts = [cl.cut_labels(linkage(pdist(m), method="ward"), out["ks"])[:, g] for g, m in fits]
    ref = np.mean([[adjusted_rand_score(a, b) for a, b in zip(cuts[r], cuts[s])]
                   for r, s in itertools.combinations(range(3), 2)], axis=0)
    np.testing.assert_allclose(out["ari"], ref, atol=1e-12)


def test_over_membership_hand_example():
    # 2 hidden (post) x 3 input (pre); synapse cluster 0 = every synapse onto hidden unit 0
    input_labels = np.array([0, 0, 1])
    hidden_labels = np.array([0, 1])
    mod_labels = np.array([[0, 0, 0], [1, 1, 2]]).ravel()  # post-major
    OM = cl.over_membership(mod_labels, input_labels, hidden_labels)
    assert OM.shape == (3, 2, 2)
    # cluster 0 (size 3) in block input 0 x hidden 0: 2 / (2 * 1 * 3 / 6) = 2
    np.testing.assert_allclose(OM[0], [[2.0, 0.0], [2.0, 0.0]])
    # cluster 2 (size 1, the synapse hidden 1 <- input 2): 1 / (1 * 1 * 1 / 6) = 6
    np.testing.assert_allclose(OM[2], [[0.0, 0.0], [0.0, 6.0]])
