"""Analysis and clustering stages end to end on tiny runs (SPEC §5): every artifact, the
cluster_info format lesion.py reads, streamed modulation variance vs the recorded M history,
clear errors for missing or stale inputs, and the multi-seed summary."""
import shutil

import numpy as np
import pytest
import torch

import clustering
import helper
import lesion
import mpn
import multiple_task
import multiple_task_analysis as mta
import net_helpers

SEEDS = (749, 750)
ANALYSIS = dict(mta.CONFIG, n_analysis=8, chunk_size=3, device="cpu", figures=False)
CLUSTER = dict(clustering.CONFIG, n_repeats=4, n_groups=40, n_restarts=3, figures=False)
R_KEYS = {"col_labels", "col_labels_by_k", "k", "k_argmax", "unresponsive", "row_labels",
          "row_labels_by_k", "linkage", "leaf_order", "ks", "silhouette", "ari", "matrix",
          "row_names"}  # CONTRACTS.md


def tiny_config(seed, root):
    cfg = helper.apply_overrides(multiple_task.CONFIG,
                                 helper._read_config_file(helper.REPO_DIR / "configs/tiny.py"),
                                 echo=False)
    # engine "fast": no compiled-kernel build inside a test
    return dict(cfg, seed=seed, max_steps=10, runs_dir=str(root), engine="fast")


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory):
    """Two tiny runs (10 steps each), trained once for the module (training figures are
    test_training's business)."""
    root = tmp_path_factory.mktemp("tiny_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(multiple_task, "make_figures", lambda *args, **kwargs: None)
        for seed in SEEDS:
            multiple_task.main(tiny_config(seed, root))
    return root


@pytest.fixture
def runs(runs_dir, trained_root):
    """The tiny runs copied into this test's runs root; their names."""
    shutil.copytree(trained_root, runs_dir)
    return [helper.run_name(tiny_config(seed, runs_dir)) for seed in SEEDS]


def analyse(name, **kw):
    return mta.main(dict(ANALYSIS, run=name, **kw))


def cluster(name, **kw):
    return clustering.main(dict(CLUSTER, run=name, **kw))


def test_both_stages_write_every_artifact_in_the_format_lesion_reads(runs):
    name = runs[0]
    paths = helper.run_paths(name)
    analyse(name, figures=True)
    arrays, attrs = helper.load_h5(paths.variance, "analysis")
    assert len(arrays["row_names"]) == 49 and arrays["row_names"][0] == "fdgo-stim1"
    n_cols = {"input": 16, "hidden": 16, "modulation": 256, "modulation_weighted": 256}
    for rep, n in n_cols.items():
        for form in mta.FORMS:
            assert arrays[rep][form].shape == (49, n)
        V = arrays[rep]["unnormalized"]
        np.testing.assert_allclose(arrays[rep]["normalized"], mta.normalize_columns(V), atol=1e-6)
    assert attrs["analysis"] == {"n_analysis": 8, "quantile": 1.0, "trial_seed": 0}
    assert set(arrays["pca"]) == set(attrs["windows"]) and len(attrs["windows"]) == 15
    for figure in ("variance_normalized", "variance_unnormalized", "weights", "hidden_pca"):
        assert paths.figure(figure).exists()

    ci, ci_mod = cluster(name, figures=True)[name]
    assert ci["fixed_k"] == 20 and set(ci_mod) >= set(mta.SYNAPSE_REPS)
    for info, reps in ((ci, mta.UNIT_REPS), (ci_mod, mta.SYNAPSE_REPS)):
        for rep in reps:
            for form in mta.FORMS:
                R = info[rep][form]
                n = n_cols[rep]
                assert R_KEYS <= set(R) and R["form"] == form
                assert R["col_labels"].shape == (n,) and R["matrix"].shape == (49, n)
                assert (R["col_labels"][R["unresponsive"]] == R["k"]).all()
                assert R["fixed_k"] == min(20, R["ks"][-1]) and R["fixed_k"] in R["col_labels_by_k"]
                assert R["k"] in R["col_labels_by_k"] and R["k_argmax"] in R["col_labels_by_k"]
                for k, labels in R["col_labels_by_k"].items():
                    np.testing.assert_array_equal(labels, clustering.labels_at(R["columns"], k))
                assert R["row_labels"].shape == (49,) and R["row_k"] in R["row_labels_by_k"]
                for cut in ("fixed", "selected"):  # lesion.py's own reader
                    table = lesion.cluster_table(R, cut, ci["fixed_k"], n)
                    assert table["sizes"].sum() == n
    assert "groups" in ci_mod["modulation"]["normalized"]["columns"]  # pre-grouped (256 > 40)
    om = ci_mod["modulation"]["normalized"]["over_membership"]["om"]
    assert om.shape == (ci_mod["modulation"]["normalized"]["col_labels"].max() + 1,
                        ci["input"]["normalized"]["col_labels"].max() + 1,
                        ci["hidden"]["normalized"]["col_labels"].max() + 1)
    loaded = lesion.load_clusters(paths, ["single", "combined", "modulation"])
    assert loaded[0]["_provenance"]["config_hash"] == loaded[1]["_provenance"]["config_hash"]
    for figure in ["k_selection"] + [f"{kind}_{rep}_{form}" for form in mta.FORMS
                                     for kind, reps in (("clusters", n_cols),
                                                        ("over_membership", mta.SYNAPSE_REPS))
                                     for rep in reps]:
        assert paths.figure(figure).exists(), figure


def test_streamed_modulation_variance_equals_recorded_m_history(runs):
    paths = helper.run_paths(runs[0])
    net, ckpt = mta.load_network(paths, ANALYSIS)
    trials = mta.analysis_trials(mta.run_rules(ckpt["config"]), ANALYSIS, ckpt["config"]["seed"])
    raw, rows, _ = mta.compute_variances(net, trials, chunk_size=3)  # chunks split directions
    ref = {rep: [] for rep in raw}
    W = net.mp.W.detach().double()
    with torch.no_grad():
        for rule, t in trials.items():
            out = net(torch.as_tensor(t["inputs"]), record=("x", "M"))
            M = out["M"].double()  # (B, T, N_post, N_pre): M_{t-1}
            z = {"input": out["x"], "hidden": out["h"], "modulation": M.flatten(2),
                 "modulation_weighted": (M * W).flatten(2)}
            for rep, value in z.items():
                ref[rep].append(mta.task_variance_matrix({rule: value.double().numpy()},
                                                         {rule: t["windows"]}, {rule: t["dirs"]}))
    assert len(rows) == 49
    for rep, V in raw.items():
        expected = np.concatenate(ref[rep])
        np.testing.assert_allclose(V, expected, rtol=1e-4, atol=1e-7 * expected.max(), err_msg=rep)


def test_missing_or_stale_inputs_stop_with_the_command_that_makes_them(runs):
    name = runs[0]
    with pytest.raises(helper.StageError, match="python multiple_task.py"):
        analyse("no_such_run")
    with pytest.raises(helper.StageError, match=f"python multiple_task_analysis.py --run={name}"):
        cluster(name)
    analyse(name)
    paths = helper.run_paths(name)
    ckpt = net_helpers.load_checkpoint(paths.checkpoint)
    net = net_helpers.model_from_checkpoint(ckpt)
    net_helpers.save_checkpoint(paths.checkpoint, net, ckpt["config"], ckpt["step"] + 10)
    with pytest.raises(helper.StageError, match=f"rerun `python multiple_task_analysis.py "
                                                f"--run={name}`"):
        cluster(name)


def test_vanilla_run_has_hidden_only(runs_dir):
    cfg = dict(tiny_config(5, runs_dir), net="vanilla")
    net = mpn.build_model("vanilla", n_hidden=12, seed=5)
    paths = helper.run_paths(cfg)
    net_helpers.save_checkpoint(paths.checkpoint, net, cfg, 0)
    raw, rows, _ = analyse(paths.name)[paths.name]
    assert list(raw) == ["hidden"] and raw["hidden"].shape == (49, 12)
    helper.set_style()
    mta.figure_weights(net, paths.figure("weights"))  # W_in, W_rec, W_out of a vanilla RNN
    assert paths.figure("weights").exists()
    ci, ci_mod = cluster(paths.name)[paths.name]
    assert "hidden" in ci and "input" not in ci
    assert not set(ci_mod) & set(mta.SYNAPSE_REPS)


def test_seed_summary_of_two_runs(runs, capsys):
    for name in runs:
        analyse(name)
        cluster(name)
    summary = mta.main(dict(ANALYSIS, summary=True, runs="everything_dmpn_seed*"))
    out = helper.summary_paths()
    assert out.seeds.exists() and out.figure("seed_summary").exists()
    assert summary["runs"] == sorted(runs) and summary["clustered_runs"] == summary["runs"]
    assert summary["acc"]["trial"].shape == (2, 15)
    assert all(len(ks["columns"]) == 2 for ks in summary["k"].values())
    sib = summary["siblings"]
    assert len(sib["periods"]) == 3 + 5 + 5  # dmc: stim1, delay1, go1; delaydm pairs: 5 each
    assert sib["columns"] == [f"{r}-{f}" for r in ("input", "hidden", "modulation")
                              for f in mta.FORMS]
    assert (sib["n_seeds"] == 2).all() and (sib["same"] <= 2).all()
    # recount one cell from the pickles
    i = sib["periods"].index("delaydm1/delaydm2 delay1")
    j = sib["columns"].index("hidden-normalized")
    same = 0
    for name in runs:
        ci = helper.load_pickle(helper.run_paths(name).cluster_info, "clustering")
        R = ci["hidden"]["normalized"]
        rows = list(R["row_names"])
        a, b = rows.index("delaydm1-delay1"), rows.index("delaydm2-delay1")
        same += int(R["row_labels"][a] == R["row_labels"][b])
    assert sib["same"][i, j] == same
    printed = capsys.readouterr().out
    assert "per-rule accuracy over 2 runs" in printed and "dmcgo/dmcnogo delay1" in printed
    loaded = helper.load_pickle(out.seeds, "summary")
    np.testing.assert_array_equal(loaded["acc"]["angle"], summary["acc"]["angle"])
