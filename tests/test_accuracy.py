"""Both accuracy measures of SPEC §3 on hand-built outputs (axis order (B, T, N))."""
import numpy as np
import pytest
import torch

import mpn_tasks as mt


def mixed_batch(io_mode="low_dim", n=16, seed=0, aligned=False):
    """n trials of every rule in one padded batch."""
    rng = np.random.default_rng(seed)
    make = mt.aligned_batch if aligned else mt.random_batch
    return mt.concat_batches([make(r, n, rng, io_mode=io_mode) for r in mt.RULES])


def angle_window_start(b):
    first = b.go_step + 2  # go cue + 100 ms
    return first + (b.length - first) // 4


def rotated(b, degrees):
    """Targets with every response turned by `degrees` (same amplitude)."""
    out = b.targets.copy()
    step = np.arange(out.shape[1])[None, :]
    respond = (step >= b.go_step[:, None]) & (step < b.length[:, None]) & b.is_go[:, None]
    theta = b.resp_dir + np.radians(degrees)
    if b.io_mode == "low_dim":
        code = b.resp_amp[:, None] * np.stack([np.sin(theta), np.cos(theta)], axis=1)
    else:
        preferred = 2 * np.pi * np.arange(32) / 32
        d = np.mod(preferred[None] - theta[:, None] + np.pi, 2 * np.pi) - np.pi
        code = 0.8 * np.exp(-d ** 2 / (2 * (np.pi / 8) ** 2)) * b.resp_amp[:, None]
    out[:, :, 1:] = np.where(respond[:, :, None], np.nan_to_num(code)[:, None, :], 0)
    return out


def test_scored_window_sizes():
    b = mixed_batch()
    _, n_scored = mt.score_angle(b.targets, b)
    np.testing.assert_array_equal(n_scored, b.length - angle_window_start(b))


@pytest.mark.parametrize("io_mode", ["low_dim", "ring"])
def test_perfect_outputs_score_one(io_mode):
    b = mixed_batch(io_mode)
    n_correct, n_scored = mt.score_angle(b.targets, b)
    np.testing.assert_array_equal(n_correct, n_scored)
    assert mt.score_trial(b.targets, b).all()
    acc = mt.accuracy_by_rule(b.targets, b)
    assert set(acc["angle"]) == set(acc["trial"]) == set(mt.RULES)
    assert all(v == 1.0 for m in acc.values() for v in m.values())


@pytest.mark.parametrize("io_mode", ["low_dim", "ring"])
def test_zero_response_fails_go_passes_nogo(io_mode):
    b = mixed_batch(io_mode)
    out = np.zeros_like(b.targets)
    out[:, :, 0] = b.targets[:, :, 0]  # fixation right, never a response
    assert not b.is_go.all() and b.is_go.any()
    np.testing.assert_array_equal(mt.score_trial(out, b), ~b.is_go)


def test_all_zero_outputs_break_fixation():
    b = mixed_batch()
    assert not mt.score_trial(np.zeros_like(b.targets), b).any()


def test_fixation_break_fails_trial_not_angle():
    b = mixed_batch()
    out = b.targets.copy()
    out[:, 2, 0] = 0.0  # first scored pre-response step (mask 0 for the first 100 ms)
    assert not mt.score_trial(out, b).any()
    n_correct, n_scored = mt.score_angle(out, b)
    np.testing.assert_array_equal(n_correct, n_scored)
    unscored = b.targets.copy()
    unscored[:, :2, 0] = 0.0  # first 100 ms: mask 0, not scored
    rows = np.arange(len(b.length))
    unscored[rows, b.go_step, 0] = 1.0  # 100 ms after go: mask 0, not scored
    unscored[rows, b.go_step + 1, 1:] = 0.0
    assert mt.score_trial(unscored, b).all()


@pytest.mark.parametrize("io_mode", ["low_dim", "ring"])
@pytest.mark.parametrize("degrees, angle_ok, trial_ok", [(20, True, True), (-20, True, True),
                                                         (30, False, True), (40, False, False)])
def test_rotated_response(io_mode, degrees, angle_ok, trial_ok):
    b = mixed_batch(io_mode, aligned=True)  # aligned keeps ring angles on the grid
    out = rotated(b, degrees)
    n_correct, n_scored = mt.score_angle(out, b)
    go = b.is_go
    np.testing.assert_array_equal(n_correct[go], n_scored[go] if angle_ok else 0)
    np.testing.assert_array_equal(n_correct[~go], n_scored[~go])
    np.testing.assert_array_equal(mt.score_trial(out, b)[go], trial_ok)


def test_angle_window_boundary():
    b = mixed_batch()
    rows = np.arange(len(b.length))[b.is_go]
    start = angle_window_start(b)[b.is_go]
    before, at = b.targets.copy(), b.targets.copy()
    before[rows, start - 1, 1:] *= -1  # opposite direction, just before the window
    at[rows, start, 1:] *= -1
    n_correct, n_scored = mt.score_angle(before, b)
    np.testing.assert_array_equal(n_correct, n_scored)
    assert mt.score_trial(before, b).all()
    n_correct, n_scored = mt.score_angle(at, b)
    np.testing.assert_array_equal((n_scored - n_correct)[b.is_go], 1)
    assert not mt.score_trial(at, b)[b.is_go].any()


def test_nogo_response_fails_trial():
    b = mt.random_batch("dmsgo", 64, np.random.default_rng(0))
    out = rotated(b, 0)
    step = np.arange(out.shape[1])[None, :]
    respond = (step >= b.go_step[:, None]) & (step < b.length[:, None])
    out[:, :, 1:] = np.where(respond[:, :, None], 0.7 * np.array([0.0, 1.0]), 0)  # respond at 0
    out[:, :, 0] = np.where(respond, 0.0, b.targets[:, :, 0])
    assert not mt.score_trial(out, b)[~b.is_go].any()


def test_torch_equals_numpy():
    b = mixed_batch(seed=4)
    out = rotated(b, 25) + np.random.default_rng(0).normal(0, 0.2, b.targets.shape)
    out = out.astype(np.float32)
    tensor = torch.from_numpy(out).requires_grad_()
    np.testing.assert_array_equal(mt.score_angle(out, b), mt.score_angle(tensor, b))
    np.testing.assert_array_equal(mt.score_trial(out, b), mt.score_trial(tensor, b))
    assert mt.accuracy_by_rule(out, b) == mt.accuracy_by_rule(tensor, b)


def test_accuracy_by_rule_means():
    rng = np.random.default_rng(0)
    good, bad = mt.random_batch("fdgo", 8, rng), mt.random_batch("fdanti", 8, rng)
    b = mt.concat_batches([good, bad])
    out = b.targets.copy()
    out[8:12] = rotated(b, 180)[8:12]  # half of fdanti responds pro instead of anti
    acc = mt.accuracy_by_rule(out, b)
    assert acc["trial"] == {"fdgo": 1.0, "fdanti": 0.5}
    _, n_scored = mt.score_angle(out, b)
    assert acc["angle"]["fdanti"] == pytest.approx(n_scored[12:].sum() / n_scored[8:].sum())
    with pytest.raises(ValueError, match="shape"):
        mt.score_trial(out[:, :-1], b)


def test_angle_ignores_components_below_threshold():
    b = mt.random_batch("dmcgo", 64, np.random.default_rng(1))
    out = b.targets.copy()
    nogo = ~b.is_go
    out[nogo, :, 1:] = np.array([0.03, -0.04])  # points at ~143°, but both below 0.05
    n_correct, n_scored = mt.score_angle(out, b)
    np.testing.assert_array_equal(n_correct, n_scored)
    out[nogo, :, 1:] = np.array([0.06, -0.04])  # now a real direction: wrong for no-go
    n_correct, _ = mt.score_angle(out, b)
    assert np.all(n_correct[nogo] == 0)


def plain_scores(y, b):
    """SPEC §3 read literally, one trial and one step at a time: (n_correct, kind) per trial."""
    def grid(v):
        v = np.where(np.abs(v) < mt.ANGLE_ZERO, 0.0, v)
        return int(np.round(np.arctan2(v[0], v[1]) / (np.pi / 4))) % 8

    n_correct, kind = [], []
    for i in range(len(b.rule)):
        start = angle_window_start(b)[i]
        held, right, hits = True, True, 0
        for t in range(b.length[i]):
            if t < b.go_step[i] and b.mask[i, t, 0] > 0 and not y[i, t, 0] > 0.5:
                held = False
            if t < start:
                continue
            out, target = y[i, t, 1:3], b.targets[i, t, 1:3]
            hits += grid(out) == grid(target)
            err = abs((np.arctan2(out[0], out[1]) - np.arctan2(target[0], target[1]) + np.pi)
                      % (2 * np.pi) - np.pi)
            norm = np.hypot(out[0], out[1])
            right &= bool((y[i, t, 0] < 0.5 and err < mt.ACC_TOL and norm > 0) if b.is_go[i]
                          else (y[i, t, 0] > 0.5 and norm < 0.5))
        n_correct.append(hits)
        kind.append(0 if held and right else 1 if not held else 2 if b.is_go[i] else 3)
    return np.array(n_correct), np.array(kind)


def test_scorer_of_stacked_outputs_equals_a_plain_loop():
    """The Scorer (what the lesion engine uses on K conditions at once) equals the measures
    computed one trial and one step at a time, for every output array of a stack."""
    b = mixed_batch(n=4, seed=2)
    rng = np.random.default_rng(3)
    stack = np.stack([rotated(b, 0), rotated(b, 30), np.round(rotated(b, 20), 1)])
    stack = stack + rng.normal(0, 0.3, stack.shape) * np.array([0.1, 1.0, 0.0])[:, None, None, None]
    stack[0, ::3, 5:9, 0] = 0.2  # some trials break fixation early
    scores = mt.Scorer(b)(stack.astype(np.float32))
    for k, y in enumerate(stack.astype(np.float32)):
        n_correct, kind = plain_scores(y.astype(np.float64), b)
        np.testing.assert_array_equal(scores["n_correct"][k], n_correct)
        np.testing.assert_array_equal(scores["kind"][k], kind)
    assert len(set(scores["kind"].ravel())) == 4  # all four outcomes occur


# ---------------------------------------------------------------------------------------
# Standard errors of the accuracies (over trials, the sampling units)

@pytest.mark.parametrize("measure", ["angle", "trial"])
def test_ratio_se_matches_the_spread_over_fresh_validation_sets(measure):
    """Planted: trials whose own accuracy varies (heterogeneous trials, points within a trial
    correlated through it) and, for `angle`, lengths 5-20 scored points. Over 2,000 fresh sets
    of 128 trials, the accuracy's standard deviation equals the mean reported s.e. to 10%."""
    rng = np.random.default_rng(0)
    n, reps = 128, 2000
    estimates, ses = np.empty(reps), np.empty(reps)
    for i in range(reps):
        p_trial = rng.beta(6, 1.5, n)  # mean ~0.8, trial to trial spread
        if measure == "angle":
            size = rng.integers(5, 21, n)
            correct = rng.binomial(size, p_trial)
        else:
            size = np.ones(n)
            correct = rng.random(n) < p_trial
        estimates[i] = correct.sum() / size.sum()
        ses[i] = mt.ratio_se(correct, size)
    assert ses.mean() == pytest.approx(estimates.std(), rel=0.10)
    # a measure that ignored the trials (points as independent) would be too small for angle
    if measure == "angle":
        naive = np.sqrt(estimates.mean() * (1 - estimates.mean()) / (128 * 12.5))
        assert naive < 0.8 * estimates.std()


def test_ratio_se_adds_nothing_where_trials_do_not_cluster():
    """No structure: every point right with the same probability, independently of its
    trial. The s.e. then matches both the spread over 2,000 fresh sets and the binomial s.e.
    of the pooled points (to 10%): treating trials as units costs nothing when they are
    not clusters."""
    rng = np.random.default_rng(1)
    n, reps, p = 128, 2000, 0.7
    estimates, ses = np.empty(reps), np.empty(reps)
    size = rng.integers(5, 21, n)
    for i in range(reps):
        correct = rng.binomial(size, p)
        estimates[i] = correct.sum() / size.sum()
        ses[i] = mt.ratio_se(correct, size)
    binomial = np.sqrt(p * (1 - p) / size.sum())
    assert ses.mean() == pytest.approx(estimates.std(), rel=0.10)
    assert ses.mean() == pytest.approx(binomial, rel=0.10)


def test_ratio_se_of_a_perfect_or_empty_rule():
    """A rule right (or wrong) on all its n trials keeps the uncertainty of n trials, about
    1/(n+2), instead of 0 (`angle`: of its points); no scored trial gives NaN."""
    for correct in (np.ones(128), np.zeros(128)):
        se = mt.ratio_se(correct, np.ones(128))
        assert 0.5 / 130 < se < 1.5 / 130
    assert 0.5 / 402 < mt.ratio_se(np.full(40, 10), np.full(40, 10)) < 1.5 / 402
    assert np.isnan(mt.ratio_se([], []))
    assert np.isnan(mt.ratio_se([0, 0], [0, 0]))


def test_mean_se_and_evaluate_report_the_se_of_the_mean_over_rules():
    assert mt.mean_se({r: 0.02 for r in mt.RULES}) == pytest.approx(0.02 / np.sqrt(15))
    b = mixed_batch(n=16)
    acc, se = mt.accuracy_and_se_by_rule(b.targets, b)
    assert acc == mt.accuracy_by_rule(b.targets, b)
    assert set(se["angle"]) == set(se["trial"]) == set(mt.RULES)
    for rule in mt.RULES:  # targets score 1 everywhere: every s.e. is the 16-trial floor
        assert 0 < se["trial"][rule] < 1.5 / 18
