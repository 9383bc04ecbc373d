"""Task variance (SPEC §5.2): task-periods, in-memory variance (per-step and pooled), streamed
modulation variance, each against a plain reference."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import helper
import variance_core as vc
from mpn_engine import plastic_forward_reference

# SPEC §2.3: which period epochs each rule has
SPEC_EPOCHS = {
    "fdgo": ("stim1", "go1"), "fdanti": ("stim1", "go1"),
    "reactgo": ("go1",), "reactanti": ("go1",),
    "delaygo": ("stim1", "delay1", "go1"), "delayanti": ("stim1", "delay1", "go1"),
    **{r: ("stim1", "delay1", "stim2", "delay2", "go1")
       for r in ("delaydm1", "delaydm2", "contextdelaydm1", "contextdelaydm2", "multidelaydm")},
    **{r: ("stim1", "delay1", "go1") for r in ("dmsgo", "dmsnogo", "dmcgo", "dmcnogo")},
}


def test_task_periods_everything_has_49_rows_in_rule_then_epoch_order():
    rows = vc.task_periods(SPEC_EPOCHS)
    assert len(rows) == 49 and len(set(rows)) == 49
    counts = {e: sum(r.endswith("-" + e) for r in rows) for e in vc.PERIOD_EPOCHS}
    assert counts == {"stim1": 13, "delay1": 11, "stim2": 5, "delay2": 5, "go1": 15}
    assert rows[:5] == ["fdgo-stim1", "fdgo-go1", "fdanti-stim1", "fdanti-go1", "reactgo-go1"]
    assert rows[-3:] == ["dmcnogo-stim1", "dmcnogo-delay1", "dmcnogo-go1"]


def test_task_periods_from_real_aligned_batches():
    tasks = pytest.importorskip("mpn_tasks")
    rng = np.random.default_rng(0)
    windows = {r: vc.rule_windows(tasks.aligned_batch(r, 8, rng)) for r in tasks.RULES}
    assert vc.task_periods(windows) == vc.task_periods(SPEC_EPOCHS)


def test_rule_windows_refuses_unaligned_trials():
    ok = SimpleNamespace(epochs={"fix1": np.array([[0, 5]] * 3), "stim1": np.array([[5, 9]] * 3),
                                 "stim2": np.array([[-1, -1]] * 3)})
    assert vc.rule_windows(ok) == {"stim1": (5, 9)}
    bad = SimpleNamespace(epochs={"stim1": np.array([[5, 9], [5, 10]])})
    with pytest.raises(ValueError, match="aligned"):
        vc.rule_windows(bad)


def _hand_made_activity():
    """16 trials (2 per direction), 30 steps, 3 units; two rules with different windows.

    Unit 0 = cos(direction) only within delay1 of 'delaygo'; unit 1 has trial noise that
    cancels within each direction (±0.3), so its direction means are 0; unit 2 ramps in time
    identically for all trials.
    """
    dirs = np.arange(16) % 8
    theta = dirs * np.pi / 4
    windows = {"delaygo": {"stim1": (0, 10), "delay1": (10, 20), "go1": (20, 30)},
               "fdgo": {"stim1": (0, 15), "go1": (15, 30)}}
    z = {}
    for rule in windows:
        a = np.zeros((16, 30, 3))
        if rule == "delaygo":
            a[:, 10:20, 0] = np.cos(theta)[:, None]
        a[:, :, 1] = np.where(np.arange(16) < 8, 0.3, -0.3)[:, None]
        a[:, :, 2] = np.linspace(0, 1, 30)[None, :]
        z[rule] = a
    return z, windows, {r: dirs for r in windows}


def test_pooled_task_variance_known_answer():
    z, windows, dirs = _hand_made_activity()
    V = vc.task_variance_matrix(z, windows, dirs, mode="pooled")
    rows = vc.task_periods(windows)
    assert rows == ["delaygo-stim1", "delaygo-delay1", "delaygo-go1", "fdgo-stim1", "fdgo-go1"]
    expected0 = np.zeros(5)
    expected0[1] = np.var(np.cos(np.arange(8) * np.pi / 4))  # = 0.5, constant in time
    np.testing.assert_allclose(V[:, 0], expected0, atol=1e-12)
    np.testing.assert_allclose(V[:, 1], 0.0, atol=1e-12)  # noise averages out within directions
    ramp = np.linspace(0, 1, 30)
    np.testing.assert_allclose(V[1, 2], np.var(ramp[10:20]))  # pooled over time as well
    zt = torch.as_tensor(z["delaygo"], dtype=torch.float32)
    np.testing.assert_allclose(vc.task_variance(zt, (10, 20), dirs["delaygo"], "pooled"), V[1],
                               atol=1e-6)


def test_per_step_task_variance_known_answer():
    """Yang's definition: across trials at each step, then the mean over the period."""
    z, windows, dirs = _hand_made_activity()
    V = vc.task_variance_matrix(z, windows)  # the default mode, no directions needed
    expected0 = np.zeros(5)
    expected0[1] = np.var(np.cos(np.arange(16) * np.pi / 4))
    np.testing.assert_allclose(V[:, 0], expected0, atol=1e-12)
    np.testing.assert_allclose(V[:, 1], 0.09, atol=1e-12)  # ±0.3 across trials counts here
    np.testing.assert_allclose(V[:, 2], 0.0, atol=1e-12)  # a shared ramp is not task variance


def test_per_step_task_variance_equals_plain_loops():
    z = np.random.default_rng(0).standard_normal((11, 20, 4)) * np.arange(1, 5)
    plain = np.zeros(4)
    for n in range(4):
        per_step = []
        for t in range(3, 17):
            values = [z[i, t, n] for i in range(11)]
            mean = sum(values) / len(values)
            per_step.append(sum((v - mean) ** 2 for v in values) / len(values))
        plain[n] = sum(per_step) / len(per_step)
    np.testing.assert_allclose(vc.task_variance(z, (3, 17)), plain, rtol=1e-12)


def test_bad_mode_and_zero_conditions_are_one_sentence():
    z = np.zeros((4, 5, 2))
    with pytest.raises(helper.StageError, match="unknown variance mode 'yang'"):
        vc.task_variance(z, (0, 5), mode="yang")
    with pytest.raises(helper.StageError, match="at least one condition"):
        vc.task_variance(z[:0], (0, 5))


def _record_m_history(x, W, b):
    """Full M_{t-1} history (B, T, N_post, N_pre) of the reference plastic layer."""
    history = []
    plastic_forward_reference(x, W, b, 1.0, 0.9, record=lambda t, M: history.append(M.clone()))
    return torch.stack(history, dim=1)


@pytest.mark.parametrize("mode,sort_by_direction",
                         [("per_step", False), ("pooled", False), ("pooled", True)])
def test_streaming_modulation_variance_equals_in_memory(mode, sort_by_direction):
    rng = np.random.default_rng(3)
    n_pre, n_post, B, T = 4, 3, 13, 24
    windows = {"ruleA": {"stim1": (2, 8), "delay1": (8, 15), "go1": (15, 24)},
               "ruleB": {"go1": (5, 20)}}
    rows = vc.task_periods(windows)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(n_post, n_pre, generator=g, dtype=torch.float64) / np.sqrt(n_pre)
    b = torch.randn(n_post, generator=g, dtype=torch.float64) * 0.1
    acc = vc.MODULATION_STREAMS[mode](rows, n_post, n_pre)
    ref, ref_w = [], []
    for rule in windows:
        x = torch.tanh(torch.randn(B, T, n_pre, generator=g, dtype=torch.float64))
        hist = _record_m_history(x, W, b)
        dirs = rng.integers(0, 5, size=B)  # unequal counts per direction
        flat = hist.reshape(B, T, -1).numpy()
        for epoch, win in windows[rule].items():
            ref.append(vc.task_variance(flat, win, dirs, mode))
            ref_w.append(vc.task_variance(flat * W.reshape(1, 1, -1).numpy(), win, dirs, mode))
        order = np.argsort(dirs, kind="stable") if sort_by_direction else np.arange(B)
        acc.start_rule(rule, windows[rule], np.bincount(dirs, minlength=8))
        for chunk in np.array_split(order, [5, 9]):  # unequal chunks, split directions
            acc.start_chunk(dirs[chunk])
            plastic_forward_reference(x[chunk], W, b, 1.0, 0.9, record=acc)
        acc.end_rule()
    np.testing.assert_allclose(acc.variance(), np.stack(ref), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(acc.variance(weight=W), np.stack(ref_w), rtol=1e-10, atol=1e-14)


def test_streaming_refuses_missing_trials_and_marks_unstreamed_rows():
    acc = vc.StreamingModulationVariance(["r-go1", "q-go1"], 2, 2)
    acc.start_rule("r", {"go1": (0, 3)}, [2, 1])
    acc.start_chunk([0, 1])
    for t in range(3):
        acc(t, torch.ones(2, 2, 2) * t)
    with pytest.raises(RuntimeError, match="expected"):
        acc.end_rule()
    acc.start_chunk([0])
    for t in range(3):
        acc(t, torch.ones(1, 2, 2) * t)
    acc.end_rule()
    V = acc.variance()
    np.testing.assert_allclose(V[0], np.var([0, 1, 2]))  # direction means are t, pooled
    assert np.isnan(V[1]).all()


def test_normalize_columns_and_log_transform():
    V = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 1.0]])
    np.testing.assert_allclose(vc.normalize_columns(V), [[1 / 3, 0, 1], [1, 0, 0.5]])
    np.testing.assert_allclose(vc.log_transform(V), np.log1p(V))


def test_per_step_stream_refuses_missing_trials():
    acc = vc.StepModulationVariance(["r-go1"], 2, 2)
    acc.start_rule("r", {"go1": (0, 3)}, [2, 1])
    acc.start_chunk([0, 1])
    for t in range(3):
        acc(t, torch.ones(2, 2, 2) * t)
    with pytest.raises(RuntimeError, match="expected 3"):
        acc.end_rule()
