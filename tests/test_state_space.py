"""state_space_shift.py: the shift-test geometry and regression on constructed data, subspace
angles, M streaming, and the whole stage on a tiny run (one and several runs)."""
import numpy as np
import pytest
import torch

import helper
import state_space_shift as sss


# ----------------------------------------------------------------------------------------
# Constructed data


def constructed_states(slope_deg, n_rules=5, trials_per_dir=2, seed=0):
    """Rule r's pre-onset state sits at p_r on one axis and its onset displacement points at
    angle θ_r = slope · p_r in an orthogonal plane, so for every pair and direction the
    displacement angle is exactly slope x the distance between pre-onset states."""
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.uniform(0.0, 2.0, n_rules))
    n = sss.N_DIRS * trials_per_dir
    rule = np.repeat(np.arange(n_rules), n)
    direction = np.tile(np.arange(n) % sss.N_DIRS, n_rules)
    pre = np.zeros((rule.size, 4))
    pre[:, 0] = positions[rule]
    theta = np.radians(slope_deg * positions[rule])
    scale = rng.uniform(0.5, 2.0, rule.size)  # displacement length must not matter
    disp = np.zeros((rule.size, 4))
    disp[:, 2], disp[:, 3] = scale * np.cos(theta), scale * np.sin(theta)
    return pre, disp, rule, direction


def test_shift_test_recovers_a_known_slope_exactly():
    pre, disp, rule, direction = constructed_states(slope_deg=40.0)
    out = sss.shift_test(pre, disp, rule, direction)
    assert out["n"] == 10 * sss.N_DIRS  # 5 rules -> 10 pairs, x 8 directions
    assert out["slope"] == pytest.approx(40.0, rel=1e-6)
    assert out["r"] == pytest.approx(1.0, abs=1e-9) and out["p"] < 1e-10
    np.testing.assert_allclose(out["angle_deg"], 40.0 * out["distance"], rtol=1e-6, atol=1e-6)


def test_regression_through_origin_with_noise():
    rng = np.random.default_rng(1)
    x = rng.uniform(0.1, 3.0, 400)
    y = 25.0 * x + rng.normal(0.0, 2.0, x.size)
    fit = sss.fit_through_origin(x, y)
    assert fit["slope"] == pytest.approx(25.0, rel=0.02)
    assert fit["r"] > 0.95 and fit["p"] < 1e-50 and fit["n"] == 400
    # no intercept: a pure offset is not absorbed
    assert sss.fit_through_origin(x, np.full_like(x, 5.0))["slope"] > 0


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


def test_m_capture_keeps_only_the_requested_steps():
    captured, m_reduce = sss.m_capture({2, 3})
    for t in range(6):
        m_reduce(t, torch.full((2, 3, 4), float(t)))
    assert sorted(captured) == [2, 3]
    assert captured[3].shape == (2, 12) and np.all(captured[3] == 3.0)


def test_families_cover_the_fifteen_rules_once():
    rules = [r for family in sss.FAMILIES.values() for r in family]
    assert len(rules) == len(set(rules)) == 15
    assert sss.family_of("reactanti") == "Reaction" and sss.family_of("dmcnogo") == "Match"
