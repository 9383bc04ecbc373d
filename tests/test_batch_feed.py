"""batch_feed.BatchFeed: the forked child draws the batches the loop would draw itself, in
order, leaves the generator as drawing them here would, and losing the child loses nothing."""
import functools
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import batch_feed
import forked_jobs
import helper
import multiple_task as mt

pytestmark = pytest.mark.skipif(not forked_jobs.fork_safe(), reason="no safe fork here")


def draw(p, rng, fail_at=None):
    """A stand-in for multiple_task.training_batch: every field from rng, scaled by p, with
    a shape that varies from batch to batch (as the longest trial does)."""
    T = int(rng.integers(3, 9))
    if fail_at is not None and T == fail_at:
        raise ValueError(f"no batch of length {T}")
    return batch_feed.Arrays(
        inputs=(rng.standard_normal((4, T, 5)) * p[0]).astype(np.float32),
        targets=rng.standard_normal((4, T, 3)).astype(np.float32),
        mask=(rng.random((4, T, 3)) < p[1]).astype(np.float32),
        rule=rng.choice(len(p), size=4, p=p),
        length=rng.integers(1, T + 1, size=4))


PLANS = [([0.5, 0.5], 3), ([0.9, 0.1], 1), ([0.2, 0.8], 5)]


def inline_batches(plans, seed=0):
    """(batch, generator state after it) for every planned step, drawn here."""
    rng, out = np.random.default_rng(seed), []
    for p, n in plans:
        for _ in range(n):
            out.append((draw(np.array(p), rng), rng.bit_generator.state))
    return out


def assert_same_batch(a, b):
    for name in batch_feed.FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name


def test_forked_feed_gives_the_loops_batches_and_generator_states():
    rng = np.random.default_rng(0)
    expected = iter(inline_batches(PLANS))
    with batch_feed.BatchFeed(draw, rng) as feed:
        assert feed.forked and feed.pid is not None
        for p, n in PLANS:
            feed.plan(p, n)
            for _ in range(n):
                batch, state = next(expected)
                got = feed.next()
                assert_same_batch(got, batch)
                assert all(a.flags.writeable and a.flags.aligned for a in got)
                assert rng.bit_generator.state == state
        pid = feed.pid
    with pytest.raises(ChildProcessError):  # closed: the child is stopped and reaped
        os.waitpid(pid, os.WNOHANG)


def test_real_training_batches_cross_the_pipe_unchanged():
    cfg = helper.load_config(mt.CONFIG, [str(Path(__file__).resolve().parents[1] / "configs" / "cpu_quick.py")], echo=False)
    rules = mt.derived(cfg)["rules"]
    p = np.linspace(1, 2, len(rules))
    p /= p.sum()
    here, there = np.random.default_rng(3), np.random.default_rng(3)
    with batch_feed.BatchFeed(functools.partial(mt.training_batch, cfg, rules), there) as feed:
        feed.plan(p, 3)
        for _ in range(3):
            assert_same_batch(feed.next(), mt.training_batch(cfg, rules, p, here))
    assert there.bit_generator.state == here.bit_generator.state


def test_a_killed_child_costs_nothing_but_a_warning():
    rng = np.random.default_rng(0)
    expected = inline_batches(PLANS)
    got = []
    with batch_feed.BatchFeed(draw, rng) as feed:
        feed.plan(*PLANS[0])
        got.append(feed.next())
        os.kill(feed.pid, signal.SIGKILL)  # mid-plan; what it already sent is still read
        with pytest.warns(RuntimeWarning, match="batch process stopped"):
            got += [feed.next() for _ in range(PLANS[0][1] - 1)]
            for p, n in PLANS[1:]:
                feed.plan(p, n)
                got += [feed.next() for _ in range(n)]
        assert not feed.forked
    for g, (batch, _) in zip(got, expected, strict=True):
        assert_same_batch(g, batch)
    assert rng.bit_generator.state == expected[-1][1]


def test_a_draw_that_fails_in_the_child_fails_here_the_same_way():
    states = inline_batches([([0.5, 0.5], 40)])
    lengths = [b.inputs.shape[1] for b, _ in states]
    fail_at = lengths[4]  # the 5th batch's length, first reached at batch k <= 4
    k = lengths.index(fail_at)
    rng = np.random.default_rng(0)
    with batch_feed.BatchFeed(functools.partial(draw, fail_at=fail_at), rng) as feed:
        feed.plan([0.5, 0.5], 40)
        for j in range(k):
            assert_same_batch(feed.next(), states[j][0])
        with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="no batch of"):
            feed.next()


def test_closing_mid_plan_does_not_wait_for_the_rest():
    with batch_feed.BatchFeed(draw, np.random.default_rng(0)) as feed:
        feed.plan([0.5, 0.5], 10_000)  # far more than the pipe holds
        feed.next()
        pid = feed.pid
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def test_plans_must_be_used_up_in_order():
    with batch_feed.BatchFeed(draw, np.random.default_rng(0), forked=False) as feed:
        assert not feed.forked
        with pytest.raises(RuntimeError, match="no batch is planned"):
            feed.next()
        feed.plan([0.5, 0.5], 2)
        feed.next()
        with pytest.raises(RuntimeError, match="still to be taken"):
            feed.plan([0.5, 0.5], 1)


def test_inline_feed_draws_the_same_sequence():
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with batch_feed.BatchFeed(draw, rng, forked=False) as feed:
            for (p, n), i in zip(PLANS, np.cumsum([0] + [n for _, n in PLANS])):
                feed.plan(p, n)
                for j in range(n):
                    assert_same_batch(feed.next(), inline_batches(PLANS)[i + j][0])


def killed_trainer(tmp_path, die_with_parent=True):
    """Starts a trainer-like process that holds a run folder's lock and whose batch process
    is busy drawing (30 s), kills it with SIGKILL, and returns the batch process's PID.
    die_with_parent=False: as where prctl is unavailable."""
    script = f"""
import sys, time
import numpy as np
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import batch_feed, forked_jobs, run_folder
if not {die_with_parent}:
    forked_jobs.die_with_parent = lambda parent: None
with run_folder.run_lock({str(tmp_path)!r}):
    feed = batch_feed.BatchFeed(lambda p, rng: time.sleep(30), np.random.default_rng(0))
    feed.plan([1.0], 1)
    print(feed.pid, flush=True)
    time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    child = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    return child


def test_a_killed_trainer_leaves_no_lock_held_by_its_batch_process(tmp_path, still_running):
    """The child inherits the run folder's lock descriptor when it is forked; it closes its
    copy (run_folder), so after the trainer is killed with SIGKILL the folder is free at
    once, even while the orphaned child is still busy drawing."""
    import run_folder
    child = killed_trainer(tmp_path, die_with_parent=False)
    assert still_running(child)  # the orphaned child is still drawing
    with run_folder.run_lock(tmp_path):  # and the folder is free
        pass


def test_the_batch_process_dies_with_its_trainer(tmp_path, still_running):
    child = killed_trainer(tmp_path)
    assert not still_running(child, wait_s=10), "the batch process outlived its killed trainer"
