"""fixed_points.py: the closed forms of SPEC §7.3 (zero input: M* = 0 and every eigenvalue λ;
the pre-only rule; the rank-one Jacobian of the Hebbian rule), matrix-free = dense
eigenvalues, the model's one-step map against its forward pass, and the stage on tiny runs."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fixed_points as fp
import helper
import mpn

REPO = Path(__file__).resolve().parents[1]


def dmpn64(n=6, seed=3, **kw):
    return mpn.build_model("dmpn", n_hidden=n, seed=seed, **kw).double().eval().requires_grad_(False)


def flat_map(net):
    return fp.step_map(net, net.state_shape())


def test_step_matches_the_forward_pass_for_every_model():
    """Iterating `step` from the trial-start state reproduces forward's states."""
    u = torch.randn(3, 7, 21, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name in ("dmpn", "vanilla", "gru"):
        net = mpn.build_model(name, n_hidden=5, seed=1).double().eval()
        s = torch.zeros(3, *net.state_shape(), dtype=torch.float64)
        with torch.no_grad():
            for t in range(7):
                s = net.step(s, u[:, t])
            np.testing.assert_allclose(net.states_at(u, [6])[:, 0], s, atol=1e-12)


@pytest.mark.parametrize("name,options", [
    ("dmpn", {}), ("dmpn", {"mp_type": "add"}), ("dmpn", {"m_update": "hebb_pre"}),
    ("dmpn", {"eta_type": "matrix", "lam_type": "pre_vector"}), ("dmpn", {"m_bounds": None}),
    ("vanilla", {}), ("gru", {})])
def test_constant_input_step_equals_step(name, options):
    """The precomputed one-input map (split drive, baddbmm, in-place clip) against `step`,
    with the clip binding on many synapses."""
    net = mpn.build_model(name, n_hidden=7, seed=8, **options).double().eval()
    gen = torch.Generator().manual_seed(9)
    u = 2.0 * torch.randn(3, 21, dtype=torch.float64, generator=gen)
    s = 1.6 * torch.rand(3, *net.state_shape(), dtype=torch.float64, generator=gen) - 0.8
    with torch.no_grad():
        np.testing.assert_allclose(net.constant_input_step(u)(s.clone()), net.step(s, u),
                                   atol=1e-14)


def test_relax_stops_each_condition_once_its_step_is_below_tol():
    """At zero input M_t = λ^t M_0 exactly, with RMS step (1 − λ) λ^(t−1) rms(M_0): each
    condition stops at the first check (every 50 steps) where that is below tol, and keeps
    its state from there."""
    net = dmpn64()
    lam, tol = float(net.mp.lam), 1e-5
    s0 = torch.stack([0.5 * torch.ones(36), 0.01 * torch.ones(36)]).double()
    s = fp.relax(net, torch.zeros(2, 21, dtype=torch.float64), s0, 1000, tol)
    stops = []
    for k, scale in enumerate((0.5, 0.01)):
        stops.append(next(t for t in range(50, 1001, 50)
                          if (1 - lam) * lam ** (t - 1) * scale < tol))
        np.testing.assert_allclose(s[k], lam ** stops[-1] * s0[k], rtol=1e-12)
    assert stops == [650, 250]  # both stopped early, each at its own step


def test_polish_leaves_fixed_conditions_alone():
    net = dmpn64()
    F = flat_map(net)
    u = torch.zeros(2, 21, dtype=torch.float64)
    s = torch.stack([torch.zeros(36), 0.3 * torch.ones(36)]).double()  # fixed, and not
    out = fp.polish(F, u, s, 20, tol=1e-8)
    assert torch.equal(out[0], s[0]) and fp.rms_speed(F, u, out)[1] < fp.rms_speed(F, u, s)[1]


def test_zero_input_gives_m_star_zero_and_every_eigenvalue_lambda():
    net = dmpn64()
    F = flat_map(net)
    u = torch.zeros(4, 21, dtype=torch.float64)
    s0 = torch.rand(4, 36, dtype=torch.float64) - 0.5
    with helper.single_thread():  # thousands of tiny steps
        s = fp.polish(F, u, fp.relax(net, u, s0, 3000), 20)
    assert torch.abs(s).max() < 1e-10
    for k in range(2):
        vals = fp.leading_eigenvalues(net, F, u[k], s[k], 6)
        np.testing.assert_allclose(vals, 0.99, atol=1e-9)
        dense = np.linalg.eigvals(fp.dense_jacobian(F, u[k], s[k]))
        np.testing.assert_allclose(dense, 0.99, atol=1e-12)  # all 36, not only the leading


@pytest.mark.parametrize("scale", [0.002, 0.5])
def test_pre_only_rule_matches_its_closed_form(scale):
    """hebb_pre: M' = clip(λM + η/√N · 1 xᵀ) does not depend on h, so M*_ij =
    clip(η x_j / (√N (1 − λ))) and the Jacobian is λ on free synapses, 0 on clipped ones."""
    n = 6
    net = dmpn64(n, m_update="hebb_pre")
    F = flat_map(net)
    gen = torch.Generator().manual_seed(1)
    u = scale * torch.randn(1, 21, dtype=torch.float64, generator=gen)
    x = net.presynaptic(u)[0]
    eta, lam = float(net.mp.eta), float(net.mp.lam)
    free = eta * x / (math.sqrt(n) * (1 - lam))
    expected = torch.clamp(free, -1, 1).expand(n, n).reshape(-1)
    with helper.single_thread():
        s = fp.relax(net, u, torch.zeros(1, n * n, dtype=torch.float64), 4000)
    np.testing.assert_allclose(s[0], expected, atol=1e-10)
    clipped = (free.abs() > 1).expand(n, n).reshape(-1).numpy()
    assert clipped.any() == (scale == 0.5)  # the large input saturates some synapses
    dense = np.sort(np.linalg.eigvals(fp.dense_jacobian(F, u[0], s[0])).real)
    np.testing.assert_allclose(dense, np.sort(np.where(clipped, 0.0, lam)), atol=1e-12)


def test_hebbian_jacobian_is_lambda_plus_a_rank_one_term_per_unit():
    """Without clipping, unit i's block is λI + η(1 − h_i²) x (W_i ⊙ x)ᵀ: eigenvalues λ
    (N_pre − 1 times) and λ + η(1 − h_i²) Σ_j W_ij x_j²."""
    n = 6
    net = dmpn64(n)
    F = flat_map(net)
    gen = torch.Generator().manual_seed(2)
    u = 0.3 * torch.randn(1, 21, dtype=torch.float64, generator=gen)
    M = 0.05 * torch.randn(1, n, n, dtype=torch.float64, generator=gen)
    h, M_next = net.plastic_step(M, u)
    assert M_next.abs().max() < 1  # no clipping: the closed form holds
    x, W = net.presynaptic(u)[0], net.mp.W
    special = 0.99 + float(net.mp.eta) * (1 - h[0] ** 2) * (W * x ** 2).sum(1)
    expected = np.sort(np.concatenate([special.numpy(), np.full(n * (n - 1), 0.99)]))
    dense = np.linalg.eigvals(fp.dense_jacobian(F, u[0], M.reshape(1, -1)[0]))
    np.testing.assert_allclose(np.sort(dense.real), expected, atol=1e-12)
    np.testing.assert_allclose(dense.imag, 0, atol=1e-12)


@pytest.mark.parametrize("name", ["dmpn", "vanilla", "gru"])
def test_matrix_free_eigenvalues_equal_the_dense_ones(name):
    n = 8 if name == "dmpn" else 14
    net = mpn.build_model(name, n_hidden=n, seed=4).double().eval().requires_grad_(False)
    F = flat_map(net)
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(1, 21, dtype=torch.float64, generator=gen)
    D = int(np.prod(net.state_shape()))
    s = 0.3 * torch.randn(1, D, dtype=torch.float64, generator=gen)
    k = 6
    v = torch.randn(D, dtype=torch.float64, generator=gen)
    J = fp.dense_jacobian(F, u[0], s[0])
    np.testing.assert_allclose(fp.jvp(net, u[0], s[0], v).numpy(), J @ v.numpy(), atol=1e-12)
    np.testing.assert_allclose(fp.linear_map(net, u[0], s[0])(v).numpy(), J @ v.numpy(),
                               atol=1e-12)
    dense = np.linalg.eigvals(J)
    dense = dense[np.lexsort((-dense.imag, -np.abs(dense)))][:k]
    free = fp.leading_eigenvalues(net, F, u[0], s[0], k)
    np.testing.assert_allclose(np.abs(free), np.abs(dense), atol=1e-6)
    np.testing.assert_allclose(np.sort_complex(free), np.sort_complex(dense), atol=1e-6)


@pytest.mark.parametrize("n_free", [3, 20])
def test_clipped_rows_are_left_out_of_the_eigensolve(n_free):
    """A state where all but n_free synapses clip: the coordinates found moving are exactly
    the unclipped ones, and the leading eigenvalues (ARPACK on the moving block, or dense
    with zeros filled in when it has fewer than k + 2 coordinates) equal the dense ones."""
    n, k = 8, 6
    net = dmpn64(n)
    F = flat_map(net)
    gen = torch.Generator().manual_seed(7)
    u = torch.randn(21, dtype=torch.float64, generator=gen)
    x = net.presynaptic(u[None])[0]
    M = torch.where(x > 0, 1.0, -1.0).expand(n, n).clone()  # λM + η h x pushes past ±1 ...
    h = torch.tanh((net.mp.W * (1 + M)) @ x + net.mp.b)
    M = M * torch.sign(h)[:, None]  # ... when M_ij has the sign of h_i x_j
    free = torch.randperm(n * n, generator=gen)[:n_free]
    M.view(-1)[free] = 0.1 * torch.randn(n_free, dtype=torch.float64, generator=gen)
    s = M.reshape(-1)
    moving = fp.moving_coordinates(fp.linear_map(net, u, s), n * n)
    pre = float(net.mp.lam) * M + float(net.mp.eta) * torch.tanh(
        (net.mp.W * (1 + M)) @ x + net.mp.b)[:, None] * x[None, :]
    np.testing.assert_array_equal(moving, (pre.abs() <= 1).reshape(-1).numpy())
    assert moving.sum() <= n_free + 2
    dense = np.linalg.eigvals(fp.dense_jacobian(F, u, s))
    dense = dense[np.lexsort((-dense.imag, -np.abs(dense)))][:k]
    free_vals = fp.leading_eigenvalues(net, F, u, s, k)
    np.testing.assert_allclose(np.sort_complex(free_vals), np.sort_complex(dense), atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"mp_type": "add"}, {"m_update": "hebb_pre"},
                                     {"m_bounds": None}])
def test_closed_form_jvp_equals_forward_mode_autodiff(options):
    """dmpn.step_jvp against forward-mode AD of step, with the clip binding on many synapses."""
    net = dmpn64(7, **options)
    gen = torch.Generator().manual_seed(6)
    u = 2.0 * torch.randn(3, 21, dtype=torch.float64, generator=gen)
    M = 1.5 * torch.rand(3, 7, 7, dtype=torch.float64, generator=gen) - 0.75
    V = torch.randn(3, 7, 7, dtype=torch.float64, generator=gen)
    new, tangent = net.step_jvp(M, u, V)
    ref_new, ref_tangent = mpn.forward_jvp(net.step, M, u, V)
    np.testing.assert_allclose(new, ref_new, atol=1e-14)
    np.testing.assert_allclose(tangent, ref_tangent, atol=1e-12)
    if options.get("m_bounds", 1) is not None:
        assert (new.abs() == 1).any()  # the clip binds somewhere


def test_unique_rows_groups_equal_conditions():
    a = np.array([[0.0, 1.0], [0.0, 1.0], [-0.0, 1.0 + 1e-13], [2.0, 1.0]])
    first, inverse = fp.unique_rows(a, np.zeros((4, 1)))
    assert list(first) == [0, 3] and list(inverse) == [0, 0, 0, 1]


# ----------------------------------------------------------------------------------------
# The stage on tiny runs


def tiny_cfg(root, **overrides):
    import multiple_task as mt
    cfg = helper.load_config(mt.CONFIG, [str(REPO / "configs" / "tiny.py")], echo=False)
    return dict(cfg, runs_dir=str(root), figures=False, **overrides)


def save_untrained_run(root, **overrides):
    import multiple_task as mt
    import net_helpers
    cfg = tiny_cfg(root, **overrides)
    net = mpn.build_model(cfg["net"], **mt.model_kwargs(cfg, mt.derived(cfg)))
    paths = helper.run_paths(cfg)
    net_helpers.save_checkpoint(paths.checkpoint, net, cfg, step=0)
    return paths


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny dmpn trained for a few steps with configs/tiny.py: (runs root, run name)."""
    import multiple_task as mt
    root = tmp_path_factory.mktemp("runs")
    return root, mt.main(tiny_cfg(root, max_steps=3))["paths"].name


def stage_cfg(root, run, **overrides):
    cfg = dict(fp.CONFIG, run=run, runs_dir=str(root), rules=["dmcgo"], trials_per_rule=2,
               untrained_trials_per_rule=1, n_relax=300, polish_iters=10, n_eigs=4)
    return dict(cfg, **overrides)


def test_stage_on_a_tiny_trained_run(tiny_run):
    root, name = tiny_run
    out = fp.main(stage_cfg(root, name))
    paths = helper.run_paths(name, root)
    assert len(out["figures"]) == 2 and all(p.stat().st_size > 10_000 for p in out["figures"])
    data, attrs = helper.load_h5(paths.fixed_points,
                                 expect_hash=helper.config_hash(stage_cfg(root, name)))
    assert attrs["state"] == "M" and attrs["networks"] == ["trained", "untrained"]
    res = data["trained"]
    n_points = 2 * 4  # dmcgo: fix1, stim1, delay1, go1 for 2 directions
    assert res["eigenvalues"].shape == (n_points, 4) and res["speed"].shape == (n_points,)
    assert np.all(np.abs(res["eigenvalues"][:, 0]) >= np.abs(res["eigenvalues"][:, -1]))
    assert np.isfinite(res["eigenvalues"]).all() and res["pca"]["points"].shape == (n_points, 2)
    assert res["lam"] == pytest.approx(0.99)
    assert res["n_distinct"] < n_points  # both directions share one fix1 point
    assert data["untrained"]["eigenvalues"].shape == (n_points // 2, 4)  # 1 trial per rule


def test_stage_on_an_rnn_and_bad_input(runs_dir):
    paths = save_untrained_run(runs_dir, net="gru", seed=2)
    out = fp.main(stage_cfg(runs_dir, paths.name, untrained_baseline=False, figures=False))
    res = out["results"][0]
    assert res["state"] == "h" and res["trained"]["eigenvalues"].shape == (8, 4)
    assert "lam" not in res["trained"]
    with pytest.raises(helper.StageError, match="python multiple_task.py"):
        fp.main(stage_cfg(runs_dir, "no_such_run"))
    with pytest.raises(helper.StageError, match="rules must be None"):
        fp.main(stage_cfg(runs_dir, paths.name, rules=["dance"]))
