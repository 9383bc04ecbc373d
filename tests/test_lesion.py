"""The lesion stage (lesion.py) and its figures (lesion_plot.py): batched conditions against
one-at-a-time evaluation, random controls, limiting cases of every perturbation, and both
scripts end to end on a tiny trained and clustered run."""
import copy
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import helper
import lesion
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
    cfg = dict(lesion.CONFIG, n_test=N_TEST, test_quantile=0.0)
    return lesion.make_test_set(RULES, cfg, run_seed=5, io_mode="low_dim")


def table_for(n_hidden=N_HIDDEN, n_pre=N_HIDDEN):
    return lesion.ConditionTable({"in_units": n_pre, "hid_units": n_hidden,
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
    """One condition on its own: a shared (not stacked) perturbation, the plain evaluate."""
    pert = lesion.condition_perturbation(cond, N_HIDDEN, N_HIDDEN)
    out = {"angle": [], "trial": []}
    for rule, batch in zip(RULES, tests):
        res = net_helpers.evaluate(net, batch, perturbation=pert)
        for m in out:
            out[m].append(res["acc"][m][rule])
    return out


# ----------------------------------------------------------------------------------------
# Batched evaluation


def test_batched_equals_one_at_a_time_and_weights_untouched(net, tests):
    table, ids = mixed_conditions(np.random.default_rng(0))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    big = lesion.evaluate_conditions(net, tests, table.conditions, memory_mb=64)
    small = lesion.evaluate_conditions(net, tests, table.conditions, memory_mb=0.05)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for m in ("angle", "trial"):
        np.testing.assert_array_equal(big[m], small[m])
    for i, cond in enumerate(table.conditions):
        ser = serial_accuracy(net, tests, cond)
        for m in ("angle", "trial"):
            np.testing.assert_allclose(big[m][i], ser[m], atol=1e-6, err_msg=f"{m} {cond}")
    assert np.ptp(big["angle"]) > 0  # the conditions really differ


def test_stacked_outputs_equal_single_condition_outputs(net, tests):
    table, ids = mixed_conditions(np.random.default_rng(1))
    conds = [table.conditions[i] for i in ids]
    batch = net_helpers.batch_to_torch(tests[1])
    x = batch["inputs"]
    perts = [lesion.condition_perturbation(c, N_HIDDEN, N_HIDDEN) for c in conds]
    stacked = net_helpers.Perturbation.stack(perts, x.shape[0])
    with torch.no_grad():
        y_all = net(x.repeat(len(conds), 1, 1), perturbation=stacked)["y"]
        for k, p in enumerate(perts):
            y_one = net(x, perturbation=p)["y"]
            torch.testing.assert_close(y_all[k * x.shape[0]:(k + 1) * x.shape[0]], y_one,
                                       rtol=1e-5, atol=1e-6)


def test_no_lesion_equals_the_unperturbed_network(net, tests):
    table = table_for()
    acc = lesion.evaluate_conditions(net, tests, table.conditions, memory_mb=64)
    base = lesion.baseline_accuracy(net, tests, RULES)
    for m in ("angle", "trial"):
        np.testing.assert_array_equal(acc[m][0], base[m].astype(np.float32))


def test_every_hidden_unit_lesioned_fails_every_go_trial(net, tests):
    table = table_for()
    cid = table.add({"hid_units": np.arange(N_HIDDEN)})
    acc = lesion.evaluate_conditions(net, tests, table.conditions, memory_mb=64)
    go_rules = [r for r, rule in enumerate(RULES) if rule in mpn_tasks.RULESETS["go"]]
    assert go_rules
    assert np.all(acc["trial"][cid, go_rules] == 0)
    y = net(net_helpers.batch_to_torch(tests[0])["inputs"], perturbation=
            lesion.condition_perturbation(table.conditions[cid], N_HIDDEN, N_HIDDEN))["y"]
    assert torch.count_nonzero(y) == 0  # silent network: no output at all


# ----------------------------------------------------------------------------------------
# Sharing work between conditions (lesion.evaluate_by_rows)


def conditions_for(net, rng):
    """Conditions of every kind for a network of any shape, several sharing an input set."""
    n_hidden, n_pre = lesion.net_shapes(net)
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
    assert lesion.rows_independent(net)
    n_hidden, n_pre = lesion.net_shapes(net)
    conditions = conditions_for(net, np.random.default_rng(2))
    inputs = net_helpers.batch_to_torch(tests[1])["inputs"]
    n = inputs.shape[0]
    with torch.no_grad():
        for cond in conditions:
            (x, h), = lesion._base_runs(net, [inputs], [cond], n)
            (y,) = lesion._chunk_outputs(net, [x[0]], [h[0]], [cond],
                                         [lesion.touched_rows(cond, n_pre, n_hidden)])
            pert = lesion.condition_perturbation(cond, n_pre, n_hidden)
            torch.testing.assert_close(y[0], net(inputs, perturbation=pert)["y"],
                                       rtol=1e-5, atol=1e-6, msg=str(cond.keys()))
        # and all of them in one chunk, sharing the intact network's base run
        plain = [c for c in conditions if "in_units" not in c]
        (x, h), = lesion._base_runs(net, [inputs], [{}], n)
        (ys,) = lesion._chunk_outputs(net, [x[0]], [h[0]], plain,
                                      [lesion.touched_rows(c, n_pre, n_hidden) for c in plain])
        for cond, y in zip(plain, ys):
            pert = lesion.condition_perturbation(cond, n_pre, n_hidden)
            torch.testing.assert_close(y, net(inputs, perturbation=pert)["y"],
                                       rtol=1e-5, atol=1e-6)


def test_touched_rows_are_the_rows_a_condition_changes():
    n_hidden, n_pre = 5, 3
    assert lesion.touched_rows({}, n_pre, n_hidden).size == 0
    cond = {"w_zero": lesion.pack_indices([0, 1, 7], n_hidden * n_pre),
            "m_freeze": lesion.pack_indices([14], n_hidden * n_pre)}
    np.testing.assert_array_equal(lesion.touched_rows(cond, n_pre, n_hidden), [0, 2, 4])
    cond["hid_units"] = lesion.pack_indices([2, 3], n_hidden)
    np.testing.assert_array_equal(lesion.touched_rows(cond, n_pre, n_hidden), [0, 4])
    noisy = {"w_noise": {"seed": [1], "sigma": 0.1}}
    np.testing.assert_array_equal(lesion.touched_rows(noisy, n_pre, n_hidden), np.arange(5))


@pytest.mark.parametrize("options", [{"recurrent": True}, {"m_update": "hebb_pre"}])
def test_coupled_units_run_stacked_and_still_equal_one_at_a_time(tests, options):
    """With W_rec (units coupled) or hebb_pre (the update constant depends on N_post) rows
    cannot be shared: conditions are stacked instead, with the same results."""
    net = mpn.build_model("dmpn", n_hidden=N_HIDDEN, seed=3, **options).eval()
    assert not lesion.rows_independent(net)
    conditions = conditions_for(net, np.random.default_rng(3))
    acc = lesion.evaluate_conditions(net, tests, conditions, memory_mb=64)
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
    W = lesion.plastic_weight(net)
    prune = lesion.prune_experiment(table, W, dict(lesion.CONFIG, prune_sparsity=[0, 0.5]))
    assert prune["cond"][0] == 0 and table.conditions[0] == {}
    zeroed = lesion.unpack_indices(table.conditions[prune["cond"][1]]["w_zero"])
    assert zeroed.size == W.size // 2
    assert np.abs(W).ravel()[zeroed].max() <= np.abs(W).ravel()[np.setdiff1d(
        np.arange(W.size), zeroed)].min()  # the smallest |W| go first
    cfg = dict(lesion.CONFIG, n_draws=2, zero_fractions=[0], silence_fractions=[0],
               noise_sigmas=[0, 0.01], noise_rel_sigmas=[0])
    robust = lesion.robust_experiments(table, W, cfg, run_seed=1)
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
    frozen = lesion.condition_perturbation(table.conditions[cid], N_HIDDEN, N_HIDDEN)
    no_plasticity = copy.deepcopy(net)
    with torch.no_grad():
        no_plasticity.mp.eta.zero_()
    for batch in tests:
        x = net_helpers.batch_to_torch(batch)["inputs"]
        with torch.no_grad():
            torch.testing.assert_close(net(x, perturbation=frozen)["y"], no_plasticity(x)["y"],
                                       rtol=0, atol=0)


def test_noise_is_regenerated_from_its_seed():
    a = lesion.noise_matrix([1, 2, 3], 0.1, (4, 5))
    np.testing.assert_array_equal(a, lesion.noise_matrix([1, 2, 3], 0.1, (4, 5)))
    assert not np.array_equal(a, lesion.noise_matrix([1, 2, 4], 0.1, (4, 5)))
    assert a.std() > 0


# ----------------------------------------------------------------------------------------
# Conditions and random controls


def test_index_sets_round_trip_in_both_encodings():
    for idx, n in (([3, 1, 2], 1000), (np.arange(0, 900, 2), 1000), ([], 10)):
        packed = lesion.pack_indices(idx, n)
        np.testing.assert_array_equal(lesion.unpack_indices(packed), np.unique(idx))
    assert isinstance(lesion.pack_indices(np.arange(900), 1000), dict)  # dense -> bit mask


def test_identical_conditions_are_stored_once():
    t = table_for()
    a = t.add({"hid_units": [3, 1]})
    assert t.add({"hid_units": np.array([1, 3])}) == a
    assert t.add({"hid_units": [], "w_noise": {"seed": [1], "sigma": 0.0}}) == 0
    assert t.add({"in_units": [1, 3]}) != a


def synthetic_R(n_cols, rng, ks=(5, 6), n_rows=49, n_unresp=0):
    """A cluster_info entry in the CONTRACTS.md format (labels at every k, matrix, ...)."""
    by_k = {}
    unresp = np.zeros(n_cols, bool)
    unresp[:n_unresp] = True
    for k in ks:
        labels = rng.permutation(np.arange(n_cols - n_unresp) % k)
        by_k[k] = np.concatenate([np.full(n_unresp, k), labels]).astype(np.int32)
    return {"col_labels": by_k[ks[0]], "col_labels_by_k": by_k, "k": ks[0],
            "k_argmax": ks[0], "unresponsive": unresp, "matrix": rng.random((n_rows, n_cols)),
            "row_names": [f"period{i}" for i in range(n_rows)]}


def synthetic_cluster_info(n_hidden, n_pre, seed=0):
    rng = np.random.default_rng(seed)
    ci = {rep: {"normalized": synthetic_R(n, rng), "unnormalized": synthetic_R(n, rng, n_unresp=2)}
          for rep, n in (("input", n_pre), ("hidden", n_hidden))}
    ci["fixed_k"] = 6
    n_syn = n_hidden * n_pre
    ci_mod = {rep: {"normalized": synthetic_R(n_syn, rng),
                    "unnormalized": synthetic_R(n_syn, rng, n_unresp=n_syn // 10)}
              for rep in ("modulation", "modulation_weighted")}
    return ci, ci_mod


def test_random_controls_are_outside_the_cluster_and_size_matched():
    ci, ci_mod = synthetic_cluster_info(N_HIDDEN, N_HIDDEN)
    t = table_for()
    cfg = dict(lesion.CONFIG, n_random=4, fixed_k=6, n_random_combined=3)
    n_units = {"input": N_HIDDEN, "hidden": N_HIDDEN}
    single = lesion.single_experiments(t, ci, None, cfg, run_seed=2, n_units=n_units)
    mod = lesion.modulation_experiments(t, ci_mod, None, cfg, 2, N_HIDDEN * N_HIDDEN)
    checked = 0
    for tab, field, kinds in [(s, s["field"], [("lesion", "control")]) for s in single.values()] + \
            [(m, None, [("zero_W", "zero_W_control"), ("freeze_M", "freeze_M_control")])
             for m in mod.values()]:
        for kind, ckind in kinds:
            for c, cid in enumerate(tab[kind]):
                members = tab["labels"] == tab["clusters"][c]
                cond = t.conditions[cid]
                f = field or {"zero_W": "w_zero", "freeze_M": "m_freeze"}[kind]
                np.testing.assert_array_equal(lesion.unpack_indices(cond[f]),
                                              np.flatnonzero(members))
                for ctrl in tab[ckind][c]:
                    if ctrl < 0:  # no size-matched control exists (cluster > half the units)
                        assert members.sum() > (~members).sum()
                        continue
                    drawn = lesion.unpack_indices(t.conditions[ctrl][f])
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


def test_normalized_effect_is_control_mean_minus_lesion():
    acc = np.array([[1.0, 1.0], [0.2, 0.5], [0.8, 0.9], [0.6, 0.7]])
    eff = lesion.normalized_effect(acc, [1, 1], [[2, 3], [-1, -1]])
    np.testing.assert_allclose(eff[0], [0.5, 0.3])
    assert np.all(np.isnan(eff[1]))


# ----------------------------------------------------------------------------------------
# End to end


FAST = dict(n_test=8, test_quantile=0.0, n_random=2, n_random_combined=1, n_draws=2,
            zero_fractions=[0, 0.5, 1.0], silence_fractions=[0, 0.5], noise_sigmas=[0, 0.03],
            noise_rel_sigmas=[0, 0.5], prune_sparsity=[0, 0.5, 0.99], fixed_k=6,
            device="cpu")


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory):
    """A run trained with configs/tiny.py, analysed and clustered by the real stages (with
    few trials and repeats)."""
    import clustering
    import multiple_task_analysis
    root = tmp_path_factory.mktemp("lesion_runs")
    cfg = helper.load_config(multiple_task.CONFIG, [str(REPO / "configs" / "tiny.py")],
                             echo=False)
    paths = multiple_task.main(dict(cfg, runs_dir=str(root)))["paths"]
    common = dict(run=paths.name, runs_dir=str(root), figures=False)
    multiple_task_analysis.main(dict(multiple_task_analysis.CONFIG, n_analysis=8,
                                     device="cpu", **common))
    clustering.main(dict(clustering.CONFIG, n_repeats=5, n_restarts=2, n_groups=30, fixed_k=6,
                         **common))
    return root, paths.name


def copy_run(trained_root, runs_dir):
    root, name = trained_root
    shutil.copytree(root / name, runs_dir / name)
    return helper.run_paths(name, runs_dir)


def test_both_scripts_end_to_end(trained_root, runs_dir):
    paths = copy_run(trained_root, runs_dir)
    cfg = dict(lesion.CONFIG, run=paths.name, **FAST)
    result = lesion.main(cfg)[paths.name]
    assert paths.lesion.exists()
    saved = helper.load_pickle(paths.lesion, "lesion", expect_hash=helper.config_hash(cfg))
    C, R = len(saved["conditions"]), len(saved["rules"])
    assert R == 15 and saved["acc"]["trial"].shape == (C, R)
    assert np.all(np.isfinite(saved["acc"]["angle"]))
    for m in ("angle", "trial"):
        np.testing.assert_allclose(saved["acc"][m][0], saved["baseline"][m], atol=1e-6)
    assert set(saved["single"]) == {f"{r}-{f}-{c}" for r in ("input", "hidden")
                                    for f in ("normalized", "unnormalized")
                                    for c in ("fixed", "selected")}
    assert len(saved["modulation"]) == 3 and len(saved["combined"]) == 1  # no W⊙M normalized
    comb = saved["combined"]["normalized-fixed"]
    assert comb["lesion"].size == comb["input_clusters"].size * comb["hidden_clusters"].size
    assert comb["k_input"] == 6 and comb["k_hidden"] == 6
    assert set(saved["robust"]) == {"w_zero", "hid_silence", "w_noise", "w_noise_rel"}
    assert saved["robust"]["w_zero"]["cond"].shape == (3, 2)
    assert result["run"] == paths.name
    figures = lesion_plot.main(dict(lesion_plot.CONFIG, run=paths.name))[paths.name]
    names = {p.stem for p in figures}
    assert names == {"lesion_heatmaps_units", "lesion_heatmaps_modulation",
                     "lesion_combined_matrix", "lesion_violins", "lesion_ranked_importance",
                     "lesion_additivity", "lesion_zeroW_vs_freezeM", "lesion_size_vs_effect",
                     "lesion_tuning_vs_effect", "lesion_pruning", "lesion_robustness"}
    assert all(p.exists() and p.stat().st_size > 10_000 for p in figures)


def test_missing_or_stale_clusters_name_the_clustering_command(trained_root, runs_dir):
    paths = copy_run(trained_root, runs_dir)
    cfg = dict(lesion.CONFIG, run=paths.name, **FAST)
    ci, attrs = helper.load_h5(paths.cluster_info, "clustering")
    helper.save_h5(paths.cluster_info, ci, dict(attrs, variance_hash="other"))
    with pytest.raises(helper.StageError, match=f"another task_variance.h5; rerun `python "
                       f"clustering.py --run={paths.name}"):
        lesion.main(cfg)
    # a checkpoint newer than its clustering (set explicitly: touch() right after a write can
    # give equal mtimes on file systems with coarse timestamps)
    later = paths.cluster_info.stat().st_mtime + 10
    os.utime(paths.checkpoint, (later, later))
    with pytest.raises(helper.StageError, match=f"older than the checkpoint.*clustering.py "
                       f"--run={paths.name}"):
        lesion.main(cfg)
    paths.cluster_info.unlink()
    with pytest.raises(helper.StageError, match=f"clustering.py --run={paths.name}"):
        lesion.main(cfg)
    # experiments that need no clustering still run
    lesion.main(dict(cfg, experiments=["prune"]))
    paths.lesion.unlink()
    with pytest.raises(helper.StageError, match=f"lesion.py --run={paths.name}"):
        lesion_plot.main(dict(lesion_plot.CONFIG, run=paths.name))
