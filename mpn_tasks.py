"""The 15 cognitive tasks of SPEC §2: declarations, batch generation and accuracy (SPEC §3).

Axis order everywhere: trials x time x channels, written (B, T, N). Times are in ms unless a
name ends in `_steps`; one step is DT_MS = 40 ms and a duration of d ms lasts int(d / DT_MS)
steps. Angles are radians in [0, 2π).

Provides
- RULES (SPEC order = rule index), RULESETS, RULE_GROUPS, TASKS (the registry: one short
  declaration per rule; rules differing by a flag share a family), epoch_names(rule),
  run_rules(train_cfg), direction_index(angle) (DT_MS and N_DIRS are defined here alone);
- n_inputs(io_mode), n_outputs(io_mode) for io_mode "low_dim" (21 in, 3 out) or "ring"
  (1 + 2·32 + 15 in, 1 + 32 out);
- Batch, random_batch (training: every trial draws its own durations and conditions),
  mixed_batch (training: random_batch trials of several rules, rendered together),
  aligned_batch (analysis: shared epoch boundaries, stim1 directions balanced),
  condition_set (analysis and lesion tests: the complete factorial condition set of a rule,
  aligned durations, SPEC §5.1), concat_batches;
- Scorer, score_angle, score_trial, failure_kind, accuracy_by_rule (and its standard errors,
  accuracy_and_se_by_rule, ratio_se, mean_se, rule_means): both accuracy measures and
  the failure kinds, vectorised, on numpy arrays or torch tensors.

Every sampling function takes an explicit numpy.random.Generator (same seed -> same batch).
Generation is vectorised over trials; Python loops run only over rules, epochs, stimuli and
rings.
"""
from dataclasses import dataclass, fields, replace

import numpy as np

DT_MS = 40
GRACE_STEPS = int(100 / DT_MS)  # cost mask is 0 for 100 ms at trial start and after the go cue
N_DIRS = 8  # stimulus/response directions on the grid 0, 45°, ..., 315°
N_RING = 32  # units per ring in io_mode "ring"
RING_SIGMA = np.pi / 8  # bump width in io_mode "ring"
BUMP_PEAK = 0.8  # bump height at strength 1 in io_mode "ring"
NOISE_SCALE = np.sqrt(2 / 0.8)  # input noise std per unit sigma_x (reference convention)
ACC_TOL = 0.2 * np.pi  # `trial` measure: largest accepted response-direction error
ANGLE_ZERO = 0.05  # `angle` measure: |sin| or |cos| below this counts as 0 before atan2
IO_MODES = ("low_dim", "ring")
EPOCH_NAMES = ("fix1", "stim1", "delay1", "stim2", "delay2", "go1")
LONG_DELAY_MS = 10_000  # delay1 of the long-delay probe (SPEC §7.2)

RULES = ["fdgo", "fdanti", "reactgo", "reactanti", "delaygo", "delayanti",
         "delaydm1", "delaydm2", "contextdelaydm1", "contextdelaydm2", "multidelaydm",
         "dmsgo", "dmsnogo", "dmcgo", "dmcnogo"]
RULESETS = {
    "everything": RULES,
    "go": RULES[:6],
    "decision": RULES[6:11],
    "match": RULES[11:],
}
SIBLINGS = (("dmcgo", "dmcnogo"), ("delaydm1", "delaydm2"),
            ("contextdelaydm1", "contextdelaydm2"))  # rule pairs that differ by one flag


# ---------------------------------------------------------------------------------------
# Task declarations


@dataclass(frozen=True)
class Task:
    """One rule: its epochs, when its stimuli are shown, and the flags its family reads."""
    family: str  # key of FAMILIES: the sampler that draws directions, strengths, response
    group: str  # task group used to colour plots (Go/Anti, Reaction, Delay, ...)
    epochs: tuple  # ((name, lo_ms, hi_ms), ...) in trial order; durations ~ U(lo, hi)
    stim_windows: tuple  # per stimulus: (first_epoch, last_epoch) during which it is shown
    fixate_whole_trial: bool = False  # fixation input stays on: the go cue is a stimulus onset
    stim1_dirs: tuple = tuple(range(N_DIRS))  # grid indices stim1 may take
    anti: bool = False  # respond opposite to the stimulus
    ring: int = 1  # ring holding stim1 (delaydm) or the attended ring (contextdm)
    nogo: bool = False  # match tasks: respond on non-match and fixate on match
    category: bool = False  # match tasks: compare categories (θ < π), not directions


_FD_EPOCHS = (("fix1", 300, 700), ("stim1", 200, 1500), ("go1", 300, 700))
_REACT_EPOCHS = (("fix1", 500, 2500), ("go1", 300, 1700))
_DELAY_EPOCHS = (("fix1", 300, 700), ("stim1", 200, 1600), ("delay1", 200, 1600),
                 ("go1", 300, 700))
_DM_EPOCHS = (("fix1", 200, 600), ("stim1", 200, 1600), ("delay1", 200, 1600),
              ("stim2", 200, 1600), ("delay2", 100, 300), ("go1", 300, 700))
_MATCH_EPOCHS = (("fix1", 200, 600), ("stim1", 200, 1600), ("delay1", 200, 1600),
                 ("go1", 300, 700))

_FD = Task("single", "Go/Anti", _FD_EPOCHS, (("stim1", "go1"),))
_REACT = Task("single", "Reaction", _REACT_EPOCHS, (("go1", "go1"),), fixate_whole_trial=True)
_DELAY = Task("single", "Delay", _DELAY_EPOCHS, (("stim1", "stim1"),))
_DM = Task("delaydm", "Decision-making", _DM_EPOCHS, (("stim1", "stim1"), ("stim2", "stim2")))
_MATCH = Task("match", "Match", _MATCH_EPOCHS, (("stim1", "stim1"), ("go1", "go1")),
              fixate_whole_trial=True)
_DMC = replace(_MATCH, category=True, stim1_dirs=(1, 2, 3, 5, 6, 7))  # 0 and π are boundaries

TASKS = {
    "fdgo": _FD, "fdanti": replace(_FD, anti=True),
    "reactgo": _REACT, "reactanti": replace(_REACT, anti=True),
    "delaygo": _DELAY, "delayanti": replace(_DELAY, anti=True),
    "delaydm1": _DM, "delaydm2": replace(_DM, ring=2),
    "contextdelaydm1": replace(_DM, family="contextdm"),
    "contextdelaydm2": replace(_DM, family="contextdm", ring=2),
    "multidelaydm": replace(_DM, family="multidm"),
    "dmsgo": _MATCH, "dmsnogo": replace(_MATCH, nogo=True),
    "dmcgo": _DMC, "dmcnogo": replace(_DMC, nogo=True),
}
RULE_GROUPS = {rule: TASKS[rule].group for rule in RULES}


def run_rules(train_cfg):
    """The rules a run was trained on (its training config's ruleset), in SPEC order."""
    return list(RULESETS[train_cfg["ruleset"]])


def epoch_names(rule):
    """Names of the rule's epochs in trial order."""
    return tuple(name for name, _, _ in _task(rule).epochs)


def n_inputs(io_mode="low_dim"):
    """Inputs: fixation, go cue, 2 x (sin, cos), rules; or fixation, 2 rings, rules."""
    _check_io_mode(io_mode)
    return 6 + len(RULES) if io_mode == "low_dim" else 1 + 2 * N_RING + len(RULES)


def n_outputs(io_mode="low_dim"):
    """Output channels: fixation, then (sin, cos) or a response ring."""
    _check_io_mode(io_mode)
    return 3 if io_mode == "low_dim" else 1 + N_RING


def _check_io_mode(io_mode):
    if io_mode not in IO_MODES:
        raise ValueError(f"unknown io_mode {io_mode!r}; use one of {IO_MODES}")


def _task(rule):
    if rule not in TASKS:
        raise ValueError(f"unknown rule {rule!r}; known rules: {', '.join(RULES)}")
    return TASKS[rule]


# ---------------------------------------------------------------------------------------
# Condition samplers: one per family, vectorised over trials


@dataclass
class _Conditions:
    """What a family draws for B trials (before rendering into time series)."""
    dirs: np.ndarray  # (B, 2) direction of stimulus 1 and 2, rad; nan where absent
    ring_strength: np.ndarray  # (B, 2, 2) strength of stimulus k on ring r (0 = not shown)
    strength: np.ndarray  # (B, 2) decision-relevant strength of each stimulus; nan if absent
    stim1_ring: np.ndarray  # (B,) ring of stim1: 1 or 2, 0 when it is shown on both rings
    resp_dir: np.ndarray  # (B,) rad, nan on no-go trials
    resp_amp: np.ndarray  # (B,) response amplitude
    is_go: np.ndarray  # (B,) bool


def _grid(index):
    return np.asarray(index, dtype=np.float64) * (2 * np.pi / N_DIRS)


def _sample_single(task, rng, i1):
    """fd / react / delay: one stimulus, strength 1, on a random ring; go or anti response."""
    return _single_conditions(task, i1, rng.integers(1, 3, size=len(i1)))


def _single_conditions(task, i1, ring):
    n = len(i1)
    ring_strength = np.zeros((n, 2, 2))
    ring_strength[np.arange(n), 0, ring - 1] = 1.0
    theta = _grid(i1)
    return _Conditions(
        dirs=np.stack([theta, np.full(n, np.nan)], axis=1), ring_strength=ring_strength,
        strength=np.stack([np.ones(n), np.full(n, np.nan)], axis=1), stim1_ring=ring,
        resp_dir=theta + np.pi * task.anti, resp_amp=np.ones(n), is_go=np.ones(n, bool))


COHERENCES = np.array([0.08, 0.16, 0.32])  # c of the strength pairs μ ± c·s
_SIGNS = np.array([-1.0, 1.0])
DM_OFFSETS = np.arange(2, 7)  # θ2 - θ1 of dm rules in grid steps: 90°, 135°, ..., 270°


def _strength_pair(rng, n):
    """Strengths μ ± c·s: μ ~ U(0.8, 1.2), c ∈ {0.08, 0.16, 0.32}, s = ±1 (never equal)."""
    mu = rng.uniform(0.8, 1.2, size=n)
    c = COHERENCES[rng.integers(0, len(COHERENCES), size=n)]  # = rng.choice, draw for draw
    s = _SIGNS[rng.integers(0, 2, size=n)]
    return np.stack([mu + c * s, mu - c * s], axis=1)


def _dm_dirs(i1, i2):
    return np.stack([_grid(i1), _grid(i2)], axis=1)


def _dm_conditions(dirs, ring_strength, strength, decisive, stim1_ring, amp_is_strength):
    """Respond to the stimulus whose `decisive` value is larger."""
    n = len(dirs)
    first = decisive[:, 0] > decisive[:, 1]
    resp_amp = np.where(first, strength[:, 0], strength[:, 1]) if amp_is_strength else np.ones(n)
    return _Conditions(dirs=dirs, ring_strength=ring_strength, strength=strength,
                       stim1_ring=stim1_ring, resp_dir=np.where(first, dirs[:, 0], dirs[:, 1]),
                       resp_amp=resp_amp, is_go=np.ones(n, bool))


def _sample_delaydm(task, rng, i1):
    """stim1 on ring `task.ring`, stim2 on the other; θ2 = θ1 + 90°..270° on the grid."""
    s = _strength_pair(rng, len(i1))
    return _delaydm_conditions(task, i1, i1 + rng.integers(2, 7, size=len(i1)), s)


def _delaydm_conditions(task, i1, i2, s):
    """The stronger of the strengths s (B, 2) wins, amp = its strength."""
    n = len(i1)
    ring_strength = np.zeros((n, 2, 2))
    ring_strength[:, 0, task.ring - 1] = s[:, 0]
    ring_strength[:, 1, 2 - task.ring] = s[:, 1]
    return _dm_conditions(_dm_dirs(i1, i2), ring_strength, s, s, np.full(n, task.ring), True)


def _sample_contextdm(task, rng, i1):
    """Both stimuli on both rings, independent strengths per ring; only `task.ring` counts."""
    n = len(i1)
    pairs = [_strength_pair(rng, n) for _ in range(2)]  # per ring: (B, 2) stimulus strengths
    return _contextdm_conditions(task, i1, i1 + rng.integers(2, 7, size=n),
                                 np.stack(pairs, axis=2))


def _contextdm_conditions(task, i1, i2, ring_strength):
    """ring_strength (B, 2, 2): strength of stimulus k on ring r; the attended ring decides."""
    attended = ring_strength[:, :, task.ring - 1]
    return _dm_conditions(_dm_dirs(i1, i2), ring_strength, attended.copy(), attended,
                          np.zeros(len(i1), np.int64), False)


def _sample_multidm(task, rng, i1):
    """Stimulus i shows s_i ± d_i/2 on ring 1/2, d_i = ±s_i·U(0.2, 0.8); larger 2·s_i wins."""
    n = len(i1)
    s = _strength_pair(rng, n)
    d = s * rng.uniform(0.2, 0.8, size=(n, 2)) * _SIGNS[rng.integers(0, 2, size=(n, 2))]
    return _multidm_conditions(i1, i1 + rng.integers(2, 7, size=n), s, d)


def _multidm_conditions(i1, i2, s, d):
    ring_strength = np.stack([s + d / 2, s - d / 2], axis=2)
    return _dm_conditions(_dm_dirs(i1, i2), ring_strength, s, s, np.zeros(len(i1), np.int64),
                          False)


def _category_test(rng, i1, match):
    """dmc test index: a usable direction (not 0 or π) of the sample's category or the other."""
    sample_upper = i1 > N_DIRS // 2  # category θ > π (0 and π are never drawn)
    test_upper = sample_upper == match
    return 1 + rng.integers(0, 3, size=len(i1)) + (N_DIRS // 2) * test_upper


def _sample_match(task, rng, i1):
    """dms / dmc: sample on a random ring during stim1, test on the other ring from go1 on."""
    n = len(i1)
    ring = rng.integers(1, 3, size=n)
    match = rng.random(n) < 0.5
    if task.category:
        i2 = _category_test(rng, i1, match)
    else:  # a non-match test is one of the 7 other directions
        i2 = np.where(match, i1, i1 + rng.integers(1, N_DIRS, size=n))
    return _match_conditions(task, i1, i2, ring)


def _is_match(task, i1, i2):
    """dms: same direction; dmc: same category (θ > π), for grid indices."""
    if task.category:
        return (np.mod(i1, N_DIRS) > N_DIRS // 2) == (np.mod(i2, N_DIRS) > N_DIRS // 2)
    return np.mod(i1, N_DIRS) == np.mod(i2, N_DIRS)


def _match_conditions(task, i1, i2, ring):
    n = len(i1)
    ring_strength = np.zeros((n, 2, 2))
    ring_strength[np.arange(n), 0, ring - 1] = 1.0
    ring_strength[np.arange(n), 1, 2 - ring] = 1.0
    dirs = np.stack([_grid(i1), _grid(i2)], axis=1)
    is_go = _is_match(task, i1, i2) != task.nogo
    return _Conditions(dirs=dirs, ring_strength=ring_strength, strength=np.ones((n, 2)),
                       stim1_ring=ring, resp_dir=np.where(is_go, dirs[:, 1], np.nan),
                       resp_amp=np.ones(n), is_go=is_go)


FAMILIES = {"single": _sample_single, "delaydm": _sample_delaydm,
            "contextdm": _sample_contextdm, "multidm": _sample_multidm, "match": _sample_match}

# ---------------------------------------------------------------------------------------
# Condition sets (SPEC §5.1): every family's complete factorial design, fixed by the rule

MULTI_D_RATIO = 0.5  # multidm condition set: |d_i| = s_i/2, the middle of U(0.2, 0.8)


def _levels(*counts):
    """Index arrays of the full factorial of `counts` levels (the first varies slowest)."""
    return tuple(np.indices(counts).reshape(len(counts), -1))


def _fixed_pair(coherence_index, stronger):
    """μ = 1 strength pairs (B, 2): 1 ± c, stimulus `stronger` (0 or 1) the larger."""
    c = COHERENCES[coherence_index] * np.where(stronger == 0, 1.0, -1.0)
    return np.stack([1 + c, 1 - c], axis=1)


def _grid_single(task, dirs):
    """stim1 direction x stim1 ring: 8 x 2 = 16 trials."""
    d, ring = _levels(len(dirs), 2)
    return dirs[d], _single_conditions(task, dirs[d], ring + 1)


def _grid_delaydm(task, dirs):
    """stim1 direction x stim2 offset x coherence x stronger: 8 x 5 x 3 x 2 = 240 trials."""
    d, off, c, w = _levels(len(dirs), len(DM_OFFSETS), len(COHERENCES), 2)
    i1 = dirs[d]
    return i1, _delaydm_conditions(task, i1, i1 + DM_OFFSETS[off], _fixed_pair(c, w))


def _grid_contextdm(task, dirs):
    """A balanced sixth of the 8 x 5 x 6 x 6 design (direction, offset, attended pair, ignored
    pair): the ignored ring's (coherence, stronger) level is (a + d + off) mod 6 for attended
    level a, so every level of every variable occurs equally often (240 trials) and the
    ignored ring favours the same stimulus as the attended one in exactly half of them."""
    d, off, a = _levels(len(dirs), len(DM_OFFSETS), 2 * len(COHERENCES))
    ignored = (a + d + off) % (2 * len(COHERENCES))
    pairs = {task.ring - 1: _fixed_pair(a // 2, a % 2), 2 - task.ring: _fixed_pair(
        ignored // 2, ignored % 2)}
    ring_strength = np.stack([pairs[0], pairs[1]], axis=2)
    i1 = dirs[d]
    return i1, _contextdm_conditions(task, i1, i1 + DM_OFFSETS[off], ring_strength)


def _grid_multidm(task, dirs):
    """direction x offset x coherence x stronger (240 trials), |d_i| = MULTI_D_RATIO·s_i; the
    signs of (d_1, d_2) run through their 4 patterns with (d + off) mod 4, equally often."""
    d, off, c, w = _levels(len(dirs), len(DM_OFFSETS), len(COHERENCES), 2)
    i1, s = dirs[d], _fixed_pair(c, w)
    pattern = (d + off) % 4
    signs = np.stack([np.where(pattern % 2 == 0, 1.0, -1.0),
                      np.where(pattern // 2 == 0, 1.0, -1.0)], axis=1)
    return i1, _multidm_conditions(i1, i1 + DM_OFFSETS[off], s, MULTI_D_RATIO * s * signs)


def _grid_match(task, dirs):
    """sample direction x sample ring x test. dms: the match test 7 times (so match and
    non-match are equally frequent) and each of the 7 other directions once: 8 x 2 x 14 =
    224 trials. dmc: the 6 usable test directions: 6 x 2 x 6 = 72 trials, match = category."""
    n_tests = len(dirs) if task.category else 2 * (N_DIRS - 1)
    d, ring, test = _levels(len(dirs), 2, n_tests)
    i1 = dirs[d]
    if task.category:
        i2 = dirs[test]
    else:  # tests 0..6: the sample direction, tests 7..13: offsets 1..7
        i2 = i1 + np.where(test < N_DIRS - 1, 0, test - (N_DIRS - 2))
    return i1, _match_conditions(task, i1, i2, ring + 1)


CONDITION_GRIDS = {"single": _grid_single, "delaydm": _grid_delaydm,
                   "contextdm": _grid_contextdm, "multidm": _grid_multidm, "match": _grid_match}


# ---------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """A batch of trials of one or more rules; every array's first axis is the trial."""
    inputs: np.ndarray  # (B, T, n_in) float32
    targets: np.ndarray  # (B, T, n_out) float32
    mask: np.ndarray  # (B, T, n_out) float32, effective squared-error weight (SPEC §2.5)
    rule: np.ndarray  # (B,) int64 index into RULES
    length: np.ndarray  # (B,) int64 steps; everything is 0 from here on
    go_step: np.ndarray  # (B,) int64 step of the go cue (= go1 start)
    epochs: dict  # name -> (B, 2) int64 [start, stop) steps; (-1, -1) where absent
    stim1_dir: np.ndarray  # (B,) rad
    stim2_dir: np.ndarray  # (B,) rad, nan where the rule has one stimulus
    stim1_strength: np.ndarray  # (B,) decision-relevant strength (attended ring / mean of rings)
    stim2_strength: np.ndarray  # (B,) likewise, nan where absent
    stim1_ring: np.ndarray  # (B,) int64 1 or 2; 0 = shown on both rings
    resp_dir: np.ndarray  # (B,) rad, nan on no-go trials
    is_go: np.ndarray  # (B,) bool
    io_mode: str
    ring_strength: np.ndarray  # (B, 2, 2) strength of stimulus k on ring r as shown
    resp_amp: np.ndarray  # (B,) response amplitude (0 on no-go trials)

    @property
    def rule_names(self):
        return [RULES[r] for r in self.rule]

    def take(self, index):
        """A sub-batch of the trials selected by `index` (same T)."""
        return replace(self, **{f.name: _take_field(getattr(self, f.name), index)
                                for f in fields(self) if f.name != "io_mode"})


def _take_field(value, index):
    if isinstance(value, dict):
        return {k: v[index] for k, v in value.items()}
    return value[index]


def random_batch(rule, batch_size, rng, *, sigma_x=0.0, io_mode="low_dim"):
    """Training batch: every trial draws its own durations and conditions.

    In io_mode "ring" the angles are continuous: each trial's whole geometry is rotated by a
    uniform jitter of at most ±22.5°, which keeps every relation of the rule (and the dmc
    categories, whose usable directions sit 45° from the boundaries) intact.
    """
    return mixed_batch([rule], batch_size, rng, sigma_x=sigma_x, io_mode=io_mode)


def mixed_batch(rules, trials_per_rule, rng, *, sigma_x=0.0, io_mode="low_dim"):
    """Training batch of several rules, `trials_per_rule` random_batch trials of each in the
    order given, zero-padded to the longest trial.

    Equal, array for array, to concat_batches([random_batch(r, trials_per_rule, rng) for r in
    rules]) (the same draws from `rng`, in the same order), and faster (4 rules x 8 trials:
    1.5-1.9 ms against 2.7-3.4): the trials are rendered into time series together.
    """
    _check_io_mode(io_mode)
    parts = []
    for rule in rules:
        task = _task(rule)
        lo, hi = np.array([bounds for _, *bounds in task.epochs]).T[:, :, None]
        ms = rng.uniform(lo, hi, size=(len(task.epochs), trials_per_rule))  # epoch by epoch
        steps = (ms.T / DT_MS).astype(np.int64)
        choices = np.asarray(task.stim1_dirs)
        i1 = choices[rng.integers(0, len(choices), size=trials_per_rule)]
        cond = FAMILIES[task.family](task, rng, i1)
        parts.append(_draw_part(rule, steps, cond, rng, sigma_x, io_mode,
                                jitter=io_mode == "ring"))
    return _render(parts, sigma_x, io_mode)


def aligned_batch(rule, n_trials, rng, *, quantile=1.0, sigma_x=0.0, io_mode="low_dim",
                  long_delay=None):
    """Analysis batch: shared epoch boundaries (each epoch at `quantile` of its range).

    Trial i has stim1 direction index i % 8; dmc rules, which never use 0 or π, cycle over
    their 6 usable directions instead. Other conditions are drawn from `rng`; angles stay on
    the grid in both io modes so trials can be grouped by direction.
    long_delay (SPEC §2.4, the memory-geometry probe): None keeps delay1 as drawn; True
    stretches it to LONG_DELAY_MS; a number stretches it to that many ms.
    """
    task = _task(rule)
    _check_io_mode(io_mode)
    choices = np.asarray(task.stim1_dirs)
    i1 = choices[np.arange(n_trials) % len(choices)]
    steps = _aligned_steps(task, quantile, n_trials, long_delay)
    cond = FAMILIES[task.family](task, rng, i1)
    return _render([_draw_part(rule, steps, cond, rng, sigma_x, io_mode, jitter=False)],
                   sigma_x, io_mode)


def condition_set(rule, rng=None, quantile=1.0, sigma_x=0.0, io_mode="low_dim"):
    """The rule's complete factorial condition set (SPEC §5.1), `aligned` durations.

    Fixed by the rule, never drawn: stim1 direction (8; dmc its 6 usable ones) x stim1 ring
    where the rule draws it x the family's other variables (see the _grid_* functions); every
    level of every variable occurs equally often. Sizes: fd/react/delay 16, delaydm,
    contextdm and multidm 240, dms 224, dmc 72. `rng` is used only for the input noise,
    which is added when sigma_x > 0. Angles stay on the 8-direction grid in both io modes.
    """
    task = _task(rule)
    _check_io_mode(io_mode)
    if sigma_x > 0 and rng is None:
        raise ValueError("condition_set needs an rng for input noise (sigma_x > 0)")
    i1, cond = CONDITION_GRIDS[task.family](task, np.asarray(task.stim1_dirs))
    steps = _aligned_steps(task, quantile, len(i1))
    return _render([_draw_part(rule, steps, cond, rng, sigma_x, io_mode, jitter=False)],
                   sigma_x, io_mode)


def _aligned_steps(task, quantile, n_trials, long_delay=None):
    """(n_trials, n_epochs) steps: every epoch at `quantile` of its range, shared by all."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    ms = np.array([lo + quantile * (hi - lo) for _, lo, hi in task.epochs])
    if long_delay is not None and long_delay is not False:
        names = [name for name, _, _ in task.epochs]
        if "delay1" not in names:
            raise ValueError(f"long_delay stretches delay1, and this rule has no delay1 "
                             f"(its epochs: {names})")
        delay_ms = LONG_DELAY_MS if long_delay is True else float(long_delay)
        if delay_ms < DT_MS:
            raise ValueError(f"long_delay must be at least one step ({DT_MS} ms), got {delay_ms}")
        ms[names.index("delay1")] = delay_ms
    return np.tile((ms / DT_MS).astype(np.int64), (n_trials, 1))


@dataclass
class _Part:
    """One rule's trials of a batch, drawn and not yet rendered into time series."""
    rule: str
    steps: np.ndarray  # (B, n_epochs) duration of each epoch in steps
    cond: _Conditions
    noise: np.ndarray  # (B, T, n_in) float32 input noise, None when sigma_x = 0


def _draw_part(rule, steps, cond, rng, sigma_x, io_mode, jitter):
    """A _Part: the conditions rotated (ring-mode jitter) and the input noise drawn. `rng` draws the ring-mode rotation (jitter) and the input noise (sigma_x > 0) only, in
    that order (noise for every channel and step up to the part's longest trial)."""
    n = len(cond.dirs)
    rotation = rng.uniform(-np.pi / N_DIRS, np.pi / N_DIRS, size=n) if jitter else np.zeros(n)
    cond.dirs = np.mod(cond.dirs + rotation[:, None], 2 * np.pi)
    cond.resp_dir = np.mod(cond.resp_dir + rotation, 2 * np.pi)
    noise = None
    if sigma_x > 0:
        shape = (n, int(steps.sum(axis=1).max()), n_inputs(io_mode))
        noise = rng.standard_normal(shape, dtype=np.float32)
    return _Part(rule, steps, cond, noise)


def _part_rows(parts):
    """(part, rows): each part with the slice its trials occupy in the rendered batch."""
    stops = np.cumsum([len(p.steps) for p in parts])
    return [(p, slice(stop - len(p.steps), stop)) for p, stop in zip(parts, stops)]


def _render(parts, sigma_x, io_mode):
    """One Batch from drawn parts, all trials rendered together, padded to the longest."""
    cond = _Conditions(*(np.concatenate([getattr(p.cond, f.name) for p in parts])
                         for f in fields(_Conditions)))
    epochs, go, length = _epoch_windows(parts)
    rule_index = np.concatenate([np.full(len(p.steps), RULES.index(p.rule)) for p in parts])
    inputs = _render_inputs(parts, rule_index, cond, epochs, go, length, io_mode)
    if sigma_x > 0:
        for p, rows in _part_rows(parts):
            n_steps = p.noise.shape[1]
            valid = (np.arange(n_steps) < length[rows, None])[:, :, None]
            inputs[rows, :n_steps] += p.noise * np.float32(sigma_x * NOISE_SCALE) * valid
    return Batch(
        inputs=inputs, targets=_render_targets(cond, go, length, io_mode),
        mask=_cost_mask(go, length, n_outputs(io_mode)), rule=rule_index,
        length=length, go_step=go, epochs=epochs, stim1_dir=cond.dirs[:, 0],
        stim2_dir=cond.dirs[:, 1], stim1_strength=cond.strength[:, 0],
        stim2_strength=cond.strength[:, 1], stim1_ring=cond.stim1_ring.astype(np.int64),
        resp_dir=cond.resp_dir, is_go=cond.is_go, io_mode=io_mode,
        ring_strength=cond.ring_strength, resp_amp=np.where(cond.is_go, cond.resp_amp, 0.0))


def _epoch_windows(parts):
    """[start, stop) step windows per epoch name ((-1, -1) where a trial's rule lacks the
    epoch), go-cue steps and lengths of the parts' trials, concatenated."""
    n = sum(len(p.steps) for p in parts)
    epochs = {name: np.full((n, 2), -1, dtype=np.int64) for name in EPOCH_NAMES}
    for p, rows in _part_rows(parts):
        stops = np.cumsum(p.steps, axis=1)
        for j, (name, _, _) in enumerate(TASKS[p.rule].epochs):
            epochs[name][rows, 0] = stops[:, j] - p.steps[:, j]
            epochs[name][rows, 1] = stops[:, j]
    length = epochs["go1"][:, 1].copy()  # go1 is every rule's last epoch
    return epochs, epochs["go1"][:, 0].copy(), length


def _encode(theta, strength, io_mode):
    """(B,) angles and strengths -> (B, width): strength·(sin, cos), or a ring of bumps."""
    theta = np.where(np.isnan(theta), 0.0, theta)  # absent stimuli have strength 0 anyway
    if io_mode == "low_dim":  # filled in place: np.stack and nan_to_num took a quarter of a batch
        sin, cos = strength * np.sin(theta), strength * np.cos(theta)
        code = np.empty((len(theta), 2), dtype=np.result_type(sin, cos))
        code[:, 0], code[:, 1] = sin, cos
        return code
    return _bumps(theta, strength)


_PREFERRED = 2 * np.pi * np.arange(N_RING) / N_RING  # preferred direction of each ring unit


def _bumps(theta, strength):
    d = np.mod(_PREFERRED[None, :] - theta[:, None] + np.pi, 2 * np.pi) - np.pi
    return BUMP_PEAK * np.exp(-d ** 2 / (2 * RING_SIGMA ** 2)) * strength[:, None]


def _ring_channels(io_mode):
    """Input slice of ring 1 followed by ring 2, and the first rule channel."""
    if io_mode == "low_dim":
        return slice(2, 6), 6
    return slice(1, 1 + 2 * N_RING), 1 + 2 * N_RING


def _render_inputs(parts, rule_index, cond, epochs, go, length, io_mode):
    n, n_steps = len(length), int(length.max())
    t = np.arange(n_steps)[None, :]
    valid = t < length[:, None]
    after_go = valid & (t >= go[:, None])
    x = np.zeros((n, n_steps, n_inputs(io_mode)), dtype=np.float32)
    fixate_whole = np.concatenate([np.full(len(p.steps), TASKS[p.rule].fixate_whole_trial)
                                   for p in parts])
    x[:, :, 0] = valid & (fixate_whole[:, None] | ~after_go)
    if io_mode == "low_dim":  # the ring format signals the go cue by fixation off only
        x[:, :, 1] = after_go
    rings, rule0 = _ring_channels(io_mode)
    for k in range(2):
        shown = (t >= _stim_bound(parts, epochs, k, 0)[:, None]) & (
            t < _stim_bound(parts, epochs, k, 1)[:, None])
        # both rings in one write: they are adjacent channels in either layout
        code = np.concatenate([_encode(cond.dirs[:, k], cond.ring_strength[:, k, r], io_mode)
                               for r in range(2)], axis=1).astype(np.float32)
        x_rings = x[:, :, rings]  # a view: writing only the shown steps is what keeps this fast
        x_rings[shown] += np.repeat(code, shown.sum(axis=1), axis=0)
    x[np.arange(n), :, rule0 + rule_index] = valid
    return x


def _stim_bound(parts, epochs, k, side):
    """Per trial, the first (side 0) or one-past-last (side 1) step showing stimulus k: from
    the start of its first epoch to the stop of its last (both 0 where the rule has none)."""
    bound = np.zeros(len(epochs["go1"]), dtype=np.int64)
    for p, rows in _part_rows(parts):
        windows = TASKS[p.rule].stim_windows
        if k < len(windows):
            bound[rows] = epochs[windows[k][side]][rows, side]
    return bound


def _render_targets(cond, go, length, io_mode):
    """Fixation target 1 until the go cue (whole trial on no-go); response during go1."""
    n, n_steps = len(length), int(length.max())
    t = np.arange(n_steps)[None, :]
    valid = t < length[:, None]
    respond = valid & (t >= go[:, None]) & cond.is_go[:, None]
    y = np.zeros((n, n_steps, n_outputs(io_mode)), dtype=np.float32)
    y[:, :, 0] = valid & ~respond
    code = _encode(cond.resp_dir, np.where(cond.is_go, cond.resp_amp, 0.0), io_mode)
    y_response = y[:, :, 1:]  # a view, written at the response steps only (fast)
    y_response[respond] = np.repeat(code.astype(np.float32), respond.sum(axis=1), axis=0)
    return y


def _cost_mask(go, length, n_out):
    """SPEC §2.5: 0 (first 100 ms), 1 (to go cue), 0 (100 ms), 5 (to end); fixation half."""
    t = np.arange(int(length.max()))[None, :]
    go = go[:, None]
    weight = np.where(t < go, 1.0, 5.0)
    grace = (t < GRACE_STEPS) | ((t >= go) & (t < go + GRACE_STEPS)) | (t >= length[:, None])
    weight = np.where(grace, 0.0, weight).astype(np.float32)
    mask = np.repeat(weight[:, :, None], n_out, axis=2)
    mask[:, :, 0] *= 0.5
    return mask


def concat_batches(batches):
    """One batch from several (same io_mode), zero-padded in time to the longest."""
    modes = {b.io_mode for b in batches}
    if len(modes) != 1:
        raise ValueError(f"cannot concatenate batches of different io_modes {sorted(modes)}")
    n_steps = max(b.inputs.shape[1] for b in batches)
    merged = {"io_mode": modes.pop(), "epochs": {
        name: np.concatenate([b.epochs[name] for b in batches]) for name in EPOCH_NAMES}}
    for f in fields(Batch):
        if f.name in merged:
            continue
        parts = [getattr(b, f.name) for b in batches]
        if f.name in ("inputs", "targets", "mask"):  # zero-padded in time (np.pad is slow)
            out = np.zeros((sum(len(p) for p in parts), n_steps, parts[0].shape[2]),
                           parts[0].dtype)
            start = 0
            for p in parts:
                out[start:start + len(p), :p.shape[1]] = p
                start += len(p)
            merged[f.name] = out
        else:
            merged[f.name] = np.concatenate(parts)
    return Batch(**merged)


# ---------------------------------------------------------------------------------------
# Accuracy (SPEC §3)


def _ring_norm():
    """Population-vector length of a strength-1 response bump, so ring and low_dim agree."""
    bump = _bumps(np.zeros(1), np.ones(1))[0]
    return np.hypot(bump @ np.sin(_PREFERRED), bump @ np.cos(_PREFERRED))


_RING_NORM = _ring_norm()


def _response_vectors(y, io_mode):
    """(B, T, n_out) -> (B, T, 2) response (sin, cos); ring: normalised population vector."""
    if io_mode == "low_dim":
        return y[..., 1:3]
    ring = y[..., 1:]
    return np.stack([ring @ np.sin(_PREFERRED), ring @ np.cos(_PREFERRED)], axis=-1) / _RING_NORM


def _response_window(batch):
    """(B, T) scored response steps: from go + 100 ms + ⌊remaining / 4⌋ to the trial end."""
    t = np.arange(batch.targets.shape[1])[None, :]
    first = batch.go_step + GRACE_STEPS
    start = first + (batch.length - first) // 4
    return (t >= start[:, None]) & (t < batch.length[:, None])


def direction_index(angle):
    """Index 0..N_DIRS-1 of the grid direction nearest each angle (radians; finite)."""
    return np.round(np.asarray(angle) / (2 * np.pi / N_DIRS)).astype(np.int64) % N_DIRS


def _grid_index(vectors):
    """Nearest of the 8 directions after zeroing components below ANGLE_ZERO (0 vector -> 0)."""
    v = np.where(np.abs(vectors) < ANGLE_ZERO, 0.0, vectors)
    return direction_index(np.arctan2(v[..., 0], v[..., 1]))


FAILURE_KINDS = ("broke_fixation", "wrong_go", "nogo_response")  # codes 1, 2, 3


class Scorer:
    """Both accuracy measures and the failure kinds of one batch's trials, for outputs
    (..., B, T, n_out) with any leading axes (e.g. K lesion conditions run on the same
    trials). What depends only on the batch (the scored response steps, the steps before the
    go cue, the targets' directions) is found once, and only those steps of the outputs are
    read (in float64, whatever the outputs' dtype).

    Per trial: `angle` counts the scored response steps whose direction (on the 8-direction
    grid, components below ANGLE_ZERO zeroed) matches the target's; `trial` requires the
    fixation output > 0.5 at every scored step before the go cue ("held") and every scored
    response step right (go: fixation < 0.5, direction within ACC_TOL, nonzero response;
    no-go: fixation > 0.5 and response norm < 0.5)."""

    def __init__(self, batch):
        self.batch = batch
        B, T = batch.targets.shape[:2]
        window = _response_window(batch)
        self.n_scored = window.sum(axis=1)  # (B,)
        self.window = np.nonzero(window)  # (trial, step) of every scored response step
        t = np.arange(T)[None, :]
        self.pre_go = np.nonzero((batch.mask[..., 0] > 0) & (t < batch.go_step[:, None]))
        target = _response_vectors(batch.targets[self.window], batch.io_mode)
        self.target_grid = _grid_index(target)
        self.target_angle = np.arctan2(target[..., 0], target[..., 1])
        self.go_step_ok = batch.is_go[self.window[0]]
        # each trial's points are consecutive (np.nonzero is row-major): their bounds
        self.window_bounds = np.searchsorted(self.window[0], np.arange(B + 1))
        self.pre_go_bounds = np.searchsorted(self.pre_go[0], np.arange(B + 1))

    def _points(self, outputs, index, channels):
        y = outputs.detach().cpu().numpy() if hasattr(outputs, "detach") else np.asarray(outputs)
        if y.shape[-3:] != self.batch.targets.shape:
            raise ValueError(f"outputs have shape {y.shape}, batch targets "
                             f"{self.batch.targets.shape}")
        return np.asarray(y[..., index[0], index[1], channels], dtype=np.float64)

    def __call__(self, outputs):
        """{"n_correct": (..., B) scored steps right under `angle`, "kind": (..., B) the
        failure kind: 0 correct under `trial`, 1 broke fixation before the go cue, 2 held
        fixation but responded wrongly or not at all on a go trial, 3 held fixation but
        responded (or let fixation go) on a no-go trial}."""
        y = self._points(outputs, self.window, slice(None))  # (..., P, n_out)
        out = _response_vectors(y, self.batch.io_mode)
        n_correct = _per_trial(_grid_index(out) == self.target_grid, self.window_bounds)
        fixation = y[..., 0]
        norm = np.hypot(out[..., 0], out[..., 1])
        error = np.arctan2(out[..., 0], out[..., 1]) - self.target_angle
        error = np.abs(np.mod(error + np.pi, 2 * np.pi) - np.pi)
        go_ok = (fixation < 0.5) & (error < ACC_TOL) & (norm > 0)
        nogo_ok = (fixation > 0.5) & (norm < 0.5)
        wrong = _per_trial(~np.where(self.go_step_ok, go_ok, nogo_ok), self.window_bounds)
        pre = self._points(outputs, self.pre_go, 0)
        held = _per_trial(~(pre > 0.5), self.pre_go_bounds) == 0
        kind = np.where(held & (wrong == 0), 0,
                        np.where(~held, 1, np.where(self.batch.is_go, 2, 3)))
        return {"n_correct": n_correct, "kind": kind.astype(np.int64)}


def _per_trial(flags, bounds):
    """(..., B) counts of True among each trial's points (flags (..., P), trial b's points
    at [bounds[b], bounds[b + 1]))."""
    total = np.cumsum(flags, axis=-1, dtype=np.int64)
    total = np.concatenate([np.zeros(total.shape[:-1] + (1,), np.int64), total], axis=-1)
    return total[..., bounds[1:]] - total[..., bounds[:-1]]


def score_angle(outputs, batch):
    """`angle` measure: per trial, (number of correct, number of scored) response steps."""
    scorer = Scorer(batch)
    return scorer(outputs)["n_correct"], scorer.n_scored


def score_trial(outputs, batch):
    """`trial` measure: (B,) bool, fixation held before the go cue and every scored response
    step right (Scorer)."""
    return Scorer(batch)(outputs)["kind"] == 0


def failure_kind(outputs, batch):
    """(B,) int per trial under the `trial` measure: 0 correct, 1 broke fixation before the
    go cue, 2 held fixation but responded wrongly or not at all on a go trial, 3 held fixation
    but responded (or let fixation go) on a no-go trial. Codes 1-3 partition the errors."""
    return Scorer(batch)(outputs)["kind"]


def accuracy_by_rule(outputs, batch):
    """{"angle": {rule: acc}, "trial": {rule: acc}} for every rule present in the batch.

    `angle` accuracy is the mean over the rule's scored (trial, step) points; `trial`
    accuracy the fraction of its trials that are correct.
    """
    return accuracy_and_se_by_rule(outputs, batch)[0]


def accuracy_and_se_by_rule(outputs, batch):
    """(accuracy_by_rule's dict, the same dict of standard errors, `ratio_se` over the
    rule's trials)."""
    scorer = Scorer(batch)
    scores = scorer(outputs)
    n_correct, n_scored, correct = scores["n_correct"], scorer.n_scored, scores["kind"] == 0
    acc, se = {"angle": {}, "trial": {}}, {"angle": {}, "trial": {}}
    for r in np.unique(batch.rule):
        trials, rule = batch.rule == r, RULES[r]
        acc["angle"][rule] = float(n_correct[trials].sum() / max(n_scored[trials].sum(), 1))
        acc["trial"][rule] = float(correct[trials].mean())
        se["angle"][rule] = ratio_se(n_correct[trials], n_scored[trials])
        se["trial"][rule] = ratio_se(correct[trials], np.ones(trials.sum()))
    return acc, se


def ratio_se(n_correct, n_scored):
    """Standard error of an accuracy Σ n_correct / Σ n_scored over independent trials (the
    trials are the sampling units: `angle`'s points within a trial are not independent), by
    the ratio estimator's variance, sqrt(n/(n-1) Σ (c_i - p s_i)²) / Σ s_i. One right and one
    wrong point are added first, each as a unit of its own (Laplace's rule), so that a rule
    scored 0 or 1 still reports an uncertainty rather than 0: for `trial` (s_i = 1, c_i in
    {0, 1}) the binomial s.e. of (k + 1)/(n + 2), ~1/(n + 2) at the ends; for `angle` at its
    ends ~1 / (scored points), as if the points were independent (such data cannot show how
    they cluster). Away from the ends the two points change the s.e. by well under 1%.
    NaN for no scored trial."""
    c = np.append(np.asarray(n_correct, dtype=np.float64).ravel(), [1.0, 0.0])
    s = np.append(np.asarray(n_scored, dtype=np.float64).ravel(), [1.0, 1.0])
    if s.sum() <= 2:
        return float("nan")
    p = c.sum() / s.sum()
    return float(np.sqrt(c.size / (c.size - 1) * np.sum((c - p * s) ** 2)) / s.sum())


def mean_se(se_by_rule):
    """Standard error of the mean over rules of independently scored rules' accuracies."""
    values = np.asarray(list(se_by_rule.values()), dtype=np.float64)
    return float(np.sqrt(np.sum(values ** 2)) / max(values.size, 1))


def rule_means(acc, se):
    """{mean_angle, mean_trial, mean_angle_se, mean_trial_se}: the means over rules of
    accuracy_and_se_by_rule's two dicts, and their standard errors."""
    out = {}
    for m in ("angle", "trial"):
        out[f"mean_{m}"] = float(np.mean(list(acc[m].values())))
        out[f"mean_{m}_se"] = mean_se(se[m])
    return out
