"""Analysis and clustering stages end to end on tiny runs (SPEC §5): every artifact, the
cluster_info.h5 format the lesion stage reads, streamed modulation variance vs the recorded M
history, bit-identical repeats, clear errors for bad input, and the multi-seed summary."""
import shutil

import numpy as np
import pytest
import torch

import clustering
import helper
import mpn
import multiple_task
import multiple_task_analysis as mta
import net_helpers
import variance_core as vc

SEEDS = (749, 750)
ANALYSIS = dict(mta.CONFIG, stability_seeds=1, stability_epoch_quantiles=[0.5], chunk_size=100,
                device="cpu", figures=False)
CLUSTER = dict(clustering.CONFIG, n_groups=40, n_restarts=3, figures=False)
R_KEYS = {"k", "k_argmax", "above_null", "col_labels", "col_labels_by_k", "matrix",
          "unresponsive", "row_names", "variance_hash", "k_ref", "fixed_k", "ks", "silhouette",
          "null_silhouettes", "null_band", "null_pointwise", "above", "row_k", "row_labels",
          "row_labels_by_k", "linkage", "leaf_order"}  # the format the lesion stage reads


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
        assert tuple(arrays[rep]) == vc.REP_FORMS[rep]
        for form in vc.REP_FORMS[rep]:
            assert arrays[rep][form].shape == (49, n)
    assert "normalized" not in arrays["modulation_weighted"]  # equals modulation's exactly
    np.testing.assert_allclose(arrays["modulation"]["normalized"],
                               vc.normalize_columns(arrays["modulation"]["unnormalized"]),
                               atol=1e-6)
    assert set(arrays["perturbed"]) == {"noise_seed0", "quantile_0.5"}
    for design in arrays["perturbed"].values():
        assert set(design) == {"input", "hidden"} and design["hidden"].shape == (49, 16)
    assert attrs["analysis"]["variance"] == "per_step"
    assert sum(attrs["n_conditions"].values()) == 6 * 16 + 5 * 240 + 2 * 224 + 2 * 72
    assert set(arrays["pca"]) == set(attrs["windows"]) and len(attrs["windows"]) == 15
    for figure in ("variance_normalized", "variance_unnormalized", "weights", "hidden_pca"):
        assert paths.figure(figure).exists()

    cluster(name, figures=True)
    ci, ci_attrs = helper.load_h5(paths.cluster_info, "clustering")
    ci_mod, _ = helper.load_h5(paths.cluster_info_mod, "clustering")
    assert ci_attrs["fixed_k"] == 20 and ci_attrs["variance_hash"] == attrs["config_hash"]
    assert set(ci) == set(vc.UNIT_REPS) and set(ci_mod) == set(vc.SYNAPSE_REPS)
    assert set(ci_mod["modulation_weighted"]) == {"unnormalized"}
    for info, reps in ((ci, vc.UNIT_REPS), (ci_mod, vc.SYNAPSE_REPS)):
        for rep in reps:
            for form in vc.REP_FORMS[rep]:
                check_entry(info[rep][form], n_cols[rep], form, attrs["config_hash"])
    for rep in vc.UNIT_REPS:
        st = ci[rep]["normalized"]["stability"]
        assert st["design"].tolist() == ["noise_seed0", "quantile_0.5"]
        assert st["ari"].shape == (2,) and np.all(st["ari"] <= 1)
    R = ci_mod["modulation"]["normalized"]
    assert "groups" in R  # pre-grouped (256 > 40)
    assert R["over_membership"]["om"].shape == (
        R["col_labels"].max() + 1, ci["input"]["normalized"]["col_labels"].max() + 1,
        ci["hidden"]["normalized"]["col_labels"].max() + 1)
    figures = ["k_selection", "k_stability"] + [
        f"{kind}_{rep}_{form}" for kind, reps in (("clusters", n_cols),
                                                  ("over_membership", vc.SYNAPSE_REPS))
        for rep in reps for form in vc.REP_FORMS[rep]]
    for figure in figures:
        assert paths.figure(figure).exists(), figure
    assert not list(paths.dir.glob("*.pkl"))


def check_entry(R, n, form, variance_hash):
    """One <rep>/<form> group of a cluster file against the documented format."""
    assert R_KEYS <= set(R) and R["form"] == form and R["variance_hash"] == variance_hash
    assert R["col_labels"].shape == (n,) and R["matrix"].shape == (49, n)
    assert R["k"] == 0 or R["above_null"]
    assert R["k_ref"] == (R["k"] or R["k_argmax"])
    assert (R["col_labels"][R["unresponsive"]] == R["k_ref"]).all()
    assert R["fixed_k"] == min(20, R["ks"][-1])
    for k in {R["k_argmax"], R["fixed_k"]} | ({R["k"]} - {0}):
        assert str(k) in R["col_labels_by_k"]
    for k, labels in R["col_labels_by_k"].items():
        assert labels.shape == (n,) and (labels[R["unresponsive"]] == int(k)).all()
        assert len(np.unique(labels[~R["unresponsive"]])) == int(k)
    np.testing.assert_array_equal(R["col_labels"], R["col_labels_by_k"][str(R["k_ref"])])
    assert R["null_silhouettes"].shape == (20, len(R["ks"]))
    assert R["row_labels"].shape == (49,) and str(R["row_k_ref"]) in R["row_labels_by_k"]


def test_analysis_twice_gives_bit_identical_matrices(runs):
    name = runs[0]
    paths = helper.run_paths(name)
    first = analyse(name)[name][0]
    saved, _ = helper.load_h5(paths.variance, "analysis")
    second = analyse(name)[name][0]
    again, _ = helper.load_h5(paths.variance, "analysis")
    for rep in first:
        np.testing.assert_array_equal(first[rep], second[rep])
        for form in vc.REP_FORMS[rep]:
            np.testing.assert_array_equal(saved[rep][form], again[rep][form])
    for design, reps in saved["perturbed"].items():
        for rep, V in reps.items():
            np.testing.assert_array_equal(V, again["perturbed"][design][rep])
    # the noise design differs from the main one, and only by the noise
    assert not np.array_equal(saved["perturbed"]["noise_seed0"]["hidden"],
                              saved["hidden"]["unnormalized"])


def test_streamed_modulation_variance_equals_recorded_m_history(runs):
    paths = helper.run_paths(runs[0])
    net, train_cfg, _ = mpn.load_run(paths, "cpu", ANALYSIS["engine"])
    # one rule per family shape (the whole set would only repeat them, slowly)
    trials = mta.analysis_trials(["fdgo", "contextdelaydm1", "dmsnogo"], train_cfg["seed"])
    raw, rows, _ = mta.compute_variances(net, trials, chunk_size=50)  # unequal chunks
    ref = {rep: [] for rep in raw}
    W = net.mp.W.detach().double()
    with torch.no_grad():
        for rule, t in trials.items():
            out = net(torch.as_tensor(t["inputs"]), record=("x", "M"))
            M = out["M"].double()  # (B, T, N_post, N_pre): M_{t-1}
            z = {"input": out["x"], "hidden": out["h"], "modulation": M.flatten(2),
                 "modulation_weighted": (M * W).flatten(2)}
            for rep, value in z.items():
                ref[rep].append(vc.task_variance_matrix({rule: value.double().numpy()},
                                                         {rule: t["windows"]}))
    assert len(rows) == 2 + 5 + 3
    for rep, V in raw.items():
        expected = np.concatenate(ref[rep])
        np.testing.assert_allclose(V, expected, rtol=1e-4, atol=1e-7 * expected.max(), err_msg=rep)


def test_missing_stale_or_bad_inputs_stop_with_one_sentence(runs):
    name = runs[0]
    with pytest.raises(helper.StageError, match="python multiple_task.py"):
        analyse("no_such_run")
    with pytest.raises(helper.StageError, match="unknown variance mode 'yang'"):
        analyse(name, variance="yang")
    with pytest.raises(helper.StageError, match=f"python multiple_task_analysis.py --run={name}"):
        cluster(name)
    analyse(name)
    paths = helper.run_paths(name)
    ckpt = net_helpers.load_checkpoint(paths.checkpoint)
    net = mpn.model_from_checkpoint(ckpt)
    net_helpers.save_checkpoint(paths.checkpoint, net, ckpt["config"], ckpt["step"] + 10)
    with pytest.raises(helper.StageError, match=f"rerun `python multiple_task_analysis.py "
                                                f"--run={name}`"):
        cluster(name)
    with torch.no_grad():  # an embedding that ignores its input: every x column is silent
        net.W_in.zero_()
    net_helpers.save_checkpoint(paths.checkpoint, net, ckpt["config"], ckpt["step"] + 20)
    analyse(name, stability_seeds=0, stability_epoch_quantiles=[])
    with pytest.raises(helper.StageError, match="every column of input .* is unresponsive"):
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
    assert not set(ci_mod) & set(vc.SYNAPSE_REPS)
