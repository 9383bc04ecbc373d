"""Results across seeds and architectures: one summary of every run matching a glob, grouped
by architecture (dmpn, leaky RNN, GRU), with the uncertainty of each number and its baseline.

Reads, for each run matching `runs` under the runs root (what a run lacks is left out of the
tables that need it, and said): config.json, log.json, pipeline.json (wall times),
cluster_info.h5, cluster_info_mod.h5, lesion.h5, state_space.h5, memory_geometry.h5,
timescales.h5, and the checkpoint (for the similarity of representations, similarity.py).
Writes: <out>/seed_summary.json and figures; with `page`, a markdown results page whose
figures lie in <page folder>/<page stem>/.

Tables (per architecture; s.d. across seeds, 95% intervals where stated):
  accuracy   per-rule accuracy mean ± s.d. under both measures; the rule-mean per run,
             mean ± s.d. and its 95% t interval;
  clusters   the selected k of each representation, how many runs have structure above the
             null band (Wilson 95% interval), the median stability ARI over the perturbed
             designs (clustering.py);
  siblings   how often sibling task-periods (dmcgo/dmcnogo, delaydm1/delaydm2, ...) fall in one
             row cluster, out of the runs whose task-period clustering is above its null, with
             Wilson 95% intervals, next to the published reference's 7-seed counts;
  lesions    the fraction of heatmap cells significant against size-matched random controls
             (BH-controlled, lesion.py), how many rules a cluster with any effect hits, and
             the failure kinds of each run's strongest hidden cluster;
  shift      the shift-test r (state_space_shift.py) of trained vs untrained vs shuffled;
  memory     cross-validated decoding of sibling delay states (memory_geometry.py), trained
             vs untrained, with chance;
  timescales median unit timescale, trained vs untrained (timescales.py);
  similarity linear CKA and Procrustes distance between every pair of runs (similarity.py),
             an MDS picture, and a permutation test of architecture grouping.

Example:
    python seed_summary.py --runs='everything_*_cmp' --page=docs/results.md
"""
import subprocess
import time
from pathlib import Path

import numpy as np

import helper
import mpn
import mpn_tasks
import similarity
from variance_core import REP_FORMS, REP_TITLES

CONFIG = dict(
    runs="everything_*_seed*",  # run-name glob of the runs summarised (quote it in the shell) {@run_pattern}
    runs_dir=None,  # runs root; None = $MPN_RUNS_DIR, else runs/ {None | @path}
    out=None,  # folder of the summary JSON and figures; None: <runs root>/summary {None | @path}
    page=None,  # markdown results page to write, e.g. docs/results.md (figures in docs/results/) {None | @path}
    preset=None,  # the config file the runs were made with, named on the page {None | @path}
    similarity=True,  # compare every pair of runs' representations (loads each checkpoint) {@bool}
    trials_per_rule=64,  # similarity: conditions per rule (even stride over its condition set) {>= 2}
    m_trials_per_rule=16,  # similarity: of those, the conditions whose M is compared (dmpn) {>= 2}
    steps_per_period=10,  # similarity: evenly spaced steps per task-period {>= 1}
    epoch_quantile=1.0,  # similarity: epoch durations at this quantile of their ranges {>= 0, <= 1}
    m_pcs=64,  # similarity: principal components of M kept per run (dmpn) {>= 2}
    n_permutations=9999,  # label permutations of the architecture-grouping test {>= 99}
    similarity_seed=0,  # seeds the permutations and the PCA sketch {>= 0}
    figures=True,  # draw the figures {@bool}
)

ARCH_ORDER = ("dmpn", "vanilla", "gru")
Z95 = 1.959963984540054
# The published reference's hand-made summary over 7 seeds of one dmpn architecture:
# (sibling pair, epoch) -> {representation: seeds sharing a row cluster}
REFERENCE_SIBLINGS = {
    ("dmcgo/dmcnogo", "stim1"): {"input": 7, "hidden": 7, "modulation": 0},
    ("dmcgo/dmcnogo", "delay1"): {"input": 7, "hidden": 7, "modulation": 0},
    ("delaydm1/delaydm2", "stim1"): {"input": 0, "hidden": 0, "modulation": 0},
}
REFERENCE_SEEDS = 7
SIBLING_EPOCHS = ("stim1", "delay1")
SHIFT_KINDS = ("trained", "untrained", "shuffled")  # shift-test series of state_space_shift.py
CLUSTER_KEYS = tuple((rep, form) for rep in REP_TITLES for form in REP_FORMS[rep])


# ----------------------------------------------------------------------------------------
# Statistics


def mean_sd(values):
    """[mean, s.d. (ddof 1; 0 for one value), n] of the finite values; NaNs when none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return [np.nan, np.nan, 0]
    return [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, int(len(v))]


def t_interval(values, level=0.95):
    """[low, high] two-sided t interval of the mean; NaNs with fewer than two values."""
    from scipy.stats import t
    mean, sd, n = mean_sd(values)
    if n < 2:
        return [np.nan, np.nan]
    half = t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n)
    return [mean - half, mean + half]


def wilson(successes, n, z=Z95):
    """[low, high] Wilson score interval of a binomial proportion; [0, 1] when n = 0."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return [float(low), float(high)]


# ----------------------------------------------------------------------------------------
# Reading the runs


def _optional_h5(path):
    return helper.load_h5(path)[0] if path.exists() else None


def read_run(paths):
    """Everything the tables need from one run folder (None for what the run lacks)."""
    cfg = helper.load_json(paths.config)
    log = helper.load_json(paths.log)
    if not log.get("evals"):
        raise helper.StageError(f"{str(paths.log)!r} has no evaluation yet; train the run "
                                f"longer with `{paths.producer(paths.log)}`.")
    pipeline = paths.dir / "pipeline.json"
    clusters = {}
    for attr in ("cluster_info", "cluster_info_mod"):
        clusters.update(_optional_h5(getattr(paths, attr)) or {})
    return dict(
        name=paths.name, net=cfg["net"], seed=int(cfg["seed"]), config=cfg,
        acc=log["evals"][-1]["acc"], step=int(log["evals"][-1]["step"]),
        seconds=helper.load_json(pipeline) if pipeline.exists() else {},
        clusters=clusters,
        lesion=_optional_h5(paths.lesion),
        shift=_optional_h5(paths.state_space),
        memory=_optional_h5(paths.memory_geometry),
        timescales=_optional_h5(paths.timescales),
    )


def by_arch(runs):
    """{net: [run, ...]} in ARCH_ORDER (unknown architectures after, alphabetically)."""
    nets = sorted({r["net"] for r in runs}, key=lambda n: (n not in ARCH_ORDER,
                                                            ARCH_ORDER.index(n) if n in ARCH_ORDER else 0, n))
    return {net: sorted((r for r in runs if r["net"] == net), key=lambda r: r["seed"]) for net in nets}


# ----------------------------------------------------------------------------------------
# Tables


def accuracy_table(groups):
    out = {}
    for net, runs in groups.items():
        rules = list(runs[0]["acc"]["trial"])
        entry = {"rules": rules}
        for m in ("trial", "angle"):
            per = np.array([[r["acc"][m].get(rule, np.nan) for rule in rules] for r in runs])
            means = np.nanmean(per, axis=1)
            entry[m] = {"per_rule": [mean_sd(per[:, i]) for i in range(len(rules))],
                        "rule_mean": mean_sd(means), "rule_mean_ci": t_interval(means),
                        "runs": means.tolist()}
        out[net] = entry
    return out


def cluster_table(groups):
    out = {}
    for net, runs in groups.items():
        entry = {}
        for rep, form in CLUSTER_KEYS:
            got = [r["clusters"][rep][form] for r in runs
                   if rep in r["clusters"] and form in r["clusters"][rep]]
            if not got:
                continue
            above = sum(bool(R["above_null"]) for R in got)
            ari = [float(np.median(R["stability"]["ari"])) for R in got
                   if "stability" in R and len(R["stability"].get("ari", []))]
            entry[f"{rep}-{form}"] = {
                "k": [int(R["k"]) for R in got], "row_k": [int(R.get("row_k", 0)) for R in got],
                "above_null": [above, len(got)], "above_null_ci": wilson(above, len(got)),
                "stability_ari": mean_sd(ari)}
        out[net] = entry
    return out


def sibling_table(groups):
    """{net: {rep: {"pair epoch": [shared, n, low, high]}}} over normalized forms."""
    out = {}
    for net, runs in groups.items():
        entry = {}
        for rep in ("input", "hidden", "modulation"):
            got = [r["clusters"][rep]["normalized"] for r in runs
                   if rep in r["clusters"] and "normalized" in r["clusters"][rep]]
            got = [R for R in got if bool(R.get("row_above_null", False))]
            if not got:
                continue
            cells = {}
            for a, b in mpn_tasks.SIBLINGS:
                for epoch in SIBLING_EPOCHS:
                    shared, n = 0, 0
                    for R in got:
                        rows = [str(x) for x in R["row_names"]]
                        if f"{a}-{epoch}" in rows and f"{b}-{epoch}" in rows:
                            lab = np.asarray(R["row_labels"])
                            n += 1
                            shared += int(lab[rows.index(f"{a}-{epoch}")] ==
                                          lab[rows.index(f"{b}-{epoch}")])
                    if n:
                        cells[f"{a}/{b} {epoch}"] = [shared, n, *wilson(shared, n)]
            entry[rep] = {"cells": cells, "n_runs_above_null": len(got)}
        out[net] = entry
    return out


def _lesion_families(lesion):
    """(name, stats of the trial measure, table) of every single and synapse heatmap."""
    out = []
    for key, t in lesion.get("single", {}).items():
        out.append((key, t["stats"]["lesion"]["trial"], t))
    for key, t in lesion.get("modulation", {}).items():
        for kind in ("zero_W", "freeze_M"):
            if kind in t.get("stats", {}):
                out.append((f"{key} {kind}", t["stats"][kind]["trial"], t))
    return out


def strongest_failure(lesion, t):
    """Failure-kind fractions of the strongest cluster (largest mean effect) of a table."""
    eff = np.asarray(t["stats"]["lesion"]["trial"]["effect"], dtype=np.float64)
    tested = np.isfinite(eff).any(axis=1)
    if not tested.any():
        return None
    row_mean = np.where(tested, np.nansum(eff, axis=1) / np.maximum(np.isfinite(eff).sum(axis=1), 1),
                        -np.inf)
    c = int(np.argmax(row_mean))
    cid = int(t["lesion"][c])
    return {k: float(np.mean(lesion["scores"][k][cid]))
            for k in ("broke_fixation", "wrong_go", "nogo_response")}


def lesion_table(groups):
    out = {}
    for net, runs in groups.items():
        families = {}
        for r in runs:
            if r["lesion"] is None:
                continue
            for name, s, t in _lesion_families(r["lesion"]):
                sig, tested = np.asarray(s["significant"]), np.isfinite(s["p"])
                hit = sig.sum(axis=1)
                f = families.setdefault(name, {"fraction": [], "rules_hit": [], "kill_all": [],
                                               "failures": []})
                f["fraction"].append(float(sig.sum() / max(tested.sum(), 1)))
                f["rules_hit"].extend(hit[hit > 0].tolist())
                f["kill_all"].append(int((hit >= 0.8 * sig.shape[1]).sum()))
                if "stats" in t and "lesion" in t["stats"] and name.startswith("hidden"):
                    fail = strongest_failure(r["lesion"], t)
                    if fail:
                        f["failures"].append(max(fail, key=fail.get))
        out[net] = {name: {"fraction_significant": mean_sd(f["fraction"]),
                           "rules_hit_by_affecting_cluster": mean_sd(f["rules_hit"]),
                           "kill_all_clusters": mean_sd(f["kill_all"]),
                           "strongest_failure_kind": {k: f["failures"].count(k)
                                                      for k in sorted(set(f["failures"]))},
                           "n_runs": len(f["fraction"])}
                    for name, f in families.items()}
    return out


def shift_values(groups):
    """{net: {rep: {"trained"|"untrained"|"shuffled": [r per run], "p_trained": [p per run]}}}
    of the shift test (state_space_shift.py)."""
    out = {}
    for net, runs in groups.items():
        entry = {}
        for r in runs:
            if r["shift"] is None:
                continue
            for rep, res in r["shift"]["shift"].items():
                e = entry.setdefault(rep, {k: [] for k in SHIFT_KINDS + ("p_trained",)})
                for k in SHIFT_KINDS:
                    e[k].append(float(np.ravel(res[k]["r"])[0]) if k in res else np.nan)
                e["p_trained"].append(float(np.ravel(res["trained"]["p"])[0]))
        out[net] = entry
    return out


def shift_table(values):
    return {net: {rep: {**{k: mean_sd(e[k]) for k in SHIFT_KINDS},
                        "runs_p_below_0.05": [int(np.sum(np.array(e["p_trained"]) < 0.05)),
                                              len(e["p_trained"])]}
                  for rep, e in entry.items()}
            for net, entry in values.items()}


def memory_table(groups):
    out = {}
    for net, runs in groups.items():
        entry = {}
        for r in runs:
            if r["memory"] is None:
                continue
            for which in ("trained", "untrained"):
                for pair, reps in r["memory"].get(which, {}).items():
                    for rep, res in reps.items():
                        for target, d in res.get("decoding", {}).items():
                            e = entry.setdefault(f"{pair} {rep} {target}", {
                                "trained": [], "untrained": [], "chance": float(d["chance"]),
                                "p_trained": []})
                            e[which].append(float(d["accuracy"]))
                            if which == "trained":
                                e["p_trained"].append(float(d["p"]))
        out[net] = {key: {"trained": mean_sd(e["trained"]), "untrained": mean_sd(e["untrained"]),
                          "chance": e["chance"],
                          "runs_p_below_0.05": [int(np.sum(np.array(e["p_trained"]) < 0.05)),
                                                len(e["p_trained"])]}
                    for key, e in entry.items()}
    return out


def timescale_values(groups):
    """{net: {"<rep> trained"|"<rep> untrained": [median unit timescale (ms) per run]}}
    (timescales.py; units without a measurable timescale left out of each median)."""
    out = {}
    for net, runs in groups.items():
        entry = {}
        for r in runs:
            ts = r["timescales"]
            if ts is None:
                continue
            for which in ("trained", "untrained"):
                for rep, res in ts.get(which, {}).items():
                    if isinstance(res, dict) and "tau_ms" in res:
                        tau = np.asarray(res["tau_ms"], dtype=np.float64)
                        tau = tau[np.isfinite(tau)]
                        entry.setdefault(f"{rep} {which}", []).append(
                            float(np.median(tau)) if len(tau) else np.nan)
        out[net] = entry
    return out


def timescale_table(values):
    return {net: {key: mean_sd(v) for key, v in entry.items()} for net, entry in values.items()}


def wall_times(groups):
    """{net: {"train": mean ± s.d. s, "total": ...}} from each run's pipeline.json."""
    out = {}
    for net, runs in groups.items():
        train = [r["seconds"].get("train", {}).get("seconds", np.nan) for r in runs]
        total = [sum(v.get("seconds", 0) for v in r["seconds"].values() if isinstance(v, dict))
                 for r in runs]
        out[net] = {"train_s": mean_sd(train), "total_s": mean_sd(total),
                    "steps": sorted({r["step"] for r in runs})}
    return out


# ----------------------------------------------------------------------------------------
# Similarity of representations


def similarity_section(paths_by_name, runs, cfg):
    """CKA / Procrustes of hidden states (all runs, trained and untrained) and of M (dmpn)."""
    first = runs[0]["config"]
    if any(r["config"]["ruleset"] != first["ruleset"] or
           r["config"].get("io_mode", "low_dim") != first.get("io_mode", "low_dim") for r in runs):
        raise helper.StageError("the runs differ in ruleset or io_mode, so they have no shared "
                                "condition set to compare; narrow --runs.")
    rules = mpn_tasks.run_rules(first)
    batches = similarity.condition_batches(rules, cfg, first.get("io_mode", "low_dim"))
    states, m_states, m_kept = {}, {}, {}
    for r in runs:
        nets = mpn.with_untrained(mpn.load_run(paths_by_name[r["name"]])[0])
        for which, net in nets.items():
            s = similarity.network_states(net, batches, SIBLING_EPOCHS + ("stim2", "delay2", "go1"),
                                          cfg["steps_per_period"])
            states[(r["name"], which)] = s["h"]
            if "M" in s and which == "trained":
                m_states[r["name"]], m_kept[r["name"]] = similarity.reduce_by_pca(
                    s["M"], cfg["m_pcs"], cfg["similarity_seed"])
    keys = list(states)
    h = similarity.pairwise({f"{n}|{w}": states[(n, w)] for n, w in keys})
    nets = [next(r["net"] for r in runs if r["name"] == n) for n, _ in keys]
    trained = np.array([w == "trained" for _, w in keys])
    out = {"runs": [n for n, _ in keys], "which": [w for _, w in keys], "nets": nets,
           "n_periods": len(h["periods"]), "cka": h["cka"], "procrustes": h["procrustes"],
           "mds": similarity.mds(h["procrustes"])}
    idx = np.flatnonzero(trained)
    labels = np.array(nets)[idx]
    if len(set(labels)) >= 2 and max(np.unique(labels, return_counts=True)[1]) >= 2:
        for measure, D in (("procrustes", h["procrustes"]), ("cka", 1 - h["cka"])):
            sub = D[np.ix_(idx, idx)]
            test = similarity.permutation_test(sub, labels, cfg["n_permutations"],
                                               cfg["similarity_seed"])
            out[f"grouping_{measure}"] = {"statistic": test["statistic"], "p": test["p"],
                                          "n_permutations": cfg["n_permutations"],
                                          "by_arch": similarity.within_between(sub, labels)}
    out["by_period"] = by_period(h, idx, labels)
    out["untrained_vs_trained"] = {}
    for net in sorted(set(nets)):
        for which in ("trained", "untrained"):
            sel = [i for i, (n, w) in enumerate(keys) if nets[i] == net and w == which]
            pairs = [h["cka"][i, j] for a, i in enumerate(sel) for j in sel[a + 1:]]
            out["untrained_vs_trained"][f"{net} {which}"] = mean_sd(pairs)
    if len(m_states) >= 2:
        m = similarity.pairwise(m_states)
        off = ~np.eye(len(m["runs"]), dtype=bool)
        out["M"] = {"runs": m["runs"], "cka": m["cka"], "procrustes": m["procrustes"],
                    "cka_pairs": mean_sd(m["cka"][off]), "procrustes_pairs": mean_sd(m["procrustes"][off]),
                    "variance_kept": mean_sd(list(m_kept.values())), "m_pcs": cfg["m_pcs"]}
    return out


def by_period(h, idx, labels):
    """Per task-period, the mean CKA of trained runs within one architecture and between
    architectures (which periods the architectures represent alike, which differently)."""
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(idx), dtype=bool)
    out = {}
    for p, period in enumerate(h["periods"]):
        C = h["cka_by_period"][p][np.ix_(idx, idx)]
        out[period] = {"within": float(np.nanmean(C[off & same])) if (off & same).any() else None,
                       "between": float(np.nanmean(C[~same])) if (~same).any() else None}
    return out


# ----------------------------------------------------------------------------------------
# Main


def summarize(cfg):
    paths = helper.find_runs(cfg["runs"], cfg["runs_dir"], need="log")
    runs = [read_run(p) for p in paths]
    groups = by_arch(runs)
    shift, timescales = shift_values(groups), timescale_values(groups)
    summary = {
        "runs": [r["name"] for r in runs],
        "seeds": {net: [r["seed"] for r in rs] for net, rs in groups.items()},
        "accuracy": accuracy_table(groups), "clusters": cluster_table(groups),
        "siblings": sibling_table(groups), "lesions": lesion_table(groups),
        "memory": memory_table(groups), "wall_times": wall_times(groups),
        "reference_siblings": {f"{pair} {epoch}": v
                               for (pair, epoch), v in REFERENCE_SIBLINGS.items()},
        "reference_seeds": REFERENCE_SEEDS,
        "shift": shift_table(shift), "shift_runs": shift,
        "timescales": timescale_table(timescales), "timescale_runs": timescales,
    }
    if cfg["similarity"]:
        with_ckpt = [r for r, p in zip(runs, paths) if p.checkpoint.exists()]
        summary["similarity"] = similarity_section({p.name: p for p in paths}, with_ckpt, cfg)
    return summary


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(cfg):
    import seed_summary_report as report
    helper.single_thread()
    t0 = time.time()
    summary = summarize(cfg)
    summary["meta"] = {"commit": git_commit(), "preset": cfg["preset"], "runs": cfg["runs"],
                       "created": time.strftime("%Y-%m-%d %H:%M"),
                       "seconds": round(time.time() - t0, 1)}
    out = Path(cfg["out"]) if cfg["out"] else helper.summary_dir(cfg["runs_dir"])
    page = Path(cfg["page"]) if cfg["page"] else None
    fig_dir = page.parent / page.stem if page else out
    figures = report.draw_figures(summary, fig_dir) if cfg["figures"] else {}
    helper.save_json(out / "seed_summary.json", summary, cfg=cfg)
    report.print_tables(summary)
    if page:
        helper.save_json(page.parent / page.stem / "seed_summary.json", summary, cfg=cfg)
        report.write_page(summary, page, figures)
        print(f"page: {page}")
    print(f"summary: {out / 'seed_summary.json'}")
    return summary


if __name__ == "__main__":
    helper.run_main(main, CONFIG)
