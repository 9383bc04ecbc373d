"""Lesions and perturbations of one trained run (SPEC §6): which clusters of input units,
hidden units and synapses the network needs for which rule, how it fails without them, how it
tolerates pruning, and how robust it is to silencing and weight noise.

Experiments (select them with --experiments):
  single      each input (embedding) cluster and each hidden cluster silenced alone, at the
              fixed k and at the selected k, for normalized and unnormalized clusterings,
              each with `n_random` size-matched random controls drawn from the units
              *outside* the cluster;
  combined    every (input cluster, hidden cluster) pair at the fixed k silenced together,
              with random controls (the pair of the two singles' controls);
  modulation  every modulation clustering (M normalized and unnormalized; W⊙M unnormalized
              only, its normalized form equals M's): `zero_W` (W = 0 on the cluster's
              synapses) and `freeze_M` (M held at 0 there, W intact), with
              `n_random_modulation` random synapse sets of the same size outside the cluster
              as controls (shared by both kinds);
  prune       the smallest |W| entries of the plastic layer zeroed at each sparsity;
  robust      a random fraction of W entries zeroed, a random fraction of hidden units
              silenced, Gaussian noise on W (absolute sigma, and sigma relative to the RMS
              weight ‖W‖_F/√(N·N_pre)), `n_draws` draws per level.

Test set (SPEC §6.1), one per run, reused by every condition: per rule the complete condition
set (mpn_tasks.condition_set) at duration quantiles spread over `epoch_quantile_range` (more of
them for rules whose set is small), with the run's training input noise (or `input_noise`),
`trials_per_rule` trials taken at
an even stride. Per condition and rule: both accuracy measures and the failure kinds
(mpn_tasks.failure_kind: broke fixation / wrong or no response on go / responded on no-go).

Significance (SPEC §6.2), per cell (cluster x rule) of every heatmap: effect = mean control
accuracy − lesion accuracy; z = effect / √(s_c²(1 + 1/m) + s_L²), with s_c the spread of the
m random controls and s_L the binomial s.e. of the lesion accuracy on the test set; one-sided
p from Student's t with m − 1 degrees of freedom; Benjamini–Hochberg q over the heatmap's
cells. A cell is significant when q ≤ `alpha` and the lesion accuracy is below every control.

Conditions are data (net_helpers.Perturbation), evaluated batched by lesion_engine, shared
among `processes` forked worker processes (same scores in any number).

Reads:  runs/<aname>/checkpoint.pt, cluster_info.h5, cluster_info_mod.h5 (python clustering.py)
        (task_variance.h5 when a clustering lacks its variance matrix).
Writes: runs/<aname>/lesion.h5 (lesion_engine.save_result / load_result):
    rules, n_trials (R,)   the R rules (columns of every score array), test trials per rule
    scores/<name>          (C, R) per condition: angle, trial (accuracies), broke_fixation,
                           wrong_go, nogo_response (fractions of trials; sum = 1 − trial)
    baseline               angle, trial, se_angle, se_trial (R,): the intact network
    conditions             the C conditions (id 0 = intact), lesion_engine.conditions_from_arrays
    single/<name>          name = "<input|hidden>-<form>-<fixed|selected>": k, labels, clusters,
                           sizes, unresponsive, lesion (n_clusters,) condition ids, control
                           (n_clusters, n_random) ids (-1: none possible), profiles, hidden:
                           readout_share (n_clusters, n_outputs) of ‖W_out‖² per output,
                           stats/<measure>: effect, p, q, significant (n_clusters, R)
    combined/<form-fixed>  clusters, pairs (P, 2), lesion (P,), control (P, n), the singles'
                           ids, stats/<measure> (P, R)
    modulation/<name>      as single, with zero_W, freeze_M and their _control and stats
    prune                  sparsity (L,), cond (L,)
    robust/<battery>       levels (L,), cond (L, n_draws); w_zero, hid_silence, w_noise,
                           w_noise_rel
    plus run, checkpoint_step, shapes, test design, config and seconds (attributes).

Axis order: trials x time x units, (B, T, N); W is (N_post, N_pre) and synapse indices are
flattened post-major (i_post * N_pre + j_pre), as in cluster_info_mod.

Example:
    python lesion.py --run=everything_dmpn_seed749_L21e4_h300_b128
    python lesion.py --run=everything_dmpn_seed749_L21e4_h300_b128 --experiments="['single','prune']"
"""
import time
import zlib
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import torch

import helper
import mpn
import mpn_cpp
import mpn_tasks
import net_helpers
from lesion_engine import (ConditionTable, evaluate_conditions, family_name,
                           net_shapes, plastic_weight, save_result)

CONFIG = dict(
    run="everything_dmpn_seed*",  # run name or glob (quote globs in the shell) {@run_pattern}
    runs_dir=None,  # runs root; None = $MPN_RUNS_DIR, else runs/ {None | @path}
    experiments=["single", "combined", "modulation", "prune", "robust"],  # any subset {each single | each combined | each modulation | each prune | each robust}
    trials_per_rule=128,  # test trials per rule: binomial s.e. of a per-rule accuracy a is √(a(1−a)/n), ≤ 0.03 for a ≥ 0.87 {>= 8}
    epoch_quantile_range=[0.25, 0.75],  # epoch durations spread over this range of quantiles (more quantiles where a rule's condition set is small) {@increasing_pair}
    input_noise=None,  # sigma_x of the test trials; None: the run's training sigma_x {None | >= 0}
    n_random=20,  # size-matched random controls per unit cluster (single lesions); significance needs 2 {>= 1}
    n_random_modulation=10,  # random synapse-set controls per synapse cluster, shared by zero_W and freeze_M: each reruns ~all hidden units (random synapses touch every row), at 20 they were half the suite's time; significance needs 2 {>= 1}
    n_random_combined=5,  # random controls per (input, hidden) cluster pair (400 pairs at k=20); significance needs 2 {>= 1}
    alpha=0.05,  # false-discovery rate of the Benjamini–Hochberg control over each heatmap {> 0, < 1}
    fixed_cut_k=None,  # k of the "fixed" cuts (SPEC §6.1); None: the clustering's fixed_k (cluster_info, 20); nearest available k if absent {None | >= 2}
    unit_reps=["input", "hidden"],  # unit clusterings lesioned alone (single) {each input | each hidden}
    k_cuts=["fixed", "selected"],  # unit clusterings cut at the fixed k and/or the selected k {each fixed | each selected}
    forms=["normalized", "unnormalized"],  # variance forms whose clusterings are lesioned {each normalized | each unnormalized}
    combined_forms=["normalized"],  # forms whose fixed-k clusterings get all pair lesions {each normalized | each unnormalized}
    mod_reps=["modulation", "modulation_weighted"],  # synapse clusterings for zero_W/freeze_M {each modulation | each modulation_weighted}
    mod_k_cuts=["fixed"],  # synapse clusterings cut at "fixed" and/or "selected" k (the selected k of synapses can exceed 100: 2 x 21 conditions per cluster) {each fixed | each selected}
    prune_sparsity=[0, 0.1, 0.5, 0.9, 0.95, 0.98, 0.99, 0.999],  # fractions of W zeroed by |W| {each >= 0, < 1}
    zero_fractions=[0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],  # random W entries zeroed {each >= 0, <= 1}
    silence_fractions=[0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],  # random hidden units silenced {each >= 0, <= 1}
    noise_sigmas=[0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03],  # absolute std of noise added to W {each >= 0}
    noise_rel_sigmas=[0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0],  # noise std in units of the RMS weight ‖W‖_F/√(N·N_pre) {each >= 0}
    n_draws=10,  # random draws per robustness level (a curve of means: 10 draws x 1,920 test trials per point; 30 took a quarter of the suite's CPU time) {>= 1}
    memory_mb=None,  # memory budget of one forward pass in MB (how many conditions share it); None: 32 on CPU (more only spills the caches: 128 ran 25% slower with 40% more memory), 2048 on a GPU {None | > 0}
    processes=0,  # processes sharing the conditions (forked_jobs.run_jobs; 0: one per core; CUDA or not Linux: 1); same scores in any number {>= 0}
    kernel_threads=1,  # compiled-kernel threads per process (0: $MPN_KERNEL_THREADS, else 1); 2 helps only when processes leave cores idle {>= 0}
    num_threads=1,  # torch CPU threads (0: torch's default); 1 ran this stage 2x faster than 2 on the shared 2-core machine, and on idle cores 2 was slower too (> 400 s vs 337 s) {>= 0}
    device="auto",  # "auto" (cuda if available), "cpu" or "cuda" {@device}
    engine="auto",  # plastic-layer engine of mpn_engine: "auto", "fast" or "reference" {@engine}
)

MEASURES = ("trial", "angle")
# Seed streams (second entry of the numpy seed list, after the run seed).
TEST_STREAM, CONTROL_STREAM, ROBUST_STREAM = 70, 71, 72


# ----------------------------------------------------------------------------------------
# Random draws


def draw_outside(rng, n_total, members, size):
    """`size` indices drawn without replacement from [0, n_total) minus `members`."""
    outside = np.setdiff1d(np.arange(n_total), members)
    return np.sort(rng.choice(outside, size=size, replace=False))


def control_draws(run_seed, n_total, members, n_random):
    """Size-matched random controls of one cluster, seeded by the cluster's own members so
    an identical cluster (e.g. selected k == fixed k) gets identical, deduplicated controls.
    None when fewer than |cluster| units lie outside it."""
    members = np.asarray(members, dtype=np.int64)
    if n_total - members.size < members.size or members.size == 0:
        return None
    tag = zlib.crc32(members.tobytes()) ^ n_total
    rng = np.random.default_rng([run_seed, CONTROL_STREAM, tag])
    return [draw_outside(rng, n_total, members, members.size) for _ in range(n_random)]


def random_subset(run_seed, battery, level, draw, n_total, fraction):
    rng = np.random.default_rng([run_seed, ROBUST_STREAM, battery, level, draw])
    return rng.choice(n_total, size=int(round(fraction * n_total)), replace=False)


# ----------------------------------------------------------------------------------------
# Experiments: each returns its tables of condition ids


def _labels_at(R, cut, fixed_k):
    """(k, column labels) of one clustering at the fixed or the selected k (col_labels_by_k
    is keyed by k as a string, as HDF5 group names are)."""
    if cut == "selected":
        return int(R["k"]), np.asarray(R["col_labels"])
    by_k = R["col_labels_by_k"]
    k = min(by_k, key=lambda kk: (abs(int(kk) - fixed_k), int(kk)))
    return int(k), np.asarray(by_k[k])


def _profiles(R, variance, rep, form, labels, clusters):
    """Cluster-mean task-variance profiles (n_clusters, n_rows) for the tuning-similarity
    analysis, from the clustered matrix (or variance(rep, form), from task_variance.h5, when
    that lacks columns); None when neither has one column per unit / synapse."""
    matrix = np.asarray(R.get("matrix")) if R.get("matrix") is not None else None
    if matrix is None or matrix.ndim != 2 or matrix.shape[1] != labels.size:
        matrix = variance(rep, form) if variance is not None else None
        if matrix is None or np.asarray(matrix).shape[1] != labels.size:
            return None
        matrix = np.asarray(matrix)
    return np.stack([matrix[:, labels == c].mean(axis=1) for c in clusters])


def cluster_table(R, cut, fixed_k, n_total):
    """Clusters of one clustering: labels, members, sizes, unresponsive flags."""
    k, labels = _labels_at(R, cut, fixed_k)
    clusters = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in clusters]
    unresp = np.asarray(R.get("unresponsive", np.zeros(n_total, bool)), dtype=bool)
    return {"k": k, "labels": labels.astype(np.int32), "clusters": clusters,
            "members": members, "sizes": np.array([m.size for m in members]),
            "unresponsive": np.array([bool(unresp[m].all()) for m in members]),
            "row_names": [str(r) for r in R.get("row_names", [])]}


def _lesion_and_controls(table, field, members_list, n_total, n_random, run_seed):
    """Condition ids (n_clusters,) of the lesions and (n_clusters, n_random) of controls."""
    lesion = np.array([table.add({field: m}) for m in members_list])
    control = np.full((len(members_list), n_random), -1)
    for c, m in enumerate(members_list):
        draws = control_draws(run_seed, n_total, m, n_random)
        if draws is not None:
            control[c] = [table.add({field: d}) for d in draws]
    return lesion, control


def _cuts(R, cuts, what):
    """The k cuts to lesion: 'selected' is skipped (with a note) when the clustering found
    no structure above chance (k = 0)."""
    if "selected" in cuts and int(R["k"]) == 0:
        print(f"  {what}: no structure above chance (selected k = 0); only the fixed k is "
              f"lesioned")
        return [c for c in cuts if c != "selected"]
    return list(cuts)


def readout_share(W_out, labels, clusters):
    """(n_clusters, n_outputs): each cluster's share of ‖W_out[o, :]‖² for every output o."""
    sq = np.asarray(W_out, dtype=np.float64) ** 2
    total = np.maximum(sq.sum(axis=1), 1e-30)
    return np.stack([sq[:, labels == c].sum(axis=1) / total for c in clusters])


def single_experiments(table, d):
    """SPEC §6.1 items 1-2: every input/hidden clustering asked for; hidden clusterings
    carry each cluster's readout share."""
    ci, variance, cfg, run_seed, n_units, W_out = (d.ci, d.variance, d.cfg, d.run_seed,
                                                   d.n_units, d.W_out)
    out = {}
    for rep, field in (("input", "in_units"), ("hidden", "hid_units")):
        if rep not in cfg["unit_reps"]:
            continue
        for form in cfg["forms"]:
            for cut in _cuts(ci[rep][form], cfg["k_cuts"], f"{rep} {form}"):
                t = cluster_table(ci[rep][form], cut, cfg["fixed_cut_k"], n_units[rep])
                if rep == "hidden" and W_out is not None:
                    t["readout_share"] = readout_share(W_out, t["labels"], t["clusters"])
                t["lesion"], t["control"] = _lesion_and_controls(
                    table, field, t["members"], n_units[rep], cfg["n_random"], run_seed)
                t["profiles"] = _profiles(ci[rep][form], variance, rep, form, t["labels"],
                                          t["clusters"])
                t.update(rep=rep, form=form, cut=cut, field=field)
                del t["members"]
                out[f"{rep}-{form}-{cut}"] = t
    return out


def combined_experiments(table, d):
    """SPEC §6.1 item 3: every (input cluster, hidden cluster) pair at the fixed k; control d
    pairs the d-th random controls of the two single clusters."""
    ci, cfg, run_seed, n_units = d.ci, d.cfg, d.run_seed, d.n_units
    out = {}
    n_rand = cfg["n_random_combined"]
    for form in cfg["combined_forms"]:
        tin = cluster_table(ci["input"][form], "fixed", cfg["fixed_cut_k"], n_units["input"])
        thid = cluster_table(ci["hidden"][form], "fixed", cfg["fixed_cut_k"], n_units["hidden"])
        res = {"form": form, "k_input": tin["k"], "k_hidden": thid["k"],
               "input_clusters": tin["clusters"], "hidden_clusters": thid["clusters"],
               "input_sizes": tin["sizes"], "hidden_sizes": thid["sizes"]}
        ctrl = {}
        for name, t, field in (("input", tin, "in_units"), ("hidden", thid, "hid_units")):
            res[f"{name}_lesion"], res[f"{name}_control"] = _lesion_and_controls(
                table, field, t["members"], n_units[name], cfg["n_random"], run_seed)
            ctrl[name] = [control_draws(run_seed, n_units[name], m, n_rand) for m in t["members"]]
        pairs = [(i, j) for i in range(len(tin["clusters"])) for j in range(len(thid["clusters"]))]
        res["pairs"] = np.array(pairs, dtype=np.int32).reshape(-1, 2)
        res["lesion"] = np.array([table.add({"in_units": tin["members"][i],
                                             "hid_units": thid["members"][j]}) for i, j in pairs])
        res["control"] = np.full((len(pairs), n_rand), -1)
        for p, (i, j) in enumerate(pairs):
            if ctrl["input"][i] is not None and ctrl["hidden"][j] is not None:
                res["control"][p] = [table.add({"in_units": a, "hid_units": b})
                                     for a, b in zip(ctrl["input"][i], ctrl["hidden"][j])]
        out[f"{form}-fixed"] = res
    return out


def modulation_experiments(table, d):
    """SPEC §6.1 item 4: zero_W and freeze_M on every synapse cluster, with shared random
    synapse-set controls."""
    ci_mod, variance, cfg, run_seed, n_syn = d.ci_mod, d.variance, d.cfg, d.run_seed, d.W.size
    out = {}
    for rep in cfg["mod_reps"]:
        # W⊙M normalized equals M normalized (SPEC §5.2): never lesioned twice
        forms = [f for f in cfg["forms"] if f in ci_mod[rep] and
                 (rep, f) != ("modulation_weighted", "normalized")]
        for form in forms:
            for cut in _cuts(ci_mod[rep][form], cfg["mod_k_cuts"], f"{rep} {form}"):
                t = cluster_table(ci_mod[rep][form], cut, cfg["fixed_cut_k"], n_syn)
                for kind, field in (("zero_W", "w_zero"), ("freeze_M", "m_freeze")):
                    t[kind] = np.array([table.add({field: m}) for m in t["members"]])
                    t[f"{kind}_control"] = np.full((len(t["members"]),
                                                    cfg["n_random_modulation"]), -1)
                for c, m in enumerate(t["members"]):
                    draws = control_draws(run_seed, n_syn, m, cfg["n_random_modulation"])
                    for kind, field in (("zero_W", "w_zero"), ("freeze_M", "m_freeze")):
                        if draws is not None:
                            t[f"{kind}_control"][c] = [table.add({field: d}) for d in draws]
                t["profiles"] = _profiles(ci_mod[rep][form], variance, rep, form,
                                          t["labels"], t["clusters"])
                t.update(rep=rep, form=form, cut=cut)
                del t["members"]
                out[f"{rep}-{form}-{cut}"] = t
    return out


def prune_experiment(table, d):
    """SPEC §6.1 item 5: zero the smallest |W| entries at each sparsity."""
    order = np.argsort(np.abs(d.W).ravel(), kind="stable")
    levels = np.asarray(d.cfg["prune_sparsity"], dtype=float)
    ids = [table.add({"w_zero": order[:int(round(s * order.size))]}) for s in levels]
    return {"sparsity": levels, "cond": np.array(ids)}


def robust_experiments(table, d):
    """SPEC §6.1 item 6: (levels, (n_levels, n_draws) condition ids) per battery."""
    W, cfg, run_seed = d.W, d.cfg, d.run_seed
    n_hidden, n_pre = W.shape
    rms = float(np.linalg.norm(W) / np.sqrt(W.size))
    batteries = {
        "w_zero": ("fraction of W entries zeroed", cfg["zero_fractions"],
                   lambda li, d, f: {"w_zero": random_subset(run_seed, 0, li, d, W.size, f)}),
        "hid_silence": ("fraction of hidden units silenced", cfg["silence_fractions"],
                        lambda li, d, f: {"hid_units": random_subset(run_seed, 1, li, d,
                                                                     n_hidden, f)}),
        "w_noise": ("σ of Gaussian noise added to W", cfg["noise_sigmas"],
                    lambda li, d, s: {"w_noise": {"seed": [run_seed, ROBUST_STREAM, 2, li, d],
                                                  "sigma": s}}),
        "w_noise_rel": ("noise σ / RMS weight (‖W‖_F/√(N·N_pre))", cfg["noise_rel_sigmas"],
                        lambda li, d, s: {"w_noise": {"seed": [run_seed, ROBUST_STREAM, 3, li, d],
                                                      "sigma": s * rms}}),
    }
    out = {}
    for name, (xlabel, levels, make) in batteries.items():
        ids = [[table.add(make(li, d, lv)) for d in range(cfg["n_draws"])]
               for li, lv in enumerate(levels)]
        out[name] = {"levels": np.asarray(levels, dtype=float), "cond": np.array(ids),
                     "xlabel": xlabel}
    out["w_noise_rel"]["rms_weight"] = rms
    return out


@dataclass
class Design:
    """What the experiment builders read: the stage config (fixed_cut_k resolved), the run
    seed, the weights W (N_hidden, N_pre) that synapse lesions act on, the readout W_out
    (n_out, N_hidden), the cluster files as nested dicts (or None) and variance(rep, form)."""
    cfg: dict
    run_seed: int
    W: np.ndarray
    W_out: np.ndarray = None
    ci: dict = None
    ci_mod: dict = None
    variance: object = None

    @property
    def n_units(self):
        return {"input": self.W.shape[1], "hidden": self.W.shape[0]}


# The experiments, in run order: name -> (builder(table, Design) -> its tables of condition
# ids, the cluster file it reads (a RunPaths attribute) or None, the Perturbation field a
# network must apply to run it or None). Adding one = its builder, a line here, and its name
# in CONFIG["experiments"]'s allowed values.
Experiment = namedtuple("Experiment", "build clusters needs")
EXPERIMENTS = {
    "single": Experiment(single_experiments, "cluster_info", None),
    "combined": Experiment(combined_experiments, "cluster_info", "in_mask"),
    "modulation": Experiment(modulation_experiments, "cluster_info_mod", "m_freeze"),
    "prune": Experiment(prune_experiment, None, None),
    "robust": Experiment(robust_experiments, None, None),
}


# ----------------------------------------------------------------------------------------
# Loading


def load_clusters(paths, experiments):
    """cluster_info (and cluster_info_mod when needed) as nested dicts <rep>/<form>/...,
    refused when missing or stale; plus the fixed k they were written with (or None)."""
    out, fixed_k = {}, None
    for attr in ("cluster_info", "cluster_info_mod"):
        if not any(EXPERIMENTS[e].clusters == attr for e in experiments):
            out[attr] = None
            continue
        path = getattr(paths, attr)
        out[attr], attrs = helper.load_h5(path)
        check_clusters_fresh(paths, attr, out[attr])
        fixed_k = attrs.get("fixed_k", fixed_k)
    return out["cluster_info"], out["cluster_info_mod"], variance_reader(paths), fixed_k


def _text(value):
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode() if isinstance(value, bytes) else str(value)


def check_clusters_fresh(paths, attr, info):
    """A cluster file (RunPaths attribute `attr`) is stale when it was computed from another
    task_variance.h5 than the one now in the run folder (the variance hash it records), or
    when it or the variance file is older than its input (RunPaths.check_fresh: the
    manifest's input hashes, file times only for files without them, so a copied run folder
    with new times stays usable)."""
    path = getattr(paths, attr)
    hashes = {_text(R["variance_hash"]) for forms in info.values() if isinstance(forms, dict)
              for R in forms.values() if isinstance(R, dict) and "variance_hash" in R}
    if hashes and paths.variance.exists():
        if hashes != {helper.load_h5(paths.variance)[1].get("config_hash")}:
            raise helper.StageError(f"{str(path)!r} was computed from another "
                                    f"{paths.variance.name}; rerun `{paths.producer(path)}`.")
    paths.check_fresh(attr)


def variance_reader(paths):
    """variance(rep, form) -> the task-variance matrix from task_variance.h5 (read once, and
    only if asked: the cluster files normally carry the matrices), or None."""
    cache = {}

    def variance(rep, form):
        if "arrays" not in cache:
            cache["arrays"] = helper.load_h5(paths.variance)[0] if paths.variance.exists() else {}
        return cache["arrays"].get(rep, {}).get(form)
    return variance


# ----------------------------------------------------------------------------------------
# The test set (SPEC §6.1): condition sets at several duration quantiles


def condition_batch(rule, quantile, rng, sigma_x, io_mode):
    """The complete condition set of one rule at one duration quantile."""
    return mpn_tasks.condition_set(rule, rng=rng, quantile=quantile, sigma_x=sigma_x,
                                   io_mode=io_mode)


def rule_test_parts(rule, cfg, rng, sigma_x, io_mode):
    """One rule's test trials as parts of equal duration (no padding): its condition set at
    max(3, ⌈n / set size⌉) quantiles evenly spaced over epoch_quantile_range, of which
    n = trials_per_rule trials are taken at an even stride through the concatenated sets.
    Returns [(quantile, batch)]."""
    lo, hi = cfg["epoch_quantile_range"]
    n = cfg["trials_per_rule"]
    first = condition_batch(rule, lo, rng, sigma_x, io_mode)
    size = len(first.rule)
    quantiles = np.linspace(lo, hi, max(3, -(-n // size)))
    pick = (np.arange(n) * (size * len(quantiles))) // n
    parts = []
    for j, q in enumerate(quantiles):
        batch = first if j == 0 else condition_batch(rule, q, rng, sigma_x, io_mode)
        sel = pick[(pick >= j * size) & (pick < (j + 1) * size)] - j * size
        if sel.size:
            parts.append((float(q), batch.take(sel)))
    return parts


def make_test_set(rules, cfg, run_seed, io_mode, sigma_x):
    """The fixed test set: a list of parts (batches of one rule and one duration) with the
    rule index of each part; seeded from the run seed."""
    if cfg["trials_per_rule"] < 8:
        raise helper.StageError(f"trials_per_rule must be at least 8, not "
                                f"{cfg['trials_per_rule']}.")
    lo, hi = cfg["epoch_quantile_range"]
    if not 0 <= lo <= hi <= 1:
        raise helper.StageError(f"epoch_quantile_range must be two quantiles 0 <= lo <= hi <= "
                                f"1, not {cfg['epoch_quantile_range']}.")
    rng = np.random.default_rng([run_seed, TEST_STREAM])
    parts, part_rule, quantiles = [], [], []
    for r, rule in enumerate(rules):
        for q, batch in rule_test_parts(rule, cfg, rng, sigma_x, io_mode):
            parts.append(batch)
            part_rule.append(r)
            quantiles.append(q)
    return {"parts": parts, "part_rule": np.array(part_rule), "quantile": np.array(quantiles)}


def part_weights(test):
    """Per part: its trial count (weights of trial-based scores) and its scored response
    steps (weights of the angle measure, which pools a rule's scored steps)."""
    n = np.array([len(b.rule) for b in test["parts"]], dtype=float)
    steps = np.array([mpn_tasks.score_angle(b.targets, b)[1].sum() for b in test["parts"]],
                     dtype=float)
    return n, steps


def merge_parts(scores, test, n_rules):
    """{score: (C, n_parts)} -> {score: (C, R)}: exact pooled per-rule values."""
    n, steps = part_weights(test)
    out = {}
    for name, values in scores.items():
        w = steps if name == "angle" else n
        merged = np.zeros((values.shape[0], n_rules))
        for r in range(n_rules):
            sel = test["part_rule"] == r
            merged[:, r] = values[:, sel] @ w[sel] / w[sel].sum()
        out[name] = merged.astype(np.float32)
    return out


def baseline_accuracy(net, test, rules):
    """Per-rule accuracy of the intact network under both measures (one plain evaluate of
    each rule's trials) with its s.e. over the trials (mpn_tasks.ratio_se, as in training)."""
    out = {k: np.zeros(len(rules)) for k in ("angle", "trial", "se_angle", "se_trial")}
    for r, rule in enumerate(rules):
        parts = [b for b, pr in zip(test["parts"], test["part_rule"]) if pr == r]
        res = net_helpers.evaluate(net, mpn_tasks.concat_batches(parts))
        for measure in MEASURES:
            out[measure][r] = res["acc"][measure][rule]
            out[f"se_{measure}"][r] = res["acc_se"][measure][rule]
    return out


# ----------------------------------------------------------------------------------------
# Statistics (SPEC §6.2)


def control_values(score, control):
    """(n, m, R) scores of the random controls; NaN where a control is missing (id -1)."""
    control = np.asarray(control)
    values = np.asarray(score, dtype=np.float64)[np.maximum(control, 0)]
    return np.where(control[..., None] >= 0, values, np.nan)


def benjamini_hochberg(p):
    """Benjamini–Hochberg adjusted p values (q) over the finite entries of p (any shape)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return q
    order = np.argsort(p[ok])
    ranked = p[ok][order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    vals = np.empty(m)
    vals[order] = np.minimum(adjusted, 1.0)
    q[ok] = vals
    return q


def significance(score, lesion, control, n_trials, alpha):
    """Effect, p, BH q and the significance call of every (cluster, rule) cell of one
    heatmap (module docstring, 'Significance'). score (C, R); lesion (n,); control (n, m);
    n_trials (R,) test trials per rule."""
    from scipy.stats import t as student_t
    ctrl = control_values(score, control)
    m = np.isfinite(ctrl).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_c = np.nansum(ctrl, axis=1) / m
        sd_c = np.sqrt(np.nansum((ctrl - mean_c[:, None]) ** 2, axis=1) / (m - 1))
        lesioned = np.asarray(score, dtype=np.float64)[np.asarray(lesion)]
        p_tilde = (lesioned * n_trials + 1) / (n_trials + 2)  # s.e. > 0 even at 0 or 1
        se = np.sqrt(sd_c ** 2 * (1 + 1 / m) + p_tilde * (1 - p_tilde) / n_trials)
        effect = mean_c - lesioned
        p = np.where(m >= 2, student_t.sf(effect / se, df=np.maximum(m - 1, 1)), np.nan)
        below_all = lesioned < np.nanmin(np.where(m[:, None] > 0, ctrl, np.inf), axis=1)
    q = benjamini_hochberg(p)
    effect = np.where(m > 0, effect, np.nan)
    return {"effect": effect, "p": p, "q": q,
            "significant": np.isfinite(q) & (q <= alpha) & below_all}


def lesion_kinds(t):
    """(kind, lesion ids, control ids) of one table: 'lesion' for unit and pair lesions (and
    'input', 'hidden' for the singles of a combined table), zero_W and freeze_M for synapse
    clusters."""
    if "zero_W" in t:
        return [(k, t[k], t[f"{k}_control"]) for k in ("zero_W", "freeze_M")]
    singles = [(k, t[f"{k}_lesion"], t[f"{k}_control"]) for k in ("input", "hidden")
               if f"{k}_lesion" in t]  # the singles of a combined table, for additivity
    return [("lesion", t["lesion"], t["control"])] + singles


def add_statistics(result, alpha):
    """stats[kind][measure] = significance(...) on every single, combined and modulation
    table."""
    n_trials = np.asarray(result["n_trials"], dtype=np.float64)
    for group in ("single", "combined", "modulation"):
        for t in result.get(group, {}).values():
            t["stats"] = {kind: {m: significance(result["scores"][m], lesion, control,
                                                 n_trials, alpha) for m in MEASURES}
                          for kind, lesion, control in lesion_kinds(t)}


def print_summary(result, measure="trial"):
    """Baseline with its s.e., significant cells per heatmap, and the strongest cluster of
    each hidden clustering by failure kind and readout share."""
    base = result["baseline"]
    print(f"  intact network: trial {np.mean(base['trial']):.3f} (s.e. per rule "
          f"{base['se_trial'].min():.3f}-{base['se_trial'].max():.3f}), angle "
          f"{np.mean(base['angle']):.3f} (s.e. {base['se_angle'].max():.3f} at most); "
          f"{int(result['n_trials'][0])} trials per rule")
    for group in ("single", "modulation", "combined"):
        for t in result.get(group, {}).values():
            for kind, stats in t["stats"].items():
                if group == "combined" and kind != "lesion":
                    continue
                s = stats[measure]
                name = family_name(t, kind) if "rep" in t else f"combined {t['form']}"
                print(f"  {name:28s} significant cells {int(s['significant'].sum()):4d} / "
                      f"{int(np.isfinite(s['p']).sum())}")
    for t in result.get("single", {}).values():
        if t["rep"] == "hidden":
            describe_strongest(result, t, measure)


def describe_strongest(result, t, measure):
    eff = t["stats"]["lesion"][measure]["effect"]
    c = int(np.nanargmax(np.nanmean(eff, axis=1)))
    cid = t["lesion"][c]
    kinds = {k: float(np.mean(result["scores"][k][cid])) for k in
             ("broke_fixation", "wrong_go", "nogo_response")}
    share = t["readout_share"][c]
    print(f"  {family_name(t)}: strongest cluster {t['clusters'][c]} ({t['sizes'][c]} units)"
          f" mean effect {np.nanmean(eff[c]):+.2f}, significant in "
          f"{int(t['stats']['lesion'][measure]['significant'][c].sum())} rules; its lesion "
          f"fails trials by " + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items())
          + f"; readout share fixation {share[0]:.2f}, response {share[1:].mean():.2f}")


# ----------------------------------------------------------------------------------------


def build_conditions(cfg, net, ci, ci_mod, variance, run_seed):
    """(the ConditionTable, {experiment: its tables}) of the experiments cfg selects, built in
    EXPERIMENTS order (so condition ids do not depend on the order of cfg["experiments"])."""
    n_hidden, n_pre = net_shapes(net)
    table = ConditionTable({"in_units": n_pre, "hid_units": n_hidden,
                            "w_zero": n_hidden * n_pre, "m_freeze": n_hidden * n_pre})
    design = Design(cfg, run_seed, plastic_weight(net), net.W_out.detach().cpu().numpy(),
                    ci, ci_mod, variance)
    tables = {name: ex.build(table, design) for name, ex in EXPERIMENTS.items()
              if name in cfg["experiments"]}
    return table, tables


def check_config(cfg, net):
    """cfg with what this architecture cannot apply left out (a leaky RNN or GRU has no input
    layer and no plasticity: only hidden clusters, pruning and robustness), said once."""
    unknown = set(cfg["experiments"]) - set(EXPERIMENTS)
    if unknown:
        raise helper.StageError(f"unknown experiment(s) {sorted(unknown)}; choose from "
                                f"{list(EXPERIMENTS)}.")
    if min(cfg["n_random"], cfg["n_random_combined"], cfg["n_random_modulation"]) < 1:
        raise helper.StageError("n_random, n_random_combined and n_random_modulation must be "
                                "at least 1 (2 for significance: a control spread needs two "
                                "controls).")
    dropped = [name for name, ex in EXPERIMENTS.items() if name in cfg["experiments"]
               and ex.needs is not None and ex.needs not in net.perturbable]
    unit_reps = [r for r in cfg["unit_reps"] if r != "input" or "in_mask" in net.perturbable]
    experiments = [e for e in cfg["experiments"] if e not in dropped
                   and not (e == "single" and not unit_reps)]
    if not experiments:
        raise helper.StageError(f"a {net.net_type} network can apply none of the experiments "
                                f"{cfg['experiments']}; add 'single', 'prune' or 'robust'.")
    left_out = [*dropped, *(["input clusters"] if len(unit_reps) < len(cfg["unit_reps"]) else [])]
    if left_out:
        print(f"a {net.net_type} network has no input layer or plasticity to lesion: "
              f"left out {', '.join(left_out)}")
    return dict(cfg, experiments=experiments, unit_reps=unit_reps)


def run_experiments(net, tables_and_conditions, test, rules, desc, processes=1):
    """Scores (C, R) of every condition, the stored weights checked untouched."""
    table, _ = tables_and_conditions
    params_before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    scores = evaluate_conditions(net, test["parts"], table.conditions, desc=desc,
                                 memory_mb=None, processes=processes)
    if any(not torch.equal(v, net.state_dict()[k]) for k, v in params_before.items()):
        raise RuntimeError("a perturbation modified the stored weights")
    return merge_parts(scores, test, len(rules))


def lesion_run(paths, cfg):
    """Every selected experiment on one run; writes lesion.h5 and returns its dict."""
    t0 = time.time()
    net, train_cfg, step = mpn.load_run(paths, helper.get_device(cfg["device"]), cfg["engine"])
    cfg = check_config(cfg, net)
    ci, ci_mod, variance, fixed_k = load_clusters(paths, cfg["experiments"])
    cfg_k = dict(cfg, fixed_cut_k=int(cfg["fixed_cut_k"] or fixed_k or 20))
    run_seed = int(train_cfg["seed"])
    rules = mpn_tasks.run_rules(train_cfg)
    sigma_x = float(train_cfg.get("sigma_x", 0.0) if cfg["input_noise"] is None
                    else cfg["input_noise"])
    test = make_test_set(rules, cfg, run_seed, train_cfg.get("io_mode", "low_dim"), sigma_x)
    table, tables = build_conditions(cfg_k, net, ci, ci_mod, variance, run_seed)
    print(f"[{paths.name}] {len(table.conditions)} distinct conditions x {len(rules)} rules x "
          f"{cfg['trials_per_rule']} trials ({len(test['parts'])} test parts, sigma_x "
          f"{sigma_x:g})")
    scores = run_experiments(net, (table, tables), test, rules,
                             desc=f"{paths.name} lesion conditions", processes=cfg["processes"])
    n_hidden, n_pre = net_shapes(net)
    result = dict(tables, run=paths.name, checkpoint_step=step, rules=rules,
                  n_trials=np.full(len(rules), cfg["trials_per_rule"]),
                  conditions=table.conditions,
                  scores=scores, baseline=baseline_accuracy(net, test, rules),
                  shapes={"n_hidden": n_hidden, "n_pre": n_pre},
                  test={"seed": [run_seed, TEST_STREAM], "sigma_x": sigma_x,
                        "part_rule": test["part_rule"], "part_quantile": test["quantile"]},
                  config=dict(cfg), fixed_k=cfg_k["fixed_cut_k"])
    add_statistics(result, cfg["alpha"])
    result["seconds"] = time.time() - t0
    save_result(paths.lesion, result, cfg,
                inputs=[p for p in (paths.checkpoint, paths.cluster_info, paths.cluster_info_mod)
                        if p.exists()])
    return result


def main(cfg):
    """Lesion every run matching cfg["run"]; returns {aname: lesion dict}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["num_threads"] or threads)
    try:
        with mpn_cpp.using_threads(cfg["kernel_threads"]):
            return lesion_runs(cfg)
    finally:
        torch.set_num_threads(threads)


def lesion_runs(cfg):
    """Lesion each matching run under its lock; {aname: lesion dict}."""
    out = {}
    for paths in helper.find_runs(cfg["run"], cfg["runs_dir"]):
        with helper.run_lock(paths.dir):
            out[paths.name] = result = lesion_run(paths, cfg)
        print(f"[{paths.name}] {len(result['conditions'])} conditions in "
              f"{result['seconds']:.0f} s -> {paths.lesion}")
        print_summary(result)
    return out


if __name__ == "__main__":
    helper.run_main(main, CONFIG)
