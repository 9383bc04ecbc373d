"""The training stage (multiple_task.py) end to end on configs/tiny.py: artifacts, learning,
exact resume after a kill, adaptive sampling, stopping, NaN handling, config refusal."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import helper
import mpn
import mpn_tasks
import multiple_task as mt
import net_helpers

REPO = Path(__file__).resolve().parents[1]
TINY = helper.load_config(mt.CONFIG, [str(REPO / "configs" / "tiny.py")], echo=False)


def tiny(root, **overrides):
    """The tiny config in its own runs root; figures only where a test looks at them."""
    return dict(TINY, runs_dir=str(root), **dict(dict(figures=False), **overrides))


def params(paths):
    return net_helpers.load_checkpoint(paths.checkpoint)["state_dict"]


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted tiny run, shared by the tests that compare against it."""
    return mt.main(tiny(tmp_path_factory.mktemp("ref"), figures=True))


# ----------------------------------------------------------------------------------------
# Adaptive sampling on hand-set accuracies (SPEC §4)


def test_sampler_follows_spec_and_floor():
    s = mt.AdaptiveSampler(3, p_min=0.2 / 3)
    np.testing.assert_allclose(s.p, [1 / 3] * 3)
    # g = (1 - acc) / sum = [0, 1/3, 2/3]; S = 0.9 g; p = g, then floored at 1/15 and renormalised
    p = s.update([1.0, 0.5, 0.0])
    np.testing.assert_allclose(s.S, 0.9 * np.array([0, 1 / 3, 2 / 3]))
    np.testing.assert_allclose(p, np.array([1 / 15, 1 / 3, 2 / 3]) / (16 / 15))
    # second update, g = [1/3, 1/3, 1/3]: S = 0.9 (0.9 g1 + g2)
    p = s.update([0.0, 0.0, 0.0])
    S = 0.9 * (0.9 * np.array([0, 1 / 3, 2 / 3]) + 1 / 3)
    np.testing.assert_allclose(s.S, S)
    np.testing.assert_allclose(p, S / S.sum())  # all above the floor: no clipping
    assert p.sum() == pytest.approx(1.0)


def test_sampler_all_perfect_relaxes_to_uniform_without_nan():
    s = mt.AdaptiveSampler(4, p_min=0.05)
    s.update([0.0, 1.0, 1.0, 1.0])
    for _ in range(200):
        p = s.update([1.0] * 4)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p, 0.25, atol=1e-6)


def test_sampler_uniform_mode_never_moves():
    s = mt.AdaptiveSampler(5, p_min=0.04, adaptive=False)
    np.testing.assert_allclose(s.update([1, 0, 0.5, 0.2, 0.9]), 0.2)


def test_sampler_floor_keeps_every_rule_sampled():
    s = mt.AdaptiveSampler(15, p_min=0.2 / 15)
    for _ in range(50):
        p = s.update([0.0] + [1.0] * 14)
    assert p.min() >= 0.2 / 15 / (1 + 0.2)  # floored, then renormalised
    assert p[0] > 0.8 and p.sum() == pytest.approx(1.0)


def test_inclusion_probabilities_match_numpys_draws():
    """Planted structure: skewed weights (one rule near certain, one near never). The exact
    inclusion probabilities must match the frequencies of the draws training makes
    (Generator.choice without replacement) within sampling error, and differ from p."""
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.full(8, 0.5))
    k, n_draws = 3, 40_000
    exact = mt.inclusion_probabilities(p, k)
    counts = np.zeros(8)
    for _ in range(n_draws):
        counts[rng.choice(8, size=k, replace=False, p=p)] += 1
    freq = counts / n_draws
    se = np.sqrt(exact * (1 - exact) / n_draws) + 1e-12
    assert np.max(np.abs(freq - exact) / se) < 4.5  # 8 rules at ~4.5 s.e.: a false alarm ~5e-5
    assert exact.sum() == pytest.approx(k)
    assert np.max(np.abs(exact - k * p)) > 0.05  # the weights alone would mislead


def test_inclusion_probabilities_limits_and_batching():
    """No structure to find: uniform weights give k/n each; k = 1 gives p; k = n gives 1;
    a stack of weight vectors is handled row by row; a zero weight is never drawn."""
    p = np.array([0.5, 0.2, 0.2, 0.1, 0.0])
    np.testing.assert_allclose(mt.inclusion_probabilities(np.full(6, 1 / 6), 2), 2 / 6)
    np.testing.assert_allclose(mt.inclusion_probabilities(p, 1), p)
    np.testing.assert_allclose(mt.inclusion_probabilities(p[:4], 4), 1.0)
    assert mt.inclusion_probabilities(p, 3)[4] == 0.0
    stack = np.stack([p, np.full(5, 0.2)])
    np.testing.assert_allclose(mt.inclusion_probabilities(stack, 2)[0],
                               mt.inclusion_probabilities(p, 2))
    # two rules, k = 2 of 3 by hand: P(a in) = p_a + p_b p_a/(1-p_b) + p_c p_a/(1-p_c)
    q = np.array([0.6, 0.3, 0.1])
    by_hand = q[0] + q[1] * q[0] / (1 - q[1]) + q[2] * q[0] / (1 - q[2])
    assert mt.inclusion_probabilities(q, 2)[0] == pytest.approx(by_hand)
    with pytest.raises(ValueError, match="k must be"):
        mt.inclusion_probabilities(p, 6)


# ----------------------------------------------------------------------------------------
# End to end


def test_tiny_run_writes_every_artifact(reference_run):
    paths, cfg = reference_run["paths"], TINY
    assert reference_run["step"] == cfg["max_steps"] and reference_run["stop_reason"] == "max_steps"
    assert helper.load_json(paths.config)["n_hidden"] == cfg["n_hidden"]
    ckpt = torch.load(paths.checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["step"] == cfg["max_steps"]
    for key in ("optimizer", "scheduler", "sampler", "rng", "torch_rng"):
        assert key in ckpt["extra"]
    net = mpn.model_from_checkpoint(ckpt)
    assert net.n_trainable() > 0
    log = helper.load_json(paths.log)["evals"]
    assert [e["step"] for e in log] == list(range(0, cfg["max_steps"] + 1, cfg["eval_every"]))
    rules = mpn_tasks.RULESETS[cfg["ruleset"]]
    for e in log:
        assert set(e["acc"]["angle"]) == set(rules) == set(e["acc"]["trial"]) == set(e["p"])
        assert {"wall_s", "lr", "loss", "loss_mse", "mean_angle", "mean_trial"} <= set(e)
        assert sum(e["p"].values()) == pytest.approx(1.0)
        for m in ("angle", "trial"):  # each accuracy with its s.e. over validation trials
            assert set(e["acc_se"][m]) == set(rules)
            assert e[f"mean_{m}_se"] == pytest.approx(mpn_tasks.mean_se(e["acc_se"][m]))
            assert 0 < e[f"mean_{m}_se"] < 0.5
    summary = mt.accuracy_summary(log, cfg)
    assert f"angle {log[-1]['mean_angle']:.3f} ± {log[-1]['mean_angle_se']:.3f}" in summary
    assert f"untrained (step 0) angle {log[0]['mean_angle']:.3f}" in summary
    assert set(log[-1]["train"]) >= {"loss", "mse", "weight", "activity"}
    for step in (0, 1, cfg["max_steps"]):
        snap = torch.load(paths.snapshot(step), map_location="cpu", weights_only=True)
        assert snap["step"] == step
    for name in ("training_curves", "training_accuracy_heatmap", "training_sampling",
                 "training_example_trials"):
        assert paths.figure(name).stat().st_size > 1000
    assert reference_run["final"]["step"] == cfg["max_steps"]


def test_load_run_gives_the_trained_net_and_its_twin_the_step0_weights(reference_run):
    paths = reference_run["paths"]
    net, train_cfg, step = mpn.load_run(paths, "cpu", engine="reference")
    assert step == TINY["max_steps"] and train_cfg["n_hidden"] == TINY["n_hidden"]
    assert not net.training and net.mp.engine == "reference"
    snap = mpn.model_from_checkpoint(paths.snapshot(0))
    twin = mpn.untrained_twin(net.double())
    assert next(twin.parameters()).dtype == torch.float64 and not twin.training
    for key, value in snap.state_dict().items():  # seeded initial weights = the step-0 snapshot
        assert torch.equal(value.double(), twin.state_dict()[key]), key
    assert set(mpn.with_untrained(net)) == {"trained", "untrained"}
    assert set(mpn.with_untrained(net, untrained=False)) == {"trained"}


def test_loss_decreases_on_a_fixed_batch():
    cfg = dict(TINY, lr=1e-2)
    meta = mt.derived(cfg)
    net, opt, _ = mt.build(cfg, meta, torch.device("cpu"))
    batch = mpn_tasks.random_batch("fdgo", 16, np.random.default_rng(0))
    losses = [mt.train_step(net, opt, batch, cfg, "cpu")["loss"] for _ in range(50)]
    assert losses[-1] < 0.5 * losses[0]


def test_completed_run_is_not_retrained(reference_run, capsys):
    paths = reference_run["paths"]
    before = paths.checkpoint.stat().st_mtime_ns
    again = mt.main(tiny(paths.dir.parent))
    assert again["step"] == TINY["max_steps"]
    assert paths.checkpoint.stat().st_mtime_ns == before
    assert "resuming" in capsys.readouterr().out


def test_stops_when_every_rule_reaches_target(tmp_path):
    out = mt.main(tiny(tmp_path, target_acc=0.0, patience_evals=2))
    # evaluations at steps 0 and 10 both satisfy acc >= 0
    assert out["stop_reason"] == "target_acc" and out["step"] == TINY["eval_every"]
    assert net_helpers.load_checkpoint(out["paths"].checkpoint)["step"] == TINY["eval_every"]


# ----------------------------------------------------------------------------------------
# Resume


def test_resume_after_a_crash_is_bit_identical(reference_run, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_step = mt.train_step

    def crashing_step(*args):
        calls["n"] += 1
        if calls["n"] == 25:  # after the checkpoint at step 20, before the one at 30
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(mt, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        mt.main(tiny(tmp_path))
    monkeypatch.undo()
    assert net_helpers.load_checkpoint(reference_run["paths"].checkpoint)["step"] == 30
    out = mt.main(tiny(tmp_path, resume=True))
    assert out["step"] == TINY["max_steps"]
    assert_same_params(params(out["paths"]), params(reference_run["paths"]))
    ref_log = helper.load_json(reference_run["paths"].log)["evals"]
    log = helper.load_json(out["paths"].log)["evals"]
    assert [e["loss"] for e in log] == [e["loss"] for e in ref_log]
    assert [e["p"] for e in log] == [e["p"] for e in ref_log]


def test_extending_max_steps_continues_exactly(reference_run, tmp_path):
    mt.main(tiny(tmp_path, max_steps=20))
    out = mt.main(tiny(tmp_path, max_steps=30))
    assert_same_params(params(out["paths"]), params(reference_run["paths"]))


def test_resuming_on_another_engine_equals_up_to_float_rounding(tmp_path):
    """RESUMABLE_KEYS lets the engine change on resume; the result then matches an
    uninterrupted run up to float rounding (the engines order their sums differently)."""
    small = dict(ruleset="go", max_steps=6, eval_every=3, ckpt_every=3, snapshot_steps=[0],
                 n_valid=4)
    straight = mt.main(tiny(tmp_path / "a", engine="reference", **small))
    mt.main(tiny(tmp_path / "b", engine="reference", **dict(small, max_steps=3)))
    resumed = mt.main(tiny(tmp_path / "b", engine="fast", **small))
    a, b = params(straight["paths"]), params(resumed["paths"])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    assert "engine" in mt.RESUMABLE_KEYS


def test_sigkill_then_resume_is_bit_identical(reference_run, tmp_path):
    """A real process killed with SIGKILL once a mid-run checkpoint exists."""
    cfg_file = REPO / "configs" / "tiny.py"
    env = dict(os.environ, MPN_RUNS_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, str(REPO / "multiple_task.py"), str(cfg_file),
                             "--ckpt_every=5", "--figures=False"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = helper.run_paths(reference_run["paths"].name, tmp_path).checkpoint
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 5:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 5 <= killed_at < TINY["max_steps"]
    out = mt.main(tiny(tmp_path, ckpt_every=5, resume=True))
    assert_same_params(params(out["paths"]), params(reference_run["paths"]))
    assert list(out["paths"].dir.rglob(".*.tmp")) == []  # the dead writer's litter is gone


# ----------------------------------------------------------------------------------------
# Failures a user can cause


def test_changed_config_is_refused(reference_run):
    root = reference_run["paths"].dir.parent
    with pytest.raises(helper.StageError, match=r"lr: 0.001 -> 0.002.*--run_tag"):
        mt.main(tiny(root, lr=2e-3))
    with pytest.raises(helper.StageError, match="already holds a trained run"):
        mt.main(tiny(root, resume=False))


def test_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(helper.StageError, match="does not exist"):
        mt.main(tiny(tmp_path, resume=True))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = net_helpers.compute_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        total, parts = real_loss(*args, **kwargs)
        return (total * float("nan"), parts) if calls["n"] == 15 else (total, parts)

    monkeypatch.setattr(net_helpers, "compute_loss", poisoned)
    with pytest.raises(helper.StageError, match=r"diverged at step 14 .*checkpoint \(step 10\)"):
        mt.main(tiny(tmp_path))
    paths = helper.run_paths(tiny(tmp_path))
    ckpt = net_helpers.load_checkpoint(paths.checkpoint)
    assert ckpt["step"] == 10
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


# ----------------------------------------------------------------------------------------
# Options of the CPU preset's recipe: cosine lr schedule, several rules per batch


def test_cosine_lr_follows_the_half_cosine_and_stays_at_its_floor():
    cfg = dict(TINY, lr=2e-3, lr_min=1e-5, lr_decay_steps=100)
    expected = [1e-5 + (2e-3 - 1e-5) * 0.5 * (1 + np.cos(np.pi * s / 100)) for s in (0, 25, 50, 100)]
    assert [mt.cosine_lr(cfg, s) for s in (0, 25, 50, 100)] == pytest.approx(expected, rel=1e-12)
    assert mt.cosine_lr(cfg, 0) == 2e-3 and mt.cosine_lr(cfg, 50) == pytest.approx(1.005e-3)
    assert mt.cosine_lr(cfg, 100) == mt.cosine_lr(cfg, 10_000) == pytest.approx(1e-5)


def test_cosine_run_logs_its_lr_and_extends_exactly(tmp_path):
    cfg = dict(lr_schedule="cosine", lr_decay_steps=40)
    whole = mt.main(tiny(tmp_path / "whole", **cfg))
    log = helper.load_json(whole["paths"].log)["evals"]
    # the lr logged at step s was set before step s (the s-th optimiser step used cosine(s-1))
    for e in log[1:]:
        assert e["lr"] == pytest.approx(mt.cosine_lr(dict(TINY, **cfg), e["step"] - 1), rel=1e-12)
    mt.main(tiny(tmp_path / "parts", max_steps=20, **cfg))
    parts = mt.main(tiny(tmp_path / "parts", **cfg))
    assert_same_params(params(parts["paths"]), params(whole["paths"]))


def test_rules_per_batch_draws_distinct_rules_in_equal_shares():
    cfg = dict(TINY, ruleset="everything", batch_size=12, rules_per_batch=3)
    rules = mt.derived(cfg)["rules"]
    p = np.full(len(rules), 1 / len(rules))
    batch = mt.training_batch(cfg, rules, p, np.random.default_rng(3))
    counts = np.unique(batch.rule, return_counts=True)[1]
    assert len(counts) == 3 and set(counts) == {4}
    assert batch.inputs.shape[1] == batch.length.max()  # padded to the longest trial only
    # one rule per batch (SPEC §4) draws exactly what random_batch draws
    one = mt.training_batch(dict(cfg, rules_per_batch=1), rules, p, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    ref = mpn_tasks.random_batch(rules[rng.choice(len(rules), p=p)], 12, rng)
    assert np.array_equal(one.inputs, ref.inputs) and np.array_equal(one.rule, ref.rule)
    with pytest.raises(helper.StageError, match="must divide"):
        mt.derived(dict(cfg, rules_per_batch=5))


# ----------------------------------------------------------------------------------------
# Kernel threads chosen from the load (mpn_cpp.AdaptiveThreads)


class FakeClock:
    """(wall, cpu) readings: each stretch lasts 1 s of wall time and uses `cores` CPU s."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __call__(self):
        return self.wall, self.cpu

    def run(self, cores):
        self.wall, self.cpu = self.wall + 1.0, self.cpu + cores


def test_adaptive_threads_drop_to_one_under_load_and_probe_with_backoff():
    import mpn_cpp
    clock = FakeClock()
    chooser = mpn_cpp.AdaptiveThreads(most=2, probe_every=3, clock=clock)

    def stretch(cores_on_two, cores_on_one=1.0):
        threads = chooser.threads
        clock.run(cores_on_two if threads == 2 else cores_on_one)
        chooser.update()
        return threads

    assert [stretch(1.4) for _ in range(5)] == [2] * 5  # idle: the second core is used
    # busy: two threads got 0.9 cores -> one thread; probes after 3, then 6, 12, 24 stretches
    ran = [stretch(0.9) for _ in range(1 + 3 + 1 + 6 + 1 + 12 + 1 + 24 + 1 + 24 + 1)]
    probes = [i for i, t in enumerate(ran) if t == 2]
    assert probes == [0, 4, 11, 24, 49, 74]  # the wait doubles up to 8 x probe_every
    # the machine frees up: the next probe succeeds and two threads stay
    while chooser.threads == 1:
        stretch(0.9)
    assert [stretch(1.4) for _ in range(4)] == [2] * 4
    fixed = mpn_cpp.AdaptiveThreads(most=2, adaptive=False, clock=clock)
    for _ in range(3):
        clock.run(0.5)
        assert fixed.update() == (2, 0.5) and fixed.threads == 2


def test_kernel_threads_switching_mid_run_changes_nothing(tmp_path, monkeypatch):
    """A run whose kernel alternates between 2 threads and 1 every evaluation (a chooser
    that always sees too few cores and probes at once) trains the same weights as a run
    on one thread, and logs the threads each stretch ran on."""
    import mpn_cpp
    if mpn_cpp.kernel() is None:
        pytest.skip("the compiled kernel is not available")
    one = mt.main(tiny(tmp_path / "one", kernel_threads=1))
    monkeypatch.setattr(mpn_cpp.AdaptiveThreads, "MIN_CORES", 100.0)
    monkeypatch.setattr(mt, "kernel_threads",
                        lambda cfg: mpn_cpp.AdaptiveThreads(most=2, probe_every=1))
    switching = mt.main(tiny(tmp_path / "switching", kernel_threads=0))
    assert_same_params(params(switching["paths"]), params(one["paths"]))
    ran = [e["kernel_threads"] for e in switching["log"] if "kernel_threads" in e]
    assert ran == [2, 1, 2]  # 3 stretches of 10 steps


def test_prefetched_batches_train_the_same_run_across_a_mid_stretch_resume(tmp_path,
                                                                           monkeypatch):
    """Batches drawn by the forked feed (prefetch) train the same weights and log as batches
    drawn in the loop, also when the run is interrupted between evaluations and resumed from
    a checkpoint taken mid-stretch (the child had drawn ahead of it)."""
    import batch_feed
    small = dict(eval_every=7, ckpt_every=4)  # stretches 1-7, 8-14, ...; checkpoint at 20
    inline = mt.main(tiny(tmp_path / "inline", prefetch=False, **small))
    forked, real_feed, real_step, calls = [], batch_feed.BatchFeed, mt.train_step, [0]

    def feed(*args, **kwargs):
        made = real_feed(*args, **kwargs)
        forked.append(made.forked)
        return made

    def crashing_step(*args):
        calls[0] += 1
        if calls[0] == 23:  # after the checkpoint at step 20, inside the stretch 22-28
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(batch_feed, "BatchFeed", feed)
    monkeypatch.setattr(mt, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        mt.main(tiny(tmp_path / "forked", **small))
    monkeypatch.setattr(mt, "train_step", real_step)
    out = mt.main(tiny(tmp_path / "forked", resume=True, **small))
    assert forked == [batch_feed.forked_jobs.fork_safe()] * 2
    assert_same_params(params(out["paths"]), params(inline["paths"]))
    log, ref = (helper.load_json(r["paths"].log)["evals"] for r in (out, inline))
    assert [(e["step"], e["loss"], e["p"]) for e in log] == \
        [(e["step"], e["loss"], e["p"]) for e in ref]
