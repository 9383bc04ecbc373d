"""Batched evaluation of lesion conditions (SPEC §6.3), shared by lesion.py, lesion_plot.py
and benchmarks/bench_lesion.py: a condition is data (index sets of lesioned input units,
hidden units, zeroed W synapses and frozen M synapses, and a seeded weight noise), stored
compactly and deduplicated in a ConditionTable; evaluate_conditions scores every condition on
a fixed test set, per rule, under both accuracy measures and by failure kind, sharing work
between conditions.

How work is shared. In a dmpn without recurrence each hidden unit runs independently of the
others given x, so one base run per input-lesion set serves every condition with that set,
silenced units cost nothing, and only the rows a condition's W / M perturbation touches run
again, stacked over many conditions into one virtual layer (evaluate_by_rows). Other networks
stack K conditions x n trial copies per forward pass (evaluate_stacked). Both are tested
equal to evaluating each condition on its own.

Axis order: trials x time x units, (B, T, N); W is (N_post, N_pre) and synapse indices are
flattened post-major (i_post * N_pre + j_pre).
"""
import functools

import numpy as np
import torch

import forked_jobs
import helper
import mpn
import mpn_tasks
import net_helpers
from variance_core import FORM_SHORT, REP_SHORT

FIELDS = ("in_units", "hid_units", "w_zero", "m_freeze")  # index-set fields of a condition


def family_name(t, kind="lesion"):
    """Short label of one clustering (and lesion kind), e.g. 'hidden norm k=20 zero_W'."""
    name = f"{REP_SHORT.get(t['rep'], t['rep'])} {FORM_SHORT.get(t['form'], t['form'])} k={t['k']}"
    return f"{name} {'' if kind == 'lesion' else kind}".strip()


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


SCORES = ("angle", "trial", "broke_fixation", "wrong_go", "nogo_response")  # per condition and rule


def new_scores(C, R, shared=False):
    """{score: (C, R) NaN array} for every name in SCORES; shared: in memory that forked
    worker processes write into (forked_jobs.shared_array)."""
    make = forked_jobs.shared_array if shared else np.empty
    out = {name: make((C, R), np.float32) for name in SCORES}
    for a in out.values():
        a.fill(np.nan)
    return out


def score_conditions(outputs, scorer):
    """Per condition, outputs (K, n, T, n_out) of K conditions on the n trials of one
    mpn_tasks.Scorer: {score: (K,)} with the angle and trial accuracy, pooled over the
    condition's trials exactly as mpn_tasks.accuracy_by_rule pools a rule's trials, and the
    fraction of trials failing by each failure kind (the three sum to 1 - trial accuracy)."""
    scores = scorer(outputs)
    n_scored = float(scorer.n_scored.sum())
    kind = scores["kind"]
    out = {"angle": scores["n_correct"].sum(axis=1) / max(n_scored, 1),
           "trial": (kind == 0).mean(axis=1)}
    for code, name in enumerate(mpn_tasks.FAILURE_KINDS, start=1):
        out[name] = (kind == code).mean(1)
    return out


def _store(scores, ids, r, values):
    for name, v in values.items():
        scores[name][ids, r] = v


def kernel_takes_per_trial_w(net):
    """Whether the fastest engine runs a per-trial W at full speed. The compiled CPU kernel
    (mpn_cpp) takes only a W shared by the batch and otherwise falls back to the slower
    "fast" engine; stacking conditions that change W would then cost more than it saves."""
    p = next(net.parameters())
    if p.is_cuda or not net.plastic:
        return True
    try:
        import mpn_cpp
    except ImportError:
        return True
    n_hidden, n_pre = net_shapes(net)
    x, W = p.new_zeros(2, 1, n_pre), p.new_zeros(2, n_hidden, n_pre)
    return (mpn_cpp.kernel() is None
            or mpn_cpp.unsupported(x, W, *net.plastic_coefficients()) is None)


def evaluate_conditions(net, tests, conditions, memory_mb, desc="conditions", processes=1):
    """{score: (n_conditions, n_rules)} for every name in SCORES (both accuracy measures and
    the failure kinds), every condition equal to its own forward pass. tests: one batch per
    rule (rules may differ in trial count). A dmpn whose hidden units run independently of
    each other (rows_independent) shares work between conditions (evaluate_by_rows); other
    networks stack conditions K at a time (evaluate_stacked). Either way the work is a list
    of independent jobs, shared among `processes` processes (forked_jobs.run_jobs; 0: one per
    core); the scores are the same numbers in any number of processes."""
    processes = worker_processes(net, processes)
    acc = new_scores(len(conditions), len(tests), shared=processes > 1)
    if memory_mb is None:
        memory_mb = 2048 if net.W_out.is_cuda else 32
    make_jobs = evaluate_by_rows if net.rows_independent() else evaluate_stacked
    jobs = make_jobs(net, tests, conditions, memory_mb, acc)
    with helper.progress(total=len(conditions), desc=desc, unit="cond") as bar:
        forked_jobs.run_jobs(jobs, processes, bar)
    return {name: np.array(a) for name, a in acc.items()}  # out of the shared pages


def evaluate_stacked(net, tests, conditions, memory_mb, acc):
    """Jobs [(n_conditions, run)] writing into acc: conditions with the same perturbation
    fields are stacked K at a time (Perturbation.stack) against the test batch of each rule
    repeated K times, so one forward pass runs K x n_test trials. Conditions that change W
    run one at a time over all rules at once (W then stays shared by the batch) when the
    engine's kernel cannot take a per-trial W (kernel_takes_per_trial_w)."""
    n_hidden, n_pre = net_shapes(net)
    C = len(conditions)
    alone = not kernel_takes_per_trial_w(net)
    order = sorted(range(C), key=lambda i: _signature(conditions[i]))
    T_max = max(b.inputs.shape[1] for b in tests)
    n_test = max(b.inputs.shape[0] for b in tests)
    jobs, start = [], 0
    while start < C:
        cond = conditions[order[start]]
        if alone and ("w_zero" in cond or "w_noise" in cond):
            ids = [order[start]]
            jobs.append((1, functools.partial(_run_over_rules, net, tests, cond, acc, ids[0])))
        else:
            K = max(1, trials_per_pass(cond, n_pre, n_hidden, T_max, memory_mb) // n_test)
            ids = [i for i in order[start:start + K]
                   if _signature(conditions[i]) == _signature(cond)]
            jobs.append((len(ids), functools.partial(
                _run_stacked, net, tests, [conditions[i] for i in ids], acc, ids)))
        start += len(ids)
    return jobs


def _run_stacked(net, tests, conds, acc, ids):
    """K conditions x n copies of each rule's n test trials, one forward pass per rule."""
    n_hidden, n_pre = net_shapes(net)
    perts = [condition_perturbation(c, n_pre, n_hidden) for c in conds]
    for r, batch in enumerate(tests):
        n = batch.inputs.shape[0]
        tiled = batch.take(np.tile(np.arange(n), len(conds)))
        res = net_helpers.evaluate(net, tiled,
                                   perturbation=net_helpers.Perturbation.stack(perts, n))
        y = np.asarray(res["outputs"]).reshape(len(conds), n, *batch.targets.shape[1:])
        _store(acc, ids, r, score_conditions(y, mpn_tasks.Scorer(batch)))


def _run_over_rules(net, tests, cond, acc, cid):
    """One condition, its perturbation shared by the whole test set (all rules, padded)."""
    n_hidden, n_pre = net_shapes(net)
    batch = mpn_tasks.concat_batches(tests)
    res = net_helpers.evaluate(net, batch, perturbation=condition_perturbation(cond, n_pre,
                                                                               n_hidden))
    y = np.asarray(res["outputs"])
    start = 0
    for r, batch_r in enumerate(tests):
        n, T = batch_r.inputs.shape[:2]
        _store(acc, [cid], r, score_conditions(y[None, start:start + n, :T],
                                               mpn_tasks.Scorer(batch_r)))
        start += n


def worker_processes(net, processes):
    """How many processes evaluate_conditions uses (forked_jobs.process_count): `processes`,
    0 meaning one per core; 1 for a CUDA network, whose context a forked child cannot use."""
    return forked_jobs.process_count(processes, cuda=net.W_out.is_cuda)


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
#
# Sharing work between trials. The state of such a layer is M alone, so trials whose inputs
# agree up to step t are in the same state up to there, under every condition (a condition
# treats all trials alike). The trials of one test part share one schedule: their inputs
# agree through the fixation period, and in the dm tasks through the first stimulus for the
# trials that share it (a third of the default test set's trial-steps repeat another
# trial's). A PrefixTree lists the distinct input prefixes of a part; every layer pass runs
# each distinct prefix once per segment, continuing from its parent prefix's final M
# (mpn_engine's m_init), and each trial-step reads its node's h (the same numbers its own
# pass gives: an engine call continued from its final M equals one call, tested).


class PrefixTree:
    """The distinct input prefixes of one batch, inputs (n, T, n_in). Steps are cut into
    segments over which the partition of the trials into identical prefixes stays the same;
    segment s holds n_s prefixes, each of its steps one node. Nodes are numbered segment by
    segment, then prefix, then step, so a segment's nodes reshape to (n_s, length).
      segments   [(t0, t1, first node, n_s, parent)]: parent (n_s,) the prefix of the
                 previous segment each one continues (None for the first segment)
      node_of    (n, T) the node of every trial-step
      node_inputs (n_nodes, n_in) the input at every node"""

    def __init__(self, inputs):
        inputs = np.asarray(inputs)
        n, T = inputs.shape[:2]
        bits = np.ascontiguousarray(inputs).view(np.uint8).reshape(n, T, -1)  # exact equality
        differ = (bits[:, None] != bits[None, :]).any(axis=-1)  # (n, n, T)
        split = np.where(differ.any(axis=-1), differ.argmax(axis=-1), T)  # first differing step
        labels, cuts = None, []
        for t in np.union1d([0], split[split < T]):  # the partition refines at these steps
            first = (split > t).argmax(axis=1)  # the first trial with the same prefix
            _, new = np.unique(first, return_inverse=True)
            cuts.append((int(t), new, None if labels is None else labels[np.unique(first)]))
            labels = new
        self.segments, self.node_of = [], np.empty((n, T), np.int64)
        inputs_by_segment, offset = [], 0
        for s, (t0, lab, parent) in enumerate(cuts):
            t1 = cuts[s + 1][0] if s + 1 < len(cuts) else T
            n_s, length = int(lab.max()) + 1, t1 - t0
            self.segments.append((t0, t1, offset, n_s, parent))
            self.node_of[:, t0:t1] = offset + lab[:, None] * length + np.arange(length)
            first = np.unique(lab, return_index=True)[1]
            inputs_by_segment.append(inputs[first, t0:t1].reshape(n_s * length, -1))
            offset += n_s * length
        self.n_nodes = offset
        self.node_inputs = np.concatenate(inputs_by_segment)


def tree_forward(net, tree, x_nodes, W, b, eta, lam, m_freeze):
    """h (G, n_nodes, R) of a layer of R rows (W, b, η, λ, m_freeze) under G presynaptic
    activities x_nodes (G, n_nodes, N_pre) on a PrefixTree's nodes: one net.forward_rows
    call per segment, each prefix continued from its parent's final M."""
    G, R = x_nodes.shape[0], W.shape[0]
    h_nodes = x_nodes.new_empty(G, tree.n_nodes, R)
    M = None
    for t0, t1, offset, n_s, parent in tree.segments:
        span = slice(offset, offset + n_s * (t1 - t0))
        x = x_nodes[:, span].reshape(G * n_s, t1 - t0, -1)
        m_init = None
        if parent is not None:
            M = M.reshape(G, -1, *M.shape[1:])
            m_init = M[:, torch.from_numpy(parent).to(M.device)].reshape(G * n_s, *M.shape[2:])
        h, M = net.forward_rows(x, W, b, eta, lam, m_freeze, m_init=m_init)
        h_nodes[:, span] = h.reshape(G, -1, R)
    return h_nodes


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
    n_hidden, n_pre = net_shapes(net)
    W_net = net.synapse_weight().detach()
    Ws, freeze, index = [], [], []
    for cond, rows_t in zip(conds, rows_of):
        pert = condition_perturbation(cond, n_pre, n_hidden).to(W_net.device, W_net.dtype)
        Ws.append(mpn.perturbed_weight(W_net, pert)[rows_t])
        freeze.append(None if pert.m_freeze is None else pert.m_freeze[rows_t])
        index.append(rows_t)
    index = torch.cat(index)
    m_freeze = None
    if any(f is not None for f in freeze):
        m_freeze = torch.cat([torch.zeros_like(W_k) if f is None else f
                              for f, W_k in zip(freeze, Ws)])
    b, eta, lam = net.plastic_coefficients()
    return torch.cat(Ws), b[index], _row_coef(eta, index), _row_coef(lam, index), m_freeze


def _hidden_keep(conds, n_hidden, device, dtype):
    """(K, N) masks: 0 on the units each condition silences."""
    keep = torch.ones(len(conds), n_hidden, device=device, dtype=dtype)
    for k, cond in enumerate(conds):
        if "hid_units" in cond:
            keep[k, torch.from_numpy(unpack_indices(cond["hid_units"])).to(device)] = 0.0
    return keep


# one trial's W and M rows in a virtual-layer pass (the kernel runs a trial at a time): within
# a core's L2 cache
PASS_BYTES = 1 << 18


def evaluate_by_rows(net, tests, conditions, memory_mb, acc):
    """Jobs [(n_conditions, run)] writing into acc, one per job of job_plan (a few input-unit
    sets and the conditions with those sets): per test part, one base pass of the job's sets
    on the part's PrefixTree nodes, then per chunk of conditions one virtual-layer pass over
    the rows they touch, the outputs and their scores. Parts run inside jobs, so a job keeps
    one part's base runs."""
    n_hidden, n_pre = net_shapes(net)
    p0 = net.W_out
    trees = [PrefixTree(b.inputs) for b in tests]
    with torch.no_grad():  # before any input lesion: the same for every set
        x_nodes = [net.presynaptic(torch.as_tensor(t.node_inputs, device=p0.device,
                                                   dtype=p0.dtype)) for t in trees]
    scorers = [mpn_tasks.Scorer(b) for b in tests]
    rows = [touched_rows(c, n_pre, n_hidden) for c in conditions]
    sizes = {"nodes": max(t.n_nodes for t in trees),
             "trials": max(b.inputs.shape[0] for b in tests),
             "steps": max(b.inputs.shape[0] * b.inputs.shape[1] for b in tests),
             "n_out": net.W_out.shape[0], "n_pre": n_pre, "n_hidden": n_hidden}

    @torch.no_grad()
    def run(sets, chunks):
        in_mask = input_masks(net, [conditions[i] for i in sets])
        plans = [(g, ids, readout_plan(net, [conditions[i] for i in ids],
                                       [rows[i] for i in ids])) for g, ids in chunks]
        for r, (tree, x_all) in enumerate(zip(trees, x_nodes)):
            x, h = base_runs(net, tree, x_all, in_mask)
            for g, ids, plan in plans:
                y = _chunk_outputs(net, tree, x[g], h[g], plan)
                _store(acc, ids, r, score_conditions(y, scorers[r]))

    return [(sum(len(ids) for _, ids in chunks), functools.partial(run, sets, chunks))
            for sets, chunks in job_plan(conditions, rows, sizes, memory_mb)]


def input_masks(net, conds):
    """(n_sets, N_pre): 0 on the presynaptic units each condition lesions."""
    n_hidden, n_pre = net_shapes(net)
    p0 = net.W_out
    mask = torch.ones(len(conds), n_pre, device=p0.device, dtype=p0.dtype)
    for g, cond in enumerate(conds):
        if "in_units" in cond:
            mask[g, torch.from_numpy(unpack_indices(cond["in_units"])).to(p0.device)] = 0.0
    return mask


def base_runs(net, tree, x_nodes, in_mask):
    """x and h (n_sets, n_nodes, N_pre | N) on a PrefixTree's nodes of the network with each
    set's input lesion alone (in_mask, from input_masks), from the unlesioned x_nodes."""
    x = x_nodes[None] * in_mask[:, None, :]
    return x, tree_forward(net, tree, x, net.synapse_weight().detach(),
                           *net.plastic_coefficients(), None)


def job_plan(conditions, rows, sizes, memory_mb):
    """Jobs [(sets, chunks)]: sets, one condition id per input-unit set (its in_units is the
    set); chunks [(set index, condition ids)], each one virtual-layer pass. A chunk holds at
    most PASS_BYTES of rows per trial (at least one condition) and outputs within a quarter
    of memory_mb; a job at most as many sets as half of memory_mb holds base runs of one part
    and chunks whose rows total half of it. A set with more conditions than one job holds
    continues in the next job (its base pass runs again: one pass against many)."""
    budget = memory_mb * 2**20
    n_pre, n_hidden = sizes["n_pre"], sizes["n_hidden"]
    per_set = 4 * sizes["nodes"] * (n_hidden + n_pre)  # one set's base x and h on one part
    max_sets = max(1, int(budget // (2 * per_set)))
    job_rows = max(1, int(budget // (2 * 8 * n_pre)))  # W and m_freeze of the kept layers
    pass_rows = max(1, min(PASS_BYTES // (8 * n_pre),
                           int(budget // (4 * 4 * (sizes["nodes"] + sizes["trials"] * n_pre)))))
    per_cond = 12 * sizes["steps"] * sizes["n_out"]  # outputs (float32 on nodes and trials)
    max_conds = max(1, int(budget // (4 * per_cond)))
    groups = {}
    for i, cond in enumerate(conditions):
        key = unpack_indices(cond["in_units"]).tobytes() if "in_units" in cond else b""
        groups.setdefault(key, []).append(i)
    sets, chunks, used = [], [], 0
    for ids in groups.values():
        for chunk in _chunks(ids, rows, pass_rows, max_conds):
            n_rows = sum(rows[i].size for i in chunk)
            new_set = not sets or sets[-1] != ids[0]
            if chunks and ((new_set and len(sets) == max_sets) or used + n_rows > job_rows):
                yield sets, chunks
                sets, chunks, used, new_set = [], [], 0, True
            if new_set:
                sets.append(ids[0])
            chunks.append((len(sets) - 1, chunk))
            used += n_rows
    if chunks:
        yield sets, chunks


def _chunks(ids, rows, pass_rows, max_conds):
    """Consecutive runs of condition ids with at most pass_rows touched rows (rows[i])
    together (one condition alone may have more) and at most max_conds conditions."""
    part, used = [], 0
    for i in ids:
        if part and (used + rows[i].size > pass_rows or len(part) == max_conds):
            yield part
            part, used = [], 0
        part.append(i)
        used += rows[i].size
    if part:
        yield part


def readout_plan(net, conds, rows_np):
    """What a chunk of K conditions sharing one input set needs on every part: the virtual
    layer of the rows they touch (rows_np, from touched_rows; None when none), those rows,
    and W_out with each condition's silenced and touched units' columns zeroed, stacked
    (N, K n_out)."""
    n_hidden = net.W_out.shape[1]
    device, dtype = net.W_out.device, net.W_out.dtype
    rows_of = [torch.from_numpy(r).to(device) for r in rows_np]
    layer = virtual_layer(net, conds, rows_of) if sum(r.numel() for r in rows_of) else None
    keep = _hidden_keep(conds, n_hidden, device, dtype)
    for k, rows in enumerate(rows_of):
        keep[k, rows] = 0.0
    W_out_T = net.W_out.detach().T
    K, n_out = len(conds), W_out_T.shape[1]
    W_keep = (keep[:, :, None] * W_out_T).permute(1, 0, 2).reshape(n_hidden, K * n_out)
    starts = np.cumsum([0] + [r.numel() for r in rows_of])
    return {"layer": layer, "rows": rows_of, "starts": starts, "W_keep": W_keep,
            "W_out_T": W_out_T, "K": K}


def _chunk_outputs(net, tree, x, h_base, plan):
    """Outputs (K, n, T, n_out) on one part of a chunk's K conditions (readout_plan), from
    the base x and h of their input set on the part's PrefixTree nodes and one virtual-layer
    pass: y = h_base @ W_keep + h_touched @ W_out[:, touched]ᵀ on the nodes, then read out
    at every trial-step's node; never a (K, n, T, N) activity tensor."""
    K, W_out_T = plan["K"], plan["W_out_T"]
    # one (nodes, N) x (N, K n_out) product; a broadcast matmul would copy h_base K times
    y = (h_base @ plan["W_keep"]).reshape(-1, K, W_out_T.shape[1]).transpose(0, 1)
    if plan["layer"] is not None:
        h_rows = tree_forward(net, tree, x[None], *plan["layer"])[0]
        starts = plan["starts"]
        for k, rows in enumerate(plan["rows"]):
            if rows.numel():
                y[k] += h_rows[:, starts[k]:starts[k + 1]] @ W_out_T[rows]
    return y[:, torch.from_numpy(tree.node_of).to(y.device)]


# ----------------------------------------------------------------------------------------
# The weight matrix that synapse perturbations act on


def net_shapes(net):
    """(N_hidden, N_pre) of the weight matrix that synapse perturbations act on."""
    return net.synapse_shape()


def plastic_weight(net):
    """The (N_hidden, N_pre) weights pruned and perturbed, as numpy (net.synapse_weight)."""
    return net.synapse_weight().detach().cpu().numpy().copy()


# ----------------------------------------------------------------------------------------
# The results file (lesion.h5): arrays as datasets, everything else as JSON attributes


def conditions_to_arrays(conditions, sizes):
    """The conditions as arrays: per index-set field the ids of the conditions that have it
    and their packed bit masks (n, ⌈n_total / 8⌉); the noise seeds (padded with -1) and σ."""
    out = {}
    for name in FIELDS:
        ids = [i for i, c in enumerate(conditions) if name in c]
        masks = np.zeros((len(ids), (sizes[name] + 7) // 8), np.uint8)
        for row, i in enumerate(ids):
            bits = np.zeros(sizes[name], bool)
            bits[unpack_indices(conditions[i][name])] = True
            masks[row] = np.packbits(bits)
        out[name] = {"ids": np.array(ids, np.int64), "bits": masks}
    noisy = [i for i, c in enumerate(conditions) if "w_noise" in c]
    width = max([len(conditions[i]["w_noise"]["seed"]) for i in noisy] + [1])
    seeds = np.full((len(noisy), width), -1, np.int64)
    for row, i in enumerate(noisy):
        seed = conditions[i]["w_noise"]["seed"]
        seeds[row, :len(seed)] = seed
    out["w_noise"] = {"ids": np.array(noisy, np.int64), "seed": seeds,
                      "sigma": np.array([conditions[i]["w_noise"]["sigma"] for i in noisy])}
    out["n"] = np.array([len(conditions)])
    return out


def conditions_from_arrays(arrays, sizes):
    """Inverse of conditions_to_arrays: the list of condition dicts."""
    conditions = [{} for _ in range(int(np.asarray(arrays["n"]).ravel()[0]))]
    for name in FIELDS:
        for i, bits in zip(arrays[name]["ids"], arrays[name]["bits"]):
            idx = np.flatnonzero(np.unpackbits(bits, count=sizes[name]))
            conditions[int(i)][name] = pack_indices(idx, sizes[name])
    noise = arrays["w_noise"]
    for i, seed, sigma in zip(noise["ids"], noise["seed"], noise["sigma"]):
        conditions[int(i)]["w_noise"] = {"seed": [int(s) for s in seed if s >= 0],
                                         "sigma": float(sigma)}
    return conditions


def _split(tree):
    """(arrays, meta): numpy arrays of a nested dict, and the rest (JSON values)."""
    arrays, meta = {}, {}
    for key, value in tree.items():
        if isinstance(value, dict):
            arrays[key], meta[key] = _split(value)
        elif isinstance(value, np.ndarray):
            arrays[key] = value
        else:
            meta[key] = value
    return arrays, meta


def _merge(arrays, meta):
    out = dict(arrays)
    for key, value in meta.items():
        out[key] = _merge(arrays.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _sizes(result):
    n_hidden, n_pre = result["shapes"]["n_hidden"], result["shapes"]["n_pre"]
    return {"in_units": n_pre, "hid_units": n_hidden, "w_zero": n_hidden * n_pre,
            "m_freeze": n_hidden * n_pre}


def save_result(path, result, cfg, inputs=None):
    """Write a lesion result dict as HDF5 (helper.save_h5), stamped with cfg's hash."""
    tree = dict(result, conditions=conditions_to_arrays(result["conditions"], _sizes(result)))
    arrays, meta = _split(tree)
    helper.save_h5(path, arrays, attrs={"meta": meta}, cfg=cfg, inputs=inputs)


def load_result(path, producer=None, expect_hash=None):
    """The dict save_result wrote."""
    arrays, attrs = helper.load_h5(path, producer, expect_hash)
    result = _merge(arrays, attrs["meta"])
    result["conditions"] = conditions_from_arrays(result["conditions"], _sizes(result))
    return result
