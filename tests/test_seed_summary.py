"""seed_summary.py and similarity.py: the statistics against hand-computed values, the
similarity measures' invariances, the grouping test on planted and on absent structure, and
the whole summary on three tiny runs of two architectures."""
import json

import numpy as np
import pytest

import clustering
import helper
import lesion
import memory_geometry
import multiple_task
import multiple_task_analysis as mta
import seed_summary
import similarity
import state_space_shift
import timescales


# ----------------------------------------------------------------------------------------
# Statistics by hand


def test_mean_sd_and_t_interval_match_hand_values():
    # values 0.5, 0.7, 0.9: mean 0.7, s.d. 0.2; t(0.975, 2) = 4.302653 -> half 4.302653*0.2/√3
    mean, sd, n = seed_summary.mean_sd([0.5, 0.7, 0.9, np.nan])
    assert (mean, n) == (pytest.approx(0.7), 3) and sd == pytest.approx(0.2)
    lo, hi = seed_summary.t_interval([0.5, 0.7, 0.9])
    half = 4.302652729911275 * 0.2 / np.sqrt(3)
    assert lo == pytest.approx(0.7 - half) and hi == pytest.approx(0.7 + half)
    assert seed_summary.mean_sd([0.4]) == [0.4, 0.0, 1]
    assert np.isnan(seed_summary.t_interval([0.4])).all()


def test_wilson_interval_matches_hand_values():
    # 7/7: centre (1 + z²/14)/(1 + z²/7), half z·√(z²/196)/(1 + z²/7) = (z²/14)/(1 + z²/7)
    z2 = 1.959963984540054 ** 2
    lo, hi = seed_summary.wilson(7, 7)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 / (1 + z2 / 7))  # 0.6457
    assert lo == pytest.approx(0.6457, abs=1e-4)
    lo, hi = seed_summary.wilson(0, 7)
    assert lo == 0.0 and hi == pytest.approx(0.3543, abs=1e-4)
    lo, hi = seed_summary.wilson(3, 5)  # the textbook value [0.2307, 0.8824]
    assert (lo, hi) == (pytest.approx(0.2307, abs=1e-4), pytest.approx(0.8824, abs=1e-4))
    assert seed_summary.wilson(0, 0) == [0.0, 1.0]


# ----------------------------------------------------------------------------------------
# Similarity measures


def random_rotation(n, rng):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def test_cka_and_procrustes_of_a_net_with_itself_and_its_rotation():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    Q = random_rotation(12, rng)
    assert similarity.linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert similarity.procrustes_distance(X, X) == pytest.approx(0.0, abs=1e-6)
    assert similarity.linear_cka(X, 3.0 * X @ Q + 5.0) == pytest.approx(1.0, abs=1e-6)
    assert similarity.procrustes_distance(X, 3.0 * X @ Q + 5.0) == pytest.approx(0.0, abs=1e-6)
    Y = rng.standard_normal((200, 8))
    for f in (similarity.linear_cka, similarity.procrustes_distance):
        assert f(X @ Q, Y @ random_rotation(8, rng)) == pytest.approx(f(X, Y), abs=1e-6)
    assert 0 < similarity.linear_cka(X, Y) < 0.3  # unrelated states: far from 1
    assert similarity.procrustes_distance(X, Y) > 1.0
    assert np.isnan(similarity.linear_cka(X, np.ones((200, 3))))


def test_procrustes_distance_equals_the_optimal_rotation_residual():
    """Plain definition: rotate by the SVD solution and measure the residual."""
    rng = np.random.default_rng(1)
    X, Y = rng.standard_normal((50, 4)), rng.standard_normal((50, 4))
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Xc, Yc = Xc / np.linalg.norm(Xc), Yc / np.linalg.norm(Yc)
    U, _, Vt = np.linalg.svd(Yc.T @ Xc)
    residual = np.linalg.norm(Xc - Yc @ (U @ Vt))
    assert similarity.procrustes_distance(X, Y) == pytest.approx(residual, abs=1e-10)


def test_cka_equals_its_gram_matrix_definition():
    """HSIC form: CKA = <K_c, L_c> / (‖K_c‖ ‖L_c‖) with centred Gram matrices."""
    rng = np.random.default_rng(2)
    X, Y = rng.standard_normal((40, 5)), rng.standard_normal((40, 7))
    H = np.eye(40) - 1 / 40
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    expected = np.sum(K * L) / (np.linalg.norm(K) * np.linalg.norm(L))
    assert similarity.linear_cka(X, Y) == pytest.approx(expected, abs=1e-12)


def test_classical_mds_recovers_planar_distances():
    rng = np.random.default_rng(3)
    P = rng.standard_normal((9, 2))
    D = np.linalg.norm(P[:, None] - P[None], axis=-1)
    xy = similarity.mds(D)
    np.testing.assert_allclose(np.linalg.norm(xy[:, None] - xy[None], axis=-1), D, atol=1e-9)


def planted(rng, sizes, gap):
    """Dissimilarities of points around one centre per group, `gap` apart."""
    centres = rng.standard_normal((len(sizes), 5)) * gap
    pts = np.concatenate([c + rng.standard_normal((n, 5)) for c, n in zip(centres, sizes)])
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.linalg.norm(pts[:, None] - pts[None], axis=-1), labels


def test_grouping_test_finds_planted_groups_and_not_absent_ones():
    rng = np.random.default_rng(4)
    D, labels = planted(rng, [5, 5, 5], gap=4.0)
    found = similarity.permutation_test(D, labels, n_permutations=999, seed=0)
    assert found["statistic"] > 0 and found["p"] < 0.01
    # no structure: over 40 independent draws the test rejects at 5% about 5% of the time
    ps = [similarity.permutation_test(*planted(rng, [5, 5, 5], gap=0.0), n_permutations=199,
                                      seed=i)["p"] for i in range(40)]
    assert np.mean(np.array(ps) < 0.05) <= 0.15 and np.median(ps) > 0.2
    with pytest.raises(ValueError, match="two groups"):
        similarity.permutation_test(D[:3, :3], [0, 1, 2])


def test_within_between_reports_each_group():
    D = np.array([[0, 1, 4, 4], [1, 0, 4, 4], [4, 4, 0, 2], [4, 4, 2, 0]], dtype=float)
    wb = similarity.within_between(D, ["a", "a", "b", "b"])
    assert wb["a"]["within"][0] == 1 and wb["b"]["within"][0] == 2
    assert wb["a"]["between"] == [4.0, 0.0]


# ----------------------------------------------------------------------------------------
# The whole summary on three tiny runs of two architectures


def tiny_run(root, net, seed):
    cfg = helper.load_config(multiple_task.CONFIG, [str(helper.REPO_DIR / "configs/tiny.py")],
                             echo=False)
    cfg.update(net=net, seed=seed, runs_dir=str(root), figures=False, max_steps=20)
    multiple_task.main(cfg)
    name = helper.run_name(cfg)
    common = dict(run=name, runs_dir=str(root))
    mta.main(dict(mta.CONFIG, **common, stability_seeds=0, stability_epoch_quantiles=[],
                  device="cpu", figures=False))
    clustering.main(dict(clustering.CONFIG, **common, n_groups=40, n_restarts=2, figures=False,
                         stability=False))
    lesion.main(dict(lesion.CONFIG, **common, experiments=["single"], trials_per_rule=8, n_random=2,
                     forms=["normalized"], k_cuts=["fixed"], unit_reps=["hidden"], device="cpu"))
    state_space_shift.main(dict(state_space_shift.CONFIG, **common, trials_per_rule=8,
                                n_permutations=20, device="cpu"))
    memory_geometry.main(dict(memory_geometry.CONFIG, **common, delay_ms=800,
                              trials_per_direction=1, n_shuffles=5, figures=False, device="cpu"))
    timescales.main(dict(timescales.CONFIG, **common, burn_in_steps=5, n_steps=40,
                         max_lag_steps=5, trials_per_rule=1, figures=False))
    return name


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("summary_runs")
    names = [tiny_run(root, "dmpn", 1), tiny_run(root, "dmpn", 2), tiny_run(root, "vanilla", 1)]
    return root, names


def test_summary_of_three_tiny_runs_writes_every_table(three_runs, tmp_path, capsys):
    root, names = three_runs
    page = tmp_path / "docs" / "results.md"
    cfg = dict(seed_summary.CONFIG, runs="everything_*", runs_dir=str(root), page=str(page),
               trials_per_rule=8, m_trials_per_rule=4, steps_per_period=3, m_pcs=8,
               n_permutations=99, preset="configs/tiny.py")
    s = seed_summary.main(cfg)
    assert s["runs"] == sorted(names) and s["seeds"] == {"dmpn": [1, 2], "vanilla": [1]}
    # accuracy: mean and s.d. of the two dmpn runs' rule means, recomputed from their logs
    means = []
    for name in sorted(names)[:2]:
        acc = json.loads((root / name / "log.json").read_text())["evals"][-1]["acc"]["trial"]
        means.append(np.mean(list(acc.values())))
    got = s["accuracy"]["dmpn"]["trial"]["rule_mean"]
    assert got[0] == pytest.approx(np.mean(means)) and got[1] == pytest.approx(np.std(means, ddof=1))
    assert s["accuracy"]["vanilla"]["trial"]["rule_mean"][1] == 0.0  # one seed
    # clusters: input and synapse representations only for the dmpn
    assert "input-normalized" in s["clusters"]["dmpn"]
    assert all(k.startswith("hidden") for k in s["clusters"]["vanilla"])
    assert s["lesions"]["vanilla"]["hidden-normalized-fixed"]["n_runs"] == 1
    assert set(s["shift"]["dmpn"]) >= {"hidden", "M"} and set(s["shift"]["vanilla"]) == {"hidden"}
    assert s["memory"]["dmpn"] and s["timescales"]["vanilla"]
    # per-run values behind the shift and timescale figures, and their means in the tables
    for net, reps in s["shift_runs"].items():
        for rep, e in reps.items():
            assert len(e["trained"]) == len(s["seeds"][net])
            assert s["shift"][net][rep]["trained"][0] == pytest.approx(np.mean(e["trained"]))
    assert s["timescales"]["dmpn"]["hidden trained"][0] == pytest.approx(
        np.nanmean(s["timescale_runs"]["dmpn"]["hidden trained"]))
    # similarity: every run with itself CKA 1, the two dmpn runs' M compared
    sim = s["similarity"]
    assert len(sim["runs"]) == 6 and np.allclose(np.diag(sim["cka"]), 1.0)
    assert np.allclose(np.diag(sim["procrustes"]), 0.0)
    assert sim["M"]["runs"] == sorted(names)[:2] and 0 < sim["M"]["variance_kept"][0] <= 1
    assert 0 < sim["grouping_procrustes"]["p"] <= 1
    text = page.read_text()
    for section in ("## Runs", "## Accuracy", "## Per-rule accuracy", "## Clustering structure",
                    "## Sibling task-periods", "## Lesions", "## State-space shift test",
                    "## Memory geometry", "## Timescales", "## Similarity of representations"):
        assert section in text
    for fig in ("accuracy", "siblings", "similarity", "shift", "timescales"):
        assert (page.parent / "results" / f"{fig}.png").exists()
    saved = json.loads((page.parent / "results" / "seed_summary.json").read_text())
    assert saved["accuracy"]["dmpn"]["trial"]["rule_mean"][0] == pytest.approx(got[0])
    assert "dmcgo/dmcnogo delay1" in capsys.readouterr().out


def test_sibling_counts_recount_from_the_cluster_files(three_runs):
    root, names = three_runs
    runs = [seed_summary.read_run(p) for p in helper.find_runs("everything_dmpn*", str(root))]
    table = seed_summary.sibling_table(seed_summary.by_arch(runs))["dmpn"]["hidden"]
    shared, n = 0, 0
    for r in runs:
        R = r["clusters"]["hidden"]["normalized"]
        if not R["row_above_null"]:
            continue
        rows = [str(x) for x in R["row_names"]]
        n += 1
        shared += int(R["row_labels"][rows.index("dmcgo-delay1")] ==
                      R["row_labels"][rows.index("dmcnogo-delay1")])
    if n:
        assert table["cells"]["dmcgo/dmcnogo delay1"][:2] == [shared, n]
        assert table["cells"]["dmcgo/dmcnogo delay1"][2:] == seed_summary.wilson(shared, n)
