"""Task semantics per rule (SPEC §2), checked trial by trial against the SPEC tables below.

Axis order (B, T, N). The expectations here are written from the SPEC, independently of the
declarations in mpn_tasks, and compared with plain per-trial loops.
"""
import dataclasses
import functools

import numpy as np
import pytest

import mpn_tasks as mt

DT = 40
SPEC_EPOCHS = {  # SPEC §2.3, ms ranges
    "fd": [("fix1", 300, 700), ("stim1", 200, 1500), ("go1", 300, 700)],
    "react": [("fix1", 500, 2500), ("go1", 300, 1700)],
    "delay": [("fix1", 300, 700), ("stim1", 200, 1600), ("delay1", 200, 1600), ("go1", 300, 700)],
    "dm": [("fix1", 200, 600), ("stim1", 200, 1600), ("delay1", 200, 1600),
           ("stim2", 200, 1600), ("delay2", 100, 300), ("go1", 300, 700)],
    "match": [("fix1", 200, 600), ("stim1", 200, 1600), ("delay1", 200, 1600), ("go1", 300, 700)],
}
# when each stimulus is shown: (first epoch, last epoch); the go1 epoch runs to the trial end
SPEC_WINDOWS = {
    "fd": [("stim1", "go1")], "react": [("go1", "go1")], "delay": [("stim1", "stim1")],
    "dm": [("stim1", "stim1"), ("stim2", "stim2")], "match": [("stim1", "stim1"), ("go1", "go1")],
}


def kind(rule):
    for prefix, name in (("fd", "fd"), ("react", "react"), ("delaydm", "dm"), ("context", "dm"),
                         ("multi", "dm"), ("delay", "delay"), ("dm", "match")):
        if rule.startswith(prefix):
            return name
    raise KeyError(rule)


@functools.lru_cache(maxsize=None)
def batch(rule, n=64, seed=1, io_mode="low_dim"):
    return mt.random_batch(rule, n, np.random.default_rng(seed), io_mode=io_mode)


def is_match(b, i):
    if b.rule_names[i].startswith("dms"):
        return np.isclose(b.stim1_dir[i], b.stim2_dir[i])
    return (b.stim1_dir[i] < np.pi) == (b.stim2_dir[i] < np.pi)


def expected_response(b, i):
    """(direction or None for no-go, amplitude) from the stimuli, per SPEC §2.3."""
    rule, s = b.rule_names[i], b.ring_strength[i]
    if kind(rule) in ("fd", "react", "delay"):
        return b.stim1_dir[i] + np.pi * rule.endswith("anti"), 1.0
    if kind(rule) == "match":
        go = is_match(b, i) if not rule.endswith("nogo") else not is_match(b, i)
        return (b.stim2_dir[i] if go else None), 1.0
    if rule.startswith("delaydm"):
        total = s.sum(axis=1)  # each stimulus is on one ring only
        k = int(np.argmax(total))
        return [b.stim1_dir[i], b.stim2_dir[i]][k], total[k]
    decisive = s[:, int(rule[-1]) - 1] if rule.startswith("context") else s.sum(axis=1)
    return [b.stim1_dir[i], b.stim2_dir[i]][int(np.argmax(decisive))], 1.0


def test_registry_and_layout():
    assert mt.RULES == ["fdgo", "fdanti", "reactgo", "reactanti", "delaygo", "delayanti",
                        "delaydm1", "delaydm2", "contextdelaydm1", "contextdelaydm2",
                        "multidelaydm", "dmsgo", "dmsnogo", "dmcgo", "dmcnogo"]
    assert set(mt.TASKS) == set(mt.RULES)
    assert mt.RULESETS["everything"] == mt.RULES and mt.RULESETS["go"] == mt.RULES[:6]
    assert (mt.n_inputs(), mt.n_outputs()) == (21, 3)
    assert (mt.n_inputs("ring"), mt.n_outputs("ring")) == (1 + 64 + 15, 33)
    with pytest.raises(ValueError, match="unknown rule"):
        mt.random_batch("fdg0", 4, np.random.default_rng(0))
    # SPEC §5.1: 49 task-periods
    periods = [e for r in mt.RULES for e in mt.epoch_names(r) if e != "fix1"]
    assert len(periods) == 49


@pytest.mark.parametrize("rule", mt.RULES)
def test_epochs_in_order_within_ranges(rule):
    b = batch(rule, 256)
    spec = SPEC_EPOCHS[kind(rule)]
    assert mt.epoch_names(rule) == tuple(name for name, _, _ in spec)
    previous_stop = np.zeros(len(b.length), dtype=np.int64)
    for name, lo, hi in spec:
        start, stop = b.epochs[name].T
        assert np.array_equal(start, previous_stop)
        duration = stop - start
        assert duration.min() >= int(lo / DT) and duration.max() <= int(hi / DT)
        previous_stop = stop
    assert np.array_equal(previous_stop, b.length)
    assert np.array_equal(b.go_step, b.epochs["go1"][:, 0])
    assert b.inputs.shape[1] == b.length.max()
    for name in set(mt.EPOCH_NAMES) - {n for n, _, _ in spec}:
        assert np.all(b.epochs[name] == -1)


@pytest.mark.parametrize("rule", mt.RULES)
def test_input_channels(rule):
    check_inputs(rule, batch(rule))


def check_inputs(rule, b):
    fixate_whole = kind(rule) in ("react", "match")
    for i in range(len(b.length)):
        go, end = b.go_step[i], b.length[i]
        expected = np.zeros(b.inputs.shape[1:])
        expected[:end if fixate_whole else go, 0] = 1
        expected[go:end, 1] = 1
        expected[:end, 6 + mt.RULES.index(rule)] = 1
        dirs = [b.stim1_dir[i], b.stim2_dir[i]]
        for k, (first, last) in enumerate(SPEC_WINDOWS[kind(rule)]):
            on = slice(b.epochs[first][i, 0], b.epochs[last][i, 1])
            for r in range(2):
                s = b.ring_strength[i, k, r]
                code = s * np.array([np.sin(dirs[k]), np.cos(dirs[k])])
                expected[on, 2 + 2 * r:4 + 2 * r] += code
        np.testing.assert_allclose(b.inputs[i], expected, atol=1e-6)


@pytest.mark.parametrize("rule", mt.RULES)
def test_stimulus_rings_and_strengths(rule):
    b = batch(rule, 512)
    s = b.ring_strength
    n = np.arange(len(s))
    if kind(rule) in ("fd", "react", "delay", "match"):
        assert set(b.stim1_ring) == {1, 2}
        assert np.all(s[n, 0, b.stim1_ring - 1] == 1) and np.all(s[n, 0, 2 - b.stim1_ring] == 0)
    if kind(rule) == "match":  # test on the other ring
        assert np.all(s[n, 1, 2 - b.stim1_ring] == 1) and np.all(s[n, 1, b.stim1_ring - 1] == 0)
    elif kind(rule) != "dm":
        assert np.all(s[:, 1] == 0) and np.all(np.isnan(b.stim2_dir))
    if rule.startswith("delaydm"):
        ring = int(rule[-1]) - 1
        assert np.all(b.stim1_ring == ring + 1)
        assert np.all(s[:, 0, 1 - ring] == 0) and np.all(s[:, 1, ring] == 0)
        check_strength_law(s[:, 0, ring], s[:, 1, 1 - ring])
    if rule.startswith("context"):
        for r in range(2):
            check_strength_law(s[:, 0, r], s[:, 1, r])
        assert not np.allclose(s[:, 0, 0], s[:, 0, 1])  # independent per ring
    if rule == "multidelaydm":
        total = s.sum(axis=2) / 2
        check_strength_law(total[:, 0], total[:, 1])
        rel = np.abs(s[:, :, 0] - s[:, :, 1]) / total
        assert rel.min() >= 0.2 - 1e-9 and rel.max() <= 0.8 + 1e-9
        assert (s[:, :, 0] > s[:, :, 1]).mean() == pytest.approx(0.5, abs=0.08)


def check_strength_law(s1, s2):
    """μ ± c·s with μ ~ U(0.8, 1.2), c ∈ {0.08, 0.16, 0.32}, s = ±1."""
    mu, c = (s1 + s2) / 2, np.abs(s1 - s2) / 2
    assert mu.min() >= 0.8 and mu.max() <= 1.2
    assert np.allclose(np.min(np.abs(c[:, None] - [0.08, 0.16, 0.32]), axis=1), 0)
    assert set(np.round(c, 6)) == {0.08, 0.16, 0.32}
    assert (s1 > s2).mean() == pytest.approx(0.5, abs=0.08)


@pytest.mark.parametrize("rule", mt.RULES)
def test_targets_and_amplitudes(rule):
    check_targets(batch(rule))


def check_targets(b):
    for i in range(len(b.length)):
        go, end = b.go_step[i], b.length[i]
        direction, amp = expected_response(b, i)
        expected = np.zeros(b.targets.shape[1:])
        expected[:end, 0] = 1
        if direction is None:
            assert not b.is_go[i] and np.isnan(b.resp_dir[i])
        else:
            assert b.is_go[i]
            assert np.isclose(np.mod(b.resp_dir[i] - direction + 1, 2 * np.pi), 1)
            expected[go:end, 0] = 0
            expected[go:end, 1:] = amp * np.array([np.sin(direction), np.cos(direction)])
        np.testing.assert_allclose(b.targets[i], expected, atol=1e-6)


@pytest.mark.parametrize("rule", mt.RULES)
def test_cost_mask(rule):
    b = batch(rule)
    for i in range(len(b.length)):
        go, end = b.go_step[i], b.length[i]
        weight = np.zeros(b.mask.shape[1])
        weight[2:go] = 1  # 100 ms = 2 steps of 40 ms
        weight[go + 2:end] = 5
        np.testing.assert_array_equal(b.mask[i, :, 1:], np.repeat(weight[:, None], 2, axis=1))
        np.testing.assert_array_equal(b.mask[i, :, 0], weight / 2)


@pytest.mark.parametrize("rule", mt.RULES)
def test_directions_on_grid(rule):
    b = batch(rule, 512)
    for angles in (b.stim1_dir, b.stim2_dir, b.resp_dir):
        angles = angles[~np.isnan(angles)]
        assert np.all((angles >= 0) & (angles < 2 * np.pi))
        assert np.allclose(np.mod(angles / (np.pi / 4) + 0.5, 1), 0.5)
    used = set(np.round(b.stim1_dir / (np.pi / 4)).astype(int))
    assert used == ({1, 2, 3, 5, 6, 7} if rule.startswith("dmc") else set(range(8)))


@pytest.mark.parametrize("rule", [r for r in mt.RULES if kind(r) == "dm"])
def test_dm_separation(rule):
    b = batch(rule, 1024)
    offset = np.degrees(np.mod(b.stim2_dir - b.stim1_dir, 2 * np.pi))
    assert offset.min() >= 90 - 1e-6 and offset.max() <= 270 + 1e-6
    assert len(np.unique(np.round(offset))) == 5


@pytest.mark.parametrize("rule", mt.RULESETS["match"])
def test_match_rules_go_nogo(rule):
    b = batch(rule, 4096, seed=3)
    match = np.array([is_match(b, i) for i in range(len(b.length))])
    assert b.is_go.mean() == pytest.approx(0.5, abs=0.03)
    assert np.array_equal(b.is_go, ~match if rule.endswith("nogo") else match)
    sample = np.round(b.stim1_dir / (np.pi / 4)).astype(int) % 8
    test = np.round(b.stim2_dir / (np.pi / 4)).astype(int) % 8
    if rule.startswith("dms"):
        assert np.all(sample[~match] != test[~match])
        assert len(set(np.mod(test - sample, 8)[~match])) == 7
    else:  # dmc never shows the boundary directions 0 or π
        assert not np.isin(np.concatenate([sample, test]), [0, 4]).any()


@pytest.mark.parametrize("rule", mt.RULES)
def test_seed_reproducibility(rule):
    a = mt.random_batch(rule, 32, np.random.default_rng(7), sigma_x=0.01)
    b = mt.random_batch(rule, 32, np.random.default_rng(7), sigma_x=0.01)
    c = mt.random_batch(rule, 32, np.random.default_rng(8), sigma_x=0.01)
    for name in ("inputs", "targets", "mask", "length", "stim1_dir", "stim2_dir", "resp_dir"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in mt.EPOCH_NAMES:
        np.testing.assert_array_equal(a.epochs[name], b.epochs[name])
    assert a.inputs.shape != c.inputs.shape or not np.array_equal(a.inputs, c.inputs)


@pytest.mark.parametrize("rule", ["fdgo", "delaydm1", "dmcnogo"])
def test_padding_and_noise(rule):
    sigma = 0.1
    b = mt.random_batch(rule, 256, np.random.default_rng(2), sigma_x=sigma)
    clean = mt.random_batch(rule, 256, np.random.default_rng(2))
    padding = np.arange(b.inputs.shape[1])[None, :] >= b.length[:, None]
    assert padding.any()
    for array in (b.inputs, b.targets, b.mask):
        assert np.all(array[padding] == 0)
    noise = (b.inputs - clean.inputs)[~padding]
    assert noise.std() == pytest.approx(sigma * np.sqrt(2 / 0.8), rel=0.02)
    assert np.all(np.abs(noise).mean(axis=0) > 0)  # every channel


@pytest.mark.parametrize("rule", mt.RULES)
def test_aligned_batch(rule):
    n = 48
    b = mt.aligned_batch(rule, n, np.random.default_rng(0))
    for name, lo, hi in SPEC_EPOCHS[kind(rule)]:
        assert np.all(b.epochs[name] == b.epochs[name][0])  # shared boundaries
        assert np.all(np.diff(b.epochs[name], axis=1) == int(hi / DT))  # quantile 1 = max
    index = np.round(b.stim1_dir / (np.pi / 4)).astype(int)
    if rule.startswith("dmc"):
        assert np.array_equal(index, np.array([1, 2, 3, 5, 6, 7])[np.arange(n) % 6])
    else:
        assert np.array_equal(index, np.arange(n) % 8)
    low = mt.aligned_batch(rule, 8, np.random.default_rng(0), quantile=0.0)
    for name, lo, hi in SPEC_EPOCHS[kind(rule)]:
        assert np.all(np.diff(low.epochs[name], axis=1) == int(lo / DT))


@pytest.mark.parametrize("rule", mt.RULES)
def test_ring_mode(rule):
    b = batch(rule, 64, io_mode="ring")
    n_ring = 32
    assert b.inputs.shape[2] == 1 + 2 * n_ring + 15 and b.targets.shape[2] == 1 + n_ring
    preferred = 2 * np.pi * np.arange(n_ring) / n_ring
    off_grid = np.abs(np.mod(b.stim1_dir / (np.pi / 4) + 0.5, 1) - 0.5) > 1e-3
    assert off_grid.mean() > 0.9  # continuous angles
    for i in range(len(b.length)):
        assert np.all(b.inputs[i, :b.length[i], 1 + 2 * n_ring + mt.RULES.index(rule)] == 1)
        start, stop = b.epochs[SPEC_WINDOWS[kind(rule)][0][0]][i]
        ring = 1 + n_ring * (b.stim1_ring[i] - 1) if b.stim1_ring[i] else 1
        bump = b.inputs[i, start, ring:ring + n_ring]
        check_bump(bump, b.stim1_dir[i], b.ring_strength[i, 0, max(b.stim1_ring[i], 1) - 1],
                   preferred)
        if b.is_go[i]:
            _, amp = expected_response(b, i)
            check_bump(b.targets[i, b.length[i] - 1, 1:], b.resp_dir[i], amp, preferred)
        else:
            assert np.all(b.targets[i, :, 1:] == 0)


def check_bump(bump, theta, strength, preferred):
    distance = np.abs(np.mod(preferred - theta + np.pi, 2 * np.pi) - np.pi)
    assert np.argmax(bump) == np.argmin(distance)
    expected = 0.8 * np.exp(-distance ** 2 / (2 * (np.pi / 8) ** 2)) * strength
    np.testing.assert_allclose(bump, expected, atol=1e-6)


def test_concat_batches_pads():
    rng = np.random.default_rng(0)
    parts = [mt.random_batch(r, 8, rng) for r in ("fdgo", "delaydm1", "dmsgo")]
    b = mt.concat_batches(parts)
    assert b.inputs.shape == (24, max(p.inputs.shape[1] for p in parts), 21)
    assert b.rule_names == ["fdgo"] * 8 + ["delaydm1"] * 8 + ["dmsgo"] * 8
    np.testing.assert_array_equal(b.inputs[:8, :parts[0].inputs.shape[1]], parts[0].inputs)
    assert np.all(b.inputs[:8, parts[0].inputs.shape[1]:] == 0)
    assert np.all(b.epochs["stim2"][:8] == -1) and np.all(b.epochs["stim2"][8:16] >= 0)
    sub = b.take(np.arange(8, 16))
    np.testing.assert_array_equal(sub.stim2_dir, parts[1].stim2_dir)


@pytest.mark.parametrize("io_mode,sigma_x", [("low_dim", 0.0), ("low_dim", 0.1), ("ring", 0.05)])
def test_mixed_batch_equals_per_rule_batches(io_mode, sigma_x):
    """Rendering several rules' trials together gives, array for array, the per-rule batches
    concatenated, from the same draws of the generator (rules with 1 and 2 stimuli, with and
    without fixation through the trial, of different lengths)."""
    rules = ["dmsgo", "fdanti", "multidelaydm", "reactgo", "contextdelaydm2"]
    mixed = mt.mixed_batch(rules, 6, np.random.default_rng(3), sigma_x=sigma_x,
                           io_mode=io_mode)
    rng = np.random.default_rng(3)
    parts = [mt.random_batch(r, 6, rng, sigma_x=sigma_x, io_mode=io_mode) for r in rules]
    joined = mt.concat_batches(parts)
    assert mixed.rule_names == joined.rule_names
    for f in dataclasses.fields(mt.Batch):
        a, b = getattr(mixed, f.name), getattr(joined, f.name)
        for key in (a if isinstance(a, dict) else [None]):
            x, y = (a[key], b[key]) if key is not None else (a, b)
            np.testing.assert_array_equal(x, y, err_msg=f"{f.name} {key or ''}")
    assert mixed.inputs.shape[1] == max(p.inputs.shape[1] for p in parts)


def test_mixed_batch_trials_follow_the_spec():
    rules = ["delaydm1", "dmcnogo", "fdgo", "reactanti"]
    b = mt.mixed_batch(rules, 16, np.random.default_rng(4))
    check_targets(b)
    for k, rule in enumerate(rules):
        check_inputs(rule, b.take(np.arange(16 * k, 16 * (k + 1))))


# ---------------------------------------------------------------------------------------
# condition_set (SPEC §5.1): the complete factorial design, read back from the metadata

CONDITION_SET_SIZE = {"fd": 16, "react": 16, "delay": 16, "dm": 240, "match": 224}


def grid_steps(angle):
    return np.round(np.asarray(angle) / (np.pi / 4)).astype(int) % 8


def assert_balanced(values, n_levels, name):
    """Every one of the n_levels levels of a variable occurs equally often."""
    keys, counts = np.unique(np.round(np.asarray(values, dtype=float), 6), axis=0,
                             return_counts=True)
    assert len(keys) == n_levels, (name, keys)
    assert np.all(counts == counts[0]), (name, dict(zip(map(str, keys), counts)))


def pair_levels(s1, s2):
    """(μ, c, stronger) of strength pairs μ ± c."""
    return (s1 + s2) / 2, np.abs(s1 - s2) / 2, (s1 > s2).astype(int)


def design_variables(rule, b):
    """{variable: (values per trial, number of levels)} of the rule's condition set."""
    n = len(b.length)
    variables = {"stim1 direction": (grid_steps(b.stim1_dir), 6 if rule.startswith("dmc") else 8)}
    s = b.ring_strength
    if kind(rule) in ("fd", "react", "delay", "match"):
        variables["stim1 ring"] = (b.stim1_ring, 2)
    if kind(rule) == "match":
        variables["match"] = (np.array([is_match(b, i) for i in range(n)]), 2)
        variables["test direction"] = (grid_steps(b.stim2_dir), 6 if rule.startswith("dmc") else 8)
    if kind(rule) != "dm":
        return variables
    variables["stim2 offset"] = (grid_steps(b.stim2_dir - b.stim1_dir), 5)
    if rule.startswith("context"):
        attended = int(rule[-1]) - 1
        for name, r in (("attended", attended), ("ignored", 1 - attended)):
            mu, c, stronger = pair_levels(s[:, 0, r], s[:, 1, r])
            assert np.allclose(mu, 1)
            variables[f"{name} pair"] = (np.stack([c, stronger], axis=1), 6)
        congruent = (s[:, 0, 0] > s[:, 1, 0]) == (s[:, 0, 1] > s[:, 1, 1])
        variables["ignored ring congruent"] = (congruent, 2)
        return variables
    total = s.sum(axis=2) / (2 if rule == "multidelaydm" else 1)
    mu, c, stronger = pair_levels(total[:, 0], total[:, 1])
    assert np.allclose(mu, 1)
    variables["coherence"], variables["stronger"] = (c, 3), (stronger, 2)
    if rule == "multidelaydm":
        d = s[:, :, 0] - s[:, :, 1]
        np.testing.assert_allclose(np.abs(d) / total, 0.5)
        variables["signs of d"] = (d > 0, 4)
    else:
        assert np.all(b.stim1_ring == int(rule[-1]))
    return variables


@pytest.mark.parametrize("rule", mt.RULES)
def test_condition_set_is_complete_and_balanced(rule):
    b = mt.condition_set(rule)
    n = 72 if rule.startswith("dmc") else CONDITION_SET_SIZE[kind(rule)]
    assert len(b.length) == n and np.all(b.rule == mt.RULES.index(rule))
    for name, (values, n_levels) in design_variables(rule, b).items():
        assert_balanced(values, n_levels, name)
    for name, lo, hi in SPEC_EPOCHS[kind(rule)]:  # aligned, quantile 1 = the longest
        assert np.all(np.diff(b.epochs[name], axis=1) == int(hi / DT))
    if kind(rule) == "match" and not rule.startswith("dmc"):
        offsets = grid_steps(b.stim2_dir - b.stim1_dir)[~b.is_go != rule.endswith("nogo")]
        assert_balanced(offsets, 7, "non-match offset")  # every other direction


@pytest.mark.parametrize("rule", mt.RULES)
def test_condition_set_targets_and_inputs_agree_with_metadata(rule):
    b = mt.condition_set(rule, quantile=0.5)
    check_targets(b)
    check_inputs(rule, b)


@pytest.mark.parametrize("rule", ["fdgo", "contextdelaydm2", "dmsnogo", "dmcgo"])
def test_condition_set_is_fixed_and_noise_needs_rng(rule):
    a, b = mt.condition_set(rule), mt.condition_set(rule, np.random.default_rng(5))
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, dict):
            assert all(np.array_equal(x[k], y[k]) for k in x)
        else:
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="rng"):
        mt.condition_set(rule, sigma_x=0.01)
    noisy = [mt.condition_set(rule, np.random.default_rng(s), sigma_x=0.01) for s in (1, 1, 2)]
    np.testing.assert_array_equal(noisy[0].inputs, noisy[1].inputs)
    assert not np.array_equal(noisy[0].inputs, noisy[2].inputs)
    np.testing.assert_array_equal(noisy[0].targets, a.targets)
    ring = mt.condition_set(rule, io_mode="ring")
    np.testing.assert_array_equal(ring.stim1_dir, a.stim1_dir)  # on the grid, no jitter
