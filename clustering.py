"""Hierarchical clustering of task-variance matrices, k chosen against a null (SPEC §5.3).

Reads:  runs/<aname>/task_variance.h5 (refused when missing or computed from another
        checkpoint / analysis config) and the run's checkpoint (to check that).
Writes: runs/<aname>/cluster_info.h5 (input, hidden) and cluster_info_mod.h5 (modulation,
        modulation_weighted), one group per <rep>/<form> (modulation_weighted: unnormalized
        only) holding: k (selected; 0 = no structure above chance), k_argmax, k_ref (= k, or
        k_argmax when k is 0), above_null, fixed_k, col_labels (at k_ref; unresponsive
        columns carry label k_ref, their own last cluster), col_labels_by_k/<k> (units: every
        k; synapses: k, k_argmax and fixed_k, plus `groups` and `group_labels_by_k` to cut
        at any k), matrix (the clustered matrix, every column), unresponsive, row_names,
        variance_hash, form, the silhouette curve (ks, silhouette) with its null
        (null_silhouettes, null_band, null_pointwise, null_mean, null_z_crit, above), gap,
        k_candidates, linkage, leaf_order; the same for the task-period rows (row_*);
        `stability` (input and hidden: per perturbed design its selected k, k_argmax,
        above_null and the ARI of its labels at the main k_ref with the main labels);
        synapses: `over_membership` (OM of SPEC §5.3 at the k_ref of each clustering).
        Root attrs: run, fixed_k, variance_hash, provenance of the clustering config.
        runs/<aname>/figures/k_selection.png, k_stability.png, clusters_*.png,
        over_membership_*.png.

A variance matrix is (n_periods, n_columns): rows are task-periods, columns are units
(neurons) or synapses (post-major). Clustering "columns" means the points are the columns
(features: the rows), clustering "rows" means the points are the task-periods.
The numerical core (silhouette curves, null band, choice of k, pre-grouping of synapses,
over-membership) is `cluster_core`; its docstring states the k rule.

Columns whose summed task variance is < 1e-3 (units; synapses: < 1e-3 x the largest column
sum) are unresponsive (Yang et al. 2019): excluded from clustering in both forms.
Forms: `normalized` (each column / its max over rows), `unnormalized` (log1p).
Stability (SPEC §5.3): the variance file's perturbed designs (input noise seeds, duration
quantiles) are transformed the same way (the main design's responsive columns), k is chosen
again with the same rule and null, and the labels at the main k_ref are compared (ARI).

Example:
    python clustering.py --run=everything_dmpn_seed749_L21e4_h300_b128
"""
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

import cluster_core as cc
import helper
import net_helpers
import variance_core as vc

CONFIG = dict(
    run="everything_dmpn_seed*",  # run name or glob (quote globs in the shell) {@run_pattern}
    runs_dir=None,  # runs root; None = $MPN_RUNS_DIR, else runs/ {None | @path}
    n_null=20,  # column-permuted null matrices behind each null band {>= 20}
    null_level=0.95,  # null band quantile, simultaneous over k (cluster_core docstring) {> 0, < 1}
    k_max=300,  # largest k considered (rows: at most n_rows - 1) {>= 2}
    tol=0.95,  # k candidates: silhouette >= best - (1 - tol) x |best| among ks above the null {> 0, <= 1}
    n_groups=300,  # synapses: MiniBatchKMeans pre-groups G per restart {>= 2}
    n_restarts=20,  # synapses: pre-grouping restarts (the most consistent one is kept) {>= 1}
    fixed_k=20,  # k later stages may cut at (clipped to the ks computed, e.g. 15 for N=16) {>= 2}
    cluster_seed=0,  # seeds the nulls and k-means restarts (one stream per representation, form) {>= 0}
    stability=True,  # re-choose k on the perturbed designs of the variance file (input, hidden) {@bool}
    processes=0,  # processes sharing the synapse restarts and nulls (forked_jobs.run_jobs; 0: one per core; not Linux: 1); same results in any number {>= 0}
    figures=True,  # draw the figures (the HDF5 files are written either way) {@bool}
)

CLUSTER_KEYS = ("n_null", "null_level", "k_max", "tol", "n_groups", "n_restarts", "fixed_k",
                "cluster_seed", "stability")  # the keys the clusterings depend on
UNRESPONSIVE = 1e-3  # Yang's threshold on a column's summed task variance
K_MIN = cc.K_MIN


# ---------------------------------------------------------------------------------------
# One matrix: unresponsive columns, forms, columns and rows clustered
# ---------------------------------------------------------------------------------------

def unresponsive_columns(V, synapses=False):
    """Columns whose summed task variance is < 1e-3 (synapses: < 1e-3 x the largest sum)."""
    sums = np.asarray(V, dtype=np.float64).sum(axis=0)
    return sums < (UNRESPONSIVE * sums.max() if synapses else UNRESPONSIVE)


def transform(V, form):
    """The matrix clustered in `form`: 'normalized' (column / column max) or 'unnormalized'
    (log1p of the raw task variance)."""
    if form == "normalized":
        return vc.normalize_columns(V)
    if form == "unnormalized":
        return vc.log_transform(V)
    raise ValueError(f"unknown form {form!r}; use 'normalized' or 'unnormalized'")


def cluster_representation(V, form, rng, *, row_names=None, synapses=False, n_null=20,
                           k_max=300, tol=0.95, level=0.95, n_groups=300, n_restarts=20,
                           name="matrix", processes=1):
    """Cluster the columns and rows of one raw task-variance matrix (n_periods, n_columns).

    Unresponsive columns are excluded in both forms and labelled k_ref (their own, last
    cluster); synapses=True pre-groups the columns (cc.cluster_synapses). Rows are clustered
    on the responsive columns. Returns dict: form, row_names, matrix (transformed, all
    columns), responsive (n_columns,) bool, columns and rows (cc.choose_k dicts). `columns`
    covers every column: labels (n_columns,) at k_ref, leaf_order (unresponsive last);
    its labels_by_k is over the responsive columns (or groups): cc.labels_at(columns, k).
    `processes` share the synapse restarts and nulls (cc.cluster_synapses).
    """
    V = np.asarray(V, dtype=np.float64)
    responsive = ~unresponsive_columns(V, synapses)
    if not responsive.any():
        raise helper.StageError(f"every column of {name} is unresponsive (summed task variance "
                                f"< {UNRESPONSIVE:g}): nothing to cluster; is the network "
                                f"trained and the variance file from it?")
    used = transform(V, form)
    opts = dict(n_null=n_null, k_max=k_max, tol=tol, level=level)
    points = used[:, responsive].T
    if synapses:
        cols = cc.cluster_synapses(points, rng, n_groups=n_groups, n_restarts=n_restarts,
                                   processes=processes, **opts)
    else:
        cols = cc.choose_k(points, rng, **opts)
    rows = cc.choose_k(used[:, responsive], rng, null_axis=0, **opts)
    resp_idx = np.flatnonzero(responsive)
    order = cols.pop("leaf_order_points", cols["leaf_order"])
    labels = np.full(len(responsive), cols["k_ref"], dtype=np.int32)
    labels[responsive] = cols["labels"]
    cols.update(responsive=responsive, labels=labels,
                leaf_order=np.concatenate([resp_idx[order], np.flatnonzero(~responsive)]))
    return dict(form=form, row_names=None if row_names is None else list(row_names),
                matrix=used, responsive=responsive, columns=cols, rows=rows)


def stability(res, perturbed, rng, *, n_null=20, k_max=300, tol=0.95, level=0.95):
    """k chosen again on each perturbed raw matrix {design: V} (same form, the main design's
    responsive columns) and the ARI of its labels at the main k_ref with the main labels.
    Returns dict(design (names), k, k_argmax, above_null, ari) with one entry per design."""
    cols = res["columns"]
    responsive, k_ref = cols["responsive"], cols["k_ref"]
    main = cols["labels"][responsive]
    out = dict(design=[], k=[], k_argmax=[], above_null=[], ari=[])
    for design, V in perturbed.items():
        points = transform(V, res["form"])[:, responsive].T
        again = cc.choose_k(points, rng, n_null=n_null, k_max=k_max, tol=tol, level=level)
        j = int(np.searchsorted(again["ks"], k_ref))
        labels = again["labels_by_k"][min(j, len(again["ks"]) - 1)]
        for key, value in (("design", design), ("k", again["k_selected"]),
                           ("k_argmax", again["k_argmax"]), ("above_null", again["above_null"]),
                           ("ari", adjusted_rand_score(main, labels))):
            out[key].append(value)
    return {key: np.asarray(value) for key, value in out.items()}


# ---------------------------------------------------------------------------------------
# The saved entry of one (representation, form)
# ---------------------------------------------------------------------------------------

AXIS_KEYS = ("ks", "silhouette", "null_silhouettes", "null_band", "null_pointwise", "null_mean",
             "null_z_crit", "above", "above_null", "gap", "k_candidates", "linkage",
             "leaf_order")


def clip_k(k, ks):
    """k clipped to the range of ks computed."""
    return int(np.clip(k, ks[0], ks[-1]))


def entry_arrays(res, fixed_k, variance_hash, synapses):
    """The HDF5 group of one clustering (module docstring), from cluster_representation."""
    cols, rows = res["columns"], res["rows"]
    fixed = clip_k(fixed_k, cols["ks"])
    keep = sorted({k for k in (cols["k_selected"], cols["k_argmax"], fixed) if k}) \
        if "groups" in cols else cols["ks"]
    out = dict(
        form=res["form"], row_names=np.array(res["row_names"]), variance_hash=variance_hash,
        matrix=res["matrix"].astype(np.float32) if synapses else res["matrix"],
        unresponsive=~res["responsive"], k=int(cols["k_selected"]),
        k_argmax=int(cols["k_argmax"]), k_ref=int(cols["k_ref"]), fixed_k=fixed,
        col_labels=cols["labels"],
        col_labels_by_k={str(int(k)): cc.labels_at(cols, k) for k in keep},
        row_k=int(rows["k_selected"]), row_k_argmax=int(rows["k_argmax"]),
        row_k_ref=int(rows["k_ref"]), row_labels=rows["labels"],
        row_labels_by_k={str(int(k)): lab for k, lab in zip(rows["ks"], rows["labels_by_k"])},
        **{key: cols[key] for key in AXIS_KEYS}, **{f"row_{key}": rows[key] for key in AXIS_KEYS})
    if "groups" in cols:
        out.update(groups=cols["groups"], group_labels_by_k=cols["labels_by_k"],
                   restart=cols["restart"], ari_restarts=cols["ari_restarts"])
    return out


def over_membership_entry(R_mod, ci):
    """OM of the synapse clusters in the (input cluster x hidden cluster) blocks, each
    clustering at its k_ref and in the synapse clustering's form (unresponsive labels count
    as a cluster)."""
    form = str(R_mod["form"])
    R_in, R_hid = ci["input"][form], ci["hidden"][form]
    return dict(om=cc.over_membership(R_mod["col_labels"], R_in["col_labels"],
                                      R_hid["col_labels"]),
                k_mod=R_mod["k_ref"], k_input=R_in["k_ref"], k_hidden=R_hid["k_ref"])


# ---------------------------------------------------------------------------------------
# Stage: cluster every representation of one run, write the two cluster files
# ---------------------------------------------------------------------------------------

def load_variance(paths):
    """(arrays, attrs) of the run's variance file, refused when it was computed from another
    checkpoint or analysis config than the run's current checkpoint."""
    producer = paths.producer(paths.variance)
    arrays, attrs = helper.load_h5(paths.variance, producer)
    if "analysis" not in attrs or "row_names" not in arrays:
        raise helper.StageError(f"{str(paths.variance)!r} was not written by the analysis "
                                f"stage; rerun `{producer}`.")
    ckpt = net_helpers.load_checkpoint(paths.checkpoint)
    expect = helper.config_hash(vc.variance_provenance(ckpt["config"], ckpt["step"],
                                                       attrs["analysis"]))
    helper.check_fresh(paths.variance, {"_provenance": attrs}, producer, expect)
    return arrays, attrs


def cluster_one(arrays, rep, form, variance_hash, cfg):
    """The saved entry of one (representation, form), with its stability for units."""
    synapses = rep in vc.SYNAPSE_REPS
    reps = list(vc.REP_TITLES)
    rng = np.random.default_rng([cfg["cluster_seed"], reps.index(rep), vc.FORMS.index(form)])
    opts = dict(n_null=cfg["n_null"], k_max=cfg["k_max"], tol=cfg["tol"],
                level=cfg["null_level"])
    res = cluster_representation(arrays[rep]["unnormalized"], form, rng, synapses=synapses,
                                 row_names=arrays["row_names"], n_groups=cfg["n_groups"],
                                 n_restarts=cfg["n_restarts"], name=f"{rep} ({form})",
                                 processes=cfg["processes"], **opts)
    R = entry_arrays(res, cfg["fixed_k"], variance_hash, synapses)
    perturbed = {d: reps_[rep] for d, reps_ in arrays.get("perturbed", {}).items()
                 if rep in reps_}
    if cfg["stability"] and perturbed and not synapses:
        R["stability"] = stability(res, perturbed, rng, **opts)
    return R


def describe(R):
    """One line: selected k (or no structure), argmax, stability."""
    k = f"k = {R['k']:3d}" if R["k"] else "no structure above chance"
    text = f"{k} (argmax {R['k_argmax']}), {int(R['unresponsive'].sum())} unresponsive of " \
           f"{len(R['col_labels'])}; task-period k = {R['row_k']}"
    if "stability" in R:
        st = R["stability"]
        text += f"; perturbed designs: k {st['k'].tolist()}, ARI at k={R['k_ref']} " \
                f"{np.median(st['ari']):.2f} (min {st['ari'].min():.2f})"
    return text


def cluster_run(paths, cfg):
    """Both cluster files (and figures) of one run; returns (cluster_info, cluster_info_mod)
    as saved."""
    t0 = time.time()
    arrays, attrs = load_variance(paths)
    variance_hash = attrs["config_hash"]
    ci, ci_mod = {}, {}
    todo = [(rep, form) for rep in vc.REP_TITLES if rep in arrays
            for form in vc.REP_FORMS[rep]]
    for rep, form in helper.progress(todo, desc=f"{paths.name} clustering"):
        R = cluster_one(arrays, rep, form, variance_hash, cfg)
        (ci_mod if rep in vc.SYNAPSE_REPS else ci).setdefault(rep, {})[form] = R
        print(f"[{paths.name}] {rep:19s} {form:12s} {describe(R)}")
    if "input" in ci and "hidden" in ci:
        for forms in ci_mod.values():
            for R in forms.values():
                R["over_membership"] = over_membership_entry(R, ci)
    root = dict(run=paths.name, fixed_k=cfg["fixed_k"], variance_hash=variance_hash)
    provenance = dict({k: cfg[k] for k in CLUSTER_KEYS}, variance_hash=variance_hash)
    helper.save_h5(paths.cluster_info, ci, root, cfg=provenance, inputs=[paths.variance])
    helper.save_h5(paths.cluster_info_mod, ci_mod, root, cfg=provenance,
                   inputs=[paths.variance])
    print(f"[{paths.name}] clustered in {time.time() - t0:.0f} s -> "
          f"{paths.cluster_info}, {paths.cluster_info_mod}")
    if cfg["figures"]:
        for path in make_figures(paths):
            print(f"figure: {path}")
    return ci, ci_mod


def load_clusters(paths):
    """(cluster_info, cluster_info_mod) as saved, for the figures."""
    return tuple(helper.load_h5(path)[0] for path in (paths.cluster_info, paths.cluster_info_mod))


# ---------------------------------------------------------------------------------------
# Figures (read the cluster files only)
# ---------------------------------------------------------------------------------------

def plot_k_curve(ax, R, prefix="", k_fixed=None, title=""):
    """Real silhouette vs k over the null: its mean, the simultaneous band (shaded) and the
    per-k 95th percentile (dotted); ks above the band dotted in black; selected (solid),
    argmax (dashed) and fixed (grey dotted) k."""
    get = lambda key: np.asarray(R[prefix + key])  # noqa: E731
    ks, sil = get("ks"), get("silhouette")
    ax.fill_between(ks, get("null_mean"), get("null_band"), color="0.8", lw=0,
                    label="null: mean to simultaneous band")
    ax.plot(ks, get("null_pointwise"), ":", color="0.45", lw=0.9, label="null per-k 95th pct.")
    ax.plot(ks, sil, "-", color="C0", lw=1.2, label="real")
    above = get("above").astype(bool)
    ax.plot(ks[above], sil[above], ".", color="k", ms=3, label="above band")
    k_sel, k_arg = int(R[prefix + "k"]), int(R[prefix + "k_argmax"])
    if k_sel:
        ax.axvline(k_sel, color="k", lw=1.2)
    ax.axvline(k_arg, color="k", ls="--", lw=0.9)
    marks = f"selected k = {k_sel} (solid)" if k_sel else "no structure above chance"
    marks += f", argmax {k_arg} (dashed)"
    if k_fixed is not None:
        ax.axvline(k_fixed, color="grey", ls=":", lw=0.9)
        marks += f", fixed {k_fixed}"
    ax.set_xlabel("k (number of clusters)")
    ax.set_ylabel("silhouette")
    ax.set_title(f"{title}\n{marks}", fontsize=7.5)


def figure_k_selection(entries, path):
    """One row per (representation, form): columns (units/synapses) and task-period rows."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(entries), 2, figsize=(10, 2.5 * len(entries)), squeeze=False,
                             constrained_layout=True)
    for (name, R), row in zip(entries, axes):
        plot_k_curve(row[0], R, "", int(R["fixed_k"]), f"{name}: columns")
        plot_k_curve(row[1], R, "row_", None, f"{name}: task-periods")
    axes[0, 0].legend(fontsize=6, loc="upper right")
    fig.suptitle(f"k selection: silhouette of the real matrix vs {len(entries[0][1]['null_silhouettes'])} "
                 f"column-permuted nulls")
    return helper.save_figure(fig, path)


def plot_stability(ax_k, ax_ari, name, R):
    """Selected k per perturbed design (0 = none above chance) and ARI with the main labels."""
    st = R["stability"]
    designs = [str(d).replace("noise_seed", "noise ").replace("quantile_", "q ")
               for d in st["design"]]
    x = np.arange(len(designs))
    ax_k.plot(x, st["k"], "o", color="C0", ms=4, label="selected k")
    ax_k.plot(x, st["k_argmax"], "x", color="C1", ms=4, label="argmax k")
    ax_k.axhline(R["k"], color="k", lw=1, label=f"main selected k = {R['k']}" if R["k"]
                 else "main: no structure above chance (0)")
    ax_k.set_ylabel("k (0 = none above chance)")
    ax_k.set_title(f"{name}: k on perturbed designs", fontsize=8)
    ax_ari.bar(x, st["ari"], color="C2")
    ax_ari.set_ylim(0, 1.05)
    ax_ari.set_ylabel(f"ARI with main labels at k = {R['k_ref']}")
    ax_ari.set_title(f"{name}: median ARI {np.median(st['ari']):.2f}", fontsize=8)
    for ax in (ax_k, ax_ari):
        ax.set_xticks(x)
        ax.set_xticklabels(designs, rotation=45, ha="right", fontsize=6)


def figure_stability(entries, path):
    """Stability panel: per unit clustering, k and ARI on every perturbed design."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(entries), 2, figsize=(9, 2.4 * len(entries)), squeeze=False,
                             constrained_layout=True)
    for (name, R), row in zip(entries, axes):
        plot_stability(row[0], row[1], name, R)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle("stability of the clustering on perturbed designs (input noise seeds, "
                 "duration quantiles)")
    return helper.save_figure(fig, path)


def block_edges(labels):
    """Start positions of the runs of equal labels, plus the end."""
    change = np.flatnonzero(np.diff(labels) != 0) + 1
    return np.concatenate([[0], change, [len(labels)]])


def plot_dendrogram(ax, R):
    """Task-period dendrogram, leaves bottom to top, coloured at the selected row k."""
    from scipy.cluster.hierarchy import dendrogram
    Z, k = R["row_linkage"], int(R["row_k_ref"])
    n = len(Z) + 1
    cut = 0.5 * (Z[-k, 2] + Z[-k + 1, 2]) if 1 < k < n else 0.0
    dendrogram(Z, orientation="left", ax=ax, no_labels=True, color_threshold=cut,
               above_threshold_color="grey")
    ax.set_ylim(0, 10 * n)
    ax.axis("off")


def plot_clustered_matrix(ax, R, label):
    """The clustered matrix in leaf order (rows bottom to top) with cluster boundaries."""
    rows, cols = np.asarray(R["row_leaf_order"]), np.asarray(R["leaf_order"])
    M = np.asarray(R["matrix"])[np.ix_(rows, cols)]
    interp = "antialiased" if M.shape[1] > 2000 else "nearest"
    im = ax.imshow(M, aspect="auto", origin="lower", interpolation=interp, cmap="magma",
                   extent=(0, M.shape[1], 0, M.shape[0]))
    col_lab, row_lab = np.asarray(R["col_labels"])[cols], np.asarray(R["row_labels"])[rows]
    col_edges, row_edges = block_edges(col_lab), block_edges(row_lab)
    for x in col_edges[1:-1]:
        ax.axvline(x, color="c", lw=0.6)
    for y in row_edges[1:-1]:
        ax.axhline(y, color="c", lw=0.6)
    centers = 0.5 * (col_edges[:-1] + col_edges[1:])
    names = ["unresp." if c == R["k_ref"] and R["unresponsive"].any() else str(c)
             for c in col_lab[col_edges[:-1]]]
    step = int(np.ceil(len(centers) / 40))
    top = ax.secondary_xaxis("top")
    top.set_xticks(centers[::step])
    top.set_xticklabels(names[::step], fontsize=5, rotation=90)
    top.set_xlabel(f"column cluster (k = {R['k_ref']})", fontsize=7)
    ax.set_yticks(np.arange(len(rows)) + 0.5)
    ax.set_yticklabels([R["row_names"][r] for r in rows], fontsize=5.5)
    ax.yaxis.tick_right()
    ax.set_xlabel(f"{M.shape[1]:,} {label} in dendrogram order")
    return im


def k_text(R, prefix=""):
    """'k = 7', or 'argmax k = 7, no structure above chance'."""
    if int(R[prefix + "k"]):
        return f"k = {int(R[prefix + 'k'])}"
    return f"argmax k = {int(R[prefix + 'k_argmax'])}, no structure above chance"


def figure_clusters(R, title, label, path):
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(11, 7.5))
    # columns: dendrogram, matrix, room for the row names, colour bar
    grid = fig.add_gridspec(1, 4, width_ratios=[1.2, 9, 1.5, 0.25], wspace=0.02)
    plot_dendrogram(fig.add_subplot(grid[0]), R)
    ax = fig.add_subplot(grid[1])
    im = plot_clustered_matrix(ax, R, label)
    cax = fig.add_subplot(grid[3])
    fig.colorbar(im, cax=cax, label="task variance / column max" if str(R["form"]) == "normalized"
                 else "log1p(task variance)")
    fig.suptitle(f"{title}: task-periods ({k_text(R, 'row_')}) x {label} ({k_text(R)})", y=0.97)
    return helper.save_figure(fig, path)


def plot_om(ax, om, title, vlim=3.0):
    """log2 over-membership (input cluster x hidden cluster); 0 = chance."""
    with np.errstate(divide="ignore"):
        im = ax.imshow(np.clip(np.log2(om), -vlim, vlim), cmap="RdBu_r", vmin=-vlim, vmax=vlim,
                       aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=7)
    return im


def figure_over_membership(entry, title, path, max_panels=24):
    """Max over synapse clusters c of OM[c, i, j], and OM[c] of each c (up to max_panels)."""
    import matplotlib.pyplot as plt
    om = entry["om"]
    n_c = min(len(om), max_panels)
    ncols = int(np.ceil(np.sqrt(n_c)))
    fig = plt.figure(figsize=(12, 5.8), constrained_layout=True)
    outer = fig.add_gridspec(1, 2, width_ratios=[1, 1.4])
    ax = fig.add_subplot(outer[0])
    im = plot_om(ax, om.max(axis=0), "max over synapse clusters c")
    ax.set_xlabel(f"hidden (post) cluster j (k = {entry['k_hidden']})")
    ax.set_ylabel(f"input (pre) cluster i (k = {entry['k_input']})")
    inner = outer[1].subgridspec(int(np.ceil(n_c / ncols)), ncols)
    for c in range(n_c):
        sub = fig.add_subplot(inner[c // ncols, c % ncols])
        plot_om(sub, om[c], f"c = {c}")
        sub.set_xticks([])
        sub.set_yticks([])
    fig.colorbar(im, ax=ax, shrink=0.8,
                 label="log2 over-membership (0 = chance; -3 includes empty)")
    fig.suptitle(f"{title}: synapse clusters (k = {entry['k_mod']}) in input x hidden "
                 f"cluster blocks" + (f" (first {n_c} of {len(om)} shown)" if n_c < len(om)
                                      else ""))
    return helper.save_figure(fig, path)


def make_figures(paths):
    """Every figure of the clustering stage, from the two cluster files."""
    helper.set_style()
    ci, ci_mod = load_clusters(paths)
    entries = [(f"{rep} {form}", rep, form, info[rep][form]) for info in (ci, ci_mod)
               for rep in vc.REP_TITLES if rep in info for form in vc.REP_FORMS[rep]
               if form in info[rep]]
    figures = [figure_k_selection([(name, R) for name, _, _, R in entries],
                                  paths.figure("k_selection"))]
    stable = [(name, R) for name, _, _, R in entries if "stability" in R]
    if stable:
        figures.append(figure_stability(stable, paths.figure("k_stability")))
    for name, rep, form, R in entries:
        label = "synapses" if rep in vc.SYNAPSE_REPS else "units"
        figures.append(figure_clusters(R, f"{vc.REP_TITLES[rep]} ({form})", label,
                                       paths.figure(f"clusters_{rep}_{form}")))
        if "over_membership" in R:
            figures.append(figure_over_membership(
                R["over_membership"], f"{vc.REP_TITLES[rep]} ({form})",
                paths.figure(f"over_membership_{rep}_{form}")))
    return figures


# ---------------------------------------------------------------------------------------


def main(cfg):
    """Cluster every run matching cfg["run"]; returns {aname: (cluster_info, cluster_info_mod)}."""
    if cfg["n_null"] < 20 or not 0 < cfg["null_level"] < 1:
        raise helper.StageError(f"n_null must be >= 20 (SPEC §5.3) and null_level in (0, 1); got "
                                f"{cfg['n_null']} and {cfg['null_level']}.")
    out = {}
    for paths in helper.find_runs(cfg["run"], cfg["runs_dir"]):
        with helper.run_lock(paths.dir):
            out[paths.name] = cluster_run(paths, cfg)
    return out


if __name__ == "__main__":
    helper.run_main(main, CONFIG)
