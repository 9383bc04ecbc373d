"""timescales.py: M's zero-input decay timescale equals −dt/ln λ within 5% (SPEC §7.4), the
autocorrelation against a plain formula, the exponential fit on planted AR(1) timescales and
on white noise, and the stage on tiny runs of each architecture."""
from pathlib import Path

import numpy as np
import pytest

import helper
import mpn
import timescales as ts

REPO = Path(__file__).resolve().parents[1]
CFG = dict(ts.CONFIG, burn_in_steps=20, n_steps=200, max_lag_steps=10, trials_per_rule=1)


@pytest.mark.parametrize("tau_M_ms", [4000.0, 1000.0])
def test_m_decay_timescale_is_minus_dt_over_log_lambda(tau_M_ms):
    net = mpn.build_model("dmpn", n_hidden=8, seed=1, tau_M_ms=tau_M_ms).double().eval()
    inputs = ts.fixation_inputs(["fdgo", "dmcgo"], CFG, "low_dim", 60)
    m = ts.m_decay(net, inputs, 100)
    theory = -40.0 / np.log(1 - 40.0 / tau_M_ms)
    assert m["tau_theory_ms"] == pytest.approx(theory, rel=1e-5)  # λ is stored in float32
    assert np.abs(m["tau_norm_ms"] / theory - 1).max() < 0.05
    assert np.abs(np.nanmedian(m["tau_synapse_ms"]) / theory - 1) < 0.05
    assert m["norm"][0].min() > 0  # the fixation input had built up some M to decay


def test_decay_timescale_recovers_a_known_exponential():
    t = np.arange(100)
    series = np.stack([np.exp(-t * 40 / 500.0), 3 * np.exp(-t * 40 / 2000.0)], axis=1)
    np.testing.assert_allclose(ts.decay_timescale(series, 40), [500.0, 2000.0], rtol=1e-9)
    assert np.isnan(ts.decay_timescale(np.zeros((10, 1)), 40)[0])


def test_streamed_log_line_fit_matches_polyfit():
    rng = np.random.default_rng(5)
    series = np.exp(-np.arange(40)[:, None] / rng.uniform(5, 50, 6)) * rng.uniform(1, 2, 6)
    fit = ts.LogLineFit()
    for row in series:
        fit.add(row)
    np.testing.assert_allclose(fit.timescale(40), ts.decay_timescale(series, 40), rtol=1e-9)


def test_autocorrelation_matches_a_plain_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 50, 4)) + 2.0
    rho = ts.autocorrelation(x, 5)
    for i in range(4):
        c = x[:, :, i] - x[:, :, i].mean(1, keepdims=True)
        for k in range(6):
            expected = sum(np.dot(tr[:50 - k], tr[k:]) for tr in c) / (c ** 2).sum()
            assert rho[k, i] == pytest.approx(expected, rel=1e-12)
    assert np.isnan(ts.autocorrelation(np.ones((2, 10, 1)), 3)).all()  # constant unit


def ar1(tau_ms, n_trials, n_steps, n_units, rng):
    """x_t = φ x_{t−1} + noise with φ = exp(−dt/τ): autocorrelation exp(−k·dt/τ)."""
    phi = np.exp(-40.0 / tau_ms)
    x = np.zeros((n_trials, n_steps, n_units))
    x[:, 0] = rng.normal(size=(n_trials, n_units)) / np.sqrt(1 - phi ** 2)
    for t in range(1, n_steps):
        x[:, t] = phi * x[:, t - 1] + rng.normal(size=(n_trials, n_units))
    return x


def test_exponential_fit_recovers_planted_timescales_and_rejects_white_noise():
    rng = np.random.default_rng(1)
    cfg = dict(CFG, max_lag_steps=30)
    x = np.concatenate([ar1(200.0, 40, 600, 4, rng), ar1(600.0, 40, 600, 4, rng)], axis=2)
    tau = ts.unit_timescales(x, cfg)["tau_ms"].reshape(2, 4)
    np.testing.assert_allclose(np.median(tau, axis=1), [200.0, 600.0], rtol=0.1)
    np.testing.assert_allclose(tau, [[200.0] * 4, [600.0] * 4], rtol=0.25)
    white = ts.unit_timescales(rng.normal(size=(20, 400, 20)), cfg)
    assert np.isnan(white["tau_ms"]).mean() >= 0.9  # no structure: (almost) nothing fitted


def test_rnn_units_have_timescales_at_least_their_leak():
    """An untrained vanilla RNN's units integrate with tau_ms = 200: fitted τ ≳ 200 ms."""
    net = mpn.build_model("vanilla", n_hidden=16, seed=3).double().eval()
    inputs = ts.fixation_inputs(["fdgo", "dmcgo"], dict(CFG, trials_per_rule=3), "low_dim", 220)
    out = ts.hidden_timescales(net, inputs, CFG)
    assert np.isfinite(out["tau_ms"]).all() and np.median(out["tau_ms"]) > 150


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


def test_stage_on_tiny_runs_of_each_architecture(runs_dir):
    import multiple_task as mt
    names = [mt.main(tiny_cfg(runs_dir, max_steps=3))["paths"].name,
             save_untrained_run(runs_dir, net="vanilla").name,
             save_untrained_run(runs_dir, net="gru").name]
    cfg = dict(CFG, run="everything_*", runs_dir=str(runs_dir))
    out = ts.main(cfg)
    assert sorted(r["run"] for r in out["results"]) == sorted(names)
    assert len(out["figures"]) == 3  # one per run; across runs: seed_summary.py
    assert not helper.summary_dir(runs_dir).exists()
    for result in out["results"]:
        paths = helper.run_paths(result["run"], runs_dir)
        data, attrs = helper.load_h5(paths.timescales,
                                     expect_hash=helper.config_hash(dict(cfg, run=paths.name)))
        assert data["trained"]["hidden"]["tau_ms"].shape == (16,)
        assert ("M" in data["trained"]) == (attrs["net_type"] == "dmpn")
        assert np.isfinite(data["input"]["tau_ms"]).sum() <= 2  # white input: no timescale
    with pytest.raises(helper.StageError, match="python multiple_task.py"):
        ts.main(dict(cfg, run="no_such_run"))
    with pytest.raises(helper.StageError, match="max_lag_steps"):
        ts.main(dict(cfg, max_lag_steps=1))
