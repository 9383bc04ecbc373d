"""The printed tables, figures and markdown page of seed_summary.py (its summary dict in,
text and PNGs out; no computation of its own)."""
from pathlib import Path

import numpy as np

import helper

TITLES = {"dmpn": "dmpn", "vanilla": "leaky RNN", "gru": "GRU"}
COLORS = {"dmpn": "tab:red", "vanilla": "tab:blue", "gru": "tab:green"}


def _ms(v, digits=3):
    """'mean ± s.d.' of a mean_sd triple ('–' when empty)."""
    if v is None or v[2] == 0 or not np.isfinite(v[0]):
        return "–"
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def _frac(x, n, lo=None, hi=None):
    text = f"{x}/{n}"
    return text if lo is None else f"{text} [{lo:.2f}, {hi:.2f}]"


def _title(net):
    return TITLES.get(net, net)


# ----------------------------------------------------------------------------------------
# Tables (markdown rows; printed as they are)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def runs_table(s):
    rows = []
    for net, seeds in s["seeds"].items():
        w = s["wall_times"][net]
        rows.append([_title(net), ", ".join(map(str, seeds)), ", ".join(map(str, w["steps"])),
                     _ms([x / 60 for x in w["train_s"][:2]] + [w["train_s"][2]], 1),
                     _ms([x / 60 for x in w["total_s"][:2]] + [w["total_s"][2]], 1)])
    return table(["architecture", "seeds", "steps", "training (min)", "whole pipeline (min)"],
                 rows)


def accuracy_table(s):
    rows = []
    for net, a in s["accuracy"].items():
        cells = []
        for m in ("trial", "angle"):
            lo, hi = a[m]["rule_mean_ci"]
            cells.append(f"{_ms(a[m]['rule_mean'])} [{lo:.3f}, {hi:.3f}]")
        rows.append([_title(net), *cells])
    return table(["architecture", "trial accuracy, rule mean ± s.d. [95% CI]",
                  "angle accuracy ± s.d. [95% CI]"], rows)


def per_rule_table(s):
    nets = list(s["accuracy"])
    rules = s["accuracy"][nets[0]]["rules"]
    rows = [[rule, *[f"{_ms(s['accuracy'][n]['trial']['per_rule'][i], 2)} / "
                     f"{_ms(s['accuracy'][n]['angle']['per_rule'][i], 2)}" for n in nets]]
            for i, rule in enumerate(rules)]
    return table(["rule", *[f"{_title(n)}: trial / angle" for n in nets]], rows)


def period_table(s, n_rows=6):
    """The task-periods whose trained representations differ most between architectures
    (lowest between-architecture CKA) and those most alike."""
    bp = s["similarity"]["by_period"]
    ok = [(p, v) for p, v in bp.items() if v["between"] is not None]
    ok.sort(key=lambda pv: pv[1]["between"])
    picked = ok[:n_rows] + ok[-n_rows:] if len(ok) > 2 * n_rows else ok
    rows = [[p, f"{v['within']:.2f}" if v["within"] is not None else "–", f"{v['between']:.2f}"]
            for p, v in picked]
    return table(["task-period", "CKA within an architecture", "CKA between architectures"],
                 rows)


def cluster_table(s):
    rows = []
    for net, entry in s["clusters"].items():
        for key, c in entry.items():
            rows.append([_title(net), key, " ".join(map(str, c["k"])),
                         _frac(*c["above_null"], *c["above_null_ci"]),
                         _ms(c["stability_ari"], 2), " ".join(map(str, c["row_k"]))])
    return table(["architecture", "representation-form", "selected k per run (0: none above "
                  "null)", "runs above null [95% CI]", "stability ARI", "task-period k"], rows)


def sibling_table(s):
    nets = list(s["siblings"])
    cells = sorted({c for n in nets for rep in s["siblings"][n].values() for c in rep["cells"]})
    rows = []
    for cell in cells:
        for rep in ("input", "hidden", "modulation"):
            vals = []
            for n in nets:
                got = s["siblings"][n].get(rep, {}).get("cells", {}).get(cell)
                vals.append(_frac(*got) if got else "–")
            if all(v == "–" for v in vals):
                continue
            ref = s["reference_siblings"].get(cell, {}).get(rep)
            rows.append([cell, rep, *vals,
                         f"{ref}/{s['reference_seeds']}" if ref is not None else "–"])
    return table(["sibling task-periods", "representation", *[f"{_title(n)} shared/runs "
                  f"[95% CI]" for n in nets], "reference (7 dmpn seeds)"], rows)


def lesion_table(s):
    rows = []
    for net, fams in s["lesions"].items():
        for name, f in fams.items():
            fail = ", ".join(f"{k} {v}" for k, v in f["strongest_failure_kind"].items()) or "–"
            rows.append([_title(net), name, f["n_runs"], _ms(f["fraction_significant"]),
                         _ms(f["rules_hit_by_affecting_cluster"], 1),
                         _ms(f["kill_all_clusters"], 1), fail])
    return table(["architecture", "lesioned clusters", "runs", "cells significant (fraction)",
                  "rules hit per cluster with an effect (of 15)", "kill-all clusters "
                  "(≥ 80% of rules)", "strongest hidden cluster fails by (runs)"], rows)


def shift_table(s):
    rows = []
    for net, reps in s["shift"].items():
        for rep, e in reps.items():
            rows.append([_title(net), rep, _ms(e["trained"], 2), _ms(e["untrained"], 2),
                         _ms(e["shuffled"], 2), _frac(*e["runs_p_below_0.05"])])
    return table(["architecture", "representation", "r trained", "r untrained",
                  "r rule-shuffled", "runs with p < 0.05"], rows)


def memory_table(s):
    rows = []
    for net, entry in s["memory"].items():
        for key, e in entry.items():
            rows.append([_title(net), key, _ms(e["trained"], 2), _ms(e["untrained"], 2),
                         f"{e['chance']:.2f}", _frac(*e["runs_p_below_0.05"])])
    return table(["architecture", "pair, representation, decoded", "trained", "untrained",
                  "chance", "runs p < 0.05"], rows)


def timescale_table(s):
    rows = [[_title(net), key, _ms(v, 0)] for net, e in s["timescales"].items()
            for key, v in e.items()]
    return table(["architecture", "state", "median unit timescale (ms), mean ± s.d. over "
                  "runs"], rows)


def similarity_table(s):
    sim = s["similarity"]
    rows = []
    for measure, title in (("procrustes", "Procrustes distance"), ("cka", "1 − CKA")):
        g = sim.get(f"grouping_{measure}")
        if not g:
            continue
        for net, wb in g["by_arch"].items():
            rows.append([title, _title(net), _ms(wb.get("within", [np.nan, np.nan, 0]) + [2]),
                         _ms(wb.get("between", [np.nan, np.nan, 0]) + [2]),
                         f"{g['statistic']:+.3f}, p = {g['p']:.4f}"])
    return table(["dissimilarity", "architecture", "within (mean ± s.d. over pairs)",
                  "to other architectures", "between − within, permutation p"], rows)


SECTIONS = (
    ("Runs", runs_table, "Wall times from each run's pipeline.json (the last pass of each "
     "stage; a resumed training counts its last leg only): training and the whole pipeline of "
     "one run, measured while two runs shared the machine's cores, at times with other work: "
     "upper bounds, not benchmarks."),
    ("Accuracy", accuracy_table, "Mean over the 15 rules of the last validation evaluation "
     "(128 trials per rule); s.d. and 95% t interval across seeds."),
    ("Per-rule accuracy", per_rule_table, "Trial measure (strict, SPEC §3) / angle measure "
     "(the reference's), mean ± s.d. across seeds."),
    ("Clustering structure above the null", cluster_table, "Selected k of each representation "
     "(0: no k beats the column-permuted null band, i.e. no structure above chance); the Wilson "
     "95% interval of the fraction of runs with structure; median ARI of the clustering "
     "re-chosen on 8 perturbed designs."),
    ("Sibling task-periods", sibling_table, "Runs whose task-period (row) clustering puts the "
     "two sibling periods in one cluster, out of the runs whose row clustering is above its "
     "null, with Wilson 95% intervals; normalized forms. The reference column is the published "
     "code's 7-seed count for its dmpn."),
    ("Lesions", lesion_table, "Single-cluster lesions at the fixed k against size-matched "
     "random controls, significance by BH at 5% over each heatmap (trial measure)."),
    ("State-space shift test", shift_table, "Correlation of the shift of each rule's "
     "representation with the distance between rules (state_space_shift.py); untrained: the "
     "run's step-0 weights; shuffled: rule labels permuted."),
    ("Memory geometry", memory_table, "Cross-validated linear decoding of the end-of-delay "
     "states of sibling rules (memory_geometry.py)."),
    ("Timescales", timescale_table, "Median over units of the autocorrelation timescale under "
     "input noise (timescales.py)."),
)


def print_tables(s):
    for title, make, _ in SECTIONS:
        print(f"\n{title}\n{make(s)}")
    if "similarity" in s:
        print(f"\nSimilarity of hidden states\n{similarity_table(s)}")


# ----------------------------------------------------------------------------------------
# Figures


def draw_figures(s, folder):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = {"accuracy": _accuracy_figure(plt, s), "siblings": _sibling_figure(plt, s),
            "shift": _shift_figure(plt, s), "timescales": _timescale_figure(plt, s)}
    if "similarity" in s:
        made["similarity"] = _similarity_figure(plt, s)
    out = {}
    for name, fig in made.items():
        if fig is None:
            continue
        path = folder / f"{name}.png"
        with helper.guarded_write(path) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
        plt.close(fig)
        out[name] = path
    return out


def _accuracy_figure(plt, s):
    nets = list(s["accuracy"])
    rules = s["accuracy"][nets[0]]["rules"]
    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    width = 0.8 / len(nets)
    for ax, m in zip(axes, ("trial", "angle")):
        for j, net in enumerate(nets):
            per = np.array(s["accuracy"][net][m]["per_rule"])
            x = np.arange(len(rules)) + (j - (len(nets) - 1) / 2) * width
            ax.bar(x, per[:, 0], width, yerr=per[:, 1], color=COLORS.get(net), alpha=0.8,
                   label=f"{_title(net)} ({int(per[0, 2])} seeds)", capsize=2)
        ax.set_ylim(0, 1.18)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_ylabel(f"{m} accuracy")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper center", fontsize=8, ncol=len(nets), frameon=False)
    axes[0].set_title("Per-rule accuracy after training (mean ± s.d. across seeds)")
    axes[1].set_xticks(np.arange(len(rules)))
    axes[1].set_xticklabels(rules, rotation=45, ha="right")
    fig.tight_layout()
    return fig


def _sibling_figure(plt, s):
    nets = [n for n in s["siblings"] if s["siblings"][n]]
    if not nets:
        return None
    reps = ("input", "hidden", "modulation")
    cells = sorted({c for n in nets for r in s["siblings"][n].values() for c in r["cells"]})
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.45 * len(cells) + 1.8), sharey=True)
    for ax, rep in zip(axes, reps):
        for j, net in enumerate(nets):
            got = s["siblings"][net].get(rep, {}).get("cells", {})
            label = _title(net)
            for i, cell in enumerate(cells):
                if cell not in got:
                    continue
                x, n, lo, hi = got[cell]
                ax.errorbar(x / n, i + (j - 1) * 0.2,
                            xerr=[[max(0.0, x / n - lo)], [max(0.0, hi - x / n)]],
                            fmt="o", color=COLORS.get(net), label=label)
                label = None
        label = f"reference ({s['reference_seeds']} dmpn seeds)"
        for i, cell in enumerate(cells):
            ref = s["reference_siblings"].get(cell, {}).get(rep)
            if ref is not None:
                ax.plot(ref / s["reference_seeds"], i, "kx", ms=9, label=label)
                label = None
        ax.set_xlim(-0.05, 1.05)
        ax.set_title(f"{rep} task-period clusters")
        ax.set_xlabel("fraction of runs sharing a cluster (95% CI)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(cells)))
    axes[0].set_yticklabels(cells)
    axes[0].invert_yaxis()
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab and lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("Do sibling rules share task-period clusters?")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


SHIFT_LOOK = {"trained": ("trained", 1.0), "untrained": ("untrained (step 0)", 0.45),
              "shuffled": ("rule labels shuffled", 0.15)}
REP_NAMES = {"hidden": "hidden h", "M": "plastic state M", "WM": "W ⊙ M"}


def _shift_figure(plt, s):
    """Shift-test r per representation and architecture: trained vs its baselines, each run a
    dot over the mean ± s.d. bar."""
    values = s.get("shift_runs", {})
    reps = [rep for rep in REP_NAMES if any(rep in v for v in values.values())]
    if not reps:
        return None
    fig, axes = plt.subplots(1, len(reps), figsize=(3.6 * len(reps) + 0.8, 3.8), sharey=True,
                             squeeze=False)
    for ax, rep in zip(axes[0], reps):
        nets = [net for net in values if rep in values[net]]
        for i, net in enumerate(nets):
            for j, (kind, (label, alpha)) in enumerate(SHIFT_LOOK.items()):
                r = np.asarray(values[net][rep][kind], dtype=float)
                r = r[np.isfinite(r)]
                if not r.size:
                    continue
                x = i + (j - 1) * 0.27
                ax.bar(x, r.mean(), 0.25, yerr=r.std(ddof=1) if r.size > 1 else 0,
                       color=COLORS.get(net, "0.5"), alpha=alpha, capsize=3, edgecolor="k",
                       linewidth=0.5, label=label if i == 0 and rep == reps[0] else None)
                ax.scatter(np.full(r.size, x), r, s=9, color="k", zorder=3)
        ax.axhline(0, color="0.4", lw=0.8)
        ax.set_xticks(range(len(nets)), [_title(n) for n in nets])
        ax.set_title(REP_NAMES[rep])
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("Pearson r, onset distance vs\nangle of rule pairs")
    fig.legend(loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("State-space shift test across seeds: trained vs untrained vs shuffled rules "
                 "(bar: mean ± s.d., dot: one run)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def _timescale_figure(plt, s):
    """Median hidden-unit timescale per run, trained vs untrained, per architecture."""
    values = s.get("timescale_runs", {})
    nets = [net for net in values if any(k.startswith("hidden") for k in values[net])]
    if not nets:
        return None
    fig, ax = plt.subplots(figsize=(1.9 * len(nets) + 2.2, 3.8))
    ticks = []
    for i, net in enumerate(nets):
        counts = []
        for j, (which, alpha) in enumerate((("trained", 1.0), ("untrained", 0.35))):
            tau = np.asarray(values[net].get(f"hidden {which}", []), dtype=float)
            n_runs = tau.size
            tau = tau[np.isfinite(tau) & (tau > 0)]
            counts.append(f"{tau.size}/{n_runs}")
            if not tau.size:
                continue
            x = i + (j - 0.5) * 0.35
            ax.bar(x, np.exp(np.log(tau).mean()), 0.32, color=COLORS.get(net, "0.5"),
                   alpha=alpha, edgecolor="k", linewidth=0.5,
                   label=f"{which} (bar: geometric mean)" if i == 0 else None)
            ax.scatter(np.full(tau.size, x), tau, s=12, color="k", zorder=3)
        ticks.append(f"{_title(net)}\n{' | '.join(counts)} runs")
    ax.set_yscale("log")
    ax.set_xticks(range(len(nets)), ticks)
    ax.set_xlabel("runs with a measurable timescale: trained | untrained")
    ax.set_ylabel("median hidden-unit timescale τ (ms)")
    ax.set_title("Hidden-unit timescales under noisy fixation (dot: one run)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def _similarity_figure(plt, s):
    sim = s["similarity"]
    which, nets = np.array(sim["which"]), np.array(sim["nets"])
    trained = np.flatnonzero(which == "trained")
    order = trained[np.argsort([list(COLORS).index(n) if n in COLORS else 9
                                for n in nets[trained]], kind="stable")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.2))
    C = np.asarray(sim["cka"])[np.ix_(order, order)]
    im = ax1.imshow(C, vmin=0, vmax=1, cmap="viridis")
    ticks = [f"{_title(nets[i])} s{sim['runs'][i].split('_seed')[1].split('_')[0]}" for i in order]
    ax1.set_xticks(range(len(order)))
    ax1.set_xticklabels(ticks, rotation=90, fontsize=7)
    ax1.set_yticks(range(len(order)))
    ax1.set_yticklabels(ticks, fontsize=7)
    ax1.set_title(f"linear CKA of hidden states (trained runs; mean of {sim['n_periods']} "
                  f"task-periods)", fontsize=9)
    fig.colorbar(im, ax=ax1, shrink=0.8, label="CKA")
    xy = np.asarray(sim["mds"])
    for net in dict.fromkeys(nets):
        for w, marker, fill in (("trained", "o", True), ("untrained", "s", False)):
            sel = (nets == net) & (which == w)
            ax2.scatter(xy[sel, 0], xy[sel, 1], marker=marker, s=45,
                        facecolors=COLORS.get(net) if fill else "none",
                        edgecolors=COLORS.get(net), label=f"{_title(net)} {w}")
    g = sim.get("grouping_procrustes")
    note = f"; architecture grouping p = {g['p']:.4f}" if g else ""
    ax2.set_title(f"MDS of the Procrustes distances{note}", fontsize=9)
    ax2.set_xlabel("MDS 1 (Procrustes distance units)")
    ax2.set_ylabel("MDS 2")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------
# The page


def write_page(s, page, figures):
    page = Path(page)
    meta = s["meta"]
    n = {net: len(v) for net, v in s["seeds"].items()}
    lines = [
        "# Results across seeds and architectures",
        "",
        f"Generated by `seed_summary.py` on {meta['created']} from commit `{meta['commit']}`: "
        f"runs `{meta['runs']}` made with `{meta['preset'] or 'unstated preset'}` — "
        + ", ".join(f"{_title(k)} {v} seeds" for k, v in n.items()) + ".",
        "",
        "Regenerate (runs, then this page): "
        "`python run_pipeline.py configs/cpu_compare.py --nets=dmpn,vanilla,gru "
        "--seeds=1,2,3,4,5 --jobs=2` (it ends by calling "
        "`python seed_summary.py --runs='everything_*_cmp' --page=docs/results.md "
        "--preset=configs/cpu_compare.py`). The numbers below are in "
        f"[`{page.stem}/seed_summary.json`]({page.stem}/seed_summary.json).",
        "",
    ]
    for title, make, text in SECTIONS:
        lines += [f"## {title}", "", text, "", make(s), ""]
        fig = {"Accuracy": "accuracy", "Sibling task-periods": "siblings",
               "State-space shift test": "shift", "Timescales": "timescales"}.get(title)
        if fig in figures:
            lines += [f"![{title}]({page.stem}/{figures[fig].name})", ""]
    if "similarity" in s:
        sim = s["similarity"]
        lines += ["## Similarity of representations", "",
                  f"Linear CKA and orthogonal Procrustes distance between every pair of runs' "
                  f"hidden states on the same noise-free condition set ({sim['n_periods']} "
                  f"task-periods, mean over them); permutation test of the architecture "
                  f"labels of the trained runs.", "", similarity_table(s), ""]
        rows = [[_title(k.split()[0]), k.split()[1], _ms(v, 2)]
                for k, v in sim["untrained_vs_trained"].items()]
        lines += ["Baseline: CKA between runs of one architecture, trained vs their untrained "
                  "(step-0) twins:", "", table(["architecture", "weights", "CKA between seeds"],
                                               rows), ""]
        if "M" in sim:
            m = sim["M"]
            lines += [f"dmpn plastic state M (leading {m['m_pcs']} PCs per run, "
                      f"{_ms(m['variance_kept'], 3)} of its variance): CKA between seeds "
                      f"{_ms(m['cka_pairs'], 2)}, Procrustes distance "
                      f"{_ms(m['procrustes_pairs'], 2)}.", ""]
        if "similarity" in figures:
            lines += [f"![similarity]({page.stem}/{figures['similarity'].name})", ""]
        lines += ["Task-periods where the architectures' trained hidden states differ most "
                  "(top) and least (bottom), by mean CKA across run pairs:", "",
                  period_table(s), ""]
    page.parent.mkdir(parents=True, exist_ok=True)
    with helper.guarded_write(page) as tmp:
        tmp.write_text("\n".join(lines))
