"""Lesions and perturbations of one trained run (SPEC §6): which clusters of input units,
hidden units and synapses the network needs for which rule, how it tolerates pruning, and how
robust it is to silencing and weight noise.

Experiments (select them with --experiments):
  single      each input (embedding) cluster and each hidden cluster silenced alone, at the
              fixed k and at the selected k, for normalized and unnormalized clusterings,
              each with `n_random` size-matched random controls drawn from the units
              *outside* the cluster;
  combined    every (input cluster, hidden cluster) pair at the fixed k silenced together,
              with random controls (the pair of the two singles' controls);
  modulation  every modulation clustering: `zero_W` (W = 0 on the cluster's synapses) and
              `freeze_M` (M held at 0 there, W intact), with random synapse sets of the
              same size outside the cluster as controls (shared by both kinds);
  prune       the smallest |W| entries of the plastic layer zeroed at each sparsity;
  robust      a random fraction of W entries zeroed, a random fraction of hidden units
              silenced, Gaussian noise on W (absolute sigma, and sigma relative to the RMS
              weight ‖W‖_F/√(N·N_pre)), `n_draws` draws per level.

Every condition is data (a net_helpers.Perturbation), never an edit of the stored weights.
Identical conditions are evaluated once. Conditions run batched and share work: in a dmpn
without recurrence each hidden unit runs independently of the others given x, so one base
run per input-lesion set serves every condition with that set, silenced units cost nothing,
and only the rows a condition's W / M perturbation touches run again, stacked over many
conditions into one virtual layer (evaluate_by_rows). Other networks stack K conditions x
n_test trial copies per forward pass (evaluate_stacked). Both are tested equal to evaluating
each condition on its own. One seeded test set per run (mpn_tasks.aligned_batch per rule, seeded from the
run seed) serves every condition; per condition and rule both accuracy measures are saved.

Reads:  runs/<aname>/checkpoint.pt, cluster_info.pkl, cluster_info_mod.pkl
        (task_variance.h5 when the cluster pickles lack a full variance matrix).
Writes: runs/<aname>/lesion.pkl, a dict:
    rules                  the R rules (columns of every accuracy array)
    conditions             C condition dicts (id 0 = intact network), each with any of
                           in_units, hid_units, w_zero, m_freeze (sorted indices, or a packed
                           bit mask {"bits", "n"}: lesion.unpack_indices) and w_noise
                           {"seed", "sigma"} (lesion.noise_matrix); lesion.condition_perturbation
                           rebuilds the Perturbation of any of them
    acc                    {"angle", "trial"}: (C, R) accuracy of every condition
    baseline               {"angle", "trial"}: (R,) intact network, from a plain evaluate
    single[name]           name = "<input|hidden>-<form>-<fixed|selected>": k, labels (units,),
                           clusters, sizes, unresponsive, lesion (n_clusters,) condition ids,
                           control (n_clusters, n_random) ids (-1: no size-matched control),
                           profiles (n_clusters, n_task_periods) cluster-mean task variance
    combined[form-fixed]   input/hidden clusters, pairs (P, 2), lesion (P,), control (P, n),
                           and the singles' input_lesion/_control, hidden_lesion/_control
    modulation[name]       as single, with zero_W, freeze_M (n_clusters,) and their _control
    prune                  sparsity (L,), cond (L,)
    robust[battery]        levels (L,), cond (L, n_draws), xlabel; battery in w_zero,
                           hid_silence, w_noise, w_noise_rel
    plus run, checkpoint_step, shapes, test_seed, config, cluster_provenance, seconds.

Axis order: trials x time x units, (B, T, N); W is (N_post, N_pre) and synapse indices are
flattened post-major (i_post * N_pre + j_pre), as in cluster_info_mod.

Example:
    python lesion.py --run=everything_dmpn_seed749_L21e4_h300_b128
    python lesion.py --run=everything_dmpn_seed749_L21e4_h300_b128 --experiments="['single','prune']"
"""
import json
import time
import zlib

import numpy as np
import torch

import helper

CONFIG = dict(
    run="everything_dmpn_seed*",  # run name or glob (quote globs in the shell)
    runs_dir=None,  # runs root; None = $MPN_RUNS_DIR, else runs/
    experiments=["single", "combined", "modulation", "prune", "robust"],  # any subset
    n_test=16,  # aligned test trials per rule (a multiple of 8: balanced stimulus directions)
    test_quantile=0.5,  # test-trial epoch durations at this quantile of their ranges (1.0 = longest)
    sigma_x=0.0,  # input-noise std of the test trials (baked into the fixed test set)
    n_random=10,  # size-matched random controls per cluster (single and modulation lesions)
    n_random_combined=3,  # random controls per (input, hidden) cluster pair (400 pairs at k=20: the costliest experiment)
    fixed_k=None,  # the fixed number of clusters (SPEC §6.1); None: cluster_info's fixed_k (20); nearest available k if absent
    k_cuts=["fixed", "selected"],  # unit clusterings cut at the fixed k and/or the selected k
    forms=["normalized", "unnormalized"],  # variance forms whose clusterings are lesioned
    combined_forms=["normalized"],  # forms whose fixed-k clusterings get all pair lesions
    mod_reps=["modulation", "modulation_weighted"],  # synapse clusterings for zero_W/freeze_M
    mod_k_cuts=["fixed"],  # synapse clusterings cut at "fixed" and/or "selected" k (the selected k of synapses can exceed 100: 2 x 11 conditions per cluster)
    prune_sparsity=[0, 0.1, 0.5, 0.9, 0.95, 0.98, 0.99, 0.999],  # fractions of W zeroed by |W|
    zero_fractions=[0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],  # random W entries zeroed
    silence_fractions=[0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],  # random hidden units silenced
    noise_sigmas=[0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03],  # absolute std of noise added to W
    noise_rel_sigmas=[0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0],  # noise std in units of the RMS weight ‖W‖_F/√(N·N_pre)
    n_draws=30,  # random draws per robustness level
    memory_mb=None,  # memory budget of one forward pass in MB (how many conditions share it); None: 32 on CPU (more only spills the caches: 128 ran 25% slower with 40% more memory), 2048 on a GPU
    torch_threads=1,  # torch CPU threads (0: torch's default); 1 ran this stage 2x faster than 2 on the shared 2-core machine
    device="auto",  # "auto" (cuda if available), "cpu" or "cuda"
    engine="auto",  # plastic-layer engine of mpn_engine: "auto", "fast" or "reference"
)

PRODUCER = "python lesion.py"
CLUSTER_PRODUCER = "python clustering.py"
EXPERIMENTS = ("single", "combined", "modulation", "prune", "robust")
FIELDS = ("in_units", "hid_units", "w_zero", "m_freeze")  # index-set fields of a condition
# Seed streams (second entry of the numpy seed list, after the run seed).
TEST_STREAM, CONTROL_STREAM, ROBUST_STREAM = 70, 71, 72


# ----------------------------------------------------------------------------------------
# Conditions: index sets stored compactly, identical conditions stored once


def pack_indices(idx, n_total):
    """Sorted unique indices as the smaller of an int array and a packed bit mask."""
    idx = np.unique(np.asarray(idx, dtype=np.int64))
    dtype = np.uint16 if n_total <= 2**16 else np.uint32
    if idx.size * np.dtype(dtype).itemsize <= n_total / 8:
        return idx.astype(dtype)
    mask = np.zeros(n_total, dtype=bool)
    mask[idx] = True
    return {"bits": np.packbits(mask), "n": int(n_total)}


def unpack_indices(packed):
    """Inverse of pack_indices: the sorted int64 indices."""
    if isinstance(packed, dict):
        return np.flatnonzero(np.unpackbits(packed["bits"], count=packed["n"]))
    return np.asarray(packed, dtype=np.int64)


def _key(cond):
    parts = []
    for name in FIELDS:
        v = cond.get(name)
        parts.append(None if v is None else (v["bits"].tobytes() if isinstance(v, dict)
                                             else v.tobytes()))
    noise = cond.get("w_noise")
    parts.append(None if noise is None else (tuple(noise["seed"]), noise["sigma"]))
    return tuple(parts)


class ConditionTable:
    """Unique conditions in order of first use; `add` returns a condition's id."""

    def __init__(self, sizes):
        self.sizes = sizes  # total count per field, to pack index sets
        self.conditions, self._ids = [], {}
        self.add({})  # id 0: the intact network

    def add(self, spec):
        """spec: {field: indices} for FIELDS, plus optional w_noise {"seed", "sigma"}."""
        cond = {}
        for name in FIELDS:
            if spec.get(name) is not None and len(spec[name]):
                cond[name] = pack_indices(spec[name], self.sizes[name])
        noise = spec.get("w_noise")
        if noise is not None and noise["sigma"] > 0:
            cond["w_noise"] = {"seed": [int(s) for s in noise["seed"]],
                               "sigma": float(noise["sigma"])}
        key = _key(cond)
        if key not in self._ids:
            self._ids[key] = len(self.conditions)
            self.conditions.append(cond)
        return self._ids[key]


def noise_matrix(seed, sigma, shape):
    """The Gaussian weight noise of a condition, regenerated from its seed."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * sigma).astype(np.float32)


def condition_perturbation(cond, n_pre, n_hidden):
    """The net_helpers.Perturbation of one stored condition (shared across trials)."""
    import net_helpers
    kw = {}
    shape = (n_hidden, n_pre)
    if "in_units" in cond:
        kw["in_mask"] = _mask(cond["in_units"], n_pre, 0.0)
    if "hid_units" in cond:
        kw["hid_mask"] = _mask(cond["hid_units"], n_hidden, 0.0)
    if "w_zero" in cond:
        kw["w_mask"] = _mask(cond["w_zero"], n_hidden * n_pre, 0.0).reshape(shape)
    if "m_freeze" in cond:
        kw["m_freeze"] = _mask(cond["m_freeze"], n_hidden * n_pre, 1.0).reshape(shape)
    if "w_noise" in cond:
        kw["w_noise"] = torch.from_numpy(noise_matrix(cond["w_noise"]["seed"],
                                                      cond["w_noise"]["sigma"], shape))
    return net_helpers.Perturbation(**kw)


def _mask(packed, n_total, value):
    """A float mask that is `value` at the stored indices and 1 - value elsewhere."""
    mask = torch.full((n_total,), 1.0 - value)
    mask[torch.from_numpy(unpack_indices(packed))] = value
    return mask


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
    """(k, column labels) of one clustering at the fixed or the selected k."""
    if cut == "selected":
        return int(R["k"]), np.asarray(R["col_labels"])
    by_k = R["col_labels_by_k"]
    k = min(by_k, key=lambda kk: (abs(int(kk) - fixed_k), kk))
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
            "row_names": list(R.get("row_names", []))}


def _lesion_and_controls(table, field, members_list, n_total, n_random, run_seed):
    """Condition ids (n_clusters,) of the lesions and (n_clusters, n_random) of controls."""
    lesion = np.array([table.add({field: m}) for m in members_list])
    control = np.full((len(members_list), n_random), -1)
    for c, m in enumerate(members_list):
        draws = control_draws(run_seed, n_total, m, n_random)
        if draws is not None:
            control[c] = [table.add({field: d}) for d in draws]
    return lesion, control


def single_experiments(table, ci, variance, cfg, run_seed, n_units):
    """SPEC §6.1 items 1-2: every input/hidden clustering asked for."""
    out = {}
    for rep, field in (("input", "in_units"), ("hidden", "hid_units")):
        for form in cfg["forms"]:
            for cut in cfg["k_cuts"]:
                t = cluster_table(ci[rep][form], cut, cfg["fixed_k"], n_units[rep])
                t["lesion"], t["control"] = _lesion_and_controls(
                    table, field, t["members"], n_units[rep], cfg["n_random"], run_seed)
                t["profiles"] = _profiles(ci[rep][form], variance, rep, form, t["labels"],
                                          t["clusters"])
                t.update(rep=rep, form=form, cut=cut, field=field)
                del t["members"]
                out[f"{rep}-{form}-{cut}"] = t
    return out


def combined_experiments(table, ci, cfg, run_seed, n_units):
    """SPEC §6.1 item 3: every (input cluster, hidden cluster) pair at the fixed k; control d
    pairs the d-th random controls of the two single clusters."""
    out = {}
    n_rand = cfg["n_random_combined"]
    for form in cfg["combined_forms"]:
        tin = cluster_table(ci["input"][form], "fixed", cfg["fixed_k"], n_units["input"])
        thid = cluster_table(ci["hidden"][form], "fixed", cfg["fixed_k"], n_units["hidden"])
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


def modulation_experiments(table, ci_mod, variance, cfg, run_seed, n_syn):
    """SPEC §6.1 item 4: zero_W and freeze_M on every synapse cluster, with shared random
    synapse-set controls."""
    out = {}
    for rep in cfg["mod_reps"]:
        for form in [f for f in cfg["forms"] if f in ci_mod.get(rep, {})]:  # W⊙M: unnormalized
            for cut in cfg["mod_k_cuts"]:
                t = cluster_table(ci_mod[rep][form], cut, cfg["fixed_k"], n_syn)
                for kind, field in (("zero_W", "w_zero"), ("freeze_M", "m_freeze")):
                    t[kind] = np.array([table.add({field: m}) for m in t["members"]])
                    t[f"{kind}_control"] = np.full((len(t["members"]), cfg["n_random"]), -1)
                for c, m in enumerate(t["members"]):
                    draws = control_draws(run_seed, n_syn, m, cfg["n_random"])
                    for kind, field in (("zero_W", "w_zero"), ("freeze_M", "m_freeze")):
                        if draws is not None:
                            t[f"{kind}_control"][c] = [table.add({field: d}) for d in draws]
                t["profiles"] = _profiles(ci_mod[rep][form], variance, rep, form,
                                          t["labels"], t["clusters"])
                t.update(rep=rep, form=form, cut=cut)
                del t["members"]
                out[f"{rep}-{form}-{cut}"] = t
    return out


def prune_experiment(table, W, cfg):
    """SPEC §6.1 item 5: zero the smallest |W| entries at each sparsity."""
    order = np.argsort(np.abs(W).ravel(), kind="stable")
    levels = np.asarray(cfg["prune_sparsity"], dtype=float)
    ids = [table.add({"w_zero": order[:int(round(s * order.size))]}) for s in levels]
    return {"sparsity": levels, "cond": np.array(ids)}


def robust_experiments(table, W, cfg, run_seed):
    """SPEC §6.1 item 6: (levels, (n_levels, n_draws) condition ids) per battery."""
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


# ----------------------------------------------------------------------------------------
# Running conditions batched


def _signature(cond):
    return tuple(name in cond for name in (*FIELDS, "w_noise"))


def trials_per_pass(cond, n_pre, n_hidden, T, memory_mb):
    """Trial copies one forward pass may hold: per trial the engine keeps a few N x N_pre
    tensors (M, W_eff, the update), plus one per synapse-level perturbation field, plus the
    recorded hidden activity (T x N)."""
    n_syn_fields = sum(name in cond for name in ("w_zero", "m_freeze", "w_noise"))
    per_trial = 4 * ((4 + 2 * n_syn_fields) * n_hidden * n_pre + 3 * T * n_hidden)
    return max(1, int(memory_mb * 2**20 // per_trial))


def score_conditions(outputs, batch, K):
    """Per condition (K conditions x n trial copies): angle and trial accuracy, pooled over
    the condition's trials exactly as mpn_tasks.accuracy_by_rule pools a rule's trials."""
    import mpn_tasks
    n_correct, n_scored = mpn_tasks.score_angle(outputs, batch)
    ok = np.asarray(mpn_tasks.score_trial(outputs, batch), dtype=float)
    n_correct = np.asarray(n_correct, dtype=float).reshape(K, -1).sum(1)
    n_scored = np.asarray(n_scored, dtype=float).reshape(K, -1).sum(1)
    return n_correct / np.maximum(n_scored, 1), ok.reshape(K, -1).mean(1)


def kernel_takes_per_trial_w(net):
    """Whether the fastest engine runs a per-trial W at full speed. The compiled CPU kernel
    (mpn_cpp) takes only a W shared by the batch and otherwise falls back to the slower
    "fast" engine; stacking conditions that change W would then cost more than it saves."""
    p = next(net.parameters())
    if p.is_cuda or not hasattr(net, "mp"):
        return True
    try:
        import mpn_cpp
    except ImportError:
        return True
    n_hidden, n_pre = net_shapes(net)
    x, W = p.new_zeros(2, 1, n_pre), p.new_zeros(2, n_hidden, n_pre)
    return (mpn_cpp.kernel() is None
            or mpn_cpp.unsupported(x, W, net.mp.b, net.mp.eta, net.mp.lam) is None)


def evaluate_conditions(net, tests, conditions, memory_mb, desc="conditions"):
    """Accuracy (n_conditions, n_rules) under both measures, every condition equal to its own
    forward pass. A dmpn whose hidden units run independently of each other
    (rows_independent) shares work between conditions (evaluate_by_rows); other networks
    stack conditions K at a time (evaluate_stacked)."""
    C, R = len(conditions), len(tests)
    acc = {"angle": np.full((C, R), np.nan, np.float32), "trial": np.full((C, R), np.nan, np.float32)}
    if memory_mb is None:
        memory_mb = 2048 if net.W_out.is_cuda else 32
    bar = helper.progress(total=C, desc=desc, unit="cond")
    if rows_independent(net):
        evaluate_by_rows(net, tests, conditions, memory_mb, acc, bar)
    else:
        evaluate_stacked(net, tests, conditions, memory_mb, acc, bar)
    bar.close()
    return acc


def evaluate_stacked(net, tests, conditions, memory_mb, acc, bar):
    """Conditions with the same perturbation fields are stacked K at a time
    (Perturbation.stack) against the test batch of each rule repeated K times, so one forward
    pass runs K x n_test trials. Conditions that change W run one at a time over all rules at
    once (W then stays shared by the batch) when the engine's kernel cannot take a per-trial
    W (kernel_takes_per_trial_w)."""
    n_hidden, n_pre = net_shapes(net)
    C = len(conditions)
    alone = not kernel_takes_per_trial_w(net)
    order = sorted(range(C), key=lambda i: _signature(conditions[i]))
    T_max = max(b.inputs.shape[1] for b in tests)
    n_test = tests[0].inputs.shape[0]
    start = 0
    while start < C:
        cond = conditions[order[start]]
        if alone and ("w_zero" in cond or "w_noise" in cond):
            ids = [order[start]]
            _run_over_rules(net, tests, cond, acc, ids[0])
        else:
            K = max(1, trials_per_pass(cond, n_pre, n_hidden, T_max, memory_mb) // n_test)
            ids = [i for i in order[start:start + K]
                   if _signature(conditions[i]) == _signature(cond)]
            _run_stacked(net, tests, [conditions[i] for i in ids], acc, ids)
        bar.update(len(ids))
        start += len(ids)


def _run_stacked(net, tests, conds, acc, ids):
    """K conditions x n_test copies of each rule's test trials, one forward pass per rule."""
    import net_helpers
    n_hidden, n_pre = net_shapes(net)
    n_test = tests[0].inputs.shape[0]
    stacked = net_helpers.Perturbation.stack(
        [condition_perturbation(c, n_pre, n_hidden) for c in conds], n_test)
    for r, batch in enumerate(tests):
        tiled = batch.take(np.tile(np.arange(n_test), len(conds)))
        res = net_helpers.evaluate(net, tiled, perturbation=stacked)
        acc["angle"][ids, r], acc["trial"][ids, r] = score_conditions(
            res["outputs"], tiled, len(conds))


def _run_over_rules(net, tests, cond, acc, cid):
    """One condition, its perturbation shared by the whole test set (all rules, padded)."""
    import mpn_tasks
    import net_helpers
    n_hidden, n_pre = net_shapes(net)
    batch = mpn_tasks.concat_batches(tests)
    res = net_helpers.evaluate(net, batch, perturbation=condition_perturbation(cond, n_pre,
                                                                               n_hidden))
    for r, batch_r in enumerate(tests):
        rule = mpn_tasks.RULES[int(batch_r.rule[0])]
        for measure in acc:
            acc[measure][cid, r] = res["acc"][measure][rule]


# ----------------------------------------------------------------------------------------
# Sharing work between conditions: a dmpn's hidden units are independent given x
#
# Without recurrence, x_t = tanh(W_in u_t) does not depend on h, and hidden unit i reads only
# its own row of W, b, η, λ and M: h_t[i] = tanh(Σ_j W_ij (1 + M_ij) x_t[j] + b_i) and
# M_t[i, :] = clip(λ M[i, :] + η h_t[i] x_tᵀ). So a condition changes only
#   - every unit, when it lesions input units (x changes): one "base" run per input set;
#   - the units it silences: their h is 0, nothing to compute;
#   - the rows its w_zero / m_freeze / w_noise touch: only those rows are run again.
# Every other unit keeps its trajectory from the base run of the condition's input set. The
# rows that must run again, over all conditions of a chunk, form one "virtual" plastic layer
# of stacked rows that shares x and W across trials, so the compiled kernel runs it as one
# call. The readout sums the kept units of the base run and the rerun rows: the outputs equal
# the condition's own forward pass up to float rounding (tested).


def rows_independent(net):
    """Whether each hidden unit runs independently of the others given the plastic layer's
    input: a dmpn without W_rec, with the Hebbian update η h_i x_j (under hebb_pre the update
    constant 1/√N_post depends on how many rows run together)."""
    return (hasattr(net, "mp") and getattr(net.mp, "W_rec", None) is None
            and net.mp.m_update == "hebb_assoc")


def touched_rows(cond, n_pre, n_hidden):
    """Sorted hidden units whose own row a condition changes (W, noise or frozen M), minus
    the units it silences."""
    if "w_noise" in cond:
        rows = np.arange(n_hidden)
    else:
        rows = np.unique(np.concatenate(
            [unpack_indices(cond[f]) // n_pre for f in ("w_zero", "m_freeze") if f in cond]
            + [np.zeros(0, np.int64)]))
    if "hid_units" in cond:
        rows = np.setdiff1d(rows, unpack_indices(cond["hid_units"]))
    return rows


def _row_coef(value, rows):
    """η or λ for a stack of rows: a per-row (post_vector, matrix) coefficient is indexed."""
    return value[rows] if value.dim() == 2 and value.shape[0] > 1 else value


def virtual_layer(net, conds, rows_of):
    """(W, b, eta, lam, m_freeze) of the stacked touched rows (tensors) of several
    conditions: the rows of condition k follow those of condition k - 1, each with its own W
    mask and noise."""
    import mpn
    n_hidden, n_pre = net_shapes(net)
    mp = net.mp
    Ws, freeze, index = [], [], []
    for cond, rows_t in zip(conds, rows_of):
        pert = condition_perturbation(cond, n_pre, n_hidden).to(mp.W.device, mp.W.dtype)
        Ws.append(mpn.perturbed_weight(mp.W.detach(), pert)[rows_t])
        freeze.append(None if pert.m_freeze is None else pert.m_freeze[rows_t])
        index.append(rows_t)
    index = torch.cat(index)
    m_freeze = None
    if any(f is not None for f in freeze):
        m_freeze = torch.cat([torch.zeros_like(W_k) if f is None else f
                              for f, W_k in zip(freeze, Ws)])
    return (torch.cat(Ws), mp.b.detach()[index], _row_coef(mp.eta.detach(), index),
            _row_coef(mp.lam.detach(), index), m_freeze)


def _hidden_keep(conds, n_hidden, device, dtype):
    """(K, N) masks: 0 on the units each condition silences."""
    keep = torch.ones(len(conds), n_hidden, device=device, dtype=dtype)
    for k, cond in enumerate(conds):
        if "hid_units" in cond:
            keep[k, torch.from_numpy(unpack_indices(cond["hid_units"])).to(device)] = 0.0
    return keep


@torch.no_grad()
def evaluate_by_rows(net, tests, conditions, memory_mb, acc, bar):
    """Conditions grouped by their input-unit set: one base forward pass per set (several
    sets stacked per pass, their recorded x and h kept for every rule), then per chunk of the
    group's conditions one virtual-layer pass over the touched rows, and the outputs."""
    import net_helpers
    n_hidden, n_pre = net_shapes(net)
    p0 = net.W_out
    n_test = tests[0].inputs.shape[0]
    groups = {}
    for i, cond in enumerate(conditions):
        key = unpack_indices(cond["in_units"]).tobytes() if "in_units" in cond else b""
        groups.setdefault(key, []).append(i)
    groups = list(groups.values())
    sum_T = sum(b.inputs.shape[1] for b in tests)
    T_max = max(b.inputs.shape[1] for b in tests)
    per_group = 4 * n_test * sum_T * (n_hidden + n_pre)  # bytes of one set's kept x and h
    G = max(1, min(int(memory_mb * 2**20 // (2 * per_group)),
                   trials_per_pass({}, n_pre, n_hidden, T_max, memory_mb) // n_test))
    torch_tests = [net_helpers.batch_to_torch(b, p0.device, p0.dtype)["inputs"] for b in tests]
    rows = [touched_rows(c, n_pre, n_hidden) for c in conditions]
    scorer = TiledScorer(tests)
    for start in range(0, len(groups), G):
        chunk = groups[start:start + G]
        bases = _base_runs(net, torch_tests, [conditions[ids[0]] for ids in chunk], n_test)
        for g, ids in enumerate(chunk):
            xs, hs = [x[g] for x, _ in bases], [h[g] for _, h in bases]
            for part in _condition_chunks(ids, rows, n_pre, n_test, T_max, memory_mb):
                ys = _chunk_outputs(net, xs, hs, [conditions[i] for i in part],
                                    [rows[i] for i in part])
                for r, y in enumerate(ys):
                    acc["angle"][part, r], acc["trial"][part, r] = scorer(r, y)
                bar.update(len(part))


class TiledScorer:
    """Scores outputs (K, n_test, T, n_out) of K conditions on rule r's test batch, up to
    `size` conditions at a time against a test batch tiled once per rule (not once per K)."""

    def __init__(self, tests, size=32):
        self.tests, self.size, self.tiled = tests, size, {}

    def __call__(self, r, y):
        K, n = y.shape[:2]
        y = y.reshape(K * n, *y.shape[2:]).float().cpu().numpy()
        if r not in self.tiled:
            self.tiled[r] = self.tests[r].take(np.tile(np.arange(n), self.size))
        out = [np.empty(K), np.empty(K)]
        for s in range(0, K, self.size):
            k = min(self.size, K - s)
            batch = self.tiled[r] if k == self.size else self.tiled[r].take(np.arange(k * n))
            out[0][s:s + k], out[1][s:s + k] = score_conditions(y[s * n:(s + k) * n], batch, k)
        return out


def _base_runs(net, torch_tests, firsts, n_test):
    """Per rule, the recorded x and h (n_sets, n_test, T, N) of the network with only each
    set's input lesion (the first condition of each group carries the group's in_units)."""
    import net_helpers
    n_hidden, n_pre = net_shapes(net)
    perts = [condition_perturbation({"in_units": c["in_units"]} if "in_units" in c else {},
                                    n_pre, n_hidden) for c in firsts]
    stacked = net_helpers.Perturbation.stack(perts, n_test)
    stacked = stacked if stacked.items() else None
    out = []
    for inputs in torch_tests:
        res = net(inputs.repeat(len(firsts), 1, 1), perturbation=stacked, record=("x",))
        shape = (len(firsts), n_test, inputs.shape[1])
        out.append((res["x"].reshape(*shape, -1), res["h"].reshape(*shape, -1)))
    return out


def _condition_chunks(ids, rows, n_pre, n_test, T_max, memory_mb):
    """Consecutive runs of a group's condition ids whose outputs and touched rows (rows[i])
    fit the memory budget together."""
    per_cond = 12 * n_test * T_max * 3  # outputs of one condition (float32, then float64)
    per_row = 4 * n_test * (4 * n_pre + T_max)  # M, W_eff and update, and h, of one row
    budget = memory_mb * 2**20
    part, used = [], 0
    for i in ids:
        cost = per_cond + per_row * rows[i].size
        if part and used + cost > budget:
            yield part
            part, used = [], 0
        part.append(i)
        used += cost
    if part:
        yield part


def _chunk_outputs(net, xs, hs, conds, rows_np):
    """Per rule, outputs (K, n_test, T, 3) of K conditions sharing one input set, from its
    base x and h and one virtual-layer pass over the rows the conditions touch (rows_np,
    from touched_rows): y = h_base @ (W_out with silenced and touched units' columns
    zeroed)ᵀ + h_touched @ W_out[:, touched]ᵀ, never a (K, n_test, T, N) activity tensor."""
    mp = net.mp
    n_hidden = net.W_out.shape[1]
    rows_of = [torch.from_numpy(r).to(hs[0].device) for r in rows_np]
    layer = virtual_layer(net, conds, rows_of) if sum(r.numel() for r in rows_of) else None
    keep = _hidden_keep(conds, n_hidden, hs[0].device, hs[0].dtype)
    for k, rows in enumerate(rows_of):
        keep[k, rows] = 0.0
    starts = np.cumsum([0] + [r.numel() for r in rows_of])
    W_out_T = net.W_out.detach().T
    K, n_out = len(conds), W_out_T.shape[1]
    W_keep = (keep[:, :, None] * W_out_T).permute(1, 0, 2).reshape(n_hidden, K * n_out)
    ys = []
    for x, h_base in zip(xs, hs):
        n, T = h_base.shape[:2]
        # one (n T, N) x (N, K n_out) product; a broadcast matmul would copy h_base K times
        y = (h_base.reshape(n * T, n_hidden) @ W_keep).reshape(n * T, K, n_out).transpose(0, 1)
        if layer is not None:
            W, b, eta, lam, m_freeze = layer
            h_rows, _ = mpn_engine_forward(mp, x, W, b, eta, lam, m_freeze)
            h_rows = h_rows.reshape(n * T, -1)
            for k, rows in enumerate(rows_of):
                if rows.numel():
                    y[k] += h_rows[:, starts[k]:starts[k + 1]] @ W_out_T[rows]
        ys.append(y.reshape(K, n, T, n_out))
    return ys


def mpn_engine_forward(mp, x, W, b, eta, lam, m_freeze):
    """The plastic layer's own engine and options on a virtual layer."""
    import mpn
    import mpn_engine
    return mpn_engine.plastic_forward(
        x, W, b, eta, lam, mp_type=mp.mp_type, m_update=mp.m_update, m_bounds=mp.m_bounds,
        m_freeze=m_freeze, engine=mpn.resolve_engine(mp.engine))


# ----------------------------------------------------------------------------------------
# Loading


def net_shapes(net):
    """(N_hidden, N_pre) of the weight matrix that synapse perturbations act on."""
    if hasattr(net, "mp"):
        return tuple(net.mp.W.shape)
    n = net.W_out.shape[1]
    return n, n


def plastic_weight(net):
    """The (N_hidden, N_pre) weights pruned and perturbed, as numpy."""
    if hasattr(net, "mp"):
        return net.mp.W.detach().cpu().numpy().copy()
    n = net.W_out.shape[1]
    return net.W_rec.detach().cpu().numpy()[-n:].copy()  # vanilla: W_rec; GRU: candidate block


def load_network(paths, cfg):
    """(net in eval mode, training config, checkpoint step)."""
    import net_helpers
    ckpt = net_helpers.load_checkpoint(paths.checkpoint)
    net = net_helpers.model_from_checkpoint(ckpt, device=helper.get_device(cfg["device"]))
    if hasattr(net, "mp"):
        net.mp.engine = cfg["engine"]
    return net.eval(), ckpt["config"], int(ckpt["step"])


def load_clusters(paths, experiments):
    """cluster_info (and cluster_info_mod when needed), refused when missing or older than
    the checkpoint they should describe."""
    producer = f"{CLUSTER_PRODUCER} --run={paths.name}"
    out = {}
    needs = [("cluster_info", {"single", "combined"}), ("cluster_info_mod", {"modulation"})]
    for attr, users in needs:
        if not users & set(experiments):
            out[attr] = None
            continue
        path = getattr(paths, attr)
        out[attr] = read_cluster_file(path, producer)
        check_clusters_fresh(paths, path, out[attr], producer)
    return out["cluster_info"], out["cluster_info_mod"], variance_reader(paths)


def read_cluster_file(path, producer):
    """A cluster_info*.h5 file as the dict the experiments read: int keys for labels by k,
    k = the labelled k (k_argmax when no k is above the null), root attrs merged in."""
    info, attrs = helper.load_h5(path, producer)
    for forms in info.values():
        for R in forms.values():
            R["col_labels_by_k"] = {int(k): v for k, v in R["col_labels_by_k"].items()}
            R["k"] = int(R["k_ref"])
    return dict(info, fixed_k=attrs.get("fixed_k", 20), variance_hash=attrs.get("variance_hash"),
                _provenance={"config_hash": attrs.get("config_hash")})


def check_clusters_fresh(paths, path, info, producer):
    """A cluster pickle is stale when the checkpoint is newer, or when it was computed from
    another task_variance.h5 than the one now in the run folder."""
    if path.stat().st_mtime < paths.checkpoint.stat().st_mtime:
        raise helper.StageError(f"{str(path)!r} is older than the checkpoint it should "
                                f"describe; rerun `{producer}`.")
    if "variance_hash" in info and paths.variance.exists():
        import h5py
        with h5py.File(paths.variance, "r") as f:
            current = json.loads(f.attrs["config_hash"]) if "config_hash" in f.attrs else None
        if current != info["variance_hash"]:
            raise helper.StageError(f"{str(path)!r} was computed from another "
                                    f"{paths.variance.name}; rerun `{producer}`.")


def variance_reader(paths):
    """variance(rep, form) -> the task-variance matrix from task_variance.h5 (read once, and
    only if asked: the cluster pickles normally carry the matrices), or None."""
    cache = {}

    def variance(rep, form):
        if "arrays" not in cache:
            cache["arrays"] = (helper.load_h5(paths.variance, "python multiple_task_analysis.py")[0]
                               if paths.variance.exists() else {})
        return cache["arrays"].get(rep, {}).get(form)
    return variance


def run_rules(train_cfg):
    import mpn_tasks
    if train_cfg.get("rules"):
        return list(train_cfg["rules"])
    return list(mpn_tasks.RULESETS[train_cfg.get("ruleset", "everything")])


def make_test_set(rules, cfg, run_seed, io_mode):
    """One aligned batch per rule from a run-seeded Generator: the fixed test set."""
    import mpn_tasks
    if cfg["n_test"] < 1:
        raise helper.StageError(f"n_test must be at least 1, not {cfg['n_test']}.")
    rng = np.random.default_rng([run_seed, TEST_STREAM])
    return [mpn_tasks.aligned_batch(rule, cfg["n_test"], rng, quantile=cfg["test_quantile"],
                                    sigma_x=cfg["sigma_x"], io_mode=io_mode) for rule in rules]


def baseline_accuracy(net, tests, rules):
    """Per-rule accuracy of the intact network under both measures (plain evaluate)."""
    import net_helpers
    acc = {"angle": np.zeros(len(rules)), "trial": np.zeros(len(rules))}
    for r, (rule, batch) in enumerate(zip(rules, tests)):
        res = net_helpers.evaluate(net, batch)
        for measure in acc:
            acc[measure][r] = res["acc"][measure][rule]
    return acc


# ----------------------------------------------------------------------------------------
# Effects and summary (also used by lesion_plot.py)


def normalized_effect(acc, lesion, control):
    """Random-control accuracy − lesion accuracy, (n_clusters, n_rules); NaN where a cluster
    has no control. acc (n_conditions, n_rules); lesion (n,), control (n, n_random) ids."""
    lesion, control = np.asarray(lesion), np.asarray(control)
    ctrl = np.where(control[..., None] >= 0, acc[np.maximum(control, 0)], np.nan)
    n = np.isfinite(ctrl).sum(axis=1)
    ctrl_mean = np.where(n > 0, np.nansum(ctrl, axis=1) / np.maximum(n, 1), np.nan)
    return ctrl_mean - acc[lesion]


REP_SHORT = {"input": "input", "hidden": "hidden", "modulation": "M",
             "modulation_weighted": "W⊙M"}
FORM_SHORT = {"normalized": "norm", "unnormalized": "unnorm"}


def family_name(t, kind=""):
    """Short label of one clustering (and lesion kind), e.g. 'hidden norm k=20'."""
    name = f"{REP_SHORT.get(t['rep'], t['rep'])} {FORM_SHORT.get(t['form'], t['form'])} k={t['k']}"
    return f"{name} {kind}".strip()


def cluster_effects(result, measure):
    """{family name: (effect (n_clusters, n_rules), table)} over single and modulation
    lesions."""
    acc = result["acc"][measure]
    out = {}
    for t in result.get("single", {}).values():
        out[family_name(t)] = (normalized_effect(acc, t["lesion"], t["control"]), t)
    for t in result.get("modulation", {}).values():
        for kind in ("zero_W", "freeze_M"):
            out[family_name(t, kind)] = (
                normalized_effect(acc, t[kind], t[f"{kind}_control"]), t)
    return out


def top_effects(result, measure="trial", n=8):
    """The n largest normalized effects as (effect, family, cluster label, rule)."""
    rows = []
    for family, (eff, t) in cluster_effects(result, measure).items():
        for c, r in zip(*np.nonzero(np.isfinite(eff))):
            rows.append((float(eff[c, r]), family, int(t["clusters"][c]), result["rules"][r]))
    return sorted(rows, reverse=True)[:n]


# ----------------------------------------------------------------------------------------


def build_conditions(cfg, net, ci, ci_mod, variance, run_seed):
    n_hidden, n_pre = net_shapes(net)
    W = plastic_weight(net)
    table = ConditionTable({"in_units": n_pre, "hid_units": n_hidden,
                            "w_zero": n_hidden * n_pre, "m_freeze": n_hidden * n_pre})
    n_units = {"input": n_pre, "hidden": n_hidden}
    if cfg["fixed_k"] is None:
        cfg = dict(cfg, fixed_k=int((ci or {}).get("fixed_k", 20)))
    ex = cfg["experiments"]
    tables = {
        "single": single_experiments(table, ci, variance, cfg, run_seed, n_units)
        if "single" in ex else {},
        "combined": combined_experiments(table, ci, cfg, run_seed, n_units)
        if "combined" in ex else {},
        "modulation": modulation_experiments(table, ci_mod, variance, cfg, run_seed,
                                             n_hidden * n_pre) if "modulation" in ex else {},
        "prune": prune_experiment(table, W, cfg) if "prune" in ex else None,
        "robust": robust_experiments(table, W, cfg, run_seed) if "robust" in ex else {},
    }
    return table, tables


def check_config(cfg, net):
    unknown = set(cfg["experiments"]) - set(EXPERIMENTS)
    if unknown:
        raise helper.StageError(f"unknown experiment(s) {sorted(unknown)}; choose from "
                                f"{list(EXPERIMENTS)}.")
    missing = {"single": "in_mask", "combined": "in_mask", "modulation": "m_freeze"}
    for name, field in missing.items():
        if name in cfg["experiments"] and field not in net.perturbable:
            raise helper.StageError(f"a {net.net_type} network cannot apply {field}; drop "
                                    f"{name!r} from --experiments.")


def lesion_run(paths, cfg):
    """Every selected experiment on one run; writes and returns the lesion pickle's dict."""
    t0 = time.time()
    net, train_cfg, step = load_network(paths, cfg)
    check_config(cfg, net)
    ci, ci_mod, variance = load_clusters(paths, cfg["experiments"])
    run_seed = int(train_cfg["seed"])
    rules = run_rules(train_cfg)
    tests = make_test_set(rules, cfg, run_seed, train_cfg.get("io_mode", "low_dim"))
    table, tables = build_conditions(cfg, net, ci, ci_mod, variance, run_seed)
    n_hidden, n_pre = net_shapes(net)
    print(f"[{paths.name}] {len(table.conditions)} distinct conditions x {len(rules)} rules x "
          f"{cfg['n_test']} trials")
    params_before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    acc = evaluate_conditions(net, tests, table.conditions, cfg["memory_mb"],
                              desc=f"{paths.name} lesion conditions")
    if any(not torch.equal(v, net.state_dict()[k]) for k, v in params_before.items()):
        raise RuntimeError("a perturbation modified the stored weights")
    result = dict(tables, run=paths.name, checkpoint_step=step, rules=rules,
                  conditions=table.conditions, acc=acc,
                  baseline=baseline_accuracy(net, tests, rules),
                  shapes={"n_hidden": n_hidden, "n_pre": n_pre},
                  test_seed=[run_seed, TEST_STREAM], config=dict(cfg),
                  cluster_provenance={k: (v or {}).get("_provenance")
                                      for k, v in (("cluster_info", ci), ("cluster_info_mod", ci_mod))},
                  seconds=time.time() - t0)
    helper.save_pickle(paths.lesion, result, cfg)
    return result


def main(cfg):
    """Lesion every run matching cfg["run"]; returns {aname: lesion dict}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["torch_threads"] or threads)
    out = {}
    try:
        for paths in helper.find_runs(cfg["run"], cfg["runs_dir"]):
            out[paths.name] = result = lesion_run(paths, cfg)
            print(f"[{paths.name}] {len(result['conditions'])} conditions in "
                  f"{result['seconds']:.0f} s -> {paths.lesion}")
            print("  baseline accuracy: trial {:.3f}, angle {:.3f}".format(
                np.mean(result["baseline"]["trial"]), np.mean(result["baseline"]["angle"])))
            for eff, family, label, rule in top_effects(result):
                print(f"  effect {eff:+.3f}  {family:34s} cluster {label:3d}  {rule}")
    finally:
        torch.set_num_threads(threads)
    return out


if __name__ == "__main__":
    helper.run_main(main, CONFIG)
