"""Multi-seed summary of analysed runs (`python multiple_task_analysis.py --summary=True`):
per-rule accuracy across seeds, selected k across seeds, co-clustering of sibling rules.

Reads:  runs/<aname>/log.json, cluster_info.h5, cluster_info_mod.h5 of every run matching
        `runs` (runs not clustered yet count for accuracy only).
Writes: runs/summary/seed_summary.json and seed_summary.png.
"""
import numpy as np

import helper
from multiple_task_analysis import FORMS, PERIOD_EPOCHS, REP_TITLES, SIBLINGS



def final_accuracy(paths):
    """{"trial": {rule: acc}, "angle": {...}} of the run's last evaluation (log.json)."""
    log = helper.load_json(paths.log, "python multiple_task.py")
    if not log.get("evals"):
        raise helper.StageError(f"{str(paths.log)!r} has no evaluation yet; train the run "
                                f"longer with `python multiple_task.py`.")
    return log["evals"][-1]["acc"]


def cluster_entries(paths):
    """{(rep, form): R} from the run's cluster files ({} when clustering has not run)."""
    out = {}
    for attr in ("cluster_info", "cluster_info_mod"):
        path = getattr(paths, attr)
        if path.exists():
            info, _ = helper.load_h5(path, f"python clustering.py --run={paths.name}")
            out.update({(rep, form): R for rep, forms in info.items() if rep in REP_TITLES
                        for form, R in forms.items()})
    return out


def sibling_periods(row_names):
    """[(label, row_a, row_b)] of the task-periods that sibling rules share."""
    rows = list(row_names)
    return [(f"{a}/{b} {e}", rows.index(f"{a}-{e}"), rows.index(f"{b}-{e}"))
            for a, b in SIBLINGS for e in PERIOD_EPOCHS
            if f"{a}-{e}" in rows and f"{b}-{e}" in rows]


def summarize_seeds(runs):
    """The summary dict over runs (RunPaths with a log)."""
    names = [r.name for r in runs]
    accs = [final_accuracy(r) for r in runs]
    rules = list(accs[0]["trial"])
    acc = {m: np.array([[a[m].get(rule, np.nan) for rule in rules] for a in accs])
           for m in ("trial", "angle")}
    entries = {r.name: cluster_entries(r) for r in runs}
    clustered = [n for n in names if entries[n]]
    keys = [(rep, form) for rep in REP_TITLES for form in FORMS
            if any((rep, form) in entries[n] for n in clustered)]
    k = {f"{rep}-{form}": {axis: [int(entries[n][(rep, form)][key]) for n in clustered
                                  if (rep, form) in entries[n]]
                           for axis, key in (("columns", "k"), ("rows", "row_k"))}
         for rep, form in keys}
    sib_keys = [key for key in keys if key[0] != "modulation_weighted"]
    labels, same, n_seeds = [], None, np.zeros(len(sib_keys), dtype=int)
    for n in clustered:
        for j, key in enumerate(sib_keys):
            R = entries[n].get(key)
            if R is None:
                continue
            periods = sibling_periods(R["row_names"])
            if same is None:
                labels = [p[0] for p in periods]
                same = np.zeros((len(labels), len(sib_keys)), dtype=int)
            lab = np.asarray(R["row_labels"])
            same[:, j] += [int(lab[a] == lab[b]) for _, a, b in periods]
            n_seeds[j] += 1
    return dict(runs=names, rules=rules, acc=acc,
                acc_mean={m: np.nanmean(v, axis=0) for m, v in acc.items()},
                acc_std={m: np.nanstd(v, axis=0) for m, v in acc.items()},
                clustered_runs=clustered, k=k,
                siblings=dict(periods=labels, columns=[f"{r}-{f}" for r, f in sib_keys],
                              same=same if same is not None else np.zeros((0, len(sib_keys))),
                              n_seeds=n_seeds))


def print_summary(summary):
    n = len(summary["runs"])
    print(f"per-rule accuracy over {n} runs (mean ± s.d.):")
    print(f"  {'rule':16s} {'trial':>15s} {'angle':>15s}")
    for i, rule in enumerate(summary["rules"]):
        cells = [f"{summary['acc_mean'][m][i]:.3f} ± {summary['acc_std'][m][i]:.3f}"
                 for m in ("trial", "angle")]
        print(f"  {rule:16s} {cells[0]:>15s} {cells[1]:>15s}")
    print(f"selected k over {len(summary['clustered_runs'])} clustered runs (columns | rows):")
    for key, ks in summary["k"].items():
        print(f"  {key:32s} {ks['columns']} | {ks['rows']}")
    sib = summary["siblings"]
    if len(sib["periods"]):
        print("sibling task-periods in the same row cluster (seeds):")
        w_label, w = max(map(len, sib["periods"])), max(map(len, sib["columns"]))
        print("  " + " " * w_label + "".join(f" {c:>{w}s}" for c in sib["columns"]))
        for i, label in enumerate(sib["periods"]):
            cells = [f"{sib['same'][i, j]}/{sib['n_seeds'][j]}" for j in range(len(sib["columns"]))]
            print(f"  {label:{w_label}s}" + "".join(f" {c:>{w}s}" for c in cells))


def plot_seed_accuracy(ax, summary):
    x = np.arange(len(summary["rules"]))
    for off, m, color in ((-0.2, "trial", "C0"), (0.2, "angle", "C1")):
        ax.bar(x + off, summary["acc_mean"][m], 0.4, yerr=summary["acc_std"][m], color=color,
               alpha=0.7, label=f"{m} (mean ± s.d.)", error_kw={"lw": 0.8})
        for row in summary["acc"][m]:
            ax.plot(x + off, row, ".", color="k", ms=2)
    ax.set_xticks(x)
    ax.set_xticklabels(summary["rules"], rotation=60, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (final evaluation)")
    ax.set_title(f"per-rule accuracy over {len(summary['runs'])} seeds (dots: seeds)")
    ax.legend(loc="upper right", fontsize=7)


def plot_seed_k(ax, summary):
    keys = list(summary["k"])
    for j, (axis, marker) in enumerate((("columns", "o"), ("rows", "s"))):
        for i, key in enumerate(keys):
            ks = summary["k"][key][axis]
            ax.plot(np.full(len(ks), i + 0.15 * (2 * j - 1)), ks, marker, color=f"C{j}", ms=4,
                    alpha=0.7, label=axis if i == 0 else None)
    ax.set_xticks(np.arange(len(keys)))
    ax.set_xticklabels(keys, rotation=45, ha="right")
    ax.set_ylabel("selected k")
    ax.set_title("selected k across seeds")
    ax.legend(fontsize=7)


def plot_siblings(ax, summary):
    sib = summary["siblings"]
    frac = sib["same"] / np.maximum(sib["n_seeds"], 1)[None, :]
    im = ax.imshow(frac, vmin=0, vmax=1, cmap="Greens", aspect="auto")
    for (i, j), v in np.ndenumerate(sib["same"]):
        ax.text(j, i, f"{v}/{sib['n_seeds'][j]}", ha="center", va="center", fontsize=7,
                color="w" if frac[i, j] > 0.6 else "k")
    ax.set_yticks(np.arange(len(sib["periods"])))
    ax.set_yticklabels(sib["periods"], fontsize=7)
    ax.set_xticks(np.arange(len(sib["columns"])))
    ax.set_xticklabels(sib["columns"], rotation=45, ha="right")
    ax.set_title("sibling rows in the same row cluster")
    return im


def figure_seed_summary(summary, path):
    import matplotlib.pyplot as plt
    helper.set_style()
    fig = plt.figure(figsize=(13, 8.5), constrained_layout=True)
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.25])
    plot_seed_accuracy(fig.add_subplot(grid[0, :]), summary)
    if summary["k"]:
        plot_seed_k(fig.add_subplot(grid[1, 0]), summary)
        ax = fig.add_subplot(grid[1, 1])
        fig.colorbar(plot_siblings(ax, summary), ax=ax, shrink=0.8, label="fraction of seeds")
    fig.suptitle(f"multi-seed summary of {len(summary['runs'])} runs")
    return helper.save_figure(fig, path)


def seed_summary(cfg):
    """--summary=True: accuracy, selected k and sibling co-clustering across the runs."""
    runs = helper.find_runs(cfg["runs"], cfg["runs_dir"], need="log")
    summary = summarize_seeds(runs)
    missing = sorted(set(summary["runs"]) - set(summary["clustered_runs"]))
    if missing:
        print(f"no cluster_info for {missing}: run `python clustering.py --run=<aname>` to "
              f"include them in the k and sibling summaries")
    print_summary(summary)
    out = helper.summary_paths(cfg["runs_dir"])
    helper.save_json(out.seeds, dict(summary, _provenance=helper.provenance(
        dict(cfg, runs_found=summary["runs"]))))
    figure = figure_seed_summary(summary, out.figure("seed_summary"))
    print(f"summary: {out.seeds}\nfigure: {figure}")
    return summary
