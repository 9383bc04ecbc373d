"""Batched vs one-at-a-time evaluation of the same lesion conditions (lesion.py, SPEC §6.2).

Both paths score the same conditions on the same fixed test set (lesion.make_test_set: all
15 rules, aligned trials) and must give the same accuracies; the script checks that and
prints the wall time of each and the ratio:
  batched   lesion.evaluate_conditions: K conditions x n_test trial copies of one rule per
            forward pass (Perturbation.stack), K from the memory budget (conditions that
            change W run alone over all rules while the compiled kernel lacks per-trial W);
  serial    one net_helpers.evaluate call per condition on the whole test set (all rules
            in one padded batch: the natural way to run one condition);
  per-rule  one evaluate call per (condition, rule) on that rule's n_test trials.
It also prints the projected time of the default lesion suite at this N.

Reads a run's checkpoint with --run (else builds an untrained dmpn: speed does not depend
on the weights); writes nothing. Timings on a shared machine are indicative only.

Example:
    python benchmarks/bench_lesion.py --n_hidden=64 --n_conditions=120
    python benchmarks/bench_lesion.py --run=everything_dmpn_seed749_L21e4_h64_b64
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helper  # noqa: E402
import lesion  # noqa: E402
import mpn  # noqa: E402
import mpn_tasks  # noqa: E402
import net_helpers  # noqa: E402


def load_net(args):
    if args.run:
        cfg = dict(lesion.CONFIG, device="cpu", engine=args.engine)
        net, train_cfg, _ = lesion.load_network(helper.run_paths(args.run, args.runs_dir), cfg)
        return net, int(train_cfg["seed"])
    net = mpn.build_model("dmpn", n_hidden=args.n_hidden, seed=0, engine=args.engine)
    return net.eval(), 0


def mixed_conditions(net, n, rng):
    """n conditions of every kind the suite uses, in the proportions of the default suite
    (mostly unit lesions, then synapse lesions, then noise)."""
    n_hidden, n_pre = lesion.net_shapes(net)
    table = lesion.ConditionTable({"in_units": n_pre, "hid_units": n_hidden,
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


def run_serial(net, tests, rules, conditions, per_rule):
    n_hidden, n_pre = lesion.net_shapes(net)
    whole = mpn_tasks.concat_batches(tests)
    acc = {"angle": np.zeros((len(conditions), len(rules))),
           "trial": np.zeros((len(conditions), len(rules)))}
    for i, cond in enumerate(conditions):
        pert = lesion.condition_perturbation(cond, n_pre, n_hidden)
        parts = [(b, net_helpers.evaluate(net, b, perturbation=pert)) for b in tests] \
            if per_rule else [(whole, net_helpers.evaluate(net, whole, perturbation=pert))]
        for _, res in parts:
            for m in acc:
                for rule, a in res["acc"][m].items():
                    acc[m][i, rules.index(rule)] = a
    return acc


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="", help="run name (else an untrained dmpn)")
    p.add_argument("--runs_dir", default=None)
    p.add_argument("--n_hidden", type=int, default=64)
    p.add_argument("--n_conditions", type=int, default=120)
    p.add_argument("--n_test", type=int, default=lesion.CONFIG["n_test"])
    p.add_argument("--test_quantile", type=float, default=lesion.CONFIG["test_quantile"])
    p.add_argument("--memory_mb", type=float, default=lesion.CONFIG["memory_mb"])
    p.add_argument("--engine", default="auto")
    p.add_argument("--threads", type=int, default=lesion.CONFIG["torch_threads"],
                   help="torch threads (0: torch's default)")
    p.add_argument("--skip_per_rule", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    net, seed = load_net(args)
    rules = list(mpn_tasks.RULES)
    cfg = dict(lesion.CONFIG, n_test=args.n_test, test_quantile=args.test_quantile)
    tests = lesion.make_test_set(rules, cfg, seed, "low_dim")
    conditions = mixed_conditions(net, args.n_conditions, np.random.default_rng(0))
    n_hidden, n_pre = lesion.net_shapes(net)
    steps = [b.inputs.shape[1] for b in tests]
    print(f"dmpn N={n_hidden} (N_pre={n_pre}), engine {args.engine}, {torch.get_num_threads()} "
          f"threads; {len(conditions)} conditions x {len(rules)} rules x {args.n_test} trials; "
          f"T = {min(steps)}..{max(steps)} steps (mean {np.mean(steps):.0f})")
    with torch.no_grad():
        t_batch, acc_b = timed(lesion.evaluate_conditions, net, tests, conditions, args.memory_mb)
        t_serial, acc_s = timed(run_serial, net, tests, rules, conditions, False)
        rows = [("batched", t_batch), ("serial (whole test set per call)", t_serial)]
        if not args.skip_per_rule:
            t_rule, acc_r = timed(run_serial, net, tests, rules, conditions, True)
            rows.append(("serial (one rule per call)", t_rule))
            np.testing.assert_allclose(acc_b["angle"], acc_r["angle"], atol=1e-6)
    for m in ("angle", "trial"):
        np.testing.assert_allclose(acc_b[m], acc_s[m], atol=1e-6)
    print("accuracies identical across paths")
    for name, t in rows:
        print(f"  {name:34s} {t:8.2f} s  {1e3 * t / len(conditions):8.1f} ms/condition  "
              f"x{t / t_batch:5.2f} vs batched")
    per_cond = t_batch / len(conditions)
    print(f"projection: the default suite runs ~{600 / per_cond:.0f} distinct conditions in "
          f"10 minutes at this N ({1e3 * per_cond:.0f} ms per condition)")


if __name__ == "__main__":
    main()
