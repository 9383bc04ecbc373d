"""state_space_shift.py: the shift-test geometry and regression on constructed data, subspace
angles, M streaming, and the whole stage on a tiny run (one and several runs)."""
from pathlib import Path

import numpy as np
import pytest
import torch

import helper
import mpn_tasks
import state_space_shift as sss

REPO = Path(__file__).resolve().parents[1]
RULES_GO = ["fdgo", "fdanti", "reactgo", "reactanti", "delaygo", "delayanti"]


# ----------------------------------------------------------------------------------------
# Constructed data


def constructed_states(slope_deg, n_rules=5, trials_per_dir=2, seed=0):
    """Rule r's pre-onset state sits at p_r on one axis and its onset displacement points at
    angle θ_r = slope · p_r in an orthogonal plane, so for every pair and direction the
    displacement angle is exactly slope x the distance between pre-onset states."""
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.uniform(0.0, 2.0, n_rules))
    n = mpn_tasks.N_DIRS * trials_per_dir
    rule = np.repeat(np.arange(n_rules), n)
    direction = np.tile(np.arange(n) % mpn_tasks.N_DIRS, n_rules)
    pre = np.zeros((rule.size, 4))
    pre[:, 0] = positions[rule]
    theta = np.radians(slope_deg * positions[rule])
    scale = rng.uniform(0.5, 2.0, rule.size)  # displacement length must not matter
    disp = np.zeros((rule.size, 4))
    disp[:, 2], disp[:, 3] = scale * np.cos(theta), scale * np.sin(theta)
    return pre, disp, rule, direction


def test_shift_test_recovers_a_known_slope_exactly():
    pre, disp, rule, direction = constructed_states(slope_deg=40.0)
    out = sss.shift_test(pre, disp, rule, direction, 99, np.random.default_rng(0))
    real = out["real"]
    assert real["n"] == 10 and real["rule_pair"].shape == (10, 2)  # one point per rule pair
    assert real["slope"] == pytest.approx(40.0, rel=1e-6)
    assert real["intercept"] == pytest.approx(0.0, abs=1e-6)
    assert real["r"] == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(real["angle_deg"], 40.0 * real["distance"], rtol=1e-6, atol=1e-6)
    # angle = slope x distance holds for every pair of trials here, so it holds for any
    # grouping of them: the shuffles reach r = 1 too, and the permutation p is not small
    assert out["null_r"].shape == (99,)
    np.testing.assert_allclose(out["null_r"], 1.0, atol=1e-9)
    assert 0 < real["p"] <= 1


def test_pair_matrices_equal_a_plain_double_loop():
    rng = np.random.default_rng(3)
    rule = np.repeat(np.arange(4), 12)
    direction = np.tile(np.arange(12) % 3, 4)
    pre, disp = rng.normal(size=(48, 5)), rng.normal(size=(48, 5))
    disp[5] = 0.0  # a zero displacement has no angle
    D, A = sss.pair_matrices(sss.direction_blocks(pre, disp, direction), rule, 4)
    for a in range(4):
        for b in range(4):
            per_dir_d, per_dir_a = [], []
            for d in range(3):
                dd, aa = [], []
                for i in np.flatnonzero((rule == a) & (direction == d)):
                    for j in np.flatnonzero((rule == b) & (direction == d)):
                        dd.append(np.linalg.norm(pre[i] - pre[j]))
                        if np.linalg.norm(disp[i]) > 0 and np.linalg.norm(disp[j]) > 0:
                            cos = disp[i] @ disp[j] / np.linalg.norm(disp[i]) / np.linalg.norm(disp[j])
                            aa.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
                per_dir_d.append(np.mean(dd))
                per_dir_a.append(np.mean(aa))
            assert D[a, b] == pytest.approx(np.mean(per_dir_d), abs=1e-5)
            assert A[a, b] == pytest.approx(np.mean(per_dir_a), abs=1e-4)


def test_pearson_and_least_squares_line_match_scipy():
    from scipy.stats import linregress
    rng = np.random.default_rng(1)
    x = rng.uniform(0.1, 3.0, 40)
    y = 25.0 * x + 10 + rng.normal(0.0, 5.0, x.size)
    fit, ref = sss.pearson_ols(x, y), linregress(x, y)
    assert fit["slope"] == pytest.approx(ref.slope) and fit["r"] == pytest.approx(ref.rvalue)
    assert fit["intercept"] == pytest.approx(ref.intercept) and fit["n"] == 40


def test_permutation_p_is_uniform_under_shuffled_labels():
    """States of a tiny untrained dmpn; 200 draws of shuffled rule labels, each tested with
    its own permutation p: the p values are uniform (KS)."""
    from scipy.stats import kstest
    import mpn
    net = mpn.build_model("dmpn", n_hidden=6, seed=3).eval()
    cfg = dict(sss.CONFIG, trials_per_rule=16)
    batches = sss.make_trials(["fdgo", "reactgo", "delaygo", "dmsgo", "dmcgo"], cfg, "low_dim")
    states, meta, _ = sss.collect_states(net, batches, "cpu")
    pre, disp = states["M"]
    rng = np.random.default_rng(0)
    ps = [sss.shift_test(pre, disp, sss.shuffle_within(meta["rule"], meta["direction"], rng),
                         meta["direction"], 49, rng)["real"]["p"] for _ in range(200)]
    assert kstest(ps, "uniform").pvalue > 0.01


def test_pairwise_helpers_match_plain_formulas():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(6, 5))
    D = sss.pairwise_distances(X)
    np.testing.assert_allclose(D, np.linalg.norm(X[:, None] - X[None], axis=-1), atol=1e-7)
    A = sss.pairwise_angles_deg(np.array([[1.0, 0], [0, 2.0], [-3.0, 0], [0, 0]]))
    np.testing.assert_allclose(A[0, :3], [0.0, 90.0, 180.0], atol=1e-6)
    assert np.isnan(A[0, 3])  # a zero displacement has no direction


def test_subspace_angles_self_zero_orthogonal_ninety():
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    A, B, C = Q[:, :3], Q[:, 3:6], Q[:, :3] @ rng.normal(size=(3, 3))  # C spans A
    out = sss.subspace_angle_matrix([A, B, C])
    for key in ("max_deg", "mean_deg"):
        np.testing.assert_allclose(np.diag(out[key]), 0.0, atol=1e-5)
        assert out[key][0, 1] == pytest.approx(90.0)
        assert out[key][0, 2] == pytest.approx(0.0, abs=1e-5)
        np.testing.assert_allclose(out[key], out[key].T, atol=1e-6)


def test_rule_subspace_finds_the_plane_activity_lives_in():
    rng = np.random.default_rng(4)
    basis, _ = np.linalg.qr(rng.normal(size=(12, 2)))
    trials = [rng.normal(size=(30, 2)) @ basis.T for _ in range(3)]
    found, evr = sss.rule_subspace(trials, 2)
    assert sss.subspace_angle_matrix([found, basis])["max_deg"][0, 1] < 1e-3
    assert evr.sum() == pytest.approx(1.0)


def test_top_pcs_match_an_svd_in_both_regimes():
    rng = np.random.default_rng(5)
    for shape in ((40, 7), (7, 40)):  # covariance route, Gram route
        X = rng.normal(size=shape) * np.linspace(3, 1, shape[1])
        pcs = sss.top_pcs(X, 3)
        Xc = X - X.mean(0)
        _, S, Vt = np.linalg.svd(Xc, full_matrices=False)
        np.testing.assert_allclose(np.abs(pcs["components"]), np.abs(Vt[:3].T), atol=1e-8)
        np.testing.assert_allclose(pcs["proj"], Xc @ pcs["components"], atol=1e-8)
        np.testing.assert_allclose(pcs["explained_variance_ratio"], S[:3] ** 2 / (S ** 2).sum())
        np.testing.assert_allclose(pcs["components"].T @ pcs["components"], np.eye(3),
                                   atol=1e-8)


def test_m_capture_keeps_only_the_requested_steps():
    captured, m_reduce = sss.m_capture({2, 3})
    for t in range(6):
        m_reduce(t, torch.full((2, 3, 4), float(t)))
    assert sorted(captured) == [2, 3]
    assert captured[3].shape == (2, 12) and np.all(captured[3] == 3.0)


def test_task_families_follow_the_spec():
    assert sss.family_names() == ["Go/Anti", "Reaction", "Delay", "Decision-making", "Match"]
    expect = {"fdanti": "Go/Anti", "reactanti": "Reaction", "delaygo": "Delay",
              "contextdelaydm2": "Decision-making", "multidelaydm": "Decision-making",
              "dmsnogo": "Match", "dmcgo": "Match"}
    assert {rule: sss.family_of(rule) for rule in expect} == expect


# ----------------------------------------------------------------------------------------
# The stage on tiny runs


def tiny_train_cfg(root, **overrides):
    import multiple_task as mt
    cfg = helper.load_config(mt.CONFIG, [str(REPO / "configs" / "tiny.py")], echo=False)
    return dict(cfg, runs_dir=str(root), **overrides)


def stage_cfg(root, run, **overrides):
    return dict(sss.CONFIG, run=run, runs_dir=str(root), trials_per_rule=8, device="cpu",
                n_permutations=20, **overrides)


def test_streamed_m_matches_the_recorded_history():
    """The two M states captured through m_reduce equal the full recorded history there."""
    import mpn
    net = mpn.build_model("dmpn", n_hidden=6, seed=3).eval()
    batch = mpn_tasks.aligned_batch("fdgo", 4, np.random.default_rng(0), quantile=0.0,
                                    sigma_x=0.01)
    states, h, onset = sss.rule_states(net, batch, "cpu")
    with torch.no_grad():
        out = net(torch.as_tensor(batch.inputs), record=("M",))
    M = out["M"].reshape(*out["M"].shape[:2], -1).numpy()  # M[:, t] = M_{t-1}
    assert onset == batch.epochs["stim1"][0, 0]
    np.testing.assert_allclose(states["M"][0], M[:, onset], atol=1e-6)  # M after onset - 1
    np.testing.assert_allclose(states["M"][1], M[:, onset + 1] - M[:, onset], atol=1e-6)
    np.testing.assert_allclose(states["hidden"][0], out["h"][:, onset - 1].numpy(), atol=1e-6)
    assert np.abs(states["M"][1]).max() > 0  # the stimulus moves M at onset


def test_react_rules_use_the_go_onset():
    batch = mpn_tasks.aligned_batch("reactgo", 8, np.random.default_rng(0))
    assert sss.onset_step(batch) == batch.epochs["go1"][0, 0]
    assert list(sss.trial_directions(batch)) == list(range(8))


def test_missing_run_names_the_training_command(runs_dir):
    with pytest.raises(helper.StageError, match="python multiple_task.py"):
        sss.main(stage_cfg(runs_dir, "no_such_run"))


def save_untrained_run(cfg):
    """A run folder with an untrained checkpoint of `cfg` (no training needed)."""
    import mpn
    import multiple_task as mt
    import net_helpers
    net = mpn.build_model(cfg["net"], **mt.model_kwargs(cfg, mt.derived(cfg)))
    paths = helper.run_paths(cfg)
    net_helpers.save_checkpoint(paths.checkpoint, net, cfg, step=0)
    return paths


def test_stage_on_tiny_trained_runs(runs_dir):
    """A tiny trained run and a second (untrained) seed, analysed by one glob: every artifact
    of each run, and the multi-run summary."""
    import multiple_task as mt
    names = [mt.main(tiny_train_cfg(runs_dir, seed=1, max_steps=10))["paths"].name,
             save_untrained_run(tiny_train_cfg(runs_dir, seed=2)).name]
    out = sss.main(stage_cfg(runs_dir, "everything_dmpn_seed*"))
    assert [r["run"] for r in out["results"]] == sorted(names) and len(out["figures"]) == 6  # 3 per run
    for result in out["results"]:
        paths = helper.run_paths(result["run"], runs_dir)
        for name in ("state_space_context_pca", "state_space_shift_test",
                     "state_space_subspace_angles"):
            assert paths.figure(name).stat().st_size > 10_000
        res, _ = helper.load_h5(paths.state_space,
                                expect_hash=helper.config_hash(result["config"]))
        n_rules = len(res["rules"])
        assert n_rules == 15 and list(res["representations"]) == ["hidden", "M", "WM"]
        series = ("trained", "shuffled") + (("untrained",) if result["step"] > 0 else ())
        for rep in res["representations"]:
            assert res["context_pca"][rep]["proj"].shape == (8 * n_rules, 2)
            for key in series:
                shift = res["shift"][rep][key]
                assert shift["n"][0] == len(shift["distance"]) == 105  # one point per pair
                assert np.isfinite(shift["slope"][0]) and -1 <= shift["r"][0] <= 1
                assert 0 < shift["p"][0] <= 1
                assert np.all((shift["angle_deg"] >= 0) & (shift["angle_deg"] <= 180))
            assert ("untrained" in res["shift"][rep]) == (result["step"] > 0)
        angles = res["subspace"][f"{res['subspace']['stat'][0]}_deg"]
        assert angles.shape == (n_rules, n_rules) and np.allclose(np.diag(angles), 0, atol=1e-4)
        assert np.all((angles >= 0) & (angles <= 90 + 1e-6))
    assert not helper.summary_dir(runs_dir).exists()  # across runs: seed_summary.py


def test_stage_on_a_vanilla_checkpoint_analyses_hidden_only(runs_dir):
    """Without training: a saved vanilla-RNN checkpoint has no M, so only h is analysed."""
    paths = save_untrained_run(tiny_train_cfg(runs_dir, net="vanilla", ruleset="go"))
    out = sss.main(stage_cfg(runs_dir, paths.name, subspace_stat="max"))
    res = out["results"][0]
    assert len(out["figures"]) == 3
    assert res["representations"] == ["hidden"] and res["rules"] == RULES_GO
    assert res["shift"]["hidden"]["trained"]["n"] == 15  # 6 rules -> 15 pairs
    assert paths.state_space.exists() and paths.figure("state_space_context_pca").exists()
