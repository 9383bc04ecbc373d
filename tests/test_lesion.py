"""The lesion stage (lesion.py, lesion_engine.py) and its figures (lesion_plot.py): batched
conditions against one-at-a-time evaluation, failure kinds, random controls, limiting cases of
every perturbation, the significance rule on planted and on structureless networks, and both
scripts end to end on a tiny trained run with cluster files written here."""
import copy
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import forked_jobs
import helper
import lesion
import lesion_engine
import lesion_plot
import mpn
import mpn_tasks
import multiple_task
import net_helpers

REPO = Path(__file__).resolve().parents[1]
RULES = ["fdgo", "delaygo", "dmsnogo"]  # a go rule, a memory rule, a no-go rule
N_HIDDEN, N_TEST = 12, 8


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return mpn.build_model("dmpn", n_hidden=N_HIDDEN, seed=3).eval()


@pytest.fixture(scope="module")
def tests():
    """One short aligned batch per rule (the engine takes any list of batches)."""
    rng = np.random.default_rng(5)
    return [mpn_tasks.aligned_batch(rule, N_TEST, rng, quantile=0.0) for rule in RULES]


def table_for(n_hidden=N_HIDDEN, n_pre=N_HIDDEN):
    return lesion_engine.ConditionTable({"in_units": n_pre, "hid_units": n_hidden,
                                  "w_zero": n_hidden * n_pre, "m_freeze": n_hidden * n_pre})


def mixed_conditions(rng):
    """Every kind of condition, with several of each so that chunks hold many."""
    n_syn = N_HIDDEN * N_HIDDEN
    t = table_for()
    specs = [{"in_units": rng.choice(N_HIDDEN, 3, replace=False)} for _ in range(3)]
    specs += [{"hid_units": rng.choice(N_HIDDEN, 4, replace=False)} for _ in range(3)]
    specs += [{"w_zero": rng.choice(n_syn, 40, replace=False)} for _ in range(2)]
    specs += [{"m_freeze": rng.choice(n_syn, 60, replace=False)} for _ in range(2)]
    specs += [{"w_noise": {"seed": [1, s], "sigma": 0.2}} for s in range(2)]
    specs += [{"in_units": [0, 1], "hid_units": [2, 3, 4]},
              {"w_zero": np.arange(30), "m_freeze": np.arange(20, 80)}]
    ids = [t.add(s) for s in specs]
    return t, ids


def serial_accuracy(net, tests, cond):
    """One condition on its own: a shared (not stacked) perturbation, the plain evaluate,
    and the failure kinds counted from its outputs."""
    pert = lesion_engine.condition_perturbation(cond, N_HIDDEN, N_HIDDEN)
    out = {name: [] for name in lesion_engine.SCORES}
    for rule, batch in zip(RULES, tests):
        res = net_helpers.evaluate(net, batch, perturbation=pert)
        for m in ("angle", "trial"):
            out[m].append(res["acc"][m][rule])
        kind = mpn_tasks.failure_kind(res["outputs"], batch)
        for code, name in enumerate(mpn_tasks.FAILURE_KINDS, start=1):
            out[name].append(np.mean(kind == code))
    return out


# ----------------------------------------------------------------------------------------
# Batched evaluation


def test_batched_equals_one_at_a_time_and_weights_untouched(net, tests):
    table, ids = mixed_conditions(np.random.default_rng(0))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    big = lesion_engine.evaluate_conditions(net, tests, table.conditions, memory_mb=64)
    small = lesion_engine.evaluate_conditions(net, tests, table.conditions, memory_mb=0.05)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for m in ("angle", "trial"):
        np.testing.assert_array_equal(big[m], small[m])
    for i, cond in enumerate(table.conditions):
        ser = serial_accuracy(net, tests, cond)
        for m in lesion_engine.SCORES:
            np.testing.assert_allclose(big[m][i], ser[m], atol=1e-6, err_msg=f"{m} {cond}")
    assert np.ptp(big["angle"]) > 0  # the conditions really differ
    failures = sum(big[k] for k in mpn_tasks.FAILURE_KINDS)
    np.testing.assert_allclose(failures, 1 - big["trial"], atol=1e-6)  # a partition


@pytest.mark.parametrize("options", [{}, {"recurrent": True}])
def test_worker_processes_give_the_same_scores_as_one(tests, options):
    """The jobs shared among 3 forked processes (rows shared, or conditions stacked for a
    recurrent net) give bit-identical scores to one process, with small jobs (memory_mb)
    so that every process gets several."""
    net = mpn.build_model("dmpn", n_hidden=N_HIDDEN, seed=6, **options).eval()
    conditions = conditions_for(net, np.random.default_rng(4))
    one = lesion_engine.evaluate_conditions(net, tests, conditions, memory_mb=0.05)
    three = lesion_engine.evaluate_conditions(net, tests, conditions, memory_mb=0.05,
                                              processes=3)
    for name in lesion_engine.SCORES:
        assert not np.isnan(three[name]).any(), name
        np.testing.assert_array_equal(three[name], one[name], err_msg=name)


def square_jobs(n, fail_in_child=False):
    """n jobs writing j² and the pid that ran them into shared memory; with fail_in_child a
    job run outside this process raises."""
    out, pids = forked_jobs.shared_array(n, np.int64), forked_jobs.shared_array(n, np.int64)
    out.fill(-1)
    parent = os.getpid()

    def job(j):
        if fail_in_child and os.getpid() != parent:
            raise RuntimeError("planted failure")
        time.sleep(0.02)  # long enough that a child claims jobs before the parent is done
        out[j], pids[j] = j * j, os.getpid()

    return [(1, functools.partial(job, j)) for j in range(n)], out, pids


def test_run_jobs_runs_every_job_once_across_processes():
    jobs, out, pids = square_jobs(30)
    forked_jobs.run_jobs(jobs, processes=2)
    np.testing.assert_array_equal(out, np.arange(30) ** 2)
    assert len(set(pids.tolist())) == 2  # the child took a share
    assert os.getpid() in pids


def test_jobs_of_a_failed_worker_process_run_in_the_parent(capfd):
    """A child that fails on its first job exits; the parent runs what it left and says so."""
    jobs, out, pids = square_jobs(12, fail_in_child=True)
    forked_jobs.run_jobs(jobs, processes=2)
    np.testing.assert_array_equal(out, np.arange(12) ** 2)
    assert set(pids.tolist()) == {os.getpid()}
    captured = capfd.readouterr()  # the child writes to the file descriptor
    assert "1 worker process(es) stopped before finishing; running the 1 unfinished" \
        in captured.out
    assert "planted failure" in captured.err


def test_a_killed_worker_process_loses_no_job():
    """A child killed outright (SIGKILL, no clean-up) mid-job: its job runs in the parent."""
    out = forked_jobs.shared_array(12, np.int64)
    out.fill(-1)
    parent = os.getpid()

    def job(j):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.02)
        out[j] = j * j

    forked_jobs.run_jobs([(1, functools.partial(job, j)) for j in range(12)], processes=2)
    np.testing.assert_array_equal(out, np.arange(12) ** 2)


def test_job_counter_hands_out_each_job_once_and_survives_a_dead_holder():
    counter = forked_jobs.JobCounter(3, timeout=0.5)
    assert [counter() for _ in range(5)] == [0, 1, 2, None, None]
    counter = forked_jobs.JobCounter(3, timeout=0.5)
    pid = os.fork()
    if pid == 0:  # a child killed while it holds the lock
        counter.lock.acquire()
        os._exit(0)
    os.waitpid(pid, 0)
    started = time.monotonic()
    assert counter() is None  # not a wait forever
    assert time.monotonic() - started < 5


def test_a_job_failing_in_the_parent_raises_and_stops_the_children():
    """Every job fails in the parent and takes 0.05 s in the child: the parent's first job
    raises at once, whichever jobs the child claimed first (which process claims job 0 is a
    race: the child sometimes wins it on a busy machine)."""
    parent = os.getpid()

    def job():
        if os.getpid() == parent:
            raise ValueError("parent job failed")
        time.sleep(0.05)

    jobs = [(1, job) for _ in range(41)]
    started = time.monotonic()
    with pytest.raises(ValueError, match="parent job failed"):
        forked_jobs.run_jobs(jobs, processes=2)
    assert time.monotonic() - started < 1.5  # the child was stopped, not waited for (2 s)
    with pytest.raises(ChildProcessError):  # and reaped: no child of ours is left
        os.waitpid(-1, os.WNOHANG)


def killed_stage(tmp_path, die_with_parent=True):
    """Starts a stage-like process that holds a run folder's lock and runs 2 slow jobs in 2
    processes, kills it with SIGKILL once both jobs started, and returns (run folder, PID of
    the orphaned worker). die_with_parent=False: as where prctl is unavailable."""
    run, pids = tmp_path / "run", tmp_path / "pids"
    run.mkdir()
    script = f"""
import os, sys, time
sys.path.insert(0, {str(REPO)!r})
import forked_jobs, run_folder
if not {die_with_parent}:
    forked_jobs.die_with_parent = lambda parent: None

def job():
    with open({str(pids)!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    time.sleep(30)

with run_folder.run_lock({str(run)!r}):
    forked_jobs.run_jobs([(1, job), (1, job)], processes=2)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and len(pid_lines(pids)) < 2:
        time.sleep(0.05)
    workers = [p for p in pid_lines(pids) if p != proc.pid]
    proc.kill()
    proc.wait()
    assert len(workers) == 1, pid_lines(pids)
    return run, workers[0]


def pid_lines(path):
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_workers_of_a_killed_stage_do_not_keep_its_run_folder_locked(tmp_path, still_running):
    """Forked workers inherit the run folder's lock descriptor; they close their copies
    (run_folder), so when the stage is killed with SIGKILL the folder is free at once, even
    while an orphaned worker is still in a job."""
    import run_folder
    run, worker = killed_stage(tmp_path, die_with_parent=False)
    assert still_running(worker)  # the orphaned worker is still in its job
    with run_folder.run_lock(run):  # and the folder is free
        pass


def test_workers_of_a_killed_stage_stop_with_it(tmp_path, still_running):
    """A worker does not run on for nobody after its stage is killed (die_with_parent)."""
    _, worker = killed_stage(tmp_path)
    assert not still_running(worker, wait_s=10), "the worker outlived its killed stage"


def test_stacked_outputs_equal_single_condition_outputs(net, tests):
    table, ids = mixed_conditions(np.random.default_rng(1))
    conds = [table.conditions[i] for i in ids]
    batch = net_helpers.batch_to_torch(tests[1])
    x = batch["inputs"]
    perts = [lesion_engine.condition_perturbation(c, N_HIDDEN, N_HIDDEN) for c in conds]
    stacked = net_helpers.Perturbation.stack(perts, x.shape[0])
    with torch.no_grad():
        y_all = net(x.repeat(len(conds), 1, 1), perturbation=stacked)["y"]
        for k, p in enumerate(perts):
            y_one = net(x, perturbation=p)["y"]
            torch.testing.assert_close(y_all[k * x.shape[0]:(k + 1) * x.shape[0]], y_one,
                                       rtol=1e-5, atol=1e-6)


def test_no_lesion_equals_the_unperturbed_network(net):
    """Condition 0 on a test set of several parts per rule, merged, equals one plain
    evaluate of each rule's trials."""
    cfg = dict(lesion.CONFIG, trials_per_rule=24, epoch_quantile_range=[0.0, 0.5])
    test = lesion.make_test_set(RULES, cfg, run_seed=5, io_mode="low_dim", sigma_x=0.05)
    table = table_for()
    parts = lesion_engine.evaluate_conditions(net, test["parts"], table.conditions, memory_mb=64)
    acc = lesion.merge_parts(parts, test, len(RULES))
    base = lesion.baseline_accuracy(net, test, RULES)
    for m in ("angle", "trial"):
        np.testing.assert_allclose(acc[m][0], base[m], atol=1e-6)
    # ratio_se with s_i = 1: the binomial s.e. of (k + 1)/(n + 2) over n + 1 degrees
    p = (base["trial"] * 24 + 1) / 26
    np.testing.assert_allclose(base["se_trial"], np.sqrt(p * (1 - p) / 25))
    assert (base["se_angle"] > 0).all()


def test_every_hidden_unit_lesioned_fails_every_go_trial(net, tests):
    table = table_for()
    cid = table.add({"hid_units": np.arange(N_HIDDEN)})
    acc = lesion_engine.evaluate_conditions(net, tests, table.conditions, memory_mb=64)
    go_rules = [r for r, rule in enumerate(RULES) if rule in mpn_tasks.RULESETS["go"]]
    assert go_rules
    assert np.all(acc["trial"][cid, go_rules] == 0)
    y = net(net_helpers.batch_to_torch(tests[0])["inputs"], perturbation=
            lesion_engine.condition_perturbation(table.conditions[cid], N_HIDDEN, N_HIDDEN))["y"]
    assert torch.count_nonzero(y) == 0  # silent network: no output at all


# ----------------------------------------------------------------------------------------
# Sharing work between conditions (lesion.evaluate_by_rows)


def conditions_for(net, rng):
    """Conditions of every kind for a network of any shape, several sharing an input set."""
    n_hidden, n_pre = lesion_engine.net_shapes(net)
    n_syn = n_hidden * n_pre
    t = table_for(n_hidden, n_pre)
    shared_in = rng.choice(n_pre, 2, replace=False)
    specs = [{"in_units": shared_in}, {"in_units": shared_in, "hid_units": [0, 5]},
             {"in_units": shared_in, "w_zero": rng.choice(n_syn, 20, replace=False)},
             {"in_units": rng.choice(n_pre, 3, replace=False)},
             {"hid_units": rng.choice(n_hidden, 4, replace=False)},
             {"hid_units": np.arange(n_hidden)},
             {"w_zero": np.arange(n_pre, 3 * n_pre)},  # exactly rows 1 and 2
             {"w_zero": rng.choice(n_syn, 30, replace=False), "hid_units": [1, 2, 3]},
             {"m_freeze": rng.choice(n_syn, 40, replace=False)},
             {"m_freeze": np.arange(n_syn)},
             {"w_noise": {"seed": [2, 0], "sigma": 0.3}},
             {"w_noise": {"seed": [2, 1], "sigma": 0.3}, "hid_units": [4]}]
    for s in specs:
        t.add(s)
    return t.conditions


@pytest.mark.parametrize("options", [
    {}, {"mp_type": "add"}, {"eta_type": "post_vector", "lam_type": "matrix"},
    {"eta_type": "matrix", "lam_type": "pre_vector", "m_bounds": None},
    {"input_layer": False}])
def test_shared_rows_give_every_condition_its_own_forward_pass(tests, options):
    """A condition's outputs from its input set's base run, silenced units and a virtual
    layer of the rows it touches equal the full forward pass with its perturbation."""
    net = mpn.build_model("dmpn", n_hidden=N_HIDDEN, seed=4, **options).eval()
    with torch.no_grad():  # distinct per-row coefficients, so a wrong row would show
        gen = torch.Generator().manual_seed(0)
        for p in (net.mp.eta, net.mp.lam):
            p.copy_(p * (0.9 + 0.1 * torch.rand(p.shape, generator=gen)))
    assert net.rows_independent()
    n_hidden, n_pre = lesion_engine.net_shapes(net)
    conditions = conditions_for(net, np.random.default_rng(2))
    inputs = net_helpers.batch_to_torch(tests[1])["inputs"]
    tree = lesion_engine.PrefixTree(tests[1].inputs)
    assert tree.n_nodes < 0.8 * inputs.shape[0] * inputs.shape[1]  # trials share prefixes
    with torch.no_grad():
        x_nodes = net.presynaptic(torch.from_numpy(tree.node_inputs))

        def outputs(conds):
            x, h = lesion_engine.base_runs(net, tree, x_nodes,
                                           lesion_engine.input_masks(net, conds[:1]))
            plan = lesion_engine.readout_plan(
                net, conds, [lesion_engine.touched_rows(c, n_pre, n_hidden) for c in conds])
            return lesion_engine._chunk_outputs(net, tree, x[0], h[0], plan)

        for cond in conditions:
            (y,) = outputs([cond])
            pert = lesion_engine.condition_perturbation(cond, n_pre, n_hidden)
            torch.testing.assert_close(y, net(inputs, perturbation=pert)["y"],
                                       rtol=1e-5, atol=1e-6, msg=str(cond.keys()))
        # and all of them in one chunk, sharing the intact network's base run
        plain = [c for c in conditions if "in_units" not in c]
        ys = outputs(plain)
        for cond, y in zip(plain, ys):
            pert = lesion_engine.condition_perturbation(cond, n_pre, n_hidden)
            torch.testing.assert_close(y, net(inputs, perturbation=pert)["y"],
                                       rtol=1e-5, atol=1e-6)


def test_prefix_tree_nodes_are_the_distinct_input_prefixes():
    """Two trial-steps share a node exactly when the two trials' inputs agree up to that
    step (a plain dictionary of prefixes), each node carries its input, and every segment's
    prefixes continue prefixes of the one before."""
    n, T = 9, 12
    inputs = np.zeros((n, T, 2), np.float32)
    inputs[:, 3:, 0] = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])[:, None]  # 3 groups from step 3
    inputs[:, 7:, 1] = np.array([0, 0, 0, 1, 1, 1, 0, 0, 1])[:, None]  # split from step 7
    inputs[8, 10, 1] = 5.0  # trial 8 leaves trial 5 at step 10
    inputs[0, 0, 0] = -0.0  # equal to 0.0 as a number, but not bit for bit: its own prefix
    tree = lesion_engine.PrefixTree(inputs)
    plain = {}
    for i in range(n):
        for t in range(T):
            node = plain.setdefault(inputs[i, :t + 1].tobytes(), tree.node_of[i, t])
            assert tree.node_of[i, t] == node, (i, t)
            np.testing.assert_array_equal(tree.node_inputs[node], inputs[i, t])
    assert tree.n_nodes == len(plain) == len(np.unique(tree.node_of))
    assert [s[0] for s in tree.segments] == [0, 3, 7, 10]
    for (t0, t1, first, n_s, parent), prev in zip(tree.segments[1:], tree.segments):
        for c in range(n_s):  # the trials of prefix c were in prefix parent[c] before t0
            trials = np.flatnonzero(tree.node_of[:, t0] == first + c * (t1 - t0))
            p_node = prev[2] + parent[c] * (prev[1] - prev[0]) + (prev[1] - prev[0] - 1)
            assert np.all(tree.node_of[trials, t0 - 1] == p_node)


def test_touched_rows_are_the_rows_a_condition_changes():
    n_hidden, n_pre = 5, 3
    assert lesion_engine.touched_rows({}, n_pre, n_hidden).size == 0
    cond = {"w_zero": lesion_engine.pack_indices([0, 1, 7], n_hidden * n_pre),
            "m_freeze": lesion_engine.pack_indices([14], n_hidden * n_pre)}
    np.testing.assert_array_equal(lesion_engine.touched_rows(cond, n_pre, n_hidden), [0, 2, 4])
    cond["hid_units"] = lesion_engine.pack_indices([2, 3], n_hidden)
    np.testing.assert_array_equal(lesion_engine.touched_rows(cond, n_pre, n_hidden), [0, 4])
    noisy = {"w_noise": {"seed": [1], "sigma": 0.1}}
    np.testing.assert_array_equal(lesion_engine.touched_rows(noisy, n_pre, n_hidden), np.arange(5))


@pytest.mark.parametrize("options", [{"recurrent": True}, {"m_update": "hebb_pre"}])
def test_coupled_units_run_stacked_and_still_equal_one_at_a_time(tests, options):
    """With W_rec (units coupled) or hebb_pre (the update constant depends on N_post) rows
    cannot be shared: conditions are stacked instead, with the same results."""
    net = mpn.build_model("dmpn", n_hidden=N_HIDDEN, seed=3, **options).eval()
    assert not net.rows_independent()
    conditions = conditions_for(net, np.random.default_rng(3))
    acc = lesion_engine.evaluate_conditions(net, tests, conditions, memory_mb=64)
    for i, cond in enumerate(conditions):
        ser = serial_accuracy(net, tests, cond)
        for m in ("angle", "trial"):
            np.testing.assert_allclose(acc[m][i], ser[m], atol=1e-6, err_msg=f"{m} {cond}")


# ----------------------------------------------------------------------------------------
# Limiting cases of the perturbations


def assert_same_outputs(net, batch, pert):
    x = net_helpers.batch_to_torch(batch)["inputs"]
    with torch.no_grad():
        torch.testing.assert_close(net(x, perturbation=pert)["y"], net(x)["y"], rtol=0, atol=0)


def test_pruning_at_zero_and_noise_at_zero_change_nothing(net, tests):
    table = table_for()
    W = lesion_engine.plastic_weight(net)
    prune = lesion.prune_experiment(table, lesion.Design(dict(lesion.CONFIG,
                                                              prune_sparsity=[0, 0.5]), 1, W))
    assert prune["cond"][0] == 0 and table.conditions[0] == {}
    zeroed = lesion_engine.unpack_indices(table.conditions[prune["cond"][1]]["w_zero"])
    assert zeroed.size == W.size // 2
    assert np.abs(W).ravel()[zeroed].max() <= np.abs(W).ravel()[np.setdiff1d(
        np.arange(W.size), zeroed)].min()  # the smallest |W| go first
    cfg = dict(lesion.CONFIG, n_draws=2, zero_fractions=[0], silence_fractions=[0],
               noise_sigmas=[0, 0.01], noise_rel_sigmas=[0])
    robust = lesion.robust_experiments(table, lesion.Design(cfg, 1, W))
    for name in ("w_zero", "hid_silence", "w_noise_rel"):
        assert np.all(robust[name]["cond"] == 0), name
    assert np.all(robust["w_noise"]["cond"][0] == 0)
    assert np.all(robust["w_noise"]["cond"][1] > 0)
    # explicit neutral fields (not deduplicated away) leave the outputs bit-identical
    shape = (N_HIDDEN, N_HIDDEN)
    assert_same_outputs(net, tests[1], net_helpers.Perturbation(w_mask=torch.ones(shape)))
    assert_same_outputs(net, tests[1], net_helpers.Perturbation(w_noise=torch.zeros(shape)))


def test_freeze_m_everywhere_equals_eta_zero(net, tests):
    table = table_for()
    cid = table.add({"m_freeze": np.arange(N_HIDDEN * N_HIDDEN)})
    frozen = lesion_engine.condition_perturbation(table.conditions[cid], N_HIDDEN, N_HIDDEN)
    no_plasticity = copy.deepcopy(net)
    with torch.no_grad():
        no_plasticity.mp.eta.zero_()
    for batch in tests:
        x = net_helpers.batch_to_torch(batch)["inputs"]
        with torch.no_grad():
            torch.testing.assert_close(net(x, perturbation=frozen)["y"], no_plasticity(x)["y"],
                                       rtol=0, atol=0)


def test_noise_is_regenerated_from_its_seed():
    a = lesion_engine.noise_matrix([1, 2, 3], 0.1, (4, 5))
    np.testing.assert_array_equal(a, lesion_engine.noise_matrix([1, 2, 3], 0.1, (4, 5)))
    assert not np.array_equal(a, lesion_engine.noise_matrix([1, 2, 4], 0.1, (4, 5)))
    assert a.std() > 0


# ----------------------------------------------------------------------------------------
# Conditions and random controls


def test_index_sets_round_trip_in_both_encodings():
    for idx, n in (([3, 1, 2], 1000), (np.arange(0, 900, 2), 1000), ([], 10)):
        packed = lesion_engine.pack_indices(idx, n)
        np.testing.assert_array_equal(lesion_engine.unpack_indices(packed), np.unique(idx))
    assert isinstance(lesion_engine.pack_indices(np.arange(900), 1000), dict)  # dense -> bit mask


def test_identical_conditions_are_stored_once():
    t = table_for()
    a = t.add({"hid_units": [3, 1]})
    assert t.add({"hid_units": np.array([1, 3])}) == a
    assert t.add({"hid_units": [], "w_noise": {"seed": [1], "sigma": 0.0}}) == 0
    assert t.add({"in_units": [1, 3]}) != a


def synthetic_R(n_cols, rng, ks=(5, 6), n_rows=49, n_unresp=0, selected_k=None,
                variance_hash="h"):
    """One clustering in the cluster_info.h5 contract: labels at every k (keyed by k as a
    string), the selected k (0 = no structure above chance), matrix, row names, ..."""
    by_k = {}
    unresp = np.zeros(n_cols, bool)
    unresp[:n_unresp] = True
    for k in ks:
        labels = rng.permutation(np.arange(n_cols - n_unresp) % k)
        by_k[str(k)] = np.concatenate([np.full(n_unresp, k), labels]).astype(np.int32)
    k_sel = ks[0] if selected_k is None else selected_k
    return {"col_labels": by_k[str(ks[0])], "col_labels_by_k": by_k, "k": np.int64(k_sel),
            "k_argmax": np.int64(ks[0]), "above_null": np.bool_(k_sel > 0),
            "unresponsive": unresp, "matrix": rng.random((n_rows, n_cols)),
            "row_names": np.array([f"period{i}" for i in range(n_rows)]),
            "variance_hash": np.array(variance_hash)}


def synthetic_cluster_info(n_hidden, n_pre, seed=0, variance_hash="h"):
    rng = np.random.default_rng(seed)
    R = lambda n, **kw: synthetic_R(n, rng, variance_hash=variance_hash, **kw)  # noqa: E731
    ci = {rep: {"normalized": R(n), "unnormalized": R(n, n_unresp=2)}
          for rep, n in (("input", n_pre), ("hidden", n_hidden))}
    ci["hidden"]["unnormalized"]["k"] = np.int64(0)  # no structure: 'selected' is skipped
    n_syn = n_hidden * n_pre
    ci_mod = {"modulation": {"normalized": R(n_syn), "unnormalized": R(n_syn, n_unresp=n_syn // 10)},
              "modulation_weighted": {"unnormalized": R(n_syn)}}
    return ci, ci_mod


def write_cluster_files(paths, n_hidden, n_pre, seed=0, variance_hash="h"):
    """cluster_info.h5 and cluster_info_mod.h5 as clustering.py writes them."""
    ci, ci_mod = synthetic_cluster_info(n_hidden, n_pre, seed, variance_hash)
    helper.save_h5(paths.cluster_info, ci, attrs={"fixed_k": 6})
    helper.save_h5(paths.cluster_info_mod, ci_mod, attrs={"fixed_k": 6})


def test_random_controls_are_outside_the_cluster_and_size_matched():
    ci, ci_mod = synthetic_cluster_info(N_HIDDEN, N_HIDDEN)
    t = table_for()
    cfg = dict(lesion.CONFIG, n_random=4, fixed_cut_k=6, n_random_combined=3,
               n_random_modulation=3)
    design = lesion.Design(cfg, 2, np.zeros((N_HIDDEN, N_HIDDEN)), ci=ci, ci_mod=ci_mod)
    single = lesion.single_experiments(t, design)
    mod = lesion.modulation_experiments(t, design)
    checked = 0
    for tab, field, kinds in [(s, s["field"], [("lesion", "control")]) for s in single.values()] + \
            [(m, None, [("zero_W", "zero_W_control"), ("freeze_M", "freeze_M_control")])
             for m in mod.values()]:
        for kind, ckind in kinds:
            n_controls = cfg["n_random"] if field else cfg["n_random_modulation"]
            assert tab[ckind].shape == (len(tab[kind]), n_controls)
            for c, cid in enumerate(tab[kind]):
                members = tab["labels"] == tab["clusters"][c]
                cond = t.conditions[cid]
                f = field or {"zero_W": "w_zero", "freeze_M": "m_freeze"}[kind]
                np.testing.assert_array_equal(lesion_engine.unpack_indices(cond[f]),
                                              np.flatnonzero(members))
                for ctrl in tab[ckind][c]:
                    if ctrl < 0:  # no size-matched control exists (cluster > half the units)
                        assert members.sum() > (~members).sum()
                        continue
                    drawn = lesion_engine.unpack_indices(t.conditions[ctrl][f])
                    assert drawn.size == members.sum()
                    assert not members[drawn].any()
                    checked += 1
    assert checked > 100
    assert single["input-normalized-fixed"]["k"] == 6
    # the same draws for the same cluster, whatever else was drawn before
    m = np.array([1, 4, 7])
    a = lesion.control_draws(2, 12, m, 3)
    b = lesion.control_draws(2, 12, m, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert lesion.control_draws(2, 12, np.arange(7), 3) is None


def test_effect_and_p_follow_the_plain_formula():
    from scipy.stats import t as student_t
    acc = np.array([[1.0, 1.0], [0.2, 0.5], [0.8, 0.9], [0.6, 0.7], [0.7, 0.8]])
    s = lesion.significance(acc, [1, 1], [[2, 3, 4], [-1, -1, -1]], np.array([10, 10]), 0.05)
    np.testing.assert_allclose(s["effect"][0], [0.5, 0.3])
    assert np.all(np.isnan(s["effect"][1])) and not s["significant"][1].any()
    ctrl = acc[[2, 3, 4], 0]
    pt = (0.2 * 10 + 1) / 12
    se = np.sqrt(ctrl.var(ddof=1) * (1 + 1 / 3) + pt * (1 - pt) / 10)
    assert s["p"][0, 0] == pytest.approx(student_t.sf(0.5 / se, df=2))


def test_benjamini_hochberg_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    p = rng.random((6, 5)) ** 3
    p[0, 0] = np.nan
    q = lesion.benjamini_hochberg(p)
    flat = p[np.isfinite(p)]
    m = flat.size
    expected = [min(1.0, min(np.sort(flat)[j] * m / (j + 1) for j in range(i, m)))
                for i in range(m)]  # q of the i-th smallest p
    np.testing.assert_allclose(np.sort(q[np.isfinite(q)]), expected)
    assert np.isnan(q[0, 0])


# ----------------------------------------------------------------------------------------
# The significance rule on planted structure and on none


PLANTED_RULES = ["fdgo", "fdanti", "reactgo", "reactanti", "delaygo"]  # delaygo: never solved
N_PLANTED = 32


def planted_network():
    """A hand-built dmpn (no plasticity) whose units 4g..4g+3 alone carry the response of
    PLANTED_RULES[g] (g < 4), units 16-23 share the fixation output (any four of them keep
    it), units 24-31 do nothing. Each response unit is a gated copy of a stimulus component:
    tanh(±a·s + B·(rule input − 1)), ≈ −1 whatever s when the rule is off; a +/− pair cancels
    then and reads out 2·tanh(a·s) when it is on."""
    net = mpn.build_model("dmpn", n_hidden=N_PLANTED, seed=0).eval()
    t1, a, B = np.tanh(1.0), 2.0, 4.0
    W_in, W, b = np.zeros((N_PLANTED, 21)), np.zeros((N_PLANTED, N_PLANTED)), np.zeros(N_PLANTED)
    W_in[np.arange(21), np.arange(21)] = 1.0  # x_j = tanh(u_j) for the 21 inputs
    W_out = np.zeros((3, N_PLANTED))
    for g, rule in enumerate(PLANTED_RULES[:4]):
        sign = -1.0 if rule.endswith("anti") else 1.0
        for c, (ch1, ch2) in enumerate(((2, 4), (3, 5))):  # sin: rings 1 and 2; cos likewise
            for pm in (1.0, -1.0):
                i = 4 * g + 2 * c + (pm < 0)
                W[i, [ch1, ch2]] = pm * a
                W[i, 6 + mpn_tasks.RULES.index(rule)] = B / t1
                b[i] = -B
                W_out[1 + c, i] = sign * pm
    W[16:24, 1] = -2.5 / t1  # fixation units: tanh(1) before the go cue, tanh(-1.5) after
    b[16:24] = 1.0
    W_out[0, 16:24] = 1.6 / 8
    W[24:] = np.random.default_rng(0).normal(0, 0.3, (8, N_PLANTED))
    with torch.no_grad():
        for param, value in ((net.W_in, W_in), (net.mp.W, W), (net.mp.b, b), (net.W_out, W_out)):
            param.copy_(torch.as_tensor(value, dtype=param.dtype))
        net.mp.eta.zero_()
    return net


@pytest.fixture(scope="module")
def planted():
    net = planted_network()
    cfg = dict(lesion.CONFIG, trials_per_rule=32, epoch_quantile_range=[0.25, 0.75])
    test = lesion.make_test_set(PLANTED_RULES, cfg, run_seed=1, io_mode="low_dim", sigma_x=0.0)
    return net, test


def lesion_groups(net, test, groups, run_seed, n_random=20, rules=PLANTED_RULES,
                  trials_per_rule=32):
    """Scores and significance (trial measure) of lesioning each unit group alone."""
    table = table_for(N_PLANTED, N_PLANTED)
    lesion_ids, control_ids = lesion._lesion_and_controls(table, "hid_units", groups, N_PLANTED,
                                                          n_random, run_seed)
    parts = lesion_engine.evaluate_conditions(net, test["parts"], table.conditions, memory_mb=64)
    scores = lesion.merge_parts(parts, test, len(rules))
    n_trials = np.full(len(rules), float(trials_per_rule))
    return scores, lesion_ids, lesion.significance(scores["trial"], lesion_ids, control_ids,
                                                   n_trials, alpha=0.05)


def test_planted_group_is_significant_for_its_rule_only(planted):
    net, test = planted
    scores, ids, stats = lesion_groups(net, test, [np.arange(4 * g, 4 * g + 4) for g in range(8)],
                                       run_seed=3)
    np.testing.assert_array_equal(scores["trial"][0], [1, 1, 1, 1, 0])  # the intact network
    expected = np.zeros((8, len(PLANTED_RULES)), bool)
    expected[np.arange(4), np.arange(4)] = True
    np.testing.assert_array_equal(stats["significant"], expected)
    # its lesion removes the response: every failure is a missing go response
    assert scores["wrong_go"][ids[0], 0] == 1.0 and scores["broke_fixation"][ids[0], 0] == 0
    # the whole fixation population lesioned breaks fixation in every trial
    fix_scores, (fix,), _ = lesion_groups(net, test, [np.arange(16, 24)], run_seed=3)
    np.testing.assert_array_equal(fix_scores["broke_fixation"][fix], 1.0)


def test_random_unit_groups_are_rarely_significant(planted):
    """Random 'clusters' (a random partition into 8 groups of 4) against their own controls:
    significant in at most 5% of cells over 20 seeds (the four solved rules, 16 trials each)."""
    net, _ = planted
    rules = PLANTED_RULES[:4]
    cfg = dict(lesion.CONFIG, trials_per_rule=16, epoch_quantile_range=[0.25, 0.75])
    test = lesion.make_test_set(rules, cfg, run_seed=2, io_mode="low_dim", sigma_x=0.0)
    called, cells = 0, 0
    for seed in range(20):
        order = np.random.default_rng(seed).permutation(N_PLANTED)
        _, _, stats = lesion_groups(net, test, np.split(order, 8), run_seed=seed, rules=rules,
                                    trials_per_rule=16)
        called += int(stats["significant"].sum())
        cells += int(np.isfinite(stats["p"]).sum())
    assert cells == 20 * 8 * 4
    assert called / cells <= 0.05, (called, cells)


# ----------------------------------------------------------------------------------------
# End to end


FAST = dict(trials_per_rule=8, epoch_quantile_range=[0.0, 0.1], n_random=2, n_random_combined=2,
            n_random_modulation=2, n_draws=2,
            zero_fractions=[0, 0.5, 1.0], silence_fractions=[0, 0.5], noise_sigmas=[0, 0.03],
            noise_rel_sigmas=[0, 0.5], prune_sparsity=[0, 0.5, 0.99], fixed_cut_k=None,
            device="cpu")


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory):
    """A run trained with configs/tiny.py, with cluster files written here."""
    root = tmp_path_factory.mktemp("lesion_runs")
    cfg = helper.load_config(multiple_task.CONFIG, [str(REPO / "configs" / "tiny.py")],
                             echo=False)
    paths = multiple_task.main(dict(cfg, runs_dir=str(root)))["paths"]
    n_hidden = cfg["n_hidden"]
    write_cluster_files(paths, n_hidden, n_hidden)
    return root, paths.name


def copy_run(trained_root, runs_dir):
    root, name = trained_root
    shutil.copytree(root / name, runs_dir / name)
    return helper.run_paths(name, runs_dir)


def test_both_scripts_end_to_end(trained_root, runs_dir):
    paths = copy_run(trained_root, runs_dir)
    cfg = dict(lesion.CONFIG, run=paths.name, **FAST)
    result = lesion.main(cfg)[paths.name]
    saved = lesion_engine.load_result(paths.lesion, "lesion", expect_hash=helper.config_hash(cfg))
    C, R = len(saved["conditions"]), len(saved["rules"])
    assert R == 15 and saved["scores"]["trial"].shape == (C, R)
    key = lesion_engine._key
    assert [key(c) for c in saved["conditions"]] == [key(c) for c in result["conditions"]]
    for name in lesion_engine.SCORES:
        np.testing.assert_array_equal(saved["scores"][name], result["scores"][name])
    for m in ("angle", "trial"):
        np.testing.assert_allclose(saved["scores"][m][0], saved["baseline"][m], atol=1e-6)
    assert set(saved["single"]) == {f"{r}-{f}-{c}" for r in ("input", "hidden")
                                    for f in ("normalized", "unnormalized")
                                    for c in ("fixed", "selected")} - {"hidden-unnormalized-selected"}
    assert set(saved["modulation"]) == {"modulation-normalized-fixed",
                                        "modulation-unnormalized-fixed",
                                        "modulation_weighted-unnormalized-fixed"}
    comb = saved["combined"]["normalized-fixed"]
    assert comb["lesion"].size == comb["input_clusters"].size * comb["hidden_clusters"].size
    assert comb["k_input"] == 6 and comb["k_hidden"] == 6  # the cluster files' fixed k
    hidden = saved["single"]["hidden-normalized-fixed"]
    np.testing.assert_allclose(hidden["readout_share"].sum(axis=0), 1.0, atol=1e-6)
    stats = hidden["stats"]["lesion"]["trial"]
    assert stats["significant"].shape == (hidden["clusters"].size, R)
    assert set(saved["robust"]) == {"w_zero", "hid_silence", "w_noise", "w_noise_rel"}
    assert saved["robust"]["w_zero"]["cond"].shape == (3, 2)
    figures = lesion_plot.main(dict(lesion_plot.CONFIG, run=paths.name))[paths.name]
    assert {p.stem for p in figures} == {
        "lesion_heatmaps_units", "lesion_heatmaps_modulation", "lesion_combined_matrix",
        "lesion_violins", "lesion_ranked_importance", "lesion_additivity",
        "lesion_zeroW_vs_freezeM", "lesion_size_vs_effect", "lesion_tuning_vs_effect",
        "lesion_pruning", "lesion_robustness", "lesion_failure_kinds", "lesion_readout_share"}
    assert all(p.exists() and p.stat().st_size > 10_000 for p in figures)


def test_missing_or_stale_inputs_name_the_command_that_remakes_them(trained_root, runs_dir):
    paths = copy_run(trained_root, runs_dir)
    cfg = dict(lesion.CONFIG, run=paths.name, **FAST)
    helper.save_h5(paths.variance, {"x": np.zeros(3)}, cfg={"analysis": 1})
    with pytest.raises(helper.StageError, match=f"another task_variance.h5; rerun `python "
                       f"clustering.py --run={paths.name}"):
        lesion.main(cfg)
    write_cluster_files(paths, 16, 16, variance_hash=helper.config_hash({"analysis": 1}))
    lesion.main(dict(cfg, experiments=["single"]))
    # a lesion file computed from an older clustering is refused by the plots (the manifest's
    # input hashes decide: a new mtime alone, e.g. from copying the run folder, is no change)
    later = paths.lesion.stat().st_mtime + 10
    os.utime(paths.cluster_info, (later, later))
    lesion_plot.main(dict(lesion_plot.CONFIG, run=paths.name))
    write_cluster_files(paths, 16, 16, variance_hash=helper.config_hash({"analysis": 2}))
    with pytest.raises(helper.StageError, match=f"older cluster_info.h5.*lesion.py "
                       f"--run={paths.name}"):
        lesion_plot.main(dict(lesion_plot.CONFIG, run=paths.name))
    write_cluster_files(paths, 16, 16, variance_hash=helper.config_hash({"analysis": 1}))
    # a checkpoint newer than the task variance the clusters came from (no recorded inputs
    # here, so file times decide; set explicitly: touch() right after a write can give equal
    # mtimes on file systems with coarse timestamps)
    os.utime(paths.checkpoint, (later + 10, later + 10))
    with pytest.raises(helper.StageError, match=f"older than.*checkpoint.pt.*"
                       f"multiple_task_analysis.py --run={paths.name}"):
        lesion.main(cfg)
    paths.cluster_info.unlink()
    with pytest.raises(helper.StageError, match=f"clustering.py --run={paths.name}"):
        lesion.main(cfg)
    # experiments that need no clustering still run
    lesion.main(dict(cfg, experiments=["prune"]))
    paths.lesion.unlink()
    with pytest.raises(helper.StageError, match=f"lesion.py --run={paths.name}"):
        lesion_plot.main(dict(lesion_plot.CONFIG, run=paths.name))
