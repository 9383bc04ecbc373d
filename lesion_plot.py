"""Figures of the lesion stage (SPEC §6.4), drawn from the lesion results file only.

The normalized effect of a cluster lesion on a rule is the mean accuracy of its size-matched
random controls minus the accuracy with the cluster lesioned (positive: the cluster matters
more than random units of the same number). A dot marks a significant cell: the lesion is
below every control and the Benjamini–Hochberg q of its one-sided test against the controls'
spread and the test set's sampling error is ≤ alpha over its heatmap (lesion.py).

Reads:  runs/<aname>/lesion.h5 (python lesion.py --run=<aname>); refused when older than the
        checkpoint or the cluster files it was computed from.
Writes: runs/<aname>/figures/
    lesion_heatmaps_units.png        effect per (rule, cluster): input/hidden clusterings
    lesion_heatmaps_modulation.png   effect per (rule, cluster): zero_W / freeze_M
    lesion_failure_kinds.png         per cluster: how its lesion fails (fixation / go / no-go)
    lesion_readout_share.png         hidden clusters: share of ‖W_out‖² per output vs effect
    lesion_combined_matrix.png       combined-lesion effect per (input, hidden) cluster pair
    lesion_violins.png               distribution of effects per cluster family
    lesion_ranked_importance.png     clusters ranked by their mean effect over rules
    lesion_additivity.png            combined effect vs sum of the two single effects
    lesion_zeroW_vs_freezeM.png      zero_W vs freeze_M effect of each synapse cluster
    lesion_size_vs_effect.png        cluster size vs mean effect
    lesion_tuning_vs_effect.png      tuning similarity vs lesion-effect distance of cluster pairs
    lesion_pruning.png               accuracy vs magnitude-pruning sparsity
    lesion_robustness.png            accuracy vs perturbation level (mean ± s.e.m. over draws)

Axis order of effect matrices: clusters x rules.

Example:
    python lesion_plot.py --run=everything_dmpn_seed749_L21e4_h300_b128
"""
import numpy as np
from matplotlib.ticker import MaxNLocator

import helper
from lesion_engine import family_name, load_result
from variance_core import FORM_SHORT

CONFIG = dict(
    run="everything_dmpn_seed*",  # run name or glob (quote globs in the shell) {@run_pattern}
    runs_dir=None,  # runs root; None = $MPN_RUNS_DIR, else runs/ {None | @path}
    effect_measure="trial",  # accuracy behind every effect: "trial" (strict) or "angle" {trial | angle}
)

EFFECT_CMAP = "RdBu_r"  # diverging, centred on zero effect; NaN (no control possible) in grey
MEASURE_COLORS = {"trial": "tab:blue", "angle": "tab:orange"}
FAILURE_KINDS = ("broke_fixation", "wrong_go", "nogo_response")
FAILURE_LABELS = {"broke_fixation": "broke fixation before the go cue",
                  "wrong_go": "wrong or no response (go trials)",
                  "nogo_response": "responded on a no-go trial"}
FAILURE_COLORS = ("tab:red", "tab:blue", "tab:orange")
OUTPUT_NAMES = ("fixation", "response sin", "response cos")


# ----------------------------------------------------------------------------------------
# Data helpers (results file -> arrays)


def _vmax(arrays):
    vals = np.concatenate([np.abs(a[np.isfinite(a)]).ravel() for a in arrays] + [np.zeros(1)])
    return max(float(vals.max()), 1e-3)


def _effect_cmap():
    import matplotlib.pyplot as plt
    return plt.get_cmap(EFFECT_CMAP).with_extremes(bad="0.6")


def _cluster_names(t):
    names = [str(c) for c in t["clusters"]]
    return [n + "u" if u else n for n, u in zip(names, t["unresponsive"])]


def _fit_line(x, y):
    """Least-squares slope, intercept and Pearson r of the finite points (None if < 3)."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0:
        return None
    slope, intercept = np.polyfit(x[ok], y[ok], 1)
    r = np.corrcoef(x[ok], y[ok])[0, 1] if np.ptp(y[ok]) > 0 else np.nan
    return slope, intercept, r


def _cosine_matrix(P):
    norm = np.linalg.norm(P, axis=1, keepdims=True)
    Q = P / np.where(norm > 0, norm, 1.0)
    return Q @ Q.T


def row_mean(a):
    """Mean over the last axis ignoring NaN; NaN (silently) where a row has no finite value."""
    n = np.isfinite(a).sum(axis=-1)
    return np.where(n > 0, np.nansum(a, axis=-1) / np.maximum(n, 1), np.nan)


def mean_acc(acc, cond):
    """Mean over rules of the accuracy of the conditions `cond` (any shape of ids)."""
    return np.nanmean(acc[np.asarray(cond)], axis=-1)


def stats_of(t, kind, measure):
    """(effect, significant) of one table's lesion kind, (n_clusters, n_rules)."""
    s = t["stats"][kind][measure]
    return s["effect"], np.asarray(s["significant"], dtype=bool)


def cluster_effects(result, measure):
    """{family name: (effect (n_clusters, n_rules), table)} over single and modulation
    lesions."""
    out = {}
    for group in ("single", "modulation"):
        for t in result.get(group, {}).values():
            for kind in t["stats"]:
                out[family_name(t, kind)] = (stats_of(t, kind, measure)[0], t)
    return out


# ----------------------------------------------------------------------------------------
# Panels: one function per kind of plot, each drawing into an ax


def plot_effect_heatmap(ax, effect, significant, rules, cluster_names, title, vmax,
                        rule_labels=True):
    """Rules x clusters heatmap of normalized effects, significant cells marked with a dot;
    returns the image (for a colorbar)."""
    im = ax.imshow(effect.T, aspect="auto", cmap=_effect_cmap(), vmin=-vmax, vmax=vmax,
                   interpolation="nearest")
    c, r = np.nonzero(significant)
    ax.scatter(c, r, s=7, color="k", marker="o", linewidths=0)
    ax.set_yticks(range(len(rules)), rules if rule_labels else [], fontsize=6)
    step = max(1, len(cluster_names) // 25)
    ax.set_xticks(range(0, len(cluster_names), step), cluster_names[::step], fontsize=6,
                  rotation=90)
    ax.set_xlabel("cluster label")
    ax.set_title(title, fontsize=8)
    return im


def plot_pair_matrix(ax, matrix, in_names, hid_names, title, vmax):
    im = ax.imshow(matrix, aspect="auto", cmap=_effect_cmap(), vmin=-vmax, vmax=vmax,
                   interpolation="nearest")
    ax.set_yticks(range(len(in_names)), in_names, fontsize=6)
    ax.set_xticks(range(len(hid_names)), hid_names, fontsize=6, rotation=90)
    ax.set_ylabel("input cluster")
    ax.set_xlabel("hidden cluster")
    ax.set_title(title, fontsize=8)
    return im


def plot_violins(ax, effects_by_family, measure):
    names = list(effects_by_family)
    data = [e[np.isfinite(e)].ravel() for e in effects_by_family.values()]
    keep = [i for i, d in enumerate(data) if d.size]
    if keep:
        parts = ax.violinplot([data[i] for i in keep], positions=keep, showmedians=True,
                              widths=0.8)
        for body in parts["bodies"]:
            body.set_alpha(0.6)
    ax.axhline(0, color="0.5", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"normalized effect ({measure} acc.)")
    ax.set_title("Lesion effects per cluster family (all clusters x rules)")


def plot_ranked(ax, effects_by_family, measure, title):
    for name, eff in effects_by_family.items():
        m = row_mean(eff)
        m = np.sort(m[np.isfinite(m)])[::-1]
        if m.size:
            ax.plot(np.arange(1, m.size + 1), m, marker="o", ms=3, lw=1, label=name)
    ax.axhline(0, color="0.5", lw=0.8, ls="--")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("cluster rank")
    ax.set_ylabel(f"mean effect over rules ({measure} acc.)")
    ax.set_title(title)
    ax.legend(fontsize=6)


def plot_scatter_fit(ax, x, y, label, color, identity=True):
    """Scatter with its least-squares line (slope and r in the legend)."""
    ax.scatter(x, y, s=6, alpha=0.35, color=color, edgecolors="none")
    fit = _fit_line(np.asarray(x, float), np.asarray(y, float))
    if fit is not None:
        xs = np.linspace(np.nanmin(x), np.nanmax(x), 2)
        slope, intercept, r = fit
        ax.plot(xs, slope * xs + intercept, color=color, lw=1.5,
                label=f"{label}: slope {slope:.2f}, r = {r:.2f}")
    elif np.size(x):
        ax.plot([], [], color=color, label=f"{label} (too few points to fit)")
    if identity:
        lo = np.nanmin([np.nanmin(x), np.nanmin(y)]) if np.size(x) else 0
        hi = np.nanmax([np.nanmax(x), np.nanmax(y)]) if np.size(x) else 1
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--")


def plot_size_vs_effect(ax, families, measure, title):
    for name, (eff, t) in families.items():
        ax.scatter(t["sizes"], row_mean(eff), s=12, alpha=0.7, label=name)
    ax.set_xscale("log")
    ax.axhline(0, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("cluster size (units or synapses)")
    ax.set_ylabel(f"mean effect over rules ({measure} acc.)")
    ax.set_title(title)
    ax.legend(fontsize=6)


def plot_tuning_vs_effect(ax, families, title):
    colors = iter(helper_colors(len(families)))
    for name, (eff, t) in families.items():
        color = next(colors)
        if t.get("profiles") is None or len(t["clusters"]) < 3:
            continue
        ok = np.isfinite(eff).all(axis=1)
        if ok.sum() < 3:
            continue
        sim = _cosine_matrix(np.asarray(t["profiles"], float)[ok])
        e = eff[ok]
        dist = np.linalg.norm(e[:, None] - e[None], axis=-1)
        iu = np.triu_indices(ok.sum(), 1)
        plot_scatter_fit(ax, sim[iu], dist[iu], name, color, identity=False)
    ax.set_xlabel("tuning similarity (cosine of cluster-mean variance profiles)")
    ax.set_ylabel("lesion-effect distance (Euclidean over rules)")
    ax.set_title(title)
    ax.legend(fontsize=6)


def plot_pruning(ax, sparsity, acc_by_measure, baseline):
    pos = np.arange(len(sparsity))
    for measure, acc in acc_by_measure.items():
        ax.plot(pos, acc, marker="o", color=MEASURE_COLORS[measure], label=f"{measure} accuracy")
        ax.axhline(baseline[measure], color=MEASURE_COLORS[measure], lw=0.8, ls=":")
    ax.set_xticks(pos, [f"{s:g}" for s in sparsity])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sparsity (fraction of W entries zeroed, smallest |W| first)")
    ax.set_ylabel("mean accuracy over rules")
    ax.set_title("Magnitude pruning of W (dotted: intact network)")
    ax.legend()


def plot_robustness(ax, levels, per_draw_by_measure, xlabel, title):
    """Mean ± s.e.m. over draws of the rule-mean accuracy at each level."""
    for measure, per_draw in per_draw_by_measure.items():
        mean = np.nanmean(per_draw, axis=1)
        n = np.isfinite(per_draw).sum(axis=1)
        sem = np.nanstd(per_draw, axis=1, ddof=1) / np.sqrt(np.maximum(n, 1)) if per_draw.shape[1] > 1 \
            else np.zeros_like(mean)
        c = MEASURE_COLORS[measure]
        ax.plot(levels, mean, marker="o", ms=3, color=c, label=f"{measure} accuracy")
        ax.fill_between(levels, mean - sem, mean + sem, color=c, alpha=0.25)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean accuracy over rules")
    ax.set_title(title)
    ax.legend(fontsize=7)


def helper_colors(n):
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def plot_failure_kinds(ax, lesion_kinds, control_error, names, title):
    """Stacked bars per cluster: the fraction of trials (mean over rules) its lesion fails by
    each kind; a black tick at the mean error of its random controls."""
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for kind, color in zip(FAILURE_KINDS, FAILURE_COLORS):
        ax.bar(x, lesion_kinds[kind], bottom=bottom, color=color, width=0.8,
               label=FAILURE_LABELS[kind])
        bottom += lesion_kinds[kind]
    ax.scatter(x, control_error, marker="_", s=80, color="k", zorder=3,
               label="random controls (error)")
    ax.set_xticks(x, names, fontsize=6, rotation=90)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("cluster label")
    ax.set_ylabel("fraction of trials failed")
    ax.set_title(title, fontsize=8)


def plot_readout_share(ax, families, output, measure):
    """Each hidden cluster's share of ‖W_out[output, :]‖² vs its mean effect over rules;
    filled: at least one significant rule."""
    for (name, (share, effect, significant)), color in zip(families.items(),
                                                            helper_colors(len(families))):
        mean = row_mean(effect)
        hit = significant.any(axis=1)
        ax.scatter(share[~hit, output], mean[~hit], s=22, facecolors="none", edgecolors=color)
        ax.scatter(share[hit, output], mean[hit], s=22, color=color, label=name)
    ax.axhline(0, color="0.5", lw=0.8, ls="--")
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel(f"share of ‖W_out[{OUTPUT_NAMES[output]}]‖² in the cluster")
    ax.set_ylabel(f"mean effect over rules ({measure} acc.)")
    ax.set_title(f"readout of {OUTPUT_NAMES[output]}", fontsize=9)


# ----------------------------------------------------------------------------------------
# Figures


def _new_figure(nrows, ncols, w, h):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False)
    return fig, axes


def _empty(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def figure_heatmaps(panels, rules, measure, title, path):
    """panels: list of rows, each a list of (title, effect, significant, cluster names)."""
    effects = [p[1] for row in panels for p in row if p is not None]
    if not effects:
        return None
    vmax = _vmax(effects)
    ncols = max(len(row) for row in panels)
    fig, axes = _new_figure(len(panels), ncols, 3.6, 3.4)
    im = None
    for i, row in enumerate(panels):
        for j in range(ncols):
            p = row[j] if j < len(row) else None
            if p is None:
                _empty(axes[i, j], "not run")
                continue
            im = plot_effect_heatmap(axes[i, j], p[1], p[2], rules, p[3], p[0], vmax,
                                     rule_labels=j == 0)
    fig.subplots_adjust(wspace=0.08, hspace=0.55, top=0.8 if len(panels) == 1 else 0.88)
    fig.colorbar(im, ax=axes, shrink=0.6,
                 label=f"normalized effect (control − lesion, {measure} accuracy)")
    fig.suptitle(title, fontsize=11)
    fig.text(0.45, -0.1 if len(panels) == 1 else -0.04,
             "effect = mean of size-matched random controls − lesion; dot: significant (below "
             "every control, Benjamini–Hochberg q ≤ alpha over the panel); 'u': the unresponsive "
             "cluster; grey: no size-matched control possible", ha="center", fontsize=8)
    return helper.save_figure(fig, path)


def _panel(t, kind, measure, title):
    eff, sig = stats_of(t, kind, measure)
    return (f"{title}\n{int(sig.sum())} of {int(np.isfinite(eff).sum())} cells significant",
            eff, sig, _cluster_names(t))


def unit_heatmap_panels(result, measure):
    rows = {}
    for t in result.get("single", {}).values():
        rows.setdefault(t["rep"], []).append(
            _panel(t, "lesion", measure, f"{t['rep']}, {t['form']}, {t['cut']} k={t['k']}"))
    return list(rows.values())


def modulation_heatmap_panels(result, measure):
    rows = {"zero_W": [], "freeze_M": []}
    for t in result.get("modulation", {}).values():
        for kind in rows:
            rows[kind].append(_panel(t, kind, measure,
                                     f"{kind}: {family_name(t)}, {t['cut']}"))
    return [r for r in rows.values() if r]


def figure_failure_kinds(result, path):
    """One panel per unit clustering: how each cluster's lesion fails, mean over rules."""
    tables = list(result.get("single", {}).values())
    if not tables:
        return None
    scores = result["scores"]
    ncols = min(2, len(tables))
    nrows = -(-len(tables) // ncols)
    fig, axes = _new_figure(nrows, ncols, 5.2, 3.2)
    for ax, t in zip(axes.ravel(), tables):
        kinds = {k: np.nanmean(scores[k][t["lesion"]], axis=1) for k in FAILURE_KINDS}
        control = np.where(t["control"] >= 0, np.nanmean(1 - scores["trial"], axis=1)[
            np.maximum(t["control"], 0)], np.nan)
        plot_failure_kinds(ax, kinds, row_mean(control), _cluster_names(t),
                           f"{family_name(t)} ({t['cut']})")
    for ax in axes.ravel()[len(tables):]:
        _empty(ax, "")
    axes[0, 0].legend(fontsize=6, loc="upper left")
    fig.suptitle("How each cluster's lesion fails (trial measure; fractions of trials, mean "
                 "over rules)")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / (3.2 * nrows)))
    return helper.save_figure(fig, path)


def figure_readout_share(result, measure, path):
    families = {f"{family_name(t)} ({t['cut']})": (t["readout_share"], *stats_of(t, "lesion", measure))
                for t in result.get("single", {}).values() if "readout_share" in t}
    if not families:
        return None
    n_out = next(iter(families.values()))[0].shape[1]
    fig, axes = _new_figure(1, n_out, 4.0, 3.6)
    for o, ax in enumerate(axes[0]):
        plot_readout_share(ax, families, o, measure)
    axes[0, -1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Hidden clusters: share of the readout weights vs lesion effect "
                 "(filled: significant for at least one rule)")
    fig.tight_layout()
    return helper.save_figure(fig, path)


def combined_effects(t, measure):
    """(combined effect (P, R), sum of single effects (P, R), combined significant)."""
    comb, sig = stats_of(t, "lesion", measure)
    e_in, e_hid = stats_of(t, "input", measure)[0], stats_of(t, "hidden", measure)[0]
    pairs = t["pairs"]
    return comb, e_in[pairs[:, 0]] + e_hid[pairs[:, 1]], sig


def figure_combined_matrix(result, measure, path):
    tables = list(result.get("combined", {}).values())
    if not tables:
        return None
    fig, axes = _new_figure(1, len(tables), 5.0, 4.2)
    mats, marks = [], []
    for t in tables:
        comb, _, sig = combined_effects(t, measure)
        m = np.full((len(t["input_clusters"]), len(t["hidden_clusters"])), np.nan)
        m[t["pairs"][:, 0], t["pairs"][:, 1]] = row_mean(comb)
        mats.append(m)
        marks.append(t["pairs"][sig.any(axis=1)])
    vmax = _vmax(mats)
    for ax, t, m, mark in zip(axes[0], tables, mats, marks):
        im = plot_pair_matrix(ax, m, [str(c) for c in t["input_clusters"]],
                              [str(c) for c in t["hidden_clusters"]],
                              f"combined lesions, {t['form']} k={t['k_input']}/{t['k_hidden']}"
                              f"\n(dot: significant for at least one rule)", vmax)
        ax.scatter(mark[:, 1], mark[:, 0], s=7, color="k", linewidths=0)
    fig.colorbar(im, ax=axes, shrink=0.8, label=f"mean effect over rules ({measure} acc.)")
    return helper.save_figure(fig, path)


def figure_violins(result, measure, path):
    families = {name: eff for name, (eff, _) in cluster_effects(result, measure).items()}
    for t in result.get("combined", {}).values():
        families[f"combined {FORM_SHORT[t['form']]} k={t['k_input']}"] = combined_effects(
            t, measure)[0]
    if not families:
        return None
    fig, axes = _new_figure(1, 1, max(6.0, 0.5 * len(families)), 4.0)
    plot_violins(axes[0, 0], families, measure)
    return helper.save_figure(fig, path)


def _split_families(result, measure):
    fams = cluster_effects(result, measure)
    units = {k: v for k, v in fams.items() if v[1].get("field") in ("in_units", "hid_units")}
    syn = {k: v for k, v in fams.items() if k not in units}
    return units, syn


def figure_ranked(result, measure, path):
    return _units_and_synapses(result, measure, path, (5.0, 3.8), lambda ax, fams, title:
                               plot_ranked(ax, {k: v[0] for k, v in fams.items()}, measure,
                                           f"{title} ranked by importance"))


def figure_additivity(result, measure, path):
    tables = list(result.get("combined", {}).values())
    if not tables:
        return None
    fig, axes = _new_figure(1, 1, 4.8, 4.4)
    ax = axes[0, 0]
    for t, color in zip(tables, helper_colors(len(tables))):
        comb, summed, _ = combined_effects(t, measure)
        plot_scatter_fit(ax, summed.ravel(), comb.ravel(), f"{t['form']} k={t['k_input']}", color)
    ax.set_xlabel("sum of single-lesion effects (input + hidden)")
    ax.set_ylabel("combined-lesion effect")
    ax.set_title(f"Additivity of input x hidden lesions ({measure} acc.; one point per pair x rule;"
                 f" dashed: identity)", fontsize=8)
    ax.legend(fontsize=7)
    return helper.save_figure(fig, path)


def figure_zero_vs_freeze(result, measure, path):
    tables = list(result.get("modulation", {}).values())
    if not tables:
        return None
    fig, axes = _new_figure(1, 1, 4.8, 4.4)
    ax = axes[0, 0]
    for t, color in zip(tables, helper_colors(len(tables))):
        ez, ef = stats_of(t, "zero_W", measure)[0], stats_of(t, "freeze_M", measure)[0]
        plot_scatter_fit(ax, ez.ravel(), ef.ravel(), family_name(t), color)
    ax.set_xlabel("zero_W effect (W = 0 on the cluster)")
    ax.set_ylabel("freeze_M effect (M = 0 on the cluster)")
    ax.set_title(f"Synapse clusters: weight vs plasticity lesions ({measure} acc.; point = "
                 f"cluster x rule)", fontsize=8)
    ax.legend(fontsize=6)
    return helper.save_figure(fig, path)


def _units_and_synapses(result, measure, path, size, draw):
    """One panel for unit clusters and one for synapse clusters; draw(ax, families, title)."""
    units, syn = _split_families(result, measure)
    if not units and not syn:
        return None
    fig, axes = _new_figure(1, 2, *size)
    for ax, fams, title in ((axes[0, 0], units, "Unit clusters"),
                            (axes[0, 1], syn, "Synapse clusters")):
        if fams:
            draw(ax, fams, title)
        else:
            _empty(ax, f"{title}: not run")
    return helper.save_figure(fig, path)


def figure_size_vs_effect(result, measure, path):
    return _units_and_synapses(result, measure, path, (5.0, 3.8), lambda ax, fams, title:
                               plot_size_vs_effect(ax, fams, measure, f"{title}: size vs effect"))


def figure_tuning_vs_effect(result, measure, path):
    return _units_and_synapses(result, measure, path, (5.5, 4.2), lambda ax, fams, title:
                               plot_tuning_vs_effect(ax, fams,
                                                     f"{title}: pairs of clusters ({measure} acc.)"))


def figure_pruning(result, path):
    t = result.get("prune")
    if t is None:
        return None
    fig, axes = _new_figure(1, 1, 5.5, 3.8)
    acc = {m: mean_acc(result["scores"][m], t["cond"]) for m in ("trial", "angle")}
    base = {m: float(np.mean(result["baseline"][m])) for m in ("trial", "angle")}
    plot_pruning(axes[0, 0], t["sparsity"], acc, base)
    return helper.save_figure(fig, path)


ROBUST_TITLES = {"w_zero": "Random W entries zeroed", "hid_silence": "Random hidden units silenced",
                 "w_noise": "Gaussian noise on W (absolute σ)",
                 "w_noise_rel": "Gaussian noise on W (σ relative to RMS weight)"}


def figure_robustness(result, path):
    batteries = result.get("robust", {})
    if not batteries:
        return None
    fig, axes = _new_figure(1, len(batteries), 4.0, 3.6)
    for ax, (name, t) in zip(axes[0], batteries.items()):
        per_draw = {m: mean_acc(result["scores"][m], t["cond"]) for m in ("trial", "angle")}
        title = ROBUST_TITLES.get(name, name) + f"\n(mean ± s.e.m., {t['cond'].shape[1]} draws)"
        plot_robustness(ax, t["levels"], per_draw, t["xlabel"], title)
    return helper.save_figure(fig, path)


def make_figures(result, paths, measure):
    """Every figure of SPEC §6.4 that the results have data for; returns the written paths."""
    rules = result["rules"]
    out = [
        figure_heatmaps(unit_heatmap_panels(result, measure), rules, measure,
                        "Single-cluster lesions of input and hidden units",
                        paths.figure("lesion_heatmaps_units")),
        figure_heatmaps(modulation_heatmap_panels(result, measure), rules, measure,
                        "Synapse-cluster lesions: zero_W and freeze_M",
                        paths.figure("lesion_heatmaps_modulation")),
        figure_failure_kinds(result, paths.figure("lesion_failure_kinds")),
        figure_readout_share(result, measure, paths.figure("lesion_readout_share")),
        figure_combined_matrix(result, measure, paths.figure("lesion_combined_matrix")),
        figure_violins(result, measure, paths.figure("lesion_violins")),
        figure_ranked(result, measure, paths.figure("lesion_ranked_importance")),
        figure_additivity(result, measure, paths.figure("lesion_additivity")),
        figure_zero_vs_freeze(result, measure, paths.figure("lesion_zeroW_vs_freezeM")),
        figure_size_vs_effect(result, measure, paths.figure("lesion_size_vs_effect")),
        figure_tuning_vs_effect(result, measure, paths.figure("lesion_tuning_vs_effect")),
        figure_pruning(result, paths.figure("lesion_pruning")),
        figure_robustness(result, paths.figure("lesion_robustness")),
    ]
    return [p for p in out if p is not None]


def load_fresh(paths):
    """The lesion results, refused when they (or a file upstream: cluster files, variance)
    are older than what they were computed from."""
    return load_result(paths.check_fresh("lesion"))


def main(cfg):
    """Figures for every run matching cfg["run"]; returns {aname: [figure paths]}."""
    if cfg["effect_measure"] not in ("trial", "angle"):
        raise helper.StageError(f"effect_measure must be 'trial' or 'angle', not "
                                f"{cfg['effect_measure']!r}.")
    helper.set_style()
    out = {}
    for paths in helper.find_runs(cfg["run"], cfg["runs_dir"]):
        with helper.run_lock(paths.dir):
            result = load_fresh(paths)
            out[paths.name] = make_figures(result, paths, cfg["effect_measure"])
        print(f"[{paths.name}] {len(out[paths.name])} lesion figures in {paths.figures}")
    return out


if __name__ == "__main__":
    helper.run_main(main, CONFIG)
