"""The lesion suite's time, and batched vs one-at-a-time evaluation of the same conditions
(lesion.py, lesion_engine.py, SPEC §6.3).

Both paths score the same conditions on the same fixed test set (lesion.make_test_set: all
15 rules, condition sets at several duration quantiles, --trials_per_rule trials per rule) and must
give the same accuracies; the script checks that and prints the wall time of each, the ratio,
and the s.e. of the intact network's per-rule accuracy. With --run it times the suite one
experiment group at a time (modulation; single + combined, which share their input-lesion
base runs; robust + prune) and prints per group its conditions, wall time and the CPU time
of the process and its --processes worker processes (torch on --threads threads: on a
loaded machine the CPU time is the fair measure) and the s.e. achieved per cell (binomial,
√(a(1 − a)/n) of every condition's per-rule `trial` accuracy a: median and largest); the
suite's time is their sum.
  batched   lesion_engine.evaluate_conditions: for a dmpn, one base run per input-lesion set,
            the silenced units zeroed, and only the rows a condition's W / M perturbation
            touches run again, stacked over conditions into one virtual layer, with trials
            that share an input prefix run once up to where they part
            (evaluate_by_rows); other networks stack K conditions per forward pass;
  serial    one net_helpers.evaluate call per condition on the whole test set (all rules
            in one padded batch: the natural way to run one condition);
  per-rule  one evaluate call per (condition, rule) on that rule's trials_per_rule trials.
It also prints the work ceiling: plastic-layer row-steps of the serial path over those of the
batched path, the speed-up a machine bound by arithmetic can reach.

With --run the conditions are that run's default lesion suite (lesion.build_conditions from
its cluster files); the batched path runs all of them, the serial paths a random sample of
--n_serial (each serial condition costs the same full forward pass, so the sample's mean
time per condition, times the suite's size, is the serial suite time). Without --run: an
untrained dmpn of --n_hidden and --n_conditions conditions mixed in the suite's proportions,
every path over all of them. Writes nothing. Timings on a shared machine are indicative only.

Example:
    python benchmarks/bench_lesion.py --n_hidden=64 --n_conditions=120
    python benchmarks/bench_lesion.py --run=everything_dmpn_seed749_L21e4_h64_b32
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helper  # noqa: E402
import lesion  # noqa: E402
import lesion_engine as engine  # noqa: E402
import mpn  # noqa: E402
import mpn_cpp  # noqa: E402
import mpn_tasks  # noqa: E402
import net_helpers  # noqa: E402


def load_net(args):
    """(net, training config); an untrained dmpn of --n_hidden without --run."""
    if args.run:
        net, train_cfg, _ = mpn.load_run(helper.run_paths(args.run, args.runs_dir), "cpu",
                                         args.engine)
        return net, train_cfg
    net = mpn.build_model("dmpn", n_hidden=args.n_hidden, seed=0, engine=args.engine)
    return net.eval(), {"seed": 0, "ruleset": "everything"}


def suite_conditions(args, net, train_cfg):
    """The run's default lesion suite, as lesion.py builds it: (conditions, {experiment:
    its condition ids})."""
    paths = helper.run_paths(args.run, args.runs_dir)
    cfg = dict(lesion.CONFIG, n_random=args.n_random,
               n_random_modulation=args.n_random_modulation)
    ci, ci_mod, variance, fixed_k = lesion.load_clusters(paths, cfg["experiments"])
    cfg["fixed_cut_k"] = int(fixed_k or 20)
    table, tables = lesion.build_conditions(cfg, net, ci, ci_mod, variance, int(train_cfg["seed"]))
    return table.conditions, experiment_ids(tables)


def experiment_ids(tables):
    """{experiment: sorted condition ids it uses} (a condition shared by two counts for both)."""
    out = {}
    for name, group in tables.items():
        ids = []
        for t in (group.values() if isinstance(group, dict) and name != "prune" else [group]):
            if t is None:
                continue
            for key, v in (t.items() if isinstance(t, dict) else []):
                if isinstance(v, np.ndarray) and v.dtype.kind == "i" and (
                        key in ("lesion", "control", "cond", "zero_W", "freeze_M")
                        or key.endswith(("_lesion", "_control"))):
                    ids.append(v.ravel())
        out[name] = np.unique(np.concatenate(ids + [np.zeros(0, int)]))
        out[name] = out[name][out[name] >= 0]
    return out


def work_ceiling(net, conditions, test):
    """Plastic-layer row-steps run by the serial path (every unit of every condition on every
    trial-step) over those of the batched path (every unit once per input-lesion set, plus
    each condition's touched rows, on the distinct input prefixes: PrefixTree nodes): the
    speed-up at best when arithmetic bounds the time."""
    if not net.rows_independent():
        return 1.0
    n_hidden, n_pre = engine.net_shapes(net)
    in_sets = {engine.unpack_indices(c["in_units"]).tobytes() if "in_units" in c else b""
               for c in conditions}
    rows = len(in_sets) * n_hidden + sum(engine.touched_rows(c, n_pre, n_hidden).size
                                         for c in conditions)
    steps = sum(b.inputs.shape[0] * b.inputs.shape[1] for b in test["parts"])
    nodes = sum(engine.PrefixTree(b.inputs).n_nodes for b in test["parts"])
    return len(conditions) * n_hidden * steps / (rows * nodes)


def mixed_conditions(net, n, rng):
    """n conditions of every kind the suite uses, in the proportions of the default suite
    (mostly unit lesions, then synapse lesions, then noise)."""
    n_hidden, n_pre = engine.net_shapes(net)
    table = engine.ConditionTable({"in_units": n_pre, "hid_units": n_hidden,
                                   "w_zero": n_hidden * n_pre, "m_freeze": n_hidden * n_pre})
    makers = [
        lambda: {"hid_units": rng.choice(n_hidden, max(1, n_hidden // 20), replace=False)},
        lambda: {"in_units": rng.choice(n_pre, max(1, n_pre // 20), replace=False)},
        lambda: {"in_units": rng.choice(n_pre, max(1, n_pre // 20), replace=False),
                 "hid_units": rng.choice(n_hidden, max(1, n_hidden // 20), replace=False)},
        lambda: {"w_zero": rng.choice(n_hidden * n_pre, n_hidden * n_pre // 20, replace=False)},
        lambda: {"m_freeze": rng.choice(n_hidden * n_pre, n_hidden * n_pre // 20, replace=False)},
        lambda: {"w_noise": {"seed": [int(rng.integers(1 << 30))], "sigma": 0.02}},
    ]
    share = np.array([0.3, 0.15, 0.25, 0.1, 0.1, 0.1])
    for make, count in zip(makers, np.maximum(1, np.round(share * (n - 1))).astype(int)):
        for _ in range(count):
            table.add(make())
    return table.conditions


def run_serial(net, test, rules, conditions):
    """One net_helpers.evaluate call per condition on the whole test set (all parts, padded)."""
    n_hidden, n_pre = engine.net_shapes(net)
    whole = mpn_tasks.concat_batches(test["parts"])
    acc = {"angle": np.zeros((len(conditions), len(rules))),
           "trial": np.zeros((len(conditions), len(rules)))}
    for i, cond in enumerate(conditions):
        res = net_helpers.evaluate(net, whole,
                                   perturbation=engine.condition_perturbation(cond, n_pre, n_hidden))
        for m in acc:
            for rule, a in res["acc"][m].items():
                acc[m][i, rules.index(rule)] = a
    return acc


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def cpu_seconds():
    """CPU seconds of this process and of its finished children (the lesion worker
    processes, forked_jobs.run_jobs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed_cpu(fn, *args):
    """(wall s, CPU s of this process and its worker processes, result)."""
    start, cpu = time.perf_counter(), cpu_seconds()
    out = fn(*args)
    return time.perf_counter() - start, cpu_seconds() - cpu, out


GROUPS = {"modulation": ("modulation",), "single+combined": ("single", "combined"),
          "robust+prune": ("robust", "prune")}  # experiments timed together (shared base runs)


def time_groups(net, test, rules, conditions, groups, memory_mb, n_test, processes):
    """Per experiment group: (name, conditions, wall s, CPU s, median and largest s.e. per
    cell), and the accuracies of every condition (from the group that ran it last)."""
    rows, acc = [], {m: np.full((len(conditions), len(rules)), np.nan) for m in ("angle", "trial")}
    for name, members in GROUPS.items():
        ids = np.unique(np.concatenate([groups[e] for e in members if e in groups]
                                       + [np.zeros(0, int)]))
        if not ids.size:
            continue
        wall, cpu, out = timed_cpu(batched, net, test, rules, [conditions[i] for i in ids],
                                   memory_mb, processes)
        for m in acc:
            acc[m][ids] = out[m]
        a = out["trial"].astype(np.float64)
        se = np.sqrt(a * (1 - a) / n_test)
        rows.append((name, ids.size, wall, cpu, float(np.median(se)), float(se.max())))
    return rows, acc


def print_groups(rows):
    print(f"  {'experiments':18s} {'conditions':>10s} {'wall s':>8s} {'CPU s':>8s}   s.e. per "
          f"cell (trial): median, largest")
    for name, n, wall, cpu, se_med, se_max in rows:
        print(f"  {name:18s} {n:10d} {wall:8.1f} {cpu:8.1f}   {se_med:.3f}, {se_max:.3f}")
    print(f"  {'suite (sum)':18s} {sum(r[1] for r in rows):10d} {sum(r[2] for r in rows):8.1f} "
          f"{sum(r[3] for r in rows):8.1f}")


def batched(net, test, rules, conditions, memory_mb, processes):
    scores = engine.evaluate_conditions(net, test["parts"], conditions, memory_mb,
                                        processes=processes)
    return lesion.merge_parts(scores, test, len(rules))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="", help="run name: its default suite (else an untrained dmpn)")
    p.add_argument("--runs_dir", default=None)
    p.add_argument("--n_hidden", type=int, default=64)
    p.add_argument("--n_conditions", type=int, default=120, help="without --run")
    p.add_argument("--n_serial", type=int, default=40, help="with --run: serial sample size")
    p.add_argument("--trials_per_rule", type=int, default=lesion.CONFIG["trials_per_rule"])
    p.add_argument("--n_random", type=int, default=lesion.CONFIG["n_random"])
    p.add_argument("--n_random_modulation", type=int,
                   default=lesion.CONFIG["n_random_modulation"])
    p.add_argument("--memory_mb", type=float, default=lesion.CONFIG["memory_mb"])
    p.add_argument("--engine", default="auto")
    p.add_argument("--threads", type=int, default=lesion.CONFIG["num_threads"],
                   help="torch threads (0: torch's default)")
    p.add_argument("--processes", type=int, default=lesion.CONFIG["processes"],
                   help="processes sharing the batched path's jobs (0: one per core)")
    p.add_argument("--kernel_threads", type=int, default=lesion.CONFIG["kernel_threads"],
                   help="compiled-kernel threads (0: $MPN_KERNEL_THREADS, else 1)")
    p.add_argument("--skip_serial", action="store_true")
    p.add_argument("--sample", type=int, default=0,
                   help="with --run: time the batched path on this many random conditions of "
                        "the suite and scale to all (an upper estimate: a sample shares fewer "
                        "base runs); 0 = the whole suite")
    return p.parse_args(argv)


def print_baseline(net, test, rules):
    base = lesion.baseline_accuracy(net, test, rules)
    print(f"intact network: trial accuracy {base['trial'].mean():.3f}, s.e. per rule "
          f"{base['se_trial'].min():.3f}-{base['se_trial'].max():.3f} (worst "
          f"{rules[int(np.argmax(base['se_trial']))]}); angle {base['angle'].mean():.3f}, s.e. "
          f"per rule at most {base['se_angle'].max():.3f}")


def main(argv=None):
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    net, train_cfg = load_net(args)
    rules = mpn_tasks.run_rules(train_cfg)
    cfg = dict(lesion.CONFIG, trials_per_rule=args.trials_per_rule)
    t_test, test = timed(lesion.make_test_set, rules, cfg, int(train_cfg["seed"]), "low_dim",
                         float(train_cfg.get("sigma_x", 0.0)))
    groups = {}
    if args.run:
        t_build, (conditions, groups) = timed(suite_conditions, args, net, train_cfg)
        sample = np.sort(np.random.default_rng(0).choice(
            len(conditions), min(args.n_serial, len(conditions)), replace=False))
    else:
        t_build, conditions = timed(mixed_conditions, net, args.n_conditions,
                                    np.random.default_rng(0))
        sample = np.arange(len(conditions))
    n_hidden, n_pre = engine.net_shapes(net)
    steps = [b.inputs.shape[1] for b in test["parts"]]
    print(f"{net.net_type} N={n_hidden} (N_pre={n_pre}), engine {args.engine}, "
          f"{torch.get_num_threads()} threads; {len(conditions)} conditions x {len(rules)} rules "
          f"x {args.trials_per_rule} trials in {len(steps)} parts; T = {min(steps)}..{max(steps)} steps "
          f"(mean {np.mean(steps):.0f}); test set {t_test:.1f} s, conditions built in {t_build:.1f} s")
    processes = engine.worker_processes(net, args.processes)
    print(f"batched path in {processes} process(es), compiled kernel on "
          f"{args.kernel_threads or mpn_cpp.threads()} thread(s) each")
    with torch.no_grad(), mpn_cpp.using_threads(args.kernel_threads):
        print_baseline(net, test, rules)
        if args.run and args.sample:
            keep = np.sort(np.random.default_rng(1).choice(len(conditions), args.sample,
                                                           replace=False))
            t, _ = timed(batched, net, test, rules, [conditions[i] for i in keep], args.memory_mb,
                         processes)
            print(f"batched on {args.sample} random conditions: {t:.1f} s -> the suite "
                  f"(scaled to {len(conditions)}): {t * len(conditions) / args.sample:.0f} s")
            return
        if args.run:
            groups_rows, acc_b = time_groups(net, test, rules, conditions, groups,
                                             args.memory_mb, args.trials_per_rule, processes)
            print_groups(groups_rows)
            t_batch = sum(r[2] for r in groups_rows)
        else:
            t_batch, acc_b = timed(batched, net, test, rules, conditions, args.memory_mb,
                                   processes)
        rows = [("batched (the suite)", t_batch)]
        if not args.skip_serial:
            t, acc_s = timed(run_serial, net, test, rules, [conditions[i] for i in sample])
            for m in ("angle", "trial"):
                np.testing.assert_allclose(acc_b[m][sample], acc_s[m], atol=1e-5)
            rows.append(("serial (whole test set per call)", t * len(conditions) / len(sample)))
            print(f"accuracies identical across paths ({len(sample)} conditions compared; serial "
                  f"time scaled to all {len(conditions)})")
    for name, t in rows:
        print(f"  {name:36s} {t:8.1f} s  {1e3 * t / len(conditions):8.1f} ms/condition  "
              f"x{t / t_batch:5.2f} vs batched")
    print(f"work ceiling (serial / batched plastic-layer row-steps): "
          f"x{work_ceiling(net, conditions, test):.2f}")


if __name__ == "__main__":
    main()
