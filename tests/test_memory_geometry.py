"""memory_geometry.py: the long_delay option, the streamed randomized PCA against an exact
one, the convergence measure, cross-validated decoding on planted and on absent structure,
the probe labels, and the stage on a tiny trained run and an RNN."""
from pathlib import Path

import numpy as np
import pytest

import helper
import memory_geometry as mg
import mpn
import mpn_tasks

REPO = Path(__file__).resolve().parents[1]


def test_long_delay_stretches_delay1_only():
    rng = np.random.default_rng(0)
    plain = mpn_tasks.aligned_batch("dmcgo", 6, rng)
    long = mpn_tasks.aligned_batch("dmcgo", 6, np.random.default_rng(0), long_delay=True)
    d = long.epochs["delay1"][0]
    assert d[1] - d[0] == mpn_tasks.LONG_DELAY_MS // 40 == 250
    for name in ("fix1", "stim1", "go1"):
        assert np.diff(long.epochs[name][0]) == np.diff(plain.epochs[name][0])
    two_s = mpn_tasks.aligned_batch("delaydm1", 8, rng, long_delay=2000)
    assert np.diff(two_s.epochs["delay1"][0])[0] == 50
    with pytest.raises(ValueError, match="no delay1"):
        mpn_tasks.aligned_batch("fdgo", 8, rng, long_delay=True)


def exact_pca(X, k):
    Xc = X - X.mean(0)
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    return Xc @ Vt[:k].T, Vt[:k].T, s[:k] ** 2 / (s ** 2).sum()


def test_streamed_pca_matches_an_exact_pca_on_planted_structure():
    """Rows = 3 planted directions with decaying variance + isotropic noise, streamed in
    chunks: the leading components, their variance ratios and projections match an SVD."""
    rng = np.random.default_rng(1)
    D, n = 200, 300
    basis = np.linalg.qr(rng.normal(size=(D, 3)))[0]
    X = (rng.normal(size=(n, 3)) * [10.0, 5.0, 2.0]) @ basis.T + 0.1 * rng.normal(size=(n, D))
    X += 3.0  # an offset the PCA must remove
    pca = mg.StreamedPCA(D, 3, 10, seed=0)
    for chunk in np.split(X, 10):
        pca.sketch(chunk)
    pca.basis()
    for chunk in np.split(X, 10):
        pca.project(chunk)
    proj, comps, evr = pca.finish((10, 30))
    ref_proj, ref_comps, ref_evr = exact_pca(X, 3)
    cos = np.abs(np.sum(comps * ref_comps, axis=0))
    assert np.all(cos > 0.999)
    np.testing.assert_allclose(evr, ref_evr, rtol=1e-3)
    np.testing.assert_allclose(np.abs(proj.reshape(n, 3)), np.abs(ref_proj), atol=0.05)


def test_streamed_pca_seed_is_fixed():
    X = np.random.default_rng(2).normal(size=(50, 30))
    runs = []
    for _ in range(2):
        pca = mg.StreamedPCA(30, 2, 3, seed=7)
        pca.sketch(X)
        pca.basis()
        pca.project(X)
        runs.append(pca.finish((50,))[0])
    np.testing.assert_array_equal(runs[0], runs[1])


def delay_stats(path):
    dp = mg.DelayPath(len(path))
    for rows in path:
        dp.add(rows)
    return mg.convergence(dp, 5, 0.05)


def test_convergence_separates_settling_from_cycling_and_drifting_paths():
    t = np.arange(100)[:, None, None]
    settle = delay_stats(np.exp(-t / 5.0) * np.ones((1, 3, 4)))  # relaxes within ~20 steps
    assert settle["fraction_converged"] == 1.0 and settle["median_late_drift"] < 1e-3
    phase = 2 * np.pi * t[..., 0] / 20  # a limit cycle of period 20 steps never settles
    cycle = delay_stats(np.stack([np.cos(phase), np.sin(phase)], axis=-1) * np.ones((1, 3, 2)))
    assert cycle["fraction_converged"] == 0.0
    short_drift = delay_stats(t[:12] * np.ones((1, 3, 4)))
    assert short_drift["fraction_converged"] == 0.0  # ratio 1/11
    drift = delay_stats(t * np.ones((1, 3, 4)) / 100)
    # SPEC's ratio passes a steady drift on a long delay (1/99); the late drift flags it
    assert drift["fraction_converged"] == 1.0 and drift["median_late_drift"] == pytest.approx(25 / 99)
    steps = np.linalg.norm(np.diff(t[:, 0] * np.ones((1, 4)) / 100, axis=0), axis=1)
    assert drift["ratio"][0] == pytest.approx(steps[-5:].mean() / (99 / 100 * 2))


def test_decoding_finds_planted_classes_and_not_absent_ones():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 24)
    groups = np.tile(np.arange(6), 8)
    X = rng.normal(size=(48, 5))
    X_planted = X + 5.0 * y[:, None] * np.array([1, -1, 0, 0, 0])
    hit = mg.decode(X_planted, y, groups, 1.0, 50, rng)
    assert hit["accuracy"] > 0.95 and hit["p"] < 0.05 and hit["chance"] == 0.5
    miss = mg.decode(X, y, groups, 1.0, 50, rng)
    assert abs(miss["accuracy"] - 0.5) < 0.2 and miss["p"] > 0.05
    assert np.isnan(mg.decode(X, y, np.zeros(48), 1.0, 5, rng)["accuracy"])  # one group: no CV


def test_batched_cv_equals_the_plain_loop():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(30, 4)) + np.repeat(np.eye(3, 4), 10, axis=0)
    y = np.repeat([0, 1, 2], 10)
    groups = np.arange(30) % 5
    labels = np.stack([y] + [rng.permutation(y) for _ in range(20)])
    labels[3] = np.where(groups == 0, 2, labels[3] % 2)  # class 2 only in one held-out fold
    batched = mg.cv_accuracies(X, labels, groups, 1.0)
    plain = [mg.cv_accuracy(X, row, groups, 1.0) for row in labels]
    np.testing.assert_allclose(batched, plain, atol=1e-12)


def test_probe_labels_and_shared_conditions():
    cfg = dict(mg.CONFIG, delay_ms=800, trials_per_direction=2)
    batch, labels, window = mg.probe_batch("dmc", cfg, "low_dim", 0.01)
    clean = mg.probe_batch("dmc", cfg, "low_dim", 0.0)[0]
    assert len(labels["rule"]) == 2 * 6 * 2 and window[1] - window[0] == 20
    assert set(labels["direction"]) == {1, 2, 3, 5, 6, 7}
    np.testing.assert_array_equal(labels["category"], labels["direction"] > 4)
    np.testing.assert_array_equal(batch.stim1_ring, clean.stim1_ring)  # same conditions
    assert 0 < np.abs(batch.inputs - clean.inputs).max() < 0.2  # only the noise differs


# ----------------------------------------------------------------------------------------
# The stage on tiny runs


def tiny_cfg(root, **overrides):
    import multiple_task as mt
    cfg = helper.load_config(mt.CONFIG, [str(REPO / "configs" / "tiny.py")], echo=False)
    return dict(cfg, runs_dir=str(root), figures=False, **overrides)


def stage_cfg(root, run, **overrides):
    cfg = dict(mg.CONFIG, run=run, runs_dir=str(root), delay_ms=800, trials_per_direction=2,
               n_shuffles=5, n_pcs=4)
    return dict(cfg, **overrides)


def test_stage_on_a_tiny_trained_run(runs_dir):
    import multiple_task as mt
    name = mt.main(tiny_cfg(runs_dir, max_steps=3))["paths"].name
    out = mg.main(stage_cfg(runs_dir, name))
    assert len(out["figures"]) == 3 and all(p.stat().st_size > 10_000 for p in out["figures"])
    paths = helper.run_paths(name, runs_dir)
    data, attrs = helper.load_h5(paths.memory_geometry,
                                 expect_hash=helper.config_hash(stage_cfg(runs_dir, name)))
    assert attrs["pairs"] == ["dmc", "delaydm"] and attrs["representations"] == ["hidden", "WM"]
    for net in ("trained", "untrained"):
        for pair, n_trials in (("dmc", 24), ("delaydm", 32)):
            for rep in ("hidden", "WM"):
                geo = data[net][pair][rep]
                assert geo["trajectory"].shape == (n_trials, 20, 4)
                assert geo["convergence"]["step_norm"].shape == (n_trials, 19)
                for dec in geo["decoding"].values():
                    assert 0 <= dec["accuracy"] <= 1 and dec["null"].shape == (5,)


def test_stage_on_an_rnn_and_bad_input(runs_dir):
    import multiple_task as mt
    import net_helpers
    cfg = tiny_cfg(runs_dir, net="vanilla")
    net = mpn.build_model("vanilla", **mt.model_kwargs(cfg, mt.derived(cfg)))
    paths = helper.run_paths(cfg)
    net_helpers.save_checkpoint(paths.checkpoint, net, cfg, step=0)
    out = mg.main(stage_cfg(runs_dir, paths.name, untrained_baseline=False, figures=False))
    assert out["results"][0]["representations"] == ["hidden"]
    with pytest.raises(helper.StageError, match="python multiple_task.py"):
        mg.main(stage_cfg(runs_dir, "no_such_run"))
    with pytest.raises(helper.StageError, match="delay_ms"):
        mg.main(stage_cfg(runs_dir, paths.name, delay_ms=100))
