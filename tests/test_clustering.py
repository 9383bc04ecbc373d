"""Clustering (SPEC §5.3): exact silhouette curves, the null band, the k rule, planted
structure found and no structure not claimed, unresponsive columns, synapses, stability, OM."""
import itertools

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from sklearn.metrics import adjusted_rand_score, silhouette_score

import cluster_core as cc
import clustering as cl
import helper


def _planted(rng, n_clusters=6, per_cluster=20, n_rows=49, noise=0.05, gain=True):
    """(V (n_rows, n_cols) task variance with planted column clusters, true labels)."""
    profiles = rng.gamma(0.6, 1.0, size=(n_clusters, n_rows))
    truth = np.repeat(np.arange(n_clusters), per_cluster)
    # per-column gain: removed by normalising (the unnormalized form keeps it)
    scale = rng.uniform(0.5, 2.0, size=len(truth)) if gain else np.ones(len(truth))
    noisy = profiles[truth] + noise * rng.standard_normal((len(truth), n_rows))
    V = noisy.clip(0) * scale[:, None]
    return V.T, truth


def test_silhouette_curves_equal_sklearn_on_every_cut():
    rng = np.random.default_rng(1)
    sets = [rng.random((30, 6)) for _ in range(3)]
    ks = cc.k_range(30)
    sil, _ = cc._curves(sets, ks)
    for X, curve in zip(sets, sil):
        Z = linkage(pdist(X), method="ward")
        ref = [silhouette_score(X, fcluster(Z, k, "maxclust")) for k in ks]
        np.testing.assert_allclose(curve, ref, atol=1e-5)  # float32 distance sums


def test_null_copies_permute_each_column_of_the_matrix_across_rows():
    V = np.arange(24.0).reshape(4, 6)  # 4 rows x 6 columns
    for X, axis in ((V.T, 1), (V, 0)):
        for P in cc.permuted_copies(X, np.random.default_rng(0), 3, axis):
            Vp = P.T if axis == 1 else P
            np.testing.assert_array_equal(np.sort(Vp, axis=0), V)  # same entries per column
            assert not np.array_equal(Vp, V)


def test_null_band_equals_plain_leave_one_out_computation():
    null = np.random.default_rng(2).normal(size=(20, 7)) * np.arange(1, 8) + np.arange(7)
    out = cc.null_band(null, 0.95)
    z_max = []
    for i in range(20):
        others = np.delete(null, i, axis=0)
        z_max.append(max((null[i, j] - others[:, j].mean()) / others[:, j].std(ddof=1)
                         for j in range(7)))
    z_crit = sorted(z_max)[int(np.ceil(0.95 * 19))]  # "higher": with 20 nulls the largest
    assert out["z_crit"] == pytest.approx(z_crit) and z_crit == max(z_max)
    np.testing.assert_allclose(out["band"], null.mean(0) + z_crit * null.std(0, ddof=1))  # sd > floor
    np.testing.assert_allclose(out["pointwise"], np.quantile(null, 0.95, axis=0))


def test_k_rule_on_constructed_linkage_and_null():
    # chain linkage of 10 leaves (merge i joins leaf i+1 to the cluster so far), known heights
    heights = np.array([1.0, 2.0, 3.0, 5.0, 6.0, 15.0, 16.0, 30.0, 31.0])
    Z = np.array([[0 if i == 0 else 9 + i, i + 1, h, i + 2] for i, h in enumerate(heights)])
    ks = cc.k_range(10)  # 5..9
    gaps = cc.merge_gaps(Z, ks)
    # gap(k) = Z[-(k-1), 2] - Z[-k, 2]: k=5: 15 - 6; k=6: 6 - 5; k=7: 5 - 3; k=8: 3 - 2; k=9: 2 - 1
    np.testing.assert_array_equal(gaps, [9.0, 1.0, 2.0, 1.0, 1.0])
    assert cc.select_k(ks, np.ones(5), gaps)[0] == 5
    sil = np.array([0.5, 0.98, 0.96, 1.0, 0.2])
    k_sel, k_arg, cand = cc.select_k(ks, sil, gaps)
    assert (k_sel, k_arg, list(cand)) == (7, 8, [6, 7, 8])  # 5 is under 95% of the best
    assert cc.select_k(ks, np.array([0.5, 0.98, 0.5, 1.0, 0.2]), gaps)[0] == 6  # tie -> smaller
    # only ks above the null count: the best *above* sets the 95% bar
    above = np.array([True, True, True, False, False])
    assert cc.select_k(ks, sil, gaps, above=above)[:2] == (7, 8)
    assert cc.select_k(ks, sil, gaps, above=np.array([True, False, False, False, True]))[0] == 5
    assert cc.select_k(ks, sil, gaps, above=np.zeros(5, bool))[:2] == (0, 8)  # no structure


def test_wide_matrix_distances_equal_pdist():
    X = np.random.default_rng(0).random((12, 500))
    np.testing.assert_allclose(cc._distances(X), pdist(X), rtol=1e-10)


def test_cut_labels_match_fcluster_and_follow_leaf_order():
    X = np.random.default_rng(0).random((40, 5))
    Z = cc.ward_linkage(X)
    ks = cc.k_range(40)
    leaves = cc.leaves_list(Z)
    for k, labels in zip(ks, cc.cut_labels(Z, ks)):
        assert adjusted_rand_score(fcluster(Z, k, "maxclust"), labels) == 1.0
        assert (np.diff(labels[leaves]) >= 0).all()  # 0..k-1 as contiguous leaf blocks


@pytest.mark.parametrize("form", ["normalized", "unnormalized"])
@pytest.mark.parametrize("n_clusters", [6, 9])
def test_planted_blocks_give_their_k(form, n_clusters):
    V, truth = _planted(np.random.default_rng(n_clusters), n_clusters=n_clusters, per_cluster=12,
                        noise=0.02, gain=form == "normalized")
    out = cl.cluster_representation(V, form, np.random.default_rng(5))
    cols = out["columns"]
    assert cols["k_selected"] == n_clusters and cols["above_null"]
    assert adjusted_rand_score(truth, cols["labels"]) == 1.0
    assert cols["silhouette"][cols["ks"] == n_clusters][0] > \
        cols["null_band"][cols["ks"] == n_clusters][0]
    assert out["rows"]["labels"].shape == (49,)
    again = cl.cluster_representation(V, form, np.random.default_rng(5))
    np.testing.assert_array_equal(again["columns"]["null_silhouettes"], cols["null_silhouettes"])
    np.testing.assert_array_equal(again["rows"]["labels"], out["rows"]["labels"])


def test_structureless_matrices_give_no_structure_in_95_percent_of_40_seeds():
    claimed = 0
    for seed in range(40):
        V = np.random.default_rng(seed).gamma(0.6, 1.0, size=(20, 60))
        res = cc.choose_k(cl.transform(V, "normalized").T, np.random.default_rng(1000 + seed))
        claimed += res["k_selected"] > 0
        assert res["k_selected"] > 0 or res["k_ref"] == res["k_argmax"]
    assert claimed <= 2  # >= 95% of 40 seeds: "no structure above chance"


def test_unresponsive_columns_excluded_in_both_forms_with_their_own_label():
    V, truth = _planted(np.random.default_rng(1))
    dead = np.array([3, 50, 111])
    V[:, dead] = 1e-6  # summed variance 49e-6 < 1e-3
    for form in ("normalized", "unnormalized"):
        out = cl.cluster_representation(V, form, np.random.default_rng(0))
        cols = out["columns"]
        assert np.flatnonzero(~out["responsive"]).tolist() == dead.tolist()
        k = cols["k_ref"]
        assert (cols["labels"][dead] == k).all() and (cols["labels"][out["responsive"]] < k).all()
        assert sorted(cols["leaf_order"][-3:]) == dead.tolist()
        assert (cc.labels_at(cols, 9)[dead] == 9).all()
    with pytest.raises(ValueError, match="not computed"):
        cc.labels_at(cols, 2)
    # units: absolute threshold; synapses: relative to the largest column sum
    W = np.array([[4e-4, 1.0, 1e-2], [4e-4, 1.0, 1e-2]])
    assert cl.unresponsive_columns(W).tolist() == [True, False, False]
    assert cl.unresponsive_columns(W * 1e-3, synapses=True).tolist() == [True, False, False]
    with pytest.raises(helper.StageError, match="every column of hidden .* is unresponsive"):
        cl.cluster_representation(np.full((49, 10), 1e-6), "normalized",
                                   np.random.default_rng(0), name="hidden (normalized)")


def test_stability_on_an_identical_and_on_a_scrambled_design():
    V, truth = _planted(np.random.default_rng(3), per_cluster=10)
    res = cl.cluster_representation(V, "normalized", np.random.default_rng(0))
    scrambled = np.random.default_rng(1).permuted(V, axis=0)
    st = cl.stability(res, {"same": V, "scrambled": scrambled}, np.random.default_rng(2))
    assert st["design"].tolist() == ["same", "scrambled"]
    assert st["k"][0] == res["columns"]["k_selected"] == 6 and st["ari"][0] == 1.0
    assert st["ari"][1] < 0.3 and st["k"][1] == 0 and not st["above_null"][1]


def test_synapse_clustering_recovers_planted_groups():
    V, truth = _planted(np.random.default_rng(2), per_cluster=150)  # 900 synapse columns
    out = cl.cluster_representation(V, "normalized", np.random.default_rng(0), synapses=True,
                                    n_groups=40, n_restarts=3)
    cols = out["columns"]
    assert cols["k_selected"] == 6 and cols["above_null"]
    assert adjusted_rand_score(truth, cols["labels"]) > 0.9
    assert cols["groups"].shape == (900,) and cols["ari_restarts"].shape[0] == 3
    assert cols["null_silhouettes"].shape == (20, len(cols["ks"]))
    np.testing.assert_array_equal(cc.labels_at(cols, 6), cols["labels"])
    assert sorted(cols["leaf_order"]) == list(range(900))


def test_synapse_clustering_is_the_same_in_forked_processes():
    """Restarts and nulls shared among 3 forked processes give the numbers one process gives,
    bit for bit (each has its own seed; the null copies are drawn before the work is shared)."""
    V, _ = _planted(np.random.default_rng(4), n_clusters=4, per_cluster=100, noise=0.3)
    one, three = (cc.cluster_synapses(V.T, np.random.default_rng(7), n_groups=30, n_restarts=4,
                                      processes=p) for p in (1, 3))
    assert one.keys() == three.keys()
    for key, value in one.items():
        if isinstance(value, dict):
            assert value.keys() == three[key].keys(), key
            for sub in value:
                np.testing.assert_array_equal(value[sub], three[key][sub], err_msg=key)
        else:
            np.testing.assert_array_equal(value, three[key], err_msg=key)
    assert one["null_silhouettes"].shape == (20, len(one["ks"]))


def test_synapse_restart_ari_equals_sklearn():
    V, _ = _planted(np.random.default_rng(4), n_clusters=4, per_cluster=100, noise=0.3)
    X = V.T
    out = cc.cluster_synapses(X, np.random.default_rng(7), n_groups=30, n_restarts=3)
    seeds = np.random.default_rng(7).integers(0, 2**31 - 1, size=3 + 20)[:3]
    fits = [cc.pregroup(X, 30, int(s)) for s in seeds]
    cuts = [cc.cut_labels(linkage(pdist(m), method="ward"), out["ks"])[:, g] for g, m in fits]
    ref = np.mean([[adjusted_rand_score(a, b) for a, b in zip(cuts[r], cuts[s])]
                   for r, s in itertools.combinations(range(3), 2)], axis=0)
    # per restart: mean ARI with the 2 others; their mean over restarts is the pair mean
    np.testing.assert_allclose(out["ari_restarts"].mean(axis=0), ref, atol=1e-12)


def test_over_membership_hand_example():
    # 2 hidden (post) x 3 input (pre); synapse cluster 0 = every synapse onto hidden unit 0
    input_labels = np.array([0, 0, 1])
    hidden_labels = np.array([0, 1])
    mod_labels = np.array([[0, 0, 0], [1, 1, 2]]).ravel()  # post-major
    OM = cc.over_membership(mod_labels, input_labels, hidden_labels)
    assert OM.shape == (3, 2, 2)
    # cluster 0 (size 3) in block input 0 x hidden 0: 2 / (2 * 1 * 3 / 6) = 2
    np.testing.assert_allclose(OM[0], [[2.0, 0.0], [2.0, 0.0]])
    # cluster 2 (size 1, the synapse hidden 1 <- input 2): 1 / (1 * 1 * 1 / 6) = 6
    np.testing.assert_allclose(OM[2], [[0.0, 0.0], [0.0, 6.0]])
